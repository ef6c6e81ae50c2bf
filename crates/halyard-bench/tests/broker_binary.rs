//! The issue 14 scenarios (slow subscriber, deep-queue fan-in, reconnect loop) for a moment
//! against the real `halyard` binary, as `scripts/bench-vs-mosquitto` runs them: delivery
//! happens and the report carries the figures the script reads. No timing is asserted.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use halyard_bench::run::{run, Params, Report, Scenario};
use tempfile::TempDir;

/// The `halyard` binary of this build profile, built first if needed (it belongs to another
/// package, so cargo does not hand its path to this one's tests).
fn halyard_binary() -> PathBuf {
    let mut build = Command::new(env!("CARGO"));
    build.args(["build", "--quiet", "-p", "halyard", "--bin", "halyard"]);
    if !cfg!(debug_assertions) {
        build.arg("--release");
    }
    let status = build
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .status()
        .expect("run cargo build");
    assert!(status.success(), "cargo build -p halyard failed");
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<this test> -> target/<profile>/halyard
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("test executable in target/<profile>/deps");
    profile_dir.join(format!("halyard{}", std::env::consts::EXE_SUFFIX))
}

/// A `halyard serve` child on an ephemeral port, killed when dropped.
struct Broker {
    child: Child,
    addr: SocketAddr,
    _dir: TempDir,
}

impl Broker {
    /// Starts the binary with the memory backend and `settings` (top-level TOML keys).
    fn start(settings: &str) -> Broker {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = dir.path().join("halyard.toml");
        std::fs::write(
            &config,
            format!("{settings}\n[storage]\nbackend = \"memory\"\n"),
        )
        .expect("write config");
        let mut child = Command::new(halyard_binary())
            .args(["serve", "--no-http", "--listen", "127.0.0.1:0", "--config"])
            .arg(&config)
            .current_dir(dir.path())
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start halyard");
        let stdout = child.stdout.take().expect("stdout");
        let addr = BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .find_map(|line| {
                line.strip_prefix("halyard listening on ")
                    .and_then(|a| a.parse().ok())
            })
            .expect("halyard prints its listening address");
        Broker {
            child,
            addr,
            _dir: dir,
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn params(scenario: Scenario, broker: &Broker) -> Params {
    Params {
        scenario,
        host: broker.addr.ip().to_string(),
        port: broker.addr.port(),
        subscriber_port: None,
        takeover_port: None,
        rounds: 0,
        qos: 1,
        payload: 64,
        duration_s: 0.5,
        warmup_s: 0.1,
        drain_s: 5.0,
        inflight: 32,
        publishers: 1,
        subscribers: 1,
        rate: None,
        connections: 0,
        connect_concurrency: 1,
        hold_s: 0.0,
        keep_alive: 0,
        session_expiry: u32::MAX,
        broker_pid: Some(broker.child.id()),
        mqtt_version: "5".to_owned(),
        threads: 2,
        run_id: format!("t{}", std::process::id()),
    }
}

fn assert_clean(report: &Report) {
    assert_eq!(report.error_count, 0, "errors: {:?}", report.errors);
    assert!(
        report.broker_peak_rss_kb.is_some_and(|kb| kb > 0),
        "peak RSS read from /proc"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_subscriber_reports_the_healthy_rate_both_ways_and_the_stuck_one_s_losses() {
    // The default policy (drop_oldest): the stuck subscriber pays alone.
    let broker = Broker::start("max_inflight = 32\nmax_queued_messages = 1000");
    let report = run(
        Params {
            payload: 1024,
            // Slower than the healthy subscriber reads, so that only the stuck one's queue
            // fills (1,000 messages take half the window).
            rate: Some(2_000.0),
            ..params(Scenario::SlowSubscriber, &broker)
        },
        broker.addr,
    )
    .await
    .expect("slow-subscriber runs");
    assert_clean(&report);
    assert!(report.baseline_rate_msgs_per_s.is_some_and(|r| r > 0.0));
    assert!(report.rate_msgs_per_s.is_some_and(|r| r > 0.0));
    assert!(report.healthy_ratio.is_some_and(|r| r > 0.0));
    assert_eq!(
        report.lost,
        Some(0),
        "the healthy subscriber gets every acknowledged message"
    );
    assert_eq!(report.rejected, Some(0), "drop_oldest refuses no publisher");
    let expected = report.stuck_expected.expect("stuck_expected");
    assert_eq!(report.sent, Some(expected));
    let received = report.stuck_received.expect("stuck_received");
    assert!(received > 0, "the stuck subscriber got its window at least");
    assert_eq!(report.stuck_dropped, Some(expected - received));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deep_queue_fan_in_delivers_everything_with_either_queue_and_reports_peak_rss() {
    for queued in [1_000, 10_000_000] {
        let broker = Broker::start(&format!(
            "max_inflight = 32\nmax_queued_messages = {queued}\nqueue_full_policy = \"pushback\""
        ));
        let report = run(
            Params {
                publishers: 4,
                inflight: 20,
                mqtt_version: "3.1.1".to_owned(),
                ..params(Scenario::Fanin, &broker)
            },
            broker.addr,
        )
        .await
        .expect("fanin runs");
        assert_clean(&report);
        assert!(report.rate_msgs_per_s.is_some_and(|r| r > 0.0), "{queued}");
        assert_eq!(report.lost, Some(0), "queue {queued}: QoS 1 loses nothing");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnect_loop_resumes_the_session_every_time_after_the_first() {
    let broker = Broker::start("");
    for expiry in [86_400, u32::MAX] {
        let report = run(
            Params {
                session_expiry: expiry,
                run_id: format!("t{}-{expiry}", std::process::id()),
                ..params(Scenario::Reconnect, &broker)
            },
            broker.addr,
        )
        .await
        .expect("reconnect runs");
        assert_clean(&report);
        let cycles = report.connections.expect("cycles");
        assert!(report.connected.is_some_and(|n| n > 0 && n <= cycles));
        assert!(report.connects_per_s.is_some_and(|r| r > 0.0));
        assert_eq!(
            report.session_present,
            Some(cycles - 1),
            "expiry {expiry}: every CONNECT but the first resumes the session [MQTT-3.2.2-3]"
        );
        assert!(report.connect_latency_us.is_some());
    }
}
