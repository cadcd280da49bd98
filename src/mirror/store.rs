//! What the host must change in its stored queue: one item at a time, never the whole queue.
//!
//! The stored set is everything not yet acknowledged by the master (queued, in flight, refused;
//! see `outbound`), each item under its sequence number. Moving an item between those states does
//! not touch storage: a restart puts every stored item back in the queue anyway (nothing is in
//! flight after a restart). So an item costs one put when a local user sends it and one delete
//! when a ping answer acknowledges it, whatever happens in between.
//!
//! Changes wait here until the host polls them, and a put followed by a delete of an item the
//! host never got cancel out: a host that polls after each call stores nothing for a message
//! acknowledged within that call.

use std::collections::BTreeMap;

use crate::queue::Queued;

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

/// The changes not yet polled, by key, and the next key to give out.
#[derive(Debug, Clone)]
pub(super) struct Journal {
    pending: BTreeMap<u64, Pending>,
    next_seq: u64,
}

impl Default for Journal {
    fn default() -> Self {
        // 0 marks an item from an older store that has no key yet.
        Journal {
            pending: BTreeMap::new(),
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

    /// `item` of `room` joins the stored set (it is new, or the master refused it after all).
    pub(super) fn put(&mut self, room: &str, item: &Queued) {
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

    /// Are changes waiting?
    pub(super) fn is_empty(&self) -> bool {
        self.pending.is_empty()
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
        j.put("r@muc", &item(seq));
        j.delete(seq);
        assert!(j.is_empty());
        assert_eq!(drain(&mut j), []);
    }

    #[test]
    fn a_polled_put_is_deleted_later() {
        let mut j = Journal::default();
        let seq = j.next_seq();
        j.put("r@muc", &item(seq));
        assert!(matches!(drain(&mut j)[..], [StoreOp::Put { key, .. }] if key == seq));
        j.delete(seq);
        // Refused by the master after all: stored again, then acknowledged for good.
        j.put("r@muc", &item(seq));
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
}
