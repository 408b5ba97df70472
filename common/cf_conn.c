/* cf_conn: one connection on the libuv loop, plaintext or TLS over memory
 * BIOs. See cf_conn.h.
 *
 * Internals:
 * - Three handles per conn: tcp, timer (idle timeout, later the graceful
 *   close cap) and kick (a uv_idle that runs deferred work: delivering
 *   buffered input after resume/STARTTLS and pumping queued output). All
 *   session callbacks except on_close run from libuv callbacks that the
 *   session did not call itself, so a session may call any cf_conn function
 *   from inside any callback.
 * - The conn is freed only after all three handles have been closed and no
 *   getaddrinfo request is outstanding; on_close runs right before.
 * - Output: a queue of chunks (copied, or borrowed slices sharing one
 *   release reference). Plaintext: whole chunks move into a uv_write request
 *   and are released in its callback. TLS: chunks are fed to SSL_write
 *   (which copies into the write BIO) and released at once; the write BIO's
 *   buffer itself is handed to uv_write (no copy) and the BIO starts a new
 *   one. Either way at most OUT_INFLIGHT bytes are handed to uv_write at a
 *   time (TLS: plus BIO contents).
 * - Idle memory: in_buf exists only while it holds unconsumed input; the
 *   read BIO's buffer is freed once OpenSSL has consumed it; SSL_read goes
 *   through a per-thread scratch buffer when in_buf has no room for a whole
 *   record; client-only fields live in a separate allocation; the close
 *   reason is allocated at close.
 */
#include "cf_conn.h"

#include <arpa/inet.h>
#include <netdb.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

#include <openssl/err.h>
#include <openssl/x509v3.h>

#include "cf_log.h"
#include "cf_tls.h"

#define OUT_INFLIGHT (256u * 1024) /* bytes handed to uv_write at a time */
#define OUT_CHUNK_MAX (64u * 1024) /* max bytes per queued chunk */
#define OUT_COALESCE (16u * 1024)  /* small copied writes share a chunk this big */
#define PLAIN_WRITE_MAX_BUFS 64    /* uv_buf_t per plaintext uv_write */
#define READ_BUF_SIZE (64u * 1024) /* socket read buffer */
#define TLS_READ_STEP (16u * 1024) /* SSL_read granularity */
#define CLOSE_FLUSH_MS 10000       /* graceful close cap */
#define MAX_UNCONSUMED_DEFAULT (64u * 1024)
#define TLS_FLUSH_AT (64u * 1024) /* ciphertext handed to uv_write at this size */
#define IN_SHRINK_MIN (4u * 1024) /* in_buf granularity when shrunk */

enum conn_tls { TLS_NONE, TLS_HANDSHAKE, TLS_UP };
enum conn_state { ST_OPEN, ST_FLUSHING, ST_CLOSED };

struct out_ref {
    void (*release)(void *arg);
    void *arg;
    size_t refs; /* chunks still pointing at it */
};

struct out_chunk {
    struct out_chunk *next;
    const char *data;    /* inline_data for copied chunks, borrowed otherwise */
    size_t len, off;     /* off: bytes already consumed (TLS path) */
    size_t cap;          /* copied chunks: capacity of inline_data */
    struct out_ref *ref; /* NULL for copied chunks */
    int sealed;          /* no more coalescing into this chunk */
    char inline_data[];
};

struct write_req {
    uv_write_t req;
    struct cf_conn *c;
    size_t bytes;
    struct out_chunk *chunks; /* plaintext: chunks to release */
    char *tls_buf;            /* TLS: ciphertext owned by the request */
};

/* Client side only (cf_conn_connect), allocated with the conn. */
struct conn_client {
    uv_getaddrinfo_t gai;
    uv_connect_t req;
    SSL_CTX *ctx;
    SSL_SESSION *session; /* to resume (cf_conn_set_session), referenced */
    int port;
    const char *sni; /* NULL: verify host; else points into name[] */
    char name[];     /* host '\0' [sni '\0'] */
};

struct cf_conn {
    uv_loop_t *loop;
    uv_tcp_t tcp;
    uv_timer_t timer;
    uv_idle_t kick;
    int open_handles;
    int gai_pending;

    const struct cf_conn_ops *ops;
    void *data;
    char peer[INET6_ADDRSTRLEN];
    int peer_port;
    int is_client;
    int connected;
    struct conn_client *cl; /* NULL on accepted conns */

    /* TLS */
    SSL *ssl;
    BIO *rbio, *wbio; /* owned by ssl */
    enum conn_tls tls;
    SSL *pending_ssl; /* STARTTLS: created at the call, installed after the flush */
    int starttls_pending;
    size_t starttls_plain_bytes; /* queued bytes still to send in plaintext */
    int shutdown_sent;

    /* output */
    struct out_chunk *out_head, *out_tail;
    size_t out_pending;
    size_t inflight;
    int writes_outstanding;
    int above_high, want_drain;

    /* input */
    char *in_buf;
    size_t in_len, in_cap, max_unconsumed;
    int user_paused, reading, eof;
    int deliver_pending, pump_pending;
    int in_process;
    unsigned tls_gen;

    /* closing */
    enum conn_state state;
    int close_called, silent;
    uint64_t idle_ms;
    char *reason; /* set when closing (NULL: out of memory) */
};

#define REASON_MAX 256 /* longer close reasons are cut */

static void conn_kick(struct cf_conn *c);
static void conn_pump(struct cf_conn *c);
static void conn_process_input(struct cf_conn *c);
static void conn_update_reading(struct cf_conn *c);
static void conn_finalize(struct cf_conn *c);
static void conn_check_flush_done(struct cf_conn *c);
static void conn_client_tls_setup(struct cf_conn *c);

/* ---- chunks ---- */

static void chunk_free(struct out_chunk *ch)
{
    if (ch->ref != NULL && --ch->ref->refs == 0) {
        if (ch->ref->release != NULL) ch->ref->release(ch->ref->arg);
        free(ch->ref);
    }
    free(ch);
}

static void chunk_list_free(struct out_chunk *ch)
{
    while (ch != NULL) {
        struct out_chunk *next = ch->next;
        chunk_free(ch);
        ch = next;
    }
}

static void queue_append(struct cf_conn *c, struct out_chunk *ch)
{
    ch->next = NULL;
    if (c->out_tail != NULL)
        c->out_tail->next = ch;
    else
        c->out_head = ch;
    c->out_tail = ch;
}

static struct out_chunk *queue_pop(struct cf_conn *c)
{
    struct out_chunk *ch = c->out_head;
    if (ch == NULL) return NULL;
    c->out_head = ch->next;
    if (c->out_head == NULL) c->out_tail = NULL;
    ch->next = NULL;
    return ch;
}

/* ---- lifetime ---- */

static void conn_set_reason(struct cf_conn *c, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));
static void conn_set_reason(struct cf_conn *c, const char *fmt, ...)
{
    char buf[REASON_MAX];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof(buf), fmt, ap);
    va_end(ap);
    free(c->reason);
    c->reason = strdup(buf);
}

static void conn_free(struct cf_conn *c)
{
    chunk_list_free(c->out_head);
    SSL_free(c->ssl);
    SSL_free(c->pending_ssl);
    if (c->cl != NULL) SSL_SESSION_free(c->cl->session);
    free(c->cl);
    free(c->in_buf);
    free(c->reason);
    free(c);
}

static void conn_maybe_free(struct cf_conn *c)
{
    if (c->open_handles > 0 || c->gai_pending) return;
    if (!c->silent && !c->close_called) {
        c->close_called = 1;
        if (c->ops->on_close != NULL)
            c->ops->on_close(c, c->data, c->reason != NULL ? c->reason : "closed (out of memory)");
    }
    conn_free(c);
}

static void handle_closed_cb(uv_handle_t *h)
{
    struct cf_conn *c = h->data;
    c->open_handles--;
    conn_maybe_free(c);
}

/* Close every handle; the conn is freed when the last close callback ran. */
static void conn_finalize(struct cf_conn *c)
{
    if (c->state == ST_CLOSED) return;
    c->state = ST_CLOSED;
    c->reading = 0;
    if (c->gai_pending) uv_cancel((uv_req_t *)&c->cl->gai);
    uv_close((uv_handle_t *)&c->tcp, handle_closed_cb);
    uv_close((uv_handle_t *)&c->timer, handle_closed_cb);
    uv_close((uv_handle_t *)&c->kick, handle_closed_cb);
}

/* libuv writes with writev(): a peer reset would raise SIGPIPE and kill
 * the process. Every process using cf_conn therefore ignores it (write
 * errors are reported as EPIPE instead). */
static void ignore_sigpipe(void)
{
    static int done;
    if (!done) {
        signal(SIGPIPE, SIG_IGN);
        done = 1;
    }
}

/* Allocate a conn with its three handles initialised. NULL on failure. */
static struct cf_conn *conn_new(uv_loop_t *loop, const struct cf_conn_ops *ops, void *data)
{
    struct cf_conn *c = calloc(1, sizeof(*c));

    ignore_sigpipe();

    if (c == NULL) return NULL;
    if (uv_tcp_init(loop, &c->tcp) != 0) {
        free(c);
        return NULL;
    }
    c->loop = loop;
    c->ops = ops;
    c->data = data;
    c->max_unconsumed = MAX_UNCONSUMED_DEFAULT;
    c->peer_port = -1;
    snprintf(c->peer, sizeof(c->peer), "-");
    uv_timer_init(loop, &c->timer);
    uv_idle_init(loop, &c->kick);
    c->tcp.data = c->timer.data = c->kick.data = c;
    c->open_handles = 3;
    return c;
}

/* ---- TLS helpers ---- */

static int conn_tls_attach(struct cf_conn *c, SSL *ssl)
{
    BIO *r = BIO_new(BIO_s_mem()), *w = BIO_new(BIO_s_mem());

    if (r == NULL || w == NULL) {
        BIO_free(r);
        BIO_free(w);
        return -1;
    }
    /* a read BIO that runs dry reports "retry", not EOF */
    BIO_set_mem_eof_return(r, -1);
    BIO_set_mem_eof_return(w, -1);
    SSL_set_bio(ssl, r, w);
    c->ssl = ssl;
    c->rbio = r;
    c->wbio = w;
    c->tls = TLS_HANDSHAKE;
    return 0;
}

/* Describe a TLS failure into buf (REASON_MAX bytes). */
static void conn_ssl_reason(struct cf_conn *c, const char *prefix, char *buf)
{
    char ebuf[200];
    long vr;

    if (c->ssl != NULL && (SSL_get_verify_mode(c->ssl) & SSL_VERIFY_PEER) != 0 &&
        (vr = SSL_get_verify_result(c->ssl)) != X509_V_OK) {
        ERR_clear_error();
        snprintf(buf, REASON_MAX, "%s: certificate verify failed: %s", prefix,
                 X509_verify_cert_error_string(vr));
        return;
    }
    if (ERR_peek_error() == 0) {
        snprintf(buf, REASON_MAX, "%s: connection reset or protocol error", prefix);
        return;
    }
    cf_tls_errstr(ebuf, sizeof(ebuf));
    snprintf(buf, REASON_MAX, "%s: %s", prefix, ebuf);
}

static void write_cb(uv_write_t *req, int status);

/* Memory BIOs keep their buffer (grown to the largest amount ever held)
 * for their whole life: 16 KiB and more per idle TLS conn. These two
 * helpers give it back. */

/* Take every byte a memory BIO holds: returns its buffer (free it with
 * OPENSSL_free; its length in *len_r) and leaves the BIO empty without a
 * buffer. NULL when the BIO is empty. The BIO is only ever written by
 * OpenSSL, never read, so its data starts at the buffer's start. */
static char *mem_bio_take(BIO *b, size_t *len_r)
{
    BUF_MEM *bm = NULL;
    char *data;

    if (BIO_get_mem_ptr(b, &bm) != 1 || bm == NULL || bm->length == 0 || bm->data == NULL)
        return NULL;
    data = bm->data;
    *len_r = bm->length;
    bm->data = NULL;
    bm->length = bm->max = 0;
    /* re-install the (now empty) BUF_MEM: resets the BIO's read view */
    (void)BIO_set_close(b, BIO_NOCLOSE);
    (void)BIO_set_mem_buf(b, bm, BIO_CLOSE);
    return data;
}

/* Free a memory BIO's buffer once everything in it has been read. */
static void mem_bio_release(BIO *b)
{
    BUF_MEM *bm = NULL;

    if (b == NULL || BIO_ctrl_pending(b) != 0) return;
    if (BIO_get_mem_ptr(b, &bm) != 1 || bm == NULL || bm->data == NULL) return;
    OPENSSL_free(bm->data);
    bm->data = NULL;
    bm->length = bm->max = 0;
    (void)BIO_set_close(b, BIO_NOCLOSE);
    (void)BIO_set_mem_buf(b, bm, BIO_CLOSE);
}

/* Move ciphertext from the write BIO into a uv_write. Returns 0 or -1
 * (conn closed). */
static int conn_flush_wbio(struct cf_conn *c)
{
    while (c->wbio != NULL && c->state != ST_CLOSED) {
        size_t n = BIO_ctrl_pending(c->wbio);
        struct write_req *wr;
        uv_buf_t b;
        int rv;

        if (n == 0) return 0;
        wr = calloc(1, sizeof(*wr));
        if (wr == NULL) {
            conn_set_reason(c, "out of memory");
            conn_finalize(c);
            return -1;
        }
        wr->tls_buf = mem_bio_take(c->wbio, &n);
        if (wr->tls_buf == NULL) {
            free(wr);
            conn_set_reason(c, "tls internal error");
            conn_finalize(c);
            return -1;
        }
        wr->c = c;
        wr->bytes = n;
        b = uv_buf_init(wr->tls_buf, (unsigned)n);
        rv = uv_write(&wr->req, (uv_stream_t *)&c->tcp, &b, 1, write_cb);
        if (rv != 0) {
            OPENSSL_free(wr->tls_buf);
            free(wr);
            conn_set_reason(c, "write error: %s", uv_strerror(rv));
            conn_finalize(c);
            return -1;
        }
        c->inflight += n;
        c->writes_outstanding++;
    }
    return 0;
}

/* Handshake step. Returns 1 when established now or before, 0 when more
 * input is needed, -1 when the conn is closing. */
static int conn_handshake(struct cf_conn *c)
{
    int r;

    if (c->tls == TLS_UP) return 1;
    ERR_clear_error();
    r = SSL_do_handshake(c->ssl);
    if (r == 1) {
        c->tls = TLS_UP;
        if (conn_flush_wbio(c) < 0) return -1;
        if (c->state == ST_FLUSHING) {
            /* closing: the handshake only had to finish for the queued
             * output; no more session callbacks but on_close */
            conn_update_reading(c);
            c->pump_pending = 1;
            conn_kick(c);
            return -1;
        }
        if (c->ops->on_tls_ready != NULL) c->ops->on_tls_ready(c, c->data);
        if (c->state != ST_OPEN) return -1;
        c->pump_pending = 1;
        conn_kick(c);
        return 1;
    }
    switch (SSL_get_error(c->ssl, r)) {
    case SSL_ERROR_WANT_READ:
    case SSL_ERROR_WANT_WRITE:
        if (conn_flush_wbio(c) < 0) return -1;
        return 0;
    default: {
        char reason[REASON_MAX];
        conn_ssl_reason(c, "tls handshake failed", reason);
        /* send the alert if there is one, then close; no SSL_shutdown */
        c->tls = TLS_NONE;
        if (conn_flush_wbio(c) < 0) return -1;
        if (c->state == ST_FLUSHING) {
            /* already closing (keeps its reason): give up the queued output */
            conn_update_reading(c);
            conn_check_flush_done(c);
            return -1;
        }
        cf_conn_close(c, 1, reason);
        return -1;
    }
    }
}

/* ---- reading ---- */

/* libuv calls alloc_cb and read_cb back to back on the loop thread, so one
 * read buffer per thread serves every conn (no 64 KiB per idle session). */
static _Thread_local char read_buf[READ_BUF_SIZE];

static void alloc_cb(uv_handle_t *h, size_t suggested, uv_buf_t *buf)
{
    (void)h;
    (void)suggested;
    *buf = uv_buf_init(read_buf, READ_BUF_SIZE);
}

/* The input buffer exists only while it holds unconsumed bytes (an idle
 * conn has none). */
static void in_release(struct cf_conn *c)
{
    c->in_len = 0;
    free(c->in_buf);
    c->in_buf = NULL;
    c->in_cap = 0;
}

/* Drop unconsumed input. Inside on_read the session may still be looking
 * at in_buf: the buffer is then freed when conn_process_input returns. */
static void in_discard(struct cf_conn *c)
{
    if (c->in_process)
        c->in_len = 0;
    else
        in_release(c);
}

/* Leftover bytes (a session waiting for the rest of a line, or paused)
 * keep a buffer their size, not the largest one ever needed. */
static void in_shrink(struct cf_conn *c)
{
    size_t ncap = (c->in_len + IN_SHRINK_MIN - 1) / IN_SHRINK_MIN * IN_SHRINK_MIN;
    char *nb = realloc(c->in_buf, ncap);

    if (nb == NULL) return;
    c->in_buf = nb;
    c->in_cap = ncap;
}

static int in_reserve(struct cf_conn *c, size_t extra)
{
    size_t need = c->in_len + extra, ncap;
    char *nb;

    if (need <= c->in_cap) return 0;
    ncap = c->in_cap ? c->in_cap : 4096;
    while (ncap < need)
        ncap *= 2;
    nb = realloc(c->in_buf, ncap);
    if (nb == NULL) return -1;
    c->in_buf = nb;
    c->in_cap = ncap;
    return 0;
}

static void idle_timer_cb(uv_timer_t *t);

static void conn_restart_idle(struct cf_conn *c)
{
    if (c->state == ST_OPEN && c->idle_ms > 0)
        uv_timer_start(&c->timer, idle_timer_cb, c->idle_ms, 0);
}

static void read_cb(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf)
{
    struct cf_conn *c = s->data;

    if (nread == 0) return;
    if (c->state == ST_FLUSHING && c->tls == TLS_HANDSHAKE) {
        /* graceful close during the handshake: finish it, then flush */
        if (nread < 0 || BIO_write(c->rbio, buf->base, (int)nread) != (int)nread) {
            conn_finalize(c);
            return;
        }
        conn_handshake(c);
        if (c->state != ST_CLOSED) mem_bio_release(c->rbio);
        return;
    }
    if (c->state != ST_OPEN) return;
    if (nread < 0) {
        if (nread == UV_EOF) {
            /* deliver what is buffered; process_input closes once the
             * session is not paused */
            c->eof = 1;
            c->deliver_pending = 1;
            conn_update_reading(c);
            conn_process_input(c);
        } else {
            char r[128];
            snprintf(r, sizeof(r), "read error: %s", uv_strerror((int)nread));
            cf_conn_close(c, 0, r);
        }
        return;
    }
    conn_restart_idle(c);
    if (c->starttls_pending) return; /* reading is stopped; drop stragglers */
    if (c->ssl != NULL) {
        if (BIO_write(c->rbio, buf->base, (int)nread) != (int)nread) {
            cf_conn_close(c, 0, "out of memory");
            return;
        }
    } else {
        if (in_reserve(c, (size_t)nread) < 0) {
            cf_conn_close(c, 0, "out of memory");
            return;
        }
        memcpy(c->in_buf + c->in_len, buf->base, (size_t)nread);
        c->in_len += (size_t)nread;
    }
    c->deliver_pending = 1;
    conn_process_input(c);
}

static void conn_update_reading(struct cf_conn *c)
{
    int want;

    if (c->state == ST_CLOSED) return;
    want = (c->state == ST_OPEN || (c->state == ST_FLUSHING && c->tls == TLS_HANDSHAKE)) &&
           c->connected && !c->eof && !c->starttls_pending;
    if (want && c->tls != TLS_HANDSHAKE) {
        if (c->user_paused || c->in_len >= c->max_unconsumed) want = 0;
    }
    if (want && !c->reading) {
        if (uv_read_start((uv_stream_t *)&c->tcp, alloc_cb, read_cb) == 0) c->reading = 1;
    } else if (!want && c->reading) {
        uv_read_stop((uv_stream_t *)&c->tcp);
        c->reading = 0;
    }
}

/* SSL_read target when in_buf has no room for a whole record: only the
 * bytes actually decrypted are then copied into in_buf, so a short command
 * does not cost a 16 KiB buffer. */
static _Thread_local char tls_scratch[TLS_READ_STEP];

/* Pull decrypted bytes into in_buf (up to max_unconsumed). Returns 0, or -1
 * when the conn is closing. */
static int conn_tls_pull(struct cf_conn *c)
{
    while (c->in_len < c->max_unconsumed) {
        int direct = c->in_cap - c->in_len >= TLS_READ_STEP;
        size_t n = 0;
        int r;

        ERR_clear_error();
        r = SSL_read_ex(c->ssl, direct ? c->in_buf + c->in_len : tls_scratch, TLS_READ_STEP, &n);
        if (r == 1) {
            if (!direct) {
                if (in_reserve(c, n) < 0) {
                    cf_conn_close(c, 0, "out of memory");
                    return -1;
                }
                memcpy(c->in_buf + c->in_len, tls_scratch, n);
            }
            c->in_len += n;
            continue;
        }
        switch (SSL_get_error(c->ssl, r)) {
        case SSL_ERROR_WANT_READ:
        case SSL_ERROR_WANT_WRITE:
            return 0;
        case SSL_ERROR_ZERO_RETURN:
            c->eof = 1;
            return 0;
        default: {
            char r2[REASON_MAX];
            conn_ssl_reason(c, "tls error", r2);
            c->tls = TLS_NONE;
            cf_conn_close(c, 0, r2);
            return -1;
        }
        }
    }
    return 0;
}

/* Hand buffered input to the session until it stops consuming, pauses,
 * starts TLS or closes. Never re-entered. */
static void conn_process_input(struct cf_conn *c)
{
    if (c->in_process || c->state != ST_OPEN) return;
    c->in_process = 1;
    for (;;) {
        unsigned gen = c->tls_gen;
        size_t n;

        if (c->ssl != NULL) {
            int h = conn_handshake(c);
            if (h <= 0) break;
            if (conn_tls_pull(c) < 0) break;
            /* SSL_read may have produced output (tickets, alerts) */
            if (conn_flush_wbio(c) < 0) break;
        }
        if (c->state != ST_OPEN || c->user_paused || c->starttls_pending) break;
        if (c->in_len == 0 || !c->deliver_pending) break;
        n = c->ops->on_read(c, c->data, c->in_buf, c->in_len);
        if (c->state != ST_OPEN) break;
        if (c->starttls_pending || gen != c->tls_gen) {
            c->in_len = 0; /* STARTTLS: nothing received before it survives */
            break;
        }
        if (n > c->in_len) n = c->in_len;
        if (n > 0) {
            memmove(c->in_buf, c->in_buf + n, c->in_len - n);
            c->in_len -= n;
        } else {
            /* wait for more input, unless TLS still holds more plaintext */
            if (c->ssl == NULL || c->in_len >= c->max_unconsumed || SSL_pending(c->ssl) == 0)
                c->deliver_pending = 0;
            if (c->ssl == NULL || !c->deliver_pending) break;
        }
        if (c->in_len == 0 && (c->ssl == NULL || SSL_pending(c->ssl) == 0) &&
            (c->rbio == NULL || BIO_ctrl_pending(c->rbio) == 0))
            break;
    }
    c->in_process = 0;
    /* an idle conn keeps no input buffers */
    if (c->in_len == 0)
        in_release(c);
    else if (c->in_cap >= 4 * IN_SHRINK_MIN && c->in_len <= c->in_cap / 4)
        in_shrink(c);
    if (c->rbio != NULL) mem_bio_release(c->rbio);
    if (c->state == ST_OPEN && c->eof && !c->user_paused) {
        cf_conn_close(c, 1, "peer closed");
        return;
    }
    conn_update_reading(c);
}

/* ---- writing ---- */

static void conn_notify_drain(struct cf_conn *c)
{
    if (c->state != ST_OPEN) return;
    if (c->above_high && c->out_pending < CF_CONN_OUT_LOW) {
        c->above_high = 0;
        if (c->ops->on_drain != NULL) c->ops->on_drain(c, c->data);
        if (c->state != ST_OPEN) return;
    }
    if (c->want_drain && c->out_pending == 0 && c->inflight == 0) {
        c->want_drain = 0;
        if (c->ops->on_drain != NULL) c->ops->on_drain(c, c->data);
    }
}

/* 1 when queued output can still make progress. */
static int conn_can_send(const struct cf_conn *c)
{
    if (!c->connected || c->out_head == NULL) return 0;
    if (c->ssl != NULL) return c->tls == TLS_UP;
    return !(c->starttls_pending && c->starttls_plain_bytes == 0);
}

static void conn_check_flush_done(struct cf_conn *c)
{
    if (c->state != ST_FLUSHING) return;
    if (conn_can_send(c)) return;
    /* output waits for the handshake (it still reads; the close cap bounds it) */
    if (c->tls == TLS_HANDSHAKE && c->connected && c->out_head != NULL) return;
    if (c->writes_outstanding > 0) return;
    if (c->tls == TLS_UP && !c->shutdown_sent) {
        c->shutdown_sent = 1;
        ERR_clear_error();
        SSL_shutdown(c->ssl);
        ERR_clear_error();
        if (conn_flush_wbio(c) < 0) return;
        if (c->writes_outstanding > 0) return;
    }
    conn_finalize(c);
}

static void write_cb(uv_write_t *req, int status)
{
    struct write_req *wr = (struct write_req *)req;
    struct cf_conn *c = wr->c;

    c->inflight -= wr->bytes;
    c->writes_outstanding--;
    chunk_list_free(wr->chunks);
    OPENSSL_free(wr->tls_buf);
    free(wr);
    if (c->state == ST_CLOSED) return;
    if (status < 0) {
        char r[128];
        if (c->state == ST_FLUSHING) {
            /* the peer is gone while we flush (typically our close_notify
             * after it closed): nothing more can be delivered */
            conn_finalize(c);
            return;
        }
        snprintf(r, sizeof(r), "write error: %s", uv_strerror(status));
        cf_conn_close(c, 0, r);
        return;
    }
    conn_pump(c);
}

/* One plaintext uv_write of whole chunks. Returns 0, or -1 when closed. */
static int conn_pump_plain_once(struct cf_conn *c)
{
    uv_buf_t bufs[PLAIN_WRITE_MAX_BUFS];
    unsigned nbufs = 0;
    struct write_req *wr = calloc(1, sizeof(*wr));
    struct out_chunk **tailp;
    int rv;

    if (wr == NULL) {
        cf_conn_close(c, 0, "out of memory");
        return -1;
    }
    wr->c = c;
    tailp = &wr->chunks;
    while (c->out_head != NULL && nbufs < PLAIN_WRITE_MAX_BUFS) {
        struct out_chunk *ch = c->out_head;
        size_t n = ch->len - ch->off;
        if (nbufs > 0 && c->inflight + wr->bytes + n > OUT_INFLIGHT) break;
        if (c->starttls_pending) {
            if (c->starttls_plain_bytes == 0) break;
            c->starttls_plain_bytes -= n;
        }
        queue_pop(c);
        ch->sealed = 1;
        bufs[nbufs++] = uv_buf_init((char *)ch->data + ch->off, (unsigned)n);
        wr->bytes += n;
        c->out_pending -= n;
        *tailp = ch;
        tailp = &ch->next;
    }
    if (nbufs == 0) {
        free(wr);
        return 0;
    }
    rv = uv_write(&wr->req, (uv_stream_t *)&c->tcp, bufs, nbufs, write_cb);
    if (rv != 0) {
        char r[128];
        chunk_list_free(wr->chunks);
        free(wr);
        snprintf(r, sizeof(r), "write error: %s", uv_strerror(rv));
        cf_conn_close(c, 0, r);
        return -1;
    }
    c->inflight += wr->bytes;
    c->writes_outstanding++;
    return 0;
}

/* Feed queued plaintext through SSL_write. Returns 0 or -1 when closed. */
static int conn_pump_tls(struct cf_conn *c)
{
    while (c->out_head != NULL && c->inflight + BIO_ctrl_pending(c->wbio) < OUT_INFLIGHT) {
        struct out_chunk *ch = c->out_head;
        size_t n = 0;
        int r;

        ERR_clear_error();
        r = SSL_write_ex(c->ssl, ch->data + ch->off, ch->len - ch->off, &n);
        if (r != 1) {
            int e = SSL_get_error(c->ssl, r);
            if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE) break;
            {
                char r2[REASON_MAX];
                conn_ssl_reason(c, "tls write error", r2);
                c->tls = TLS_NONE;
                cf_conn_close(c, 0, r2);
            }
            return -1;
        }
        ch->off += n;
        c->out_pending -= n;
        if (ch->off == ch->len) chunk_free(queue_pop(c));
        /* hand over ciphertext in pieces: the write BIO's buffer grows by
         * reallocation, a smaller one costs fewer copies */
        if (BIO_ctrl_pending(c->wbio) >= TLS_FLUSH_AT && conn_flush_wbio(c) < 0) return -1;
    }
    return conn_flush_wbio(c);
}

/* Make progress on output; switch to TLS when a STARTTLS flush is done;
 * notify drains; finish a graceful close. Called from deferred contexts
 * only (kick, write callback, handshake completion). */
static void conn_pump(struct cf_conn *c)
{
    c->pump_pending = 0;
    if (c->state == ST_CLOSED || !c->connected) return;
    if (c->ssl == NULL) {
        while (c->out_head != NULL && c->inflight < OUT_INFLIGHT &&
               !(c->starttls_pending && c->starttls_plain_bytes == 0)) {
            size_t before = c->out_pending;
            if (conn_pump_plain_once(c) < 0) return;
            if (c->out_pending == before) break;
        }
        if (c->starttls_pending && c->starttls_plain_bytes == 0 && c->writes_outstanding == 0 &&
            c->state == ST_OPEN) {
            /* all plaintext is out: switch to TLS */
            SSL *ssl = c->pending_ssl;
            c->pending_ssl = NULL;
            if (conn_tls_attach(c, ssl) < 0) {
                SSL_free(ssl);
                cf_conn_close(c, 0, "out of memory");
                return;
            }
            c->starttls_pending = 0;
            in_discard(c);
            c->tls_gen++;
            if (c->is_client) {
                conn_client_tls_setup(c);
                conn_update_reading(c);
                conn_handshake(c); /* sends the ClientHello */
                return;
            }
            SSL_set_accept_state(c->ssl);
            conn_update_reading(c);
        }
    } else if (c->tls == TLS_UP) {
        if (conn_pump_tls(c) < 0) return;
    }
    conn_notify_drain(c);
    conn_check_flush_done(c);
}

static void kick_cb(uv_idle_t *h)
{
    struct cf_conn *c = h->data;

    uv_idle_stop(h);
    if (c->state == ST_CLOSED) return;
    if (c->deliver_pending) conn_process_input(c);
    if (c->state == ST_CLOSED) return;
    conn_pump(c);
}

static void conn_kick(struct cf_conn *c)
{
    if (c->state != ST_CLOSED) uv_idle_start(&c->kick, kick_cb);
}

int cf_conn_write(struct cf_conn *c, const void *buf, size_t len)
{
    const char *p = buf;

    if (!c || c->state != ST_OPEN) return -1;
    if (len == 0) return 0;
    c->out_pending += len;
    while (len > 0) {
        struct out_chunk *t = c->out_tail;
        size_t n;
        if (t != NULL && t->ref == NULL && !t->sealed && t->cap > t->len) {
            n = t->cap - t->len;
            if (n > len) n = len;
            memcpy(t->inline_data + t->len, p, n);
            t->len += n;
        } else {
            size_t cap =
                len > OUT_COALESCE ? (len > OUT_CHUNK_MAX ? OUT_CHUNK_MAX : len) : OUT_COALESCE;
            struct out_chunk *ch = malloc(sizeof(*ch) + cap);
            if (ch == NULL) {
                c->out_pending -= len;
                cf_conn_close(c, 0, "out of memory");
                return -1;
            }
            memset(ch, 0, sizeof(*ch));
            ch->cap = cap;
            ch->data = ch->inline_data;
            n = len < cap ? len : cap;
            memcpy(ch->inline_data, p, n);
            ch->len = n;
            queue_append(c, ch);
        }
        p += n;
        len -= n;
    }
    if (c->out_pending > CF_CONN_OUT_HIGH) c->above_high = 1;
    c->pump_pending = 1;
    conn_kick(c);
    return 0;
}

int cf_conn_printf(struct cf_conn *c, const char *fmt, ...)
{
    char small[1024], *big = NULL;
    va_list ap;
    int n, rv;

    if (!c) return -1;
    va_start(ap, fmt);
    n = vsnprintf(small, sizeof(small), fmt, ap);
    va_end(ap);
    if (n < 0) return -1;
    if ((size_t)n < sizeof(small)) return cf_conn_write(c, small, (size_t)n);
    if (n > 64 * 1024) n = 64 * 1024;
    big = malloc((size_t)n + 1);
    if (big == NULL) return -1;
    va_start(ap, fmt);
    vsnprintf(big, (size_t)n + 1, fmt, ap);
    va_end(ap);
    rv = cf_conn_write(c, big, (size_t)n);
    free(big);
    return rv;
}

int cf_conn_write_ref(struct cf_conn *c, const void *buf, size_t len, void (*release)(void *arg),
                      void *arg)
{
    struct out_ref *ref;
    const char *p = buf;

    if (!c || c->state != ST_OPEN || len == 0) {
        if (release != NULL) release(arg);
        return (!c || c->state != ST_OPEN) ? -1 : 0;
    }
    ref = calloc(1, sizeof(*ref));
    if (ref == NULL) {
        if (release != NULL) release(arg);
        cf_conn_close(c, 0, "out of memory");
        return -1;
    }
    ref->release = release;
    ref->arg = arg;
    ref->refs = 1; /* held by this function until all slices are queued */
    c->out_pending += len;
    while (len > 0) {
        size_t n = len > OUT_CHUNK_MAX ? OUT_CHUNK_MAX : len;
        struct out_chunk *ch = calloc(1, sizeof(*ch));
        if (ch == NULL) {
            c->out_pending -= len;
            if (--ref->refs == 0) {
                if (release != NULL) release(arg);
                free(ref);
            }
            cf_conn_close(c, 0, "out of memory");
            return -1;
        }
        ch->data = p;
        ch->len = n;
        ch->ref = ref;
        ch->sealed = 1;
        ref->refs++;
        queue_append(c, ch);
        p += n;
        len -= n;
    }
    ref->refs--; /* >= 1 left: the slices */
    if (c->out_pending > CF_CONN_OUT_HIGH) c->above_high = 1;
    c->pump_pending = 1;
    conn_kick(c);
    return 0;
}

static size_t mem_bio_cap(BIO *b)
{
    BUF_MEM *bm = NULL;
    /* BIO_get_mem_ptr only moves unread bytes to the buffer's start */
    if (b == NULL || BIO_get_mem_ptr(b, &bm) != 1 || bm == NULL) return 0;
    return bm->max;
}

size_t cf_conn_buffer_bytes(const struct cf_conn *c)
{
    if (!c) return 0;
    return c->in_cap + mem_bio_cap(c->rbio) + mem_bio_cap(c->wbio);
}

size_t cf_conn_out_pending(const struct cf_conn *c)
{
    if (!c) return 0;
    return c->out_pending;
}

void cf_conn_want_drain(struct cf_conn *c)
{
    if (!c) return;
    c->want_drain = 1;
    c->pump_pending = 1;
    conn_kick(c);
}

/* ---- control ---- */

void cf_conn_set_data(struct cf_conn *c, void *data)
{
    c->data = data;
}

const char *cf_conn_peer(const struct cf_conn *c)
{
    return c->peer;
}

int cf_conn_peer_port(const struct cf_conn *c)
{
    return c->peer_port;
}

int cf_conn_is_tls(const struct cf_conn *c)
{
    return c->tls == TLS_UP;
}

X509 *cf_conn_peer_cert(const struct cf_conn *c)
{
    if (c->ssl == NULL || c->tls != TLS_UP) return NULL;
    if ((SSL_get_verify_mode(c->ssl) & SSL_VERIFY_PEER) == 0) return NULL;
    if (SSL_get_verify_result(c->ssl) != X509_V_OK) return NULL;
    return SSL_get0_peer_certificate(c->ssl);
}

void cf_conn_pause_read(struct cf_conn *c)
{
    if (!c) return;
    c->user_paused = 1;
    conn_update_reading(c);
}

void cf_conn_resume_read(struct cf_conn *c)
{
    if (!c) return;
    if (!c->user_paused) return;
    c->user_paused = 0;
    if (c->state != ST_OPEN) return;
    /* re-offer what is buffered, from a fresh loop callback */
    c->deliver_pending = 1;
    conn_kick(c);
    conn_update_reading(c);
}

void cf_conn_set_max_unconsumed(struct cf_conn *c, size_t max)
{
    c->max_unconsumed = max > 0 ? max : MAX_UNCONSUMED_DEFAULT;
    conn_update_reading(c);
}

int cf_conn_starttls(struct cf_conn *c, SSL_CTX *ssl_ctx)
{
    SSL *ssl;

    if (c->state != ST_OPEN || c->ssl != NULL || c->starttls_pending || ssl_ctx == NULL ||
        (c->is_client && !c->connected))
        return -1;
    ssl = SSL_new(ssl_ctx);
    if (ssl == NULL) return -1;
    c->pending_ssl = ssl;
    c->starttls_pending = 1;
    c->starttls_plain_bytes = c->out_pending;
    if (c->out_tail != NULL) c->out_tail->sealed = 1;
    in_discard(c);
    c->deliver_pending = 0;
    conn_update_reading(c);
    c->pump_pending = 1;
    conn_kick(c);
    return 0;
}

static void idle_timer_cb(uv_timer_t *t)
{
    struct cf_conn *c = t->data;

    if (c->state != ST_OPEN) return;
    if (c->ops->on_timeout != NULL) c->ops->on_timeout(c, c->data);
    /* a peer that stalled its handshake this long will not finish it now:
     * do not wait for it to deliver the BYE */
    cf_conn_close(c, c->tls != TLS_HANDSHAKE, "idle timeout");
}

void cf_conn_set_idle_timeout(struct cf_conn *c, uint64_t ms)
{
    if (c->state != ST_OPEN) return;
    c->idle_ms = ms;
    if (ms > 0)
        uv_timer_start(&c->timer, idle_timer_cb, ms, 0);
    else
        uv_timer_stop(&c->timer);
}

static void close_cap_cb(uv_timer_t *t)
{
    struct cf_conn *c = t->data;
    if (c->state == ST_FLUSHING) conn_finalize(c);
}

void cf_conn_close(struct cf_conn *c, int graceful, const char *reason)
{
    if (!c) return;
    if (c->state != ST_OPEN) return;
    conn_set_reason(c, "%s", reason ? reason : "closed");
    c->state = ST_FLUSHING;
    uv_timer_stop(&c->timer);
    conn_update_reading(c);
    in_discard(c);
    if (!graceful || !c->connected) {
        conn_finalize(c);
        return;
    }
    uv_timer_start(&c->timer, close_cap_cb, CLOSE_FLUSH_MS, 0);
    c->pump_pending = 1;
    conn_kick(c);
}

int cf_conn_is_closing(const struct cf_conn *c)
{
    if (!c) return 1;
    return c->state != ST_OPEN;
}

/* ---- accept / connect ---- */

static void sockaddr_to_text(const struct sockaddr_storage *ss, char *buf, size_t len, int *port_r)
{
    if (ss->ss_family == AF_INET) {
        const struct sockaddr_in *sin = (const struct sockaddr_in *)ss;
        uv_ip4_name(sin, buf, len);
        *port_r = ntohs(sin->sin_port);
    } else if (ss->ss_family == AF_INET6) {
        const struct sockaddr_in6 *sin6 = (const struct sockaddr_in6 *)ss;
        if (IN6_IS_ADDR_V4MAPPED(&sin6->sin6_addr)) {
            struct sockaddr_in sin;
            memset(&sin, 0, sizeof(sin));
            sin.sin_family = AF_INET;
            memcpy(&sin.sin_addr, &sin6->sin6_addr.s6_addr[12], 4);
            uv_ip4_name(&sin, buf, len);
        } else {
            uv_ip6_name(sin6, buf, len);
        }
        *port_r = ntohs(sin6->sin6_port);
    } else {
        snprintf(buf, len, "-");
        *port_r = -1;
    }
}

static void conn_record_peer(struct cf_conn *c)
{
    struct sockaddr_storage ss;
    int len = sizeof(ss);

    if (uv_tcp_getpeername(&c->tcp, (struct sockaddr *)&ss, &len) == 0)
        sockaddr_to_text(&ss, c->peer, sizeof(c->peer), &c->peer_port);
}

struct cf_conn *cf_conn_accept(uv_loop_t *loop, uv_stream_t *server, SSL_CTX *ssl_ctx,
                               const struct cf_conn_ops *ops, void *data)
{
    struct cf_conn *c = conn_new(loop, ops, data);

    if (c == NULL) {
        /* accept and drop so the listener does not stall */
        uv_tcp_t *tmp = malloc(sizeof(*tmp));
        if (tmp != NULL && uv_tcp_init(loop, tmp) == 0) {
            uv_accept(server, (uv_stream_t *)tmp);
            uv_close((uv_handle_t *)tmp, (uv_close_cb)free);
        } else {
            free(tmp);
        }
        return NULL;
    }
    if (uv_accept(server, (uv_stream_t *)&c->tcp) != 0) goto fail;
    uv_tcp_nodelay(&c->tcp, 1);
    conn_record_peer(c);
    c->connected = 1;
    if (ssl_ctx != NULL) {
        SSL *ssl = SSL_new(ssl_ctx);
        if (ssl == NULL) goto fail;
        if (conn_tls_attach(c, ssl) < 0) {
            SSL_free(ssl);
            goto fail;
        }
        SSL_set_accept_state(c->ssl);
    }
    conn_update_reading(c);
    if (!c->reading) goto fail;
    return c;
fail:
    c->silent = 1;
    conn_finalize(c);
    return NULL;
}

/* Client TLS: connect state, SNI and the name/IP to verify. */
static void conn_client_tls_setup(struct cf_conn *c)
{
    const char *vhost = c->cl->sni != NULL ? c->cl->sni : c->cl->name;
    unsigned char tmp[16];
    int is_ip = inet_pton(AF_INET, vhost, tmp) == 1 || inet_pton(AF_INET6, vhost, tmp) == 1;

    SSL_set_connect_state(c->ssl);
    if (c->cl->session != NULL && SSL_set_session(c->ssl, c->cl->session) != 1) ERR_clear_error();
    if (is_ip) {
        X509_VERIFY_PARAM_set1_ip_asc(SSL_get0_param(c->ssl), vhost);
    } else {
        SSL_set_tlsext_host_name(c->ssl, vhost);
        SSL_set1_host(c->ssl, vhost);
    }
}

int cf_conn_set_session(struct cf_conn *c, SSL_SESSION *sess)
{
    if (!c || c->cl == NULL || c->state != ST_OPEN) return -1;
    if (c->ssl != NULL && (c->tls != TLS_HANDSHAKE || !SSL_in_before(c->ssl))) return -1;
    if (sess != NULL && SSL_SESSION_up_ref(sess) != 1) return -1;
    SSL_SESSION_free(c->cl->session);
    c->cl->session = sess;
    if (c->ssl != NULL && sess != NULL && SSL_set_session(c->ssl, sess) != 1) {
        ERR_clear_error();
        return -1;
    }
    return 0;
}

SSL_SESSION *cf_conn_get_session(struct cf_conn *c)
{
    SSL_SESSION *sess;

    if (!c || c->cl == NULL || c->ssl == NULL || c->tls != TLS_UP) return NULL;
    sess = SSL_get1_session(c->ssl);
    if (sess != NULL && !SSL_SESSION_is_resumable(sess)) {
        SSL_SESSION_free(sess);
        return NULL;
    }
    return sess;
}

int cf_conn_session_reused(const struct cf_conn *c)
{
    if (!c || c->ssl == NULL || c->tls != TLS_UP) return 0;
    return SSL_session_reused(c->ssl) == 1;
}

static void connect_cb(uv_connect_t *req, int status)
{
    struct cf_conn *c = req->data;

    if (c->state != ST_OPEN) return;
    if (status < 0) {
        char r[160];
        snprintf(r, sizeof(r), "connect failed: %s", uv_strerror(status));
        cf_conn_close(c, 0, r);
        return;
    }
    c->connected = 1;
    uv_tcp_nodelay(&c->tcp, 1);
    conn_record_peer(c);
    if (c->cl->ctx != NULL) {
        SSL *ssl = SSL_new(c->cl->ctx);
        if (ssl == NULL || conn_tls_attach(c, ssl) < 0) {
            SSL_free(ssl);
            cf_conn_close(c, 0, "out of memory");
            return;
        }
        conn_client_tls_setup(c);
    }
    if (c->ops->on_connected != NULL) c->ops->on_connected(c, c->data);
    if (c->state != ST_OPEN) return;
    conn_update_reading(c);
    if (c->ssl != NULL) {
        if (conn_handshake(c) < 0) return;
    } else {
        c->pump_pending = 1;
        conn_kick(c);
    }
}

static void conn_start_connect(struct cf_conn *c, const struct sockaddr *sa)
{
    int rv;

    c->cl->req.data = c;
    rv = uv_tcp_connect(&c->cl->req, &c->tcp, sa, connect_cb);
    if (rv != 0) {
        char r[160];
        snprintf(r, sizeof(r), "connect failed: %s", uv_strerror(rv));
        cf_conn_close(c, 0, r);
    }
}

static void gai_cb(uv_getaddrinfo_t *req, int status, struct addrinfo *res)
{
    struct cf_conn *c = req->data;

    c->gai_pending = 0;
    if (c->state != ST_OPEN) {
        uv_freeaddrinfo(res);
        conn_maybe_free(c);
        return;
    }
    if (status < 0 || res == NULL) {
        char r[300];
        snprintf(r, sizeof(r), "connect failed: cannot resolve %s: %s", c->cl->name,
                 uv_strerror(status));
        uv_freeaddrinfo(res);
        cf_conn_close(c, 0, r);
        return;
    }
    if (res->ai_family == AF_INET)
        ((struct sockaddr_in *)res->ai_addr)->sin_port = htons((uint16_t)c->cl->port);
    else if (res->ai_family == AF_INET6)
        ((struct sockaddr_in6 *)res->ai_addr)->sin6_port = htons((uint16_t)c->cl->port);
    conn_start_connect(c, res->ai_addr);
    uv_freeaddrinfo(res);
}

int cf_parse_host_port(const char *s, char *host, size_t hostlen, int *port_r)
{
    const char *colon, *hs, *he, *p;
    long port = 0;

    if (s == NULL || *s == '\0') return -1;
    if (s[0] == '[') {
        he = strchr(s, ']');
        if (he == NULL || he[1] != ':') return -1;
        hs = s + 1;
        colon = he + 1;
    } else {
        colon = strrchr(s, ':');
        if (colon == NULL || memchr(s, ':', (size_t)(colon - s)) != NULL) return -1;
        hs = s;
        he = colon;
    }
    if (he == hs || (size_t)(he - hs) >= hostlen) return -1;
    p = colon + 1;
    if (*p == '\0') return -1;
    for (; *p != '\0'; p++) {
        if (*p < '0' || *p > '9') return -1;
        port = port * 10 + (*p - '0');
        if (port > 65535) return -1;
    }
    if (he - hs == 1 && hs[0] == '*') {
        snprintf(host, hostlen, "0.0.0.0");
    } else {
        memcpy(host, hs, (size_t)(he - hs));
        host[he - hs] = '\0';
    }
    *port_r = (int)port;
    return 0;
}

struct cf_conn *cf_conn_connect(uv_loop_t *loop, const char *host_port, SSL_CTX *client_ctx,
                                const char *sni, const struct cf_conn_ops *ops, void *data)
{
    struct cf_conn *c;
    union {
        struct sockaddr sa;
        struct sockaddr_in sin;
        struct sockaddr_in6 sin6;
    } addr;
    char portstr[8], host[256];
    struct addrinfo hints;
    struct conn_client *cl;
    size_t hl, sl;
    int port;

    if (cf_parse_host_port(host_port, host, sizeof(host), &port) < 0) return NULL;
    hl = strlen(host);
    sl = sni != NULL ? strnlen(sni, 255) : 0;
    cl = calloc(1, sizeof(*cl) + hl + 1 + (sni != NULL ? sl + 1 : 0));
    if (cl == NULL) return NULL;
    memcpy(cl->name, host, hl + 1);
    if (sni != NULL) {
        memcpy(cl->name + hl + 1, sni, sl);
        cl->name[hl + 1 + sl] = '\0';
        cl->sni = cl->name + hl + 1;
    }
    cl->port = port;
    cl->ctx = client_ctx;
    c = conn_new(loop, ops, data);
    if (c == NULL) {
        free(cl);
        return NULL;
    }
    c->is_client = 1;
    c->cl = cl;
    if (uv_ip4_addr(host, port, &addr.sin) == 0 || uv_ip6_addr(host, port, &addr.sin6) == 0) {
        conn_start_connect(c, &addr.sa);
        return c;
    }
    memset(&hints, 0, sizeof(hints));
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    snprintf(portstr, sizeof(portstr), "%d", port);
    cl->gai.data = c;
    if (uv_getaddrinfo(loop, &cl->gai, gai_cb, cl->name, portstr, &hints) != 0) {
        c->silent = 1;
        conn_finalize(c);
        return NULL;
    }
    c->gai_pending = 1;
    return c;
}

int cf_listen_tcp(uv_loop_t *loop, uv_tcp_t *server, const char *addr, int backlog,
                  uv_connection_cb cb, char *err, size_t errlen)
{
    char host[256];
    int port, rv;
    union {
        struct sockaddr sa;
        struct sockaddr_in sin;
        struct sockaddr_in6 sin6;
        struct sockaddr_storage ss;
    } sa;

    ignore_sigpipe();
    if (cf_parse_host_port(addr, host, sizeof(host), &port) < 0) {
        snprintf(err, errlen, "bad listen address \"%s\" (host:port, [v6]:port or *:port)",
                 addr ? addr : "");
        return UV_EINVAL;
    }
    memset(&sa, 0, sizeof(sa));
    if (uv_ip4_addr(host, port, &sa.sin) != 0 && uv_ip6_addr(host, port, &sa.sin6) != 0) {
        struct addrinfo hints, *res = NULL;
        memset(&hints, 0, sizeof(hints));
        hints.ai_family = AF_UNSPEC;
        hints.ai_socktype = SOCK_STREAM;
        hints.ai_flags = AI_PASSIVE;
        rv = getaddrinfo(host, NULL, &hints, &res);
        if (rv != 0 || res == NULL || res->ai_addrlen > sizeof(sa)) {
            snprintf(err, errlen, "listen address %s: cannot resolve %s: %s", addr, host,
                     rv ? gai_strerror(rv) : "no address");
            if (res) freeaddrinfo(res);
            return UV_EINVAL;
        }
        memcpy(&sa, res->ai_addr, res->ai_addrlen);
        freeaddrinfo(res);
        if (sa.sa.sa_family == AF_INET)
            sa.sin.sin_port = htons((uint16_t)port);
        else
            sa.sin6.sin6_port = htons((uint16_t)port);
    }
    rv = uv_tcp_init(loop, server);
    if (rv != 0) {
        snprintf(err, errlen, "listen %s: %s", addr, uv_strerror(rv));
        return rv;
    }
    rv = uv_tcp_bind(server, &sa.sa, 0);
    if (rv == 0) rv = uv_listen((uv_stream_t *)server, backlog > 0 ? backlog : 128, cb);
    if (rv != 0) {
        snprintf(err, errlen, "listen %s: %s", addr, uv_strerror(rv));
        uv_close((uv_handle_t *)server, NULL);
        return rv;
    }
    return 0;
}
