//! Time as the host passes it in: milliseconds since the Unix epoch.
//!
//! The engine never reads a clock. Every `handle_*` call takes the current [`Timestamp`], and every
//! timer the engine wants comes back from `poll_timeout` as a [`Timestamp`].

use chrono::{DateTime, SecondsFormat, Utc};

/// Wall-clock time in milliseconds since 1970-01-01T00:00:00Z.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Timestamp(pub u64);

impl Timestamp {
    /// From seconds (a Lua `os.time()` or `socket.gettime()` value).
    pub fn from_secs_f64(secs: f64) -> Self {
        if secs.is_finite() && secs > 0.0 {
            Timestamp((secs * 1000.0) as u64)
        } else {
            Timestamp(0)
        }
    }

    /// This time plus `ms` milliseconds.
    pub fn plus_ms(self, ms: u64) -> Self {
        Timestamp(self.0.saturating_add(ms))
    }

    /// Milliseconds from `earlier` to `self`, zero if `earlier` is later.
    pub fn since(self, earlier: Timestamp) -> u64 {
        self.0.saturating_sub(earlier.0)
    }

    /// XEP-0082 DateTime (`2011-01-19T08:02:43Z`, with milliseconds only when they are not zero).
    pub fn to_xep0082(self) -> String {
        let dt = DateTime::<Utc>::from_timestamp_millis(self.0 as i64).unwrap_or_default();
        let fmt = if self.0.is_multiple_of(1000) {
            SecondsFormat::Secs
        } else {
            SecondsFormat::Millis
        };
        dt.to_rfc3339_opts(fmt, true)
    }

    /// Parse an XEP-0082 DateTime; `None` if it is not one.
    pub fn parse_xep0082(s: &str) -> Option<Self> {
        let dt = DateTime::parse_from_rfc3339(s.trim()).ok()?;
        let ms = dt.timestamp_millis();
        (ms >= 0).then_some(Timestamp(ms as u64))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xep0082_round_trip() {
        let t = Timestamp::parse_xep0082("2011-01-19T08:02:43Z").unwrap();
        assert_eq!(t.0, 1_295_424_163_000);
        assert_eq!(t.to_xep0082(), "2011-01-19T08:02:43Z");
        assert_eq!(
            Timestamp(1_295_424_163_250).to_xep0082(),
            "2011-01-19T08:02:43.250Z"
        );
        assert_eq!(
            Timestamp::parse_xep0082("2011-01-19T10:02:43+02:00"),
            Some(t)
        );
        assert_eq!(Timestamp::parse_xep0082("yesterday"), None);
        assert_eq!(Timestamp::parse_xep0082("1960-01-01T00:00:00Z"), None);
    }
}
