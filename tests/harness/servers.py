"""Real Prosody servers on loopback, federating through counting TCP proxies.

Layout of a two-server test (see `two_servers`)::

    fairfax (c2s, s2s)  <--  proxy "to fairfax"  <--  raleigh dials fairfax's domains
    raleigh (c2s, s2s)  <--  proxy "to raleigh"  <--  fairfax dials raleigh's domains

Each server's outgoing s2s connections for the *other* server's domains are redirected (by
mod_test_s2s_route, loaded globally) to the proxy that fronts the other server. With s2s_bidi
disabled, every (from-domain, to-domain) pair has its own outgoing TCP connection, so all
stanzas a server *sends* go forward through the proxy in front of the receiver; only dialback
answers and stream headers travel the reverse way.

Everything is bound to 127.0.0.1, uses ports picked at run time and lives in its own temp
dir, so tests can run in parallel. Only processes started here are ever signalled, by PID.
"""

from __future__ import annotations

import asyncio
import atexit
import dataclasses
import itertools
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import xml.parsers.expat as expat
from contextlib import contextmanager
from typing import Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple

HARNESS_DIR = os.path.dirname(os.path.abspath(__file__))
LOOPBACK = "127.0.0.1"
PROSODY = "/usr/bin/prosody"
PROSODYCTL = "/usr/bin/prosodyctl"

# Top-level stream children that are stanzas (RFC 6120 section 8). Everything else at depth 2
# (db:result, db:verify, stream:features, stream:error) is stream management, not counted.
STANZA_NAMES = ("message", "presence", "iq")


class HarnessError(RuntimeError):
    """A server or proxy could not be brought into the state a test asked for."""


def free_port() -> int:
    """A loopback TCP port that was free a moment ago.

    There is an unavoidable window between closing this socket and the server binding it;
    Prosody.start() detects a lost race (it checks that *its* PID owns the listening socket)
    and retries on fresh ports.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def free_ports(n: int) -> List[int]:
    """`n` distinct loopback TCP ports that were free a moment ago. Each socket stays bound until
    all are picked: free_port() twice in a row can return the same port (the kernel hands a
    just-closed one out again), and a server given one port for two listeners fails to start."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            socks.append(s)
            s.bind((LOOPBACK, 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _lua_str(value: str) -> str:
    """A Lua string literal (double-quoted, escaped)."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _lua_list(values: Iterable[str]) -> str:
    return "{ " + "; ".join(_lua_str(v) for v in values) + " }"


def _listening_ports_of(pid: int) -> set:
    """The loopback/any IPv4 TCP ports on which process `pid` owns a listening socket.

    Reads /proc so that a port grabbed by some other process (a lost race in free_port())
    is not mistaken for our server being up.
    """
    inodes = set()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    except OSError:
        return set()
    ports = set()
    try:
        with open(f"/proc/{pid}/net/tcp") as f:
            next(f)
            for line in f:
                fields = line.split()
                local, state, inode = fields[1], fields[3], fields[9]
                if state == "0A" and inode in inodes:  # 0A = TCP_LISTEN
                    ports.add(int(local.split(":")[1], 16))
    except OSError:
        pass
    return ports


# Every child process we started, so an interpreter exit (e.g. Ctrl-C) still reaps them.
_live_processes: Dict[int, subprocess.Popen] = {}


@atexit.register
def _kill_leftovers() -> None:
    for proc in list(_live_processes.values()):
        if proc.poll() is None:
            proc.kill()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass


# ---------------------------------------------------------------------------------------------
# Prosody
# ---------------------------------------------------------------------------------------------

class Prosody:
    """One Prosody process with its own config, data, log and ports.

    :param domain: the VirtualHost.
    :param extra_blocks: config text appended after the VirtualHost section, e.g.
        ``'Component "conference.fairfax.localhost" "muc"\\n    muc_room_locking = false'``.
        Blocks are appended in order; options after a ``Component`` line belong to it.
    :param plugin_paths: extra folders searched for modules (the harness folder is always
        included, for mod_test_s2s_route).
    :param host_modules: extra modules_enabled for the VirtualHost.
    :param global_modules: extra modules_enabled at global level (loaded on every VirtualHost).
    :param s2s_routes: ``{domain: (ip, port)}`` targets for outgoing s2s. A key ``"*.x"``
        matches every subdomain of x.
    :param global_options: extra Lua lines for the global section.
    :param log_level: the lowest level written to the log file ("debug" by default; a benchmark
        that measures Prosody's CPU uses "info", so that logging does not dominate).
    """

    START_TIMEOUT = 20.0
    STOP_TIMEOUT = 5.0

    def __init__(
        self,
        domain: str,
        extra_blocks: Sequence[str] = (),
        plugin_paths: Sequence[str] = (),
        host_modules: Sequence[str] = (),
        s2s_routes: Optional[Mapping[str, Tuple[str, int]]] = None,
        global_modules: Sequence[str] = (),
        global_options: Sequence[str] = (),
        name: Optional[str] = None,
        log_level: str = "debug",
    ):
        self.domain = domain
        self.log_level = log_level
        self.name = name or domain.split(".")[0]
        self.extra_blocks = list(extra_blocks)
        self.plugin_paths = [HARNESS_DIR] + [os.path.abspath(p) for p in plugin_paths]
        self.host_modules = list(host_modules)
        self.global_modules = list(global_modules)
        self.global_options = list(global_options)
        self.s2s_routes: Dict[str, Tuple[str, int]] = dict(s2s_routes or {})
        self.dir = tempfile.mkdtemp(prefix=f"dmuc-{self.name}-")
        self.data_dir = os.path.join(self.dir, "data")
        os.makedirs(self.data_dir)
        self.config_path = os.path.join(self.dir, "prosody.cfg.lua")
        self.log_path = os.path.join(self.dir, "prosody.log")
        # stdout/stderr of the process: Lua errors before logging starts, Rust panics.
        self.console_path = os.path.join(self.dir, "console.log")
        self.c2s_port, self.s2s_port = free_ports(2)
        self.proc: Optional[subprocess.Popen] = None

    # -- config ---------------------------------------------------------------------------

    def config_text(self) -> str:
        routes = "".join(
            f"    [{_lua_str(d)}] = {_lua_str(f'{ip}:{port}')};\n"
            for d, (ip, port) in sorted(self.s2s_routes.items())
        )
        modules = ["saslauth", "roster", "disco", "ping", "dialback", "test_s2s_route"]
        modules += [m for m in self.global_modules if m not in modules]
        lines = [
            "-- Generated by tests/harness/servers.py; one file per test server.",
            "run_as_root = true",
            "daemonize = false",
            f"pidfile = {_lua_str(os.path.join(self.dir, 'prosody.pid'))}",
            f"data_path = {_lua_str(self.data_dir)}",
            f"plugin_paths = {_lua_list(self.plugin_paths)}",
            # Loopback only, for listening and for outgoing connections.
            f'interfaces = {{ "{LOOPBACK}" }}',
            f'local_interfaces = {{ "{LOOPBACK}" }}',
            f"c2s_ports = {{ {self.c2s_port} }}",
            f"s2s_ports = {{ {self.s2s_port} }}",
            "c2s_direct_tls_ports = {}; s2s_direct_tls_ports = {}",
            "http_ports = {}; https_ports = {}",
            # Plain-text streams: the proxy reads the s2s XML, and there are no certificates.
            "c2s_require_encryption = false",
            "s2s_require_encryption = false",
            "s2s_secure_auth = false",
            "allow_unencrypted_plain_auth = true",
            'authentication = "internal_plain"',
            # dialback is how the servers authenticate each other; test_s2s_route sends
            # each peer domain to its proxy (see mod_test_s2s_route.lua).
            f"modules_enabled = {_lua_list(modules)}",
            # tls: no certificates; s2s_bidi: keep one TCP connection per direction so the
            # proxies see each direction separately; posix: no daemonizing/pidfile/setuid.
            'modules_disabled = { "tls"; "s2s_bidi"; "posix" }',
            "test_s2s_routes = {\n" + routes + "}",
            "log = {",
            f'    {{ levels = {{ min = {_lua_str(self.log_level)} }}, to = "file", filename = {_lua_str(self.log_path)} }};',
            "}",
            *self.global_options,
            "",
            f"VirtualHost {_lua_str(self.domain)}",
        ]
        if self.host_modules:
            lines.append(f"    modules_enabled = {_lua_list(self.host_modules)}")
        for block in self.extra_blocks:
            lines += ["", block.rstrip()]
        return "\n".join(lines) + "\n"

    def write_config(self) -> None:
        with open(self.config_path, "w") as f:
            f.write(self.config_text())

    # -- lifecycle ------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> Optional[int]:
        return self.proc.pid if self.proc else None

    def start(self, timeout: float = START_TIMEOUT, attempts: int = 3) -> None:
        """Start the server and return once it listens on its c2s and s2s ports.

        If the ports were taken between free_port() and Prosody's bind (another test running in
        parallel), pick new ones and try again. Callers that route to `s2s_port` must read it
        after start() (the proxies do, on each connection).
        """
        for attempt in range(attempts):
            try:
                self._start_once(timeout)
                return
            except _PortsTaken:
                self.stop()
                self.c2s_port, self.s2s_port = free_ports(2)
        raise HarnessError(f"{self.name}: could not bind free ports after {attempts} attempts\n" + self.log_tail())

    def _start_once(self, timeout: float) -> None:
        if self.running:
            raise HarnessError(f"{self.name} already running (pid {self.pid})")
        self.write_config()
        # Logs are appended across restarts (offsets from log_offset() stay valid); only what
        # this start logs is checked for a bind failure.
        log_start = self.log_offset()
        console = open(self.console_path, "ab")
        try:
            self.proc = subprocess.Popen(
                [PROSODY, "--config", self.config_path],
                cwd=self.dir,
                stdin=subprocess.DEVNULL,
                stdout=console,
                stderr=subprocess.STDOUT,
                # Own session: a Ctrl-C in pytest's terminal is not delivered to Prosody
                # directly; we stop it ourselves, by PID.
                start_new_session=True,
            )
        finally:
            console.close()
        _live_processes[self.proc.pid] = self.proc
        wanted = {self.c2s_port, self.s2s_port}
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise HarnessError(
                    f"{self.name}: prosody exited with status {self.proc.returncode} during start\n"
                    + self.log_tail()
                )
            if wanted <= _listening_ports_of(self.proc.pid):
                return
            if "Failed to open server port" in self._log_since(log_start):
                raise _PortsTaken()
            if time.monotonic() > deadline:
                raise HarnessError(
                    f"{self.name}: ports {sorted(wanted)} not listening after {timeout}s\n" + self.log_tail()
                )
            time.sleep(0.02)  # polling /proc; the condition, not the sleep, ends the wait

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """SIGTERM our Prosody; SIGKILL it if it has not exited by the deadline."""
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            try:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=timeout)
        _live_processes.pop(proc.pid, None)
        self.proc = None

    def cpu_seconds(self) -> float:
        """CPU time (user + system) the running process has used so far, from /proc/<pid>/stat."""
        if not self.running:
            raise HarnessError(f"{self.name} is not running")
        with open(f"/proc/{self.pid}/stat") as f:
            # The command name (field 2) is in parentheses and may hold spaces: split after it.
            fields = f.read().rsplit(")", 1)[1].split()
        # fields[0] is field 3 (state); utime and stime are fields 14 and 15.
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def cpu_time_ns(self) -> int:
        """CPU time the running process has used so far, in ns, summed over its threads, from
        /proc/<pid>/task/*/schedstat (the scheduler's own accounting: finer than the 10 ms ticks
        of cpu_seconds())."""
        if not self.running:
            raise HarnessError(f"{self.name} is not running")
        total = 0
        for tid in os.listdir(f"/proc/{self.pid}/task"):
            try:
                with open(f"/proc/{self.pid}/task/{tid}/schedstat") as f:
                    total += int(f.read().split()[0])
            except (OSError, ValueError, IndexError):
                pass  # a thread that just ended
        return total

    def restart(self, timeout: float = START_TIMEOUT) -> None:
        self.stop()
        self.start(timeout)

    def cleanup(self, keep: bool = False) -> None:
        """Stop and delete the temp dir (kept if `keep` or DMUC_KEEP_TMP is set, to inspect)."""
        self.stop()
        if not keep and not os.environ.get("DMUC_KEEP_TMP"):
            shutil.rmtree(self.dir, ignore_errors=True)

    # -- accounts -------------------------------------------------------------------------

    def register(self, user: str, password: str, timeout: float = 20.0) -> None:
        """Create an account. Works with the server running or stopped: prosodyctl writes the
        account straight into data_path, where internal_plain reads it at login."""
        self.register_many([(user, password)], timeout)

    def register_many(self, accounts: Iterable[Tuple[str, str]], timeout: float = 30.0) -> None:
        """Create several accounts with concurrent prosodyctl runs (each takes ~0.3 s)."""
        accounts = list(accounts)
        deadline = time.monotonic() + timeout
        # Bounded parallelism: each prosodyctl is a full Lua start-up.
        for chunk_start in range(0, len(accounts), 8):
            procs = []
            for user, password in accounts[chunk_start:chunk_start + 8]:
                procs.append((user, subprocess.Popen(
                    [PROSODYCTL, "--config", self.config_path, "register", user, self.domain, password],
                    cwd=self.dir, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                )))
            for user, proc in procs:
                try:
                    out, _ = proc.communicate(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.communicate()
                    raise HarnessError(f"{self.name}: prosodyctl register {user} timed out")
                if proc.returncode != 0:
                    raise HarnessError(
                        f"{self.name}: prosodyctl register {user}@{self.domain} failed "
                        f"({proc.returncode}): {out.decode(errors='replace')}"
                    )

    # -- logs -----------------------------------------------------------------------------

    def log_text(self) -> str:
        """The whole debug log (plus console output, where Lua/Rust crashes land)."""
        parts = []
        for path in (self.log_path, self.console_path):
            try:
                with open(path, errors="replace") as f:
                    text = f.read()
            except OSError:
                continue
            if text:
                parts.append(text)
        return "\n".join(parts)

    def _log_since(self, offset: int) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(offset)
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def log_offset(self) -> int:
        """Current size of the debug log; pass to wait_for_log(since=...) to match only what is
        logged after this point."""
        try:
            return os.path.getsize(self.log_path)
        except OSError:
            return 0

    def wait_for_log(self, pattern: str, timeout: float = 10.0, since: int = 0) -> "re.Match":
        """Wait until a line matching regex `pattern` appears in the debug log after byte offset
        `since`; return the match. For events only the server sees (an s2s session closing)."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            m = rx.search(self._log_since(since))
            if m:
                return m
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name}: /{pattern}/ not logged within {timeout}s\n" + self.log_tail(60))
            time.sleep(0.02)  # polling a file; the match, not the sleep, ends the wait

    async def wait_for_log_async(self, pattern: str, timeout: float = 10.0, since: int = 0) -> "re.Match":
        """wait_for_log() for async test bodies: blocking the loop would also stop the clients
        (slixmpp writes from the same loop), so the wait runs in a worker thread."""
        return await asyncio.to_thread(self.wait_for_log, pattern, timeout, since)

    def log_tail(self, lines: int = 200) -> str:
        text = self.log_text().splitlines()
        head = f"----- {self.name} ({self.domain}) log, last {min(lines, len(text))} of {len(text)} lines: {self.log_path}"
        return "\n".join([head] + text[-lines:])

    def log_errors(self) -> List[str]:
        """Log lines at level error (and Lua tracebacks), for quick assertions."""
        return [l for l in self.log_text().splitlines() if "\terror\t" in l or "traceback" in l.lower()]

    def __repr__(self) -> str:
        return f"<Prosody {self.domain} c2s={self.c2s_port} s2s={self.s2s_port} pid={self.pid} dir={self.dir}>"


class _PortsTaken(Exception):
    pass


# ---------------------------------------------------------------------------------------------
# Counting proxy
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Stanza:
    """One top-level stanza seen on the wire by a proxy."""
    sender: str        # label of the sending side (a server name/domain)
    receiver: str
    direction: str     # "fwd" (dialler -> target) or "rev" (target -> dialler)
    name: str          # message / presence / iq
    attrs: Mapping[str, str]
    raw: str           # exact bytes as sent, decoded as UTF-8
    time: float        # time.monotonic() when it completed on the wire
    conn: int          # proxy connection number

    @property
    def type(self) -> Optional[str]:
        return self.attrs.get("type")

    @property
    def from_(self) -> Optional[str]:
        return self.attrs.get("from")

    @property
    def to(self) -> Optional[str]:
        return self.attrs.get("to")

    def __len__(self) -> int:
        return len(self.raw.encode())


@dataclasses.dataclass
class ProxySnapshot:
    """Counters of one proxy (or a whole link) at one moment. `bytes`/`stanza_counts` are keyed
    by sender label; `stanzas` lists every stanza in wire order per connection."""
    bytes: Dict[str, int]
    stanza_counts: Dict[str, Dict[str, int]]
    stanzas: List[Stanza]
    connections: int
    parse_errors: List[str]

    def total_bytes(self) -> int:
        return sum(self.bytes.values())

    def count(self, sender: Optional[str] = None, name: Optional[str] = None,
              where: Optional[Callable[[Stanza], bool]] = None) -> int:
        return len(select(self.stanzas, sender=sender, name=name, where=where))


_DMUC_ACK = re.compile(r"<ack\b[^>]*\bxmlns=['\"]urn:xmpp:dmuc:0['\"]")


def is_ack(s: Stanza) -> bool:
    """Is this the master's acknowledgement of a mirror user's message (src/ack.rs)? Attribute
    order is the server's (Prosody's varies)."""
    return s.name == "message" and bool(_DMUC_ACK.search(s.raw))


def select(stanzas: Iterable[Stanza], sender: Optional[str] = None, name: Optional[str] = None,
           where: Optional[Callable[[Stanza], bool]] = None) -> List[Stanza]:
    return [s for s in stanzas
            if (sender is None or s.sender == sender)
            and (name is None or s.name == name)
            and (where is None or where(s))]


class _StreamScanner:
    """Incremental scanner of one direction of one XMPP stream.

    Emits each complete depth-2 element (a child of <stream:stream>) with its exact raw bytes.
    Namespace processing is off, so names keep their prefixes ("db:result", "stream:features")
    and the stanzas are exactly "message", "presence", "iq".
    """

    def __init__(self, on_element: Callable[[str, Dict[str, str], bytes], None]):
        self.on_element = on_element
        self.parser = expat.ParserCreate()
        if hasattr(self.parser, "SetReparseDeferralEnabled"):
            # expat >= 2.6 may hold back events until more input arrives; we want each stanza
            # counted as soon as its last byte passes.
            self.parser.SetReparseDeferralEnabled(False)
        self.parser.StartElementHandler = self._start
        self.parser.EndElementHandler = self._end
        self.buf = bytearray()
        self.base = 0              # absolute stream offset of buf[0]
        self.depth = 0
        self.cur_start = 0         # absolute offset of the current depth-2 element
        self.cur_name = ""
        self.cur_attrs: Dict[str, str] = {}
        self.cur_empty_end: Optional[int] = None  # end offset if the element is <x .../>
        self.error: Optional[str] = None

    def feed(self, data: bytes) -> None:
        if self.error:
            return
        self.buf += data
        try:
            self.parser.Parse(data, False)
        except expat.ExpatError as e:
            self.error = f"{e} near {bytes(self.buf[-200:])!r}"

    def _tag_end(self, pos: int) -> int:
        """Absolute offset just past the '>' closing the tag that starts at `pos`."""
        quote = None
        i = pos - self.base
        buf = self.buf
        while True:
            c = buf[i]
            if quote:
                if c == quote:
                    quote = None
            elif c in (0x22, 0x27):  # " or '
                quote = c
            elif c == 0x3E:  # >
                return self.base + i + 1
            i += 1

    def _start(self, name: str, attrs: Dict[str, str]) -> None:
        self.depth += 1
        if self.depth == 2:
            # Expat fires this only once the whole start tag is buffered.
            pos = self.parser.CurrentByteIndex
            end = self._tag_end(pos)
            self.cur_start, self.cur_name, self.cur_attrs = pos, name, attrs
            self.cur_empty_end = end if self.buf[end - 2 - self.base] == 0x2F else None  # "/>"
            # Bytes before this element (stream header, whitespace keepalives) are not needed.
            del self.buf[: pos - self.base]
            self.base = pos

    def _end(self, name: str) -> None:
        if self.depth == 2:
            if self.cur_empty_end is not None:
                end = self.cur_empty_end
            else:
                pos = self.parser.CurrentByteIndex  # at "</name>", fully buffered
                end = self.buf.index(b">", pos - self.base) + 1 + self.base
            raw = bytes(self.buf[self.cur_start - self.base: end - self.base])
            del self.buf[: end - self.base]
            self.base = end
            self.on_element(self.cur_name, self.cur_attrs, raw)
        self.depth -= 1


class LinkShaper:
    """An emulated constrained link: a one-way delay and a byte rate, per sending side.

    Shared by the proxies of one link (``S2SLink.shape()``), so that every TCP connection a
    server opens towards its peer competes for the same bandwidth, as on one radio or satellite
    channel. Each sending side is a serializer: a chunk starts when the previous one has been
    sent, takes ``len * 8 / rate`` seconds, and arrives ``delay`` seconds after that. Nothing is
    dropped: what the link cannot carry yet waits in the proxy (an unbounded queue), and
    `queue_delay()` tells how long the link is busy with what it already accepted.

    Only payload bytes are paced (TCP/IP headers are not emulated). Thread-safe: each proxy
    calls `schedule()` from its own loop.
    """

    def __init__(self, delay: float = 0.0, rate: Optional[float] = None, segment: int = 512):
        self._lock = threading.Lock()
        self.delay = 0.0
        self.rate: Optional[float] = None
        self.segment = segment
        self._busy_until: Dict[str, float] = {}
        self.configure(delay, rate)

    def configure(self, delay: float = 0.0, rate: Optional[float] = None) -> None:
        """`delay`: one-way seconds added to every byte; `rate`: bits per second per direction
        (None: unlimited). Chunks already scheduled keep their times."""
        if delay < 0 or (rate is not None and rate <= 0):
            raise ValueError(f"bad link shape: delay={delay} rate={rate}")
        with self._lock:
            self.delay = float(delay)
            self.rate = None if rate is None else float(rate)

    def pieces(self, data: bytes) -> List[bytes]:
        """`data` cut into segments when rate-limited, so a big read trickles out as on a wire."""
        if self.rate is None or len(data) <= self.segment:
            return [data]
        return [data[i:i + self.segment] for i in range(0, len(data), self.segment)]

    def schedule(self, sender: str, nbytes: int) -> float:
        """Accept `nbytes` from `sender` now; return the time.monotonic() at which they arrive."""
        with self._lock:
            now = time.monotonic()
            finish = now
            if self.rate is not None:
                finish = max(now, self._busy_until.get(sender, 0.0)) + nbytes * 8.0 / self.rate
                self._busy_until[sender] = finish
            return finish + self.delay

    def queue_delay(self, sender: Optional[str] = None) -> float:
        """Seconds until the link has finished sending what `sender` (None: any side) handed it
        so far: 0 when it is idle. The backlog in bytes is this times rate / 8."""
        with self._lock:
            now = time.monotonic()
            ends = [self._busy_until.get(sender, 0.0)] if sender else list(self._busy_until.values())
            return max([0.0] + [e - now for e in ends])

    def backlog_bytes(self, sender: Optional[str] = None) -> float:
        return 0.0 if self.rate is None else self.queue_delay(sender) * self.rate / 8.0

    def __repr__(self) -> str:
        return f"<LinkShaper delay={self.delay}s rate={self.rate}bit/s>"


class S2SProxy:
    """A counting TCP proxy for one s2s target, running its own asyncio loop in a thread.

    It listens on a loopback port (`port`, known at construction) and forwards each connection
    to `target` — an (ip, port) tuple or a callable returning one, read at every new connection
    (so a server restarted on new ports is followed). Each byte is accounted *before* it is
    forwarded, so once a client has received a stanza the proxy has already counted it.

    Labels: `dialler` is the side that connects to the proxy, `target_label` the side behind it.
    Bytes and stanzas are keyed by the *sending* side's label.

    With a `shaper` (a LinkShaper, see S2SLink.shape()), forwarded bytes are delayed and paced
    as on a constrained link; they are still counted when they enter the proxy.
    """

    def __init__(self, target, dialler: str = "dialler", target_label: str = "target",
                 name: Optional[str] = None):
        self._target = target
        self.dialler = dialler
        self.target_label = target_label
        self.name = name or f"{dialler}->{target_label}"
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._listeners: List[Callable[[], None]] = []
        self._conn_ids = itertools.count(1)
        self._conns: Dict[int, Tuple[asyncio.StreamWriter, ...]] = {}  # conn -> its sockets
        self._mode = "open"  # open | reset | blackhole | stall (see cut())
        self._flowing: Optional[asyncio.Event] = None  # set unless stalled; lives on our loop
        # Emulated link (None: forward at once). Once a connection direction has been shaped it
        # keeps its delivery queue, so turning the shaper off never reorders bytes.
        self.shaper: Optional[LinkShaper] = None
        self._reset_counters_locked()
        # Bind now so the port is known (and reserved) before any server config is written.
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((LOOPBACK, 0))
        self._sock.listen(64)
        self.port = self._sock.getsockname()[1]
        self._loop = asyncio.new_event_loop()
        self._server: Optional[asyncio.AbstractServer] = None
        self._thread = threading.Thread(target=self._run, name=f"S2SProxy {self.name}", daemon=True)
        self._thread.start()
        self._call(self._serve(), timeout=5.0)

    @property
    def address(self) -> Tuple[str, int]:
        return (LOOPBACK, self.port)

    @property
    def target(self) -> Tuple[str, int]:
        return self._target() if callable(self._target) else self._target

    # -- loop plumbing --------------------------------------------------------------------

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_forever()

    def _call(self, coro, timeout: float = 5.0):
        """Run a coroutine on the proxy's loop from another thread, with a deadline."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    async def _serve(self) -> None:
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._server = await asyncio.start_server(self._handle, sock=self._sock)

    def _abort_all(self) -> None:
        for writers in list(self._conns.values()):
            for w in writers:
                w.transport.abort()
        self._conns.clear()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._mode == "reset":
            writer.transport.abort()
            return
        conn = next(self._conn_ids)
        with self._lock:
            self._connections += 1
        if self._mode == "blackhole":
            # Accept, never connect upstream, swallow everything: a silent partition.
            self._conns[conn] = (writer,)
            await self._pump(conn, reader, None, "fwd")
            return
        try:
            up_reader, up_writer = await asyncio.wait_for(asyncio.open_connection(*self.target), 5.0)
        except (OSError, asyncio.TimeoutError):
            writer.transport.abort()
            return
        if self._mode == "reset":  # cut while we were connecting upstream
            writer.transport.abort()
            up_writer.transport.abort()
            return
        self._conns[conn] = (writer, up_writer)
        await asyncio.gather(
            self._pump(conn, reader, up_writer, "fwd"),
            self._pump(conn, up_reader, writer, "rev"),
        )

    async def _pump(self, conn: int, reader: asyncio.StreamReader, writer: Optional[asyncio.StreamWriter],
                    direction: str) -> None:
        sender, receiver = (self.dialler, self.target_label) if direction == "fwd" else (self.target_label, self.dialler)
        scanner = _StreamScanner(lambda name, attrs, raw: self._on_element(conn, direction, sender, receiver, name, attrs, raw))
        shaped: Optional[asyncio.Queue] = None      # delivery queue once this direction is shaped
        deliverer: Optional[asyncio.Task] = None
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                if self._mode == "stall":
                    # Hold this chunk (and, by not reading, everything after it: TCP
                    # back-pressure) until restore() or a harder cut().
                    await self._flowing.wait()
                if self._mode == "blackhole" or writer is None:
                    continue  # dropped, not counted
                if writer.is_closing():
                    break
                with self._lock:
                    self._bytes[sender] = self._bytes.get(sender, 0) + len(data)
                    had_error = scanner.error
                    scanner.feed(data)
                    if scanner.error and not had_error:
                        # Bytes are still counted; stanzas on this stream no longer are.
                        self._parse_errors.append(f"conn {conn} {direction}: {scanner.error}")
                    self._cond.notify_all()
                self._notify()
                shaper = self.shaper
                if shaper is None and shaped is None:
                    writer.write(data)
                    await writer.drain()
                    continue
                if shaped is None:
                    shaped = asyncio.Queue()
                    deliverer = asyncio.ensure_future(self._deliver(shaped, writer))
                if shaper is None:
                    shaped.put_nowait((time.monotonic(), data))
                else:
                    for piece in shaper.pieces(data):
                        shaped.put_nowait((shaper.schedule(sender, len(piece)), piece))
        except (ConnectionError, OSError):
            pass
        finally:
            if deliverer is not None:
                # Deliver what the emulated link still holds (in order, on time), then close.
                shaped.put_nowait(None)
                try:
                    await deliverer
                except (ConnectionError, OSError, asyncio.CancelledError):
                    pass
            # Either side closing ends the whole proxied connection.
            writers = self._conns.pop(conn, None)
            for w in writers or ():
                w.transport.abort()

    async def _deliver(self, queue: asyncio.Queue, writer: asyncio.StreamWriter) -> None:
        """Write each queued chunk at its arrival time (LinkShaper.schedule)."""
        while True:
            item = await queue.get()
            if item is None:
                return
            due, data = item
            if writer.is_closing():
                return
            wait = due - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)  # the emulated link's delay and pacing
            if writer.is_closing():
                return
            writer.write(data)
            await writer.drain()

    def queue_delay(self, sender: Optional[str] = None) -> float:
        """See LinkShaper.queue_delay (0 when unshaped)."""
        shaper = self.shaper
        return shaper.queue_delay(sender) if shaper else 0.0

    def _on_element(self, conn: int, direction: str, sender: str, receiver: str,
                    name: str, attrs: Dict[str, str], raw: bytes) -> None:
        # Called from scanner.feed(), i.e. with self._lock held.
        if name not in STANZA_NAMES:
            return  # db:result, db:verify, stream:features, stream:error ...
        counts = self._counts.setdefault(sender, {})
        counts[name] = counts.get(name, 0) + 1
        self._stanzas.append(Stanza(sender, receiver, direction, name, dict(attrs),
                                    raw.decode("utf-8", errors="replace"), time.monotonic(), conn))

    def _notify(self) -> None:
        for fn in list(self._listeners):
            try:
                fn()
            except Exception:
                pass

    # -- counters -------------------------------------------------------------------------

    def _reset_counters_locked(self) -> None:
        self._bytes: Dict[str, int] = {}
        self._counts: Dict[str, Dict[str, int]] = {}
        self._stanzas: List[Stanza] = []
        self._connections = 0
        self._parse_errors: List[str] = []

    def reset(self) -> None:
        """Zero all counters and forget recorded stanzas (connections stay up)."""
        with self._lock:
            self._reset_counters_locked()

    def snapshot(self) -> ProxySnapshot:
        with self._lock:
            return ProxySnapshot(
                bytes=dict(self._bytes),
                stanza_counts={k: dict(v) for k, v in self._counts.items()},
                stanzas=list(self._stanzas),
                connections=self._connections,
                parse_errors=list(self._parse_errors),
            )

    def add_listener(self, fn: Callable[[], None]) -> None:
        """`fn()` is called (from the proxy thread) after any traffic; must not block."""
        self._listeners.append(fn)

    def remove_listener(self, fn: Callable[[], None]) -> None:
        if fn in self._listeners:
            self._listeners.remove(fn)

    def wait_for(self, predicate: Callable[[ProxySnapshot], bool], timeout: float, what: str = "condition") -> ProxySnapshot:
        """Block until predicate(snapshot) is true; raise TimeoutError after `timeout` s."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                snap = ProxySnapshot(dict(self._bytes), {k: dict(v) for k, v in self._counts.items()},
                                     list(self._stanzas), self._connections, list(self._parse_errors))
                if predicate(snap):
                    return snap
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"proxy {self.name}: {what} not reached in {timeout}s; "
                                       f"bytes={snap.bytes} stanzas={snap.stanza_counts}")
                self._cond.wait(remaining)

    # -- link control ---------------------------------------------------------------------

    def cut(self, mode: str = "reset") -> None:
        """Break the link (all current and future connections through this proxy).

        mode="reset": abort every proxied connection now and refuse (accept-and-abort) new
            ones: both servers see the connection die at once, like a peer restart.
        mode="blackhole": connections stay open but every byte is silently dropped, and new
            connections are accepted and never answered: a silent partition that only
            timeouts detect. The data is lost for good (see restore()).
        mode="stall": connections stay open and nothing is lost, but nothing is forwarded
            (reads stop, so TCP back-pressure builds up): a partition shorter than TCP's
            retransmission limits. restore() delivers everything held, in order.
        """
        if mode not in ("reset", "blackhole", "stall"):
            raise ValueError(mode)

        async def do():
            self._mode = mode
            if mode == "stall":
                self._flowing.clear()
            else:
                # Pumps held by a stall wake up and see the new mode (drop / closed).
                self._flowing.set()
            if mode == "reset":
                self._abort_all()
        self._call(do())

    def restore(self) -> None:
        """Heal the link.

        After "stall", held data flows on. After "blackhole", every connection that lived
        through it is aborted (the bytes it lost would corrupt the XML streams); the servers
        notice asynchronously, so a stanza sent right after restore() may still be written into
        the dead connection and lost, as on a real network. Wait for the server to notice
        (e.g. Prosody.wait_for_log(r"s2s disconnected")) when a test needs a clean state.
        """

        async def do():
            if self._mode == "blackhole":
                self._abort_all()
            self._mode = "open"
            self._flowing.set()
        self._call(do())

    @property
    def mode(self) -> str:
        return self._mode

    def close(self) -> None:
        if not self._loop.is_running():
            return

        async def do():
            if self._server:
                self._server.close()
            self._flowing.set()
            self._abort_all()
        try:
            self._call(do())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5.0)
            if not self._thread.is_alive():
                self._loop.close()
            self._sock.close()

    def __repr__(self) -> str:
        return f"<S2SProxy {self.name} :{self.port} -> {self.target} mode={self._mode}>"


class S2SLink:
    """The two proxies between two servers, viewed as one link.

    Keys are the servers' domains: `bytes("fairfax.localhost")` is everything fairfax sent to
    raleigh (on whichever TCP connection), `stanzas(sender="fairfax.localhost",
    name="message")` every message stanza it sent.
    """

    def __init__(self, proxies: Sequence[S2SProxy]):
        self.proxies = list(proxies)
        self.shaper: Optional[LinkShaper] = None
        self._lock = threading.Condition()
        for p in self.proxies:
            p.add_listener(self._wake)

    def _wake(self) -> None:
        with self._lock:
            self._lock.notify_all()

    def add_listener(self, fn: Callable[[], None]) -> None:
        for p in self.proxies:
            p.add_listener(fn)

    def remove_listener(self, fn: Callable[[], None]) -> None:
        for p in self.proxies:
            p.remove_listener(fn)

    def snapshot(self) -> ProxySnapshot:
        snaps = [p.snapshot() for p in self.proxies]
        total_bytes: Dict[str, int] = {}
        counts: Dict[str, Dict[str, int]] = {}
        for s in snaps:
            for k, v in s.bytes.items():
                total_bytes[k] = total_bytes.get(k, 0) + v
            for k, d in s.stanza_counts.items():
                c = counts.setdefault(k, {})
                for n, v in d.items():
                    c[n] = c.get(n, 0) + v
        stanzas = sorted((st for s in snaps for st in s.stanzas), key=lambda st: st.time)
        return ProxySnapshot(total_bytes, counts, stanzas,
                             sum(s.connections for s in snaps), [e for s in snaps for e in s.parse_errors])

    def reset(self) -> None:
        for p in self.proxies:
            p.reset()

    def stanzas(self, sender: Optional[str] = None, name: Optional[str] = None,
                where: Optional[Callable[[Stanza], bool]] = None) -> List[Stanza]:
        return select(self.snapshot().stanzas, sender=sender, name=name, where=where)

    def count(self, sender: Optional[str] = None, name: Optional[str] = None,
              where: Optional[Callable[[Stanza], bool]] = None) -> int:
        return len(self.stanzas(sender, name, where))

    def bytes(self, sender: Optional[str] = None) -> int:
        b = self.snapshot().bytes
        return sum(b.values()) if sender is None else b.get(sender, 0)

    def wait_for(self, predicate: Callable[[ProxySnapshot], bool], timeout: float, what: str = "condition") -> ProxySnapshot:
        deadline = time.monotonic() + timeout
        with self._lock:
            while True:
                snap = self.snapshot()
                if predicate(snap):
                    return snap
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"s2s link: {what} not reached in {timeout}s; "
                                       f"bytes={snap.bytes} stanzas={snap.stanza_counts}")
                self._lock.wait(remaining)

    async def wait_for_async(self, predicate: Callable[[ProxySnapshot], bool], timeout: float,
                             what: str = "condition") -> ProxySnapshot:
        """wait_for() for async test bodies (runs in a worker thread; the loop keeps going).
        Alternatively pass the link to ClientHub(watch=[link]) and use hub.wait_for()."""
        return await asyncio.to_thread(self.wait_for, predicate, timeout, what)

    def cut(self, mode: str = "reset") -> None:
        for p in self.proxies:
            p.cut(mode)

    def restore(self) -> None:
        for p in self.proxies:
            p.restore()

    def shape(self, delay: float = 0.0, rate: Optional[float] = None) -> LinkShaper:
        """Emulate a constrained link on all these proxies, as one channel: `delay` seconds one
        way (a 600 ms round trip is delay=0.3) and `rate` bits/s per direction (None: unlimited).
        Takes effect for the next bytes; call again to change it, `unshape()` to remove it."""
        if self.shaper is None:
            self.shaper = LinkShaper(delay, rate)
        else:
            self.shaper.configure(delay, rate)
        for p in self.proxies:
            p.shaper = self.shaper
        return self.shaper

    def unshape(self) -> None:
        """Forward at once again (bytes already held still arrive on time, in order)."""
        for p in self.proxies:
            p.shaper = None
        self.shaper = None

    def queue_delay(self, sender: Optional[str] = None) -> float:
        """Seconds the emulated link is still busy with what `sender` (None: either side) sent."""
        return self.shaper.queue_delay(sender) if self.shaper else 0.0

    def summary(self) -> str:
        snap = self.snapshot()
        lines = [f"s2s link: connections={snap.connections} bytes={snap.bytes} stanzas={snap.stanza_counts}"]
        lines += [f"  parse error: {e}" for e in snap.parse_errors]
        for p in self.proxies:
            lines.append(f"  {p!r}")
        return "\n".join(lines)

    def close(self) -> None:
        for p in self.proxies:
            p.close()


# ---------------------------------------------------------------------------------------------
# Two federated servers
# ---------------------------------------------------------------------------------------------

FAIRFAX = "fairfax.localhost"
RALEIGH = "raleigh.localhost"
CONFERENCE = "conference." + FAIRFAX


@dataclasses.dataclass
class TwoServers:
    fairfax: Prosody
    raleigh: Prosody
    to_fairfax: S2SProxy   # raleigh -> fairfax connections (and their reverse streams)
    to_raleigh: S2SProxy   # fairfax -> raleigh connections
    link: S2SLink
    keep: bool = False     # keep temp dirs on close (set by the pytest hook when a test failed)

    @property
    def servers(self) -> List[Prosody]:
        return [self.fairfax, self.raleigh]

    def logs(self, lines: int = 200) -> str:
        return "\n\n".join([s.log_tail(lines) for s in self.servers] + [self.link.summary()])

    def close(self) -> None:
        errors = []
        for fn in (lambda: self.fairfax.cleanup(self.keep), lambda: self.raleigh.cleanup(self.keep),
                   self.link.close):
            try:
                fn()
            except Exception as e:  # keep tearing down the rest
                errors.append(e)
        if errors:
            raise errors[0]


def _component_domains(blocks: Iterable[str]) -> List[str]:
    return re.findall(r'^\s*Component\s+"([^"]+)"', "\n".join(blocks), flags=re.M)


@contextmanager
def two_servers(
    conference_options: Sequence[str] = (),
    fairfax_blocks: Sequence[str] = (),
    raleigh_blocks: Sequence[str] = (),
    plugin_paths: Sequence[str] = (),
    fairfax_modules: Sequence[str] = (),
    raleigh_modules: Sequence[str] = (),
    global_modules: Sequence[str] = (),
    global_options: Sequence[str] = (),
    conference: bool = True,
) -> Iterator[TwoServers]:
    """Start fairfax.localhost (master: conference.fairfax.localhost, a plain MUC) and
    raleigh.localhost, federated through two counting proxies; stop everything on exit.

    :param conference_options: Lua lines added under ``Component "conference.fairfax.localhost"
        "muc"`` (after ``muc_room_locking = false``), e.g. ``['modules_enabled = { "dmuc" }']``.
    :param fairfax_blocks / raleigh_blocks: extra config blocks appended to that server's config,
        e.g. ``['Component "mirror.raleigh.localhost" "dmuc"']``.
    :param plugin_paths: module folders for both servers (e.g. the folder with mod_dmuc.lua).
    :param fairfax_modules / raleigh_modules: extra modules_enabled on the VirtualHost.
    :param global_modules / global_options: extra global modules / Lua lines, both servers.
    :param conference: set False to omit the conference component on fairfax.

    Each server routes the other's domain and every subdomain of it ("*.raleigh.localhost"
    covers conference./mirror./anything) to the proxy in front of the other server.
    """
    conf_block = []
    if conference:
        conf_block = [
            "\n".join([f'Component "{CONFERENCE}" "muc"', "    muc_room_locking = false"]
                      + ["    " + line for line in conference_options])
        ]
    fairfax = Prosody(FAIRFAX, extra_blocks=conf_block + list(fairfax_blocks), plugin_paths=plugin_paths,
                      host_modules=fairfax_modules, global_modules=global_modules, global_options=global_options)
    raleigh = Prosody(RALEIGH, extra_blocks=list(raleigh_blocks), plugin_paths=plugin_paths,
                      host_modules=raleigh_modules, global_modules=global_modules, global_options=global_options)
    # Targets are callables: a server that had to retry its bind is followed.
    to_fairfax = S2SProxy(lambda: (LOOPBACK, fairfax.s2s_port), dialler=RALEIGH, target_label=FAIRFAX,
                          name="to-fairfax")
    to_raleigh = S2SProxy(lambda: (LOOPBACK, raleigh.s2s_port), dialler=FAIRFAX, target_label=RALEIGH,
                          name="to-raleigh")
    env = TwoServers(fairfax, raleigh, to_fairfax, to_raleigh, S2SLink([to_fairfax, to_raleigh]))

    def routes(domain: str, extra_domains: Iterable[str], proxy: S2SProxy) -> Dict[str, Tuple[str, int]]:
        r = {domain: proxy.address, "*." + domain: proxy.address}
        for d in extra_domains:  # components outside the peer's domain tree, listed explicitly
            r[d] = proxy.address
        return r

    fairfax.s2s_routes.update(routes(RALEIGH, _component_domains(raleigh_blocks), to_raleigh))
    raleigh.s2s_routes.update(routes(FAIRFAX, _component_domains(conf_block + list(fairfax_blocks)), to_fairfax))
    try:
        fairfax.start()
        raleigh.start()
        yield env
    finally:
        env.close()


# ---------------------------------------------------------------------------------------------
# N federated servers
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class ServerSpec:
    """One server of a `federation()`: its VirtualHost, config blocks (components) and modules."""
    domain: str
    blocks: Sequence[str] = ()          # e.g. 'Component "mirror.x" "dmuc"\n    dmuc_masters = {...}'
    host_modules: Sequence[str] = ()    # modules_enabled on the VirtualHost


@dataclasses.dataclass
class Federation:
    """Servers federating through a mesh of counting proxies: for every ordered pair (a, b), a
    proxy in front of b that a dials, so each pair of servers has its own `S2SLink`."""
    servers: List[Prosody]
    proxies: Dict[Tuple[str, str], S2SProxy]   # (dialling domain, target domain) -> proxy
    link: S2SLink                              # every proxy: all s2s traffic, keyed by sender
    keep: bool = False
    _pairs: Dict[Tuple[str, str], S2SLink] = dataclasses.field(default_factory=dict)

    def server(self, domain: str) -> Prosody:
        for s in self.servers:
            if s.domain == domain:
                return s
        raise KeyError(domain)

    def link_between(self, a: str, b: str) -> S2SLink:
        """The link between servers `a` and `b` (both directions); the same object every time,
        so a shape() set on it stays."""
        key = tuple(sorted((a, b)))
        if key not in self._pairs:
            self._pairs[key] = S2SLink([self.proxies[(a, b)], self.proxies[(b, a)]])
        return self._pairs[key]

    def logs(self, lines: int = 200) -> str:
        return "\n\n".join([s.log_tail(lines) for s in self.servers] + [self.link.summary()])

    def close(self) -> None:
        errors = []
        for fn in [lambda s=s: s.cleanup(self.keep) for s in self.servers] + [self.link.close]:
            try:
                fn()
            except Exception as e:  # keep tearing down the rest
                errors.append(e)
        if errors:
            raise errors[0]


@contextmanager
def federation(
    specs: Sequence[ServerSpec],
    plugin_paths: Sequence[str] = (),
    global_modules: Sequence[str] = (),
    global_options: Sequence[str] = (),
    log_level: str = "debug",
) -> Iterator[Federation]:
    """Start one Prosody per spec, every pair federated through its own two counting proxies;
    stop everything on exit. `two_servers()` is the two-server case with fixed names.

    Each server routes every other server's domain, its subdomains ("*.x") and its components
    outside that tree to the proxy in front of that server.
    """
    domains = [spec.domain for spec in specs]
    if len(set(domains)) != len(domains):
        raise ValueError(f"duplicate domains: {domains}")
    servers = [Prosody(spec.domain, extra_blocks=list(spec.blocks), plugin_paths=plugin_paths,
                       host_modules=spec.host_modules, global_modules=global_modules,
                       global_options=global_options, log_level=log_level) for spec in specs]
    proxies: Dict[Tuple[str, str], S2SProxy] = {}
    for a in servers:
        for b in servers:
            if a is not b:
                proxies[(a.domain, b.domain)] = S2SProxy(lambda b=b: (LOOPBACK, b.s2s_port), dialler=a.domain,
                                                         target_label=b.domain, name=f"{a.name}-to-{b.name}")
    env = Federation(servers, proxies, S2SLink(list(proxies.values())))
    try:
        for a in servers:
            for b in servers:
                if a is not b:
                    address = proxies[(a.domain, b.domain)].address
                    a.s2s_routes[b.domain] = address
                    a.s2s_routes["*." + b.domain] = address
                    for d in _component_domains(b.extra_blocks):
                        a.s2s_routes.setdefault(d, address)
        # Start them side by side: each start is mostly waiting for Lua to load.
        failures: List[BaseException] = []

        def start(server: Prosody) -> None:
            try:
                server.start()
            except BaseException as e:  # reported below, after every start has ended
                failures.append(e)
        threads = [threading.Thread(target=start, args=(s,), name=f"start {s.name}") for s in servers]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if failures:
            raise failures[0]
        yield env
    finally:
        env.close()
