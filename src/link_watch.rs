//! The master's watch over its mirrors' links. Each mirror pings the master (XEP-0199, see
//! [`crate::link`]); a mirror silent for the link timeout is lost, and one heard again is back.
//!
//! The master also probes. When the host sees an s2s session with a mirror (or a user domain it
//! speaks for) close, for whatever reason, the watch pings the mirror service from the MUC
//! service ([`LinkWatch::handle_s2s_closed`], the ping from [`LinkWatch::poll_transmit`]). An
//! answer, or anything else heard from the mirror, means the link is fine: servers close idle
//! sessions, and nobody is evicted for that. A bounce, or no answer within the probe timeout
//! (5 s by default), means the link is lost: the mirror's occupants are evicted at once instead
//! of after the link timeout.
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

/// How long a probe may go unanswered before the mirror counts as lost.
pub const DEFAULT_PROBE_TIMEOUT_MS: u64 = 5_000;

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

/// A probe on its way: a ping to a mirror after an s2s session with it closed.
#[derive(Debug, Clone)]
struct Probe {
    mirror: String,
    deadline: Timestamp,
}

/// Last-heard times of the mirrors, the probes on their way, and the events their changes make.
#[derive(Clone, Debug)]
pub struct LinkWatch {
    trusted: Vec<TrustedMirror>,
    timeout_ms: u64,
    probe_timeout_ms: u64,
    heard: BTreeMap<String, Heard>,
    /// By IQ id.
    probes: BTreeMap<String, Probe>,
    next_probe: u64,
    events: VecDeque<LinkEvent>,
    transmits: VecDeque<String>,
}

impl LinkWatch {
    /// A watch over these mirrors; one silent for `timeout_ms` is lost.
    pub fn new(trusted: Vec<TrustedMirror>, timeout_ms: u64) -> Self {
        LinkWatch {
            trusted,
            timeout_ms,
            probe_timeout_ms: DEFAULT_PROBE_TIMEOUT_MS,
            heard: BTreeMap::new(),
            probes: BTreeMap::new(),
            next_probe: 0,
            events: VecDeque::new(),
            transmits: VecDeque::new(),
        }
    }

    /// How long a probe may go unanswered (see the module docs).
    pub fn with_probe_timeout(mut self, ms: u64) -> Self {
        self.probe_timeout_ms = ms.max(1);
        self
    }

    /// The host saw an s2s session with `domain` close (either direction, any reason). Each
    /// trusted mirror that is `domain` or speaks for it, and whose link is not known to be down,
    /// is probed: a ping
    /// from `service` (the MUC service) to the mirror service, from [`LinkWatch::poll_transmit`].
    pub fn handle_s2s_closed(&mut self, now: Timestamp, service: &str, domain: &str) {
        let domain = domain.to_ascii_lowercase();
        let mirrors: Vec<String> = self
            .trusted
            .iter()
            .filter(|t| t.mirror == domain || t.may_speak_for(&domain))
            .map(|t| t.mirror.clone())
            .collect();
        for mirror in mirrors {
            // Only a mirror with a link to lose: up, or not heard from yet (a host whose rooms
            // keep their own engines tells the watch only of pings, and the first may not have
            // come: its joins did).
            if self.heard.get(&mirror).is_some_and(|h| h.down) {
                continue;
            }
            // A probe on its way may have gone into a connection that was closing too (a host
            // may close both directions at once, and route to a closing connection for a
            // moment): this one replaces it, with its own timeout.
            self.probes.retain(|_, p| p.mirror != mirror);
            self.next_probe += 1;
            let id = format!("dmuc-probe-{}", self.next_probe);
            let mut iq = minidom::Element::builder("iq", ns::JABBER_CLIENT).build();
            stanza::set_attr(&mut iq, "from", service);
            stanza::set_attr(&mut iq, "to", &mirror);
            stanza::set_attr(&mut iq, "id", &id);
            stanza::set_attr(&mut iq, "type", "get");
            iq.append_child(minidom::Element::builder("ping", ns::PING).build());
            info!(%mirror, %domain, "s2s session closed: probing the mirror");
            self.transmits.push_back(stanza::serialize(&iq));
            self.probes.insert(
                id,
                Probe {
                    mirror,
                    deadline: now.plus_ms(self.probe_timeout_ms),
                },
            );
        }
    }

    /// An IQ result or error to the MUC service: true if it answers one of the watch's probes
    /// (from the probed mirror; an s2s bounce comes from its address too). An answer proves the
    /// link; a bounce loses the mirror at once.
    pub fn handle_answer(&mut self, now: Timestamp, xml: &str) -> Result<bool, Error> {
        if self.probes.is_empty() {
            return Ok(false);
        }
        let iq = stanza::parse(xml)?;
        if iq.name() != "iq" || !matches!(stanza::stanza_type(&iq), Some("result") | Some("error"))
        {
            return Ok(false);
        }
        let id = iq.attr("id").unwrap_or_default();
        let Some(probe) = self.probes.get(id) else {
            return Ok(false);
        };
        let from = stanza::jid_attr(&iq, "iq", "from")?;
        if !from.domain().as_str().eq_ignore_ascii_case(&probe.mirror) || from.node().is_some() {
            return Ok(false);
        }
        let mirror = probe.mirror.clone();
        self.probes.remove(id);
        if stanza::is_s2s_bounce(&iq) {
            warn!(%mirror, "the probe bounced: the mirror's link is lost");
            self.lose(&mirror);
        } else {
            self.hear(now, &mirror);
        }
        Ok(true)
    }

    /// The next stanza to send (a probe), as text.
    pub fn poll_transmit(&mut self) -> Option<String> {
        self.transmits.pop_front()
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
        if !self.hear_from(now, from.domain().as_str()) {
            return Ok(None);
        }
        let to = iq.attr("to").unwrap_or_default().to_string();
        Ok(Some(stanza::serialize(&stanza::iq_result(&iq, &to))))
    }

    /// A stanza came from `domain`: each trusted mirror that is `domain` or speaks for it is
    /// heard from (traffic is proof of life, see [`crate::link`]). False if there is none.
    pub fn hear_from(&mut self, now: Timestamp, domain: &str) -> bool {
        let domain = domain.to_ascii_lowercase();
        let mirrors: Vec<String> = self
            .trusted
            .iter()
            .filter(|t| t.mirror == domain || t.may_speak_for(&domain))
            .map(|t| t.mirror.clone())
            .collect();
        for mirror in &mirrors {
            self.hear(now, mirror);
        }
        !mirrors.is_empty()
    }

    /// The mirror was heard from (a ping, a join, a message): its link is up.
    pub fn hear(&mut self, now: Timestamp, mirror: &str) {
        // Whatever is heard answers a probe too.
        self.probes.retain(|_, p| p.mirror != mirror);
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
        self.probes.retain(|_, p| p.mirror != mirror);
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
            .chain(self.probes.values().map(|p| p.deadline))
            .min()
    }

    /// Time has come: mirrors silent for the link timeout, or whose probe went unanswered, are
    /// lost.
    pub fn handle_timeout(&mut self, now: Timestamp) {
        let unanswered: Vec<String> = self
            .probes
            .values()
            .filter(|p| p.deadline <= now)
            .map(|p| p.mirror.clone())
            .collect();
        for mirror in unanswered {
            warn!(%mirror, "no answer to the probe after an s2s session closed: its link is lost");
            self.lose(&mirror);
        }
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

    const SERVICE: &str = "conference.fairfax.localhost";
    const MIRROR: &str = "mirror.raleigh.localhost";

    fn watched() -> LinkWatch {
        let mut w = LinkWatch::new(vec![TrustedMirror::new(MIRROR)], 120_000);
        w.handle_ping(Timestamp(1000), PING).unwrap().unwrap();
        w
    }

    fn answer(id: &str, kind: &str, from: &str, body: &str) -> String {
        format!("<iq type='{kind}' id='{id}' from='{from}' to='{SERVICE}'>{body}</iq>")
    }

    #[test]
    fn a_closed_session_probes_and_an_answer_evicts_nobody() {
        let mut w = watched();
        // The users' domain's session closed (an idle close, say).
        w.handle_s2s_closed(Timestamp(2000), SERVICE, "raleigh.localhost");
        assert_eq!(
            w.poll_transmit().unwrap(),
            "<iq xmlns='jabber:client' from='conference.fairfax.localhost' id='dmuc-probe-1' \
             to='mirror.raleigh.localhost' type='get'><ping xmlns='urn:xmpp:ping'/></iq>"
        );
        // A second close: the first probe may have gone into that connection. A new probe
        // replaces it, with its own timeout; the first one's answer no longer counts.
        w.handle_s2s_closed(Timestamp(2001), SERVICE, MIRROR);
        assert!(w.poll_transmit().unwrap().contains("id='dmuc-probe-2'"));
        assert_eq!(w.poll_transmit(), None);
        assert_eq!(w.poll_timeout(), Some(Timestamp(7001)));
        assert!(!w
            .handle_answer(
                Timestamp(2100),
                &answer("dmuc-probe-1", "result", MIRROR, "")
            )
            .unwrap());
        // Not an answer: another id, or from someone else.
        assert!(!w
            .handle_answer(Timestamp(2100), &answer("other", "result", MIRROR, ""))
            .unwrap());
        assert!(!w
            .handle_answer(
                Timestamp(2100),
                &answer("dmuc-probe-2", "result", "evil.example", "")
            )
            .unwrap());
        assert!(w
            .handle_answer(
                Timestamp(2100),
                &answer("dmuc-probe-2", "result", MIRROR, "")
            )
            .unwrap());
        w.handle_timeout(Timestamp(7001));
        assert_eq!(w.poll_event(), None);
        assert_eq!(w.poll_timeout(), Some(Timestamp(122_100)));
    }

    #[test]
    fn an_unanswered_or_bounced_probe_loses_the_mirror_at_once() {
        let mut w = watched();
        w.handle_s2s_closed(Timestamp(2000), SERVICE, MIRROR);
        assert!(w.poll_transmit().is_some());
        w.handle_timeout(Timestamp(6999));
        assert_eq!(w.poll_event(), None);
        w.handle_timeout(Timestamp(7000));
        assert_eq!(
            w.poll_event(),
            Some(LinkEvent {
                mirror: MIRROR.into(),
                up: false
            })
        );
        // Lost: no probe for a closed session now; a ping brings it back.
        w.handle_s2s_closed(Timestamp(8000), SERVICE, MIRROR);
        assert_eq!(w.poll_transmit(), None);
        w.handle_ping(Timestamp(9000), PING).unwrap();
        assert!(w.poll_event().unwrap().up);

        w.handle_s2s_closed(Timestamp(10_000), SERVICE, MIRROR);
        assert!(w.poll_transmit().unwrap().contains("dmuc-probe-2"));
        let bounce = answer(
            "dmuc-probe-2",
            "error",
            MIRROR,
            "<error type='cancel'><remote-server-not-found \
             xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></error>",
        );
        assert!(w.handle_answer(Timestamp(10_010), &bounce).unwrap());
        assert!(!w.poll_event().unwrap().up);
        // A stranger's session, or an unknown mirror's, probes nothing.
        w.handle_s2s_closed(Timestamp(11_000), SERVICE, "evil.example");
        assert_eq!(w.poll_transmit(), None);
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
