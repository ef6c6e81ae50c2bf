//! What connection tasks and the admin API tell the broker task.

use std::time::Instant;

use halyard_codec::{DecodeError, Packet};
use halyard_core::{Broker, ConnectionId};

use crate::cluster::ClusterEvent;
use crate::link::Link;

/// What connection tasks tell the broker task.
#[derive(Debug)]
pub(crate) enum Event {
    /// A socket was accepted; always the first event of a connection.
    Open {
        /// The new connection.
        conn: ConnectionId,
        /// Where its outbound packets go.
        link: Link,
        /// The remote address, for the connection log.
        peer: Option<std::net::SocketAddr>,
    },
    /// Every packet decoded from one read, in order.
    Packets {
        /// Sender.
        conn: ConnectionId,
        /// The packets.
        packets: Vec<Packet>,
    },
    /// The decoder rejected the connection's bytes; the connection reads no more.
    DecodeError {
        /// Sender.
        conn: ConnectionId,
        /// What was wrong.
        error: DecodeError,
    },
    /// The socket closed, failed or timed out before CONNECT.
    Lost {
        /// The connection that is gone.
        conn: ConnectionId,
    },
    /// An operator request from the HTTP admin API, run on the broker between packets.
    Admin(AdminCall),
    /// The cluster decided something the core waits for, or peers sent something.
    Cluster(ClusterEvent),
    /// The connection's writer wrote everything queued up to a
    /// [`WrittenNotice`](crate::link::WrittenNotice).
    Written {
        /// The connection.
        conn: ConnectionId,
    },
}

/// A query or action on the broker from the admin API; the closure sends its own reply
/// (over a oneshot channel it captured), so each endpoint defines its answer's type.
pub(crate) struct AdminCall(pub(crate) AdminFn);

/// The work of an [`AdminCall`]: runs once on the broker task with the current time.
pub(crate) type AdminFn = Box<dyn FnOnce(&mut Broker, Instant) + Send>;

impl std::fmt::Debug for AdminCall {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AdminCall")
    }
}

impl From<ClusterEvent> for Event {
    fn from(event: ClusterEvent) -> Self {
        Event::Cluster(event)
    }
}
