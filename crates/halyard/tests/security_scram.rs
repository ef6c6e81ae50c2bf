//! SCRAM-SHA-256 through MQTT 5 enhanced authentication, end to end: `halyard passwd
//! --scram` writes the entry, the real binary runs the exchange (CONNECT, AUTH 0x18, AUTH
//! 0x18, CONNACK with the server-final message) and re-authentication (AUTH 0x19) as raw
//! packets. rumqttc 0.25 cannot carry AUTH, so raw packets are the client here; the
//! primitive computation is checked against the RFC 7677 vector in `scram.rs`.

mod common;

use bytes::Bytes;
use common::*;
use halyard_codec::{Auth, Connect, Packet, Properties, ProtocolVersion, ReasonCode};
use halyard_server::scram::{ScramClient, ScramClientFinal, METHOD};

const V5: ProtocolVersion = ProtocolVersion::V5;

/// A broker whose password file has `dev` (password `pencil`) as a SCRAM entry.
fn scram_broker() -> Broker {
    let file = unique_temp_path("scram", "passwd");
    let path = file.to_str().expect("utf-8 path");
    let (status, _, stderr) =
        run_halyard(&["passwd", path, "dev", "--password", "pencil", "--scram"]);
    assert!(status.success(), "{stderr}");
    let text = std::fs::read_to_string(&file).expect("read");
    assert!(text.starts_with("dev:SCRAM-SHA-256$4096:"), "{text}");
    assert!(
        !text.contains("pencil"),
        "the password itself is never stored"
    );
    Broker::start_with_config(&format!("[auth]\npassword_file = {path:?}\n"))
}

fn auth_data(properties: &Properties) -> &[u8] {
    properties
        .authentication_data
        .as_deref()
        .unwrap_or_default()
}

fn scram_auth(reason: ReasonCode, data: String) -> Packet {
    Packet::Auth(Auth {
        reason,
        properties: Properties {
            authentication_method: Some(METHOD.to_owned()),
            authentication_data: Some(Bytes::from(data)),
            ..Properties::default()
        },
    })
}

fn scram_connect(id: &str, client_first: String) -> Connect {
    let mut connect = connect_packet(V5, id, true);
    connect.properties.authentication_method = Some(METHOD.to_owned());
    connect.properties.authentication_data = Some(Bytes::from(client_first));
    connect
}

/// Sends the CONNECT and answers the server-first; returns the client, what the server
/// sent last (CONNACK expected) and the client state that checks the server-final.
async fn exchange(
    broker: &Broker,
    user: &str,
    password: &str,
) -> (RawClient, Packet, ScramClientFinal) {
    let (client, first) = ScramClient::new(user).expect("client");
    let mut raw = RawClient::connect(broker.addr()).await;
    raw.version = V5;
    raw.send(&Packet::Connect(Box::new(scram_connect(user, first))))
        .await;
    let challenge = match raw.recv().await {
        Packet::Auth(auth) => auth,
        other => panic!("expected AUTH 0x18, got {other:?}"),
    };
    assert_eq!(challenge.reason, ReasonCode::CONTINUE_AUTHENTICATION);
    // [MQTT-4.12.0-5]: every AUTH carries the CONNECT's method.
    assert_eq!(
        challenge.properties.authentication_method.as_deref(),
        Some(METHOD)
    );
    let (state, last) = client
        .respond(auth_data(&challenge.properties), password)
        .expect("server-first parses");
    raw.send(&scram_auth(ReasonCode::CONTINUE_AUTHENTICATION, last))
        .await;
    let reply = raw.recv().await;
    (raw, reply, state)
}

#[tokio::test]
async fn scram_exchange_connects_and_proves_the_server() {
    let broker = scram_broker();
    let (mut raw, reply, state) = exchange(&broker, "dev", "pencil").await;
    let Packet::ConnAck(ack) = reply else {
        panic!("expected CONNACK, got {reply:?}");
    };
    assert_eq!(ack.code, ReasonCode::SUCCESS);
    assert_eq!(
        ack.properties.authentication_method.as_deref(),
        Some(METHOD)
    );
    state
        .verify(auth_data(&ack.properties))
        .expect("the server-final message proves the server knows the credential");

    // Re-authentication on the live connection [MQTT-4.12.1-1].
    let (client, first) = ScramClient::new("dev").expect("client");
    raw.send(&scram_auth(ReasonCode::REAUTHENTICATE, first))
        .await;
    let challenge = match raw.recv().await {
        Packet::Auth(auth) if auth.reason == ReasonCode::CONTINUE_AUTHENTICATION => auth,
        other => panic!("expected AUTH 0x18, got {other:?}"),
    };
    let (state, last) = client
        .respond(auth_data(&challenge.properties), "pencil")
        .expect("server-first parses");
    raw.send(&scram_auth(ReasonCode::CONTINUE_AUTHENTICATION, last))
        .await;
    let done = match raw.recv().await {
        Packet::Auth(auth) if auth.reason == ReasonCode::SUCCESS => auth,
        other => panic!("expected AUTH 0x00, got {other:?}"),
    };
    state
        .verify(auth_data(&done.properties))
        .expect("server proven again");
    // Still connected and usable.
    raw.send(&Packet::PingReq).await;
    assert_eq!(raw.recv().await, Packet::PingResp);

    // A re-authentication with the wrong password ends the connection [MQTT-4.12.1-2], with
    // 0x87: DISCONNECT cannot carry 0x86.
    let (client, first) = ScramClient::new("dev").expect("client");
    raw.send(&scram_auth(ReasonCode::REAUTHENTICATE, first))
        .await;
    let challenge = match raw.recv().await {
        Packet::Auth(auth) => auth,
        other => panic!("expected AUTH 0x18, got {other:?}"),
    };
    let (_, last) = client
        .respond(auth_data(&challenge.properties), "wrong")
        .expect("server-first parses");
    raw.send(&scram_auth(ReasonCode::CONTINUE_AUTHENTICATION, last))
        .await;
    raw.expect_disconnect(ReasonCode::NOT_AUTHORIZED).await;
    assert_eq!(
        metric(
            &broker,
            "halyard_auth_refused_total{reason=\"reauth_bad_proof\"}"
        ),
        1.0
    );
}

#[tokio::test]
async fn one_scram_entry_also_serves_connect_passwords() {
    let broker = scram_broker();
    for version in [ProtocolVersion::V3_1_1, V5] {
        let mut connect = connect_packet(version, "pw-client", true);
        connect.username = Some("dev".to_owned());
        connect.password = Some(Bytes::from_static(b"pencil"));
        let (client, ack) = RawClient::handshake(broker.addr(), connect.clone()).await;
        assert_eq!(ack.code, ReasonCode::SUCCESS, "{version:?}");
        client.disconnect().await;
        connect.password = Some(Bytes::from_static(b"pencil?"));
        let (_, ack) = RawClient::handshake(broker.addr(), connect).await;
        assert_ne!(ack.code, ReasonCode::SUCCESS, "{version:?}");
    }
    assert_eq!(
        metric(
            &broker,
            "halyard_auth_refused_total{reason=\"bad_password\"}"
        ),
        2.0
    );
}

#[tokio::test]
async fn failed_exchanges_get_0x86_or_0x87_and_are_counted() {
    let broker = scram_broker();
    // Wrong password and unknown user: 0x86 Bad User Name or Password, at the proof.
    for (user, password) in [("dev", "pencil!"), ("ghost", "pencil")] {
        let (mut raw, reply, _) = exchange(&broker, user, password).await;
        match reply {
            Packet::ConnAck(ack) => assert_eq!(ack.code, ReasonCode::BAD_USER_NAME_OR_PASSWORD),
            other => panic!("expected CONNACK 0x86, got {other:?}"),
        }
        raw.expect_closed().await;
    }
    assert_eq!(
        metric(
            &broker,
            "halyard_auth_refused_total{reason=\"scram_bad_proof\"}"
        ),
        2.0
    );

    // A client-first message that breaks the grammar (channel binding asked for): 0x87.
    let mut raw = RawClient::connect(broker.addr()).await;
    raw.version = V5;
    let connect = scram_connect("cb", "p=tls-unique,,n=dev,r=abc".to_owned());
    raw.send(&Packet::Connect(Box::new(connect))).await;
    match raw.recv().await {
        Packet::ConnAck(ack) => assert_eq!(ack.code, ReasonCode::NOT_AUTHORIZED),
        other => panic!("expected CONNACK 0x87, got {other:?}"),
    }
    // A packet other than AUTH in the middle of the exchange: 0x87.
    let (_, first) = ScramClient::new("dev").expect("client");
    let mut raw = RawClient::connect(broker.addr()).await;
    raw.version = V5;
    raw.send(&Packet::Connect(Box::new(scram_connect("mid", first))))
        .await;
    assert!(matches!(raw.recv().await, Packet::Auth(_)));
    raw.send(&Packet::PingReq).await;
    match raw.recv().await {
        Packet::ConnAck(ack) => assert_eq!(ack.code, ReasonCode::NOT_AUTHORIZED),
        other => panic!("expected CONNACK 0x87, got {other:?}"),
    }
    assert_eq!(
        metric(
            &broker,
            "halyard_auth_refused_total{reason=\"scram_malformed\"}"
        ),
        1.0
    );
    assert_eq!(
        metric(
            &broker,
            "halyard_auth_refused_total{reason=\"scram_protocol\"}"
        ),
        1.0
    );

    // Another method is still unknown: 0x8C [MQTT-4.12.0-1].
    let mut connect = connect_packet(V5, "other-method", true);
    connect.properties.authentication_method = Some("SCRAM-SHA-1".to_owned());
    let (_, ack) = RawClient::handshake(broker.addr(), connect).await;
    assert_eq!(ack.code, ReasonCode::BAD_AUTHENTICATION_METHOD);
    assert_eq!(
        metric(
            &broker,
            "halyard_auth_refused_total{reason=\"bad_auth_method\"}"
        ),
        1.0
    );
}

#[tokio::test]
async fn halyard_pub_logs_in_with_scram() {
    let broker = scram_broker();
    let port = broker.port().to_string();
    // The watcher logs in with the same entry's password (anonymous access is off).
    let mut watch = connect_packet(ProtocolVersion::V3_1_1, "watch", true);
    watch.username = Some("dev".to_owned());
    watch.password = Some(Bytes::from_static(b"pencil"));
    let (mut sub, ack) = RawClient::handshake(broker.addr(), watch).await;
    assert_eq!(ack.code, ReasonCode::SUCCESS);
    sub.subscribe(1, &[("cli/scram", halyard_codec::QoS::AtMostOnce)])
        .await;
    let args = |password: &'static str| {
        let port = port.clone();
        move || {
            run_halyard(&[
                "pub",
                "-V",
                "5",
                "-p",
                &port,
                "--scram",
                "-u",
                "dev",
                "-P",
                password,
                "-t",
                "cli/scram",
                "-m",
                "proved",
            ])
        }
    };
    let (status, _, stderr) = args("pencil")();
    assert!(status.success(), "{stderr}");
    assert_eq!(&sub.recv_publish().await.payload[..], b"proved");
    let (status, _, stderr) = args("wrong")();
    assert!(!status.success());
    assert!(stderr.contains("0x86"), "{stderr}");
}
