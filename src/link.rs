//! The health of the s2s link from a mirror to one master, as the mirror sees it.
//!
//! The mirror sends an XEP-0199 ping to the master every `interval`. A ping travels from a local
//! user's domain, on the same s2s stream as that domain's users' messages, so its answer proves
//! that every message sent on that stream before it has arrived: those messages stop being "in
//! flight" (see [`Link::acknowledged`]). A ping that gets no answer within `timeout`, or comes back
//! as an s2s bounce, means the link is down; a ping answered while down means it is back.
//!
//! While the link is down the mirror probes: a round after [`PROBE_FIRST_MS`], then at twice
//! the wait each time, up to the ping interval, so that the link's return is found within seconds
//! of it and an outage of hours costs a round per interval. Anything heard from the master, and
//! any local message, while the link is down starts a probe at once ([`Link::probe_now`]).
//!
//! Traffic is proof of life. Anything heard from the master, and anything sent to it, counts
//! as a ping: a round goes only when the link has been quiet for `interval` in either direction
//! ([`Link::quiet_since`]; the master too must hear from the mirror), or when a message has
//! waited too long for the master's acknowledgement (see [`crate::mirror`]). A busy room costs
//! no pings, an idle one a round per interval, with one ping in it unless messages wait for an
//! acknowledgement.
//!
//! Pings are counted in rounds. A message sent to the master is tagged with the current round;
//! the answer to round `r`'s ping from the message's domain acknowledges every message tagged
//! `r` or earlier.

use std::collections::BTreeMap;

use crate::time::Timestamp;

/// The first probe round after the link goes down comes this long after it; each next one
/// twice as long after the one before, up to the ping interval.
pub const PROBE_FIRST_MS: u64 = 1_000;

/// A ping on its way.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Outstanding {
    round: u64,
    domain: String,
    deadline: Timestamp,
}

/// What an answer to a ping means.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pong {
    /// The master answered: messages from `domain` tagged `round` or earlier have arrived.
    Alive {
        /// The round of the answered ping.
        round: u64,
        /// The domain the ping was sent from.
        domain: String,
    },
    /// The ping bounced: the link is down.
    Bounced,
}

/// Link state for one master.
#[derive(Debug, Clone, Default)]
pub struct Link {
    /// The mirror believes the link is down.
    pub down: bool,
    /// When the link went down, while it is down.
    pub down_since: Option<Timestamp>,
    /// When the master last answered a ping.
    pub last_pong: Option<Timestamp>,
    /// When the mirror last started a resync after an outage.
    pub last_resync: Option<Timestamp>,
    /// Outages seen since the mirror started.
    pub outages: u64,
    next_ping: Option<Timestamp>,
    /// While down: the wait after the next probe round (doubles up to the interval).
    backoff_ms: u64,
    /// When the last round started.
    last_round: Option<Timestamp>,
    round: u64,
    outstanding: BTreeMap<String, Outstanding>,
    /// When anything last came from the master.
    last_heard: Option<Timestamp>,
    /// When anything last went to the master.
    last_sent: Option<Timestamp>,
    /// The master acknowledges messages itself (`<ack xmlns='urn:xmpp:dmuc:0'/>`): no ping
    /// round is needed to spare the store.
    pub acks_seen: bool,
}

impl Link {
    /// The round a message sent now belongs to.
    pub fn round(&self) -> u64 {
        self.round
    }

    /// Something came from the master at `now` (not an s2s bounce).
    pub fn heard(&mut self, now: Timestamp) {
        self.last_heard = self.last_heard.max(Some(now));
    }

    /// Something went to the master at `now`.
    pub fn sent(&mut self, now: Timestamp) {
        self.last_sent = self.last_sent.max(Some(now));
    }

    /// Since when the link has been quiet in one direction at least: the older of the last
    /// stanza heard and the last sent. `None` before either.
    pub fn quiet_since(&self) -> Option<Timestamp> {
        match (self.last_heard, self.last_sent) {
            (Some(h), Some(s)) => Some(h.min(s)),
            (h, s) => h.or(s),
        }
    }

    /// When a round is due for quiet, with rounds `interval` apart: while up and no ping is on
    /// its way (its answer, or its expiry, decides what comes next).
    pub fn quiet_round(&self, interval: u64) -> Option<Timestamp> {
        if self.down || self.awaiting() {
            return None;
        }
        self.quiet_since().map(|t| t.plus_ms(interval))
    }

    /// Ask for a ping round at `at` unless one is already due earlier.
    pub fn schedule(&mut self, at: Timestamp) {
        if self.next_ping.is_none_or(|t| at < t) {
            self.next_ping = Some(at);
        }
    }

    /// Is a ping round due at `now`?
    pub fn due(&self, now: Timestamp) -> bool {
        self.next_ping.is_some_and(|t| t <= now)
    }

    /// Start a ping round: one ping per domain, ids chosen by the caller. While down the next
    /// round is due after the probe backoff's wait (at most `interval`); while up, when the
    /// link is quiet again ([`Link::quiet_round`]). Each ping must be answered within `timeout`
    /// ms.
    pub fn start_round(
        &mut self,
        now: Timestamp,
        interval: u64,
        timeout: u64,
        pings: impl IntoIterator<Item = (String, String)>,
    ) {
        let round = self.round;
        self.round += 1;
        self.last_round = Some(now);
        for (id, domain) in pings {
            self.outstanding.insert(
                id,
                Outstanding {
                    round,
                    domain,
                    deadline: now.plus_ms(timeout),
                },
            );
        }
        self.sent(now);
        self.next_ping = if self.down {
            let wait = self.backoff_ms.clamp(1, interval.max(1));
            self.backoff_ms = wait.saturating_mul(2).min(interval);
            Some(now.plus_ms(wait))
        } else {
            None
        };
    }

    /// While the link is down: probe at once, or [`PROBE_FIRST_MS`] after the last round if it
    /// started less than that ago (at most one a second, however busy the users are). For
    /// traffic from the master, and local messages, while down. A probe still on its way does
    /// not count: it may have gone into the dead connection.
    pub fn probe_now(&mut self, now: Timestamp) {
        if !self.down {
            return;
        }
        // A round that started under a second ago: the next goes a second after it.
        let at = match self.last_round {
            Some(t) if now.since(t) < PROBE_FIRST_MS => t.plus_ms(PROBE_FIRST_MS),
            _ => now,
        };
        self.schedule(at);
    }

    /// Did a ping go unanswered past its deadline? Expired pings are forgotten.
    pub fn expire(&mut self, now: Timestamp) -> bool {
        let before = self.outstanding.len();
        self.outstanding.retain(|_, o| o.deadline > now);
        self.outstanding.len() != before
    }

    /// Is a ping on its way?
    pub fn awaiting(&self) -> bool {
        !self.outstanding.is_empty()
    }

    /// Is `id` one of our pings on its way?
    pub fn is_ours(&self, id: &str) -> bool {
        self.outstanding.contains_key(id)
    }

    /// The answer to ping `id`; `bounced` when it is an s2s failure.
    pub fn answer(&mut self, now: Timestamp, id: &str, bounced: bool) -> Option<Pong> {
        let o = self.outstanding.remove(id)?;
        if bounced {
            return Some(Pong::Bounced);
        }
        // An older ping from the same domain still unanswered was lost with a connection that
        // died as it came up (this answer came on the stream after it): it proves nothing now,
        // and must not take the link down when it expires.
        self.outstanding
            .retain(|_, x| x.domain != o.domain || x.round > o.round);
        self.last_pong = Some(now);
        self.heard(now);
        Some(Pong::Alive {
            round: o.round,
            domain: o.domain,
        })
    }

    /// Mark the link down (true if it was up). Pings on their way are forgotten: their answers
    /// would not tell which messages arrived before the loss.
    pub fn go_down(&mut self, now: Timestamp) -> bool {
        self.outstanding.clear();
        if self.down {
            return false;
        }
        self.down = true;
        self.down_since = Some(now);
        self.outages += 1;
        self.backoff_ms = PROBE_FIRST_MS;
        true
    }

    /// Mark the link up (true if it was down).
    pub fn go_up(&mut self, now: Timestamp) -> bool {
        if !self.down {
            return false;
        }
        self.down = false;
        self.down_since = None;
        self.last_resync = Some(now);
        true
    }

    /// When the link needs attention next, besides its quiet rounds: a round asked for, or a
    /// ping's deadline.
    pub fn deadline(&self) -> Option<Timestamp> {
        self.outstanding
            .values()
            .map(|o| o.deadline)
            .chain(self.next_ping)
            .min()
    }

    /// When the next round asked for is due (probes, early checks).
    pub fn deadline_of_round(&self) -> Option<Timestamp> {
        self.next_ping
    }

    /// Stop pinging (no room needs this link any more). Quiet counts from the next stanza.
    pub fn idle(&mut self) {
        self.next_ping = None;
        self.outstanding.clear();
        self.last_heard = None;
        self.last_sent = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traffic_either_way_postpones_the_quiet_round() {
        let mut l = Link::default();
        assert_eq!(l.quiet_round(1000), None, "nothing yet");
        l.sent(Timestamp(0));
        assert_eq!(l.quiet_round(1000), Some(Timestamp(1000)));
        l.heard(Timestamp(500));
        // Sent at 0, heard at 500: quiet in one direction since 0.
        assert_eq!(l.quiet_round(1000), Some(Timestamp(1000)));
        l.sent(Timestamp(800));
        assert_eq!(l.quiet_round(1000), Some(Timestamp(1500)));
        l.heard(Timestamp(300));
        assert_eq!(
            l.quiet_round(1000),
            Some(Timestamp(1500)),
            "time only goes on"
        );
        assert!(l.go_down(Timestamp(900)));
        assert_eq!(l.quiet_round(1000), None, "while down, probes");
        l.idle();
        assert!(l.go_up(Timestamp(901)));
        assert_eq!(l.quiet_round(1000), None, "an idle link starts over");
    }

    #[test]
    fn a_pong_acknowledges_its_round_and_a_silence_expires() {
        let mut l = Link::default();
        l.schedule(Timestamp(100));
        assert!(!l.due(Timestamp(99)) && l.due(Timestamp(100)));
        assert_eq!(l.round(), 0);
        l.start_round(Timestamp(100), 1000, 500, [("p1".into(), "a".into())]);
        assert_eq!(l.round(), 1);
        assert_eq!(l.deadline(), Some(Timestamp(600)));
        assert_eq!(
            l.answer(Timestamp(200), "p1", false),
            Some(Pong::Alive {
                round: 0,
                domain: "a".into()
            })
        );
        assert_eq!(l.answer(Timestamp(200), "p1", false), None);
        l.start_round(Timestamp(1100), 1000, 500, [("p2".into(), "a".into())]);
        assert!(!l.expire(Timestamp(1599)));
        assert!(l.expire(Timestamp(1600)));
        assert!(l.go_down(Timestamp(1600)) && !l.go_down(Timestamp(1601)));
        assert!(l.go_up(Timestamp(2000)) && !l.go_up(Timestamp(2001)));
        assert_eq!(l.outages, 1);
        assert_eq!(l.last_resync, Some(Timestamp(2000)));
    }

    #[test]
    fn a_later_answer_from_a_domain_forgets_its_older_lost_ping() {
        let mut l = Link::default();
        l.start_round(
            Timestamp(0),
            1000,
            5000,
            [("a1".into(), "a".into()), ("s1".into(), "s".into())],
        );
        l.start_round(
            Timestamp(1000),
            1000,
            5000,
            [("a2".into(), "a".into()), ("s2".into(), "s".into())],
        );
        // a1 was lost; a2 answered: a1 is forgotten, s1 (another stream) is not.
        assert!(l.answer(Timestamp(1100), "a2", false).is_some());
        assert!(!l.is_ours("a1") && l.is_ours("s1"));
        assert!(l.expire(Timestamp(5000)), "s1 still expires");
    }

    #[test]
    fn probes_back_off_while_down_and_traffic_probes_at_once() {
        let mut l = Link::default();
        assert!(l.go_down(Timestamp(0)));
        let mut at = Timestamp(0);
        let mut waits = Vec::new();
        for i in 0..8 {
            l.start_round(at, 30_000, 20_000, [(format!("p{i}"), "a".into())]);
            let next = l.deadline_of_round().unwrap();
            waits.push(next.0 - at.0);
            at = next;
        }
        assert_eq!(
            waits,
            [1_000, 2_000, 4_000, 8_000, 16_000, 30_000, 30_000, 30_000]
        );
        // A round just started: traffic brings the next to a second after it.
        l.start_round(at, 30_000, 20_000, [("q".into(), "a".into())]);
        l.probe_now(Timestamp(at.0 + 999));
        assert_eq!(l.deadline_of_round(), Some(at.plus_ms(1_000)));
        let now = Timestamp(at.0 + 1_500);
        l.probe_now(now);
        assert!(l.due(now));
        // Up again, rounds go when the link is quiet; down again, the backoff starts over.
        assert!(l.go_up(now));
        l.start_round(now, 30_000, 20_000, [("u".into(), "a".into())]);
        assert_eq!(l.deadline_of_round(), None);
        assert_eq!(l.quiet_round(30_000), None, "a ping on its way");
        assert!(l.answer(now, "u", false).is_some());
        assert_eq!(l.quiet_round(30_000), Some(now.plus_ms(30_000)));
        l.probe_now(now);
        assert!(!l.due(now));
        assert!(l.go_down(now));
        l.start_round(now, 30_000, 20_000, [("d".into(), "a".into())]);
        assert_eq!(l.deadline_of_round(), Some(now.plus_ms(1_000)));
    }
}
