"""deploy/local-cluster end to end: `up` (three store nodes in one Raft group
and coffer-mmp in front, in a temp COFFER_LOCAL_DIR, on a free port range,
with the already-built binaries: COFFER_SKIP_BUILD=1), a second `up` that
changes nothing, coffer.env, an IMAPS login through the proxy with an APPEND
and a byte-exact FETCH, `$COFFER_CTL status --json` (3 members, one leader),
`$COFFER_CTL user add` (also after a leader transfer), `status`, then `down` and no process left."""

import imaplib
import json
import os
import random
import re
import shlex
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
import unittest

SOURCE_DIR = os.path.abspath(os.environ.get("COFFER_SOURCE_DIR") or
                             os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
BUILD_DIR = os.path.abspath(os.environ.get("COFFER_BUILD_DIR") or os.path.join(SOURCE_DIR, "build"))
SCRIPT = os.path.join(SOURCE_DIR, "deploy", "local-cluster")
HOST = "127.0.0.1"
UP_TIMEOUT = 150  # seconds for one `up` / `down` (the script's own waits are shorter)

ENV_KEYS = ("COFFER_HOST COFFER_IMAP_PORT COFFER_IMAPS_PORT COFFER_POP3_PORT COFFER_POP3S_PORT "
            "COFFER_CA_FILE COFFER_TLS_NAME COFFER_USER1 COFFER_PASS1 COFFER_USER2 COFFER_PASS2 "
            "COFFER_CTL COFFER_STORE_NODES COFFER_STORE_IMAP_PORT COFFER_STORE_IMAPS_PORT "
            "COFFER_STORE_POP3_PORT COFFER_STORE_POP3S_PORT COFFER_PROXY_LOG").split()


def cluster_ports(base):
    """Every TCP port local-cluster uses for COFFER_PORT_BASE=base."""
    ports = [base + p for p in (143, 993, 110, 995)]
    for n in range(3):
        s = base + 1000 + 100 * n
        ports += [s + p for p in (143, 993, 110, 995, 144, 111, 7443, 7001)]
    return ports


def port_free(port):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.bind((HOST, port))
        return True
    except OSError:
        return False
    finally:
        s.close()


def pick_base():
    """A base below the ephemeral range (other tests take free ports there)
    whose every port is free now."""
    rnd = random.Random(os.getpid() ^ int(time.time()))
    for _ in range(200):
        base = rnd.randrange(11000, 23000, 10)
        if all(port_free(p) for p in cluster_ports(base)):
            return base
    raise unittest.SkipTest("no free port range for local-cluster")


def comm(pid):
    try:
        with open("/proc/%d/comm" % pid) as f:
            return f.read().strip()
    except OSError:
        return None


class LocalCluster(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        for b in ("storenode/coffer-store", "admin/cofferctl", "proxy/coffer-mmp"):
            if not os.access(os.path.join(BUILD_DIR, b), os.X_OK):
                raise unittest.SkipTest("not built: %s" % os.path.join(BUILD_DIR, b))
        cls.tmp = tempfile.mkdtemp(prefix="coffer-local-cluster-")
        cls.local = os.path.join(cls.tmp, "local")
        cls.base = pick_base()
        cls.env = dict(os.environ, COFFER_LOCAL_DIR=cls.local, COFFER_BUILD_DIR=BUILD_DIR,
                       COFFER_SKIP_BUILD="1", COFFER_PORT_BASE=str(cls.base),
                       COFFER_READY_TIMEOUT="90")
        for k in ENV_KEYS + ["COFFER_ALLOW_PLAINTEXT", "COFFER_MAX_SESSIONS"]:
            cls.env.pop(k, None)
        cls.pids = {}

    @classmethod
    def tearDownClass(cls):
        # whatever happened: stop what the pid files name (the script first)
        try:
            subprocess.run([SCRIPT, "down"], env=cls.env, timeout=UP_TIMEOUT,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            pass
        for pid, name in cls.read_pids().items():
            if comm(pid) == name:
                os.kill(pid, signal.SIGKILL)
        if os.environ.get("COFFER_KEEP_TMP"):
            print("kept", cls.tmp)
        else:
            shutil.rmtree(cls.tmp, ignore_errors=True)

    @classmethod
    def read_pids(cls):
        out = {}
        for d in ("node1", "node2", "node3", "mmp"):
            try:
                with open(os.path.join(cls.local, d, "pid")) as f:
                    out[int(f.read().strip())] = "coffer-mmp" if d == "mmp" else "coffer-store"
            except (OSError, ValueError):
                pass
        return out

    def run_script(self, *args):
        p = subprocess.run([SCRIPT] + list(args), env=self.env, timeout=UP_TIMEOUT,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        out = p.stdout.decode("utf-8", "replace")
        return p.returncode, out

    def load_env(self):
        p = subprocess.run(["bash", "-c", 'set -a; . "$1"; env -0', "bash",
                            os.path.join(self.local, "coffer.env")],
                           stdout=subprocess.PIPE, check=True, timeout=30, env={"PATH": os.environ["PATH"]})
        env = {}
        for item in p.stdout.split(b"\0"):
            if b"=" in item:
                k, v = item.split(b"=", 1)
                env[k.decode()] = v.decode()
        return env

    def ctl(self, env, *args):
        return subprocess.run(shlex.split(env["COFFER_CTL"]) + list(args), timeout=60,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def test_up_login_status_down(self):
        t0 = time.monotonic()
        rc, out = self.run_script("up")
        self.assertEqual(rc, 0, out)
        self.assertIn("group: 3 members, leader node", out)
        self.assertIn("coffer-mmp ready:", out)
        pids = self.read_pids()
        self.assertEqual(sorted(pids.values()), ["coffer-mmp"] + ["coffer-store"] * 3, pids)
        for pid, name in pids.items():
            self.assertEqual(comm(pid), name)

        # a second `up` starts nothing
        rc, out2 = self.run_script("up")
        self.assertEqual(rc, 0, out2)
        self.assertIn("already running", out2)
        self.assertEqual(self.read_pids(), pids)

        env = self.load_env()
        for k in ENV_KEYS:
            self.assertTrue(env.get(k), "coffer.env lacks %s" % k)
        self.assertEqual(int(env["COFFER_IMAPS_PORT"]), self.base + 993)
        nodes = env["COFFER_STORE_NODES"].split()
        self.assertEqual(len(nodes), 3, nodes)
        for i, nd in enumerate(nodes):
            self.assertRegex(nd, r"^%d=127\.0\.0\.1:\d+,127\.0\.0\.1:\d+$" % (i + 1))

        # the client port is the proxy's
        with open(env["COFFER_PROXY_LOG"], "rb") as f:
            self.assertIn(b"imaps=127.0.0.1:%s" % env["COFFER_IMAPS_PORT"].encode(), f.read())

        ctx = ssl.create_default_context(cafile=env["COFFER_CA_FILE"])
        msg = (b"From: Alice <alice@coffer.test>\r\nTo: bob@coffer.test\r\n"
               b"Subject: through coffer-mmp\r\nMessage-ID: <lc-%d@coffer.test>\r\n\r\n" % os.getpid()
               + b"".join(b"line %d \xc3\xa9 .dot\r\n" % i for i in range(3000)))
        c = imaplib.IMAP4_SSL(env["COFFER_HOST"], int(env["COFFER_IMAPS_PORT"]), ssl_context=ctx,
                              timeout=60)
        try:
            c.login(env["COFFER_USER1"], env["COFFER_PASS1"])
            typ, data = c.append("INBOX", None, None, msg)
            self.assertEqual(typ, "OK", data)
            uid = int(re.search(rb"APPENDUID \d+ (\d+)", data[0]).group(1))
            typ, _ = c.select("INBOX")
            self.assertEqual(typ, "OK")
            typ, d = c.uid("FETCH", str(uid), "(BODY.PEEK[])")
            self.assertEqual(typ, "OK")
            self.assertEqual(d[0][1], msg)
            c.logout()
        finally:
            try:
                c.shutdown()
            except OSError:
                pass

        # STARTTLS on the proxy's plain port (certificate checked for 127.0.0.1)
        ctx2 = ssl.create_default_context(cafile=env["COFFER_CA_FILE"])
        c = imaplib.IMAP4(env["COFFER_HOST"], int(env["COFFER_IMAP_PORT"]), timeout=60)
        try:
            c.starttls(ssl_context=ctx2)
            c.login(env["COFFER_USER2"], env["COFFER_PASS2"])
            typ, data = c.select("INBOX", readonly=True)
            self.assertEqual(typ, "OK", data)
            c.logout()
        finally:
            try:
                c.shutdown()
            except OSError:
                pass

        p = self.ctl(env, "status", "--json")
        self.assertEqual(p.returncode, 0, p.stderr)
        st = json.loads(p.stdout)
        self.assertEqual(len(st["members"]), 3, st)
        self.assertEqual([m["role"] for m in st["members"]].count("leader"), 1, st)

        p = self.ctl(env, "user", "add", "carol", "--password", "pw-carol-1")
        self.assertEqual(p.returncode, 0, p.stderr)

        # COFFER_CTL finds the leader whichever node leads
        lead = [m["id"] for m in st["members"] if m["role"] == "leader"][0]
        other = 3 if lead != 3 else 2
        p = self.ctl(env, "leader", "transfer", str(other))
        self.assertEqual(p.returncode, 0, p.stderr)
        deadline = time.monotonic() + 30
        while True:
            p = self.ctl(env, "status", "--json")
            if p.returncode == 0 and json.loads(p.stdout).get("leader_id") == other:
                break
            self.assertLess(time.monotonic(), deadline, "leader did not move to %d" % other)
            time.sleep(0.2)
        p = self.ctl(env, "user", "add", "dave", "--password", "pw-dave-1")
        self.assertEqual(p.returncode, 0, p.stderr)

        rc, out = self.run_script("status")
        self.assertEqual(rc, 0, out)
        self.assertEqual(out.count("coffer-store running"), 3, out)
        self.assertIn("coffer-mmp running", out)

        rc, out = self.run_script("down")
        self.assertEqual(rc, 0, out)
        self.assertIn("stopped 4 process(es)", out)
        for pid, name in pids.items():
            self.assertNotEqual(comm(pid), name, "pid %d (%s) survived down" % (pid, name))
        self.assertEqual(self.read_pids(), {})
        print("local-cluster up..down in %.1f s" % (time.monotonic() - t0))


if __name__ == "__main__":
    unittest.main(verbosity=2)
