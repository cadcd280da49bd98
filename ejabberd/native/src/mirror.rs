//! The mirror role as a NIF resource, one per mirror service (held by mod_dmuc's process).

use std::sync::Mutex;

use dmuc::bounds::Limits;
use dmuc::mirror::{Mirror, MirrorConfig, StoreOp, Verdict};
use dmuc::Timestamp;
use rustler::ResourceArc;

use crate::error::NifError;
use crate::master::domain_list;

rustler::atoms! { consumed, pass, put, delete }

pub struct MirrorRes(Mutex<Mirror>);

#[rustler::resource_impl]
impl rustler::Resource for MirrorRes {}

/// `(Verdict, [], NextTimeoutMs | 0)`. What the engine wants routed stays in it until
/// [`mirror_drain`]: ejabberd calls the mirror from many processes, and only one process (the
/// module's) routes, so that stanzas leave in the order the engine made them.
type Outcome = (rustler::Atom, Vec<String>, u64);

fn run(
    r: &MirrorRes,
    f: impl FnOnce(&mut Mirror) -> Result<Verdict, dmuc::Error>,
) -> Result<Outcome, NifError> {
    let mut m = crate::lock(&r.0);
    let v = f(&mut m)?;
    let at = m.poll_timeout().map(|t| t.0).unwrap_or(0);
    let verdict = if v == Verdict::Consumed {
        consumed()
    } else {
        pass()
    };
    Ok((verdict, Vec::new(), at))
}

/// `{[Xml], NextTimeoutMs | 0}`: everything the engine wants routed, in order.
#[rustler::nif]
fn mirror_drain(r: ResourceArc<MirrorRes>) -> Result<(Vec<String>, u64), NifError> {
    let mut m = crate::lock(&r.0);
    let mut sent = Vec::new();
    while let Some(x) = m.poll_transmit() {
        sent.push(x);
    }
    Ok((sent, m.poll_timeout().map(|t| t.0).unwrap_or(0)))
}

/// Settings in seconds, as ejabberd options give them; 0 keeps the default.
#[rustler::nif]
#[allow(clippy::too_many_arguments)]
fn mirror_new(
    service: String,
    masters: Vec<String>,
    queue_limit: u64,
    join_timeout_s: u64,
    history_size: u64,
    ping_interval_s: u64,
    ping_timeout_s: u64,
    catch_up_margin_s: u64,
    max_depth: u64,
    max_size: u64,
    max_local_occupants: u64,
    max_rooms: u64,
    store_after_s: u64,
) -> Result<ResourceArc<MirrorRes>, NifError> {
    let masters = domain_list("masters", masters)?;
    if masters.is_empty() {
        return Err(NifError::Option {
            option: "masters",
            reason: "list at least one MUC service to mirror".into(),
        });
    }
    let mut c = MirrorConfig::new(service, masters);
    c.limits = limits(max_depth, max_size)?;
    if max_local_occupants > 0 {
        c.max_local_occupants = max_local_occupants as usize;
    }
    if max_rooms > 0 {
        c.max_rooms = max_rooms as usize;
    }
    if queue_limit > 0 {
        c.queue_limit = queue_limit as usize;
    }
    if join_timeout_s > 0 {
        c.join_timeout_ms = join_timeout_s * 1000;
    }
    if history_size > 0 {
        c.history_size = history_size as usize;
    }
    if ping_interval_s > 0 {
        c.ping_interval_ms = ping_interval_s * 1000;
    }
    if ping_timeout_s > 0 {
        c.ping_timeout_ms = ping_timeout_s * 1000;
    }
    if catch_up_margin_s > 0 {
        c.catch_up_margin_ms = catch_up_margin_s * 1000;
    }
    // 0 is a setting here (store at once), not "the default".
    c.store_after_ms = store_after_s.saturating_mul(1000);
    Ok(ResourceArc::new(MirrorRes(Mutex::new(Mirror::new(c)))))
}

/// `max_stanza_depth` / `max_stanza_size`, each within the engine's ceiling.
pub(crate) fn limits(max_depth: u64, max_size: u64) -> Result<Limits, NifError> {
    Limits::new(max_depth as usize, max_size as usize).map_err(|e| NifError::Option {
        option: "max_stanza_depth/max_stanza_size",
        reason: e.to_string(),
    })
}

#[rustler::nif]
fn mirror_handles(r: ResourceArc<MirrorRes>, jid: String) -> bool {
    crate::lock(&r.0).handles(&jid)
}

#[rustler::nif]
fn mirror_local(r: ResourceArc<MirrorRes>, now: u64, xml: String) -> Result<Outcome, NifError> {
    run(&r, |m| m.handle_local(Timestamp(now), &xml))
}

/// A local user's broadcast unavailable presence: `consumed` if the mirror left rooms for them.
#[rustler::nif]
fn mirror_unavailable(
    r: ResourceArc<MirrorRes>,
    now: u64,
    xml: String,
) -> Result<Outcome, NifError> {
    run(&r, |m| {
        let left = m.handle_local_unavailable(Timestamp(now), &xml)?;
        Ok(if left > 0 {
            Verdict::Consumed
        } else {
            Verdict::Pass
        })
    })
}

#[rustler::nif]
fn mirror_remote(r: ResourceArc<MirrorRes>, now: u64, xml: String) -> Result<Outcome, NifError> {
    run(&r, |m| m.handle_remote(Timestamp(now), &xml))
}

#[rustler::nif]
fn mirror_timeout(r: ResourceArc<MirrorRes>, now: u64) -> Result<Outcome, NifError> {
    run(&r, |m| {
        m.handle_timeout(Timestamp(now));
        Ok(Verdict::Consumed)
    })
}

#[rustler::nif]
fn mirror_link(
    r: ResourceArc<MirrorRes>,
    now: u64,
    master: String,
    up: bool,
) -> Result<Outcome, NifError> {
    run(&r, |m| {
        m.handle_link(Timestamp(now), &master, up);
        Ok(Verdict::Consumed)
    })
}

/// At start: the queue stored before a restart.
#[rustler::nif]
fn mirror_import(
    r: ResourceArc<MirrorRes>,
    now: u64,
    items: Vec<String>,
) -> Result<Outcome, NifError> {
    run(&r, |m| {
        m.import_queue(Timestamp(now), &items);
        Ok(Verdict::Consumed)
    })
}

/// Shutdown: what the engine holds back from the store (write-behind) is released to
/// `mirror_persist`.
#[rustler::nif]
fn mirror_flush_store(r: ResourceArc<MirrorRes>) -> rustler::Atom {
    crate::lock(&r.0).flush_store();
    rustler::types::atom::ok()
}

/// `[{put, Key, Item} | {delete, Key, <<>>}]`: the changes to the stored queue since the last
/// call, one row each.
#[rustler::nif]
fn mirror_persist(
    r: ResourceArc<MirrorRes>,
) -> Result<Vec<(rustler::Atom, u64, String)>, NifError> {
    let mut m = crate::lock(&r.0);
    Ok(std::iter::from_fn(|| m.poll_store())
        .map(|op| match op {
            StoreOp::Put { key, item } => (put(), key, item),
            StoreOp::Delete { key } => (delete(), key, String::new()),
        })
        .collect())
}

/// `[{{Master, Up}, {Rooms, Queued, InFlight, Outages}, {LastPongMs, LastResyncMs, DownSinceMs}}]`,
/// times 0 when never.
#[rustler::nif]
#[allow(clippy::type_complexity)]
fn mirror_status(
    r: ResourceArc<MirrorRes>,
) -> Result<Vec<((String, bool), (usize, usize, usize, u64), (u64, u64, u64))>, NifError> {
    let m = crate::lock(&r.0);
    let ms = |t: Option<Timestamp>| t.map(|t| t.0).unwrap_or(0);
    Ok(m.status()
        .into_iter()
        .map(|s| {
            (
                (s.master, s.up),
                (s.rooms, s.queued, s.in_flight, s.outages),
                (ms(s.last_pong), ms(s.last_resync), ms(s.down_since)),
            )
        })
        .collect())
}

/// An s2s session with a master closed: in-flight messages go again, a ping round starts.
#[rustler::nif]
fn mirror_s2s_closed(
    r: ResourceArc<MirrorRes>,
    now: u64,
    domain: String,
) -> Result<Outcome, NifError> {
    run(&r, |m| {
        m.handle_s2s_closed(Timestamp(now), &domain);
        Ok(Verdict::Consumed)
    })
}

/// An incoming s2s session from a master closed: the rooms catch up.
#[rustler::nif]
fn mirror_s2s_in_closed(
    r: ResourceArc<MirrorRes>,
    now: u64,
    domain: String,
) -> Result<Outcome, NifError> {
    run(&r, |m| {
        m.handle_s2s_in_closed(Timestamp(now), &domain);
        Ok(Verdict::Consumed)
    })
}

/// An s2s connection to a master is closing (still the route): in flight goes back to the queue.
#[rustler::nif]
fn mirror_s2s_closing(
    r: ResourceArc<MirrorRes>,
    now: u64,
    domain: String,
) -> Result<Outcome, NifError> {
    run(&r, |m| {
        m.handle_s2s_closing(Timestamp(now), &domain);
        Ok(Verdict::Consumed)
    })
}
