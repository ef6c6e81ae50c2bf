//! The task that owns the [`Broker`]: the only place the core runs, so the core needs no lock.

use std::collections::HashMap;
use std::future::pending;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::task::Poll;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures_util::task::AtomicWaker;
use halyard_codec::{
    encode, encoded_publish_topic, publish_packet_id_offset, DecodeError, Packet, Properties,
    ProtocolVersion, QoS,
};
use halyard_core::store::StoreError;
use halyard_core::{Broker, ConnectionId, DropReport, Output};
use indexmap::IndexMap;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, error, info, warn};

use crate::metrics::Metrics;
use crate::park::Parker;
use halyard_core::sys::{SysTopics, SysTraffic};

/// Events handled after one wake-up before outputs are dispatched: batching events lets one
/// drain coalesce more packets per connection and lets more messages share one store commit
/// (fsync); bounding it keeps the first event's latency low.
const MAX_EVENTS_PER_DRAIN: usize = 256;

/// The park sweep visits this fraction of the connections per tick, so one tick never holds
/// the broker task for long: visiting a connection costs 35-55 ns (an atomic on its state,
/// usually a cache miss), and all 10,000 at once took 0.33-0.55 ms.
const SWEEP_SLICES: u32 = 16;

/// Longest time without a store commit, so interval durability holds on an idle broker.
const IDLE_COMMIT_PERIOD: Duration = Duration::from_millis(100);

/// What connection tasks tell the broker task.
#[derive(Debug)]
pub(crate) enum Event {
    /// A socket was accepted; always the first event of a connection.
    Open {
        /// The new connection.
        conn: ConnectionId,
        /// Where its outbound packets go.
        link: Link,
    },
    /// Every packet decoded from one read, in order.
    Packets {
        /// Sender.
        conn: ConnectionId,
        /// The packets.
        packets: Vec<Packet>,
    },
    /// The decoder rejected the connection's bytes; the connection reads no more.
    DecodeError {
        /// Sender.
        conn: ConnectionId,
        /// What was wrong.
        error: DecodeError,
    },
    /// The socket closed, failed or timed out before CONNECT.
    Lost {
        /// The connection that is gone.
        conn: ConnectionId,
    },
    /// An operator request from the HTTP admin API, run on the broker between packets.
    Admin(AdminCall),
    /// The connection's writer wrote everything queued up to a [`WrittenNotice`].
    Written {
        /// The connection.
        conn: ConnectionId,
    },
}

/// Asks a connection's writer to report [`Event::Written`] when it takes the batch carrying
/// it, that is once everything queued before has been written: the server's half of
/// [`Output::NotifyWritten`], which paces retained messages streamed at QoS 0.
#[derive(Debug)]
pub(crate) struct WrittenNotice {
    /// The connection to report.
    pub(crate) conn: ConnectionId,
    /// Where to report it.
    pub(crate) events: mpsc::Sender<Event>,
}

impl WrittenNotice {
    /// Reports the write; an error means the broker task is gone and nobody waits.
    pub(crate) async fn send(self) {
        let _ = self.events.send(Event::Written { conn: self.conn }).await;
    }
}

impl PartialEq for WrittenNotice {
    fn eq(&self, other: &WrittenNotice) -> bool {
        self.conn == other.conn
    }
}

impl Eq for WrittenNotice {}

/// A query or action on the broker from the admin API; the closure sends its own reply
/// (over a oneshot channel it captured), so each endpoint defines its answer's type.
pub(crate) struct AdminCall(pub(crate) AdminFn);

/// The work of an [`AdminCall`]: runs once on the broker task with the current time.
pub(crate) type AdminFn = Box<dyn FnOnce(&mut Broker, Instant) + Send>;

impl std::fmt::Debug for AdminCall {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AdminCall")
    }
}

/// Operations settings of the broker task (issue 5).
#[derive(Debug, Default)]
pub(crate) struct TaskOps {
    /// Where traffic is counted.
    pub(crate) metrics: Arc<Metrics>,
    /// Period of `$SYS/broker/...` publication; `None` = off.
    pub(crate) sys_interval: Option<std::time::Duration>,
    /// The broker task's own event channel, for writers to report [`Event::Written`]; weak,
    /// so that it is not what keeps the channel open. (With parking, the parker keeps a
    /// sender for resumed connections; the task ends on its stop signal either way.)
    pub(crate) written: Option<mpsc::WeakSender<Event>>,
    /// Where idle connections park; `None` = they never park.
    pub(crate) parker: Option<Arc<Parker>>,
}

/// State shared between a connection task and the dispatcher. It outlives a parked
/// connection's task, so its size is part of the memory of every idle connection: atomics
/// are packed and the wakers are the smallest that serve (one waiter each).
#[derive(Debug, Default)]
pub(crate) struct Shared {
    /// Encoded bytes handed to the writer but not yet written: the slow-consumer measure.
    pub(crate) queued_bytes: AtomicUsize,
    /// Live [`BatchSender`]s; when it drops to 0 the writer's `recv` returns `None`.
    senders: AtomicU32,
    /// Protocol level of the connection's CONNECT (0: none yet); set once by the reader
    /// before it forwards the CONNECT, so it is known before any reply is encoded.
    version: AtomicU8,
    /// Set while the core pushes back on this connection as a publisher
    /// ([`Output::Pause`]): the reader stops reading until it is cleared.
    pub(crate) paused: AtomicBool,
    /// Set by the reader of a connection that parks whenever it reads; cleared by each
    /// sweep (see [`Shared::sweep_idle`]).
    read_since_sweep: AtomicBool,
    /// Set by a sweep that found the connection idle: the reader parks it at its next wait
    /// for input with no partial packet buffered.
    park_requested: AtomicBool,
    /// Set (under the `outq` lock) while the writer holds bytes it took from `outq` and has
    /// not written yet: the dispatcher must not write past them.
    writing: AtomicBool,
    /// Set (under the `outq` lock) while the connection is parked (see `park.rs`): it has no
    /// task, so whoever queues something for it, or drops the last sender, must wake it.
    parked: AtomicBool,
    /// Wakes the reader when `paused` is cleared.
    resume: AtomicWaker,
    /// Wakes the writer when `outq` gets something or the last sender goes, and the whole
    /// connection task when it is asked to park.
    ready: AtomicWaker,
    /// What the writer has to write, and the socket, under one lock.
    outq: Mutex<Queue>,
}

/// The part of [`Shared`] under its lock.
#[derive(Debug, Default)]
struct Queue {
    /// Packets handed to the writer and not yet taken, merged into one batch: a
    /// per-connection queue that costs nothing while empty (a tokio mpsc channel allocates a
    /// 32-slot block, 1.8 KB, per connection up front). See [`batch_channel`].
    batch: Batch,
    /// A plain TCP connection's socket, shared by its task and the dispatcher's direct writes
    /// (see [`Link::write_directly`]).
    socket: TcpSocket,
}

/// Where a plain TCP connection's socket is.
#[derive(Debug, Default)]
enum TcpSocket {
    /// Not a plain TCP connection (TLS, WebSocket): their framing state lives in the task.
    #[default]
    None,
    /// Registered with tokio's reactor, for the connection task.
    Awake(Arc<TcpStream>),
    /// Parked: out of tokio's reactor, registered with the parker.
    Parked(std::net::TcpStream),
}

impl Shared {
    /// Pauses or resumes the reader (see [`Shared::paused`]).
    pub(crate) fn set_paused(&self, paused: bool) {
        self.paused.store(paused, Ordering::Release);
        if !paused {
            self.resume.wake();
        }
    }

    /// Waits while the reader is paused.
    pub(crate) async fn wait_unpaused(&self) {
        std::future::poll_fn(|cx| {
            self.resume.register(cx.waker());
            if self.paused.load(Ordering::Acquire) {
                Poll::Pending
            } else {
                Poll::Ready(())
            }
        })
        .await;
    }

    /// Records the protocol of the connection's CONNECT.
    pub(crate) fn set_version(&self, version: ProtocolVersion) {
        self.version.store(version.level(), Ordering::Release);
    }

    /// The version to encode with: 3.1.1 until a CONNECT said otherwise.
    pub(crate) fn version(&self) -> ProtocolVersion {
        match self.version.load(Ordering::Acquire) {
            3 => ProtocolVersion::V3_1,
            5 => ProtocolVersion::V5,
            _ => ProtocolVersion::V3_1_1,
        }
    }

    /// The lock over the writer's queue and the socket.
    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.outq.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether the writer has nothing to do: nothing queued, nothing taken and unwritten.
    /// Only meaningful under the lock (`queue`), which both change under.
    fn writer_idle(&self, queue: &Queue) -> bool {
        queue.batch.is_empty() && !self.writing.load(Ordering::Relaxed)
    }

    /// Notes input, for [`Shared::sweep_idle`].
    pub(crate) fn note_read(&self) {
        self.read_since_sweep.store(true, Ordering::Relaxed);
    }

    /// Asks the reader to park the connection if it has read nothing since the previous
    /// sweep: called once per park period, so a connection parks after between one and two
    /// periods of silence. A sweep instead of a timer in every connection: a timer would
    /// cost each read a timer-wheel update and each connection task about 200 bytes.
    pub(crate) fn sweep_idle(&self) {
        if !self.read_since_sweep.swap(false, Ordering::Relaxed) {
            self.park_requested.store(true, Ordering::Relaxed);
            // Wakes the connection task (its writer waits for this); the task then polls its
            // reader too, which sees the request. Also when one was pending already: a
            // request meets a busy writer, and nothing else may wake the task once it is idle.
            self.ready.wake();
        }
    }

    /// Forgets the connection task's wakers: a registered waker keeps its task's memory
    /// alive, which a parked connection must not.
    pub(crate) fn forget_task(&self) {
        drop(self.ready.take());
        drop(self.resume.take());
    }

    /// Takes a pending park request, if the writer is idle: nothing queued, nothing taken
    /// and unwritten. The reader ends the session when this returns true, which drops the
    /// writer's future; that is only safe while it waits for a batch. A request made while
    /// the writer is busy stays pending until a later poll finds it idle.
    pub(crate) fn take_park_request(&self) -> bool {
        if !self.park_requested.load(Ordering::Relaxed) {
            return false;
        }
        if !self.writer_idle(&self.lock()) {
            return false;
        }
        self.park_requested.swap(false, Ordering::Relaxed)
    }

    /// Drops a park request that no longer applies (one made before the CONNECT).
    pub(crate) fn clear_park_request(&self) {
        self.park_requested.store(false, Ordering::Relaxed);
    }

    /// Makes this a plain TCP connection with `socket`.
    pub(crate) fn set_socket(&self, socket: TcpStream) {
        self.lock().socket = TcpSocket::Awake(Arc::new(socket));
        // Accepting counts as input: a new connection parks only after a whole park period
        // without any (a fresh one parking at its first sweep visit, a client that connected
        // and then subscribed lost the race against another client's publish).
        self.note_read();
    }

    /// The plain TCP socket registered with tokio's reactor (registering it again if it was
    /// parked); an error if it cannot be registered or this is no plain TCP connection.
    pub(crate) fn awaken(&self) -> std::io::Result<Arc<TcpStream>> {
        let mut queue = self.lock();
        let awake = match std::mem::take(&mut queue.socket) {
            TcpSocket::Awake(socket) => socket,
            TcpSocket::Parked(socket) => Arc::new(TcpStream::from_std(socket)?),
            TcpSocket::None => return Err(std::io::ErrorKind::NotConnected.into()),
        };
        queue.socket = TcpSocket::Awake(Arc::clone(&awake));
        Ok(awake)
    }

    /// Parks the connection if it can park: nothing is queued for its writer, the writer
    /// holds nothing unwritten, the dispatcher still has its link, and the connection task
    /// holds no handle to the socket any more. The socket leaves tokio's reactor; its
    /// descriptor is returned for the parker's. `Ok(None)`: it cannot park now. An error:
    /// the socket is lost.
    pub(crate) fn try_park(&self) -> std::io::Result<Option<RawFd>> {
        let mut queue = self.lock();
        if !self.writer_idle(&queue) || self.senders.load(Ordering::Acquire) == 0 {
            return Ok(None);
        }
        let TcpSocket::Awake(socket) = std::mem::take(&mut queue.socket) else {
            return Ok(None);
        };
        let socket = match Arc::try_unwrap(socket) {
            Ok(socket) => socket.into_std()?,
            Err(socket) => {
                queue.socket = TcpSocket::Awake(socket);
                return Ok(None);
            }
        };
        let fd = socket.as_raw_fd();
        queue.socket = TcpSocket::Parked(socket);
        self.parked.store(true, Ordering::Relaxed);
        Ok(Some(fd))
    }

    /// The socket's descriptor while it is parked.
    pub(crate) fn parked_fd(&self) -> Option<RawFd> {
        match &self.lock().socket {
            TcpSocket::Parked(socket) => Some(socket.as_raw_fd()),
            _ => None,
        }
    }

    /// Clears the parked mark; returns whether it was set, i.e. whether the caller must wake
    /// the connection.
    pub(crate) fn take_parked(&self) -> bool {
        let _queue = self.lock();
        self.parked.swap(false, Ordering::Relaxed)
    }
}

/// The writer queue of one connection, as a channel: `BatchSender`s (the broker task's
/// [`Link`], the reader refusing a CONNECT) append, the connection's writer takes everything
/// queued at once. Same contract as an unbounded mpsc channel of [`Batch`]es, except that
/// consecutive batches come out merged.
pub(crate) fn batch_channel(shared: &Arc<Shared>) -> (BatchSender, BatchReceiver) {
    shared.senders.fetch_add(1, Ordering::AcqRel);
    (
        BatchSender(Arc::clone(shared)),
        BatchReceiver(Arc::clone(shared)),
    )
}

/// Sending half of [`batch_channel`].
#[derive(Debug)]
pub(crate) struct BatchSender(Arc<Shared>);

impl BatchSender {
    /// Queues `batch` for the writer and counts its bytes in [`Shared::queued_bytes`] (the
    /// writer subtracts what it takes once written). Never waits: what a connection can have
    /// queued is bounded by the QoS 0 drop rule and the core's in-flight window. Returns
    /// whether the connection is parked and must be woken to write it (see `park.rs`).
    #[must_use = "a parked connection must be woken"]
    pub(crate) fn send(&self, batch: Batch) -> bool {
        let wake;
        {
            let mut queue = self.0.lock();
            let queued = &mut queue.batch;
            let added = batch.wire.len();
            if queued.is_empty() {
                *queued = batch;
            } else if !queued.close {
                queued.wire.extend_from_slice(&batch.wire);
                queued.close = batch.close;
                if batch.written.is_some() {
                    queued.written = batch.written;
                }
            } else {
                // Nothing more is written after a close.
                return false;
            }
            self.0.queued_bytes.fetch_add(added, Ordering::Relaxed);
            wake = self.0.parked.swap(false, Ordering::Relaxed);
        }
        self.0.ready.wake();
        wake
    }
}

impl Clone for BatchSender {
    fn clone(&self) -> Self {
        self.0.senders.fetch_add(1, Ordering::AcqRel);
        BatchSender(Arc::clone(&self.0))
    }
}

impl Drop for BatchSender {
    fn drop(&mut self) {
        if self.0.senders.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.ready.wake();
        }
    }
}

/// Receiving half of [`batch_channel`].
#[derive(Debug)]
pub(crate) struct BatchReceiver(Arc<Shared>);

impl BatchReceiver {
    /// Everything queued so far, waiting for something if nothing is; `None` once every
    /// sender is gone and nothing is left.
    pub(crate) async fn recv(&mut self) -> Option<Batch> {
        std::future::poll_fn(|cx| {
            // Registered before looking, so a send in between still wakes us.
            self.0.ready.register(cx.waker());
            if let Some(batch) = self.try_recv() {
                return Poll::Ready(Some(batch));
            }
            if self.0.senders.load(Ordering::Acquire) == 0 {
                // A batch sent just before the last sender went is still taken.
                return Poll::Ready(self.try_recv());
            }
            Poll::Pending
        })
        .await
    }

    /// A receiver for a connection resumed from parking (the first one comes from
    /// [`batch_channel`]).
    pub(crate) fn resume(shared: &Arc<Shared>) -> BatchReceiver {
        BatchReceiver(Arc::clone(shared))
    }

    /// Everything queued so far, if anything is. The writer owns its bytes until it calls
    /// [`BatchReceiver::written`].
    pub(crate) fn try_recv(&mut self) -> Option<Batch> {
        let mut queue = self.0.lock();
        if queue.batch.is_empty() {
            return None;
        }
        self.0.writing.store(true, Ordering::Relaxed);
        Some(std::mem::take(&mut queue.batch))
    }

    /// The batch taken last is written: the dispatcher may write directly again.
    pub(crate) fn written(&mut self) {
        let _queue = self.0.lock();
        self.0.writing.store(false, Ordering::Relaxed);
    }
}

/// The broker task's handle to one connection's writer.
#[derive(Debug)]
pub(crate) struct Link {
    /// Unbounded on purpose: the broker task must never wait on one slow client. What it
    /// holds is bounded by the QoS 0 drop rule and the core's in-flight window.
    pub(crate) tx: BatchSender,
}

impl Link {
    /// The state shared with the connection task (the sender's own handle to it: one pointer
    /// per connection in the dispatcher's map, not two).
    pub(crate) fn shared(&self) -> &Arc<Shared> {
        &self.tx.0
    }

    /// Writes the start of `batch` straight to the socket when the connection's writer is
    /// idle, so that the common case (a socket with room) needs no wake-up of the connection
    /// task: one hand-off fewer per message, as in a single-threaded broker. Whatever the
    /// socket does not take right away stays in `batch` for the writer. Batches with a close
    /// or a write notice always go through the writer, which owns those steps.
    fn write_directly(&self, batch: &mut Batch) {
        if batch.close || batch.written.is_some() || batch.wire.is_empty() {
            return;
        }
        // Held across the write: the writer cannot take (and write) anything meanwhile.
        let shared = self.shared();
        let queue = shared.lock();
        if !shared.writer_idle(&queue) {
            return;
        }
        // An error (or `WouldBlock`) is left for the writer to meet on its own write, where it
        // ends the task. Both kinds of socket are non-blocking.
        let written = match &queue.socket {
            TcpSocket::Awake(socket) => socket.try_write(&batch.wire),
            TcpSocket::Parked(socket) => std::io::Write::write(&mut &*socket, &batch.wire),
            TcpSocket::None => return,
        };
        if let Ok(written) = written {
            bytes::Buf::advance(&mut batch.wire, written);
        }
    }
}

/// Everything one drain of the core produced for one connection, already encoded: the
/// broker task encodes as it dispatches, straight into this buffer, so a packet is never
/// moved as a value again (a `Packet` is about 400 bytes; queueing them per connection and
/// encoding in the writer spent a quarter of fan-in's CPU in `memmove`) and the writer only
/// writes.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Batch {
    /// The packets' bytes, in order.
    pub(crate) wire: BytesMut,
    /// Report [`Event::Written`] when the writer takes this batch. Boxed: only retained
    /// streams use it, and the core has at most one outstanding per connection.
    pub(crate) written: Option<Box<WrittenNotice>>,
    /// Close the connection after writing the packets.
    pub(crate) close: bool,
}

impl Batch {
    /// Whether there is nothing to do: no bytes, no close, no notice.
    fn is_empty(&self) -> bool {
        self.wire.is_empty() && !self.close && self.written.is_none()
    }
}

/// Runs the broker until `stop` fires (or the server is dropped), then shuts it down and
/// dispatches its goodbyes. Each batch of events is committed to the store before its
/// packets are dispatched, so no acknowledgement leaves before the state it confirms is
/// durable; a failed commit ends the task with the error, and the batch's packets are
/// never sent.
pub(crate) async fn run(
    mut broker: Broker,
    mut events: mpsc::Receiver<Event>,
    mut stop: oneshot::Receiver<()>,
    max_outbound_buffer: usize,
    ops: TaskOps,
) -> Result<(), StoreError> {
    let mut dispatcher = Dispatcher::new(max_outbound_buffer);
    dispatcher.metrics = Arc::clone(&ops.metrics);
    dispatcher.written = ops.written;
    let mut sys = ops
        .sys_interval
        .map(|interval| SysTopics::new(interval, Instant::now()));
    // Commits also run on an idle tick: with `fsync = "interval"` the store makes earlier
    // non-durable commits durable on a later commit, which must come even without traffic.
    let mut idle_commit = tokio::time::interval(IDLE_COMMIT_PERIOD);
    idle_commit.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Drops are logged when they first happen, then at most once per period.
    let mut drops_logged: Option<Instant> = None;
    dispatcher.parker = ops.parker;
    let mut park_sweep = dispatcher.parker.as_ref().map(|parker| {
        let mut sweep = tokio::time::interval(parker.after / SWEEP_SLICES);
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        sweep
    });
    loop {
        let deadline = broker.poll_timeout();
        let timer = async {
            match deadline {
                Some(at) => tokio::time::sleep_until(at.into()).await,
                None => pending().await,
            }
        };
        let sys_due = sys.as_ref().map(SysTopics::poll_timeout);
        let sys_timer = async {
            match sys_due {
                Some(at) => tokio::time::sleep_until(at.into()).await,
                None => pending().await,
            }
        };
        // Set when this wake-up took events with PUBLISH packets: their latency is measured.
        let mut publishes_since = None;
        // Set when this wake-up took a full drain of events: the broker is saturated.
        let mut saturated = false;
        tokio::select! {
            biased;
            _ = &mut stop => break,
            event = events.recv() => {
                let Some(event) = event else { break };
                let now = Instant::now();
                let mut publishes = dispatcher.handle(&mut broker, now, event);
                saturated = true;
                for _ in 1..MAX_EVENTS_PER_DRAIN {
                    match events.try_recv() {
                        Ok(event) => publishes |= dispatcher.handle(&mut broker, now, event),
                        Err(_) => {
                            saturated = false;
                            break;
                        }
                    }
                }
                publishes_since = publishes.then_some(now);
            }
            () = timer => broker.handle_timeout(Instant::now()),
            () = sys_timer => {
                if let Some(sys) = sys.as_mut() {
                    let metrics = &dispatcher.metrics;
                    let traffic = SysTraffic {
                        bytes_received: metrics.bytes_received.get(),
                        bytes_sent: metrics.bytes_sent.get(),
                        connections: metrics.connections_accepted.get(),
                    };
                    sys.handle_timeout(&mut broker, Instant::now(), traffic);
                }
            }
            _ = idle_commit.tick() => {}
            _ = async {
                match park_sweep.as_mut() {
                    Some(sweep) => sweep.tick().await,
                    None => pending().await,
                }
            } => dispatcher.sweep_idle(),
        }
        commit(&mut broker)?;
        broker.take_outputs_with(|outputs| dispatcher.dispatch(outputs));
        if broker.has_drops_to_report()
            && drops_logged.is_none_or(|at| at.elapsed() >= DROP_LOG_PERIOD)
        {
            log_drops(&broker.take_drop_report());
            drops_logged = Some(Instant::now());
        }
        if let Some(since) = publishes_since {
            dispatcher.metrics.observe_publish_latency(since.elapsed());
        }
        if saturated {
            // Saturated, the broker task would keep its worker thread to itself: let the
            // connection tasks queued behind it on this worker (writers draining what it just
            // dispatched) run first, or the slow-consumer rule drops QoS 0 for want of a turn.
            tokio::task::yield_now().await;
        }
    }
    broker.shutdown(Instant::now());
    commit(&mut broker)?;
    broker.take_outputs_with(|outputs| dispatcher.dispatch(outputs));
    info!(dropped_qos0 = dispatcher.dropped_qos0, "broker stopped");
    Ok(())
}

/// How often messages dropped for full queues are logged: one line per client and reason
/// per period, however many were dropped (the first drops are logged at once).
const DROP_LOG_PERIOD: Duration = Duration::from_secs(10);

fn log_drops(report: &DropReport) {
    for (client_id, reason, count) in &report.clients {
        warn!(
            client_id = %client_id,
            reason = reason.label(),
            dropped = count,
            "messages dropped for a full queue (queue_full_policy)"
        );
    }
    if report.others > 0 {
        warn!(
            dropped = report.others,
            "messages dropped for full queues of further clients"
        );
    }
}

/// Commits the broker's journal. The commit may wait for an fsync; on a multi-threaded
/// runtime the worker is handed over meanwhile so connection tasks keep running. Events
/// arriving during the fsync form the next batch: that is the group commit.
fn commit(broker: &mut Broker) -> Result<(), StoreError> {
    let flavor = tokio::runtime::Handle::current().runtime_flavor();
    let result =
        if flavor == tokio::runtime::RuntimeFlavor::MultiThread && broker.commit_may_block() {
            tokio::task::block_in_place(|| broker.commit())
        } else {
            broker.commit()
        };
    if let Err(error) = &result {
        error!(%error, "commit failed; stopping without sending the uncommitted acknowledgements");
    }
    result
}

/// Routes core outputs to connection writers and applies the slow-consumer rule.
#[derive(Debug)]
struct Dispatcher {
    /// Open connections, as the broker task knows them.
    links: HashMap<ConnectionId, LinkState>,
    /// Batches being assembled in the current drain (kept to reuse its allocation), in the
    /// order the core first addressed each connection: the core emits a message's deliveries
    /// before the publisher's acknowledgement, so subscribers' bytes are written first. (A
    /// hash order made that a coin toss per process: the subscriber's write waited behind the
    /// PUBACK's in about half the runs, 18-29 us more latency at the median.)
    pending: IndexMap<ConnectionId, Batch>,
    /// See `ServerConfig::max_outbound_buffer`.
    max_outbound_buffer: usize,
    /// QoS 0 PUBLISH packets dropped because their receiver was too slow.
    dropped_qos0: u64,
    /// Traffic counters of this server.
    metrics: Arc<Metrics>,
    /// The PUBLISH encoding being shared in the current drain, per MQTT 3.x / 5.
    shared_publish: [Option<SharedPublish>; 2],
    /// See [`TaskOps::written`].
    written: Option<mpsc::WeakSender<Event>>,
    /// Links of connections lost in this drain, dropped by the next `dispatch` (after the
    /// drain's commit).
    lost: Vec<LinkState>,
    /// Where idle connections park; see [`TaskOps::parker`].
    parker: Option<Arc<Parker>>,
    /// Connections parked in the process at the last sweep (see `park::after_sweep`).
    parked_at_sweep: u64,
    /// The connections the park sweep visits, a slice per tick (a map cannot be walked in
    /// slices); weak, so that a connection's state (and socket) goes when the connection does,
    /// and the sweep drops ended ones as it meets them.
    sweep: Vec<Weak<Shared>>,
    /// Where the next slice of `sweep` starts.
    sweep_next: usize,
}

impl Drop for Dispatcher {
    /// The broker task is gone: parked connections are woken to find their link gone, and
    /// close.
    fn drop(&mut self) {
        if let Some(parker) = &self.parker {
            for (conn, state) in &self.links {
                if state.link.shared().take_parked() {
                    parker.unpark(*conn);
                }
            }
        }
    }
}

/// One connection's link and its slow-consumer bookkeeping.
#[derive(Debug)]
struct LinkState {
    link: Link,
    /// Drops on this connection so far; the first one is logged as a warning, the rest at
    /// debug level, so a stuck client cannot flood the log.
    dropped_qos0: u32,
    /// Bytes in this connection's previous batch: the next batch's buffer starts with this
    /// capacity, instead of growing by doubling.
    batch_hint: u32,
}

/// Largest [`LinkState::batch_hint`], so one burst does not make every later batch of the
/// connection allocate for a burst.
const MAX_BATCH_HINT: usize = 64 * 1024;

impl Dispatcher {
    fn new(max_outbound_buffer: usize) -> Dispatcher {
        Dispatcher {
            links: HashMap::new(),
            pending: IndexMap::new(),
            max_outbound_buffer,
            dropped_qos0: 0,
            metrics: Arc::default(),
            shared_publish: [None, None],
            written: None,
            lost: Vec::new(),
            parker: None,
            parked_at_sweep: 0,
            sweep: Vec::new(),
            sweep_next: 0,
        }
    }

    /// Feeds one connection event to the core. Events from a connection the broker already
    /// closed are ignored, as the core would ignore them. Returns whether it carried a PUBLISH.
    fn handle(&mut self, broker: &mut Broker, now: Instant, event: Event) -> bool {
        match event {
            Event::Open { conn, link } => {
                self.metrics.connections_accepted.inc();
                if self.parker.is_some() {
                    self.sweep.push(Arc::downgrade(link.shared()));
                }
                self.links.insert(
                    conn,
                    LinkState {
                        link,
                        dropped_qos0: 0,
                        batch_hint: 0,
                    },
                );
            }
            Event::Packets { conn, packets } => {
                if let Some(state) = self.links.get(&conn) {
                    let version = state.link.shared().version();
                    let publishes = self.metrics.count_inbound(&packets, version);
                    for packet in packets {
                        broker.handle_packet(now, conn, packet);
                    }
                    return publishes;
                }
            }
            Event::DecodeError { conn, error } => {
                if self.links.contains_key(&conn) {
                    broker.handle_decode_error(now, conn, &error);
                }
            }
            Event::Lost { conn } => {
                if let Some(state) = self.links.remove(&conn) {
                    broker.connection_lost(now, conn);
                    // Its link holds the connection's shared state, and with it the socket:
                    // not closed before the state change of this loss (a session's expiry) is
                    // committed.
                    self.lost.push(state);
                }
            }
            Event::Admin(AdminCall(call)) => call(broker, now),
            Event::Written { conn } => {
                if self.links.contains_key(&conn) {
                    broker.handle_written(now, conn);
                }
            }
        }
        false
    }

    /// Visits the next slice of the sweep list: asks each connection there that has read
    /// nothing since its last visit to park (see [`Shared::sweep_idle`]), and forgets those
    /// that are gone. Every connection is visited once per park period. After the last slice
    /// of a round, starts a memory release round if connections parked.
    fn sweep_idle(&mut self) {
        let slice = self.sweep.len().div_ceil(SWEEP_SLICES as usize).max(1);
        let mut end = (self.sweep_next + slice).min(self.sweep.len());
        let mut at = self.sweep_next;
        while at < end {
            match self.sweep[at].upgrade() {
                Some(shared) => {
                    shared.sweep_idle();
                    at += 1;
                }
                // The connection has ended.
                None => {
                    self.sweep.swap_remove(at);
                    end = end.min(self.sweep.len());
                }
            }
        }
        self.sweep_next = at;
        if self.sweep_next >= self.sweep.len() {
            self.sweep_next = 0;
            let workers = tokio::runtime::Handle::current().metrics().num_workers();
            crate::park::after_sweep(&mut self.parked_at_sweep, workers);
        }
    }

    /// Sends each connection one batch holding everything `outputs` has for it.
    fn dispatch(&mut self, outputs: &[Output]) {
        self.assemble(outputs);
        self.flush();
    }

    /// Encodes `outputs` into one pending batch per connection.
    fn assemble(&mut self, outputs: &[Output]) {
        self.lost.clear();
        self.shared_publish = [None, None];
        for (index, output) in outputs.iter().enumerate() {
            match *output {
                Output::Send { conn, ref packet } => {
                    // The core emits one message's deliveries back to back: when the next
                    // one carries the same payload, this encoding is worth sharing.
                    let fan_out = match (packet, outputs.get(index + 1)) {
                        (
                            Packet::Publish(this),
                            Some(Output::Send {
                                packet: Packet::Publish(next),
                                ..
                            }),
                        ) => same_payload(&this.payload, &next.payload),
                        _ => false,
                    };
                    self.queue(conn, packet, fan_out);
                }
                Output::Close { conn } => {
                    if self.links.contains_key(&conn) {
                        self.pending.entry(conn).or_default().close = true;
                    }
                }
                // Immediate rather than batched: the reader should stop as soon as possible,
                // and a resume has nothing to wait for.
                Output::Pause { conn } => {
                    if let Some(state) = self.links.get(&conn) {
                        state.link.shared().set_paused(true);
                    }
                }
                Output::Resume { conn } => {
                    if let Some(state) = self.links.get(&conn) {
                        state.link.shared().set_paused(false);
                    }
                }
                // Remote routes and pending claims exist only in a cluster, whose driver
                // takes these; a single node's core (local router and registry) emits none.
                Output::Forward { .. } | Output::Claim(_) | Output::Release { .. } => {}
                Output::NotifyWritten { conn } => {
                    let events = self.written.as_ref().and_then(mpsc::WeakSender::upgrade);
                    if let (Some(events), true) = (events, self.links.contains_key(&conn)) {
                        let notice = Box::new(WrittenNotice { conn, events });
                        self.pending.entry(conn).or_default().written = Some(notice);
                    }
                }
            }
        }
    }

    /// Writes or queues the pending batches, in the order their connections first appeared.
    fn flush(&mut self) {
        for (conn, mut batch) in self.pending.drain(..) {
            let close = batch.close;
            let Some(state) = self.links.get_mut(&conn) else {
                continue;
            };
            state.batch_hint = batch.wire.len().min(MAX_BATCH_HINT) as u32;
            state.link.write_directly(&mut batch);
            if batch.is_empty() {
                continue;
            }
            // If the connection task has ended, it reports `Lost` itself.
            if state.link.tx.send(batch) {
                if let Some(parker) = &self.parker {
                    parker.unpark(conn);
                }
            }
            if close {
                self.links.remove(&conn);
            }
        }
    }

    /// Encodes one packet into its connection's batch, unless it is a QoS 0 PUBLISH to a
    /// connection whose unwritten bytes already exceed the limit. A PUBLISH that is part of
    /// a fan-out (`fan_out`, or the same form as the one encoded last) is copied from a
    /// shared encoding with its packet id patched in.
    fn queue(&mut self, conn: ConnectionId, packet: &Packet, fan_out: bool) {
        let Some(state) = self.links.get_mut(&conn) else {
            return;
        };
        let batch = self.pending.entry(conn).or_insert_with(|| Batch {
            wire: BytesMut::with_capacity(state.batch_hint as usize),
            ..Batch::default()
        });
        let queued = state.link.shared().queued_bytes.load(Ordering::Relaxed) + batch.wire.len();
        if queued > self.max_outbound_buffer && is_qos0_publish(packet) {
            self.dropped_qos0 += 1;
            self.metrics.dropped_slow_consumer.inc();
            state.dropped_qos0 = state.dropped_qos0.saturating_add(1);
            if state.dropped_qos0 == 1 {
                warn!(conn, queued, "slow consumer: dropping QoS 0 messages");
            } else {
                debug!(conn, queued, "slow consumer: dropped a QoS 0 message");
            }
            return;
        }
        let version = state.link.shared().version();
        let start = batch.wire.len();
        if let Some(shared) = share(&mut self.shared_publish, packet, version, fan_out) {
            batch.wire.extend_from_slice(shared.bytes);
            if let Some((at, id)) = shared.packet_id {
                batch.wire[start + at..start + at + 2].copy_from_slice(&id.to_be_bytes());
            }
        } else if let Err(error) = encode(packet, version, &mut batch.wire) {
            batch.wire.truncate(start);
            warn!(conn, %error, packet = packet_name(packet), "cannot encode; skipped");
            return;
        }
        self.metrics
            .count_outbound(packet, batch.wire.len() - start);
        debug!(conn, packet = packet_name(packet), "sent");
    }
}

/// The last PUBLISH encoded for sharing, per encoding (MQTT 3.x, MQTT 5).
#[derive(Debug)]
struct SharedPublish {
    /// Keeps the payload alive, so its address identifies it for the whole drain.
    payload: Bytes,
    /// The encoding, with the first subscriber's packet id.
    bytes: Bytes,
    /// Offset of the packet id in `bytes` (QoS 1/2).
    packet_id_at: Option<usize>,
    /// The flags the encoding was made with; a delivery with other flags needs its own.
    flags: (bool, QoS, bool),
}

/// Whether two PUBLISH packets carry the very same payload bytes (not merely equal ones):
/// the deliveries of one message share its `Bytes`.
fn same_payload(a: &Bytes, b: &Bytes) -> bool {
    a.as_ptr() == b.as_ptr() && a.len() == b.len()
}

/// A PUBLISH encoded once for every subscriber that gets the same form (DESIGN.md section
/// 3): copied into each batch, with that connection's packet id written at the offset.
struct SharedEncoding<'a> {
    /// The encoding, shared by all those subscribers.
    bytes: &'a Bytes,
    /// (offset, packet id) to patch, for QoS 1/2.
    packet_id: Option<(usize, u16)>,
}

/// The shared encoding for `packet`, encoding it now if it is part of a fan-out; `None`
/// when it is not a PUBLISH that can be shared (MQTT 5 with per-subscriber properties:
/// subscription identifiers, expiry, topic alias).
fn share<'a>(
    cache: &'a mut [Option<SharedPublish>; 2],
    packet: &Packet,
    version: ProtocolVersion,
    fan_out: bool,
) -> Option<SharedEncoding<'a>> {
    let Packet::Publish(publish) = packet else {
        return None;
    };
    if version.is_v5() && publish.properties != Properties::default() {
        return None;
    }
    let slot = &mut cache[usize::from(version.is_v5())];
    let matches = slot.as_ref().is_some_and(|cached| {
        same_payload(&cached.payload, &publish.payload)
            && cached.flags == (publish.dup, publish.qos, publish.retain)
            && encoded_publish_topic(&cached.bytes) == Some(publish.topic.as_bytes())
    });
    if !matches {
        if !fan_out {
            return None;
        }
        let mut buf = BytesMut::new();
        encode(packet, version, &mut buf).ok()?;
        let bytes = buf.freeze();
        *slot = Some(SharedPublish {
            payload: publish.payload.clone(),
            packet_id_at: publish_packet_id_offset(&bytes),
            flags: (publish.dup, publish.qos, publish.retain),
            bytes,
        });
    }
    let cached = slot.as_ref()?;
    Some(SharedEncoding {
        bytes: &cached.bytes,
        packet_id: cached.packet_id_at.zip(publish.packet_id),
    })
}

/// Short packet name for logs; the full `Debug` form could dump whole payloads.
pub(crate) fn packet_name(packet: &Packet) -> &'static str {
    match packet {
        Packet::Connect(_) => "CONNECT",
        Packet::ConnAck(_) => "CONNACK",
        Packet::Publish(_) => "PUBLISH",
        Packet::PubAck(_) => "PUBACK",
        Packet::PubRec(_) => "PUBREC",
        Packet::PubRel(_) => "PUBREL",
        Packet::PubComp(_) => "PUBCOMP",
        Packet::Subscribe(_) => "SUBSCRIBE",
        Packet::SubAck(_) => "SUBACK",
        Packet::Unsubscribe(_) => "UNSUBSCRIBE",
        Packet::UnsubAck(_) => "UNSUBACK",
        Packet::PingReq => "PINGREQ",
        Packet::PingResp => "PINGRESP",
        Packet::Disconnect(_) => "DISCONNECT",
        Packet::Auth(_) => "AUTH",
    }
}

fn is_qos0_publish(packet: &Packet) -> bool {
    matches!(packet, Packet::Publish(publish) if publish.qos == QoS::AtMostOnce)
}

#[cfg(test)]
mod tests {
    use super::*;
    use halyard_codec::{Publish, QoS};

    /// What the writer puts on the wire for `batch`, decoded back into packets.
    fn packets_of(batch: &Batch) -> Vec<Packet> {
        let mut wire = batch.wire.clone();
        let context = halyard_codec::DecodeContext {
            version: Some(ProtocolVersion::V3_1_1),
            max_packet_size: u32::MAX,
        };
        std::iter::from_fn(|| halyard_codec::decode(&mut wire, &context).expect("decodes"))
            .collect()
    }

    #[test]
    fn one_message_to_many_subscribers_is_encoded_once() {
        let mut dispatcher = Dispatcher::new(1 << 20);
        let mut receivers = open_all(&mut dispatcher, 1..=3);
        let payload = Bytes::from(vec![7u8; 100]);
        let delivery = |packet_id: u16| {
            Packet::Publish(Publish {
                qos: QoS::AtLeastOnce,
                topic: "fan/out".into(),
                packet_id: Some(packet_id),
                payload: payload.clone(),
                ..Publish::default()
            })
        };
        let outputs: Vec<Output> = (1..=3u16)
            .map(|conn| Output::Send {
                conn: u64::from(conn),
                packet: delivery(conn * 10),
            })
            .collect();
        dispatcher.dispatch(&outputs);
        for (index, rx) in receivers.iter_mut().enumerate() {
            let batch = rx.try_recv().expect("a batch");
            let id = u16::try_from(index + 1).expect("small") * 10;
            assert_eq!(packets_of(&batch), vec![delivery(id)], "own packet id");
        }
        let [Some(shared), None] = &dispatcher.shared_publish else {
            panic!("one MQTT 3.x encoding shared by the three deliveries");
        };
        assert!(same_payload(&shared.payload, &payload));
    }

    fn link() -> (Link, BatchReceiver) {
        let shared = Arc::new(Shared::default());
        let (tx, rx) = batch_channel(&shared);
        (Link { tx }, rx)
    }

    fn publish(qos: QoS) -> Packet {
        Packet::Publish(Publish {
            qos,
            topic: "a/b".to_owned(),
            packet_id: (qos != QoS::AtMostOnce).then_some(1),
            payload: vec![0; 100].into(),
            ..Publish::default()
        })
    }

    /// Opens a link for each of `conns`; their receivers, in the same order.
    fn open_all(
        dispatcher: &mut Dispatcher,
        conns: std::ops::RangeInclusive<ConnectionId>,
    ) -> Vec<BatchReceiver> {
        conns
            .map(|conn| {
                let (link, rx) = link();
                open(dispatcher, conn, link);
                rx
            })
            .collect()
    }

    fn open(dispatcher: &mut Dispatcher, conn: ConnectionId, link: Link) {
        dispatcher.links.insert(
            conn,
            LinkState {
                link,
                dropped_qos0: 0,
                batch_hint: 0,
            },
        );
    }

    #[test]
    fn deliveries_are_flushed_before_the_publishers_acknowledgement() {
        let mut dispatcher = Dispatcher::new(1 << 20);
        let mut receivers = open_all(&mut dispatcher, 1..=64);
        // What the core emits for one QoS 1 PUBLISH from connection 1 matched by the other 63
        // connections (in the trie's order, not the ids'): the deliveries, then the PUBACK.
        // 37 is prime to 63: a permutation of 2..=64.
        let subscribers: Vec<ConnectionId> = (0..63).map(|i| 2 + (i * 37) % 63).collect();
        let mut outputs: Vec<Output> = subscribers
            .iter()
            .map(|&conn| Output::Send {
                conn,
                packet: publish(QoS::AtLeastOnce),
            })
            .collect();
        outputs.push(Output::Send {
            conn: 1,
            packet: Packet::PubAck(halyard_codec::PubResponse {
                packet_id: 1,
                reason: halyard_codec::ReasonCode::SUCCESS,
                properties: Properties::default(),
            }),
        });
        dispatcher.assemble(&outputs);
        let order: Vec<ConnectionId> = dispatcher.pending.keys().copied().collect();
        let mut expected = subscribers.clone();
        expected.push(1);
        assert_eq!(
            order, expected,
            "flushed in the order the core addressed them"
        );
        dispatcher.flush();
        for rx in &mut receivers {
            assert!(rx.try_recv().is_some(), "every connection got its batch");
        }
    }

    #[test]
    fn one_drain_becomes_one_batch_per_connection() {
        let mut dispatcher = Dispatcher::new(1 << 20);
        let (link1, mut rx1) = link();
        let (link2, mut rx2) = link();
        open(&mut dispatcher, 1, link1);
        open(&mut dispatcher, 2, link2);
        dispatcher.dispatch(&[
            Output::Send {
                conn: 1,
                packet: Packet::PingResp,
            },
            Output::Send {
                conn: 2,
                packet: Packet::PingResp,
            },
            Output::Send {
                conn: 1,
                packet: publish(QoS::AtMostOnce),
            },
            Output::Close { conn: 1 },
        ]);
        let batch = rx1.try_recv().expect("a batch for conn 1");
        assert_eq!(
            packets_of(&batch),
            vec![Packet::PingResp, publish(QoS::AtMostOnce)]
        );
        assert!(batch.close);
        let expected = halyard_codec::encoded_len(&Packet::PingResp, ProtocolVersion::V3_1_1)
            + halyard_codec::encoded_len(&publish(QoS::AtMostOnce), ProtocolVersion::V3_1_1);
        assert_eq!(batch.wire.len(), expected);
        assert!(rx1.try_recv().is_none(), "exactly one message per drain");
        assert_eq!(
            packets_of(&rx2.try_recv().expect("conn 2")),
            vec![Packet::PingResp]
        );
        assert!(
            !dispatcher.links.contains_key(&1),
            "closed connections are forgotten"
        );
        assert!(dispatcher.links.contains_key(&2));
    }

    #[test]
    fn slow_consumer_loses_qos0_but_never_qos1_or_qos2() {
        let mut dispatcher = Dispatcher::new(150);
        let (link, mut rx) = link();
        let shared = Arc::clone(link.shared());
        open(&mut dispatcher, 1, link);
        let outputs = [
            publish(QoS::AtMostOnce),
            publish(QoS::AtMostOnce),
            publish(QoS::AtLeastOnce),
            publish(QoS::ExactlyOnce),
            publish(QoS::AtMostOnce),
        ]
        .map(|packet| Output::Send { conn: 1, packet });
        dispatcher.dispatch(&outputs);
        let batch = rx.try_recv().expect("a batch");
        let qos: Vec<QoS> = packets_of(&batch)
            .iter()
            .map(|packet| match packet {
                Packet::Publish(publish) => publish.qos,
                other => panic!("unexpected {other:?}"),
            })
            .collect();
        assert_eq!(
            qos,
            [
                QoS::AtMostOnce,
                QoS::AtMostOnce,
                QoS::AtLeastOnce,
                QoS::ExactlyOnce
            ]
        );
        assert_eq!(dispatcher.dropped_qos0, 1);
        assert_eq!(
            shared.queued_bytes.load(Ordering::Relaxed),
            batch.wire.len()
        );

        // Once the writer has caught up, QoS 0 flows again.
        shared.queued_bytes.store(0, Ordering::Relaxed);
        dispatcher.dispatch(&[Output::Send {
            conn: 1,
            packet: publish(QoS::AtMostOnce),
        }]);
        assert_eq!(packets_of(&rx.try_recv().expect("a batch")).len(), 1);
    }

    #[test]
    fn outputs_for_unknown_connections_are_ignored() {
        let mut dispatcher = Dispatcher::new(1 << 20);
        dispatcher.dispatch(&[
            Output::Send {
                conn: 9,
                packet: Packet::PingResp,
            },
            Output::Close { conn: 9 },
        ]);
        assert!(dispatcher.pending.is_empty());
    }

    #[test]
    fn a_write_notification_follows_the_packets_sent_before_it() {
        let (events, _rx) = mpsc::channel(1);
        let mut dispatcher = Dispatcher::new(1 << 20);
        dispatcher.written = Some(events.downgrade());
        let (link, mut rx) = link();
        open(&mut dispatcher, 1, link);
        dispatcher.dispatch(&[
            Output::Send {
                conn: 1,
                packet: publish(QoS::AtMostOnce),
            },
            Output::NotifyWritten { conn: 1 },
            Output::NotifyWritten { conn: 2 },
        ]);
        let batch = rx.try_recv().expect("one batch");
        assert_eq!(batch.written.as_ref().map(|notice| notice.conn), Some(1));
        assert_eq!(packets_of(&batch), [publish(QoS::AtMostOnce)]);
    }

    #[test]
    fn encoding_version_follows_connect() {
        let shared = Shared::default();
        assert_eq!(shared.version(), ProtocolVersion::V3_1_1);
        shared.set_version(ProtocolVersion::V5);
        assert_eq!(shared.version(), ProtocolVersion::V5);
    }
}
