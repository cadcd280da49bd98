"""Oracle comparison: what a client receives from a room, direct vs through a dmuc mirror.

The host's own MUC is the oracle. A scenario runs twice on the same pair of servers, in two rooms:
once with every user on the master's server ("direct"), once with the acting/observing users on
the mirror's server ("via mirror"). Each client's stanzas from the room are reduced to one
canonical line per stanza and the two runs are compared line by line, per user.

Normalized (and only this, because it must differ between the two runs):

* the users' own JIDs: each test client's real JID (bare and full) becomes ``name@HOME`` /
  ``name@HOME/res`` (its logical name and resource), whichever server it is on; any other
  address (a wrong domain, an escaped address at the mirror) stays as it is and shows up;
* the room: ``room@conference...`` becomes ``ROOM`` (``ROOM/nick`` for occupant JIDs);
* random ids: an ``id`` the test did not choose (tests choose ids starting with ``t-``) becomes
  ``<id>``; stanza-id values (XEP-0359) ``<sid>``; occupant-id values (XEP-0421) ``<oid>``
  (tests that care compare the values themselves, across users, see `ids_of`);
* timestamps: every ``stamp`` attribute (XEP-0203 delay) becomes ``<stamp>``;
* the human-readable ``<text/>`` of an error (its condition, type and ``by`` are compared);
* the order of a run of consecutive presences from distinct occupants that are not the
  recipient's own (XEP-0045 leaves the order of the occupant list open; a host iterates a hash).
* the stanza's own xml:lang: a server adds its stream's xml:lang to the stanzas it receives over
  s2s (Prosody does), so a user on another server sees one where a direct user has none, with or
  without dmuc.

Everything else is compared: stanza name, type, from, to, children with their namespaces,
attributes and text, status codes, items (affiliation, role, jid, nick, actor, reason), error
type, condition and ``by``.

    norm = Normalizer(users={"alice@fairfax.localhost/t": "alice@HOME/t", ...}, rooms={room: "ROOM"})
    lines = canon_window(received, norm)
    report = diff_windows({"alice": direct_lines}, {"alice": mirror_lines})   # "" when equal
"""

from __future__ import annotations

import difflib
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple
from xml.etree import ElementTree as ET

XML_NS = "http://www.w3.org/XML/1998/namespace"
XML_LANG = f"{{{XML_NS}}}lang"
NS_SHORT = {
    "jabber:client": "",
    "http://jabber.org/protocol/muc": "muc",
    "http://jabber.org/protocol/muc#user": "muc#user",
    "http://jabber.org/protocol/muc#admin": "muc#admin",
    "http://jabber.org/protocol/muc#owner": "muc#owner",
    "urn:xmpp:delay": "delay",
    "jabber:x:delay": "x-delay",
    "urn:xmpp:sid:0": "sid",
    "urn:xmpp:occupant-id:0": "occupant-id",
    "urn:ietf:params:xml:ns:xmpp-stanzas": "stanzas",
    "http://jabber.org/protocol/chatstates": "chatstates",
    "jabber:x:data": "data",
    "vcard-temp:x:update": "vcard-update",
    "urn:xmpp:ping": "ping",
    "http://jabber.org/protocol/caps": "caps",
    "http://tridsys.com/protocol/dmuc": "DMUC",
    "urn:xmpp:dmuc:0": "dmuc0",
    "urn:xmpp:hints": "hints",
}
SID_NS = "urn:xmpp:sid:0"
OCCUPANT_ID_NS = "urn:xmpp:occupant-id:0"
STANZAS_NS = "urn:ietf:params:xml:ns:xmpp-stanzas"
MUC_USER_NS = "http://jabber.org/protocol/muc#user"
JID_ATTRS = ("from", "to", "jid", "by")


def split_tag(tag: str) -> Tuple[str, str]:
    if tag.startswith("{"):
        ns, _, name = tag[1:].partition("}")
        return ns, name
    return "", tag


def short_ns(ns: str) -> str:
    return NS_SHORT.get(ns, ns)


class Normalizer:
    """Maps the addresses and values that must differ between the two runs to stable tokens.

    :param users: real JID (full or bare, any case) -> token; a full JID's bare JID maps to the
        token's bare part automatically.
    :param rooms: room bare JID -> token (occupant JIDs keep their nick: ``ROOM/nick``).
    :param own_id_prefix: ids starting with this were chosen by the test and are kept.
    """

    def __init__(self, users: Mapping[str, str], rooms: Mapping[str, str], own_id_prefix: str = "t-"):
        self.users: Dict[str, str] = {}
        for real, token in users.items():
            self.users[real.lower()] = token
            bare_real, bare_token = real.split("/", 1)[0], token.split("/", 1)[0]
            self.users.setdefault(bare_real.lower(), bare_token)
        self.rooms = {r.lower(): t for r, t in rooms.items()}
        self.own_id_prefix = own_id_prefix

    def jid(self, value: Optional[str]) -> Optional[str]:
        if value is None:
            return None
        low = value.lower()
        if low in self.users:
            return self.users[low]
        bare, sep, resource = value.partition("/")
        if bare.lower() in self.rooms:
            return self.rooms[bare.lower()] + (sep + resource if sep else "")
        if bare.lower() in self.users and sep:
            return self.users[bare.lower()] + "/" + resource
        return value

    def id(self, value: str) -> str:
        return value if value.startswith(self.own_id_prefix) else "<id>"


def _attr_name(key: str) -> str:
    ns, name = split_tag(key)
    if ns == XML_NS:
        return "xml:" + name
    return f"{short_ns(ns)}:{name}" if ns else name


def canon_element(el: ET.Element, norm: Normalizer, parent_ns: str = "jabber:client") -> str:
    """One element as compact text: ``ns:name(attr=v,...){text}[children]``, children sorted."""
    ns, name = split_tag(el.tag)
    attrs = []
    for key, value in el.attrib.items():
        aname = _attr_name(key)
        if aname in JID_ATTRS:
            value = norm.jid(value)
        elif aname == "stamp":
            value = "<stamp>"
        elif aname == "id":
            if ns == SID_NS and name == "stanza-id":
                value = "<sid>"
            elif ns == OCCUPANT_ID_NS:
                value = "<oid>"
            else:
                value = norm.id(value)
        attrs.append(f"{aname}={value}")
    attrs.sort()
    children = []
    for child in el:
        cns, cname = split_tag(child.tag)
        if ns == "jabber:client" and name == "error" and cns == STANZAS_NS and cname == "text":
            continue   # human-readable text: not compared
        children.append(canon_element(child, norm, ns))
    children.sort()
    text = (el.text or "").strip()
    prefix = "" if ns == parent_ns or not ns else short_ns(ns) + ":"
    if prefix == ":":
        prefix = ""
    out = prefix + name
    if attrs:
        out += "(" + ",".join(attrs) + ")"
    if text:
        out += "{" + text + "}"
    if children:
        out += "[" + "; ".join(children) + "]"
    return out


def canon_stanza(el: ET.Element, norm: Normalizer) -> str:
    """A top-level stanza: ``name type=.. from=.. to=.. id=.. | child; child`` (its own
    xml:lang left out, see the module doc)."""
    _, name = split_tag(el.tag)
    head = [name]
    for key in ("type", "from", "to", "id"):
        value = el.get(key)
        if value is None:
            continue
        if key in ("from", "to"):
            value = norm.jid(value)
        elif key == "id":
            value = norm.id(value)
        head.append(f"{key}={value}")
    other = []
    for key, value in el.attrib.items():
        if key in ("type", "from", "to", "id", XML_LANG):
            continue
        other.append(f"{_attr_name(key)}={value}")
    head += sorted(other)
    children = sorted(canon_element(c, norm) for c in el)
    return " ".join(head) + (" | " + "; ".join(children) if children else "")


def _is_self_presence(el: ET.Element) -> bool:
    x = el.find(f"{{{MUC_USER_NS}}}x")
    return x is not None and any(s.get("code") == "110" for s in x.findall(f"{{{MUC_USER_NS}}}status"))


def _element(item) -> ET.Element:
    return item.stanza.xml if hasattr(item, "stanza") else item


def canon_window(items: Iterable, norm: Normalizer, sort_occupant_runs: bool = True) -> List[str]:
    """Canonical lines for received stanzas (clients.Received or Elements), in order of receipt,
    except that a run of consecutive available/unavailable presences from distinct occupants,
    none of them the recipient's own, is sorted."""
    els = [_element(i) for i in items]
    lines = [canon_stanza(e, norm) for e in els]
    if not sort_occupant_runs:
        return lines
    out: List[str] = []
    run: List[Tuple[str, str]] = []

    def flush():
        out.extend(line for _, line in sorted(run, key=lambda p: p[1]))
        run.clear()
    for el, line in zip(els, lines):
        _, name = split_tag(el.tag)
        sortable = (name == "presence" and el.get("type") in (None, "unavailable")
                    and not _is_self_presence(el))
        if sortable and all(f != el.get("from") for f, _ in run):
            run.append((el.get("from"), line))
            continue
        flush()
        if sortable:
            run.append((el.get("from"), line))
        else:
            out.append(line)
    flush()
    return out


def diff_windows(expected: Mapping[str, Sequence[str]], got: Mapping[str, Sequence[str]],
                 expected_label: str = "direct", got_label: str = "via mirror") -> str:
    """A readable report of every user whose lines differ ("" when all are equal): a headline
    with the first difference, then a unified diff."""
    parts = []
    for who in list(expected) + [w for w in got if w not in expected]:
        exp, act = list(expected.get(who, [])), list(got.get(who, []))
        if exp == act:
            continue
        parts.append(f"== {who}: {first_difference(exp, act, expected_label, got_label)}")
        parts += ["   " + l for l in difflib.unified_diff(exp, act, f"{who} {expected_label}",
                                                          f"{who} {got_label}", lineterm="", n=3)]
    return "\n".join(parts)


def first_difference(exp: Sequence[str], act: Sequence[str], expected_label: str = "direct",
                     got_label: str = "via mirror") -> str:
    """One line: where the two runs first part, what was expected and what came."""
    sm = difflib.SequenceMatcher(a=exp, b=act, autojunk=False)
    for tag, i1, i2, j1, j2 in sm.get_opcodes():
        if tag == "equal":
            continue
        e = exp[i1:i2]
        a = act[j1:j2]
        if tag == "delete":
            return f"missing #{i1 + 1}: {e[0]}" + (f" (+{len(e) - 1} more)" if len(e) > 1 else "")
        if tag == "insert":
            return f"extra #{j1 + 1}: {a[0]}" + (f" (+{len(a) - 1} more)" if len(a) > 1 else "")
        return f"#{i1 + 1} {expected_label}: {e[0]}  ||  {got_label}: {a[0]}" + (
            f" (+{len(e) - 1}/{len(a) - 1} more)" if len(e) > 1 or len(a) > 1 else "")
    return "equal"


def ids_of(items: Iterable) -> List[Tuple[str, Optional[str], Optional[str], Optional[str]]]:
    """(body, stanza-id by, stanza-id value, occupant-id value) for each message received."""
    out = []
    for item in items:
        el = _element(item)
        if split_tag(el.tag)[1] != "message":
            continue
        body = el.find("{jabber:client}body")
        sid = el.find(f"{{{SID_NS}}}stanza-id")
        oid = el.find(f"{{{OCCUPANT_ID_NS}}}occupant-id")
        out.append(((body.text or "") if body is not None else "",
                    sid.get("by") if sid is not None else None,
                    sid.get("id") if sid is not None else None,
                    oid.get("id") if oid is not None else None))
    return out
