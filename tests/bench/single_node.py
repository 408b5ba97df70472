#!/usr/bin/env python3
"""Single-node throughput (not a test): starts one coffer-store (the e2e
harness, in a temp dir) and drives it with coffer-bench over IMAPS: APPEND of
4 KiB messages with 1, 8 and 64 clients, then FETCH of whole bodies and of
headers with 8 clients. Prints coffer-bench's JSON line per run, which carries
the rate, p50/p99/p99.9 latency, errors and the store's CPU ms per operation.

  python3 tests/bench/single_node.py [--build-dir build] [--seconds 8]
"""
import argparse
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--build-dir", default=os.path.join(HERE, "..", "..", "build"))
    ap.add_argument("--seconds", type=int, default=8)
    args = ap.parse_args()
    os.environ["COFFER_BUILD_DIR"] = os.path.abspath(args.build_dir)
    sys.path.insert(0, os.path.join(HERE, "..", "e2e"))
    import coffer_harness as h  # noqa: E402  (reads COFFER_BUILD_DIR)

    bench = os.path.join(os.environ["COFFER_BUILD_DIR"], "tests", "bench", "coffer-bench")
    srv = h.CofferServer(name="single-node-bench")
    base = [bench, "--port", str(srv.imaps_port), "--tls", "implicit", "--ca", srv.ca_file,
            "--sni", h.TLS_NAME, "--user", "alice", "--pass", srv.passwords["alice"],
            "--tree", "store=%d" % srv.pid, "--quiet"]
    runs = [["--scenario", "append", "--size", "4096", "--clients", str(c)] for c in (1, 8, 64)]
    runs += [["--scenario", "fetch", "--fetch", kind, "--clients", "8"] for kind in ("body", "header")]
    try:
        for r in runs:
            out = subprocess.run(base + r + ["--duration", str(args.seconds)],
                                 capture_output=True, text=True, timeout=600)
            lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
            if not lines:
                print("FAILED:", " ".join(r), out.stdout, out.stderr, file=sys.stderr)
                return 1
            j = json.loads(lines[-1])
            cpu = j.get("trees", {}).get("store", {}).get("cpu_ms_per_op")
            print("%-34s %9.0f ops/s  p50 %.2f ms  p99 %.2f ms  errors %d  store CPU %.3f ms/op"
                  % (" ".join(r[1:]), j["rate"], j["p50_ms"], j["p99_ms"], j["errors"], cpu or 0))
    finally:
        srv.close(check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
