"""A third, attacker server on loopback tries each spoof against a master and a mirror (issue 11,
"Authorization" and "Tests"; docs/security.md, "Threat model").

Three real servers: the master's (fairfax.localhost, the room on conference.fairfax.localhost),
the mirror's (raleigh.localhost, mirror.raleigh.localhost) and the attacker's: evil.localhost, a
Prosody of its own, federating with both over plain s2s and dialback. It is not on any trusted
list. Its test-only module (tests/harness/mod_test_inject.lua) lets its user mallory write any
raw stanza onto its own outgoing s2s streams, byte for byte: any `from`, any marker, 100,000
levels of nesting. Each pairing shares its three servers across the cases: Prosody master and
mirror, then ejabberd master and mirror.

Every case asserts the refusal (or the drop), that nothing crossed the link between the master's
and the mirror's servers (counting proxies; only the barrier messages of the "room still works"
check are on it), and that the room still works both ways through the mirror. The cases:

1. evil poses as a mirror (a join carrying `<dmuc from='mirror.evil.localhost'/>`, which no list
   names): `forbidden`, to mallory, over the master's stream to evil.
2. evil names the real, trusted mirror (`<dmuc from='mirror.raleigh.localhost'/>`) in a join, a
   leave and a presence to the bare room: the join gets `forbidden` (the mirror may not speak
   for evil.localhost), at mallory, and nothing reaches the mirror.
3. evil speaks for users of another domain: joins from wayne@raleigh and alice@fairfax (and
   from a node that spells out raleigh's user, ``wayne\\40raleigh.localhost@evil.localhost``)
   through the real mirror's marker. The forged `from`s never reach the room.
4. forged `from` of another domain on evil's stream (as alice, as the room, as the mirror): the
   receiving server closes the stream (RFC 6120 4.9.3.9, not-authorized / invalid-from); no
   user is shown anything.
5. forged config, roster, history and fan-out sent to the mirror service and to wayne's escaped
   JID by evil, as itself: the mirror takes them from no one but its master; wayne sees none.
6. depth (100,000 levels) and size (over 512 KiB) bombs from evil to the room (groupchat), to
   room/nick (joins), to the mirror service and to wayne's escaped JID: the server lives and
   answers, the sender gets `policy-violation` without the payload, the refusal is logged at
   warn. Then private-message bombs to Alice's and Wayne's nicks, from a stranger and from an
   occupant: an error without the payload, or nothing (Prosody's MUC drops them itself: its
   stanza copy overflows the Lua stack, logged); no user is handed a bomb.

What these found (fixed, see docs/security.md): a user behind a mirror who disconnected stayed in
the room (the servers here outlive a case); an ejabberd master let a stranger's oversized
groupchat message reach the room, which answered `not-acceptable` with the payload, and its
`policy-violation` answers kept a decoded body.
"""

import dataclasses
import time
import uuid
from contextlib import contextmanager

import pytest

from clients import ClientHub, run
from ejabberd import mixed_servers
from servers import CONFERENCE, FAIRFAX, LOOPBACK, RALEIGH, Prosody, S2SLink, S2SProxy, is_ack
from test_bounds import BIG_STREAMS, LEVELS, POLICY, REFUSED_LOG, bomb_pair, room_works
from test_hostile_corpus import escaped
from test_wire_namespace import error_of

ROOM = f"chatroom@{CONFERENCE}"
MIRROR = f"mirror.{RALEIGH}"
EVIL = "evil.localhost"
EVIL_MIRROR = f"mirror.{EVIL}"
PASSWORD = "secret"
INJECT = "urn:dmuc:test:inject"
MARKER = "http://tridsys.com/protocol/dmuc"
MUC = "http://jabber.org/protocol/muc"
OVER_SIZE = 600_000   # bytes of text: over dmuc's 512 KiB, under the streams' limits (1 and 2 MiB)


@dataclasses.dataclass
class World:
    env: object           # ejabberd.MixedServers: fairfax (master), raleigh (mirror), link between them
    evil: Prosody
    evil_link: S2SLink    # every proxy to and from evil, keyed by sender
    keep: bool = False

    @property
    def servers(self):
        return [self.env.fairfax, self.env.raleigh, self.evil]

    def logs(self, lines=200):
        return "\n\n".join([self.env.logs(lines), self.evil.log_tail(lines), self.evil_link.summary()])


@contextmanager
def attacker_world(master, mirror):
    """A dmuc pair (test_bounds.bomb_pair: room for 100,000 levels in Prosody's streams) and
    evil.localhost, federating with both through counting proxies of its own."""
    evil = Prosody(EVIL, host_modules=["test_inject"], global_options=BIG_STREAMS)
    fairfax_to_evil = S2SProxy(lambda: (LOOPBACK, evil.s2s_port), dialler=FAIRFAX, target_label=EVIL,
                               name="fairfax-to-evil")
    raleigh_to_evil = S2SProxy(lambda: (LOOPBACK, evil.s2s_port), dialler=RALEIGH, target_label=EVIL,
                               name="raleigh-to-evil")
    proxies = [fairfax_to_evil, raleigh_to_evil]
    world = None
    try:
        kw = bomb_pair(lambda **kw: kw, master, mirror)
        kw["master_extra_routes"] = {EVIL: fairfax_to_evil.address, "*." + EVIL: fairfax_to_evil.address}
        kw["mirror_extra_routes"] = {EVIL: raleigh_to_evil.address, "*." + EVIL: raleigh_to_evil.address}
        with mixed_servers(**kw) as env:
            evil_to_fairfax = S2SProxy(lambda: (LOOPBACK, env.fairfax.s2s_port), dialler=EVIL,
                                       target_label=FAIRFAX, name="evil-to-fairfax")
            evil_to_raleigh = S2SProxy(lambda: (LOOPBACK, env.raleigh.s2s_port), dialler=EVIL,
                                       target_label=RALEIGH, name="evil-to-raleigh")
            proxies += [evil_to_fairfax, evil_to_raleigh]
            for domain, proxy in ((FAIRFAX, evil_to_fairfax), (RALEIGH, evil_to_raleigh)):
                evil.s2s_routes[domain] = proxy.address
                evil.s2s_routes["*." + domain] = proxy.address
            evil.start()
            world = World(env, evil, S2SLink(proxies))
            env.fairfax.register("alice", PASSWORD)
            env.raleigh.register("wayne", PASSWORD)
            evil.register("mallory", PASSWORD)
            try:
                yield world
            finally:
                env.keep = world.keep
    finally:
        evil.cleanup(world.keep if world else False)
        for p in proxies:
            p.close()


@pytest.fixture(scope="module", params=[pytest.param(("prosody", "prosody"), id="P-P"),
                                        pytest.param(("ejabberd", "ejabberd"), id="E-E")])
def world(request):
    with attacker_world(*request.param) as w:
        yield w


@pytest.fixture(autouse=True)
def _report_logs(request, world):
    # The failure-report hook (fixtures.pytest_runtest_makereport) attaches these servers' logs.
    request.node._dmuc_envs = [world]


async def inject(mallory, to_host, raw, depth=0, pad=0, barrier=True, timeout=45):
    """Have evil write `raw` on its stream to `to_host`; return the outcome: "pong" (the stream
    is open and the receiving server handled `raw` before answering the barrier ping), "closed"
    (it closed the stream) or "sent"."""
    iq = mallory.xmpp.make_iq_set(ito=EVIL)
    el = iq.xml.makeelement(f"{{{INJECT}}}inject", {"to-host": to_host, "depth": str(depth), "pad": str(pad),
                                                    "barrier": "1" if barrier else "0"})
    el.text = raw
    iq.xml.append(el)
    answer = await iq.send(timeout=timeout)
    return answer.xml.find(f"{{{INJECT}}}injected").get("outcome")


def join(frm, nick, sid, marker=None, extra=""):
    mark = f"<dmuc xmlns='{MARKER}' from='{marker}'/>" if marker else ""
    return f"<presence from='{frm}' to='{ROOM}/{nick}' id='{sid}'><x xmlns='{MUC}'/>{mark}{extra}</presence>"


async def answer_to(hub, client, sid, kind, timeout=20):
    got = await hub.wait_for(lambda: [r for r in client.received if r.kind == kind and r.id == sid],
                             timeout, f"{client.jid}: answer to {sid}")
    return got[0]


class Case:
    """One attack: connect alice (beside the room), wayne (behind the mirror) and mallory (on
    evil); mark the mirror's link; after the attack, `finish()` checks that the room still works
    both ways and that nothing but those barrier messages crossed the mirror's link."""

    def __init__(self, world, hub):
        self.world, self.env, self.hub = world, world.env, hub

    async def start(self):
        env, hub = self.env, self.hub
        self.alice = await hub.connect(f"alice@{FAIRFAX}", PASSWORD, env.fairfax.c2s_port)
        await self.alice.join(ROOM, "Alice")
        # The previous case's users have left (their leaves may still be on the way).
        await hub.wait_for(lambda: self.alice.occupants(ROOM) == {"Alice"}, 20, "an empty room")
        self.wayne = await hub.connect(f"wayne@{RALEIGH}", PASSWORD, env.raleigh.c2s_port)
        await self.wayne.join(ROOM, "Wayne", history=None, timeout=20)
        await hub.wait_for(lambda: "Wayne" in self.alice.occupants(ROOM), 10, "alice sees Wayne")
        self.mallory = await hub.connect(f"mallory@{EVIL}", PASSWORD, self.world.evil.c2s_port)
        self.t0 = time.monotonic()
        snap = env.link.snapshot()
        self.bytes0 = dict(snap.bytes)
        return self

    async def finish(self, *, nicks=(), allowed=lambda s: False):
        """`allowed(stanza)`: legitimate traffic the case caused (an occupant's broadcast)."""
        env = self.env
        assert env.fairfax.running and env.raleigh.running and self.world.evil.running
        await room_works(self.hub, self.alice, self.wayne)
        since = [s for s in env.link.stanzas() if s.time >= self.t0]
        # The barrier messages, and the master's acknowledgement of Wayne's (src/ack.rs: in place
        # of the echo plain MUC sends), one per message he sent through the mirror.
        acks = [s for s in since if s.name == "message" and is_ack(s)]
        his = [s for s in since if "still here" in s.raw and s.sender == RALEIGH]
        assert len(acks) <= len(his), f"{len(acks)} acknowledgements for {len(his)} messages"
        expected = [s for s in since if "still here" in s.raw or allowed(s)] + acks
        crossed = [s for s in since if s not in expected]
        assert not crossed, "the attack put traffic on the mirror's link:\n" + "\n".join(s.raw[:300] for s in crossed)
        snap = env.link.snapshot()
        extra = sum(snap.bytes.values()) - sum(self.bytes0.values()) - sum(len(s.raw.encode()) for s in expected)
        assert extra == 0, f"{extra} bytes on the mirror's link besides the barrier messages"
        for c in (self.alice, self.wayne):
            shown = c.occupants(ROOM)
            assert not (set(nicks) & shown), f"{c.jid} was shown {set(nicks) & shown}"

    async def leave(self):
        """Leave, so that the next case (on the same servers) starts from an empty room."""
        await self.wayne.leave(ROOM, "Wayne", timeout=20)
        await self.alice.leave(ROOM, "Alice")

    def refusals_to_evil(self, sid):
        """The master's answers to `sid`, as they crossed to evil."""
        return self.world.evil_link.stanzas(sender=FAIRFAX, where=lambda s: s.attrs.get("id") == sid)


def scenario(world, body, timeout=180):
    async def main():
        async with ClientHub(watch=[world.env.link, world.evil_link]) as hub:
            try:
                case = await Case(world, hub).start()
                await body(case)
                await case.leave()
            except AssertionError as e:
                raise AssertionError(f"{e}\n{hub.dump()}") from None
    run(main(), timeout=timeout)


def test_untrusted_mirror(world):
    """1. evil poses as a mirror of its own: refused with forbidden, to the sender."""
    async def body(c):
        frm = str(c.mallory.jid)
        assert await inject(c.mallory, CONFERENCE, join(frm, "Posing", "s1", marker=EVIL_MIRROR)) == "pong"
        r = await answer_to(c.hub, c.mallory, "s1", "presence")
        assert r.type == "error" and error_of(r) == ("auth", ["forbidden"]), r.raw
        assert [s.type for s in c.refusals_to_evil("s1")] == ["error"]
        await c.finish(nicks=["Posing"])
    scenario(world, body)


def test_names_the_real_mirror(world):
    """2. evil claims to be the trusted mirror: refused to evil, never over the mirror's link."""
    async def body(c):
        frm = str(c.mallory.jid)
        assert await inject(c.mallory, CONFERENCE, join(frm, "Claimer", "s2", marker=MIRROR)) == "pong"
        r = await answer_to(c.hub, c.mallory, "s2", "presence")
        assert r.type == "error" and error_of(r) == ("auth", ["forbidden"]), r.raw
        assert [s.type for s in c.refusals_to_evil("s2")] == ["error"]
        # A leave the mirror would announce, and one to the bare room, naming the mirror.
        for sid, to in (("s2b", f"{ROOM}/Wayne"), ("s2c", ROOM)):
            raw = (f"<presence from='{frm}' to='{to}' type='unavailable' id='{sid}'>"
                   f"<dmuc xmlns='{MARKER}' from='{MIRROR}'/></presence>")
            assert await inject(c.mallory, CONFERENCE, raw) == "pong"
        await c.finish(nicks=["Claimer"])
        assert "Wayne" in c.alice.occupants(ROOM), "a stranger's leave removed Wayne"
    scenario(world, body)


def test_speaks_for_another_domain(world):
    """3. evil speaks, through the real mirror's marker, for users of raleigh and fairfax."""
    async def body(c):
        # A node that spells out raleigh's user: still evil's user, refused, answered at evil.
        spelled = f"wayne\\40{RALEIGH}@{EVIL}/x"
        assert await inject(c.mallory, CONFERENCE, join(spelled, "Spelled", "s3", marker=MIRROR)) == "pong"
        await c.hub.wait_for(lambda: c.refusals_to_evil("s3"), 20, "the refusal of s3 crosses to evil")
        r = c.refusals_to_evil("s3")[0]
        assert r.type == "error" and "forbidden" in r.raw and r.attrs.get("to") == spelled, r.raw
        # Forged users of raleigh and fairfax: the stream is closed before any room sees them.
        for frm, nick, sid in ((f"wayne@{RALEIGH}/evil", "Wayne2", "s3b"), (f"alice@{FAIRFAX}/evil", "Alice2", "s3c")):
            assert await inject(c.mallory, CONFERENCE, join(frm, nick, sid, marker=MIRROR)) == "closed", frm
            assert not c.refusals_to_evil(sid)
        await c.finish(nicks=["Spelled", "Wayne2", "Alice2"])
    scenario(world, body)


def test_forged_from_is_dropped_by_the_stream(world):
    """4. A `from` of another domain on evil's stream: the receiving server closes the stream."""
    async def body(c):
        forged = f"forged {uuid.uuid4().hex}"
        attacks = [
            (CONFERENCE, f"<message from='alice@{FAIRFAX}/x' to='{ROOM}' type='groupchat' id='f1'>"
                         f"<body>{forged}</body></message>"),
            (CONFERENCE, join(f"{MIRROR}", "Ghost", "f2")),
            (MIRROR, f"<message from='{ROOM}/Alice' to='{MIRROR}' type='groupchat' id='f3'><body>{forged}</body></message>"),
            (RALEIGH, f"<message from='{ROOM}/Alice' to='wayne@{RALEIGH}' type='groupchat' id='f4'>"
                      f"<body>{forged}</body></message>"),
        ]
        for to_host, raw in attacks:
            assert await inject(c.mallory, to_host, raw) == "closed", raw
        await c.finish(nicks=["Ghost"])
        for u in (c.alice, c.wayne):
            assert not u.messages(body=forged), f"{u.jid} was shown a forged message"
    scenario(world, body)


def test_forged_room_data_to_the_mirror(world):
    """5. Config, roster, history and fan-out pushed to the mirror by evil (not its master)."""
    async def body(c):
        tag = uuid.uuid4().hex
        fake_room = f"chatroom@{EVIL}"
        to_wayne = escaped(str(c.wayne.jid))
        attacks = [
            f"<iq from='{fake_room}' to='{MIRROR}' type='set' id='c1'><config xmlns='urn:xmpp:dmuc:0'>"
            "<x xmlns='jabber:x:data' type='form'><field var='muc#roomconfig_whois'><value>anyone</value>"
            "</field></x></config></iq>",
            f"<iq from='{fake_room}' to='{MIRROR}' type='set' id='c2'><roster xmlns='urn:xmpp:dmuc:0'>"
            f"<item affiliation='owner' role='moderator' name='Boss{tag}' jid='boss@{EVIL}/x'/></roster></iq>",
            f"<iq from='{fake_room}' to='{MIRROR}' type='result' id='dmuc-history-1'>"
            f"<history xmlns='{MUC}'><message from='{fake_room}/Boss' type='groupchat'>"
            f"<body>history {tag}</body></message></history></iq>",
            f"<message from='{fake_room}/Boss' to='{to_wayne}' type='groupchat' id='c4'><body>fanout {tag}</body></message>",
            f"<presence from='{ROOM.split('@')[0]}@{EVIL}/Boss{tag}' to='{to_wayne}' id='c5'>"
            "<x xmlns='http://jabber.org/protocol/muc#user'><item affiliation='owner' role='moderator'/></x></presence>",
            f"<message from='{EVIL}' to='{MIRROR}' type='groupchat' id='c6'><body>to the service {tag}</body></message>",
        ]
        for raw in attacks:
            assert await inject(c.mallory, MIRROR, raw) == "pong", raw
        await c.finish()
        assert not [r.raw for r in c.wayne.received if tag in r.raw], "wayne was shown forged room data"
        assert c.wayne.occupants(ROOM) == {"Alice", "Wayne"}
    scenario(world, body)


def test_bombs(world):
    """6. Depth and size bombs from evil at the room, an occupant, a nick and the mirror service."""
    async def body(c):
        frm = str(c.mallory.jid)
        bomb = "{{BOMB}}"
        pad = "<body>{{PAD}}</body>"
        cases = [
            # (what, the stream it goes on, raw, depth, pad, the refusing server, the answer's kind)
            ("join bomb to room/nick", CONFERENCE, join(frm, "Bomber", "b1", extra=bomb), LEVELS, 0,
             c.env.fairfax, "presence"),
            ("groupchat depth bomb to the room", CONFERENCE,
             f"<message from='{frm}' to='{ROOM}' type='groupchat' id='b2'><body>boom</body>{bomb}</message>",
             LEVELS, 0, c.env.fairfax, "message"),
            ("groupchat size bomb to the room", CONFERENCE,
             f"<message from='{frm}' to='{ROOM}' type='groupchat' id='b3'>{pad}</message>",
             0, OVER_SIZE, c.env.fairfax, "message"),
            ("size bomb join to room/nick", CONFERENCE, join(frm, "Bomber", "b4", extra=pad), 0, OVER_SIZE,
             c.env.fairfax, "presence"),
            ("depth bomb to the mirror service", MIRROR,
             f"<message from='{frm}' to='{MIRROR}' type='chat' id='b5'><body>boom</body>{bomb}</message>",
             LEVELS, 0, c.env.raleigh, "message"),
            ("size bomb to the mirror service", MIRROR,
             f"<message from='{frm}' to='{MIRROR}' type='chat' id='b6'>{pad}</message>",
             0, OVER_SIZE, c.env.raleigh, "message"),
            ("depth bomb to wayne's escaped JID at the mirror", MIRROR,
             f"<message from='{frm}' to='{escaped(str(c.wayne.jid))}' type='chat' id='b7'><body>boom</body>{bomb}"
             "</message>", LEVELS, 0, c.env.raleigh, "message"),
        ]
        # One warning per peer a minute (docs/security.md, "Logs"): each server logs the first
        # of evil's refusals; the rest are counted into the next line.
        warned = set()
        for what, to_host, raw, depth, size, server, kind in cases:
            sid = raw.split("id='")[1].split("'")[0]
            offset = server.log_offset()
            outcome = await inject(c.mallory, to_host, raw, depth=depth, pad=size)
            assert outcome == "pong", f"{what}: {outcome}"
            r = await answer_to(c.hub, c.mallory, sid, kind, timeout=30)
            assert r.type == "error" and error_of(r) == POLICY, f"{what}: {r.raw[:500]}"
            assert len(r.raw) < 2000, f"{what}: the bomb was echoed"
            if server.name not in warned:
                await server.wait_for_log_async(REFUSED_LOG, 10, since=offset)
                warned.add(server.name)
            assert server.running, f"{server.name} died on the {what}"
        # Private message bombs to occupants' nicks, from a stranger and then from an occupant
        # (mallory joins as any federated user may): to Alice beside the room, to Wayne behind
        # the mirror. Whatever the room's host does with them, it lives, the sender gets a
        # policy-violation error without the payload, and nothing crosses to the mirror.
        for phase in ("stranger", "occupant"):
            if phase == "occupant":
                await c.mallory.join(ROOM, "Mallory", timeout=20)
            for nick in ("Alice", "Wayne"):
                sid = f"pm-{phase}-{nick}"
                raw = f"<message from='{frm}' to='{ROOM}/{nick}' type='chat' id='{sid}'><body>boom</body>{bomb}</message>"
                assert await inject(c.mallory, CONFERENCE, raw, depth=LEVELS) == "pong", sid
                assert c.env.fairfax.running
                # Both hosts refuse it on the way in (ejabberd's stream guard; Prosody's depth
                # guard before the room, whose own copy of a private message would overflow).
                r = await answer_to(c.hub, c.mallory, sid, "message", timeout=30)
                assert r.type == "error" and error_of(r) == POLICY and len(r.raw) < 2000, r.raw[:500]
        assert not any(len(r.raw) > 100_000 for u in (c.alice, c.wayne) for r in u.received), \
            "a bomb was delivered"
        await c.mallory.leave(ROOM, "Mallory")
        # Mallory's own join and leave are broadcast to the mirror, as any occupant's.
        await c.finish(nicks=["Bomber"], allowed=lambda s: s.name == "presence" and f"{ROOM}/Mallory" in s.raw)
    scenario(world, body, timeout=300)
