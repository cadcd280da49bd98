//! Fan-out costs, timed with `std::time::Instant` (no harness): `cargo bench --bench fanout`.
//!
//! 1. Mirror: one groupchat message from the master fanned out to 100 local occupants
//!    (`handle_remote` plus draining the 100 stanzas). Goal: at most 25 µs per message.
//! 2. Master: planning one broadcast for 1,000 occupants behind 10 mirrors, as a host makes it:
//!    `begin_broadcast`, then for each occupant `routes_via_mirror` and `handle_outbound`, then
//!    `end_broadcast` and draining the 10 copies.
//!
//! Each figure is the median of many timed runs, with the 10th and 90th percentiles.

use std::hint::black_box;
use std::time::{Duration, Instant};

use dmuc::master::{Master, MasterConfig, Outbound, PresenceVerdict, TrustedMirror};
use dmuc::mirror::{Mirror, MirrorConfig, Verdict};
use dmuc::Timestamp;

const ROOM: &str = "chatroom@conference.fairfax.example";
const SERVICE: &str = "conference.fairfax.example";
const MIRROR: &str = "mirror.raleigh.example";
const NOW: Timestamp = Timestamp(1_700_000_000_000);

struct Figures {
    p10: Duration,
    median: Duration,
    p90: Duration,
}

fn measure(runs: usize, mut f: impl FnMut()) -> Figures {
    for _ in 0..runs / 10 {
        f();
    }
    let mut times: Vec<Duration> = (0..runs)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed()
        })
        .collect();
    times.sort();
    Figures {
        p10: times[runs / 10],
        median: times[runs / 2],
        p90: times[runs * 9 / 10],
    }
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// A mirror of ROOM with `n` local occupants, fully synced.
fn mirror_with_locals(n: usize) -> Mirror {
    let mut m = Mirror::new(MirrorConfig::new(MIRROR, vec![SERVICE.into()]));
    let drain = |m: &mut Mirror| while m.poll_transmit().is_some() {};
    for i in 0..n {
        let user = format!("user{i}@raleigh.example/pc");
        let join = format!(
            "<presence from='{user}' to='{ROOM}/User{i}'><x xmlns='http://jabber.org/protocol/muc'/></presence>"
        );
        assert_eq!(m.handle_local(NOW, &join).unwrap(), Verdict::Consumed);
        if i == 0 {
            m.handle_remote(NOW, &format!(
                "<iq from='{ROOM}/User0' to='{MIRROR}' id='c' type='set'><config xmlns='urn:xmpp:dmuc:0'><x xmlns='jabber:x:data' type='form'/></config></iq>"
            )).unwrap();
            m.handle_remote(NOW, &format!(
                "<iq from='{ROOM}' to='{MIRROR}' id='r' type='set'><roster xmlns='urn:xmpp:dmuc:0'>\
                 <item affiliation='owner' role='moderator' jid='scott@fairfax.example/pc' name='Scott'/></roster></iq>"
            )).unwrap();
            let mut history_id = String::new();
            while let Some(x) = m.poll_transmit() {
                if x.contains("<room ") {
                    let at = x.find(" id='").unwrap() + 5;
                    history_id = x[at..at + x[at..].find('\'').unwrap()].to_string();
                }
            }
            m.handle_remote(NOW, &format!(
                "<iq from='{ROOM}' to='{MIRROR}' id='{history_id}' type='result'><history xmlns='http://jabber.org/protocol/muc'/></iq>"
            )).unwrap();
        }
        m.handle_remote(NOW, &format!(
            "<presence from='{ROOM}/User{i}' to='{MIRROR}'><x xmlns='http://jabber.org/protocol/muc#user'>\
             <item affiliation='none' role='participant' jid='{user}'/><status code='110'/></x></presence>"
        )).unwrap();
        drain(&mut m);
    }
    assert_eq!(m.local_occupants(ROOM).len(), n);
    m
}

fn bench_mirror_fanout() {
    const LOCALS: usize = 100;
    let mut m = mirror_with_locals(LOCALS);
    let message = format!(
        "<message from='{ROOM}/Scott' to='{MIRROR}' type='groupchat' id='m1'>\
         <body>All work and no play makes Jack a dull boy.</body></message>"
    );
    let f = measure(20_000, || {
        assert_eq!(m.handle_remote(NOW, &message).unwrap(), Verdict::Consumed);
        let mut n = 0;
        while let Some(x) = m.poll_transmit() {
            black_box(x);
            n += 1;
        }
        assert_eq!(n, LOCALS);
    });
    println!(
        "mirror fan-out of one message to {LOCALS} local occupants: median {:.1} µs/message \
         (p10 {:.1}, p90 {:.1}; goal <= 25 µs): {}",
        us(f.median),
        us(f.p10),
        us(f.p90),
        if us(f.median) <= 25.0 {
            "met"
        } else {
            "NOT met"
        }
    );
}

/// A groupchat message from one of five local occupants, as a Prosody mirror gets it under a
/// flood: `handle_local`, then its fan-out and its copy for the master taken as elements.
fn bench_mirror_local_message() {
    const LOCALS: usize = 5;
    let mut m = mirror_with_locals(LOCALS);
    let mut i = 0u64;
    let f = measure(2_000, || {
        i += 1;
        let message = format!(
            "<message from='user0@raleigh.example/pc' to='{ROOM}' type='groupchat' id='l{i}' xml:lang='en'>\
             <body>Status from the field: all stations nominal, next check 10 min.</body></message>"
        );
        assert_eq!(m.handle_local(NOW, &message).unwrap(), Verdict::Consumed);
        let mut n = 0;
        while let Some(x) = m.poll_transmit_element() {
            black_box(x.unwrap());
            n += 1;
        }
        assert!(n >= 2);
    });
    println!(
        "mirror, a local occupant's message among {LOCALS}: median {:.1} µs/message (p10 {:.1}, p90 {:.1})",
        us(f.median),
        us(f.p10),
        us(f.p90)
    );
}

fn bench_master_planning() {
    const MIRRORS: usize = 10;
    const OCCUPANTS: usize = 1_000;
    let mut m = Master::new(MasterConfig {
        trusted_mirrors: (0..MIRRORS)
            .map(|i| TrustedMirror::new(format!("mirror.site{i}.example")))
            .collect(),
        ..MasterConfig::default()
    });
    let mut outbound = Vec::with_capacity(OCCUPANTS);
    for j in 0..OCCUPANTS {
        let site = j % MIRRORS;
        let user = format!("user{j}@site{site}.example/pc");
        let join = format!(
            "<presence from='{user}' to='{ROOM}/User{j}'><x xmlns='http://jabber.org/protocol/muc'/>\
             <dmuc xmlns='http://tridsys.com/protocol/dmuc' from='mirror.site{site}.example'/></presence>"
        );
        let v = m
            .handle_presence(NOW, &join, Some(&format!("User{j}")))
            .unwrap();
        assert!(matches!(v, PresenceVerdict::MirrorJoin { .. }));
        // The stanza the host's MUC builds for this occupant.
        outbound.push((
            user.clone(),
            format!(
                "<message from='{ROOM}/Scott' to='{user}' type='groupchat' id='m1'>\
                 <body>All work and no play makes Jack a dull boy.</body></message>"
            ),
        ));
    }
    while m.poll_transmit().is_some() {}
    let f = measure(500, || {
        m.begin_broadcast(ROOM);
        for (to, xml) in &outbound {
            if m.routes_via_mirror(to) {
                assert_eq!(m.handle_outbound(NOW, xml).unwrap(), Outbound::Drop);
            }
        }
        m.end_broadcast(ROOM);
        let mut n = 0;
        while let Some(x) = m.poll_transmit() {
            black_box(x);
            n += 1;
        }
        assert_eq!(n, MIRRORS);
    });
    println!(
        "master planning of one broadcast to {OCCUPANTS} occupants behind {MIRRORS} mirrors: \
         median {:.0} µs/broadcast, {:.2} µs/occupant (p10 {:.0}, p90 {:.0} µs)",
        us(f.median),
        us(f.median) / OCCUPANTS as f64,
        us(f.p10),
        us(f.p90)
    );
}

fn main() {
    // `cargo test --benches` runs this too: keep it quick then.
    if std::env::args().any(|a| a == "--test") {
        let mut m = mirror_with_locals(3);
        m.handle_remote(
            NOW,
            &format!("<message from='{ROOM}/Scott' to='{MIRROR}' type='groupchat'><body>x</body></message>"),
        )
        .unwrap();
        assert_eq!(std::iter::from_fn(|| m.poll_transmit()).count(), 3);
        return;
    }
    bench_mirror_fanout();
    bench_mirror_local_message();
    bench_master_planning();
}
