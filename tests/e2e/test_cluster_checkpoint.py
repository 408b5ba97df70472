"""Checkpoints (issue 3): three nodes with a small snapshot threshold, so
the leader's Raft log is compacted every few entries and every snapshot
starts an on-disk LMDB checkpoint. A follower that is wiped and added back
is behind the leader's compacted log: it must catch up by fetching a
checkpoint as a verified stream over the admin RPC (asserted from its
status counters and its log, not only from the final digest), then follow
the log, and end with the same content digest. A tampered checkpoint
placed on the receiving side is refused (CRIT, deleted) and a good one is
fetched instead. A node restarted after an install comes back normally."""

import glob
import os
import shutil
import sys
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cluster_harness as h  # noqa: E402
import coffer_harness as ch  # noqa: E402

CONFIG = {
    "raft.snapshot_threshold": "16",
    "raft.snapshot_trailing": "4",
}


def msg(i, size=0):
    body = ("line %d of a checkpoint test message\r\n" % i) * (1 + size // 40)
    return ("From: a@coffer.test\r\nSubject: c%d\r\nMessage-ID: <ck-%d@coffer.test>\r\n\r\n%s"
            % (i, i, body)).encode()


class CheckpointTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.c = h.Cluster(3, "checkpoint", config=CONFIG)
        cls.n = 0
        try:
            cls.c.form()
        except BaseException:
            cls.c.close(check=False)
            raise

    @classmethod
    def tearDownClass(cls):
        cls.c.close(check=True)

    def append_some(self, k, size=0):
        c = self.c.login(self.c.leader())
        for _ in range(k):
            CheckpointTest.n += 1
            _, t = c.command("APPEND INBOX ", ch.Lit(msg(CheckpointTest.n, size)), timeout=60)
            self.assertTrue(ch.ok(t), t)
        c.close()

    def wait_status(self, node, pred, what, timeout=120.0):
        deadline = time.monotonic() + timeout
        st = None
        while time.monotonic() < deadline:
            st = node.status()
            if st is not None and pred(st):
                return st
            time.sleep(0.3)
        raise AssertionError("node %d: %s not reached within %.0fs; last status %r; log:\n%s"
                             % (node.id, what, timeout, st, node.log_tail(30)))

    def leader_idle(self):
        """The leader, once its newest checkpoint covers its last snapshot
        (no checkpoint being written)."""
        leader = self.c.leader()
        self.wait_status(leader, lambda s: s["checkpoint_state"] == "idle"
                         and s["checkpoint_applied"] >= s["last_snapshot"] > 0,
                         "an idle checkpoint writer covering the last snapshot")
        return leader

    def re_add_wiped(self, f, before_start=None):
        """Stop f, remove it from the group, wipe it, grow the log past the
        leader's compaction point, optionally prepare its data dir, start it
        and add it again."""
        leader = self.c.leader()
        self.assertNotEqual(leader.id, f.id)
        f.stop()
        leader.ctl("node", "remove", f.id)
        f.wipe()
        self.append_some(40)
        leader = self.leader_idle()
        st = leader.status()
        self.assertGreater(st["last_snapshot"], 20)
        if before_start is not None:
            before_start(leader)
        since = f.start()
        leader.ctl("node", "add", f.admin_address)
        f.wait_log(rb"coffer-store ready:", 120, since=since)
        return since

    def test_1_leader_takes_checkpoints(self):
        self.append_some(30)
        self.append_some(3, size=200 * 1024)
        leader = self.leader_idle()
        st = leader.status()
        self.assertGreaterEqual(st["checkpoints_taken"], 1)
        files = glob.glob(os.path.join(leader.data_dir, "checkpoints", "ckpt-*.mdb"))
        self.assertGreaterEqual(len(files), 1)
        self.assertLessEqual(len(files), 2)  # raft.checkpoints_kept default
        for p in files:
            self.assertTrue(os.path.exists(p + ".manifest"), p)
        self.assertIn(b"checkpoint: wrote ckpt-", leader.log())
        self.c.wait_converged()

    def test_2_wiped_follower_installs_streamed_checkpoint(self):
        leader = self.c.leader()
        f = [n for n in self.c.live() if n.id != leader.id][0]
        served_before = leader.status()["checkpoints_served"]
        since = self.re_add_wiped(f)
        log = f.log()[since:]
        self.assertRegex(log, rb"checkpoint: fetched ckpt-\d+\.mdb from 127\.0\.0\.1:\d+ "
                              rb"\(applied \d+, \d+ bytes, sha256 verified\)")
        self.assertRegex(log, rb"checkpoint: installed ckpt-\d+\.mdb: store now at applied \d+")
        st = self.wait_status(f, lambda s: s["checkpoints_installed"] >= 1, "an installed checkpoint")
        self.assertEqual(st["checkpoints_installed"], 1)
        self.assertGreater(leader.status()["checkpoints_served"], served_before)
        # it follows the log afterwards and ends with the same content
        self.append_some(10)
        self.c.wait_converged()

    def test_3_tampered_checkpoint_refused(self):
        leader = self.c.leader()
        f = [n for n in self.c.live() if n.id != leader.id][1]

        def plant(ld):
            # The leader's newest checkpoint (covers its last snapshot),
            # with one byte flipped, where a fetch would leave it.
            src = sorted(glob.glob(os.path.join(ld.data_dir, "checkpoints", "ckpt-*.mdb")))[-1]
            dst_dir = os.path.join(f.data_dir, "checkpoints")
            os.makedirs(dst_dir, mode=0o700, exist_ok=True)
            dst = os.path.join(dst_dir, os.path.basename(src))
            shutil.copyfile(src, dst)
            shutil.copyfile(src + ".manifest", dst + ".manifest")
            with open(dst, "r+b") as fh:
                fh.seek(8192 + 17)
                b = fh.read(1)
                fh.seek(8192 + 17)
                fh.write(bytes([b[0] ^ 0x20]))

        since = self.re_add_wiped(f, before_start=plant)
        log = f.log()[since:]
        self.assertRegex(log, rb"crit: checkpoint: ckpt-\d+\.mdb is corrupt and was deleted "
                              rb"\(refused, never used\): .*sha256")
        self.assertIn(b"checkpoint: fetched ckpt-", log)
        i_crit = log.find(b"is corrupt and was deleted")
        i_inst = log.find(b"checkpoint: installed ckpt-")
        self.assertGreater(i_inst, i_crit)
        st = self.wait_status(f, lambda s: s["checkpoints_installed"] >= 1, "an installed checkpoint")
        self.assertEqual(st["checkpoints_installed"], 1)
        self.append_some(5)
        self.c.wait_converged()

    def test_4_restart_after_install(self):
        leader = self.c.leader()
        for f in [n for n in self.c.live() if n.id != leader.id]:
            f.stop()
            since = f.start()
            f.wait_log(rb"coffer-store ready:", 60, since=since)
        self.append_some(20)
        applied, digest = self.c.wait_converged()
        self.assertTrue(digest)
        for n in self.c.live():
            self.assertNotIn(b"store is behind snapshot", n.log())


if __name__ == "__main__":
    unittest.main(verbosity=2)
