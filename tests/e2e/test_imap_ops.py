#!/usr/bin/env python3
"""IMAP operations: STORE, SEARCH, COPY/MOVE (COPYUID), EXPUNGE, UID EXPUNGE,
CREATE/RENAME/DELETE (incl. RENAME INBOX), LIST/LSUB/SUBSCRIBE, STATUS."""
import os
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from coffer_harness import (Lit, ServerTestCase, append, fetch_by_uid, fetches,  # noqa: E402
                            find_untagged, main, make_message, ok, parse_imap, quote,
                            resp_code, search_result)


def expand_set(text):
    """'3:5,7' -> [3, 4, 5, 7] (order as given, ranges ascending)."""
    out = []
    for part in text.split(","):
        if ":" in part:
            a, b = sorted(int(x) for x in part.split(":"))
            out += list(range(a, b + 1))
        else:
            out.append(int(part))
    return out


def flags_of(d):
    return sorted(str(f).lower() for f in d["FLAGS"] if str(f).lower() != "\\recent")


class Ops(ServerTestCase):
    def setUp(self):
        self.c = self.srv.raw_login("alice")

    def tearDown(self):
        self.c.close()

    def fill(self, mbox, n, prefix="msg"):
        self.c.ok("CREATE " + quote(mbox))
        msgs = [make_message(subject="%s %d" % (prefix, i), body="body %d\r\n" % i) for i in range(n)]
        uids = [append(self.c, mbox, m)[1] for m in msgs]
        return msgs, uids

    def status(self, mbox, items="MESSAGES UNSEEN UIDNEXT UIDVALIDITY"):
        u = self.c.ok("STATUS %s (%s)" % (quote(mbox), items))
        line = find_untagged(u, "STATUS")
        self.assertTrue(line, u)
        toks = parse_imap(line[0])
        lst = toks[3]
        return {str(lst[i]).upper(): int(lst[i + 1]) for i in range(0, len(lst), 2)}

    def test_store_flags(self):
        msgs, uids = self.fill("ops-store", 3)
        self.c.ok("SELECT ops-store")
        u = self.c.ok("STORE 1 +FLAGS (\\Seen \\Flagged)")
        f = fetches(u)
        self.assertEqual(f[0][0], 1, u)
        self.assertEqual(flags_of(f[0][1]), ["\\flagged", "\\seen"])
        u = self.c.ok("STORE 2 FLAGS (\\Draft kw1)")
        self.assertEqual(flags_of(fetches(u)[0][1]), ["\\draft", "kw1"])
        u = self.c.ok("STORE 1 -FLAGS.SILENT (\\Seen)")
        self.assertFalse([x for x in fetches(u) if "FLAGS" in x[1]], "SILENT returned FLAGS: %r" % u)
        u = self.c.ok("UID STORE %d +FLAGS (\\Answered)" % uids[2])
        by = fetch_by_uid(u)
        self.assertIn(uids[2], by, "UID STORE response must carry UID: %r" % u)
        u = self.c.ok("FETCH 1:3 (UID FLAGS)")
        by = fetch_by_uid(u)
        self.assertEqual(flags_of(by[uids[0]]), ["\\flagged"])
        self.assertEqual(flags_of(by[uids[1]]), ["\\draft", "kw1"])
        self.assertEqual(flags_of(by[uids[2]]), ["\\answered"])
        # flags persist across sessions
        c2 = self.srv.raw_login("alice")
        c2.ok("EXAMINE ops-store")
        by = fetch_by_uid(c2.ok("UID FETCH 1:* (FLAGS)"))
        self.assertEqual(flags_of(by[uids[1]]), ["\\draft", "kw1"])
        c2.close()

    def test_search_runs_off_the_loop(self):
        """A SEARCH that reads message bodies runs on a worker thread: while
        one session searches 48 MiB, another session's NOOP is answered (if
        the search held the event loop, its reply would come first)."""
        self.c.ok("CREATE ops-bigsearch")
        line = ("lorem ipsum dolor sit amet consectetur adipiscing elit " * 2)[:76] + "\r\n"
        body = line * (1024 * 1024 // len(line))
        for i in range(48):
            append(self.c, "ops-bigsearch", make_message(subject="big %d" % i, body=body))
        self.c.ok("SELECT ops-bigsearch")
        other = self.srv.raw_login("alice")
        try:
            for attempt in range(3):
                tag = "s%d" % attempt
                got = {}

                def reader():
                    try:
                        got["r"] = self.c.wait_tagged(tag, timeout=120)
                    except Exception as e:  # noqa: BLE001 - reported below
                        got["r"] = repr(e).encode()
                    got["t"] = time.monotonic()

                th = threading.Thread(target=reader, daemon=True)
                sent = time.monotonic()
                self.c.send(tag + " SEARCH OR BODY needle-a OR BODY needle-b TEXT needle-c\r\n")
                th.start()
                other.ok("NOOP")
                noop_done = time.monotonic()
                th.join(130)
                self.assertTrue(ok(got.get("r", b"")), got)
                # Inline, the NOOP would wait for the whole search and both
                # answers would arrive together; off the loop the NOOP is
                # answered at once and the search much later.
                noop_wait, search_after = noop_done - sent, got["t"] - noop_done
                sys.stderr.write("search %d: NOOP answered after %.3f s, SEARCH %.3f s later\n"
                                 % (attempt, noop_wait, search_after))
                if search_after > noop_wait:
                    break
            self.assertGreater(search_after, noop_wait,
                               "another session's NOOP waited for the SEARCH")
            u = self.c.ok("SEARCH BODY amet SUBJECT \"big 47\"")
            self.assertEqual(search_result(u), [48])
        finally:
            other.close()
            self.c.ok("CLOSE")
            self.c.ok("DELETE ops-bigsearch")

    def test_search(self):
        self.c.ok("CREATE ops-search")
        m = [
            make_message(subject="Quarterly report", frm="Alice <alice@example.org>",
                         body="the numbers are inside\r\n"),
            make_message(subject="Lunch", frm="Bob <bob@example.org>",
                         body=("pizza today\r\n" + "x" * 70 + "\r\n") * 150),
            make_message(subject="=?UTF-8?Q?Gr=C3=BC=C3=9Fe_aus_K=C3=B6ln?=",
                         frm="Carol <carol@example.org>", body="hallo\r\n"),
            make_message(subject="Caf\u00e9 Z\u00fcrich", frm="Dave <dave@example.org>",
                         body="8bit subject\r\n",
                         extra_headers=["Content-Type: text/plain; charset=utf-8"]),
        ]
        dates = ["01-Jan-2026 10:00:00 +0000", "15-Feb-2026 10:00:00 +0000",
                 "01-Mar-2026 10:00:00 +0000", "02-Mar-2026 10:00:00 +0000"]
        flags = [["\\Seen"], None, ["\\Flagged"], ["\\Seen"]]
        uids = [append(self.c, "ops-search", m[i], flags=flags[i], date=dates[i])[1] for i in range(4)]
        self.c.ok("SELECT ops-search")

        def s(q, *lits):
            parts = ["SEARCH " + q] + list(lits)
            u = self.c.ok(*parts)
            return search_result(u)

        self.assertEqual(s("SUBJECT report"), [1])
        self.assertEqual(s("SUBJECT REPORT"), [1])  # case-insensitive
        self.assertEqual(s("FROM bob"), [2])
        self.assertEqual(s("BODY pizza"), [2])
        self.assertEqual(s("TEXT pizza"), [2])
        self.assertEqual(s("UNSEEN"), [2, 3])
        self.assertEqual(s("SEEN"), [1, 4])
        self.assertEqual(s("FLAGGED"), [3])
        self.assertEqual(s("LARGER 5000"), [2])
        self.assertEqual(s("SMALLER 5000"), [1, 3, 4])
        self.assertEqual(s("SINCE 10-Feb-2026"), [2, 3, 4])
        self.assertEqual(s("BEFORE 15-Feb-2026"), [1])
        self.assertEqual(s("ON 01-Mar-2026"), [3])
        self.assertEqual(s("OR FROM alice FROM carol"), [1, 3])
        self.assertEqual(s("NOT FROM bob"), [1, 3, 4])
        self.assertEqual(s("2:3"), [2, 3])
        self.assertEqual(s("UNSEEN NOT FLAGGED"), [2])
        self.assertEqual(s("ALL"), [1, 2, 3, 4])
        self.assertEqual(s("SUBJECT nothing-matches-this"), [])
        u = self.c.ok("UID SEARCH UID %d:*" % uids[1])
        self.assertEqual(search_result(u), uids[1:])
        u = self.c.ok("UID SEARCH UID %d,%d" % (uids[0], uids[3]))
        self.assertEqual(search_result(u), [uids[0], uids[3]])
        # CHARSET UTF-8 with non-ASCII search strings (as literals)
        self.assertEqual(s("CHARSET UTF-8 SUBJECT ", Lit("Z\u00fcrich".encode())), [4],
                         "8-bit UTF-8 subject not found")
        self.assertEqual(s("CHARSET UTF-8 SUBJECT ", Lit("K\u00f6ln".encode())), [3],
                         "RFC 2047 encoded subject not matched after decoding")
        u, t = self.c.command("SEARCH CHARSET X-BOGUS-CHARSET SUBJECT x")
        self.assertEqual(t.split(b" ")[1], b"NO", t)
        self.assertIn(b"BADCHARSET", t.upper())

    def test_copy_move(self):
        msgs, uids = self.fill("ops-src", 4)
        self.c.ok("CREATE ops-dst")
        self.c.ok("SELECT ops-src")
        u, t = self.c.command("COPY 1:2 ops-dst")
        self.assertTrue(ok(t), t)
        code = resp_code(t, "COPYUID")
        self.assertIsNotNone(code, "COPY without COPYUID: %r" % t)
        dst_uidv = int(code[0])
        self.assertEqual(self.status("ops-dst")["UIDVALIDITY"], dst_uidv)
        self.assertEqual(expand_set(code[1]), uids[:2])
        dst_uids = expand_set(code[2])
        self.assertEqual(len(dst_uids), 2)
        u, t = self.c.command("COPY 1 nonexistent-mailbox")
        self.assertEqual(t.split(b" ")[1], b"NO", t)
        self.assertIn(b"TRYCREATE", t.upper())
        # MOVE 3 -> dst: EXPUNGE in the response and COPYUID somewhere
        u, t = self.c.command("MOVE 3 ops-dst")
        self.assertTrue(ok(t), t)
        self.assertIn(b"* 3 EXPUNGE\r\n", u)
        self.assertTrue(resp_code(b"".join(u) + t, "COPYUID"), (u, t))
        u, t = self.c.command("UID MOVE %d ops-dst" % uids[3])
        self.assertTrue(ok(t), t)
        self.assertIn(b"* 3 EXPUNGE\r\n", u)
        self.assertEqual(self.status("ops-src")["MESSAGES"], 2)
        self.assertEqual(self.status("ops-dst")["MESSAGES"], 4)
        self.c.ok("SELECT ops-dst")
        got = [d["BODY[]"] for _, d in fetches(self.c.ok("FETCH 1:* (BODY.PEEK[])"))]
        self.assertEqual(got, [msgs[0], msgs[1], msgs[2], msgs[3]])
        by = fetch_by_uid(self.c.ok("UID FETCH %d,%d (BODY.PEEK[])" % tuple(dst_uids)))
        self.assertEqual([by[x]["BODY[]"] for x in dst_uids], msgs[:2])
        # source still has 1 and 2 unchanged
        self.c.ok("SELECT ops-src")
        by = fetch_by_uid(self.c.ok("UID FETCH 1:* (BODY.PEEK[])"))
        self.assertEqual(sorted(by), uids[:2])
        self.assertEqual(by[uids[0]]["BODY[]"], msgs[0])

    def test_expunge_and_uid_expunge(self):
        msgs, uids = self.fill("ops-exp", 5)
        self.c.ok("SELECT ops-exp")
        self.c.ok("STORE 1,3 +FLAGS.SILENT (\\Deleted)")
        u = self.c.ok("EXPUNGE")
        exp = [int(x.split(b" ")[1]) for x in find_untagged(u, "EXPUNGE")]
        self.assertEqual(len(exp), 2, u)
        # whichever order, applying the EXPUNGEs to [1..5] must leave 2,4,5
        view = list(uids)
        for n in exp:
            del view[n - 1]
        self.assertEqual(view, [uids[1], uids[3], uids[4]])
        by = fetch_by_uid(self.c.ok("UID FETCH 1:* (UID)"))
        self.assertEqual(sorted(by), [uids[1], uids[3], uids[4]])
        # UID EXPUNGE removes only the named \Deleted message
        self.c.ok("STORE 1:3 +FLAGS.SILENT (\\Deleted)")
        u = self.c.ok("UID EXPUNGE %d" % uids[3])
        self.assertEqual(find_untagged(u, "EXPUNGE"), [b"* 2 EXPUNGE\r\n"])
        by = fetch_by_uid(self.c.ok("UID FETCH 1:* (UID FLAGS)"))
        self.assertEqual(sorted(by), [uids[1], uids[4]])
        # CLOSE expunges silently
        u = self.c.ok("CLOSE")
        self.assertFalse(find_untagged(u, "EXPUNGE"), u)
        self.assertEqual(self.status("ops-exp")["MESSAGES"], 0)

    def test_create_rename_delete(self):
        self.c.ok("CREATE tree/a/b")
        names = self.list_names('LIST "" "tree/*"')
        self.assertEqual(names, ["tree/a", "tree/a/b"])
        u, t = self.c.command("CREATE tree/a")
        self.assertEqual(t.split(b" ")[1], b"NO", t)
        append(self.c, "tree/a/b", make_message(subject="deep"))
        self.c.ok("RENAME tree/a moved")
        self.assertEqual(self.list_names('LIST "" "tree/*"'), [])
        self.assertEqual(self.list_names('LIST "" "moved*"'), ["moved", "moved/b"])
        self.assertEqual(self.status("moved/b")["MESSAGES"], 1)
        self.assertEqual(self.list_names('LIST "" "moved/%"'), ["moved/b"])
        self.assertEqual(self.list_names('LIST "" "%"').count("moved"), 1)
        self.c.ok("DELETE moved/b")
        self.assertEqual(self.list_names('LIST "" "moved*"'), ["moved"])
        u, t = self.c.command("DELETE moved/b")
        self.assertEqual(t.split(b" ")[1], b"NO", t)
        u, t = self.c.command("DELETE INBOX")
        self.assertEqual(t.split(b" ")[1], b"NO", t)
        u, t = self.c.command("SELECT moved/b")
        self.assertEqual(t.split(b" ")[1], b"NO", t)
        # delete + recreate gives a larger UIDVALIDITY
        self.c.ok("CREATE again")
        v1 = self.status("again")["UIDVALIDITY"]
        self.c.ok("DELETE again")
        self.c.ok("CREATE again")
        self.assertGreater(self.status("again")["UIDVALIDITY"], v1)
        # non-ASCII names round-trip as modified UTF-7
        self.c.ok("CREATE &AMQ-pfel")  # "Äpfel"
        self.assertIn("&AMQ-pfel", self.list_names('LIST "" "*"'))

    def list_names(self, cmd):
        out = []
        for line in find_untagged(self.c.ok(cmd), "LIST"):
            toks = parse_imap(line)
            n = toks[4]
            out.append(n.decode() if isinstance(n, bytes) else str(n))
        return sorted(out)

    def test_rename_inbox(self):
        pw = self.srv.add_user("renamer")
        c = self.srv.raw_imap("tls")
        c.login("renamer", pw)
        msgs = [make_message(subject="inbox %d" % i) for i in range(2)]
        for m in msgs:
            append(c, "INBOX", m)
        c.ok("RENAME INBOX old-inbox")
        u = c.ok("STATUS INBOX (MESSAGES UIDNEXT)")
        self.assertIn(b"MESSAGES 0", find_untagged(u, "STATUS")[0])
        u = c.ok("STATUS old-inbox (MESSAGES)")
        self.assertIn(b"MESSAGES 2", find_untagged(u, "STATUS")[0])
        c.ok("SELECT old-inbox")
        got = [d["BODY[]"] for _, d in fetches(c.ok("FETCH 1:* (BODY.PEEK[])"))]
        self.assertEqual(got, msgs)
        c.ok("SELECT INBOX")
        _, uid = append(c, "INBOX", make_message(subject="after rename"))
        self.assertGreater(uid, 0)
        u = c.ok("STATUS INBOX (MESSAGES)")
        self.assertIn(b"MESSAGES 1", find_untagged(u, "STATUS")[0])
        c.close()

    def test_subscribe_lsub(self):
        self.c.ok("CREATE sub-a")
        self.c.ok("CREATE sub-b")
        self.c.ok("SUBSCRIBE sub-a")

        def lsub():
            out = []
            for line in find_untagged(self.c.ok('LSUB "" "sub-*"'), "LSUB"):
                n = parse_imap(line)[4]
                out.append(n.decode() if isinstance(n, bytes) else str(n))
            return sorted(out)

        self.assertEqual(lsub(), ["sub-a"])
        self.c.ok("SUBSCRIBE sub-b")
        self.assertEqual(lsub(), ["sub-a", "sub-b"])
        self.c.ok("UNSUBSCRIBE sub-a")
        self.assertEqual(lsub(), ["sub-b"])
        # LIST (SUBSCRIBED) agrees when LIST-EXTENDED is offered
        # subscriptions survive deletion of the mailbox
        self.c.ok("DELETE sub-b")
        self.assertEqual(lsub(), ["sub-b"])

    def test_status_counts(self):
        msgs, uids = self.fill("ops-status", 3)
        st = self.status("ops-status")
        self.assertEqual(st["MESSAGES"], 3)
        self.assertEqual(st["UNSEEN"], 3)
        self.assertEqual(st["UIDNEXT"], uids[-1] + 1)
        self.assertGreater(st["UIDVALIDITY"], 0)
        self.c.ok("SELECT ops-status")
        self.c.ok("STORE 1 +FLAGS.SILENT (\\Seen)")
        self.c.ok("STORE 3 +FLAGS.SILENT (\\Deleted)")
        self.c.ok("EXPUNGE")
        self.c.ok("CLOSE")
        st = self.status("ops-status")
        self.assertEqual(st["MESSAGES"], 2)
        self.assertEqual(st["UNSEEN"], 1)
        self.assertEqual(st["UIDNEXT"], uids[-1] + 1)  # UIDNEXT does not go back
        u, t = self.c.command("STATUS no-such-box (MESSAGES)")
        self.assertEqual(t.split(b" ")[1], b"NO", t)


if __name__ == "__main__":
    main()
