//! Durability: what the broker acknowledged survives `kill -9`, and QoS 2 stays exactly
//! once across crashes (issue: durable state). Real binary, real redb store, real SIGKILL.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use bytes::Bytes;
use common::*;
use halyard_codec::{Packet, ProtocolVersion, Publish, QoS};

const CONFIG: &str =
    "max_queued_messages = 1000000\nmax_inflight = 64\n[storage]\nfsync = \"always\"\n";
const WINDOW: usize = 16;

/// A publisher with a persistent session that keeps its unacknowledged messages and resends
/// them on every reconnect, as a 3.1.1 client must [MQTT-4.4.0-1].
#[derive(Default)]
struct Publisher {
    next_seq: u32,
    next_id: u16,
    /// Packet id -> (sequence number, QoS) of messages not yet fully acknowledged.
    unacked: BTreeMap<u16, (u32, QoS)>,
    /// QoS 2 packet ids PUBRECed (so PUBREL sent), awaiting PUBCOMP.
    released: BTreeSet<u16>,
    /// Sequence numbers the broker acknowledged (PUBACK, or PUBREC for QoS 2).
    acked_q1: BTreeSet<u32>,
    acked_q2: BTreeSet<u32>,
}

fn message(seq: u32, qos: QoS, id: u16, dup: bool) -> Packet {
    Packet::Publish(Publish {
        dup,
        qos,
        retain: false,
        topic: if qos == QoS::ExactlyOnce {
            "crash/q2"
        } else {
            "crash/q1"
        }
        .into(),
        packet_id: Some(id),
        payload: Bytes::copy_from_slice(&seq.to_be_bytes()),
        properties: Default::default(),
    })
}

impl Publisher {
    fn allocate_id(&mut self) -> u16 {
        loop {
            self.next_id = self.next_id.checked_add(1).unwrap_or(1);
            if !self.unacked.contains_key(&self.next_id) {
                return self.next_id;
            }
        }
    }

    /// Publishes until the connection dies (the broker is killed under it).
    async fn run(&mut self, client: &mut RawClient) {
        for (&id, &(seq, qos)) in &self.unacked {
            if self.released.contains(&id) {
                client.send(&Packet::PubRel(pub_response(id))).await;
            } else {
                client.send(&message(seq, qos, id, true)).await;
            }
        }
        loop {
            if self.unacked.len() < WINDOW {
                let seq = self.next_seq;
                self.next_seq += 1;
                let qos = if seq.is_multiple_of(2) {
                    QoS::AtLeastOnce
                } else {
                    QoS::ExactlyOnce
                };
                let id = self.allocate_id();
                self.unacked.insert(id, (seq, qos));
                client.send(&message(seq, qos, id, false)).await;
                continue;
            }
            let packet = match client.try_recv(Duration::from_secs(2)).await {
                Ok(packet) => packet,
                Err(_) => return,
            };
            match packet {
                Packet::PubAck(ack) => {
                    if let Some((seq, _)) = self.unacked.remove(&ack.packet_id) {
                        self.acked_q1.insert(seq);
                    }
                }
                Packet::PubRec(rec) => {
                    if let Some(&(seq, _)) = self.unacked.get(&rec.packet_id) {
                        self.acked_q2.insert(seq);
                        self.released.insert(rec.packet_id);
                        client
                            .send(&Packet::PubRel(pub_response(rec.packet_id)))
                            .await;
                    }
                }
                Packet::PubComp(comp) => {
                    self.released.remove(&comp.packet_id);
                    self.unacked.remove(&comp.packet_id);
                }
                other => panic!("unexpected packet for the publisher: {other:?}"),
            }
        }
    }
}

/// Tiny deterministic generator for kill moments (no extra dependency).
fn next_delay(state: &mut u64) -> Duration {
    *state = state
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    Duration::from_millis(150 + (*state >> 33) % 350)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_messages_survive_kill_9_and_qos2_is_never_duplicated() {
    let data_dir = unique_temp_path("crash", "d");
    let mut broker = Broker::start_durable(&data_dir, CONFIG);
    let mut subscriber = RawClient::connect_v311(broker.addr(), "crash-sub", false).await;
    subscriber
        .send(&Packet::Subscribe(subscribe_packet(
            1,
            &[
                ("crash/q1", QoS::AtLeastOnce),
                ("crash/q2", QoS::ExactlyOnce),
            ],
        )))
        .await;
    assert!(matches!(subscriber.recv().await, Packet::SubAck(_)));
    drop(subscriber);

    let mut publisher = Publisher::default();
    let mut rng = 0x5eed_u64;
    for _cycle in 0..6 {
        let (mut client, ack) = RawClient::handshake(
            broker.addr(),
            connect_packet(ProtocolVersion::V3_1_1, "crash-pub", false),
        )
        .await;
        assert_eq!(ack.code.0, 0);
        let kill_after = next_delay(&mut rng);
        {
            let run = publisher.run(&mut client);
            tokio::pin!(run);
            tokio::select! {
                () = &mut run => panic!("the publisher stopped before the broker was killed"),
                () = tokio::time::sleep(kill_after) => {}
            }
            broker.kill9();
            // Let the publisher see the connection die and keep its bookkeeping.
            run.await;
        }
        drop(client);
        broker = Broker::start_durable(&data_dir, CONFIG);
    }
    assert!(
        publisher.acked_q1.len() > 50 && publisher.acked_q2.len() > 50,
        "too few messages acknowledged to test anything: {} / {}",
        publisher.acked_q1.len(),
        publisher.acked_q2.len()
    );

    // [MQTT-3.2.2-3]: the persistent session is still there.
    let (mut subscriber, ack) = RawClient::handshake(
        broker.addr(),
        connect_packet(ProtocolVersion::V3_1_1, "crash-sub", false),
    )
    .await;
    assert!(ack.session_present, "session lost in the crashes");
    let mut got_q1 = BTreeSet::new();
    let mut got_q2 = Vec::new();
    while let Ok(packet) = subscriber.try_recv(Duration::from_secs(3)).await {
        match packet {
            Packet::Publish(publish) => {
                let seq = u32::from_be_bytes(publish.payload[..4].try_into().expect("4 bytes"));
                let id = publish.packet_id.expect("QoS > 0");
                if publish.qos == QoS::ExactlyOnce {
                    got_q2.push(seq);
                    subscriber.send(&Packet::PubRec(pub_response(id))).await;
                } else {
                    got_q1.insert(seq);
                    subscriber.send(&Packet::PubAck(pub_response(id))).await;
                }
            }
            Packet::PubRel(rel) => {
                subscriber
                    .send(&Packet::PubComp(pub_response(rel.packet_id)))
                    .await;
            }
            other => panic!("unexpected packet for the subscriber: {other:?}"),
        }
    }
    let lost_q1: Vec<_> = publisher.acked_q1.difference(&got_q1).collect();
    assert!(
        lost_q1.is_empty(),
        "{} acknowledged QoS 1 messages lost, first: {:?}",
        lost_q1.len(),
        &lost_q1[..lost_q1.len().min(10)]
    );
    let unique_q2: BTreeSet<u32> = got_q2.iter().copied().collect();
    assert_eq!(
        unique_q2.len(),
        got_q2.len(),
        "a QoS 2 message arrived twice"
    );
    let lost_q2: Vec<_> = publisher.acked_q2.difference(&unique_q2).collect();
    assert!(
        lost_q2.is_empty(),
        "{} acknowledged QoS 2 messages lost, first: {:?}",
        lost_q2.len(),
        &lost_q2[..lost_q2.len().min(10)]
    );
    drop(broker);
    let _ = std::fs::remove_dir_all(&data_dir);
}

/// Publishes `count` QoS 1 messages on `topic` and waits for every PUBACK.
async fn publish_acked(client: &mut RawClient, topic: &str, count: u16) {
    for id in 1..=count {
        client
            .send(&Packet::Publish(Publish {
                dup: false,
                qos: QoS::AtLeastOnce,
                retain: false,
                topic: topic.into(),
                packet_id: Some(id),
                payload: Bytes::copy_from_slice(&id.to_be_bytes()),
                properties: Default::default(),
            }))
            .await;
        assert!(matches!(client.recv().await, Packet::PubAck(ack) if ack.packet_id == id));
    }
}

#[tokio::test]
async fn sigterm_keeps_everything_even_without_fsync() {
    // A clean shutdown makes every commit durable, whatever the fsync policy.
    let data_dir = unique_temp_path("sigterm", "d");
    let config = "[storage]\nfsync = \"never\"\n";
    let mut broker = Broker::start_durable(&data_dir, config);
    let sub = connect_packet(ProtocolVersion::V3_1_1, "term-sub", false);
    offline_subscriber(broker.addr(), sub.clone(), "term/t").await;
    let mut publisher = RawClient::connect_v311(broker.addr(), "term-pub", true).await;
    publish_acked(&mut publisher, "term/t", 20).await;
    broker.sigterm();
    assert!(broker
        .wait_exit(Duration::from_secs(10))
        .is_some_and(|s| s.success()));
    let broker = Broker::start_durable(&data_dir, config);
    let (mut client, ack) = RawClient::handshake(broker.addr(), sub).await;
    assert!(ack.session_present);
    for _ in 0..20 {
        let Packet::Publish(publish) = client.recv().await else {
            panic!("expected the queued messages");
        };
        client
            .send(&Packet::PubAck(pub_response(
                publish.packet_id.expect("QoS 1"),
            )))
            .await;
    }
    drop(broker);
    let _ = std::fs::remove_dir_all(&data_dir);
}

#[tokio::test]
async fn session_expiry_holds_across_a_restart() {
    // [MQTT-3.1.2-23]: the session is discarded once its expiry interval has passed, even
    // if the broker was down meanwhile.
    let data_dir = unique_temp_path("expiry", "d");
    let mut broker = Broker::start_durable(&data_dir, "");
    let mut short = connect_packet(ProtocolVersion::V5, "short-lived", false);
    short.properties.session_expiry_interval = Some(1);
    let mut long = connect_packet(ProtocolVersion::V5, "long-lived", false);
    long.properties.session_expiry_interval = Some(600);
    offline_subscriber(broker.addr(), short.clone(), "x").await;
    offline_subscriber(broker.addr(), long.clone(), "x").await;
    broker.kill9();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let broker = Broker::start_durable(&data_dir, "");
    let (_client, ack) = RawClient::handshake(broker.addr(), long).await;
    assert!(ack.session_present, "an unexpired session was lost");
    let (_client, ack) = RawClient::handshake(broker.addr(), short).await;
    assert!(!ack.session_present, "an expired session came back");
    drop(broker);
    let _ = std::fs::remove_dir_all(&data_dir);
}

#[tokio::test]
async fn corrupt_data_file_is_set_aside_and_the_broker_serves() {
    let data_dir = unique_temp_path("corrupt", "d");
    std::fs::create_dir_all(&data_dir).expect("data dir");
    std::fs::write(data_dir.join("halyard.redb"), vec![0xA5; 64 * 1024]).expect("garbage");
    let broker = Broker::start_durable(&data_dir, "");
    let mut client = RawClient::connect_v311(broker.addr(), "after-corruption", true).await;
    client.ping().await;
    let aside: Vec<_> = std::fs::read_dir(&data_dir)
        .expect("list data dir")
        .filter_map(Result::ok)
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with("halyard.redb.corrupt-"))
        .collect();
    assert_eq!(aside.len(), 1, "the damaged file was not kept aside");
    assert!(
        broker.logs().contains("corrupt"),
        "nothing logged about the damage"
    );
    drop(broker);
    let _ = std::fs::remove_dir_all(&data_dir);
}

/// Flips one byte inside every stored copy of `needle` in the data file.
fn flip_every_copy(data_file: &std::path::Path, needle: &[u8]) -> usize {
    let mut bytes = std::fs::read(data_file).expect("read data file");
    let mut flipped = 0;
    let mut from = 0;
    while let Some(at) = bytes[from..]
        .windows(needle.len())
        .position(|w| w == needle)
    {
        bytes[from + at + needle.len() / 2] ^= 0x01;
        from += at + needle.len();
        flipped += 1;
    }
    std::fs::write(data_file, &bytes).expect("write data file");
    flipped
}

#[tokio::test]
async fn a_damaged_payload_is_refused_or_skipped_never_delivered() {
    let data_dir = unique_temp_path("payload-flip", "d");
    let mut broker = Broker::start_durable(&data_dir, "");
    let sub = connect_packet(ProtocolVersion::V3_1_1, "flip-sub", false);
    offline_subscriber(broker.addr(), sub.clone(), "flip/t").await;
    let mut publisher = RawClient::connect_v311(broker.addr(), "flip-pub", true).await;
    let payloads: [&[u8]; 2] = [b"intact payload, delivered", b"damaged payload, withheld"];
    for (id, payload) in (1u16..).zip(payloads) {
        publisher
            .send(&Packet::Publish(Publish {
                dup: false,
                qos: QoS::AtLeastOnce,
                retain: false,
                topic: "flip/t".into(),
                packet_id: Some(id),
                payload: Bytes::from_static(payload),
                properties: Default::default(),
            }))
            .await;
        assert!(matches!(publisher.recv().await, Packet::PubAck(ack) if ack.packet_id == id));
    }
    broker.sigterm();
    assert!(broker
        .wait_exit(Duration::from_secs(10))
        .is_some_and(|s| s.success()));
    let data_file = data_dir.join("halyard.redb");
    assert!(
        flip_every_copy(&data_file, payloads[1]) > 0,
        "payload not stored"
    );

    // Refused: the broker does not start, says why, and leaves the file in place.
    let config = write_temp_config("[storage]\non_corruption = \"refuse\"\n");
    let data_arg = data_dir.display().to_string();
    let config_arg = config.display().to_string();
    let (status, _, stderr) = run_halyard(&[
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--http-listen",
        "127.0.0.1:0",
        "--data-dir",
        &data_arg,
        "--config",
        &config_arg,
    ]);
    assert!(!status.success());
    assert!(stderr.contains("refusing"), "{stderr}");
    assert!(data_file.exists());

    // Salvaged (the default): the session and the intact message are there; the damaged
    // message is counted and skipped, never delivered altered.
    let broker = Broker::start_durable(&data_dir, "");
    let (mut client, ack) = RawClient::handshake(broker.addr(), sub).await;
    assert!(ack.session_present);
    let publish = client.recv_publish().await;
    assert_eq!(publish.payload.as_ref(), payloads[0]);
    client
        .send(&Packet::PubAck(pub_response(
            publish.packet_id.expect("QoS 1"),
        )))
        .await;
    client.expect_nothing(300).await;
    assert!(
        broker.logs().contains("1 corrupt"),
        "the start-up line does not count the damaged record"
    );
    drop(broker);
    let _ = std::fs::remove_file(&config);
    let _ = std::fs::remove_dir_all(&data_dir);
}
