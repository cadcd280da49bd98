"""`make bench`: dmuc against plain MUC on real Prosody servers, over an emulated constrained link.

The same scripted workload runs twice, once with mod_dmuc (a master on fairfax, a mirror on each
remote server) and once with Prosody's stock MUC, through the counting proxies of
tests/harness. What crosses the s2s link is counted stanza by stanza; what users experience is
timed at real slixmpp clients. Run from the repository root with Debian's Python:

    /usr/bin/python3 benches/prosody/bench.py [--quick] [--engine target/bench/fanout.txt]

Writes target/bench/results.json, target/bench/results.md (the table) and target/bench/bench.png
(the plot), and prints the table. Figures from this noisy 2-core machine are shown as ratios
measured in one run. The benchmark asserts nothing about time; it exits non-zero if any
message was lost or delivered twice, or if any wait ran out (every wait has a deadline).

Phases, for each mode (dmuc, then plain):
  1. four servers (fairfax and three remote servers: raleigh, durham, norfolk, each with a mirror
     in dmuc mode): the time a join through durham takes over 600 ms RTT (the first one, with new
     s2s sessions; the second; the first again once the mirror has left the room), and the counts
     for 3 mirrors with 5 occupants each. Then every remote user leaves, and the link is watched
     for 60 s while nobody speaks, in the background while the next phases run on other servers.
  2. fairfax + raleigh: a room on fairfax with one local occupant (alice) and 20 messages of
     history; remote occupants join from raleigh one by one up to K = 100. At K = 1, 5, 20, 100:
     stanzas and bytes for the K-th remote join, a groupchat message and a presence change from
     each side. The second remote join asks for the default history (20 messages).
  3. at K = 20: latency over 600 ms RTT (local echo, delivery, a join); the message rate a
     9.6 kbit/s link sustains with no backlog. After K = 100, back to K = 20.
After both modes: Prosody CPU per message (fairfax, raleigh) in the K = 20 room and in a room with
local occupants only, in rounds that alternate between the two modes' servers; then every
remote occupant leaves, and a message with nobody remote is counted. Last, a flood of 2,000
messages from one user: the mirror's server's CPU against a plain MUC server's hosting the same
room for the same users (benches/prosody/flood.py).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import datetime
import json
import logging
import math
import os
import re
import platform
import shutil
import statistics
import subprocess
import sys
import time
import traceback
import uuid
import xml.etree.ElementTree as ET
from typing import Any, Callable, Dict, List, Optional, Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(ROOT, "tests", "harness"))

from clients import ClientHub, WaitTimeout  # noqa: E402
from servers import CONFERENCE, FAIRFAX, RALEIGH, ServerSpec, federation  # noqa: E402

import plot  # noqa: E402  (benches/prosody/plot.py)
from flood import flood  # noqa: E402  (benches/prosody/flood.py)
from link_health import link_health  # noqa: E402  (benches/prosody/link_health.py)

# DMUC_BENCH_DIST: measure another build of the Prosody module (a before/after comparison).
DIST = os.environ.get("DMUC_BENCH_DIST", os.path.join(ROOT, "dist", "prosody"))
OUT = os.path.join(ROOT, "target", "bench")
PASSWORD = "secret"
ROOM = f"chatroom@{CONFERENCE}"
LOCAL_ROOM = f"local@{CONFERENCE}"
DURHAM, NORFOLK = "durham.localhost", "norfolk.localhost"
MODES = ("dmuc", "plain")
BARRIER = "BARRIER"          # bodies of barrier messages; stanzas carrying it are not counted

CLIENT_NS = "{jabber:client}"
MUC_USER_X = "{http://jabber.org/protocol/muc#user}x"
DELAY = "{urn:xmpp:delay}delay"


class Config:
    """Workload sizes. --quick shrinks them for a smoke run (not for published figures)."""

    def __init__(self, quick: bool):
        self.quick = quick
        self.sweep = [1, 5, 20] if quick else [1, 5, 20, 100]
        self.k_max = self.sweep[-1]
        self.k_mid = 20                      # K for CPU, latency and rate phases
        self.history = 20                    # messages of history in the room before joins
        self.idle_seconds = 10 if quick else 60
        self.mirrors3_per_server = 5
        self.join_batch = 20                 # concurrent joins per batch
        self.cpu_local_messages = 300 if quick else 2000
        self.cpu_local_occupants = 5
        self.cpu_rounds = 3 if quick else 8
        self.cpu_mixed_messages = 90 if quick else 320
        self.latency_samples = 20 if quick else 50
        self.latency_interval = 0.2          # s between latency probes (pacing)
        self.join_samples = 3 if quick else 5
        self.rtt = 0.6                       # emulated round trip (s)
        self.link_bps = 9600                 # emulated link rate (bit/s per direction)
        # Offered rates, as fractions of the rate the link would carry if it carried nothing but
        # the probe message's bytes; up until a step falls behind, or down if the first does.
        self.rate_ladder = [1.0, 1.15, 1.3, 1.5, 1.75, 2.0]
        self.rate_ladder_down = [0.85, 0.7, 0.5, 0.35, 0.25]
        self.rate_min_messages = 4           # per step
        self.rate_step_seconds = 8.0         # per step, when the rate allows more messages
        self.rate_max_messages = 16
        self.backlog_tolerance = 0.25        # of one message's transmission time


class BenchFailure(Exception):
    """A message was lost or duplicated, or a wait ran out: the run is invalid."""


def body_text(tag: str) -> str:
    """A groupchat body of fixed length (the counts depend on it): a unique tag and a sentence."""
    return f"{tag}-{uuid.uuid4().hex[:10]} Status from the field: all stations nominal, next check 10 min."


# ---------------------------------------------------------------------------------------------
# Clients: a cheap index of what each one received (the hub's predicates run on every stanza)
# ---------------------------------------------------------------------------------------------

class Track:
    """One client, with indexes kept up to date as stanzas arrive (slixmpp 'in' filter)."""

    def __init__(self, client, nick: str):
        self.client = client
        self.nick = nick
        self.first: Dict[str, float] = {}                       # groupchat body -> first receipt
        self.count: collections.Counter = collections.Counter()  # groupchat body -> receipts
        self.present: Dict[str, set] = collections.defaultdict(set)  # room -> nicks present
        self.joined: set = set()                                # rooms whose 110 arrived
        self.subject: set = set()                               # rooms whose subject arrived
        self.subject_at: Dict[str, float] = {}                  # room -> when the subject arrived
        self.history: collections.Counter = collections.Counter()  # room -> delayed messages
        self.status: Dict[tuple, str] = {}                      # (room, nick) -> status text
        self.errors: List[str] = []
        client.xmpp.add_filter("in", self._in)

    def _in(self, stanza):
        xml = stanza.xml
        tag = xml.tag.rpartition("}")[2]
        room, _, nick = xml.get("from", "").partition("/")
        typ = xml.get("type", "")
        now = time.monotonic()
        if tag == "message":
            if typ == "groupchat":
                body = xml.find(CLIENT_NS + "body")
                if body is not None and body.text:
                    self.count[body.text] += 1
                    self.first.setdefault(body.text, now)
                    if xml.find(DELAY) is not None:
                        self.history[room] += 1
                elif xml.find(CLIENT_NS + "subject") is not None:
                    self.subject.add(room)
                    self.subject_at[room] = now
            elif typ == "error":
                self.errors.append(str(stanza))
        elif tag == "presence" and nick:
            if typ == "error":
                self.errors.append(str(stanza))
            elif typ == "unavailable":
                self.present[room].discard(nick)
                if nick == self.nick:  # we left: we hear nothing more from this room
                    self.joined.discard(room)
                    self.present[room].clear()
            elif typ == "":
                self.present[room].add(nick)
                status = xml.find(CLIENT_NS + "status")
                self.status[(room, nick)] = (status.text or "") if status is not None else ""
                x = xml.find(MUC_USER_X)
                if x is not None and any(s.get("code") == "110" for s in x.findall(MUC_USER_X[:-1] + "status")):
                    self.joined.add(room)
        return stanza

    def send_join(self, room: str, history: Optional[int] = 0) -> None:
        self.joined.discard(room)
        self.subject.discard(room)
        self.history[room] = 0
        pres = self.client.xmpp.make_presence(pto=f"{room}/{self.nick}")
        pres.enable("muc_join")
        if history is not None:
            pres["muc_join"]["history"]["maxstanzas"] = str(history)
        pres.send()

    def send_leave(self, room: str) -> None:
        self.client.xmpp.send_presence(pto=f"{room}/{self.nick}", ptype="unavailable")

    def say(self, room: str, body: str) -> float:
        t = time.monotonic()
        self.client.send_groupchat(room, body)
        return t

    def __repr__(self) -> str:
        return f"<Track {self.client.jid} as {self.nick}>"


# ---------------------------------------------------------------------------------------------
# Servers
# ---------------------------------------------------------------------------------------------

def lua_list(values: Sequence[str]) -> str:
    return "{ " + "; ".join(f'"{v}"' for v in values) + " }"


def specs(mode: str, remotes: Sequence[str]) -> List[ServerSpec]:
    """fairfax with the room's MUC service; each remote server with a mirror in dmuc mode."""
    conference = [f'Component "{CONFERENCE}" "muc"', "    muc_room_locking = false"]
    if mode == "dmuc":
        conference += ['    modules_enabled = { "dmuc" }',
                       f"    dmuc_trusted_mirrors = {lua_list(['mirror.' + d for d in remotes])}"]
    out = [ServerSpec(FAIRFAX, blocks=["\n".join(conference)])]
    for d in remotes:
        if mode == "dmuc":
            out.append(ServerSpec(d, host_modules=["dmuc"],
                                  blocks=[f'Component "mirror.{d}" "dmuc"\n    dmuc_masters = {{ "{CONFERENCE}" }}']))
        else:
            out.append(ServerSpec(d))
    return out


@contextlib.asynccontextmanager
async def started(label: str, remotes: Sequence[str], accounts: Dict[str, List[str]],
                  log: Callable[[str], None] = lambda _: None, mode: Optional[str] = None):
    """A federation in `mode` (default: `label`), users registered; started and stopped off the
    event loop."""
    mode = mode or label
    cm = federation(specs(mode, remotes), plugin_paths=[DIST] if mode == "dmuc" else [],
                    log_level=os.environ.get("DMUC_BENCH_LOG", "info"))
    fed = await asyncio.to_thread(cm.__enter__)
    try:
        log(f"[{label}] {len(remotes) + 1} servers up")
        await asyncio.gather(*(asyncio.to_thread(fed.server(d).register_many, [(u, PASSWORD) for u in users], 120)
                               for d, users in accounts.items()))
        log(f"[{label}] {sum(len(u) for u in accounts.values())} accounts registered")
        yield fed
    except BaseException:
        fed.keep = True  # keep the logs of a failed run
        print(f"  servers' temp dirs kept: {', '.join(s.dir for s in fed.servers)}", flush=True)
        await asyncio.to_thread(cm.__exit__, *sys.exc_info())
        raise
    else:
        await asyncio.to_thread(cm.__exit__, None, None, None)


# ---------------------------------------------------------------------------------------------
# Counting
# ---------------------------------------------------------------------------------------------

def describe(s) -> str:
    """One counted stanza, for the report: kind, type, addresses, children, size."""
    children = []
    try:
        el = ET.fromstring(s.raw)
        for c in el:
            ns, _, name = c.tag[1:].partition("}") if c.tag.startswith("{") else ("", "", c.tag)
            short = ns.rsplit("/", 1)[-1].rsplit(":", 1)[-1] if ns else ""
            children.append(f"{name}({short})" if short and short not in ("client", "server") else name)
    except ET.ParseError:
        children.append("?")
    typ = f" type={s.type}" if s.type else ""
    return f"{s.sender} -> {s.receiver}: {s.name}{typ} from={s.from_} to={s.to} [{', '.join(children)}] {len(s)} B"


_KEY = re.compile(r"<(?:dedup|origin-id)\b[^>]*\bid=['\"]([^'\"]+)")
_ACK = re.compile(r"<ack\b[^>]*")


def _ack_key(s) -> Optional[str]:
    """The key a master's acknowledgement (src/ack.rs) acknowledges, if `s` is one."""
    if s.name != "message" or "urn:xmpp:dmuc:0" not in s.raw:
        return None
    m = _ACK.search(s.raw)
    k = m and re.search(r"\bid=['\"]([^'\"]+)", m.group(0))
    return k.group(1) if k else None


def tally(snap, items: bool = False) -> Dict[str, Any]:
    """Stanzas and their bytes in a snapshot, barrier messages left out, and so are the master's
    acknowledgements of messages not counted here (a barrier's, or one from before the window)."""
    counted = [s for s in snap.stanzas if BARRIER not in s.raw]
    keys = {k for s in counted for k in _KEY.findall(s.raw)}
    stanzas = [s for s in counted if _ack_key(s) is None or _ack_key(s) in keys]
    by_sender: Dict[str, Dict[str, Any]] = {}
    for s in stanzas:
        d = by_sender.setdefault(s.sender, {"stanzas": 0, "bytes": 0, "kinds": {}})
        d["stanzas"] += 1
        d["bytes"] += len(s)
        d["kinds"][s.name] = d["kinds"].get(s.name, 0) + 1
    out = {"stanzas": len(stanzas), "bytes": sum(len(s) for s in stanzas), "by_sender": by_sender}
    if items:
        out["items"] = [describe(s) for s in stanzas]
    return out


# ---------------------------------------------------------------------------------------------
# One federation in one mode, with its clients
# ---------------------------------------------------------------------------------------------

class Run:
    def __init__(self, bench: "Bench", mode: str, fed, hub: ClientHub):
        self.bench = bench
        self.cfg = bench.cfg
        self.mode = mode
        self.fed = fed
        self.hub = hub
        self.link = fed.link
        self.alice: Optional[Track] = None
        self.remotes: List[Track] = []       # every remote client, in join order
        self.in_room: List[Track] = []       # remote clients in ROOM now
        self.locals: List[Track] = []        # clients on fairfax (alice first)

    def log(self, text: str) -> None:
        self.bench.log(f"[{self.mode}] {text}")

    async def wait(self, predicate: Callable[[], Any], timeout: float, what: str) -> Any:
        try:
            return await self.hub.wait_for(predicate, timeout, f"[{self.mode}] {what}")
        except WaitTimeout as e:
            raise BenchFailure(str(e)) from None

    async def delivered(self, bodies: Sequence[str], receivers: Sequence[Track], timeout: float, what: str) -> None:
        """Wait until every receiver has every body; past the deadline, the run fails, naming
        what was lost and where."""
        try:
            await self.hub.wait_for(lambda: all(b in r.first for b in bodies for r in receivers), timeout, what)
        except WaitTimeout:
            lost = [(r, [b for b in bodies if b not in r.first]) for r in receivers]
            lost = [(r, bs) for r, bs in lost if bs]
            raise BenchFailure(
                f"[{self.mode}] {what}: MESSAGES LOST: {sum(len(bs) for _, bs in lost)} deliveries missing after "
                f"{timeout:.0f} s, at {len(lost)} of {len(receivers)} clients; first: {lost[0][0]} never got "
                f"{lost[0][1][0][:40]!r}") from None

    async def connect(self, jids: Sequence[str], port: int, nicks: Sequence[str], batch: int = 25) -> List[Track]:
        out = []
        for i in range(0, len(jids), batch):
            clients = await self.hub.connect_many([(j, PASSWORD) for j in jids[i:i + batch]], port, timeout=60)
            out += [Track(c, n) for c, n in zip(clients, nicks[i:i + batch])]
        return out

    # -- waits over many clients ---------------------------------------------------------

    def everyone(self) -> List[Track]:
        return [self.alice] + self.in_room

    async def join_batch(self, tracks: Sequence[Track], history: Optional[int] = 0, room: str = ROOM,
                         observers: Sequence[Track] = ()) -> None:
        """Join `tracks` concurrently; wait until each has its self-presence and subject, and
        every occupant (`observers` + joiners) sees the whole room."""
        for t in tracks:
            t.send_join(room, history)
        members = list(observers) + list(tracks)
        expected = len(members)
        await self.wait(lambda: all(room in t.joined and room in t.subject for t in tracks)
                        and all(len(t.present[room]) == expected for t in members),
                        60, f"{len(tracks)} joins to {room}: everyone sees {expected} occupants")
        for t in tracks:
            if t.errors:
                raise BenchFailure(f"{t}: error stanzas: {t.errors[:3]}")

    async def barrier(self) -> None:
        """A message from each side, through the same s2s streams as the event just measured:
        once both have arrived, everything the event caused has crossed."""
        senders = [self.alice]
        for t in self.in_room:  # one user on each remote server
            if all(t.client.jid.domain != s.client.jid.domain for s in senders):
                senders.append(t)
        bodies = [f"{BARRIER} {uuid.uuid4().hex}" for _ in senders]
        for t, b in zip(senders, bodies):
            t.say(ROOM, b)
        await self.wait(lambda: all(b in t.first for b in bodies for t in senders), 60, "barrier")

    async def measure(self, label: str, act: Callable[[], Any], done: Callable[[], Any],
                      items: bool = False, timeout: float = 60,
                      then: Optional[Callable[[], Any]] = None) -> Dict[str, Any]:
        self.link.reset()
        act()
        await self.wait(done, timeout, label)
        if then:
            then()
        await self.barrier()
        result = tally(self.link.snapshot(), items)
        self.log(f"{label}: {result['stanzas']} stanzas, {result['bytes']} B")
        return result

    # -- events --------------------------------------------------------------------------

    async def events(self, speaker: Track) -> Dict[str, Any]:
        """A groupchat message and a presence change from each side, counted one at a time."""
        out = {}
        alice, people = self.alice, self.everyone()
        b = body_text("master")
        out["msg_master"] = await self.measure("message from the master side", lambda: alice.say(ROOM, b),
                                               lambda: all(b in t.first for t in people))
        b = body_text("mirror")
        out["msg_mirror"] = await self.measure("message from the mirror side", lambda: speaker.say(ROOM, b),
                                               lambda: all(b in t.first for t in people))
        s = f"busy {uuid.uuid4().hex[:8]}"
        out["presence_master"] = await self.measure(
            "presence change on the master side",
            lambda: alice.client.send_presence(ROOM, alice.nick, show="away", status=s),
            lambda: all(t.status.get((ROOM, alice.nick)) == s for t in people))
        s = f"busy {uuid.uuid4().hex[:8]}"
        out["presence_mirror"] = await self.measure(
            "presence change on the mirror side",
            lambda: speaker.client.send_presence(ROOM, speaker.nick, show="away", status=s),
            lambda: all(t.status.get((ROOM, speaker.nick)) == s for t in people))
        return out

    async def measured_join(self, t: Track, history: Optional[int] = 0) -> Dict[str, Any]:
        observers = self.everyone()
        expected = len(observers) + 1

        def act():
            t.send_join(ROOM, history)

        def done():
            return (ROOM in t.joined and ROOM in t.subject and len(t.present[ROOM]) == expected
                    and all(t.nick in o.present[ROOM] for o in observers))
        result = await self.measure(f"remote join #{len(self.in_room) + 1}", act, done, items=True,
                                    then=lambda: self.in_room.append(t))
        result["history_delivered"] = t.history[ROOM]
        return result

    async def grow_to(self, k: int) -> None:
        """Join remote users (not measured) until ROOM has k remote occupants."""
        while len(self.in_room) < k:
            batch = self.remotes[len(self.in_room):min(k, len(self.in_room) + self.cfg.join_batch)]
            await self.join_batch(batch, 0, ROOM, observers=self.everyone())
            self.in_room += batch

    async def shrink_to(self, k: int) -> None:
        """The last remote occupants leave until ROOM has k of them."""
        leaving, self.in_room = self.in_room[k:], self.in_room[:k]
        self.log(f"{len(leaving)} remote occupants leave")
        for t in leaving:
            t.send_leave(ROOM)
        expected = {self.alice.nick} | {t.nick for t in self.in_room}
        await self.wait(lambda: self.alice.present[ROOM] == expected
                        and all(ROOM not in t.joined for t in leaving), 120, f"back to {k} remote occupants")

    # -- CPU -----------------------------------------------------------------------------

    async def cpu(self, label: str, room: str, sender: Track, receivers: Sequence[Track], n: int,
                  window: int = 100, quiet: bool = False) -> Dict[str, Any]:
        """Prosody CPU per groupchat message, `n` messages from `sender`: the scheduler's
        accounting (/proc/<pid>/task/*/schedstat, ns), and utime + stime (/proc/<pid>/stat,
        10 ms ticks) beside it."""
        servers = self.fed.servers
        before = {s.domain: s.cpu_seconds() for s in servers}
        before_ns = {s.domain: s.cpu_time_ns() for s in servers}
        t0 = time.monotonic()
        bodies = [body_text(f"cpu{i}") for i in range(n)]
        for i in range(0, n, window):
            chunk = bodies[i:i + window]
            for b in chunk:
                sender.say(room, b)
            last = chunk[-1]
            await self.delivered(chunk, receivers, 120, f"{label}: window {i // window}")
        elapsed = time.monotonic() - t0
        after_ns = {s.domain: s.cpu_time_ns() for s in servers}
        after = {s.domain: s.cpu_seconds() for s in servers}
        self.bench.check_delivered(f"[{self.mode}] {label}", bodies, receivers)
        per = {d: (after_ns[d] - before_ns[d]) / n / 1e3 for d in before}
        ticks = {d: (after[d] - before[d]) / n * 1e6 for d in before}
        out = {"messages": n, "recipients": len(receivers), "cpu_us_per_message": per,
               "stat_us_per_message": ticks, "total_us_per_message": sum(per.values()), "wall_s": elapsed}
        if not quiet:
            self.log(f"CPU {label}: " + ", ".join(f"{d.split('.')[0]} {v:.0f} µs" for d, v in per.items())
                     + f" per message ({n} messages, {elapsed:.1f} s)")
        return out

    # -- latency over a 600 ms RTT link --------------------------------------------------

    async def latency(self) -> Dict[str, Any]:
        cfg = self.cfg
        link = self.fed.link_between(FAIRFAX, RALEIGH)
        link.shape(delay=cfg.rtt / 2)
        try:
            u1, u2 = self.in_room[0], self.in_room[1]
            alice = self.alice
            out = {}
            # From a mirror-side user: own echo, another user on the same server, the other side.
            sent = await self.paced(u1, "lat-mirror", cfg.latency_samples, cfg.latency_interval,
                                    [u1, u2, alice] + self.in_room[2:])
            out["echo_mirror_user"] = stats([u1.first[b] - t for b, t in sent])
            out["same_side_mirror"] = stats([u2.first[b] - t for b, t in sent])
            out["to_master_side"] = stats([alice.first[b] - t for b, t in sent])
            # From the master side: delivery to the mirror's users (the last of them, and one).
            sent = await self.paced(alice, "lat-master", cfg.latency_samples, cfg.latency_interval,
                                    [alice] + self.in_room)
            out["to_mirror_side"] = stats([u1.first[b] - t for b, t in sent])
            out["to_mirror_side_all"] = stats([max(r.first[b] for r in self.in_room) - t for b, t in sent])
            out["echo_master_user"] = stats([alice.first[b] - t for b, t in sent])
            # A remote user joins (and leaves) a few times: the time until the join is complete
            # (self-presence, then the subject).
            joiner = self.remotes[len(self.in_room)]
            times = []
            for _ in range(cfg.join_samples):
                t0 = time.monotonic()
                await self.join_batch([joiner], 0, ROOM, observers=self.everyone())
                times.append(joiner.subject_at[ROOM] - t0)
                joiner.send_leave(ROOM)
                await self.wait(lambda: ROOM not in joiner.joined
                                and all(joiner.nick not in o.present[ROOM] for o in self.everyone()), 30,
                                "the extra joiner left")
            out["join_time"] = stats(times)
            for k, v in out.items():
                self.log(f"latency {k}: p50 {v['p50'] * 1000:.1f} ms, p99 {v['p99'] * 1000:.1f} ms")
            return out
        finally:
            link.unshape()

    async def paced(self, sender: Track, tag: str, n: int, interval: float,
                    receivers: Sequence[Track]) -> List[tuple]:
        """`n` messages from `sender`, one every `interval` s; wait until all are delivered."""
        sent = []
        t0 = time.monotonic()
        for i in range(n):
            delay = t0 + i * interval - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)  # pacing of the offered load
            b = body_text(tag)
            sent.append((b, sender.say(ROOM, b)))
        await self.delivered([b for b, _ in sent], receivers, 120, tag)
        self.bench.check_delivered(f"[{self.mode}] {tag}", [b for b, _ in sent], receivers)
        return sent

    # -- sustained rate over a 9.6 kbit/s link -------------------------------------------

    async def rate(self) -> Dict[str, Any]:
        """Step the offered message rate (from alice, to K remote occupants) until the link
        falls behind. A step is sustained when every message reaches every occupant and, over
        the second half of the step, the link's backlog when the next message is sent is (median)
        at most a quarter of one message's transmission time; the figure is the highest
        sustained step."""
        cfg = self.cfg
        link = self.fed.link_between(FAIRFAX, RALEIGH)
        receivers = self.everyone()
        link.shape(rate=cfg.link_bps)
        try:
            # One message alone: its bytes on the wire give the ladder's scale.
            link.reset()
            b = body_text("rate-probe")
            t = self.alice.say(ROOM, b)
            await self.wait(lambda: all(b in r.first for r in receivers), 120, "rate probe delivered")
            probe_latency = max(r.first[b] for r in self.in_room) - t
            await self.idle_link(link)
            wire = link.snapshot().bytes.get(FAIRFAX, 0)   # all of it: nothing else is sent
            service = wire * 8 / cfg.link_bps            # seconds of link time per message
            predicted = 1 / service
            self.log(f"rate probe: {wire} B from fairfax per message, {service:.2f} s on the link; "
                     f"predicted {predicted * 60:.1f} msg/min")
            steps = []
            best = None
            ladder = list(cfg.rate_ladder)
            i = 0
            while i < len(ladder):
                r = predicted * ladder[i]
                step = await self.rate_step(link, r, service, receivers)
                step["factor"] = ladder[i]
                steps.append(step)
                self.log(f"rate step {r * 60:.1f} msg/min ({step['messages']} messages): "
                         f"{'sustained' if step['sustained'] else 'backlog'} "
                         f"(backlog {step['backlog_second_half_s']:.2f} s, max {step['max_backlog_s']:.2f} s; "
                         f"lag {step['lag_first_s']:.2f} -> {step['lag_last_s']:.2f} s)")
                if step["sustained"]:
                    best = r if best is None else max(best, r)
                elif best is not None:
                    break
                elif ladder is cfg.rate_ladder:
                    ladder, i = list(cfg.rate_ladder_down), -1  # the first step failed: go down
                i += 1
            if best is None:
                raise BenchFailure(f"[{self.mode}] no offered rate was sustained on {cfg.link_bps} bit/s")
            return {"link_bps": cfg.link_bps, "bytes_per_message": wire, "service_s": service,
                    "probe_latency_s": probe_latency, "predicted_per_min": predicted * 60,
                    "sustained_per_min": best * 60, "steps": steps}
        finally:
            link.unshape()

    async def rate_step(self, link, r: float, service: float, receivers: Sequence[Track]) -> Dict[str, Any]:
        cfg = self.cfg
        n = max(cfg.rate_min_messages, min(cfg.rate_max_messages, math.ceil(cfg.rate_step_seconds * r)))
        sent, backlog = [], []
        t0 = time.monotonic()
        for i in range(n):
            delay = t0 + i / r - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)  # pacing of the offered load
            backlog.append(link.queue_delay(FAIRFAX))
            b = body_text("rate")
            sent.append((b, self.alice.say(ROOM, b)))
        bodies = [b for b, _ in sent]
        await self.delivered(bodies, receivers, n * service * 3 + 60, f"rate step {r * 60:.1f}/min")
        self.bench.check_delivered(f"[{self.mode}] rate step", bodies, receivers)
        await self.idle_link(link)
        lags = [max(r_.first[b] for r_ in self.in_room) - t for b, t in sent]
        # Falling behind shows as a backlog that grows through the step; one late message (a
        # scheduling hiccup on this shared machine) does not. So: the median over the second half.
        settled = statistics.median(backlog[n // 2:])
        return {"offered_per_min": r * 60, "messages": n, "sustained": settled <= cfg.backlog_tolerance * service,
                "backlog_second_half_s": settled, "max_backlog_s": max(backlog), "backlog_s": backlog,
                "lag_first_s": lags[0], "lag_last_s": lags[-1], "lags_s": lags}

    async def settle(self, quiet: float = 0.5, timeout: float = 10) -> None:
        """Wait until no byte has crossed the link for `quiet` s (deadline: `timeout`)."""
        deadline = time.monotonic() + timeout
        last, since = self.link.snapshot().total_bytes(), time.monotonic()
        while time.monotonic() - since < quiet:
            if time.monotonic() > deadline:
                raise BenchFailure(f"[{self.mode}] the s2s link did not go quiet in {timeout} s")
            await asyncio.sleep(0.05)  # polling the proxy's counters
            now = self.link.snapshot().total_bytes()
            if now != last:
                last, since = now, time.monotonic()

    async def idle_link(self, link, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while link.queue_delay() > 0:
            if time.monotonic() > deadline:
                raise BenchFailure(f"[{self.mode}] the emulated link did not drain in {timeout} s")
            await asyncio.sleep(min(0.1, link.queue_delay()) + 0.01)  # the link drains at its own pace


def stats(values: Sequence[float]) -> Dict[str, float]:
    v = sorted(values)

    def pct(p):
        return v[min(len(v) - 1, max(0, math.ceil(p / 100 * len(v)) - 1))]
    return {"n": len(v), "p50": pct(50), "p99": pct(99), "min": v[0], "max": v[-1], "mean": statistics.fmean(v),
            "samples_ms": [round(x * 1000, 1) for x in values]}


# ---------------------------------------------------------------------------------------------
# The bench
# ---------------------------------------------------------------------------------------------

class Bench:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.t0 = time.monotonic()
        self.idle_tasks: List[asyncio.Task] = []
        self.runs: Dict[str, Run] = {}                # the two-server run of each mode
        self.results: Dict[str, Any] = {
            "meta": {
                "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} cores",
                "quick": cfg.quick,
                "prosody": prosody_version(),
                "workload": {k: v for k, v in vars(cfg).items()},
            },
            "modes": {m: {} for m in MODES},
        }

    def log(self, text: str) -> None:
        print(f"{time.monotonic() - self.t0:7.1f}s {text}", flush=True)

    def check_delivered(self, label: str, bodies: Sequence[str], receivers: Sequence[Track]) -> None:
        for r in receivers:
            lost = [b for b in bodies if r.count[b] == 0]
            twice = [b for b in bodies if r.count[b] > 1]
            if lost or twice:
                raise BenchFailure(f"{label}: {r} lost {len(lost)} and got {len(twice)} twice of {len(bodies)} "
                                   f"messages (first lost: {lost[:1]}, first duplicate: {twice[:1]})")

    async def two_server_run(self, mode: str, stack: contextlib.AsyncExitStack) -> None:
        """Phases 1-3 for one mode, on fairfax + raleigh."""
        cfg = self.cfg
        res = self.results["modes"][mode]
        # One more than K = 20 needs: the latency phase times an extra remote join.
        remote_users = [f"u{i:03d}" for i in range(1, max(cfg.k_max, cfg.k_mid + 1) + 1)]
        local_users = ["alice"] + [f"l{i}" for i in range(1, cfg.cpu_local_occupants)]
        self.log(f"[{mode}] starting fairfax + raleigh, {len(remote_users) + len(local_users)} accounts")
        fed = await stack.enter_async_context(
            started(mode, [RALEIGH], {FAIRFAX: local_users, RALEIGH: remote_users}, self.log))
        hub = await stack.enter_async_context(ClientHub(watch=[fed.link]))
        run = Run(self, mode, fed, hub)
        self.runs[mode] = run
        locals_ = await run.connect([f"{u}@{FAIRFAX}" for u in local_users], fed.server(FAIRFAX).c2s_port,
                                    local_users)
        run.alice, run.locals = locals_[0], locals_
        run.remotes = await run.connect([f"{u}@{RALEIGH}" for u in remote_users],
                                        fed.server(RALEIGH).c2s_port, remote_users)
        self.log(f"[{mode}] {len(locals_) + len(run.remotes)} clients connected")
        await run.join_batch([run.alice], None)
        seeds = [body_text(f"history{i}") for i in range(cfg.history)]
        for b in seeds:
            run.alice.say(ROOM, b)
        await run.wait(lambda: all(b in run.alice.first for b in seeds), 30, "history seeded")

        res["sweep"] = {}
        for k in sorted(set(cfg.sweep) | {2}):
            await run.grow_to(k - 1)
            if k == 2:
                # The second remote join, asking for the default history (20 messages).
                res["second_join_history"] = await run.measured_join(run.remotes[1], history=None)
                got = res["second_join_history"]["history_delivered"]
                if got != cfg.history:
                    raise BenchFailure(f"[{mode}] the second join got {got} history messages, expected {cfg.history}")
                continue
            entry: Dict[str, Any] = {"join": await run.measured_join(run.remotes[k - 1])}
            entry.update(await run.events(run.in_room[0]))
            res["sweep"][str(k)] = entry
            if k == cfg.k_mid:
                await self.mid_phases(run, res)

        # Back to K = 20 for the CPU rounds, which run once both modes are here.
        await run.shrink_to(cfg.k_mid)

    async def finale(self, run: Run) -> None:
        """Every remote occupant leaves, and a message with nobody remote."""
        res = self.results["modes"][run.mode]
        await run.shrink_to(0)
        await run.settle()
        run.link.reset()
        b1, b2 = body_text("alone"), body_text("alone")
        run.alice.say(ROOM, b1)
        run.alice.say(ROOM, b2)
        await run.wait(lambda: b2 in run.alice.first, 30, "alice's own echo")
        res["msg_no_remote"] = tally(run.link.snapshot())
        run.log(f"message with no remote occupant: {res['msg_no_remote']['bytes']} B")


    async def cpu_rounds(self) -> None:
        """Prosody CPU per message, with and without mod_dmuc. Both modes' servers are up by now,
        so the rounds alternate between them and share the machine's conditions (other load,
        clock) as far as they can. Three workloads: messages in a room with local occupants only
        (fairfax), and, in the K = 20 room, messages from each side (fairfax + raleigh)."""
        cfg = self.cfg
        runs = [self.runs[m] for m in MODES if m in self.runs]
        for run in runs:
            await run.join_batch(run.locals[1:], 0, LOCAL_ROOM, observers=[])
            await run.join_batch([run.alice], 0, LOCAL_ROOM, observers=run.locals[1:])
        k = cfg.k_mid
        work = [("cpu_local", lambda run: (LOCAL_ROOM, run.alice, run.locals), cfg.cpu_local_messages),
                ("cpu_mixed_master", lambda run: (ROOM, run.alice, run.everyone()), cfg.cpu_mixed_messages),
                ("cpu_mixed_mirror", lambda run: (ROOM, run.in_room[0], run.everyone()), cfg.cpu_mixed_messages)]
        rounds: Dict[tuple, List[Dict[str, Any]]] = collections.defaultdict(list)
        for r in range(cfg.cpu_rounds):
            for run in (runs if r % 2 == 0 else runs[::-1]):
                for key, setup, total in work:
                    room, sender, receivers = setup(run)
                    rounds[(run.mode, key)].append(await run.cpu(key, room, sender, receivers,
                                                                 total // cfg.cpu_rounds, quiet=True))
        labels = {"cpu_local": f"local room ({len(runs[0].locals)} occupants on fairfax)",
                  "cpu_mixed_master": f"K={k} room, messages from the master side",
                  "cpu_mixed_mirror": f"K={k} room, messages from the mirror side"}
        for run in runs:
            for key, _, total in work:
                rs = rounds[(run.mode, key)]
                # Other load on the machine only ever adds CPU time (cache misses, migrations):
                # the best round is the least disturbed one. The median is kept beside it.
                per = {d: min(x["cpu_us_per_message"][d] for x in rs) for d in rs[0]["cpu_us_per_message"]}
                median = {d: statistics.median(x["cpu_us_per_message"][d] for x in rs) for d in per}
                self.results["modes"][run.mode][key] = {
                    "messages": sum(x["messages"] for x in rs), "rounds": len(rs), "recipients": rs[0]["recipients"],
                    "cpu_us_per_message": per, "median_us_per_message": median,
                    "total_us_per_message": sum(per.values()),
                    "rounds_us": {d: [round(x["cpu_us_per_message"][d], 1) for x in rs] for d in per},
                    "stat_us_per_message": {d: statistics.fmean(x["stat_us_per_message"][d] for x in rs) for d in per}}
                run.log(f"CPU {labels[key]}: " + ", ".join(
                    f"{d.split('.')[0]} {v:.0f} µs" for d, v in per.items() if v > 0)
                    + f" per message (best of {len(rs)} rounds; median " + ", ".join(
                        f"{v:.0f}" for d, v in median.items() if v > 0) + f"; {sum(x['messages'] for x in rs)} messages)")

    async def idle_window(self, mode: str, fed, t_idle: float) -> None:
        remaining = t_idle + self.cfg.idle_seconds - time.monotonic()
        if remaining > 0:
            await asyncio.sleep(remaining)  # the deliberate idle period
        snap = fed.link.snapshot()
        res = self.results["modes"][mode]
        res["idle"] = {"seconds": time.monotonic() - t_idle, "wire_bytes": snap.total_bytes(),
                       "stanzas": len(snap.stanzas), "connections_opened": snap.connections,
                       "items": [describe(s) for s in snap.stanzas]}
        self.log(f"[{mode}] idle {res['idle']['seconds']:.0f} s: {res['idle']['wire_bytes']} B on the wire")

    async def mid_phases(self, run: Run, res: Dict[str, Any]) -> None:
        cfg = self.cfg
        res["latency"] = await run.latency()
        res["rate"] = await run.rate()
        self.log(f"[{run.mode}] sustained {res['rate']['sustained_per_min']:.1f} msg/min on {cfg.link_bps} bit/s")

    async def three_mirrors(self, mode: str, stack: contextlib.AsyncExitStack) -> None:
        """Four servers: the counts for 3 mirrors, join times over 600 ms RTT; then every remote
        user leaves and the idle window starts, in the background (the servers stay up in
        `stack` until the end of the bench)."""
        cfg = self.cfg
        remotes = [RALEIGH, DURHAM, NORFOLK]
        per = cfg.mirrors3_per_server
        users = {d: [f"{d.split('.')[0][0]}{i}" for i in range(1, per + 1)] for d in remotes}
        self.log(f"[{mode}, 3 mirrors] starting fairfax + {len(remotes)} remote servers")
        fed = await stack.enter_async_context(started(f"{mode}, 3 mirrors", remotes,
                                                      {FAIRFAX: ["alice"], **users}, self.log, mode=mode))
        hub = await stack.enter_async_context(ClientHub(watch=[fed.link]))
        run = Run(self, f"{mode}, 3 mirrors", fed, hub)
        run.alice = (await run.connect([f"alice@{FAIRFAX}"], fed.server(FAIRFAX).c2s_port, ["alice"]))[0]
        by_server = {}
        for d in remotes:
            by_server[d] = await run.connect([f"{u}@{d}" for u in users[d]], fed.server(d).c2s_port, users[d])
        await run.join_batch([run.alice], 0)
        out: Dict[str, Any] = {"servers": len(remotes), "occupants_per_server": per}
        # Joins through durham's mirror, timed over 600 ms RTT: the first (new s2s
        # sessions), the second; both leave (the mirror leaves the room), and the first
        # joins again (a first join through the mirror, with the s2s sessions up).
        link = fed.link_between(FAIRFAX, DURHAM)
        link.shape(delay=cfg.rtt / 2)
        d1, d2 = by_server[DURHAM][:2]
        try:
            for key, t in (("join_time_first", d1), ("join_time_second", d2), ("leave", None),
                           ("join_time_first_warm", d1)):
                if key == "leave":
                    for u in (d1, d2):
                        u.send_leave(ROOM)
                    run.in_room = [u for u in run.in_room if u not in (d1, d2)]
                    await run.wait(lambda: all(ROOM not in u.joined for u in (d1, d2)) and all(
                        u.nick not in o.present[ROOM] for u in (d1, d2) for o in run.everyone()),
                        60, "durham's users left")
                    continue
                t0 = time.monotonic()
                await run.join_batch([t], 0, ROOM, observers=run.everyone())
                run.in_room.append(t)
                out[key] = t.subject_at[ROOM] - t0
                self.log(f"[{mode}, 3 mirrors] {key.replace('_', ' ')} at {cfg.rtt * 1000:.0f} ms RTT: "
                         f"{out[key] * 1000:.0f} ms")
        finally:
            link.unshape()
        # Everyone but the last user of the first server joins, one server at a time.
        order = [t for d in remotes[1:] for t in by_server[d]] + by_server[remotes[0]]
        run.remotes = order
        for d in remotes[1:] + remotes[:1]:
            batch = [t for t in by_server[d] if t is not order[-1] and t not in run.in_room]
            await run.join_batch(batch, 0, ROOM, observers=run.everyone())
            run.in_room += batch
        # in_room[0] is on durham; speak from raleigh, the server of the measured join.
        speaker = by_server[remotes[0]][0]
        out["join"] = await run.measured_join(order[-1])
        out.update(await run.events(speaker))
        self.results["modes"][mode]["mirrors3"] = out

        # Every remote user leaves: the room stays with alice alone, and nobody speaks.
        for t in run.in_room:
            t.send_leave(ROOM)
        leaving, run.in_room = run.in_room, []
        await run.wait(lambda: run.alice.present[ROOM] == {run.alice.nick}
                       and all(ROOM not in t.joined for t in leaving), 60, "every remote user left")
        await run.settle()  # the leaves' last copies to other mirrors are still on their way
        fed.link.reset()
        self.log(f"[{mode}] the room stays idle for {cfg.idle_seconds} s, in the background")
        self.idle_tasks.append(asyncio.create_task(self.idle_window(mode, fed, time.monotonic())))

    # -- output --------------------------------------------------------------------------

    def finish(self, engine_path: Optional[str], failure: Optional[str]) -> None:
        self.results["meta"]["elapsed_s"] = round(time.monotonic() - self.t0, 1)
        self.results["meta"]["failure"] = failure
        self.results["engine"] = read_engine(engine_path)
        os.makedirs(OUT, exist_ok=True)
        with open(os.path.join(OUT, "results.json"), "w") as f:
            json.dump(self.results, f, indent=1, sort_keys=False)
        rows = table_rows(self.results)
        md = markdown(rows, self.results)
        with open(os.path.join(OUT, "results.md"), "w") as f:
            f.write(md)
        print()
        print(text_table(rows))
        for line in self.results["engine"].get("lines", []):
            print(f"engine: {line}")
        if not failure and self.runs:  # the plot is of the main phases (not run with --only flood)
            try:
                paths = plot.plot(self.results, OUT)
                print(f"\nwrote {os.path.join(OUT, 'results.json')}, {os.path.join(OUT, 'results.md')}, "
                      + ", ".join(paths))
            except Exception:
                traceback.print_exc()
                raise


def prosody_version() -> str:
    try:
        out = subprocess.run(["dpkg-query", "-W", "-f", "${Version}", "prosody"], capture_output=True, text=True,
                             timeout=10).stdout
        return out.strip() or "?"
    except (OSError, subprocess.TimeoutExpired):
        return "?"


def read_engine(path: Optional[str]) -> Dict[str, Any]:
    """The engine benchmark's figures (`cargo bench --bench fanout` output), if it ran."""
    if not path or not os.path.exists(path):
        return {"ran": False}
    with open(path, errors="replace") as f:
        lines = [l.strip() for l in f if "µs" in l or "us/" in l]
    return {"ran": True, "lines": lines}


# ---------------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------------

def get(d: Any, *path, default=None):
    for p in path:
        if not isinstance(d, dict) or p not in d:
            return default
        d = d[p]
    return d


def ratio(a, b) -> str:
    if a is None or b is None:
        return "-"
    if b == 0:
        return "-" if a == 0 else "inf"
    return f"{a / b:.3f}"


def table_rows(res: Dict[str, Any]) -> List[tuple]:
    """(section, what, dmuc, plain, ratio) rows; ratio is dmuc / plain unless said otherwise."""
    d, p = res["modes"]["dmuc"], res["modes"]["plain"]
    rows: List[tuple] = []

    def sb(x):
        return "-" if x is None else f"{x['stanzas']} st / {x['bytes']} B"

    events = [("msg_master", "groupchat message, master side"), ("msg_mirror", "groupchat message, mirror side"),
              ("presence_master", "presence change, master side"), ("presence_mirror", "presence change, mirror side"),
              ("join", "remote join (the K-th)")]
    scenarios = [(k, f"K={k}") for k in sorted(set(d.get("sweep", {})) | set(p.get("sweep", {})), key=int)]
    for key, label in events:
        for k, klabel in scenarios:
            a, b = get(d, "sweep", k, key), get(p, "sweep", k, key)
            rows.append(("s2s per event", f"{label}, {klabel}", sb(a), sb(b),
                         ratio(a and a["bytes"], b and b["bytes"])))
        a, b = get(d, "mirrors3", key), get(p, "mirrors3", key)
        if a or b:
            per = get(d, "mirrors3", "occupants_per_server", default=5)
            rows.append(("s2s per event", f"{label}, 3 mirrors x {per}", sb(a), sb(b),
                         ratio(a and a["bytes"], b and b["bytes"])))
    a, b = d.get("second_join_history"), p.get("second_join_history")
    rows.append(("s2s per event", "second remote join, 20 messages of history", sb(a), sb(b),
                 ratio(a and a["bytes"], b and b["bytes"])))
    a, b = d.get("msg_no_remote"), p.get("msg_no_remote")
    rows.append(("s2s per event", "message with no remote occupant", sb(a), sb(b), "-"))
    a, b = d.get("idle"), p.get("idle")
    rows.append(("s2s idle", f"idle room, no remote occupant, {round(get(d, 'idle', 'seconds', default=0))} s",
                 "-" if not a else f"{a['wire_bytes']} B", "-" if not b else f"{b['wire_bytes']} B", "-"))

    def ms(x, q):
        return None if x is None else x[q] * 1000

    for key, label in [("echo_mirror_user", "local echo, mirror user"),
                       ("same_side_mirror", "mirror user -> another user on the mirror side"),
                       ("to_master_side", "mirror user -> master side"),
                       ("to_mirror_side", "master side -> mirror user"),
                       ("to_mirror_side_all", "master side -> all K mirror users"),
                       ("echo_master_user", "local echo, master-side user")]:
        for q in ("p50", "p99"):
            a, b = ms(get(d, "latency", key), q), ms(get(p, "latency", key), q)
            rows.append(("latency, 600 ms RTT", f"{label} {q}", "-" if a is None else f"{a:.1f} ms",
                         "-" if b is None else f"{b:.1f} ms", ratio(a, b)))
    a, b = ms(get(d, "latency", "join_time"), "p50"), ms(get(p, "latency", "join_time"), "p50")
    rows.append(("latency, 600 ms RTT", "a remote join at K=20, until complete (p50)", "-" if a is None else f"{a:.0f} ms",
                 "-" if b is None else f"{b:.0f} ms", ratio(a, b)))
    for key, label in [("join_time_first", "first join through a mirror, new s2s sessions, until complete"),
                       ("join_time_first_warm", "first join through a mirror, s2s sessions up, until complete"),
                       ("join_time_second", "second join through a mirror, until complete")]:
        a, b = get(d, "mirrors3", key), get(p, "mirrors3", key)
        a, b = (None if a is None else a * 1000), (None if b is None else b * 1000)
        rows.append(("latency, 600 ms RTT", label, "-" if a is None else f"{a:.0f} ms",
                     "-" if b is None else f"{b:.0f} ms", ratio(a, b)))
    a, b = get(d, "rate", "sustained_per_min"), get(p, "rate", "sustained_per_min")
    rows.append(("9.6 kbit/s link", "sustained messages/min, K=20 (higher is better; ratio dmuc/plain)",
                 "-" if a is None else f"{a:.1f}", "-" if b is None else f"{b:.1f}", ratio(a, b)))
    a, b = get(d, "rate", "bytes_per_message"), get(p, "rate", "bytes_per_message")
    rows.append(("9.6 kbit/s link", "wire bytes per message, K=20", "-" if a is None else f"{a} B",
                 "-" if b is None else f"{b} B", ratio(a, b)))
    a, b = get(d, "cpu_local", "cpu_us_per_message", FAIRFAX), get(p, "cpu_local", "cpu_us_per_message", FAIRFAX)
    n = get(d, "cpu_local", "recipients", default="?")
    rounds = get(d, "cpu_local", "rounds", default="?")
    rows.append(("Prosody CPU", f"fairfax, local room ({n} occupants), µs/message (best of {rounds} rounds)",
                 fmt_us(a), fmt_us(b), ratio(a, b)))
    rows.append(("Prosody CPU", "local throughput, dmuc / plain (1 / CPU per message)", "", "", ratio(b, a)))
    for key, label in [("cpu_mixed_master", "master side"), ("cpu_mixed_mirror", "mirror side")]:
        for dom in (FAIRFAX, RALEIGH):
            a, b = get(d, key, "cpu_us_per_message", dom), get(p, key, "cpu_us_per_message", dom)
            rows.append(("Prosody CPU", f"{dom.split('.')[0]}, K=20 room, message from the {label}, µs/message",
                         fmt_us(a), fmt_us(b), ratio(a, b)))
    f = res.get("flood", {})
    a, b = get(f, "dmuc", "cpu_us_per_message"), get(f, "plain", "cpu_us_per_message")
    rows.append(("flood", f"flood: mirror server CPU vs plain MUC server CPU ({get(f, 'messages', default='?')} "
                 f"messages from one of {get(f, 'users', default='?')} users; µs/message)",
                 fmt_us(a), fmt_us(b), ratio(a, b)))
    b = get(f, "plain-remote", "cpu_us_per_message")
    rows.append(("flood", "flood: mirror server CPU vs the users' server without a mirror (plain MUC, "
                 "the room across the link; µs/message)", fmt_us(a), fmt_us(b), ratio(a, b)))
    rows += link_health_rows(res.get("link_health", {}))
    return rows


def link_health_rows(h: Dict[str, Any]) -> List[tuple]:
    """The link-health rows (benches/prosody/link_health.py), at the default settings."""
    if not h:
        return []
    d, p = h.get("dmuc", {}), h.get("plain", {})
    rows: List[tuple] = []
    for kind, label in [("reset", "an s2s reset"), ("blackhole", "a silent black hole")]:
        limit = get(h, "detect_limit_s", kind, default=0)

        def secs(x):
            return f"not within {limit:.0f} s" if x is None else f"{x:.1f} s"

        for side, who in [("master_side_s", "the master's side shows the remote users gone"),
                          ("mirror_side_s", "the remote side shows the master's users gone")]:
            a, b = get(d, kind, side), get(p, kind, side)
            rows.append(("link health, defaults", f"{label}: {who}", secs(a), secs(b), ratio(a, b)))
        a, b = get(d, kind, "recovery_s"), get(p, kind, "recovery_s")
        rows.append(("link health, defaults", f"after {label}: a remote user speaks, until everyone sees "
                     "everyone and has the message", secs(a), "rejoin by hand" if b is None else secs(b), ratio(a, b)))
    a, b = get(d, "idle_bytes_per_hour"), get(p, "idle_bytes_per_hour")
    rows.append(("link health, defaults", f"idle room with remote users: bytes per hour (measured over "
                 f"{get(d, 'idle_seconds', default=0):.0f} s, {get(d, 'idle_pings', default='?')} ping(s))",
                 "-" if a is None else f"{a} B", "-" if b is None else f"{b} B", ratio(a, b)))
    a, b = get(d, "busy_ping_bytes"), get(p, "busy_ping_bytes")
    rows.append(("link health, defaults", f"ping bytes in a busy minute ({get(d, 'busy_messages', default='?')} "
                 "messages, both sides)", "-" if a is None else f"{a} B", "-" if b is None else f"{b} B", ratio(a, b)))
    return rows


def fmt_us(x) -> str:
    return "-" if x is None else f"{x:.0f} µs"


def text_table(rows: List[tuple]) -> str:
    w = max(len(r[1]) for r in rows)
    out = [f"{'':{w}}  {'dmuc':>20}  {'plain MUC':>20}  {'dmuc/plain':>10}"]
    section = None
    for sec, what, a, b, r in rows:
        if sec != section:
            out.append(f"-- {sec}")
            section = sec
        out.append(f"{what:{w}}  {a:>20}  {b:>20}  {r:>10}")
    return "\n".join(out)


def markdown(rows: List[tuple], res: Dict[str, Any]) -> str:
    out = ["| | what | dmuc | plain MUC | dmuc / plain |", "| --- | --- | --- | --- | --- |"]
    section = None
    for sec, what, a, b, r in rows:
        out.append(f"| {sec if sec != section else ''} | {what} | {a} | {b} | {r} |")
        section = sec
    for line in res.get("engine", {}).get("lines", []):
        out.append(f"| engine | {line} | | | |")
    return "\n".join(out) + "\n"


async def main_async(bench: Bench, modes: Sequence[str], phases: Sequence[str]) -> None:
    # The link-health phase mostly waits (default timers): it runs beside everything else.
    health = (asyncio.create_task(link_health(bench, started, ClientHub, CONFERENCE))
              if "health" in phases else None)
    try:
        await main_phases(bench, modes, phases)
    except BaseException:
        if health is not None:
            health.cancel()
        raise
    if health is not None:
        bench.results["link_health"] = await health


async def main_phases(bench: Bench, modes: Sequence[str], phases: Sequence[str]) -> None:
    async with contextlib.AsyncExitStack() as stack:
        if "main" not in phases:
            modes = []
        for mode in modes:
            await bench.three_mirrors(mode, stack)
            await bench.two_server_run(mode, stack)
        if bench.runs:
            await bench.cpu_rounds()
        for run in bench.runs.values():
            await bench.finale(run)
        await asyncio.gather(*bench.idle_tasks)
    if "flood" in phases:
        async with contextlib.AsyncExitStack() as stack:
            bench.results["flood"] = await flood(bench, stack, started, Run, ClientHub, CONFERENCE)
        bench.log("stopping the servers")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a smaller workload, for a smoke run")
    ap.add_argument("--engine", help="output of `cargo bench --bench fanout` to include")
    ap.add_argument("--modes", default=",".join(MODES), help="comma-separated: dmuc,plain")
    ap.add_argument("--only", default="main,flood,health",
                    help="comma-separated phases: main (everything but the flood and link health), "
                         "flood, health (link health at the default timers, about 8 minutes)")
    args = ap.parse_args()
    if not os.path.exists(os.path.join(DIST, "dmuc_prosody.so")):
        print(f"{DIST} has no dmuc_prosody.so: run `make dist` first", file=sys.stderr)
        return 2
    # slixmpp leaves a filter task pending per client when a hub closes; asyncio's complaint about
    # it at exit is noise.
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    bench = Bench(Config(args.quick))
    failure = None
    try:
        asyncio.run(main_async(bench, [m for m in args.modes.split(",") if m],
                               [p for p in args.only.split(",") if p]))
    except BenchFailure as e:
        failure = str(e)
    except Exception as e:
        failure = f"{type(e).__name__}: {e}"
        traceback.print_exc()
    bench.finish(args.engine, failure)
    print(f"\ntotal {time.monotonic() - bench.t0:.0f} s")
    if failure:
        print(f"\nBENCH FAILED: {failure}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
