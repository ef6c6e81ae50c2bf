//! The handshake of a connection: reading the first CONNECT within the connect timeout,
//! authenticating it (the source chain, or a SCRAM-SHA-256 exchange), refusing it, and the
//! AUTH packets of a later re-authentication.

use std::future::pending;

use std::net::SocketAddr;

use bytes::BytesMut;
use halyard_codec::{decode, encode, ConnAck, DecodeContext, Packet};
use halyard_core::ConnectionId;
use tokio::io::AsyncRead;
use tokio::sync::mpsc;
use tokio::time::{timeout_at, Instant};
use tracing::{debug, info, warn, Span};

use crate::auth::Security;
use crate::auth_chain::Refused;

use crate::connection_io::{forward, read_some, ReadEnd, IDLE_READ, MAX_RETAINED_BUFFER};
use crate::connection_settings::ConnectionSettings;
use crate::dispatch::packet_name;
use crate::event::Event;
use crate::inbound_budget::event_weight;
use crate::link::{Batch, BatchSender, Shared};

/// What the reader needs to authenticate the CONNECT.
pub(crate) struct Auth {
    /// The connection's own writer channel, to send a refusing CONNACK without the broker;
    /// dropped once the CONNECT is accepted, so that the writer still notices when the
    /// broker task is gone.
    pub(crate) reply: Option<BatchSender>,
    /// User name from the client certificate, if the listener uses it.
    pub(crate) identity: Option<String>,
    /// The client's address, for the HTTP hook.
    pub(crate) peer: Option<SocketAddr>,
}

/// The reader's state the SCRAM exchange at CONNECT continues with.
pub(crate) struct ConnectInput<'a, R> {
    pub(crate) reader: &'a mut R,
    pub(crate) buf: &'a mut BytesMut,
    pub(crate) ctx: &'a DecodeContext,
    pub(crate) room: &'a mut usize,
    pub(crate) deadline: Instant,
}

/// Authenticates a CONNECT: a SCRAM-SHA-256 exchange when the CONNECT asks for one (reading
/// the client's AUTH from `input`), else the source chain (`auth_chain.rs`; password hashes
/// on a blocking thread). On refusal the CONNACK is queued to the writer with a close, the
/// refusal is counted, and `None` is returned.
pub(crate) async fn authenticate<R: AsyncRead + Unpin>(
    mut connect: Box<halyard_codec::Connect>,
    settings: &ConnectionSettings,
    auth: &mut Auth,
    conn: ConnectionId,
    events: &mpsc::Sender<Event>,
    input: ConnectInput<'_, R>,
) -> Option<Box<halyard_codec::Connect>> {
    let security = &settings.security;
    let identity = auth.identity.take();
    let version = connect.protocol;
    if identity.is_none() && crate::enhanced_auth::wants_scram(security, &connect) {
        return match scram_exchange(&mut connect, security, auth, input).await {
            Ok(user) => {
                security
                    .track(conn, &connect, Default::default(), Some(user), events)
                    .await;
                auth.reply = None;
                Some(connect)
            }
            Err(refused) => refuse(version, refused, auth, security),
        };
    }
    if version.is_v5() && connect.properties.authentication_method.is_some() {
        // Refused before any other check, so the client learns what is wrong.
        let refused = Refused {
            refusal: crate::auth::Refusal::BadMethod,
            reason: "bad_auth_method",
        };
        return refuse(version, refused, auth, security);
    }
    if identity.is_none() && !security.checks_connect() && !security.tracks_connections() {
        auth.reply = None;
        return Some(connect);
    }
    match security
        .admit(&mut connect, identity.as_deref(), auth.peer)
        .await
    {
        Ok(admitted) => {
            security.track(conn, &connect, admitted, None, events).await;
            auth.reply = None;
            Some(connect)
        }
        Err(refused) => refuse(version, refused, auth, security),
    }
}

/// The SCRAM exchange at CONNECT (see `enhanced_auth.rs`): sends AUTH 0x18, reads the
/// client's AUTH within the connect timeout, and returns the authenticated user.
pub(crate) async fn scram_exchange<R: AsyncRead + Unpin>(
    connect: &mut halyard_codec::Connect,
    security: &Security,
    auth: &mut Auth,
    input: ConnectInput<'_, R>,
) -> Result<String, Refused> {
    let (state, challenge) = crate::enhanced_auth::connect_first(security, connect)?;
    let mut wire = BytesMut::new();
    encode(&challenge, connect.protocol, &mut wire)
        .map_err(|_| Refused::not_authorized("scram_malformed"))?;
    if let Some(reply) = &auth.reply {
        let _ = reply.send(Batch {
            wire,
            ..Batch::default()
        });
    }
    let abandoned = Refused::not_authorized("scram_abandoned");
    let answer = loop {
        match decode(input.buf, input.ctx) {
            Ok(Some(packet)) => break packet,
            Ok(None) => {}
            Err(_) => return Err(Refused::not_authorized("scram_malformed")),
        }
        match timeout_at(
            input.deadline,
            read_some(input.reader, input.buf, input.room),
        )
        .await
        {
            Ok(Ok(())) => {}
            Ok(Err(_)) | Err(_) => return Err(abandoned),
        }
    };
    crate::enhanced_auth::connect_final(state, &answer, connect)
}

/// Queues the refusing CONNACK and a close to this connection's writer, and counts it.
pub(crate) fn refuse(
    version: halyard_codec::ProtocolVersion,
    refused: Refused,
    auth: &mut Auth,
    security: &Security,
) -> Option<Box<halyard_codec::Connect>> {
    let code = refused.refusal.code(version.is_v5());
    // The same words as the broker task's refusals (see `connection_log`).
    let named = if version.is_v5() {
        code.to_string()
    } else {
        format!("0x{:02X} {}", code.0, code.v3_connack_name())
    };
    info!(code = %named, reason = refused.reason, "client refused");
    security.count_refusal(refused.reason);
    let ack = Packet::ConnAck(ConnAck {
        code,
        ..ConnAck::default()
    });
    let mut wire = BytesMut::new();
    if let Err(error) = encode(&ack, version, &mut wire) {
        warn!(%error, "cannot encode the refusing CONNACK; closing without it");
    }
    if let Some(reply) = auth.reply.take() {
        let _ = reply.send(Batch {
            wire,
            close: true,
            ..Batch::default()
        });
    }
    None
}

/// Handles the AUTH packets of a re-authentication (see `enhanced_auth.rs`) in order with
/// the packets around them: those before each are forwarded first. Returns the packets
/// after the last one handled, for the caller to forward.
pub(crate) async fn take_reauth(
    conn: ConnectionId,
    settings: &ConnectionSettings,
    events: &mpsc::Sender<Event>,
    packets: Vec<Packet>,
) -> Vec<Packet> {
    let security = &settings.security;
    let mut pending = Vec::new();
    for packet in packets {
        let Packet::Auth(auth) = &packet else {
            pending.push(packet);
            continue;
        };
        let step = crate::enhanced_auth::reauthenticate(security, conn, auth);
        let Some(event) = crate::enhanced_auth::reauth_event(security, conn, step) else {
            pending.push(packet);
            continue;
        };
        if !pending.is_empty() {
            let before = std::mem::take(&mut pending);
            let _ = forward(
                events,
                Event::Packets {
                    conn,
                    packets: before,
                    weight: 0,
                },
            )
            .await;
        }
        let _ = forward(events, event).await;
    }
    pending
}

/// What the reader keeps from the pre-CONNECT phase.
pub(crate) struct Connected {
    /// Bytes read after the CONNECT that do not make a whole packet yet.
    pub(crate) buf: BytesMut,
    /// Framing fixed by the CONNECT.
    pub(crate) ctx: DecodeContext,
    /// Room to reserve before the next read.
    pub(crate) room: usize,
}

/// Reports malformed input to the broker task, which closes the connection; never returns
/// (the write side ends the task).
pub(crate) async fn malformed(
    conn: ConnectionId,
    events: &mpsc::Sender<Event>,
    error: halyard_codec::DecodeError,
) -> ReadEnd {
    info!(%error, "malformed input; the broker will close the connection");
    // Ignored error: without a broker task the write side closes the connection.
    let _ = forward(events, Event::DecodeError { conn, error }).await;
    pending().await
}

/// The reader until the first CONNECT has been authenticated and forwarded (with whatever
/// followed it in the same read). Until then, reads are bounded by the connect timeout.
pub(crate) async fn read_connect<R: AsyncRead + Unpin>(
    reader: &mut R,
    conn: ConnectionId,
    settings: &ConnectionSettings,
    events: &mpsc::Sender<Event>,
    shared: &Shared,
    mut auth: Box<Auth>,
) -> Result<Connected, ReadEnd> {
    let connect_deadline = Instant::now() + settings.connect_timeout;
    let mut ctx = DecodeContext {
        version: None,
        max_packet_size: settings.max_packet_size,
    };
    let mut buf = BytesMut::new();
    let mut room = IDLE_READ;
    loop {
        shared
            .wait_readable(settings.inbound.per_connection())
            .await;
        timeout_at(connect_deadline, read_some(reader, &mut buf, &mut room))
            .await
            .map_err(|_elapsed| ReadEnd::ConnectTimeout)??;

        let mut packets = Vec::new();
        let failure = loop {
            match decode(&mut buf, &ctx) {
                Ok(Some(mut packet)) => {
                    if let Packet::Connect(connect) = packet {
                        // Only the first CONNECT fixes the version; a second one is a protocol
                        // error for the broker to handle, not a reason to reframe.
                        let first = ctx.version.is_none();
                        if first {
                            ctx.version = Some(connect.protocol);
                            shared.set_version(connect.protocol);
                            Span::current().record("client_id", connect.client_id.as_str());
                        }
                        packet = if first {
                            let input = ConnectInput {
                                reader: &mut *reader,
                                buf: &mut buf,
                                ctx: &ctx,
                                room: &mut room,
                                deadline: connect_deadline,
                            };
                            match authenticate(connect, settings, &mut auth, conn, events, input)
                                .await
                            {
                                Some(connect) => Packet::Connect(connect),
                                None => {
                                    // The broker never saw this connection's CONNECT; it
                                    // only has to forget the link.
                                    let _ = events.send(Event::Lost { conn }).await;
                                    return pending().await;
                                }
                            }
                        } else {
                            Packet::Connect(connect)
                        };
                    }
                    debug!(packet = packet_name(&packet), "received");
                    packets.push(packet);
                }
                Ok(None) => break None,
                Err(error) => break Some(error),
            }
        };
        if !packets.is_empty() {
            // Weighed like every later event, so that the connection's acknowledgements
            // cannot overtake its CONNECT (see `takes_ack_lane`).
            let weight = event_weight(&packets, 0);
            let weight = settings.inbound.take(shared, weight).await;
            let event = Event::Packets {
                conn,
                packets,
                weight,
            };
            if events.send(event).await.is_err() {
                return pending().await;
            }
        }
        if let Some(error) = failure {
            return Err(malformed(conn, events, error).await);
        }
        if buf.is_empty() && (room == IDLE_READ || buf.capacity() > MAX_RETAINED_BUFFER) {
            buf = BytesMut::new();
        }
        if ctx.version.is_some() {
            return Ok(Connected { buf, ctx, room });
        }
    }
}
