#!/usr/bin/env python3
"""A session whose client has gone away is released at once, not after the
connection layer's 10 s flush cap: closing after STARTTLS, after LOGOUT on
implicit TLS, and after POP3 QUIT on POP3S. The server's own session counters
(cofferctl status --json) must drop back to zero within 3 s."""
import json
import os
import socket
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from coffer_harness import TLS_NAME, ServerTestCase, main, wait_until  # noqa: E402

ROUNDS = 5
DRAIN_BOUND = 3.0  # seconds; the flush cap this guards against is 10 s


class SessionClose(ServerTestCase):
    def counters(self):
        j = json.loads(self.srv.ctl("status", "--json").stdout)
        st = j.get("status", j)
        return int(st.get("imap_sessions", 0)), int(st.get("pop3_sessions", 0))

    def assert_drained(self, what):
        t0 = time.monotonic()
        wait_until(lambda: self.counters() == (0, 0), DRAIN_BOUND, interval=0.05,
                   what="%s: sessions released (now %r)" % (what, self.counters()))
        return time.monotonic() - t0

    def test_close_after_starttls(self):
        for _ in range(ROUNDS):
            s = socket.create_connection(("127.0.0.1", self.srv.imap_port), timeout=10)
            self.assertTrue(s.recv(4096).startswith(b"* OK"))
            s.sendall(b"a STARTTLS\r\n")
            self.assertTrue(s.recv(4096).startswith(b"a OK"))
            t = self.srv.ctx.wrap_socket(s, server_hostname=TLS_NAME)
            t.close()
        self.assert_drained("STARTTLS then close")

    def test_close_after_logout_tls(self):
        for _ in range(ROUNDS):
            s = socket.create_connection(("127.0.0.1", self.srv.imaps_port), timeout=10)
            t = self.srv.ctx.wrap_socket(s, server_hostname=TLS_NAME)
            self.assertTrue(t.recv(4096).startswith(b"* OK"))
            t.sendall(b"a LOGOUT\r\n")
            t.close()  # without reading the BYE
        self.assert_drained("IMAPS LOGOUT then close")

    def test_close_after_pop3_quit(self):
        for _ in range(ROUNDS):
            s = socket.create_connection(("127.0.0.1", self.srv.pop3s_port), timeout=10)
            t = self.srv.ctx.wrap_socket(s, server_hostname=TLS_NAME)
            self.assertTrue(t.recv(4096).startswith(b"+OK"))
            t.sendall(b"QUIT\r\n")
            t.close()
        self.assert_drained("POP3S QUIT then close")


if __name__ == "__main__":
    main()
