"""Transparency: a user behind a dmuc mirror receives what the host's own MUC sends a direct user.

The host's MUC is the oracle. Each test runs one scenario twice on one pair of servers, in two
rooms: first with every user on the master's server ("direct"), then with the acting/observing
users on the mirror's server ("via mirror"); the stanzas each user received from the room are
compared, stanza by stanza, after normalizing only what must differ (tests/harness/oracle.py: the
users' own JIDs, the room's name, random ids, delay stamps, stanza-id/occupant-id values, error
text, xml:lang, the order of the occupant list).

Every test runs in the four pairings (master, mirror): Prosody/Prosody, ejabberd/ejabberd,
ejabberd master with a Prosody mirror, Prosody master with an ejabberd mirror. Users are named
after their role: alice is the room's owner on the master's server; the others are on the
master's server in the direct run and, where the scenario says "actor side", on the mirror's
server in the run via the mirror.

The direct run must show the behaviour under test (it is asserted, so the scenario is known to
be meaningful); a wait that times out in the run via the mirror is not fatal: it is reported
along with the differences.
"""

from __future__ import annotations

import os
from typing import Callable, Dict, List, Optional, Sequence
from xml.sax.saxutils import escape, quoteattr

import pytest

from clients import Client, ClientHub, Received, WaitTimeout, run
from oracle import Normalizer, canon_window, diff_windows, ids_of
from servers import CONFERENCE, RALEIGH

MIRROR = f"mirror.{RALEIGH}"
USERS_MUC = f"conference.{RALEIGH}"   # a MUC of the mirror's server's own (test k)
PASSWORD = "secret"
TOP = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
# DMUC_DIST: a copy of dist/ to test (a snapshot, while others rebuild dist/ under the same tree).
DIST = os.environ.get("DMUC_DIST") or os.path.join(TOP, "dist")
PROSODY_DIST = os.path.join(DIST, "prosody")
EJABBERD_DIST = os.path.join(DIST, "ejabberd", "mod_dmuc")

PAIRINGS = [
    pytest.param("prosody", "prosody", id="P-P"),
    pytest.param("ejabberd", "ejabberd", id="E-E"),
    pytest.param("ejabberd", "prosody", id="Emaster-Pmirror"),
    pytest.param("prosody", "ejabberd", id="Pmaster-Emirror"),
]

MUC = "http://jabber.org/protocol/muc"
MUC_USER = "http://jabber.org/protocol/muc#user"
MUC_ADMIN = "http://jabber.org/protocol/muc#admin"
MUC_OWNER = "http://jabber.org/protocol/muc#owner"
STANZAS = "urn:ietf:params:xml:ns:xmpp-stanzas"
ROOMCONFIG = "http://jabber.org/protocol/muc#roomconfig"

MASTER = "master"   # a user on the master's server in both runs
ACTOR = "actor"     # on the master's server in the direct run, on the mirror's server via the mirror

# DMUC_TRANSPARENCY_DIRECT_ONLY=1 runs only the direct half (to check a scenario against the host);
# DMUC_TRANSPARENCY_SHOW=1 prints every normalized record (with -s).
# DMUC_TRANSPARENCY_STOCK=1 runs the direct half on servers without dmuc at all: the stock host,
# to tell the host's own behaviour from what dmuc on the master does to direct users.
STOCK = bool(os.environ.get("DMUC_TRANSPARENCY_STOCK"))
MODES = ("direct",) if os.environ.get("DMUC_TRANSPARENCY_DIRECT_ONLY") or STOCK else ("direct", "mirror")
JOIN_TIMEOUT = 20.0
WAIT = 15.0

# Where a user behind a mirror can still tell the difference, as of this writing. Each runs in
# full and must still fail (strict): when one is fixed, its XPASS fails the suite until the line
# goes. docs/protocol.md ("Transparency", "Known differences") has the reasons.
KNOWN_DIFFERENCES: Dict[tuple, str] = {}


@pytest.fixture(autouse=True)
def _known_difference(request):
    callspec = getattr(request.node, "callspec", None)
    reason = KNOWN_DIFFERENCES.get((request.node.originalname, callspec.id if callspec else None))
    if reason and "mirror" in MODES:
        request.node.add_marker(pytest.mark.xfail(strict=True, reason=reason))


# ---------------------------------------------------------------------------------------------
# servers
# ---------------------------------------------------------------------------------------------

def transparency_env(make_mixed_servers, master: str, mirror: str, *, users: Sequence[str],
                     prosody_muc_modules: Sequence[str] = (), ejabberd_muc: Optional[dict] = None,
                     ejabberd_master_modules: Optional[dict] = None,
                     prosody_host_modules: Sequence[str] = (), ejabberd_host_modules: Optional[dict] = None,
                     fast_pings: bool = False, users_muc: bool = False):
    """The pair (fairfax = master, raleigh = mirror), every name in `users` registered on both.

    prosody_muc_modules / ejabberd_muc, ejabberd_master_modules: the master's MUC (Prosody
    component modules; mod_muc options and other modules on an ejabberd master).
    prosody_host_modules / ejabberd_host_modules: the users' servers, both sides.
    users_muc: the mirror's server also hosts a MUC of its own (USERS_MUC, not mirrored)."""
    for path in (os.path.join(PROSODY_DIST, "dmuc_prosody.so"), os.path.join(EJABBERD_DIST, "priv", "dmuc_nif.so")):
        if not os.path.exists(path):
            raise AssertionError(f"{path} missing: run `make dist` first")
    ping = {"ping_interval": 1, "ping_timeout": 2} if fast_pings else {"ping_interval": 3600}
    kw = dict(master=master, mirror=mirror, plugin_paths=[PROSODY_DIST],
              contrib_modules={"mod_dmuc": EJABBERD_DIST})
    if master == "ejabberd":
        kw["master_modules"] = {"mod_dmuc": {"trusted_mirrors": [MIRROR]}, **(ejabberd_host_modules or {}),
                                **(ejabberd_master_modules or {})}
        kw["conference_options"] = dict(ejabberd_muc or {})
    else:
        mods = ", ".join(f'"{m}"' for m in ["dmuc", *prosody_muc_modules])
        kw["conference_options"] = [f"modules_enabled = {{ {mods} }}",
                                    f'dmuc_trusted_mirrors = {{ "{MIRROR}" }}']
        kw["master_modules"] = list(prosody_host_modules)
    if mirror == "ejabberd":
        kw["mirror_modules"] = {"mod_dmuc": {"mirror_host": MIRROR, "masters": [CONFERENCE], **ping},
                                **(ejabberd_host_modules or {})}
    else:
        kw["mirror_modules"] = ["dmuc", *prosody_host_modules]
        kw["mirror_blocks"] = [f'Component "{MIRROR}" "dmuc"\n    dmuc_masters = {{ "{CONFERENCE}" }}\n'
                               + "\n".join(f"    dmuc_{k} = {v}" for k, v in ping.items())]
    if users_muc:
        if mirror == "ejabberd":
            kw["mirror_modules"]["mod_muc"] = '{host: "conference.@HOST@", access_create: all}'
        else:
            kw.setdefault("mirror_blocks", []).append(f'Component "{USERS_MUC}" "muc"\n    muc_room_locking = false\n')
    if STOCK:
        # No dmuc anywhere: the host's own MUC untouched (a reference for the direct run).
        if master == "ejabberd":
            kw["master_modules"].pop("mod_dmuc")
        else:
            kw["conference_options"] = ["modules_enabled = { " + ", ".join(f'"{m}"' for m in prosody_muc_modules) + " }"]
        if mirror == "ejabberd":
            kw["mirror_modules"].pop("mod_dmuc")
        else:
            kw["mirror_modules"].remove("dmuc")
            kw["mirror_blocks"] = []
    env = make_mixed_servers(**kw)
    env.fairfax.register_many([(u, PASSWORD) for u in users])
    env.raleigh.register_many([(u, PASSWORD) for u in users])
    return env


# ---------------------------------------------------------------------------------------------
# one run of a scenario
# ---------------------------------------------------------------------------------------------

class Half:
    """One run of a scenario: "direct" (everyone on the master's server) or "mirror" (ACTOR users
    on the mirror's server). Keeps the clients, their windows and what was recorded."""

    def __init__(self, env, hub: ClientHub, mode: str, test: str):
        self.env, self.hub, self.mode = env, hub, mode
        self.room = f"{test}-{mode}@{CONFERENCE}"
        self.tokens: Dict[str, str] = {}
        self.marks: Dict[Client, int] = {}
        self.records: Dict[str, List[Received]] = {}
        self.notes: List[str] = []
        self.barriers = 0
        self.labels: Dict[Client, str] = {}
        self.oracle: Optional["Half"] = None      # the direct run, for the run via the mirror
        self.aliases: Dict[str, str] = {}         # other rooms the scenario uses -> token

    @property
    def direct(self) -> bool:
        return self.mode == "direct"

    def server(self, side: str):
        return self.env.fairfax if side == MASTER or self.direct else self.env.raleigh

    async def connect(self, name: str, side: str, resource: str = "t") -> Client:
        server = self.server(side)
        c = await self.hub.connect(f"{name}@{server.domain}/{resource}-{self.mode[0]}", PASSWORD,
                                   server.c2s_port, timeout=20)
        self.tokens[str(c.jid)] = f"{name}@HOME/{resource}"
        self.labels[c] = name if resource == "t" else f"{name}/{resource}"
        return c

    def label(self, c: Client) -> str:
        return self.labels[c]

    def normalizer(self) -> Normalizer:
        return Normalizer(self.tokens, {self.room: "ROOM", **self.aliases})

    # -- waiting ------------------------------------------------------------------------------

    async def wait(self, predicate: Callable[[], object], what: str, timeout: float = WAIT):
        """Wait for a condition: fatal in the direct run (the scenario is wrong), noted via the
        mirror (it is part of the report)."""
        try:
            return await self.hub.wait_for(predicate, timeout, what)
        except WaitTimeout:
            if self.direct:
                raise
            self.notes.append(f"timed out ({timeout:.0f}s): {what}")
            return None

    async def barrier(self, sender: Client, receivers: Sequence[Client]) -> None:
        """A groupchat message from `sender` that every receiver must get: what the room sent
        before it has arrived. Barriers are left out of the comparison."""
        self.barriers += 1
        body = f"barrier {self.barriers}"
        sender.send_groupchat(self.room, body, id=f"t-barrier-{self.barriers}")
        await self.wait(lambda: all(c.groupchat(self.room, body) for c in receivers),
                        f"{body} reaches {', '.join(self.label(c) for c in receivers)}")

    async def settle(self, key: str, c: Client, receivers: Sequence[Client]) -> None:
        """Let the answers to what `c` just sent arrive, when there may be none. Directly, `c`
        sends a barrier: the room handles c's stanzas in order, so any answer comes first. Via
        the mirror (where c's groupchat is delivered locally at once), wait for as many stanzas
        as the direct run got for `key` first."""
        if not self.direct and self.oracle is not None and key in self.oracle.records:
            n = len(self.oracle.records[key])
            await self.wait(lambda: len(self.window(c)) >= n, f"{key}: {n} stanza(s), as directly")
        await self.barrier(c, receivers)

    # -- windows ------------------------------------------------------------------------------

    def mark(self, *clients: Client) -> None:
        for c in clients:
            self.marks[c] = len(c.received)

    def window(self, c: Client, kinds: Sequence[str] = ("message", "presence", "iq")) -> List[Received]:
        out = []
        for r in c.received[self.marks.get(c, 0):]:
            if r.kind not in kinds:
                continue
            if not (r.from_.bare == self.room or r.id.startswith("t-")):
                continue
            if r.kind == "message" and r.body.startswith("barrier "):
                continue
            out.append(r)
        return out

    def record(self, key: str, c: Client, kinds: Sequence[str] = ("message", "presence", "iq")) -> List[Received]:
        self.records[key] = self.window(c, kinds)
        return self.records[key]

    def lines(self, key: str) -> List[str]:
        return canon_window(self.records[key], self.normalizer())

    # -- actions ------------------------------------------------------------------------------

    def send(self, c: Client, xml: str) -> None:
        c.xmpp.send_raw(xml)

    def join_xml(self, nick: Optional[str], history: Optional[int] = 0, id: Optional[str] = None,
                 extra: str = "", to: Optional[str] = None) -> str:
        to = to or (f"{self.room}/{nick}" if nick is not None else self.room)
        hist = "" if history is None else f"<history maxstanzas='{history}'/>"
        ida = f" id={quoteattr(id)}" if id else ""
        return f"<presence to={quoteattr(to)}{ida}><x xmlns='{MUC}'>{hist}</x>{extra}</presence>"

    async def join(self, c: Client, nick: str, history: Optional[int] = 0, id: Optional[str] = None,
                   extra: str = "", setup: bool = True) -> Optional[Received]:
        """Join and wait for the self-presence (110) and the subject. `setup`: a join the
        scenario needs to go on (a refusal or a timeout raises, in both runs); otherwise the
        join is under test: its outcome is returned (the self-presence, the error presence, or
        None on a timeout via the mirror)."""
        start = len(c.received)
        occupant = f"{self.room}/{nick}"
        self.send(c, self.join_xml(nick, history, id or f"t-join-{nick}", extra))

        def outcome():
            for r in c.received[start:]:
                if r.kind == "presence" and str(r.from_) == occupant:
                    if r.type == "error" or 110 in r.status_codes():
                        return r
            return None
        what = f"{self.label(c)} joins {occupant}"
        if setup:
            got = await self.hub.wait_for(outcome, JOIN_TIMEOUT, what)
            if got.type == "error":
                raise AssertionError(f"[{self.mode}] {what}: refused: {got.raw}")
        else:
            got = await self.wait(outcome, what, JOIN_TIMEOUT)
            if got is None or got.type == "error":
                return got
        await self.wait(lambda: any(r.kind == "message" and r.from_.bare == self.room
                                    and r.stanza.xml.find("{jabber:client}subject") is not None
                                    for r in c.received[start:]), f"{what}: subject", JOIN_TIMEOUT)
        return got

    async def leave(self, c: Client, nick: str) -> None:
        start = len(c.received)
        occupant = f"{self.room}/{nick}"
        self.send(c, f"<presence to={quoteattr(occupant)} type='unavailable' id='t-leave-{nick}'/>")
        await self.wait(lambda: any(r.kind == "presence" and str(r.from_) == occupant and r.type == "unavailable"
                                    for r in c.received[start:]), f"{self.label(c)} leaves {occupant}")

    async def iq(self, c: Client, id: str, type: str, to: str, payload: str, what: str,
                 timeout: float = WAIT) -> Optional[Received]:
        """Send an IQ and wait for its answer (result or error)."""
        start = len(c.received)
        self.send(c, f"<iq type='{type}' to={quoteattr(to)} id={quoteattr(id)}>{payload}</iq>")
        return await self.wait(lambda: next((r for r in c.received[start:] if r.kind == "iq" and r.id == id
                                             and r.type in ("result", "error")), None), what, timeout)

    async def configure(self, owner: Client, id: str, fields: Dict[str, str]) -> Optional[Received]:
        x = "".join(f"<field var={quoteattr(k)}><value>{escape(v)}</value></field>" for k, v in fields.items())
        payload = (f"<query xmlns='{MUC_OWNER}'><x xmlns='jabber:x:data' type='submit'>"
                   f"<field var='FORM_TYPE'><value>{ROOMCONFIG}</value></field>{x}</x></query>")
        return await self.iq(owner, id, "set", self.room, payload, f"{self.label(owner)} configures {fields}")

    async def admin(self, actor: Client, id: str, item: Dict[str, str], reason: Optional[str] = None
                    ) -> Optional[Received]:
        attrs = "".join(f" {k}={quoteattr(v)}" for k, v in item.items())
        inner = f"<reason>{escape(reason)}</reason>" if reason else ""
        payload = f"<query xmlns='{MUC_ADMIN}'><item{attrs}>{inner}</item></query>"
        return await self.iq(actor, id, "set", self.room, payload, f"{self.label(actor)} sets {item}")


def _last(c: Client, pred: Callable[[Received], bool], since: int = 0) -> Optional[Received]:
    for r in reversed(c.received[since:]):
        if pred(r):
            return r
    return None


def has_status(r: Received, code: int) -> bool:
    return code in r.status_codes()


def error_condition(r: Received) -> Optional[str]:
    err = r.stanza.xml.find("{jabber:client}error")
    if err is None:
        return None
    for child in err:
        if child.tag.startswith("{" + STANZAS + "}") and not child.tag.endswith("}text"):
            return child.tag.split("}", 1)[1]
    return None


def own_item(r: Received):
    x = r.stanza.xml.find(f"{{{MUC_USER}}}x")
    return None if x is None else x.find(f"{{{MUC_USER}}}item")


# ---------------------------------------------------------------------------------------------
# running and comparing
# ---------------------------------------------------------------------------------------------

def run_halves(env, test: str, scenario, timeout: float = 240.0, check_direct=None, more_checks=None):
    """Run `scenario(half)` directly, then via the mirror; compare every record. `check_direct
    (half)` asserts that the direct run shows the behaviour under test; `more_checks(direct,
    mirrored)` returns more problems (lines) to report with the differences."""
    halves: Dict[str, Half] = {}

    async def body():
        for mode in MODES:
            async with ClientHub(watch=[env.link]) as hub:
                half = Half(env, hub, mode, test)
                half.oracle = halves.get("direct")
                halves[mode] = half
                try:
                    await scenario(half)
                    if mode == "direct" and check_direct:
                        check_direct(half)
                except AssertionError as e:
                    where = "direct run (the scenario itself)" if mode == "direct" else "run via the mirror"
                    raise AssertionError(f"{where}: {e}\n{hub.dump(30)}") from None
    run(body(), timeout=timeout)
    if os.environ.get("DMUC_TRANSPARENCY_SHOW"):
        for mode, half in halves.items():
            print(f"\n=== {test} {mode}, normalized")
            for k in half.records:
                print(f"  -- {k}\n" + "\n".join("     " + l for l in half.lines(k)))
    if "mirror" not in halves:
        return halves
    extra = more_checks(halves["direct"], halves["mirror"]) if more_checks else []
    return compare(halves["direct"], halves["mirror"], extra)


def compare(direct: Half, mirrored: Half, extra: Sequence[str] = ()) -> Dict[str, Half]:
    expected = {k: direct.lines(k) for k in direct.records}
    got = {k: mirrored.lines(k) for k in mirrored.records}
    report = diff_windows(expected, got)
    problems = list(extra)
    if mirrored.notes:
        problems.append("via the mirror: " + "; ".join(mirrored.notes))
    if report:
        problems.append(report)
    if problems:
        full = ["", "=== direct (oracle), normalized:"]
        for k, lines in expected.items():
            full += [f"  -- {k}"] + ["     " + l for l in lines]
        raise AssertionError("\n".join(problems + full))
    return {"direct": direct, "mirror": mirrored}


def assert_not_empty(half: Half, *keys: str) -> None:
    for k in keys:
        assert half.records.get(k), f"direct run: nothing recorded for {k}: the scenario shows nothing"


# ---------------------------------------------------------------------------------------------
# a. a mirror user's message is in the history a later direct joiner gets
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("master, mirror", PAIRINGS)
def test_a_mirror_message_in_history(make_mixed_servers, master, mirror):
    env = transparency_env(make_mixed_servers, master, mirror, users=["alice", "bob", "carol"])
    body = "hello from bob"

    async def scenario(t: Half):
        alice = await t.connect("alice", MASTER)
        bob = await t.connect("bob", ACTOR)
        await t.join(alice, "alice")
        await t.join(bob, "bob")
        await t.barrier(alice, [alice, bob])
        t.mark(alice, bob)
        bob.send_groupchat(t.room, body, id="t-a-1")
        await t.wait(lambda: alice.groupchat(t.room, body) and bob.groupchat(t.room, body), "bob's message delivered")
        carol = await t.connect("carol", MASTER)
        t.mark(carol)
        await t.join(carol, "carol", history=None)
        await t.barrier(alice, [alice, bob, carol])
        t.record("alice (live copy)", alice)
        t.record("bob (echo)", bob)
        t.record("carol (later direct joiner, default history)", carol)

    def check(t: Half):
        hist = [r for r in t.records["carol (later direct joiner, default history)"]
                if r.kind == "message" and r.body == body]
        assert hist and "urn:xmpp:delay" in hist[0].raw, "the direct joiner gets bob's message as history"

    run_halves(env, "ta", scenario, check_direct=check)


# ---------------------------------------------------------------------------------------------
# b. subject: refused for a participant; set by a moderator behind the mirror
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("master, mirror", PAIRINGS)
def test_b_subject_change(make_mixed_servers, master, mirror):
    env = transparency_env(make_mixed_servers, master, mirror,
                           users=["alice", "bob", "carol", "erin", "frank"])

    async def scenario(t: Half):
        alice = await t.connect("alice", MASTER)
        bob = await t.connect("bob", ACTOR)
        carol = await t.connect("carol", ACTOR)
        await t.join(alice, "alice")
        await t.join(bob, "bob")
        await t.join(carol, "carol")
        res = await t.configure(alice, "t-b-cfg", {"muc#roomconfig_changesubject": "0"})
        assert res is not None and res.type == "result", f"config refused: {res and res.raw}"
        await t.barrier(alice, [alice, bob, carol])

        # A participant may not change the subject.
        t.mark(alice, bob, carol)
        t.send(bob, f"<message to='{t.room}' type='groupchat' id='t-b-1'><subject>bob was here</subject></message>")
        await t.wait(lambda: bob.messages(type="error", where=lambda r: r.id == "t-b-1"), "bob's subject refused")
        await t.barrier(alice, [alice, bob, carol])
        for c in (alice, bob, carol):
            t.record(f"{t.label(c)}: participant's subject change", c)

        # A moderator (behind the mirror, via the mirror) changes it.
        res = await t.admin(alice, "t-b-mod", {"nick": "bob", "role": "moderator"})
        assert res is not None and res.type == "result", f"role change refused: {res and res.raw}"
        await t.barrier(alice, [alice, bob, carol])
        t.mark(alice, bob, carol)
        t.send(bob, f"<message to='{t.room}' type='groupchat' id='t-b-2'><subject>the moderated subject</subject></message>")
        subj = lambda c: c.messages(from_=t.room, where=lambda r: "the moderated subject" in r.raw)
        await t.wait(lambda: all(subj(c) for c in (alice, bob, carol)), "everyone gets the new subject")
        await t.barrier(alice, [alice, bob, carol])
        for c in (alice, bob, carol):
            t.record(f"{t.label(c)}: moderator's subject change", c)

        erin = await t.connect("erin", MASTER)
        frank = await t.connect("frank", ACTOR)
        t.mark(erin, frank)
        await t.join(erin, "erin", history=0, setup=False)
        await t.join(frank, "frank", history=0, setup=False)
        await t.barrier(alice, [alice, erin, frank])
        t.record("erin (later joiner on the master's server)", erin)
        t.record("frank (later joiner, actor side)", frank)

    def check(t: Half):
        bob_w = t.records["bob: participant's subject change"]
        assert [r for r in bob_w if r.type == "error"], "direct: the participant gets an error"
        assert not t.records["alice: participant's subject change"], "direct: nobody sees a change"
        for k in ("erin (later joiner on the master's server)", "frank (later joiner, actor side)"):
            assert any("the moderated subject" in r.raw for r in t.records[k]), f"{k} gets the subject"

    run_halves(env, "tb", scenario, check_direct=check)


# ---------------------------------------------------------------------------------------------
# c. non-anonymous and back: real JIDs and status 100 exactly when a direct joiner gets them
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("master, mirror", PAIRINGS)
def test_c_whois_change(make_mixed_servers, master, mirror):
    env = transparency_env(make_mixed_servers, master, mirror, users=["alice", "bob", "frank", "gina"])

    async def scenario(t: Half):
        alice = await t.connect("alice", MASTER)
        bob = await t.connect("bob", ACTOR)
        await t.join(alice, "alice")
        await t.join(bob, "bob")
        await t.barrier(alice, [alice, bob])
        frank = await t.connect("frank", ACTOR)
        gina = await t.connect("gina", ACTOR)
        t.mark(alice, bob, frank, gina)

        res = await t.configure(alice, "t-c-1", {"muc#roomconfig_whois": "anyone"})
        assert res is not None and res.type == "result", res and res.raw
        await t.wait(lambda: bob.messages(from_=t.room, where=lambda r: has_status(r, 172)), "bob told: non-anonymous")
        await t.join(frank, "frank", history=0, setup=False)
        await t.barrier(alice, [alice, bob, frank])

        res = await t.configure(alice, "t-c-2", {"muc#roomconfig_whois": "moderators"})
        assert res is not None and res.type == "result", res and res.raw
        await t.wait(lambda: bob.messages(from_=t.room, where=lambda r: has_status(r, 173)), "bob told: semi-anonymous")
        await t.join(gina, "gina", history=0, setup=False)
        await t.barrier(alice, [alice, bob, frank, gina])
        for c in (alice, bob, frank, gina):
            t.record(t.label(c), c)

    def check(t: Half):
        frank_self = [r for r in t.records["frank"] if r.kind == "presence" and has_status(r, 110)]
        assert frank_self and has_status(frank_self[0], 100), "direct: status 100 in a non-anonymous room"
        alice_seen = [r for r in t.records["frank"] if r.kind == "presence" and r.from_.resource == "alice"]
        assert alice_seen and own_item(alice_seen[0]).get("jid"), "direct: frank sees alice's real JID"
        gina_self = [r for r in t.records["gina"] if r.kind == "presence" and has_status(r, 110)]
        assert gina_self and not has_status(gina_self[0], 100)
        assert not any(own_item(r) is not None and own_item(r).get("jid") for r in t.records["gina"]
                       if r.kind == "presence" and r.from_.resource != "gina"), "direct: gina sees no real JID"

    run_halves(env, "tc", scenario, check_direct=check)


# ---------------------------------------------------------------------------------------------
# d. leave with an unavailable presence to the bare room JID (Prosody issue 505)
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("master, mirror", PAIRINGS)
def test_d_leave_to_bare_room(make_mixed_servers, master, mirror):
    env = transparency_env(make_mixed_servers, master, mirror, users=["alice", "bob", "carol"])

    async def scenario(t: Half):
        alice = await t.connect("alice", MASTER)
        bob = await t.connect("bob", ACTOR)
        carol = await t.connect("carol", ACTOR)
        for c in (alice, bob, carol):
            await t.join(c, t.label(c))
        await t.barrier(alice, [alice, bob, carol])
        t.mark(alice, bob, carol)
        t.send(bob, f"<presence to='{t.room}' type='unavailable' id='t-d-1'/>")
        gone = lambda c: c.presences(from_=f"{t.room}/bob", type="unavailable")
        await t.wait(lambda: all(gone(c) for c in (alice, bob, carol)), "everyone sees bob leave")
        await t.barrier(alice, [alice, carol])
        for c in (alice, bob, carol):
            t.record(t.label(c), c)

    run_halves(env, "td", scenario)


# ---------------------------------------------------------------------------------------------
# e. leave, then rejoin through the mirror with the same nick
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("master, mirror", PAIRINGS)
def test_e_leave_and_rejoin(make_mixed_servers, master, mirror):
    env = transparency_env(make_mixed_servers, master, mirror, users=["alice", "bob", "carol"])

    async def scenario(t: Half):
        alice = await t.connect("alice", MASTER)
        bob = await t.connect("bob", ACTOR)
        carol = await t.connect("carol", ACTOR)
        await t.join(alice, "alice")
        alice.send_groupchat(t.room, "said before bob came", id="t-e-0")
        await t.join(bob, "bob")
        await t.join(carol, "carol")
        await t.barrier(alice, [alice, bob, carol])

        # bob leaves and comes back while carol (same side) stays.
        t.mark(alice, bob, carol)
        await t.leave(bob, "bob")
        await t.wait(lambda: "bob" not in alice.occupants(t.room), "alice sees bob leave")
        await t.join(bob, "bob", history=None, id="t-e-rejoin-1", setup=False)
        await t.wait(lambda: "bob" in alice.occupants(t.room) and "bob" in carol.occupants(t.room),
                     "everyone sees bob back")
        await t.barrier(alice, [alice, bob, carol])
        for c in (alice, bob, carol):
            t.record(f"{t.label(c)}: bob leaves and rejoins (carol stays)", c)

        # carol leaves; then bob, the last one on his side, leaves and comes back.
        await t.leave(carol, "carol")
        await t.wait(lambda: "carol" not in alice.occupants(t.room), "alice sees carol leave")
        await t.barrier(alice, [alice, bob])
        t.mark(alice, bob)
        await t.leave(bob, "bob")
        await t.wait(lambda: "bob" not in alice.occupants(t.room), "alice sees bob leave")
        await t.join(bob, "bob", history=None, id="t-e-rejoin-2", setup=False)
        await t.wait(lambda: "bob" in alice.occupants(t.room), "alice sees bob back")
        await t.barrier(alice, [alice, bob])
        for c in (alice, bob):
            t.record(f"{t.label(c)}: bob, alone on his side, leaves and rejoins", c)

    run_halves(env, "te", scenario)


# ---------------------------------------------------------------------------------------------
# f. two devices of one account, one nick
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("master, mirror", PAIRINGS)
def test_f_two_devices_one_nick(make_mixed_servers, master, mirror):
    env = transparency_env(make_mixed_servers, master, mirror, users=["alice", "bob", "carol"])

    async def scenario(t: Half):
        alice = await t.connect("alice", MASTER)
        carol = await t.connect("carol", ACTOR)
        phone = await t.connect("bob", ACTOR, resource="phone")
        laptop = await t.connect("bob", ACTOR, resource="laptop")
        await t.join(alice, "alice")
        await t.join(carol, "carol")
        await t.join(phone, "bob", id="t-f-phone")
        await t.barrier(alice, [alice, carol, phone])
        t.mark(alice, carol, phone, laptop)
        joined = await t.join(laptop, "bob", id="t-f-laptop", setup=False)
        in_room = [alice, carol, phone] + ([laptop] if joined is not None and joined.type != "error" else [])
        await t.barrier(alice, in_room)
        for c in (alice, carol, phone, laptop):
            t.record(f"{t.label(c)}: second device joins", c)
        if laptop in in_room:
            t.mark(alice, carol, phone, laptop)
            await t.leave(laptop, "bob")
            await t.barrier(alice, [alice, carol, phone])
            for c in (alice, carol, phone, laptop):
                t.record(f"{t.label(c)}: second device leaves", c)

    def check(t: Half):
        assert_not_empty(t, "bob/laptop: second device joins")

    run_halves(env, "tf", scenario, check_direct=check)


# ---------------------------------------------------------------------------------------------
# g. history on join after chat states and config changes: maxstanzas 0, 5, default
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("master, mirror", PAIRINGS)
def test_g_history_on_join(make_mixed_servers, master, mirror):
    env = transparency_env(make_mixed_servers, master, mirror, users=["alice", "carol", "dave", "erin", "frank"])
    chat = "http://jabber.org/protocol/chatstates"

    async def scenario(t: Half):
        alice = await t.connect("alice", MASTER)
        carol = await t.connect("carol", MASTER)
        await t.join(alice, "alice")
        await t.join(carol, "carol")
        n = [0]

        async def said(c: Client, xml_inner: str, what: str, check=None):
            n[0] += 1
            mid = f"t-g-{n[0]}"
            t.send(c, f"<message to='{t.room}' type='groupchat' id='{mid}'>{xml_inner}</message>")
            await t.wait(lambda: any(r.id == mid for r in carol.messages(from_=t.room))
                         and any(r.id == mid for r in alice.messages(from_=t.room)), what)
        await said(alice, "<body>one</body>", "one")
        await said(carol, "<body>two</body>", "two")
        await said(alice, f"<composing xmlns='{chat}'/>", "alice composing")
        await said(carol, f"<active xmlns='{chat}'/>", "carol active")
        res = await t.configure(alice, "t-g-cfg1", {"muc#roomconfig_whois": "anyone"})
        assert res is not None and res.type == "result", res and res.raw
        await t.wait(lambda: carol.messages(from_=t.room, where=lambda r: has_status(r, 172)), "172 notice")
        await said(alice, "<body>three</body>", "three")
        res = await t.configure(alice, "t-g-cfg2", {"muc#roomconfig_roomname": "Transparency"})
        assert res is not None and res.type == "result", res and res.raw
        await t.wait(lambda: carol.messages(from_=t.room, where=lambda r: has_status(r, 104)), "104 notice")
        await said(carol, f"<paused xmlns='{chat}'/>", "carol paused")
        await said(carol, "<body>four</body>", "four")

        joiners = [("dave", 0), ("erin", 5), ("frank", None)]
        clients = []
        for name, hist in joiners:
            c = await t.connect(name, ACTOR)
            t.mark(c)
            await t.join(c, name, history=hist, setup=False)
            clients.append(c)
        # (A barrier before the joins would be history itself.)
        await t.barrier(alice, [alice] + clients)
        for (name, hist), c in zip(joiners, clients):
            t.record(f"{name} joins with " + ("no <history/>" if hist is None else f"maxstanzas={hist}"), c)

    def check(t: Half):
        hist = lambda k: [r.body for r in t.records[k] if r.kind == "message" and "urn:xmpp:delay" in r.raw and r.body]
        assert hist("dave joins with maxstanzas=0") == []
        assert "four" in hist("erin joins with maxstanzas=5")
        assert hist("frank joins with no <history/>")[:4] == ["one", "two", "three", "four"]

    run_halves(env, "tg", scenario, check_direct=check)


# ---------------------------------------------------------------------------------------------
# h. an owner behind the mirror submits the config form: the IQ result comes before the notice
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("master, mirror", PAIRINGS)
def test_h_config_result_before_notice(make_mixed_servers, master, mirror):
    env = transparency_env(make_mixed_servers, master, mirror, users=["alice", "bob", "carol"])

    async def scenario(t: Half):
        alice = await t.connect("alice", MASTER)
        bob = await t.connect("bob", ACTOR)
        carol = await t.connect("carol", ACTOR)
        for c in (alice, bob, carol):
            await t.join(c, t.label(c))
        res = await t.admin(alice, "t-h-owner", {"jid": bob.jid.bare, "affiliation": "owner"})
        assert res is not None and res.type == "result", res and res.raw
        await t.barrier(alice, [alice, bob, carol])
        t.mark(alice, bob, carol)
        res = await t.configure(bob, "t-h-1", {"muc#roomconfig_whois": "anyone"})
        await t.wait(lambda: all(c.messages(from_=t.room, where=lambda r: has_status(r, 172)) for c in (alice, bob, carol)),
                     "everyone gets the 172 notice")
        await t.barrier(alice, [alice, bob, carol])
        for c in (alice, bob, carol):
            t.record(t.label(c), c)

    def check(t: Half):
        # Prosody answers the IQ, then broadcasts; ejabberd broadcasts first. The comparison
        # holds the mirror to the host's order.
        w = t.records["bob"]
        kinds = [("iq" if r.kind == "iq" else "notice") for r in w if r.kind == "iq" or has_status(r, 172)]
        assert sorted(kinds) == ["iq", "notice"], f"direct: one IQ result and one notice: {kinds}"

    run_halves(env, "th", scenario, check_direct=check)


# ---------------------------------------------------------------------------------------------
# i. stanza-id and occupant-id on every copy, the same values as the master's direct users see
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("master, mirror", PAIRINGS)
def test_i_ids_match(make_mixed_servers, master, mirror):
    # stanza-id (XEP-0359) needs the room archive: mod_muc_mam on Prosody, mod_mam on ejabberd.
    env = transparency_env(make_mixed_servers, master, mirror, users=["alice", "bob", "carol", "dave"],
                           prosody_muc_modules=["muc_mam"],
                           ejabberd_muc={"default_room_options": {"mam": True}},
                           ejabberd_master_modules={"mod_mam": {}})
    bodies = ["from bob", "from alice"]

    async def scenario(t: Half):
        alice = await t.connect("alice", MASTER)
        carol = await t.connect("carol", MASTER)
        bob = await t.connect("bob", ACTOR)
        dave = await t.connect("dave", ACTOR)
        everyone = [alice, carol, bob, dave]
        for c in everyone:
            await t.join(c, t.label(c))
        await t.barrier(alice, everyone)
        t.mark(*everyone)
        bob.send_groupchat(t.room, bodies[0], id="t-i-1")
        await t.wait(lambda: all(c.groupchat(t.room, bodies[0]) for c in everyone), "bob's message everywhere")
        alice.send_groupchat(t.room, bodies[1], id="t-i-2")
        await t.wait(lambda: all(c.groupchat(t.room, bodies[1]) for c in everyone), "alice's message everywhere")
        await t.barrier(alice, everyone)
        for c in everyone:
            t.record(t.label(c), c)

    def values(t: Half) -> Dict[str, Dict[str, tuple]]:
        """body -> user -> (stanza-id by, stanza-id, occupant-id)."""
        out: Dict[str, Dict[str, tuple]] = {b: {} for b in bodies}
        for who, recs in t.records.items():
            for body, by, sid, oid in ids_of(recs):
                if body in out:
                    out[body][who] = (by, sid, oid)
        return out

    def check(t: Half):
        for body, per_user in values(t).items():
            assert len(per_user) == 4, (body, per_user)
            distinct = set(per_user.values())
            assert len(distinct) == 1, f"direct: every copy of {body!r} has the same ids: {per_user}"
            by, sid, _ = distinct.pop()
            assert sid and by == t.room, f"direct: the host adds a stanza-id by the room: {per_user}"

    def same_values(direct: Half, mirrored: Half) -> List[str]:
        norm = mirrored.normalizer()
        problems = []
        for body, per_user in values(mirrored).items():
            ref = per_user.get("alice")
            for who, v in per_user.items():
                if v != ref:
                    v_, ref_ = (tuple(norm.jid(x) if i == 0 else x for i, x in enumerate(y)) if y else y
                                for y in (v, ref))
                    problems.append(f"ids of {body!r}: {who} got (by, stanza-id, occupant-id) {v_}, "
                                    f"alice (on the master's server) {ref_}")
        return problems

    run_halves(env, "ti", scenario, check_direct=check, more_checks=same_values)


# ---------------------------------------------------------------------------------------------
# j. presence decorations: vcard-temp:x:update reaches the room
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("master, mirror", PAIRINGS)
def test_j_vcard_update_decoration(make_mixed_servers, master, mirror):
    """The users' servers decorate presences: mod_vcard_legacy (Prosody) adds
    <x xmlns='vcard-temp:x:update'><photo/></x>, mod_vcard_xupdate (ejabberd) an empty <x/> and
    replaces a client's own. Those differ by server software, so they are loaded only where both
    sides run the same one (P-P, E-E); in the mixed pairings the client's own decoration is what
    must reach the room unchanged."""
    same_kind = master == mirror
    env = transparency_env(make_mixed_servers, master, mirror, users=["alice", "bob", "carol"],
                           prosody_host_modules=["vcard_legacy"] if same_kind else (),
                           ejabberd_host_modules={"mod_vcard": {"search": False}, "mod_vcard_xupdate": {}}
                           if same_kind else None)
    photo = "0123456789abcdef0123456789abcdef01234567"

    async def scenario(t: Half):
        alice = await t.connect("alice", MASTER)
        carol = await t.connect("carol", ACTOR)
        bob = await t.connect("bob", ACTOR)
        await t.join(alice, "alice")
        await t.join(carol, "carol")
        await t.barrier(alice, [alice, carol])
        t.mark(alice, carol)
        # A plain join: the user's server adds its decoration (P-P, E-E).
        await t.join(bob, "bob")
        await t.barrier(alice, [alice, carol, bob])
        for c in (alice, carol):
            t.record(f"{t.label(c)}: bob joins", c)
        # The client's own decoration, on a presence update.
        t.mark(alice, carol, bob)
        t.send(bob, f"<presence to='{t.room}/bob' id='t-j-2'><show>away</show>"
                    f"<x xmlns='vcard-temp:x:update'><photo>{photo}</photo></x></presence>")
        away = lambda c: c.presences(from_=f"{t.room}/bob", where=lambda r: "<show>away</show>" in r.raw)
        await t.wait(lambda: all(away(c) for c in (alice, carol, bob)), "bob's update seen")
        await t.barrier(alice, [alice, carol, bob])
        for c in (alice, carol, bob):
            t.record(f"{t.label(c)}: bob's update with his photo hash", c)

    def check(t: Half):
        keys = ["alice: bob's update with his photo hash"] + (["alice: bob joins"] if same_kind else [])
        for k in keys:
            assert any("vcard-temp:x:update" in r.raw for r in t.records[k]), f"direct: {k} carries the decoration"

    run_halves(env, "tj", scenario, check_direct=check)


# ---------------------------------------------------------------------------------------------
# k. nicks the host refuses: the same error (condition, type, by) as direct
# ---------------------------------------------------------------------------------------------

NICK_CASES = [
    ("strict", "\u0221"),      # unassigned in Unicode 3.2: resourceprep passes it, strict resourceprep does not
    ("invisible", " "),        # whitespace only
    ("taken", "alice"),        # another user's nick
]


@pytest.mark.parametrize("master, mirror", PAIRINGS)
def test_k_refused_nicks(make_mixed_servers, master, mirror):
    # Where the users' servers differ (the mixed pairings), a nick failing strict resourceprep
    # is not the room's to answer: an ejabberd user's own server refuses it before sending it
    # anywhere. Its reference there is the same join to a room of the users' own server: what
    # the user gets whatever the room (plain federation included).
    mixed = master != mirror
    env = transparency_env(make_mixed_servers, master, mirror, users=["alice", "bob"], users_muc=mixed)
    strict_key = f"bob: nick strict ({NICK_CASES[0][1]!r})"
    own_key = "bob: nick strict, at a room of the users' own server"

    async def scenario(t: Half):
        alice = await t.connect("alice", MASTER)
        bob = await t.connect("bob", ACTOR)
        await t.join(alice, "alice")
        t.mark(alice)
        for case, nick in NICK_CASES:
            t.mark(bob)
            got = await t.join(bob, nick, id=f"t-k-{case}", setup=False)
            if got is not None and got.type != "error":
                await t.leave(bob, nick)          # accepted by the host: leave, for the next case
            await t.barrier(alice, [alice])
            t.record(f"bob: nick {case} ({nick!r})", bob)
        if mixed and not t.direct:
            own = f"tk-own@{USERS_MUC}"
            t.aliases[own] = "ROOM"
            t.mark(bob)
            start = len(bob.received)
            t.send(bob, t.join_xml(NICK_CASES[0][1], 0, id="t-k-strict", to=f"{own}/{NICK_CASES[0][1]}"))
            await t.wait(lambda: any(r.id == "t-k-strict" for r in bob.received[start:]),
                         "the users' own server answers the strict nick")
            t.record(own_key, bob)
        # No nick at all: a join to the bare room JID.
        t.mark(bob)
        start = len(bob.received)
        t.send(bob, t.join_xml(None, 0, id="t-k-none"))
        await t.wait(lambda: any(r.id == "t-k-none" or (r.kind == "presence" and r.from_.bare == t.room)
                                 for r in bob.received[start:]), "bob's nickless join answered")
        await t.barrier(alice, [alice])
        t.record("bob: no nick", bob)
        t.record("alice (sees none of it, or what the host shows)", alice)

    def check(t: Half):
        for case, nick in NICK_CASES:
            assert t.records[f"bob: nick {case} ({nick!r})"], f"direct: the host answers the {case} nick"
        assert t.records["bob: no nick"]

    def stock(direct: Half, mirrored: Half) -> List[str]:
        problems = []
        if mixed:
            # Compared with the users' own server's answer instead (and taken out of the
            # direct comparison): the answer must be there, and the same.
            direct.records.pop(strict_key, None)
            got = mirrored.records.pop(strict_key, [])
            reference = mirrored.records.pop(own_key, [])
            norm = mirrored.normalizer()
            if not reference:
                problems.append("the users' own server gave no answer to the strict nick")
            elif canon_window(got, norm) != canon_window(reference, norm):
                problems.append("strict nick via the mirror differs from the users' own server's answer:\n  "
                                f"got:       {canon_window(got, norm)}\n  reference: {canon_window(reference, norm)}")
        # What stock Prosody 0.12 answers a nick that fails strict resourceprep (muc.lib.lua:
        # jid-malformed "Nickname must pass strict validation", by the room). A different answer
        # in the direct run is dmuc on the master changing what direct users get.
        if master != "prosody" or mixed:
            return problems
        got = [r for r in direct.records[strict_key] if r.type == "error"]
        err = got[0].stanza.xml.find("{jabber:client}error") if got else None
        if err is None or error_condition(got[0]) != "jid-malformed" or err.get("by") != direct.room:
            return problems + ["direct run differs from stock Prosody for the strict nick: expected "
                               "error(by=ROOM,type=modify)[jid-malformed], got "
                               + (canon_window(got, direct.normalizer())[0] if got else "no error")]
        return problems

    run_halves(env, "tk", scenario, check_direct=check, more_checks=stock)


# ---------------------------------------------------------------------------------------------
# l. kick and affiliation notices as a moderator behind the mirror sees them
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("master, mirror", PAIRINGS)
def test_l_kick_and_affiliation_notices(make_mixed_servers, master, mirror):
    env = transparency_env(make_mixed_servers, master, mirror,
                           users=["alice", "bob", "carol", "dave", "erin", "frank"])

    async def scenario(t: Half):
        alice = await t.connect("alice", MASTER)
        erin = await t.connect("erin", MASTER)
        bob = await t.connect("bob", ACTOR)       # admin: a moderator
        carol = await t.connect("carol", ACTOR)   # a participant
        dave = await t.connect("dave", ACTOR)
        frank = await t.connect("frank", ACTOR)
        everyone = [alice, erin, bob, carol, dave, frank]
        for c in everyone:
            await t.join(c, t.label(c))
        res = await t.admin(alice, "t-l-admin", {"jid": bob.jid.bare, "affiliation": "admin"})
        assert res is not None and res.type == "result", res and res.raw
        await t.wait(lambda: any(own_item(r) is not None and own_item(r).get("role") == "moderator"
                                 for r in bob.presences(from_=f"{t.room}/bob")), "bob is a moderator")
        await t.barrier(alice, everyone)

        # alice (owner, on the master's server) kicks dave (actor side).
        t.mark(*everyone)
        res = await t.admin(alice, "t-l-kick1", {"nick": "dave", "role": "none"}, reason="kick one")
        assert res is not None and res.type == "result", res and res.raw
        await t.wait(lambda: dave.presences(from_=f"{t.room}/dave", type="unavailable"), "dave kicked")
        everyone.remove(dave)
        await t.barrier(alice, everyone)
        for c in (alice, bob, carol, dave):
            t.record(f"{t.label(c)}: alice kicks dave", c)

        # bob (moderator behind the mirror) kicks erin (on the master's server).
        t.mark(*everyone)
        res = await t.admin(bob, "t-l-kick2", {"nick": "erin", "role": "none"}, reason="kick two")
        await t.wait(lambda: erin.presences(from_=f"{t.room}/erin", type="unavailable"), "erin kicked")
        everyone.remove(erin)
        await t.barrier(alice, everyone)
        for c in (alice, bob, carol, erin):
            t.record(f"{t.label(c)}: bob kicks erin", c)

        # alice makes frank (actor side) a member.
        t.mark(*everyone)
        res = await t.admin(alice, "t-l-member", {"jid": frank.jid.bare, "affiliation": "member"})
        assert res is not None and res.type == "result", res and res.raw
        await t.wait(lambda: all(c.presences(from_=f"{t.room}/frank", where=lambda r: own_item(r) is not None
                                             and own_item(r).get("affiliation") == "member") for c in everyone),
                     "everyone sees frank become a member")
        await t.barrier(alice, everyone)
        for c in (alice, bob, carol, frank):
            t.record(f"{t.label(c)}: alice makes frank a member", c)

    def check(t: Half):
        assert_not_empty(t, "bob: alice kicks dave", "bob: bob kicks erin", "bob: alice makes frank a member")

    run_halves(env, "tl", scenario, check_direct=check)


# ---------------------------------------------------------------------------------------------
# m. a re-sent join presence (Prosody issue 667) and presence probes
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("master, mirror", PAIRINGS)
def test_m_resent_join_and_probe(make_mixed_servers, master, mirror):
    env = transparency_env(make_mixed_servers, master, mirror, users=["alice", "bob", "carol"])

    async def scenario(t: Half):
        alice = await t.connect("alice", MASTER)
        bob = await t.connect("bob", ACTOR)
        carol = await t.connect("carol", ACTOR)
        await t.join(alice, "alice")
        alice.send_groupchat(t.room, "history for the re-sent join", id="t-m-0")
        await t.join(bob, "bob", history=None)
        await t.join(carol, "carol")
        await t.barrier(alice, [alice, bob, carol])

        t.mark(alice, bob, carol)
        start = len(bob.received)
        t.send(bob, t.join_xml("bob", None, id="t-m-1"))
        await t.wait(lambda: any(r.kind == "presence" and str(r.from_) == f"{t.room}/bob" for r in bob.received[start:]),
                     "bob's re-sent join answered")
        await t.barrier(alice, [alice, bob, carol])
        for c in (alice, bob, carol):
            t.record(f"{t.label(c)}: bob re-sends his join", c)

        # Presence probes to occupant JIDs (Prosody answers them; ejabberd does not).
        for target, mid in (("bob", "t-m-2"), ("alice", "t-m-3")):
            t.mark(alice, bob, carol)
            t.send(bob, f"<presence to='{t.room}/{target}' type='probe' id='{mid}'/>")
            await t.settle(f"bob: bob probes {target}", bob, [alice, bob, carol])
            for c in (alice, bob, carol):
                t.record(f"{t.label(c)}: bob probes {target}", c)

    def check(t: Half):
        assert_not_empty(t, "bob: bob re-sends his join")

    run_halves(env, "tm", scenario, check_direct=check)


# ---------------------------------------------------------------------------------------------
# n. XEP-0410 self-ping, with the link up and while it is down
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("master, mirror", PAIRINGS)
def test_n_self_ping(make_mixed_servers, master, mirror):
    env = transparency_env(make_mixed_servers, master, mirror, users=["alice", "bob"], fast_pings=True)
    ping = "<ping xmlns='urn:xmpp:ping'/>"

    async def scenario(t: Half):
        alice = await t.connect("alice", MASTER)
        bob = await t.connect("bob", ACTOR)
        await t.join(alice, "alice")
        await t.join(bob, "bob")
        t.mark(bob)
        await t.iq(bob, "t-n-1", "get", f"{t.room}/bob", ping, "bob's self-ping answered")
        t.record("bob: self-ping, link up", bob, kinds=("iq",))

        t.mark(bob)
        t.env.link.cut("blackhole")
        try:
            if not t.direct:
                # The mirror has found the link down once it shows the master's side leaving.
                await t.wait(lambda: "alice" not in bob.occupants(t.room), "the mirror notices the link is down", 20)
            await t.iq(bob, "t-n-2", "get", f"{t.room}/bob", ping, "bob's self-ping answered, link down", 20)
            t.record("bob: self-ping, link down", bob, kinds=("iq",))
        finally:
            t.env.link.restore()

    def check(t: Half):
        for k in ("bob: self-ping, link up", "bob: self-ping, link down"):
            assert [r.type for r in t.records[k]] == ["result"], f"direct: {k}: {[r.raw for r in t.records[k]]}"

    run_halves(env, "tn", scenario, check_direct=check)


# ---------------------------------------------------------------------------------------------
# o. a nick change through the mirror: not-acceptable (DMUC3 MUST)
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("master, mirror", PAIRINGS)
def test_o_nick_change_refused(make_mixed_servers, master, mirror):
    """Not an oracle comparison: the host allows a nick change; DMUC3 (Business Rules) says a
    mirror MUST refuse it with not-acceptable. The direct run shows the host's change (status
    303), the run via the mirror must show the refusal, and nobody may see a change."""
    env = transparency_env(make_mixed_servers, master, mirror, users=["alice", "bob", "carol"])

    async def scenario(t: Half):
        alice = await t.connect("alice", MASTER)
        bob = await t.connect("bob", ACTOR)
        carol = await t.connect("carol", ACTOR)
        for c in (alice, bob, carol):
            await t.join(c, t.label(c))
        await t.barrier(alice, [alice, bob, carol])
        t.mark(alice, bob, carol)
        start = len(bob.received)
        t.send(bob, f"<presence to='{t.room}/robert' id='t-o-1'/>")
        await t.wait(lambda: any(r.kind == "presence" and str(r.from_) in (f"{t.room}/robert", f"{t.room}/bob")
                                 for r in bob.received[start:]), "bob's nick change answered")
        await t.barrier(alice, [alice, bob, carol])
        for c in (alice, bob, carol):
            t.record(t.label(c), c)

    def check(t: Half):
        assert any(has_status(r, 303) for r in t.records["bob"]), "direct: the host changes the nick (303)"

    halves: Dict[str, Half] = {}

    async def body():
        for mode in MODES:
            async with ClientHub(watch=[env.link]) as hub:
                half = Half(env, hub, mode, "to")
                halves[mode] = half
                try:
                    await scenario(half)
                    if mode == "direct":
                        check(half)
                except AssertionError as e:
                    raise AssertionError(f"{mode}: {e}\n{hub.dump(30)}") from None
    run(body(), timeout=180)
    if "mirror" not in halves:
        return
    t = halves["mirror"]
    norm = t.normalizer()
    bob_lines = canon_window(t.records["bob"], norm)
    errors = [r for r in t.records["bob"] if r.kind == "presence" and r.type == "error"]
    problems = list(t.notes)
    if len(errors) != 1:
        problems.append(f"bob: one error presence expected, got {len(errors)}")
    else:
        e = errors[0]
        if str(e.from_) != f"{t.room}/robert":
            problems.append(f"error from {norm.jid(str(e.from_))}, expected ROOM/robert")
        if error_condition(e) != "not-acceptable":
            problems.append(f"error condition {error_condition(e)}, expected not-acceptable")
    others = [r for r in t.records["bob"] if not (r.kind == "presence" and r.type == "error")]
    if others:
        problems.append("bob got more than the error: " + "; ".join(canon_window(others, norm)))
    for who in ("alice", "carol"):
        if t.records[who]:
            problems.append(f"{who} saw: " + "; ".join(canon_window(t.records[who], norm)))
    assert not problems, "\n".join(problems) + "\n-- bob via the mirror:\n" + "\n".join(bob_lines)
