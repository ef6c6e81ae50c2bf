//! One info line per client connect and per disconnect, as `mosquitto -v` prints them
//! (`ServerConfig::log_connections`).
//!
//! Kept by the broker task, which sees every CONNECT, CONNACK, DISCONNECT and close in order.
//! Costs one map entry per connection while on (the client id and address, about 100 bytes)
//! and nothing while off.

use std::collections::HashMap;
use std::net::SocketAddr;

use halyard_codec::{Connect, Packet, ReasonCode};
use halyard_core::ConnectionId;
use tracing::info;

/// What is known about one connection, for its lines.
#[derive(Debug, Default)]
struct Entry {
    /// The remote address, when the transport knows it.
    peer: Option<SocketAddr>,
    /// The client id, once the CONNECT was accepted (CONNACK success).
    client_id: Option<Box<str>>,
    /// The CONNECT waiting for its CONNACK.
    connecting: Option<Box<Connecting>>,
    /// Why the connection is closing, once a DISCONNECT passed either way.
    reason: Option<String>,
}

/// The parts of a CONNECT the connect line shows.
#[derive(Debug)]
struct Connecting {
    client_id: String,
    protocol: &'static str,
    clean_start: bool,
    keep_alive: u16,
    username: Option<String>,
}

/// The connections' log lines; empty and inert when turned off.
#[derive(Debug, Default)]
pub(crate) struct ConnectionLog {
    enabled: bool,
    entries: HashMap<ConnectionId, Entry>,
}

impl ConnectionLog {
    /// A log that writes lines when `enabled`.
    pub(crate) fn new(enabled: bool) -> ConnectionLog {
        ConnectionLog {
            enabled,
            entries: HashMap::new(),
        }
    }

    /// A socket was accepted.
    pub(crate) fn opened(&mut self, conn: ConnectionId, peer: Option<SocketAddr>) {
        if self.enabled {
            let entry = Entry {
                peer,
                ..Entry::default()
            };
            self.entries.insert(conn, entry);
        }
    }

    /// A packet from the client, before the core sees it.
    pub(crate) fn received(&mut self, conn: ConnectionId, packet: &Packet) {
        if !self.enabled {
            return;
        }
        let Some(entry) = self.entries.get_mut(&conn) else {
            return;
        };
        match packet {
            Packet::Connect(connect) => entry.connecting = Some(Box::new(connecting(connect))),
            Packet::Disconnect(disconnect) => {
                let reason = disconnect_reason(disconnect.reason);
                entry.reason = Some(format!("client sent DISCONNECT {reason}"));
            }
            _ => {}
        }
    }

    /// A packet the core sends to the client.
    pub(crate) fn sent(&mut self, conn: ConnectionId, packet: &Packet) {
        if !self.enabled {
            return;
        }
        let Some(entry) = self.entries.get_mut(&conn) else {
            return;
        };
        match packet {
            Packet::ConnAck(ack) => {
                let Some(connecting) = entry.connecting.take() else {
                    return;
                };
                let remote = display_peer(entry.peer);
                let v5 = connecting.protocol == "5.0";
                if ack.code == ReasonCode::SUCCESS {
                    info!(
                        client_id = %connecting.client_id,
                        %remote,
                        protocol = connecting.protocol,
                        clean_start = connecting.clean_start,
                        keep_alive = connecting.keep_alive,
                        username = connecting.username.as_deref(),
                        "client connected"
                    );
                    entry.client_id = Some(connecting.client_id.into_boxed_str());
                } else {
                    let code = if v5 {
                        ack.code.to_string()
                    } else {
                        format!("0x{:02X} {}", ack.code.0, ack.code.v3_connack_name())
                    };
                    info!(
                        client_id = %connecting.client_id,
                        %remote,
                        protocol = connecting.protocol,
                        %code,
                        "client refused"
                    );
                }
            }
            Packet::Disconnect(disconnect) => {
                let reason = disconnect_reason(disconnect.reason);
                entry.reason = Some(format!("broker sent DISCONNECT {reason}"));
            }
            _ => {}
        }
    }

    /// The core closed the connection.
    pub(crate) fn closed(&mut self, conn: ConnectionId) {
        self.end(conn, "closed by the broker");
    }

    /// The socket closed or failed.
    pub(crate) fn lost(&mut self, conn: ConnectionId) {
        self.end(conn, "connection lost (closed without DISCONNECT)");
    }

    fn end(&mut self, conn: ConnectionId, default_reason: &str) {
        if !self.enabled {
            return;
        }
        let Some(entry) = self.entries.remove(&conn) else {
            return;
        };
        if let Some(client_id) = entry.client_id {
            let reason = entry.reason.as_deref().unwrap_or(default_reason);
            let remote = display_peer(entry.peer);
            info!(client_id = %client_id, %remote, reason, "client disconnected");
        }
    }
}

fn connecting(connect: &Connect) -> Connecting {
    Connecting {
        client_id: connect.client_id.clone(),
        protocol: match connect.protocol {
            halyard_codec::ProtocolVersion::V3_1 => "3.1",
            halyard_codec::ProtocolVersion::V3_1_1 => "3.1.1",
            halyard_codec::ProtocolVersion::V5 => "5.0",
        },
        clean_start: connect.clean_start,
        keep_alive: connect.keep_alive,
        username: connect.username.clone(),
    }
}

/// A DISCONNECT reason by its name in that packet (0x00 is "Normal disconnection" there).
fn disconnect_reason(code: ReasonCode) -> String {
    if code == ReasonCode::NORMAL_DISCONNECTION {
        "0x00 Normal disconnection".to_owned()
    } else {
        code.to_string()
    }
}

fn display_peer(peer: Option<SocketAddr>) -> String {
    peer.map_or_else(|| "unknown".to_owned(), |peer| peer.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_are_kept_only_while_enabled_and_forgotten_at_the_end() {
        let mut off = ConnectionLog::new(false);
        off.opened(1, None);
        assert!(off.entries.is_empty());

        let mut log = ConnectionLog::new(true);
        log.opened(1, Some(SocketAddr::from(([127, 0, 0, 1], 5000))));
        let connect = Connect {
            protocol: halyard_codec::ProtocolVersion::V5,
            clean_start: true,
            keep_alive: 30,
            client_id: "c".into(),
            will: None,
            username: None,
            password: None,
            properties: halyard_codec::Properties::default(),
        };
        log.received(1, &Packet::Connect(Box::new(connect)));
        log.sent(1, &Packet::ConnAck(halyard_codec::ConnAck::default()));
        assert_eq!(log.entries[&1].client_id.as_deref(), Some("c"));
        log.closed(1);
        assert!(log.entries.is_empty());
    }
}
