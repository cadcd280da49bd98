"""Link health at the default settings (issue 12): what an admin who keeps the defaults gets.

No timer is shortened here: the mirror pings after 300 s of quiet and gives a ping 20 s, the
master evicts a mirror it has heard nothing from for 360 s. An s2s reset (every connection
aborted, new ones refused) must still be seen on both sides within 10 s: the mirror through its own server's s2s events and bounces, the
master by probing the mirror when its s2s sessions close (an unanswered probe evicts the
mirror's users after 5 s). When the link comes back, the mirror's probes (1 s after the loss,
then doubling) find it, and at once when a local user speaks: then within 5 s the queue is
delivered and both sides show everyone again.

Each test runs in every pairing of Prosody and ejabberd, and prints the times it measured. The
slow one (ten idle minutes, an idle close, then a black hole found at the default timers) runs the
four pairings at once, so that CI waits for it once.
"""

import asyncio
import os
import subprocess
import time

import pytest

from clients import ClientHub, run
from servers import CONFERENCE, RALEIGH
from test_dmuc_link_loss import EJABBERD_DIST, MIRROR, PAIRINGS, PROSODY_DIST, ROOM, _register, _setup

DETECT = 10.0     # the bound for a reset, on both sides
RECOVER = 30.0    # deadline for everyone to be back after the link is (a failure message)
RESYNC = 5.0      # the bound, once the link carries traffic again


def default_env(make_mixed_servers, master: str, mirror: str):
    kw = dict(master=master, mirror=mirror, plugin_paths=[PROSODY_DIST],
              contrib_modules={"mod_dmuc": EJABBERD_DIST},
              global_modules=["admin_shell"])   # prosodyctl shell: the host's idle close
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
IDLE = float(os.environ.get("DMUC_IDLE_S", "600"))   # the ten idle minutes
INTERVAL, PING_TIMEOUT, LINK_TIMEOUT = 300, 20, 360   # the defaults
MIRROR_BOUND = INTERVAL + PING_TIMEOUT + 10   # quiet interval + ping timeout, from the last traffic
MASTER_BOUND = LINK_TIMEOUT + 10              # link timeout, from the last stanza of the mirror's


def host_idle_close(env) -> None:
    """The master's server closes its s2s streams with the mirror's server as on an idle timeout.
    Prosody has no idle timeout of its own: its admin shell's `s2s:closeall` closes each stream
    cleanly, as prosody-modules' mod_s2s_idle_timeout does. ejabberd's streams take their idle
    timeout (`s2s_timeout`) as a `timeout` message: sent one now, each closes with the
    `connection-timeout` stream error "Idle connection", as it would after an idle hour."""
    server = env.fairfax
    if hasattr(server, "rpc"):
        server.rpc("[P ! timeout || Sup <- [ejabberd_s2s_in_sup, ejabberd_s2s_out_sup], "
                   "{_, P, _, _} <- supervisor:which_children(Sup), is_pid(P)], ok")
        return
    for remote in (RALEIGH, MIRROR):
        out = subprocess.run(["prosodyctl", "--config", server.config_path, "shell", "s2s", "closeall", remote],
                             capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stdout + out.stderr


def _left(client, nick: str, since: float) -> bool:
    return any(p.type == "unavailable" and p.time >= since for p in client.presences(f"{ROOM}/{nick}"))


async def idle_then_close_then_black_hole(env, master: str, mirror: str, report: dict) -> None:
    async with ClientHub(watch=[env.link]) as hub:
        clients, everyone = await _setup(env, hub)
        alice, wayne = clients["Alice"], clients["Wayne"]
        # The joins' last answers settle: then nobody does anything for IDLE seconds.
        await asyncio.sleep(5)
        t0 = time.monotonic()
        bytes0 = env.link.bytes()
        await asyncio.sleep(IDLE)
        assert not _left(alice, "Wayne", t0) and not _left(wayne, "Alice", t0), "someone left an idle room"
        assert all(c.occupants(ROOM) == everyone for c in clients.values()), \
            "someone was shown leaving in an idle room: " + ", ".join(
                f"{n} sees {sorted(c.occupants(ROOM))}" for n, c in clients.items())
        idle = [s for s in env.link.stanzas() if s.time >= t0]
        idle_bytes = env.link.bytes() - bytes0
        pings = [s for s in idle if s.name == "iq" and "urn:xmpp:ping" in s.raw]
        others = [s for s in idle if not (s.name == "iq" and ("urn:xmpp:ping" in s.raw
                                                               or s.attrs.get("type") == "result"))]
        assert not others, f"only pings and their answers cross an idle link: {[s.raw for s in others]}"
        assert len(pings) <= IDLE / INTERVAL, f"{len(pings)} pings in {IDLE:.0f} s: {[s.raw for s in pings]}"
        report["idle"] = (len(pings), len(idle), idle_bytes)

        # The master's server closes the streams as on an idle timeout: its probe is answered over
        # new streams, and nobody is shown leaving, on either side.
        t1 = time.monotonic()
        await asyncio.to_thread(host_idle_close, env)
        def answered(prefix):
            return any(s.time >= t1 and s.attrs.get("type") == "result"
                       and s.attrs.get("id", "").startswith(prefix) for s in env.link.stanzas())
        # The master probes; the mirror, told of its closed sessions, pings: both are answered.
        await hub.wait_for(lambda: answered("dmuc-probe-") and answered("dmuc-ping-"), 30,
                           "the master's probe and the mirror's ping after the close are answered")
        # Streams close one by one, each may start a probe: past the probe timeout (5 s) of the
        # last, an unanswered one would have evicted the mirror's users.
        await asyncio.sleep(10)
        assert not _left(alice, "Wayne", t1) and not _left(wayne, "Alice", t1), "an idle close evicted someone"
        assert all(c.occupants(ROOM) == everyone for c in clients.values())
        report["close"] = len([s for s in env.link.stanzas() if s.time >= t1])

        # A silent black hole.
        t2 = time.monotonic()
        env.link.cut("blackhole")
        await hub.wait_for(lambda: "Alice" not in wayne.occupants(ROOM), MIRROR_BOUND,
                           f"the mirror finds the black hole (wayne sees {wayne.occupants(ROOM)})")
        mirror_saw = time.monotonic() - t2
        await hub.wait_for(lambda: alice.occupants(ROOM) == {"Alice"}, MASTER_BOUND,
                           f"the master finds it (alice sees {alice.occupants(ROOM)})")
        master_saw = time.monotonic() - t2
        env.link.restore()
        t3 = time.monotonic()
        wayne.send_groupchat(ROOM, "anyone back?")
        await hub.wait_for(lambda: all(c.occupants(ROOM) == everyone for c in clients.values())
                           and alice.groupchat(ROOM, "anyone back?"), RECOVER,
                           "everyone sees everyone again: "
                           + ", ".join(f"{n} sees {sorted(c.occupants(ROOM))}" for n, c in clients.items()))
        back = time.monotonic() - t3
        assert back <= RESYNC, f"resynced in {back:.1f} s: more than {RESYNC} s"
        report["black hole"] = (mirror_saw, master_saw, back)


def test_idle_link_idle_close_and_black_hole_at_the_defaults(make_mixed_servers):
    """Every pairing at once (one idle window for all): an idle room with mirror users costs at
    most a ping exchange per 5 minutes; a host's idle close of the s2s streams evicts nobody; a
    black hole is found by the mirror within ping_interval + ping_timeout and by the master
    within link_timeout; once a user speaks after it, everyone is back within 5 s."""
    envs = {}
    for master, mirror in PAIRINGS:
        env = default_env(make_mixed_servers, master, mirror)
        _register(env)
        envs[(master, mirror)] = env
    reports = {p: {} for p in PAIRINGS}

    async def everything():
        await asyncio.gather(*(idle_then_close_then_black_hole(env, m, r, reports[(m, r)])
                               for (m, r), env in envs.items()))

    try:
        run(everything(), timeout=IDLE + 60 + MIRROR_BOUND + MASTER_BOUND + RECOVER + 120)
    finally:
        for (m, r), rep in reports.items():
            line = f"\n{m}/{r} at the defaults:"
            if "idle" in rep:
                n, st, b = rep["idle"]
                line += f" {IDLE:.0f} s idle cost {n} ping(s), {st} stanza(s), {b} B on the wire;"
            if "close" in rep:
                line += f" an idle close by the master's server cost {rep['close']} stanza(s), evicted nobody;"
            if "black hole" in rep:
                a, b, c = rep["black hole"]
                line += f" black hole found by the mirror after {a:.0f} s, the master after {b:.0f} s, everyone back {c:.1f} s after the first message"
            print(line)
