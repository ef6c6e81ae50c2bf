//! `halyard pub` / `halyard sub` are as strict as mosquitto_pub / mosquitto_sub (issue 16):
//! every case runs against the real broker and, when Debian's mosquitto-clients is installed
//! (CI installs it), the same arguments go to mosquitto's client for comparison.

mod common;

use std::process::{Command, Output, Stdio};

use common::*;
use halyard_codec::{ProtocolVersion, QoS};

/// Runs a mosquitto client with `args`, or `None` when it is not installed.
fn mosquitto(tool: &str, args: &[&str]) -> Option<Output> {
    match Command::new(tool).args(args).stdin(Stdio::null()).output() {
        Ok(output) => Some(output),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            eprintln!("{tool} not installed: compared with halyard's expected status only");
            None
        }
        Err(error) => panic!("cannot run {tool}: {error}"),
    }
}

/// `halyard pub|sub ARGS -p PORT` and, if installed, `mosquitto_pub|sub ARGS -p PORT`: both
/// must exit with `status`; returns halyard's (stdout, stderr).
fn both(command: &str, args: &[&str], port: u16, status: i32) -> (String, String) {
    let port = port.to_string();
    let mut full = vec![command, "-p", &port];
    full.extend_from_slice(args);
    let (exit, stdout, stderr) = run_halyard(&full);
    assert_eq!(exit.code(), Some(status), "halyard {full:?}: {stderr}");
    let tool = format!("mosquitto_{command}");
    if let Some(output) = mosquitto(&tool, &full[1..]) {
        assert_eq!(
            output.status.code(),
            Some(status),
            "{tool} {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    (stdout, stderr)
}

#[test]
fn invalid_topics_and_filters_are_refused_before_sending() {
    let broker = Broker::start_with_config("sys_interval = 0\n");
    for (command, args) in [
        // [MQTT-3.3.2-2]: no wildcards in a topic name.
        ("pub", &["-t", "a/#", "-m", "x"][..]),
        ("pub", &["-t", "a/+/b", "-m", "x"]),
        // [MQTT-4.7.1-1]: `#` last and alone; [MQTT-4.7.1-2]: `+` alone in its level.
        ("sub", &["-t", "a/#/b", "-W", "1"]),
        ("sub", &["-t", "a+", "-W", "1"]),
        ("sub", &["-t", "ok", "-t", "a/b#", "-W", "1"]),
        // Wills follow the topic name rules too.
        ("pub", &["-t", "a", "-m", "x", "--will-topic", "w/#"]),
        ("pub", &["-t", "a", "-m", "x", "--will-payload", "p"]),
    ] {
        let (_, stderr) = both(command, args, broker.port(), 1);
        assert!(
            stderr.contains("invalid") || stderr.contains("no will topic"),
            "{args:?}: {stderr}"
        );
    }
    // [MQTT-4.7.3-1]: topics are at least one character long. mosquitto_pub prints an error
    // but exits 0 and mosquitto_sub waits for nothing; halyard refuses both with status 1.
    let port = broker.port().to_string();
    for args in [
        &["pub", "-p", &port, "-t", "", "-m", "x"][..],
        &["sub", "-p", &port, "-t", "", "-W", "1"],
    ] {
        let (status, _, stderr) = run_halyard(args);
        assert_eq!(status.code(), Some(1), "{args:?}: {stderr}");
        assert!(stderr.contains("invalid"), "{stderr}");
    }
}

#[test]
fn sub_c_needs_a_client_id_and_w_ends_in_timed_out_27() {
    let broker = Broker::start_with_config("sys_interval = 0\n");
    let (_, stderr) = both("sub", &["-t", "a", "-c", "-W", "1"], broker.port(), 1);
    assert!(stderr.contains("client id"), "{stderr}");
    // No session was left behind.
    let (status, body) = http(broker.http_addr(), "GET", "/api/v1/clients", None, None);
    assert_eq!(status, 200);
    assert!(body.contains("\"total\":0"), "{body}");

    for args in [
        &["-t", "quiet", "-W", "1"][..],
        &["-t", "quiet", "-W", "1", "-C", "1"],
    ] {
        let (stdout, _) = both("sub", args, broker.port(), 27);
        assert_eq!(stdout.trim(), "Timed out", "{args:?}");
    }
}

#[tokio::test]
async fn mosquitto_property_form_reaches_the_packets() {
    let broker = Broker::start_with_config("sys_interval = 0\n");
    let mut sub = RawClient::connect_v5(broker.addr(), "props", true).await;
    sub.subscribe(1, &[("props", QoS::AtMostOnce)]).await;
    let port = broker.port().to_string();
    let args = [
        "-p",
        &port,
        "-V",
        "5",
        "-t",
        "props",
        "-m",
        "x",
        "-D",
        "publish",
        "user-property",
        "k",
        "v",
        "-D",
        "connect",
        "user-property",
        "on",
        "connect",
    ];
    let mut full = vec!["pub"];
    full.extend_from_slice(&args);
    let (status, _, stderr) = run_halyard(&full);
    assert!(status.success(), "{stderr}");
    let got = sub.recv_publish().await;
    assert_eq!(
        got.properties.user_properties,
        [("k".to_owned(), "v".to_owned())]
    );
    if let Some(output) = mosquitto("mosquitto_pub", &args) {
        assert!(output.status.success());
        let got = sub.recv_publish().await;
        assert_eq!(
            got.properties.user_properties,
            [("k".to_owned(), "v".to_owned())]
        );
    }
    // Another property is refused rather than ignored, as mosquitto_pub refuses a bad name.
    let (status, _, stderr) = run_halyard(&[
        "pub", "-p", &port, "-V", "5", "-t", "props", "-m", "x", "-D", "publish", "bogus", "k", "v",
    ]);
    assert_eq!(status.code(), Some(1), "{stderr}");
}

#[tokio::test]
async fn refusals_print_reason_codes_with_their_names() {
    let broker = Broker::start_with_config("sys_interval = 0\nmax_subscriptions_per_client = 1\n");
    let port = broker.port().to_string();
    let (status, _, stderr) = run_halyard(&[
        "sub", "-p", &port, "-V", "5", "-t", "one", "-t", "two", "-W", "5",
    ]);
    assert_eq!(status.code(), Some(1));
    assert!(
        stderr.contains("subscription to two refused: 0x97 Quota exceeded"),
        "{stderr}"
    );

    let closed = Broker::start_with_config("sys_interval = 0\n[auth]\nallow_anonymous = false\n");
    let port = closed.port().to_string();
    for (version, expected) in [("5", "0x87 Not authorized"), ("311", "0x05 not authorized")] {
        let (status, _, stderr) =
            run_halyard(&["pub", "-p", &port, "-V", version, "-t", "a", "-m", "x"]);
        assert_eq!(status.code(), Some(1));
        assert!(
            stderr.contains(&format!("connection refused: {expected}")),
            "{stderr}"
        );
    }
}

#[tokio::test]
async fn json_output_carries_binary_payloads_as_base64() {
    let broker = Broker::start_with_config("sys_interval = 0\n");
    let mut publisher = RawClient::connect_v311(broker.addr(), "bin-pub", true).await;
    publisher
        .publish(publish_packet(
            "bin",
            &[0xff, 0x00, 0x01],
            QoS::AtLeastOnce,
            true,
            Some(1),
        ))
        .await;
    let port = broker.port().to_string();
    let (status, stdout, stderr) = run_halyard(&[
        "sub", "-p", &port, "-t", "bin", "--format", "json", "-C", "1", "-W", "5",
    ]);
    assert!(status.success(), "{stderr}");
    let value: serde_json::Value = serde_json::from_str(stdout.trim()).expect("json");
    assert_eq!(value["payload"], serde_json::Value::Null);
    assert_eq!(value["payload_base64"], "/wAB");
}

#[tokio::test]
async fn will_options_set_the_will() {
    let broker = Broker::start_with_config("sys_interval = 0\n");
    let mut watcher = RawClient::connect_v5(broker.addr(), "watcher", true).await;
    watcher.subscribe(1, &[("wills/#", QoS::AtLeastOnce)]).await;
    let port = broker.port().to_string();
    let mut child = halyard_cmd()
        .args([
            "sub",
            "-p",
            &port,
            "-i",
            "willer",
            "-t",
            "nothing",
            "--will-topic",
            "wills/willer",
            "--will-payload",
            "gone",
            "--will-qos",
            "1",
            "--will-retain",
        ])
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn halyard sub");
    // Connected once the admin API lists it.
    let deadline = std::time::Instant::now() + TIMEOUT;
    while !http(
        broker.http_addr(),
        "GET",
        "/api/v1/clients/willer",
        None,
        None,
    )
    .1
    .contains("\"connected\":true")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "willer never connected"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // Killed without a DISCONNECT: the broker publishes the will [MQTT-3.1.2-8].
    child.kill().expect("kill");
    child.wait().expect("reap");
    let will = watcher.recv_publish_ack().await;
    assert_eq!(
        (will.topic.as_str(), &will.payload[..], will.qos),
        ("wills/willer", &b"gone"[..], QoS::AtLeastOnce)
    );
    let (mut late, _) = RawClient::handshake(
        broker.addr(),
        connect_packet(ProtocolVersion::V5, "late", true),
    )
    .await;
    late.subscribe(1, &[("wills/#", QoS::AtMostOnce)]).await;
    assert!(late.recv_publish().await.retain, "--will-retain");
}
