"""The master's side on real servers, each check against a direct user of the same room (the
host's own MUC is the oracle):

- a config change reaches the mirror before the broadcast announcing it, and joins through the
  mirror are then served by the new rule (whois anyone: status 100 and real JIDs; moderators: no
  real JIDs), on a Prosody and on an ejabberd master;
- the room's answers to a user behind the mirror (an IQ result, a private message) travel through
  the mirror, in order with the broadcasts: an owner there gets the result of the config form and
  the announcement in the order a direct owner does;
- a user behind the mirror leaves and joins again (the ejabberd master used to drop the rejoin).

fairfax.localhost has the room, raleigh.localhost the mirror.
"""

import uuid

import pytest

from clients import ClientHub, run
from servers import FAIRFAX, RALEIGH
from test_dmuc_ejabberd import dmuc_pair
from test_wire_namespace import configure

ROOM = f"chatroom@conference.{FAIRFAX}"
MIRROR = f"mirror.{RALEIGH}"
PASSWORD = "secret"
MUC_USER = "http://jabber.org/protocol/muc#user"
MUC_ADMIN = "http://jabber.org/protocol/muc#admin"
DMUC0 = "urn:xmpp:dmuc:0"


def announcements(client, code):
    """Config announcements with status `code` (a groupchat message from the bare room)."""
    return [r for r in client.messages(from_=ROOM, type="groupchat")
            if not r.from_.resource and code in r.status_codes()]


def own_codes(presence):
    return sorted(presence.status_codes())


def real_jids(client, nicks):
    """{nick: real JID or None} as `client` was last shown each occupant."""
    seen = {}
    for r in client.presences(from_=ROOM):
        nick = r.from_.resource
        if nick in nicks and r.type == "":
            item = r.stanza.xml.find(f"{{{MUC_USER}}}x/{{{MUC_USER}}}item")
            seen[nick] = item.get("jid") if item is not None else None
    return seen


async def grant(client, room, jid, affiliation):
    iq = client.xmpp.make_iq_set(ito=room)
    query = iq.xml.makeelement(f"{{{MUC_ADMIN}}}query", {})
    query.append(query.makeelement(f"{{{MUC_ADMIN}}}item", {"jid": jid, "affiliation": affiliation}))
    iq.xml.append(query)
    await iq.send(timeout=10)


@pytest.mark.parametrize("master", ["prosody", "ejabberd"])
def test_config_change_reaches_the_mirror_first(make_mixed_servers, master):
    env = dmuc_pair(make_mixed_servers, master, "prosody")
    env.fairfax.register_many([(u, PASSWORD) for u in ("alice", "bob", "carol", "dave")])
    env.raleigh.register_many([(u, PASSWORD) for u in ("wayne", "keith", "jack")])

    async def scenario():
        async with ClientHub(watch=[env.link]) as hub:
            try:
                alice = await hub.connect(f"alice@{FAIRFAX}", PASSWORD, env.fairfax.c2s_port)
                await alice.join(ROOM, "Alice")
                wayne = await hub.connect(f"wayne@{RALEIGH}", PASSWORD, env.raleigh.c2s_port)
                await wayne.join(ROOM, "Wayne", history=None, timeout=20)
                # Bob joins after the mirror's sync: with only a participant there, the mirror
                # gets his presence without his real JID.
                bob = await hub.connect(f"bob@{FAIRFAX}", PASSWORD, env.fairfax.c2s_port)
                await bob.join(ROOM, "Bob")
                await hub.wait_for(lambda: "Bob" in wayne.occupants(ROOM), 10, "wayne sees bob")

                # Non-anonymous: the mirror gets the config, then the announcement.
                env.link.reset()
                await configure(alice, ROOM, {"muc#roomconfig_whois": "anyone"}).send(timeout=10)
                await hub.wait_for(lambda: announcements(wayne, 172), 10, "wayne sees status 172")
                to_mirror = [s for s in env.link.snapshot().stanzas if s.to == MIRROR]
                config_at = [i for i, s in enumerate(to_mirror) if s.name == "iq" and DMUC0 in s.raw
                             and "<config" in s.raw]
                announced_at = [i for i, s in enumerate(to_mirror) if s.name == "message" and "172" in s.raw]
                assert config_at and announced_at and config_at[0] < announced_at[0], \
                    [s.raw for s in to_mirror]

                carol = await hub.connect(f"carol@{FAIRFAX}", PASSWORD, env.fairfax.c2s_port)
                direct = await carol.join(ROOM, "Carol")
                keith = await hub.connect(f"keith@{RALEIGH}", PASSWORD, env.raleigh.c2s_port)
                mirrored = await keith.join(ROOM, "Keith", timeout=20)
                assert 100 in direct.status_codes(), direct.raw
                assert own_codes(mirrored) == own_codes(direct), (mirrored.raw, direct.raw)
                others = {"Alice", "Bob", "Wayne"}
                direct_jids, mirrored_jids = real_jids(carol, others), real_jids(keith, others)
                assert all(direct_jids.get(n) for n in others), direct_jids
                assert {n: bool(j) for n, j in mirrored_jids.items()} == {n: True for n in others}, mirrored_jids
                assert {n: j.split("/")[0] for n, j in mirrored_jids.items()} == \
                    {n: j.split("/")[0] for n, j in direct_jids.items()}

                # Semi-anonymous again.
                await configure(alice, ROOM, {"muc#roomconfig_whois": "moderators"}).send(timeout=10)
                await hub.wait_for(lambda: announcements(wayne, 173) and announcements(keith, 173), 10,
                                   "mirror users see status 173")
                dave = await hub.connect(f"dave@{FAIRFAX}", PASSWORD, env.fairfax.c2s_port)
                direct = await dave.join(ROOM, "Dave")
                jack = await hub.connect(f"jack@{RALEIGH}", PASSWORD, env.raleigh.c2s_port)
                mirrored = await jack.join(ROOM, "Jack", timeout=20)
                others = {"Alice", "Bob", "Carol", "Wayne", "Keith"}
                assert real_jids(dave, others) == {n: None for n in others}, real_jids(dave, others)
                assert real_jids(jack, others) == {n: None for n in others}, real_jids(jack, others)
                assert 100 not in mirrored.status_codes() and 100 not in direct.status_codes()
                assert own_codes(mirrored) == own_codes(direct), (mirrored.raw, direct.raw)
            except AssertionError as e:
                raise AssertionError(f"{e}\n{hub.dump()}\n{env.link.summary()}") from None

    run(scenario(), timeout=150)


def _answer_then_announcement(client, iq_id, start):
    """The order in which `client` got the result of its form and the config announcement (of
    what it received from position `start` on)."""
    events = []
    for r in client.received[start:]:
        if r.kind == "iq" and r.id == iq_id:
            events.append("result")
        elif r.kind == "message" and r.type == "groupchat" and not r.from_.resource \
                and r.from_.bare == ROOM and 104 in r.status_codes():
            events.append("announcement")
    return events


@pytest.mark.parametrize("master", ["prosody", "ejabberd"])
def test_the_rooms_answers_go_through_the_mirror(make_mixed_servers, master):
    env = dmuc_pair(make_mixed_servers, master, "prosody")
    env.fairfax.register_many([("alice", PASSWORD)])
    env.raleigh.register_many([("wayne", PASSWORD)])

    async def scenario():
        async with ClientHub(watch=[env.link]) as hub:
            try:
                alice = await hub.connect(f"alice@{FAIRFAX}", PASSWORD, env.fairfax.c2s_port)
                await alice.join(ROOM, "Alice")
                await grant(alice, ROOM, f"wayne@{RALEIGH}", "owner")
                wayne = await hub.connect(f"wayne@{RALEIGH}", PASSWORD, env.raleigh.c2s_port)
                await wayne.join(ROOM, "Wayne", history=None, timeout=20)

                # The owner behind the mirror submits the form (no form fetched first: this is
                # the room's first stanza to him that is no broadcast).
                env.link.reset()
                start = len(wayne.received)
                iq = configure(wayne, ROOM, {"muc#roomconfig_roomname": f"by wayne {uuid.uuid4().hex}"})
                await iq.send(timeout=10)
                await hub.wait_for(lambda: len(_answer_then_announcement(wayne, iq["id"], start)) == 2, 10,
                                   "wayne's result and the announcement")
                mirrored = _answer_then_announcement(wayne, iq["id"], start)
                results = [s for s in env.link.snapshot().stanzas if s.name == "iq" and s.type == "result"
                           and s.attrs.get("id") == iq["id"]]
                assert [s.to.split("@")[-1] for s in results] == [MIRROR], [s.raw for s in results]
                # The direct owner is the oracle.
                start = len(alice.received)
                iq = configure(alice, ROOM, {"muc#roomconfig_roomname": f"by alice {uuid.uuid4().hex}"})
                await iq.send(timeout=10)
                await hub.wait_for(lambda: len(_answer_then_announcement(alice, iq["id"], start)) == 2, 10,
                                   "alice's result and the announcement")
                assert mirrored == _answer_then_announcement(alice, iq["id"], start), mirrored

                # A private message from the room arrives, through the mirror.
                env.link.reset()
                body = f"psst {uuid.uuid4().hex}"
                alice.send_chat(f"{ROOM}/Wayne", body)
                await hub.wait_for(lambda: wayne.messages(from_=f"{ROOM}/Alice", body=body), 10, "wayne's PM")
                pms = env.link.stanzas(name="message", where=lambda s: body in s.raw)
                assert [s.to.split("@")[-1] for s in pms] == [MIRROR], [s.raw for s in pms]
                assert len(wayne.messages(from_=f"{ROOM}/Alice", body=body)) == 1
            except AssertionError as e:
                raise AssertionError(f"{e}\n{hub.dump()}\n{env.link.summary()}") from None

    run(scenario(), timeout=120)


@pytest.mark.parametrize("master, mirror", [("ejabberd", "prosody"), ("ejabberd", "ejabberd"),
                                            ("prosody", "prosody")])
def test_leave_then_rejoin_through_the_mirror(make_mixed_servers, master, mirror):
    env = dmuc_pair(make_mixed_servers, master, mirror)
    env.fairfax.register_many([("alice", PASSWORD)])
    env.raleigh.register_many([("wayne", PASSWORD), ("keith", PASSWORD)])

    async def scenario():
        async with ClientHub(watch=[env.link]) as hub:
            try:
                alice = await hub.connect(f"alice@{FAIRFAX}", PASSWORD, env.fairfax.c2s_port)
                await alice.join(ROOM, "Alice")
                wayne = await hub.connect(f"wayne@{RALEIGH}", PASSWORD, env.raleigh.c2s_port)
                # Presences without ids (ids are optional; many clients send none): the rejoin
                # is then the very presence of the first join.
                wayne.xmpp.use_presence_ids = False
                await wayne.join(ROOM, "Wayne", history=None, timeout=20)
                keith = await hub.connect(f"keith@{RALEIGH}", PASSWORD, env.raleigh.c2s_port)
                await keith.join(ROOM, "Keith", history=None, timeout=20)
                for _ in range(2):
                    await wayne.leave(ROOM, "Wayne")
                    await hub.wait_for(lambda: "Wayne" not in alice.occupants(ROOM)
                                       and "Wayne" not in keith.occupants(ROOM), 10, "wayne's leave seen")
                    await wayne.join(ROOM, "Wayne", history=None, timeout=20)
                    await hub.wait_for(lambda: "Wayne" in alice.occupants(ROOM)
                                       and "Wayne" in keith.occupants(ROOM), 10, "wayne's rejoin seen")
                    assert wayne.occupants(ROOM) == {"Alice", "Keith", "Wayne"}, wayne.occupants(ROOM)
                body = f"back {uuid.uuid4().hex}"
                wayne.send_groupchat(ROOM, body)
                await hub.wait_for(lambda: alice.groupchat(ROOM, body) and keith.groupchat(ROOM, body), 10,
                                   "wayne's message after the rejoin")
            except AssertionError as e:
                raise AssertionError(f"{e}\n{hub.dump()}\n{env.link.summary()}") from None

    run(scenario(), timeout=120)
