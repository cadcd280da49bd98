//! Bounded input: every entry point refuses a stanza deeper or larger than the limits with a typed
//! error (`TooDeep`, `TooLarge`) before it builds a tree, accepts one at the limits, and survives
//! a 100,000-level stanza on a thread with a 256 KiB stack: nothing on the input path recurses
//! per level of the input. Stanzas are literal text, as a host hands them over.

mod common;

use common::*;
use dmuc::bounds::{Limits, DEFAULT_MAX_DEPTH, DEFAULT_MAX_SIZE};
use dmuc::link_watch::LinkWatch;
use dmuc::master::{Master, MasterConfig, PresenceVerdict, TrustedMirror};
use dmuc::mirror::{Mirror, MirrorConfig, Verdict};
use dmuc::{Error, Timestamp};

const NOW: Timestamp = Timestamp(1_295_424_000_000);
const WAYNE: &str = "wayne@raleigh.tridsys.com/pc";
const OUTSIDER: &str = "mallory@evil.example/x";

/// A small stack: a NIF scheduler thread's order of size. Recursion per level of a 100,000-level
/// stanza would need tens of megabytes.
const SMALL_STACK: usize = 256 * 1024;

fn on_small_stack<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::Builder::new()
        .stack_size(SMALL_STACK)
        .spawn(f)
        .expect("spawn")
        .join()
        .expect("the engine overflowed or panicked on a small stack")
}

fn master_with(limits: Limits) -> Master {
    Master::new(MasterConfig {
        trusted_mirrors: vec![TrustedMirror::new(A_MIRROR)],
        limits,
        ..MasterConfig::default()
    })
}

fn mirror_with(limits: Limits) -> Mirror {
    let mut c = MirrorConfig::new(A_MIRROR, vec![MUC_SERVICE.into()]);
    c.limits = limits;
    Mirror::new(c)
}

/// `levels` nested elements, closed or not.
fn nest(levels: usize, closed: bool) -> String {
    let mut s = "<a xmlns='urn:example:bomb'>".to_string();
    s.push_str(&"<a>".repeat(levels.saturating_sub(1)));
    if closed {
        s.push_str(&"</a>".repeat(levels));
    }
    s
}

/// A join presence whose whole tree is `depth` levels deep (the presence is level 1).
fn join_of_depth(from: &str, depth: usize) -> String {
    format!(
        "<presence from='{from}' to='{ROOM}/Nick'><x xmlns='http://jabber.org/protocol/muc'/>{}</presence>",
        nest(depth - 1, true)
    )
}

/// A groupchat message whose whole tree is `depth` levels deep.
fn groupchat_of_depth(from: &str, to: &str, depth: usize) -> String {
    format!(
        "<message from='{from}' to='{to}' type='groupchat' id='m1'><body>hi</body>{}</message>",
        nest(depth - 1, true)
    )
}

#[track_caller]
fn assert_too_deep<T: std::fmt::Debug>(r: Result<T, Error>, limit: usize) {
    match r {
        Err(e @ Error::TooDeep { .. }) => {
            assert_eq!(e, Error::TooDeep { limit });
            assert!(e.is_limit());
        }
        other => panic!("expected TooDeep, got {other:?}"),
    }
}

#[test]
fn a_join_at_the_depth_limit_is_taken_one_past_it_refused() {
    let mut m = master_with(Limits::default());
    let at = join_of_depth(OUTSIDER, DEFAULT_MAX_DEPTH);
    assert_eq!(m.handle_presence(NOW, &at, None), Ok(PresenceVerdict::Pass));
    let over = join_of_depth(OUTSIDER, DEFAULT_MAX_DEPTH + 1);
    assert_too_deep(m.handle_presence(NOW, &over, None), DEFAULT_MAX_DEPTH);
    assert_eq!(
        m.poll_transmit(),
        None,
        "a refusal puts nothing on any link"
    );
}

#[test]
fn a_local_message_at_the_depth_limit_is_taken_one_past_it_refused() {
    let mut m = mirror_with(Limits::default());
    let join = format!(
        "<presence from='{WAYNE}' to='{ROOM}/Wayne'><x xmlns='http://jabber.org/protocol/muc'/></presence>"
    );
    assert_eq!(m.handle_local(NOW, &join), Ok(Verdict::Consumed));
    while m.poll_transmit().is_some() {}
    let at = groupchat_of_depth(WAYNE, ROOM, DEFAULT_MAX_DEPTH);
    assert!(m.handle_local(NOW, &at).is_ok());
    let over = groupchat_of_depth(WAYNE, ROOM, DEFAULT_MAX_DEPTH + 1);
    assert_too_deep(m.handle_local(NOW, &over), DEFAULT_MAX_DEPTH);
}

#[test]
fn a_message_to_the_mirror_service_past_the_depth_limit_is_refused() {
    let mut m = mirror_with(Limits::default());
    let at = groupchat_of_depth(OUTSIDER, A_MIRROR, DEFAULT_MAX_DEPTH);
    assert!(m.handle_remote(NOW, &at).is_ok());
    let over = groupchat_of_depth(OUTSIDER, A_MIRROR, DEFAULT_MAX_DEPTH + 1);
    assert_too_deep(m.handle_remote(NOW, &over), DEFAULT_MAX_DEPTH);
}

#[test]
fn configured_limits_are_the_ones_enforced() {
    let limits = Limits::new(5, 2_000).unwrap();
    let mut m = master_with(limits);
    assert!(m
        .handle_presence(NOW, &join_of_depth(OUTSIDER, 5), None)
        .is_ok());
    assert_too_deep(m.handle_presence(NOW, &join_of_depth(OUTSIDER, 6), None), 5);
    let big = format!(
        "<presence from='{OUTSIDER}' to='{ROOM}/Nick'><status>{}</status></presence>",
        "x".repeat(2_000)
    );
    assert_eq!(
        m.handle_presence(NOW, &big, None),
        Err(Error::TooLarge {
            size: big.len(),
            limit: 2_000
        })
    );
    let mut mi = mirror_with(limits);
    assert!(matches!(
        mi.handle_remote(NOW, &big),
        Err(Error::TooLarge { limit: 2_000, .. })
    ));
}

#[test]
fn a_stanza_at_the_default_size_limit_is_taken_one_byte_over_refused() {
    let mut m = master_with(Limits::default());
    let head = format!("<presence from='{OUTSIDER}' to='{ROOM}/Nick'><status>");
    let tail = "</status></presence>";
    let fill = DEFAULT_MAX_SIZE - head.len() - tail.len();
    let at = format!("{head}{}{tail}", "x".repeat(fill));
    assert_eq!(at.len(), DEFAULT_MAX_SIZE);
    assert!(m.handle_presence(NOW, &at, None).is_ok());
    let over = format!("{head}{}{tail}", "x".repeat(fill + 1));
    assert!(matches!(
        m.handle_presence(NOW, &over, None),
        Err(Error::TooLarge { .. })
    ));
}

#[test]
fn a_100000_level_stanza_is_refused_everywhere_on_a_small_stack() {
    on_small_stack(|| {
        for closed in [true, false] {
            let bomb = nest(100_000, closed);
            let join = format!("<presence from='{OUTSIDER}' to='{ROOM}/Nick'>{bomb}</presence>");
            let gc =
                format!("<message from='{WAYNE}' to='{ROOM}' type='groupchat'>{bomb}</message>");
            let to_mirror = format!("<message from='{OUTSIDER}' to='{A_MIRROR}'>{bomb}</message>");
            let iq = format!(
                "<iq from='{A_MIRROR}' to='{ROOM}' type='get' id='h'><room xmlns='urn:xmpp:dmuc:0'>{bomb}</room></iq>"
            );
            let ping = format!(
                "<iq from='{A_MIRROR}' to='{MUC_SERVICE}' type='get' id='p'><ping xmlns='urn:xmpp:ping'>{bomb}</ping></iq>"
            );
            let d = DEFAULT_MAX_DEPTH;
            // 100,000 levels are 700 KB: past the default size too. The depth scan is what is
            // under test here, so the size limit is lifted to its ceiling.
            let deep_only = Limits::new(d, dmuc::bounds::MAX_SIZE_CEILING).unwrap();
            assert!(matches!(
                master_with(Limits::default()).handle_presence(NOW, &join, None),
                Err(e) if e.is_limit()
            ));

            let mut m = master_with(deep_only);
            assert_too_deep(m.handle_presence(NOW, &join, None), d);
            assert_too_deep(m.handle_iq(NOW, &iq), d);
            assert_too_deep(m.handle_outbound(NOW, &gc), d);
            assert_too_deep(m.handle_groupchat(NOW, &gc), d);
            assert!(matches!(
                m.handle_ping(NOW, &iq),
                Err(Error::TooDeep { .. })
            ));

            let mut mi = mirror_with(deep_only);
            assert_too_deep(mi.handle_local(NOW, &gc), d);
            assert_too_deep(mi.handle_local(NOW, &join), d);
            assert_too_deep(mi.handle_remote(NOW, &to_mirror), d);
            assert_too_deep(mi.handle_remote(NOW, &join), d);

            // Host-side text (snapshots, history, pings) meets the ceiling at least.
            let mut w = LinkWatch::new(vec![TrustedMirror::new(A_MIRROR)], 120_000);
            assert!(matches!(
                w.handle_ping(NOW, &ping),
                Err(Error::TooDeep { .. })
            ));
            assert!(matches!(
                dmuc::stanza::parse(&bomb),
                Err(Error::TooDeep { .. })
            ));
            assert_eq!(mi.import_queue(NOW, &[gc.clone()]), 0);
        }
    });
}

#[test]
fn the_engine_keeps_working_after_refusing_bombs() {
    on_small_stack(|| {
        let mut m =
            mirror_with(Limits::new(DEFAULT_MAX_DEPTH, dmuc::bounds::MAX_SIZE_CEILING).unwrap());
        let bomb = nest(100_000, true);
        for _ in 0..3 {
            let _ = m.handle_remote(
                NOW,
                &format!("<message from='{OUTSIDER}' to='{A_MIRROR}'>{bomb}</message>"),
            );
        }
        let join = format!(
            "<presence from='{WAYNE}' to='{ROOM}/Wayne'><x xmlns='http://jabber.org/protocol/muc'/></presence>"
        );
        assert_eq!(m.handle_local(NOW, &join), Ok(Verdict::Consumed));
        let out: Vec<String> = std::iter::from_fn(|| m.poll_transmit()).collect();
        assert!(out.iter().any(|x| x.contains("Wayne")), "{out:?}");
    });
}

#[test]
fn a_stanza_at_the_ceiling_survives_a_small_stack() {
    // The deepest tree a host can configure the engine to build: parsed, cloned (error replies
    // copy the payload), serialized and dropped on the stack of a BEAM scheduler thread (128
    // kilowords, 1 MiB: unoptimized builds use about 1 KiB per level, release builds far less).
    let t = std::thread::Builder::new()
        .stack_size(1024 * 1024)
        .spawn(|| {
            let limits = Limits::new(dmuc::bounds::MAX_DEPTH_CEILING, DEFAULT_MAX_SIZE).unwrap();
            let mut m = master_with(limits);
            let join = join_of_depth(OUTSIDER, dmuc::bounds::MAX_DEPTH_CEILING);
            let _ = m.handle_presence(NOW, &join, None);
            let el = dmuc::stanza::parse(&join).expect("at the ceiling");
            let copy = el.clone();
            let text = dmuc::stanza::serialize(&copy);
            assert!(text.len() > 1000);
        });
    t.expect("spawn")
        .join()
        .expect("no overflow at the ceiling");
}
