//! For host shims (feature `host-log`): the engine's `tracing` events, captured for the host's own
//! logger. A host cannot be called back from inside the engine (Lua and the BEAM each have their
//! own rules about who may call them), so a subscriber buffers each event and the shim drains the
//! buffer after every call ([`take`]) and logs the lines through `module:log` or `?INFO_MSG`.
//! The buffer is bounded; a panic is captured too, before the shim's runtime turns it into an
//! error for the host.

use std::fmt::Write;
use std::sync::{Mutex, OnceLock};

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::{Context, Layer, SubscriberExt};

/// How bad a captured line is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    /// Something failed.
    Error,
    /// Input refused, or an outage.
    Warn,
    /// Rooms opened and closed, links lost and back.
    Info,
    /// Everything else.
    Debug,
}

const MAX_LINES: usize = 10_000;
static BUFFER: Mutex<Vec<(Severity, String)>> = Mutex::new(Vec::new());
static INSTALLED: OnceLock<()> = OnceLock::new();

struct Capture;
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

fn push(severity: Severity, line: String) {
    if let Ok(mut b) = BUFFER.lock() {
        if b.len() < MAX_LINES {
            b.push((severity, line));
        }
    }
}

impl<S: Subscriber> Layer<S> for Capture {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        let severity = match *event.metadata().level() {
            Level::ERROR => Severity::Error,
            Level::WARN => Severity::Warn,
            Level::INFO => Severity::Info,
            _ => Severity::Debug,
        };
        let mut fields = Fields(String::new());
        event.record(&mut fields);
        push(severity, fields.0);
    }
}

/// Install the capturing subscriber and a panic hook that logs, once per process.
pub fn install() {
    INSTALLED.get_or_init(|| {
        let _ =
            tracing::subscriber::set_global_default(tracing_subscriber::registry().with(Capture));
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            push(Severity::Error, format!("panic in dmuc: {info}"));
            previous(info);
        }));
    });
}

/// The lines captured since the last call.
pub fn take() -> Vec<(Severity, String)> {
    BUFFER
        .lock()
        .map(|mut b| std::mem::take(&mut *b))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn captures_events_with_fields() {
        install();
        let _ = take();
        tracing::warn!(room = "r@m", "queue full");
        let lines = take();
        assert!(
            lines.contains(&(Severity::Warn, "queue full room=r@m".to_string())),
            "{lines:?}"
        );
        assert!(take().is_empty());
    }
}
