"""What crosses the s2s link with dmuc, against plain MUC on the same two servers.

A room on fairfax with one local occupant and K occupants on raleigh behind one mirror: a
groupchat message crosses the link once (plain MUC: K times, see test_plain_muc.py), and the
occupants on either side see each other as ordinary occupants.
"""

import uuid

from clients import ClientHub, run
from servers import FAIRFAX, RALEIGH
from test_dmuc_flow import MIRROR, PASSWORD, ROOM, dmuc_env

K = 5


def test_message_crosses_once_per_mirror(make_two_servers):
    env = dmuc_env(make_two_servers)
    env.fairfax.register("alice", PASSWORD)
    env.raleigh.register_many([(f"user{i}", PASSWORD) for i in range(1, K + 1)])

    async def scenario():
        async with ClientHub(watch=[env.link]) as hub:
            try:
                alice = await hub.connect(f"alice@{FAIRFAX}", PASSWORD, env.fairfax.c2s_port)
                await alice.join(ROOM, "alice")
                remotes = await hub.connect_many([(f"user{i}@{RALEIGH}", PASSWORD) for i in range(1, K + 1)],
                                                 env.raleigh.c2s_port)
                for i, c in enumerate(remotes, 1):
                    await c.join(ROOM, f"user{i}", timeout=20)
                everyone = {"alice"} | {f"user{i}" for i in range(1, K + 1)}
                await hub.wait_for(lambda: alice.occupants(ROOM) == everyone, 20, "alice sees everyone")
                await hub.wait_for(lambda: all(c.occupants(ROOM) == everyone for c in remotes), 20,
                                   "every raleigh user sees everyone")

                # Ordinary occupants both ways: no trace of the mirror in what clients see.
                for r in alice.presences(ROOM) + [p for c in remotes for p in c.presences(ROOM)]:
                    assert "tridsys.com/protocol/dmuc" not in r.raw, r.raw
                    assert MIRROR not in r.raw, r.raw
                seen_by_user1 = [r for r in remotes[0].presences(f"{ROOM}/alice") if r.type == ""]
                assert seen_by_user1 and "role=\"moderator\"" in seen_by_user1[-1].raw

                env.link.reset()
                body = f"hello {uuid.uuid4().hex}"
                alice.send_groupchat(ROOM, body)
                await hub.wait_for(lambda: all(c.groupchat(ROOM, body) for c in remotes), 15,
                                   "every raleigh user has the message")
                barrier = f"barrier {uuid.uuid4().hex}"
                alice.send_groupchat(ROOM, barrier)
                await hub.wait_for(lambda: all(c.groupchat(ROOM, barrier) for c in remotes), 15, "barrier")
                snap = env.link.snapshot()
                copies = [s for s in snap.stanzas if s.sender == FAIRFAX and body in s.raw]
                print(f"\n[dmuc] K={K}: {len(copies)} stanza(s), {sum(len(s) for s in copies)} bytes "
                      f"fairfax->raleigh for one message")
                assert len(copies) == 1, copies
                assert copies[0].to == MIRROR
                for c in remotes:
                    assert len(c.groupchat(ROOM, body)) == 1, (c.jid, c.groupchat(ROOM, body))
            except AssertionError as e:
                raise AssertionError(f"{e}\nalice sees {alice.occupants(ROOM)}\n{hub.dump()}\n{env.link.summary()}") from None

    run(scenario(), timeout=90)
