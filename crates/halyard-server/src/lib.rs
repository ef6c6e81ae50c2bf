//! The tokio network shell around Halyard's broker core.
//!
//! The core ([`halyard_core::Broker`]) is a single-threaded state machine, so the server is
//! built as actors rather than around a lock:
//!
//! - one **broker task** owns the `Broker`. Connection tasks send it events over one bounded
//!   channel (a connection sends every packet decoded from one read as one message); it feeds
//!   them to the core, drains [`halyard_core::Output`]s and encodes each connection's packets
//!   of the drain into one buffer. A plain TCP connection whose writer is idle gets that
//!   buffer written to its socket right there (no wake-up of its task); otherwise the buffer
//!   goes to the connection's writer. It also sleeps until the core's next deadline
//!   (keep-alive, will delay, expiry).
//! - one **connection task** per socket reads into a buffer, decodes every complete packet,
//!   and writes what the broker task queued for it (what a socket did not take at once, TLS
//!   and WebSocket traffic, closes) with one `write_all` per batch. An idle plain TCP
//!   connection parks: its task ends and its socket waits in the parker's own `epoll` set
//!   until there is traffic, when a new task takes it up (see `park.rs`).
//!
//! Slow consumers are bounded: each connection counts the bytes queued for it but not yet
//! written, and above [`ServerConfig::max_outbound_buffer`] QoS 0 PUBLISH packets for it are
//! dropped (and counted). QoS 1/2 traffic is already bounded by the core's in-flight window and
//! is never dropped here.

#![forbid(unsafe_code)]

mod auth;
mod auth_chain;
mod auth_session;
mod blocking;
mod broker_task;
mod claim_acl;
pub mod cluster;
mod connection;
mod connection_auth;
mod connection_io;
mod connection_log;
mod connection_settings;
mod constant_time;
mod disk_probe;
mod dispatch;
mod enhanced_auth;
mod event;
mod handshake;
mod http;
mod http_auth;
mod inbound_budget;
pub mod jwt;
mod link;
mod metrics;
mod pacing;
mod park;
pub mod scram;
mod tls;
mod transport;
mod ws;

pub use auth::{hash_password, scram_entry, AuthConfig, PasswordFile, Security, SecurityError};
pub use auth_chain::{AuthSource, DEFAULT_CHAIN};
pub use http::HttpConfig;
pub use http_auth::HttpAuthConfig;
pub use jwt::JwtConfig;
pub use park::memory_release_round;
pub use transport::{
    AdmissionCounters, AdmissionStats, ConnectionLimits, ListenerConfig, ListenerKind, ReloadHandle,
};

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use halyard_core::store::StoreError;
use halyard_core::{Broker, BrokerConfig, ConnectionId};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, Notify};
use tracing::{debug, info, info_span, warn, Instrument};

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

/// Default of [`ServerConfig::memory_budget`]: 256 MiB holds about 650,000 queued small
/// messages (about 340 bytes each, as the core counts them), far beyond what a healthy broker queues, and stays well inside the memory of a
/// small VM or container; a fixed figure rather than a share of the machine's memory, so a
/// broker behaves the same on every host (and in a container, where the host's figure lies).
pub const DEFAULT_MEMORY_BUDGET: usize = 256 * 1024 * 1024;

/// Default of [`ServerConfig::park_idle_after`]: long against the hand-off a parked
/// connection costs when it wakes, short against how long IoT connections stay silent.
pub const DEFAULT_PARK_IDLE_AFTER: Duration = Duration::from_secs(2);

/// Everything the server needs to know; every field has a default (see [`ServerConfig::default`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerConfig {
    /// Addresses to accept MQTT over TCP on. Port 0 picks a free port; see
    /// [`Server::local_addrs`] for what was bound. Default: `127.0.0.1:1883` and
    /// `[::1]:1883`, this machine only (the binary explains how to open it).
    pub listeners: Vec<SocketAddr>,
    /// One info line per client connect (client id, address, protocol, clean start,
    /// keep-alive) and disconnect (why). Default: on.
    pub log_connections: bool,
    /// A socket that has not sent a complete CONNECT within this time is closed, so that idle
    /// or half-open sockets cannot hold resources. Default: 10 s.
    pub connect_timeout: Duration,
    /// Bytes that may be queued for one connection but not yet written before QoS 0 PUBLISH
    /// packets to it are dropped. Default: 1 MiB.
    pub max_outbound_buffer: usize,
    /// Bytes of decoded packets that connections may have sent to the broker task and it has
    /// not handled yet; one connection may hold a sixteenth of it (at least 16 KiB) before
    /// its reads wait. Default: 16 MiB.
    pub event_queue_bytes: usize,
    /// Bytes of memory for messages: what all sessions hold, queued and in flight
    /// ([`Broker::held_bytes`]), the event channel and a sixteenth for what nobody counts;
    /// past it publishers are paced (see `pacing.rs`); 0 = no budget. Default: 256 MiB.
    pub memory_budget: usize,
    /// Limits and switches of the broker core.
    pub broker: BrokerConfig,
    /// A plain TCP connection that has sent nothing for between one and two times this long
    /// parks: it gives up its task and reactor registration (about 1 KB) until it has traffic
    /// again, which delays its first packet then (a PINGREQ round trip on loopback: 145 us
    /// median, against 8-11 us awake). `None` = never. Default: 2 s.
    pub park_idle_after: Option<Duration>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listeners: vec![
                SocketAddr::from(([127, 0, 0, 1], 1883)),
                SocketAddr::from(([0, 0, 0, 0, 0, 0, 0, 1], 1883)),
            ],
            log_connections: true,
            connect_timeout: Duration::from_secs(10),
            max_outbound_buffer: 1024 * 1024,
            event_queue_bytes: inbound_budget::DEFAULT_EVENT_QUEUE_BYTES,
            memory_budget: DEFAULT_MEMORY_BUDGET,
            broker: BrokerConfig::default(),
            park_idle_after: Some(DEFAULT_PARK_IDLE_AFTER),
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
    // The cause is the `source` only: printed with `{:#}` it would otherwise appear twice.
    #[error("cannot listen on {addr}")]
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

impl Server {
    /// Makes this server a node of the cluster `coordinator` runs (which must have been
    /// started first): its broker should be built with [`halyard_core::BrokerParts::replicated`].
    pub fn join_cluster(&mut self, coordinator: Arc<halyard_cluster::Coordinator>) {
        self.ops.cluster = Some(coordinator);
    }
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
    /// closed, waiting at most about two seconds, and the future returns. A cluster node
    /// drains first (sessions moved, forwards acknowledged; see `cluster::drain`).
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), ServerError> {
        let Server {
            listeners,
            config,
            mut broker,
            mut ops,
            mut transports,
        } = self;
        let mqtt_addrs: Vec<SocketAddr> = listeners.iter().map(|(_, addr)| *addr).collect();
        let (event_tx, event_rx) = mpsc::channel(EVENT_CHANNEL_CAPACITY);
        let (acks_tx, acks_rx) = mpsc::channel(EVENT_CHANNEL_CAPACITY);
        let inbound = Arc::new(inbound_budget::InboundBudget::new(config.event_queue_bytes));
        let parker = config.park_idle_after.and_then(|after| {
            let gauge = ops.metrics.connections_parked.clone();
            let runtime = tokio::runtime::Handle::current();
            park::Parker::start(after, runtime, gauge, event_tx.clone())
                .map_err(
                    |error| warn!(%error, "cannot start the parker; idle connections stay awake"),
                )
                .ok()
        });
        let task_ops = broker_task::TaskOps {
            metrics: Arc::clone(&ops.metrics),
            sys_interval: ops.sys_interval,
            written: Some(event_tx.downgrade()),
            parker: parker.clone(),
            cluster: ops.cluster.clone().map(|coordinator| {
                cluster::ClusterDriver::start(
                    coordinator,
                    event_tx.clone(),
                    Arc::new(cluster::SystemClock),
                    &mut broker,
                )
            }),
            log_connections: config.log_connections,
            inbound: Arc::clone(&inbound),
            memory_budget: config.memory_budget,
        };
        let (stop_tx, stop_rx) = oneshot::channel();
        let mut broker_task = tokio::spawn(
            broker_task::run(
                broker,
                broker_task::Lanes {
                    acks: acks_rx,
                    main: event_rx,
                },
                stop_rx,
                config.max_outbound_buffer,
                task_ops,
            )
            .instrument(info_span!("broker")),
        );

        transports
            .security
            .attach_metrics(ops.metrics.auth_refused.clone());
        let settings = Arc::new(ConnectionSettings {
            connect_timeout: config.connect_timeout,
            max_packet_size: config.broker.max_packet_size,
            security: Arc::clone(&transports.security),
            parker: parker.clone(),
            inbound,
            acks: Some(acks_tx),
        });
        if let Some(parker) = &parker {
            parker.set_settings(&settings);
        }
        let _stop_parker = parker.map(park::StopOnDrop);
        let tracker = Arc::new(ConnectionTracker::default());
        let extra_listeners = transports.take_bound();
        let acceptors: Vec<_> = listeners
            .into_iter()
            .map(|(listener, local)| (listener, transports.plain(local)))
            .chain(extra_listeners)
            .map(|(listener, ctx)| {
                tokio::spawn(accept_loop(
                    listener,
                    ctx,
                    Arc::clone(&settings),
                    event_tx.clone(),
                    Arc::clone(&tracker),
                ))
            })
            .collect();
        let ready = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let http_task =
            http::HttpTask::new(&mut ops, event_tx.clone(), mqtt_addrs, Arc::clone(&ready))
                .map(|task| tokio::spawn(task.run().instrument(info_span!("http"))));

        tokio::pin!(shutdown);
        let broker_failure = tokio::select! {
            () = &mut shutdown => None,
            joined = &mut broker_task => Some(broker_error(joined)),
        };
        ready.store(false, Ordering::Release);
        if let Some(task) = &http_task {
            task.abort();
        }
        for acceptor in &acceptors {
            acceptor.abort();
        }
        if let Some(error) = broker_failure {
            // Without the broker task every connection's writer ends, and its task with it.
            return Err(error);
        }

        if let Some(coordinator) = ops.cluster.as_deref() {
            cluster::drain(coordinator, &event_tx).await;
        }
        info!("shutting down");
        // Ignored error: the broker task can only be gone here if it just failed, which the
        // join below reports.
        let _ = stop_tx.send(());
        drop(event_tx);
        let drained = tokio::time::timeout(SHUTDOWN_GRACE, tracker.closed()).await;
        if drained.is_err() {
            // They end when the runtime does; the broker has already said goodbye to them.
            warn!(
                remaining = tracker.live(),
                "connections did not close in time; leaving them to the runtime"
            );
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

/// Accepts sockets on one listener and starts each connection's task right here: on the
/// accepting worker, without a hop through another task (each hop was a cross-thread wake-up
/// per connect).
async fn accept_loop(
    listener: TcpListener,
    ctx: Arc<transport::ListenerCtx>,
    settings: Arc<ConnectionSettings>,
    events: mpsc::Sender<event::Event>,
    tracker: Arc<ConnectionTracker>,
) {
    let local = ctx.local();
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                spawn_connection(stream, peer, Arc::clone(&ctx), &settings, &events, &tracker);
            }
            Err(error) => {
                warn!(%local, %error, "accept failed");
                tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
            }
        }
    }
}

/// Counts live connection tasks, so that shutdown can wait for them to flush and close. A
/// counter rather than a `JoinSet`: a set entry per connection cost 64 bytes (memory per idle
/// connection is a budget), the counter's guard costs 8.
#[derive(Debug, Default)]
struct ConnectionTracker {
    live: AtomicUsize,
    all_closed: Notify,
}

impl ConnectionTracker {
    /// Counts one more connection until the returned guard is dropped.
    fn track(self: &Arc<Self>) -> TrackedConnection {
        self.live.fetch_add(1, Ordering::AcqRel);
        TrackedConnection(Arc::clone(self))
    }

    /// Connections still open.
    fn live(&self) -> usize {
        self.live.load(Ordering::Acquire)
    }

    /// Completes once no connection is open.
    async fn closed(&self) {
        loop {
            let notified = self.all_closed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.live() == 0 {
                return;
            }
            notified.await;
        }
    }
}

/// Held by a connection for its whole life; see [`ConnectionTracker`].
pub(crate) struct TrackedConnection(Arc<ConnectionTracker>);

impl Drop for TrackedConnection {
    fn drop(&mut self) {
        if self.0.live.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.all_closed.notify_waiters();
        }
    }
}

/// Source of [`ConnectionId`]s: process-wide, so ids stay unique even with several servers
/// (or test instances) in one process, and never reused.
static NEXT_CONNECTION_ID: AtomicU64 = AtomicU64::new(1);

/// Starts the task of one accepted socket inside its own tracing span.
fn spawn_connection(
    stream: TcpStream,
    peer: SocketAddr,
    ctx: Arc<transport::ListenerCtx>,
    settings: &Arc<ConnectionSettings>,
    events: &mpsc::Sender<event::Event>,
    tracker: &Arc<ConnectionTracker>,
) {
    let conn: ConnectionId = NEXT_CONNECTION_ID.fetch_add(1, Ordering::Relaxed);
    let span = info_span!("conn", id = conn, remote = %peer, client_id = tracing::field::Empty);
    let _entered = span.enter();
    // Debug, not info: one line per accept is thousands of lines a second under a connect burst.
    debug!("accepted");
    if let Err(error) = stream.set_nodelay(true) {
        warn!(%error, "cannot set TCP_NODELAY");
    }
    // Released when the connection ends, which may be in a later task (see `park.rs`).
    let tracked = tracker.track();
    let task = transport::serve_accepted(
        stream,
        peer,
        ctx,
        conn,
        Arc::clone(settings),
        events.clone(),
        tracked,
    );
    // A disabled span (the usual case: it is info level, and per-connection events log at
    // debug) is not attached: `Instrumented` would add 40 bytes to every connection's task.
    if span.is_disabled() {
        tokio::spawn(task);
    } else {
        tokio::spawn(task.instrument(span.clone()));
    }
}
