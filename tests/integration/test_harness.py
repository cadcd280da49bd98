"""Self-tests of the harness: the stanza scanner, routing through the proxies, and the link
controls (stall / blackhole / reset) that link-loss tests rely on."""

import uuid

from clients import ClientHub, run
from servers import CONFERENCE, FAIRFAX, RALEIGH, _StreamScanner

ROOM = f"chatroom@{CONFERENCE}"
PASSWORD = "secret"
S2S_OUT_CLOSED = r"s2s disconnected: conference\.fairfax\.localhost->raleigh\.localhost"


def test_scanner_finds_top_level_stanzas_in_any_chunking():
    stream = (
        b"<?xml version='1.0'?><stream:stream xmlns='jabber:server' xmlns:db='jabber:server:dialback' "
        b"xmlns:stream='http://etherx.jabber.org/streams' version='1.0'>"
        b"<stream:features><dialback xmlns='urn:xmpp:features:dialback'/></stream:features>"
        b"<db:result from='a' to='b'>key</db:result> "
        b"<presence from='a/x&gt;' to='b' attr=\"q'uote>\"/>"
        b"<message to='b' type='groupchat'><body>hi &amp; <b/> \xc3\xa9</body><presence/></message>"
        b"<iq type='get' id='1'><ping xmlns='urn:xmpp:ping'/></iq></stream:stream>"
    )
    expected = [
        ("stream:features", b"<stream:features><dialback xmlns='urn:xmpp:features:dialback'/></stream:features>"),
        ("db:result", b"<db:result from='a' to='b'>key</db:result>"),
        ("presence", b"<presence from='a/x&gt;' to='b' attr=\"q'uote>\"/>"),
        ("message", b"<message to='b' type='groupchat'><body>hi &amp; <b/> \xc3\xa9</body><presence/></message>"),
        ("iq", b"<iq type='get' id='1'><ping xmlns='urn:xmpp:ping'/></iq>"),
    ]
    for chunk in (1, 2, 7, 64, len(stream)):
        seen = []
        scanner = _StreamScanner(lambda name, attrs, raw: seen.append((name, raw)))
        for i in range(0, len(stream), chunk):
            scanner.feed(stream[i:i + chunk])
        assert scanner.error is None
        assert seen == expected, f"chunk size {chunk}"


def test_s2s_goes_through_the_proxies(two_servers_env):
    """Both servers dial each other through the proxies (the route override works for the
    VirtualHost and the conference component), and the joins are seen as stanzas."""
    env = two_servers_env
    env.fairfax.register("alice", PASSWORD)
    env.raleigh.register("bob", PASSWORD)

    async def body():
        async with ClientHub(watch=[env.link]) as hub:
            alice = await hub.connect(f"alice@{FAIRFAX}", PASSWORD, env.fairfax.c2s_port)
            await alice.join(ROOM, "alice")
            bob = await hub.connect(f"bob@{RALEIGH}", PASSWORD, env.raleigh.c2s_port)
            await bob.join(ROOM, "bob")
            await hub.wait_for(lambda: alice.occupants(ROOM) == {"alice", "bob"}, 10, "alice sees bob")

    run(body(), timeout=40)
    snap = env.link.snapshot()
    assert not snap.parse_errors, snap.parse_errors
    joins = env.link.stanzas(sender=RALEIGH, name="presence", where=lambda s: s.to == f"{ROOM}/bob")
    assert len(joins) == 1, env.link.summary()
    assert env.link.count(sender=FAIRFAX, name="presence") >= 2, env.link.summary()
    assert env.to_fairfax.snapshot().connections >= 1 and env.to_raleigh.snapshot().connections >= 1
    for server in env.servers:
        assert "s2s route override" in server.log_text()


async def _alice_and_bob_in_room(env, hub):
    alice = await hub.connect(f"alice@{FAIRFAX}", PASSWORD, env.fairfax.c2s_port)
    await alice.join(ROOM, "alice")
    bob = await hub.connect(f"bob@{RALEIGH}", PASSWORD, env.raleigh.c2s_port)
    await bob.join(ROOM, "bob")
    return alice, bob


def test_stall_holds_and_restore_delivers_in_order(two_servers_env):
    env = two_servers_env
    env.fairfax.register("alice", PASSWORD)
    env.raleigh.register("bob", PASSWORD)

    async def body():
        async with ClientHub(watch=[env.link]) as hub:
            alice, bob = await _alice_and_bob_in_room(env, hub)
            env.link.cut("stall")
            before = env.link.count(sender=FAIRFAX, name="message")
            off = env.fairfax.log_offset()
            bodies = [f"held {i} {uuid.uuid4().hex}" for i in range(3)]
            for b in bodies:
                alice.send_groupchat(ROOM, b)
            # Once fairfax has written the last copy to bob's s2s stream, only the proxy can
            # be holding it.
            await env.fairfax.wait_for_log_async(r"Sending\[s2sout\]: <message[^\n]*to='bob@raleigh", 10, off)
            await hub.wait_for(lambda: alice.groupchat(ROOM, bodies[-1]), 10, "alice's echo")
            assert not any(bob.groupchat(ROOM, b) for b in bodies)
            assert env.link.count(sender=FAIRFAX, name="message") == before
            env.link.restore()
            await hub.wait_for(lambda: bob.groupchat(ROOM, bodies[-1]), 10, "held messages delivered")
            got = [r.body for r in bob.groupchat(ROOM) if r.body in bodies]
            assert got == bodies

    run(body(), timeout=40)


def test_blackhole_loses_data_and_restore_reconnects(two_servers_env):
    env = two_servers_env
    env.fairfax.register("alice", PASSWORD)
    env.raleigh.register("bob", PASSWORD)

    async def body():
        async with ClientHub(watch=[env.link]) as hub:
            alice, bob = await _alice_and_bob_in_room(env, hub)
            env.link.cut("blackhole")
            off = env.fairfax.log_offset()
            lost = f"lost {uuid.uuid4().hex}"
            alice.send_groupchat(ROOM, lost)
            await env.fairfax.wait_for_log_async(r"Sending\[s2sout\]: <message[^\n]*to='bob@raleigh", 10, off)
            off = env.fairfax.log_offset()
            env.link.restore()
            # The blackholed connection is aborted by restore(); wait until fairfax has noticed,
            # or the next stanza could go into the dead socket.
            await env.fairfax.wait_for_log_async(S2S_OUT_CLOSED, 10, off)
            after = f"after {uuid.uuid4().hex}"
            alice.send_groupchat(ROOM, after)
            await hub.wait_for(lambda: bob.groupchat(ROOM, after), 15, "message after restore")
            # Same room, same s2s stream order: the lost one can no longer arrive.
            assert not bob.groupchat(ROOM, lost)
            assert env.link.count(sender=FAIRFAX, where=lambda s: lost in s.raw) == 0

    run(body(), timeout=40)


def test_reset_closes_refuses_and_restore_reconnects(two_servers_env):
    env = two_servers_env
    env.fairfax.register("alice", PASSWORD)
    env.raleigh.register("bob", PASSWORD)

    async def body():
        async with ClientHub(watch=[env.link]) as hub:
            alice = await hub.connect(f"alice@{FAIRFAX}", PASSWORD, env.fairfax.c2s_port)
            bob = await hub.connect(f"bob@{RALEIGH}", PASSWORD, env.raleigh.c2s_port)
            first = f"first {uuid.uuid4().hex}"
            alice.send_chat(f"bob@{RALEIGH}", first)
            await hub.wait_for(lambda: bob.messages(body=first), 10, "chat before the cut")

            off_f, off_r = env.fairfax.log_offset(), env.raleigh.log_offset()
            env.link.cut("reset")
            await env.fairfax.wait_for_log_async(r"s2s disconnected: fairfax\.localhost->raleigh\.localhost", 10, off_f)
            await env.raleigh.wait_for_log_async(r"s2s disconnected: fairfax\.localhost->raleigh\.localhost", 10, off_r)
            # New connections are refused: fairfax gives up and bounces the stanza.
            off_f = env.fairfax.log_offset()
            alice.send_chat(f"bob@{RALEIGH}", "refused")
            await env.fairfax.wait_for_log_async(r"failed outgoing connection to raleigh\.localhost", 10, off_f)
            await hub.wait_for(lambda: alice.messages(type="error"), 10, "alice gets the bounce")

            env.link.restore()
            again = f"again {uuid.uuid4().hex}"
            alice.send_chat(f"bob@{RALEIGH}", again)
            await hub.wait_for(lambda: bob.messages(body=again), 15, "chat after restore")
            assert not bob.messages(body="refused")

    run(body(), timeout=40)
