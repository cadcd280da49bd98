//! A busy world to drive, and the user and network actions every sequence target shares.

use dmuc::bounds::{Limits, MAX_DEPTH_CEILING, MAX_SIZE_CEILING};
use dmuc::master::{Master, MasterConfig, TrustedMirror};
use dmuc::mirror::{Mirror, MirrorConfig};
use dmuc::Timestamp;

use crate::world::*;
use crate::{escape, Input};

/// Users of the world: (name, side). Mirror users, the master's local owner and admin.
pub const USERS: &[(&str, Side)] = &[
    ("wayne", Side::A),
    ("tim", Side::A),
    ("sarah", Side::B),
    ("scott", Side::Master),
    ("kevin", Side::Master),
    ("joe", Side::B),
];

pub const NICKS: &[&str] = &["Wayne", "Tim", "Sarah", "Scott", "Kevin", "Joe"];

/// A world with a room on the master, occupants through both mirrors and local ones, and a few
/// messages of history. `deep` gives every engine the depth ceiling (256) instead of the
/// default limit (64), so that inputs reach both.
///
/// Built once per process for each kind and cloned: populating takes milliseconds (joins,
/// messages, their fan-out), and the sequence targets would spend most of each execution on it.
pub fn populated(unbracketed: bool, deep: bool) -> World {
    thread_local! {
        static BUILT: std::cell::RefCell<[Option<World>; 4]> = const { std::cell::RefCell::new([None, None, None, None]) };
    }
    let k = usize::from(unbracketed) | usize::from(deep) << 1;
    BUILT.with(|b| {
        b.borrow_mut()[k]
            .get_or_insert_with(|| build_populated(unbracketed, deep))
            .clone()
    })
}

fn build_populated(unbracketed: bool, deep: bool) -> World {
    let mut w = if unbracketed {
        World::unbracketed()
    } else {
        World::new()
    };
    if deep {
        let limits = Limits {
            max_depth: MAX_DEPTH_CEILING,
            max_size: MAX_SIZE_CEILING,
        };
        w.master.engine = Master::new(MasterConfig {
            trusted_mirrors: vec![TrustedMirror::new(A_MIRROR), TrustedMirror::new(B_MIRROR)],
            unbracketed_presence: unbracketed,
            limits,
            ..MasterConfig::default()
        });
        for side in [Side::A, Side::B] {
            let mut c = MirrorConfig::new(side.mirror(), vec![MUC_SERVICE.into()]);
            c.limits = limits;
            w.mirrors.insert(side, Mirror::new(c));
        }
    }
    for (i, (name, side)) in USERS.iter().enumerate().take(5) {
        w.join(&user(*side, name), NICKS[i]);
    }
    w.say(&user(Side::A, "wayne"), "hello from raleigh");
    w.say(&user(Side::Master, "scott"), "hello from fairfax");
    w
}

pub fn who(inp: &mut Input) -> (String, Side, String) {
    let i = inp.byte() as usize % USERS.len();
    let (name, side) = USERS[i];
    (user(side, name), side, NICKS[i].to_string())
}

/// A nick: usually the user's own, sometimes another's or a fuzzed one.
pub fn nick(inp: &mut Input, own: &str) -> String {
    match inp.byte() % 4 {
        0 | 1 => own.to_string(),
        2 => NICKS[inp.byte() as usize % NICKS.len()].to_string(),
        _ => inp.attr(),
    }
}

fn side(inp: &mut Input) -> Side {
    if inp.byte() % 2 == 0 {
        Side::A
    } else {
        Side::B
    }
}

/// A stanza a user sends to the room, from a template filled from the input.
pub fn user_stanza(inp: &mut Input, from: &str, own_nick: &str) -> String {
    let kind = inp.byte() % 12;
    let n = nick(inp, own_nick);
    let extra = inp.payload();
    let id = inp.attr();
    match kind {
        0 => format!("<presence from='{from}' to='{ROOM}/{n}'><x xmlns='http://jabber.org/protocol/muc'/>{extra}</presence>"),
        1 => format!("<presence from='{from}' to='{ROOM}/{n}' type='unavailable'>{extra}</presence>"),
        2 => format!("<presence from='{from}' to='{ROOM}/{n}'><show>away</show><status>{}</status>{extra}</presence>", inp.attr()),
        3 => format!("<message from='{from}' to='{ROOM}' type='groupchat' id='{id}'><body>{}</body>{extra}</message>", inp.attr()),
        4 => format!("<message from='{from}' to='{ROOM}' type='groupchat' id='{id}'><body>{}</body><origin-id xmlns='urn:xmpp:sid:0' id='{id}'/>{extra}</message>", inp.attr()),
        5 => format!("<message from='{from}' to='{ROOM}/{n}' type='chat' id='{id}'><body>{}</body>{extra}</message>", inp.attr()),
        6 => format!("<iq from='{from}' to='{ROOM}/{n}' type='get' id='{id}'><vCard xmlns='vcard-temp'/>{extra}</iq>"),
        7 => format!("<iq from='{from}' to='{ROOM}' type='set' id='{id}'><query xmlns='http://jabber.org/protocol/muc#owner'><x xmlns='jabber:x:data' type='submit'><field var='FORM_TYPE'><value>http://jabber.org/protocol/muc#roomconfig</value></field><field var='muc#roomconfig_whois'><value>{}</value></field></x></query>{extra}</iq>", if inp.byte() % 2 == 0 { "anyone" } else { "moderators" }),
        8 => format!("<iq from='{from}' to='{ROOM}' type='set' id='{id}'><query xmlns='http://jabber.org/protocol/muc#admin'><item nick='{n}' role='{}'/></query>{extra}</iq>", ["none", "visitor", "participant", "moderator"][inp.byte() as usize % 4]),
        9 => format!("<message from='{from}' to='{ROOM}' type='groupchat' id='{id}'><subject>{}</subject>{extra}</message>", inp.attr()),
        10 => format!("<presence from='{from}' to='{ROOM}/{n}'><x xmlns='http://jabber.org/protocol/muc'><history maxstanzas='{}' since='{}'/></x>{extra}</presence>", inp.byte(), escape(&inp.text())),
        _ => readdress(&inp.next_text(), from, &format!("{ROOM}/{n}")),
    }
}

/// A pool text made a user's stanza: its `from` and `to` forced, the rest as fuzzed. Text that
/// has no start tag is sent as it is (the engine must refuse it).
pub fn readdress(text: &str, from: &str, to: &str) -> String {
    let Some(start) = text.find('<') else {
        return text.to_string();
    };
    let name_end = text[start + 1..]
        .find(|c: char| c.is_whitespace() || c == '>' || c == '/')
        .map(|i| start + 1 + i);
    match name_end {
        Some(e) => format!("{} from='{from}' to='{to}'{}", &text[..e], &text[e..]),
        None => text.to_string(),
    }
}

/// Does the world's harness (not the engine) accept this user stanza? Its host parses what a user
/// sends; the engine's own refusals are for the targets that call it directly.
pub fn harness_parses(text: &str) -> bool {
    dmuc::stanza::parse(text).is_ok()
}

/// A world-level action: a user acts, the network misbehaves, or time passes.
pub fn world_action(inp: &mut Input, w: &mut World) {
    match inp.byte() % 16 {
        0..=6 => {
            let (from, _, own) = who(inp);
            let s = user_stanza(inp, &from, &own);
            if harness_parses(&s) {
                w.send(&from, &s);
            }
        }
        7 => {
            let s = side(inp);
            w.cut(s)
        }
        8 => {
            let s = side(inp);
            w.stall(s)
        }
        9 => {
            let s = side(inp);
            w.restore(s)
        }
        10 => {
            let s = side(inp);
            w.reconnect(s)
        }
        11 => {
            let ms = u64::from(inp.byte()) * 1000;
            w.advance(ms)
        }
        12 => {
            if inp.byte() % 2 == 0 {
                w.settle()
            } else {
                let (from, _, _) = who(inp);
                w.go_offline(&from)
            }
        }
        13 => {
            let n = NICKS[inp.byte() as usize % NICKS.len()];
            w.at_master(|m, now| m.kick(now, n));
        }
        14 => replay(inp, w),
        _ => {
            let s = side(inp);
            restart(w, s)
        }
    }
    w.clear_inboxes();
    w.mirror_errors.clear();
    w.master.errors.clear();
}

/// A mirror's server restarts: a fresh engine takes the stored queue, as a host loads it.
pub fn restart(w: &mut World, side: Side) {
    let stored: Vec<String> = w.stores.get(&side).map(|s| s.values().cloned().collect()).unwrap_or_default();
    let limits = Limits::default();
    let mut c = MirrorConfig::new(side.mirror(), vec![MUC_SERVICE.into()]);
    c.limits = limits;
    let mut fresh = Mirror::new(c);
    fresh.import_queue(w.now, &stored);
    w.mirrors.insert(side, fresh);
    w.drain_mirror(side);
    w.run();
}

/// A stanza that crossed a link, tampered with and delivered again: a duplicate, a truncation,
/// an attribute changed, a payload inserted (a deep one included).
pub fn replay(inp: &mut Input, w: &mut World) {
    let s = side(inp);
    let log = &w.links[&s].log;
    if log.is_empty() {
        return;
    }
    let i = inp.byte() as usize % log.len().min(256);
    let (dir, text) = log[log.len() - 1 - i].clone();
    let text = tamper(inp, &text);
    deliver(w, s, dir == Dir::ToMaster, &text);
}

/// A textual mutation of a stanza (the tree is never built here: the text may be a bomb).
pub fn tamper(inp: &mut Input, text: &str) -> String {
    match inp.byte() % 6 {
        0 => text.to_string(),
        1 => {
            let at = text.find('>').map(|i| i + 1).unwrap_or(0);
            let at = if text[..at].ends_with("/>") { at - 2 } else { at };
            let mut t = text.to_string();
            if text[..at].ends_with('/') || at == 0 {
                return t;
            }
            t.insert_str(at, &inp.next_text());
            t
        }
        2 => match text.rfind("</") {
            Some(at) => {
                let mut t = text.to_string();
                t.insert_str(at, &inp.next_text());
                t
            }
            None => text.to_string(),
        },
        3 => {
            let attr = ["from", "to", "id", "type", "nick", "jid", "role", "affiliation"]
                [inp.byte() as usize % 8];
            let value = inp.attr();
            replace_attr(text, attr, &value)
        }
        4 => {
            let mut cut = inp.byte() as usize * text.len() / 256;
            while !text.is_char_boundary(cut) {
                cut -= 1;
            }
            text[..cut].to_string()
        }
        _ => inp.next_text(),
    }
}

fn replace_attr(text: &str, attr: &str, value: &str) -> String {
    for q in ['\'', '"'] {
        let pat = format!(" {attr}={q}");
        if let Some(s) = text.find(&pat) {
            let vs = s + pat.len();
            if let Some(ve) = text[vs..].find(q) {
                return format!("{}{value}{}", &text[..vs], &text[vs + ve..]);
            }
        }
    }
    text.to_string()
}

/// Deliver text that crossed the link to `side`'s mirror, or from it to the master, straight
/// into the engine (the world's host would parse it first; this text may not parse).
pub fn deliver(w: &mut World, side: Side, to_master: bool, text: &str) {
    if to_master {
        let text = text.to_string();
        w.at_master(|m, now| {
            master_input(m, now, &text);
        });
    } else {
        let now = w.now;
        if let Some(m) = w.mirrors.get_mut(&side) {
            let _ = m.handle_remote(now, text);
        }
        w.drain_mirror(side);
        w.run();
    }
}

/// What the master's host does with a stanza for its MUC service: its model room if the host can
/// parse it, else the engine's entry point for its kind (the engine refuses it).
pub fn master_input(m: &mut model::MasterHost, now: Timestamp, text: &str) {
    if harness_parses(text) {
        m.receive(now, text);
        return;
    }
    let t = text.trim_start();
    let _ = if t.starts_with("<presence") {
        m.engine.handle_presence(now, text, None).map(|_| ())
    } else if t.starts_with("<iq") {
        m.engine.handle_iq(now, text).map(|_| ())
    } else if t.starts_with("<message") {
        m.engine.handle_groupchat(now, text).map(|_| ())
    } else {
        m.engine.handle_ping(now, text).map(|_| ())
    };
    m.drain_actions(now);
}
