//! The network under the cluster port: how a node reaches a peer's address and how it takes
//! incoming connections. Production uses TCP ([`TcpTransport`], [`TcpIncoming`]); a
//! simulation supplies in-memory streams, so that partitions, delays and the clock are its
//! own and a seed replays.

use std::fmt::Debug;
use std::future::Future;
use std::io;
use std::pin::Pin;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;

/// A byte stream to or from a peer.
pub trait PeerStream: AsyncRead + AsyncWrite + Send + Sync + Unpin {}

impl<T: AsyncRead + AsyncWrite + Send + Sync + Unpin> PeerStream for T {}

/// An owned peer stream.
pub type BoxStream = Box<dyn PeerStream>;

/// A boxed future, as the traits below return (they are used as trait objects).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Opens connections to peers' cluster addresses.
pub trait Transport: Debug + Send + Sync + 'static {
    /// Connects to `addr` (a `peers` entry).
    fn connect(&self, addr: &str) -> BoxFuture<'static, io::Result<BoxStream>>;
}

/// Incoming connections to this node's cluster port.
pub trait Incoming: Debug + Send + 'static {
    /// The next connection.
    fn accept(&mut self) -> BoxFuture<'_, io::Result<BoxStream>>;
}

/// Connects over TCP with `TCP_NODELAY`, resolving a DNS name on every attempt (see
/// [`crate::dial`]).
#[derive(Debug, Default, Clone, Copy)]
pub struct TcpTransport;

impl Transport for TcpTransport {
    fn connect(&self, addr: &str) -> BoxFuture<'static, io::Result<BoxStream>> {
        let addr = addr.to_owned();
        Box::pin(async move {
            let stream = crate::dial::connect(&addr).await?;
            let _ = stream.set_nodelay(true);
            Ok(Box::new(stream) as BoxStream)
        })
    }
}

/// Accepts on a TCP listener.
#[derive(Debug)]
pub struct TcpIncoming(pub TcpListener);

impl Incoming for TcpIncoming {
    fn accept(&mut self) -> BoxFuture<'_, io::Result<BoxStream>> {
        Box::pin(async move {
            let (stream, _) = self.0.accept().await?;
            let _ = stream.set_nodelay(true);
            Ok(Box::new(stream) as BoxStream)
        })
    }
}
