//! Link health: ping rounds, a link going down (remote occupants shown gone, messages queue)
//! and coming back (each room resyncs).

use std::collections::BTreeSet;

use minidom::Element;
use tracing::{info, warn};

use super::room::{Pending, Sync};
use super::Mirror;
use crate::link::{Pong, PROBE_FIRST_MS};
use crate::ns;
use crate::queue::user_domain;
use crate::stanza::{self, Condition};
use crate::time::Timestamp;

/// Messages held back from the store that make the mirror ask for their acknowledgement early
/// (see [`Mirror::ask_early_ack`]): one ping round then spares the store at least this many puts
/// and as many deletes.
pub(super) const EARLY_ACK_ITEMS: usize = 10;

/// A roster or history request counts as lost when a ping from the mirror service sent after
/// it is answered and its own answer has not come this long after it was sent. After an outage a
/// ping round goes this long after the roster request ([`Mirror::check_request_soon`]): one lost
/// in a connection that died as it came up (the first stanzas on a new s2s stream can be) is
/// asked again within seconds, not at the next ping interval or its timeout.
pub(super) const LOST_REQUEST_GRACE_MS: u64 = 2_000;

impl Mirror {
    /// Down: every remote occupant is shown leaving (status 333) to the local occupants, who go
    /// on chatting; their messages, and those still in flight, queue for the master.
    pub(super) fn link_lost(&mut self, now: Timestamp, master: &str) {
        let interval = self.config.ping_interval_ms;
        let link = self.links.entry(master.to_string()).or_default();
        if !link.go_down(now) {
            return;
        }
        // The first probe soon (see crate::link): the return is found within seconds.
        link.schedule(now.plus_ms(PROBE_FIRST_MS.min(interval)));
        warn!(%master, "link down: remote occupants shown as gone, messages queue");
        // What was held back from the store (write-behind) waits for the link now: stored.
        self.release_store(None);
        for room in self.rooms_of(master) {
            self.lose(&room);
        }
    }

    /// Up: each room with local occupants asks the master for its roster (which resyncs it);
    /// a room with only queued messages sends them.
    pub(super) fn link_back(&mut self, now: Timestamp, master: &str) {
        let Some(link) = self.links.get_mut(master) else {
            return;
        };
        if !link.go_up(now) {
            return;
        }
        info!(%master, "link up: resyncing");
        for room in self.rooms_of(master) {
            self.resync(now, &room);
        }
    }

    /// A ping was answered (or bounced).
    pub(super) fn pong(&mut self, now: Timestamp, master: &str, id: &str, bounced: bool) {
        let answer = self
            .links
            .get_mut(master)
            .and_then(|l| l.answer(now, id, bounced));
        match answer {
            Some(Pong::Bounced) => self.link_lost(now, master),
            Some(Pong::Alive { round, domain }) => {
                for room in self.rooms_of(master) {
                    let keys = match self.rooms.get_mut(&room) {
                        Some(r) => r.out.acknowledge(now, round, &domain),
                        None => continue,
                    };
                    self.delivered(now, &room, keys);
                }
                if domain == self.config.service {
                    self.redo_lost_requests(now, master, round);
                }
                self.link_back(now, master);
                self.ask_early_ack(master);
            }
            None => {}
        }
    }

    /// The master acknowledged, in a message from `room`, the items whose de-duplication keys
    /// are `keys` (see [`crate::ack`]).
    pub(super) fn ack(&mut self, now: Timestamp, room: &str, keys: &[String]) {
        let Some(r) = self.rooms.get_mut(room) else {
            return;
        };
        if let Some(link) = self.links.get_mut(&r.master) {
            link.acks_seen = true;
        }
        let mut done = Vec::new();
        for key in keys {
            done.extend(r.out.acknowledge_key(now, key));
        }
        self.delivered(now, room, done);
    }

    /// Items of `room` (by storage key) arrived at the master: out of the store; what waited
    /// behind the barrier goes; an empty room closes.
    fn delivered(&mut self, now: Timestamp, room: &str, keys: Vec<u64>) {
        for seq in keys {
            self.store.delete(seq);
        }
        if let Some(r) = self.rooms.get_mut(room) {
            if r.out.barrier && r.out.in_flight.is_empty() {
                r.out.barrier = false;
                if r.may_flush() {
                    // What waited behind the barrier: sent as any message is.
                    self.flush_queue(now, room, false);
                }
            }
        }
        self.close_if_empty(room);
    }

    /// Write-behind under load: while at least [`EARLY_ACK_ITEMS`] messages are held back from
    /// the store, the next ping round to `master` goes half `store_after` after the oldest of
    /// them was sent (unless a ping is on its way, or a round is due sooner), so that its answer
    /// acknowledges them before they are due for the store. Fewer held messages are not worth
    /// the ping's bytes on a slow link: they are stored when due, as without write-behind. Only
    /// for a master that does not acknowledge messages itself (an older dmuc).
    pub(super) fn ask_early_ack(&mut self, master: &str) {
        // A master that acknowledges by itself needs no ping for it.
        if self.store.held() < EARLY_ACK_ITEMS
            || self.links.get(master).is_some_and(|l| l.acks_seen)
        {
            return;
        }
        let Some(due) = self.store.next_due() else {
            return;
        };
        let at = Timestamp(due.0.saturating_sub(self.config.store_after_ms / 2));
        if let Some(link) = self.links.get_mut(master) {
            if !link.down && !link.awaiting() {
                link.schedule(at);
            }
        }
    }

    /// A roster request went to `master` at `now` (after an outage): a ping round soon after it
    /// tells whether it was lost (see [`LOST_REQUEST_GRACE_MS`]).
    pub(super) fn check_request_soon(&mut self, now: Timestamp, master: &str) {
        if let Some(link) = self.links.get_mut(master) {
            if !link.down {
                link.schedule(now.plus_ms(LOST_REQUEST_GRACE_MS + 500));
            }
        }
    }

    /// The master answered the mirror service's ping of `round`: a roster or history request
    /// sent before it on the same stream, whose answer (sent before the ping's) has not come, was
    /// lost with a dying connection. Ask again.
    pub(super) fn redo_lost_requests(&mut self, now: Timestamp, master: &str, round: u64) {
        for room in self.rooms_of(master) {
            let Some(r) = self.rooms.get(&room) else {
                continue;
            };
            if r.sync_round > round {
                continue;
            }
            // A host may answer pings before its rooms answer (ejabberd): give the answer a
            // head start before calling it lost, and ask again once it has had it.
            if now.since(r.sync_sent) < LOST_REQUEST_GRACE_MS {
                if r.roster_iq.is_some() || r.history_iq.is_some() {
                    let at = r.sync_sent.plus_ms(LOST_REQUEST_GRACE_MS + 500);
                    if let Some(link) = self.links.get_mut(master) {
                        link.schedule(at);
                    }
                }
                continue;
            }
            if r.roster_iq.is_some() {
                info!(%room, "the roster request was lost: asking again");
                self.resync(now, &room);
            } else if r.history_iq.is_some() && r.sync == Sync::History {
                info!(%room, "the history request was lost: asking again");
                self.request_history(now, &room);
            }
        }
    }

    pub(super) fn lose(&mut self, room: &str) {
        let Some(r) = self.rooms.get_mut(room) else {
            return;
        };
        // What was in flight may or may not have arrived: it goes again, ahead of the queue, and
        // the master drops what it already has by origin-id.
        r.out.requeue_in_flight();
        let refused = std::mem::take(&mut r.out.refused);
        r.out.queue_first(refused);
        r.resync.clear();
        r.history_iq = None;
        r.roster_iq = None;
        r.catching_up = false;
        if r.sync != Sync::Ready && r.synced {
            r.sync = Sync::Ready;
        }
        let pending: Vec<(String, Pending)> = std::mem::take(&mut r.pending).into_iter().collect();
        // Every remote occupant leaves for a technical reason (XEP-0045 status 333).
        let remote: Vec<(String, Element)> = r
            .replica
            .occupants
            .iter()
            .filter(|(_, o)| o.local.is_none())
            .map(|(n, _)| (n.clone(), r.replica.leave_of(n, None, &["333"])))
            .collect();
        for (n, _) in &remote {
            r.replica.occupants.remove(n);
        }
        let room_jid = r.replica.jid.clone();
        for (nick, p) in pending {
            let mut e = Element::builder("presence", ns::JABBER_CLIENT).build();
            stanza::set_attr(&mut e, "to", &room_jid);
            let reply = stanza::error_reply(
                &e,
                &format!("{room_jid}/{nick}"),
                &p.user,
                Condition::RemoteServerTimeout,
                "The link to this room is down",
            );
            self.send(&reply);
        }
        for (nick, p) in remote {
            self.fan_out_presence(room, &nick, &p, None);
        }
        self.close_if_empty(room);
    }

    /// When the next ping round to `master` is due: one asked for (a probe while down, an
    /// early check), the link quiet for the ping interval in either direction, or a message
    /// that has waited a ping timeout for the master's acknowledgement. `None` while a ping is on
    /// its way (its answer or expiry decides), or when no room needs the link.
    pub(super) fn round_due_at(&self, master: &str) -> Option<Timestamp> {
        let link = self.links.get(master)?;
        let rooms = self.rooms.values().filter(|r| r.master == master);
        let unacknowledged = (!link.down && !link.awaiting())
            .then(|| {
                rooms
                    .filter_map(|r| r.out.waiting_since)
                    .min()
                    .map(|t| t.plus_ms(self.config.ping_timeout_ms))
            })
            .flatten();
        [
            link.deadline_of_round(),
            link.quiet_round(self.config.ping_interval_ms),
            unacknowledged,
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Expire unanswered pings, and start the ping rounds that are due.
    pub(super) fn ping(&mut self, now: Timestamp) {
        let masters: Vec<String> = self.links.keys().cloned().collect();
        for master in masters {
            let expired = self.links.get_mut(&master).is_some_and(|l| l.expire(now));
            if expired {
                warn!(%master, "a ping went unanswered");
                self.link_lost(now, &master);
            }
            let rooms = self.rooms_of(&master);
            if rooms.is_empty() {
                if let Some(link) = self.links.get_mut(&master) {
                    link.idle();
                }
                continue;
            }
            if self.round_due_at(&master).is_none_or(|t| t > now) {
                continue;
            }
            // One ping per user domain with something waiting for the master (each shares the
            // s2s stream of that domain's messages and joins, and its answer acknowledges them).
            let mut domains = BTreeSet::new();
            for room in &rooms {
                if let Some(r) = self.rooms.get(room) {
                    domains.extend(r.pending.values().map(|p| user_domain(&p.user).to_string()));
                    domains.extend(
                        r.out
                            .queue
                            .iter()
                            .chain(r.out.in_flight.iter())
                            .map(|q| q.user_domain().to_string()),
                    );
                }
            }
            // And one from the mirror service: it shares the streams of the sync requests, and
            // is the whole round of an idle link.
            domains.insert(self.config.service.clone());
            let mut pings = Vec::new();
            for domain in domains {
                self.next_id += 1;
                let id = format!("dmuc-ping-{}", self.next_id);
                let mut iq = Element::builder("iq", ns::JABBER_CLIENT).build();
                stanza::set_attr(&mut iq, "from", &domain);
                stanza::set_attr(&mut iq, "to", &master);
                stanza::set_attr(&mut iq, "id", &id);
                stanza::set_attr(&mut iq, "type", "get");
                iq.append_child(Element::builder("ping", ns::PING).build());
                pings.push((id, domain, iq));
            }
            let (interval, timeout) = (self.config.ping_interval_ms, self.config.ping_timeout_ms);
            if let Some(link) = self.links.get_mut(&master) {
                link.start_round(
                    now,
                    interval,
                    timeout,
                    pings.iter().map(|(id, d, _)| (id.clone(), d.clone())),
                );
            }
            for (_, _, iq) in pings {
                self.send(&iq);
            }
        }
    }
}
