"""coffer-mmp end to end: clients through the proxy (imaplib, poplib, curl,
mbsync), STARTTLS and implicit TLS, plaintext refusal, pre-auth limits, the
store's proxy-only port, SIGHUP reload, and --help vs docs/coffer-mmp.md."""

import os
import re
import socket
import ssl
import subprocess
import tempfile
import time

import coffer_harness as ch
import mmp_harness as mh
from coffer_harness import HOST, Lit, make_message, ok


class ProxyBasic(mh.ProxyTestCase):
    def login(self, mode="tls", user="alice"):
        c = self.mmp.imap(mode)
        c.login(user, self.srv.passwords[user])
        return c

    def test_imaplib_tls_append_fetch_byte_exact(self):
        body = "".join("line %d \u00e9\r\n" % i for i in range(2000))
        msg = make_message(subject="through the proxy", body=body)
        c = self.login("tls")
        typ, data = c.append("INBOX", None, None, msg)
        self.assertEqual(typ, "OK")
        uid = int(re.search(rb"APPENDUID \d+ (\d+)", data[0]).group(1))
        c.select("INBOX")
        typ, d = c.uid("FETCH", str(uid), "(BODY.PEEK[] RFC822.SIZE)")
        self.assertEqual(typ, "OK")
        self.assertEqual(d[0][1], msg)
        self.assertIn(b"RFC822.SIZE %d" % len(msg), b"".join(
            x[0] if isinstance(x, tuple) else x for x in d))
        c.logout()

    def test_starttls_and_login_capabilities(self):
        c = self.mmp.imap("plain")
        self.assertIn("STARTTLS", c.capabilities)
        self.assertIn("LOGINDISABLED", c.capabilities)
        c.starttls(ssl_context=self.mmp.ctx)
        c.login("bob", self.srv.passwords["bob"])
        # capabilities after login come from the store
        typ, caps = c.capability()
        self.assertIn(b"UIDPLUS", caps[0])
        self.assertNotIn(b"STARTTLS", caps[0])
        c.select("INBOX")
        c.logout()

    def test_plaintext_login_refused_before_tls(self):
        r = self.mmp.raw_imap("plain")
        u, t = r.command("LOGIN alice ", ch.quote(self.srv.passwords["alice"]))
        self.assertIn(b"NO [PRIVACYREQUIRED]", t)
        u, t = r.command("AUTHENTICATE PLAIN ", ch.auth_plain("alice", "x"))
        self.assertIn(b"NO [PRIVACYREQUIRED]", t)
        r.close()
        p = self.mmp.raw(self.mmp.pop3_port, tls=False)
        self.assertTrue(p.readline().startswith(b"+OK"))
        self.assertTrue(p.cmd("USER alice").startswith(b"-ERR [AUTH]"))
        capa = p.cmd("CAPA") + p.read_multiline()
        self.assertIn(b"STLS", capa)
        self.assertNotIn(b"USER\r\n", capa)
        p.close()
        self.mmp.wait_log(r"result=plaintext-refused")

    def test_starttls_discards_pipelined_plaintext(self):
        s = socket.create_connection((HOST, self.mmp.imap_port), timeout=10)
        f = s.makefile("rb")
        f.readline()
        s.sendall(b"a STARTTLS\r\nb LOGIN alice pw\r\n")
        self.assertTrue(f.readline().startswith(b"a OK"))
        t = self.mmp.ctx.wrap_socket(s)
        t.sendall(b"c NOOP\r\n")
        line = t.recv(4096)
        self.assertTrue(line.startswith(b"c OK"), line)  # b LOGIN was thrown away
        t.close()

    def test_authenticate_plain_sasl_ir_and_continuation(self):
        r = self.mmp.raw_imap("tls")
        u, t = r.command("AUTHENTICATE PLAIN ", ch.auth_plain("alice", self.srv.passwords["alice"]))
        self.assertTrue(ok(t), t)
        self.assertIn(b"[CAPABILITY", t)
        r.close()
        r = self.mmp.raw_imap("tls")
        r.send("x1 AUTHENTICATE PLAIN\r\n")
        self.assertTrue(r.readline().startswith(b"+"))
        r.send(ch.auth_plain("bob", self.srv.passwords["bob"]) + "\r\n")
        self.assertTrue(r.readline().startswith(b"x1 OK"))
        u = r.ok("SELECT INBOX")
        r.close()

    def test_login_with_literals(self):
        r = self.mmp.raw_imap("tls")
        u, t = r.command("LOGIN ", Lit("alice"), " ", Lit(self.srv.passwords["alice"]))
        self.assertTrue(ok(t), t)
        r.close()

    def test_wrong_password(self):
        r = self.mmp.raw_imap("tls")
        u, t = r.command("LOGIN alice wrong-password")
        self.assertIn(b"NO", t)
        # still usable
        r.login("alice", self.srv.passwords["alice"])
        r.close()

    def test_idle_through_proxy(self):
        r = self.mmp.raw_imap("tls")
        r.login("bob", self.srv.passwords["bob"])
        r.ok("SELECT INBOX")
        r.send("i1 IDLE\r\n")
        self.assertTrue(r.readline().startswith(b"+"))
        c = self.login("tls", "bob")
        c.append("INBOX", None, None, make_message(subject="wake up"))
        c.logout()
        deadline = time.monotonic() + 10
        while True:
            line = r.readline(timeout=max(0.1, deadline - time.monotonic()))
            if re.match(rb"\* \d+ EXISTS", line):
                break
        r.send("DONE\r\n")
        self.assertTrue(r.wait_tagged("i1").startswith(b"i1 OK"))
        r.close()

    def test_pop3_stls_and_tls_retr(self):
        msg = make_message(subject="pop through proxy", body="x" * 1000 + "\r\n.dot\r\n" * 50)
        c = self.login("tls", "bob")
        c.append("INBOX", None, None, msg)
        c.logout()
        for mode in ("stls", "tls"):
            p = self.mmp.pop3(mode)
            p.user("bob")
            p.pass_(self.srv.passwords["bob"])
            n, _ = p.stat()
            found = False
            for i in range(1, n + 1):
                resp, lines, octets = p.retr(i)
                if b"\r\n".join(lines) + b"\r\n" == msg:
                    found = True
            self.assertTrue(found, mode)
            p.quit()
        p = self.mmp.raw(self.mmp.pop3s_port)
        p.readline()
        line = p.cmd("AUTH PLAIN " + ch.auth_plain("bob", self.srv.passwords["bob"]))
        self.assertTrue(line.startswith(b"+OK"), line)
        self.assertTrue(p.cmd("STAT").startswith(b"+OK"))
        p.close()

    def test_curl(self):
        msg = make_message(subject="curl via proxy")
        c = self.login("tls")
        c.append("Drafts", None, None, msg)
        c.select("Drafts")
        typ, d = c.search(None, "ALL")
        n = d[0].split()[-1].decode()
        c.logout()
        pw = self.srv.passwords["alice"]
        r = subprocess.run(self.mmp.curl_base(self.mmp.imaps_port) + [
            "--user", "alice:" + pw, "imaps://%s:%d/Drafts;MAILINDEX=%s" % (
                ch.TLS_NAME, self.mmp.imaps_port, n)], capture_output=True, timeout=90)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertEqual(r.stdout, msg)
        r = subprocess.run(self.mmp.curl_base(self.mmp.imap_port) + [
            "--ssl-reqd", "--user", "alice:" + pw, "imap://%s:%d/Drafts;MAILINDEX=%s" % (
                ch.TLS_NAME, self.mmp.imap_port, n)], capture_output=True, timeout=90)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertEqual(r.stdout, msg)
        c = self.login("tls")
        c.append("INBOX", None, None, msg)
        c.logout()
        base = "pop3s://%s:%d/" % (ch.TLS_NAME, self.mmp.pop3s_port)
        r = subprocess.run(self.mmp.curl_base(self.mmp.pop3s_port) + [
            "--user", "alice:" + pw, base], capture_output=True, timeout=90)
        self.assertEqual(r.returncode, 0, r.stderr)
        nums = [ln.split()[0] for ln in r.stdout.split(b"\r\n")
                if ln.split()[1:] == [b"%d" % len(msg)]]
        self.assertTrue(nums, r.stdout)
        r = subprocess.run(self.mmp.curl_base(self.mmp.pop3s_port) + [
            "--user", "alice:" + pw, base + nums[-1].decode()], capture_output=True, timeout=90)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertEqual(r.stdout, msg)

    def test_mbsync(self):
        if not ch.shutil.which("mbsync"):
            self.skipTest("mbsync not installed")
        msg = make_message(subject="mbsync via proxy", body="synced body\r\n")
        c = self.login("tls", "bob")
        c.append("Sent", None, None, msg)
        c.logout()
        with tempfile.TemporaryDirectory() as d:
            pwf = os.path.join(d, "pw")
            with open(pwf, "w") as f:
                f.write(self.srv.passwords["bob"])
            maildir = os.path.join(d, "mail") + "/"
            os.makedirs(maildir)
            rc = os.path.join(d, "mbsyncrc")
            with open(rc, "w") as f:
                f.write("IMAPAccount t\nHost %s\nPort %d\nUser bob\nPassCmd \"cat %s\"\n"
                        "SSLType IMAPS\nCertificateFile %s\nAuthMechs LOGIN PLAIN\n\n"
                        "IMAPStore remote\nAccount t\n\nMaildirStore local\nPath %s\n"
                        "Inbox %sINBOX\nSubFolders Verbatim\n\nChannel c\nFar :remote:\n"
                        "Near :local:\nPatterns Sent\nCreate Near\nSync Pull\nSyncState *\n"
                        % ("localhost", self.mmp.imaps_port, pwf, self.mmp.ca_file, maildir,
                           maildir))
            env = dict(os.environ)
            r = subprocess.run(["mbsync", "-c", rc, "c"], capture_output=True, timeout=120,
                               env=env, input=b"")
            # mbsync connects to Host by name: map coffer.test to 127.0.0.1 if needed
            if r.returncode != 0 and b"resolve" in r.stderr.lower():
                self.skipTest("coffer.test does not resolve here: %r" % r.stderr[-200:])
            self.assertEqual(r.returncode, 0, r.stderr + r.stdout)
            found = False
            for root, _dirs, files in os.walk(os.path.join(maildir, "Sent")):
                for fn in files:
                    with open(os.path.join(root, fn), "rb") as f:
                        data = f.read()
                    if b"synced body" in data and b"mbsync via proxy" in data:
                        found = True
            self.assertTrue(found)

    def test_store_proxy_port_needs_client_cert(self):
        port = int(self.srv.overrides["imap.listen_proxy"].rsplit(":", 1)[1])
        s = socket.create_connection((HOST, port), timeout=10)
        refused = False
        try:
            t = self.srv.ctx.wrap_socket(s)
            t.settimeout(10)
            data = t.recv(100)
            refused = data == b""
        except (ssl.SSLError, ConnectionError, OSError):
            refused = True
        self.assertTrue(refused, "store proxy port answered a client without certificate")

    def test_preauth_limits(self):
        r = self.mmp.raw_imap("tls")
        r.send("a1 LOGIN {9000}\r\n")
        self.assertTrue(r.readline().startswith(b"a1 BAD"))
        r.send("a2 LOGIN " + "x" * 9000 + "\r\n")
        closed, data = r.closed_by_server(10)
        self.assertTrue(closed)
        self.assertIn(b"BAD", data)
        r = self.mmp.raw_imap("tls")
        for i in range(3):
            r.send("b%d FROB\r\n" % i)
        closed, data = r.closed_by_server(10)
        self.assertTrue(closed)
        self.assertIn(b"* BYE", data)

    def test_reload_keeps_sessions(self):
        c = self.login("tls", "bob")
        c.select("INBOX")
        since = len(self.mmp.log())
        self.mmp.reload()
        self.mmp.wait_log(r"configuration and certificates reloaded", since=since)
        typ, _ = c.noop()
        self.assertEqual(typ, "OK")
        c2 = self.login("tls", "bob")
        c2.logout()
        c.logout()
        self.assertAlive()

    def test_help_matches_doc(self):
        out = subprocess.run([mh.MMP_BIN, "--help"], capture_output=True, timeout=10).stdout
        with open(os.path.join(ch.SOURCE_DIR, "docs", "coffer-mmp.md"), "rb") as f:
            doc = f.read()
        keys = re.findall(rb"^([a-z0-9_]+)\.([a-z0-9_]+) +(\S+)", out, re.M)
        self.assertGreater(len(keys), 40)
        for sec, key, default in keys:
            default = b"" if default == b'""' else default
            row = re.search(rb"^\| `%s` \| `%s` \|" % (key, re.escape(default)), self._section(doc, sec),
                            re.M)
            self.assertIsNotNone(row, "%s.%s (default %r) missing from docs/coffer-mmp.md" % (
                sec.decode(), key.decode(), default))

    @staticmethod
    def _section(doc, sec):
        m = re.search(rb"^## \[%s\]\n(.*?)(?=^## |\Z)" % sec, doc, re.M | re.S)
        return m.group(1) if m else b""


class ProxyBackendResume(mh.ProxyTestCase):
    """The proxy resumes its TLS sessions to the store (backend.tls_resume),
    and the store still trusts the resumed connection's client certificate
    (it takes the client address the proxy passes)."""
    proxy_config = {"proxy.log_level": "debug"}

    def test_backend_tls_resumed(self):
        since = len(self.srv.log())
        for i in range(3):
            c = self.mmp.imap("tls")
            c.login("alice", self.srv.passwords["alice"])
            typ, _ = c.select("INBOX")
            self.assertEqual(typ, "OK")
            c.logout()
        ch.wait_until(lambda: self.mmp.count_log(rb"TLS session new") >= 1, 15,
                      what="log lines %s >= 1" % rb"TLS session new")
        ch.wait_until(lambda: self.mmp.count_log(rb"TLS session resumed") >= 2, 15,
                      what="log lines %s >= 2" % rb"TLS session resumed")
        ch.wait_until(lambda: len(re.findall(rb"passed by trusted proxy", self.srv.log()[since:])) >= 3,
                      10, what="store trusting 3 proxied logins")
        self.assertAlive()


if __name__ == "__main__":
    ch.main()
