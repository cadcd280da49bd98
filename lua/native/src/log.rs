//! `tracing` into Prosody's log. The engine logs through `tracing`; a subscriber installed once
//! buffers each event, and every call from Lua hands the buffer to the logger the shim set
//! (`module:log`). Panics are logged the same way before mlua turns them into Lua errors.

use std::fmt::Write;
use std::sync::OnceLock;

use mlua::prelude::*;
use parking_lot::Mutex;
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::{Context, Layer, SubscriberExt};

static BUFFER: Mutex<Vec<(&'static str, String)>> = Mutex::new(Vec::new());
static INSTALLED: OnceLock<()> = OnceLock::new();
const LOGGER_KEY: &str = "dmuc.logger";

struct Buffer;

struct Fields(String);

impl Visit for Fields {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(self.0, "{value:?}");
        } else {
            let _ = write!(self.0, " {}={value:?}", field.name());
        }
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.0.push_str(value);
        } else {
            let _ = write!(self.0, " {}={value}", field.name());
        }
    }
}

impl<S: Subscriber> Layer<S> for Buffer {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        let level = match *event.metadata().level() {
            Level::ERROR => "error",
            Level::WARN => "warn",
            Level::INFO => "info",
            _ => "debug",
        };
        let mut fields = Fields(String::new());
        event.record(&mut fields);
        BUFFER.lock().push((level, fields.0));
    }
}

/// Install the subscriber and the panic hook, once per process.
pub fn install() {
    INSTALLED.get_or_init(|| {
        let _ =
            tracing::subscriber::set_global_default(tracing_subscriber::registry().with(Buffer));
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            BUFFER
                .lock()
                .push(("error", format!("panic in dmuc: {info}")));
            previous(info);
        }));
    });
}

/// `set_logger(function(level, message) ... end)`.
pub fn set_logger(lua: &Lua, f: LuaFunction) -> LuaResult<()> {
    lua.set_named_registry_value(LOGGER_KEY, f)
}

/// Hand buffered log lines to the shim's logger.
pub fn flush(lua: &Lua) {
    let lines = std::mem::take(&mut *BUFFER.lock());
    if lines.is_empty() {
        return;
    }
    let Ok(f) = lua.named_registry_value::<LuaFunction>(LOGGER_KEY) else {
        return;
    };
    for (level, message) in lines {
        let _ = f.call::<()>((level, message));
    }
}
