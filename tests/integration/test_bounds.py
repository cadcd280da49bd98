"""Depth bombs against real servers, in every role (docs/security.md, "Bounded input").

A stanza nesting 100,000 elements used to kill a Prosody with mod_dmuc (SIGSEGV from 16,500
levels) and the whole Erlang VM of an ejabberd with it (from 3,000 levels). Here each host, as a
master and as a mirror, gets such a stanza from every kind of sender:

- master: a join presence (60,000 levels: see RELAY_LEVELS) to ``room@conference…/Nick`` from a remote user the mirror does not
  speak for (``evil.raleigh.localhost``, a plain vhost on the mirror's server: an outsider); the
  same from a local user of the master's server; a groupchat message from an occupant;
- mirror: a message to the mirror service from a remote user (60,000 levels); a groupchat message and a join
  presence to the mirrored room from local users of the mirror's server.

After each bomb: the server process still runs, the sender got ``policy-violation`` (RFC 6120),
the refusal is in the server's log at warn, and the room still works both ways through the
mirror.

The host's own stream limits come first, so they are raised here to let a 100,000-level stanza
(700 KB) reach dmuc: Prosody 0.12.3 defaults to ``c2s_stanza_size_limit`` 256 KiB and
``s2s_stanza_size_limit`` 512 KiB (about 37,000 and 74,000 levels of ``<a>``); the harness's
ejabberd listeners use ``max_stanza_size: 1048576``. ``test_prosody_default_stream_limit`` checks
what an unchanged Prosody does: a 100,000-level stanza closes the sender's c2s stream (the server
lives), and the deepest stanza it delivers is refused by dmuc.
"""

import subprocess
import uuid

import pytest

from clients import ClientHub, run
from servers import CONFERENCE, FAIRFAX, PROSODYCTL, RALEIGH
from test_dmuc_ejabberd import EJABBERD_DIST, PROSODY_DIST
from test_wire_namespace import error_of

ROOM = f"chatroom@conference.{FAIRFAX}"
MIRROR = f"mirror.{RALEIGH}"
EVIL = f"evil.{RALEIGH}"
PASSWORD = "secret"
LEVELS = 100_000
# A Prosody sender cannot relay 100,000 levels over s2s: its own util.stanza tostring (recursive
# Lua) fails with "stack overflow" from about 71,400 levels (measured with lua5.4 and Prosody
# 0.12.3's util.stanza), a Lua error that drops the stanza at the sender. Bombs that cross s2s
# from a Prosody sender therefore nest 60,000 levels (420 KB, under the 512 KiB s2s default).
RELAY_LEVELS = 60_000
# A refusal's warning (ejabberd's names the host in brackets; Prosody's log names it anyway).
REFUSED_LOG = r"(warn|warning).*dmuc( \([^)]*\))? refused"
# Room for 100,000 levels (700 KB) in Prosody's streams.
BIG_STREAMS = ["c2s_stanza_size_limit = 2*1024*1024", "s2s_stanza_size_limit = 2*1024*1024"]


def nest(levels):
    return "<a xmlns='urn:example:bomb'>" + "<a>" * (levels - 1) + "</a>" * levels


def join_bomb(to, sid, levels=LEVELS):
    return (f"<presence to='{to}' id='{sid}'><x xmlns='http://jabber.org/protocol/muc'/>"
            f"{nest(levels)}</presence>")


def message_bomb(to, sid, type_, levels=LEVELS):
    return f"<message to='{to}' id='{sid}' type='{type_}'><body>boom</body>{nest(levels)}</message>"


def bomb_pair(make_mixed_servers, master, mirror, big_streams=True):
    """A dmuc pair (as test_dmuc_ejabberd.dmuc_pair) with room for the bombs in Prosody's
    streams and, on a Prosody mirror's server, a plain vhost for the outsider."""
    kw = dict(master=master, mirror=mirror, plugin_paths=[PROSODY_DIST],
              contrib_modules={"mod_dmuc": EJABBERD_DIST},
              # At debug level ejabberd's router pretty-prints every stanza it routes; for a
              # 60,000-level one that never ends, and the receiving connection's process hangs
              # in it (the VM lives; so it does without mod_dmuc). Production runs at info.
              loglevel="info")
    streams = BIG_STREAMS if big_streams else []
    if master == "ejabberd":
        kw["master_modules"] = {"mod_dmuc": {"trusted_mirrors": [MIRROR]}}
    else:
        kw["conference_options"] = ['modules_enabled = { "dmuc" }', f'dmuc_trusted_mirrors = {{ "{MIRROR}" }}']
        kw["master_options"] = streams
    if mirror == "ejabberd":
        kw["mirror_modules"] = {"mod_dmuc": {"mirror_host": MIRROR, "masters": [CONFERENCE], "ping_interval": 3600}}
    else:
        kw["mirror_modules"] = ["dmuc"]
        kw["mirror_blocks"] = [f'Component "{MIRROR}" "dmuc"\n    dmuc_masters = {{ "{CONFERENCE}" }}\n'
                               '    dmuc_ping_interval = 3600',
                               # No mod_dmuc here: its users reach the master directly.
                               f'VirtualHost "{EVIL}"']
        kw["mirror_options"] = streams
    return make_mixed_servers(**kw)


def register_evil(env, user):
    subprocess.run([PROSODYCTL, "--config", env.raleigh.config_path, "register", user, EVIL, PASSWORD],
                   cwd=env.raleigh.dir, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                   timeout=30)


async def bomb(hub, client, xml, sid, kind, timeout=30):
    """Send a bomb; wait for the error with its id; return (type, [conditions])."""
    client.xmpp.send_raw(xml)
    got = await hub.wait_for(
        lambda: [r for r in client.received if r.kind == kind and r.type == "error" and r.id == sid],
        timeout, f"{client.jid}: error for bomb {sid}")
    return error_of(got[0])


async def room_works(hub, a, b):
    """A message each way between a direct user and a user behind the mirror."""
    for sender, receiver in ((a, b), (b, a)):
        body = f"still here {uuid.uuid4().hex}"
        sender.send_groupchat(ROOM, body)
        await hub.wait_for(lambda: receiver.groupchat(ROOM, body), 20, f"{receiver.jid} gets {body}")


POLICY = ("modify", ["policy-violation"])


@pytest.mark.parametrize("master", ["prosody", "ejabberd"])
def test_bombs_at_a_master(make_mixed_servers, master):
    env = bomb_pair(make_mixed_servers, master, "prosody")
    env.fairfax.register_many([("alice", PASSWORD), ("bob", PASSWORD)])
    env.raleigh.register_many([("wayne", PASSWORD)])
    register_evil(env, "mallory")

    async def scenario():
        async with ClientHub(watch=[env.link]) as hub:
            try:
                alice = await hub.connect(f"alice@{FAIRFAX}", PASSWORD, env.fairfax.c2s_port)
                await alice.join(ROOM, "Alice")
                wayne = await hub.connect(f"wayne@{RALEIGH}", PASSWORD, env.raleigh.c2s_port)
                await wayne.join(ROOM, "Wayne", history=None, timeout=20)
                mallory = await hub.connect(f"mallory@{EVIL}", PASSWORD, env.raleigh.c2s_port)
                bob = await hub.connect(f"bob@{FAIRFAX}", PASSWORD, env.fairfax.c2s_port)

                cases = [
                    ("outsider's join", mallory, join_bomb(f"{ROOM}/Mallory", "b1", RELAY_LEVELS), "b1", "presence"),
                    ("local user's join", bob, join_bomb(f"{ROOM}/Bob", "b2"), "b2", "presence"),
                    ("occupant's groupchat", alice, message_bomb(ROOM, "b3", "groupchat"), "b3", "message"),
                ]
                for what, client, xml, sid, kind in cases:
                    offset = env.fairfax.log_offset()
                    assert await bomb(hub, client, xml, sid, kind) == POLICY, what
                    assert env.fairfax.running, f"{master} master died on the {what}"
                    # Log files are written asynchronously: wait for the line, with a deadline.
                    await env.fairfax.wait_for_log_async(REFUSED_LOG, 10, since=offset)
                    await room_works(hub, alice, wayne)
                assert "Mallory" not in alice.occupants(ROOM) and "Bob" not in alice.occupants(ROOM)
            except AssertionError as e:
                raise AssertionError(f"{e}\n{hub.dump()}") from None

    run(scenario(), timeout=240)
    assert env.fairfax.running and env.raleigh.running


@pytest.mark.parametrize("mirror", ["prosody", "ejabberd"])
def test_bombs_at_a_mirror(make_mixed_servers, mirror):
    env = bomb_pair(make_mixed_servers, "prosody", mirror)
    env.fairfax.register_many([("alice", PASSWORD)])
    env.raleigh.register_many([("wayne", PASSWORD), ("keith", PASSWORD)])

    async def scenario():
        async with ClientHub(watch=[env.link]) as hub:
            try:
                alice = await hub.connect(f"alice@{FAIRFAX}", PASSWORD, env.fairfax.c2s_port)
                await alice.join(ROOM, "Alice")
                wayne = await hub.connect(f"wayne@{RALEIGH}", PASSWORD, env.raleigh.c2s_port)
                await wayne.join(ROOM, "Wayne", history=None, timeout=20)
                keith = await hub.connect(f"keith@{RALEIGH}", PASSWORD, env.raleigh.c2s_port)

                cases = [
                    ("remote user's message to the mirror service", alice,
                     message_bomb(MIRROR, "m1", "chat", RELAY_LEVELS), "m1", "message"),
                    ("local occupant's groupchat", wayne, message_bomb(ROOM, "m2", "groupchat"), "m2", "message"),
                    ("local user's join", keith, join_bomb(f"{ROOM}/Keith", "m3"), "m3", "presence"),
                ]
                for what, client, xml, sid, kind in cases:
                    offset = env.raleigh.log_offset()
                    assert await bomb(hub, client, xml, sid, kind) == POLICY, what
                    assert env.raleigh.running, f"{mirror} mirror died on the {what}"
                    # Log files are written asynchronously: wait for the line, with a deadline.
                    await env.raleigh.wait_for_log_async(REFUSED_LOG, 10, since=offset)
                    await room_works(hub, alice, wayne)
                assert "Keith" not in alice.occupants(ROOM)
            except AssertionError as e:
                raise AssertionError(f"{e}\n{hub.dump()}") from None

    run(scenario(), timeout=240)
    assert env.fairfax.running and env.raleigh.running


def test_prosody_default_stream_limit(make_mixed_servers):
    """An unchanged Prosody 0.12.3 (c2s_stanza_size_limit 256 KiB): a 100,000-level stanza
    closes the sender's stream before any module sees it; the deepest one that fits is
    refused by dmuc with policy-violation. The server and the room carry on."""
    env = bomb_pair(make_mixed_servers, "prosody", "prosody", big_streams=False)
    env.fairfax.register_many([("alice", PASSWORD)])
    env.raleigh.register_many([("wayne", PASSWORD), ("keith", PASSWORD)])
    fits = (256 * 1024 - 200) // 7   # `<a>` + `</a>` per level, minus the envelope

    async def scenario():
        async with ClientHub(watch=[env.link]) as hub:
            try:
                alice = await hub.connect(f"alice@{FAIRFAX}", PASSWORD, env.fairfax.c2s_port)
                await alice.join(ROOM, "Alice")
                wayne = await hub.connect(f"wayne@{RALEIGH}", PASSWORD, env.raleigh.c2s_port)
                await wayne.join(ROOM, "Wayne", history=None, timeout=20)
                keith = await hub.connect(f"keith@{RALEIGH}", PASSWORD, env.raleigh.c2s_port)
                offset = env.raleigh.log_offset()
                # Prosody closes the stream: <stream:error><policy-violation/> "XML stanza is too big".
                keith.xmpp.send_raw(message_bomb(ROOM, "big", "groupchat"))
                await env.raleigh.wait_for_log_async(r"XML stanza is too big",
                                                     20, since=offset)
                assert env.raleigh.running
                assert await bomb(hub, wayne, message_bomb(ROOM, "fits", "groupchat", fits), "fits",
                                  "message") == POLICY
                assert env.raleigh.running
                await room_works(hub, alice, wayne)
            except AssertionError as e:
                raise AssertionError(f"{e}\n{hub.dump()}") from None

    run(scenario(), timeout=180)
