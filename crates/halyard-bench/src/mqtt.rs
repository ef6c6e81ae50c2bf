//! Thin MQTT client plumbing on top of `halyard_codec`: connect, subscribe, and a pre-encoded
//! PUBLISH template so that a publisher spends a few byte copies per message, not an encode.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use bytes::{Bytes, BytesMut};
use halyard_codec::{
    decode, encode, Connect, DecodeContext, Disconnect, Packet, Properties, ProtocolVersion,
    PubResponse, Publish, QoS, Subscribe, Subscription, SubscriptionOptions,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::payload::{PayloadHeader, HEADER_LEN};

/// Largest packet the benchmark client accepts from the broker.
pub const MAX_PACKET_SIZE: u32 = 16 * 1024 * 1024;

/// Read buffer space reserved before every read.
pub const READ_RESERVE: usize = 64 * 1024;

/// The decode context of a client that spoke `version` in its CONNECT.
pub fn client_context(version: ProtocolVersion) -> DecodeContext {
    DecodeContext {
        version: Some(version),
        max_packet_size: MAX_PACKET_SIZE,
    }
}

/// An open, accepted MQTT connection with whatever bytes were read past the CONNACK.
#[derive(Debug)]
pub struct Conn {
    /// The socket (Nagle disabled).
    pub stream: TcpStream,
    /// Bytes read but not yet decoded.
    pub inbuf: BytesMut,
    /// Protocol level of the connection.
    pub version: ProtocolVersion,
    /// MQTT 5 Receive Maximum announced by the server in CONNACK, if any.
    pub server_receive_maximum: Option<u16>,
}

/// Encodes `packet` into `out`, turning a codec error into an `anyhow` error.
pub fn encode_into(packet: &Packet, version: ProtocolVersion, out: &mut BytesMut) -> Result<()> {
    encode(packet, version, out).map_err(|e| anyhow!("encode: {e}"))
}

/// Encodes an ack (PUBACK, PUBREC, PUBREL or PUBCOMP) for `packet_id` into `out`.
pub fn encode_ack(
    make: fn(PubResponse) -> Packet,
    packet_id: u16,
    version: ProtocolVersion,
    out: &mut BytesMut,
) -> Result<()> {
    encode_into(
        &make(PubResponse {
            packet_id,
            ..PubResponse::default()
        }),
        version,
        out,
    )
}

impl Conn {
    /// Opens TCP, sends CONNECT (clean start) and waits for a successful CONNACK.
    pub async fn connect(
        addr: SocketAddr,
        version: ProtocolVersion,
        client_id: &str,
        keep_alive: u16,
        timeout: Duration,
    ) -> Result<Conn> {
        tokio::time::timeout(
            timeout,
            Conn::connect_inner(addr, version, client_id, keep_alive, true),
        )
        .await
        .map_err(|_| anyhow!("no CONNACK within {timeout:?}"))?
        .map(|(conn, _)| conn)
    }

    /// Like [`Conn::connect`] with keep-alive off, but with clean start 0 when `clean` is
    /// false, resuming a persistent session; also returns CONNACK's session-present flag.
    pub async fn open_session(
        addr: SocketAddr,
        version: ProtocolVersion,
        client_id: &str,
        clean: bool,
        timeout: Duration,
    ) -> Result<(Conn, bool)> {
        tokio::time::timeout(
            timeout,
            Conn::connect_inner(addr, version, client_id, 0, clean),
        )
        .await
        .map_err(|_| anyhow!("no CONNACK within {timeout:?}"))?
    }

    async fn connect_inner(
        addr: SocketAddr,
        version: ProtocolVersion,
        client_id: &str,
        keep_alive: u16,
        clean: bool,
    ) -> Result<(Conn, bool)> {
        let mut conn = Conn::open_tcp(addr, version).await?;
        let session_present = conn.handshake(client_id, keep_alive, clean).await?;
        Ok((conn, session_present))
    }

    /// Opens TCP only (Nagle disabled); [`Conn::handshake`] then sends CONNECT. Kept apart
    /// so that a measurement can start at the CONNECT, not at the TCP handshake.
    pub async fn open_tcp(addr: SocketAddr, version: ProtocolVersion) -> Result<Conn> {
        let stream = TcpStream::connect(addr)
            .await
            .with_context(|| format!("TCP connect to {addr}"))?;
        stream.set_nodelay(true)?;
        Ok(Conn {
            stream,
            inbuf: BytesMut::with_capacity(256),
            version,
            server_receive_maximum: None,
        })
    }

    /// Sends CONNECT and waits for a successful CONNACK; returns its session-present flag.
    /// Without `clean`, an MQTT 5 CONNECT asks for a session that never expires, so that it
    /// is as persistent as an MQTT 3.x `clean session = 0` one.
    pub async fn handshake(
        &mut self,
        client_id: &str,
        keep_alive: u16,
        clean: bool,
    ) -> Result<bool> {
        let expiry = (!clean && self.version == ProtocolVersion::V5).then_some(u32::MAX);
        self.handshake_with_expiry(client_id, keep_alive, clean, expiry)
            .await
    }

    /// Like [`Conn::handshake`], with the MQTT 5 Session Expiry Interval given (`None`:
    /// absent, which means 0); ignored for MQTT 3.x, which has no such property.
    pub async fn handshake_with_expiry(
        &mut self,
        client_id: &str,
        keep_alive: u16,
        clean: bool,
        session_expiry: Option<u32>,
    ) -> Result<bool> {
        let version = self.version;
        let mut properties = Properties::default();
        if version == ProtocolVersion::V5 {
            properties.session_expiry_interval = session_expiry;
        }
        let connect = Packet::Connect(Box::new(Connect {
            protocol: version,
            clean_start: clean,
            keep_alive,
            client_id: client_id.to_owned(),
            will: None,
            username: None,
            password: None,
            properties,
        }));
        let mut out = BytesMut::with_capacity(64);
        encode_into(&connect, version, &mut out)?;
        self.stream.write_all(&out).await?;
        match self.read_packet().await? {
            Packet::ConnAck(ack) => {
                if ack.code.0 != 0 {
                    bail!("CONNACK refused with code {:#04x}", ack.code.0);
                }
                self.server_receive_maximum = ack.properties.receive_maximum;
                Ok(ack.session_present)
            }
            other => bail!("expected CONNACK, got {other:?}"),
        }
    }

    /// Reads until one whole packet is decoded (used during set-up only).
    pub async fn read_packet(&mut self) -> Result<Packet> {
        let ctx = client_context(self.version);
        loop {
            if let Some(packet) = decode(&mut self.inbuf, &ctx)? {
                return Ok(packet);
            }
            self.inbuf.reserve(4096);
            if self.stream.read_buf(&mut self.inbuf).await? == 0 {
                bail!("connection closed by the broker");
            }
        }
    }

    /// Subscribes to `filter` at `qos` and waits for a SUBACK that grants it.
    pub async fn subscribe(&mut self, filter: &str, qos: QoS, timeout: Duration) -> Result<()> {
        let subscribe = Packet::Subscribe(Subscribe {
            packet_id: 1,
            subscriptions: vec![Subscription {
                filter: filter.to_owned(),
                options: SubscriptionOptions {
                    qos,
                    ..SubscriptionOptions::default()
                },
            }],
            properties: Properties::default(),
        });
        let mut out = BytesMut::with_capacity(64);
        encode_into(&subscribe, self.version, &mut out)?;
        self.stream.write_all(&out).await?;
        let wait = async {
            loop {
                match self.read_packet().await? {
                    Packet::SubAck(ack) if ack.packet_id == 1 => {
                        return match ack.reasons.first() {
                            Some(code) if code.0 < 0x80 => Ok(()),
                            Some(code) => Err(anyhow!("SUBACK refused {filter}: {:#04x}", code.0)),
                            None => Err(anyhow!("empty SUBACK")),
                        };
                    }
                    // Nothing is published before every subscriber is ready, but ignore
                    // anything else (e.g. retained messages) rather than fail.
                    _ => continue,
                }
            }
        };
        tokio::time::timeout(timeout, wait)
            .await
            .map_err(|_| anyhow!("no SUBACK within {timeout:?}"))?
    }

    /// Sends DISCONNECT (best effort, bounded by one second) and closes the socket.
    pub async fn disconnect(mut self) {
        let mut out = BytesMut::with_capacity(8);
        if encode_into(
            &Packet::Disconnect(Disconnect::default()),
            self.version,
            &mut out,
        )
        .is_ok()
        {
            let _ = tokio::time::timeout(Duration::from_secs(1), async {
                let _ = self.stream.write_all(&out).await;
                let _ = self.stream.shutdown().await;
            })
            .await;
        }
    }
}

/// A PUBLISH encoded once by the codec; each message copies it and patches the packet id and
/// the payload header in place.
#[derive(Debug, Clone)]
pub struct PublishTemplate {
    bytes: Vec<u8>,
    packet_id_offset: Option<usize>,
    payload_offset: usize,
}

impl PublishTemplate {
    /// Encodes a PUBLISH of `payload_len` bytes (at least [`HEADER_LEN`]) to `topic`.
    pub fn new(
        topic: &str,
        qos: QoS,
        payload_len: usize,
        version: ProtocolVersion,
    ) -> Result<PublishTemplate> {
        if payload_len < HEADER_LEN {
            bail!("payload must be at least {HEADER_LEN} bytes (it carries the benchmark header)");
        }
        let publish = Publish {
            qos,
            topic: topic.to_owned(),
            packet_id: (qos != QoS::AtMostOnce).then_some(1),
            payload: Bytes::from(vec![0u8; payload_len]),
            ..Publish::default()
        };
        let mut buf = BytesMut::new();
        encode_into(&Packet::Publish(publish), version, &mut buf)?;
        // Fixed header: one type byte, then a variable byte integer whose last byte has the
        // continuation bit clear.
        let vbi_len = buf[1..]
            .iter()
            .position(|b| b & 0x80 == 0)
            .ok_or_else(|| anyhow!("bad remaining length in encoded PUBLISH"))?
            + 1;
        let topic_end = 1 + vbi_len + 2 + topic.len();
        let payload_offset = buf.len() - payload_len;
        Ok(PublishTemplate {
            bytes: buf.to_vec(),
            packet_id_offset: (qos != QoS::AtMostOnce).then_some(topic_end),
            payload_offset,
        })
    }

    /// Length of one encoded message.
    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    /// Always false: a PUBLISH is never empty (kept for clippy's `len_without_is_empty`).
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// Appends one message with `packet_id` (ignored at QoS 0) and `header` to `out`.
    pub fn append(&self, out: &mut BytesMut, packet_id: u16, header: &PayloadHeader) {
        self.append_flagged(out, packet_id, header, false);
    }

    /// Like [`append`](Self::append) but with the DUP flag set, for a retransmission. Only
    /// meaningful at QoS 1 and 2 (DUP is forbidden at QoS 0, so it is not set there).
    pub fn append_dup(&self, out: &mut BytesMut, packet_id: u16, header: &PayloadHeader) {
        self.append_flagged(out, packet_id, header, self.packet_id_offset.is_some());
    }

    fn append_flagged(
        &self,
        out: &mut BytesMut,
        packet_id: u16,
        header: &PayloadHeader,
        dup: bool,
    ) {
        let start = out.len();
        out.extend_from_slice(&self.bytes);
        let msg = &mut out[start..];
        if let Some(offset) = self.packet_id_offset {
            msg[offset..offset + 2].copy_from_slice(&packet_id.to_be_bytes());
        }
        header.write(&mut msg[self.payload_offset..]);
        if dup {
            msg[0] |= 0x08;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(qos: QoS, version: ProtocolVersion, topic: &str, payload_len: usize) {
        let template = PublishTemplate::new(topic, qos, payload_len, version).expect("template");
        let mut out = BytesMut::new();
        let header = PayloadHeader {
            publisher: 3,
            seq: 99,
            sent_ns: 12345,
        };
        template.append(&mut out, 0xBEEF, &header);
        template.append_dup(&mut out, 7, &PayloadHeader { seq: 100, ..header });
        let ctx = client_context(version);
        for (expected_id, expected_seq) in [(0xBEEF, 99), (7, 100)] {
            let Some(Packet::Publish(p)) = decode(&mut out, &ctx).expect("decodes") else {
                panic!("not a PUBLISH");
            };
            assert_eq!(p.topic, topic);
            assert_eq!(p.qos, qos);
            assert_eq!(p.payload.len(), payload_len);
            let expected_id = (qos != QoS::AtMostOnce).then_some(expected_id);
            assert_eq!(p.packet_id, expected_id);
            // The second one is a retransmission: DUP only where QoS allows it.
            assert_eq!(p.dup, expected_seq == 100 && qos != QoS::AtMostOnce);
            let h = PayloadHeader::parse(&p.payload).expect("header");
            assert_eq!(h.seq, expected_seq);
            assert_eq!(h.publisher, 3);
        }
        assert!(out.is_empty());
    }

    #[test]
    fn template_patches_packet_id_and_header() {
        for version in [ProtocolVersion::V3_1_1, ProtocolVersion::V5] {
            for qos in [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce] {
                round_trip(qos, version, "bench/x/p/1", 64);
                // A remaining length over 127 takes two bytes.
                round_trip(qos, version, "bench/a-longer-topic/p/12", 4000);
            }
        }
    }

    #[test]
    fn template_rejects_payloads_without_room_for_the_header() {
        assert!(PublishTemplate::new("t", QoS::AtMostOnce, 8, ProtocolVersion::V5).is_err());
    }
}
