"""End-to-end harness for coffer-mmp (python3 stdlib only), on top of
coffer_harness (which starts coffer-store; not modified here).

  cl = ProxyCluster("name", proxy_config={...}, store_config={...})
  cl.store            the CofferServer (with its proxy-only listeners on)
  cl.mmp              the MMPProxy process (ports: imap_port, imaps_port, ...)
  cl.mmp.imap(mode)   imaplib client through the proxy ("tls", "plain", "starttls")
  cl.mmp.raw_imap()   RawIMAP through the proxy;  cl.mmp.pop3(mode) poplib
  cl.close()          stops both, checking exit codes and sanitizer reports

The proxy's client certificate (proxy.pem/proxy.key, clientAuth, signed by
the test CA) is made once per build dir next to the other e2e certificates.
"""

import fcntl
import os
import poplib
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import shutil

import coffer_harness as ch
from coffer_harness import HOST, RawIMAP, RawLine, IMAPClient, IMAPClientSSL

MMP_BIN = os.path.join(ch.BUILD_DIR, "proxy", "coffer-mmp")


def proxy_cert():
    d = ch.cert_dir()
    pem, key = os.path.join(d, "proxy.pem"), os.path.join(d, "proxy.key")
    with open(os.path.join(ch.BUILD_DIR, ".e2e-certs.lock"), "w") as lk:
        fcntl.flock(lk, fcntl.LOCK_EX)
        if not (os.path.exists(pem) and os.path.exists(key)):
            ext = os.path.join(d, "proxy.ext")
            with open(ext, "w") as f:
                f.write("basicConstraints = critical, CA:FALSE\n"
                        "keyUsage = critical, digitalSignature\n"
                        "extendedKeyUsage = clientAuth\n")
            old = os.umask(0o077)
            try:
                subprocess.run(["openssl", "genpkey", "-algorithm", "EC", "-pkeyopt",
                                "ec_paramgen_curve:P-256", "-out", key + ".tmp"], check=True,
                               capture_output=True)
                subprocess.run(["openssl", "req", "-new", "-sha256", "-key", key + ".tmp",
                                "-subj", "/CN=coffer-mmp", "-out", pem + ".csr"], check=True,
                               capture_output=True)
                subprocess.run(["openssl", "x509", "-req", "-sha256", "-days", "825", "-in",
                                pem + ".csr", "-CA", os.path.join(d, "ca.pem"), "-CAkey",
                                os.path.join(d, "ca.key"), "-set_serial",
                                "0x%s" % os.urandom(16).hex(), "-extfile", ext, "-out",
                                pem + ".tmp"], check=True, capture_output=True)
            finally:
                os.umask(old)
            os.chmod(pem + ".tmp", 0o644)
            os.rename(key + ".tmp", key)
            os.rename(pem + ".tmp", pem)
            os.unlink(pem + ".csr")
    return pem, key


def store_proxy_config():
    """Extra store config turning on the proxy-only listeners (free ports)."""
    ip, pp = ch.free_ports(2)
    return {"imap.listen_proxy": "%s:%d" % (HOST, ip), "pop3.listen_proxy": "%s:%d" % (HOST, pp)}


class MMPProxy:
    """One coffer-mmp process. nodes: list of dicts with imap, pop3, aliases."""

    def __init__(self, name, nodes, config=None, keep=False):
        if not os.path.exists(MMP_BIN):
            raise RuntimeError("coffer-mmp not built: %s" % MMP_BIN)
        self.name = name
        self.certs = ch.cert_dir()
        self.proxy_pem, self.proxy_key = proxy_cert()
        self.tmp = tempfile.mkdtemp(prefix="coffer-mmp-%s-" % name)
        self.keep = keep or bool(os.environ.get("COFFER_KEEP_TMP"))
        self.imap_port, self.imaps_port, self.pop3_port, self.pop3s_port = ch.free_ports(4)
        self.ca_file = os.path.join(self.certs, "ca.pem")
        self.ctx = ch.client_context(self.ca_file)
        self.nodes = nodes
        self.overrides = dict(config or {})
        self.config_file = os.path.join(self.tmp, "mmp.ini")
        self.log_file = os.path.join(self.tmp, "coffer-mmp.log")
        self.proc = None
        self._log = bytearray()
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self._reader = None
        self.write_config()
        self.start()

    def base_config(self):
        return {
            "proxy.log_level": "info",
            "imap.listen": "%s:%d" % (HOST, self.imap_port),
            "imaps.listen": "%s:%d" % (HOST, self.imaps_port),
            "pop3.listen": "%s:%d" % (HOST, self.pop3_port),
            "pop3s.listen": "%s:%d" % (HOST, self.pop3s_port),
            "tls.cert": os.path.join(self.certs, "server.pem"),
            "tls.key": os.path.join(self.certs, "server.key"),
            "backend.ca": self.ca_file,
            "backend.cert": self.proxy_pem,
            "backend.key": self.proxy_key,
            "backend.tls_name": ch.TLS_NAME,
        }

    def write_config(self):
        conf = self.base_config()
        conf.update(self.overrides)
        sections = {}
        for k, v in conf.items():
            sec, key = k.rsplit(".", 1) if k.startswith(("node ", "sni ")) else k.split(".", 1)
            sections.setdefault(sec, []).append((key, v))
        for i, nd in enumerate(self.nodes):
            sections["node n%d" % (i + 1)] = [(k, v) for k, v in nd.items()]
        with open(self.config_file, "w") as f:
            f.write("# generated by tests/e2e/mmp_harness.py\n")
            for sec, kvs in sections.items():
                f.write("\n[%s]\n" % sec)
                for key, v in kvs:
                    f.write("%s = %s\n" % (key, v))

    def _read(self, stream, logf):
        for line in iter(stream.readline, b""):
            logf.write(line)
            logf.flush()
            with self._lock:
                self._log += line
            if b"coffer-mmp ready:" in line:
                self._ready.set()
        stream.close()
        logf.close()

    def start(self, timeout=30):
        self._ready.clear()
        logf = open(self.log_file, "ab")
        # COFFER_MMP_WRAP: a command prefix for measurements, e.g. "heaptrack -o /tmp/h"
        wrap = os.environ.get("COFFER_MMP_WRAP", "").split()
        self.proc = subprocess.Popen(wrap + [MMP_BIN, "--config", self.config_file],
                                     stdin=subprocess.DEVNULL, stdout=logf,
                                     stderr=subprocess.PIPE, cwd=self.tmp,
                                     start_new_session=True)
        self.pid = self.proc.pid
        self._reader = threading.Thread(target=self._read, args=(self.proc.stderr, logf),
                                        daemon=True)
        self._reader.start()
        deadline = time.monotonic() + timeout
        while not self._ready.wait(0.05):
            if self.proc.poll() is not None:
                self._reader.join(5)
                raise AssertionError("coffer-mmp exited with %s before ready:\n%s"
                                     % (self.proc.returncode, self.log_tail()))
            if time.monotonic() > deadline:
                raise AssertionError("coffer-mmp not ready:\n" + self.log_tail())

    def log(self):
        with self._lock:
            return bytes(self._log)

    def log_tail(self, n=60):
        return b"\n".join(self.log().splitlines()[-n:]).decode("utf-8", "replace")

    def wait_log(self, pattern, timeout=10.0, since=0):
        rx = re.compile(pattern if isinstance(pattern, bytes) else pattern.encode())
        return ch.wait_until(lambda: rx.search(self.log(), since), timeout,
                             what="proxy log line %r" % pattern)

    def count_log(self, pattern):
        rx = re.compile(pattern if isinstance(pattern, bytes) else pattern.encode())
        return len(rx.findall(self.log()))

    def sanitizer_report(self):
        log = self.log()
        for p in ch.BAD_LOG_PATTERNS:
            m = p.search(log)
            if m:
                return log[max(0, m.start() - 200):m.start() + 3000].decode("utf-8", "replace")
        return None

    def rss_kib(self):
        with open("/proc/%d/status" % self.pid) as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        return 0

    def reload(self):
        os.kill(self.pid, signal.SIGHUP)

    def stop(self, check=True, timeout=30):
        problem = None
        rc = self.proc.poll()
        if rc is None:
            os.kill(self.pid, signal.SIGTERM)
            try:
                rc = self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.kill(self.pid, signal.SIGKILL)
                rc = self.proc.wait(10)
                problem = "did not exit within %.0fs of SIGTERM" % timeout
        if self._reader:
            self._reader.join(10)
        if check:
            if problem is None and rc != 0:
                problem = "exited with status %s" % rc
            rep = self.sanitizer_report()
            if rep:
                problem = (problem + "; " if problem else "") + "sanitizer report:\n" + rep
            if problem:
                self.keep = True
                raise AssertionError("coffer-mmp %s\nlog tail:\n%s" % (problem, self.log_tail()))
        return rc

    def cleanup(self):
        if not self.keep:
            shutil.rmtree(self.tmp, ignore_errors=True)

    # -- clients
    def imap(self, mode="tls", timeout=30.0):
        if mode == "tls":
            return IMAPClientSSL(HOST, self.imaps_port, ssl_context=self.ctx, timeout=timeout)
        c = IMAPClient(HOST, self.imap_port, timeout=timeout)
        if mode == "starttls":
            c.starttls(ssl_context=self.ctx)
        return c

    def raw_imap(self, mode="tls", timeout=30.0, greeting=True):
        port = self.imaps_port if mode == "tls" else self.imap_port
        return RawIMAP(port, mode=mode, ctx=self.ctx, timeout=timeout, greeting=greeting)

    def pop3(self, mode="tls", timeout=30.0):
        if mode == "tls":
            return poplib.POP3_SSL(HOST, self.pop3s_port, context=self.ctx, timeout=timeout)
        p = poplib.POP3(HOST, self.pop3_port, timeout=timeout)
        if mode == "stls":
            p.stls(context=self.ctx)
        return p

    def raw(self, port, tls=True, timeout=30.0):
        return RawLine(port, tls, self.ctx, timeout)

    def curl_base(self, port):
        return ["curl", "--silent", "--show-error", "--max-time", "60", "--cacert", self.ca_file,
                "--resolve", "%s:%d:%s" % (ch.TLS_NAME, port, HOST)]


def node_of(store):
    """[node] entry for a CofferServer started with store_proxy_config()."""
    o = store.overrides
    return {"imap": o["imap.listen_proxy"], "pop3": o["pop3.listen_proxy"],
            "aliases": "%s:%d %s:%d" % (HOST, store.imap_port, HOST, store.imaps_port)}


class ProxyCluster:
    """One coffer-store (proxy listeners on) and one coffer-mmp in front."""

    def __init__(self, name, proxy_config=None, store_config=None, users=("alice", "bob")):
        sc = store_proxy_config()
        sc.update(store_config or {})
        self.store = ch.CofferServer(name, config=sc, users=users)
        try:
            self.mmp = MMPProxy(name, [node_of(self.store)], config=proxy_config)
        except BaseException:
            self.store.kill()
            self.store.cleanup()
            raise

    def close(self, check=True):
        try:
            self.mmp.stop(check=check)
            self.mmp.cleanup()
        finally:
            self.store.close(check=check)


class ProxyTestCase(ch.unittest.TestCase):
    proxy_config = None
    store_config = None

    @classmethod
    def setUpClass(cls):
        cls.cl = ProxyCluster(cls.__name__, proxy_config=cls.proxy_config,
                              store_config=cls.store_config)
        cls.mmp = cls.cl.mmp
        cls.srv = cls.cl.store

    @classmethod
    def tearDownClass(cls):
        cls.cl.close(check=True)

    def assertAlive(self):
        self.assertIsNone(self.mmp.proc.poll(), "coffer-mmp died:\n" + self.mmp.log_tail())
