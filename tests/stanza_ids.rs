//! XEP-0359 stanza-ids on a mirror user's message: the mirror proposes the id, shows it on its
//! own copies at once, and the master's archive adopts it, so that every copy (the sender's
//! echo, local peers, the master's side, other mirrors, history) carries the same
//! `<stanza-id by='room'/>`. Literal stanzas against each engine, then the in-memory world with a
//! model room that archives as mod_muc_mam does.

mod common;

use common::*;
use dmuc::master::{GroupchatVerdict, Master, MasterConfig, PresenceVerdict, TrustedMirror};
use dmuc::mirror::{Mirror, MirrorConfig, Verdict};
use dmuc::stanza_ids::Adoption;
use dmuc::Timestamp;
use minidom::Element;

const SID: &str = "urn:xmpp:sid:0";
const DMUC0: &str = "urn:xmpp:dmuc:0";
const SIGNAL: &str = "urn:xmpp:dmuc:0#stanza-ids";

/// The room's stanza-id values on a stanza (`by` = the room).
fn room_ids(el: &Element) -> Vec<String> {
    el.children()
        .filter(|c| c.is("stanza-id", SID) && c.attr("by") == Some(ROOM))
        .filter_map(|c| c.attr("id").map(str::to_string))
        .collect()
}

fn proposal(el: &Element) -> Option<String> {
    el.get_child("stanza-id", DMUC0)
        .and_then(|c| c.attr("id"))
        .map(str::to_string)
}

/// The message with `body` among `stanzas`.
fn message<'a>(stanzas: &'a [Element], body: &str) -> &'a Element {
    stanzas
        .iter()
        .find(|e| {
            e.name() == "message"
                && e.get_child("body", "jabber:client")
                    .is_some_and(|b| b.text() == body)
        })
        .unwrap_or_else(|| panic!("no message {body:?} in {stanzas:?}"))
}

fn world(adoption: Adoption) -> World {
    let mut w = World::new();
    w.master.adopt_stanza_ids(adoption);
    w.master.room.archiving = true;
    w
}

// ---- the master engine, literal stanzas ----

const WAYNE: &str = "wayne@raleigh.tridsys.com/pc";
const NOW: Timestamp = Timestamp(1_700_000_000_000);

fn master_with_wayne(adoption: Adoption) -> Master {
    master_with(adoption, false)
}

fn master_with(adoption: Adoption, archived_element: bool) -> Master {
    let mut m = Master::new(MasterConfig {
        trusted_mirrors: vec![TrustedMirror::new(A_MIRROR)],
        stanza_ids: adoption,
        archived_element,
        ..MasterConfig::default()
    });
    let join = format!(
        "<presence from='{WAYNE}' to='{ROOM}/Wayne'><x xmlns='http://jabber.org/protocol/muc'/>\
         <dmuc xmlns='http://tridsys.com/protocol/dmuc' from='{A_MIRROR}'/></presence>"
    );
    assert!(matches!(
        m.handle_presence(NOW, &join, Some("Wayne")).unwrap(),
        PresenceVerdict::MirrorJoin { .. }
    ));
    while m.poll_transmit().is_some() {}
    m
}

fn proposed(from: &str, id: &str, extra: &str) -> String {
    format!(
        "<message from='{from}' to='{ROOM}' type='groupchat' id='m-{id}'><body>hi</body>\
         <origin-id xmlns='urn:xmpp:sid:0' id='o-{id}'/>{extra}\
         <stanza-id xmlns='urn:xmpp:dmuc:0' id='{id}'/></message>"
    )
}

fn adopted(v: GroupchatVerdict) -> Option<String> {
    match v {
        GroupchatVerdict::Broadcast { stanza_id } => stanza_id,
        GroupchatVerdict::Duplicate => panic!("not a duplicate"),
    }
}

#[test]
fn master_adopts_a_mirror_users_proposal() {
    let mut m = master_with_wayne(Adoption::Any);
    let v = m
        .handle_groupchat(NOW, &proposed(WAYNE, "1700000000000123", ""))
        .unwrap();
    assert_eq!(adopted(v).as_deref(), Some("1700000000000123"));
    // Sent again after an outage: a duplicate, as before.
    assert_eq!(
        m.handle_groupchat(NOW, &proposed(WAYNE, "1700000000000123", ""))
            .unwrap(),
        GroupchatVerdict::Duplicate
    );
}

#[test]
fn master_refuses_what_it_must_not_adopt() {
    let mut m = master_with_wayne(Adoption::Any);
    // Not digits, too long, empty.
    for bad in ["abc", "12 3", "123456789012345678901", "", "1e9"] {
        assert_eq!(
            adopted(m.handle_groupchat(NOW, &proposed(WAYNE, bad, "")).unwrap()),
            None,
            "{bad:?}"
        );
    }
    // A direct user (not behind a mirror) may not propose.
    let scott = "scott@fairfax.tridsys.com/pc";
    assert_eq!(
        adopted(
            m.handle_groupchat(NOW, &proposed(scott, "1700000000000200", ""))
                .unwrap()
        ),
        None
    );
    // A message that also claims a stanza-id of the room's: the forgery would survive on a host
    // that keeps an id it is handed (ejabberd).
    let forged = format!("<stanza-id xmlns='urn:xmpp:sid:0' by='{ROOM}' id='forged'/>");
    assert_eq!(
        adopted(
            m.handle_groupchat(NOW, &proposed(WAYNE, "1700000000000300", &forged))
                .unwrap()
        ),
        None
    );
    // An id adopted once in this room (another mirror picked the same) is not adopted again.
    assert!(adopted(
        m.handle_groupchat(NOW, &proposed(WAYNE, "1700000000000400", ""))
            .unwrap()
    )
    .is_some());
    let again = proposed(WAYNE, "1700000000000400", "").replace("o-1700000000000400", "o-other");
    assert_eq!(adopted(m.handle_groupchat(NOW, &again).unwrap()), None);
}

#[test]
fn master_that_cannot_adopt_ignores_proposals() {
    let mut m = master_with_wayne(Adoption::Never);
    assert_eq!(
        adopted(
            m.handle_groupchat(NOW, &proposed(WAYNE, "1700000000000123", ""))
                .unwrap()
        ),
        None
    );
}

/// ejabberd's ids are timestamps that order its archive: only a proposal near now is adopted.
#[test]
fn timestamp_archive_adopts_only_near_now() {
    let mut m = master_with_wayne(Adoption::Within { max_skew_ms: 5_000 });
    let at = |ms: u64| (ms * 1000 + 7).to_string();
    assert!(adopted(
        m.handle_groupchat(NOW, &proposed(WAYNE, &at(NOW.0 - 4_000), ""))
            .unwrap()
    )
    .is_some());
    assert!(adopted(
        m.handle_groupchat(NOW, &proposed(WAYNE, &at(NOW.0 + 4_000), ""))
            .unwrap()
    )
    .is_some());
    // A message that waited out an outage, and one from a clock far ahead.
    for ms in [NOW.0 - 60_000, NOW.0 + 6_000] {
        assert_eq!(
            adopted(
                m.handle_groupchat(NOW, &proposed(WAYNE, &at(ms), ""))
                    .unwrap()
            ),
            None
        );
    }
}

/// The master tells each mirror whether the room adopts: a hidden field in the config it sends,
/// only when the room's form says it archives and the host can adopt.
#[test]
fn config_carries_the_signal_only_when_the_room_archives() {
    let form = |archiving: &str| {
        format!(
            "<x xmlns='jabber:x:data' type='form'>\
             <field var='FORM_TYPE' type='hidden'><value>http://jabber.org/protocol/muc#roomconfig</value></field>\
             <field var='muc#roomconfig_enablearchiving' type='boolean' label='Enable archiving?'><value>{archiving}</value></field>\
             </x>"
        )
    };
    let signal_of = |adoption: Adoption, archiving: &str| {
        // ejabberd's settings: timestamps, and the legacy <archived/>.
        let ejabberd = matches!(adoption, Adoption::Within { .. });
        let mut m = master_with(adoption, ejabberd);
        m.handle_snapshot(NOW, ROOM, A_MIRROR, "Wayne", &form(archiving), &[])
            .unwrap();
        let config = m
            .poll_transmit()
            .map(|x| common::xml::parse(&x))
            .expect("the config IQ");
        let x = config
            .get_child("config", DMUC0)
            .and_then(|c| c.get_child("x", "jabber:x:data"))
            .expect("a form")
            .clone();
        x.children()
            .find(|f| f.attr("var") == Some(SIGNAL))
            .map(|f| f.children().map(|v| v.text()).collect::<Vec<_>>().join(" "))
    };
    assert_eq!(signal_of(Adoption::Any, "1").as_deref(), Some("any"));
    assert_eq!(
        signal_of(Adoption::Within { max_skew_ms: 5_000 }, "1").as_deref(),
        Some("fresh archived")
    );
    assert_eq!(signal_of(Adoption::Any, "0"), None);
    assert_eq!(signal_of(Adoption::Never, "1"), None);
}

// ---- the mirror engine, literal stanzas ----

fn synced_mirror(signal: &[&str]) -> Mirror {
    let mut m = Mirror::new(MirrorConfig::new(A_MIRROR, vec![MUC_SERVICE.into()]));
    let keith = "keith@raleigh.tridsys.com/pc";
    for (user, nick) in [(WAYNE, "Wayne"), (keith, "Keith")] {
        let join = format!(
            "<presence from='{user}' to='{ROOM}/{nick}'><x xmlns='http://jabber.org/protocol/muc'/></presence>"
        );
        assert_eq!(m.handle_local(NOW, &join).unwrap(), Verdict::Consumed);
    }
    let field = if signal.is_empty() {
        String::new()
    } else {
        let values: String = signal
            .iter()
            .map(|v| format!("<value>{v}</value>"))
            .collect();
        format!("<field var='{SIGNAL}' type='hidden'>{values}</field>")
    };
    let remote = [
        format!(
            "<iq from='{ROOM}/Wayne' to='{A_MIRROR}' id='c1' type='set'><config xmlns='urn:xmpp:dmuc:0'>\
             <x xmlns='jabber:x:data' type='form'>{field}</x></config></iq>"
        ),
        format!(
            "<iq from='{ROOM}' to='{A_MIRROR}' id='r1' type='set'><roster xmlns='urn:xmpp:dmuc:0'/></iq>"
        ),
    ];
    for x in &remote {
        m.handle_remote(NOW, x).unwrap();
    }
    let history_iq = std::iter::from_fn(|| m.poll_transmit())
        .map(|x| common::xml::parse(&x))
        .find(|e| e.name() == "iq" && e.get_child("room", DMUC0).is_some())
        .expect("a history request");
    let id = history_iq.attr("id").unwrap();
    m.handle_remote(
        NOW,
        &format!(
            "<iq from='{ROOM}' to='{A_MIRROR}' id='{id}' type='result'>\
             <history xmlns='http://jabber.org/protocol/muc'/></iq>"
        ),
    )
    .unwrap();
    for (user, nick) in [(WAYNE, "Wayne"), (keith, "Keith")] {
        let echo = format!(
            "<presence from='{ROOM}/{nick}' to='{A_MIRROR}'>\
             <x xmlns='http://jabber.org/protocol/muc#user'><item affiliation='none' role='participant' jid='{user}'/>\
             <status code='110'/></x></presence>"
        );
        m.handle_remote(NOW, &echo).unwrap();
    }
    while m.poll_transmit().is_some() {}
    m
}

fn say(m: &mut Mirror, now: Timestamp, body: &str, extra: &str) -> Vec<Element> {
    let msg = format!(
        "<message from='{WAYNE}' to='{ROOM}' type='groupchat' id='w1'><body>{body}</body>{extra}</message>"
    );
    assert_eq!(m.handle_local(now, &msg).unwrap(), Verdict::Consumed);
    std::iter::from_fn(|| m.poll_transmit())
        .map(|x| common::xml::parse(&x))
        .collect()
}

#[test]
fn mirror_stamps_its_copies_and_proposes_the_same_id() {
    let mut m = synced_mirror(&["any"]);
    let out = say(&mut m, NOW, "hello", "");
    let to = |who: &str| {
        out.iter()
            .find(|e| e.attr("to") == Some(who))
            .unwrap_or_else(|| panic!("nothing to {who}: {out:?}"))
    };
    let echo = to(WAYNE);
    let peer = to("keith@raleigh.tridsys.com/pc");
    let master = to(ROOM);
    let p = proposal(master).expect("a proposal to the master");
    assert_eq!(
        p.parse::<u64>().unwrap() / 1000,
        NOW.0,
        "microseconds near now"
    );
    assert_eq!(room_ids(echo), vec![p.clone()]);
    assert_eq!(room_ids(peer), vec![p.clone()]);
    assert!(
        room_ids(master).is_empty(),
        "the room's own would be stripped as a forgery"
    );
    assert_eq!(proposal(echo), None, "the proposal is for the master");
    assert!(
        echo.get_child("archived", "urn:xmpp:mam:tmp").is_none(),
        "not told to"
    );
    // The next message gets another id.
    let out = say(&mut m, NOW, "again", "");
    let next = out.iter().find(|e| e.attr("to") == Some(ROOM)).unwrap();
    assert!(proposal(next).unwrap().parse::<u64>().unwrap() > p.parse::<u64>().unwrap());
}

/// ejabberd's room also adds the legacy `<archived/>`, with the same id: so does the mirror.
#[test]
fn mirror_adds_the_legacy_archived_when_told() {
    let mut m = synced_mirror(&["fresh", "archived"]);
    let out = say(&mut m, NOW, "hello", "");
    let master = out.iter().find(|e| e.attr("to") == Some(ROOM)).unwrap();
    let p = proposal(master).unwrap();
    for e in out.iter().filter(|e| e.attr("to") != Some(ROOM)) {
        let archived = e
            .get_child("archived", "urn:xmpp:mam:tmp")
            .expect("archived");
        assert_eq!(archived.attr("by"), Some(ROOM));
        assert_eq!(archived.attr("id"), Some(p.as_str()));
        assert_eq!(room_ids(e), vec![p.clone()]);
    }
}

#[test]
fn mirror_strips_what_a_client_forged() {
    let mut m = synced_mirror(&["any"]);
    let forged = format!(
        "<stanza-id xmlns='urn:xmpp:sid:0' by='{ROOM}' id='forged'/>\
         <archived xmlns='urn:xmpp:mam:tmp' by='{ROOM}' id='forged'/>\
         <stanza-id xmlns='urn:xmpp:sid:0' by='wayne@raleigh.tridsys.com' id='own-archive'/>\
         <stanza-id xmlns='urn:xmpp:dmuc:0' id='999'/>"
    );
    let out = say(&mut m, NOW, "sneaky", &forged);
    for e in &out {
        assert!(!room_ids(e).contains(&"forged".to_string()), "{e:?}");
        assert!(
            e.get_child("archived", "urn:xmpp:mam:tmp").is_none(),
            "{e:?}"
        );
        assert_ne!(proposal(e).as_deref(), Some("999"));
    }
    let echo = out.iter().find(|e| e.attr("to") == Some(WAYNE)).unwrap();
    assert_eq!(room_ids(echo).len(), 1);
    // Someone else's stanza-id (the sender's own archive) is not the room's to strip.
    assert!(echo
        .children()
        .any(|c| c.is("stanza-id", SID) && c.attr("id") == Some("own-archive")));
}

#[test]
fn mirror_stamps_nothing_unless_the_master_said_so() {
    let mut m = synced_mirror(&[]);
    for e in say(&mut m, NOW, "plain", "") {
        assert!(room_ids(&e).is_empty() && proposal(&e).is_none(), "{e:?}");
    }
    // Not history (a chat state alone): nothing to archive, nothing to stamp.
    let mut m = synced_mirror(&["any"]);
    let msg = format!(
        "<message from='{WAYNE}' to='{ROOM}' type='groupchat'>\
         <composing xmlns='http://jabber.org/protocol/chatstates'/></message>"
    );
    m.handle_local(NOW, &msg).unwrap();
    for x in std::iter::from_fn(|| m.poll_transmit()) {
        let e = common::xml::parse(&x);
        assert!(room_ids(&e).is_empty() && proposal(&e).is_none(), "{e:?}");
    }
}

/// A queued message keeps its proposal in storage, through a restart (the stored item is the
/// stanza as the master gets it); an item stored by an older version has none and is sent as is.
#[test]
fn queued_message_keeps_its_proposal_through_a_restart() {
    let mut m = synced_mirror(&["any"]);
    m.handle_link(NOW, MUC_SERVICE, false);
    while m.poll_transmit().is_some() {}
    let out = say(&mut m, NOW, "while down", "");
    let echo = out.iter().find(|e| e.attr("to") == Some(WAYNE)).unwrap();
    let shown = room_ids(echo);
    assert_eq!(shown.len(), 1, "stamped at once, queued for later");
    let items = m.export_queue();
    assert_eq!(items.len(), 1);
    let (_, q) = dmuc::queue::Queued::from_xml(&items[0]).unwrap();
    assert_eq!(proposal(&q.stanza), Some(shown[0].clone()));
    // An item from before stanza-ids: it imports, without a proposal.
    let old = format!(
        "<queued xmlns='urn:xmpp:dmuc:queue:0' room='{ROOM}' user='{WAYNE}' nick='Wayne' at='{}'>\
         <message xmlns='jabber:client' from='{WAYNE}' to='{ROOM}' type='groupchat' id='old'><body>old</body></message></queued>",
        NOW.0
    );
    let (_, q) = dmuc::queue::Queued::from_xml(&old).unwrap();
    assert_eq!(proposal(&q.stanza), None);
}

/// A master whose archive orders by time adopts no proposal that waited in the queue, so the
/// mirror does not stamp a message it cannot send at once.
#[test]
fn fresh_only_while_the_message_goes_at_once() {
    let mut m = synced_mirror(&["fresh"]);
    let out = say(&mut m, NOW, "live", "");
    assert!(out.iter().any(|e| proposal(e).is_some()));
    m.handle_link(NOW, MUC_SERVICE, false);
    while m.poll_transmit().is_some() {}
    for e in say(&mut m, NOW, "queued", "") {
        assert!(room_ids(&e).is_empty(), "{e:?}");
    }
    let items = m.export_queue();
    let (_, q) = dmuc::queue::Queued::from_xml(items.last().unwrap()).unwrap();
    assert_eq!(proposal(&q.stanza), None);
}

// ---- the whole exchange, in the in-memory world ----

/// Everyone sees the same id: the sender's echo and a peer at the mirror (at once), the master's
/// side and another mirror (from the room's broadcast), the archive, and later joiners' history
/// both direct and through the mirror.
#[test]
fn every_copy_carries_the_same_id() {
    let mut w = world(Adoption::Any);
    let scott = user(Side::Master, "scott");
    let wayne = user(Side::A, "wayne");
    let keith = user(Side::A, "keith");
    let ann = user(Side::B, "ann");
    w.join(&scott, "Scott");
    w.join(&wayne, "Wayne");
    w.join(&keith, "Keith");
    w.join(&ann, "Ann");
    w.clear_inboxes();
    let mark = w.mark(Side::A);
    w.say(&wayne, "one id for all");
    let id = {
        let ids = room_ids(message(w.inbox(&wayne), "one id for all"));
        assert_eq!(ids.len(), 1, "{:?}", w.inbox(&wayne));
        ids[0].clone()
    };
    for who in [&keith, &scott, &ann] {
        assert_eq!(
            room_ids(message(w.inbox(who), "one id for all")),
            vec![id.clone()],
            "{who}"
        );
        assert_eq!(proposal(message(w.inbox(who), "one id for all")), None);
    }
    let sent = w.link(Side::A).since(mark, Dir::ToMaster);
    assert_eq!(proposal(message(&sent, "one id for all")), Some(id.clone()));
    let received = w.link(Side::A).since(mark, Dir::ToMirror);
    assert!(
        !received
            .iter()
            .any(|e| e.name() == "message" && !e.has_child("ack", "urn:xmpp:dmuc:0")),
        "the room's broadcast is not echoed to its mirror (only acknowledged): {received:?}"
    );
    assert_eq!(w.master.room.archive.len(), 1);
    assert_eq!(w.master.room.archive[0].0, id);

    // A master-side message keeps the room's own id, and the mirror passes it on.
    w.say(&scott, "from the room");
    let theirs = room_ids(message(w.inbox(&wayne), "from the room"));
    assert_eq!(theirs, ["model-2"]);

    // Later joiners: direct, and through the mirror (served from the mirror's history).
    let kevin = user(Side::Master, "kevin");
    let bob = user(Side::A, "bob");
    w.join(&kevin, "Kevin");
    w.join(&bob, "Bob");
    for who in [&kevin, &bob] {
        let m = message(w.inbox(who), "one id for all");
        assert!(xml::is_delayed(m), "{who}: history");
        assert_eq!(room_ids(m), vec![id.clone()], "{who}");
    }
}

/// Without an archive (or a master that cannot adopt), nobody gets an id and nothing more
/// crosses the link.
#[test]
fn no_archive_no_ids() {
    for (adoption, archiving) in [(Adoption::Any, false), (Adoption::Never, true)] {
        let mut w = World::new();
        w.master.adopt_stanza_ids(adoption);
        w.master.room.archiving = archiving;
        let scott = user(Side::Master, "scott");
        let wayne = user(Side::A, "wayne");
        w.join(&scott, "Scott");
        w.join(&wayne, "Wayne");
        let mark = w.mark(Side::A);
        w.say(&wayne, "unarchived");
        assert!(room_ids(message(w.inbox(&wayne), "unarchived")).is_empty());
        let sent = w.link(Side::A).since(mark, Dir::ToMaster);
        assert_eq!(proposal(message(&sent, "unarchived")), None);
        let scotts = room_ids(message(w.inbox(&scott), "unarchived"));
        if archiving {
            assert_eq!(scotts, ["model-1"], "the archive's own id");
        } else {
            assert!(scotts.is_empty());
        }
    }
}

/// A message queued during an outage goes with its proposal; the archive adopts it when the
/// link returns (Prosody's keys are opaque: any age will do).
#[test]
fn queued_message_is_adopted_when_the_link_returns() {
    let mut w = world(Adoption::Any);
    let scott = user(Side::Master, "scott");
    let wayne = user(Side::A, "wayne");
    w.join(&scott, "Scott");
    w.join(&wayne, "Wayne");
    w.cut(Side::A);
    w.advance(60_000);
    w.say(&wayne, "said while down");
    let shown = room_ids(message(w.inbox(&wayne), "said while down"));
    assert_eq!(shown.len(), 1);
    w.restore(Side::A);
    w.settle();
    let at_master = message(w.inbox(&scott), "said while down");
    assert_eq!(room_ids(at_master), shown);
    assert!(w.master.room.archive.iter().any(|(id, _)| *id == shown[0]));
}
