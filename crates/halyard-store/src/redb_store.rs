//! [`RedbStore`]: the durable backend on redb, an embedded, pure-Rust, ACID key-value store.

// redb's own error type is 160 bytes; it travels only on cold failure paths, where boxing it
// would add noise and no speed.
#![allow(clippy::result_large_err)]

use std::collections::BTreeMap;
use std::fmt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use halyard_core::retained::{retained_key, RetainedScan, ScanStep};
use halyard_core::store::{
    io_is_no_space, DeliveryState, LoadedOutbox, LoadedSession, LoadedState, PeerMark,
    RetainedPage, SessionRecord, Store, StoreError, StoredDelivery, StoredForward, StoredMessage,
    StoredRelay,
};
use halyard_core::{NodeId, SubscriptionEntry};
use redb::{
    Builder, Database, Durability, ReadableTable, ReadableTableMetadata, RepairSession,
    WriteTransaction,
};
use tracing::{error, info, warn};

use crate::deferred::{DeferredWrite, DeferredWrites};
use crate::format::{
    decode_delivery, decode_forward, decode_relay, decode_retained, decode_session,
    decode_subscription, delivery_state, encode_delivery, encode_forward, encode_relay,
    encode_retained, encode_session, encode_subscription, patch_delivery_state, verify_retained,
};
use crate::redb_errors::{failed, is_corruption, panic_message, RedbResult};
use crate::salvage::{copy_all, recover_unopenable};
use crate::tables::{
    CACHE_BYTES, DELIVERIES, FORWARDS, FORWARDS_ACKED, INBOUND_QOS2, LEGACY_RETAINED, PEER_MARKS,
    RELAYS, RETAINED, SESSIONS, SUBSCRIPTIONS,
};

/// Name of the data file inside the configured directory.
pub const FILE_NAME: &str = "halyard.redb";

/// File written and removed next to the data file by [`Store::probe`] to see whether the
/// file system has room again.
const PROBE_FILE: &str = "halyard.space-probe";

/// Room a probe asks for: more than a typical batch needs, so that the broker does not leave
/// degraded mode on the few bytes a deletion freed only to fail its next commit.
const PROBE_BYTES: usize = 1 << 20;

/// At most this many non-durable commits in a row, whatever the policy. redb reuses the pages
/// a transaction freed only after a durable commit, so every non-durable commit grows the
/// file: measured with one small write per commit, 258 MiB after 5,000 commits without this
/// bound; with it the file levels off at ~9 MiB (~33 MiB with a bound of 256), at the cost
/// of one fsync per 64 commits.
const MAX_NON_DURABLE_COMMITS: u32 = 64;

/// When [`Store::commit`] waits for the disk (`storage.fsync` in the configuration).
///
/// redb commits made without fsync (`Durability::None`) are atomic and visible at once, but
/// are not crash-safe until a later durable commit: a crash before it rolls the file back to
/// the last durable commit. Every policy below is built on that.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsyncPolicy {
    /// Every commit is durable before it returns, so nothing the broker acknowledged is lost
    /// to `kill -9` or power loss. One fsync per commit (per batch, not per message).
    Always,
    /// A commit is durable only when at least this long has passed since the last durable
    /// one (or after 64 non-durable commits in a row, to bound file growth); the others are
    /// not. A crash loses at most the commits of the last interval, provided the server calls
    /// [`Store::commit`] at least once per interval even when idle (a commit with nothing new
    /// still makes earlier non-durable commits durable when due).
    Interval(Duration),
    /// Commits do not wait for the disk: a crash may lose everything since the last durable
    /// commit. Durable commits are made only when the store is closed or dropped, and after
    /// 64 non-durable commits in a row, because redb reuses freed pages only after a durable
    /// commit and the file would otherwise grow with every commit.
    Never,
}

/// What the store does with a damaged data file or damaged records (`storage.on_corruption`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum OnCorruption {
    /// Keep serving: skip and count damaged records, copy every readable record of a damaged
    /// file to a new one, and set aside a file redb cannot open at all (starting empty).
    #[default]
    Salvage,
    /// Change nothing and fail [`RedbStore::open`] or [`Store::load`], saying what is damaged,
    /// so that an operator can inspect or restore the file before the broker serves from it.
    Refuse,
}

/// What [`Store::load`] found, also logged as one line at start-up.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LoadReport {
    /// Sessions loaded.
    pub sessions: usize,
    /// Subscriptions loaded.
    pub subscriptions: usize,
    /// Inbound QoS 2 packet ids loaded.
    pub inbound_qos2: usize,
    /// In-flight deliveries loaded.
    pub inflight: usize,
    /// Pending (queued) deliveries counted; they stay on disk.
    pub pending: u64,
    /// Retained messages counted; they stay on disk.
    pub retained: u64,
    /// Records that failed their checksum or did not decode: each was logged with its key and
    /// removed.
    pub corrupt: usize,
    /// Records whose session record is missing: counted, logged per session and removed.
    pub orphaned: u64,
}

impl fmt::Display for LoadReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} sessions, {} subscriptions, {} inbound QoS 2 ids, {} in-flight and {} queued \
             deliveries, {} retained messages; {} corrupt and {} orphaned records removed",
            self.sessions,
            self.subscriptions,
            self.inbound_qos2,
            self.inflight,
            self.pending,
            self.retained,
            self.corrupt,
            self.orphaned
        )
    }
}

/// A [`Store`] in one redb file, `<dir>/halyard.redb`.
///
/// Writes between two commits go into one open redb write transaction, begun at the first
/// write, so a batch costs one commit (group commit); reads see that transaction's writes.
/// Because the trait's write methods cannot fail, a write error is remembered and returned by
/// the next [`Store::commit`], which the server treats as fatal, unless the file system is out
/// of space: then the store is *out of space* (see [`Store::probe`]) until a probe finds room.
///
/// Dropping the store discards uncommitted writes, as a crash would, then makes earlier
/// non-durable commits durable.
pub struct RedbStore {
    db: Database,
    /// The data file.
    path: PathBuf,
    policy: FsyncPolicy,
    on_corruption: OnCorruption,
    /// The batch being written; `Some` only when it holds writes.
    txn: Option<WriteTransaction>,
    /// Non-durable commits made since the last durable one.
    unsynced: u32,
    last_durable: Instant,
    /// The first write error of the current batch.
    failure: Option<StoreError>,
    /// Set by a write or commit that failed for want of space. redb refuses every
    /// operation after an I/O error until the file is reopened, so until a probe reopens it,
    /// writes are kept aside (`deferred`) and commits and reads fail at once.
    out_of_space: bool,
    /// What was written while out of space, for the probe that finds room to apply.
    deferred: DeferredWrites,
    set_aside: Option<PathBuf>,
    last_load: Option<LoadReport>,
}

impl fmt::Debug for RedbStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedbStore")
            .field("policy", &self.policy)
            .field("open_batch", &self.txn.is_some())
            .field("unsynced", &self.unsynced)
            .field("set_aside", &self.set_aside)
            .finish_non_exhaustive()
    }
}

/// Why the data file could not be opened.
enum OpenError {
    /// The file is damaged beyond what redb repairs; it should be set aside.
    Corrupt(String),
    /// Anything else (permissions, the file is in use, ...): start-up must fail.
    Other(StoreError),
}

fn classify(context: &'static str) -> impl Fn(redb::Error) -> OpenError {
    move |error| {
        if is_corruption(&error) {
            OpenError::Corrupt(format!("{context}: {error}"))
        } else {
            OpenError::Other(failed(context)(error))
        }
    }
}

/// Opens (or creates) the database and makes sure every table exists.
fn open_database(path: &Path) -> Result<Database, OpenError> {
    let repairing = Arc::new(AtomicBool::new(false));
    let mut builder = Builder::new();
    builder.create_with_file_format_v3(true);
    // redb's default page cache is 1 GiB; the broker reads the store sequentially (start-up,
    // queue pages), so a small cache keeps RSS flat while queues grow to millions.
    builder.set_cache_size(CACHE_BYTES);
    let flag = Arc::clone(&repairing);
    let file = path.display().to_string();
    // redb runs its repair pass when it creates a file in format v3 too; only an existing file
    // can have been left unclean (a new one warned on every first start).
    let existed = path.exists();
    builder.set_repair_callback(move |session: &mut RepairSession| {
        if existed && !flag.swap(true, Ordering::Relaxed) {
            warn!(
                %file,
                progress = session.progress(),
                "data file was not closed cleanly; redb is repairing it (this can take a while)"
            );
        }
    });
    // A damaged file must not be able to stop start-up, not even by a panic inside redb.
    let opened = catch_unwind(AssertUnwindSafe(|| builder.create(path)));
    let db = match opened {
        Ok(result) => result
            .map_err(redb::Error::from)
            .map_err(classify("opening the data file"))?,
        Err(panic) => {
            return Err(OpenError::Corrupt(format!(
                "redb panicked opening the data file: {}",
                panic_message(&*panic)
            )));
        }
    };
    if repairing.load(Ordering::Relaxed) {
        info!(file = %path.display(), "data file repaired");
    }
    let create = || -> Result<u64, redb::Error> {
        let mut txn = db.begin_write()?;
        txn.set_durability(Durability::Immediate);
        txn.open_table(SESSIONS)?;
        txn.open_table(SUBSCRIPTIONS)?;
        txn.open_table(INBOUND_QOS2)?;
        txn.open_table(DELIVERIES)?;
        txn.open_table(RETAINED)?;
        txn.open_table(FORWARDS)?;
        txn.open_table(FORWARDS_ACKED)?;
        txn.open_table(PEER_MARKS)?;
        txn.open_table(RELAYS)?;
        let moved = migrate_retained(&txn)?;
        txn.commit()?;
        Ok(moved)
    };
    let moved = create().map_err(classify("creating the tables"))?;
    if moved > 0 {
        info!(
            file = %path.display(),
            moved, "retained messages moved to the level-ordered table"
        );
    }
    Ok(db)
}

/// Moves retained messages from the table of earlier versions (keyed by topic) into
/// [`RETAINED`] and drops it; returns how many were moved (0 once done).
fn migrate_retained(txn: &WriteTransaction) -> Result<u64, redb::Error> {
    let mut moved = 0;
    {
        let legacy = txn.open_table(LEGACY_RETAINED)?;
        let mut table = txn.open_table(RETAINED)?;
        for entry in legacy.iter()? {
            let (topic, value) = entry?;
            table.insert(retained_key(topic.value()).as_str(), value.value())?;
            moved += 1;
        }
    }
    txn.delete_table(LEGACY_RETAINED)?;
    Ok(moved)
}

/// The error of [`OnCorruption::Refuse`]: what is damaged, and that nothing was changed.
fn refused(path: &Path, reason: &str) -> StoreError {
    error!(file = %path.display(), %reason, "data file is damaged; refusing to use it (on_corruption = refuse): nothing was changed");
    StoreError::new(format!(
        "{} is damaged ({reason}); refusing to use it (on_corruption = refuse): nothing was \
         changed; restore it from a backup, move it aside to start empty, or set \
         on_corruption = \"salvage\" to keep every intact record",
        path.display()
    ))
}

/// A name beside the data file that no earlier set-aside file uses.
fn set_aside_path(dir: &Path) -> PathBuf {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let base = format!("{FILE_NAME}.corrupt-{secs}");
    let mut candidate = dir.join(&base);
    let mut n = 1;
    while candidate.exists() {
        candidate = dir.join(format!("{base}-{n}"));
        n += 1;
    }
    candidate
}

/// A record that start-up removes.
enum Doomed {
    Session(String),
    Subscription(String, String),
    InboundQos2(String, u16),
    Delivery(String, u64),
    Retained(String),
    Relay(String, u64),
}

/// One session's deliveries, gathered during the ordered scan of [`DELIVERIES`].
struct Queue {
    client: String,
    /// The session record exists; otherwise the entries are orphans.
    known: bool,
    inflight: Vec<(u64, StoredDelivery, DeliveryState)>,
    first_pending: Option<u64>,
    pending: u64,
    last_seq: Option<u64>,
    orphans: u64,
}

impl Queue {
    fn new(client: &str, known: bool) -> Queue {
        Queue {
            client: client.to_owned(),
            known,
            inflight: Vec::new(),
            first_pending: None,
            pending: 0,
            last_seq: None,
            orphans: 0,
        }
    }

    fn finish(self, sessions: &mut BTreeMap<String, LoadedSession>, report: &mut LoadReport) {
        if self.orphans > 0 {
            warn!(
                client = %self.client,
                count = self.orphans,
                "removing deliveries of a session that has no session record"
            );
            report.orphaned += self.orphans;
        }
        if let Some(session) = sessions.get_mut(&self.client) {
            report.inflight += self.inflight.len();
            report.pending += self.pending;
            session.inflight = self.inflight;
            session.first_pending = self.first_pending;
            session.pending_count = self.pending;
            session.next_seq = self.last_seq.map_or(0, |seq| seq.saturating_add(1));
        }
    }
}

/// Reads everything through `txn`, collecting records to remove in `doomed`.
fn scan<S, B, Q, D, R>(
    tables: (&S, &B, &Q, &D, &R),
    report: &mut LoadReport,
    doomed: &mut Vec<Doomed>,
) -> Result<LoadedState, redb::Error>
where
    S: ReadableTable<&'static str, &'static [u8]>,
    B: ReadableTable<(&'static str, &'static str), &'static [u8]>,
    Q: ReadableTable<(&'static str, u16), ()>,
    D: ReadableTable<(&'static str, u64), &'static [u8]>,
    R: ReadableTable<&'static str, &'static [u8]>,
{
    let (session_table, subscription_table, qos2_table, delivery_table, retained_table) = tables;
    let mut sessions = BTreeMap::new();
    for entry in session_table.iter()? {
        let (key, value) = entry?;
        let client = key.value();
        match decode_session(client, value.value()) {
            Ok(record) => {
                let session = LoadedSession::from_record(record);
                sessions.insert(client.to_owned(), session);
            }
            Err(e) => {
                error!(%client, error = %e, "removing undecodable session record: the session is lost");
                report.corrupt += 1;
                doomed.push(Doomed::Session(client.to_owned()));
            }
        }
    }

    for entry in subscription_table.iter()? {
        let (key, value) = entry?;
        let (client, filter) = key.value();
        let doom = || Doomed::Subscription(client.to_owned(), filter.to_owned());
        let Some(session) = sessions.get_mut(client) else {
            warn!(%client, %filter, "removing subscription of a session that has no session record");
            report.orphaned += 1;
            doomed.push(doom());
            continue;
        };
        match decode_subscription(client, filter, value.value()) {
            Ok(entry) => session.subscriptions.push((filter.to_owned(), entry)),
            Err(e) => {
                error!(%client, %filter, error = %e, "removing undecodable subscription: it is lost");
                report.corrupt += 1;
                doomed.push(doom());
            }
        }
    }

    for entry in qos2_table.iter()? {
        let (key, _) = entry?;
        let (client, packet_id) = key.value();
        match sessions.get_mut(client) {
            Some(session) => session.inbound_qos2.push(packet_id),
            None => {
                warn!(%client, packet_id, "removing inbound QoS 2 id of a session that has no session record");
                report.orphaned += 1;
                doomed.push(Doomed::InboundQos2(client.to_owned(), packet_id));
            }
        }
    }

    let mut queue: Option<Queue> = None;
    for entry in delivery_table.iter()? {
        let (key, value) = entry?;
        let (client, seq) = key.value();
        if queue.as_ref().is_some_and(|q| q.client != client) {
            if let Some(done) = queue.take() {
                done.finish(&mut sessions, report);
            }
        }
        let queue = queue.get_or_insert_with(|| Queue::new(client, sessions.contains_key(client)));
        if !queue.known {
            queue.orphans += 1;
            doomed.push(Doomed::Delivery(client.to_owned(), seq));
            continue;
        }
        queue.last_seq = Some(seq);
        let value = value.value();
        // Pending deliveries stay on disk: only their checksum and state are read here.
        let decoded = delivery_state(client, seq, value).and_then(|state| match state {
            DeliveryState::Pending => Ok(None),
            _ => decode_delivery(client, seq, value).map(Some),
        });
        match decoded {
            Ok(None) => {
                queue.first_pending.get_or_insert(seq);
                queue.pending += 1;
            }
            Ok(Some((delivery, state))) => queue.inflight.push((seq, delivery, state)),
            Err(e) => {
                error!(%client, seq, error = %e, "removing undecodable delivery: the message is lost");
                report.corrupt += 1;
                doomed.push(Doomed::Delivery(client.to_owned(), seq));
            }
        }
    }
    if let Some(done) = queue {
        done.finish(&mut sessions, report);
    }

    report.sessions = sessions.len();
    for session in sessions.values() {
        report.subscriptions += session.subscriptions.len();
        report.inbound_qos2 += session.inbound_qos2.len();
    }
    // Retained messages stay on disk, read in pages when a subscriber needs them; only their
    // checksums are verified here, so the count of corrupt records is true at start-up.
    for entry in retained_table.iter()? {
        let (key, value) = entry?;
        let key = key.value();
        match verify_retained(key, value.value()) {
            Ok(()) => report.retained += 1,
            Err(e) => {
                error!(key = %key.escape_debug(), error = %e, "removing damaged retained message: it is lost");
                report.corrupt += 1;
                doomed.push(Doomed::Retained(key.to_owned()));
            }
        }
    }
    Ok(LoadedState {
        sessions: sessions.into_values().collect(),
        ..LoadedState::default()
    })
}

fn remove_doomed(txn: &WriteTransaction, doomed: &[Doomed]) -> Result<(), redb::Error> {
    let mut sessions = txn.open_table(SESSIONS)?;
    let mut subscriptions = txn.open_table(SUBSCRIPTIONS)?;
    let mut qos2 = txn.open_table(INBOUND_QOS2)?;
    let mut deliveries = txn.open_table(DELIVERIES)?;
    let mut retained = txn.open_table(RETAINED)?;
    let mut relays = txn.open_table(RELAYS)?;
    for record in doomed {
        match record {
            Doomed::Session(client) => {
                sessions.remove(client.as_str())?;
            }
            Doomed::Subscription(client, filter) => {
                subscriptions.remove((client.as_str(), filter.as_str()))?;
            }
            Doomed::InboundQos2(client, id) => {
                qos2.remove((client.as_str(), *id))?;
            }
            Doomed::Delivery(client, seq) => {
                deliveries.remove((client.as_str(), *seq))?;
            }
            Doomed::Retained(key) => {
                retained.remove(key.as_str())?;
            }
            Doomed::Relay(client, to) => {
                relays.remove((client.as_str(), *to))?;
            }
        }
    }
    Ok(())
}

/// Up to `limit` decodable pending deliveries of `client_id` from `from` on; the sequence
/// numbers of undecodable ones go to `bad`.
fn scan_pending<T>(
    table: &T,
    client_id: &str,
    from: u64,
    limit: usize,
    bad: &mut Vec<u64>,
) -> Result<Vec<(u64, StoredDelivery)>, redb::Error>
where
    T: ReadableTable<(&'static str, u64), &'static [u8]>,
{
    let mut out = Vec::new();
    for entry in table.range((client_id, from)..=(client_id, u64::MAX))? {
        if out.len() >= limit {
            break;
        }
        let (key, value) = entry?;
        let seq = key.value().1;
        let value = value.value();
        match delivery_state(client_id, seq, value) {
            Ok(DeliveryState::Pending) => {}
            Ok(_) => continue,
            Err(e) => {
                error!(client = %client_id, seq, error = %e, "removing undecodable queued delivery: the message is lost");
                bad.push(seq);
                continue;
            }
        }
        match decode_delivery(client_id, seq, value) {
            Ok((delivery, _)) => out.push((seq, delivery)),
            Err(e) => {
                error!(client = %client_id, seq, error = %e, "removing undecodable queued delivery: the message is lost");
                bad.push(seq);
            }
        }
    }
    Ok(out)
}

/// The relays of sessions that moved on, read at start-up; undecodable ones are removed.
fn scan_relays<T>(
    table: &T,
    report: &mut LoadReport,
    doomed: &mut Vec<Doomed>,
) -> Result<Vec<StoredRelay>, redb::Error>
where
    T: ReadableTable<(&'static str, u64), &'static [u8]>,
{
    let mut relays = Vec::new();
    for entry in table.iter()? {
        let (key, value) = entry?;
        let (client, to) = key.value();
        match decode_relay(client, to, value.value()) {
            Ok(relay) => relays.push(relay),
            Err(e) => {
                error!(%client, to, error = %e, "removing undecodable relay: messages replayed here for the moved session are not passed on");
                report.corrupt += 1;
                doomed.push(Doomed::Relay(client.to_owned(), to));
            }
        }
    }
    Ok(relays)
}

/// The outboxes and duplicate filters of the cluster's peer link, read at start-up. The
/// forwards themselves stay on disk: only each outbox's bounds and size are taken.
fn scan_links<F, A, M>(
    forwards: &F,
    acked: &A,
    marks: &M,
) -> Result<(BTreeMap<NodeId, LoadedOutbox>, Vec<PeerMark>), redb::Error>
where
    F: ReadableTable<(u64, u64), &'static [u8]>,
    A: ReadableTable<u64, u64>,
    M: ReadableTable<u64, (u64, u64)>,
{
    let mut outboxes: BTreeMap<NodeId, LoadedOutbox> = BTreeMap::new();
    for entry in acked.iter()? {
        let (dest, through) = entry?;
        outboxes.entry(dest.value()).or_default().acked_through = through.value();
    }
    for entry in forwards.iter()? {
        let (key, _) = entry?;
        let (dest, seq) = key.value();
        let outbox = outboxes.entry(dest).or_default();
        outbox.last_seq = seq;
        outbox.pending += 1;
    }
    let mut peer_marks = Vec::new();
    for entry in marks.iter()? {
        let (origin, mark) = entry?;
        let (incarnation, seq) = mark.value();
        peer_marks.push(PeerMark {
            origin: origin.value(),
            incarnation,
            seq,
        });
    }
    Ok((outboxes, peer_marks))
}

/// Up to `limit` decodable forwards for `dest` after `after`; undecodable ones go to `bad`.
fn scan_forwards<T>(
    table: &T,
    dest: NodeId,
    after: u64,
    limit: usize,
    bad: &mut Vec<u64>,
) -> Result<Vec<(u64, StoredForward)>, redb::Error>
where
    T: ReadableTable<(u64, u64), &'static [u8]>,
{
    let mut out = Vec::new();
    let Some(from) = after.checked_add(1) else {
        return Ok(out);
    };
    for entry in table.range((dest, from)..=(dest, u64::MAX))? {
        if out.len() >= limit {
            break;
        }
        let (key, value) = entry?;
        let seq = key.value().1;
        match decode_forward(dest, seq, value.value()) {
            Ok(forward) => out.push((seq, forward)),
            Err(e) => {
                error!(dest, seq, error = %e, "removing undecodable forward: the message is lost for that node");
                bad.push(seq);
            }
        }
    }
    Ok(out)
}

/// One page of retained messages matching `filter` after the key `after` (see
/// [`RetainedScan`]); the keys of undecodable records go to `bad`.
fn scan_retained<T>(
    table: &T,
    filter: &str,
    after: Option<&str>,
    limit: usize,
    bad: &mut Vec<String>,
) -> Result<RetainedPage<StoredMessage>, redb::Error>
where
    T: ReadableTable<&'static str, &'static [u8]>,
{
    let start = RetainedScan::new(filter, limit);
    let mut scan = start.clone();
    let mut messages = Vec::new();
    for entry in table.range::<&str>(start.start(after))? {
        let (key, value) = entry?;
        let key = key.value();
        match scan.step(key) {
            ScanStep::End => break,
            ScanStep::Skip => {}
            ScanStep::Take => match decode_retained(key, value.value()) {
                Ok(message) if retained_key(&message.topic) == key => messages.push(message),
                Ok(_) => {
                    error!(key = %key.escape_debug(), "removing retained message stored under another topic's key");
                    bad.push(key.to_owned());
                }
                Err(e) => {
                    error!(key = %key.escape_debug(), error = %e, "removing undecodable retained message: it is lost");
                    bad.push(key.to_owned());
                }
            },
        }
        if scan.full() {
            return Ok(RetainedPage {
                messages,
                next: Some(key.to_owned()),
            });
        }
    }
    Ok(RetainedPage {
        messages,
        next: None,
    })
}

/// How reading the committed data failed.
enum ScanFailure {
    /// The file's structure is damaged: a redb corruption error, or a panic inside redb.
    Damaged(String),
    /// Anything else (I/O): returned to the caller.
    Failed(StoreError),
}

impl RedbStore {
    /// Opens or creates `dir/halyard.redb`, creating `dir` if needed.
    ///
    /// After an unclean shutdown redb repairs the file on open (logged). A file that is
    /// damaged beyond that is never fatal: it is renamed to `halyard.redb.corrupt-<unix secs>`
    /// (logged as an error naming it, see [`RedbStore::set_aside_file`]), every record still
    /// readable in it is copied to a new file (see `readable_copy`), and the broker keeps
    /// serving. Other failures (permissions, the file locked by another broker, an unwritable
    /// disk) are returned.
    pub fn open(dir: &Path, policy: FsyncPolicy) -> Result<RedbStore, StoreError> {
        RedbStore::open_with(dir, policy, OnCorruption::Salvage)
    }

    /// [`RedbStore::open`], with `on_corruption` deciding what a damaged file does: with
    /// [`OnCorruption::Refuse`] a file redb cannot open is an error and stays where it is, and
    /// [`Store::load`] fails on the first sign of damage instead of repairing anything.
    pub fn open_with(
        dir: &Path,
        policy: FsyncPolicy,
        on_corruption: OnCorruption,
    ) -> Result<RedbStore, StoreError> {
        std::fs::create_dir_all(dir)
            .map_err(|e| StoreError::new(format!("creating {}: {e}", dir.display())))?;
        let path = dir.join(FILE_NAME);
        let (db, set_aside) = match open_database(&path) {
            Ok(db) => (db, None),
            Err(OpenError::Other(e)) => return Err(e),
            Err(OpenError::Corrupt(reason)) if on_corruption == OnCorruption::Refuse => {
                return Err(refused(&path, &reason));
            }
            Err(OpenError::Corrupt(reason)) => {
                let aside = set_aside_path(dir);
                std::fs::rename(&path, &aside).map_err(|e| {
                    StoreError::new(format!(
                        "{} is corrupt ({reason}) and could not be moved aside: {e}",
                        path.display()
                    ))
                })?;
                error!(
                    file = %path.display(),
                    moved_to = %aside.display(),
                    %reason,
                    "redb cannot open the data file; it was moved aside, and every record still \
                     readable in it is copied to a new file"
                );
                let db = open_database(&path).map_err(|e| match e {
                    OpenError::Corrupt(reason)
                    | OpenError::Other(StoreError {
                        message: reason, ..
                    }) => StoreError::new(format!("creating a new {}: {reason}", path.display())),
                })?;
                recover_unopenable(&aside, &db)?;
                (db, Some(aside))
            }
        };
        Ok(RedbStore {
            db,
            path,
            policy,
            on_corruption,
            txn: None,
            unsynced: 0,
            last_durable: Instant::now(),
            failure: None,
            out_of_space: false,
            deferred: DeferredWrites::default(),
            set_aside,
            last_load: None,
        })
    }

    /// Where a damaged data file was moved, if one was: at open (the store then started
    /// empty) or by a salvage during [`Store::load`] (readable records were kept).
    pub fn set_aside_file(&self) -> Option<&Path> {
        self.set_aside.as_deref()
    }

    /// What the last [`Store::load`] found and removed.
    pub fn last_load_report(&self) -> Option<&LoadReport> {
        self.last_load.as_ref()
    }

    /// Discards uncommitted writes (as a crash would) and makes earlier commits durable.
    /// Dropping the store does the same but can only log a failure.
    pub fn close(mut self) -> Result<(), StoreError> {
        self.shut_down()
    }

    fn shut_down(&mut self) -> Result<(), StoreError> {
        self.txn = None;
        self.failure = None;
        if self.out_of_space {
            let lost = self.deferred.len() as u64 + self.deferred.dropped;
            return Err(StoreError::no_space(format!(
                "the disk is still full: {lost} writes made since it filled are not stored"
            )));
        }
        if self.unsynced > 0 {
            let mut txn = self.db.begin_write().or_store("closing")?;
            txn.set_durability(Durability::Immediate);
            txn.commit().or_store("closing")?;
            self.unsynced = 0;
        }
        Ok(())
    }

    /// The open batch, begun if there is none.
    fn batch(&mut self) -> Result<&WriteTransaction, StoreError> {
        let txn = match self.txn.take() {
            Some(txn) => txn,
            None => self.db.begin_write().or_store("beginning a transaction")?,
        };
        Ok(self.txn.insert(txn))
    }

    /// Runs one write in the open batch; a failure fails the next commit.
    fn write(
        &mut self,
        context: &'static str,
        op: impl FnOnce(&WriteTransaction) -> Result<(), redb::Error>,
    ) {
        if self.failure.is_some() || self.out_of_space {
            return; // The batch is lost already; the next commit reports why.
        }
        if let Err(e) = self.batch().and_then(|txn| op(txn).or_store(context)) {
            self.remember(e);
        }
    }

    /// Remembers a failure that is not redb's (a record that does not encode).
    fn fail(&mut self, context: &'static str, error: impl fmt::Display) {
        self.remember(StoreError::new(format!("{context}: {error}")));
    }

    /// Remembers the first failure of the batch for the next commit. A full disk is logged
    /// once, by the server, as the start of degraded mode, not here per write.
    fn remember(&mut self, error: StoreError) {
        if error.is_no_space() {
            self.out_of_space = true;
            self.txn = None;
        } else {
            error!(%error, "a write failed; the next commit fails");
        }
        if self.failure.is_none() {
            self.failure = Some(error);
        }
    }

    /// Keeps a write made while out of space for the probe to apply; a write of the batch
    /// whose commit is about to fail goes with that batch.
    fn defer(&mut self, write: DeferredWrite) {
        if self.failure.is_none() {
            self.deferred.push(write);
        }
    }

    /// The error of a commit or read refused because the store is out of space.
    fn no_space_error() -> StoreError {
        StoreError::no_space("the file system is full; writes wait for a probe to find room")
    }

    /// Whether `dir` has [`PROBE_BYTES`] free: written, synced and removed again.
    fn probe_space(&self) -> Result<(), StoreError> {
        let probe = self.path.with_file_name(PROBE_FILE);
        let written = std::fs::File::create(&probe).and_then(|mut file| {
            std::io::Write::write_all(&mut file, &vec![0u8; PROBE_BYTES])?;
            file.sync_all()
        });
        let removed = std::fs::remove_file(&probe);
        let describe = |e: std::io::Error| {
            let message = format!("probing for free space with {}: {e}", probe.display());
            if io_is_no_space(&e) {
                StoreError::no_space(message)
            } else {
                StoreError::new(message)
            }
        };
        written.map_err(describe)?;
        removed.map_err(describe)
    }

    /// Closes the poisoned database and opens the file again (redb repairs it, as after a
    /// crash), which also commits durably: the proof that writes work again.
    fn reopen(&mut self) -> Result<(), StoreError> {
        // The file is locked while open, so the old handle must go before the new one;
        // an empty in-memory database stands in meanwhile (and stays if opening fails).
        let placeholder = Builder::new()
            .create_with_backend(redb::backends::InMemoryBackend::new())
            .or_store("opening a placeholder")?;
        drop(std::mem::replace(&mut self.db, placeholder));
        self.db = open_database(&self.path).map_err(|e| match e {
            OpenError::Other(error) => error,
            OpenError::Corrupt(reason) => {
                StoreError::new(format!("reopening {}: {reason}", self.path.display()))
            }
        })?;
        Ok(())
    }

    /// Scans the committed data through a read transaction, catching the panics redb raises
    /// on some damaged pages.
    fn scan_committed(
        &self,
        report: &mut LoadReport,
        doomed: &mut Vec<Doomed>,
    ) -> Result<LoadedState, ScanFailure> {
        let attempt = catch_unwind(AssertUnwindSafe(|| -> Result<LoadedState, redb::Error> {
            let txn = self.db.begin_read()?;
            let sessions = txn.open_table(SESSIONS)?;
            let subscriptions = txn.open_table(SUBSCRIPTIONS)?;
            let qos2 = txn.open_table(INBOUND_QOS2)?;
            let deliveries = txn.open_table(DELIVERIES)?;
            let retained = txn.open_table(RETAINED)?;
            let tables = (&sessions, &subscriptions, &qos2, &deliveries, &retained);
            let mut state = scan(tables, report, doomed)?;
            (state.outboxes, state.peer_marks) = scan_links(
                &txn.open_table(FORWARDS)?,
                &txn.open_table(FORWARDS_ACKED)?,
                &txn.open_table(PEER_MARKS)?,
            )?;
            state.relays = scan_relays(&txn.open_table(RELAYS)?, report, doomed)?;
            Ok(state)
        }));
        match attempt {
            Ok(Ok(state)) => Ok(state),
            Ok(Err(e)) if is_corruption(&e) => Err(ScanFailure::Damaged(e.to_string())),
            Ok(Err(e)) => Err(ScanFailure::Failed(failed("loading")(e))),
            Err(panic) => Err(ScanFailure::Damaged(format!(
                "redb panicked reading the data file: {}",
                panic_message(&*panic)
            ))),
        }
    }

    /// Moves a file whose pages are damaged aside and continues on a new file holding every
    /// record that could still be read from it.
    fn salvage(&mut self, reason: &str) -> Result<(), StoreError> {
        let dir = self.path.parent().unwrap_or(Path::new("."));
        let aside = set_aside_path(dir);
        std::fs::rename(&self.path, &aside).map_err(|e| {
            StoreError::new(format!(
                "{} is damaged ({reason}) and could not be moved aside: {e}",
                self.path.display()
            ))
        })?;
        error!(
            file = %self.path.display(),
            moved_to = %aside.display(),
            %reason,
            "data file is damaged; it was moved aside and every readable record is copied to a \
             new file"
        );
        let fresh = open_database(&self.path).map_err(|e| match e {
            OpenError::Corrupt(reason)
            | OpenError::Other(StoreError {
                message: reason, ..
            }) => StoreError::new(format!("creating a new {}: {reason}", self.path.display())),
        })?;
        let damaged = std::mem::replace(&mut self.db, fresh);
        self.txn = None;
        self.unsynced = 0;
        let copied = self.copy_from(&damaged);
        // Dropping the damaged database writes to it and may panic as well.
        if catch_unwind(AssertUnwindSafe(move || drop(damaged))).is_err() {
            warn!(file = %aside.display(), "closing the damaged data file failed");
        }
        copied?;
        self.set_aside = Some(aside);
        Ok(())
    }

    fn copy_from(&self, damaged: &Database) -> Result<(), StoreError> {
        copy_all(damaged, &self.db)
    }

    fn durable_due(&self, now: Instant) -> bool {
        let too_many = self.unsynced >= MAX_NON_DURABLE_COMMITS;
        match self.policy {
            FsyncPolicy::Always => true,
            FsyncPolicy::Interval(interval) => {
                too_many || now.saturating_duration_since(self.last_durable) >= interval
            }
            FsyncPolicy::Never => too_many,
        }
    }
}

impl Drop for RedbStore {
    fn drop(&mut self) {
        if let Err(e) = self.shut_down() {
            error!(error = %e, "closing the store failed: recent commits may not be durable");
        }
    }
}

impl Store for RedbStore {
    /// Reads everything back. Records that do not decode, and records of a session whose
    /// session record is missing, are logged with their keys, skipped and removed (committed at
    /// once unless the caller has a batch open, which then carries the removal). If the file's
    /// structure turns out to be damaged, it is moved aside and every readable record is
    /// copied to a new file, logging the key ranges lost; then loading proceeds from that.
    fn load(&mut self) -> Result<LoadedState, StoreError> {
        let mut report = LoadReport::default();
        let mut doomed = Vec::new();
        let state = match &self.txn {
            // The open batch must be seen, so read through it (no salvage: it holds writes).
            Some(txn) => {
                let mut scanned = || -> Result<LoadedState, redb::Error> {
                    let sessions = txn.open_table(SESSIONS)?;
                    let subscriptions = txn.open_table(SUBSCRIPTIONS)?;
                    let qos2 = txn.open_table(INBOUND_QOS2)?;
                    let deliveries = txn.open_table(DELIVERIES)?;
                    let retained = txn.open_table(RETAINED)?;
                    let tables = (&sessions, &subscriptions, &qos2, &deliveries, &retained);
                    let mut state = scan(tables, &mut report, &mut doomed)?;
                    (state.outboxes, state.peer_marks) = scan_links(
                        &txn.open_table(FORWARDS)?,
                        &txn.open_table(FORWARDS_ACKED)?,
                        &txn.open_table(PEER_MARKS)?,
                    )?;
                    state.relays = scan_relays(&txn.open_table(RELAYS)?, &mut report, &mut doomed)?;
                    Ok(state)
                };
                scanned().or_store("loading")?
            }
            None => match self.scan_committed(&mut report, &mut doomed) {
                Ok(state) => state,
                Err(ScanFailure::Failed(e)) => return Err(e),
                Err(ScanFailure::Damaged(reason)) if self.on_corruption == OnCorruption::Refuse => {
                    return Err(refused(&self.path, &reason));
                }
                Err(ScanFailure::Damaged(reason)) => {
                    self.salvage(&reason)?;
                    report = LoadReport::default();
                    doomed.clear();
                    match self.scan_committed(&mut report, &mut doomed) {
                        Ok(state) => state,
                        Err(ScanFailure::Failed(e)) => return Err(e),
                        Err(ScanFailure::Damaged(reason)) => {
                            return Err(StoreError::new(format!("loading salvaged data: {reason}")))
                        }
                    }
                }
            },
        };
        if report.corrupt > 0 && self.on_corruption == OnCorruption::Refuse {
            let reason = format!("{} damaged records (each logged above)", report.corrupt);
            return Err(refused(&self.path, &reason));
        }
        if !doomed.is_empty() {
            let own_batch = self.txn.is_none();
            self.write("removing damaged records", |txn| {
                remove_doomed(txn, &doomed)
            });
            if own_batch {
                self.commit()?;
            }
        }
        if report.corrupt > 0 || report.orphaned > 0 || self.set_aside.is_some() {
            warn!("store loaded with losses: {report}");
        } else {
            info!("store loaded: {report}");
        }
        self.last_load = Some(report);
        Ok(state)
    }

    fn put_session(&mut self, record: &SessionRecord) {
        if self.out_of_space {
            return self.defer(DeferredWrite::PutSession(Box::new(record.clone())));
        }
        const CONTEXT: &str = "writing a session";
        match encode_session(record) {
            Ok(value) => self.write(CONTEXT, |txn| {
                let mut table = txn.open_table(SESSIONS)?;
                table.insert(record.client_id.as_str(), value.as_slice())?;
                Ok(())
            }),
            Err(e) => self.fail(CONTEXT, e),
        }
    }

    fn delete_session(&mut self, client_id: &str) {
        if self.out_of_space {
            return self.defer(DeferredWrite::DeleteSession(client_id.to_owned()));
        }
        self.write("deleting a session", |txn| {
            txn.open_table(SESSIONS)?.remove(client_id)?;
            let mut subscriptions = txn.open_table(SUBSCRIPTIONS)?;
            let mut filters = Vec::new();
            for entry in subscriptions.range((client_id, "")..)? {
                let (key, _) = entry?;
                let (client, filter) = key.value();
                if client != client_id {
                    break;
                }
                filters.push(filter.to_owned());
            }
            for filter in &filters {
                subscriptions.remove((client_id, filter.as_str()))?;
            }
            txn.open_table(INBOUND_QOS2)?
                .retain_in((client_id, 0)..=(client_id, u16::MAX), |_, _| false)?;
            txn.open_table(DELIVERIES)?
                .retain_in((client_id, 0)..=(client_id, u64::MAX), |_, _| false)?;
            Ok(())
        });
    }

    fn put_subscription(&mut self, client_id: &str, filter: &str, entry: &SubscriptionEntry) {
        if self.out_of_space {
            return self.defer(DeferredWrite::PutSubscription(
                client_id.to_owned(),
                filter.to_owned(),
                *entry,
            ));
        }
        let value = encode_subscription(client_id, filter, entry);
        self.write("writing a subscription", |txn| {
            let mut table = txn.open_table(SUBSCRIPTIONS)?;
            table.insert((client_id, filter), value.as_slice())?;
            Ok(())
        });
    }

    fn delete_subscription(&mut self, client_id: &str, filter: &str) {
        if self.out_of_space {
            return self.defer(DeferredWrite::DeleteSubscription(
                client_id.to_owned(),
                filter.to_owned(),
            ));
        }
        self.write("deleting a subscription", |txn| {
            txn.open_table(SUBSCRIPTIONS)?.remove((client_id, filter))?;
            Ok(())
        });
    }

    fn put_inbound_qos2(&mut self, client_id: &str, packet_id: u16) {
        if self.out_of_space {
            return self.defer(DeferredWrite::PutInboundQos2(
                client_id.to_owned(),
                packet_id,
            ));
        }
        self.write("writing an inbound QoS 2 id", |txn| {
            txn.open_table(INBOUND_QOS2)?
                .insert((client_id, packet_id), ())?;
            Ok(())
        });
    }

    fn delete_inbound_qos2(&mut self, client_id: &str, packet_id: u16) {
        if self.out_of_space {
            return self.defer(DeferredWrite::DeleteInboundQos2(
                client_id.to_owned(),
                packet_id,
            ));
        }
        self.write("deleting an inbound QoS 2 id", |txn| {
            txn.open_table(INBOUND_QOS2)?
                .remove((client_id, packet_id))?;
            Ok(())
        });
    }

    fn put_delivery(
        &mut self,
        client_id: &str,
        seq: u64,
        delivery: &StoredDelivery,
        state: DeliveryState,
    ) {
        const CONTEXT: &str = "writing a delivery";
        if self.out_of_space {
            return self.defer(DeferredWrite::PutDelivery(
                client_id.to_owned(),
                seq,
                Box::new(delivery.clone()),
                state,
            ));
        }
        match encode_delivery(client_id, seq, delivery, state) {
            Ok(value) => self.write(CONTEXT, |txn| {
                let mut table = txn.open_table(DELIVERIES)?;
                table.insert((client_id, seq), value.as_slice())?;
                Ok(())
            }),
            Err(e) => self.fail(CONTEXT, e),
        }
    }

    fn set_delivery_state(&mut self, client_id: &str, seq: u64, state: DeliveryState) {
        if self.out_of_space {
            return self.defer(DeferredWrite::SetDeliveryState(
                client_id.to_owned(),
                seq,
                state,
            ));
        }
        self.write("updating a delivery", |txn| {
            let mut table = txn.open_table(DELIVERIES)?;
            let patched = match table.get((client_id, seq))? {
                None => return Ok(()),
                Some(value) => patch_delivery_state(client_id, seq, value.value(), state),
            };
            match patched {
                Ok(value) => {
                    table.insert((client_id, seq), value.as_slice())?;
                }
                Err(e) => {
                    error!(client = %client_id, seq, error = %e, "removing undecodable delivery: the message is lost");
                    table.remove((client_id, seq))?;
                }
            }
            Ok(())
        });
    }

    fn delete_delivery(&mut self, client_id: &str, seq: u64) {
        if self.out_of_space {
            return self.defer(DeferredWrite::DeleteDelivery(client_id.to_owned(), seq));
        }
        self.write("deleting a delivery", |txn| {
            txn.open_table(DELIVERIES)?.remove((client_id, seq))?;
            Ok(())
        });
    }

    fn read_pending(
        &mut self,
        client_id: &str,
        from: u64,
        limit: usize,
    ) -> Result<Vec<(u64, StoredDelivery)>, StoreError> {
        const CONTEXT: &str = "reading a queue";
        if self.out_of_space {
            return Err(Self::no_space_error());
        }
        let mut bad = Vec::new();
        let mut read = || -> Result<_, redb::Error> {
            match &self.txn {
                Some(txn) => {
                    let table = txn.open_table(DELIVERIES)?;
                    scan_pending(&table, client_id, from, limit, &mut bad)
                }
                None => {
                    let txn = self.db.begin_read()?;
                    let table = txn.open_table(DELIVERIES)?;
                    scan_pending(&table, client_id, from, limit, &mut bad)
                }
            }
        };
        let out = read().map_err(|e| {
            error!(client = %client_id, from, error = %e, "{CONTEXT} failed; its messages stay queued on disk and are read again later");
            failed(CONTEXT)(e)
        })?;
        if !bad.is_empty() {
            self.write("removing undecodable deliveries", |txn| {
                let mut table = txn.open_table(DELIVERIES)?;
                for seq in &bad {
                    table.remove((client_id, *seq))?;
                }
                Ok(())
            });
        }
        Ok(out)
    }

    fn put_retained(&mut self, message: &StoredMessage) {
        if self.out_of_space {
            return self.defer(DeferredWrite::PutRetained(Box::new(message.clone())));
        }
        const CONTEXT: &str = "writing a retained message";
        let key = retained_key(&message.topic);
        match encode_retained(&key, message) {
            Ok(value) => self.write(CONTEXT, |txn| {
                let mut table = txn.open_table(RETAINED)?;
                table.insert(key.as_str(), value.as_slice())?;
                Ok(())
            }),
            Err(e) => self.fail(CONTEXT, e),
        }
    }

    fn delete_retained(&mut self, topic: &str) {
        if self.out_of_space {
            return self.defer(DeferredWrite::DeleteRetained(topic.to_owned()));
        }
        self.write("deleting a retained message", |txn| {
            txn.open_table(RETAINED)?
                .remove(retained_key(topic).as_str())?;
            Ok(())
        });
    }

    fn read_retained(
        &mut self,
        filter: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<RetainedPage<StoredMessage>, StoreError> {
        const CONTEXT: &str = "reading retained messages";
        if self.out_of_space {
            return Err(Self::no_space_error());
        }
        let mut bad = Vec::new();
        let page = match &self.txn {
            Some(txn) => {
                let table = txn.open_table(RETAINED).or_store(CONTEXT)?;
                scan_retained(&table, filter, after, limit, &mut bad)
            }
            None => {
                let txn = self.db.begin_read().or_store(CONTEXT)?;
                let table = txn.open_table(RETAINED).or_store(CONTEXT)?;
                scan_retained(&table, filter, after, limit, &mut bad)
            }
        }
        .or_store(CONTEXT)?;
        if !bad.is_empty() {
            self.write("removing undecodable retained messages", |txn| {
                let mut table = txn.open_table(RETAINED)?;
                for key in &bad {
                    table.remove(key.as_str())?;
                }
                Ok(())
            });
        }
        Ok(page)
    }

    fn retained_len(&self) -> usize {
        let len = match &self.txn {
            Some(txn) => txn.open_table(RETAINED).ok().and_then(|t| t.len().ok()),
            None => self
                .db
                .begin_read()
                .ok()
                .and_then(|txn| txn.open_table(RETAINED).ok())
                .and_then(|t| t.len().ok()),
        };
        usize::try_from(len.unwrap_or(0)).unwrap_or(usize::MAX)
    }

    /// Commits the open batch: durably, or not, per the [`FsyncPolicy`]. With nothing written
    /// it still makes earlier non-durable commits durable when the policy says it is time.
    /// After an error the batch is discarded.
    fn put_forward(&mut self, dest: NodeId, seq: u64, forward: &StoredForward) {
        if self.out_of_space {
            let forward = Box::new(forward.clone());
            return self.defer(DeferredWrite::PutForward(dest, seq, forward));
        }
        const CONTEXT: &str = "writing a forward";
        match encode_forward(dest, seq, forward) {
            Ok(value) => self.write(CONTEXT, |txn| {
                txn.open_table(FORWARDS)?
                    .insert((dest, seq), value.as_slice())?;
                Ok(())
            }),
            Err(e) => self.fail(CONTEXT, e),
        }
    }

    fn ack_forwards(&mut self, dest: NodeId, through: u64) {
        if self.out_of_space {
            return self.defer(DeferredWrite::AckForwards(dest, through));
        }
        self.write("removing acknowledged forwards", |txn| {
            txn.open_table(FORWARDS)?
                .retain_in((dest, 0)..=(dest, through), |_, _| false)?;
            let mut acked = txn.open_table(FORWARDS_ACKED)?;
            let previous = acked.get(dest)?.map_or(0, |seq| seq.value());
            if through > previous {
                acked.insert(dest, through)?;
            }
            Ok(())
        });
    }

    fn read_forwards(
        &mut self,
        dest: NodeId,
        after: u64,
        limit: usize,
    ) -> Result<Vec<(u64, StoredForward)>, StoreError> {
        const CONTEXT: &str = "reading an outbox";
        if self.out_of_space {
            return Err(Self::no_space_error());
        }
        let mut bad = Vec::new();
        let mut read = || -> Result<_, redb::Error> {
            match &self.txn {
                Some(txn) => {
                    let table = txn.open_table(FORWARDS)?;
                    scan_forwards(&table, dest, after, limit, &mut bad)
                }
                None => {
                    let txn = self.db.begin_read()?;
                    let table = txn.open_table(FORWARDS)?;
                    scan_forwards(&table, dest, after, limit, &mut bad)
                }
            }
        };
        let out = read().map_err(|e| {
            error!(dest, after, error = %e, "{CONTEXT} failed; its forwards stay on disk and are read again later");
            failed(CONTEXT)(e)
        })?;
        if !bad.is_empty() {
            self.write("removing undecodable forwards", |txn| {
                let mut table = txn.open_table(FORWARDS)?;
                for seq in &bad {
                    table.remove((dest, *seq))?;
                }
                Ok(())
            });
        }
        Ok(out)
    }

    fn put_peer_mark(&mut self, mark: &PeerMark) {
        if self.out_of_space {
            return self.defer(DeferredWrite::PutPeerMark(*mark));
        }
        self.write("writing a peer mark", |txn| {
            txn.open_table(PEER_MARKS)?
                .insert(mark.origin, (mark.incarnation, mark.seq))?;
            Ok(())
        });
    }

    fn put_relay(&mut self, relay: &StoredRelay) {
        if self.out_of_space {
            return self.defer(DeferredWrite::PutRelay(Box::new(relay.clone())));
        }
        let value = encode_relay(relay);
        self.write("writing a relay", |txn| {
            txn.open_table(RELAYS)?
                .insert((relay.client_id.as_str(), relay.to), value.as_slice())?;
            Ok(())
        });
    }

    fn delete_relay(&mut self, client_id: &str, to: u64) {
        if self.out_of_space {
            return self.defer(DeferredWrite::DeleteRelay(client_id.to_owned(), to));
        }
        self.write("removing a relay", |txn| {
            txn.open_table(RELAYS)?.remove((client_id, to))?;
            Ok(())
        });
    }

    fn commit(&mut self) -> Result<(), StoreError> {
        if let Some(e) = self.failure.take() {
            self.txn = None;
            return Err(e);
        }
        if self.out_of_space {
            return Err(Self::no_space_error());
        }
        let now = Instant::now();
        let durable = self.durable_due(now);
        let mut txn = match self.txn.take() {
            Some(txn) => txn,
            None if self.unsynced > 0 && durable => self.db.begin_write().or_store("committing")?,
            None => return Ok(()),
        };
        txn.set_durability(if durable {
            Durability::Immediate
        } else {
            Durability::None
        });
        if let Err(e) = txn.commit().or_store("committing") {
            self.out_of_space |= e.is_no_space();
            return Err(e);
        }
        if durable {
            self.last_durable = now;
            self.unsynced = 0;
        } else {
            self.unsynced += 1;
        }
        Ok(())
    }

    fn commit_may_block(&self) -> bool {
        // Nothing written and nothing left to make durable, or out of space: `commit`
        // returns at once.
        !self.out_of_space && (self.txn.is_some() || self.unsynced > 0 || self.failure.is_some())
    }

    /// Checks that [`PROBE_BYTES`] fit on the file system, reopens the database and commits
    /// the writes made meanwhile. Commits made with `fsync = "interval"` or `"never"` that
    /// were not yet durable are lost with the old handle, as in a crash; so are the writes of
    /// the batch whose commit failed (the broker acknowledged none of them).
    fn probe(&mut self) -> Result<(), StoreError> {
        if !self.out_of_space {
            return self.commit();
        }
        self.probe_space()?;
        self.reopen()?;
        self.out_of_space = false;
        self.failure = None;
        self.unsynced = 0;
        self.last_durable = Instant::now();
        let deferred = std::mem::take(&mut self.deferred);
        deferred.apply(self);
        if let Err(error) = self.commit() {
            // Kept for the next probe (what `apply` deferred again is in it already).
            self.deferred = deferred;
            return Err(error);
        }
        info!(
            writes = deferred.len(),
            "store writable again: the writes made while it was full are committed"
        );
        if deferred.dropped > 0 {
            error!(
                lost = deferred.dropped,
                "writes made while the disk was full did not fit in memory and were not kept: \
                 after a restart the store may lack recent subscriptions or session changes, and \
                 deliver some acknowledged messages again"
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store(policy: FsyncPolicy) -> (tempfile::TempDir, RedbStore) {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = RedbStore::open(dir.path(), policy).expect("open");
        (dir, store)
    }

    fn record(client_id: &str) -> SessionRecord {
        SessionRecord {
            client_id: client_id.to_owned(),
            epoch: 1,
            held_since: 1,
            routes_from: 0,
            expiry_interval: 10,
            expires_at: None,
            delayed_will: None,
        }
    }

    #[test]
    fn always_leaves_nothing_unsynced() {
        let (_dir, mut store) = store(FsyncPolicy::Always);
        store.put_session(&record("a"));
        store.commit().expect("commit");
        assert_eq!(store.unsynced, 0);
    }

    #[test]
    fn interval_syncs_when_due_even_without_new_writes() {
        let (_dir, mut store) = store(FsyncPolicy::Interval(Duration::from_secs(3600)));
        store.put_session(&record("a"));
        store.commit().expect("commit");
        assert_eq!(store.unsynced, 1, "not due yet: a non-durable commit");
        store.commit().expect("idle commit");
        assert_eq!(store.unsynced, 1);
        store.last_durable -= Duration::from_secs(3600);
        store.commit().expect("idle commit, now due");
        assert_eq!(store.unsynced, 0);
        assert!(store.txn.is_none());
    }

    #[test]
    fn never_syncs_only_to_bound_growth_and_on_close() {
        let (dir, mut store) = store(FsyncPolicy::Never);
        for seq in 0..2 * u64::from(MAX_NON_DURABLE_COMMITS) {
            store.put_session(&record("a"));
            store.delete_delivery("a", seq);
            store.commit().expect("commit");
            assert!(store.unsynced <= MAX_NON_DURABLE_COMMITS);
        }
        assert!(store.unsynced > 0);
        // Without the bound this file would be ~27 MiB.
        let len = std::fs::metadata(dir.path().join(FILE_NAME))
            .expect("stat")
            .len();
        assert!(len < 20 << 20, "file grew to {len} bytes");
        store.close().expect("close makes it durable");
    }

    #[test]
    fn set_aside_names_never_collide() {
        let dir = tempfile::tempdir().expect("temp dir");
        let first = set_aside_path(dir.path());
        std::fs::write(&first, b"x").expect("write");
        let second = set_aside_path(dir.path());
        assert_ne!(first, second);
        assert!(second
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with("halyard.redb.corrupt-")));
    }
}
