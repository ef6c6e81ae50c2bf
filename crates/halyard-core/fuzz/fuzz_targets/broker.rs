//! Drives the broker core with arbitrary byte streams on several connections, decoded as the
//! server decodes them, interleaved with lost connections and clock jumps. The broker must
//! never panic and must only address connections that exist.
//!
//! Input layout, repeated: one control byte `c`, then (for `c % 4 == 0`) a length byte `n`
//! and `n` bytes for connection slot `c >> 2 & 3`:
//! - 0: bytes arrive on the slot's connection (decoded; complete packets go to the broker,
//!   a decode error goes to `handle_decode_error` and the slot starts a new connection)
//! - 1: the slot's connection is lost
//! - 2: the clock moves forward by `c >> 4` seconds (keep-alive, will delay, expiry)
//! - 3: the clock moves forward by `(c >> 4) * 100` milliseconds
//!
//! The first byte chooses the configuration: small limits and/or an ACL.
//!
//! Run from crates/halyard-core: `cargo +nightly fuzz run broker`.

#![no_main]

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use halyard_codec::{decode, DecodeContext, Packet};
use halyard_core::{Acl, Broker, BrokerConfig, ConnectionId, Output};
use libfuzzer_sys::fuzz_target;

const SLOTS: usize = 4;

struct Slot {
    generation: u64,
    buf: BytesMut,
    ctx: DecodeContext,
}

impl Slot {
    fn new() -> Slot {
        Slot {
            generation: 0,
            buf: BytesMut::new(),
            ctx: DecodeContext {
                version: None,
                max_packet_size: 4096,
            },
        }
    }

    fn id(&self, index: usize) -> ConnectionId {
        index as u64 * 1_000_000 + self.generation
    }

    fn reset(&mut self) {
        self.generation += 1;
        self.buf.clear();
        self.ctx.version = None;
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&setup, mut input)) = data.split_first() else {
        return;
    };
    let config = if setup & 1 == 1 {
        BrokerConfig {
            max_inflight: 1,
            receive_maximum: 2,
            max_queued_messages: 2,
            max_topic_levels: 3,
            topic_alias_maximum: 2,
            max_keepalive: 3,
            max_session_expiry: 10,
            max_publish_rate: 5,
            max_subscriptions_per_client: 3,
            max_packet_size: 4096,
            ..BrokerConfig::default()
        }
    } else {
        BrokerConfig::default()
    };
    let mut broker = Broker::new(config);
    if setup & 2 == 2 {
        let acl = Acl::parse(
            "topic readwrite #\ntopic deny a/b\nuser u\ntopic read #\npattern write c/%c/#\n",
        )
        .expect("valid ACL");
        broker.set_authorizer(Arc::new(acl));
    }
    let mut now = Instant::now();
    let mut slots: Vec<Slot> = (0..SLOTS).map(|_| Slot::new()).collect();
    let mut live: HashSet<ConnectionId> = HashSet::new();

    while let Some((&control, rest)) = input.split_first() {
        input = rest;
        let index = usize::from(control >> 2) & (SLOTS - 1);
        match control % 4 {
            0 => {
                let Some((&len, rest)) = input.split_first() else {
                    break;
                };
                let len = usize::from(len).min(rest.len());
                let (bytes, rest) = rest.split_at(len);
                input = rest;
                let slot = &mut slots[index];
                let conn = slot.id(index);
                live.insert(conn);
                slot.buf.extend_from_slice(bytes);
                loop {
                    match decode(&mut slot.buf, &slot.ctx) {
                        Ok(Some(packet)) => {
                            if let Packet::Connect(connect) = &packet {
                                if slot.ctx.version.is_none() {
                                    slot.ctx.version = Some(connect.protocol);
                                }
                            }
                            broker.handle_packet(now, conn, packet);
                        }
                        Ok(None) => break,
                        Err(error) => {
                            broker.handle_decode_error(now, conn, &error);
                            break;
                        }
                    }
                }
            }
            1 => {
                let conn = slots[index].id(index);
                broker.connection_lost(now, conn);
                live.remove(&conn);
                slots[index].reset();
            }
            2 => {
                now += Duration::from_secs(u64::from(control >> 4));
                broker.handle_timeout(now);
            }
            _ => {
                now += Duration::from_millis(u64::from(control >> 4) * 100);
                broker.handle_timeout(now);
            }
        }
        while let Some(output) = broker.poll_output() {
            match output {
                Output::Send { conn, .. } => {
                    assert!(live.contains(&conn), "output to unknown connection {conn}");
                }
                Output::Close { conn } => {
                    if live.remove(&conn) {
                        let index = (conn / 1_000_000) as usize;
                        if slots[index].id(index) == conn {
                            slots[index].reset();
                        }
                    }
                }
                _ => {}
            }
        }
    }
    broker.shutdown(now);
    while broker.poll_output().is_some() {}
    assert_eq!(broker.stats().connected_clients, 0);
});
