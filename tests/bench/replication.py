#!/usr/bin/env python3
"""Replication benchmark (not a timed test): a three-node group on this host.

  - replicated APPEND/s of 4 KiB messages with 1, 8 and 64 concurrent IMAP
    clients (TLS), and the APPEND latency p50/p99 as the client sees it
    (commit on a quorum + local apply + the IMAP round trip);
  - time from SIGKILL of the leader to the first committed APPEND on the new
    leader, p50/p99 over --kills kills (the killed node is restarted between
    kills);
  - the disk's fdatasync rate (4 KiB writes) in the group's data dir, measured
    in the same run, so the ratio to the physical limit shows.

Usage: COFFER_BUILD_DIR=build python3 tests/bench/replication.py [--seconds 10]
       [--kills 20] [--clients 1,8,64]
"""

import argparse
import os
import statistics
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "e2e"))
import cluster_harness as h  # noqa: E402
import coffer_harness as ch  # noqa: E402

BODY = b"x" * 4000


def message(k, i):
    return (b"From: b@coffer.test\r\nSubject: bench %d-%d\r\n\r\n" % (k, i)) + BODY + b"\r\n"


def pct(v, p):
    v = sorted(v)
    return v[min(len(v) - 1, int(len(v) * p))] if v else float("nan")


def fdatasync_rate(directory, seconds=3.0):
    path = os.path.join(directory, "fsync-probe")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    buf = b"\0" * 4096
    n = 0
    t0 = time.monotonic()
    try:
        while time.monotonic() - t0 < seconds:
            os.write(fd, buf)
            os.fdatasync(fd)
            n += 1
    finally:
        os.close(fd)
        os.unlink(path)
    return n / (time.monotonic() - t0)


def run_clients(c, nclients, seconds):
    leader = c.leader()
    lat = []
    counts = [0] * nclients
    stop = time.monotonic() + seconds
    lock = threading.Lock()

    def worker(k):
        conn = c.login(leader, timeout=60)
        i = 0
        mine = []
        while time.monotonic() < stop:
            m = message(k, i)
            t0 = time.monotonic()
            # one send per command (two small writes would meet Nagle and
            # delayed ACKs on the client side and measure 40 ms stalls)
            tag = conn.next_tag()
            conn.send(b"%s APPEND INBOX {%d+}\r\n%s\r\n" % (tag.encode(), len(m), m))
            t = conn.wait_tagged(tag, timeout=60)
            if not ch.ok(t):
                raise AssertionError(t)
            mine.append(time.monotonic() - t0)
            i += 1
        counts[k] = i
        with lock:
            lat.extend(mine)
        conn.close()

    ts = [threading.Thread(target=worker, args=(k,)) for k in range(nclients)]
    t0 = time.monotonic()
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    el = time.monotonic() - t0
    return sum(counts) / el, pct(lat, 0.5) * 1000, pct(lat, 0.99) * 1000


def failover(c, kills):
    times = []
    for k in range(kills):
        leader = c.leader()
        leader.kill()
        t0 = time.monotonic()
        done = False
        while not done:
            for n in c.live():
                try:
                    conn = c.login(n, timeout=10)
                except Exception:  # noqa: BLE001 - not the leader yet
                    continue
                try:
                    _, t = conn.command("APPEND INBOX ", ch.Lit(message(999, k)), timeout=30)
                    if ch.ok(t):
                        times.append(time.monotonic() - t0)
                        done = True
                        break
                except Exception:  # noqa: BLE001
                    pass
                finally:
                    conn.close()
            time.sleep(0.01)
        leader.start()
        leader.wait_log(rb"coffer-store ready:", 120)
        c.wait_converged(timeout=120)
    return times


def rss_kb(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--clients", default="1,8,64")
    a = ap.parse_args()
    c = h.Cluster(3, "bench-repl", config={"node.log_level": "warn"})
    try:
        c.form()
        print("fdatasync/s (4 KiB, data dir): %.0f" % fdatasync_rate(c.tmp))
        for n in [int(x) for x in a.clients.split(",")]:
            rate, p50, p99 = run_clients(c, n, a.seconds)
            print("clients %3d: %7.0f APPEND/s  latency p50 %6.1f ms  p99 %6.1f ms"
                  % (n, rate, p50, p99))
        print("fdatasync/s (4 KiB, data dir, after): %.0f" % fdatasync_rate(c.tmp))
        if a.kills:
            t = failover(c, a.kills)
            print("failover (SIGKILL leader -> first committed APPEND) over %d kills: "
                  "p50 %.2f s  p99 %.2f s  max %.2f s" % (len(t), statistics.median(t),
                                                          pct(t, 0.99), max(t)))
        for n in c.live():
            print("node %d peak RSS %d KiB" % (n.id, rss_kb(n.pid)))
    finally:
        c.close(check=False)


if __name__ == "__main__":
    main()
