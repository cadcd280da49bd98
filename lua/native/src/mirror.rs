//! The mirror role as Lua userdata: `native.mirror{ service = ..., masters = {...}, ... }`.

use dmuc::bounds::Limits;
use dmuc::mirror::{Mirror, MirrorConfig, StoreOp, Transmit, Verdict};
use dmuc::Timestamp;
use mlua::prelude::*;

use crate::error::ShimError;
use crate::log;
use crate::master::domains;

pub struct LuaMirror(Mirror, log::Logger);

pub(crate) fn positive(
    config: &LuaTable,
    key: &'static str,
    option: &'static str,
) -> Result<Option<u64>, LuaError> {
    match config.get::<LuaValue>(key)? {
        LuaValue::Nil => Ok(None),
        LuaValue::Integer(i) if i > 0 => Ok(Some(i as u64)),
        LuaValue::Number(n) if n > 0.0 && n.fract() == 0.0 => Ok(Some(n as u64)),
        _ => Err(ShimError::Option {
            option,
            reason: "expected a positive whole number".into(),
        }
        .into()),
    }
}

/// `dmuc_max_stanza_depth` / `dmuc_max_stanza_size` (the shim passes them as `max_stanza_depth`
/// and `max_stanza_size`); each within the engine's ceiling.
pub(crate) fn limits(config: &LuaTable) -> Result<Limits, LuaError> {
    let d = Limits::default();
    let depth = positive(config, "max_stanza_depth", "dmuc_max_stanza_depth")?
        .map_or(d.max_depth, |n| n as usize);
    let size = positive(config, "max_stanza_size", "dmuc_max_stanza_size")?
        .map_or(d.max_size, |n| n as usize);
    Limits::new(depth, size).map_err(|e| {
        ShimError::Option {
            option: "dmuc_max_stanza_depth/dmuc_max_stanza_size",
            reason: e.to_string(),
        }
        .into()
    })
}

pub fn new(lua: &Lua, config: LuaTable) -> LuaResult<LuaMirror> {
    let service: String = config.get("service")?;
    let masters = domains("dmuc_masters", config.get("masters")?)?;
    if masters.is_empty() {
        return Err(ShimError::Option {
            option: "dmuc_masters",
            reason: "list at least one MUC service to mirror".into(),
        }
        .into());
    }
    let mut c = MirrorConfig::new(service, masters);
    if let Some(n) = positive(&config, "queue_limit", "dmuc_queue_limit")? {
        c.queue_limit = n as usize;
    }
    if let Some(n) = positive(&config, "join_timeout", "dmuc_join_timeout")? {
        c.join_timeout_ms = n * 1000;
    }
    if let Some(n) = positive(&config, "history_size", "dmuc_history_size")? {
        c.history_size = n as usize;
    }
    if let Some(n) = positive(&config, "ping_interval", "dmuc_ping_interval")? {
        c.ping_interval_ms = n * 1000;
    }
    if let Some(n) = positive(&config, "ping_timeout", "dmuc_ping_timeout")? {
        c.ping_timeout_ms = n * 1000;
    }
    c.limits = limits(&config)?;
    if let Some(n) = positive(&config, "catch_up_margin", "dmuc_catch_up_margin")? {
        c.catch_up_margin_ms = n * 1000;
    }
    if let Some(n) = positive(&config, "max_local_occupants", "dmuc_max_local_occupants")? {
        c.max_local_occupants = n as usize;
    }
    if let Some(n) = positive(&config, "max_rooms", "dmuc_max_rooms")? {
        c.max_rooms = n as usize;
    }
    // Seconds, 0 (store at once) or more; fractions allowed.
    match config.get::<LuaValue>("store_after")? {
        LuaValue::Nil => {}
        LuaValue::Integer(i) if i >= 0 => c.store_after_ms = (i as u64).saturating_mul(1000),
        LuaValue::Number(n) if n >= 0.0 && n.is_finite() => {
            c.store_after_ms = (n * 1000.0).round() as u64
        }
        _ => {
            return Err(ShimError::Option {
                option: "dmuc_store_after",
                reason: "expected a number of seconds, 0 or more".into(),
            }
            .into())
        }
    }
    Ok(LuaMirror(
        Mirror::new(c),
        log::Logger::from_config(lua, &config)?,
    ))
}

fn now(t: f64) -> Timestamp {
    Timestamp::from_secs_f64(t)
}

fn verdict(v: Verdict) -> bool {
    v == Verdict::Consumed
}

impl LuaUserData for LuaMirror {
    fn add_methods<M: LuaUserDataMethods<Self>>(methods: &mut M) {
        methods.add_method("handles", |_, this, jid: String| Ok(this.0.handles(&jid)));
        methods.add_method_mut("handle_local", |lua, this, (t, xml): (f64, String)| {
            let r = this.0.handle_local(now(t), &xml);
            log::flush(lua, &this.1);
            Ok(verdict(r.map_err(ShimError::from)?))
        });
        methods.add_method_mut(
            "handle_local_unavailable",
            |lua, this, (t, xml): (f64, String)| {
                let r = this.0.handle_local_unavailable(now(t), &xml);
                log::flush(lua, &this.1);
                Ok(r.map_err(ShimError::from)?)
            },
        );
        methods.add_method_mut("handle_remote", |lua, this, (t, xml): (f64, String)| {
            let r = this.0.handle_remote(now(t), &xml);
            log::flush(lua, &this.1);
            Ok(verdict(r.map_err(ShimError::from)?))
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
            |lua, this, (t, domain): (f64, String)| {
                this.0.handle_s2s_closed(now(t), &domain);
                log::flush(lua, &this.1);
                Ok(())
            },
        );
        methods.add_method_mut(
            "handle_s2s_in_closed",
            |lua, this, (t, domain): (f64, String)| {
                this.0.handle_s2s_in_closed(now(t), &domain);
                log::flush(lua, &this.1);
                Ok(())
            },
        );
        methods.add_method_mut("handle_timeout", |lua, this, t: f64| {
            this.0.handle_timeout(now(t));
            log::flush(lua, &this.1);
            Ok(())
        });
        methods.add_method_mut("poll_transmit", |_, this, ()| Ok(this.0.poll_transmit()));
        // `text` (one addressed stanza), or `text, recipients` (a fan-out: the stanza without
        // `to`, one copy for each recipient, in order), or nothing.
        methods.add_method_mut("poll_transmit_batch", |_, this, ()| {
            Ok(match this.0.poll_transmit_batch() {
                Some(Transmit::Stanza(text)) => (Some(text), None),
                Some(Transmit::FanOut { stanza, to }) => (Some(stanza), Some(to)),
                None => (None, None),
            })
        });
        // As poll_transmit_batch, as stanza objects (`set_stanza_mt` first): `stanza`, or
        // `stanza, recipients` (a fan-out, the stanza without `to`), or nothing. The engine hands
        // its elements over: no text to write here and parse again in the host.
        methods.add_method_mut("poll_transmit_stanza", |lua, this, ()| {
            let Some(next) = this.0.poll_transmit_element() else {
                return Ok((None, None));
            };
            let (el, to) = next.map_err(ShimError::from)?;
            Ok((Some(crate::stanza::from_element(lua, &el)?), to))
        });
        methods.add_method_mut(
            "import_queue",
            |lua, this, (t, items): (f64, Vec<String>)| {
                let n = this.0.import_queue(now(t), &items);
                log::flush(lua, &this.1);
                Ok(n)
            },
        );
        // Shutdown: what is held back from the store (write-behind) comes from poll_store now.
        methods.add_method_mut("flush_store", |lua, this, ()| {
            this.0.flush_store();
            log::flush(lua, &this.1);
            Ok(())
        });
        // `"put", key, item` or `"delete", key`, or nothing: one change to the stored queue.
        methods.add_method_mut("poll_store", |_, this, ()| {
            Ok(match this.0.poll_store() {
                Some(StoreOp::Put { key, item }) => (Some("put"), Some(key), Some(item)),
                Some(StoreOp::Delete { key }) => (Some("delete"), Some(key), None),
                None => (None, None, None),
            })
        });
        methods.add_method("status", |lua, this, ()| {
            let list = lua.create_table()?;
            for s in this.0.status() {
                let t = lua.create_table()?;
                t.set("master", s.master)?;
                t.set("up", s.up)?;
                t.set("rooms", s.rooms)?;
                t.set("queued", s.queued)?;
                t.set("in_flight", s.in_flight)?;
                t.set("outages", s.outages)?;
                t.set("last_pong", s.last_pong.map(|t| t.0 as f64 / 1000.0))?;
                t.set("last_resync", s.last_resync.map(|t| t.0 as f64 / 1000.0))?;
                t.set("down_since", s.down_since.map(|t| t.0 as f64 / 1000.0))?;
                list.push(t)?;
            }
            Ok(list)
        });
        methods.add_method("poll_timeout", |_, this, ()| {
            Ok(this.0.poll_timeout().map(|t| t.0 as f64 / 1000.0))
        });
        methods.add_method("stats", |lua, this, ()| {
            let t = lua.create_table()?;
            for room in this.0.rooms() {
                let r = lua.create_table()?;
                r.set("local_occupants", this.0.local_occupants(&room).len())?;
                r.set("occupants", this.0.occupants(&room).len())?;
                r.set("queue_depth", this.0.queue_depth(&room))?;
                t.set(room, r)?;
            }
            Ok(t)
        });
    }
}
