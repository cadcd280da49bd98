"""What the engine sends, as Prosody puts it on the wire: children in the stanza's own namespace
carry no explicit xmlns, or a receiving server finds no <body/> or <subject/> in a stanza that
crossed an s2s stream (whose default namespace is jabber:server).

Two real Prosody servers: fairfax.localhost has the room, raleigh.localhost the mirror. Direct
users on fairfax are the oracle: a user behind the mirror must get what they get.
"""

import uuid

from clients import ClientHub, run
from servers import FAIRFAX, RALEIGH
from test_dmuc_ejabberd import dmuc_pair

ROOM = f"chatroom@conference.{FAIRFAX}"
PASSWORD = "secret"
MUC_OWNER = "http://jabber.org/protocol/muc#owner"
DATA = "jabber:x:data"
STANZAS = "urn:ietf:params:xml:ns:xmpp-stanzas"


def configure(client, room, fields):
    """An owner's muc#owner form with `fields` ({var: value}); returns the IQ (await .send())."""
    iq = client.xmpp.make_iq_set(ito=room)
    query = iq.xml.makeelement(f"{{{MUC_OWNER}}}query", {})
    x = query.makeelement(f"{{{DATA}}}x", {"type": "submit"})
    for var, value in [("FORM_TYPE", "http://jabber.org/protocol/muc#roomconfig")] + list(fields.items()):
        field = x.makeelement(f"{{{DATA}}}field", {"var": var})
        v = field.makeelement(f"{{{DATA}}}value", {})
        v.text = value
        field.append(v)
        x.append(field)
    query.append(x)
    iq.xml.append(query)
    return iq


def send_subject(client, room, text):
    msg = client.xmpp.make_message(mto=room, mtype="groupchat")
    msg["subject"] = text
    msg["id"] = client.xmpp.new_id()
    msg.send()
    return msg["id"]


def subjects(client, room, text):
    """Subject changes to `text` that `client` was shown."""
    return [r for r in client.messages(from_=room, type="groupchat")
            if r.stanza.xml.find("{jabber:client}subject") is not None
            and r.stanza.xml.find("{jabber:client}subject").text == text]


def error_of(r):
    """(error type, defined condition) of an error stanza."""
    err = r.stanza.xml.find("{jabber:client}error")
    assert err is not None, r.raw
    conds = [c.tag.split("}")[1] for c in err if c.tag.startswith(f"{{{STANZAS}}}") and not c.tag.endswith("}text")]
    return err.get("type"), conds


def test_mirror_users_body_and_subject_reach_the_master(make_mixed_servers):
    env = dmuc_pair(make_mixed_servers, "prosody", "prosody")
    env.fairfax.register_many([("alice", PASSWORD), ("bob", PASSWORD), ("carol", PASSWORD)])
    env.raleigh.register_many([("wayne", PASSWORD)])

    async def scenario():
        async with ClientHub(watch=[env.link]) as hub:
            try:
                alice = await hub.connect(f"alice@{FAIRFAX}", PASSWORD, env.fairfax.c2s_port)
                await alice.join(ROOM, "Alice")
                # Only moderators may change the subject (Prosody's default, made explicit).
                await configure(alice, ROOM, {"muc#roomconfig_changesubject": "0"}).send(timeout=10)
                carol = await hub.connect(f"carol@{FAIRFAX}", PASSWORD, env.fairfax.c2s_port)
                await carol.join(ROOM, "Carol")
                wayne = await hub.connect(f"wayne@{RALEIGH}", PASSWORD, env.raleigh.c2s_port)
                await wayne.join(ROOM, "Wayne", history=None, timeout=20)

                # A message from behind the mirror is history at the master, as a direct one is.
                from_carol = f"direct {uuid.uuid4().hex}"
                from_wayne = f"mirrored {uuid.uuid4().hex}"
                carol.send_groupchat(ROOM, from_carol)
                await hub.wait_for(lambda: alice.groupchat(ROOM, from_carol), 10, "carol's message")
                wayne.send_groupchat(ROOM, from_wayne)
                await hub.wait_for(lambda: alice.groupchat(ROOM, from_wayne), 10, "wayne's message")
                bob = await hub.connect(f"bob@{FAIRFAX}", PASSWORD, env.fairfax.c2s_port)
                await bob.join(ROOM, "Bob", history=20)
                history = [r.body for r in bob.groupchat(ROOM)
                           if r.stanza.xml.find("{urn:xmpp:delay}delay") is not None]
                assert from_carol in history, hub.dump()
                assert from_wayne in history, f"the mirror user's message is no history at the master: {history}"

                # A participant may not change the subject: the same error, behind the mirror or not.
                direct_try, mirrored_try = f"carol's {uuid.uuid4().hex}", f"wayne's {uuid.uuid4().hex}"
                carol_id = send_subject(carol, ROOM, direct_try)
                await hub.wait_for(lambda: carol.messages(type="error", where=lambda r: r.id == carol_id), 10,
                                   "carol refused")
                wayne_id = send_subject(wayne, ROOM, mirrored_try)
                await hub.wait_for(lambda: wayne.messages(type="error", where=lambda r: r.id == wayne_id), 15,
                                   "wayne refused")
                direct_err = error_of(carol.messages(type="error", where=lambda r: r.id == carol_id)[0])
                mirrored_err = error_of(wayne.messages(type="error", where=lambda r: r.id == wayne_id)[0])
                assert direct_err == ("auth", ["forbidden"]), direct_err
                assert mirrored_err == direct_err, (mirrored_err, direct_err)
                # Nobody saw either change (a barrier after them has reached everyone).
                barrier = f"barrier {uuid.uuid4().hex}"
                alice.send_groupchat(ROOM, barrier)
                await hub.wait_for(lambda: all(c.groupchat(ROOM, barrier) for c in (alice, bob, carol, wayne)),
                                   10, "barrier")
                for c in (alice, bob, carol, wayne):
                    for text in (direct_try, mirrored_try):
                        assert not subjects(c, ROOM, text), (c.jid, text, hub.dump())

                # A moderator's subject change still goes through, to everyone.
                allowed = f"alice's {uuid.uuid4().hex}"
                send_subject(alice, ROOM, allowed)
                await hub.wait_for(lambda: all(subjects(c, ROOM, allowed) for c in (alice, bob, carol, wayne)),
                                   10, "alice's subject seen by all")
            except AssertionError as e:
                raise AssertionError(f"{e}\n{hub.dump()}\n{env.link.summary()}") from None

    run(scenario(), timeout=120)
