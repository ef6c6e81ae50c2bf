//! The cluster port's wire format: u32-length-delimited frames with postcard bodies.
//!
//! A connection's first frame is a [`Hello`] naming its channel (raft RPCs or the publish
//! peer link); the acceptor answers with a [`Welcome`]. A frame that does not decode closes
//! its connection and is counted; nothing a peer sends can panic us.

use std::io;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use openraft::error::{InstallSnapshotError, RaftError};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio_util::codec::{Framed, LengthDelimitedCodec};

use crate::command::{Command, Response};
use crate::raft_types::TypeConfig;
use crate::transport::BoxStream;
use crate::types::NodeId;

/// Frames above this size are refused. Snapshots travel in 3 MiB chunks; an AppendEntries
/// holds at most 64 entries of at most 1,024 (default `max_batch`) small commands each.
const MAX_FRAME_BYTES: usize = 64 * 1024 * 1024;

/// A framed cluster connection.
pub(crate) type FramedStream = Framed<BoxStream, LengthDelimitedCodec>;

/// Wraps a peer stream in the cluster's framing.
pub(crate) fn framed(stream: BoxStream) -> FramedStream {
    let codec = LengthDelimitedCodec::builder()
        .max_frame_length(MAX_FRAME_BYTES)
        .new_codec();
    Framed::new(stream, codec)
}

/// The first frame of a connection: who is calling and for which channel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Hello {
    pub(crate) channel: Channel,
    pub(crate) from: NodeId,
    pub(crate) incarnation: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum Channel {
    Raft,
    Link,
}

/// The acceptor's answer to a hello.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum Welcome {
    Accepted {
        node: NodeId,
        incarnation: u64,
    },
    Rejected(String),
    /// The caller's id is a member under another incarnation: it lost its data directory
    /// and must not pass for its old self until an operator removed it.
    Fenced(String),
}

/// A request on the raft channel.
#[derive(Debug, Serialize, Deserialize)]
#[serde(bound = "")]
pub(crate) enum RaftRequest {
    AppendEntries(AppendEntriesRequest<TypeConfig>),
    Vote(VoteRequest<NodeId>),
    InstallSnapshot(InstallSnapshotRequest<TypeConfig>),
    /// A client write forwarded to the leader.
    Propose(Command),
    /// A node asks the leader to record its incarnation in the membership.
    Announce {
        node: NodeId,
        incarnation: u64,
    },
    /// Answer once `index` is applied here, or after `wait_ms` (capped by the server).
    WaitApplied {
        index: u64,
        wait_ms: u64,
    },
    /// A membership change (`halyard cluster join|leave`) forwarded to the leader.
    Membership(MembershipChange),
}

/// A run-time membership change, as asked of the leader.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum MembershipChange {
    /// Add `node` at `addr` as a learner, then promote it to voter if `voter`.
    Add {
        node: NodeId,
        addr: String,
        voter: bool,
    },
    /// Demote `node` if it is a voter, then remove it.
    Remove { node: NodeId },
}

/// The reply to a [`RaftRequest`] of the same kind.
#[derive(Debug, Serialize, Deserialize)]
#[serde(bound = "")]
pub(crate) enum RaftReply {
    AppendEntries(Result<AppendEntriesResponse<NodeId>, RaftError<NodeId>>),
    Vote(Result<VoteResponse<NodeId>, RaftError<NodeId>>),
    InstallSnapshot(
        Result<InstallSnapshotResponse<NodeId>, RaftError<NodeId, InstallSnapshotError>>,
    ),
    /// The log index of the entry and the command's response.
    Proposed(Result<(u64, Response), ProposeError>),
    Announced(Result<(), ProposeError>),
    /// The replier's applied index (below the asked index when its wait ran out).
    Applied(u64),
    Membership(Result<(), ProposeError>),
}

/// Why the leader did not take a forwarded proposal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum ProposeError {
    NotLeader { leader: Option<NodeId> },
    ShuttingDown,
    Refused(String),
}

/// Encodes and sends one frame.
pub(crate) async fn send<T: Serialize>(stream: &mut FramedStream, value: &T) -> io::Result<()> {
    let bytes = postcard::to_stdvec(value).map_err(io::Error::other)?;
    stream.send(Bytes::from(bytes)).await
}

/// Receives and decodes one frame; `Ok(None)` at a clean end of stream.
pub(crate) async fn receive<T: DeserializeOwned>(
    stream: &mut FramedStream,
) -> io::Result<Option<T>> {
    match stream.next().await {
        None => Ok(None),
        Some(frame) => {
            let frame = frame?;
            postcard::from_bytes(&frame)
                .map(Some)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
        }
    }
}

/// [`receive`] with a deadline; a silent peer is an error.
pub(crate) async fn receive_within<T: DeserializeOwned>(
    stream: &mut FramedStream,
    limit: Duration,
) -> io::Result<T> {
    match tokio::time::timeout(limit, receive(stream)).await {
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "peer did not answer",
        )),
        Ok(Ok(None)) => Err(io::Error::new(io::ErrorKind::UnexpectedEof, "peer closed")),
        Ok(result) => {
            result.and_then(|value| value.ok_or_else(|| io::ErrorKind::UnexpectedEof.into()))
        }
    }
}

/// Is this error a peer's undecodable bytes (as opposed to a broken connection)?
pub(crate) fn is_bad_frame(error: &io::Error) -> bool {
    error.kind() == io::ErrorKind::InvalidData
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garbage_does_not_decode_as_a_request() {
        let garbage = [0xff_u8, 0xff, 0xff, 0xff, 0x13, 0x37];
        assert!(postcard::from_bytes::<RaftRequest>(&garbage).is_err());
        assert!(postcard::from_bytes::<Hello>(&[]).is_err());
    }

    #[test]
    fn a_hello_round_trips() {
        let hello = Hello {
            channel: Channel::Link,
            from: 3,
            incarnation: 99,
        };
        let bytes = postcard::to_stdvec(&hello).expect("encode");
        assert_eq!(
            postcard::from_bytes::<Hello>(&bytes).expect("decode"),
            hello
        );
    }
}
