//! Malformed input closes only the offending connection; MQTT 5 clients are told why with a
//! DISCONNECT reason code first ([MQTT-4.13.1-1], 4.13).

mod common;

use common::*;
use halyard_codec::{ProtocolVersion, QoS, ReasonCode};

/// A broker with a healthy bystander subscribed to `#`.
async fn setup() -> (Broker, RawClient) {
    let broker = Broker::start();
    let mut bystander = RawClient::connect_v311(broker.addr(), "bystander", true).await;
    bystander.subscribe(1, &[("#", QoS::AtMostOnce)]).await;
    (broker, bystander)
}

/// The bystander still works: it publishes and receives its own message, and received
/// nothing from the bad client.
async fn bystander_still_works(b: &mut RawClient) {
    b.send(&halyard_codec::Packet::Publish(publish0("alive", b"yes")))
        .await;
    let p = b.recv_publish().await;
    assert_eq!(
        p.topic, "alive",
        "nothing from the bad client may have been routed"
    );
}

async fn bad_client(broker: &Broker, version: ProtocolVersion) -> RawClient {
    let (c, ack) = RawClient::handshake(broker.addr(), connect_packet(version, "bad", true)).await;
    assert_eq!(ack.code, ReasonCode::SUCCESS);
    c
}

/// A PUBLISH (v3.1.1 and v5 share the layout up to the topic) with raw topic bytes.
fn raw_publish_topic(version: ProtocolVersion, topic: &[u8]) -> Vec<u8> {
    let mut body = raw_str(topic);
    if version.is_v5() {
        body.push(0x00); // property length
    }
    body.extend_from_slice(b"payload");
    raw_packet(0x30, &body)
}

/// [MQTT-1.5.5-1] / 2.1.4: a Remaining Length of 5 bytes is malformed: 3.1.1 closed.
#[tokio::test]
async fn five_byte_remaining_length_closes_v311() {
    let (broker, mut b) = setup().await;
    let mut c = bad_client(&broker, ProtocolVersion::V3_1_1).await;
    c.send_bytes(&[0x30, 0xff, 0xff, 0xff, 0xff, 0x01]).await;
    c.expect_closed().await;
    bystander_still_works(&mut b).await;
}

/// Same for MQTT 5: DISCONNECT 0x81 (Malformed Packet) then close.
#[tokio::test]
async fn five_byte_remaining_length_disconnect_0x81_v5() {
    let (broker, mut b) = setup().await;
    let mut c = bad_client(&broker, ProtocolVersion::V5).await;
    c.send_bytes(&[0x30, 0xff, 0xff, 0xff, 0xff, 0x01]).await;
    c.expect_disconnect(ReasonCode::MALFORMED_PACKET).await;
    bystander_still_works(&mut b).await;
}

/// [MQTT-3.3.1-4]: PUBLISH with both QoS bits set is malformed: 3.1.1 closed.
#[tokio::test]
async fn publish_qos_3_closes_v311() {
    let (broker, mut b) = setup().await;
    let mut c = bad_client(&broker, ProtocolVersion::V3_1_1).await;
    let mut body = raw_str(b"q3");
    body.extend_from_slice(&[0x00, 0x01, b'x']);
    c.send_bytes(&raw_packet(0x36, &body)).await;
    c.expect_closed().await;
    bystander_still_works(&mut b).await;
}

/// [MQTT-3.3.1-4]: MQTT 5: DISCONNECT 0x81 then close.
#[tokio::test]
async fn publish_qos_3_disconnect_0x81_v5() {
    let (broker, mut b) = setup().await;
    let mut c = bad_client(&broker, ProtocolVersion::V5).await;
    let mut body = raw_str(b"q3");
    body.extend_from_slice(&[0x00, 0x01, 0x00, b'x']);
    c.send_bytes(&raw_packet(0x36, &body)).await;
    c.expect_disconnect(ReasonCode::MALFORMED_PACKET).await;
    bystander_still_works(&mut b).await;
}

/// [MQTT-3.3.2-2] / [MQTT-4.7.0-1]: a wildcard in a PUBLISH topic name: 3.1.1 closed.
#[tokio::test]
async fn wildcard_in_topic_name_closes_v311() {
    let (broker, mut b) = setup().await;
    let mut c = bad_client(&broker, ProtocolVersion::V3_1_1).await;
    c.send_bytes(&raw_publish_topic(ProtocolVersion::V3_1_1, b"a/+/b"))
        .await;
    c.expect_closed().await;
    bystander_still_works(&mut b).await;
}

/// [MQTT-3.3.2-2]: MQTT 5: DISCONNECT with an error reason (0x90 Topic Name invalid, or
/// 0x81/0x82) then close.
#[tokio::test]
async fn wildcard_in_topic_name_disconnect_v5() {
    let (broker, mut b) = setup().await;
    let mut c = bad_client(&broker, ProtocolVersion::V5).await;
    c.send_bytes(&raw_publish_topic(ProtocolVersion::V5, b"a/#"))
        .await;
    let reason = c.expect_closed_maybe_disconnect().await;
    assert!(
        matches!(
            reason,
            Some(ReasonCode::TOPIC_NAME_INVALID)
                | Some(ReasonCode::MALFORMED_PACKET)
                | Some(ReasonCode::PROTOCOL_ERROR)
        ),
        "expected DISCONNECT 0x90/0x81/0x82 before close, got {reason:?}"
    );
    bystander_still_works(&mut b).await;
}

/// [MQTT-1.5.4-1] (1.5.3-1 in 3.1.1): ill-formed UTF-8 in the topic: 3.1.1 closed.
#[tokio::test]
async fn invalid_utf8_topic_closes_v311() {
    let (broker, mut b) = setup().await;
    let mut c = bad_client(&broker, ProtocolVersion::V3_1_1).await;
    c.send_bytes(&raw_publish_topic(
        ProtocolVersion::V3_1_1,
        &[b'a', 0xff, 0xfe],
    ))
    .await;
    c.expect_closed().await;
    bystander_still_works(&mut b).await;
}

/// [MQTT-1.5.4-1]: MQTT 5: DISCONNECT 0x81 then close; also for an encoded surrogate
/// (U+D800 = ED A0 80).
#[tokio::test]
async fn invalid_utf8_topic_disconnect_0x81_v5() {
    let (broker, mut b) = setup().await;
    let mut c = bad_client(&broker, ProtocolVersion::V5).await;
    c.send_bytes(&raw_publish_topic(
        ProtocolVersion::V5,
        &[b'a', 0xed, 0xa0, 0x80],
    ))
    .await;
    c.expect_disconnect(ReasonCode::MALFORMED_PACKET).await;
    bystander_still_works(&mut b).await;
}

/// [MQTT-1.5.4-2] / [MQTT-4.7.3-2]: U+0000 in a topic name: 3.1.1 closed.
#[tokio::test]
async fn nul_in_topic_closes_v311() {
    let (broker, mut b) = setup().await;
    let mut c = bad_client(&broker, ProtocolVersion::V3_1_1).await;
    c.send_bytes(&raw_publish_topic(ProtocolVersion::V3_1_1, b"a\0b"))
        .await;
    c.expect_closed().await;
    bystander_still_works(&mut b).await;
}

/// [MQTT-1.5.4-2]: MQTT 5: DISCONNECT 0x81 then close.
#[tokio::test]
async fn nul_in_topic_disconnect_0x81_v5() {
    let (broker, mut b) = setup().await;
    let mut c = bad_client(&broker, ProtocolVersion::V5).await;
    c.send_bytes(&raw_publish_topic(ProtocolVersion::V5, b"a\0b"))
        .await;
    c.expect_disconnect(ReasonCode::MALFORMED_PACKET).await;
    bystander_still_works(&mut b).await;
}

/// [MQTT-3.8.1-1]: SUBSCRIBE with reserved fixed-header bits other than 0010: closed
/// (3.1.1: [MQTT-3.8.1-1] too).
#[tokio::test]
async fn subscribe_with_bad_fixed_header_flags_closes() {
    let (broker, mut b) = setup().await;
    let mut c = bad_client(&broker, ProtocolVersion::V3_1_1).await;
    let mut body = vec![0x00, 0x01];
    body.extend_from_slice(&raw_str(b"t"));
    body.push(0x00);
    c.send_bytes(&raw_packet(0x80, &body)).await;
    c.expect_closed().await;
    bystander_still_works(&mut b).await;
}

/// [MQTT-3.6.1-1]: PUBREL with flags other than 0010: MQTT 5 DISCONNECT 0x81 then close.
#[tokio::test]
async fn pubrel_with_bad_flags_disconnect_0x81_v5() {
    let (broker, mut b) = setup().await;
    let mut c = bad_client(&broker, ProtocolVersion::V5).await;
    c.send_bytes(&[0x60, 0x02, 0x00, 0x01]).await;
    c.expect_disconnect(ReasonCode::MALFORMED_PACKET).await;
    bystander_still_works(&mut b).await;
}

/// [MQTT-3.8.3-2]: SUBSCRIBE with no filter at all is malformed / a protocol error.
#[tokio::test]
async fn subscribe_without_filters_closes() {
    let (broker, mut b) = setup().await;
    let mut c = bad_client(&broker, ProtocolVersion::V3_1_1).await;
    c.send_bytes(&[0x82, 0x02, 0x00, 0x01]).await;
    c.expect_closed().await;
    bystander_still_works(&mut b).await;
}

/// [MQTT-2.2.1-3] / 2.2.1: a QoS 1 PUBLISH with packet identifier 0 is malformed / a protocol
/// error: closed.
#[tokio::test]
async fn qos1_publish_with_packet_id_0_closes() {
    let (broker, mut b) = setup().await;
    let mut c = bad_client(&broker, ProtocolVersion::V3_1_1).await;
    let mut body = raw_str(b"zero");
    body.extend_from_slice(&[0x00, 0x00, b'x']);
    c.send_bytes(&raw_packet(0x32, &body)).await;
    c.expect_closed().await;
    bystander_still_works(&mut b).await;
}

/// An unknown packet type (0) closes the connection.
#[tokio::test]
async fn reserved_packet_type_closes() {
    let (broker, mut b) = setup().await;
    let mut c = bad_client(&broker, ProtocolVersion::V3_1_1).await;
    c.send_bytes(&[0x00, 0x00]).await;
    c.expect_closed().await;
    bystander_still_works(&mut b).await;
}
