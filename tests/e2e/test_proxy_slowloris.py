"""Slowloris against coffer-mmp: 1,000 connections each sending one byte per
second are cut by the pre-auth timeout (counted from connect, so trickling
does not extend it), and a normal client logs in meanwhile."""

import resource
import selectors
import socket
import time

import coffer_harness as ch
import mmp_harness as mh
from coffer_harness import HOST

N = 1000
PREAUTH_S = 4


class ProxySlowloris(mh.ProxyTestCase):
    proxy_config = {"limits.preauth_timeout": "%ds" % PREAUTH_S}

    @classmethod
    def setUpClass(cls):
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        want = min(hard, max(soft, 4 * N + 256))
        if want < 2 * N + 100:
            raise ch.unittest.SkipTest("RLIMIT_NOFILE hard limit %d too low" % hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        super().setUpClass()

    def test_slowloris(self):
        sel = selectors.DefaultSelector()
        socks = []
        try:
            t0 = time.monotonic()
            for i in range(N):
                src = "127.2.%d.%d" % (i // 250, i % 250 + 1)
                s = socket.create_connection((HOST, self.mmp.imap_port), timeout=10,
                                             source_address=(src, 0))
                s.setblocking(False)
                sel.register(s, selectors.EVENT_READ)
                socks.append(s)
            opened = time.monotonic()
            open_set = set(socks)
            closed_at = {}
            login_done = None
            next_tick = time.monotonic()
            deadline = opened + PREAUTH_S + 30
            while open_set and time.monotonic() < deadline:
                now = time.monotonic()
                if now >= next_tick:
                    for s in list(open_set):
                        try:
                            s.send(b"a")
                        except OSError:
                            pass
                    next_tick = now + 1.0
                    if login_done is None:
                        # a normal client, while the trickle goes on
                        c0 = time.monotonic()
                        c = self.mmp.imap("tls", timeout=20)
                        c.login("alice", self.srv.passwords["alice"])
                        c.select("INBOX")
                        c.logout()
                        login_done = time.monotonic() - c0
                        print("\n  normal login amid %d trickling connections: %.3f s"
                              % (len(open_set), login_done))
                for key, _ev in sel.select(timeout=0.2):
                    s = key.fileobj
                    try:
                        data = s.recv(4096)
                    except BlockingIOError:
                        continue
                    except OSError:
                        data = b""
                    if not data:
                        sel.unregister(s)
                        open_set.discard(s)
                        closed_at[s] = time.monotonic()
            self.assertIsNotNone(login_done)
            self.assertLess(login_done, 5.0)
            self.assertEqual(len(open_set), 0, "%d connections still open" % len(open_set))
            first = min(closed_at.values()) - t0
            last = max(closed_at.values()) - opened
            print("  %d connections cut by the pre-auth timeout between %.1f and %.1f s"
                  % (N, first, last))
            self.assertGreaterEqual(first, PREAUTH_S - 0.5)
            self.assertLess(last, PREAUTH_S + 15)
            # the proxy's log reaches us through a pipe read by another
            # thread: wait (bounded) for every line rather than race it
            ch.wait_until(lambda: self.mmp.count_log(rb"pre-auth timeout") >= N, 15,
                          what="%d pre-auth timeout log lines (have %d)"
                          % (N, self.mmp.count_log(rb"pre-auth timeout")))
            self.assertAlive()
        finally:
            for s in socks:
                try:
                    s.close()
                except OSError:
                    pass
            sel.close()


if __name__ == "__main__":
    ch.main()
