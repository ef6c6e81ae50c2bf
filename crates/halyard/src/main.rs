//! `halyard`: the MQTT broker binary (command line, configuration file, logging, signals).

mod address;
mod client;
mod client_scram;
mod client_tls;
mod cluster_cli;
mod cluster_config;
mod config;
mod keys;
mod ops;
mod security_config;
mod service_links;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::future::Future;
use std::io::{IsTerminal, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use halyard_cluster::Coordinator;
use halyard_core::store::Store;
use halyard_core::{Broker, BrokerParts};
use halyard_server::{Server, ServerConfig};
use halyard_store::{FsyncPolicy, MemoryStore, OnCorruption, RedbStore};
use tracing::info;
use tracing_subscriber::filter::{EnvFilter, LevelFilter};

use crate::config::{FileConfig, FsyncMode, OnCorruptionMode, StorageBackend, StorageConfig};

/// Runs on a tokio worker each time it runs out of work: once per memory release round
/// (`halyard_server::memory_release_round`, which changes after each burst of connections
/// parking), has mimalloc give this thread's free pages back to the OS.
///
/// Why: idle connections park (see `halyard-server`'s `park.rs`), freeing their tasks, about
/// 1 KB each, on whichever worker parks them, mostly not the one that allocated them.
/// mimalloc keeps frees from another thread pending until the owning thread allocates again,
/// so once every connection had gone idle that memory was never returned: with 10,000 parked
/// connections the broker held about 2,000 B of RSS per connection without this and 990-1,010
/// B with it (`halyard-bench conns`, RSS 8 s after connecting). One collection took 0.9-4 ms
/// with 10,000 connections, on a thread that had nothing else to do, once per burst.
fn return_freed_memory() {
    thread_local! {
        static SEEN: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
    }
    let round = halyard_server::memory_release_round();
    if SEEN.get() == round {
        return;
    }
    SEEN.set(round);
    // SAFETY: `mi_collect` takes no pointer and has no precondition: mimalloc documents it as
    // callable at any time from any thread; it works on the calling thread's heap and on
    // mimalloc's own internally synchronized state. mimalloc is this binary's global
    // allocator (above), so every block it may free is one it handed out.
    unsafe { libmimalloc_sys::mi_collect(true) };
}

/// Halyard, an MQTT 3.1 / 3.1.1 / 5.0 broker.
///
/// Without a command, `halyard` runs `halyard serve` with the built-in defaults: MQTT on
/// 127.0.0.1:1883 and [::1]:1883 only (this machine) until a listen address or
/// authentication is configured.
#[derive(Debug, Parser)]
#[command(name = "halyard", version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the broker until SIGINT or SIGTERM, then shut down gracefully.
    ///
    /// Configuration comes from built-in defaults, then the --config file, then HALYARD_<KEY>
    /// environment variables (for example HALYARD_MAX_KEEPALIVE=60), then --listen. After
    /// binding, one line `halyard listening on <ip:port>` per listener is printed on stdout;
    /// logs go to stderr (filter with RUST_LOG, default `info`).
    Serve(ServeArgs),
    /// Parse and validate a configuration file (with HALYARD_<KEY> overrides applied).
    ///
    /// Prints `ok` and exits 0, or prints the error (naming the key and line) and exits 1.
    CheckConfig {
        /// The TOML configuration file to check.
        file: PathBuf,
        /// After `ok`, print every key with its effective value and where it came from
        /// (default, file, or the HALYARD_ variable).
        #[arg(long)]
        show: bool,
    },
    /// List every configuration key: its environment variable, default and meaning.
    ///
    /// With --readme FILE, rewrite the key tables of that README (between its
    /// `<!-- keys: TABLE -->` and `<!-- /keys -->` markers) instead.
    ConfigKeys {
        /// README to update in place.
        #[arg(long, value_name = "FILE")]
        readme: Option<PathBuf>,
    },
    /// Publish MQTT messages (flags like mosquitto_pub: -h -p -t -m -q -r -V 5 ...).
    Pub(client::PubArgs),
    /// Subscribe and print messages (flags like mosquitto_sub: -h -p -t -q -v -C -W ...).
    Sub(client::SubArgs),
    /// Add or update a user in a password file (Mosquitto format, Argon2id hash).
    ///
    /// The password comes from --password, a prompt on a terminal, or the first line of
    /// standard input. Other lines of the file are kept; the file is created if missing.
    Passwd(security_config::PasswdArgs),
    /// Cluster membership at run time: join, leave, status (through a node's admin API).
    Cluster(cluster_cli::ClusterCommand),
}

#[derive(Debug, Default, clap::Args)]
struct ServeArgs {
    /// Address to accept MQTT over TCP on, as IP:PORT; repeat for several. Replaces the
    /// configuration file's `listen` list. Port 0 picks a free port (the line printed on
    /// stdout shows which).
    #[arg(long = "listen", value_name = "ADDR", value_parser = address::parse)]
    listen: Vec<SocketAddr>,
    /// TOML configuration file; every key is optional (see README.md for the reference).
    #[arg(long, short = 'c', value_name = "FILE")]
    config: Option<PathBuf>,
    /// Directory of the data file; overrides `storage.data_dir` (default `./data`).
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// Log line format on stderr: `text` for people, `json` (one object per line) for log
    /// collectors.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Address of the operations HTTP listener (metrics, probes, admin API, status page);
    /// overrides `http.listen`. Port 0 picks a free port; `halyard http listening on
    /// <ip:port>` is printed on stdout after the MQTT lines.
    #[arg(long, value_name = "ADDR", conflicts_with = "no_http", value_parser = address::parse)]
    http_listen: Option<SocketAddr>,
    /// Do not serve HTTP (overrides `http.enabled`).
    #[arg(long)]
    no_http: bool,
    #[command(flatten)]
    cluster: cluster_config::ClusterArgs,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, ValueEnum)]
enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        None => serve(ServeArgs::default()).map(|()| 0),
        Some(Command::Serve(args)) => serve(args).map(|()| 0),
        Some(Command::CheckConfig { file, show }) => check_config(&file, show).map(|()| 0),
        Some(Command::ConfigKeys { readme }) => config_keys(readme.as_deref()).map(|()| 0),
        Some(Command::Pub(args)) => run_client(client::publish(args)).map(|()| 0),
        Some(Command::Sub(args)) => run_client(client::subscribe(args)),
        Some(Command::Passwd(args)) => security_config::passwd(args).map(|()| 0),
        Some(Command::Cluster(command)) => run_client(cluster_cli::run(command)).map(|()| 0),
    };
    let result = match result {
        Ok(0) => Ok(()),
        Ok(status) => return ExitCode::from(status),
        Err(error) => Err(error),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs a client command on a single-threaded runtime (a client needs no more).
fn run_client<T>(future: impl Future<Output = Result<T>>) -> Result<T> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the tokio runtime")?
        .block_on(future)
}

/// `halyard check-config FILE [--show]`.
fn check_config(file: &Path, show: bool) -> Result<()> {
    let config = load_config(Some(file))?;
    // The password and ACL files are part of the configuration: a bad line there must fail
    // the check as it would fail `serve`.
    security_config::Prepared::load(&config)?;
    // So are the cluster's node id (from the hostname, if so configured) and peers.
    cluster_config::cluster_config(
        &config.cluster,
        cluster_config::ClusterArgs::default(),
        &config.storage.data_dir,
    )?;
    println!("ok");
    if show {
        let text = std::fs::read_to_string(file)
            .with_context(|| format!("cannot read config file {}", file.display()))?;
        let in_file: toml::Table = text.parse().context("config file")?;
        let in_file = serde_json::to_value(in_file).unwrap_or_default();
        let effective = ops::redacted_config(&config);
        for key in keys::keys() {
            let Some(value) = keys::lookup(&effective, &key.path) else {
                continue;
            };
            let source = match &key.env {
                Some(var) if std::env::var_os(var).is_some() => var.as_str(),
                _ if keys::lookup(&in_file, &key.path).is_some() => "file",
                _ => "default",
            };
            println!("{} = {value}  # {source}", key.path);
        }
    }
    Ok(())
}

/// `halyard config-keys [--readme FILE]`.
fn config_keys(readme: Option<&Path>) -> Result<()> {
    if let Some(path) = readme {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let updated = keys::update_readme(&text).map_err(anyhow::Error::msg)?;
        std::fs::write(path, updated)
            .with_context(|| format!("cannot write {}", path.display()))?;
        return Ok(());
    }
    let mut stdout = std::io::stdout().lock();
    for key in keys::keys() {
        let env = key.env.as_deref().unwrap_or("-");
        writeln!(
            stdout,
            "{}\t{}\t{}\t{}",
            key.path, env, key.default, key.doc
        )?;
    }
    Ok(())
}

/// Reads the file (if any) and applies the environment.
fn load_config(file: Option<&Path>) -> Result<FileConfig> {
    let text = match file {
        Some(path) => Some(
            std::fs::read_to_string(path)
                .with_context(|| format!("cannot read config file {}", path.display()))?,
        ),
        None => None,
    };
    let name = file.map(|path| path.display().to_string());
    let source = name.as_deref().zip(text.as_deref());
    FileConfig::load(source, std::env::vars_os())
}

/// `halyard serve`.
fn serve(args: ServeArgs) -> Result<()> {
    init_logging(args.log_format)?;
    let file = load_config(args.config.as_deref())?;
    let mut storage = file.storage.clone();
    if let Some(dir) = args.data_dir {
        storage.data_dir = dir;
    }
    let http = ops::http_settings(&file.http, args.http_listen, args.no_http)?;
    let sys_interval = Duration::from_secs(file.sys_interval);
    let cpus = std::thread::available_parallelism().map_or(1, usize::from);
    let worker_threads = file.effective_worker_threads(cpus);
    let effective_config = ops::redacted_config(&file);
    let security = security_config::Prepared::load(&file)?;
    let cluster = cluster_config::cluster_config(&file.cluster, args.cluster, &storage.data_dir)?;
    let listen_configured = file.listen.is_some();
    let authenticated = file.auth.configures_authentication();
    let mut config = ServerConfig::from(file);
    if !args.listen.is_empty() {
        config.listeners = args.listen;
    } else if !listen_configured {
        config.listeners = default_listeners(&config.listeners, authenticated);
    }
    let parts = match cluster {
        Some(_) => BrokerParts::replicated(),
        None => BrokerParts::default(),
    };
    let broker = open_broker(&config, &storage, parts)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(worker_threads)
        .on_thread_park(return_freed_memory)
        .enable_all()
        .build()
        .context("cannot start the tokio runtime")?;
    runtime.block_on(async {
        let shutdown = shutdown_signal()?;
        let coordinator = match cluster {
            Some(cluster) => {
                let node_id = cluster.node_id;
                let coordinator = Coordinator::start(cluster)
                    .await
                    .context("cannot start the cluster node")?;
                info!(node_id, "cluster node started");
                Some(Arc::new(coordinator))
            }
            None => None,
        };
        let mut server = Server::bind_with(config, broker).await?;
        if let Some(coordinator) = coordinator {
            server.join_cluster(coordinator);
        }
        server.set_sys_interval(Some(sys_interval));
        server.set_effective_config(effective_config);
        let http_addr = ops::bind_http(&mut server, http).await?;
        let extra_listeners = security.install(&mut server).await?;
        security_config::reload_on_sighup(server.reload_handle())?;
        let mut stdout = std::io::stdout().lock();
        for addr in server.local_addrs() {
            writeln!(stdout, "halyard listening on {addr}")?;
        }
        for (kind, addr) in extra_listeners {
            writeln!(stdout, "{}", security_config::listening_line(kind, addr))?;
        }
        if let Some(addr) = http_addr {
            writeln!(stdout, "halyard http listening on {addr}")?;
        }
        stdout.flush()?;
        drop(stdout);
        tokio::spawn(server.run(shutdown)).await??;
        Ok::<_, anyhow::Error>(())
    })
}

/// The built-in `listen` addresses this host can bind, with a log line saying why they were
/// chosen and how to open the broker up. IPv6 loopback is left out on hosts without IPv6
/// (some containers), where binding it would stop the start-up.
fn default_listeners(defaults: &[SocketAddr], authenticated: bool) -> Vec<SocketAddr> {
    let ipv6 = std::net::TcpListener::bind((std::net::Ipv6Addr::LOCALHOST, 0)).is_ok();
    let listeners: Vec<SocketAddr> = defaults
        .iter()
        .copied()
        .filter(|addr| ipv6 || addr.is_ipv4())
        .collect();
    let shown = listeners
        .iter()
        .map(SocketAddr::to_string)
        .collect::<Vec<_>>()
        .join(", ");
    if authenticated {
        info!(
            "no `listen` address configured: MQTT on {shown} (every IPv4 interface), as \
             authentication is configured"
        );
    } else {
        info!(
            "local only mode: MQTT on {shown}, reachable from this machine only, as no `listen` \
             address and no authentication are configured; to accept other hosts set \
             `listen = [\"0.0.0.0:1883\"]` in the config file or pass --listen 0.0.0.0:1883 \
             (and set auth.password_file)"
        );
    }
    if !ipv6 {
        info!("IPv6 loopback is not available on this host: not listening on [::1]");
    }
    listeners
}

/// Builds the broker on the configured storage, loading what the store holds.
fn open_broker(
    config: &ServerConfig,
    storage: &StorageConfig,
    parts: BrokerParts,
) -> Result<Broker> {
    let store: Box<dyn Store> = match storage.backend {
        StorageBackend::Memory => Box::new(MemoryStore::new()),
        StorageBackend::Redb => {
            let policy = match storage.fsync {
                FsyncMode::Always => FsyncPolicy::Always,
                FsyncMode::Interval => {
                    FsyncPolicy::Interval(Duration::from_millis(storage.fsync_interval_ms))
                }
                FsyncMode::Never => FsyncPolicy::Never,
            };
            let on_corruption = match storage.on_corruption {
                OnCorruptionMode::Salvage => OnCorruption::Salvage,
                OnCorruptionMode::Refuse => OnCorruption::Refuse,
            };
            let store = RedbStore::open_with(&storage.data_dir, policy, on_corruption)
                .with_context(|| {
                    format!(
                        "cannot open the data directory {}",
                        storage.data_dir.display()
                    )
                })?;
            info!(dir = %storage.data_dir.display(), fsync = storage.fsync.name(), "storage opened");
            Box::new(store)
        }
    };
    let started = Instant::now();
    let broker = Broker::with_store_and_parts(
        config.broker.clone(),
        parts,
        store,
        Instant::now(),
        SystemTime::now(),
    )
    .context("cannot load the stored state")?;
    let stats = broker.stats();
    info!(
        sessions = stats.sessions,
        retained = stats.retained_messages,
        elapsed_ms = started.elapsed().as_millis(),
        "stored state loaded"
    );
    Ok(broker)
}

/// Logs to stderr, so that stdout carries only the machine-readable `listening` lines.
fn init_logging(format: LogFormat) -> Result<()> {
    // openraft logs every vote and replication change at info; its warnings are what an
    // operator needs by default.
    let filter = match std::env::var("RUST_LOG") {
        Ok(_) => EnvFilter::builder()
            .with_default_directive(LevelFilter::INFO.into())
            .from_env_lossy(),
        Err(_) => EnvFilter::new("info,openraft=warn"),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    let installed = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
    installed.map_err(|error| anyhow::anyhow!("cannot set up logging: {error}"))
}

/// Completes on the first SIGINT or SIGTERM. The handlers are installed before the server
/// binds, so a signal that arrives during start-up is not lost.
#[cfg(unix)]
fn shutdown_signal() -> Result<impl Future<Output = ()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut interrupt = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    let mut terminate = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    Ok(async move {
        tokio::select! {
            _ = interrupt.recv() => info!("SIGINT received"),
            _ = terminate.recv() => info!("SIGTERM received"),
        }
    })
}

/// Completes on Ctrl-C (the only portable signal).
#[cfg(not(unix))]
fn shutdown_signal() -> Result<impl Future<Output = ()>> {
    Ok(async {
        if tokio::signal::ctrl_c().await.is_ok() {
            info!("Ctrl-C received");
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn no_command_means_serve() {
        let cli = Cli::try_parse_from(["halyard"]).expect("parses");
        assert!(cli.command.is_none());
    }

    #[test]
    fn listen_is_repeatable() {
        let cli = Cli::try_parse_from([
            "halyard",
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--listen",
            "[::1]:1884",
            "--log-format",
            "json",
        ])
        .expect("parses");
        let Some(Command::Serve(args)) = cli.command else {
            panic!("expected serve");
        };
        assert_eq!(args.listen.len(), 2);
        assert_eq!(args.log_format, LogFormat::Json);
    }

    #[test]
    fn bad_listen_address_is_rejected() {
        assert!(Cli::try_parse_from(["halyard", "serve", "--listen", "nowhere"]).is_err());
    }
}
