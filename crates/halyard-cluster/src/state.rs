//! The replicated state and its pure, deterministic `apply` (no IO, no clock, no randomness).
//!
//! Every replica applies the same entries in the same order and so holds the same state; the
//! route index is derived here from subscription changes and never written on its own.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use halyard_codec::topic::{is_valid_topic_filter, matches, parse_shared_subscription};
use serde::{Deserialize, Serialize};

use crate::command::{Claim, ClaimOutcome, Command, Response, SubscriptionChange};
use crate::types::{
    Change, ClientId, NodeId, Owner, RetainedMessage, RouteKey, Subscription, WillRecord,
};

/// How many claim answers per node are kept for idempotent retries. A retry arrives within
/// seconds, long before this many newer claims from the same node.
const CLAIM_RESULTS_KEPT_PER_NODE: usize = 4096;

/// Sessions, subscriptions, routes and retained messages, as agreed by the cluster.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterState {
    owners: BTreeMap<ClientId, Owner>,
    subscriptions: BTreeMap<ClientId, BTreeMap<String, Subscription>>,
    /// Per route, the nodes with subscribers and how many subscriptions each has.
    routes: BTreeMap<RouteKey, BTreeMap<NodeId, u64>>,
    retained: BTreeMap<String, RetainedMessage>,
    /// Topic plus payload bytes of all retained messages.
    retained_bytes: u64,
    claim_results: BTreeMap<(NodeId, u64), ClaimOutcome>,
    claim_order: BTreeMap<NodeId, VecDeque<u64>>,
    /// Wills by client id and the epoch of the claim that brought them. Not in the derived
    /// encoding: snapshots append them (see [`ClusterState::to_snapshot`]), so that a
    /// snapshot written before wills existed still reads.
    #[serde(skip)]
    wills: BTreeMap<(ClientId, u64), WillRecord>,
    /// Per client id with an owner, the generation of its latest grant (see
    /// [`ClaimOutcome::Granted`]). Appended to snapshots after the wills, like them.
    #[serde(skip)]
    generations: BTreeMap<ClientId, u32>,
    /// Byte cap on retained messages; configuration, so every node must use the same value.
    #[serde(skip)]
    retained_cap_bytes: u64,
}

impl ClusterState {
    /// An empty state with the retained byte cap.
    pub fn new(retained_cap_bytes: u64) -> Self {
        Self {
            retained_cap_bytes,
            ..Self::default()
        }
    }

    /// Replaces the replicated data (from a snapshot) but keeps this node's configuration.
    pub fn replace_data(&mut self, other: ClusterState) {
        let cap = self.retained_cap_bytes;
        *self = other;
        self.retained_cap_bytes = cap;
    }

    /// The snapshot encoding: the derived fields, then the wills, then the generations.
    pub(crate) fn to_snapshot(&self) -> Result<Vec<u8>, postcard::Error> {
        let mut data = postcard::to_stdvec(self)?;
        data.extend(postcard::to_stdvec(&self.wills)?);
        data.extend(postcard::to_stdvec(&self.generations)?);
        Ok(data)
    }

    /// Reads [`ClusterState::to_snapshot`]'s encoding, or an older one without wills or
    /// generations.
    pub(crate) fn from_snapshot(data: &[u8]) -> Result<ClusterState, postcard::Error> {
        let (mut state, rest): (ClusterState, _) = postcard::take_from_bytes(data)?;
        if !rest.is_empty() {
            let (wills, rest) = postcard::take_from_bytes(rest)?;
            state.wills = wills;
            if !rest.is_empty() {
                state.generations = postcard::from_bytes(rest)?;
            }
        }
        Ok(state)
    }

    /// Applies one command of the log entry at `index`; the changes go to `out`.
    pub fn apply(&mut self, index: u64, command: &Command, out: &mut Vec<Change>) -> Response {
        match command {
            Command::Claim(claim) => Response::Claim(self.claim(index, claim, None, out)),
            Command::ClaimWithWill { claim, will } => {
                Response::Claim(self.claim(index, claim, Some(will), out))
            }
            Command::LegacyClaim(legacy) => {
                Response::Claim(self.claim(index, &Claim::from(legacy), None, out))
            }
            Command::SettleWill { client_id, epoch } => {
                Response::WillSettled(self.wills.remove(&(client_id.clone(), *epoch)).is_some())
            }
            Command::Release {
                client_id,
                node,
                epoch,
            } => Response::Released(self.release(client_id, *node, *epoch, out)),
            Command::Subscriptions {
                client_id,
                epoch,
                changes,
            } => Response::SubscriptionsApplied(self.subscribe(client_id, *epoch, changes, out)),
            Command::SetRetained {
                topic,
                payload,
                now_ms,
            } => Response::RetainedStored(self.set_retained(topic, payload, *now_ms, out)),
            Command::Batch(commands) => Response::Batch(
                commands
                    .iter()
                    .map(|command| self.apply(index, command, out))
                    .collect(),
            ),
        }
    }

    fn claim(
        &mut self,
        index: u64,
        claim: &Claim,
        will: Option<&WillRecord>,
        out: &mut Vec<Change>,
    ) -> ClaimOutcome {
        let key = (claim.node, claim.request_id);
        if let Some(first) = self.claim_results.get(&key) {
            return match first {
                ClaimOutcome::LegacyGranted { epoch, previous } => ClaimOutcome::Granted {
                    epoch: *epoch,
                    previous: *previous,
                    generation: 0,
                },
                other => other.clone(),
            };
        }
        let current = self.owners.get(&claim.client_id);
        let expected_ok = match (claim.expected_epoch, current) {
            (None, _) => true,
            (Some(0), None) => true,
            (Some(expected), Some(owner)) => owner.epoch == expected,
            (Some(_), None) => false,
        };
        // Two claims of one client in one entry would share an epoch; the batcher never does
        // that, and the second loses so the epoch stays a unique fencing token.
        let same_entry = current.is_some_and(|owner| owner.epoch == index);
        let outcome = if !expected_ok || same_entry {
            ClaimOutcome::Conflict {
                current: current.cloned(),
            }
        } else {
            let previous = current.map(|owner| (owner.node, owner.epoch));
            self.owners.insert(
                claim.client_id.clone(),
                Owner {
                    node: claim.node,
                    epoch: index,
                    session_expiry_secs: claim.session_expiry_secs,
                    persistent: claim.persistent,
                    claimed_ms: claim.now_ms,
                },
            );
            out.push(Change::OwnerChanged {
                client_id: claim.client_id.clone(),
                node: Some(claim.node),
                epoch: index,
                previous,
                session_expiry_secs: claim.session_expiry_secs,
                claimed_ms: claim.now_ms,
            });
            if claim.clean_start {
                self.drop_subscriptions(&claim.client_id, out);
            } else {
                self.move_subscriptions(&claim.client_id, claim.node, out);
            }
            self.reconnected(&claim.client_id, claim.clean_start);
            if let Some(will) = will {
                self.wills
                    .insert((claim.client_id.clone(), index), will.clone());
            }
            // An owner without a generation was granted by an older build, which numbered
            // from 1 as generation 0 does.
            let generation = match (previous, self.generations.get(&claim.client_id)) {
                (Some(_), Some(last)) => last.wrapping_add(1),
                (Some(_), None) => 1,
                (None, _) => 0,
            };
            self.generations.insert(claim.client_id.clone(), generation);
            ClaimOutcome::Granted {
                epoch: index,
                previous,
                generation,
            }
        };
        self.remember_claim(key, outcome.clone());
        outcome
    }

    /// A new connection to the session cancels a will still waiting out its delay
    /// [MQTT-3.1.3-9]; one without a delay was due when the old connection closed, and a
    /// clean start ends the old session, so those are due now and stay for whoever
    /// publishes them (the old owner as it closes the connection, or the survivors).
    fn reconnected(&mut self, client_id: &str, clean_start: bool) {
        let older: Vec<u64> = self
            .wills
            .range((client_id.to_owned(), 0)..=(client_id.to_owned(), u64::MAX))
            .map(|((_, epoch), _)| *epoch)
            .collect();
        for epoch in older {
            let key = (client_id.to_owned(), epoch);
            let Some(record) = self.wills.get_mut(&key) else {
                continue;
            };
            if clean_start || record.delay_secs == 0 {
                record.delay_secs = 0;
            } else {
                self.wills.remove(&key);
            }
        }
    }

    fn remember_claim(&mut self, key: (NodeId, u64), outcome: ClaimOutcome) {
        self.claim_results.insert(key, outcome);
        let order = self.claim_order.entry(key.0).or_default();
        order.push_back(key.1);
        if order.len() > CLAIM_RESULTS_KEPT_PER_NODE {
            if let Some(oldest) = order.pop_front() {
                self.claim_results.remove(&(key.0, oldest));
            }
        }
    }

    /// A session taken over by another node keeps its subscriptions; they now route there.
    fn move_subscriptions(&mut self, client_id: &str, node: NodeId, out: &mut Vec<Change>) {
        let Some(subscriptions) = self.subscriptions.get_mut(client_id) else {
            return;
        };
        let mut moved = Vec::new();
        for (filter, subscription) in subscriptions.iter_mut() {
            if subscription.node != node {
                moved.push((filter.clone(), subscription.node));
                subscription.node = node;
            }
        }
        for (filter, old_node) in moved {
            self.route_remove(&filter, old_node, out);
            self.route_add(&filter, node, out);
        }
    }

    fn release(
        &mut self,
        client_id: &str,
        node: NodeId,
        epoch: u64,
        out: &mut Vec<Change>,
    ) -> bool {
        let Some(released) = self
            .owners
            .get(client_id)
            .filter(|owner| owner.epoch == epoch && owner.node == node)
            .cloned()
        else {
            return false;
        };
        self.owners.remove(client_id);
        self.generations.remove(client_id);
        out.push(Change::OwnerChanged {
            client_id: client_id.to_owned(),
            node: None,
            epoch,
            previous: Some((node, epoch)),
            session_expiry_secs: released.session_expiry_secs,
            claimed_ms: released.claimed_ms,
        });
        self.drop_subscriptions(client_id, out);
        true
    }

    /// A released or clean-started session ends its subscriptions and their routes.
    fn drop_subscriptions(&mut self, client_id: &str, out: &mut Vec<Change>) {
        if let Some(subscriptions) = self.subscriptions.remove(client_id) {
            for (filter, subscription) in subscriptions {
                self.route_remove(&filter, subscription.node, out);
            }
        }
    }

    fn subscribe(
        &mut self,
        client_id: &str,
        epoch: u64,
        changes: &[SubscriptionChange],
        out: &mut Vec<Change>,
    ) -> bool {
        let Some(node) = self
            .owners
            .get(client_id)
            .filter(|owner| owner.epoch == epoch)
            .map(|owner| owner.node)
        else {
            return false;
        };
        for change in changes {
            match change {
                SubscriptionChange::Add { filter, options } => {
                    if !is_valid_topic_filter(filter) {
                        continue;
                    }
                    let previous = self
                        .subscriptions
                        .entry(client_id.to_owned())
                        .or_default()
                        .insert(
                            filter.clone(),
                            Subscription {
                                node,
                                options: options.clone(),
                            },
                        );
                    if previous.is_none() {
                        self.route_add(filter, node, out);
                    }
                }
                SubscriptionChange::Remove { filter } => {
                    let removed = self
                        .subscriptions
                        .get_mut(client_id)
                        .and_then(|subscriptions| subscriptions.remove(filter));
                    if let Some(subscription) = removed {
                        self.route_remove(filter, subscription.node, out);
                    }
                    if self
                        .subscriptions
                        .get(client_id)
                        .is_some_and(BTreeMap::is_empty)
                    {
                        self.subscriptions.remove(client_id);
                    }
                }
            }
        }
        true
    }

    fn route_add(&mut self, filter: &str, node: NodeId, out: &mut Vec<Change>) {
        let key = route_key(filter);
        let count = self
            .routes
            .entry(key.clone())
            .or_default()
            .entry(node)
            .or_insert(0);
        *count += 1;
        if *count == 1 {
            out.push(Change::RouteAdded {
                filter: key.filter,
                group: key.group,
                node,
            });
        }
    }

    fn route_remove(&mut self, filter: &str, node: NodeId, out: &mut Vec<Change>) {
        let key = route_key(filter);
        let Some(nodes) = self.routes.get_mut(&key) else {
            return;
        };
        let Some(count) = nodes.get_mut(&node) else {
            return;
        };
        *count -= 1;
        if *count == 0 {
            nodes.remove(&node);
            if nodes.is_empty() {
                self.routes.remove(&key);
            }
            out.push(Change::RouteRemoved {
                filter: key.filter,
                group: key.group,
                node,
            });
        }
    }

    fn set_retained(
        &mut self,
        topic: &str,
        payload: &bytes::Bytes,
        now_ms: u64,
        out: &mut Vec<Change>,
    ) -> bool {
        let old_size = self
            .retained
            .get(topic)
            .map_or(0, |message| retained_size(topic, &message.payload));
        if payload.is_empty() {
            if self.retained.remove(topic).is_some() {
                self.retained_bytes -= old_size;
                out.push(Change::RetainedDeleted {
                    topic: topic.to_owned(),
                });
            }
            return true;
        }
        let new_total = self.retained_bytes - old_size + retained_size(topic, payload);
        if new_total > self.retained_cap_bytes {
            return false;
        }
        self.retained_bytes = new_total;
        self.retained.insert(
            topic.to_owned(),
            RetainedMessage {
                payload: payload.clone(),
                stamped_ms: now_ms,
            },
        );
        out.push(Change::RetainedSet {
            topic: topic.to_owned(),
        });
        true
    }

    /// The owner of a client id.
    pub fn owner(&self, client_id: &str) -> Option<&Owner> {
        self.owners.get(client_id)
    }

    /// All owners.
    pub fn owners(&self) -> &BTreeMap<ClientId, Owner> {
        &self.owners
    }

    /// The wills waiting to be published or discarded, by client id and claim epoch.
    pub fn wills(&self) -> &BTreeMap<(ClientId, u64), WillRecord> {
        &self.wills
    }

    /// The route index: per route, the nodes with at least one subscriber.
    pub fn routes(&self) -> BTreeMap<RouteKey, BTreeSet<NodeId>> {
        self.routes
            .iter()
            .map(|(key, nodes)| (key.clone(), nodes.keys().copied().collect()))
            .collect()
    }

    /// The subscriptions of a client (filter as written).
    pub fn subscriptions(&self, client_id: &str) -> Option<&BTreeMap<String, Subscription>> {
        self.subscriptions.get(client_id)
    }

    /// Retained messages whose topic matches `filter` (of a shared filter, its inner filter).
    pub fn retained_matching(&self, filter: &str) -> Vec<(String, RetainedMessage)> {
        let filter = parse_shared_subscription(filter).map_or(filter, |(_, inner)| inner);
        self.retained
            .iter()
            .filter(|(topic, _)| matches(filter, topic))
            .map(|(topic, message)| (topic.clone(), message.clone()))
            .collect()
    }

    /// Bytes counted against the retained cap.
    pub fn retained_bytes(&self) -> u64 {
        self.retained_bytes
    }
}

fn retained_size(topic: &str, payload: &[u8]) -> u64 {
    (topic.len() + payload.len()) as u64
}

/// `$share/{group}/{filter}` routes per group; other filters route as they are.
fn route_key(filter: &str) -> RouteKey {
    match parse_shared_subscription(filter) {
        Some((group, inner)) => RouteKey {
            filter: inner.to_owned(),
            group: Some(group.to_owned()),
        },
        None => RouteKey {
            filter: filter.to_owned(),
            group: None,
        },
    }
}

#[cfg(test)]
#[path = "state_tests.rs"]
mod tests;
