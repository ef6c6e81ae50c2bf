//! Moving a session between brokers: what one core exports when another node's claim
//! fences it, and what the new owner's core imports before it answers the CONNECT.

use std::time::{Instant, SystemTime};

use halyard_codec::{QoS, Will};

use crate::broker::Broker;
use crate::close::CloseKind;
use crate::message::{NodeId, OpenExchange, SessionKey};
use crate::router::{FilterRef, SubscriptionEntry};
use crate::session::{Awaiting, Inflight, Session};
use crate::stats::DropReason;
use crate::store::{DeliveryState, StoredDelivery};
use crate::time::ClockAnchor;
use crate::timers::Timer;

/// Everything a session carries from one node to another. Times are wall-clock, since the
/// two nodes' monotonic clocks have nothing in common.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionState {
    /// The client id.
    pub client_id: String,
    /// The epoch it was held under where it comes from.
    pub epoch: u64,
    /// The claim from which this is one session (see `Session::held_since`; 0: it continues
    /// every earlier claim): a session handed over late under an epoch from it on joins it.
    pub since: u64,
    /// Session Expiry Interval (seconds).
    pub expiry_interval: u32,
    /// Subscriptions by filter as the client wrote it.
    pub subscriptions: Vec<(String, SubscriptionEntry)>,
    /// Deliveries sent and not yet acknowledged, in send order, with their packet ids.
    pub inflight: Vec<(StoredDelivery, DeliveryState)>,
    /// Deliveries queued behind the in-flight window, in order.
    pub pending: Vec<StoredDelivery>,
    /// Inbound QoS 2 packet ids PUBRECed and awaiting PUBREL [MQTT-4.3.3-9].
    pub inbound_qos2: Vec<u16>,
    /// A will waiting out its delay, and when it is due.
    pub delayed_will: Option<(SystemTime, Will)>,
    /// User name of the last connection (`Some(None)`: anonymous), for authorizing
    /// deliveries while the client is away.
    pub username: Option<Option<String>>,
}

impl Broker {
    /// Another node's claim of `client_id` under `epoch` was committed: if this broker holds
    /// the session under an older epoch, it stops serving it now. The live connection, if
    /// any, gets DISCONNECT 0x8E Session taken over and is closed (its will follows the
    /// spec for a takeover: published now without a delay, else carried along), and the
    /// session leaves this broker and its store. Messages routed here for it before the
    /// claim and taken afterwards are passed on to `new_owner` (see `move_window`).
    /// Returns its state for the new owner, or `None` when nothing older was held here.
    pub fn fence(
        &mut self,
        now: Instant,
        wall: SystemTime,
        client_id: &str,
        epoch: u64,
        new_owner: NodeId,
    ) -> Option<Box<SessionState>> {
        let Some(&key) = self.client_ids.get(client_id) else {
            self.note_overtaken(client_id, epoch);
            return None;
        };
        let session = self.sessions.get(&key)?;
        if session.epoch >= epoch {
            return None;
        }
        let (routes_from, routes_until) = (session.routes_from, session.routes_until);
        self.close_link(now, key, CloseKind::TakenOver);
        let state = self.export(now, wall, key)?;
        self.forget_session(key);
        self.start_relay(now, new_owner, &state, routes_from, epoch.min(routes_until));
        Some(Box::new(state))
    }

    /// The state of the session at `key`, queued messages on disk included. A queue that
    /// cannot be read from the store is counted in `store_read_failures`.
    fn export(&mut self, now: Instant, wall: SystemTime, key: SessionKey) -> Option<SessionState> {
        let clock = ClockAnchor { instant: now, wall };
        let session = self.sessions.get_mut(&key)?;
        let mut pending: Vec<StoredDelivery> = session
            .pending
            .iter()
            .map(|delivery| clock.stored_delivery(delivery))
            .collect();
        if session.spilled > 0 {
            if let Some(journal) = self.out.journal.as_mut() {
                let spilled = usize::try_from(session.spilled).unwrap_or(usize::MAX);
                match journal
                    .store
                    .read_pending(&session.client_id, session.spill_from, spilled)
                {
                    Ok(page) => pending.extend(page.into_iter().map(|(_, stored)| stored)),
                    Err(_) => self.out.stats.store_read_failures += 1,
                }
            }
        }
        Some(SessionState {
            client_id: session.client_id.clone(),
            epoch: session.epoch,
            since: session.held_since,
            expiry_interval: session.expiry_interval,
            subscriptions: session
                .subscriptions
                .into_iter()
                .map(|(filter, entry)| (filter.clone(), *entry))
                .collect(),
            inflight: session
                .inflight
                .iter()
                .map(|entry| (clock.stored_delivery(&entry.delivery), entry.stored_state()))
                .collect(),
            pending,
            inbound_qos2: session.inbound_qos2.iter().copied().collect(),
            delayed_will: session
                .delayed_will
                .take()
                .map(|boxed| (clock.to_wall(boxed.0), boxed.1)),
            username: session.username.clone(),
        })
    }

    /// Installs a session moved here from another node, held from now on under `epoch`,
    /// and returns its key. Its in-flight messages keep their packet ids, so the client's
    /// acknowledgements still match them after it reconnects here.
    pub(crate) fn import_session(
        &mut self,
        now: Instant,
        wall: SystemTime,
        state: SessionState,
        epoch: u64,
    ) -> SessionKey {
        let clock = ClockAnchor { instant: now, wall };
        // A session of the client still held here under an older claim (this node was cut
        // off when it moved) took what was routed here since: its messages join the one
        // that arrives, rather than being dropped with it (halyard-sim seed 227 --no-kills).
        let stale = self
            .client_ids
            .get(&state.client_id)
            .copied()
            .and_then(|old| {
                self.close_link(now, old, CloseKind::TakenOver);
                let stale = self.export(now, wall, old);
                self.forget_session(old);
                stale
            });
        let key = self.next_session_key;
        self.next_session_key += 1;
        let mut session = Session::new(state.client_id, epoch, state.expiry_interval, &self.memory);
        session.routes_from = epoch;
        // The same session as where it comes from, for a late hand-over of an earlier claim.
        session.held_since = state.since;
        session.username = state.username;
        session.inbound_qos2 = state.inbound_qos2.into_iter().collect();
        for (filter, entry) in state.subscriptions {
            if self.router.subscribe(key, FilterRef::parse(&filter), entry) {
                self.subscription_count += 1;
            }
            session.subscriptions.insert(filter, entry);
        }
        for (stored, stored_state) in state.inflight {
            let (packet_id, awaiting) = match stored_state {
                DeliveryState::Pending => {
                    let seq = session.next_seq;
                    session.next_seq += 1;
                    let delivery = clock.delivery(seq, stored);
                    session.queued_bytes += delivery.size();
                    session.pending.push_back(delivery);
                    continue;
                }
                DeliveryState::AwaitingAck(id) => (id, Awaiting::Ack),
                DeliveryState::AwaitingReceipt(id) => (id, Awaiting::Receipt),
                DeliveryState::AwaitingCompletion(id) => (id, Awaiting::Completion),
            };
            let seq = session.next_seq;
            session.next_seq += 1;
            session.inflight.push_back(Inflight {
                packet_id,
                delivery: clock.delivery(seq, stored),
                state: awaiting,
            });
        }
        if let Some(last) = session.inflight.iter().map(|entry| entry.packet_id).max() {
            session.next_packet_id = last.checked_add(1).unwrap_or(1);
        }
        for stored in state.pending {
            let seq = session.next_seq;
            session.next_seq += 1;
            let delivery = clock.delivery(seq, stored);
            session.queued_bytes += delivery.size();
            session.pending.push_back(delivery);
        }
        if let Some((due, will)) = state.delayed_will {
            let due = clock.to_instant(due);
            session.delayed_will = Some(Box::new((due, will)));
            self.timers.arm(due, Timer::Will(key, epoch));
        }
        self.registry.restored(epoch);
        self.client_ids.insert(session.client_id.clone(), key);
        self.sessions.insert(key, Box::new(session));
        self.update_persistence(key);
        if let Some(stale) = stale {
            self.merge_late_session(now, wall, epoch, stale);
        }
        key
    }
}

impl Broker {
    /// A session handed over only after this node's claim (under `epoch`) stopped waiting for
    /// it, so the client already resumed from what raft holds: the messages it had queued or
    /// in flight on the old owner join the live session's queue, and the move loses nothing.
    /// A QoS 2 message the client already received (PUBREC sent) is not sent again, but
    /// gets its PUBREL, so that the client frees the id; one sent without a PUBREC yet is
    /// sent again under its packet id (see `Session::adopt_exchange`). A message with no
    /// room left is dropped, counted under `late_hand_over`.
    /// If the session has moved on from here, its messages are passed on after it (see
    /// `move_window`). Nothing happens if this node no longer holds the session it took
    /// under `epoch` otherwise (resumed here since, without a clean start, it still does);
    /// returns the number of messages queued or passed on.
    pub fn merge_late_session(
        &mut self,
        now: Instant,
        wall: SystemTime,
        epoch: u64,
        state: SessionState,
    ) -> usize {
        self.merge_late_session_or_pass_on(now, wall, epoch, state, None)
    }

    /// [`Broker::merge_late_session`], where a session held nowhere here whose window has
    /// no relay left has its messages passed on to `owner`, the node raft names its owner
    /// now, if another: it holds the session or is about to hand it on (halyard-sim seeds
    /// 99, 119, 152 --no-partitions: a hand-over sent to a node whose claim had been
    /// overtaken while it was down was dropped there).
    pub fn merge_late_session_or_pass_on(
        &mut self,
        now: Instant,
        wall: SystemTime,
        epoch: u64,
        state: SessionState,
        owner: Option<NodeId>,
    ) -> usize {
        let clock = ClockAnchor { instant: now, wall };
        let Some(&key) = self.client_ids.get(&state.client_id) else {
            return self.pass_late_session_on(clock, state, owner);
        };
        let limits = self.limits();
        let Some(session) = self.sessions.get_mut(&key) else {
            return 0;
        };
        // The client may have reconnected here since (a newer epoch, the same session): the
        // messages are still its own. A clean start since began another session.
        if !(session.held_since..=session.epoch).contains(&epoch) {
            return 0;
        }
        let mut queued = 0;
        let mut unsent = Vec::with_capacity(state.inflight.len() + state.pending.len());
        for (stored, at) in state.inflight {
            let exchange = match at {
                DeliveryState::AwaitingCompletion(packet_id) => OpenExchange::Received(packet_id),
                DeliveryState::AwaitingReceipt(packet_id) if stored.qos == QoS::ExactlyOnce => {
                    OpenExchange::Unreceived(packet_id)
                }
                _ => {
                    unsent.push(stored);
                    continue;
                }
            };
            let delivery = clock.delivery(0, stored.clone());
            if session.adopt_exchange(exchange, delivery, now, &mut self.out) {
                queued += 1;
            } else if let OpenExchange::Unreceived(_) = exchange {
                unsent.push(stored);
            }
        }
        unsent.extend(state.pending);
        for stored in unsent {
            if session.push(clock.delivery(0, stored), now, limits, &mut self.out) {
                queued += 1;
            } else {
                self.out
                    .count_drop(&state.client_id, DropReason::LateHandOver);
            }
        }
        self.update_persistence(key);
        queued
    }

    /// This node's claim of `state`'s client id under `epoch` committed after the node had
    /// refused its connection (the claim's answer was lost), so this node is the owner of
    /// record: the session is held here without a connection, as if its client had just
    /// disconnected. What other nodes route here for it and what its previous owner hands
    /// over then find it, and the next claim anywhere moves it on. A session already held
    /// here under an older claim is the same session and continues under `epoch`; otherwise
    /// `state` (the subscriptions raft holds) is installed. False, doing nothing, when a
    /// session under `epoch` or newer is held.
    pub fn adopt_orphaned_claim(
        &mut self,
        now: Instant,
        wall: SystemTime,
        epoch: u64,
        state: SessionState,
    ) -> bool {
        if let Some(&key) = self.client_ids.get(&state.client_id) {
            let Some(session) = self.sessions.get_mut(&key) else {
                return false;
            };
            if session.epoch >= epoch {
                return false;
            }
            session.epoch = epoch;
            let offline = session.link.is_none();
            self.registry.restored(epoch);
            if offline {
                // Its expiry timer, armed under the older claim, does nothing now.
                self.left_offline(now, key);
            } else {
                self.save_session_record(key);
            }
            return true;
        }
        let key = self.import_session(now, wall, state, epoch);
        self.left_offline(now, key);
        true
    }

    /// The state of a session that another node ended because this node's clean-start claim
    /// took its client id: the old session is over, so the will it held back for its delay is
    /// published now [MQTT-3.1.3-9], as it is when a clean start ends a session held here.
    /// The rest of it is discarded. True if a will was published.
    pub fn end_moved_session(&mut self, now: Instant, state: SessionState) -> bool {
        let Some((_, will)) = state.delayed_will else {
            return false;
        };
        // No session here published it: key 0 is never a session's, so No Local skips nobody.
        self.will_due(now, 0, state.client_id, state.epoch, will);
        true
    }
}
