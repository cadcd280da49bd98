//! `<config xmlns='urn:xmpp:dmuc:0'>`: the room configuration the master sends a new mirror.
//!
//! The form is kept as the element the master sent (hosts add fields of their own, and a mirror
//! must not refuse a room because one of them is unusual); the one setting the mirror enforces,
//! `muc#roomconfig_whois`, is read from it by [`Config::whois`].

use minidom::Element;
use xso::{AsXml, FromXml};

use crate::ns;

/// The room configuration, a `jabber:x:data` form of type `form` or `result`.
#[derive(FromXml, AsXml, Debug, Clone, PartialEq)]
#[xml(namespace = ns::DMUC0, name = "config")]
pub struct Config {
    /// The muc#roomconfig form.
    #[xml(element)]
    pub form: Element,
}

/// Who may see occupants' real JIDs (`muc#roomconfig_whois`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Whois {
    /// Non-anonymous room: everyone.
    Anyone,
    /// Semi-anonymous room (the XEP-0045 default): moderators only.
    #[default]
    Moderators,
}

impl Config {
    /// Wrap a data form.
    pub fn new(form: Element) -> Self {
        Config { form }
    }

    /// The value of field `var`, if the form has it.
    pub fn field(&self, var: &str) -> Option<String> {
        self.form
            .children()
            .find(|f| f.is("field", ns::DATA_FORMS) && f.attr("var") == Some(var))
            .and_then(|f| f.get_child("value", ns::DATA_FORMS))
            .map(|v| v.text())
    }

    /// The whois rule; a missing or unknown value is the XEP-0045 default, moderators.
    pub fn whois(&self) -> Whois {
        match self.field("muc#roomconfig_whois").as_deref().map(str::trim) {
            Some("anyone") => Whois::Anyone,
            _ => Whois::Moderators,
        }
    }

    /// Is the form a data form at all?
    pub fn is_data_form(&self) -> bool {
        self.form.is("x", ns::DATA_FORMS)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whois_from_form() {
        let el: Element = "<config xmlns='urn:xmpp:dmuc:0'><x xmlns='jabber:x:data' type='form'>\
            <field type='hidden' var='FORM_TYPE'><value>http://jabber.org/protocol/muc#roomconfig</value></field>\
            <field type='list-single' var='muc#roomconfig_whois'><value>anyone</value></field>\
            </x></config>"
            .parse()
            .unwrap();
        let c = Config::try_from(el.clone()).unwrap();
        assert!(c.is_data_form());
        assert_eq!(c.whois(), Whois::Anyone);
        assert_eq!(
            c.field("FORM_TYPE").as_deref(),
            Some("http://jabber.org/protocol/muc#roomconfig")
        );
        assert_eq!(Element::from(c), el);
    }

    #[test]
    fn whois_defaults_to_moderators() {
        let el: Element =
            "<config xmlns='urn:xmpp:dmuc:0'><x xmlns='jabber:x:data' type='form'/></config>"
                .parse()
                .unwrap();
        assert_eq!(Config::try_from(el).unwrap().whois(), Whois::Moderators);
    }

    #[test]
    fn empty_config_is_an_error() {
        let el: Element = "<config xmlns='urn:xmpp:dmuc:0'/>".parse().unwrap();
        assert!(Config::try_from(el).is_err());
    }
}
