mod common;
use std::fs;
use common::{delivery, message, session, temp_dir};
use halyard_codec::QoS;
use halyard_core::store::{DeliveryState, Store};
use halyard_store::{FsyncPolicy, RedbStore, FILE_NAME};

#[test]
fn scratch() {
    let dir = temp_dir();
    {
        let mut store = RedbStore::open(dir.path(), FsyncPolicy::Always).unwrap();
        store.put_session(&session("c"));
        for seq in 0..3000u64 {
            let d = delivery(message("t", &[7u8; 64]), QoS::AtLeastOnce);
            store.put_delivery("c", seq, &d, if seq % 3 == 0 { DeliveryState::AwaitingAck(1) } else { DeliveryState::Pending });
        }
        store.commit().unwrap();
    }
    let path = dir.path().join(FILE_NAME);
    let orig = fs::read(&path).unwrap();
    eprintln!("len {}", orig.len());
    for keep in [orig.len()/2, 4096, 1000, 10] {
        fs::write(&path, &orig[..keep]).unwrap();
        let r = std::panic::catch_unwind(|| {
            let mut store = RedbStore::open(dir.path(), FsyncPolicy::Always).unwrap();
            let aside = store.set_aside_file().map(|p| p.to_owned());
            let l = store.load().map(|s| s.sessions.len());
            (aside, l, store.last_load_report().cloned())
        });
        eprintln!("truncate {keep}: {r:?}");
    }
    let mut x = 12345u64;
    for i in 0..40 {
        let mut bytes = orig.clone();
        for _ in 0..20 {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let off = 4096 + (x >> 33) as usize % (bytes.len() - 4096);
            bytes[off] ^= 0xFF;
        }
        fs::write(&path, &bytes).unwrap();
        let r = std::panic::catch_unwind(|| {
            let mut store = RedbStore::open(dir.path(), FsyncPolicy::Always).unwrap();
            let aside = store.set_aside_file().map(|p| p.to_owned());
            let l = store.load().map(|s| s.sessions.len());
            let p = store.read_pending("c", 0, 5000).map(|v| v.len());
            (aside.is_some(), l.map_err(|e| e.to_string()), p.map_err(|e| e.to_string()), store.last_load_report().map(|r| (r.corrupt, r.pending, r.inflight)))
        });
        eprintln!("flip {i}: {:?}", r.map_err(|_| "PANIC"));
    }
}
