"""mod_dmuc on ejabberd, and interop with Prosody both ways.

The same DMUC3 flow as on Prosody (test_dmuc_flow.py) in three pairings: ejabberd master and
ejabberd mirror, ejabberd master and Prosody mirror, Prosody master and ejabberd mirror. In each
pairing a groupchat message crosses the s2s link once per mirror.
"""

import os
import uuid

import pytest

from clients import ClientHub, run
from servers import CONFERENCE, FAIRFAX, RALEIGH, is_ack

ROOM = f"chatroom@{CONFERENCE}"
MIRROR = f"mirror.{RALEIGH}"
PASSWORD = "secret"
TOP = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
# DMUC_DIST: a copy of dist/ to test (as in test_transparency.py).
DIST = os.environ.get("DMUC_DIST") or os.path.join(TOP, "dist")
PROSODY_DIST = os.path.join(DIST, "prosody")
EJABBERD_DIST = os.path.join(DIST, "ejabberd", "mod_dmuc")


def dmuc_pair(make_mixed_servers, master, mirror):
    for path in (os.path.join(PROSODY_DIST, "dmuc_prosody.so"), os.path.join(EJABBERD_DIST, "priv", "dmuc_nif.so")):
        if not os.path.exists(path):
            raise AssertionError(f"{path} missing: run `make dist` first")
    kw = dict(master=master, mirror=mirror, plugin_paths=[PROSODY_DIST],
              contrib_modules={"mod_dmuc": EJABBERD_DIST})
    if master == "ejabberd":
        kw["master_modules"] = {"mod_dmuc": {"trusted_mirrors": [MIRROR]}}
    else:
        kw["conference_options"] = ['modules_enabled = { "dmuc" }', f'dmuc_trusted_mirrors = {{ "{MIRROR}" }}']
    if mirror == "ejabberd":
        # Pings (every 30 s by default) would add to the stanza counts these tests assert; they
        # have tests of their own (test_dmuc_link_loss.py).
        kw["mirror_modules"] = {"mod_dmuc": {"mirror_host": MIRROR, "masters": [CONFERENCE], "ping_interval": 3600}}
    else:
        kw["mirror_modules"] = ["dmuc"]
        kw["mirror_blocks"] = [f'Component "{MIRROR}" "dmuc"\n    dmuc_masters = {{ "{CONFERENCE}" }}\n'
                               '    dmuc_ping_interval = 3600']
    return make_mixed_servers(**kw)


PAIRINGS = [("ejabberd", "ejabberd"), ("ejabberd", "prosody"), ("prosody", "ejabberd")]


@pytest.mark.parametrize("master, mirror", PAIRINGS)
def test_dmuc_flow(make_mixed_servers, master, mirror):
    env = dmuc_pair(make_mixed_servers, master, mirror)
    env.fairfax.register("alice", PASSWORD)
    env.raleigh.register_many([("wayne", PASSWORD), ("keith", PASSWORD), ("mallory", PASSWORD)])

    async def scenario():
        async with ClientHub(watch=[env.link]) as hub:
            try:
                alice = await hub.connect(f"alice@{FAIRFAX}", PASSWORD, env.fairfax.c2s_port)
                await alice.join(ROOM, "Alice")
                alice.send_groupchat(ROOM, "before anyone else came")
                await hub.wait_for(lambda: alice.groupchat(ROOM, "before anyone else came"), 10, "history seed")

                wayne = await hub.connect(f"wayne@{RALEIGH}", PASSWORD, env.raleigh.c2s_port)
                await wayne.join(ROOM, "Wayne", history=None, timeout=20)
                assert wayne.occupants(ROOM) == {"Alice", "Wayne"}, hub.dump()
                assert wayne.groupchat(ROOM, "before anyone else came"), "history through the mirror"
                await hub.wait_for(lambda: "Wayne" in alice.occupants(ROOM), 10, "alice sees Wayne")

                keith = await hub.connect(f"keith@{RALEIGH}", PASSWORD, env.raleigh.c2s_port)
                env.link.reset()
                await keith.join(ROOM, "Keith", history=None, timeout=20)
                await hub.wait_for(lambda: "Keith" in alice.occupants(ROOM) and "Keith" in wayne.occupants(ROOM),
                                   10, "everyone sees Keith")
                joined = env.link.snapshot()
                assert keith.occupants(ROOM) == {"Alice", "Wayne", "Keith"}
                assert keith.groupchat(ROOM, "before anyone else came"), "history served by the mirror"
                assert joined.stanza_counts.get(RALEIGH) == {"presence": 1}, joined.stanza_counts
                assert joined.stanza_counts.get(FAIRFAX) == {"presence": 1}, joined.stanza_counts

                env.link.reset()
                body = f"from alice {uuid.uuid4().hex}"
                alice.send_groupchat(ROOM, body)
                await hub.wait_for(lambda: wayne.groupchat(ROOM, body) and keith.groupchat(ROOM, body), 10,
                                   "raleigh users get alice's message")
                body2 = f"from wayne {uuid.uuid4().hex}"
                wayne.send_groupchat(ROOM, body2)
                await hub.wait_for(lambda: alice.groupchat(ROOM, body2) and keith.groupchat(ROOM, body2)
                                   and wayne.groupchat(ROOM, body2), 10, "everyone gets wayne's message")
                barrier = f"barrier {uuid.uuid4().hex}"
                alice.send_groupchat(ROOM, barrier)
                await hub.wait_for(lambda: wayne.groupchat(ROOM, barrier) and keith.groupchat(ROOM, barrier), 10,
                                   "barrier")
                sent = env.link.snapshot()
                print(f"\n[{master} master, {mirror} mirror] messages: {sent.stanza_counts}")
                # Alice's message, the barrier, and the acknowledgement of Wayne's (src/ack.rs).
                assert sent.stanza_counts.get(FAIRFAX) == {"message": 3}, sent.stanza_counts
                acks = sent.count(sender=FAIRFAX, where=is_ack)
                assert acks == 1, [s.raw for s in sent.stanzas]
                assert sent.stanza_counts.get(RALEIGH) == {"message": 1}, sent.stanza_counts
                for c in (alice, wayne, keith):
                    for b in (body, body2):
                        assert len(c.groupchat(ROOM, b)) == 1, (c.jid, b)

                # Presence change through the mirror reaches everyone.
                keith.send_presence(ROOM, "Keith", show="away", status="lunch")
                for c in (alice, wayne):
                    await hub.wait_for(lambda: any(r.stanza["status"] == "lunch" for r in c.presences(f"{ROOM}/Keith")),
                                       10, f"{c.jid} sees keith away")

                # A join the master refuses (mallory is banned) reaches only mallory.
                iq = alice.xmpp.make_iq_set(ito=ROOM)
                query = iq.xml.makeelement("{http://jabber.org/protocol/muc#admin}query", {})
                query.append(query.makeelement("{http://jabber.org/protocol/muc#admin}item",
                                               {"jid": f"mallory@{RALEIGH}", "affiliation": "outcast"}))
                iq.xml.append(query)
                await iq.send(timeout=10)
                mallory = await hub.connect(f"mallory@{RALEIGH}", PASSWORD, env.raleigh.c2s_port)
                pres = mallory.xmpp.make_presence(pto=f"{ROOM}/Mallory")
                pres.enable("muc_join")
                pres.send()
                await hub.wait_for(lambda: mallory.presences(f"{ROOM}/Mallory", type="error"), 15, "mallory refused")
                assert len(mallory.presences(f"{ROOM}/Mallory", type="error")) == 1
                for c in (alice, wayne, keith):
                    assert not c.presences(f"{ROOM}/Mallory"), c.jid

                # Discovery: the master's MUC service advertises DMUC.
                wayne.xmpp.register_plugin("xep_0030")
                info = await wayne.xmpp["xep_0030"].get_info(jid=CONFERENCE, timeout=15)
                assert "http://tridsys.com/protocol/dmuc" in info["disco_info"]["features"], info

                # Nick change through the mirror: not-acceptable.
                wayne.xmpp.send_presence(pto=f"{ROOM}/Bruce")
                await hub.wait_for(lambda: any(r.type == "error" for r in wayne.presences(f"{ROOM}/Bruce")), 10,
                                   "nick change refused")
                assert "not-acceptable" in [r for r in wayne.presences(f"{ROOM}/Bruce") if r.type == "error"][0].raw

                # Leaves, then the last local occupant: the room costs nothing afterwards.
                await keith.leave(ROOM, "Keith")
                await hub.wait_for(lambda: "Keith" not in alice.occupants(ROOM) and "Keith" not in wayne.occupants(ROOM),
                                   10, "keith's leave seen")
                await wayne.leave(ROOM, "Wayne")
                await hub.wait_for(lambda: "Wayne" not in alice.occupants(ROOM), 10, "alice sees wayne leave")
                env.link.reset()
                body = f"nobody remote {uuid.uuid4().hex}"
                alice.send_groupchat(ROOM, body)
                await hub.wait_for(lambda: alice.groupchat(ROOM, body), 10, "alice's echo")
                quiet = env.link.snapshot()
                assert not quiet.stanza_counts, quiet.stanza_counts
            except AssertionError as e:
                raise AssertionError(f"{e}\n{hub.dump()}\n{env.link.summary()}") from None

    run(scenario(), timeout=120)
