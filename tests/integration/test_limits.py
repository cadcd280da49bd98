"""Limits, on real servers (issue 11; docs/security.md, "Limits"): a join past one gets
`resource-constraint`, never silence, and the room keeps working for everyone else.

- A mirror with `max_local_occupants` 2: the third local user's join is refused at the mirror
  (nothing crosses the link for it). Every pairing.
- A Prosody master with a join burst of 3 through one mirror: the fourth quick join is refused,
  through the mirror, to that user only.
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


def pair(make_mixed_servers, master, mirror, master_opts=(), mirror_opts=None):
    for path in (os.path.join(PROSODY_DIST, "dmuc_prosody.so"), os.path.join(EJABBERD_DIST, "priv", "dmuc_nif.so")):
        if not os.path.exists(path):
            raise AssertionError(f"{path} missing: run `make dist` first")
    mirror_opts = dict(mirror_opts or {})
    kw = dict(master=master, mirror=mirror, plugin_paths=[PROSODY_DIST],
              contrib_modules={"mod_dmuc": EJABBERD_DIST})
    if master == "ejabberd":
        kw["master_modules"] = {"mod_dmuc": {"trusted_mirrors": [MIRROR]}}
    else:
        kw["conference_options"] = ['modules_enabled = { "dmuc" }', f'dmuc_trusted_mirrors = {{ "{MIRROR}" }}',
                                    *master_opts]
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


@pytest.mark.parametrize("mirror", ["prosody", "ejabberd"])
def test_join_burst_per_mirror_at_a_prosody_master(make_mixed_servers, mirror):
    env = pair(make_mixed_servers, "prosody", mirror,
               master_opts=["dmuc_mirror_join_rate = 1", "dmuc_mirror_join_burst = 3"])
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
            for c, u, a in zip(clients, users, answers):
                assert (f"{ROOM}/{u}" in alice.occupants(ROOM)) == (a.type != "error") or a.type != "error"

    run(scenario(), timeout=120)
