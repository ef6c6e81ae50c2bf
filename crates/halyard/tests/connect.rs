//! CONNECT / CONNACK rules. Ids marked "(3.1.1)" are from OASIS MQTT 3.1.1, the others
//! from MQTT 5.0 (/work/shared/spec/mqtt-v5.0-normative-statements.txt).

mod common;

use common::*;
use halyard_codec::{Packet, ProtocolVersion, QoS, ReasonCode};

/// [MQTT-3.2.2-1] (3.1.1) / [MQTT-3.2.0-1]: a clean 3.1.1 CONNECT is answered with exactly
/// `20 02 00 00` (CONNACK, remaining length 2, session present 0, return code 0).
#[tokio::test]
async fn connack_v311_is_byte_exact_20_02_00_00() {
    let broker = Broker::start();
    let mut c = RawClient::connect(broker.addr()).await;
    c.send_bytes(&raw_connect_v311("exact")).await;
    assert_eq!(c.recv_exact_bytes(4).await, vec![0x20, 0x02, 0x00, 0x00]);
    c.ping().await;
}

/// MQTT 3.1 (protocol name `MQIsdp`, level 3) is accepted and answered with a 3.x CONNACK.
#[tokio::test]
async fn mqtt_3_1_mqisdp_level_3_is_accepted() {
    let broker = Broker::start();
    let mut c = RawClient::connect(broker.addr()).await;
    let mut body = raw_str(b"MQIsdp");
    body.extend_from_slice(&[0x03, 0x02, 0x00, 0x3c]);
    body.extend_from_slice(&raw_str(b"v31client"));
    c.send_bytes(&raw_packet(0x10, &body)).await;
    assert_eq!(c.recv_exact_bytes(4).await, vec![0x20, 0x02, 0x00, 0x00]);
    c.version = ProtocolVersion::V3_1;
    c.ping().await;
}

/// [MQTT-3.1.2-2] (3.1.1): an unsupported protocol level gets CONNACK return code 0x01
/// (unacceptable protocol level) and then the connection is closed.
#[tokio::test]
async fn unsupported_protocol_level_gets_connack_0x01_then_close() {
    let broker = Broker::start();
    let mut c = RawClient::connect(broker.addr()).await;
    let mut body = raw_str(b"MQTT");
    body.extend_from_slice(&[0x07, 0x02, 0x00, 0x3c]);
    body.extend_from_slice(&raw_str(b"level7"));
    c.send_bytes(&raw_packet(0x10, &body)).await;
    assert_eq!(c.recv_exact_bytes(4).await, vec![0x20, 0x02, 0x00, 0x01]);
    c.expect_closed().await;
}

/// [MQTT-3.1.0-1]: the first packet must be CONNECT; anything else closes the connection
/// without a CONNACK.
#[tokio::test]
async fn first_packet_not_connect_closes() {
    let broker = Broker::start();
    let mut c = RawClient::connect(broker.addr()).await;
    c.send_bytes(&[0xc0, 0x00]).await; // PINGREQ
    c.expect_closed().await;
}

/// [MQTT-3.1.0-2] (3.1.1 and 5.0): a second CONNECT on a connection is a protocol violation
/// and the server closes the connection.
#[tokio::test]
async fn second_connect_closes_v311() {
    let broker = Broker::start();
    let mut c = RawClient::connect_v311(broker.addr(), "twice", true).await;
    c.send(&Packet::Connect(Box::new(connect_packet(
        ProtocolVersion::V3_1_1,
        "twice",
        true,
    ))))
    .await;
    c.expect_closed().await;
}

/// [MQTT-3.1.0-2] for MQTT 5: closed; a DISCONNECT before the close, if any, carries 0x82
/// (Protocol Error).
#[tokio::test]
async fn second_connect_closes_v5_with_protocol_error() {
    let broker = Broker::start();
    let mut c = RawClient::connect_v5(broker.addr(), "twice5", true).await;
    c.send(&Packet::Connect(Box::new(connect_packet(
        ProtocolVersion::V5,
        "twice5",
        true,
    ))))
    .await;
    if let Some(reason) = c.expect_closed_maybe_disconnect().await {
        assert_eq!(reason, ReasonCode::PROTOCOL_ERROR);
    }
}

/// [MQTT-3.1.2-3] (3.1.1): the reserved CONNECT flag (bit 0) must be 0, otherwise the
/// server disconnects the client (no CONNACK exists for this in 3.1.1).
#[tokio::test]
async fn reserved_connect_flag_closes_v311() {
    let broker = Broker::start();
    let mut c = RawClient::connect(broker.addr()).await;
    let mut bytes = raw_connect_v311("reserved");
    bytes[9] = 0x03; // clean session + reserved bit
    c.send_bytes(&bytes).await;
    c.expect_closed().await;
}

/// [MQTT-3.1.2-3] for MQTT 5: reserved flag set -> no successful CONNACK, connection closed
/// (a CONNACK 0x81 first is allowed).
#[tokio::test]
async fn reserved_connect_flag_closes_v5() {
    let broker = Broker::start();
    let mut c = RawClient::connect(broker.addr()).await;
    c.version = ProtocolVersion::V5;
    // CONNECT v5: name, level 5, flags 0x03 (clean start + reserved), keep-alive 60,
    // properties length 0, client id "r5".
    let mut body = raw_str(b"MQTT");
    body.extend_from_slice(&[0x05, 0x03, 0x00, 0x3c, 0x00]);
    body.extend_from_slice(&raw_str(b"r5"));
    c.send_bytes(&raw_packet(0x10, &body)).await;
    match c.try_recv(TIMEOUT).await {
        Err(RecvError::Closed) => {}
        Ok(Packet::ConnAck(ack)) => {
            assert_eq!(ack.code, ReasonCode::MALFORMED_PACKET, "{ack:?}");
            c.expect_closed().await;
        }
        other => panic!("expected close or CONNACK 0x81, got {other:?}"),
    }
}

/// [MQTT-3.1.3-6] (3.1.1): with allow_zero_length_client_id (default true) a 3.1.1 client with
/// an empty client id and clean session 1 is accepted.
#[tokio::test]
async fn zero_length_client_id_with_clean_session_accepted_v311() {
    let broker = Broker::start();
    let (mut c, ack) = RawClient::handshake(
        broker.addr(),
        connect_packet(ProtocolVersion::V3_1_1, "", true),
    )
    .await;
    assert_eq!(ack.code, ReasonCode::SUCCESS);
    assert!(!ack.session_present);
    c.ping().await;
}

/// [MQTT-3.1.3-8] (3.1.1): an empty client id with clean session 0 is refused with CONNACK
/// 0x02 (identifier rejected) and the connection is closed.
#[tokio::test]
async fn zero_length_client_id_without_clean_session_rejected_0x02_v311() {
    let broker = Broker::start();
    let mut c = RawClient::connect(broker.addr()).await;
    let mut bytes = raw_connect_v311("");
    bytes[9] = 0x00; // clean session 0
    c.send_bytes(&bytes).await;
    assert_eq!(c.recv_exact_bytes(4).await, vec![0x20, 0x02, 0x00, 0x02]);
    c.expect_closed().await;
}

/// Config allow_zero_length_client_id = false: a 3.1.1 empty id is rejected with 0x02 even
/// with clean session 1 ([MQTT-3.1.3-9] (3.1.1): "identifier rejected" then close).
#[tokio::test]
async fn zero_length_client_id_refused_when_disabled_v311() {
    let broker = Broker::start_with_config("allow_zero_length_client_id = false\n");
    let (mut c, ack) = RawClient::handshake(
        broker.addr(),
        connect_packet(ProtocolVersion::V3_1_1, "", true),
    )
    .await;
    assert_eq!(ack.code, ReasonCode::V3_IDENTIFIER_REJECTED);
    c.expect_closed().await;
}

/// [MQTT-3.1.3-8]: with zero-length ids disabled, MQTT 5 gets CONNACK 0x85 (Client Identifier
/// not valid) and then the connection is closed.
#[tokio::test]
async fn zero_length_client_id_refused_when_disabled_v5_0x85() {
    let broker = Broker::start_with_config("allow_zero_length_client_id = false\n");
    let (mut c, ack) =
        RawClient::handshake(broker.addr(), connect_packet(ProtocolVersion::V5, "", true)).await;
    assert_eq!(ack.code, ReasonCode::CLIENT_IDENTIFIER_NOT_VALID);
    assert!(!ack.session_present, "[MQTT-3.2.2-6]");
    c.expect_closed().await;
}

/// [MQTT-3.2.2-16] / [MQTT-3.1.3-7]: an MQTT 5 client with an empty client id gets an
/// Assigned Client Identifier, unique per client.
#[tokio::test]
async fn v5_empty_client_id_gets_assigned_client_identifier() {
    let broker = Broker::start();
    let (mut a, ack_a) =
        RawClient::handshake(broker.addr(), connect_packet(ProtocolVersion::V5, "", true)).await;
    let (mut b, ack_b) =
        RawClient::handshake(broker.addr(), connect_packet(ProtocolVersion::V5, "", true)).await;
    assert_eq!(ack_a.code, ReasonCode::SUCCESS);
    assert_eq!(ack_b.code, ReasonCode::SUCCESS);
    let id_a = ack_a
        .properties
        .assigned_client_identifier
        .clone()
        .expect("Assigned Client Identifier missing");
    let id_b = ack_b
        .properties
        .assigned_client_identifier
        .clone()
        .expect("Assigned Client Identifier missing");
    assert!(!id_a.is_empty());
    assert_ne!(id_a, id_b, "assigned ids must be unique");
    // Both connections stay up (assigning the second id did not take over the first).
    a.ping().await;
    b.ping().await;
}

/// An MQTT 5 client that supplies its own id gets no Assigned Client Identifier.
#[tokio::test]
async fn v5_given_client_id_gets_no_assigned_identifier() {
    let broker = Broker::start();
    let (_c, ack) = RawClient::handshake(
        broker.addr(),
        connect_packet(ProtocolVersion::V5, "mine", true),
    )
    .await;
    assert_eq!(ack.code, ReasonCode::SUCCESS);
    assert_eq!(ack.properties.assigned_client_identifier, None);
}

/// [MQTT-3.2.2-2]: clean start 1 -> Session Present 0, even when a session existed.
#[tokio::test]
async fn session_present_0_with_clean_start() {
    let broker = Broker::start();
    let mut c = RawClient::connect_v311(broker.addr(), "sp0", false).await;
    c.subscribe(1, &[("a/b", QoS::AtLeastOnce)]).await;
    c.disconnect().await;
    let (_c, ack) = RawClient::handshake(
        broker.addr(),
        connect_packet(ProtocolVersion::V3_1_1, "sp0", true),
    )
    .await;
    assert_eq!(ack.code, ReasonCode::SUCCESS);
    assert!(!ack.session_present);
}

/// [MQTT-3.2.2-3]: clean start 0 with a stored session -> Session Present 1; without one ->
/// Session Present 0 (3.1.1).
#[tokio::test]
async fn session_present_1_on_resumed_session_v311() {
    let broker = Broker::start();
    let (c, ack) = RawClient::handshake(
        broker.addr(),
        connect_packet(ProtocolVersion::V3_1_1, "sp1", false),
    )
    .await;
    assert!(!ack.session_present, "no session existed yet");
    c.disconnect().await;
    let (_c, ack) = RawClient::handshake(
        broker.addr(),
        connect_packet(ProtocolVersion::V3_1_1, "sp1", false),
    )
    .await;
    assert_eq!(ack.code, ReasonCode::SUCCESS);
    assert!(ack.session_present);
}

/// [MQTT-3.2.2-3] for MQTT 5: the session survives only with Session Expiry Interval > 0.
#[tokio::test]
async fn session_present_1_on_resumed_session_v5() {
    let broker = Broker::start();
    let mut conn = connect_packet(ProtocolVersion::V5, "sp5", false);
    conn.properties.session_expiry_interval = Some(60);
    let (c, ack) = RawClient::handshake(broker.addr(), conn.clone()).await;
    assert!(!ack.session_present);
    c.disconnect().await;
    let (_c, ack) = RawClient::handshake(broker.addr(), conn).await;
    assert_eq!(ack.code, ReasonCode::SUCCESS);
    assert!(ack.session_present);
}

/// [MQTT-3.1.2-23] a contrario: MQTT 5 with Session Expiry Interval absent (0) ends the
/// session at disconnect, so clean start 0 later finds no session.
#[tokio::test]
async fn v5_session_without_expiry_not_resumed() {
    let broker = Broker::start();
    let conn = connect_packet(ProtocolVersion::V5, "noexp", false);
    let (c, _) = RawClient::handshake(broker.addr(), conn.clone()).await;
    c.disconnect().await;
    sleep_ms(100).await;
    let (_c, ack) = RawClient::handshake(broker.addr(), conn).await;
    assert_eq!(ack.code, ReasonCode::SUCCESS);
    assert!(!ack.session_present);
}

/// [MQTT-3.12.4-1]: PINGREQ is answered with PINGRESP, byte exact `d0 00`.
#[tokio::test]
async fn pingreq_answered_with_pingresp() {
    let broker = Broker::start();
    let mut c = RawClient::connect(broker.addr()).await;
    c.send_bytes(&raw_connect_v311("pinger")).await;
    c.recv_exact_bytes(4).await;
    c.send_bytes(&[0xc0, 0x00]).await;
    assert_eq!(c.recv_exact_bytes(2).await, vec![0xd0, 0x00]);
}

/// [MQTT-3.2.0-2]: only one CONNACK per connection, and a 3.1.1 CONNECT with a will and
/// credentials fields is parsed (the connection works afterwards).
#[tokio::test]
async fn connect_with_will_username_password_accepted() {
    let broker = Broker::start();
    let mut conn = connect_packet(ProtocolVersion::V3_1_1, "full", true);
    conn.will = Some(will("w/t", b"bye", QoS::AtLeastOnce, false));
    conn.username = Some("user".into());
    conn.password = Some(bytes::Bytes::from_static(b"pass"));
    let (mut c, ack) = RawClient::handshake(broker.addr(), conn).await;
    assert_eq!(ack.code, ReasonCode::SUCCESS);
    c.ping().await;
}

/// [MQTT-3.1.2-1] (3.1.1): a protocol name other than `MQTT` / `MQIsdp`: the server may
/// disconnect; it must not accept the connection.
#[tokio::test]
async fn wrong_protocol_name_not_accepted() {
    let broker = Broker::start();
    let mut c = RawClient::connect(broker.addr()).await;
    let mut bytes = raw_connect_v311("badname");
    bytes[5] = b'X'; // "MQTX"
    c.send_bytes(&bytes).await;
    match c.try_recv(TIMEOUT).await {
        Err(RecvError::Closed) => {}
        Ok(Packet::ConnAck(ack)) => {
            assert_ne!(ack.code, ReasonCode::SUCCESS);
            c.expect_closed().await;
        }
        other => panic!("expected close, got {other:?}"),
    }
}

/// [MQTT-3.1.2-11] / [MQTT-3.1.2-13]: Will Flag 0 with Will QoS or Will Retain set is
/// malformed: the connection is closed without a successful CONNACK.
#[tokio::test]
async fn will_qos_without_will_flag_closes() {
    let broker = Broker::start();
    let mut c = RawClient::connect(broker.addr()).await;
    let mut bytes = raw_connect_v311("willbits");
    bytes[9] = 0x02 | 0x08; // clean session + will QoS 1, will flag 0
    c.send_bytes(&bytes).await;
    c.expect_closed().await;
}

/// [MQTT-3.1.2-22] (3.1.1): Password Flag 1 with User Name Flag 0 is invalid in 3.1.1: the
/// connection is closed.
#[tokio::test]
async fn password_without_username_closes_v311() {
    let broker = Broker::start();
    let mut c = RawClient::connect(broker.addr()).await;
    let mut body = raw_str(b"MQTT");
    body.extend_from_slice(&[0x04, 0x02 | 0x40, 0x00, 0x3c]);
    body.extend_from_slice(&raw_str(b"pwonly"));
    body.extend_from_slice(&raw_str(b"secret"));
    c.send_bytes(&raw_packet(0x10, &body)).await;
    c.expect_closed().await;
}
