//! Listener kinds (TCP, TLS, WebSocket, WebSocket over TLS), connection admission limits,
//! and the reload handle for SIGHUP.
//!
//! Every accepted socket passes [`ListenerCtx::admit`] first (global and per-listener
//! connection caps, connection rate per source IP); then the transport handshake runs within
//! the connect timeout (so a peer trickling a TLS or HTTP handshake cannot hold a slot
//! longer than a silent TCP peer could); then the ordinary connection task serves the byte
//! stream, whatever carries it.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use halyard_codec::{decode, encode, ConnAck, DecodeContext, Packet, ReasonCode};
use halyard_core::ConnectionId;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::timeout;
use tracing::{info, warn};

use crate::auth::{Security, SecurityError};
use crate::connection::{self, ConnectionSettings};
use crate::event::Event;
use crate::tls::{certificate_identity, TlsFiles, TlsHandle};
use crate::{Server, ServerError};

/// How a listener carries MQTT.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ListenerKind {
    /// Plain TCP.
    Tcp,
    /// TLS over TCP.
    Tls,
    /// WebSocket over TCP.
    Ws,
    /// WebSocket over TLS.
    Wss,
}

impl ListenerKind {
    /// The name used in configuration and in the `halyard <kind> listening on` line.
    pub fn name(self) -> &'static str {
        match self {
            ListenerKind::Tcp => "tcp",
            ListenerKind::Tls => "tls",
            ListenerKind::Ws => "ws",
            ListenerKind::Wss => "wss",
        }
    }

    fn uses_tls(self) -> bool {
        matches!(self, ListenerKind::Tls | ListenerKind::Wss)
    }
}

/// One `[[listener]]` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerConfig {
    /// Transport.
    pub kind: ListenerKind,
    /// Address to bind; port 0 picks a free port.
    pub address: SocketAddr,
    /// PEM certificate chain (`tls`, `wss`).
    pub cert_file: Option<PathBuf>,
    /// PEM private key (`tls`, `wss`).
    pub key_file: Option<PathBuf>,
    /// PEM CA certificates: when set, clients must present a certificate it signed.
    pub client_ca_file: Option<PathBuf>,
    /// Use the client certificate's Common Name (or first Subject Alternative Name) as the
    /// MQTT user name; such clients need no password. Requires `client_ca_file`.
    pub use_identity_as_username: bool,
    /// HTTP path of the WebSocket endpoint (`ws`, `wss`).
    pub path: String,
    /// Most connections open at once on this listener; 0 = no limit of its own.
    pub max_connections: usize,
}

impl ListenerConfig {
    /// A listener of `kind` on `address` with every option at its default.
    pub fn new(kind: ListenerKind, address: SocketAddr) -> ListenerConfig {
        ListenerConfig {
            kind,
            address,
            cert_file: None,
            key_file: None,
            client_ca_file: None,
            use_identity_as_username: false,
            path: "/mqtt".to_owned(),
            max_connections: 0,
        }
    }
}

/// Server-wide connection admission limits.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// Most connections open at once over all listeners; 0 = no limit.
    pub max_connections: usize,
    /// Most new connections per second from one IP address; 0 = no limit.
    pub max_connection_rate_per_ip: u32,
}

/// Counters of refused connections, for metrics and logs.
#[derive(Debug, Default)]
pub struct AdmissionStats {
    /// Refused because a connection cap (global or per listener) was reached.
    pub refused_max_connections: AtomicU64,
    /// Refused because their source IP opened connections too fast.
    pub refused_connection_rate: AtomicU64,
    /// TLS or WebSocket handshakes that failed or timed out.
    pub failed_handshakes: AtomicU64,
}

/// State shared by every listener of a server.
#[derive(Debug, Default)]
struct Admission {
    limits: ConnectionLimits,
    active: AtomicUsize,
    /// Connections per source IP in the current one-second window.
    rates: Mutex<HashMap<IpAddr, (Instant, u32)>>,
    /// Refusals currently reading a CONNECT to answer it (bounded, see `refuse`).
    refusing: AtomicUsize,
    stats: AdmissionStats,
}

/// Entries kept in the per-IP rate table before stale ones are swept.
const RATE_TABLE_SWEEP: usize = 4096;

/// Refusals that may wait for a CONNECT at once to answer it with a reason code; beyond
/// this (a flood) sockets are closed at once.
const MAX_REFUSING: usize = 64;

/// How long a refused socket may take to send its CONNECT.
const REFUSAL_WAIT: Duration = Duration::from_secs(1);

/// Why a socket was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refused {
    MaxConnections,
    ConnectionRate,
}

impl Refused {
    /// CONNACK code: MQTT 5 0x97 Quota exceeded / 0x9F Connection rate exceeded; 3.x has
    /// only 0x03 Server unavailable for both.
    fn code(self, v5: bool) -> ReasonCode {
        match (self, v5) {
            (Refused::MaxConnections, true) => ReasonCode::QUOTA_EXCEEDED,
            (Refused::ConnectionRate, true) => ReasonCode::CONNECTION_RATE_EXCEEDED,
            (_, false) => ReasonCode::V3_SERVER_UNAVAILABLE,
        }
    }
}

/// Releases a connection slot when the connection ends.
struct Slot {
    ctx: Arc<ListenerCtx>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.ctx.active.fetch_sub(1, Ordering::Relaxed);
        self.ctx.admission.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Everything a connection accepted on one listener needs to know about it.
#[derive(Debug)]
pub(crate) struct ListenerCtx {
    kind: ListenerKind,
    local: SocketAddr,
    tls: Option<Arc<TlsHandle>>,
    use_identity_as_username: bool,
    path: String,
    max_connections: usize,
    active: AtomicUsize,
    admission: Arc<Admission>,
}

impl ListenerCtx {
    /// The bound address.
    pub(crate) fn local(&self) -> SocketAddr {
        self.local
    }

    /// Takes a connection slot, or says why not.
    fn admit(self: &Arc<Self>, ip: IpAddr, now: Instant) -> Result<Slot, Refused> {
        let admission = &self.admission;
        let rate = admission.limits.max_connection_rate_per_ip;
        if rate > 0 {
            let mut rates = admission
                .rates
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if rates.len() >= RATE_TABLE_SWEEP {
                rates.retain(|_, (start, _)| now.duration_since(*start) < Duration::from_secs(1));
            }
            let entry = rates.entry(ip).or_insert((now, 0));
            if now.duration_since(entry.0) >= Duration::from_secs(1) {
                *entry = (now, 0);
            }
            entry.1 += 1;
            if entry.1 > rate {
                return Err(Refused::ConnectionRate);
            }
        }
        let global = admission.active.fetch_add(1, Ordering::Relaxed) + 1;
        let local = self.active.fetch_add(1, Ordering::Relaxed) + 1;
        let slot = Slot {
            ctx: Arc::clone(self),
        };
        let max = admission.limits.max_connections;
        if (max > 0 && global > max) || (self.max_connections > 0 && local > self.max_connections) {
            drop(slot);
            return Err(Refused::MaxConnections);
        }
        Ok(slot)
    }
}

/// The server's security and transport state (a field of [`Server`]).
#[derive(Debug, Default)]
pub(crate) struct Transports {
    /// Password database and ACL.
    pub(crate) security: Arc<Security>,
    /// Listeners from [`Server::bind_listeners`], not yet serving.
    bound: Vec<(TcpListener, Arc<ListenerCtx>)>,
    /// What they are, for [`Server::listener_addrs`].
    described: Vec<(ListenerKind, SocketAddr)>,
    /// TLS configurations to reload on SIGHUP.
    tls: Vec<Arc<TlsHandle>>,
    admission: Arc<Admission>,
}

impl Transports {
    /// The context of a plain TCP listener from the `listen` list.
    pub(crate) fn plain(&self, local: SocketAddr) -> Arc<ListenerCtx> {
        Arc::new(ListenerCtx {
            kind: ListenerKind::Tcp,
            local,
            tls: None,
            use_identity_as_username: false,
            path: String::new(),
            max_connections: 0,
            active: AtomicUsize::new(0),
            admission: Arc::clone(&self.admission),
        })
    }

    /// The listeners bound by [`Server::bind_listeners`], handed over to serve.
    pub(crate) fn take_bound(&mut self) -> Vec<(TcpListener, Arc<ListenerCtx>)> {
        std::mem::take(&mut self.bound)
    }
}

/// Re-reads certificates, the password file and the ACL file of a running server (SIGHUP).
#[derive(Debug, Clone)]
pub struct ReloadHandle {
    security: Arc<Security>,
    tls: Vec<Arc<TlsHandle>>,
}

impl ReloadHandle {
    /// Reloads everything it can. Each file that fails keeps its previous version in force;
    /// the errors are returned (and logged here) so the operator sees what was rejected.
    /// Connected clients are not disturbed.
    pub fn reload(&self) -> Vec<SecurityError> {
        let mut errors = self.security.reload();
        for tls in &self.tls {
            match tls.reload() {
                Ok(()) => info!(cert = %tls.cert_file().display(), "TLS certificate reloaded"),
                Err(error) => errors.push(error),
            }
        }
        for error in &errors {
            warn!(%error, "reload rejected this file; the previous version stays in force");
        }
        errors
    }
}

impl Server {
    /// Installs authentication and authorization: CONNECTs are checked against the password
    /// file, and the broker core consults the ACL.
    pub fn set_security(&mut self, security: Arc<Security>) {
        self.broker.set_authorizer(security.authorizer());
        self.transports.security = security;
    }

    /// Sets the server-wide connection limits (before [`Server::run`]).
    pub fn set_connection_limits(&mut self, limits: ConnectionLimits) {
        // Not yet shared with any listener task: the bound contexts are rebuilt below.
        let admission = Arc::new(Admission {
            limits,
            ..Admission::default()
        });
        for (_, ctx) in &mut self.transports.bound {
            if let Some(ctx) = Arc::get_mut(ctx) {
                ctx.admission = Arc::clone(&admission);
            }
        }
        self.transports.admission = admission;
    }

    /// Binds `[[listener]]` entries in addition to the `listen` addresses, loading their
    /// TLS files; fails naming the address or the file.
    pub async fn bind_listeners(
        &mut self,
        listeners: &[ListenerConfig],
    ) -> Result<(), ServerError> {
        for spec in listeners {
            let tls = if spec.kind.uses_tls() {
                let (Some(cert_file), Some(key_file)) = (&spec.cert_file, &spec.key_file) else {
                    return Err(ServerError::Security(SecurityError::Tls(format!(
                        "{} listener {} needs cert_file and key_file",
                        spec.kind.name(),
                        spec.address
                    ))));
                };
                let handle = Arc::new(TlsHandle::load(TlsFiles {
                    cert_file: cert_file.clone(),
                    key_file: key_file.clone(),
                    client_ca_file: spec.client_ca_file.clone(),
                })?);
                self.transports.tls.push(Arc::clone(&handle));
                Some(handle)
            } else {
                None
            };
            if spec.use_identity_as_username && spec.client_ca_file.is_none() {
                return Err(ServerError::Security(SecurityError::Tls(format!(
                    "listener {}: use_identity_as_username needs client_ca_file",
                    spec.address
                ))));
            }
            let addr = spec.address;
            let bind_error = |source| ServerError::Bind { addr, source };
            let listener = TcpListener::bind(addr).await.map_err(bind_error)?;
            let local = listener.local_addr().map_err(bind_error)?;
            info!(%local, kind = spec.kind.name(), "listening");
            let ctx = Arc::new(ListenerCtx {
                kind: spec.kind,
                local,
                tls,
                use_identity_as_username: spec.use_identity_as_username,
                path: spec.path.clone(),
                max_connections: spec.max_connections,
                active: AtomicUsize::new(0),
                admission: Arc::clone(&self.transports.admission),
            });
            self.transports.described.push((spec.kind, local));
            self.transports.bound.push((listener, ctx));
        }
        Ok(())
    }

    /// The `[[listener]]` entries actually bound, in configuration order (the `listen`
    /// addresses are [`Server::local_addrs`]).
    pub fn listener_addrs(&self) -> Vec<(ListenerKind, SocketAddr)> {
        self.transports.described.clone()
    }

    /// A handle that reloads certificates, passwords and ACL while the server runs.
    pub fn reload_handle(&self) -> ReloadHandle {
        ReloadHandle {
            security: Arc::clone(&self.transports.security),
            tls: self.transports.tls.clone(),
        }
    }

    /// Counters of refused connections and failed handshakes. Take it after
    /// [`Server::set_connection_limits`], which starts a fresh set.
    pub fn admission_counters(&self) -> AdmissionCounters {
        AdmissionCounters(Arc::clone(&self.transports.admission))
    }
}

/// Read access to the admission counters of a running server.
#[derive(Debug, Clone)]
pub struct AdmissionCounters(Arc<Admission>);

impl AdmissionCounters {
    /// The counters.
    pub fn stats(&self) -> &AdmissionStats {
        &self.0.stats
    }
}

/// Serves one accepted socket: admission, transport handshake, then the connection task.
///
/// Not an `async fn`: admission runs here, synchronously, and the future returned for a
/// plain TCP connection is the connection's own plus its slot. An `async fn` would keep its
/// arguments (stream, peer address, ...) and the refusal path's state inside every
/// connection's task for the connection's whole life (memory per idle connection is a
/// budget; see `connection::tests::idle_futures_stay_small`).
pub(crate) fn serve_accepted(
    stream: TcpStream,
    peer: SocketAddr,
    ctx: Arc<ListenerCtx>,
    conn: ConnectionId,
    settings: Arc<ConnectionSettings>,
    events: mpsc::Sender<Event>,
    tracked: crate::TrackedConnection,
) -> impl std::future::Future<Output = ()> + Send {
    use futures_util::future::Either;
    let slot = match ctx.admit(peer.ip(), Instant::now()) {
        Ok(slot) => slot,
        Err(why) => {
            let stats = &ctx.admission.stats;
            match why {
                Refused::MaxConnections => &stats.refused_max_connections,
                Refused::ConnectionRate => &stats.refused_connection_rate,
            }
            .fetch_add(1, Ordering::Relaxed);
            info!(?why, "connection refused");
            return Either::Left(Box::pin(async move {
                if ctx.kind == ListenerKind::Tcp {
                    refuse(stream, why, &ctx.admission, settings.max_packet_size).await;
                }
                drop(tracked);
            }));
        }
    };
    Either::Right(match ctx.kind {
        ListenerKind::Tcp => {
            let guard: connection::Guard = Box::new((slot, tracked));
            Either::Left(connection::run(stream, conn, settings, events, guard))
        }
        // Boxed, so that TLS and WebSocket state (several KB) is allocated only for those
        // connections: inline, it would size every plain TCP connection's task too (the
        // task of an idle TCP connection went from ~1.7 KB to 13 KB).
        ListenerKind::Ws | ListenerKind::Tls | ListenerKind::Wss => {
            Either::Right(Box::pin(async move {
                serve_wrapped(stream, ctx, conn, settings, events).await;
                drop(slot);
                drop(tracked);
            }))
        }
    })
}

/// The TLS, WebSocket and WebSocket-over-TLS part of [`serve_accepted`].
async fn serve_wrapped(
    stream: TcpStream,
    ctx: Arc<ListenerCtx>,
    conn: ConnectionId,
    settings: Arc<ConnectionSettings>,
    events: mpsc::Sender<Event>,
) {
    let peer = stream.peer_addr().ok();
    let deadline = settings.connect_timeout;
    match ctx.kind {
        ListenerKind::Tcp => {}
        ListenerKind::Ws => {
            let max = settings.max_packet_size as usize;
            match timeout(deadline, crate::ws::accept(stream, &ctx.path, max)).await {
                Ok(Ok(ws)) => {
                    let (reader, writer) = tokio::io::split(ws);
                    connection::serve(reader, writer, conn, settings, events, None, peer).await;
                }
                Ok(Err(error)) => handshake_failed(&ctx, "WebSocket", &error),
                Err(_) => handshake_failed(&ctx, "WebSocket", &"timed out"),
            }
        }
        ListenerKind::Tls | ListenerKind::Wss => {
            let Some(tls) = &ctx.tls else {
                return;
            };
            let tls = match timeout(deadline, tls.acceptor().accept(stream)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(error)) => return handshake_failed(&ctx, "TLS", &error),
                Err(_) => return handshake_failed(&ctx, "TLS", &"timed out"),
            };
            let identity = if ctx.use_identity_as_username {
                let identity = tls
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|chain| chain.first())
                    .and_then(|leaf| certificate_identity(leaf));
                if identity.is_none() {
                    // Verified, but nothing to use as a name: refuse rather than admit
                    // the client anonymously.
                    return handshake_failed(&ctx, "TLS", &"client certificate has no CN or SAN");
                }
                identity
            } else {
                None
            };
            if ctx.kind == ListenerKind::Tls {
                let (reader, writer) = tokio::io::split(tls);
                connection::serve(reader, writer, conn, settings, events, identity, peer).await;
            } else {
                let max = settings.max_packet_size as usize;
                match timeout(deadline, crate::ws::accept(tls, &ctx.path, max)).await {
                    Ok(Ok(ws)) => {
                        let (reader, writer) = tokio::io::split(ws);
                        connection::serve(reader, writer, conn, settings, events, identity, peer)
                            .await;
                    }
                    Ok(Err(error)) => handshake_failed(&ctx, "WebSocket", &error),
                    Err(_) => handshake_failed(&ctx, "WebSocket", &"timed out"),
                }
            }
        }
    }
}

fn handshake_failed(ctx: &ListenerCtx, what: &str, error: &dyn std::fmt::Display) {
    ctx.admission
        .stats
        .failed_handshakes
        .fetch_add(1, Ordering::Relaxed);
    info!(listener = %ctx.local, %error, "{what} handshake failed");
}

/// Answers a refused TCP socket with CONNACK (reason code per [`Refused::code`]) if its
/// CONNECT arrives within [`REFUSAL_WAIT`], then closes it. Under a flood (more than
/// [`MAX_REFUSING`] refusals waiting) the socket is closed at once instead.
async fn refuse(mut stream: TcpStream, why: Refused, admission: &Admission, max_packet_size: u32) {
    if admission.refusing.fetch_add(1, Ordering::Relaxed) >= MAX_REFUSING {
        admission.refusing.fetch_sub(1, Ordering::Relaxed);
        return;
    }
    let ctx = DecodeContext {
        version: None,
        max_packet_size,
    };
    let mut buf = BytesMut::with_capacity(256);
    let read_connect = async {
        loop {
            match stream.read_buf(&mut buf).await {
                Ok(0) | Err(_) => return None,
                Ok(_) => {}
            }
            match decode(&mut buf, &ctx) {
                Ok(Some(Packet::Connect(connect))) => return Some(connect.protocol),
                Ok(None) => {}
                Ok(Some(_)) | Err(_) => return None,
            }
        }
    };
    if let Ok(Some(version)) = timeout(REFUSAL_WAIT, read_connect).await {
        let ack = Packet::ConnAck(ConnAck {
            code: why.code(version.is_v5()),
            ..ConnAck::default()
        });
        let mut out = BytesMut::new();
        if encode(&ack, version, &mut out).is_ok() {
            let _ = timeout(REFUSAL_WAIT, async {
                let _ = stream.write_all(&out).await;
                let _ = stream.shutdown().await;
            })
            .await;
        }
    }
    admission.refusing.fetch_sub(1, Ordering::Relaxed);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx(limits: ConnectionLimits, max_connections: usize) -> Arc<ListenerCtx> {
        let transports = Transports {
            admission: Arc::new(Admission {
                limits,
                ..Admission::default()
            }),
            ..Transports::default()
        };
        let mut ctx = transports.plain(SocketAddr::from(([127, 0, 0, 1], 1883)));
        if let Some(ctx) = Arc::get_mut(&mut ctx) {
            ctx.max_connections = max_connections;
        }
        ctx
    }

    #[test]
    fn connection_caps_count_open_connections() {
        let ctx = ctx(
            ConnectionLimits {
                max_connections: 2,
                max_connection_rate_per_ip: 0,
            },
            0,
        );
        let ip = IpAddr::from([127, 0, 0, 1]);
        let now = Instant::now();
        let a = ctx.admit(ip, now).expect("first");
        let _b = ctx.admit(ip, now).expect("second");
        assert_eq!(ctx.admit(ip, now).err(), Some(Refused::MaxConnections));
        drop(a);
        assert!(
            ctx.admit(ip, now).is_ok(),
            "a closed connection frees its slot"
        );
        assert_eq!(ctx.admission.active.load(Ordering::Relaxed), 1);

        let per_listener = super::tests::ctx(ConnectionLimits::default(), 1);
        let _only = per_listener.admit(ip, now).expect("first");
        assert_eq!(
            per_listener.admit(ip, now).err(),
            Some(Refused::MaxConnections)
        );
    }

    #[test]
    fn connection_rate_is_per_ip_per_second() {
        let ctx = ctx(
            ConnectionLimits {
                max_connections: 0,
                max_connection_rate_per_ip: 2,
            },
            0,
        );
        let (a, b) = (IpAddr::from([10, 0, 0, 1]), IpAddr::from([10, 0, 0, 2]));
        let now = Instant::now();
        let _first = ctx.admit(a, now).expect("1");
        let _second = ctx.admit(a, now).expect("2");
        assert_eq!(ctx.admit(a, now).err(), Some(Refused::ConnectionRate));
        assert!(
            ctx.admit(b, now).is_ok(),
            "other addresses are not affected"
        );
        let later = now + Duration::from_millis(1001);
        assert!(ctx.admit(a, later).is_ok(), "a new second, a new budget");
    }

    #[test]
    fn refusal_codes() {
        assert_eq!(Refused::MaxConnections.code(true), ReasonCode(0x97));
        assert_eq!(Refused::ConnectionRate.code(true), ReasonCode(0x9F));
        assert_eq!(Refused::MaxConnections.code(false), ReasonCode(0x03));
    }
}
