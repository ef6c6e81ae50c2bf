//! One task per socket: decode what the peer sends, write what the broker sends.
//!
//! Reading and writing are two futures polled by the same task, so a client that is slow to
//! read never stops us from reading its publishes (and the other way round), without the
//! memory of a second task per connection.

use std::future::{pending, Future};
use std::net::SocketAddr;
use std::sync::Arc;
use std::task::Poll;

use bytes::BytesMut;
use halyard_codec::{decode, DecodeContext, Packet};
use halyard_core::ConnectionId;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tracing::debug;

use crate::connection_io::{
    forward, linger, read_some, write_side, ReadEnd, TcpIo, IDLE_READ, MAX_RETAINED_BUFFER,
};
pub(crate) use crate::connection_settings::ConnectionSettings;
use crate::dispatch::packet_name;
use crate::event::{takes_ack_lane, Event};
use crate::handshake::{malformed, read_connect, take_reauth, Auth, Connected};
use crate::inbound_budget::event_weight;
use crate::link::{batch_channel, BatchReceiver, Link, Shared};
use crate::park::Parked;

/// What a connection holds until it ends and releases on drop (its listener slot, its count
/// for shutdown); it moves with the connection when the connection parks.
pub(crate) type Guard = Box<dyn Send>;

/// Serves one plain TCP connection until it is closed by either side, parking it while it is
/// idle if the server parks connections (see `park.rs`).
///
/// Not an `async fn`: an `async fn` keeps each argument twice in its future (as received and
/// as the local it is moved into), an `async move` block once.
#[allow(clippy::manual_async_fn)]
pub(crate) fn run(
    stream: TcpStream,
    conn: ConnectionId,
    settings: Arc<ConnectionSettings>,
    events: mpsc::Sender<Event>,
    guard: Guard,
) -> impl Future<Output = ()> + Send {
    async move {
        let peer = stream.peer_addr().ok();
        let Some((shared, rx, auth)) = open(conn, &events, None, peer, Some(stream)).await else {
            return;
        };
        let start = Start::Connect(auth);
        serve_tcp(conn, shared, settings, events, start, rx, guard).await;
    }
}

/// Takes up a connection woken from parking, in a new task.
pub(crate) fn resume(
    conn: ConnectionId,
    record: Parked,
    settings: Arc<ConnectionSettings>,
    events: mpsc::Sender<Event>,
) -> impl Future<Output = ()> + Send {
    let Parked { shared, ctx, guard } = record;
    let rx = BatchReceiver::resume(&shared);
    serve_tcp(
        conn,
        shared,
        settings,
        events,
        Start::Resumed(ctx),
        rx,
        guard,
    )
}

/// The sessions of one plain TCP connection: each serves the socket until the connection
/// ends or is asked to park while idle.
// Not an `async fn`: an `async fn` keeps each argument twice in its future (as received and
// as the local it is moved into), an `async move` block once.
#[allow(clippy::manual_async_fn)]
fn serve_tcp(
    conn: ConnectionId,
    mut shared: Arc<Shared>,
    settings: Arc<ConnectionSettings>,
    events: mpsc::Sender<Event>,
    mut start: Start,
    mut rx: BatchReceiver,
    mut guard: Guard,
) -> impl Future<Output = ()> + Send {
    async move {
        loop {
            let socket = match shared.awaken() {
                Ok(socket) => socket,
                Err(error) => {
                    debug!(%error, "cannot register the socket; closing");
                    let _ = forward(&events, Event::Lost { conn }).await;
                    return;
                }
            };
            let parks = settings.parker.is_some();
            let served = session(
                TcpIo(&socket),
                TcpIo(&socket),
                conn,
                &settings,
                &events,
                &shared,
                rx,
                start,
                parks,
            )
            .await;
            // Only the socket's slot in `shared` may hold it when it parks, and nothing there
            // may hold this task.
            drop(socket);
            shared.forget_task();
            let Served::Idle(ctx) = served else {
                return;
            };
            let Some(parker) = settings.parker.clone() else {
                return;
            };
            let record = Box::new(Parked { shared, ctx, guard });
            match parker.park(conn, record) {
                Ok(()) => return,
                Err(record) => {
                    // Something came for the writer meanwhile: serve on.
                    Parked { shared, guard, .. } = *record;
                    rx = BatchReceiver::resume(&shared);
                    start = Start::Resumed(ctx);
                }
            }
        }
    }
}

/// Serves one connection over any byte stream (TCP, TLS, WebSocket) until it is closed by
/// either side. `identity` is the user name from a verified client certificate, when the
/// listener uses it as the user name; `peer` is the client's address (for the HTTP hook).
// Not an `async fn`: an `async fn` keeps each argument twice in its future (as received and
// as the local it is moved into), an `async move` block once; per idle connection that was
// about 100 bytes over the three functions.
#[allow(clippy::manual_async_fn)]
pub(crate) fn serve<R, W>(
    reader: R,
    writer: W,
    conn: ConnectionId,
    settings: Arc<ConnectionSettings>,
    events: mpsc::Sender<Event>,
    identity: Option<String>,
    peer: Option<SocketAddr>,
) -> impl Future<Output = ()> + Send
where
    R: AsyncRead + Unpin + Send,
    W: AsyncWrite + Unpin + Send,
{
    async move {
        let Some((shared, rx, auth)) = open(conn, &events, identity, peer, None).await else {
            return;
        };
        let start = Start::Connect(auth);
        session(
            reader, writer, conn, &settings, &events, &shared, rx, start, false,
        )
        .await;
    }
}

/// Tells the broker task about a new connection. `None` if the server is shutting down.
async fn open(
    conn: ConnectionId,
    events: &mpsc::Sender<Event>,
    identity: Option<String>,
    peer: Option<SocketAddr>,
    tcp: Option<TcpStream>,
) -> Option<(Arc<Shared>, BatchReceiver, Box<Auth>)> {
    let shared = Arc::new(Shared::default());
    if let Some(socket) = tcp {
        shared.set_socket(socket);
    }
    let (tx, rx) = batch_channel(&shared);
    // Kept by the reader until the CONNECT is authenticated, to answer a refusal itself.
    let own_tx = tx.clone();
    let link = Link { tx };
    if forward(events, Event::Open { conn, link, peer })
        .await
        .is_err()
    {
        // The server is shutting down; dropping the stream closes it.
        return None;
    }
    // Boxed: only the pre-CONNECT phase uses it, and a future's arguments stay in it for its
    // whole life.
    let auth = Box::new(Auth {
        reply: Some(own_tx),
        identity,
        peer,
    });
    Some((shared, rx, auth))
}

/// How a session of a connection starts.
enum Start {
    /// With the CONNECT still to read and authenticate.
    Connect(Box<Auth>),
    /// After parking, between packets, with the framing of the CONNECT.
    Resumed(DecodeContext),
}

/// How a session ended.
enum Served {
    /// The connection is closed, and the broker told if it was lost.
    Ended,
    /// Asked to park while nothing was being read or written: the caller parks the
    /// connection.
    Idle(DecodeContext),
}

/// Reads and writes until the connection closes or, if it `parks`, is asked to park.
// Not an `async fn`: an `async fn` keeps each argument twice in its future.
#[allow(clippy::too_many_arguments, clippy::manual_async_fn)]
fn session<'a, R, W>(
    mut reader: R,
    writer: W,
    conn: ConnectionId,
    settings: &'a ConnectionSettings,
    events: &'a mpsc::Sender<Event>,
    shared: &'a Shared,
    rx: BatchReceiver,
    start: Start,
    parks: bool,
) -> impl Future<Output = Served> + 'a
where
    R: AsyncRead + Unpin + 'a,
    W: AsyncWrite + Unpin + 'a,
{
    async move {
        let lost = tokio::select! {
            end = read_side(&mut reader, conn, settings, events, shared, start, parks) => {
                match &end {
                    ReadEnd::Idle(_) => {}
                    // Per-connection events log at debug level: at info, thousands of
                    // connects per second would be thousands of log lines.
                    ReadEnd::Eof => debug!("connection closed by peer"),
                    ReadEnd::ConnectTimeout => debug!(
                        timeout_ms = settings.connect_timeout.as_millis() as u64,
                        "no CONNECT in time; closing"
                    ),
                    ReadEnd::Failed(error) => debug!(%error, "connection failed"),
                }
                if let ReadEnd::Idle(ctx) = end {
                    return Served::Idle(ctx);
                }
                true
            }
            written = write_side(writer, rx, shared) => match written {
                Ok(()) => {
                    debug!("connection closed by broker");
                    // Boxed: needed once, at the end; inline it would size every idle task.
                    Box::pin(linger(&mut reader)).await;
                    false
                }
                Err(error) => {
                    debug!(%error, "connection failed while writing");
                    true
                }
            },
        };
        if lost {
            // Harmless if the broker already forgot the connection; an error means the broker
            // task is gone, and then there is nobody left to tell.
            let _ = forward(events, Event::Lost { conn }).await;
        }
        settings.security.connections.remove(conn);
        Served::Ended
    }
}

/// Reads and decodes until the peer goes away. Returns only when the connection is lost; after
/// a decode error (or when the broker task is gone) it stops reading and waits for the write
/// side to close the connection.
///
/// The phase up to the first CONNECT (connect timeout, authentication, possibly a blocking
/// password check) runs in its own boxed future, freed once the CONNECT is forwarded: the
/// state an idle connection's task keeps for its whole life is only that of the loop below
/// (memory per connection is a budget, see `tests::idle_futures_stay_small`).
// Not an `async fn`: an `async fn` keeps each argument twice in its future (as received and
// as the local it is moved into), an `async move` block once; per idle connection that was
// about 100 bytes over the three functions.
#[allow(clippy::manual_async_fn)]
fn read_side<'a, R: AsyncRead + Unpin>(
    reader: &'a mut R,
    conn: ConnectionId,
    settings: &'a ConnectionSettings,
    events: &'a mpsc::Sender<Event>,
    shared: &'a Shared,
    start: Start,
    parks: bool,
) -> impl Future<Output = ReadEnd> + 'a {
    async move {
        let Connected {
            mut buf,
            ctx,
            mut room,
        } = match start {
            Start::Connect(auth) => {
                match Box::pin(read_connect(reader, conn, settings, events, shared, auth)).await {
                    Ok(connected) => connected,
                    Err(end) => return end,
                }
            }
            Start::Resumed(ctx) => Connected {
                buf: BytesMut::new(),
                ctx,
                room: IDLE_READ,
            },
        };
        // A request made before the CONNECT was complete is not for this loop.
        shared.clear_park_request();
        loop {
            // Backpressure: the core holds a publish of ours until a subscriber has room, the
            // memory budget paces us, or the broker task has not handled our events yet.
            let share = settings.inbound.per_connection();
            if shared.must_wait(share) {
                Box::pin(shared.wait_readable(share)).await;
            }
            // Only between packets: a partial packet is never parked.
            let read = if parks && buf.is_empty() {
                // A park request wakes the task through the writer's signal, which polls this
                // read again (a future of its own here would size every connection's task).
                let mut read = std::pin::pin!(read_some(reader, &mut buf, &mut room));
                let parked = std::future::poll_fn(|cx| {
                    if shared.take_park_request() {
                        return Poll::Ready(None);
                    }
                    read.as_mut().poll(cx).map(Some)
                })
                .await;
                match parked {
                    Some(read) => read,
                    None => return ReadEnd::Idle(ctx),
                }
            } else {
                read_some(reader, &mut buf, &mut room).await
            };
            if parks {
                shared.note_read();
            }
            if let Err(end) = read {
                return end;
            }
            let mut packets = Vec::new();
            let unread = buf.len();
            let failure = loop {
                match decode(&mut buf, &ctx) {
                    Ok(Some(packet)) => {
                        debug!(packet = packet_name(&packet), "received");
                        packets.push(packet);
                    }
                    Ok(None) => break None,
                    Err(error) => break Some(error),
                }
            };
            if packets
                .iter()
                .any(|packet| matches!(packet, Packet::Auth(_)))
            {
                packets = Box::pin(take_reauth(conn, settings, events, packets)).await;
            }
            if settings.security.http_acl().is_some() {
                Box::pin(settings.security.prefetch_acl(conn, &packets)).await;
            }
            if !packets.is_empty() {
                // Decided before this event counts as outstanding; a flag, not the sender: a
                // reference kept across the wait would size every reader's future.
                let ack_lane = takes_ack_lane(&packets, shared.over_event_share(0));
                let weight = event_weight(&packets, unread - buf.len());
                let weight = settings.inbound.take(shared, weight).await;
                let lane = match &settings.acks {
                    Some(acks) if ack_lane => acks,
                    _ => events,
                };
                let event = Event::Packets {
                    conn,
                    packets,
                    weight,
                };
                if forward(lane, event).await.is_err() {
                    return pending().await;
                }
            }
            if let Some(error) = failure {
                return Box::pin(malformed(conn, events, error)).await;
            }
            // A quiet connection keeps no buffer between reads (decoded payloads that still
            // point into it keep it alive only as long as they live).
            if buf.is_empty() && (room == IDLE_READ || buf.capacity() > MAX_RETAINED_BUFFER) {
                buf = BytesMut::new();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::connection_io::READ_CHUNK;
    use crate::link::Batch;
    use halyard_codec::{encode, Connect, ProtocolVersion};
    use std::collections::HashMap;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;
    use tokio::time::timeout;

    /// A connection task on a real loopback socket, with the test playing the broker task.
    struct Harness {
        client: TcpStream,
        events: mpsc::Receiver<Event>,
        task: tokio::task::JoinHandle<()>,
    }

    async fn harness(connect_timeout: Duration) -> Harness {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let client = TcpStream::connect(listener.local_addr().expect("addr"))
            .await
            .expect("connect");
        let (server, _) = listener.accept().await.expect("accept");
        let (events_tx, events) = mpsc::channel(16);
        let settings = Arc::new(ConnectionSettings {
            connect_timeout,
            max_packet_size: 1024,
            security: Arc::default(),
            parker: None,
            inbound: Arc::default(),
            acks: None,
        });
        let task = tokio::spawn(run(server, 7, settings, events_tx, Box::new(())));
        Harness {
            client,
            events,
            task,
        }
    }

    async fn next_event(events: &mut mpsc::Receiver<Event>) -> Event {
        timeout(Duration::from_secs(5), events.recv())
            .await
            .expect("an event in time")
            .expect("channel open")
    }

    fn connect(protocol: ProtocolVersion) -> Packet {
        Packet::Connect(Box::new(Connect {
            protocol,
            clean_start: true,
            keep_alive: 30,
            client_id: "c1".to_owned(),
            will: None,
            username: None,
            password: None,
            properties: Default::default(),
        }))
    }

    fn bytes_of(packets: &[Packet], version: ProtocolVersion) -> Vec<u8> {
        let mut buf = BytesMut::new();
        for packet in packets {
            encode(packet, version, &mut buf).expect("encodable");
        }
        buf.to_vec()
    }

    #[tokio::test]
    async fn one_read_is_one_batch_and_connect_sets_the_version() {
        let mut h = harness(Duration::from_secs(10)).await;
        let Event::Open { conn, link, .. } = next_event(&mut h.events).await else {
            panic!("Open must come first");
        };
        assert_eq!(conn, 7);
        // CONNECT (v5) and PINGREQ in one write: the PINGREQ must be framed as v5 too.
        let sent = [connect(ProtocolVersion::V5), Packet::PingReq];
        h.client
            .write_all(&bytes_of(&sent, ProtocolVersion::V5))
            .await
            .expect("write");
        let Event::Packets { packets, .. } = next_event(&mut h.events).await else {
            panic!("expected packets");
        };
        assert_eq!(packets, sent);
        assert_eq!(link.shared().version(), ProtocolVersion::V5);

        // The broker answers and closes: the client reads the reply, then EOF.
        let wire = BytesMut::from(&bytes_of(&[Packet::PingResp], ProtocolVersion::V5)[..]);
        let batch = Batch {
            wire,
            close: true,
            ..Batch::default()
        };
        let _ = link.tx.send(batch);
        let mut reply = Vec::new();
        timeout(Duration::from_secs(5), h.client.read_to_end(&mut reply))
            .await
            .expect("closed in time")
            .expect("read");
        assert_eq!(reply, bytes_of(&[Packet::PingResp], ProtocolVersion::V5));
        assert_eq!(
            link.shared()
                .queued_bytes
                .load(std::sync::atomic::Ordering::Relaxed),
            0
        );
        drop(h.client);
        timeout(Duration::from_secs(5), h.task)
            .await
            .expect("task ends")
            .expect("no panic");
        assert!(
            h.events.try_recv().is_err(),
            "a connection the broker closed is not reported lost"
        );
    }

    #[tokio::test]
    async fn silence_until_connect_timeout_is_lost() {
        let mut h = harness(Duration::from_millis(100)).await;
        // Held, like the broker task holds it: dropping the link means "broker gone".
        let Event::Open { link, .. } = next_event(&mut h.events).await else {
            panic!("Open must come first");
        };
        assert!(matches!(
            next_event(&mut h.events).await,
            Event::Lost { conn: 7 }
        ));
        // The broker task forgets a lost connection's link, and with it the socket's last
        // handle (its direct-write half).
        drop(link);
        let mut rest = Vec::new();
        let read = timeout(Duration::from_secs(5), h.client.read_to_end(&mut rest))
            .await
            .expect("closed in time");
        assert!(read.is_err() || rest.is_empty());
    }

    #[tokio::test]
    async fn peer_close_is_lost() {
        let mut h = harness(Duration::from_secs(10)).await;
        // Held, like the broker task holds it: dropping the link means "broker gone".
        let Event::Open { link: _link, .. } = next_event(&mut h.events).await else {
            panic!("Open must come first");
        };
        h.client.shutdown().await.expect("shutdown");
        assert!(matches!(
            next_event(&mut h.events).await,
            Event::Lost { conn: 7 }
        ));
    }

    #[tokio::test]
    async fn malformed_input_is_reported_and_reading_stops() {
        let mut h = harness(Duration::from_secs(10)).await;
        let Event::Open { link, .. } = next_event(&mut h.events).await else {
            panic!("Open must come first");
        };
        // Reserved packet type 0 can never be valid.
        h.client.write_all(&[0x00, 0x00]).await.expect("write");
        assert!(matches!(
            next_event(&mut h.events).await,
            Event::DecodeError { conn: 7, .. }
        ));
        // The connection stays open until the broker closes it.
        let _ = link.tx.send(Batch {
            close: true,
            ..Batch::default()
        });
        let mut rest = Vec::new();
        timeout(Duration::from_secs(5), h.client.read_to_end(&mut rest))
            .await
            .expect("closed in time")
            .expect("read");
        assert!(rest.is_empty());
    }

    /// The next event, or `None` if none comes for a while.
    async fn event_within(events: &mut mpsc::Receiver<Event>, wait: Duration) -> Option<Event> {
        timeout(wait, events.recv()).await.ok().flatten()
    }

    #[tokio::test]
    async fn a_flooding_connection_waits_for_the_broker_and_the_others_still_get_through() {
        let (events_tx, mut events) = mpsc::channel(4096);
        let inbound = Arc::new(crate::inbound_budget::InboundBudget::new(4 * 1024 * 1024));
        let settings = Arc::new(ConnectionSettings {
            connect_timeout: Duration::from_secs(10),
            max_packet_size: 1024,
            security: Arc::default(),
            parker: None,
            inbound: Arc::clone(&inbound),
            acks: None,
        });
        let mut clients = Vec::new();
        let mut shared = HashMap::new();
        for conn in [1, 2] {
            let (mut client, server) = socket_pair().await;
            tokio::spawn(run(
                server,
                conn,
                Arc::clone(&settings),
                events_tx.clone(),
                Box::new(()),
            ));
            let Event::Open { link, .. } = next_event(&mut events).await else {
                panic!("Open must come first");
            };
            client
                .write_all(&bytes_of(
                    &[connect(ProtocolVersion::V5)],
                    ProtocolVersion::V5,
                ))
                .await
                .expect("write");
            let Event::Packets { weight, .. } = next_event(&mut events).await else {
                panic!("the CONNECT");
            };
            inbound.release(Some(link.shared()), weight);
            shared.insert(conn, link);
            clients.push(client);
        }
        let mut quiet = clients.remove(1);
        let mut flooder = clients.remove(0);
        // 2 MB of PINGREQ: each 4 KiB read decodes to 2,048 packets, far more in memory.
        let flood = tokio::spawn(async move {
            let pings = [0xC0u8, 0x00].repeat(1 << 20);
            flooder.write_all(&pings).await.expect("flood");
            flooder
        });
        // The test is the broker task, and handles nothing yet: the flooder's reads stop
        // once its events outstanding pass its share.
        let mut held = Vec::new();
        let mut received = 0;
        while let Some(event) = event_within(&mut events, Duration::from_millis(300)).await {
            let Event::Packets {
                conn,
                weight,
                packets,
            } = event
            else {
                panic!("only packets expected");
            };
            assert_eq!(conn, 1);
            received += packets.len();
            held.push(weight);
        }
        let link = &shared[&1];
        assert!(link.shared().over_event_share(inbound.per_connection()));
        assert!(inbound.held() <= inbound.per_connection() + 4096 * size_of::<Packet>() * 2);
        assert!(received < 1 << 20, "the flood was not paused");
        // Another connection is still read.
        quiet
            .write_all(&bytes_of(&[Packet::PingReq], ProtocolVersion::V5))
            .await
            .expect("write");
        let Some(Event::Packets {
            conn: 2, weight, ..
        }) = event_within(&mut events, Duration::from_secs(5)).await
        else {
            panic!("the quiet connection's PINGREQ must get through");
        };
        inbound.release(Some(shared[&2].shared()), weight);
        // The broker handles the flooder's events: it is read again, until the end.
        for weight in held.drain(..) {
            inbound.release(Some(link.shared()), weight);
        }
        while let Some(event) = event_within(&mut events, Duration::from_secs(1)).await {
            let Event::Packets {
                weight, packets, ..
            } = event
            else {
                panic!("only packets expected");
            };
            received += packets.len();
            inbound.release(Some(link.shared()), weight);
        }
        assert_eq!(received, 1 << 20, "every PINGREQ is read in the end");
        assert!(flood.await.is_ok());
        assert_eq!(inbound.held(), 0, "every byte taken is given back");
        assert!(!link.shared().over_event_share(0));
    }

    #[tokio::test]
    async fn acknowledgements_take_their_lane_only_with_nothing_of_the_connection_outstanding() {
        let (events_tx, mut events) = mpsc::channel(16);
        let (acks_tx, mut acks) = mpsc::channel(16);
        let inbound = Arc::new(crate::inbound_budget::InboundBudget::default());
        let settings = Arc::new(ConnectionSettings {
            connect_timeout: Duration::from_secs(10),
            max_packet_size: 1024,
            security: Arc::default(),
            parker: None,
            inbound: Arc::clone(&inbound),
            acks: Some(acks_tx),
        });
        let (mut client, server) = socket_pair().await;
        tokio::spawn(run(server, 1, settings, events_tx, Box::new(())));
        let Event::Open { link, .. } = next_event(&mut events).await else {
            panic!("Open must come first");
        };
        let shared = Arc::clone(link.shared());
        let v5 = ProtocolVersion::V5;
        client
            .write_all(&bytes_of(&[connect(v5)], v5))
            .await
            .expect("write");
        // The CONNECT is weighed, so nothing can overtake it.
        let Event::Packets { weight, .. } = next_event(&mut events).await else {
            panic!("the CONNECT");
        };
        assert!(weight > 0);
        inbound.release(Some(&shared), weight);
        let puback = Packet::PubAck(halyard_codec::PubResponse {
            packet_id: 1,
            ..Default::default()
        });
        client
            .write_all(&bytes_of(std::slice::from_ref(&puback), v5))
            .await
            .expect("write");
        let Event::Packets {
            packets, weight, ..
        } = next_event(&mut acks).await
        else {
            panic!("the PUBACK, in the acknowledgement lane");
        };
        assert_eq!(packets, [puback]);
        // While it is outstanding, the next PINGREQ keeps the connection's order.
        client
            .write_all(&bytes_of(&[Packet::PingReq], v5))
            .await
            .expect("write");
        let Event::Packets {
            packets,
            weight: second,
            ..
        } = next_event(&mut events).await
        else {
            panic!("the PINGREQ, in the main lane");
        };
        assert_eq!(packets, [Packet::PingReq]);
        inbound.release(Some(&shared), weight);
        inbound.release(Some(&shared), second);
        assert_eq!(inbound.held(), 0);
        assert!(acks.try_recv().is_err());
    }

    /// A connected pair: (client, server side).
    async fn socket_pair() -> (TcpStream, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let client = TcpStream::connect(listener.local_addr().expect("addr"))
            .await
            .expect("connect");
        let (server, _) = listener.accept().await.expect("accept");
        (client, server)
    }

    #[tokio::test]
    async fn a_short_read_clears_readiness_and_later_input_still_wakes_the_reader() {
        let (mut client, server) = socket_pair().await;
        let mut io = TcpIo(&server);
        let mut buf = [0u8; 16];
        client.write_all(b"abc").await.expect("write");
        let read = timeout(Duration::from_secs(5), io.read(&mut buf))
            .await
            .expect("in time")
            .expect("read");
        assert_eq!(&buf[..read], b"abc");
        // Readiness was cleared by the short read: nothing more completes a read...
        assert!(
            timeout(Duration::from_millis(50), io.read(&mut buf))
                .await
                .is_err(),
            "a read completed with no input"
        );
        // ...until more input comes.
        client.write_all(b"de").await.expect("write");
        let read = timeout(Duration::from_secs(5), io.read(&mut buf))
            .await
            .expect("later input wakes the reader")
            .expect("read");
        assert_eq!(&buf[..read], b"de");
        // A read that fills the buffer leaves readiness set; the rest is read next.
        client.write_all(&[7u8; 20]).await.expect("write");
        let mut total = 0;
        while total < 20 {
            total += timeout(Duration::from_secs(5), io.read(&mut buf))
                .await
                .expect("in time")
                .expect("read");
        }
        assert_eq!(total, 20);
    }

    async fn read_in_time(io: &mut TcpIo<'_>, buf: &mut BytesMut, room: &mut usize) {
        timeout(Duration::from_secs(5), read_some(io, buf, room))
            .await
            .expect("in time")
            .map_err(|_| "read failed")
            .expect("read");
    }

    #[tokio::test]
    async fn a_quiet_connection_waits_without_a_buffer_and_a_full_read_switches_to_chunks() {
        let (mut client, server) = socket_pair().await;
        let mut io = TcpIo(&server);
        let mut buf = BytesMut::new();
        let mut room = IDLE_READ;
        {
            let read = read_some(&mut io, &mut buf, &mut room);
            tokio::pin!(read);
            let pending =
                std::future::poll_fn(|cx| Poll::Ready(read.as_mut().poll(cx).is_pending()));
            assert!(pending.await);
        }
        assert_eq!(buf.capacity(), 0, "a waiting quiet read holds no buffer");
        client.write_all(b"hello").await.expect("write");
        read_in_time(&mut io, &mut buf, &mut room).await;
        assert_eq!(&buf[..], b"hello");
        assert_eq!(room, IDLE_READ, "a short read stays quiet");

        buf.clear();
        let burst = vec![1u8; 3 * IDLE_READ];
        client.write_all(&burst).await.expect("write");
        while buf.len() < burst.len() {
            read_in_time(&mut io, &mut buf, &mut room).await;
            if buf.len() < burst.len() {
                assert_eq!(room, READ_CHUNK, "a full read is followed by chunked reads");
            }
        }
        assert_eq!(&buf[..], &burst[..]);
    }
}

#[cfg(test)]
mod size_tests {
    use super::*;
    use std::time::Duration;
    use tracing::Instrument;

    /// Memory per idle connection is a budget (DESIGN.md section 3): the connection task's
    /// future is most of it. This catches a state that grows it (an inline timer, a send
    /// future, a handshake) before a benchmark would.
    #[tokio::test]
    async fn idle_futures_stay_small() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let _client = TcpStream::connect(addr).await.expect("connect");
        let (server, peer) = listener.accept().await.expect("accept");
        let (events, _rx) = mpsc::channel(16);
        let settings = Arc::new(ConnectionSettings {
            connect_timeout: Duration::from_secs(1),
            max_packet_size: 1024,
            security: Arc::default(),
            parker: None,
            inbound: Arc::default(),
            acks: None,
        });
        let shared = Arc::new(Shared::default());
        let (tx, rx) = batch_channel(&shared);
        let (mut reader, writer) = server.into_split();
        let auth = Box::new(Auth {
            reply: Some(tx),
            identity: None,
            peer: None,
        });
        let start = Start::Connect(auth);
        let read = read_side(&mut reader, 1, &settings, &events, &shared, start, true);
        assert!(
            size_of_val(&read) <= 288,
            "read side: {} B",
            size_of_val(&read)
        );
        drop(read);
        let write = write_side(writer, rx, &shared);
        assert!(
            size_of_val(&write) <= 256,
            "write side: {} B",
            size_of_val(&write)
        );
        drop(write);
        let stream = reader.reunite(
            TcpStream::connect(addr)
                .await
                .expect("connect")
                .into_split()
                .1,
        );
        drop(stream);

        // The whole task as `spawn_connection` builds it, with a span (without one it is 40 B
        // less). tokio adds about 100 B and rounds the task's allocation up to a multiple of
        // 128 B. An idle connection parks and frees its task (see `park.rs`), so this is the
        // memory of a connection with traffic: it grew from 664 to 848 B with parking (the
        // loop that parks and resumes, the park request in the reader). The future was
        // 2,064 B before the pre-CONNECT phase, the send futures and the linger were boxed
        // and the `async fn`s (which store their arguments twice) became `async` blocks.
        let (server, _) = listener.accept().await.expect("accept");
        let ctx = crate::transport::Transports::default().plain(peer);
        let tracked = Arc::new(crate::ConnectionTracker::default()).track();
        let task =
            crate::transport::serve_accepted(server, peer, ctx, 3, settings, events, tracked)
                .instrument(tracing::info_span!("conn"));
        assert!(
            size_of_val(&task) <= 848,
            "connection task: {} B",
            size_of_val(&task)
        );
    }
}
