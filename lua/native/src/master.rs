//! The master role as Lua userdata: `native.master{ trusted_mirrors = {...} }`.

use dmuc::master::{
    GroupchatVerdict, HistoryRequest, IqVerdict, Master, MasterAction, MasterConfig, Outbound,
    PresenceVerdict, TrustedMirror,
};
use dmuc::stanza_ids::Adoption;
use dmuc::Timestamp;
use mlua::prelude::*;

use crate::error::ShimError;
use crate::log;

pub struct LuaMaster(Master, log::Logger);

/// A history request handed to Lua and back.
pub struct LuaHistoryRequest(HistoryRequest);

impl LuaUserData for LuaHistoryRequest {
    fn add_fields<F: LuaUserDataFields<Self>>(fields: &mut F) {
        fields.add_field_method_get("room", |_, this| Ok(this.0.room.clone()));
        fields.add_field_method_get("to", |_, this| Ok(this.0.to.clone()));
    }
}

fn strings(option: &'static str, value: Option<LuaValue>) -> Result<Vec<String>, ShimError> {
    let bad = |reason: &str| ShimError::Option {
        option,
        reason: reason.to_string(),
    };
    match value {
        None | Some(LuaValue::Nil) => Ok(Vec::new()),
        Some(LuaValue::String(s)) => Ok(vec![s.to_string_lossy()]),
        Some(LuaValue::Table(t)) => t
            .sequence_values::<LuaValue>()
            .map(|v| match v {
                Ok(LuaValue::String(s)) if !s.to_string_lossy().trim().is_empty() => {
                    Ok(s.to_string_lossy().trim().to_ascii_lowercase())
                }
                _ => Err(bad("expected a list of domain names")),
            })
            .collect(),
        Some(_) => Err(bad("expected a list of domain names")),
    }
}

pub(crate) fn domains(
    option: &'static str,
    value: Option<LuaValue>,
) -> Result<Vec<String>, ShimError> {
    let list = strings(option, value)?;
    for d in &list {
        if jid::DomainPart::new(d).is_err() || d.contains('@') || d.contains('/') {
            return Err(ShimError::Option {
                option,
                reason: format!("'{d}' is not a domain name"),
            });
        }
    }
    Ok(list)
}

pub fn new(lua: &Lua, config_table: LuaTable) -> LuaResult<LuaMaster> {
    let mirrors = domains("dmuc_trusted_mirrors", config_table.get("trusted_mirrors")?)?;
    let mut config = MasterConfig {
        trusted_mirrors: mirrors.into_iter().map(TrustedMirror::new).collect(),
        unbracketed_presence: false,
        limits: crate::mirror::limits(&config_table)?,
        ..MasterConfig::default()
    };
    if let Some(s) = crate::mirror::positive(&config_table, "link_timeout", "dmuc_link_timeout")? {
        config.link_timeout_ms = s * 1000;
    }
    let limit = |key, option| -> LuaResult<Option<u32>> {
        crate::mirror::positive(&config_table, key, option)?
            .map(|n| {
                u32::try_from(n).map_err(|_| {
                    LuaError::from(ShimError::Option {
                        option,
                        reason: "too large".into(),
                    })
                })
            })
            .transpose()
    };
    if let Some(n) = limit("max_rooms_per_mirror", "dmuc_max_rooms_per_mirror")? {
        config.max_rooms_per_mirror = n as usize;
    }
    if let Some(n) = limit("mirror_join_rate", "dmuc_mirror_join_rate")? {
        config.mirror_join_rate = n;
    }
    if let Some(n) = limit("mirror_join_burst", "dmuc_mirror_join_burst")? {
        config.mirror_join_burst = n;
    }
    // The shim can file a message under a given archive key (it wraps the archive's append);
    // Prosody's keys are opaque, so any valid proposal will do.
    if config_table
        .get::<Option<bool>>("adopt_stanza_ids")?
        .unwrap_or(false)
    {
        config.stanza_ids = Adoption::Any;
    }
    Ok(LuaMaster(
        Master::new(config),
        log::Logger::from_config(lua, &config_table)?,
    ))
}

fn now(t: f64) -> Timestamp {
    Timestamp::from_secs_f64(t)
}

impl LuaUserData for LuaMaster {
    fn add_methods<M: LuaUserDataMethods<Self>>(methods: &mut M) {
        methods.add_method("routes_via_mirror", |_, this, to: String| {
            Ok(this.0.routes_via_mirror(&to))
        });
        methods.add_method("mirrors", |_, this, room: String| Ok(this.0.mirrors(&room)));
        methods.add_method_mut(
            "handle_presence",
            |lua, this, (t, xml, nick): (f64, String, Option<String>)| {
                let r = this.0.handle_presence(now(t), &xml, nick.as_deref());
                log::flush(lua, &this.1);
                Ok(match r.map_err(ShimError::from)? {
                    PresenceVerdict::Pass => ("pass", None, false),
                    PresenceVerdict::Refused => ("refused", None, false),
                    PresenceVerdict::MirrorJoin { mirror, sync } => ("join", Some(mirror), sync),
                })
            },
        );
        methods.add_method_mut(
            "handle_snapshot",
            |lua,
             this,
             (t, room, mirror, nick, form, occupants): (
                f64,
                String,
                String,
                String,
                String,
                Vec<String>,
            )| {
                let r = this
                    .0
                    .handle_snapshot(now(t), &room, &mirror, &nick, &form, &occupants);
                log::flush(lua, &this.1);
                r.map_err(ShimError::from)?;
                Ok(())
            },
        );
        methods.add_method_mut("handle_iq", |lua, this, (t, xml): (f64, String)| {
            let r = this.0.handle_iq(now(t), &xml);
            log::flush(lua, &this.1);
            Ok(match r.map_err(ShimError::from)? {
                IqVerdict::Pass => ("pass", None, None),
                IqVerdict::Consumed => ("consumed", None, None),
                IqVerdict::History(req) => ("history", Some(LuaHistoryRequest(req)), None),
                IqVerdict::Snapshot { room, mirror } => ("snapshot", None, Some((room, mirror))),
            })
            .map(|(v, req, snap)| {
                let (room, mirror) = snap.unzip();
                (v, req, room, mirror)
            })
        });
        methods.add_method_mut(
            "handle_history",
            |lua,
             this,
             (t, req, messages, subject): (
                f64,
                LuaUserDataRef<LuaHistoryRequest>,
                Vec<String>,
                Option<String>,
            )| {
                let r = this
                    .0
                    .handle_history(now(t), &req.0, &messages, subject.as_deref());
                log::flush(lua, &this.1);
                r.map_err(ShimError::from)?;
                Ok(())
            },
        );
        methods.add_method_mut(
            "handle_config",
            |lua, this, (t, room, form): (f64, String, Option<String>)| {
                let r = this.0.handle_config(now(t), &room, form.as_deref());
                log::flush(lua, &this.1);
                r.map_err(ShimError::from)?;
                Ok(())
            },
        );
        methods.add_method_mut("begin_broadcast", |_, this, room: String| {
            this.0.begin_broadcast(&room);
            Ok(())
        });
        methods.add_method_mut("end_broadcast", |lua, this, room: String| {
            this.0.end_broadcast(&room);
            log::flush(lua, &this.1);
            Ok(())
        });
        methods.add_method_mut("handle_outbound", |lua, this, (t, xml): (f64, String)| {
            let r = this.0.handle_outbound(now(t), &xml);
            log::flush(lua, &this.1);
            Ok(match r.map_err(ShimError::from)? {
                Outbound::Send => ("send", None),
                Outbound::Drop => ("drop", None),
                Outbound::Replace(x) => ("replace", Some(x)),
            })
        });
        methods.add_method_mut("handle_left", |lua, this, (room, jid): (String, String)| {
            this.0.handle_left(&room, &jid);
            log::flush(lua, &this.1);
            Ok(())
        });
        methods.add_method_mut(
            "handle_link",
            |lua, this, (t, domain, up): (f64, String, bool)| {
                this.0.handle_link(now(t), &domain, up);
                log::flush(lua, &this.1);
                Ok(())
            },
        );
        methods.add_method_mut(
            "handle_s2s_closed",
            |lua, this, (t, service, domain): (f64, String, String)| {
                this.0.handle_s2s_closed(now(t), &service, &domain);
                log::flush(lua, &this.1);
                Ok(())
            },
        );
        methods.add_method_mut("handle_ping", |lua, this, (t, xml): (f64, String)| {
            let r = this.0.handle_ping(now(t), &xml);
            log::flush(lua, &this.1);
            Ok(r.map_err(ShimError::from)?)
        });
        // `duplicate, stanza_id`: drop a duplicate; else archive the message under stanza_id
        // (nil: the archive picks one).
        methods.add_method_mut("handle_groupchat", |lua, this, (t, xml): (f64, String)| {
            let r = this.0.handle_groupchat(now(t), &xml);
            log::flush(lua, &this.1);
            Ok(match r.map_err(ShimError::from)? {
                GroupchatVerdict::Duplicate => (true, None),
                GroupchatVerdict::Broadcast { stanza_id } => (false, stanza_id),
            })
        });
        methods.add_method_mut("handle_timeout", |lua, this, t: f64| {
            this.0.handle_timeout(now(t));
            log::flush(lua, &this.1);
            Ok(())
        });
        methods.add_method("poll_timeout", |_, this, ()| {
            Ok(this.0.poll_timeout().map(|t| t.0 as f64 / 1000.0))
        });
        methods.add_method("status", |lua, this, ()| {
            let list = lua.create_table()?;
            for s in this.0.status() {
                let t = lua.create_table()?;
                t.set("mirror", s.mirror)?;
                t.set("up", s.up)?;
                t.set("rooms", s.rooms)?;
                t.set("occupants", s.occupants)?;
                t.set("last_seen", s.last_seen.map(|t| t.0 as f64 / 1000.0))?;
                t.set("outages", s.outages)?;
                list.push(t)?;
            }
            Ok(list)
        });
        methods.add_method_mut("poll_transmit", |_, this, ()| Ok(this.0.poll_transmit()));
        // As the mirror's (`text, recipients`): the master makes no fan-outs, so never a list.
        methods.add_method_mut("poll_transmit_batch", |_, this, ()| {
            Ok((this.0.poll_transmit(), None::<Vec<String>>))
        });
        methods.add_method_mut("poll_action", |lua, this, ()| {
            Ok(match this.0.poll_action() {
                None => None,
                Some(MasterAction::Evict { room, nick, jid }) => {
                    let t = lua.create_table()?;
                    t.set("kind", "evict")?;
                    t.set("room", room)?;
                    t.set("nick", nick)?;
                    t.set("jid", jid)?;
                    Some(t)
                }
                Some(MasterAction::ConfigChanged { room }) => {
                    let t = lua.create_table()?;
                    t.set("kind", "config")?;
                    t.set("room", room)?;
                    Some(t)
                }
            })
        });
    }
}
