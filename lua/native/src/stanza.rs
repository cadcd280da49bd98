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
pub fn from_element(lua: &Lua, el: &Element) -> LuaResult<LuaTable> {
    let mt: LuaTable = lua.named_registry_value(STANZA_MT_KEY)?;
    let ns = el.ns();
    build(lua, &mt, el, &ns, true)
}

/// One element; `default` when its parent (or it, for the stanza) carries no `xmlns` because it
/// is in the stanza's namespace `top_ns`.
fn build(lua: &Lua, mt: &LuaTable, el: &Element, top_ns: &str, root: bool) -> LuaResult<LuaTable> {
    let t = lua.create_table()?;
    t.raw_set("name", el.name())?;
    let attr = lua.create_table()?;
    let ns = el.ns();
    if !root && ns != top_ns {
        attr.raw_set("xmlns", ns.as_str())?;
    }
    for ((ans, name), value) in el.attrs().iter() {
        if ans.is_none() {
            attr.raw_set(name.as_str(), value.as_str())?;
        } else if ans.as_str() == XML_NS {
            attr.raw_set(format!("xml:{}", name.as_str()), value.as_str())?;
        } else {
            attr.raw_set(
                format!("{}\u{1}{}", ans.as_str(), name.as_str()),
                value.as_str(),
            )?;
        }
    }
    t.raw_set("attr", attr)?;
    let tags = lua.create_table()?;
    let (mut n, mut ntags) = (0, 0);
    for node in el.nodes() {
        match node {
            Node::Element(child) => {
                // In the stanza's namespace under a parent in it: no xmlns, as the stream's
                // default. Under a foreign parent it is explicit, whatever it is.
                let inherits = ns == top_ns;
                let c = if inherits {
                    build(lua, mt, child, top_ns, false)?
                } else {
                    build_foreign(lua, mt, child)?
                };
                n += 1;
                t.raw_set(n, &c)?;
                ntags += 1;
                tags.raw_set(ntags, c)?;
            }
            Node::Text(s) => {
                n += 1;
                t.raw_set(n, s.as_str())?;
            }
        }
    }
    t.raw_set("tags", tags)?;
    t.set_metatable(Some(mt.clone()))?;
    Ok(t)
}

/// An element under a parent outside the stanza's namespace: every element keeps its `xmlns`,
/// as util.xml gives it (the serializer leaves out one equal to its parent's).
fn build_foreign(lua: &Lua, mt: &LuaTable, el: &Element) -> LuaResult<LuaTable> {
    // A top_ns no element has: every xmlns is written, and children stay "foreign".
    build(lua, mt, el, "\u{0}", false)
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
