//! The configuration file: one TOML document, every key optional.
//!
//! Precedence, lowest first: built-in defaults, the file, `HALYARD_<KEY>` environment
//! variables, command-line flags. Mistakes are errors, never silently ignored: an unknown key
//! or a bad value names the key and the line (or the environment variable).

use std::ffi::OsString;
use std::fmt::Display;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use anyhow::{anyhow, bail, Result};
use halyard_core::{BrokerConfig, QueueFullPolicy};

use crate::cluster_config::ClusterSection;
use halyard_server::ServerConfig;

use crate::security_config::{AuthSection, ListenerSection};
use serde::{Deserialize, Serialize};

/// Prefix of environment variables that override top-level scalar keys.
pub const ENV_PREFIX: &str = "HALYARD_";

/// Largest packet MQTT can frame: 1 byte of header, 4 of remaining length, 268,435,455 of body.
const MAX_MQTT_PACKET: u32 = 268_435_460;

/// The file's shape. Written out field by field (rather than flattening [`BrokerConfig`]) so
/// that `deny_unknown_fields` works and the file format is stated in one place; the
/// conversion to [`ServerConfig`] is exhaustive, so a new core field cannot be forgotten.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FileConfig {
    /// Addresses to accept MQTT over TCP on; unset means [`FileConfig::effective_listen`].
    #[serde(
        deserialize_with = "crate::address::optional_list",
        skip_serializing_if = "Option::is_none"
    )]
    pub listen: Option<Vec<SocketAddr>>,
    /// Milliseconds a new socket has to send a complete CONNECT.
    pub connect_timeout_ms: u64,
    /// Milliseconds without input after which a plain TCP connection parks (gives up its
    /// task and reactor registration until it has traffic again); 0 = never.
    pub park_idle_after_ms: u64,
    /// Unwritten bytes per connection above which QoS 0 messages to it are dropped.
    pub max_outbound_buffer: usize,
    /// See [`BrokerConfig::max_keepalive`].
    pub max_keepalive: u16,
    /// See [`BrokerConfig::max_inflight`].
    pub max_inflight: u16,
    /// See [`BrokerConfig::receive_maximum`].
    pub receive_maximum: u16,
    /// See [`BrokerConfig::max_queued_messages`].
    pub max_queued_messages: usize,
    /// See [`BrokerConfig::max_queued_bytes`].
    pub max_queued_bytes: usize,
    /// See [`BrokerConfig::max_packet_size`].
    pub max_packet_size: u32,
    /// See [`BrokerConfig::max_topic_length`].
    pub max_topic_length: usize,
    /// See [`BrokerConfig::max_topic_levels`].
    pub max_topic_levels: usize,
    /// See [`BrokerConfig::topic_alias_maximum`].
    pub topic_alias_maximum: u16,
    /// See [`BrokerConfig::retain_available`].
    pub retain_available: bool,
    /// See [`BrokerConfig::max_session_expiry`].
    pub max_session_expiry: u32,
    /// See [`BrokerConfig::allow_zero_length_client_id`].
    pub allow_zero_length_client_id: bool,
    /// See [`BrokerConfig::queue_full_policy`]: `"drop_oldest"` (default), `"drop_new"`,
    /// `"disconnect"`, `"reject"` or `"pushback"`.
    pub queue_full_policy: QueueFullPolicy,
    /// See [`BrokerConfig::max_publish_rate`].
    pub max_publish_rate: u32,
    /// See [`BrokerConfig::max_subscriptions_per_client`].
    pub max_subscriptions_per_client: usize,
    /// Most connections open at once over all listeners; 0 = no limit.
    pub max_connections: usize,
    /// Most new connections per second from one IP address; 0 = no limit.
    pub max_connection_rate_per_ip: u32,
    /// The `[storage]` table: where persistent sessions and retained messages live.
    pub storage: StorageConfig,
    /// Seconds between `$SYS/broker/...` publications; 0 turns `$SYS` off.
    pub sys_interval: u64,
    /// Tokio worker threads; 0 (the default) means one per CPU
    /// (see [`FileConfig::effective_worker_threads`]).
    pub worker_threads: usize,
    /// One info line per client connect and disconnect (as `mosquitto -v`); `false` for
    /// fleets where thousands of connects a second would flood the log.
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
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpSection {
    /// Whether to serve HTTP at all (default true; `enabled = false` turns it off).
    pub enabled: Option<bool>,
    /// Address to serve on. Unset means [`DEFAULT_HTTP_LISTEN`], and then a port already in
    /// use only logs a warning (so that a second broker on one host still starts); an
    /// explicit address that cannot be bound is an error.
    #[serde(deserialize_with = "crate::address::optional")]
    pub listen: Option<SocketAddr>,
    /// Bearer token for `/api/v1`; required when `listen` is not a loopback address.
    pub token: Option<String>,
    /// File holding the token (for example a mounted Kubernetes Secret); trailing
    /// whitespace is ignored. Exclusive with `token`.
    pub token_file: Option<PathBuf>,
    /// Without `token` or `token_file`, make up a random token at start-up and log it once,
    /// so a shipped image can serve HTTP on every interface and still start without a
    /// secret; the operator sets a token of their own to keep it out of the logs.
    pub generate_token: bool,
}

/// A placeholder token that shipped examples used to carry: refused, because everybody
/// knows it.
pub const PLACEHOLDER_TOKEN: &str = "change-me";

/// The `[storage]` table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StorageConfig {
    /// `redb` (durable, the default) or `memory` (nothing survives a restart).
    pub backend: StorageBackend,
    /// Directory of the redb data file. Default `./data`.
    pub data_dir: PathBuf,
    /// When commits reach the disk: `always` (before any acknowledgement), `interval`
    /// (at most `fsync_interval_ms` of acknowledged messages can be lost), `never`.
    pub fsync: FsyncMode,
    /// Period of durable commits with `fsync = "interval"`.
    pub fsync_interval_ms: u64,
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            backend: StorageBackend::Redb,
            data_dir: PathBuf::from("data"),
            fsync: FsyncMode::Always,
            fsync_interval_ms: 1000,
        }
    }
}

/// Which storage backend serves the broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StorageBackend {
    /// Embedded redb database in `data_dir`.
    Redb,
    /// Everything in RAM.
    Memory,
}

/// `storage.fsync`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
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
        let mut from_env = Vec::new();
        for (var, value) in env {
            let Some(key) = var
                .to_str()
                .and_then(|var| var.strip_prefix(ENV_PREFIX))
                .map(str::to_ascii_lowercase)
            else {
                continue;
            };
            let var = var.to_string_lossy();
            let value = value
                .to_str()
                .ok_or_else(|| anyhow!("environment variable {var}: value is not valid UTF-8"))?;
            if crate::service_links::is_service_link(&key.to_ascii_uppercase(), value) {
                tracing::debug!(%var, "ignored: a Kubernetes service link, not configuration");
                continue;
            }
            match config.set_scalar(&key, value) {
                Ok(true) => from_env.push((key, var.into_owned())),
                Ok(false) => bail!(
                    "environment variable {var}: `{key}` is not a configuration key that can \
                     be set from the environment (scalar keys: {})",
                    scalar_keys().join(", ")
                ),
                Err(message) => {
                    bail!("environment variable {var}: bad value `{value}` for `{key}`: {message}")
                }
            }
        }
        if let Err((key, message)) = config.validate() {
            let env_name = key.replacen('.', "_", 1);
            if let Some((_, var)) = from_env.iter().rev().find(|(k, _)| *k == env_name) {
                bail!("environment variable {var}: bad value for `{key}`: {message}");
            }
            if let Some((name, text)) = file {
                if let Some((line, column)) = key_position(text, key) {
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

    /// Sets a top-level scalar key from its text form (as given in an environment variable).
    /// `Ok(false)` if `key` is not such a key.
    fn set_scalar(&mut self, key: &str, value: &str) -> std::result::Result<bool, String> {
        match key {
            "connect_timeout_ms" => self.connect_timeout_ms = parse(value)?,
            "park_idle_after_ms" => self.park_idle_after_ms = parse(value)?,
            "max_outbound_buffer" => self.max_outbound_buffer = parse(value)?,
            "max_keepalive" => self.max_keepalive = parse(value)?,
            "max_inflight" => self.max_inflight = parse(value)?,
            "receive_maximum" => self.receive_maximum = parse(value)?,
            "max_queued_messages" => self.max_queued_messages = parse(value)?,
            "max_queued_bytes" => self.max_queued_bytes = parse(value)?,
            "max_packet_size" => self.max_packet_size = parse(value)?,
            "max_topic_length" => self.max_topic_length = parse(value)?,
            "max_topic_levels" => self.max_topic_levels = parse(value)?,
            "topic_alias_maximum" => self.topic_alias_maximum = parse(value)?,
            "retain_available" => self.retain_available = parse(value)?,
            "max_session_expiry" => self.max_session_expiry = parse(value)?,
            "allow_zero_length_client_id" => self.allow_zero_length_client_id = parse(value)?,
            "queue_full_policy" => self.queue_full_policy = parse(value)?,
            "sys_interval" => self.sys_interval = parse(value)?,
            "worker_threads" => self.worker_threads = parse(value)?,
            "max_publish_rate" => self.max_publish_rate = parse(value)?,
            "max_subscriptions_per_client" => self.max_subscriptions_per_client = parse(value)?,
            "max_connections" => self.max_connections = parse(value)?,
            "max_connection_rate_per_ip" => self.max_connection_rate_per_ip = parse(value)?,
            "log_connections" => self.log_connections = parse(value)?,
            // `[http]` keys that deployments set from the environment (a Secret, a port).
            "http_token" => self.http.token = Some(value.to_owned()),
            "http_listen" => self.http.listen = Some(crate::address::parse(value)?),
            _ => return Ok(false),
        }
        Ok(true)
    }

    /// Range checks the types alone do not express; the error names the key.
    fn validate(&self) -> std::result::Result<(), (&'static str, String)> {
        let at_least_one = |key, value: u64| {
            if value == 0 {
                Err((key, "must be at least 1".to_owned()))
            } else {
                Ok(())
            }
        };
        if self.listen.as_ref().is_some_and(Vec::is_empty) {
            return Err(("listen", "must list at least one address".to_owned()));
        }
        at_least_one("connect_timeout_ms", self.connect_timeout_ms)?;
        at_least_one("max_outbound_buffer", self.max_outbound_buffer as u64)?;
        at_least_one("max_inflight", self.max_inflight.into())?;
        at_least_one("receive_maximum", self.receive_maximum.into())?;
        at_least_one("max_topic_levels", self.max_topic_levels as u64)?;
        if !(2..=MAX_MQTT_PACKET).contains(&self.max_packet_size) {
            return Err((
                "max_packet_size",
                format!("must be between 2 and {MAX_MQTT_PACKET}"),
            ));
        }
        if !(1..=65_535).contains(&self.max_topic_length) {
            return Err(("max_topic_length", "must be between 1 and 65535".to_owned()));
        }
        at_least_one("fsync_interval_ms", self.storage.fsync_interval_ms)?;
        crate::security_config::validate(&self.listener)?;
        if self.http.token.is_some() && self.http.token_file.is_some() {
            return Err((
                "http.token_file",
                "set http.token or http.token_file, not both".to_owned(),
            ));
        }
        if self.http.token.as_deref().map(str::trim) == Some(PLACEHOLDER_TOKEN) {
            return Err((
                "http.token",
                format!("`{PLACEHOLDER_TOKEN}` is a published placeholder: set a secret token"),
            ));
        }
        if let Some(listen) = self.http.listen {
            let has_token = self.http.token.is_some()
                || self.http.token_file.is_some()
                || self.http.generate_token;
            if self.http.enabled != Some(false) && !listen.ip().is_loopback() && !has_token {
                return Err((
                    "http.listen",
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

/// The keys `HALYARD_<KEY>` can set: every top-level key whose value is not a list or table.
pub fn scalar_keys() -> Vec<String> {
    let defaults = match toml::Value::try_from(FileConfig::default()) {
        Ok(toml::Value::Table(table)) => table,
        _ => toml::Table::new(),
    };
    defaults
        .into_iter()
        .filter(|(_, value)| !value.is_array() && !value.is_table())
        .map(|(key, _)| key)
        .collect()
}

fn parse<T>(value: &str) -> std::result::Result<T, String>
where
    T: FromStr,
    T::Err: Display,
{
    value
        .trim()
        .parse()
        .map_err(|error: T::Err| error.to_string())
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
            "[storage]\nbackend = \"memory\"\ndata_dir = \"/var/lib/halyard\"\nfsync = \"interval\"\nfsync_interval_ms = 50\n",
        )
        .expect("valid");
        assert_eq!(
            config.storage,
            StorageConfig {
                backend: StorageBackend::Memory,
                data_dir: PathBuf::from("/var/lib/halyard"),
                fsync: FsyncMode::Interval,
                fsync_interval_ms: 50,
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
    fn every_scalar_key_can_be_set_from_the_environment() {
        let keys = scalar_keys();
        assert_eq!(keys.len(), 23, "{keys:?}");
        for key in keys {
            let mut config = FileConfig::default();
            let value =
                if key.contains("available") || key.starts_with("allow") || key.starts_with("log_")
                {
                    "false"
                } else if key == "queue_full_policy" {
                    "pushback"
                } else {
                    "3"
                };
            assert_eq!(config.set_scalar(&key, value), Ok(true), "{key}");
            assert_ne!(config, FileConfig::default(), "{key} had no effect");
        }
    }
}
