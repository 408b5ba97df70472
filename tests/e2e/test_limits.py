#!/usr/bin/env python3
"""Limits: long lines, oversized literals, APPEND over max_message, too many
bad commands, invalid mailbox names, pre-auth timeout, max_sessions; the
server stays up and a normal login works afterwards."""
import os
import ssl
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from coffer_harness import (Lit, ServerTestCase, main, make_message, ok, quote,  # noqa: E402
                            status_word, wait_until)

MAX_LINE = 16384
MAX_LITERAL = 16384
MAX_MESSAGE = 1024 * 1024
MAX_BAD = 5
PREAUTH = 2
MAX_SESSIONS = 6


class Limits(ServerTestCase):
    server_config = {
        "limits.max_line": "16k",
        "limits.max_literal": "16k",
        "limits.max_message": "1M",
        "limits.max_bad_commands": str(MAX_BAD),
        "limits.preauth_timeout": "%ds" % PREAUTH,
        "limits.max_mailbox_depth": "5",
        "limits.max_mailbox_name": "100",
    }

    def tearDown(self):
        # after every abuse the server still serves a normal login
        self.assertAlive()
        c = self.srv.raw_login("alice")
        c.ok("SELECT INBOX")
        c.close()

    def test_long_line(self):
        c = self.srv.raw_login("alice")
        try:
            c.send(b"a1 NOOP " + b"x" * (MAX_LINE * 4) + b"\r\n")
            r = c.read_response(timeout=15)
        except (EOFError, ConnectionError, ssl.SSLError):
            return  # closed cleanly
        self.assertTrue(b" BAD" in r[:10] or r.startswith(b"* BYE"), r)
        if r.startswith(b"* BYE"):
            closed, _ = c.closed_by_server(10)
            self.assertTrue(closed)
            return
        # the session continues
        c.ok("NOOP")
        c.close()

    def test_literal_over_max_literal(self):
        c = self.srv.raw_login("alice")
        c.ok("SELECT INBOX")
        u, t = c.command("SEARCH SUBJECT ", Lit(b"y" * (MAX_LITERAL * 4)))
        self.assertIn(status_word(t), ("NO", "BAD"), t)
        self.assertFalse(any(x.startswith(b"+") for x in u), u)
        c.ok("NOOP")
        # before login the cap holds too
        # (closing the connection is also fine there)
        c2 = self.srv.raw_imap("tls")
        try:
            u, t = c2.command("LOGIN ", Lit(b"u" * (MAX_LITERAL * 4)), " x")
            self.assertIn(status_word(t), ("NO", "BAD"), t)
            self.assertFalse(any(x.startswith(b"+") for x in u), u)
        except (EOFError, ConnectionError):
            pass
        c2.close()
        c.close()

    def test_append_too_big(self):
        c = self.srv.raw_login("alice")
        big = make_message(subject="too big", body=(b"z" * 76 + b"\r\n") * (MAX_MESSAGE // 78 + 10))
        self.assertGreater(len(big), MAX_MESSAGE)
        u, t = c.command("APPEND INBOX ", Lit(big))
        self.assertEqual(status_word(t), "NO", t)
        self.assertIn(b"[TOOBIG]", t.upper())
        self.assertFalse(any(x.startswith(b"+") for x in u), u)
        # a message just under the limit is accepted
        small = make_message(subject="fits", body=b"ok\r\n")
        u, t = c.command("APPEND INBOX ", Lit(small))
        self.assertTrue(ok(t), t)
        c.close()

    def test_too_many_bad_commands(self):
        c = self.srv.raw_login("alice")
        seen = []
        bye_after = None
        for i in range(MAX_BAD + 3):
            c.send(b"b%d FROBNICATE\r\n" % i)
            try:
                while True:
                    r = c.read_response(timeout=15)
                    seen.append(r)
                    if r.startswith(b"* BYE"):
                        bye_after = i + 1
                        break
                    if r.startswith(b"b%d " % i):
                        self.assertEqual(status_word(r), "BAD", r)
                        break
            except (EOFError, ConnectionError, ssl.SSLError):
                self.fail("closed without * BYE after %d bad commands: %r" % (i + 1, seen))
            if bye_after:
                break
        self.assertIsNotNone(bye_after, "no * BYE after %d bad commands: %r" % (MAX_BAD + 3, seen))
        self.assertLessEqual(bye_after, MAX_BAD + 1, seen)
        closed, data = c.closed_by_server(15)
        self.assertTrue(closed, "session not closed after * BYE")

    def test_invalid_mailbox_names(self):
        c = self.srv.raw_login("alice")
        bad = [
            "&Jjo",            # unterminated modified UTF-7
            "a&b",             # bare & starts an invalid sequence
            "&AGE-",           # ASCII encoded in base64 (non-canonical)
            "&2D0-",           # lone surrogate
            "..",
            "a/../b",
            "a//b",            # empty component
            "/rooted",
            "/".join(["d"] * 7),  # deeper than max_mailbox_depth
            "n" * 150,         # longer than max_mailbox_name
        ]
        for name in bad:
            u, t = c.command("CREATE " + quote(name))
            self.assertIn(status_word(t), ("NO", "BAD"), "CREATE %r: %r" % (name, t))
        u, t = c.command("CREATE " + quote(""))
        self.assertIn(status_word(t), ("NO", "BAD"), t)
        u, t = c.command("RENAME INBOX " + quote("x/../../y"))
        self.assertIn(status_word(t), ("NO", "BAD"), t)
        u, t = c.command("SELECT " + quote("&Jjo"))
        self.assertIn(status_word(t), ("NO", "BAD"), t)
        # none of them was created
        u = c.ok('LIST "" "*"')
        listed = b"".join(u)
        for frag in (b"&Jjo", b"..", b"//", b"rooted", b"nnnnnnnnnn"):
            self.assertNotIn(frag, listed, listed)
        # valid edge cases are fine
        c.ok("CREATE " + quote("&-and&-"))      # "&and&"
        c.ok("CREATE " + quote("/".join(["e"] * 5)))
        c.close()

    def test_preauth_timeout(self):
        c = self.srv.raw_imap("tls")
        t0 = time.monotonic()
        closed, data = c.closed_by_server(PREAUTH + 15)
        self.assertTrue(closed, "pre-auth session not closed after %ds" % (PREAUTH + 15))
        self.assertGreaterEqual(time.monotonic() - t0, PREAUTH - 0.5)
        # plaintext port too
        c = self.srv.raw_imap("plain")
        closed, data = c.closed_by_server(PREAUTH + 15)
        self.assertTrue(closed)
        # an authenticated session is not subject to the pre-auth timeout
        c = self.srv.raw_login("alice")
        t_end = time.monotonic() + PREAUTH + 1.5
        closed, _ = c.closed_by_server(t_end - time.monotonic())
        self.assertFalse(closed, "authenticated session closed by the pre-auth timeout")
        c.ok("NOOP")
        c.close()


class Sessions(ServerTestCase):
    server_config = {"limits.max_sessions": str(MAX_SESSIONS)}

    def test_max_sessions(self):
        sessions = [self.srv.raw_login("alice") for _ in range(MAX_SESSIONS - 1)]
        sessions.append(self.srv.raw_imap("tls"))  # one pre-auth session counts too
        extra = self.srv.raw_imap("tls", greeting=False)
        first = extra.read_response(timeout=15)
        self.assertTrue(first.startswith(b"* BYE"), first)
        closed, _ = extra.closed_by_server(10)
        self.assertTrue(closed)
        # the POP3 side shares the limit: -ERR, or the connection is dropped
        try:
            p = self.srv.raw(self.srv.pop3s_port, tls=True)
            first = p.readline(timeout=15)
            p.close()
        except (EOFError, ConnectionError, ssl.SSLError):
            first = b"(closed)"
        self.assertFalse(first.startswith(b"+OK"), first)
        for s in sessions[:-1]:
            s.ok("NOOP")
        sessions[-1].login("bob", self.srv.passwords["bob"])
        sessions[-1].ok("SELECT INBOX")
        # freeing a slot admits a new session again (the close is asynchronous)
        sessions.pop(0).close()

        def try_login():
            c = self.srv.raw_imap("tls", greeting=False)
            g = c.read_response(timeout=10)
            if g.startswith(b"* OK"):
                return c
            c.close()
            return None

        c = wait_until(try_login, 15, interval=0.1, what="a free session slot")
        c.login("alice", self.srv.passwords["alice"])
        c.close()
        for s in sessions:
            s.close()


if __name__ == "__main__":
    main()
