//! The simulated cluster network: in-memory byte streams between nodes, with a seeded delay
//! on every chunk, partitions and node deaths.
//!
//! Each connection is two `tokio::io::duplex` pipes joined by one relay task per direction.
//! A relay holds each chunk it reads for a random delay before passing it on, so bytes keep
//! their order within a connection (as TCP does) while different connections (raft, the
//! peer link, other peers) overtake one another. Cutting a connection aborts its relays:
//! both ends then see end of stream, as after a reset. Nodes address each other as `n{id}:7000`.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use halyard_cluster::{BoxFuture, BoxStream, Incoming, NodeId, Transport};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio::task::AbortHandle;

/// Bytes buffered per direction of a pipe.
const PIPE_BYTES: usize = 256 * 1024;

/// The port every simulated node's cluster address names (peers must be `host:port`).
const SIM_PORT: u16 = 7000;

/// A node's cluster address on the simulated network.
pub fn address(node: NodeId) -> String {
    format!("n{node}:{SIM_PORT}")
}

struct Connection {
    ends: (NodeId, NodeId),
    relays: [AbortHandle; 2],
}

struct NetState {
    rng: ChaCha8Rng,
    max_delay: Duration,
    listeners: BTreeMap<NodeId, mpsc::UnboundedSender<BoxStream>>,
    /// Pairs (low id, high id) that cannot reach each other.
    cut: BTreeSet<(NodeId, NodeId)>,
    connections: Vec<Connection>,
}

/// The network every simulated node is attached to.
#[derive(Clone)]
pub struct SimNetwork {
    state: Arc<Mutex<NetState>>,
}

impl std::fmt::Debug for SimNetwork {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimNetwork").finish_non_exhaustive()
    }
}

fn pair(a: NodeId, b: NodeId) -> (NodeId, NodeId) {
    (a.min(b), a.max(b))
}

impl SimNetwork {
    /// A network whose chunk delays come from `seed`, each up to `max_delay`.
    pub fn new(seed: u64, max_delay: Duration) -> Self {
        let state = NetState {
            rng: ChaCha8Rng::seed_from_u64(seed),
            max_delay,
            listeners: BTreeMap::new(),
            cut: BTreeSet::new(),
            connections: Vec::new(),
        };
        Self {
            state: Arc::new(Mutex::new(state)),
        }
    }

    fn lock(&self) -> MutexGuard<'_, NetState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Attaches a (re)started node: its incoming connections and its way out.
    pub fn attach(&self, node: NodeId) -> (Box<dyn Incoming>, Arc<dyn Transport>) {
        let (sender, receiver) = mpsc::unbounded_channel();
        self.lock().listeners.insert(node, sender);
        let transport = SimTransport {
            from: node,
            network: self.clone(),
        };
        (Box::new(SimIncoming(receiver)), Arc::new(transport))
    }

    /// A killed node: nothing reaches it and its connections are cut.
    pub fn detach(&self, node: NodeId) {
        let mut state = self.lock();
        state.listeners.remove(&node);
        state.connections.retain(|connection| {
            let involved = connection.ends.0 == node || connection.ends.1 == node;
            if involved {
                connection.relays.iter().for_each(AbortHandle::abort);
            }
            !involved
        });
    }

    /// Splits the nodes into `side` and the rest; connections across are cut.
    pub fn partition(&self, side: &BTreeSet<NodeId>, all: &[NodeId]) {
        let mut state = self.lock();
        for &inside in side {
            for &outside in all.iter().filter(|node| !side.contains(node)) {
                state.cut.insert(pair(inside, outside));
            }
        }
        let cut = state.cut.clone();
        state.connections.retain(|connection| {
            let across = cut.contains(&pair(connection.ends.0, connection.ends.1));
            if across {
                connection.relays.iter().for_each(AbortHandle::abort);
            }
            !across
        });
    }

    /// Every node can reach every other again.
    pub fn heal(&self) {
        self.lock().cut.clear();
    }

    /// Whether a partition is in force.
    pub fn is_partitioned(&self) -> bool {
        !self.lock().cut.is_empty()
    }

    fn connect(&self, from: NodeId, addr: &str) -> io::Result<BoxStream> {
        let refused = || io::Error::new(io::ErrorKind::ConnectionRefused, "unreachable");
        let to: NodeId = addr
            .strip_prefix('n')
            .and_then(|rest| rest.strip_suffix(&format!(":{SIM_PORT}")))
            .and_then(|id| id.parse().ok())
            .ok_or_else(refused)?;
        let mut state = self.lock();
        if state.cut.contains(&pair(from, to)) {
            return Err(refused());
        }
        let listener = state.listeners.get(&to).ok_or_else(refused)?.clone();
        let (client, client_relay) = tokio::io::duplex(PIPE_BYTES);
        let (server, server_relay) = tokio::io::duplex(PIPE_BYTES);
        let (client_read, client_write) = tokio::io::split(client_relay);
        let (server_read, server_write) = tokio::io::split(server_relay);
        let seeds = (state.rng.gen::<u64>(), state.rng.gen::<u64>());
        let max_delay = state.max_delay;
        let forth = tokio::spawn(relay(client_read, server_write, seeds.0, max_delay));
        let back = tokio::spawn(relay(server_read, client_write, seeds.1, max_delay));
        if listener.send(Box::new(server)).is_err() {
            forth.abort();
            back.abort();
            return Err(refused());
        }
        state.connections.push(Connection {
            ends: (from, to),
            relays: [forth.abort_handle(), back.abort_handle()],
        });
        // Forget connections whose relays ended by themselves.
        state
            .connections
            .retain(|connection| !connection.relays.iter().all(AbortHandle::is_finished));
        Ok(Box::new(client))
    }
}

/// Copies one direction of a connection, holding every chunk for a seeded delay.
async fn relay(
    mut from: impl AsyncRead + Unpin,
    mut to: impl AsyncWrite + Unpin,
    seed: u64,
    max_delay: Duration,
) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut buffer = vec![0u8; 16 * 1024];
    loop {
        let read = match from.read(&mut buffer).await {
            Ok(0) | Err(_) => break,
            Ok(read) => read,
        };
        let delay = rng.gen_range(Duration::ZERO..=max_delay);
        tokio::time::sleep(delay).await;
        if to.write_all(&buffer[..read]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}

/// A node's way to its peers.
#[derive(Debug)]
struct SimTransport {
    from: NodeId,
    network: SimNetwork,
}

impl Transport for SimTransport {
    fn connect(&self, addr: &str) -> BoxFuture<'static, io::Result<BoxStream>> {
        let connected = self.network.connect(self.from, addr);
        Box::pin(async move { connected })
    }
}

/// A node's incoming connections.
#[derive(Debug)]
struct SimIncoming(mpsc::UnboundedReceiver<BoxStream>);

impl Incoming for SimIncoming {
    fn accept(&mut self) -> BoxFuture<'_, io::Result<BoxStream>> {
        Box::pin(async move {
            match self.0.recv().await {
                Some(stream) => Ok(stream),
                // Detached: the node is dead and its acceptor is about to be stopped.
                None => std::future::pending().await,
            }
        })
    }
}
