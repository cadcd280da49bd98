//! The mirror's replica of one remote room: its occupants (local and remote) with their
//! presences as the room broadcasts them, the room's whois setting, its history and subject.
//! It knows XEP-0045, not DMUC3: FMUC's joining node can keep the same replica.

use std::collections::BTreeMap;

use minidom::Element;

use crate::elements::{History, Whois};
use crate::ns;
use crate::room_history::RoomHistory;
use crate::stanza;
use crate::stanza_ids::Stamping;

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
#[derive(Debug)]
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
    /// Which local messages get a stanza-id of ours, as the master's config says (none: the
    /// room archives nothing, or the master adopts no proposals).
    pub(super) stamping: Option<Stamping>,
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
            stamping: None,
        }
    }

    /// The room's configuration changed (or came with the first sync).
    pub(super) fn apply_config(
        &mut self,
        whois: Whois,
        default_history: Option<u32>,
        stamping: Option<Stamping>,
    ) {
        self.whois = whois;
        self.default_history = default_history;
        self.stamping = stamping;
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

    /// An occupant's leave as XEP-0045 shows it: type unavailable, their muc#user item with role
    /// `none`, and `extra` children (status texts, status codes).
    pub(super) fn leave_of(&self, nick: &str, extra: impl IntoIterator<Item = Element>) -> Element {
        let mut p = Element::builder("presence", ns::JABBER_CLIENT).build();
        stanza::set_attr(&mut p, "from", self.occupant_jid(nick));
        stanza::set_attr(&mut p, "type", "unavailable");
        let mut x = Element::builder("x", ns::MUC_USER).build();
        let mut codes = Vec::new();
        for c in extra {
            if c.is("status", ns::MUC_USER) {
                codes.push(c);
            } else {
                p.append_child(c);
            }
        }
        if let Some(item) = self
            .occupants
            .get(nick)
            .and_then(|o| stanza::muc_item(&o.presence))
        {
            let mut item = item.clone();
            stanza::set_attr(&mut item, "role", "none");
            x.append_child(item);
        }
        for c in codes {
            x.append_child(c);
        }
        p.append_child(x);
        p
    }
}
