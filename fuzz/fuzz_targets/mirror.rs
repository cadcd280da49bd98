//! Every entry point of `Mirror`, called in fuzzed order on a busy world: local users' stanzas
//! (and their going offline, `handle_local_unavailable`)
//! (templates with fuzzed parts, raw fuzzed text), the master's stanzas (what crossed the link,
//! tampered with, and raw fuzzed text), s2s events, timeouts, restarts that import the stored
//! queue, and `import_queue` of fuzzed items. After each call the world drains `poll_transmit`
//! (each stanza must parse) and `poll_store` (the store must match the unacknowledged queue).
#![no_main]

use dmuc::mirror::{Mirror, MirrorConfig};
use dmuc_fuzz::world::*;
use dmuc_fuzz::{check_output, drive, Input};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut inp = Input::new(data);
    let flags = inp.byte();
    let mut w = drive::populated(flags & 1 == 1, flags & 2 == 2);
    for _ in 0..64 {
        if inp.is_empty() {
            break;
        }
        w.now = w.now.plus_ms(u64::from(inp.byte()) * 100);
        let now = w.now;
        let side = if inp.byte() % 3 == 0 { Side::B } else { Side::A };
        let op = inp.byte() % 16;
        let m = w.mirrors.get_mut(&side).expect("both mirrors exist");
        match op {
            0..=2 => {
                let (from, _, own) = drive::who(&mut inp);
                let from = if inp.byte() % 4 == 0 { from } else { user(side, "wayne") };
                let t = drive::user_stanza(&mut inp, &from, &own);
                let _ = m.handle_local(now, &t);
            }
            3 => {
                let t = inp.next_text();
                if inp.byte() % 2 == 0 {
                    let _ = m.handle_local(now, &t);
                } else {
                    // The host saw the user go offline (a bare unavailable presence, or the
                    // stream's end): fuzzed text, or the user's own.
                    let (from, _, _) = drive::who(&mut inp);
                    let t = if inp.byte() % 2 == 0 {
                        format!("<presence from='{from}' type='unavailable'/>")
                    } else {
                        t
                    };
                    let _ = m.handle_local_unavailable(now, &t);
                }
            }
            4 | 5 => {
                drive::replay(&mut inp, &mut w);
                continue;
            }
            6 => {
                let t = inp.next_text();
                let _ = m.handle_remote(now, &t);
            }
            7 => {
                let master = if inp.byte() % 4 == 0 { inp.attr() } else { MUC_SERVICE.to_string() };
                let up = inp.byte() % 2 == 0;
                m.handle_link(now, &master, up);
            }
            8 => m.handle_s2s_closed(now, MUC_SERVICE),
            9 => m.handle_s2s_closing(now, MUC_SERVICE),
            10 => m.handle_s2s_in_closed(now, MUC_SERVICE),
            11 => {
                let at = m.poll_timeout().unwrap_or(now);
                w.now = w.now.max(at);
                let now = w.now;
                w.mirrors.get_mut(&side).expect("mirror").handle_timeout(now);
            }
            12 => {
                drive::restart(&mut w, side);
                continue;
            }
            13 => {
                // A host's store may hold anything (an older version's, a corrupted one): a fresh
                // mirror must take what parses and skip the rest. It is not the world's mirror,
                // whose store the world checks item by item.
                let mut items: Vec<String> = w.stores.get(&side).map(|s| s.values().cloned().collect()).unwrap_or_default();
                for _ in 0..inp.byte() % 4 {
                    let t = inp.next_text();
                    items.push(t);
                }
                if let Some(first) = items.first().cloned() {
                    items.push(drive::tamper(&mut inp, &first));
                }
                let mut fresh = Mirror::new(MirrorConfig::new(side.mirror(), vec![MUC_SERVICE.into()]));
                fresh.import_queue(now, &items);
                fresh.handle_link(now, MUC_SERVICE, true);
                fresh.handle_timeout(now.plus_ms(60_000));
                while let Some(x) = fresh.poll_transmit() {
                    check_output(&x);
                }
                while fresh.poll_store().is_some() {}
                let _ = fresh.export_queue();
                let _ = fresh.status();
                continue;
            }
            14 => {
                let _ = m.status();
                let _ = m.occupants(ROOM);
                let _ = m.local_occupants(ROOM);
                let _ = m.queue_depth(ROOM);
                let _ = m.in_flight(ROOM);
                let _ = m.handles(&inp.text());
                let _ = m.held_back();
                if inp.byte() % 4 == 0 {
                    // A clean shutdown's first half: what is held back goes to the store.
                    m.flush_store();
                }
            }
            _ => {
                drive::world_action(&mut inp, &mut w);
                continue;
            }
        }
        w.drain_mirror(side);
        w.run();
    }
});
