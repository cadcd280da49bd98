//! The engine's logs into ejabberd's: `dmuc_nif:take_logs/0` hands the lines `dmuc::host_log`
//! captured to `mod_dmuc`, which logs them with `?INFO_MSG` and friends.

use std::sync::{LazyLock, Mutex};

use dmuc::host_log::{self, Severity};
use dmuc::rate::LogLimiter;
use dmuc::Timestamp;
use rustler::{Env, Term};

/// How often the shim's own refusals of one peer are logged.
const REFUSAL_LOG_INTERVAL_MS: u64 = 60_000;

/// The shim's refusals, across every process of the node (each call comes from some room's,
/// stream's or the module's process).
static REFUSALS: LazyLock<Mutex<LogLimiter>> =
    LazyLock::new(|| Mutex::new(LogLimiter::new(REFUSAL_LOG_INTERVAL_MS)));

/// `refusal_log(Peer, NowMs) -> {true, LeftOut} | {false, 0}`: log this refusal of `Peer`'s
/// stanza now (saying how many were left out since the last), or not.
#[rustler::nif]
fn refusal_log(peer: String, now: u64) -> (bool, u64) {
    match crate::lock(&REFUSALS).allow(&peer, Timestamp(now)) {
        Some(left_out) => (true, left_out),
        None => (false, 0),
    }
}

/// NIF load: capture the engine's logs (and panics).
pub fn load(_env: Env, _info: Term) -> bool {
    host_log::install();
    true
}

/// `take_logs() -> [{Level, Message}]`.
#[rustler::nif]
fn take_logs() -> Vec<(&'static str, String)> {
    host_log::take()
        .into_iter()
        .map(|(severity, message)| {
            let level = match severity {
                Severity::Error => "error",
                Severity::Warn => "warning",
                Severity::Info => "info",
                Severity::Debug => "debug",
            };
            (level, message)
        })
        .collect()
}
