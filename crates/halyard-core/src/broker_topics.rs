//! `$SYS/` belongs to the broker: a client may publish there only when an ACL rule grants
//! that topic explicitly. Otherwise a retained `$SYS/broker/version` from a client would
//! read back until the next `$SYS` tick, and one under `$SYS/broker/custom/` until restart.
//!
//! Refused publishes get PUBACK/PUBREC 0x87 (MQTT 5) or are acknowledged and dropped
//! (MQTT 3.x), as any refused publish; Mosquitto answers them the same way. A will to a
//! `$SYS/` topic is refused at CONNECT, like any will the client could not publish.
//!
//! "Explicitly" needs no extra bookkeeping: the default authorizer allows everything and
//! grants nothing here, and ACL rules with wildcards never match a topic starting with `$`
//! [MQTT-4.7.2-1], so only a rule naming `$SYS/...` (or a hook that answers for that very
//! topic) lets such a publish through.

use crate::authz::{Access, Authorizer, ClientInfo};
use crate::broker::Broker;
use crate::message::SessionKey;

/// Whether `topic` is in the broker's own `$SYS` tree.
pub(crate) fn is_broker_topic(topic: &str) -> bool {
    topic == "$SYS" || topic.starts_with("$SYS/")
}

/// Whether `client` may publish (or leave a will) on `topic` under `authorizer`.
pub(crate) fn may_publish(
    authorizer: &dyn Authorizer,
    client: &ClientInfo<'_>,
    topic: &str,
) -> bool {
    if is_broker_topic(topic) && authorizer.allows_everything() {
        return false;
    }
    authorizer.authorize(client, Access::Publish, topic)
}

impl Broker {
    /// Whether the session `key` may publish to `topic`; a refused `$SYS` publish is
    /// counted in [`crate::BrokerStats::denied_sys_publish`].
    pub(crate) fn may_publish(&mut self, key: SessionKey, topic: &str) -> bool {
        if !is_broker_topic(topic) {
            return self.authorized(key, Access::Publish, topic);
        }
        let allowed =
            !self.authorizer.allows_everything() && self.authorized(key, Access::Publish, topic);
        if !allowed {
            self.out.stats.denied_sys_publish += 1;
        }
        allowed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::authz::AllowAll;

    #[test]
    fn sys_needs_an_explicit_grant() {
        let client = ClientInfo {
            client_id: "c",
            username: None,
        };
        assert!(is_broker_topic("$SYS/broker/version"));
        assert!(is_broker_topic("$SYS"));
        assert!(!is_broker_topic("$SYSTEM/x"));
        assert!(!is_broker_topic("a/$SYS/b"));
        assert!(!may_publish(&AllowAll, &client, "$SYS/broker/version"));
        assert!(may_publish(&AllowAll, &client, "a/b"));
        let wildcard = crate::Acl::parse("topic readwrite #\n").expect("acl");
        assert!(!may_publish(&wildcard, &client, "$SYS/broker/version"));
        assert!(may_publish(&wildcard, &client, "a/b"));
        let explicit = crate::Acl::parse("topic write $SYS/broker/custom/#\n").expect("acl");
        assert!(may_publish(&explicit, &client, "$SYS/broker/custom/x"));
        assert!(!may_publish(&explicit, &client, "$SYS/broker/version"));
    }
}
