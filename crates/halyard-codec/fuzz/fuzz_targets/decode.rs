//! Feeds arbitrary bytes to the decoder in every context. Whatever decodes must re-encode
//! (to exactly `encoded_len` bytes) and decode back to the same packet.
//!
//! Run from crates/halyard-codec: `cargo +nightly fuzz run decode`.

#![no_main]

use bytes::BytesMut;
use halyard_codec::{decode, encode, encoded_len, DecodeContext, Packet, ProtocolVersion};
use libfuzzer_sys::fuzz_target;

const VERSIONS: [Option<ProtocolVersion>; 4] = [
    None,
    Some(ProtocolVersion::V3_1),
    Some(ProtocolVersion::V3_1_1),
    Some(ProtocolVersion::V5),
];

fuzz_target!(|data: &[u8]| {
    for version in VERSIONS {
        for max_packet_size in [64, u32::MAX] {
            let mut ctx = DecodeContext {
                version,
                max_packet_size,
            };
            let mut buf = BytesMut::from(data);
            // Decode packet after packet, as a connection would, until the input runs out.
            while let Ok(Some(packet)) = decode(&mut buf, &ctx) {
                let level = match (&packet, ctx.version) {
                    (Packet::Connect(connect), _) => connect.protocol,
                    (_, Some(level)) => level,
                    (_, None) => panic!("decoded {packet:?} before CONNECT"),
                };
                let mut encoded = BytesMut::new();
                encode(&packet, level, &mut encoded).expect("a decoded packet re-encodes");
                assert_eq!(encoded.len(), encoded_len(&packet, level));
                let again_ctx = DecodeContext {
                    version: if matches!(packet, Packet::Connect(_)) {
                        None
                    } else {
                        Some(level)
                    },
                    max_packet_size: u32::MAX,
                };
                let again = decode(&mut encoded, &again_ctx)
                    .expect("re-encoded packet decodes")
                    .expect("re-encoded packet is complete");
                assert_eq!(again, packet);
                assert!(encoded.is_empty());
                if let Packet::Connect(connect) = &packet {
                    ctx.version = Some(connect.protocol);
                }
            }
        }
    }
});
