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
        /// Bytes taken from the [`InboundBudget`](crate::inbound_budget::InboundBudget) for
        /// this event, given back when the broker task has handled it (0: none taken).
        weight: u32,
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

/// Whether a connection's event of `packets` goes in the acknowledgement lane, which the
/// broker task takes before the main one: a subscriber's PUBACKs waited behind every
/// publisher's queued PUBLISH events, so under a deep backlog intake starved delivery
/// (737k publishes/s acknowledged, 64k/s delivered). Only acknowledgements and PINGREQ go
/// there (the core lets them pass held publishes too: they never reorder publishes), and only
/// when the connection has no event outstanding (`outstanding`), so that one connection's
/// events are still handled in the order it sent them.
pub(crate) fn takes_ack_lane(packets: &[Packet], outstanding: bool) -> bool {
    !outstanding
        && packets.iter().all(|packet| {
            matches!(
                packet,
                Packet::PubAck(_)
                    | Packet::PubRec(_)
                    | Packet::PubRel(_)
                    | Packet::PubComp(_)
                    | Packet::PingReq
            )
        })
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

#[cfg(test)]
mod tests {
    use super::*;
    use halyard_codec::{PubResponse, Publish};

    #[test]
    fn only_acknowledgements_and_pings_with_nothing_outstanding_take_the_ack_lane() {
        let ack = Packet::PubAck(PubResponse::default());
        assert!(takes_ack_lane(&[ack.clone(), Packet::PingReq], false));
        assert!(!takes_ack_lane(std::slice::from_ref(&ack), true));
        assert!(!takes_ack_lane(
            &[ack, Packet::Publish(Publish::default())],
            false
        ));
        assert!(!takes_ack_lane(
            &[Packet::Disconnect(Default::default())],
            false
        ));
    }
}
