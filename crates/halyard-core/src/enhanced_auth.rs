//! The core's part in MQTT 5 enhanced authentication and in ending a connection whose
//! credentials ran out. The exchanges themselves (SCRAM, token checks) live in the server,
//! which completes them before it forwards a CONNECT and answers re-authentication itself;
//! the core only writes the server's AUTH packets in order with everything else it sends
//! and closes the connection when the server says so.

use halyard_codec::{Auth, Packet, ReasonCode};

use crate::broker::{Broker, ConnectionId};
use std::time::Instant;

impl Broker {
    /// Sends `auth` (a step of a re-authentication the server runs) to `conn`; ignored if
    /// the connection is gone. Returns whether it was sent.
    pub fn send_auth(&mut self, conn: ConnectionId, auth: Auth) -> bool {
        if !self.conns.contains_key(&conn) {
            return false;
        }
        self.out.send(conn, Packet::Auth(auth));
        true
    }

    /// Closes `conn` as the server decided (a failed re-authentication, an expired token):
    /// MQTT 5 clients get DISCONNECT with `reason` and `why` as its reason string, and the
    /// will is published as for any abnormal close. Returns whether the connection was
    /// still open.
    pub fn disconnect_connection(
        &mut self,
        now: Instant,
        conn: ConnectionId,
        reason: ReasonCode,
        why: &str,
    ) -> bool {
        let Some(&key) = self.conns.get(&conn) else {
            return false;
        };
        self.close_with(now, key, reason, why);
        true
    }
}
