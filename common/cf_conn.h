/* cf_conn: one network connection on the libuv loop, optionally TLS, with
 * bounded buffers in both directions. Protocol sessions (IMAP, POP3, admin,
 * later the proxy) sit on top of it and never touch sockets or OpenSSL.
 *
 * Threading: loop thread only.
 *
 * Input: decrypted bytes are handed to ops->on_read as they arrive. The
 * session consumes what it can and keeps the rest itself (bounded by its own
 * line limit). cf_conn_pause_read()/cf_conn_resume_read() stop and restart
 * delivery (back-pressure: a session paused while a command runs).
 *
 * Output: cf_conn_write() copies bytes into the connection's output queue.
 * cf_conn_write_ref() queues a borrowed buffer without copying (used to
 * stream message bodies straight from the LMDB map); `release` is called
 * once the bytes are no longer needed. The queue is not refused: the
 * session must look at cf_conn_out_pending() and stop producing above
 * CF_CONN_OUT_HIGH; ops->on_drain fires when the queue falls below
 * CF_CONN_OUT_LOW after having been above it, and also when it empties if
 * cf_conn_want_drain() was called.
 *
 * TLS: implicit TLS is set at accept (cf_conn_accept with an SSL_CTX).
 * STARTTLS: the session queues its "OK Begin TLS" reply and calls
 * cf_conn_starttls(); the conn flushes the queued plaintext, throws away
 * every input byte already received but not yet consumed (CVE-2011-0411),
 * and starts the handshake; ops->on_tls_ready fires when it completes. The
 * session must also reset its own parser state at that moment.
 *
 * Closing: cf_conn_close() is asynchronous and idempotent: it stops reading,
 * optionally flushes queued output (graceful), then closes the socket;
 * ops->on_close fires exactly once, from a later loop iteration, after which
 * the conn is freed. Never free session state that the conn's callbacks may
 * still touch before on_close.
 *
 * NULL: every function taking a conn accepts NULL and does nothing (writes
 * return -1), so a session whose connection went away during an asynchronous
 * wait can still run its completion path.
 *
 * Memory: an idle conn (nothing unconsumed, nothing queued) holds no
 * buffers: the input buffer exists only while it holds unconsumed bytes,
 * TLS ciphertext buffers are handed to the kernel or freed once drained,
 * and OpenSSL's record buffers are released (SSL_MODE_RELEASE_BUFFERS, set
 * by cf_tls). What remains is the conn itself and, with TLS, OpenSSL's
 * per-connection state (about 10 KiB with OpenSSL 3.0).
 *
 * Timeouts: cf_conn_set_idle_timeout(ms) closes the connection (reason
 * "idle timeout", on_timeout called first so the session can write a BYE)
 * when no input arrived for ms; 0 disables. During a TLS handshake the
 * close is immediate (the BYE is dropped: the peer stalled the handshake).
 */
#ifndef CF_CONN_H
#define CF_CONN_H

#include <openssl/ssl.h>
#include <stddef.h>
#include <stdint.h>
#include <uv.h>

#define CF_CONN_OUT_HIGH (256u * 1024)
#define CF_CONN_OUT_LOW (64u * 1024)

struct cf_conn;

struct cf_conn_ops {
    /* Plaintext input. Return the number of bytes consumed (the rest is
     * re-offered, prepended to later input; the conn keeps at most
     * `max_unconsumed` bytes (cf_conn_set_max_unconsumed; default 64 KiB) before
     * pausing reads until the session consumes). */
    size_t (*on_read)(struct cf_conn *c, void *data, const char *buf, size_t len);
    /* Output queue dropped below the low-water mark (or emptied, see above). */
    void (*on_drain)(struct cf_conn *c, void *data);
    /* TLS handshake completed (implicit TLS or STARTTLS). May be NULL. */
    void (*on_tls_ready)(struct cf_conn *c, void *data);
    /* Idle timeout fired; the session may cf_conn_write a BYE. The conn
     * closes gracefully right after. May be NULL. */
    void (*on_timeout)(struct cf_conn *c, void *data);
    /* The connection is gone (peer closed, error, or cf_conn_close). `reason`
     * is a short text (the conn's own copy: valid only during this call; it
     * may carry detail, e.g. "tls handshake failed: <openssl reason>").
     * Called exactly once; the conn is freed after. */
    void (*on_close)(struct cf_conn *c, void *data, const char *reason);
    /* Client side only (cf_conn_connect): the TCP connection is up. With a
     * client SSL_CTX the handshake starts right after and on_tls_ready
     * follows. A failed connect never calls this: on_close fires with a
     * reason starting "connect failed". May be NULL. */
    void (*on_connected)(struct cf_conn *c, void *data);
};

/* Take over a connected uv_tcp_t that was accepted on `server`.
 * Allocates the conn, calls uv_accept, sets TCP_NODELAY, records the peer
 * address. ssl_ctx != NULL starts implicit TLS at once. Returns NULL on
 * failure (the pending connection is rejected). */
struct cf_conn *cf_conn_accept(uv_loop_t *loop, uv_stream_t *server, SSL_CTX *ssl_ctx,
                               const struct cf_conn_ops *ops, void *data);

/* Set the session pointer passed to ops (e.g. after creating the session). */
void cf_conn_set_data(struct cf_conn *c, void *data);

/* Peer address as text ("127.0.0.1", "::1") and port. Valid for the conn's life. */
const char *cf_conn_peer(const struct cf_conn *c);
int cf_conn_peer_port(const struct cf_conn *c);

/* 1 when TLS is established. */
int cf_conn_is_tls(const struct cf_conn *c);
/* The peer's verified certificate (TLS with a CA configured), or NULL.
 * Borrowed; valid while the conn lives. */
X509 *cf_conn_peer_cert(const struct cf_conn *c);

/* Bytes of buffer memory the conn holds for input and TLS ciphertext (input
 * buffer capacity plus the memory BIOs' buffers; not the output queue, see
 * cf_conn_out_pending). 0 on an idle conn. For tests and statistics. */
size_t cf_conn_buffer_bytes(const struct cf_conn *c);

/* Queue a copy of buf. Returns 0, or -1 if the conn is closing (bytes dropped). */
int cf_conn_write(struct cf_conn *c, const void *buf, size_t len);
/* printf-style write (formats into a temporary; at most 64 KiB). */
int cf_conn_printf(struct cf_conn *c, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* Queue a borrowed buffer; release(arg) is called exactly once when the
 * bytes are written or the conn closes. Returns 0 or -1 (release still called). */
int cf_conn_write_ref(struct cf_conn *c, const void *buf, size_t len, void (*release)(void *arg),
                      void *arg);
/* Bytes queued and not yet handed to the kernel (plaintext size). */
size_t cf_conn_out_pending(const struct cf_conn *c);
/* Ask for one on_drain call when the output queue is completely empty. */
void cf_conn_want_drain(struct cf_conn *c);

void cf_conn_pause_read(struct cf_conn *c);
void cf_conn_resume_read(struct cf_conn *c);
void cf_conn_set_max_unconsumed(struct cf_conn *c, size_t max);

/* Start a server-side TLS handshake on a plaintext connection (STARTTLS).
 * Flushes already-queued plaintext first, discards unconsumed input (also
 * the rest of the read that carried the STARTTLS command: only bytes the
 * session consumed before the call survive). Output queued after the call
 * is sent encrypted once the handshake is done. On a cf_conn_connect conn
 * (client side) the same call starts a client handshake with ssl_ctx (SNI
 * and verification as in cf_conn_connect).
 * Returns 0 or -1 (already TLS / closing). */
int cf_conn_starttls(struct cf_conn *c, SSL_CTX *ssl_ctx);

void cf_conn_set_idle_timeout(struct cf_conn *c, uint64_t ms);

/* Close. graceful=1 flushes queued output first (bounded by 10 s). If the
 * TLS handshake (implicit TLS, after STARTTLS, or client side) is still
 * running and output is queued, the conn keeps reading until the handshake
 * is done, sends the output, then closes (within the same 10 s; no
 * on_tls_ready nor on_read is called after the close); with nothing queued
 * it closes at once. Output queued after cf_conn_starttls is dropped when
 * the close comes before the plaintext before it was flushed. */
void cf_conn_close(struct cf_conn *c, int graceful, const char *reason);
int cf_conn_is_closing(const struct cf_conn *c);

/* Client side: connect to "host:port" / "[v6]:port" (host may be a name;
 * resolved asynchronously). client_ctx != NULL starts a TLS handshake once
 * connected, with SNI and host verification against sni (or host when sni
 * is NULL; IP literals are checked as IP addresses). Output written before
 * the connection (or handshake) is up is queued and sent afterwards.
 * Returns NULL only on immediate failure (bad address syntax, out of
 * memory); later failures arrive as on_close("connect failed: ..." or
 * "tls handshake failed: ..."). */
struct cf_conn *cf_conn_connect(uv_loop_t *loop, const char *host_port, SSL_CTX *client_ctx,
                                const char *sni, const struct cf_conn_ops *ops, void *data);

/* Client TLS session resumption (cf_conn_connect conns only).
 *
 * cf_conn_set_session: offer `sess` (from cf_conn_get_session of an earlier
 * connection to the same server, same client context) in this conn's
 * handshake. Call it before the handshake starts: right after
 * cf_conn_connect, from on_connected, or before a client cf_conn_starttls.
 * The conn takes its own reference (the caller keeps its own); NULL forgets
 * a session set before. A session the server does not accept costs nothing
 * but the full handshake that would have happened anyway. Returns 0, or -1
 * (not a client conn, handshake already started, closing).
 *
 * cf_conn_get_session: the established connection's session, with a
 * reference the caller owns (SSL_SESSION_free), or NULL when TLS is not up
 * or the session cannot be resumed (TLS 1.3: no ticket received yet; the
 * server sends them right after the handshake, so ask once the server's
 * first reply has been read).
 *
 * cf_conn_session_reused: 1 when this conn's handshake resumed a session. */
int cf_conn_set_session(struct cf_conn *c, SSL_SESSION *sess);
SSL_SESSION *cf_conn_get_session(struct cf_conn *c);
int cf_conn_session_reused(const struct cf_conn *c);

/* Split "host:port", "[v6]:port" or "*:port" into host (brackets removed;
 * "*" becomes "0.0.0.0") and port. Returns 0 or -1. */
int cf_parse_host_port(const char *s, char *host, size_t hostlen, int *port_r);

/* Listener helper: bind+listen on "host:port" ("127.0.0.1:1143", "[::1]:1143",
 * "*:143"; "*" is 0.0.0.0, use "[::]:143" for IPv6; a host name is resolved
 * synchronously). Returns 0 or a negative uv error; fills err. When bind or
 * listen fails the handle has been initialised and is already being closed
 * (uv_close, no callback): keep `server` alive until the loop ran once more.
 * Also sets SIGPIPE to ignored (as every cf_conn constructor does). */
int cf_listen_tcp(uv_loop_t *loop, uv_tcp_t *server, const char *addr, int backlog,
                  uv_connection_cb cb, char *err, size_t errlen);

#endif
