//! Authentication (Mosquitto password files, `halyard passwd`) and ACLs end to end: the real
//! binary, raw MQTT packets, CONNACK / SUBACK / PUBACK reason codes.

mod common;

use std::path::PathBuf;

use bytes::Bytes;
use common::*;
use halyard_codec::{Packet, ProtocolVersion, QoS, ReasonCode};

const V3: ProtocolVersion = ProtocolVersion::V3_1_1;
const V5: ProtocolVersion = ProtocolVersion::V5;

/// Password file written by Debian's `mosquitto_passwd` 2.0.11 (see the fixtures README):
/// alice `$7$` (PBKDF2-SHA512), bob `$6$` (salted SHA-512), carol `$7$`.
fn mosquitto_fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../halyard-server/tests/fixtures/mosquitto_passwd.txt")
}

fn toml_path(path: &std::path::Path) -> String {
    format!("{:?}", path.display().to_string())
}

async fn connack(
    broker: &Broker,
    version: ProtocolVersion,
    user: Option<&str>,
    password: Option<&str>,
) -> (RawClient, ReasonCode) {
    let id = format!("auth-{}", user.unwrap_or("anonymous"));
    let mut connect = connect_packet(version, &id, true);
    connect.username = user.map(str::to_owned);
    connect.password = password.map(|p| Bytes::copy_from_slice(p.as_bytes()));
    let (client, ack) = RawClient::handshake(broker.addr(), connect).await;
    (client, ack.code)
}

#[tokio::test]
async fn mosquitto_password_file_users_connect_and_bad_credentials_are_refused() {
    let broker = Broker::start_with_config(&format!(
        "[auth]\npassword_file = {}\n",
        toml_path(&mosquitto_fixture())
    ));
    for version in [V3, V5] {
        for (user, password) in [
            ("alice", "alicepw"),
            ("bob", "bobpw"),
            ("carol", "c@rol pw"),
        ] {
            let (client, code) = connack(&broker, version, Some(user), Some(password)).await;
            assert_eq!(code, ReasonCode::SUCCESS, "{user} over {version:?}");
            client.disconnect().await;
        }
    }
    // Wrong password, unknown user, missing password: 0x04 / 0x86 Bad user name or password.
    for (user, password) in [
        (Some("alice"), Some("bobpw")),
        (Some("mallory"), Some("alicepw")),
    ] {
        let (mut client, code) = connack(&broker, V3, user, password).await;
        assert_eq!(code, ReasonCode::V3_BAD_USER_NAME_OR_PASSWORD, "{user:?}");
        client.expect_closed().await;
        let (mut client, code) = connack(&broker, V5, user, password).await;
        assert_eq!(code, ReasonCode::BAD_USER_NAME_OR_PASSWORD, "{user:?}");
        client.expect_closed().await;
    }
    let (_, code) = connack(&broker, V5, Some("alice"), None).await;
    assert_eq!(code, ReasonCode::BAD_USER_NAME_OR_PASSWORD);
    // With a password file, anonymous clients are refused by default: 0x05 / 0x87.
    let (mut client, code) = connack(&broker, V3, None, None).await;
    assert_eq!(code, ReasonCode::V3_NOT_AUTHORIZED);
    client.expect_closed().await;
    let (_, code) = connack(&broker, V5, None, None).await;
    assert_eq!(code, ReasonCode::NOT_AUTHORIZED);
    // The broker still serves good clients after the refusals.
    let (client, code) = connack(&broker, V5, Some("alice"), Some("alicepw")).await;
    assert_eq!(code, ReasonCode::SUCCESS);
    client.disconnect().await;
}

#[tokio::test]
async fn allow_anonymous_can_be_turned_on_with_a_password_file() {
    let broker = Broker::start_with_config(&format!(
        "[auth]\nallow_anonymous = true\npassword_file = {}\n",
        toml_path(&mosquitto_fixture())
    ));
    let (client, code) = connack(&broker, V3, None, None).await;
    assert_eq!(code, ReasonCode::SUCCESS);
    client.disconnect().await;
    let (_, code) = connack(&broker, V3, Some("alice"), Some("wrong")).await;
    assert_eq!(code, ReasonCode::V3_BAD_USER_NAME_OR_PASSWORD);
}

#[tokio::test]
async fn passwd_subcommand_writes_argon2id_entries_the_broker_accepts() {
    let file = unique_temp_path("passwd", "txt");
    // Start from a Mosquitto file: its lines must survive.
    std::fs::copy(mosquitto_fixture(), &file).expect("copy fixture");
    let path = file.to_str().expect("utf-8 path");
    let (status, _, stderr) = run_halyard(&["passwd", path, "dave", "--password", "d4ve!"]);
    assert!(status.success(), "{stderr}");
    let text = std::fs::read_to_string(&file).expect("read");
    assert!(text.contains("dave:$argon2id$"), "{text}");
    assert!(text.starts_with("alice:$7$"), "{text}");
    // Updating replaces the line instead of adding one.
    let (status, _, stderr) = run_halyard(&["passwd", path, "dave", "--password", "n3w"]);
    assert!(status.success(), "{stderr}");
    let text = std::fs::read_to_string(&file).expect("read");
    assert_eq!(text.matches("dave:").count(), 1, "{text}");

    let broker =
        Broker::start_with_config(&format!("[auth]\npassword_file = {}\n", toml_path(&file)));
    let (client, code) = connack(&broker, V5, Some("dave"), Some("n3w")).await;
    assert_eq!(code, ReasonCode::SUCCESS);
    client.disconnect().await;
    let (_, code) = connack(&broker, V5, Some("dave"), Some("d4ve!")).await;
    assert_eq!(code, ReasonCode::BAD_USER_NAME_OR_PASSWORD);
    let (client, code) = connack(&broker, V3, Some("alice"), Some("alicepw")).await;
    assert_eq!(code, ReasonCode::SUCCESS);
    client.disconnect().await;
    std::fs::remove_file(&file).ok();
}

fn acl_broker(acl: &str) -> Broker {
    let path = unique_temp_path("acl", "txt");
    std::fs::write(&path, acl).expect("write ACL");
    Broker::start_with_config(&format!("[auth]\nacl_file = {}\n", toml_path(&path)))
}

#[tokio::test]
async fn paho_subscribe_failure_acl() {
    // The Eclipse Paho interop suite's test_subscribe_failure expects exactly this.
    let broker = acl_broker("topic readwrite #\ntopic deny test/nosubscribe\n");
    let mut v3 = RawClient::connect_v311(broker.addr(), "paho-v3", true).await;
    let codes = v3
        .subscribe(1, &[("test/nosubscribe", QoS::AtLeastOnce)])
        .await;
    assert_eq!(codes, [ReasonCode(0x80)]);
    let mut v5 = RawClient::connect_v5(broker.addr(), "paho-v5", true).await;
    let codes = v5
        .subscribe(
            1,
            &[
                ("test/nosubscribe", QoS::AtLeastOnce),
                ("test/#", QoS::AtMostOnce),
            ],
        )
        .await;
    assert_eq!(codes, [ReasonCode(0x87), ReasonCode::GRANTED_QOS_0]);

    // The wildcard subscription is allowed, but the denied topic is never delivered.
    v3.publish(publish0("test/nosubscribe", b"secret")).await;
    v3.publish(publish0("test/open", b"hello")).await;
    let publish = v5.recv_publish().await;
    assert_eq!(publish.topic, "test/open");
    v5.expect_nothing(200).await;
}

#[tokio::test]
async fn user_sections_patterns_and_denied_publish_codes() {
    let passwords = mosquitto_fixture();
    let acl = unique_temp_path("acl", "txt");
    std::fs::write(
        &acl,
        "# anonymous: nothing\nuser alice\ntopic readwrite shared/#\ntopic write \
         sensors/#\npattern read inbox/%u/#\n",
    )
    .expect("write ACL");
    let broker = Broker::start_with_config(&format!(
        "[auth]\npassword_file = {}\nacl_file = {}\n",
        toml_path(&passwords),
        toml_path(&acl)
    ));
    let (mut alice, code) = connack(&broker, V5, Some("alice"), Some("alicepw")).await;
    assert_eq!(code, ReasonCode::SUCCESS);
    let codes = alice
        .subscribe(
            1,
            &[
                ("shared/#", QoS::AtLeastOnce),
                ("sensors/#", QoS::AtLeastOnce),
                ("inbox/alice/#", QoS::AtLeastOnce),
                ("inbox/bob/#", QoS::AtLeastOnce),
            ],
        )
        .await;
    assert_eq!(
        codes,
        [
            ReasonCode::GRANTED_QOS_1,
            ReasonCode::NOT_AUTHORIZED,
            ReasonCode::GRANTED_QOS_1,
            ReasonCode::NOT_AUTHORIZED
        ]
    );
    // Writing where only reading is granted: PUBACK 0x87 (MQTT 5).
    let code = alice
        .publish(publish_packet(
            "inbox/alice/x",
            b"m",
            QoS::AtLeastOnce,
            false,
            Some(5),
        ))
        .await;
    assert_eq!(code, ReasonCode::NOT_AUTHORIZED);
    let code = alice
        .publish(publish_packet(
            "sensors/t",
            b"21",
            QoS::AtLeastOnce,
            false,
            Some(6),
        ))
        .await;
    assert_ne!(code, ReasonCode::NOT_AUTHORIZED);

    // bob has no section: the same publish over 3.1.1 is acknowledged but dropped.
    let (mut bob, code) = connack(&broker, V3, Some("bob"), Some("bobpw")).await;
    assert_eq!(code, ReasonCode::SUCCESS);
    let code = bob
        .publish(publish_packet(
            "shared/x",
            b"from bob",
            QoS::AtLeastOnce,
            false,
            Some(7),
        ))
        .await;
    assert_eq!(code, ReasonCode::SUCCESS);
    alice.expect_nothing(200).await;
    // ... and the connection is still usable.
    bob.ping().await;
    let packet = alice.try_recv(std::time::Duration::from_millis(10)).await;
    assert!(
        !matches!(packet, Ok(Packet::Publish(_))),
        "nothing from bob was delivered"
    );
    std::fs::remove_file(&acl).ok();
}

#[test]
fn config_errors_for_auth_files_name_the_file() {
    let missing = unique_temp_path("missing", "txt");
    let config = write_temp_config(&format!("[auth]\nacl_file = {}\n", toml_path(&missing)));
    let (status, _, stderr) = run_halyard(&[
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--http-listen",
        "127.0.0.1:0",
        "--config",
        config.to_str().expect("utf-8"),
    ]);
    assert!(!status.success());
    assert!(stderr.contains(&missing.display().to_string()), "{stderr}");

    let bad_acl = unique_temp_path("acl", "txt");
    std::fs::write(&bad_acl, "topic read a\nbogus line\n").expect("write");
    let config = write_temp_config(&format!("[auth]\nacl_file = {}\n", toml_path(&bad_acl)));
    let (status, _, stderr) = run_halyard(&[
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--http-listen",
        "127.0.0.1:0",
        "--config",
        config.to_str().expect("utf-8"),
    ]);
    assert!(!status.success());
    assert!(stderr.contains("line 2"), "{stderr}");
    let config = write_temp_config("[auth]\nallow_anonymous = \"maybe\"\n");
    let (status, _, stderr) = run_halyard(&["check-config", config.to_str().expect("utf-8")]);
    assert!(!status.success());
    assert!(stderr.contains("line 2"), "{stderr}");
}

/// `$SYS/` belongs to the broker: a client's retained `$SYS/broker/version` is refused
/// (MQTT 5: PUBACK 0x87; 3.x: acknowledged and dropped), counted, and never read back.
#[tokio::test]
async fn client_publishes_to_sys_are_refused_and_counted() {
    let broker = Broker::start_with_config("sys_interval = 60\n");
    let mut v5 = RawClient::connect_v5(broker.addr(), "evil5", true).await;
    let reason = v5
        .publish(publish_packet(
            "$SYS/broker/version",
            b"evil-version",
            QoS::AtLeastOnce,
            true,
            Some(1),
        ))
        .await;
    assert_eq!(reason, ReasonCode::NOT_AUTHORIZED);
    let mut v3 = RawClient::connect_v311(broker.addr(), "evil3", true).await;
    let reason = v3
        .publish(publish_packet(
            "$SYS/broker/custom/x",
            b"stays forever",
            QoS::AtLeastOnce,
            true,
            Some(1),
        ))
        .await;
    assert_eq!(reason, ReasonCode::SUCCESS, "3.x cannot be told");
    assert_eq!(
        metric(
            &broker,
            "halyard_requests_refused_total{reason=\"sys_publish_not_authorized\"}"
        ),
        2.0
    );
    let mut reader = RawClient::connect_v311(broker.addr(), "reader", true).await;
    reader
        .subscribe(1, &[("$SYS/broker/version", QoS::AtMostOnce)])
        .await;
    let version = reader.recv_publish().await;
    assert!(
        version.payload.starts_with(b"halyard version "),
        "{:?}",
        version.payload
    );
    reader
        .subscribe(2, &[("$SYS/broker/custom/#", QoS::AtMostOnce)])
        .await;
    reader.expect_nothing(200).await;
}
