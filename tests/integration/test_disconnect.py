"""A user behind a mirror who disconnects without leaving leaves the room, as a direct user's
server makes them leave (RFC 6121 4.6: the unavailable presence goes to every entity that got a
directed presence). Found by tests/integration/test_attacker.py, whose servers outlive a test:
the mirror took the join, so the host never recorded the directed presence to the room, and the
user stayed an occupant at the master and at the mirror ("a ghost") until an s2s bounce got them
kicked.
"""

import pytest

from clients import ClientHub, run
from servers import CONFERENCE, FAIRFAX, RALEIGH
from test_dmuc_ejabberd import dmuc_pair

ROOM = f"ghosts@{CONFERENCE}"
PASSWORD = "secret"

PAIRINGS = [
    pytest.param("prosody", "prosody", id="P-P"),
    pytest.param("ejabberd", "ejabberd", id="E-E"),
    pytest.param("ejabberd", "prosody", id="Emaster-Pmirror"),
    pytest.param("prosody", "ejabberd", id="Pmaster-Emirror"),
]


@pytest.mark.parametrize("master, mirror", PAIRINGS)
def test_disconnect_leaves_the_room(make_mixed_servers, master, mirror):
    env = dmuc_pair(make_mixed_servers, master, mirror)
    env.fairfax.register("alice", PASSWORD)
    env.raleigh.register_many([("wayne", PASSWORD), ("keith", PASSWORD)])

    async def scenario():
        async with ClientHub(watch=[env.link]) as hub:
            try:
                alice = await hub.connect(f"alice@{FAIRFAX}", PASSWORD, env.fairfax.c2s_port)
                await alice.join(ROOM, "Alice")
                keith = await hub.connect(f"keith@{RALEIGH}", PASSWORD, env.raleigh.c2s_port)
                await keith.join(ROOM, "Keith", timeout=20)
                wayne = await hub.connect(f"wayne@{RALEIGH}", PASSWORD, env.raleigh.c2s_port)
                await wayne.join(ROOM, "Wayne", timeout=20)
                await hub.wait_for(lambda: "Wayne" in alice.occupants(ROOM) and "Wayne" in keith.occupants(ROOM),
                                   10, "everyone sees Wayne")
                # The stream closes, no leave sent: the server says unavailable for him.
                await wayne.disconnect()
                await hub.wait_for(lambda: "Wayne" not in alice.occupants(ROOM), 15, "alice sees Wayne leave")
                await hub.wait_for(lambda: "Wayne" not in keith.occupants(ROOM), 15, "keith sees Wayne leave")
                # He comes back on a new session: one occupant, no bounce from the old one.
                wayne2 = await hub.connect(f"wayne@{RALEIGH}", PASSWORD, env.raleigh.c2s_port)
                await wayne2.join(ROOM, "Wayne", timeout=20)
                alice.send_groupchat(ROOM, "welcome back")
                await hub.wait_for(lambda: wayne2.groupchat(ROOM, "welcome back"), 15, "wayne's new session")
                errors = env.link.stanzas(sender=RALEIGH, where=lambda s: s.type == "error")
                assert not errors, [s.raw for s in errors]
            except AssertionError as e:
                raise AssertionError(f"{e}\n{hub.dump()}") from None

    run(scenario(), timeout=120)
