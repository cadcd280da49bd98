//! The mirror's outbound queue: what local users sent to a room that the master has not yet
//! confirmed receiving. An item is a groupchat message (or the leave of a user who left during an
//! outage), with its sender's nick and the time it was sent, so that it can be delivered later in
//! order, exactly once, with its original time (XEP-0203), even after the mirror restarts.
//!
//! Items are stored by the host (Prosody `module:open_store`, ejabberd Mnesia) one by one, each
//! under its sequence number (see [`crate::mirror::StoreOp`]), as XML text in dmuc's own format:
//!
//! ```xml
//! <queued xmlns='urn:xmpp:dmuc:queue:0' room='r@muc.example' user='u@example/res' nick='U'
//!         at='1700000000000' seq='42'><message .../></queued>
//! ```
//!
//! The `seq` is also the item's storage key: it orders the items when they are loaded again.
//! Items stored before per-item storage have none (they were stored in order, as one list).

use minidom::Element;

use crate::error::Error;
use crate::ns;
use crate::stanza;
use crate::time::Timestamp;

/// One item for the master.
#[derive(Debug, Clone, PartialEq)]
pub struct Queued {
    /// The sender's full JID.
    pub user: String,
    /// The sender's nick in the room.
    pub nick: String,
    /// When the user sent it.
    pub at: Timestamp,
    /// The stanza as the master gets it (`from` the user, `to` the room or occupant JID).
    pub stanza: Element,
    /// For a message sent to the master: the ping round it was sent in (see [`crate::link`]).
    pub round: u64,
    /// The item's storage key: increasing in the order items were made, across restarts. 0 for
    /// an item from an older version's store, which has none yet.
    pub seq: u64,
}

impl Queued {
    /// Is this a groupchat message (not a leave)?
    pub fn is_message(&self) -> bool {
        self.stanza.name() == "message"
    }

    /// The stanza as it is sent late: a message gets a XEP-0203 delay with the time the user
    /// sent it, unless it already carries one.
    pub fn delayed(&self, service: &str) -> Element {
        let mut el = self.stanza.clone();
        if self.is_message() && el.get_child("delay", ns::DELAY).is_none() {
            let mut d = Element::builder("delay", ns::DELAY).build();
            stanza::set_attr(&mut d, "from", service);
            stanza::set_attr(&mut d, "stamp", self.at.to_xep0082());
            el.append_child(d);
        }
        el
    }

    /// The domain of the sender's JID.
    pub fn user_domain(&self) -> &str {
        user_domain(&self.user)
    }

    /// The item in storage form, for `room`.
    pub fn to_xml(&self, room: &str) -> String {
        let mut w = Element::builder("queued", ns::QUEUE).build();
        stanza::set_attr(&mut w, "room", room);
        stanza::set_attr(&mut w, "user", &self.user);
        stanza::set_attr(&mut w, "nick", &self.nick);
        stanza::set_attr(&mut w, "at", self.at.0.to_string());
        if self.seq != 0 {
            stanza::set_attr(&mut w, "seq", self.seq.to_string());
        }
        w.append_child(self.stanza.clone());
        stanza::serialize(&w)
    }

    /// An item back from storage: `(room, item)`.
    pub fn from_xml(xml: &str) -> Result<(String, Queued), Error> {
        let w = stanza::parse(xml)?;
        if !w.is("queued", ns::QUEUE) {
            return Err(Error::UnexpectedElement {
                expected: "queued",
                got: w.name().to_string(),
            });
        }
        let attr = |name: &'static str| {
            w.attr(name)
                .map(str::to_string)
                .ok_or(Error::MissingAttribute {
                    element: "queued",
                    attribute: name,
                })
        };
        let room = attr("room")?;
        let user = attr("user")?;
        let nick = attr("nick")?;
        let at = attr("at")?
            .parse::<u64>()
            .map(Timestamp)
            .map_err(|e| Error::invalid("queued", e))?;
        let seq = match w.attr("seq") {
            Some(s) => s.parse::<u64>().map_err(|e| Error::invalid("queued", e))?,
            None => 0,
        };
        stanza::parse_jid(&user)?;
        let stanza = w
            .children()
            .find(|c| matches!(c.name(), "message" | "presence"))
            .cloned()
            .ok_or(Error::invalid("queued", "no stanza inside"))?;
        Ok((
            room,
            Queued {
                user,
                nick,
                at,
                stanza,
                round: 0,
                seq,
            },
        ))
    }
}

/// The domain part of a JID given as text.
pub fn user_domain(jid: &str) -> &str {
    let bare = jid.split('/').next().unwrap_or_default();
    bare.rsplit('@').next().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_through_storage_and_keeps_the_send_time() {
        let msg = stanza::parse(
            "<message from='wayne@raleigh.localhost/pc' to='r@conference.fairfax.localhost' \
             type='groupchat' id='m1'><body>hi</body></message>",
        )
        .unwrap();
        let q = Queued {
            user: "wayne@raleigh.localhost/pc".into(),
            nick: "Wayne".into(),
            at: Timestamp(1_700_000_000_123),
            stanza: msg,
            round: 7,
            seq: 42,
        };
        let text = q.to_xml("r@conference.fairfax.localhost");
        let (room, back) = Queued::from_xml(&text).unwrap();
        assert_eq!(room, "r@conference.fairfax.localhost");
        assert_eq!(back.round, 0, "rounds do not survive a restart");
        assert_eq!(back.seq, 42, "the storage key does");
        assert_eq!(back.stanza, q.stanza);
        assert_eq!(back.user_domain(), "raleigh.localhost");
        let late = back.delayed("mirror.raleigh.localhost");
        let delay = late.get_child("delay", ns::DELAY).unwrap();
        assert_eq!(delay.attr("stamp"), Some("2023-11-14T22:13:20.123Z"));
    }

    #[test]
    fn rejects_what_is_not_a_queued_item() {
        assert_eq!(
            Queued::from_xml("<queued xmlns='urn:xmpp:dmuc:queue:0' room='r' nick='n' at='1'><message/></queued>")
                .unwrap_err()
                .to_string(),
            "<queued/> lacks the 'user' attribute"
        );
        assert!(Queued::from_xml("<message/>").is_err());
        assert!(Queued::from_xml(
            "<queued xmlns='urn:xmpp:dmuc:queue:0' room='r' user='u@h' nick='n' at='x'><message/></queued>"
        )
        .is_err());
        assert!(Queued::from_xml(
            "<queued xmlns='urn:xmpp:dmuc:queue:0' room='r' user='u@h' nick='n' at='1' seq='-1'><message/></queued>"
        )
        .is_err());
    }
}
