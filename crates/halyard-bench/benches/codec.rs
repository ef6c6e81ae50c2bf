//! Codec micro-benchmarks: decode and encode of PUBLISH (64-byte payload, QoS 0/1, MQTT 3.1.1
//! and 5), CONNECT and SUBSCRIBE.
//!
//! Run with `cargo bench -p halyard-bench --features micro --bench codec`.

use std::hint::black_box;

use bytes::{Bytes, BytesMut};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use halyard_codec::{
    decode, encode, Connect, DecodeContext, Packet, Properties, ProtocolVersion, Publish, QoS,
    Subscribe, Subscription, SubscriptionOptions,
};

fn publish(qos: QoS) -> Packet {
    Packet::Publish(Publish {
        qos,
        topic: "bench/run/p/3".to_owned(),
        packet_id: (qos != QoS::AtMostOnce).then_some(42),
        payload: Bytes::from(vec![0xA5; 64]),
        ..Publish::default()
    })
}

fn connect(version: ProtocolVersion) -> Packet {
    Packet::Connect(Box::new(Connect {
        protocol: version,
        clean_start: true,
        keep_alive: 60,
        client_id: "halyard-bench-client-0001".to_owned(),
        will: None,
        username: Some("user".to_owned()),
        password: Some(Bytes::from_static(b"secret")),
        properties: Properties::default(),
    }))
}

fn subscribe() -> Packet {
    Packet::Subscribe(Subscribe {
        packet_id: 7,
        subscriptions: vec![
            Subscription {
                filter: "sensors/+/temperature".to_owned(),
                options: SubscriptionOptions {
                    qos: QoS::AtLeastOnce,
                    ..SubscriptionOptions::default()
                },
            },
            Subscription {
                filter: "alerts/#".to_owned(),
                options: SubscriptionOptions::default(),
            },
        ],
        properties: Properties::default(),
    })
}

fn encoded(packet: &Packet, version: ProtocolVersion) -> Bytes {
    let mut buf = BytesMut::new();
    encode(packet, version, &mut buf).expect("benchmark packet encodes");
    buf.freeze()
}

fn bench_packet(c: &mut Criterion, name: &str, packet: &Packet, version: ProtocolVersion) {
    let bytes = encoded(packet, version);
    let mut group = c.benchmark_group(name);
    group.throughput(Throughput::Bytes(bytes.len() as u64));
    // CONNECT is decoded before the level is known; everything else with it.
    let ctx = DecodeContext {
        version: match packet {
            Packet::Connect(_) => None,
            _ => Some(version),
        },
        max_packet_size: 1 << 20,
    };
    group.bench_function("decode", |b| {
        let mut buf = BytesMut::with_capacity(bytes.len());
        b.iter(|| {
            buf.clear();
            buf.extend_from_slice(&bytes);
            black_box(decode(&mut buf, &ctx).expect("decodes"))
        })
    });
    group.bench_function("encode", |b| {
        let mut buf = BytesMut::with_capacity(bytes.len() * 2);
        b.iter(|| {
            buf.clear();
            encode(black_box(packet), version, &mut buf).expect("encodes");
            black_box(buf.len())
        })
    });
    group.finish();
}

fn codec(c: &mut Criterion) {
    for (label, version) in [
        ("v311", ProtocolVersion::V3_1_1),
        ("v5", ProtocolVersion::V5),
    ] {
        bench_packet(
            c,
            &format!("publish_qos0_64B_{label}"),
            &publish(QoS::AtMostOnce),
            version,
        );
        bench_packet(
            c,
            &format!("publish_qos1_64B_{label}"),
            &publish(QoS::AtLeastOnce),
            version,
        );
        bench_packet(c, &format!("connect_{label}"), &connect(version), version);
        bench_packet(c, &format!("subscribe_{label}"), &subscribe(), version);
    }
}

criterion_group!(benches, codec);
criterion_main!(benches);
