//! Two roles wired together: a master (model room beside `Master`) and two mirrors, driven by
//! fuzzed user actions, link failures, restarts, time, and tampered replays of what crossed the
//! links. The world asserts that every stanza the engines send parses and that each mirror's
//! stored queue matches what it has not had acknowledged.
#![no_main]

use dmuc_fuzz::{drive, Input};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut inp = Input::new(data);
    let flags = inp.byte();
    let mut w = drive::populated(flags & 1 == 1, flags & 2 == 2);
    for _ in 0..48 {
        if inp.is_empty() {
            break;
        }
        drive::world_action(&mut inp, &mut w);
    }
    w.settle();
});
