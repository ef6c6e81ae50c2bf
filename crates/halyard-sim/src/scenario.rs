//! One seeded run: three nodes, scripted clients, faults drawn from the seed, and the
//! invariants after every step.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::Duration;

use halyard_cluster::NodeId;
use halyard_codec::{Packet, QoS};
use halyard_core::{ConnectionId, Output};
use halyard_server::cluster::DriverClock;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::client::{Observation, Role, SimClient};
use crate::clock::SimClock;
use crate::invariants::{Checker, Violation};
use crate::network::SimNetwork;
use crate::node::{data_root, Running};
use crate::readmission::Readmission;
use crate::sabotage::Sabotage;
use crate::trace::{digest_of, Trace};

/// Simulated time per step; the nodes' tasks run while it passes.
const STEP: Duration = Duration::from_millis(10);

/// What a run does besides its seed.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    pub nodes: u64,
    /// Steps with traffic and faults.
    pub steps: u64,
    /// Steps after every fault is repaired, for the persistent subscribers to collect.
    pub settle_steps: u64,
    /// Draw partitions (and heals).
    pub partitions: bool,
    /// Draw kills and restarts (with and without data).
    pub kills: bool,
    /// Subscribers disconnect, reconnect and take over on other nodes; without, a
    /// subscriber only ever reconnects to its first node (waiting while it is dead).
    pub moves: bool,
    /// Longest delay of one chunk on a peer connection.
    pub max_delay: Duration,
    /// Break one invariant on purpose (tests of the checker).
    pub sabotage: Option<Sabotage>,
    /// Print the trace's events as they happen.
    pub print_trace: bool,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            nodes: 3,
            steps: 600,
            settle_steps: 500,
            partitions: true,
            kills: true,
            moves: true,
            max_delay: Duration::from_millis(15),
            sabotage: None,
            print_trace: false,
        }
    }
}

impl Options {
    /// What CI runs on every seed and must pass: partitions and heals, kills and restarts
    /// with and without data, delay and reordering on the peer links, publishers
    /// reconnecting anywhere, subscribers reconnecting to their own node. Subscribers that
    /// move under faults are left to the full profile ([`Options::default`]) until the
    /// cluster passes them (see the README).
    pub fn ci() -> Self {
        Self {
            moves: false,
            ..Self::default()
        }
    }

    /// The moves CI runs on every seed and must pass: subscribers taking their sessions
    /// from node to node (and publishers reconnecting anywhere) with delay and reordering
    /// on the peer links, but no partition and no kill.
    pub fn moving() -> Self {
        Self {
            partitions: false,
            kills: false,
            ..Self::default()
        }
    }
}

/// What a run found.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub seed: u64,
    /// Digest of the run's trace: the same seed gives the same digest.
    pub trace: u64,
    pub events: u64,
    pub violations: Vec<Violation>,
    pub acked: u64,
    pub delivered: u64,
    pub faults: u64,
    /// Nodes restarted with an empty data directory (and readmitted).
    pub wipes: u64,
    /// Persistent subscribers' sessions resumed on another node than their last.
    pub moves: u64,
}

struct Node {
    id: NodeId,
    dir: PathBuf,
    generation: u64,
    /// The incarnation of its data directory, once started on it.
    incarnation: u64,
    running: Option<Running>,
}

struct World {
    seed: u64,
    rng: ChaCha8Rng,
    options: Options,
    clock: SimClock,
    network: SimNetwork,
    nodes: Vec<Node>,
    clients: Vec<SimClient>,
    /// Every connection a client opened: which client and node.
    conns: BTreeMap<ConnectionId, (usize, NodeId)>,
    next_conn: ConnectionId,
    next_message: u64,
    /// Packets for brokers: (node, connection, packet), handed in at the next step.
    inbound: Vec<(NodeId, ConnectionId, Packet)>,
    checker: Checker,
    trace: Trace,
    step: u64,
    acked: u64,
    delivered: u64,
    faults: u64,
    wipes: u64,
    sabotaged: bool,
    /// Per client: the step of its last CONNECT, and the node its session was last on.
    last_connect: BTreeMap<usize, u64>,
    session_node: BTreeMap<usize, NodeId>,
    /// The wiped node being removed and added again; no other disk is lost meanwhile.
    readmission: Option<Readmission>,
}

/// Runs one seed on a fresh current-thread runtime with paused time.
pub fn run(seed: u64, options: Options) -> Outcome {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build();
    match runtime {
        Ok(runtime) => runtime.block_on(simulate(seed, options)),
        Err(error) => panic!("cannot build the simulation's runtime: {error}"),
    }
}

async fn simulate(seed: u64, options: Options) -> Outcome {
    let root = match data_root() {
        Ok(root) => root,
        Err(error) => panic!("cannot create the simulation's data directory: {error}"),
    };
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let network = SimNetwork::new(rng.gen(), options.max_delay);
    let nodes = (1..=options.nodes)
        .map(|id| Node {
            id,
            dir: root.path().join(format!("n{id}")),
            generation: 0,
            incarnation: 0,
            running: None,
        })
        .collect();
    let clients = vec![
        SimClient::new("pub1".into(), Role::Publisher(QoS::AtLeastOnce)),
        SimClient::new("pub2".into(), Role::Publisher(QoS::ExactlyOnce)),
        SimClient::new("sub1".into(), Role::Subscriber { persistent: true }),
        SimClient::new("sub2".into(), Role::Subscriber { persistent: true }),
        SimClient::new("sub3".into(), Role::Subscriber { persistent: false }),
    ];
    let mut world = World {
        seed,
        rng,
        options,
        clock: SimClock::start(),
        network,
        nodes,
        clients,
        conns: BTreeMap::new(),
        next_conn: 1,
        next_message: 1,
        inbound: Vec::new(),
        checker: Checker::default(),
        trace: Trace::new(options.print_trace),
        step: 0,
        acked: 0,
        delivered: 0,
        faults: 0,
        wipes: 0,
        sabotaged: false,
        last_connect: BTreeMap::new(),
        session_node: BTreeMap::new(),
        readmission: None,
    };
    for index in 0..world.nodes.len() {
        world.start_node(index, true).await;
    }
    for _ in 0..options.steps {
        world.act().await;
        world.tick().await;
    }
    world.repair().await;
    for _ in 0..options.settle_steps {
        world.reconnect_persistent();
        world.tick().await;
    }
    world.checker.check_losses();
    for index in 0..world.nodes.len() {
        if let Some(running) = world.nodes[index].running.as_ref() {
            tracing::debug!(node = index + 1, stats = ?running.broker.stats(), "final counters");
        }
        if let Some(running) = world.nodes[index].running.take() {
            running.kill().await;
        }
    }
    Outcome {
        seed,
        trace: world.trace.digest(),
        events: world.trace.events(),
        violations: world.checker.violations.clone(),
        acked: world.acked,
        delivered: world.delivered,
        faults: world.faults,
        wipes: world.wipes,
        moves: world.checker.move_count(),
    }
}

impl World {
    fn alive(&self) -> Vec<NodeId> {
        self.nodes
            .iter()
            .filter(|node| node.running.is_some())
            .map(|node| node.id)
            .collect()
    }

    fn all(&self) -> Vec<NodeId> {
        self.nodes.iter().map(|node| node.id).collect()
    }

    async fn start_node(&mut self, index: usize, keep_data: bool) {
        let seed = self.seed;
        let node = &mut self.nodes[index];
        if !keep_data {
            let _ = std::fs::remove_dir_all(&node.dir);
            self.checker.wiped(node.id, self.step);
            self.wipes += 1;
            self.readmission = Some(Readmission::new(node.id));
        }
        node.generation += 1;
        let entropy = digest_of((seed, node.id, node.generation)) | 1;
        let started = Running::start(
            node.id,
            self.options.nodes,
            &node.dir,
            &self.network,
            self.clock,
            entropy,
        )
        .await;
        match started {
            Ok(running) => {
                node.incarnation = running.coordinator.incarnation();
                node.running = Some(running);
            }
            Err(error) => panic!("seed {seed}: node {} did not start: {error:?}", node.id),
        }
        self.trace.record((self.step, "start", node.id, keep_data));
    }

    async fn kill_node(&mut self, index: usize) {
        let id = self.nodes[index].id;
        if self.nodes[index].running.is_none() {
            return;
        }
        if let Some(readmission) = self.readmission.as_mut() {
            readmission.abandon_on(id).await;
        }
        let Some(running) = self.nodes[index].running.take() else {
            return;
        };
        self.network.detach(id);
        running.kill().await;
        self.trace.record((self.step, "kill", id));
        for client in &mut self.clients {
            if client.conn.is_some_and(|(node, _)| node == id) {
                client.disconnected();
            }
        }
        self.inbound.retain(|(node, _, _)| *node != id);
    }

    /// Draws this step's client actions and faults.
    async fn act(&mut self) {
        for index in 0..self.clients.len() {
            let roll: f64 = self.rng.gen();
            let client = &self.clients[index];
            if client.conn.is_none() {
                if roll < 0.2 {
                    self.connect_client(index);
                }
                continue;
            }
            match client.role {
                Role::Publisher(_) if roll < 0.3 => {
                    let message = self.next_message;
                    if let Some(packet) = self.clients[index].publish(message) {
                        self.next_message += 1;
                        self.send_from(index, packet);
                    }
                }
                Role::Subscriber { .. } if self.options.moves && roll < 0.004 => {
                    self.connect_client(index)
                }
                Role::Subscriber { .. } if self.options.moves && roll < 0.008 => {
                    self.disconnect_client(index)
                }
                _ => {}
            }
        }
        let roll: f64 = self.rng.gen();
        let alive = self.alive();
        let all = self.all();
        if roll < 0.006 && self.options.partitions {
            if self.network.is_partitioned() {
                self.network.heal();
                self.trace.record((self.step, "heal"));
            } else {
                let isolated = all[self.rng.gen_range(0..all.len())];
                self.network.partition(&BTreeSet::from([isolated]), &all);
                self.trace.record((self.step, "partition", isolated));
            }
            self.faults += 1;
        } else if (0.006..0.010).contains(&roll) && self.options.kills {
            if alive.len() == all.len() {
                let index = self.rng.gen_range(0..all.len());
                self.kill_node(index).await;
            } else if let Some(index) = self.nodes.iter().position(|n| n.running.is_none()) {
                let keep_data = self.rng.gen_bool(0.85) || !self.may_lose_disk(index);
                self.start_node(index, keep_data).await;
            }
            self.faults += 1;
        }
    }

    /// Whether node `index` may come back with an empty data directory and be fenced for it:
    /// only while no other wiped node is still being readmitted (two lost disks of three are
    /// beyond raft), and once every other node records its incarnation (a node that does not,
    /// having lagged behind since the start, would take the wiped node's vote as the old
    /// one's; the README: a disk lost before that is not detected).
    fn may_lose_disk(&self, index: usize) -> bool {
        let node = &self.nodes[index];
        self.readmission.is_none()
            && self
                .nodes
                .iter()
                .filter(|other| other.id != node.id)
                .all(|other| {
                    other.running.as_ref().is_some_and(|running| {
                        running.coordinator.status().members.iter().any(|member| {
                            member.id == node.id && member.incarnation == node.incarnation
                        })
                    })
                })
    }

    /// Connects (or takes over: the old connection is left as it is) on a random live node.
    fn connect_client(&mut self, index: usize) {
        let alive = self.alive();
        if alive.is_empty() {
            return;
        }
        let mut node = alive[self.rng.gen_range(0..alive.len())];
        let subscriber = matches!(self.clients[index].role, Role::Subscriber { .. });
        if subscriber && !self.options.moves {
            match self.session_node.get(&index) {
                Some(home) if alive.contains(home) => node = *home,
                Some(_) => return,
                None => {}
            }
        }
        let conn = self.next_conn;
        self.next_conn += 1;
        self.conns.insert(conn, (index, node));
        self.last_connect.insert(index, self.step);
        let packet = self.clients[index].connect(node, conn);
        self.trace.record((self.step, "connect", index, node, conn));
        self.inbound.push((node, conn, packet));
    }

    fn disconnect_client(&mut self, index: usize) {
        if let Some((node, conn)) = self.clients[index].conn {
            let packet = Packet::Disconnect(halyard_codec::Disconnect {
                reason: halyard_codec::ReasonCode::SUCCESS,
                properties: halyard_codec::Properties::default(),
            });
            self.inbound.push((node, conn, packet));
            self.clients[index].disconnected();
            self.trace.record((self.step, "disconnect", index));
        }
    }

    fn send_from(&mut self, index: usize, packet: Packet) {
        if let Some((node, conn)) = self.clients[index].conn {
            self.inbound.push((node, conn, packet));
        }
    }

    /// Every fault repaired: the network healed and every dead node back with its data.
    async fn repair(&mut self) {
        self.network.heal();
        for index in 0..self.nodes.len() {
            if self.nodes[index].running.is_none() {
                self.start_node(index, true).await;
            }
        }
        self.trace.record((self.step, "repair"));
    }

    fn reconnect_persistent(&mut self) {
        for index in 0..self.clients.len() {
            let client = &self.clients[index];
            let idle = client.conn.is_none() && matches!(client.role, Role::Subscriber { .. });
            if idle && self.rng.gen_bool(0.05) {
                self.connect_client(index);
            }
        }
    }

    /// Hands the clients' packets in, steps every node, lets time pass, checks.
    async fn tick(&mut self) {
        self.step += 1;
        tracing::debug!(step = self.step, "simulation step");
        let now = self.clock.clocks().now;
        for (node, conn, packet) in std::mem::take(&mut self.inbound) {
            if let Some(running) = self.running_mut(node) {
                running.broker.handle_packet(now, conn, packet);
            }
        }
        for index in 0..self.nodes.len() {
            let id = self.nodes[index].id;
            let Some(running) = self.nodes[index].running.as_mut() else {
                continue;
            };
            for output in running.step(now) {
                self.deliver_to_client(id, output);
            }
        }
        self.advance_readmission().await;
        tokio::time::sleep(STEP).await;
        self.check();
    }

    async fn advance_readmission(&mut self) {
        let Some(readmission) = self.readmission.as_mut() else {
            return;
        };
        let host = self
            .nodes
            .iter()
            .filter(|node| node.id != readmission.node)
            .find_map(|node| Some((node.id, node.running.as_ref()?.coordinator.clone())));
        if readmission.advance(host).await {
            self.trace
                .record((self.step, "readmitted", readmission.node));
            self.readmission = None;
        }
    }

    fn running_mut(&mut self, id: NodeId) -> Option<&mut Running> {
        self.nodes
            .iter_mut()
            .find(|node| node.id == id)
            .and_then(|node| node.running.as_mut())
    }

    fn deliver_to_client(&mut self, node: NodeId, output: Output) {
        let (conn, packet) = match output {
            Output::Send { conn, packet } => (conn, Some(packet)),
            Output::Close { conn } => (conn, None),
            _ => return,
        };
        let Some(&(index, _)) = self.conns.get(&conn) else {
            return;
        };
        // A connection the client has left (taken over elsewhere) hears nothing more.
        if self.clients[index].conn.map(|(_, current)| current) != Some(conn) {
            return;
        }
        let Some(packet) = packet else {
            self.clients[index].disconnected();
            self.trace.record((self.step, "closed", index, conn));
            return;
        };
        self.trace.record((self.step, index, format!("{packet:?}")));
        let (answers, seen) = self.clients[index].receive(packet);
        for answer in answers {
            self.inbound.push((node, conn, answer));
        }
        for observation in seen {
            self.observe(index, node, observation);
        }
    }

    fn observe(&mut self, index: usize, node: NodeId, observation: Observation) {
        let client_id = self.clients[index].client_id.clone();

        let persistent = matches!(
            self.clients[index].role,
            Role::Subscriber { persistent: true }
        );
        match observation {
            Observation::Acked { message, qos } => {
                self.acked += 1;
                self.trace.record((self.step, "acked", message, node));
                self.checker
                    .acked(self.step, node, message, qos == QoS::ExactlyOnce);
            }
            Observation::Delivered { message, qos } => {
                self.delivered += 1;
                self.trace
                    .record((self.step, "delivered", message, index, node));
                let exactly_once = qos == QoS::ExactlyOnce && self.checker.is_qos2(message);
                if self.sabotage(Sabotage::LoseDeliveries) {
                    return;
                }
                self.checker.delivered(&client_id, message, exactly_once);
                if exactly_once && self.sabotage_once(Sabotage::DeliverQos2Twice) {
                    self.checker.delivered(&client_id, message, exactly_once);
                }
            }
            Observation::Subscribed if persistent => self.checker.subscribed(self.step, &client_id),
            Observation::Connected { .. } if persistent => {
                self.checker.connected(self.step, &client_id, node);
                let previous = self.session_node.insert(index, node);
                if previous.is_some_and(|previous| previous != node) {
                    let from = self.last_connect.get(&index).copied().unwrap_or(self.step);
                    self.checker.moved(&client_id, from, self.step);
                }
            }
            _ => {}
        }
    }

    fn sabotage(&self, kind: Sabotage) -> bool {
        self.options.sabotage == Some(kind)
    }

    fn sabotage_once(&mut self, kind: Sabotage) -> bool {
        let first = self.sabotage(kind) && !self.sabotaged;
        self.sabotaged |= first;
        first
    }

    fn check(&mut self) {
        let mut live: BTreeMap<String, Vec<NodeId>> = BTreeMap::new();
        let mut tables = Vec::new();
        for node in &self.nodes {
            let Some(running) = node.running.as_ref() else {
                continue;
            };
            for client in &self.clients {
                let connected = running
                    .broker
                    .admin_client(&client.client_id)
                    .is_some_and(|detail| detail.summary.connected);
                if connected {
                    live.entry(client.client_id.clone())
                        .or_default()
                        .push(node.id);
                }
            }
            let (index, routes) = running.coordinator.applied_routes();
            tables.push((node.id, index, digest_of(format!("{routes:?}"))));
        }
        if self.sabotage(Sabotage::SecondOwner) {
            if let Some(nodes) = live.get_mut("sub1") {
                if nodes.len() == 1 {
                    let other = self.all().into_iter().find(|n| !nodes.contains(n));
                    nodes.extend(other);
                }
            }
        }
        if self.sabotage(Sabotage::SkewRoutes) {
            if let Some(table) = tables.get_mut(1) {
                table.2 ^= 1;
            }
        }
        self.checker.check_owners(self.step, &live);
        for (node, index, digest) in tables {
            self.checker.check_routes(self.step, node, index, digest);
            self.trace
                .record((self.step, "applied", node, index, digest));
        }
    }
}
