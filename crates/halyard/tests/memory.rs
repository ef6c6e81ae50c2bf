//! Issue 14, bounded memory: the broker-wide memory budget paces publishers instead of
//! refusing them, and what slow QoS 0 subscribers hold in their writers is bounded by
//! `max_outbound_buffer` and given back when they go.

mod common;

use std::time::{Duration, Instant};

use bytes::BytesMut;
use common::*;
use halyard_codec::{Packet, ProtocolVersion, QoS, ReasonCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::OwnedReadHalf;

/// Polls `/metrics` until `sample` satisfies `done`, failing after a while.
fn wait_for_sample(broker: &Broker, sample_name: &str, done: impl Fn(f64) -> bool) -> f64 {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let value = sample(&metrics(broker.http_addr()), sample_name);
        if done(value) {
            return value;
        }
        assert!(Instant::now() < deadline, "{sample_name} stayed at {value}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// PUBACK reason codes that arrive on `reader` until nothing has come for `quiet`.
async fn acks_until_quiet(
    reader: &mut OwnedReadHalf,
    buf: &mut BytesMut,
    quiet: Duration,
) -> Vec<ReasonCode> {
    let mut reasons = Vec::new();
    loop {
        while let Some(packet) = decode_packet(buf, Some(ProtocolVersion::V5)).expect("decodes") {
            match packet {
                Packet::PubAck(ack) => reasons.push(ack.reason),
                other => panic!("expected PUBACK, got {other:?}"),
            }
        }
        match tokio::time::timeout(quiet, reader.read_buf(buf)).await {
            Ok(Ok(read)) if read > 0 => {}
            _ => return reasons,
        }
    }
}

/// A tiny budget, a subscriber that never reads and a publisher: the publisher is paced (its
/// publishes wait unread, none is refused), the memory held stays near the budget, and
/// when the subscriber leaves the memory is given back and the publisher finishes.
#[tokio::test]
async fn past_the_memory_budget_publishers_are_paced_not_refused() {
    const BUDGET: f64 = 65_536.0;
    const EVENT_QUEUE_BYTES: f64 = 16_384.0;
    const COUNT: u16 = 2_000;
    let broker = Broker::start_with_config(
        "memory_budget = 65536\nevent_queue_bytes = 16384\nmax_queued_messages = 100000\n",
    );
    let mut stuck = RawClient::connect_v5(broker.addr(), "stuck", true).await;
    stuck.subscribe(1, &[("paced/t", QoS::AtLeastOnce)]).await;
    // The publisher writes from a task of its own: a paced publisher's socket fills up.
    let mut publisher = tokio::net::TcpStream::connect(broker.addr())
        .await
        .expect("connect");
    let connect = connect_packet(ProtocolVersion::V5, "publisher", true);
    let connect = encode_packet(&Packet::Connect(Box::new(connect)), ProtocolVersion::V5);
    publisher.write_all(&connect).await.expect("CONNECT");
    let (mut reader, mut writer) = publisher.into_split();
    let mut buf = BytesMut::new();
    reader.read_buf(&mut buf).await.expect("CONNACK");
    assert!(matches!(
        decode_packet(&mut buf, Some(ProtocolVersion::V5)),
        Ok(Some(Packet::ConnAck(_)))
    ));
    let sending = tokio::spawn(async move {
        for id in 1..=COUNT {
            let packet = publish_packet("paced/t", &[7u8; 1024], QoS::AtLeastOnce, false, Some(id));
            let bytes = encode_packet(&Packet::Publish(packet), ProtocolVersion::V5);
            writer.write_all(&bytes).await.expect("PUBLISH");
        }
        writer
    });
    let before = acks_until_quiet(&mut reader, &mut buf, Duration::from_secs(1)).await;
    assert!(
        before.iter().all(|reason| *reason == ReasonCode::SUCCESS),
        "pacing refuses nothing: {before:?}"
    );
    assert!(
        before.len() < usize::from(COUNT),
        "the publisher was not paced: all {} acknowledged",
        before.len()
    );
    let text = metrics(broker.http_addr());
    assert_eq!(sample(&text, "halyard_publishers_paced"), 1.0);
    let held = sample(&text, "halyard_memory_held_bytes");
    // The budget covers the event channel and a sixteenth nobody counts: the sessions are
    // paced past the rest of it.
    assert!(
        held > BUDGET - EVENT_QUEUE_BYTES - BUDGET / 16.0,
        "paced only past the budget less the event channel's and the uncounted share: {held}"
    );
    assert!(held < 4.0 * BUDGET, "the total stays bounded: {held}");

    stuck.drop_abruptly().await;
    let after = acks_until_quiet(&mut reader, &mut buf, Duration::from_secs(2)).await;
    let _writer = sending.await.expect("every publish was written");
    // Success, or 0x10 No matching subscribers once the subscriber is gone: never refused.
    assert!(
        after.iter().all(|reason| !reason.is_error()),
        "pacing refuses nothing: {after:?}"
    );
    assert_eq!(
        before.len() + after.len(),
        usize::from(COUNT),
        "every publish is acknowledged once the memory is back"
    );
    wait_for_sample(&broker, "halyard_memory_held_bytes", |held| held == 0.0);
    let text = metrics(broker.http_addr());
    assert_eq!(sample(&text, "halyard_publishers_paced"), 0.0);
    assert!(sample(&text, "halyard_publishers_paced_seconds_total") > 0.0);
}

/// Slow QoS 0 subscribers each hold at most `max_outbound_buffer` in their writers (the
/// memory of the buffers, not only the bytes), and it is all given back when they go.
#[tokio::test]
async fn slow_qos0_subscribers_hold_at_most_the_outbound_limit_and_give_it_back() {
    const LIMIT: f64 = 262_144.0;
    const SUBSCRIBERS: usize = 4;
    let broker = Broker::start_with_config("max_outbound_buffer = 262144\n");
    let mut stalled = Vec::new();
    for index in 0..SUBSCRIBERS {
        let mut sub =
            RawClient::connect_v311(broker.addr(), &format!("stalled-{index}"), true).await;
        sub.subscribe(1, &[("flood/t", QoS::AtMostOnce)]).await;
        stalled.push(sub);
    }
    let mut publisher = RawClient::connect_v311(broker.addr(), "flooder", true).await;
    for _ in 0..400 {
        publisher
            .send(&Packet::Publish(publish0("flood/t", &[1u8; 30_000])))
            .await;
    }
    // A PINGRESP means the broker has routed every publish before it.
    publisher.send(&Packet::PingReq).await;
    assert!(matches!(
        publisher.try_recv(Duration::from_secs(10)).await,
        Ok(Packet::PingResp)
    ));
    let text = metrics(broker.http_addr());
    let held = sample(&text, "halyard_outbound_buffer_bytes");
    assert!(held > 0.0, "the stalled writers hold something");
    assert!(
        held <= LIMIT * SUBSCRIBERS as f64,
        "{held} > {SUBSCRIBERS} x {LIMIT}"
    );
    assert!(
        sample(
            &text,
            "halyard_messages_dropped_total{reason=\"slow_consumer\"}"
        ) > 0.0
    );
    for sub in stalled {
        sub.drop_abruptly().await;
    }
    wait_for_sample(&broker, "halyard_outbound_buffer_bytes", |held| held == 0.0);
}
