//! The master's watch over its mirrors' links. Each mirror pings the master (XEP-0199, see
//! [`crate::link`]); a mirror silent for the link timeout is lost, and one heard again is back.
//!
//! [`crate::master::Master`] uses a watch for its rooms. A host whose rooms each hold their own
//! master engine (ejabberd) keeps one watch per MUC service and tells the rooms of each
//! [`LinkEvent`].

use std::collections::{BTreeMap, VecDeque};

use tracing::{info, warn};

use crate::error::Error;
use crate::master::TrustedMirror;
use crate::ns;
use crate::stanza;
use crate::time::Timestamp;

/// A mirror's link changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkEvent {
    /// The mirror service.
    pub mirror: String,
    /// Back (true) or lost (false).
    pub up: bool,
}

/// One mirror's link, for an admin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Watched {
    /// The mirror service.
    pub mirror: String,
    /// Is it up?
    pub up: bool,
    /// When it was last heard from.
    pub last_seen: Timestamp,
    /// Times it was lost.
    pub outages: u64,
}

#[derive(Debug, Clone, Copy, Default)]
struct Heard {
    at: Timestamp,
    down: bool,
    outages: u64,
}

/// Last-heard times of the mirrors, and the events their changes make.
#[derive(Clone, Debug)]
pub struct LinkWatch {
    trusted: Vec<TrustedMirror>,
    timeout_ms: u64,
    heard: BTreeMap<String, Heard>,
    events: VecDeque<LinkEvent>,
}

impl LinkWatch {
    /// A watch over these mirrors; one silent for `timeout_ms` is lost.
    pub fn new(trusted: Vec<TrustedMirror>, timeout_ms: u64) -> Self {
        LinkWatch {
            trusted,
            timeout_ms,
            heard: BTreeMap::new(),
            events: VecDeque::new(),
        }
    }

    /// An IQ to the MUC service. A ping from a trusted mirror, or from a user domain one speaks
    /// for, proves that mirror's link alive: the answer comes back to send. Anything else gives
    /// `None` and is the host's.
    pub fn handle_ping(&mut self, now: Timestamp, xml: &str) -> Result<Option<String>, Error> {
        let iq = stanza::parse(xml)?;
        if iq.name() != "iq"
            || stanza::stanza_type(&iq) != Some("get")
            || !iq.has_child("ping", ns::PING)
        {
            return Ok(None);
        }
        let from = stanza::jid_attr(&iq, "iq", "from")?;
        let domain = from.domain().as_str().to_ascii_lowercase();
        let mirrors: Vec<String> = self
            .trusted
            .iter()
            .filter(|t| t.mirror == domain || t.may_speak_for(&domain))
            .map(|t| t.mirror.clone())
            .collect();
        if mirrors.is_empty() {
            return Ok(None);
        }
        for mirror in &mirrors {
            self.hear(now, mirror);
        }
        let to = iq.attr("to").unwrap_or_default().to_string();
        Ok(Some(stanza::serialize(&stanza::iq_result(&iq, &to))))
    }

    /// The mirror was heard from (a ping, a join, a message): its link is up.
    pub fn hear(&mut self, now: Timestamp, mirror: &str) {
        let h = self.heard.entry(mirror.to_string()).or_default();
        h.at = now;
        if h.down {
            h.down = false;
            info!(%mirror, "mirror back");
            self.events.push_back(LinkEvent {
                mirror: mirror.to_string(),
                up: true,
            });
        }
    }

    /// The host knows the mirror's link is lost.
    pub fn lose(&mut self, mirror: &str) {
        let h = self.heard.entry(mirror.to_string()).or_default();
        if h.down {
            return;
        }
        h.down = true;
        h.outages += 1;
        self.events.push_back(LinkEvent {
            mirror: mirror.to_string(),
            up: false,
        });
    }

    /// When [`LinkWatch::handle_timeout`] should next be called.
    pub fn poll_timeout(&self) -> Option<Timestamp> {
        self.heard
            .values()
            .filter(|h| !h.down)
            .map(|h| h.at.plus_ms(self.timeout_ms))
            .min()
    }

    /// Time has come: mirrors silent for the link timeout are lost.
    pub fn handle_timeout(&mut self, now: Timestamp) {
        let silent: Vec<String> = self
            .heard
            .iter()
            .filter(|(_, h)| !h.down && now.since(h.at) >= self.timeout_ms)
            .map(|(m, _)| m.clone())
            .collect();
        for mirror in silent {
            warn!(%mirror, "no ping from the mirror: its link is lost");
            self.lose(&mirror);
        }
    }

    /// The next link change.
    pub fn poll_event(&mut self) -> Option<LinkEvent> {
        self.events.pop_front()
    }

    /// Every mirror heard from.
    pub fn status(&self) -> Vec<Watched> {
        self.heard
            .iter()
            .map(|(m, h)| Watched {
                mirror: m.clone(),
                up: !h.down,
                last_seen: h.at,
                outages: h.outages,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PING: &str = "<iq type='get' id='p1' from='raleigh.localhost' \
                        to='conference.fairfax.localhost'><ping xmlns='urn:xmpp:ping'/></iq>";

    #[test]
    fn a_silent_mirror_is_lost_and_a_ping_brings_it_back() {
        let mut w = LinkWatch::new(vec![TrustedMirror::new("mirror.raleigh.localhost")], 4000);
        let reply = w.handle_ping(Timestamp(1000), PING).unwrap().unwrap();
        assert_eq!(
            reply,
            "<iq xmlns='jabber:client' from='conference.fairfax.localhost' id='p1' \
             to='raleigh.localhost' type='result'/>"
        );
        assert_eq!(w.poll_timeout(), Some(Timestamp(5000)));
        w.handle_timeout(Timestamp(4999));
        assert_eq!(w.poll_event(), None);
        w.handle_timeout(Timestamp(5000));
        assert_eq!(
            w.poll_event(),
            Some(LinkEvent {
                mirror: "mirror.raleigh.localhost".into(),
                up: false
            })
        );
        assert_eq!(w.poll_timeout(), None);
        w.handle_ping(Timestamp(9000), PING).unwrap();
        assert_eq!(
            w.poll_event(),
            Some(LinkEvent {
                mirror: "mirror.raleigh.localhost".into(),
                up: true
            })
        );
        assert_eq!(w.status()[0].outages, 1);
    }

    #[test]
    fn pings_from_strangers_are_the_hosts() {
        let mut w = LinkWatch::new(vec![TrustedMirror::new("mirror.raleigh.localhost")], 4000);
        let stranger = PING.replace("raleigh.localhost", "evil.example");
        assert_eq!(w.handle_ping(Timestamp(1), &stranger).unwrap(), None);
        let disco =
            "<iq type='get' id='d' from='raleigh.localhost' to='conference.fairfax.localhost'>\
                     <query xmlns='http://jabber.org/protocol/disco#info'/></iq>";
        assert_eq!(w.handle_ping(Timestamp(1), disco).unwrap(), None);
        assert!(w.status().is_empty());
    }
}
