//! A client connection to one peer's raft channel, with reconnect backoff.
//!
//! Used by openraft (through [`crate::raft_network`]) and by the coordinator to forward
//! proposals to the leader. One request at a time; a failed call drops the connection and the
//! next call reconnects, but not before the backoff has passed.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::frame::{self, Channel, FramedStream, Hello, RaftReply, RaftRequest, Welcome};
use crate::metrics::{bump, Counters};
use crate::transport::Transport;
use crate::types::NodeId;

const FIRST_BACKOFF: Duration = Duration::from_millis(50);
const MAX_BACKOFF: Duration = Duration::from_secs(1);

/// Who we are, as told in hellos.
#[derive(Debug, Clone, Copy)]
pub(crate) struct LocalNode {
    pub(crate) id: NodeId,
    pub(crate) incarnation: u64,
}

pub(crate) struct PeerClient {
    local: LocalNode,
    target: NodeId,
    addr: String,
    /// The incarnation the membership records for the target (0 = not yet known).
    expected_incarnation: u64,
    connection: Option<FramedStream>,
    retry_at: Option<Instant>,
    backoff: Duration,
    counters: Arc<Counters>,
    transport: Arc<dyn Transport>,
}

impl PeerClient {
    pub(crate) fn new(
        local: LocalNode,
        target: NodeId,
        addr: String,
        expected_incarnation: u64,
        counters: Arc<Counters>,
        transport: Arc<dyn Transport>,
    ) -> Self {
        Self {
            local,
            target,
            addr,
            expected_incarnation,
            connection: None,
            retry_at: None,
            backoff: FIRST_BACKOFF,
            counters,
            transport,
        }
    }

    pub(crate) fn target(&self) -> NodeId {
        self.target
    }

    /// From the next connection on, refuse a target whose incarnation is not `incarnation`
    /// (0: any), as the membership now records it.
    pub(crate) fn expect_incarnation(&mut self, incarnation: u64) {
        if incarnation != self.expected_incarnation {
            self.expected_incarnation = incarnation;
            self.connection = None;
        }
    }

    /// Sends one request and waits for its reply, at most `limit` in all.
    pub(crate) async fn call(
        &mut self,
        request: &RaftRequest,
        limit: Duration,
    ) -> io::Result<RaftReply> {
        match tokio::time::timeout(limit, self.call_inner(request, limit)).await {
            Ok(Ok(reply)) => Ok(reply),
            Ok(Err(error)) => {
                self.connection = None;
                if frame::is_bad_frame(&error) {
                    bump(&self.counters.bad_frames);
                }
                Err(error)
            }
            Err(_) => {
                self.connection = None;
                Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "raft call timed out",
                ))
            }
        }
    }

    async fn call_inner(
        &mut self,
        request: &RaftRequest,
        limit: Duration,
    ) -> io::Result<RaftReply> {
        let connection = match self.connection.as_mut() {
            Some(connection) => connection,
            None => {
                let connection = self.connect(limit).await?;
                self.connection.insert(connection)
            }
        };
        frame::send(connection, request).await?;
        frame::receive_within(connection, limit).await
    }

    /// Connects and exchanges hellos, unless the backoff since the last failure is running.
    async fn connect(&mut self, limit: Duration) -> io::Result<FramedStream> {
        if let Some(retry_at) = self.retry_at {
            if Instant::now() < retry_at {
                return Err(io::Error::new(
                    io::ErrorKind::NotConnected,
                    "peer backing off",
                ));
            }
        }
        match self.handshake(limit).await {
            Ok(connection) => {
                self.retry_at = None;
                self.backoff = FIRST_BACKOFF;
                Ok(connection)
            }
            Err(error) => {
                self.retry_at = Some(Instant::now() + self.backoff);
                self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
                Err(error)
            }
        }
    }

    async fn handshake(&mut self, limit: Duration) -> io::Result<FramedStream> {
        let stream = self.transport.connect(&self.addr).await?;
        let mut connection = frame::framed(stream);
        let hello = Hello {
            channel: Channel::Raft,
            from: self.local.id,
            incarnation: self.local.incarnation,
        };
        frame::send(&mut connection, &hello).await?;
        match frame::receive_within::<Welcome>(&mut connection, limit).await? {
            Welcome::Accepted { node, incarnation } => {
                let wrong_node = node != self.target;
                let wrong_incarnation =
                    self.expected_incarnation != 0 && incarnation != self.expected_incarnation;
                if wrong_node || wrong_incarnation {
                    bump(&self.counters.rejected_peers);
                    return Err(io::Error::new(
                        io::ErrorKind::PermissionDenied,
                        format!("{} is node {node} incarnation {incarnation:016x}, not the member we know", self.addr),
                    ));
                }
                Ok(connection)
            }
            Welcome::Rejected(reason) => {
                Err(io::Error::new(io::ErrorKind::ConnectionRefused, reason))
            }
            Welcome::Fenced(reason) => {
                self.counters.note_fenced(&reason);
                Err(io::Error::new(io::ErrorKind::ConnectionRefused, reason))
            }
        }
    }
}
