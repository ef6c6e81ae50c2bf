//! The load generator's scenarios against the real server on an ephemeral port: what the
//! benchmark script reports must be what happened.

use std::net::SocketAddr;

use halyard_bench::run::{run, Params, Scenario};
use halyard_server::{Server, ServerConfig};
use tokio::sync::oneshot;

async fn start_server() -> (SocketAddr, oneshot::Sender<()>) {
    let config = ServerConfig {
        listeners: vec![SocketAddr::from(([127, 0, 0, 1], 0))],
        ..ServerConfig::default()
    };
    let server = Server::bind(config).await.expect("bind");
    let addr = server.local_addrs()[0];
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(server.run(async {
        let _ = stopped.await;
    }));
    (addr, stop)
}

fn params(scenario: Scenario, addr: SocketAddr) -> Params {
    Params {
        scenario,
        host: addr.ip().to_string(),
        port: addr.port(),
        subscriber_port: None,
        takeover_port: None,
        rounds: 0,
        qos: 1,
        payload: 64,
        duration_s: 1.0,
        warmup_s: 0.2,
        drain_s: 5.0,
        inflight: 32,
        publishers: 1,
        subscribers: 1,
        rate: None,
        connections: 0,
        connect_concurrency: 1,
        hold_s: 0.2,
        keep_alive: 0,
        session_expiry: u32::MAX,
        broker_pid: None,
        mqtt_version: "3.1.1".to_owned(),
        threads: 1,
        run_id: format!("t{}", std::process::id()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conns_opens_every_connection_with_fewer_connectors_than_connections() {
    let (addr, stop) = start_server().await;
    let report = run(
        Params {
            connections: 300,
            connect_concurrency: 16,
            ..params(Scenario::Conns, addr)
        },
        addr,
    )
    .await
    .expect("conns runs");
    assert_eq!(report.error_count, 0, "errors: {:?}", report.errors);
    assert_eq!(report.connected, Some(300));
    assert_eq!(report.closed_during_hold, Some(0));
    let latency = report
        .connect_latency_us
        .expect("one sample per connection");
    assert_eq!(latency.count, 300);
    assert!(report.connects_per_s.is_some_and(|rate| rate > 0.0));
    let _ = stop.send(());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latency_at_qos1_loses_nothing_and_measures_every_delivery_in_the_window() {
    let (addr, stop) = start_server().await;
    let report = run(
        Params {
            rate: Some(2_000.0),
            ..params(Scenario::Latency, addr)
        },
        addr,
    )
    .await
    .expect("latency runs");
    assert_eq!(report.error_count, 0, "errors: {:?}", report.errors);
    assert_eq!(
        report.lost,
        Some(0),
        "QoS 1 [MQTT-4.3.2]: nothing acknowledged is lost"
    );
    assert_eq!(report.duplicates, Some(0));
    let in_window = report.received_in_window.expect("counted");
    // About 2,000 in the 1 s window. A loaded CI machine may publish late, and a late burst
    // from the warm-up may land in the window, but never more than the 2,400 due by its end.
    assert!(
        (500..=2_410).contains(&in_window),
        "{in_window} in the window"
    );
    let latency = report.latency_us.expect("latencies");
    assert_eq!(
        latency.count, in_window,
        "one latency per delivery in the window"
    );
    assert!(latency.p50 > 0.0 && latency.p50 <= latency.p99);
    let _ = stop.send(());
}
