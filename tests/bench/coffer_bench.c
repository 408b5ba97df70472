/* coffer-bench: IMAP/POP3 load generator for Coffer and reference servers.
 *
 * One libuv loop, N clients, each a small state machine over cf_conn (plain
 * TCP, STARTTLS/STLS or implicit TLS; TCP_NODELAY on every socket). Server
 * responses are parsed by a bounded line reader: lines over BENCH_LINE_MAX
 * are truncated (only their tail is kept to spot a literal), literals over
 * BENCH_LITERAL_MAX close the connection as an error, nothing is trusted.
 *
 * Scenarios (--scenario):
 *   login      connect [TLS] greeting [STARTTLS] LOGIN|AUTHENTICATE LOGOUT, repeat
 *   handshake  TCP connect + full TLS handshake, close, repeat (implicit TLS)
 *   append     one session per client, APPEND --size bytes to --mailbox, repeat
 *   populate   APPEND until --mailbox holds --target messages (sizes random in
 *              [--size, --size-max], same sequence every time)
 *   fetch      EXAMINE --mailbox, FETCH --batch messages from a random
 *              position, BODY.PEEK[HEADER] (--fetch header) or BODY.PEEK[]
 *   mixed      per client mailbox bench-mix-<i>: APPEND, FETCH, STORE \Seen,
 *              SEARCH UNSEEN, STORE \Deleted + EXPUNGE when over 20 messages
 *   pop3-retr  USER/PASS, STAT, RETR a random message, repeat
 *   idle       hold --sessions logged-in sessions (optionally SELECT + IDLE),
 *              read the --tree processes' RSS/PSS before and after
 *   loopback   local TCP throughput and connect rate (machine limit)
 *
 * Run length: --duration seconds (operations completing in the window are
 * counted) or --ops N (exactly N operations, then stop).
 * Output: a human table and one JSON object on one line (starts with '{').
 */
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/ssl.h>
#include <uv.h>

#include "bench_proc.h"
#include "cf_conn.h"
#include "cf_log.h"

#define BENCH_LINE_MAX 16384
#define BENCH_LITERAL_MAX (1024ull * 1024 * 1024)
#define BENCH_MAX_TREES 8
#define BENCH_MIX_KEEP 20
#define HIST_SUB 64
#define HIST_BUCKETS (HIST_SUB + 40 * HIST_SUB)

/* ------------------------------------------------------------------ stats */

enum op {
    OP_SESSION,   /* login storm: connect .. LOGOUT done */
    OP_HANDSHAKE, /* TCP connect + TLS handshake */
    OP_CONNECT,   /* connection set-up failures are counted here */
    OP_LOGIN,
    OP_SELECT,
    OP_APPEND,
    OP_FETCH,
    OP_STORE,
    OP_SEARCH,
    OP_EXPUNGE,
    OP_IDLE,
    OP_LOGOUT,
    OP_STAT,
    OP_RETR,
    OP_COUNT
};

static const char *const op_names[OP_COUNT] = {
    "SESSION", "HANDSHAKE", "CONNECT", "LOGIN", "SELECT", "APPEND", "FETCH",
    "STORE",   "SEARCH",    "EXPUNGE", "IDLE",  "LOGOUT", "STAT",   "RETR",
};

struct op_stats {
    uint64_t count;
    uint64_t errors;
    uint64_t bytes;
    uint64_t max_us;
    uint64_t sum_us;
    uint64_t hist[HIST_BUCKETS];
};

static unsigned hist_index(uint64_t us)
{
    unsigned e;

    if (us < HIST_SUB) return (unsigned)us;
    e = 63u - (unsigned)__builtin_clzll(us); /* >= 6 */
    if (e > 45) return HIST_BUCKETS - 1;
    return HIST_SUB + (e - 6) * HIST_SUB + (unsigned)((us >> (e - 6)) & (HIST_SUB - 1));
}

static double hist_value(unsigned idx)
{
    unsigned e, sub;

    if (idx < HIST_SUB) return idx;
    e = (idx - HIST_SUB) / HIST_SUB + 6;
    sub = (idx - HIST_SUB) % HIST_SUB;
    /* middle of the bucket */
    return ldexp((double)(HIST_SUB + sub) + 0.5, (int)e - 6);
}

static double hist_quantile(const struct op_stats *s, double q)
{
    uint64_t want, seen = 0;
    unsigned i;

    if (s->count == 0) return 0;
    want = (uint64_t)ceil(q * (double)s->count);
    if (want == 0) want = 1;
    for (i = 0; i < HIST_BUCKETS; i++) {
        seen += s->hist[i];
        if (seen >= want) {
            double v = hist_value(i);
            return v > (double)s->max_us ? (double)s->max_us : v;
        }
    }
    return (double)s->max_us;
}

/* ------------------------------------------------------------------ config */

enum scenario {
    SC_LOGIN,
    SC_HANDSHAKE,
    SC_APPEND,
    SC_POPULATE,
    SC_FETCH,
    SC_MIXED,
    SC_RETR,
    SC_IDLE,
    SC_LOOPBACK
};
enum tls_mode { TLS_NONE, TLS_STARTTLS, TLS_IMPLICIT };

struct tree {
    char name[32];
    int pid;
    struct bp_sample before, after;
};

struct bench {
    enum scenario sc;
    const char *sc_name;
    const char *host;
    int port;
    enum tls_mode tls;
    const char *ca_file;
    const char *sni;
    int pop3;
    const char *user, *pass;
    int auth_plain;
    unsigned clients;
    double duration;
    uint64_t ops_target;
    uint64_t max_ops; /* --max-ops: at most this many within --duration (0: no cap) */
    size_t size, size_max;
    const char *mailbox;
    int fetch_body;
    unsigned batch;
    unsigned sessions;
    double settle;
    int idle_cmd;
    uint64_t target;
    const char *label, *system;
    double timeout;
    int quiet;
    struct tree trees[BENCH_MAX_TREES];
    unsigned ntrees;

    /* runtime */
    uv_loop_t *loop;
    SSL_CTX *ctx;
    uv_timer_t tick;
    struct client *cl;
    uint64_t t_start, t_end; /* measurement window, ns */
    int running;             /* window open: ops are issued */
    int counting;            /* results are recorded */
    unsigned ramp;           /* idle: sessions being set up at a time */
    int stopping;            /* window closed: wind down */
    int finished;
    uint64_t issued;
    uint64_t populate_need;
    unsigned ready;       /* clients done with setup */
    unsigned active;      /* clients with a connection */
    unsigned established; /* idle: sessions logged in */
    uint64_t setup_deadline;
    uint64_t settle_at;
    double self_cpu0, self_cpu1;
    struct op_stats st[OP_COUNT];
    char *body; /* shared message body lines */
    size_t body_cap;
    uint64_t msg_seq;
    char nonce[24]; /* per process: pid + start time, hex (Message-ID) */
    uint64_t conn_failures;
    char fatal[256];
};

static struct bench B;

static uint64_t now_ns(void)
{
    return uv_hrtime();
}

static void record(enum op op, uint64_t start_ns, int ok, uint64_t bytes)
{
    struct op_stats *s = &B.st[op];
    uint64_t us;

    if (!B.counting) return;
    if (!ok) {
        s->errors++;
        return;
    }
    us = (now_ns() - start_ns) / 1000;
    s->count++;
    s->bytes += bytes;
    s->sum_us += us;
    if (us > s->max_us) s->max_us = us;
    s->hist[hist_index(us)]++;
}

/* ------------------------------------------------------------------ client */

enum cstate {
    CS_IDLE_WAIT, /* not connected; waits for the tick to (re)connect */
    CS_CONNECTING,
    CS_GREETING,
    CS_STARTTLS,
    CS_TLS_WAIT,
    CS_AUTH,
    CS_AUTH_CONT, /* AUTHENTICATE PLAIN sent, waiting for "+" */
    CS_USER,      /* POP3 USER sent */
    CS_PASS,
    CS_SETUP, /* scenario set-up commands (CREATE, SELECT, STAT) */
    CS_READY, /* waiting for the window to open */
    CS_OP,    /* an operation is in flight */
    CS_APPEND_CONT,
    CS_IDLING,
    CS_LOGOUT,
    CS_CLOSING,
    CS_DONE,
};

struct client {
    unsigned idx;
    struct cf_conn *conn;
    enum cstate state;
    uint64_t rng;
    /* line reader */
    char line[BENCH_LINE_MAX + 1];
    size_t linelen;
    char tail[32];
    size_t taillen;
    int truncated;
    int continuation; /* the current line follows a literal */
    uint64_t lit_left;
    int pop3_multi; /* inside a POP3 multi-line reply */
    /* the command in flight */
    unsigned tagno;
    char tag[16];
    enum op op;
    int op_counted; /* counts towards --ops / the primary figure */
    uint64_t op_start;
    uint64_t sess_start;
    uint64_t cmd_deadline;
    uint64_t rx_bytes;
    int setup_step;
    int mix_step;
    uint64_t exists;
    size_t append_size;
    char append_hdr[512];
    size_t append_hdrlen, append_bodylen;
    uint64_t reconnect_at;
    int failed; /* current connection had an error (already counted) */
    int was_ready;
    int est;     /* idle: counted in B.established */
    int no_more; /* the --ops / --max-ops budget ran out: do not reconnect */
};

static uint64_t rnd(struct client *c)
{
    /* xorshift64* */
    uint64_t x = c->rng;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    c->rng = x;
    return x * 0x2545F4914F6CDD1Dull;
}

static void client_connect(struct client *c);
static void client_next(struct client *c);
static void client_fail(struct client *c, const char *why);
static void start_logout(struct client *c);

/* Take one op from the --ops (or --max-ops) budget. 0 when exhausted. */
static int take_op(void)
{
    uint64_t limit = B.ops_target ? B.ops_target : B.max_ops;

    if (B.stopping) return 0;
    if (limit == 0) return 1;
    if (B.issued >= limit) return 0;
    B.issued++;
    return 1;
}

static void send_cmd(struct client *c, enum op op, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static void send_cmd(struct client *c, enum op op, const char *fmt, ...)
{
    char buf[1024];
    int n, m;
    va_list ap;

    c->tagno++;
    snprintf(c->tag, sizeof(c->tag), "b%u", c->tagno);
    n = B.pop3 ? 0 : snprintf(buf, sizeof(buf), "%s ", c->tag);
    va_start(ap, fmt);
    m = vsnprintf(buf + n, sizeof(buf) - (size_t)n - 2, fmt, ap);
    va_end(ap);
    if (m < 0 || (size_t)m >= sizeof(buf) - (size_t)n - 2) m = (int)(sizeof(buf) - (size_t)n - 3);
    n += m;
    buf[n++] = '\r';
    buf[n++] = '\n';
    c->op = op;
    c->op_start = now_ns();
    c->cmd_deadline = c->op_start + (uint64_t)(B.timeout * 1e9);
    c->rx_bytes = 0;
    cf_conn_write(c->conn, buf, (size_t)n);
}

/* IMAP quoted string into out (bounded). */
static void quote(char *out, size_t outlen, const char *s)
{
    size_t o = 0;

    if (outlen < 3) return;
    out[o++] = '"';
    for (; *s != '\0' && o + 3 < outlen; s++) {
        if (*s == '"' || *s == '\\') out[o++] = '\\';
        out[o++] = *s;
    }
    out[o++] = '"';
    out[o] = '\0';
}

/* Message for the next APPEND: unique header, shared body lines. The
 * Message-ID carries the per-process nonce (fixed width, so sizes stay the
 * same on every server): without it two runs would append byte-identical
 * messages, which Coffer may take for a client's retry of the same APPEND. */
static void prepare_message(struct client *c, size_t size)
{
    uint64_t seq = ++B.msg_seq;
    size_t lines;

    c->append_hdrlen =
        (size_t)snprintf(c->append_hdr, sizeof(c->append_hdr),
                         "From: Bench <bench@coffer.test>\r\nTo: %s <%s@coffer.test>\r\n"
                         "Subject: bench message %010" PRIu64 "\r\nMessage-ID: <%" PRIu64
                         ".%u.%s@bench.coffer.test>\r\n"
                         "Date: Mon, 02 Feb 2026 10:00:00 +0000\r\nMIME-Version: 1.0\r\n"
                         "Content-Type: text/plain; charset=us-ascii\r\n\r\n",
                         B.user, B.user, seq, seq, c->idx, B.nonce);
    lines = size > c->append_hdrlen ? (size - c->append_hdrlen) / 78 : 0;
    if (lines == 0) lines = 1;
    c->append_bodylen = lines * 78;
    if (c->append_bodylen > B.body_cap) c->append_bodylen = B.body_cap;
    c->append_size = c->append_hdrlen + c->append_bodylen;
}

static void noop_release(void *arg)
{
    (void)arg;
}

static void send_append(struct client *c, const char *mailbox, size_t size)
{
    char q[600];

    prepare_message(c, size);
    quote(q, sizeof(q), mailbox);
    send_cmd(c, OP_APPEND, "APPEND %s {%zu}", q, c->append_size);
    c->state = CS_APPEND_CONT;
}

/* Size of the n-th populated message: same sequence on every server. */
static size_t pick_size(uint64_t n)
{
    uint64_t z = n + 0x9E3779B97F4A7C15ull;

    if (B.size_max <= B.size) return B.size;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    return B.size + (size_t)(z % (B.size_max - B.size + 1));
}

static void window_open(void);

/* Set-up done (logged in and scenario state ready). */
static void client_ready(struct client *c)
{
    c->state = CS_READY;
    if (B.sc == SC_IDLE) {
        if (B.idle_cmd) {
            send_cmd(c, OP_IDLE, "IDLE");
            c->state = CS_IDLING;
            return;
        }
        c->est = 1;
        B.established++;
        return;
    }
    if (!c->was_ready) {
        c->was_ready = 1;
        B.ready++;
    }
    if (B.stopping)
        start_logout(c);
    else if (B.running)
        client_next(c);
}

static void start_logout(struct client *c)
{
    if (B.pop3)
        send_cmd(c, OP_LOGOUT, "QUIT");
    else
        send_cmd(c, OP_LOGOUT, "LOGOUT");
    c->state = CS_LOGOUT;
}

/* Issue the client's next operation (window open). */
static void client_next(struct client *c)
{
    char q[600];

    if (c->conn == NULL || c->state != CS_READY) return;
    if (!B.running || B.stopping) {
        start_logout(c);
        return;
    }
    switch (B.sc) {
    case SC_APPEND:
        if (!take_op()) break;
        c->op_counted = 1;
        send_append(c, B.mailbox, B.size);
        return;
    case SC_POPULATE:
        if (B.issued >= B.populate_need) break;
        B.issued++;
        c->op_counted = 1;
        send_append(c, B.mailbox, pick_size(B.issued));
        return;
    case SC_FETCH: {
        uint64_t first, last;
        if (c->exists == 0) {
            snprintf(B.fatal, sizeof(B.fatal), "mailbox %s is empty", B.mailbox);
            break;
        }
        if (!take_op()) break;
        c->op_counted = 1;
        first = 1 + (c->exists > B.batch ? rnd(c) % (c->exists - B.batch + 1) : 0);
        last = first + B.batch - 1;
        if (last > c->exists) last = c->exists;
        send_cmd(c, OP_FETCH, "FETCH %" PRIu64 ":%" PRIu64 " (UID BODY.PEEK[%s])", first, last,
                 B.fetch_body ? "" : "HEADER");
        c->state = CS_OP;
        return;
    }
    case SC_RETR:
        if (c->exists == 0) {
            snprintf(B.fatal, sizeof(B.fatal), "POP3 maildrop is empty");
            break;
        }
        if (!take_op()) break;
        c->op_counted = 1;
        send_cmd(c, OP_RETR, "RETR %" PRIu64, 1 + rnd(c) % c->exists);
        c->pop3_multi = 0;
        c->state = CS_OP;
        return;
    case SC_MIXED:
        for (;;) {
            int step = c->mix_step;
            c->mix_step = (c->mix_step + 1) % 6;
            if (step == 0) {
                if (!take_op()) goto out;
                c->op_counted = 1;
                snprintf(q, sizeof(q), "bench-mix-%u", c->idx);
                send_append(c, q, B.size);
                return;
            }
            if (step == 1 && c->exists > 0) {
                if (!take_op()) goto out;
                c->op_counted = 1;
                send_cmd(c, OP_FETCH, "FETCH %" PRIu64 " (UID FLAGS BODY.PEEK[])",
                         1 + rnd(c) % c->exists);
                c->state = CS_OP;
                return;
            }
            if (step == 2 && c->exists > 0) {
                if (!take_op()) goto out;
                c->op_counted = 1;
                send_cmd(c, OP_STORE, "STORE %" PRIu64 " +FLAGS (\\Seen)", 1 + rnd(c) % c->exists);
                c->state = CS_OP;
                return;
            }
            if (step == 3) {
                if (!take_op()) goto out;
                c->op_counted = 1;
                send_cmd(c, OP_SEARCH, "SEARCH UNSEEN");
                c->state = CS_OP;
                return;
            }
            if (step == 4 && c->exists > BENCH_MIX_KEEP) {
                if (!take_op()) goto out;
                c->op_counted = 1;
                send_cmd(c, OP_STORE, "STORE 1:%" PRIu64 " +FLAGS.SILENT (\\Deleted)",
                         c->exists - BENCH_MIX_KEEP);
                c->state = CS_OP;
                return;
            }
            if (step == 5 && c->exists > BENCH_MIX_KEEP) {
                if (!take_op()) goto out;
                c->op_counted = 1;
                send_cmd(c, OP_EXPUNGE, "EXPUNGE");
                c->state = CS_OP;
                return;
            }
        }
    default:
        break;
    }
out:
    if (!B.stopping) c->no_more = 1;
    start_logout(c);
}

/* Set-up steps after login. */
static void client_setup(struct client *c)
{
    char q[600], name[64];

    c->state = CS_SETUP;
    switch (B.sc) {
    case SC_APPEND:
    case SC_POPULATE:
        if (c->setup_step == 0 && strcmp(B.mailbox, "INBOX") != 0) {
            c->setup_step = 1;
            quote(q, sizeof(q), B.mailbox);
            send_cmd(c, OP_SELECT, "CREATE %s", q);
            return;
        }
        if (B.sc == SC_POPULATE && c->setup_step <= 1) {
            c->setup_step = 2;
            quote(q, sizeof(q), B.mailbox);
            send_cmd(c, OP_SELECT, "EXAMINE %s", q);
            return;
        }
        break;
    case SC_FETCH:
        if (c->setup_step == 0) {
            c->setup_step = 1;
            quote(q, sizeof(q), B.mailbox);
            send_cmd(c, OP_SELECT, "EXAMINE %s", q);
            return;
        }
        break;
    case SC_MIXED:
        snprintf(name, sizeof(name), "bench-mix-%u", c->idx);
        if (c->setup_step == 0) {
            c->setup_step = 1;
            send_cmd(c, OP_SELECT, "CREATE %s", name);
            return;
        }
        if (c->setup_step == 1) {
            c->setup_step = 2;
            send_cmd(c, OP_SELECT, "SELECT %s", name);
            return;
        }
        break;
    case SC_RETR:
        if (c->setup_step == 0) {
            c->setup_step = 1;
            send_cmd(c, OP_STAT, "STAT");
            return;
        }
        break;
    case SC_IDLE:
        if (B.idle_cmd && c->setup_step == 0) {
            c->setup_step = 1;
            quote(q, sizeof(q), B.mailbox);
            send_cmd(c, OP_SELECT, "SELECT %s", q);
            return;
        }
        break;
    default:
        break;
    }
    client_ready(c);
}

static void send_auth(struct client *c)
{
    char qu[600], qp[600];

    if (B.pop3) {
        send_cmd(c, OP_LOGIN, "USER %s", B.user);
        c->state = CS_USER;
        return;
    }
    if (B.auth_plain) {
        send_cmd(c, OP_LOGIN, "AUTHENTICATE PLAIN");
        c->state = CS_AUTH_CONT;
        return;
    }
    quote(qu, sizeof(qu), B.user);
    quote(qp, sizeof(qp), B.pass);
    send_cmd(c, OP_LOGIN, "LOGIN %s %s", qu, qp);
    c->state = CS_AUTH;
}

static void send_plain_response(struct client *c)
{
    unsigned char raw[1200];
    unsigned char b64[1700];
    size_t ul = strlen(B.user), pl = strlen(B.pass), n = 0;
    int m;

    if (ul + pl + 2 > sizeof(raw)) ul = pl = 0;
    raw[n++] = '\0';
    memcpy(raw + n, B.user, ul);
    n += ul;
    raw[n++] = '\0';
    memcpy(raw + n, B.pass, pl);
    n += pl;
    m = EVP_EncodeBlock(b64, raw, (int)n);
    b64[m++] = '\r';
    b64[m++] = '\n';
    cf_conn_write(c->conn, b64, (size_t)m);
    c->state = CS_AUTH;
}

/* After greeting / TLS: STARTTLS or authenticate. */
static void after_greeting(struct client *c)
{
    if (B.tls == TLS_STARTTLS && !cf_conn_is_tls(c->conn)) {
        send_cmd(c, OP_CONNECT, B.pop3 ? "STLS" : "STARTTLS");
        c->state = CS_STARTTLS;
        return;
    }
    if (B.sc == SC_HANDSHAKE) {
        record(OP_HANDSHAKE, c->sess_start, 1, 0);
        c->state = CS_CLOSING;
        cf_conn_close(c->conn, 0, "done");
        return;
    }
    send_auth(c);
}

static void op_done(struct client *c, int ok)
{
    uint64_t bytes = c->op == OP_APPEND ? c->append_size : c->rx_bytes;

    record(c->op, c->op_start, ok, bytes);
    c->op_counted = 0;
}

/* A tagged reply (IMAP) or status line (POP3) for the command in flight. */
static void on_completion(struct client *c, int ok, const char *text)
{
    switch (c->state) {
    case CS_STARTTLS:
        if (!ok) {
            client_fail(c, "STARTTLS refused");
            return;
        }
        c->state = CS_TLS_WAIT;
        if (cf_conn_starttls(c->conn, B.ctx) < 0) client_fail(c, "starttls failed");
        return;
    case CS_AUTH:
    case CS_AUTH_CONT:
        record(OP_LOGIN, c->op_start, ok, 0);
        if (!ok) {
            if (!B.quiet) fprintf(stderr, "coffer-bench: login refused: %.200s\n", text);
            client_fail(c, "login refused");
            return;
        }
        c->setup_step = 0;
        if (B.sc == SC_LOGIN) {
            start_logout(c);
            return;
        }
        client_setup(c);
        return;
    case CS_USER:
        if (!ok) {
            record(OP_LOGIN, c->op_start, 0, 0);
            client_fail(c, "USER refused");
            return;
        }
        cf_conn_printf(c->conn, "PASS %s\r\n", B.pass);
        c->state = CS_PASS;
        return;
    case CS_PASS:
        c->state = CS_AUTH;
        on_completion(c, ok, text);
        return;
    case CS_SETUP:
        if (c->op == OP_STAT && ok) {
            /* +OK nn mm */
            c->exists = strtoull(text, NULL, 10);
        }
        if (B.sc == SC_POPULATE && c->setup_step == 2 && ok && B.populate_need == UINT64_MAX)
            B.populate_need = B.target > c->exists ? B.target - c->exists : 0;
        /* CREATE may fail because the mailbox exists: fine */
        if (!ok && c->op != OP_SELECT) {
            client_fail(c, "setup command failed");
            return;
        }
        if (!ok && c->setup_step >= 2) {
            client_fail(c, "SELECT failed");
            return;
        }
        if (!ok && B.sc == SC_FETCH) {
            snprintf(B.fatal, sizeof(B.fatal), "EXAMINE %s failed: %.120s", B.mailbox, text);
            client_fail(c, "EXAMINE failed");
            return;
        }
        if (!ok && B.sc == SC_IDLE) {
            client_fail(c, "SELECT failed");
            return;
        }
        client_setup(c);
        return;
    case CS_IDLING:
        /* IDLE ended (server side): treat as a failure of the session */
        client_fail(c, "IDLE ended");
        return;
    case CS_OP:
    case CS_APPEND_CONT:
        op_done(c, ok);
        c->state = CS_READY;
        if (!ok && !B.quiet && B.st[c->op].errors <= 3)
            fprintf(stderr, "coffer-bench: %s failed: %.200s\n", op_names[c->op], text);
        client_next(c);
        return;
    case CS_LOGOUT:
        record(OP_LOGOUT, c->op_start, ok, 0);
        if (B.sc == SC_LOGIN && ok) record(OP_SESSION, c->sess_start, 1, 0);
        c->state = CS_CLOSING;
        cf_conn_close(c->conn, 0, "logout");
        return;
    default:
        return;
    }
}

static uint64_t parse_u64(const char *s, const char **end)
{
    uint64_t v = 0;
    int digits = 0;

    while (*s >= '0' && *s <= '9' && digits < 19) {
        v = v * 10 + (uint64_t)(*s - '0');
        s++;
        digits++;
    }
    *end = s;
    return v;
}

/* One complete IMAP line (without CRLF; may be truncated). */
static void imap_line(struct client *c, char *line, size_t len)
{
    const char *end;
    uint64_t n;

    if (c->continuation) {
        c->continuation = 0;
        return; /* rest of a response after a literal */
    }
    if (len >= 2 && line[0] == '*' && line[1] == ' ') {
        const char *p = line + 2;
        if (c->state == CS_GREETING) {
            if (strncmp(p, "OK", 2) == 0 || strncmp(p, "PREAUTH", 7) == 0) {
                after_greeting(c);
            } else {
                client_fail(c, "bad greeting");
            }
            return;
        }
        n = parse_u64(p, &end);
        if (end != p && *end == ' ') {
            if (strncmp(end + 1, "EXISTS", 6) == 0) {
                c->exists = n;
            } else if (strncmp(end + 1, "EXPUNGE", 7) == 0 && c->exists > 0) {
                c->exists--;
            }
        } else if (strncmp(p, "BYE", 3) == 0 && c->state != CS_LOGOUT) {
            client_fail(c, "BYE from server");
        }
        return;
    }
    if (len >= 1 && line[0] == '+') {
        if (c->state == CS_APPEND_CONT) {
            cf_conn_write(c->conn, c->append_hdr, c->append_hdrlen);
            cf_conn_write_ref(c->conn, B.body, c->append_bodylen, noop_release, NULL);
            cf_conn_write(c->conn, "\r\n", 2);
            c->state = CS_OP;
        } else if (c->state == CS_AUTH_CONT) {
            send_plain_response(c);
        } else if (c->state == CS_IDLING && c->op == OP_IDLE) {
            record(OP_IDLE, c->op_start, 1, 0);
            c->op = OP_COUNT;
            c->est = 1;
            B.established++;
        }
        return;
    }
    if (len > strlen(c->tag) && strncmp(line, c->tag, strlen(c->tag)) == 0 &&
        line[strlen(c->tag)] == ' ') {
        const char *p = line + strlen(c->tag) + 1;
        on_completion(c, strncmp(p, "OK", 2) == 0, p);
    }
}

static void pop3_line(struct client *c, char *line, size_t len)
{
    if (c->pop3_multi) {
        if (len == 1 && line[0] == '.') {
            c->pop3_multi = 0;
            on_completion(c, 1, "");
        }
        return;
    }
    if (c->state == CS_GREETING) {
        if (len >= 3 && strncmp(line, "+OK", 3) == 0)
            after_greeting(c);
        else
            client_fail(c, "bad POP3 greeting");
        return;
    }
    if (len >= 3 && strncmp(line, "+OK", 3) == 0) {
        if (c->state == CS_OP && c->op == OP_RETR) {
            c->pop3_multi = 1;
            return;
        }
        on_completion(c, 1, len > 4 ? line + 4 : "");
        return;
    }
    if (len >= 4 && strncmp(line, "-ERR", 4) == 0) {
        on_completion(c, 0, line);
        return;
    }
    /* anything else: ignore */
}

/* Literal "{N}" at the end of a line (IMAP only). Returns 1 and N. */
static int line_literal(const char *s, size_t len, uint64_t *n)
{
    size_t i;
    uint64_t v = 0;

    if (len < 3 || s[len - 1] != '}') return 0;
    i = len - 1;
    while (i > 0 && s[i - 1] >= '0' && s[i - 1] <= '9')
        i--;
    if (i == 0 || s[i - 1] != '{' || i == len - 1 || len - 1 - i > 12) return 0;
    for (size_t k = i; k < len - 1; k++)
        v = v * 10 + (uint64_t)(s[k] - '0');
    *n = v;
    return 1;
}

static size_t on_read(struct cf_conn *conn, void *data, const char *buf, size_t len)
{
    struct client *c = data;
    size_t i = 0;

    (void)conn;
    while (i < len && c->conn != NULL && c->state != CS_CLOSING && c->state != CS_TLS_WAIT) {
        if (c->lit_left > 0) {
            size_t take = len - i;
            if (take > c->lit_left) take = (size_t)c->lit_left;
            c->lit_left -= take;
            c->rx_bytes += take;
            i += take;
            continue;
        }
        {
            const char *nl = memchr(buf + i, '\n', len - i);
            size_t chunk = nl != NULL ? (size_t)(nl - (buf + i)) : len - i;
            size_t room = BENCH_LINE_MAX - c->linelen;
            size_t copy = chunk < room ? chunk : room;
            memcpy(c->line + c->linelen, buf + i, copy);
            c->linelen += copy;
            if (copy < chunk) c->truncated = 1;
            /* keep the last bytes of the raw line for literal detection */
            if (chunk >= sizeof(c->tail)) {
                memcpy(c->tail, buf + i + chunk - sizeof(c->tail), sizeof(c->tail));
                c->taillen = sizeof(c->tail);
            } else {
                size_t keep = sizeof(c->tail) - chunk;
                if (keep > c->taillen) keep = c->taillen;
                memmove(c->tail, c->tail + c->taillen - keep, keep);
                memcpy(c->tail + keep, buf + i, chunk);
                c->taillen = keep + chunk;
            }
            c->rx_bytes += chunk + (nl != NULL);
            i += chunk;
            if (nl == NULL) break;
            i++; /* '\n' */
        }
        {
            size_t l = c->linelen;
            const char *t = c->tail;
            size_t tl = c->taillen;
            uint64_t lit;
            if (l > 0 && c->line[l - 1] == '\r') l--;
            if (tl > 0 && t[tl - 1] == '\r') tl--;
            c->line[l] = '\0';
            c->linelen = 0;
            c->taillen = 0;
            c->truncated = 0;
            if (!B.pop3 && line_literal(t, tl, &lit)) {
                if (lit > BENCH_LITERAL_MAX) {
                    client_fail(c, "literal too large");
                    break;
                }
                c->lit_left = lit;
                /* the line before the literal counts as this response's start */
                if (!c->continuation) {
                    c->continuation = 0;
                    imap_line(c, c->line, l);
                }
                c->continuation = 1;
                continue;
            }
            if (B.pop3)
                pop3_line(c, c->line, l);
            else
                imap_line(c, c->line, l);
        }
    }
    return len;
}

static void on_tls_ready(struct cf_conn *conn, void *data)
{
    struct client *c = data;

    (void)conn;
    if (c->state == CS_TLS_WAIT) {
        /* STARTTLS done: authenticate */
        if (B.sc == SC_HANDSHAKE) {
            record(OP_HANDSHAKE, c->sess_start, 1, 0);
            c->state = CS_CLOSING;
            cf_conn_close(c->conn, 0, "done");
            return;
        }
        send_auth(c);
        return;
    }
    if (B.sc == SC_HANDSHAKE) {
        record(OP_HANDSHAKE, c->sess_start, 1, 0);
        c->state = CS_CLOSING;
        cf_conn_close(c->conn, 0, "done");
        return;
    }
    record(OP_HANDSHAKE, c->sess_start, 1, 0);
    c->state = CS_GREETING;
}

static void on_connected(struct cf_conn *conn, void *data)
{
    struct client *c = data;

    (void)conn;
    if (B.tls != TLS_IMPLICIT) c->state = CS_GREETING;
}

static void on_close(struct cf_conn *conn, void *data, const char *reason)
{
    struct client *c = data;
    int failed = c->failed || c->state != CS_CLOSING;

    (void)conn;
    c->conn = NULL;
    B.active--;
    if (c->state != CS_CLOSING && !c->failed) {
        /* unexpected: count against what was going on */
        if (c->state == CS_OP || c->state == CS_APPEND_CONT)
            record(c->op, c->op_start, 0, 0);
        else if (c->state == CS_IDLING || (B.sc == SC_IDLE && c->state == CS_READY))
            record(OP_IDLE, c->op_start, 0, 0);
        else
            record(B.sc == SC_HANDSHAKE ? OP_HANDSHAKE : OP_CONNECT, c->sess_start, 0, 0);
        B.conn_failures++;
        if (!B.quiet && B.conn_failures <= 5)
            fprintf(stderr, "coffer-bench: client %u: connection lost (state %d): %s\n", c->idx,
                    (int)c->state, reason);
    }
    if (c->est) {
        c->est = 0;
        if (!B.stopping) B.established--;
    }
    c->failed = 0;
    c->op_counted = 0;
    c->state = c->no_more ? CS_DONE : CS_IDLE_WAIT;
    /* login/handshake storms reconnect at once; failed sessions after a pause */
    c->reconnect_at = failed ? now_ns() + 100000000ull : 0;
    if (!failed && (B.sc == SC_LOGIN || B.sc == SC_HANDSHAKE) && B.running && !B.stopping)
        client_connect(c);
}

static const struct cf_conn_ops client_ops = {
    .on_read = on_read,
    .on_close = on_close,
    .on_tls_ready = on_tls_ready,
    .on_connected = on_connected,
};

static void client_fail(struct client *c, const char *why)
{
    if (c->conn == NULL || c->state == CS_CLOSING) return;
    if (c->state == CS_OP || c->state == CS_APPEND_CONT)
        record(c->op, c->op_start, 0, 0);
    else if (c->state == CS_IDLING)
        record(OP_IDLE, c->op_start, 0, 0);
    else if (c->state == CS_AUTH || c->state == CS_AUTH_CONT || c->state == CS_USER ||
             c->state == CS_PASS)
        ; /* counted by the caller */
    else
        record(B.sc == SC_HANDSHAKE ? OP_HANDSHAKE : OP_CONNECT, c->sess_start, 0, 0);
    c->failed = 1;
    B.conn_failures++;
    if (!B.quiet && B.conn_failures <= 5)
        fprintf(stderr, "coffer-bench: client %u: %s\n", c->idx, why);
    c->state = CS_CLOSING;
    c->failed = 1;
    cf_conn_close(c->conn, 0, why);
}

static void client_connect(struct client *c)
{
    char hp[300];

    if (B.stopping) {
        c->state = CS_DONE;
        return;
    }
    if (B.sc == SC_LOGIN || B.sc == SC_HANDSHAKE) {
        if (!take_op()) {
            c->state = CS_DONE;
            return;
        }
        c->op_counted = 1;
    }
    snprintf(hp, sizeof(hp), "%s:%d", B.host, B.port);
    c->state = CS_CONNECTING;
    c->linelen = c->taillen = 0;
    c->lit_left = 0;
    c->continuation = 0;
    c->pop3_multi = 0;
    c->setup_step = 0;
    c->failed = 0;
    c->sess_start = now_ns();
    c->op_start = c->sess_start;
    c->cmd_deadline = c->sess_start + (uint64_t)(B.timeout * 1e9);
    c->tag[0] = '\0';
    c->conn =
        cf_conn_connect(B.loop, hp, B.tls == TLS_IMPLICIT ? B.ctx : NULL, B.sni, &client_ops, c);
    if (c->conn == NULL) {
        record(OP_CONNECT, c->sess_start, 0, 0);
        c->state = CS_IDLE_WAIT;
        c->reconnect_at = now_ns() + 100000000ull;
        return;
    }
    B.active++;
    if (B.tls == TLS_IMPLICIT) c->state = CS_CONNECTING;
}

/* ------------------------------------------------------------------ driver */

static void sample_trees(int after, int with_mem)
{
    for (unsigned i = 0; i < B.ntrees; i++)
        bp_sample_tree(B.trees[i].pid, with_mem, after ? &B.trees[i].after : &B.trees[i].before);
}

static void window_open(void)
{
    if (B.running) return;
    sample_trees(0, 0);
    B.self_cpu0 = bp_self_cpu();
    B.t_start = now_ns();
    B.running = 1;
    B.counting = 1;
    for (unsigned i = 0; i < B.clients; i++) {
        struct client *c = &B.cl[i];
        if (B.sc == SC_LOGIN || B.sc == SC_HANDSHAKE) {
            if (c->conn == NULL) client_connect(c);
        } else if (c->state == CS_READY) {
            client_next(c);
        }
    }
}

static void window_close(void)
{
    if (B.stopping) return;
    B.t_end = now_ns();
    B.self_cpu1 = bp_self_cpu();
    sample_trees(1, 0);
    B.running = 0;
    B.counting = 0;
    B.stopping = 1;
    /* sessions waiting between operations log out now; others after their op */
    for (unsigned i = 0; i < B.clients; i++) {
        struct client *c = &B.cl[i];
        if (c->conn != NULL && c->state == CS_READY) start_logout(c);
    }
}

static void stop_all(void)
{
    for (unsigned i = 0; i < B.clients; i++) {
        struct client *c = &B.cl[i];
        if (c->conn != NULL && c->state != CS_CLOSING) {
            c->state = CS_CLOSING;
            cf_conn_close(c->conn, 0, "stop");
        }
    }
}

static uint64_t idle_baseline_time;

static void tick_cb(uv_timer_t *t)
{
    uint64_t now = now_ns();
    unsigned i;

    (void)t;
    if (B.fatal[0] != '\0' && !B.stopping) {
        if (!B.running) {
            B.running = 1;
            B.t_start = now;
        }
        window_close();
    }
    /* command timeouts and reconnects */
    for (i = 0; i < B.clients; i++) {
        struct client *c = &B.cl[i];
        if (c->conn != NULL && c->state != CS_READY && c->state != CS_CLOSING &&
            !(c->state == CS_IDLING && c->op != OP_IDLE) && c->cmd_deadline != 0 &&
            now > c->cmd_deadline && !(B.sc == SC_IDLE && c->state == CS_READY)) {
            client_fail(c, "timeout");
        } else if (c->conn == NULL && c->state == CS_IDLE_WAIT && !B.stopping &&
                   now >= c->reconnect_at) {
            if (B.sc == SC_LOGIN || B.sc == SC_HANDSHAKE) {
                if (B.running) client_connect(c);
            } else if (B.sc == SC_IDLE) {
                /* at most --clients sessions being set up at a time */
                if (B.active - B.established < B.ramp) client_connect(c);
            } else {
                client_connect(c);
            }
        }
    }
    if (B.sc == SC_IDLE) {
        if (!B.running && !B.stopping) {
            if (B.established >= B.sessions) {
                if (B.settle_at == 0) B.settle_at = now + (uint64_t)(B.settle * 1e9);
                if (now >= B.settle_at) {
                    B.counting = 0;
                    B.t_start = idle_baseline_time;
                    B.t_end = now;
                    B.self_cpu1 = bp_self_cpu();
                    sample_trees(1, 1);
                    B.stopping = 1;
                    stop_all();
                }
            } else if (now > B.setup_deadline) {
                snprintf(B.fatal, sizeof(B.fatal), "only %u of %u sessions after %.0f s",
                         B.established, B.sessions, B.timeout);
                B.counting = 0;
                B.t_start = idle_baseline_time;
                B.t_end = now;
                B.self_cpu1 = bp_self_cpu();
                sample_trees(1, 1);
                B.stopping = 1;
                stop_all();
            }
        }
    } else if (!B.running && !B.stopping) {
        if (B.ready >= B.clients || (now > B.setup_deadline && B.ready > 0)) window_open();
        if (now > B.setup_deadline && B.ready == 0) {
            snprintf(B.fatal, sizeof(B.fatal), "no client finished set-up within %.0f s",
                     B.timeout);
            B.t_start = now;
            window_close();
        }
    } else if (B.running) {
        if (B.ops_target == 0 && B.sc != SC_POPULATE) {
            int inflight = 0;
            if (B.max_ops && B.issued >= B.max_ops)
                for (i = 0; i < B.clients; i++)
                    if (B.cl[i].op_counted) inflight = 1;
            if (now >= B.t_start + (uint64_t)(B.duration * 1e9) ||
                (B.max_ops && B.issued >= B.max_ops && !inflight))
                window_close();
        } else {
            int inflight = 0;
            for (i = 0; i < B.clients; i++)
                if (B.cl[i].op_counted) inflight = 1;
            if (B.sc == SC_POPULATE ? B.issued >= B.populate_need && !inflight
                                    : B.issued >= B.ops_target && !inflight)
                window_close();
        }
    }
    if (B.stopping) {
        int any = 0;
        for (i = 0; i < B.clients; i++)
            if (B.cl[i].conn != NULL) any = 1;
        if (!any || now > B.t_end + 15000000000ull) {
            stop_all();
            if (!any) {
                B.finished = 1;
                uv_timer_stop(&B.tick);
                uv_close((uv_handle_t *)&B.tick, NULL);
            }
        }
    }
}

/* ------------------------------------------------------------------ loopback */

struct lb_state {
    uv_tcp_t server;
    struct cf_conn *tx;
    uint64_t rx_bytes;
    uint64_t conns;
    int phase; /* 0 throughput, 1 connect rate */
    uint64_t t0, t_phase_end;
    double gbit;
    double conn_rate;
    unsigned inflight;
    int done;
    int port;
};
static struct lb_state LB;

static size_t lb_sink(struct cf_conn *c, void *d, const char *buf, size_t len)
{
    (void)c;
    (void)d;
    (void)buf;
    LB.rx_bytes += len;
    return len;
}

static void lb_srv_close(struct cf_conn *c, void *d, const char *r)
{
    (void)c;
    (void)d;
    (void)r;
}

static const struct cf_conn_ops lb_srv_ops = {.on_read = lb_sink, .on_close = lb_srv_close};

static void lb_accept(uv_stream_t *s, int status)
{
    if (status < 0) return;
    cf_conn_accept(B.loop, s, NULL, &lb_srv_ops, NULL);
}

static void lb_fill(struct cf_conn *c)
{
    while (cf_conn_out_pending(c) < CF_CONN_OUT_HIGH)
        cf_conn_write_ref(c, B.body, B.body_cap, noop_release, NULL);
}

static void lb_drain(struct cf_conn *c, void *d)
{
    (void)d;
    if (LB.phase == 0 && now_ns() < LB.t_phase_end) lb_fill(c);
}

static void lb_connected(struct cf_conn *c, void *d)
{
    (void)d;
    if (LB.phase == 0) {
        lb_fill(c);
    } else {
        LB.conns++;
        cf_conn_close(c, 0, "done");
    }
}

static void lb_start_conn(void);

static void lb_cli_close(struct cf_conn *c, void *d, const char *r)
{
    (void)d;
    (void)r;
    if (c == LB.tx) {
        LB.tx = NULL;
        return;
    }
    if (LB.phase == 1) {
        LB.inflight--;
        if (now_ns() < LB.t_phase_end) lb_start_conn();
    }
}

static const struct cf_conn_ops lb_cli_ops = {.on_read = lb_sink,
                                              .on_drain = lb_drain,
                                              .on_close = lb_cli_close,
                                              .on_connected = lb_connected};

static void lb_start_conn(void)
{
    char hp[64];

    snprintf(hp, sizeof(hp), "127.0.0.1:%d", LB.port);
    if (cf_conn_connect(B.loop, hp, NULL, NULL, &lb_cli_ops, NULL) != NULL) LB.inflight++;
}

static void lb_tick(uv_timer_t *t)
{
    uint64_t now = now_ns();

    if (LB.phase == 0 && now >= LB.t_phase_end) {
        LB.gbit = (double)LB.rx_bytes * 8 / ((double)(now - LB.t0) / 1e9) / 1e9;
        cf_conn_close(LB.tx, 0, "done");
        LB.phase = 1;
        LB.t0 = now;
        LB.t_phase_end = now + (uint64_t)(B.duration * 1e9);
        for (unsigned i = 0; i < B.clients; i++)
            lb_start_conn();
    } else if (LB.phase == 1 && now >= LB.t_phase_end && LB.inflight == 0) {
        LB.conn_rate = (double)LB.conns / ((double)(now - LB.t0) / 1e9);
        uv_timer_stop(t);
        uv_close((uv_handle_t *)t, NULL);
        uv_close((uv_handle_t *)&LB.server, NULL);
        LB.done = 1;
    }
}

static int run_loopback(void)
{
    char err[200];
    struct sockaddr_in sa;
    int len = sizeof(sa);
    char hp[64];
    uv_timer_t t;
    double cpu0 = bp_self_cpu(), cpu1;

    if (cf_listen_tcp(B.loop, &LB.server, "127.0.0.1:0", 4096, lb_accept, err, sizeof(err)) != 0) {
        fprintf(stderr, "coffer-bench: listen: %s\n", err);
        return 1;
    }
    uv_tcp_getsockname(&LB.server, (struct sockaddr *)&sa, &len);
    LB.port = ntohs(sa.sin_port);
    snprintf(hp, sizeof(hp), "127.0.0.1:%d", LB.port);
    LB.t0 = now_ns();
    LB.t_phase_end = LB.t0 + (uint64_t)(B.duration * 1e9);
    LB.tx = cf_conn_connect(B.loop, hp, NULL, NULL, &lb_cli_ops, NULL);
    uv_timer_init(B.loop, &t);
    uv_timer_start(&t, lb_tick, 50, 50);
    uv_run(B.loop, UV_RUN_DEFAULT);
    cpu1 = bp_self_cpu();
    if (!B.quiet) {
        printf("loopback (one thread for both ends): %.2f Gbit/s one stream; %.0f "
               "connect+accept+close/s (%u in flight); client CPU %.2f s\n",
               LB.gbit, LB.conn_rate, B.clients, cpu1 - cpu0);
    }
    printf("{\"scenario\":\"loopback\",\"label\":\"%s\",\"system\":\"%s\",\"gbit_s\":%.3f,"
           "\"connects_s\":%.1f,\"client_cpu_s\":%.3f,\"errors\":0}\n",
           B.label, B.system, LB.gbit, LB.conn_rate, cpu1 - cpu0);
    return 0;
}

/* ------------------------------------------------------------------ report */

static enum op primary_op(void)
{
    switch (B.sc) {
    case SC_LOGIN:
        return OP_SESSION;
    case SC_HANDSHAKE:
        return OP_HANDSHAKE;
    case SC_APPEND:
    case SC_POPULATE:
        return OP_APPEND;
    case SC_FETCH:
        return OP_FETCH;
    case SC_RETR:
        return OP_RETR;
    case SC_IDLE:
        return OP_IDLE;
    default:
        return OP_COUNT; /* mixed: all commands */
    }
}

static void json_str(const char *s)
{
    putchar('"');
    for (; s != NULL && *s != '\0'; s++) {
        unsigned char ch = (unsigned char)*s;
        if (ch == '"' || ch == '\\')
            printf("\\%c", ch);
        else if (ch < 0x20)
            printf("\\u%04x", ch);
        else
            putchar(ch);
    }
    putchar('"');
}

static int report(void)
{
    double secs = (double)(B.t_end - B.t_start) / 1e9;
    double client_cpu = B.self_cpu1 - B.self_cpu0;
    enum op prim = primary_op();
    uint64_t total = 0, errors = 0, tot_ops = 0;
    int k;
    const char *tls = B.tls == TLS_NONE ? "none" : B.tls == TLS_STARTTLS ? "starttls" : "implicit";

    if (secs <= 0) secs = 1e-9;
    for (k = 0; k < OP_COUNT; k++) {
        errors += B.st[k].errors;
        if (k != OP_CONNECT && k != OP_LOGIN && k != OP_LOGOUT && k != OP_SELECT &&
            k != OP_SESSION && k != OP_HANDSHAKE && k != OP_IDLE)
            tot_ops += B.st[k].count;
    }
    total = prim == OP_COUNT ? tot_ops : B.st[prim].count;
    if (B.sc == SC_IDLE) total = B.established;

    if (!B.quiet) {
        printf("\n== %s [%s] %s %s:%d tls=%s clients=%u %s%.1fs\n", B.sc_name, B.system, B.label,
               B.host, B.port, tls, B.sc == SC_IDLE ? B.sessions : B.clients,
               B.ops_target ? "ops-mode " : "", secs);
        printf("%-10s %10s %10s %10s %9s %9s %9s %9s %8s\n", "op", "count", "rate/s", "MB/s",
               "p50 ms", "p99 ms", "p99.9 ms", "max ms", "errors");
        for (k = 0; k < OP_COUNT; k++) {
            const struct op_stats *s = &B.st[k];
            if (s->count == 0 && s->errors == 0) continue;
            printf("%-10s %10" PRIu64 " %10.1f %10.2f %9.3f %9.3f %9.3f %9.3f %8" PRIu64 "\n",
                   op_names[k], s->count, (double)s->count / secs, (double)s->bytes / secs / 1e6,
                   hist_quantile(s, 0.5) / 1000, hist_quantile(s, 0.99) / 1000,
                   hist_quantile(s, 0.999) / 1000, (double)s->max_us / 1000, s->errors);
        }
        printf("client CPU %.2f s (%.0f%% of one core)\n", client_cpu, 100 * client_cpu / secs);
        for (unsigned i = 0; i < B.ntrees; i++) {
            struct tree *t = &B.trees[i];
            double cpu = t->after.cpu_s - t->before.cpu_s;
            if (B.sc == SC_IDLE) {
                double n = B.established ? (double)B.established : 1;
                printf("%s (pid %d): %u -> %u processes; RSS %.1f -> %.1f MiB, PSS %.1f -> "
                       "%.1f MiB; per session RSS %.1f KiB, PSS %.1f KiB\n",
                       t->name, t->pid, t->before.nprocs, t->after.nprocs,
                       t->before.rss_bytes / 1048576.0, t->after.rss_bytes / 1048576.0,
                       t->before.pss_bytes / 1048576.0, t->after.pss_bytes / 1048576.0,
                       ((double)t->after.rss_bytes - (double)t->before.rss_bytes) / n / 1024,
                       ((double)t->after.pss_bytes - (double)t->before.pss_bytes) / n / 1024);
            } else {
                printf("%s (pid %d) CPU %.2f s = %.3f ms per op\n", t->name, t->pid, cpu,
                       total ? cpu * 1000 / (double)total : 0);
            }
        }
        if (B.fatal[0] != '\0') printf("FAILED: %s\n", B.fatal);
    }

    printf("{\"scenario\":");
    json_str(B.sc_name);
    printf(",\"label\":");
    json_str(B.label);
    printf(",\"system\":");
    json_str(B.system);
    printf(",\"tls\":\"%s\",\"clients\":%u,\"duration_s\":%.3f,\"size\":%zu,\"total_ops\":%" PRIu64
           ",\"rate\":%.2f,\"errors\":%" PRIu64,
           tls, B.clients, secs, B.size, total, (double)total / secs, errors);
    if (prim != OP_COUNT && B.st[prim].count > 0) {
        printf(",\"p50_ms\":%.4f,\"p99_ms\":%.4f,\"p999_ms\":%.4f",
               hist_quantile(&B.st[prim], 0.5) / 1000, hist_quantile(&B.st[prim], 0.99) / 1000,
               hist_quantile(&B.st[prim], 0.999) / 1000);
    }
    printf(",\"client_cpu_s\":%.3f,\"ops\":{", client_cpu);
    {
        int first = 1;
        for (k = 0; k < OP_COUNT; k++) {
            const struct op_stats *s = &B.st[k];
            if (s->count == 0 && s->errors == 0) continue;
            printf("%s\"%s\":{\"count\":%" PRIu64 ",\"errors\":%" PRIu64 ",\"rate\":%.2f,"
                   "\"bytes\":%" PRIu64 ",\"mean_ms\":%.4f,\"p50_ms\":%.4f,\"p99_ms\":%.4f,"
                   "\"p999_ms\":%.4f,\"max_ms\":%.4f}",
                   first ? "" : ",", op_names[k], s->count, s->errors, (double)s->count / secs,
                   s->bytes, s->count ? (double)s->sum_us / (double)s->count / 1000 : 0.0,
                   hist_quantile(s, 0.5) / 1000, hist_quantile(s, 0.99) / 1000,
                   hist_quantile(s, 0.999) / 1000, (double)s->max_us / 1000);
            first = 0;
        }
    }
    printf("},\"trees\":{");
    for (unsigned i = 0; i < B.ntrees; i++) {
        struct tree *t = &B.trees[i];
        double cpu = t->after.cpu_s - t->before.cpu_s;
        printf("%s", i ? "," : "");
        json_str(t->name);
        printf(":{\"pid\":%d,\"cpu_s\":%.4f,\"cpu_ms_per_op\":%.5f,\"procs_before\":%u,"
               "\"procs_after\":%u",
               t->pid, cpu, total ? cpu * 1000 / (double)total : 0, t->before.nprocs,
               t->after.nprocs);
        if (B.sc == SC_IDLE) {
            double n = B.established ? (double)B.established : 1;
            printf(",\"rss_before\":%" PRIu64 ",\"rss_after\":%" PRIu64 ",\"pss_before\":%" PRIu64
                   ",\"pss_after\":%" PRIu64 ",\"rss_per_session\":%.0f,\"pss_per_session\":%.0f",
                   t->before.rss_bytes, t->after.rss_bytes, t->before.pss_bytes, t->after.pss_bytes,
                   ((double)t->after.rss_bytes - (double)t->before.rss_bytes) / n,
                   ((double)t->after.pss_bytes - (double)t->before.pss_bytes) / n);
        }
        printf("}");
    }
    printf("}");
    if (B.sc == SC_IDLE) printf(",\"sessions\":%u,\"established\":%u", B.sessions, B.established);
    if (B.fatal[0] != '\0') {
        printf(",\"fatal\":");
        json_str(B.fatal);
    }
    printf("}\n");
    fflush(stdout);
    return B.fatal[0] != '\0' ? 1 : 0;
}

/* ------------------------------------------------------------------ main */

static void usage(FILE *f)
{
    fprintf(f, "Usage: coffer-bench --scenario NAME [options]\n"
               "Scenarios: login handshake append populate fetch mixed pop3-retr idle loopback\n"
               "  --host H --port P          server (default 127.0.0.1)\n"
               "  --tls none|starttls|implicit   (default none)\n"
               "  --ca FILE --sni NAME       verify the server (without --ca: not verified)\n"
               "  --user U --pass P          credentials\n"
               "  --auth login|plain         IMAP LOGIN or AUTHENTICATE PLAIN (default login)\n"
               "  --clients N                concurrent clients (default 1)\n"
               "  --duration S               measurement window (default 5)\n"
               "  --ops N                    exactly N operations instead of a duration\n"
               "  --max-ops N                at most N operations within --duration\n"
               "  --size B [--size-max B]    APPEND size (random in [size,size-max])\n"
               "  --mailbox NAME             (default INBOX)\n"
               "  --fetch header|body --batch N   FETCH scenario\n"
               "  --target N                 populate: messages wanted in --mailbox\n"
               "  --sessions N --settle S --idle-cmd   idle scenario\n"
               "  --tree NAME=PID            server process tree to measure (repeatable)\n"
               "  --label TEXT --system NAME labels for the JSON line\n"
               "  --timeout S                per command / set-up timeout (default 60)\n"
               "  --quiet                    JSON line only\n");
}

static int parse_size(const char *s, size_t *out)
{
    char *end;
    double v = strtod(s, &end);

    if (end == s || v < 0) return -1;
    if (*end == 'k' || *end == 'K')
        v *= 1024, end++;
    else if (*end == 'm' || *end == 'M')
        v *= 1048576, end++;
    if (*end != '\0' && strcmp(end, "iB") != 0 && strcmp(end, "B") != 0) return -1;
    *out = (size_t)v;
    return 0;
}

static const struct {
    const char *name;
    enum scenario sc;
} scenarios[] = {
    {"login", SC_LOGIN},       {"handshake", SC_HANDSHAKE}, {"append", SC_APPEND},
    {"populate", SC_POPULATE}, {"fetch", SC_FETCH},         {"mixed", SC_MIXED},
    {"pop3-retr", SC_RETR},    {"idle", SC_IDLE},           {"loopback", SC_LOOPBACK},
};

int main(int argc, char **argv)
{
    static const struct option opts[] = {
        {"scenario", 1, 0, 's'},
        {"host", 1, 0, 'H'},
        {"port", 1, 0, 'p'},
        {"tls", 1, 0, 'T'},
        {"ca", 1, 0, 'C'},
        {"sni", 1, 0, 'N'},
        {"user", 1, 0, 'u'},
        {"pass", 1, 0, 'P'},
        {"auth", 1, 0, 'A'},
        {"clients", 1, 0, 'c'},
        {"duration", 1, 0, 'd'},
        {"ops", 1, 0, 'o'},
        {"max-ops", 1, 0, 'M'},
        {"size", 1, 0, 'z'},
        {"size-max", 1, 0, 'Z'},
        {"mailbox", 1, 0, 'm'},
        {"fetch", 1, 0, 'f'},
        {"batch", 1, 0, 'b'},
        {"target", 1, 0, 't'},
        {"sessions", 1, 0, 'n'},
        {"settle", 1, 0, 'S'},
        {"idle-cmd", 0, 0, 'I'},
        {"tree", 1, 0, 'r'},
        {"label", 1, 0, 'l'},
        {"system", 1, 0, 'y'},
        {"timeout", 1, 0, 'x'},
        {"quiet", 0, 0, 'q'},
        {"help", 0, 0, 'h'},
        {0, 0, 0, 0},
    };
    int ch, rc;
    struct rlimit rl;

    B.host = "127.0.0.1";
    B.user = "bench";
    B.pass = "";
    B.clients = 1;
    B.duration = 5;
    B.size = 4096;
    B.mailbox = "INBOX";
    B.batch = 1;
    B.sessions = 100;
    B.settle = 2;
    B.label = "";
    B.system = "";
    B.timeout = 60;
    B.sc_name = NULL;
    while ((ch = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        switch (ch) {
        case 's':
            for (size_t i = 0; i < sizeof(scenarios) / sizeof(scenarios[0]); i++)
                if (strcmp(optarg, scenarios[i].name) == 0) {
                    B.sc = scenarios[i].sc;
                    B.sc_name = scenarios[i].name;
                }
            if (B.sc_name == NULL) {
                fprintf(stderr, "coffer-bench: unknown scenario %s\n", optarg);
                return 2;
            }
            break;
        case 'H':
            B.host = optarg;
            break;
        case 'p':
            B.port = atoi(optarg);
            break;
        case 'T':
            if (strcmp(optarg, "none") == 0)
                B.tls = TLS_NONE;
            else if (strcmp(optarg, "starttls") == 0)
                B.tls = TLS_STARTTLS;
            else if (strcmp(optarg, "implicit") == 0)
                B.tls = TLS_IMPLICIT;
            else {
                fprintf(stderr, "coffer-bench: --tls none|starttls|implicit\n");
                return 2;
            }
            break;
        case 'C':
            B.ca_file = optarg;
            break;
        case 'N':
            B.sni = optarg;
            break;
        case 'u':
            B.user = optarg;
            break;
        case 'P':
            B.pass = optarg;
            break;
        case 'A':
            B.auth_plain = strcmp(optarg, "plain") == 0;
            break;
        case 'c':
            B.clients = (unsigned)strtoul(optarg, NULL, 10);
            break;
        case 'd':
            B.duration = strtod(optarg, NULL);
            break;
        case 'o':
            B.ops_target = strtoull(optarg, NULL, 10);
            break;
        case 'M':
            B.max_ops = strtoull(optarg, NULL, 10);
            break;
        case 'z':
            if (parse_size(optarg, &B.size) < 0) return 2;
            break;
        case 'Z':
            if (parse_size(optarg, &B.size_max) < 0) return 2;
            break;
        case 'm':
            B.mailbox = optarg;
            break;
        case 'f':
            B.fetch_body = strcmp(optarg, "body") == 0;
            break;
        case 'b':
            B.batch = (unsigned)strtoul(optarg, NULL, 10);
            break;
        case 't':
            B.target = strtoull(optarg, NULL, 10);
            break;
        case 'n':
            B.sessions = (unsigned)strtoul(optarg, NULL, 10);
            break;
        case 'S':
            B.settle = strtod(optarg, NULL);
            break;
        case 'I':
            B.idle_cmd = 1;
            break;
        case 'r': {
            const char *eq = strchr(optarg, '=');
            struct tree *t;
            if (eq == NULL || B.ntrees >= BENCH_MAX_TREES) {
                fprintf(stderr, "coffer-bench: --tree NAME=PID (at most %d)\n", BENCH_MAX_TREES);
                return 2;
            }
            t = &B.trees[B.ntrees++];
            snprintf(t->name, sizeof(t->name), "%.*s", (int)(eq - optarg), optarg);
            t->pid = atoi(eq + 1);
            break;
        }
        case 'l':
            B.label = optarg;
            break;
        case 'y':
            B.system = optarg;
            break;
        case 'x':
            B.timeout = strtod(optarg, NULL);
            break;
        case 'q':
            B.quiet = 1;
            break;
        case 'h':
            usage(stdout);
            return 0;
        default:
            usage(stderr);
            return 2;
        }
    }
    if (B.sc_name == NULL || (B.port <= 0 && B.sc != SC_LOOPBACK) || B.clients == 0 ||
        B.clients > 200000 || B.batch == 0 || B.duration <= 0 || B.timeout <= 0) {
        usage(stderr);
        return 2;
    }
    B.pop3 = B.sc == SC_RETR;
    if (B.sc == SC_HANDSHAKE && B.tls == TLS_NONE) {
        fprintf(stderr, "coffer-bench: handshake needs --tls implicit or starttls\n");
        return 2;
    }
    if (B.size > 1024ull * 1024 * 1024 || B.size_max > 1024ull * 1024 * 1024) {
        fprintf(stderr, "coffer-bench: --size at most 1 GiB\n");
        return 2;
    }
    cf_log_init("coffer-bench", CF_LOG_ERR, 0);
    {
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        snprintf(B.nonce, sizeof(B.nonce), "%08x%013" PRIx64, (unsigned)getpid() & 0xffffffffu,
                 ((uint64_t)ts.tv_sec * 1000000u + (uint64_t)ts.tv_nsec / 1000u) &
                     (uint64_t)0xfffffffffffffull);
    }
    /* many sockets: raise the descriptor limit to the hard limit */
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
    B.loop = uv_default_loop();
    /* shared body: 78-byte lines (76 characters + CRLF) */
    {
        size_t want = B.size_max > B.size ? B.size_max : B.size;
        if (B.sc == SC_LOOPBACK) want = 256 * 1024;
        want = (want / 78 + 1) * 78;
        B.body = malloc(want);
        if (B.body == NULL) return 1;
        for (size_t i = 0; i < want; i += 78) {
            for (size_t j = 0; j < 76; j++)
                B.body[i + j] = (char)('a' + (i / 78 + j) % 26);
            B.body[i + 76] = '\r';
            B.body[i + 77] = '\n';
        }
        B.body_cap = want;
    }
    if (B.sc == SC_LOOPBACK) return run_loopback();

    if (B.tls != TLS_NONE) {
        B.ctx = SSL_CTX_new(TLS_client_method());
        if (B.ctx == NULL) return 1;
        SSL_CTX_set_session_cache_mode(B.ctx, SSL_SESS_CACHE_OFF); /* full handshakes */
        SSL_CTX_set_options(B.ctx, SSL_OP_NO_TICKET);
        if (B.ca_file != NULL) {
            if (SSL_CTX_load_verify_locations(B.ctx, B.ca_file, NULL) != 1) {
                fprintf(stderr, "coffer-bench: cannot load CA %s\n", B.ca_file);
                return 1;
            }
            SSL_CTX_set_verify(B.ctx, SSL_VERIFY_PEER, NULL);
        } else {
            SSL_CTX_set_verify(B.ctx, SSL_VERIFY_NONE, NULL);
        }
    }
    if (B.sc == SC_IDLE) {
        B.ramp = B.clients;
        B.clients = B.sessions > 0 ? B.sessions : 1;
    }
    B.cl = calloc(B.clients, sizeof(*B.cl));
    if (B.cl == NULL) return 1;
    for (unsigned i = 0; i < B.clients; i++) {
        B.cl[i].idx = i;
        B.cl[i].rng = 0x9E3779B97F4A7C15ull * (i + 1) ^ 0xC0FFEEull;
        B.cl[i].state = CS_IDLE_WAIT;
    }
    if (B.sc == SC_POPULATE) {
        /* first learn how many messages exist: one client, then the rest */
        B.populate_need = UINT64_MAX;
    }
    B.setup_deadline = now_ns() + (uint64_t)(B.timeout * 1e9);
    uv_timer_init(B.loop, &B.tick);
    uv_timer_start(&B.tick, tick_cb, 20, 20);
    if (B.sc == SC_IDLE) {
        idle_baseline_time = now_ns();
        sample_trees(0, 1);
        B.self_cpu0 = bp_self_cpu();
        B.counting = 1;
        /* the tick connects, at most `ramp` at a time */
    } else if (B.sc == SC_LOGIN || B.sc == SC_HANDSHAKE) {
        window_open();
    } else {
        for (unsigned i = 0; i < B.clients; i++)
            client_connect(&B.cl[i]);
    }
    uv_run(B.loop, UV_RUN_DEFAULT);
    rc = report();
    return rc;
}
