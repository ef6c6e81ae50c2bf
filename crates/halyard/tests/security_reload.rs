//! Hot reload on SIGHUP: a new user can connect, connected clients stay connected, and a
//! broken file is rejected with a log line while the previous version stays in force.

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use bytes::Bytes;
use common::*;
use halyard_codec::{ProtocolVersion, QoS, ReasonCode};

const V5: ProtocolVersion = ProtocolVersion::V5;

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../halyard-server/tests/fixtures/mosquitto_passwd.txt")
}

fn sighup(broker: &Broker) {
    let status = Command::new("kill")
        .arg("-HUP")
        .arg(broker.pid().to_string())
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -HUP failed");
}

async fn try_connect(
    broker: &Broker,
    id: &str,
    user: &str,
    password: &str,
) -> (RawClient, ReasonCode) {
    let mut connect = connect_packet(V5, id, true);
    connect.username = Some(user.to_owned());
    connect.password = Some(Bytes::copy_from_slice(password.as_bytes()));
    let (client, ack) = RawClient::handshake(broker.addr(), connect).await;
    (client, ack.code)
}

/// Waits until the broker's log contains `needle` (the reload runs asynchronously).
async fn wait_for_log(broker: &Broker, needle: &str, count: usize) {
    let deadline = Instant::now() + TIMEOUT;
    while broker.logs().matches(needle).count() < count {
        assert!(
            Instant::now() < deadline,
            "no {needle:?} in the log:\n{}",
            broker.logs()
        );
        sleep_ms(20).await;
    }
}

#[tokio::test]
async fn sighup_reloads_passwords_and_acl_and_keeps_clients_connected() {
    let passwords = unique_temp_path("passwd", "txt");
    let alice_only: String = std::fs::read_to_string(fixture())
        .expect("fixture")
        .lines()
        .filter(|line| line.starts_with("alice:"))
        .map(|line| format!("{line}\n"))
        .collect();
    std::fs::write(&passwords, &alice_only).expect("write");
    let acl = unique_temp_path("acl", "txt");
    std::fs::write(
        &acl,
        "user alice\ntopic readwrite a/#\nuser bob\ntopic readwrite b/#\n",
    )
    .expect("write");
    let broker = Broker::start_with_config(&format!(
        "[auth]\npassword_file = {:?}\nacl_file = {:?}\n",
        passwords.display().to_string(),
        acl.display().to_string()
    ));

    let (mut alice, code) = try_connect(&broker, "alice", "alice", "alicepw").await;
    assert_eq!(code, ReasonCode::SUCCESS);
    assert_eq!(
        alice.subscribe(1, &[("a/#", QoS::AtLeastOnce)]).await,
        [ReasonCode::GRANTED_QOS_1]
    );
    let (_, code) = try_connect(&broker, "bob", "bob", "bobpw").await;
    assert_eq!(
        code,
        ReasonCode::BAD_USER_NAME_OR_PASSWORD,
        "bob is not known yet"
    );

    // Add bob (a Mosquitto `$6$` line) and reload.
    let everyone = std::fs::read_to_string(fixture()).expect("fixture");
    std::fs::write(&passwords, &everyone).expect("write");
    sighup(&broker);
    wait_for_log(&broker, "password file reloaded", 1).await;
    let (mut bob, code) = try_connect(&broker, "bob", "bob", "bobpw").await;
    assert_eq!(
        code,
        ReasonCode::SUCCESS,
        "the new user connects after SIGHUP"
    );

    // alice was never disconnected: her subscription still delivers.
    alice.ping().await;
    let code = bob
        .publish(publish_packet(
            "b/x",
            b"bob's own",
            QoS::AtLeastOnce,
            false,
            Some(1),
        ))
        .await;
    assert_eq!(code, ReasonCode::NO_MATCHING_SUBSCRIBERS);
    let mut anon_writer = try_connect(&broker, "alice2", "alice", "alicepw").await.0;
    anon_writer.publish(publish0("a/1", b"still here")).await;
    let publish = alice.recv_publish().await;
    assert_eq!(publish.topic, "a/1");

    // A broken ACL is rejected: logged, and the old rules stay.
    std::fs::write(
        &acl,
        "user alice\ntopic readwrite #\nthis is not an ACL line\n",
    )
    .expect("write");
    sighup(&broker);
    wait_for_log(&broker, "reload rejected this file", 1).await;
    assert!(broker.logs().contains("line 3"), "{}", broker.logs());
    assert_eq!(
        bob.subscribe(2, &[("a/#", QoS::AtMostOnce)]).await,
        [ReasonCode::NOT_AUTHORIZED],
        "the widened rule of the broken file must not apply"
    );
    assert_eq!(
        bob.subscribe(3, &[("b/#", QoS::AtMostOnce)]).await,
        [ReasonCode::GRANTED_QOS_0],
        "the previous rules are still in force"
    );

    // A good ACL is taken, and applies to clients already connected.
    std::fs::write(
        &acl,
        "user alice\ntopic readwrite a/#\nuser bob\ntopic readwrite #\n",
    )
    .expect("write");
    sighup(&broker);
    wait_for_log(&broker, "ACL file reloaded", 2).await;
    assert_eq!(
        bob.subscribe(4, &[("a/#", QoS::AtMostOnce)]).await,
        [ReasonCode::GRANTED_QOS_0]
    );
    alice.ping().await;
    std::fs::remove_file(&passwords).ok();
    std::fs::remove_file(&acl).ok();
}
