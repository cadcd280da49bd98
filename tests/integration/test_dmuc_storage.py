"""The mirror's stored queue changes per item: a flood costs one put and one delete per message.

One user behind the mirror floods the room with 2,000 groupchat messages. Every occupant on both
sides gets each once, in order, and the mirror's own counters (dmuc:status() on Prosody,
`ejabberdctl dmuc_status` on ejabberd) show at most one put and one delete per message, and
nothing left stored once the master has acknowledged them. (Before per-item storage, the mirror
rewrote its whole queue after every message.) Nothing here is timed: the CPU this saves is the
bench's "flood" row.
"""

import asyncio
import collections
import re
import time

import pytest

from clients import ClientHub, run
from test_dmuc_link_loss import ROOM, _register, _setup, dmuc_status, link_loss_env

FLOOD = 2000
STORE_LINE = re.compile(r"stored queue (-?\d+) item\(s\), (\d+) put\(s\), (\d+) delete\(s\) since start")


def store_counters(server):
    text = dmuc_status(server)
    m = STORE_LINE.search(text)
    assert m, f"no stored-queue line in the status:\n{text}"
    return tuple(int(x) for x in m.groups())


@pytest.mark.parametrize("master, mirror", [("prosody", "prosody"), ("ejabberd", "ejabberd")])
def test_flood_stores_each_message_once(make_mixed_servers, master, mirror):
    env = link_loss_env(make_mixed_servers, master, mirror)
    _register(env)

    async def scenario():
        async with ClientHub(watch=[env.link]) as hub:
            clients, _ = await _setup(env, hub)
            alice, wayne, keith = clients["Alice"], clients["Wayne"], clients["Keith"]
            _, puts0, deletes0 = await asyncio.to_thread(store_counters, env.raleigh)
            bodies = [f"flood {i:04d}" for i in range(FLOOD)]
            for b in bodies:
                wayne.send_groupchat(ROOM, b)
            last = bodies[-1]
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
            # Each message is stored until acknowledged (a restart must not lose it); a host that
            # applies changes in batches may see a put and its delete cancel out.
            assert 0 < puts <= FLOOD, f"{puts} puts for {FLOOD} messages: one per message at most"
            assert deletes == puts, f"each stored item deleted once: {puts} puts, {deletes} deletes"

    run(scenario(), timeout=300)
