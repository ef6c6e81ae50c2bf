//! Authorization seam: who may subscribe to, publish to and receive from which topic.
//!
//! The core asks an [`Authorizer`] at the three points where MQTT lets a broker refuse:
//! SUBSCRIBE (a failure reason code per filter), PUBLISH (MQTT 5 PUBACK/PUBREC 0x87; MQTT 3.x
//! has no way to say no, so the message is acknowledged and dropped, as [MQTT-3.3.5-2]
//! allows), and delivery (a subscriber that may not read a topic does not get the message,
//! retained messages included). The default [`AllowAll`] keeps the broker open and costs one
//! virtual call per check site, not per subscriber.
//!
//! Authentication (passwords, certificates) happens before the core sees a CONNECT; the core
//! only remembers the resulting user name on the session so the rules can use it.

use std::sync::Arc;

use crate::broker::Broker;
use crate::message::SessionKey;

/// What a client wants to do with a topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Access {
    /// SUBSCRIBE to a topic filter (wildcards included; the shared-subscription prefix is
    /// already stripped).
    Subscribe,
    /// PUBLISH to a topic name (also asked for the will topic at CONNECT).
    Publish,
    /// Receive a message published to a topic name.
    Receive,
}

/// The identity an authorization decision is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientInfo<'a> {
    /// The client identifier of the session.
    pub client_id: &'a str,
    /// The authenticated user name, `None` for an anonymous client.
    pub username: Option<&'a str>,
}

/// Decides topic access. Implementations must be cheap and must not block: the core calls
/// them on the broker task, once per check (per subscriber on delivery).
pub trait Authorizer: Send + Sync {
    /// Whether `client` may do `access` on `topic` (a filter for [`Access::Subscribe`], a
    /// topic name otherwise).
    fn authorize(&self, client: &ClientInfo<'_>, access: Access, topic: &str) -> bool;

    /// True when [`Authorizer::authorize`] would allow everything: the core then skips the
    /// per-subscriber checks on the publish fast path.
    fn allows_everything(&self) -> bool {
        false
    }

    /// True when the server has already completed MQTT 5 enhanced authentication `method`
    /// for every CONNECT it forwards with that Authentication Method: the core then accepts
    /// the CONNECT and echoes the method and the (server-replaced) Authentication Data in
    /// CONNACK, instead of refusing an unknown method with 0x8C.
    fn server_authenticates(&self, _method: &str) -> bool {
        false
    }
}

/// The default authorizer: every access is allowed.
#[derive(Debug, Clone, Copy, Default)]
pub struct AllowAll;

impl Authorizer for AllowAll {
    fn authorize(&self, _client: &ClientInfo<'_>, _access: Access, _topic: &str) -> bool {
        true
    }

    fn allows_everything(&self) -> bool {
        true
    }
}

impl<T: Authorizer + ?Sized> Authorizer for Arc<T> {
    fn authorize(&self, client: &ClientInfo<'_>, access: Access, topic: &str) -> bool {
        (**self).authorize(client, access, topic)
    }

    fn allows_everything(&self) -> bool {
        (**self).allows_everything()
    }

    fn server_authenticates(&self, method: &str) -> bool {
        (**self).server_authenticates(method)
    }
}

impl Broker {
    /// Replaces the authorizer consulted on SUBSCRIBE, PUBLISH and delivery. Decisions
    /// already taken (existing subscriptions) stay; later checks use the new one.
    pub fn set_authorizer(&mut self, authorizer: Arc<dyn Authorizer>) {
        self.authorizer = authorizer;
    }

    /// Whether the session `key` may do `access` on `topic`. A session whose identity is
    /// unknown (restored from the store and not connected since the broker started) is
    /// allowed to receive: its subscriptions were authorized when they were made, and it is
    /// checked again as soon as it reconnects.
    pub(crate) fn authorized(&self, key: SessionKey, access: Access, topic: &str) -> bool {
        if self.authorizer.allows_everything() {
            return true;
        }
        let Some(session) = self.sessions.get(&key) else {
            return false;
        };
        let username = match (&session.link, &session.username) {
            (Some(link), _) => link.username.as_deref(),
            (None, Some(last)) => last.as_deref(),
            (None, None) => return access == Access::Receive,
        };
        let client = ClientInfo {
            client_id: &session.client_id,
            username,
        };
        self.authorizer.authorize(&client, access, topic)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allow_all_allows_everything() {
        let client = ClientInfo {
            client_id: "c",
            username: None,
        };
        for access in [Access::Subscribe, Access::Publish, Access::Receive] {
            assert!(AllowAll.authorize(&client, access, "a/b"));
        }
        assert!(AllowAll.allows_everything());
        let shared: Arc<dyn Authorizer> = Arc::new(AllowAll);
        assert!(shared.allows_everything());
    }
}
