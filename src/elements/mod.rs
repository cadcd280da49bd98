//! Typed DMUC3 protocol elements, in the style of xmpp-parsers: `#[derive(FromXml, AsXml)]`
//! structs that convert with `TryFrom<minidom::Element>` and `Into<minidom::Element>`.
//!
//! - [`Dmuc`]: `<dmuc xmlns='http://tridsys.com/protocol/dmuc' from='mirror'/>`, the marker on a join
//!   that a mirror forwards;
//! - [`Config`]: `<config xmlns='urn:xmpp:dmuc:0'>` carrying the room's muc#roomconfig form;
//! - [`Roster`] and [`RosterItem`]: `<roster xmlns='urn:xmpp:dmuc:0'>`, the occupants;
//! - [`Room`]: `<room xmlns='urn:xmpp:dmuc:0' id='room'>` wrapping a XEP-0045 `<history/>` request;
//! - [`HistoryResult`]: `<history xmlns='http://jabber.org/protocol/muc'>` wrapping the messages.

mod config;
mod dmuc;
mod history;
mod roster;

pub use config::{Config, Whois};
pub use dmuc::Dmuc;
pub use history::{HistoryResult, Room};
pub use roster::{Roster, RosterAffiliation, RosterItem, WITHHELD};
pub use xmpp_parsers::muc::muc::History;
pub use xmpp_parsers::muc::user::{Affiliation, Role};
