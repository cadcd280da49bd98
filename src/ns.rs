//! XML namespaces used by dmuc, in one place.

/// DMUC3: the marker a mirror adds to a join it forwards (`<dmuc from='mirror'/>`) and the disco feature.
pub const DMUC: &str = "http://tridsys.com/protocol/dmuc";
/// DMUC3: room configuration, roster and history sync between master and mirror.
pub const DMUC0: &str = "urn:xmpp:dmuc:0";
/// The default stanza namespace the host hands us (and the one we emit).
pub const JABBER_CLIENT: &str = "jabber:client";
/// XEP-0045 MUC join element and `<history/>`.
pub const MUC: &str = "http://jabber.org/protocol/muc";
/// XEP-0045 occupant information.
pub const MUC_USER: &str = "http://jabber.org/protocol/muc#user";
/// XEP-0004 data forms.
pub const DATA_FORMS: &str = "jabber:x:data";
/// XEP-0203 delayed delivery.
pub const DELAY: &str = "urn:xmpp:delay";
/// RFC 6120 stanza error conditions.
pub const XMPP_STANZAS: &str = "urn:ietf:params:xml:ns:xmpp-stanzas";
/// XEP-0030 service discovery (info).
pub const DISCO_INFO: &str = "http://jabber.org/protocol/disco#info";
/// XEP-0199 XMPP ping: the mirror's link-health probe.
pub const PING: &str = "urn:xmpp:ping";
/// XEP-0359 unique and stable stanza ids (`<origin-id/>`): the master's de-duplication key.
pub const SID: &str = "urn:xmpp:sid:0";
/// dmuc's own storage format for the mirror's outbound queue (never sent on the wire).
pub const QUEUE: &str = "urn:xmpp:dmuc:queue:0";
/// XEP-0334 message processing hints (`<store/>`, `<no-store/>`): what a room keeps as history.
pub const HINTS: &str = "urn:xmpp:hints";
/// XEP-0380 explicit message encryption: an encrypted message counts as history.
pub const EME: &str = "urn:xmpp:eme:0";
/// XEP-0333 chat markers: kept as history (Prosody's rule).
pub const CHAT_MARKERS: &str = "urn:xmpp:chat-markers:0";
/// XEP-0421 anonymous unique occupant identifiers (`<occupant-id/>`), which the room adds.
pub const OCCUPANT_ID: &str = "urn:xmpp:occupant-id:0";
/// XEP-0313 v0.2's `<archived/>`, which ejabberd's mod_mam still adds beside the stanza-id.
pub const MAM_TMP: &str = "urn:xmpp:mam:tmp";
