//! Retained messages: the last retained message of each topic, read in pages.
//!
//! A `#` subscriber may match millions of retained messages, so nothing here hands out all
//! matches at once: a read returns one page and a cursor to continue from. Every backend (the
//! in-memory [`MemoryRetained`], the store's memory and redb backends) keeps its messages
//! ordered by [`retained_key`], the topic with its levels joined by U+0000 instead of `/`.
//! Topic names cannot contain U+0000 [MQTT-4.7.3-2], so that order is level-wise topic
//! order: a topic comes right before everything below it, and everything a filter can match
//! lies in the key range of the literal levels before its first wildcard. [`RetainedScan`]
//! walks that range with the codec's matching rules and a bound on the rows visited per page,
//! so a filter like `+/x` over a million topics costs many small pages, not one long stall.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::Arc;

use halyard_codec::topic;

use crate::message::Message;

/// Most rows one page read visits (matching or not), so that a sparse filter cannot hold the
/// broker task for a scan of the whole store; the cursor continues where it stopped.
pub const RETAINED_SCAN_BUDGET: usize = 1024;

/// The ordering key of a retained topic: its levels joined by U+0000 (see the module notes).
pub fn retained_key(topic: &str) -> String {
    topic.replace('/', "\0")
}

/// The topic of a [`retained_key`].
pub fn retained_topic(key: &str) -> String {
    key.replace('\0', "/")
}

/// Whether `filter` can only match `$SYS` topics: those live in memory only (they are stale
/// after a restart), so such filters are read there and all others from the store.
pub fn is_sys_filter(filter: &str) -> bool {
    filter == "$SYS" || filter.starts_with("$SYS/")
}

/// One page of retained messages and where the next page starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetainedPage<M> {
    /// Matching messages in key order.
    pub messages: Vec<M>,
    /// Key of the last row visited, to pass as `after` for the next page; `None` when the
    /// filter's range is exhausted.
    pub next: Option<String>,
}

/// What [`RetainedScan::step`] made of one row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ScanStep {
    /// The row matches the filter: take it.
    Take,
    /// The row is in range but does not match.
    Skip,
    /// The row is past the filter's range: the scan is complete.
    End,
}

/// The walk of one page over rows in [`retained_key`] order, shared by every backend so that
/// they agree on order, matching and paging.
#[derive(Debug, Clone)]
pub struct RetainedScan<'f> {
    filter: &'f str,
    /// Key of the literal levels before the first wildcard.
    prefix: String,
    /// Whether the filter has no wildcard: only the key `prefix` itself.
    exact: bool,
    /// Whether the first level is a wildcard: the whole key space.
    unbounded: bool,
    limit: usize,
    taken: usize,
    visited: usize,
}

impl<'f> RetainedScan<'f> {
    /// A scan for up to `limit` messages matching `filter` (a valid, non-shared filter).
    pub fn new(filter: &'f str, limit: usize) -> RetainedScan<'f> {
        let mut literal = Vec::new();
        let mut exact = true;
        for level in filter.split('/') {
            if level == "+" || level == "#" {
                exact = false;
                break;
            }
            literal.push(level);
        }
        RetainedScan {
            filter,
            prefix: literal.join("\0"),
            exact,
            unbounded: literal.is_empty(),
            limit: limit.max(1),
            taken: 0,
            visited: 0,
        }
    }

    /// Where the page starts: after the cursor `after`, else at the filter's range.
    pub fn start<'k>(&'k self, after: Option<&'k str>) -> (Bound<&'k str>, Bound<&'k str>) {
        match after {
            Some(after) => (Bound::Excluded(after), Bound::Unbounded),
            None if self.unbounded => (Bound::Unbounded, Bound::Unbounded),
            None => (Bound::Included(self.prefix.as_str()), Bound::Unbounded),
        }
    }

    /// Classifies the next row, by its key, and counts it against the page's bounds.
    pub fn step(&mut self, key: &str) -> ScanStep {
        if !self.in_range(key) {
            return ScanStep::End;
        }
        self.visited += 1;
        if topic::matches(self.filter, &retained_topic(key)) {
            self.taken += 1;
            ScanStep::Take
        } else {
            ScanStep::Skip
        }
    }

    /// Whether the page is complete: `limit` taken or the scan budget spent.
    pub fn full(&self) -> bool {
        self.taken >= self.limit || self.visited >= RETAINED_SCAN_BUDGET
    }

    fn in_range(&self, key: &str) -> bool {
        if self.unbounded {
            return true;
        }
        if self.exact {
            return key == self.prefix;
        }
        // The prefix itself (`a/#` matches `a`) or anything below it.
        key.strip_prefix(self.prefix.as_str())
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('\0'))
    }
}

/// One page from a map ordered by [`retained_key`]: the in-memory backends' read.
pub fn read_page<'m, V>(
    map: &'m BTreeMap<String, V>,
    filter: &str,
    after: Option<&str>,
    limit: usize,
) -> RetainedPage<&'m V> {
    let mut scan = RetainedScan::new(filter, limit);
    let mut messages = Vec::new();
    for (key, value) in map.range::<str, _>(scan.clone().start(after)) {
        match scan.step(key) {
            ScanStep::End => break,
            ScanStep::Skip => {}
            ScanStep::Take => messages.push(value),
        }
        if scan.full() {
            return RetainedPage {
                messages,
                next: Some(key.clone()),
            };
        }
    }
    RetainedPage {
        messages,
        next: None,
    }
}

/// Where the broker keeps retained messages that are not in the durable store: all of them
/// without a store, and the `$SYS` topics with one.
pub trait RetainedStore: Send {
    /// Stores `message` as the retained message of its topic, replacing any earlier one.
    fn set(&mut self, message: Arc<Message>);
    /// Clears the retained message of `topic`; true if there was one.
    fn remove(&mut self, topic: &str) -> bool;
    /// Up to `limit` messages matching `filter` after the cursor `after` (see
    /// [`RetainedPage::next`]), visiting at most [`RETAINED_SCAN_BUDGET`] rows.
    fn read(&self, filter: &str, after: Option<&str>, limit: usize) -> RetainedPage<Arc<Message>>;
    /// Number of retained messages held.
    fn len(&self) -> usize;
    /// How many of them are the broker's own `$SYS` topics, which counts of what users
    /// retained leave out. A store that holds `$SYS` topics overrides this.
    fn sys_len(&self) -> usize {
        0
    }
    /// True when nothing is retained.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// In-memory retained store, ordered by [`retained_key`].
#[derive(Debug, Default)]
pub struct MemoryRetained {
    messages: BTreeMap<String, Arc<Message>>,
}

impl MemoryRetained {
    /// An empty store.
    pub fn new() -> MemoryRetained {
        MemoryRetained::default()
    }
}

impl RetainedStore for MemoryRetained {
    fn set(&mut self, message: Arc<Message>) {
        self.messages.insert(retained_key(&message.topic), message);
    }

    fn remove(&mut self, topic: &str) -> bool {
        self.messages.remove(&retained_key(topic)).is_some()
    }

    fn read(&self, filter: &str, after: Option<&str>, limit: usize) -> RetainedPage<Arc<Message>> {
        let page = read_page(&self.messages, filter, after, limit);
        RetainedPage {
            messages: page.messages.into_iter().cloned().collect(),
            next: page.next,
        }
    }

    fn len(&self) -> usize {
        self.messages.len()
    }

    fn sys_len(&self) -> usize {
        // `$SYS` and its subtopics (`$SYS\0...`) sort together, right from `$SYS`.
        self.messages
            .range::<str, _>((
                std::ops::Bound::Included("$SYS"),
                std::ops::Bound::Unbounded,
            ))
            .take_while(|(key, _)| *key == "$SYS" || key.starts_with("$SYS\0"))
            .count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn message(topic: &str) -> Arc<Message> {
        Arc::new(Message {
            topic: topic.to_string(),
            payload: Bytes::from_static(b"x"),
            qos: halyard_codec::QoS::AtMostOnce,
            retain: true,
            properties: Default::default(),
            expires_at: None,
            publisher: None,
        })
    }

    /// Every match, read `limit` at a time.
    fn topics_paged(store: &MemoryRetained, filter: &str, limit: usize) -> Vec<String> {
        let mut out = Vec::new();
        let mut after = None;
        loop {
            let page = store.read(filter, after.as_deref(), limit);
            assert!(page.messages.len() <= limit);
            out.extend(page.messages.iter().map(|m| m.topic.clone()));
            match page.next {
                Some(next) => after = Some(next),
                None => return out,
            }
        }
    }

    fn topics(store: &MemoryRetained, filter: &str) -> Vec<String> {
        topics_paged(store, filter, 1000)
    }

    #[test]
    fn sys_topics_are_counted_apart() {
        let mut store = MemoryRetained::new();
        for topic in ["$SYS/broker/uptime", "$SYS", "$SYSTEM/x", "a/b", "$share"] {
            store.set(message(topic));
        }
        assert_eq!((store.len(), store.sys_len()), (5, 2));
    }

    #[test]
    fn wildcard_filters_find_retained_messages_in_level_order() {
        let mut store = MemoryRetained::new();
        for topic in [
            "a",
            "a/b",
            "a/b/c",
            "ab",
            "x/b",
            "$SYS/uptime",
            "/lead",
            "a!/b",
        ] {
            store.set(message(topic));
        }
        assert_eq!(store.len(), 8);
        // `a/#` matches `a` [MQTT-4.7.1-2]; `ab` and `a!/b` are outside its range.
        assert_eq!(topics(&store, "a/#"), vec!["a", "a/b", "a/b/c"]);
        assert_eq!(topics(&store, "+/b"), vec!["a/b", "a!/b", "x/b"]);
        // [MQTT-4.7.2-1]: `#` and `+` at the first level never match `$` topics.
        assert_eq!(
            topics(&store, "#"),
            vec!["/lead", "a", "a/b", "a/b/c", "a!/b", "ab", "x/b"]
        );
        assert_eq!(topics(&store, "+"), vec!["a", "ab"]);
        assert_eq!(topics(&store, "$SYS/#"), vec!["$SYS/uptime"]);
        assert_eq!(topics(&store, "+/lead"), vec!["/lead"]);
        assert_eq!(topics(&store, "/#"), vec!["/lead"]);
        assert_eq!(topics(&store, "a/b"), vec!["a/b"]);
        assert!(topics(&store, "a/b/c/d").is_empty());
    }

    #[test]
    fn pages_continue_across_boundaries_without_loss_or_repeats() {
        let mut store = MemoryRetained::new();
        for i in 0..50 {
            store.set(message(&format!("a/{i:02}")));
            store.set(message(&format!("b/{i:02}/b")));
        }
        for limit in [1, 3, 7, 50, 200] {
            let all = topics_paged(&store, "#", limit);
            assert_eq!(all.len(), 100, "limit {limit}");
            let mut sorted = all.clone();
            sorted.dedup();
            assert_eq!(sorted.len(), 100);
            assert_eq!(topics_paged(&store, "a/#", limit).len(), 50);
            assert_eq!(topics_paged(&store, "+/+/b", limit).len(), 50);
            assert_eq!(topics_paged(&store, "a/07", limit), vec!["a/07"]);
        }
    }

    #[test]
    fn a_sparse_filter_is_read_within_the_scan_budget() {
        let mut store = MemoryRetained::new();
        for i in 0..(3 * RETAINED_SCAN_BUDGET) {
            store.set(message(&format!("t{i:05}")));
        }
        store.set(message("z/x"));
        let first = store.read("+/x", None, 10);
        assert!(first.messages.is_empty(), "budget spent before the match");
        assert!(first.next.is_some());
        assert_eq!(topics(&store, "+/x"), vec!["z/x"]);
    }

    #[test]
    fn set_replaces_and_remove_forgets() {
        let mut store = MemoryRetained::new();
        store.set(message("a/b"));
        store.set(message("a/b"));
        assert_eq!(store.len(), 1);
        assert!(store.remove("a/b"));
        assert!(!store.remove("a/b"));
        assert!(store.is_empty());
    }

    #[test]
    fn keys_order_topics_level_by_level() {
        let mut keys: Vec<String> = ["a/b", "a", "a!", "a/b/c", "a/a"]
            .iter()
            .map(|t| retained_key(t))
            .collect();
        keys.sort();
        let topics: Vec<String> = keys.iter().map(|k| retained_topic(k)).collect();
        assert_eq!(topics, vec!["a", "a/a", "a/b", "a/b/c", "a!"]);
        assert!(is_sys_filter("$SYS/#") && is_sys_filter("$SYS"));
        assert!(!is_sys_filter("$SYSX/#") && !is_sys_filter("#"));
    }
}
