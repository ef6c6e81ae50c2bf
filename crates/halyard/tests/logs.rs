//! What an operator reads (issue 16): one info line per client connect (client id, address,
//! protocol, clean start, keep-alive) and per disconnect (why), as `mosquitto -v` prints,
//! and none with `log_connections = false`.

mod common;

use std::time::{Duration, Instant};

use common::*;
use halyard_codec::ProtocolVersion;

/// Waits until the broker's logs hold `count` lines containing `needle`; returns the logs.
fn wait_for_lines(broker: &Broker, needle: &str, count: usize) -> String {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let logs = broker.logs();
        if logs.lines().filter(|line| line.contains(needle)).count() >= count {
            return logs;
        }
        assert!(
            Instant::now() < deadline,
            "no {count} x {needle:?} in:\n{logs}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn line_of<'a>(logs: &'a str, event: &str, client_id: &str) -> &'a str {
    let id = format!("client_id={client_id} ");
    let matching: Vec<&str> = logs
        .lines()
        .filter(|line| line.contains(event) && line.contains(&id))
        .collect();
    assert_eq!(
        matching.len(),
        1,
        "one {event} line for {client_id}:\n{logs}"
    );
    matching[0]
}

#[tokio::test]
async fn one_line_per_connect_and_disconnect() {
    let broker = Broker::start_with_config("sys_interval = 0\n");
    let mut v5 = RawClient::connect_v5(broker.addr(), "log-v5", true).await;
    let v3 = RawClient::connect_v311(broker.addr(), "log-v3", false).await;
    v5.ping().await;
    v5.disconnect().await;
    v3.drop_abruptly().await;
    let logs = wait_for_lines(&broker, "client disconnected", 2);

    let connected = line_of(&logs, "client connected", "log-v5");
    for field in [
        "remote=127.0.0.1:",
        "5.0",
        "clean_start=true",
        "keep_alive=60",
    ] {
        assert!(connected.contains(field), "{field} in {connected}");
    }
    let connected = line_of(&logs, "client connected", "log-v3");
    for field in ["3.1.1", "clean_start=false"] {
        assert!(connected.contains(field), "{field} in {connected}");
    }
    let gone = line_of(&logs, "client disconnected", "log-v5");
    assert!(
        gone.contains("client sent DISCONNECT 0x00 Normal disconnection"),
        "{gone}"
    );
    let gone = line_of(&logs, "client disconnected", "log-v3");
    assert!(gone.contains("connection lost"), "{gone}");
}

#[tokio::test]
async fn broker_side_reasons_and_refusals_are_named() {
    let broker = Broker::start_with_config("sys_interval = 0\n");
    let _first = RawClient::connect_v5(broker.addr(), "taken", false).await;
    let mut second = RawClient::connect_v5(broker.addr(), "taken", false).await;
    second.ping().await;
    let logs = wait_for_lines(&broker, "client disconnected", 1);
    assert!(
        logs.contains("broker sent DISCONNECT 0x8E Session taken over"),
        "{logs}"
    );
    // A CONNACK refusal is one line with the code's name.
    let mut connect = connect_packet(ProtocolVersion::V5, "", true);
    connect.properties.authentication_method = Some("SCRAM".into());
    let (_refused, ack) = RawClient::handshake(broker.addr(), connect).await;
    assert_eq!(
        ack.code,
        halyard_codec::ReasonCode::BAD_AUTHENTICATION_METHOD
    );
    let logs = wait_for_lines(&broker, "client refused", 1);
    assert!(logs.contains("0x8C Bad authentication method"), "{logs}");
}

#[tokio::test]
async fn log_connections_false_turns_them_off() {
    let broker = Broker::start_with_config("sys_interval = 0\nlog_connections = false\n");
    let quiet = RawClient::connect_v311(broker.addr(), "quiet", true).await;
    quiet.disconnect().await;
    // A later exchange with the broker task: the first client's events were handled by then.
    let mut probe = RawClient::connect_v311(broker.addr(), "probe", true).await;
    probe.ping().await;
    let logs = broker.logs();
    assert!(!logs.contains("client connected"), "{logs}");
    assert!(!logs.contains("client disconnected"), "{logs}");
}
