//! MQTT over WebSocket (`ws` and `wss` listeners): the HTTP upgrade, and an adapter that
//! turns binary WebSocket messages into the byte stream the connection task reads.
//!
//! MQTT packets may span WebSocket messages and one message may carry several packets
//! [MQTT-6.0.0-2], so the adapter simply concatenates message payloads. Text messages are a
//! protocol violation [MQTT-6.0.0-1] and end the connection. The `mqtt` subprotocol is
//! selected when the client offers it [MQTT-6.0.0-3]; a client offering only other
//! subprotocols is refused, one offering none is accepted (some clients omit the header).

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes};
use futures_util::{Sink, Stream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::{HeaderValue, StatusCode};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::WebSocketStream;

/// The WebSocket subprotocol MQTT uses.
const SUBPROTOCOL: &str = "mqtt";

/// Completes the HTTP upgrade on `stream` for `path`, selecting the `mqtt` subprotocol.
/// `max_message` bounds one WebSocket message (and frame), like the MQTT packet limit.
// The callback's error type (an HTTP response) is tungstenite's, not ours to shrink.
#[allow(clippy::result_large_err)]
pub(crate) async fn accept<S>(stream: S, path: &str, max_message: usize) -> Result<WsIo<S>, WsError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let path = path.to_owned();
    let callback = move |request: &Request, mut response: Response| {
        if request.uri().path() != path {
            return Err(refuse(StatusCode::NOT_FOUND, "no MQTT endpoint here"));
        }
        let offered: Vec<&str> = request
            .headers()
            .get_all("sec-websocket-protocol")
            .iter()
            .filter_map(|value| value.to_str().ok())
            .flat_map(|value| value.split(','))
            .map(str::trim)
            .collect();
        if offered.iter().any(|p| p.eq_ignore_ascii_case(SUBPROTOCOL)) {
            response.headers_mut().insert(
                "sec-websocket-protocol",
                HeaderValue::from_static(SUBPROTOCOL),
            );
        } else if !offered.is_empty() {
            return Err(refuse(StatusCode::BAD_REQUEST, "subprotocol mqtt required"));
        }
        Ok(response)
    };
    let mut config = WebSocketConfig::default();
    config.max_message_size = Some(max_message);
    config.max_frame_size = Some(max_message);
    let inner =
        tokio_tungstenite::accept_hdr_async_with_config(stream, callback, Some(config)).await?;
    Ok(WsIo::new(inner))
}

fn refuse(status: StatusCode, why: &str) -> ErrorResponse {
    let mut response = ErrorResponse::new(Some(why.to_owned()));
    *response.status_mut() = status;
    response
}

/// A WebSocket connection seen as a byte stream: reads yield the payloads of binary
/// messages in order, each write is sent as one binary message.
pub(crate) struct WsIo<S> {
    inner: WebSocketStream<S>,
    /// The rest of the last binary message not yet read.
    pending: Bytes,
    /// The peer closed (or sent a Close frame): reads return EOF.
    closed: bool,
}

impl<S> WsIo<S> {
    /// Wraps an established WebSocket (server or client side).
    pub(crate) fn new(inner: WebSocketStream<S>) -> WsIo<S> {
        WsIo {
            inner,
            pending: Bytes::new(),
            closed: false,
        }
    }
}

fn io_error(error: WsError) -> io::Error {
    match error {
        WsError::Io(error) => error,
        WsError::ConnectionClosed | WsError::AlreadyClosed => {
            io::Error::new(io::ErrorKind::BrokenPipe, "websocket closed")
        }
        other => io::Error::new(io::ErrorKind::InvalidData, other),
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for WsIo<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if !this.pending.is_empty() {
                let n = this.pending.len().min(buf.remaining());
                buf.put_slice(&this.pending[..n]);
                this.pending.advance(n);
                return Poll::Ready(Ok(()));
            }
            if this.closed {
                return Poll::Ready(Ok(()));
            }
            match ready!(Pin::new(&mut this.inner).poll_next(cx)) {
                Some(Ok(Message::Binary(data))) => this.pending = data,
                Some(Ok(Message::Close(_))) | None => this.closed = true,
                // Answered by tungstenite itself on the next write or flush.
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
                Some(Ok(Message::Text(_))) => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "text WebSocket message; MQTT needs binary [MQTT-6.0.0-1]",
                    )))
                }
                Some(Err(error)) => return Poll::Ready(Err(io_error(error))),
            }
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for WsIo<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        ready!(Pin::new(&mut this.inner).poll_ready(cx)).map_err(io_error)?;
        Pin::new(&mut this.inner)
            .start_send(Message::Binary(Bytes::copy_from_slice(buf)))
            .map_err(io_error)?;
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner)
            .poll_flush(cx)
            .map_err(io_error)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match ready!(Pin::new(&mut self.get_mut().inner).poll_close(cx)) {
            Ok(()) | Err(WsError::ConnectionClosed | WsError::AlreadyClosed) => Poll::Ready(Ok(())),
            Err(error) => Poll::Ready(Err(io_error(error))),
        }
    }
}
