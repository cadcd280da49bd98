//! Properties over random sequences of joins, leaves, status changes and messages by users on the
//! master's server and behind both mirrors (the world of `common`):
//!
//! - every occupant gets every groupchat message exactly once, in the order it was sent (per
//!   sender, also when messages from several servers are under way at once);
//! - every occupant sees every join, leave and status change exactly once; nobody else sees it;
//! - the master never sends one mirror two copies of one broadcast, and never echoes a mirror's
//!   own user's message back to it;
//! - afterwards the master's room, the master engine and each mirror agree on who is in.

mod common;

use std::collections::BTreeMap;

use common::xml::*;
use common::*;
use proptest::prelude::*;

/// The users: two on the master's server, two behind A, two behind B.
const USERS: [(Side, &str, &str); 6] = [
    (Side::Master, "scott", "Scott"),
    (Side::Master, "kevin", "Kevin"),
    (Side::A, "wayne", "Wayne"),
    (Side::A, "keith", "Keith"),
    (Side::B, "ann", "Ann"),
    (Side::B, "bob", "Bob"),
];

#[derive(Debug, Clone)]
enum Op {
    Join(usize),
    Leave(usize),
    Say(usize),
    Status(usize),
    /// Several users speak at once: all messages are under way before any is delivered.
    Burst(Vec<usize>),
}

fn op() -> impl Strategy<Value = Op> {
    let u = 0..USERS.len();
    prop_oneof![
        3 => u.clone().prop_map(Op::Join),
        2 => u.clone().prop_map(Op::Leave),
        4 => u.clone().prop_map(Op::Say),
        1 => u.clone().prop_map(Op::Status),
        1 => proptest::collection::vec(u, 2..6).prop_map(Op::Burst),
    ]
}

struct Run {
    w: World,
    jids: Vec<String>,
    joined: [bool; 6],
    /// Per user, the messages it must have received live, in order.
    expected: Vec<Vec<String>>,
    /// Per user, what it received live.
    received: Vec<Vec<String>>,
    counter: usize,
}

impl Run {
    fn new(bracketed: bool) -> Self {
        Run {
            w: if bracketed {
                World::new()
            } else {
                World::unbracketed()
            },
            jids: USERS.iter().map(|(s, n, _)| user(*s, n)).collect(),
            joined: [false; 6],
            expected: vec![Vec::new(); 6],
            received: vec![Vec::new(); 6],
            counter: 0,
        }
    }

    fn nick(i: usize) -> &'static str {
        USERS[i].2
    }

    fn fresh(&mut self, prefix: &str) -> String {
        self.counter += 1;
        format!("{prefix}{}", self.counter)
    }

    /// Every inbox since the last op, recording live messages.
    fn collect(&mut self) -> Vec<Vec<minidom::Element>> {
        let mut out = Vec::new();
        for i in 0..USERS.len() {
            let got = self.w.take(&self.jids[i]);
            self.received[i].extend(live_messages(&got).into_iter().map(|(_, b)| b));
            out.push(got);
        }
        out
    }

    fn apply(&mut self, op: &Op) -> Result<(), TestCaseError> {
        match op {
            Op::Join(i) | Op::Status(i) => {
                let i = *i;
                let was = self.joined[i];
                let status = self.fresh("status#");
                let jid = self.jids[i].clone();
                self.w.send(
                    &jid,
                    &format!(
                        "<presence from='{jid}' to='{ROOM}/{}'><status>{status}</status></presence>",
                        Self::nick(i)
                    ),
                );
                self.joined[i] = true;
                let got = self.collect();
                for (j, stanzas) in got.iter().enumerate() {
                    let about: Vec<Seen> = presences(stanzas)
                        .into_iter()
                        .filter(|p| p.nick == Self::nick(i))
                        .collect();
                    if self.joined[j] {
                        prop_assert_eq!(
                            about.len(),
                            1,
                            "{} about {}: {:?}",
                            Self::nick(j),
                            Self::nick(i),
                            stanzas
                        );
                        prop_assert_eq!(about[0].kind.as_deref(), None);
                        prop_assert_eq!(about[0].statuses.contains(&"110".to_string()), i == j);
                    } else {
                        prop_assert!(
                            stanzas.is_empty(),
                            "{} is out but got {:?}",
                            Self::nick(j),
                            stanzas
                        );
                    }
                }
                if !was {
                    // The joiner got one presence per other occupant, and a subject.
                    let others: Vec<String> = (0..6)
                        .filter(|&j| j != i && self.joined[j])
                        .map(|j| Self::nick(j).to_string())
                        .collect();
                    let mut seen = joined_nicks(&got[i]);
                    seen.retain(|n| n != Self::nick(i));
                    seen.sort();
                    let mut others = others;
                    others.sort();
                    prop_assert_eq!(seen, others);
                    prop_assert_eq!(
                        got[i]
                            .iter()
                            .filter(|s| s.get_child("subject", CLIENT).is_some())
                            .count(),
                        1
                    );
                }
            }
            Op::Leave(i) => {
                let i = *i;
                let was = self.joined[i];
                let jid = self.jids[i].clone();
                self.w.leave(&jid, Self::nick(i));
                self.joined[i] = false;
                let got = self.collect();
                for (j, stanzas) in got.iter().enumerate() {
                    if was && (self.joined[j] || j == i) {
                        let p = presences(stanzas);
                        prop_assert_eq!(p.len(), 1, "{}: {:?}", Self::nick(j), stanzas);
                        prop_assert_eq!(&p[0].nick, Self::nick(i));
                        prop_assert_eq!(p[0].kind.as_deref(), Some("unavailable"));
                        prop_assert_eq!(p[0].statuses.contains(&"110".to_string()), i == j);
                    } else {
                        prop_assert!(stanzas.is_empty(), "{}: {:?}", Self::nick(j), stanzas);
                    }
                }
            }
            Op::Say(i) => {
                let i = *i;
                let body = self.fresh(&format!("{}#", Self::nick(i)));
                let jid = self.jids[i].clone();
                self.w.say(&jid, &body);
                let got = self.collect();
                for (j, stanzas) in got.iter().enumerate() {
                    if !self.joined[i] {
                        let expect: Vec<(String, String)> = if i == j {
                            vec![("message".into(), "not-acceptable".into())]
                        } else {
                            vec![]
                        };
                        prop_assert_eq!(errors(stanzas), expect);
                        prop_assert_eq!(stanzas.len(), usize::from(i == j));
                    } else if self.joined[j] {
                        self.expected[j].push(body.clone());
                        prop_assert_eq!(stanzas.len(), 1, "{}: {:?}", Self::nick(j), stanzas);
                    } else {
                        prop_assert!(stanzas.is_empty());
                    }
                }
            }
            Op::Burst(speakers) => {
                for &i in speakers {
                    if !self.joined[i] {
                        continue;
                    }
                    let body = self.fresh(&format!("{}#", Self::nick(i)));
                    let jid = self.jids[i].clone();
                    self.w.inject(&jid, &groupchat(&jid, &body));
                    for j in 0..6 {
                        if self.joined[j] {
                            self.expected[j].push(body.clone());
                        }
                    }
                }
                self.w.run();
                self.collect();
            }
        }
        Ok(())
    }

    /// Exactly once, and per sender in order (the counter orders each sender's messages).
    fn check_messages(&self) -> Result<(), TestCaseError> {
        for j in 0..6 {
            let mut got = self.received[j].clone();
            let mut want = self.expected[j].clone();
            // Within a burst, messages from different servers may interleave differently for
            // different recipients; each sender's own order must hold.
            let by_sender = |v: &[String]| -> BTreeMap<String, Vec<String>> {
                let mut m: BTreeMap<String, Vec<String>> = BTreeMap::new();
                for b in v {
                    m.entry(sender_of(b)).or_default().push(b.clone());
                }
                m
            };
            prop_assert_eq!(
                by_sender(&got),
                by_sender(&want),
                "{} per sender",
                Self::nick(j)
            );
            got.sort();
            want.sort();
            prop_assert_eq!(got, want, "{} exactly once", Self::nick(j));
        }
        Ok(())
    }

    fn check_links(&self) -> Result<(), TestCaseError> {
        for b in &self.w.master.broadcasts {
            for (to, n) in b {
                prop_assert!(*n <= 1, "{n} copies of one broadcast to {to}");
            }
        }
        for side in [Side::A, Side::B] {
            let mut bodies: BTreeMap<String, usize> = BTreeMap::new();
            for el in self.w.link(side).since(0, Dir::ToMirror) {
                if let Some(b) = body(&el) {
                    *bodies.entry(b).or_default() += 1;
                }
            }
            for (b, n) in &bodies {
                let origin = USERS.iter().find(|u| u.2 == sender_of(b)).map(|u| u.0);
                let want = if origin == Some(side) { 0 } else { 1 };
                prop_assert_eq!(*n, want, "message {} crossed to {:?} {} times", b, side, n);
            }
        }
        Ok(())
    }

    fn check_state(&self) -> Result<(), TestCaseError> {
        let mut want: Vec<String> = (0..6)
            .filter(|&i| self.joined[i])
            .map(|i| Self::nick(i).to_string())
            .collect();
        want.sort();
        let room: Vec<String> = self.w.master.room.occupants.keys().cloned().collect();
        prop_assert_eq!(&room, &want);
        for side in [Side::A, Side::B] {
            let locals = (0..6).any(|i| self.joined[i] && USERS[i].0 == side);
            let mut mirror = self.w.mirror(side).occupants(ROOM);
            mirror.sort();
            if locals {
                prop_assert_eq!(&mirror, &want, "{:?}'s copy of the room", side);
            } else {
                prop_assert!(mirror.is_empty(), "{:?} keeps a room without users", side);
                prop_assert!(!self
                    .w
                    .master
                    .engine
                    .mirrors(ROOM)
                    .contains(&side.mirror().to_string()));
            }
        }
        let remote: Vec<String> = self
            .w
            .master
            .engine
            .remote_occupants(ROOM)
            .into_iter()
            .map(|(n, _, _)| n)
            .collect();
        let mut want_remote: Vec<String> = (0..6)
            .filter(|&i| self.joined[i] && USERS[i].0 != Side::Master)
            .map(|i| Self::nick(i).to_string())
            .collect();
        want_remote.sort();
        prop_assert_eq!(remote, want_remote);
        prop_assert!(
            self.w.mirror_errors.is_empty(),
            "{:?}",
            self.w.mirror_errors
        );
        prop_assert!(
            self.w.master.errors.is_empty(),
            "{:?}",
            self.w.master.errors
        );
        Ok(())
    }
}

/// Bodies are `<sender nick>#<n>`.
fn sender_of(body: &str) -> String {
    body.split('#').next().unwrap_or_default().to_string()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    /// `bracketed`: the host brackets presence broadcasts (Prosody) or not (ejabberd, with
    /// `MasterConfig::unbracketed_presence`).
    #[test]
    fn random_room_activity(ops in proptest::collection::vec(op(), 1..40), bracketed in any::<bool>()) {
        let mut run = Run::new(bracketed);
        for op in &ops {
            run.apply(op)?;
        }
        // A ping round acknowledges what is in flight; rooms whose users left then close.
        run.w.settle();
        run.check_messages()?;
        run.check_links()?;
        run.check_state()?;
    }
}

#[derive(Debug, Clone)]
enum Rough {
    Join(usize),
    Leave(usize),
    Say(usize),
    Cut(Side),
    Stall(Side),
    Restore(Side),
    /// Time passes: pending joins time out.
    Wait,
}

fn rough() -> impl Strategy<Value = Rough> {
    let u = 0..USERS.len();
    let side = prop_oneof![Just(Side::A), Just(Side::B)];
    prop_oneof![
        3 => u.clone().prop_map(Rough::Join),
        2 => u.clone().prop_map(Rough::Leave),
        3 => u.prop_map(Rough::Say),
        1 => side.clone().prop_map(Rough::Cut),
        1 => side.clone().prop_map(Rough::Stall),
        2 => side.prop_map(Rough::Restore),
        1 => Just(Rough::Wait),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    /// With links cut, stalled and restored at random, once every link is back (and a ping round
    /// has passed) the master's room, the master engine and every mirror agree on who is in; no
    /// engine errs; no broadcast is sent twice to one mirror; no one gets a live message twice;
    /// and every message a mirror user saw sent reached the master's room exactly once.
    #[test]
    fn outages_converge(ops in proptest::collection::vec(rough(), 1..40)) {
        let mut w = World::new();
        let jids: Vec<String> = USERS.iter().map(|(s, n, _)| user(*s, n)).collect();
        for (n, op) in ops.iter().enumerate() {
            match op {
                Rough::Join(i) => w.join(&jids[*i], USERS[*i].2),
                Rough::Leave(i) => w.leave(&jids[*i], USERS[*i].2),
                Rough::Say(i) => w.say(&jids[*i], &format!("{}#{n}", USERS[*i].2)),
                Rough::Cut(s) => if w.link(*s).state == LinkState::Up { w.cut(*s) },
                Rough::Stall(s) => if w.link(*s).state == LinkState::Up { w.stall(*s) },
                Rough::Restore(s) => w.restore(*s),
                Rough::Wait => w.advance(31_000),
            }
        }
        w.restore(Side::A);
        w.restore(Side::B);
        w.settle();

        let room: Vec<String> = w.master.room.occupants.keys().cloned().collect();
        for side in [Side::A, Side::B] {
            let locals: Vec<String> = w.mirror(side).local_occupants(ROOM).into_iter().map(|(_, n)| n).collect();
            for n in &locals {
                prop_assert!(room.contains(n), "{:?}'s local {} is not in the master's room {:?}", side, n, room);
            }
            let mut view = w.mirror(side).occupants(ROOM);
            view.sort();
            if locals.is_empty() {
                prop_assert!(w.mirror(side).rooms().is_empty(), "{:?} keeps a room without users", side);
            } else {
                prop_assert_eq!(&view, &room, "{:?}'s view", side);
            }
            let in_room: Vec<String> = room.iter().filter(|n| USERS.iter().any(|(s, _, nick)| s == &side && nick == *n)).cloned().collect();
            let mut locals = locals;
            locals.sort();
            prop_assert_eq!(locals, in_room, "{:?}'s users in the master's room", side);
        }
        let mut remote: Vec<String> = w.master.engine.remote_occupants(ROOM).into_iter().map(|(n, _, _)| n).collect();
        remote.sort();
        let want: Vec<String> = room.iter().filter(|n| !["Scott", "Kevin"].contains(&n.as_str())).cloned().collect();
        prop_assert_eq!(remote, want);
        for b in &w.master.broadcasts {
            prop_assert!(b.values().all(|n| *n <= 1), "{:?}", b);
        }
        for (who, got) in &w.inboxes {
            let mut live: Vec<String> = live_messages(got).into_iter().map(|(_, b)| b).collect();
            let n = live.len();
            live.sort();
            live.dedup();
            prop_assert_eq!(live.len(), n, "{} got a live message twice", who);
        }
        // A mirror user's message is shown to its sender at once (the mirror's echo); the master
        // must end up with each such message once, outage or not.
        let at_master: Vec<String> = w.master.room.history.iter().filter_map(body).collect();
        for (i, jid) in jids.iter().enumerate() {
            if USERS[i].0 == Side::Master {
                continue;
            }
            let echoed: Vec<String> = w.inbox(jid).iter()
                .filter(|m| m.attr("from") == Some(&format!("{ROOM}/{}", USERS[i].2)) && m.get_child("delay", "urn:xmpp:delay").is_none())
                .filter_map(body)
                .collect();
            for b in echoed {
                let n = at_master.iter().filter(|x| **x == b).count();
                prop_assert_eq!(n, 1, "{} reached the master {} times", b, n);
            }
        }
        prop_assert!(w.mirror_errors.is_empty(), "{:?}", w.mirror_errors);
        prop_assert!(w.master.errors.is_empty(), "{:?}", w.master.errors);
    }
}
