//! XEP-0359 stanza-ids for a mirror user's message: the mirror *proposes* the id, the master's
//! archive *adopts* it.
//!
//! The mirror shows its users' messages at once, before the master has archived them, so the
//! room's `<stanza-id by='room'/>` does not exist yet when the mirror makes its copies. Instead
//! the mirror picks the id itself, puts it on its own copies (the sender's echo, local peers, its
//! history), and sends it to the master inside the message as
//! `<stanza-id xmlns='urn:xmpp:dmuc:0' id='…'/>` (a real `urn:xmpp:sid:0` one claiming
//! `by='room'` would be stripped by the room as a forgery, as it must be for anyone else). The
//! master validates the proposal and hands it to its host, whose archive stores the message
//! under it, so every copy the room sends carries the same id.
//!
//! One id format suits both hosts: a decimal timestamp in microseconds. Prosody's archive keys
//! are opaque strings; ejabberd's are integer microsecond timestamps that also order its archive.
//!
//! The master tells each mirror, in the config it sends, whether the room adopts proposals: a
//! hidden field `urn:xmpp:dmuc:0#stanza-ids` with value `any` (any proposal) or `fresh` (only a
//! message sent at once, not one that waited in the queue), and a second value `archived` when
//! the room also adds the legacy `<archived xmlns='urn:xmpp:mam:tmp'/>`. A mirror stamps nothing
//! otherwise (the room archives nothing, or an older master ignores proposals).

use minidom::Element;

use crate::ns;
use crate::stanza;
use crate::time::Timestamp;

/// The config form field by which the master tells a mirror that the room adopts proposals.
pub const SIGNAL_FIELD: &str = "urn:xmpp:dmuc:0#stanza-ids";

/// Longest proposal accepted: `u64::MAX` has 20 digits.
pub const MAX_LEN: usize = 20;

/// What the master's host can do with a mirror's proposal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Adoption {
    /// The host cannot choose the archive's id: proposals are ignored and mirrors stamp nothing.
    #[default]
    Never,
    /// Ids are opaque archive keys (Prosody's `archive:append` takes one): any valid proposal.
    Any,
    /// Ids are microsecond timestamps that order the archive (ejabberd's mod_mam). A proposal
    /// further than `max_skew_ms` from the master's clock would file the message out of order
    /// (a client paging the archive `after` a newer id would never see it), so it is not
    /// adopted and the host gives the message its own id.
    Within {
        /// How far a proposal may be from `now`, either way.
        max_skew_ms: u64,
    },
}

/// How a mirror stamps its users' messages, as the master told it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamping {
    /// Only a message sent to the master at once: one that waits in the queue arrives too late
    /// to be adopted (a master with [`Adoption::Within`]).
    pub fresh_only: bool,
    /// The room also puts XEP-0313 v0.2's `<archived xmlns='urn:xmpp:mam:tmp' by='room'/>`, with
    /// the same id, on what it archives (ejabberd's mod_mam): so do the mirror's copies.
    pub archived: bool,
}

/// The mirror's source of proposals: strictly increasing, about `now` in microseconds. The low
/// three digits start at an offset derived from the mirror's service name, so that two mirrors
/// proposing in the same millisecond rarely pick the same id (the master refuses a repeat).
#[derive(Debug, Clone)]
pub struct IdSource {
    offset: u64,
    last: u64,
}

impl IdSource {
    /// A source for the mirror service `service`.
    pub fn new(service: &str) -> Self {
        // FNV-1a: stable across builds and platforms, unlike std's hasher.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in service.bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        IdSource {
            offset: h % 1000,
            last: 0,
        }
    }

    /// The next proposal at `now`.
    pub fn next(&mut self, now: Timestamp) -> String {
        let at = now.0.saturating_mul(1000).saturating_add(self.offset);
        self.last = at.max(self.last.saturating_add(1));
        self.last.to_string()
    }
}

/// A proposal's id as the master accepts it: 1 to [`MAX_LEN`] ASCII digits that fit a `u64`
/// (ejabberd stores it as an integer; Prosody as a key in any driver).
pub fn parse_proposal(id: &str) -> Option<u64> {
    if id.is_empty() || id.len() > MAX_LEN || !id.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    id.parse().ok()
}

/// The proposal a message carries, if any.
pub fn proposal(m: &Element) -> Option<&str> {
    m.get_child("stanza-id", ns::DMUC0)
        .and_then(|s| s.attr("id"))
}

/// The proposal element for `id`.
pub fn proposal_element(id: &str) -> Element {
    let mut el = Element::builder("stanza-id", ns::DMUC0).build();
    stanza::set_attr(&mut el, "id", id);
    el
}

/// XEP-0313 v0.2's `<archived xmlns='urn:xmpp:mam:tmp' by='room' id='…'/>`.
pub fn archived_element(room: &str, id: &str) -> Element {
    let mut el = Element::builder("archived", ns::MAM_TMP).build();
    stanza::set_attr(&mut el, "by", room);
    stanza::set_attr(&mut el, "id", id);
    el
}

/// The room's XEP-0359 `<stanza-id by='room' id='…'/>`.
pub fn stanza_id_element(room: &str, id: &str) -> Element {
    let mut el = Element::builder("stanza-id", ns::SID).build();
    stanza::set_attr(&mut el, "by", room);
    stanza::set_attr(&mut el, "id", id);
    el
}

fn is_room_id(c: &Element, room: &str) -> bool {
    (c.is("stanza-id", ns::SID) || c.is("archived", ns::MAM_TMP))
        && c.attr("by").is_some_and(|b| b.eq_ignore_ascii_case(room))
}

/// Does `m` carry a stanza-id (or a legacy `<archived/>`) claiming to be the room's?
pub fn claims_room_id(m: &Element, room: &str) -> bool {
    m.children().any(|c| is_room_id(c, room))
}

/// Remove what a client may not set on a message to `room`: stanza-ids claiming to be the
/// room's (as the room strips them), and any proposal (only the mirror makes one).
pub fn strip_forged(m: &mut Element, room: &str) {
    if !claims_room_id(m, room) && !m.has_child("stanza-id", ns::DMUC0) {
        return;
    }
    for node in m.take_nodes() {
        let forged = node
            .as_element()
            .is_some_and(|c| c.is("stanza-id", ns::DMUC0) || is_room_id(c, room));
        if !forged {
            m.append_node(node);
        }
    }
}

fn field_values<'a>(form: &'a Element, var: &'a str) -> impl Iterator<Item = String> + 'a {
    form.children()
        .filter(move |f| f.is("field", ns::DATA_FORMS) && f.attr("var") == Some(var))
        .flat_map(|f| f.children().filter(|v| v.is("value", ns::DATA_FORMS)))
        .map(|v| v.text().trim().to_string())
}

/// Does the room's config form say it archives messages (Prosody
/// `muc#roomconfig_enablearchiving`, ejabberd `muc#roomconfig_mam`)?
pub fn form_archives(form: &Element) -> bool {
    ["muc#roomconfig_enablearchiving", "muc#roomconfig_mam"]
        .iter()
        .any(|var| field_values(form, var).any(|v| v == "1" || v == "true"))
}

/// The form as the master sends it to mirrors: any signal field removed (it is the engine's to
/// set), then added when the room archives and the host adopts proposals; `archived`: the host
/// also adds the legacy `<archived/>`.
pub fn with_signal(form: &Element, adoption: Adoption, archived: bool) -> Element {
    let mut out = form.clone();
    for node in out.take_nodes() {
        let signal = node
            .as_element()
            .is_some_and(|c| c.is("field", ns::DATA_FORMS) && c.attr("var") == Some(SIGNAL_FIELD));
        if !signal {
            out.append_node(node);
        }
    }
    let value = match adoption {
        Adoption::Never => None,
        Adoption::Any => Some("any"),
        Adoption::Within { .. } => Some("fresh"),
    };
    if let Some(value) = value.filter(|_| form_archives(form)) {
        let mut f = Element::builder("field", ns::DATA_FORMS).build();
        stanza::set_attr(&mut f, "var", SIGNAL_FIELD);
        stanza::set_attr(&mut f, "type", "hidden");
        let values: &[&str] = if archived {
            &[value, "archived"]
        } else {
            &[value]
        };
        for value in values {
            let mut v = Element::builder("value", ns::DATA_FORMS).build();
            v.append_text_node(*value);
            f.append_child(v);
        }
        out.append_child(f);
    }
    out
}

/// What the master's config says about stamping (the mirror side).
pub fn signal(form: &Element) -> Option<Stamping> {
    let values: Vec<String> = field_values(form, SIGNAL_FIELD).collect();
    let fresh_only = match values.first().map(String::as_str) {
        Some("any") => false,
        Some("fresh") => true,
        _ => return None,
    };
    Some(Stamping {
        fresh_only,
        archived: values.iter().any(|v| v == "archived"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proposals_increase_and_stay_near_now() {
        let mut s = IdSource::new("mirror.raleigh.localhost");
        let now = Timestamp(1_700_000_000_000);
        let a: u64 = s.next(now).parse().unwrap();
        let b: u64 = s.next(now).parse().unwrap();
        let c: u64 = s.next(Timestamp(1_699_999_999_000)).parse().unwrap();
        assert!(a < b && b < c, "{a} {b} {c}");
        assert_eq!(a / 1000, now.0);
        assert_ne!(
            IdSource::new("mirror.raleigh.localhost").next(now),
            IdSource::new("mirror.durham.localhost").next(now)
        );
    }

    #[test]
    fn only_digits_that_fit_are_proposals() {
        assert_eq!(
            parse_proposal("1700000000000123"),
            Some(1_700_000_000_000_123)
        );
        for bad in ["", "12a", "-1", " 1", "1.0", "99999999999999999999", "１２"] {
            assert_eq!(parse_proposal(bad), None, "{bad:?}");
        }
        assert_eq!(parse_proposal(&"1".repeat(21)), None);
    }

    #[test]
    fn forged_ids_go_others_stay() {
        let mut m = stanza::parse(
            "<message><body>x</body>\
             <stanza-id xmlns='urn:xmpp:sid:0' by='Room@muc.example' id='forged'/>\
             <stanza-id xmlns='urn:xmpp:sid:0' by='someone@else.example' id='theirs'/>\
             <archived xmlns='urn:xmpp:mam:tmp' by='room@muc.example' id='forged'/>\
             <stanza-id xmlns='urn:xmpp:dmuc:0' id='123'/></message>",
        )
        .unwrap();
        strip_forged(&mut m, "room@muc.example");
        assert!(!claims_room_id(&m, "room@muc.example"));
        assert_eq!(proposal(&m), None);
        let kept: Vec<_> = m
            .children()
            .filter(|c| c.is("stanza-id", ns::SID))
            .map(|c| c.attr("id").unwrap())
            .collect();
        assert_eq!(kept, ["theirs"]);
    }

    #[test]
    fn signal_only_when_the_room_archives_and_the_host_adopts() {
        let form = |archiving: &str| {
            stanza::parse(&format!(
                "<x xmlns='jabber:x:data' type='form'>\
                 <field var='muc#roomconfig_enablearchiving' type='boolean'><value>{archiving}</value></field>\
                 <field var='{SIGNAL_FIELD}' type='hidden'><value>any</value></field></x>"
            ))
            .unwrap()
        };
        let stamping = |fresh_only, archived| {
            Some(Stamping {
                fresh_only,
                archived,
            })
        };
        assert_eq!(
            signal(&with_signal(&form("1"), Adoption::Any, false)),
            stamping(false, false)
        );
        let within = Adoption::Within { max_skew_ms: 1 };
        assert_eq!(
            signal(&with_signal(&form("true"), within, true)),
            stamping(true, true)
        );
        assert_eq!(signal(&with_signal(&form("0"), Adoption::Any, true)), None);
        assert_eq!(
            signal(&with_signal(&form("1"), Adoption::Never, true)),
            None
        );
    }
}
