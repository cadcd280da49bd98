//! The engine's logs into ejabberd's: `dmuc_nif:take_logs/0` hands the lines `dmuc::host_log`
//! captured to `mod_dmuc`, which logs them with `?INFO_MSG` and friends.

use dmuc::host_log::{self, Severity};
use rustler::{Env, Term};

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
