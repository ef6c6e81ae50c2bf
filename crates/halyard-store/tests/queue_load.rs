//! Start-up cost of a long offline queue. Ignored by default (it writes ~100+ MB); run with
//! `cargo test --release -p halyard-store --test queue_load -- --ignored --nocapture`.

use std::time::{Instant, SystemTime};

use bytes::Bytes;
use halyard_codec::{Properties, QoS};
use halyard_core::store::{DeliveryState, SessionRecord, Store, StoredDelivery, StoredMessage};
use halyard_store::{FsyncPolicy, RedbStore, FILE_NAME};

const COUNT: u64 = 1_000_000;
const BATCH: u64 = 10_000;

#[test]
#[ignore = "writes a large file; run by hand in release mode"]
fn loading_a_million_pending_deliveries() {
    let dir = tempfile::Builder::new()
        .prefix("halyard-store-queue-load-")
        .tempdir()
        .expect("temp dir");
    let delivery = StoredDelivery {
        message: StoredMessage {
            topic: "bench/queue".into(),
            payload: Bytes::from(vec![0x5A; 64]),
            qos: QoS::AtLeastOnce,
            retain: false,
            properties: Properties::default(),
            expires_at: None,
        },
        qos: QoS::AtLeastOnce,
        retain: false,
        subscription_ids: Vec::new(),
    };

    let started = Instant::now();
    let mut store = RedbStore::open(dir.path(), FsyncPolicy::Always).expect("open");
    store.put_session(&SessionRecord {
        client_id: "offline".into(),
        epoch: 1,
        held_since: 1,
        routes_from: 0,
        expiry_interval: u32::MAX,
        expires_at: Some(SystemTime::now()),
        delayed_will: None,
    });
    for seq in 0..COUNT {
        store.put_delivery("offline", seq, &delivery, DeliveryState::Pending);
        if (seq + 1) % BATCH == 0 {
            store.commit().expect("commit");
        }
    }
    store.commit().expect("commit");
    store.close().expect("close");
    let written = started.elapsed();
    let size = std::fs::metadata(dir.path().join(FILE_NAME))
        .expect("stat")
        .len();

    let started = Instant::now();
    let mut store = RedbStore::open(dir.path(), FsyncPolicy::Always).expect("reopen");
    let opened = started.elapsed();
    let started = Instant::now();
    let state = store.load().expect("load");
    let loaded = started.elapsed();
    let session = &state.sessions[0];
    assert_eq!(session.pending_count, COUNT);
    assert_eq!(session.first_pending, Some(0));
    assert_eq!(session.next_seq, COUNT);

    let started = Instant::now();
    let page = store.read_pending("offline", 500_000, 1000).expect("read");
    let paged = started.elapsed();
    assert_eq!(page.len(), 1000);

    println!(
        "{COUNT} pending 64-byte deliveries: written in {written:?} ({BATCH} per commit), \
         file {:.1} MiB ({} bytes/delivery); open {opened:?}, load {loaded:?}, \
         read_pending(1000) {paged:?}",
        size as f64 / (1024.0 * 1024.0),
        size / COUNT
    );
    assert!(loaded.as_secs_f64() < 5.0, "load took {loaded:?}");
}
