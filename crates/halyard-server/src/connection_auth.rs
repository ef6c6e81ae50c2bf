//! What the server remembers about an authenticated connection after its CONNECT, outside
//! the connection task's future (whose size is a per-connection memory budget) and outside
//! the core: the SCRAM user for re-authentication and an exchange in progress, the timer
//! that ends a connection when its token expires, the identity and topic aliases the HTTP
//! ACL hook needs, and token ACLs by client id for the authorizer.
//!
//! Only connections that need one get an entry (an open broker keeps none); the connection
//! task removes it when the connection ends. Token ACLs stay after the connection ends, so
//! that deliveries queued for the offline session are still checked by them; a new CONNECT
//! with the same client id replaces them.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};

use halyard_core::{Access, ConnectionId};

use crate::claim_acl::ClaimAcl;
use crate::scram::ScramServer;

/// One connection's entry.
#[derive(Debug, Default)]
pub(crate) struct ConnectionAuth {
    /// The CONNECT's client id.
    pub(crate) client_id: String,
    /// The authenticated user name.
    pub(crate) username: Option<String>,
    /// Set when the connection authenticated with SCRAM-SHA-256: the user a
    /// re-authentication must prove again.
    pub(crate) scram_user: Option<String>,
    /// A re-authentication waiting for the client-final message.
    pub(crate) pending: Option<ScramServer>,
    /// Inbound topic aliases, for the HTTP ACL hook (a PUBLISH may carry only an alias).
    pub(crate) aliases: HashMap<u16, String>,
    /// The task that disconnects the client when its token expires.
    #[expect(dead_code, reason = "held for its Drop, which cancels the timer")]
    pub(crate) expiry: Option<ExpiryTimer>,
}

/// The token expiry task of a connection, cancelled when its entry goes.
#[derive(Debug)]
pub(crate) struct ExpiryTimer(pub(crate) tokio::task::AbortHandle);

impl Drop for ExpiryTimer {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Every connection's entry, and token ACLs by client id.
#[derive(Debug, Default)]
pub(crate) struct Connections {
    entries: Mutex<HashMap<ConnectionId, ConnectionAuth>>,
    claims: RwLock<HashMap<String, Arc<ClaimAcl>>>,
}

impl Connections {
    /// Records `entry` for `conn` (replacing any) and the client's token ACL: `Some`
    /// installs it, `None` removes one a previous connection with this id left.
    pub(crate) fn insert(&self, conn: ConnectionId, entry: ConnectionAuth, acl: Option<ClaimAcl>) {
        {
            let mut claims = self
                .claims
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            match acl {
                Some(acl) => claims.insert(entry.client_id.clone(), Arc::new(acl)),
                None => claims.remove(&entry.client_id),
            };
        }
        self.lock().insert(conn, entry);
    }

    /// Runs `f` on the entry of `conn`, if it has one.
    pub(crate) fn with<T>(
        &self,
        conn: ConnectionId,
        f: impl FnOnce(&mut ConnectionAuth) -> T,
    ) -> Option<T> {
        self.lock().get_mut(&conn).map(f)
    }

    /// Forgets `conn` (its expiry timer is cancelled).
    pub(crate) fn remove(&self, conn: ConnectionId) {
        let removed = self.lock().remove(&conn);
        drop(removed);
    }

    /// The token ACL of `client_id`, if its token carried one.
    pub(crate) fn claim_acl(&self, client_id: &str) -> Option<Arc<ClaimAcl>> {
        let claims = self
            .claims
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if claims.is_empty() {
            return None;
        }
        claims.get(client_id).cloned()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<ConnectionId, ConnectionAuth>> {
        self.entries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// The HTTP ACL hook's `action` for an access; `None` for deliveries, which it is not asked
/// about (the subscription was).
pub(crate) fn acl_action(access: Access) -> Option<&'static str> {
    match access {
        Access::Publish => Some("publish"),
        Access::Subscribe => Some("subscribe"),
        Access::Receive => None,
    }
}
