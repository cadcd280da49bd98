//! The limits a master and a mirror put on what others may make them keep (issue 11): each
//! answered with `resource-constraint`, never silence, and nothing past a limit is kept.

mod common;

use common::xml::error_condition;
use common::*;
use dmuc::master::{Master, MasterConfig, PresenceVerdict, TrustedMirror};
use dmuc::mirror::{Mirror, MirrorConfig, Verdict};
use dmuc::mirror_quota::MirrorQuota;
use dmuc::Timestamp;
use minidom::Element;

const NOW: Timestamp = Timestamp(1_295_424_000_000);

fn master(config: impl FnOnce(&mut MasterConfig)) -> Master {
    let mut c = MasterConfig {
        trusted_mirrors: vec![TrustedMirror::new(A_MIRROR)],
        ..MasterConfig::default()
    };
    config(&mut c);
    Master::new(c)
}

fn out(next: impl FnMut() -> Option<String>) -> Vec<Element> {
    std::iter::from_fn(next)
        .map(|x| dmuc::stanza::parse(&x).expect("engine XML"))
        .collect()
}

fn join(user: &str, room: &str, nick: &str) -> String {
    format!(
        "<presence from='{user}' to='{room}/{nick}'><x xmlns='http://jabber.org/protocol/muc'/>\
         <dmuc xmlns='http://tridsys.com/protocol/dmuc' from='{A_MIRROR}'/></presence>"
    )
}

fn refused_with_resource_constraint(m: &mut Master, now: Timestamp, user: &str, room: &str) {
    assert_eq!(
        m.handle_presence(now, &join(user, room, "N"), Some("N")),
        Ok(PresenceVerdict::Refused)
    );
    let sent = out(|| m.poll_transmit());
    assert_eq!(sent.len(), 1, "{sent:?}");
    assert_eq!(
        error_condition(&sent[0]).as_deref(),
        Some("resource-constraint")
    );
    // The mirror's own user: told through the mirror, behind what it sent before.
    assert!(
        sent[0].attr("to").is_some_and(|t| t.ends_with(A_MIRROR)),
        "{:?}",
        sent[0]
    );
    assert!(!m.routes_via_mirror(user));
}

#[test]
fn rooms_per_mirror() {
    let mut m = master(|c| c.max_rooms_per_mirror = 2);
    let rooms = [
        "r1@conference.fairfax.tridsys.com",
        "r2@conference.fairfax.tridsys.com",
    ];
    for (i, room) in rooms.iter().enumerate() {
        let user = format!("u{i}@{A_DOMAIN}/pc");
        assert!(matches!(
            m.handle_presence(NOW, &join(&user, room, "N"), Some("N")),
            Ok(PresenceVerdict::MirrorJoin { .. })
        ));
    }
    // More occupants in a room it has are fine; a third room is not.
    let more = format!("more@{A_DOMAIN}/pc");
    assert!(matches!(
        m.handle_presence(NOW, &join(&more, rooms[0], "M"), Some("M")),
        Ok(PresenceVerdict::MirrorJoin { .. })
    ));
    let user = format!("third@{A_DOMAIN}/pc");
    refused_with_resource_constraint(&mut m, NOW, &user, "r3@conference.fairfax.tridsys.com");
}

/// A host with an engine per room (ejabberd) shares the service's quota among them: the room
/// limit counts across engines, and a room's engine gone frees its room.
#[test]
fn rooms_per_mirror_across_engines_of_one_service() {
    let quota = MirrorQuota::new(2, 20, 500);
    let config = MasterConfig {
        trusted_mirrors: vec![TrustedMirror::new(A_MIRROR)],
        ..MasterConfig::default()
    };
    let room = |i: usize| format!("r{i}@conference.fairfax.tridsys.com");
    let mut engines: Vec<Master> = (0..3)
        .map(|_| Master::with_quota(config.clone(), quota.share()))
        .collect();
    for (i, m) in engines.iter_mut().enumerate().take(2) {
        let user = format!("u{i}@{A_DOMAIN}/pc");
        assert!(matches!(
            m.handle_presence(NOW, &join(&user, &room(i), "N"), Some("N")),
            Ok(PresenceVerdict::MirrorJoin { .. })
        ));
    }
    let third = format!("third@{A_DOMAIN}/pc");
    refused_with_resource_constraint(&mut engines[2], NOW, &third, &room(2));
    // The first room's only occupant leaves: its room no longer counts.
    engines[0].handle_left(&room(0), &format!("u0@{A_DOMAIN}/pc"));
    assert_eq!(quota.rooms_of(A_MIRROR), 1);
    assert!(matches!(
        engines[2].handle_presence(NOW, &join(&third, &room(2), "N"), Some("N")),
        Ok(PresenceVerdict::MirrorJoin { .. })
    ));
    // The second room's process ends with its occupant still in: so does its count.
    let mut gone = engines.remove(1);
    gone.release_quota();
    drop(gone);
    assert_eq!(quota.rooms_of(A_MIRROR), 1);
}

#[test]
fn joins_per_second_per_mirror() {
    let mut m = master(|c| {
        c.mirror_join_rate = 1;
        c.mirror_join_burst = 3;
    });
    for i in 0..3 {
        let user = format!("u{i}@{A_DOMAIN}/pc");
        assert!(matches!(
            m.handle_presence(
                NOW,
                &join(&user, ROOM, &format!("N{i}")),
                Some(&format!("N{i}"))
            ),
            Ok(PresenceVerdict::MirrorJoin { .. })
        ));
    }
    let user = format!("late@{A_DOMAIN}/pc");
    refused_with_resource_constraint(&mut m, NOW, &user, ROOM);
    // A second later, one more may join.
    let later = Timestamp(NOW.0 + 1000);
    assert!(matches!(
        m.handle_presence(later, &join(&user, ROOM, "N"), Some("N")),
        Ok(PresenceVerdict::MirrorJoin { .. })
    ));
}

#[test]
fn local_occupants_and_rooms_at_a_mirror() {
    let mut config = MirrorConfig::new(A_MIRROR, vec![MUC_SERVICE.into()]);
    config.max_local_occupants = 2;
    config.max_rooms = 2;
    let mut m = Mirror::new(config);
    let local_join = |m: &mut Mirror, user: &str, room: &str| {
        let j = format!(
            "<presence from='{user}' to='{room}/{}' id='j'><x xmlns='http://jabber.org/protocol/muc'/></presence>",
            user.split('@').next().unwrap_or_default()
        );
        assert_eq!(m.handle_local(NOW, &j).unwrap(), Verdict::Consumed);
        out(|| m.poll_transmit())
    };
    for u in ["a", "b"] {
        let sent = local_join(&mut m, &format!("{u}@{A_DOMAIN}/pc"), ROOM);
        assert!(
            sent.iter()
                .any(|e| e.attr("to").is_some_and(|t| t.starts_with(ROOM))),
            "{sent:?}"
        );
    }
    let sent = local_join(&mut m, &format!("c@{A_DOMAIN}/pc"), ROOM);
    assert_eq!(
        sent.len(),
        1,
        "refused here, nothing to the master: {sent:?}"
    );
    assert_eq!(
        error_condition(&sent[0]).as_deref(),
        Some("resource-constraint")
    );
    assert_eq!(
        sent[0].attr("to"),
        Some(format!("c@{A_DOMAIN}/pc").as_str())
    );
    let second = "other@conference.fairfax.tridsys.com";
    assert!(!local_join(&mut m, &format!("d@{A_DOMAIN}/pc"), second).is_empty());
    let sent = local_join(
        &mut m,
        &format!("e@{A_DOMAIN}/pc"),
        "third@conference.fairfax.tridsys.com",
    );
    assert_eq!(sent.len(), 1, "{sent:?}");
    assert_eq!(
        error_condition(&sent[0]).as_deref(),
        Some("resource-constraint")
    );
}
