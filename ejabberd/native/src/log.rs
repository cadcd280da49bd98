//! `tracing` into ejabberd's logger: a subscriber buffers events; `dmuc_nif:take_logs/0` hands
//! them to `mod_dmuc`, which logs them with `?INFO_MSG` and friends.

use std::fmt::Write;
use std::sync::Mutex;

use rustler::{Env, Term};
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::{Context, Layer, SubscriberExt};

static BUFFER: Mutex<Vec<(&'static str, String)>> = Mutex::new(Vec::new());

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
            Level::WARN => "warning",
            Level::INFO => "info",
            _ => "debug",
        };
        let mut fields = Fields(String::new());
        event.record(&mut fields);
        if let Ok(mut b) = BUFFER.lock() {
            if b.len() < 10_000 {
                b.push((level, fields.0));
            }
        }
    }
}

/// NIF load: install the subscriber and a panic hook that logs.
pub fn load(_env: Env, _info: Term) -> bool {
    let _ = tracing::subscriber::set_global_default(tracing_subscriber::registry().with(Buffer));
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if let Ok(mut b) = BUFFER.lock() {
            b.push(("error", format!("panic in dmuc: {info}")));
        }
        previous(info);
    }));
    true
}

/// `take_logs() -> [{Level, Message}]`.
#[rustler::nif]
fn take_logs() -> Vec<(String, String)> {
    match BUFFER.lock() {
        Ok(mut b) => std::mem::take(&mut *b)
            .into_iter()
            .map(|(l, m)| (l.to_string(), m))
            .collect(),
        Err(_) => Vec::new(),
    }
}
