//! Server process behaviour: listening lines, connect timeout, graceful shutdown.

mod common;

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::*;
use halyard_codec::{ProtocolVersion, ReasonCode};

/// A socket that never sends CONNECT is closed after connect_timeout_ms (500 ms): asserted
/// between 0.4 s and 2 s ([MQTT-3.1.4-1] spirit; DoS protection, 4.8 of the 3.1.1 security
/// notes).
#[tokio::test]
async fn silent_socket_closed_after_connect_timeout() {
    let broker = Broker::start_with_config("connect_timeout_ms = 500\n");
    let mut c = RawClient::connect(broker.addr()).await;
    let start = Instant::now();
    c.expect_closed_within(Duration::from_secs(4)).await;
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(400),
        "closed too early: {took:?}"
    );
    assert!(
        took <= Duration::from_millis(2000),
        "closed too late: {took:?}"
    );
}

/// A half-sent CONNECT does not hold the connection open past connect_timeout_ms either.
#[tokio::test]
async fn partial_connect_closed_after_connect_timeout() {
    let broker = Broker::start_with_config("connect_timeout_ms = 500\n");
    let mut c = RawClient::connect(broker.addr()).await;
    let connect = raw_connect_v311("partial");
    c.send_bytes(&connect[..5]).await;
    c.expect_closed_within(Duration::from_secs(3)).await;
}

/// The connect timeout does not apply after CONNECT: a connected client stays up.
#[tokio::test]
async fn connected_client_not_affected_by_connect_timeout() {
    let broker = Broker::start_with_config("connect_timeout_ms = 500\n");
    let mut c = RawClient::connect_v311(broker.addr(), "fine", true).await;
    c.expect_nothing(1000).await;
    c.ping().await;
}

/// SIGTERM: an MQTT 5 client receives DISCONNECT 0x8B (Server shutting down), a 3.1.1
/// client is closed, and the process exits with status 0.
#[tokio::test]
async fn sigterm_disconnects_clients_with_0x8b_and_exits_0() {
    let mut broker = Broker::start();
    let mut v5 = RawClient::connect_v5(broker.addr(), "five", true).await;
    let mut v3 = RawClient::connect_v311(broker.addr(), "three", true).await;
    broker.sigterm();
    v5.expect_disconnect(ReasonCode::SERVER_SHUTTING_DOWN).await;
    v3.expect_closed().await;
    let status = broker
        .wait_exit(Duration::from_secs(10))
        .expect("halyard did not exit after SIGTERM");
    assert!(status.success(), "exit status {status:?}");
}

/// After SIGTERM the listener stops accepting connections.
#[tokio::test]
async fn sigterm_stops_listener() {
    let mut broker = Broker::start();
    let addr = broker.addr();
    broker.sigterm();
    broker.wait_exit(Duration::from_secs(10)).expect("exit");
    assert!(std::net::TcpStream::connect(addr).is_err());
}

/// One `halyard listening on ADDR` line per `--listen`, each accepting MQTT.
#[tokio::test]
async fn one_listening_line_per_listener() {
    let mut child = halyard_cmd()
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--listen",
            "127.0.0.1:0",
            "--no-http",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut addrs = Vec::new();
    while addrs.len() < 2 {
        let line = rx
            .recv_timeout(Duration::from_secs(20))
            .expect("listening line");
        let addr: std::net::SocketAddr = line
            .strip_prefix("halyard listening on ")
            .unwrap_or_else(|| panic!("unexpected stdout line {line:?}"))
            .parse()
            .expect("address");
        addrs.push(addr);
    }
    assert_ne!(addrs[0].port(), addrs[1].port());
    for addr in &addrs {
        let (_c, ack) =
            RawClient::handshake(*addr, connect_packet(ProtocolVersion::V3_1_1, "x", true)).await;
        assert_eq!(ack.code, ReasonCode::SUCCESS);
    }
    let _ = child.kill();
    let _ = child.wait();
}
