//! The engine's logs into Prosody's: the lines `dmuc::host_log` captured during a call go to the
//! logger of the engine that made them (the shim's `module:log`, under that engine's host).

use dmuc::host_log::{self, Severity};
use dmuc::rate::LogLimiter;
use dmuc::Timestamp;
use mlua::prelude::*;

/// Capture the engine's logs (and panics), once per process.
pub fn install() {
    host_log::install();
}

/// The logger an engine's lines go to: the `log` function of its config table (the shim's
/// `module:log`, so that each line names the host of the engine that made it).
pub struct Logger(Option<LuaRegistryKey>);

impl Logger {
    /// The config's `log` function, if it has one.
    pub fn from_config(lua: &Lua, config: &LuaTable) -> LuaResult<Self> {
        let f: Option<LuaFunction> = config.get("log")?;
        Ok(Logger(match f {
            Some(f) => Some(lua.create_registry_value(f)?),
            None => None,
        }))
    }
}

/// Hand the captured lines to the engine's logger.
pub fn flush(lua: &Lua, logger: &Logger) {
    let lines = host_log::take();
    if lines.is_empty() {
        return;
    }
    let Some(f) = logger
        .0
        .as_ref()
        .and_then(|k| lua.registry_value::<LuaFunction>(k).ok())
    else {
        return;
    };
    for (severity, message) in lines {
        let level = match severity {
            Severity::Error => "error",
            Severity::Warn => "warn",
            Severity::Info => "info",
            Severity::Debug => "debug",
        };
        let _ = f.call::<()>((level, message));
    }
}

/// `refusals(interval_seconds)`: the shim's own refusals (stanzas past the limits, input the
/// engine refused), logged at most once per peer per interval; `:allow(peer, now)` answers
/// `true, left_out` (log it, saying how many were left out) or `false`.
pub struct LuaRefusals(LogLimiter);

pub fn refusals(_: &Lua, interval: f64) -> LuaResult<LuaRefusals> {
    Ok(LuaRefusals(LogLimiter::new(
        (interval.max(0.0) * 1000.0) as u64,
    )))
}

impl LuaUserData for LuaRefusals {
    fn add_methods<M: LuaUserDataMethods<Self>>(methods: &mut M) {
        methods.add_method_mut("allow", |_, this, (peer, t): (String, f64)| {
            Ok(match this.0.allow(&peer, Timestamp::from_secs_f64(t)) {
                Some(left_out) => (true, left_out),
                None => (false, 0),
            })
        });
    }
}
