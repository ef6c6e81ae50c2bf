//! A damaged data file or record never stops start-up: the file is set aside (or the record
//! skipped and removed), the loss is logged, and the store keeps working.

mod common;

use std::fs;
use std::path::Path;

use common::{delivery, message, session, subscription, temp_dir};
use halyard_codec::QoS;
use halyard_core::store::{DeliveryState, Store};
use halyard_store::{FsyncPolicy, LoadReport, OnCorruption, RedbStore, FILE_NAME};
use redb::{ReadableTable, TableDefinition};

const SESSIONS: TableDefinition<&str, &[u8]> = TableDefinition::new("sessions");
const SUBSCRIPTIONS: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("subscriptions");
const DELIVERIES: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("deliveries");
const RETAINED: TableDefinition<&str, &[u8]> = TableDefinition::new("retained_levels");
/// The retained table of earlier versions, keyed by topic.
const LEGACY_RETAINED: TableDefinition<&str, &[u8]> = TableDefinition::new("retained");

/// Deterministic bytes that look nothing like a redb file.
fn garbage(len: usize) -> Vec<u8> {
    let mut x: u32 = 0x9E37_79B9;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

/// Writes a store with `n` pending deliveries for "c" and closes it.
fn populated(dir: &Path, n: u64) {
    let mut store = RedbStore::open(dir, FsyncPolicy::Always).expect("open");
    store.put_session(&session("c"));
    store.put_subscription("c", "f", &subscription(QoS::AtLeastOnce, None));
    for seq in 0..n {
        let d = delivery(message("t", &[7u8; 64]), QoS::AtLeastOnce);
        store.put_delivery("c", seq, &d, DeliveryState::Pending);
    }
    store.put_retained(&message("r", b"kept"));
    store.commit().expect("commit");
    store.close().expect("close");
}

/// The store works: a write survives a reopen.
fn assert_usable(dir: &Path) {
    let mut store = RedbStore::open(dir, FsyncPolicy::Always).expect("reopen");
    store.load().expect("load");
    store.put_session(&session("after"));
    store.commit().expect("commit");
    drop(store);
    let mut store = RedbStore::open(dir, FsyncPolicy::Always).expect("reopen");
    let state = store.load().expect("load");
    assert!(state.sessions.iter().any(|s| s.record.client_id == "after"));
}

fn set_aside_files(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .expect("read dir")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with(&format!("{FILE_NAME}.corrupt-")))
        .collect();
    names.sort();
    names
}

#[test]
fn garbage_file_is_set_aside_and_the_store_starts_empty() {
    let dir = temp_dir();
    let bytes = garbage(100_000);
    fs::write(dir.path().join(FILE_NAME), &bytes).expect("write");

    let mut store = RedbStore::open(dir.path(), FsyncPolicy::Always).expect("starts");
    let aside = store.set_aside_file().expect("file set aside").to_owned();
    assert_eq!(fs::read(&aside).expect("set-aside file kept"), bytes);
    let state = store.load().expect("load");
    assert!(state.sessions.is_empty() && store.retained_len() == 0);
    drop(store);
    assert_usable(dir.path());

    // A second damaged file in the same second gets its own name.
    fs::write(dir.path().join(FILE_NAME), garbage(5000)).expect("write");
    let store = RedbStore::open(dir.path(), FsyncPolicy::Always).expect("starts");
    assert!(store.set_aside_file().is_some());
    drop(store);
    assert_eq!(set_aside_files(dir.path()).len(), 2);
}

#[test]
fn damaged_header_is_set_aside() {
    let dir = temp_dir();
    populated(dir.path(), 10);
    let path = dir.path().join(FILE_NAME);
    let mut bytes = fs::read(&path).expect("read");
    bytes[..512].fill(0xAB);
    fs::write(&path, &bytes).expect("write");

    let store = RedbStore::open(dir.path(), FsyncPolicy::Always).expect("starts");
    assert!(store.set_aside_file().is_some_and(Path::exists));
    drop(store);
    assert_usable(dir.path());
}

#[test]
fn truncated_file_never_stops_start_up() {
    let dir = temp_dir();
    populated(dir.path(), 2000);
    let path = dir.path().join(FILE_NAME);
    let len = fs::metadata(&path).expect("stat").len();
    for keep in [len / 2, 4096, 1000, 10] {
        let file = fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .expect("open file");
        file.set_len(keep).expect("truncate");
        drop(file);
        let mut store = RedbStore::open(dir.path(), FsyncPolicy::Always).expect("starts");
        // Whether redb repaired what was left or the file was set aside, load works.
        store.load().expect("load");
        drop(store);
        assert_usable(dir.path());
        populated(dir.path(), 2000);
    }
}

#[test]
fn zero_length_file_is_a_new_database() {
    let dir = temp_dir();
    fs::write(dir.path().join(FILE_NAME), b"").expect("write");
    let store = RedbStore::open(dir.path(), FsyncPolicy::Always).expect("starts");
    assert!(store.set_aside_file().is_none());
    drop(store);
    assert!(set_aside_files(dir.path()).is_empty());
}

#[test]
fn a_file_in_use_is_an_error_not_corruption() {
    let dir = temp_dir();
    let _first = RedbStore::open(dir.path(), FsyncPolicy::Always).expect("open");
    let second = RedbStore::open(dir.path(), FsyncPolicy::Always);
    assert!(second.is_err());
    assert!(set_aside_files(dir.path()).is_empty());
}

#[test]
fn undecodable_records_are_skipped_logged_and_removed() {
    let dir = temp_dir();
    populated(dir.path(), 5);
    {
        let mut store = RedbStore::open(dir.path(), FsyncPolicy::Always).expect("open");
        store.put_session(&session("other"));
        store.put_delivery(
            "c",
            10,
            &delivery(message("t", b"in flight"), QoS::AtLeastOnce),
            DeliveryState::AwaitingAck(4),
        );
        store.commit().expect("commit");
    }
    // Damage records behind the store's back, as a bit flip or a buggy release would.
    {
        let db = redb::Database::create(dir.path().join(FILE_NAME)).expect("raw open");
        let txn = db.begin_write().expect("txn");
        {
            let mut sessions = txn.open_table(SESSIONS).expect("table");
            sessions.insert("other", &b"\x01\x00"[..]).expect("insert");
            let mut subs = txn.open_table(SUBSCRIPTIONS).expect("table");
            subs.insert(("c", "bad"), &b"\x09garbage"[..])
                .expect("insert");
            let mut deliveries = txn.open_table(DELIVERIES).expect("table");
            // An in-flight delivery whose message is cut short: found by load.
            deliveries
                .insert(("c", 11), &b"\x01\x01\x00\x05\x01\x00\x00\x00\x00\x00"[..])
                .expect("insert");
            // A pending one with a garbage body: load only counts it; read_pending finds it.
            deliveries
                .insert(("c", 2), &b"\x01\x00\x00\x00garbage"[..])
                .expect("insert");
            let mut retained = txn.open_table(RETAINED).expect("table");
            retained.insert("r2", &b"\x01"[..]).expect("insert");
        }
        txn.commit().expect("commit");
    }

    let mut store = RedbStore::open(dir.path(), FsyncPolicy::Always).expect("open");
    let state = store.load().expect("load");
    let report = store.last_load_report().expect("report").clone();
    assert_eq!(
        report,
        LoadReport {
            sessions: 1,
            subscriptions: 1,
            inbound_qos2: 0,
            inflight: 1,
            pending: 5,
            // Counted, not read: the damaged one is found when a page is read.
            retained: 2,
            corrupt: 3,
            orphaned: 0,
        }
    );
    let c = &state.sessions[0];
    assert_eq!(c.record.client_id, "c");
    assert_eq!(c.subscriptions.len(), 1);
    assert_eq!(c.inflight.len(), 1);
    assert_eq!(
        (c.first_pending, c.pending_count, c.next_seq),
        (Some(0), 5, 12)
    );
    let page = store.read_retained("#", None, 10).expect("read");
    assert_eq!(page.messages.len(), 1);
    assert_eq!(store.retained_len(), 1, "the undecodable one is removed");

    // The damaged pending delivery is skipped when its page is read.
    let pending = store.read_pending("c", 0, 10).expect("read");
    assert_eq!(
        pending.iter().map(|(seq, _)| *seq).collect::<Vec<_>>(),
        vec![0, 1, 3, 4]
    );
    store.commit().expect("commit");
    drop(store);

    // Everything damaged was removed, so the next start-up is clean.
    let mut store = RedbStore::open(dir.path(), FsyncPolicy::Always).expect("open");
    store.load().expect("load");
    let report = store.last_load_report().expect("report");
    assert_eq!((report.corrupt, report.pending), (0, 4));
}

#[test]
fn orphaned_records_are_removed_at_load() {
    let dir = temp_dir();
    let mut store = RedbStore::open(dir.path(), FsyncPolicy::Always).expect("open");
    store.put_subscription("ghost", "f", &subscription(QoS::AtLeastOnce, None));
    store.put_inbound_qos2("ghost", 3);
    for seq in 0..3 {
        let d = delivery(message("t", b"x"), QoS::AtLeastOnce);
        store.put_delivery("ghost", seq, &d, DeliveryState::Pending);
    }
    store.commit().expect("commit");
    store.load().expect("load");
    assert_eq!(store.last_load_report().expect("report").orphaned, 5);
    drop(store);
    let mut store = RedbStore::open(dir.path(), FsyncPolicy::Always).expect("open");
    store.load().expect("load");
    assert_eq!(store.last_load_report().expect("report").orphaned, 0);
}

#[test]
fn a_write_that_cannot_be_encoded_fails_the_commit_and_its_batch() {
    let dir = temp_dir();
    let mut store = RedbStore::open(dir.path(), FsyncPolicy::Always).expect("open");
    store.put_session(&session("lost"));
    // Longer than an MQTT string can be.
    store.put_retained(&message(&"t".repeat(70_000), b"x"));
    assert!(store.commit().is_err());
    // The failed batch is gone; the store goes on.
    store.put_session(&session("kept"));
    store.commit().expect("commit");
    drop(store);
    let mut store = RedbStore::open(dir.path(), FsyncPolicy::Always).expect("open");
    let state = store.load().expect("load");
    let clients: Vec<_> = state
        .sessions
        .iter()
        .map(|s| s.record.client_id.as_str())
        .collect();
    assert_eq!(clients, vec!["kept"]);
}

#[test]
fn damaged_pages_are_salvaged_or_skipped() {
    let dir = temp_dir();
    let path = dir.path().join(FILE_NAME);
    {
        let mut store = RedbStore::open(dir.path(), FsyncPolicy::Always).expect("open");
        store.put_session(&session("c"));
        for seq in 0..3000u64 {
            let d = delivery(message("t", &[7u8; 64]), QoS::AtLeastOnce);
            let state = if seq % 3 == 0 {
                DeliveryState::AwaitingAck(1)
            } else {
                DeliveryState::Pending
            };
            store.put_delivery("c", seq, &d, state);
        }
        store.commit().expect("commit");
    }
    let original = fs::read(&path).expect("read");
    let mut rng = 12345u64;
    let mut salvaged = 0;
    for _ in 0..40 {
        // Flip 20 random bytes past the header: some hit values (skipped as undecodable),
        // some hit B-tree pages (redb errors or panics: the file is salvaged).
        let mut bytes = original.clone();
        for _ in 0..20 {
            rng = rng
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            let offset = 4096 + (rng >> 33) as usize % (bytes.len() - 4096);
            bytes[offset] ^= 0xFF;
        }
        fs::write(&path, &bytes).expect("write");
        let mut store = RedbStore::open(dir.path(), FsyncPolicy::Always).expect("starts");
        let state = store.load().expect("load never fails on damage");
        let report = store.last_load_report().expect("report");
        // Each flip loses at most one leaf's worth of records.
        assert!(report.inflight as u64 + report.pending >= 2900, "{report}");
        let pending = store.read_pending("c", 0, 5000).expect("read");
        assert!(pending.len() >= 1900);
        assert_eq!(state.sessions.len(), 1);
        if let Some(aside) = store.set_aside_file() {
            assert!(aside.exists());
            salvaged += 1;
        }
        store.commit().expect("commit");
    }
    assert!(salvaged > 0, "no run exercised the salvage path");
}

#[test]
fn retained_messages_of_the_topic_keyed_table_are_moved_at_open() {
    // The encoding of a retained message, as the current version writes it.
    let source = temp_dir();
    let mut store = RedbStore::open(source.path(), FsyncPolicy::Always).expect("open");
    store.put_retained(&message("a/b", b"old"));
    store.commit().expect("commit");
    store.close().expect("close");
    let encoded = {
        let db = redb::Database::open(source.path().join(FILE_NAME)).expect("open raw");
        let txn = db.begin_read().expect("txn");
        let table = txn.open_table(RETAINED).expect("table");
        let value = table
            .get("a\0b")
            .expect("get")
            .expect("stored by level key");
        value.value().to_vec()
    };

    // A file of an earlier version keeps it in the topic-keyed table.
    let dir = temp_dir();
    drop(RedbStore::open(dir.path(), FsyncPolicy::Always).expect("create"));
    {
        let db = redb::Database::open(dir.path().join(FILE_NAME)).expect("open raw");
        let txn = db.begin_write().expect("txn");
        txn.open_table(LEGACY_RETAINED)
            .expect("table")
            .insert("a/b", encoded.as_slice())
            .expect("insert");
        txn.commit().expect("commit");
    }
    let mut store = RedbStore::open(dir.path(), FsyncPolicy::Always).expect("reopen");
    store.load().expect("load");
    assert_eq!(store.retained_len(), 1);
    let page = store.read_retained("a/+", None, 10).expect("read");
    assert_eq!(page.messages[0].payload.as_ref(), b"old");
}

/// Client whose queue the damage tests read back.
const QUEUE_OWNER: &str = "c3";
const SESSIONS_WRITTEN: usize = 20;
const RETAINED_WRITTEN: usize = 200;
const QUEUED_WRITTEN: u64 = 2000;

fn queued_payload(seq: u64) -> Vec<u8> {
    format!("queued message {seq:>6} {}", "q".repeat(40)).into_bytes()
}

fn retained_payload(n: usize) -> Vec<u8> {
    format!("retained message {n:>4} {}", "r".repeat(40)).into_bytes()
}

/// Sessions with subscriptions and retained messages in a first commit, then a long queue
/// over many commits, as a broker writes them; then closed cleanly.
fn populated_broker_file(dir: &Path) {
    let mut store = RedbStore::open(dir, FsyncPolicy::Always).expect("open");
    for c in 0..SESSIONS_WRITTEN {
        let client = format!("c{c}");
        store.put_session(&session(&client));
        store.put_subscription(&client, "t/#", &subscription(QoS::AtLeastOnce, Some(7)));
    }
    for n in 0..RETAINED_WRITTEN {
        store.put_retained(&message(&format!("r/{n}"), &retained_payload(n)));
    }
    store.commit().expect("commit");
    for seq in 0..QUEUED_WRITTEN {
        let d = delivery(message("t/q", &queued_payload(seq)), QoS::AtLeastOnce);
        store.put_delivery(QUEUE_OWNER, seq, &d, DeliveryState::Pending);
        if seq % 100 == 99 {
            store.commit().expect("commit");
        }
    }
    store.commit().expect("commit");
    store.close().expect("close");
}

/// What a damaged file gave back.
#[derive(Debug)]
struct Recovered {
    sessions: usize,
    queued: usize,
    retained: usize,
    report: LoadReport,
    set_aside: bool,
}

/// Opens and loads the damaged store and checks that everything it returns is exactly what
/// was written: a damaged record is skipped, never delivered altered.
fn recover(dir: &Path) -> Recovered {
    let mut store = RedbStore::open(dir, FsyncPolicy::Always).expect("damage never stops open");
    let state = store.load().expect("damage never stops load");
    let report = store.last_load_report().expect("report").clone();
    for loaded in &state.sessions {
        let client = &loaded.record.client_id;
        let n: usize = client[1..].parse().expect("a client written");
        assert!(n < SESSIONS_WRITTEN, "{client}");
        assert_eq!(loaded.record.expiry_interval, 300);
        for (filter, entry) in &loaded.subscriptions {
            assert_eq!(
                (filter.as_str(), entry),
                ("t/#", &subscription(QoS::AtLeastOnce, Some(7)))
            );
        }
    }
    let queue = store
        .read_pending(QUEUE_OWNER, 0, QUEUED_WRITTEN as usize + 1)
        .expect("read queue");
    for (seq, d) in &queue {
        assert_eq!(
            d.message.payload.as_ref(),
            queued_payload(*seq),
            "seq {seq}"
        );
        assert_eq!(d.subscription_ids, vec![7, 268_435_455]);
    }
    let mut retained = 0;
    let mut after = None;
    loop {
        let page = store
            .read_retained("#", after.as_deref(), 100)
            .expect("read retained");
        for m in &page.messages {
            let n: usize = m.topic[2..].parse().expect("a topic written");
            assert_eq!(m.payload.as_ref(), retained_payload(n), "{}", m.topic);
        }
        retained += page.messages.len();
        match page.next {
            Some(next) => after = Some(next),
            None => break,
        }
    }
    store.commit().expect("commit");
    Recovered {
        sessions: state.sessions.len(),
        queued: queue.len(),
        retained,
        report,
        set_aside: store.set_aside_file().is_some(),
    }
}

/// With `on_corruption = "refuse"` the damaged file stops start-up, stays where it is and
/// loses nothing: the salvage that follows in each test still finds every damaged record.
fn assert_refused(dir: &Path) {
    let path = dir.join(FILE_NAME);
    let len = fs::metadata(&path).expect("stat").len();
    let refused = RedbStore::open_with(dir, FsyncPolicy::Always, OnCorruption::Refuse)
        .and_then(|mut store| store.load().map(drop));
    let error = refused.expect_err("refused").to_string();
    assert!(error.contains("refusing"), "{error}");
    assert_eq!(fs::metadata(&path).expect("stat").len(), len);
    assert!(set_aside_files(dir).is_empty());
}

fn truncate_to_half(path: &Path) {
    let len = fs::metadata(path).expect("stat").len();
    fs::OpenOptions::new()
        .write(true)
        .open(path)
        .expect("open file")
        .set_len(len / 2)
        .expect("truncate");
}

#[test]
fn file_truncated_to_half_keeps_every_record_of_the_kept_half() {
    let dir = temp_dir();
    populated_broker_file(dir.path());
    // The queue drains, as queues do: its pages are freed and the live data lies in the
    // first half of the file, which redb alone refuses to open once cut short.
    {
        let mut store = RedbStore::open(dir.path(), FsyncPolicy::Always).expect("open");
        for seq in 100..QUEUED_WRITTEN {
            store.delete_delivery(QUEUE_OWNER, seq);
        }
        store.commit().expect("commit");
        for _ in 0..3 {
            store.put_session(&session("c0"));
            store.commit().expect("commit");
        }
        store.close().expect("close");
    }
    truncate_to_half(&dir.path().join(FILE_NAME));
    assert_refused(dir.path());
    let got = recover(dir.path());
    assert!(got.set_aside);
    assert_eq!(
        (got.sessions, got.queued, got.retained, got.report.corrupt),
        (SESSIONS_WRITTEN, 100, RETAINED_WRITTEN, 0),
        "{got:?}"
    );
    assert_usable(dir.path());
}

#[test]
fn file_truncated_through_its_tables_is_set_aside_and_the_store_starts_empty() {
    let dir = temp_dir();
    populated_broker_file(dir.path());
    // The last commits' pages, the table roots among them, lie in the lost half: nothing
    // locates the records that survive (see README, "Damaged data files").
    truncate_to_half(&dir.path().join(FILE_NAME));
    assert_refused(dir.path());
    let got = recover(dir.path());
    assert!(got.set_aside);
    assert_eq!((got.sessions, got.queued, got.retained), (0, 0, 0));
    assert_usable(dir.path());
}

#[test]
fn zeroed_header_is_set_aside_and_the_store_starts_empty() {
    let dir = temp_dir();
    populated_broker_file(dir.path());
    let path = dir.path().join(FILE_NAME);
    let mut bytes = fs::read(&path).expect("read");
    bytes[..4096].fill(0);
    fs::write(&path, &bytes).expect("write");
    assert_refused(dir.path());
    let got = recover(dir.path());
    // Both of redb's commit slots, the only pointers to the tables, are gone.
    assert!(got.set_aside);
    assert_eq!((got.sessions, got.queued, got.retained), (0, 0, 0));
    assert_usable(dir.path());
}

#[test]
fn scattered_flipped_bytes_lose_only_damaged_records() {
    let dir = temp_dir();
    populated_broker_file(dir.path());
    let path = dir.path().join(FILE_NAME);
    let original = fs::read(&path).expect("read");
    let mut rng = 99u64;
    for _ in 0..8 {
        let mut bytes = original.clone();
        for _ in 0..30 {
            rng = rng
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            let offset = 4096 + (rng >> 33) as usize % (bytes.len() - 4096);
            bytes[offset] ^= 1 << (rng % 8);
        }
        fs::write(&path, &bytes).expect("write");
        for aside in set_aside_files(dir.path()) {
            fs::remove_file(dir.path().join(aside)).expect("remove");
        }
        let got = recover(dir.path());
        assert!(got.sessions >= SESSIONS_WRITTEN - 1, "{got:?}");
        assert!(got.retained >= RETAINED_WRITTEN - 10, "{got:?}");
        assert!(got.queued as u64 >= QUEUED_WRITTEN - 200, "{got:?}");
    }
}

#[test]
fn flipped_payload_bytes_are_detected_counted_and_skipped() {
    let dir = temp_dir();
    populated_broker_file(dir.path());
    let path = dir.path().join(FILE_NAME);
    let mut bytes = fs::read(&path).expect("read");
    // Every stored copy of these payloads (live or in a freed page) gets one flipped byte.
    let targets = [
        queued_payload(17),
        queued_payload(1500),
        retained_payload(42),
    ];
    for target in &targets {
        let mut from = 0;
        while let Some(at) = bytes[from..]
            .windows(target.len())
            .position(|w| w == target.as_slice())
        {
            bytes[from + at + 20] ^= 0x01;
            from += at + target.len();
        }
    }
    fs::write(&path, &bytes).expect("write");
    assert_refused(dir.path());
    let got = recover(dir.path());
    assert!(!got.set_aside);
    assert_eq!(got.report.corrupt, 3, "{got:?}");
    assert_eq!(got.sessions, SESSIONS_WRITTEN);
    assert_eq!(got.retained, RETAINED_WRITTEN - 1);
    assert_eq!(got.queued as u64, QUEUED_WRITTEN - 2);
    // The damaged records were removed: the next start-up is clean.
    let again = recover(dir.path());
    assert_eq!(again.report.corrupt, 0);
    assert_eq!(again.queued as u64, QUEUED_WRITTEN - 2);
}

#[test]
fn values_written_before_checksums_still_load() {
    let dir = temp_dir();
    populated_broker_file(dir.path());
    // Rewrite one record of each kind as the previous format did: version 1, no checksum.
    {
        let db = redb::Database::create(dir.path().join(FILE_NAME)).expect("raw open");
        let txn = db.begin_write().expect("txn");
        {
            let old = |value: &[u8]| {
                let mut v = value[..value.len() - 4].to_vec();
                v[0] = 1;
                v
            };
            let mut sessions = txn.open_table(SESSIONS).expect("table");
            let mut value = old(sessions.get("c1").expect("get").expect("stored").value());
            // Version 1 sessions had no fencing epoch (8 bytes after `expires at`) and no
            // window (16 bytes after it).
            value.drain(13..37);
            sessions.insert("c1", value.as_slice()).expect("insert");
            let mut subs = txn.open_table(SUBSCRIPTIONS).expect("table");
            let value = old(subs
                .get(("c1", "t/#"))
                .expect("get")
                .expect("stored")
                .value());
            subs.insert(("c1", "t/#"), value.as_slice())
                .expect("insert");
            let mut deliveries = txn.open_table(DELIVERIES).expect("table");
            let value = old(deliveries
                .get((QUEUE_OWNER, 5))
                .expect("get")
                .expect("stored")
                .value());
            deliveries
                .insert((QUEUE_OWNER, 5), value.as_slice())
                .expect("insert");
            let mut retained = txn.open_table(RETAINED).expect("table");
            let value = old(retained
                .get("r\u{0}7")
                .expect("get")
                .expect("stored")
                .value());
            retained
                .insert("r\u{0}7", value.as_slice())
                .expect("insert");
        }
        txn.commit().expect("commit");
    }
    let got = recover(dir.path());
    assert_eq!(got.report.corrupt, 0, "{got:?}");
    assert_eq!(
        (got.sessions, got.queued as u64, got.retained),
        (SESSIONS_WRITTEN, QUEUED_WRITTEN, RETAINED_WRITTEN)
    );
}

#[test]
fn damaged_pages_of_a_file_not_closed_cleanly_are_set_aside() {
    let dir = temp_dir();
    populated_broker_file(dir.path());
    // A copy of the file while a broker has it open, as `kill -9` leaves it.
    let store = RedbStore::open(dir.path(), FsyncPolicy::Always).expect("open");
    let mut bytes = fs::read(dir.path().join(FILE_NAME)).expect("read");
    drop(store);
    // One flipped byte in the pages of the last commit: redb's repair pass, which an unclean
    // file must go through, verifies every page's checksum and gives up on both commit slots.
    let needle = queued_payload(QUEUED_WRITTEN - 1);
    let at = bytes
        .windows(needle.len())
        .rposition(|w| w == needle.as_slice())
        .expect("stored");
    bytes[at] ^= 0x01;
    let dir = temp_dir();
    fs::write(dir.path().join(FILE_NAME), &bytes).expect("write");
    assert_refused(dir.path());
    let got = recover(dir.path());
    assert!(got.set_aside);
    assert_eq!((got.sessions, got.queued, got.retained), (0, 0, 0));
    assert_usable(dir.path());
}

#[test]
fn damaged_pages_in_two_places_of_a_queue_lose_only_their_records() {
    let dir = temp_dir();
    populated_broker_file(dir.path());
    let path = dir.path().join(FILE_NAME);
    let mut bytes = fs::read(&path).expect("read");
    // Wreck the page type of every page holding message 500 or 1500 of the queue (the live
    // leaves among them): redb fails or panics on reaching them.
    for seq in [500, 1500] {
        let needle = queued_payload(seq);
        let mut from = 0;
        while let Some(at) = bytes[from..]
            .windows(needle.len())
            .position(|w| w == needle.as_slice())
        {
            let page = (from + at) / 4096 * 4096;
            bytes[page] = 0xEE;
            from += at + needle.len();
        }
    }
    fs::write(&path, &bytes).expect("write");
    assert_refused(dir.path());
    let got = recover(dir.path());
    assert!(got.set_aside, "{got:?}");
    assert_eq!(
        (got.sessions, got.retained),
        (SESSIONS_WRITTEN, RETAINED_WRITTEN)
    );
    // Two leaves' worth lost (about 20 messages each), not everything between them.
    assert!(got.queued >= 1900 && got.queued < 2000, "{got:?}");
    assert_usable(dir.path());
}

#[test]
fn damaged_pages_in_two_places_of_the_retained_table_lose_only_their_records() {
    let dir = temp_dir();
    populated_broker_file(dir.path());
    let path = dir.path().join(FILE_NAME);
    let mut bytes = fs::read(&path).expect("read");
    for n in [60, 140] {
        let needle = retained_payload(n);
        let mut from = 0;
        while let Some(at) = bytes[from..]
            .windows(needle.len())
            .position(|w| w == needle.as_slice())
        {
            let page = (from + at) / 4096 * 4096;
            bytes[page] = 0xEE;
            from += at + needle.len();
        }
    }
    fs::write(&path, &bytes).expect("write");
    let got = recover(dir.path());
    assert!(got.set_aside, "{got:?}");
    assert_eq!(got.sessions, SESSIONS_WRITTEN);
    // Two leaves' worth lost (about 20 messages each), not everything between them.
    assert!(
        got.retained >= RETAINED_WRITTEN - 60 && got.retained < RETAINED_WRITTEN,
        "{got:?}"
    );
}
