#!/usr/bin/env python3
"""POP3: POP3S and STLS login, STAT/LIST sizes = RFC822.SIZE, RETR byte-exact
(dot-stuffing), UIDL stability, DELE+QUIT vs DELE without QUIT, plaintext
refusal, curl pop3s://."""
import os
import poplib
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from coffer_harness import (ServerTestCase, append, fetch_by_uid, main,  # noqa: E402
                            make_message)


class Pop3(ServerTestCase):
    server_users = ()
    n_users = 0

    def setUp(self):
        Pop3.n_users += 1
        self.user = "pop%d" % Pop3.n_users
        self.pw = self.srv.add_user(self.user)
        self.msgs = [
            make_message(subject="pop one", body="first\r\n"),
            make_message(subject="pop two", body=".starts with a dot\r\n..two dots\r\n.\r\nend\r\n"),
            make_message(subject="pop three", body=("line of text %d\r\n" * 40) % tuple(range(40))),
        ]
        c = self.srv.raw_imap("tls")
        c.login(self.user, self.pw)
        self.uids = [append(c, "INBOX", m)[1] for m in self.msgs]
        c.ok("SELECT INBOX")
        u = c.ok("UID FETCH 1:* (UID RFC822.SIZE)")
        self.sizes = {uid: int(d["RFC822.SIZE"]) for uid, d in fetch_by_uid(u).items()}
        self.uidvalidity = int(c.ok("STATUS INBOX (UIDVALIDITY)")[0].split(b"UIDVALIDITY ")[1].split(b")")[0])
        c.close()

    def login(self, mode="tls"):
        p = self.srv.pop3(mode)
        p.user(self.user)
        p.pass_(self.pw)
        return p

    def retr(self, p, n):
        resp, lines, octets = p.retr(n)
        self.assertTrue(resp.startswith(b"+OK"), resp)
        return b"\r\n".join(lines) + b"\r\n"

    def imap_uids(self):
        c = self.srv.raw_imap("tls")
        c.login(self.user, self.pw)
        c.ok("SELECT INBOX")
        uids = sorted(fetch_by_uid(c.ok("UID FETCH 1:* (UID)")))
        c.close()
        return uids

    def test_pop3s_stat_list_retr(self):
        p = self.login("tls")
        count, total = p.stat()
        self.assertEqual(count, 3)
        sizes = [self.sizes[u] for u in self.uids]
        self.assertEqual(sizes, [len(m) for m in self.msgs])
        self.assertEqual(total, sum(sizes))
        resp, listing, _ = p.list()
        self.assertEqual([tuple(map(int, x.split())) for x in listing],
                         [(i + 1, sizes[i]) for i in range(3)])
        self.assertTrue(p.list(2).startswith(b"+OK 2 %d" % sizes[1]))
        for i, m in enumerate(self.msgs):
            self.assertEqual(self.retr(p, i + 1), m)
        p.quit()

    def test_retr_raw_dot_stuffing(self):
        r = self.srv.raw(self.srv.pop3s_port, tls=True)
        self.assertTrue(r.readline().startswith(b"+OK"))
        self.assertTrue(r.cmd("USER " + self.user).startswith(b"+OK"))
        self.assertTrue(r.cmd("PASS " + self.pw).startswith(b"+OK"))
        st = r.cmd("RETR 2")
        self.assertTrue(st.startswith(b"+OK"), st)
        self.assertEqual(r.read_multiline(), self.msgs[1])
        st = r.cmd("TOP 3 2")
        self.assertTrue(st.startswith(b"+OK"), st)
        top = r.read_multiline()
        m = self.msgs[2]
        hdr_end = m.index(b"\r\n\r\n") + 4
        self.assertEqual(top, m[:hdr_end] + b"line of text 0\r\nline of text 1\r\n")
        self.assertTrue(r.cmd("QUIT").startswith(b"+OK"))
        r.close()

    def test_stls_login(self):
        p = self.srv.pop3("plain")
        caps = p.capa()
        self.assertIn("STLS", caps)
        p.stls(context=self.srv.ctx)
        caps = p.capa()
        self.assertNotIn("STLS", caps)
        p.user(self.user)
        p.pass_(self.pw)
        self.assertEqual(p.stat()[0], 3)
        self.assertEqual(self.retr(p, 1), self.msgs[0])
        p.quit()

    def test_stls_discards_pipelined_plaintext(self):
        r = self.srv.raw(self.srv.pop3_port, tls=False)
        self.assertTrue(r.readline().startswith(b"+OK"))
        r.send(b"STLS\r\nUSER " + self.user.encode() + b"\r\nPASS " + self.pw.encode() + b"\r\n")
        resp = r.readline()
        self.assertTrue(resp.startswith(b"+OK"), resp)
        r.starttls_wrap()
        # the pipelined USER/PASS must not have run: STAT is refused
        resp = r.cmd("STAT")
        self.assertTrue(resp.startswith(b"-ERR"), resp)
        self.assertTrue(r.cmd("USER " + self.user).startswith(b"+OK"))
        self.assertTrue(r.cmd("PASS " + self.pw).startswith(b"+OK"))
        self.assertTrue(r.cmd("STAT").startswith(b"+OK 3 "))
        r.cmd("QUIT")
        r.close()

    def test_plaintext_user_refused(self):
        r = self.srv.raw(self.srv.pop3_port, tls=False)
        self.assertTrue(r.readline().startswith(b"+OK"))
        resp = r.cmd("USER " + self.user)
        self.assertTrue(resp.startswith(b"-ERR"), resp)
        resp = r.cmd("PASS " + self.pw)
        self.assertTrue(resp.startswith(b"-ERR"), resp)
        resp = r.cmd("STAT")
        self.assertTrue(resp.startswith(b"-ERR"), resp)
        r.close()
        p = self.srv.pop3("plain")
        with self.assertRaises(poplib.error_proto):
            p.user(self.user)
            p.pass_(self.pw)
        p.close()

    def test_uidl_stable(self):
        p = self.login()
        _, l1, _ = p.uidl()
        p.quit()
        p = self.login()
        _, l2, _ = p.uidl()
        p.quit()
        self.assertEqual(l1, l2)
        expect = [b"%d %08x%08x" % (i + 1, self.uidvalidity, uid) for i, uid in enumerate(self.uids)]
        self.assertEqual(l1, expect)
        # UIDL stays with the message when an earlier one goes away
        p = self.login()
        p.dele(1)
        p.quit()
        p = self.login()
        _, l3, _ = p.uidl()
        p.quit()
        self.assertEqual([x.split()[1] for x in l3], [x.split()[1] for x in l1[1:]])

    def test_dele_quit_removes(self):
        p = self.login()
        p.dele(2)
        count, _ = p.stat()
        self.assertEqual(count, 2)  # deleted messages are left out of STAT
        with self.assertRaises(poplib.error_proto):
            p.retr(2)
        p.quit()
        self.assertEqual(self.imap_uids(), [self.uids[0], self.uids[2]])

    def test_dele_without_quit_removes_nothing(self):
        p = self.login()
        p.dele(1)
        p.dele(3)
        p.close()  # drop the connection without QUIT
        p = self.login()
        self.assertEqual(p.stat()[0], 3)
        p.dele(1)
        p.rset()
        p.quit()
        self.assertEqual(self.imap_uids(), self.uids)

    def test_curl_pop3s_retr(self):
        url = "pop3s://coffer.test:%d/2" % self.srv.pop3s_port
        r = subprocess.run(self.srv.curl_base(self.srv.pop3s_port) + ["-u", "%s:%s" % (self.user, self.pw), url],
                           capture_output=True, timeout=90)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertEqual(r.stdout, self.msgs[1])


if __name__ == "__main__":
    main()
