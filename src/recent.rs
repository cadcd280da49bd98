//! A bounded set of recently seen keys: the master's origin-ids per room and the mirror's
//! fingerprints of messages it already delivered. The oldest key goes when the set is full.

use std::collections::{HashSet, VecDeque};
use std::hash::Hash;

/// Remembers the last `capacity` distinct keys inserted.
#[derive(Debug, Clone)]
pub struct Recent<K> {
    order: VecDeque<K>,
    keys: HashSet<K>,
    capacity: usize,
}

impl<K: Hash + Eq + Clone> Recent<K> {
    /// An empty set that keeps at most `capacity` keys (at least one).
    pub fn new(capacity: usize) -> Self {
        Recent {
            order: VecDeque::new(),
            keys: HashSet::new(),
            capacity: capacity.max(1),
        }
    }

    /// Has `key` been inserted (and not yet pushed out)?
    pub fn contains(&self, key: &K) -> bool {
        self.keys.contains(key)
    }

    /// Remember `key`. Returns false if it was already there.
    pub fn insert(&mut self, key: K) -> bool {
        if self.keys.contains(&key) {
            return false;
        }
        if self.order.len() >= self.capacity {
            if let Some(old) = self.order.pop_front() {
                self.keys.remove(&old);
            }
        }
        self.order.push_back(key.clone());
        self.keys.insert(key);
        true
    }

    /// The keys held, oldest first.
    pub fn iter(&self) -> impl Iterator<Item = &K> {
        self.order.iter()
    }

    /// Number of keys held.
    pub fn len(&self) -> usize {
        self.order.len()
    }

    /// Is the set empty?
    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forgets_the_oldest_key_when_full() {
        let mut r = Recent::new(2);
        assert!(r.insert("a"));
        assert!(!r.insert("a"));
        assert!(r.insert("b"));
        assert!(r.insert("c"));
        assert!(!r.contains(&"a"));
        assert!(r.contains(&"b") && r.contains(&"c"));
        assert_eq!(r.len(), 2);
    }
}
