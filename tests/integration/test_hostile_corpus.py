"""A corpus of hostile and malformed stanzas (tests/hostile/corpus.xml) replayed through both
hosts, from outside and from local users, to every address dmuc answers for: the room, its
occupants, its MUC service, the mirror service and a user's escaped JID at the mirror (issue 11,
"Corpus").

Senders: an outsider (a user of a vhost the mirror does not speak for, over s2s; on a Prosody
mirror's server), a user of the master's server and a user of the mirror's server. After the
whole corpus: both servers run, every sender's stream is still open (each answers a ping from
its own server), no user was shown any of dmuc's own elements (a forged eviction mark would
otherwise reach the mirror inside a presence), and the room works both ways through the mirror.
"""

import uuid
from pathlib import Path

import pytest
from slixmpp.exceptions import IqError

from clients import ClientHub, run
from servers import CONFERENCE, FAIRFAX, RALEIGH
from test_bounds import EVIL, bomb_pair, register_evil

ROOM = f"chatroom@{CONFERENCE}"
MIRROR = f"mirror.{RALEIGH}"
PASSWORD = "secret"
CORPUS = Path(__file__).resolve().parents[1] / "hostile" / "corpus.xml"


def corpus():
    return [line.strip() for line in CORPUS.read_text(encoding="utf-8").splitlines()
            if line.strip().startswith("<") and not line.strip().startswith("<!--")
            and not line.strip().endswith("-->")]


def escaped(full_jid):
    """XEP-0106 escaping of a full JID as a node at the mirror (how the master addresses users
    behind it)."""
    node = full_jid.replace("\\", "\\5c").replace("@", "\\40").replace("/", "\\2f")
    return f"{node}@{MIRROR}"


@pytest.mark.parametrize("master, mirror", [
    pytest.param("prosody", "prosody", id="P-P"),
    pytest.param("ejabberd", "ejabberd", id="E-E"),
    pytest.param("ejabberd", "prosody", id="Emaster-Pmirror"),
    pytest.param("prosody", "ejabberd", id="Pmaster-Emirror"),
])
def test_hostile_corpus(make_mixed_servers, master, mirror):
    env = bomb_pair(make_mixed_servers, master, mirror, big_streams=False)
    env.fairfax.register_many([("alice", PASSWORD), ("bob", PASSWORD)])
    env.raleigh.register_many([("wayne", PASSWORD), ("keith", PASSWORD)])
    outsider = mirror == "prosody"
    if outsider:
        register_evil(env, "mallory")
    stanzas = corpus()
    assert len(stanzas) >= 30

    async def scenario():
        async with ClientHub(watch=[env.link]) as hub:
            try:
                alice = await hub.connect(f"alice@{FAIRFAX}", PASSWORD, env.fairfax.c2s_port)
                await alice.join(ROOM, "Alice")
                wayne = await hub.connect(f"wayne@{RALEIGH}", PASSWORD, env.raleigh.c2s_port)
                await wayne.join(ROOM, "Wayne", history=None, timeout=20)
                bob = await hub.connect(f"bob@{FAIRFAX}", PASSWORD, env.fairfax.c2s_port)
                keith = await hub.connect(f"keith@{RALEIGH}", PASSWORD, env.raleigh.c2s_port)
                senders = [bob, keith]
                if outsider:
                    senders.append(await hub.connect(f"mallory@{EVIL}", PASSWORD, env.raleigh.c2s_port))
                target = escaped(str(wayne.jid))
                n = 0
                for sender in senders:
                    for xml in stanzas:
                        n += 1
                        sender.xmpp.send_raw(
                            xml.replace("ROOM", ROOM).replace("SERVICE", CONFERENCE).replace("MIRROR", MIRROR)
                            .replace("ESCAPED", target).replace("NICK", f"h{n}").replace("'ID'", f"'hostile-{n}'"))
                # Everything sent has been handled once each sender's own server answers a ping
                # sent after it, on the same stream (and the stream is still open).
                for sender in senders:
                    iq = sender.xmpp.make_iq_get(ito=sender.jid.domain)
                    iq.xml.append(iq.xml.makeelement("{urn:xmpp:ping}ping", {}))
                    try:
                        await iq.send(timeout=30)
                    except IqError:
                        pass    # an error answer (no mod_ping) proves the same: the stream is alive
                assert env.fairfax.running and env.raleigh.running
                for sender in senders:
                    assert sender.xmpp.is_connected(), f"{sender.jid}'s stream was closed"
                for sender, body in ((alice, "after the corpus, from the room"),
                                     (wayne, "after the corpus, from behind the mirror")):
                    body = f"{body} {uuid.uuid4().hex}"
                    sender.send_groupchat(ROOM, body)
                    other = wayne if sender is alice else alice
                    await hub.wait_for(lambda: other.groupchat(ROOM, body), 20, f"{other.jid} gets {body}")
                for c in [alice, wayne, *senders]:
                    # (An error echoing a sender's own stanza shows them what they wrote.)
                    leaked = [r.raw for r in c.received
                              if ("urn:xmpp:dmuc:0" in r.raw or "http://tridsys.com/protocol/dmuc" in r.raw)
                              and not (r.type == "error" and r.id.startswith("hostile-"))]
                    assert not leaked, f"{c.jid} was shown dmuc's own elements: {leaked[:3]}"
            except AssertionError as e:
                raise AssertionError(f"{e}\n{hub.dump()}") from None

    run(scenario(), timeout=300)
    assert env.fairfax.running and env.raleigh.running
