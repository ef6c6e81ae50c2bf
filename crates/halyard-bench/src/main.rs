//! `halyard-bench`: MQTT load generator. Prints one JSON line on stdout per run.
//!
//! ```text
//! halyard-bench fanin   --port 1883 --publishers 4 --qos 1
//! halyard-bench fanout  --subscribers 8
//! halyard-bench pairs   --publishers 16
//! halyard-bench latency --qos 1 --rate 10000
//! halyard-bench conns   --connections 10000 --hold 10
//! halyard-bench fanin   --port 1883 --subscriber-port 1884 --qos 1   # across cluster nodes
//! halyard-bench takeover --port 1883 --takeover-port 1884 --rounds 100
//! halyard-bench slow-subscriber --mqtt-version 5 --qos 1 --payload 1024
//! halyard-bench reconnect --mqtt-version 5 --session-expiry 86400
//! halyard-bench stalled-qos0 --connections 100 --payload 1024 --rate 1000
//! ```

use std::net::{SocketAddr, ToSocketAddrs};
use std::process::ExitCode;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, Context, Result};
use clap::{Args, Parser};
use halyard_bench::run::{run, version_of, Params, Scenario};
use halyard_bench::sys::{available_cpus, raise_nofile_limit};

/// MQTT load generator for Halyard (works against any MQTT 3.1.1 / 5 broker).
///
/// Each message carries (publisher id, sequence number, send timestamp), so lost and
/// duplicate deliveries are counted exactly and latency is measured end to end. Throughput
/// counts only deliveries received inside the measurement window (after --warmup, for
/// --duration seconds); after the window, publishing stops and the tool waits up to --drain
/// seconds for outstanding deliveries before computing `lost`.
#[derive(Debug, Parser)]
#[command(name = "halyard-bench", version)]
struct Cli {
    /// The scenario to run.
    #[arg(value_enum)]
    scenario: Scenario,
    #[command(flatten)]
    opts: Opts,
}

#[derive(Debug, Args)]
struct Opts {
    /// Broker host.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Broker port (publishers'; in takeover, the node where sessions start).
    #[arg(long, default_value_t = 1883)]
    port: u16,
    /// Port on the same host for the subscribers (default: --port): another node of a
    /// cluster, so that every delivery crosses the cluster.
    #[arg(long)]
    subscriber_port: Option<u16>,
    /// takeover: port on the same host of the node that takes the sessions over.
    #[arg(long)]
    takeover_port: Option<u16>,
    /// takeover: sessions taken over, one after another.
    #[arg(long, default_value_t = 100)]
    rounds: usize,
    /// QoS of publications and subscriptions.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=2))]
    qos: u8,
    /// Payload bytes per message (at least 24: the benchmark header).
    #[arg(long, default_value_t = 64)]
    payload: usize,
    /// Measurement window, seconds.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Warm-up before the window, seconds (traffic flows, nothing is counted toward the rate).
    #[arg(long, default_value_t = 2.0)]
    warmup: f64,
    /// Longest wait after the window for outstanding deliveries and acks, seconds.
    #[arg(long, default_value_t = 5.0)]
    drain: f64,
    /// Maximum unacknowledged QoS 1/2 publications per publisher (capped by an MQTT 5
    /// broker's Receive Maximum).
    #[arg(long, default_value_t = 32)]
    inflight: usize,
    /// Publishers (default: fanin 4, pairs 4, fanout 1, latency 1).
    #[arg(long)]
    publishers: Option<usize>,
    /// Subscribers (default: fanout 8, otherwise 1; pairs always has one per publisher).
    #[arg(long)]
    subscribers: Option<usize>,
    /// Messages per second per publisher (default: latency 10000, otherwise as fast as TCP
    /// allows).
    #[arg(long)]
    rate: Option<f64>,
    /// Connections to open (conns), or subscribers that never read (stalled-qos0).
    #[arg(long, default_value_t = 10_000)]
    connections: usize,
    /// Parallel connection attempts (conns).
    #[arg(long, default_value_t = 64)]
    connect_concurrency: usize,
    /// Seconds to hold the connections open (conns) so an outside script can sample the
    /// broker's memory; a line `halyard-bench: holding N connections` goes to stderr when
    /// the hold begins.
    #[arg(long, default_value_t = 10.0)]
    hold: f64,
    /// Keep-alive in CONNECT, seconds; 0 turns it off (the tool sends no PINGREQ).
    #[arg(long, default_value_t = 0)]
    keep_alive: u16,
    /// reconnect: MQTT 5 Session Expiry Interval in every CONNECT, seconds (4294967295 =
    /// never expires).
    #[arg(long, default_value_t = u32::MAX)]
    session_expiry: u32,
    /// Process id of the broker, if it runs on this machine: the report then carries its
    /// peak RSS (VmHWM from /proc/PID/status) at the end of the run.
    #[arg(long)]
    broker_pid: Option<u32>,
    /// MQTT protocol version: 3.1.1 or 5.
    #[arg(long, default_value = "3.1.1")]
    mqtt_version: String,
    /// Tokio worker threads (default: available CPUs).
    #[arg(long)]
    threads: Option<usize>,
}

fn params(scenario: Scenario, o: Opts) -> Result<(Params, SocketAddr)> {
    version_of(&o.mqtt_version)?;
    if o.payload < halyard_bench::payload::HEADER_LEN {
        return Err(anyhow!(
            "--payload must be at least {} bytes",
            halyard_bench::payload::HEADER_LEN
        ));
    }
    if !(o.duration > 0.0 && o.warmup >= 0.0 && o.drain >= 0.0 && o.hold >= 0.0) {
        return Err(anyhow!(
            "--duration must be > 0; --warmup, --drain, --hold >= 0"
        ));
    }
    if scenario == Scenario::Takeover && o.takeover_port.is_none() {
        return Err(anyhow!("takeover needs --takeover-port (the other node)"));
    }
    if o.rate.is_some_and(|r| r <= 0.0 || !r.is_finite()) {
        return Err(anyhow!("--rate must be a positive number"));
    }
    let addr = (o.host.as_str(), o.port)
        .to_socket_addrs()
        .with_context(|| format!("resolving {}:{}", o.host, o.port))?
        .next()
        .ok_or_else(|| anyhow!("{}:{} resolves to no address", o.host, o.port))?;
    let (publishers, subscribers) = match scenario {
        Scenario::Fanin => (o.publishers.unwrap_or(4), o.subscribers.unwrap_or(1)),
        Scenario::Fanout => (o.publishers.unwrap_or(1), o.subscribers.unwrap_or(8)),
        Scenario::Pairs => {
            let n = o.publishers.or(o.subscribers).unwrap_or(4);
            (n, n)
        }
        Scenario::Latency | Scenario::SlowSubscriber | Scenario::StalledQos0 => {
            (o.publishers.unwrap_or(1), o.subscribers.unwrap_or(1))
        }
        Scenario::Conns | Scenario::Takeover | Scenario::Reconnect => (0, 0),
    };
    let rate = match scenario {
        Scenario::Latency | Scenario::StalledQos0 => Some(o.rate.unwrap_or(10_000.0)),
        _ => o.rate,
    };
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let run_id = format!("{:x}{:05x}", std::process::id(), nanos >> 12);
    let params = Params {
        scenario,
        host: o.host,
        port: o.port,
        subscriber_port: o.subscriber_port,
        takeover_port: o.takeover_port,
        rounds: o.rounds,
        qos: o.qos,
        payload: o.payload,
        duration_s: o.duration,
        warmup_s: o.warmup,
        drain_s: o.drain,
        inflight: o.inflight.max(1),
        publishers,
        subscribers,
        rate,
        connections: o.connections,
        connect_concurrency: o.connect_concurrency,
        hold_s: o.hold,
        keep_alive: o.keep_alive,
        session_expiry: o.session_expiry,
        broker_pid: o.broker_pid,
        mqtt_version: o.mqtt_version,
        threads: o.threads.unwrap_or_else(available_cpus).max(1),
        run_id,
    };
    Ok((params, addr))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let (params, addr) = match params(cli.scenario, cli.opts) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("halyard-bench: {e:#}");
            return ExitCode::from(2);
        }
    };
    raise_nofile_limit();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(params.threads)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("halyard-bench: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(params, addr)) {
        Ok(report) => {
            match serde_json::to_string(&report) {
                Ok(line) => println!("{line}"),
                Err(e) => {
                    eprintln!("halyard-bench: cannot serialise the report: {e}");
                    return ExitCode::FAILURE;
                }
            }
            if report.error_count > 0 {
                ExitCode::from(3)
            } else {
                ExitCode::SUCCESS
            }
        }
        Err(e) => {
            eprintln!("halyard-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}
