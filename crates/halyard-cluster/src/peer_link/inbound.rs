//! The receiving half: serves link connections, drops duplicates and sends acks back.

use std::collections::BTreeMap;
use std::io;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::{mpsc, watch};

use super::{Delivery, LinkFrame};
use crate::frame::{self, FramedStream};
use crate::metrics::{bump, Counters};
use crate::types::NodeId;

/// Duplicate detection of one origin incarnation.
struct Marks {
    /// The highest seq handed to the app.
    high_water: u64,
    /// The highest seq the app has stored; watched by the connection that sends acks.
    acked: watch::Sender<u64>,
}

impl Marks {
    fn new(seq: u64) -> Self {
        Self {
            high_water: seq,
            acked: watch::Sender::new(seq),
        }
    }
}

#[derive(Default)]
struct InboundState {
    marks: BTreeMap<(NodeId, u64), Marks>,
    /// The incarnation each origin last connected with; `ack` applies to it.
    latest: BTreeMap<NodeId, u64>,
}

/// Shared by every incoming link connection and the app's `ack`.
#[derive(Clone)]
pub(crate) struct LinkInbound {
    state: Arc<Mutex<InboundState>>,
    deliveries: mpsc::Sender<Delivery>,
    counters: Arc<Counters>,
}

/// What to do with a received data frame.
enum Verdict {
    Fresh,
    /// Seen before; the app has stored up to `acked`.
    Duplicate {
        acked: u64,
    },
}

impl LinkInbound {
    pub(crate) fn new(deliveries: mpsc::Sender<Delivery>, counters: Arc<Counters>) -> Self {
        Self {
            state: Arc::default(),
            deliveries,
            counters,
        }
    }

    fn lock(&self) -> MutexGuard<'_, InboundState> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub(crate) fn ack(&self, origin: NodeId, seq: u64) {
        let state = self.lock();
        let Some(incarnation) = state.latest.get(&origin) else {
            return;
        };
        if let Some(marks) = state.marks.get(&(origin, *incarnation)) {
            marks.acked.send_if_modified(|acked| {
                let raise = seq > *acked;
                if raise {
                    *acked = seq;
                }
                raise
            });
        }
    }

    pub(crate) fn seed(&self, origin: NodeId, incarnation: u64, seq: u64) {
        let mut state = self.lock();
        let marks = state
            .marks
            .entry((origin, incarnation))
            .or_insert_with(|| Marks::new(0));
        marks.high_water = marks.high_water.max(seq);
        marks.acked.send_if_modified(|acked| {
            let raise = seq > *acked;
            if raise {
                *acked = seq;
            }
            raise
        });
    }

    fn register(&self, origin: NodeId, incarnation: u64) -> watch::Receiver<u64> {
        let mut state = self.lock();
        state.latest.insert(origin, incarnation);
        state
            .marks
            .entry((origin, incarnation))
            .or_insert_with(|| Marks::new(0))
            .acked
            .subscribe()
    }

    fn judge(&self, origin: NodeId, incarnation: u64, seq: u64) -> Verdict {
        let mut state = self.lock();
        let marks = state
            .marks
            .entry((origin, incarnation))
            .or_insert_with(|| Marks::new(0));
        if seq <= marks.high_water {
            return Verdict::Duplicate {
                acked: *marks.acked.borrow(),
            };
        }
        marks.high_water = seq;
        Verdict::Fresh
    }

    /// Serves one link connection from `origin` until it ends.
    pub(crate) async fn serve(
        &self,
        mut connection: FramedStream,
        origin: NodeId,
        incarnation: u64,
    ) -> io::Result<()> {
        let mut acked = self.register(origin, incarnation);
        let already = *acked.borrow_and_update();
        if already > 0 {
            frame::send(&mut connection, &LinkFrame::Ack { seq: already }).await?;
        }
        loop {
            // Biased, so that a simulation replays (see the acceptor).
            tokio::select! {
                biased;
                changed = acked.changed() => {
                    if changed.is_err() {
                        return Ok(());
                    }
                    let seq = *acked.borrow_and_update();
                    frame::send(&mut connection, &LinkFrame::Ack { seq }).await?;
                }
                received = frame::receive::<LinkFrame>(&mut connection) => match received? {
                    None => return Ok(()),
                    Some(LinkFrame::Data { origin: from, incarnation: from_incarnation, seq, payload })
                        if from == origin && from_incarnation == incarnation =>
                    {
                        match self.judge(origin, incarnation, seq) {
                            Verdict::Fresh => {
                                let delivery = Delivery { origin, origin_incarnation: incarnation, seq, payload };
                                if self.deliveries.send(delivery).await.is_err() {
                                    return Ok(());
                                }
                                bump(&self.counters.link_delivered);
                            }
                            Verdict::Duplicate { acked } => {
                                bump(&self.counters.link_duplicates);
                                if acked >= seq {
                                    frame::send(&mut connection, &LinkFrame::Ack { seq: acked }).await?;
                                }
                            }
                        }
                    }
                    Some(_) => {
                        return Err(io::Error::new(io::ErrorKind::InvalidData, "unexpected frame on the receiving side"));
                    }
                }
            }
        }
    }
}
