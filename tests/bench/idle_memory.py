#!/usr/bin/env python3
"""Memory per idle logged-in IMAP session (not a test; a measurement).

  python3 tests/bench/idle_memory.py [--sessions 1000] [--mode plain|tls|both]
                                     [--select] [--build-dir DIR]

Starts its own coffer-store (tests/e2e/coffer_harness.py) with
auth.allow_plaintext = yes (so plain sessions can log in) and a cheap scrypt
cost (auth.scrypt_log2n = 10; the hash work is not what is measured), warms
up with a few sessions, then opens N sessions, logs each in (optionally
SELECTs INBOX), lets them sit idle and compares the server's memory before
and after:

  VmRSS  resident memory (what the session buffers actually touch)
  RssAnon  the anonymous (heap) part of VmRSS, without file pages (LMDB map)
  VmData data segment + anonymous mappings (what was allocated, touched or not)

Prints bytes per session for both, per mode. The sessions are then closed and
the figures after closing show what is given back."""
import argparse
import os
import socket
import ssl
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "e2e"))


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sessions", type=int, default=1000)
    ap.add_argument("--mode", choices=("plain", "tls", "both"), default="both")
    ap.add_argument("--select", action="store_true", help="SELECT INBOX in every session")
    ap.add_argument("--build-dir", default=None)
    return ap.parse_args()


def mem(pid):
    vals = {}
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "VmData", "RssAnon"):
                vals[k] = int(v.split()[0]) * 1024
    return vals


def read_line(sock, buf):
    while b"\r\n" not in buf[0]:
        chunk = sock.recv(65536)
        if not chunk:
            raise EOFError("server closed the connection")
        buf[0] += chunk
    line, _, rest = buf[0].partition(b"\r\n")
    buf[0] = rest
    return line


def wait_tag(sock, buf, tag):
    while True:
        line = read_line(sock, buf)
        if line.startswith(tag + b" "):
            if not line.startswith(tag + b" OK"):
                raise RuntimeError("%r" % line)
            return


def open_sessions(srv, n, tls, select):
    """n logged-in sessions (connect all, then pipeline the logins)."""
    port = srv.imaps_port if tls else srv.imap_port
    conns = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port), timeout=60)
        if tls:
            s = srv.ctx.wrap_socket(s)
        buf = [b""]
        read_line(s, buf)  # greeting
        conns.append((s, buf))
    pw = srv.passwords["alice"]
    for s, _ in conns:
        s.sendall(b'l LOGIN alice "%s"\r\n' % pw.encode())
    for s, buf in conns:
        wait_tag(s, buf, b"l")
    if select:
        for s, _ in conns:
            s.sendall(b"s SELECT INBOX\r\n")
        for s, buf in conns:
            wait_tag(s, buf, b"s")
    return conns


def settle(pid, secs=1.0):
    """Wait until RSS stops moving (bounded)."""
    last = mem(pid)["VmRSS"]
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        time.sleep(secs)
        cur = mem(pid)["VmRSS"]
        if abs(cur - last) < 64 * 1024:
            return
        last = cur


def close_all(conns):
    for s, _ in conns:
        try:
            s.close()
        except OSError:
            pass


def measure(srv, n, tls, select):
    pid = srv.pid
    warm = open_sessions(srv, 50, tls, select)  # threadpool, TLS and malloc warm-up
    close_all(warm)
    settle(pid)
    before = mem(pid)
    t0 = time.monotonic()
    conns = open_sessions(srv, n, tls, select)
    settle(pid)
    during = mem(pid)
    secs = time.monotonic() - t0
    close_all(conns)
    settle(pid)
    after = mem(pid)
    return before, during, after, secs


def main():
    args = parse_args()
    if args.build_dir:
        os.environ["COFFER_BUILD_DIR"] = os.path.abspath(args.build_dir)
    import coffer_harness as h
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, 4 * args.sessions + 256)), hard))
    modes = ("plain", "tls") if args.mode == "both" else (args.mode,)
    print("idle_memory: %d sessions per mode%s, coffer-store %s"
          % (args.sessions, ", SELECT INBOX" if args.select else "", h.STORE_BIN))
    print("%-6s %12s %12s %14s %10s %12s %6s" % ("mode", "RSS/session", "RssAnon/sess",
                                                  "VmData/session", "RSS kept", "VmData kept", "secs"))
    for mode in modes:
        # a fresh server per mode, so one mode's freed memory does not hide the other's
        srv = h.CofferServer("idle-memory", users=("alice",), config={
            "auth.allow_plaintext": "yes",
            "auth.scrypt_log2n": "10",
            "limits.max_sessions": str(2 * args.sessions + 100),
            "node.log_level": "warn",
        })
        try:
            b, d, a, secs = measure(srv, args.sessions, mode == "tls", args.select)
        finally:
            srv.close(check=False)
        n = args.sessions
        print("%-6s %12.0f %12.0f %14.0f %10.0f %12.0f %6.1f" % (
            mode, (d["VmRSS"] - b["VmRSS"]) / n, (d["RssAnon"] - b["RssAnon"]) / n,
            (d["VmData"] - b["VmData"]) / n,
            (a["VmRSS"] - b["VmRSS"]) / n, (a["VmData"] - b["VmData"]) / n, secs))
        sys.stdout.flush()


if __name__ == "__main__":
    main()
