"""Limits, on real servers (issue 11; docs/security.md, "Limits"): a join past one gets
`resource-constraint`, never silence, and the room keeps working for everyone else.

- A mirror with `max_local_occupants` 2: the third local user's join is refused at the mirror
  (nothing crosses the link for it). Every pairing.
- A master (either host) with a join burst of 3 through one mirror: the fourth quick join is
  refused, through the mirror, to that user only.
- A master (either host) allowing a mirror 2 rooms: a join through it to a third room is refused;
  once its users have left one room, the third takes them. On ejabberd each room is a process
  with an engine of its own, so this proves the engines share the service's count.
"""

import os

import pytest

from clients import ClientHub, run
from servers import CONFERENCE, FAIRFAX, RALEIGH
from test_dmuc_ejabberd import EJABBERD_DIST, MIRROR, PROSODY_DIST

ROOM = f"limits@{CONFERENCE}"
PASSWORD = "secret"
STANZAS = "urn:ietf:params:xml:ns:xmpp-stanzas"

PAIRINGS = [
    pytest.param("prosody", "prosody", id="P-P"),
    pytest.param("ejabberd", "ejabberd", id="E-E"),
    pytest.param("ejabberd", "prosody", id="Emaster-Pmirror"),
    pytest.param("prosody", "ejabberd", id="Pmaster-Emirror"),
]


def pair(make_mixed_servers, master, mirror, master_opts=None, mirror_opts=None):
    """`master_opts`/`mirror_opts`: mod_dmuc options by their ejabberd names (Prosody's are
    the same with `dmuc_` in front)."""
    for path in (os.path.join(PROSODY_DIST, "dmuc_prosody.so"), os.path.join(EJABBERD_DIST, "priv", "dmuc_nif.so")):
        if not os.path.exists(path):
            raise AssertionError(f"{path} missing: run `make dist` first")
    mirror_opts = dict(mirror_opts or {})
    master_opts = dict(master_opts or {})
    kw = dict(master=master, mirror=mirror, plugin_paths=[PROSODY_DIST],
              contrib_modules={"mod_dmuc": EJABBERD_DIST})
    if master == "ejabberd":
        kw["master_modules"] = {"mod_dmuc": {"trusted_mirrors": [MIRROR], **master_opts}}
    else:
        kw["conference_options"] = ['modules_enabled = { "dmuc" }', f'dmuc_trusted_mirrors = {{ "{MIRROR}" }}',
                                    *(f"dmuc_{k} = {v}" for k, v in master_opts.items())]
    if mirror == "ejabberd":
        kw["mirror_modules"] = {"mod_dmuc": {"mirror_host": MIRROR, "masters": [CONFERENCE],
                                             "ping_interval": 3600, **mirror_opts}}
    else:
        kw["mirror_modules"] = ["dmuc"]
        kw["mirror_blocks"] = [f'Component "{MIRROR}" "dmuc"\n    dmuc_masters = {{ "{CONFERENCE}" }}\n'
                               '    dmuc_ping_interval = 3600\n'
                               + "".join(f"    dmuc_{k} = {v}\n" for k, v in mirror_opts.items())]
    return make_mixed_servers(**kw)


def condition(r):
    err = r.stanza.xml.find("{jabber:client}error")
    if err is None:
        return None
    return [c.tag.split("}")[1] for c in err if c.tag.startswith(f"{{{STANZAS}}}") and not c.tag.endswith("}text")]


async def refused_join(hub, client, nick):
    start = len(client.received)
    client.xmpp.send_raw(f"<presence to='{ROOM}/{nick}' id='lim-{nick}'>"
                         "<x xmlns='http://jabber.org/protocol/muc'/></presence>")
    await hub.wait_for(lambda: any(r.id == f"lim-{nick}" for r in client.received[start:]), 20,
                       f"{nick}'s join answered")
    answer = [r for r in client.received[start:] if r.id == f"lim-{nick}"][0]
    assert answer.type == "error" and condition(answer) == ["resource-constraint"], answer.raw


@pytest.mark.parametrize("master, mirror", PAIRINGS)
def test_local_occupants_per_room_at_a_mirror(make_mixed_servers, master, mirror):
    env = pair(make_mixed_servers, master, mirror, mirror_opts={"max_local_occupants": 2})
    env.fairfax.register("alice", PASSWORD)
    env.raleigh.register_many([(u, PASSWORD) for u in ("bob", "carol", "dave")])

    async def scenario():
        async with ClientHub(watch=[env.link]) as hub:
            alice = await hub.connect(f"alice@{FAIRFAX}", PASSWORD, env.fairfax.c2s_port)
            await alice.join(ROOM, "alice")
            bob = await hub.connect(f"bob@{RALEIGH}", PASSWORD, env.raleigh.c2s_port)
            carol = await hub.connect(f"carol@{RALEIGH}", PASSWORD, env.raleigh.c2s_port)
            dave = await hub.connect(f"dave@{RALEIGH}", PASSWORD, env.raleigh.c2s_port)
            await bob.join(ROOM, "bob", timeout=20)
            await carol.join(ROOM, "carol", timeout=20)
            before = env.link.count(sender=RALEIGH, name="presence")
            await refused_join(hub, dave, "dave")
            assert env.link.count(sender=RALEIGH, name="presence") == before, "dave's join crossed the link"
            # The room goes on.
            alice.send_groupchat(ROOM, "still here", id="lim-1")
            await hub.wait_for(lambda: bob.groupchat(ROOM, "still here") and carol.groupchat(ROOM, "still here"),
                               15, "the room still works")
            assert not dave.groupchat(ROOM, "still here")

    run(scenario(), timeout=120)


@pytest.mark.parametrize("master, mirror", PAIRINGS)
def test_join_burst_per_mirror_at_a_master(make_mixed_servers, master, mirror):
    env = pair(make_mixed_servers, master, mirror,
               master_opts={"mirror_join_rate": 1, "mirror_join_burst": 3})
    env.fairfax.register("alice", PASSWORD)
    users = [f"u{i}" for i in range(8)]
    env.raleigh.register_many([(u, PASSWORD) for u in users])

    async def scenario():
        async with ClientHub(watch=[env.link]) as hub:
            alice = await hub.connect(f"alice@{FAIRFAX}", PASSWORD, env.fairfax.c2s_port)
            await alice.join(ROOM, "alice")
            clients = [await hub.connect(f"{u}@{RALEIGH}", PASSWORD, env.raleigh.c2s_port) for u in users]
            # Eight joins at once: three take the burst, one more a second refills; the rest
            # (at least one, unless the link took five seconds) are refused.
            for c, u in zip(clients, users):
                c.xmpp.send_raw(f"<presence to='{ROOM}/{u}' id='lim-{u}'>"
                                "<x xmlns='http://jabber.org/protocol/muc'/></presence>")

            def answer(c, u):
                own = [r for r in c.presences(from_=f"{ROOM}/{u}") if r.type == "error" or 110 in r.status_codes()]
                return own[0] if own else None
            await hub.wait_for(lambda: all(answer(c, u) for c, u in zip(clients, users)), 30, "every join answered")
            answers = [answer(c, u) for c, u in zip(clients, users)]
            refused = [a for a in answers if a.type == "error"]
            assert refused, "no join refused"
            assert len(refused) <= len(users) - 3, [a.raw for a in answers]
            assert all(condition(a) == ["resource-constraint"] for a in refused), [a.raw for a in refused]
            joined = {u for u, a in zip(users, answers) if a.type != "error"}
            await hub.wait_for(lambda: joined <= alice.occupants(ROOM), 15, "alice sees every accepted join")
            assert not (alice.occupants(ROOM) & (set(users) - joined)), alice.occupants(ROOM)

    run(scenario(), timeout=120)


@pytest.mark.parametrize("master, mirror", PAIRINGS)
def test_rooms_per_mirror_at_a_master(make_mixed_servers, master, mirror):
    env = pair(make_mixed_servers, master, mirror, master_opts={"max_rooms_per_mirror": 2})
    env.fairfax.register("alice", PASSWORD)
    env.raleigh.register("bob", PASSWORD)
    rooms = [f"limits{i}@{CONFERENCE}" for i in range(3)]

    async def scenario():
        async with ClientHub(watch=[env.link]) as hub:
            alice = await hub.connect(f"alice@{FAIRFAX}", PASSWORD, env.fairfax.c2s_port)
            for r in rooms:
                await alice.join(r, "alice")
            bob = await hub.connect(f"bob@{RALEIGH}", PASSWORD, env.raleigh.c2s_port)
            await bob.join(rooms[0], "bob", timeout=20)
            await bob.join(rooms[1], "bob", timeout=20)
            start = len(bob.received)
            bob.xmpp.send_raw(f"<presence to='{rooms[2]}/bob' id='lim-third'>"
                              "<x xmlns='http://jabber.org/protocol/muc'/></presence>")
            await hub.wait_for(lambda: any(r.id == "lim-third" for r in bob.received[start:]), 20,
                               "the third room's join answered")
            answer = [r for r in bob.received[start:] if r.id == "lim-third"][0]
            assert answer.type == "error" and condition(answer) == ["resource-constraint"], answer.raw
            assert "bob" not in alice.occupants(rooms[2])
            # The rooms it is in go on.
            alice.send_groupchat(rooms[1], "still here", id="lim-r1")
            await hub.wait_for(lambda: bob.groupchat(rooms[1], "still here"), 15, "room 1 still works")
            # Once the mirror has no one left in a room, another room may take it.
            bob.xmpp.send_raw(f"<presence to='{rooms[0]}/bob' type='unavailable'/>")
            await hub.wait_for(lambda: "bob" not in alice.occupants(rooms[0]), 15,
                               "bob left room 0")
            await bob.join(rooms[2], "bob", timeout=20)
            await hub.wait_for(lambda: "bob" in alice.occupants(rooms[2]), 15,
                               "alice sees bob in room 2")

    run(scenario(), timeout=150)
