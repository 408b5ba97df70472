#!/usr/bin/env python3
"""Memory per idle proxied session (a measurement, not a test).

  COFFER_BUILD_DIR=/work/build-rel python3 proxy/tests/idle_mem_mmp.py \
      [--sessions 500] [--mode tls|plain|starttls|all]

For each mode a fresh store + coffer-mmp pair is started (so one mode's freed
memory does not hide the next one's), warmed up with a few sessions, then N
sessions are opened through the proxy, logged in and left after SELECT
INBOX. Reported per session: the proxy's RSS and RssAnon growth, and the
store's (each proxied session is also one TLS session on the store, the
proxy's backend connection). Then the sessions are closed and what each
process keeps is shown.

With COFFER_MMP_WRAP="heaptrack -o /tmp/mmp" (see tests/e2e/mmp_harness.py)
the proxy runs under heaptrack: heaptrack_print --print-peaks shows where
the idle sessions' memory was allocated (RSS figures are then meaningless).
"""

import argparse
import os
import resource
import signal
import socket
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "tests", "e2e"))
import coffer_harness as ch  # noqa: E402
import mmp_harness as mh  # noqa: E402
from coffer_harness import HOST  # noqa: E402


def mem(pid):
    out = {}
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "RssAnon"):
                out[k] = int(v.split()[0])
    return out


def settle(pids):
    last = [mem(p)["VmRSS"] for p in pids]
    for _ in range(20):
        time.sleep(0.3)
        cur = [mem(p)["VmRSS"] for p in pids]
        if all(abs(a - b) < 64 for a, b in zip(cur, last)):
            return
        last = cur


def read_line(s, buf):
    while b"\r\n" not in buf[0]:
        d = s.recv(65536)
        if not d:
            raise EOFError("closed")
        buf[0] += d
    line, _, buf[0] = buf[0].partition(b"\r\n")
    return line


def wait_tag(s, buf, tag):
    while True:
        line = read_line(s, buf)
        if line.startswith(tag + b" "):
            assert line.startswith(tag + b" OK"), line
            return


def open_one(cl, mode, pw):
    port = cl.mmp.imaps_port if mode == "tls" else cl.mmp.imap_port
    s = socket.create_connection((HOST, port), timeout=60)
    if mode == "tls":
        s = cl.mmp.ctx.wrap_socket(s)
    buf = [b""]
    read_line(s, buf)
    if mode == "starttls":
        s.sendall(b"t STARTTLS\r\n")
        wait_tag(s, buf, b"t")
        s = cl.mmp.ctx.wrap_socket(s)
        buf = [b""]
    s.sendall(b'l LOGIN alice "%s"\r\n' % pw.encode())
    wait_tag(s, buf, b"l")
    s.sendall(b"s SELECT INBOX\r\n")
    wait_tag(s, buf, b"s")
    return s, buf


def open_sessions(cl, n, mode, pw):
    """n logged-in sessions, opened one after the other (so what is measured
    is what idle sessions hold, not the peak of n concurrent handshakes)."""
    return [open_one(cl, mode, pw) for _ in range(n)]


def close_all(conns):
    for s, _ in conns:
        try:
            s.close()
        except OSError:
            pass


def kill_descendant(pid, name):
    """SIGKILL the process called name among pid and its descendants."""
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            with open("/proc/%d/comm" % p) as f:
                comm = f.read().strip()
            if comm == name:
                os.kill(p, signal.SIGKILL)
                time.sleep(1)
                return
            with open("/proc/%d/task/%d/children" % (p, p)) as f:
                todo += [int(x) for x in f.read().split()]
        except OSError:
            pass


def run_mode(mode, n, resume="yes"):
    cl = mh.ProxyCluster("idlemem", proxy_config={
        "auth.allow_plaintext": "yes", "auth.plaintext_networks": "127.0.0.0/8",
        "proxy.log_level": "warn", "limits.max_connections_per_ip": "100000",
        "limits.max_connections": "100000", "backend.tls_resume": resume},
        store_config={"auth.scrypt_log2n": "10", "auth.allow_plaintext": "yes",
                      "node.log_level": "warn",
                      "limits.max_sessions": str(2 * n + 100)}, users=())
    try:
        pw = cl.store.add_user("alice")
        pids = (cl.mmp.pid, cl.store.pid)
        close_all(open_sessions(cl, 30, mode, pw))
        settle(pids)
        before = [mem(p) for p in pids]
        conns = open_sessions(cl, n, mode, pw)
        settle(pids)
        during = [mem(p) for p in pids]
        if os.environ.get("COFFER_MMP_WRAP"):
            # profiling: kill the proxy now, so that every allocation the idle
            # sessions hold shows up as "leaked" (heaptrack_print --print-leaks)
            kill_descendant(cl.mmp.pid, "coffer-mmp")
            return
        close_all(conns)
        settle(pids)
        after = [mem(p) for p in pids]
    finally:
        cl.close(check=False)
    row = [mode]
    for i in range(2):
        row += [(during[i]["VmRSS"] - before[i]["VmRSS"]) / n,
                (during[i]["RssAnon"] - before[i]["RssAnon"]) / n,
                (after[i]["RssAnon"] - before[i]["RssAnon"]) / n]
    print("%-9s %9.1f %9.1f %9.1f    %9.1f %9.1f %9.1f" % tuple(row))
    sys.stdout.flush()


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sessions", type=int, default=500)
    ap.add_argument("--mode", choices=("tls", "plain", "starttls", "all"), default="all")
    ap.add_argument("--no-resume", action="store_true",
                    help="backend.tls_resume = no (full TLS handshake to the store per login)")
    a = ap.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, 2 * a.sessions + 256)), hard))
    modes = ("tls", "starttls", "plain") if a.mode == "all" else (a.mode,)
    print("idle proxied IMAP sessions (logged in, INBOX selected): %d per mode, KiB per session"
          % a.sessions)
    print("%-9s %29s    %29s" % ("", "---------- proxy ----------", "---------- store ----------"))
    print("%-9s %9s %9s %9s    %9s %9s %9s" % ("mode", "RSS", "RssAnon", "kept", "RSS", "RssAnon",
                                               "kept"))
    for m in modes:
        run_mode(m, a.sessions, "no" if a.no_resume else "yes")


if __name__ == "__main__":
    main()
