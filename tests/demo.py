"""`make demo`: two real Prosody servers on loopback, one room, a short conversation, and what it
cost on the s2s link: once with a dmuc mirror on raleigh, then again with plain MUC.

fairfax.localhost hosts chatroom@conference.fairfax.localhost (kevin, scott); raleigh.localhost
has wayne, keith and tom. A counting proxy sits between the two servers.
"""

import asyncio
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "harness"))

from clients import ClientHub, run  # noqa: E402
from servers import CONFERENCE, FAIRFAX, RALEIGH, two_servers  # noqa: E402

ROOM = f"chatroom@{CONFERENCE}"
MIRROR = f"mirror.{RALEIGH}"
PASSWORD = "secret"
DIST = os.path.join(HERE, "..", "dist", "prosody")
LOCAL = ["kevin", "scott"]
REMOTE = ["wayne", "keith", "tom"]
SCRIPT = [
    ("kevin", "Morning all. Status check from Fairfax."),
    ("wayne", "Raleigh here, link is slow but up."),
    ("keith", "Keith at Raleigh, copy that."),
    ("scott", "Scott at Fairfax. Weather window opens at 14:00."),
    ("tom", "Tom, Raleigh. We'll be ready."),
    ("kevin", "Good. Same time tomorrow."),
]


def servers(mirror: bool):
    if not mirror:
        return two_servers()
    dist = os.path.abspath(DIST)
    return two_servers(
        plugin_paths=[dist],
        conference_options=['modules_enabled = { "dmuc" }', f'dmuc_trusted_mirrors = {{ "{MIRROR}" }}'],
        raleigh_modules=["dmuc"],
        raleigh_blocks=[f'Component "{MIRROR}" "dmuc"\n    dmuc_masters = {{ "{CONFERENCE}" }}'],
    )


async def conversation(env, mirror: bool):
    label = "with the dmuc mirror" if mirror else "plain MUC"
    async with ClientHub(watch=[env.link]) as hub:
        clients = {}
        for u in LOCAL:
            clients[u] = await hub.connect(f"{u}@{FAIRFAX}", PASSWORD, env.fairfax.c2s_port)
        for u in REMOTE:
            clients[u] = await hub.connect(f"{u}@{RALEIGH}", PASSWORD, env.raleigh.c2s_port)
        env.link.reset()
        for u in LOCAL + REMOTE:
            await clients[u].join(ROOM, u.capitalize(), timeout=20)
        everyone = {u.capitalize() for u in LOCAL + REMOTE}
        await hub.wait_for(lambda: all(c.occupants(ROOM) == everyone for c in clients.values()), 20,
                           "everyone sees everyone")
        joins = env.link.snapshot()

        env.link.reset()
        for who, text in SCRIPT:
            clients[who].send_groupchat(ROOM, text)
            await hub.wait_for(lambda: all(c.groupchat(ROOM, text) for c in clients.values()), 20,
                               f"everyone has: {text}")
        chat = env.link.snapshot()

        env.link.reset()
        await clients["tom"].leave(ROOM, "Tom")
        await hub.wait_for(lambda: all("Tom" not in clients[u].occupants(ROOM) for u in LOCAL + ["wayne"]), 20,
                           "tom's leave seen")
        leave = env.link.snapshot()

        print(f"\n=== {label} ===")
        for side, users in (("fairfax", LOCAL), ("raleigh", REMOTE)):
            u = users[0]
            seen = clients[u]
            print(f"  {u}@{side} sees occupants {sorted(seen.occupants(ROOM))} and the conversation:")
            for r in seen.groupchat(ROOM):
                print(f"    <{r.from_.resource}> {r.body}")
        for u, c in clients.items():
            got = [r.body for r in c.groupchat(ROOM)]
            assert got == [t for _, t in SCRIPT], (u, got)
        return {"joins": joins, "chat": chat, "leave": leave}


def totals(snap):
    """Stanzas and their bytes, both directions. s2s stream set-up (headers, dialback) is left out:
    it is paid once per connection, and dmuc's mirror uses two more connections than plain MUC."""
    return len(snap.stanzas), sum(len(s) for s in snap.stanzas)


def main():
    results = {}
    for mirror in (True, False):
        with servers(mirror) as env:
            env.fairfax.register_many([(u, PASSWORD) for u in LOCAL])
            env.raleigh.register_many([(u, PASSWORD) for u in REMOTE])
            results[mirror] = run(conversation(env, mirror), timeout=120)

    print("\n=== stanzas that crossed the s2s link (both directions) ===")
    print(f"  {'phase':<34}{'dmuc':>18}{'plain MUC':>20}{'saved':>8}")
    for phase, what in (("joins", "5 joins (3 remote)"), ("chat", f"{len(SCRIPT)} messages"),
                        ("leave", "1 remote leave")):
        ds, db = totals(results[True][phase])
        ps, pb = totals(results[False][phase])
        saved = f"{100 * (1 - db / pb):.0f}%" if pb else "-"
        print(f"  {what:<34}{ds:>5} st {db:>7} B{ps:>7} st {pb:>7} B{saved:>8}")
    print("\nWith the mirror, each message crosses once; plain MUC sends one copy per remote occupant.")


if __name__ == "__main__":
    main()
