//! Subscription index: which sessions want a topic.
//!
//! The broker routes through the [`Router`] trait so that the cluster can later add remote
//! nodes as targets next to local sessions; [`LocalRouter`] is the single-node trie.

use halyard_codec::SubscriptionOptions;

use crate::message::SessionKey;
use crate::FastMap;

/// What a session asked for with one filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SubscriptionEntry {
    /// Options from SUBSCRIBE (granted QoS, no local, retain as published, retain handling).
    pub options: SubscriptionOptions,
    /// MQTT 5 Subscription Identifier, echoed on every matching delivery.
    pub identifier: Option<u32>,
}

/// One delivery target found for a topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RouteMatch {
    /// Session to deliver to.
    pub session: SessionKey,
    /// The subscription that matched.
    pub entry: SubscriptionEntry,
    /// True when the match came from a shared subscription: shared deliveries are never merged
    /// with the session's ordinary subscriptions.
    pub shared: bool,
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
    /// Appends every target for `topic` to `out`. For each share group one member is chosen,
    /// preferring members for which `is_online` holds.
    fn route(
        &mut self,
        topic: &str,
        is_online: &dyn Fn(SessionKey) -> bool,
        out: &mut Vec<RouteMatch>,
    );
}

/// Members of one share group on one filter, served round-robin.
#[derive(Debug, Default)]
struct ShareGroup {
    members: Vec<(SessionKey, SubscriptionEntry)>,
    next: usize,
}

impl ShareGroup {
    /// Picks the next member round-robin, skipping offline members when any is online.
    fn pick(
        &mut self,
        is_online: &dyn Fn(SessionKey) -> bool,
    ) -> Option<(SessionKey, SubscriptionEntry)> {
        let count = self.members.len();
        if count == 0 {
            return None;
        }
        let start = self.next % count;
        let chosen = (0..count)
            .map(|offset| (start + offset) % count)
            .find(|&index| is_online(self.members[index].0))
            .unwrap_or(start);
        self.next = chosen + 1;
        Some(self.members[chosen])
    }
}

#[derive(Debug, Default)]
struct Node {
    children: FastMap<Box<str>, Node>,
    subscribers: FastMap<SessionKey, SubscriptionEntry>,
    groups: FastMap<Box<str>, ShareGroup>,
}

impl Node {
    fn is_empty(&self) -> bool {
        self.children.is_empty() && self.subscribers.is_empty() && self.groups.is_empty()
    }
}

/// Single-node subscription trie, one level per `/`-separated part of the filter.
#[derive(Debug, Default)]
pub struct LocalRouter {
    root: Node,
}

impl LocalRouter {
    /// An empty index.
    pub fn new() -> LocalRouter {
        LocalRouter::default()
    }

    fn collect(
        node: &mut Node,
        levels: &[&str],
        is_online: &dyn Fn(SessionKey) -> bool,
        out: &mut Vec<RouteMatch>,
    ) {
        Self::emit_all(node.children.get_mut("#"), is_online, out);
        let Some((level, rest)) = levels.split_first() else {
            Self::emit_all(Some(node), is_online, out);
            return;
        };
        if let Some(child) = node.children.get_mut(*level) {
            Self::collect(child, rest, is_online, out);
        }
        if let Some(child) = node.children.get_mut("+") {
            Self::collect(child, rest, is_online, out);
        }
    }

    fn emit_all(
        node: Option<&mut Node>,
        is_online: &dyn Fn(SessionKey) -> bool,
        out: &mut Vec<RouteMatch>,
    ) {
        let Some(node) = node else { return };
        out.extend(
            node.subscribers
                .iter()
                .map(|(&session, &entry)| RouteMatch {
                    session,
                    entry,
                    shared: false,
                }),
        );
        for group in node.groups.values_mut() {
            if let Some((session, entry)) = group.pick(is_online) {
                out.push(RouteMatch {
                    session,
                    entry,
                    shared: true,
                });
            }
        }
    }

    fn remove_from(
        node: &mut Node,
        levels: &[&str],
        session: SessionKey,
        group: Option<&str>,
    ) -> bool {
        let Some((level, rest)) = levels.split_first() else {
            return match group {
                None => node.subscribers.remove(&session).is_some(),
                Some(group) => {
                    let Some(share) = node.groups.get_mut(group) else {
                        return false;
                    };
                    let before = share.members.len();
                    share.members.retain(|(member, _)| *member != session);
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
        let removed = Self::remove_from(child, rest, session, group);
        if child.is_empty() {
            node.children.remove(*level);
        }
        removed
    }
}

impl Router for LocalRouter {
    fn subscribe(
        &mut self,
        session: SessionKey,
        filter: FilterRef<'_>,
        entry: SubscriptionEntry,
    ) -> bool {
        let mut node = &mut self.root;
        for level in filter.filter.split('/') {
            node = node.children.entry(level.into()).or_default();
        }
        match filter.group {
            None => node.subscribers.insert(session, entry).is_none(),
            Some(group) => {
                let share = node.groups.entry(group.into()).or_default();
                match share
                    .members
                    .iter_mut()
                    .find(|(member, _)| *member == session)
                {
                    Some(existing) => {
                        existing.1 = entry;
                        false
                    }
                    None => {
                        share.members.push((session, entry));
                        true
                    }
                }
            }
        }
    }

    fn unsubscribe(&mut self, session: SessionKey, filter: FilterRef<'_>) -> bool {
        let levels: Vec<&str> = filter.filter.split('/').collect();
        Self::remove_from(&mut self.root, &levels, session, filter.group)
    }

    fn route(
        &mut self,
        topic: &str,
        is_online: &dyn Fn(SessionKey) -> bool,
        out: &mut Vec<RouteMatch>,
    ) {
        let levels: Vec<&str> = topic.split('/').collect();
        let Some((first, rest)) = levels.split_first() else {
            return;
        };
        // [MQTT-4.7.2-1]: a filter starting with a wildcard never matches a `$` topic.
        if first.starts_with('$') {
            if let Some(child) = self.root.children.get_mut(*first) {
                Self::collect(child, rest, is_online, out);
            }
        } else {
            Self::collect(&mut self.root, &levels, is_online, out);
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
        router.route(topic, &|_| true, &mut out);
        let mut keys: Vec<_> = out.iter().map(|m| m.session).collect();
        keys.sort_unstable();
        keys
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
            router.route("t", &|_| true, &mut out);
            assert_eq!(out.iter().filter(|m| !m.shared).count(), 1);
            let shared: Vec<_> = out.iter().filter(|m| m.shared).collect();
            assert_eq!(shared.len(), 1);
            picks.push(shared[0].session);
        }
        assert_eq!(picks, vec![1, 2, 1, 2]);
        let mut out = Vec::new();
        router.route("t", &|session| session == 2, &mut out);
        router.route("t", &|session| session == 2, &mut out);
        assert!(out.iter().filter(|m| m.shared).all(|m| m.session == 2));
    }
}
