//! The socket side of a connection task: reading into its buffer, writing the broker's
//! batches, the plain-TCP socket shared with the dispatcher, and the linger before close.

use std::future::Future;
use std::io::{self, Read};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::BytesMut;
use halyard_codec::DecodeContext;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, Interest, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::timeout;

use crate::event::Event;
use crate::link::{BatchReceiver, Shared};

/// Bytes reserved in the read buffer before a read while traffic flows (the previous read
/// filled its room); the buffer grows beyond it only while a large packet is arriving.
pub(crate) const READ_CHUNK: usize = 4096;

/// The read size of a quiet connection. It waits for input holding no buffer (memory per idle
/// connection is a budget: ~1 KB) and reads into this much stack, then keeps only what came:
/// one system call for what a quiet client sends at once. A read that fills it is followed
/// by reads of [`READ_CHUNK`] straight into the connection's buffer.
pub(crate) const IDLE_READ: usize = 4096;

/// A buffer that grew beyond this (for one large packet or a burst) is released once empty,
/// instead of being kept for the life of the connection.
pub(crate) const MAX_RETAINED_BUFFER: usize = 64 * 1024;

/// After the broker closes a connection we read and discard what the peer still sends, for at
/// most this long: closing a socket with unread input makes the kernel send RST, which can
/// destroy our last packets (CONNACK with an error code, DISCONNECT) before the peer reads them.
pub(crate) const LINGER: Duration = Duration::from_secs(1);

/// Why the read side stopped.
#[derive(Debug)]
pub(crate) enum ReadEnd {
    /// Orderly close by the peer.
    Eof,
    /// No complete CONNECT within the connect timeout.
    ConnectTimeout,
    /// The socket failed.
    Failed(io::Error),
    /// Asked to park while waiting for input between packets (only with parking).
    Idle(DecodeContext),
}

/// A plain TCP socket as the connection task reads and writes it; the dispatcher writes to
/// the same socket directly (see `Link::write_directly`), never at the same time.
pub(crate) struct TcpIo<'a>(pub(crate) &'a TcpStream);

impl AsyncRead for TcpIo<'_> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let socket = self.0;
        loop {
            std::task::ready!(socket.poll_read_ready(cx))?;
            let room = buf.initialize_unfilled();
            let mut drained = 0;
            // A read shorter than the room took all the kernel had: the readiness is cleared
            // now (by answering `WouldBlock` to `try_io`), which saves the read that would only
            // return `WouldBlock`. Input arriving after it is a new edge, so it wakes us again.
            let result = socket.try_io(Interest::READABLE, || {
                match (&*socket2::SockRef::from(socket)).read(room) {
                    Ok(read) if read > 0 && read < room.len() => {
                        drained = read;
                        Err(io::ErrorKind::WouldBlock.into())
                    }
                    result => result,
                }
            });
            match result {
                Ok(read) => {
                    buf.advance(read);
                    return Poll::Ready(Ok(()));
                }
                Err(error) if error.kind() == io::ErrorKind::WouldBlock && drained > 0 => {
                    buf.advance(drained);
                    return Poll::Ready(Ok(()));
                }
                // Readiness was stale; `try_io` cleared it, so the next poll waits.
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => continue,
                Err(error) => return Poll::Ready(Err(error)),
            }
        }
    }
}

impl AsyncWrite for TcpIo<'_> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let socket = self.0;
        loop {
            std::task::ready!(socket.poll_write_ready(cx))?;
            match socket.try_write(buf) {
                // Readiness was stale; `try_write` cleared it, so the next poll waits.
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => continue,
                result => return Poll::Ready(result),
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // The dispatcher may still hold the socket, so dropping ours would not send our FIN now.
        Poll::Ready(socket2::SockRef::from(self.0).shutdown(std::net::Shutdown::Write))
    }
}

/// Reads into `buf`, reserving `room` first, then sets `room` for the next read.
pub(crate) async fn read_some<R: AsyncRead + Unpin>(
    reader: &mut R,
    buf: &mut BytesMut,
    room: &mut usize,
) -> Result<(), ReadEnd> {
    loop {
        let read = if *room == IDLE_READ {
            std::future::poll_fn(|cx| {
                // On the stack only for this poll: an idle connection's task holds no buffer.
                let mut scratch = [std::mem::MaybeUninit::<u8>::uninit(); IDLE_READ];
                let mut read = ReadBuf::uninit(&mut scratch);
                std::task::ready!(Pin::new(&mut *reader).poll_read(cx, &mut read))?;
                buf.extend_from_slice(read.filled());
                Poll::Ready(Ok((read.filled().len(), IDLE_READ)))
            })
            .await
        } else {
            buf.reserve(*room);
            let spare = buf.capacity() - buf.len();
            reader.read_buf(buf).await.map(|read| (read, spare))
        };
        return match read {
            Ok((0, _)) => Err(ReadEnd::Eof),
            Ok((read, spare)) => {
                *room = if read >= spare { READ_CHUNK } else { IDLE_READ };
                Ok(())
            }
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => continue,
            Err(error) => Err(ReadEnd::Failed(error)),
        };
    }
}

/// Sends `event` to the broker task; the future fails if the broker task is gone. The
/// channel almost always has room, so the send future (over 200 bytes) is only built, on the
/// heap, when it is full: inline, it would be part of every connection task for the
/// connection's whole life.
pub(crate) fn forward(events: &mpsc::Sender<Event>, event: Event) -> Forward<'_> {
    match events.try_send(event) {
        Ok(()) => Forward::Sent,
        Err(mpsc::error::TrySendError::Full(event)) => {
            Forward::Waiting(Box::pin(events.send(event)))
        }
        Err(mpsc::error::TrySendError::Closed(_)) => Forward::Closed,
    }
}

/// The future of [`forward`].
pub(crate) enum Forward<'a> {
    /// Sent at once.
    Sent,
    /// The broker task is gone.
    Closed,
    /// Waiting for room in the channel.
    Waiting(Pin<Box<dyn Future<Output = Result<(), mpsc::error::SendError<Event>>> + Send + 'a>>),
}

impl Future for Forward<'_> {
    type Output = Result<(), ()>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.get_mut() {
            Forward::Sent => Poll::Ready(Ok(())),
            Forward::Closed => Poll::Ready(Err(())),
            Forward::Waiting(send) => send.as_mut().poll(cx).map(|sent| sent.map_err(drop)),
        }
    }
}

/// Writes batches from the broker, all ready batches with one `write_all`, until the broker
/// closes the connection (or the broker task is gone). Returns an error if the socket fails.
// Not an `async fn`: an `async fn` keeps each argument twice in its future (as received and
// as the local it is moved into), an `async move` block once; per idle connection that was
// about 100 bytes over the three functions.
#[allow(clippy::manual_async_fn)]
pub(crate) fn write_side<'a, W: AsyncWrite + Unpin + 'a>(
    mut writer: W,
    mut rx: BatchReceiver,
    shared: &'a Shared,
) -> impl Future<Output = io::Result<()>> + 'a {
    async move {
        // `None` means the broker task dropped our link without a Close: it has stopped.
        // A receive takes everything queued, already encoded, as one buffer.
        while let Some(batch) = rx.recv().await {
            if let Some(notice) = batch.written {
                // Reported as the batch is taken, so the broker reads the next page of a
                // retained stream while this one is written: at most two pages wait here,
                // since the next batch is taken only once this write is done. A task of its
                // own, so the wait for room in the event channel is not part of every
                // writer's future.
                tokio::spawn(notice.send());
            }
            if !batch.wire.is_empty() {
                writer.write_all(&batch.wire).await?;
                // A no-op for TCP; TLS and WebSocket streams buffer until flushed.
                writer.flush().await?;
            }
            rx.written();
            shared
                .queued_bytes
                .fetch_sub(batch.held, std::sync::atomic::Ordering::Relaxed);
            if batch.close {
                break;
            }
        }
        writer.shutdown().await
    }
}

/// Reads and discards input until EOF, an error, or [`LINGER`] has passed (see there).
pub(crate) async fn linger<R: AsyncRead + Unpin>(reader: &mut R) {
    // On the heap: an array here would make every connection's task 1 KB larger.
    let mut scratch = vec![0u8; 1024];
    let drain = async {
        loop {
            match reader.read(&mut scratch).await {
                Ok(0) => return,
                Ok(_) => {}
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => {}
                Err(_) => return,
            }
        }
    };
    // Elapsing is the normal end for a peer that keeps its socket open.
    let _ = timeout(LINGER, drain).await;
}
