//! `dmuc_prosody`: the Lua 5.4 native module that `mod_dmuc.lua` loads. It only exports; the
//! wrappers live in [`master`] and [`mirror`], error mapping in [`error`], logging in [`log`].

mod error;
mod log;
mod master;
mod mirror;
mod stanza;

use mlua::prelude::*;

/// `luaopen_dmuc_prosody`: returns `{ master = fn(config), mirror = fn(config), refusals = fn(interval),
/// set_stanza_mt = fn(mt), parse_stanza = fn(text), stanza_text = fn(stanza, max_depth),
/// limits = { depth, size } }` (the engine's default limits). Each engine's config has a `log`
/// function: its lines go there.
#[mlua::lua_module]
fn dmuc_prosody(lua: &Lua) -> LuaResult<LuaTable> {
    log::install();
    let exports = lua.create_table()?;
    exports.set("master", lua.create_function(master::new)?)?;
    exports.set("mirror", lua.create_function(mirror::new)?)?;
    exports.set("refusals", lua.create_function(log::refusals)?)?;
    exports.set("set_stanza_mt", lua.create_function(stanza::set_stanza_mt)?)?;
    exports.set("parse_stanza", lua.create_function(stanza::parse_stanza)?)?;
    exports.set("stanza_text", lua.create_function(stanza::stanza_text)?)?;
    exports.set("version", env!("CARGO_PKG_VERSION"))?;
    // The shim checks depth and size itself before it serializes a stanza (util.stanza's
    // tostring recurses per level), with the same defaults as the engine.
    let limits = lua.create_table()?;
    limits.set("depth", dmuc::bounds::DEFAULT_MAX_DEPTH)?;
    limits.set("size", dmuc::bounds::DEFAULT_MAX_SIZE)?;
    exports.set("limits", limits)?;
    Ok(exports)
}
