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

With --checkpoint-gib N (issue 3, a separate run): memory of checkpoints on
a store of N GiB. Two voters are filled with N GiB of 50 MiB APPENDs
(raft.snapshot_bytes makes libraft snapshot every --snapshot-mib of entry
bytes, each snapshot starts a checkpoint copy on a worker thread); then a
third, empty node is added: it is behind the compacted log, so it fetches
the newest checkpoint as a stream and installs it. /proc/PID/status is
sampled every 50 ms: peak VmRSS split into RssAnon (heap: what the process
itself holds) and RssFile (pages of the LMDB map and files, page cache that
the kernel can drop), for the leader while it writes checkpoints and while
it serves one, and for the new node while it fetches and installs. The
term is checked at the end (no election while checkpoints are written or
served).

Usage: COFFER_BUILD_DIR=build python3 tests/bench/replication.py [--seconds 10]
       [--kills 20] [--clients 1,8,64]
       COFFER_BUILD_DIR=build python3 tests/bench/replication.py --checkpoint-gib 2
"""

import argparse
import glob
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


def proc_mem(pid):
    """(VmRSS, RssAnon, RssFile) in KiB, or None when the process is gone."""
    out = {}
    try:
        with open("/proc/%d/status" % pid) as f:
            for line in f:
                k = line.split(":")[0]
                if k in ("VmRSS", "RssAnon", "RssFile"):
                    out[k] = int(line.split()[1])
    except OSError:
        return None
    return out.get("VmRSS", 0), out.get("RssAnon", 0), out.get("RssFile", 0)


class MemSampler(threading.Thread):
    """Samples processes every 50 ms; peaks are kept per (pid, phase)."""

    def __init__(self):
        super().__init__(daemon=True)
        self.pids = {}
        self.phase = "start"
        self.peaks = {}
        self.stop_ev = threading.Event()

    def run(self):
        while not self.stop_ev.is_set():
            for name, pid in list(self.pids.items()):
                m = proc_mem(pid)
                if m is None:
                    continue
                key = (name, self.phase)
                old = self.peaks.get(key, (0, 0, 0))
                self.peaks[key] = tuple(max(a, b) for a, b in zip(old, m))
            time.sleep(0.05)


def big_message(k, size):
    head = (b"From: b@coffer.test\r\nSubject: big %d\r\nMessage-ID: <big-%d@coffer.test>\r\n"
            b"\r\n" % (k, k))
    line = (b"%08d " % k) + b"z" * 68 + b"\r\n"
    return head + line * ((size - len(head)) // len(line))


def checkpoint_bench(a):
    size = 50 * 1024 * 1024 - 64 * 1024
    count = int(a.checkpoint_gib * 1024 * 1024 * 1024 // size) + 1
    if a.snapshot_threshold <= count + 4:
        raise SystemExit("--snapshot-threshold must exceed the %d filling APPENDs" % count)
    c = h.Cluster(2, "bench-ckpt", config={
        "node.log_level": "info",
        "raft.election_timeout": "5s",
        "raft.heartbeat": "250ms",
        "raft.snapshot_threshold": str(a.snapshot_threshold),
        "raft.snapshot_trailing": "4",
        "raft.snapshot_bytes": "%dM" % a.snapshot_mib,
        "lmdb.map_size": "%dG" % (int(a.checkpoint_gib) * 2 + 4),
    })
    sampler = MemSampler()
    try:
        c.form()
        leader = c.leader()
        term0 = leader.status()["term"]
        for n in c.live():
            sampler.pids["node%d" % n.id] = n.pid
        sampler.start()
        sampler.phase = "fill"
        conn = c.login(leader, timeout=120)
        t0 = time.monotonic()
        for k in range(count):
            _, t = conn.command("APPEND INBOX ", ch.Lit(big_message(k, size)), timeout=600)
            if not ch.ok(t):
                raise AssertionError(t)
        conn.close()
        fill = time.monotonic() - t0
        print("filled %d x %.1f MiB = %.2f GiB in %.0f s (%.1f MiB/s replicated)" % (
            count, size / 1048576, count * size / 1073741824, fill, count * size / 1048576 / fill))
        # wait until the leader's checkpoint covers its last snapshot
        sampler.phase = "checkpoint"
        deadline = time.monotonic() + 1800
        while True:
            st = leader.status(timeout=300)
            if st and st["checkpoint_state"] == "idle" and st["checkpoint_applied"] >= \
                    st["last_snapshot"] > 0:
                break
            if time.monotonic() > deadline:
                raise AssertionError("no checkpoint: %r" % st)
            time.sleep(2)
        # the writer alone: a quiet baseline, then a few small APPENDs reach
        # raft.snapshot_threshold and one more checkpoint of the whole store
        # is written while the sampler watches
        sampler.phase = "quiet"
        time.sleep(3)
        sampler.phase = "take"
        snap0 = st["last_snapshot"]
        conn = c.login(leader, timeout=120)
        k = 0
        while True:
            k += 1
            _, t = conn.command("APPEND INBOX ", ch.Lit(big_message(10000 + k, 4096)), timeout=60)
            if not ch.ok(t):
                raise AssertionError(t)
            if k % 5 == 0:
                st = leader.status(timeout=300)
                if st["last_snapshot"] > snap0:
                    break
            if k > 2 * a.snapshot_threshold:
                raise AssertionError("no snapshot after %d small APPENDs" % k)
        conn.close()
        while True:
            st = leader.status(timeout=300)
            if st and st["checkpoint_state"] == "idle" and st["checkpoint_applied"] >= \
                    st["last_snapshot"]:
                break
            time.sleep(2)
        sampler.phase = "settled"
        ck = sorted(glob.glob(os.path.join(leader.data_dir, "checkpoints", "ckpt-*.mdb")))[-1]
        print("leader: %d checkpoints written, newest %s: %.2f GiB" % (
            st["checkpoints_taken"], os.path.basename(ck), os.path.getsize(ck) / 1073741824))
        for line in leader.log().splitlines():
            if b"checkpoint: wrote" in line:
                print("  " + line.decode(errors="replace").split(": ", 2)[-1])
        # a new node: fetch + install
        n3 = c.add_node_object(3)
        n3.start()
        sampler.pids["node3"] = n3.pid
        sampler.phase = "install"
        t0 = time.monotonic()
        leader.ctl("node", "add", n3.admin_address, timeout=3600)
        n3.wait_log(rb"checkpoint: installed", 3600)
        inst = time.monotonic() - t0
        n3.wait_log(rb"coffer-store ready:", 600)
        sampler.phase = "after"
        for line in n3.log().splitlines():
            if b"checkpoint: fetched" in line or b"checkpoint: installed" in line:
                print("  node3 " + line.decode(errors="replace").split(": ", 2)[-1])
        print("node 3 added and installed in %.0f s" % inst)
        time.sleep(1)
        sampler.stop_ev.set()
        sampler.join(2)
        for (name, phase), (rss, anon, fil) in sorted(sampler.peaks.items()):
            print("%-6s %-10s peak VmRSS %7.0f MiB  RssAnon %6.0f MiB  RssFile %7.0f MiB" % (
                name, phase, rss / 1024, anon / 1024, fil / 1024))
        terms = {n.id: (n.status(timeout=300) or {}).get("term") for n in c.live()}
        print("terms at the end: %r (start %d)" % (terms, term0))
    finally:
        sampler.stop_ev.set()
        c.close(check=False)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--clients", default="1,8,64")
    ap.add_argument("--checkpoint-gib", type=float, default=0)
    ap.add_argument("--snapshot-mib", type=int, default=1024)
    ap.add_argument("--snapshot-threshold", type=int, default=64)
    a = ap.parse_args()
    if a.checkpoint_gib > 0:
        checkpoint_bench(a)
        return
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
