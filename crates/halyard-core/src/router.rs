//! Subscription index: which sessions, and which other nodes of a cluster, want a topic.
//!
//! Targets are local sessions or remote nodes ([`RouteTarget`]). A remote node is in the
//! index once for each filter (or share group) that has subscribers there, so its size grows
//! with filters x nodes, not with clients; the node applies its own subscribers' options
//! when the message arrives. [`LocalRouter`] is the trie; a cluster feeds it the remote
//! routes it learns from consensus.

use std::sync::Arc;

use halyard_codec::SubscriptionOptions;

use crate::message::{NodeId, SessionKey};
use crate::FastMap;

/// What a session asked for with one filter.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SubscriptionEntry {
    /// Options from SUBSCRIBE (granted QoS, no local, retain as published, retain handling).
    pub options: SubscriptionOptions,
    /// MQTT 5 Subscription Identifier, echoed on every matching delivery.
    pub identifier: Option<u32>,
}

/// Where a routed message goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RouteTarget {
    /// A session of this node.
    Session(SessionKey),
    /// Another node of the cluster, which delivers to its own subscribers.
    Node(NodeId),
}

/// One delivery target found for a topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteMatch {
    /// Where to deliver.
    pub target: RouteTarget,
    /// The subscription that matched (for a node target: default options, unused).
    pub entry: SubscriptionEntry,
    /// For a match from a shared subscription, the share group's filter as subscribed
    /// (`$share/{group}/{filter}`): shared deliveries are never merged with the session's
    /// ordinary subscriptions, and a node picked for a group is told which group to serve.
    pub share: Option<Arc<str>>,
}

impl RouteMatch {
    /// The local session of this match, if it is one.
    pub fn session(&self) -> Option<SessionKey> {
        match self.target {
            RouteTarget::Session(session) => Some(session),
            RouteTarget::Node(_) => None,
        }
    }
}

/// Which targets a route may pick.
#[derive(Debug, Clone, Copy)]
pub enum RouteScope<'a> {
    /// A message published on this node: every local session and remote node, with each
    /// share group served by one member anywhere in the cluster.
    Everywhere,
    /// A message another node forwarded: local sessions only (it is never forwarded again),
    /// and share groups only where the sender picked this node for them (their
    /// `$share/...` filters).
    LocalFromPeer {
        /// Share groups this node was picked to serve.
        groups: &'a [Arc<str>],
    },
}

/// A parsed filter: the plain filter and, for `$share/{group}/{filter}`, its group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FilterRef<'a> {
    /// Share group name, if this is a shared subscription.
    pub group: Option<&'a str>,
    /// The topic filter proper.
    pub filter: &'a str,
}

impl<'a> FilterRef<'a> {
    /// Splits a SUBSCRIBE/UNSUBSCRIBE filter into group and filter.
    pub fn parse(raw: &'a str) -> FilterRef<'a> {
        match halyard_codec::topic::parse_shared_subscription(raw) {
            Some((group, filter)) => FilterRef {
                group: Some(group),
                filter,
            },
            None => FilterRef {
                group: None,
                filter: raw,
            },
        }
    }
}

/// The seam between the broker and whoever knows the subscribers of a topic.
pub trait Router: Send {
    /// Adds or replaces the subscription of `session` to `filter`; true if it is new.
    fn subscribe(
        &mut self,
        session: SessionKey,
        filter: FilterRef<'_>,
        entry: SubscriptionEntry,
    ) -> bool;
    /// Removes the subscription; true if it existed.
    fn unsubscribe(&mut self, session: SessionKey, filter: FilterRef<'_>) -> bool;
    /// Records that `node` has subscribers to `filter`; true if that is new.
    fn add_node(&mut self, node: NodeId, filter: FilterRef<'_>) -> bool;
    /// Records that `node` has no more subscribers to `filter`; true if it had.
    fn remove_node(&mut self, node: NodeId, filter: FilterRef<'_>) -> bool;
    /// Appends every target for `topic` within `scope` to `out`. For each share group one
    /// member is chosen, preferring members for which `is_online` holds (remote nodes count
    /// as online).
    fn route(
        &mut self,
        topic: &str,
        scope: RouteScope<'_>,
        is_online: &dyn Fn(SessionKey) -> bool,
        out: &mut Vec<RouteMatch>,
    );
}

/// Members of one share group on one filter, served round-robin.
#[derive(Debug)]
struct ShareGroup {
    /// The filter as subscribed, `$share/{group}/{filter}`.
    raw: Arc<str>,
    members: Vec<(RouteTarget, SubscriptionEntry)>,
    next: usize,
}

impl ShareGroup {
    /// Picks the next member round-robin among those `eligible`, preferring online ones.
    fn pick(
        &mut self,
        eligible: impl Fn(RouteTarget) -> bool,
        is_online: &dyn Fn(SessionKey) -> bool,
    ) -> Option<(RouteTarget, SubscriptionEntry)> {
        let count = self.members.len();
        let start = self.next % count.max(1);
        let candidates = || {
            (0..count)
                .map(move |offset| (start + offset) % count)
                .filter(|&index| eligible(self.members[index].0))
        };
        let online = |target: RouteTarget| match target {
            RouteTarget::Session(session) => is_online(session),
            RouteTarget::Node(_) => true,
        };
        let chosen = candidates()
            .find(|&index| online(self.members[index].0))
            .or_else(|| candidates().next())?;
        self.next = chosen + 1;
        Some(self.members[chosen])
    }

    fn add(&mut self, target: RouteTarget, entry: SubscriptionEntry) -> bool {
        match self
            .members
            .iter_mut()
            .find(|(member, _)| *member == target)
        {
            Some(existing) => {
                existing.1 = entry;
                false
            }
            None => {
                self.members.push((target, entry));
                true
            }
        }
    }
}

#[derive(Debug, Default)]
struct Node {
    children: FastMap<Box<str>, Node>,
    subscribers: FastMap<SessionKey, SubscriptionEntry>,
    /// Other nodes with ordinary subscribers to this filter: a handful at most.
    nodes: Vec<NodeId>,
    groups: FastMap<Box<str>, ShareGroup>,
}

impl Node {
    fn is_empty(&self) -> bool {
        self.children.is_empty()
            && self.subscribers.is_empty()
            && self.nodes.is_empty()
            && self.groups.is_empty()
    }
}

/// Subscription trie, one level per `/`-separated part of the filter.
#[derive(Debug, Default)]
pub struct LocalRouter {
    root: Node,
}

/// What one route call looks for, passed down the trie.
struct Walk<'a> {
    scope: RouteScope<'a>,
    is_online: &'a dyn Fn(SessionKey) -> bool,
}

impl LocalRouter {
    /// An empty index.
    pub fn new() -> LocalRouter {
        LocalRouter::default()
    }

    fn node_mut(&mut self, filter: &str) -> &mut Node {
        let mut node = &mut self.root;
        for level in filter.split('/') {
            node = node.children.entry(level.into()).or_default();
        }
        node
    }

    fn collect(node: &mut Node, levels: &[&str], walk: &Walk<'_>, out: &mut Vec<RouteMatch>) {
        Self::emit_all(node.children.get_mut("#"), walk, out);
        let Some((level, rest)) = levels.split_first() else {
            Self::emit_all(Some(node), walk, out);
            return;
        };
        if let Some(child) = node.children.get_mut(*level) {
            Self::collect(child, rest, walk, out);
        }
        if let Some(child) = node.children.get_mut("+") {
            Self::collect(child, rest, walk, out);
        }
    }

    fn emit_all(node: Option<&mut Node>, walk: &Walk<'_>, out: &mut Vec<RouteMatch>) {
        let Some(node) = node else { return };
        out.extend(
            node.subscribers
                .iter()
                .map(|(&session, &entry)| RouteMatch {
                    target: RouteTarget::Session(session),
                    entry,
                    share: None,
                }),
        );
        let everywhere = matches!(walk.scope, RouteScope::Everywhere);
        if everywhere {
            out.extend(node.nodes.iter().map(|&node| RouteMatch {
                target: RouteTarget::Node(node),
                entry: SubscriptionEntry::default(),
                share: None,
            }));
        }
        for group in node.groups.values_mut() {
            let picked = match walk.scope {
                RouteScope::Everywhere => group.pick(|_| true, walk.is_online),
                RouteScope::LocalFromPeer { groups } => {
                    if !groups.contains(&group.raw) {
                        continue;
                    }
                    group.pick(
                        |target| matches!(target, RouteTarget::Session(_)),
                        walk.is_online,
                    )
                }
            };
            if let Some((target, entry)) = picked {
                out.push(RouteMatch {
                    target,
                    entry,
                    share: Some(Arc::clone(&group.raw)),
                });
            }
        }
    }

    /// Removes `target` from `filter`'s entry at the end of `levels`, pruning empty nodes.
    fn remove_from(
        node: &mut Node,
        levels: &[&str],
        target: RouteTarget,
        group: Option<&str>,
    ) -> bool {
        let Some((level, rest)) = levels.split_first() else {
            return match (group, target) {
                (None, RouteTarget::Session(session)) => {
                    node.subscribers.remove(&session).is_some()
                }
                (None, RouteTarget::Node(id)) => {
                    let before = node.nodes.len();
                    node.nodes.retain(|&other| other != id);
                    node.nodes.len() != before
                }
                (Some(group), _) => {
                    let Some(share) = node.groups.get_mut(group) else {
                        return false;
                    };
                    let before = share.members.len();
                    share.members.retain(|(member, _)| *member != target);
                    let removed = share.members.len() != before;
                    if share.members.is_empty() {
                        node.groups.remove(group);
                    }
                    removed
                }
            };
        };
        let Some(child) = node.children.get_mut(*level) else {
            return false;
        };
        let removed = Self::remove_from(child, rest, target, group);
        if child.is_empty() {
            node.children.remove(*level);
        }
        removed
    }

    fn add_to_group(
        &mut self,
        filter: FilterRef<'_>,
        group: &str,
        target: RouteTarget,
        entry: SubscriptionEntry,
    ) -> bool {
        let node = self.node_mut(filter.filter);
        node.groups
            .entry(group.into())
            .or_insert_with(|| ShareGroup {
                raw: format!("$share/{group}/{}", filter.filter).into(),
                members: Vec::new(),
                next: 0,
            })
            .add(target, entry)
    }

    fn remove(&mut self, target: RouteTarget, filter: FilterRef<'_>) -> bool {
        let levels: Vec<&str> = filter.filter.split('/').collect();
        Self::remove_from(&mut self.root, &levels, target, filter.group)
    }
}

impl Router for LocalRouter {
    fn subscribe(
        &mut self,
        session: SessionKey,
        filter: FilterRef<'_>,
        entry: SubscriptionEntry,
    ) -> bool {
        match filter.group {
            None => self
                .node_mut(filter.filter)
                .subscribers
                .insert(session, entry)
                .is_none(),
            Some(group) => self.add_to_group(filter, group, RouteTarget::Session(session), entry),
        }
    }

    fn unsubscribe(&mut self, session: SessionKey, filter: FilterRef<'_>) -> bool {
        self.remove(RouteTarget::Session(session), filter)
    }

    fn add_node(&mut self, node: NodeId, filter: FilterRef<'_>) -> bool {
        match filter.group {
            None => {
                let nodes = &mut self.node_mut(filter.filter).nodes;
                let new = !nodes.contains(&node);
                if new {
                    nodes.push(node);
                }
                new
            }
            Some(group) => self.add_to_group(
                filter,
                group,
                RouteTarget::Node(node),
                SubscriptionEntry::default(),
            ),
        }
    }

    fn remove_node(&mut self, node: NodeId, filter: FilterRef<'_>) -> bool {
        self.remove(RouteTarget::Node(node), filter)
    }

    fn route(
        &mut self,
        topic: &str,
        scope: RouteScope<'_>,
        is_online: &dyn Fn(SessionKey) -> bool,
        out: &mut Vec<RouteMatch>,
    ) {
        let walk = Walk { scope, is_online };
        let levels: Vec<&str> = topic.split('/').collect();
        let Some((first, rest)) = levels.split_first() else {
            return;
        };
        // [MQTT-4.7.2-1]: a filter starting with a wildcard never matches a `$` topic.
        if first.starts_with('$') {
            if let Some(child) = self.root.children.get_mut(*first) {
                Self::collect(child, rest, &walk, out);
            }
        } else {
            Self::collect(&mut self.root, &levels, &walk, out);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use halyard_codec::QoS;

    fn entry(qos: QoS) -> SubscriptionEntry {
        SubscriptionEntry {
            options: SubscriptionOptions {
                qos,
                ..Default::default()
            },
            identifier: None,
        }
    }

    fn sessions_for(router: &mut LocalRouter, topic: &str) -> Vec<SessionKey> {
        let mut out = Vec::new();
        router.route(topic, RouteScope::Everywhere, &|_| true, &mut out);
        let mut keys: Vec<_> = out.iter().map(session_of).collect();
        keys.sort_unstable();
        keys
    }

    fn session_of(m: &RouteMatch) -> SessionKey {
        match m.target {
            RouteTarget::Session(session) => session,
            RouteTarget::Node(node) => panic!("unexpected node target {node}"),
        }
    }

    fn subscribe(router: &mut LocalRouter, session: SessionKey, filter: &str) -> bool {
        router.subscribe(session, FilterRef::parse(filter), entry(QoS::AtMostOnce))
    }

    #[test]
    fn wildcards_match_per_spec() {
        let mut router = LocalRouter::new();
        subscribe(&mut router, 1, "sport/tennis/+");
        subscribe(&mut router, 2, "sport/#");
        subscribe(&mut router, 3, "#");
        subscribe(&mut router, 4, "+/+");
        subscribe(&mut router, 5, "sport/tennis/player1");
        assert_eq!(
            sessions_for(&mut router, "sport/tennis/player1"),
            vec![1, 2, 3, 5]
        );
        // `sport/#` also matches the parent level `sport` [MQTT-4.7.1-2].
        assert_eq!(sessions_for(&mut router, "sport"), vec![2, 3]);
        assert_eq!(sessions_for(&mut router, "sport/tennis"), vec![2, 3, 4]);
        assert_eq!(sessions_for(&mut router, "/finance"), vec![3, 4]);
    }

    #[test]
    fn dollar_topics_not_matched_by_leading_wildcards() {
        // [MQTT-4.7.2-1]
        let mut router = LocalRouter::new();
        subscribe(&mut router, 1, "#");
        subscribe(&mut router, 2, "+/monitor/Clients");
        subscribe(&mut router, 3, "$SYS/#");
        subscribe(&mut router, 4, "$SYS/monitor/+");
        assert_eq!(
            sessions_for(&mut router, "$SYS/monitor/Clients"),
            vec![3, 4]
        );
    }

    #[test]
    fn resubscribe_replaces_and_unsubscribe_prunes() {
        let mut router = LocalRouter::new();
        assert!(subscribe(&mut router, 1, "a/b"));
        assert!(!subscribe(&mut router, 1, "a/b"));
        assert!(router.unsubscribe(1, FilterRef::parse("a/b")));
        assert!(!router.unsubscribe(1, FilterRef::parse("a/b")));
        assert!(router.root.is_empty());
    }

    #[test]
    fn share_group_round_robins_and_prefers_online_members() {
        let mut router = LocalRouter::new();
        subscribe(&mut router, 1, "$share/g/t");
        subscribe(&mut router, 2, "$share/g/t");
        subscribe(&mut router, 3, "t");
        let mut picks = Vec::new();
        for _ in 0..4 {
            let mut out = Vec::new();
            router.route("t", RouteScope::Everywhere, &|_| true, &mut out);
            assert_eq!(out.iter().filter(|m| m.share.is_none()).count(), 1);
            let shared: Vec<_> = out.iter().filter(|m| m.share.is_some()).collect();
            assert_eq!(shared.len(), 1);
            assert_eq!(shared[0].share.as_deref(), Some("$share/g/t"));
            picks.push(session_of(shared[0]));
        }
        assert_eq!(picks, vec![1, 2, 1, 2]);
        let mut out = Vec::new();
        router.route(
            "t",
            RouteScope::Everywhere,
            &|session| session == 2,
            &mut out,
        );
        router.route(
            "t",
            RouteScope::Everywhere,
            &|session| session == 2,
            &mut out,
        );
        assert!(out
            .iter()
            .filter(|m| m.share.is_some())
            .all(|m| session_of(m) == 2));
    }

    fn targets_for(
        router: &mut LocalRouter,
        topic: &str,
        scope: RouteScope<'_>,
    ) -> Vec<RouteTarget> {
        let mut out = Vec::new();
        router.route(topic, scope, &|_| true, &mut out);
        let mut targets: Vec<_> = out.iter().map(|m| m.target).collect();
        targets.sort_unstable();
        targets
    }

    #[test]
    fn remote_nodes_are_targets_once_per_filter_and_never_from_a_peer() {
        let mut router = LocalRouter::new();
        subscribe(&mut router, 1, "a/+");
        assert!(router.add_node(7, FilterRef::parse("a/#")));
        assert!(!router.add_node(7, FilterRef::parse("a/#")));
        assert!(router.add_node(8, FilterRef::parse("a/b")));
        assert_eq!(
            targets_for(&mut router, "a/b", RouteScope::Everywhere),
            vec![
                RouteTarget::Session(1),
                RouteTarget::Node(7),
                RouteTarget::Node(8)
            ]
        );
        // A forwarded message reaches local sessions only: it is never forwarded again.
        assert_eq!(
            targets_for(
                &mut router,
                "a/b",
                RouteScope::LocalFromPeer { groups: &[] }
            ),
            vec![RouteTarget::Session(1)]
        );
        assert!(router.remove_node(7, FilterRef::parse("a/#")));
        assert!(!router.remove_node(7, FilterRef::parse("a/#")));
        assert_eq!(
            targets_for(&mut router, "a/c", RouteScope::Everywhere),
            vec![RouteTarget::Session(1)]
        );
    }

    #[test]
    fn share_group_spans_nodes_and_a_peer_serves_only_groups_it_was_picked_for() {
        let mut router = LocalRouter::new();
        subscribe(&mut router, 1, "$share/g/t");
        subscribe(&mut router, 2, "$share/h/t");
        router.add_node(9, FilterRef::parse("$share/g/t"));
        let mut picks = Vec::new();
        for _ in 0..4 {
            let mut out = Vec::new();
            router.route("t", RouteScope::Everywhere, &|_| true, &mut out);
            let g: Vec<_> = out
                .iter()
                .filter(|m| m.share.as_deref() == Some("$share/g/t"))
                .collect();
            assert_eq!(g.len(), 1, "one member of group g per message");
            picks.push(g[0].target);
        }
        assert_eq!(
            picks,
            vec![
                RouteTarget::Session(1),
                RouteTarget::Node(9),
                RouteTarget::Session(1),
                RouteTarget::Node(9)
            ]
        );
        let picked: Vec<Arc<str>> = vec!["$share/g/t".into()];
        for _ in 0..3 {
            assert_eq!(
                targets_for(
                    &mut router,
                    "t",
                    RouteScope::LocalFromPeer { groups: &picked }
                ),
                vec![RouteTarget::Session(1)],
                "group g from a peer goes to the local member; group h was not picked"
            );
        }
    }
}
