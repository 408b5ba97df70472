"""coffer-mmp throttling and connection limits, end to end. Clients bind to
distinct 127.x.y.z source addresses so the proxy sees distinct clients."""

import re
import socket
import threading
import time

import coffer_harness as ch
import mmp_harness as mh
from coffer_harness import HOST

BLOCK_S = 3


def connect(mmp, src, timeout=15):
    s = socket.create_connection((HOST, mmp.imaps_port), timeout=timeout, source_address=(src, 0))
    t = mmp.ctx.wrap_socket(s)
    f = t.makefile("rb")
    return t, f, f.readline()


def try_login(mmp, src, user, pw, tag=b"a1"):
    """Returns (greeting, reply line, seconds the reply took)."""
    t, f, greet = connect(mmp, src)
    try:
        if not greet.startswith(b"* OK"):
            return greet, b"", 0.0
        t0 = time.monotonic()
        t.sendall(tag + b" LOGIN " + ch.quote(user).encode() + b" " + ch.quote(pw).encode() + b"\r\n")
        line = f.readline()
        while line.startswith(b"* ") and not line.startswith(b"* BYE"):
            line = f.readline()
        return greet, line, time.monotonic() - t0
    finally:
        f.close()
        t.close()


class ProxyThrottle(mh.ProxyTestCase):
    store_config = {"auth.scrypt_log2n": "10"}
    proxy_config = {
        "throttle.window": "60s",
        "throttle.delay_after": "2",
        "throttle.delay_base": "300ms",
        "throttle.delay_max": "1200ms",
        "throttle.block_after": "5",
        "throttle.block_time": "%ds" % BLOCK_S,
        "throttle.max_entries": "64",
        "limits.max_connections_per_ip": "6",
        "limits.max_connections": "40",
    }

    def test_a_delays_grow_then_refusal_then_served_again(self):
        pw = self.srv.passwords["alice"]
        times = []
        for i in range(5):
            t_sent = time.monotonic()
            greet, line, dt = try_login(self.mmp, "127.0.10.1", "alice", "wrong-%d" % i)
            self.assertTrue(line.startswith(b"a1 NO"), (greet, line))
            times.append(dt)
        # expected delays: 0, 0.3, 0.6, 1.2, 1.2 s (counts 1..5, delay_after 2)
        self.assertLess(times[0], 0.3)
        self.assertGreaterEqual(times[1], 0.3)
        self.assertGreaterEqual(times[2], 0.6)
        self.assertGreaterEqual(times[3], 1.2)
        self.assertGreater(times[2], times[1])
        self.assertGreater(times[3], times[2])
        print("\n  failed-login reply times (s): %s" % ", ".join("%.3f" % t for t in times))
        # now refused at connect, with a clear reason
        t, f, greet = connect(self.mmp, "127.0.10.1")
        f.close()
        t.close()
        self.assertTrue(greet.startswith(b"* BYE [UNAVAILABLE] Too many failed logins"), greet)
        blocked_at = t_sent  # the 5th failure started the penalty
        # the right password from another address works at once
        greet, line, dt = try_login(self.mmp, "127.0.10.2", "alice", pw)
        self.assertTrue(line.startswith(b"a1 OK"), line)
        self.assertLess(dt, 1.0)
        # after the penalty the address is served again
        def served():
            g, ln, _ = try_login(self.mmp, "127.0.10.1", "alice", pw)
            return ln.startswith(b"a1 OK")
        ch.wait_until(served, BLOCK_S + 10, interval=0.25, what="blocked address served again")
        self.assertGreaterEqual(time.monotonic() - blocked_at, BLOCK_S - 0.3)
        log = self.mmp.log()
        self.assertIn(b"address blocked", log)
        self.assertIn(b"throttle: 127.0.10.1 blocked", log)

    def test_b_same_wrong_password_does_not_escalate(self):
        for _ in range(8):
            greet, line, dt = try_login(self.mmp, "127.0.11.1", "bob", "stale-saved-password")
            self.assertTrue(greet.startswith(b"* OK"), greet)
            self.assertTrue(line.startswith(b"a1 NO"), line)
            self.assertLess(dt, 0.3)
        ch.wait_until(lambda: self.mmp.count_log(rb"127\.0\.11\.1 user \"bob\": failed login repeats") >= 7, 15,
                      what="log lines %s >= 7" % rb"127\.0\.11\.1 user \"bob\": failed login repeats")

    def test_c_connection_limits(self):
        held = []
        try:
            for i in range(6):
                t, f, g = connect(self.mmp, "127.0.12.1")
                self.assertTrue(g.startswith(b"* OK"), g)
                held.append((t, f))
            t, f, g = connect(self.mmp, "127.0.12.1")
            f.close()
            t.close()
            self.assertTrue(g.startswith(b"* BYE [UNAVAILABLE] Too many connections from your address"), g)
            # the existing ones still work
            for i, (t, f) in enumerate(held):
                t.sendall(b"n%d NOOP\r\n" % i)
                self.assertTrue(f.readline().startswith(b"n%d OK" % i))
            # total limit: fill up to 40 from other addresses
            for i in range(40 - 6):
                t, f, g = connect(self.mmp, "127.0.13.%d" % (i + 1))
                self.assertTrue(g.startswith(b"* OK"), g)
                held.append((t, f))
            t, f, g = connect(self.mmp, "127.0.14.1")
            f.close()
            t.close()
            self.assertTrue(g.startswith(b"* BYE [UNAVAILABLE] Too many connections"), g)
            t, f = held[0]
            t.sendall(b"z NOOP\r\n")
            self.assertTrue(f.readline().startswith(b"z OK"))
        finally:
            for t, f in held:
                f.close()
                t.close()
        # once they are gone, new connections are accepted again
        def accepted():
            t, f, g = connect(self.mmp, "127.0.14.1")
            f.close()
            t.close()
            return g.startswith(b"* OK")
        ch.wait_until(accepted, 10, interval=0.1, what="connections accepted again")

    def test_z_flood_of_addresses_keeps_tables_bounded(self):
        n, workers = 600, 6
        rss0 = self.mmp.rss_kib()
        errors = []

        def worker(k):
            try:
                for i in range(k, n, workers):
                    src = "127.1.%d.%d" % (i // 250, i % 250 + 1)
                    g, line, _ = try_login(self.mmp, src, "nouser%d" % i, "pw")
                    if not line.startswith(b"a1 NO"):
                        errors.append((src, g, line))
            except Exception as e:  # noqa: BLE001
                errors.append(e)
        ths = [threading.Thread(target=worker, args=(k,)) for k in range(workers)]
        for t in ths:
            t.start()
        for t in ths:
            t.join(300)
        self.assertEqual(errors, [])
        sizes = re.findall(rb"\[tables: (\d+) addresses, (\d+) users\]", self.mmp.log())
        self.assertGreater(len(sizes), n - 1)
        self.assertTrue(all(int(a) <= 64 and int(u) <= 64 for a, u in sizes))
        self.assertEqual(sizes[-1], (b"64", b"64"))
        rss1 = self.mmp.rss_kib()
        print("\n  %d distinct client addresses: throttle tables %s/%s entries, RSS %d -> %d KiB"
              % (n, sizes[-1][0].decode(), sizes[-1][1].decode(), rss0, rss1))
        self.assertAlive()


if __name__ == "__main__":
    ch.main()
