//! The tokio network shell around Halyard's broker core.
//!
//! The core ([`halyard_core::Broker`]) is a single-threaded state machine, so the server is
//! built as actors rather than around a lock:
//!
//! - one **broker task** owns the `Broker`. Connection tasks send it events over one bounded
//!   channel (a connection sends every packet decoded from one read as one message); it feeds
//!   them to the core, drains [`halyard_core::Output`]s and hands each connection one batch per
//!   drain. It also sleeps until the core's next deadline (keep-alive, will delay, expiry).
//! - one **connection task** per socket reads into a reusable buffer, decodes every complete
//!   packet, and writes each ready batch of outbound packets with one `write_all`.
//!
//! Slow consumers are bounded: each connection counts the bytes queued for it but not yet
//! written, and above [`ServerConfig::max_outbound_buffer`] QoS 0 PUBLISH packets for it are
//! dropped (and counted). QoS 1/2 traffic is already bounded by the core's in-flight window and
//! is never dropped here.

mod auth;
mod broker_task;
mod connection;
mod http;
mod metrics;
mod tls;
mod transport;
mod ws;

pub use auth::{hash_password, AuthConfig, PasswordFile, Security, SecurityError};
pub use http::HttpConfig;
pub use transport::{
    AdmissionCounters, AdmissionStats, ConnectionLimits, ListenerConfig, ListenerKind, ReloadHandle,
};

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use halyard_core::store::StoreError;
use halyard_core::{Broker, BrokerConfig, ConnectionId};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;
use tracing::{debug, error, info, info_span, warn, Instrument};

use crate::connection::ConnectionSettings;

/// How long [`Server::run`] waits, after the shutdown signal, for connections to flush their
/// last packets (MQTT 5 DISCONNECT 0x8B) and close before it drops them.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// Capacity of the channel from connection tasks to the broker task. Bounded so that a broker
/// that falls behind makes readers wait, which pushes back on publishers through TCP flow
/// control instead of growing memory.
const EVENT_CHANNEL_CAPACITY: usize = 1024;

/// Pause after a failed `accept` (typically EMFILE: out of file descriptors), so that the
/// accept loop does not spin while the condition lasts.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(100);

/// Everything the server needs to know; every field has a default (see [`ServerConfig::default`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerConfig {
    /// Addresses to accept MQTT over TCP on. Port 0 picks a free port; see
    /// [`Server::local_addrs`] for what was bound. Default: `0.0.0.0:1883`.
    pub listeners: Vec<SocketAddr>,
    /// A socket that has not sent a complete CONNECT within this time is closed, so that idle
    /// or half-open sockets cannot hold resources. Default: 10 s.
    pub connect_timeout: Duration,
    /// Bytes that may be queued for one connection but not yet written before QoS 0 PUBLISH
    /// packets to it are dropped. Default: 1 MiB.
    pub max_outbound_buffer: usize,
    /// Limits and switches of the broker core.
    pub broker: BrokerConfig,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listeners: vec![SocketAddr::from(([0, 0, 0, 0], 1883))],
            connect_timeout: Duration::from_secs(10),
            max_outbound_buffer: 1024 * 1024,
            broker: BrokerConfig::default(),
        }
    }
}

/// Why the server could not start or had to stop.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The configuration names no listener, so the server could never accept a client.
    #[error("no listen address configured")]
    NoListeners,
    /// A listener could not be bound (address in use, permission denied, ...).
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address from the configuration.
        addr: SocketAddr,
        /// What the operating system said.
        #[source]
        source: std::io::Error,
    },
    /// The broker task ended unexpectedly (a panic in the core); the server cannot go on
    /// without it.
    #[error("the broker task failed: {0}")]
    BrokerFailed(String),
    /// A TLS, password or ACL file is unusable.
    #[error(transparent)]
    Security(#[from] SecurityError),
    /// The HTTP admin listener would be reachable from the network without a token.
    #[error("http listener {0} is not loopback: set http.token (or listen on 127.0.0.1)")]
    HttpTokenRequired(SocketAddr),
}

/// A bound, not yet running MQTT server. Binding and running are separate steps so that the
/// caller can learn the real addresses (port 0) before serving.
pub struct Server {
    listeners: Vec<(TcpListener, SocketAddr)>,
    config: ServerConfig,
    broker: Broker,
    /// HTTP listener, metrics and `$SYS` settings (see `http.rs`).
    ops: http::Ops,
    /// Authentication, ACL, TLS and WebSocket listeners, limits (see `transport.rs`).
    transports: transport::Transports,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("listeners", &self.listeners)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Server {
    /// Binds every configured listener, with an in-memory broker built from
    /// `config.broker`; fails, naming the address, if any listener fails.
    pub async fn bind(config: ServerConfig) -> Result<Server, ServerError> {
        let broker = Broker::new(config.broker.clone());
        Server::bind_with(config, broker).await
    }

    /// Like [`Server::bind`], serving `broker` (for example one restored from a durable
    /// store); `config.broker` should be the configuration `broker` was built with.
    pub async fn bind_with(config: ServerConfig, broker: Broker) -> Result<Server, ServerError> {
        if config.listeners.is_empty() {
            return Err(ServerError::NoListeners);
        }
        let mut listeners = Vec::with_capacity(config.listeners.len());
        for &addr in &config.listeners {
            let bind_error = |source| ServerError::Bind { addr, source };
            let listener = TcpListener::bind(addr).await.map_err(bind_error)?;
            let local = listener.local_addr().map_err(bind_error)?;
            info!(%local, "listening");
            listeners.push((listener, local));
        }
        Ok(Server {
            listeners,
            config,
            broker,
            ops: http::Ops::default(),
            transports: transport::Transports::default(),
        })
    }

    /// The addresses actually bound, in configuration order (useful with port 0).
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.listeners.iter().map(|(_, addr)| *addr).collect()
    }

    /// Serves clients until `shutdown` completes, then shuts down gracefully: the broker tells
    /// MQTT 5 clients it is going away (DISCONNECT 0x8B), every connection is flushed and
    /// closed, waiting at most about two seconds, and the future returns.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), ServerError> {
        let Server {
            listeners,
            config,
            broker,
            mut ops,
            mut transports,
        } = self;
        let mqtt_addrs: Vec<SocketAddr> = listeners.iter().map(|(_, addr)| *addr).collect();
        let (event_tx, event_rx) = mpsc::channel(EVENT_CHANNEL_CAPACITY);
        let task_ops = broker_task::TaskOps {
            metrics: Arc::clone(&ops.metrics),
            sys_interval: ops.sys_interval,
            written: Some(event_tx.downgrade()),
        };
        let (stop_tx, stop_rx) = oneshot::channel();
        let mut broker_task = tokio::spawn(
            broker_task::run(
                broker,
                event_rx,
                stop_rx,
                config.max_outbound_buffer,
                task_ops,
            )
            .instrument(info_span!("broker")),
        );

        let (accepted_tx, mut accepted_rx) = mpsc::channel(64);
        let extra_listeners = transports.take_bound();
        let acceptors: Vec<_> = listeners
            .into_iter()
            .map(|(listener, local)| (listener, transports.plain(local)))
            .chain(extra_listeners)
            .map(|(listener, ctx)| tokio::spawn(accept_loop(listener, ctx, accepted_tx.clone())))
            .collect();
        drop(accepted_tx);
        let ready = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let http_task =
            http::HttpTask::new(&mut ops, event_tx.clone(), mqtt_addrs, Arc::clone(&ready))
                .map(|task| tokio::spawn(task.run().instrument(info_span!("http"))));

        let settings = Arc::new(ConnectionSettings {
            connect_timeout: config.connect_timeout,
            max_packet_size: config.broker.max_packet_size,
            security: Arc::clone(&transports.security),
        });
        let mut connections = JoinSet::new();
        tokio::pin!(shutdown);
        let broker_failure = loop {
            tokio::select! {
                () = &mut shutdown => break None,
                joined = &mut broker_task => break Some(broker_error(joined)),
                Some((stream, peer, ctx)) = accepted_rx.recv() => {
                    spawn_connection(&mut connections, stream, peer, ctx, &settings, &event_tx);
                }
                Some(joined) = connections.join_next(), if !connections.is_empty() => {
                    if let Err(error) = joined {
                        error!(%error, "connection task failed");
                    }
                }
            }
        };
        ready.store(false, Ordering::Release);
        if let Some(task) = &http_task {
            task.abort();
        }
        for acceptor in &acceptors {
            acceptor.abort();
        }
        if let Some(error) = broker_failure {
            connections.shutdown().await;
            return Err(error);
        }

        info!("shutting down");
        // Ignored error: the broker task can only be gone here if it just failed, which the
        // join below reports.
        let _ = stop_tx.send(());
        drop(event_tx);
        let drained = tokio::time::timeout(SHUTDOWN_GRACE, async {
            while connections.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            warn!(
                remaining = connections.len(),
                "connections did not close in time; dropping them"
            );
            connections.shutdown().await;
        }
        match broker_task.await {
            Ok(Ok(())) => {
                info!("shutdown complete");
                Ok(())
            }
            joined => Err(broker_error(joined)),
        }
    }
}

/// Turns the end of the broker task into the error [`Server::run`] reports: the task only ends
/// on its own if it panicked or its channel closed, both fatal.
fn broker_error(joined: Result<Result<(), StoreError>, tokio::task::JoinError>) -> ServerError {
    match joined {
        Ok(Ok(())) => ServerError::BrokerFailed("stopped unexpectedly".to_owned()),
        Ok(Err(error)) => ServerError::BrokerFailed(error.to_string()),
        Err(error) => ServerError::BrokerFailed(error.to_string()),
    }
}

/// Accepts sockets on one listener and hands them to [`Server::run`], which owns the set of
/// connection tasks (so that shutdown can wait for all of them).
async fn accept_loop(
    listener: TcpListener,
    ctx: Arc<transport::ListenerCtx>,
    accepted: mpsc::Sender<(TcpStream, SocketAddr, Arc<transport::ListenerCtx>)>,
) {
    let local = ctx.local();
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                if accepted
                    .send((stream, peer, Arc::clone(&ctx)))
                    .await
                    .is_err()
                {
                    return;
                }
            }
            Err(error) => {
                warn!(%local, %error, "accept failed");
                tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
            }
        }
    }
}

/// Source of [`ConnectionId`]s: process-wide, so ids stay unique even with several servers
/// (or test instances) in one process, and never reused.
static NEXT_CONNECTION_ID: AtomicU64 = AtomicU64::new(1);

/// Starts the task of one accepted socket inside its own tracing span.
fn spawn_connection(
    connections: &mut JoinSet<()>,
    stream: TcpStream,
    peer: SocketAddr,
    ctx: Arc<transport::ListenerCtx>,
    settings: &Arc<ConnectionSettings>,
    events: &mpsc::Sender<broker_task::Event>,
) {
    let conn: ConnectionId = NEXT_CONNECTION_ID.fetch_add(1, Ordering::Relaxed);
    let span = info_span!("conn", id = conn, remote = %peer, client_id = tracing::field::Empty);
    let _entered = span.enter();
    // Debug, not info: one line per accept is thousands of lines a second under a connect burst.
    debug!("accepted");
    if let Err(error) = stream.set_nodelay(true) {
        warn!(%error, "cannot set TCP_NODELAY");
    }
    let task = transport::serve_accepted(
        stream,
        peer,
        ctx,
        conn,
        Arc::clone(settings),
        events.clone(),
    );
    // A disabled span (the usual case: it is info level, and per-connection events log at
    // debug) is not attached: `Instrumented` would add 40 bytes to every connection's task.
    if span.is_disabled() {
        connections.spawn(task);
    } else {
        connections.spawn(task.instrument(span.clone()));
    }
}
