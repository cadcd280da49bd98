//! Engine output as Prosody stanza objects (util.stanza's tables), built here from the parsed
//! text instead of by `util.xml.parse` in Lua: that parser (expat calling back into Lua for each
//! element, a parser object per call) was a quarter of a Prosody mirror's CPU under a flood.
//!
//! The shape is util.stanza's: `{ name = ..., attr = { ... }, tags = { child elements },
//! [1..n] = children (elements and text) }` with its metatable. As `util.xml` gives them, plus
//! what the shim did after it: the stanza itself carries no `xmlns` (Prosody routes stanzas in
//! the stream's default namespace), nor do the elements in its namespace whose parents are in it
//! too (a `jabber:client` element inside a foreign wrapper keeps it). An attribute in a namespace
//! is keyed `namespace \1 name`, as util.xml does, except `xml:lang`.

use dmuc::stanza;
use minidom::{Element, Node};
use mlua::ffi;
use mlua::prelude::*;

const STANZA_MT_KEY: &str = "dmuc.stanza_mt";
const XML_NS: &str = "http://www.w3.org/XML/1998/namespace";

/// `set_stanza_mt(require "util.stanza".stanza_mt)`: the metatable of the stanzas made here.
pub fn set_stanza_mt(lua: &Lua, mt: LuaTable) -> LuaResult<()> {
    lua.set_named_registry_value(STANZA_MT_KEY, mt)
}

/// `parse_stanza(text)`: the engine's XML text as a stanza object, or `nil, why` if it does not
/// parse. The metatable must have been given (`set_stanza_mt`).
pub fn parse_stanza(lua: &Lua, text: LuaString) -> LuaResult<(Option<LuaTable>, Option<String>)> {
    let text = text.to_str()?;
    let el = match stanza::parse(&text) {
        Ok(el) => el,
        Err(e) => return Ok((None, Some(e.to_string()))),
    };
    Ok((Some(from_element(lua, &el)?), None))
}

/// An element of the engine's as a stanza object.
///
/// Built with the raw C API (one protected call for the whole tree): through mlua's safe table
/// API each key and value was a call of its own, and building a fan-out's stanza and the
/// master's copy was a sixth of a Prosody mirror's CPU under a flood. The walk holds only
/// borrows, so a memory error raised from inside it (a longjmp) leaks nothing but Lua's own.
pub fn from_element(lua: &Lua, el: &Element) -> LuaResult<LuaTable> {
    let ns = el.ns();
    // SAFETY: the closure runs in a protected call with the stack guarded by mlua; it only
    // pushes values and leaves exactly one (the table) on top of what it found.
    unsafe {
        lua.exec_raw::<LuaTable>((), |state| {
            ffi::luaL_checkstack(state, 4, std::ptr::null());
            push_str(state, STANZA_MT_KEY);
            ffi::lua_rawget(state, ffi::LUA_REGISTRYINDEX);
            let mt = ffi::lua_gettop(state);
            push_element(state, mt, el, &ns, true);
            // [mt, t] -> [t]
            ffi::lua_rotate(state, mt, 1);
            ffi::lua_settop(state, mt);
        })
    }
}

unsafe fn push_str(state: *mut ffi::lua_State, s: &str) {
    ffi::lua_pushlstring(state, s.as_ptr() as *const std::os::raw::c_char, s.len());
}

/// `t[key] = value` for the table at `t` (an absolute index), both strings.
unsafe fn set_str(state: *mut ffi::lua_State, t: i32, key: &str, value: &str) {
    push_str(state, key);
    push_str(state, value);
    ffi::lua_rawset(state, t);
}

/// Push `el` as a stanza object with metatable `mt` (an absolute index). `top_ns` and `root` as
/// for the text form: an element in the stanza's namespace under a parent in it carries no
/// `xmlns`, nor does the stanza itself. Recursion is bounded by the engine's own depth limit
/// (every element it holds was parsed within [`dmuc::bounds::Limits::CEILING`]).
unsafe fn push_element(
    state: *mut ffi::lua_State,
    mt: i32,
    el: &Element,
    top_ns: &str,
    root: bool,
) {
    // t, attr, tags, a child, a key and a value, a concatenation's three parts.
    ffi::luaL_checkstack(state, 8, std::ptr::null());
    let nodes = el.nodes().count();
    ffi::lua_createtable(state, nodes as i32, 4);
    let t = ffi::lua_gettop(state);
    set_str(state, t, "name", el.name());
    let ns = el.ns();
    ffi::lua_createtable(state, 0, 4);
    let attr = ffi::lua_gettop(state);
    if !root && ns != top_ns {
        set_str(state, attr, "xmlns", &ns);
    }
    for ((ans, name), value) in el.attrs().iter() {
        if ans.is_none() {
            set_str(state, attr, name.as_str(), value.as_str());
        } else if ans.as_str() == XML_NS {
            push_str(state, "xml:");
            push_str(state, name.as_str());
            ffi::lua_concat(state, 2);
            push_str(state, value.as_str());
            ffi::lua_rawset(state, attr);
        } else {
            push_str(state, ans.as_str());
            push_str(state, "\u{1}");
            push_str(state, name.as_str());
            ffi::lua_concat(state, 3);
            push_str(state, value.as_str());
            ffi::lua_rawset(state, attr);
        }
    }
    push_str(state, "attr");
    ffi::lua_pushvalue(state, attr);
    ffi::lua_rawset(state, t);
    ffi::lua_createtable(state, el.children().count() as i32, 0);
    let tags = ffi::lua_gettop(state);
    let (mut n, mut ntags) = (0, 0);
    // In the stanza's namespace under a parent in it: no xmlns, as the stream's default. Under
    // a foreign parent every element keeps its xmlns (a top_ns no element has).
    let inherits = ns == top_ns;
    for node in el.nodes() {
        n += 1;
        match node {
            Node::Element(child) => {
                if inherits {
                    push_element(state, mt, child, top_ns, false);
                } else {
                    push_element(state, mt, child, "\u{0}", false);
                }
                ntags += 1;
                ffi::lua_pushvalue(state, -1);
                ffi::lua_rawseti(state, tags, ntags);
                ffi::lua_rawseti(state, t, n);
            }
            Node::Text(s) => {
                push_str(state, s.as_str());
                ffi::lua_rawseti(state, t, n);
            }
        }
    }
    push_str(state, "tags");
    ffi::lua_pushvalue(state, tags);
    ffi::lua_rawset(state, t);
    ffi::lua_pushvalue(state, mt);
    ffi::lua_setmetatable(state, t);
    // Leave only t.
    ffi::lua_settop(state, t);
}

/// `stanza_text(stanza, max_depth)`: a stanza object as XML text, as util.stanza's `tostring`
/// writes it (attribute order aside), or `nil` if it nests deeper than `max_depth` levels (the
/// walk stops one level past it). In Rust, so that the text handed to the engine costs no Lua
/// strings but itself, and the depth check no walk of its own.
pub fn stanza_text(
    lua: &Lua,
    (stanza, max_depth): (LuaTable, usize),
) -> LuaResult<Option<LuaString>> {
    let mut out = Vec::with_capacity(512);
    match write(&stanza, &mut out, None, 1, max_depth)? {
        Walk::Done => Ok(Some(lua.create_string(&out)?)),
        Walk::TooDeep => Ok(None),
    }
}

enum Walk {
    Done,
    TooDeep,
}

fn escape_into(out: &mut Vec<u8>, s: &[u8]) {
    for &b in s {
        match b {
            b'\'' => out.extend_from_slice(b"&apos;"),
            b'"' => out.extend_from_slice(b"&quot;"),
            b'<' => out.extend_from_slice(b"&lt;"),
            b'>' => out.extend_from_slice(b"&gt;"),
            b'&' => out.extend_from_slice(b"&amp;"),
            _ => out.push(b),
        }
    }
}

/// A Lua value as util.stanza would concatenate it: strings and numbers.
fn bytes_of(v: &LuaValue) -> LuaResult<Vec<u8>> {
    match v {
        LuaValue::String(s) => Ok(s.as_bytes().to_vec()),
        LuaValue::Integer(i) => Ok(i.to_string().into_bytes()),
        LuaValue::Number(n) => Ok(n.to_string().into_bytes()),
        other => Err(LuaError::runtime(format!(
            "stanza_text: a {} where a string belongs",
            other.type_name()
        ))),
    }
}

fn write(
    t: &LuaTable,
    out: &mut Vec<u8>,
    parent_ns: Option<&[u8]>,
    depth: usize,
    max_depth: usize,
) -> LuaResult<Walk> {
    if depth > max_depth {
        return Ok(Walk::TooDeep);
    }
    let name: LuaString = t.raw_get("name")?;
    let name = name.as_bytes().to_vec();
    out.push(b'<');
    out.extend_from_slice(&name);
    let attr: Option<LuaTable> = t.raw_get("attr")?;
    let mut own_ns: Option<Vec<u8>> = None;
    let mut nsid = 0;
    if let Some(attr) = attr {
        for pair in attr.pairs::<LuaValue, LuaValue>() {
            let (k, v) = pair?;
            let k = bytes_of(&k)?;
            let v = bytes_of(&v)?;
            if let Some(sep) = k.iter().position(|&b| b == 1) {
                nsid += 1;
                out.extend_from_slice(format!(" xmlns:ns{nsid}='").as_bytes());
                escape_into(out, &k[..sep]);
                out.extend_from_slice(format!("' ns{nsid}:").as_bytes());
                out.extend_from_slice(&k[sep + 1..]);
                out.extend_from_slice(b"='");
                escape_into(out, &v);
                out.push(b'\'');
            } else {
                if k == b"xmlns" {
                    let same = parent_ns == Some(v.as_slice());
                    own_ns = Some(v.clone());
                    if same {
                        continue;
                    }
                }
                out.push(b' ');
                out.extend_from_slice(&k);
                out.extend_from_slice(b"='");
                escape_into(out, &v);
                out.push(b'\'');
            }
        }
    }
    let len = t.raw_len();
    if len == 0 {
        out.extend_from_slice(b"/>");
        return Ok(Walk::Done);
    }
    out.push(b'>');
    for i in 1..=len {
        match t.raw_get::<LuaValue>(i)? {
            LuaValue::Table(child) => {
                if let Walk::TooDeep = write(&child, out, own_ns.as_deref(), depth + 1, max_depth)?
                {
                    return Ok(Walk::TooDeep);
                }
            }
            other => escape_into(out, &bytes_of(&other)?),
        }
    }
    out.extend_from_slice(b"</");
    out.extend_from_slice(&name);
    out.push(b'>');
    Ok(Walk::Done)
}
