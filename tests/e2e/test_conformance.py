#!/usr/bin/env python3
"""Protocol conformance: scripted raw IMAP and POP3 sessions, one test per
rule of /work/shared/notes/protocol-pitfalls.md that the server must get
right (RFC 3501, RFC 2683, RFC 1939/2449/2595, RFC 4315, RFC 2971).

Where the RFC fixes the bytes, the test compares bytes exactly."""
import base64
import os
import re
import socket
import ssl
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from coffer_harness import (CRLF, HOST, Lit, RawIMAP, ServerTestCase, append,  # noqa: E402
                            auth_plain, fetch_by_uid, fetches, find_untagged, main,
                            make_message, ok, parse_imap, quote, resp_code, search_result,
                            status_word, wait_until)

MULTI = (
    b"From: a@coffer.test\r\n"
    b"To: b@coffer.test\r\n"
    b"Subject: multi\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: multipart/mixed; boundary=\"XX\"\r\n"
    b"\r\n"
    b"preamble\r\n"
    b"--XX\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"\r\n"
    b"part one\r\n"
    b"--XX\r\n"
    b"Content-Type: message/rfc822\r\n"
    b"\r\n"
    b"Subject: inner\r\n"
    b"From: c@coffer.test\r\n"
    b"\r\n"
    b"inner body\r\n"
    b"--XX--\r\n"
)


def untagged_lines(u):
    return [r for r in u if r.startswith(b"* ")]


def expunges(u):
    return [int(r.split(b" ")[1]) for r in u if re.match(rb"\* \d+ EXPUNGE\r\n$", r)]


class Conformance(ServerTestCase):
    server_users = ("alice", "bob", "carol", "dave")

    def setUp(self):
        self.c = self.srv.raw_login("alice")
        self.extra = []

    def tearDown(self):
        self.c.close()
        for x in self.extra:
            x.close()
        self.assertAlive()

    def login(self, user="alice"):
        c = self.srv.raw_login(user)
        self.extra.append(c)
        return c

    def fill(self, mbox, n, c=None, prefix="m"):
        c = c or self.c
        c.ok("CREATE " + quote(mbox))
        msgs = [make_message(subject="%s %d" % (prefix, i), body="body %d\r\n" % i) for i in range(n)]
        uids = [append(c, mbox, m)[1] for m in msgs]
        return msgs, uids

    # ------------------------------------------------------------ literals

    def test_append_trycreate_before_literal(self):
        """RFC 3501 6.3.11 / pitfalls 2: NO [TRYCREATE] instead of '+'."""
        c = self.c
        c.send(b"t1 APPEND \"no-such-box\" (\\Seen) {5}\r\n")
        r = c.read_response()
        self.assertTrue(r.startswith(b"t1 NO [TRYCREATE]"), r)
        # the client sends no literal; the session goes on normally
        c.send(b"t2 NOOP\r\n")
        self.assertTrue(c.read_response().startswith(b"t2 OK"))
        # mailbox name itself as a literal, then the message literal
        c.send(b"t3 APPEND {7}\r\n")
        self.assertTrue(c.read_response().startswith(b"+"))
        c.send(b"nothere {5}\r\n")
        r = c.read_response()
        self.assertTrue(r.startswith(b"t3 NO [TRYCREATE]"), r)
        # existing mailbox: '+' and APPENDUID
        u, t = c.command("APPEND INBOX ", Lit(make_message()))
        self.assertTrue(ok(t) and resp_code(t, "APPENDUID"), t)
        # LITERAL+ to a missing mailbox: bytes already sent, so NO without BYE
        msg = make_message()
        c.send(b"t4 APPEND nothere {%d+}\r\n" % len(msg) + msg + b"\r\n")
        r = c.read_response()
        self.assertTrue(r.startswith(b"t4 NO [TRYCREATE]"), r)
        c.send(b"t5 NOOP\r\n")
        self.assertTrue(c.read_response().startswith(b"t5 OK"))

    def test_bare_crlf_ignored(self):
        c = self.c
        c.send(b"\r\n\r\nx1 NOOP\r\n")
        r = c.read_response()
        self.assertEqual(r, b"x1 OK NOOP completed.\r\n")

    # ------------------------------------------------------------ EXPUNGE timing

    def test_expunge_timing_and_burst(self):
        """EXPUNGE never during FETCH/STORE/SEARCH; at NOOP; MSNs renumber
        within the burst (RFC 3501 7.4.1)."""
        _, uids = self.fill("exp1", 6)
        a = self.c
        a.ok("SELECT exp1")
        b = self.login()
        b.ok("SELECT exp1")
        # expunge MSNs 2,3,5 from the other session
        b.ok("UID STORE %d,%d,%d +FLAGS.SILENT (\\Deleted)" % (uids[1], uids[2], uids[4]))
        b.ok("EXPUNGE")
        for cmd in ("FETCH 1:* (FLAGS)", "STORE 1 +FLAGS (\\Flagged)", "SEARCH ALL",
                    "FETCH 2 (UID)"):
            u = a.ok(cmd)
            self.assertEqual(expunges(u), [], (cmd, u))
        u = a.ok("SEARCH ALL")
        # still the old numbering (expunged messages match nothing: RFC 2180 4.3)
        self.assertEqual(search_result(u), [1, 4, 6])
        u = a.ok("NOOP")
        # 2, then old 3 is now 2, then old 5 is now 3
        self.assertEqual(expunges(u), [2, 2, 3])
        self.assertEqual(find_untagged(u, "EXISTS"), [])  # no extra (lower) EXISTS
        u = a.ok("UID SEARCH ALL")
        self.assertEqual(search_result(u), [uids[0], uids[3], uids[5]])
        u = a.ok("SEARCH ALL")
        self.assertEqual(search_result(u), [1, 2, 3])

    def test_expunge_allowed_at_uid_commands_and_check(self):
        _, uids = self.fill("exp2", 3)
        a = self.c
        a.ok("SELECT exp2")
        b = self.login()
        b.ok("SELECT exp2")
        b.ok("UID STORE %d +FLAGS.SILENT (\\Deleted)" % uids[0])
        b.ok("UID EXPUNGE %d" % uids[0])
        u = a.ok("UID FETCH 1:* (FLAGS)")  # may carry the EXPUNGE; then it must be consistent
        got = expunges(u)
        if not got:
            u = a.ok("CHECK")
            got = expunges(u)
        self.assertEqual(got, [1])
        b.ok("UID STORE %d +FLAGS.SILENT (\\Deleted)" % uids[1])
        b.ok("UID EXPUNGE %d" % uids[1])
        u = a.ok("CHECK")
        self.assertEqual(expunges(u), [1])

    def test_fetch_of_message_expunged_elsewhere(self):
        """RFC 2180 4.1: FETCH of a message another session expunged must not
        renumber: no EXPUNGE, and the other messages keep their MSNs."""
        _, uids = self.fill("exp3", 3)
        a = self.c
        a.ok("SELECT exp3")
        b = self.login()
        b.ok("SELECT exp3")
        b.ok("UID STORE %d +FLAGS.SILENT (\\Deleted)" % uids[1])
        b.ok("EXPUNGE")
        u = a.ok("FETCH 1:3 (UID)")
        self.assertEqual(expunges(u), [])
        got = {msn: int(d["UID"]) for msn, d in fetches(u)}
        self.assertEqual(got.get(1), uids[0])
        self.assertEqual(got.get(3), uids[2])
        self.assertEqual(expunges(a.ok("NOOP")), [2])

    def test_idle_gets_expunge_and_exists(self):
        _, uids = self.fill("idle1", 2)
        a = self.c
        a.ok("SELECT idle1")
        b = self.login()
        b.ok("SELECT idle1")
        a.send(b"i1 IDLE\r\n")
        self.assertTrue(a.readline().startswith(b"+ "))
        b.ok("UID STORE %d +FLAGS.SILENT (\\Deleted)" % uids[0])
        b.ok("EXPUNGE")
        seen = []
        while b"* 1 EXPUNGE\r\n" not in seen:
            seen.append(a.readline(timeout=10))
        append(b, "idle1", make_message())
        while b"* 2 EXISTS\r\n" not in seen:
            seen.append(a.readline(timeout=10))
        a.send(b"DoNe\r\n")
        r = a.wait_tagged("i1")
        self.assertTrue(r.startswith(b"i1 OK"), r)

    # ------------------------------------------------------------ sequence sets

    def test_uid_range_star_beyond_max(self):
        """RFC 3501 6.4.8: n:* includes the last message even if n > max UID."""
        _, uids = self.fill("star1", 3)
        c = self.c
        c.ok("SELECT star1")
        u = c.ok("UID FETCH %d:* (FLAGS)" % (uids[-1] + 100))
        self.assertEqual(sorted(fetch_by_uid(u)), [uids[-1]])
        u = c.ok("UID FETCH * (UID)")
        self.assertEqual(sorted(fetch_by_uid(u)), [uids[-1]])
        u = c.ok("FETCH * (UID)")
        self.assertEqual([m for m, _ in fetches(u)], [3])
        u = c.ok("FETCH 3:2 (UID)")  # either order
        self.assertEqual(sorted(m for m, _ in fetches(u)), [2, 3])
        u = c.ok("UID SEARCH UID %d:*" % (uids[-1] + 50))
        self.assertEqual(search_result(u), [uids[-1]])
        u = c.ok("UID FETCH %d:%d (UID)" % (uids[-1] + 1, uids[-1] + 9))
        self.assertEqual(fetches(u), [])

    def test_empty_search(self):
        self.fill("srch0", 1)
        c = self.c
        c.ok("SELECT srch0")
        u = c.ok("SEARCH SUBJECT \"no such thing anywhere\"")
        self.assertEqual(u, [b"* SEARCH\r\n"])
        u = c.ok("UID SEARCH DELETED")
        self.assertEqual(u, [b"* SEARCH\r\n"])

    def test_search_utf8_charset(self):
        """8-bit search strings: quoted (as mutt/alpine send) and as a
        literal (Thunderbird, mbsync)."""
        c = self.c
        c.ok("CREATE srch8")
        m = make_message(subject="=?UTF-8?B?" + base64.b64encode("Grüße aus Köln".encode()).decode() + "?=",
                         body="Straße und Brücke\r\n".encode(), extra_headers=(
                             "Content-Type: text/plain; charset=utf-8",
                             "Content-Transfer-Encoding: 8bit"))
        append(c, "srch8", m)
        append(c, "srch8", make_message(subject="plain"))
        c.ok("SELECT srch8")
        u = c.ok(b"SEARCH CHARSET UTF-8 SUBJECT \"gr\xc3\xbc\xc3\x9fe\"")
        self.assertEqual(search_result(u), [1])
        u = c.ok("SEARCH CHARSET UTF-8 BODY ", Lit("BRÜCKE".encode()))
        self.assertEqual(search_result(u), [1])
        u = c.ok("SEARCH CHARSET UTF-8 TEXT ", Lit("köln".encode(), nonsync=True))
        self.assertEqual(search_result(u), [1])
        u = c.ok("UID SEARCH CHARSET utf-8 SUBJECT ", Lit("plain"))
        self.assertEqual(len(search_result(u)), 1)
        u, t = c.command("SEARCH CHARSET KOI8-X SUBJECT x")
        self.assertEqual(status_word(t), "NO")
        self.assertIn(b"[BADCHARSET", t)

    # ------------------------------------------------------------ FETCH

    def _one(self, mbox, msg):
        c = self.c
        c.ok("CREATE " + quote(mbox))
        append(c, mbox, msg)
        c.ok("SELECT " + quote(mbox))
        return c

    def test_partial_fetch_boundaries(self):
        msg = make_message(body="0123456789\r\n")
        c = self._one("part1", msg)
        n = len(msg)
        # the count is an nz-number (RFC 3501 9 / RFC 9051 9): <0.0> is a syntax error
        u, t = c.command("FETCH 1 (BODY.PEEK[]<0.0>)")
        self.assertEqual(status_word(t), "BAD")
        self.assertEqual(status_word(c.command("NOOP")[1]), "OK")
        u = c.ok("FETCH 1 (BODY.PEEK[]<%d.10>)" % (n + 5))
        self.assertEqual(u, [b'* 1 FETCH (BODY[]<%d> "")\r\n' % (n + 5)])
        u = c.ok("FETCH 1 (BODY.PEEK[]<%d.100>)" % (n - 4))
        self.assertEqual(u, [b"* 1 FETCH (BODY[]<%d> {4}\r\n" % (n - 4) + msg[-4:] + b")\r\n"])
        u = c.ok("FETCH 1 (BODY.PEEK[]<0.7>)")
        self.assertEqual(u, [b"* 1 FETCH (BODY[]<0> {7}\r\n" + msg[:7] + b")\r\n"])
        u = c.ok("FETCH 1 (BODY.PEEK[TEXT]<2.3>)")
        self.assertEqual(u, [b"* 1 FETCH (BODY[TEXT]<2> {3}\r\n234)\r\n"])
        u = c.ok("FETCH 1 (BODY.PEEK[]<%d.1>)" % n)  # origin exactly at the end
        self.assertEqual(u, [b'* 1 FETCH (BODY[]<%d> "")\r\n' % n])

    def test_header_fields_exact(self):
        msg = (b"From: a@coffer.test\r\nX-Dup: one\r\nSubject: hello\r\n world\r\n"
               b"To: b@coffer.test\r\nx-dup: two\r\n\r\nbody\r\n")
        c = self._one("hf1", msg)
        u = c.ok("FETCH 1 (BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
        exp = b"Subject: hello\r\n world\r\n\r\n"
        self.assertEqual(u, [b"* 1 FETCH (BODY[HEADER.FIELDS (SUBJECT)] {%d}\r\n" % len(exp) + exp + b")\r\n"])
        u = c.ok("FETCH 1 (BODY.PEEK[HEADER.FIELDS (x-DUP from)])")
        exp = b"From: a@coffer.test\r\nX-Dup: one\r\nx-dup: two\r\n\r\n"
        self.assertEqual(u, [b"* 1 FETCH (BODY[HEADER.FIELDS (x-DUP from)] {%d}\r\n" % len(exp) + exp + b")\r\n"])
        u = c.ok("FETCH 1 (BODY.PEEK[HEADER.FIELDS.NOT (X-DUP SUBJECT TO)])")
        exp = b"From: a@coffer.test\r\n\r\n"
        self.assertEqual(u, [b"* 1 FETCH (BODY[HEADER.FIELDS.NOT (X-DUP SUBJECT TO)] {%d}\r\n" % len(exp)
                             + exp + b")\r\n"])
        # no matching field: just the blank line
        u = c.ok("FETCH 1 (BODY.PEEK[HEADER.FIELDS (NEWSGROUPS)])")
        self.assertEqual(u, [b"* 1 FETCH (BODY[HEADER.FIELDS (NEWSGROUPS)] {2}\r\n\r\n)\r\n"])
        u = c.ok("FETCH 1 (BODY.PEEK[HEADER])")
        hdr = msg[:msg.index(b"\r\n\r\n") + 4]
        self.assertEqual(u, [b"* 1 FETCH (BODY[HEADER] {%d}\r\n" % len(hdr) + hdr + b")\r\n"])

    def test_sections_single_and_multipart(self):
        single = make_message(body="just text\r\n")
        c = self.c
        c.ok("CREATE sec1")
        append(c, "sec1", single)
        append(c, "sec1", MULTI)
        c.ok("SELECT sec1")
        u = c.ok("FETCH 1 (BODY.PEEK[1])")
        self.assertEqual(u, [b"* 1 FETCH (BODY[1] {11}\r\njust text\r\n)\r\n"])
        u = c.ok("FETCH 1 (BODY.PEEK[1.MIME])")
        self.assertEqual(len(fetches(u)), 1)
        # multipart: part MIME headers, text part, message/rfc822 part
        d = fetches(c.ok("FETCH 2 (BODY.PEEK[1.MIME])"))[0][1]
        self.assertEqual(d["BODY[1.MIME]"], b"Content-Type: text/plain; charset=utf-8\r\n\r\n")
        d = fetches(c.ok("FETCH 2 (BODY.PEEK[1])"))[0][1]
        self.assertEqual(d["BODY[1]"], b"part one")
        inner = b"Subject: inner\r\nFrom: c@coffer.test\r\n\r\ninner body"
        d = fetches(c.ok("FETCH 2 (BODY.PEEK[2])"))[0][1]
        self.assertEqual(d["BODY[2]"], inner)
        d = fetches(c.ok("FETCH 2 (BODY.PEEK[2.HEADER])"))[0][1]
        self.assertEqual(d["BODY[2.HEADER]"], b"Subject: inner\r\nFrom: c@coffer.test\r\n\r\n")
        d = fetches(c.ok("FETCH 2 (BODY.PEEK[2.TEXT])"))[0][1]
        self.assertEqual(d["BODY[2.TEXT]"], b"inner body")
        d = fetches(c.ok("FETCH 2 (BODY.PEEK[2.1])"))[0][1]
        self.assertEqual(d["BODY[2.1]"], b"inner body")
        d = fetches(c.ok("FETCH 2 (BODY.PEEK[2.MIME])"))[0][1]
        self.assertEqual(d["BODY[2.MIME]"], b"Content-Type: message/rfc822\r\n\r\n")
        # HEADER of a non-message part is not defined: NIL or an error, not bytes
        u, t = c.command("FETCH 2 (BODY.PEEK[1.HEADER])")
        if ok(t):
            self.assertIsNone(fetches(u)[0][1]["BODY[1.HEADER]"])
        # nonexistent part
        u, t = c.command("FETCH 2 (BODY.PEEK[9])")
        if ok(t):
            self.assertIsNone(fetches(u)[0][1]["BODY[9]"])

    def test_size_matches_body_and_seen(self):
        c = self.c
        c.ok("CREATE size1")
        msgs = [make_message(body="x" * 100 + "\r\n"), MULTI, b"Subject: lf only\n\nbare lf\nline\n"]
        for m in msgs:
            append(c, "size1", m)
        c.ok("EXAMINE size1")
        u = c.ok("FETCH 1:* (RFC822.SIZE BODY[])")  # EXAMINE: nothing sets \Seen
        for msn, d in fetches(u):
            self.assertEqual(int(d["RFC822.SIZE"]), len(d["BODY[]"]))
            self.assertNotIn("FLAGS", d)
        self.assertEqual(fetches(u)[2][1]["BODY[]"], b"Subject: lf only\r\n\r\nbare lf\r\nline\r\n")
        c.ok("SELECT size1")
        u = c.ok("FETCH 1 (BODY[HEADER.FIELDS (SUBJECT)])")
        d = fetches(u)
        flags = [f for _, x in d if "FLAGS" in x for f in x["FLAGS"]]
        self.assertIn("\\Seen", flags)
        self.assertNotIn(b"BODY.PEEK", b"".join(u))
        u = c.ok("FETCH 2 (BODY.PEEK[TEXT] FLAGS)")
        self.assertNotIn("\\Seen", fetches(u)[0][1]["FLAGS"])
        u = c.ok("FETCH 2 (RFC822.HEADER)")
        self.assertNotIn("\\Seen", [f for _, x in fetches(c.ok("FETCH 2 FLAGS")) for f in x["FLAGS"]])

    def test_select_unseen_is_msn(self):
        c = self.c
        c.ok("CREATE uns1")
        for i in range(4):
            append(c, "uns1", make_message(), flags=["\\Seen"] if i < 2 else None)
        u = c.ok("SELECT uns1")
        self.assertIn(b"* OK [UNSEEN 3]", b"".join(u))
        self.assertTrue(any(r.startswith(b"* OK [PERMANENTFLAGS (") and b"\\*" in r for r in u))
        self.assertIn(b"[READ-WRITE]", c.last_tagged)
        u = c.ok("STATUS uns1 (UNSEEN MESSAGES UIDNEXT UIDVALIDITY)")  # of the selected mailbox
        st = parse_imap(find_untagged(u, "STATUS")[0])
        vals = dict(zip(st[3][0::2], st[3][1::2]))
        self.assertEqual(vals["UNSEEN"], "2")
        self.assertEqual(vals["MESSAGES"], "4")
        c.ok("EXAMINE uns1")
        self.assertIn(b"[READ-ONLY]", c.last_tagged)

    # ------------------------------------------------------------ mailboxes

    def list_names(self, c, cmd):
        res = {}
        for r in c.ok(cmd):
            t = parse_imap(r)
            if len(t) >= 5 and t[1] in ("LIST", "LSUB"):
                res[t[4].decode() if isinstance(t[4], bytes) else str(t[4])] = [str(x) for x in t[2]]
        return res

    def test_list_separator(self):
        u = self.c.ok('LIST "" ""')
        self.assertEqual(u, [b'* LIST (\\Noselect) "/" ""\r\n'])
        u = self.c.ok('NAMESPACE')
        self.assertEqual(u, [b'* NAMESPACE (("" "/")) NIL NIL\r\n'])

    def test_lsub_noselect_parent(self):
        c = self.login("bob")
        c.ok("CREATE lp/child")
        c.ok("SUBSCRIBE lp/child")
        res = self.list_names(c, 'LSUB "" %')
        self.assertIn("lp", res)
        self.assertIn("\\Noselect", res["lp"])
        res = self.list_names(c, 'LSUB "" *')
        self.assertIn("lp/child", res)
        self.assertNotIn("lp", res)

    def test_subscription_survives_delete(self):
        c = self.login("bob")
        c.ok("CREATE gone1")
        c.ok("SUBSCRIBE gone1")
        c.ok("DELETE gone1")
        res = self.list_names(c, 'LSUB "" *')
        self.assertIn("gone1", res)
        c.ok("UNSUBSCRIBE gone1")
        self.assertNotIn("gone1", self.list_names(c, 'LSUB "" *'))

    def test_inbox_case_insensitive(self):
        c = self.login("carol")
        for name in ("inbox", "Inbox", '"iNbOx"'):
            u = c.ok("SELECT " + name)
            c.ok("UNSELECT")
        append(c, "inbox", make_message())
        u = c.ok("STATUS InBoX (MESSAGES)")
        self.assertIn(b"".join(u), (b"* STATUS INBOX (MESSAGES 1)\r\n", b'* STATUS "INBOX" (MESSAGES 1)\r\n'))
        c.ok("CREATE inbox/child")
        res = self.list_names(c, 'LIST "" "INBOX/*"')
        self.assertEqual(list(res), ["INBOX/child"])
        res = self.list_names(c, 'LIST "" "inbox/%"')
        self.assertEqual(list(res), ["INBOX/child"])
        u, t = c.command("DELETE Inbox")
        self.assertEqual(status_word(t), "NO")
        u, t = c.command("CREATE INBOX")
        self.assertEqual(status_word(t), "NO")

    def test_uidvalidity_grows_on_recreate(self):
        c = self.c

        def uv(name):
            u = c.ok("STATUS %s (UIDVALIDITY UIDNEXT)" % name)
            t = parse_imap(find_untagged(u, "STATUS")[0])
            v = dict(zip(t[3][0::2], t[3][1::2]))
            return int(v["UIDVALIDITY"]), int(v["UIDNEXT"])

        c.ok("CREATE uv1")
        first = uv("uv1")[0]
        c.ok("DELETE uv1")
        c.ok("CREATE uv1")
        self.assertGreater(uv("uv1")[0], first)
        second = uv("uv1")[0]
        c.ok("RENAME uv1 uv2")
        c.ok("CREATE uv1")
        self.assertGreater(uv("uv1")[0], second)

    def test_rename_inbox(self):
        c = self.login("dave")
        msgs = [make_message(subject="r%d" % i) for i in range(3)]
        for m in msgs:
            append(c, "INBOX", m)
        u = c.ok("STATUS INBOX (UIDVALIDITY UIDNEXT)")
        t = parse_imap(find_untagged(u, "STATUS")[0])
        before = dict(zip(t[3][0::2], t[3][1::2]))
        c.ok("CREATE INBOX/kid")
        c.ok("RENAME INBOX old-inbox")
        u = c.ok("STATUS INBOX (MESSAGES UIDVALIDITY UIDNEXT)")
        t = parse_imap(find_untagged(u, "STATUS")[0])
        inbox = dict(zip(t[3][0::2], t[3][1::2]))
        self.assertEqual(inbox["MESSAGES"], "0")
        # the old (uidvalidity, uid) pairs must never name another message
        if inbox["UIDVALIDITY"] == before["UIDVALIDITY"]:
            self.assertGreaterEqual(int(inbox["UIDNEXT"]), int(before["UIDNEXT"]))
        else:
            self.assertGreater(int(inbox["UIDVALIDITY"]), int(before["UIDVALIDITY"]))
        c.ok("SELECT old-inbox")
        u = c.ok("UID FETCH 1:* (BODY.PEEK[])")
        got = [d["BODY[]"] for _, d in sorted(fetches(u))]
        self.assertEqual(got, msgs)
        maxuid = max(int(d["UID"]) for _, d in fetches(u))
        u = c.ok("STATUS old-inbox (UIDNEXT)")
        t = parse_imap(find_untagged(u, "STATUS")[0])
        self.assertGreater(int(t[3][1]), maxuid)
        uv, uid = append(c, "old-inbox", make_message())
        self.assertGreater(uid, maxuid)
        # INBOX's children stay where they are
        self.assertIn("INBOX/kid", self.list_names(c, 'LIST "" *'))
        self.assertNotIn("old-inbox/kid", self.list_names(c, 'LIST "" *'))
        # INBOX still works
        uv2, uid2 = append(c, "INBOX", make_message())
        self.assertTrue(uid2 >= 1)

    def test_delete_with_children(self):
        c = self.c
        c.ok("CREATE dp/kid")
        append(c, "dp", make_message())
        c.ok("DELETE dp")  # RFC 3501 6.3.4: allowed; dp becomes \Noselect
        res = self.list_names(c, 'LIST "" dp*')
        self.assertIn("dp/kid", res)
        self.assertIn("dp", res)
        self.assertIn("\\Noselect", res["dp"])
        u, t = c.command("SELECT dp")
        self.assertEqual(status_word(t), "NO")
        # deleting a \Noselect name that still has children is an error
        u, t = c.command("DELETE dp")
        self.assertEqual(status_word(t), "NO")
        c.ok("DELETE dp/kid")
        self.assertEqual(self.list_names(c, 'LIST "" dp*'), {})

    # ------------------------------------------------------------ session state

    def test_logout_and_drop_never_expunge(self):
        _, uids = self.fill("lo1", 2)
        c = self.login()
        c.ok("SELECT lo1")
        c.ok("STORE 1:2 +FLAGS.SILENT (\\Deleted)")
        c.send(b"l1 LOGOUT\r\n")
        self.assertTrue(c.closed_by_server(10)[0])
        c2 = self.login()
        c2.ok("SELECT lo1")
        c2.ok("STORE 1 -FLAGS.SILENT (\\Deleted)")
        c2.sock.close()  # dropped connection
        c3 = self.login()
        u = c3.ok("STATUS lo1 (MESSAGES)")
        self.assertIn(b"(MESSAGES 2)", b"".join(u))

    def test_close_silent_unselect_keeps(self):
        _, uids = self.fill("cl1", 3)
        c = self.c
        c.ok("SELECT cl1")
        c.ok("STORE 1 +FLAGS.SILENT (\\Deleted)")
        u = c.ok("UNSELECT")
        self.assertEqual(u, [])
        self.assertIn(b"(MESSAGES 3)", b"".join(c.ok("STATUS cl1 (MESSAGES)")))
        c.ok("SELECT cl1")
        u = c.ok("CLOSE")
        self.assertEqual(u, [])  # no EXPUNGE responses
        self.assertIn(b"(MESSAGES 2)", b"".join(c.ok("STATUS cl1 (MESSAGES)")))
        c.ok("EXAMINE cl1")
        c.ok("CLOSE")  # read-only: expunges nothing
        u, t = c.command("FETCH 1 FLAGS")
        self.assertEqual(status_word(t), "BAD")  # no mailbox selected

    def test_id_in_every_state(self):
        raw = self.srv.raw_imap("tls")
        self.extra.append(raw)
        u = raw.ok('ID ("name" "conformance" "version" "1")')
        self.assertTrue(u and u[0].startswith(b"* ID "), u)
        u = raw.ok("ID NIL")
        self.assertTrue(u[0].startswith(b"* ID "))
        raw.login("alice", self.srv.passwords["alice"])
        self.assertTrue(raw.ok("ID NIL")[0].startswith(b"* ID "))
        raw.ok("SELECT INBOX")
        self.assertTrue(raw.ok("ID NIL")[0].startswith(b"* ID "))

    def test_capabilities_change(self):
        raw = RawIMAP(self.srv.imap_port, mode="plain", ctx=self.srv.ctx)
        self.extra.append(raw)
        g = raw.greeting
        self.assertIn(b"STARTTLS", g)
        self.assertIn(b"LOGINDISABLED", g)
        u, t = raw.command('LOGIN "alice" "x"')
        self.assertEqual(status_word(t), "NO")
        raw.starttls()
        caps = raw.ok("CAPABILITY")[0]
        self.assertNotIn(b"STARTTLS", caps)
        self.assertNotIn(b"LOGINDISABLED", caps)
        self.assertIn(b"AUTH=PLAIN", caps)
        raw.login("alice", self.srv.passwords["alice"])
        t = raw.last_tagged
        code = resp_code(t, "CAPABILITY")
        self.assertIsNotNone(code, t)
        self.assertIn("IMAP4rev1", code)
        self.assertNotIn("STARTTLS", code)
        self.assertNotIn("AUTH=PLAIN", code)
        caps = raw.ok("CAPABILITY")[0].split()
        self.assertEqual(sorted(c.decode() for c in caps[2:]), sorted(code))

    def test_starttls_drops_pipelined_plaintext(self):
        s = socket.create_connection((HOST, self.srv.imap_port), timeout=10)
        try:
            buf = b""
            while b"\r\n" not in buf:
                buf += s.recv(4096)
            s.sendall(b"s1 STARTTLS\r\ns2 CAPABILITY\r\n")
            buf = b""
            while b"\r\n" not in buf:
                buf += s.recv(4096)
            self.assertTrue(buf.startswith(b"s1 OK"), buf)
            self.assertEqual(buf.count(b"\r\n"), 1, buf)
            t = self.srv.ctx.wrap_socket(s)
            t.settimeout(10)
            t.sendall(b"s3 NOOP\r\n")
            r = b""
            while b"\r\n" not in r:
                r += t.recv(4096)
            self.assertTrue(r.startswith(b"s3 OK"), r)  # nothing for s2
            t.close()
        finally:
            s.close()

    def test_authenticate_cancel_and_sasl_ir(self):
        raw = self.srv.raw_imap("tls")
        self.extra.append(raw)
        raw.send(b"z1 AUTHENTICATE PLAIN\r\n")
        self.assertTrue(raw.readline().startswith(b"+"))
        raw.send(b"*\r\n")
        self.assertTrue(raw.readline().startswith(b"z1 BAD"))
        raw.send(b"z2 AUTHENTICATE PLAIN %s\r\n" % auth_plain("alice", self.srv.passwords["alice"]).encode())
        r = raw.wait_tagged("z2")
        self.assertTrue(r.startswith(b"z2 OK [CAPABILITY "), r)

    def test_quoted_string_in_response(self):
        c = self.c
        c.ok('CREATE "we\\"ird\\\\name"')
        res = self.list_names(c, 'LIST "" "we*"')
        self.assertEqual(list(res), ['we"ird\\name'])
        u = c.ok('LIST "" "we*"')
        self.assertEqual(u, [b'* LIST (\\HasNoChildren) "/" "we\\"ird\\\\name"\r\n'])


# ---------------------------------------------------------------- POP3


class Pop3Conformance(ServerTestCase):
    server_users = ("alice", "erin")

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        c = cls.srv.raw_login("alice")
        cls.msgs = [
            b"Subject: one\r\n\r\n.leading dot\r\n..two dots\r\nline3\r\n.\r\nend\r\n",
            b"Subject: two\r\nX-A: b\r\n\r\nl1\r\nl2\r\n",
            b"Subject: three\r\n\r\nno final crlf",
        ]
        for m in cls.msgs:
            append(c, "INBOX", m)
        c.close()

    def pop(self, user="alice"):
        p = self.srv.raw(self.srv.pop3s_port, tls=True)
        self.assertTrue(p.readline().startswith(b"+OK"))
        self.assertTrue(p.cmd("USER " + user).startswith(b"+OK"))
        r = p.cmd("PASS " + self.srv.passwords[user])
        self.assertTrue(r.startswith(b"+OK"), r)
        return p

    def raw_multi(self, p):
        """Raw bytes up to and including the terminating '.' CRLF."""
        while True:
            i = p.buf.find(b"\r\n.\r\n")
            if p.buf.startswith(b".\r\n"):
                data, p.buf = p.buf[:3], p.buf[3:]
                return data
            if i >= 0:
                data, p.buf = p.buf[:i + 5], p.buf[i + 5:]
                return data
            p._fill(__import__("time").monotonic() + 10)

    def test_retr_and_top_stuffing(self):
        p = self.pop()
        try:
            self.assertTrue(p.cmd("RETR 1").startswith(b"+OK"))
            self.assertEqual(self.raw_multi(p),
                             b"Subject: one\r\n\r\n..leading dot\r\n...two dots\r\nline3\r\n..\r\nend\r\n.\r\n")
            self.assertTrue(p.cmd("TOP 1 0").startswith(b"+OK"))
            self.assertEqual(self.raw_multi(p), b"Subject: one\r\n\r\n.\r\n")
            self.assertTrue(p.cmd("TOP 1 2").startswith(b"+OK"))
            self.assertEqual(self.raw_multi(p), b"Subject: one\r\n\r\n..leading dot\r\n...two dots\r\n.\r\n")
            self.assertTrue(p.cmd("TOP 2 100").startswith(b"+OK"))
            self.assertEqual(self.raw_multi(p), b"Subject: two\r\nX-A: b\r\n\r\nl1\r\nl2\r\n.\r\n")
            # message without final CRLF gets one before the terminator
            self.assertTrue(p.cmd("RETR 3").startswith(b"+OK"))
            self.assertEqual(self.raw_multi(p), b"Subject: three\r\n\r\nno final crlf\r\n.\r\n")
            self.assertTrue(p.cmd("TOP 9 1").startswith(b"-ERR"))
            self.assertTrue(p.cmd("TOP 1").startswith(b"-ERR"))
        finally:
            p.cmd("QUIT")
            p.close()

    def test_stat_list_dele_rset(self):
        p = self.pop()
        try:
            sizes = [len(m) for m in self.msgs]
            r = p.cmd("STAT")
            self.assertEqual(r, b"+OK %d %d\r\n" % (len(sizes), sum(sizes)))
            self.assertTrue(p.cmd("LIST").startswith(b"+OK"))
            self.assertEqual(self.raw_multi(p), b"".join(b"%d %d\r\n" % (i + 1, s) for i, s in enumerate(sizes))
                             + b".\r\n")
            self.assertTrue(p.cmd("DELE 2").startswith(b"+OK"))
            self.assertEqual(p.cmd("STAT"), b"+OK 2 %d\r\n" % (sizes[0] + sizes[2]))
            self.assertTrue(p.cmd("LIST").startswith(b"+OK"))
            self.assertEqual(self.raw_multi(p), b"1 %d\r\n3 %d\r\n.\r\n" % (sizes[0], sizes[2]))
            for c in ("LIST 2", "RETR 2", "TOP 2 0", "DELE 2", "UIDL 2"):
                self.assertTrue(p.cmd(c).startswith(b"-ERR"), c)
            self.assertEqual(p.cmd("LIST 3"), b"+OK 3 %d\r\n" % sizes[2])
            self.assertTrue(p.cmd("LIST 4").startswith(b"-ERR"))
            self.assertTrue(p.cmd("RSET").startswith(b"+OK"))
            self.assertEqual(p.cmd("STAT"), b"+OK 3 %d\r\n" % sum(sizes))
        finally:
            p.cmd("QUIT")  # nothing marked: nothing removed
            p.close()
        p = self.pop()
        self.assertEqual(p.cmd("STAT"), b"+OK 3 %d\r\n" % sum(sizes))
        p.cmd("QUIT")
        p.close()

    def test_uidl_format_and_stability(self):
        def uidls():
            p = self.pop()
            self.assertTrue(p.cmd("UIDL").startswith(b"+OK"))
            lines = self.raw_multi(p)[:-3].split(b"\r\n")[:-1]
            one = p.cmd("UIDL 1")
            p.cmd("QUIT")
            p.close()
            return lines, one
        a, one = uidls()
        self.assertEqual(len(a), 3)
        for i, ln in enumerate(a):
            n, u = ln.split(b" ")
            self.assertEqual(int(n), i + 1)
            self.assertTrue(1 <= len(u) <= 70 and all(0x21 <= ch <= 0x7E for ch in u), u)
        self.assertEqual(one, b"+OK " + a[0] + b"\r\n")
        b, _ = uidls()
        self.assertEqual(a, b)

    def test_auth_plain_variants(self):
        pw = self.srv.passwords["erin"]

        def conn():
            p = self.srv.raw(self.srv.pop3s_port, tls=True)
            self.assertTrue(p.readline().startswith(b"+OK"))
            return p
        p = conn()
        self.assertTrue(p.cmd("AUTH PLAIN " + auth_plain("erin", pw)).startswith(b"+OK"))
        self.assertTrue(p.cmd("STAT").startswith(b"+OK 0 0"))
        p.cmd("QUIT")
        p.close()
        p = conn()
        self.assertTrue(p.cmd("AUTH PLAIN").startswith(b"+"))
        self.assertTrue(p.cmd(auth_plain("erin", pw)).startswith(b"+OK"))
        p.cmd("QUIT")
        p.close()
        p = conn()
        self.assertTrue(p.cmd("AUTH PLAIN").startswith(b"+"))
        self.assertTrue(p.cmd("*").startswith(b"-ERR"))
        self.assertTrue(p.cmd("STAT").startswith(b"-ERR"))  # still not logged in
        self.assertTrue(p.cmd("AUTH PLAIN " + auth_plain("erin", "wrong")).startswith(b"-ERR"))
        p.cmd("QUIT")
        p.close()

    def test_capa_before_after_stls(self):
        p = self.srv.raw(self.srv.pop3_port, tls=False)
        try:
            self.assertTrue(p.readline().startswith(b"+OK"))
            self.assertTrue(p.cmd("CAPA").startswith(b"+OK"))
            before = self.raw_multi(p).split(b"\r\n")
            self.assertIn(b"STLS", before)
            self.assertNotIn(b"USER", before)  # plaintext login not allowed here
            p.send(b"STLS\r\nCAPA\r\n")  # pipelined plaintext must be dropped
            self.assertTrue(p.readline().startswith(b"+OK"))
            self.assertEqual(p.buf, b"")
            p.starttls_wrap()
            self.assertTrue(p.cmd("CAPA").startswith(b"+OK"))
            after = self.raw_multi(p).split(b"\r\n")
            self.assertNotIn(b"STLS", after)
            for cap in (b"TOP", b"UIDL", b"USER", b"SASL PLAIN", b"RESP-CODES", b"PIPELINING"):
                self.assertIn(cap, after)
            self.assertTrue(p.cmd("STLS").startswith(b"-ERR"))
        finally:
            p.close()


if __name__ == "__main__":
    main()
