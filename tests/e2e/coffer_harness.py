"""End-to-end harness for coffer-store (python3 stdlib only).

Starts a real coffer-store in a temporary directory with its own certificates,
free ports, admin secret and config, waits for its "coffer-store ready:" line,
creates users with cofferctl, and offers clients:

  srv.imap(mode)        imaplib client ("tls" = implicit TLS, "plain", "starttls")
  srv.raw_imap(mode)    RawIMAP: line-level client with a response parser
  srv.pop3(mode)        poplib client ("tls", "plain", "stls")
  srv.raw(port, tls)    RawLine: plain line/byte socket (POP3 and oddities)
  srv.ctl(*args)        runs cofferctl, returns subprocess.CompletedProcess
  srv.stop()            SIGTERM by PID, bounded wait, checks exit code and log
  srv.kill()            SIGKILL (for crash tests); srv.start() again reuses data_dir

Environment: COFFER_BUILD_DIR (default <repo>/build), COFFER_SOURCE_DIR.
Certificates are generated once per build dir (deploy/gen-certs) under
<build>/e2e-certs, guarded by a file lock. Every server is stopped at exit.
"""

import atexit
import base64
import fcntl
import imaplib
import os
import poplib
import re
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import unittest

SOURCE_DIR = os.path.abspath(
    os.environ.get("COFFER_SOURCE_DIR") or os.path.join(os.path.dirname(__file__), "..", "..")
)
BUILD_DIR = os.path.abspath(os.environ.get("COFFER_BUILD_DIR") or os.path.join(SOURCE_DIR, "build"))
STORE_BIN = os.path.join(BUILD_DIR, "storenode", "coffer-store")
CTL_BIN = os.path.join(BUILD_DIR, "admin", "cofferctl")
TLS_NAME = "coffer.test"
HOST = "127.0.0.1"
READY_TIMEOUT = float(os.environ.get("COFFER_READY_TIMEOUT", "60"))
STOP_TIMEOUT = 30.0
CRLF = b"\r\n"

# Sanitizer reports and fatal markers that fail a test when they appear in the log.
BAD_LOG_PATTERNS = [
    re.compile(rb"ERROR: AddressSanitizer"),
    re.compile(rb"ERROR: LeakSanitizer"),
    re.compile(rb"runtime error:"),  # UBSan
    re.compile(rb"AddressSanitizer:DEADLYSIGNAL"),
]

_live_servers = []


def _cleanup_all():
    for s in list(_live_servers):
        try:
            s.kill(check=False)
        except Exception:  # noqa: BLE001 - best effort at exit
            pass
        s.cleanup()


atexit.register(_cleanup_all)


def wait_until(pred, timeout, interval=0.02, what="condition"):
    """Poll pred() until it returns a true value or `timeout` seconds pass."""
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() >= deadline:
            raise TimeoutError("timed out after %.1fs waiting for %s" % (timeout, what))
        time.sleep(interval)


def free_ports(n):
    """Pick n distinct free TCP ports on 127.0.0.1 (bind to port 0)."""
    socks, ports = [], []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((HOST, 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


def cert_dir():
    """Test PKI shared by all e2e tests of one build dir (generated once)."""
    d = os.path.join(BUILD_DIR, "e2e-certs")
    os.makedirs(BUILD_DIR, exist_ok=True)
    with open(os.path.join(BUILD_DIR, ".e2e-certs.lock"), "w") as lk:
        fcntl.flock(lk, fcntl.LOCK_EX)
        if not all(os.path.exists(os.path.join(d, f)) for f in ("ca.pem", "server.pem", "server.key")):
            subprocess.run(
                [os.path.join(SOURCE_DIR, "deploy", "gen-certs"), d],
                check=True, stdout=subprocess.DEVNULL, timeout=60,
            )
    return d


class _NamedContext(ssl.SSLContext):
    """SSLContext that always verifies the server as `tls_name`, whatever
    host the client library connected to (imaplib/poplib pass their host)."""

    tls_name = TLS_NAME

    def wrap_socket(self, sock, server_side=False, do_handshake_on_connect=True,
                    suppress_ragged_eofs=True, server_hostname=None, session=None):
        return super().wrap_socket(sock, server_side=server_side,
                                   do_handshake_on_connect=do_handshake_on_connect,
                                   suppress_ragged_eofs=suppress_ragged_eofs,
                                   server_hostname=self.tls_name, session=session)


def client_context(ca_file, tls_name=TLS_NAME):
    ctx = _NamedContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.tls_name = tls_name
    ctx.load_verify_locations(ca_file)
    ctx.check_hostname = True
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


# ---------------------------------------------------------------- IMAP parsing


class Atom(str):
    """An IMAP atom (unquoted). Strings and literals are bytes, NIL is None."""


def parse_imap(data, pos=0):
    """Parse one IMAP response (bytes, literals inline as {n}CRLF<n bytes>)
    into a list of tokens: Atom, bytes, None, list. Text after OK/NO/BAD
    is not meant for this parser; use it for FETCH/LIST/STATUS/SEARCH."""
    out, stack = [], []
    cur = out
    n = len(data)
    while pos < n:
        c = data[pos:pos + 1]
        if c in (b" ",):
            pos += 1
        elif c in (b"\r", b"\n"):
            pos += 1
        elif c == b"(":
            new = []
            cur.append(new)
            stack.append(cur)
            cur = new
            pos += 1
        elif c == b")":
            if not stack:
                raise ValueError("unbalanced ) at %d in %r" % (pos, data[:200]))
            cur = stack.pop()
            pos += 1
        elif c == b'"':
            pos += 1
            buf = bytearray()
            while True:
                if pos >= n:
                    raise ValueError("unterminated quoted string")
                ch = data[pos]
                if ch == 0x5C:  # backslash
                    buf.append(data[pos + 1])
                    pos += 2
                elif ch == 0x22:
                    pos += 1
                    break
                else:
                    buf.append(ch)
                    pos += 1
            cur.append(bytes(buf))
        elif c == b"{":
            m = re.compile(rb"\{(\d+)\+?\}\r\n").match(data, pos)
            if not m:
                raise ValueError("bad literal at %d" % pos)
            ln = int(m.group(1))
            start = m.end()
            cur.append(data[start:start + ln])
            pos = start + ln
        else:
            start = pos
            depth = 0
            while pos < n:
                ch = data[pos:pos + 1]
                if ch == b"[":
                    depth += 1
                elif ch == b"]":
                    depth -= 1
                elif depth == 0 and ch in (b" ", b"(", b")", b"\r", b"\n"):
                    break
                pos += 1
            tok = data[start:pos].decode("latin-1")
            cur.append(None if tok.upper() == "NIL" else Atom(tok))
    if stack:
        raise ValueError("unbalanced ( in %r" % data[:200])
    return out


def fetch_dict(resp):
    """Parse a '* n FETCH (...)' response (bytes) into (msn, {ITEM: value})."""
    toks = parse_imap(resp)
    if len(toks) < 4 or toks[0] != "*" or str(toks[2]).upper() != "FETCH":
        raise ValueError("not a FETCH response: %r" % resp[:200])
    items = toks[3]
    d = {}
    for i in range(0, len(items) - 1, 2):
        d[str(items[i]).upper()] = items[i + 1]
    return int(toks[1]), d


def fetches(untagged):
    """All FETCH responses among untagged responses: list of (msn, dict)."""
    out = []
    for r in untagged:
        w = r.split(b" ", 3)
        if len(w) >= 3 and r.startswith(b"* ") and w[2].rstrip(b"\r\n").upper() == b"FETCH":
            out.append(fetch_dict(r))
    return out


def fetch_by_uid(untagged):
    """{uid: dict} for FETCH responses; responses for the same message (same
    MSN) are merged, so an extra '* n FETCH (FLAGS ...)' without UID counts."""
    fs = fetches(untagged)
    uid_of = {msn: int(d["UID"]) for msn, d in fs if "UID" in d}
    res = {}
    for msn, d in fs:
        if msn in uid_of:
            res.setdefault(uid_of[msn], {}).update(d)
    return res


class IMAPError(Exception):
    pass


class RawIMAP:
    """A small, strict IMAP client speaking raw lines. command() returns
    (untagged_responses, tagged_line); each response is bytes with literals
    inline. Reads are bounded by a per-call timeout."""

    def __init__(self, port, mode="tls", ctx=None, timeout=30.0, greeting=True):
        self.timeout = timeout
        self.ctx = ctx
        self.sock = socket.create_connection((HOST, port), timeout=timeout)
        if mode == "tls":
            self.sock = ctx.wrap_socket(self.sock)
        self.buf = b""
        self.ntag = 0
        self.greeting = self.read_response() if greeting else None
        if mode == "starttls":
            self.starttls()

    # -- low level
    def send(self, data):
        if isinstance(data, str):
            data = data.encode()
        self.sock.sendall(data)

    def _fill(self, deadline):
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("IMAP read timed out")
        self.sock.settimeout(left)
        try:
            chunk = self.sock.recv(1 << 20)
        except socket.timeout:
            raise TimeoutError("IMAP read timed out") from None
        if not chunk:
            raise EOFError("connection closed by server")
        self.buf += chunk

    def readline(self, timeout=None):
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            i = self.buf.find(CRLF)
            if i >= 0:
                line, self.buf = self.buf[:i + 2], self.buf[i + 2:]
                return line
            self._fill(deadline)

    def readexact(self, n, timeout=None):
        deadline = time.monotonic() + (timeout or self.timeout)
        while len(self.buf) < n:
            self._fill(deadline)
        data, self.buf = self.buf[:n], self.buf[n:]
        return data

    def read_response(self, timeout=None):
        """One complete response (a line plus any literals it announces)."""
        out = b""
        while True:
            line = self.readline(timeout)
            out += line
            m = re.search(rb"\{(\d+)\}\r\n$", line)
            if not m:
                return out
            out += self.readexact(int(m.group(1)), timeout)

    def closed_by_server(self, timeout=5.0):
        """(closed, data): closed is True if the server closes the connection
        within timeout; data is whatever it sent before that."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                self._fill(deadline)
            except TimeoutError:
                return False, self.buf
            except (EOFError, ConnectionError, ssl.SSLError, OSError):
                return True, self.buf

    def next_tag(self):
        self.ntag += 1
        return "a%03d" % self.ntag

    # -- commands
    def command(self, *parts, tag=None, timeout=None, check=False):
        """Send a command. parts are str/bytes (joined as-is) or Lit objects
        (sent as synchronising literals after waiting for '+'). If the server
        answers a literal with a tagged response instead of '+', that is
        returned and the rest is not sent."""
        tag = tag or self.next_tag()
        untagged = []
        line = tag.encode() + b" "
        for p in parts:
            if isinstance(p, Lit):
                if p.nonsync:
                    self.send(line + b"{%d+}\r\n" % len(p.data) + p.data)
                    line = b""
                    continue
                self.send(line + b"{%d}\r\n" % len(p.data))
                line = b""
                while True:
                    r = self.read_response(timeout)
                    if r.startswith(b"+"):
                        break
                    if r.startswith(tag.encode() + b" "):
                        return untagged, r
                    untagged.append(r)
                self.send(p.data)
            else:
                line += p.encode() if isinstance(p, str) else p
        self.send(line + CRLF)
        tagged = self.wait_tagged(tag, untagged, timeout)
        if check and not ok(tagged):
            raise IMAPError("%s failed: %r" % (parts[0] if parts else "", tagged))
        return untagged, tagged

    def wait_tagged(self, tag, untagged=None, timeout=None):
        untagged = untagged if untagged is not None else []
        while True:
            r = self.read_response(timeout)
            if r.startswith(tag.encode() + b" "):
                return r
            untagged.append(r)

    def ok(self, *parts, **kw):
        """command() that must succeed; returns the untagged responses."""
        u, t = self.command(*parts, **kw)
        if not ok(t):
            raise IMAPError("command %r failed: %r" % (parts, t))
        self.last_tagged = t
        return u

    def starttls(self):
        u, t = self.command("STARTTLS")
        if not ok(t):
            raise IMAPError("STARTTLS refused: %r" % t)
        if self.buf:
            raise IMAPError("server sent data after STARTTLS OK: %r" % self.buf)
        self.sock = self.ctx.wrap_socket(self.sock)
        return t

    def login(self, user, password):
        return self.ok("LOGIN ", quote(user), " ", quote(password))

    def close(self):
        try:
            self.sock.settimeout(2)
            self.sock.sendall(b"zz LOGOUT\r\n")
        except OSError:
            pass
        try:
            self.sock.close()
        except OSError:
            pass


class Lit:
    def __init__(self, data, nonsync=False):
        self.data = data if isinstance(data, bytes) else data.encode()
        self.nonsync = nonsync


def ok(tagged):
    parts = tagged.split(b" ", 2)
    return len(parts) >= 2 and parts[1].upper() == b"OK"


def status_word(tagged):
    parts = tagged.split(b" ", 2)
    return parts[1].upper().decode() if len(parts) >= 2 else ""


def quote(s):
    if isinstance(s, bytes):
        s = s.decode()
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def find_untagged(untagged, keyword):
    """Untagged responses whose 2nd or 3rd word is keyword (e.g. 'SEARCH', 'EXISTS')."""
    kw = keyword.upper().encode()
    res = []
    for r in untagged:
        w = r.split(b" ", 3)
        if len(w) >= 2 and w[1].rstrip(b"\r\n").upper() == kw:
            res.append(r)
        elif len(w) >= 3 and w[2].rstrip(b"\r\n").upper() == kw:
            res.append(r)
    return res


def search_result(untagged):
    """Numbers of the '* SEARCH ...' response(s) as a sorted list of ints."""
    nums = []
    for r in find_untagged(untagged, "SEARCH"):
        words = r.strip().split(b" ")[2:]
        nums += [int(w) for w in words if w.isdigit()]
    return sorted(nums)


def resp_code(tagged, code):
    """Arguments of a response code like [APPENDUID 5 7] in a response line."""
    m = re.search(rb"\[" + code.encode() + rb"(?: ([^\]]*))?\]", tagged, re.I)
    if not m:
        return None
    return (m.group(1) or b"").decode().split(" ")


# ---------------------------------------------------------------- clients


class IMAPClient(imaplib.IMAP4):
    """imaplib over plaintext (optionally upgraded with starttls())."""


class IMAPClientSSL(imaplib.IMAP4_SSL):
    pass


class RawLine:
    """Line/byte socket for POP3 and protocol oddities."""

    def __init__(self, port, tls, ctx, timeout=30.0):
        self.sock = socket.create_connection((HOST, port), timeout=timeout)
        self.ctx = ctx
        if tls:
            self.sock = ctx.wrap_socket(self.sock)
        self.timeout = timeout
        self.buf = b""

    _fill = RawIMAP._fill
    readline = RawIMAP.readline
    readexact = RawIMAP.readexact
    closed_by_server = RawIMAP.closed_by_server

    def send(self, data):
        if isinstance(data, str):
            data = data.encode()
        self.sock.sendall(data)

    def cmd(self, line):
        self.send(line.encode() + CRLF if isinstance(line, str) else line + CRLF)
        return self.readline()

    def read_multiline(self, timeout=None):
        """POP3 multi-line body after a +OK line: returns the raw bytes between
        the status line and the terminating '.' CRLF, dot-unstuffed."""
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            if self.buf.startswith(b".\r\n"):
                i = 0
            else:
                i = self.buf.find(b"\r\n.\r\n")
            if i >= 0:
                end = i + 2 if i > 0 else 0
                body = self.buf[:end]
                self.buf = self.buf[end + 3:]
                lines = body.split(CRLF)
                out = [ln[1:] if ln.startswith(b".") else ln for ln in lines]
                return CRLF.join(out)
            self._fill(deadline)

    def starttls_wrap(self):
        if self.buf:
            raise IOError("server sent data after STLS: %r" % self.buf)
        self.sock = self.ctx.wrap_socket(self.sock)

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


# ---------------------------------------------------------------- server


class CofferServer:
    """One coffer-store process for a test.

    config: dict {"section.key": value} overriding/adding config keys.
    users:  names to create (passwords are random, in self.passwords)."""

    def __init__(self, name="e2e", config=None, users=("alice", "bob"), keep=False):
        if not os.path.exists(STORE_BIN):
            raise RuntimeError("coffer-store not built: %s (set COFFER_BUILD_DIR)" % STORE_BIN)
        self.name = name
        self.certs = cert_dir()
        self.tmp = tempfile.mkdtemp(prefix="coffer-%s-" % name)
        self.keep = keep or bool(os.environ.get("COFFER_KEEP_TMP"))
        self.data_dir = os.path.join(self.tmp, "data")
        os.makedirs(self.data_dir, mode=0o700)
        (self.imap_port, self.imaps_port, self.pop3_port, self.pop3s_port,
         self.admin_port, self.raft_port) = free_ports(6)
        self.secret_file = os.path.join(self.tmp, "admin.secret")
        fd = os.open(self.secret_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, (secrets.token_hex(24) + "\n").encode())
        os.close(fd)
        self.ca_file = os.path.join(self.certs, "ca.pem")
        self.ctx = client_context(self.ca_file)
        self.overrides = dict(config or {})
        self.config_file = os.path.join(self.tmp, "coffer.ini")
        self.log_file = os.path.join(self.tmp, "coffer-store.log")
        self.proc = None
        self.pid = None
        self._log = bytearray()
        self._log_lock = threading.Lock()
        self._ready = threading.Event()
        self._reader = None
        self.passwords = {}
        self.write_config()
        _live_servers.append(self)
        try:
            self.start()
            for u in users:
                self.add_user(u)
        except BaseException:
            self.kill(check=False)
            self.cleanup()
            raise

    # -- config
    def base_config(self):
        return {
            "node.id": "1",
            "node.data_dir": self.data_dir,
            "node.log_level": "info",
            "raft.address": "%s:%d" % (HOST, self.raft_port),
            "raft.bootstrap": "yes",
            "tls.cert": os.path.join(self.certs, "server.pem"),
            "tls.key": os.path.join(self.certs, "server.key"),
            "tls.ca": self.ca_file,
            "imap.listen": "%s:%d" % (HOST, self.imap_port),
            "imap.listen_tls": "%s:%d" % (HOST, self.imaps_port),
            "pop3.listen": "%s:%d" % (HOST, self.pop3_port),
            "pop3.listen_tls": "%s:%d" % (HOST, self.pop3s_port),
            "admin.listen": "%s:%d" % (HOST, self.admin_port),
            "admin.secret_file": self.secret_file,
            "auth.allow_plaintext": "no",
        }

    def write_config(self):
        conf = self.base_config()
        conf.update(self.overrides)
        sections = {}
        for k, v in conf.items():
            sec, key = k.split(".", 1)
            sections.setdefault(sec, []).append((key, v))
        with open(self.config_file, "w") as f:
            f.write("# generated by tests/e2e/coffer_harness.py\n")
            for sec, kvs in sections.items():
                f.write("\n[%s]\n" % sec)
                for key, v in kvs:
                    f.write("%s = %s\n" % (key, v))

    # -- process
    def _read_stderr(self, stream, logf):
        for line in iter(stream.readline, b""):
            logf.write(line)
            logf.flush()
            with self._log_lock:
                self._log += line
            if line.startswith(b"coffer-store ready:") or b"coffer-store ready:" in line:
                self._ready.set()
        stream.close()
        logf.close()

    def start(self, timeout=READY_TIMEOUT):
        assert self.proc is None or self.proc.poll() is not None
        self._ready.clear()
        logf = open(self.log_file, "ab")
        logf.write(b"==== start %s\n" % time.strftime("%H:%M:%S").encode())
        logf.flush()
        self.proc = subprocess.Popen(
            [STORE_BIN, "--config", self.config_file],
            stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.PIPE,
            cwd=self.tmp, start_new_session=True,
        )
        self.pid = self.proc.pid
        self._reader = threading.Thread(target=self._read_stderr, args=(self.proc.stderr, logf), daemon=True)
        self._reader.start()
        deadline = time.monotonic() + timeout
        while not self._ready.wait(0.05):
            if self.proc.poll() is not None:
                self._reader.join(5)
                raise AssertionError("coffer-store exited with %s before ready; log:\n%s"
                                     % (self.proc.returncode, self.log_tail()))
            if time.monotonic() > deadline:
                raise AssertionError("coffer-store not ready after %.0fs; log:\n%s"
                                     % (timeout, self.log_tail()))

    def log(self):
        with self._log_lock:
            return bytes(self._log)

    def log_tail(self, n=60):
        return b"\n".join(self.log().splitlines()[-n:]).decode("utf-8", "replace")

    def wait_log(self, pattern, timeout=10.0, since=0):
        rx = re.compile(pattern if isinstance(pattern, bytes) else pattern.encode())
        return wait_until(lambda: rx.search(self.log(), since), timeout, what="log line %r" % pattern)

    def sanitizer_report(self):
        log = self.log()
        for p in BAD_LOG_PATTERNS:
            m = p.search(log)
            if m:
                return log[max(0, m.start() - 200):m.start() + 3000].decode("utf-8", "replace")
        return None

    def stop(self, check=True, timeout=STOP_TIMEOUT):
        """SIGTERM, wait (bounded), SIGKILL if needed. With check, a forced
        kill, a non-zero exit or a sanitizer report raises AssertionError."""
        if self.proc is None or self.proc.poll() is not None:
            rc = None if self.proc is None else self.proc.returncode
            problem = None
        else:
            problem = None
            os.kill(self.pid, signal.SIGTERM)
            try:
                rc = self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.kill(self.pid, signal.SIGKILL)
                rc = self.proc.wait(10)
                problem = "did not exit within %.0fs of SIGTERM (killed)" % timeout
        if self._reader:
            self._reader.join(10)
        if check:
            if problem is None and rc not in (0, None):
                problem = "exited with status %s" % rc
            rep = self.sanitizer_report()
            if rep:
                problem = (problem + "; " if problem else "") + "sanitizer report:\n" + rep
            if problem:
                raise AssertionError("coffer-store %s\nlog tail:\n%s" % (problem, self.log_tail()))
        return rc

    def kill(self, check=False):
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.pid, signal.SIGKILL)
            self.proc.wait(10)
        if self._reader:
            self._reader.join(10)
        if check:
            rep = self.sanitizer_report()
            if rep:
                raise AssertionError("sanitizer report:\n" + rep)

    def restart(self):
        self.stop()
        self.start()

    def cleanup(self):
        if self in _live_servers:
            _live_servers.remove(self)
        if not self.keep:
            shutil.rmtree(self.tmp, ignore_errors=True)

    def close(self, check=True):
        """stop() + remove the temp dir; keeps the dir when the check fails."""
        try:
            self.stop(check=check)
        except AssertionError:
            self.keep = True
            sys.stderr.write("coffer-store temp dir kept: %s\n" % self.tmp)
            self.cleanup()
            raise
        self.cleanup()

    # -- admin
    def ctl_argv(self, *args, secret_file=True):
        argv = [CTL_BIN, "--server", "%s:%d" % (HOST, self.admin_port), "--ca", self.ca_file,
                "--tls-name", TLS_NAME]
        if secret_file is True:
            argv += ["--secret-file", self.secret_file]
        elif secret_file:
            argv += ["--secret-file", secret_file]
        return argv + [str(a) for a in args]

    def ctl(self, *args, check=True, secret_file=True, timeout=60):
        if not os.path.exists(CTL_BIN):
            raise RuntimeError("cofferctl not built: %s" % CTL_BIN)
        r = subprocess.run(self.ctl_argv(*args, secret_file=secret_file), capture_output=True,
                           stdin=subprocess.DEVNULL, timeout=timeout)
        if check and r.returncode != 0:
            raise AssertionError("cofferctl %s failed (%d): %s %s" % (
                " ".join(map(str, args)), r.returncode, r.stdout.decode(errors="replace"),
                r.stderr.decode(errors="replace")))
        return r

    def add_user(self, name, password=None):
        password = password or ("pw-" + secrets.token_urlsafe(12))
        self.ctl("user", "add", name, "--password", password)
        self.passwords[name] = password
        return password

    # -- clients
    def imap(self, mode="tls", timeout=30.0):
        if mode == "tls":
            return IMAPClientSSL(HOST, self.imaps_port, ssl_context=self.ctx, timeout=timeout)
        c = IMAPClient(HOST, self.imap_port, timeout=timeout)
        if mode == "starttls":
            c.starttls(ssl_context=self.ctx)
        return c

    def imap_login(self, user="alice", mode="tls"):
        c = self.imap(mode)
        c.login(user, self.passwords[user])
        return c

    def raw_imap(self, mode="tls", timeout=30.0, greeting=True):
        port = self.imaps_port if mode == "tls" else self.imap_port
        return RawIMAP(port, mode=mode, ctx=self.ctx, timeout=timeout, greeting=greeting)

    def raw_login(self, user="alice", mode="tls"):
        c = self.raw_imap(mode)
        c.login(user, self.passwords[user])
        return c

    def pop3(self, mode="tls", timeout=30.0):
        if mode == "tls":
            return poplib.POP3_SSL(HOST, self.pop3s_port, context=self.ctx, timeout=timeout)
        p = poplib.POP3(HOST, self.pop3_port, timeout=timeout)
        if mode == "stls":
            p.stls(context=self.ctx)
        return p

    def raw(self, port, tls=True, timeout=30.0):
        return RawLine(port, tls, self.ctx, timeout)

    def curl_base(self, port):
        return ["curl", "--silent", "--show-error", "--max-time", "60", "--cacert", self.ca_file,
                "--resolve", "%s:%d:%s" % (TLS_NAME, port, HOST)]


def auth_plain(user, password):
    return base64.b64encode(b"\0" + user.encode() + b"\0" + password.encode()).decode()


# ---------------------------------------------------------------- messages


def make_message(subject="test", body="hello\r\n", frm="Alice <alice@coffer.test>",
                 to="Bob <bob@coffer.test>", date="Mon, 02 Feb 2026 10:00:00 +0000",
                 extra_headers=(), msgid=None):
    msgid = msgid or "<%s@coffer.test>" % secrets.token_hex(8)
    hdr = ["From: " + frm, "To: " + to, "Subject: " + subject, "Date: " + date,
           "Message-ID: " + msgid, "MIME-Version: 1.0"]
    hdr += list(extra_headers)
    if not any(h.lower().startswith("content-type:") for h in extra_headers):
        hdr.append("Content-Type: text/plain; charset=us-ascii")
    raw = "\r\n".join(hdr) + "\r\n\r\n"
    b = body if isinstance(body, bytes) else body.encode("utf-8")
    return raw.encode("utf-8") + b


def append(c, mailbox, msg, flags=None, date=None):
    """APPEND via RawIMAP; returns (uidvalidity, uid) from APPENDUID (or None)."""
    parts = ["APPEND ", quote(mailbox)]
    if flags:
        parts.append(" (" + " ".join(flags) + ")")
    if date:
        parts.append(' "%s"' % date)
    parts += [" ", Lit(msg)]
    u, t = c.command(*parts, timeout=120)
    if not ok(t):
        raise IMAPError("APPEND failed: %r" % t)
    code = resp_code(t, "APPENDUID")
    return (int(code[0]), int(code[1])) if code else None


class ServerTestCase(unittest.TestCase):
    """One server per test class (users alice and bob); stop() is checked
    in tearDownClass, so a crash or sanitizer report fails the class."""

    server_config = None
    server_users = ("alice", "bob")

    @classmethod
    def setUpClass(cls):
        cls.srv = CofferServer(cls.__name__, config=cls.server_config, users=cls.server_users)

    @classmethod
    def tearDownClass(cls):
        cls.srv.close(check=True)

    def assertAlive(self):
        self.assertIsNone(self.srv.proc.poll(), "coffer-store died:\n" + self.srv.log_tail())


def main():
    unittest.main(verbosity=2)
