#!/usr/bin/env python3
"""Replication benchmark (not a timed test): a three-node group on this host.

  - replicated APPEND/s of 4 KiB messages with 1, 8 and 64 concurrent IMAP
    clients (implicit TLS) on the leader, and the APPEND latency p50/p99 as
    the client sees it (commit on a quorum + local apply + the IMAP round
    trip). The load comes from the C load generator coffer-bench
    (<build>/tests/bench/coffer-bench, or COFFER_BENCH_BIN) with --tree on
    every node, so the server CPU per APPEND of each node is reported; the
    Python TLS clients (--python-clients, or when coffer-bench is not built)
    give lower bounds. Each client count appends as its own user, and every
    message carries a unique Message-ID (coffer-bench numbers its messages;
    the Python messages carry a per-run nonce), so no APPEND is a duplicate;
  - time from SIGKILL of the leader to (a) a node greeting with OK (it leads)
    and (b) the first committed APPEND on it (fresh TLS connection, LOGIN,
    APPEND), p50/p99/max over --kills kills; after each kill the killed node
    is restarted and every wait (new leader, restart, all three nodes at the
    same applied index and digest) is bounded by --failover-timeout before
    the next kill. Raft settings are the product defaults (election_timeout
    1s, heartbeat 100ms unless --election-timeout / --heartbeat are given;
    snapshot_threshold 16384, snapshot_trailing 512, snapshot_bytes 1G);
  - the disk's fdatasync rate (4 KiB writes, one writer) in the group's data
    dir, before and after the APPEND runs of the same run (the script's own
    loop and, when installed, fio), so the ratio to the physical limit shows.

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
       [--kills 20] [--clients 1,8,64] [--python-clients] [--json FILE]
       COFFER_BUILD_DIR=build python3 tests/bench/replication.py --checkpoint-gib 2
"""

import argparse
import glob
import json
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "e2e"))
import cluster_harness as h  # noqa: E402
import coffer_harness as ch  # noqa: E402

BODY = b"x" * 4000
# a per-run nonce in every Message-ID: the store may deduplicate an APPEND
# whose message is byte-identical to a recent one, and a benchmark must not
# measure that shortcut
NONCE = "%d.%s" % (os.getpid(), secrets.token_hex(6))
BENCH_BIN = os.environ.get("COFFER_BENCH_BIN") or os.path.join(ch.BUILD_DIR, "tests", "bench",
                                                                "coffer-bench")


def message(k, i):
    return (b"From: b@coffer.test\r\nSubject: bench %d-%d\r\nMessage-ID: <%d.%d.%s@bench.coffer.test>"
            b"\r\n\r\n" % (k, i, k, i, NONCE.encode())) + BODY + b"\r\n"


def pct(v, p):
    v = sorted(v)
    return v[min(len(v) - 1, int(len(v) * p))] if v else float("nan")


def fdatasync_rate(directory, seconds=3.0):
    """4 KiB sequential writes, fdatasync after each, one writer (the same
    pattern as a Raft log append), in the group's data directory."""
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


def fio_fdatasync(directory, seconds=3):
    """fio's figure for the same pattern (as tests/bench/run measures it), or
    None without fio."""
    fio = shutil.which("fio")
    if not fio:
        return None
    try:
        r = subprocess.run([fio, "--name=fdatasync", "--directory=" + directory,
                            "--filename=bench-fio.tmp", "--size=64m", "--bs=4k", "--rw=write",
                            "--ioengine=sync", "--fdatasync=1", "--runtime=%d" % seconds,
                            "--time_based", "--output-format=json"],
                           capture_output=True, timeout=seconds + 60, stdin=subprocess.DEVNULL)
        j = json.loads(r.stdout.decode())["jobs"][0]
        p50 = j["sync"]["lat_ns"]["percentile"].get("50.000000", 0) / 1e6
        return j["write"]["iops"], p50
    except Exception:  # noqa: BLE001 - optional figure
        return None
    finally:
        try:
            os.unlink(os.path.join(directory, "bench-fio.tmp"))
        except OSError:
            pass


def cpu_s(pid):
    """utime+stime of one process, seconds (None when gone)."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def run_clients_python(c, nclients, seconds, user):
    """Python TLS clients: a lower bound (the clients' own CPU competes with
    the nodes on this host). Only used without coffer-bench."""
    leader = c.leader()
    lat = []
    counts = [0] * nclients
    stop = time.monotonic() + seconds
    lock = threading.Lock()

    def worker(k):
        conn = c.login(leader, user=user, timeout=60)
        i = 0
        mine = []
        while time.monotonic() < stop:
            m = message(k, i + 1000000 * nclients)
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

    nodes = c.live()
    cpu0 = {n.id: cpu_s(n.pid) for n in nodes}
    ts = [threading.Thread(target=worker, args=(k,)) for k in range(nclients)]
    t0 = time.monotonic()
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    el = time.monotonic() - t0
    total = sum(counts)
    cpu = {}
    for n in nodes:
        a, b = cpu0.get(n.id), cpu_s(n.pid)
        if a is not None and b is not None:
            cpu["node%d%s" % (n.id, "-leader" if n is leader else "")] = (b - a) * 1000 / max(total, 1)
    return {"tool": "python", "clients": nclients, "rate": total / el, "total_ops": total,
            "p50_ms": pct(lat, 0.5) * 1000, "p99_ms": pct(lat, 0.99) * 1000,
            "p999_ms": pct(lat, 0.999) * 1000, "errors": 0, "cpu_ms_per_op": cpu,
            "client_cpu_ms_per_op": None}


def run_clients_bench(c, nclients, seconds, user):
    """coffer-bench --scenario append (C, one libuv loop, implicit TLS) against
    the leader, with the CPU of every node (--tree) per APPEND."""
    leader = c.leader()
    argv = [BENCH_BIN, "--scenario", "append", "--host", h.HOST, "--port", str(leader.imaps_port),
            "--tls", "implicit", "--ca", c.ca_file, "--sni", ch.TLS_NAME, "--user", user,
            "--pass", c.passwords[user], "--clients", str(nclients), "--duration", str(seconds),
            "--size", "4096", "--mailbox", "INBOX", "--timeout", "120",
            "--label", "repl-append-4k-c%d" % nclients, "--system", "coffer-3node"]
    for n in c.live():
        argv += ["--tree", "node%d%s=%d" % (n.id, "-leader" if n is leader else "", n.pid)]
    r = subprocess.run(argv, capture_output=True, stdin=subprocess.DEVNULL,
                       timeout=seconds + 600)
    out = r.stdout.decode(errors="replace")
    sys.stdout.write("".join("  | " + ln + "\n" for ln in out.splitlines()
                             if ln and not ln.startswith("{")))
    js = [ln for ln in out.splitlines() if ln.startswith("{")]
    if not js:
        raise AssertionError("coffer-bench failed (%d): %s %s" % (
            r.returncode, out, r.stderr.decode(errors="replace")))
    j = json.loads(js[-1])
    if r.returncode != 0 or j.get("fatal"):
        raise AssertionError("coffer-bench: %s" % js[-1])
    j["tool"] = "coffer-bench"
    j["cpu_ms_per_op"] = {k: v["cpu_ms_per_op"] for k, v in j.get("trees", {}).items()}
    j["client_cpu_ms_per_op"] = j["client_cpu_s"] * 1000 / max(j["total_ops"], 1)
    return j


def failover(c, kills, timeout):
    """SIGKILL the leader; time until a node greets with OK (it leads and
    serves IMAP) and until an APPEND on it is committed (a fresh TLS
    connection + LOGIN + APPEND, as a client that lost its server would
    do). Then restart the killed node and wait, bounded, until all three
    report the same applied index and digest before the next kill."""
    out = []
    for k in range(kills):
        leader = c.leader(timeout=timeout)
        term0 = (leader.status(timeout=30) or {}).get("term")
        t0 = time.monotonic()
        leader.kill()
        t_lead = None
        deadline = t0 + timeout
        done = False
        while not done:
            if time.monotonic() > deadline:
                raise AssertionError("kill %d: no committed APPEND within %.0f s" % (k, timeout))
            for n in c.live():
                try:
                    conn = n.raw_imap(timeout=10)
                except (OSError, EOFError, TimeoutError):
                    continue
                try:
                    if not conn.greeting.startswith(b"* OK"):
                        continue
                    if t_lead is None:
                        t_lead = time.monotonic() - t0
                    conn.login("alice", c.passwords["alice"])
                    _, t = conn.command("APPEND INBOX ", ch.Lit(message(999, k)), timeout=30)
                    if ch.ok(t):
                        out.append((t_lead, time.monotonic() - t0, n.id))
                        done = True
                        break
                except Exception:  # noqa: BLE001 - not (or no longer) the leader
                    pass
                finally:
                    conn.close()
            if not done:
                time.sleep(0.01)
        t_fail = out[-1][1]
        since = leader.start()
        leader.wait_log(rb"coffer-store ready:", timeout, since=since)
        c.wait_converged(timeout=timeout)
        st = c.statuses()
        terms = sorted({s.get("term") for s in st.values()})
        print("  kill %2d: node %d (term %s) -> node %d leads after %.3f s, "
              "APPEND committed after %.3f s; healthy again after %.1f s (terms %s)" % (
                  k + 1, leader.id, term0, out[-1][2], out[-1][0], t_fail,
                  time.monotonic() - t0, terms))
        sys.stdout.flush()
    return out


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
    head = (b"From: b@coffer.test\r\nSubject: big %d\r\nMessage-ID: <big-%d.%s@coffer.test>\r\n"
            b"\r\n" % (k, k, NONCE.encode()))
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
        deadline = time.monotonic() + 1800
        while True:
            st = leader.status(timeout=300)
            if st and st["checkpoint_state"] == "idle" and st["checkpoint_applied"] >= \
                    st["last_snapshot"]:
                break
            if time.monotonic() > deadline:
                raise AssertionError("checkpoint not written: %r" % st)
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
    ap.add_argument("--python-clients", action="store_true",
                    help="use the Python TLS clients even when coffer-bench is built")
    ap.add_argument("--election-timeout", default="1s", help="raft.election_timeout (default: "
                    "the product default, 1s)")
    ap.add_argument("--heartbeat", default="100ms", help="raft.heartbeat (product default)")
    ap.add_argument("--failover-timeout", type=float, default=120,
                    help="bound of every wait of one kill (new leader, restart, catch-up)")
    ap.add_argument("--json", help="write every figure to this file")
    ap.add_argument("--checkpoint-gib", type=float, default=0)
    ap.add_argument("--snapshot-mib", type=int, default=1024)
    ap.add_argument("--snapshot-threshold", type=int, default=64)
    a = ap.parse_args()
    if a.checkpoint_gib > 0:
        checkpoint_bench(a)
        return
    use_bench = not a.python_clients and os.access(BENCH_BIN, os.X_OK)
    print("store binary %s; APPEND load: %s; nonce %s" % (
        ch.STORE_BIN, BENCH_BIN if use_bench else "Python TLS clients (lower bound)", NONCE))
    res = {"store_bin": ch.STORE_BIN, "tool": "coffer-bench" if use_bench else "python",
           "election_timeout": a.election_timeout, "heartbeat": a.heartbeat, "append": []}
    # the product's Raft defaults (the e2e harness raises the snapshot
    # threshold to 100000 entries, which a benchmark must not inherit)
    c = h.Cluster(3, "bench-repl", config={"node.log_level": "warn",
                                           "raft.election_timeout": a.election_timeout,
                                           "raft.heartbeat": a.heartbeat,
                                           "raft.snapshot_threshold": "16384",
                                           "raft.snapshot_trailing": "512",
                                           "raft.snapshot_bytes": "1G"})
    try:
        c.form()
        print("group data dirs under %s; node pids %s" % (
            c.tmp, {n.id: n.pid for n in c.live()}))
        res["fdatasync_before"] = fdatasync_rate(c.tmp)
        res["fio_before"] = fio_fdatasync(c.tmp)
        print("fdatasync/s (4 KiB, data dir, before): %.0f; fio: %s" % (
            res["fdatasync_before"], res["fio_before"]))
        for n in [int(x) for x in a.clients.split(",")]:
            # one user per run: no message of one run equals one of another
            user = "bench-c%d" % n
            c.add_user(user)
            j = (run_clients_bench if use_bench else run_clients_python)(c, n, a.seconds, user)
            j["loadavg_after"] = os.getloadavg()
            res["append"].append(j)
            print("  (load average after the run: %.2f %.2f %.2f)" % j["loadavg_after"])
            print("clients %3d: %7.0f APPEND/s  latency p50 %6.2f ms  p99 %6.2f ms  errors %d  "
                  "server CPU ms/APPEND %s  client CPU ms/APPEND %s" % (
                      n, j["rate"], j["p50_ms"], j["p99_ms"], j["errors"],
                      {k: round(v, 3) for k, v in j["cpu_ms_per_op"].items()},
                      "%.3f" % j["client_cpu_ms_per_op"] if j["client_cpu_ms_per_op"] else "-"))
            sys.stdout.flush()
        res["fdatasync_after"] = fdatasync_rate(c.tmp)
        res["fio_after"] = fio_fdatasync(c.tmp)
        print("fdatasync/s (4 KiB, data dir, after): %.0f; fio: %s" % (
            res["fdatasync_after"], res["fio_after"]))
        fs = (res["fdatasync_before"] + res["fdatasync_after"]) / 2
        for j in res["append"]:
            print("clients %3d: %.2f x fdatasync/s" % (j["clients"], j["rate"] / fs))
        if a.kills:
            t = failover(c, a.kills, a.failover_timeout)
            lead = [x[0] for x in t]
            comm = [x[1] for x in t]
            res["failover"] = t
            print("failover over %d kills (election timeout %s, heartbeat %s; load average "
                  "now %.2f %.2f %.2f):" % ((len(t), a.election_timeout, a.heartbeat)
                                          + os.getloadavg()))
            print("  SIGKILL -> new leader greets OK:      p50 %.3f s  p99 %.3f s  max %.3f s" % (
                statistics.median(lead), pct(lead, 0.99), max(lead)))
            print("  SIGKILL -> first committed APPEND:    p50 %.3f s  p99 %.3f s  max %.3f s  "
                  "min %.3f s" % (statistics.median(comm), pct(comm, 0.99), max(comm),
                                  min(comm)))
        res["peak_rss_kib"] = {}
        for n in c.live():
            res["peak_rss_kib"][n.id] = rss_kb(n.pid)
            m = proc_mem(n.pid) or (0, 0, 0)
            st = n.status(timeout=30) or {}
            print("node %d peak RSS %d KiB; now VmRSS %d KiB (RssAnon %d, RssFile %d); "
                  "applied %s, last snapshot %s, checkpoints taken %s" % (
                      n.id, rss_kb(n.pid), m[0], m[1], m[2], st.get("applied"),
                      st.get("last_snapshot"), st.get("checkpoints_taken")))
        if a.json:
            with open(a.json, "w") as f:
                json.dump(res, f, indent=1)
    finally:
        c.close(check=False)


if __name__ == "__main__":
    main()
