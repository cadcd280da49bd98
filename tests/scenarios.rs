//! End-to-end scenarios: the master (the model MUC room of `common::model` and a `Master`), two
//! mirrors (A at raleigh, B at durham) and their users, wired in memory by `common::World`. Each
//! test is one DMUC3 use case, checked from every user's inbox and from the traffic on the links.

mod common;

use common::xml::*;
use common::*;
use minidom::Element;

/// The cast. Scott (owner) and Kevin (admin) are on the master's server; Wayne and Keith behind
/// mirror A; Ann behind mirror B.
struct Cast {
    scott: String,
    kevin: String,
    wayne: String,
    keith: String,
    ann: String,
}

fn cast() -> Cast {
    Cast {
        scott: user(Side::Master, "scott"),
        kevin: user(Side::Master, "kevin"),
        wayne: user(Side::A, "wayne"),
        keith: user(Side::A, "keith"),
        ann: user(Side::B, "ann"),
    }
}

/// Everyone in the room, inboxes emptied.
fn full_room() -> (World, Cast) {
    full_room_in(World::new())
}

/// Everyone in the room of `w`, inboxes emptied.
fn full_room_in(mut w: World) -> (World, Cast) {
    let c = cast();
    w.join(&c.scott, "Scott");
    w.join(&c.kevin, "Kevin");
    w.join(&c.wayne, "Wayne");
    w.join(&c.keith, "Keith");
    w.join(&c.ann, "Ann");
    assert!(w.mirror_errors.is_empty(), "{:?}", w.mirror_errors);
    assert!(w.master.errors.is_empty(), "{:?}", w.master.errors);
    w.clear_inboxes();
    (w, c)
}

fn names(v: &[Element]) -> Vec<String> {
    v.iter().map(|e| e.name().to_string()).collect()
}

/// The first join through a mirror: the master sends config and roster, the mirror asks for
/// history, and the joiner gets what XEP-0045 promises, in its order: the other occupants, its
/// own presence (110), the history, the subject.
#[test]
fn first_join_through_a_mirror() {
    let mut w = World::new();
    let c = cast();
    w.join(&c.scott, "Scott");
    w.join(&c.kevin, "Kevin");
    w.send(
        &c.scott,
        &format!(
            "<message from='{}' to='{ROOM}' type='groupchat'><subject>Jack</subject></message>",
            c.scott
        ),
    );
    w.say(&c.scott, "one");
    w.say(&c.kevin, "two");
    w.clear_inboxes();

    let mark = w.mark(Side::A);
    w.join(&c.wayne, "Wayne");

    let up = w.link(Side::A).since(mark, Dir::ToMaster);
    assert_eq!(names(&up), ["presence", "iq", "iq", "iq"]);
    assert!(up[0].get_child("dmuc", DMUC).is_some());
    assert_eq!(up[1].attr("type"), Some("result"));
    assert_eq!(up[2].attr("type"), Some("result"));
    assert!(up[3].get_child("room", DMUC0).is_some());
    let down = w.link(Side::A).since(mark, Dir::ToMirror);
    assert_eq!(names(&down), ["iq", "iq", "presence", "iq"]);
    assert!(down[0].get_child("config", DMUC0).is_some());
    let roster = down[1].get_child("roster", DMUC0).expect("roster");
    let items: Vec<_> = roster.children().filter_map(|i| i.attr("name")).collect();
    assert_eq!(items, ["Kevin", "Scott"]);
    assert!(down[3].get_child("history", MUC).is_some());

    let got = w.take(&c.wayne);
    let order: Vec<String> = got
        .iter()
        .map(|s| match s.name() {
            "presence" => format!("presence {}", from_nick(s).unwrap()),
            _ if s.get_child("subject", CLIENT).is_some() => "subject".into(),
            _ => format!("history {}", body(s).unwrap()),
        })
        .collect();
    assert_eq!(
        order,
        [
            "presence Kevin",
            "presence Scott",
            "presence Wayne",
            "history one",
            "history two",
            "subject"
        ]
    );
    assert_eq!(statuses(&got[2]), ["110"]);
    assert!(statuses(&got[0]).is_empty());
    // Semi-anonymous room: a participant sees no real JIDs.
    assert_eq!(item(&got[0]).unwrap().attr("jid"), None);
    assert_eq!(item(&got[0]).unwrap().attr("role"), Some("moderator"));
    assert!(is_delayed(&got[3]));
    assert_eq!(got[5].get_child("subject", CLIENT).unwrap().text(), "Jack");

    // The master's users see the join once; moderators see the real JID.
    for u in [&c.scott, &c.kevin] {
        let got = w.take(u);
        let p = presences(&got);
        assert_eq!(p.len(), 1, "{u}: {p:?}");
        assert_eq!(p[0].nick, "Wayne");
        assert!(p[0].statuses.is_empty());
        assert_eq!(p[0].jid.as_deref(), Some(c.wayne.as_str()));
    }
    assert_eq!(
        w.mirror(Side::A).occupants(ROOM),
        ["Kevin", "Scott", "Wayne"]
    );
    assert_eq!(
        w.master.engine.remote_occupants(ROOM),
        [("Wayne".to_string(), c.wayne.clone(), A_MIRROR.to_string())]
    );
    assert!(w.mirror_errors.is_empty() && w.master.errors.is_empty());
}

/// A second local user joining at a mirror that already mirrors the room costs one presence each
/// way: the join, and the master's single copy of its broadcast. The mirror serves the rest.
#[test]
fn second_local_join_costs_one_presence_each_way() {
    let mut w = World::new();
    let c = cast();
    w.join(&c.scott, "Scott");
    w.say(&c.scott, "before");
    w.join(&c.wayne, "Wayne");
    w.clear_inboxes();

    let mark = w.mark(Side::A);
    w.join(&c.keith, "Keith");
    let up = w.link(Side::A).since(mark, Dir::ToMaster);
    let down = w.link(Side::A).since(mark, Dir::ToMirror);
    assert_eq!(names(&up), ["presence"]);
    assert_eq!(names(&down), ["presence"]);
    assert_eq!(from_nick(&down[0]).as_deref(), Some("Keith"));

    let got = w.take(&c.keith);
    assert_eq!(joined_nicks(&got), ["Scott", "Wayne", "Keith"]);
    assert_eq!(presences(&got)[2].statuses, ["110"]);
    assert_eq!(delayed_bodies(&got), ["before"]);
    assert!(got.last().unwrap().get_child("subject", CLIENT).is_some());

    let wayne_saw = presences(&w.take(&c.wayne));
    assert_eq!(wayne_saw.len(), 1);
    assert_eq!(wayne_saw[0].nick, "Keith");
    assert!(
        wayne_saw[0].statuses.is_empty(),
        "110 leaked: {wayne_saw:?}"
    );
    assert_eq!(joined_nicks(&w.take(&c.scott)), ["Keith"]);
}

/// Groupchat both ways: every occupant gets every message once; the origin mirror gets no echo
/// over the link; each other mirror gets one copy.
#[test]
fn messages_reach_every_occupant_once() {
    let (mut w, c) = full_room();
    let everyone = [&c.scott, &c.kevin, &c.wayne, &c.keith, &c.ann];

    let (a, b) = (w.mark(Side::A), w.mark(Side::B));
    w.say(&c.wayne, "from A");
    assert_eq!(w.link(Side::A).since(a, Dir::ToMaster).len(), 1);
    // No echo to the origin mirror: its acknowledgement instead (crate::ack), smaller.
    let back = w.link(Side::A).since(a, Dir::ToMirror);
    assert_eq!(back.len(), 1, "{back:?}");
    assert!(
        back[0].has_child("ack", "urn:xmpp:dmuc:0") && !back[0].has_child("body", "jabber:client")
    );
    assert_eq!(w.mirror(Side::A).in_flight(ROOM), 0, "acknowledged");
    assert_eq!(w.link(Side::B).since(b, Dir::ToMirror).len(), 1);
    for u in everyone {
        assert_eq!(
            live_messages(&w.take(u)),
            [("Wayne".to_string(), "from A".to_string())],
            "{u}"
        );
    }

    let (a, b) = (w.mark(Side::A), w.mark(Side::B));
    w.say(&c.scott, "from the master");
    assert_eq!(w.link(Side::A).since(a, Dir::ToMirror).len(), 1);
    assert_eq!(w.link(Side::B).since(b, Dir::ToMirror).len(), 1);
    assert_eq!(w.link(Side::A).since(a, Dir::ToMaster).len(), 0);
    for u in everyone {
        assert_eq!(
            live_messages(&w.take(u)),
            [("Scott".to_string(), "from the master".to_string())],
            "{u}"
        );
    }

    let (a, b) = (w.mark(Side::A), w.mark(Side::B));
    w.say(&c.ann, "from B");
    assert_eq!(w.link(Side::B).since(b, Dir::ToMaster).len(), 1);
    assert_eq!(
        w.link(Side::B).since(b, Dir::ToMirror).len(),
        1,
        "the acknowledgement"
    );
    assert_eq!(w.link(Side::A).since(a, Dir::ToMirror).len(), 1);
    for u in everyone {
        assert_eq!(
            live_messages(&w.take(u)),
            [("Ann".to_string(), "from B".to_string())],
            "{u}"
        );
    }
    assert!(w.mirror_errors.is_empty() && w.master.errors.is_empty());
}

/// Status changes travel like joins: one copy per mirror, the changer sees 110.
#[test]
fn presence_changes_fan_out_once() {
    let (mut w, c) = full_room();
    let (a, b) = (w.mark(Side::A), w.mark(Side::B));
    w.status(&c.wayne, "Wayne", "away");
    assert_eq!(
        names(&w.link(Side::A).since(a, Dir::ToMaster)),
        ["presence"]
    );
    assert_eq!(
        names(&w.link(Side::A).since(a, Dir::ToMirror)),
        ["presence"]
    );
    assert_eq!(
        names(&w.link(Side::B).since(b, Dir::ToMirror)),
        ["presence"]
    );
    for u in [&c.scott, &c.kevin, &c.wayne, &c.keith, &c.ann] {
        let got = w.take(u);
        assert_eq!(got.len(), 1, "{u}: {got:?}");
        assert_eq!(from_nick(&got[0]).as_deref(), Some("Wayne"));
        assert_eq!(
            got[0]
                .get_child("show", CLIENT)
                .map(|s| s.text())
                .as_deref(),
            Some("away")
        );
        let self_status = statuses(&got[0]).contains(&"110".to_string());
        assert_eq!(self_status, u == &c.wayne, "{u}");
    }

    w.status(&c.scott, "Scott", "dnd");
    for u in [&c.wayne, &c.keith, &c.ann] {
        let got = w.take(u);
        assert_eq!(got.len(), 1, "{u}");
        assert_eq!(got[0].get_child("show", CLIENT).unwrap().text(), "dnd");
    }
}

/// A mirror user's leave: the mirror shows it locally and tells the master; the master shows it
/// to everyone else and does not send it back.
#[test]
fn leave_through_a_mirror() {
    let (mut w, c) = full_room();
    let (a, b) = (w.mark(Side::A), w.mark(Side::B));
    w.leave(&c.keith, "Keith");
    assert_eq!(
        names(&w.link(Side::A).since(a, Dir::ToMaster)),
        ["presence"]
    );
    assert!(w.link(Side::A).since(a, Dir::ToMirror).is_empty());
    assert_eq!(
        names(&w.link(Side::B).since(b, Dir::ToMirror)),
        ["presence"]
    );

    let own = presences(&w.take(&c.keith));
    assert_eq!(own.len(), 1);
    assert_eq!(own[0].kind.as_deref(), Some("unavailable"));
    assert_eq!(own[0].statuses, ["110"]);
    for u in [&c.scott, &c.kevin, &c.wayne, &c.ann] {
        let p = presences(&w.take(u));
        assert_eq!(p.len(), 1, "{u}: {p:?}");
        assert_eq!(
            (p[0].nick.as_str(), p[0].kind.as_deref()),
            ("Keith", Some("unavailable"))
        );
        assert_eq!(p[0].role.as_deref(), Some("none"));
        assert!(p[0].statuses.is_empty(), "{u}: {p:?}");
    }
    assert_eq!(w.mirror(Side::A).local_occupants(ROOM).len(), 1);
    assert!(!w.master.room.occupants.contains_key("Keith"));
}

/// A user behind a mirror whose stream closes without a leave: their server makes the unavailable
/// presence, and the mirror leaves the room for them, as the server would for a directed
/// presence it had recorded (found on real servers by tests/integration/test_attacker.py: the
/// user stayed in the room). Everyone sees the leave, with its status; nothing else moves.
#[test]
fn going_offline_leaves_the_room() {
    let (mut w, c) = full_room();
    let a = w.mark(Side::A);
    assert_eq!(w.go_offline(&c.keith), 1);
    assert_eq!(
        names(&w.link(Side::A).since(a, Dir::ToMaster)),
        ["presence"]
    );
    for u in [&c.scott, &c.kevin, &c.wayne, &c.ann] {
        let p = presences(&w.take(u));
        assert_eq!(p.len(), 1, "{u}: {p:?}");
        assert_eq!(
            (p[0].nick.as_str(), p[0].kind.as_deref()),
            ("Keith", Some("unavailable"))
        );
    }
    assert!(!w.master.room.occupants.contains_key("Keith"));
    assert_eq!(w.mirror(Side::A).local_occupants(ROOM).len(), 1);
    // Once gone, again: nothing to leave. Another user's presence, or one with a `to`, is no
    // broadcast of Wayne's.
    assert_eq!(w.go_offline(&c.keith), 0);
    let now = w.now;
    let m = w.mirror_mut(Side::A);
    for other in [
        format!(
            "<presence from='{}' type='unavailable' to='{ROOM}/Wayne'/>",
            c.wayne
        ),
        format!("<presence from='{}'/>", c.wayne),
    ] {
        assert_eq!(
            m.handle_local_unavailable(now, &other).unwrap(),
            0,
            "{other}"
        );
    }
    assert_eq!(w.mirror(Side::A).local_occupants(ROOM).len(), 1);
}

/// When its last local user leaves, the mirror leaves the room: nothing more crosses to it.
#[test]
fn last_local_user_leaving_silences_the_link() {
    let (mut w, c) = full_room();
    w.leave(&c.keith, "Keith");
    w.leave(&c.wayne, "Wayne");
    assert!(w.mirror(Side::A).rooms().is_empty());
    assert_eq!(w.master.engine.mirrors(ROOM), [B_MIRROR]);

    let mark = w.mark(Side::A);
    let (wayne_had, keith_had) = (w.inbox(&c.wayne).len(), w.inbox(&c.keith).len());
    w.say(&c.scott, "anyone?");
    w.status(&c.kevin, "Kevin", "away");
    w.say(&c.ann, "me");
    w.join(&user(Side::Master, "bob"), "Bob");
    w.leave(&c.ann, "Ann");
    assert_eq!(
        w.link(Side::A).log.len(),
        mark,
        "traffic to an empty mirror"
    );
    assert!(w.master.engine.mirrors(ROOM).is_empty());
    assert_eq!(w.inbox(&c.wayne).len(), wayne_had);
    assert_eq!(w.inbox(&c.keith).len(), keith_had);
}

/// A members-only room refuses a non-member behind a mirror. DMUC3 §Failure case: the error goes
/// to the user's escaped JID at the mirror, and only that user is told.
#[test]
fn refused_join_reaches_only_that_user_via_the_escaped_jid() {
    let mut w = World::new();
    let c = cast();
    w.master.room.members_only = true;
    w.master
        .room
        .affiliations
        .insert(format!("keith@{A_DOMAIN}"), "member".into());
    w.join(&c.scott, "Scott");
    w.join(&c.keith, "Keith");
    w.clear_inboxes();

    let mark = w.mark(Side::A);
    w.join(&c.wayne, "Wayne");
    let down = w.link(Side::A).since(mark, Dir::ToMirror);
    assert_eq!(down.len(), 1);
    assert_eq!(
        down[0].attr("to"),
        Some(r"wayne\40raleigh.tridsys.com\2fpc@mirror.raleigh.tridsys.com")
    );
    let got = w.take(&c.wayne);
    assert_eq!(
        errors(&got),
        [("presence".into(), "registration-required".into())]
    );
    assert_eq!(got[0].attr("to"), Some(c.wayne.as_str()));
    assert!(w.inbox(&c.keith).is_empty());
    assert!(w.inbox(&c.scott).is_empty());
    assert_eq!(w.master.engine.remote_occupants(ROOM).len(), 1);

    // The mirror forgot the failed join: once a member, Wayne gets in.
    w.master
        .room
        .affiliations
        .insert(format!("wayne@{A_DOMAIN}"), "member".into());
    w.join(&c.wayne, "Wayne");
    assert_eq!(
        presences(&w.take(&c.wayne)).last().unwrap().statuses,
        ["110"]
    );
}

/// The same refusal with the room's checks before the engine's (as mod_dmuc first did, and as a
/// master without dmuc does): the error goes straight to the user; the mirror sees it pass,
/// forgets the join, and closes the room.
#[test]
fn refused_first_join_with_room_checks_first() {
    let mut w = World::new();
    let c = cast();
    w.master.room.members_only = true;
    w.master.room.access_order = model::AccessOrder::RoomFirst;
    w.join(&c.scott, "Scott");
    w.clear_inboxes();
    w.join(&c.wayne, "Wayne");
    let got = w.take(&c.wayne);
    assert_eq!(
        errors(&got),
        [("presence".into(), "registration-required".into())]
    );
    assert!(w.mirror(Side::A).rooms().is_empty(), "pending join kept");
    assert!(w.inbox(&c.scott).is_empty());
    assert!(w.master.engine.remote_occupants(ROOM).is_empty());
    assert_eq!(w.mirror(Side::A).poll_timeout(), None);
}

/// DMUC3 §Business Rules: no nick changes through a mirror. The mirror refuses them itself; if
/// one reaches the master anyway, the master refuses it too, through the escaped JID.
#[test]
fn nick_change_through_a_mirror_is_not_acceptable() {
    let (mut w, c) = full_room();
    let mark = w.mark(Side::A);
    w.join(&c.wayne, "Dwayne");
    assert_eq!(
        w.link(Side::A).log.len(),
        mark,
        "the mirror asked the master"
    );
    let got = w.take(&c.wayne);
    assert_eq!(errors(&got), [("presence".into(), "not-acceptable".into())]);
    assert_eq!(from_nick(&got[0]).as_deref(), Some("Dwayne"));
    assert!(w.inbox(&c.scott).is_empty());

    // A mirror that let it through: the master's backstop.
    let forwarded = format!(
        "<presence from='{}' to='{ROOM}/Dwayne'><x xmlns='{MUC}'/><dmuc xmlns='{DMUC}' from='{A_MIRROR}'/></presence>",
        c.wayne
    );
    let now = w.now;
    w.master.receive(now, &forwarded);
    let out = std::mem::take(&mut w.master.out);
    assert_eq!(out.len(), 1);
    let e = parse(&out[0]);
    assert_eq!(
        e.attr("to"),
        Some(r"wayne\40raleigh.tridsys.com\2fpc@mirror.raleigh.tridsys.com")
    );
    assert_eq!(error_condition(&e).as_deref(), Some("not-acceptable"));
    assert!(w.master.room.occupants.contains_key("Wayne"));
    assert!(!w.master.room.occupants.contains_key("Dwayne"));
}

/// whois=moderators: the mirror shows real JIDs to its moderators only; whois=anyone: to all.
#[test]
fn whois_hides_real_jids_from_non_moderators() {
    for anyone in [false, true] {
        let mut w = World::new();
        let c = cast();
        w.master.room.whois_anyone = anyone;
        w.master
            .room
            .affiliations
            .insert(format!("wayne@{A_DOMAIN}"), "admin".into());
        w.join(&c.kevin, "Kevin");
        w.join(&c.wayne, "Wayne");
        w.join(&c.keith, "Keith");
        w.join(&c.scott, "Scott");
        w.status(&c.kevin, "Kevin", "away");

        let keith = presences(w.inbox(&c.keith));
        let wayne = presences(w.inbox(&c.wayne));
        let jid_of = |seen: &[Seen], nick: &str| -> Vec<Option<String>> {
            seen.iter()
                .filter(|p| p.nick == nick)
                .map(|p| p.jid.clone())
                .collect()
        };
        let scott = Some(c.scott.clone());
        let kevin = Some(c.kevin.clone());
        // Wayne is a moderator: he always sees real JIDs.
        assert_eq!(jid_of(&wayne, "Scott"), vec![scott.clone()]);
        assert_eq!(jid_of(&wayne, "Kevin"), [kevin.clone(), kevin.clone()]);
        assert_eq!(jid_of(&wayne, "Keith"), [Some(c.keith.clone())]);
        // Keith is a participant: only in a non-anonymous room.
        let (s, k, wy) = if anyone {
            (scott, kevin, Some(c.wayne.clone()))
        } else {
            (None, None, None)
        };
        assert_eq!(jid_of(&keith, "Scott"), [s], "anyone={anyone}");
        assert_eq!(jid_of(&keith, "Kevin"), [k.clone(), k], "anyone={anyone}");
        assert_eq!(jid_of(&keith, "Wayne"), [wy], "anyone={anyone}");
        // His own JID, in his own presence, he may see.
        assert_eq!(jid_of(&keith, "Keith"), [Some(c.keith.clone())]);
    }
}

/// DMUC3 §Connection to master is lost, end to end: both sides show the other's users leaving
/// (333), A's users chat on locally while A queues, and on return presence resyncs both ways, the
/// queue reaches everyone else once and in order, and what the master side said meanwhile reaches
/// A's users once, through the history catch-up.
#[test]
fn link_loss_and_recovery() {
    let (mut w, c) = full_room();
    w.say(&c.scott, "before");
    w.clear_inboxes();

    w.cut(Side::A);
    for u in [&c.wayne, &c.keith] {
        let p = presences(&w.take(u));
        let mut gone: Vec<_> = p.iter().map(|p| p.nick.clone()).collect();
        gone.sort();
        assert_eq!(gone, ["Ann", "Kevin", "Scott"], "{u}");
        assert!(p.iter().all(|p| p.kind.as_deref() == Some("unavailable")));
        assert!(p.iter().all(|p| p.statuses == ["333"]), "{u}: {p:?}");
    }
    for u in [&c.scott, &c.kevin, &c.ann] {
        let p = presences(&w.take(u));
        let mut gone: Vec<_> = p.iter().map(|p| p.nick.clone()).collect();
        gone.sort();
        assert_eq!(gone, ["Keith", "Wayne"], "{u}");
        assert!(p.iter().all(|p| p.kind.as_deref() == Some("unavailable")));
        assert!(p.iter().all(|p| p.statuses == ["333"]), "{u}: {p:?}");
    }

    // (Local chat first: see `catch_up_after_interleaved_outage_chat` for the other order.)
    w.say(&c.wayne, "local 1");
    w.say(&c.keith, "local 2");
    w.say(&c.scott, "master 1");
    w.say(&c.ann, "master 2");
    assert_eq!(w.mirror(Side::A).queue_depth(ROOM), 2);
    for u in [&c.wayne, &c.keith] {
        assert_eq!(all_bodies(&w.take(u)), ["local 1", "local 2"], "{u}");
    }
    for u in [&c.scott, &c.kevin, &c.ann] {
        assert_eq!(all_bodies(&w.take(u)), ["master 1", "master 2"], "{u}");
    }

    w.restore(Side::A);
    assert_eq!(w.mirror(Side::A).queue_depth(ROOM), 0);
    for u in [&c.wayne, &c.keith] {
        let got = w.take(u);
        let mut back = joined_nicks(&got);
        back.sort();
        assert_eq!(back, ["Ann", "Kevin", "Scott"], "{u}: presence resync");
        assert!(left_nicks(&got).is_empty(), "{u}");
        assert_eq!(all_bodies(&got), ["master 1", "master 2"], "{u}: catch-up");
        assert!(got.iter().filter(|s| body(s).is_some()).all(is_delayed));
    }
    for u in [&c.scott, &c.kevin, &c.ann] {
        let got = w.take(u);
        let mut back = joined_nicks(&got);
        back.sort();
        assert_eq!(back, ["Keith", "Wayne"], "{u}: presence resync");
        assert_eq!(
            all_bodies(&got),
            ["local 1", "local 2"],
            "{u}: queued messages"
        );
    }
    let mut occupants = w.mirror(Side::A).occupants(ROOM);
    occupants.sort();
    assert_eq!(occupants, ["Ann", "Keith", "Kevin", "Scott", "Wayne"]);

    // And the room works as before.
    w.say(&c.kevin, "after");
    for u in [&c.scott, &c.kevin, &c.wayne, &c.keith, &c.ann] {
        assert_eq!(
            live_messages(&w.take(u)),
            [("Kevin".into(), "after".into())],
            "{u}"
        );
    }
    assert!(w.mirror_errors.is_empty(), "{:?}", w.mirror_errors);
    assert!(w.master.errors.is_empty(), "{:?}", w.master.errors);
}

/// The history catch-up after an outage must bring everything the master side said during it,
/// also what it said before A's users last spoke locally. The mirror asks for history `since` its
/// newest stored message, which is A's own last local message, so older master-side messages
/// of the outage are never delivered to A's users.
#[test]
fn catch_up_after_interleaved_outage_chat() {
    let (mut w, c) = full_room();
    w.cut(Side::A);
    w.say(&c.scott, "master 1");
    w.say(&c.wayne, "local 1");
    w.say(&c.ann, "master 2");
    w.say(&c.keith, "local 2");
    w.say(&c.kevin, "master 3");
    w.clear_inboxes();
    w.restore(Side::A);
    for u in [&c.wayne, &c.keith] {
        assert_eq!(
            all_bodies(&w.take(u)),
            ["master 1", "master 2", "master 3"],
            "{u}: catch-up"
        );
    }
    for u in [&c.scott, &c.kevin, &c.ann] {
        assert_eq!(all_bodies(&w.take(u)), ["local 1", "local 2"], "{u}");
    }
}

/// A join during the outage fails at once with remote-server-timeout; other mirrors are untouched.
#[test]
fn join_during_an_outage_fails_fast() {
    let (mut w, c) = full_room();
    w.cut(Side::A);
    w.clear_inboxes();
    let neo = user(Side::A, "neo");
    w.join(&neo, "Neo");
    assert_eq!(
        errors(&w.take(&neo)),
        [("presence".into(), "remote-server-timeout".into())]
    );
    assert!(w.inbox(&c.wayne).is_empty());
    w.say(&c.ann, "B is fine");
    assert_eq!(all_bodies(&w.take(&c.scott)), ["B is fine"]);
}

/// A stalled link (nobody told) holds traffic and then delivers it once, in order.
#[test]
fn stalled_link_delivers_held_traffic_once_in_order() {
    let (mut w, c) = full_room();
    w.stall(Side::A);
    w.say(&c.scott, "s1");
    w.say(&c.wayne, "w1");
    w.say(&c.scott, "s2");
    w.say(&c.keith, "k1");
    assert_eq!(all_bodies(w.inbox(&c.wayne)), ["w1", "k1"]);
    assert_eq!(all_bodies(w.inbox(&c.scott)), ["s1", "s2"]);
    w.restore(Side::A);
    // Each side sees its own messages first, then the other side's, each once.
    assert_eq!(all_bodies(&w.take(&c.wayne)), ["w1", "k1", "s1", "s2"]);
    assert_eq!(all_bodies(&w.take(&c.keith)), ["w1", "k1", "s1", "s2"]);
    assert_eq!(all_bodies(&w.take(&c.scott)), ["s1", "s2", "w1", "k1"]);
    assert_eq!(all_bodies(&w.take(&c.ann)), ["s1", "s2", "w1", "k1"]);
}

/// A join the master never answers fails after the mirror's timeout. If the join reaches the
/// master later, the user must not linger there as a ghost occupant.
#[test]
fn join_timeout_leaves_no_ghost() {
    let mut w = World::new();
    let c = cast();
    w.join(&c.scott, "Scott");
    w.stall(Side::A);
    w.join(&c.wayne, "Wayne");
    assert_eq!(
        w.mirror(Side::A).poll_timeout(),
        Some(w.now.plus_ms(30_000))
    );
    w.advance(30_000);
    assert_eq!(
        errors(&w.take(&c.wayne)),
        [("presence".into(), "remote-server-timeout".into())]
    );
    assert!(w.mirror(Side::A).rooms().is_empty());
    w.restore(Side::A);
    assert!(
        !w.master.room.occupants.contains_key("Wayne"),
        "the master shows a user who was told the join failed: {:?}",
        w.inbox(&c.scott).iter().map(xml).collect::<Vec<_>>()
    );
}

/// A subject change from a mirror user needs the master's consent: it comes back from the master
/// (to the origin mirror too, unlike a plain message) and every occupant sees it once.
#[test]
fn subject_change_through_a_mirror() {
    let (mut w, c) = full_room();
    let a = w.mark(Side::A);
    w.send(
        &c.wayne,
        &format!(
            "<message from='{}' to='{ROOM}' type='groupchat'><subject>Plans</subject></message>",
            c.wayne
        ),
    );
    assert_eq!(w.link(Side::A).since(a, Dir::ToMaster).len(), 1);
    assert_eq!(w.link(Side::A).since(a, Dir::ToMirror).len(), 1);
    for u in [&c.scott, &c.kevin, &c.wayne, &c.keith, &c.ann] {
        let got = w.take(u);
        assert_eq!(got.len(), 1, "{u}: {got:?}");
        assert_eq!(got[0].get_child("subject", CLIENT).unwrap().text(), "Plans");
        assert_eq!(from_nick(&got[0]).as_deref(), Some("Wayne"));
    }
    // A later local join gets the new subject from the mirror's copy.
    let neo = user(Side::A, "neo");
    w.join(&neo, "Neo");
    let got = w.take(&neo);
    assert_eq!(
        got.last()
            .unwrap()
            .get_child("subject", CLIENT)
            .unwrap()
            .text(),
        "Plans"
    );
}

/// A moderator on the master kicks a mirror user: the mirror shows the kick (307, and 110 to the
/// kicked user), forgets the user, and refuses their next message locally.
#[test]
fn kick_of_a_mirror_user() {
    let (mut w, c) = full_room();
    w.at_master(|m, now| m.kick(now, "Wayne"));
    let own = presences(&w.take(&c.wayne));
    assert_eq!(own.len(), 1, "{own:?}");
    assert_eq!(own[0].kind.as_deref(), Some("unavailable"));
    assert!(own[0].statuses.contains(&"307".to_string()));
    assert!(own[0].statuses.contains(&"110".to_string()));
    for u in [&c.keith, &c.scott, &c.ann] {
        let p = presences(&w.take(u));
        assert_eq!(p.len(), 1, "{u}");
        assert_eq!(p[0].statuses, ["307"], "{u}");
    }
    assert_eq!(
        w.mirror(Side::A).local_occupants(ROOM),
        [(c.keith.clone(), "Keith".to_string())]
    );
    let a = w.mark(Side::A);
    w.say(&c.wayne, "still here?");
    assert_eq!(
        errors(&w.take(&c.wayne)),
        [("message".into(), "not-acceptable".into())]
    );
    assert_eq!(w.mark(Side::A), a);
    assert!(w.inbox(&c.keith).is_empty());
}

/// Everyone at A leaves during an outage, after chatting. When the link returns the mirror has no
/// occupant to rejoin, but it still owes the master what they said: it joins each sender for the
/// delivery, sends their messages with the original time, and their leave; once a ping confirms
/// delivery it forgets the room instead of keeping it forever.
#[test]
fn everyone_leaving_during_an_outage_closes_the_room() {
    let (mut w, c) = full_room();
    w.cut(Side::A);
    w.say(&c.wayne, "bye");
    w.leave(&c.wayne, "Wayne");
    w.leave(&c.keith, "Keith");
    w.clear_inboxes();
    w.restore(Side::A);
    assert_eq!(all_bodies(&w.take(&c.scott)), ["bye"]);
    assert!(!w.master.room.occupants.contains_key("Wayne"));
    w.settle();
    assert!(
        w.mirror(Side::A).rooms().is_empty(),
        "mirror still holds the room, queue {} in flight {}",
        w.mirror(Side::A).queue_depth(ROOM),
        w.mirror(Side::A).in_flight(ROOM),
    );
    let a = w.mark(Side::A);
    w.say(&c.scott, "gone?");
    assert_eq!(w.mark(Side::A), a);
}

/// A user who leaves before the master confirmed the join (quick client exit, slow link). The
/// mirror cancels the pending join and forwards the leave; the master admits the join, then
/// processes the leave. The mirror's other users must not be left with a ghost: today the master's
/// copy of the join is shown to them as a new remote occupant, and the master suppresses its copy
/// of the leave (the mirror "announced" it), so the ghost stays.
#[test]
fn leave_before_the_join_is_confirmed() {
    let (mut w, c) = full_room();
    let neo = user(Side::A, "neo");
    w.inject(
        &neo,
        &format!("<presence from='{neo}' to='{ROOM}/Neo'><x xmlns='{MUC}'/></presence>"),
    );
    w.inject(
        &neo,
        &format!("<presence from='{neo}' to='{ROOM}/Neo' type='unavailable'/>"),
    );
    w.run();
    assert!(!w.master.room.occupants.contains_key("Neo"));
    assert!(
        !w.mirror(Side::A)
            .occupants(ROOM)
            .contains(&"Neo".to_string()),
        "mirror A keeps a ghost; Wayne saw {:?}",
        presences(w.inbox(&c.wayne))
    );
    let seen = presences(w.inbox(&c.wayne));
    let joins = seen
        .iter()
        .filter(|p| p.nick == "Neo" && p.kind.is_none())
        .count();
    let leaves = seen
        .iter()
        .filter(|p| p.nick == "Neo" && p.kind.is_some())
        .count();
    assert_eq!(
        joins, leaves,
        "Wayne saw Neo join {joins} times, leave {leaves} times"
    );
}

// ---- A host that cannot bracket presence broadcasts (`MasterConfig::unbracketed_presence`) ----

/// Without brackets the master forwards each presence to a mirror once. Everyone still sees every
/// join, status change and leave exactly once (`tests/properties.rs` checks that at random).
#[test]
fn unbracketed_host_joins_and_chat() {
    let mut w = World::unbracketed();
    let c = cast();
    for (u, n) in [
        (&c.scott, "Scott"),
        (&c.kevin, "Kevin"),
        (&c.wayne, "Wayne"),
        (&c.ann, "Ann"),
    ] {
        w.join(u, n);
    }
    w.clear_inboxes();
    let mark = w.mark(Side::A);
    w.join(&c.keith, "Keith");
    assert_eq!(
        names(&w.link(Side::A).since(mark, Dir::ToMaster)),
        ["presence"]
    );
    assert_eq!(
        names(&w.link(Side::A).since(mark, Dir::ToMirror)),
        ["presence"]
    );
    assert_eq!(
        joined_nicks(&w.take(&c.keith)),
        ["Ann", "Kevin", "Scott", "Wayne", "Keith"]
    );
    for u in [&c.scott, &c.kevin, &c.wayne, &c.ann] {
        assert_eq!(joined_nicks(&w.take(u)), ["Keith"], "{u}");
    }
    let mark = w.mark(Side::A);
    w.status(&c.scott, "Scott", "away");
    assert_eq!(w.link(Side::A).since(mark, Dir::ToMirror).len(), 1);
    for u in [&c.wayne, &c.keith, &c.ann] {
        assert_eq!(presences(&w.take(u)).len(), 1, "{u}");
    }
    w.say(&c.wayne, "hi");
    for u in [&c.scott, &c.kevin, &c.wayne, &c.keith, &c.ann] {
        assert_eq!(
            live_messages(&w.take(u)),
            [("Wayne".into(), "hi".into())],
            "{u}"
        );
    }
}

/// docs/protocol.md: "The master does not send a mirror ... the leave that mirror announced".
/// Without brackets it does: the forwarded copy of the leave crosses the link for nothing.
#[test]
fn unbracketed_host_does_not_echo_an_announced_leave() {
    let mut w = World::unbracketed();
    let c = cast();
    w.join(&c.scott, "Scott");
    w.join(&c.wayne, "Wayne");
    w.join(&c.keith, "Keith");
    let mark = w.mark(Side::A);
    w.leave(&c.keith, "Keith");
    assert_eq!(
        names(&w.link(Side::A).since(mark, Dir::ToMaster)),
        ["presence"]
    );
    assert!(
        w.link(Side::A).since(mark, Dir::ToMirror).is_empty(),
        "echoed: {:?}",
        w.link(Side::A)
            .since(mark, Dir::ToMirror)
            .iter()
            .map(xml)
            .collect::<Vec<_>>()
    );
    assert_eq!(left_nicks(w.inbox(&c.wayne)), ["Keith"]);
}

/// The roster already tells a new mirror who is in; without brackets the occupant list the room
/// sends the first joiner is forwarded too, one presence per occupant, for nothing.
#[test]
fn unbracketed_first_join_sends_the_occupants_once() {
    let mut w = World::unbracketed();
    let c = cast();
    w.join(&c.scott, "Scott");
    w.join(&c.kevin, "Kevin");
    let mark = w.mark(Side::A);
    w.join(&c.wayne, "Wayne");
    let presences: Vec<String> = w
        .link(Side::A)
        .since(mark, Dir::ToMirror)
        .iter()
        .filter(|s| s.name() == "presence")
        .map(|s| from_nick(s).unwrap_or_default())
        .collect();
    assert_eq!(presences, ["Wayne"], "roster plus occupant presences");
}

/// A silent partition (nobody is told; bytes just stop) found by pings alone. A's messages sent
/// into it are in flight: when a ping goes unanswered the mirror shows the master's users gone
/// (333) and queues them again; the master, hearing no pings, evicts A's users. When the link
/// heals, the stalled copies arrive first, and the copies sent again after the resync are
/// dropped by origin-id: every message reaches the master's users exactly once.
#[test]
fn silent_partition_found_by_pings_delivers_exactly_once() {
    let (mut w, c) = full_room();
    w.clear_inboxes();
    w.stall(Side::A);
    w.say(&c.wayne, "into the void 1");
    w.say(&c.keith, "into the void 2");
    assert_eq!(w.mirror(Side::A).in_flight(ROOM), 2);
    // No acknowledgement comes: a ping round a ping timeout later, which goes unanswered too.
    let found = w
        .advance_until(100, 400_000, |w| !w.mirror(Side::A).link_up(MUC_SERVICE))
        .expect("the mirror finds out");
    assert!(
        found <= 40_100,
        "two ping timeouts after the messages: {found} ms"
    );
    assert_eq!(w.mirror(Side::A).queue_depth(ROOM), 2);
    let p = presences(&w.take(&c.wayne));
    assert!(p.iter().all(|p| p.statuses == ["333"]), "{p:?}");
    w.say(&c.wayne, "during");
    // The master's link timeout passes: A's users are evicted there.
    w.advance_until(1_000, 400_000, |w| {
        !w.master.room.occupants.contains_key("Wayne")
    })
    .expect("the master's link timeout");
    w.say(&c.scott, "master during");
    for u in [&c.scott, &c.kevin, &c.ann] {
        w.take(u);
    }

    w.restore(Side::A);
    w.settle();
    assert!(w.mirror(Side::A).link_up(MUC_SERVICE));
    for u in [&c.scott, &c.kevin, &c.ann] {
        assert_eq!(
            all_bodies(&w.take(u)),
            ["into the void 1", "into the void 2", "during"],
            "{u}: each of A's messages once, in order"
        );
    }
    let got = w.take(&c.wayne);
    assert_eq!(
        all_bodies(&got)
            .into_iter()
            .filter(|b| b == "master during")
            .count(),
        1,
        "{got:?}"
    );
    assert!(w.master.room.occupants.contains_key("Wayne"));
    let mut view = w.mirror(Side::A).occupants(ROOM);
    view.sort();
    assert_eq!(view, ["Ann", "Keith", "Kevin", "Scott", "Wayne"]);
    assert!(w.mirror_errors.is_empty(), "{:?}", w.mirror_errors);
    assert!(w.master.errors.is_empty(), "{:?}", w.master.errors);
}

/// A black hole (stanzas lost, nobody told) at the default timers. The mirror finds it within a
/// ping interval plus its timeout of the last traffic. While it lasts the mirror probes 1 s after,
/// then 2 s, 4 s, … up to the interval: ten minutes down cost about nine probe rounds of one ping
/// each (nothing waits for an acknowledgement), and the link's return is found within one
/// interval. A local message while the link is down probes at once, so with the link back the
/// first message finds it, and goes out.
#[test]
fn probes_back_off_while_down_and_a_local_message_probes_at_once() {
    let (mut w, c) = full_room();
    w.black_hole(Side::A);
    let found = w
        .advance_until(100, 400_000, |w| !w.mirror(Side::A).link_up(MUC_SERVICE))
        .expect("the black hole is found");
    assert!(found <= 320_100, "within interval + timeout: {found} ms");
    // Ten minutes down. Each round is one ping, from the mirror service.
    let before = w.link(Side::A).dropped_pings;
    w.advance_until(1_000, 600_000, |_| false);
    let rounds = w.link(Side::A).dropped_pings - before;
    // 1 + 2 + 4 + … + 256 s: 9 rounds, give or take the edges.
    assert!(
        (8..=10).contains(&rounds),
        "{rounds} probe rounds in ten minutes"
    );
    w.restore(Side::A);
    let back = w
        .advance_until(100, 301_000, |w| w.mirror(Side::A).link_up(MUC_SERVICE))
        .expect("the return is found");
    assert!(back <= 300_100, "within one interval: {back} ms");
    w.settle();
    w.clear_inboxes();

    // Down again, long enough for the probes to be an interval apart.
    w.black_hole(Side::A);
    w.advance_until(100, 400_000, |w| !w.mirror(Side::A).link_up(MUC_SERVICE))
        .expect("found again");
    w.advance_until(1_000, 900_000, |_| false);
    // Just after a probe round went into the void: the next is an interval away.
    let dropped = w.link(Side::A).dropped;
    w.advance_until(100, 301_000, |w| w.link(Side::A).dropped > dropped)
        .expect("a probe round");
    w.restore(Side::A);
    w.say(&c.wayne, "is anyone there?");
    // The host runs the engine's timer at once (it is due now): within a step.
    let back = w
        .advance_until(100, 30_000, |w| w.mirror(Side::A).link_up(MUC_SERVICE))
        .expect("the message's probe finds the link");
    assert!(back <= 100, "at once: {back} ms");
    w.settle();
    for u in [&c.scott, &c.kevin, &c.ann] {
        assert_eq!(all_bodies(&w.take(u)), ["is anyone there?"], "{u}");
    }
    assert!(w.mirror_errors.is_empty(), "{:?}", w.mirror_errors);
    assert!(w.master.errors.is_empty(), "{:?}", w.master.errors);
}

/// An s2s reset at the default timers: the sessions close and new ones fail. The master probes
/// the mirror when its sessions close; no answer within the probe timeout (5 s) evicts the
/// mirror's users there, instead of after the link timeout (120 s). The mirror, told of its
/// closed sessions too, pings at once and shows the master's users gone once that ping times out.
#[test]
fn a_reset_evicts_the_mirrors_users_within_the_probe_timeout() {
    let (mut w, c) = full_room();
    w.s2s_close(Side::A, true);
    let evicted = w
        .advance_until(100, 130_000, |w| {
            !w.master.room.occupants.contains_key("Wayne")
        })
        .expect("the master evicts A's users");
    assert!(evicted <= 5_100, "within the probe timeout: {evicted} ms");
    assert!(!w.master.room.occupants.contains_key("Keith"));
    let p = presences(&w.take(&c.scott));
    assert!(
        p.iter().any(|p| p.statuses == ["333"]),
        "shown leaving for a technical reason: {p:?}"
    );
    let lost = w
        .advance_until(100, 60_000, |w| !w.mirror(Side::A).link_up(MUC_SERVICE))
        .map(|t| t + evicted)
        .expect("the mirror finds out");
    assert!(
        lost <= 20_100,
        "within a ping timeout of the close: {lost} ms"
    );
    // The link comes back: the mirror's probes find it, and everyone is back on both sides.
    w.restore(Side::A);
    w.settle();
    assert!(w.master.room.occupants.contains_key("Wayne"));
    let mut view = w.mirror(Side::A).occupants(ROOM);
    view.sort();
    assert_eq!(view, ["Ann", "Keith", "Kevin", "Scott", "Wayne"]);
    assert!(w.mirror_errors.is_empty(), "{:?}", w.mirror_errors);
    assert!(w.master.errors.is_empty(), "{:?}", w.master.errors);
}

/// Servers close idle s2s sessions. The master's probe after the close is answered over a new
/// session: nobody is evicted, nobody is shown leaving.
#[test]
fn an_idle_close_evicts_nobody() {
    let (mut w, c) = full_room();
    let mark = w.mark(Side::A);
    w.s2s_close(Side::A, false);
    w.advance_until(100, 30_000, |_| false);
    let probes: Vec<_> = w
        .link(Side::A)
        .since(mark, Dir::ToMirror)
        .into_iter()
        .filter(|s| s.attr("id").is_some_and(|i| i.starts_with("dmuc-probe-")))
        .collect();
    // One per closed session (the users' domain's, the mirror service's): each replaces the
    // one before, which may have gone into the closing connection.
    assert_eq!(probes.len(), 2, "a probe per closed session: {probes:?}");
    assert!(w.master.room.occupants.contains_key("Wayne"));
    for u in [&c.scott, &c.kevin, &c.wayne] {
        let p = presences(&w.take(u));
        assert!(
            p.iter()
                .all(|p| p.statuses.is_empty() || p.statuses != ["333"]),
            "{u}: {p:?}"
        );
    }
    assert!(w.mirror(Side::A).link_up(MUC_SERVICE));
    assert!(w.mirror_errors.is_empty(), "{:?}", w.mirror_errors);
    assert!(w.master.errors.is_empty(), "{:?}", w.master.errors);
}

/// The mirror's server restarts while messages are queued. The host stored the queue; the new
/// mirror imports it, waits for a ping answer, then joins each sender for the delivery (their
/// sessions died with the server), sends their messages with the time they were written, and
/// their leave. Nothing is lost, nothing is doubled.
#[test]
fn a_restarted_mirror_delivers_its_stored_queue() {
    let (mut w, c) = full_room();
    w.cut(Side::A);
    w.say(&c.wayne, "queued 1");
    w.say(&c.keith, "queued 2");
    // What the host stored, item by item, loaded in any order (here: newest first).
    let stored: Vec<String> = w.stores[&Side::A].values().rev().cloned().collect();
    assert_eq!(stored.len(), 2);
    // The server restarts: every local session is gone, the engine starts afresh.
    let mut fresh = dmuc::mirror::Mirror::new(dmuc::mirror::MirrorConfig::new(
        A_MIRROR,
        vec![MUC_SERVICE.into()],
    ));
    assert_eq!(fresh.import_queue(w.now, &stored), 2);
    assert!(
        !fresh.link_up(MUC_SERVICE),
        "nothing is sent before a ping is answered"
    );
    w.mirrors.insert(Side::A, fresh);
    w.clear_inboxes();
    w.restore(Side::A);
    w.settle();
    for u in [&c.scott, &c.ann] {
        let got = w.take(u);
        assert_eq!(all_bodies(&got), ["queued 1", "queued 2"], "{u}");
        assert!(got.iter().filter(|m| body(m).is_some()).all(is_delayed));
    }
    assert!(!w.master.room.occupants.contains_key("Wayne"));
    assert!(!w.master.room.occupants.contains_key("Keith"));
    assert!(w.mirror(Side::A).rooms().is_empty());
    assert!(w.mirror(Side::A).export_queue().is_empty());
    assert!(
        w.stores[&Side::A].is_empty(),
        "delivered: nothing left stored"
    );
    assert!(w.master.errors.is_empty(), "{:?}", w.master.errors);
}

/// A stored item goes to its own room, from its own sender, whatever its stanza says: a damaged
/// or edited store cannot make the mirror send elsewhere (found by the `mirror` fuzz target: an
/// item whose message said `to=''`).
#[test]
fn a_tampered_stored_item_goes_to_its_room() {
    let (mut w, c) = full_room();
    w.cut(Side::A);
    w.say(&c.wayne, "queued");
    let stored: Vec<String> = w.stores[&Side::A]
        .values()
        .map(|x| {
            x.replacen(&format!("to='{ROOM}'"), "to=''", 1).replacen(
                &format!("from='{}'", c.wayne),
                "from='eve@evil.example/x'",
                1,
            )
        })
        .collect();
    assert!(stored.iter().all(|x| x.contains("to=''")), "{stored:?}");
    let mut fresh = dmuc::mirror::Mirror::new(dmuc::mirror::MirrorConfig::new(
        A_MIRROR,
        vec![MUC_SERVICE.into()],
    ));
    assert_eq!(fresh.import_queue(w.now, &stored), 1);
    w.mirrors.insert(Side::A, fresh);
    w.clear_inboxes();
    w.restore(Side::A);
    w.settle();
    assert_eq!(all_bodies(&w.take(&c.scott)), ["queued"]);
    assert!(w.master.errors.is_empty(), "{:?}", w.master.errors);
}

/// A leave queued while the link is down is of the user's nick, whatever nick it named; a stored
/// one naming another (as an older build stored it) is re-addressed on import, and the store
/// then holds what will be sent (found by the mirror fuzz target: the store drifted).
#[test]
fn a_queued_leave_is_of_the_users_nick_and_stored_as_sent() {
    let (mut w, c) = full_room();
    w.cut(Side::A);
    w.send(
        &c.wayne,
        &format!(
            "<presence from='{}' to='{ROOM}/Someone' type='unavailable'/>",
            c.wayne
        ),
    );
    let stored: Vec<String> = w.stores[&Side::A].values().cloned().collect();
    assert_eq!(stored.len(), 1, "{stored:?}");
    assert!(
        stored[0].contains(&format!("to='{ROOM}/Wayne'")),
        "{stored:?}"
    );
    let older = |x: &String| {
        x.replace(
            &format!("to='{ROOM}/Wayne'"),
            &format!("to='{ROOM}/Someone'"),
        )
    };
    let store = w.stores.get_mut(&Side::A).unwrap();
    for v in store.values_mut() {
        *v = older(v);
    }
    let older: Vec<String> = store.values().cloned().collect();
    let mut fresh = dmuc::mirror::Mirror::new(dmuc::mirror::MirrorConfig::new(
        A_MIRROR,
        vec![MUC_SERVICE.into()],
    ));
    assert_eq!(fresh.import_queue(w.now, &older), 1);
    w.mirrors.insert(Side::A, fresh);
    // The world checks, as it drains the mirror, that the store equals the queue.
    w.drain_mirror(Side::A);
    assert!(w.stores[&Side::A]
        .values()
        .all(|x| x.contains(&format!("to='{ROOM}/Wayne'"))));
    let mark = w.links[&Side::A].log.len();
    w.restore(Side::A);
    w.settle();
    let sent = w.links[&Side::A].since(mark, Dir::ToMaster);
    assert!(
        sent.iter().any(|p| p.name() == "presence"
            && p.attr("to") == Some(&format!("{ROOM}/Wayne"))
            && p.attr("type") == Some("unavailable")),
        "{sent:?}"
    );
    assert!(w.stores[&Side::A].is_empty(), "sent and acknowledged");
}

/// Storage changes per item: without write-behind (`store_after_ms` 0), a message sent at once
/// and acknowledged by the next ping answer costs the host one put and one delete, however many
/// other messages are in flight.
#[test]
fn each_message_costs_one_put_and_one_delete() {
    let mut w = World::new();
    w.configure_mirrors(|c| c.store_after_ms = 0);
    let (mut w, c) = full_room_in(w);
    w.settle();
    let before = w.store_ops[&Side::A];
    // A slow link: the acknowledgements take their time.
    w.inject_step_ms = 10;
    w.stall(Side::A);
    for i in 0..50 {
        w.say(&c.wayne, &format!("m{i}"));
    }
    assert_eq!(w.stores[&Side::A].len(), 50, "in flight until acknowledged");
    assert_eq!(
        w.store_ops[&Side::A] - before,
        50,
        "one put each, nothing rewritten"
    );
    w.restore(Side::A);
    w.settle();
    assert!(w.stores[&Side::A].is_empty());
    assert_eq!(w.store_ops[&Side::A] - before, 100, "and one delete each");
    assert_eq!(all_bodies(&w.take(&c.scott)).len(), 50);
}

/// A store written by a version before per-item storage (one list, items without keys) is
/// imported in its order; the mirror gives each item a key and asks the host to store it so.
#[test]
fn a_store_from_before_per_item_keys_is_taken_over() {
    let (mut w, c) = full_room();
    w.cut(Side::A);
    w.say(&c.wayne, "old 1");
    w.say(&c.keith, "old 2");
    let legacy: Vec<String> = w.stores[&Side::A]
        .values()
        .map(|x| {
            let at = x.find(" seq='").unwrap();
            let end = at + x[at + 6..].find('\'').unwrap() + 7;
            format!("{}{}", &x[..at], &x[end..])
        })
        .collect();
    assert!(legacy.iter().all(|x| !x.contains("seq=")));
    let mut fresh = dmuc::mirror::Mirror::new(dmuc::mirror::MirrorConfig::new(
        A_MIRROR,
        vec![MUC_SERVICE.into()],
    ));
    assert_eq!(fresh.import_queue(w.now, &legacy), 2);
    let puts: Vec<dmuc::mirror::StoreOp> = std::iter::from_fn(|| fresh.poll_store()).collect();
    assert_eq!(puts.len(), 2);
    assert!(
        matches!(&puts[0], dmuc::mirror::StoreOp::Put { key: 1, item } if item.contains("old 1"))
    );
    assert!(
        matches!(&puts[1], dmuc::mirror::StoreOp::Put { key: 2, item } if item.contains("old 2"))
    );
}

/// The s2s connection dies under messages already written into it; they are lost without a
/// bounce, and the next connection comes up at once. A ping answered on the new connection must
/// not count them as delivered: the closed session makes the mirror send them again, ahead of
/// anything newer, and the master shows each once, in order.
#[test]
fn messages_lost_with_a_replaced_connection_are_sent_again() {
    let (mut w, c) = full_room();
    w.clear_inboxes();
    w.stall(Side::A);
    w.say(&c.wayne, "written into a dying connection");
    w.reconnect(Side::A);
    w.say(&c.wayne, "after the new connection");
    w.settle();
    assert_eq!(
        all_bodies(&w.take(&c.scott)),
        [
            "written into a dying connection",
            "after the new connection"
        ]
    );
    assert_eq!(w.mirror(Side::A).in_flight(ROOM), 0);
    assert!(w.mirror_errors.is_empty(), "{:?}", w.mirror_errors);
}

/// The same on the way back: the master's broadcasts die with a replaced connection, unbounced,
/// and the mirror never thought the link down. The closed session makes the mirror catch up from
/// the room's history, holding newer live messages behind it: A's users get each message once,
/// in order.
#[test]
fn broadcasts_lost_with_a_replaced_connection_come_from_a_catch_up() {
    let (mut w, c) = full_room();
    w.clear_inboxes();
    w.stall(Side::A);
    w.say(&c.scott, "lost on the way");
    w.reconnect(Side::A);
    w.say(&c.scott, "on the new connection");
    w.settle();
    for u in [&c.wayne, &c.keith] {
        assert_eq!(
            all_bodies(&w.take(u)),
            ["lost on the way", "on the new connection"],
            "{u}"
        );
    }
    assert!(w.mirror_errors.is_empty(), "{:?}", w.mirror_errors);
}

/// An owner's muc#owner form setting `muc#roomconfig_whois` (the model room's only setting).
fn whois_form(who: &str, id: &str, whois: &str) -> String {
    format!(
        "<iq from='{who}' to='{ROOM}' type='set' id='{id}'>\
         <query xmlns='http://jabber.org/protocol/muc#owner'><x xmlns='jabber:x:data' type='submit'>\
         <field var='FORM_TYPE'><value>http://jabber.org/protocol/muc#roomconfig</value></field>\
         <field var='muc#roomconfig_whois'><value>{whois}</value></field></x></query></iq>"
    )
}

/// The status codes of the room's config announcements among `stanzas`.
fn announcements(stanzas: &[Element]) -> Vec<Vec<String>> {
    stanzas
        .iter()
        .filter(|s| s.name() == "message" && from_nick(s).is_none())
        .map(statuses)
        .filter(|c| !c.is_empty())
        .collect()
}

/// The whois value of the `<config/>` IQ among `stanzas` (one expected).
fn pushed_whois(stanzas: &[Element]) -> Vec<String> {
    stanzas
        .iter()
        .filter_map(|s| s.get_child("config", DMUC0))
        .filter_map(|c| {
            c.get_child("x", DATA_FORMS)?
                .children()
                .find(|f| f.attr("var") == Some("muc#roomconfig_whois"))?
                .get_child("value", DATA_FORMS)
                .map(|v| v.text())
        })
        .collect()
}

/// A config change reaches each mirror before the broadcast announcing it, and the mirror serves
/// later joins by the new rule, as the room serves a direct joiner: made non-anonymous (172), a
/// participant joining through the mirror gets status 100 and every real JID, including those of
/// occupants whose presences the mirror was sent without them; semi-anonymous again (173), a
/// participant joining through the mirror sees none.
fn config_change_reaches_the_mirror_first(mut w: World) {
    let c = cast();
    let bob = user(Side::Master, "bob");
    w.join(&c.scott, "Scott");
    w.join(&c.wayne, "Wayne");
    // Bob joins after the mirror's sync: the mirror, with only a participant, gets his presence
    // without his real JID.
    w.join(&bob, "Bob");
    w.clear_inboxes();

    let mark = w.mark(Side::A);
    w.send(&c.scott, &whois_form(&c.scott, "cfg1", "anyone"));
    let down = w.link(Side::A).since(mark, Dir::ToMirror);
    assert_eq!(
        names(&down),
        ["iq", "message"],
        "{:?}",
        down.iter().map(xml).collect::<Vec<_>>()
    );
    assert_eq!(pushed_whois(&down), ["anyone"]);
    assert_eq!(announcements(&down), [["172"]]);
    assert_eq!(announcements(&w.take(&c.wayne)), [["172"]]);
    let scott_got = w.take(&c.scott);
    assert_eq!(scott_got[0].attr("type"), Some("result"));
    assert_eq!(announcements(&scott_got), [["172"]]);

    // A direct joiner is the oracle.
    w.join(&c.kevin, "Kevin");
    let direct = presences(&w.take(&c.kevin));
    w.join(&c.keith, "Keith");
    let mirrored = presences(&w.take(&c.keith));
    for (who, seen, own) in [("direct", &direct, "Kevin"), ("mirror", &mirrored, "Keith")] {
        let me = seen.iter().find(|p| p.nick == own).expect("own presence");
        assert!(me.statuses.contains(&"100".to_string()), "{who}: {me:?}");
        assert!(me.statuses.contains(&"110".to_string()), "{who}: {me:?}");
        let scott = seen.iter().find(|p| p.nick == "Scott").expect("Scott");
        assert_eq!(
            scott.jid.as_deref(),
            Some(c.scott.as_str()),
            "{who}: {seen:?}"
        );
        let wayne = seen.iter().find(|p| p.nick == "Wayne").expect("Wayne");
        assert_eq!(
            wayne.jid.as_deref(),
            Some(c.wayne.as_str()),
            "{who}: {seen:?}"
        );
        let bob_seen = seen.iter().find(|p| p.nick == "Bob").expect("Bob");
        assert_eq!(
            bob_seen.jid.as_deref(),
            Some(bob.as_str()),
            "{who}: {seen:?}"
        );
    }
    let keith_seen_by_wayne = presences(&w.take(&c.wayne));
    assert_eq!(
        keith_seen_by_wayne.len(),
        2,
        "Kevin and Keith: {keith_seen_by_wayne:?}"
    );
    for p in &keith_seen_by_wayne {
        assert!(!p.statuses.contains(&"100".to_string()), "{p:?}");
        assert!(!p.statuses.contains(&"110".to_string()), "{p:?}");
    }

    let mark = w.mark(Side::A);
    w.send(&c.scott, &whois_form(&c.scott, "cfg2", "moderators"));
    let down = w.link(Side::A).since(mark, Dir::ToMirror);
    assert_eq!(names(&down), ["iq", "message"]);
    assert_eq!(pushed_whois(&down), ["moderators"]);
    assert_eq!(announcements(&down), [["173"]]);
    w.clear_inboxes();

    let ann = user(Side::Master, "ann");
    let jack = user(Side::A, "jack");
    w.join(&ann, "Ann");
    let direct = presences(&w.take(&ann));
    w.join(&jack, "Jack");
    let mirrored = presences(&w.take(&jack));
    for (who, seen, own) in [("direct", &direct, "Ann"), ("mirror", &mirrored, "Jack")] {
        for p in seen.iter().filter(|p| p.nick != own) {
            assert_eq!(p.jid, None, "{who} sees a real JID: {p:?}");
        }
        let me = seen.iter().find(|p| p.nick == own).expect("own presence");
        assert!(!me.statuses.contains(&"100".to_string()), "{who}: {me:?}");
    }
    assert!(w.mirror_errors.is_empty(), "{:?}", w.mirror_errors);
    assert!(w.master.errors.is_empty(), "{:?}", w.master.errors);
}

#[test]
fn config_change_reaches_the_mirror_first_prosody() {
    config_change_reaches_the_mirror_first(World::new());
}

/// Without brackets and without the form (ejabberd announces before it applies the change): the
/// engine derives the whois rule from the announcement.
#[test]
fn config_change_reaches_the_mirror_first_unbracketed() {
    config_change_reaches_the_mirror_first(World::unbracketed());
}

/// A config change with no effect the mirror can see (the same form again) sends no config.
#[test]
fn unchanged_config_is_not_sent_again() {
    let mut w = World::new();
    let c = cast();
    w.join(&c.scott, "Scott");
    w.join(&c.wayne, "Wayne");
    let form = w.master.room.form();
    w.at_master(|m, now| {
        m.engine.handle_config(now, ROOM, Some(&form)).unwrap();
    });
    let mark = w.mark(Side::A);
    w.at_master(|m, now| {
        m.engine.handle_config(now, ROOM, Some(&form)).unwrap();
        m.room.members_only = true;
        let changed = m.room.form();
        m.engine.handle_config(now, ROOM, Some(&changed)).unwrap();
        m.drain_actions(now);
    });
    let down = w.link(Side::A).since(mark, Dir::ToMirror);
    assert_eq!(names(&down), ["iq"], "only the changed form crosses");
    assert!(w
        .master
        .engine
        .handle_config(w.now, ROOM, Some("<x/>"))
        .is_err());
}

/// Everything the room sends a user behind a mirror that is not a broadcast copy goes through
/// the mirror (to the user's escaped JID), on the stream of the broadcasts: an owner behind the
/// mirror gets the result of the config form before the announcement it caused, as a direct owner
/// does; private messages and the room's errors arrive through the mirror too.
#[test]
fn answers_from_the_room_go_through_the_mirror() {
    let mut w = World::new();
    let c = cast();
    w.master
        .room
        .affiliations
        .insert(format!("wayne@{A_DOMAIN}"), "owner".into());
    w.join(&c.scott, "Scott");
    w.join(&c.wayne, "Wayne");
    w.clear_inboxes();

    let mark = w.mark(Side::A);
    w.send(&c.wayne, &whois_form(&c.wayne, "cfg1", "anyone"));
    let down = w.link(Side::A).since(mark, Dir::ToMirror);
    assert_eq!(names(&down), ["iq", "iq", "message"]);
    assert_eq!(down[0].attr("type"), Some("result"));
    assert_eq!(
        down[0].attr("to"),
        Some(format!("wayne\\40{A_DOMAIN}\\2fpc@{A_MIRROR}").as_str())
    );
    assert!(down[1].get_child("config", DMUC0).is_some());
    let got = w.take(&c.wayne);
    assert_eq!(names(&got), ["iq", "message"]);
    assert_eq!(got[0].attr("type"), Some("result"));
    assert_eq!(got[0].attr("id"), Some("cfg1"));
    assert_eq!(got[0].attr("to"), Some(c.wayne.as_str()));
    assert_eq!(announcements(&got), [["172"]]);
    // The direct owner's order, for comparison.
    w.clear_inboxes();
    let mark_s = w.mark(Side::A);
    w.send(&c.scott, &whois_form(&c.scott, "cfg2", "moderators"));
    let scott_got = w.take(&c.scott);
    assert_eq!(names(&scott_got), ["iq", "message"]);
    assert_eq!(
        names(&w.link(Side::A).since(mark_s, Dir::ToMirror)),
        ["iq", "message"]
    );
    w.clear_inboxes();

    // A private message from the room, and an error from it.
    let mark = w.mark(Side::A);
    w.send(
        &c.scott,
        &format!(
            "<message from='{}' to='{ROOM}/Wayne' type='chat' id='pm1'><body>psst</body></message>",
            c.scott
        ),
    );
    w.send(
        &c.wayne,
        &format!("<message from='{}' to='{ROOM}/Nobody' type='chat' id='pm2'><body>hello?</body></message>", c.wayne),
    );
    let down = w.link(Side::A).since(mark, Dir::ToMirror);
    assert_eq!(names(&down), ["message", "message"]);
    for s in &down {
        assert!(
            s.attr("to")
                .is_some_and(|t| t.ends_with(&format!("@{A_MIRROR}"))),
            "{}",
            xml(s)
        );
    }
    let got = w.take(&c.wayne);
    assert_eq!(
        got.len(),
        2,
        "{:?}",
        got.iter().map(xml).collect::<Vec<_>>()
    );
    assert_eq!(got[0].attr("from"), Some(format!("{ROOM}/Scott").as_str()));
    assert_eq!(body(&got[0]).as_deref(), Some("psst"));
    assert_eq!(
        errors(&got[1..]),
        [("message".to_string(), "item-not-found".to_string())]
    );
    assert!(w.mirror_errors.is_empty(), "{:?}", w.mirror_errors);
}

/// Stanzas that are not from the room (the MUC service itself) keep their way.
#[test]
fn stanzas_not_from_the_room_are_not_rerouted() {
    let (mut w, c) = full_room();
    for s in [
        format!(
            "<iq from='{MUC_SERVICE}' to='{}' type='result' id='p'/>",
            c.wayne
        ),
        format!(
            "<message from='other@{MUC_SERVICE}/X' to='{}' type='chat'/>",
            c.wayne
        ),
    ] {
        assert_eq!(
            w.master.engine.handle_outbound(w.now, &s).unwrap(),
            dmuc::master::Outbound::Send,
            "{s}"
        );
    }
}

/// Without brackets (ejabberd), a user behind a mirror leaves and joins again while another user
/// keeps the mirror in the room: the master forwards the new join (its presence is the very one
/// forwarded before the leave, which the mirror announced itself and was not echoed).
#[test]
fn unbracketed_leave_then_rejoin_through_the_mirror() {
    let mut w = World::unbracketed();
    let c = cast();
    w.join(&c.scott, "Scott");
    w.join(&c.wayne, "Wayne");
    w.join(&c.keith, "Keith");
    w.leave(&c.wayne, "Wayne");
    w.clear_inboxes();

    let mark = w.mark(Side::A);
    w.join(&c.wayne, "Wayne");
    let down = w.link(Side::A).since(mark, Dir::ToMirror);
    assert_eq!(names(&down), ["presence"], "the join's one copy");
    let got = presences(&w.take(&c.wayne));
    let me = got
        .iter()
        .find(|p| p.nick == "Wayne")
        .expect("Wayne's own presence");
    assert!(me.statuses.contains(&"110".to_string()), "{got:?}");
    assert_eq!(joined_nicks(w.inbox(&c.keith)), ["Wayne"]);
    assert_eq!(joined_nicks(w.inbox(&c.scott)), ["Wayne"]);
    assert!(w
        .mirror(Side::A)
        .occupants(ROOM)
        .contains(&"Wayne".to_string()));

    // And once more, leaving and rejoining twice in a row.
    w.leave(&c.wayne, "Wayne");
    w.clear_inboxes();
    w.join(&c.wayne, "Wayne");
    assert!(presences(&w.take(&c.wayne))
        .iter()
        .any(|p| p.nick == "Wayne" && p.statuses.contains(&"110".to_string())));
}

/// Write-behind: a flood over a link that is up never reaches the store. The messages are held
/// back for `store_after` (2 s); the master acknowledges each as its room takes it, long before
/// any is due, and no ping goes. Virtual time: 50 messages 10 ms apart.
#[test]
fn a_flood_acknowledged_in_time_leaves_the_store_untouched() {
    let (mut w, c) = full_room();
    w.settle();
    let before = w.store_ops[&Side::A];
    let mark = w.mark(Side::A);
    w.inject_step_ms = 10;
    for i in 0..50 {
        w.say(&c.wayne, &format!("m{i}"));
    }
    assert!(w.mirror(Side::A).held_back().is_empty());
    assert!(
        w.mirror(Side::A).export_queue().is_empty(),
        "all acknowledged"
    );
    w.advance(5_000);
    assert_eq!(w.store_ops[&Side::A], before, "no put, no delete");
    assert!(w.stores[&Side::A].is_empty());
    assert_eq!(all_bodies(&w.take(&c.scott)).len(), 50);
    let pings = w
        .link(Side::A)
        .since(mark, Dir::ToMaster)
        .into_iter()
        .filter(|s| s.name() == "iq")
        .count();
    assert_eq!(pings, 0, "a busy link needs no ping");
}

/// The same flood to a master that sends no acknowledgements (an older dmuc): with ten or more
/// messages held back, the mirror pings at half `store_after`, and the answer acknowledges them
/// all before any is due.
#[test]
fn without_acknowledgements_a_flood_asks_for_an_early_ping() {
    let (mut w, c) = full_room();
    w.settle();
    w.drop_acks = true;
    let before = w.store_ops[&Side::A];
    w.inject_step_ms = 10;
    for i in 0..50 {
        w.say(&c.wayne, &format!("m{i}"));
    }
    assert_eq!(
        w.mirror(Side::A).held_back().len(),
        50,
        "held back, not stored"
    );
    assert_eq!(w.store_ops[&Side::A], before, "nothing stored yet");
    let pings = w.link(Side::A).count(Dir::ToMaster);
    // Half of store_after after the first message: the early ping round, answered at once.
    w.advance(1_000);
    assert!(
        w.link(Side::A).count(Dir::ToMaster) > pings,
        "an early ping round"
    );
    assert!(w.mirror(Side::A).held_back().is_empty());
    assert!(
        w.mirror(Side::A).export_queue().is_empty(),
        "all acknowledged"
    );
    w.advance(5_000);
    assert_eq!(w.store_ops[&Side::A], before, "no put, no delete");
    assert!(w.stores[&Side::A].is_empty());
    assert_eq!(all_bodies(&w.take(&c.scott)).len(), 50);
}

/// Write-behind on a stalled link: what the master has not acknowledged after `store_after` is
/// stored then (one put each), and deleted once a ping answer acknowledges it. Held messages go
/// to the store at a shutdown (`flush_store`), whatever their age.
#[test]
fn unacknowledged_messages_are_stored_when_due_or_at_shutdown() {
    let (mut w, c) = full_room();
    w.settle();
    let before = w.store_ops[&Side::A];
    w.inject_step_ms = 10;
    w.stall(Side::A);
    for i in 0..3 {
        w.say(&c.wayne, &format!("m{i}"));
    }
    assert_eq!(w.store_ops[&Side::A], before);
    w.advance(1_000);
    assert_eq!(w.store_ops[&Side::A], before, "not due yet");
    w.advance(1_000);
    assert_eq!(w.stores[&Side::A].len(), 3, "due: stored");
    assert_eq!(w.store_ops[&Side::A] - before, 3, "one put each");
    w.say(&c.wayne, "late");
    assert_eq!(w.mirror(Side::A).held_back().len(), 1);
    w.flush_store(Side::A);
    assert_eq!(
        w.stores[&Side::A].len(),
        4,
        "shutdown: the held one stored too"
    );
    w.restore(Side::A);
    w.settle();
    assert!(w.stores[&Side::A].is_empty(), "acknowledged: deleted");
    assert_eq!(
        w.store_ops[&Side::A] - before,
        8,
        "one put and one delete each"
    );
    assert_eq!(all_bodies(&w.take(&c.scott)), ["m0", "m1", "m2", "late"]);
}

/// Write-behind and refusals: the master loses A's users (its link timeout passed, say, while
/// the mirror's pings were late) but the link stays up, so held messages reach it, are refused
/// (`not-acceptable`), and go again once the mirror has rejoined their senders. Every message
/// reaches the master's users once, and the store ends empty: nothing put is left undeleted.
#[test]
fn refused_held_messages_are_sent_again_and_leave_nothing_stored() {
    let (mut w, c) = full_room();
    w.settle();
    w.clear_inboxes();
    w.inject_step_ms = 10;
    for i in 0..15 {
        w.say(&c.wayne, &format!("a{i}"));
    }
    // The master evicts A's users; the mirror is not told.
    w.at_master(|m, now| {
        m.link(now, Side::A.domain(), false);
        m.link(now, Side::A.mirror(), false);
        m.link(now, Side::A.domain(), true);
        m.link(now, Side::A.mirror(), true);
    });
    for i in 0..15 {
        w.say(&c.wayne, &format!("b{i}"));
    }
    w.advance(1_000);
    w.advance(3_000);
    w.settle();
    w.settle();
    let want: Vec<String> = (0..15)
        .map(|i| format!("a{i}"))
        .chain((0..15).map(|i| format!("b{i}")))
        .collect();
    assert_eq!(all_bodies(&w.take(&c.scott)), want);
    assert!(
        w.mirror(Side::A).export_queue().is_empty(),
        "all acknowledged"
    );
    assert!(w.mirror(Side::A).held_back().is_empty());
    assert!(w.stores[&Side::A].is_empty(), "{:?}", w.stores[&Side::A]);
}

/// Stanzas and bytes that crossed a link since `mark`, either way.
fn traffic_since(w: &World, side: Side, mark: usize) -> (usize, usize) {
    let log = &w.link(side).log[mark..];
    (log.len(), log.iter().map(|(_, x)| x.len()).sum())
}

/// Pings the mirror of `side` sent since `mark`.
fn pings_since(w: &World, side: Side, mark: usize) -> Vec<Element> {
    w.link(side)
        .since(mark, Dir::ToMaster)
        .into_iter()
        .filter(|s| s.name() == "iq" && s.has_child("ping", "urn:xmpp:ping"))
        .collect()
}

/// An idle hour at the default timers (virtual time): a room with users behind both mirrors,
/// nobody saying anything. Each mirror pings once every `ping_interval` (300 s) of quiet, one
/// ping per round, and nothing else crosses: at most twelve exchanges an hour. Nobody is
/// evicted, nobody shown leaving.
#[test]
fn an_idle_hour_costs_a_ping_exchange_per_five_minutes() {
    let (mut w, c) = full_room();
    w.settle();
    w.clear_inboxes();
    let mark = w.mark(Side::A);
    w.advance_until(1_000, 3_600_000, |_| false);
    let pings = pings_since(&w, Side::A, mark);
    let (stanzas, bytes) = traffic_since(&w, Side::A, mark);
    assert!(
        (11..=12).contains(&pings.len()),
        "{} pings in an hour",
        pings.len()
    );
    assert_eq!(stanzas, 2 * pings.len(), "only pings and their answers");
    assert!(bytes <= pings.len() * 300, "{bytes} B in an hour");
    println!(
        "idle hour: {} ping exchanges, {stanzas} stanzas, {bytes} B on mirror A's link",
        pings.len()
    );
    assert!(w.master.room.occupants.contains_key("Wayne"));
    assert!(w.mirror(Side::A).link_up(MUC_SERVICE));
    for u in [&c.scott, &c.wayne, &c.ann] {
        assert!(w.take(u).is_empty(), "{u} got something");
    }
}

/// A busy room costs no pings: both sides talk, and every stanza each way proves the link. The
/// mirror users' messages are acknowledged by the master (crate::ack), not by ping rounds.
#[test]
fn a_busy_room_costs_no_pings() {
    let (mut w, c) = full_room();
    w.settle();
    let mark = w.mark(Side::A);
    for i in 0..60 {
        w.say(&c.wayne, &format!("mirror side {i}"));
        w.advance(5_000);
        w.say(&c.scott, &format!("master side {i}"));
        w.advance(5_000);
    }
    assert_eq!(pings_since(&w, Side::A, mark), Vec::<Element>::new());
    assert_eq!(w.mirror(Side::A).in_flight(ROOM), 0, "all acknowledged");
    assert_eq!(all_bodies(&w.take(&c.scott)).len(), 120);
}

/// A room where only the mirror's users talk: the acknowledgements prove the link to the mirror,
/// the messages prove it to the master. No pings.
#[test]
fn a_room_busy_on_the_mirrors_side_costs_no_pings() {
    let (mut w, c) = full_room();
    w.settle();
    let mark = w.mark(Side::A);
    for i in 0..100 {
        w.say(&c.wayne, &format!("m{i}"));
        w.advance(9_000);
    }
    assert_eq!(pings_since(&w, Side::A, mark), Vec::<Element>::new());
    assert!(w.master.room.occupants.contains_key("Wayne"));
}

/// A room where only the master's users talk: the mirror hears the link alive, but the master
/// hears nothing from the mirror, so the mirror still pings once per interval (as in an idle
/// room), and the master keeps its users.
#[test]
fn a_room_busy_on_the_masters_side_pings_once_per_interval() {
    let (mut w, c) = full_room();
    w.settle();
    let mark = w.mark(Side::A);
    for i in 0..100 {
        w.say(&c.scott, &format!("m{i}"));
        w.advance(9_000);
    }
    let pings = pings_since(&w, Side::A, mark).len();
    assert!((3..=4).contains(&pings), "{pings} pings in 1000 s");
    assert!(w.master.room.occupants.contains_key("Wayne"));
    assert_eq!(all_bodies(&w.take(&c.wayne)).len(), 100);
}

/// DMUC3: "It needs no bandwidth for remote rooms without local occupants." The mirror's users
/// speak and leave; the master's acknowledgements settle what was in flight, and from then on
/// an hour passes with nothing at all from the mirror.
#[test]
fn a_mirror_without_occupants_sends_nothing() {
    let (mut w, c) = full_room();
    w.settle();
    w.say(&c.wayne, "bye");
    w.say(&c.keith, "bye too");
    w.leave(&c.keith, "Keith");
    w.leave(&c.wayne, "Wayne");
    assert!(w.mirror(Side::A).rooms().is_empty(), "the mirror left");
    let mark = w.mark(Side::A);
    w.advance_until(1_000, 3_600_000, |_| false);
    w.say(&c.scott, "still here");
    let from_mirror = w.link(Side::A).since(mark, Dir::ToMaster);
    assert_eq!(from_mirror, Vec::<Element>::new());
    assert_eq!(
        traffic_since(&w, Side::A, mark),
        (0, 0),
        "nothing either way"
    );
}
