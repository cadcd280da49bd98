"""The flood row of `make bench`: one user floods a room with 2,000 groupchat messages.

Three setups, all up at once, measured in the same run:
  - dmuc: the room on fairfax (the master), its K occupants all on raleigh behind raleigh's
    mirror. The mirror serves them (fan-out, echo) and stores each message until the master
    acknowledges it; the figure is raleigh's CPU.
  - plain: the same room on a plain Prosody MUC server, with the same K users as its own local
    users; the figure is that server's CPU.
  - plain-remote: no dmuc; the room on fairfax, the same K users on raleigh joining it across
    the link, as plain MUC serves them; the figure is raleigh's CPU.
The first row compares what the mirror's server spends on a flood with what a plain MUC server
spends hosting the same room for the same users; the second, with what the users' own server
spends without a mirror. The servers' CPU is the scheduler's accounting of their processes (see
Run.cpu). Nothing here is asserted about time.

Run on its own (about a minute): /usr/bin/python3 benches/prosody/bench.py --only flood
A `DMUC_BENCH_DIST=/path/to/dist/prosody` runs the dmuc side with another build (a before/after).
"""

from __future__ import annotations

import contextlib
from typing import Any, Dict

from servers import FAIRFAX, RALEIGH

FLOOD_ROOM_NAME = "flood"
FLOOD_MESSAGES = 2000
FLOOD_USERS = 5
# Messages sent before waiting for their delivery: large enough to be a flood (the client does
# not pace itself), small enough that a lost message is found in the window it was sent in.
FLOOD_WINDOW = 500


async def flood(bench, stack: contextlib.AsyncExitStack, started, Run, ClientHub, conference: str,
                n: int = FLOOD_MESSAGES, k: int = FLOOD_USERS) -> Dict[str, Any]:
    room = f"{FLOOD_ROOM_NAME}@{conference}"
    users = [f"f{i}" for i in range(k)]
    dm_fed = await stack.enter_async_context(
        started("flood-dmuc", [RALEIGH], {FAIRFAX: [], RALEIGH: users}, bench.log, mode="dmuc"))
    pl_fed = await stack.enter_async_context(
        started("flood-plain", [], {FAIRFAX: users}, bench.log, mode="plain"))
    pr_fed = await stack.enter_async_context(
        started("flood-plain-remote", [RALEIGH], {FAIRFAX: [], RALEIGH: users}, bench.log, mode="plain"))
    out: Dict[str, Any] = {"messages": n, "users": k}
    setups = [("dmuc", dm_fed, RALEIGH), ("plain", pl_fed, FAIRFAX), ("plain-remote", pr_fed, RALEIGH)]
    runs = {}
    for mode, fed, home in setups:
        hub = await stack.enter_async_context(ClientHub(watch=[fed.link] if fed.link else []))
        run = Run(bench, f"flood-{mode}", fed, hub)
        tracks = await run.connect([f"{u}@{home}" for u in users], fed.server(home).c2s_port, users)
        await run.join_batch(tracks[:1], 0, room)
        await run.join_batch(tracks[1:], 0, room, observers=tracks[:1])
        runs[mode] = (run, tracks, home)
    # Alternate halves, so that other load on the machine falls on both setups alike.
    halves: Dict[str, list] = {m: [] for m in runs}
    for half in range(2):
        for mode, (run, tracks, home) in runs.items():
            got = await run.cpu(f"flood {half + 1}/2", room, tracks[0], tracks, n // 2, window=FLOOD_WINDOW)
            halves[mode].append(got["cpu_us_per_message"][home])
    for mode, (run, tracks, home) in runs.items():
        out[mode] = {"server": home, "cpu_us_per_message": sum(halves[mode]) / len(halves[mode]),
                     "halves_us": [round(x, 1) for x in halves[mode]]}
        run.log(f"flood: {home.split('.')[0]} {out[mode]['cpu_us_per_message']:.0f} µs/message")
    return out
