"""Baseline without dmuc: what plain MUC federation costs on the s2s link.

One room on fairfax (conference.fairfax.localhost, stock mod_muc), one local occupant on
fairfax and K occupants on raleigh. A groupchat message is fanned out by the room once per
occupant, so K copies of it cross fairfax -> raleigh. dmuc's purpose is to turn those K copies
into one; these numbers are what it is measured against.

Run with `-s` to see the measured bytes.
"""

import asyncio
import uuid

import pytest

from clients import ClientHub, WaitTimeout, run
from servers import CONFERENCE, FAIRFAX, RALEIGH

ROOM = f"chatroom@{CONFERENCE}"
PASSWORD = "secret"


async def _setup_room(env, hub, k):
    """alice@fairfax creates the room; user1..userK@raleigh join it. Returns (alice, remotes)."""
    alice = await hub.connect(f"alice@{FAIRFAX}", PASSWORD, env.fairfax.c2s_port)
    await alice.join(ROOM, "alice")
    remotes = await hub.connect_many([(f"user{i}@{RALEIGH}", PASSWORD) for i in range(1, k + 1)],
                                     env.raleigh.c2s_port)
    await asyncio.gather(*(c.join(ROOM, f"user{i}", timeout=20) for i, c in enumerate(remotes, 1)))
    # Every join is announced to every occupant; wait until alice has seen them all, so that no
    # join presence is still in flight when the link counters are reset.
    await hub.wait_for(lambda: len(alice.occupants(ROOM)) == k + 1, 20,
                       f"alice sees {k + 1} occupants")
    await hub.wait_for(lambda: all(len(c.occupants(ROOM)) == k + 1 for c in remotes), 20,
                       f"every raleigh user sees {k + 1} occupants")
    return alice, remotes


async def _measure_one_message(env, k):
    env.fairfax.register("alice", PASSWORD)
    env.raleigh.register_many([(f"user{i}", PASSWORD) for i in range(1, k + 1)])
    async with ClientHub(watch=[env.link]) as hub:
        try:
            alice, remotes = await _setup_room(env, hub, k)

            env.link.reset()
            body = f"hello {uuid.uuid4().hex}"
            alice.send_groupchat(ROOM, body)
            # The proxy counts each byte before forwarding it, so once every raleigh user has the
            # message, every copy that made them has been counted.
            await hub.wait_for(lambda: all(c.groupchat(ROOM, body=body) for c in remotes)
                               and alice.groupchat(ROOM, body=body), 15,
                               f"all {k} raleigh users (and alice) receive the message")
            measured = env.link.snapshot()

            # Barrier: a second message from the same room travels the same ordered s2s stream
            # (conference.fairfax -> raleigh), so once it has arrived everywhere, any extra
            # copy of the first one would have arrived too.
            barrier = f"barrier {uuid.uuid4().hex}"
            alice.send_groupchat(ROOM, barrier)
            await hub.wait_for(lambda: all(c.groupchat(ROOM, body=barrier) for c in remotes), 15,
                               "barrier message reaches every raleigh user")
            final = env.link.snapshot()
        except AssertionError as e:
            raise AssertionError(f"{e}\n{hub.dump()}\n{env.link.summary()}") from None
    return body, remotes, measured, final


@pytest.mark.parametrize("k", [5, 20])
def test_groupchat_crosses_link_once_per_remote_occupant(make_two_servers, record_property, k):
    env = make_two_servers()
    body, remotes, measured, final = run(_measure_one_message(env, k), timeout=50)

    copies = measured.stanzas
    sent_by_fairfax = [s for s in copies if s.sender == FAIRFAX]
    msg_bytes = measured.bytes.get(FAIRFAX, 0)
    stanza_bytes = sum(len(s) for s in sent_by_fairfax)
    print(f"\n[plain MUC baseline] K={k}: {len(sent_by_fairfax)} stanzas "
          f"{measured.stanza_counts.get(FAIRFAX)} fairfax->raleigh, {msg_bytes} bytes on the wire "
          f"({stanza_bytes} in stanzas, {msg_bytes / k:.0f} B per copy); "
          f"raleigh->fairfax {measured.bytes.get(RALEIGH, 0)} bytes")
    record_property("k", k)
    record_property("message_stanzas", len(sent_by_fairfax))
    record_property("bytes_fairfax_to_raleigh", msg_bytes)

    assert not final.parse_errors, final.parse_errors
    # Exactly K copies of the message crossed, one per raleigh occupant, and nothing else
    # went either way for it.
    assert measured.stanza_counts.get(FAIRFAX) == {"message": k}, measured.stanza_counts
    assert RALEIGH not in measured.stanza_counts, measured.stanza_counts
    hello = [s for s in final.stanzas if s.sender == FAIRFAX and s.name == "message" and body in s.raw]
    assert len(hello) == k
    assert sorted(s.to for s in hello) == sorted(f"user{i}@{RALEIGH}/{c.xmpp.boundjid.resource}"
                                                 for i, c in enumerate(remotes, 1))
    # The wire bytes are the stanzas themselves (no stream-management traffic in between).
    assert msg_bytes == stanza_bytes
    # Every raleigh user got it exactly once.
    for c in remotes:
        assert len(c.groupchat(ROOM, body=body)) == 1, (c.jid, c.groupchat(ROOM, body=body))

