//! The master's acknowledgement of a message from an occupant behind a mirror.
//!
//! Plain MUC echoes a message to its sender; the master does not echo it to the sender's mirror,
//! which showed it to its users already. It sends the mirror this instead, as soon as the room
//! takes the message (or drops it as a second copy):
//!
//! ```xml
//! <message from='chatroom@conference.fairfax.localhost' to='mirror.raleigh.localhost'>
//!   <ack xmlns='urn:xmpp:dmuc:0' id='dmuc-18c1f0b2a40-7'/>
//! </message>
//! ```
//!
//! The `id` is the message's de-duplication key (its XEP-0359 origin-id, or the mirror's
//! `<dedup/>`). The mirror's sender domain sends its users' messages on one s2s stream, in order:
//! an acknowledged message proves that the earlier ones from that domain arrived too, and none of
//! them need a ping round (see [`crate::link`]). The acknowledgement is smaller than the echo
//! plain MUC would send.

use minidom::Element;

use crate::ns;
use crate::stanza;

/// Acknowledgements taken from one stanza, at most: more are ignored (bounded input).
pub const MAX_PER_STANZA: usize = 64;

/// The acknowledgement of the message keyed `key`, from `room` to `mirror`.
pub fn message(room: &str, mirror: &str, key: &str) -> Element {
    let mut m = Element::builder("message", ns::JABBER_CLIENT).build();
    stanza::set_attr(&mut m, "from", room);
    stanza::set_attr(&mut m, "to", mirror);
    let mut a = Element::builder("ack", ns::DMUC0).build();
    stanza::set_attr(&mut a, "id", key);
    m.append_child(a);
    m
}

/// The keys a stanza from a master acknowledges; the `<ack/>` elements are removed (they are
/// for the mirror only). Empty for anything else.
pub fn take(el: &mut Element) -> Vec<String> {
    if el.name() != "message" || !el.has_child("ack", ns::DMUC0) {
        return Vec::new();
    }
    let mut keys = Vec::new();
    while let Some(a) = el.remove_child("ack", ns::DMUC0) {
        if keys.len() < MAX_PER_STANZA {
            if let Some(id) = a.attr("id").filter(|id| !id.is_empty()) {
                keys.push(id.to_string());
            }
        }
    }
    keys
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_ack_round_trips_and_is_taken_out() {
        let m = message("r@muc.example", "mirror.example", "k-1");
        assert_eq!(
            stanza::serialize(&m),
            "<message xmlns='jabber:client' from='r@muc.example' to='mirror.example'>\
             <ack xmlns='urn:xmpp:dmuc:0' id='k-1'/></message>"
        );
        let mut back = stanza::parse(&stanza::serialize(&m)).unwrap();
        assert_eq!(take(&mut back), ["k-1"]);
        assert_eq!(back.children().count(), 0);
    }

    #[test]
    fn only_a_messages_acks_count_and_empty_ids_are_ignored() {
        let mut iq = stanza::parse(
            "<iq xmlns='jabber:client' type='result' id='x'><ack xmlns='urn:xmpp:dmuc:0' id='k'/></iq>",
        )
        .unwrap();
        assert!(take(&mut iq).is_empty());
        assert!(iq.has_child("ack", ns::DMUC0), "left alone");
        let mut m = stanza::parse(
            "<message xmlns='jabber:client'><ack xmlns='urn:xmpp:dmuc:0' id=''/>\
             <ack xmlns='urn:xmpp:dmuc:0'/><ack xmlns='urn:xmpp:dmuc:0' id='b'/>\
             <body>hi</body></message>",
        )
        .unwrap();
        assert_eq!(take(&mut m), ["b"]);
        assert_eq!(m.children().count(), 1, "the body stays");
    }
}
