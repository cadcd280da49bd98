//! The master role as a NIF resource, one per MUC room process (held in its process dictionary).

use std::sync::Mutex;

use dmuc::master::{
    GroupchatVerdict, HistoryRequest, IqVerdict, Master, MasterAction, MasterConfig, Outbound,
    PresenceVerdict, TrustedMirror,
};
use dmuc::mirror_quota::MirrorQuota;
use dmuc::room_rules::RoomRules;
use dmuc::stanza_ids::Adoption;
use dmuc::Timestamp;
use rustler::{Encoder, Env, ResourceArc, Term};

use crate::error::NifError;

rustler::atoms! { pass, refused, join, consumed, history, snapshot, send, drop, replace, evict, config, duplicate, broadcast, undefined }

pub struct MasterRes(Mutex<Master>);

#[rustler::resource_impl]
impl rustler::Resource for MasterRes {}

impl Drop for MasterRes {
    /// The room process is gone: its rooms no longer count against the mirrors' room limit.
    fn drop(&mut self) {
        crate::lock(&self.0).release_quota();
    }
}

/// A MUC service's per-mirror limits, shared by its rooms' engines (made at module start).
pub struct QuotaRes(MirrorQuota);

#[rustler::resource_impl]
impl rustler::Resource for QuotaRes {}

/// The service's quota: `max_rooms` rooms per mirror, joins through one at `join_rate` per
/// second and `join_burst` at once.
#[rustler::nif]
fn master_quota(max_rooms: u64, join_rate: u32, join_burst: u32) -> ResourceArc<QuotaRes> {
    let max_rooms = usize::try_from(max_rooms).unwrap_or(usize::MAX);
    ResourceArc::new(QuotaRes(MirrorQuota::new(max_rooms, join_rate, join_burst)))
}

pub struct HistoryRes(HistoryRequest);

#[rustler::resource_impl]
impl rustler::Resource for HistoryRes {}

fn with<T>(r: &MasterRes, f: impl FnOnce(&mut Master) -> T) -> Result<(T, Vec<String>), NifError> {
    let mut m = crate::lock(&r.0);
    let out = f(&mut m);
    let mut sent = Vec::new();
    while let Some(x) = m.poll_transmit() {
        sent.push(x);
    }
    Ok((out, sent))
}

pub(crate) fn domain_list(
    option: &'static str,
    list: Vec<String>,
) -> Result<Vec<String>, NifError> {
    list.into_iter()
        .map(|d| {
            let d = d.trim().to_ascii_lowercase();
            if d.is_empty()
                || d.contains('@')
                || d.contains('/')
                || jid::DomainPart::new(&d).is_err()
            {
                Err(NifError::Option {
                    option,
                    reason: format!("'{d}' is not a domain name"),
                })
            } else {
                Ok(d)
            }
        })
        .collect()
}

#[rustler::nif]
fn master_new(
    trusted: Vec<String>,
    max_depth: u64,
    max_size: u64,
    quota: ResourceArc<QuotaRes>,
) -> Result<ResourceArc<MasterRes>, NifError> {
    let trusted = domain_list("trusted_mirrors", trusted)?;
    let limits = crate::mirror::limits(max_depth, max_size)?;
    Ok(ResourceArc::new(MasterRes(Mutex::new(Master::with_quota(
        MasterConfig {
            trusted_mirrors: trusted.into_iter().map(TrustedMirror::new).collect(),
            unbracketed_presence: true,
            // mod_mam's ids are microsecond timestamps that order its archive: a proposal far
            // from now would file the message out of order.
            stanza_ids: Adoption::Within {
                max_skew_ms: STANZA_ID_SKEW_MS,
            },
            archived_element: true,
            // mod_muc_room ignores presence probes to occupant JIDs.
            rules: RoomRules {
                answers_probes: false,
            },
            limits,
            ..MasterConfig::default()
        },
        quota.0.share(),
    )))))
}

/// How far from the master's clock a mirror's stanza-id proposal may be for mod_mam to adopt it:
/// a live message's link delay plus clock skew, not a message that waited out an outage.
const STANZA_ID_SKEW_MS: u64 = 5_000;

/// `{duplicate | {broadcast, StanzaId | undefined}, [Xml]}`: a groupchat message before the
/// room broadcasts it. StanzaId (an integer) is the id mod_mam is to archive it under.
#[rustler::nif]
fn master_groupchat<'a>(
    env: Env<'a>,
    r: ResourceArc<MasterRes>,
    now: u64,
    xml: String,
) -> Result<(Term<'a>, Vec<String>), NifError> {
    let (v, sent) = with(&r, |m| m.handle_groupchat(Timestamp(now), &xml))?;
    let verdict = match v? {
        GroupchatVerdict::Duplicate => duplicate().encode(env),
        GroupchatVerdict::Broadcast { stanza_id } => {
            // The engine accepts only digits that fit a u64.
            let id = stanza_id.and_then(|s| s.parse::<u64>().ok());
            match id {
                Some(id) => (broadcast(), id).encode(env),
                None => (broadcast(), undefined()).encode(env),
            }
        }
    };
    Ok((verdict, sent))
}

#[rustler::nif]
fn master_routes(r: ResourceArc<MasterRes>, to: String) -> bool {
    crate::lock(&r.0).routes_via_mirror(&to)
}

#[rustler::nif]
fn master_presence<'a>(
    env: Env<'a>,
    r: ResourceArc<MasterRes>,
    now: u64,
    xml: String,
    nick: String,
) -> Result<Term<'a>, NifError> {
    let (v, sent) = with(&r, |m| m.handle_presence(Timestamp(now), &xml, Some(&nick)))?;
    let verdict = match v? {
        PresenceVerdict::Pass => pass().encode(env),
        PresenceVerdict::Refused => refused().encode(env),
        PresenceVerdict::MirrorJoin { mirror, sync } => (join(), mirror, sync).encode(env),
    };
    Ok((verdict, sent).encode(env))
}

#[rustler::nif]
fn master_snapshot(
    r: ResourceArc<MasterRes>,
    now: u64,
    room: String,
    mirror: String,
    nick: String,
    form: String,
    occupants: Vec<String>,
) -> Result<Vec<String>, NifError> {
    let (v, sent) = with(&r, |m| {
        m.handle_snapshot(Timestamp(now), &room, &mirror, &nick, &form, &occupants)
    })?;
    v?;
    Ok(sent)
}

#[rustler::nif]
fn master_iq<'a>(
    env: Env<'a>,
    r: ResourceArc<MasterRes>,
    now: u64,
    xml: String,
) -> Result<Term<'a>, NifError> {
    let (v, sent) = with(&r, |m| m.handle_iq(Timestamp(now), &xml))?;
    let verdict = match v? {
        IqVerdict::Pass => pass().encode(env),
        IqVerdict::Consumed => consumed().encode(env),
        IqVerdict::History(req) => (history(), ResourceArc::new(HistoryRes(req))).encode(env),
        IqVerdict::Snapshot { room, mirror } => (snapshot(), room, mirror).encode(env),
    };
    Ok((verdict, sent).encode(env))
}

#[rustler::nif]
fn master_history(
    r: ResourceArc<MasterRes>,
    now: u64,
    req: ResourceArc<HistoryRes>,
    messages: Vec<String>,
    subject: Option<String>,
) -> Result<Vec<String>, NifError> {
    let (v, sent) = with(&r, |m| {
        m.handle_history(Timestamp(now), &req.0, &messages, subject.as_deref())
    })?;
    v?;
    Ok(sent)
}

#[rustler::nif]
fn master_begin(r: ResourceArc<MasterRes>, room: String) -> Result<Vec<String>, NifError> {
    Ok(with(&r, |m| m.begin_broadcast(&room))?.1)
}

#[rustler::nif]
fn master_end(r: ResourceArc<MasterRes>, room: String) -> Result<Vec<String>, NifError> {
    Ok(with(&r, |m| m.end_broadcast(&room))?.1)
}

#[rustler::nif]
fn master_outbound<'a>(
    env: Env<'a>,
    r: ResourceArc<MasterRes>,
    now: u64,
    xml: String,
) -> Result<Term<'a>, NifError> {
    let (v, sent) = with(&r, |m| m.handle_outbound(Timestamp(now), &xml))?;
    let verdict = match v? {
        Outbound::Send => send().encode(env),
        Outbound::Drop => drop().encode(env),
        Outbound::Replace(x) => (replace(), x).encode(env),
    };
    Ok((verdict, sent).encode(env))
}

#[rustler::nif]
fn master_left(
    r: ResourceArc<MasterRes>,
    room: String,
    jid: String,
) -> Result<Vec<String>, NifError> {
    Ok(with(&r, |m| m.handle_left(&room, &jid))?.1)
}

/// The engine's pending actions: `{evict, Room, Nick, Jid}`, `{config, Room}`.
fn take_actions<'a>(env: Env<'a>, m: &mut Master) -> Vec<Term<'a>> {
    let mut actions = Vec::new();
    while let Some(a) = m.poll_action() {
        actions.push(match a {
            MasterAction::Evict { room, nick, jid } => (evict(), room, nick, jid).encode(env),
            MasterAction::ConfigChanged { room } => (config(), room).encode(env),
        });
    }
    actions
}

#[rustler::nif]
fn master_link<'a>(
    env: Env<'a>,
    r: ResourceArc<MasterRes>,
    now: u64,
    domain: String,
    up: bool,
) -> Result<Term<'a>, NifError> {
    let mut m = crate::lock(&r.0);
    m.handle_link(Timestamp(now), &domain, up);
    Ok(take_actions(env, &mut m).encode(env))
}

/// The engine's pending actions (see `take_actions`).
#[rustler::nif]
fn master_actions<'a>(env: Env<'a>, r: ResourceArc<MasterRes>) -> Result<Term<'a>, NifError> {
    let mut m = crate::lock(&r.0);
    Ok(take_actions(env, &mut m).encode(env))
}

/// The room's config form after a `{config, Room}` action; `<<>>` when the host has none.
#[rustler::nif]
fn master_config(
    r: ResourceArc<MasterRes>,
    now: u64,
    room: String,
    form: String,
) -> Result<Vec<String>, NifError> {
    let form = (!form.is_empty()).then_some(form);
    let (v, sent) = with(&r, |m| {
        m.handle_config(Timestamp(now), &room, form.as_deref())
    })?;
    v?;
    Ok(sent)
}
