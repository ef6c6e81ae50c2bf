//! Collections that cost one pointer until they hold something.
//!
//! A session carries several maps and sets that most clients never use (topic aliases,
//! inbound QoS 2 ids) or use only a little (subscriptions). An empty `HashMap` allocates
//! nothing but is 48 bytes inline, and sessions are kept per connection, so memory per idle
//! connection (a first-class budget, DESIGN.md section 3) pays for every one of them. These
//! wrappers hold `Option<Box<_>>` instead: 8 bytes while empty. They offer only the subset of
//! the `HashMap` / `HashSet` API the broker uses.

use std::borrow::Borrow;
use std::collections::{HashMap, HashSet};
use std::hash::Hash;

/// A `HashMap` that is a null pointer while empty.
// The box is the point: an empty `HashMap` is 48 bytes inline, `Option<Box<_>>` is 8.
#[allow(clippy::box_collection)]
#[derive(Debug, Clone)]
pub(crate) struct LazyMap<K, V>(Option<Box<HashMap<K, V>>>);

impl<K, V> Default for LazyMap<K, V> {
    fn default() -> Self {
        LazyMap(None)
    }
}

impl<K: Hash + Eq, V> LazyMap<K, V> {
    /// The value for `key`.
    pub(crate) fn get<Q>(&self, key: &Q) -> Option<&V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.0.as_ref()?.get(key)
    }

    /// Whether `key` is present.
    pub(crate) fn contains_key<Q>(&self, key: &Q) -> bool
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.get(key).is_some()
    }

    /// Inserts, allocating the map on first use; returns the previous value.
    pub(crate) fn insert(&mut self, key: K, value: V) -> Option<V> {
        self.0.get_or_insert_with(Box::default).insert(key, value)
    }

    /// Removes `key`; the map is freed when its last entry goes.
    pub(crate) fn remove<Q>(&mut self, key: &Q) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let map = self.0.as_mut()?;
        let removed = map.remove(key);
        if map.is_empty() {
            self.0 = None;
        }
        removed
    }

    /// Number of entries.
    pub(crate) fn len(&self) -> usize {
        self.0.as_ref().map_or(0, |map| map.len())
    }

    /// Entries, in arbitrary order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (&K, &V)> {
        self.0.iter().flat_map(|map| map.iter())
    }

    /// Keys, in arbitrary order.
    pub(crate) fn keys(&self) -> impl Iterator<Item = &K> {
        self.iter().map(|(key, _)| key)
    }
}

impl<'a, K: Hash + Eq, V> IntoIterator for &'a LazyMap<K, V> {
    type Item = (&'a K, &'a V);
    type IntoIter = Box<dyn Iterator<Item = (&'a K, &'a V)> + 'a>;

    fn into_iter(self) -> Self::IntoIter {
        Box::new(self.iter())
    }
}

/// A `HashSet` that is a null pointer while empty.
// The box is the point: an empty `HashSet` is 48 bytes inline, `Option<Box<_>>` is 8.
#[allow(clippy::box_collection)]
#[derive(Debug, Clone)]
pub(crate) struct LazySet<T>(Option<Box<HashSet<T>>>);

impl<T> Default for LazySet<T> {
    fn default() -> Self {
        LazySet(None)
    }
}

impl<T: Hash + Eq> LazySet<T> {
    /// Whether `value` is present.
    pub(crate) fn contains(&self, value: &T) -> bool {
        self.0.as_ref().is_some_and(|set| set.contains(value))
    }

    /// Inserts, allocating the set on first use; returns whether it was new.
    pub(crate) fn insert(&mut self, value: T) -> bool {
        self.0.get_or_insert_with(Box::default).insert(value)
    }

    /// Removes `value`; the set is freed when its last element goes.
    pub(crate) fn remove(&mut self, value: &T) -> bool {
        let Some(set) = self.0.as_mut() else {
            return false;
        };
        let removed = set.remove(value);
        if set.is_empty() {
            self.0 = None;
        }
        removed
    }

    /// Number of elements.
    pub(crate) fn len(&self) -> usize {
        self.0.as_ref().map_or(0, |set| set.len())
    }

    /// Elements, in arbitrary order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = &T> {
        self.0.iter().flat_map(|set| set.iter())
    }
}

impl<T: Hash + Eq> FromIterator<T> for LazySet<T> {
    fn from_iter<I: IntoIterator<Item = T>>(iter: I) -> Self {
        let set: HashSet<T> = iter.into_iter().collect();
        LazySet((!set.is_empty()).then(|| Box::new(set)))
    }
}

impl<'a, T: Hash + Eq> IntoIterator for &'a LazySet<T> {
    type Item = &'a T;
    type IntoIter = Box<dyn Iterator<Item = &'a T> + 'a>;

    fn into_iter(self) -> Self::IntoIter {
        Box::new(self.iter())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lazy_collections_are_one_pointer_and_free_when_emptied() {
        assert_eq!(std::mem::size_of::<LazyMap<String, u16>>(), 8);
        assert_eq!(std::mem::size_of::<LazySet<u16>>(), 8);
        let mut map = LazyMap::default();
        assert_eq!(map.len(), 0);
        assert_eq!(map.insert("a".to_owned(), 1), None);
        assert_eq!(map.insert("a".to_owned(), 2), Some(1));
        assert!(map.contains_key("a"));
        assert_eq!(map.keys().collect::<Vec<_>>(), ["a"]);
        assert_eq!(map.remove("a"), Some(2));
        assert!(map.0.is_none());
        let mut set: LazySet<u16> = [1, 2].into_iter().collect();
        assert!(set.contains(&1) && set.len() == 2);
        assert!(set.remove(&1) && set.remove(&2) && !set.remove(&2));
        assert!(set.0.is_none());
        assert!(std::iter::empty::<u16>()
            .collect::<LazySet<u16>>()
            .0
            .is_none());
    }
}
