//! Retained messages: the last retained message of each topic.
//!
//! Behind the [`RetainedStore`] trait so that the durable store can take over later without
//! the broker changing; [`MemoryRetained`] is a trie keyed by topic level, so a wildcard
//! subscription visits only the branches its filter can match.

use std::collections::HashMap;
use std::sync::Arc;

use crate::message::Message;

/// Where retained messages live.
pub trait RetainedStore: Send {
    /// Stores `message` as the retained message of its topic, replacing any earlier one.
    fn set(&mut self, message: Arc<Message>);
    /// Clears the retained message of `topic`; true if there was one.
    fn remove(&mut self, topic: &str) -> bool;
    /// Appends every retained message whose topic matches `filter` to `out`.
    fn matching(&self, filter: &str, out: &mut Vec<Arc<Message>>);
    /// Number of retained messages held.
    fn len(&self) -> usize;
    /// True when nothing is retained.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[derive(Debug, Default)]
struct Node {
    children: HashMap<Box<str>, Node>,
    message: Option<Arc<Message>>,
}

/// In-memory retained store.
#[derive(Debug, Default)]
pub struct MemoryRetained {
    root: Node,
    count: usize,
}

impl MemoryRetained {
    /// An empty store.
    pub fn new() -> MemoryRetained {
        MemoryRetained::default()
    }

    fn collect(node: &Node, filter: &[&str], top_level: bool, out: &mut Vec<Arc<Message>>) {
        let Some((level, rest)) = filter.split_first() else {
            out.extend(node.message.iter().cloned());
            return;
        };
        match *level {
            "#" => {
                // `a/#` matches `a` itself too [MQTT-4.7.1-2].
                if !top_level {
                    out.extend(node.message.iter().cloned());
                }
                Self::collect_subtree(node, top_level, out);
            }
            "+" => {
                for (name, child) in &node.children {
                    if !(top_level && name.starts_with('$')) {
                        Self::collect(child, rest, false, out);
                    }
                }
            }
            name => {
                if let Some(child) = node.children.get(name) {
                    Self::collect(child, rest, false, out);
                }
            }
        }
    }

    fn collect_subtree(node: &Node, top_level: bool, out: &mut Vec<Arc<Message>>) {
        for (name, child) in &node.children {
            // [MQTT-4.7.2-1]: `#` at the top never reaches `$` topics.
            if top_level && name.starts_with('$') {
                continue;
            }
            out.extend(child.message.iter().cloned());
            Self::collect_subtree(child, false, out);
        }
    }

    fn remove_from(node: &mut Node, levels: &[&str]) -> bool {
        let Some((level, rest)) = levels.split_first() else {
            return node.message.take().is_some();
        };
        let Some(child) = node.children.get_mut(*level) else {
            return false;
        };
        let removed = Self::remove_from(child, rest);
        if child.message.is_none() && child.children.is_empty() {
            node.children.remove(*level);
        }
        removed
    }
}

impl RetainedStore for MemoryRetained {
    fn set(&mut self, message: Arc<Message>) {
        let mut node = &mut self.root;
        for level in message.topic.split('/') {
            node = node.children.entry(level.into()).or_default();
        }
        if node.message.replace(message).is_none() {
            self.count += 1;
        }
    }

    fn remove(&mut self, topic: &str) -> bool {
        let levels: Vec<&str> = topic.split('/').collect();
        let removed = Self::remove_from(&mut self.root, &levels);
        if removed {
            self.count -= 1;
        }
        removed
    }

    fn matching(&self, filter: &str, out: &mut Vec<Arc<Message>>) {
        let levels: Vec<&str> = filter.split('/').collect();
        Self::collect(&self.root, &levels, true, out);
    }

    fn len(&self) -> usize {
        self.count
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

    fn topics(store: &MemoryRetained, filter: &str) -> Vec<String> {
        let mut out = Vec::new();
        store.matching(filter, &mut out);
        let mut topics: Vec<String> = out.iter().map(|m| m.topic.clone()).collect();
        topics.sort();
        topics
    }

    #[test]
    fn wildcard_filters_find_retained_messages() {
        let mut store = MemoryRetained::new();
        for topic in ["a", "a/b", "a/b/c", "x/b", "$SYS/uptime", "/lead"] {
            store.set(message(topic));
        }
        assert_eq!(store.len(), 6);
        assert_eq!(topics(&store, "a/#"), vec!["a", "a/b", "a/b/c"]);
        assert_eq!(topics(&store, "+/b"), vec!["a/b", "x/b"]);
        assert_eq!(
            topics(&store, "#"),
            vec!["/lead", "a", "a/b", "a/b/c", "x/b"]
        );
        assert_eq!(topics(&store, "+"), vec!["a"]);
        assert_eq!(topics(&store, "$SYS/#"), vec!["$SYS/uptime"]);
        assert_eq!(topics(&store, "+/lead"), vec!["/lead"]);
    }

    #[test]
    fn set_replaces_and_remove_prunes() {
        let mut store = MemoryRetained::new();
        store.set(message("a/b"));
        store.set(message("a/b"));
        assert_eq!(store.len(), 1);
        assert!(store.remove("a/b"));
        assert!(!store.remove("a/b"));
        assert!(store.is_empty());
        assert!(store.root.children.is_empty());
    }
}
