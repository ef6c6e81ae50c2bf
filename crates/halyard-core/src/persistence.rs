//! Persistent sessions: loading them at start-up and writing their state to the store.

use std::time::{Duration, Instant, SystemTime};

use crate::broker::{Broker, BrokerParts};
use crate::config::BrokerConfig;
use crate::forward_outbox::ForwardOutboxes;
use crate::message::SessionKey;
use crate::router::FilterRef;
use crate::session::{Awaiting, Inflight, Journal, Session};
use crate::store::{DeliveryState, LoadedSession, SessionRecord, Store, StoreError};
use crate::time::ClockAnchor;
use crate::timers::Timer;

impl Broker {
    /// A single-node broker whose persistent sessions and retained messages live in
    /// `store`: sessions are loaded now; queued and retained messages stay in the store and
    /// are read in pages as they are needed. `now` and `wall` are the same moment on the
    /// monotonic and the wall clock, to convert stored expiry times.
    pub fn with_store(
        config: BrokerConfig,
        store: Box<dyn Store>,
        now: Instant,
        wall: SystemTime,
    ) -> Result<Broker, StoreError> {
        Broker::with_store_and_parts(config, BrokerParts::default(), store, now, wall)
    }

    /// [`Broker::with_store`] with the parts a cluster supplies.
    pub fn with_store_and_parts(
        config: BrokerConfig,
        parts: BrokerParts,
        mut store: Box<dyn Store>,
        now: Instant,
        wall: SystemTime,
    ) -> Result<Broker, StoreError> {
        let loaded = store.load()?;
        let clock = ClockAnchor { instant: now, wall };
        let mut broker = Broker::with_parts(config, parts);
        broker.out.journal = Some(Journal {
            store,
            clock,
            failed_commits: 0,
        });
        broker.outboxes = ForwardOutboxes::restore(loaded.outboxes, loaded.peer_marks);
        for session in loaded.sessions {
            broker.restore_session(now, session);
        }
        broker.restore_relays(clock, loaded.relays);
        Ok(broker)
    }

    pub(crate) fn restore_session(&mut self, now: Instant, loaded: LoadedSession) {
        let Some(clock) = self.out.journal.as_ref().map(|journal| journal.clock) else {
            return;
        };
        let key = self.next_session_key;
        self.next_session_key += 1;
        let record = loaded.record;
        // The session resumes under the claim it was stored with: no new claim until its
        // client connects again.
        let epoch = record.epoch;
        self.registry.restored(epoch);
        let mut session = Session::new(
            record.client_id.clone(),
            epoch,
            record.expiry_interval,
            &self.memory,
        );
        session.persistent = true;
        // Where its window starts, as when it was stored: a forward routed before the claim
        // that brought it here, replayed from a peer's outbox after the restart, is not its
        // own (halyard-sim seed 5: taken, it delivered a completed QoS 2 message again).
        session.held_since = record.held_since;
        session.routes_from = record.routes_from;
        session.next_seq = loaded.next_seq;
        session.spilled = loaded.pending_count;
        session.spill_from = loaded.first_pending.unwrap_or(loaded.next_seq);
        session.inbound_qos2 = loaded.inbound_qos2.into_iter().collect();
        for (seq, stored, state) in loaded.inflight {
            let (packet_id, awaiting) = match state {
                DeliveryState::Pending => continue,
                DeliveryState::AwaitingAck(id) => (id, Awaiting::Ack),
                DeliveryState::AwaitingReceipt(id) => (id, Awaiting::Receipt),
                DeliveryState::AwaitingCompletion(id) => (id, Awaiting::Completion),
            };
            session.inflight.push_back(Inflight {
                packet_id,
                delivery: clock.delivery(seq, stored),
                state: awaiting,
            });
        }
        if let Some(last) = session.inflight.iter().map(|entry| entry.packet_id).max() {
            session.next_packet_id = last.checked_add(1).unwrap_or(1);
        }
        for (filter, entry) in loaded.subscriptions {
            if self.router.subscribe(key, FilterRef::parse(&filter), entry) {
                self.subscription_count += 1;
            }
            session.subscriptions.insert(filter, entry);
        }
        // A session that was connected when the broker stopped starts its expiry now.
        let expires_at = match record.expires_at {
            Some(at) => Some(clock.to_instant(at)),
            None if record.expiry_interval == u32::MAX => None,
            None => Some(now + Duration::from_secs(u64::from(record.expiry_interval))),
        };
        session.expires_at = expires_at;
        if let Some(at) = expires_at {
            self.timers.arm(at, Timer::SessionExpiry(key, epoch));
        }
        if let Some((due, will)) = record.delayed_will {
            let due = clock.to_instant(due);
            session.delayed_will = Some(Box::new((due, will)));
            self.timers.arm(due, Timer::Will(key, epoch));
        }
        self.client_ids.insert(record.client_id, key);
        self.sessions.insert(key, Box::new(session));
    }

    /// Makes the state changes of the events handled so far durable. The server calls this
    /// before it writes the packets those events produced, so no acknowledgement goes out
    /// for a message that is not yet stored. Without a store it does nothing.
    pub fn commit(&mut self) -> Result<(), StoreError> {
        self.write_peer_marks();
        match self.out.journal.as_mut() {
            Some(journal) => journal.store.commit().inspect_err(|_| {
                journal.failed_commits += 1;
            }),
            None => Ok(()),
        }
    }

    /// Whether [`Broker::commit`] could block on I/O now (see [`Store::commit_may_block`]);
    /// the server runs only such commits where blocking is allowed, since handing the
    /// async worker over costs a thread wake-up per batch of events.
    pub fn commit_may_block(&self) -> bool {
        self.out
            .journal
            .as_ref()
            .is_some_and(|journal| journal.store.commit_may_block())
    }

    /// Writes the session-level record of a persistent session, unless the store already
    /// holds this very record.
    pub(crate) fn save_session_record(&mut self, key: SessionKey) {
        let Some(session) = self.sessions.get_mut(&key) else {
            return;
        };
        let Some(journal) = self.out.journal(session.persistent) else {
            return;
        };
        let fingerprint = record_fingerprint(session, journal.failed_commits);
        if session.recorded == fingerprint {
            return;
        }
        session.recorded = fingerprint;
        let record = SessionRecord {
            client_id: session.client_id.clone(),
            epoch: session.epoch,
            held_since: session.held_since,
            routes_from: session.routes_from,
            expiry_interval: session.expiry_interval,
            expires_at: session.expires_at.map(|at| journal.clock.to_wall(at)),
            delayed_will: session
                .delayed_will
                .as_deref()
                .map(|(due, will)| (journal.clock.to_wall(*due), will.clone())),
        };
        journal.store.put_session(&record);
    }

    /// Decides whether a session is written to the store, after its expiry interval was
    /// (re)set. A session that becomes persistent is written in full; one that stops being
    /// persistent takes its on-disk queue back into memory and is deleted from the store.
    pub(crate) fn update_persistence(&mut self, key: SessionKey) {
        let has_store = self.out.journal.is_some();
        let Some(session) = self.sessions.get_mut(&key) else {
            return;
        };
        let persistent = has_store && session.expiry_interval > 0;
        if persistent == session.persistent {
            self.save_session_record(key);
            return;
        }
        let Some(journal) = self.out.journal.as_mut() else {
            return;
        };
        if persistent {
            session.persistent = true;
            for (filter, entry) in &session.subscriptions {
                journal
                    .store
                    .put_subscription(&session.client_id, filter, entry);
            }
            for packet_id in &session.inbound_qos2 {
                journal
                    .store
                    .put_inbound_qos2(&session.client_id, *packet_id);
            }
            for entry in &session.inflight {
                journal.store.put_delivery(
                    &session.client_id,
                    entry.delivery.seq,
                    &journal.clock.stored_delivery(&entry.delivery),
                    entry.stored_state(),
                );
            }
            for delivery in &session.pending {
                journal.store.put_delivery(
                    &session.client_id,
                    delivery.seq,
                    &journal.clock.stored_delivery(delivery),
                    DeliveryState::Pending,
                );
            }
            self.save_session_record(key);
        } else {
            if session.spilled > 0 {
                let spilled = usize::try_from(session.spilled).unwrap_or(usize::MAX);
                let Ok(page) =
                    journal
                        .store
                        .read_pending(&session.client_id, session.spill_from, spilled)
                else {
                    // The queue stays on disk and the session in the store (still written
                    // to and read from), so nothing acknowledged is lost; the next
                    // CONNECT retries, and so does every refill meanwhile.
                    self.out.stats.store_read_failures += 1;
                    self.save_session_record(key);
                    return;
                };
                for (seq, stored) in page {
                    session
                        .pending
                        .push_back(journal.clock.delivery(seq, stored));
                }
                session.spilled = 0;
            }
            journal.store.delete_session(&session.client_id);
            session.persistent = false;
            session.recorded = 0;
        }
    }
}

/// What a session record is made of, hashed: the will's content is not needed, since a
/// session gets at most one delayed will per connection (epoch), due at one instant. Never 0,
/// which means "nothing written". `failed_commits` changes it after a commit failed.
fn record_fingerprint(session: &Session, failed_commits: u64) -> u64 {
    use std::hash::BuildHasher;
    foldhash::quality::FixedState::default()
        .hash_one((
            session.epoch,
            session.held_since,
            session.routes_from,
            session.expiry_interval,
            session.expires_at,
            session.delayed_will.as_deref().map(|(due, _)| *due),
            failed_commits,
        ))
        .max(1)
}
