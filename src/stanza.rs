//! Stanza plumbing: XML text in and out, attribute access, error replies and the MUC status and
//! item edits that both roles share.
//!
//! The host hands stanzas over as text, usually without a namespace on the top element (it is the
//! stream's default). [`parse`] reads them as `jabber:client`, and [`serialize`] writes them the
//! same way, so a host can parse our output with its own XML parser.

use minidom::Element;
use rxml::{Namespace, NcName};
use xmpp_parsers::stanza_error::{DefinedCondition, ErrorType, StanzaError};

use crate::bounds::{self, Limits};
use crate::error::Error;
use crate::ns;

const WRAP_OPEN: &str = "<dmuc-wrap xmlns='jabber:client'>";
const WRAP_CLOSE: &str = "</dmuc-wrap>";

/// Parse one stanza (or any one element) from text. The top element defaults to `jabber:client`.
/// Text past [`Limits::CEILING`] is refused before any tree is built: no tree the engine holds
/// can nest deep enough to overflow a host thread's stack when it is cloned or dropped.
pub fn parse(xml: &str) -> Result<Element, Error> {
    parse_within(xml, &Limits::CEILING)
}

/// [`parse`], refusing text past the given limits (the host's configured ones: entry points for
/// stanzas from users, outsiders and peers use this).
pub fn parse_within(xml: &str, limits: &Limits) -> Result<Element, Error> {
    bounds::check(xml, limits)?;
    // Every entry point parses its input here: the one place a test build can fail on purpose.
    #[cfg(feature = "panic-inject")]
    if xml.contains("<dmuc-panic-test") {
        panic!("dmuc-panic-test: a panic injected into the engine");
    }
    let mut text = String::with_capacity(xml.len() + WRAP_OPEN.len() + WRAP_CLOSE.len());
    text.push_str(WRAP_OPEN);
    text.push_str(xml);
    text.push_str(WRAP_CLOSE);
    let wrap: Element = text
        .parse()
        .map_err(|e: minidom::Error| Error::Xml(e.to_string()))?;
    if wrap.texts().any(|t| !t.trim().is_empty()) {
        return Err(Error::Xml("text outside the element".into()));
    }
    let mut children = wrap.children();
    match (children.next(), children.next()) {
        (Some(el), None) => Ok(el.clone()),
        (None, _) => Err(Error::Xml("no element".into())),
        (Some(_), Some(_)) => Err(Error::Xml("more than one element".into())),
    }
}

/// Write an element as text.
/// Is this the error an s2s layer sends back when it cannot deliver (a bounce):
/// `remote-server-not-found` or `remote-server-timeout`?
pub fn is_s2s_bounce(el: &Element) -> bool {
    stanza_type(el) == Some("error")
        && el.get_child("error", ns::JABBER_CLIENT).is_some_and(|e| {
            e.has_child("remote-server-not-found", ns::XMPP_STANZAS)
                || e.has_child("remote-server-timeout", ns::XMPP_STANZAS)
        })
}

pub fn serialize(el: &Element) -> String {
    String::from(el)
}

/// Copies of one serialized stanza, one per recipient: `to` is spliced into the text, so a
/// fan-out serializes once instead of once per recipient. `text` must be `serialize(el)` of an
/// element without a `to` attribute.
pub fn copies_to<'a>(
    text: &'a str,
    name: &str,
    recipients: impl IntoIterator<Item = &'a str>,
) -> Vec<String> {
    recipients
        .into_iter()
        .map(|to| copy_to(text, name, to))
        .collect()
}

/// One copy of [`copies_to`]: `text` (an element called `name`, without `to`) addressed to `to`.
pub fn copy_to(text: &str, name: &str, to: &str) -> String {
    // `serialize` writes `<name` first; the attribute goes right after it.
    let cut = (1 + name.len()).min(text.len());
    let (head, tail) = text.split_at(cut);
    let mut s = String::with_capacity(text.len() + to.len() + 8);
    s.push_str(head);
    s.push_str(" to='");
    for c in to.chars() {
        match c {
            '\'' => s.push_str("&apos;"),
            '&' => s.push_str("&amp;"),
            '<' => s.push_str("&lt;"),
            '>' => s.push_str("&gt;"),
            '"' => s.push_str("&quot;"),
            c => s.push(c),
        }
    }
    s.push('\'');
    s.push_str(tail);
    s
}

/// An attribute without namespace.
pub fn attr<'a>(el: &'a Element, name: &'a str) -> Option<&'a str> {
    el.attr(name)
}

/// Set (or replace) an attribute without namespace. Characters XML 1.0 cannot carry (control
/// characters, U+FFFE, U+FFFF) are dropped: values may come from the host rather than from
/// parsed XML, and minidom's writer panics on them (found by fuzzing `handle_history`).
pub fn set_attr(el: &mut Element, name: &str, value: impl Into<String>) {
    if let Ok(name) = NcName::try_from(name) {
        let mut value = value.into();
        if !value.chars().all(xml_char) {
            value.retain(xml_char);
        }
        el.attrs_mut().insert(Namespace::NONE, name, value);
    }
}

/// May `c` appear in an XML 1.0 document (the `Char` production)?
fn xml_char(c: char) -> bool {
    matches!(c, '\t' | '\n' | '\r' | '\u{20}'..='\u{D7FF}' | '\u{E000}'..='\u{FFFD}' | '\u{10000}'..)
}

/// Remove an attribute without namespace.
pub fn remove_attr(el: &mut Element, name: &str) {
    el.attrs_mut().remove(&Namespace::NONE, name);
}

/// Parse a required JID attribute.
pub fn jid_attr(
    el: &Element,
    element: &'static str,
    name: &'static str,
) -> Result<jid::Jid, Error> {
    let value = el.attr(name).ok_or(Error::MissingAttribute {
        element,
        attribute: name,
    })?;
    parse_jid(value)
}

/// Parse a JID, as a typed error.
pub fn parse_jid(value: &str) -> Result<jid::Jid, Error> {
    jid::Jid::new(value).map_err(|e| Error::InvalidJid {
        jid: value.to_string(),
        reason: e.to_string(),
    })
}

/// The stanza's `type`, with the RFC 6120 defaults spelled out as `None`.
pub fn stanza_type(el: &Element) -> Option<&str> {
    el.attr("type")
}

/// The XMPP error conditions the engine itself sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Condition {
    /// A nick change through a mirror, or a groupchat message from a non-occupant.
    NotAcceptable,
    /// The nick is taken.
    Conflict,
    /// An untrusted mirror, or a user it may not speak for.
    Forbidden,
    /// The link to the master is down, or it did not answer in time.
    RemoteServerTimeout,
    /// The outbound queue is full.
    ResourceConstraint,
    /// No such room at this mirror.
    ItemNotFound,
    /// The request was not understood.
    BadRequest,
    /// The engine does not handle this request.
    ServiceUnavailable,
    /// An address that fails strict validation (a nick, say).
    JidMalformed,
}

impl Condition {
    fn parts(self) -> (ErrorType, DefinedCondition) {
        match self {
            Condition::NotAcceptable => (ErrorType::Modify, DefinedCondition::NotAcceptable),
            Condition::Conflict => (ErrorType::Cancel, DefinedCondition::Conflict),
            Condition::Forbidden => (ErrorType::Auth, DefinedCondition::Forbidden),
            Condition::RemoteServerTimeout => {
                (ErrorType::Wait, DefinedCondition::RemoteServerTimeout)
            }
            Condition::ResourceConstraint => {
                (ErrorType::Wait, DefinedCondition::ResourceConstraint)
            }
            Condition::ItemNotFound => (ErrorType::Cancel, DefinedCondition::ItemNotFound),
            Condition::BadRequest => (ErrorType::Modify, DefinedCondition::BadRequest),
            Condition::ServiceUnavailable => {
                (ErrorType::Cancel, DefinedCondition::ServiceUnavailable)
            }
            Condition::JidMalformed => (ErrorType::Modify, DefinedCondition::JidMalformed),
        }
    }
}

/// Remove every child element in namespace `ns`.
pub fn remove_children_in(el: &mut Element, ns: &str) {
    for node in el.take_nodes() {
        if !node.as_element().is_some_and(|c| c.ns() == ns) {
            el.append_node(node);
        }
    }
}

/// An RFC 6120 `<error/>` alone, with the entity that found it in `by`, and a text without
/// `xml:lang` (as Prosody's rooms write theirs).
pub fn error_element(condition: Condition, text: &str, by: &str) -> Element {
    let (kind, cond) = condition.parts();
    let mut err = Element::from(StanzaError::new(kind, cond, "en", ""));
    set_attr(&mut err, "by", by);
    for node in err.take_nodes() {
        if !node
            .as_element()
            .is_some_and(|c| c.is("text", ns::XMPP_STANZAS))
        {
            err.append_node(node);
        }
    }
    let mut t = Element::builder("text", ns::XMPP_STANZAS).build();
    t.append_text_node(text);
    err.append_child(t);
    err
}

/// An error reply to `stanza`: `from`/`to` swapped (or as given), `type='error'`, the original
/// payload kept (as XEP-0045 does) minus our own `<dmuc/>` marker and stanza-id proposal, and an
/// RFC 6120 `<error/>`.
pub fn error_reply(
    stanza: &Element,
    from: &str,
    to: &str,
    condition: Condition,
    text: &str,
) -> Element {
    let (kind, cond) = condition.parts();
    let mut err = StanzaError::new(kind, cond, "en", text);
    if text.is_empty() {
        err.texts.clear();
    }
    let mut reply = Element::builder(stanza.name(), ns::JABBER_CLIENT).build();
    set_attr(&mut reply, "from", from);
    set_attr(&mut reply, "to", to);
    if let Some(id) = stanza.attr("id") {
        set_attr(&mut reply, "id", id);
    }
    set_attr(&mut reply, "type", "error");
    if stanza.name() != "iq" {
        for child in stanza.children() {
            if !child.has_ns(ns::DMUC)
                && !child.is("stanza-id", ns::DMUC0)
                && !child.is("error", ns::JABBER_CLIENT)
            {
                reply.append_child(child.clone());
            }
        }
    }
    reply.append_child(Element::from(err));
    reply
}

/// An empty IQ result answering `iq`.
pub fn iq_result(iq: &Element, from: &str) -> Element {
    let mut reply = Element::builder("iq", ns::JABBER_CLIENT).build();
    set_attr(&mut reply, "from", from);
    if let Some(to) = iq.attr("from") {
        set_attr(&mut reply, "to", to);
    }
    if let Some(id) = iq.attr("id") {
        set_attr(&mut reply, "id", id);
    }
    set_attr(&mut reply, "type", "result");
    reply
}

/// The MUC status codes that only make sense in an occupant's own presence: 100 (non-anonymous
/// room, sent on join), 110 (this is you), 201 (room created) and 210 (nick assigned).
pub const SELF_ONLY_STATUS: [&str; 4] = ["100", "110", "201", "210"];

/// The `<x xmlns='…muc#user'/>` of a presence, if any.
pub fn muc_user(el: &Element) -> Option<&Element> {
    el.get_child("x", ns::MUC_USER)
}

/// Does the presence carry status `code`?
pub fn has_status(el: &Element, code: &str) -> bool {
    muc_user(el).is_some_and(|x| {
        x.children()
            .any(|c| c.is("status", ns::MUC_USER) && c.attr("code") == Some(code))
    })
}

/// Add status `code` to the presence's muc#user element (creating it), unless it is there.
pub fn add_status(el: &mut Element, code: &str) {
    if has_status(el, code) {
        return;
    }
    if el.get_child("x", ns::MUC_USER).is_none() {
        el.append_child(Element::builder("x", ns::MUC_USER).build());
    }
    if let Some(x) = el.get_child_mut("x", ns::MUC_USER) {
        let mut status = Element::builder("status", ns::MUC_USER).build();
        set_attr(&mut status, "code", code);
        x.append_child(status);
    }
}

/// Rebuild the muc#user element keeping only the children `keep` accepts.
fn filter_muc_user(el: &mut Element, mut keep: impl FnMut(&Element) -> bool) {
    let Some(x) = el.get_child_mut("x", ns::MUC_USER) else {
        return;
    };
    let mut rebuilt = Element::builder("x", ns::MUC_USER).build();
    for child in x.children() {
        if keep(child) {
            rebuilt.append_child(child.clone());
        }
    }
    *x = rebuilt;
}

/// Remove the self-only status codes, for a copy that goes to another occupant.
pub fn strip_self_status(el: &mut Element) {
    if !SELF_ONLY_STATUS.iter().any(|c| has_status(el, c)) {
        return;
    }
    filter_muc_user(el, |c| {
        !(c.is("status", ns::MUC_USER)
            && c.attr("code")
                .is_some_and(|c| SELF_ONLY_STATUS.contains(&c)))
    });
}

/// Remove real JIDs (`item/@jid`, `item/actor/@jid`), for a recipient the room hides them from.
pub fn strip_real_jids(el: &mut Element) {
    let Some(x) = el.get_child_mut("x", ns::MUC_USER) else {
        return;
    };
    for item in x.children_mut() {
        if item.is("item", ns::MUC_USER) {
            remove_attr(item, "jid");
            if let Some(actor) = item.get_child_mut("actor", ns::MUC_USER) {
                remove_attr(actor, "jid");
            }
        }
    }
    // An occupant with several sessions has one item per session JID; without the JIDs the
    // room shows one item (Prosody's anonymous item list).
    let mut seen: Vec<Element> = Vec::new();
    filter_muc_user(el, |c| {
        if !c.is("item", ns::MUC_USER) {
            return true;
        }
        if seen.contains(c) {
            return false;
        }
        seen.push(c.clone());
        true
    });
}

/// The key by which a master recognises a second copy of a message a mirror sent: the client's
/// XEP-0359 origin-id, or the mirror's `<dedup xmlns='urn:xmpp:dmuc:0' id='…'/>` when the client
/// set none.
pub fn dedup_key(m: &Element) -> Option<&str> {
    m.get_child("origin-id", ns::SID)
        .or_else(|| m.get_child("dedup", ns::DMUC0))
        .and_then(|o| o.attr("id"))
}

/// Remove the actor's real JID (`item/actor/@jid`), for the subject of a kick or affiliation
/// change who may not see real JIDs: they see their own, not the actor's.
pub fn strip_actor_jid(el: &mut Element) {
    let Some(x) = el.get_child_mut("x", ns::MUC_USER) else {
        return;
    };
    for item in x.children_mut() {
        if let Some(actor) = item.get_child_mut("actor", ns::MUC_USER) {
            remove_attr(actor, "jid");
        }
    }
}

/// The first `<item/>` of the presence's muc#user element.
pub fn muc_item(el: &Element) -> Option<&Element> {
    muc_user(el)?.get_child("item", ns::MUC_USER)
}

/// Remove the first child called `name` in namespace `ns`, returning it.
pub fn take_child(el: &mut Element, name: &str, namespace: &str) -> Option<Element> {
    el.remove_child(name, namespace)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_defaults_to_jabber_client() {
        let el = parse("<message to='a@b'><body>hi</body></message>").unwrap();
        assert!(el.is("message", ns::JABBER_CLIENT));
        assert_eq!(attr(&el, "to"), Some("a@b"));
        assert_eq!(
            serialize(&el),
            "<message xmlns='jabber:client' to='a@b'><body>hi</body></message>"
        );
    }

    #[test]
    fn parse_refuses_garbage() {
        assert_eq!(parse("").unwrap_err(), Error::Xml("no element".into()));
        assert_eq!(
            parse("<a/><b/>").unwrap_err(),
            Error::Xml("more than one element".into())
        );
        assert_eq!(
            parse("hello<a/>").unwrap_err(),
            Error::Xml("text outside the element".into())
        );
        assert!(matches!(parse("<a>"), Err(Error::Xml(_))));
        assert!(matches!(parse("</dmuc-wrap><a/>"), Err(Error::Xml(_))));
    }

    #[test]
    fn copies_splice_to_and_parse_back() {
        let el = parse("<message from='r@m/n' type='groupchat'><body>a &amp; b</body></message>")
            .unwrap();
        let text = serialize(&el);
        let copies = copies_to(&text, el.name(), ["u@h/r", "o'brien@h/x&y"]);
        let first = parse(&copies[0]).unwrap();
        assert_eq!(attr(&first, "to"), Some("u@h/r"));
        assert_eq!(
            first.get_child("body", ns::JABBER_CLIENT).unwrap().text(),
            "a & b"
        );
        let second = parse(&copies[1]).unwrap();
        assert_eq!(attr(&second, "to"), Some("o'brien@h/x&y"));
        let mut expect = el.clone();
        set_attr(&mut expect, "to", "u@h/r");
        assert_eq!(first, expect);
    }

    #[test]
    fn status_edits() {
        let mut p = parse(
            "<presence><x xmlns='http://jabber.org/protocol/muc#user'>\
             <item affiliation='none' role='participant' jid='a@b/c'><actor jid='d@e/f'/></item>\
             <status code='110'/><status code='170'/></x></presence>",
        )
        .unwrap();
        strip_self_status(&mut p);
        assert!(!has_status(&p, "110"));
        assert!(has_status(&p, "170"));
        add_status(&mut p, "110");
        assert!(has_status(&p, "110"));
        strip_real_jids(&mut p);
        let item = muc_item(&p).unwrap();
        assert_eq!(item.attr("jid"), None);
        assert_eq!(
            item.get_child("actor", ns::MUC_USER).unwrap().attr("jid"),
            None
        );
    }

    #[test]
    fn error_reply_keeps_payload_but_not_marker() {
        let p = parse(
            "<presence from='u@h/r' to='room@muc/Nick' id='j1'><x xmlns='http://jabber.org/protocol/muc'/>\
             <dmuc xmlns='http://tridsys.com/protocol/dmuc' from='mirror.h'/></presence>",
        )
        .unwrap();
        let e = error_reply(&p, "room@muc", "u@h/r", Condition::Forbidden, "");
        let want = parse(
            "<presence from='room@muc' to='u@h/r' id='j1' type='error'>\
             <x xmlns='http://jabber.org/protocol/muc'/><error type='auth'>\
             <forbidden xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></error></presence>",
        )
        .unwrap();
        assert_eq!(e, want);
    }
}
