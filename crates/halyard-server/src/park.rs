//! Parking of idle plain TCP connections: a connection that has read nothing for a while
//! gives up its task and its registration with tokio's reactor, and waits as a bare socket
//! in the parker's own `epoll` set until the peer sends something or the broker has
//! something for it. Then a new task takes the connection up where it stopped.
//!
//! Why: most connections of an IoT broker are idle most of the time, and a tokio task plus
//! its reactor registration is about 1 KB per connection before any broker state (measured
//! with heaptrack: a 677-byte task cell and a 233-byte registration). A parked connection
//! keeps its socket, its [`Shared`] state and a small record here. This is the technique of
//! Dovecot's `imap-hibernate` and Erlang brokers' process hibernation.
//!
//! What a parked connection keeps working: the broker's direct writes (the socket is shared
//! with the dispatcher, see `Link::write_directly`), keep-alive (enforced by the core), and
//! everything else, because anything the dispatcher queues for it, and the dispatcher
//! forgetting it, wakes it first.

use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError, Weak};
use std::time::Duration;

use halyard_codec::DecodeContext;
use halyard_core::ConnectionId;
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Registry, Token, Waker};
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::mpsc;
use tracing::{debug, warn};

use crate::connection::{self, ConnectionSettings};
use crate::event::Event;
use crate::link::Shared;

/// Connections parked so far by every server of the process.
static PARKED_TOTAL: AtomicU64 = AtomicU64::new(0);

/// Counts the sweeps that found connections parked since the previous one (see
/// [`memory_release_round`]).
static RELEASE_ROUND: AtomicU64 = AtomicU64::new(0);

/// Changes once after each burst of parking, when the tasks of the connections that parked
/// have been freed (at the next sweep, one park period later). Freed memory stays with the
/// worker threads' allocator heaps; the `halyard` binary has each worker return it to the OS
/// when it next goes idle after this changed.
pub fn memory_release_round() -> u64 {
    RELEASE_ROUND.load(Ordering::Relaxed)
}

/// Called by each sweep: starts a new memory release round if connections parked since the
/// previous sweep, and wakes the idle workers, so that each goes idle again and sees it.
pub(crate) fn after_sweep(parked_at_last_sweep: &mut u64, workers: usize) {
    let parked = PARKED_TOTAL.load(Ordering::Relaxed);
    if parked == *parked_at_last_sweep {
        return;
    }
    *parked_at_last_sweep = parked;
    RELEASE_ROUND.fetch_add(1, Ordering::Relaxed);
    for _ in 0..workers {
        tokio::spawn(async {});
    }
}

/// Token of the waker that stops the parker's thread; connection ids start at 1 and never
/// reach it.
const STOP: Token = Token(usize::MAX);

/// Readiness events taken from the kernel per wait.
const EVENTS_PER_WAIT: usize = 256;

/// Everything a connection task needs to resume a connection: what it held between reads,
/// minus what is rebuilt on resume (the read buffer, the reactor registration).
/// Kept small: it is most of what a parked connection costs beyond its [`Shared`] state (what
/// every connection of the server shares, the parker keeps once).
pub(crate) struct Parked {
    /// Shared with the dispatcher's link; holds the socket.
    pub(crate) shared: Arc<Shared>,
    /// Framing fixed by the CONNECT.
    pub(crate) ctx: DecodeContext,
    /// Released when the connection ends: its listener slot and its count at shutdown.
    pub(crate) guard: connection::Guard,
}

/// Holds parked connections and wakes them. One per server, with one thread that waits in
/// `epoll` for all of them.
pub(crate) struct Parker {
    /// Where parked sockets are registered.
    registry: Registry,
    /// The parked connections, by id (the registration's token). Whoever removes a record
    /// resumes it, so a connection is resumed once even when its peer and the broker wake it
    /// at the same time.
    parked: Mutex<HashMap<ConnectionId, Box<Parked>>>,
    /// Where resumed connections' tasks run.
    runtime: tokio::runtime::Handle,
    /// Stops the thread.
    waker: Waker,
    /// Time without input after which a connection parks.
    pub(crate) after: Duration,
    /// Connections parked now, for `/metrics`.
    gauge: Gauge,
    /// The settings of the server's connections; weak, as they hold the parker.
    settings: OnceLock<Weak<ConnectionSettings>>,
    /// The broker task's event channel, for resumed connections (kept here once rather than
    /// in every record).
    events: mpsc::Sender<Event>,
}

impl std::fmt::Debug for Parker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Parker")
            .field("after", &self.after)
            .finish_non_exhaustive()
    }
}

impl Parker {
    /// Starts the parker's thread. Connections parked later resume on `runtime`.
    pub(crate) fn start(
        after: Duration,
        runtime: tokio::runtime::Handle,
        gauge: Gauge,
        events: mpsc::Sender<Event>,
    ) -> io::Result<Arc<Parker>> {
        let mut poll = Poll::new()?;
        let registry = poll.registry().try_clone()?;
        let waker = Waker::new(poll.registry(), STOP)?;
        let parker = Arc::new(Parker {
            registry,
            parked: Mutex::new(HashMap::new()),
            runtime,
            waker,
            after,
            gauge,
            settings: OnceLock::new(),
            events,
        });
        let weak = Arc::downgrade(&parker);
        std::thread::Builder::new()
            .name("halyard-parker".to_owned())
            .spawn(move || {
                let mut events = Events::with_capacity(EVENTS_PER_WAIT);
                loop {
                    if let Err(error) = poll.poll(&mut events, None) {
                        if error.kind() == io::ErrorKind::Interrupted {
                            continue;
                        }
                        warn!(%error, "parker: poll failed; parked connections wake only for the broker");
                        return;
                    }
                    let Some(parker) = weak.upgrade() else { return };
                    for event in &events {
                        if event.token() == STOP {
                            return;
                        }
                        parker.unpark(event.token().0 as ConnectionId);
                    }
                }
            })?;
        Ok(parker)
    }

    /// Parks a connection whose task is about to end, or gives the record back when the
    /// connection cannot park: something is queued for it, its writer is busy, or the
    /// dispatcher has already forgotten it.
    pub(crate) fn park(&self, conn: ConnectionId, record: Box<Parked>) -> Result<(), Box<Parked>> {
        let mut parked = self.parked.lock().unwrap_or_else(PoisonError::into_inner);
        let fd = match record.shared.try_park() {
            Ok(Some(fd)) => fd,
            Ok(None) => return Err(record),
            Err(error) => {
                // The socket is gone; the task finds out when it takes it back, and ends.
                debug!(%error, "cannot take the socket out of the reactor");
                return Err(record);
            }
        };
        // After the mark: input arriving from here on is reported by the poll (registering
        // reports a socket that is already readable), and a batch queued from here on finds
        // the mark and calls `unpark`, which waits for this lock and so finds the record.
        if let Err(error) =
            self.registry
                .register(&mut SourceFd(&fd), Token(conn as usize), Interest::READABLE)
        {
            debug!(%error, "cannot park the connection; it stays awake");
            record.shared.take_parked();
            return Err(record);
        }
        parked.insert(conn, record);
        self.gauge.inc();
        PARKED_TOTAL.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Resumes a parked connection in a new task; nothing if it is not parked (any more).
    pub(crate) fn unpark(&self, conn: ConnectionId) {
        let record = self
            .parked
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&conn);
        let Some(record) = record else { return };
        self.gauge.dec();
        record.shared.take_parked();
        // The socket stays open (in `shared`) as long as the record lives.
        if let Some(fd) = record.shared.parked_fd() {
            if let Err(error) = self.registry.deregister(&mut SourceFd(&fd)) {
                debug!(%error, "parker: deregistering a woken connection failed");
            }
        }
        // Without settings the server is gone; dropping the record closes the socket.
        if let Some(settings) = self.settings.get().and_then(Weak::upgrade) {
            let events = self.events.clone();
            self.runtime
                .spawn(connection::resume(conn, *record, settings, events));
        }
    }

    /// Gives the parker the settings its connections resume with (they are created after
    /// it, as they hold it).
    pub(crate) fn set_settings(&self, settings: &Arc<ConnectionSettings>) {
        let _ = self.settings.set(Arc::downgrade(settings));
    }

    /// Stops the thread. Parked connections stay parked until the broker wakes them (at
    /// shutdown it closes them all, which wakes them).
    fn stop(&self) {
        if let Err(error) = self.waker.wake() {
            warn!(%error, "cannot stop the parker's thread");
        }
    }
}

/// Stops the parker's thread when the server that started it stops.
pub(crate) struct StopOnDrop(pub(crate) Arc<Parker>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.stop();
    }
}
