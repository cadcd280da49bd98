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
//! - [`Mirror::import_queue`]: at start, the outbound queue the host stored before a restart.
//!
//! Outputs (`poll_*`): [`Mirror::poll_transmit`] (stanzas to route: to local users, or to the
//! master) and [`Mirror::poll_timeout`]. When [`Mirror::take_queue_dirty`] says so, the host
//! stores [`Mirror::export_queue`].
//!
//! # Link loss
//!
//! The mirror pings each master it has rooms on (see [`crate::link`]). When a ping goes
//! unanswered or bounces, the remote occupants are shown leaving (status 333), local chat goes on,
//! and local users' messages queue, along with those still in flight. When a ping is answered
//! again, the mirror asks each room for its roster, rejoins users the master lost, catches up on
//! what the master's side said (history `since`, de-duplicated), and sends the queue in order.
//! Each message carries an XEP-0359 origin-id, by which the master drops a second copy.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use jid::Jid;
use minidom::Element;
use tracing::{debug, info, warn};

use crate::elements::{Config, Dmuc, History, HistoryResult, Room, Roster, RosterItem, Whois};
use crate::error::Error;
use crate::escape;
use crate::link::{Link, Pong};
use crate::ns;
use crate::queue::{user_domain, Queued};
use crate::recent::Recent;
use crate::room_history::{Entry, RoomHistory};
use crate::stanza::{self, Condition};
use crate::time::Timestamp;

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
    /// How often the mirror pings each master it has rooms on.
    pub ping_interval_ms: u64,
    /// How long a ping may go unanswered before the link counts as down.
    pub ping_timeout_ms: u64,
    /// A catch-up after an outage asks for history from this long before the newest message the
    /// mirror had (covers clock skew and second-precision stamps); duplicates are dropped.
    pub catch_up_margin_ms: u64,
}

impl MirrorConfig {
    /// Defaults: a queue of 1000 messages, joins time out after 30 s, 20 messages of history, a
    /// ping every 30 s answered within 20 s, a catch-up margin of 30 s.
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
            ping_interval_ms: 30_000,
            ping_timeout_ms: 20_000,
            catch_up_margin_ms: 30_000,
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

/// Fingerprints of master messages kept per room, for de-duplicating a catch-up.
const SEEN: usize = 2000;
/// Acknowledged messages kept per room, in case the master refuses them after all.
const DELIVERED: usize = 500;
/// Live messages from the master held per room while a catch-up is due (the catch-up has the
/// oldest again, should they be dropped).
const HELD: usize = 1000;

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

/// The fingerprint of a message from the master's side: who said what, under which id.
fn fingerprint(m: &Element) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    m.attr("from").unwrap_or_default().hash(&mut h);
    m.attr("id").unwrap_or_default().hash(&mut h);
    origin_id(m).unwrap_or_default().hash(&mut h);
    m.get_child("body", ns::JABBER_CLIENT)
        .map(|b| b.text())
        .unwrap_or_default()
        .hash(&mut h);
    h.finish()
}

/// The XEP-0359 origin-id of a message.
fn origin_id(m: &Element) -> Option<&str> {
    m.get_child("origin-id", ns::SID).and_then(|o| o.attr("id"))
}

/// Is this the error an s2s layer sends back when it cannot deliver (a bounce)?
fn is_bounce(el: &Element) -> bool {
    stanza::stanza_type(el) == Some("error")
        && el.get_child("error", ns::JABBER_CLIENT).is_some_and(|e| {
            e.has_child("remote-server-not-found", ns::XMPP_STANZAS)
                || e.has_child("remote-server-timeout", ns::XMPP_STANZAS)
        })
}

/// Does this leave end the occupant's stay for good (kick, ban, affiliation change, shutdown,
/// destruction), rather than the master having lost track of them?
fn final_leave(el: &Element) -> bool {
    ["301", "307", "321", "322", "332"]
        .iter()
        .any(|c| stanza::has_status(el, c))
        || stanza::muc_user(el).is_some_and(|x| x.has_child("destroy", ns::MUC_USER))
}

#[derive(Debug, Clone)]
struct Occupant {
    /// The presence as the room broadcasts it (`from` = room/nick, no `to`, a muc#user item).
    presence: Element,
    /// Set when the occupant is one of our local users: their full JID.
    local: Option<String>,
}

impl Occupant {
    fn role(&self) -> &str {
        stanza::muc_item(&self.presence)
            .and_then(|i| i.attr("role"))
            .unwrap_or("participant")
    }
}

#[derive(Debug, Clone)]
struct Pending {
    user: String,
    deadline: Timestamp,
    /// The user's join presence: kept as their own presence once the master admits them.
    join: Element,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sync {
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

#[derive(Debug)]
struct MirrorRoom {
    jid: String,
    master: String,
    occupants: BTreeMap<String, Occupant>,
    /// Local occupants: full JID -> (nick, their own last presence to the room).
    local: BTreeMap<String, (String, Element)>,
    pending: BTreeMap<String, Pending>,
    /// Joins the master confirmed while we were still syncing: served once sync is done.
    awaiting: Vec<String>,
    sync: Sync,
    history_iq: Option<(String, Timestamp)>,
    /// A roster request after an outage (id, deadline).
    roster_iq: Option<(String, Timestamp)>,
    /// The ping round in which the pending roster or history request was sent: a later answer
    /// to the mirror service's own ping (same s2s streams both ways) means it was lost.
    sync_round: u64,
    /// When that request was sent.
    sync_sent: Timestamp,
    /// The room has had its first sync: later rosters start a catch-up.
    synced: bool,
    /// The pending history answer is a catch-up: deliver what local users missed.
    catching_up: bool,
    /// When the first sync finished.
    synced_at: Option<Timestamp>,
    /// Stamp of the newest message that came from the master (not from our own users).
    newest_from_master: Option<Timestamp>,
    /// Fingerprints of the messages from the master's side already delivered here.
    seen: Recent<u64>,
    whois: Whois,
    history: RoomHistory,
    subject: Option<Element>,
    /// Waiting for the link.
    queue: VecDeque<Queued>,
    /// Sent to the master, not yet acknowledged by a ping answer.
    in_flight: VecDeque<Queued>,
    /// Acknowledged lately: a ping answer proves arrival, not acceptance, and a master that
    /// lost the sender refuses what arrived (`not-acceptable`).
    delivered: VecDeque<Queued>,
    /// Refused by the master because it had lost the sender: sent again, in order, once the
    /// sender's rejoin is confirmed.
    refused: Vec<Queued>,
    /// The queue was just sent: newer messages wait until a ping answer acknowledges it. An s2s
    /// connection can be replaced between two sends, and a newer message on the new connection
    /// must not overtake older ones that die with the old one (they go again, ahead).
    barrier: bool,
    /// Local occupants whose rejoin echo is expected after a resync.
    resync: BTreeSet<String>,
    /// Live messages from the master that arrived during a catch-up: delivered after it, so
    /// that each sender's messages arrive in order.
    held: Vec<Element>,
}

impl MirrorRoom {
    fn new(jid: String, master: String, history_size: usize) -> Self {
        MirrorRoom {
            jid,
            master,
            occupants: BTreeMap::new(),
            local: BTreeMap::new(),
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
            whois: Whois::default(),
            history: RoomHistory::new(history_size),
            subject: None,
            queue: VecDeque::new(),
            in_flight: VecDeque::new(),
            delivered: VecDeque::new(),
            refused: Vec::new(),
            barrier: false,
            resync: BTreeSet::new(),
            held: Vec::new(),
        }
    }

    /// Put `items` (oldest first) at the head of the queue, ahead of anything queued.
    fn queue_first(&mut self, items: impl IntoIterator<Item = Queued>) {
        let mut items: Vec<Queued> = items.into_iter().collect();
        items.extend(self.queue.drain(..));
        self.queue = items.into();
    }

    fn occupant_jid(&self, nick: &str) -> String {
        format!("{}/{}", self.jid, nick)
    }

    fn is_moderator(&self, nick: &str) -> bool {
        self.occupants
            .get(nick)
            .is_some_and(|o| o.role() == "moderator")
    }

    /// `presence` about `subject` as `recipient` (a local occupant's nick) should see it.
    fn presence_for(
        &self,
        presence: &Element,
        subject: &str,
        recipient: &str,
        to: &str,
    ) -> Element {
        let mut p = presence.clone();
        stanza::set_attr(&mut p, "to", to);
        if subject == recipient {
            stanza::add_status(&mut p, "110");
        } else {
            stanza::strip_self_status(&mut p);
            if self.whois == Whois::Moderators && !self.is_moderator(recipient) {
                stanza::strip_real_jids(&mut p);
            }
        }
        p
    }
}

/// The mirror engine for one mirror service.
#[derive(Debug)]
pub struct Mirror {
    config: MirrorConfig,
    rooms: BTreeMap<String, MirrorRoom>,
    links: BTreeMap<String, Link>,
    transmits: VecDeque<String>,
    next_id: u64,
    queue_dirty: bool,
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
            config,
            rooms: BTreeMap::new(),
            links: BTreeMap::new(),
            transmits: VecDeque::new(),
            next_id: 0,
            queue_dirty: false,
        }
    }

    // ---- getters ----

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
                r.local
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
            .map(|r| r.occupants.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// Messages queued for the master in `room` (waiting for the link).
    pub fn queue_depth(&self, room: &str) -> usize {
        self.rooms.get(room).map(|r| r.queue.len()).unwrap_or(0)
    }

    /// Messages sent to the master from `room` that no ping answer has acknowledged yet.
    pub fn in_flight(&self, room: &str) -> usize {
        self.rooms.get(room).map(|r| r.in_flight.len()).unwrap_or(0)
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
                    queued: rooms.iter().map(|r| r.queue.len()).sum(),
                    in_flight: rooms.iter().map(|r| r.in_flight.len()).sum(),
                    outages: l.outages,
                    last_pong: l.last_pong,
                    last_resync: l.last_resync,
                    down_since: l.down_since,
                }
            })
            .collect()
    }

    /// Has the outbound queue changed since the last call? The host then stores
    /// [`Mirror::export_queue`], so that a restart loses nothing.
    pub fn take_queue_dirty(&mut self) -> bool {
        std::mem::take(&mut self.queue_dirty)
    }

    /// Everything not yet acknowledged by the master (in flight first, then queued), in order, in
    /// storage form (see [`crate::queue`]).
    pub fn export_queue(&self) -> Vec<String> {
        self.rooms
            .values()
            .flat_map(|r| {
                r.refused
                    .iter()
                    .chain(r.in_flight.iter())
                    .chain(r.queue.iter())
                    .map(|q| q.to_xml(&r.jid))
            })
            .collect()
    }

    // ---- outputs ----

    /// The next stanza to route.
    pub fn poll_transmit(&mut self) -> Option<String> {
        self.transmits.pop_front()
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
            .min()
    }

    fn send(&mut self, el: &Element) {
        self.transmits.push_back(stanza::serialize(el));
    }

    fn id(&mut self, prefix: &str) -> String {
        self.next_id += 1;
        format!("dmuc-{prefix}-{}", self.next_id)
    }

    // ---- inputs ----

    /// A stanza from a local user addressed to a mirrored service.
    pub fn handle_local(&mut self, now: Timestamp, xml: &str) -> Result<Verdict, Error> {
        let el = stanza::parse(xml)?;
        let from = stanza::jid_attr(&el, "stanza", "from")?;
        let to = stanza::jid_attr(&el, "stanza", "to")?;
        if !self.handles(to.as_str()) {
            return Ok(Verdict::Pass);
        }
        let (room, nick) = split(&to);
        match (el.name(), nick) {
            ("presence", Some(nick)) => self.local_presence(now, el, from, room, nick),
            ("message", None) if stanza::stanza_type(&el) == Some("groupchat") => {
                self.local_groupchat(now, el, from, room)
            }
            _ => Ok(Verdict::Pass),
        }
    }

    fn local_presence(
        &mut self,
        now: Timestamp,
        el: Element,
        from: Jid,
        room: String,
        nick: String,
    ) -> Result<Verdict, Error> {
        let user = from.to_string();
        let master_down = self.is_down(&room);
        let kind = stanza::stanza_type(&el).map(str::to_string);
        let current = self
            .rooms
            .get(&room)
            .and_then(|r| r.local.get(&user))
            .map(|(n, _)| n.clone());
        match kind.as_deref() {
            Some("unavailable") => {
                let Some(current) = current else {
                    // A leave from a user whose join is still pending: cancel it, and tell the master.
                    if let Some(r) = self.rooms.get_mut(&room) {
                        r.pending.retain(|_, p| p.user != user);
                    }
                    if !master_down {
                        self.send(&el);
                    }
                    self.close_if_empty(&room);
                    return Ok(Verdict::Consumed);
                };
                self.local_leave(&room, &user, &current, &el);
                if master_down {
                    // The master hears of it after the messages this user sent before leaving.
                    if let Some(r) = self.rooms.get_mut(&room) {
                        r.queue.push_back(Queued {
                            user: user.clone(),
                            nick: current.clone(),
                            at: now,
                            stanza: el,
                            round: 0,
                        });
                        self.queue_dirty = true;
                    }
                } else {
                    self.send(&el);
                }
                self.close_if_empty(&room);
                Ok(Verdict::Consumed)
            }
            Some(_) => Ok(Verdict::Pass),
            None => {
                if let Some(current) = current {
                    if current != nick {
                        let reply = stanza::error_reply(
                            &el,
                            &format!("{room}/{nick}"),
                            &user,
                            Condition::NotAcceptable,
                            "Nick changes are not allowed in a mirrored room",
                        );
                        self.send(&reply);
                        return Ok(Verdict::Consumed);
                    }
                    // A status change: the master confirms it to everyone, us included.
                    let Some(r) = self.rooms.get_mut(&room) else {
                        return Ok(Verdict::Consumed);
                    };
                    if let Some(entry) = r.local.get_mut(&user) {
                        entry.1 = el.clone();
                    }
                    if master_down {
                        self.local_status(&room, &nick, &el);
                    } else {
                        let fwd = self.to_master(&el);
                        self.send(&fwd);
                    }
                    return Ok(Verdict::Consumed);
                }
                self.local_join(now, el, user, room, nick, master_down)
            }
        }
    }

    fn local_join(
        &mut self,
        now: Timestamp,
        el: Element,
        user: String,
        room: String,
        nick: String,
        master_down: bool,
    ) -> Result<Verdict, Error> {
        let occupant_jid = format!("{room}/{nick}");
        if master_down {
            let reply = stanza::error_reply(
                &el,
                &occupant_jid,
                &user,
                Condition::RemoteServerTimeout,
                "The link to this room is down",
            );
            self.send(&reply);
            return Ok(Verdict::Consumed);
        }
        let master = Jid::new(&room)
            .map(|j| j.domain().to_string())
            .unwrap_or_default();
        let history_size = self.config.history_size;
        let deadline = now.plus_ms(self.config.join_timeout_ms);
        let fwd = self.to_master(&el);
        let r = self
            .rooms
            .entry(room.clone())
            .or_insert_with(|| MirrorRoom::new(room.clone(), master, history_size));
        let taken = r
            .occupants
            .get(&nick)
            .is_some_and(|o| o.local.as_deref() != Some(&user))
            || r.pending.get(&nick).is_some_and(|p| p.user != user);
        if taken {
            let reply = stanza::error_reply(&el, &occupant_jid, &user, Condition::Conflict, "");
            self.send(&reply);
            return Ok(Verdict::Consumed);
        }
        debug!(%room, %nick, "forwarding a local join");
        let master = r.master.clone();
        let first_ping = now.plus_ms(self.config.ping_interval_ms);
        self.links.entry(master).or_default().schedule(first_ping);
        let Some(r) = self.rooms.get_mut(&room) else {
            return Ok(Verdict::Consumed);
        };
        r.pending.insert(
            nick,
            Pending {
                user,
                deadline,
                join: el,
            },
        );
        self.send(&fwd);
        Ok(Verdict::Consumed)
    }

    /// The user's join as the master gets it: `<x/>` without `<history/>` (the mirror serves
    /// history), plus `<dmuc from='mirror'/>`.
    fn to_master(&self, el: &Element) -> Element {
        let mut fwd = el.clone();
        if let Some(x) = fwd.get_child_mut("x", ns::MUC) {
            let mut rebuilt = Element::builder("x", ns::MUC).build();
            for c in x.children().filter(|c| !c.is("history", ns::MUC)) {
                rebuilt.append_child(c.clone());
            }
            *x = rebuilt;
        }
        while fwd.remove_child("dmuc", ns::DMUC).is_some() {}
        if let Ok(service) = Jid::new(&self.config.service) {
            fwd.append_child(Dmuc { from: service }.into());
        }
        fwd
    }

    fn local_leave(&mut self, room: &str, user: &str, nick: &str, el: &Element) {
        let Some(r) = self.rooms.get_mut(room) else {
            return;
        };
        r.local.remove(user);
        let mut gone = match r.occupants.remove(nick) {
            Some(o) => o.presence,
            None => Element::builder("presence", ns::JABBER_CLIENT).build(),
        };
        // The leave as XEP-0045 shows it: type unavailable, role none, the user's status text.
        let mut p = Element::builder("presence", ns::JABBER_CLIENT).build();
        stanza::set_attr(&mut p, "from", r.occupant_jid(nick));
        stanza::set_attr(&mut p, "type", "unavailable");
        for c in el.children().filter(|c| c.is("status", ns::JABBER_CLIENT)) {
            p.append_child(c.clone());
        }
        let mut x = Element::builder("x", ns::MUC_USER).build();
        if let Some(item) = stanza::muc_item(&gone) {
            let mut item = item.clone();
            stanza::set_attr(&mut item, "role", "none");
            x.append_child(item);
        }
        p.append_child(x);
        gone = p;
        self.fan_out_presence(room, nick, &gone, Some(user));
    }

    fn local_status(&mut self, room: &str, nick: &str, el: &Element) {
        let Some(r) = self.rooms.get_mut(room) else {
            return;
        };
        let Some(o) = r.occupants.get_mut(nick) else {
            return;
        };
        let mut p = el.clone();
        stanza::remove_attr(&mut p, "to");
        stanza::set_attr(&mut p, "from", format!("{room}/{nick}"));
        while p.remove_child("x", ns::MUC).is_some() {}
        if let Some(x) = stanza::muc_user(&o.presence) {
            p.append_child(x.clone());
        }
        o.presence = p.clone();
        self.fan_out_presence(room, nick, &p, None);
    }

    /// Send `presence` about `subject` to every local occupant (and to `extra`, a user who has
    /// just left, who sees their own leave).
    fn fan_out_presence(
        &mut self,
        room: &str,
        subject: &str,
        presence: &Element,
        extra: Option<&str>,
    ) {
        let Some(r) = self.rooms.get(room) else {
            return;
        };
        let mut out = Vec::new();
        for (user, (nick, _)) in &r.local {
            out.push(r.presence_for(presence, subject, nick, user));
        }
        if let Some(user) = extra {
            let mut p = presence.clone();
            stanza::set_attr(&mut p, "to", user);
            stanza::add_status(&mut p, "110");
            out.push(p);
        }
        for p in out {
            self.send(&p);
        }
    }

    fn local_groupchat(
        &mut self,
        now: Timestamp,
        el: Element,
        from: Jid,
        room: String,
    ) -> Result<Verdict, Error> {
        let user = from.to_string();
        let down = self.is_down(&room);
        let queue_limit = self.config.queue_limit;
        let Some(r) = self.rooms.get_mut(&room) else {
            let reply = stanza::error_reply(
                &el,
                &room,
                &user,
                Condition::NotAcceptable,
                "You are not in this room",
            );
            self.send(&reply);
            return Ok(Verdict::Consumed);
        };
        let Some((nick, _)) = r.local.get(&user).cloned() else {
            let reply = stanza::error_reply(
                &el,
                &room,
                &user,
                Condition::NotAcceptable,
                "You are not in this room",
            );
            self.send(&reply);
            return Ok(Verdict::Consumed);
        };
        if el.get_child("subject", ns::JABBER_CLIENT).is_some() {
            // A subject change needs the master's permission: it comes back as a broadcast.
            if down {
                let reply = stanza::error_reply(
                    &el,
                    &room,
                    &user,
                    Condition::RemoteServerTimeout,
                    "The link to this room is down",
                );
                self.send(&reply);
            } else {
                self.send(&el);
            }
            return Ok(Verdict::Consumed);
        }
        if r.occupants
            .get(&nick)
            .is_some_and(|o| o.role() == "visitor")
        {
            let reply = stanza::error_reply(
                &el,
                &room,
                &user,
                Condition::Forbidden,
                "Visitors may not speak in this room",
            );
            self.send(&reply);
            return Ok(Verdict::Consumed);
        }
        let original = el.clone();
        let mut el = el;
        if origin_id(&el).is_none() {
            // The master's de-duplication key, should this message have to be sent again.
            self.next_id += 1;
            let mut o = Element::builder("origin-id", ns::SID).build();
            stanza::set_attr(&mut o, "id", format!("dmuc-{:x}-{}", now.0, self.next_id));
            el.append_child(o);
        }
        let round = round_of(&self.links, &r.master);
        let item = Queued {
            user: user.clone(),
            nick: nick.clone(),
            at: now,
            stanza: el.clone(),
            round,
        };
        // While older messages still wait for the link (a resync is under way), a new one waits
        // behind them: the master gets each sender's messages in order.
        let hold = down
            || !r.queue.is_empty()
            || !r.refused.is_empty()
            || (r.barrier && !r.in_flight.is_empty());
        if hold {
            if r.queue.len() + r.in_flight.len() >= queue_limit {
                warn!(%room, "outbound queue full: message refused");
                let reply = stanza::error_reply(
                    &el,
                    &room,
                    &user,
                    Condition::ResourceConstraint,
                    "The link to this room is down and the queue is full",
                );
                self.send(&reply);
                return Ok(Verdict::Consumed);
            }
            r.queue.push_back(item);
        } else {
            r.in_flight.push_back(item);
        }
        self.queue_dirty = true;
        // Local users see the message as its sender wrote it (our origin-id is for the master).
        let mut shown = original;
        stanza::set_attr(&mut shown, "from", r.occupant_jid(&nick));
        stanza::remove_attr(&mut shown, "to");
        while shown.remove_child("delay", ns::DELAY).is_some() {}
        let text = stanza::serialize(&shown);
        let copies = stanza::copies_to(&text, shown.name(), r.local.keys().map(String::as_str));
        r.history.push(Entry::with_text(shown, &text, now));
        self.transmits.extend(copies);
        if !hold {
            self.send(&el);
        }
        Ok(Verdict::Consumed)
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
            r.local.is_empty()
                && r.pending.is_empty()
                && r.queue.is_empty()
                && r.in_flight.is_empty()
                && r.refused.is_empty()
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
        let el = stanza::parse(xml)?;
        let from = stanza::jid_attr(&el, "stanza", "from")?;
        let to = stanza::jid_attr(&el, "stanza", "to")?;
        if !self.handles(from.as_str()) {
            return Ok(Verdict::Pass);
        }
        if el.name() == "iq" && matches!(stanza::stanza_type(&el), Some("result") | Some("error")) {
            let id = el.attr("id").unwrap_or_default();
            let master = from.domain().as_str().to_ascii_lowercase();
            if self.links.get(&master).is_some_and(|l| l.is_ours(id)) {
                self.pong(now, &master, id, is_bounce(&el));
                return Ok(Verdict::Consumed);
            }
        }
        let to_service = to
            .domain()
            .as_str()
            .eq_ignore_ascii_case(&self.config.service);
        if !to_service {
            return Ok(self.observe(now, &el, &from, &to));
        }
        if to.node().is_some() {
            return self.escaped(now, el, &to);
        }
        let (room, nick) = split(&from);
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
            "presence" => {
                if let Some(nick) = nick {
                    self.remote_presence(now, el, &room, &nick);
                }
            }
            "message" if stanza::stanza_type(&el) == Some("groupchat") => {
                self.remote_groupchat(now, el, &room)
            }
            "iq" => self.remote_iq(now, el, &room)?,
            _ => debug!(%room, "ignored a stanza from the master"),
        }
        Ok(Verdict::Consumed)
    }

    /// A stanza from a mirrored room straight to a local user: a join error from a master
    /// that does not route errors through the mirror ends the pending join; the s2s bounce of a
    /// message in flight means the link is down (the message is sent again later, so the user
    /// does not see the bounce).
    fn observe(&mut self, now: Timestamp, el: &Element, from: &Jid, to: &Jid) -> Verdict {
        if el.name() == "message" && stanza::stanza_type(el) == Some("error") {
            let room = from.to_bare().to_string();
            let id = el.attr("id").unwrap_or_default();
            let ours = self.rooms.get(&room).is_some_and(|r| {
                r.in_flight
                    .iter()
                    .chain(r.queue.iter())
                    .chain(r.delivered.iter())
                    .any(|q| q.stanza.attr("id") == Some(id) && q.user == to.as_str())
            });
            if !ours {
                return Verdict::Pass;
            }
            let master = from.domain().as_str().to_ascii_lowercase();
            if is_bounce(el) {
                info!(%room, "a message bounced: the link is down");
                self.link_lost(now, &master);
                return Verdict::Consumed;
            }
            let not_occupant = el
                .get_child("error", ns::JABBER_CLIENT)
                .is_some_and(|e| e.has_child("not-acceptable", ns::XMPP_STANZAS));
            if not_occupant {
                // The master lost this user (and has not told us yet): rejoin them, and send
                // what was in flight again once it has them.
                info!(%room, user = %to, "the master says a local user is not in the room: rejoining");
                if let Some(r) = self.rooms.get_mut(&room) {
                    let mine =
                        |q: &Queued| q.stanza.attr("id") == Some(id) && q.user == to.as_str();
                    let item = match r.in_flight.iter().position(mine) {
                        Some(i) => r.in_flight.remove(i),
                        None => r
                            .delivered
                            .iter()
                            .position(mine)
                            .and_then(|i| r.delivered.remove(i)),
                    };
                    if let Some(item) = item {
                        r.refused.push(item);
                        self.queue_dirty = true;
                    }
                }
                self.rejoin_user(&room, to.as_str());
                return Verdict::Consumed;
            }
            return Verdict::Pass;
        }
        if el.name() != "presence" || stanza::stanza_type(el) != Some("error") {
            return Verdict::Pass;
        }
        let (room, nick) = split(from);
        let user = to.to_string();
        if let Some(r) = self.rooms.get_mut(&room) {
            r.pending
                .retain(|n, p| !(p.user == user && nick.as_deref().is_none_or(|x| x == n)));
        }
        if let Some(nick) = nick {
            self.rejoin_refused(now, &room, &nick);
        }
        self.close_if_empty(&room);
        Verdict::Pass
    }

    /// A stanza to `user\40host\2fres@mirror`: deliver it to the user. The node may have been
    /// case-folded on the way, so the exact JID comes from the users the mirror knows.
    fn escaped(&mut self, now: Timestamp, mut el: Element, to: &Jid) -> Result<Verdict, Error> {
        let guess = escape::jid_from_service_address(to).map_err(|e| Error::InvalidJid {
            jid: to.to_string(),
            reason: e.to_string(),
        })?;
        let known = self
            .rooms
            .values()
            .flat_map(|r| {
                r.pending
                    .values()
                    .map(|p| p.user.clone())
                    .chain(r.local.keys().cloned())
            })
            .find(|u| escape::matches_address(to, u));
        let Some(user) = known else {
            // Only users with a join under way or in a room here: the mirror is no open relay.
            warn!(address = %to, user = %guess, "dropped a stanza for a user this mirror does not serve");
            return Ok(Verdict::Consumed);
        };
        let user = stanza::parse_jid(&user)?;
        stanza::set_attr(&mut el, "to", user.to_string());
        if let Some(from) = el.attr("from").and_then(|f| Jid::new(f).ok()) {
            self.observe(now, &el, &from, &user);
        }
        self.send(&el);
        Ok(Verdict::Consumed)
    }

    fn remote_presence(&mut self, now: Timestamp, mut el: Element, room: &str, nick: &str) {
        stanza::remove_attr(&mut el, "to");
        let Some(r) = self.rooms.get_mut(room) else {
            return;
        };
        match stanza::stanza_type(&el) {
            Some("unavailable") => {
                let lost_ours = r
                    .occupants
                    .get(nick)
                    .and_then(|o| o.local.clone())
                    .filter(|_| !final_leave(&el));
                let link_down = self.links.get(&r.master).is_some_and(|l| l.down);
                if lost_ours.is_some() && link_down {
                    // The resync after the outage rejoins them.
                    return;
                }
                if let Some(user) = lost_ours {
                    // The master lost track of one of our users (its link timeout, or an error
                    // it kicked them for): rejoin them, unseen by them.
                    info!(%room, %nick, "the master dropped a local occupant: rejoining");
                    if let Some(join) = r.local.get(&user).map(|(_, j)| j.clone()) {
                        r.resync.insert(nick.to_string());
                        let join = self.rejoin(&join);
                        self.send(&join);
                    }
                    return;
                }
                let Some(o) = r.occupants.remove(nick) else {
                    return;
                };
                let kicked = o.local.clone();
                if let Some(user) = &kicked {
                    r.local.remove(user);
                }
                self.fan_out_presence(room, nick, &el, kicked.as_deref());
                self.close_if_empty(room);
            }
            Some("error") => {
                if let Some(p) = r.pending.remove(nick) {
                    stanza::set_attr(&mut el, "to", p.user);
                    self.send(&el);
                    self.close_if_empty(room);
                } else if let Some(user) = r.occupants.get(nick).and_then(|o| o.local.clone()) {
                    if r.resync.contains(nick) {
                        stanza::set_attr(&mut el, "to", user);
                        self.send(&el);
                        self.rejoin_refused(now, room, nick);
                    }
                }
            }
            Some(_) => {}
            None => {
                if let Some(p) = r.pending.remove(nick) {
                    // The master admitted a pending join.
                    r.local.insert(p.user.clone(), (nick.to_string(), p.join));
                    r.occupants.insert(
                        nick.to_string(),
                        Occupant {
                            presence: el,
                            local: Some(p.user),
                        },
                    );
                    if r.sync == Sync::Ready {
                        self.serve_join(now, room, nick);
                    } else {
                        r.awaiting.push(nick.to_string());
                    }
                    return;
                }
                let local = r.occupants.get(nick).and_then(|o| o.local.clone());
                if local.is_none() && stanza::has_status(&el, "110") {
                    // The master confirms a join of ours that we have since cancelled (the user
                    // left first, or it timed out): its leave follows; show nothing.
                    debug!(%room, %nick, "confirmation of a cancelled join ignored");
                    return;
                }
                if r.resync.remove(nick) {
                    // The echo of our own rejoin after a link loss: nothing changed for anyone here.
                    if let Some(o) = r.occupants.get_mut(nick) {
                        o.presence = el;
                    }
                    if r.resync.is_empty() {
                        // What the master refused while it had lost our users goes first.
                        let refused = std::mem::take(&mut r.refused);
                        r.queue_first(refused);
                        match r.sync {
                            Sync::Ready => self.flush_queue(now, room, true),
                            Sync::Rejoin => self.request_history(now, room),
                            _ => {}
                        }
                    }
                    return;
                }
                r.occupants.insert(
                    nick.to_string(),
                    Occupant {
                        presence: el.clone(),
                        local,
                    },
                );
                self.fan_out_presence(room, nick, &el, None);
            }
        }
    }

    /// Serve a confirmed local join from the mirror's copy: the other occupants, the join itself
    /// to everyone (with 110 to the joiner), history, subject (XEP-0045 §7.2 order).
    fn serve_join(&mut self, _now: Timestamp, room: &str, nick: &str) {
        let Some(r) = self.rooms.get(room) else {
            return;
        };
        let Some(user) = r.occupants.get(nick).and_then(|o| o.local.clone()) else {
            return;
        };
        let mut out = Vec::new();
        for (other, o) in r.occupants.iter().filter(|(n, _)| n.as_str() != nick) {
            out.push(r.presence_for(&o.presence, other, nick, &user));
        }
        for e in r.history.iter() {
            let mut m = e.delayed(&r.jid);
            stanza::set_attr(&mut m, "to", &user);
            out.push(m);
        }
        let mut subject = r.subject.clone().unwrap_or_else(|| {
            let mut s = Element::builder("message", ns::JABBER_CLIENT).build();
            stanza::set_attr(&mut s, "from", &r.jid);
            stanza::set_attr(&mut s, "type", "groupchat");
            s.append_child(Element::builder("subject", ns::JABBER_CLIENT).build());
            s
        });
        stanza::set_attr(&mut subject, "to", &user);
        let presence = r.occupants.get(nick).map(|o| o.presence.clone());
        let split_at = r.occupants.len().saturating_sub(1);
        let (before, after) = out.split_at(split_at);
        let (before, after) = (before.to_vec(), after.to_vec());
        for p in before {
            self.send(&p);
        }
        if let Some(p) = presence {
            self.fan_out_presence(room, nick, &p, None);
        }
        for m in after {
            self.send(&m);
        }
        self.send(&subject);
    }

    fn remote_groupchat(&mut self, now: Timestamp, mut el: Element, room: &str) {
        stanza::remove_attr(&mut el, "to");
        let down = self.is_down(room);
        let Some(r) = self.rooms.get_mut(room) else {
            return;
        };
        if r.synced && (down || r.sync != Sync::Ready) {
            // Older messages may still come from the catch-up: this one waits behind them.
            if r.held.len() >= HELD {
                r.held.remove(0);
            }
            r.held.push(el);
            return;
        }
        r.seen.insert(fingerprint(&el));
        let is_subject = el.get_child("subject", ns::JABBER_CLIENT).is_some()
            && el.get_child("body", ns::JABBER_CLIENT).is_none();
        let text = stanza::serialize(&el);
        let copies = stanza::copies_to(&text, el.name(), r.local.keys().map(String::as_str));
        if is_subject {
            r.subject = Some(el);
        } else {
            let entry = Entry::with_text(el, &text, now);
            r.newest_from_master = r.newest_from_master.max(Some(entry.stamp));
            r.history.push(entry);
        }
        self.transmits.extend(copies);
    }

    fn remote_iq(&mut self, now: Timestamp, iq: Element, room: &str) -> Result<(), Error> {
        let service = self.config.service.clone();
        let reply_to = iq.attr("from").unwrap_or_default().to_string();
        match stanza::stanza_type(&iq) {
            Some("set") => {
                if let Some(c) = iq.get_child("config", ns::DMUC0) {
                    match Config::try_from(c.clone()) {
                        Ok(config) => {
                            if let Some(r) = self.rooms.get_mut(room) {
                                r.whois = config.whois();
                            }
                            self.send(&stanza::iq_result(&iq, &service));
                        }
                        Err(e) => {
                            let reply = stanza::error_reply(
                                &iq,
                                &service,
                                &reply_to,
                                Condition::BadRequest,
                                &e.to_string(),
                            );
                            self.send(&reply);
                        }
                    }
                } else if let Some(c) = iq.get_child("roster", ns::DMUC0) {
                    match Roster::try_from(c.clone()) {
                        Ok(roster) => {
                            self.send(&stanza::iq_result(&iq, &service));
                            self.apply_roster(now, room, roster);
                        }
                        Err(e) => {
                            let reply = stanza::error_reply(
                                &iq,
                                &service,
                                &reply_to,
                                Condition::BadRequest,
                                &e.to_string(),
                            );
                            self.send(&reply);
                        }
                    }
                } else {
                    let reply = stanza::error_reply(
                        &iq,
                        &service,
                        &reply_to,
                        Condition::ServiceUnavailable,
                        "",
                    );
                    self.send(&reply);
                }
            }
            Some("result") | Some("error") => {
                let id = iq.attr("id").unwrap_or_default();
                let bounced = is_bounce(&iq);
                let roster_answer = self
                    .rooms
                    .get(room)
                    .and_then(|r| r.roster_iq.as_ref())
                    .is_some_and(|(h, _)| h == id);
                let history_answer = self
                    .rooms
                    .get(room)
                    .and_then(|r| r.history_iq.as_ref())
                    .is_some_and(|(h, _)| h == id);
                if bounced && (roster_answer || history_answer) {
                    let master = self.rooms.get(room).map(|r| r.master.clone());
                    if let Some(master) = master {
                        self.link_lost(now, &master);
                    }
                    return Ok(());
                }
                if roster_answer && stanza::stanza_type(&iq) == Some("error") {
                    // The master has no roster for us (it lost the room, or every one of our
                    // users): an empty roster, so that every local user rejoins.
                    info!(%room, "the master has no roster for this mirror: rejoining");
                    self.apply_roster(now, room, Roster::default());
                    return Ok(());
                }
                let ours = self
                    .rooms
                    .get(room)
                    .and_then(|r| r.history_iq.as_ref())
                    .is_some_and(|(h, _)| h == id);
                if ours {
                    let messages = iq
                        .get_child("history", ns::MUC)
                        .and_then(|h| HistoryResult::try_from(h.clone()).ok())
                        .map(|h| h.messages)
                        .unwrap_or_default();
                    if stanza::stanza_type(&iq) == Some("error") {
                        warn!(%room, "the master refused the history request");
                    }
                    self.apply_history(now, room, messages);
                }
            }
            _ => {
                let reply = stanza::error_reply(
                    &iq,
                    &service,
                    &reply_to,
                    Condition::ServiceUnavailable,
                    "",
                );
                self.send(&reply);
            }
        }
        Ok(())
    }

    /// The master's occupant list: add who is new, drop who is gone (except our own users), and
    /// ask for the history. After the first sync, a roster starts a catch-up: local users the
    /// master no longer has rejoin, and the history request asks for what was said since the
    /// newest message the mirror has (less a margin; what it already has is dropped).
    fn apply_roster(&mut self, now: Timestamp, room: &str, roster: Roster) {
        let Some(r) = self.rooms.get_mut(room) else {
            return;
        };
        r.roster_iq = None;
        let announce = !r.local.is_empty();
        let catch_up = r.synced;
        let mut fresh = BTreeMap::new();
        for item in roster.items {
            let nick = item.name.clone();
            fresh.insert(nick.clone(), roster_presence(&r.jid, item));
        }
        let gone: Vec<String> = r
            .occupants
            .iter()
            .filter(|(n, o)| o.local.is_none() && !fresh.contains_key(*n))
            .map(|(n, _)| n.clone())
            .collect();
        let mut changes = Vec::new();
        for n in gone {
            if let Some(o) = r.occupants.remove(&n) {
                let mut p = o.presence;
                stanza::set_attr(&mut p, "type", "unavailable");
                changes.push((n, p));
            }
        }
        let mut rejoins = Vec::new();
        if catch_up {
            for (nick, join) in r.local.values() {
                if !fresh.contains_key(nick) && !r.resync.contains(nick) {
                    rejoins.push((nick.clone(), join.clone()));
                }
            }
        }
        // Our users who left during the outage: their leave is still queued for the master.
        let leaving: BTreeSet<String> = r
            .queue
            .iter()
            .filter(|q| !q.is_message())
            .map(|q| q.nick.clone())
            .collect();
        for (nick, presence) in fresh {
            let local = r.occupants.get(&nick).and_then(|o| o.local.clone());
            if local.is_some() || r.pending.contains_key(&nick) || leaving.contains(&nick) {
                continue;
            }
            let known = r.occupants.contains_key(&nick);
            r.occupants.insert(
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
    fn request_history(&mut self, now: Timestamp, room: &str) {
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
        let to = r.jid.clone();
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
            id: match Jid::new(&r.jid) {
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
    fn rejoin_refused(&mut self, now: Timestamp, room: &str, nick: &str) {
        let Some(r) = self.rooms.get_mut(room) else {
            return;
        };
        if !r.resync.remove(nick) {
            return;
        }
        warn!(%room, %nick, "the master refused a rejoin after an outage");
        let user = r.occupants.get(nick).and_then(|o| o.local.clone());
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
    fn rejoin_user(&mut self, room: &str, user: &str) {
        let Some(r) = self.rooms.get_mut(room) else {
            return;
        };
        let Some((nick, join)) = r.local.get(user).cloned() else {
            return;
        };
        if r.resync.insert(nick) {
            let join = self.rejoin(&join);
            self.send(&join);
        }
    }

    /// A local user's join, as sent again after the master lost them.
    fn rejoin(&self, join: &Element) -> Element {
        let mut join = self.to_master(join);
        if join.get_child("x", ns::MUC).is_none() {
            join.append_child(Element::builder("x", ns::MUC).build());
        }
        join
    }

    /// The history answer: store it; after an outage, deliver what local users missed (each
    /// message once), then send the queue.
    fn apply_history(&mut self, now: Timestamp, room: &str, messages: Vec<Element>) {
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
        let local_nicks: BTreeSet<String> = r.local.values().map(|(n, _)| n.clone()).collect();
        let mut missed = Vec::new();
        for m in messages {
            let mut m = m;
            stanza::remove_attr(&mut m, "to");
            if m.get_child("subject", ns::JABBER_CLIENT).is_some()
                && m.get_child("body", ns::JABBER_CLIENT).is_none()
            {
                r.subject = Some(m);
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
                missed.push(entry.delayed(&r.jid));
            }
            r.newest_from_master = r.newest_from_master.max(Some(entry.stamp));
            r.history.push(entry);
        }
        if catch_up {
            info!(%room, missed = missed.len(), "caught up after an outage");
        }
        let recipients: Vec<String> = r.local.keys().cloned().collect();
        let awaiting = std::mem::take(&mut r.awaiting);
        for m in missed {
            let text = stanza::serialize(&m);
            self.transmits.extend(stanza::copies_to(
                &text,
                m.name(),
                recipients.iter().map(String::as_str),
            ));
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
    fn flush_queue(&mut self, now: Timestamp, room: &str, barrier: bool) {
        if self.is_down(room) {
            return;
        }
        let service = self.config.service.clone();
        let Some(r) = self.rooms.get_mut(room) else {
            return;
        };
        if r.queue.is_empty() {
            return;
        }
        let round = round_of(&self.links, &r.master);
        let mut out = Vec::new();
        let mut wrapped: BTreeMap<String, String> = BTreeMap::new();
        let queued: Vec<Queued> = r.queue.drain(..).collect();
        for mut q in queued {
            if q.is_message() {
                let present = r.local.contains_key(&q.user);
                if !present && !wrapped.contains_key(&q.user) {
                    let mut join = Element::builder("presence", ns::JABBER_CLIENT).build();
                    stanza::set_attr(&mut join, "from", &q.user);
                    stanza::set_attr(&mut join, "to", format!("{}/{}", r.jid, q.nick));
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
                r.in_flight.push_back(q);
            } else {
                wrapped.remove(&q.user);
                if !r.local.contains_key(&q.user) {
                    // Shown here when they left; the master's echo of it is not sent back.
                    r.occupants.remove(&q.nick);
                }
                out.push(q.stanza);
            }
        }
        for (user, nick) in wrapped {
            let mut leave = Element::builder("presence", ns::JABBER_CLIENT).build();
            stanza::set_attr(&mut leave, "from", user);
            stanza::set_attr(&mut leave, "to", format!("{}/{}", r.jid, nick));
            stanza::set_attr(&mut leave, "type", "unavailable");
            out.push(leave);
        }
        info!(%room, sent = out.len(), "sent the outbound queue");
        r.barrier = barrier;
        let master = r.master.clone();
        self.queue_dirty = true;
        for el in out {
            self.send(&el);
        }
        // The acknowledgement that lifts the barrier: ask for it now.
        if let Some(link) = self.links.get_mut(&master).filter(|_| barrier) {
            link.schedule(now);
        }
    }

    /// The host saw the s2s link to a master service go down or come up (its own s2s events).
    /// Pings find the same by themselves; this only makes it faster.
    pub fn handle_link(&mut self, now: Timestamp, master: &str, up: bool) {
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
        self.handle_s2s_closing(now, domain);
        let domain = domain.to_ascii_lowercase();
        for room in self.rooms_of(&domain) {
            let ready = self.rooms.get(&room).is_some_and(|r| {
                r.sync == Sync::Ready && r.resync.is_empty() && r.refused.is_empty()
            });
            if ready {
                self.flush_queue(now, &room, true);
            }
        }
    }

    /// The first half of [`Mirror::handle_s2s_closed`], for a host that still routes to the
    /// closing connection for a moment (ejabberd): what was in flight goes back to the queue,
    /// and newer messages wait behind it, until [`Mirror::handle_s2s_closed`] sends it.
    pub fn handle_s2s_closing(&mut self, now: Timestamp, domain: &str) {
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
            if r.in_flight.is_empty() {
                continue;
            }
            debug!(%room, in_flight = r.in_flight.len(), "s2s session closed: what was in flight goes again");
            let in_flight = std::mem::take(&mut r.in_flight);
            r.queue_first(in_flight);
            self.queue_dirty = true;
        }
    }

    /// The host saw an incoming s2s session from `domain` (a master) close: what the master sent
    /// into it may be lost, unbounced. Each room in sync catches up from the room's history;
    /// live messages wait behind the catch-up, so that each sender's messages stay in order.
    pub fn handle_s2s_in_closed(&mut self, now: Timestamp, domain: &str) {
        let domain = domain.to_ascii_lowercase();
        if self.links.get(&domain).is_none_or(|l| l.down) {
            return;
        }
        for room in self.rooms_of(&domain) {
            let Some(r) = self.rooms.get_mut(&room) else {
                continue;
            };
            if !r.synced || r.sync != Sync::Ready || r.local.is_empty() {
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

    /// Down: every remote occupant is shown leaving (status 333) to the local occupants, who go
    /// on chatting; their messages, and those still in flight, queue for the master.
    fn link_lost(&mut self, now: Timestamp, master: &str) {
        let interval = self.config.ping_interval_ms;
        let link = self.links.entry(master.to_string()).or_default();
        if !link.go_down(now) {
            return;
        }
        link.schedule(now.plus_ms(interval));
        warn!(%master, "link down: remote occupants shown as gone, messages queue");
        for room in self.rooms_of(master) {
            self.lose(&room);
        }
    }

    /// Up: each room with local occupants asks the master for its roster (which resyncs it);
    /// a room with only queued messages sends them.
    fn link_back(&mut self, now: Timestamp, master: &str) {
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
    fn pong(&mut self, now: Timestamp, master: &str, id: &str, bounced: bool) {
        let answer = self
            .links
            .get_mut(master)
            .and_then(|l| l.answer(now, id, bounced));
        match answer {
            Some(Pong::Bounced) => self.link_lost(now, master),
            Some(Pong::Alive { round, domain }) => {
                let mut acked = 0;
                for room in self.rooms_of(master) {
                    if let Some(r) = self.rooms.get_mut(&room) {
                        let (done, waiting): (VecDeque<Queued>, VecDeque<Queued>) =
                            std::mem::take(&mut r.in_flight)
                                .into_iter()
                                .partition(|q| q.round <= round && q.user_domain() == domain);
                        r.in_flight = waiting;
                        acked += done.len();
                        r.delivered.extend(done);
                        while r.delivered.len() > DELIVERED {
                            r.delivered.pop_front();
                        }
                        if r.barrier && r.in_flight.is_empty() {
                            r.barrier = false;
                            if r.sync == Sync::Ready && r.resync.is_empty() && r.refused.is_empty()
                            {
                                // What waited behind the barrier: sent as any message is.
                                self.flush_queue(now, &room, false);
                            }
                        }
                    }
                    self.close_if_empty(&room);
                }
                if acked > 0 {
                    self.queue_dirty = true;
                }
                if domain == self.config.service {
                    self.redo_lost_requests(now, master, round);
                }
                self.link_back(now, master);
            }
            None => {}
        }
    }

    /// The master answered the mirror service's ping of `round`: a roster or history request
    /// sent before it on the same stream, whose answer (sent before the ping's) has not come, was
    /// lost with a dying connection. Ask again.
    fn redo_lost_requests(&mut self, now: Timestamp, master: &str, round: u64) {
        for room in self.rooms_of(master) {
            let Some(r) = self.rooms.get(&room) else {
                continue;
            };
            // A host may answer pings before its rooms answer (ejabberd): give the answer a ping
            // timeout's head start before calling it lost.
            if r.sync_round > round || now.since(r.sync_sent) < self.config.ping_timeout_ms {
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

    fn lose(&mut self, room: &str) {
        let Some(r) = self.rooms.get_mut(room) else {
            return;
        };
        // What was in flight may or may not have arrived: it goes again, ahead of the queue, and
        // the master drops what it already has by origin-id.
        let in_flight = std::mem::take(&mut r.in_flight);
        r.queue_first(in_flight);
        let refused = std::mem::take(&mut r.refused);
        r.queue_first(refused);
        r.resync.clear();
        r.history_iq = None;
        r.roster_iq = None;
        r.catching_up = false;
        if r.sync != Sync::Ready && r.synced {
            r.sync = Sync::Ready;
        }
        let pending: Vec<(String, Pending)> = std::mem::take(&mut r.pending).into_iter().collect();
        let remote: Vec<(String, Element)> = r
            .occupants
            .iter()
            .filter(|(_, o)| o.local.is_none())
            .map(|(n, o)| (n.clone(), o.presence.clone()))
            .collect();
        for (n, _) in &remote {
            r.occupants.remove(n);
        }
        let room_jid = r.jid.clone();
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
        for (nick, presence) in remote {
            let mut p = Element::builder("presence", ns::JABBER_CLIENT).build();
            stanza::set_attr(&mut p, "from", format!("{room_jid}/{nick}"));
            stanza::set_attr(&mut p, "type", "unavailable");
            let mut x = Element::builder("x", ns::MUC_USER).build();
            if let Some(item) = stanza::muc_item(&presence) {
                let mut item = item.clone();
                stanza::set_attr(&mut item, "role", "none");
                x.append_child(item);
            }
            let mut status = Element::builder("status", ns::MUC_USER).build();
            stanza::set_attr(&mut status, "code", "333");
            x.append_child(status);
            p.append_child(x);
            self.fan_out_presence(room, &nick, &p, None);
        }
        self.queue_dirty = true;
        self.close_if_empty(room);
    }

    fn resync(&mut self, now: Timestamp, room: &str) {
        let deadline = now.plus_ms(self.config.join_timeout_ms);
        let id = self.id("roster");
        let service = self.config.service.clone();
        let Some(r) = self.rooms.get_mut(room) else {
            return;
        };
        let round = round_of(&self.links, &r.master);
        if r.local.is_empty() {
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
        stanza::set_attr(&mut iq, "to", &r.jid);
        stanza::set_attr(&mut iq, "id", id);
        stanza::set_attr(&mut iq, "type", "get");
        iq.append_child(Roster::default().into());
        self.send(&iq);
    }

    /// Time has come: a ping round, or a ping that was never answered (the link is down); joins
    /// the master never answered fail with `remote-server-timeout`; a history request that was
    /// never answered counts as an empty history; a roster request never answered means the
    /// link is down after all.
    pub fn handle_timeout(&mut self, now: Timestamp) {
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
                    stanza::set_attr(&mut e, "to", r.occupant_jid(&nick));
                    errors.push(stanza::error_reply(
                        &e,
                        &r.occupant_jid(&nick),
                        &p.user,
                        Condition::RemoteServerTimeout,
                        "The room did not answer",
                    ));
                    // Withdraw the join, in case the master admits it late: no ghost there.
                    let mut leave = Element::builder("presence", ns::JABBER_CLIENT).build();
                    stanza::set_attr(&mut leave, "from", &p.user);
                    stanza::set_attr(&mut leave, "to", r.occupant_jid(&nick));
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

    /// Expire unanswered pings, and start the ping rounds that are due.
    fn ping(&mut self, now: Timestamp) {
        let masters: Vec<String> = self.links.keys().cloned().collect();
        for master in masters {
            let expired = self.links.get_mut(&master).is_some_and(|l| l.expire(now));
            if expired {
                warn!(%master, "a ping went unanswered");
                self.link_lost(now, &master);
            }
            let rooms = self.rooms_of(&master);
            let Some(link) = self.links.get_mut(&master) else {
                continue;
            };
            if rooms.is_empty() {
                link.idle();
                continue;
            }
            if !link.due(now) {
                continue;
            }
            // One ping per user domain: each shares the s2s stream of that domain's messages.
            let mut domains = BTreeSet::new();
            for room in &rooms {
                if let Some(r) = self.rooms.get(room) {
                    domains.extend(r.local.keys().map(|u| user_domain(u).to_string()));
                    domains.extend(r.pending.values().map(|p| user_domain(&p.user).to_string()));
                    domains.extend(
                        r.queue
                            .iter()
                            .chain(r.in_flight.iter())
                            .map(|q| q.user_domain().to_string()),
                    );
                }
            }
            // And one from the mirror service: it shares the streams of the sync requests.
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

    /// At start: the queue the host stored before a restart (from [`Mirror::export_queue`]).
    /// Nothing is sent until a ping to the master is answered; then each sender is joined for
    /// the delivery of what they said. Items that do not parse, or name a room this mirror does
    /// not mirror, are skipped with a warning.
    pub fn import_queue(&mut self, now: Timestamp, items: &[String]) -> usize {
        let mut n = 0;
        for text in items {
            let (room, q) = match Queued::from_xml(text) {
                Ok(v) => v,
                Err(e) => {
                    warn!(error = %e, "skipped a stored queue item");
                    continue;
                }
            };
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
            r.queue.push_back(q);
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
