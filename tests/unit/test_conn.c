/* Unit tests for cf_conn + cf_tls: real loopback connections on a libuv loop
 * inside the test process. Every wait is bounded by a timer. */
#include <CUnit/Basic.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>

#include "cf_conn.h"
#include "cf_log.h"
#include "cf_tls.h"

#define WAIT_MS 10000
#define BIG (1024u * 1024)

static uv_loop_t loop;
static char tmpdir[64], cert_path[128], key_path[128];
static SSL_CTX *server_ctx, *client_ctx;

/* ---- loop helpers ---- */

static int wait_timed_out;

static void guard_cb(uv_timer_t *t)
{
    (void)t;
    wait_timed_out = 1;
}

/* Run the loop until *flag becomes non-zero; 0 on success, -1 on timeout. */
static int run_until(const int *flag, uint64_t ms)
{
    uv_timer_t guard;

    wait_timed_out = 0;
    uv_timer_init(&loop, &guard);
    uv_timer_start(&guard, guard_cb, ms, 0);
    while (!*flag && !wait_timed_out)
        uv_run(&loop, UV_RUN_ONCE);
    uv_close((uv_handle_t *)&guard, NULL);
    uv_run(&loop, UV_RUN_NOWAIT);
    return *flag ? 0 : -1;
}

/* Let pending callbacks run for ms. */
static void run_for(uint64_t ms)
{
    int never = 0;
    run_until(&never, ms);
}

static void fill_pattern(char *buf, size_t len, size_t start)
{
    for (size_t i = 0; i < len; i++)
        buf[i] = (char)((start + i) * 7 + ((start + i) >> 9));
}

static int check_pattern(const char *buf, size_t len, size_t start)
{
    for (size_t i = 0; i < len; i++) {
        if (buf[i] != (char)((start + i) * 7 + ((start + i) >> 9))) return -1;
    }
    return 0;
}

/* ---- byte accumulator ---- */

struct bytes {
    char *p;
    size_t len, cap;
};

static void bytes_add(struct bytes *b, const char *d, size_t n)
{
    if (b->len + n + 1 > b->cap) {
        size_t ncap = b->cap ? b->cap : 256;
        while (ncap < b->len + n + 1)
            ncap *= 2;
        b->p = realloc(b->p, ncap);
        b->cap = ncap;
    }
    memcpy(b->p + b->len, d, n);
    b->len += n;
    b->p[b->len] = '\0';
}

static void bytes_free(struct bytes *b)
{
    free(b->p);
    memset(b, 0, sizeof(*b));
}

/* ---- server side ---- */

enum srv_mode { M_ECHO, M_STARTTLS, M_FLOOD, M_IDLE, M_CLOSE_TWICE, M_LINES, M_REFUSE };

struct srv {
    enum srv_mode mode;
    SSL_CTX *ctx; /* implicit TLS when set */
    struct cf_conn *conn;
    int closed, timeouts, tls_ready, drains, accepted, peer_cert_seen;
    char reason[256];
    struct bytes pre_tls, post_tls; /* STARTTLS mode: input seen before/after */
    /* flood */
    size_t flood_total, flood_written, max_pending;
    int saw_high;
    /* lines */
    int nlines;
    char lines[8][16];
    uv_timer_t resume_timer;
    int resume_timer_init;
    /* close twice */
    int write_after_close_rv, release_calls;
    /* buffer bytes the conn held after its last read (idle) */
    size_t buffered_after_read;
    int reads;
};

static struct srv srv;
static uv_tcp_t listener;
static int listen_port;

static void flood_more(struct cf_conn *c)
{
    char buf[65536];
    while (srv.flood_written < srv.flood_total && cf_conn_out_pending(c) <= CF_CONN_OUT_HIGH) {
        size_t n = srv.flood_total - srv.flood_written;
        if (n > sizeof(buf)) n = sizeof(buf);
        fill_pattern(buf, n, srv.flood_written);
        CU_ASSERT_EQUAL(cf_conn_write(c, buf, n), 0);
        srv.flood_written += n;
        if (cf_conn_out_pending(c) > srv.max_pending) srv.max_pending = cf_conn_out_pending(c);
    }
    if (cf_conn_out_pending(c) > CF_CONN_OUT_HIGH) srv.saw_high++;
}

static void resume_cb(uv_timer_t *t)
{
    (void)t;
    if (srv.conn != NULL) cf_conn_resume_read(srv.conn);
}

static size_t srv_on_read(struct cf_conn *c, void *data, const char *buf, size_t len)
{
    const char *nl;
    (void)data;

    srv.reads++;
    switch (srv.mode) {
    case M_ECHO:
        CU_ASSERT_EQUAL(cf_conn_write(c, buf, len), 0);
        if (cf_conn_out_pending(c) > CF_CONN_OUT_HIGH) cf_conn_pause_read(c);
        return len;
    case M_STARTTLS:
        if (!cf_conn_is_tls(c)) {
            bytes_add(&srv.pre_tls, buf, len);
            nl = memchr(buf, '\n', len);
            if (nl == NULL) return 0;
            if ((size_t)(nl - buf + 1) == 10 && memcmp(buf, "STARTTLS\r\n", 10) == 0) {
                cf_conn_write(c, "OK begin\r\n", 10);
                CU_ASSERT_EQUAL(cf_conn_starttls(c, server_ctx), 0);
                /* a second call is refused */
                CU_ASSERT_EQUAL(cf_conn_starttls(c, server_ctx), -1);
            }
            return (size_t)(nl - buf + 1);
        }
        bytes_add(&srv.post_tls, buf, len);
        cf_conn_write(c, buf, len);
        return len;
    case M_LINES:
        nl = memchr(buf, '\n', len);
        if (nl == NULL) return 0;
        if (srv.nlines < 8) {
            size_t l = (size_t)(nl - buf + 1);
            snprintf(srv.lines[srv.nlines], sizeof(srv.lines[0]), "%.*s", (int)l, buf);
        }
        srv.nlines++;
        /* one command at a time: pause, "run" it, resume later */
        cf_conn_pause_read(c);
        uv_timer_start(&srv.resume_timer, resume_cb, 20, 0);
        return (size_t)(nl - buf + 1);
    default:
        return len;
    }
}

static void srv_on_drain(struct cf_conn *c, void *data)
{
    (void)data;
    srv.drains++;
    if (srv.mode == M_ECHO) cf_conn_resume_read(c);
    if (srv.mode == M_FLOOD) flood_more(c);
}

static void srv_on_tls_ready(struct cf_conn *c, void *data)
{
    (void)data;
    CU_ASSERT(cf_conn_is_tls(c));
    srv.tls_ready++;
    srv.peer_cert_seen = cf_conn_peer_cert(c) != NULL;
}

static void srv_on_timeout(struct cf_conn *c, void *data)
{
    (void)data;
    srv.timeouts++;
    CU_ASSERT_EQUAL(cf_conn_write(c, "* BYE idle\r\n", 12), 0);
}

static void srv_on_close(struct cf_conn *c, void *data, const char *reason)
{
    (void)data;
    CU_ASSERT_PTR_EQUAL(c, srv.conn);
    srv.closed++;
    snprintf(srv.reason, sizeof(srv.reason), "%s", reason);
    srv.conn = NULL;
}

static const struct cf_conn_ops srv_ops = {
    .on_read = srv_on_read,
    .on_drain = srv_on_drain,
    .on_tls_ready = srv_on_tls_ready,
    .on_timeout = srv_on_timeout,
    .on_close = srv_on_close,
};

static void release_cb(void *arg)
{
    (*(int *)arg)++;
}

static void on_connection(uv_stream_t *server, int status)
{
    struct cf_conn *c;

    CU_ASSERT_EQUAL_FATAL(status, 0);
    c = cf_conn_accept(&loop, server, srv.ctx, &srv_ops, NULL);
    CU_ASSERT_PTR_NOT_NULL_FATAL(c);
    srv.conn = c;
    srv.accepted++;
    CU_ASSERT_STRING_EQUAL(cf_conn_peer(c), "127.0.0.1");
    CU_ASSERT(cf_conn_peer_port(c) > 0);
    switch (srv.mode) {
    case M_FLOOD:
        cf_conn_want_drain(c); /* also exercise the "emptied" notification path */
        flood_more(c);
        break;
    case M_IDLE:
        cf_conn_set_idle_timeout(c, 150);
        break;
    case M_REFUSE:
        /* refuse at once, before the TLS handshake: the reply must still
         * arrive (after the handshake) */
        CU_ASSERT_EQUAL(cf_conn_write(c, "* BYE refused\r\n", 15), 0);
        cf_conn_close(c, 1, "refused");
        break;
    case M_CLOSE_TWICE:
        cf_conn_close(c, 1, "first");
        CU_ASSERT(cf_conn_is_closing(c));
        cf_conn_close(c, 0, "second");
        cf_conn_close(c, 1, "third");
        srv.write_after_close_rv = cf_conn_write(c, "x", 1);
        CU_ASSERT_EQUAL(cf_conn_write_ref(c, "y", 1, release_cb, &srv.release_calls), -1);
        CU_ASSERT_EQUAL(srv.closed, 0); /* on_close comes from a later iteration */
        break;
    default:
        break;
    }
}

static void srv_reset(enum srv_mode mode, SSL_CTX *ctx)
{
    bytes_free(&srv.pre_tls);
    bytes_free(&srv.post_tls);
    if (!srv.resume_timer_init) {
        uv_timer_init(&loop, &srv.resume_timer);
        srv.resume_timer_init = 1;
    }
    {
        uv_timer_t keep = srv.resume_timer;
        memset(&srv, 0, sizeof(srv));
        srv.resume_timer = keep;
        srv.resume_timer_init = 1;
    }
    srv.mode = mode;
    srv.ctx = ctx;
}

/* ---- raw uv client ---- */

struct rawcli {
    uv_tcp_t tcp;
    uv_connect_t creq;
    uv_write_t wreq;
    struct bytes in;
    const char *send;
    size_t send_len;
    int connected, eof, closed, reading;
    size_t expect; /* close when this much arrived (0: wait for EOF) */
    int got_expected;
};

static void raw_alloc(uv_handle_t *h, size_t sz, uv_buf_t *b)
{
    (void)h;
    b->base = malloc(sz);
    b->len = sz;
}

static void raw_closed(uv_handle_t *h)
{
    struct rawcli *r = h->data;
    r->closed = 1;
}

static void raw_read(uv_stream_t *s, ssize_t n, const uv_buf_t *b)
{
    struct rawcli *r = s->data;
    if (n > 0) bytes_add(&r->in, b->base, (size_t)n);
    free(b->base);
    if (n < 0) {
        r->eof = 1;
        uv_read_stop(s);
    }
    if (r->expect > 0 && r->in.len >= r->expect) r->got_expected = 1;
}

static void raw_written(uv_write_t *w, int status)
{
    (void)w;
    CU_ASSERT_EQUAL(status, 0);
}

static void raw_start_read(struct rawcli *r)
{
    if (!r->reading) {
        uv_read_start((uv_stream_t *)&r->tcp, raw_alloc, raw_read);
        r->reading = 1;
    }
}

static void raw_connected(uv_connect_t *req, int status)
{
    struct rawcli *r = req->data;
    CU_ASSERT_EQUAL(status, 0);
    r->connected = 1;
    if (r->send_len > 0) {
        uv_buf_t b = uv_buf_init((char *)r->send, (unsigned)r->send_len);
        uv_write(&r->wreq, (uv_stream_t *)&r->tcp, &b, 1, raw_written);
    }
}

static void raw_connect(struct rawcli *r, const char *send, size_t send_len, int read_now)
{
    struct sockaddr_in sa;
    memset(r, 0, sizeof(*r));
    r->send = send;
    r->send_len = send_len;
    uv_tcp_init(&loop, &r->tcp);
    r->tcp.data = r;
    r->creq.data = r;
    uv_ip4_addr("127.0.0.1", listen_port, &sa);
    CU_ASSERT_EQUAL(uv_tcp_connect(&r->creq, &r->tcp, (struct sockaddr *)&sa, raw_connected), 0);
    if (read_now) raw_start_read(r);
}

static void raw_close(struct rawcli *r)
{
    if (!uv_is_closing((uv_handle_t *)&r->tcp)) uv_close((uv_handle_t *)&r->tcp, raw_closed);
    run_until(&r->closed, WAIT_MS);
    bytes_free(&r->in);
}

/* ---- cf_conn client ---- */

struct cli {
    struct cf_conn *conn;
    SSL_SESSION *sess; /* cf_conn_get_session when done */
    int reused;        /* cf_conn_session_reused when done */
    int keep_open;     /* do not close when done */
    struct bytes in;
    int connected, tls_ready, closed, released, done;
    char reason[256];
    size_t expect;
    int starttls_mode; /* 1: send STARTTLS+INJECT, then upgrade */
    int got_peer_cert;
    const char *payload;
    size_t payload_len;
};

static struct cli cli;

static size_t cli_on_read(struct cf_conn *c, void *data, const char *buf, size_t len)
{
    (void)data;
    if (cli.starttls_mode && !cf_conn_is_tls(c)) {
        const char *nl = memchr(buf, '\n', len);
        if (nl == NULL) return 0;
        CU_ASSERT_EQUAL((size_t)(nl - buf + 1), 10);
        CU_ASSERT_EQUAL(memcmp(buf, "OK begin\r\n", 10), 0);
        CU_ASSERT_EQUAL(cf_conn_starttls(c, client_ctx), 0);
        return (size_t)(nl - buf + 1);
    }
    bytes_add(&cli.in, buf, len);
    if (cli.expect > 0 && cli.in.len >= cli.expect && !cli.done) {
        cli.done = 1;
        SSL_SESSION_free(cli.sess);
        cli.sess = cf_conn_get_session(c);
        cli.reused = cf_conn_session_reused(c);
        if (!cli.keep_open) cf_conn_close(c, 1, "client done");
    }
    return len;
}

static void cli_on_connected(struct cf_conn *c, void *data)
{
    (void)data;
    cli.connected++;
    if (cli.starttls_mode) {
        CU_ASSERT_EQUAL(cf_conn_write(c, "STARTTLS\r\nINJECT\r\n", 18), 0);
    } else if (cli.payload != NULL) {
        /* queued before the handshake completes: must go out encrypted after it */
        CU_ASSERT_EQUAL(
            cf_conn_write_ref(c, cli.payload, cli.payload_len, release_cb, &cli.released), 0);
        cf_conn_want_drain(c);
    }
}

static void cli_on_tls_ready(struct cf_conn *c, void *data)
{
    (void)data;
    cli.tls_ready++;
    cli.got_peer_cert = cf_conn_peer_cert(c) != NULL;
    if (cli.starttls_mode) CU_ASSERT_EQUAL(cf_conn_write(c, "HELLO\r\n", 7), 0);
}

static void cli_on_close(struct cf_conn *c, void *data, const char *reason)
{
    (void)data;
    CU_ASSERT_PTR_EQUAL(c, cli.conn);
    cli.closed++;
    snprintf(cli.reason, sizeof(cli.reason), "%s", reason);
}

static const struct cf_conn_ops cli_ops = {
    .on_read = cli_on_read,
    .on_tls_ready = cli_on_tls_ready,
    .on_close = cli_on_close,
    .on_connected = cli_on_connected,
};

static void cli_reset(void)
{
    SSL_SESSION_free(cli.sess);
    bytes_free(&cli.in);
    memset(&cli, 0, sizeof(cli));
}

/* ---- certificate generation ---- */

static int gen_cert(void)
{
    EVP_PKEY *pkey = EVP_PKEY_Q_keygen(NULL, NULL, "EC", "P-256");
    X509 *x = X509_new();
    X509_NAME *name;
    X509_EXTENSION *ext;
    X509V3_CTX v3;
    FILE *f;
    int fd, rv = -1;

    if (pkey == NULL || x == NULL) goto out;
    X509_set_version(x, 2);
    ASN1_INTEGER_set(X509_get_serialNumber(x), 1);
    X509_gmtime_adj(X509_getm_notBefore(x), -3600);
    X509_gmtime_adj(X509_getm_notAfter(x), 3600L * 24);
    X509_set_pubkey(x, pkey);
    name = X509_get_subject_name(x);
    X509_NAME_add_entry_by_txt(name, "CN", MBSTRING_ASC, (const unsigned char *)"localhost", -1, -1,
                               0);
    X509_set_issuer_name(x, name);
    X509V3_set_ctx(&v3, x, x, NULL, NULL, 0);
    ext = X509V3_EXT_conf_nid(NULL, &v3, NID_subject_alt_name, "DNS:localhost,IP:127.0.0.1");
    if (ext == NULL) goto out;
    X509_add_ext(x, ext, -1);
    X509_EXTENSION_free(ext);
    ext = X509V3_EXT_conf_nid(NULL, &v3, NID_basic_constraints, "critical,CA:TRUE");
    if (ext == NULL) goto out;
    X509_add_ext(x, ext, -1);
    X509_EXTENSION_free(ext);
    if (X509_sign(x, pkey, EVP_sha256()) == 0) goto out;

    f = fopen(cert_path, "w");
    if (f == NULL) goto out;
    PEM_write_X509(f, x);
    fclose(f);
    fd = open(key_path, O_WRONLY | O_CREAT | O_TRUNC, 0600);
    if (fd < 0) goto out;
    f = fdopen(fd, "w");
    if (f == NULL) {
        close(fd);
        goto out;
    }
    PEM_write_PrivateKey(f, pkey, NULL, NULL, 0, NULL, NULL);
    fclose(f);
    chmod(key_path, 0600);
    rv = 0;
out:
    X509_free(x);
    EVP_PKEY_free(pkey);
    return rv;
}

/* ---- tests ---- */

static void test_tls_ctx(void)
{
    char err[512];
    struct cf_tls_server_opts o = {.cert_file = cert_path, .key_file = key_path};
    SSL_CTX *ctx;

    /* group/world-readable key is refused with the file named */
    chmod(key_path, 0640);
    err[0] = '\0';
    ctx = cf_tls_server_ctx(&o, err, sizeof(err));
    CU_ASSERT_PTR_NULL(ctx);
    CU_ASSERT_PTR_NOT_NULL(strstr(err, key_path));
    CU_ASSERT_EQUAL(cf_tls_check_key_perms(key_path, err, sizeof(err)), -1);
    chmod(key_path, 0600);
    CU_ASSERT_EQUAL(cf_tls_check_key_perms(key_path, err, sizeof(err)), 0);

    o.min_version = "TLSv1.1";
    CU_ASSERT_PTR_NULL(cf_tls_server_ctx(&o, err, sizeof(err)));
    o.min_version = "TLSv1.3";
    o.groups = "no-such-group";
    CU_ASSERT_PTR_NULL(cf_tls_server_ctx(&o, err, sizeof(err)));
    o.groups = "X25519:P-256";
    ctx = cf_tls_server_ctx(&o, err, sizeof(err));
    CU_ASSERT_PTR_NOT_NULL(ctx);
    if (ctx) CU_ASSERT_EQUAL(SSL_CTX_get_min_proto_version(ctx), TLS1_3_VERSION);
    SSL_CTX_free(ctx);
    o.require_client_cert = 1; /* without a CA: refused */
    CU_ASSERT_PTR_NULL(cf_tls_server_ctx(&o, err, sizeof(err)));
    o.ca_file = cert_path;
    ctx = cf_tls_server_ctx(&o, err, sizeof(err));
    CU_ASSERT_PTR_NOT_NULL(ctx);
    SSL_CTX_free(ctx);
    CU_ASSERT_PTR_NULL(cf_tls_client_ctx(cert_path, cert_path, NULL, err, sizeof(err)));
}

static void test_parse_host_port(void)
{
    char host[64];
    int port;
    CU_ASSERT_EQUAL(cf_parse_host_port("127.0.0.1:1143", host, sizeof(host), &port), 0);
    CU_ASSERT_STRING_EQUAL(host, "127.0.0.1");
    CU_ASSERT_EQUAL(port, 1143);
    CU_ASSERT_EQUAL(cf_parse_host_port("[::1]:993", host, sizeof(host), &port), 0);
    CU_ASSERT_STRING_EQUAL(host, "::1");
    CU_ASSERT_EQUAL(port, 993);
    CU_ASSERT_EQUAL(cf_parse_host_port("*:143", host, sizeof(host), &port), 0);
    CU_ASSERT_STRING_EQUAL(host, "0.0.0.0");
    CU_ASSERT_EQUAL(port, 143);
    CU_ASSERT_EQUAL(cf_parse_host_port("example.org:25", host, sizeof(host), &port), 0);
    CU_ASSERT_STRING_EQUAL(host, "example.org");
    CU_ASSERT_EQUAL(cf_parse_host_port("::1:993", host, sizeof(host), &port), -1);
    CU_ASSERT_EQUAL(cf_parse_host_port("host", host, sizeof(host), &port), -1);
    CU_ASSERT_EQUAL(cf_parse_host_port("host:", host, sizeof(host), &port), -1);
    CU_ASSERT_EQUAL(cf_parse_host_port(":80", host, sizeof(host), &port), -1);
    CU_ASSERT_EQUAL(cf_parse_host_port("h:65536", host, sizeof(host), &port), -1);
    CU_ASSERT_EQUAL(cf_parse_host_port("h:8x", host, sizeof(host), &port), -1);
    CU_ASSERT_EQUAL(cf_parse_host_port("[::1]993", host, sizeof(host), &port), -1);
}

static void test_plain_echo(void)
{
    char *payload = malloc(BIG);
    struct rawcli r;

    fill_pattern(payload, BIG, 0);
    srv_reset(M_ECHO, NULL);
    raw_connect(&r, payload, BIG, 1);
    r.expect = BIG;
    CU_ASSERT_EQUAL(run_until(&r.got_expected, WAIT_MS), 0);
    CU_ASSERT_EQUAL(r.in.len, BIG);
    CU_ASSERT(r.in.len == BIG && memcmp(r.in.p, payload, BIG) == 0);
    raw_close(&r);
    CU_ASSERT_EQUAL(run_until(&srv.closed, WAIT_MS), 0);
    CU_ASSERT_EQUAL(srv.closed, 1);
    CU_ASSERT_STRING_EQUAL(srv.reason, "peer closed");
    free(payload);
}

static void test_tls_echo(void)
{
    char *payload = malloc(BIG);

    fill_pattern(payload, BIG, 0);
    srv_reset(M_ECHO, server_ctx);
    cli_reset();
    cli.payload = payload;
    cli.payload_len = BIG;
    cli.expect = BIG;
    cli.conn = cf_conn_connect(&loop, "127.0.0.1:0", client_ctx, "localhost", &cli_ops, NULL);
    CU_ASSERT_PTR_NOT_NULL_FATAL(cli.conn);
    /* port 0 was a placeholder: the real test connection follows */
    CU_ASSERT_EQUAL(run_until(&cli.closed, WAIT_MS), 0);
    CU_ASSERT_EQUAL(cli.connected, 0);
    CU_ASSERT_EQUAL(strncmp(cli.reason, "connect failed", 14), 0);

    cli_reset();
    cli.payload = payload;
    cli.payload_len = BIG;
    cli.expect = BIG;
    {
        char hp[64];
        snprintf(hp, sizeof(hp), "127.0.0.1:%d", listen_port);
        cli.conn = cf_conn_connect(&loop, hp, client_ctx, "localhost", &cli_ops, NULL);
    }
    CU_ASSERT_PTR_NOT_NULL_FATAL(cli.conn);
    CU_ASSERT_EQUAL(run_until(&cli.closed, WAIT_MS), 0);
    CU_ASSERT_EQUAL(cli.connected, 1);
    CU_ASSERT_EQUAL(cli.tls_ready, 1);
    CU_ASSERT(cli.got_peer_cert);
    CU_ASSERT_EQUAL(cli.released, 1);
    CU_ASSERT_STRING_EQUAL(cli.reason, "client done");
    CU_ASSERT_EQUAL(cli.in.len, BIG);
    CU_ASSERT(cli.in.len == BIG && memcmp(cli.in.p, payload, BIG) == 0);
    CU_ASSERT_EQUAL(run_until(&srv.closed, WAIT_MS), 0);
    CU_ASSERT_EQUAL(srv.tls_ready, 1);
    CU_ASSERT_STRING_EQUAL(srv.reason, "peer closed");
    cli_reset();
    free(payload);
}

static void test_tls_verify_fail(void)
{
    char hp[64];

    snprintf(hp, sizeof(hp), "127.0.0.1:%d", listen_port);
    srv_reset(M_ECHO, server_ctx);
    cli_reset();
    cli.conn = cf_conn_connect(&loop, hp, client_ctx, "wrong.example", &cli_ops, NULL);
    CU_ASSERT_PTR_NOT_NULL_FATAL(cli.conn);
    CU_ASSERT_EQUAL(run_until(&cli.closed, WAIT_MS), 0);
    CU_ASSERT_EQUAL(cli.tls_ready, 0);
    CU_ASSERT_EQUAL(strncmp(cli.reason, "tls handshake failed: ", 22), 0);
    CU_ASSERT_PTR_NOT_NULL(strstr(cli.reason, "verify"));
    CU_ASSERT_EQUAL(run_until(&srv.closed, WAIT_MS), 0);
    CU_ASSERT_EQUAL(srv.tls_ready, 0);
    CU_ASSERT_EQUAL(strncmp(srv.reason, "tls handshake failed: ", 22), 0);
    cli_reset();

    /* garbage instead of a ClientHello */
    {
        struct rawcli r;
        static const char junk[] = "GET / HTTP/1.0\r\n\r\n";
        srv_reset(M_ECHO, server_ctx);
        raw_connect(&r, junk, sizeof(junk) - 1, 1);
        CU_ASSERT_EQUAL(run_until(&srv.closed, WAIT_MS), 0);
        CU_ASSERT_EQUAL(strncmp(srv.reason, "tls handshake failed: ", 22), 0);
        CU_ASSERT_EQUAL(run_until(&r.eof, WAIT_MS), 0);
        raw_close(&r);
    }
}

static void test_client_cert(void)
{
    char hp[64], err[512];
    struct cf_tls_server_opts o = {.cert_file = cert_path,
                                   .key_file = key_path,
                                   .ca_file = cert_path,
                                   .require_client_cert = 1};
    SSL_CTX *sctx = cf_tls_server_ctx(&o, err, sizeof(err));
    SSL_CTX *cctx = cf_tls_client_ctx(cert_path, cert_path, key_path, err, sizeof(err));

    CU_ASSERT_PTR_NOT_NULL_FATAL(sctx);
    CU_ASSERT_PTR_NOT_NULL_FATAL(cctx);
    snprintf(hp, sizeof(hp), "127.0.0.1:%d", listen_port);

    /* with a client certificate: verified and visible to the session */
    srv_reset(M_ECHO, sctx);
    cli_reset();
    cli.payload = "ping\r\n";
    cli.payload_len = 6;
    cli.expect = 6;
    cli.conn = cf_conn_connect(&loop, hp, cctx, NULL, &cli_ops, NULL); /* verify by IP */
    CU_ASSERT_PTR_NOT_NULL_FATAL(cli.conn);
    CU_ASSERT_EQUAL(run_until(&cli.closed, WAIT_MS), 0);
    CU_ASSERT_STRING_EQUAL(cli.in.p ? cli.in.p : "", "ping\r\n");
    CU_ASSERT_EQUAL(run_until(&srv.closed, WAIT_MS), 0);
    CU_ASSERT_EQUAL(srv.tls_ready, 1);
    CU_ASSERT_EQUAL(srv.peer_cert_seen, 1);

    /* without one: the server refuses the handshake */
    srv_reset(M_ECHO, sctx);
    cli_reset();
    cli.payload = "ping\r\n";
    cli.payload_len = 6;
    cli.expect = 6;
    cli.conn = cf_conn_connect(&loop, hp, client_ctx, "localhost", &cli_ops, NULL);
    CU_ASSERT_PTR_NOT_NULL_FATAL(cli.conn);
    CU_ASSERT_EQUAL(run_until(&srv.closed, WAIT_MS), 0);
    CU_ASSERT_EQUAL(srv.tls_ready, 0);
    CU_ASSERT_EQUAL(strncmp(srv.reason, "tls handshake failed: ", 22), 0);
    CU_ASSERT_EQUAL(run_until(&cli.closed, WAIT_MS), 0);
    CU_ASSERT_EQUAL(cli.in.len, 0);
    cli_reset();

    /* the plain server ctx (no CA) reports no verified peer certificate */
    srv_reset(M_ECHO, server_ctx);
    cli.payload = "ping\r\n";
    cli.payload_len = 6;
    cli.expect = 6;
    cli.conn = cf_conn_connect(&loop, hp, cctx, "localhost", &cli_ops, NULL);
    CU_ASSERT_PTR_NOT_NULL_FATAL(cli.conn);
    CU_ASSERT_EQUAL(run_until(&srv.closed, WAIT_MS), 0);
    CU_ASSERT_EQUAL(srv.tls_ready, 1);
    CU_ASSERT_EQUAL(srv.peer_cert_seen, 0);
    CU_ASSERT_EQUAL(run_until(&cli.closed, WAIT_MS), 0);
    cli_reset();
    SSL_CTX_free(sctx);
    SSL_CTX_free(cctx);
}

static void test_starttls_discard(void)
{
    char hp[64];

    snprintf(hp, sizeof(hp), "127.0.0.1:%d", listen_port);
    srv_reset(M_STARTTLS, NULL);
    cli_reset();
    cli.starttls_mode = 1;
    cli.expect = 7; /* "HELLO\r\n" echoed back over TLS */
    cli.conn = cf_conn_connect(&loop, hp, NULL, "localhost", &cli_ops, NULL);
    CU_ASSERT_PTR_NOT_NULL_FATAL(cli.conn);
    CU_ASSERT_EQUAL(run_until(&cli.closed, WAIT_MS), 0);
    CU_ASSERT_EQUAL(cli.tls_ready, 1);
    CU_ASSERT_EQUAL(srv.tls_ready, 1);
    CU_ASSERT_STRING_EQUAL(cli.in.p ? cli.in.p : "", "HELLO\r\n");
    CU_ASSERT_EQUAL(run_until(&srv.closed, WAIT_MS), 0);
    /* the STARTTLS line arrived together with the injected line */
    CU_ASSERT_STRING_EQUAL(srv.pre_tls.p ? srv.pre_tls.p : "", "STARTTLS\r\nINJECT\r\n");
    /* after the handshake the server saw only what came over TLS */
    CU_ASSERT_STRING_EQUAL(srv.post_tls.p ? srv.post_tls.p : "", "HELLO\r\n");
    CU_ASSERT_PTR_NULL(srv.post_tls.p ? strstr(srv.post_tls.p, "INJECT") : NULL);
    cli_reset();
}

static void start_reading_cb(uv_timer_t *t)
{
    raw_start_read(t->data);
}

static void test_backpressure(void)
{
    struct rawcli r;
    uv_timer_t delay;
    const size_t total = 8u * 1024 * 1024;

    srv_reset(M_FLOOD, NULL);
    srv.flood_total = total;
    raw_connect(&r, NULL, 0, 0);
    r.expect = total;
    /* let the socket buffers fill up before the client reads */
    uv_timer_init(&loop, &delay);
    delay.data = &r;
    uv_timer_start(&delay, start_reading_cb, 300, 0);
    CU_ASSERT_EQUAL(run_until(&r.got_expected, 30000), 0);
    uv_close((uv_handle_t *)&delay, NULL);
    CU_ASSERT_EQUAL(r.in.len, total);
    CU_ASSERT(r.in.len == total && check_pattern(r.in.p, total, 0) == 0);
    CU_ASSERT(srv.saw_high > 1);
    CU_ASSERT(srv.drains > 1);
    /* the writer never ran far past HIGH */
    CU_ASSERT(srv.max_pending <= CF_CONN_OUT_HIGH + 65536);
    CU_ASSERT_EQUAL(srv.flood_written, total);
    raw_close(&r);
    CU_ASSERT_EQUAL(run_until(&srv.closed, WAIT_MS), 0);
}

static void test_idle_timeout(void)
{
    struct rawcli r;

    srv_reset(M_IDLE, NULL);
    raw_connect(&r, NULL, 0, 1);
    CU_ASSERT_EQUAL(run_until(&srv.closed, WAIT_MS), 0);
    CU_ASSERT_EQUAL(srv.timeouts, 1);
    CU_ASSERT_STRING_EQUAL(srv.reason, "idle timeout");
    CU_ASSERT_EQUAL(run_until(&r.eof, WAIT_MS), 0);
    CU_ASSERT_STRING_EQUAL(r.in.p ? r.in.p : "", "* BYE idle\r\n");
    raw_close(&r);
    run_for(50);
    CU_ASSERT_EQUAL(srv.closed, 1);
    CU_ASSERT_EQUAL(srv.timeouts, 1);
}

static void test_close_twice(void)
{
    struct rawcli r;

    srv_reset(M_CLOSE_TWICE, NULL);
    raw_connect(&r, NULL, 0, 1);
    CU_ASSERT_EQUAL(run_until(&srv.closed, WAIT_MS), 0);
    CU_ASSERT_STRING_EQUAL(srv.reason, "first");
    CU_ASSERT_EQUAL(srv.write_after_close_rv, -1);
    CU_ASSERT_EQUAL(srv.release_calls, 1);
    CU_ASSERT_EQUAL(run_until(&r.eof, WAIT_MS), 0);
    raw_close(&r);
    run_for(50);
    CU_ASSERT_EQUAL(srv.closed, 1);
}

static void test_pipelined_pause(void)
{
    struct rawcli r;
    static const char cmds[] = "A1\r\nB2\r\nC3\r\n";

    srv_reset(M_LINES, NULL);
    raw_connect(&r, cmds, sizeof(cmds) - 1, 1);
    for (int i = 0; i < 100 && srv.nlines < 3; i++)
        run_for(20);
    CU_ASSERT_EQUAL(srv.nlines, 3);
    CU_ASSERT_STRING_EQUAL(srv.lines[0], "A1\r\n");
    CU_ASSERT_STRING_EQUAL(srv.lines[1], "B2\r\n");
    CU_ASSERT_STRING_EQUAL(srv.lines[2], "C3\r\n");
    raw_close(&r);
    CU_ASSERT_EQUAL(run_until(&srv.closed, WAIT_MS), 0);
    CU_ASSERT_STRING_EQUAL(srv.reason, "peer closed");
}

/* Client TLS session resumption; the resumed server side still sees the
 * client certificate (the store trusts the proxy by it). */
static void test_tls_resume(void)
{
    char hp[64], err[512];
    struct cf_tls_server_opts o = {.cert_file = cert_path,
                                   .key_file = key_path,
                                   .ca_file = cert_path,
                                   .require_client_cert = 1};
    SSL_CTX *sctx = cf_tls_server_ctx(&o, err, sizeof(err));
    SSL_CTX *cctx = cf_tls_client_ctx(cert_path, cert_path, key_path, err, sizeof(err));
    SSL_SESSION *sess = NULL;

    CU_ASSERT_PTR_NOT_NULL_FATAL(sctx);
    CU_ASSERT_PTR_NOT_NULL_FATAL(cctx);
    snprintf(hp, sizeof(hp), "127.0.0.1:%d", listen_port);
    for (int round = 0; round < 3; round++) {
        srv_reset(M_ECHO, sctx);
        cli_reset();
        cli.payload = "ping\r\n";
        cli.payload_len = 6;
        cli.expect = 6;
        cli.conn = cf_conn_connect(&loop, hp, cctx, "localhost", &cli_ops, NULL);
        CU_ASSERT_PTR_NOT_NULL_FATAL(cli.conn);
        /* round 2 offers a session; round 1 none, round 3 sets and unsets one */
        CU_ASSERT_EQUAL(cf_conn_set_session(cli.conn, round == 0 ? NULL : sess), 0);
        if (round == 2) CU_ASSERT_EQUAL(cf_conn_set_session(cli.conn, NULL), 0);
        CU_ASSERT_EQUAL(run_until(&cli.closed, WAIT_MS), 0);
        CU_ASSERT_STRING_EQUAL(cli.in.p ? cli.in.p : "", "ping\r\n");
        CU_ASSERT_EQUAL(cli.reused, round == 1);
        CU_ASSERT_PTR_NOT_NULL(cli.sess); /* the ticket came before the echo */
        CU_ASSERT_EQUAL(run_until(&srv.closed, WAIT_MS), 0);
        CU_ASSERT_EQUAL(srv.tls_ready, 1);
        CU_ASSERT_EQUAL(srv.peer_cert_seen, 1);
        if (round == 0) {
            sess = cli.sess;
            cli.sess = NULL;
        }
    }
    cli_reset();
    /* not a client conn / handshake already done: refused */
    CU_ASSERT_EQUAL(cf_conn_set_session(NULL, sess), -1);
    CU_ASSERT_PTR_NULL(cf_conn_get_session(NULL));
    SSL_SESSION_free(sess);
    SSL_CTX_free(sctx);
    SSL_CTX_free(cctx);
}

/* Idle conns give their buffers back: after a large TLS echo, both sides
 * hold no input or ciphertext buffer once the traffic stopped. */
static void test_idle_buffers(void)
{
    char hp[64];
    char *payload = malloc(200000);

    fill_pattern(payload, 200000, 3);
    snprintf(hp, sizeof(hp), "127.0.0.1:%d", listen_port);
    srv_reset(M_ECHO, server_ctx);
    cli_reset();
    cli.payload = payload;
    cli.payload_len = 200000;
    cli.expect = 200000;
    cli.keep_open = 1;
    cli.conn = cf_conn_connect(&loop, hp, client_ctx, "localhost", &cli_ops, NULL);
    CU_ASSERT_PTR_NOT_NULL_FATAL(cli.conn);
    CU_ASSERT_EQUAL(run_until(&cli.done, WAIT_MS), 0);
    CU_ASSERT_EQUAL(cli.in.len, 200000);
    CU_ASSERT(cli.in.len == 200000 && check_pattern(cli.in.p, 200000, 3) == 0);
    CU_ASSERT(srv.reads > 1);
    run_for(100);
    CU_ASSERT_EQUAL_FATAL(cli.closed, 0);
    CU_ASSERT_PTR_NOT_NULL_FATAL(srv.conn);
    /* idle now: no input or ciphertext buffers on either side */
    CU_ASSERT_EQUAL(cf_conn_buffer_bytes(cli.conn), 0);
    CU_ASSERT_EQUAL(cf_conn_buffer_bytes(srv.conn), 0);
    /* and the conn still works after giving them back */
    cli.expect = 200000 + 6;
    cli.keep_open = 0;
    cli.done = 0;
    CU_ASSERT_EQUAL(cf_conn_write(cli.conn, "again\n", 6), 0);
    CU_ASSERT_EQUAL(run_until(&cli.closed, WAIT_MS), 0);
    CU_ASSERT_EQUAL(cli.in.len, 200006);
    CU_ASSERT(cli.in.len == 200006 && memcmp(cli.in.p + 200000, "again\n", 6) == 0);
    CU_ASSERT_EQUAL(run_until(&srv.closed, WAIT_MS), 0);
    cli_reset();
    free(payload);

    /* plaintext, with a partial line left unconsumed: only that is kept */
    {
        struct rawcli r;
        static const char part[] = "A1\r\nB2";
        srv_reset(M_LINES, NULL);
        raw_connect(&r, part, sizeof(part) - 1, 1);
        for (int i = 0; i < 100 && srv.nlines < 1; i++)
            run_for(20);
        run_for(60); /* resumed: "B2" stays unconsumed */
        CU_ASSERT_EQUAL(srv.nlines, 1);
        if (srv.conn != NULL) {
            CU_ASSERT(cf_conn_buffer_bytes(srv.conn) > 0);
            CU_ASSERT(cf_conn_buffer_bytes(srv.conn) <= 4096);
        }
        raw_close(&r);
        CU_ASSERT_EQUAL(run_until(&srv.closed, WAIT_MS), 0);
    }
}

/* A graceful close during the server's TLS handshake finishes the handshake
 * and delivers what was queued; no on_tls_ready after the close. */
static void test_close_during_handshake(void)
{
    char hp[64];

    snprintf(hp, sizeof(hp), "127.0.0.1:%d", listen_port);
    srv_reset(M_REFUSE, server_ctx);
    cli_reset();
    cli.conn = cf_conn_connect(&loop, hp, client_ctx, "localhost", &cli_ops, NULL);
    CU_ASSERT_PTR_NOT_NULL_FATAL(cli.conn);
    CU_ASSERT_EQUAL(run_until(&cli.closed, WAIT_MS), 0);
    CU_ASSERT_EQUAL(cli.tls_ready, 1);
    CU_ASSERT_STRING_EQUAL(cli.in.p ? cli.in.p : "", "* BYE refused\r\n");
    CU_ASSERT_STRING_EQUAL(cli.reason, "peer closed");
    CU_ASSERT_EQUAL(run_until(&srv.closed, WAIT_MS), 0);
    CU_ASSERT_STRING_EQUAL(srv.reason, "refused");
    CU_ASSERT_EQUAL(srv.tls_ready, 0);
    CU_ASSERT_EQUAL(srv.reads, 0);
    cli_reset();

    /* a client that never handshakes: the close is not held up forever
     * (nothing queued: at once) */
    {
        struct rawcli r;
        srv_reset(M_CLOSE_TWICE, server_ctx);
        raw_connect(&r, NULL, 0, 1);
        CU_ASSERT_EQUAL(run_until(&srv.closed, 2000), 0);
        CU_ASSERT_STRING_EQUAL(srv.reason, "first");
        CU_ASSERT_EQUAL(run_until(&r.eof, WAIT_MS), 0);
        CU_ASSERT_EQUAL(r.in.len, 0);
        raw_close(&r);
    }
}

static int suite_init(void)
{
    char err[512];
    struct cf_tls_server_opts o = {0};
    struct sockaddr_storage ss;
    int len = sizeof(ss);

    cf_log_init("test_conn", CF_LOG_WARN, 0);
    snprintf(tmpdir, sizeof(tmpdir), "/tmp/test_conn.XXXXXX");
    if (mkdtemp(tmpdir) == NULL) return -1;
    snprintf(cert_path, sizeof(cert_path), "%s/cert.pem", tmpdir);
    snprintf(key_path, sizeof(key_path), "%s/key.pem", tmpdir);
    if (gen_cert() < 0) return -1;
    o.cert_file = cert_path;
    o.key_file = key_path;
    server_ctx = cf_tls_server_ctx(&o, err, sizeof(err));
    if (server_ctx == NULL) {
        fprintf(stderr, "server ctx: %s\n", err);
        return -1;
    }
    client_ctx = cf_tls_client_ctx(cert_path, NULL, NULL, err, sizeof(err));
    if (client_ctx == NULL) {
        fprintf(stderr, "client ctx: %s\n", err);
        return -1;
    }
    if (uv_loop_init(&loop) != 0) return -1;
    if (cf_listen_tcp(&loop, &listener, "127.0.0.1:0", 16, on_connection, err, sizeof(err)) != 0) {
        fprintf(stderr, "listen: %s\n", err);
        return -1;
    }
    uv_tcp_getsockname(&listener, (struct sockaddr *)&ss, &len);
    listen_port = ntohs(((struct sockaddr_in *)&ss)->sin_port);
    return 0;
}

static void close_walk(uv_handle_t *h, void *arg)
{
    (void)arg;
    if (!uv_is_closing(h)) uv_close(h, NULL);
}

static int suite_clean(void)
{
    char cmd[128];
    uv_walk(&loop, close_walk, NULL);
    uv_run(&loop, UV_RUN_DEFAULT);
    if (uv_loop_close(&loop) != 0) fprintf(stderr, "loop not clean\n");
    bytes_free(&srv.pre_tls);
    bytes_free(&srv.post_tls);
    SSL_CTX_free(server_ctx);
    SSL_CTX_free(client_ctx);
    snprintf(cmd, sizeof(cmd), "rm -rf %s", tmpdir);
    if (system(cmd) != 0) fprintf(stderr, "cleanup failed\n");
    return 0;
}

int main(void)
{
    CU_pSuite s;
    unsigned fails;

    if (CU_initialize_registry() != CUE_SUCCESS) return 2;
    s = CU_add_suite("conn", suite_init, suite_clean);
    CU_add_test(s, "tls_ctx", test_tls_ctx);
    CU_add_test(s, "parse_host_port", test_parse_host_port);
    CU_add_test(s, "plain_echo_1MiB", test_plain_echo);
    CU_add_test(s, "tls_echo_1MiB", test_tls_echo);
    CU_add_test(s, "tls_verify_fail", test_tls_verify_fail);
    CU_add_test(s, "client_cert", test_client_cert);
    CU_add_test(s, "starttls_discard", test_starttls_discard);
    CU_add_test(s, "backpressure", test_backpressure);
    CU_add_test(s, "idle_timeout", test_idle_timeout);
    CU_add_test(s, "close_twice", test_close_twice);
    CU_add_test(s, "pipelined_pause", test_pipelined_pause);
    CU_add_test(s, "tls_resume", test_tls_resume);
    CU_add_test(s, "idle_buffers", test_idle_buffers);
    CU_add_test(s, "close_during_handshake", test_close_during_handshake);
    CU_basic_set_mode(CU_BRM_VERBOSE);
    CU_basic_run_tests();
    fails = CU_get_number_of_failures() + CU_get_number_of_suites_failed();
    CU_cleanup_registry();
    return fails != 0;
}
