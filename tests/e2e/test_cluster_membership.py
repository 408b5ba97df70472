"""Replicated groups (issue 3): status, leader hints, follower restart and
re-add, a fourth voter added and removed, leadership transfer, a cut-off
node (SIGSTOP) that cannot commit while the majority continues, and start-up
refusals (foreign data dir, Raft address of another member)."""

import os
import subprocess
import sys
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cluster_harness as h  # noqa: E402
import coffer_harness as ch  # noqa: E402


def msg(i):
    return ("From: a@coffer.test\r\nSubject: s%d\r\nMessage-ID: <mem-%d@coffer.test>\r\n\r\n"
            "body %d\r\n" % (i, i, i)).encode()


class MembershipTest(unittest.TestCase):

    def assert_log(self, node, needle, timeout=10.0):
        """The node's stderr reaches us through a reader thread: wait (bounded)
        for the line instead of racing it after the process exited."""
        deadline = time.monotonic() + timeout
        while needle not in node.log():
            if time.monotonic() >= deadline:
                self.fail("log of node %d lacks %r:\n%s" % (node.id, needle, node.log_tail()))
            time.sleep(0.05)
    @classmethod
    def setUpClass(cls):
        cls.c = h.Cluster(3, "membership")
        cls.ok = False
        cls.n = 0
        try:
            cls.c.form()
        except BaseException:
            cls.c.close(check=False)
            raise

    @classmethod
    def tearDownClass(cls):
        cls.c.close(check=True)

    def append_some(self, k=5):
        c = self.c.login(self.c.leader())
        for _ in range(k):
            MembershipTest.n += 1
            _, t = c.command("APPEND INBOX ", ch.Lit(msg(MembershipTest.n)), timeout=60)
            self.assertTrue(ch.ok(t), t)
        c.close()

    def test_1_status_and_hints(self):
        leader = self.c.leader()
        st = leader.status()
        self.assertEqual(st["role"], "leader")
        self.assertEqual(len(st["members"]), 3)
        roles = sorted(m["role"] for m in st["members"])
        self.assertEqual(roles, ["follower", "follower", "leader"])
        for m in st["members"]:
            for k in ("id", "address", "role", "term", "commit", "applied", "digest", "pid"):
                self.assertIn(k, m)
            self.assertEqual(m["address"], self.c.node(m["id"]).raft_address)
            self.assertEqual(m["pid"], self.c.node(m["id"]).pid)
        # Followers refuse new sessions and name the leader's IMAP address.
        for n in self.c.live():
            if n.id == leader.id:
                continue
            g = n.greeting()
            self.assertTrue(g.startswith(b"* BYE [UNAVAILABLE] not leader; leader is "
                                         + leader.imap_address.encode()), g)
            # admin writes on a follower are forwarded by cofferctl
            r = n.ctl("user", "list", check=False)
            self.assertEqual(r.returncode, 0)
        self.append_some()
        self.c.wait_converged()

    def test_2_follower_restart_catches_up(self):
        leader = self.c.leader()
        f = [n for n in self.c.live() if n.id != leader.id][0]
        f.kill()
        self.append_some(20)
        f.start()
        f.wait_log(rb"coffer-store ready:", 60)
        self.c.wait_converged()

    def test_3_transfer(self):
        leader = self.c.leader()
        target = [n for n in self.c.live() if n.id != leader.id][0]
        r = leader.ctl("leader", "transfer", target.id)
        self.assertIn(b"transferred", r.stdout)
        self.assertEqual(self.c.leader().id, target.id)
        # sessions on the old leader: refused with the new leader's address
        want = b"leader is " + target.imap_address.encode()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            g = leader.greeting()
            self.assertTrue(g.startswith(b"* BYE [UNAVAILABLE] not leader"), g)
            self.assertNotIn(b"leader is " + leader.imap_address.encode(), g)
            if want in g:
                break
            time.sleep(0.1)
        self.assertIn(want, g)
        self.append_some()

    def test_4_add_and_remove_voter(self):
        n4 = self.c.add_node_object(4)
        n4.start()
        since = len(n4.log())
        # any member may be asked: cofferctl finds the leader
        follower = [n for n in self.c.live() if n.id != self.c.leader().id and n.id != 4][0]
        follower.ctl("node", "add", n4.admin_address)
        n4.wait_log(rb"coffer-store ready:", 60, since=since)
        st = self.c.leader().status()
        m4 = [m for m in st["members"] if m["id"] == 4]
        self.assertEqual(len(m4), 1)
        self.assertEqual(m4[0]["role"], "follower")
        self.append_some()
        self.c.wait_converged()
        # remove it: it is told and stops; its data dir refuses to start again
        r = self.c.leader().ctl("node", "remove", 4)
        self.assertIn(b"told to stop", r.stdout)
        n4.proc.wait(60)
        self.assertEqual(n4.proc.returncode, 0)
        st = self.c.leader().status()
        self.assertEqual(sorted(m["id"] for m in st["members"]), [1, 2, 3])
        n4.start(wait=False)
        n4.proc.wait(60)
        self.assertNotEqual(n4.proc.returncode, 0)
        self.assert_log(n4, b"was removed from its group")
        del self.c.nodes[4]
        n4.cleanup()
        self.append_some()

    def test_5_standby_wiped_and_readded(self):
        # a wiped node added back (as standby first, then removed and
        # re-added as voter) catches up and ends with the same digest
        n5 = self.c.add_node_object(5)
        n5.start()
        self.c.leader().ctl("node", "add", n5.admin_address, "--standby")
        n5.wait_log(rb"coffer-store ready:", 60)
        st = self.c.leader().status()
        self.assertEqual([m["role"] for m in st["members"] if m["id"] == 5], ["standby"])
        self.c.wait_converged()
        n5.stop()
        self.c.leader().ctl("node", "remove", 5)  # node is down: warning only
        n5.wipe()
        self.append_some()
        n5.start()
        self.c.leader().ctl("node", "add", n5.admin_address)
        n5.wait_log(rb"coffer-store ready:", 60)
        self.c.wait_converged()
        self.c.leader().ctl("node", "remove", 5)
        n5.proc.wait(60)
        del self.c.nodes[5]
        n5.cleanup()

    def test_6_cut_off_node(self):
        leader = self.c.leader()
        others = [n for n in self.c.live() if n.id != leader.id]
        # the leader alone cannot commit
        cl = self.c.login(leader)
        for n in others:
            n.pause()
        try:
            MembershipTest.n += 1
            cl.send(b"x1 APPEND INBOX {%d}\r\n" % len(msg(MembershipTest.n)))
            self.assertTrue(cl.read_response(timeout=30).startswith(b"+"))
            cl.send(msg(MembershipTest.n) + b"\r\n")
            # no OK while it is alone: either no answer, or (once libraft's
            # leader notices it lost the quorum and steps down) NO
            # [UNAVAILABLE] / BYE
            try:
                t = cl.wait_tagged("x1", timeout=4 * h.ELECTION_MS / 1000.0)
                self.assertFalse(ch.ok(t), t)
                self.assertIn(b"UNAVAILABLE", t)
            except (TimeoutError, EOFError):
                pass
        finally:
            for n in others:
                n.resume()
        cl.close()
        # the majority continues without a cut-off leader
        leader = self.c.leader()
        leader.pause()
        try:
            new = self.c.leader(exclude=(leader.id,))
            self.assertNotEqual(new.id, leader.id)
            self.append_some()
        finally:
            leader.resume()
        # the old leader steps down and refuses sessions
        h_deadline = time.monotonic() + 60
        while time.monotonic() < h_deadline:
            g = leader.greeting()
            if g.startswith(b"* BYE"):
                break
            time.sleep(0.2)
        self.assertTrue(g.startswith(b"* BYE [UNAVAILABLE] not leader"), g)
        self.c.wait_converged()

    def test_7_refusals(self):
        leader = self.c.leader()
        f = [n for n in self.c.live() if n.id != leader.id][0]
        f.stop()
        # another node id on this data dir
        f.overrides["node.id"] = "9"
        f.write_config()
        f.start(wait=False)
        f.proc.wait(60)
        self.assertNotEqual(f.proc.returncode, 0)
        self.assert_log(f, b"belongs to node %d, not to node 9" % f.id)
        # another group id
        f.overrides.pop("node.id")
        f.overrides["node.group_id"] = "0" * 32
        f.write_config()
        f.start(wait=False)
        f.proc.wait(60)
        self.assertNotEqual(f.proc.returncode, 0)
        self.assert_log(f, b"not to group 00000000")
        # the Raft address of another member
        other = [n for n in self.c.live() if n.id != f.id][0]
        f.overrides.pop("node.group_id")
        f.overrides["raft.address"] = other.raft_address
        f.write_config()
        f.start(wait=False)
        f.proc.wait(60)
        self.assertNotEqual(f.proc.returncode, 0)
        self.assert_log(f, b"belongs to member %d" % other.id)
        f.overrides.pop("raft.address")
        f.write_config()
        f.start()
        f.wait_log(rb"coffer-store ready:", 60)
        self.c.wait_converged()


if __name__ == "__main__":
    unittest.main(verbosity=2)
