//! The history sync: the mirror's `<room xmlns='urn:xmpp:dmuc:0' id='…'><history/></room>` request
//! and the master's `<history xmlns='http://jabber.org/protocol/muc'>` answer holding the messages.

use jid::BareJid;
use minidom::Element;
use xso::{AsXml, FromXml};

use crate::ns;
use xmpp_parsers::muc::muc::History;

/// A history request, in an IQ get from the mirror to the room.
#[derive(FromXml, AsXml, Debug, Clone, PartialEq)]
#[xml(namespace = ns::DMUC0, name = "room")]
pub struct Room {
    /// The room whose history is wanted.
    #[xml(attribute)]
    pub id: BareJid,

    /// XEP-0045 limits: `maxchars`, `maxstanzas`, `seconds`, `since`.
    #[xml(child(default))]
    pub history: Option<History>,
}

/// The history, in the IQ result: the room's messages, each with its XEP-0203 delay, oldest first.
/// The room's current subject, if any, comes last (as XEP-0045 sends it after the history).
#[derive(FromXml, AsXml, Debug, Clone, PartialEq, Default)]
#[xml(namespace = ns::MUC, name = "history")]
pub struct HistoryResult {
    /// The messages.
    #[xml(element(n = ..))]
    pub messages: Vec<Element>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_round_trips() {
        let el: Element = "<room xmlns='urn:xmpp:dmuc:0' id='chatroom@conference.fairfax.tridsys.com'>\
            <history xmlns='http://jabber.org/protocol/muc' maxstanzas='20' since='2011-01-19T08:00:00+00:00'/></room>"
            .parse()
            .unwrap();
        let r = Room::try_from(el.clone()).unwrap();
        let h = r.history.clone().unwrap();
        assert_eq!(h.maxstanzas, Some(20));
        assert!(h.since.is_some());
        assert_eq!(Element::from(r), el);
    }

    #[test]
    fn request_needs_id() {
        let el: Element = "<room xmlns='urn:xmpp:dmuc:0'/>".parse().unwrap();
        assert_eq!(
            Room::try_from(el).unwrap_err().to_string(),
            "Required attribute field 'id' on Room element missing."
        );
    }

    #[test]
    fn bad_limit() {
        let el: Element = "<room xmlns='urn:xmpp:dmuc:0' id='r@m'><history xmlns='http://jabber.org/protocol/muc' maxstanzas='-1'/></room>"
            .parse()
            .unwrap();
        assert!(Room::try_from(el).is_err());
    }

    #[test]
    fn result_keeps_messages() {
        let el: Element = "<history xmlns='http://jabber.org/protocol/muc'>\
            <message xmlns='jabber:client' from='r@m/W' type='groupchat'><body>a</body></message>\
            <message xmlns='jabber:client' from='r@m/S' type='groupchat'><body>b</body></message></history>"
            .parse()
            .unwrap();
        let h = HistoryResult::try_from(el.clone()).unwrap();
        assert_eq!(h.messages.len(), 2);
        assert_eq!(Element::from(h), el);
    }
}
