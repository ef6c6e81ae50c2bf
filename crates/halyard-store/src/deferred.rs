//! Writes a store takes while it is out of space, kept in memory (bounded) and applied, in
//! order, once a probe finds room: acknowledgements, session records, subscriptions and QoS 2
//! releases made while the broker was degraded then reach the disk, so that the file agrees
//! with what the broker holds in memory and a later restart resumes from it.

use halyard_core::store::{
    DeliveryState, PeerMark, SessionRecord, Store, StoredDelivery, StoredForward, StoredMessage,
    StoredRelay,
};
use halyard_core::{NodeId, SubscriptionEntry};

/// Most writes kept: the broker refuses the publishes that write most while degraded, so what
/// remains (acknowledgements, state changes, wills) fits in this for hours.
const MAX_WRITES: usize = 100_000;

/// Most payload bytes kept (deliveries and retained messages not from client publishes:
/// wills, the admin API, other nodes).
const MAX_PAYLOAD_BYTES: usize = 64 << 20;

/// One write, as the [`Store`] method it replays.
#[derive(Debug, Clone)]
pub(crate) enum DeferredWrite {
    PutSession(Box<SessionRecord>),
    DeleteSession(String),
    PutSubscription(String, String, SubscriptionEntry),
    DeleteSubscription(String, String),
    PutInboundQos2(String, u16),
    DeleteInboundQos2(String, u16),
    PutDelivery(String, u64, Box<StoredDelivery>, DeliveryState),
    SetDeliveryState(String, u64, DeliveryState),
    DeleteDelivery(String, u64),
    PutRetained(Box<StoredMessage>),
    DeleteRetained(String),
    PutForward(NodeId, u64, Box<StoredForward>),
    AckForwards(NodeId, u64),
    PutPeerMark(PeerMark),
    PutRelay(Box<StoredRelay>),
    DeleteRelay(String, u64),
}

impl DeferredWrite {
    fn payload_len(&self) -> usize {
        match self {
            DeferredWrite::PutDelivery(_, _, delivery, _) => delivery.message.payload.len(),
            DeferredWrite::PutRetained(message) => message.payload.len(),
            DeferredWrite::PutForward(_, _, forward) => forward.message.payload.len(),
            _ => 0,
        }
    }

    fn apply(&self, store: &mut dyn Store) {
        match self {
            DeferredWrite::PutSession(record) => store.put_session(record),
            DeferredWrite::DeleteSession(client_id) => store.delete_session(client_id),
            DeferredWrite::PutSubscription(client_id, filter, entry) => {
                store.put_subscription(client_id, filter, entry)
            }
            DeferredWrite::DeleteSubscription(client_id, filter) => {
                store.delete_subscription(client_id, filter)
            }
            DeferredWrite::PutInboundQos2(client_id, packet_id) => {
                store.put_inbound_qos2(client_id, *packet_id)
            }
            DeferredWrite::DeleteInboundQos2(client_id, packet_id) => {
                store.delete_inbound_qos2(client_id, *packet_id)
            }
            DeferredWrite::PutDelivery(client_id, seq, delivery, state) => {
                store.put_delivery(client_id, *seq, delivery, *state)
            }
            DeferredWrite::SetDeliveryState(client_id, seq, state) => {
                store.set_delivery_state(client_id, *seq, *state)
            }
            DeferredWrite::DeleteDelivery(client_id, seq) => store.delete_delivery(client_id, *seq),
            DeferredWrite::PutRetained(message) => store.put_retained(message),
            DeferredWrite::DeleteRetained(topic) => store.delete_retained(topic),
            DeferredWrite::PutForward(dest, seq, forward) => {
                store.put_forward(*dest, *seq, forward)
            }
            DeferredWrite::AckForwards(dest, through) => store.ack_forwards(*dest, *through),
            DeferredWrite::PutPeerMark(mark) => store.put_peer_mark(mark),
            DeferredWrite::PutRelay(relay) => store.put_relay(relay),
            DeferredWrite::DeleteRelay(client_id, to) => store.delete_relay(client_id, *to),
        }
    }
}

/// The writes of one out-of-space episode, in order, up to [`MAX_WRITES`] and
/// [`MAX_PAYLOAD_BYTES`]; what does not fit is counted, for the log.
#[derive(Debug, Default, Clone)]
pub(crate) struct DeferredWrites {
    writes: Vec<DeferredWrite>,
    payload_bytes: usize,
    /// Writes not kept because the bound was reached.
    pub(crate) dropped: u64,
}

impl DeferredWrites {
    /// Keeps `write` if it fits.
    pub(crate) fn push(&mut self, write: DeferredWrite) {
        let len = write.payload_len();
        if self.writes.len() >= MAX_WRITES || self.payload_bytes + len > MAX_PAYLOAD_BYTES {
            self.dropped += 1;
            return;
        }
        self.payload_bytes += len;
        self.writes.push(write);
    }

    /// Number of writes kept.
    pub(crate) fn len(&self) -> usize {
        self.writes.len()
    }

    /// Applies every kept write to `store`, in order (into its open batch).
    pub(crate) fn apply(&self, store: &mut dyn Store) {
        for write in &self.writes {
            write.apply(store);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MemoryStore;
    use bytes::Bytes;
    use halyard_codec::{Properties, QoS};

    fn retained(topic: &str, len: usize) -> DeferredWrite {
        DeferredWrite::PutRetained(Box::new(StoredMessage {
            topic: topic.into(),
            payload: Bytes::from(vec![0u8; len]),
            qos: QoS::AtMostOnce,
            retain: true,
            properties: Properties::default(),
            expires_at: None,
        }))
    }

    #[test]
    fn writes_beyond_the_bounds_are_counted_not_kept() {
        let mut writes = DeferredWrites::default();
        writes.push(retained("a", MAX_PAYLOAD_BYTES));
        writes.push(retained("b", 1));
        assert_eq!((writes.len(), writes.dropped), (1, 1));
        for seq in 1..MAX_WRITES as u64 {
            writes.push(DeferredWrite::DeleteDelivery("c".into(), seq));
        }
        writes.push(DeferredWrite::DeleteRetained("a".into()));
        assert_eq!((writes.len(), writes.dropped), (MAX_WRITES, 2));
    }

    #[test]
    fn applied_in_order() {
        let mut writes = DeferredWrites::default();
        writes.push(retained("a", 3));
        writes.push(DeferredWrite::DeleteRetained("a".into()));
        writes.push(retained("b", 3));
        let mut store = MemoryStore::new();
        writes.apply(&mut store);
        store.commit().expect("commit");
        assert_eq!(store.retained_len(), 1, "a put then deleted, b put");
    }
}
