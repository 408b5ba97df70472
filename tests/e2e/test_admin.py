#!/usr/bin/env python3
"""cofferctl against a live store: users (add/list/passwd/disable/enable/
delete), audit log lines, status --json, mailbox list, quota, auth of the
admin RPC itself."""
import json
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from coffer_harness import CTL_BIN, ServerTestCase, main, quote, status_word  # noqa: E402
import subprocess  # noqa: E402


def walk(obj):
    """Yield (key, value) for every dict entry in a JSON tree."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield k, v
            yield from walk(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from walk(v)


class Admin(ServerTestCase):
    def imap_login(self, user, pw):
        c = self.srv.raw_imap("tls")
        u, t = c.command("LOGIN %s %s" % (quote(user), quote(pw)))
        c.close()
        return t

    def users_listed(self):
        out = self.srv.ctl("user", "list").stdout.decode()
        return set(re.findall(r"^\s*([a-z0-9._@-]+)\b", out, re.M)), out

    def test_user_lifecycle(self):
        pw = self.srv.add_user("carol")
        names, out = self.users_listed()
        self.assertIn("carol", out)
        self.assertIn("alice", out)
        r = self.srv.ctl("user", "add", "carol", "--password", "again", check=False)
        self.assertEqual(r.returncode, 1, r)
        self.assertTrue(ok_line(self.imap_login("carol", pw)))
        self.srv.wait_log(rb'audit: login proto=imap user="?carol"? client=127\.0\.0\.1\S* .*result=ok')

        # passwd
        self.srv.ctl("user", "passwd", "carol", "--password", "new-secret-1")
        self.assertEqual(status_word(self.imap_login("carol", pw)), "NO")
        self.srv.wait_log(rb'audit: login proto=imap user="?carol"? client=127\.0\.0\.1\S* .*result=badpass')
        self.assertTrue(ok_line(self.imap_login("carol", "new-secret-1")))

        # disable: refused with the reason; audit line with user, address, result
        mark = len(self.srv.log())
        self.srv.ctl("user", "disable", "carol", "--reason", "abuse ticket 4711")
        t = self.imap_login("carol", "new-secret-1")
        self.assertEqual(status_word(t), "NO", t)
        self.assertIn(b"abuse ticket 4711", t)
        self.srv.wait_log(rb'audit: login proto=imap user="?carol"? client=127\.0\.0\.1\S* .*result=disabled',
                          since=mark)
        p = self.srv.raw(self.srv.pop3s_port, tls=True)
        p.readline()
        p.cmd("USER carol")
        r = p.cmd("PASS new-secret-1")
        self.assertTrue(r.startswith(b"-ERR"), r)
        p.close()
        self.srv.wait_log(rb'audit: login proto=pop3 user="?carol"? client=127\.0\.0\.1\S* .*result=disabled',
                          since=mark)
        out = self.srv.ctl("user", "list").stdout.decode()
        self.assertRegex(out, r"carol.*disabled", out)

        # enable
        self.srv.ctl("user", "enable", "carol")
        self.assertTrue(ok_line(self.imap_login("carol", "new-secret-1")))

        # delete
        self.srv.ctl("user", "delete", "carol")
        self.assertEqual(status_word(self.imap_login("carol", "new-secret-1")), "NO")
        out = self.srv.ctl("user", "list").stdout.decode()
        self.assertNotRegex(out, r"\bcarol\b")
        r = self.srv.ctl("user", "delete", "carol", check=False)
        self.assertEqual(r.returncode, 1)
        # the name can be used again, with fresh mailboxes
        pw2 = self.srv.add_user("carol")
        self.assertTrue(ok_line(self.imap_login("carol", pw2)))

    def test_status_json(self):
        r = self.srv.ctl("status", "--json")
        data = json.loads(r.stdout)
        pairs = list(walk(data))
        roles = [v for k, v in pairs if k == "role"]
        self.assertIn("leader", roles, data)
        applied = [v for k, v in pairs if k.startswith("applied")]
        self.assertTrue(applied and int(applied[0]) > 0, data)
        r = self.srv.ctl("status")
        self.assertIn(b"leader", r.stdout)

    def test_mailbox_list_and_quota(self):
        r = self.srv.ctl("mailbox", "list", "alice")
        out = r.stdout.decode()
        for name in ("INBOX", "Drafts", "Sent", "Trash", "Junk"):
            self.assertIn(name, out)
        r = self.srv.ctl("mailbox", "list", "nobody-here", check=False)
        self.assertEqual(r.returncode, 1)
        self.srv.ctl("quota", "set", "bob", "--storage", "10M", "--messages", "1000")
        r = self.srv.ctl("quota", "set", "nobody-here", "--messages", "1", check=False)
        self.assertEqual(r.returncode, 1)

    def test_admin_auth_required(self):
        r = self.srv.ctl("user", "list", secret_file=False, check=False)
        self.assertNotEqual(r.returncode, 0, r)
        self.assertNotIn(b"alice", r.stdout)
        wrong = os.path.join(self.srv.tmp, "wrong.secret")
        fd = os.open(wrong, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.write(fd, b"definitely-not-the-secret\n")
        os.close(fd)
        r = self.srv.ctl("user", "list", secret_file=wrong, check=False)
        self.assertEqual(r.returncode, 1, r)
        self.assertNotIn(b"alice", r.stdout)
        r = self.srv.ctl("user", "add", "mallory", "--password", "x", secret_file=wrong, check=False)
        self.assertEqual(r.returncode, 1)
        self.assertNotIn("mallory", self.srv.ctl("user", "list").stdout.decode())

    def test_usage_errors(self):
        r = subprocess.run([CTL_BIN, "frobnicate"], capture_output=True, timeout=30)
        self.assertEqual(r.returncode, 2, r)
        r = self.srv.ctl("user", "add", check=False)
        self.assertEqual(r.returncode, 2, r)
        r = self.srv.ctl("user", "list", "--password", "x", check=False)
        self.assertEqual(r.returncode, 2, r)


def ok_line(t):
    return status_word(t) == "OK"


if __name__ == "__main__":
    main()
