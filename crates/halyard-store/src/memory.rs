//! [`MemoryStore`]: the `storage.backend = "memory"` backend.

use std::collections::{BTreeMap, BTreeSet};

use halyard_core::retained::{read_page, retained_key};
use halyard_core::store::{
    DeliveryState, LoadedOutbox, LoadedSession, LoadedState, PeerMark, RetainedPage, SessionRecord,
    Store, StoreError, StoredDelivery, StoredForward, StoredMessage, StoredRelay,
};
use halyard_core::{NodeId, SubscriptionEntry};

/// A [`Store`] kept entirely in RAM.
///
/// It survives a restart of the `Broker` object (load returns everything written, committed or
/// not, since [`Store::commit`] has nothing to do) but not of the process. It exists so the
/// broker runs one code path whether or not persistence is configured, and so tests can
/// exercise restarts without touching the disk.
#[derive(Debug, Default)]
pub struct MemoryStore {
    sessions: BTreeMap<String, SessionRecord>,
    subscriptions: BTreeMap<(String, String), SubscriptionEntry>,
    inbound_qos2: BTreeSet<(String, u16)>,
    deliveries: BTreeMap<(String, u64), (StoredDelivery, DeliveryState)>,
    /// By [`retained_key`], the order every backend reads retained messages in.
    retained: BTreeMap<String, StoredMessage>,
    /// (destination node, seq) -> forward.
    forwards: BTreeMap<(NodeId, u64), StoredForward>,
    /// Destination node -> acknowledged through.
    forwards_acked: BTreeMap<NodeId, u64>,
    /// Origin node -> its duplicate filter.
    peer_marks: BTreeMap<NodeId, PeerMark>,
    /// (client id, claim epoch) -> relay.
    relays: BTreeMap<(String, u64), StoredRelay>,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> MemoryStore {
        MemoryStore::default()
    }
}

/// Every key of `map` whose first part is `client_id`.
fn keys_of<K: Clone + Ord, V>(
    map: &BTreeMap<(String, K), V>,
    client_id: &str,
    from: K,
) -> Vec<(String, K)> {
    map.range((client_id.to_owned(), from)..)
        .take_while(|((client, _), _)| client == client_id)
        .map(|(key, _)| key.clone())
        .collect()
}

impl Store for MemoryStore {
    fn load(&mut self) -> Result<LoadedState, StoreError> {
        let mut sessions: BTreeMap<&str, LoadedSession> = self
            .sessions
            .iter()
            .map(|(client, record)| {
                let session = LoadedSession::from_record(record.clone());
                (client.as_str(), session)
            })
            .collect();
        for ((client, filter), entry) in &self.subscriptions {
            if let Some(session) = sessions.get_mut(client.as_str()) {
                session.subscriptions.push((filter.clone(), *entry));
            }
        }
        for (client, packet_id) in &self.inbound_qos2 {
            if let Some(session) = sessions.get_mut(client.as_str()) {
                session.inbound_qos2.push(*packet_id);
            }
        }
        for ((client, seq), (delivery, state)) in &self.deliveries {
            let Some(session) = sessions.get_mut(client.as_str()) else {
                continue;
            };
            session.next_seq = seq + 1;
            if *state == DeliveryState::Pending {
                session.first_pending.get_or_insert(*seq);
                session.pending_count += 1;
            } else {
                session.inflight.push((*seq, delivery.clone(), *state));
            }
        }
        let mut outboxes: BTreeMap<NodeId, LoadedOutbox> = self
            .forwards_acked
            .iter()
            .map(|(dest, acked)| {
                let outbox = LoadedOutbox {
                    acked_through: *acked,
                    ..LoadedOutbox::default()
                };
                (*dest, outbox)
            })
            .collect();
        for (dest, seq) in self.forwards.keys() {
            let outbox = outboxes.entry(*dest).or_default();
            outbox.last_seq = *seq;
            outbox.pending += 1;
        }
        Ok(LoadedState {
            sessions: sessions.into_values().collect(),
            outboxes,
            peer_marks: self.peer_marks.values().copied().collect(),
            relays: self.relays.values().cloned().collect(),
        })
    }

    fn put_session(&mut self, record: &SessionRecord) {
        self.sessions
            .insert(record.client_id.clone(), record.clone());
    }

    fn delete_session(&mut self, client_id: &str) {
        self.sessions.remove(client_id);
        for key in keys_of(&self.subscriptions, client_id, String::new()) {
            self.subscriptions.remove(&key);
        }
        let qos2: Vec<_> = self
            .inbound_qos2
            .range((client_id.to_owned(), 0)..=(client_id.to_owned(), u16::MAX))
            .cloned()
            .collect();
        for key in qos2 {
            self.inbound_qos2.remove(&key);
        }
        for key in keys_of(&self.deliveries, client_id, 0) {
            self.deliveries.remove(&key);
        }
    }

    fn put_subscription(&mut self, client_id: &str, filter: &str, entry: &SubscriptionEntry) {
        self.subscriptions
            .insert((client_id.to_owned(), filter.to_owned()), *entry);
    }

    fn delete_subscription(&mut self, client_id: &str, filter: &str) {
        self.subscriptions
            .remove(&(client_id.to_owned(), filter.to_owned()));
    }

    fn put_inbound_qos2(&mut self, client_id: &str, packet_id: u16) {
        self.inbound_qos2.insert((client_id.to_owned(), packet_id));
    }

    fn delete_inbound_qos2(&mut self, client_id: &str, packet_id: u16) {
        self.inbound_qos2.remove(&(client_id.to_owned(), packet_id));
    }

    fn put_delivery(
        &mut self,
        client_id: &str,
        seq: u64,
        delivery: &StoredDelivery,
        state: DeliveryState,
    ) {
        self.deliveries
            .insert((client_id.to_owned(), seq), (delivery.clone(), state));
    }

    fn set_delivery_state(&mut self, client_id: &str, seq: u64, state: DeliveryState) {
        if let Some((_, stored)) = self.deliveries.get_mut(&(client_id.to_owned(), seq)) {
            *stored = state;
        }
    }

    fn delete_delivery(&mut self, client_id: &str, seq: u64) {
        self.deliveries.remove(&(client_id.to_owned(), seq));
    }

    fn read_pending(
        &mut self,
        client_id: &str,
        from: u64,
        limit: usize,
    ) -> Result<Vec<(u64, StoredDelivery)>, StoreError> {
        Ok(self
            .deliveries
            .range((client_id.to_owned(), from)..=(client_id.to_owned(), u64::MAX))
            .filter(|(_, (_, state))| *state == DeliveryState::Pending)
            .take(limit)
            .map(|((_, seq), (delivery, _))| (*seq, delivery.clone()))
            .collect())
    }

    fn put_retained(&mut self, message: &StoredMessage) {
        self.retained
            .insert(retained_key(&message.topic), message.clone());
    }

    fn delete_retained(&mut self, topic: &str) {
        self.retained.remove(&retained_key(topic));
    }

    fn read_retained(
        &mut self,
        filter: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<RetainedPage<StoredMessage>, StoreError> {
        let page = read_page(&self.retained, filter, after, limit);
        Ok(RetainedPage {
            messages: page.messages.into_iter().cloned().collect(),
            next: page.next,
        })
    }

    fn retained_len(&self) -> usize {
        self.retained.len()
    }

    fn put_forward(&mut self, dest: NodeId, seq: u64, forward: &StoredForward) {
        self.forwards.insert((dest, seq), forward.clone());
    }

    fn ack_forwards(&mut self, dest: NodeId, through: u64) {
        let acked: Vec<_> = self
            .forwards
            .range((dest, 0)..=(dest, through))
            .map(|(key, _)| *key)
            .collect();
        for key in acked {
            self.forwards.remove(&key);
        }
        let watermark = self.forwards_acked.entry(dest).or_default();
        *watermark = (*watermark).max(through);
    }

    fn read_forwards(
        &mut self,
        dest: NodeId,
        after: u64,
        limit: usize,
    ) -> Result<Vec<(u64, StoredForward)>, StoreError> {
        if after == u64::MAX {
            return Ok(Vec::new());
        }
        Ok(self
            .forwards
            .range((dest, after + 1)..=(dest, u64::MAX))
            .take(limit)
            .map(|((_, seq), forward)| (*seq, forward.clone()))
            .collect())
    }

    fn put_peer_mark(&mut self, mark: &PeerMark) {
        self.peer_marks.insert(mark.origin, *mark);
    }

    fn put_relay(&mut self, relay: &StoredRelay) {
        self.relays
            .insert((relay.client_id.clone(), relay.to), relay.clone());
    }

    fn delete_relay(&mut self, client_id: &str, to: u64) {
        self.relays.remove(&(client_id.to_owned(), to));
    }

    fn commit(&mut self) -> Result<(), StoreError> {
        Ok(())
    }

    fn commit_may_block(&self) -> bool {
        false
    }
}
