//! Shared harness of the fuzz targets: how an input is split into control bytes and a pool of
//! texts, stanza templates filled from both, the checks every engine output must pass, and (in
//! [`world`]) the in-memory world of `tests/common/`, which a fuzz crate cannot use directly.
//!
//! Input format, so that a seed can be plain XML: the bytes before the first NUL drive the
//! sequence of calls (through `arbitrary`), each later NUL-separated segment is one text of the
//! pool (a stanza, a nick, a body, a deep payload). A seed `"\0<presence .../>"` therefore feeds
//! that stanza to the first handler; the fuzzer mutates both parts.

pub mod drive;
pub mod world;

use arbitrary::{Arbitrary, Unstructured};
use dmuc::bounds::MAX_DEPTH_CEILING;

pub use world::xml::OUTPUT_WRAPPERS;

/// The split input: control bytes and the text pool.
pub struct Input<'a> {
    pub u: Unstructured<'a>,
    pub pool: Vec<String>,
    next: usize,
}

/// Texts used when the pool has none, or when the control bytes ask for a fixed one: the edge
/// cases of nicks, JIDs and ids (an escaped address, a trailing backslash that `jid`'s unescape
/// panics on, an empty string, an over-long id).
pub const FRAGMENTS: &[&str] = &[
    "Wayne",
    "",
    " ",
    "a/b",
    "x\\",
    "\\",
    "wayne\\40raleigh.tridsys.com\\2fpc",
    "wayne\\40raleigh.tridsys.com\\2fpc\\",
    "\\5c\\20\\2F",
    "12345678901234567890",
    "123456789012345678901",
    "1700000000000000",
    "0",
    "dmuc-ping-1",
    "dmuc-roster-1",
    "dmuc-config-1",
    "dmuc-history-1",
    "Ω≈ç√",
    "nick with space",
    "<b>",
    "&amp;",
    "moderators",
    "anyone",
];

impl<'a> Input<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        let mut parts = data.split(|b| *b == 0);
        let control = parts.next().unwrap_or_default();
        let pool = parts
            .map(|p| String::from_utf8_lossy(p).into_owned())
            .collect();
        Input {
            u: Unstructured::new(control),
            pool,
            next: 0,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.u.is_empty() && self.next >= self.pool.len()
    }

    /// The next pool text in order (then fragments), so that a seed's texts are each used once
    /// before control bytes choose.
    pub fn next_text(&mut self) -> String {
        if self.next < self.pool.len() {
            self.next += 1;
            return self.pool[self.next - 1].clone();
        }
        self.text()
    }

    /// A text chosen by the control bytes: a pool text or a fragment.
    pub fn text(&mut self) -> String {
        let pick: u8 = self.u.arbitrary().unwrap_or(0);
        if !self.pool.is_empty() && pick < 160 {
            return self.pool[pick as usize % self.pool.len()].clone();
        }
        FRAGMENTS[pick as usize % FRAGMENTS.len()].to_string()
    }

    /// A short text for an attribute value (nick, id, body): escaped so the stanza stays
    /// well-formed and the engine's logic, not the XML parser, gets the text.
    pub fn attr(&mut self) -> String {
        let t = self.text();
        let t: String = t.chars().take(64).collect();
        escape(&t)
    }

    /// An extra payload: usually nothing, else a pool text inserted raw (a deep seed becomes a
    /// deep stanza of a well-formed kind).
    pub fn payload(&mut self) -> String {
        let pick: u8 = self.u.arbitrary().unwrap_or(0);
        match pick % 4 {
            0 | 1 => String::new(),
            2 => self.next_text(),
            _ => format!("<body>{}</body>", escape(&self.text())),
        }
    }

    pub fn byte(&mut self) -> u8 {
        self.u.arbitrary().unwrap_or(0)
    }

    pub fn pick<T: Arbitrary<'a>>(&mut self) -> Option<T> {
        T::arbitrary(&mut self.u).ok()
    }
}

/// XML-escape text for an attribute value or a text node.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '&' => out.push_str("&amp;"),
            '\'' => out.push_str("&apos;"),
            '"' => out.push_str("&quot;"),
            c => out.push(c),
        }
    }
    out
}

/// `levels` nested elements.
pub fn nest(levels: usize) -> String {
    let mut s = String::with_capacity(levels * 7);
    for _ in 0..levels {
        s.push_str("<a>");
    }
    for _ in 0..levels {
        s.push_str("</a>");
    }
    s
}

/// Depth of an element tree, without recursion.
pub fn depth(el: &minidom::Element) -> usize {
    let mut max = 0;
    let mut stack = vec![(el, 1usize)];
    while let Some((e, d)) = stack.pop() {
        max = max.max(d);
        stack.extend(e.children().map(|c| (c, d + 1)));
    }
    max
}

/// What every stanza an engine queues must be: well-formed, addressed, and no deeper than the
/// engine's ceiling plus the protocol's wrappers.
pub fn check_output(xml: &str) -> minidom::Element {
    let el = world::xml::parse(xml);
    assert!(
        el.attr("to").is_some_and(|t| !t.is_empty()),
        "engine output without 'to': {xml}"
    );
    let d = depth(&el);
    assert!(
        d <= MAX_DEPTH_CEILING + OUTPUT_WRAPPERS,
        "engine output {d} levels deep"
    );
    el
}
