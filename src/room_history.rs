//! A room's message history and the XEP-0045 history limits (`maxchars`, `maxstanzas`,
//! `seconds`, `since`). The master applies them when it answers a mirror's history request; the
//! mirror keeps its own copy and applies them when it serves a local join.

use std::collections::VecDeque;

use minidom::Element;
use xmpp_parsers::muc::muc::History;

use crate::ns;
use crate::stanza;
use crate::time::Timestamp;

/// One stored message.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    /// When the room saw it.
    pub stamp: Timestamp,
    /// The message as the room broadcast it (`from` is the room or room/nick, no `to`).
    pub message: Element,
    /// Its size as XML text, for `maxchars`.
    pub chars: usize,
}

impl Entry {
    /// Store `message`, stamped with its XEP-0203 delay if it has one, else with `now`.
    pub fn new(message: Element, now: Timestamp) -> Self {
        let text = stanza::serialize(&message);
        Self::with_text(message, &text, now)
    }

    /// As [`Entry::new`], when the caller already has the message as text.
    pub fn with_text(message: Element, text: &str, now: Timestamp) -> Self {
        let stamp = delay_stamp(&message).unwrap_or(now);
        Entry {
            stamp,
            message,
            chars: text.chars().count(),
        }
    }

    /// The message as sent to a joining occupant: with a delay from the room (XEP-0045 §7.2.15)
    /// unless it already carries one.
    pub fn delayed(&self, room: &str) -> Element {
        let mut m = self.message.clone();
        if m.get_child("delay", ns::DELAY).is_none() {
            let mut d = Element::builder("delay", ns::DELAY).build();
            stanza::set_attr(&mut d, "from", room);
            stanza::set_attr(&mut d, "stamp", self.stamp.to_xep0082());
            m.append_child(d);
        }
        m
    }
}

/// The XEP-0203 stamp of a message, if it has a valid one.
pub fn delay_stamp(message: &Element) -> Option<Timestamp> {
    message
        .get_child("delay", ns::DELAY)
        .and_then(|d| d.attr("stamp"))
        .and_then(Timestamp::parse_xep0082)
}

/// Pick the entries a request for `limits` gets, oldest first. All limits apply together: the
/// newest messages are kept, up to `maxstanzas` messages and `maxchars` characters, none older
/// than `seconds` before `now` or than `since`.
pub fn select<'a>(
    entries: impl DoubleEndedIterator<Item = &'a Entry>,
    now: Timestamp,
    limits: &History,
) -> Vec<&'a Entry> {
    let oldest = limits
        .seconds
        .map(|s| Timestamp(now.0.saturating_sub(u64::from(s) * 1000)));
    let since = limits
        .since
        .as_ref()
        .and_then(|d| u64::try_from(d.0.timestamp_millis()).ok())
        .map(Timestamp);
    let mut chars = 0usize;
    let mut picked = Vec::new();
    for e in entries.rev() {
        if limits
            .maxstanzas
            .is_some_and(|m| picked.len() >= m as usize)
        {
            break;
        }
        if oldest.is_some_and(|o| e.stamp < o) || since.is_some_and(|s| e.stamp <= s) {
            break;
        }
        chars += e.chars;
        if limits.maxchars.is_some_and(|m| chars > m as usize) {
            break;
        }
        picked.push(e);
    }
    picked.reverse();
    picked
}

/// A bounded history buffer (the mirror's copy).
#[derive(Debug, Clone, Default)]
pub struct RoomHistory {
    entries: VecDeque<Entry>,
    capacity: usize,
}

impl RoomHistory {
    /// Keep at most `capacity` messages.
    pub fn new(capacity: usize) -> Self {
        RoomHistory {
            entries: VecDeque::new(),
            capacity,
        }
    }

    /// Add a message, dropping the oldest when full.
    pub fn push(&mut self, entry: Entry) {
        if self.capacity == 0 {
            return;
        }
        while self.entries.len() >= self.capacity {
            self.entries.pop_front();
        }
        self.entries.push_back(entry);
    }

    /// Replace everything.
    pub fn clear(&mut self) {
        self.entries.clear();
    }

    /// The entries, oldest first.
    pub fn iter(&self) -> impl DoubleEndedIterator<Item = &Entry> {
        self.entries.iter()
    }

    /// How many messages are kept.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Is it empty?
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The newest entry's stamp.
    pub fn newest(&self) -> Option<Timestamp> {
        self.entries.back().map(|e| e.stamp)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(i: u64) -> Entry {
        let m = stanza::parse(&format!(
            "<message from='r@m/n' type='groupchat'><body>message {i}</body></message>"
        ))
        .unwrap();
        Entry::new(m, Timestamp(i * 1000))
    }

    fn bodies(v: &[&Entry]) -> Vec<String> {
        v.iter()
            .map(|e| {
                e.message
                    .get_child("body", ns::JABBER_CLIENT)
                    .unwrap()
                    .text()
            })
            .collect()
    }

    #[test]
    fn limits() {
        let mut h = RoomHistory::new(5);
        for i in 1..=7 {
            h.push(msg(i));
        }
        assert_eq!(h.len(), 5);
        let now = Timestamp(10_000);
        let all = select(h.iter(), now, &History::new());
        assert_eq!(
            bodies(&all),
            [
                "message 3",
                "message 4",
                "message 5",
                "message 6",
                "message 7"
            ]
        );
        let two = select(h.iter(), now, &History::new().with_maxstanzas(2));
        assert_eq!(bodies(&two), ["message 6", "message 7"]);
        let recent = select(h.iter(), now, &History::new().with_seconds(5));
        assert_eq!(bodies(&recent), ["message 5", "message 6", "message 7"]);
        let one_char_budget = h.iter().last().unwrap().chars as u32;
        let chars = select(
            h.iter(),
            now,
            &History::new().with_maxchars(one_char_budget),
        );
        assert_eq!(bodies(&chars), ["message 7"]);
        let none = select(h.iter(), now, &History::new().with_maxchars(0));
        assert!(none.is_empty());
        let since = xmpp_parsers::date::DateTime::from_str_opt("1970-01-01T00:00:05Z");
        let since = select(h.iter(), now, &History::new().with_since(since));
        assert_eq!(bodies(&since), ["message 6", "message 7"]);
    }

    #[test]
    fn delay_is_added_once() {
        let e = msg(3);
        let d = e.delayed("r@m");
        assert_eq!(
            d.get_child("delay", ns::DELAY).unwrap().attr("stamp"),
            Some("1970-01-01T00:00:03Z")
        );
        let again = Entry::new(d.clone(), Timestamp(99_000));
        assert_eq!(again.stamp, Timestamp(3000));
        assert_eq!(again.delayed("r@m"), d);
    }
}

#[cfg(test)]
trait FromStrOpt {
    fn from_str_opt(s: &str) -> Self;
}

#[cfg(test)]
impl FromStrOpt for xmpp_parsers::date::DateTime {
    fn from_str_opt(s: &str) -> Self {
        s.parse().unwrap()
    }
}
