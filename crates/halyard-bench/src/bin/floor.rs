//! `halyard-floor`: the least an MQTT server can do for two `halyard-bench` scenarios, to
//! measure what any broker could show on this machine with this load generator.
//!
//! It is not a broker: it keeps no session, matches no topic (every PUBLISH goes to every
//! connection that ever subscribed) and checks nothing beyond the framing. What it measures is
//! the floor under a real broker's figures: loopback TCP, the scheduler and the tool itself.
//! `scripts/bench-vs-mosquitto` runs it beside Halyard and Mosquitto.
//!
//! - `relay` (the `latency` scenario): one thread per connection in blocking reads, so a
//!   publish costs one wake-up, one read and two writes (forward, PUBACK), the shortest path.
//! - `accept` (the `conns` scenario): one thread per CPU, each with its own `SO_REUSEPORT`
//!   listener and epoll set; a CONNECT gets a CONNACK and the connection is held until it closes.
//!
//! Usage: `halyard-floor relay|accept [--port P] [--threads N]`; it prints
//! `halyard-floor listening on 127.0.0.1:P` once it accepts connections.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex, PoisonError};

use anyhow::{bail, Context, Result};
use clap::{Parser, ValueEnum};
use mio::{Events, Interest, Poll, Token};
use socket2::{Domain, Socket, Type};

/// What the floor server is set up for.
#[derive(Copy, Clone, Debug, ValueEnum)]
enum Mode {
    /// Thread per connection, blocking I/O: the latency floor.
    Relay,
    /// Epoll threads with their own listeners: the connect-rate floor.
    Accept,
}

/// Command line.
#[derive(Parser, Debug)]
#[command(about = "The least an MQTT server can do for halyard-bench's latency and conns")]
struct Options {
    /// Which floor to serve.
    mode: Mode,
    /// Port on 127.0.0.1 (0 = any free one).
    #[arg(long, default_value_t = 0)]
    port: u16,
    /// Accept threads (accept mode; default: available CPUs).
    #[arg(long)]
    threads: Option<usize>,
}

fn main() -> Result<()> {
    let options = Options::parse();
    match options.mode {
        Mode::Relay => relay(options.port),
        Mode::Accept => {
            let threads = options
                .threads
                .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, usize::from));
            accept(options.port, threads.max(1))
        }
    }
}

/// One MQTT packet located in a buffer.
struct Frame {
    /// The first byte: type and flags.
    first: u8,
    /// Where the fixed header starts.
    start: usize,
    /// Where the body (after the remaining length) starts.
    body: usize,
    /// One past the last byte.
    end: usize,
}

/// The next whole packet at `start`, `Ok(None)` if more bytes are needed.
fn next_frame(buf: &[u8], start: usize) -> io::Result<Option<Frame>> {
    let Some(&first) = buf.get(start) else {
        return Ok(None);
    };
    let mut length = 0usize;
    for (i, &byte) in buf.iter().skip(start + 1).take(4).enumerate() {
        length |= usize::from(byte & 0x7F) << (7 * i);
        if byte & 0x80 == 0 {
            let body = start + 2 + i;
            let end = body + length;
            return Ok((end <= buf.len()).then_some(Frame {
                first,
                start,
                body,
                end,
            }));
        }
    }
    if buf.len() >= start + 5 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "remaining length longer than 4 bytes",
        ));
    }
    Ok(None)
}

/// The replies to what a client sent, and the publishes to forward to subscribers.
#[derive(Default)]
struct Response {
    reply: Vec<u8>,
    forward: Vec<u8>,
    subscribed: bool,
    disconnect: bool,
}

/// A big-endian u16 at `at` of `frame`'s body, or an error if the body is too short.
fn word(buf: &[u8], frame: &Frame, at: usize) -> io::Result<[u8; 2]> {
    let at = frame.body + at;
    match buf.get(at..at + 2) {
        Some(&[high, low]) if at + 2 <= frame.end => Ok([high, low]),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "packet too short",
        )),
    }
}

/// Answers one packet the way a broker would, with no state but `v5`.
fn respond(buf: &[u8], frame: &Frame, v5: &mut bool, out: &mut Response) -> io::Result<()> {
    match frame.first >> 4 {
        // CONNECT: the protocol level follows the protocol name.
        1 => {
            let name = usize::from(u16::from_be_bytes(word(buf, frame, 0)?));
            let level = buf.get(frame.body + 2 + name).copied();
            *v5 = level == Some(5);
            if *v5 {
                out.reply.extend_from_slice(&[0x20, 3, 0, 0, 0]);
            } else {
                out.reply.extend_from_slice(&[0x20, 2, 0, 0]);
            }
        }
        // PUBLISH: forwarded as received; QoS 1 is acknowledged.
        3 => {
            out.forward.extend_from_slice(&buf[frame.start..frame.end]);
            match (frame.first >> 1) & 3 {
                0 => {}
                1 => {
                    let topic = usize::from(u16::from_be_bytes(word(buf, frame, 0)?));
                    let id = word(buf, frame, 2 + topic)?;
                    out.reply.extend_from_slice(&[0x40, 2, id[0], id[1]]);
                }
                _ => {
                    return Err(io::Error::new(
                        io::ErrorKind::Unsupported,
                        "the floor relays QoS 0 and 1 only",
                    ))
                }
            }
        }
        // SUBSCRIBE: every filter granted at the QoS asked (the options byte ends the packet
        // for the one filter the scenarios send).
        8 => {
            let id = word(buf, frame, 0)?;
            let qos = buf[frame.end - 1] & 3;
            if *v5 {
                out.reply
                    .extend_from_slice(&[0x90, 4, id[0], id[1], 0, qos]);
            } else {
                out.reply.extend_from_slice(&[0x90, 3, id[0], id[1], qos]);
            }
            out.subscribed = true;
        }
        // PINGREQ
        12 => out.reply.extend_from_slice(&[0xD0, 0]),
        // DISCONNECT
        14 => out.disconnect = true,
        // PUBACK from a subscriber, and anything else: ignored.
        _ => {}
    }
    Ok(())
}

/// The subscribers' sockets, shared by all relay threads.
type Subscribers = Arc<Mutex<Vec<TcpStream>>>;

fn relay(port: u16) -> Result<()> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, port)).context("bind")?;
    println!("halyard-floor listening on {}", listener.local_addr()?);
    io::stdout().flush()?;
    let subscribers = Subscribers::default();
    for stream in listener.incoming() {
        let stream = stream.context("accept")?;
        let subscribers = Arc::clone(&subscribers);
        std::thread::spawn(move || {
            // A connection ends on any error; there is nothing to report it to.
            let _ = serve_relay(stream, &subscribers);
        });
    }
    Ok(())
}

fn serve_relay(mut stream: TcpStream, subscribers: &Subscribers) -> io::Result<()> {
    stream.set_nodelay(true)?;
    let mut buf = vec![0u8; 64 * 1024];
    let mut filled = 0;
    let mut v5 = false;
    loop {
        if filled == buf.len() {
            buf.resize(buf.len() * 2, 0);
        }
        let read = stream.read(&mut buf[filled..])?;
        if read == 0 {
            return Ok(());
        }
        filled += read;
        let mut out = Response::default();
        let mut at = 0;
        while let Some(frame) = next_frame(&buf[..filled], at)? {
            respond(&buf, &frame, &mut v5, &mut out)?;
            at = frame.end;
        }
        buf.copy_within(at..filled, 0);
        filled -= at;
        if out.subscribed {
            subscribers
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(stream.try_clone()?);
        }
        if !out.forward.is_empty() {
            let mut subscribers = subscribers.lock().unwrap_or_else(PoisonError::into_inner);
            // A subscriber that fails is dropped, as a broker would close it.
            subscribers.retain_mut(|subscriber| subscriber.write_all(&out.forward).is_ok());
        }
        if !out.reply.is_empty() {
            stream.write_all(&out.reply)?;
        }
        if out.disconnect {
            return Ok(());
        }
    }
}

fn accept(port: u16, threads: usize) -> Result<()> {
    let mut port = port;
    let mut handles = Vec::new();
    for _ in 0..threads {
        let listener = reuse_port_listener(port)?;
        port = listener.local_addr()?.port();
        handles.push(std::thread::spawn(move || serve_accept(listener)));
    }
    println!("halyard-floor listening on 127.0.0.1:{port}");
    io::stdout().flush()?;
    for handle in handles {
        match handle.join() {
            Ok(result) => result?,
            Err(_) => bail!("an accept thread panicked"),
        }
    }
    Ok(())
}

/// A listener on 127.0.0.1:`port` that others may share: the kernel spreads connections over
/// them, one per thread.
fn reuse_port_listener(port: u16) -> Result<mio::net::TcpListener> {
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    let address = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    socket.bind(&address.into()).context("bind")?;
    socket.listen(1024)?;
    socket.set_nonblocking(true)?;
    Ok(mio::net::TcpListener::from_std(socket.into()))
}

fn serve_accept(mut listener: mio::net::TcpListener) -> Result<()> {
    const LISTENER: Token = Token(usize::MAX);
    let mut poll = Poll::new()?;
    poll.registry()
        .register(&mut listener, LISTENER, Interest::READABLE)?;
    let mut connections: HashMap<usize, (mio::net::TcpStream, bool)> = HashMap::new();
    let mut next = 0usize;
    let mut events = Events::with_capacity(1024);
    let mut buf = vec![0u8; 4096];
    loop {
        match poll.poll(&mut events, None) {
            Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
            result => result?,
        }
        for event in &events {
            if event.token() == LISTENER {
                loop {
                    match listener.accept() {
                        Ok((mut stream, _)) => {
                            stream.set_nodelay(true)?;
                            poll.registry().register(
                                &mut stream,
                                Token(next),
                                Interest::READABLE,
                            )?;
                            connections.insert(next, (stream, false));
                            next += 1;
                        }
                        Err(error) if error.kind() == io::ErrorKind::WouldBlock => break,
                        Err(error) => return Err(error.into()),
                    }
                }
                continue;
            }
            let token = event.token().0;
            let Some((stream, v5)) = connections.get_mut(&token) else {
                continue;
            };
            if serve_readable(stream, v5, &mut buf).is_err() {
                if let Some((mut stream, _)) = connections.remove(&token) {
                    poll.registry().deregister(&mut stream)?;
                }
            }
        }
    }
}

/// Reads what came (packets are small and come one at a time in this scenario) and answers
/// it; an error or end of stream closes the connection.
fn serve_readable(
    stream: &mut mio::net::TcpStream,
    v5: &mut bool,
    buf: &mut [u8],
) -> io::Result<()> {
    loop {
        let read = match stream.read(buf) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(read) => read,
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => return Ok(()),
            Err(error) => return Err(error),
        };
        let mut out = Response::default();
        let mut at = 0;
        while let Some(frame) = next_frame(&buf[..read], at)? {
            respond(buf, &frame, v5, &mut out)?;
            at = frame.end;
        }
        if out.disconnect {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        if !out.reply.is_empty() {
            stream.write_all(&out.reply)?;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_split_at_packet_boundaries_and_wait_for_the_rest() {
        let bytes = [0x40, 2, 0, 1, 0xD0, 0, 0x30, 5, 0, 1];
        let first = next_frame(&bytes, 0).expect("valid").expect("whole");
        assert_eq!((first.first, first.body, first.end), (0x40, 2, 4));
        let second = next_frame(&bytes, 4).expect("valid").expect("whole");
        assert_eq!((second.first, second.end), (0xD0, 6));
        assert!(next_frame(&bytes, 6).expect("valid").is_none());
        assert!(next_frame(&[0x30, 0xFF, 0xFF, 0xFF, 0xFF, 1], 0).is_err());
    }

    #[test]
    fn a_qos1_publish_is_forwarded_whole_and_acknowledged_with_its_id() {
        // PUBLISH QoS 1, topic "a/b", packet id 0x0102, payload "hi".
        let bytes = [0x32, 9, 0, 3, b'a', b'/', b'b', 1, 2, b'h', b'i'];
        let frame = next_frame(&bytes, 0).expect("valid").expect("whole");
        let mut out = Response::default();
        respond(&bytes, &frame, &mut false, &mut out).expect("answered");
        assert_eq!(out.forward, bytes);
        assert_eq!(out.reply, [0x40, 2, 1, 2]);
    }

    #[test]
    fn truncated_packets_are_errors_not_panics() {
        let mut out = Response::default();
        for bytes in [&[0x32, 2, 0, 9][..], &[0x10, 1, 0][..], &[0x82, 1, 0][..]] {
            let frame = next_frame(bytes, 0).expect("valid").expect("whole");
            assert!(respond(bytes, &frame, &mut false, &mut out).is_err());
        }
    }
}
