#!/usr/bin/env python3
"""APPEND then FETCH: byte-exact round trips (incl. 20 MiB), partial fetch,
\\Seen semantics, APPENDUID, RFC822.SIZE, BODYSTRUCTURE/ENVELOPE, curl."""
import hashlib
import os
import random
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from coffer_harness import (ServerTestCase, append, fetch_by_uid, fetches, main,  # noqa: E402
                            make_message, ok)


def big_message(size):
    """Deterministic message of about `size` bytes with 76-char CRLF lines."""
    rnd = random.Random(20)
    alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    line_count = size // 78
    table = bytes(rnd.choice(alphabet) for _ in range(4096))
    lines = []
    for i in range(line_count):
        off = (i * 37) % (4096 - 76)
        lines.append(table[off:off + 70] + b"%06d" % (i % 1000000))
    body = b"\r\n".join(lines) + b"\r\n"
    return make_message(subject="big one", extra_headers=["Content-Transfer-Encoding: 7bit"],
                        body=body)


def lower(x):
    if isinstance(x, list):
        return [lower(i) for i in x]
    if isinstance(x, bytes):
        return x.decode().lower()
    if x is None:
        return None
    return str(x).lower()


class AppendFetch(ServerTestCase):
    def setUp(self):
        self.c = self.srv.raw_login("alice")

    def tearDown(self):
        self.c.close()

    def fetch_uid(self, uid, items, mailbox="INBOX"):
        self.c.ok("SELECT " + mailbox)
        u = self.c.ok("UID FETCH %d (%s)" % (uid, items), timeout=120)
        by = fetch_by_uid(u)
        self.assertIn(uid, by, u)
        return by[uid]

    def test_append_fetch_exact(self):
        msg = make_message(subject="round trip", body="line one\r\nline two\r\n\r\nend\r\n")
        r = append(self.c, "INBOX", msg)
        self.assertIsNotNone(r, "APPEND OK lacks [APPENDUID ...]")
        uidv, uid = r
        self.assertGreater(uidv, 0)
        self.assertGreater(uid, 0)
        u = self.c.ok("SELECT INBOX")
        self.assertIn(b"[UIDVALIDITY %d]" % uidv, b"".join(u))
        d = self.fetch_uid(uid, "UID RFC822.SIZE FLAGS BODY.PEEK[]")
        self.assertEqual(d["BODY[]"], msg)
        self.assertEqual(int(d["RFC822.SIZE"]), len(msg))
        self.assertNotIn("\\Seen", [str(f) for f in d["FLAGS"]])

    def test_append_retry_is_idempotent(self):
        """A byte-identical APPEND of a message with a Message-ID (what a
        client resends after NO [UNAVAILABLE]) returns the first APPENDUID
        and stores nothing; without a Message-ID, or after EXPUNGE, or with
        other flags, it is a new message."""
        self.c.ok("CREATE Retry")
        msg = make_message(subject="retry me", body="only once\r\n")
        first = append(self.c, "Retry", msg, flags=["\\Seen"])
        again = append(self.c, "Retry", msg, flags=["\\Seen"])
        self.assertEqual(again, first)
        other_flags = append(self.c, "Retry", msg)
        self.assertNotEqual(other_flags, first)
        bare = b"From: a@coffer.test\r\nSubject: no id\r\n\r\ntwice\r\n"
        b1 = append(self.c, "Retry", bare)
        b2 = append(self.c, "Retry", bare)
        self.assertEqual(b2[1], b1[1] + 1)
        u = self.c.ok("SELECT Retry")
        self.assertIn(b"* 4 EXISTS", b"".join(u))
        by = fetch_by_uid(self.c.ok("UID FETCH 1:* (BODY.PEEK[])"))
        self.assertEqual(sorted(by), [first[1], other_flags[1], b1[1], b2[1]])
        self.assertEqual(by[first[1]]["BODY[]"], msg)
        # expunged: appending the same message again stores it again
        self.c.ok("UID STORE %d +FLAGS.SILENT (\\Deleted)" % first[1])
        self.c.ok("EXPUNGE")
        third = append(self.c, "Retry", msg, flags=["\\Seen"])
        self.assertEqual(third[0], first[0])
        self.assertGreater(third[1], b2[1])
        u = self.c.ok("NOOP")
        by = fetch_by_uid(self.c.ok("UID FETCH 1:* (UID)"))
        self.assertEqual(sorted(by), [other_flags[1], b1[1], b2[1], third[1]])
        self.c.ok("CLOSE")

    def test_peek_and_seen(self):
        msg = make_message(subject="seen test")
        _, uid = append(self.c, "INBOX", msg)
        self.c.ok("SELECT INBOX")
        u = self.c.ok("UID FETCH %d (BODY.PEEK[])" % uid)
        u = self.c.ok("UID FETCH %d (FLAGS)" % uid)
        self.assertNotIn("\\Seen", [str(f) for f in fetch_by_uid(u)[uid]["FLAGS"]])
        # BODY[] sets \Seen and reports FLAGS in the same FETCH response
        u = self.c.ok("UID FETCH %d (BODY[])" % uid)
        d = fetch_by_uid(u)[uid]
        self.assertEqual(d["BODY[]"], msg)
        self.assertIn("FLAGS", d, "FETCH BODY[] that sets \\Seen must include FLAGS: %r" % u)
        self.assertIn("\\Seen", [str(f) for f in d["FLAGS"]])
        u = self.c.ok("UID FETCH %d (FLAGS)" % uid)
        self.assertIn("\\Seen", [str(f) for f in fetch_by_uid(u)[uid]["FLAGS"]])
        # EXAMINE never sets \Seen
        _, uid2 = append(self.c, "INBOX", make_message(subject="examine"))
        self.c.ok("EXAMINE INBOX")
        self.c.ok("UID FETCH %d (BODY[])" % uid2)
        u = self.c.ok("UID FETCH %d (FLAGS)" % uid2)
        self.assertNotIn("\\Seen", [str(f) for f in fetch_by_uid(u)[uid2]["FLAGS"]])

    def test_partial_fetch(self):
        msg = make_message(subject="partial", body="0123456789" * 30 + "\r\n")
        _, uid = append(self.c, "INBOX", msg)
        d = self.fetch_uid(uid, "BODY.PEEK[]<0.100>")
        self.assertEqual(d.get("BODY[]<0>"), msg[:100], d)
        d = self.fetch_uid(uid, "BODY.PEEK[]<%d.100>" % (len(msg) - 10))
        self.assertEqual(d.get("BODY[]<%d>" % (len(msg) - 10)), msg[-10:], d)
        d = self.fetch_uid(uid, "BODY.PEEK[]<%d.5>" % (len(msg) + 50))
        self.assertEqual(d.get("BODY[]<%d>" % (len(msg) + 50)), b"", d)
        d = self.fetch_uid(uid, "BODY.PEEK[TEXT]<3.7>")
        body = msg[msg.index(b"\r\n\r\n") + 4:]
        self.assertEqual(d.get("BODY[TEXT]<3>"), body[3:10], d)
        d = self.fetch_uid(uid, "FLAGS")
        self.assertNotIn("\\Seen", [str(f) for f in d["FLAGS"]])

    def test_lf_is_normalised_to_crlf(self):
        crlf = make_message(subject="lf only", body="a\r\nb\r\n")
        lf = crlf.replace(b"\r\n", b"\n")
        _, uid = append(self.c, "INBOX", lf)
        d = self.fetch_uid(uid, "RFC822.SIZE BODY.PEEK[]")
        self.assertEqual(d["BODY[]"], crlf)
        self.assertEqual(int(d["RFC822.SIZE"]), len(crlf))

    def test_20mib_message(self):
        msg = big_message(20 * 1024 * 1024)
        self.assertGreater(len(msg), 20 * 1000 * 1000)
        _, uid = append(self.c, "INBOX", msg)
        d = self.fetch_uid(uid, "RFC822.SIZE BODY.PEEK[]")
        self.assertEqual(int(d["RFC822.SIZE"]), len(msg))
        got = d["BODY[]"]
        self.assertEqual(len(got), len(msg))
        self.assertEqual(hashlib.sha256(got).hexdigest(), hashlib.sha256(msg).hexdigest())
        # a partial fetch from the middle
        off = len(msg) // 2
        d = self.fetch_uid(uid, "BODY.PEEK[]<%d.4096>" % off)
        self.assertEqual(d["BODY[]<%d>" % off], msg[off:off + 4096])

    def test_envelope_bodystructure_simple(self):
        msg = make_message(subject="Hello there", frm="Alice Example <alice@example.org>",
                           to="bob@example.net", date="Tue, 03 Feb 2026 11:22:33 +0100",
                           msgid="<simple-1@example.org>", body="one\r\ntwo\r\nthree\r\n")
        _, uid = append(self.c, "INBOX", msg)
        d = self.fetch_uid(uid, "ENVELOPE BODYSTRUCTURE BODY.PEEK[1]")
        env = d["ENVELOPE"]
        self.assertEqual(env[0], b"Tue, 03 Feb 2026 11:22:33 +0100")
        self.assertEqual(env[1], b"Hello there")
        alice = [[b"Alice Example", None, b"alice", b"example.org"]]
        self.assertEqual(env[2], alice)  # from
        self.assertEqual(env[3], alice)  # sender defaults to from
        self.assertEqual(env[4], alice)  # reply-to defaults to from
        self.assertEqual(env[5], [[None, None, b"bob", b"example.net"]])
        self.assertIsNone(env[6])
        self.assertIsNone(env[7])
        self.assertIsNone(env[8])
        self.assertEqual(env[9], b"<simple-1@example.org>")
        bs = lower(d["BODYSTRUCTURE"])
        body = b"one\r\ntwo\r\nthree\r\n"
        self.assertEqual(bs[0:2], ["text", "plain"], bs)
        self.assertEqual(bs[2], ["charset", "us-ascii"], bs)
        self.assertEqual(bs[5], "7bit", bs)
        self.assertEqual(int(bs[6]), len(body), bs)
        self.assertEqual(int(bs[7]), 3, bs)
        self.assertEqual(d["BODY[1]"], body)

    def test_bodystructure_multipart(self):
        att = bytes(range(256)) * 4
        import base64
        b64 = base64.encodebytes(att).replace(b"\n", b"\r\n")
        text = b"See the attachment.\r\n"
        body = (b"--XYZ\r\n"
                b"Content-Type: text/plain; charset=utf-8\r\n"
                b"Content-Transfer-Encoding: 8bit\r\n\r\n" + text +
                b"\r\n--XYZ\r\n"
                b"Content-Type: application/octet-stream; name=\"data.bin\"\r\n"
                b"Content-Transfer-Encoding: base64\r\n"
                b"Content-Disposition: attachment; filename=\"data.bin\"\r\n\r\n" + b64 +
                b"\r\n--XYZ--\r\n")
        msg = make_message(subject="multipart", extra_headers=[
            'Content-Type: multipart/mixed; boundary="XYZ"'], body=body)
        _, uid = append(self.c, "INBOX", msg)
        d = self.fetch_uid(uid, "BODYSTRUCTURE BODY.PEEK[1] BODY.PEEK[2] BODY.PEEK[1.MIME]")
        bs = lower(d["BODYSTRUCTURE"])
        self.assertIsInstance(bs[0], list, bs)
        self.assertIsInstance(bs[1], list, bs)
        self.assertEqual(bs[2], "mixed", bs)
        p1, p2 = bs[0], bs[1]
        self.assertEqual(p1[0:2], ["text", "plain"])
        self.assertEqual(p1[2], ["charset", "utf-8"])
        self.assertEqual(p1[5], "8bit")
        self.assertEqual(int(p1[6]), len(d["BODY[1]"]))
        self.assertEqual(d["BODY[1]"], text)
        self.assertEqual(p2[0:2], ["application", "octet-stream"])
        self.assertEqual(p2[2], ["name", "data.bin"])
        self.assertEqual(p2[5], "base64")
        self.assertEqual(int(p2[6]), len(d["BODY[2]"]))
        self.assertEqual(base64.decodebytes(d["BODY[2]"]), att)
        # disposition in the extension data of part 2
        self.assertIn(["attachment", ["filename", "data.bin"]], p2[7:], p2)
        self.assertIn(b"Content-Type: text/plain; charset=utf-8", d["BODY[1.MIME]"])

    def test_curl_imaps_fetch(self):
        msg = make_message(subject="curl me", body="curl body\r\n.dot line\r\n")
        _, uid = append(self.c, "INBOX", msg)
        url = "imaps://coffer.test:%d/INBOX;UID=%d" % (self.srv.imaps_port, uid)
        r = subprocess.run(self.srv.curl_base(self.srv.imaps_port) +
                           ["-u", "alice:" + self.srv.passwords["alice"], url],
                           capture_output=True, timeout=90)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertEqual(r.stdout, msg)

    def test_fetch_multiple_and_star(self):
        self.c.ok("CREATE multi")
        sent = [make_message(subject="m%d" % i, body="body %d\r\n" % i) for i in range(5)]
        uids = [append(self.c, "multi", m)[1] for m in sent]
        self.assertEqual(uids, sorted(uids))
        self.assertEqual(len(set(uids)), 5)
        self.c.ok("SELECT multi")
        u = self.c.ok("FETCH 1:* (UID BODY.PEEK[])")
        got = fetches(u)
        self.assertEqual([m for m, _ in got], [1, 2, 3, 4, 5])
        self.assertEqual([d["BODY[]"] for _, d in got], sent)
        # n:* with n above every UID still returns the last message
        u = self.c.ok("UID FETCH %d:* (UID)" % (uids[-1] + 100))
        self.assertEqual(list(fetch_by_uid(u)), [uids[-1]])
        u, t = self.c.command("FETCH 9 (UID)")
        self.assertFalse(ok(t) and fetches(u), "FETCH of a nonexistent MSN returned data: %r" % u)


if __name__ == "__main__":
    main()
