"""Refusals in the server's log (issue 11, "Logs"; docs/security.md, "Logs"): at warn, at most
one line per peer a minute, and under the host that refused.

- A flood of 20 over-deep stanzas from one outsider to a room: every one is answered with
  `policy-violation`, and the master's log has one warning for that peer, not twenty. Both hosts
  as the master.
- One Prosody serving a mirror (`mirror.raleigh.localhost`) and a room service with dmuc
  (`conference.raleigh.localhost`): each engine's warning is logged under its own host. (Before,
  every engine's lines went to the logger of whichever host loaded mod_dmuc last.)
"""

import re

import pytest

from clients import ClientHub, run
from servers import FAIRFAX, RALEIGH
from test_bounds import EVIL, PASSWORD, ROOM, bomb, bomb_pair, nest, register_evil, room_works

FLOOD = 20
# Past the default depth limit (64), far under any stream limit.
LEVELS = 100


def deep_join(to, sid):
    return (f"<presence to='{to}' id='{sid}'><x xmlns='http://jabber.org/protocol/muc'/>"
            f"{nest(LEVELS)}</presence>")


@pytest.mark.parametrize("master", ["prosody", "ejabberd"])
def test_a_flood_of_refusals_costs_one_line_per_peer(make_mixed_servers, master):
    env = bomb_pair(make_mixed_servers, master, "prosody", big_streams=False)
    env.fairfax.register_many([("alice", PASSWORD)])
    env.raleigh.register_many([("wayne", PASSWORD)])
    register_evil(env, "mallory")

    async def scenario():
        async with ClientHub(watch=[env.link]) as hub:
            alice = await hub.connect(f"alice@{FAIRFAX}", PASSWORD, env.fairfax.c2s_port)
            await alice.join(ROOM, "Alice")
            wayne = await hub.connect(f"wayne@{RALEIGH}", PASSWORD, env.raleigh.c2s_port)
            await wayne.join(ROOM, "Wayne", history=None, timeout=20)
            mallory = await hub.connect(f"mallory@{EVIL}", PASSWORD, env.raleigh.c2s_port)
            offset = env.fairfax.log_offset()
            for i in range(FLOOD):
                assert await bomb(hub, mallory, deep_join(f"{ROOM}/Mallory", f"f{i}"), f"f{i}", "presence") \
                    == ("modify", ["policy-violation"]), i
            # The first refusal is logged (the log is written asynchronously: wait for it).
            await env.fairfax.wait_for_log_async(rf"(warn|warning).*refused.*{re.escape(EVIL)}", 15, since=offset)
            # The room goes on; by then every refusal's line, if any, would be written.
            await room_works(hub, alice, wayne)
            text = env.fairfax._log_since(offset)
            lines = [l for l in text.splitlines()
                     if re.search(r"(warn|warning)", l) and "refused" in l and EVIL in l]
            assert len(lines) == 1, "\n".join(lines)

    run(scenario(), timeout=180)
    assert env.fairfax.running


def test_each_engine_logs_under_its_own_host(make_two_servers):
    from test_dmuc_ejabberd import PROSODY_DIST
    mirror, users_muc = f"mirror.{RALEIGH}", f"conference.{RALEIGH}"
    env = make_two_servers(
        plugin_paths=[PROSODY_DIST],
        raleigh_modules=["dmuc"],
        conference_options=['modules_enabled = { "dmuc" }', f'dmuc_trusted_mirrors = {{ "{mirror}" }}'],
        raleigh_blocks=[
            f'Component "{mirror}" "dmuc"\n    dmuc_masters = {{ "conference.{FAIRFAX}" }}\n'
            '    dmuc_ping_interval = 3600\n    dmuc_max_local_occupants = 1',
            # A room service of the mirror's server with dmuc in the master role, loaded after
            # the mirror: the old shared logger took its host.
            f'Component "{users_muc}" "muc"\n    muc_room_locking = false\n'
            '    modules_enabled = { "dmuc" }\n    dmuc_trusted_mirrors = { "mirror.elsewhere.localhost" }',
        ])
    env.fairfax.register("alice", PASSWORD)
    env.raleigh.register_many([("bob", PASSWORD), ("carol", PASSWORD)])

    def logged_under(host, text, since):
        # Prosody's log line: "<date> <host>:dmuc<TAB>warn<TAB><message>".
        pattern = rf"^\S+ \S+ \S+ (\S+)\twarn\t.*{re.escape(text)}"
        hits = [m.group(1) for m in re.finditer(pattern, env.raleigh._log_since(since), re.M)]
        return hits

    async def scenario():
        async with ClientHub(watch=[env.link]) as hub:
            alice = await hub.connect(f"alice@{FAIRFAX}", PASSWORD, env.fairfax.c2s_port)
            await alice.join(ROOM, "alice")
            bob = await hub.connect(f"bob@{RALEIGH}", PASSWORD, env.raleigh.c2s_port)
            carol = await hub.connect(f"carol@{RALEIGH}", PASSWORD, env.raleigh.c2s_port)
            await bob.join(ROOM, "bob", timeout=20)
            offset = env.raleigh.log_offset()
            # The mirror refuses a second local occupant (its engine warns).
            carol.xmpp.send_raw(f"<presence to='{ROOM}/carol' id='over'><x xmlns='http://jabber.org/protocol/muc'/></presence>")
            await hub.wait_for(lambda: any(r.id == "over" and r.type == "error" for r in carol.received), 20,
                               "carol's join refused")
            await env.raleigh.wait_for_log_async(r"a local join refused", 15, since=offset)
            assert logged_under(mirror, "a local join refused", offset) == [f"{mirror}:dmuc"]
            # The room service's master engine refuses a join through a mirror it does not trust.
            carol.xmpp.send_raw(f"<presence to='r@{users_muc}/carol' id='untrusted'>"
                                "<x xmlns='http://jabber.org/protocol/muc'/>"
                                f"<dmuc xmlns='http://tridsys.com/protocol/dmuc' from='{mirror}'/></presence>")
            await hub.wait_for(lambda: any(r.id == "untrusted" and r.type == "error" for r in carol.received), 20,
                               "the untrusted mirror's join refused")
            await env.raleigh.wait_for_log_async(r"untrusted mirror refused", 15, since=offset)
            assert logged_under(users_muc, "untrusted mirror refused", offset) == [f"{users_muc}:dmuc"]

    run(scenario(), timeout=120)
