//! Every parser on the same text: the bounds scan, `stanza::parse`/`parse_within`, the typed
//! DMUC elements (on the stanza and each of its descendants, so an element wrapped in a stanza
//! is found), the config-form readers (room rules, stanza-id signal), the stanza edits both
//! roles apply, the stored-queue item, stanza-id proposals, XEP-0082 stamps and XEP-0106
//! escaping. Invariants: what parses serializes to text that parses again to the same element;
//! a queue item round-trips; `unescape_node(escape_node(s)) == s`.
#![no_main]

use dmuc::bounds::{self, Limits, MAX_DEPTH_CEILING};
use dmuc::elements::{Config, Dmuc, History, HistoryResult, Room, Roster};
use dmuc::queue::Queued;
use dmuc::room_rules::RoomRules;
use dmuc::{escape, stanza, stanza_ids, Timestamp};
use libfuzzer_sys::fuzz_target;
use minidom::Element;

const ROOM: &str = "chatroom@conference.fairfax.tridsys.com";

fn typed(el: &Element) {
    if let Ok(c) = Config::try_from(el.clone()) {
        let _ = c.whois();
        let _ = c.is_data_form();
        let _ = c.field("muc#roomconfig_whois");
        reparse(&Element::from(c));
    }
    if let Ok(d) = Dmuc::try_from(el.clone()) {
        reparse(&Element::from(d));
    }
    if let Ok(h) = History::try_from(el.clone()) {
        reparse(&Element::from(h));
    }
    if let Ok(h) = HistoryResult::try_from(el.clone()) {
        reparse(&Element::from(h));
    }
    if let Ok(r) = Room::try_from(el.clone()) {
        reparse(&Element::from(r));
    }
    if let Ok(r) = Roster::try_from(el.clone()) {
        let _ = r.withheld();
        reparse(&Element::from(r));
    }
    let _ = RoomRules::of(el);
    let _ = RoomRules::default().sign(el);
    let _ = stanza_ids::signal(el);
    let _ = stanza_ids::form_archives(el);
    let _ = stanza_ids::with_signal(el, stanza_ids::Adoption::Never, true);
    let _ = stanza_ids::proposal(el).map(stanza_ids::parse_proposal);
    let _ = stanza_ids::claims_room_id(el, ROOM);
    let _ = stanza::muc_user(el);
    let _ = stanza::muc_item(el);
    let _ = stanza::has_status(el, "110");
    let _ = stanza::dedup_key(el);
    let _ = stanza::stanza_type(el);
    let _ = dmuc::room_history::delay_stamp(el);
    let mut e = el.clone();
    stanza_ids::strip_forged(&mut e, ROOM);
    stanza::strip_real_jids(&mut e);
    stanza::strip_self_status(&mut e);
    stanza::strip_actor_jid(&mut e);
    stanza::add_status(&mut e, "110");
    let _ = stanza::take_child(&mut e, "x", dmuc::ns::MUC_USER);
    reparse(&e);
}

/// What the engine writes, it must read back: the same element.
fn reparse(el: &Element) {
    let text = stanza::serialize(el);
    let room = Limits {
        max_depth: MAX_DEPTH_CEILING + 4,
        max_size: usize::MAX,
    };
    let back = stanza::parse_within(&text, &room)
        .unwrap_or_else(|e| panic!("serialized element does not parse ({e}): {text}"));
    // A top element in no namespace (`xmlns=''`) is written without one and read back as the
    // stream's default (`jabber:client`), as a host would read it: only the namespace may differ.
    if !el.ns().is_empty() {
        assert_eq!(stanza::serialize(&back), text, "serialization is not stable");
    } else {
        assert_eq!(back.name(), el.name(), "serialization is not stable");
    }
}

fn jids(s: &str) {
    let _ = stanza::parse_jid(s);
    let _ = stanza_ids::parse_proposal(s);
    let _ = Timestamp::parse_xep0082(s);
    let _ = dmuc::queue::user_domain(s);
    let escaped = escape::escape_node(s);
    assert_eq!(escape::unescape_node(&escaped), s, "escaping does not round-trip");
    let _ = escape::unescape_node(s);
    if let Ok(j) = jid::Jid::new(s) {
        let _ = escape::jid_from_service_address(&j);
        let _ = escape::matches_address(&j, s);
        if let Ok(addr) = escape::jid_at_service(&j, "mirror.raleigh.tridsys.com") {
            let a = jid::Jid::new(&addr).expect("an address jid_at_service made parses");
            assert!(escape::matches_address(&a, &j.to_string()), "{addr} does not match {j}");
            let _ = escape::jid_from_service_address(&a);
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    for limits in [Limits::default(), Limits::CEILING, Limits { max_depth: 3, max_size: 100 }] {
        let _ = bounds::check(&text, &limits);
    }
    let _ = stanza::parse_within(&text, &Limits::default());
    if let Ok(el) = stanza::parse(&text) {
        reparse(&el);
        // The stanza and its descendants, breadth first, a bounded number.
        let mut queue = vec![&el];
        let mut seen = 0;
        while let Some(e) = queue.pop() {
            typed(e);
            seen += 1;
            if seen > 64 {
                break;
            }
            queue.extend(e.children());
        }
    }
    match Queued::from_xml(&text) {
        Ok((room, q)) => {
            let _ = q.is_message();
            let _ = q.user_domain();
            let _ = q.delayed("mirror.raleigh.tridsys.com");
            let again = q.to_xml(&room);
            let (room2, q2) = Queued::from_xml(&again)
                .unwrap_or_else(|e| panic!("a stored item does not load again ({e}): {again}"));
            assert_eq!(room, room2);
            assert_eq!(q2.to_xml(&room2), again, "a stored item changes on reload");
        }
        Err(_) => {}
    }
    // Short texts are tried as JIDs, nicks and ids, each NUL-separated part on its own.
    if text.len() < 4096 {
        jids(&text);
        for part in text.split('\0') {
            jids(part);
        }
    }
});
