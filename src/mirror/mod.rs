//! The mirror role: a service on the users' server that keeps a copy of each remote room that has
//! local occupants. Local users' stanzas for a mirrored room come here; the mirror serves joins
//! from its copy, delivers each message to its local occupants at once and sends it to the master
//! once, fans the master's broadcasts out to its local occupants, and keeps local chat going while
//! the link is down.
//!
//! # API
//!
//! Getters: [`Mirror::handles`], [`Mirror::rooms`], [`Mirror::local_occupants`],
//! [`Mirror::occupants`], [`Mirror::queue_depth`], [`Mirror::link_up`].
//!
//! Inputs (`handle_*`, each given the current time):
//! - [`Mirror::handle_local`]: a stanza from a local user to a mirrored service;
//! - [`Mirror::handle_remote`]: a stanza from a mirrored service, to the mirror (or to a local user);
//! - [`Mirror::handle_link`]: the host saw the s2s link to a master go down or come up;
//! - [`Mirror::handle_s2s_closed`] / [`Mirror::handle_s2s_in_closed`]: the host saw an
//!   outgoing / incoming s2s session with a master close (what was in flight goes again / the
//!   rooms catch up);
//! - [`Mirror::handle_timeout`]: the time asked for by [`Mirror::poll_timeout`] has come (ping
//!   rounds, ping deadlines, join and sync deadlines);
//! - [`Mirror::import_queue`]: at start, the outbound queue items the host stored before a
//!   restart.
//!
//! Outputs (`poll_*`): [`Mirror::poll_transmit`] (stanzas to route: to local users, or to the
//! master; or [`Mirror::poll_transmit_batch`], the same with each fan-out as one stanza and its
//! recipients), [`Mirror::poll_timeout`], and [`Mirror::poll_store`] (one change at a time to the
//! stored outbound queue: put or delete one item).
//!
//! # Link loss
//!
//! The mirror pings each master it has rooms on (see [`crate::link`]). When a ping goes
//! unanswered or bounces, the remote occupants are shown leaving (status 333), local chat goes on,
//! and local users' messages queue, along with those still in flight. When a ping is answered
//! again, the mirror asks each room for its roster, rejoins users the master lost, catches up on
//! what the master's side said (history `since`, de-duplicated), and sends the queue in order.
//! Each message carries an XEP-0359 origin-id, by which the master drops a second copy.

//!
//! # Shape
//!
//! [`Mirror`] is a thin coordinator. Each incoming stanza is classified once
//! (`classify`), then handed to the one place that handles it:
//! - `local`: stanzas from local users (joins, leaves, status, groupchat);
//! - `remote`: stanzas from the master (broadcasts, sync IQs, errors, escaped addresses);
//! - `sync`: the room's sync with the master (roster, history, catch-up, queue flush);
//! - `health`: link health (pings, down and up);
//! - `room`, `replica`, `outbound`: the state of one room, its copy of the room, its queue;
//! - `store`: the changes the host makes to its stored copy of the queues.

mod classify;
mod health;
mod local;
mod outbound;
mod remote;
mod replica;
mod room;
mod store;
mod sync;

pub use crate::transmit::Transmit;
pub use store::StoreOp;

use std::collections::{BTreeMap, BTreeSet};

use jid::Jid;
use minidom::Element;
use tracing::{debug, info, warn};

use crate::ack;
use crate::bounds::Limits;
use crate::error::Error;
use crate::link::Link;
use crate::ns;
use crate::queue::Queued;
use crate::recent::Recent;
use crate::stanza_ids::IdSource;

/// Local users who left lately, still served stanzas from the room through the mirror.
const RECENTLY_LEFT: usize = 1000;
use crate::stanza::{self, Condition};
use crate::time::Timestamp;
use crate::transmit::Transmits;

use classify::{classify_local, classify_remote, is_bounce, FromLocal, FromMaster};
use room::{MirrorRoom, Sync};

/// Mirror settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MirrorConfig {
    /// The mirror service's own domain, e.g. `mirror.raleigh.localhost`.
    pub service: String,
    /// The MUC services this mirror mirrors, e.g. `conference.fairfax.localhost`.
    pub masters: Vec<String>,
    /// Groupchat messages queued per room while the link is down; past this, senders get
    /// `resource-constraint`.
    pub queue_limit: usize,
    /// How long a join waits for the master before the user gets `remote-server-timeout`.
    pub join_timeout_ms: u64,
    /// Messages of history kept per room, and served to local joins.
    pub history_size: usize,
    /// A link to a master quiet this long in either direction gets a ping round (traffic
    /// counts as pings, see [`crate::link`]); while down, the longest wait between probes.
    pub ping_interval_ms: u64,
    /// How long a ping may go unanswered before the link counts as down.
    pub ping_timeout_ms: u64,
    /// A catch-up after an outage asks for history from this long before the newest message the
    /// mirror had (covers clock skew and second-precision stamps); duplicates are dropped.
    pub catch_up_margin_ms: u64,
    /// Local occupants per mirrored room (joins under way included); past this a join gets
    /// `resource-constraint`.
    pub max_local_occupants: usize,
    /// Mirrored rooms with local occupants; a join to one more gets `resource-constraint`.
    pub max_rooms: usize,
    /// Depth and size of the stanzas the mirror accepts from local users, masters and
    /// outsiders (see [`crate::bounds`]).
    pub limits: Limits,
    /// Write-behind: a message sent to the master over a link that is up reaches the host's
    /// store only if the master has not acknowledged it after this long (0: at once). Queued
    /// messages (the link is down) are stored at once, held ones when a link goes down and at
    /// [`Mirror::flush_store`]. See docs/protocol.md, "Storage format and cost".
    pub store_after_ms: u64,
}

impl MirrorConfig {
    /// Defaults: a queue of 1000 messages, joins time out after 30 s, 20 messages of history, a
    /// ping after 300 s of quiet answered within 20 s, a catch-up margin of 30 s, 1000 local occupants per
    /// room and 1000 rooms, the default [`Limits`], messages stored once unacknowledged for 2 s.
    pub fn new(service: impl Into<String>, masters: Vec<String>) -> Self {
        MirrorConfig {
            service: service.into().to_ascii_lowercase(),
            masters: masters
                .into_iter()
                .map(|m| m.to_ascii_lowercase())
                .collect(),
            queue_limit: 1000,
            join_timeout_ms: 30_000,
            history_size: 20,
            ping_interval_ms: 300_000,
            ping_timeout_ms: 20_000,
            catch_up_margin_ms: 30_000,
            max_local_occupants: 1000,
            max_rooms: 1000,
            limits: Limits::default(),
            store_after_ms: 2_000,
        }
    }
}

/// What the host does with a stanza after [`Mirror::handle_local`] or [`Mirror::handle_remote`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The mirror took it; its consequences come from [`Mirror::poll_transmit`].
    Consumed,
    /// Not the mirror's business: route it as usual.
    Pass,
}

/// The link state of one master, for an admin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkStatus {
    /// The master MUC service.
    pub master: String,
    /// Is the link up, as far as the mirror knows?
    pub up: bool,
    /// Mirrored rooms on that master.
    pub rooms: usize,
    /// Messages waiting for the link.
    pub queued: usize,
    /// Messages sent but not yet acknowledged by a ping answer.
    pub in_flight: usize,
    /// Outages seen since start.
    pub outages: u64,
    /// When the master last answered a ping.
    pub last_pong: Option<Timestamp>,
    /// When the last resync after an outage started.
    pub last_resync: Option<Timestamp>,
    /// Since when the link is down, while it is.
    pub down_since: Option<Timestamp>,
}

/// The ping round a message sent now to `master` belongs to.
fn round_of(links: &BTreeMap<String, Link>, master: &str) -> u64 {
    links.get(master).map(Link::round).unwrap_or_default()
}

/// The mirror engine for one mirror service.
#[derive(Debug, Clone)]
pub struct Mirror {
    config: MirrorConfig,
    rooms: BTreeMap<String, MirrorRoom>,
    links: BTreeMap<String, Link>,
    transmits: Transmits,
    next_id: u64,
    /// Stanza-ids this mirror proposes for its users' messages.
    stanza_ids: IdSource,
    /// What the host must change in its stored queue.
    store: store::Journal,
    /// Local users who left a room lately: what the room still sends them through the mirror
    /// (the answer to the request that made them leave, say) is delivered, not dropped.
    recently_left: Recent<String>,
    /// Leavers the mirror showed the room's own presence withdrawn (see
    /// `withdraw_room_presence`): the room's own withdrawal is then not delivered again.
    withdrawn: BTreeSet<String>,
    /// Local users the room itself sent its withdrawal (before their leave): none is made up.
    room_withdrew: BTreeSet<String>,
    /// The time of the call being handled (every input gives it).
    now: Timestamp,
}

/// The domain of a JID's text, lowercased (no validation: for routing decisions on JIDs the
/// engine itself wrote).
fn jid_domain(jid: &str) -> String {
    let bare = jid.split('/').next().unwrap_or_default();
    bare.rsplit('@')
        .next()
        .unwrap_or_default()
        .to_ascii_lowercase()
}

fn split(jid: &Jid) -> (String, Option<String>) {
    (
        jid.to_bare().to_string(),
        jid.resource().map(|r| r.to_string()),
    )
}

impl Mirror {
    /// A mirror with these settings.
    pub fn new(config: MirrorConfig) -> Self {
        Mirror {
            stanza_ids: IdSource::new(&config.service),
            config,
            rooms: BTreeMap::new(),
            links: BTreeMap::new(),
            transmits: Transmits::default(),
            next_id: 0,
            store: store::Journal::default(),
            recently_left: Recent::new(RECENTLY_LEFT),
            withdrawn: BTreeSet::new(),
            room_withdrew: BTreeSet::new(),
            now: Timestamp(0),
        }
    }

    /// Is `jid` (a room or occupant JID, or a service) on a service this mirror mirrors?
    pub fn handles(&self, jid: &str) -> bool {
        let domain = jid.split('/').next().unwrap_or_default();
        let domain = domain.rsplit('@').next().unwrap_or_default();
        self.config
            .masters
            .iter()
            .any(|m| m.eq_ignore_ascii_case(domain))
    }

    /// The mirrored rooms that have local occupants (or joins under way).
    pub fn rooms(&self) -> Vec<String> {
        self.rooms.keys().cloned().collect()
    }

    /// `(full JID, nick)` of the local occupants of `room`.
    pub fn local_occupants(&self, room: &str) -> Vec<(String, String)> {
        self.rooms
            .get(room)
            .map(|r| {
                r.replica
                    .local
                    .iter()
                    .map(|(j, (n, _))| (j.clone(), n.clone()))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Nicks of every occupant of `room` the mirror knows, local or remote.
    pub fn occupants(&self, room: &str) -> Vec<String> {
        self.rooms
            .get(room)
            .map(|r| r.replica.occupants.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// Messages queued for the master in `room` (waiting for the link).
    pub fn queue_depth(&self, room: &str) -> usize {
        self.rooms.get(room).map(|r| r.out.queue.len()).unwrap_or(0)
    }

    /// Messages sent to the master from `room` that no ping answer has acknowledged yet.
    pub fn in_flight(&self, room: &str) -> usize {
        self.rooms
            .get(room)
            .map(|r| r.out.in_flight.len())
            .unwrap_or(0)
    }

    /// Is the link to `master` (a MUC service domain) up, as far as the mirror knows?
    pub fn link_up(&self, master: &str) -> bool {
        !self
            .links
            .get(&master.to_ascii_lowercase())
            .is_some_and(|l| l.down)
    }

    /// Link state, queue depth and last resync of every master this mirror has talked to.
    pub fn status(&self) -> Vec<LinkStatus> {
        self.links
            .iter()
            .map(|(master, l)| {
                let rooms: Vec<&MirrorRoom> = self
                    .rooms
                    .values()
                    .filter(|r| &r.master == master)
                    .collect();
                LinkStatus {
                    master: master.clone(),
                    up: !l.down,
                    rooms: rooms.len(),
                    queued: rooms.iter().map(|r| r.out.queue.len()).sum(),
                    in_flight: rooms.iter().map(|r| r.out.in_flight.len()).sum(),
                    outages: l.outages,
                    last_pong: l.last_pong,
                    last_resync: l.last_resync,
                    down_since: l.down_since,
                }
            })
            .collect()
    }

    /// The next change to the stored outbound queue, so that a restart loses nothing: the host
    /// stores or deletes one item per change, under its key (in the order given, or in any
    /// order: keys are independent). Poll after each call, as [`Mirror::poll_transmit`]; what
    /// the host has stored, loaded in key order, is what [`Mirror::import_queue`] takes.
    pub fn poll_store(&mut self) -> Option<StoreOp> {
        self.store.poll()
    }

    /// Shutdown: every message held back from the store (write-behind, see
    /// [`MirrorConfig::store_after_ms`]) is released to [`Mirror::poll_store`] now, so that a
    /// restart loses none. Call it, then drain `poll_store`, before the host stops.
    pub fn flush_store(&mut self) {
        let held = self.store.held();
        if held > 0 {
            info!(items = held, "storing the messages not yet acknowledged");
        }
        self.release_store(None);
    }

    /// Hand the host the held puts whose time has come (all with `None`), in storage form,
    /// written from the queue that holds them.
    pub(super) fn release_store(&mut self, now: Option<Timestamp>) {
        let due = self.store.release(now);
        if due.is_empty() {
            return;
        }
        let mut due: BTreeSet<u64> = due.into_iter().collect();
        for r in self.rooms.values() {
            for q in r.out.unacknowledged() {
                if due.remove(&q.seq) {
                    self.store.released(q.seq, q.to_xml(&r.replica.jid));
                }
            }
        }
        if !due.is_empty() {
            // Held means unacknowledged, so in a queue: a bug if not. Nothing to store.
            warn!(items = due.len(), "held queue items not found in any queue");
        }
    }

    /// Are changes to the stored queue waiting for [`Mirror::poll_store`]?
    pub fn store_pending(&self) -> bool {
        !self.store.is_empty()
    }

    /// Everything not yet acknowledged by the master (refused, in flight, queued), in order, in
    /// storage form (see [`crate::queue`]): what the host's store holds once it has applied
    /// every [`Mirror::poll_store`] change. For status and tests; the host stores per item.
    pub fn export_queue(&self) -> Vec<String> {
        self.rooms
            .values()
            .flat_map(|r| r.out.unacknowledged().map(|q| q.to_xml(&r.replica.jid)))
            .collect()
    }

    /// The items of [`Mirror::export_queue`] held back from the store for now (write-behind,
    /// see [`MirrorConfig::store_after_ms`]): the host's store holds the others. For status and
    /// tests.
    pub fn held_back(&self) -> Vec<String> {
        self.rooms
            .values()
            .flat_map(|r| {
                r.out
                    .unacknowledged()
                    .filter(|q| self.store.is_held(q.seq))
                    .map(|q| q.to_xml(&r.replica.jid))
            })
            .collect()
    }

    /// The next stanza to route, as text: a fan-out comes one addressed copy per call.
    pub fn poll_transmit(&mut self) -> Option<String> {
        self.transmits.pop_text()
    }

    /// The next stanza to route, a fan-out to local occupants as one text and its recipients
    /// (see [`Transmit`]). Interleaves with [`Mirror::poll_transmit`]: the order is the same.
    pub fn poll_transmit_batch(&mut self) -> Option<Transmit> {
        self.transmits.pop()
    }

    /// [`Mirror::poll_transmit_batch`] as elements (see [`crate::transmit`]): the next stanza
    /// and no recipients, or a fan-out's stanza without `to` and its recipients, in the same
    /// order. An error only if the engine's own text did not parse.
    pub fn poll_transmit_element(
        &mut self,
    ) -> Option<Result<(Element, Option<Vec<String>>), Error>> {
        self.transmits.pop_element()
    }

    /// When [`Mirror::handle_timeout`] should next be called.
    pub fn poll_timeout(&self) -> Option<Timestamp> {
        self.rooms
            .values()
            .flat_map(|r| {
                r.pending
                    .values()
                    .map(|p| p.deadline)
                    .chain(r.history_iq.as_ref().map(|(_, d)| *d))
                    .chain(r.roster_iq.as_ref().map(|(_, d)| *d))
            })
            .chain(self.links.values().filter_map(Link::deadline))
            .chain(self.links.keys().filter_map(|m| self.round_due_at(m)))
            .chain(self.store.next_due())
            .min()
    }

    fn send(&mut self, el: &Element) {
        // Anything to a master proves the link to it from our side (see crate::link).
        if let Some(domain) = el.attr("to").map(jid_domain) {
            if let Some(link) = self.links.get_mut(&domain) {
                link.sent(self.now);
            }
        }
        self.transmits.push_element(el.clone());
    }

    fn id(&mut self, prefix: &str) -> String {
        self.next_id += 1;
        format!("dmuc-{prefix}-{}", self.next_id)
    }

    /// A stanza from a local user addressed to a mirrored service.
    pub fn handle_local(&mut self, now: Timestamp, xml: &str) -> Result<Verdict, Error> {
        self.now = self.now.max(now);
        let el = stanza::parse_within(xml, &self.config.limits)?;
        let from = stanza::jid_attr(&el, "stanza", "from")?;
        let to = el.attr("to").ok_or(Error::MissingAttribute {
            element: "stanza",
            attribute: "to",
        })?;
        if !self.handles(to) {
            return Ok(Verdict::Pass);
        }
        let Ok(to) = stanza::parse_jid(to) else {
            return Ok(self.local_malformed_nick(&el, &from, to));
        };
        let (room, nick) = split(&to);
        let class = classify_local(&el, room, nick);
        let mut el = el;
        if !matches!(class, FromLocal::Other) {
            // dmuc's own elements in a user's stanza are forgeries (an eviction mark, a
            // de-duplication key, a stanza-id proposal): the mirror adds its own.
            stanza::remove_children_in(&mut el, ns::DMUC0);
        }
        match class {
            FromLocal::Presence { room, nick } => self.local_presence(now, el, from, room, nick),
            FromLocal::BareLeave { room } => self.local_bare_leave(now, el, from, room),
            FromLocal::Groupchat { room } => self.local_groupchat(now, el, from, room),
            FromLocal::Ping { room, nick } => Ok(self.local_ping(&el, &from, &room, &nick)),
            FromLocal::Other => Ok(Verdict::Pass),
        }
    }

    /// A local user went unavailable: their broadcast `<presence type='unavailable'/>`, with no
    /// `to` or to their own bare JID (ejabberd addresses it so), which their server makes when
    /// they go offline or their stream closes. The server sends it on to every room it holds a
    /// directed presence to (RFC 6121 §4.6.3), but a join the mirror took is none the server
    /// recorded: so the mirror leaves, for the user, every mirrored room they are in or joining,
    /// as if this presence had been sent to each (the status text, "Disconnected: ...", goes
    /// with it). Returns how many rooms it left: 0 for any other stanza.
    pub fn handle_local_unavailable(&mut self, now: Timestamp, xml: &str) -> Result<usize, Error> {
        self.now = self.now.max(now);
        let el = stanza::parse_within(xml, &self.config.limits)?;
        if el.name() != "presence" || stanza::stanza_type(&el) != Some("unavailable") {
            return Ok(0);
        }
        let from = stanza::jid_attr(&el, "presence", "from")?;
        let user = from.to_string();
        if let Some(to) = el.attr("to") {
            if !to.eq_ignore_ascii_case(&from.to_bare().to_string()) {
                return Ok(0);
            }
        }
        let rooms: Vec<(String, String)> = self
            .rooms
            .iter()
            .filter_map(|(room, r)| {
                let nick = r
                    .replica
                    .local
                    .get(&user)
                    .map(|(n, _)| n.clone())
                    .or_else(|| {
                        r.pending
                            .iter()
                            .find(|(_, p)| p.user == user)
                            .map(|(n, _)| n.clone())
                    })?;
                Some((room.clone(), nick))
            })
            .collect();
        for (room, nick) in &rooms {
            let mut leave = el.clone();
            stanza::remove_children_in(&mut leave, ns::DMUC0);
            stanza::set_attr(&mut leave, "to", format!("{room}/{nick}"));
            debug!(%room, %nick, "a local user went unavailable: leaving for them");
            self.local_presence(now, leave, from.clone(), room.clone(), nick.clone())?;
        }
        Ok(rooms.len())
    }

    fn is_down(&self, room: &str) -> bool {
        let domain = room.rsplit('@').next().unwrap_or_default();
        self.links
            .get(&domain.to_ascii_lowercase())
            .is_some_and(|l| l.down)
    }

    /// Forget a room once it has no local occupants, no joins under way and nothing left to
    /// deliver: it costs nothing. A master with no rooms left is not pinged.
    fn close_if_empty(&mut self, room: &str) {
        let empty = self.rooms.get(room).is_some_and(|r| {
            r.replica.local.is_empty() && r.pending.is_empty() && r.out.is_empty()
        });
        if !empty {
            return;
        }
        let Some(r) = self.rooms.remove(room) else {
            return;
        };
        info!(%room, "last local occupant left: the mirror leaves the room");
        if !self.rooms.values().any(|o| o.master == r.master) {
            if let Some(l) = self.links.get_mut(&r.master) {
                // Nothing to ping for; the next join finds out for itself.
                l.idle();
                l.down = false;
                l.down_since = None;
            }
        }
    }

    /// A stanza from a mirrored service: to the mirror service itself, to a user's escaped JID at
    /// the mirror, or to a local user (which the mirror only observes).
    pub fn handle_remote(&mut self, now: Timestamp, xml: &str) -> Result<Verdict, Error> {
        self.now = self.now.max(now);
        let mut el = stanza::parse_within(xml, &self.config.limits)?;
        let from = el.attr("from").ok_or(Error::MissingAttribute {
            element: "stanza",
            attribute: "from",
        })?;
        if !self.handles(from) {
            return Ok(Verdict::Pass);
        }
        // An occupant address the engine cannot parse (the room's refusal of a nick that fails
        // strict validation, say): to a user's escaped address here it is delivered to the
        // user; anything else is the host's to route, untouched.
        let Ok(from) = stanza::parse_jid(from) else {
            let to = stanza::jid_attr(&el, "stanza", "to")?;
            let escaped = to.node().is_some()
                && to
                    .domain()
                    .as_str()
                    .eq_ignore_ascii_case(&self.config.service);
            if escaped {
                return self.escaped(now, el, &to);
            }
            return Ok(Verdict::Pass);
        };
        let to = stanza::jid_attr(&el, "stanza", "to")?;
        if !self.handles(from.as_str()) {
            return Ok(Verdict::Pass);
        }
        // Anything from the master proves the link from it; from a master whose link is down,
        // the link may be back: probe at once (an s2s bounce is our own server's word, not the
        // master's).
        if !is_bounce(&el) {
            let master = from.domain().as_str().to_ascii_lowercase();
            if let Some(link) = self.links.get_mut(&master) {
                link.heard(now);
                link.probe_now(now);
            }
            // The master's acknowledgement of our users' messages (crate::ack).
            let keys = ack::take(&mut el);
            if !keys.is_empty() {
                self.ack(now, &from.to_bare().to_string(), &keys);
                if el.children().next().is_none() {
                    return Ok(Verdict::Consumed);
                }
            }
        }
        let links = &self.links;
        let kind = classify_remote(&el, &from, &to, &self.config.service, |master, id| {
            links.get(master).is_some_and(|l| l.is_ours(id))
        });
        let (room, nick) = match kind {
            FromMaster::PingAnswer { master } => {
                let id = el.attr("id").unwrap_or_default();
                self.pong(now, &master, id, is_bounce(&el));
                return Ok(Verdict::Consumed);
            }
            FromMaster::Ping => {
                let reply = stanza::iq_result(&el, &self.config.service);
                self.send(&reply);
                return Ok(Verdict::Consumed);
            }
            FromMaster::ToUser => return Ok(self.observe(now, &el, &from, &to)),
            FromMaster::Escaped => return self.escaped(now, el, &to),
            FromMaster::Room { room, nick } => (room, nick),
        };
        if !self.rooms.contains_key(&room) {
            if el.name() == "iq" && matches!(stanza::stanza_type(&el), Some("get") | Some("set")) {
                let reply = stanza::error_reply(
                    &el,
                    &self.config.service.clone(),
                    from.as_str(),
                    Condition::ItemNotFound,
                    "This mirror has no occupants in that room",
                );
                self.send(&reply);
                return Ok(Verdict::Consumed);
            }
            debug!(%room, "dropped a stanza for a room with no local occupants");
            return Ok(Verdict::Consumed);
        }
        match el.name() {
            "presence" => match nick {
                Some(nick) => {
                    self.remote_presence(now, el, &room, &nick);
                    self.reveal_if_needed(&room);
                }
                None => {
                    // The room's own presence (ejabberd's entity caps): shown to each joiner; a
                    // change of it (a config change) goes to every local occupant, as the room
                    // sends it to every occupant.
                    if let Some(r) = self.rooms.get_mut(&room) {
                        let mut p = el;
                        stanza::remove_attr(&mut p, "to");
                        let changed = r.replica.room_presence.is_some();
                        let users = r.served();
                        r.replica.room_presence =
                            (stanza::stanza_type(&p) != Some("unavailable")).then_some(p.clone());
                        if changed {
                            self.transmits
                                .fan_out(stanza::serialize(&p), "presence", users);
                        }
                    }
                }
            },
            "message" if stanza::stanza_type(&el) == Some("groupchat") => {
                self.remote_groupchat(now, el, &room)
            }
            "iq" => self.remote_iq(now, el, &room)?,
            _ => debug!(%room, "ignored a stanza from the master"),
        }
        Ok(Verdict::Consumed)
    }

    /// The host saw the s2s link to a master service go down or come up (its own s2s events).
    /// Pings find the same by themselves; this only makes it faster.
    pub fn handle_link(&mut self, now: Timestamp, master: &str, up: bool) {
        self.now = self.now.max(now);
        let master = master.to_ascii_lowercase();
        if !self.config.masters.contains(&master) {
            return;
        }
        if up {
            self.link_back(now, &master);
        } else {
            self.link_lost(now, &master);
        }
    }

    /// The host saw an s2s session with `domain` (a master) close. That alone is no outage
    /// (servers close idle sessions), but stanzas written into the connection may have died with
    /// it, unbounced, and a ping answered on the next connection proves nothing about them. So
    /// what is in flight is sent again at once, ahead of anything newer (the master drops what it
    /// already has by origin-id), and a ping round starts.
    pub fn handle_s2s_closed(&mut self, now: Timestamp, domain: &str) {
        self.now = self.now.max(now);
        self.handle_s2s_closing(now, domain);
        let domain = domain.to_ascii_lowercase();
        for room in self.rooms_of(&domain) {
            let ready = self.rooms.get(&room).is_some_and(|r| r.may_flush());
            if ready {
                self.flush_queue(now, &room, true);
            }
        }
    }

    /// The first half of [`Mirror::handle_s2s_closed`], for a host that still routes to the
    /// closing connection for a moment (ejabberd): what was in flight goes back to the queue,
    /// and newer messages wait behind it, until [`Mirror::handle_s2s_closed`] sends it.
    pub fn handle_s2s_closing(&mut self, now: Timestamp, domain: &str) {
        self.now = self.now.max(now);
        let domain = domain.to_ascii_lowercase();
        let rooms = self.rooms_of(&domain);
        if rooms.is_empty() {
            return;
        }
        if let Some(link) = self.links.get_mut(&domain) {
            link.schedule(now);
        }
        for room in rooms {
            let Some(r) = self.rooms.get_mut(&room) else {
                continue;
            };
            if r.out.in_flight.is_empty() {
                continue;
            }
            debug!(%room, in_flight = r.out.in_flight.len(), "s2s session closed: what was in flight goes again");
            // Storage is unchanged: a stored item is queued after a restart, whatever its state.
            r.out.requeue_in_flight();
        }
    }

    /// The host saw an incoming s2s session from `domain` (a master) close: what the master sent
    /// into it may be lost, unbounced. Each room in sync catches up from the room's history;
    /// live messages wait behind the catch-up, so that each sender's messages stay in order.
    pub fn handle_s2s_in_closed(&mut self, now: Timestamp, domain: &str) {
        self.now = self.now.max(now);
        let domain = domain.to_ascii_lowercase();
        if self.links.get(&domain).is_none_or(|l| l.down) {
            return;
        }
        for room in self.rooms_of(&domain) {
            let Some(r) = self.rooms.get_mut(&room) else {
                continue;
            };
            if !r.synced || r.sync != Sync::Ready || r.replica.local.is_empty() {
                continue;
            }
            debug!(%room, "s2s session from the master closed: catching up");
            r.catching_up = true;
            self.request_history(now, &room);
        }
    }

    fn rooms_of(&self, master: &str) -> Vec<String> {
        self.rooms
            .iter()
            .filter(|(_, r)| r.master == master)
            .map(|(j, _)| j.clone())
            .collect()
    }

    /// Time has come: a ping round, or a ping that was never answered (the link is down); joins
    /// the master never answered fail with `remote-server-timeout`; a history request that was
    /// never answered counts as an empty history; a roster request never answered means the
    /// link is down after all.
    pub fn handle_timeout(&mut self, now: Timestamp) {
        self.now = self.now.max(now);
        // Messages the master has not acknowledged in time go to the store.
        self.release_store(Some(now));
        let rooms: Vec<String> = self.rooms.keys().cloned().collect();
        let mut lost = BTreeSet::new();
        for room in rooms {
            let Some(r) = self.rooms.get_mut(&room) else {
                continue;
            };
            let expired: Vec<String> = r
                .pending
                .iter()
                .filter(|(_, p)| p.deadline <= now)
                .map(|(n, _)| n.clone())
                .collect();
            let mut errors = Vec::new();
            for nick in expired {
                if let Some(p) = r.pending.remove(&nick) {
                    let mut e = Element::builder("presence", ns::JABBER_CLIENT).build();
                    stanza::set_attr(&mut e, "to", r.replica.occupant_jid(&nick));
                    errors.push(stanza::error_reply(
                        &e,
                        &r.replica.occupant_jid(&nick),
                        &p.user,
                        Condition::RemoteServerTimeout,
                        "The room did not answer",
                    ));
                    // Withdraw the join, in case the master admits it late: no ghost there.
                    let mut leave = Element::builder("presence", ns::JABBER_CLIENT).build();
                    stanza::set_attr(&mut leave, "from", &p.user);
                    stanza::set_attr(&mut leave, "to", r.replica.occupant_jid(&nick));
                    stanza::set_attr(&mut leave, "type", "unavailable");
                    errors.push(leave);
                }
            }
            let history_late = r.history_iq.as_ref().is_some_and(|(_, d)| *d <= now);
            if r.roster_iq.as_ref().is_some_and(|(_, d)| *d <= now) {
                r.roster_iq = None;
                lost.insert(r.master.clone());
            }
            for e in errors {
                self.send(&e);
            }
            if history_late {
                warn!(%room, "history request timed out");
                self.apply_history(now, &room, Vec::new());
            }
            self.close_if_empty(&room);
        }
        for master in lost {
            warn!(%master, "roster request after an outage timed out");
            self.link_lost(now, &master);
        }
        self.ping(now);
    }

    /// At start: the queue items the host stored before a restart (from [`Mirror::poll_store`]),
    /// in any order: they are put back in the order of their keys. Everything goes back to the
    /// queue, what was in flight included (it may not have arrived). Nothing is sent until a ping
    /// to the master is answered; then each sender is joined for the delivery of what they said.
    /// Items that do not parse, or name a room this mirror does not mirror, are skipped with a
    /// warning (and left in the host's store). Items from an older version's store (one list,
    /// in order, no keys) get keys here, and [`Mirror::poll_store`] asks the host to store them
    /// per item.
    pub fn import_queue(&mut self, now: Timestamp, items: &[String]) -> usize {
        self.now = self.now.max(now);
        let mut parsed: Vec<(String, Queued)> = Vec::with_capacity(items.len());
        for text in items {
            match Queued::from_xml(text) {
                Ok(v) => parsed.push(v),
                Err(e) => warn!(error = %e, "skipped a stored queue item"),
            }
        }
        // Stable: keyless items (older stores) keep their stored order, ahead of keyed ones.
        parsed.sort_by_key(|(_, q)| q.seq);
        for (_, q) in &parsed {
            self.store.seen(q.seq);
        }
        let mut n = 0;
        for (room, mut q) in parsed {
            let Ok(room_jid) = Jid::new(&room) else {
                warn!(%room, "skipped a stored queue item for a bad room JID");
                continue;
            };
            let master = room_jid.domain().as_str().to_ascii_lowercase();
            if !self.config.masters.contains(&master) {
                warn!(%room, "skipped a stored queue item for a room this mirror does not mirror");
                continue;
            }
            let history_size = self.config.history_size;
            let r = self
                .rooms
                .entry(room.clone())
                .or_insert_with(|| MirrorRoom::new(room.clone(), master.clone(), history_size));
            // The item goes to its own room, from its own sender, whatever its stanza says (a
            // store is data: a damaged or edited one must not make the mirror send elsewhere).
            let to = if q.is_message() {
                room.clone()
            } else {
                format!("{room}/{}", q.nick)
            };
            let readdressed = q.stanza.attr("to") != Some(to.as_str())
                || q.stanza.attr("from") != Some(q.user.as_str());
            stanza::set_attr(&mut q.stanza, "to", to);
            stanza::set_attr(&mut q.stanza, "from", q.user.clone());
            if q.seq == 0 {
                q.seq = self.store.next_seq();
                self.store.put(&room, &q, None);
            } else if readdressed {
                // The store keeps what will be sent.
                self.store.put(&room, &q, None);
            }
            r.out.queue.push_back(q);
            let link = self.links.entry(master).or_default();
            link.go_down(now);
            link.schedule(now);
            n += 1;
        }
        if n > 0 {
            info!(items = n, "restored the outbound queue");
        }
        n
    }
}
