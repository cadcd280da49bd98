"""Real ejabberd 23.01 servers on loopback, alone or paired with Prosody, for the same tests.

``Ejabberd`` has the public surface of ``servers.Prosody`` that tests use (``domain``, ``name``,
``dir``, ``c2s_port``, ``s2s_port``, ``start()``, ``stop()``, ``restart()``, ``cleanup(keep)``,
``running``, ``pid``, ``register()``, ``register_many()``, ``log_text()``, ``log_tail()``,
``log_offset()``, ``log_errors()``, ``wait_for_log()``, ``wait_for_log_async()``), plus
``api()`` (mod_http_api commands) and ``rpc()`` (evaluate Erlang in the node).

``mixed_servers(master=..., mirror=...)`` is ``servers.two_servers()`` with either side being
Prosody or ejabberd: fairfax.localhost is the master (conference.fairfax.localhost MUC, anyone
may create rooms, no locking), raleigh.localhost the other side, both federating through the
same counting proxies (``servers.S2SProxy`` / ``servers.S2SLink``).

How ejabberd is run (no ejabberdctl, no epmd, nothing global):

* ``erl -sname dmuc_<name>_<rand>@localhost -erl_epmd_port <dist> -start_epmd false ... -s
  ejabberd`` in its own session (so only its own process group is ever signalled), with
  ``EJABBERD_CONFIG_PATH``, ``EJABBERD_LOG_PATH``, ``CONTRIB_MODULES_PATH=<dir>/ext`` and a Mnesia
  dir inside the server's temp dir.
* Accounts are created through mod_http_api (``POST /api/register``) on a loopback port.

How ejabberd's outgoing s2s reaches the proxies: ejabberd (xmpp_stream_out) first asks
``inet_res`` for ``_xmpp-server._tcp.<domain>`` SRV records, then connects to the SRV target
(resolved with getaddrinfo). Each ``Ejabberd`` runs a tiny DNS responder (UDP, loopback, its own
port) and points the node's resolver at it through a per-node kernel ``inetrc`` file
(``{resolv_conf, ""}``, ``{nameserver, {127,0,0,1}, Port}``), so /etc/resolv.conf and /etc/hosts
are never read or touched. The responder answers SRV for the routed domains (``s2s_routes``;
a key ``"*.x"`` matches every subdomain of x, as for Prosody) with target ``127.0.0.1`` and the
proxy's port, and NXDOMAIN for everything else. Every query is logged to ``<dir>/dns.log``.

Fixture (registered in tests/integration/conftest.py)::

    def test_x(make_mixed_servers):
        env = make_mixed_servers(
            master="ejabberd", mirror="prosody",                   # fairfax / raleigh kinds
            contrib_modules={"mod_dmuc": "dist/ejabberd/mod_dmuc"},   # ext_mod folder(s)
            master_modules={"mod_dmuc": {"trusted_mirrors": ["mirror.raleigh.localhost"]}},
            conference_options={"history_size": 0},               # merged into mod_muc's options
            mirror_blocks=['Component "mirror.raleigh.localhost" "dmuc"'],   # Prosody side
        )
        env.fairfax.register("alice", "pw"); env.raleigh.register_many([...])
        env.fairfax.rpc('mod_muc:count_online_rooms(<<"conference.fairfax.localhost">>)')
        env.fairfax.api("muc_online_rooms", {"service": "global"})
        env.link, env.to_fairfax, env.to_raleigh, env.logs(), env.master_kind ...  # as TwoServers
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import queue
import re
import secrets
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from contextlib import ExitStack, contextmanager
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple

import servers
from servers import (CONFERENCE, FAIRFAX, LOOPBACK, RALEIGH, HarnessError, Prosody, S2SLink, S2SProxy,
                     TwoServers, _listening_ports_of, _live_processes, free_ports)

ERL = "/usr/bin/erl"
# ERL_LIBS makes the ejabberd application and its deps (p1_*, fast_*, ...) loadable.
EJABBERD_LIBDIR = "/usr/lib/x86_64-linux-gnu"
EJABBERD_EBIN = os.path.join(EJABBERD_LIBDIR, "ejabberd-23.01", "ebin")

# Modules every harness ejabberd loads (name -> options); tests add/override/remove (None).
DEFAULT_MODULES: Dict[str, Any] = {
    "mod_disco": {},
    "mod_roster": {},
    "mod_s2s_dialback": {},   # the only s2s authentication here (no TLS, no certificates)
    "mod_http_api": {},       # account creation and admin commands for the harness
}


def _yaml_value(value: Any) -> str:
    """A YAML flow value: strings are taken as YAML text verbatim (e.g.
    '{host: "conference.@HOST@", access_create: all}'), anything else is written as JSON (which is
    YAML)."""
    if isinstance(value, str):
        return value
    return json.dumps(value)


def _merge(base: Mapping[str, Any], extra: Optional[Mapping[str, Any]]) -> Dict[str, Any]:
    out = dict(base)
    for k, v in (extra or {}).items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = v
    return out


def _erl_str(value: str) -> str:
    """An Erlang string literal."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


# ---------------------------------------------------------------------------------------------
# DNS responder: SRV answers that send ejabberd's outgoing s2s to the proxies
# ---------------------------------------------------------------------------------------------

_QTYPE_NAMES = {1: "A", 28: "AAAA", 33: "SRV", 5: "CNAME", 12: "PTR", 15: "MX", 16: "TXT"}


class DNSResponder:
    """A minimal authoritative DNS server on 127.0.0.1 (UDP) for one ejabberd node.

    Answers ``_xmpp-server._tcp.<d>`` / ``_xmpp-client._tcp.<d>`` SRV queries for every routed
    domain ``d`` with ``0 0 <port> 127.0.0.1`` (an IP literal target: ejabberd resolves the target
    with getaddrinfo, which takes it as is). Everything else gets NXDOMAIN, after which
    ejabberd would fall back to ``<d>:outgoing_s2s_port`` via the system resolver.

    `routes` is read at every query, so it may be changed while the node runs.
    """

    def __init__(self, routes: Mapping[str, Tuple[str, int]], log_path: Optional[str] = None):
        self.routes = routes
        self.log_path = log_path
        self.queries: List[Tuple[str, str, Optional[Tuple[str, int]]]] = []
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sock.bind((LOOPBACK, 0))
        self._sock.settimeout(0.2)
        self.port = self._sock.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"DNSResponder :{self.port}", daemon=True)
        self._thread.start()

    def lookup(self, domain: str) -> Optional[Tuple[str, int]]:
        domain = domain.lower().rstrip(".")
        if domain in self.routes:
            return self.routes[domain]
        parts = domain.split(".")
        for i in range(1, len(parts)):
            target = self.routes.get("*." + ".".join(parts[i:]))
            if target:
                return target
        return None

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data, addr = self._sock.recvfrom(4096)
            except socket.timeout:
                continue
            except OSError:
                break
            try:
                reply = self._answer(data)
            except Exception as e:  # a malformed query: ignore it, like a real server
                self._log(f"bad query {data!r}: {e}")
                continue
            if reply:
                try:
                    self._sock.sendto(reply, addr)
                except OSError:
                    pass

    def _log(self, line: str) -> None:
        if self.log_path:
            with open(self.log_path, "a") as f:
                f.write(f"{time.strftime('%H:%M:%S')} {line}\n")

    def _answer(self, data: bytes) -> Optional[bytes]:
        (qid, flags, qdcount, _an, _ns, _ar) = struct.unpack("!HHHHHH", data[:12])
        if flags & 0x8000 or qdcount != 1:
            return None
        labels, i = [], 12
        while data[i]:
            n = data[i]
            labels.append(data[i + 1:i + 1 + n].decode("ascii", errors="replace"))
            i += 1 + n
        i += 1
        qtype, qclass = struct.unpack("!HH", data[i:i + 4])
        question = data[12:i + 4]
        name = ".".join(labels)
        answer = b""
        target = None
        m = re.match(r"_xmpp-(server|client)\._tcp\.(.+)$", name, flags=re.I)
        if qtype == 33 and qclass == 1 and m:
            target = self.lookup(m.group(2))
            if target:
                ip, port = target
                rdata = struct.pack("!HHH", 0, 0, port) + b"".join(
                    bytes([len(p)]) + p.encode() for p in ip.split(".")) + b"\0"
                # name: pointer to the question (offset 12); TTL 60 s.
                answer = struct.pack("!HHHIH", 0xC00C, 33, 1, 60, len(rdata)) + rdata
        self.queries.append((name, _QTYPE_NAMES.get(qtype, str(qtype)), target))
        self._log(f"{_QTYPE_NAMES.get(qtype, qtype)} {name} -> {target or 'NXDOMAIN'}")
        rflags = 0x8400 | (flags & 0x0100)          # response, authoritative, copy RD
        if not answer:
            rflags |= 3                             # NXDOMAIN
        header = struct.pack("!HHHHHH", qid, rflags, 1, 1 if answer else 0, 0, 0)
        return header + question + answer

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2.0)
        self._sock.close()


# ---------------------------------------------------------------------------------------------
# ejabberd
# ---------------------------------------------------------------------------------------------

class Ejabberd:
    """One ejabberd 23.01 node (plain ``erl`` process) with its own config, Mnesia, logs, ports.

    :param domain: the XMPP host (``hosts: [domain]``).
    :param modules: ``modules:`` entries merged over DEFAULT_MODULES: ``{name: options}``, where
        options is a dict/list (written as JSON) or YAML flow text, e.g.
        ``{"mod_muc": '{host: "conference.@HOST@", access_create: all}',
        "mod_dmuc": {"trusted_mirrors": ["mirror.raleigh.localhost"]}}``; ``None`` removes a
        default module.
    :param options: top-level options merged over the defaults (same value rules; ``None``
        removes one), e.g. ``{"s2s_max_retry_delay": 5, "loglevel": "info"}``.
    :param extra_yaml: raw YAML text appended at top level (e.g. ``host_config:`` sections).
        Must not repeat a key that ``options`` or the defaults already set.
    :param extra_hosts: more ``hosts`` besides `domain`.
    :param s2s_routes: ``{domain: (ip, port)}`` targets for outgoing s2s; ``"*.x"`` matches every
        subdomain of x. May be changed until start() (and even later: read per query; ejabberd
        caches an answer for 60 s).
    :param contrib_modules: ``{name: folder}``: ext_mod folders (``<name>.spec``, ``ebin/``,
        ``priv/``) copied into ``<dir>/ext/<name>`` before each start (copy under a temporary
        name, then rename: a loaded ``.so`` is never overwritten in place).
    :param loglevel: ejabberd's loglevel (debug logs every stanza in and out).
    """

    START_TIMEOUT = 30.0
    STOP_TIMEOUT = 10.0
    _STARTED_RX = re.compile(r"ejabberd \S+ is started in the node")

    def __init__(
        self,
        domain: str,
        modules: Optional[Mapping[str, Any]] = None,
        options: Optional[Mapping[str, Any]] = None,
        extra_yaml: Sequence[str] = (),
        extra_hosts: Sequence[str] = (),
        s2s_routes: Optional[Mapping[str, Tuple[str, int]]] = None,
        contrib_modules: Optional[Mapping[str, str]] = None,
        loglevel: str = "debug",
        name: Optional[str] = None,
    ):
        self.domain = domain
        self.name = name or domain.split(".")[0]
        self.modules = _merge(DEFAULT_MODULES, modules)
        self.options = dict(options or {})
        self.extra_yaml = list(extra_yaml)
        self.extra_hosts = list(extra_hosts)
        self.s2s_routes: Dict[str, Tuple[str, int]] = dict(s2s_routes or {})
        self.contrib_modules = {k: os.path.abspath(v) for k, v in (contrib_modules or {}).items()}
        self.loglevel = loglevel
        self.dir = tempfile.mkdtemp(prefix=f"dmuc-ejabberd-{self.name}-")
        self.config_path = os.path.join(self.dir, "ejabberd.yml")
        self.log_path = os.path.join(self.dir, "ejabberd.log")
        self.error_log_path = os.path.join(self.dir, "error.log")
        self.console_path = os.path.join(self.dir, "console.log")   # erl stdout/stderr
        self.dns_log_path = os.path.join(self.dir, "dns.log")
        self.inetrc_path = os.path.join(self.dir, "inetrc")
        self.ext_dir = os.path.join(self.dir, "ext")
        self.db_dir = os.path.join(self.dir, "db")
        os.makedirs(self.ext_dir)
        # Unique per process and instance: parallel tests never share a node name or cookie.
        self.node = f"dmuc_{re.sub(r'[^A-Za-z0-9_]', '_', self.name)}_{secrets.token_hex(4)}@localhost"
        self.cookie = secrets.token_hex(16)
        self.c2s_port, self.s2s_port, self.api_port, self.dist_port = free_ports(4)
        self.proc: Optional[subprocess.Popen] = None
        self.dns = DNSResponder(self.s2s_routes, self.dns_log_path)
        self._pending_accounts: List[Tuple[str, str]] = []
        self._rpc_proc: Optional[subprocess.Popen] = None
        self._rpc_lock = threading.Lock()

    # -- config ---------------------------------------------------------------------------

    @property
    def hosts(self) -> List[str]:
        """The ``hosts`` this node serves (``options["hosts"]`` if given)."""
        return list(self.options.get("hosts") or [self.domain] + self.extra_hosts)

    def config_text(self) -> str:
        listen = [
            {"port": self.c2s_port, "ip": LOOPBACK, "module": "ejabberd_c2s", "starttls": False,
             "max_stanza_size": 1048576},
            {"port": self.s2s_port, "ip": LOOPBACK, "module": "ejabberd_s2s_in", "max_stanza_size": 1048576},
            {"port": self.api_port, "ip": LOOPBACK, "module": "ejabberd_http",
             "request_handlers": {"/api": "mod_http_api"}},
        ]
        defaults: Dict[str, Any] = {
            "hosts": self.hosts,
            "loglevel": self.loglevel,
            "hide_sensitive_log_data": False,
            "listen": listen,
            "auth_method": "internal",
            "auth_password_format": "plain",
            # Plain-text s2s: the proxies read the XML; dialback authenticates (no certificates).
            "s2s_use_starttls": False,
            # A failed outgoing s2s is retried after uniform(0..this) s (default 300 s).
            "s2s_max_retry_delay": 1,
            "s2s_dns_timeout": 2,
            "s2s_dns_retries": 1,
            "outgoing_s2s_families": ["ipv4"],
            "outgoing_s2s_timeout": 5,
            "acl": {"local": {"user_regexp": ""}, "loopback": {"ip": ["127.0.0.0/8"]}},
            "access_rules": {"local": {"allow": "local"}},
            # The harness drives mod_http_api unauthenticated from loopback.
            "api_permissions": {"dmuc harness": {"from": ["ejabberd_ctl", "mod_http_api"],
                                                 "who": {"ip": "127.0.0.0/8"}, "what": "*"}},
        }
        top = _merge(defaults, self.options)
        lines = ["# Generated by tests/harness/ejabberd.py; one file per test server."]
        for key, value in top.items():
            lines.append(f"{key}: {_yaml_value(value)}")
        lines.append("modules:")
        for mod, opts in self.modules.items():
            lines.append(f"  {mod}: {_yaml_value(opts)}")
        for block in self.extra_yaml:
            lines += ["", block.rstrip()]
        return "\n".join(lines) + "\n"

    def inetrc_text(self) -> str:
        # Never read /etc/resolv.conf (and never re-read it: that would flush the cache and
        # replace our nameserver); every inet_res query goes to our responder.
        return "\n".join([
            '{resolv_conf, ""}.',
            '{hosts_file, ""}.',
            f"{{nameserver, {{127,0,0,1}}, {self.dns.port}}}.",
            "{lookup, [file, native]}.",
            "",
        ])

    def write_config(self) -> None:
        with open(self.config_path, "w") as f:
            f.write(self.config_text())
        with open(self.inetrc_path, "w") as f:
            f.write(self.inetrc_text())

    def install_contrib(self, name: str, src: str) -> str:
        """Copy ext_mod folder `src` to <dir>/ext/<name> (copy under a temporary name, then
        rename; an existing folder is renamed aside first, never overwritten, so a running node's
        mapped .so stays intact). Returns the installed path."""
        dest = os.path.join(self.ext_dir, name)
        tmp = os.path.join(self.ext_dir, f".{name}.new-{secrets.token_hex(4)}")
        shutil.copytree(src, tmp, symlinks=False)
        if os.path.exists(dest):
            os.rename(dest, os.path.join(self.ext_dir, f".{name}.old-{secrets.token_hex(4)}"))
        os.rename(tmp, dest)
        return dest

    # -- lifecycle ------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> Optional[int]:
        return self.proc.pid if self.proc else None

    def _erl_base_args(self, node: str) -> List[str]:
        return [ERL, "-sname", node, "-setcookie", self.cookie,
                "-erl_epmd_port", str(self.dist_port), "-start_epmd", "false",
                "-kernel", "inet_dist_use_interface", "{127,0,0,1}",
                "-noinput"]

    def _env(self) -> Dict[str, str]:
        env = dict(os.environ)
        env.update({
            "ERL_LIBS": EJABBERD_LIBDIR,
            "EJABBERD_CONFIG_PATH": self.config_path,
            "EJABBERD_LOG_PATH": self.log_path,
            "CONTRIB_MODULES_PATH": self.ext_dir,
            "ERL_CRASH_DUMP": os.path.join(self.dir, "erl_crash.dump"),
            "HOME": self.dir,
        })
        env.pop("ERL_FLAGS", None)
        env.pop("ERL_AFLAGS", None)
        env.pop("ERL_ZFLAGS", None)
        return env

    def start(self, timeout: float = START_TIMEOUT, attempts: int = 3) -> None:
        """Start the node; return once it logged "is started" and listens on c2s, s2s and the
        API port. Ports lost to a parallel test are replaced and the start retried."""
        for _ in range(attempts):
            try:
                self._start_once(timeout)
            except _PortsTaken:
                self.stop()
                self.c2s_port, self.s2s_port, self.api_port, self.dist_port = free_ports(4)
                continue
            except BaseException:
                self.stop()   # a half-started node would hold its ports (the logs stay)
                raise
            pending, self._pending_accounts = self._pending_accounts, []
            if pending:
                self.register_many(pending)
            return
        raise HarnessError(f"{self.name}: could not bind free ports after {attempts} attempts\n" + self.log_tail())

    def _start_once(self, timeout: float) -> None:
        if self.running:
            raise HarnessError(f"{self.name} already running (pid {self.pid})")
        for mod, src in self.contrib_modules.items():
            self.install_contrib(mod, src)
        self.write_config()
        log_start = self.log_offset()
        console_start = _size(self.console_path)
        console = open(self.console_path, "ab")
        args = self._erl_base_args(self.node) + [
            "-kernel", "inetrc", _erl_str(self.inetrc_path),
            "-mnesia", "dir", _erl_str(self.db_dir),
            "-ejabberd", "quiet", "true",      # no log copy on stdout (console.log: crashes only)
            # Read by ejabberd_logger when it starts, before ejabberd.yml is loaded (the yml
            # options of the same names do not change the running handler in 23.01): never
            # rotate (log_offset() stays valid), no burst limit (default: 500 events/s, which
            # debug logging exceeds: events would be dropped).
            "-ejabberd", "log_rotate_size", "infinity",
            "-ejabberd", "log_burst_limit_count", "100000000",
            "-s", "ejabberd",
            # Once started: drop nothing under load (the default handler drops events when
            # more than 1000 are queued); block the loggers instead (sync mode).
            "-eval", "try logger:update_handler_config(ejabberd_log, config, "
                     "#{sync_mode_qlen => 500, drop_mode_qlen => 10000000, flush_qlen => 10000001}) "
                     "catch _:_ -> ok end.",
        ]
        try:
            self.proc = subprocess.Popen(args, cwd=self.dir, env=self._env(), stdin=subprocess.DEVNULL,
                                         stdout=console, stderr=subprocess.STDOUT, start_new_session=True)
        finally:
            console.close()
        _live_processes[self.proc.pid] = self.proc
        wanted = {self.c2s_port, self.s2s_port, self.api_port}
        deadline = time.monotonic() + timeout
        while True:
            log = self._log_since(log_start)
            if self.proc.poll() is not None or re.search(r"Failed to start ejabberd application", log):
                if "eaddrinuse" in log or "eaddrinuse" in _read_from(self.console_path, console_start):
                    raise _PortsTaken()
                raise HarnessError(f"{self.name}: ejabberd exited with status {self.proc.returncode} "
                                   f"during start\n" + self.log_tail())
            if "eaddrinuse" in log:
                raise _PortsTaken()
            if wanted <= _listening_ports_of(self.proc.pid) and self._STARTED_RX.search(log):
                return
            if time.monotonic() > deadline:
                raise HarnessError(f"{self.name}: not started (ports {sorted(wanted)}) after {timeout}s\n"
                                   + self.log_tail())
            time.sleep(0.02)  # polling /proc and the log; the condition ends the wait

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """SIGTERM the node (BEAM runs init:stop(): ~1 s); SIGKILL it after `timeout`. Then
        SIGKILL what is left of its own process group (its session: erl_child_setup and the
        port programs it started), while the node is not yet reaped, so that group id cannot
        belong to anyone else."""
        self._stop_rpc_helper()
        proc = self.proc
        if proc is None:
            return
        if proc.returncode is None:
            try:
                proc.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
            if not _wait_exit_noreap(proc, timeout):
                proc.kill()
                _wait_exit_noreap(proc, timeout)
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        try:
            proc.wait(timeout=timeout)
        finally:
            _live_processes.pop(proc.pid, None)
            self.proc = None

    def restart(self, timeout: float = START_TIMEOUT) -> None:
        """Stop and start with the same config and Mnesia (accounts survive)."""
        self.stop()
        self.start(timeout)

    def cleanup(self, keep: bool = False) -> None:
        """Stop, close the DNS responder, delete the temp dir (unless kept / DMUC_KEEP_TMP)."""
        try:
            self.stop()
        finally:
            self.dns.close()
        if not keep and not os.environ.get("DMUC_KEEP_TMP"):
            shutil.rmtree(self.dir, ignore_errors=True)

    # -- admin: mod_http_api and rpc ------------------------------------------------------

    def api(self, command: str, args: Optional[Mapping[str, Any]] = None, timeout: float = 10.0) -> Any:
        """Call an ejabberd command through mod_http_api (``POST /api/<command>``) and return
        the decoded JSON result. Raises HarnessError on a non-2xx answer."""
        req = urllib.request.Request(
            f"http://{LOOPBACK}:{self.api_port}/api/{command}",
            data=json.dumps(dict(args or {})).encode(), method="POST",
            headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                body = resp.read()
        except urllib.error.HTTPError as e:
            raise HarnessError(f"{self.name}: api {command} {dict(args or {})} -> {e.code} "
                               f"{e.read().decode(errors='replace')}") from None
        except OSError as e:
            raise HarnessError(f"{self.name}: api {command}: {e}") from None
        try:
            return json.loads(body) if body else None
        except ValueError:
            return body.decode(errors="replace")

    # A persistent hidden helper node evaluates rpc() expressions: one line per request on its
    # stdin ("<timeout ms> <hex of the UTF-8 expression>"), one "DMUC-RPC <code> <hex>" line per
    # answer on its stdout. Anything else on stdout (io:format inside the evaluated code goes to
    # the caller's group leader, i.e. here) is skipped.
    _RPC_LOOP = (
        "Node = list_to_atom(%s), "
        "Loop = fun L() -> "
        " case io:get_line(\"\") of "
        "  eof -> halt(0); "
        "  {error, _} -> halt(0); "
        "  Line -> "
        "   {Code, Out} = try "
        "     [TmoS, Hex] = string:lexemes(string:trim(Line), \" \"), "
        "     Expr = unicode:characters_to_list(binary:decode_hex(list_to_binary(Hex))), "
        "     {ok, Ts, _} = erl_scan:string(Expr), "
        "     {ok, Es} = erl_parse:parse_exprs(Ts), "
        "     case rpc:call(Node, erl_eval, exprs, [Es, []], list_to_integer(TmoS)) of "
        "      {value, V, _} -> {0, io_lib:format(\"~tp\", [V])}; "
        "      {badrpc, R} -> {2, io_lib:format(\"badrpc ~tp\", [R])} "
        "     end "
        "    catch C:E -> {3, io_lib:format(\"~tp:~tp\", [C, E])} end, "
        "   io:put_chars([\"DMUC-RPC \", integer_to_list(Code), \" \", "
        "                 binary:encode_hex(unicode:characters_to_binary(Out)), \"\\n\"]), "
        "   L() "
        " end "
        "end, "
        "Loop()."
    )

    def _rpc_helper(self) -> subprocess.Popen:
        helper = self._rpc_proc
        if helper is not None and helper.poll() is None:
            return helper
        node = f"dmuc_rpc_{secrets.token_hex(4)}@localhost"
        args = [a for a in self._erl_base_args(node) if a != "-noinput"] + [
            "-noshell", "-hidden", "-dist_listen", "false", "-eval", self._RPC_LOOP % _erl_str(self.node)]
        env = self._env()
        env.pop("ERL_LIBS", None)   # plain OTP is enough; halves the helper's start time
        helper = subprocess.Popen(args, env=env, cwd=self.dir, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, start_new_session=True)
        _live_processes[helper.pid] = helper
        lines: "queue.Queue[Optional[str]]" = queue.Queue()

        def reader():
            for raw in helper.stdout:
                lines.put(raw.decode(errors="replace"))
            lines.put(None)
        threading.Thread(target=reader, name=f"rpc reader {self.name}", daemon=True).start()
        helper.lines = lines  # type: ignore[attr-defined]
        self._rpc_proc = helper
        return helper

    def _stop_rpc_helper(self) -> None:
        helper, self._rpc_proc = self._rpc_proc, None
        if helper is None:
            return
        try:
            if helper.poll() is None:
                try:
                    helper.stdin.close()      # eof: the helper halts
                    helper.wait(timeout=2)
                except (OSError, subprocess.TimeoutExpired):
                    helper.kill()
                    helper.wait(timeout=5)
        finally:
            _live_processes.pop(helper.pid, None)

    def rpc(self, expr: str, timeout: float = 20.0) -> str:
        """Evaluate Erlang expression(s) `expr` inside the node (e.g.
        ``'mod_muc:count_online_rooms(<<"conference.fairfax.localhost">>)'``; the final dot is
        optional; bindings do not persist between calls) and return the value printed with ``~tp``.

        A hidden helper node is started on first use (~0.4 s) and kept until stop(); later calls
        take about a millisecond. Output the code prints goes nowhere. Raises HarnessError on a
        bad expression, an exception inside the node, a timeout or an unreachable node."""
        if not self.running:
            raise HarnessError(f"{self.name}: not running")
        expr = expr.strip()
        if not expr.endswith("."):
            expr += "."
        with self._rpc_lock:
            helper = self._rpc_helper()
            deadline = time.monotonic() + timeout
            try:
                helper.stdin.write(f"{int(timeout * 1000)} {expr.encode().hex()}\n".encode())
                helper.stdin.flush()
            except OSError as e:
                self._stop_rpc_helper()
                raise HarnessError(f"{self.name}: rpc helper gone ({e}): {expr}") from None
            skipped = []
            while True:
                try:
                    line = helper.lines.get(timeout=max(0.0, deadline - time.monotonic()) + 1.0)
                except queue.Empty:
                    line = ""
                if line is None or line == "":
                    # Helper died or no answer in time: answers would no longer match requests.
                    self._stop_rpc_helper()
                    what = "timed out" if line == "" else "helper exited"
                    raise HarnessError(f"{self.name}: rpc {what}: {expr}\n" + "".join(skipped[-20:]))
                if line.startswith("DMUC-RPC "):
                    _, code, hexout = line.split(" ", 2)
                    out = bytes.fromhex(hexout.strip()).decode(errors="replace")
                    if code != "0":
                        raise HarnessError(f"{self.name}: rpc failed ({code}): {expr}\n{out}")
                    return out
                skipped.append(line)

    async def rpc_async(self, expr: str, timeout: float = 20.0) -> str:
        """rpc() for async test bodies (runs in a worker thread)."""
        return await asyncio.to_thread(self.rpc, expr, timeout)

    # -- accounts -------------------------------------------------------------------------

    def register(self, user: str, password: str, timeout: float = 20.0) -> None:
        """Create an account (through mod_http_api). Before start(), it is created at start."""
        self.register_many([(user, password)], timeout)

    def register_many(self, accounts: Iterable[Tuple[str, str]], timeout: float = 30.0) -> None:
        accounts = list(accounts)
        if not self.running:
            self._pending_accounts += accounts
            return
        deadline = time.monotonic() + timeout
        for user, password in accounts:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise HarnessError(f"{self.name}: registering {len(accounts)} accounts timed out")
            self.api("register", {"user": user, "host": self.domain, "password": password},
                     timeout=remaining)

    # -- logs -----------------------------------------------------------------------------

    def log_text(self) -> str:
        """ejabberd.log (everything at `loglevel`), then the console output (crash reports,
        errors before logging started)."""
        parts = []
        for path in (self.log_path, self.console_path):
            text = _read_from(path, 0)
            if text:
                parts.append(text)
        return "\n".join(parts)

    def _log_since(self, offset: int) -> str:
        return _read_from(self.log_path, offset)

    def log_offset(self) -> int:
        return _size(self.log_path)

    def wait_for_log(self, pattern: str, timeout: float = 10.0, since: int = 0) -> "re.Match":
        """Wait until regex `pattern` matches ejabberd.log after byte offset `since`.
        ejabberd's logger writes the file with delayed_write: a line shows up about 0.1 s after
        it was logged. At loglevel debug every stream element in and out is logged as
        ``(tcp|<0.N.0>) Send XML on stream = <<"...">>`` / ``Received XML on stream`` (Erlang ~p
        of a binary: long stanzas are split over several lines, so match short fragments)."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            m = rx.search(self._log_since(since))
            if m:
                return m
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name}: /{pattern}/ not logged within {timeout}s\n" + self.log_tail(60))
            time.sleep(0.02)

    async def wait_for_log_async(self, pattern: str, timeout: float = 10.0, since: int = 0) -> "re.Match":
        return await asyncio.to_thread(self.wait_for_log, pattern, timeout, since)

    def log_tail(self, lines: int = 200) -> str:
        text = self.log_text().splitlines()
        head = (f"----- {self.name} ({self.domain}, ejabberd) log, last {min(lines, len(text))} of "
                f"{len(text)} lines: {self.log_path}")
        dns = _read_from(self.dns_log_path, 0).splitlines()[-20:]
        tail = [head] + text[-lines:]
        if dns:
            tail += [f"----- {self.name} DNS queries (last {len(dns)}): {self.dns_log_path}"] + dns
        return "\n".join(tail)

    def log_errors(self) -> List[str]:
        """Log lines at level error/critical/alert/emergency."""
        return [l for l in self.log_text().splitlines()
                if re.search(r"\[(error|critical|alert|emergency)\]", l) or "CRASH REPORT" in l]

    def __repr__(self) -> str:
        return (f"<Ejabberd {self.domain} c2s={self.c2s_port} s2s={self.s2s_port} api={self.api_port} "
                f"node={self.node} pid={self.pid} dir={self.dir}>")


class _PortsTaken(Exception):
    pass


def _wait_exit_noreap(proc: subprocess.Popen, timeout: float) -> bool:
    """Wait until `proc` has exited, without reaping it (its PID and process group id stay
    reserved). True if it has exited (or was already reaped)."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.returncode is not None:
            return True
        try:
            if os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
                return True
        except ChildProcessError:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)


def _size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


def _read_from(path: str, offset: int) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace")
    except OSError:
        return ""


# ---------------------------------------------------------------------------------------------
# Mixed pairs: either side Prosody or ejabberd
# ---------------------------------------------------------------------------------------------

KINDS = ("prosody", "ejabberd")


@dataclasses.dataclass
class MixedServers(TwoServers):
    """servers.TwoServers whose sides may be Ejabberd objects; `master_kind` / `mirror_kind` say
    which ("prosody" | "ejabberd")."""
    master_kind: str = "prosody"
    mirror_kind: str = "prosody"

    @property
    def master(self):
        return self.fairfax

    @property
    def mirror(self):
        return self.raleigh

    def close(self) -> None:
        """Stop both servers concurrently (an ejabberd node takes ~1 s to shut down), then
        delete their dirs (unless `keep`) and close the proxies."""
        errors: List[BaseException] = []

        def cleanup(server):
            try:
                server.cleanup(self.keep)
            except BaseException as e:
                errors.append(e)
        threads = [threading.Thread(target=cleanup, args=(s,)) for s in self.servers]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        try:
            self.link.close()
        except Exception as e:
            errors.append(e)
        if errors:
            raise errors[0]


def _ejabberd_module_hosts(server: "Ejabberd") -> List[str]:
    """Every domain an Ejabberd serves: its ``hosts`` and each module's ``host``/``hosts``
    option (``@HOST@`` expanded with each host). Used to route domains that are not below the
    peer's own domain (those are covered by the ``"*.domain"`` route anyway)."""
    found = list(server.hosts)
    for opts in server.modules.values():
        values: List[str] = []
        if isinstance(opts, Mapping):
            if isinstance(opts.get("host"), str):
                values.append(opts["host"])
            if isinstance(opts.get("hosts"), (list, tuple)):
                values += [h for h in opts["hosts"] if isinstance(h, str)]
        elif isinstance(opts, str):
            values += re.findall(r'\bhost\s*:\s*"?([^",}\s]+)', opts)
            for lst in re.findall(r'\bhosts\s*:\s*\[([^\]]*)\]', opts):
                values += [v.strip().strip('"\'') for v in lst.split(",") if v.strip()]
        for v in values:
            found += [v.replace("@HOST@", h) for h in server.hosts] if "@HOST@" in v else [v]
    return found


@contextmanager
def mixed_servers(
    master: str = "prosody",
    mirror: str = "prosody",
    *,
    conference: bool = True,
    conference_options: Any = None,
    master_blocks: Sequence[str] = (),
    mirror_blocks: Sequence[str] = (),
    master_modules: Any = None,
    mirror_modules: Any = None,
    master_options: Any = None,
    mirror_options: Any = None,
    master_route_domains: Sequence[str] = (),
    mirror_route_domains: Sequence[str] = (),
    master_extra_routes: Optional[Mapping[str, Tuple[str, int]]] = None,
    mirror_extra_routes: Optional[Mapping[str, Tuple[str, int]]] = None,
    plugin_paths: Sequence[str] = (),
    global_modules: Sequence[str] = (),
    contrib_modules: Optional[Mapping[str, str]] = None,
    loglevel: str = "debug",
) -> Iterator[MixedServers]:
    """fairfax.localhost (the master: conference.fairfax.localhost, a plain MUC where anyone may
    create rooms, unlocked at creation) and raleigh.localhost, each Prosody or ejabberd,
    federated through two counting proxies; everything stopped on exit.

    Per-side arguments are read according to that side's kind:

    ============================ ============================================ ==========================================
    argument                     Prosody side                                 ejabberd side
    ============================ ============================================ ==========================================
    ``conference_options``       Lua lines under the conference Component     dict (or YAML flow text) merged into
                                 (list of str)                                mod_muc's options (dict only)
    ``master/mirror_blocks``     config blocks appended (e.g. Components)     raw YAML appended at top level
    ``master/mirror_modules``    VirtualHost modules_enabled (list of names)  ``modules:`` entries, {name: options}
    ``master/mirror_options``    global Lua lines (list of str)               top-level options (dict)
    ``plugin_paths``             module folders (both Prosody sides)          --
    ``global_modules``           global modules_enabled (Prosody sides)       --
    ``contrib_modules``          --                                           {name: ext_mod folder} (ejabberd sides)
    ``loglevel``                 -- (always debug)                            ejabberd loglevel
    ============================ ============================================ ==========================================

    Routing: each side sends the other's domain and every subdomain of it (``*.domain``) to the
    proxy in front of the other side. Domains outside that tree (a component
    ``mirror.example``) are found in Prosody ``Component`` lines / ejabberd module ``host(s)``
    options, or listed in ``master_route_domains`` / ``mirror_route_domains``.
    ``master_extra_routes`` / ``mirror_extra_routes`` (``{domain: (ip, port)}``, ``"*.x"`` for
    subdomains) route more domains, e.g. a third server's (tests/integration/test_attacker.py).
    """
    for kind in (master, mirror):
        if kind not in KINDS:
            raise ValueError(f"server kind {kind!r}: expected one of {KINDS}")

    def build(kind: str, domain: str, is_master: bool, blocks, modules, options) -> Any:
        if kind == "prosody":
            extra_blocks = []
            if is_master and conference:
                if isinstance(conference_options, (Mapping, str)):
                    raise TypeError("conference_options for a Prosody master: a list of Lua lines")
                conf_lines = list(conference_options or [])
                extra_blocks.append("\n".join([f'Component "{CONFERENCE}" "muc"', "    muc_room_locking = false"]
                                              + ["    " + line for line in conf_lines]))
            if isinstance(modules, Mapping) or isinstance(options, Mapping):
                raise TypeError(f"{domain} is Prosody: modules/options are lists (modules_enabled / Lua lines)")
            return Prosody(domain, extra_blocks=extra_blocks + list(blocks), plugin_paths=plugin_paths,
                           host_modules=list(modules or []), global_modules=global_modules,
                           global_options=list(options or []))
        mods: Dict[str, Any] = {}
        if is_master and conference:
            # ejabberd 23.01 has no room locking: a room is usable as soon as it is created.
            muc: Dict[str, Any] = {"host": "conference.@HOST@", "access": "all", "access_create": "all",
                                   "access_persistent": "all"}
            if isinstance(conference_options, str):
                raise TypeError("conference_options for an ejabberd master: a dict of mod_muc options")
            muc.update(conference_options or {})
            mods["mod_muc"] = muc
        if modules is not None and not isinstance(modules, Mapping):
            raise TypeError(f"{domain} is ejabberd: modules is a dict {{name: options}}")
        if options is not None and not isinstance(options, Mapping):
            raise TypeError(f"{domain} is ejabberd: options is a dict")
        mods.update(modules or {})
        return Ejabberd(domain, modules=mods, options=options, extra_yaml=list(blocks),
                        contrib_modules=contrib_modules, loglevel=loglevel)

    fairfax = build(master, FAIRFAX, True, master_blocks, master_modules, master_options)
    try:
        raleigh = build(mirror, RALEIGH, False, mirror_blocks, mirror_modules, mirror_options)
    except Exception:
        fairfax.cleanup()
        raise
    to_fairfax = S2SProxy(lambda: (LOOPBACK, fairfax.s2s_port), dialler=RALEIGH, target_label=FAIRFAX,
                          name="to-fairfax")
    to_raleigh = S2SProxy(lambda: (LOOPBACK, raleigh.s2s_port), dialler=FAIRFAX, target_label=RALEIGH,
                          name="to-raleigh")
    env = MixedServers(fairfax, raleigh, to_fairfax, to_raleigh, S2SLink([to_fairfax, to_raleigh]),
                       master_kind=master, mirror_kind=mirror)

    def extra_domains(server, explicit) -> List[str]:
        if isinstance(server, Prosody):
            found = servers._component_domains(server.extra_blocks)
        else:
            found = _ejabberd_module_hosts(server)
        # Only what the wildcard route of the server's own domain does not already cover.
        return [d for d in dict.fromkeys(found + list(explicit))
                if d != server.domain and not d.endswith("." + server.domain)]

    def routes(domain: str, domains: Iterable[str], proxy: S2SProxy) -> Dict[str, Tuple[str, int]]:
        r = {domain: proxy.address, "*." + domain: proxy.address}
        for d in domains:
            r[d] = proxy.address
        return r

    try:
        fairfax.s2s_routes.update(routes(RALEIGH, extra_domains(raleigh, mirror_route_domains),
                                         to_raleigh))
        raleigh.s2s_routes.update(routes(FAIRFAX, extra_domains(fairfax, master_route_domains),
                                         to_fairfax))
        fairfax.s2s_routes.update(master_extra_routes or {})
        raleigh.s2s_routes.update(mirror_extra_routes or {})
        # Both nodes start concurrently (an ejabberd start is ~1.5 s of mostly waiting).
        errors: List[BaseException] = []

        def start(server):
            try:
                server.start()
            except BaseException as e:
                errors.append(e)
        threads = [threading.Thread(target=start, args=(s,)) for s in (fairfax, raleigh)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        yield env
    finally:
        env.close()


# ---------------------------------------------------------------------------------------------
# pytest fixture (import it in conftest.py: `from ejabberd import make_mixed_servers`)
# ---------------------------------------------------------------------------------------------

try:
    import pytest
except ImportError:  # the module is usable without pytest
    pytest = None

if pytest is not None:
    @pytest.fixture
    def make_mixed_servers(request):
        """Factory: ``env = make_mixed_servers(master="ejabberd", mirror="prosody", **kwargs)``
        (kwargs as mixed_servers()); torn down after the test. A failing test keeps the temp
        dirs and gets the logs attached (fixtures.pytest_runtest_makereport)."""
        envs = request.node.__dict__.setdefault("_dmuc_envs", [])
        with ExitStack() as stack:
            def make(master: str = "prosody", mirror: str = "prosody", **kwargs) -> MixedServers:
                env = stack.enter_context(mixed_servers(master, mirror, **kwargs))
                envs.append(env)
                return env
            yield make
