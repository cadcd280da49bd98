//! A model of the master's side: a small MUC room that behaves like Prosody's MUC, driven into a
//! [`Master`] exactly the way `lua/mod_dmuc.lua` drives it:
//!
//! - `muc-occupant-pre-join` / `pre-change` / `pre-leave` → [`Master::handle_presence`] before the
//!   room's own access checks (mod_dmuc's priority 100, [`AccessOrder::DmucFirst`]), or after them
//!   ([`AccessOrder::RoomFirst`], as mod_dmuc did at first);
//! - a verdict asking for a sync → [`Master::handle_snapshot`] with every occupant's presence, once
//!   the access checks have passed (mod_dmuc's second pre-join hook, priority -100);
//! - `broadcast` and `publicise_occupant_status` bracketed by `begin_broadcast`/`end_broadcast`
//!   (or, for a host that cannot, presence broadcasts unbracketed with
//!   `MasterConfig::unbracketed_presence`);
//! - `route/remote`: every stanza to a remote domain whose `to` makes `routes_via_mirror` true goes
//!   through [`Master::handle_outbound`] (Send, Drop, Replace);
//! - `muc-occupant-left` → [`Master::handle_left`];
//! - IQs to the room → [`Master::handle_iq`], history answers → [`Master::handle_history`];
//! - [`MasterAction::Evict`] → the occupant leaves with status 333;
//! - [`MasterAction::ConfigChanged`] → [`Master::handle_config`] with the room's form (Prosody),
//!   or with none (`answers_config == false`: ejabberd announces a change before applying it);
//! - an owner's muc#owner form (whois only) → the IQ result to the owner, then the status 172 or
//!   173 announcement to everyone, as Prosody's `process_form` does;
//! - a private message to `room/nick` → to that occupant, from the sender's occupant JID.
//!
//! Everything the host would route is pushed to `out` as XML text, in order.

use std::collections::BTreeMap;

use dmuc::master::{
    GroupchatVerdict, IqVerdict, Master, MasterAction, MasterConfig, Outbound, PresenceVerdict,
    TrustedMirror,
};
use dmuc::Timestamp;
use minidom::Element;

use super::xml::{set_attr, xml, CLIENT, DATA_FORMS, DELAY, DMUC, DMUC0, MUC, MUC_USER, STANZAS};

const MUC_OWNER: &str = "http://jabber.org/protocol/muc#owner";

/// Where the room's own access checks (members-only, bans) run relative to DMUC's pre-join hook.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccessOrder {
    /// The room refuses before the engine sees the join: the error goes straight to the user's
    /// real JID (and the mirror, seeing it pass, ends the pending join).
    RoomFirst,
    /// As mod_dmuc registers itself (priority 100): the engine sees the join first, so a refusal
    /// reaches the user through the mirror, at the user's escaped JID (DMUC3 §Failure case).
    DmucFirst,
}

/// One occupant of the model room.
#[derive(Debug, Clone)]
pub struct Occupant {
    pub nick: String,
    pub real: String,
    pub affiliation: String,
    pub role: String,
    /// The occupant's own presence payload (show, status), without MUC or DMUC elements.
    pub payload: Vec<Element>,
}

/// The model room.
#[derive(Debug)]
pub struct ModelRoom {
    pub jid: String,
    pub members_only: bool,
    pub whois_anyone: bool,
    pub access_order: AccessOrder,
    /// Affiliations by bare JID.
    pub affiliations: BTreeMap<String, String>,
    pub occupants: BTreeMap<String, Occupant>,
    /// Stored messages, as broadcast (no `to`), each with the room's XEP-0203 delay.
    pub history: Vec<Element>,
    /// `(from, text)` of the subject.
    pub subject: Option<(String, String)>,
    /// The room archives messages (as mod_muc_mam): each historic message gets a stanza-id.
    pub archiving: bool,
    /// `(stanza-id, message)` of each message archived, in order.
    pub archive: Vec<(String, Element)>,
    /// The nick whose join is being broadcast (its self-presence gets 100 in a room that shows
    /// real JIDs, as Prosody sends it).
    joining: Option<String>,
}

impl ModelRoom {
    pub fn new(jid: &str) -> Self {
        ModelRoom {
            jid: jid.to_string(),
            members_only: false,
            whois_anyone: false,
            access_order: AccessOrder::DmucFirst,
            affiliations: BTreeMap::new(),
            occupants: BTreeMap::new(),
            history: Vec::new(),
            subject: None,
            archiving: false,
            archive: Vec::new(),
            joining: None,
        }
    }

    fn by_real(&self, real: &str) -> Option<&Occupant> {
        self.occupants.values().find(|o| o.real == real)
    }

    fn affiliation_of(&self, real: &str) -> String {
        let bare = real.split('/').next().unwrap_or_default();
        self.affiliations
            .get(bare)
            .cloned()
            .unwrap_or_else(|| "none".into())
    }

    /// The room's muc#roomconfig form.
    pub fn form(&self) -> String {
        format!(
            "<x xmlns='{DATA_FORMS}' type='form'>\
             <field var='FORM_TYPE' type='hidden'><value>http://jabber.org/protocol/muc#roomconfig</value></field>\
             <field var='muc#roomconfig_whois' type='list-single'><value>{}</value></field>\
             <field var='muc#roomconfig_membersonly' type='boolean'><value>{}</value></field>\
             {}</x>",
            if self.whois_anyone { "anyone" } else { "moderators" },
            if self.members_only { 1 } else { 0 },
            if self.archiving {
                "<field var='muc#roomconfig_enablearchiving' type='boolean'><value>1</value></field>"
            } else {
                ""
            }
        )
    }

    /// `subject`'s presence as the room sends it to `to` (whose role decides jid visibility).
    fn presence(
        &self,
        subject: &Occupant,
        to: &str,
        recipient_role: &str,
        kind: Option<&str>,
        codes: &[&str],
    ) -> Element {
        let is_self = to == subject.real;
        let mut p = Element::builder("presence", CLIENT).build();
        set_attr(&mut p, "from", &format!("{}/{}", self.jid, subject.nick));
        set_attr(&mut p, "to", to);
        if let Some(k) = kind {
            set_attr(&mut p, "type", k);
        } else {
            for c in &subject.payload {
                p.append_child(c.clone());
            }
        }
        let mut x = Element::builder("x", MUC_USER).build();
        let mut item = Element::builder("item", MUC_USER).build();
        set_attr(&mut item, "affiliation", &subject.affiliation);
        set_attr(
            &mut item,
            "role",
            if kind == Some("unavailable") {
                "none"
            } else {
                &subject.role
            },
        );
        if is_self || self.whois_anyone || recipient_role == "moderator" {
            set_attr(&mut item, "jid", &subject.real);
        }
        x.append_child(item);
        for code in codes {
            let mut s = Element::builder("status", MUC_USER).build();
            set_attr(&mut s, "code", code);
            x.append_child(s);
        }
        let initial = self.joining.as_deref() == Some(subject.nick.as_str());
        if is_self && initial && self.whois_anyone {
            let mut s = Element::builder("status", MUC_USER).build();
            set_attr(&mut s, "code", "100");
            x.append_child(s);
        }
        if is_self {
            let mut s = Element::builder("status", MUC_USER).build();
            set_attr(&mut s, "code", "110");
            x.append_child(s);
        }
        p.append_child(x);
        p
    }

    /// The subject message, as sent to a joiner (`to` unset) and handed to `handle_history`.
    fn subject_message(&self) -> Element {
        let (from, text) = self
            .subject
            .clone()
            .unwrap_or_else(|| (self.jid.clone(), String::new()));
        let mut m = Element::builder("message", CLIENT).build();
        set_attr(&mut m, "from", &from);
        set_attr(&mut m, "type", "groupchat");
        let mut s = Element::builder("subject", CLIENT).build();
        if !text.is_empty() {
            s.append_text_node(text);
        }
        m.append_child(s);
        m
    }
}

/// The master's server: the model room and the engine beside it.
#[derive(Debug)]
pub struct MasterHost {
    pub engine: Master,
    /// The mirrors the engine trusts (to rebuild it with other settings).
    engine_trusted: Vec<TrustedMirror>,
    pub room: ModelRoom,
    /// Stanzas the host routes, in order.
    pub out: Vec<String>,
    /// For each room broadcast, how many stanzas the engine queued per `to` (mirror) address.
    pub broadcasts: Vec<BTreeMap<String, usize>>,
    /// Errors the engine returned (mod_dmuc logs them and bounces the stanza).
    pub errors: Vec<dmuc::Error>,
    /// Every presence verdict, in order.
    pub verdicts: Vec<PresenceVerdict>,
    /// Local domain: stanzas to it never pass `route/remote`.
    pub local_domain: String,
    /// Does the host bracket presence broadcasts? (Groupchat broadcasts always are.)
    pub bracket_presence: bool,
    /// Pings from mirrors the engine answered.
    pub pings: usize,
    /// Does the host answer [`MasterAction::ConfigChanged`] with the room's form?
    pub answers_config: bool,
    /// `out` position when the current broadcast began.
    mark: usize,
}

impl MasterHost {
    /// The host's engine, rebuilt with `adoption` (before anything happened in the room).
    pub fn adopt_stanza_ids(&mut self, adoption: dmuc::stanza_ids::Adoption) {
        self.engine = Master::new(MasterConfig {
            trusted_mirrors: self.engine_trusted.clone(),
            unbracketed_presence: !self.bracket_presence,
            stanza_ids: adoption,
            ..MasterConfig::default()
        });
    }

    /// The host's engine, rebuilt with `rules` (before anything happened in the room).
    pub fn follow_rules(&mut self, rules: dmuc::room_rules::RoomRules) {
        self.engine = Master::new(MasterConfig {
            trusted_mirrors: self.engine_trusted.clone(),
            unbracketed_presence: !self.bracket_presence,
            rules,
            ..MasterConfig::default()
        });
    }

    pub fn new(room: &str, local_domain: &str, mirrors: &[&str], bracket_presence: bool) -> Self {
        // `..default()` keeps this compiling when the engine grows settings.
        #[allow(clippy::needless_update)]
        let config = MasterConfig {
            trusted_mirrors: mirrors.iter().map(|m| TrustedMirror::new(*m)).collect(),
            unbracketed_presence: !bracket_presence,
            ..MasterConfig::default()
        };
        MasterHost {
            engine_trusted: config.trusted_mirrors.clone(),
            engine: Master::new(config),
            room: ModelRoom::new(room),
            out: Vec::new(),
            broadcasts: Vec::new(),
            errors: Vec::new(),
            verdicts: Vec::new(),
            local_domain: local_domain.to_string(),
            bracket_presence,
            pings: 0,
            answers_config: bracket_presence,
            mark: 0,
        }
    }

    fn drain_engine(&mut self) {
        while let Some(x) = self.engine.poll_transmit() {
            self.out.push(x);
        }
    }

    /// The room sends a stanza: local users directly, remote ones through `route/remote`.
    fn emit(&mut self, now: Timestamp, el: Element) {
        let to = el.attr("to").unwrap_or_default().to_string();
        let text = xml(&el);
        if super::domain_of(&to) == self.local_domain || !self.engine.routes_via_mirror(&to) {
            self.out.push(text);
            return;
        }
        match self.engine.handle_outbound(now, &text) {
            Ok(Outbound::Send) => self.out.push(text),
            Ok(Outbound::Drop) => {}
            Ok(Outbound::Replace(x)) => self.out.push(x),
            Err(e) => {
                // mod_dmuc: the call failed, the verdict is nil, the stanza goes out as it is.
                self.errors.push(e);
                self.out.push(text);
            }
        }
    }

    fn begin(&mut self, bracket: bool) {
        self.drain_engine();
        self.mark = self.out.len();
        if bracket {
            self.engine.begin_broadcast(&self.room.jid.clone());
        }
    }

    /// End a broadcast; record how many copies went to each mirror service.
    fn end(&mut self, bracket: bool) {
        if bracket {
            self.engine.end_broadcast(&self.room.jid.clone());
        }
        self.drain_engine();
        let mut copies = BTreeMap::new();
        for x in &self.out[self.mark..] {
            let to = super::xml::parse(x)
                .attr("to")
                .unwrap_or_default()
                .to_string();
            if !to.contains('@') && to.starts_with("mirror.") {
                *copies.entry(to).or_insert(0) += 1;
            }
        }
        self.broadcasts.push(copies);
    }

    fn error_to(&mut self, now: Timestamp, stanza: &Element, etype: &str, cond: &str) {
        // RFC 6120 §8.3.1: an error is never answered with an error (two occupant JIDs would
        // bounce one between them for ever).
        if stanza.attr("type") == Some("error") {
            return;
        }
        let mut e = Element::builder(stanza.name(), CLIENT).build();
        set_attr(&mut e, "from", stanza.attr("to").unwrap_or_default());
        set_attr(&mut e, "to", stanza.attr("from").unwrap_or_default());
        set_attr(&mut e, "type", "error");
        if let Some(id) = stanza.attr("id") {
            set_attr(&mut e, "id", id);
        }
        if stanza.name() == "presence" {
            e.append_child(Element::builder("x", MUC).build());
        }
        let mut err = Element::builder("error", CLIENT).build();
        set_attr(&mut err, "type", etype);
        err.append_child(Element::builder(cond, STANZAS).build());
        e.append_child(err);
        self.emit(now, e);
    }

    /// A stanza for the MUC service arrives (from a local user or over s2s).
    pub fn receive(&mut self, now: Timestamp, text: &str) {
        let el = super::xml::parse(text);
        match el.name() {
            "presence" => self.presence(now, &el, text),
            "message" if el.attr("type") == Some("groupchat") => self.groupchat(now, &el),
            "message" => self.private(now, &el),
            "iq" => self.iq(now, &el, text),
            _ => {}
        }
        self.drain_actions(now);
        self.drain_engine();
    }

    /// Run the engine's actions (evictions) on the room.
    pub fn drain_actions(&mut self, now: Timestamp) {
        self.drain_engine();
        while let Some(action) = self.engine.poll_action() {
            match action {
                MasterAction::Evict { room, nick, jid } => {
                    assert_eq!(room, self.room.jid, "eviction from an unknown room");
                    self.evict(now, &nick, &jid);
                }
                MasterAction::ConfigChanged { room } => {
                    assert_eq!(room, self.room.jid, "config of an unknown room");
                    let form = self.answers_config.then(|| self.room.form());
                    if let Err(e) = self.engine.handle_config(now, &room, form.as_deref()) {
                        self.errors.push(e);
                    }
                }
            }
        }
        self.drain_engine();
    }

    /// The host's timer: the engine's link timeouts.
    pub fn tick(&mut self, now: Timestamp) {
        if self.engine.poll_timeout().is_some_and(|t| t <= now) {
            self.engine.handle_timeout(now);
        }
        self.drain_actions(now);
    }

    /// The s2s session to `domain` went down or came up (mod_dmuc's s2s hooks).
    pub fn link(&mut self, now: Timestamp, domain: &str, up: bool) {
        self.engine.handle_link(now, domain, up);
        self.drain_actions(now);
    }

    /// An s2s session with `domain` closed, for whatever reason (mod_dmuc's `s2sout-destroyed`
    /// and `s2sin-destroyed` hooks): the engine probes the mirror.
    pub fn s2s_closed(&mut self, now: Timestamp, domain: &str) {
        self.engine
            .handle_s2s_closed(now, super::MUC_SERVICE, domain);
        self.drain_engine();
        self.drain_actions(now);
    }

    fn pre_hook(&mut self, now: Timestamp, text: &str, granted: &str) -> Option<PresenceVerdict> {
        match self.engine.handle_presence(now, text, Some(granted)) {
            Ok(v) => {
                self.verdicts.push(v.clone());
                self.drain_engine();
                Some(v)
            }
            Err(e) => {
                self.errors.push(e);
                None
            }
        }
    }

    fn presence(&mut self, now: Timestamp, el: &Element, text: &str) {
        let (Some(from), Some(to)) = (el.attr("from"), el.attr("to")) else {
            return;
        };
        let Some((_, nick)) = to.split_once('/') else {
            // To the bare room: Prosody handles it as a presence to the sender's current nick
            // (issue 505), and its hooks see that address.
            let Some(occ) = self.room.by_real(from).cloned() else {
                return;
            };
            let mut el = el.clone();
            set_attr(&mut el, "to", &format!("{}/{}", self.room.jid, occ.nick));
            let text = dmuc::stanza::serialize(&el);
            return self.presence(now, &el, &text);
        };
        let (real, nick) = (from.to_string(), nick.to_string());
        match el.attr("type") {
            Some("unavailable") => self.leave(now, text, &real),
            Some(_) => {}
            None => match self.room.by_real(&real).cloned() {
                Some(occ) if occ.nick == nick => self.change(now, el, text, occ),
                Some(occ) => self.rename(now, el, text, occ, nick),
                None => self.join(now, el, text, real, nick),
            },
        }
    }

    fn join(&mut self, now: Timestamp, el: &Element, text: &str, real: String, nick: String) {
        if self.room.occupants.contains_key(&nick) {
            return self.error_to(now, el, "cancel", "conflict");
        }
        let affiliation = self.room.affiliation_of(&real);
        let allowed = affiliation != "outcast"
            && (!self.room.members_only
                || ["owner", "admin", "member"].contains(&affiliation.as_str()));
        if self.room.access_order == AccessOrder::RoomFirst && !allowed {
            return self.error_to(now, el, "auth", "registration-required");
        }
        let sync = match self.pre_hook(now, text, &nick) {
            None => return self.error_to(now, el, "modify", "bad-request"),
            Some(PresenceVerdict::Refused) => return,
            Some(PresenceVerdict::MirrorJoin { mirror, sync: true }) => Some(mirror),
            Some(_) => None,
        };
        if self.room.access_order == AccessOrder::DmucFirst && !allowed {
            return self.error_to(now, el, "auth", "registration-required");
        }
        if let Some(mirror) = sync {
            self.snapshot(now, &mirror, &nick);
        }
        let role = match affiliation.as_str() {
            "owner" | "admin" => "moderator",
            _ => "participant",
        };
        let occ = Occupant {
            nick: nick.clone(),
            real: real.clone(),
            affiliation,
            role: role.into(),
            payload: payload(el),
        };
        // XEP-0045 §7.2.3: the occupant list first, outside any broadcast...
        let others: Vec<Element> = self
            .room
            .occupants
            .values()
            .map(|o| self.room.presence(o, &real, role, None, &[]))
            .collect();
        for p in others {
            self.emit(now, p);
        }
        self.room.occupants.insert(nick.clone(), occ.clone());
        // ...then the join to everyone (publicise_occupant_status)...
        self.room.joining = Some(nick.clone());
        self.publicise(now, &occ, None, &[], false);
        self.room.joining = None;
        // ...then history and subject to the joiner.
        for m in self.room.history.clone() {
            let mut m = m;
            set_attr(&mut m, "to", &real);
            self.emit(now, m);
        }
        let mut s = self.room.subject_message();
        set_attr(&mut s, "to", &real);
        self.emit(now, s);
    }

    fn change(&mut self, now: Timestamp, el: &Element, text: &str, mut occ: Occupant) {
        if !matches!(
            self.pre_hook(now, text, &occ.nick),
            Some(PresenceVerdict::Pass)
        ) {
            return;
        }
        occ.payload = payload(el);
        self.room.occupants.insert(occ.nick.clone(), occ.clone());
        self.publicise(now, &occ, None, &[], false);
    }

    fn rename(&mut self, now: Timestamp, el: &Element, text: &str, occ: Occupant, nick: String) {
        if !matches!(self.pre_hook(now, text, &nick), Some(PresenceVerdict::Pass)) {
            return;
        }
        if self.room.occupants.contains_key(&nick) {
            return self.error_to(now, el, "cancel", "conflict");
        }
        self.room.occupants.remove(&occ.nick);
        self.publicise(now, &occ, Some("unavailable"), &["303"], true);
        let mut renamed = occ;
        renamed.nick = nick.clone();
        renamed.payload = payload(el);
        self.room.occupants.insert(nick, renamed.clone());
        self.publicise(now, &renamed, None, &[], false);
    }

    fn leave(&mut self, now: Timestamp, text: &str, real: &str) {
        let Some(occ) = self.room.by_real(real).cloned() else {
            return;
        };
        if !matches!(
            self.pre_hook(now, text, &occ.nick),
            Some(PresenceVerdict::Pass)
        ) {
            return;
        }
        self.room.occupants.remove(&occ.nick);
        self.publicise(now, &occ, Some("unavailable"), &[], true);
        self.engine.handle_left(&self.room.jid.clone(), real);
    }

    /// A moderator kicks `nick` (XEP-0045 §8.2): the room shows it leaving with status 307.
    pub fn kick(&mut self, now: Timestamp, nick: &str) {
        let Some(occ) = self.room.occupants.remove(nick) else {
            return;
        };
        self.publicise(now, &occ, Some("unavailable"), &["307"], true);
        self.engine.handle_left(&self.room.jid.clone(), &occ.real);
        self.drain_engine();
    }

    fn evict(&mut self, now: Timestamp, nick: &str, jid: &str) {
        let Some(occ) = self.room.occupants.get(nick).cloned() else {
            return;
        };
        if occ.real != jid {
            return;
        }
        self.room.occupants.remove(nick);
        self.publicise(now, &occ, Some("unavailable"), &["333"], true);
        self.engine.handle_left(&self.room.jid.clone(), jid);
    }

    /// `publicise_occupant_status`: `subject`'s presence to every occupant, one broadcast. When
    /// `subject` has just left, its own sessions get their self-presence too.
    fn publicise(
        &mut self,
        now: Timestamp,
        subject: &Occupant,
        kind: Option<&str>,
        codes: &[&str],
        to_leaver: bool,
    ) {
        let bracket = self.bracket_presence;
        self.begin(bracket);
        let mut stanzas: Vec<Element> = self
            .room
            .occupants
            .values()
            .map(|r| self.room.presence(subject, &r.real, &r.role, kind, codes))
            .collect();
        if to_leaver {
            stanzas.push(
                self.room
                    .presence(subject, &subject.real, &subject.role, kind, codes),
            );
        }
        for p in stanzas {
            self.emit(now, p);
        }
        self.end(bracket);
    }

    fn snapshot(&mut self, now: Timestamp, mirror: &str, nick: &str) {
        let room = &self.room;
        let occupants: Vec<String> = room
            .occupants
            .values()
            .map(|o| {
                // mod_dmuc: the occupant's presence, from = room/nick, with build_item_list(…, false).
                let mut p = room.presence(o, "", "moderator", None, &[]);
                dmuc::stanza::remove_attr(&mut p, "to");
                xml(&p)
            })
            .collect();
        let form = room.form();
        let jid = room.jid.clone();
        if let Err(e) = self
            .engine
            .handle_snapshot(now, &jid, mirror, nick, &form, &occupants)
        {
            self.errors.push(e);
        }
        self.drain_engine();
    }

    fn groupchat(&mut self, now: Timestamp, el: &Element) {
        // mod_dmuc's muc-occupant-groupchat hook: a second copy is dropped; a proposal is
        // removed, and the archive (were there one) would file the message under the id adopted.
        let mut adopted = None;
        match self.engine.handle_groupchat(now, &xml(el)) {
            Ok(GroupchatVerdict::Duplicate) => return,
            Ok(GroupchatVerdict::Broadcast { stanza_id }) => adopted = stanza_id,
            Err(e) => self.errors.push(e),
        }
        let real = el.attr("from").unwrap_or_default().to_string();
        if el.attr("to").is_some_and(|t| t.contains('/')) {
            return self.error_to(now, el, "modify", "bad-request");
        }
        let Some(occ) = self.room.by_real(&real).cloned() else {
            return self.error_to(now, el, "modify", "not-acceptable");
        };
        if occ.role == "visitor" {
            return self.error_to(now, el, "auth", "forbidden");
        }
        let mut m = Element::builder("message", CLIENT).build();
        set_attr(&mut m, "from", &format!("{}/{}", self.room.jid, occ.nick));
        set_attr(&mut m, "type", "groupchat");
        if let Some(id) = el.attr("id") {
            set_attr(&mut m, "id", id);
        }
        for c in el.children() {
            if !c.is("stanza-id", DMUC0) {
                m.append_child(c.clone());
            }
        }
        let is_subject =
            el.get_child("subject", CLIENT).is_some() && el.get_child("body", CLIENT).is_none();
        if self.room.archiving && !is_subject && el.get_child("body", CLIENT).is_some() {
            // As mod_muc_mam: the archive's key (the adopted one, else its own) goes on the
            // broadcast and the history.
            let id = adopted.unwrap_or_else(|| format!("model-{}", self.room.archive.len() + 1));
            m.append_child(dmuc::stanza_ids::stanza_id_element(&self.room.jid, &id));
            self.room.archive.push((id, m.clone()));
        }
        if is_subject {
            let text = el
                .get_child("subject", CLIENT)
                .map(|s| s.text())
                .unwrap_or_default();
            self.room.subject = Some((format!("{}/{}", self.room.jid, occ.nick), text));
        } else {
            // Stored as Prosody's history does: the broadcast, plus the room's delay.
            let mut stored = m.clone();
            let mut d = Element::builder("delay", DELAY).build();
            set_attr(&mut d, "from", &self.room.jid);
            set_attr(&mut d, "stamp", &now.to_xep0082());
            stored.append_child(d);
            self.room.history.push(stored);
        }
        self.begin(true);
        let recipients: Vec<String> = self
            .room
            .occupants
            .values()
            .map(|o| o.real.clone())
            .collect();
        for to in recipients {
            let mut copy = m.clone();
            set_attr(&mut copy, "to", &to);
            self.emit(now, copy);
        }
        self.end(true);
    }

    /// A private message to `room/nick` (XEP-0045 §7.5): to that occupant, from the sender's
    /// occupant JID; a sender who is no occupant, or no such nick, gets an error.
    fn private(&mut self, now: Timestamp, el: &Element) {
        let real = el.attr("from").unwrap_or_default().to_string();
        let to = el.attr("to").unwrap_or_default();
        let Some((_, nick)) = to.split_once('/') else {
            return;
        };
        let Some(sender) = self.room.by_real(&real).cloned() else {
            return self.error_to(now, el, "cancel", "not-acceptable");
        };
        let Some(target) = self.room.occupants.get(nick).cloned() else {
            return self.error_to(now, el, "cancel", "item-not-found");
        };
        let mut m = el.clone();
        set_attr(
            &mut m,
            "from",
            &format!("{}/{}", self.room.jid, sender.nick),
        );
        set_attr(&mut m, "to", &target.real);
        self.emit(now, m);
    }

    /// An owner submits the room's config form (only `muc#roomconfig_whois` is modelled): the
    /// result first, then the announcement to every occupant, as Prosody's `process_form`.
    fn configure(&mut self, now: Timestamp, el: &Element) {
        let real = el.attr("from").unwrap_or_default().to_string();
        if self.room.affiliation_of(&real) != "owner" {
            return self.error_to(now, el, "auth", "forbidden");
        }
        let whois = el
            .get_child("query", MUC_OWNER)
            .and_then(|q| q.get_child("x", DATA_FORMS))
            .and_then(|x| {
                x.children()
                    .find(|f| f.attr("var") == Some("muc#roomconfig_whois"))
                    .and_then(|f| f.get_child("value", DATA_FORMS))
                    .map(|v| v.text())
            });
        let mut result = Element::builder("iq", CLIENT).build();
        set_attr(&mut result, "from", &self.room.jid);
        set_attr(&mut result, "to", &real);
        set_attr(&mut result, "type", "result");
        if let Some(id) = el.attr("id") {
            set_attr(&mut result, "id", id);
        }
        let anyone = match whois.as_deref() {
            Some("anyone") => true,
            Some(_) => false,
            None => self.room.whois_anyone,
        };
        let changed = anyone != self.room.whois_anyone;
        self.room.whois_anyone = anyone;
        self.emit(now, result);
        if !changed {
            return;
        }
        let mut m = Element::builder("message", CLIENT).build();
        set_attr(&mut m, "from", &self.room.jid);
        set_attr(&mut m, "type", "groupchat");
        let mut x = Element::builder("x", MUC_USER).build();
        let mut status = Element::builder("status", MUC_USER).build();
        set_attr(&mut status, "code", if anyone { "172" } else { "173" });
        x.append_child(status);
        m.append_child(x);
        self.begin(true);
        let recipients: Vec<String> = self
            .room
            .occupants
            .values()
            .map(|o| o.real.clone())
            .collect();
        for to in recipients {
            let mut copy = m.clone();
            set_attr(&mut copy, "to", &to);
            self.emit(now, copy);
        }
        self.end(true);
    }

    fn iq(&mut self, now: Timestamp, el: &Element, text: &str) {
        let kind = el.attr("type");
        if kind == Some("set") {
            if el.get_child("query", MUC_OWNER).is_some() {
                self.configure(now, el);
            }
            return;
        }
        if matches!(kind, Some("result") | Some("error"))
            && el.attr("to").is_some_and(|t| !t.contains('@'))
        {
            // An answer to the service itself: mod_dmuc hands it to the engine (its probes).
            if let Err(e) = self.engine.handle_ping(now, text) {
                self.errors.push(e);
            }
            self.drain_engine();
            self.drain_actions(now);
            return;
        }
        if kind == Some("get") && el.attr("to").is_some_and(|t| !t.contains('@')) {
            // To the service itself: mod_dmuc hands pings to the engine.
            match self.engine.handle_ping(now, text) {
                Ok(true) => self.pings += 1,
                Ok(false) => {}
                Err(e) => self.errors.push(e),
            }
            self.drain_engine();
            return;
        }
        if kind == Some("get")
            && el.get_child("room", DMUC0).is_none()
            && el.get_child("roster", DMUC0).is_none()
        {
            return;
        }
        match self.engine.handle_iq(now, text) {
            Ok(IqVerdict::Snapshot { room, mirror }) => {
                assert_eq!(room, self.room.jid, "roster request for an unknown room");
                self.snapshot(now, &mirror, "");
            }
            Ok(IqVerdict::History(request)) => {
                let messages: Vec<String> = self.room.history.iter().map(xml).collect();
                let subject = xml(&self.room.subject_message());
                if let Err(e) = self
                    .engine
                    .handle_history(now, &request, &messages, Some(&subject))
                {
                    self.errors.push(e);
                }
            }
            Ok(_) => {}
            Err(e) => self.errors.push(e),
        }
        self.drain_engine();
    }
}

/// The presence payload the room keeps for an occupant: everything but MUC and DMUC elements.
fn payload(el: &Element) -> Vec<Element> {
    el.children()
        .filter(|c| !c.is("x", MUC) && !c.has_ns(DMUC))
        .cloned()
        .collect()
}
