"""Privacy at a trusted mirror: real JIDs cross the link only when one of the mirror's occupants
may see them under the room's whois rule (issue 11).

A semi-anonymous room (both hosts' default): alice (owner) and carol on the master's server,
bob (a participant) behind the mirror. Nothing on the link to the mirror names alice or carol.
Then dave, an admin (so a moderator), joins through the mirror: he sees their real JIDs in his
occupant list, as a moderator beside the room does. Every pairing, real servers.
"""

import pytest

from clients import ClientHub, run
from servers import CONFERENCE, FAIRFAX, RALEIGH
from test_dmuc_ejabberd import dmuc_pair

ROOM = f"privacy@{CONFERENCE}"
PASSWORD = "secret"
MUC_ADMIN = "http://jabber.org/protocol/muc#admin"
MUC_USER = "http://jabber.org/protocol/muc#user"

PAIRINGS = [
    pytest.param("prosody", "prosody", id="P-P"),
    pytest.param("ejabberd", "ejabberd", id="E-E"),
    pytest.param("ejabberd", "prosody", id="Emaster-Pmirror"),
    pytest.param("prosody", "ejabberd", id="Pmaster-Emirror"),
]


def to_mirror_naming(env, *bare_jids):
    """Stanzas the master's side sent over the link that carry one of these real JIDs."""
    return [s for s in env.link.stanzas(where=lambda s: s.sender != RALEIGH)
            if any(j in s.raw for j in bare_jids)]


def item_jid(r):
    x = r.stanza.xml.find(f"{{{MUC_USER}}}x")
    item = x.find(f"{{{MUC_USER}}}item") if x is not None else None
    return item.get("jid") if item is not None else None


@pytest.mark.parametrize("master, mirror", PAIRINGS)
def test_real_jids_cross_only_for_a_moderator(make_mixed_servers, master, mirror):
    env = dmuc_pair(make_mixed_servers, master, mirror)
    env.fairfax.register_many([("alice", PASSWORD), ("carol", PASSWORD)])
    env.raleigh.register_many([("bob", PASSWORD), ("dave", PASSWORD)])
    alice_jid, carol_jid = f"alice@{FAIRFAX}", f"carol@{FAIRFAX}"

    async def scenario():
        async with ClientHub(watch=[env.link]) as hub:
            alice = await hub.connect(alice_jid, PASSWORD, env.fairfax.c2s_port)
            await alice.join(ROOM, "alice")
            iq = alice.xmpp.make_iq_set(ito=ROOM)
            query = iq.xml.makeelement(f"{{{MUC_ADMIN}}}query", {})
            query.append(query.makeelement(f"{{{MUC_ADMIN}}}item",
                                           {"jid": f"dave@{RALEIGH}", "affiliation": "admin"}))
            iq.xml.append(query)
            await iq.send(timeout=10)
            carol = await hub.connect(carol_jid, PASSWORD, env.fairfax.c2s_port)
            await carol.join(ROOM, "carol")

            bob = await hub.connect(f"bob@{RALEIGH}", PASSWORD, env.raleigh.c2s_port)
            await bob.join(ROOM, "bob", timeout=20)
            bob.send_groupchat(ROOM, "hello from bob", id="p-1")
            alice.send_groupchat(ROOM, "hello from alice", id="p-2")
            await hub.wait_for(lambda: bob.groupchat(ROOM, "hello from alice")
                               and alice.groupchat(ROOM, "hello from bob"), 15, "chat both ways")
            leaked = to_mirror_naming(env, alice_jid, carol_jid)
            assert not leaked, "real JIDs crossed to a mirror with no moderator:\n" + \
                "\n".join(s.raw for s in leaked)
            for nick in ("alice", "carol"):
                seen = bob.presences(from_=f"{ROOM}/{nick}")
                assert seen and all(item_jid(r) is None for r in seen), [r.raw for r in seen]

            dave = await hub.connect(f"dave@{RALEIGH}", PASSWORD, env.raleigh.c2s_port)
            await dave.join(ROOM, "dave", timeout=20)
            for nick, real in (("alice", alice_jid), ("carol", carol_jid)):
                seen = dave.presences(from_=f"{ROOM}/{nick}")
                assert seen and (item_jid(seen[0]) or "").startswith(real), [r.raw for r in seen]
            # Bob still sees no real JID of the newcomer, nor of anyone else.
            await hub.wait_for(lambda: bob.presences(from_=f"{ROOM}/dave"), 15, "bob sees dave")
            assert all(item_jid(r) is None for r in bob.presences(from_=f"{ROOM}/dave"))

    run(scenario(), timeout=120)
