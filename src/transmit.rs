//! The stanzas an engine hands its host to route, in the order it made them.
//!
//! Most are single stanzas, as XML text. A fan-out (one message or presence for every local
//! occupant, copies that differ only in `to`) is kept as one text and its list of recipients, so
//! that a host can parse it once and address each copy itself: parsing a copy per recipient was
//! most of a Prosody mirror's CPU under a flood. A host that wants text per copy still gets it
//! ([`Transmits::pop_text`]), spliced one recipient at a time, in the same order.
//!
//! A host that builds its own stanza objects can take elements instead
//! ([`Transmits::pop_element`]): what the engine queued as an element is handed over as it is,
//! not written as text for the host to parse again (under a Prosody mirror's flood, parsing the
//! engine's text cost more than the engine itself). Text consumers get it serialized when polled.

use std::collections::VecDeque;

use minidom::Element;

use crate::stanza;

/// One thing to route, from a `poll_transmit_batch`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transmit {
    /// One stanza, as XML text, addressed.
    Stanza(String),
    /// One stanza for several recipients. `stanza` is its XML text without a `to` attribute; the
    /// host routes one copy per recipient, with `to` set to that recipient, in this order, before
    /// anything polled after it.
    FanOut {
        /// The stanza, as XML text, without `to`.
        stanza: String,
        /// Full JIDs, one copy each, in order.
        to: Vec<String>,
    },
}

/// A fan-out, part of which a per-copy host may have taken already.
#[derive(Debug, Clone)]
struct FanOut {
    text: String,
    /// The element's name: `to` is spliced in right after `<name`.
    name: String,
    to: VecDeque<String>,
    /// The element `text` was written from, for [`Transmits::pop_element`], if the engine kept it.
    element: Option<Element>,
}

#[derive(Clone, Debug)]
enum Queued {
    Stanza(String),
    /// An addressed stanza not yet written as text.
    Element(Element),
    FanOut(FanOut),
}

/// The engine's outbound stanzas, in order.
#[derive(Debug, Clone, Default)]
pub struct Transmits {
    queue: VecDeque<Queued>,
}

impl Transmits {
    /// One addressed stanza, as text.
    pub fn push(&mut self, text: String) {
        self.queue.push_back(Queued::Stanza(text));
    }

    /// One addressed stanza, as an element (written as text only for a text consumer).
    pub fn push_element(&mut self, el: Element) {
        self.queue.push_back(Queued::Element(el));
    }

    /// A stanza for each of `recipients`: `text` must be `stanza::serialize` of an element called
    /// `name` without a `to` attribute. No recipient, nothing to route.
    pub fn fan_out(&mut self, text: String, name: &str, recipients: Vec<String>) {
        self.fan_out_with(text, name, recipients, None);
    }

    /// [`Transmits::fan_out`], keeping `element` (the one `text` was written from) for
    /// [`Transmits::pop_element`].
    pub fn fan_out_with(
        &mut self,
        text: String,
        name: &str,
        recipients: Vec<String>,
        element: Option<Element>,
    ) {
        if recipients.is_empty() {
            return;
        }
        self.queue.push_back(Queued::FanOut(FanOut {
            text,
            name: name.to_string(),
            to: recipients.into(),
            element,
        }));
    }

    /// [`Transmits::pop`] as elements: one stanza and no recipients, or a fan-out's element
    /// (without `to`) and its recipients. Text queued as text is parsed (it is the engine's own).
    pub fn pop_element(&mut self) -> Option<Result<(Element, Option<Vec<String>>), crate::Error>> {
        Some(match self.queue.pop_front()? {
            Queued::Stanza(text) => stanza::parse(&text).map(|el| (el, None)),
            Queued::Element(el) => Ok((el, None)),
            Queued::FanOut(f) => {
                let to = Some(f.to.into());
                match f.element {
                    Some(el) => Ok((el, to)),
                    None => stanza::parse(&f.text).map(|el| (el, to)),
                }
            }
        })
    }

    /// The next thing to route, a fan-out whole (what is left of it).
    pub fn pop(&mut self) -> Option<Transmit> {
        Some(match self.queue.pop_front()? {
            Queued::Stanza(text) => Transmit::Stanza(text),
            Queued::Element(el) => Transmit::Stanza(stanza::serialize(&el)),
            Queued::FanOut(f) => Transmit::FanOut {
                stanza: f.text,
                to: f.to.into(),
            },
        })
    }

    /// The next stanza to route, as text: a fan-out gives one addressed copy per call.
    pub fn pop_text(&mut self) -> Option<String> {
        if let Some(Queued::FanOut(f)) = self.queue.front_mut() {
            // A fan-out is never queued empty, and leaves the queue with its last copy.
            let to = f.to.pop_front()?;
            let copy = stanza::copy_to(&f.text, &f.name, &to);
            if f.to.is_empty() {
                self.queue.pop_front();
            }
            return Some(copy);
        }
        match self.queue.pop_front()? {
            Queued::Stanza(text) => Some(text),
            Queued::Element(el) => Some(stanza::serialize(&el)),
            Queued::FanOut(_) => None,
        }
    }

    /// Is anything waiting?
    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fan(t: &mut Transmits, body: &str, to: &[&str]) {
        let el = stanza::parse(&format!(
            "<message from='r@m/n' type='groupchat'><body>{body}</body></message>"
        ))
        .unwrap();
        t.fan_out(
            stanza::serialize(&el),
            el.name(),
            to.iter().map(|s| s.to_string()).collect(),
        );
    }

    #[test]
    fn copies_come_in_order_between_single_stanzas() {
        let mut t = Transmits::default();
        t.push("<a/>".into());
        fan(&mut t, "x", &["u@h/1", "v@h/2"]);
        fan(&mut t, "none", &[]);
        t.push("<b/>".into());
        let texts: Vec<String> = std::iter::from_fn(|| t.pop_text()).collect();
        assert_eq!(texts.len(), 4);
        assert_eq!(texts[0], "<a/>");
        let first = stanza::parse(&texts[1]).unwrap();
        assert_eq!(first.attr("to"), Some("u@h/1"));
        assert_eq!(stanza::parse(&texts[2]).unwrap().attr("to"), Some("v@h/2"));
        assert_eq!(texts[3], "<b/>");
        assert!(t.is_empty());
    }

    #[test]
    fn a_batch_is_what_the_copies_would_be() {
        let mut t = Transmits::default();
        fan(&mut t, "x", &["u@h/1", "v@h/2", "w@h/3"]);
        t.push("<b/>".into());
        let mut copies = Transmits::default();
        fan(&mut copies, "x", &["u@h/1", "v@h/2", "w@h/3"]);
        // A host may take a copy per call, then the rest as a batch: nothing twice, nothing lost.
        let one = t.pop_text().unwrap();
        assert_eq!(Some(one), copies.pop_text());
        let Some(Transmit::FanOut { stanza: text, to }) = t.pop() else {
            panic!("a fan-out");
        };
        assert_eq!(to, ["v@h/2", "w@h/3"]);
        for to in &to {
            let mut el = stanza::parse(&text).unwrap();
            stanza::set_attr(&mut el, "to", to.as_str());
            assert_eq!(
                Some(el),
                copies.pop_text().map(|c| stanza::parse(&c).unwrap())
            );
        }
        assert_eq!(t.pop(), Some(Transmit::Stanza("<b/>".into())));
        assert_eq!(t.pop(), None);
    }
}
