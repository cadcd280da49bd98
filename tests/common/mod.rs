//! An in-memory world for integration tests, in the style of quinn-proto's `tests/util.rs`: a
//! master server (the model MUC room of [`model`] beside a `dmuc::master::Master`) and two mirror
//! servers (each a `dmuc::mirror::Mirror` and its local users), wired by s2s links that route
//! stanzas by the `to` domain. Each link can be cut (the engines are told, traffic is dropped) or
//! stalled (traffic is held, nobody is told) and counts the stanzas that cross it. Time is
//! virtual: every user action advances the clock by one second.
//!
//! Users are plain recipients that record every stanza they get, in order.

#![allow(dead_code)]

pub mod model;
pub mod xml;

use std::collections::{BTreeMap, VecDeque};

use dmuc::mirror::{Mirror, MirrorConfig, StoreOp, Verdict};
use dmuc::Timestamp;
use minidom::Element;

use model::MasterHost;

pub const ROOM: &str = "chatroom@conference.fairfax.tridsys.com";
pub const MUC_SERVICE: &str = "conference.fairfax.tridsys.com";
pub const MASTER_DOMAIN: &str = "fairfax.tridsys.com";
pub const A_DOMAIN: &str = "raleigh.tridsys.com";
pub const A_MIRROR: &str = "mirror.raleigh.tridsys.com";
pub const B_DOMAIN: &str = "durham.tridsys.com";
pub const B_MIRROR: &str = "mirror.durham.tridsys.com";

/// The three servers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Side {
    Master,
    A,
    B,
}

impl Side {
    pub fn domain(self) -> &'static str {
        match self {
            Side::Master => MASTER_DOMAIN,
            Side::A => A_DOMAIN,
            Side::B => B_DOMAIN,
        }
    }

    pub fn mirror(self) -> &'static str {
        match self {
            Side::Master => panic!("the master has no mirror"),
            Side::A => A_MIRROR,
            Side::B => B_MIRROR,
        }
    }
}

/// The domain part of a JID given as text (the node may hold escaped `\40`, never a raw `/`).
pub fn domain_of(jid: &str) -> String {
    let bare = jid.split('/').next().unwrap_or_default();
    bare.rsplit('@')
        .next()
        .unwrap_or_default()
        .to_ascii_lowercase()
}

/// Which server a domain lives on.
pub fn side_of(domain: &str) -> Option<Side> {
    let on = |d: &str| domain == d || domain.ends_with(&format!(".{d}"));
    if on(MASTER_DOMAIN) {
        Some(Side::Master)
    } else if on(A_DOMAIN) {
        Some(Side::A)
    } else if on(B_DOMAIN) {
        Some(Side::B)
    } else {
        None
    }
}

/// Direction of a crossing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dir {
    ToMirror,
    ToMaster,
}

/// A link's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkState {
    Up,
    /// The s2s session is gone: the engines were told; stanzas are lost.
    Cut,
    /// The link is stalled: stanzas wait, in order, until it is restored.
    Stalled,
    /// A black hole: stanzas are lost and nobody is told.
    Lost,
}

/// The s2s link between the master server and one mirror server.
#[derive(Debug)]
pub struct Link {
    pub state: LinkState,
    held: VecDeque<Packet>,
    /// Every stanza that crossed, in order.
    pub log: Vec<(Dir, String)>,
    pub dropped: usize,
    /// Of those, the pings (XEP-0199 gets) the mirror sent.
    pub dropped_pings: usize,
}

impl Link {
    fn new() -> Self {
        Link {
            state: LinkState::Up,
            held: VecDeque::new(),
            log: Vec::new(),
            dropped: 0,
            dropped_pings: 0,
        }
    }

    /// Stanzas that crossed in `dir` since log position `mark`.
    pub fn since(&self, mark: usize, dir: Dir) -> Vec<Element> {
        self.log[mark..]
            .iter()
            .filter(|(d, _)| *d == dir)
            .map(|(_, x)| xml::parse(x))
            .collect()
    }

    pub fn count(&self, dir: Dir) -> usize {
        self.log.iter().filter(|(d, _)| *d == dir).count()
    }
}

#[derive(Debug, Clone)]
struct Packet {
    side: Side,
    xml: String,
    /// Did it come over a link (as opposed to from the same server)?
    crossed: bool,
}

/// The world.
pub struct World {
    pub now: Timestamp,
    pub master: MasterHost,
    pub mirrors: BTreeMap<Side, Mirror>,
    /// Each mirror's server's stored queue, as its host keeps it: every `poll_store` change
    /// applied, item by item. It outlives a mirror's restart.
    pub stores: BTreeMap<Side, BTreeMap<u64, String>>,
    /// The store changes each mirror asked for (puts and deletes).
    pub store_ops: BTreeMap<Side, usize>,
    pub links: BTreeMap<Side, Link>,
    pub inboxes: BTreeMap<String, Vec<Element>>,
    /// Errors the mirrors returned (a host logs and bounces them).
    pub mirror_errors: Vec<(Side, dmuc::Error)>,
    /// Virtual time between two injected stanzas (1 s unless a test floods).
    pub inject_step_ms: u64,
    /// The master's acknowledgements are lost on the way (a master of an older dmuc sends none).
    pub drop_acks: bool,
    queue: VecDeque<Packet>,
}

/// A groupchat message from `who` to the room.
pub fn groupchat(who: &str, body: &str) -> String {
    format!("<message from='{who}' to='{ROOM}' type='groupchat'><body>{body}</body></message>")
}

/// A user's full JID: `name@domain/pc`.
pub fn user(side: Side, name: &str) -> String {
    format!("{name}@{}/pc", side.domain())
}

impl Default for World {
    fn default() -> Self {
        Self::new()
    }
}

impl World {
    /// Master room open and semi-anonymous; scott@fairfax is its owner, kevin@fairfax an admin.
    /// The host brackets every broadcast (Prosody).
    pub fn new() -> Self {
        Self::with_brackets(true)
    }

    /// The same, for a host that cannot bracket presence broadcasts (ejabberd).
    pub fn unbracketed() -> Self {
        Self::with_brackets(false)
    }

    fn with_brackets(bracket_presence: bool) -> Self {
        let mut master =
            MasterHost::new(ROOM, MASTER_DOMAIN, &[A_MIRROR, B_MIRROR], bracket_presence);
        master
            .room
            .affiliations
            .insert(format!("scott@{MASTER_DOMAIN}"), "owner".into());
        master
            .room
            .affiliations
            .insert(format!("kevin@{MASTER_DOMAIN}"), "admin".into());
        let mut mirrors = BTreeMap::new();
        for side in [Side::A, Side::B] {
            mirrors.insert(
                side,
                Mirror::new(MirrorConfig::new(side.mirror(), vec![MUC_SERVICE.into()])),
            );
        }
        let mut links = BTreeMap::new();
        links.insert(Side::A, Link::new());
        links.insert(Side::B, Link::new());
        World {
            now: Timestamp(1_295_424_000_000),
            master,
            mirrors,
            stores: BTreeMap::new(),
            store_ops: BTreeMap::new(),
            links,
            inboxes: BTreeMap::new(),
            mirror_errors: Vec::new(),
            inject_step_ms: 1000,
            drop_acks: false,
            queue: VecDeque::new(),
        }
    }

    /// Start the mirrors afresh with a changed configuration (before anyone joins).
    pub fn configure_mirrors(&mut self, f: impl Fn(&mut MirrorConfig)) {
        for side in [Side::A, Side::B] {
            let mut c = MirrorConfig::new(side.mirror(), vec![MUC_SERVICE.into()]);
            f(&mut c);
            self.mirrors.insert(side, Mirror::new(c));
        }
    }

    /// The host's timer-free side of a shutdown: what the mirror holds back goes to the store.
    pub fn flush_store(&mut self, side: Side) {
        self.mirrors.get_mut(&side).unwrap().flush_store();
        self.drain_mirror(side);
    }

    pub fn mirror(&self, side: Side) -> &Mirror {
        &self.mirrors[&side]
    }

    pub fn mirror_mut(&mut self, side: Side) -> &mut Mirror {
        self.mirrors.get_mut(&side).unwrap()
    }

    pub fn link(&self, side: Side) -> &Link {
        &self.links[&side]
    }

    /// Current log position of a link (for [`Link::since`]).
    pub fn mark(&self, side: Side) -> usize {
        self.links[&side].log.len()
    }

    // ---- users ----

    /// A user sends a stanza; the world runs until nothing more moves.
    pub fn send(&mut self, from: &str, stanza: &str) {
        self.inject(from, stanza);
        self.run();
    }

    /// A user sends a stanza, which goes as far as the first hop; call [`World::run`] to let it
    /// (and anything else under way) go on. Several injections before a run are concurrent.
    pub fn inject(&mut self, from: &str, stanza: &str) {
        self.now = self.now.plus_ms(self.inject_step_ms);
        let side = side_of(&domain_of(from)).expect("user on a known server");
        if side == Side::Master {
            self.route(Side::Master, stanza.to_string());
        } else {
            let to = xml::parse(stanza)
                .attr("to")
                .unwrap_or_default()
                .to_string();
            let now = self.now;
            let m = self.mirrors.get_mut(&side).unwrap();
            if m.handles(&to) {
                match m.handle_local(now, stanza) {
                    Ok(Verdict::Consumed) => {}
                    Ok(Verdict::Pass) => self.route(side, stanza.to_string()),
                    Err(e) => self.mirror_errors.push((side, e)),
                }
                self.drain_mirror(side);
            } else {
                self.route(side, stanza.to_string());
            }
        }
    }

    pub fn join(&mut self, who: &str, nick: &str) {
        self.send(
            who,
            &format!(
                "<presence from='{who}' to='{ROOM}/{nick}'><x xmlns='http://jabber.org/protocol/muc'/></presence>"
            ),
        );
    }

    pub fn leave(&mut self, who: &str, nick: &str) {
        self.send(
            who,
            &format!("<presence from='{who}' to='{ROOM}/{nick}' type='unavailable'/>"),
        );
    }

    /// `who`, behind a mirror, goes offline without leaving (their stream closes): their server
    /// hands the mirror their broadcast unavailable presence.
    pub fn go_offline(&mut self, who: &str) -> usize {
        self.now = self.now.plus_ms(1000);
        let side = side_of(&domain_of(who)).expect("user on a known server");
        let now = self.now;
        let m = self.mirrors.get_mut(&side).expect("a user behind a mirror");
        let left = m
            .handle_local_unavailable(
                now,
                &format!("<presence from='{who}' type='unavailable'><status>Disconnected: closed</status></presence>"),
            )
            .expect("a well-formed presence");
        self.drain_mirror(side);
        self.run();
        left
    }

    pub fn status(&mut self, who: &str, nick: &str, show: &str) {
        self.send(
            who,
            &format!("<presence from='{who}' to='{ROOM}/{nick}'><show>{show}</show></presence>"),
        );
    }

    pub fn say(&mut self, who: &str, body: &str) {
        self.send(who, &groupchat(who, body));
    }

    /// Everything `who` got so far, and forget it.
    pub fn take(&mut self, who: &str) -> Vec<Element> {
        self.inboxes.remove(who).unwrap_or_default()
    }

    /// Everything `who` got so far.
    pub fn inbox(&self, who: &str) -> &[Element] {
        self.inboxes.get(who).map(Vec::as_slice).unwrap_or(&[])
    }

    /// Forget every inbox.
    pub fn clear_inboxes(&mut self) {
        self.inboxes.clear();
    }

    // ---- links and time ----

    /// The s2s link to `side` breaks: both ends learn it, traffic is lost until [`World::restore`].
    pub fn cut(&mut self, side: Side) {
        self.links.get_mut(&side).unwrap().state = LinkState::Cut;
        let now = self.now;
        // Prosody reports each s2s session: the users' domain and the mirror service's.
        self.master.link(now, side.domain(), false);
        self.master.link(now, side.mirror(), false);
        self.flush_master();
        self.mirrors
            .get_mut(&side)
            .unwrap()
            .handle_link(now, MUC_SERVICE, false);
        self.drain_mirror(side);
        self.run();
    }

    /// Every s2s session between the master's server and `side` closes. With `broken`, the link
    /// is gone too (a reset: new connections fail, stanzas are lost); without, it stays up (an
    /// idle close: the next stanza opens a new session). Each end's host reports the closes.
    pub fn s2s_close(&mut self, side: Side, broken: bool) {
        if broken {
            self.links.get_mut(&side).unwrap().state = LinkState::Lost;
        }
        let now = self.now;
        self.master.s2s_closed(now, side.domain());
        self.master.s2s_closed(now, side.mirror());
        self.flush_master();
        let m = self.mirrors.get_mut(&side).unwrap();
        m.handle_s2s_closed(now, MUC_SERVICE);
        m.handle_s2s_in_closed(now, MUC_SERVICE);
        self.drain_mirror(side);
        self.run();
    }

    /// The link becomes a black hole: stanzas are lost, nobody is told.
    pub fn black_hole(&mut self, side: Side) {
        self.links.get_mut(&side).unwrap().state = LinkState::Lost;
    }

    /// Advance time in `step_ms` steps until `done` holds or `limit_ms` have passed; the time it
    /// took, or `None`.
    pub fn advance_until(
        &mut self,
        step_ms: u64,
        limit_ms: u64,
        done: impl Fn(&World) -> bool,
    ) -> Option<u64> {
        let start = self.now;
        while self.now.since(start) < limit_ms {
            self.advance(step_ms);
            if done(self) {
                return Some(self.now.since(start));
            }
        }
        None
    }

    /// The link stalls: stanzas are held, in order; nobody is told.
    pub fn stall(&mut self, side: Side) {
        self.links.get_mut(&side).unwrap().state = LinkState::Stalled;
    }

    /// The link is back: held stanzas go first, then both ends are told (if it was cut).
    pub fn restore(&mut self, side: Side) {
        self.now = self.now.plus_ms(1000);
        let link = self.links.get_mut(&side).unwrap();
        let was = link.state;
        link.state = LinkState::Up;
        let held: Vec<Packet> = link.held.drain(..).collect();
        for p in held {
            self.cross(side, p);
        }
        self.run();
        if was == LinkState::Cut {
            let now = self.now;
            self.master.link(now, side.domain(), true);
            self.master.link(now, side.mirror(), true);
            self.flush_master();
            self.mirrors
                .get_mut(&side)
                .unwrap()
                .handle_link(now, MUC_SERVICE, true);
            self.drain_mirror(side);
            self.run();
        }
    }

    /// Let the master's host do something to its room (an admin action), then run.
    pub fn at_master(&mut self, f: impl FnOnce(&mut MasterHost, Timestamp)) {
        self.now = self.now.plus_ms(1000);
        let now = self.now;
        f(&mut self.master, now);
        self.flush_master();
        self.run();
    }

    /// Advance virtual time, firing the master's and the mirrors' timers.
    pub fn advance(&mut self, ms: u64) {
        self.now = self.now.plus_ms(ms);
        let now = self.now;
        self.master.tick(now);
        self.flush_master();
        for side in [Side::A, Side::B] {
            let now = self.now;
            let m = self.mirrors.get_mut(&side).unwrap();
            if m.poll_timeout().is_some_and(|t| t <= now) {
                m.handle_timeout(now);
            }
            self.drain_mirror(side);
        }
        self.run();
    }

    /// The s2s connection to `side` dies and is replaced: what it held is lost, unbounced, and
    /// the mirror's host reports the closed session (Prosody's s2sout-destroyed).
    pub fn reconnect(&mut self, side: Side) {
        let link = self.links.get_mut(&side).unwrap();
        link.dropped += link.held.len();
        link.held.clear();
        link.state = LinkState::Up;
        let now = self.now;
        let m = self.mirrors.get_mut(&side).unwrap();
        m.handle_s2s_closed(now, MUC_SERVICE);
        m.handle_s2s_in_closed(now, MUC_SERVICE);
        self.drain_mirror(side);
        self.run();
    }

    /// Let ping rounds pass (three default intervals): what is in flight is acknowledged, rooms
    /// whose users all left close, and a mirror whose link died unnoticed finds out.
    pub fn settle(&mut self) {
        for _ in 0..3 {
            self.advance(301_000);
        }
    }

    // ---- plumbing ----

    pub fn drain_mirror(&mut self, side: Side) {
        let m = self.mirrors.get_mut(&side).unwrap();
        let mut out = Vec::new();
        while let Some(x) = m.poll_transmit() {
            out.push(x);
        }
        let store = self.stores.entry(side).or_default();
        let ops = self.store_ops.entry(side).or_default();
        while let Some(op) = m.poll_store() {
            *ops += 1;
            match op {
                StoreOp::Put { key, item } => {
                    store.insert(key, item);
                }
                StoreOp::Delete { key } => {
                    assert!(store.remove(&key).is_some(), "deleted {key}, never stored");
                }
            }
        }
        // The per-item changes add up to exactly what is not yet acknowledged, but for what
        // is held back from the store (write-behind).
        let held = m.held_back();
        let mut stored: Vec<&String> = store.values().chain(held.iter()).collect();
        let exported = m.export_queue();
        let mut exported: Vec<&String> = exported.iter().collect();
        stored.sort();
        exported.sort();
        assert_eq!(
            stored, exported,
            "the store of {side:?} drifted from the queue"
        );
        for x in out {
            self.route(side, x);
        }
    }

    fn flush_master(&mut self) {
        let out = std::mem::take(&mut self.master.out);
        for x in out {
            self.route(Side::Master, x);
        }
    }

    /// Send a stanza from a server towards its `to`.
    fn route(&mut self, from: Side, text: String) {
        let to = xml::parse(&text).attr("to").unwrap_or_default().to_string();
        let side = side_of(&domain_of(&to)).unwrap_or_else(|| panic!("no route to '{to}': {text}"));
        if side == from {
            self.queue.push_back(Packet {
                side,
                xml: text,
                crossed: false,
            });
            return;
        }
        assert!(
            from == Side::Master || side == Side::Master,
            "mirrors must not talk to each other: {text}"
        );
        let link_side = if from == Side::Master { side } else { from };
        let packet = Packet {
            side,
            xml: text,
            crossed: true,
        };
        let link = self.links.get_mut(&link_side).unwrap();
        match link.state {
            LinkState::Up => self.cross(link_side, packet),
            LinkState::Cut | LinkState::Lost => {
                link.dropped += 1;
                if side == Side::Master && packet.xml.contains("<ping xmlns='urn:xmpp:ping'") {
                    link.dropped_pings += 1;
                }
            }
            LinkState::Stalled => link.held.push_back(packet),
        }
    }

    fn cross(&mut self, link_side: Side, packet: Packet) {
        if self.drop_acks
            && packet.side != Side::Master
            && packet.xml.contains("<ack xmlns='urn:xmpp:dmuc:0'")
        {
            return;
        }
        let dir = if packet.side == Side::Master {
            Dir::ToMaster
        } else {
            Dir::ToMirror
        };
        self.links
            .get_mut(&link_side)
            .unwrap()
            .log
            .push((dir, packet.xml.clone()));
        self.queue.push_back(packet);
    }

    /// Deliver queued stanzas until nothing moves.
    pub fn run(&mut self) {
        let mut steps = 0;
        while let Some(p) = self.queue.pop_front() {
            steps += 1;
            assert!(steps < 100_000, "the world does not settle");
            self.deliver(p);
        }
    }

    fn deliver(&mut self, p: Packet) {
        let el = xml::parse(&p.xml);
        let to = el.attr("to").unwrap_or_default().to_string();
        let domain = domain_of(&to);
        let now = self.now;
        match p.side {
            Side::Master => {
                if domain == MUC_SERVICE {
                    self.master.receive(now, &p.xml);
                    self.flush_master();
                } else if domain == MASTER_DOMAIN {
                    self.inboxes.entry(to).or_default().push(el);
                } else {
                    panic!("nobody at '{to}'");
                }
            }
            side => {
                let m = self.mirrors.get_mut(&side).unwrap();
                if domain == side.mirror() {
                    if let Err(e) = m.handle_remote(now, &p.xml) {
                        self.mirror_errors.push((side, e));
                    }
                } else if domain == side.domain() {
                    // The user host shows the mirror what the master sends its users directly
                    // (mod_dmuc does so for error presences; the engine ignores the rest).
                    let verdict = if p.crossed {
                        m.handle_remote(now, &p.xml)
                    } else {
                        Ok(Verdict::Pass)
                    };
                    match verdict {
                        Ok(Verdict::Pass) => self.inboxes.entry(to).or_default().push(el),
                        Ok(Verdict::Consumed) => {}
                        Err(e) => self.mirror_errors.push((side, e)),
                    }
                } else {
                    panic!("nobody at '{to}'");
                }
                self.drain_mirror(side);
            }
        }
    }
}
