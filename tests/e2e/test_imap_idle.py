#!/usr/bin/env python3
"""Two sessions on one mailbox: IDLE sees EXISTS, NOOP sees FETCH FLAGS
and EXPUNGE caused by the other session."""
import os
import re
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from coffer_harness import ServerTestCase, append, fetch_dict, main, make_message  # noqa: E402

WAIT = 15.0  # bound for a notification to arrive


class Idle(ServerTestCase):
    def setUp(self):
        self.a = self.srv.raw_login("alice")
        self.b = self.srv.raw_login("alice")
        self.mbox = "idle-" + self._testMethodName
        self.a.ok("CREATE " + self.mbox)

    def tearDown(self):
        self.a.close()
        self.b.close()

    def wait_untagged(self, conn, rx, timeout=WAIT):
        """Read responses until one matches rx; returns (match_line, seen)."""
        deadline = time.monotonic() + timeout
        seen = []
        pat = re.compile(rx)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                self.fail("no response matching %r within %.0fs; got %r" % (rx, timeout, seen))
            try:
                r = conn.read_response(timeout=left)
            except TimeoutError:
                self.fail("no response matching %r within %.0fs; got %r" % (rx, timeout, seen))
            seen.append(r)
            if pat.search(r):
                return r, seen

    def idle_start(self, conn):
        tag = conn.next_tag()
        conn.send(tag + " IDLE\r\n")
        r = conn.read_response()
        self.assertTrue(r.startswith(b"+"), r)
        return tag

    def idle_done(self, conn, tag):
        conn.send(b"DONE\r\n")
        untagged = []
        t = conn.wait_tagged(tag, untagged)
        self.assertTrue(t.split(b" ")[1] == b"OK", t)
        return untagged

    def test_idle_sees_exists(self):
        u = self.a.ok("SELECT " + self.mbox)
        self.assertIn(b"* 0 EXISTS\r\n", u)
        tag = self.idle_start(self.a)
        _, uid1 = append(self.b, self.mbox, make_message(subject="during idle"))
        self.wait_untagged(self.a, rb"^\* 1 EXISTS\r\n")
        append(self.b, self.mbox, make_message(subject="second"))
        self.wait_untagged(self.a, rb"^\* 2 EXISTS\r\n")
        self.idle_done(self.a, tag)
        u = self.a.ok("UID FETCH 1:* (UID)")
        self.assertEqual(len([x for x in u if b"FETCH" in x]), 2, u)
        self.assertIn(b"UID %d" % uid1, b"".join(u))

    def test_flags_and_expunge_after_noop(self):
        for i in range(3):
            append(self.b, self.mbox, make_message(subject="m%d" % i))
        u = self.a.ok("SELECT " + self.mbox)
        self.assertIn(b"* 3 EXISTS\r\n", u)
        self.b.ok("SELECT " + self.mbox)
        self.b.ok("STORE 2 +FLAGS (\\Flagged $Label1)")
        # A learns about flag changes at its next NOOP (allow a short lag for
        # the watcher; poll NOOP with a bound instead of sleeping)
        deadline = time.monotonic() + WAIT
        flags = None
        while flags is None:
            for r in self.a.ok("NOOP"):
                if re.match(rb"^\* 2 FETCH ", r):
                    _, d = fetch_dict(r)
                    if "FLAGS" in d:
                        flags = [str(f).lower() for f in d["FLAGS"]]
            if flags is None and time.monotonic() > deadline:
                self.fail("A never saw * 2 FETCH (FLAGS ...) after B's STORE")
        self.assertIn("\\flagged", flags)
        self.assertIn("$label1", flags)
        # expunge message 1 in B; A sees "* 1 EXPUNGE" at NOOP and renumbers
        self.b.ok("STORE 1 +FLAGS.SILENT (\\Deleted)")
        self.b.ok("EXPUNGE")
        deadline = time.monotonic() + WAIT
        got = []
        while not any(re.match(rb"^\* 1 EXPUNGE\r\n", r) for r in got):
            got += self.a.ok("NOOP")
            if time.monotonic() > deadline:
                self.fail("A never saw * 1 EXPUNGE: %r" % got)
        u = self.a.ok("FETCH 1:* (FLAGS)")
        self.assertEqual(len([x for x in u if b" FETCH " in x]), 2, u)
        self.assertIn(b"\\Flagged", [x for x in u if x.startswith(b"* 1 FETCH")][0])

    def test_idle_sees_flags_and_expunge(self):
        append(self.b, self.mbox, make_message(subject="x"))
        append(self.b, self.mbox, make_message(subject="y"))
        self.a.ok("SELECT " + self.mbox)
        self.b.ok("SELECT " + self.mbox)
        tag = self.idle_start(self.a)
        self.b.ok("STORE 2 +FLAGS (\\Answered)")
        r, _ = self.wait_untagged(self.a, rb"^\* 2 FETCH ")
        self.assertIn(b"\\Answered", r)
        self.b.ok("STORE 1 +FLAGS (\\Deleted)")
        self.b.ok("EXPUNGE")
        self.wait_untagged(self.a, rb"^\* 1 EXPUNGE\r\n")
        self.idle_done(self.a, tag)
        u = self.a.ok("FETCH 1:* (UID)")
        self.assertEqual(len([x for x in u if b" FETCH " in x]), 1, u)


if __name__ == "__main__":
    main()
