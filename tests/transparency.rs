//! A user behind a mirror cannot tell the mirror from the room: leaves to the bare room JID,
//! self-pings while the link is down, the history a join asks for, and what counts as history.
//! Each case drives the in-memory world of `common` with literal stanzas.

mod common;

use common::*;
use minidom::Element;

const MUC_USER: &str = "http://jabber.org/protocol/muc#user";

fn statuses(p: &Element) -> Vec<String> {
    p.get_child("x", MUC_USER)
        .map(|x| {
            x.children()
                .filter(|c| c.name() == "status")
                .filter_map(|c| c.attr("code").map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

fn bodies(v: &[Element]) -> Vec<String> {
    v.iter()
        .filter(|e| e.name() == "message")
        .filter_map(|e| e.get_child("body", "jabber:client").map(|b| b.text()))
        .collect()
}

/// A master engine trusting mirror A, at a fixed time.
fn master() -> (dmuc::master::Master, dmuc::Timestamp) {
    use dmuc::master::{Master, MasterConfig, TrustedMirror};
    let m = Master::new(MasterConfig {
        trusted_mirrors: vec![TrustedMirror::new(A_MIRROR)],
        ..MasterConfig::default()
    });
    (m, dmuc::Timestamp(1_295_424_000_000))
}

/// `user` joins as `nick` through mirror A, as the master sees the join.
fn join_through_a(m: &mut dmuc::master::Master, now: dmuc::Timestamp, user: &str, nick: &str) {
    m.handle_presence(
        now,
        &format!(
            "<presence from='{user}' to='{ROOM}/{nick}'><x xmlns='http://jabber.org/protocol/muc'/>\
             <dmuc xmlns='http://tridsys.com/protocol/dmuc' from='{A_MIRROR}'/></presence>"
        ),
        Some(nick),
    )
    .unwrap();
}

fn leaves_of<'a>(v: &'a [Element], nick: &str) -> Vec<&'a Element> {
    let from = format!("{ROOM}/{nick}");
    v.iter()
        .filter(|e| {
            e.name() == "presence"
                && e.attr("type") == Some("unavailable")
                && e.attr("from") == Some(from.as_str())
        })
        .collect()
}

/// Prosody issue 505: an unavailable presence to the bare room JID leaves the room. Everyone
/// sees the leave; the leaver sees it with status 110.
#[test]
fn leave_to_the_bare_room_jid() {
    let mut w = World::new();
    let scott = user(Side::Master, "scott");
    let wayne = user(Side::A, "wayne");
    let keith = user(Side::A, "keith");
    w.join(&scott, "Scott");
    w.join(&wayne, "Wayne");
    w.join(&keith, "Keith");
    w.clear_inboxes();
    w.send(
        &wayne,
        &format!("<presence from='{wayne}' to='{ROOM}' type='unavailable'/>"),
    );
    for who in [&scott, &keith] {
        assert_eq!(
            leaves_of(w.inbox(who), "Wayne").len(),
            1,
            "{who}: {:?}",
            w.inbox(who)
        );
    }
    let own = leaves_of(w.inbox(&wayne), "Wayne");
    assert_eq!(own.len(), 1, "{:?}", w.inbox(&wayne));
    assert!(statuses(own[0]).contains(&"110".to_string()));
    assert_eq!(
        w.mirror(Side::A).local_occupants(ROOM).len(),
        1,
        "only Keith is left at the mirror"
    );
    assert!(!w.master.room.occupants.contains_key("Wayne"));
}

/// A bare-room unavailable from someone not in the room is not the mirror's business.
#[test]
fn bare_leave_from_a_non_occupant_passes() {
    let mut w = World::new();
    let wayne = user(Side::A, "wayne");
    let keith = user(Side::A, "keith");
    w.join(&wayne, "Wayne");
    let stanza = format!("<presence from='{keith}' to='{ROOM}' type='unavailable'/>");
    let now = w.now;
    let m = w.mirrors.get_mut(&Side::A).unwrap();
    assert_eq!(
        m.handle_local(now, &stanza).unwrap(),
        dmuc::mirror::Verdict::Pass
    );
    assert_eq!(m.local_occupants(ROOM).len(), 1);
}

/// XEP-0410 self-ping while the link is down: the user is still in the mirror's room, so the
/// mirror answers as the room would. With the link up, the master answers.
#[test]
fn self_ping_answered_by_the_mirror_while_the_link_is_down() {
    let mut w = World::new();
    let wayne = user(Side::A, "wayne");
    w.join(&wayne, "Wayne");
    let ping = format!(
        "<iq from='{wayne}' to='{ROOM}/Wayne' id='sp1' type='get'><ping xmlns='urn:xmpp:ping'/></iq>"
    );
    let now = w.now;
    assert_eq!(
        w.mirrors
            .get_mut(&Side::A)
            .unwrap()
            .handle_local(now, &ping)
            .unwrap(),
        dmuc::mirror::Verdict::Pass,
        "link up: the master answers"
    );
    w.cut(Side::A);
    w.advance(60_000);
    assert!(!w.mirror(Side::A).link_up(MUC_SERVICE));
    w.clear_inboxes();
    w.send(&wayne, &ping);
    let answers: Vec<&Element> = w
        .inbox(&wayne)
        .iter()
        .filter(|e| e.name() == "iq" && e.attr("id") == Some("sp1"))
        .collect();
    assert_eq!(answers.len(), 1, "{:?}", w.inbox(&wayne));
    assert_eq!(answers[0].attr("type"), Some("result"));
    assert_eq!(
        answers[0].attr("from"),
        Some(format!("{ROOM}/Wayne").as_str())
    );
}

/// A join through the mirror gets the history it asks for (XEP-0045 §7.2.15), not all the
/// mirror holds; without `<history/>`, the room's default.
#[test]
fn history_as_the_joiner_asked() {
    let mut w = World::new();
    let scott = user(Side::Master, "scott");
    let wayne = user(Side::A, "wayne");
    let keith = user(Side::A, "keith");
    let ann = user(Side::A, "ann");
    w.join(&scott, "Scott");
    w.join(&wayne, "Wayne");
    for i in 1..=6 {
        w.say(&scott, &format!("m{i}"));
    }
    w.clear_inboxes();
    let join = |who: &str, nick: &str, history: &str| {
        format!(
            "<presence from='{who}' to='{ROOM}/{nick}'><x xmlns='http://jabber.org/protocol/muc'>{history}</x></presence>"
        )
    };
    w.send(&keith, &join(&keith, "Keith", "<history maxstanzas='0'/>"));
    assert!(bodies(w.inbox(&keith)).is_empty(), "{:?}", w.inbox(&keith));
    w.send(&ann, &join(&ann, "Ann", "<history maxstanzas='5'/>"));
    assert_eq!(bodies(w.inbox(&ann)), ["m2", "m3", "m4", "m5", "m6"]);
}

/// Chat states alone and status notices are not history: a later joiner through the mirror
/// does not get them replayed (the room keeps only messages with a body, per Prosody's rules).
#[test]
fn only_historic_messages_are_replayed() {
    let mut w = World::new();
    let scott = user(Side::Master, "scott");
    let wayne = user(Side::A, "wayne");
    let keith = user(Side::A, "keith");
    w.join(&scott, "Scott");
    w.join(&wayne, "Wayne");
    w.say(&scott, "kept");
    w.send(
        &scott,
        &format!("<message from='{scott}' to='{ROOM}' type='groupchat'><composing xmlns='http://jabber.org/protocol/chatstates'/></message>"),
    );
    w.send(
        &wayne,
        &format!("<message from='{wayne}' to='{ROOM}' type='groupchat'><active xmlns='http://jabber.org/protocol/chatstates'/></message>"),
    );
    w.say(&wayne, "also kept");
    w.clear_inboxes();
    w.join(&keith, "Keith");
    let history: Vec<&Element> = w
        .inbox(&keith)
        .iter()
        .filter(|e| e.name() == "message" && e.get_child("subject", "jabber:client").is_none())
        .collect();
    assert_eq!(history.len(), 2, "{history:?}");
    assert_eq!(bodies(w.inbox(&keith)), ["kept", "also kept"]);
}

/// Prosody issue 667: a client that re-sends its join (a presence with `<x/>` to its own nick)
/// gets the whole join again: the other occupants, its own presence (110), history, subject.
/// The other occupants see a presence update only.
#[test]
fn a_resent_join_is_answered_as_a_join() {
    let mut w = World::new();
    let scott = user(Side::Master, "scott");
    let wayne = user(Side::A, "wayne");
    let keith = user(Side::A, "keith");
    w.join(&scott, "Scott");
    w.join(&wayne, "Wayne");
    w.join(&keith, "Keith");
    w.say(&scott, "before the resync");
    w.clear_inboxes();
    w.join(&wayne, "Wayne");
    let got = w.inbox(&wayne);
    let from = |e: &Element| e.attr("from").unwrap_or_default().to_string();
    let others: Vec<String> = got
        .iter()
        .filter(|e| e.name() == "presence" && !statuses(e).contains(&"110".to_string()))
        .map(from)
        .collect();
    assert!(others.contains(&format!("{ROOM}/Scott")), "{got:?}");
    assert!(others.contains(&format!("{ROOM}/Keith")), "{got:?}");
    let own = got
        .iter()
        .position(|e| e.name() == "presence" && statuses(e).contains(&"110".to_string()));
    let history = got
        .iter()
        .position(|e| bodies(std::slice::from_ref(e)) == ["before the resync"]);
    let subject = got
        .iter()
        .position(|e| e.get_child("subject", "jabber:client").is_some());
    assert!(
        own.is_some() && history.is_some() && subject.is_some(),
        "{got:?}"
    );
    assert!(
        own < history && history < subject,
        "XEP-0045 order: {got:?}"
    );
    let keith_got = w.inbox(&keith);
    assert!(
        keith_got.iter().all(|e| e.name() == "presence"),
        "Keith sees a presence update only: {keith_got:?}"
    );
    assert!(bodies(keith_got).is_empty());
}

/// A presence probe to an occupant JID is answered from the replica with that occupant's
/// presence, as the room would (no status 110, even for one's own nick); nobody else sees it.
#[test]
fn probes_are_answered_like_the_room() {
    let mut w = World::new();
    let scott = user(Side::Master, "scott");
    let wayne = user(Side::A, "wayne");
    let keith = user(Side::A, "keith");
    w.join(&scott, "Scott");
    w.join(&wayne, "Wayne");
    w.join(&keith, "Keith");
    w.clear_inboxes();
    let mark = w.mark(Side::A);
    for nick in ["Scott", "Wayne"] {
        w.send(
            &wayne,
            &format!("<presence from='{wayne}' to='{ROOM}/{nick}' type='probe' id='p-{nick}'/>"),
        );
    }
    let got = w.inbox(&wayne);
    assert_eq!(got.len(), 2, "{got:?}");
    for (e, nick) in got.iter().zip(["Scott", "Wayne"]) {
        assert_eq!(e.attr("from"), Some(format!("{ROOM}/{nick}").as_str()));
        assert_eq!(e.attr("type"), None);
        assert!(!statuses(e).contains(&"110".to_string()), "{e:?}");
    }
    assert!(w.inbox(&keith).is_empty() && w.inbox(&scott).is_empty());
    assert_eq!(
        w.link(Side::A).since(mark, Dir::ToMaster).len(),
        0,
        "nothing crosses the link"
    );
}

/// Multi-session nicks: a second session on a nick one session holds through the same mirror
/// is served by the master itself, as the room makes its stanzas (the hosts differ in which
/// session's presence each session sees). The room's presences of that nick go to each of its
/// sessions through the mirror as they are; the copy for the mirror's other occupants says so.
#[test]
fn a_second_session_on_a_nick_gets_what_the_room_makes_for_it() {
    use dmuc::master::Outbound;
    let (mut m, now) = master();
    let phone = format!("romeo@{A_DOMAIN}/phone");
    let laptop = format!("romeo@{A_DOMAIN}/laptop");
    let juliet = format!("juliet@{A_DOMAIN}/pc");
    join_through_a(&mut m, now, &juliet, "Juliet");
    join_through_a(&mut m, now, &phone, "Romeo");
    join_through_a(&mut m, now, &laptop, "Romeo");
    let presence = |to: &str, id: &str, own: bool| {
        format!(
            "<presence from='{ROOM}/Romeo' to='{to}' id='{id}'><x xmlns='{MUC_USER}'>\
             <item affiliation='none' role='participant'/>{}</x></presence>",
            if own { "<status code='110'/>" } else { "" }
        )
    };
    let escaped = |x: &str, user: &str| {
        let node = user.split('@').next().unwrap_or_default();
        x.contains(&format!("{node}\\40{A_DOMAIN}")) && x.contains(A_MIRROR)
    };
    // The laptop's join, broadcast: Juliet's copy is the mirror's; each session's goes to it.
    m.begin_broadcast(ROOM);
    assert_eq!(
        m.handle_outbound(now, &presence(&juliet, "phone", false))
            .unwrap(),
        Outbound::Drop
    );
    for (to, id) in [(&phone, "phone"), (&laptop, "laptop")] {
        match m.handle_outbound(now, &presence(to, id, true)).unwrap() {
            Outbound::Replace(x) => {
                assert!(escaped(&x, to) && x.contains(&format!("id='{id}'")), "{x}")
            }
            other => panic!("{other:?}"),
        }
    }
    m.end_broadcast(ROOM);
    let out: Vec<String> = std::iter::from_fn(|| m.poll_transmit()).collect();
    assert_eq!(out.len(), 1, "{out:?}");
    assert!(
        out[0].contains("<sessions xmlns='urn:xmpp:dmuc:0'/>"),
        "{}",
        out[0]
    );
    assert!(
        out[0].contains("id='phone'"),
        "the first session's copy stands for the nick: {}",
        out[0]
    );
    // Anything else the room sends the second session goes to it as it is, a message too.
    let message = format!(
        "<message from='{ROOM}/Juliet' to='{laptop}' type='groupchat' id='g1'><body>hi</body></message>"
    );
    m.begin_broadcast(ROOM);
    match m.handle_outbound(now, &message).unwrap() {
        Outbound::Replace(x) => assert!(escaped(&x, &laptop), "{x}"),
        other => panic!("{other:?}"),
    }
    let for_phone = message.replace(&laptop, &phone);
    assert_eq!(m.handle_outbound(now, &for_phone).unwrap(), Outbound::Drop);
    m.end_broadcast(ROOM);
    // Once the laptop has left, the nick is the mirror's to serve again: no marker.
    m.handle_left(ROOM, &laptop);
    m.begin_broadcast(ROOM);
    assert_eq!(
        m.handle_outbound(now, &presence(&phone, "p2", true))
            .unwrap(),
        Outbound::Drop
    );
    m.end_broadcast(ROOM);
    let out: Vec<String> = std::iter::from_fn(|| m.poll_transmit()).collect();
    assert_eq!(out.len(), 1, "{out:?}");
    assert!(!out[0].contains("sessions"), "{}", out[0]);
}

/// A room that ignores probes (ejabberd) says so in the config it sends; the replica then
/// ignores them too, and the link stays quiet.
#[test]
fn probes_are_ignored_where_the_room_ignores_them() {
    let mut w = World::new();
    w.master.follow_rules(dmuc::room_rules::RoomRules {
        answers_probes: false,
    });
    let scott = user(Side::Master, "scott");
    let wayne = user(Side::A, "wayne");
    w.join(&scott, "Scott");
    w.join(&wayne, "Wayne");
    w.clear_inboxes();
    let mark = w.mark(Side::A);
    for nick in ["Scott", "Wayne"] {
        w.send(
            &wayne,
            &format!("<presence from='{wayne}' to='{ROOM}/{nick}' type='probe' id='p-{nick}'/>"),
        );
    }
    assert!(w.inbox(&wayne).is_empty(), "{:?}", w.inbox(&wayne));
    assert_eq!(w.link(Side::A).since(mark, Dir::ToMaster).len(), 0);
}

/// Without brackets (ejabberd), a re-sent join is answered with the occupant list again before
/// the occupant's own presence: the mirror serves that list itself, so the master drops those
/// copies until the occupant's own presence, and forwards that one.
#[test]
fn a_resent_join_unbracketed_leaves_the_occupant_list_to_the_mirror() {
    use dmuc::master::{Master, MasterConfig, Outbound, TrustedMirror};
    let mut m = Master::new(MasterConfig {
        trusted_mirrors: vec![TrustedMirror::new(A_MIRROR)],
        unbracketed_presence: true,
        ..MasterConfig::default()
    });
    let now = dmuc::Timestamp(1_295_424_000_000);
    let romeo = format!("romeo@{A_DOMAIN}/pc");
    join_through_a(&mut m, now, &romeo, "Romeo");
    let own = |id: &str| {
        format!(
            "<presence from='{ROOM}/Romeo' to='{romeo}' id='{id}'><x xmlns='{MUC_USER}'>\
             <item affiliation='none' role='participant' jid='{romeo}'/><status code='110'/></x></presence>"
        )
    };
    let scott = format!(
        "<presence from='{ROOM}/Scott' to='{romeo}' id='s1'><x xmlns='{MUC_USER}'>\
         <item affiliation='owner' role='moderator'/></x></presence>"
    );
    assert_eq!(m.handle_outbound(now, &scott).unwrap(), Outbound::Drop);
    assert!(matches!(
        m.handle_outbound(now, &own("j1")).unwrap(),
        Outbound::Replace(_)
    ));
    // The re-sent join: Scott's unchanged presence is the list again, then Romeo's own.
    m.handle_presence(
        now,
        &format!(
            "<presence from='{romeo}' to='{ROOM}/Romeo' id='j2'><x xmlns='http://jabber.org/protocol/muc'/>\
             <dmuc xmlns='http://tridsys.com/protocol/dmuc' from='{A_MIRROR}'/></presence>"
        ),
        Some("Romeo"),
    )
    .unwrap();
    assert_eq!(m.handle_outbound(now, &scott).unwrap(), Outbound::Drop);
    match m.handle_outbound(now, &own("j2")).unwrap() {
        Outbound::Replace(x) => assert!(x.contains("j2") && x.contains(A_MIRROR), "{x}"),
        other => panic!("{other:?}"),
    }
}

/// A join to an occupant address failing strict validation is refused by the mirror as both
/// hosts' rooms refuse it: `jid-malformed` by the room, nothing echoed, nothing on the link.
/// Anything else to such an address is the host's.
#[test]
fn joins_with_unparsable_nicks_are_refused_as_rooms_refuse_them() {
    let mut w = World::new();
    let wayne = user(Side::A, "wayne");
    let now = w.now;
    let mark = w.mark(Side::A);
    let m = w.mirrors.get_mut(&Side::A).unwrap();
    let to = format!("{ROOM}/bad\u{E000}nick");
    let join = format!(
        "<presence from='{wayne}' to='{to}' id='j1'><x xmlns='http://jabber.org/protocol/muc'/></presence>"
    );
    assert_eq!(
        m.handle_local(now, &join).unwrap(),
        dmuc::mirror::Verdict::Consumed
    );
    let reply = m.poll_transmit().expect("an error");
    assert_eq!(
        reply,
        format!(
            "<presence xmlns='jabber:client' from='{to}' id='j1' to='{wayne}' type='error'>\
             <error by='{ROOM}' type='modify'><jid-malformed xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/>\
             <text xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'>Nickname must pass strict validation</text>\
             </error></presence>"
        )
    );
    assert!(m.poll_transmit().is_none());
    let message =
        format!("<message from='{wayne}' to='{to}' type='chat'><body>hi</body></message>");
    assert_eq!(
        m.handle_local(now, &message).unwrap(),
        dmuc::mirror::Verdict::Pass
    );
    assert!(m.poll_transmit().is_none());
    assert_eq!(w.link(Side::A).since(mark, Dir::ToMaster).len(), 0);
}

/// Two devices of one account may share a nick if the room allows it (Prosody does): the
/// mirror leaves that to the master instead of refusing it with `conflict` itself. Another
/// account asking for a taken nick is refused at once, without crossing the link.
#[test]
fn a_second_device_on_the_same_nick_is_the_rooms_decision() {
    let mut w = World::new();
    let wayne = user(Side::A, "wayne");
    let phone = format!("wayne@{A_DOMAIN}/phone");
    let keith = user(Side::A, "keith");
    w.join(&wayne, "Wayne");
    let mark = w.mark(Side::A);
    w.join(&keith, "Wayne");
    assert_eq!(w.link(Side::A).since(mark, Dir::ToMaster).len(), 0);
    assert!(w
        .inbox(&keith)
        .iter()
        .any(|e| e.attr("type") == Some("error")));
    let mark = w.mark(Side::A);
    w.join(&phone, "Wayne");
    let up = w.link(Side::A).since(mark, Dir::ToMaster);
    assert!(
        up.iter()
            .any(|e| e.name() == "presence" && e.attr("from") == Some(phone.as_str())),
        "the second device's join goes to the master: {up:?}"
    );
    // This model room refuses it, as ejabberd does; the refusal reaches the phone only, and
    // the first device stays in.
    let errors: Vec<&Element> = w
        .inbox(&phone)
        .iter()
        .filter(|e| e.attr("type") == Some("error"))
        .collect();
    assert_eq!(errors.len(), 1, "{:?}", w.inbox(&phone));
    assert_eq!(w.mirror(Side::A).local_occupants(ROOM).len(), 1);
}

/// The sender's own echo and local peers' copies carry the XEP-0421 occupant-id the room gave
/// the sender (from the presence the room broadcast), not one the client forged.
#[test]
fn local_copies_carry_the_rooms_occupant_id() {
    let mut w = World::new();
    let wayne = user(Side::A, "wayne");
    let keith = user(Side::A, "keith");
    // The model room echoes the join's payload: here it stands for the id the room stamps.
    w.send(
        &wayne,
        &format!(
            "<presence from='{wayne}' to='{ROOM}/Wayne'><x xmlns='http://jabber.org/protocol/muc'/>\
             <occupant-id xmlns='urn:xmpp:occupant-id:0' id='given-by-room'/></presence>"
        ),
    );
    w.join(&keith, "Keith");
    w.clear_inboxes();
    w.send(
        &wayne,
        &format!(
            "<message from='{wayne}' to='{ROOM}' type='groupchat'><body>hi</body>\
             <occupant-id xmlns='urn:xmpp:occupant-id:0' id='forged'/></message>"
        ),
    );
    for who in [&wayne, &keith] {
        let m = w
            .inbox(who)
            .iter()
            .find(|e| e.name() == "message")
            .unwrap_or_else(|| panic!("{who} got no message"));
        let ids: Vec<&str> = m
            .children()
            .filter(|c| c.is("occupant-id", "urn:xmpp:occupant-id:0"))
            .filter_map(|c| c.attr("id"))
            .collect();
        assert_eq!(ids, ["given-by-room"], "{who}: {m:?}");
    }
}

/// An affiliation change by a moderator behind the mirror, of a participant behind the same
/// mirror (Prosody's issue1224 script): the room's copy for the moderator names the actor's
/// real JID, the subject's own copy does not. The master sends the mirror the richer copy, with
/// the subject's self-only codes, so the mirror can give each local user what the room would.
#[test]
fn the_mirror_gets_the_copy_with_the_actors_jid() {
    use dmuc::master::Outbound;
    let (mut m, now) = master();
    let romeo = format!("romeo@{A_DOMAIN}/pc");
    let juliet = format!("juliet@{A_DOMAIN}/pc");
    for (who, nick) in [(&romeo, "Romeo"), (&juliet, "Juliet")] {
        join_through_a(&mut m, now, &who, nick);
    }
    while m.poll_transmit().is_some() {}
    let copy = |to: &str, actor: &str, codes: &str| {
        format!(
            "<presence from='{ROOM}/Juliet' to='{to}'><x xmlns='http://jabber.org/protocol/muc#user'>\
             <item affiliation='member' role='participant' jid='{juliet}'>{actor}</item>{codes}</x></presence>"
        )
    };
    m.begin_broadcast(ROOM);
    let own = copy(&juliet, "<actor nick='Romeo'/>", "<status code='110'/>");
    let full = copy(&romeo, &format!("<actor nick='Romeo' jid='{romeo}'/>"), "");
    assert_eq!(m.handle_outbound(now, &own).unwrap(), Outbound::Drop);
    assert_eq!(m.handle_outbound(now, &full).unwrap(), Outbound::Drop);
    m.end_broadcast(ROOM);
    let sent: Vec<Element> = std::iter::from_fn(|| m.poll_transmit())
        .map(|x| dmuc::stanza::parse(&x).unwrap())
        .collect();
    assert_eq!(sent.len(), 1, "{sent:?}");
    let item = sent[0]
        .get_child("x", MUC_USER)
        .and_then(|x| x.get_child("item", MUC_USER))
        .unwrap();
    let actor = item.get_child("actor", MUC_USER).unwrap();
    assert_eq!(actor.attr("jid"), Some(romeo.as_str()), "{:?}", sent[0]);
}

/// The mirror gives the subject of an affiliation change their own real JID but not the
/// actor's, unless they may see real JIDs; a moderator sees both.
#[test]
fn the_subject_does_not_see_the_actors_jid() {
    let mut w = World::new();
    let scott = user(Side::Master, "scott");
    let wayne = user(Side::A, "wayne");
    w.join(&scott, "Scott");
    w.join(&wayne, "Wayne");
    w.clear_inboxes();
    // The master's one copy for the mirror: the richest, with the actor's real JID.
    let now = w.now;
    let copy = format!(
        "<presence from='{ROOM}/Wayne' to='{A_MIRROR}'><x xmlns='http://jabber.org/protocol/muc#user'>\
         <item affiliation='member' role='participant' jid='{wayne}'><actor nick='Scott' jid='{scott}'/></item>\
         </x></presence>"
    );
    let m = w.mirrors.get_mut(&Side::A).unwrap();
    m.handle_remote(now, &copy).unwrap();
    let got: Vec<Element> = std::iter::from_fn(|| m.poll_transmit())
        .map(|x| dmuc::stanza::parse(&x).unwrap())
        .collect();
    assert_eq!(got.len(), 1, "{got:?}");
    let item = got[0]
        .get_child("x", MUC_USER)
        .and_then(|x| x.get_child("item", MUC_USER))
        .unwrap();
    assert_eq!(item.attr("jid"), Some(wayne.as_str()), "own JID kept");
    assert_eq!(
        item.get_child("actor", MUC_USER).unwrap().attr("jid"),
        None,
        "the actor's JID hidden: {:?}",
        got[0]
    );
    assert!(statuses(&got[0]).contains(&"110".to_string()));
}

/// What the room sends a user after their leave (the answer to the request that made them
/// leave, such as unregistering from a members-only room) keeps its place behind the leave: the
/// master still routes it through the mirror, and the mirror still delivers it.
#[test]
fn answers_after_a_leave_follow_it_through_the_mirror() {
    use dmuc::master::Outbound;
    let (mut m, now) = master();
    let juliet = format!("juliet@{A_DOMAIN}/pc");
    join_through_a(&mut m, now, &juliet, "Juliet");
    m.handle_left(ROOM, &juliet);
    assert!(m.routes_via_mirror(&juliet));
    let answer = format!("<iq from='{ROOM}' to='{juliet}' id='unreg1' type='result'/>");
    let escaped = dmuc::escape::jid_at_service(&juliet.parse().unwrap(), A_MIRROR)
        .unwrap()
        .to_string();
    match m.handle_outbound(now, &answer).unwrap() {
        Outbound::Replace(x) => assert!(x.contains(&escaped), "{x}"),
        other => panic!("{other:?}"),
    }

    let mut w = World::new();
    let wayne = user(Side::A, "wayne");
    w.join(&wayne, "Wayne");
    w.leave(&wayne, "Wayne");
    w.clear_inboxes();
    let to = dmuc::escape::jid_at_service(&wayne.parse().unwrap(), A_MIRROR).unwrap();
    let now = w.now;
    let mirror = w.mirrors.get_mut(&Side::A).unwrap();
    mirror
        .handle_remote(
            now,
            &format!("<iq from='{ROOM}' to='{to}' id='unreg1' type='result'/>"),
        )
        .unwrap();
    let out: Vec<String> = std::iter::from_fn(|| mirror.poll_transmit()).collect();
    assert_eq!(out.len(), 1, "{out:?}");
    assert!(out[0].contains(&format!("to='{wayne}'")), "{out:?}");
}

/// A probe of a nick that is not in the room is answered by the room with that nick's
/// unavailable presence (Prosody's muc_presence_probe script): outside a broadcast, it is no
/// occupant list, so the master sends it through the mirror instead of dropping it.
#[test]
fn the_rooms_answer_to_a_probe_of_an_absent_nick_reaches_the_prober() {
    use dmuc::master::Outbound;
    let (mut m, now) = master();
    let romeo = format!("romeo@{A_DOMAIN}/pc");
    join_through_a(&mut m, now, &romeo, "Romeo");
    let answer = format!(
        "<presence from='{ROOM}/Mercutio' to='{romeo}' type='unavailable'><x xmlns='{MUC_USER}'>\
         <item nick='Mercutio' affiliation='member' role='none'/></x></presence>"
    );
    match m.handle_outbound(now, &answer).unwrap() {
        Outbound::Replace(x) => assert!(x.contains(A_MIRROR) && x.contains("Mercutio"), "{x}"),
        other => panic!("{other:?}"),
    }
    // An occupant's presence outside a broadcast is the joiner's occupant list: the mirror
    // serves that itself.
    let listed = format!(
        "<presence from='{ROOM}/Scott' to='{romeo}'><x xmlns='{MUC_USER}'>\
         <item affiliation='owner' role='moderator'/></x></presence>"
    );
    assert_eq!(m.handle_outbound(now, &listed).unwrap(), Outbound::Drop);
}

/// The room kicks an occupant whose client sent it an error (Prosody issue 978: status 333 and
/// a reason). Unlike the master's own eviction for a lost link, which it marks, this ends the
/// stay: the mirror shows the leave instead of rejoining the user behind their back.
#[test]
fn a_kick_for_an_error_is_shown_not_undone() {
    let mut w = World::new();
    let wayne = user(Side::A, "wayne");
    let keith = user(Side::A, "keith");
    w.join(&wayne, "Wayne");
    w.join(&keith, "Keith");
    w.clear_inboxes();
    let mark = w.mark(Side::A);
    let now = w.now;
    let kick = format!(
        "<presence from='{ROOM}/Wayne' to='{A_MIRROR}' type='unavailable'>\
         <status>Kicked: service unavailable: Test error</status>\
         <x xmlns='{MUC_USER}'><item affiliation='none' role='none'/><status code='333'/></x></presence>"
    );
    let m = w.mirrors.get_mut(&Side::A).unwrap();
    m.handle_remote(now, &kick).unwrap();
    let out: Vec<Element> = std::iter::from_fn(|| m.poll_transmit())
        .map(|x| dmuc::stanza::parse(&x).unwrap())
        .collect();
    assert!(
        out.iter().all(|e| e.attr("type") == Some("unavailable")),
        "no rejoin: {out:?}"
    );
    for who in [&wayne, &keith] {
        assert!(
            out.iter().any(|e| e.attr("to") == Some(who.as_str())),
            "{who} sees the leave: {out:?}"
        );
    }
    assert_eq!(w.mirror(Side::A).local_occupants(ROOM).len(), 1);
    assert_eq!(w.link(Side::A).since(mark, Dir::ToMaster).len(), 0);
}

/// When the room is destroyed, each occupant is shown only their own leave (with the
/// `<destroy/>`), as Prosody's room does: not their neighbours'.
#[test]
fn a_destroyed_room_shows_each_only_their_own_leave() {
    let mut w = World::new();
    let wayne = user(Side::A, "wayne");
    let keith = user(Side::A, "keith");
    w.join(&wayne, "Wayne");
    w.join(&keith, "Keith");
    w.clear_inboxes();
    let now = w.now;
    let m = w.mirrors.get_mut(&Side::A).unwrap();
    let mut out = Vec::new();
    for nick in ["Wayne", "Keith"] {
        let leave = format!(
            "<presence from='{ROOM}/{nick}' to='{A_MIRROR}' type='unavailable'>\
             <x xmlns='{MUC_USER}'><item affiliation='none' role='none'/><destroy/>\
             <status code='110'/></x></presence>"
        );
        m.handle_remote(now, &leave).unwrap();
        out.extend(
            std::iter::from_fn(|| m.poll_transmit()).map(|x| dmuc::stanza::parse(&x).unwrap()),
        );
    }
    assert_eq!(out.len(), 2, "{out:?}");
    for (e, (who, nick)) in out.iter().zip([(&wayne, "Wayne"), (&keith, "Keith")]) {
        assert_eq!(e.attr("to"), Some(who.as_str()));
        assert_eq!(e.attr("from"), Some(format!("{ROOM}/{nick}").as_str()));
        assert!(statuses(e).contains(&"110".to_string()));
    }
    assert!(w.mirror(Side::A).rooms().is_empty());
}

/// The room password never crosses to a mirror: the config form the master sends keeps the
/// field, not its value (joins are checked by the master).
#[test]
fn the_room_password_stays_at_the_master() {
    let (mut m, now) = master();
    let wayne = user(Side::A, "wayne");
    join_through_a(&mut m, now, &wayne, "Wayne");
    let form = "<x xmlns='jabber:x:data' type='form'>\
        <field var='FORM_TYPE' type='hidden'><value>http://jabber.org/protocol/muc#roomconfig</value></field>\
        <field var='muc#roomconfig_roomsecret' type='text-private'><value>s3cret</value></field>\
        <field var='muc#roomconfig_whois' type='list-single'><value>moderators</value></field></x>";
    m.handle_snapshot(now, ROOM, A_MIRROR, "Wayne", form, &[])
        .unwrap();
    let sent: Vec<String> = std::iter::from_fn(|| m.poll_transmit()).collect();
    assert!(
        sent.iter().any(|s| s.contains("muc#roomconfig_whois")),
        "{sent:?}"
    );
    assert!(sent.iter().all(|s| !s.contains("s3cret")), "{sent:?}");
}

/// The room's refusal of a message because it had lost the sender now comes through the
/// mirror, to the user's escaped address: the mirror rejoins the user and sends the message
/// again, and the user does not see the refusal.
#[test]
fn a_refusal_the_mirror_repairs_is_not_shown() {
    let mut w = World::new();
    let wayne = user(Side::A, "wayne");
    w.join(&wayne, "Wayne");
    w.send(
        &wayne,
        &format!("<message from='{wayne}' to='{ROOM}' type='groupchat' id='m1'><body>lost?</body></message>"),
    );
    w.clear_inboxes();
    let to = dmuc::escape::jid_at_service(&wayne.parse().unwrap(), A_MIRROR).unwrap();
    let now = w.now;
    let m = w.mirrors.get_mut(&Side::A).unwrap();
    m.handle_remote(
        now,
        &format!(
            "<message from='{ROOM}' to='{to}' type='error' id='m1'><error type='cancel'>\
             <not-acceptable xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></error></message>"
        ),
    )
    .unwrap();
    let out: Vec<Element> = std::iter::from_fn(|| m.poll_transmit())
        .map(|x| dmuc::stanza::parse(&x).unwrap())
        .collect();
    assert!(
        out.iter().all(|e| e.attr("type") != Some("error")),
        "the user sees no refusal: {out:?}"
    );
    assert!(
        out.iter()
            .any(|e| e.name() == "presence"
                && e.attr("to") == Some(format!("{ROOM}/Wayne").as_str())),
        "the mirror rejoins the user: {out:?}"
    );
}

/// A room with a presence of its own (ejabberd sends its entity caps from the bare room to each
/// joiner, and to everyone when its configuration changes, and withdraws it from a leaver): the
/// mirror keeps it, shows it to its joiners first, passes a change to its occupants, withdraws it
/// from a leaver before the leave, and does not show the room's own withdrawal twice.
#[test]
fn the_rooms_own_presence_is_served_like_the_room() {
    let mut w = World::new();
    let wayne = user(Side::A, "wayne");
    let keith = user(Side::A, "keith");
    w.join(&wayne, "Wayne");
    let caps = |ver: &str| {
        format!(
            "<presence from='{ROOM}' to='{A_MIRROR}' id='c-{ver}'>\
             <c xmlns='http://jabber.org/protocol/caps' hash='sha-1' node='n' ver='{ver}'/></presence>"
        )
    };
    let now = w.now;
    let m = w.mirrors.get_mut(&Side::A).unwrap();
    m.handle_remote(now, &caps("v1")).unwrap();
    assert!(
        m.poll_transmit().is_none(),
        "stored, not shown: the joiner got it from the room"
    );
    w.clear_inboxes();
    w.join(&keith, "Keith");
    let first = &w.inbox(&keith)[0];
    assert_eq!(first.attr("from"), Some(ROOM), "{:?}", w.inbox(&keith));
    assert!(first.has_child("c", "http://jabber.org/protocol/caps"));
    w.clear_inboxes();
    let now = w.now;
    let m = w.mirrors.get_mut(&Side::A).unwrap();
    m.handle_remote(now, &caps("v2")).unwrap();
    let out: Vec<String> = std::iter::from_fn(|| m.poll_transmit()).collect();
    assert_eq!(
        out.len(),
        2,
        "a change reaches every local occupant: {out:?}"
    );
    w.leave(&keith, "Keith");
    let got = w.inbox(&keith);
    assert_eq!(got[0].attr("from"), Some(ROOM), "{got:?}");
    assert_eq!(got[0].attr("type"), Some("unavailable"));
    assert_eq!(got[1].attr("from"), Some(format!("{ROOM}/Keith").as_str()));
    let to = dmuc::escape::jid_at_service(&keith.parse().unwrap(), A_MIRROR).unwrap();
    let now = w.now;
    let m = w.mirrors.get_mut(&Side::A).unwrap();
    m.handle_remote(
        now,
        &format!("<presence from='{ROOM}' to='{to}' type='unavailable' id='x'/>"),
    )
    .unwrap();
    assert!(m.poll_transmit().is_none(), "not shown twice");
}

/// A nick the engine's JID rules refuse but the host let through (`ȡ`, U+0221, fails strict
/// resourceprep) is the room's to refuse, whichever side parses it.
#[test]
fn an_unassigned_code_point_in_a_nick_is_the_rooms_to_refuse() {
    let mut w = World::new();
    let wayne = user(Side::A, "wayne");
    let now = w.now;
    let m = w.mirrors.get_mut(&Side::A).unwrap();
    let join = format!(
        "<presence from='{wayne}' to='{ROOM}/\u{0221}' id='t-k-strict'><x xmlns='http://jabber.org/protocol/muc'><history maxstanzas='0'/></x></presence>"
    );
    let v = m.handle_local(now, &join);
    assert!(matches!(v, Ok(_)), "{v:?}");
}

/// Privacy: a mirror none of whose occupants may see real JIDs (a semi-anonymous room, no
/// moderator there) gets the roster without them. When a moderator joins through it, the mirror
/// asks again before serving the join, and the moderator sees the JIDs as a direct one would.
#[test]
fn real_jids_reach_a_mirror_only_with_a_moderator_there() {
    use common::xml::item;
    let mut w = World::new();
    let scott = user(Side::Master, "scott");
    let keith = user(Side::A, "keith");
    let wayne = user(Side::A, "wayne");
    w.master
        .room
        .affiliations
        .insert(format!("wayne@{A_DOMAIN}"), "admin".into());
    w.join(&scott, "Scott");
    let mark = w.mark(Side::A);
    w.join(&keith, "Keith");
    let rosters = |w: &World, mark| -> Vec<Element> {
        w.link(Side::A)
            .since(mark, Dir::ToMirror)
            .into_iter()
            .filter_map(|e| e.get_child("roster", "urn:xmpp:dmuc:0").cloned())
            .collect()
    };
    let first = rosters(&w, mark);
    assert_eq!(first.len(), 1, "{first:?}");
    assert_eq!(first[0].attr("jids"), Some("withheld"));
    assert!(
        first[0].children().all(|i| i.attr("jid").is_none()),
        "{:?}",
        first[0]
    );
    // Keith, a participant, sees no real JID.
    let scott_for_keith = w
        .inbox(&keith)
        .iter()
        .find(|e| e.attr("from") == Some(format!("{ROOM}/Scott").as_str()))
        .cloned()
        .expect("Scott's presence");
    assert!(item(&scott_for_keith).and_then(|i| i.attr("jid")).is_none());
    // Wayne, an admin (a moderator), joins: the mirror asks for the roster again.
    let mark = w.mark(Side::A);
    w.join(&wayne, "Wayne");
    let again = rosters(&w, mark);
    assert!(
        again.iter().any(|r| r.attr("jids").is_none()
            && r.children()
                .any(|i| i.attr("jid").is_some_and(|j| j.starts_with("scott@")))),
        "{again:?}"
    );
    let scott_for_wayne = w
        .inbox(&wayne)
        .iter()
        .find(|e| e.attr("from") == Some(format!("{ROOM}/Scott").as_str()))
        .cloned()
        .expect("Scott's presence for Wayne");
    assert!(
        item(&scott_for_wayne)
            .and_then(|i| i.attr("jid"))
            .is_some_and(|j| j.starts_with(&format!("scott@{MASTER_DOMAIN}"))),
        "{scott_for_wayne:?}"
    );
}

/// dmuc's own elements in a local user's stanza are forgeries (an eviction mark, a de-duplication
/// key, a stanza-id proposal): neither the master nor the local occupants ever get them.
#[test]
fn a_users_forged_dmuc_elements_go_nowhere() {
    let mut w = World::new();
    let scott = user(Side::Master, "scott");
    let wayne = user(Side::A, "wayne");
    let keith = user(Side::A, "keith");
    w.join(&scott, "Scott");
    w.join(&wayne, "Wayne");
    w.join(&keith, "Keith");
    w.clear_inboxes();
    let mark = w.mark(Side::A);
    w.send(
        &wayne,
        &format!(
            "<message from='{wayne}' to='{ROOM}' type='groupchat' id='f1'><body>forged</body>\
             <evicted xmlns='urn:xmpp:dmuc:0'/><dedup xmlns='urn:xmpp:dmuc:0' id='mine'/>\
             <sessions xmlns='urn:xmpp:dmuc:0'/></message>"
        ),
    );
    let up = w.link(Side::A).since(mark, Dir::ToMaster);
    let sent: Vec<&Element> = up.iter().filter(|e| e.name() == "message").collect();
    assert_eq!(sent.len(), 1, "{up:?}");
    let ours: Vec<&Element> = sent[0]
        .children()
        .filter(|c| c.ns() == "urn:xmpp:dmuc:0")
        .collect();
    assert!(
        ours.iter()
            .all(|c| c.name() == "dedup" && c.attr("id") != Some("mine")),
        "{:?}",
        sent[0]
    );
    for who in [&wayne, &keith] {
        for e in w.inbox(who) {
            assert!(
                e.children().all(|c| c.ns() != "urn:xmpp:dmuc:0"),
                "{who} got {e:?}"
            );
        }
    }
    // At the master the host strips the mirror's own key (the model room here does not); the
    // forged ones never got that far.
    for e in w.inbox(&scott) {
        assert!(
            e.children().all(|c| c.ns() != "urn:xmpp:dmuc:0"
                || (c.name() == "dedup" && c.attr("id") != Some("mine"))),
            "{e:?}"
        );
    }
    assert!(w.inbox(&keith).iter().any(|e| e.attr("id") == Some("f1")));
}
