//! The room's sync with the master: the roster, rejoins after an outage, history (first sync
//! and catch-up), and sending the queue in order.

use std::collections::{BTreeMap, BTreeSet};

use jid::Jid;
use minidom::Element;
use tracing::{info, warn};

use super::classify::fingerprint;
use super::replica::Occupant;
use super::room::Sync;
use super::{round_of, Mirror};
use crate::elements::{Dmuc, History, Room, Roster, RosterItem, Whois};
use crate::ns;
use crate::queue::Queued;
use crate::room_history::Entry;
use crate::stanza::{self};
use crate::time::Timestamp;

impl Mirror {
    /// The master's occupant list: add who is new, drop who is gone (except our own users), and
    /// ask for the history. After the first sync, a roster starts a catch-up: local users the
    /// master no longer has rejoin, and the history request asks for what was said since the
    /// newest message the mirror has (less a margin; what it already has is dropped).
    pub(super) fn apply_roster(&mut self, now: Timestamp, room: &str, roster: Roster) {
        let Some(r) = self.rooms.get_mut(room) else {
            return;
        };
        r.roster_iq = None;
        r.jids_withheld = roster.withheld();
        let announce = !r.replica.local.is_empty();
        let catch_up = r.synced;
        let mut fresh = BTreeMap::new();
        for item in roster.items {
            let nick = item.name.clone();
            fresh.insert(nick.clone(), roster_presence(&r.replica.jid, item));
        }
        let gone: Vec<String> = r
            .replica
            .occupants
            .iter()
            .filter(|(n, o)| o.local.is_none() && !fresh.contains_key(*n))
            .map(|(n, _)| n.clone())
            .collect();
        let mut changes = Vec::new();
        for n in gone {
            if let Some(o) = r.replica.occupants.remove(&n) {
                let mut p = o.presence;
                stanza::set_attr(&mut p, "type", "unavailable");
                changes.push((n, p));
            }
        }
        let mut rejoins = Vec::new();
        if catch_up {
            for (user, (nick, join)) in &r.replica.local {
                if !fresh.contains_key(nick) && !r.resync.contains(nick) {
                    rejoins.push((r.direct.contains(user), nick.clone(), join.clone()));
                }
            }
        }
        // A nick's first session first: the master then takes the same sessions for second
        // ones (multi-session nicks) as before.
        rejoins.sort_by_key(|(direct, _, _)| *direct);
        let rejoins: Vec<(String, Element)> = rejoins.into_iter().map(|(_, n, j)| (n, j)).collect();
        // Our users who left during the outage: their leave is still queued for the master.
        let leaving: BTreeSet<String> = r
            .out
            .queue
            .iter()
            .filter(|q| !q.is_message())
            .map(|q| q.nick.clone())
            .collect();
        for (nick, presence) in fresh {
            let local = r.replica.occupants.get(&nick).and_then(|o| o.local.clone());
            if local.is_some() || r.pending.contains_key(&nick) || leaving.contains(&nick) {
                continue;
            }
            let known = r.replica.occupants.contains_key(&nick);
            r.replica.occupants.insert(
                nick.clone(),
                Occupant {
                    presence: presence.clone(),
                    local: None,
                },
            );
            if !known {
                changes.push((nick, presence));
            }
        }
        for (nick, _) in &rejoins {
            r.resync.insert(nick.clone());
        }
        r.catching_up = catch_up;
        r.sync = if rejoins.is_empty() {
            Sync::History
        } else {
            Sync::Rejoin
        };
        if announce {
            for (nick, p) in changes {
                self.fan_out_presence(room, &nick, &p, None);
            }
        }
        // Rejoins first: on the users' own s2s stream they then precede their queued messages.
        // The history request waits for their echo (see `remote_presence`).
        let waiting = !rejoins.is_empty();
        for (_, join) in rejoins {
            let join = self.rejoin(&join);
            self.send(&join);
        }
        if !waiting {
            self.request_history(now, room);
        }
    }

    /// Ask the master for the room's history: the first sync's `maxstanzas`, or after an outage
    /// what was said since the newest message the mirror has (less a margin).
    pub(super) fn request_history(&mut self, now: Timestamp, room: &str) {
        let margin = self.config.catch_up_margin_ms;
        let history_size = self.config.history_size;
        let id = self.id("history");
        let Some(r) = self.rooms.get_mut(room) else {
            return;
        };
        let catch_up = r.catching_up;
        r.sync = Sync::History;
        r.history_iq = Some((id.clone(), now.plus_ms(self.config.join_timeout_ms)));
        r.sync_round = round_of(&self.links, &r.master);
        r.sync_sent = now;
        // To the bare room (the draft's Example 12 uses the occupant JID, which a XEP-0045
        // service forwards to the occupant instead of answering it).
        let to = r.replica.jid.clone();
        let mut limits = History::new();
        match catch_up
            .then(|| r.newest_from_master.or(r.synced_at))
            .flatten()
        {
            Some(base) => {
                let since = Timestamp(base.0.saturating_sub(margin));
                if let Ok(d) = since.to_xep0082().parse() {
                    limits = limits.with_since(d);
                }
            }
            None => limits = limits.with_maxstanzas(history_size as u32),
        }
        let request = Room {
            id: match Jid::new(&r.replica.jid) {
                Ok(j) => j.to_bare(),
                Err(_) => return,
            },
            history: Some(limits),
        };
        let mut iq = Element::builder("iq", ns::JABBER_CLIENT).build();
        stanza::set_attr(&mut iq, "from", &self.config.service);
        stanza::set_attr(&mut iq, "to", to);
        stanza::set_attr(&mut iq, "id", id);
        stanza::set_attr(&mut iq, "type", "get");
        iq.append_child(request.into());
        self.send(&iq);
    }

    /// The master refused to take back a local user after an outage (banned meanwhile, nick
    /// taken, room gone members-only): they are out; everyone here sees them leave.
    pub(super) fn rejoin_refused(&mut self, now: Timestamp, room: &str, nick: &str) {
        let Some(r) = self.rooms.get_mut(room) else {
            return;
        };
        if !r.resync.remove(nick) {
            return;
        }
        warn!(%room, %nick, "the master refused a rejoin after an outage");
        let user = r.replica.occupants.get(nick).and_then(|o| o.local.clone());
        if let Some(user) = user {
            let leave = Element::builder("presence", ns::JABBER_CLIENT).build();
            self.local_leave(room, &user, nick, &leave);
        }
        let Some(r) = self.rooms.get_mut(room) else {
            return;
        };
        if r.resync.is_empty() && r.sync == Sync::Rejoin {
            self.request_history(now, room);
        }
        self.close_if_empty(room);
    }

    /// Join a local user again, unless their rejoin is already under way.
    pub(super) fn rejoin_user(&mut self, room: &str, user: &str) {
        let Some(r) = self.rooms.get_mut(room) else {
            return;
        };
        let Some((nick, join)) = r.replica.local.get(user).cloned() else {
            return;
        };
        if r.resync.insert(nick) {
            let join = self.rejoin(&join);
            self.send(&join);
        }
    }

    /// A local user's join, as sent again after the master lost them.
    pub(super) fn rejoin(&self, join: &Element) -> Element {
        let mut join = self.to_master(join);
        if join.get_child("x", ns::MUC).is_none() {
            join.append_child(Element::builder("x", ns::MUC).build());
        }
        join
    }

    /// The history answer: store it; after an outage, deliver what local users missed (each
    /// message once), then send the queue.
    pub(super) fn apply_history(&mut self, now: Timestamp, room: &str, messages: Vec<Element>) {
        let Some(r) = self.rooms.get_mut(room) else {
            return;
        };
        r.history_iq = None;
        r.sync = Sync::Ready;
        let catch_up = std::mem::take(&mut r.catching_up);
        if !r.synced {
            r.synced = true;
            r.synced_at = Some(now);
        }
        let local_nicks: BTreeSet<String> =
            r.replica.local.values().map(|(n, _)| n.clone()).collect();
        let mut missed = Vec::new();
        for m in messages {
            let mut m = m;
            stanza::remove_attr(&mut m, "to");
            if m.get_child("subject", ns::JABBER_CLIENT).is_some()
                && m.get_child("body", ns::JABBER_CLIENT).is_none()
            {
                // The master's host says whether its room stamps the subject it sends joiners.
                r.replica.subject_stamped = m.remove_child("subject-stamped", ns::DMUC0).is_some()
                    || m.has_child("delay", ns::DELAY);
                r.replica.set_subject(&m, now, false);
                continue;
            }
            let entry = Entry::new(m, now);
            let print = fingerprint(&entry.message);
            if !r.seen.insert(print) {
                continue;
            }
            if catch_up {
                let nick = entry
                    .message
                    .attr("from")
                    .and_then(|f| Jid::new(f).ok())
                    .and_then(|j| j.resource().map(|r| r.to_string()));
                if nick.is_some_and(|n| local_nicks.contains(&n)) {
                    // Our own users' messages: they saw them when they sent them.
                    continue;
                }
                missed.push(entry.delayed(&r.replica.jid));
            }
            r.newest_from_master = r.newest_from_master.max(Some(entry.stamp));
            r.replica.history.push(entry);
        }
        if catch_up {
            info!(%room, missed = missed.len(), "caught up after an outage");
        }
        let recipients = r.served();
        let awaiting = std::mem::take(&mut r.awaiting);
        for m in missed {
            self.transmits
                .fan_out(stanza::serialize(&m), m.name(), recipients.clone());
        }
        for nick in awaiting {
            self.serve_join(now, room, &nick);
        }
        let held = self
            .rooms
            .get_mut(room)
            .map(|r| std::mem::take(&mut r.held))
            .unwrap_or_default();
        for m in held {
            let caught = self
                .rooms
                .get(room)
                .is_some_and(|r| r.seen.contains(&fingerprint(&m)));
            if !caught {
                self.remote_groupchat(now, m, room);
            }
        }
        self.flush_queue(now, room, true);
    }

    /// Send the queue in order; with `barrier`, newer messages then wait for its acknowledgement.
    /// A sender who is no longer an occupant here (they left during
    /// the outage, or the mirror restarted) is joined for the delivery and leaves again after
    /// it, so that the master accepts what they said while they were in the room.
    pub(super) fn flush_queue(&mut self, now: Timestamp, room: &str, barrier: bool) {
        if self.is_down(room) {
            return;
        }
        let service = self.config.service.clone();
        let Some(r) = self.rooms.get_mut(room) else {
            return;
        };
        if r.out.queue.is_empty() {
            return;
        }
        let round = round_of(&self.links, &r.master);
        let mut out = Vec::new();
        let mut wrapped: BTreeMap<String, String> = BTreeMap::new();
        let queued: Vec<Queued> = r.out.queue.drain(..).collect();
        for mut q in queued {
            if q.is_message() {
                let present = r.replica.local.contains_key(&q.user);
                if !present && !wrapped.contains_key(&q.user) {
                    let mut join = Element::builder("presence", ns::JABBER_CLIENT).build();
                    stanza::set_attr(&mut join, "from", &q.user);
                    stanza::set_attr(&mut join, "to", format!("{}/{}", r.replica.jid, q.nick));
                    let mut x = Element::builder("x", ns::MUC).build();
                    let mut h = Element::builder("history", ns::MUC).build();
                    stanza::set_attr(&mut h, "maxstanzas", "0");
                    x.append_child(h);
                    join.append_child(x);
                    if let Ok(from) = Jid::new(&service) {
                        join.append_child(Dmuc { from }.into());
                    }
                    out.push(join);
                    wrapped.insert(q.user.clone(), q.nick.clone());
                }
                out.push(q.delayed(&service));
                q.round = round;
                r.out.send(now, q);
            } else {
                wrapped.remove(&q.user);
                if !r.replica.local.contains_key(&q.user) {
                    // Shown here when they left; the master's echo of it is not sent back.
                    r.replica.occupants.remove(&q.nick);
                }
                // A leave is done with once sent: no ping answer needs to acknowledge it.
                self.store.delete(q.seq);
                out.push(q.stanza);
            }
        }
        for (user, nick) in wrapped {
            let mut leave = Element::builder("presence", ns::JABBER_CLIENT).build();
            stanza::set_attr(&mut leave, "from", user);
            stanza::set_attr(&mut leave, "to", format!("{}/{}", r.replica.jid, nick));
            stanza::set_attr(&mut leave, "type", "unavailable");
            out.push(leave);
        }
        info!(%room, sent = out.len(), "sent the outbound queue");
        r.out.barrier = barrier;
        let master = r.master.clone();
        for el in out {
            self.send(&el);
        }
        // The acknowledgement that lifts the barrier: ask for it now.
        if let Some(link) = self.links.get_mut(&master).filter(|_| barrier) {
            link.schedule(now);
        }
    }

    /// A local occupant may now see real JIDs the master withheld (they became a moderator):
    /// ask for the roster again. Its answer only fills the JIDs in (see [`Mirror::apply_reveal`]).
    pub(super) fn reveal_if_needed(&mut self, room: &str) {
        let id = self.id("roster");
        let service = self.config.service.clone();
        let Some(r) = self.rooms.get_mut(room) else {
            return;
        };
        let moderator_here = r
            .replica
            .local
            .values()
            .any(|(nick, _)| r.replica.is_moderator(nick));
        let sees = moderator_here || r.replica.whois == Whois::Anyone;
        if !r.jids_withheld || r.reveal_pending || !sees || r.sync != Sync::Ready {
            return;
        }
        info!(%room, "a local occupant may see real JIDs: asking for the roster again");
        r.reveal_pending = true;
        let mut iq = Element::builder("iq", ns::JABBER_CLIENT).build();
        stanza::set_attr(&mut iq, "from", service);
        stanza::set_attr(&mut iq, "to", &r.replica.jid);
        stanza::set_attr(&mut iq, "id", id);
        stanza::set_attr(&mut iq, "type", "get");
        iq.append_child(Roster::default().into());
        self.send(&iq);
    }

    /// The roster asked for by [`Mirror::reveal_if_needed`]: the master's occupants' presences
    /// with their real JIDs, nothing else changed.
    pub(super) fn apply_reveal(&mut self, now: Timestamp, room: &str, roster: Roster) {
        let Some(r) = self.rooms.get_mut(room) else {
            return;
        };
        r.reveal_pending = false;
        r.jids_withheld = roster.withheld();
        for item in roster.items {
            let nick = item.name.clone();
            let presence = roster_presence(&r.replica.jid, item);
            if let Some(o) = r
                .replica
                .occupants
                .get_mut(&nick)
                .filter(|o| o.local.is_none())
            {
                o.presence = presence;
            }
        }
        if r.jids_withheld {
            // Still withheld (the master does not take our occupant for a moderator): ask no
            // more, and serve the joins with what we have.
            warn!(%room, "the master withheld real JIDs again");
            r.jids_withheld = false;
        }
        let awaiting = std::mem::take(&mut r.awaiting);
        let ready = r.sync == Sync::Ready;
        for nick in awaiting {
            if ready {
                self.serve_join(now, room, &nick);
            } else if let Some(r) = self.rooms.get_mut(room) {
                r.awaiting.push(nick);
            }
        }
    }

    pub(super) fn resync(&mut self, now: Timestamp, room: &str) {
        let deadline = now.plus_ms(self.config.join_timeout_ms);
        let id = self.id("roster");
        let service = self.config.service.clone();
        let Some(r) = self.rooms.get_mut(room) else {
            return;
        };
        let round = round_of(&self.links, &r.master);
        if r.replica.local.is_empty() {
            self.flush_queue(now, room, true);
            return;
        }
        r.sync = Sync::Roster;
        // Rejoins sent before (into a link that died) may never have arrived.
        r.resync.clear();
        r.roster_iq = Some((id.clone(), deadline));
        r.sync_round = round;
        r.sync_sent = now;
        let mut iq = Element::builder("iq", ns::JABBER_CLIENT).build();
        stanza::set_attr(&mut iq, "from", service);
        stanza::set_attr(&mut iq, "to", &r.replica.jid);
        stanza::set_attr(&mut iq, "id", id);
        stanza::set_attr(&mut iq, "type", "get");
        iq.append_child(Roster::default().into());
        let master = r.master.clone();
        self.send(&iq);
        self.check_request_soon(now, &master);
    }
}

/// An occupant's presence, as the room would broadcast it, from a roster item.
fn roster_presence(room: &str, item: RosterItem) -> Element {
    let mut p = match item.presence {
        Some(p) if p.name() == "presence" => p,
        _ => Element::builder("presence", ns::JABBER_CLIENT).build(),
    };
    stanza::set_attr(&mut p, "from", format!("{room}/{}", item.name));
    let mut x = Element::builder("x", ns::MUC_USER).build();
    let mut i = Element::builder("item", ns::MUC_USER).build();
    stanza::set_attr(&mut i, "affiliation", item.affiliation.as_str());
    stanza::set_attr(
        &mut i,
        "role",
        item.role.as_ref().map(role_str).unwrap_or("participant"),
    );
    if let Some(j) = item.jid {
        stanza::set_attr(&mut i, "jid", j.to_string());
    }
    x.append_child(i);
    p.append_child(x);
    p
}

fn role_str(r: &crate::elements::Role) -> &'static str {
    use crate::elements::Role::*;
    match r {
        Moderator => "moderator",
        Participant => "participant",
        Visitor => "visitor",
        None => "none",
    }
}
