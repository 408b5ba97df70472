"""A 50 MiB APPEND (limits.max_message, the default) on a three-node group
with the default Raft timeouts (election 1000 ms, heartbeat 100 ms): it is
committed, applied on every node (same content digest everywhere), fetched
back byte-exact from the leader, and costs no election: the term and the
leader are the same before and after, and no node became a candidate
while the entry was replicated and applied."""

import hashlib
import os
import sys
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cluster_harness as h  # noqa: E402
import coffer_harness as ch  # noqa: E402

SIZE = 50 * 1024 * 1024
# The product defaults, not the harness's more generous ones: the point is
# that a maximum-size message replicates without starving heartbeats (rep
# splits it into 1 MiB Raft entries; see ARCHITECTURE.md, "Large entries").
# Start-up and the other waits keep the harness's generous timeouts.
CONFIG = {
    "raft.election_timeout": "1000ms",
    "raft.heartbeat": "100ms",
}


def big_message():
    head = (b"From: a@coffer.test\r\nTo: b@coffer.test\r\nSubject: large\r\n"
            b"Message-ID: <large@coffer.test>\r\nContent-Type: text/plain\r\n\r\n")
    line = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ-=+!\r\n"
    n = (SIZE - len(head)) // len(line)
    body = line * n
    pad = SIZE - len(head) - len(body)
    return head + body + b"x" * max(0, pad - 2) + b"\r\n"


class LargeAppendTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.c = h.Cluster(3, "large", config=CONFIG)
        try:
            cls.c.form()
        except BaseException:
            cls.c.close(check=False)
            raise

    @classmethod
    def tearDownClass(cls):
        cls.c.close(check=True)

    def test_50mib_append_no_election(self):
        data = big_message()
        self.assertEqual(len(data), SIZE)
        leader = self.c.leader()
        self.c.wait_converged()
        before = {n.id: n.status() for n in self.c.live()}
        terms = {s["term"] for s in before.values()}
        self.assertEqual(len(terms), 1, before)
        term = terms.pop()

        c = self.c.login(leader, timeout=120)
        t0 = time.monotonic()
        _, t = c.command("APPEND INBOX ", ch.Lit(data), timeout=300)
        took = time.monotonic() - t0
        self.assertTrue(ch.ok(t), t)
        self.assertIn(b"APPENDUID", t)
        sys.stderr.write("50 MiB APPEND committed in %.1f s\n" % took)

        applied, digest = self.c.wait_converged(timeout=300)
        self.assertTrue(digest)
        after = {n.id: n.status() for n in self.c.live()}
        for i, s in after.items():
            self.assertEqual(s["term"], term, "node %d: term changed (an election)" % i)
            self.assertEqual(s["leader_id"], leader.id, "node %d: leader changed" % i)
        self.assertEqual(self.c.leader().id, leader.id)
        for n in self.c.live():
            self.assertNotIn(b"is now candidate", n.log())

        # byte-exact from the leader
        c.ok("SELECT INBOX")
        u = c.ok("UID FETCH 1:* (RFC822.SIZE BODY.PEEK[])", timeout=300)
        got = [r for r in u if b"RFC822.SIZE %d" % SIZE in r]
        self.assertEqual(len(got), 1)
        self.assertEqual(hashlib.sha256(got[0][-(SIZE + 3):-3]).hexdigest(),
                         hashlib.sha256(data).hexdigest())
        c.close()


if __name__ == "__main__":
    unittest.main(verbosity=2)
