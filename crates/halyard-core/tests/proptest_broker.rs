//! Property test: arbitrary sequences of decoded packets, lost connections and clock jumps,
//! on several connections, never panic the broker core, whatever its limits and ACL, and
//! every output is addressed to a connection that exists. The cheap, always-run companion
//! of the cargo-fuzz target in `crates/halyard-core/fuzz`.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use halyard_codec::{
    Auth, Connect, Disconnect, Packet, Properties, ProtocolVersion, PubResponse, Publish, QoS,
    ReasonCode, Subscribe, Subscription, SubscriptionOptions, Unsubscribe, Will,
};
use halyard_core::{Acl, Broker, BrokerConfig, ConnectionId, Output};
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Event {
    Packet(ConnectionId, Box<Packet>),
    Lost(ConnectionId),
    Advance(u64),
}

fn topic() -> impl Strategy<Value = String> {
    prop::sample::select(vec!["a", "a/b", "a/b/c", "$SYS/x", "b", "x/y"]).prop_map(str::to_owned)
}

fn filter() -> impl Strategy<Value = String> {
    prop::sample::select(vec![
        "#",
        "a/+",
        "a/#",
        "a/b",
        "+/b",
        "$share/g/a/#",
        "$share/g/#",
        "$SYS/#",
        "b",
    ])
    .prop_map(str::to_owned)
}

fn qos() -> impl Strategy<Value = QoS> {
    prop::sample::select(vec![QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce])
}

fn version() -> impl Strategy<Value = ProtocolVersion> {
    prop::sample::select(vec![
        ProtocolVersion::V3_1,
        ProtocolVersion::V3_1_1,
        ProtocolVersion::V5,
    ])
}

fn connect() -> impl Strategy<Value = Packet> {
    (
        version(),
        prop::sample::select(vec!["c1", "c2", "c3", ""]),
        any::<bool>(),
        0u16..4,
        prop::option::of((topic(), qos(), any::<bool>(), prop::option::of(0u32..3))),
        prop::option::of(prop::sample::select(vec!["alice", "bob"])),
        prop::option::of(prop::sample::select(vec![0u32, 5, u32::MAX])),
        prop::option::of(1u16..4),
    )
        .prop_map(
            |(protocol, id, clean_start, keep_alive, will, user, expiry, receive_max)| {
                let mut properties = Properties::default();
                if protocol.is_v5() {
                    properties.session_expiry_interval = expiry;
                    properties.receive_maximum = receive_max;
                    properties.topic_alias_maximum = Some(2);
                }
                let will = will.map(|(topic, qos, retain, delay)| Will {
                    topic,
                    payload: Bytes::from_static(b"will"),
                    qos,
                    retain,
                    properties: Properties {
                        will_delay_interval: delay.filter(|_| protocol.is_v5()),
                        ..Properties::default()
                    },
                });
                Packet::Connect(Box::new(Connect {
                    protocol,
                    clean_start,
                    keep_alive,
                    client_id: id.to_owned(),
                    will,
                    username: user.map(str::to_owned),
                    password: None,
                    properties,
                }))
            },
        )
}

fn publish() -> impl Strategy<Value = Packet> {
    (
        topic(),
        qos(),
        any::<bool>(),
        1u16..5,
        prop::option::of(0u16..4),
        any::<bool>(),
        prop::option::of(0u32..3),
    )
        .prop_map(|(topic, qos, retain, id, alias, empty_payload, expiry)| {
            let properties = Properties {
                topic_alias: alias,
                message_expiry_interval: expiry,
                ..Properties::default()
            };
            Packet::Publish(Publish {
                dup: false,
                qos,
                retain,
                topic: if alias.is_some() && empty_payload {
                    String::new()
                } else {
                    topic
                },
                packet_id: (qos != QoS::AtMostOnce).then_some(id),
                payload: if empty_payload {
                    Bytes::new()
                } else {
                    Bytes::from_static(b"payload")
                },
                properties,
            })
        })
}

fn ack() -> impl Strategy<Value = Packet> {
    (0u8..4, 1u16..5, any::<bool>()).prop_map(|(kind, packet_id, error)| {
        let response = PubResponse {
            packet_id,
            reason: if error {
                ReasonCode::UNSPECIFIED_ERROR
            } else {
                ReasonCode::SUCCESS
            },
            properties: Properties::default(),
        };
        match kind {
            0 => Packet::PubAck(response),
            1 => Packet::PubRec(response),
            2 => Packet::PubRel(response),
            _ => Packet::PubComp(response),
        }
    })
}

fn subscribe() -> impl Strategy<Value = Packet> {
    (
        prop::collection::vec(
            (filter(), qos(), any::<bool>(), 0u8..3, any::<bool>()),
            1..3,
        ),
        prop::option::of(1u32..3),
    )
        .prop_map(|(subs, identifier)| {
            let mut properties = Properties::default();
            properties.subscription_identifiers.extend(identifier);
            Packet::Subscribe(Subscribe {
                packet_id: 1,
                subscriptions: subs
                    .into_iter()
                    .map(
                        |(filter, qos, no_local, retain_handling, rap)| Subscription {
                            filter,
                            options: SubscriptionOptions {
                                qos,
                                no_local,
                                retain_as_published: rap,
                                retain_handling,
                            },
                        },
                    )
                    .collect(),
                properties,
            })
        })
}

fn packet() -> impl Strategy<Value = Packet> {
    prop_oneof![
        3 => connect(),
        6 => publish(),
        4 => ack(),
        3 => subscribe(),
        1 => prop::collection::vec(filter(), 1..3).prop_map(|filters| {
            Packet::Unsubscribe(Unsubscribe {
                packet_id: 2,
                filters,
                properties: Properties::default(),
            })
        }),
        1 => Just(Packet::PingReq),
        1 => (any::<bool>(), prop::option::of(0u32..10)).prop_map(|(with_will, expiry)| {
            Packet::Disconnect(Disconnect {
                reason: if with_will {
                    ReasonCode::DISCONNECT_WITH_WILL_MESSAGE
                } else {
                    ReasonCode::NORMAL_DISCONNECTION
                },
                properties: Properties {
                    session_expiry_interval: expiry,
                    ..Properties::default()
                },
            })
        }),
        1 => Just(Packet::Auth(Auth {
            reason: ReasonCode::SUCCESS,
            properties: Properties::default(),
        })),
    ]
}

fn event() -> impl Strategy<Value = Event> {
    prop_oneof![
        12 => (1u64..4, packet()).prop_map(|(conn, packet)| Event::Packet(conn, Box::new(packet))),
        1 => (1u64..4).prop_map(Event::Lost),
        2 => (0u64..40).prop_map(Event::Advance),
    ]
}

/// Runs `events` on slots 1..=3; a slot whose connection was closed or lost continues as
/// a fresh connection id, as the server never reuses ids.
fn run(config: BrokerConfig, with_acl: bool, events: Vec<Event>) {
    let mut broker = Broker::new(config);
    if with_acl {
        let acl = Acl::parse(
            "topic readwrite a/#\ntopic deny a/b\nuser alice\ntopic readwrite #\npattern read x/%c\n",
        )
        .expect("valid ACL");
        broker.set_authorizer(Arc::new(acl));
    }
    let mut now = Instant::now();
    let mut generation = [0u64; 4];
    let id = |slot: u64, generation: &[u64; 4]| slot * 1_000 + generation[slot as usize];
    let mut live: HashSet<ConnectionId> = HashSet::new();
    let mut assigned_ids = 0;
    for event in events {
        match event {
            Event::Packet(slot, packet) => {
                let conn = id(slot, &generation);
                live.insert(conn);
                if matches!(&*packet, Packet::Connect(c) if c.client_id.is_empty()) {
                    // The broker assigns a fresh id: a session of its own, which may outlive
                    // the connection when it asked for a session expiry.
                    assigned_ids += 1;
                }
                broker.handle_packet(now, conn, *packet);
            }
            Event::Lost(slot) => {
                let conn = id(slot, &generation);
                broker.connection_lost(now, conn);
                live.remove(&conn);
                generation[slot as usize] += 1;
            }
            Event::Advance(secs) => {
                now += Duration::from_secs(secs);
                broker.handle_timeout(now);
            }
        }
        while let Some(output) = broker.poll_output() {
            match output {
                Output::Send { conn, .. } => {
                    assert!(live.contains(&conn), "output to unknown connection {conn}")
                }
                Output::Close { conn } => {
                    let slot = conn / 1_000;
                    if live.remove(&conn) && conn == id(slot, &generation) {
                        generation[slot as usize] += 1;
                    }
                }
                _ => {}
            }
        }
        let stats = broker.stats();
        assert!(stats.connected_clients <= 3);
        assert!(stats.sessions <= 4 + assigned_ids);
    }
    broker.shutdown(now);
    while broker.poll_output().is_some() {}
    assert_eq!(broker.stats().connected_clients, 0);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_packet_sequences_never_panic(
        events in prop::collection::vec(event(), 1..60),
        with_acl in any::<bool>(),
        small in any::<bool>(),
    ) {
        let config = if small {
            BrokerConfig {
                max_inflight: 1,
                receive_maximum: 2,
                max_queued_messages: 2,
                max_topic_levels: 2,
                topic_alias_maximum: 2,
                max_keepalive: 2,
                max_session_expiry: 5,
                max_publish_rate: 3,
                max_subscriptions_per_client: 2,
                ..BrokerConfig::default()
            }
        } else {
            BrokerConfig::default()
        };
        run(config, with_acl, events);
    }
}
