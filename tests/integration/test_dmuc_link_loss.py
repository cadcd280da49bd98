"""Link loss and recovery on real servers (issue: mirrors keep working, nothing is lost or
duplicated, presence heals).

A conversation runs at several messages per second from both sides while the s2s link between
the master (fairfax) and the mirror (raleigh) is cut again and again: by aborting every connection
and refusing new ones ("reset"), or by silently dropping every byte ("blackhole", found only by
the mirror's pings). After each recovery every user must have every message exactly once, in
per-sender order, and the presence lists on both sides must agree with the master's room.

Also: a mirror server restart while messages are queued, and a link that flaps every second.
Each test runs in every pairing of Prosody and ejabberd.
"""

import asyncio
import os
import random
import re
import subprocess
import time
from typing import Dict, List

import pytest

from clients import ClientHub, run
from servers import CONFERENCE, FAIRFAX, RALEIGH

ROOM = f"chatroom@{CONFERENCE}"
MIRROR = f"mirror.{RALEIGH}"
PASSWORD = "secret"
TOP = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
PROSODY_DIST = os.path.join(TOP, "dist", "prosody")
EJABBERD_DIST = os.path.join(TOP, "dist", "ejabberd", "mod_dmuc")

# Fast link health for tests: the mirror pings every second and gives up after two; the master
# evicts a mirror after four silent seconds. Room history holds far more than an outage's chat.
PING_INTERVAL, PING_TIMEOUT, LINK_TIMEOUT, HISTORY = 1, 2, 4, 1000
# Outage lengths (s) and how each is made. The issue asks for 10 outages of 5-30 s.
OUTAGES = [(5, "reset"), (8, "blackhole"), (12, "reset"), (6, "blackhole"), (30, "reset"),
           (5, "blackhole"), (10, "reset"), (7, "blackhole"), (15, "reset"), (5, "blackhole")]
RATE = 0.4          # seconds between two messages of one sender (2.5 msg/s each, 5 msg/s in all)
CONVERGE = 60.0     # deadline for convergence after the link returns

PAIRINGS = [("prosody", "prosody"), ("ejabberd", "ejabberd"), ("ejabberd", "prosody"), ("prosody", "ejabberd")]


def link_loss_env(make_mixed_servers, master: str, mirror: str):
    for path in (os.path.join(PROSODY_DIST, "dmuc_prosody.so"), os.path.join(EJABBERD_DIST, "priv", "dmuc_nif.so")):
        if not os.path.exists(path):
            raise AssertionError(f"{path} missing: run `make dist` first")
    kw = dict(master=master, mirror=mirror, plugin_paths=[PROSODY_DIST],
              contrib_modules={"mod_dmuc": EJABBERD_DIST},
              global_modules=["admin_shell"])   # prosodyctl shell: dmuc:status()
    if master == "ejabberd":
        kw["master_modules"] = {"mod_dmuc": {"trusted_mirrors": [MIRROR], "link_timeout": LINK_TIMEOUT}}
        kw["conference_options"] = {"history_size": HISTORY}
    else:
        kw["conference_options"] = ['modules_enabled = { "dmuc" }', f'dmuc_trusted_mirrors = {{ "{MIRROR}" }}',
                                    f"dmuc_link_timeout = {LINK_TIMEOUT}",
                                    f"max_history_messages = {HISTORY}",
                                    f"muc_room_default_history_length = {HISTORY}"]
    if mirror == "ejabberd":
        kw["mirror_modules"] = {"mod_dmuc": {"mirror_host": MIRROR, "masters": [CONFERENCE],
                                             "ping_interval": PING_INTERVAL, "ping_timeout": PING_TIMEOUT}}
    else:
        kw["mirror_modules"] = ["dmuc"]
        kw["mirror_blocks"] = ["\n".join([
            f'Component "{MIRROR}" "dmuc"',
            f'    dmuc_masters = {{ "{CONFERENCE}" }}',
            f"    dmuc_ping_interval = {PING_INTERVAL}",
            f"    dmuc_ping_timeout = {PING_TIMEOUT}",
        ])]
    return make_mixed_servers(**kw)


def dmuc_status(server) -> str:
    """What an admin sees: `prosodyctl shell dmuc status`, or `ejabberdctl dmuc_status`."""
    if hasattr(server, "rpc"):
        return server.rpc("mod_dmuc:dmuc_status()")
    out = subprocess.run(["prosodyctl", "--config", server.config_path, "shell", "dmuc", "status"],
                         capture_output=True, text=True, timeout=30)
    return out.stdout + out.stderr


class Conversation:
    """Senders on both sides, each saying numbered lines at a steady rate; checks of what every
    client got."""

    def __init__(self, hub: ClientHub, clients: Dict[str, object], senders: List[str]):
        self.hub = hub
        self.clients = clients          # nick -> Client
        self.senders = senders
        self.sent: Dict[str, List[str]] = {n: [] for n in senders}
        self.refused: List[str] = []
        self._tasks: List[asyncio.Task] = []
        self._running = False

    def say(self, nick: str) -> str:
        body = f"{nick}#{len(self.sent[nick]):04d}"
        self.clients[nick].send_groupchat(ROOM, body)
        self.sent[nick].append(body)
        return body

    async def _speak(self, nick: str) -> None:
        # Offsets, so that the senders do not tick in lockstep.
        await asyncio.sleep(RATE * self.senders.index(nick) / len(self.senders))
        while self._running:
            self.say(nick)
            await asyncio.sleep(RATE)

    def start(self) -> None:
        self._running = True
        self._tasks = [asyncio.ensure_future(self._speak(n)) for n in self.senders]

    async def stop(self) -> None:
        self._running = False
        await asyncio.gather(*self._tasks)
        self._tasks = []

    def bodies(self, nick: str) -> List[str]:
        return [r.body for r in self.clients[nick].groupchat(ROOM) if "#" in r.body]

    def errors(self, nick: str) -> List[str]:
        return [r.raw for r in self.clients[nick].messages(type="error")]

    def missing(self, upto: Dict[str, int]) -> Dict[str, List[str]]:
        """Per receiver: the messages among the first `upto[sender]` of each sender it lacks."""
        out = {}
        for nick in self.clients:
            got = set(self.bodies(nick))
            lacking = [b for s in self.senders for b in self.sent[s][:upto[s]] if b not in got]
            if lacking:
                out[nick] = lacking
        return out

    def check_exactly_once_in_order(self) -> None:
        for nick in self.clients:
            got = self.bodies(nick)
            dup = sorted({b for b in got if got.count(b) > 1})
            assert not dup, f"{nick} got these more than once: {dup}"
            for s in self.senders:
                mine = [b for b in got if b.startswith(s + "#")]
                assert mine == sorted(mine), f"{nick} got {s}'s messages out of order: {mine}"
            errs = self.errors(nick)
            assert not errs, f"{nick} got errors: {errs[:3]}"

    async def converge(self, what: str, everyone: set) -> float:
        """Wait until everyone has everything sent so far and sees `everyone`; return seconds."""
        t0 = time.monotonic()
        upto = {s: len(self.sent[s]) for s in self.senders}

        def done():
            if self.missing(upto):
                return False
            return all(c.occupants(ROOM) == everyone for c in self.clients.values())
        try:
            await self.hub.wait_for(done, CONVERGE, what)
        except Exception:
            views = {n: sorted(c.occupants(ROOM)) for n, c in self.clients.items()}
            missing = {n: m[:5] + [f"... {len(m)} in all"] for n, m in self.missing(upto).items()}
            raise AssertionError(f"{what}: no convergence in {CONVERGE}s; missing {missing}; views {views}")
        return time.monotonic() - t0


async def _setup(env, hub):
    alice = await hub.connect(f"alice@{FAIRFAX}", PASSWORD, env.fairfax.c2s_port)
    await alice.join(ROOM, "Alice")
    wayne = await hub.connect(f"wayne@{RALEIGH}", PASSWORD, env.raleigh.c2s_port)
    await wayne.join(ROOM, "Wayne", history=None, timeout=20)
    keith = await hub.connect(f"keith@{RALEIGH}", PASSWORD, env.raleigh.c2s_port)
    await keith.join(ROOM, "Keith", history=None, timeout=20)
    everyone = {"Alice", "Wayne", "Keith"}
    await hub.wait_for(lambda: all(c.occupants(ROOM) == everyone for c in (alice, wayne, keith)), 20,
                       "everyone sees everyone")
    return {"Alice": alice, "Wayne": wayne, "Keith": keith}, everyone


def _register(env):
    env.fairfax.register("alice", PASSWORD)
    env.raleigh.register_many([("wayne", PASSWORD), ("keith", PASSWORD)])


@pytest.mark.parametrize("master, mirror", PAIRINGS)
def test_ten_outages_during_a_conversation(make_mixed_servers, master, mirror):
    env = link_loss_env(make_mixed_servers, master, mirror)
    _register(env)
    report = []

    async def scenario():
        async with ClientHub(watch=[env.link]) as hub:
            clients, everyone = await _setup(env, hub)
            talk = Conversation(hub, clients, ["Alice", "Wayne"])
            talk.start()
            try:
                await asyncio.sleep(2)
                for i, (seconds, mode) in enumerate(OUTAGES):
                    env.link.cut(mode)
                    await asyncio.sleep(seconds)
                    env.link.restore()
                    took = await talk.converge(f"outage {i + 1} ({seconds}s, {mode})", everyone)
                    report.append((seconds, mode, took))
                    talk.check_exactly_once_in_order()
            finally:
                await talk.stop()
            await talk.converge("the end", everyone)
            talk.check_exactly_once_in_order()
            # The admin's view: the link is up, nothing waits, and every outage was counted.
            # A ping written into a connection that died with the last blackhole may still be lost
            # (the link then blips down and back): wait for the settled state, with a deadline.
            pattern = re.compile(r"master conference\.fairfax\.localhost up, 1 room\(s\), 0 queued, \d+ in flight, "
                                 r"last pong \d+s ago, last resync \d+s ago, (\d+) outage")
            deadline = time.monotonic() + 30
            while True:
                mirror_status = await asyncio.to_thread(dmuc_status, env.raleigh)
                m = pattern.search(mirror_status)
                if m or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.5)  # poll interval; the deadline bounds the wait
            assert m and int(m.group(1)) >= len(OUTAGES), mirror_status
            master_status = await asyncio.to_thread(dmuc_status, env.fairfax)
            assert re.search(r"mirror mirror\.raleigh\.localhost up", master_status), master_status
            sent = sum(len(v) for v in talk.sent.values())
            print(f"\n{master} master, {mirror} mirror: {len(OUTAGES)} outages survived, {sent} messages sent, "
                  f"0 lost, 0 duplicated; seconds to converge after each: "
                  + ", ".join(f"{s}s {m}: {t:.1f}" for s, m, t in report))
            print(f"mirror status: {mirror_status.strip()}\nmaster status: {master_status.strip()}")

    run(scenario(), timeout=sum(s for s, _ in OUTAGES) + len(OUTAGES) * (CONVERGE + 5) + 120)


@pytest.mark.parametrize("master, mirror", PAIRINGS)
def test_flapping_link_converges(make_mixed_servers, master, mirror):
    env = link_loss_env(make_mixed_servers, master, mirror)
    _register(env)

    async def scenario():
        async with ClientHub(watch=[env.link]) as hub:
            clients, everyone = await _setup(env, hub)
            talk = Conversation(hub, clients, ["Alice", "Wayne"])
            talk.start()
            try:
                rng = random.Random(5)
                deadline = time.monotonic() + 20
                while time.monotonic() < deadline:
                    env.link.cut(rng.choice(["reset", "blackhole"]))
                    await asyncio.sleep(1)
                    env.link.restore()
                    await asyncio.sleep(1)
            finally:
                await talk.stop()
            took = await talk.converge("after flapping", everyone)
            talk.check_exactly_once_in_order()
            print(f"\n{master}/{mirror}: flapping 20 s, {sum(len(v) for v in talk.sent.values())} messages, "
                  f"converged {took:.1f}s after the link settled")

    run(scenario(), timeout=20 + CONVERGE + 120)


@pytest.mark.parametrize("master, mirror", PAIRINGS)
def test_mirror_restart_with_queued_messages(make_mixed_servers, master, mirror):
    env = link_loss_env(make_mixed_servers, master, mirror)
    _register(env)

    async def scenario():
        async with ClientHub(watch=[env.link]) as hub:
            clients, everyone = await _setup(env, hub)
            alice, wayne = clients["Alice"], clients["Wayne"]
            env.link.cut("reset")
            # The mirror finds out, shows the master's side gone, and queues what Wayne says.
            await hub.wait_for(lambda: "Alice" not in wayne.occupants(ROOM), 20, "wayne sees the link loss")
            queued = [f"queued {i}" for i in range(5)]
            for b in queued:
                wayne.send_groupchat(ROOM, b)
            await hub.wait_for(lambda: all(wayne.groupchat(ROOM, b) for b in queued), 10, "local echo")
            # The mirror's server restarts with the messages queued (the link still down).
            env.raleigh.restart()
            env.link.restore()
            await hub.wait_for(lambda: all(alice.groupchat(ROOM, b) for b in queued), CONVERGE,
                               "the queued messages reach the master's side")
            got = [r.body for r in alice.groupchat(ROOM) if r.body.startswith("queued ")]
            assert got == queued, f"each once, in order: {got}"
            for r in alice.groupchat(ROOM):
                if r.body.startswith("queued "):
                    assert "urn:xmpp:delay" in r.raw, f"sent late, with its original time: {r.raw}"
            await hub.wait_for(lambda: alice.occupants(ROOM) == {"Alice"}, 20,
                               f"the restarted mirror's users are gone from the room (alice sees {alice.occupants(ROOM)})")

    run(scenario(), timeout=CONVERGE + 180)
