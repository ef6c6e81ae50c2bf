//! One behavioural suite run against every backend (and every fsync policy of redb): what the
//! broker writes through the `Store` trait must come back identically after a restart.

mod common;

use std::time::{Duration, UNIX_EPOCH};

use common::{
    delivery, message, plain_message, session, session_with_will, subscription, temp_dir,
};
use halyard_codec::QoS;
use halyard_core::retained::RETAINED_SCAN_BUDGET;
use halyard_core::store::{
    DeliveryState, LoadedSession, LoadedState, Store, StoredMessage, StoredRelay,
};
use halyard_store::{FsyncPolicy, MemoryStore, RedbStore};

/// A backend under test and how to restart it.
trait Harness {
    fn store(&mut self) -> &mut dyn Store;
    /// Simulates a broker restart: redb drops the store and opens the same directory again.
    fn restart(&mut self);
    /// Whether writes not committed are lost on restart (true for a durable backend).
    fn drops_uncommitted(&self) -> bool;
}

struct Memory(MemoryStore);

impl Harness for Memory {
    fn store(&mut self) -> &mut dyn Store {
        &mut self.0
    }
    fn restart(&mut self) {}
    fn drops_uncommitted(&self) -> bool {
        false
    }
}

struct Redb {
    policy: FsyncPolicy,
    store: Option<RedbStore>,
    dir: tempfile::TempDir,
}

impl Redb {
    fn new(policy: FsyncPolicy) -> Redb {
        let dir = temp_dir();
        let store = RedbStore::open(dir.path(), policy).expect("open");
        Redb {
            policy,
            store: Some(store),
            dir,
        }
    }
}

impl Harness for Redb {
    fn store(&mut self) -> &mut dyn Store {
        self.store.as_mut().expect("open store")
    }
    fn restart(&mut self) {
        self.store = None; // Dropped first: the file is locked while open.
        self.store = Some(RedbStore::open(self.dir.path(), self.policy).expect("reopen"));
    }
    fn drops_uncommitted(&self) -> bool {
        true
    }
}

fn reload(h: &mut dyn Harness) -> LoadedState {
    h.restart();
    h.store().load().expect("load")
}

/// Every retained message matching `filter`, read `limit` at a time, checking that no page
/// is longer than asked.
fn retained(s: &mut dyn Store, filter: &str, limit: usize) -> Vec<StoredMessage> {
    let mut out = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let page = s
            .read_retained(filter, after.as_deref(), limit)
            .expect("read");
        assert!(page.messages.len() <= limit);
        out.extend(page.messages);
        match page.next {
            Some(next) => after = Some(next),
            None => return out,
        }
    }
}

fn topics(s: &mut dyn Store, filter: &str, limit: usize) -> Vec<String> {
    retained(s, filter, limit)
        .into_iter()
        .map(|m| m.topic)
        .collect()
}

fn find<'a>(state: &'a LoadedState, client: &str) -> &'a LoadedSession {
    state
        .sessions
        .iter()
        .find(|s| s.record.client_id == client)
        .unwrap_or_else(|| panic!("session {client} not loaded"))
}

fn round_trips_everything(h: &mut dyn Harness) {
    let alice = session_with_will("alice");
    let bob = session("bob");
    let sub_a = subscription(QoS::ExactlyOnce, Some(7));
    let sub_b = subscription(QoS::AtMostOnce, None);
    let d_ack = delivery(message("t/1", b"one"), QoS::AtLeastOnce);
    let d_rec = delivery(message("t/2", b"two"), QoS::ExactlyOnce);
    let d_comp = delivery(plain_message("t/3", b""), QoS::ExactlyOnce);
    let d_pending = delivery(message("t/4", &[0u8; 64]), QoS::AtLeastOnce);
    let retained_1 = message("r/1", b"kept");
    let retained_2 = plain_message("r/2", b"also kept");

    let s = h.store();
    s.put_session(&alice);
    s.put_session(&bob);
    s.put_subscription("alice", "a/#", &sub_a);
    s.put_subscription("alice", "$share/g/b/+", &sub_b);
    s.put_subscription("bob", "x", &sub_b);
    s.put_inbound_qos2("alice", 9);
    s.put_inbound_qos2("alice", 65535);
    s.put_delivery("alice", 3, &d_ack, DeliveryState::AwaitingAck(1));
    s.put_delivery("alice", 4, &d_rec, DeliveryState::AwaitingReceipt(2));
    s.put_delivery("alice", 5, &d_comp, DeliveryState::AwaitingCompletion(3));
    for seq in 6..10 {
        s.put_delivery("alice", seq, &d_pending, DeliveryState::Pending);
    }
    s.put_retained(&retained_1);
    s.put_retained(&retained_2);
    s.commit().expect("commit");

    let state = reload(h);
    assert_eq!(state.sessions.len(), 2);
    let a = find(&state, "alice");
    assert_eq!(a.record, alice);
    let mut subs = a.subscriptions.clone();
    subs.sort_by(|x, y| x.0.cmp(&y.0));
    assert_eq!(
        subs,
        vec![
            ("$share/g/b/+".to_owned(), sub_b),
            ("a/#".to_owned(), sub_a)
        ]
    );
    assert_eq!(a.inbound_qos2, vec![9, 65535]);
    assert_eq!(
        a.inflight,
        vec![
            (3, d_ack, DeliveryState::AwaitingAck(1)),
            (4, d_rec, DeliveryState::AwaitingReceipt(2)),
            (5, d_comp, DeliveryState::AwaitingCompletion(3)),
        ]
    );
    assert_eq!(a.first_pending, Some(6));
    assert_eq!(a.pending_count, 4);
    assert_eq!(a.next_seq, 10);

    let b = find(&state, "bob");
    assert_eq!(b.record, bob);
    assert_eq!(b.subscriptions, vec![("x".to_owned(), sub_b)]);
    assert!(b.inbound_qos2.is_empty() && b.inflight.is_empty());
    assert_eq!((b.first_pending, b.pending_count, b.next_seq), (None, 0, 0));

    assert_eq!(retained(h.store(), "#", 10), vec![retained_1, retained_2]);
    assert_eq!(h.store().retained_len(), 2);
    let pending = h.store().read_pending("alice", 0, 100).expect("read");
    assert_eq!(pending.len(), 4);
    assert!(pending.iter().all(|(_, d)| *d == d_pending));
}

fn read_pending_pages_in_order(h: &mut dyn Harness) {
    let s = h.store();
    s.put_session(&session("c"));
    s.put_session(&session("c2"));
    for seq in 0..20u64 {
        let d = delivery(message("q", &seq.to_be_bytes()), QoS::AtLeastOnce);
        // Every fifth one is in flight and must be skipped by read_pending.
        let state = if seq % 5 == 0 {
            DeliveryState::AwaitingAck(seq as u16 + 1)
        } else {
            DeliveryState::Pending
        };
        s.put_delivery("c", seq, &d, state);
        s.put_delivery("c2", seq, &d, DeliveryState::Pending);
    }
    // "c" sorts before "c2" and is a prefix of it: the range must not leak into "c2".
    let check = |s: &mut dyn Store| {
        let mut seen = Vec::new();
        let mut from = 0;
        loop {
            let page = s.read_pending("c", from, 6).expect("read");
            if page.is_empty() {
                break;
            }
            assert!(page.len() <= 6);
            for (seq, d) in &page {
                assert_eq!(d.message.payload.as_ref(), seq.to_be_bytes());
                seen.push(*seq);
            }
            from = page.last().map(|(seq, _)| seq + 1).unwrap_or(u64::MAX);
        }
        let expected: Vec<u64> = (0..20).filter(|seq| seq % 5 != 0).collect();
        assert_eq!(seen, expected);
        assert!(s.read_pending("c", 0, 0).expect("read").is_empty());
        assert!(s.read_pending("c", 20, 10).expect("read").is_empty());
        assert!(s.read_pending("nobody", 0, 10).expect("read").is_empty());
        assert_eq!(
            s.read_pending("c", 7, 2)
                .expect("read")
                .iter()
                .map(|(seq, _)| *seq)
                .collect::<Vec<_>>(),
            vec![7, 8]
        );
    };
    check(s); // Uncommitted, through the open batch.
    s.commit().expect("commit");
    check(s);
    h.restart();
    check(h.store());
    let state = h.store().load().expect("load");
    let c = find(&state, "c");
    assert_eq!(
        (c.first_pending, c.pending_count, c.next_seq),
        (Some(1), 16, 20)
    );
    assert_eq!(c.inflight.len(), 4);
}

fn updates_and_deletes_are_kept(h: &mut dyn Harness) {
    let s = h.store();
    s.put_session(&session("c"));
    s.put_subscription("c", "a", &subscription(QoS::AtLeastOnce, None));
    s.put_subscription("c", "b", &subscription(QoS::AtLeastOnce, None));
    s.put_inbound_qos2("c", 1);
    s.put_inbound_qos2("c", 2);
    let d = delivery(message("t", b"x"), QoS::ExactlyOnce);
    for seq in 0..4 {
        s.put_delivery("c", seq, &d, DeliveryState::Pending);
    }
    s.put_retained(&message("r/1", b"old"));
    s.put_retained(&message("r/2", b"gone"));
    s.commit().expect("commit");

    let s = h.store();
    let updated = session_with_will("c");
    s.put_session(&updated);
    s.put_subscription("c", "a", &subscription(QoS::ExactlyOnce, Some(3)));
    s.delete_subscription("c", "b");
    s.delete_subscription("c", "never-existed");
    s.delete_inbound_qos2("c", 1);
    s.set_delivery_state("c", 0, DeliveryState::AwaitingReceipt(10));
    s.set_delivery_state("c", 0, DeliveryState::AwaitingCompletion(10));
    s.set_delivery_state("c", 1, DeliveryState::AwaitingAck(11));
    s.set_delivery_state("c", 99, DeliveryState::AwaitingAck(12)); // No such delivery.
    s.delete_delivery("c", 2);
    let replacement = message("r/1", b"new");
    s.put_retained(&replacement);
    s.delete_retained("r/2");
    s.commit().expect("commit");

    let state = reload(h);
    let c = find(&state, "c");
    assert_eq!(c.record, updated);
    assert_eq!(
        c.subscriptions,
        vec![("a".to_owned(), subscription(QoS::ExactlyOnce, Some(3)))]
    );
    assert_eq!(c.inbound_qos2, vec![2]);
    assert_eq!(
        c.inflight,
        vec![
            (0, d.clone(), DeliveryState::AwaitingCompletion(10)),
            (1, d.clone(), DeliveryState::AwaitingAck(11)),
        ]
    );
    assert_eq!(
        (c.first_pending, c.pending_count, c.next_seq),
        (Some(3), 1, 4)
    );
    assert_eq!(retained(h.store(), "#", 10), vec![replacement]);

    // Back to pending: an in-flight delivery re-queued.
    h.store().set_delivery_state("c", 1, DeliveryState::Pending);
    h.store().commit().expect("commit");
    let state = reload(h);
    let c = find(&state, "c");
    assert_eq!((c.first_pending, c.pending_count), (Some(1), 2));
}

fn delete_session_removes_everything(h: &mut dyn Harness) {
    let s = h.store();
    for client in ["a", "ab", "b"] {
        s.put_session(&session(client));
        s.put_subscription(client, "f/1", &subscription(QoS::AtLeastOnce, None));
        s.put_subscription(client, "f/2", &subscription(QoS::AtLeastOnce, Some(1)));
        s.put_inbound_qos2(client, 5);
        for seq in 0..5 {
            let d = delivery(message("t", b"x"), QoS::AtLeastOnce);
            let state = if seq == 0 {
                DeliveryState::AwaitingAck(1)
            } else {
                DeliveryState::Pending
            };
            s.put_delivery(client, seq, &d, state);
        }
    }
    s.commit().expect("commit");
    h.store().delete_session("a");
    assert!(h.store().read_pending("a", 0, 10).expect("read").is_empty());
    h.store().commit().expect("commit");

    let state = reload(h);
    let clients: Vec<_> = state
        .sessions
        .iter()
        .map(|s| s.record.client_id.as_str())
        .collect();
    assert_eq!(clients, vec!["ab", "b"]);
    for other in ["ab", "b"] {
        let s = find(&state, other);
        assert_eq!(s.subscriptions.len(), 2);
        assert_eq!(s.inbound_qos2, vec![5]);
        assert_eq!((s.inflight.len(), s.pending_count, s.next_seq), (1, 4, 5));
    }
    assert!(h.store().read_pending("a", 0, 10).expect("read").is_empty());

    // A new session under the same id starts from nothing.
    h.store().put_session(&session("a"));
    h.store().commit().expect("commit");
    let state = reload(h);
    let a = find(&state, "a");
    assert!(a.subscriptions.is_empty() && a.inbound_qos2.is_empty() && a.inflight.is_empty());
    assert_eq!((a.first_pending, a.pending_count, a.next_seq), (None, 0, 0));
}

fn uncommitted_writes_are_visible_then_lost(h: &mut dyn Harness) {
    let s = h.store();
    s.put_session(&session("c"));
    s.put_delivery(
        "c",
        0,
        &delivery(message("t", b"kept"), QoS::AtLeastOnce),
        DeliveryState::Pending,
    );
    s.commit().expect("commit");
    let s = h.store();
    s.put_delivery(
        "c",
        1,
        &delivery(message("t", b"not committed"), QoS::AtLeastOnce),
        DeliveryState::Pending,
    );
    s.put_retained(&message("r", b"not committed"));
    s.delete_delivery("c", 0);
    let pending = s.read_pending("c", 0, 10).expect("read");
    assert_eq!(
        pending.iter().map(|(seq, _)| *seq).collect::<Vec<_>>(),
        vec![1]
    );

    let state = reload(h);
    let c = find(&state, "c");
    if h.drops_uncommitted() {
        assert_eq!(
            (c.first_pending, c.pending_count, c.next_seq),
            (Some(0), 1, 1)
        );
        assert!(retained(h.store(), "#", 10).is_empty());
        let pending = h.store().read_pending("c", 0, 10).expect("read");
        assert_eq!(pending[0].1.message.payload.as_ref(), b"kept");
    } else {
        assert_eq!(
            (c.first_pending, c.pending_count, c.next_seq),
            (Some(1), 1, 2)
        );
        assert_eq!(retained(h.store(), "#", 10).len(), 1);
    }
}

fn records_without_a_session_are_not_loaded(h: &mut dyn Harness) {
    let s = h.store();
    s.put_subscription("ghost", "f", &subscription(QoS::AtLeastOnce, None));
    s.put_inbound_qos2("ghost", 1);
    s.put_delivery(
        "ghost",
        0,
        &delivery(message("t", b"x"), QoS::AtLeastOnce),
        DeliveryState::Pending,
    );
    s.put_session(&session("real"));
    s.commit().expect("commit");
    let state = reload(h);
    assert_eq!(state.sessions.len(), 1);
    assert_eq!(state.sessions[0].record.client_id, "real");
}

fn empty_store_loads_empty(h: &mut dyn Harness) {
    h.store().commit().expect("commit with nothing written");
    let state = reload(h);
    assert!(state.sessions.is_empty());
    assert!(retained(h.store(), "#", 10).is_empty());
    assert_eq!(h.store().retained_len(), 0);
}

/// Relays come back after a restart until deleted, one per (client id, claim).
fn relays_are_kept_until_deleted(h: &mut dyn Harness) {
    let relay = |client_id: &str, to: u64| StoredRelay {
        client_id: client_id.into(),
        node: 3,
        filters: vec!["a/#".into()],
        from: 2,
        to,
        until: UNIX_EPOCH + Duration::from_secs(1_800_000_000),
    };
    h.store().put_relay(&relay("c", 5));
    h.store().put_relay(&relay("c", 9));
    h.store().put_relay(&relay("d", 5));
    h.store().commit().expect("commit");
    assert_eq!(
        reload(h).relays,
        vec![relay("c", 5), relay("c", 9), relay("d", 5)]
    );
    h.store().delete_relay("c", 5);
    h.store().commit().expect("commit");
    assert_eq!(reload(h).relays, vec![relay("c", 9), relay("d", 5)]);
}

/// Retained messages page in level-wise topic order with the same results for every page
/// size and backend; reads see the open batch, and deletions made between pages are not
/// returned later.
fn retained_pages_by_filter(h: &mut dyn Harness) {
    let s = h.store();
    let names = [
        "a",
        "a/b",
        "a/b/c",
        "ab",
        "a!/b",
        "x/b",
        "/lead",
        "$SYS/uptime",
        "$other/b",
        "b/x/b",
    ];
    for name in names {
        s.put_retained(&plain_message(name, b"v"));
    }
    for i in 0..40 {
        s.put_retained(&plain_message(&format!("n/{i:02}"), b"v"));
    }
    // Visible before the commit, like `read_pending`.
    assert_eq!(topics(s, "a/b", 10), ["a/b"]);
    s.commit().expect("commit");
    h.restart();
    h.store().load().expect("load");
    let s = h.store();
    assert_eq!(s.retained_len(), names.len() + 40);
    for limit in [1, 2, 7, 100] {
        // [MQTT-4.7.1-2]: `a/#` matches `a`; [MQTT-4.7.2-1]: `#`/`+` skip `$` topics.
        assert_eq!(topics(s, "a/#", limit), ["a", "a/b", "a/b/c"]);
        assert_eq!(topics(s, "+/b", limit), ["a/b", "a!/b", "x/b"]);
        assert_eq!(topics(s, "+/+/b", limit), ["b/x/b"]);
        assert_eq!(topics(s, "$SYS/#", limit), ["$SYS/uptime"]);
        assert_eq!(topics(s, "$other/+", limit), ["$other/b"]);
        assert_eq!(topics(s, "ab", limit), ["ab"]);
        assert_eq!(topics(s, "/#", limit), ["/lead"]);
        let all = topics(s, "#", limit);
        assert_eq!(all.len(), names.len() - 2 + 40, "limit {limit}");
        assert_eq!(
            &all[..7],
            ["/lead", "a", "a/b", "a/b/c", "a!/b", "ab", "b/x/b"]
        );
        assert_eq!(topics(s, "n/+", limit).len(), 40);
    }

    // A deletion between two pages: the rest of the stream does not return it.
    let first = s.read_retained("n/#", None, 5).expect("read");
    assert_eq!(first.messages.len(), 5);
    s.delete_retained("n/10");
    s.put_retained(&plain_message("n/99", b"new"));
    let mut rest = Vec::new();
    let mut after = first.next;
    while let Some(cursor) = after {
        let page = s.read_retained("n/#", Some(&cursor), 5).expect("read");
        rest.extend(page.messages.into_iter().map(|m| m.topic));
        after = page.next;
    }
    assert_eq!(rest.len(), 35, "n/05..n/39 without n/10, plus n/99");
    assert!(!rest.iter().any(|t| t == "n/10"));
    assert_eq!(rest.last().map(String::as_str), Some("n/99"));
}

/// A filter that matches little still returns within the scan budget, with a cursor that
/// finds the match later.
fn retained_scan_budget_continues(h: &mut dyn Harness) {
    let s = h.store();
    for i in 0..(2 * RETAINED_SCAN_BUDGET + 10) {
        s.put_retained(&plain_message(&format!("t{i:05}"), b"v"));
    }
    s.put_retained(&plain_message("z/x", b"v"));
    s.commit().expect("commit");
    let first = s.read_retained("+/x", None, 10).expect("read");
    assert!(first.messages.is_empty());
    assert!(
        first.next.is_some(),
        "stopped by the budget, not at the end"
    );
    assert_eq!(topics(s, "+/x", 10), ["z/x"]);
}

macro_rules! suite {
    ($backend:ident, $make:expr) => {
        mod $backend {
            #[allow(unused_imports)]
            use super::*;

            #[test]
            fn round_trips_everything() {
                super::round_trips_everything(&mut $make);
            }
            #[test]
            fn read_pending_pages_in_order() {
                super::read_pending_pages_in_order(&mut $make);
            }
            #[test]
            fn updates_and_deletes_are_kept() {
                super::updates_and_deletes_are_kept(&mut $make);
            }
            #[test]
            fn delete_session_removes_everything() {
                super::delete_session_removes_everything(&mut $make);
            }
            #[test]
            fn uncommitted_writes_are_visible_then_lost() {
                super::uncommitted_writes_are_visible_then_lost(&mut $make);
            }
            #[test]
            fn records_without_a_session_are_not_loaded() {
                super::records_without_a_session_are_not_loaded(&mut $make);
            }
            #[test]
            fn relays_are_kept_until_deleted() {
                super::relays_are_kept_until_deleted(&mut $make);
            }
            #[test]
            fn empty_store_loads_empty() {
                super::empty_store_loads_empty(&mut $make);
            }
            #[test]
            fn retained_pages_by_filter() {
                super::retained_pages_by_filter(&mut $make);
            }
            #[test]
            fn retained_scan_budget_continues() {
                super::retained_scan_budget_continues(&mut $make);
            }
        }
    };
}

suite!(memory, Memory(MemoryStore::new()));
suite!(redb_always, Redb::new(FsyncPolicy::Always));
suite!(
    redb_interval,
    Redb::new(FsyncPolicy::Interval(Duration::from_millis(5)))
);
suite!(redb_never, Redb::new(FsyncPolicy::Never));
