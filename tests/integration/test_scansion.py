"""Prosody's own MUC scansion scripts (tests/scansion/scripts, from Prosody 0.12.3), run by
tests/scansion/runner.py in three modes:

* ``plain``: one Prosody (fairfax.localhost) with a stock MUC, every client on it: the oracle.
  Configured as close to Prosody's spec/scansion/prosody.cfg.lua as the harness allows (the
  same global modules, insecure authentication, memory storage, muc_mam on the MUC, room
  locking on, tombstones on, the service admin); what differs: the domain names, loopback
  ports, s2s/dialback on, time not mocked (the CI config pins os.time; no script depends on
  it), and each script gets a fresh server (Prosody's CI runs them in turn on one). All 17 pass
  on stock 0.12.3, as in Prosody's CI.
* ``mirror_all``: fairfax is the master (``modules_enabled = { "dmuc" }`` on
  conference.fairfax.localhost), raleigh the mirror (mirror.raleigh.localhost), as in
  test_dmuc_flow.py's dmuc_env; every client's account is on raleigh, behind the mirror.
* ``mirror_first_on_master``: as mirror_all, but the first client the script declares (and any
  other client on the same account) is on fairfax, next to the room.

The scripts' JIDs (``user@localhost``, ``room@conference.localhost``) are rewritten onto those
servers by the runner. Each (mode, script) is one test.

Mirror-mode exceptions: only scripts whose behaviour DMUC3 itself forbids are excepted, listed in
DMUC3_EXCEPTIONS below. They still run, and must fail exactly at the forbidden step, with the
refusal DMUC3 prescribes. Every other failure is a bug, reported as such (no xfail, no skip).

Needs ``make dist`` (dist/prosody/; DMUC_DIST=<a copy of dist/> points elsewhere) for the mirror modes.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import sys
from typing import Dict, List, Optional

import pytest

from servers import CONFERENCE, FAIRFAX, RALEIGH, Prosody

SCANSION_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scansion")
if SCANSION_DIR not in sys.path:
    sys.path.insert(0, SCANSION_DIR)

from runner import (  # noqa: E402
    JidRewriter, Placement, ScriptFailure, Server, parse_script, pretty, run_script,
)

MIRROR = f"mirror.{RALEIGH}"
# DMUC_DIST: a copy of dist/ (as test_transparency.py takes it), to test a snapshot.
DIST = os.path.join(os.environ.get("DMUC_DIST") or os.path.join(os.path.dirname(__file__), "..", "..", "dist"),
                    "prosody")
SCRIPTS = sorted(glob.glob(os.path.join(SCANSION_DIR, "scripts", "*.scs")))
MODES = ("plain", "mirror_all", "mirror_first_on_master")

# Seconds a `receives` waits for its stanza. A mirror's first join waits for the master (the
# mirror's dmuc_join_timeout is 30 s), over s2s sessions that are set up on first use.
RECEIVE_TIMEOUT = {"plain": 20.0, "mirror_all": 45.0, "mirror_first_on_master": 45.0}
SCRIPT_TIMEOUT = 600.0

# As spec/scansion/prosody.cfg.lua (0.12.3): its global modules_enabled, less those the harness
# always loads (roster, saslauth, disco, ping).
GLOBAL_MODULES = [
    "carbons", "pep", "private", "blocklist", "vcard4", "vcard_legacy", "version", "uptime", "time",
    "register", "mam", "server_contact_info", "lastactivity", "external_services", "tombstones",
    "user_account_management",
]


@dataclasses.dataclass(frozen=True)
class NickChange:
    """A script step that changes an occupant's nick: DMUC3 says a mirror MUST refuse a nick
    change with not-acceptable. `line` is the `sends:` of the new presence."""
    client: str
    line: int
    room: str        # as the script writes it
    new_nick: str


# Scripts excepted in the mirror modes, because DMUC3 forbids what they test. Each must still run
# and fail exactly at the step named, with a presence error not-acceptable from room/new nick.
DMUC3_EXCEPTIONS: Dict[str, NickChange] = {
    # Juliet (behind the mirror in both mirror modes) changes her nick Juliet -> Juliet2.
    "muc_nickname_change": NickChange("Juliet", 107, "room@conference.localhost", "Juliet2"),
}


def _script_id(path: str) -> str:
    return os.path.splitext(os.path.basename(path))[0]


def placement_for(mode: str, script, fairfax: Server, raleigh: Optional[Server]) -> Placement:
    if mode == "plain":
        servers = {name: fairfax for name in script.clients}
    elif mode == "mirror_all":
        servers = {name: raleigh for name in script.clients}
    elif mode == "mirror_first_on_master":
        first = next(iter(script.clients.values()))
        first_account = first.jid.split("/", 1)[0].lower()
        servers = {name: (fairfax if c.jid.split("/", 1)[0].lower() == first_account else raleigh)
                   for name, c in script.clients.items()}
    else:
        raise ValueError(mode)
    return Placement(servers=servers, room_domain=CONFERENCE)


def lua_list(items: List[str]) -> str:
    return "{ " + "; ".join(f'"{i}"' for i in items) + " }"


def global_options(rw: JidRewriter) -> List[str]:
    return [
        f"admins = {lua_list([rw.rewrite('admin@localhost')])}",
        'authentication = "insecure"',
        'insecure_open_authentication = "Yes please, I know what I\'m doing!"',
        'storage = "memory"',
        "mam_smart_enable = true",
        "allow_registration = false",
        "hide_os_type = true",
    ]


def conference_options(rw: JidRewriter, dmuc: bool) -> List[str]:
    modules = (["dmuc"] if dmuc else []) + ["muc_mam"]
    lines = [
        'storage = "memory"',
        f"admins = {lua_list([rw.rewrite('Admin@localhost')])}",
        f"modules_enabled = {lua_list(modules)}",
        # Prosody's defaults, which the scripts expect (the harness turns locking off).
        "muc_room_locking = true",
        "muc_tombstones = true",
    ]
    if dmuc:
        lines.append(f'dmuc_trusted_mirrors = {{ "{MIRROR}" }}')
    return lines


class _PlainEnv:
    """The one-server env, shaped for the harness's failure hook (logs attached, dirs kept)."""

    def __init__(self, server: Prosody):
        self.server = server
        self.keep = False

    @property
    def servers(self):
        return [self.server]

    def logs(self, lines: int = 200) -> str:
        return self.server.log_tail(lines)


def dmuc3_exception_problem(script, exc: NickChange, err: ScriptFailure) -> Optional[str]:
    """None if the script failed exactly as DMUC3 prescribes: at the first `receives` of
    exc.client after the nick change, on a presence error not-acceptable from the new room JID
    (the mirror MUST refuse nick changes). Otherwise what is wrong."""
    after = [a for a in script.actions if a.line > exc.line and a.client == exc.client and a.kind == "receives"]
    if not after:
        return f"no receives by {exc.client} after line {exc.line}"
    step = after[0]
    if err.action is None or err.action.line != step.line:
        return (f"DMUC3 exception: the script should fail at line {step.line} ({exc.client}'s first receives "
                f"after the nick change at line {exc.line}, refused by the mirror), but it failed elsewhere:\n{err}")
    if not err.received:
        return f"DMUC3 exception: {exc.client} should get the refusal at line {step.line}, got nothing:\n{err}"
    got = err.received[0].el
    ns = "{jabber:client}"
    stanzas = "{urn:ietf:params:xml:ns:xmpp-stanzas}"
    room = exc.room.replace("conference.localhost", CONFERENCE)
    error = got.find(f"{ns}error")
    ok = (got.tag == f"{ns}presence" and got.get("type") == "error"
          and got.get("from") == f"{room}/{exc.new_nick}"
          and error is not None and error.find(f"{stanzas}not-acceptable") is not None)
    if not ok:
        return (f"DMUC3 exception: at line {step.line} {exc.client} should get the refusal of the nick change "
                f"(presence type='error' from {room}/{exc.new_nick} with <not-acceptable/>), got:\n"
                f"{pretty(got)}\n\n{err}")
    return None


def _params():
    for mode in MODES:
        for path in SCRIPTS:
            yield pytest.param(mode, path, id=f"{mode}-{_script_id(path)}")


@pytest.fixture
def make_plain_server(make_two_servers, request):
    """Start one Prosody; stopped after the test. On a failure the harness's report hook (which
    make_two_servers sets up) attaches its log and keeps its dir."""
    envs = []

    def make(domain, **kwargs) -> Prosody:
        server = Prosody(domain, **kwargs)
        env = _PlainEnv(server)
        envs.append(env)
        request.node._dmuc_envs.append(env)
        server.start()
        return server
    yield make
    for env in envs:
        env.server.cleanup(env.keep)


@pytest.mark.parametrize("mode,path", list(_params()))
def test_scansion(mode, path, make_two_servers, make_plain_server):
    script = parse_script(path)
    name = script.name
    # A first rewriter only for the config (admins): the ports are not known yet.
    fairfax0 = Server(FAIRFAX, 0)
    raleigh0 = Server(RALEIGH, 0)
    rw = JidRewriter(script, placement_for(mode, script, fairfax0, raleigh0))

    if mode == "plain":
        block = "\n".join([f'Component "{CONFERENCE}" "muc"']
                          + ["    " + l for l in conference_options(rw, dmuc=False)])
        server = make_plain_server(FAIRFAX, extra_blocks=[block], global_modules=GLOBAL_MODULES,
                                   global_options=global_options(rw))
        placement = placement_for(mode, script, Server(FAIRFAX, server.c2s_port), None)
        _run(mode, script, placement)
        return

    dist = os.path.abspath(DIST)
    if not os.path.exists(os.path.join(dist, "dmuc_prosody.so")):
        raise AssertionError(f"{dist} has no dmuc_prosody.so: run `make dist` first")
    env = make_two_servers(
        plugin_paths=[dist],
        conference_options=conference_options(rw, dmuc=True),
        raleigh_modules=["dmuc"],
        raleigh_blocks=[f'Component "{MIRROR}" "dmuc"\n    dmuc_masters = {{ "{CONFERENCE}" }}\n'
                        '    dmuc_ping_interval = 3600'],
        global_modules=GLOBAL_MODULES,
        global_options=global_options(rw),
    )
    placement = placement_for(mode, script, Server(FAIRFAX, env.fairfax.c2s_port),
                              Server(RALEIGH, env.raleigh.c2s_port))
    exc = DMUC3_EXCEPTIONS.get(name)
    if exc is None:
        _run(mode, script, placement)
        return
    problem = None
    try:
        run_script(script, placement, timeout=SCRIPT_TIMEOUT, receive_timeout=RECEIVE_TIMEOUT[mode])
        problem = (f"{name}: DMUC3 forbids the nick change at line {exc.line} through a mirror, "
                   "but the script passed")
    except ScriptFailure as err:
        problem = dmuc3_exception_problem(script, exc, err)
    if problem:
        pytest.fail(problem, pytrace=False)


def _run(mode: str, script, placement: Placement) -> None:
    failure = None
    try:
        run_script(script, placement, timeout=SCRIPT_TIMEOUT, receive_timeout=RECEIVE_TIMEOUT[mode])
    except ScriptFailure as err:
        failure = str(err)
    if failure is not None:
        pytest.fail(failure, pytrace=False)


# ---------------------------------------------------------------------------------------------
# The runner's matching and rewriting rules (no servers)
# ---------------------------------------------------------------------------------------------

def _el(xml: str):
    import xml.etree.ElementTree as ET
    return ET.fromstring(xml)


def _exp(xml: str):
    from runner import parse_block
    return parse_block(xml, "test")


RECEIVED = ("<presence xmlns='jabber:client' from='r@c/n' to='u@h/x' xml:lang='en'>"
            "<occupant-id xmlns='urn:xmpp:occupant-id:0' id='abc'/>"
            "<x xmlns='http://jabber.org/protocol/muc#user'><status code='201'/>"
            "<item affiliation='owner' role='moderator' jid='u@h/x'/><status code='110'/></x></presence>")


@pytest.mark.parametrize("expected,matches", [
    # Default namespace: extra attributes and children ignored, order ignored.
    ("<presence from='r@c/n'/>", True),
    ("<presence from='r@c/other'/>", False),
    ("<presence from='{scansion:any}' type='{scansion:any}'/>", False),   # any still needs the attribute
    ("<presence from='{scansion:any}'/>", True),
    # A namespaced child is strict: same attributes, same children, same order.
    ("<presence><x xmlns='http://jabber.org/protocol/muc#user'><status code='201'/>"
     "<item affiliation='owner' role='moderator' jid='u@h/x'/><status code='110'/></x></presence>", True),
    ("<presence><x xmlns='http://jabber.org/protocol/muc#user'><status code='201'/>"
     "<item affiliation='owner' role='moderator'/><status code='110'/></x></presence>", False),
    ("<presence><x xmlns='http://jabber.org/protocol/muc#user'><status code='110'/>"
     "<item affiliation='owner' role='moderator' jid='u@h/x'/><status code='201'/></x></presence>", False),
    ("<presence><x xmlns='http://jabber.org/protocol/muc#user'>"
     "<item affiliation='owner' role='moderator' jid='u@h/x'/></x></presence>", False),
    # scansion:strict='false' relaxes that element (its children keep their own rule).
    ("<presence><x xmlns='http://jabber.org/protocol/muc#user' scansion:strict='false'>"
     "<status code='110'/><item affiliation='owner' role='moderator' jid='u@h/x'/></x></presence>", True),
    ("<presence><x xmlns='http://jabber.org/protocol/muc#user' scansion:strict='false'>"
     "<item affiliation='owner' jid='u@h/x'/></x></presence>", False),
    # The namespace is part of the name.
    ("<presence><x xmlns='http://jabber.org/protocol/muc'/></presence>", False),
    # scansion:strict='true' on a default-namespace element: no extra attributes.
    ("<presence scansion:strict='true' from='r@c/n'/>", False),
])
def test_runner_matching(expected, matches):
    from runner import mismatch
    why = mismatch(_exp(expected), _el(RECEIVED))
    assert (why is None) == matches, why


def test_runner_matching_text():
    from runner import mismatch
    got = _el("<message xmlns='jabber:client' from='r@c/n'><body>Hi there</body><stanza-id xmlns='urn:xmpp:sid:0' id='1'/></message>")
    assert mismatch(_exp("<message><body>Hi there</body></message>"), got) is None
    assert mismatch(_exp("<message><body>Hi</body></message>"), got) is not None
    # strict elements must not have text the script does not show
    got = _el("<presence xmlns='jabber:client'><x xmlns='vcard-temp:x:update'><photo>hash</photo></x></presence>")
    assert mismatch(_exp("<presence><x xmlns='vcard-temp:x:update'><photo/></x></presence>"), got) is not None


def test_runner_rewrites_only_jids():
    from runner import Script, ClientDef
    script = Script("x.scs", "", {
        "Romeo": ClientDef("Romeo", "user@localhost", "pw", 1, {}),
        "Juliet": ClientDef("Juliet", "user2@localhost/res", "pw", 2, {}),
    }, [])
    rw = JidRewriter(script, Placement({"Romeo": Server(FAIRFAX, 1), "Juliet": Server(RALEIGH, 1)}, CONFERENCE))
    assert rw.rewrite("<presence to='room@conference.localhost/Juliet'/>") == \
        f"<presence to='room@{CONFERENCE}/Juliet'/>"
    assert rw.rewrite('<item jid="user2@localhost/res" nick="localhost"/>') == \
        f'<item jid="user2@{RALEIGH}/res" nick="localhost"/>'
    assert rw.rewrite("<body>room@conference.localhost/Romeo invited you to the room room@conference.localhost</body>") \
        == f"<body>room@{CONFERENCE}/Romeo invited you to the room room@{CONFERENCE}</body>"
    assert rw.rewrite("<iq to='localhost'/>") == f"<iq to='{FAIRFAX}'/>"          # the first client's server
    assert rw.rewrite("<x url='http://localhost/x' v='mailto:user@localhost'/>") == \
        "<x url='http://localhost/x' v='mailto:user@localhost'/>"
    assert rw.rewrite("Admin@localhost USER@localhost") == f"Admin@{FAIRFAX} USER@{FAIRFAX}"
