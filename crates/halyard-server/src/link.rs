//! The broker task's handle to each connection: the state both sides share, the batch
//! channel to the connection's writer, and direct writes to an idle plain TCP socket.

use std::future::Future;
use std::os::fd::{AsRawFd, RawFd};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::Poll;

use bytes::BytesMut;
use futures_util::task::AtomicWaker;
use halyard_codec::ProtocolVersion;
use halyard_core::ConnectionId;
use tokio::net::TcpStream;

/// State shared between a connection task and the dispatcher. It outlives a parked
/// connection's task, so its size is part of the memory of every idle connection: atomics
/// are packed and the wakers are the smallest that serve (one waiter each).
#[derive(Debug, Default)]
pub(crate) struct Shared {
    /// Memory held by encoded bytes handed to the writer and not yet written (the capacity
    /// of their buffers, not only their length): the slow-consumer measure, which
    /// `max_outbound_buffer` bounds.
    pub(crate) queued_bytes: AtomicUsize,
    /// Live [`BatchSender`]s; when it drops to 0 the writer's `recv` returns `None`.
    senders: AtomicU32,
    /// Protocol level of the connection's CONNECT (0: none yet); set once by the reader
    /// before it forwards the CONNECT, so it is known before any reply is encoded.
    version: AtomicU8,
    /// Set while the core pushes back on this connection as a publisher
    /// ([`Output::Pause`]): the reader stops reading until it is cleared.
    paused: AtomicBool,
    /// Set while the broker-wide memory budget paces this connection as a publisher (see
    /// `pacing.rs`): the reader stops reading until it is cleared.
    paced: AtomicBool,
    /// Bytes of this connection's events sent to the broker task and not handled yet (see
    /// `inbound_budget.rs`): past its share the reader waits.
    event_bytes: AtomicU32,
    /// Set by the reader of a connection that parks whenever it reads; cleared by each
    /// sweep (see [`Shared::sweep_idle`]).
    read_since_sweep: AtomicBool,
    /// Set by a sweep that found the connection idle: the reader parks it at its next wait
    /// for input with no partial packet buffered.
    park_requested: AtomicBool,
    /// Set (under the `outq` lock) while the writer holds bytes it took from `outq` and has
    /// not written yet: the dispatcher must not write past them.
    writing: AtomicBool,
    /// Set (under the `outq` lock) while the connection is parked (see `park.rs`): it has no
    /// task, so whoever queues something for it, or drops the last sender, must wake it.
    parked: AtomicBool,
    /// Wakes the reader when `paused` or `paced` is cleared, or `event_bytes` falls.
    resume: AtomicWaker,
    /// Wakes the writer when `outq` gets something or the last sender goes, and the whole
    /// connection task when it is asked to park.
    ready: AtomicWaker,
    /// What the writer has to write, and the socket, under one lock.
    outq: Mutex<Queue>,
}

/// The part of [`Shared`] under its lock.
#[derive(Debug, Default)]
struct Queue {
    /// Packets handed to the writer and not yet taken: a per-connection queue that costs
    /// nothing while empty (a tokio mpsc channel allocates a 32-slot block, 1.8 KB, per
    /// connection up front). See [`batch_channel`].
    batch: QueuedBatches,
    /// A plain TCP connection's socket, shared by its task and the dispatcher's direct writes
    /// (see [`Link::write_directly`]).
    socket: TcpSocket,
}

/// The batches a connection's writer has not taken yet: their buffers as they came (a batch
/// is merged into the previous one only where that has room to spare), then the close or
/// notice of the last batch. Merging everything into one growing buffer made it double, so
/// a slow consumer held up to twice `max_outbound_buffer`; kept apart, the memory held is
/// exactly the buffers the dispatcher counted. The writer merges small ones as it takes them
/// (see [`QueuedBatches::take`]), so it still writes them with one call.
#[derive(Debug, Default)]
struct QueuedBatches {
    /// The bytes, in order.
    chunks: std::collections::VecDeque<BytesMut>,
    /// See [`Batch::written`]: reported when the writer takes the last chunk.
    written: Option<Box<WrittenNotice>>,
    /// See [`Batch::close`]: the writer closes after the last chunk.
    close: bool,
}

/// Largest write the writer assembles from several queued buffers (above it, one write call
/// per buffer costs little against its size).
const MERGE_LIMIT: usize = 64 * 1024;

impl QueuedBatches {
    fn is_empty(&self) -> bool {
        self.chunks.is_empty() && !self.close && self.written.is_none()
    }

    /// Appends `batch`; returns the memory it added.
    fn push(&mut self, batch: Batch) -> usize {
        let mut added = 0;
        if !batch.wire.is_empty() {
            match self.chunks.back_mut() {
                Some(last) if last.capacity() - last.len() >= batch.wire.len() => {
                    last.extend_from_slice(&batch.wire);
                }
                _ => {
                    added = batch.wire.capacity();
                    self.chunks.push_back(batch.wire);
                }
            }
        }
        self.close = batch.close;
        if batch.written.is_some() {
            self.written = batch.written;
        }
        added
    }

    /// The next buffer as a batch, merged with those after it while the whole stays within
    /// [`MERGE_LIMIT`], with the close and notice if nothing is left after it.
    fn take(&mut self) -> Batch {
        let mut wire = self.chunks.pop_front().unwrap_or_default();
        let mut held = wire.capacity();
        let mergeable = self
            .chunks
            .iter()
            .scan(wire.len(), |total, chunk| {
                *total += chunk.len();
                (*total <= MERGE_LIMIT).then_some(*total)
            })
            .last();
        if let Some(total) = mergeable {
            let mut merged = BytesMut::with_capacity(total);
            merged.extend_from_slice(&wire);
            while let Some(next) = self.chunks.front() {
                if merged.len() + next.len() > total {
                    break;
                }
                merged.extend_from_slice(next);
                held += next.capacity();
                self.chunks.pop_front();
            }
            wire = merged;
        }
        if !self.chunks.is_empty() {
            return Batch {
                wire,
                held,
                ..Batch::default()
            };
        }
        Batch {
            wire,
            held,
            written: self.written.take(),
            close: std::mem::take(&mut self.close),
        }
    }
}

/// Where a plain TCP connection's socket is.
#[derive(Debug, Default)]
enum TcpSocket {
    /// Not a plain TCP connection (TLS, WebSocket): their framing state lives in the task.
    #[default]
    None,
    /// Registered with tokio's reactor, for the connection task.
    Awake(Arc<TcpStream>),
    /// Parked: out of tokio's reactor, registered with the parker.
    Parked(std::net::TcpStream),
}

impl Shared {
    /// Pauses or resumes the reader (see [`Shared::paused`]).
    pub(crate) fn set_paused(&self, paused: bool) {
        self.paused.store(paused, Ordering::Release);
        if !paused {
            self.resume.wake();
        }
    }

    /// Paces or stops pacing the reader (see [`Shared::paced`]).
    pub(crate) fn set_paced(&self, paced: bool) {
        self.paced.store(paced, Ordering::Release);
        if !paced {
            self.resume.wake();
        }
    }

    /// Whether the memory budget paces this connection now.
    pub(crate) fn is_paced(&self) -> bool {
        self.paced.load(Ordering::Acquire)
    }

    /// Counts an event sent to the broker task.
    pub(crate) fn add_event_bytes(&self, weight: u32) {
        self.event_bytes.fetch_add(weight, Ordering::AcqRel);
    }

    /// Counts an event the broker task has handled, waking the reader if that brings the
    /// connection back within `share`.
    pub(crate) fn sub_event_bytes(&self, weight: u32, share: usize) {
        let before = self.event_bytes.fetch_sub(weight, Ordering::AcqRel);
        if before as usize > share {
            self.resume.wake();
        }
    }

    /// Whether this connection's events outstanding exceed `share`.
    pub(crate) fn over_event_share(&self, share: usize) -> bool {
        self.event_bytes.load(Ordering::Acquire) as usize > share
    }

    /// Whether the reader must wait before it reads more: paused by pushback, paced by the
    /// memory budget, or over its `share` of the event channel.
    pub(crate) fn must_wait(&self, share: usize) -> bool {
        self.paused.load(Ordering::Acquire)
            || self.paced.load(Ordering::Acquire)
            || self.over_event_share(share)
    }

    /// Waits while [`Shared::must_wait`].
    pub(crate) async fn wait_readable(&self, share: usize) {
        std::future::poll_fn(|cx| {
            self.resume.register(cx.waker());
            if self.must_wait(share) {
                Poll::Pending
            } else {
                Poll::Ready(())
            }
        })
        .await;
    }

    /// Records the protocol of the connection's CONNECT.
    pub(crate) fn set_version(&self, version: ProtocolVersion) {
        self.version.store(version.level(), Ordering::Release);
    }

    /// The version to encode with: 3.1.1 until a CONNECT said otherwise.
    pub(crate) fn version(&self) -> ProtocolVersion {
        match self.version.load(Ordering::Acquire) {
            3 => ProtocolVersion::V3_1,
            5 => ProtocolVersion::V5,
            _ => ProtocolVersion::V3_1_1,
        }
    }

    /// The lock over the writer's queue and the socket.
    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.outq.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether the writer has nothing to do: nothing queued, nothing taken and unwritten.
    /// Only meaningful under the lock (`queue`), which both change under.
    fn writer_idle(&self, queue: &Queue) -> bool {
        queue.batch.is_empty() && !self.writing.load(Ordering::Relaxed)
    }

    /// Notes input, for [`Shared::sweep_idle`].
    pub(crate) fn note_read(&self) {
        self.read_since_sweep.store(true, Ordering::Relaxed);
    }

    /// Asks the reader to park the connection if it has read nothing since the previous
    /// sweep: called once per park period, so a connection parks after between one and two
    /// periods of silence. A sweep instead of a timer in every connection: a timer would
    /// cost each read a timer-wheel update and each connection task about 200 bytes.
    pub(crate) fn sweep_idle(&self) {
        if !self.read_since_sweep.swap(false, Ordering::Relaxed) {
            self.park_requested.store(true, Ordering::Relaxed);
            // Wakes the connection task (its writer waits for this); the task then polls its
            // reader too, which sees the request. Also when one was pending already: a
            // request meets a busy writer, and nothing else may wake the task once it is idle.
            self.ready.wake();
        }
    }

    /// Forgets the connection task's wakers: a registered waker keeps its task's memory
    /// alive, which a parked connection must not.
    pub(crate) fn forget_task(&self) {
        drop(self.ready.take());
        drop(self.resume.take());
    }

    /// Takes a pending park request, if the writer is idle: nothing queued, nothing taken
    /// and unwritten. The reader ends the session when this returns true, which drops the
    /// writer's future; that is only safe while it waits for a batch. A request made while
    /// the writer is busy stays pending until a later poll finds it idle.
    pub(crate) fn take_park_request(&self) -> bool {
        if !self.park_requested.load(Ordering::Relaxed) {
            return false;
        }
        if !self.writer_idle(&self.lock()) {
            return false;
        }
        self.park_requested.swap(false, Ordering::Relaxed)
    }

    /// Drops a park request that no longer applies (one made before the CONNECT).
    pub(crate) fn clear_park_request(&self) {
        self.park_requested.store(false, Ordering::Relaxed);
    }

    /// Makes this a plain TCP connection with `socket`.
    pub(crate) fn set_socket(&self, socket: TcpStream) {
        self.lock().socket = TcpSocket::Awake(Arc::new(socket));
        // Accepting counts as input: a new connection parks only after a whole park period
        // without any (a fresh one parking at its first sweep visit, a client that connected
        // and then subscribed lost the race against another client's publish).
        self.note_read();
    }

    /// The plain TCP socket registered with tokio's reactor (registering it again if it was
    /// parked); an error if it cannot be registered or this is no plain TCP connection.
    pub(crate) fn awaken(&self) -> std::io::Result<Arc<TcpStream>> {
        let mut queue = self.lock();
        let awake = match std::mem::take(&mut queue.socket) {
            TcpSocket::Awake(socket) => socket,
            TcpSocket::Parked(socket) => Arc::new(TcpStream::from_std(socket)?),
            TcpSocket::None => return Err(std::io::ErrorKind::NotConnected.into()),
        };
        queue.socket = TcpSocket::Awake(Arc::clone(&awake));
        Ok(awake)
    }

    /// Parks the connection if it can park: nothing is queued for its writer, the writer
    /// holds nothing unwritten, the dispatcher still has its link, and the connection task
    /// holds no handle to the socket any more. The socket leaves tokio's reactor; its
    /// descriptor is returned for the parker's. `Ok(None)`: it cannot park now. An error:
    /// the socket is lost.
    pub(crate) fn try_park(&self) -> std::io::Result<Option<RawFd>> {
        let mut queue = self.lock();
        if !self.writer_idle(&queue) || self.senders.load(Ordering::Acquire) == 0 {
            return Ok(None);
        }
        let TcpSocket::Awake(socket) = std::mem::take(&mut queue.socket) else {
            return Ok(None);
        };
        let socket = match Arc::try_unwrap(socket) {
            Ok(socket) => socket.into_std()?,
            Err(socket) => {
                queue.socket = TcpSocket::Awake(socket);
                return Ok(None);
            }
        };
        let fd = socket.as_raw_fd();
        queue.socket = TcpSocket::Parked(socket);
        self.parked.store(true, Ordering::Relaxed);
        Ok(Some(fd))
    }

    /// The socket's descriptor while it is parked.
    pub(crate) fn parked_fd(&self) -> Option<RawFd> {
        match &self.lock().socket {
            TcpSocket::Parked(socket) => Some(socket.as_raw_fd()),
            _ => None,
        }
    }

    /// Clears the parked mark; returns whether it was set, i.e. whether the caller must wake
    /// the connection.
    pub(crate) fn take_parked(&self) -> bool {
        let _queue = self.lock();
        self.parked.swap(false, Ordering::Relaxed)
    }
}

/// The writer queue of one connection, as a channel: `BatchSender`s (the broker task's
/// [`Link`], the reader refusing a CONNECT) append, the connection's writer takes everything
/// queued at once. Same contract as an unbounded mpsc channel of [`Batch`]es, except that
/// consecutive batches come out merged.
pub(crate) fn batch_channel(shared: &Arc<Shared>) -> (BatchSender, BatchReceiver) {
    shared.senders.fetch_add(1, Ordering::AcqRel);
    (
        BatchSender(Arc::clone(shared)),
        BatchReceiver(Arc::clone(shared)),
    )
}

/// Sending half of [`batch_channel`].
#[derive(Debug)]
pub(crate) struct BatchSender(Arc<Shared>);

impl BatchSender {
    /// Queues `batch` for the writer and counts its bytes in [`Shared::queued_bytes`] (the
    /// writer subtracts what it takes once written). Never waits: what a connection can have
    /// queued is bounded by the QoS 0 drop rule and the core's in-flight window. Returns
    /// whether the connection is parked and must be woken to write it (see `park.rs`).
    #[must_use = "a parked connection must be woken"]
    pub(crate) fn send(&self, batch: Batch) -> bool {
        let wake;
        {
            let mut queue = self.0.lock();
            if queue.batch.close {
                // Nothing more is written after a close.
                return false;
            }
            let added = queue.batch.push(batch);
            self.0.queued_bytes.fetch_add(added, Ordering::Relaxed);
            wake = self.0.parked.swap(false, Ordering::Relaxed);
        }
        self.0.ready.wake();
        wake
    }
}

impl Clone for BatchSender {
    fn clone(&self) -> Self {
        self.0.senders.fetch_add(1, Ordering::AcqRel);
        BatchSender(Arc::clone(&self.0))
    }
}

impl Drop for BatchSender {
    fn drop(&mut self) {
        if self.0.senders.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.ready.wake();
        }
    }
}

/// Receiving half of [`batch_channel`].
#[derive(Debug)]
pub(crate) struct BatchReceiver(Arc<Shared>);

impl BatchReceiver {
    /// Everything queued so far, waiting for something if nothing is; `None` once every
    /// sender is gone and nothing is left.
    pub(crate) async fn recv(&mut self) -> Option<Batch> {
        std::future::poll_fn(|cx| {
            // Registered before looking, so a send in between still wakes us.
            self.0.ready.register(cx.waker());
            if let Some(batch) = self.try_recv() {
                return Poll::Ready(Some(batch));
            }
            if self.0.senders.load(Ordering::Acquire) == 0 {
                // A batch sent just before the last sender went is still taken.
                return Poll::Ready(self.try_recv());
            }
            Poll::Pending
        })
        .await
    }

    /// A receiver for a connection resumed from parking (the first one comes from
    /// [`batch_channel`]).
    pub(crate) fn resume(shared: &Arc<Shared>) -> BatchReceiver {
        BatchReceiver(Arc::clone(shared))
    }

    /// Everything queued so far, if anything is. The writer owns its bytes until it calls
    /// [`BatchReceiver::written`].
    pub(crate) fn try_recv(&mut self) -> Option<Batch> {
        let mut queue = self.0.lock();
        if queue.batch.is_empty() {
            return None;
        }
        self.0.writing.store(true, Ordering::Relaxed);
        Some(queue.batch.take())
    }

    /// The batch taken last is written: the dispatcher may write directly again.
    pub(crate) fn written(&mut self) {
        let _queue = self.0.lock();
        self.0.writing.store(false, Ordering::Relaxed);
    }
}

/// The broker task's handle to one connection's writer.
#[derive(Debug)]
pub(crate) struct Link {
    /// Unbounded on purpose: the broker task must never wait on one slow client. What it
    /// holds is bounded by the QoS 0 drop rule and the core's in-flight window.
    pub(crate) tx: BatchSender,
}

impl Link {
    /// The state shared with the connection task (the sender's own handle to it: one pointer
    /// per connection in the dispatcher's map, not two).
    pub(crate) fn shared(&self) -> &Arc<Shared> {
        &self.tx.0
    }

    /// Writes the start of `batch` straight to the socket when the connection's writer is
    /// idle, so that the common case (a socket with room) needs no wake-up of the connection
    /// task: one hand-off fewer per message, as in a single-threaded broker. Whatever the
    /// socket does not take right away stays in `batch` for the writer. Batches with a close
    /// or a write notice always go through the writer, which owns those steps.
    pub(crate) fn write_directly(&self, batch: &mut Batch) {
        if batch.close || batch.written.is_some() || batch.wire.is_empty() {
            return;
        }
        // Held across the write: the writer cannot take (and write) anything meanwhile.
        let shared = self.shared();
        let queue = shared.lock();
        if !shared.writer_idle(&queue) {
            return;
        }
        // An error (or `WouldBlock`) is left for the writer to meet on its own write, where it
        // ends the task. Both kinds of socket are non-blocking.
        let written = match &queue.socket {
            TcpSocket::Awake(socket) => socket.try_write(&batch.wire),
            TcpSocket::Parked(socket) => std::io::Write::write(&mut &*socket, &batch.wire),
            TcpSocket::None => return,
        };
        if let Ok(written) = written {
            bytes::Buf::advance(&mut batch.wire, written);
        }
    }
}

/// Everything one drain of the core produced for one connection, already encoded: the
/// broker task encodes as it dispatches, straight into this buffer, so a packet is never
/// moved as a value again (a `Packet` is about 400 bytes; queueing them per connection and
/// encoding in the writer spent a quarter of fan-in's CPU in `memmove`) and the writer only
/// writes.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Batch {
    /// The packets' bytes, in order.
    pub(crate) wire: BytesMut,
    /// Report [`Event::Written`] when the writer takes this batch. Boxed: only retained
    /// streams use it, and the core has at most one outstanding per connection.
    pub(crate) written: Option<Box<WrittenNotice>>,
    /// Close the connection after writing the packets.
    pub(crate) close: bool,
    /// What the writer gives back to [`Shared::queued_bytes`] once this batch is written:
    /// the memory counted for its buffers while they were queued (set when it is taken).
    pub(crate) held: usize,
}

impl Batch {
    /// Whether there is nothing to do: no bytes, no close, no notice.
    pub(crate) fn is_empty(&self) -> bool {
        self.wire.is_empty() && !self.close && self.written.is_none()
    }
}

/// Asks a connection's writer to report when it takes the batch carrying it, that is once
/// everything queued before has been written: the server's half of
/// `Output::NotifyWritten`, which paces retained messages streamed at QoS 0. The report is
/// a future built by the dispatcher (it sends the broker task its event), so this module
/// need not know the broker task's event type.
pub(crate) struct WrittenNotice {
    /// The connection to report.
    pub(crate) conn: ConnectionId,
    report: Pin<Box<dyn Future<Output = ()> + Send>>,
}

impl WrittenNotice {
    /// A notice for `conn` whose report is `report`; it runs only when the writer gets here.
    pub(crate) fn new(
        conn: ConnectionId,
        report: impl Future<Output = ()> + Send + 'static,
    ) -> WrittenNotice {
        WrittenNotice {
            conn,
            report: Box::pin(report),
        }
    }

    /// Sends the report.
    pub(crate) async fn send(self) {
        self.report.await
    }
}

impl std::fmt::Debug for WrittenNotice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WrittenNotice")
            .field("conn", &self.conn)
            .finish_non_exhaustive()
    }
}

impl PartialEq for WrittenNotice {
    fn eq(&self, other: &WrittenNotice) -> bool {
        self.conn == other.conn
    }
}

impl Eq for WrittenNotice {}
