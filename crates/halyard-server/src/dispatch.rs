//! Turning the core's outputs into one encoded batch per connection, with the slow-consumer
//! rule for QoS 0.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use halyard_codec::{
    encode, encoded_publish_topic, publish_packet_id_offset, Packet, Properties, ProtocolVersion,
    QoS,
};
use halyard_core::{Broker, ConnectionId, Output};
use indexmap::IndexMap;
use tokio::sync::mpsc;
use tracing::{debug, warn};

use crate::cluster::ClusterDriver;
use crate::connection_log::ConnectionLog;
use crate::event::{AdminCall, Event};
use crate::inbound_budget::InboundBudget;
use crate::link::{Batch, Link, Shared, WrittenNotice};
use crate::metrics::Metrics;
use crate::pacing::Pacing;
use crate::park::Parker;

/// The park sweep visits this fraction of the connections per tick, so one tick never holds
/// the broker task for long: visiting a connection costs 35-55 ns (an atomic on its state,
/// usually a cache miss), and all 10,000 at once took 0.33-0.55 ms.
pub(crate) const SWEEP_SLICES: u32 = 16;

/// Routes core outputs to connection writers and applies the slow-consumer rule.
#[derive(Debug)]
pub(crate) struct Dispatcher {
    /// Open connections, as the broker task knows them.
    links: HashMap<ConnectionId, LinkState, foldhash::fast::RandomState>,
    /// Batches being assembled in the current drain (kept to reuse its allocation), in the
    /// order the core first addressed each connection: the core emits a message's deliveries
    /// before the publisher's acknowledgement, so subscribers' bytes are written first. (A
    /// hash order made that a coin toss per process: the subscriber's write waited behind the
    /// PUBACK's in about half the runs, 18-29 us more latency at the median.)
    pending: IndexMap<ConnectionId, Batch, foldhash::fast::RandomState>,
    /// See `ServerConfig::max_outbound_buffer`.
    max_outbound_buffer: usize,
    /// QoS 0 PUBLISH packets dropped because their receiver was too slow.
    pub(crate) dropped_qos0: u64,
    /// Traffic counters of this server.
    pub(crate) metrics: Arc<Metrics>,
    /// The PUBLISH encoding being shared in the current drain, per MQTT 3.x / 5.
    shared_publish: [Option<SharedPublish>; 2],
    /// See [`TaskOps::written`].
    pub(crate) written: Option<mpsc::WeakSender<Event>>,
    /// Links of connections lost in this drain, dropped by the next `dispatch` (after the
    /// drain's commit).
    lost: Vec<LinkState>,
    /// Where idle connections park; see [`TaskOps::parker`].
    pub(crate) parker: Option<Arc<Parker>>,
    /// Connections parked in the process at the last sweep (see `park::after_sweep`).
    parked_at_sweep: u64,
    /// The connections the park sweep visits, a slice per tick (a map cannot be walked in
    /// slices); weak, so that a connection's state (and socket) goes when the connection does,
    /// and the sweep drops ended ones as it meets them.
    sweep: Vec<Weak<Shared>>,
    /// Where the next slice of `sweep` starts.
    sweep_next: usize,
    /// This node's cluster, if it is one.
    pub(crate) cluster: Option<ClusterDriver<Event>>,
    /// One line per client connect and disconnect.
    pub(crate) log: ConnectionLog,
    /// The event channel's byte bound: what each handled event took is given back.
    pub(crate) inbound: Arc<InboundBudget>,
    /// The memory budget: publishers paced while the core holds too much.
    pub(crate) pacing: Pacing,
    /// Connections that became congested in the last dispatch, for the core to hear of
    /// (see [`Dispatcher::report_congested`]).
    congested: Vec<ConnectionId>,
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
    /// The client id its CONNECT named, for the drop log.
    client_id: Option<Box<str>>,
    /// A QoS 0 packet was dropped for this connection's unwritten bytes, and its writer
    /// has not yet reached the notice queued then.
    congested: bool,
}

/// Largest [`LinkState::batch_hint`], so one burst does not make every later batch of the
/// connection allocate for a burst.
const MAX_BATCH_HINT: usize = 64 * 1024;

impl Dispatcher {
    pub(crate) fn new(max_outbound_buffer: usize) -> Dispatcher {
        Dispatcher {
            links: HashMap::default(),
            pending: IndexMap::default(),
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
            cluster: None,
            log: ConnectionLog::default(),
            inbound: Arc::default(),
            pacing: Pacing::default(),
            congested: Vec::new(),
        }
    }

    /// Feeds one connection event to the core. Events from a connection the broker already
    /// closed are ignored, as the core would ignore them. Returns how many PUBLISH packets it
    /// carried.
    pub(crate) fn handle(&mut self, broker: &mut Broker, now: Instant, event: Event) -> usize {
        match event {
            Event::Open { conn, link, peer } => {
                self.metrics.connections_accepted.inc();
                self.log.opened(conn, peer);
                if self.parker.is_some() {
                    self.sweep.push(Arc::downgrade(link.shared()));
                }
                self.links.insert(
                    conn,
                    LinkState {
                        link,
                        dropped_qos0: 0,
                        batch_hint: 0,
                        client_id: None,
                        congested: false,
                    },
                );
            }
            Event::Packets {
                conn,
                packets,
                weight,
            } => {
                let Some(state) = self.links.get(&conn) else {
                    self.inbound.release(None, weight);
                    return 0;
                };
                let version = state.link.shared().version();
                let publishes = self.metrics.count_inbound(&packets, version);
                for packet in packets {
                    if matches!(packet, Packet::Connect(_) | Packet::Disconnect(_)) {
                        self.log.received(conn, &packet);
                    }
                    if let Packet::Connect(connect) = &packet {
                        if let Some(state) = self.links.get_mut(&conn) {
                            state.client_id = Some(connect.client_id.as_str().into());
                        }
                    }
                    broker.handle_packet(now, conn, packet);
                }
                let shared = self.links.get(&conn).map(|state| state.link.shared());
                if let (true, Some(shared)) = (publishes > 0, shared) {
                    self.pacing.after_publish(broker, conn, shared, now);
                }
                self.inbound.release(shared.map(|shared| &**shared), weight);
                return publishes;
            }
            Event::DecodeError { conn, error } => {
                if self.links.contains_key(&conn) {
                    broker.handle_decode_error(now, conn, &error);
                }
            }
            Event::Lost { conn } => {
                if let Some(state) = self.links.remove(&conn) {
                    self.log.lost(conn);
                    broker.connection_lost(now, conn);
                    // Its link holds the connection's shared state, and with it the socket:
                    // not closed before the state change of this loss (a session's expiry) is
                    // committed.
                    self.lost.push(state);
                }
            }
            Event::Admin(AdminCall(call)) => {
                // Admin reads (a metrics scrape) see the current figure.
                self.refresh_outbound_gauge();
                call(broker, now);
            }
            Event::Written { conn } => {
                if let Some(state) = self.links.get_mut(&conn) {
                    state.congested = false;
                    broker.handle_written(now, conn);
                }
            }
            Event::Cluster(event) => {
                if let Some(cluster) = self.cluster.as_mut() {
                    cluster.handle_event(broker, event);
                }
            }
        }
        0
    }

    /// The broker's journal was committed: what waited for that (acknowledgements of
    /// forwards from peers, stored forwards waiting for room in the link) may go.
    pub(crate) fn committed(&mut self, broker: &mut Broker) {
        if let Some(cluster) = self.cluster.as_mut() {
            cluster.committed(broker);
        }
    }

    /// Tells the core of the connections that became congested in the last dispatch, so
    /// that it stops building QoS 0 packets for them until their writers catch up.
    pub(crate) fn report_congested(&mut self, broker: &mut Broker) {
        for conn in self.congested.drain(..) {
            broker.handle_congested(conn);
        }
    }

    /// Visits the next slice of the sweep list: asks each connection there that has read
    /// nothing since its last visit to park (see [`Shared::sweep_idle`]), and forgets those
    /// that are gone. Every connection is visited once per park period. After the last slice
    /// of a round, starts a memory release round if connections parked.
    pub(crate) fn sweep_idle(&mut self) {
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

    /// Ends pacing if the core's memory is back under the low-water mark, and shows the
    /// figures in the metrics.
    pub(crate) fn update_memory(&mut self, held: u64) {
        self.pacing.update(held, Instant::now());
        let gauge = |gauge: &prometheus_client::metrics::gauge::Gauge, value: u64| {
            gauge.set(i64::try_from(value).unwrap_or(i64::MAX));
        };
        gauge(&self.metrics.memory_held, held);
        gauge(&self.metrics.publishers_paced, self.pacing.paced() as u64);
        gauge(&self.metrics.event_queue_bytes, self.inbound.held() as u64);
    }

    /// Sets `halyard_outbound_buffer_bytes` to what the writers of open connections hold: a
    /// walk over every connection, so only before admin calls (a scrape), never per drain.
    fn refresh_outbound_gauge(&self) {
        let held: usize = self
            .links
            .values()
            .map(|state| state.link.shared().queued_bytes.load(Ordering::Relaxed))
            .sum();
        self.metrics
            .outbound_buffer_bytes
            .set(i64::try_from(held).unwrap_or(i64::MAX));
    }

    /// Sends each connection one batch holding everything `outputs` has for it.
    pub(crate) fn dispatch(&mut self, outputs: &[Output]) {
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
                    if matches!(packet, Packet::ConnAck(_) | Packet::Disconnect(_)) {
                        self.log.sent(conn, packet);
                    }
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
                    self.log.closed(conn);
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
                // The cluster's; a single node's core (local registry, not replicated)
                // emits none of them.
                Output::Forward { .. }
                | Output::Claim(_)
                | Output::Release { .. }
                | Output::Subscriptions { .. }
                | Output::Retain { .. }
                | Output::SettleWill { .. } => {
                    if let Some(cluster) = self.cluster.as_mut() {
                        cluster.handle_output(output);
                    }
                }
                Output::NotifyWritten { conn } => {
                    if self.links.contains_key(&conn) {
                        if let Some(notice) = written_notice(self.written.as_ref(), conn) {
                            self.pending.entry(conn).or_default().written = Some(notice);
                        }
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
        let writer_holds = state.link.shared().queued_bytes.load(Ordering::Relaxed);
        let room = self.max_outbound_buffer.saturating_sub(writer_holds);
        let batch = self.pending.entry(conn).or_insert_with(|| Batch {
            wire: BytesMut::with_capacity((state.batch_hint as usize).min(room)),
            ..Batch::default()
        });
        let version = state.link.shared().version();
        let shared = share(&mut self.shared_publish, packet, version, fan_out);
        let need = match &shared {
            Some(shared) => shared.bytes.len(),
            None => halyard_codec::encoded_len(packet, version),
        };
        // What this connection's bytes would hold in memory with the packet: the writer's
        // buffers and this batch's, grown to fit it (BytesMut's own growth doubles).
        let queued = writer_holds + batch.wire.capacity().max(batch.wire.len() + need);
        if queued > self.max_outbound_buffer && is_qos0_publish(packet) {
            self.dropped_qos0 += 1;
            self.metrics.dropped_slow_consumer.inc();
            state.dropped_qos0 = state.dropped_qos0.saturating_add(1);
            // The core drops the next ones itself until the writer reaches this notice
            // (one already in the batch, a retained page's, says the same).
            if !state.congested {
                if batch.written.is_none() {
                    batch.written = written_notice(self.written.as_ref(), conn);
                }
                if batch.written.is_some() {
                    state.congested = true;
                    self.congested.push(conn);
                }
            }
            let client_id = state.client_id.as_deref().unwrap_or("");
            if state.dropped_qos0 == 1 {
                warn!(
                    conn,
                    client_id, queued, "slow consumer: dropping QoS 0 messages"
                );
            } else {
                debug!(
                    conn,
                    client_id, queued, "slow consumer: dropped a QoS 0 message"
                );
            }
            return;
        }
        reserve_within(&mut batch.wire, need, room);
        let start = batch.wire.len();
        if let Some(shared) = shared {
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

/// A notice for `conn`'s writer to send the broker task [`Event::Written`] once it takes
/// the batch carrying it. `None` when there is no broker task to send it to.
fn written_notice(
    written: Option<&mpsc::WeakSender<Event>>,
    conn: ConnectionId,
) -> Option<Box<WrittenNotice>> {
    let events = written.and_then(mpsc::WeakSender::upgrade)?;
    let report = async move {
        // An error means the broker task is gone and nobody waits.
        let _ = events.send(Event::Written { conn }).await;
    };
    Some(Box::new(WrittenNotice::new(conn, report)))
}

/// Makes room for `need` more bytes in `wire`, doubling its capacity but not beyond `limit`
/// (unless `need` alone requires more): BytesMut's own growth doubles past any bound, and a
/// slow consumer's buffers are what `max_outbound_buffer` bounds.
fn reserve_within(wire: &mut BytesMut, need: usize, limit: usize) {
    let required = wire.len() + need;
    if wire.capacity() >= required {
        return;
    }
    let target = (wire.capacity() * 2).min(limit).max(required);
    let mut grown = BytesMut::with_capacity(target);
    grown.extend_from_slice(wire);
    *wire = grown;
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
    use crate::link::{batch_channel, BatchReceiver};
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
                client_id: None,
                congested: false,
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
        // A QoS 0 PUBLISH (107 bytes) goes only if the memory held stays within the bound.
        assert_eq!(qos, [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce]);
        assert_eq!(dispatcher.dropped_qos0, 2);
        assert_eq!(
            shared.queued_bytes.load(Ordering::Relaxed),
            batch.wire.capacity()
        );

        // Once the writer has caught up, QoS 0 flows again.
        shared.queued_bytes.store(0, Ordering::Relaxed);
        dispatcher.dispatch(&[Output::Send {
            conn: 1,
            packet: publish(QoS::AtMostOnce),
        }]);
        assert_eq!(packets_of(&rx.try_recv().expect("a batch")).len(), 1);
    }

    /// `count` QoS 0 PUBLISH packets for `conn`.
    fn qos0_flood(conn: ConnectionId, count: usize) -> Vec<Output> {
        (0..count)
            .map(|_| Output::Send {
                conn,
                packet: publish(QoS::AtMostOnce),
            })
            .collect()
    }

    #[test]
    fn a_stuck_writer_never_holds_more_than_max_outbound_buffer_for_qos0() {
        let limit = 64 * 1024;
        let mut dispatcher = Dispatcher::new(limit);
        let (link, _rx) = link();
        let shared = Arc::clone(link.shared());
        open(&mut dispatcher, 1, link);
        // Many drains of QoS 0 for a writer that takes nothing: its queue is merged and
        // grown, and the memory it holds (capacity, not length) stays within the bound.
        for _ in 0..100 {
            dispatcher.dispatch(&qos0_flood(1, 50));
            let held = shared.queued_bytes.load(Ordering::Relaxed);
            assert!(held <= limit, "{held} > {limit}");
        }
        assert!(dispatcher.dropped_qos0 > 0);
        assert!(shared.queued_bytes.load(Ordering::Relaxed) > limit / 2);
        dispatcher.refresh_outbound_gauge();
        assert_eq!(
            dispatcher.metrics.outbound_buffer_bytes.get() as usize,
            shared.queued_bytes.load(Ordering::Relaxed)
        );
        // The connection goes: the gauge no longer counts it.
        dispatcher.links.remove(&1);
        dispatcher.refresh_outbound_gauge();
        assert_eq!(dispatcher.metrics.outbound_buffer_bytes.get(), 0);
    }

    #[test]
    fn the_first_qos0_drop_flags_the_connection_once_until_its_writer_reports_back() {
        let mut dispatcher = Dispatcher::new(4 * 1024);
        let (events, _events_rx) = mpsc::channel(8);
        dispatcher.written = Some(events.downgrade());
        let (link, _rx) = link();
        open(&mut dispatcher, 1, link);
        let flood = qos0_flood(1, 50);
        dispatcher.dispatch(&flood);
        dispatcher.dispatch(&flood);
        assert!(dispatcher.dropped_qos0 > 50);
        assert_eq!(dispatcher.congested, vec![1], "told to the core once");
        let mut broker = Broker::new(Default::default());
        dispatcher.report_congested(&mut broker);
        assert!(dispatcher.congested.is_empty());
        // The writer reached the notice: the next drop flags the connection again.
        dispatcher.handle(&mut broker, Instant::now(), Event::Written { conn: 1 });
        dispatcher.dispatch(&flood);
        assert_eq!(dispatcher.congested, vec![1]);
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
