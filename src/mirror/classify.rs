//! Stanza predicates and the one-time classification of every stanza the mirror is handed.

use minidom::Element;

use crate::ns;
use crate::stanza;

/// The fingerprint of a message from the master's side: who said what, under which id.
pub(super) fn fingerprint(m: &Element) -> u64 {
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

/// The key by which the master recognises a second copy of a message: the client's XEP-0359
/// origin-id, or the mirror's own `<dedup xmlns='urn:xmpp:dmuc:0'/>`.
pub(super) fn origin_id(m: &Element) -> Option<&str> {
    crate::stanza::dedup_key(m)
}

/// Is this the error an s2s layer sends back when it cannot deliver (a bounce)?
pub(super) fn is_bounce(el: &Element) -> bool {
    stanza::is_s2s_bounce(el)
}

/// Does this leave end the occupant's stay for good (kick, ban, affiliation change, shutdown,
/// destruction), rather than the master having lost track of them?
pub(super) fn final_leave(el: &Element) -> bool {
    ["301", "307", "321", "322", "332"]
        .iter()
        .any(|c| stanza::has_status(el, c))
        || stanza::muc_user(el).is_some_and(|x| x.has_child("destroy", ns::MUC_USER))
}

/// What a local user's stanza to a mirrored service is, decided once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum FromLocal {
    /// A presence to an occupant JID: a join, a status change, a leave, a nick change.
    Presence { room: String, nick: String },
    /// An unavailable presence to the bare room JID: XEP-0045 servers take it as a leave
    /// (Prosody issue 505).
    BareLeave { room: String },
    /// A groupchat message to the room.
    Groupchat { room: String },
    /// An XEP-0410 self-ping: a ping IQ get to an occupant JID.
    Ping { room: String, nick: String },
    /// Not the mirror's business: the host routes it as usual.
    Other,
}

/// Classify a local user's stanza addressed to a mirrored service (`room` and `nick` from `to`).
pub(super) fn classify_local(el: &Element, room: String, nick: Option<String>) -> FromLocal {
    let kind = stanza::stanza_type(el);
    match (el.name(), nick) {
        ("presence", Some(nick)) => FromLocal::Presence { room, nick },
        ("presence", None) if kind == Some("unavailable") => FromLocal::BareLeave { room },
        ("message", None) if kind == Some("groupchat") => FromLocal::Groupchat { room },
        ("iq", Some(nick)) if kind == Some("get") && el.has_child("ping", ns::PING) => {
            FromLocal::Ping { room, nick }
        }
        _ => FromLocal::Other,
    }
}

/// What a stanza from a mirrored service is, decided once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum FromMaster {
    /// The answer (or bounce) of one of the mirror's pings.
    PingAnswer { master: String },
    /// A ping from the master service itself to the mirror service (its probe after an s2s
    /// session closed): answered.
    Ping,
    /// To a local user directly (join errors, message errors): the mirror observes it.
    ToUser,
    /// To a user's escaped address at the mirror: deliver it to the user.
    Escaped,
    /// To the mirror service itself, from a room or an occupant JID.
    Room { room: String, nick: Option<String> },
}

/// Classify a stanza from `from` (a mirrored service's JID) to `to`, given the mirror's own
/// domain and whether an IQ answer's id is one of the mirror's pings to that master.
pub(super) fn classify_remote(
    el: &Element,
    from: &jid::Jid,
    to: &jid::Jid,
    service: &str,
    is_ping: impl Fn(&str, &str) -> bool,
) -> FromMaster {
    let master = from.domain().as_str().to_ascii_lowercase();
    let answer = matches!(stanza::stanza_type(el), Some("result") | Some("error"));
    if el.name() == "iq" && answer && is_ping(&master, el.attr("id").unwrap_or_default()) {
        return FromMaster::PingAnswer { master };
    }
    if !to.domain().as_str().eq_ignore_ascii_case(service) {
        return FromMaster::ToUser;
    }
    if to.node().is_some() {
        return FromMaster::Escaped;
    }
    if el.name() == "iq"
        && stanza::stanza_type(el) == Some("get")
        && from.node().is_none()
        && to.resource().is_none()
        && el.has_child("ping", ns::PING)
    {
        return FromMaster::Ping;
    }
    FromMaster::Room {
        room: from.to_bare().to_string(),
        nick: from.resource().map(|r| r.to_string()),
    }
}

/// Does the room keep this groupchat message in its history? The host's own rules (Prosody's
/// `muc-message-is-historic`): hints first, then a body, an encrypted payload or a chat marker.
/// Chat states alone and status notices (104, 172) are not history.
pub(super) fn is_historic(m: &Element) -> bool {
    if m.has_child("no-store", ns::HINTS) || m.has_child("no-permanent-store", ns::HINTS) {
        return false;
    }
    m.has_child("store", ns::HINTS)
        || m.has_child("body", ns::JABBER_CLIENT)
        || m.has_child("encryption", ns::EME)
        || m.children().any(|c| c.ns() == ns::CHAT_MARKERS)
}
