//! One mirrored room: the replica, the outbound queue, the joins under way, and where the room
//! is in its sync with the master (roster, rejoins, history, ready).

use std::collections::{BTreeMap, BTreeSet};

use minidom::Element;

use super::outbound::Outbound;
use super::replica::Replica;
use crate::recent::Recent;
use crate::time::Timestamp;

/// Fingerprints of master messages kept per room, for de-duplicating a catch-up.
const SEEN: usize = 2000;

/// A local join waiting for the master's answer.
#[derive(Debug, Clone)]
pub(super) struct Pending {
    pub(super) user: String,
    pub(super) deadline: Timestamp,
    /// The user's join presence: kept as their own presence once the master admits them.
    pub(super) join: Element,
    /// A second session on a nick another session of this account holds here: the master
    /// serves this one itself (see [`MirrorRoom::direct`]).
    pub(super) direct: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Sync {
    /// Waiting for config and roster.
    Roster,
    /// After an outage: waiting for the master to confirm the rejoins of our users, before the
    /// history request (which the master only answers for a mirror with occupants).
    Rejoin,
    /// Waiting for the history answer (id, deadline).
    History,
    /// In sync.
    Ready,
}

#[derive(Debug, Clone)]
pub(super) struct MirrorRoom {
    pub(super) master: String,
    pub(super) replica: Replica,
    pub(super) out: Outbound,
    pub(super) pending: BTreeMap<String, Pending>,
    /// Joins the master confirmed while we were still syncing: served once sync is done.
    pub(super) awaiting: Vec<String>,
    pub(super) sync: Sync,
    pub(super) history_iq: Option<(String, Timestamp)>,
    /// A roster request after an outage (id, deadline).
    pub(super) roster_iq: Option<(String, Timestamp)>,
    /// The ping round in which the pending roster or history request was sent: a later answer
    /// to the mirror service's own ping (same s2s streams both ways) means it was lost.
    pub(super) sync_round: u64,
    /// When that request was sent.
    pub(super) sync_sent: Timestamp,
    /// The room has had its first sync: later rosters start a catch-up.
    pub(super) synced: bool,
    /// The pending history answer is a catch-up: deliver what local users missed.
    pub(super) catching_up: bool,
    /// When the first sync finished.
    pub(super) synced_at: Option<Timestamp>,
    /// Stamp of the newest message that came from the master (not from our own users).
    pub(super) newest_from_master: Option<Timestamp>,
    /// Fingerprints of the messages from the master's side already delivered here.
    pub(super) seen: Recent<u64>,
    /// What the room's occupant list for a join under way held beyond the replica (offline
    /// affiliated users), per joining user: served in its place when the join is.
    pub(super) listed: BTreeMap<String, Vec<Element>>,
    /// Local users who re-sent their join (Prosody issue 667): the master's echo is served to
    /// them as a whole join (occupants, presence, history, subject).
    pub(super) resent_joins: BTreeSet<String>,
    /// Local occupants whose rejoin echo is expected after a resync.
    pub(super) resync: BTreeSet<String>,
    /// Live messages from the master that arrived during a catch-up: delivered after it, so
    /// that each sender's messages arrive in order.
    pub(super) held: Vec<Element>,
    /// Local sessions the master serves as it serves a plain federated user, through the
    /// mirror: second sessions on a nick (multi-session nicks). The hosts differ in what each
    /// session of a nick sees, so the mirror shows them only what the room made for them, and
    /// leaves them out of everything it fans out itself.
    pub(super) direct: BTreeSet<String>,
    /// The master left the real JIDs out of the roster (none of our occupants could see them).
    pub(super) jids_withheld: bool,
    /// We asked for the roster again, for the real JIDs a new moderator here may see.
    pub(super) reveal_pending: bool,
}

impl MirrorRoom {
    pub(super) fn new(jid: String, master: String, history_size: usize) -> Self {
        MirrorRoom {
            master,
            replica: Replica::new(jid, history_size),
            out: Outbound::default(),
            pending: BTreeMap::new(),
            awaiting: Vec::new(),
            sync: Sync::Roster,
            history_iq: None,
            roster_iq: None,
            sync_round: 0,
            sync_sent: Timestamp(0),
            synced: false,
            catching_up: false,
            synced_at: None,
            newest_from_master: None,
            seen: Recent::new(SEEN),
            listed: BTreeMap::new(),
            resent_joins: BTreeSet::new(),
            resync: BTreeSet::new(),
            held: Vec::new(),
            direct: BTreeSet::new(),
            jids_withheld: false,
            reveal_pending: false,
        }
    }

    /// The local occupants the mirror itself serves: all but the [`MirrorRoom::direct`] ones.
    pub(super) fn served(&self) -> Vec<String> {
        self.replica
            .local
            .keys()
            .filter(|u| !self.direct.contains(*u))
            .cloned()
            .collect()
    }

    /// Does the master serve this nick's presence to each of its local sessions itself? While
    /// one of them is direct, it does, for all of them.
    pub(super) fn shared(&self, nick: &str) -> bool {
        self.replica
            .local
            .iter()
            .any(|(u, (n, _))| n == nick && self.direct.contains(u))
            || self.pending.get(nick).is_some_and(|p| p.direct)
    }

    /// Ready to send what waits in the queue (in sync, no rejoins or resends outstanding)?
    pub(super) fn may_flush(&self) -> bool {
        self.sync == Sync::Ready && self.resync.is_empty() && self.out.refused.is_empty()
    }
}
