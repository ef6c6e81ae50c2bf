//! SCRAM-SHA-256 through MQTT 5 enhanced authentication, the server's side, without I/O
//! (the connection task reads and writes; see `connection.rs`).
//!
//! At CONNECT: Authentication Method `SCRAM-SHA-256` with the client-first message as
//! Authentication Data; the server answers AUTH 0x18 with the server-first message; the
//! client sends AUTH 0x18 with the client-final message; the server forwards the CONNECT to
//! the core with the server-final message as its Authentication Data, which the core puts
//! in CONNACK [MQTT-4.12.0-5]. Failures get CONNACK 0x86 (unknown user or wrong proof)
//! or 0x87 (a message that breaks the SCRAM grammar or the exchange, or a packet other
//! than AUTH in the middle) [MQTT-4.12.0-4].
//!
//! Re-authentication: AUTH 0x19 with a new client-first message for the same user, answered
//! AUTH 0x18, then the client-final in AUTH 0x18, answered AUTH 0x00 with the server-final
//! [MQTT-4.12.1-1]. A failure closes the connection with DISCONNECT 0x87 (DISCONNECT may
//! not carry 0x86), or 0x82 for an AUTH that does not fit the exchange [MQTT-4.12.1-2].
//! Other packets flow meanwhile.

use bytes::Bytes;
use halyard_codec::{Auth, Connect, Packet, Properties, ReasonCode};
use halyard_core::ConnectionId;

use crate::auth::Security;
use crate::auth_chain::Refused;
use crate::event::{AdminCall, Event};
use crate::scram::{ScramError, ScramServer, METHOD};

/// Whether `connect` asks for the SCRAM exchange this server runs.
pub(crate) fn wants_scram(security: &Security, connect: &Connect) -> bool {
    connect.protocol.is_v5()
        && connect.properties.authentication_method.as_deref() == Some(METHOD)
        && security.scram_enabled()
}

/// An AUTH of the SCRAM method.
fn scram_auth(reason: ReasonCode, data: String) -> Auth {
    Auth {
        reason,
        properties: Properties {
            authentication_method: Some(METHOD.to_owned()),
            authentication_data: Some(Bytes::from(data)),
            ..Properties::default()
        },
    }
}

/// The refusal for a failed exchange.
fn refused(error: &ScramError) -> Refused {
    if error.is_bad_credentials() {
        Refused::bad("scram_bad_proof")
    } else {
        Refused::not_authorized("scram_malformed")
    }
}

/// The SCRAM data of an AUTH packet of our method in `step`, else `None`.
fn scram_data(auth: &Auth, step: ReasonCode) -> Option<&[u8]> {
    (auth.reason == step && auth.properties.authentication_method.as_deref() == Some(METHOD)).then(
        || {
            auth.properties
                .authentication_data
                .as_deref()
                .unwrap_or_default()
        },
    )
}

/// The first step at CONNECT: the exchange's state and the AUTH 0x18 to send.
pub(crate) fn connect_first(
    security: &Security,
    connect: &Connect,
) -> Result<(ScramServer, Packet), Refused> {
    let data = connect
        .properties
        .authentication_data
        .as_deref()
        .unwrap_or_default();
    let (state, server_first) = ScramServer::start(data, |user| security.scram_credential(user))
        .map_err(|e| refused(&e))?;
    Ok((
        state,
        Packet::Auth(scram_auth(
            ReasonCode::CONTINUE_AUTHENTICATION,
            server_first,
        )),
    ))
}

/// The last step at CONNECT, with the packet the client sent after AUTH 0x18: on success
/// the CONNECT carries the SCRAM user and the server-final message, and the user is
/// returned.
pub(crate) fn connect_final(
    state: ScramServer,
    reply: &Packet,
    connect: &mut Connect,
) -> Result<String, Refused> {
    let Packet::Auth(auth) = reply else {
        return Err(Refused::not_authorized("scram_protocol"));
    };
    let data = scram_data(auth, ReasonCode::CONTINUE_AUTHENTICATION)
        .ok_or(Refused::not_authorized("scram_protocol"))?;
    let user = state.user().to_owned();
    let server_final = state.finish(data).map_err(|e| refused(&e))?;
    if connect.username.as_deref().is_some_and(|name| name != user) {
        return Err(Refused::bad("scram_username_mismatch"));
    }
    connect.username = Some(user.clone());
    connect.password = None;
    connect.properties.authentication_data = Some(Bytes::from(server_final));
    Ok(user)
}

/// What to do with an AUTH packet on a live connection.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Reauth {
    /// Not a connection that authenticated with SCRAM: the core answers (protocol error
    /// [MQTT-4.12.0-7]).
    NotOurs,
    /// Send this AUTH to the client.
    Send(Box<Auth>),
    /// Close with this DISCONNECT reason; the label counts the refusal.
    Disconnect(ReasonCode, &'static str),
}

/// Handles an AUTH packet from `conn` after its CONNACK.
pub(crate) fn reauthenticate(security: &Security, conn: ConnectionId, auth: &Auth) -> Reauth {
    let step = security.connections.with(conn, |entry| {
        let user = entry.scram_user.clone()?;
        Some(match (entry.pending.take(), auth.reason) {
            (None, ReasonCode::REAUTHENTICATE) => {
                let Some(data) = scram_data(auth, ReasonCode::REAUTHENTICATE) else {
                    return Some(Reauth::Disconnect(
                        ReasonCode::PROTOCOL_ERROR,
                        "reauth_protocol",
                    ));
                };
                match ScramServer::start(data, |name| security.scram_credential(name)) {
                    Ok((state, _)) if state.user() != user => {
                        Reauth::Disconnect(ReasonCode::NOT_AUTHORIZED, "reauth_other_user")
                    }
                    Ok((state, server_first)) => {
                        entry.pending = Some(state);
                        Reauth::Send(Box::new(scram_auth(
                            ReasonCode::CONTINUE_AUTHENTICATION,
                            server_first,
                        )))
                    }
                    Err(error) => disconnect_for(&error),
                }
            }
            (Some(state), ReasonCode::CONTINUE_AUTHENTICATION) => {
                let Some(data) = scram_data(auth, ReasonCode::CONTINUE_AUTHENTICATION) else {
                    return Some(Reauth::Disconnect(
                        ReasonCode::PROTOCOL_ERROR,
                        "reauth_protocol",
                    ));
                };
                match state.finish(data) {
                    Ok(server_final) => {
                        Reauth::Send(Box::new(scram_auth(ReasonCode::SUCCESS, server_final)))
                    }
                    Err(error) => disconnect_for(&error),
                }
            }
            _ => Reauth::Disconnect(ReasonCode::PROTOCOL_ERROR, "reauth_protocol"),
        })
    });
    step.flatten().unwrap_or(Reauth::NotOurs)
}

fn disconnect_for(error: &ScramError) -> Reauth {
    if error.is_bad_credentials() {
        Reauth::Disconnect(ReasonCode::NOT_AUTHORIZED, "reauth_bad_proof")
    } else {
        Reauth::Disconnect(ReasonCode::NOT_AUTHORIZED, "reauth_malformed")
    }
}

/// The broker-task event that carries out `step` for `conn` (`None` for
/// [`Reauth::NotOurs`]).
pub(crate) fn reauth_event(
    security: &std::sync::Arc<Security>,
    conn: ConnectionId,
    step: Reauth,
) -> Option<Event> {
    let call: crate::event::AdminFn = match step {
        Reauth::NotOurs => return None,
        Reauth::Send(auth) => Box::new(move |broker, _now| {
            broker.send_auth(conn, *auth);
        }),
        Reauth::Disconnect(reason, label) => {
            let security = std::sync::Arc::clone(security);
            Box::new(move |broker, now| {
                if broker.disconnect_connection(now, conn, reason, "re-authentication failed") {
                    security.count_refusal(label);
                }
            })
        }
    };
    Some(Event::Admin(AdminCall(call)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::connection_auth::ConnectionAuth;
    use crate::scram::ScramClient;

    fn security_with(user: &str, password: &str) -> (Security, tempfile::TempDir) {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("pw");
        let entry = crate::auth::scram_entry(password, 4096).expect("entry");
        std::fs::write(&path, format!("{user}:{entry}\n")).expect("write");
        let security = Security::load(crate::AuthConfig {
            password_file: Some(path),
            ..crate::AuthConfig::default()
        })
        .expect("loads");
        (security, dir)
    }

    fn auth(reason: ReasonCode, data: &str) -> Auth {
        scram_auth(reason, data.to_owned())
    }

    fn data(auth: &Auth) -> &[u8] {
        auth.properties
            .authentication_data
            .as_deref()
            .unwrap_or_default()
    }

    #[test]
    fn reauthentication_runs_both_steps_and_refuses_another_user_or_a_bad_proof() {
        let (security, _dir) = security_with("dev", "pw");
        let track = |conn| {
            security.connections.insert(
                conn,
                ConnectionAuth {
                    client_id: format!("c{conn}"),
                    scram_user: Some("dev".to_owned()),
                    ..ConnectionAuth::default()
                },
                None,
            )
        };
        track(1);
        let (client, first) = ScramClient::new("dev").expect("client");
        let Reauth::Send(server_first) =
            reauthenticate(&security, 1, &auth(ReasonCode::REAUTHENTICATE, &first))
        else {
            panic!("expected AUTH 0x18");
        };
        let (client, last) = client.respond(data(&server_first), "pw").expect("respond");
        let Reauth::Send(done) = reauthenticate(
            &security,
            1,
            &auth(ReasonCode::CONTINUE_AUTHENTICATION, &last),
        ) else {
            panic!("expected AUTH 0x00");
        };
        assert_eq!(done.reason, ReasonCode::SUCCESS);
        client.verify(data(&done)).expect("server proven");

        let (_, other) = ScramClient::new("eve").expect("client");
        assert_eq!(
            reauthenticate(&security, 1, &auth(ReasonCode::REAUTHENTICATE, &other)),
            Reauth::Disconnect(ReasonCode::NOT_AUTHORIZED, "reauth_other_user")
        );
        let (client, first) = ScramClient::new("dev").expect("client");
        let Reauth::Send(server_first) =
            reauthenticate(&security, 1, &auth(ReasonCode::REAUTHENTICATE, &first))
        else {
            panic!("expected AUTH 0x18");
        };
        let (_, last) = client
            .respond(data(&server_first), "wrong")
            .expect("respond");
        assert_eq!(
            reauthenticate(
                &security,
                1,
                &auth(ReasonCode::CONTINUE_AUTHENTICATION, &last)
            ),
            Reauth::Disconnect(ReasonCode::NOT_AUTHORIZED, "reauth_bad_proof")
        );
        assert_eq!(
            reauthenticate(
                &security,
                1,
                &auth(ReasonCode::CONTINUE_AUTHENTICATION, "x")
            ),
            Reauth::Disconnect(ReasonCode::PROTOCOL_ERROR, "reauth_protocol")
        );
        assert_eq!(
            reauthenticate(&security, 2, &auth(ReasonCode::REAUTHENTICATE, "x")),
            Reauth::NotOurs
        );
    }
}
