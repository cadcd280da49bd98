//! What the host must change in its stored queue: one item at a time, never the whole queue.
//!
//! The stored set is everything not yet acknowledged by the master (queued, in flight, refused;
//! see `outbound`), each item under its sequence number. Moving an item between those states does
//! not touch storage: a restart puts every stored item back in the queue anyway (nothing is in
//! flight after a restart). So an item costs at most one put and one delete, whatever happens
//! in between.
//!
//! Write-behind: an item sent to the master over a link that is up is *held* here, not handed
//! to the host, for `store_after` (see [`crate::mirror::MirrorConfig::store_after_ms`]). If the
//! master acknowledges it within that time, its put and its delete cancel out and the store is
//! never touched; otherwise (a slow or stalled link) it is released to the host when its time
//! comes. An item queued because the link is down, or behind older ones, is released at once, and
//! everything held is released when a link goes down and at shutdown
//! ([`crate::mirror::Mirror::flush_store`]). What a crash loses is what the master had not
//! acknowledged in the last `store_after`: see docs/protocol.md, "Storage format and cost".
//!
//! Released changes wait here until the host polls them, and a put followed by a delete of an
//! item the host never got cancel out too.

use std::collections::BTreeMap;

use crate::queue::Queued;
use crate::time::Timestamp;

/// One change to the stored queue, from [`crate::mirror::Mirror::poll_store`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreOp {
    /// Store `item` (a queue item in storage form, see [`crate::queue`]) under `key`. A key is
    /// never reused for another item; a put of a key the host has replaces it.
    Put {
        /// The item's sequence number: load the stored items in this order.
        key: u64,
        /// The item, as XML text.
        item: String,
    },
    /// Forget the item stored under `key` (the master has it).
    Delete {
        /// The item's sequence number.
        key: u64,
    },
}

/// A change not yet handed to the host.
#[derive(Debug, Clone)]
struct Pending {
    /// Does the host have this key now (as of the last change it polled)?
    stored: bool,
    /// What the host should have under it: an item, or nothing.
    want: Option<String>,
}

/// A put not yet released to the host: it is released at `due`, unless its delete comes first.
/// It keeps no copy of the item: most are acknowledged before their time, and the mirror writes
/// the storage form of the others from its queue when they are released.
#[derive(Debug, Clone)]
struct Held {
    due: Timestamp,
}

/// The changes not yet polled, by key, the puts held back, and the next key to give out.
#[derive(Debug, Clone)]
pub(super) struct Journal {
    pending: BTreeMap<u64, Pending>,
    /// Puts of keys the host does not have, held until their time (write-behind).
    held: BTreeMap<u64, Held>,
    next_seq: u64,
}

impl Default for Journal {
    fn default() -> Self {
        // 0 marks an item from an older store that has no key yet.
        Journal {
            pending: BTreeMap::new(),
            held: BTreeMap::new(),
            next_seq: 1,
        }
    }
}

impl Journal {
    /// A new item's key.
    pub(super) fn next_seq(&mut self) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        seq
    }

    /// An item the host stored before a restart: new keys come after it.
    pub(super) fn seen(&mut self, seq: u64) {
        self.next_seq = self.next_seq.max(seq.saturating_add(1));
    }

    /// `item` of `room` joins the stored set (it is new, or the master refused it after all):
    /// for the host at once with `due` `None`, else held until `due`.
    pub(super) fn put(&mut self, room: &str, item: &Queued, due: Option<Timestamp>) {
        if let Some(due) = due {
            // A key with a change pending is one the host has, or is about to: no holding back.
            if !self.pending.contains_key(&item.seq) {
                self.held.insert(item.seq, Held { due });
                return;
            }
        }
        self.held.remove(&item.seq);
        let xml = item.to_xml(room);
        // Keys are put and deleted in turn: a put with nothing pending is of a key the host
        // does not have.
        self.pending
            .entry(item.seq)
            .or_insert(Pending {
                stored: false,
                want: None,
            })
            .want = Some(xml);
    }

    /// The item under `seq` leaves the stored set (acknowledged, or sent and done with).
    pub(super) fn delete(&mut self, seq: u64) {
        if self.held.remove(&seq).is_some() {
            // Held back, so the host never had it: nothing to do at all.
            return;
        }
        match self.pending.get_mut(&seq) {
            Some(p) if !p.stored => {
                // The host never got it: nothing to do at all.
                self.pending.remove(&seq);
            }
            Some(p) => p.want = None,
            None => {
                self.pending.insert(
                    seq,
                    Pending {
                        stored: true,
                        want: None,
                    },
                );
            }
        }
    }

    /// The next change for the host, oldest key first.
    pub(super) fn poll(&mut self) -> Option<StoreOp> {
        while let Some((key, p)) = self.pending.pop_first() {
            match p.want {
                Some(item) => return Some(StoreOp::Put { key, item }),
                None if p.stored => return Some(StoreOp::Delete { key }),
                None => continue,
            }
        }
        None
    }

    /// Are changes waiting (released or held)?
    pub(super) fn is_empty(&self) -> bool {
        self.pending.is_empty() && self.held.is_empty()
    }

    /// The held puts whose time has come (all of them with `None`), no longer held: the caller
    /// hands each to the host with [`Journal::released`].
    pub(super) fn release(&mut self, now: Option<Timestamp>) -> Vec<u64> {
        let due: Vec<u64> = self
            .held
            .iter()
            .filter(|(_, h)| now.is_none_or(|now| h.due <= now))
            .map(|(k, _)| *k)
            .collect();
        for key in &due {
            self.held.remove(key);
        }
        due
    }

    /// A released put, `xml` the item's storage form: for the host now.
    pub(super) fn released(&mut self, key: u64, xml: String) {
        self.pending.insert(
            key,
            Pending {
                stored: false,
                want: Some(xml),
            },
        );
    }

    /// Is `key` held back?
    pub(super) fn is_held(&self, key: u64) -> bool {
        self.held.contains_key(&key)
    }

    /// When the next held put is due. Keys and due times grow together (an item is held when
    /// it is made, for the same delay), so the oldest key's is the earliest: this runs after
    /// every message.
    pub(super) fn next_due(&self) -> Option<Timestamp> {
        self.held.first_key_value().map(|(_, h)| h.due)
    }

    /// Puts held back.
    pub(super) fn held(&self) -> usize {
        self.held.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stanza;
    use crate::time::Timestamp;

    fn item(seq: u64) -> Queued {
        Queued {
            user: "u@raleigh.localhost/pc".into(),
            nick: "U".into(),
            at: Timestamp(1),
            stanza: stanza::parse("<message type='groupchat'><body>x</body></message>").unwrap(),
            round: 0,
            seq,
        }
    }

    fn drain(j: &mut Journal) -> Vec<StoreOp> {
        std::iter::from_fn(|| j.poll()).collect()
    }

    #[test]
    fn a_put_then_a_delete_before_the_host_polls_costs_nothing() {
        let mut j = Journal::default();
        let seq = j.next_seq();
        j.put("r@muc", &item(seq), None);
        j.delete(seq);
        assert!(j.is_empty());
        assert_eq!(drain(&mut j), []);
    }

    #[test]
    fn a_polled_put_is_deleted_later() {
        let mut j = Journal::default();
        let seq = j.next_seq();
        j.put("r@muc", &item(seq), None);
        assert!(matches!(drain(&mut j)[..], [StoreOp::Put { key, .. }] if key == seq));
        j.delete(seq);
        // Refused by the master after all: stored again, then acknowledged for good.
        j.put("r@muc", &item(seq), None);
        j.delete(seq);
        assert_eq!(drain(&mut j), [StoreOp::Delete { key: seq }]);
    }

    #[test]
    fn keys_continue_after_the_stored_ones() {
        let mut j = Journal::default();
        j.seen(41);
        j.seen(7);
        assert_eq!(j.next_seq(), 42);
    }

    #[test]
    fn a_held_put_acknowledged_in_time_never_reaches_the_host() {
        let mut j = Journal::default();
        let a = j.next_seq();
        j.put("r@muc", &item(a), Some(Timestamp(2_000)));
        assert!(!j.is_empty());
        assert_eq!(j.next_due(), Some(Timestamp(2_000)));
        // Before its time, nothing for the host.
        assert!(j.release(Some(Timestamp(1_999))).is_empty());
        assert_eq!(drain(&mut j), []);
        j.delete(a);
        assert!(j.is_empty());
        assert_eq!(drain(&mut j), []);
    }

    #[test]
    fn a_held_put_is_released_when_due_or_at_a_flush() {
        let mut j = Journal::default();
        let (a, b) = (j.next_seq(), j.next_seq());
        j.put("r@muc", &item(a), Some(Timestamp(2_000)));
        j.put("r@muc", &item(b), Some(Timestamp(3_000)));
        assert_eq!(j.release(Some(Timestamp(2_000))), [a]);
        j.released(a, item(a).to_xml("r@muc"));
        assert!(matches!(drain(&mut j)[..], [StoreOp::Put { key, .. }] if key == a));
        assert_eq!(j.held(), 1);
        // Shutdown: whatever is held goes to the host.
        assert_eq!(j.release(None), [b]);
        j.released(b, item(b).to_xml("r@muc"));
        assert!(matches!(drain(&mut j)[..], [StoreOp::Put { key, .. }] if key == b));
        // Both are stored now: their deletes reach the host.
        j.delete(a);
        j.delete(b);
        assert_eq!(
            drain(&mut j),
            [StoreOp::Delete { key: a }, StoreOp::Delete { key: b }]
        );
    }
}
