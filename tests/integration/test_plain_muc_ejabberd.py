"""Plain-MUC baseline (no dmuc) for the pairings that involve ejabberd.

Same measurement as test_plain_muc.py: one room on fairfax (conference.fairfax.localhost, the
stock MUC of whichever server fairfax is), one local occupant on fairfax and K occupants on
raleigh. A groupchat message is fanned out by the room once per occupant, so K copies of it
cross fairfax -> raleigh, and each raleigh user receives it exactly once.

Pairings (master = fairfax, users' server = raleigh):
  ejabberd  <-> ejabberd
  ejabberd  <-> prosody      (ejabberd MUC, Prosody users)
  prosody   <-> ejabberd     (Prosody MUC, ejabberd users)

Run with `-s` to see the measured bytes.
"""

import asyncio
import uuid

import pytest

from clients import ClientHub, run
from servers import CONFERENCE, FAIRFAX, RALEIGH

ROOM = f"chatroom@{CONFERENCE}"
PASSWORD = "secret"
K = 5

PAIRINGS = [
    pytest.param("ejabberd", "ejabberd", id="ejabberd-ejabberd"),
    pytest.param("ejabberd", "prosody", id="ejabberd-master-prosody-users"),
    pytest.param("prosody", "ejabberd", id="prosody-master-ejabberd-users"),
]


async def _setup_room(env, hub, k):
    """alice@fairfax creates the room; user1..userK@raleigh join it. Returns (alice, remotes)."""
    alice = await hub.connect(f"alice@{FAIRFAX}", PASSWORD, env.fairfax.c2s_port)
    await alice.join(ROOM, "alice")
    remotes = await hub.connect_many([(f"user{i}@{RALEIGH}", PASSWORD) for i in range(1, k + 1)],
                                     env.raleigh.c2s_port)
    await asyncio.gather(*(c.join(ROOM, f"user{i}", timeout=20) for i, c in enumerate(remotes, 1)))
    # Wait until every join has been announced to everyone, so no join presence is still in
    # flight when the link counters are reset.
    await hub.wait_for(lambda: len(alice.occupants(ROOM)) == k + 1, 20, f"alice sees {k + 1} occupants")
    await hub.wait_for(lambda: all(len(c.occupants(ROOM)) == k + 1 for c in remotes), 20,
                       f"every raleigh user sees {k + 1} occupants")
    return alice, remotes


async def _measure_one_message(env, k):
    env.fairfax.register("alice", PASSWORD)
    env.raleigh.register_many([(f"user{i}", PASSWORD) for i in range(1, k + 1)])
    async with ClientHub(watch=[env.link]) as hub:
        try:
            alice, remotes = await _setup_room(env, hub, k)

            env.link.reset()
            body = f"hello {uuid.uuid4().hex}"
            alice.send_groupchat(ROOM, body)
            await hub.wait_for(lambda: all(c.groupchat(ROOM, body=body) for c in remotes)
                               and alice.groupchat(ROOM, body=body), 15,
                               f"all {k} raleigh users (and alice) receive the message")
            measured = env.link.snapshot()

            # Barrier: a second message from the room travels the same ordered s2s stream, so
            # once it has arrived everywhere, any extra copy of the first would have too.
            barrier = f"barrier {uuid.uuid4().hex}"
            alice.send_groupchat(ROOM, barrier)
            await hub.wait_for(lambda: all(c.groupchat(ROOM, body=barrier) for c in remotes), 15,
                               "barrier message reaches every raleigh user")
            final = env.link.snapshot()
        except AssertionError as e:
            raise AssertionError(f"{e}\n{hub.dump()}\n{env.link.summary()}") from None
    return body, remotes, measured, final


@pytest.mark.parametrize("master, mirror", PAIRINGS)
def test_groupchat_crosses_link_once_per_remote_occupant(make_mixed_servers, record_property, master, mirror):
    env = make_mixed_servers(master=master, mirror=mirror)
    body, remotes, measured, final = run(_measure_one_message(env, K), timeout=60)

    sent_by_fairfax = [s for s in measured.stanzas if s.sender == FAIRFAX]
    msg_bytes = measured.bytes.get(FAIRFAX, 0)
    stanza_bytes = sum(len(s) for s in sent_by_fairfax)
    print(f"\n[plain MUC baseline {master} master, {mirror} users] K={K}: {len(sent_by_fairfax)} stanzas "
          f"{measured.stanza_counts.get(FAIRFAX)} fairfax->raleigh, {msg_bytes} bytes on the wire "
          f"({stanza_bytes} in stanzas, {msg_bytes / K:.0f} B per copy); "
          f"raleigh->fairfax {measured.bytes.get(RALEIGH, 0)} bytes")
    record_property("pairing", f"{master}-{mirror}")
    record_property("message_stanzas", len(sent_by_fairfax))
    record_property("bytes_fairfax_to_raleigh", msg_bytes)

    assert not final.parse_errors, final.parse_errors
    # Exactly K copies crossed, one per raleigh occupant, and nothing else went either way.
    assert measured.stanza_counts.get(FAIRFAX) == {"message": K}, measured.stanza_counts
    assert RALEIGH not in measured.stanza_counts, measured.stanza_counts
    hello = [s for s in final.stanzas if s.sender == FAIRFAX and s.name == "message" and body in s.raw]
    assert len(hello) == K
    assert sorted(s.to for s in hello) == sorted(f"user{i}@{RALEIGH}/{c.xmpp.boundjid.resource}"
                                                 for i, c in enumerate(remotes, 1))
    assert msg_bytes == stanza_bytes
    for c in remotes:
        assert len(c.groupchat(ROOM, body=body)) == 1, (c.jid, c.groupchat(ROOM, body=body))


# ---------------------------------------------------------------------------------------------
# The ejabberd harness itself: ext_mod install, rpc/api, s2s routing of subdomains, restart
# ---------------------------------------------------------------------------------------------

PROBE_ERL = """
-module(mod_harness_probe).
-behaviour(gen_mod).
-export([start/2, stop/1, reload/3, depends/2, mod_options/1, mod_opt_type/1, mod_doc/0, info/1]).
start(_Host, _Opts) -> ok.
stop(_Host) -> ok.
reload(_Host, _NewOpts, _OldOpts) -> ok.
depends(_Host, _Opts) -> [].
mod_opt_type(greeting) -> econf:binary().
mod_options(_Host) -> [{greeting, <<"hi">>}].
mod_doc() -> #{}.
info(Host) ->
    {ok, Priv} = file:read_file(filename:join(code:priv_dir(?MODULE), "probe.txt")),
    {gen_mod:get_module_opt(Host, ?MODULE, greeting), Priv}.
"""


def _build_probe_module(root):
    """An ext_mod folder (spec, ebin/*.beam, priv/) like the one mod_dmuc is installed from."""
    import shutil
    import subprocess
    if not shutil.which("erlc"):
        pytest.skip("erlc not installed")
    folder = root / "mod_harness_probe"
    (folder / "ebin").mkdir(parents=True)
    (folder / "priv").mkdir()
    (folder / "priv" / "probe.txt").write_text("probe-priv")
    (folder / "mod_harness_probe.spec").write_text('summary: "dmuc harness probe"\n')
    src = root / "mod_harness_probe.erl"
    src.write_text(PROBE_ERL)
    subprocess.run(["erlc", "-o", str(folder / "ebin"), str(src)], check=True, capture_output=True, timeout=60)
    return str(folder)


def test_ejabberd_harness(make_mixed_servers, tmp_path):
    probe = _build_probe_module(tmp_path)
    env = make_mixed_servers(master="ejabberd", mirror="ejabberd",
                             contrib_modules={"mod_harness_probe": probe},
                             master_modules={"mod_harness_probe": {"greeting": "hello"}})
    ff, rl = env.fairfax, env.raleigh

    # The ext_mod folder is on the code path, its options are read, priv/ is found.
    assert ff.rpc(f'mod_harness_probe:info(<<"{FAIRFAX}">>)') == '{<<"hello">>,<<"probe-priv">>}'
    assert rl.rpc(f'gen_mod:is_loaded(<<"{RALEIGH}">>, mod_harness_probe)') == "false"

    # Every peer domain, subdomains included, resolves (SRV, in the node) to the right proxy;
    # anything else is NXDOMAIN.
    def srv(server, domain):
        return server.rpc(f'inet_res:getbyname("_xmpp-server._tcp.{domain}", srv)')
    for d in (RALEIGH, f"conference.{RALEIGH}", f"mirror.{RALEIGH}"):
        assert f'[{{0,0,{env.to_raleigh.port},"127.0.0.1"}}]' in srv(ff, d), d
    for d in (FAIRFAX, CONFERENCE, f"mirror.{FAIRFAX}"):
        assert f'[{{0,0,{env.to_fairfax.port},"127.0.0.1"}}]' in srv(rl, d), d
    assert srv(ff, "elsewhere.localhost") == "{error,nxdomain}"

    ff.register("alice", PASSWORD)
    rl.register("bob", PASSWORD)
    assert ff.api("registered_users", {"host": FAIRFAX}) == ["alice"]

    async def chat(label):
        async with ClientHub(watch=[env.link]) as hub:
            alice = await hub.connect(f"alice@{FAIRFAX}", PASSWORD, ff.c2s_port)
            bob = await hub.connect(f"bob@{RALEIGH}", PASSWORD, rl.c2s_port)
            a2b, b2a = f"{label} a2b {uuid.uuid4().hex}", f"{label} b2a {uuid.uuid4().hex}"
            alice.send_chat(f"bob@{RALEIGH}", a2b)
            bob.send_chat(f"alice@{FAIRFAX}", b2a)
            await hub.wait_for(lambda: bob.messages(type="chat", body=a2b) and alice.messages(type="chat", body=b2a),
                               20, f"{label}: chat both ways")
        return a2b, b2a

    a2b, b2a = run(chat("first"), timeout=40)
    assert env.link.count(sender=FAIRFAX, name="message", where=lambda s: a2b in s.raw) == 1
    assert env.link.count(sender=RALEIGH, name="message", where=lambda s: b2a in s.raw) == 1

    # A restarted node keeps its accounts and federates again.
    rl.restart()
    a2b, b2a = run(chat("after restart"), timeout=40)
    assert env.link.count(sender=FAIRFAX, name="message", where=lambda s: a2b in s.raw) == 1
    assert not [l for l in ff.log_errors() + rl.log_errors() if "eaddrinuse" not in l], \
        ff.log_errors() + rl.log_errors()
