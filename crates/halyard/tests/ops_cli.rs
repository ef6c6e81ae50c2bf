//! `$SYS/broker/...` topics and the `halyard pub` / `halyard sub` command-line clients
//! (issue 5), against the real broker; and against mosquitto's clients when installed.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use common::*;
use halyard_codec::QoS;

/// `$SYS/broker/...` topics arrive retained right after subscribing, with Mosquitto's names,
/// and are published again every `sys_interval`.
#[tokio::test]
async fn sys_topics_arrive_and_refresh() {
    let broker = Broker::start_with_config("sys_interval = 1\n");
    let mut c = RawClient::connect_v311(broker.addr(), "sys", true).await;
    c.subscribe(1, &[("$SYS/broker/#", QoS::AtMostOnce)]).await;
    let mut seen = std::collections::HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    // Retained copies first (RETAIN=1), then a live refresh (RETAIN=0) within ~1 s.
    const REQUIRED: [&str; 9] = [
        "$SYS/broker/version",
        "$SYS/broker/uptime",
        "$SYS/broker/clients/connected",
        "$SYS/broker/messages/received",
        "$SYS/broker/messages/sent",
        "$SYS/broker/bytes/received",
        "$SYS/broker/bytes/sent",
        "$SYS/broker/load/messages/received/1min",
        "$SYS/broker/load/bytes/sent/15min",
    ];
    let mut refreshed = false;
    while Instant::now() < deadline
        && !(refreshed && REQUIRED.iter().all(|topic| seen.contains_key(*topic)))
    {
        let p = c.recv_publish().await;
        if !p.retain && p.topic == "$SYS/broker/clients/connected" {
            refreshed = true;
        }
        seen.insert(
            p.topic.clone(),
            String::from_utf8_lossy(&p.payload).into_owned(),
        );
    }
    assert!(
        refreshed,
        "no live $SYS refresh within the interval: {seen:?}"
    );
    for topic in REQUIRED {
        assert!(seen.contains_key(topic), "missing {topic}: {seen:?}");
    }
    assert_eq!(seen["$SYS/broker/clients/connected"], "1");
    assert!(seen["$SYS/broker/uptime"].ends_with(" seconds"));
    assert!(seen["$SYS/broker/version"].starts_with("halyard version "));
}

/// `sys_interval = 0` turns `$SYS` off.
#[tokio::test]
async fn sys_interval_zero_publishes_nothing() {
    let broker = Broker::start_with_config("sys_interval = 0\n");
    let mut c = RawClient::connect_v311(broker.addr(), "nosys", true).await;
    c.subscribe(1, &[("$SYS/#", QoS::AtMostOnce)]).await;
    c.expect_nothing(300).await;
}

/// Starts `halyard sub` with `args` and waits until its subscription is in place (the
/// broker has the session with a subscription), so that a publish cannot race it.
fn spawn_sub(broker: &Broker, id: &str, args: &[&str]) -> Child {
    let port = broker.port().to_string();
    let mut cmd = halyard_cmd();
    cmd.args(["sub", "-h", "127.0.0.1", "-p", &port, "-i", id, "-W", "10"])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = cmd.spawn().expect("spawn halyard sub");
    wait_subscribed(broker, id);
    child
}

/// Polls the admin API until `id` holds a subscription.
fn wait_subscribed(broker: &Broker, id: &str) {
    let deadline = Instant::now() + TIMEOUT;
    while Instant::now() < deadline {
        let mut stream = std::net::TcpStream::connect(broker.http_addr()).expect("http");
        use std::io::{Read, Write};
        let request =
            format!("GET /api/v1/clients/{id} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).expect("write");
        let mut response = String::new();
        stream.read_to_string(&mut response).ok();
        if response.contains("\"subscriptions\":1") || response.contains("\"subscriptions\":2") {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("{id} did not subscribe in time");
}

fn output_lines(child: Child) -> (bool, Vec<String>, String) {
    let output = child.wait_with_output().expect("wait");
    let stdout = String::from_utf8_lossy(&output.stdout);
    (
        output.status.success(),
        stdout.lines().map(str::to_owned).collect(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[tokio::test]
async fn halyard_pub_and_sub_interoperate_v311_and_v5() {
    let broker = Broker::start_with_config("sys_interval = 0\n");
    let port = broker.port().to_string();
    let sub = spawn_sub(
        &broker,
        "cli-sub",
        &["-t", "cli/a", "-t", "cli/b", "-q", "1", "-v", "-C", "3"],
    );
    for (topic, message, qos) in [
        ("cli/a", "one", "0"),
        ("cli/b", "two", "1"),
        ("cli/a", "three", "2"),
    ] {
        let (status, _, stderr) = run_halyard(&[
            "pub",
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "-t",
            topic,
            "-m",
            message,
            "-q",
            qos,
        ]);
        assert!(status.success(), "pub failed: {stderr}");
    }
    let (ok, lines, stderr) = output_lines(sub);
    assert!(ok, "sub failed: {stderr}");
    assert_eq!(lines, ["cli/a one", "cli/b two", "cli/a three"]);

    // MQTT 5 with user properties, JSON output, a retained message seen by a late subscriber.
    let (status, _, stderr) = run_halyard(&[
        "pub",
        "-p",
        &port,
        "-V",
        "5",
        "-t",
        "cli/v5",
        "-m",
        "hello",
        "-q",
        "1",
        "-r",
        "-D",
        "origin",
        "test",
        "--property",
        "k=v",
    ]);
    assert!(status.success(), "pub v5 failed: {stderr}");
    let (status, stdout, stderr) = run_halyard(&[
        "sub", "-p", &port, "-V", "5", "-t", "cli/#", "--format", "json", "-C", "1", "-W", "5",
    ]);
    assert!(status.success(), "sub v5 failed: {stderr}");
    let value: serde_json::Value = serde_json::from_str(stdout.trim()).expect("json line");
    assert_eq!(value["topic"], "cli/v5");
    assert_eq!(value["payload"], "hello");
    assert_eq!(value["retain"], true);
    assert_eq!(value["user_properties"]["origin"], "test");
    assert_eq!(value["user_properties"]["k"], "v");
}

#[tokio::test]
async fn halyard_sub_times_out_with_status_27_and_pub_reads_stdin() {
    let broker = Broker::start_with_config("sys_interval = 0\n");
    let port = broker.port().to_string();
    let (status, _, _) = run_halyard(&["sub", "-p", &port, "-t", "quiet", "-C", "1", "-W", "1"]);
    assert_eq!(status.code(), Some(27), "timeout before -C messages");

    let sub = spawn_sub(&broker, "stdin-sub", &["-t", "in", "-C", "1"]);
    let mut publisher = halyard_cmd()
        .args(["pub", "-p", &port, "-t", "in", "-s"])
        .stdin(Stdio::piped())
        .spawn()
        .expect("spawn pub");
    {
        use std::io::Write;
        let mut stdin = publisher.stdin.take().expect("stdin");
        stdin.write_all(b"from stdin").expect("write");
    }
    assert!(publisher.wait().expect("wait").success());
    let (ok, lines, stderr) = output_lines(sub);
    assert!(ok, "{stderr}");
    assert_eq!(lines, ["from stdin"]);
}

/// A raw-packet subscriber sees what `halyard pub` sends, at the requested QoS.
#[tokio::test]
async fn halyard_pub_qos2_reaches_raw_client() {
    let broker = Broker::start_with_config("sys_interval = 0\n");
    let mut c = RawClient::connect_v5(broker.addr(), "raw", true).await;
    c.subscribe(1, &[("q2", QoS::ExactlyOnce)]).await;
    let port = broker.port().to_string();
    let (status, _, stderr) = run_halyard(&[
        "pub", "-p", &port, "-V", "mqttv5", "-t", "q2", "-m", "x", "-q", "2", "-C", "2",
    ]);
    assert!(status.success(), "{stderr}");
    for _ in 0..2 {
        let p = c.recv_publish_ack().await;
        assert_eq!((p.qos, &p.payload[..]), (QoS::ExactlyOnce, &b"x"[..]));
    }
}

/// mosquitto_sub receives from `halyard pub`, and `halyard sub` from mosquitto_pub — when
/// the mosquitto clients are installed; skipped (with a note) otherwise.
#[tokio::test]
async fn interoperates_with_mosquitto_clients_when_installed() {
    let have = |tool: &str| {
        std::process::Command::new("which")
            .arg(tool)
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if !have("mosquitto_sub") || !have("mosquitto_pub") {
        eprintln!("skipped: mosquitto_sub/mosquitto_pub not installed");
        return;
    }
    let broker = Broker::start_with_config("sys_interval = 0\n");
    let port = broker.port().to_string();
    let mut mosquitto_sub = std::process::Command::new("mosquitto_sub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "-i",
            "mosq-sub",
            "-t",
            "interop",
            "-C",
            "1",
            "-W",
            "10",
            "-V",
            "5",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn mosquitto_sub");
    wait_subscribed(&broker, "mosq-sub");
    let (status, _, stderr) = run_halyard(&[
        "pub",
        "-p",
        &port,
        "-t",
        "interop",
        "-m",
        "to-mosquitto",
        "-q",
        "1",
    ]);
    assert!(status.success(), "{stderr}");
    let stdout = mosquitto_sub.stdout.take().expect("stdout");
    let line = BufReader::new(stdout)
        .lines()
        .next()
        .expect("a line")
        .expect("utf-8");
    assert_eq!(line, "to-mosquitto");
    let _ = mosquitto_sub.wait();

    let sub = spawn_sub(&broker, "hal-sub", &["-t", "interop2", "-C", "1"]);
    let status = std::process::Command::new("mosquitto_pub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "-t",
            "interop2",
            "-m",
            "from-mosquitto",
            "-q",
            "1",
        ])
        .status()
        .expect("mosquitto_pub");
    assert!(status.success());
    let (ok, lines, stderr) = output_lines(sub);
    assert!(ok, "{stderr}");
    assert_eq!(lines, ["from-mosquitto"]);
}
