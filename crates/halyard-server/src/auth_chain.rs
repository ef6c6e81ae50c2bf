//! Deciding a CONNECT's user name and password: the sources (password file, JWT, HTTP hook)
//! are asked in the configured order (`auth.chain`, default `["file", "jwt", "http"]`), and
//! the first one that knows the client decides, allowing or refusing; the others are not
//! asked. The file knows the users it lists; JWT knows any password shaped like a token;
//! the HTTP hook knows everyone. A client no source knows is refused (0x86), except that an
//! open broker without any source takes the user name as given, as Mosquitto does.
//!
//! Refusals carry a reason label for `halyard_auth_refused_total` and the CONNACK code:
//!
//! | case | MQTT 3.x | MQTT 5 |
//! |---|---|---|
//! | bad password, unknown user, refused token, hook said no or failed | 0x04 | 0x86 |
//! | no user name while anonymous access is off | 0x05 | 0x87 |

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::SystemTime;

use halyard_codec::Connect;
use serde::{Deserialize, Serialize};
use tracing::warn;

use crate::auth::{Refusal, Security};
use crate::claim_acl::ClaimAcl;
use crate::http_auth::{Answer, AuthRequest};
use crate::jwt::JwtVerifier;

/// A source of credentials, as `auth.chain` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthSource {
    /// The password file.
    File,
    /// JWT as the password.
    Jwt,
    /// The HTTP hook's `url`.
    Http,
}

/// The order used when `auth.chain` is not set.
pub const DEFAULT_CHAIN: [AuthSource; 3] = [AuthSource::File, AuthSource::Jwt, AuthSource::Http];

/// What the chain learned about an admitted client.
#[derive(Debug, Default)]
pub(crate) struct Admitted {
    /// When to disconnect the client: its token's `exp` plus the leeway, when a JWT
    /// admitted it and `disconnect_on_expiry` is set.
    pub(crate) expires_at: Option<SystemTime>,
    /// The token's ACL claim.
    pub(crate) acl: Option<ClaimAcl>,
}

/// Why a CONNECT was refused: the CONNACK code and the metrics label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Refused {
    pub(crate) refusal: Refusal,
    pub(crate) reason: &'static str,
}

impl Refused {
    pub(crate) fn bad(reason: &'static str) -> Refused {
        Refused {
            refusal: Refusal::BadCredentials,
            reason,
        }
    }

    pub(crate) fn not_authorized(reason: &'static str) -> Refused {
        Refused {
            refusal: Refusal::NotAuthorized,
            reason,
        }
    }
}

impl Security {
    /// Decides a CONNECT (see the module documentation). `identity` is the user name from
    /// a verified client certificate (`use_identity_as_username`): such a client is
    /// authenticated already and its CONNECT user name is replaced. A JWT's user name claim
    /// replaces the CONNECT's too (which, if given, must be the same).
    pub(crate) async fn admit(
        self: &Arc<Security>,
        connect: &mut Connect,
        identity: Option<&str>,
        peer: Option<SocketAddr>,
    ) -> Result<Admitted, Refused> {
        if let Some(identity) = identity {
            connect.username = Some(identity.to_owned());
            return Ok(Admitted::default());
        }
        if connect.username.is_none() && connect.password.is_none() {
            return if self.config.anonymous_allowed() {
                Ok(Admitted::default())
            } else {
                Err(Refused::not_authorized("anonymous"))
            };
        }
        for source in self.config.chain() {
            let decided = match source {
                AuthSource::File => self.ask_file(connect).await,
                AuthSource::Jwt => self.ask_jwt(connect),
                AuthSource::Http => self.ask_http(connect, peer).await,
            };
            if let Some(decided) = decided {
                return decided;
            }
        }
        let unchecked = connect.username.is_none() || !self.config.has_sources();
        if unchecked && self.config.anonymous_allowed() {
            // Nobody can check the name: taken as given (for ACLs) on an open broker.
            return Ok(Admitted::default());
        }
        if connect.username.is_none() {
            return Err(Refused::not_authorized("anonymous"));
        }
        Err(Refused::bad("unknown_user"))
    }

    /// The password file, if it lists the user; the hash is checked on a blocking thread.
    async fn ask_file(
        self: &Arc<Security>,
        connect: &Connect,
    ) -> Option<Result<Admitted, Refused>> {
        let file = self.passwords()?;
        let user = connect.username.clone()?;
        if !file.contains(&user) {
            return None;
        }
        let Some(password) = connect.password.clone() else {
            return Some(Err(Refused::bad("no_password")));
        };
        let _permit = self.hashing_permit().await;
        let verified = tokio::task::spawn_blocking(move || file.verify(&user, &password)).await;
        Some(match verified {
            Ok(true) => Ok(Admitted::default()),
            Ok(false) => Err(Refused::bad("bad_password")),
            Err(error) => {
                warn!(%error, "password check failed to run");
                Err(Refused::not_authorized("internal_error"))
            }
        })
    }

    /// JWT, if the password looks like a token.
    fn ask_jwt(&self, connect: &mut Connect) -> Option<Result<Admitted, Refused>> {
        let verifier = self.jwt()?;
        let password = connect.password.as_deref()?;
        if !JwtVerifier::looks_like_token(password) {
            return None;
        }
        let token = std::str::from_utf8(password).ok()?;
        let identity = match verifier.verify(token, SystemTime::now()) {
            Ok(identity) => identity,
            Err(error) => {
                warn!(%error, "JWT refused");
                return Some(Err(Refused::bad(error.reason())));
            }
        };
        if connect
            .username
            .as_deref()
            .is_some_and(|name| name != identity.username)
        {
            return Some(Err(Refused::bad("jwt_username_mismatch")));
        }
        if identity.acl.is_some() && connect.client_id.is_empty() {
            // The token ACL is kept by client id; the core would assign one the ACL does not
            // know, and the client would fall through to the other rules.
            return Some(Err(Refused::not_authorized("jwt_acl_without_client_id")));
        }
        connect.username = Some(identity.username);
        Some(Ok(Admitted {
            expires_at: verifier
                .config()
                .disconnect_on_expiry
                .then_some(identity.expires_at + verifier.leeway()),
            acl: identity.acl,
        }))
    }

    /// The HTTP hook, if it has an authentication `url`.
    async fn ask_http(
        &self,
        connect: &Connect,
        peer: Option<SocketAddr>,
    ) -> Option<Result<Admitted, Refused>> {
        let http = self.http.as_ref()?;
        let request = AuthRequest {
            client_id: &connect.client_id,
            username: connect.username.as_deref(),
            password: connect
                .password
                .as_deref()
                .map(|p| String::from_utf8_lossy(p).into_owned()),
            peer_address: peer.map(|addr| addr.to_string()),
            protocol: connect.protocol.level(),
        };
        let answer = http.authenticate(&request).await?;
        Some(if http.allows(answer) {
            Ok(Admitted::default())
        } else if answer == Answer::Failed {
            Err(Refused::bad("http_unavailable"))
        } else {
            Err(Refused::bad("http_denied"))
        })
    }
}
