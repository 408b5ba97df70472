"""Disk nearly full on a replicated group (node.min_free_disk).

Three nodes, every one with node.min_free_disk = 128M; node 3's data dir
lives on its own 384 MiB tmpfs so that its free space can be taken away
(a filler file leaving ~64 MiB) and given back.

test_1: node 3 is a follower when its disk fills up. It logs the CRIT
"disk nearly full" and "refusing new Raft entries" lines, keeps following
the leader (same term, still a follower, no candidate, for more than two
election timeouts) and stores nothing new, while the leader commits 200
APPENDs (all OK with APPENDUID) with node 2. When the filler is removed it
logs "disk space recovered" / "accepting Raft entries again" and catches
up: same applied index and digest on all three nodes, every message read
back byte-exact from the leader.

test_2: node 3 is made leader (cofferctl leader transfer 3), then its disk
fills up: it logs "stepping down as leader", another node takes over, 20
APPENDs succeed through it while node 3 follows without storing them, and
after the space returns node 3 catches up again.

The tmpfs needs root (mount); without it the test is skipped and exits
with 77 (SKIP_RETURN_CODE in tests/CMakeLists.txt). The mount is always
removed, after the node processes are stopped by PID.
"""

import atexit
import os
import re
import shutil
import subprocess
import sys
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cluster_harness as h  # noqa: E402
import coffer_harness as ch  # noqa: E402

MIB = 1 << 20
ELECTION_S = 5.0
CONFIG = {
    "raft.election_timeout": "%ds" % ELECTION_S,
    "raft.heartbeat": "250ms",
    "node.min_free_disk": "128M",
}
MIN_FREE = 128 * MIB
TMPFS_SIZE = "384m"
LEAVE_FREE = 64 * MIB   # what the filler leaves: well below MIN_FREE
HOLD_S = 2.5 * ELECTION_S  # observation window while node 3 refuses entries

RX_LOW = rb"disk nearly full: \d+ bytes free in "
RX_REFUSE = rb"rep: refusing new Raft entries from the leader until disk space returns"
RX_RECOVERED = rb"disk space recovered: \d+ bytes free in "
RX_ACCEPT = rb"rep: accepting Raft entries again"


def message(i):
    body = ("line %d of disk-full test message %d\r\n" % (i % 13, i)) * (1 + (i * 37) % 60)
    return ("From: a@coffer.test\r\nTo: b@coffer.test\r\nSubject: df%d\r\n"
            "Message-ID: <df-%d@coffer.test>\r\n\r\n%s" % (i, i, body)).encode()


def free_bytes(path):
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


class DiskFullTest(unittest.TestCase):
    c = None
    disk = None     # tmpfs mount point of node 3
    filler = None
    sent = {}       # uid -> message bytes, every APPEND that got OK
    n = 0

    # ------------------------------------------------------------ set-up
    @classmethod
    def setUpClass(cls):
        cls.c = h.Cluster(3, "diskfull", config=CONFIG)
        try:
            cls.mount_node3()
            cls.c.form()
        except BaseException:
            cls.shutdown(check=False)
            raise

    @classmethod
    def mount_node3(cls):
        n3 = cls.c.node(3)
        disk = os.path.join(n3.tmp, "disk")
        os.makedirs(disk, mode=0o700)
        if os.geteuid() != 0:
            raise unittest.SkipTest("mounting a tmpfs needs root (euid %d)" % os.geteuid())
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=%s,mode=0700" % TMPFS_SIZE,
                            "tmpfs", disk], capture_output=True, stdin=subprocess.DEVNULL,
                           timeout=30)
        if r.returncode != 0:
            err = (r.stdout + r.stderr).decode(errors="replace").strip()
            if re.search(r"permission denied|not permitted|superuser|only root", err, re.I):
                raise unittest.SkipTest("cannot mount a tmpfs here: %s" % err)
            raise AssertionError("mount -t tmpfs %s failed (%d): %s" % (disk, r.returncode, err))
        cls.disk = disk
        atexit.register(cls.emergency_unmount)
        data = os.path.join(disk, "data")
        os.makedirs(data, mode=0o700)
        os.rmdir(n3.data_dir)  # the harness' (empty) default
        n3.data_dir = data
        n3.overrides["node.data_dir"] = data
        n3.write_config()
        cls.filler = os.path.join(disk, "filler")
        free = free_bytes(data)
        if free < MIN_FREE + 64 * MIB:
            raise AssertionError("tmpfs too small: %d bytes free" % free)

    @classmethod
    def unmount(cls):
        if cls.disk is None or not os.path.ismount(cls.disk):
            cls.disk = None
            return
        err = b""
        for _ in range(20):
            r = subprocess.run(["umount", cls.disk], capture_output=True,
                               stdin=subprocess.DEVNULL, timeout=30)
            if r.returncode == 0:
                cls.disk = None
                return
            err = r.stderr
            time.sleep(0.25)
        subprocess.run(["umount", "-l", cls.disk], stdin=subprocess.DEVNULL, timeout=30)
        disk, cls.disk = cls.disk, None
        raise AssertionError("umount %s failed (%s); detached lazily" % (disk, err))

    @classmethod
    def emergency_unmount(cls):
        """atexit: the test process is going away without tearDownClass."""
        if cls.disk is None:
            return
        try:
            cls.c.node(3).kill()  # by PID; a tmpfs in use cannot be unmounted
        except Exception:  # noqa: BLE001 - best effort at exit
            pass
        try:
            cls.unmount()
        except Exception:  # noqa: BLE001
            pass

    @classmethod
    def shutdown(cls, check):
        problems = []
        try:
            for n in list(cls.c.nodes.values()):
                try:
                    n.stop(check=check)  # SIGTERM by PID, bounded, then SIGKILL
                except AssertionError as e:
                    problems.append(str(e))
        finally:
            try:
                cls.unmount()
            except AssertionError as e:
                problems.append(str(e))
        if problems and check:
            cls.c.keep = True
        cls.c.close(check=False)
        if problems and check:
            raise AssertionError("\n".join(problems))

    @classmethod
    def tearDownClass(cls):
        cls.shutdown(check=True)

    def tearDown(self):
        # a failed test must not leave node 3's disk full for the next one
        if self.filler and os.path.exists(self.filler):
            os.unlink(self.filler)

    # ------------------------------------------------------------ helpers
    def fill(self):
        """Leave LEAVE_FREE bytes free on node 3's tmpfs."""
        data = self.c.node(3).data_dir
        size = free_bytes(data) - LEAVE_FREE
        self.assertGreater(size, 0)
        fd = os.open(self.filler, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.posix_fallocate(fd, 0, size)
        finally:
            os.close(fd)
        free = free_bytes(data)
        self.assertLess(free, MIN_FREE)
        sys.stderr.write("node 3: filled its tmpfs, %d MiB free\n" % (free // MIB))

    def unfill(self):
        os.unlink(self.filler)
        free = free_bytes(self.c.node(3).data_dir)
        self.assertGreater(free, MIN_FREE)
        sys.stderr.write("node 3: filler removed, %d MiB free\n" % (free // MIB))

    def statuses(self, what):
        sts = self.c.statuses(list(self.c.nodes.values()))
        self.assertEqual(sorted(sts), [1, 2, 3], "%s: not every node answers status" % what)
        return sts

    def summary(self, sts):
        return {i: (s["role"], s["term"], s["leader_id"], s["commit"], s["applied"],
                    s["digest"][:12]) for i, s in sts.items()}

    def wait_status(self, pred, what, timeout=120.0):
        deadline = time.monotonic() + timeout
        sts = None
        while True:
            sts = self.c.statuses(list(self.c.nodes.values()))
            if len(sts) == 3 and pred(sts):
                return sts
            if time.monotonic() > deadline:
                self.fail("%s: not reached within %.0fs; last statuses %r" % (
                    what, timeout, self.summary(sts) if sts else sts))
            time.sleep(0.5)

    def hold(self, t_refuse, term, leader, n3_applied):
        """Poll the statuses until node 3 has refused entries for HOLD_S
        (more than two election timeouts): at every poll the term and the
        leader are unchanged on all nodes, node 3 is a follower and has
        applied nothing new. Returns the last statuses."""
        checks = 0
        while True:
            sts = self.statuses("while node 3 refuses entries")
            s = self.summary(sts)
            for i, st in sts.items():
                self.assertEqual(st["term"], term, "term changed (an election): %r" % s)
                self.assertEqual(st["leader_id"], leader.id, s)
                self.assertEqual(st["role"], "leader" if i == leader.id else "follower", s)
            self.assertEqual(sts[3]["applied"], n3_applied, "node 3 applied new entries: %r" % s)
            checks += 1
            if time.monotonic() - t_refuse > HOLD_S and checks >= 3:
                return sts
            time.sleep(0.5)

    def append(self, node, k):
        """k APPENDs through `node`: every one must get OK [APPENDUID]."""
        c = self.c.login(node, timeout=60)
        try:
            for _ in range(k):
                DiskFullTest.n += 1
                data = message(DiskFullTest.n)
                _, t = c.command("APPEND INBOX ", ch.Lit(data), timeout=120)
                self.assertTrue(ch.ok(t), "APPEND %d via node %d: %r" % (DiskFullTest.n,
                                                                         node.id, t))
                code = ch.resp_code(t, "APPENDUID")
                self.assertIsNotNone(code, t)
                uid = int(code[1])
                self.assertNotIn(uid, self.sent)
                self.sent[uid] = data
        finally:
            c.close()

    def read_back(self, leader):
        """Every acknowledged message, byte-exact, and nothing else."""
        c = self.c.login(leader, timeout=60)
        try:
            u = c.ok("SELECT INBOX")
            exists = [int(r.split(b" ")[1]) for r in ch.find_untagged(u, "EXISTS")]
            self.assertEqual(exists, [len(self.sent)])
            got = ch.fetch_by_uid(c.ok("UID FETCH 1:* (UID BODY.PEEK[])", timeout=120))
        finally:
            c.close()
        self.assertEqual(sorted(got), sorted(self.sent))
        for uid, data in self.sent.items():
            self.assertEqual(got[uid]["BODY[]"], data, "uid %d differs" % uid)

    def converge(self):
        """All three nodes: same applied index, same digest, and that index
        is the commit index everywhere."""
        applied, digest = self.c.wait_converged(list(self.c.nodes.values()), timeout=180)
        self.assertTrue(digest)
        sts = self.statuses("after convergence")
        for i, s in sts.items():
            self.assertEqual((s["applied"], s["digest"]), (applied, digest), self.summary(sts))
        return applied, digest, sts

    # ------------------------------------------------------------ tests
    def test_1_follower_disk_full(self):
        n1, n2, n3 = (self.c.node(i) for i in (1, 2, 3))
        leader = self.c.leader()
        self.assertEqual(leader.id, 1)
        self.append(leader, 50)
        _, _, sts = self.converge()
        terms = {s["term"] for s in sts.values()}
        self.assertEqual(len(terms), 1, self.summary(sts))
        term = terms.pop()
        self.assertEqual([sts[i]["role"] for i in (1, 2, 3)], ["leader", "follower", "follower"])

        since = len(n3.log())
        self.fill()
        m = n3.wait_log(RX_LOW + rb"[^\n]*", 30, since=since)
        self.assertNotIn(b"stepping down", m.group(0))
        n3.wait_log(RX_REFUSE, 30, since=since)
        t_refuse = time.monotonic()
        before = self.statuses("after the refusal")
        n3_applied = before[3]["applied"]
        lead_applied = before[1]["applied"]

        # the leader commits with node 2
        self.append(leader, 200)
        self.assertEqual(len(self.sent), 250)
        self.c.wait_converged([n1, n2], timeout=120)

        # node 3 keeps following, stores nothing, and starts no election:
        # watched for more than two election timeouts of refusal
        sts = self.hold(t_refuse, term, leader, n3_applied)
        s = self.summary(sts)
        self.assertGreaterEqual(sts[1]["commit"], lead_applied + 200, s)
        self.assertGreaterEqual(sts[1]["applied"], lead_applied + 200, s)
        self.assertEqual(sts[2]["applied"], sts[1]["applied"], s)
        self.assertEqual(sts[2]["digest"], sts[1]["digest"], s)
        self.assertLessEqual(sts[3]["applied"] + 200, sts[1]["applied"], s)
        self.assertNotEqual(sts[3]["digest"], sts[1]["digest"], s)
        self.assertNotIn(b"is now candidate", n3.log()[since:])
        self.assertTrue(n3.alive())

        # space returns: node 3 accepts entries again and catches up
        since = len(n3.log())
        self.unfill()
        n3.wait_log(RX_RECOVERED, 30, since=since)
        n3.wait_log(RX_ACCEPT, 30, since=since)
        applied, digest, sts = self.converge()
        self.assertGreaterEqual(applied, lead_applied + 200)
        for i in (1, 2, 3):
            self.assertEqual(sts[i]["term"], term, "term changed: %r" % self.summary(sts))
        self.assertEqual(self.c.leader().id, 1)
        for n in (n1, n2, n3):
            self.assertNotIn(b"is now candidate", n.log())
        self.read_back(leader)

    def test_2_leader_disk_full(self):
        n3 = self.c.node(3)
        self.converge()
        old = self.c.leader()
        if old.id != 3:
            r = old.ctl("leader", "transfer", 3)
            self.assertIn(b"transferred", r.stdout)
        sts = self.wait_status(lambda s: s[3]["role"] == "leader"
                               and all(x["leader_id"] == 3 for x in s.values()),
                               "node 3 leads", timeout=60)
        self.assertEqual(self.c.leader().id, 3)
        term3 = sts[3]["term"]
        self.append(n3, 3)   # node 3 leads for real before its disk fills

        since = len(n3.log())
        self.fill()
        n3.wait_log(RX_LOW + rb"[^\n]*stepping down as leader", 30, since=since)
        n3.wait_log(RX_REFUSE, 30, since=since)
        t_refuse = time.monotonic()
        new = self.c.leader(exclude=(3,), timeout=90)
        self.assertNotEqual(new.id, 3)
        sts = self.wait_status(lambda s: s[3]["role"] == "follower"
                               and all(x["leader_id"] == new.id for x in s.values()),
                               "node %d leads, node 3 follows" % new.id, timeout=90)
        self.assertGreater(sts[new.id]["term"], term3, self.summary(sts))
        term = sts[new.id]["term"]
        n3_applied = sts[3]["applied"]
        lead_applied = sts[new.id]["applied"]
        self.assertNotIn(b"leadership transfer did not complete", n3.log()[since:])

        self.append(new, 20)
        self.assertEqual(len(self.sent), 273)
        other = [n for n in self.c.nodes.values() if n.id not in (3, new.id)][0]
        self.c.wait_converged([new, other], timeout=120)
        sts = self.hold(t_refuse, term, new, n3_applied)
        s = self.summary(sts)
        self.assertEqual(sts[other.id]["applied"], sts[new.id]["applied"], s)
        self.assertNotIn(b"is now candidate", n3.log()[since:])
        self.assertGreaterEqual(sts[new.id]["applied"], lead_applied + 20, s)
        self.assertLessEqual(sts[3]["applied"] + 20, sts[new.id]["applied"], s)

        since = len(n3.log())
        self.unfill()
        n3.wait_log(RX_RECOVERED, 30, since=since)
        n3.wait_log(RX_ACCEPT, 30, since=since)
        applied, _, sts = self.converge()
        self.assertGreaterEqual(applied, lead_applied + 20)
        self.assertEqual(self.c.leader().id, new.id)
        self.read_back(new)


def main():
    prog = unittest.main(verbosity=2, exit=False)
    r = prog.result
    if r.wasSuccessful() and r.skipped and r.testsRun <= len(r.skipped):
        sys.stderr.write("SKIPPED: %s\n" % "; ".join(reason for _, reason in r.skipped))
        sys.exit(77)  # SKIP_RETURN_CODE for ctest
    sys.exit(0 if r.wasSuccessful() else 1)


if __name__ == "__main__":
    main()
