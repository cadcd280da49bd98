"""XEP-0359 stanza-ids on a mirror user's message, on real servers (docs/protocol.md, "Stanza ids").

The mirror shows its user's message to its own users at once, with a stanza-id it proposes; the
master's archive (Prosody mod_muc_mam, ejabberd mod_mam) files the message under that id, so
every copy carries the same <stanza-id by='room'/>: the sender's echo and a peer at the mirror,
a direct user on the master, a MAM query on the room (direct and through the mirror), and the
history of later joiners (direct and through the mirror). A master-side message keeps the
archive's own id, which the mirror passes on.

Runs in the four pairings (master, mirror). Set DMUC_STANZA_IDS_SHOW=1 (with -s) to print the
ids each user saw.
"""

from __future__ import annotations

import os
import uuid
from typing import Dict, List, Optional
from xml.etree import ElementTree as ET

import pytest

from clients import Client, ClientHub, run
from servers import CONFERENCE, FAIRFAX, RALEIGH

ROOM = f"ids@{CONFERENCE}"
MIRROR = f"mirror.{RALEIGH}"
PASSWORD = "secret"
TOP = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
PROSODY_DIST = os.path.join(TOP, "dist", "prosody")
EJABBERD_DIST = os.path.join(TOP, "dist", "ejabberd", "mod_dmuc")
SID = "urn:xmpp:sid:0"
DMUC0 = "urn:xmpp:dmuc:0"
MAM = "urn:xmpp:mam:2"
FORWARD = "urn:xmpp:forward:0"

PAIRINGS = [
    pytest.param("prosody", "prosody", id="P-P"),
    # mod_muc_mam's archive in the memory driver (scansion's setup) rather than the internal one.
    pytest.param("prosody-memory", "prosody", id="P-P-memory"),
    # Every room archived: mod_muc_mam's form has no archiving field; the shim adds one.
    pytest.param("prosody-logall", "prosody", id="P-P-log-all-rooms"),
    pytest.param("ejabberd", "ejabberd", id="E-E"),
    pytest.param("ejabberd", "prosody", id="Emaster-Pmirror"),
    pytest.param("prosody", "ejabberd", id="Pmaster-Emirror"),
]


def ids_env(make_mixed_servers, master: str, mirror: str, fast_pings: bool = False):
    storage, log_all = None, False
    if master == "prosody-memory":
        master, storage = "prosody", "memory"
    if master == "prosody-logall":
        master, log_all = "prosody", True
    ping = {"ping_interval": 1, "ping_timeout": 2} if fast_pings else {"ping_interval": 3600}
    for path in (os.path.join(PROSODY_DIST, "dmuc_prosody.so"), os.path.join(EJABBERD_DIST, "priv", "dmuc_nif.so")):
        if not os.path.exists(path):
            raise AssertionError(f"{path} missing: run `make dist` first")
    kw = dict(master=master, mirror=mirror, plugin_paths=[PROSODY_DIST],
              contrib_modules={"mod_dmuc": EJABBERD_DIST})
    if master == "ejabberd":
        kw["master_modules"] = {"mod_dmuc": {"trusted_mirrors": [MIRROR], "link_timeout": 4}, "mod_mam": {}}
        kw["conference_options"] = {"default_room_options": {"mam": True}}
    else:
        kw["conference_options"] = ['modules_enabled = { "dmuc", "muc_mam" }',
                                    f'dmuc_trusted_mirrors = {{ "{MIRROR}" }}', "dmuc_link_timeout = 4"]
        if log_all:
            kw["conference_options"] += ["muc_log_all_rooms = true"]
        if storage:
            # Only the room archive: accounts must stay where prosodyctl registers them.
            kw["master_options"] = [f'storage = {{ muc_log = "{storage}" }}']
    if mirror == "ejabberd":
        kw["mirror_modules"] = {"mod_dmuc": {"mirror_host": MIRROR, "masters": [CONFERENCE], **ping}}
    else:
        kw["mirror_modules"] = ["dmuc"]
        kw["mirror_blocks"] = [f'Component "{MIRROR}" "dmuc"\n    dmuc_masters = {{ "{CONFERENCE}" }}\n'
                               + "\n".join(f"    dmuc_{k} = {v}" for k, v in ping.items())]
    env = make_mixed_servers(**kw)
    env.fairfax.register_many([(u, PASSWORD) for u in ("alice", "carol")])
    env.raleigh.register_many([(u, PASSWORD) for u in ("wayne", "keith", "bob")])
    return env


def room_ids(xml) -> List[str]:
    """The room's stanza-id values on a message element."""
    return [s.get("id") for s in xml.findall(f"{{{SID}}}stanza-id") if s.get("by") == ROOM]


def archived_ids(xml) -> List[str]:
    """The legacy <archived xmlns='urn:xmpp:mam:tmp' by='room'/> ids (ejabberd adds it too)."""
    return [s.get("id") for s in xml.findall("{urn:xmpp:mam:tmp}archived") if s.get("by") == ROOM]


def copy_of(c: Client, body: str, delayed: Optional[bool] = None):
    """The message element `c` got from the room with `body` (live or from history)."""
    for r in c.groupchat(ROOM, body):
        is_delayed = r.stanza.xml.find("{urn:xmpp:delay}delay") is not None
        if delayed is None or delayed == is_delayed:
            return r.stanza.xml
    raise AssertionError(f"{c.jid} has no {'history ' if delayed else ''}copy of {body!r}")


async def mam_ids(hub: ClientHub, c: Client) -> Dict[str, str]:
    """body -> archive id, from a MAM query on the room (sent from `c`)."""
    qid = uuid.uuid4().hex[:8]
    start = len(c.received)
    c.xmpp.send_raw(f"<iq type='set' id='mam-{qid}' to='{ROOM}'><query xmlns='{MAM}' queryid='{qid}'/></iq>")
    await hub.wait_for(lambda: any(r.kind == "iq" and r.id == f"mam-{qid}" for r in c.received[start:]), 20,
                       f"{c.jid}: the MAM query's answer")
    answer = next(r for r in c.received[start:] if r.kind == "iq" and r.id == f"mam-{qid}")
    assert answer.type == "result", answer.raw
    out: Dict[str, str] = {}
    for r in c.received[start:]:
        res = r.stanza.xml.find(f"{{{MAM}}}result") if r.kind == "message" else None
        if res is None or res.get("queryid") != qid:
            continue
        body = res.find(f"{{{FORWARD}}}forwarded/{{jabber:client}}message/{{jabber:client}}body")
        if body is not None:
            out[body.text or ""] = res.get("id")
    return out


@pytest.mark.parametrize("master, mirror", PAIRINGS)
def test_one_stanza_id_for_every_copy(make_mixed_servers, master, mirror):
    env = ids_env(make_mixed_servers, master, mirror)
    from_wayne, from_alice = "from wayne, behind the mirror", "from alice, on the master"
    seen: Dict[str, Dict[str, List[str]]] = {from_wayne: {}, from_alice: {}}
    legacy: Dict[str, List[str]] = {}    # who -> <archived/> ids on wayne's message, live

    async def scenario():
        async with ClientHub(watch=[env.link]) as hub:
            alice = await hub.connect(f"alice@{FAIRFAX}/t", PASSWORD, env.fairfax.c2s_port, timeout=20)
            wayne = await hub.connect(f"wayne@{RALEIGH}/t", PASSWORD, env.raleigh.c2s_port, timeout=20)
            keith = await hub.connect(f"keith@{RALEIGH}/t", PASSWORD, env.raleigh.c2s_port, timeout=20)
            await alice.join(ROOM, "alice", timeout=20)
            await wayne.join(ROOM, "wayne", timeout=20)
            await keith.join(ROOM, "keith", timeout=20)
            everyone = [alice, wayne, keith]

            env.link.reset()
            wayne.send_groupchat(ROOM, from_wayne, id="w-1")
            await hub.wait_for(lambda: all(c.groupchat(ROOM, from_wayne) for c in everyone), 15,
                               "wayne's message everywhere")
            alice.send_groupchat(ROOM, from_alice, id="a-1")
            await hub.wait_for(lambda: all(c.groupchat(ROOM, from_alice) for c in everyone), 15,
                               "alice's message everywhere")
            wire = env.link.snapshot()
            for body in (from_wayne, from_alice):
                for c in everyone:
                    seen[body][f"{c.jid.user} (live)"] = room_ids(copy_of(c, body))
            for c in everyone:
                legacy[c.jid.user] = archived_ids(copy_of(c, from_wayne))

            # What crossed to the master: the proposal, in dmuc's namespace; what alice got: not.
            up = [s.raw for s in wire.stanzas if s.sender == RALEIGH and from_wayne in s.raw]
            assert len(up) == 1, up
            proposal = ET.fromstring(up[0]).find(f"{{{DMUC0}}}stanza-id")
            assert proposal is not None, f"no proposal on the wire: {up[0]}"
            assert DMUC0 not in ET.tostring(copy_of(alice, from_wayne)).decode(), "the proposal reached alice"

            for c in (alice, wayne):
                ids = await mam_ids(hub, c)
                for body in (from_wayne, from_alice):
                    seen[body][f"{c.jid.user} (MAM)"] = [ids[body]] if body in ids else []

            carol = await hub.connect(f"carol@{FAIRFAX}/t", PASSWORD, env.fairfax.c2s_port, timeout=20)
            bob = await hub.connect(f"bob@{RALEIGH}/t", PASSWORD, env.raleigh.c2s_port, timeout=20)
            await carol.join(ROOM, "carol", history=10, timeout=20)
            await bob.join(ROOM, "bob", history=10, timeout=20)
            for body in (from_wayne, from_alice):
                for c in (carol, bob):
                    seen[body][f"{c.jid.user} (history)"] = room_ids(copy_of(c, body, delayed=True))
            seen["proposal"] = {"on the wire": [proposal.get("id")]}

    run(scenario(), timeout=120)
    if os.environ.get("DMUC_STANZA_IDS_SHOW"):
        print(f"\n{master} master, {mirror} mirror:")
        for body, per_user in seen.items():
            print(f"  {body}")
            for who, ids in per_user.items():
                print(f"    {who:18} {ids}")

    proposed = seen["proposal"]["on the wire"][0]
    assert proposed.isdigit(), proposed
    for body, per_user in ((from_wayne, seen[from_wayne]), (from_alice, seen[from_alice])):
        for who, ids in per_user.items():
            assert len(ids) == 1, f"{body!r}: {who} got stanza-ids {ids}: {per_user}"
        assert len({ids[0] for ids in per_user.values()}) == 1, f"{body!r}: not one id for all: {per_user}"
    assert seen[from_wayne]["wayne (live)"] == [proposed], "the archive adopted the mirror's proposal"
    expected_legacy = [proposed] if master == "ejabberd" else []
    assert all(v == expected_legacy for v in legacy.values()), f"<archived/> as the room adds it: {legacy}"
    assert seen[from_alice]["alice (live)"] != [proposed]


@pytest.mark.parametrize("master, mirror", [p for p in PAIRINGS if p.id in ("P-P", "E-E", "Emaster-Pmirror")])
def test_queued_message(make_mixed_servers, master, mirror):
    """A message said while the link is down waits in the mirror's queue and reaches the master
    late. Prosody's archive keys are opaque: the mirror stamps it at once and the archive adopts
    the id when it arrives. ejabberd's ids are timestamps that order its archive: the mirror,
    told so by the master's config ("fresh"), stamps nothing; the archive gives the message its
    own id, which the master's side sees, and a user behind the mirror sees no id on it."""
    env = ids_env(make_mixed_servers, master, mirror, fast_pings=True)
    body = "said while the link was down"
    got: Dict[str, List[str]] = {}

    async def scenario():
        async with ClientHub(watch=[env.link]) as hub:
            alice = await hub.connect(f"alice@{FAIRFAX}/t", PASSWORD, env.fairfax.c2s_port, timeout=20)
            wayne = await hub.connect(f"wayne@{RALEIGH}/t", PASSWORD, env.raleigh.c2s_port, timeout=20)
            await alice.join(ROOM, "alice", timeout=20)
            await wayne.join(ROOM, "wayne", timeout=20)
            env.link.cut("reset")
            await hub.wait_for(lambda: "alice" not in wayne.occupants(ROOM), 20, "wayne sees the link loss")
            wayne.send_groupchat(ROOM, body, id="q-1")
            await hub.wait_for(lambda: wayne.groupchat(ROOM, body), 10, "the local echo")
            got["wayne (echo, at once)"] = room_ids(copy_of(wayne, body))
            env.link.restore()
            await hub.wait_for(lambda: alice.groupchat(ROOM, body), 60, "the queued message reaches alice")
            got["alice (live, late)"] = room_ids(copy_of(alice, body))
            ids = await mam_ids(hub, alice)
            got["alice (MAM)"] = [ids[body]] if body in ids else []

    run(scenario(), timeout=150)
    if os.environ.get("DMUC_STANZA_IDS_SHOW"):
        print(f"\n{master} master, {mirror} mirror, a queued message: {got}")
    assert len(got["alice (live, late)"]) == 1 and got["alice (MAM)"] == got["alice (live, late)"], got
    if master == "ejabberd":
        assert got["wayne (echo, at once)"] == [], got
    else:
        assert got["wayne (echo, at once)"] == got["alice (live, late)"], got
