"""A small runner for scansion scripts (.scs), Prosody's XMPP integration test format.

The scansion tool itself (Lua, verse) is not installable here, so this runner re-implements
what Prosody's MUC scripts use of it, on raw asyncio XML streams (no client library that would
add, answer or reorder anything behind the script's back):

Script format (https://matthewwild.co.uk/projects/scansion/usage/script-basics/):

    # Title                        comment lines (# or //) anywhere
    [Client] Romeo                 a client: properties are tab-indented "key: value" lines
        jid: user@localhost        (jid, password; connect_host / connect_port are accepted)
        password: password
    -----                          end of the declarations
    Romeo connects                 TCP connect, SASL PLAIN, resource binding
    Romeo sends:                   the tab-indented XML below is sent
        <presence .../>
    Romeo receives:                the next stanza this client receives must match
        <presence .../>
    Romeo receives: nothing        nothing may arrive for a short while
    Romeo disconnects              </stream:stream>

Variables: ``${Romeo's full JID}`` (the bound full JID) and ``${Romeo's JID}`` (bare).

Sources: scansion's own source (Mercurial, code.matthewwild.co.uk/scansion) could not be read
from here; the rules below are its documentation's (docs/character-classes/client.md, "Matching
rules") plus what Prosody's scripts need to pass on stock Prosody 0.12.3. Where the
documentation says nothing (text content; whether scansion:strict reaches the children), the
choice made is stated, on the strict side.

Matching follows scansion's documented rules:

* Non-strict mode: every attribute of the expected element must be on the received one with the
  same value (extra received attributes are ignored); every expected child element must be
  matched by a received child (extra received children are ignored, order is ignored; here each
  received child matches at most one expected child).
* Strict mode: the attribute sets must be equal; the children must be the same elements in the
  same order, with none extra.
* Both: an expected attribute value ``{scansion:any}`` only requires the attribute to be there.
* By default an element in the default namespace (jabber:client: the stanza itself and children
  without an xmlns of their own, e.g. <body>, <error>, <subject>) is matched non-strictly, and an
  element in any other namespace (<x xmlns='...muc#user'> and everything inside it) strictly.
  ``scansion:strict='true'|'false'`` on an expected element overrides that for the element
  (its children keep their own default).
* Element name and namespace must always be equal. Namespace declarations are not attributes.
* Text: when the expected element has text, the received text must be equal (leading and
  trailing whitespace aside); in strict mode an element without expected text must have none.
  Whitespace-only text with a newline in it (the script's indentation) is not text.

"receives" and unexpected stanzas, as scansion does it: scansion checks a stanza only if it
arrives while its client has a ``receives`` pending; the first stanza to arrive then must match,
or the script fails. A stanza that arrives while the client waits for nothing is not checked: it
is dropped. (Prosody's scripts rely on that: e.g. the status 104
message after a room configuration in muc_nickname_change.scs is in no ``receives``.) Scansion
reads the clients' sockets one event loop; the order in which it sees stanzas that arrive
together at different clients is luck that this runner cannot reproduce, so here each client
queues what it receives, and a ``receives`` first looks at what came early (while the script was
at an earlier step): the first of those that matches is taken, those before it are dropped (they
came while nothing was pending), those after it stay queued. If none matches, all are dropped and
the next stanza to arrive must match. So the order of a client's stanzas is still checked (a
stanza passed over is gone), and a stanza that arrives while the client waits must be the one
expected. Stanzas still queued when the script ends are not checked. ``receives: nothing`` drops
what came early and fails if anything arrives within `nothing_wait` seconds.

One more timing fix of the same kind: when two clients' ``sends`` follow each other with no
``receives`` in between, the runner waits (an XEP-0199 ping to the first client's own server,
whose answer the script never sees) until the first stanza has been handled before sending the
second, so the server sees them in the script's order.

JID rewriting: the scripts are written for ``localhost`` and ``conference.localhost``. A
`Placement` says on which server each client's account lives (domain, c2s port) and which
domain serves the rooms; `JidRewriter` then rewrites every JID in the script (client ``jid:``
lines, sent and expected stanzas, attribute values and text alike) accordingly: ``user@localhost``
goes to the domain of the client whose account is ``user`` (other accounts: the first client's
server), ``X@conference.localhost`` to the room domain, a bare ``conference.localhost`` or
``localhost`` (in to/from/jid/by or as a whole text) to the room domain or the first client's
server. Only JIDs are rewritten (localparts, resources and nicks are kept).

Failures raise `ScriptFailure` (an AssertionError) naming the script line, the expected stanza,
why the next received stanza did not match it, and what the client received instead.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import dataclasses
import os
import re
import sys
import time
import xml.etree.ElementTree as ET
from typing import Dict, List, Optional, Sequence, Tuple

CLIENT_NS = "jabber:client"
STREAM_NS = "http://etherx.jabber.org/streams"
SASL_NS = "urn:ietf:params:xml:ns:xmpp-sasl"
BIND_NS = "urn:ietf:params:xml:ns:xmpp-bind"
SESSION_NS = "urn:ietf:params:xml:ns:xmpp-session"
XML_NS = "http://www.w3.org/XML/1998/namespace"
# The prefix the scripts use for scansion:strict. Any URI does: the prefix is declared by the
# wrapper the runner parses each block in, and scansion:* attributes are never sent or compared.
SCANSION_NS = "https://matthewwild.co.uk/projects/scansion"
ANY = "{scansion:any}"
STRICT_ATTR = f"{{{SCANSION_NS}}}strict"


class ScriptError(Exception):
    """The script could not be parsed or run as written (not a server bug)."""


class ScriptFailure(AssertionError):
    """The server did not behave as the script expects. `action` is the failing step (None if
    the failure is not tied to one), `expected` the stanza it expected, `received` what the
    client had instead (Incoming objects, in order), `reason` the first difference."""

    def __init__(self, message: str, action: "Optional[Action]" = None,
                 expected: "Optional[ET.Element]" = None, received: "Sequence[Incoming]" = (),
                 reason: Optional[str] = None):
        super().__init__(message)
        self.action = action
        self.expected = expected
        self.received = list(received)
        self.reason = reason


# ---------------------------------------------------------------------------------------------
# Parsing
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class ClientDef:
    name: str
    jid: str
    password: str
    line: int
    props: Dict[str, str]


@dataclasses.dataclass
class Action:
    client: str
    kind: str            # connects | disconnects | sends | receives | nothing
    line: int
    xml: str = ""        # the block, for sends / receives


@dataclasses.dataclass
class Script:
    path: str
    title: str
    clients: Dict[str, ClientDef]   # in declaration order
    actions: List[Action]

    @property
    def name(self) -> str:
        return os.path.splitext(os.path.basename(self.path))[0]


_ACTION_RX = re.compile(r"^(?P<client>.+?) (?P<verb>connects|disconnects|sends:|receives:)\s*(?P<rest>.*?)\s*$")


def _is_comment(line: str) -> bool:
    s = line.strip()
    return s.startswith("#") or s.startswith("//")


def parse_script(path: str) -> Script:
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    title = ""
    clients: Dict[str, ClientDef] = {}
    actions: List[Action] = []
    i = 0
    n = len(lines)
    # Declarations, up to the ----- line.
    current: Optional[ClientDef] = None
    while i < n:
        line = lines[i]
        if line.strip().startswith("-----"):
            i += 1
            break
        if not title and line.startswith("#"):
            title = line.lstrip("#").strip()
        if _is_comment(line) or not line.strip():
            current = None if not line.strip() else current
            i += 1
            continue
        m = re.match(r"^\[(\w+)\]\s+(.+?)\s*$", line)
        if m:
            if m.group(1) != "Client":
                raise ScriptError(f"{path}:{i + 1}: unsupported object class [{m.group(1)}]")
            current = ClientDef(name=m.group(2), jid="", password="", line=i + 1, props={})
            clients[current.name] = current
        elif line.startswith((" ", "\t")) and current is not None:
            key, sep, value = line.strip().partition(":")
            if not sep:
                raise ScriptError(f"{path}:{i + 1}: expected 'key: value' under [Client] {current.name}")
            current.props[key.strip()] = value.strip()
            if key.strip() == "jid":
                current.jid = value.strip()
            elif key.strip() == "password":
                current.password = value.strip()
        else:
            raise ScriptError(f"{path}:{i + 1}: cannot parse {line!r}")
        i += 1
    else:
        raise ScriptError(f"{path}: no ----- line after the declarations")
    for c in clients.values():
        if not c.jid:
            raise ScriptError(f"{path}:{c.line}: [Client] {c.name} has no jid")
    # Actions.
    while i < n:
        line = lines[i]
        if not line.strip() or _is_comment(line) and not line.startswith((" ", "\t")):
            i += 1
            continue
        m = _ACTION_RX.match(line)
        if not m or m.group("client") not in clients:
            raise ScriptError(f"{path}:{i + 1}: cannot parse action {line!r}")
        client, verb, rest = m.group("client"), m.group("verb"), m.group("rest")
        start = i + 1
        i += 1
        if verb in ("sends:", "receives:"):
            if verb == "receives:" and rest == "nothing":
                actions.append(Action(client, "nothing", start))
                continue
            if rest:
                raise ScriptError(f"{path}:{start}: unexpected {rest!r} after {verb}")
            block = []
            while i < n and lines[i].startswith(("\t", " ")) and lines[i].strip():
                block.append(lines[i])
                i += 1
            if not block:
                raise ScriptError(f"{path}:{start}: {verb} with no XML")
            actions.append(Action(client, verb[:-1], start, "\n".join(block)))
        else:
            if rest:
                raise ScriptError(f"{path}:{start}: unexpected {rest!r} after {verb}")
            actions.append(Action(client, verb, start))
    return Script(path=path, title=title, clients=clients, actions=actions)


# ---------------------------------------------------------------------------------------------
# JID rewriting
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Server:
    """Where accounts live: the XMPP domain and its c2s address."""
    domain: str
    port: int
    host: str = "127.0.0.1"


@dataclasses.dataclass
class Placement:
    """Which server each script client's account is on, and which domain hosts the rooms."""
    servers: Dict[str, Server]      # client name -> server
    room_domain: str
    script_domain: str = "localhost"
    script_room_domain: str = "conference.localhost"


def localpart(jid: str) -> str:
    return jid.split("/", 1)[0].split("@", 1)[0] if "@" in jid.split("/", 1)[0] else ""


# A JID in the script's domains, in an attribute value or in text: [local@]domain, where domain is
# the script's domain or a subdomain of it. The resource (if any) follows and is kept as it is.
def _jid_rx(script_domain: str) -> re.Pattern:
    return re.compile(
        r"(?<![\w.@%+/-])(?<!mailto:)"           # not inside a longer token, a URL, an e-mail address
        r"(?:(?P<local>[^\s\"'<>&@/:;=]+)@)?"
        r"(?P<domain>(?:[A-Za-z0-9-]+\.)*" + re.escape(script_domain) + r")"
        r"(?![\w.-])"
    )


class JidRewriter:
    """Rewrites the script's JIDs onto the servers of a `Placement`."""

    def __init__(self, script: Script, placement: Placement):
        self.placement = placement
        missing = [c for c in script.clients if c not in placement.servers]
        if missing:
            raise ScriptError(f"{script.path}: no server placed for client(s) {missing}")
        self.by_local: Dict[str, str] = {}
        for name, c in script.clients.items():
            lp = localpart(c.jid).lower()   # localparts compare case-insensitively
            dom = placement.servers[name].domain
            if self.by_local.setdefault(lp, dom) != dom:
                raise ScriptError(f"{script.path}: account {c.jid} placed on two servers "
                                  f"({self.by_local[lp]} and {dom}); clients sharing an account share a server")
        first = next(iter(script.clients))
        self.default_domain = placement.servers[first].domain
        self.rx = _jid_rx(placement.script_domain)

    def domain_for(self, local: Optional[str], domain: str) -> str:
        p = self.placement
        if domain == p.script_room_domain:
            return p.room_domain
        if domain == p.script_domain:
            if local is None:
                return self.default_domain
            return self.by_local.get(local.lower(), self.default_domain)
        return domain  # another subdomain (pubsub.localhost...): not used by the MUC scripts

    # A JID without a localpart (a server or service domain) is rewritten only where an address
    # is: the start of a to/from/jid/by attribute value, or a whole text node (<value>).
    _ADDRESS_BEFORE = re.compile(r"""(?:\b(?:to|from|jid|by)\s*=\s*["']|>\s*)$""")

    def rewrite(self, text: str) -> str:
        def sub(m: re.Match) -> str:
            local = m.group("local")
            if local is None and not self._ADDRESS_BEFORE.search(text[max(0, m.start() - 40):m.start()]):
                return m.group(0)
            dom = self.domain_for(local, m.group("domain"))
            return (local + "@" if local is not None else "") + dom
        return self.rx.sub(sub, text)


# ---------------------------------------------------------------------------------------------
# XML helpers
# ---------------------------------------------------------------------------------------------

def _split(tag: str) -> Tuple[str, str]:
    if tag.startswith("{"):
        ns, _, name = tag[1:].partition("}")
        return ns, name
    return "", tag


def _drop_indentation(el: ET.Element) -> ET.Element:
    """Remove whitespace-only text containing a newline (the script's indentation)."""
    if el.text is not None and not el.text.strip() and "\n" in el.text:
        el.text = None
    for c in el:
        if c.tail is not None and not c.tail.strip() and "\n" in c.tail:
            c.tail = None
        _drop_indentation(c)
    return el


def parse_block(xml: str, where: str) -> ET.Element:
    """Parse one sends/receives block (one stanza) in jabber:client, with scansion: declared."""
    wrapped = f'<scansion-block xmlns="{CLIENT_NS}" xmlns:scansion="{SCANSION_NS}">{xml}</scansion-block>'
    try:
        root = ET.fromstring(wrapped)
    except ET.ParseError as e:
        raise ScriptError(f"{where}: bad XML ({e}):\n{xml}") from None
    children = list(root)
    if len(children) != 1 or (root.text or "").strip() or (children[0].tail or "").strip():
        raise ScriptError(f"{where}: a block must hold exactly one stanza:\n{xml}")
    return _drop_indentation(children[0])


def _esc(s: str, attr: bool = False) -> str:
    s = s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    if attr:
        s = s.replace("'", "&apos;").replace("\n", "&#10;").replace("\t", "&#9;")
    return s


def serialize(el: ET.Element, parent_ns: str = CLIENT_NS, indent: Optional[str] = None,
              depth: int = 0, drop_scansion: bool = True) -> str:
    """XML for `el` with default-namespace declarations only (no ns0: prefixes)."""
    ns, name = _split(el.tag)
    attrs = []
    if ns != parent_ns:
        attrs.append(f"xmlns='{_esc(ns, True)}'")
    for k, v in el.attrib.items():
        kns, kname = _split(k)
        if kns == SCANSION_NS:
            if drop_scansion:
                continue
            kname = "scansion:" + kname
        elif kns == XML_NS:
            kname = "xml:" + kname
        elif kns:
            kname = f"{kname}"  # foreign-namespaced attributes do not occur in these scripts
        attrs.append(f"{kname}='{_esc(v, True)}'")
    pad = (indent * depth) if indent is not None else ""
    open_tag = "<" + name + ("" if not attrs else " " + " ".join(attrs))
    children = list(el)
    text = el.text or ""
    if not children and not text:
        return pad + open_tag + "/>"
    parts = [pad + open_tag + ">"]
    if indent is not None and children:
        if text.strip():
            parts.append("\n" + pad + indent + _esc(text.strip()))
        for c in children:
            parts.append("\n" + serialize(c, ns, indent, depth + 1, drop_scansion))
            if c.tail and c.tail.strip():
                parts.append("\n" + pad + indent + _esc(c.tail.strip()))
        parts.append("\n" + pad + f"</{name}>")
    else:
        parts.append(_esc(text))
        for c in children:
            parts.append(serialize(c, ns, None, 0, drop_scansion))
            if c.tail:
                parts.append(_esc(c.tail))
        parts.append(f"</{name}>")
    return "".join(parts)


def pretty(el: ET.Element) -> str:
    return serialize(el, indent="  ", drop_scansion=False)


def _direct_text(el: ET.Element) -> str:
    return (el.text or "") + "".join(c.tail or "" for c in el)


def _describe(el: ET.Element) -> str:
    ns, name = _split(el.tag)
    bits = [name]
    if ns and ns != CLIENT_NS:
        bits.append(f"xmlns='{ns}'")
    for k in ("type", "var", "code", "node", "category"):
        if k in el.attrib:
            bits.append(f"{k}='{el.attrib[k]}'")
    return "<" + " ".join(bits) + ">"


# ---------------------------------------------------------------------------------------------
# Matching
# ---------------------------------------------------------------------------------------------

def is_strict(expected: ET.Element) -> bool:
    flag = expected.attrib.get(STRICT_ATTR)
    if flag is not None:
        return flag.strip().lower() == "true"
    return _split(expected.tag)[0] != CLIENT_NS


def mismatch(expected: ET.Element, received: ET.Element, path: str = "") -> Optional[str]:
    """Why `received` does not match `expected` (None if it matches), as scansion compares."""
    here = path + "/" + _describe(expected)
    if expected.tag != received.tag:
        ens, ename = _split(expected.tag)
        rns, rname = _split(received.tag)
        return f"{here}: got <{rname} xmlns='{rns}'> instead of <{ename} xmlns='{ens}'>"
    strict = is_strict(expected)
    exp_attrs = {k: v for k, v in expected.attrib.items() if _split(k)[0] != SCANSION_NS}
    for k, v in exp_attrs.items():
        kname = _split(k)[1] if _split(k)[0] != XML_NS else "xml:" + _split(k)[1]
        if k not in received.attrib:
            return f"{here}: attribute {kname} missing (expected {v!r})"
        if v != ANY and received.attrib[k] != v:
            return f"{here}: attribute {kname} is {received.attrib[k]!r}, expected {v!r}"
    if strict:
        extra = [k for k in received.attrib if k not in exp_attrs]
        if extra:
            return (f"{here}: extra attribute(s) {', '.join(repr(_split(k)[1]) + '=' + repr(received.attrib[k]) for k in extra)}"
                    " (strict)")
    et = _direct_text(expected).strip()
    rt = _direct_text(received).strip()
    if (et or strict) and et != rt:
        return f"{here}: text is {rt!r}, expected {et!r}"
    exp_children = list(expected)
    rec_children = list(received)
    if strict:
        for i, e in enumerate(exp_children):
            if i >= len(rec_children):
                return f"{here}: child #{i + 1} {_describe(e)} missing (strict: got {len(rec_children)} children)"
            why = mismatch(e, rec_children[i], here)
            if why:
                return f"{why} (strict: child #{i + 1} of {_describe(expected)} in order)"
        if len(rec_children) > len(exp_children):
            extra = ", ".join(_describe(c) for c in rec_children[len(exp_children):])
            return f"{here}: extra child(ren) {extra} (strict)"
        return None
    # Non-strict: every expected child matched by a distinct received child, in any order.
    return _match_unordered(exp_children, rec_children, here)


def _match_unordered(exp: List[ET.Element], rec: List[ET.Element], here: str) -> Optional[str]:
    used = [False] * len(rec)
    first_failure: List[Optional[str]] = [None]

    def assign(i: int) -> bool:
        if i == len(exp):
            return True
        reasons = []
        for j, r in enumerate(rec):
            if used[j]:
                continue
            why = mismatch(exp[i], r, here)
            if why is None:
                used[j] = True
                if assign(i + 1):
                    return True
                used[j] = False
            elif r.tag == exp[i].tag:
                reasons.append(why)
        if first_failure[0] is None:
            if reasons:
                first_failure[0] = reasons[0]
            else:
                first_failure[0] = f"{here}: no child {_describe(exp[i])}"
        return False

    if assign(0):
        return None
    return first_failure[0]


# ---------------------------------------------------------------------------------------------
# XMPP client on a raw stream
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Incoming:
    el: ET.Element
    time: float


class StreamClient:
    """One c2s connection: plain TCP (no TLS), SASL PLAIN, resource binding. Every top-level
    element received after binding is queued, in order, for `receives`."""

    def __init__(self, name: str, jid: str, password: str, server: Server):
        self.name = name
        bare, _, self.resource = jid.partition("/")
        self.local, _, self.domain = bare.rpartition("@")
        self.password = password
        self.server = server
        self.full_jid = ""
        self.inbox: List[Incoming] = []
        self._cond = asyncio.Condition()
        self._reader: Optional[asyncio.StreamReader] = None
        self._writer: Optional[asyncio.StreamWriter] = None
        self._task: Optional[asyncio.Task] = None
        self._parser: Optional[ET.XMLPullParser] = None
        self._depth = 0
        self._root: Optional[ET.Element] = None
        self.closed = False       # the server closed the stream / connection
        self.stream_error: Optional[str] = None
        self._syncs: Dict[str, asyncio.Event] = {}
        self._sync_count = 0

    @property
    def bare_jid(self) -> str:
        return f"{self.local}@{self.domain}" if self.local else self.domain

    # -- stream ----------------------------------------------------------------------------

    def _new_parser(self) -> None:
        self._parser = ET.XMLPullParser(events=("start", "end"))
        self._depth = 0
        self._root = None

    def _write(self, data: str) -> None:
        if self._writer is None or self._writer.is_closing():
            raise ScriptFailure(f"{self.name}: cannot send, the connection is closed"
                                + (f" (stream error: {self.stream_error})" if self.stream_error else ""))
        self._writer.write(data.encode())

    def _open_stream(self) -> None:
        self._write("<?xml version='1.0'?>"
                    f"<stream:stream xmlns='{CLIENT_NS}' xmlns:stream='{STREAM_NS}' "
                    f"to='{self.domain}' version='1.0'>")

    async def _read_loop(self) -> None:
        assert self._reader is not None
        try:
            while True:
                data = await self._reader.read(65536)
                if not data:
                    break
                self._parser.feed(data)
                for event, el in self._parser.read_events():
                    if event == "start":
                        self._depth += 1
                        if self._depth == 1:
                            self._root = el
                        continue
                    self._depth -= 1
                    if self._depth == 0:          # </stream:stream>
                        self.closed = True
                    elif self._depth == 1:        # a top-level element
                        if self._root is not None:
                            self._root.remove(el)
                        if el.tag == f"{{{CLIENT_NS}}}iq" and el.get("id") in self._syncs:
                            self._syncs[el.get("id")].set()   # our own ping: not the script's
                            continue
                        if el.tag == f"{{{STREAM_NS}}}error":
                            self.stream_error = serialize(el, STREAM_NS)
                            self.closed = True
                        async with self._cond:
                            self.inbox.append(Incoming(el, time.monotonic()))
                            self._cond.notify_all()
                        if el.tag == f"{{{SASL_NS}}}success":
                            self._new_parser()    # the server restarts the stream after this
                            break
                if self.closed:
                    break
        except (ConnectionError, ET.ParseError) as e:
            self.stream_error = self.stream_error or f"{type(e).__name__}: {e}"
        finally:
            self.closed = True
            async with self._cond:
                self._cond.notify_all()

    async def _next(self, timeout: float, what: str) -> ET.Element:
        """The next queued element (negotiation)."""
        async with self._cond:
            await _wait_cond(self._cond, lambda: self.inbox or self.closed, timeout)
            if not self.inbox:
                why = (f"stream closed ({self.stream_error or 'no error'})" if self.closed
                       else f"nothing within {timeout:.0f}s")
                raise ScriptFailure(f"{self.name}: waiting for {what}: {why}")
            return self.inbox.pop(0).el

    async def connect(self, timeout: float) -> None:
        self._reader, self._writer = await asyncio.wait_for(
            asyncio.open_connection(self.server.host, self.server.port), timeout)
        self._new_parser()
        self._task = asyncio.ensure_future(self._read_loop())
        self._open_stream()
        feats = await self._next(timeout, "stream features")
        mechs = [m.text for m in feats.iter(f"{{{SASL_NS}}}mechanism")]
        if "PLAIN" not in mechs:
            raise ScriptFailure(f"{self.name}: server offers no SASL PLAIN ({mechs})")
        token = base64.b64encode(f"\0{self.local}\0{self.password}".encode()).decode()
        self._write(f"<auth xmlns='{SASL_NS}' mechanism='PLAIN'>{token}</auth>")
        res = await self._next(timeout, "SASL result")
        if res.tag != f"{{{SASL_NS}}}success":
            raise ScriptFailure(f"{self.name}: authentication as {self.bare_jid} failed: {serialize(res, SASL_NS)}")
        self._open_stream()
        feats = await self._next(timeout, "stream features after SASL")
        resource = f"<resource>{_esc(self.resource)}</resource>" if self.resource else ""
        self._write(f"<iq type='set' id='bind_1'><bind xmlns='{BIND_NS}'>{resource}</bind></iq>")
        res = await self._next(timeout, "bind result")
        jid_el = res.find(f"{{{BIND_NS}}}bind/{{{BIND_NS}}}jid")
        if res.get("type") != "result" or jid_el is None or not jid_el.text:
            raise ScriptFailure(f"{self.name}: resource binding failed: {serialize(res)}")
        self.full_jid = jid_el.text
        self.local, _, rest = self.full_jid.partition("@")
        self.domain, _, self.resource = rest.partition("/")
        sess = feats.find(f"{{{SESSION_NS}}}session")
        if sess is not None and sess.find(f"{{{SESSION_NS}}}optional") is None:
            self._write(f"<iq type='set' id='sess_1'><session xmlns='{SESSION_NS}'/></iq>")
            res = await self._next(timeout, "session result")
            if res.get("type") != "result":
                raise ScriptFailure(f"{self.name}: session establishment failed: {serialize(res)}")

    def send(self, el: ET.Element) -> None:
        self._write(serialize(el))

    async def sync(self, timeout: float) -> None:
        """Ping our own server and wait for the answer: everything sent before has been handled
        (a session's stanzas are handled in order). The answer is not queued for the script."""
        self._sync_count += 1
        sid = f"scansion-runner-sync-{self._sync_count}"
        ev = self._syncs[sid] = asyncio.Event()
        self._write(f"<iq type='get' id='{sid}' to='{self.domain}'><ping xmlns='urn:xmpp:ping'/></iq>")
        try:
            await asyncio.wait_for(ev.wait(), timeout)
        except asyncio.TimeoutError:
            raise ScriptFailure(f"{self.name}: the server did not answer a ping within {timeout:.0f}s") from None
        finally:
            self._syncs.pop(sid, None)

    def take_all(self) -> List[Incoming]:
        got, self.inbox = self.inbox, []
        return got

    def put_back(self, items: List[Incoming]) -> None:
        self.inbox[0:0] = items

    async def wait_stanza(self, timeout: float) -> Optional[Incoming]:
        """Pop the next received stanza, waiting up to `timeout`; None if none came."""
        async with self._cond:
            await _wait_cond(self._cond, lambda: self.inbox or self.closed, timeout)
            return self.inbox.pop(0) if self.inbox else None

    async def wait_more(self, n: int, timeout: float, stop=None) -> None:
        """Wait until at least `n` stanzas are queued (or `stop(inbox)` holds) or the deadline."""
        async with self._cond:
            await _wait_cond(self._cond, lambda: len(self.inbox) >= n or self.closed
                             or (stop is not None and stop(self.inbox)), timeout)

    async def disconnect(self, timeout: float) -> None:
        if self._writer is None:
            return
        if not self.closed and not self._writer.is_closing():
            try:
                self._write("</stream:stream>")
                await self._writer.drain()
            except (ConnectionError, ScriptFailure):
                pass
            async with self._cond:
                await _wait_cond(self._cond, lambda: self.closed, timeout)
        await self.abort()

    async def abort(self) -> None:
        if self._writer is not None:
            self._writer.close()
            try:
                await asyncio.wait_for(self._writer.wait_closed(), 5)
            except (asyncio.TimeoutError, ConnectionError, OSError):
                pass
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
            self._task = None


async def _wait_cond(cond: asyncio.Condition, pred, timeout: float) -> bool:
    try:
        await asyncio.wait_for(cond.wait_for(pred), timeout)
        return True
    except asyncio.TimeoutError:
        return bool(pred())


# ---------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------

_VAR_RX = re.compile(r"\$\{([^}]+)'s (full JID|JID)\}")


@dataclasses.dataclass
class Outcome:
    script: Script
    steps_done: int
    log: List[str]


class Runner:
    """Runs one script against servers placed by a `Placement`.

    :param receive_timeout: seconds a `receives` waits for the next stanza.
    :param connect_timeout: seconds for a `connects` (TCP, SASL, bind).
    :param nothing_wait: seconds of quiet a `receives: nothing` needs.
    :param late_wait: after a mismatch, seconds to keep collecting stanzas for the report
        (ends as soon as the expected stanza turns up).
    """

    def __init__(self, script: Script, placement: Placement, receive_timeout: float = 10.0,
                 connect_timeout: float = 20.0, nothing_wait: float = 1.0, late_wait: float = 3.0):
        self.script = script
        self.placement = placement
        self.rewriter = JidRewriter(script, placement)
        self.receive_timeout = receive_timeout
        self.connect_timeout = connect_timeout
        self.nothing_wait = nothing_wait
        self.late_wait = late_wait
        self.clients: Dict[str, StreamClient] = {}
        self.log: List[str] = []
        self.unsynced: set = set()   # clients whose last sends nothing has waited on since

    # -- helpers ---------------------------------------------------------------------------

    def jid_of(self, name: str) -> str:
        return self.rewriter.rewrite(self.script.clients[name].jid)

    def _where(self, action: Action) -> str:
        return f"{self.script.path}:{action.line}"

    def substitute(self, text: str, action: Action) -> str:
        def sub(m: re.Match) -> str:
            name, kind = m.group(1), m.group(2)
            if name not in self.script.clients:
                raise ScriptError(f"{self._where(action)}: unknown client in {m.group(0)}")
            c = self.clients.get(name)
            if kind == "full JID":
                if c is None or not c.full_jid:
                    raise ScriptError(f"{self._where(action)}: {m.group(0)} before {name} connected")
                return c.full_jid
            return c.bare_jid if c is not None else self.jid_of(name).split("/", 1)[0]
        return _VAR_RX.sub(sub, text)

    def block(self, action: Action) -> ET.Element:
        text = self.substitute(self.rewriter.rewrite(action.xml), action)
        return parse_block(text, self._where(action))

    def _client(self, action: Action) -> StreamClient:
        c = self.clients.get(action.client)
        if c is None:
            raise ScriptError(f"{self._where(action)}: {action.client} {action.kind} before connecting")
        return c

    def _fail(self, action: Action, headline: str, expected: Optional[ET.Element],
              received: Sequence[Incoming], reason: Optional[str] = None, note: str = "",
              dropped: Sequence[Incoming] = ()) -> ScriptFailure:
        out = [f"{self.script.name}: {headline}",
               f"  at {self._where(action)}: {action.client} {action.kind if action.kind != 'nothing' else 'receives: nothing'}"]
        if reason and not received:
            out.append(f"  mismatch: {reason}")
        if note:
            out.append(f"  {note}")
        if expected is not None:
            out.append("  expected:")
            out.append(_indent(pretty(expected), "    "))
        if received:
            out.append(f"  received instead ({len(received)} stanza(s), in order of arrival):")
            for k, inc in enumerate(received, 1):
                why = mismatch(expected, inc.el) if expected is not None else None
                out.append(f"    #{k}:" + ("" if expected is None else
                                           "  (matches)" if why is None else f"  (mismatch: {why})"))
                out.append(_indent(pretty(inc.el), "      "))
        else:
            out.append("  received: nothing")
        if dropped:
            out.append(f"  before this step began, {action.client} had also received (and, as scansion does, "
                       f"ignored: no receives was pending) {len(dropped)} stanza(s):")
            for k, inc in enumerate(dropped, 1):
                out.append(f"    earlier #{k}:")
                out.append(_indent(pretty(inc.el), "      "))
        out.append("  steps before it:")
        out.extend("    " + s for s in self.log[-6:])
        return ScriptFailure("\n".join(out), action, expected, received, reason)

    # -- actions ---------------------------------------------------------------------------

    async def _connects(self, action: Action) -> None:
        cdef = self.script.clients[action.client]
        server = self.placement.servers[action.client]  # (connect_host/_port: the placement decides)
        c = StreamClient(action.client, self.jid_of(action.client), cdef.password, server)
        self.clients[action.client] = c
        try:
            await c.connect(self.connect_timeout)
        except (OSError, asyncio.TimeoutError) as e:
            raise ScriptFailure(f"{action.client} could not connect to {server.host}:{server.port}: {e!r}") from None

    async def _receives(self, action: Action) -> None:
        c = self._client(action)
        expected = self.block(action)
        # Stanzas that came while this client had no receives pending: the first that matches
        # is taken (it came early, while the script was at another client's step), the ones
        # before it are dropped, as scansion drops stanzas nobody waits for.
        early = c.take_all()
        for k, inc in enumerate(early):
            if mismatch(expected, inc.el) is None:
                c.put_back(early[k + 1:])
                return
        dropped = early
        inc = await c.wait_stanza(self.receive_timeout)
        if inc is None:
            why = (f"connection closed ({c.stream_error or 'stream ended'})" if c.closed
                   else f"no stanza within {self.receive_timeout:.0f}s")
            raise self._fail(action, f"{action.client} received nothing: {why}", expected, [],
                             dropped=dropped)
        reason = mismatch(expected, inc.el)
        if reason is None:
            return
        # Collect what else arrives (bounded), stopping once the expected stanza shows up: the
        # report then shows whether it was merely late (ordering) or never came.
        got = [inc]
        await c.wait_more(10, self.late_wait,
                          stop=lambda box: any(mismatch(expected, x.el) is None for x in box))
        got += c.take_all()
        later = [k for k, x in enumerate(got, 1) if mismatch(expected, x.el) is None]
        note = (f"the expected stanza did arrive, later, as #{later[0]} below (order differs)" if later
                else f"the expected stanza did not arrive (waited {self.late_wait:.0f}s more)")
        raise self._fail(action, f"{action.client} received an unexpected stanza", expected, got, reason, note,
                         dropped=dropped)

    async def _nothing(self, action: Action) -> None:
        c = self._client(action)
        dropped = c.take_all()
        await c.wait_more(1, self.nothing_wait)
        if c.inbox:
            raise self._fail(action, f"{action.client} received a stanza, expected nothing", None, c.take_all(),
                             dropped=dropped)

    async def _step(self, action: Action) -> None:
        if action.kind == "connects":
            await self._connects(action)
        elif action.kind == "sends":
            c = self._client(action)
            # Two clients' sends with nothing in between: scansion's sends are ordered only by
            # its event loop's timing (muc_whois_anyone_member.scs: Juliet's query must come
            # after Romeo made her a member). Make it certain: the earlier sender's server has
            # handled its stanza before this one goes.
            for other in [n for n in self.unsynced if n != action.client]:
                await self.clients[other].sync(self.connect_timeout)
            self.unsynced = {action.client}
            c.send(self.block(action))
        elif action.kind == "receives":
            self.unsynced.clear()
            await self._receives(action)
        elif action.kind == "nothing":
            await self._nothing(action)
        elif action.kind == "disconnects":
            await self._client(action).disconnect(self.connect_timeout)

    async def run(self) -> Outcome:
        try:
            for action in self.script.actions:
                verb = action.kind if action.kind != "nothing" else "receives: nothing"
                try:
                    await self._step(action)
                except ScriptFailure as e:
                    if e.action is not None:
                        raise
                    raise ScriptFailure(
                        f"{self.script.name}: {e}\n  at {self._where(action)}: {action.client} {verb}\n"
                        "  steps before it:\n" + "\n".join("    " + s for s in self.log[-6:]),
                        action) from None
                self.log.append(f"line {action.line}: {action.client} {verb} ok")
            return Outcome(self.script, len(self.script.actions), self.log)
        finally:
            for c in self.clients.values():
                try:
                    await c.disconnect(5)
                except Exception:
                    await c.abort()


def _indent(text: str, pad: str) -> str:
    return "\n".join(pad + line for line in text.split("\n"))


def run_script(script: Script, placement: Placement, timeout: float = 300.0, **kwargs) -> Outcome:
    """Run `script` in a new event loop; raise ScriptFailure on the first mismatch."""
    runner = Runner(script, placement, **kwargs)

    async def main():
        return await asyncio.wait_for(runner.run(), timeout)
    return asyncio.run(main())


# ---------------------------------------------------------------------------------------------
# Command line: run scripts against a running server
# ---------------------------------------------------------------------------------------------

def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description="Run scansion scripts against a running XMPP server.")
    ap.add_argument("scripts", nargs="+")
    ap.add_argument("--domain", default="localhost", help="the users' domain (default: localhost)")
    ap.add_argument("--room-domain", default=None, help="the MUC domain (default: conference.DOMAIN)")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=5222)
    ap.add_argument("--place", action="append", default=[], metavar="CLIENT=DOMAIN:PORT",
                    help="put one client's account on another server")
    ap.add_argument("--timeout", type=float, default=10.0, help="seconds per receives")
    args = ap.parse_args(argv)
    failed = 0
    for path in args.scripts:
        script = parse_script(path)
        servers = {name: Server(args.domain, args.port, args.host) for name in script.clients}
        for p in args.place:
            name, _, where = p.partition("=")
            dom, _, port = where.rpartition(":")
            servers[name] = Server(dom, int(port), args.host)
        placement = Placement(servers, args.room_domain or f"conference.{args.domain}")
        try:
            run_script(script, placement, receive_timeout=args.timeout)
            print(f"PASS {script.name}")
        except (ScriptFailure, ScriptError) as e:
            failed += 1
            print(f"FAIL {script.name}\n{e}\n")
    print(f"{len(args.scripts) - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
