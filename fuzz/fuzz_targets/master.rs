//! Every entry point of `Master`, called in fuzzed order on a busy world (a populated room, two
//! trusted mirrors with occupants): fuzzed XML and well-formed templates with fuzzed parts,
//! host data (snapshots, history, config forms) from the input, time advancing. Everything the
//! engine queues must parse ([`dmuc_fuzz::check_output`]) and is routed on through the world.
#![no_main]

use dmuc::master::{HistoryRequest, IqVerdict, MasterAction};
use dmuc::Timestamp;
use dmuc_fuzz::world::*;
use dmuc_fuzz::{check_output, drive, escape, Input};
use libfuzzer_sys::fuzz_target;

const FORM: &str = "<x xmlns='jabber:x:data' type='form'><field var='FORM_TYPE' type='hidden'><value>http://jabber.org/protocol/muc#roomconfig</value></field><field var='muc#roomconfig_whois'><value>moderators</value></field></x>";

fn mirror_domain(inp: &mut Input) -> String {
    match inp.byte() % 5 {
        0 | 1 => A_MIRROR.into(),
        2 => B_MIRROR.into(),
        3 => "mirror.evil.example".into(),
        _ => inp.attr(),
    }
}

fn room(inp: &mut Input) -> String {
    if inp.byte() % 8 == 0 {
        inp.attr()
    } else {
        ROOM.into()
    }
}

/// Drain the engine like the host: check and route what it sends, do what it asks.
fn settle_master(w: &mut World, now: Timestamp, inp: &mut Input) {
    let m = &mut w.master;
    while let Some(x) = m.engine.poll_transmit() {
        check_output(&x);
        m.out.push(x);
    }
    while let Some(a) = m.engine.poll_action() {
        match a {
            MasterAction::Evict { room, jid, .. } => m.engine.handle_left(&room, &jid),
            MasterAction::ConfigChanged { room } => {
                let form = match inp.byte() % 3 {
                    0 => None,
                    1 => Some(FORM.to_string()),
                    _ => Some(inp.next_text()),
                };
                let _ = m.engine.handle_config(now, &room, form.as_deref());
            }
        }
        while let Some(x) = m.engine.poll_transmit() {
            check_output(&x);
            m.out.push(x);
        }
    }
    w.flush_master();
    w.run();
}

fn presence_text(inp: &mut Input) -> String {
    let (from, side, own) = drive::who(inp);
    let nick = drive::nick(inp, &own);
    let extra = inp.payload();
    let marker = match inp.byte() % 3 {
        0 if side != Side::Master => format!("<dmuc xmlns='http://tridsys.com/protocol/dmuc' from='{}'/>", side.mirror()),
        1 => format!("<dmuc xmlns='http://tridsys.com/protocol/dmuc' from='{}'/>", mirror_domain(inp)),
        _ => String::new(),
    };
    match inp.byte() % 4 {
        0 => format!("<presence from='{from}' to='{ROOM}/{nick}'><x xmlns='http://jabber.org/protocol/muc'/>{marker}{extra}</presence>"),
        1 => format!("<presence from='{from}' to='{ROOM}/{nick}' type='unavailable'>{marker}{extra}</presence>"),
        2 => format!("<presence from='{from}' to='{ROOM}/{nick}'><show>dnd</show>{marker}{extra}</presence>"),
        _ => drive::readdress(&inp.next_text(), &from, &format!("{ROOM}/{nick}")),
    }
}

fn outbound_text(inp: &mut Input) -> String {
    let (to, _, own) = drive::who(inp);
    let nick = drive::nick(inp, &own);
    let extra = inp.payload();
    let item = format!(
        "<x xmlns='http://jabber.org/protocol/muc#user'><item affiliation='{}' role='{}' jid='{}'/>{}</x>",
        ["none", "member", "admin", "owner", "outcast"][inp.byte() as usize % 5],
        ["participant", "moderator", "visitor", "none"][inp.byte() as usize % 4],
        escape(&drive::who(inp).0),
        ["", "<status code='110'/>", "<status code='100'/><status code='110'/><status code='201'/>", "<status code='333'/>", "<status code='307'/>"][inp.byte() as usize % 5],
    );
    match inp.byte() % 7 {
        0 => format!("<presence from='{ROOM}/{nick}' to='{to}'>{item}{extra}</presence>"),
        1 => format!("<presence from='{ROOM}/{nick}' to='{to}' type='unavailable'>{item}{extra}</presence>"),
        2 => format!("<message from='{ROOM}/{nick}' to='{to}' type='groupchat' id='{}'><body>{}</body>{extra}</message>", inp.attr(), inp.attr()),
        3 => format!("<message from='{ROOM}' to='{to}' type='groupchat'><x xmlns='http://jabber.org/protocol/muc#user'><status code='{}'/></x>{extra}</message>", ["104", "170", "172", "173", "174"][inp.byte() as usize % 5]),
        4 => format!("<iq from='{ROOM}' to='{to}' type='result' id='{}'>{extra}</iq>", inp.attr()),
        5 => format!("<presence from='{ROOM}/{nick}' to='{to}' type='error'><error type='cancel'><conflict xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></error>{extra}</presence>"),
        _ => drive::readdress(&inp.next_text(), &format!("{ROOM}/{nick}"), &to),
    }
}

fn occupant_text(inp: &mut Input) -> String {
    if inp.byte() % 4 == 0 {
        return inp.next_text();
    }
    let (jid, _, own) = drive::who(inp);
    let nick = drive::nick(inp, &own);
    format!(
        "<presence from='{ROOM}/{nick}'><x xmlns='http://jabber.org/protocol/muc#user'><item affiliation='{}' role='{}' jid='{}'/></x>{}</presence>",
        ["none", "member", "owner"][inp.byte() as usize % 3],
        ["participant", "moderator"][inp.byte() as usize % 2],
        escape(&jid),
        inp.payload()
    )
}

fuzz_target!(|data: &[u8]| {
    let mut inp = Input::new(data);
    let flags = inp.byte();
    let mut w = drive::populated(flags & 1 == 1, flags & 2 == 2);
    let mut request: Option<HistoryRequest> = None;
    for _ in 0..64 {
        if inp.is_empty() {
            break;
        }
        w.now = w.now.plus_ms(u64::from(inp.byte()) * 100);
        let now = w.now;
        let e = &mut w.master.engine;
        match inp.byte() % 20 {
            0 | 1 => {
                let t = presence_text(&mut inp);
                let granted = match inp.byte() % 3 {
                    0 => None,
                    _ => Some(inp.attr()),
                };
                let _ = e.handle_presence(now, &t, granted.as_deref());
            }
            2 => {
                let t = inp.next_text();
                let _ = e.handle_presence(now, &t, None);
            }
            3 => {
                let (from, _, _) = drive::who(&mut inp);
                let t = match inp.byte() % 4 {
                    0 => format!("<iq from='{}' to='{ROOM}' type='get' id='{}'><roster xmlns='urn:xmpp:dmuc:0'/></iq>", mirror_domain(&mut inp), inp.attr()),
                    1 => format!("<iq from='{}' to='{ROOM}' type='get' id='{}'><room xmlns='urn:xmpp:dmuc:0' id='{}'><history xmlns='http://jabber.org/protocol/muc' maxstanzas='{}' seconds='{}'/></room></iq>", mirror_domain(&mut inp), inp.attr(), room(&mut inp), inp.byte(), inp.attr()),
                    2 => format!("<iq from='{}' to='{ROOM}' type='{}' id='dmuc-{}-{}'>{}</iq>", mirror_domain(&mut inp), ["result", "error"][inp.byte() as usize % 2], ["config", "roster"][inp.byte() as usize % 2], inp.byte(), inp.payload()),
                    _ => drive::readdress(&inp.next_text(), &from, ROOM),
                };
                if let Ok(IqVerdict::History(r)) = e.handle_iq(now, &t) {
                    request = Some(r);
                }
            }
            4 => {
                let t = inp.next_text();
                if let Ok(IqVerdict::History(r)) = e.handle_iq(now, &t) {
                    request = Some(r);
                }
            }
            5 | 6 => {
                let t = outbound_text(&mut inp);
                let _ = e.handle_outbound(now, &t);
            }
            7 => {
                let (from, _, _) = drive::who(&mut inp);
                let id = inp.attr();
                let t = format!("<message from='{from}' to='{}' type='groupchat' id='{id}'><body>{}</body><origin-id xmlns='urn:xmpp:sid:0' id='{id}'/><stanza-id xmlns='urn:xmpp:dmuc:0' id='{}'/>{}</message>", room(&mut inp), inp.attr(), inp.attr(), inp.payload());
                let _ = e.handle_groupchat(now, &t);
            }
            8 => {
                let t = inp.next_text();
                let _ = e.handle_groupchat(now, &t);
            }
            9 => {
                let r = room(&mut inp);
                let m = mirror_domain(&mut inp);
                let nick = inp.attr();
                let form = if inp.byte() % 3 == 0 { inp.next_text() } else { FORM.to_string() };
                let n = inp.byte() % 6;
                let occupants: Vec<String> = (0..n).map(|_| occupant_text(&mut inp)).collect();
                let _ = e.handle_snapshot(now, &r, &m, &nick, &form, &occupants);
            }
            10 => {
                let req = match (&request, inp.byte() % 3) {
                    (Some(r), 0 | 1) => r.clone(),
                    _ => HistoryRequest {
                        room: room(&mut inp),
                        to: mirror_domain(&mut inp),
                        from: ROOM.into(),
                        id: inp.attr(),
                        limits: Default::default(),
                    },
                };
                let n = inp.byte() % 5;
                let messages: Vec<String> = (0..n)
                    .map(|_| match inp.byte() % 3 {
                        0 => inp.next_text(),
                        _ => format!("<message from='{ROOM}/{}' type='groupchat'><body>{}</body><delay xmlns='urn:xmpp:delay' stamp='{}' from='{ROOM}'/>{}</message>", inp.attr(), inp.attr(), ["2011-01-19T08:00:00Z", "garbage", "2011-01-19T07:59:59.123Z"][inp.byte() as usize % 3], inp.payload()),
                    })
                    .collect();
                let subject = match inp.byte() % 3 {
                    0 => None,
                    1 => Some(format!("<message from='{ROOM}/Scott' type='groupchat'><subject>{}</subject></message>", inp.attr())),
                    _ => Some(inp.next_text()),
                };
                let _ = e.handle_history(now, &req, &messages, subject.as_deref());
            }
            11 => {
                let r = room(&mut inp);
                let form = match inp.byte() % 3 {
                    0 => None,
                    1 => Some(FORM.replace("moderators", ["anyone", "moderators"][inp.byte() as usize % 2])),
                    _ => Some(inp.next_text()),
                };
                let _ = e.handle_config(now, &r, form.as_deref());
            }
            12 => {
                let r = room(&mut inp);
                let (j, _, _) = drive::who(&mut inp);
                e.handle_left(&r, &j);
            }
            13 => {
                let d = match inp.byte() % 4 {
                    0 => A_MIRROR.to_string(),
                    1 => A_DOMAIN.to_string(),
                    2 => B_DOMAIN.to_string(),
                    _ => inp.attr(),
                };
                match inp.byte() % 3 {
                    0 => e.handle_link(now, &d, true),
                    1 => e.handle_link(now, &d, false),
                    // An s2s session closed: the watch probes; its answer comes as op 14.
                    _ => e.handle_s2s_closed(now, MUC_SERVICE, &d),
                }
            }
            14 => {
                let t = match inp.byte() % 4 {
                    0 => format!("<iq from='{}' to='{MUC_SERVICE}' type='get' id='{}'><ping xmlns='urn:xmpp:ping'/>{}</iq>", mirror_domain(&mut inp), inp.attr(), inp.payload()),
                    // An answer (or bounce) to a probe: ids count from 1.
                    1 => format!("<iq from='{}' to='{MUC_SERVICE}' type='result' id='dmuc-probe-{}'/>", mirror_domain(&mut inp), inp.byte() % 4),
                    2 => format!("<iq from='{}' to='{MUC_SERVICE}' type='error' id='dmuc-probe-{}'><error type='cancel'><remote-server-not-found xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></error></iq>", mirror_domain(&mut inp), inp.byte() % 4),
                    _ => inp.next_text(),
                };
                let _ = e.handle_ping(now, &t);
            }
            15 => {
                let at = e.poll_timeout().unwrap_or(now);
                w.now = w.now.max(at);
                let now = w.now;
                w.master.engine.handle_timeout(now);
            }
            16 => {
                let r = room(&mut inp);
                if inp.byte() % 2 == 0 {
                    e.begin_broadcast(&r)
                } else {
                    e.end_broadcast(&r)
                }
            }
            17 => {
                let _ = e.routes_via_mirror(&drive::who(&mut inp).0);
                let _ = e.status();
                let _ = e.remote_occupants(ROOM);
            }
            _ => {
                drive::world_action(&mut inp, &mut w);
                continue;
            }
        }
        let now = w.now;
        settle_master(&mut w, now, &mut inp);
    }
});
