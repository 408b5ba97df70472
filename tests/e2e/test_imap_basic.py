#!/usr/bin/env python3
"""IMAP basics: TLS login, STARTTLS capabilities, plaintext refusal,
AUTHENTICATE PLAIN, SELECT INBOX, SPECIAL-USE mailboxes."""
import imaplib
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from coffer_harness import (ServerTestCase, auth_plain, find_untagged, main, ok,  # noqa: E402
                            parse_imap, quote, resp_code)


def caps_of(untagged_or_line):
    """Set of capabilities from '* CAPABILITY ...' or a '[CAPABILITY ...]' code."""
    if isinstance(untagged_or_line, list):
        lines = find_untagged(untagged_or_line, "CAPABILITY")
        assert lines, "no CAPABILITY response in %r" % untagged_or_line
        words = lines[0].strip().split(b" ")[2:]
    else:
        words = [w.encode() for w in resp_code(untagged_or_line, "CAPABILITY") or []]
    return {w.decode().upper() for w in words}


class ImapBasic(ServerTestCase):
    def test_login_over_tls(self):
        c = self.srv.imap("tls")
        self.assertIn("IMAP4REV1", c.capabilities)
        self.assertNotIn("LOGINDISABLED", c.capabilities)
        self.assertNotIn("STARTTLS", c.capabilities)
        typ, _ = c.login("alice", self.srv.passwords["alice"])
        self.assertEqual(typ, "OK")
        typ, _ = c.noop()
        self.assertEqual(typ, "OK")
        c.logout()

    def test_wrong_password_refused(self):
        c = self.srv.raw_imap("tls")
        u, t = c.command("LOGIN alice ", quote("not-the-password"))
        self.assertEqual(t.split(b" ")[1], b"NO", t)
        # the session still works afterwards
        c.login("alice", self.srv.passwords["alice"])
        c.close()

    def test_capability_before_and_after_starttls(self):
        c = self.srv.raw_imap("plain")
        before = caps_of(c.ok("CAPABILITY"))
        self.assertIn("IMAP4REV1", before)
        self.assertIn("STARTTLS", before)
        self.assertIn("LOGINDISABLED", before)
        c.starttls()
        after = caps_of(c.ok("CAPABILITY"))
        self.assertIn("IMAP4REV1", after)
        self.assertNotIn("STARTTLS", after)
        self.assertNotIn("LOGINDISABLED", after)
        self.assertIn("AUTH=PLAIN", after)
        c.login("alice", self.srv.passwords["alice"])
        c.close()

    def test_starttls_discards_pipelined_plaintext(self):
        # CVE-2011-0411 class: a command injected behind STARTTLS in the same
        # packet must not run, neither in plaintext nor inside TLS
        c = self.srv.raw_imap("plain")
        c.send(b"s1 STARTTLS\r\ns2 LOGIN alice " + quote(self.srv.passwords["alice"]).encode() + b"\r\n")
        r = c.read_response()
        self.assertTrue(r.startswith(b"s1 OK"), r)
        self.assertEqual(c.buf, b"", "plaintext after STARTTLS OK")
        c.sock = self.srv.ctx.wrap_socket(c.sock)
        u, t = c.command("NOOP", tag="s3")
        self.assertTrue(ok(t), t)
        self.assertFalse([x for x in u if x.startswith(b"s2 ")], u)
        # still not authenticated: the injected LOGIN did not run
        u, t = c.command("SELECT INBOX")
        self.assertIn(t.split(b" ")[1], (b"NO", b"BAD"), t)
        c.close()

    def test_starttls_with_imaplib(self):
        c = self.srv.imap("starttls")
        self.assertNotIn("LOGINDISABLED", c.capabilities)
        self.assertNotIn("STARTTLS", c.capabilities)
        typ, _ = c.login("bob", self.srv.passwords["bob"])
        self.assertEqual(typ, "OK")
        typ, data = c.select("INBOX")
        self.assertEqual(typ, "OK")
        c.logout()

    def test_plaintext_login_refused(self):
        c = self.srv.raw_imap("plain")
        u, t = c.command("LOGIN alice ", quote(self.srv.passwords["alice"]))
        self.assertIn(t.split(b" ")[1], (b"NO", b"BAD"), t)
        # AUTHENTICATE PLAIN is refused in cleartext too
        u, t = c.command("AUTHENTICATE PLAIN " + auth_plain("alice", self.srv.passwords["alice"]))
        self.assertIn(t.split(b" ")[1], (b"NO", b"BAD"), t)
        # and the session is still unauthenticated
        u, t = c.command("SELECT INBOX")
        self.assertIn(t.split(b" ")[1], (b"NO", b"BAD"), t)
        c.close()
        # imaplib sees the refusal as an error
        m = self.srv.imap("plain")
        self.assertIn("LOGINDISABLED", m.capabilities)
        with self.assertRaises(imaplib.IMAP4.error):
            m.login("alice", self.srv.passwords["alice"])
        m.shutdown()

    def test_authenticate_plain(self):
        c = self.srv.imap("tls")
        pw = self.srv.passwords["alice"]
        typ, data = c.authenticate("PLAIN", lambda _: b"\0alice\0" + pw.encode())
        self.assertEqual(typ, "OK")
        typ, _ = c.select("INBOX")
        self.assertEqual(typ, "OK")
        c.logout()
        # wrong password via AUTHENTICATE
        c = self.srv.imap("tls")
        with self.assertRaises(imaplib.IMAP4.error):
            c.authenticate("PLAIN", lambda _: b"\0alice\0wrong")
        c.shutdown()
        # SASL-IR style initial response if advertised, otherwise continuation
        r = self.srv.raw_imap("tls")
        caps = caps_of(r.ok("CAPABILITY"))
        if "SASL-IR" in caps:
            u, t = r.command("AUTHENTICATE PLAIN " + auth_plain("alice", pw))
            self.assertTrue(ok(t), t)
        r.close()

    def test_select_inbox(self):
        c = self.srv.raw_login("alice")
        u = c.ok("SELECT INBOX")
        t = c.last_tagged
        self.assertIn(b"[READ-WRITE]", t.upper())
        self.assertTrue(find_untagged(u, "EXISTS"), u)
        joined = b"".join(u)
        uidv = resp_code(joined, "UIDVALIDITY")
        self.assertTrue(uidv and int(uidv[0]) > 0, u)
        uidnext = resp_code(joined, "UIDNEXT")
        self.assertTrue(uidnext and int(uidnext[0]) >= 1, u)
        self.assertTrue(find_untagged(u, "FLAGS"), u)
        self.assertIsNotNone(resp_code(joined, "PERMANENTFLAGS"), u)
        # inbox is case-insensitive
        u = c.ok("EXAMINE inbox")
        self.assertIn(b"[READ-ONLY]", c.last_tagged.upper())
        c.close()

    def test_special_use_mailboxes(self):
        c = self.srv.raw_login("bob")
        u = c.ok('LIST "" "*" RETURN (SPECIAL-USE)')
        found = {}
        for line in find_untagged(u, "LIST"):
            toks = parse_imap(line)
            attrs = {str(a).lower() for a in toks[2]}
            name = toks[4]
            name = name.decode() if isinstance(name, bytes) else str(name)
            found[name] = attrs
        self.assertIn("INBOX", {n.upper() for n in found})
        for name, attr in (("Drafts", "\\drafts"), ("Sent", "\\sent"), ("Trash", "\\trash"),
                           ("Junk", "\\junk")):
            self.assertIn(name, found, "mailbox %s missing: %r" % (name, u))
            self.assertIn(attr, found[name], "%s lacks %s: %r" % (name, attr, u))
            c.ok("SELECT " + name)
        # separator discovery
        u = c.ok('LIST "" ""')
        toks = parse_imap(find_untagged(u, "LIST")[0])
        self.assertEqual(toks[3], b"/")
        c.close()

    def test_logout(self):
        c = self.srv.raw_login("alice")
        u, t = c.command("LOGOUT")
        self.assertTrue(ok(t), t)
        self.assertTrue(any(x.startswith(b"* BYE") for x in u), u)
        closed, _ = c.closed_by_server(5)
        self.assertTrue(closed)
        c.sock.close()


if __name__ == "__main__":
    main()
