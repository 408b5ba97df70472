#!/usr/bin/env python3
"""Quick single-node benchmark (not a test): APPEND and FETCH throughput with
N concurrent IMAP clients, and RSS growth over many idle logged-in sessions.

  python3 tests/bench/quick.py [--clients 4] [--messages 2000] [--size 4096]
                               [--idle 1000] [--build-dir build]

Starts its own coffer-store (tests/e2e/coffer_harness.py) in a temp dir and
prints a small table with the command line used."""
import argparse
import os
import resource
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "e2e"))


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=4, help="concurrent IMAP clients")
    ap.add_argument("--messages", type=int, default=2000, help="messages appended (and fetched)")
    ap.add_argument("--size", type=int, default=4096, help="message size in bytes")
    ap.add_argument("--idle", type=int, default=1000, help="idle logged-in sessions for the RSS test")
    ap.add_argument("--build-dir", default=None, help="build tree (default $COFFER_BUILD_DIR or build/)")
    ap.add_argument("--scrypt-log2n", type=int, default=None, help="auth.scrypt_log2n for the server")
    return ap.parse_args()


def vmrss_kib(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS for pid %d" % pid)


# per process (pid + start time): Message-IDs differ from run to run, so no
# APPEND repeats a byte-identical earlier one (which Coffer may take for a retry)
NONCE = "%08x%013x" % (os.getpid() & 0xffffffff, int(time.time() * 1e6) & 0xfffffffffffff)


def make_msg(i, size):
    head = ("From: bench@coffer.test\r\nTo: bench@coffer.test\r\nSubject: bench %d\r\n"
            "Message-ID: <bench-%d.%s@coffer.test>\r\nDate: Mon, 02 Feb 2026 10:00:00 +0000\r\n\r\n"
            % (i, i, NONCE)).encode()
    line = b"x" * 62 + b"\r\n"
    body = line * ((size - len(head)) // len(line) + 1)
    return (head + body)[:size - 2] + b"\r\n"


def split(n, k):
    return [list(range(i, n, k)) for i in range(k)]


def run_parallel(fns):
    errors = []

    def wrap(fn):
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=wrap, args=(fn,)) for fn in fns]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return time.monotonic() - t0


def main():
    args = parse_args()
    if args.build_dir:
        os.environ["COFFER_BUILD_DIR"] = os.path.abspath(args.build_dir)
    import coffer_harness as h  # after COFFER_BUILD_DIR is set

    need = args.idle + args.clients + 256 + 50
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < need:
        if hard != resource.RLIM_INFINITY and hard < need:
            if os.geteuid() != 0:
                sys.exit("RLIMIT_NOFILE hard limit %d < %d; raise it or lower --idle" % (hard, need))
            hard = need  # root may raise the hard limit
        # the server inherits this limit from us
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))
        except (ValueError, OSError) as e:
            sys.exit("cannot raise RLIMIT_NOFILE to %d (%s); lower --idle" % (need, e))

    conf = {"limits.max_sessions": str(args.idle + args.clients + 200), "node.log_level": "notice"}
    if args.scrypt_log2n:
        conf["auth.scrypt_log2n"] = str(args.scrypt_log2n)
    srv = h.CofferServer("bench", config=conf, users=("bench",))
    rows = []
    try:
        pw = srv.passwords["bench"]
        msgs = [make_msg(i, args.size) for i in range(args.messages)]
        clients = [srv.raw_login("bench") for _ in range(args.clients)]
        parts = split(args.messages, args.clients)
        uids = [[] for _ in range(args.clients)]

        def appender(k):
            def run():
                c = clients[k]
                for i in parts[k]:
                    _, uid = h.append(c, "INBOX", msgs[i])
                    uids[k].append((uid, i))
            return run

        dt = run_parallel([appender(k) for k in range(args.clients)])
        rows.append(("APPEND", "%d x %d B, %d clients" % (args.messages, args.size, args.clients),
                     "%.0f msgs/s" % (args.messages / dt), "%.2f s" % dt))

        for c in clients:
            c.ok("EXAMINE INBOX")

        def fetcher(k):
            def run():
                c = clients[k]
                for uid, i in uids[k]:
                    u = c.ok("UID FETCH %d (BODY.PEEK[])" % uid)
                    got = h.fetch_by_uid(u)[uid]["BODY[]"]
                    if got != msgs[i]:
                        raise AssertionError("FETCH uid %d returned different bytes" % uid)
            return run

        dt = run_parallel([fetcher(k) for k in range(args.clients)])
        rows.append(("FETCH", "UID FETCH BODY.PEEK[] one by one, %d clients" % args.clients,
                     "%.0f msgs/s" % (args.messages / dt), "%.2f s" % dt))
        for c in clients:
            c.close()

        if args.idle > 0:
            idle = []
            lock = threading.Lock()
            # warm-up: the first logins grow allocator arenas (scrypt runs on
            # the threadpool); measure the marginal cost after them
            warm = [srv.raw_login("bench") for _ in range(min(50, args.idle))]
            rss0 = vmrss_kib(srv.pid)

            def opener(n):
                def run():
                    for _ in range(n):
                        c = srv.raw_imap("tls", timeout=120)
                        c.login("bench", pw)
                        with lock:
                            idle.append(c)
                return run

            workers = 8
            counts = [args.idle // workers + (1 if i < args.idle % workers else 0) for i in range(workers)]
            dt = run_parallel([opener(n) for n in counts])
            # every session answers, so the server holds them all
            for c in idle[:: max(1, len(idle) // 20)]:
                c.ok("NOOP")
            rss1 = vmrss_kib(srv.pid)
            rows.append(("IDLE", "%d more logged-in TLS sessions after %d warm-up (opened in %.1f s)"
                         % (len(idle), len(warm), dt),
                         "%+d KiB RSS" % (rss1 - rss0),
                         "%.1f KiB/session" % ((rss1 - rss0) / max(1, len(idle)))))
            rows.append(("", "RSS before / after", "%d KiB" % rss0, "%d KiB" % rss1))
            for c in idle + warm:
                c.close()
    finally:
        srv.close(check=False)

    print()
    print("command: " + " ".join([os.path.basename(sys.executable)] + sys.argv))
    print("binary:  " + h.STORE_BIN)
    print()
    w = [max(len(r[i]) for r in rows + [("what", "workload", "result", "time")]) for i in range(4)]
    fmt = "  ".join("%%-%ds" % x for x in w)
    print(fmt % ("what", "workload", "result", "time"))
    print(fmt % tuple("-" * x for x in w))
    for r in rows:
        print(fmt % r)


if __name__ == "__main__":
    main()
