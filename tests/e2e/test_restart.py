#!/usr/bin/env python3
"""Durability: SIGTERM + restart keeps messages, UIDs, UIDVALIDITY, flags
and UIDNEXT; SIGKILL + restart keeps every APPEND that got OK."""
import os
import sys
import threading

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from coffer_harness import (ServerTestCase, append, fetch_by_uid, find_untagged, main,  # noqa: E402
                            make_message, parse_imap, wait_until)


def snapshot(c, mbox):
    c.ok("EXAMINE " + mbox)
    by = fetch_by_uid(c.ok("UID FETCH 1:* (UID FLAGS INTERNALDATE BODY.PEEK[])", timeout=120))
    st = parse_imap(find_untagged(c.ok("STATUS %s (UIDVALIDITY UIDNEXT MESSAGES)" % mbox), "STATUS")[0])[3]
    status = {str(st[i]).upper(): int(st[i + 1]) for i in range(0, len(st), 2)}
    msgs = {uid: (sorted(str(f) for f in d["FLAGS"] if str(f).lower() != "\\recent"), d["INTERNALDATE"], d["BODY[]"]) for uid, d in by.items()}
    return status, msgs


class Restart(ServerTestCase):
    def test_sigterm_restart(self):
        c = self.srv.raw_login("alice")
        c.ok("CREATE keep")
        uids = [append(c, "keep", make_message(subject="keep %d" % i, body="n %d\r\n" % i))[1]
                for i in range(6)]
        c.ok("SELECT keep")
        c.ok("STORE 1 +FLAGS (\\Seen)")
        c.ok("STORE 2 +FLAGS (\\Flagged kw-one)")
        c.ok("STORE 3 +FLAGS.SILENT (\\Deleted)")
        c.ok("EXPUNGE")
        c.ok("SUBSCRIBE keep")
        before = snapshot(c, "keep")
        inbox_before = snapshot(c, "INBOX")
        c.close()
        self.assertEqual(before[0]["MESSAGES"], 5)

        self.srv.stop()
        self.srv.start()

        c = self.srv.raw_login("alice")
        after = snapshot(c, "keep")
        self.assertEqual(after[0], before[0])
        self.assertEqual(sorted(after[1]), sorted(before[1]))
        for uid in before[1]:
            self.assertEqual(after[1][uid], before[1][uid], "message uid %d changed" % uid)
        self.assertEqual(snapshot(c, "INBOX"), inbox_before)
        lsub = b"".join(c.ok('LSUB "" "keep"'))
        self.assertIn(b"keep", lsub)
        _, new_uid = append(c, "keep", make_message(subject="after restart"))
        self.assertEqual(new_uid, before[0]["UIDNEXT"])
        self.assertGreater(new_uid, max(uids))
        c.close()

        # a second restart is also fine (replay/snapshot path must be idempotent)
        self.srv.stop()
        self.srv.start()
        c = self.srv.raw_login("alice")
        st, msgs = snapshot(c, "keep")
        self.assertEqual(st["MESSAGES"], 6)
        self.assertIn(new_uid, msgs)
        c.close()

    def test_sigkill_keeps_acknowledged_appends(self):
        c = self.srv.raw_login("bob")
        c.ok("CREATE crash")
        c.close()
        acked = {}
        errors = []
        stop = threading.Event()

        def writer(n):
            try:
                w = self.srv.raw_login("bob")
                i = 0
                while not stop.is_set():
                    msg = make_message(subject="crash %d-%d" % (n, i), body=("w%d i%d\r\n" % (n, i)) * 20)
                    _, uid = append(w, "crash", msg)  # raises once the server dies
                    acked[uid] = msg
                    i += 1
            except Exception as e:  # noqa: BLE001 - the server is killed under us
                errors.append(e)

        threads = [threading.Thread(target=writer, args=(n,), daemon=True) for n in range(3)]
        for t in threads:
            t.start()
        wait_until(lambda: len(acked) >= 30 or not any(t.is_alive() for t in threads), 120,
                   what="30 acknowledged APPENDs")
        self.assertGreaterEqual(len(acked), 30, errors)
        self.srv.kill(check=True)
        stop.set()
        for t in threads:
            t.join(30)
        snapshot_acked = dict(acked)

        self.srv.start()
        c = self.srv.raw_login("bob")
        st, msgs = snapshot(c, "crash")
        missing = sorted(set(snapshot_acked) - set(msgs))
        self.assertEqual(missing, [], "acknowledged APPENDs lost after SIGKILL")
        for uid, msg in snapshot_acked.items():
            self.assertEqual(msgs[uid][2], msg, "uid %d differs" % uid)
        self.assertGreater(st["UIDNEXT"], max(msgs))
        _, uid = append(c, "crash", make_message(subject="after crash"))
        self.assertGreaterEqual(uid, st["UIDNEXT"])
        c.close()
        # users and other state survived too
        c = self.srv.raw_login("alice")
        c.close()


if __name__ == "__main__":
    main()
