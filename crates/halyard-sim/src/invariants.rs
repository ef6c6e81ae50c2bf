//! The invariants, checked after every step (acknowledged loss at the end of the run, once
//! the cluster has healed and every persistent subscriber has had time to collect).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use halyard_cluster::NodeId;

/// A broken invariant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Violation {
    /// More than one node holds a live connection for the client id.
    TwoOwners {
        step: u64,
        client_id: String,
        nodes: Vec<NodeId>,
    },
    /// A QoS 1/2 message acknowledged after the subscription never reached the subscriber.
    AckedLost { message: u64, subscriber: String },
    /// A QoS 2 message reached a subscriber's application more than once.
    Qos2Twice { message: u64, subscriber: String },
    /// Two nodes at the same applied index have different route tables.
    RoutesDiffer {
        step: u64,
        index: u64,
        nodes: (NodeId, NodeId),
    },
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Violation::TwoOwners {
                step,
                client_id,
                nodes,
            } => write!(
                f,
                "step {step}: {client_id} has live connections on nodes {nodes:?}"
            ),
            Violation::AckedLost {
                message,
                subscriber,
            } => write!(
                f,
                "acknowledged message {message} never reached {subscriber}"
            ),
            Violation::Qos2Twice {
                message,
                subscriber,
            } => write!(f, "QoS 2 message {message} reached {subscriber} twice"),
            Violation::RoutesDiffer { step, index, nodes } => write!(
                f,
                "step {step}: nodes {} and {} differ in routes at applied index {index}",
                nodes.0, nodes.1
            ),
        }
    }
}

struct Ack {
    step: u64,
    origin: NodeId,
}

/// What the checker has been told, and what it found.
#[derive(Default)]
pub struct Checker {
    acked: BTreeMap<u64, Ack>,
    /// Persistent subscribers: the step of their first SUBACK.
    subscribed_since: BTreeMap<String, u64>,
    /// Each persistent subscriber's CONNACKs: (step, node).
    session_nodes: BTreeMap<String, Vec<(u64, NodeId)>>,
    delivered: BTreeMap<String, BTreeMap<u64, u32>>,
    qos2: BTreeSet<u64>,
    /// Per persistent subscriber: (CONNECT step, CONNACK step) of each move to another node.
    moves: BTreeMap<String, Vec<(u64, u64)>>,
    wipes: Vec<(NodeId, u64)>,
    /// Per applied index: the first node seen there and its route table's digest.
    routes_at: BTreeMap<u64, (NodeId, u64)>,
    pub violations: Vec<Violation>,
}

impl Checker {
    /// A publish acknowledged by `origin`.
    pub fn acked(&mut self, step: u64, origin: NodeId, message: u64, qos2: bool) {
        self.acked.entry(message).or_insert(Ack { step, origin });
        if qos2 {
            self.qos2.insert(message);
        }
    }

    /// How many times a persistent subscriber's session resumed on another node.
    pub fn move_count(&self) -> u64 {
        self.moves.values().map(|moves| moves.len() as u64).sum()
    }

    pub fn subscribed(&mut self, step: u64, subscriber: &str) {
        self.subscribed_since
            .entry(subscriber.to_owned())
            .or_insert(step);
    }

    pub fn connected(&mut self, step: u64, subscriber: &str, node: NodeId) {
        self.session_nodes
            .entry(subscriber.to_owned())
            .or_default()
            .push((step, node));
    }

    /// A delivery to a subscriber's application; `exactly_once` when both the publish and
    /// the subscription were QoS 2.
    pub fn delivered(&mut self, subscriber: &str, message: u64, exactly_once: bool) {
        let count = self
            .delivered
            .entry(subscriber.to_owned())
            .or_default()
            .entry(message)
            .or_insert(0);
        *count += 1;
        if exactly_once && *count == 2 {
            self.violations.push(Violation::Qos2Twice {
                message,
                subscriber: subscriber.to_owned(),
            });
        }
    }

    /// A persistent subscriber's session moved to another node: CONNECT at `from`, CONNACK
    /// at `to`.
    pub fn moved(&mut self, subscriber: &str, from: u64, to: u64) {
        self.moves
            .entry(subscriber.to_owned())
            .or_default()
            .push((from, to));
    }

    pub fn wiped(&mut self, node: NodeId, step: u64) {
        self.wipes.push((node, step));
    }

    /// Whether `message` is a QoS 2 publish.
    pub fn is_qos2(&self, message: u64) -> bool {
        self.qos2.contains(&message)
    }

    /// Live connections per client id on each node this step: more than one is a violation,
    /// also while a node is cut from the quorum (its lease fences it before another node
    /// may serve the client).
    pub fn check_owners(&mut self, step: u64, live: &BTreeMap<String, Vec<NodeId>>) {
        for (client_id, nodes) in live {
            if nodes.len() < 2 {
                continue;
            }
            self.violations.push(Violation::TwoOwners {
                step,
                client_id: client_id.clone(),
                nodes: nodes.clone(),
            });
        }
    }

    /// A node's route table (as a digest) at its applied index.
    pub fn check_routes(&mut self, step: u64, node: NodeId, index: u64, digest: u64) {
        match self.routes_at.get(&index) {
            None => {
                self.routes_at.insert(index, (node, digest));
            }
            Some(&(first, seen)) if seen != digest => {
                let violation = Violation::RoutesDiffer {
                    step,
                    index,
                    nodes: (first, node),
                };
                if !self.violations.contains(&violation) {
                    self.violations.push(violation);
                }
            }
            Some(_) => {}
        }
    }

    /// At the end of a run: every message acknowledged after a persistent subscriber's
    /// first SUBACK reached it, unless a disk that held it was lost.
    pub fn check_losses(&mut self) {
        let mut lost = Vec::new();
        for (subscriber, &since) in &self.subscribed_since {
            let delivered = self.delivered.get(subscriber);
            let nodes = self.session_nodes.get(subscriber);
            for (&message, ack) in self.acked.range(..) {
                if ack.step <= since || delivered.is_some_and(|d| d.contains_key(&message)) {
                    continue;
                }
                let disk_lost = self.wipes.iter().any(|&(node, at)| {
                    let origin_lost = node == ack.origin && at >= ack.step;
                    origin_lost || nodes.is_some_and(|n| session_lost(n, node, at, ack.step))
                });
                if disk_lost {
                    continue;
                }
                lost.push(Violation::AckedLost {
                    message,
                    subscriber: subscriber.clone(),
                });
            }
        }
        self.violations.extend(lost);
    }
}

/// Whether the subscriber's session was on `node` when its disk was lost at `wiped`, with
/// the message acknowledged before the session's next CONNACK (elsewhere or anew).
fn session_lost(connacks: &[(u64, NodeId)], node: NodeId, wiped: u64, acked: u64) -> bool {
    let on_node = connacks
        .iter()
        .rev()
        .find(|(step, _)| *step <= wiped)
        .is_some_and(|&(_, at)| at == node);
    let next = connacks.iter().find(|(step, _)| *step > wiped);
    on_node && next.is_none_or(|&(step, _)| acked <= step)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_qos2_delivery_is_a_violation() {
        let mut checker = Checker::default();
        checker.delivered("s", 7, true);
        assert!(checker.violations.is_empty());
        checker.delivered("s", 7, true);
        assert_eq!(checker.violations.len(), 1);
        checker.delivered("s", 8, false);
        checker.delivered("s", 8, false);
        assert_eq!(checker.violations.len(), 1, "QoS 1 may repeat");
    }

    #[test]
    fn an_acked_message_missing_after_the_suback_is_lost() {
        let mut checker = Checker::default();
        checker.acked(1, 1, 10, false);
        checker.subscribed(2, "s");
        checker.acked(3, 1, 11, true);
        checker.acked(4, 1, 12, true);
        checker.delivered("s", 11, true);
        checker.check_losses();
        assert_eq!(
            checker.violations,
            vec![Violation::AckedLost {
                message: 12,
                subscriber: "s".into()
            }],
            "10 came before the SUBACK"
        );
    }

    #[test]
    fn a_lost_disk_excuses_a_loss() {
        let mut checker = Checker::default();
        checker.subscribed(1, "s");
        checker.acked(2, 3, 10, false);
        checker.wiped(3, 5);
        checker.check_losses();
        assert!(checker.violations.is_empty());
    }

    #[test]
    fn two_live_owners_are_a_violation() {
        let mut checker = Checker::default();
        let one = BTreeMap::from([("c".to_owned(), vec![1])]);
        checker.check_owners(5, &one);
        assert!(checker.violations.is_empty());
        let two = BTreeMap::from([("c".to_owned(), vec![1, 2])]);
        checker.check_owners(6, &two);
        assert_eq!(checker.violations.len(), 1);
    }

    #[test]
    fn different_routes_at_one_index_are_a_violation() {
        let mut checker = Checker::default();
        checker.check_routes(1, 1, 40, 0xaa);
        checker.check_routes(1, 2, 40, 0xaa);
        checker.check_routes(1, 3, 41, 0xbb);
        assert!(checker.violations.is_empty());
        checker.check_routes(2, 3, 40, 0xbb);
        assert_eq!(checker.violations.len(), 1);
    }
}
