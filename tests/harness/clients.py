"""XMPP test clients on slixmpp, for use inside one asyncio loop per test.

A `ClientHub` owns the clients of a test. Every stanza a client receives is recorded (raw XML
included) and wakes the hub, so a test waits on *conditions* with a deadline::

    async with ClientHub(watch=[env.link]) as hub:
        alice = await hub.connect("alice@fairfax.localhost", "pw", env.fairfax.c2s_port)
        await alice.join(ROOM, "alice")
        alice.send_groupchat(ROOM, "hello")
        await hub.wait_for(lambda: alice.groupchat(ROOM, body="hello"), 10, "alice sees her echo")

`watch=` lets proxy traffic (another thread) wake the same waits, so one predicate may mix
client state and link counters.

The clients live on the test's loop: inside an async test body never call a blocking wait
(Prosody.wait_for_log, S2SLink.wait_for) — use their *_async variants or hub.wait_for —
or the clients stop sending and receiving for as long as it blocks.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import time
from typing import Any, Callable, Iterable, List, Optional, Sequence

import slixmpp
import slixmpp.plugins.xep_0045.muc as _xep_0045_muc
from slixmpp import JID
from slixmpp.stanza import Presence

# slixmpp 1.8.3 prints every history message's <delay/> from join_muc_wait. We do not use that
# call, but silence it anyway so no test output is polluted.
_xep_0045_muc.print = lambda *a, **k: None

MUC_USER_NS = "http://jabber.org/protocol/muc#user"


class WaitTimeout(AssertionError):
    """A waited-for condition did not hold before the deadline. An AssertionError, so pytest
    reports it as a test failure with the message below."""


@dataclasses.dataclass(frozen=True)
class Received:
    """One stanza as received by a client."""
    kind: str            # message / presence / iq
    type: str            # the raw type attribute ("" when absent: an available presence,
                         # a normal message); not slixmpp's interpreted stanza["type"]
    from_: JID
    to: JID
    raw: str             # serialized XML of the stanza
    stanza: Any          # the slixmpp stanza object (do not mutate)
    time: float          # time.monotonic() on receipt
    seq: int             # order of receipt across the whole hub

    @property
    def body(self) -> str:
        return self.stanza["body"] if self.kind == "message" else ""

    @property
    def id(self) -> str:
        return self.stanza["id"]

    def status_codes(self) -> List[int]:
        """MUC status codes (<x xmlns='...muc#user'><status code=.../>) in this stanza."""
        x = self.stanza.xml.find(f"{{{MUC_USER_NS}}}x")
        if x is None:
            return []
        return [int(s.get("code")) for s in x.findall(f"{{{MUC_USER_NS}}}status") if s.get("code", "").isdigit()]


class Client:
    """One slixmpp client connected over plain c2s (no TLS) with a recorder."""

    def __init__(self, hub: "ClientHub", jid: str, password: str, address):
        self.hub = hub
        self.jid = JID(jid)
        self.address = address
        self.xmpp = slixmpp.ClientXMPP(jid, password)
        self.xmpp.whitespace_keepalive = False   # no stray bytes in byte counts
        self.xmpp.register_plugin("xep_0045")    # MUC stanza interfaces (muc_join, muc #user)
        self.received: List[Received] = []
        self.errors: List[str] = []
        # An 'in' filter sees every stanza before any handler: a complete record.
        self.xmpp.add_filter("in", self._record)
        self.xmpp.add_event_handler("session_start", self._on_session_start)
        self.xmpp.add_event_handler("failed_auth", lambda *_: self._fail("authentication failed"))
        self.xmpp.add_event_handler("connection_failed", lambda e: self._fail(f"connection failed: {e}"))
        self.xmpp.add_event_handler("disconnected", lambda *_: self.hub._wake())
        self._session = asyncio.get_event_loop().create_future()

    def __repr__(self) -> str:
        return f"<Client {self.jid}>"

    # -- recording ------------------------------------------------------------------------

    def _record(self, stanza):
        kind = stanza.name
        if kind in ("message", "presence", "iq"):
            self.received.append(Received(
                kind=kind, type=stanza.xml.get("type", ""), from_=JID(stanza["from"]), to=JID(stanza["to"]),
                raw=str(stanza), stanza=stanza, time=time.monotonic(), seq=next(self.hub._seq),
            ))
            self.hub._wake()
        return stanza

    def _fail(self, why: str) -> None:
        self.errors.append(why)
        if not self._session.done():
            self._session.set_exception(ConnectionError(f"{self.jid}: {why}"))
        self.hub._wake()

    def _on_session_start(self, _event) -> None:
        if not self._session.done():
            self._session.set_result(True)
        self.hub._wake()

    # -- queries over what was received ---------------------------------------------------

    def messages(self, from_: Optional[str] = None, type: Optional[str] = None, body: Optional[str] = None,
                 where: Optional[Callable[[Received], bool]] = None) -> List[Received]:
        """Received messages; `from_` matches a full JID, or a bare JID (any resource)."""
        return [r for r in self.received if r.kind == "message" and _match(r, from_, type, where)
                and (body is None or r.body == body)]

    def groupchat(self, room: str, body: Optional[str] = None) -> List[Received]:
        """Groupchat messages from `room` (with a body; subject-only messages excluded)."""
        return [r for r in self.messages(from_=room, type="groupchat", body=body) if r.body]

    def presences(self, from_: Optional[str] = None, type: Optional[str] = None,
                  where: Optional[Callable[[Received], bool]] = None) -> List[Received]:
        return [r for r in self.received if r.kind == "presence" and _match(r, from_, type, where)]

    def occupants(self, room: str) -> set:
        """Nicks currently present in `room` as seen from this client's received presences."""
        present = {}
        for r in self.presences(from_=room):
            if r.from_.resource:
                # Latest presence wins; only an available one (no type) means "in the room".
                present[r.from_.resource] = r.type == ""
        return {nick for nick, here in present.items() if here}

    # -- actions --------------------------------------------------------------------------

    async def connect(self, timeout: float = 10.0, available: bool = True) -> "Client":
        """Log in. With `available` (what a real client does), send initial presence and wait
        for the server to reflect it: only then are messages to our bare JID delivered to us
        rather than stored offline. It causes no s2s traffic (the test accounts have no
        roster contacts)."""
        # slixmpp 1.8.3: address given -> no SRV lookup; disable_starttls -> plain stream.
        self.xmpp.connect(self.address, use_ssl=False, force_starttls=False, disable_starttls=True)
        try:
            await asyncio.wait_for(asyncio.shield(self._session), timeout)
        except asyncio.TimeoutError:
            self.xmpp.cancel_connection_attempt()
            self.xmpp.abort()
            raise WaitTimeout(f"{self.jid}: no session within {timeout}s (errors: {self.errors})") from None
        self.jid = JID(self.xmpp.boundjid.full)
        if available:
            start = len(self.received)
            self.xmpp.send_presence()
            await self.hub.wait_for(
                lambda: any(r.kind == "presence" and r.from_ == self.jid for r in self.received[start:]),
                timeout, f"{self.jid} initial presence reflected")
        return self

    async def join(self, room: str, nick: str, timeout: float = 10.0, history: Optional[int] = 0,
                   wait_subject: bool = True, extra: Optional[Callable[[Presence], None]] = None) -> Received:
        """Join `room` as `nick`; return our own presence (status 110).

        Waits for the self-presence and, by default, for the subject message that ends the join
        sequence (XEP-0045 7.2.16), so history/subject cannot arrive after the test moves on.
        `extra(presence)` may add children to the join presence before it is sent.
        """
        occupant = f"{room}/{nick}"
        start = len(self.received)
        pres = self.xmpp.make_presence(pto=occupant)
        pres.enable("muc_join")
        if history is not None:
            pres["muc_join"]["history"]["maxstanzas"] = str(history)
        if extra:
            extra(pres)
        pres.send()

        def self_presence():
            for r in self.received[start:]:
                if r.kind == "presence" and r.from_ == JID(occupant):
                    if r.type == "error":
                        raise AssertionError(f"{self.jid}: join {occupant} refused: {r.raw}")
                    if 110 in r.status_codes():
                        return r
            return None

        await self.hub.wait_for(self_presence, timeout, f"{self.jid} self-presence from {occupant}")
        if wait_subject:
            await self.hub.wait_for(
                lambda: any(r.kind == "message" and r.from_.bare == JID(room).bare and r.stanza.xml.find("{jabber:client}subject") is not None
                            for r in self.received[start:]),
                timeout, f"{self.jid} subject from {room}")
        return self_presence()

    def send_groupchat(self, room: str, body: str, id: Optional[str] = None) -> str:
        msg = self.xmpp.make_message(mto=room, mbody=body, mtype="groupchat")
        msg["id"] = id or self.xmpp.new_id()
        msg.send()
        return msg["id"]

    def send_chat(self, to: str, body: str) -> str:
        """A one-to-one chat message (e.g. across s2s between the users' own servers)."""
        msg = self.xmpp.make_message(mto=to, mbody=body, mtype="chat")
        msg["id"] = self.xmpp.new_id()
        msg.send()
        return msg["id"]

    def send_presence(self, room: str, nick: str, show: Optional[str] = None, status: Optional[str] = None) -> None:
        """Change our presence in the room (show/status), as a presence to the occupant JID."""
        self.xmpp.send_presence(pto=f"{room}/{nick}", pshow=show, pstatus=status)

    async def leave(self, room: str, nick: str, timeout: float = 10.0, status: Optional[str] = None) -> None:
        """Leave and wait for our own unavailable presence from the room."""
        occupant = JID(f"{room}/{nick}")
        start = len(self.received)
        self.xmpp.send_presence(pto=str(occupant), ptype="unavailable", pstatus=status)
        await self.hub.wait_for(
            lambda: any(r.kind == "presence" and r.from_ == occupant and r.type == "unavailable"
                        for r in self.received[start:]),
            timeout, f"{self.jid} leaves {occupant}")

    async def disconnect(self, timeout: float = 5.0) -> None:
        if self.xmpp.transport is None:
            return
        try:
            await asyncio.wait_for(self.xmpp.disconnect(wait=min(2.0, timeout)), timeout)
        except (asyncio.TimeoutError, Exception):
            self.xmpp.abort()


def _match(r: Received, from_: Optional[str], type: Optional[str], where) -> bool:
    if from_ is not None:
        f = JID(from_)
        if f.resource:
            if r.from_ != f:
                return False
        elif r.from_.bare != f.bare:
            return False
    if type is not None and r.type != type:
        return False
    return where is None or where(r)


class ClientHub:
    """All clients of one test, in the running asyncio loop, with condition waits.

    :param watch: objects with add_listener/remove_listener (S2SProxy, S2SLink) whose activity
        (in another thread) should also re-evaluate waits.
    """

    def __init__(self, watch: Sequence[Any] = ()):
        self.loop = asyncio.get_event_loop()
        self.clients: List[Client] = []
        self._changed = asyncio.Event()
        self._seq = itertools.count()
        self._watch = list(watch)
        self._threadsafe_wake = lambda: self.loop.call_soon_threadsafe(self._wake)
        for w in self._watch:
            w.add_listener(self._threadsafe_wake)

    def _wake(self) -> None:
        self._changed.set()

    async def __aenter__(self) -> "ClientHub":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    def client(self, jid: str, password: str, port: int, host: str = "127.0.0.1") -> Client:
        c = Client(self, jid, password, (host, port))
        self.clients.append(c)
        return c

    async def connect(self, jid: str, password: str, port: int, timeout: float = 10.0,
                      available: bool = True) -> Client:
        return await self.client(jid, password, port).connect(timeout, available)

    async def connect_many(self, accounts: Iterable[tuple], port: int, timeout: float = 20.0,
                           available: bool = True) -> List[Client]:
        """Connect (jid, password) pairs concurrently."""
        clients = [self.client(j, p, port) for j, p in accounts]
        await asyncio.gather(*(c.connect(timeout, available) for c in clients))
        return clients

    async def wait_for(self, predicate: Callable[[], Any], timeout: float, what: str = "condition") -> Any:
        """Re-evaluate `predicate` whenever any client receives a stanza (or a watched proxy
        moves bytes) until it returns a truthy value, which is returned. Raises WaitTimeout at
        the deadline."""
        deadline = self.loop.time() + timeout
        while True:
            result = predicate()
            if result:
                return result
            remaining = deadline - self.loop.time()
            if remaining <= 0:
                raise WaitTimeout(f"timed out after {timeout}s waiting for: {what}")
            # No await between the check above and clear(): no wake-up can be lost.
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
            except asyncio.TimeoutError:
                pass

    def dump(self, last: int = 20) -> str:
        """What each client received (last `last` stanzas), for failure messages."""
        out = []
        for c in self.clients:
            out.append(f"--- {c.jid}: {len(c.received)} stanzas received, errors={c.errors}")
            out += ["    " + r.raw for r in c.received[-last:]]
        return "\n".join(out)

    async def close(self, timeout: float = 10.0) -> None:
        for w in self._watch:
            w.remove_listener(self._threadsafe_wake)
        if self.clients:
            await asyncio.wait_for(asyncio.gather(*(c.disconnect() for c in self.clients),
                                                  return_exceptions=True), timeout)


def run(coro, timeout: float = 50.0):
    """Run an async test body in a fresh loop with an overall deadline."""
    async def bounded():
        return await asyncio.wait_for(coro, timeout)
    return asyncio.run(bounded())
