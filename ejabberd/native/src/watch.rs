//! The master's link watch as a NIF resource, one per MUC service (held by mod_dmuc's process):
//! ejabberd's rooms each hold their own master engine, so pings are answered, and silences
//! timed, once per service; the rooms hear of each link change.

use std::sync::Mutex;

use dmuc::link_watch::LinkWatch;
use dmuc::master::TrustedMirror;
use dmuc::Timestamp;
use rustler::ResourceArc;

use crate::error::NifError;
use crate::master::domain_list;

pub struct WatchRes(Mutex<LinkWatch>);

#[rustler::resource_impl]
impl rustler::Resource for WatchRes {}

/// `(Reply | "", [{Mirror, Up}], NextTimeoutMs | 0)`.
type Outcome = (String, Vec<(String, bool)>, u64);

fn run(
    r: &WatchRes,
    f: impl FnOnce(&mut LinkWatch) -> Result<Option<String>, dmuc::Error>,
) -> Result<Outcome, NifError> {
    let mut w = crate::lock(&r.0);
    let reply = f(&mut w)?.unwrap_or_default();
    let mut events = Vec::new();
    while let Some(e) = w.poll_event() {
        events.push((e.mirror, e.up));
    }
    Ok((reply, events, w.poll_timeout().map(|t| t.0).unwrap_or(0)))
}

#[rustler::nif]
fn watch_new(trusted: Vec<String>, timeout_s: u64) -> Result<ResourceArc<WatchRes>, NifError> {
    let trusted = domain_list("trusted_mirrors", trusted)?;
    let w = LinkWatch::new(
        trusted.into_iter().map(TrustedMirror::new).collect(),
        timeout_s.max(1) * 1000,
    );
    Ok(ResourceArc::new(WatchRes(Mutex::new(w))))
}

#[rustler::nif]
fn watch_ping(r: ResourceArc<WatchRes>, now: u64, xml: String) -> Result<Outcome, NifError> {
    run(&r, |w| w.handle_ping(Timestamp(now), &xml))
}

/// A room saw a join through `mirror`: the watch hears it (its silence is timed from now).
#[rustler::nif]
fn watch_hear(r: ResourceArc<WatchRes>, now: u64, mirror: String) -> Result<Outcome, NifError> {
    run(&r, |w| {
        w.hear(Timestamp(now), &mirror.to_ascii_lowercase());
        Ok(None)
    })
}

/// A room got a stanza from `domain` (an occupant behind a mirror, a mirror's request): each
/// mirror that is or speaks for `domain` is heard (traffic is proof of life, see dmuc::link).
#[rustler::nif]
fn watch_hear_from(
    r: ResourceArc<WatchRes>,
    now: u64,
    domain: String,
) -> Result<Outcome, NifError> {
    run(&r, |w| {
        w.hear_from(Timestamp(now), &domain);
        Ok(None)
    })
}

#[rustler::nif]
fn watch_timeout(r: ResourceArc<WatchRes>, now: u64) -> Result<Outcome, NifError> {
    run(&r, |w| {
        w.handle_timeout(Timestamp(now));
        Ok(None)
    })
}

/// `([ProbeXml], [{Mirror, Up}], NextTimeoutMs | 0)`: an s2s session of `service` with
/// `domain` closed; the probes to route (see dmuc::link_watch).
#[rustler::nif]
fn watch_s2s_closed(
    r: ResourceArc<WatchRes>,
    now: u64,
    service: String,
    domain: String,
) -> Result<(Vec<String>, Vec<(String, bool)>, u64), NifError> {
    let mut w = crate::lock(&r.0);
    w.handle_s2s_closed(Timestamp(now), &service, &domain);
    let mut probes = Vec::new();
    while let Some(x) = w.poll_transmit() {
        probes.push(x);
    }
    let mut events = Vec::new();
    while let Some(e) = w.poll_event() {
        events.push((e.mirror, e.up));
    }
    Ok((probes, events, w.poll_timeout().map(|t| t.0).unwrap_or(0)))
}

/// `(Consumed, [{Mirror, Up}], NextTimeoutMs | 0)`: an IQ result or error to the service; if it
/// answers a probe, it is consumed.
#[rustler::nif]
fn watch_answer(
    r: ResourceArc<WatchRes>,
    now: u64,
    xml: String,
) -> Result<(bool, Vec<(String, bool)>, u64), NifError> {
    let mut w = crate::lock(&r.0);
    let consumed = w.handle_answer(Timestamp(now), &xml)?;
    let mut events = Vec::new();
    while let Some(e) = w.poll_event() {
        events.push((e.mirror, e.up));
    }
    Ok((consumed, events, w.poll_timeout().map(|t| t.0).unwrap_or(0)))
}

/// `[{Mirror, Up, LastSeenMs, Outages}]`.
#[rustler::nif]
fn watch_status(r: ResourceArc<WatchRes>) -> Result<Vec<(String, bool, u64, u64)>, NifError> {
    let w = crate::lock(&r.0);
    Ok(w.status()
        .into_iter()
        .map(|s| (s.mirror, s.up, s.last_seen.0, s.outages))
        .collect())
}
