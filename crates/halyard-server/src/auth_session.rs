//! What follows an admitted CONNECT for the life of the connection: its entry in
//! [`crate::connection_auth::Connections`], the timer that disconnects it when its token
//! expires (MQTT 5: DISCONNECT 0xA0 Maximum connect time), and the HTTP ACL answers its
//! publishes and subscriptions need before the broker task sees them.

use std::sync::Arc;
use std::time::SystemTime;

use halyard_codec::topic::parse_shared_subscription;
use halyard_codec::{Connect, Packet, ReasonCode};
use halyard_core::ConnectionId;
use tokio::sync::mpsc;

use crate::auth::Security;
use crate::auth_chain::Admitted;
use crate::connection_auth::{ConnectionAuth, ExpiryTimer};
use crate::event::{AdminCall, Event};
use crate::http_auth::{AclRequest, HttpAuth};

impl Security {
    /// The HTTP hook, if it answers ACL questions.
    pub(crate) fn http_acl(&self) -> Option<&Arc<HttpAuth>> {
        self.http
            .as_ref()
            .filter(|http| http.config().acl_url.is_some())
    }

    /// Whether admitted connections need an entry at all (an open broker keeps none).
    pub(crate) fn tracks_connections(&self) -> bool {
        self.scram_enabled() || self.config.jwt.is_some() || self.http_acl().is_some()
    }

    /// Records an admitted connection and starts its expiry timer; asks the HTTP ACL hook
    /// about its will topic, which the core checks at CONNECT.
    pub(crate) async fn track(
        self: &Arc<Security>,
        conn: ConnectionId,
        connect: &Connect,
        admitted: Admitted,
        scram_user: Option<String>,
        events: &mpsc::Sender<Event>,
    ) {
        // A password-file client that did not use SCRAM needs no entry.
        if scram_user.is_none() && self.config.jwt.is_none() && self.http_acl().is_none() {
            return;
        }
        let expiry = admitted
            .expires_at
            .map(|at| ExpiryTimer(spawn_expiry(Arc::clone(self), conn, at, events.clone())));
        let entry = ConnectionAuth {
            client_id: connect.client_id.clone(),
            username: connect.username.clone(),
            scram_user,
            expiry,
            ..ConnectionAuth::default()
        };
        self.connections.insert(conn, entry, admitted.acl);
        if let (Some(http), Some(will)) = (self.http_acl(), &connect.will) {
            http.prefetch_acl(AclRequest {
                client_id: connect.client_id.clone(),
                username: connect.username.clone(),
                topic: will.topic.clone(),
                action: "publish",
            })
            .await;
        }
    }

    /// Asks the HTTP ACL hook about every publish and subscribe in `packets` whose answer
    /// is not cached, before they are forwarded (the core reads the cache).
    pub(crate) async fn prefetch_acl(&self, conn: ConnectionId, packets: &[Packet]) {
        let Some(http) = self.http_acl() else {
            return;
        };
        let mut requests = Vec::new();
        self.connections.with(conn, |entry| {
            let request = |topic: &str, action| AclRequest {
                client_id: entry.client_id.clone(),
                username: entry.username.clone(),
                topic: topic.to_owned(),
                action,
            };
            for packet in packets {
                match packet {
                    Packet::Publish(publish) => {
                        let alias = publish.properties.topic_alias;
                        let topic = match alias {
                            Some(alias) if publish.topic.is_empty() => {
                                entry.aliases.get(&alias).cloned().unwrap_or_default()
                            }
                            Some(alias) => {
                                entry.aliases.insert(alias, publish.topic.clone());
                                publish.topic.clone()
                            }
                            None => publish.topic.clone(),
                        };
                        requests.push(request(&topic, "publish"));
                    }
                    Packet::Subscribe(subscribe) => {
                        for subscription in &subscribe.subscriptions {
                            let filter = parse_shared_subscription(&subscription.filter)
                                .map_or(subscription.filter.as_str(), |(_, inner)| inner);
                            requests.push(request(filter, "subscribe"));
                        }
                    }
                    _ => {}
                }
            }
        });
        for request in requests {
            http.prefetch_acl(request).await;
        }
    }
}

/// A task that disconnects `conn` at `at` (its token's expiry plus the leeway); aborted
/// when the connection ends first.
fn spawn_expiry(
    security: Arc<Security>,
    conn: ConnectionId,
    at: SystemTime,
    events: mpsc::Sender<Event>,
) -> tokio::task::AbortHandle {
    let wait = at.duration_since(SystemTime::now()).unwrap_or_default();
    tokio::spawn(async move {
        tokio::time::sleep(wait).await;
        let call = Box::new(move |broker: &mut halyard_core::Broker, now| {
            if broker.disconnect_connection(
                now,
                conn,
                ReasonCode::MAXIMUM_CONNECT_TIME,
                "token expired",
            ) {
                security.count_refusal("jwt_expired_connected");
            }
        });
        // An error means the broker task is gone, and the connection with it.
        let _ = events.send(Event::Admin(AdminCall(call))).await;
    })
    .abort_handle()
}
