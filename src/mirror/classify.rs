//! Stanza predicates and the one-time classification of every stanza the mirror is handed.

use minidom::Element;

use crate::ns;
use crate::stanza;

/// The fingerprint of a message from the master's side: who said what, under which id.
pub(super) fn fingerprint(m: &Element) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    m.attr("from").unwrap_or_default().hash(&mut h);
    m.attr("id").unwrap_or_default().hash(&mut h);
    origin_id(m).unwrap_or_default().hash(&mut h);
    m.get_child("body", ns::JABBER_CLIENT)
        .map(|b| b.text())
        .unwrap_or_default()
        .hash(&mut h);
    h.finish()
}

/// The XEP-0359 origin-id of a message.
pub(super) fn origin_id(m: &Element) -> Option<&str> {
    m.get_child("origin-id", ns::SID).and_then(|o| o.attr("id"))
}

/// Is this the error an s2s layer sends back when it cannot deliver (a bounce)?
pub(super) fn is_bounce(el: &Element) -> bool {
    stanza::stanza_type(el) == Some("error")
        && el.get_child("error", ns::JABBER_CLIENT).is_some_and(|e| {
            e.has_child("remote-server-not-found", ns::XMPP_STANZAS)
                || e.has_child("remote-server-timeout", ns::XMPP_STANZAS)
        })
}

/// Does this leave end the occupant's stay for good (kick, ban, affiliation change, shutdown,
/// destruction), rather than the master having lost track of them?
pub(super) fn final_leave(el: &Element) -> bool {
    ["301", "307", "321", "322", "332"]
        .iter()
        .any(|c| stanza::has_status(el, c))
        || stanza::muc_user(el).is_some_and(|x| x.has_child("destroy", ns::MUC_USER))
}
