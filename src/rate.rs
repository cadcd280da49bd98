//! Rates over engine time (the host passes `now`): a token bucket, for joins per mirror, and a
//! per-peer limiter for warnings, so that a flood of refusals costs a log line per peer and
//! interval, not one per stanza.

use std::collections::HashMap;

use crate::time::Timestamp;

/// At most `burst` at once, refilled at `per_second`.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenBucket {
    tokens: f64,
    burst: f64,
    per_second: f64,
    last: Timestamp,
}

impl TokenBucket {
    /// Full at `now`.
    pub fn new(now: Timestamp, per_second: u32, burst: u32) -> Self {
        TokenBucket {
            tokens: f64::from(burst),
            burst: f64::from(burst),
            per_second: f64::from(per_second),
            last: now,
        }
    }

    /// Take one token if there is one.
    pub fn take(&mut self, now: Timestamp) -> bool {
        let elapsed = now.0.saturating_sub(self.last.0) as f64 / 1000.0;
        self.last = self.last.max(now);
        self.tokens = (self.tokens + elapsed * self.per_second).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Peers remembered; past this the oldest half is forgotten (each then logs again at once).
const PEERS: usize = 4096;

/// One warning per peer per interval; the next one says how many were left out.
#[derive(Debug, Clone)]
pub struct LogLimiter {
    interval_ms: u64,
    peers: HashMap<String, (Timestamp, u64)>,
}

impl LogLimiter {
    /// One line per peer per `interval_ms`.
    pub fn new(interval_ms: u64) -> Self {
        LogLimiter {
            interval_ms,
            peers: HashMap::new(),
        }
    }

    /// Should a warning about `peer` be logged now? `Some(n)`: yes, `n` were left out since the
    /// last one; `None`: not now (counted).
    pub fn allow(&mut self, peer: &str, now: Timestamp) -> Option<u64> {
        if self.peers.len() >= PEERS && !self.peers.contains_key(peer) {
            let mut by_age: Vec<(String, Timestamp)> = self
                .peers
                .iter()
                .map(|(p, (t, _))| (p.clone(), *t))
                .collect();
            by_age.sort_by_key(|(_, t)| *t);
            for (p, _) in by_age.into_iter().take(PEERS / 2) {
                self.peers.remove(&p);
            }
        }
        match self.peers.get_mut(peer) {
            Some((last, left_out)) if now.0 < last.0.saturating_add(self.interval_ms) => {
                *left_out += 1;
                None
            }
            Some((last, left_out)) => {
                let n = *left_out;
                *last = now;
                *left_out = 0;
                Some(n)
            }
            None => {
                self.peers.insert(peer.to_string(), (now, 0));
                Some(0)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_allows_its_burst_then_its_rate() {
        let t0 = Timestamp(1_000_000);
        let mut b = TokenBucket::new(t0, 2, 3);
        assert!((0..3).all(|_| b.take(t0)));
        assert!(!b.take(t0));
        assert!(b.take(Timestamp(t0.0 + 500)));
        assert!(!b.take(Timestamp(t0.0 + 500)));
        // Refills up to the burst only.
        let later = Timestamp(t0.0 + 60_000);
        assert_eq!((0..10).filter(|_| b.take(later)).count(), 3);
    }

    #[test]
    fn one_line_per_peer_and_interval() {
        let t0 = Timestamp(1_000_000);
        let mut l = LogLimiter::new(10_000);
        assert_eq!(l.allow("evil.example", t0), Some(0));
        assert_eq!(l.allow("evil.example", Timestamp(t0.0 + 1)), None);
        assert_eq!(l.allow("evil.example", Timestamp(t0.0 + 2)), None);
        assert_eq!(l.allow("other.example", Timestamp(t0.0 + 3)), Some(0));
        assert_eq!(l.allow("evil.example", Timestamp(t0.0 + 10_000)), Some(2));
    }

    #[test]
    fn the_peer_table_stays_bounded() {
        let mut l = LogLimiter::new(10_000);
        for i in 0..(PEERS * 3) {
            l.allow(&format!("p{i}"), Timestamp(i as u64));
        }
        assert!(l.peers.len() <= PEERS);
    }
}
