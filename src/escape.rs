//! XEP-0106 (JID Escaping): the escaped addresses DMUC3 uses to route a stanza for a mirrored
//! user through the user's mirror.
//!
//! When a master refuses a join from a user behind a mirror, DMUC3 sends the error to the
//! mirror, not to the user: it is addressed to the user's full JID, escaped into the node of a
//! JID at the mirror service (`wayne@raleigh.example/pc` at `mirror.raleigh.example` is
//! `wayne\40raleigh.example\2fpc@mirror.raleigh.example`). The mirror decodes that node back to
//! the user's JID, updates its state and delivers the stanza. This file owns both directions:
//! [`escape_node`] / [`unescape_node`] on strings, and [`jid_at_service`] /
//! [`jid_from_service_address`] / [`matches_address`] on JIDs.
//!
//! The transformations are written here by hand, to the letter of XEP-0106 (version 1.1.1),
//! rather than taken from the `jid` crate: its `NodeRef::unescape` indexes past the end of a
//! node ending in `\` and panics, and the node comes from the network.
//!
//! The rules, as the XEP states them:
//!
//! - The nine characters disallowed in a localpart (space `"` `&` `'` `/` `:` `<` `>` `@`) are
//!   escaped as `\` and two lowercase hex digits (`\20` `\22` `\26` `\27` `\2f` `\3a` `\3c` `\3e`
//!   `\40`).
//! - A `\` is escaped (as `\5c`) only where it begins one of the ten escape sequences (the nine
//!   above and `\5c` itself, §4.1 rule 7, §4.3): `c:\net` escapes to `c\3a\net` but
//!   `c:\5commas` to `c\3a\5c5commas`. Elsewhere it stays as it is.
//! - Unescaping replaces only those ten sequences; partial or other sequences (`\4`, `\bar`,
//!   `\41`) are kept literally (§4.1 rule 3, §4.3). Case is significant: `\2F` is not an escape.
//!
//! With those rules, `unescape_node(&escape_node(s)) == s` for every string `s`.
//!
//! Two things to know when using the JID functions:
//!
//! - §4.1 rule 6 says an escaped localpart must not begin or end with `\20`, i.e. the unescaped
//!   text should not begin or end with a space. [`escape_node`] escapes such a space anyway (the
//!   result is a valid localpart, and dropping the space would lose information); a JID never
//!   begins with a space, and ends with one only if its resource does.
//! - A localpart goes through nodeprep, which case-folds it. [`jid_at_service`] returns the
//!   address as text with the resource's case intact
//!   (`wayne\40raleigh.example\2fTransVerse@mirror...`), but any parser on the way (the `jid`
//!   crate, the servers) folds it to `...\2ftransverse@...`, so [`jid_from_service_address`]
//!   gives resource `transverse`. A receiver that knows its users should find the exact JID
//!   with [`matches_address`], which compares the folded forms. For the same reason a resource
//!   containing an uppercase near-escape such as `\2F` decodes wrongly (folded to `\2f`, then
//!   unescaped to `/`); [`matches_address`] still matches it.

use thiserror::Error;

/// The ten XEP-0106 escapes (§3.2, §3.3): the character and the two hex digits after the `\`.
/// Lowercase only: the XEP says case is significant.
const ESCAPES: [(char, &str); 10] = [
    (' ', "20"),
    ('"', "22"),
    ('&', "26"),
    ('\'', "27"),
    ('/', "2f"),
    (':', "3a"),
    ('<', "3c"),
    ('>', "3e"),
    ('@', "40"),
    ('\\', "5c"),
];

/// Why a user's JID could not be encoded as, or decoded from, an address at a service.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum EscapeError {
    /// The escaped JID is not a valid localpart (nodeprep refused it, or it is longer than 1023
    /// bytes), or the service is not a valid domain.
    #[error("cannot address '{user}' at '{service}': {source}")]
    InvalidAddress {
        /// The user's JID.
        user: String,
        /// The service it was to be addressed at.
        service: String,
        /// What the jid crate said.
        #[source]
        source: jid::Error,
    },
    /// The address has no node, so it encodes no user.
    #[error("'{0}' has no node to decode a JID from")]
    NoNode(String),
    /// The node unescapes to text that is not a valid JID.
    #[error("'{unescaped}' (the node of '{address}', unescaped) is not a valid JID: {source}")]
    InvalidJid {
        /// The address.
        address: String,
        /// Its node, unescaped.
        unescaped: String,
        /// What the jid crate said.
        #[source]
        source: jid::Error,
    },
}

/// The character escaped as `\` + `hex`, if `hex` is one of the ten escape codes.
fn unescaped_char(hex: &str) -> Option<char> {
    ESCAPES.iter().find(|(_, h)| *h == hex).map(|(c, _)| *c)
}

/// The escape code of `c`, if it is one of the ten escaped characters.
fn escape_code(c: char) -> Option<&'static str> {
    ESCAPES.iter().find(|(e, _)| *e == c).map(|(_, h)| *h)
}

/// Does `s` begin with one of the ten escape sequences (`\20` ... `\5c`)?
fn begins_escape(s: &str) -> bool {
    s.strip_prefix('\\')
        .and_then(|rest| rest.get(..2))
        .and_then(unescaped_char)
        .is_some()
}

/// Escape a string for use as a JID localpart (XEP-0106 §3.2 table, §4.1 and §4.2 rules).
///
/// The nine disallowed characters become `\20` `\22` `\26` `\27` `\2f` `\3a` `\3c` `\3e` `\40`;
/// a `\` becomes `\5c` only where it begins one of the ten escape sequences; everything else is
/// kept. A leading or trailing space is escaped too (see the module docs).
pub fn escape_node(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + s.len() / 4);
    for (i, c) in s.char_indices() {
        if c == '\\' {
            if begins_escape(&s[i..]) {
                out.push_str("\\5c");
            } else {
                out.push('\\');
            }
        } else if let Some(hex) = escape_code(c) {
            out.push('\\');
            out.push_str(hex);
        } else {
            out.push(c);
        }
    }
    out
}

/// Reverse of [`escape_node`] (XEP-0106 §3.3 table, §4.1 rule 3, §4.3).
///
/// Never panics: a `\` that does not begin one of the ten escape sequences (at the end of the
/// string, before `4`, before `X`, before uppercase `2F`, before a non-ASCII character...) is
/// kept literally, as the XEP requires.
pub fn unescape_node(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(pos) = rest.find('\\') {
        out.push_str(&rest[..pos]);
        let after = &rest[pos + 1..];
        match after.get(..2).and_then(unescaped_char) {
            Some(c) => {
                out.push(c);
                // The two bytes just matched are ASCII hex digits, so this is a char boundary.
                rest = after.get(2..).unwrap_or_default();
            }
            None => {
                out.push('\\');
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

/// Encode a full or bare user JID as an address at `service` (e.g. `mirror.raleigh.localhost`):
/// `escape_node(user)@service`, e.g.
/// `wayne\40raleigh.localhost\2fTransVerse@mirror.raleigh.localhost`.
///
/// Returned as text, not as a [`jid::BareJid`]: parsing it would nodeprep the node and fold the
/// resource's case (see the module docs), and the text as DMUC3 writes it keeps that case for
/// whoever does not fold. The node is checked to pass nodeprep and the domain is normalised.
/// Fails if the escaped JID is not a valid localpart (longer than 1023 bytes, or refused by
/// nodeprep's bidi rules) or `service` is not a valid domain.
pub fn jid_at_service(user: &jid::Jid, service: &str) -> Result<String, EscapeError> {
    let invalid = |source| EscapeError::InvalidAddress {
        user: user.to_string(),
        service: service.to_string(),
        source,
    };
    let escaped = escape_node(user.as_str());
    if escaped.len() > 1023 {
        return Err(invalid(jid::Error::NodeTooLong));
    }
    jid::NodePart::new(&escaped).map_err(invalid)?;
    let domain = jid::DomainPart::new(service).map_err(invalid)?;
    Ok(format!("{escaped}@{domain}"))
}

/// Is `addr` (an address at a service, as parsed, hence nodeprepped) the address of `user`?
/// Compares nodeprepped escaped nodes, so a resource whose case was folded on the way still
/// matches: `wayne\40raleigh.localhost\2ftransverse@mirror...` matches
/// `wayne@raleigh.localhost/TransVerse`. The address's domain and resource are not compared.
pub fn matches_address(addr: &jid::Jid, user: &str) -> bool {
    let Some(node) = addr.node() else {
        return false;
    };
    let Ok(user) = jid::Jid::new(user) else {
        return false;
    };
    jid::NodePart::new(&escape_node(user.as_str())).is_ok_and(|n| n.as_str() == node.as_str())
}

/// Decode an address built by [`jid_at_service`] back to the user's JID: the node, unescaped.
/// The address's domain and resource are ignored; checking the domain is the caller's job.
///
/// Fails if the address has no node or the unescaped node is not a valid JID.
pub fn jid_from_service_address(addr: &jid::Jid) -> Result<jid::Jid, EscapeError> {
    let node = addr
        .node()
        .ok_or_else(|| EscapeError::NoNode(addr.to_string()))?;
    let unescaped = unescape_node(node.as_str());
    jid::Jid::new(&unescaped).map_err(|source| EscapeError::InvalidJid {
        address: addr.to_string(),
        unescaped: unescaped.clone(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// XEP-0106 §3.2 and §3.3 tables: each character and its escape.
    const TABLE: [(&str, &str); 10] = [
        (" ", r"\20"),
        ("\"", r"\22"),
        ("&", r"\26"),
        ("'", r"\27"),
        ("/", r"\2f"),
        (":", r"\3a"),
        ("<", r"\3c"),
        (">", r"\3e"),
        ("@", r"\40"),
        // A lone `\` begins no escape sequence, so it stays; `\5c` is its escape.
        (r"\5c", r"\5c5c"),
    ];

    /// XEP-0106 §5.1 table "JID Examples": (user input, escaped JID).
    const JID_EXAMPLES: [(&str, &str); 12] = [
        ("space cadet@example.com", r"space\20cadet@example.com"),
        (
            r#"call me "ishmael"@example.com"#,
            r"call\20me\20\22ishmael\22@example.com",
        ),
        ("at&t guy@example.com", r"at\26t\20guy@example.com"),
        ("d'artagnan@example.com", r"d\27artagnan@example.com"),
        ("/.fanboy@example.com", r"\2f.fanboy@example.com"),
        ("::foo::@example.com", r"\3a\3afoo\3a\3a@example.com"),
        ("<foo>@example.com", r"\3cfoo\3e@example.com"),
        ("user@host@example.com", r"user\40host@example.com"),
        (r"c:\net@example.com", r"c\3a\net@example.com"),
        (r"c:\\net@example.com", r"c\3a\\net@example.com"),
        (
            r"c:\cool stuff@example.com",
            r"c\3a\cool\20stuff@example.com",
        ),
        (r"c:\5commas@example.com", r"c\3a\5c5commas@example.com"),
    ];

    /// The other examples of XEP-0106 (§4.2, §5.2 to §5.6), node only: (source, escaped).
    const OTHER_EXAMPLES: [(&str, &str); 7] = [
        // §4.2 (and §5.5): a Wireless Village address holding escape-like sequences.
        (r"\3and\2is\5cool", r"\5c3and\2is\5c5cool"),
        // §3.3: the SMTP gateway example.
        ("tréville@musketeers.lit", r"tréville\40musketeers.lit"),
        // §5.2 to §5.4: email, SIP, IM addresses.
        (
            "here's_a_wild_&_/cr%zy/_address",
            r"here\27s_a_wild_\26_\2fcr%zy\2f_address",
        ),
        // §5.5: IMPS.
        (
            r#"here's_a_wild_&_/cr%zy/_address_for:<wv>("IMPS")"#,
            r"here\27s_a_wild_\26_\2fcr%zy\2f_address_for\3a\3cwv\3e(\22IMPS\22)",
        ),
        // §5.6: an LDAP distinguished name (`\E9` is not an escape: case is significant).
        (
            r"CN=D'Artagnan Saint-Andr\E9,O=Example & Company, Inc.,DC=example,DC=com",
            r"CN=D\27Artagnan\20Saint-Andr\E9,O=Example\20\26\20Company,\20Inc.,DC=example,DC=com",
        ),
        // §5.7: IRC.
        (
            r#"somenick!user"&'/:<>\3address"#,
            r"somenick!user\22\26\27\2f\3a\3c\3e\5c3address",
        ),
        // §3.1: the concept example.
        ("d'artagnan", r"d\27artagnan"),
    ];

    /// XEP-0106 §4.3 exceptions: not modified by escaping or unescaping.
    const UNCHANGED: [&str; 3] = [r"\2plus\2is\4", r"foo\bar", r"foob\41r"];

    fn split(jid: &str) -> (&str, &str) {
        jid.rsplit_once('@').expect("example has an @")
    }

    #[test]
    fn table_both_ways() {
        for (plain, escaped) in TABLE {
            assert_eq!(escape_node(plain), escaped, "escaping {plain}");
            assert_eq!(unescape_node(escaped), plain, "unescaping {escaped}");
        }
        assert_eq!(unescape_node(r"\5c"), r"\");
        assert_eq!(escape_node(r"\"), r"\");
    }

    #[test]
    fn jid_examples_both_ways() {
        for (input, escaped) in JID_EXAMPLES {
            let (node, domain) = split(input);
            assert_eq!(
                format!("{}@{domain}", escape_node(node)),
                escaped,
                "escaping {input}"
            );
            let (enode, edomain) = split(escaped);
            assert_eq!(
                format!("{}@{edomain}", unescape_node(enode)),
                input,
                "unescaping {escaped}"
            );
            // XEP-0106 §2 requirement 2: an escaped JID is a valid JID (and these are already
            // in nodeprep's normal form).
            assert_eq!(jid::BareJid::new(escaped).unwrap().as_str(), escaped);
        }
    }

    #[test]
    fn other_examples_both_ways() {
        for (plain, escaped) in OTHER_EXAMPLES {
            assert_eq!(escape_node(plain), escaped, "escaping {plain}");
            assert_eq!(unescape_node(escaped), plain, "unescaping {escaped}");
        }
    }

    #[test]
    fn exceptions_unchanged() {
        for s in UNCHANGED {
            assert_eq!(escape_node(s), s);
            assert_eq!(unescape_node(s), s);
        }
    }

    #[test]
    fn case_is_significant() {
        assert_eq!(unescape_node(r"a\2Fb\3A\40"), r"a\2Fb\3A@");
        assert_eq!(escape_node(r"a\2Fb"), r"a\2Fb");
        assert_eq!(escape_node(r"a\2fb"), r"a\5c2fb");
    }

    #[test]
    fn leading_and_trailing_spaces_escaped() {
        assert_eq!(escape_node(" x "), r"\20x\20");
        assert_eq!(unescape_node(r"\20x\20"), " x ");
        assert!(jid::BareJid::new(r"\20x\20@example.com").is_ok());
    }

    #[test]
    fn unescape_never_panics_on_odd_input() {
        let cases = [
            ("", ""),
            (r"\", r"\"),
            (r"a\", r"a\"),
            (r"\\", r"\\"),
            (r"\X", r"\X"),
            (r"\4", r"\4"),
            (r"a\4", r"a\4"),
            (r"\5", r"\5"),
            (r"\5c", r"\"),
            (r"\5c\", r"\\"),
            (r"\\5c", r"\\"),
            (r"\40\", r"@\"),
            (r"\é", r"\é"),
            (r"\4é", r"\4é"),
            (r"é\", r"é\"),
            (r"\é4", r"\é4"),
            ("\\\u{10FFFF}", "\\\u{10FFFF}"),
            (r"π\40π", "π@π"),
            (r"\\\", r"\\\"),
        ];
        for (escaped, plain) in cases {
            assert_eq!(unescape_node(escaped), plain, "unescaping {escaped}");
        }
    }

    #[test]
    fn non_ascii_kept() {
        for s in ["fußball", "π", "δοκιμή", "我買", "tréville"] {
            assert_eq!(escape_node(s), s);
            assert_eq!(unescape_node(s), s);
        }
    }

    #[test]
    fn dmuc3_example() {
        let user = jid::Jid::new("wayne@raleigh.tridsys.com/TransVerse").unwrap();
        let addr = jid_at_service(&user, "mirror.raleigh.tridsys.com").unwrap();
        assert_eq!(
            addr,
            r"wayne\40raleigh.tridsys.com\2fTransVerse@mirror.raleigh.tridsys.com"
        );
        // As it arrives (parsed, hence nodeprepped): the resource is folded...
        let wire = jid::Jid::new(&addr).unwrap();
        assert_eq!(
            wire.as_str(),
            r"wayne\40raleigh.tridsys.com\2ftransverse@mirror.raleigh.tridsys.com"
        );
        assert_eq!(
            jid_from_service_address(&wire).unwrap().as_str(),
            "wayne@raleigh.tridsys.com/transverse"
        );
        // ...but still matches the user.
        assert!(matches_address(&wire, user.as_str()));
        assert!(matches_address(
            &wire,
            "wayne@raleigh.tridsys.com/TransVerse"
        ));
        assert!(matches_address(
            &wire,
            "wayne@raleigh.tridsys.com/transverse"
        ));
        assert!(!matches_address(&wire, "wayne@raleigh.tridsys.com/Other"));
        assert!(!matches_address(&wire, "wayne@raleigh.tridsys.com"));
        assert!(!matches_address(&wire, "not a jid@"));
        let no_node = jid::Jid::new("mirror.raleigh.tridsys.com").unwrap();
        assert!(!matches_address(&no_node, "mirror.raleigh.tridsys.com"));
    }

    #[test]
    fn jid_round_trips() {
        for s in [
            "wayne@raleigh.localhost/pc",
            "wayne@raleigh.localhost",
            "raleigh.localhost",
            "raleigh.localhost/admin console",
            r"d\27artagnan@musketeers.lit/elder",
            "user@host/with@and/slash and space",
            r"c\3a\5c5commas@example.com/c:\5commas",
            "fußball@example.com/π",
        ] {
            let user = jid::Jid::new(s).unwrap();
            let addr = jid_at_service(&user, "Mirror.Raleigh.Localhost.").unwrap();
            let addr = jid::Jid::new(&addr).unwrap();
            assert_eq!(addr.domain().as_str(), "mirror.raleigh.localhost");
            assert_eq!(jid_from_service_address(&addr).unwrap(), user, "{s}");
            assert!(matches_address(&addr, s), "{s}");
            // A resource on the address is ignored.
            let full = jid::Jid::new(&format!("{addr}/res")).unwrap();
            assert_eq!(jid_from_service_address(&full).unwrap(), user, "{s}");
        }
    }

    #[test]
    fn errors() {
        let no_node = jid::Jid::new("mirror.example").unwrap();
        assert_eq!(
            jid_from_service_address(&no_node),
            Err(EscapeError::NoNode("mirror.example".into()))
        );

        // `\40x` unescapes to `@x`: no node before the @.
        let bad = jid::Jid::new(r"\40x@mirror.example").unwrap();
        let err = jid_from_service_address(&bad).unwrap_err();
        assert!(matches!(
            err,
            EscapeError::InvalidJid { ref unescaped, source: jid::Error::NodeEmpty, .. }
                if unescaped == "@x"
        ));
        assert!(err.to_string().contains("'@x'"), "{err}");

        let user = jid::Jid::new("wayne@raleigh.localhost/pc").unwrap();
        let err = jid_at_service(&user, "bad domain!").unwrap_err();
        assert!(matches!(err, EscapeError::InvalidAddress { .. }), "{err:?}");

        // A resource long enough that the escaped JID overflows a localpart.
        let long = jid::Jid::new(&format!("u@h/{}", "/".repeat(400))).unwrap();
        let err = jid_at_service(&long, "mirror.example").unwrap_err();
        assert!(
            matches!(
                err,
                EscapeError::InvalidAddress {
                    source: jid::Error::NodeTooLong,
                    ..
                }
            ),
            "{err:?}"
        );
    }

    /// Strings heavy in backslashes, hex digits and escaped characters.
    fn tricky() -> impl Strategy<Value = String> {
        proptest::string::string_regex(r#"[\\ "&'/:<>@0-9a-fA-FxXé\u{1F600}]{0,24}"#)
            .expect("valid regex")
    }

    proptest! {
        #[test]
        fn round_trip_any(s in any::<String>()) {
            prop_assert_eq!(unescape_node(&escape_node(&s)), s);
        }

        #[test]
        fn round_trip_tricky(s in tricky()) {
            prop_assert_eq!(unescape_node(&escape_node(&s)), s);
        }

        #[test]
        fn escaped_has_no_disallowed_character(s in any::<String>()) {
            let escaped = escape_node(&s);
            prop_assert!(!escaped.contains([' ', '"', '&', '\'', '/', ':', '<', '>', '@']));
        }

        #[test]
        fn unescape_never_panics(s in any::<String>()) {
            let _ = unescape_node(&s);
        }

        #[test]
        fn unescape_never_panics_tricky(s in tricky()) {
            let _ = unescape_node(&s);
        }

        #[test]
        fn jid_round_trip(
            node in "[a-z0-9._-]{1,10}",
            domain in "[a-z]{1,8}\\.example",
            // Printable ASCII without uppercase: nodeprep would fold it.
            resource in "[!-@\\[-~][ -@\\[-~]{0,15}",
        ) {
            let text = format!("{node}@{domain}/{resource}");
            let user = jid::Jid::new(&text).unwrap();
            let addr = jid::Jid::new(&jid_at_service(&user, "mirror.example").unwrap()).unwrap();
            prop_assert_eq!(jid_from_service_address(&addr).unwrap(), user);
            prop_assert!(matches_address(&addr, &text));
        }
    }
}
