//! What local users sent to one room that the master has not yet confirmed: the queue waiting
//! for the link, what is in flight (sent, not yet acknowledged by the master's `<ack/>` or a ping
//! answer), what was acknowledged lately (an acknowledgement proves arrival, not acceptance), and what the master
//! refused because it had lost the sender. The link machinery moves items between these; it
//! knows nothing of DMUC3's elements.

use std::collections::VecDeque;

use crate::queue::Queued;
use crate::stanza;
use crate::time::Timestamp;

/// Acknowledged messages kept per room, in case the master refuses them after all.
const DELIVERED: usize = 500;

/// Where a refused item was: storage keeps what is not acknowledged, so an acknowledged one is
/// stored again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Refusal {
    /// No such item (an older one, or not ours).
    NotOurs,
    /// In flight: still stored.
    InFlight,
    /// Acknowledged, so no longer stored.
    Delivered,
}

#[derive(Clone, Debug, Default)]
pub(super) struct Outbound {
    /// Waiting for the link.
    pub(super) queue: VecDeque<Queued>,
    /// Sent to the master, not yet acknowledged by a ping answer.
    pub(super) in_flight: VecDeque<Queued>,
    /// Acknowledged lately: a master that lost the sender refuses what arrived
    /// (`not-acceptable`).
    pub(super) delivered: VecDeque<Queued>,
    /// Refused by the master because it had lost the sender: sent again, in order, once the
    /// sender's rejoin is confirmed.
    pub(super) refused: Vec<Queued>,
    /// The queue was just sent: newer messages wait until a ping answer acknowledges it. An s2s
    /// connection can be replaced between two sends, and a newer message on the new connection
    /// must not overtake older ones that die with the old one (they go again, ahead).
    pub(super) barrier: bool,
    /// Since when the oldest item in flight has waited for its acknowledgement (at most: an
    /// acknowledgement of some restarts the wait of the rest).
    pub(super) waiting_since: Option<Timestamp>,
}

impl Outbound {
    /// Put `items` (oldest first) at the head of the queue, ahead of anything queued.
    pub(super) fn queue_first(&mut self, items: impl IntoIterator<Item = Queued>) {
        let mut items: Vec<Queued> = items.into_iter().collect();
        items.extend(self.queue.drain(..));
        self.queue = items.into();
    }

    /// Must a new message wait behind older ones (the link is down, or older messages still
    /// wait for it)?
    pub(super) fn must_hold(&self, down: bool) -> bool {
        down || !self.queue.is_empty()
            || !self.refused.is_empty()
            || (self.barrier && !self.in_flight.is_empty())
    }

    /// Nothing left to deliver.
    pub(super) fn is_empty(&self) -> bool {
        self.queue.is_empty() && self.in_flight.is_empty() && self.refused.is_empty()
    }

    /// `item` goes to the master now: in flight until acknowledged.
    pub(super) fn send(&mut self, now: Timestamp, item: Queued) {
        if self.in_flight.is_empty() {
            self.waiting_since = Some(now);
        }
        self.in_flight.push_back(item);
    }

    /// What was in flight goes back to the head of the queue (it may not have arrived).
    pub(super) fn requeue_in_flight(&mut self) {
        let in_flight = std::mem::take(&mut self.in_flight);
        self.waiting_since = None;
        self.queue_first(in_flight);
    }

    /// Some items were acknowledged at `now`: the rest wait from now (or nothing waits).
    fn acknowledged(&mut self, now: Timestamp, done: VecDeque<Queued>) -> Vec<u64> {
        self.waiting_since = (!self.in_flight.is_empty()).then_some(now);
        let keys = done.iter().map(|q| q.seq).collect();
        self.delivered.extend(done);
        while self.delivered.len() > DELIVERED {
            self.delivered.pop_front();
        }
        keys
    }

    /// The master acknowledged the item whose de-duplication key is `key`: it arrived, and so
    /// did every item of its sender's domain sent before it (one s2s stream carries them, in
    /// order). Returns the keys of the items acknowledged.
    pub(super) fn acknowledge_key(&mut self, now: Timestamp, key: &str) -> Vec<u64> {
        let Some(at) = self
            .in_flight
            .iter()
            .rposition(|q| stanza::dedup_key(&q.stanza) == Some(key))
        else {
            return Vec::new();
        };
        let domain = self.in_flight[at].user_domain().to_string();
        let mut done = VecDeque::new();
        let mut waiting = VecDeque::new();
        for (i, q) in std::mem::take(&mut self.in_flight).into_iter().enumerate() {
            if i <= at && q.user_domain() == domain {
                done.push_back(q);
            } else {
                waiting.push_back(q);
            }
        }
        self.in_flight = waiting;
        self.acknowledged(now, done)
    }

    /// A ping answer for `round` from `domain`: what that domain sent up to that round arrived.
    /// Returns the keys of the items acknowledged (no longer to be stored).
    pub(super) fn acknowledge(&mut self, now: Timestamp, round: u64, domain: &str) -> Vec<u64> {
        let (done, waiting): (VecDeque<Queued>, VecDeque<Queued>) =
            std::mem::take(&mut self.in_flight)
                .into_iter()
                .partition(|q| q.round <= round && q.user_domain() == domain);
        self.in_flight = waiting;
        if done.is_empty() {
            return Vec::new();
        }
        self.acknowledged(now, done)
    }

    /// Every item from `user` with stanza id `id` that is still ours to answer for.
    pub(super) fn is_ours(&self, user: &str, id: &str) -> bool {
        self.in_flight
            .iter()
            .chain(self.queue.iter())
            .chain(self.delivered.iter())
            .any(|q| q.stanza.attr("id") == Some(id) && q.user == user)
    }

    /// The master refused the item from `user` with stanza id `id`: keep it for a resend.
    pub(super) fn refuse(&mut self, user: &str, id: &str) -> Refusal {
        let mine = |q: &Queued| q.stanza.attr("id") == Some(id) && q.user == user;
        let (item, was) = match self.in_flight.iter().position(mine) {
            Some(i) => {
                let item = self.in_flight.remove(i);
                if self.in_flight.is_empty() {
                    self.waiting_since = None;
                }
                (item, Refusal::InFlight)
            }
            None => (
                self.delivered
                    .iter()
                    .position(mine)
                    .and_then(|i| self.delivered.remove(i)),
                Refusal::Delivered,
            ),
        };
        match item {
            Some(item) => {
                self.refused.push(item);
                was
            }
            None => Refusal::NotOurs,
        }
    }

    /// Everything not yet acknowledged, in order (refused, in flight, queued).
    pub(super) fn unacknowledged(&self) -> impl Iterator<Item = &Queued> {
        self.refused
            .iter()
            .chain(self.in_flight.iter())
            .chain(self.queue.iter())
    }
}
