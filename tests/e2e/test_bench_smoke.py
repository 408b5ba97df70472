#!/usr/bin/env python3
"""Smoke test of coffer-bench (not a timing test): against a real coffer-store,
2 clients do exactly 50 APPENDs, then exactly 50 FETCHes of those messages,
then 20 idle logged-in sessions are held while the server's memory is read.
Checks from coffer-bench's JSON lines that the operations were counted
exactly and that there were no errors."""

import json
import os
import subprocess
import sys
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import coffer_harness as h  # noqa: E402

BENCH_BIN = os.path.join(h.BUILD_DIR, "tests", "bench", "coffer-bench")


def run_bench(srv, *args):
    argv = [BENCH_BIN, "--host", h.HOST, "--port", str(srv.imaps_port), "--tls", "implicit",
            "--ca", srv.ca_file, "--sni", h.TLS_NAME, "--user", "alice",
            "--pass", srv.passwords["alice"], "--tree", "coffer=%d" % srv.pid,
            "--timeout", "60"] + [str(a) for a in args]
    r = subprocess.run(argv, capture_output=True, timeout=300)
    out = r.stdout.decode("utf-8", "replace")
    lines = [ln for ln in out.splitlines() if ln.startswith("{")]
    if r.returncode != 0 or len(lines) != 1:
        raise AssertionError("coffer-bench %s exited %d\nstdout:\n%s\nstderr:\n%s"
                             % (" ".join(argv[1:]), r.returncode, out,
                                r.stderr.decode("utf-8", "replace")))
    return json.loads(lines[0])


class BenchSmoke(h.ServerTestCase):
    server_users = ("alice",)

    def test_append_fetch_idle(self):
        if not os.path.exists(BENCH_BIN):
            self.fail("coffer-bench not built: %s" % BENCH_BIN)
        j = run_bench(self.srv, "--scenario", "append", "--clients", 2, "--ops", 50,
                      "--size", 4096, "--mailbox", "smoke")
        self.assertEqual(j["errors"], 0, j)
        self.assertEqual(j["total_ops"], 50, j)
        self.assertEqual(j["ops"]["APPEND"]["count"], 50, j)
        self.assertGreater(j["ops"]["APPEND"]["bytes"], 50 * 3000, j)

        j = run_bench(self.srv, "--scenario", "fetch", "--fetch", "body", "--clients", 2,
                      "--ops", 50, "--mailbox", "smoke")
        self.assertEqual(j["errors"], 0, j)
        self.assertEqual(j["ops"]["FETCH"]["count"], 50, j)
        # every FETCH returned a whole message of about 4 KiB
        self.assertGreater(j["ops"]["FETCH"]["bytes"], 50 * 3000, j)

        # the store says the same
        c = self.srv.raw_login("alice")
        u, t = c.command("STATUS smoke (MESSAGES)")
        self.assertTrue(h.ok(t), t)
        self.assertTrue(any(b"MESSAGES 50" in x for x in u), u)
        c.close()

        j = run_bench(self.srv, "--scenario", "idle", "--sessions", 20, "--clients", 5,
                      "--settle", "0.5")
        self.assertEqual(j["errors"], 0, j)
        self.assertEqual(j["established"], 20, j)
        tree = j["trees"]["coffer"]
        self.assertGreater(tree["rss_after"], 0, j)
        self.assertGreater(tree["pss_after"], 0, j)
        self.assertAlive()


if __name__ == "__main__":
    h.main()
