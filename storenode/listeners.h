/* Entry points the daemon's listeners call for each accepted connection.
 * Each takes over the pending connection on `server` (cf_conn_accept). */
#ifndef LISTENERS_H
#define LISTENERS_H

#include <uv.h>

#include "node.h"

/* implicit_tls: LISTEN_PLAIN (STARTTLS available), LISTEN_TLS (implicit TLS
 * with n->tls), LISTEN_PROXY (implicit TLS with n->proxy_tls: the peer is a
 * proxy authenticated by its client certificate, and only such a session
 * believes the client address the proxy passes on: IMAP `ID
 * ("x-originating-ip" ...)`, POP3 `XCLIENT ADDR=...`, before login). */
enum { LISTEN_PLAIN = 0, LISTEN_TLS = 1, LISTEN_PROXY = 2 };

void imap_accept(struct node *n, uv_stream_t *server, int implicit_tls);
void pop3_accept(struct node *n, uv_stream_t *server, int implicit_tls);
void admin_accept(struct node *n, uv_stream_t *server);

/* Close every live session (BYE / -ERR) on shutdown or leadership loss. */
void imap_close_all(struct node *n, const char *reason);
void pop3_close_all(struct node *n, const char *reason);

#endif
