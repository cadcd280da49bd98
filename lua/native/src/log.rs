//! The engine's logs into Prosody's: the lines `dmuc::host_log` captured during a call go to the
//! logger the shim set (`module:log`).

use dmuc::host_log::{self, Severity};
use mlua::prelude::*;

const LOGGER_KEY: &str = "dmuc.logger";

/// Capture the engine's logs (and panics), once per process.
pub fn install() {
    host_log::install();
}

/// `set_logger(function(level, message) ... end)`.
pub fn set_logger(lua: &Lua, f: LuaFunction) -> LuaResult<()> {
    lua.set_named_registry_value(LOGGER_KEY, f)
}

/// Hand the captured lines to the shim's logger.
pub fn flush(lua: &Lua) {
    let lines = host_log::take();
    if lines.is_empty() {
        return;
    }
    let Ok(f) = lua.named_registry_value::<LuaFunction>(LOGGER_KEY) else {
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
