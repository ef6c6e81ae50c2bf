//! The configuration file: one TOML document, every key optional.
//!
//! Precedence, lowest first: built-in defaults, the file, `HALYARD_<KEY>` environment
//! variables, command-line flags. Mistakes are errors, never silently ignored: an unknown key
//! or a bad value names the key and the line (or the environment variable).

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{anyhow, bail, Result};
use halyard_core::{BrokerConfig, QueueFullPolicy};

use crate::cluster_config::ClusterSection;
use halyard_server::ServerConfig;

use crate::security_config::{AuthSection, ListenerSection};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Prefix of environment variables that override top-level scalar keys.
pub const ENV_PREFIX: &str = "HALYARD_";

/// Largest packet MQTT can frame: 1 byte of header, 4 of remaining length, 268,435,455 of body.
const MAX_MQTT_PACKET: u32 = 268_435_460;

/// The file's shape. Written out field by field (rather than flattening [`BrokerConfig`]) so
/// that `deny_unknown_fields` works and the file format is stated in one place; the
/// conversion to [`ServerConfig`] is exhaustive, so a new core field cannot be forgotten.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct FileConfig {
    /// Addresses (`IP:PORT`) to accept MQTT over TCP on. At least one. Unset, the broker is
    /// reachable from this machine only unless authentication is configured (see "Safe by default"
    /// above).
    #[serde(
        deserialize_with = "crate::address::optional_list",
        skip_serializing_if = "Option::is_none"
    )]
    #[schemars(extend("x-default" = "`[\"127.0.0.1:1883\", \"[::1]:1883\"]`, or `[\"0.0.0.0:1883\"]` with `auth.password_file`"))]
    pub listen: Option<Vec<SocketAddr>>,
    /// A socket that has not sent a complete CONNECT within this many milliseconds is closed.
    #[schemars(range(min = 1))]
    pub connect_timeout_ms: u64,
    /// A plain TCP connection that has sent nothing for between one and two times this many
    /// milliseconds parks: it gives up its task and its registration with the runtime (about 1 KB
    /// of memory) and waits in the broker's own `epoll` set until its client sends something or the
    /// broker has something for it. Keep-alive, wills and deliveries work as usual while parked.
    /// Waking delays the first packet after the silence: a PINGREQ round trip on loopback took 145
    /// us (median) from a parked connection against 8-11 us from an awake one.
    /// `halyard_connections_parked` counts them. 0 = never park. TLS and WebSocket connections do
    /// not park.
    pub park_idle_after_ms: u64,
    /// Memory that bytes queued for one connection but not yet written may hold (the capacity of
    /// their buffers, not only their length); a QoS 0 message that would take it beyond is dropped
    /// for that connection (slow consumer), counted in
    /// `halyard_messages_dropped_total{reason="slow_consumer"}` and per client in the admin API,
    /// and logged at the first drop per connection; from then until the connection's writer has
    /// written what it held, its QoS 0 messages are dropped before they are encoded, so a stalled
    /// subscriber costs the broker almost nothing. `halyard_outbound_buffer_bytes` sums it over
    /// connections. QoS 1/2 messages are bounded by `max_inflight`,
    /// `max_queued_messages` and `max_queued_bytes`, and what a full queue does is
    /// `queue_full_policy`'s.
    #[schemars(range(min = 1))]
    pub max_outbound_buffer: usize,
    /// Bytes of decoded packets that connections may have handed to the broker task and it has
    /// not handled yet (each counted with what its event costs in memory, not only its wire size:
    /// a 2-byte PINGREQ weighs about 500 bytes). One connection may hold a sixteenth of it (at
    /// least 16 KiB, at most 64 KiB) before the broker stops reading from it, so one flooding client waits and the
    /// others keep their turn.
    #[schemars(range(min = 16384))]
    pub event_queue_bytes: usize,
    /// Bytes of memory for messages: those held by all sessions together, queued and in flight,
    /// and the decoded packets waiting for the broker task (`event_queue_bytes`). A held message
    /// counts what it really occupies, once per subscriber that holds it: its shared allocation
    /// (message and reference counts), the topic's copy, its payload with its share of the read
    /// buffer the payload was cut from (the packet's bytes plus a quarter) and its forwarded
    /// properties, each rounded up to the allocator's size classes; each session queue also
    /// counts its buffer by capacity (a queue that grew deep keeps its buffer until it empties). A
    /// persistent session's queue counts only the part in memory, not what is on disk. Publishers
    /// are paced, not refused, once the sessions hold more than the budget less
    /// `event_queue_bytes` (packets already decoded are still taken after pacing begins) and
    /// less a sixteenth of it for the memory nobody counts (at most half the budget is set aside
    /// for the two), so that the broker's resident set stays under the budget: the broker stops reading from connections that publish (except
    /// those with deliveries in flight, whose acknowledgements may be what frees memory) until the
    /// total is back under 15/16 of that mark. What nobody counts (the sixteenth): the process's fixed
    /// memory (about 13 MB at start), connections' read and write buffers (`max_outbound_buffer`),
    /// publishes held back by `queue_full_policy = "pushback"`, the allocator's spare pages. `halyard_memory_held_bytes` shows the sessions'
    /// total, `halyard_publishers_paced_seconds_total` the time publishers spent paced. 0 = no
    /// budget. Why 256 MiB: it holds about 650,000 small queued messages (about 340 bytes each
    /// with a 64-byte payload), far beyond what a healthy broker queues, and stays well inside a
    /// small VM or container; a fixed figure rather than a share of the machine's memory, so the
    /// broker behaves the same on every host (in a container the host's figure misleads).
    pub memory_budget: usize,
    /// Largest keep-alive (seconds) a client may ask for; 0 = no maximum. MQTT 5 clients asking for
    /// more (or for 0) are told this value as Server Keep Alive; MQTT 3.x clients asking for more
    /// are refused (identifier rejected), as Mosquitto does.
    pub max_keepalive: u16,
    /// Unacknowledged outbound QoS 1/2 messages per session (for MQTT 5, at most the client's
    /// Receive Maximum).
    #[schemars(range(min = 1))]
    pub max_inflight: u16,
    /// Inbound QoS 1/2 messages a client may have unacknowledged (MQTT 5 Receive Maximum in
    /// CONNACK).
    #[schemars(range(min = 1))]
    pub receive_maximum: u16,
    /// Messages queued per session beyond the in-flight window, also while the client is offline.
    pub max_queued_messages: usize,
    /// Bytes (topic and payload) queued per session beyond the in-flight window, also while offline
    /// (on disk for a persistent session, so this bounds its disk use too); 0 = only
    /// `max_queued_messages` bounds it. Messages spilled to disk before a restart are not counted
    /// after it.
    pub max_queued_bytes: usize,
    /// Largest packet accepted from a client, in bytes (advertised as Maximum Packet Size).
    #[schemars(range(min = 2, max = MAX_MQTT_PACKET))]
    pub max_packet_size: u32,
    /// Longest topic name or filter, in bytes.
    #[schemars(range(min = 1, max = 65_535))]
    pub max_topic_length: usize,
    /// Most `/`-separated levels in a topic name or filter.
    #[schemars(range(min = 1))]
    pub max_topic_levels: usize,
    /// Topic aliases an MQTT 5 client may use towards the broker (0 = none).
    pub topic_alias_maximum: u16,
    /// Whether retained messages are stored.
    pub retain_available: bool,
    /// Upper bound on the MQTT 5 session expiry interval (seconds) a client may ask for.
    pub max_session_expiry: u32,
    /// Whether a client may connect with an empty client id (the broker assigns one).
    pub allow_zero_length_client_id: bool,
    /// What a subscriber's full queue does to a new QoS 1/2 message. The slow subscriber pays alone
    /// with `"drop_oldest"` (its oldest queued message is dropped to make room), `"drop_new"` (the
    /// new message is not queued for it) or `"disconnect"` (it is disconnected, MQTT 5 with
    /// DISCONNECT 0x97 Quota exceeded; a persistent session keeps what it queued, and drops what
    /// comes while it is away): the publisher is acknowledged and every other subscriber gets the
    /// message, and a share group passes a full member over for another. Or the publisher pays:
    /// `"reject"` answers an MQTT 5 publisher PUBACK/PUBREC 0x97 Quota exceeded, `"pushback"`
    /// leaves the publish unacknowledged and stops reading from the publisher until there is room
    /// (at most 10 s, then the publisher is closed without the acknowledgement); with either, MQTT
    /// 3.x publishers are pushed back, since 3.x cannot refuse a publish. Every drop is counted
    /// (`halyard_messages_dropped_total{reason=queue_full_oldest\|queue_full\|queue_full_disconnect}`,
    /// `dropped` per client in `/api/v1/clients`) and logged with the client id: at once, then at
    /// most one line per client every 10 s. Why `"drop_oldest"` by default: a telemetry
    /// subscriber wants the latest readings rather than a backlog of stale ones, and one stuck
    /// client (an offline logger subscribed to `#`) must never stall every publisher; the
    /// queue stays bounded by `max_queued_messages` and `max_queued_bytes`. Pipelines that
    /// would rather slow the publisher than lose choose `"pushback"` or `"reject"`. In a cluster
    /// these two work across nodes too: a node takes a forwarded QoS 1/2 message only when its
    /// full subscriber has room, leaving it unacknowledged on the peer link meanwhile (every
    /// later forward from that node waits behind it), and a node whose link to a peer is full
    /// pauses the publishers whose messages go there until it has caught up; a forward waits at
    /// most 10 s, then it is delivered to those with room and dropped (counted) for the full
    /// subscriber. A peer that is down is not waited for: its forwards wait in the outbox.
    #[schemars(with = "String")]
    pub queue_full_policy: QueueFullPolicy,
    /// PUBLISH packets per second per connection (a one-second burst is allowed); 0 = no limit. A
    /// client that publishes faster is disconnected: MQTT 5 gets DISCONNECT 0x96 Message rate too
    /// high first. Counted.
    pub max_publish_rate: u32,
    /// Subscriptions one session may hold; 0 = no limit. More are refused per filter: SUBACK 0x97
    /// Quota exceeded (MQTT 5) / 0x80 (3.x). Re-subscribing to an existing filter is always
    /// allowed. Counted.
    pub max_subscriptions_per_client: usize,
    /// Connections open at once over all listeners; 0 = no limit. Beyond it a TCP client's CONNECT
    /// is answered with CONNACK 0x97 Quota exceeded (MQTT 5) / 0x03 Server unavailable (3.x); TLS
    /// and WebSocket sockets are closed. Counted.
    pub max_connections: usize,
    /// New connections per second from one IP address; 0 = no limit. Beyond it: CONNACK 0x9F
    /// Connection rate exceeded (MQTT 5) / 0x03 (3.x). Counted.
    pub max_connection_rate_per_ip: u32,
    /// The `[storage]` table: where persistent sessions and retained messages live.
    pub storage: StorageConfig,
    /// Seconds between publications of the `$SYS/broker/...` topics (retained, Mosquitto's names:
    /// `version`, `uptime`, `clients/connected`, `clients/total`, `messages/received`,
    /// `messages/sent`, `bytes/received`, `bytes/sent`, `retained messages/count`,
    /// `subscriptions/count`, `load/{messages,bytes}/{received,sent}/{1min,5min,15min}`,
    /// `load/connections/...`). 0 = off. Message counts are PUBLISH packets.
    pub sys_interval: u64,
    /// Tokio worker threads; 0 = one per CPU. The broker core is one task; the other workers
    /// decode, encode and do socket I/O in parallel with it (fan-in QoS 0 on the 2-CPU bench
    /// machine: 1.9 M deliveries/s with 2 workers, 1.3 M with 1). With 1 every hand-off of a
    /// message stays on one thread, but latency at low load is no lower for it (QoS 1 at 10k msg/s,
    /// four runs each: p99 106-170 us with 1 worker, 106-137 us with 2).
    pub worker_threads: usize,
    /// One info line per client connect and disconnect (see Command line). Costs a map entry per
    /// connection (client id and address) while on; `false` for fleets where thousands of connects
    /// a second would flood the log.
    pub log_connections: bool,
    /// The `[http]` table: metrics, probes, admin API and status page.
    pub http: HttpSection,
    /// The `[auth]` table: password file, ACL file, anonymous access.
    pub auth: AuthSection,
    /// The `[[listener]]` tables: TLS, WebSocket and extra TCP listeners.
    pub listener: Vec<ListenerSection>,
    /// The `[cluster]` table: this node's id, cluster port and peers.
    pub cluster: ClusterSection,
}

/// Where the operations HTTP listener binds when `http.listen` is not set.
pub const DEFAULT_HTTP_LISTEN: &str = "127.0.0.1:8080";

/// The `[http]` table (issue 5).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct HttpSection {
    /// `false` turns the listener off (`--no-http` does too; `--http-listen` turns it on).
    #[schemars(extend("x-default" = "`true`"))]
    pub enabled: Option<bool>,
    /// Address (`IP:PORT`; port 0 = a free port). If left unset and 8080 is taken, the broker logs
    /// a warning and runs without HTTP; an address that is set and cannot be bound is an error.
    #[serde(deserialize_with = "crate::address::optional")]
    #[schemars(extend("x-default" = "`\"127.0.0.1:8080\"`"))]
    pub listen: Option<SocketAddr>,
    /// Bearer token required by every `/api/v1` request (`Authorization: Bearer TOKEN`). Required
    /// when `listen` is not a loopback address (otherwise the broker refuses to start). Shown as
    /// `<redacted>` by `/api/v1/config`.
    pub token: Option<String>,
    /// File holding the token (a mounted secret); trailing whitespace is ignored. Exclusive with
    /// `token`.
    pub token_file: Option<PathBuf>,
    /// Without `token` or `token_file`, generate a random token (32 bytes, hex) at start-up and log
    /// it once as a warning (field `token`); this also allows a non-loopback `listen`. The shipped
    /// container and Kubernetes configs set it, so they start without a secret; give a token of
    /// your own to keep it out of the logs. The published placeholder `change-me` is refused as a
    /// token from any source.
    pub generate_token: bool,
}

/// A placeholder token that shipped examples used to carry: refused, because everybody
/// knows it.
pub const PLACEHOLDER_TOKEN: &str = "change-me";

/// The `[storage]` table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct StorageConfig {
    /// `"redb"`: an embedded, crash-safe database file `halyard.redb` in `data_dir`. `"memory"`:
    /// nothing survives a restart.
    pub backend: StorageBackend,
    /// Directory of the database (relative to the working directory); `--data-dir DIR` overrides
    /// it.
    pub data_dir: PathBuf,
    /// `"always"`: every batch of events is committed durably before the packets it produced
    /// (PUBACK, PUBREC, CONNACK, ...) are written, so nothing acknowledged is lost on a crash;
    /// events that arrive during a commit share the next one (group commit). `"interval"`: commits
    /// reach the disk at most `fsync_interval_ms` apart, so a crash loses at most that window of
    /// acknowledged messages. `"never"`: the operating system decides (a clean shutdown still makes
    /// everything durable).
    pub fsync: FsyncMode,
    /// Period for `fsync = "interval"`.
    #[schemars(range(min = 1))]
    pub fsync_interval_ms: u64,
    /// What damaged data does at start-up (see "Damaged data files" below). `"salvage"`:
    /// damaged records are skipped, counted and removed, every intact record is kept, and the
    /// broker starts. `"refuse"`: the broker does not start; it logs and exits with what is
    /// damaged, and changes nothing, so the file can be inspected or restored from a backup
    /// first.
    #[schemars(extend("x-default" = "`\"salvage\"`"))]
    pub on_corruption: OnCorruptionMode,
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            backend: StorageBackend::Redb,
            data_dir: PathBuf::from("data"),
            fsync: FsyncMode::Always,
            fsync_interval_ms: 1000,
            on_corruption: OnCorruptionMode::Salvage,
        }
    }
}

/// `storage.on_corruption`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum OnCorruptionMode {
    /// Skip and count damaged records, keep every intact one, and start.
    Salvage,
    /// Do not start on damaged data; say what is damaged and change nothing.
    Refuse,
}

/// Which storage backend serves the broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum StorageBackend {
    /// Embedded redb database in `data_dir`.
    Redb,
    /// Everything in RAM.
    Memory,
}

/// `storage.fsync`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum FsyncMode {
    /// Every commit is durable before its acknowledgements are sent.
    Always,
    /// A durable commit at most every `fsync_interval_ms`.
    Interval,
    /// Durability is left to the operating system (and a clean shutdown).
    Never,
}

impl FsyncMode {
    /// The word the configuration file uses, for messages.
    pub fn name(self) -> &'static str {
        match self {
            FsyncMode::Always => "always",
            FsyncMode::Interval => "interval",
            FsyncMode::Never => "never",
        }
    }
}

impl Default for FileConfig {
    /// The defaults are those of the server and the core, so they are defined once.
    fn default() -> Self {
        let server = ServerConfig::default();
        let broker = server.broker;
        FileConfig {
            listen: None,
            connect_timeout_ms: u64::try_from(server.connect_timeout.as_millis())
                .unwrap_or(u64::MAX),
            park_idle_after_ms: server.park_idle_after.map_or(0, |after| {
                u64::try_from(after.as_millis()).unwrap_or(u64::MAX)
            }),
            max_outbound_buffer: server.max_outbound_buffer,
            event_queue_bytes: server.event_queue_bytes,
            memory_budget: server.memory_budget,
            max_keepalive: broker.max_keepalive,
            max_inflight: broker.max_inflight,
            receive_maximum: broker.receive_maximum,
            max_queued_messages: broker.max_queued_messages,
            max_queued_bytes: broker.max_queued_bytes,
            max_packet_size: broker.max_packet_size,
            max_topic_length: broker.max_topic_length,
            max_topic_levels: broker.max_topic_levels,
            topic_alias_maximum: broker.topic_alias_maximum,
            retain_available: broker.retain_available,
            max_session_expiry: broker.max_session_expiry,
            allow_zero_length_client_id: broker.allow_zero_length_client_id,
            queue_full_policy: broker.queue_full_policy,
            max_publish_rate: broker.max_publish_rate,
            max_subscriptions_per_client: broker.max_subscriptions_per_client,
            max_connections: 0,
            max_connection_rate_per_ip: 0,
            storage: StorageConfig::default(),
            sys_interval: 10,
            worker_threads: 0,
            log_connections: server.log_connections,
            http: HttpSection::default(),
            auth: AuthSection::default(),
            listener: Vec::new(),
            cluster: ClusterSection::default(),
        }
    }
}

impl From<FileConfig> for ServerConfig {
    fn from(file: FileConfig) -> Self {
        // Destructured so that adding a key without mapping it does not compile.
        let FileConfig {
            listen,
            connect_timeout_ms,
            park_idle_after_ms,
            max_outbound_buffer,
            event_queue_bytes,
            memory_budget,
            max_keepalive,
            max_inflight,
            receive_maximum,
            max_queued_messages,
            max_queued_bytes,
            max_packet_size,
            max_topic_length,
            max_topic_levels,
            topic_alias_maximum,
            retain_available,
            max_session_expiry,
            allow_zero_length_client_id,
            queue_full_policy,
            max_publish_rate,
            max_subscriptions_per_client,
            // Read by `security_config::Prepared` (connection admission is per listener).
            max_connections: _,
            max_connection_rate_per_ip: _,
            storage: _,
            sys_interval: _,
            worker_threads: _,
            log_connections,
            http: _,
            auth,
            listener: _,
            cluster: _,
        } = file;
        ServerConfig {
            listeners: listen.unwrap_or_else(|| default_listen(&auth).to_vec()),
            log_connections,
            connect_timeout: Duration::from_millis(connect_timeout_ms),
            park_idle_after: (park_idle_after_ms > 0)
                .then(|| Duration::from_millis(park_idle_after_ms)),
            max_outbound_buffer,
            event_queue_bytes,
            memory_budget,
            broker: BrokerConfig {
                max_keepalive,
                max_inflight,
                receive_maximum,
                max_queued_messages,
                max_queued_bytes,
                max_packet_size,
                max_topic_length,
                max_topic_levels,
                topic_alias_maximum,
                retain_available,
                max_session_expiry,
                allow_zero_length_client_id,
                queue_full_policy,
                max_publish_rate,
                max_subscriptions_per_client,
            },
        }
    }
}

/// Where MQTT over TCP is accepted when `listen` is not set, as Mosquitto 2 does: on
/// loopback only (IPv4 and IPv6), unless authentication is configured, so that a broker
/// started without a thought is not an open relay on every network the host is on.
pub fn default_listen(auth: &AuthSection) -> &'static [SocketAddr] {
    const LOOPBACK: [SocketAddr; 2] = [
        SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 1883),
        SocketAddr::new(std::net::IpAddr::V6(std::net::Ipv6Addr::LOCALHOST), 1883),
    ];
    const EVERYWHERE: [SocketAddr; 1] = [SocketAddr::new(
        std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
        1883,
    )];
    if auth.configures_authentication() {
        &EVERYWHERE
    } else {
        &LOOPBACK
    }
}

impl FileConfig {
    /// The worker threads to run: `worker_threads`, or when it is 0 one per available CPU.
    /// The broker core is one task; the other workers decode, encode and do the socket I/O
    /// of the connections in parallel with it (fan-in QoS 0 on the 2-CPU bench machine:
    /// 1.9 M deliveries/s with two workers, 1.3 M with one). One worker keeps each message's
    /// hand-off from reader to broker task on one thread instead, which can lower latency at
    /// low load (BENCHMARKS.md): `worker_threads = 1` is for that trade.
    pub fn effective_worker_threads(&self, available_cpus: usize) -> usize {
        match self.worker_threads {
            0 => available_cpus.max(1),
            threads => threads,
        }
    }

    /// Loads the effective configuration: defaults, then `file` (its name, for messages, and
    /// its text) if given, then `HALYARD_*` variables from `env`; then validates it.
    pub fn load(
        file: Option<(&str, &str)>,
        env: impl IntoIterator<Item = (OsString, OsString)>,
    ) -> Result<FileConfig> {
        let mut config = match file {
            Some((name, text)) => {
                toml::from_str(text).map_err(|error| located_error(name, text, &error))?
            }
            None => FileConfig::default(),
        };
        let env_keys = crate::keys::env_keys();
        // (key path, variable) of every override applied.
        let mut from_env: Vec<(String, String)> = Vec::new();
        let mut table: Option<toml::Table> = None;
        for (var, value) in env {
            let Some(var) = var.to_str().filter(|var| var.starts_with(ENV_PREFIX)) else {
                continue;
            };
            let value = value
                .to_str()
                .ok_or_else(|| anyhow!("environment variable {var}: value is not valid UTF-8"))?;
            let name = var.to_ascii_uppercase();
            if crate::service_links::is_service_link(&name[ENV_PREFIX.len()..], value) {
                tracing::debug!(%var, "ignored: a Kubernetes service link, not configuration");
                continue;
            }
            let Some(key) = env_keys.get(&name) else {
                bail!(
                    "environment variable {var} is not a configuration key (the variables are: \
                     {})",
                    env_keys.keys().cloned().collect::<Vec<_>>().join(", ")
                );
            };
            let bad = |message: String| {
                anyhow!(
                    "environment variable {var}: bad value `{value}` for `{}`: {message}",
                    key.path
                )
            };
            let parsed = key.parse_env(value).map_err(bad)?;
            let table = match &mut table {
                Some(table) => table,
                None => table.insert(
                    toml::Table::try_from(&config)
                        .map_err(|error| anyhow!("cannot apply the environment: {error}"))?,
                ),
            };
            crate::keys::set(table, &key.path, parsed);
            config = toml::Value::Table(table.clone())
                .try_into()
                .map_err(|error: toml::de::Error| bad(error.message().to_owned()))?;
            from_env.push((key.path.clone(), var.to_owned()));
        }
        if let Err((key, message)) = config.validate() {
            if let Some((_, var)) = from_env.iter().rev().find(|(path, _)| *path == key) {
                bail!("environment variable {var}: bad value for `{key}`: {message}");
            }
            if let Some((name, text)) = file {
                if let Some((line, column)) = key_position(text, &key) {
                    bail!(
                        "config error in {name} at line {line}, column {column}: bad value for \
                         key `{key}`: {message}"
                    );
                }
            }
            bail!("config error: bad value for key `{key}`: {message}");
        }
        Ok(config)
    }

    /// The bounds each key defines (see `keys.rs`), then what involves several keys; the
    /// error names the key.
    fn validate(&self) -> std::result::Result<(), (String, String)> {
        if self.listen.as_ref().is_some_and(Vec::is_empty) {
            return Err((
                "listen".to_owned(),
                "must list at least one address".to_owned(),
            ));
        }
        let value = serde_json::to_value(self).unwrap_or_default();
        for key in crate::keys::keys() {
            if let Some(found) = crate::keys::lookup(&value, &key.path) {
                key.check(found)
                    .map_err(|message| (key.path.clone(), message))?;
            }
        }
        crate::security_config::validate(&self.listener)
            .map_err(|(key, message)| (key.to_owned(), message))?;
        if self.http.token.is_some() && self.http.token_file.is_some() {
            return Err((
                "http.token_file".to_owned(),
                "set http.token or http.token_file, not both".to_owned(),
            ));
        }
        if self.http.token.as_deref().map(str::trim) == Some(PLACEHOLDER_TOKEN) {
            return Err((
                "http.token".to_owned(),
                format!("`{PLACEHOLDER_TOKEN}` is a published placeholder: set a secret token"),
            ));
        }
        if let Some(listen) = self.http.listen {
            let has_token = self.http.token.is_some()
                || self.http.token_file.is_some()
                || self.http.generate_token;
            if self.http.enabled != Some(false) && !listen.ip().is_loopback() && !has_token {
                return Err((
                    "http.listen".to_owned(),
                    format!(
                        "http.listen {listen} is not a loopback address: set http.token, \
                         http.token_file or http.generate_token so the admin API is not open \
                         to the network"
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// Turns a TOML error into "config error in FILE at line L, column C: ..." naming the key.
fn located_error(name: &str, text: &str, error: &toml::de::Error) -> anyhow::Error {
    let message = error.message().trim_end();
    let Some(span) = error.span() else {
        return anyhow!("config error in {name}: {message}");
    };
    let (line, column) = line_column(text, span.start);
    let key = text
        .lines()
        .nth(line - 1)
        .and_then(|source| source.split_once('='))
        .map(|(key, _)| key.trim().trim_matches('"'))
        .filter(|key| !key.is_empty() && !message.contains(&format!("`{key}`")));
    match key {
        Some(key) => anyhow!(
            "config error in {name} at line {line}, column {column}: bad value for key `{key}`: \
             {message}"
        ),
        None => anyhow!("config error in {name} at line {line}, column {column}: {message}"),
    }
}

/// 1-based line and column (in characters) of byte `offset` in `text`.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |newline| newline + 1);
    (line, before[line_start..].chars().count() + 1)
}

/// Where `key` is assigned in `text`, for validation errors found after parsing. A dotted
/// key (`http.listen`) is looked for inside its table only.
fn key_position(text: &str, key: &str) -> Option<(usize, usize)> {
    let (table, key) = match key.split_once('.') {
        Some((table, key)) => (Some(table), key),
        None => (None, key),
    };
    let mut current: Option<String> = None;
    text.lines().enumerate().find_map(|(index, line)| {
        let trimmed = line.trim();
        if trimmed.starts_with('[') {
            current = Some(trimmed.trim_matches(['[', ']']).trim().to_owned());
            return None;
        }
        if table.is_some() && current.as_deref() != table {
            return None;
        }
        let (name, _) = line.split_once('=')?;
        let indent = line.len() - line.trim_start().len();
        (name.trim().trim_matches('"') == key).then_some((index + 1, indent + 1))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(OsString, OsString)> {
        pairs
            .iter()
            .map(|(key, value)| (OsString::from(key), OsString::from(value)))
            .collect()
    }

    fn load(text: &str) -> Result<FileConfig> {
        FileConfig::load(Some(("halyard.toml", text)), Vec::new())
    }

    fn error_of(result: Result<FileConfig>) -> String {
        format!("{:#}", result.expect_err("an error"))
    }

    #[test]
    fn empty_file_and_no_file_give_the_defaults() {
        assert_eq!(load("").expect("valid"), FileConfig::default());
        let none = FileConfig::load(None, Vec::new()).expect("valid");
        assert_eq!(ServerConfig::from(none), ServerConfig::default());
    }

    #[test]
    fn every_key_reaches_the_server_config() {
        let text = r#"
            listen = ["127.0.0.1:1884", "[::1]:1885"]
            connect_timeout_ms = 2500
            park_idle_after_ms = 500
            max_outbound_buffer = 4096
            event_queue_bytes = 65536
            memory_budget = 1048576
            max_keepalive = 60
            max_inflight = 7
            receive_maximum = 9
            max_queued_messages = 11
            max_queued_bytes = 65536
            max_packet_size = 2048
            max_topic_length = 100
            max_topic_levels = 5
            topic_alias_maximum = 0
            retain_available = false
            max_session_expiry = 3600
            allow_zero_length_client_id = false
            queue_full_policy = "pushback"
            max_publish_rate = 100
            max_subscriptions_per_client = 8
            log_connections = false
        "#;
        let config = ServerConfig::from(load(text).expect("valid"));
        let expected = ServerConfig {
            listeners: vec![
                "127.0.0.1:1884".parse().expect("addr"),
                "[::1]:1885".parse().expect("addr"),
            ],
            connect_timeout: Duration::from_millis(2500),
            park_idle_after: Some(Duration::from_millis(500)),
            max_outbound_buffer: 4096,
            event_queue_bytes: 65536,
            memory_budget: 1048576,
            log_connections: false,
            broker: BrokerConfig {
                max_keepalive: 60,
                max_inflight: 7,
                receive_maximum: 9,
                max_queued_messages: 11,
                max_queued_bytes: 65536,
                max_packet_size: 2048,
                max_topic_length: 100,
                max_topic_levels: 5,
                topic_alias_maximum: 0,
                retain_available: false,
                max_session_expiry: 3600,
                allow_zero_length_client_id: false,
                queue_full_policy: halyard_core::QueueFullPolicy::Pushback,
                max_publish_rate: 100,
                max_subscriptions_per_client: 8,
            },
        };
        assert_eq!(config, expected);
        // Every value differs from its default, so no key can be silently ignored.
        let defaults = ServerConfig::default();
        assert_ne!(config.listeners, defaults.listeners);
        assert_ne!(config.connect_timeout, defaults.connect_timeout);
        assert_ne!(config.max_outbound_buffer, defaults.max_outbound_buffer);
        assert_ne!(config.event_queue_bytes, defaults.event_queue_bytes);
        assert_ne!(config.memory_budget, defaults.memory_budget);
        assert_ne!(config.log_connections, defaults.log_connections);
        let (b, d) = (&config.broker, &defaults.broker);
        assert_ne!(b.max_keepalive, d.max_keepalive);
        assert_ne!(b.max_inflight, d.max_inflight);
        assert_ne!(b.receive_maximum, d.receive_maximum);
        assert_ne!(b.max_queued_messages, d.max_queued_messages);
        assert_ne!(b.max_packet_size, d.max_packet_size);
        assert_ne!(b.max_topic_length, d.max_topic_length);
        assert_ne!(b.max_topic_levels, d.max_topic_levels);
        assert_ne!(b.topic_alias_maximum, d.topic_alias_maximum);
        assert_ne!(b.retain_available, d.retain_available);
        assert_ne!(b.max_session_expiry, d.max_session_expiry);
        assert_ne!(b.allow_zero_length_client_id, d.allow_zero_length_client_id);
        assert_ne!(b.queue_full_policy, d.queue_full_policy);
        assert_ne!(b.max_publish_rate, d.max_publish_rate);
        assert_ne!(
            b.max_subscriptions_per_client,
            d.max_subscriptions_per_client
        );
    }

    #[test]
    fn unknown_key_names_key_and_line() {
        let message = error_of(load("max_inflight = 4\n\nmax_keepalve = 60\n"));
        assert!(message.contains("halyard.toml"), "{message}");
        assert!(message.contains("line 3, column 1"), "{message}");
        assert!(message.contains("max_keepalve"), "{message}");
        assert!(message.contains("unknown field"), "{message}");
    }

    #[test]
    fn unknown_table_is_an_error() {
        let message = error_of(load("[stroage]\ndata_dir = \"x\"\n"));
        assert!(message.contains("stroage"), "{message}");
        assert!(message.contains("line 1"), "{message}");
    }

    #[test]
    fn unknown_key_in_storage_table_names_key_and_line() {
        let message = error_of(load("[storage]\npath = \"x\"\n"));
        assert!(message.contains("path"), "{message}");
        assert!(message.contains("line 2"), "{message}");
    }

    #[test]
    fn storage_table_is_read() {
        let config = load(
            "[storage]\nbackend = \"memory\"\ndata_dir = \"/var/lib/halyard\"\nfsync = \"interval\"\nfsync_interval_ms = 50\non_corruption = \"refuse\"\n",
        )
        .expect("valid");
        assert_eq!(
            config.storage,
            StorageConfig {
                backend: StorageBackend::Memory,
                data_dir: PathBuf::from("/var/lib/halyard"),
                fsync: FsyncMode::Interval,
                fsync_interval_ms: 50,
                on_corruption: OnCorruptionMode::Refuse,
            }
        );
        let message = error_of(load("[storage]\nfsync = \"sometimes\"\n"));
        assert!(message.contains("line 2"), "{message}");
    }

    #[test]
    fn bad_type_names_key_and_line() {
        let message = error_of(load("max_inflight = 4\nmax_keepalive = \"soon\"\n"));
        assert!(message.contains("line 2"), "{message}");
        assert!(message.contains("`max_keepalive`"), "{message}");
    }

    #[test]
    fn out_of_range_integer_names_key_and_line() {
        let message = error_of(load("\n\nmax_inflight = 70000\n"));
        assert!(message.contains("line 3"), "{message}");
        assert!(message.contains("`max_inflight`"), "{message}");
    }

    #[test]
    fn bad_address_names_key_and_line() {
        let message = error_of(load("listen = [\"localhost\"]\n"));
        assert!(message.contains("line 1"), "{message}");
        assert!(message.contains("`listen`"), "{message}");
    }

    #[test]
    fn invalid_value_names_key_and_line() {
        let message = error_of(load("retain_available = true\n  receive_maximum = 0\n"));
        assert!(message.contains("line 2, column 3"), "{message}");
        assert!(message.contains("`receive_maximum`"), "{message}");
        assert!(message.contains("at least 1"), "{message}");
        let message = error_of(load("listen = []\n"));
        assert!(
            message.contains("line 1") && message.contains("`listen`"),
            "{message}"
        );
    }

    #[test]
    fn syntax_error_gives_the_line() {
        let message = error_of(load("max_inflight = 4\nmax_keepalive = = 3\n"));
        assert!(message.contains("line 2"), "{message}");
    }

    #[test]
    fn environment_overrides_the_file() {
        let vars = env(&[
            ("HALYARD_MAX_KEEPALIVE", "60"),
            ("HALYARD_RETAIN_AVAILABLE", "false"),
            ("PATH", "/bin"),
        ]);
        let config =
            FileConfig::load(Some(("halyard.toml", "max_keepalive = 30\n")), vars).expect("ok");
        assert_eq!(config.max_keepalive, 60);
        assert!(!config.retain_available);
    }

    #[test]
    fn bad_environment_value_names_the_variable() {
        let message = error_of(FileConfig::load(
            None,
            env(&[("HALYARD_MAX_KEEPALIVE", "soon")]),
        ));
        assert!(message.contains("HALYARD_MAX_KEEPALIVE"), "{message}");
        let message = error_of(FileConfig::load(
            None,
            env(&[("HALYARD_MAX_INFLIGHT", "0")]),
        ));
        assert!(message.contains("HALYARD_MAX_INFLIGHT"), "{message}");
        assert!(message.contains("at least 1"), "{message}");
        let message = error_of(FileConfig::load(None, env(&[("HALYARD_MAX_INFLGHT", "3")])));
        assert!(message.contains("HALYARD_MAX_INFLGHT"), "{message}");
    }

    #[test]
    fn kubernetes_service_links_are_skipped_but_typos_are_not() {
        let vars = env(&[
            ("HALYARD_SERVICE_HOST", "10.96.0.12"),
            ("HALYARD_PORT_8083_TCP_ADDR", "10.96.0.12"),
            ("HALYARD_MAX_KEEPALIVE", "60"),
        ]);
        let config = FileConfig::load(None, vars).expect("service links are not config");
        assert_eq!(config.max_keepalive, 60);
        let message = error_of(FileConfig::load(
            None,
            env(&[
                ("HALYARD_SERVICE_HOST", "10.96.0.12"),
                ("HALYARD_MAX_KEEPALVE", "6"),
            ]),
        ));
        assert!(message.contains("HALYARD_MAX_KEEPALVE"), "{message}");
        // The name alone is not enough: a value Kubernetes would not give is an error.
        let message = error_of(FileConfig::load(None, env(&[("HALYARD_PORT", "1883")])));
        assert!(message.contains("HALYARD_PORT"), "{message}");
    }

    #[test]
    fn unset_listen_is_loopback_unless_authentication_is_configured() {
        let local = ServerConfig::from(load("").expect("valid"));
        assert_eq!(
            local.listeners,
            [
                "127.0.0.1:1883".parse::<SocketAddr>().expect("addr"),
                "[::1]:1883".parse().expect("addr")
            ]
        );
        assert!(local.listeners.iter().all(|addr| addr.ip().is_loopback()));
        let open = ServerConfig::from(
            load("[auth]\npassword_file = \"/etc/halyard/passwd\"\n").expect("valid"),
        );
        assert_eq!(
            open.listeners,
            ["0.0.0.0:1883".parse::<SocketAddr>().expect("addr")]
        );
        let explicit = ServerConfig::from(load("listen = [\"0.0.0.0:1884\"]\n").expect("valid"));
        assert_eq!(
            explicit.listeners,
            ["0.0.0.0:1884".parse::<SocketAddr>().expect("addr")]
        );
    }

    #[test]
    fn host_names_are_refused_with_the_reason() {
        for text in [
            "listen = [\"localhost:1883\"]\n",
            "[http]\nlisten = \"localhost:8080\"\n",
            "[[listener]]\nkind = \"ws\"\naddress = \"localhost:8083\"\n",
        ] {
            let message = error_of(load(text));
            assert!(message.contains("an IP address is required"), "{message}");
        }
        let message = error_of(FileConfig::load(
            None,
            env(&[("HALYARD_HTTP_LISTEN", "localhost:8080")]),
        ));
        assert!(message.contains("HALYARD_HTTP_LISTEN"), "{message}");
        assert!(message.contains("an IP address is required"), "{message}");
    }

    #[test]
    fn the_placeholder_token_is_refused_and_generate_token_allows_an_open_listener() {
        let message = error_of(load("[http]\ntoken = \"change-me\"\n"));
        assert!(
            message.contains("http.token") && message.contains("line 2"),
            "{message}"
        );
        let message = error_of(FileConfig::load(
            None,
            env(&[("HALYARD_HTTP_TOKEN", "change-me")]),
        ));
        assert!(message.contains("HALYARD_HTTP_TOKEN"), "{message}");
        let config = load("[http]\nlisten = \"0.0.0.0:8080\"\ngenerate_token = true\n")
            .expect("a generated token protects the admin API");
        assert!(config.http.generate_token);
    }

    #[test]
    fn worker_threads_default_is_one_per_cpu_and_an_explicit_count_wins() {
        let default = load("").expect("valid");
        assert_eq!(default.effective_worker_threads(0), 1);
        assert_eq!(default.effective_worker_threads(2), 2);
        assert_eq!(default.effective_worker_threads(8), 8);
        let explicit = load("worker_threads = 4\n").expect("valid");
        assert_eq!(explicit.effective_worker_threads(2), 4);
        let message = error_of(load("worker_threads = -1\n"));
        assert!(message.contains("worker_threads"), "{message}");
    }

    #[test]
    fn http_table_and_sys_interval_are_read() {
        let config = load(
            "sys_interval = 3\n[http]\nenabled = true\nlisten = \"127.0.0.1:9090\"\ntoken = \"x\"\n",
        )
        .expect("valid");
        assert_eq!(config.sys_interval, 3);
        assert_eq!(
            config.http.listen,
            Some("127.0.0.1:9090".parse().expect("addr"))
        );
        assert_eq!(config.http.token.as_deref(), Some("x"));
        let message = error_of(load("[http]\nlistn = 1\n"));
        assert!(
            message.contains("listn") && message.contains("line 2"),
            "{message}"
        );
        // Non-loopback without a token is refused, naming the key and its line ...
        let message = error_of(load(
            "listen = [\"0.0.0.0:1883\"]\n[http]\nlisten = \"0.0.0.0:80\"\n",
        ));
        assert!(message.contains("http.listen"), "{message}");
        assert!(message.contains("line 3"), "{message}");
        // ... unless the token comes from the environment (a Kubernetes Secret).
        let config = FileConfig::load(
            Some(("halyard.toml", "[http]\nlisten = \"0.0.0.0:80\"\n")),
            env(&[("HALYARD_HTTP_TOKEN", "s")]),
        )
        .expect("token from the environment");
        assert_eq!(config.http.token.as_deref(), Some("s"));
    }

    #[test]
    fn every_key_outside_arrays_of_tables_can_be_set_from_the_environment() {
        let keys = crate::keys::env_keys();
        assert!(keys.len() >= 35, "{}", keys.len());
        for (var, key) in keys {
            // A value of the key's kind that differs from the default; texts try the forms
            // the text keys take (address, enumerations, path or name).
            let candidates: &[&str] = match key.kind {
                // A byte count with a floor (`event_queue_bytes`) takes the larger one.
                crate::keys::Kind::Integer { .. } => &["3", "65536"],
                crate::keys::Kind::Boolean => &["false", "true"],
                crate::keys::Kind::Text => {
                    &["127.0.0.1:9", "pushback", "memory", "never", "refuse", "x"]
                }
                crate::keys::Kind::TextList => &["127.0.0.1:9,127.0.0.1:10", "jwt,file"],
            };
            // A table with a required key (`[auth.jwt]`) is set together with it.
            let base: &[(&str, &str)] = match key.path.starts_with("auth.jwt.") {
                true => &[("HALYARD_AUTH_JWT_KEY_FILE", "key.pem")],
                false => &[],
            };
            let before = FileConfig::load(None, env(base)).expect("base config loads");
            let changed = candidates.iter().any(|value| {
                let mut vars = base.to_vec();
                vars.push((var.as_str(), value));
                FileConfig::load(None, env(&vars)).is_ok_and(|config| config != before)
            });
            assert!(changed, "{var} could not be set");
        }
    }
}
