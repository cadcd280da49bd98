//! `<dmuc xmlns='http://tridsys.com/protocol/dmuc' from='…'/>`: the mirror's marker on a join.

use jid::Jid;
use xso::{AsXml, FromXml};

use crate::ns;

/// Added by a mirror to the join presence it forwards; `from` names the mirror service.
#[derive(FromXml, AsXml, Debug, Clone, PartialEq)]
#[xml(namespace = ns::DMUC, name = "dmuc")]
pub struct Dmuc {
    /// The mirror service that speaks for the user (e.g. `mirror.raleigh.tridsys.com`).
    #[xml(attribute)]
    pub from: Jid,
}

#[cfg(test)]
mod tests {
    use super::*;
    use minidom::Element;

    #[test]
    fn round_trip() {
        let el: Element =
            "<dmuc xmlns='http://tridsys.com/protocol/dmuc' from='mirror.raleigh.tridsys.com'/>"
                .parse()
                .unwrap();
        let d = Dmuc::try_from(el.clone()).unwrap();
        assert_eq!(d.from.as_str(), "mirror.raleigh.tridsys.com");
        assert_eq!(Element::from(d), el);
    }

    #[test]
    fn missing_from() {
        let el: Element = "<dmuc xmlns='http://tridsys.com/protocol/dmuc'/>"
            .parse()
            .unwrap();
        let err = Dmuc::try_from(el).unwrap_err();
        assert_eq!(
            err.to_string(),
            "Required attribute field 'from' on Dmuc element missing."
        );
    }

    #[test]
    fn bad_jid() {
        let el: Element = "<dmuc xmlns='http://tridsys.com/protocol/dmuc' from='@@'/>"
            .parse()
            .unwrap();
        assert!(Dmuc::try_from(el).is_err());
    }
}
