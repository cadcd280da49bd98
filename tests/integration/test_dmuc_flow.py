"""The whole DMUC3 flow between two real Prosody servers with mod_dmuc.

fairfax.localhost hosts the room (master: conference.fairfax.localhost with mod_dmuc);
raleigh.localhost has the mirror (mirror.raleigh.localhost) and routes its users through it.
Real slixmpp clients join the room's real address; a counting proxy sits on the s2s link.
"""

import os
import uuid

import pytest

from clients import ClientHub, run
from servers import CONFERENCE, FAIRFAX, RALEIGH, is_ack

ROOM = f"chatroom@{CONFERENCE}"
MIRROR = f"mirror.{RALEIGH}"
PASSWORD = "secret"
DIST = os.path.join(os.path.dirname(__file__), "..", "..", "dist", "prosody")


def dmuc_env(make_two_servers, conference_options=()):
    dist = os.path.abspath(DIST)
    if not os.path.exists(os.path.join(dist, "dmuc_prosody.so")):
        raise AssertionError(f"{dist} has no dmuc_prosody.so: run `make dist` first")
    return make_two_servers(
        plugin_paths=[dist],
        conference_options=['modules_enabled = { "dmuc" }',
                            f'dmuc_trusted_mirrors = {{ "{MIRROR}" }}'] + list(conference_options),
        raleigh_modules=["dmuc"],
        # Pings (every 30 s by default) would add to the stanza counts asserted here; the link
        # loss tests have them (test_dmuc_link_loss.py).
        raleigh_blocks=[f'Component "{MIRROR}" "dmuc"\n    dmuc_masters = {{ "{CONFERENCE}" }}\n'
                        '    dmuc_ping_interval = 3600'],
    )


def _users(env, fairfax_users, raleigh_users):
    env.fairfax.register_many([(u, PASSWORD) for u in fairfax_users])
    env.raleigh.register_many([(u, PASSWORD) for u in raleigh_users])


def test_first_join_second_join_messages_and_leaves(make_two_servers):
    env = dmuc_env(make_two_servers)
    _users(env, ["alice"], ["wayne", "keith"])

    async def scenario():
        async with ClientHub(watch=[env.link]) as hub:
            try:
                alice = await hub.connect(f"alice@{FAIRFAX}", PASSWORD, env.fairfax.c2s_port)
                await alice.join(ROOM, "Alice")
                alice.send_groupchat(ROOM, "before anyone else came")
                await hub.wait_for(lambda: alice.groupchat(ROOM, body="before anyone else came"), 10, "history seed")

                # First join through the mirror: config, roster and history cross the link.
                wayne = await hub.connect(f"wayne@{RALEIGH}", PASSWORD, env.raleigh.c2s_port)
                await wayne.join(ROOM, "Wayne", history=None, timeout=20)
                assert wayne.occupants(ROOM) == {"Alice", "Wayne"}
                assert wayne.groupchat(ROOM, body="before anyone else came"), hub.dump()
                await hub.wait_for(lambda: "Wayne" in alice.occupants(ROOM), 10, "alice sees Wayne")

                # A second local join crosses the link as one presence each way.
                keith = await hub.connect(f"keith@{RALEIGH}", PASSWORD, env.raleigh.c2s_port)
                env.link.reset()
                await keith.join(ROOM, "Keith", history=None, timeout=20)
                await hub.wait_for(lambda: "Keith" in alice.occupants(ROOM), 10, "alice sees Keith")
                await hub.wait_for(lambda: "Keith" in wayne.occupants(ROOM), 10, "wayne sees Keith")
                joined = env.link.snapshot()
                assert keith.occupants(ROOM) == {"Alice", "Wayne", "Keith"}
                assert keith.groupchat(ROOM, body="before anyone else came"), "history served by the mirror"
                assert joined.stanza_counts.get(RALEIGH) == {"presence": 1}, joined.stanza_counts
                assert joined.stanza_counts.get(FAIRFAX) == {"presence": 1}, joined.stanza_counts

                # A master-side message crosses once and reaches each mirror user once.
                env.link.reset()
                body = f"from alice {uuid.uuid4().hex}"
                alice.send_groupchat(ROOM, body)
                await hub.wait_for(lambda: wayne.groupchat(ROOM, body) and keith.groupchat(ROOM, body), 10,
                                   "raleigh users get alice's message")
                sent = env.link.snapshot()
                assert sent.stanza_counts.get(FAIRFAX) == {"message": 1}, sent.stanza_counts

                # A mirror user's message: local delivery at once, one copy to the master, no echo.
                env.link.reset()
                body = f"from wayne {uuid.uuid4().hex}"
                wayne.send_groupchat(ROOM, body)
                await hub.wait_for(lambda: alice.groupchat(ROOM, body) and keith.groupchat(ROOM, body)
                                   and wayne.groupchat(ROOM, body), 10, "everyone gets wayne's message")
                barrier = f"barrier {uuid.uuid4().hex}"
                alice.send_groupchat(ROOM, barrier)
                await hub.wait_for(lambda: wayne.groupchat(ROOM, barrier) and keith.groupchat(ROOM, barrier), 10,
                                   "barrier")
                sent = env.link.snapshot()
                assert sent.stanza_counts.get(RALEIGH) == {"message": 1}, sent.stanza_counts
                # Back to raleigh: the barrier, and the master's acknowledgement of Wayne's
                # message (in place of the echo plain MUC sends him; src/ack.rs).
                assert sent.stanza_counts.get(FAIRFAX) == {"message": 2}, sent.stanza_counts
                acks = sent.count(sender=FAIRFAX, where=is_ack)
                assert acks == 1, [(s.sender, s.raw) for s in sent.stanzas]
                for c in (alice, wayne, keith):
                    assert len(c.groupchat(ROOM, body)) == 1, (c.jid, c.groupchat(ROOM, body))

                # Presence change through the mirror reaches everyone.
                keith.send_presence(ROOM, "Keith", show="away", status="lunch")
                await hub.wait_for(lambda: any(r.stanza["status"] == "lunch" for r in alice.presences(f"{ROOM}/Keith")),
                                   10, "alice sees keith away")
                await hub.wait_for(lambda: any(r.stanza["status"] == "lunch" for r in wayne.presences(f"{ROOM}/Keith")),
                                   10, "wayne sees keith away")

                # Leaves: keith leaves (alice and wayne see it); then wayne, the last local occupant.
                await keith.leave(ROOM, "Keith")
                await hub.wait_for(lambda: "Keith" not in alice.occupants(ROOM), 10, "alice sees keith leave")
                await hub.wait_for(lambda: "Keith" not in wayne.occupants(ROOM), 10, "wayne sees keith leave")
                await wayne.leave(ROOM, "Wayne")
                await hub.wait_for(lambda: "Wayne" not in alice.occupants(ROOM), 10, "alice sees wayne leave")

                # The room now costs nothing on the link.
                env.link.reset()
                body = f"nobody remote {uuid.uuid4().hex}"
                alice.send_groupchat(ROOM, body)
                await hub.wait_for(lambda: alice.groupchat(ROOM, body), 10, "alice's echo")
                quiet = env.link.snapshot()
                assert not quiet.stanza_counts, quiet.stanza_counts
            except AssertionError as e:
                raise AssertionError(f"{e}\n{hub.dump()}\n{env.link.summary()}") from None

    run(scenario(), timeout=90)


def test_refused_join_and_nick_change(make_two_servers):
    """A join the master refuses reaches only that user; a nick change through the mirror gets
    not-acceptable; the room's other users see nothing of either."""
    env = dmuc_env(make_two_servers, conference_options=['restrict_room_creation = false'])
    _users(env, ["alice"], ["wayne", "keith", "mallory"])

    async def scenario():
        async with ClientHub(watch=[env.link]) as hub:
            try:
                alice = await hub.connect(f"alice@{FAIRFAX}", PASSWORD, env.fairfax.c2s_port)
                await alice.join(ROOM, "Alice")
                wayne = await hub.connect(f"wayne@{RALEIGH}", PASSWORD, env.raleigh.c2s_port)
                await wayne.join(ROOM, "Wayne", timeout=20)
                keith = await hub.connect(f"keith@{RALEIGH}", PASSWORD, env.raleigh.c2s_port)
                await keith.join(ROOM, "Keith", timeout=20)

                # alice (owner) bans mallory; mallory's join through the mirror is refused.
                iq = alice.xmpp.make_iq_set(ito=ROOM)
                query = iq.xml.makeelement("{http://jabber.org/protocol/muc#admin}query", {})
                query.append(query.makeelement("{http://jabber.org/protocol/muc#admin}item",
                                               {"jid": f"mallory@{RALEIGH}", "affiliation": "outcast"}))
                iq.xml.append(query)
                await iq.send(timeout=10)
                mallory = await hub.connect(f"mallory@{RALEIGH}", PASSWORD, env.raleigh.c2s_port)
                env.link.reset()
                pres = mallory.xmpp.make_presence(pto=f"{ROOM}/Mallory")
                pres.enable("muc_join")
                pres.send()
                await hub.wait_for(lambda: mallory.presences(f"{ROOM}/Mallory", type="error"), 15,
                                   "mallory told her join failed")
                err = mallory.presences(f"{ROOM}/Mallory", type="error")
                assert len(err) == 1, err
                assert "forbidden" in err[0].raw, err[0].raw
                # DMUC3: the refusal went to the mirror, to mallory's escaped JID.
                refusals = [s for s in env.link.snapshot().stanzas if s.sender == FAIRFAX and s.name == "presence"]
                assert [s.to.lower() for s in refusals] == [f"mallory\\40{RALEIGH}\\2f{mallory.jid.resource}@{MIRROR}".lower()], refusals
                # Nobody else heard of it.
                for c in (alice, wayne, keith):
                    assert not c.presences(f"{ROOM}/Mallory"), (c.jid, c.presences(f"{ROOM}/Mallory"))

                # Nick change through the mirror: not-acceptable, and Wayne stays Wayne.
                start = len(wayne.received)
                wayne.xmpp.send_presence(pto=f"{ROOM}/Bruce")
                await hub.wait_for(lambda: any(r.type == "error" for r in wayne.presences(f"{ROOM}/Bruce")), 10,
                                   "nick change refused")
                refusal = [r for r in wayne.presences(f"{ROOM}/Bruce") if r.type == "error"][0]
                assert "not-acceptable" in refusal.raw, refusal.raw
                barrier = f"barrier {uuid.uuid4().hex}"
                alice.send_groupchat(ROOM, barrier)
                await hub.wait_for(lambda: wayne.groupchat(ROOM, barrier) and keith.groupchat(ROOM, barrier), 10,
                                   "barrier")
                assert "Bruce" not in alice.occupants(ROOM) and "Wayne" in alice.occupants(ROOM)
                assert "Bruce" not in keith.occupants(ROOM)
                assert not [r for r in wayne.received[start:] if r.kind == "presence" and r.type != "error"]
            except AssertionError as e:
                raise AssertionError(f"{e}\n{hub.dump()}\n{env.link.summary()}") from None

    run(scenario(), timeout=90)


def test_disco_advertises_dmuc(make_two_servers):
    env = dmuc_env(make_two_servers)
    _users(env, ["alice"], ["wayne"])

    async def scenario():
        async with ClientHub(watch=[env.link]) as hub:
            wayne = await hub.connect(f"wayne@{RALEIGH}", PASSWORD, env.raleigh.c2s_port)
            wayne.xmpp.register_plugin("xep_0030")
            info = await wayne.xmpp["xep_0030"].get_info(jid=CONFERENCE, timeout=15)
            assert "http://tridsys.com/protocol/dmuc" in info["disco_info"]["features"], info

    run(scenario(), timeout=60)
