#!/usr/bin/env python3
"""Real clients against coffer-store: mbsync (isync) syncing a mailbox both
ways over IMAPS into a Maildir, and curl (imaps:// and pop3s://), with the
results compared byte for byte against what the server stores."""
import os
import re
import shutil
import subprocess
import sys
import tempfile
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from coffer_harness import (ServerTestCase, append, fetch_by_uid, fetches,  # noqa: E402
                            find_untagged, main, make_message, parse_imap, quote)

MBSYNC = shutil.which("mbsync")
CURL = shutil.which("curl")
WRITE_CMDS = re.compile(rb">>> \d+ (APPEND|UID STORE|STORE|EXPUNGE|UID EXPUNGE|UID MOVE|MOVE|COPY|"
                        rb"UID COPY|CREATE|DELETE)\b", re.I)


def lf(b):
    return b.replace(b"\r\n", b"\n")


def no_tuid(b):
    """mbsync writes an X-TUID header into the copies it stores in the Maildir
    (it finds its own new messages by it); that is the client's, not ours."""
    return re.sub(rb"(?m)^X-TUID: [^\r\n]*\r?\n", b"", b)


@unittest.skipIf(MBSYNC is None, "mbsync (isync) not installed")
class MbsyncSync(ServerTestCase):
    server_users = ("alice",)

    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="coffer-mbsync-")
        self.mail = os.path.join(self.dir, "mail")
        os.makedirs(self.mail)
        self.rc = os.path.join(self.dir, "mbsyncrc")
        with open(self.rc, "w") as f:
            f.write("""IMAPAccount coffer
Host localhost
Port %d
User alice
Pass %s
SSLType IMAPS
CertificateFile %s
Timeout 60

IMAPStore remote
Account coffer

MaildirStore local
Path %s/
Inbox %s/INBOX
SubFolders Verbatim

Channel ch
Far :remote:
Near :local:
Patterns sync1
Create Both
Expunge Both
SyncState *
Sync All
""" % (self.srv.imaps_port, self.srv.passwords["alice"], self.srv.ca_file, self.mail, self.mail))
        self.c = self.srv.raw_login("alice")

    def tearDown(self):
        self.c.close()
        shutil.rmtree(self.dir, ignore_errors=True)
        self.assertAlive()

    def mbsync(self, debug=False):
        argv = [MBSYNC, "-c", self.rc] + (["-Dn"] if debug else ["-q"]) + ["ch"]
        r = subprocess.run(argv, capture_output=True, timeout=120, stdin=subprocess.DEVNULL)
        self.assertEqual(r.returncode, 0, (r.stdout[-3000:], r.stderr[-3000:]))
        return r.stdout + r.stderr

    def server_msgs(self):
        """{uid: (flags, bytes)} of sync1 on the server."""
        self.c.ok("EXAMINE sync1")
        u = self.c.ok("UID FETCH 1:* (FLAGS BODY.PEEK[])")
        self.c.ok("UNSELECT")
        return {uid: (sorted(str(f) for f in d["FLAGS"] if str(f) != "\\Recent"), d["BODY[]"])
                for uid, d in fetch_by_uid(u).items()}

    def local_msgs(self):
        """{filename: bytes} of the Maildir folder sync1 (cur + new)."""
        res = {}
        for sub in ("cur", "new"):
            d = os.path.join(self.mail, "sync1", sub)
            if os.path.isdir(d):
                for n in os.listdir(d):
                    with open(os.path.join(d, n), "rb") as f:
                        res[sub + "/" + n] = no_tuid(f.read())
        return res

    def test_two_way_sync(self):
        c = self.c
        c.ok("CREATE sync1")
        body8 = "Grüße, 8-bit body\r\n.leading dot\r\n".encode()
        srv_msgs = [
            make_message(subject="one"),
            make_message(subject="two", body=body8, extra_headers=(
                "Content-Type: text/plain; charset=utf-8", "Content-Transfer-Encoding: 8bit")),
            make_message(subject="three", body="x" * 5000 + "\r\n"),
        ]
        append(c, "sync1", srv_msgs[0])
        append(c, "sync1", srv_msgs[1], flags=["\\Seen", "\\Flagged"])
        append(c, "sync1", srv_msgs[2], flags=["\\Seen"])

        # 1. far -> near: byte-exact (Maildir keeps LF line ends) and flags
        self.mbsync()
        local = self.local_msgs()
        self.assertEqual(sorted(local.values()), sorted(lf(m) for m in srv_msgs))
        flagged = [n for n, b in local.items() if b == lf(srv_msgs[1])][0]
        self.assertTrue(flagged.startswith("cur/") and flagged.endswith(":2,FS"), flagged)

        # 2. a second sync changes nothing on either side
        before_srv, before_local = self.server_msgs(), self.local_msgs()
        out = self.mbsync(debug=True)
        self.assertIsNone(WRITE_CMDS.search(out), out[-3000:])
        self.assertEqual(self.server_msgs(), before_srv)
        self.assertEqual(self.local_msgs(), before_local)

        # 3. near -> far: a new local message arrives byte-exact (CRLF on the server)
        new_local = b"From: me@coffer.test\nSubject: from maildir\nMessage-ID: <local1@x>\n\nlocal body\n"
        path = os.path.join(self.mail, "sync1", "new", "1700000000.1_1.local")
        with open(path, "wb") as f:
            f.write(new_local)
        out = self.mbsync(debug=True)
        # with UIDPLUS (APPENDUID) mbsync never has to look for its X-TUID
        self.assertNotIn(b"X-TUID)", out)
        self.assertIn(b"APPENDUID", out)
        msgs = self.server_msgs()
        bodies = [no_tuid(b) for _, b in msgs.values()]
        self.assertEqual(len(msgs), 4)
        matches = [b for b in bodies if b"Subject: from maildir" in b]
        self.assertEqual(len(matches), 1)
        self.assertEqual(matches[0], new_local.replace(b"\n", b"\r\n"))

        # 4. flag change on the server propagates to the Maildir name
        c.ok("SELECT sync1")
        uid_one = [u for u, (_, b) in msgs.items() if b == srv_msgs[0]][0]
        c.ok("UID STORE %d +FLAGS (\\Answered)" % uid_one)
        c.ok("UNSELECT")
        self.mbsync()
        name = [n for n, b in self.local_msgs().items() if b == lf(srv_msgs[0])][0]
        self.assertRegex(name, r":2,[A-Z]*R")

        # 5. deleted on the server -> gone locally
        c.ok("SELECT sync1")
        uid_three = [u for u, (_, b) in msgs.items() if b == srv_msgs[2]][0]
        c.ok("UID STORE %d +FLAGS.SILENT (\\Deleted)" % uid_three)
        c.ok("UID EXPUNGE %d" % uid_three)
        c.ok("UNSELECT")
        self.mbsync()
        local = self.local_msgs()
        self.assertNotIn(lf(srv_msgs[2]), local.values())
        self.assertEqual(len(local), 3)

        # 6. deleted locally -> expunged on the server
        gone = [n for n, b in local.items() if b == lf(srv_msgs[1])][0]
        os.unlink(os.path.join(self.mail, "sync1", gone))
        self.mbsync()
        msgs = self.server_msgs()
        self.assertEqual(len(msgs), 2)
        self.assertNotIn(srv_msgs[1], [b for _, b in msgs.values()])

        # 7. and the next sync is a no-op again
        before_srv, before_local = self.server_msgs(), self.local_msgs()
        out = self.mbsync(debug=True)
        self.assertIsNone(WRITE_CMDS.search(out), out[-3000:])
        self.assertEqual(self.server_msgs(), before_srv)
        self.assertEqual(self.local_msgs(), before_local)


@unittest.skipIf(CURL is None, "curl not installed")
class CurlClients(ServerTestCase):
    server_users = ("alice",)

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        c = cls.srv.raw_login("alice")
        cls.msgs = [
            make_message(subject="curl one", body="first\r\n"),
            make_message(subject="curl two", body="second\r\n.dotted\r\n"),
            make_message(subject="curl three", body="third\r\n"),
        ]
        cls.uids = [append(c, "INBOX", m)[1] for m in cls.msgs]
        c.ok("CREATE \"curl box/sub\"")
        c.close()

    def curl(self, url, *extra, port=None):
        port = port or self.srv.imaps_port
        argv = self.srv.curl_base(port) + ["--user", "alice:" + self.srv.passwords["alice"]]
        argv += list(extra) + [url]
        r = subprocess.run(argv, capture_output=True, timeout=90, stdin=subprocess.DEVNULL)
        self.assertEqual(r.returncode, 0, r.stderr)
        return r.stdout

    def imaps(self, path):
        return "imaps://coffer.test:%d/%s" % (self.srv.imaps_port, path)

    def pop3s(self, path):
        return "pop3s://coffer.test:%d/%s" % (self.srv.pop3s_port, path)

    def test_imaps_uid_fetch(self):
        for uid, m in zip(self.uids, self.msgs):
            self.assertEqual(self.curl(self.imaps("INBOX;UID=%d" % uid)), m)
        hdr = self.msgs[1][:self.msgs[1].index(b"\r\n\r\n") + 4]
        self.assertEqual(self.curl(self.imaps("INBOX;UID=%d;SECTION=HEADER" % self.uids[1])), hdr)
        self.assertEqual(self.curl(self.imaps("INBOX;UID=%d;SECTION=TEXT" % self.uids[1])),
                         b"second\r\n.dotted\r\n")

    def test_imaps_list(self):
        out = self.curl(self.imaps(""))
        c = self.srv.raw_login("alice")
        try:
            u = c.ok('LIST "" *')
        finally:
            c.close()
        self.assertEqual(out, b"".join(u))
        self.assertIn(b'* LIST (\\HasChildren) "/" "curl box"\r\n', out)

    def test_imaps_search_custom(self):
        out = self.curl(self.imaps("INBOX"), "-X", "SEARCH SUBJECT \"curl t\"")
        self.assertEqual(out, b"* SEARCH 2 3\r\n")
        out = self.curl(self.imaps("INBOX"), "-X", "UID SEARCH SUBJECT nothing-matches")
        self.assertEqual(out, b"* SEARCH\r\n")
        out = self.curl(self.imaps("INBOX"), "-X", "UID FETCH %d (RFC822.SIZE)" % self.uids[0])
        self.assertEqual(out, b"* 1 FETCH (UID %d RFC822.SIZE %d)\r\n" % (self.uids[0], len(self.msgs[0])))

    def test_pop3s_list_retr(self):
        out = self.curl(self.pop3s(""), port=self.srv.pop3s_port)
        self.assertEqual(out, b"".join(b"%d %d\r\n" % (i + 1, len(m)) for i, m in enumerate(self.msgs)))
        for i, m in enumerate(self.msgs):
            self.assertEqual(self.curl(self.pop3s("%d" % (i + 1)), port=self.srv.pop3s_port), m)
        out = self.curl(self.pop3s(""), "-X", "UIDL", port=self.srv.pop3s_port)
        lines = out.split(b"\r\n")[:-1]
        self.assertEqual([ln.split(b" ")[0] for ln in lines], [b"1", b"2", b"3"])


if __name__ == "__main__":
    main()
