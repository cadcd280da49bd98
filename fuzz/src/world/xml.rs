//! XML helpers shared by the integration tests: parse a stanza the way the engine does, compare
//! elements up to attribute order and insignificant whitespace, and pick apart what users got.

use minidom::{Element, Node};

/// Levels the protocol's wrappers add around a stanza (docs/security.md, "The limits").
pub const OUTPUT_WRAPPERS: usize = 3;

pub const MUC: &str = "http://jabber.org/protocol/muc";
pub const MUC_USER: &str = "http://jabber.org/protocol/muc#user";
pub const CLIENT: &str = "jabber:client";
pub const DELAY: &str = "urn:xmpp:delay";
pub const STANZAS: &str = "urn:ietf:params:xml:ns:xmpp-stanzas";
pub const DMUC: &str = "http://tridsys.com/protocol/dmuc";
pub const DMUC0: &str = "urn:xmpp:dmuc:0";
pub const DATA_FORMS: &str = "jabber:x:data";

/// Parse one stanza as the engine does (top element defaults to `jabber:client`), with
/// whitespace-only text nodes dropped and text trimmed, so pretty-printed spec examples compare
/// equal to the engine's compact output.
pub fn parse(xml: &str) -> Element {
    // Engine output must always parse. Its wrappers may nest up to 3 levels past the
    // engine's ceiling (a history message at 256 levels inside <forwarded/> inside an IQ), so
    // output is read with that much room; anything deeper is a bug the fuzzer reports.
    let room = dmuc::bounds::Limits {
        max_depth: dmuc::bounds::MAX_DEPTH_CEILING + OUTPUT_WRAPPERS,
        max_size: usize::MAX,
    };
    let el = dmuc::stanza::parse_within(xml, &room)
        .unwrap_or_else(|e| panic!("unparsable engine output ({e}): {xml}"));
    normalize(&el)
}

/// Drop whitespace-only text nodes and trim the others, recursively.
pub fn normalize(el: &Element) -> Element {
    let mut out = el.clone();
    let nodes = out.take_nodes();
    for node in nodes {
        match node {
            Node::Element(child) => {
                out.append_child(normalize(&child));
            }
            Node::Text(text) => {
                let t = text.trim();
                if !t.is_empty() {
                    out.append_text_node(t.to_string());
                }
            }
        }
    }
    out
}

/// Assert two stanzas are the same element (attribute order and whitespace aside).
#[track_caller]
pub fn assert_xml_eq(actual: &str, expected: &str) {
    let a = parse(actual);
    let e = parse(expected);
    assert!(
        a == e,
        "XML differs\n  actual:   {}\n  expected: {}",
        String::from(&a),
        String::from(&e)
    );
}

/// Assert two lists of stanzas are equal as multisets (the engine fans out in its own order).
#[track_caller]
pub fn assert_xml_set_eq(actual: &[String], expected: &[&str]) {
    let mut a: Vec<String> = actual.iter().map(|x| String::from(&parse(x))).collect();
    let mut e: Vec<String> = expected.iter().map(|x| String::from(&parse(x))).collect();
    a.sort();
    e.sort();
    assert_eq!(a, e, "stanza sets differ");
}

/// Set (or replace) an attribute.
pub fn set_attr(el: &mut Element, name: &str, value: &str) {
    dmuc::stanza::set_attr(el, name, value);
}

/// Serialize an element.
pub fn xml(el: &Element) -> String {
    String::from(el)
}

/// The `<status code=…/>` codes of a presence's muc#user element.
pub fn statuses(el: &Element) -> Vec<String> {
    el.get_child("x", MUC_USER)
        .map(|x| {
            x.children()
                .filter(|c| c.is("status", MUC_USER))
                .filter_map(|c| c.attr("code").map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// The muc#user `<item/>` of a presence.
pub fn item(el: &Element) -> Option<&Element> {
    el.get_child("x", MUC_USER)?.get_child("item", MUC_USER)
}

/// The resource (nick) of a `from` attribute.
pub fn from_nick(el: &Element) -> Option<String> {
    el.attr("from")
        .and_then(|f| f.split_once('/'))
        .map(|(_, n)| n.to_string())
}

/// The body of a message, if any.
pub fn body(el: &Element) -> Option<String> {
    el.get_child("body", CLIENT).map(|b| b.text())
}

/// Is it a delayed (history) stanza?
pub fn is_delayed(el: &Element) -> bool {
    el.get_child("delay", DELAY).is_some()
}

/// The defined condition of an error stanza.
pub fn error_condition(el: &Element) -> Option<String> {
    el.get_child("error", CLIENT)?
        .children()
        .find(|c| c.has_ns(STANZAS) && c.name() != "text")
        .map(|c| c.name().to_string())
}

/// `(nick, body)` of the live (not delayed) groupchat messages with a body.
pub fn live_messages(stanzas: &[Element]) -> Vec<(String, String)> {
    stanzas
        .iter()
        .filter(|s| s.name() == "message" && s.attr("type") == Some("groupchat"))
        .filter(|s| !is_delayed(s))
        .filter_map(|s| Some((from_nick(s).unwrap_or_default(), body(s)?)))
        .collect()
}

/// Bodies of the delayed (history) groupchat messages.
pub fn delayed_bodies(stanzas: &[Element]) -> Vec<String> {
    stanzas
        .iter()
        .filter(|s| s.name() == "message" && is_delayed(s))
        .filter_map(body)
        .collect()
}

/// A presence as a test looks at it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    pub nick: String,
    pub kind: Option<String>,
    pub statuses: Vec<String>,
    pub role: Option<String>,
    pub jid: Option<String>,
}

/// Every presence among `stanzas`, summarised.
pub fn presences(stanzas: &[Element]) -> Vec<Seen> {
    stanzas
        .iter()
        .filter(|s| s.name() == "presence")
        .map(|s| Seen {
            nick: from_nick(s).unwrap_or_default(),
            kind: s.attr("type").map(str::to_string),
            statuses: statuses(s),
            role: item(s).and_then(|i| i.attr("role")).map(str::to_string),
            jid: item(s).and_then(|i| i.attr("jid")).map(str::to_string),
        })
        .collect()
}

/// Nicks of the available presences, in order.
pub fn joined_nicks(stanzas: &[Element]) -> Vec<String> {
    presences(stanzas)
        .into_iter()
        .filter(|p| p.kind.is_none())
        .map(|p| p.nick)
        .collect()
}

/// Nicks of the unavailable presences, in order.
pub fn left_nicks(stanzas: &[Element]) -> Vec<String> {
    presences(stanzas)
        .into_iter()
        .filter(|p| p.kind.as_deref() == Some("unavailable"))
        .map(|p| p.nick)
        .collect()
}

/// Bodies of every groupchat message among `stanzas`, live or delayed, in order.
pub fn all_bodies(stanzas: &[Element]) -> Vec<String> {
    stanzas
        .iter()
        .filter(|s| s.name() == "message" && s.attr("type") == Some("groupchat"))
        .filter_map(body)
        .collect()
}

/// The error stanzas among `stanzas`: `(name, condition)`.
pub fn errors(stanzas: &[Element]) -> Vec<(String, String)> {
    stanzas
        .iter()
        .filter(|s| s.attr("type") == Some("error"))
        .map(|s| (s.name().to_string(), error_condition(s).unwrap_or_default()))
        .collect()
}
