"""Link health at the default settings (issue 12): what an admin who keeps the defaults gets.

No timer is shortened here: the mirror pings every 30 s and gives a ping 20 s, the master evicts a
silent mirror after 120 s. An s2s reset (every connection aborted, new ones refused) must still be
seen on both sides within 10 s: the mirror through its own server's s2s events and bounces, the
master by probing the mirror when its s2s sessions close (an unanswered probe evicts the
mirror's users after 5 s). When the link comes back, the mirror's probes (1 s after the loss,
then doubling) find it, and at once when a local user speaks: then within 5 s the queue is
delivered and both sides show everyone again.

Each test runs in every pairing of Prosody and ejabberd, and prints the times it measured.
"""

import time

import pytest

from clients import ClientHub, run
from servers import CONFERENCE
from test_dmuc_link_loss import EJABBERD_DIST, MIRROR, PAIRINGS, PROSODY_DIST, ROOM, _register, _setup

DETECT = 10.0     # the bound for a reset, on both sides
RECOVER = 30.0    # deadline for everyone to be back after the link is (a failure message)
RESYNC = 5.0      # the bound, once the link carries traffic again


def default_env(make_mixed_servers, master: str, mirror: str):
    kw = dict(master=master, mirror=mirror, plugin_paths=[PROSODY_DIST],
              contrib_modules={"mod_dmuc": EJABBERD_DIST})
    if master == "ejabberd":
        kw["master_modules"] = {"mod_dmuc": {"trusted_mirrors": [MIRROR]}}
    else:
        kw["conference_options"] = ['modules_enabled = { "dmuc" }', f'dmuc_trusted_mirrors = {{ "{MIRROR}" }}']
    if mirror == "ejabberd":
        kw["mirror_modules"] = {"mod_dmuc": {"mirror_host": MIRROR, "masters": [CONFERENCE]}}
    else:
        kw["mirror_modules"] = ["dmuc"]
        kw["mirror_blocks"] = [f'Component "{MIRROR}" "dmuc"\n    dmuc_masters = {{ "{CONFERENCE}" }}']
    return make_mixed_servers(**kw)


@pytest.mark.parametrize("master, mirror", PAIRINGS)
def test_a_reset_is_seen_on_both_sides_within_seconds(make_mixed_servers, master, mirror):
    env = default_env(make_mixed_servers, master, mirror)
    _register(env)

    async def scenario():
        async with ClientHub(watch=[env.link]) as hub:
            clients, everyone = await _setup(env, hub)
            alice, wayne = clients["Alice"], clients["Wayne"]
            t0 = time.monotonic()
            env.link.cut("reset")
            await hub.wait_for(lambda: alice.occupants(ROOM) == {"Alice"}, DETECT,
                               f"the master's side shows the mirror's users gone (alice sees {alice.occupants(ROOM)})")
            master_saw = time.monotonic() - t0
            await hub.wait_for(lambda: "Alice" not in wayne.occupants(ROOM), DETECT,
                               f"the mirror's side shows the master's users gone (wayne sees {wayne.occupants(ROOM)})")
            mirror_saw = time.monotonic() - t0
            # Both sides go on: what Wayne says now waits for the link.
            wayne.send_groupchat(ROOM, "said during the outage")
            await hub.wait_for(lambda: wayne.groupchat(ROOM, "said during the outage"), 10, "local echo")
            env.link.restore()
            t1 = time.monotonic()
            print(f"\nRESTORE at {time.strftime('%H:%M:%S')}")
            # The link carries traffic again: Wayne speaks. His message probes at once.
            wayne.send_groupchat(ROOM, "said after the restore")
            await hub.wait_for(lambda: all(c.occupants(ROOM) == everyone for c in clients.values()), RECOVER,
                               "everyone sees everyone again: "
                               + ", ".join(f"{n} sees {sorted(c.occupants(ROOM))}" for n, c in clients.items()))
            back = time.monotonic() - t1
            await hub.wait_for(lambda: alice.groupchat(ROOM, "said during the outage")
                               and alice.groupchat(ROOM, "said after the restore"), RECOVER,
                               "the queued message and the new one reach the master's side")
            delivered = time.monotonic() - t1
            assert [r.body for r in alice.groupchat(ROOM) if r.body.startswith("said ")] == \
                ["said during the outage", "said after the restore"], "each once, in order"
            assert back <= RESYNC and delivered <= RESYNC, \
                f"resynced in {back:.1f} s, delivered in {delivered:.1f} s: more than {RESYNC} s"
            print(f"\n{master}/{mirror} at the defaults: reset seen by the master's side after {master_saw:.1f} s, "
                  f"by the mirror's after {mirror_saw:.1f} s; after the restore everyone back in {back:.1f} s, "
                  f"the queued message delivered in {delivered:.1f} s")

    run(scenario(), timeout=DETECT * 2 + RECOVER * 2 + 60)


# A black hole at the defaults takes minutes to find on the master's side (the link timeout), so
# it runs in the two single-server pairings only; the mixed ones run it at fast timers
# (test_dmuc_link_loss.py).
MIRROR_BOUND = 30 + 20 + 5      # ping_interval + ping_timeout, plus a probe round's slack
MASTER_BOUND = 120 + 30         # link_timeout, plus the margin: the last ping may have been 30 s old


@pytest.mark.parametrize("master, mirror", [("prosody", "prosody"), ("ejabberd", "ejabberd")])
def test_a_black_hole_is_found_within_the_ping_bounds(make_mixed_servers, master, mirror):
    env = default_env(make_mixed_servers, master, mirror)
    _register(env)

    async def scenario():
        async with ClientHub(watch=[env.link]) as hub:
            clients, everyone = await _setup(env, hub)
            alice, wayne = clients["Alice"], clients["Wayne"]
            t0 = time.monotonic()
            env.link.cut("blackhole")
            await hub.wait_for(lambda: "Alice" not in wayne.occupants(ROOM), MIRROR_BOUND,
                               f"the mirror finds the black hole (wayne sees {wayne.occupants(ROOM)})")
            mirror_saw = time.monotonic() - t0
            await hub.wait_for(lambda: alice.occupants(ROOM) == {"Alice"}, MASTER_BOUND,
                               f"the master finds it (alice sees {alice.occupants(ROOM)})")
            master_saw = time.monotonic() - t0
            env.link.restore()
            t1 = time.monotonic()
            wayne.send_groupchat(ROOM, "anyone back?")
            await hub.wait_for(lambda: all(c.occupants(ROOM) == everyone for c in clients.values())
                               and alice.groupchat(ROOM, "anyone back?"), RECOVER,
                               "everyone sees everyone again: "
                               + ", ".join(f"{n} sees {sorted(c.occupants(ROOM))}" for n, c in clients.items()))
            back = time.monotonic() - t1
            assert back <= RESYNC, f"resynced in {back:.1f} s: more than {RESYNC} s"
            print(f"\n{master}/{mirror} at the defaults: black hole found by the mirror after {mirror_saw:.0f} s, "
                  f"by the master after {master_saw:.0f} s; after the restore everyone back in {back:.1f} s")

    run(scenario(), timeout=MIRROR_BOUND + MASTER_BOUND + RECOVER + 60)
