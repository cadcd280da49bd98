"""The mirror's stored queue under a flood, over a link that is up: the store is left alone.

One user behind the mirror floods the room with 2,000 groupchat messages, in windows of 200 (each
sent as fast as the client sends, the next once the master's side has the last of it). Every
occupant on both sides gets each once, in order. The mirror holds each message back from its store until the
master has had `store_after` (2 s) to acknowledge it (write-behind, docs/protocol.md, "Storage
format and cost"), and with ten or more held it pings early, so the acknowledgements come in time:
the mirror's own counters (dmuc:status() on Prosody, `ejabberdctl dmuc_status` on ejabberd) show
few puts or none (a master slowed by the flood may answer a ping late), each deleted once, and
nothing left stored. (Before write-behind, each message cost one put and one delete; before
per-item storage, a rewrite of the whole queue.) Nothing here is timed: the CPU this saves is the
bench's "flood" row. That the queue survives a restart during an outage, when messages are stored
at once, is test_dmuc_link_loss.py's test_mirror_restart_with_queued_messages.
"""

import asyncio
import collections
import re
import time

import pytest

from clients import ClientHub, run
from test_dmuc_link_loss import ROOM, _register, _setup, dmuc_status, link_loss_env

FLOOD = 2000
WINDOW = 200
STORE_LINE = re.compile(r"stored queue (-?\d+) item\(s\), (\d+) put\(s\), (\d+) delete\(s\) since start")


def store_counters(server):
    text = dmuc_status(server)
    m = STORE_LINE.search(text)
    assert m, f"no stored-queue line in the status:\n{text}"
    return tuple(int(x) for x in m.groups())


@pytest.mark.parametrize("master, mirror", [("prosody", "prosody"), ("ejabberd", "ejabberd")])
def test_flood_over_a_link_that_is_up_leaves_the_store_alone(make_mixed_servers, master, mirror):
    env = link_loss_env(make_mixed_servers, master, mirror)
    _register(env)

    async def scenario():
        async with ClientHub(watch=[env.link]) as hub:
            clients, _ = await _setup(env, hub)
            alice, wayne, keith = clients["Alice"], clients["Wayne"], clients["Keith"]
            _, puts0, deletes0 = await asyncio.to_thread(store_counters, env.raleigh)
            bodies = [f"flood {i:04d}" for i in range(FLOOD)]
            # As fast as the client sends, in windows: each waits until the master's side has
            # the last one before (as the bench's flood does), so that the master, slowed by its
            # own debug logging, is never more than a window behind.
            for start in range(0, FLOOD, WINDOW):
                for b in bodies[start:start + WINDOW]:
                    wayne.send_groupchat(ROOM, b)
                last = bodies[min(start + WINDOW, FLOOD) - 1]
                await hub.wait_for(lambda: bool(alice.groupchat(ROOM, last)), 120, f"Alice gets {last}")
            for c in (alice, keith, wayne):
                await hub.wait_for(lambda c=c: bool(c.groupchat(ROOM, last)), 120, f"{c} gets the flood")
            for name, c in (("Alice", alice), ("Keith", keith)):
                got = [r.body for r in c.groupchat(ROOM) if r.body.startswith("flood ")]
                twice = [b for b, n in collections.Counter(got).items() if n > 1]
                assert not twice, f"{name} got {len(twice)} twice, first {twice[:1]}"
                assert got == bodies, f"{name}: {len(got)} of {FLOOD}, in order"
            # The pings acknowledge what was in flight; then nothing is left stored.
            deadline = time.monotonic() + 30
            while True:
                stored, puts, deletes = await asyncio.to_thread(store_counters, env.raleigh)
                if stored == 0 or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.5)  # poll interval; the deadline bounds the wait
            assert stored == 0, f"{stored} item(s) still stored after the acknowledgements"
            puts, deletes = puts - puts0, deletes - deletes0
            print(f"flood of {FLOOD}: {puts} put(s), {deletes} delete(s)")
            # Acknowledged within store_after, a message never reaches the store. A few may, if
            # the flooded master answers a ping late; never more than one put per message.
            assert puts <= FLOOD // 20, f"{puts} puts for {FLOOD} messages over a link that is up"
            assert deletes == puts, f"each stored item deleted once: {puts} puts, {deletes} deletes"

    run(scenario(), timeout=300)
