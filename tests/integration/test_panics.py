"""A panic inside the engine never takes a host down (issue 11, "Panics").

A test build of the native modules (cargo feature `panic-inject`) panics on any input carrying
`<dmuc-panic-test/>`, at the one place every engine entry point parses its input. Under Prosody
(mlua turns the panic into a Lua error) and under ejabberd (rustler turns it into
`error:nif_panicked`), as master and as mirror:

- the server keeps running;
- the stanza gets an error reply, `internal-server-error` (the engine failed, not the sender);
- the room keeps working both ways through the mirror, the engine included (ejabberd's NIF
  recovers its engine from the lock the panic poisoned).
"""

import os
import shutil
import subprocess
import uuid

import pytest

from clients import ClientHub, run
from servers import CONFERENCE, FAIRFAX, RALEIGH
from test_dmuc_ejabberd import DIST
from test_wire_namespace import error_of

ROOM = f"chatroom@{CONFERENCE}"
MIRROR = f"mirror.{RALEIGH}"
PASSWORD = "secret"
TOP = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
MARK = "<dmuc-panic-test xmlns='urn:example:test'/>"
INTERNAL = ("cancel", ["internal-server-error"])


@pytest.fixture(scope="module")
def panic_dist(tmp_path_factory):
    """dist/ with the native modules built with `panic-inject`. Built in the usual target dir
    (only the three dmuc crates rebuild); `make dist` rebuilds them without the feature, as
    cargo tracks features."""
    features = "dmuc-prosody/panic-inject,dmuc-ejabberd/panic-inject"
    subprocess.run(["cargo", "build", "--release", "-p", "dmuc-prosody", "-p", "dmuc-ejabberd",
                    "--features", features], cwd=TOP, check=True, timeout=1800)
    out = tmp_path_factory.mktemp("panic-dist") / "dist"
    shutil.copytree(DIST, out)
    shutil.copy(os.path.join(TOP, "target", "release", "libdmuc_prosody.so"), out / "prosody" / "dmuc_prosody.so")
    shutil.copy(os.path.join(TOP, "target", "release", "libdmuc_nif.so"),
                out / "ejabberd" / "mod_dmuc" / "priv" / "dmuc_nif.so")
    return str(out)


def pair(make_mixed_servers, dist, master, mirror):
    prosody, ejabberd = os.path.join(dist, "prosody"), os.path.join(dist, "ejabberd", "mod_dmuc")
    kw = dict(master=master, mirror=mirror, plugin_paths=[prosody], contrib_modules={"mod_dmuc": ejabberd})
    if master == "ejabberd":
        kw["master_modules"] = {"mod_dmuc": {"trusted_mirrors": [MIRROR]}}
    else:
        kw["conference_options"] = ['modules_enabled = { "dmuc" }', f'dmuc_trusted_mirrors = {{ "{MIRROR}" }}']
    if mirror == "ejabberd":
        kw["mirror_modules"] = {"mod_dmuc": {"mirror_host": MIRROR, "masters": [CONFERENCE], "ping_interval": 3600}}
    else:
        kw["mirror_modules"] = ["dmuc"]
        kw["mirror_blocks"] = [f'Component "{MIRROR}" "dmuc"\n    dmuc_masters = {{ "{CONFERENCE}" }}\n'
                               '    dmuc_ping_interval = 3600']
    return make_mixed_servers(**kw)


async def answered_with_error(hub, client, xml, sid, kind):
    client.xmpp.send_raw(xml)
    got = await hub.wait_for(
        lambda: [r for r in client.received if r.kind == kind and r.type == "error" and r.id == sid],
        30, f"{client.jid}: error for {sid}")
    return error_of(got[0])


async def room_works(hub, a, b):
    for sender, receiver in ((a, b), (b, a)):
        body = f"still here {uuid.uuid4().hex}"
        sender.send_groupchat(ROOM, body)
        await hub.wait_for(lambda: receiver.groupchat(ROOM, body), 20, f"{receiver.jid} gets {body}")


@pytest.mark.parametrize("master, mirror", [
    pytest.param("prosody", "prosody", id="P-P"),
    pytest.param("ejabberd", "ejabberd", id="E-E"),
])
def test_a_panic_in_the_engine(make_mixed_servers, panic_dist, master, mirror):
    env = pair(make_mixed_servers, panic_dist, master, mirror)
    env.fairfax.register_many([("alice", PASSWORD), ("bob", PASSWORD)])
    env.raleigh.register_many([("wayne", PASSWORD), ("keith", PASSWORD)])

    async def scenario():
        async with ClientHub(watch=[env.link]) as hub:
            try:
                alice = await hub.connect(f"alice@{FAIRFAX}", PASSWORD, env.fairfax.c2s_port)
                await alice.join(ROOM, "Alice")
                wayne = await hub.connect(f"wayne@{RALEIGH}", PASSWORD, env.raleigh.c2s_port)
                await wayne.join(ROOM, "Wayne", history=None, timeout=20)
                keith = await hub.connect(f"keith@{RALEIGH}", PASSWORD, env.raleigh.c2s_port)
                bob = await hub.connect(f"bob@{FAIRFAX}", PASSWORD, env.fairfax.c2s_port)
                cases = [
                    # The mirror's engine: a local occupant's message, a local user's join.
                    ("mirror", wayne, f"<message to='{ROOM}' id='p1' type='groupchat'><body>x</body>{MARK}</message>",
                     "p1", "message"),
                    ("mirror", keith, f"<presence to='{ROOM}/Keith' id='p2'><x xmlns='http://jabber.org/protocol/muc'/>{MARK}</presence>",
                     "p2", "presence"),
                    # The master's engine: a join from a user of the master's server.
                    ("master", bob, f"<presence to='{ROOM}/Bob' id='p3'><x xmlns='http://jabber.org/protocol/muc'/>{MARK}</presence>",
                     "p3", "presence"),
                ]
                for side, client, xml, sid, kind in cases:
                    assert await answered_with_error(hub, client, xml, sid, kind) == INTERNAL, (side, sid)
                    assert env.fairfax.running and env.raleigh.running, f"a server died on {sid}"
                    await room_works(hub, alice, wayne)
                # The engines took part in all of that (the mirror served Keith's next join).
                await keith.join(ROOM, "Keith", timeout=20)
                await room_works(hub, alice, keith)
                assert "Bob" not in alice.occupants(ROOM)
            except AssertionError as e:
                raise AssertionError(f"{e}\n{hub.dump()}") from None

    run(scenario(), timeout=240)
    assert env.fairfax.running and env.raleigh.running
