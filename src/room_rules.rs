//! What the master's MUC does where XEP-0045 leaves the choice to the implementation, as the
//! master tells its mirrors, so that a mirror's replica answers its users as the room would.
//!
//! The master puts the rules its host follows in the config form it sends each mirror: a hidden
//! field `urn:xmpp:dmuc:0#rules`, one value per rule that differs from XEP-0045's suggestion.
//! A master that sends no field (an older one, or one whose host follows every suggestion)
//! means the defaults.
//!
//! - `no-probe-answers`: the room ignores a presence probe to an occupant JID (ejabberd). By
//!   default the room answers with the occupant's current presence (Prosody, XEP-0045 §7.2.3's
//!   "the service SHOULD" for presence it has).

use minidom::Element;

use crate::ns;
use crate::stanza;

/// The config form field carrying the rules.
pub const RULES_FIELD: &str = "urn:xmpp:dmuc:0#rules";

const NO_PROBE_ANSWERS: &str = "no-probe-answers";

/// The host's rules, where hosts differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RoomRules {
    /// Does the room answer a presence probe to an occupant JID?
    pub answers_probes: bool,
}

impl Default for RoomRules {
    /// XEP-0045's suggestions (what Prosody does).
    fn default() -> Self {
        RoomRules {
            answers_probes: true,
        }
    }
}

impl RoomRules {
    fn values(&self) -> Vec<&'static str> {
        let mut v = Vec::new();
        if !self.answers_probes {
            v.push(NO_PROBE_ANSWERS);
        }
        v
    }

    /// The form as the master sends it: any rules field removed (it is the engine's to set),
    /// then these rules added where they differ from the defaults.
    pub fn sign(&self, form: &Element) -> Element {
        let mut out = form.clone();
        for node in out.take_nodes() {
            let ours = node.as_element().is_some_and(|c| {
                c.is("field", ns::DATA_FORMS) && c.attr("var") == Some(RULES_FIELD)
            });
            if !ours {
                out.append_node(node);
            }
        }
        let values = self.values();
        if !values.is_empty() {
            let mut f = Element::builder("field", ns::DATA_FORMS).build();
            stanza::set_attr(&mut f, "var", RULES_FIELD);
            stanza::set_attr(&mut f, "type", "hidden");
            for value in values {
                let mut v = Element::builder("value", ns::DATA_FORMS).build();
                v.append_text_node(value);
                f.append_child(v);
            }
            out.append_child(f);
        }
        out
    }

    /// The rules a master's config form states (the mirror side). Unknown values are ignored:
    /// a newer master may state rules this mirror does not follow yet.
    pub fn of(form: &Element) -> RoomRules {
        let mut rules = RoomRules::default();
        let values = form
            .children()
            .filter(|f| f.is("field", ns::DATA_FORMS) && f.attr("var") == Some(RULES_FIELD))
            .flat_map(|f| f.children().filter(|v| v.is("value", ns::DATA_FORMS)))
            .map(|v| v.text());
        for value in values {
            if value.trim() == NO_PROBE_ANSWERS {
                rules.answers_probes = false;
            }
        }
        rules
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn form(xml: &str) -> Element {
        xml.parse().unwrap()
    }

    #[test]
    fn defaults_add_nothing_and_drop_a_forged_field() {
        let f = form(&format!(
            "<x xmlns='jabber:x:data' type='form'>\
             <field var='muc#roomconfig_roomname'><value>R</value></field>\
             <field var='{RULES_FIELD}' type='hidden'><value>{NO_PROBE_ANSWERS}</value></field></x>"
        ));
        let signed = RoomRules::default().sign(&f);
        assert_eq!(
            stanza::serialize(&signed),
            "<x xmlns='jabber:x:data' type='form'>\
             <field var='muc#roomconfig_roomname'><value>R</value></field></x>"
        );
        assert_eq!(RoomRules::of(&signed), RoomRules::default());
    }

    #[test]
    fn a_rule_round_trips() {
        let f = form("<x xmlns='jabber:x:data' type='form'/>");
        let rules = RoomRules {
            answers_probes: false,
        };
        let signed = rules.sign(&f);
        assert_eq!(
            stanza::serialize(&signed),
            format!(
                "<x xmlns='jabber:x:data' type='form'>\
                 <field type='hidden' var='{RULES_FIELD}'><value>{NO_PROBE_ANSWERS}</value></field></x>"
            )
        );
        assert_eq!(RoomRules::of(&signed), rules);
    }

    #[test]
    fn unknown_rules_are_ignored() {
        let f = form(&format!(
            "<x xmlns='jabber:x:data'><field var='{RULES_FIELD}'><value>later</value></field></x>"
        ));
        assert_eq!(RoomRules::of(&f), RoomRules::default());
    }
}
