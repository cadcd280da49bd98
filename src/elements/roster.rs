//! `<roster xmlns='urn:xmpp:dmuc:0'>`: the room's occupants, sent by the master to a new mirror.
//!
//! The spec's items carry `affiliation`, `jid` and `name` (the nick). A mirror must show local
//! users each occupant as XEP-0045 would, so we add two optional parts (see docs/protocol.md):
//! `role`, and the occupant's current presence as a child (`<presence xmlns='jabber:client'/>`,
//! show and status, without the muc#user element that the mirror rebuilds from the attributes).
//! And `jids='withheld'` on the roster: the master left the real JIDs out, because none of the
//! mirror's occupants may see them (see docs/security.md).

use std::borrow::Cow;

use jid::Jid;
use minidom::Element;
use xso::{AsXml, AsXmlText, FromXml, FromXmlText};

use crate::ns;
use xmpp_parsers::muc::user::{Affiliation, Role};

/// The occupant list.
#[derive(FromXml, AsXml, Debug, Clone, PartialEq, Default)]
#[xml(namespace = ns::DMUC0, name = "roster")]
pub struct Roster {
    /// `withheld`: the master left the occupants' real JIDs out (dmuc extension).
    #[xml(attribute(default))]
    pub jids: Option<String>,

    /// One item per occupant.
    #[xml(child(n = ..))]
    pub items: Vec<RosterItem>,
}

/// One occupant.
#[derive(FromXml, AsXml, Debug, Clone, PartialEq)]
#[xml(namespace = ns::DMUC0, name = "item")]
pub struct RosterItem {
    /// Affiliation with the room.
    #[xml(attribute)]
    pub affiliation: RosterAffiliation,

    /// Current role (dmuc extension; `participant` when absent).
    #[xml(attribute(default))]
    pub role: Option<Role>,

    /// The occupant's real JID.
    #[xml(attribute(default))]
    pub jid: Option<Jid>,

    /// The occupant's nick in the room.
    #[xml(attribute)]
    pub name: String,

    /// The occupant's current presence (dmuc extension).
    #[xml(element(default))]
    pub presence: Option<Element>,
}

/// An affiliation that is always written out, as the spec's examples do (`affiliation='none'`;
/// xmpp-parsers' [`Affiliation`] omits its default).
#[derive(Debug, Clone, PartialEq)]
pub struct RosterAffiliation(pub Affiliation);

impl RosterAffiliation {
    /// The attribute value.
    pub fn as_str(&self) -> &'static str {
        match self.0 {
            Affiliation::Owner => "owner",
            Affiliation::Admin => "admin",
            Affiliation::Member => "member",
            Affiliation::Outcast => "outcast",
            Affiliation::None => "none",
        }
    }
}

/// The value of [`Roster::jids`] when the master left the real JIDs out.
pub const WITHHELD: &str = "withheld";

impl Roster {
    /// Did the master leave the real JIDs out?
    pub fn withheld(&self) -> bool {
        self.jids.as_deref() == Some(WITHHELD)
    }
}

impl FromXmlText for RosterAffiliation {
    fn from_xml_text(data: String) -> Result<Self, xso::error::Error> {
        Affiliation::from_xml_text(data).map(RosterAffiliation)
    }
}

impl AsXmlText for RosterAffiliation {
    fn as_xml_text(&self) -> Result<Cow<'_, str>, xso::error::Error> {
        Ok(Cow::Borrowed(self.as_str()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_roster_parses() {
        let el: Element = "<roster xmlns='urn:xmpp:dmuc:0'>\
            <item affiliation='owner' jid='scott@fairfax.tridsys.com' name='Scott'/>\
            <item affiliation='admin' jid='kevin@fairfax.tridsys.com' name='Kevin'/>\
            </roster>"
            .parse()
            .unwrap();
        let r = Roster::try_from(el.clone()).unwrap();
        assert_eq!(r.items.len(), 2);
        assert_eq!(r.items[0].affiliation.0, Affiliation::Owner);
        assert_eq!(r.items[1].name, "Kevin");
        assert_eq!(r.items[1].role, None);
        assert_eq!(Element::from(r), el);
    }

    #[test]
    fn extended_item_round_trips() {
        let el: Element = "<roster xmlns='urn:xmpp:dmuc:0'>\
            <item affiliation='none' role='visitor' name='Keith'>\
            <presence xmlns='jabber:client'><show>away</show></presence></item></roster>"
            .parse()
            .unwrap();
        let r = Roster::try_from(el.clone()).unwrap();
        assert_eq!(r.items[0].role, Some(Role::Visitor));
        assert!(r.items[0].presence.is_some());
        assert_eq!(Element::from(r), el);
    }

    #[test]
    fn withheld_jids_round_trip() {
        let el: Element = "<roster xmlns='urn:xmpp:dmuc:0' jids='withheld'>\
            <item affiliation='none' name='Keith'/></roster>"
            .parse()
            .unwrap();
        let r = Roster::try_from(el.clone()).unwrap();
        assert!(r.withheld());
        assert_eq!(Element::from(r), el);
    }

    #[test]
    fn bad_affiliation() {
        let el: Element =
            "<roster xmlns='urn:xmpp:dmuc:0'><item affiliation='king' name='A'/></roster>"
                .parse()
                .unwrap();
        assert!(Roster::try_from(el).is_err());
    }

    #[test]
    fn missing_name() {
        let el: Element = "<roster xmlns='urn:xmpp:dmuc:0'><item affiliation='none'/></roster>"
            .parse()
            .unwrap();
        assert!(Roster::try_from(el).is_err());
    }
}
