//! A master service's limits on each mirror: how many rooms a mirror may be in, and how fast
//! joins may come through it (docs/security.md, "Limits").
//!
//! The quota belongs to the MUC service, not to a room. A host that keeps one [`Master`] per
//! service (Prosody) lets it make its own; a host that keeps one per room (ejabberd, where each
//! room is a process) makes one quota per service and hands every room's engine a share of it
//! ([`Master::with_quota`]), so that a mirror's thousandth room is refused whichever room
//! process it joins.
//!
//! [`Master`]: crate::master::Master
//! [`Master::with_quota`]: crate::master::Master::with_quota

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::rate::TokenBucket;
use crate::time::Timestamp;

/// Why a join through a mirror was refused (answered `resource-constraint`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OverLimit {
    /// The mirror is in as many of the service's rooms as it may be.
    Rooms,
    /// Joins through the mirror come faster than the rate and burst allow.
    JoinRate,
}

impl OverLimit {
    /// The text of the refusal, for the user.
    pub fn text(self) -> &'static str {
        match self {
            OverLimit::Rooms => "Your server's mirror is in as many rooms here as it may be",
            OverLimit::JoinRate => "Too many joins through your server's mirror: try again shortly",
        }
    }
}

/// The counts behind the limits.
#[derive(Debug, Clone)]
struct Counts {
    max_rooms: usize,
    join_rate: u32,
    join_burst: u32,
    /// Per mirror, the rooms it has occupants in.
    rooms: HashMap<String, BTreeSet<String>>,
    joins: HashMap<String, TokenBucket>,
}

/// A service's per-mirror limits, shared by the engines that serve its rooms.
///
/// `Clone` makes an independent copy (as cloning an engine does); [`MirrorQuota::share`] hands
/// out another handle on the same counts.
#[derive(Debug)]
pub struct MirrorQuota(Arc<Mutex<Counts>>);

impl Clone for MirrorQuota {
    fn clone(&self) -> Self {
        MirrorQuota(Arc::new(Mutex::new(self.lock().clone())))
    }
}

impl MirrorQuota {
    /// At most `max_rooms` rooms per mirror; joins through a mirror at `join_rate` per second,
    /// `join_burst` at once.
    pub fn new(max_rooms: usize, join_rate: u32, join_burst: u32) -> Self {
        MirrorQuota(Arc::new(Mutex::new(Counts {
            max_rooms,
            join_rate,
            join_burst,
            rooms: HashMap::new(),
            joins: HashMap::new(),
        })))
    }

    /// Another handle on the same counts.
    pub fn share(&self) -> Self {
        MirrorQuota(Arc::clone(&self.0))
    }

    fn lock(&self) -> MutexGuard<'_, Counts> {
        // The counts stay consistent whatever panicked while holding them (each change is one
        // insert or remove).
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// May a join through `mirror` to `room` go on? Takes one join from the mirror's rate if
    /// so. A room the mirror is in already does not count against the room limit.
    pub fn admit(&self, now: Timestamp, room: &str, mirror: &str) -> Result<(), OverLimit> {
        let mut c = self.lock();
        let max_rooms = c.max_rooms;
        let in_room = c.rooms.get(mirror).is_some_and(|r| r.contains(room));
        if !in_room && c.rooms.get(mirror).map_or(0, BTreeSet::len) >= max_rooms {
            return Err(OverLimit::Rooms);
        }
        let (rate, burst) = (c.join_rate, c.join_burst);
        let bucket = c
            .joins
            .entry(mirror.to_string())
            .or_insert_with(|| TokenBucket::new(now, rate, burst));
        if !bucket.take(now) {
            return Err(OverLimit::JoinRate);
        }
        Ok(())
    }

    /// `mirror` has an occupant in `room`.
    pub fn entered(&self, room: &str, mirror: &str) {
        self.lock()
            .rooms
            .entry(mirror.to_string())
            .or_default()
            .insert(room.to_string());
    }

    /// `mirror` has no occupant left in `room`.
    pub fn vacated(&self, room: &str, mirror: &str) {
        let mut c = self.lock();
        if let Some(rooms) = c.rooms.get_mut(mirror) {
            rooms.remove(room);
            if rooms.is_empty() {
                c.rooms.remove(mirror);
            }
        }
    }

    /// The rooms `mirror` is in.
    pub fn rooms_of(&self, mirror: &str) -> usize {
        self.lock().rooms.get(mirror).map_or(0, BTreeSet::len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const M: &str = "mirror.raleigh.example";

    #[test]
    fn shared_handles_count_rooms_together() {
        let q = MirrorQuota::new(2, 100, 100);
        let (a, b) = (q.share(), q.share());
        let now = Timestamp(0);
        assert_eq!(a.admit(now, "r1@muc", M), Ok(()));
        a.entered("r1@muc", M);
        assert_eq!(b.admit(now, "r2@muc", M), Ok(()));
        b.entered("r2@muc", M);
        // A third room is refused through either handle; a room it is in is not.
        assert_eq!(a.admit(now, "r3@muc", M), Err(OverLimit::Rooms));
        assert_eq!(b.admit(now, "r1@muc", M), Ok(()));
        b.vacated("r2@muc", M);
        assert_eq!(a.admit(now, "r3@muc", M), Ok(()));
        assert_eq!(q.rooms_of(M), 1);
    }

    #[test]
    fn a_clone_is_independent() {
        let q = MirrorQuota::new(1, 100, 100);
        q.entered("r1@muc", M);
        let copy = q.clone();
        copy.vacated("r1@muc", M);
        assert_eq!(q.rooms_of(M), 1);
        assert_eq!(copy.rooms_of(M), 0);
    }

    #[test]
    fn joins_through_one_mirror_are_rate_limited_across_handles() {
        let q = MirrorQuota::new(10, 1, 2);
        let other = q.share();
        let now = Timestamp(1_000);
        assert_eq!(q.admit(now, "r@muc", M), Ok(()));
        assert_eq!(other.admit(now, "s@muc", M), Ok(()));
        assert_eq!(q.admit(now, "t@muc", M), Err(OverLimit::JoinRate));
        // Another mirror has its own rate.
        assert_eq!(q.admit(now, "t@muc", "mirror.durham.example"), Ok(()));
        assert_eq!(other.admit(Timestamp(2_000), "t@muc", M), Ok(()));
    }
}
