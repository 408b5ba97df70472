#!/usr/bin/env python3
"""Summaries of tests/bench/run results (python3 stdlib + gnuplot).

  report.py --one LINE|-      one line per coffer-bench JSON result (progress)
  report.py --dir OUT         medians over rounds, ratios Coffer/Dovecot, CPU per
                              operation, machine limits, markdown tables; writes
                              OUT/plot.dat and OUT/benchmarks-throughput.png"""
import json
import os
import re
import statistics
import subprocess
import sys

UNITS = {
    "login": "sessions/s", "handshake": "handshakes/s", "append": "APPENDs/s",
    "fetch": "FETCHes/s", "mixed": "commands/s", "pop3-retr": "RETRs/s", "idle": "sessions",
}


def cpu_ms(j, prefix):
    """CPU ms per op of the trees named prefix or prefix:*."""
    tot, found = 0.0, False
    for name, t in (j.get("trees") or {}).items():
        if name == prefix or name.startswith(prefix + ":"):
            tot += t.get("cpu_ms_per_op", 0.0)
            found = True
    return tot if found else None


def mem_per_session(j, prefix, key):
    tot, found = 0.0, False
    for name, t in (j.get("trees") or {}).items():
        if name == prefix or name.startswith(prefix + ":"):
            tot += t.get(key, 0.0)
            found = True
    return tot / 1024 if found else None


def ckpt_overlap(j):
    """Did a store checkpoint run during this Coffer run? (from the node-1
    status the runner read before and after it: checkpoints taken, worker
    state). None when unknown."""
    b, a = j.get("ckpt_before"), j.get("ckpt_after")
    if not b or not a:
        return None
    b, a = b.split(), a.split()
    if len(b) != 3 or len(a) != 3 or b[0] != a[0] or b[0] == "0":
        return None
    return b[1] != a[1] or b[2] != "idle" or a[2] != "idle"


CKPT_MARK = " †"
CKPT_NOTE = ("† a Raft snapshot's checkpoint (a compacting copy of the whole store, written by "
             "every node) ran during at least one of the runs behind this figure: its CPU and "
             "disk time are in the Coffer figures of that row.")


def one(line):
    j = json.loads(line)
    if j.get("na"):
        print("  %-16s %-10s n/a%s" % (j["label"], j["system"],
                                     (" (%s)" % j["reason"]) if j.get("reason") else ""))
        return
    wall = (" [%ds]" % j["wall_s"]) if "wall_s" in j else ""
    sc = j.get("scenario", "?")
    if sc == "idle":
        sysname = j["system"]
        pre = "dovecot" if sysname == "nginx" else sysname
        parts = []
        for name in sorted((j.get("trees") or {})):
            t = j["trees"][name]
            parts.append("%s %.1f/%.1f KiB" % (name, t.get("rss_per_session", 0) / 1024,
                                                t.get("pss_per_session", 0) / 1024))
        print("  %-16s %-10s %d sessions, RSS/PSS per session: %s errors %d%s%s" % (
            j["label"], sysname, j.get("established", 0), "; ".join(parts), j.get("errors", 0),
            (" FATAL " + j["fatal"]) if j.get("fatal") else "", wall))
        del pre
        return
    trees = ", ".join("%s %.3f ms/op" % (n, t.get("cpu_ms_per_op", 0))
                      for n, t in sorted((j.get("trees") or {}).items()))
    if ckpt_overlap(j):
        wall += " [checkpoint during the run]"
    print("  %-16s %-10s %9.1f %s p50 %.2f ms p99 %.2f ms errors %d client CPU %.1fs/%.1fs; %s%s%s" % (
        j.get("label", ""), j.get("system", ""), j.get("rate", 0), UNITS.get(sc, "ops/s"),
        j.get("p50_ms", 0), j.get("p99_ms", 0), j.get("errors", 0), j.get("client_cpu_s", 0),
        j.get("duration_s", 0), trees, (" FATAL " + j["fatal"]) if j.get("fatal") else "", wall))


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def fmt(v, digits=1):
    if v is None:
        return "n/a"
    if abs(v) >= 100:
        return "%.0f" % v
    return ("%%.%df" % digits) % v


def ratio(a, b):
    if a is None or b is None or b == 0:
        return "n/a"
    return "%.2f" % (a / b)


def load(out):
    res = {}
    with open(os.path.join(out, "results.jsonl")) as f:
        for line in f:
            line = line.strip()
            if not line.startswith("{"):
                continue
            j = json.loads(line)
            res.setdefault((j["label"], j["system"]), []).append(j)
    return res


def report(out):
    res = load(out)
    meta = json.load(open(os.path.join(out, "meta.json")))
    lim = json.load(open(os.path.join(out, "limits.json")))
    labels = []
    for (label, _sys) in res:
        if label not in labels:
            labels.append(label)

    def runs(label, sysname):
        """Measured runs: not n/a, and not a failure without a single operation."""
        return [j for j in res.get((label, sysname), []) if not j.get("na") and
                not (j.get("fatal") and not j.get("total_ops"))]

    def na_text(label, sysname, default="n/a"):
        """'n/a (why)' for a system with no measured run of label."""
        why = []
        for j in res.get((label, sysname), []):
            w = j.get("reason") if j.get("na") else j.get("fatal")
            if w and w not in why:
                why.append(w)
        return "n/a (%s)" % "; ".join(why) if why else default

    def stat(label, sysname, fn):
        return med([fn(j) for j in runs(label, sysname)])

    def errs(label, sysname):
        return sum(j.get("errors", 0) for j in runs(label, sysname))

    p = print
    p("## Results %s (%s)" % (meta["date"], "quick" if meta["quick"] else "full"))
    p("")
    huge = any(l.startswith("append-10m") for l in labels)
    p("Machine: %d cores, %.1f GiB, kernel %s, data disk %s. Dovecot %s, nginx %s, "
      "OpenSSL %s, Coffer %s. Rounds %d x %s s per scenario%s; medians over rounds." % (
          meta["nproc"], meta["mem_gib"], meta["kernel"], meta["disk"], meta["dovecot"],
          meta["nginx"], meta["openssl"], meta["coffer_rev"], meta["rounds"], meta["duration"],
          " (10 MiB APPENDs: a fixed number per run, timed until the last one completes)"
          if huge else ""))
    p("")
    p("### Machine limits (same run)")
    p("")
    p("| limit | value |")
    p("| --- | --- |")
    p("| fio 4 KiB writes + fdatasync, one writer | %s/s (p50 %.3f ms) |" % (
        fmt(lim["fdatasync_per_s"]), lim["fdatasync_p50_ms"]))
    p("| loopback TCP, one stream (coffer-bench, one thread both ends) | %.1f Gbit/s |" % lim["loopback_gbit_s"])
    p("| loopback connect+accept+close | %s/s |" % fmt(lim["loopback_connects_s"]))
    p("| openssl speed ecdsap256 sign (certificate key type), one core | %s/s |" % fmt(lim["ecdsap256_sign_per_s"]))
    p("| openssl speed X25519 | %s/s |" % fmt(lim["x25519_per_s"]))
    p("| openssl speed AES-256-GCM 16 KiB blocks | %.0f MB/s |" % (lim.get("aes256gcm_16k_bytes_per_s", 0) / 1e6))
    p("")
    p("### Coffer vs Dovecot (direct)")
    p("")
    nodes = meta.get("store_nodes", 1)
    p("Rates are medians; ratio = Coffer / Dovecot (above 1 = Coffer higher). CPU ms/op is "
      "the server process tree's utime+stime per operation (lower is better). Coffer is "
      "reached directly on the leader of its %d-node store group; its CPU is that of every "
      "store node (the leader and the followers replicating each change), not of coffer-mmp. "
      "`login-tls-n10`: a user whose password hash uses scrypt N = 2^10 instead of the "
      "default 2^14 (auth.scrypt_log2n = 10), to show the login cost without most of the "
      "password hashing." % nodes)
    p("")
    marked = [False]
    p("| scenario | unit | Coffer | Dovecot | ratio | p99 ms C / D | CPU ms/op C / D | CPU ratio | errors C / D | Coffer vs limit |")
    p("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for label in labels:
        if label.startswith("idle") or label == "populate":
            continue
        c, d = runs(label, "coffer"), runs(label, "dovecot")
        allj = c + d
        if not allj and not res.get((label, "coffer")):
            continue
        sc = (allj[0]["scenario"] if allj else "")
        unit = UNITS.get(sc, "ops/s")
        cr = stat(label, "coffer", lambda j: j.get("rate"))
        dr = stat(label, "dovecot", lambda j: j.get("rate"))
        cp = stat(label, "coffer", lambda j: j.get("p99_ms"))
        dp = stat(label, "dovecot", lambda j: j.get("p99_ms"))
        cc = stat(label, "coffer", lambda j: cpu_ms(j, "coffer"))
        dc = stat(label, "dovecot", lambda j: cpu_ms(j, "dovecot"))
        limit = ""
        if cr is not None and sc == "append" and lim["fdatasync_per_s"]:
            mb = stat(label, "coffer", lambda j: j["ops"]["APPEND"]["bytes"] / j["duration_s"] / 1e6
                      if "APPEND" in j.get("ops", {}) else None)
            limit = "%.2f x fdatasync/s, %s MB/s" % (cr / lim["fdatasync_per_s"], fmt(mb))
        elif cr is not None and sc == "handshake" and lim["ecdsap256_sign_per_s"]:
            limit = "%.3f x ECDSA sign/s" % (cr / lim["ecdsap256_sign_per_s"])
        elif cr is not None and sc == "fetch":
            mb = stat(label, "coffer", lambda j: j["ops"]["FETCH"]["bytes"] / j["duration_s"] / 1e6
                      if "FETCH" in j.get("ops", {}) else None)
            if mb is not None:
                limit = "%.1f MB/s" % mb
        if not c and res.get((label, "coffer")):
            why = "n/a (plaintext login refused)" if "plain" in label else "n/a"
            if label.endswith("-n10"):
                why = "n/a (cluster was already running: no N = 2^10 user)"
            ctext = na_text(label, "coffer", why)
        else:
            ctext = fmt(cr)
            if any(ckpt_overlap(j) for j in c):
                ctext += CKPT_MARK
                marked[0] = True
        dtext = fmt(dr)
        if not d and res.get((label, "dovecot")):
            dtext = na_text(label, "dovecot")
        p("| %s | %s | %s | %s | %s | %s / %s | %s / %s | %s | %d / %d | %s |" % (
            label, unit, ctext, dtext, ratio(cr, dr), fmt(cp, 2), fmt(dp, 2), fmt(cc, 3),
            fmt(dc, 3), ratio(cc, dc), errs(label, "coffer"), errs(label, "dovecot"), limit))
    p("")
    if marked[0]:
        p(CKPT_NOTE)
        p("")
    p("### Memory per idle logged-in session")
    p("")
    fewer = []
    p("| scenario | system | sessions | RSS KiB/session | PSS KiB/session | processes after | errors |")
    p("| --- | --- | --- | --- | --- | --- | --- |")
    for label in labels:
        if not label.startswith("idle"):
            continue
        for sysname in ("coffer", "dovecot", "nginx", "coffer-mmp"):
            if (label, sysname) not in res:
                continue
            r = runs(label, sysname)
            if not r:
                why = "n/a (plaintext login refused)"
                if sysname == "coffer-mmp" and not meta.get("coffer_mmp"):
                    why = "n/a (no coffer-mmp in the deployment)"
                p("| %s | %s | %s | | | | |" % (label, sysname, na_text(label, sysname, why)))
                continue
            pre = sysname
            if sysname == "coffer-mmp":
                rss = med([mem_per_session(j, "coffer-mmp", "rss_per_session") for j in r])
                pss = med([mem_per_session(j, "coffer-mmp", "pss_per_session") for j in r])
                srss = med([mem_per_session(j, "coffer", "rss_per_session") for j in r])
                spss = med([mem_per_session(j, "coffer", "pss_per_session") for j in r])
                name = "coffer-mmp (+ the store nodes behind it: RSS %s, PSS %s)" % (
                    fmt(srss), fmt(spss))
            elif sysname == "nginx":
                rss = med([mem_per_session(j, "nginx", "rss_per_session") for j in r])
                pss = med([mem_per_session(j, "nginx", "pss_per_session") for j in r])
                drss = med([mem_per_session(j, "dovecot", "rss_per_session") for j in r])
                dpss = med([mem_per_session(j, "dovecot", "pss_per_session") for j in r])
                name = "nginx (+ Dovecot behind it: RSS %s, PSS %s)" % (fmt(drss), fmt(dpss))
            else:
                rss = med([mem_per_session(j, pre, "rss_per_session") for j in r])
                pss = med([mem_per_session(j, pre, "pss_per_session") for j in r])
                name = sysname
            procs = med([sum(t.get("procs_after", 0) for t in j["trees"].values()) for j in r])
            p("| %s | %s | %d | %s | %s | %s | %d |" % (
                label, name, r[0].get("established", 0), fmt(rss), fmt(pss), fmt(procs, 0),
                errs(label, sysname)))
            if sysname == "coffer-mmp" and 0 < r[0].get("sessions", 0) < meta.get("idle_sessions", 0):
                fewer.append(r[0]["sessions"])
    p("")
    if fewer:
        p("coffer-mmp held %d sessions, not %d: it is one process with two descriptors per "
          "proxied session, and the hard RLIMIT_NOFILE here (which even root could not raise) "
          "allows no more. The figures are per session." % (min(fewer), meta["idle_sessions"]))
        p("")
    p("### Proxy: nginx mail proxy (in front of the Dovecot above) vs coffer-mmp (in front of the Coffer group above)")
    p("")
    p("CPU ms/op per process tree. nginx passes the password to Dovecot over plain TCP; "
      "coffer-mmp always logs in to the store over TLS (session resumption) with its client "
      "certificate, and the store checks the password (scrypt).")
    p("")
    p("| scenario | nginx rate | p99 ms | nginx CPU | auth_http CPU | Dovecot CPU "
      "| coffer-mmp rate | p99 ms | coffer-mmp CPU | store nodes CPU | rate ratio mmp / nginx |")
    p("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    marked[0] = False
    for label in labels:
        if label.startswith("idle") or label == "populate":
            continue
        if (label, "nginx") not in res and (label, "coffer-mmp") not in res:
            continue
        r = runs(label, "nginx")
        m = runs(label, "coffer-mmp")
        unit = ""
        for j in r + m:
            unit = UNITS.get(j.get("scenario"), "")
            break
        nr = med([j.get("rate") for j in r])
        mr = med([j.get("rate") for j in m])
        if (label, "nginx") in res:
            ntext = [fmt(nr) + " " + unit if r else na_text(label, "nginx"), fmt(med([j.get("p99_ms") for j in r]), 2),
                     fmt(med([cpu_ms(j, "nginx") for j in r]), 3),
                     fmt(med([cpu_ms(j, "auth_http") for j in r]), 3),
                     fmt(med([cpu_ms(j, "dovecot") for j in r]), 3)]
        else:
            ntext = ["(not run: no password hash in this Dovecot)", "", "", "", ""]
        if m:
            mark = CKPT_MARK if any(ckpt_overlap(j) for j in m) else ""
            marked[0] = marked[0] or bool(mark)
            mtext = [fmt(mr) + " " + unit + mark, fmt(med([j.get("p99_ms") for j in m]), 2),
                     fmt(med([cpu_ms(j, "coffer-mmp") for j in m]), 3),
                     fmt(med([cpu_ms(j, "coffer") for j in m]), 3)]
        else:
            why = "n/a"
            if not meta.get("coffer_mmp"):
                why = "n/a (no coffer-mmp in the deployment)"
            elif "plain" in label:
                why = "n/a (plaintext login refused)"
            mtext = [na_text(label, "coffer-mmp", why), "", "", ""]
        p("| %s | %s | %s | %s |" % (label, " | ".join(ntext), " | ".join(mtext), ratio(mr, nr)))
    p("")
    if marked[0]:
        p(CKPT_NOTE)
        p("")
    mixed_breakdown(p, labels, runs)
    plot(out, res, runs, nodes)


def mixed_breakdown(p, labels, runs):
    """Per command of the mixed scenario: rate and latency, Coffer vs Dovecot
    (which command dominates the time)."""
    for label in labels:
        if not label.startswith("mixed"):
            continue
        c, d = runs(label, "coffer"), runs(label, "dovecot")
        if not c and not d:
            continue
        p("### `%s` per command" % label)
        p("")
        p("Each client runs APPEND, FETCH, STORE +FLAGS, SEARCH, STORE \\\\Deleted, EXPUNGE in "
          "turn (one command in flight per client), so a slow command holds back all the "
          "others; time share = that command's count x mean latency over the same sum for all "
          "commands (medians over rounds).")
        p("")
        p("| command | Coffer rate/s | mean ms | p99 ms | time share | Dovecot rate/s | mean ms | p99 ms | time share |")
        p("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        names = []
        for j in c + d:
            for k in j.get("ops", {}):
                if k in ("LOGIN", "LOGOUT", "SELECT", "CONNECT", "HANDSHAKE") or k in names:
                    continue
                names.append(k)

        def cols(rs, k):
            if not rs:
                return ["n/a", "", "", ""]
            rate = med([j["ops"].get(k, {}).get("rate") for j in rs])
            p50 = med([j["ops"].get(k, {}).get("mean_ms", j["ops"].get(k, {}).get("p50_ms"))
                       for j in rs])
            p99 = med([j["ops"].get(k, {}).get("p99_ms") for j in rs])
            shares = []
            for j in rs:
                def busy(o):
                    return o.get("count", 0) * o.get("mean_ms", o.get("p50_ms", 0))
                tot = sum(busy(o) for n, o in j["ops"].items() if n in names)
                shares.append(busy(j["ops"].get(k, {})) / tot if tot else None)
            sh = med(shares)
            return [fmt(rate), fmt(p50, 2), fmt(p99, 2), "%.0f%%" % (100 * sh) if sh is not None else "n/a"]
        for k in names:
            p("| %s | %s | %s |" % (k, " | ".join(cols(c, k)), " | ".join(cols(d, k))))
        p("")


def plot(out, res, runs, nodes=1):
    """APPEND 4 KiB throughput and p99 against client count, per system."""
    ctitle = "Coffer (%d-node group)" % nodes if nodes > 1 else "Coffer"
    rows = {}
    for (label, sysname) in res:
        m = re.match(r"append-4k-c(\d+)$", label)
        if not m:
            continue
        r = runs(label, sysname)
        if not r:
            continue
        rows.setdefault(int(m.group(1)), {})[sysname] = (
            med([j.get("rate") for j in r]), med([j.get("p99_ms") for j in r]))
    if not rows:
        return
    dat = os.path.join(out, "plot.dat")
    with open(dat, "w") as f:
        f.write("# clients coffer_rate dovecot_rate coffer_p99_ms dovecot_p99_ms\n")
        for n in sorted(rows):
            c = rows[n].get("coffer", (None, None))
            d = rows[n].get("dovecot", (None, None))
            f.write("%d %s %s %s %s\n" % (n, c[0] if c[0] is not None else "NaN",
                                          d[0] if d[0] is not None else "NaN",
                                          c[1] if c[1] is not None else "NaN",
                                          d[1] if d[1] is not None else "NaN"))
    png = os.path.join(out, "benchmarks-throughput.png")
    script = """
set terminal pngcairo size 1000,420 font ",10"
set output '%s'
set multiplot layout 1,2 title 'APPEND 4 KiB over TLS (medians)'
set logscale x 2
set xlabel 'concurrent clients'
set key top left
set grid
set ylabel 'APPENDs/s'
set yrange [0:*]
plot '%s' using 1:2 with linespoints lw 2 title '%s', '' using 1:3 with linespoints lw 2 title 'Dovecot 2.3'
set ylabel 'p99 latency (ms)'
set logscale y
set yrange [*:*]
plot '%s' using 1:4 with linespoints lw 2 title '%s', '' using 1:5 with linespoints lw 2 title 'Dovecot 2.3'
unset multiplot
""" % (png, dat, ctitle, dat, ctitle)
    try:
        subprocess.run(["gnuplot"], input=script.encode(), check=True, timeout=60)
        print("plot: %s" % png)
    except (OSError, subprocess.SubprocessError) as e:
        print("plot: gnuplot failed: %s" % e)


def main():
    if len(sys.argv) == 3 and sys.argv[1] == "--one":
        if sys.argv[2] == "-":
            for line in sys.stdin:
                if line.startswith("{"):
                    one(line)
        else:
            one(sys.argv[2])
        return 0
    if len(sys.argv) == 3 and sys.argv[1] == "--dir":
        report(sys.argv[2])
        return 0
    print(__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(main())
