#!/usr/bin/env python3
"""auth_http endpoint for nginx's mail proxy (benchmark only): every login is
sent to the Dovecot instance of tests/bench/run; Dovecot checks the password.

  auth_http.py LISTEN_PORT IMAP_BACKEND_PORT POP3_BACKEND_PORT"""
import http.server
import sys


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"

    def do_GET(self):  # noqa: N802 - http.server API
        proto = (self.headers.get("Auth-Protocol") or "imap").lower()
        port = POP3 if proto == "pop3" else IMAP
        self.send_response(200)
        self.send_header("Auth-Status", "OK")
        self.send_header("Auth-Server", "127.0.0.1")
        self.send_header("Auth-Port", str(port))
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, fmt, *args):
        pass


if __name__ == "__main__":
    LISTEN, IMAP, POP3 = (int(a) for a in sys.argv[1:4])
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", LISTEN), Handler)
    srv.daemon_threads = True
    srv.request_queue_size = 1024
    srv.serve_forever()
