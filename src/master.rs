//! The master role: a hook beside the host's own MUC service. The host's rooms stay the
//! authority on who is in a room and what is said; the master engine knows which occupants joined
//! through which mirror, applies the trust policy to those joins, syncs a new mirror (config,
//! roster, history), and turns the room's per-occupant broadcasts into one copy per mirror.
//!
//! # API
//!
//! Getters: [`Master::routes_via_mirror`], [`Master::mirrors`], [`Master::remote_occupants`].
//!
//! Inputs (`handle_*`, each given the current time):
//! - [`Master::handle_presence`]: a presence to an occupant JID, before the MUC processes it;
//! - [`Master::handle_snapshot`]: the room's config form and occupants, when a join asked for a sync;
//! - [`Master::handle_iq`]: an IQ to a room (history requests, answers to our sync IQs);
//! - [`Master::handle_history`]: the room's history, answering a [`HistoryRequest`];
//! - [`Master::begin_broadcast`] / [`Master::end_broadcast`]: bracket one room broadcast;
//! - [`Master::handle_outbound`]: every stanza the MUC sends towards a remote domain;
//! - [`Master::handle_left`]: an occupant left the room;
//! - [`Master::handle_ping`]: an XEP-0199 ping to the MUC service (mirrors ping to prove the
//!   link is alive);
//! - [`Master::handle_groupchat`]: a groupchat message to a room, before the room broadcasts it
//!   (a second copy of a message a mirror sent again after an outage is dropped; the stanza-id
//!   a mirror proposed for its user's message is handed to the host's archive);
//! - [`Master::handle_timeout`]: the time asked for by [`Master::poll_timeout`] has come (a
//!   mirror whose pings stopped is lost);
//! - [`Master::handle_link`]: the host saw the s2s link to a domain go down or come up;
//! - [`Master::handle_config`]: the room's config form, answering [`MasterAction::ConfigChanged`]
//!   (the room announced a configuration change; the mirrors get the new config first).
//!
//! Outputs (`poll_*`): [`Master::poll_transmit`] (stanzas to route), [`Master::poll_action`]
//! (things only the host can do to its room, such as removing the occupants of a lost mirror)
//! and [`Master::poll_timeout`].

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};

use jid::Jid;
use minidom::Element;
use tracing::{debug, info, warn};

use crate::ack;
use crate::bounds::Limits;
use crate::elements::{
    Affiliation, Config, Dmuc, HistoryResult, Role, Room, Roster, RosterAffiliation, RosterItem,
    Whois,
};
use crate::error::Error;
use crate::escape;
use crate::link_watch::LinkWatch;
use crate::mirror_quota::MirrorQuota;
use crate::ns;
use crate::rate::LogLimiter;
use crate::recent::Recent;
use crate::room_history::{self, Entry};
use crate::room_rules::RoomRules;
use crate::stanza::{self, Condition};
use crate::stanza_ids::{self, Adoption};
use crate::time::Timestamp;
use xmpp_parsers::muc::muc::History;

/// A mirror the master accepts joins from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustedMirror {
    /// The mirror service's domain, e.g. `mirror.raleigh.localhost`.
    pub mirror: String,
    /// User domains the mirror may speak for. Empty means the mirror's parent domain
    /// (`raleigh.localhost` for `mirror.raleigh.localhost`).
    pub user_domains: Vec<String>,
}

impl TrustedMirror {
    /// A mirror that speaks for its parent domain.
    pub fn new(mirror: impl Into<String>) -> Self {
        TrustedMirror {
            mirror: mirror.into().to_ascii_lowercase(),
            user_domains: Vec::new(),
        }
    }

    /// May this mirror forward joins of users at `domain`?
    pub fn may_speak_for(&self, domain: &str) -> bool {
        if self.user_domains.is_empty() {
            parent_domain(&self.mirror) == Some(domain)
        } else {
            self.user_domains
                .iter()
                .any(|d| d.eq_ignore_ascii_case(domain))
        }
    }
}

fn parent_domain(domain: &str) -> Option<&str> {
    domain
        .split_once('.')
        .map(|(_, parent)| parent)
        .filter(|p| p.contains('.') || !p.is_empty())
}

/// Occupants behind mirrors who left lately, whose stanzas from the room still go through the
/// mirror.
const RECENTLY_LEFT: usize = 1000;

/// Origin-ids remembered per room, for dropping messages a mirror sends twice.
const ORIGIN_IDS: usize = 2000;

/// Master settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MasterConfig {
    /// Mirrors allowed to forward joins.
    pub trusted_mirrors: Vec<TrustedMirror>,
    /// Does the host bracket every presence broadcast with `begin_broadcast`/`end_broadcast`?
    /// Prosody can (it has one method per broadcast); ejabberd cannot (its room routes each
    /// occupant's copy on its own). Without brackets the master forwards each occupant's presence
    /// to a mirror once per change, recognising the other copies of the same presence.
    pub unbracketed_presence: bool,
    /// A mirror not heard from (a ping, a join, a message, anything) for this long is lost: its
    /// occupants are evicted. Longer than the mirrors' ping interval plus their ping timeout.
    pub link_timeout_ms: u64,
    /// Can the host's archive take the stanza-id a mirror proposes for its user's message (see
    /// [`crate::stanza_ids`])? Also decides what the mirrors are told in the room's config.
    pub stanza_ids: Adoption,
    /// Does the host's archive also put XEP-0313 v0.2's `<archived xmlns='urn:xmpp:mam:tmp'/>`
    /// on each message it archives (ejabberd's mod_mam)? Mirrors then add it to their copies.
    pub archived_element: bool,
    /// What the host's MUC does where XEP-0045 leaves it open; told to the mirrors in the
    /// room's config, so that their replicas answer as the room does.
    pub rules: RoomRules,
    /// Rooms one mirror may have occupants in; a join to one more gets `resource-constraint`.
    pub max_rooms_per_mirror: usize,
    /// Joins through one mirror per second, sustained, and at once: past them a join gets
    /// `resource-constraint` (wait). The burst covers a mirror rejoining all its users after an
    /// outage.
    pub mirror_join_rate: u32,
    /// See [`MasterConfig::mirror_join_rate`].
    pub mirror_join_burst: u32,
    /// Depth and size of the stanzas the master accepts from users, outsiders and mirrors
    /// (see [`crate::bounds`]).
    pub limits: Limits,
}

impl Default for MasterConfig {
    /// No trusted mirrors, bracketed presence, a link timeout of 360 s (the mirrors' default
    /// 300 s interval and 20 s timeout, and 40 s of margin), no stanza-id adoption.
    fn default() -> Self {
        MasterConfig {
            trusted_mirrors: Vec::new(),
            unbracketed_presence: false,
            link_timeout_ms: 360_000,
            stanza_ids: Adoption::Never,
            archived_element: false,
            rules: RoomRules::default(),
            max_rooms_per_mirror: 1000,
            mirror_join_rate: 20,
            mirror_join_burst: 500,
            limits: Limits::default(),
        }
    }
}

/// What the host does with a groupchat message after [`Master::handle_groupchat`]. Either way
/// the host first removes any `<stanza-id xmlns='urn:xmpp:dmuc:0'/>` from it, whoever sent it:
/// a proposal is for the master, not for the occupants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GroupchatVerdict {
    /// A copy of a message already broadcast (same sender, same XEP-0359 origin-id): a mirror
    /// sends again what it cannot know arrived before an outage. Drop it, silently.
    Duplicate,
    /// Let the room broadcast it.
    Broadcast {
        /// The id the room's archive gives the message (its `<stanza-id by='room'/>` for
        /// everyone): the one the sender's mirror proposed and already showed its users. `None`:
        /// the archive picks one, as for any message.
        stanza_id: Option<String>,
    },
}

/// A mirror's link, for an admin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MirrorStatus {
    /// The mirror service.
    pub mirror: String,
    /// Is the link up, as far as the master knows?
    pub up: bool,
    /// Rooms the mirror has occupants in.
    pub rooms: usize,
    /// Occupants that joined through it.
    pub occupants: usize,
    /// When the mirror last pinged (or joined someone).
    pub last_seen: Option<Timestamp>,
    /// Times the master lost the mirror since start.
    pub outages: u64,
}

/// What the host does with a presence after [`Master::handle_presence`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PresenceVerdict {
    /// Not a mirror matter, or a mirror matter the MUC handles as usual: go on.
    Pass,
    /// A join through a trusted mirror: go on with the join. If `sync` is true, this is the
    /// mirror's first occupant in the room: call [`Master::handle_snapshot`] before the MUC
    /// broadcasts the join.
    MirrorJoin {
        /// The mirror's domain.
        mirror: String,
        /// Whether the mirror needs the room's config and roster.
        sync: bool,
    },
    /// Refused. The error is queued for [`Master::poll_transmit`]; the host must stop processing.
    Refused,
}

/// What the host does with an IQ after [`Master::handle_iq`].
#[derive(Debug, Clone, PartialEq)]
pub enum IqVerdict {
    /// Not ours.
    Pass,
    /// Handled (an answer to one of our sync IQs, or an error reply is queued).
    Consumed,
    /// A mirror asks for history: gather the room's messages and call [`Master::handle_history`].
    History(HistoryRequest),
    /// A mirror asks for the roster after an outage: call [`Master::handle_snapshot`] for it
    /// (with no joining nick). The IQ's answer is queued.
    Snapshot {
        /// The room's bare JID.
        room: String,
        /// The mirror's domain.
        mirror: String,
    },
}

/// A mirror's request for a room's history.
#[derive(Debug, Clone, PartialEq)]
pub struct HistoryRequest {
    /// The room's bare JID.
    pub room: String,
    /// Where the answer goes (the mirror).
    pub to: String,
    /// The JID the request was addressed to (the answer comes from it).
    pub from: String,
    /// The IQ id.
    pub id: String,
    /// `maxchars`, `maxstanzas`, `seconds`, `since`.
    pub limits: History,
}

/// What the host does with an outbound stanza after [`Master::handle_outbound`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outbound {
    /// Send it as it is.
    Send,
    /// Don't send it: it was folded into one copy per mirror, or the mirror serves it itself.
    Drop,
    /// Send this instead: the stanza re-addressed to the user's escaped JID at the mirror (an
    /// error, an IQ answer, a private message: everything from the room to an occupant behind a
    /// mirror that is not a broadcast copy), or one copy of a presence for the mirror.
    Replace(String),
}

/// Things the host must do to its own room.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MasterAction {
    /// Remove an occupant whose mirror's link is lost: show it leaving with status 333.
    Evict {
        /// The room's bare JID.
        room: String,
        /// The occupant's nick.
        nick: String,
        /// The occupant's real JID.
        jid: String,
    },
    /// The room announced a change of its configuration (a groupchat message from the room with
    /// XEP-0045 status 104, 170-174). Call [`Master::handle_config`] with the room's current
    /// config form, before anything else happens to the room: the announcement waits, so that
    /// every mirror has the new config before it serves anything that depends on it.
    ConfigChanged {
        /// The room's bare JID.
        room: String,
    },
}

/// An occupant that joined through a mirror.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Remote {
    nick: String,
    mirror: String,
    /// Has the room broadcast this occupant's join yet? Until then an error is a refused join.
    confirmed: bool,
    /// A second session on a nick another session of the same account holds through the same
    /// mirror (multi-session nicks): the room's stanzas to it go to it as the room made them,
    /// through the mirror, like a plain federated user's (see [`RoomState::shared`]).
    direct: bool,
    /// The occupant's role, as the room last showed it to them.
    role: Option<String>,
}

#[derive(Clone, Debug, Default)]
struct RoomState {
    /// Occupants that joined through a mirror, by real (full) JID.
    by_real: HashMap<String, Remote>,
    /// Mirrors with occupants here, and whether their link is down.
    mirrors: BTreeMap<String, MirrorLink>,
    /// Leaves the mirror announced itself: its copy of that broadcast is not sent back.
    announced_leave: BTreeSet<String>,
    /// Occupants the engine asked the host to evict: their leave is not one the mirror announced.
    evicting: BTreeSet<String>,
    /// Nesting depth of broadcasts.
    depth: u32,
    /// One candidate copy per mirror for the broadcast under way.
    captured: BTreeMap<String, Captured>,
    /// The room's config form as last sent to the mirrors (compacted).
    config: Option<Element>,
    /// A config announcement waiting for [`Master::handle_config`].
    config_wait: Option<ConfigWait>,
}

/// A broadcast announcing a configuration change, held until the host hands over the new form.
#[derive(Clone, Debug)]
struct ConfigWait {
    /// The status codes it announces.
    codes: Vec<String>,
    /// The copies for the mirrors, addressed, in order.
    held: Vec<Element>,
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct MirrorLink {
    down: bool,
    /// Without brackets: the presence last forwarded for each nick, as a fingerprint.
    forwarded: HashMap<String, u64>,
    /// The room now shows real JIDs to everyone, and the mirror may lack some (it was sent only
    /// what its occupants could see): its next join syncs the roster again.
    stale: bool,
}

#[derive(Clone, Debug)]
struct Captured {
    rank: u8,
    stanza: Element,
    /// Self-only status codes (100, 201, 210) of the subject's own copy, when a richer copy was
    /// chosen: the mirror shows them to its occupant.
    self_codes: Vec<String>,
}

impl RoomState {
    fn remote_by_nick(&self, nick: &str) -> Option<(&String, &Remote)> {
        self.by_real.iter().find(|(_, r)| r.nick == nick)
    }

    /// Does `nick` have a [`Remote::direct`] session through `mirror`? Then each of the nick's
    /// sessions there gets the room's presences of that nick as the room made them for it (the
    /// hosts differ in which session's presence each sees), and the copy for the mirror's other
    /// occupants says so (`<sessions xmlns='urn:xmpp:dmuc:0'/>`).
    fn shared(&self, nick: &str, mirror: &str) -> bool {
        self.by_real
            .values()
            .any(|r| r.direct && r.nick == nick && r.mirror == mirror)
    }

    fn mirror_has_occupants(&self, mirror: &str) -> bool {
        self.by_real.values().any(|r| r.mirror == mirror)
    }
}

/// How often a stranger's refusals are logged (a line per peer per interval).
const REFUSAL_LOG_INTERVAL_MS: u64 = 60_000;

/// The master engine for one MUC service.
#[derive(Debug, Clone)]
pub struct Master {
    config: MasterConfig,
    rooms: HashMap<String, RoomState>,
    /// When each mirror was last heard from (ping, join, message).
    watch: LinkWatch,
    /// Per room: origin-ids of messages from occupants behind mirrors. Outlives the room state,
    /// which ends when a lost mirror's occupants are evicted.
    origin_ids: HashMap<String, Recent<String>>,
    /// Per room: stanza-ids adopted from mirrors' proposals. Two mirrors may (rarely) propose
    /// the same id; the second is not adopted, so no two messages share an archive id.
    adopted: HashMap<String, Recent<String>>,
    transmits: VecDeque<String>,
    actions: VecDeque<MasterAction>,
    /// Ids of our config/roster IQs awaiting an answer. Bounded: some hosts (ejabberd) never
    /// hand a room the answers, and an unanswered sync IQ needs no follow-up.
    sync_iqs: VecDeque<String>,
    /// Occupants behind a mirror who left lately, with their mirror: what the room still sends
    /// them (the answer to the request that made them leave, say) goes through the mirror too,
    /// behind the broadcast of their leave.
    recently_left: VecDeque<(String, String)>,
    /// Rooms per mirror and joins through each (see [`MasterConfig::max_rooms_per_mirror`]):
    /// the service's, perhaps shared with the engines of its other rooms.
    quota: MirrorQuota,
    /// Refusals of strangers are logged at warn, a line per peer per minute.
    refusals: LogLimiter,
    next_id: u64,
}

/// Split `room@service/nick` into (`room@service`, `nick`).
fn split_occupant(jid: &Jid) -> (String, Option<String>) {
    (
        jid.to_bare().to_string(),
        jid.resource().map(|r| r.to_string()),
    )
}

impl Master {
    /// A master with these settings.
    pub fn new(config: MasterConfig) -> Self {
        let quota = MirrorQuota::new(
            config.max_rooms_per_mirror,
            config.mirror_join_rate,
            config.mirror_join_burst,
        );
        Master::with_quota(config, quota)
    }

    /// A master for some of a service's rooms, counting rooms per mirror and joins through each
    /// in the service's `quota` (whose limits replace the config's): for hosts that keep an
    /// engine per room. Call [`Master::release_quota`] before dropping it.
    pub fn with_quota(config: MasterConfig, quota: MirrorQuota) -> Self {
        Master {
            watch: LinkWatch::new(config.trusted_mirrors.clone(), config.link_timeout_ms),
            config,
            rooms: HashMap::new(),
            origin_ids: HashMap::new(),
            adopted: HashMap::new(),
            transmits: VecDeque::new(),
            actions: VecDeque::new(),
            sync_iqs: VecDeque::new(),
            recently_left: VecDeque::new(),
            quota,
            refusals: LogLimiter::new(REFUSAL_LOG_INTERVAL_MS),
            next_id: 0,
        }
    }

    // ---- getters ----

    /// Does a stanza to `to` need [`Master::handle_outbound`]? True for occupants that joined
    /// through a mirror. Cheap: the host can skip serialising everything else.
    pub fn routes_via_mirror(&self, to: &str) -> bool {
        (!self.rooms.is_empty() && self.rooms.values().any(|r| r.by_real.contains_key(to)))
            || self.left_via(to).is_some()
    }

    /// The mirror of an occupant who left lately.
    fn left_via(&self, real_jid: &str) -> Option<&str> {
        self.recently_left
            .iter()
            .rev()
            .find(|(j, _)| j == real_jid)
            .map(|(_, m)| m.as_str())
    }

    /// The mirrors with occupants in `room`.
    pub fn mirrors(&self, room: &str) -> Vec<String> {
        self.rooms
            .get(room)
            .map(|r| r.mirrors.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// `(nick, real JID, mirror)` of the occupants of `room` that joined through a mirror.
    pub fn remote_occupants(&self, room: &str) -> Vec<(String, String, String)> {
        let mut v: Vec<_> = self
            .rooms
            .get(room)
            .map(|r| {
                r.by_real
                    .iter()
                    .map(|(j, o)| (o.nick.clone(), j.clone(), o.mirror.clone()))
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }

    /// Is the link to `mirror` known to be down?
    pub fn link_down(&self, mirror: &str) -> bool {
        self.rooms
            .values()
            .any(|r| r.mirrors.get(mirror).is_some_and(|l| l.down))
    }

    // ---- outputs ----

    /// The next stanza to route.
    pub fn poll_transmit(&mut self) -> Option<String> {
        self.transmits.pop_front()
    }

    /// The next thing the host must do to its room.
    pub fn poll_action(&mut self) -> Option<MasterAction> {
        self.actions.pop_front()
    }

    fn send(&mut self, el: &Element) {
        self.transmits.push_back(stanza::serialize(el));
    }

    fn await_sync(&mut self, id: String) {
        const KEEP: usize = 256;
        if self.sync_iqs.len() >= KEEP {
            self.sync_iqs.pop_front();
        }
        self.sync_iqs.push_back(id);
    }

    fn id(&mut self, prefix: &str) -> String {
        self.next_id += 1;
        format!("dmuc-{prefix}-{}", self.next_id)
    }

    fn trust(&self, mirror: &str) -> Option<&TrustedMirror> {
        self.config
            .trusted_mirrors
            .iter()
            .find(|t| t.mirror.eq_ignore_ascii_case(mirror))
    }

    /// Send `error` about `stanza` to the user: at their escaped JID at the mirror (DMUC3
    /// §Failure case) when the mirror is trusted, else straight to the user.
    fn refuse(
        &mut self,
        stanza: &Element,
        user: &Jid,
        mirror: Option<&str>,
        cond: Condition,
        text: &str,
    ) {
        // From the address the stanza went to: a refused join comes from the occupant JID it
        // asked for (XEP-0045 §7.2), which is how clients match it to their join.
        let room = stanza.attr("to").unwrap_or_default().to_string();
        let to = match mirror {
            Some(domain) => match escape::jid_at_service(user, domain) {
                Ok(addr) => addr.to_string(),
                Err(_) => user.to_string(),
            },
            None => user.to_string(),
        };
        let reply = stanza::error_reply(stanza, &room, &to, cond, text);
        self.send(&reply);
    }

    // ---- inputs ----

    /// A presence addressed to an occupant JID (`room@service/nick`), before the MUC sees it.
    /// `granted_nick` is the nick the MUC will give the user, when the host knows it (a nick the
    /// MUC would rewrite fails the join instead: DMUC3 §Business Rules).
    pub fn handle_presence(
        &mut self,
        now: Timestamp,
        xml: &str,
        granted_nick: Option<&str>,
    ) -> Result<PresenceVerdict, Error> {
        let p = stanza::parse_within(xml, &self.config.limits)?;
        if p.name() != "presence" {
            return Err(Error::UnexpectedElement {
                expected: "presence",
                got: p.name().to_string(),
            });
        }
        let from = stanza::jid_attr(&p, "presence", "from")?;
        // An occupant address the engine cannot parse (a nick failing strict validation, say)
        // is the room's to refuse, with its own error and `by`.
        let to = match stanza::jid_attr(&p, "presence", "to") {
            Ok(to) => to,
            Err(Error::InvalidJid { .. }) => return Ok(PresenceVerdict::Pass),
            Err(e) => return Err(e),
        };
        let (room, Some(nick)) = split_occupant(&to) else {
            return Ok(PresenceVerdict::Pass);
        };
        let from_s = from.to_string();
        let known = self
            .rooms
            .get(&room)
            .and_then(|r| r.by_real.get(&from_s))
            .cloned();
        if let Some(r) = &known {
            // Any presence of an occupant behind a mirror proves its link (crate::link).
            self.hear(now, &r.mirror);
        }
        match stanza::stanza_type(&p) {
            Some("unavailable") => {
                // A leave that carries the marker is one the mirror has not shown (a leave to
                // the bare room JID): the room's broadcast of it goes to the mirror as usual.
                let unshown = p.has_child("dmuc", ns::DMUC);
                if let (Some(r), Some(state), false) = (&known, self.rooms.get_mut(&room), unshown)
                {
                    if !state.evicting.contains(&r.nick) {
                        state.announced_leave.insert(r.nick.clone());
                    }
                }
                return Ok(PresenceVerdict::Pass);
            }
            Some(_) => return Ok(PresenceVerdict::Pass),
            None => {}
        }
        if let Some(r) = known {
            if r.nick != nick {
                info!(%from, old = %r.nick, new = %nick, "refused a nick change through a mirror");
                self.refuse(
                    &p,
                    &from,
                    Some(&r.mirror),
                    Condition::NotAcceptable,
                    "Nick changes are not allowed through a mirror",
                );
                return Ok(PresenceVerdict::Refused);
            }
            if p.has_child("x", ns::MUC) {
                // A re-sent join (a client resyncing): until the room sends the occupant their
                // own presence again, what it sends them is the occupant list, which the mirror
                // serves from its copy.
                if let Some(r) = self
                    .rooms
                    .get_mut(&room)
                    .and_then(|s| s.by_real.get_mut(&from_s))
                {
                    r.confirmed = false;
                }
            }
            return Ok(PresenceVerdict::Pass);
        }
        let Some(marker) = p.get_child("dmuc", ns::DMUC) else {
            return Ok(PresenceVerdict::Pass);
        };
        let marker = match Dmuc::try_from(marker.clone()) {
            Ok(m) => m,
            Err(e) => {
                if let Some(left_out) = self.refusals.allow(from.domain().as_str(), now) {
                    warn!(%from, error = %e, left_out, "malformed dmuc marker: join refused");
                }
                self.refuse(
                    &p,
                    &from,
                    None,
                    Condition::BadRequest,
                    "Malformed dmuc element",
                );
                return Ok(PresenceVerdict::Refused);
            }
        };
        let mirror = marker.from.to_string().to_ascii_lowercase();
        let Some(trusted) = self.trust(&mirror) else {
            if let Some(left_out) = self.refusals.allow(from.domain().as_str(), now) {
                warn!(%from, %mirror, left_out, "join through an untrusted mirror refused");
            }
            self.refuse(&p, &from, None, Condition::Forbidden, "Untrusted mirror");
            return Ok(PresenceVerdict::Refused);
        };
        if !trusted.may_speak_for(from.domain().as_str()) {
            if let Some(left_out) = self.refusals.allow(from.domain().as_str(), now) {
                warn!(%from, %mirror, left_out, "join refused: the mirror may not speak for this user's domain");
            }
            // Not the mirror's user (an outsider naming it, say): the refusal goes to the sender,
            // never onto the mirror's link.
            self.refuse(
                &p,
                &from,
                None,
                Condition::Forbidden,
                "This mirror may not speak for your domain",
            );
            return Ok(PresenceVerdict::Refused);
        }
        if let Some(granted) = granted_nick {
            if granted != nick {
                info!(%from, requested = %nick, %granted, "join would rewrite the nick: refused");
                self.refuse(
                    &p,
                    &from,
                    Some(&mirror),
                    Condition::NotAcceptable,
                    "This room would change your nick",
                );
                return Ok(PresenceVerdict::Refused);
            }
        }
        if let Some(why) = self.over_limit(now, &room, &mirror) {
            if let Some(left_out) = self.refusals.allow(&mirror, now) {
                warn!(%from, %mirror, %room, left_out, "join through a mirror refused: {why}");
            }
            self.refuse(&p, &from, Some(&mirror), Condition::ResourceConstraint, why);
            return Ok(PresenceVerdict::Refused);
        }
        self.hear(now, &mirror);
        let room_key = room.clone();
        let state = self.rooms.entry(room).or_default();
        let stale = state.mirrors.get(&mirror).is_some_and(|l| l.stale);
        let sync = !state.mirror_has_occupants(&mirror) || stale;
        state.mirrors.entry(mirror.clone()).or_default();
        self.quota.entered(&room_key, &mirror);
        let direct = state
            .by_real
            .values()
            .any(|r| r.nick == nick && r.mirror == mirror);
        state.by_real.insert(
            from_s,
            Remote {
                nick,
                mirror: mirror.clone(),
                confirmed: false,
                direct,
                role: None,
            },
        );
        debug!(%mirror, sync, "join through mirror");
        Ok(PresenceVerdict::MirrorJoin { mirror, sync })
    }

    /// The room's state for a mirror's first occupant: its config form (`<x xmlns='jabber:x:data'/>`)
    /// and each occupant's presence as the room would broadcast it with real JIDs visible
    /// (`from='room/nick'`, a muc#user `<item/>`). Queues the config and roster IQs.
    /// `joining_nick` is the nick of the join that asked for the sync.
    pub fn handle_snapshot(
        &mut self,
        _now: Timestamp,
        room: &str,
        mirror: &str,
        joining_nick: &str,
        config_form: &str,
        occupants: &[String],
    ) -> Result<(), Error> {
        // The names are the engine's own (PresenceVerdict::MirrorJoin), handed back by the host:
        // the sync must have somewhere to go, and from.
        stanza::parse_jid(mirror)?;
        stanza::parse_jid(room)?;
        let form = self.mirrors_form(&parse_form(config_form)?);
        if let Some(state) = self.rooms.get_mut(room) {
            state.config = Some(form.clone());
            if let Some(link) = state.mirrors.get_mut(mirror) {
                link.stale = false;
            }
        }
        let mut roster = Roster::default();
        for text in occupants {
            match roster_item(text) {
                Ok(item) => roster.items.push(item),
                Err(e) => warn!(error = %e, "skipped an occupant the host could not describe"),
            }
        }
        // Real JIDs go to a mirror only if one of its occupants may see them: the room shows
        // them to everyone, or one of them is a moderator. Otherwise they stay here, and the
        // mirror asks again when one of its occupants becomes a moderator.
        let reveal = self.rooms.get(room).is_some_and(|state| {
            state.config.as_ref().map(whois_of) == Some(Whois::Anyone)
                || state
                    .by_real
                    .values()
                    .any(|r| r.mirror == mirror && r.role.as_deref() == Some("moderator"))
        }) || roster
            .items
            .iter()
            .any(|i| i.name == joining_nick && i.role == Some(Role::Moderator));
        if !reveal {
            for item in &mut roster.items {
                item.jid = None;
            }
            roster.jids = Some(crate::elements::WITHHELD.to_string());
        }
        debug!(%room, %mirror, reveal, "roster for a mirror");
        let id = self.id("config");
        let from = if joining_nick.is_empty() {
            room.to_string()
        } else {
            format!("{room}/{joining_nick}")
        };
        let config = iq_set(&from, mirror, &id, Config::new(form).into());
        self.await_sync(id);
        self.send(&config);
        let id = self.id("roster");
        let roster = iq_set(room, mirror, &id, roster.into());
        self.await_sync(id);
        self.send(&roster);
        Ok(())
    }

    /// Would a join through `mirror` to `room` exceed its limits? Why, if so.
    fn over_limit(&mut self, now: Timestamp, room: &str, mirror: &str) -> Option<&'static str> {
        self.quota.admit(now, room, mirror).err().map(|o| o.text())
    }

    /// An IQ addressed to a room or occupant JID of this service.
    pub fn handle_iq(&mut self, now: Timestamp, xml: &str) -> Result<IqVerdict, Error> {
        let iq = stanza::parse_within(xml, &self.config.limits)?;
        if iq.name() != "iq" {
            return Err(Error::UnexpectedElement {
                expected: "iq",
                got: iq.name().to_string(),
            });
        }
        if let Some(from) = iq.attr("from").and_then(|f| Jid::new(f).ok()) {
            // A mirror's sync requests and answers prove its link too.
            self.watch.hear_from(now, from.domain().as_str());
            self.apply_link_events();
        }
        match stanza::stanza_type(&iq) {
            Some("result") | Some("error") => {
                let id = iq.attr("id").unwrap_or_default();
                if let Some(pos) = self.sync_iqs.iter().position(|i| i == id) {
                    self.sync_iqs.remove(pos);
                    if stanza::stanza_type(&iq) == Some("error") {
                        warn!(id, "mirror refused a sync IQ");
                    }
                    return Ok(IqVerdict::Consumed);
                }
                Ok(IqVerdict::Pass)
            }
            Some("get") if iq.has_child("roster", ns::DMUC0) => {
                // A mirror back from an outage asks for the roster: it gets the sync pushes.
                let from = stanza::jid_attr(&iq, "iq", "from")?;
                let to = iq.attr("to").unwrap_or_default().to_string();
                let mirror = from.to_string().to_ascii_lowercase();
                let room = Jid::new(&to)
                    .map(|j| j.to_bare().to_string())
                    .unwrap_or_default();
                let known = self
                    .rooms
                    .get(&room)
                    .is_some_and(|r| r.mirror_has_occupants(&mirror));
                if !known || self.trust(&mirror).is_none() {
                    if let Some(left_out) = self.refusals.allow(&mirror, now) {
                        warn!(%mirror, %room, left_out, "roster request refused: no mirror of this room");
                    }
                    // Not (or no longer) a mirror of this room: it rejoins its users instead.
                    let reply = stanza::error_reply(
                        &iq,
                        &to,
                        &from.to_string(),
                        Condition::ItemNotFound,
                        "This mirror has no occupants in this room",
                    );
                    self.send(&reply);
                    return Ok(IqVerdict::Consumed);
                }
                self.send(&stanza::iq_result(&iq, &to));
                Ok(IqVerdict::Snapshot { room, mirror })
            }
            Some("get") => {
                let Some(room_el) = iq.get_child("room", ns::DMUC0) else {
                    return Ok(IqVerdict::Pass);
                };
                let from = stanza::jid_attr(&iq, "iq", "from")?;
                let to = iq.attr("to").unwrap_or_default().to_string();
                let request = match Room::try_from(room_el.clone()) {
                    Ok(r) => r,
                    Err(e) => {
                        if let Some(left_out) = self.refusals.allow(from.domain().as_str(), now) {
                            warn!(%from, error = %e, left_out, "malformed history request refused");
                        }
                        let reply = stanza::error_reply(
                            &iq,
                            &to,
                            &from.to_string(),
                            Condition::BadRequest,
                            &e.to_string(),
                        );
                        self.send(&reply);
                        return Ok(IqVerdict::Consumed);
                    }
                };
                let room = request.id.to_string();
                let mirror = from.to_string();
                let known = self
                    .rooms
                    .get(&room)
                    .is_some_and(|r| r.mirrors.contains_key(&mirror));
                if !known || self.trust(&mirror).is_none() {
                    if let Some(left_out) = self.refusals.allow(&mirror, now) {
                        warn!(%mirror, %room, left_out, "history request refused: no mirror of this room");
                    }
                    let reply = stanza::error_reply(
                        &iq,
                        &to,
                        &mirror,
                        Condition::Forbidden,
                        "Not a mirror of this room",
                    );
                    self.send(&reply);
                    return Ok(IqVerdict::Consumed);
                }
                Ok(IqVerdict::History(HistoryRequest {
                    room,
                    to: mirror,
                    from: to,
                    id: iq.attr("id").unwrap_or_default().to_string(),
                    limits: request.history.unwrap_or_default(),
                }))
            }
            _ => Ok(IqVerdict::Pass),
        }
    }

    /// Answer a history request with the room's messages (oldest first, each with its XEP-0203
    /// delay) and its current subject message, if any. The request's limits are applied here.
    pub fn handle_history(
        &mut self,
        now: Timestamp,
        request: &HistoryRequest,
        messages: &[String],
        subject: Option<&str>,
    ) -> Result<(), Error> {
        // The request is the engine's own (IqVerdict::History), but its fields are the host's
        // to fill: an answer must have somewhere to go.
        stanza::parse_jid(&request.to)?;
        let entries: Vec<Entry> = messages
            .iter()
            .filter_map(|m| match stanza::parse(m) {
                Ok(el) => Some(Entry::new(without_to(el), now)),
                Err(e) => {
                    warn!(error = %e, "skipped a history message");
                    None
                }
            })
            .collect();
        let mut result = HistoryResult::default();
        for e in room_history::select(entries.iter(), now, &request.limits) {
            result.messages.push(e.message.clone());
        }
        if let Some(subject) = subject {
            result.messages.push(without_to(stanza::parse(subject)?));
        }
        let mut iq = Element::builder("iq", ns::JABBER_CLIENT).build();
        stanza::set_attr(&mut iq, "from", &request.room);
        stanza::set_attr(&mut iq, "to", &request.to);
        stanza::set_attr(&mut iq, "id", &request.id);
        stanza::set_attr(&mut iq, "type", "result");
        iq.append_child(result.into());
        self.send(&iq);
        Ok(())
    }

    /// The room starts one broadcast (a message or an occupant's presence to every occupant).
    pub fn begin_broadcast(&mut self, room: &str) {
        if let Some(state) = self.rooms.get_mut(room) {
            state.depth += 1;
        }
    }

    /// The broadcast is over: queue one copy per mirror.
    pub fn end_broadcast(&mut self, room: &str) {
        let Some(state) = self.rooms.get_mut(room) else {
            return;
        };
        state.depth = state.depth.saturating_sub(1);
        if state.depth > 0 {
            return;
        }
        let captured = std::mem::take(&mut state.captured);
        let mut out = Vec::new();
        for (mirror, c) in captured {
            let mut el = c.stanza;
            if !stanza::has_status(&el, "110") {
                for code in &c.self_codes {
                    stanza::add_status(&mut el, code);
                }
            }
            let nick = el
                .attr("from")
                .and_then(|f| Jid::new(f).ok())
                .and_then(|j| j.resource().map(|r| r.to_string()));
            let from_this_mirror = nick
                .as_deref()
                .and_then(|n| state.remote_by_nick(n))
                .is_some_and(|(_, r)| r.mirror == mirror);
            let Some(link) = state.mirrors.get(&mirror) else {
                continue;
            };
            if link.down && !(from_this_mirror && is_leave(&el)) {
                // A lost mirror gets only the news that its own occupants were evicted: should
                // the link be alive after all, the mirror rejoins them.
                continue;
            }
            if from_this_mirror
                && el.name() == "message"
                && el.get_child("subject", ns::JABBER_CLIENT).is_none()
            {
                // The mirror already delivered its user's message to its local occupants.
                continue;
            }
            if from_this_mirror
                && el.name() == "presence"
                && stanza::stanza_type(&el) == Some("unavailable")
            {
                if let Some(n) = &nick {
                    if state.announced_leave.remove(n) {
                        continue;
                    }
                }
            }
            if from_this_mirror && is_leave(&el) {
                if let Some(n) = nick.as_deref().filter(|n| state.evicting.contains(*n)) {
                    debug!(nick = %n, "eviction notice marked for the mirror");
                    el.append_child(evicted_marker());
                }
            }
            if el.name() == "presence" && nick.as_deref().is_some_and(|n| state.shared(n, &mirror))
            {
                el.append_child(sessions_marker());
            }
            stanza::set_attr(&mut el, "to", mirror.as_str());
            out.push(el);
        }
        if let Some(codes) = out.iter().find_map(config_announcement) {
            // The mirrors must apply the new config before they show the announcement (and
            // before anything after it): the copies wait for the host's form.
            self.settle_config(room);
            if let Some(state) = self.rooms.get_mut(room) {
                state.config_wait = Some(ConfigWait { codes, held: out });
            }
            self.actions.push_back(MasterAction::ConfigChanged {
                room: room.to_string(),
            });
            return;
        }
        self.settle_config(room);
        for el in out {
            self.send(&el);
        }
    }

    /// The room's config form (`<x xmlns='jabber:x:data'/>`, as an owner would get it), after
    /// [`MasterAction::ConfigChanged`], or whenever the host knows the config changed. The form
    /// is compacted and sent to every mirror with occupants in the room, unless they have it
    /// already; then the announcement goes. If the room now shows real JIDs to everyone, each
    /// mirror's next join syncs the roster again (a mirror was sent only the real JIDs its
    /// occupants could see).
    ///
    /// `None`: the host cannot read the new config yet (ejabberd announces a change before its
    /// room applies it). The engine then derives what the mirrors need from the announcement:
    /// status 172 makes `muc#roomconfig_whois` `anyone`, 173 and 174 `moderators`.
    ///
    /// A form that does not parse is an error; the announcement goes out anyway, with what the
    /// engine could derive, so that nothing waits for ever.
    pub fn handle_config(
        &mut self,
        _now: Timestamp,
        room: &str,
        config_form: Option<&str>,
    ) -> Result<(), Error> {
        let (form, error) = match config_form.map(parse_form) {
            Some(Ok(f)) => (Some(self.mirrors_form(&f)), None),
            Some(Err(e)) => (None, Some(e)),
            None => (None, None),
        };
        self.apply_config(room, form);
        match error {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// The room's config form as the mirrors get it: compacted, with what the master tells
    /// them about stanza-ids and the host's rules.
    fn mirrors_form(&self, form: &Element) -> Element {
        let form = stanza_ids::with_signal(
            &compact_form(form),
            self.config.stanza_ids,
            self.config.archived_element,
        );
        self.config.rules.sign(&form)
    }

    /// A config announcement the host has not answered is sent now, before anything newer from
    /// the room, with the config derived from it.
    fn settle_config(&mut self, room: &str) {
        if self
            .rooms
            .get(room)
            .is_some_and(|s| s.config_wait.is_some())
        {
            warn!(%room, "the host did not hand over the config form: derived from the announcement");
            self.apply_config(room, None);
        }
    }

    fn apply_config(&mut self, room: &str, form: Option<Element>) {
        let Some(state) = self.rooms.get_mut(room) else {
            return;
        };
        let wait = state.config_wait.take();
        let codes = wait
            .as_ref()
            .map(|w| w.codes.as_slice())
            .unwrap_or_default();
        let previous = state.config.take();
        let rules = self.config.rules;
        let form =
            form.or_else(|| derived_config(previous.as_ref(), codes).map(|f| rules.sign(&f)));
        let mut pushes = Vec::new();
        if let Some(form) = &form {
            let was_anyone = previous.as_ref().map(whois_of) == Some(Whois::Anyone);
            if whois_of(form) == Whois::Anyone && !was_anyone {
                for link in state.mirrors.values_mut() {
                    link.stale = true;
                }
            }
            if previous.as_ref() != Some(form) {
                pushes = state
                    .mirrors
                    .iter()
                    .filter(|(m, l)| !l.down && state.mirror_has_occupants(m))
                    .map(|(m, _)| m.clone())
                    .collect();
            }
        }
        state.config = form.clone().or(previous);
        if let Some(form) = form {
            for mirror in pushes {
                let id = self.id("config");
                let iq = iq_set(room, &mirror, &id, Config::new(form.clone()).into());
                self.await_sync(id);
                self.send(&iq);
            }
        }
        for el in wait.map(|w| w.held).unwrap_or_default() {
            self.send(&el);
        }
    }

    /// A stanza the MUC is about to send to a remote domain (the host calls this for stanzas
    /// whose `to` makes [`Master::routes_via_mirror`] true).
    pub fn handle_outbound(&mut self, _now: Timestamp, xml: &str) -> Result<Outbound, Error> {
        let el = stanza::parse_within(xml, &self.config.limits)?;
        let Some(to) = el.attr("to") else {
            return Ok(Outbound::Send);
        };
        let to = to.to_string();
        let Some(from) = el.attr("from").and_then(|f| Jid::new(f).ok()) else {
            return Ok(Outbound::Send);
        };
        let room = from.to_bare().to_string();
        let occupant = self
            .rooms
            .get(&room)
            .is_some_and(|s| s.by_real.contains_key(&to));
        if !occupant {
            // Not (or no longer) an occupant: an answer or message the room still sends a user
            // who just left through a mirror follows their leave through that mirror.
            let from_room = from.resource().is_none();
            let broadcast_kind = (el.name() == "presence" && !from_room)
                || (el.name() == "message" && stanza::stanza_type(&el) == Some("groupchat"));
            return match self.left_via(&to) {
                // A room's leave copies to the leaver after the leave (ejabberd routes the
                // kicked user's own on its own, and withdraws its own presence): the mirror
                // showed them those already, and the link stays quiet.
                Some(_) if is_leave(&el) => Ok(Outbound::Drop),
                Some(mirror) if !broadcast_kind => via_mirror(el, &to, &mirror.to_string()),
                _ => Ok(Outbound::Send),
            };
        }
        // An announcement still waiting for the host's config form goes first.
        self.settle_config(&room);
        let Some(state) = self.rooms.get_mut(&room) else {
            return Ok(Outbound::Send);
        };
        let Some(remote) = state.by_real.get(&to).cloned() else {
            return Ok(Outbound::Send);
        };
        let kind = stanza::stanza_type(&el);
        if kind == Some("error") {
            if !remote.confirmed && el.name() == "presence" {
                // A join the room refused: the user is no occupant.
                state.by_real.remove(&to);
                if !state.mirror_has_occupants(&remote.mirror) {
                    state.mirrors.remove(&remote.mirror);
                    self.quota.vacated(&room, &remote.mirror);
                }
            }
            return via_mirror(el, &to, &remote.mirror);
        }
        let about_own = el.name() == "presence"
            && from.resource().map(|r| r.as_str()) == Some(remote.nick.as_str());
        if about_own {
            if let (Some(role), Some(r)) = (
                stanza::muc_item(&el).and_then(|i| i.attr("role")),
                state.by_real.get_mut(&to),
            ) {
                r.role = Some(role.to_string());
            }
        }
        if remote.direct || (about_own && state.shared(&remote.nick, &remote.mirror)) {
            // Multi-session nicks: this session gets what the room made for it. The first
            // session's copy of its own presence also stands for the copy the mirror's other
            // occupants get.
            if about_own && kind.is_none() {
                if let Some(r) = state.by_real.get_mut(&to) {
                    r.confirmed = true;
                }
            }
            if about_own && !remote.direct {
                if state.depth > 0 {
                    capture(state, &remote.mirror, el.clone());
                } else if self.config.unbracketed_presence {
                    if let Outbound::Replace(x) = forward_once(state, &to, &remote, el.clone()) {
                        self.transmits.push_back(x);
                    }
                }
            }
            return via_mirror(el, &to, &remote.mirror);
        }
        let broadcast_kind =
            el.name() == "presence" || (el.name() == "message" && kind == Some("groupchat"));
        if !broadcast_kind {
            // Private messages, IQ answers, the room's own messages to this occupant: through
            // the mirror, so that they keep their place among the broadcasts.
            return via_mirror(el, &to, &remote.mirror);
        }
        if state.depth == 0 && from.resource().is_none() && is_leave(&el) {
            if state.announced_leave.contains(&remote.nick) {
                // The room withdrawing its own presence from a leaver whose leave the mirror
                // showed: the mirror withdrew it then too, and the link stays quiet.
                return Ok(Outbound::Drop);
            }
            // The room's own unavailable to one user (ejabberd's answer to a presence to the
            // bare room): no occupant's presence, the room answering that user.
            return via_mirror(el, &to, &remote.mirror);
        }
        if state.depth == 0 && from.resource().is_none() && el.name() == "presence" {
            // The room's own presence (ejabberd sends its entity caps to each joiner): the
            // mirror keeps it and shows it to its joiners, so it crosses once per change.
            return Ok(forward_room_presence(state, &remote.mirror, el));
        }
        if state.depth == 0 {
            if el.name() == "presence" && self.config.unbracketed_presence {
                return Ok(forward_once(state, &to, &remote, el));
            }
            if is_leave(&el) {
                // No occupant list holds a leave: this is the room answering one user (a probe
                // of a nick that is not in the room), which the mirror cannot answer itself.
                return via_mirror(el, &to, &remote.mirror);
            }
            // Outside a broadcast, presences and groupchat messages to one occupant are the
            // occupant list, history and subject of a join: the mirror serves those itself.
            return Ok(Outbound::Drop);
        }
        if about_own {
            if let Some(r) = state.by_real.get_mut(&to) {
                r.confirmed = true;
            }
        }
        capture(state, &remote.mirror, el);
        Ok(Outbound::Drop)
    }

    /// The engine is going (its room closed): the service's quota no longer counts its rooms.
    pub fn release_quota(&mut self) {
        for (room, state) in &self.rooms {
            for mirror in state.mirrors.keys() {
                self.quota.vacated(room, mirror);
            }
        }
    }

    /// An occupant left `room` (after the room broadcast its leave).
    pub fn handle_left(&mut self, room: &str, real_jid: &str) {
        let Some(state) = self.rooms.get_mut(room) else {
            return;
        };
        if let Some(r) = state.by_real.remove(real_jid) {
            self.recently_left
                .push_back((real_jid.to_string(), r.mirror.clone()));
            while self.recently_left.len() > RECENTLY_LEFT {
                self.recently_left.pop_front();
            }
            state.announced_leave.remove(&r.nick);
            state.evicting.remove(&r.nick);
            // Whatever comes next for this nick is new: a rejoin's presence may be the very
            // presence forwarded before the leave (which the mirror announced, so it was not
            // forwarded and left no fingerprint).
            for link in state.mirrors.values_mut() {
                link.forwarded.remove(&r.nick);
            }
            if !state.mirror_has_occupants(&r.mirror) {
                state.mirrors.remove(&r.mirror);
                self.quota.vacated(room, &r.mirror);
            }
        }
        if state.by_real.is_empty() && state.depth == 0 {
            self.rooms.remove(room);
        }
    }

    /// The host saw the s2s link to `domain` go down or come up. On loss, every occupant that
    /// joined through a mirror at that domain (or whose own domain it is) is evicted: the host
    /// shows them leaving (status 333) to its local users and to the other mirrors. On return,
    /// nothing happens here: the mirror resyncs and rejoins its users.
    ///
    /// Hosts should prefer pings ([`Master::handle_ping`] and [`Master::handle_timeout`]): an s2s
    /// session that closes on one side is not a lost link.
    pub fn handle_link(&mut self, now: Timestamp, domain: &str, up: bool) {
        let domain = domain.to_ascii_lowercase();
        let mut lost = BTreeSet::new();
        for state in self.rooms.values() {
            for mirror in state.mirrors.keys() {
                let user_domain = state.by_real.iter().any(|(j, r)| {
                    &r.mirror == mirror && Jid::new(j).is_ok_and(|j| j.domain().as_str() == domain)
                });
                if *mirror == domain || user_domain {
                    lost.insert(mirror.clone());
                }
            }
        }
        for mirror in lost {
            if up {
                self.watch.hear(now, &mirror);
            } else {
                self.watch.lose(&mirror);
            }
        }
        self.apply_link_events();
    }

    /// The host saw an s2s session of `service` (this MUC service) with `domain` close, in
    /// either direction, for any reason (Prosody: `s2sout-destroyed`, `s2sin-destroyed`). If
    /// `domain` is a trusted mirror or one of its users' domains, the master probes the mirror:
    /// the ping comes from [`Master::poll_transmit`], its answer goes to [`Master::handle_ping`].
    /// No answer within the probe timeout evicts the mirror's occupants; an answer (an idle
    /// close) evicts nobody. See [`crate::link_watch`].
    pub fn handle_s2s_closed(&mut self, now: Timestamp, service: &str, domain: &str) {
        self.watch.handle_s2s_closed(now, service, domain);
        while let Some(x) = self.watch.poll_transmit() {
            self.transmits.push_back(x);
        }
    }

    /// An XEP-0199 ping addressed to the MUC service. A ping from a trusted mirror (or from a
    /// user domain it speaks for) proves its link alive; the engine queues the answer and returns
    /// true. Other pings return false and are the host's to answer.
    ///
    /// An IQ result or error answering one of the master's probes (see
    /// [`Master::handle_s2s_closed`]) is taken too, and returns true.
    pub fn handle_ping(&mut self, now: Timestamp, xml: &str) -> Result<bool, Error> {
        if self.watch.handle_answer(now, xml)? {
            self.apply_link_events();
            return Ok(true);
        }
        let reply = self.watch.handle_ping(now, xml)?;
        self.apply_link_events();
        Ok(match reply {
            Some(r) => {
                self.transmits.push_back(r);
                true
            }
            None => false,
        })
    }

    /// A groupchat message to a room, before the room broadcasts it (and before the host's
    /// archive stores it). A copy of a message already broadcast is
    /// [`GroupchatVerdict::Duplicate`]. A message from an occupant behind a trusted mirror may
    /// carry the stanza-id its mirror proposed (`<stanza-id xmlns='urn:xmpp:dmuc:0' id='…'/>`);
    /// if the host can adopt it ([`MasterConfig::stanza_ids`]), the proposal is well-formed (only
    /// digits, at most [`stanza_ids::MAX_LEN`]), not already adopted in this room, and the
    /// message claims no stanza-id of the room's, the verdict carries it and the host's archive
    /// stores the message under it.
    pub fn handle_groupchat(
        &mut self,
        now: Timestamp,
        xml: &str,
    ) -> Result<GroupchatVerdict, Error> {
        let m = stanza::parse_within(xml, &self.config.limits)?;
        let from = stanza::jid_attr(&m, "message", "from")?.to_string();
        let own_id = GroupchatVerdict::Broadcast { stanza_id: None };
        let Some(to) = m.attr("to").and_then(|t| Jid::new(t).ok()) else {
            return Ok(own_id);
        };
        let room = to.to_bare().to_string();
        let Some(mirror) = self
            .rooms
            .get(&room)
            .and_then(|r| r.by_real.get(&from))
            .map(|r| r.mirror.clone())
        else {
            return Ok(own_id);
        };
        self.hear(now, &mirror);
        if let Some(id) = stanza::dedup_key(&m) {
            // The mirror showed its users the message already: it gets the acknowledgement
            // instead of the echo (crate::ack), a second copy too (what it sent again arrived).
            self.send(&ack::message(&room, &mirror, id));
            let bare = from.split('/').next().unwrap_or_default();
            let key = format!("{bare} {id}");
            let fresh = self
                .origin_ids
                .entry(room.clone())
                .or_insert_with(|| Recent::new(ORIGIN_IDS))
                .insert(key);
            if !fresh {
                info!(%room, %from, id, "dropped a message the mirror sent twice");
                return Ok(GroupchatVerdict::Duplicate);
            }
        }
        Ok(GroupchatVerdict::Broadcast {
            stanza_id: self.adopt(now, &room, &m),
        })
    }

    /// The proposal of `m` (from an occupant behind a mirror) if the host may adopt it.
    fn adopt(&mut self, now: Timestamp, room: &str, m: &Element) -> Option<String> {
        let proposed = stanza_ids::proposal(m)?;
        let Some(micros) = stanza_ids::parse_proposal(proposed) else {
            warn!(%room, id = proposed, "a mirror proposed a malformed stanza-id: not adopted");
            return None;
        };
        match self.config.stanza_ids {
            Adoption::Never => return None,
            Adoption::Any => {}
            Adoption::Within { max_skew_ms } => {
                let at = micros / 1000;
                let skew = now.0.abs_diff(at);
                if skew > max_skew_ms {
                    info!(%room, id = proposed, skew_ms = skew, "a proposed stanza-id is too far from now for this archive: not adopted");
                    return None;
                }
            }
        }
        if stanza_ids::claims_room_id(m, room) {
            // The host strips the forgery only while it picks the id itself (ejabberd).
            warn!(%room, "a message from a mirror claims a stanza-id of the room: proposal not adopted");
            return None;
        }
        let fresh = self
            .adopted
            .entry(room.to_string())
            .or_insert_with(|| Recent::new(ORIGIN_IDS))
            .insert(proposed.to_string());
        if !fresh {
            info!(%room, id = proposed, "a proposed stanza-id was adopted before: not adopted");
            return None;
        }
        Some(proposed.to_string())
    }

    /// When [`Master::handle_timeout`] should next be called: when the quietest mirror would
    /// count as lost.
    pub fn poll_timeout(&self) -> Option<Timestamp> {
        self.watch.poll_timeout()
    }

    /// Time has come: a mirror that has been silent for the link timeout is lost, and its
    /// occupants are evicted.
    pub fn handle_timeout(&mut self, now: Timestamp) {
        self.watch.handle_timeout(now);
        self.apply_link_events();
    }

    /// Link state of every mirror the master has heard from.
    pub fn status(&self) -> Vec<MirrorStatus> {
        self.watch
            .status()
            .into_iter()
            .map(|w| MirrorStatus {
                rooms: self
                    .rooms
                    .values()
                    .filter(|r| r.mirror_has_occupants(&w.mirror))
                    .count(),
                occupants: self
                    .rooms
                    .values()
                    .map(|r| r.by_real.values().filter(|o| o.mirror == w.mirror).count())
                    .sum(),
                mirror: w.mirror,
                up: w.up,
                last_seen: Some(w.last_seen),
                outages: w.outages,
            })
            .collect()
    }

    fn hear(&mut self, now: Timestamp, mirror: &str) {
        self.watch.hear(now, mirror);
        self.apply_link_events();
    }

    /// Act on the watch's events: a mirror back may be sent to again; a lost one's occupants
    /// are evicted.
    fn apply_link_events(&mut self) {
        while let Some(e) = self.watch.poll_event() {
            if e.up {
                for state in self.rooms.values_mut() {
                    if let Some(link) = state.mirrors.get_mut(&e.mirror) {
                        link.down = false;
                    }
                }
            } else {
                self.lose(&e.mirror);
            }
        }
    }

    /// The mirror is lost: evict its occupants.
    fn lose(&mut self, mirror: &str) {
        let mut evict = Vec::new();
        for (room, state) in &mut self.rooms {
            let Some(link) = state.mirrors.get_mut(mirror) else {
                continue;
            };
            link.down = true;
            for (jid, r) in state.by_real.iter().filter(|(_, r)| r.mirror == mirror) {
                state.evicting.insert(r.nick.clone());
                evict.push(MasterAction::Evict {
                    room: room.clone(),
                    nick: r.nick.clone(),
                    jid: jid.clone(),
                });
            }
        }
        if !evict.is_empty() {
            info!(%mirror, occupants = evict.len(), "link lost: evicting the mirror's occupants");
        }
        evict.sort_by(|a, b| format!("{a:?}").cmp(&format!("{b:?}")));
        self.actions.extend(evict);
    }
}

/// `el` (from the room to `user`, an occupant behind `mirror`) re-addressed to the user's escaped
/// JID at the mirror (XEP-0106; the mirror un-escapes it and delivers it). It then travels on the
/// mirror's s2s stream, in order with the room's broadcasts: sent straight to the user's domain,
/// on another stream, an answer could be overtaken by the broadcast it caused. A JID that cannot
/// be escaped is an error (the host then sends the stanza as it is, straight to the user).
fn via_mirror(mut el: Element, user: &str, mirror: &str) -> Result<Outbound, Error> {
    let jid = stanza::parse_jid(user)?;
    let addr = escape::jid_at_service(&jid, mirror).map_err(|e| Error::InvalidJid {
        jid: user.to_string(),
        reason: e.to_string(),
    })?;
    stanza::set_attr(&mut el, "to", addr);
    Ok(Outbound::Replace(stanza::serialize(&el)))
}

/// The room's own presence (from its bare JID) for a mirror, unless the mirror has this very one.
fn forward_room_presence(state: &mut RoomState, mirror: &str, mut presence: Element) -> Outbound {
    use std::hash::{Hash, Hasher};
    let mut normal = presence.clone();
    stanza::remove_attr(&mut normal, "to");
    stanza::remove_attr(&mut normal, "id");
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    stanza::serialize(&normal).hash(&mut hasher);
    let print = hasher.finish();
    let Some(link) = state.mirrors.get_mut(mirror) else {
        return Outbound::Drop;
    };
    // The room's presence has no nick: "" cannot be one.
    if link.down || link.forwarded.get("") == Some(&print) {
        return Outbound::Drop;
    }
    link.forwarded.insert(String::new(), print);
    stanza::set_attr(&mut presence, "to", mirror);
    Outbound::Replace(stanza::serialize(&presence))
}

/// `<evicted xmlns='urn:xmpp:dmuc:0'/>`: added to the mirror's copy of the leave of one of its
/// occupants that the master evicted because it lost the mirror's link. Should the link be alive
/// after all, the mirror rejoins them; any other leave (a kick, an error the room kicked them
/// for) ends their stay, and the mirror shows it.
/// On the copy of an occupant's presence for a mirror where that nick has several sessions:
/// each of them got its own copy, the way the room made it; the copy is for the others.
fn sessions_marker() -> Element {
    Element::builder("sessions", ns::DMUC0).build()
}

fn evicted_marker() -> Element {
    Element::builder("evicted", ns::DMUC0).build()
}

/// Is this an occupant's leave?
fn is_leave(el: &Element) -> bool {
    el.name() == "presence" && stanza::stanza_type(el) == Some("unavailable")
}

/// Within a broadcast, keep `el` (one occupant's copy) as the candidate copy for `mirror` if it
/// is the richest so far.
fn capture(state: &mut RoomState, mirror: &str, el: Element) {
    // The mirror gets the richest copy and applies whois itself per recipient: a copy with
    // every real JID (the actor's too, which the subject's own copy lacks) first, then the
    // subject's own copy, then one with the subject's JID, then the anonymous one.
    let item = stanza::muc_item(&el);
    let real = item.and_then(|i| i.attr("jid")).is_some();
    let actor_hidden = item
        .and_then(|i| i.get_child("actor", ns::MUC_USER))
        .is_some_and(|a| a.attr("jid").is_none());
    let own = stanza::has_status(&el, "110");
    let rank = match (real, own, actor_hidden) {
        (true, false, false) => 3,
        (_, true, _) => 2,
        (true, false, true) => 1,
        _ => 0,
    };
    let codes: Vec<String> = if own {
        stanza::SELF_ONLY_STATUS
            .iter()
            .filter(|c| **c != "110" && stanza::has_status(&el, c))
            .map(|c| c.to_string())
            .collect()
    } else {
        Vec::new()
    };
    let slot = state
        .captured
        .entry(mirror.to_string())
        .or_insert_with(|| Captured {
            rank,
            stanza: el.clone(),
            self_codes: Vec::new(),
        });
    if rank > slot.rank {
        slot.rank = rank;
        slot.stanza = el;
    }
    for c in codes {
        if !slot.self_codes.contains(&c) {
            slot.self_codes.push(c);
        }
    }
}

/// Without brackets: forward `presence` (the copy for `to`, an occupant behind a mirror, of a room
/// presence) to the mirror unless the mirror already has this very presence of that nick. Copies
/// for different recipients differ only in `to`, real JIDs and self-only status codes, so the
/// fingerprint leaves those out. A presence about one of the mirror's own occupants carries
/// status 110, as it would with brackets, so the mirror knows the occupant is its own.
fn forward_once(
    state: &mut RoomState,
    to: &str,
    remote: &Remote,
    mut presence: Element,
) -> Outbound {
    let mirror = remote.mirror.as_str();
    use std::hash::{Hash, Hasher};
    let nick = presence
        .attr("from")
        .and_then(|f| Jid::new(f).ok())
        .and_then(|j| j.resource().map(|r| r.to_string()))
        .unwrap_or_default();
    if nick.is_empty() {
        // The room's own presence (ejabberd sends its entity caps on each join): not an occupant.
        return Outbound::Drop;
    }
    if nick == remote.nick {
        // The recipient's own presence: their join is confirmed.
        if let Some(r) = state.by_real.get_mut(to) {
            r.confirmed = true;
        }
    } else if !remote.confirmed {
        // Sent to a joiner before their own presence: the occupant list, which the mirror has.
        return Outbound::Drop;
    }
    let ours = state
        .remote_by_nick(&nick)
        .is_some_and(|(_, r)| r.mirror == mirror);
    if ours
        && stanza::stanza_type(&presence) == Some("unavailable")
        && state.announced_leave.contains(&nick)
    {
        // The mirror announced this leave itself. It ends what the mirror has of this nick: a
        // rejoin with the same presence as before must be forwarded.
        if let Some(link) = state.mirrors.get_mut(mirror) {
            link.forwarded.remove(&nick);
        }
        return Outbound::Drop;
    }
    let shared = state.shared(&nick, mirror);
    let mut normal = presence.clone();
    stanza::remove_attr(&mut normal, "to");
    stanza::strip_real_jids(&mut normal);
    stanza::strip_self_status(&mut normal);
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    stanza::serialize(&normal).hash(&mut hasher);
    let print = hasher.finish();
    let Some(link) = state.mirrors.get_mut(mirror) else {
        return Outbound::Drop;
    };
    let eviction = ours && is_leave(&presence);
    if (link.down && !eviction) || link.forwarded.get(&nick) == Some(&print) {
        return Outbound::Drop;
    }
    let first = !link.forwarded.contains_key(&nick);
    if eviction && state.evicting.contains(&nick) {
        presence.append_child(evicted_marker());
    }
    link.forwarded.insert(nick, print);
    if shared {
        presence.append_child(sessions_marker());
    }
    stanza::set_attr(&mut presence, "to", mirror);
    if ours {
        stanza::add_status(&mut presence, "110");
        // The copy forwarded may be another occupant's, without the joiner's own status codes;
        // 100 (the room shows real JIDs) follows from the config.
        let anyone = state.config.as_ref().map(whois_of) == Some(Whois::Anyone);
        if first && anyone && stanza::stanza_type(&presence).is_none() {
            stanza::add_status(&mut presence, "100");
        }
    }
    Outbound::Replace(stanza::serialize(&presence))
}

/// XEP-0045 status codes announcing a configuration change (§10.2.1): any change (104),
/// logging on/off (170, 171), non-, semi-, fully anonymous (172, 173, 174).
const CONFIG_STATUS: [&str; 6] = ["104", "170", "171", "172", "173", "174"];

/// If `el` is the room announcing a configuration change (a groupchat message from the bare
/// room with one of [`CONFIG_STATUS`]), its status codes.
fn config_announcement(el: &Element) -> Option<Vec<String>> {
    if el.name() != "message" || stanza::stanza_type(el) != Some("groupchat") {
        return None;
    }
    let from = Jid::new(el.attr("from")?).ok()?;
    if from.resource().is_some() {
        return None;
    }
    let codes: Vec<String> = stanza::muc_user(el)?
        .children()
        .filter(|c| c.is("status", ns::MUC_USER))
        .filter_map(|c| c.attr("code"))
        .map(str::to_string)
        .collect();
    codes
        .iter()
        .any(|c| CONFIG_STATUS.contains(&c.as_str()))
        .then_some(codes)
}

/// The whois rule of a (compacted) config form.
fn whois_of(form: &Element) -> Whois {
    Config::new(form.clone()).whois()
}

/// What the engine can tell of the new config from an announcement alone: the whois rule, on top
/// of the form last sent.
fn derived_config(previous: Option<&Element>, codes: &[String]) -> Option<Element> {
    let has = |c: &str| codes.iter().any(|x| x == c);
    let whois = if has("172") {
        Some("anyone")
    } else if has("173") || has("174") {
        Some("moderators")
    } else {
        None
    };
    let Some(whois) = whois else {
        return previous.cloned();
    };
    let form = previous.cloned().unwrap_or_else(|| {
        let mut f = Element::builder("x", ns::DATA_FORMS).build();
        stanza::set_attr(&mut f, "type", "form");
        f.append_child(form_field(
            "FORM_TYPE",
            "hidden",
            "http://jabber.org/protocol/muc#roomconfig",
        ));
        f
    });
    let field = form_field("muc#roomconfig_whois", "list-single", whois);
    let mut rebuilt = Element::builder("x", ns::DATA_FORMS).build();
    stanza::set_attr(&mut rebuilt, "type", form.attr("type").unwrap_or("form"));
    let mut replaced = false;
    for f in form.children() {
        if f.is("field", ns::DATA_FORMS) && f.attr("var") == Some("muc#roomconfig_whois") {
            rebuilt.append_child(field.clone());
            replaced = true;
        } else {
            rebuilt.append_child(f.clone());
        }
    }
    if !replaced {
        rebuilt.append_child(field);
    }
    Some(rebuilt)
}

fn form_field(var: &str, kind: &str, value: &str) -> Element {
    let mut f = Element::builder("field", ns::DATA_FORMS).build();
    stanza::set_attr(&mut f, "var", var);
    stanza::set_attr(&mut f, "type", kind);
    f.append_child(
        Element::builder("value", ns::DATA_FORMS)
            .append(value)
            .build(),
    );
    f
}

/// A `jabber:x:data` form from the host.
fn parse_form(xml: &str) -> Result<Element, Error> {
    let form = stanza::parse(xml)?;
    if !form.is("x", ns::DATA_FORMS) {
        return Err(Error::UnexpectedElement {
            expected: "x",
            got: form.name().to_string(),
        });
    }
    Ok(form)
}

/// The form as the mirror needs it: each field's `var`, `type` and values. Labels, descriptions
/// and options are for people filling the form in; on a constrained link they are most of its size.
fn compact_form(form: &Element) -> Element {
    let mut out = Element::builder("x", ns::DATA_FORMS).build();
    stanza::set_attr(&mut out, "type", form.attr("type").unwrap_or("form"));
    for field in form.children().filter(|f| f.is("field", ns::DATA_FORMS)) {
        let mut f = Element::builder("field", ns::DATA_FORMS).build();
        for attr in ["var", "type"] {
            if let Some(v) = field.attr(attr) {
                stanza::set_attr(&mut f, attr, v);
            }
        }
        // Secrets stay home: the room password (`text-private`) is checked by the master, and
        // the mirror has no use for it.
        let secret = field.attr("type") == Some("text-private");
        for value in field
            .children()
            .filter(|v| v.is("value", ns::DATA_FORMS) && !secret)
        {
            f.append_child(value.clone());
        }
        out.append_child(f);
    }
    out
}

fn without_to(mut el: Element) -> Element {
    stanza::remove_attr(&mut el, "to");
    el
}

fn iq_set(from: &str, to: &str, id: &str, payload: Element) -> Element {
    let mut iq = Element::builder("iq", ns::JABBER_CLIENT).build();
    stanza::set_attr(&mut iq, "from", from);
    stanza::set_attr(&mut iq, "to", to);
    stanza::set_attr(&mut iq, "id", id);
    stanza::set_attr(&mut iq, "type", "set");
    iq.append_child(payload);
    iq
}

/// A roster item from an occupant's presence as the room broadcasts it.
fn roster_item(xml: &str) -> Result<RosterItem, Error> {
    let p = stanza::parse(xml)?;
    let from = stanza::jid_attr(&p, "presence", "from")?;
    let nick = from
        .resource()
        .map(|r| r.to_string())
        .ok_or(Error::invalid("presence", "from has no nick"))?;
    let item = stanza::muc_item(&p).ok_or(Error::invalid("presence", "no muc#user item"))?;
    let affiliation: Affiliation = item
        .attr("affiliation")
        .unwrap_or("none")
        .parse()
        .map_err(|e: xso::error::Error| Error::invalid("item", e))?;
    let role: Role = item
        .attr("role")
        .unwrap_or("participant")
        .parse()
        .map_err(|e: xso::error::Error| Error::invalid("item", e))?;
    let jid = item.attr("jid").and_then(|j| Jid::new(j).ok());
    let mut presence = Element::builder("presence", ns::JABBER_CLIENT).build();
    // The room's copies keep the occupant's own stanza id (Prosody's do): so must the mirror's.
    let mut any = false;
    if let Some(id) = p.attr("id") {
        stanza::set_attr(&mut presence, "id", id);
        any = true;
    }
    for child in p.children().filter(|c| !c.is("x", ns::MUC_USER)) {
        presence.append_child(child.clone());
        any = true;
    }
    Ok(RosterItem {
        affiliation: RosterAffiliation(affiliation),
        role: Some(role),
        jid,
        name: nick,
        presence: any.then_some(presence),
    })
}
