//! The mirror's replica of one remote room: its occupants (local and remote) with their
//! presences as the room broadcasts them, the room's whois setting, its history and subject.
//! It knows XEP-0045, not DMUC3: FMUC's joining node can keep the same replica.

use std::collections::BTreeMap;

use minidom::Element;

use crate::elements::{History, Whois};
use crate::ns;
use crate::room_history::RoomHistory;
use crate::room_rules::RoomRules;
use crate::stanza;
use crate::stanza_ids::Stamping;
use crate::time::Timestamp;

/// An occupant's presence as the replica keeps it: their current state, as the room lists it to
/// later joiners. What described the change that brought it (an `<actor/>`, a `<reason/>`) is
/// the news of that broadcast only.
pub(super) fn current_presence(el: &Element) -> Element {
    let mut p = el.clone();
    if let Some(x) = p.get_child_mut("x", ns::MUC_USER) {
        for item in x.children_mut().filter(|c| c.is("item", ns::MUC_USER)) {
            while item.remove_child("actor", ns::MUC_USER).is_some() {}
            while item.remove_child("reason", ns::MUC_USER).is_some() {}
        }
    }
    p
}

/// One occupant as the replica knows it.
#[derive(Debug, Clone)]
pub(super) struct Occupant {
    /// The presence as the room broadcasts it (`from` = room/nick, no `to`, a muc#user item).
    pub(super) presence: Element,
    /// Set when the occupant is one of our local users: their full JID.
    pub(super) local: Option<String>,
}

impl Occupant {
    pub(super) fn role(&self) -> &str {
        stanza::muc_item(&self.presence)
            .and_then(|i| i.attr("role"))
            .unwrap_or("participant")
    }
}

/// The copy of one room.
#[derive(Clone, Debug)]
pub(super) struct Replica {
    /// The room's bare JID.
    pub(super) jid: String,
    /// Every occupant, by nick.
    pub(super) occupants: BTreeMap<String, Occupant>,
    /// Local occupants: full JID -> (nick, their own last presence to the room).
    pub(super) local: BTreeMap<String, (String, Element)>,
    pub(super) whois: Whois,
    /// History a join without `<history/>` gets (`muc#roomconfig_defaulthistorymessages`);
    /// none: all the replica has.
    pub(super) default_history: Option<u32>,
    pub(super) history: RoomHistory,
    pub(super) subject: Option<Element>,
    /// The room stamps the subject it sends a joiner with the time it was set (Prosody does,
    /// ejabberd does not), as learnt from the master's own subject message at the sync.
    pub(super) subject_stamped: bool,
    /// The room's own presence from its bare JID, where the room has one (ejabberd's entity
    /// caps): a joiner gets it first, a leaver its unavailable.
    pub(super) room_presence: Option<Element>,
    /// Which local messages get a stanza-id of ours, as the master's config says (none: the
    /// room archives nothing, or the master adopts no proposals).
    pub(super) stamping: Option<Stamping>,
    /// What the room does where hosts differ, as the master's config says.
    pub(super) rules: RoomRules,
}

impl Replica {
    pub(super) fn new(jid: String, history_size: usize) -> Self {
        Replica {
            jid,
            occupants: BTreeMap::new(),
            local: BTreeMap::new(),
            whois: Whois::default(),
            default_history: None,
            history: RoomHistory::new(history_size),
            subject: None,
            subject_stamped: false,
            room_presence: None,
            stamping: None,
            rules: RoomRules::default(),
        }
    }

    /// The room's subject changed (a broadcast, or the sync's subject message): kept as the room
    /// sends it to a joiner, a message from the setter with the subject only (no id, no other
    /// payload), stamped with when it was set where the room stamps it.
    /// `live`: a change broadcast now (stamped now, where the room stamps); else the sync's
    /// subject message, stamped as the room stamped it (not at all if no subject was ever set).
    pub(super) fn set_subject(&mut self, m: &Element, now: Timestamp, live: bool) {
        let mut s = Element::builder("message", ns::JABBER_CLIENT).build();
        if let Some(from) = m.attr("from") {
            stanza::set_attr(&mut s, "from", from);
        }
        stanza::set_attr(&mut s, "type", "groupchat");
        if let Some(subject) = m.get_child("subject", ns::JABBER_CLIENT) {
            s.append_child(subject.clone());
        }
        if let Some(d) = m.get_child("delay", ns::DELAY).filter(|_| !live) {
            s.append_child(d.clone());
        } else if live && self.subject_stamped {
            let mut d = Element::builder("delay", ns::DELAY).build();
            stanza::set_attr(&mut d, "from", &self.jid);
            stanza::set_attr(&mut d, "stamp", now.to_xep0082());
            s.append_child(d);
        }
        self.subject = Some(s);
    }

    /// The room's configuration changed (or came with the first sync).
    pub(super) fn apply_config(
        &mut self,
        whois: Whois,
        default_history: Option<u32>,
        stamping: Option<Stamping>,
        rules: RoomRules,
    ) {
        self.whois = whois;
        self.default_history = default_history;
        self.stamping = stamping;
        self.rules = rules;
    }

    /// The history limits a local user asked for in their join (XEP-0045 §7.2.15), or the
    /// room's default.
    pub(super) fn history_limits(&self, user: &str) -> History {
        let asked = self
            .local
            .get(user)
            .and_then(|(_, join)| join.get_child("x", ns::MUC))
            .and_then(|x| x.get_child("history", ns::MUC))
            .and_then(|h| History::try_from(h.clone()).ok());
        match asked {
            Some(h) => h,
            None => match self.default_history {
                Some(n) => History::new().with_maxstanzas(n),
                None => History::new(),
            },
        }
    }

    /// The local sessions (full JIDs) holding `nick`: more than one with multi-session nicks.
    pub(super) fn sessions_of(&self, nick: &str) -> Vec<String> {
        self.local
            .iter()
            .filter(|(_, (n, _))| n == nick)
            .map(|(u, _)| u.clone())
            .collect()
    }

    /// The XEP-0421 `<occupant-id/>` the room gave `nick`, from the presence it broadcast.
    pub(super) fn occupant_id(&self, nick: &str) -> Option<Element> {
        self.occupants
            .get(nick)?
            .presence
            .get_child("occupant-id", ns::OCCUPANT_ID)
            .cloned()
    }

    pub(super) fn occupant_jid(&self, nick: &str) -> String {
        format!("{}/{}", self.jid, nick)
    }

    pub(super) fn is_moderator(&self, nick: &str) -> bool {
        self.occupants
            .get(nick)
            .is_some_and(|o| o.role() == "moderator")
    }

    /// `presence` about `subject` as `recipient` (a local occupant's nick) should see it.
    pub(super) fn presence_for(
        &self,
        presence: &Element,
        subject: &str,
        recipient: &str,
        to: &str,
    ) -> Element {
        let mut p = presence.clone();
        stanza::set_attr(&mut p, "to", to);
        let hidden = self.whois == Whois::Moderators && !self.is_moderator(recipient);
        if subject == recipient {
            stanza::add_status(&mut p, "110");
            // Each session's own copy of an occupant's presence is built on that session's own
            // presence (its id); a leave is the leave as it came.
            let leave = stanza::stanza_type(&p) == Some("unavailable");
            if let Some((_, own)) = self.local.get(to).filter(|_| !leave) {
                match own.attr("id") {
                    Some(id) => stanza::set_attr(&mut p, "id", id),
                    None => stanza::remove_attr(&mut p, "id"),
                }
            }
            // One can always see one's own real JID, even in a copy that was anonymous.
            if let Some(item) = p
                .get_child_mut("x", ns::MUC_USER)
                .and_then(|x| x.get_child_mut("item", ns::MUC_USER))
                .filter(|i| i.attr("jid").is_none())
            {
                stanza::set_attr(item, "jid", to);
            }
            if hidden {
                // One's own real JID, yes; the actor's, no (as the room shows it).
                stanza::strip_actor_jid(&mut p);
            }
        } else {
            stanza::strip_self_status(&mut p);
            if hidden {
                stanza::strip_real_jids(&mut p);
            }
        }
        p
    }

    /// An occupant's leave as the room shows it: the user's own unavailable presence as the
    /// template (its id, status text and other children, as Prosody's room keeps them), from the
    /// occupant JID, with the occupant-id the room gave them, and a muc#user item with role
    /// `none` and `codes`.
    pub(super) fn leave_of(
        &self,
        nick: &str,
        template: Option<&Element>,
        codes: &[&str],
    ) -> Element {
        let mut p = template
            .cloned()
            .unwrap_or_else(|| Element::builder("presence", ns::JABBER_CLIENT).build());
        stanza::set_attr(&mut p, "from", self.occupant_jid(nick));
        stanza::remove_attr(&mut p, "to");
        stanza::set_attr(&mut p, "type", "unavailable");
        while p.remove_child("x", ns::MUC).is_some() {}
        while p.remove_child("x", ns::MUC_USER).is_some() {}
        while p.remove_child("dmuc", ns::DMUC).is_some() {}
        while p.remove_child("occupant-id", ns::OCCUPANT_ID).is_some() {}
        if let Some(id) = self.occupant_id(nick) {
            p.append_child(id);
        }
        let mut x = Element::builder("x", ns::MUC_USER).build();
        if let Some(item) = self
            .occupants
            .get(nick)
            .and_then(|o| stanza::muc_item(&o.presence))
        {
            let mut item = item.clone();
            stanza::set_attr(&mut item, "role", "none");
            x.append_child(item);
        }
        for code in codes {
            let mut s = Element::builder("status", ns::MUC_USER).build();
            stanza::set_attr(&mut s, "code", *code);
            x.append_child(s);
        }
        p.append_child(x);
        p
    }
}
