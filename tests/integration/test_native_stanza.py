"""The Prosody native module's stanza objects, checked against Prosody's own parser.

`native.parse_stanza` (and the mirror's `poll_transmit_stanza`, which shares its builder) makes
util.stanza tables from the engine's elements with the raw Lua C API. Prosody's util.xml is the
oracle: for each literal stanza, the native object must be the tree util.xml parses from the same
text, less the `xmlns` the shim leaves out (the stanza's own, and that of an element in the
stanza's namespace under a parent in it: lua/native/src/stanza.rs). Each object must carry
util.stanza's metatable and serialize as util.xml's does.

Runs the built module under lua5.4, with Prosody's libraries, no server.
"""

from __future__ import annotations

import os
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DIST = os.path.join(ROOT, "dist", "prosody")

SCRIPT = r"""
package.path = "/usr/lib/prosody/?.lua;" .. package.path
package.cpath = "/usr/lib/prosody/?.so;" .. arg[1] .. "/?.so;" .. package.cpath
local st = require "util.stanza"
local xml = require "util.xml"
local native = require "dmuc_prosody"
native.set_stanza_mt(st.stanza_mt)

-- util.xml's tree less the xmlns the shim leaves out: the stanza's, and that of an element in
-- the stanza's namespace whose ancestors all are (`inherits`).
local function strip(t, inherits)
  local ns = t.attr.xmlns
  local keeps_default = inherits and ns == TOP
  if keeps_default then t.attr.xmlns = nil end
  for _, c in ipairs(t.tags) do strip(c, keeps_default) end
  return t
end

local function dump(t, out)
  if type(t) == "string" then out[#out + 1] = "T(" .. t .. ")"; return out end
  assert(getmetatable(t) == st.stanza_mt, "no stanza metatable on <" .. tostring(t.name) .. ">")
  local keys = {}
  for k in pairs(t.attr) do keys[#keys + 1] = k end
  table.sort(keys)
  local a = {}
  for _, k in ipairs(keys) do a[#a + 1] = k:gsub("\1", "|") .. "=" .. t.attr[k] end
  out[#out + 1] = "<" .. t.name .. " " .. table.concat(a, " ") .. ">"
  -- tags: the element children, in order, the same tables as in the node list.
  local i = 0
  for n = 1, #t do
    local c = t[n]
    if type(c) == "table" then
      i = i + 1
      assert(t.tags[i] == c, "tags[" .. i .. "] of <" .. t.name .. "> is not its element child")
    end
  end
  assert(#t.tags == i, "<" .. t.name .. "> has " .. #t.tags .. " tags for " .. i .. " element children")
  for n = 1, #t do dump(t[n], out) end
  out[#out + 1] = "</" .. t.name .. ">"
  return out
end

local n = 0
for line in io.lines(arg[2]) do
  if line ~= "" then
    local got, err = native.parse_stanza(line)
    assert(got, "native.parse_stanza: " .. tostring(err) .. " for " .. line)
    local oracle = xml.parse(line)
    TOP = oracle.attr.xmlns
    strip(oracle, true)
    local a, b = table.concat(dump(got, {}), ""), table.concat(dump(oracle, {}), "")
    if a ~= b then error("native:\n" .. a .. "\nutil.xml:\n" .. b) end
    -- Serialized, the two agree too (attribute order is a table's).
    local again = xml.parse(tostring(got))
    TOP = again.attr.xmlns or TOP
    assert(table.concat(dump(strip(again, true), {}), "") == b, "tostring differs for " .. line)
    n = n + 1
  end
end
print("ok " .. n)
"""

DEEP = "".join(f"<e{i}>" for i in range(60)) + "x" + "".join(f"</e{i}>" for i in reversed(range(60)))
WIDE_ATTRS = " ".join(f"a{i}='{i}'" for i in range(40))

STANZAS = [
    "<message xmlns='jabber:client' to='a@b' type='groupchat'><body>hi</body></message>",
    "<message xmlns='jabber:client' to='a@b' xml:lang='en'><body xml:lang='de'>Gr\u00fc\u00dfe &amp; &lt;tags&gt; "
    "&apos;q&apos; &quot;dq&quot;</body></message>",
    "<presence xmlns='jabber:client' from='room@muc/nick'><x xmlns='http://jabber.org/protocol/muc#user'>"
    "<item affiliation='member' role='participant' jid='u@h/r'/><status code='110'/></x>"
    "<occupant-id xmlns='urn:xmpp:occupant-id:0' id='abc='/></presence>",
    # A jabber:client element under a foreign parent keeps its xmlns; its children too.
    "<message xmlns='jabber:client'><forwarded xmlns='urn:xmpp:forward:0'><message xmlns='jabber:client' "
    "from='x@y'><body>inner</body></message></forwarded></message>",
    # Namespaced attributes, and mixed text and elements.
    "<iq xmlns='jabber:client' type='set' id='1'><q xmlns='urn:q' xmlns:p='urn:p' p:at='v' plain='w'>"
    "one<a/>two<b>three</b>four</q></iq>",
    f"<message xmlns='jabber:client'><wrap xmlns='urn:deep'>{DEEP}</wrap></message>",
    f"<message xmlns='jabber:client' {WIDE_ATTRS}/>",
    "<message xmlns='jabber:client'>" + "".join(f"<c{i} xmlns='urn:c{i % 3}'>{i}</c{i}>" for i in range(200))
    + "</message>",
]


def test_native_stanza_objects_are_util_xml_trees(tmp_path):
    so = os.path.join(DIST, "dmuc_prosody.so")
    assert os.path.exists(so), "run `make dist` first"
    script = tmp_path / "check.lua"
    script.write_text(SCRIPT)
    lines = tmp_path / "stanzas.txt"
    lines.write_text("\n".join(STANZAS) + "\n", encoding="utf-8")
    r = subprocess.run(["lua5.4", str(script), DIST, str(lines)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.strip() == f"ok {len(STANZAS)}"
