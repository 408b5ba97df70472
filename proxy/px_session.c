/* px_session: one client connection of coffer-mmp.
 *
 * Phases:
 *  PREAUTH  the proxy speaks IMAP/POP3 itself (px_parse parsers): greeting,
 *           CAPABILITY/CAPA, STARTTLS/STLS, ID, NOOP, LOGOUT/QUIT, and the
 *           login commands. Bounded: line and literal sizes, a command
 *           count, bad commands, failed logins, and an absolute deadline
 *           (limits.preauth_timeout from connect, so a client trickling
 *           bytes cannot stay).
 *  LOGIN    client input paused; the proxy connects to the store group's
 *           leader (px_route candidates, following "not leader" refusals)
 *           over TLS with its client certificate, passes the client address
 *           (IMAP ID x-originating-ip / POP3 XCLIENT) and logs in with the
 *           client's credentials (AUTHENTICATE PLAIN / AUTH PLAIN). The
 *           store's answer decides. A failure goes through px_throttle (and
 *           may be delayed); a success is answered with the store's own
 *           tagged OK (the client's tag put back).
 *  SPLICE   bytes copied both ways. Each direction stops reading when the
 *           other side's queue holds limits.splice_buffer bytes and resumes
 *           when it has drained, so a slow reader slows the writer and
 *           nothing grows without bound. The pre-auth state is freed at
 *           login; an idle spliced session holds two cf_conns and this
 *           struct.
 * The session is freed when every handle it owns has called back (holds).
 */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include <openssl/crypto.h>

#include "cf_conn.h"
#include "cf_log.h"
#include "px_parse.h"
#include "px_server.h"

enum { ST_PREAUTH, ST_LOGIN, ST_DELAY, ST_SPLICE, ST_CLOSING };
enum { B_GREETING, B_XCLIENT, B_AUTH };

#define BACKEND_LINE_MAX 8192
#define PASS_MAX 1024

struct px_login {
    char (*cand)[PX_ROUTE_ADDR_MAX];
    size_t ncand, icand;
    char cur[PX_ROUTE_ADDR_MAX];
    char last_hint[PX_ROUTE_ADDR_MAX];
    uint64_t deadline;
    int bstep;
    unsigned attempts;
};

struct px_preauth {
    struct px_session *s;
    uv_timer_t timer;    /* failure delays and probe pauses */
    uv_timer_t deadline; /* limits.preauth_timeout from connect */
    int timers_open;
    int timer_retry;               /* timer runs a probe pause (else a failure delay) */
    struct px_imap_parser *parser; /* IMAP only */
    unsigned ncommands, nbad, nfail;
    int sasl_wait; /* waiting for the SASL PLAIN continuation line */
    char tag[PX_MAX_TAG + 1];
    char user[256];
    size_t user_len;
    int have_user; /* POP3 USER seen */
    char authz[256];
    size_t authz_len;
    char pass[PASS_MAX + 1];
    size_t pass_len;
    struct px_login *login;
    char *reply; /* failure reply written after the delay */
    int close_after_reply;
};

struct downstream { /* IMAP server->client response boundaries (for a BYE) */
    uint64_t lit_left;
    unsigned char at_bol, tail_len, saw_bye;
    char tail[24];
};

struct px_session {
    struct px_server *srv;
    struct px_session *prev, *next;
    struct cf_conn *client, *backend;
    struct px_tls *tls;
    struct px_preauth *pa;
    struct px_addr addr;  /* client address */
    struct px_addr caddr; /* masked, for the connection counts */
    char peer[64];
    int peer_port;
    int kind, proto, state, holds;
    unsigned counted : 1, client_paused : 1, backend_paused : 1, listed : 1;
    struct downstream ds;
    char user[64]; /* for log lines after login */
    char node[PX_ROUTE_ADDR_MAX];
    uint64_t up, down; /* bytes client->store, store->client */
};

static void session_unref(struct px_session *s);
static void preauth_free(struct px_session *s);
static void be_try_next(struct px_session *s);
static void client_process_resume(struct px_session *s);

static uint64_t now_ms(const struct px_session *s)
{
    return uv_now(s->srv->loop);
}

static const struct px_conf *sconf(const struct px_session *s)
{
    return s->srv->conf;
}

static void outf(struct px_session *s, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void outf(struct px_session *s, const char *fmt, ...)
{
    char buf[1024];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(buf, sizeof(buf), fmt, ap);
    va_end(ap);
    if (n < 0) return;
    if ((size_t)n >= sizeof(buf)) n = sizeof(buf) - 1;
    cf_conn_write(s->client, buf, (size_t)n);
}

/* Printable copy for logs. */
static void sanitize(char *dst, size_t dstlen, const char *src, size_t len)
{
    size_t o = 0;
    for (size_t i = 0; i < len && o + 1 < dstlen; i++) {
        unsigned char c = (unsigned char)src[i];
        dst[o++] = (c < 0x20 || c >= 0x7f || c == '"') ? '?' : (char)c;
    }
    dst[o] = '\0';
}

static const char *proto_name(const struct px_session *s)
{
    return s->proto == PX_IMAP ? "imap" : "pop3";
}

static int plaintext_ok(const struct px_session *s)
{
    if (cf_conn_is_tls(s->client)) return 1;
    const struct px_conf *c = sconf(s);
    return c->allow_plaintext &&
           px_cidr_list_match(c->plaintext_nets, c->n_plaintext_nets, &s->addr);
}

static SSL_CTX *starttls_ctx(const struct px_session *s)
{
    return px_tls_server(s->tls, s->kind);
}

/* ---- closing ---- */

static void close_client(struct px_session *s, const char *reason)
{
    if (s->state != ST_SPLICE) s->state = ST_CLOSING;
    cf_conn_close(s->client, 1, reason);
}

static void bye_close(struct px_session *s, const char *imap_text, const char *pop3_text,
                      const char *reason)
{
    if (s->proto == PX_IMAP)
        outf(s, "* BYE %s\r\n", imap_text);
    else
        outf(s, "-ERR %s\r\n", pop3_text);
    close_client(s, reason);
}

static void timer_closed(uv_handle_t *h)
{
    struct px_preauth *pa = h->data;
    if (--pa->timers_open > 0) return;
    struct px_session *s = pa->s;
    free(pa);
    session_unref(s);
}

static void login_free(struct px_preauth *pa)
{
    if (pa->login == NULL) return;
    free(pa->login->cand);
    free(pa->login);
    pa->login = NULL;
}

static void preauth_free(struct px_session *s)
{
    struct px_preauth *pa = s->pa;
    if (pa == NULL) return;
    s->pa = NULL;
    px_imap_parser_free(&pa->parser);
    login_free(pa);
    free(pa->reply);
    pa->reply = NULL;
    OPENSSL_cleanse(pa->pass, sizeof(pa->pass));
    pa->pass_len = 0;
    uv_close((uv_handle_t *)&pa->timer, timer_closed);
    uv_close((uv_handle_t *)&pa->deadline, timer_closed);
}

static void session_unref(struct px_session *s)
{
    if (--s->holds > 0) return;
    px_tls_unref(&s->tls);
    free(s);
}

/* ---- IMAP downstream boundary tracking (only to place a BYE safely) ---- */

static void ds_scan(struct downstream *d, const char *buf, size_t len)
{
    size_t i = 0;
    while (i < len) {
        if (d->lit_left) {
            size_t n = len - i < d->lit_left ? len - i : (size_t)d->lit_left;
            d->lit_left -= n;
            i += n;
            if (d->lit_left == 0) d->tail_len = 0; /* the line goes on after it */
            continue;
        }
        if (d->at_bol && len - i >= 6 && memcmp(buf + i, "* BYE ", 6) == 0) d->saw_bye = 1;
        const char *nl = memchr(buf + i, '\n', len - i);
        size_t end = nl ? (size_t)(nl - buf) : len;
        /* keep the last bytes of the line for the literal check */
        for (size_t k = end > i + sizeof(d->tail) ? end - sizeof(d->tail) : i; k < end; k++) {
            if (d->tail_len == sizeof(d->tail)) {
                memmove(d->tail, d->tail + 1, sizeof(d->tail) - 1);
                d->tail_len--;
            }
            d->tail[d->tail_len++] = buf[k];
        }
        if (nl == NULL) {
            d->at_bol = 0;
            return;
        }
        i = end + 1;
        /* "...{123}\r" ? */
        size_t t = d->tail_len;
        if (t > 0 && d->tail[t - 1] == '\r') t--;
        d->at_bol = 1;
        if (t > 2 && d->tail[t - 1] == '}') {
            size_t j = t - 1;
            if (j > 0 && d->tail[j - 1] == '+') j--;
            size_t de = j;
            uint64_t n = 0, mul = 1;
            while (j > 0 && d->tail[j - 1] >= '0' && d->tail[j - 1] <= '9' && de - j < 18) {
                n += (uint64_t)(d->tail[j - 1] - '0') * mul;
                mul *= 10;
                j--;
            }
            if (j > 0 && j < de && d->tail[j - 1] == '{' && n > 0) {
                d->lit_left = n;
                d->at_bol = 0;
            }
        }
        d->tail_len = 0;
    }
}

/* ---- splice ---- */

static size_t splice_forward(struct px_session *s, struct cf_conn *dst, int to_client,
                             const char *buf, size_t len)
{
    if (dst == NULL || cf_conn_is_closing(dst)) return len;
    if (to_client && s->proto == PX_IMAP) ds_scan(&s->ds, buf, len);
    cf_conn_write(dst, buf, len);
    if (to_client)
        s->down += len;
    else
        s->up += len;
    if (cf_conn_out_pending(dst) >= sconf(s)->splice_buffer) {
        if (to_client) {
            cf_conn_pause_read(s->backend);
            s->backend_paused = 1;
        } else {
            cf_conn_pause_read(s->client);
            s->client_paused = 1;
        }
        cf_conn_want_drain(dst);
    }
    return len;
}

/* ---- replies after the backend's decision ---- */

static void audit(struct px_session *s, const char *result)
{
    char u[256];
    sanitize(u, sizeof(u), s->pa ? s->pa->user : s->user,
             s->pa ? s->pa->user_len : strlen(s->user));
    cf_log_audit_login(proto_name(s), u, s->peer, NULL, result);
}

static void deliver_failure(struct px_session *s)
{
    struct px_preauth *pa = s->pa;
    if (pa->reply) {
        cf_conn_write(s->client, pa->reply, strlen(pa->reply));
        free(pa->reply);
        pa->reply = NULL;
    }
    if (pa->close_after_reply) {
        uint64_t left = px_throttle_blocked(s->srv->throttle, &s->addr, now_ms(s));
        char t1[200], t2[200];
        if (left) {
            snprintf(t1, sizeof(t1),
                     "[UNAVAILABLE] Too many failed logins from your address; try again in %llu "
                     "seconds.",
                     (unsigned long long)(left + 999) / 1000);
            snprintf(t2, sizeof(t2), "[SYS/TEMP]%s", t1 + strlen("[UNAVAILABLE]"));
        } else {
            snprintf(t1, sizeof(t1), "Too many authentication failures.");
            snprintf(t2, sizeof(t2), "[AUTH] Too many authentication failures.");
        }
        if (s->proto == PX_IMAP)
            bye_close(s, t1, t2, "too many failed logins");
        else {
            /* POP3 has no untagged BYE: the -ERR was the reply */
            close_client(s, "too many failed logins");
        }
        return;
    }
    s->state = ST_PREAUTH;
    client_process_resume(s);
}

static void timer_cb(uv_timer_t *t)
{
    struct px_preauth *pa = t->data;
    struct px_session *s = pa->s;
    if (s->pa != pa) return;
    if (pa->timer_retry) {
        pa->timer_retry = 0;
        be_try_next(s);
        return;
    }
    if (s->state == ST_DELAY) deliver_failure(s);
}

static void deadline_cb(uv_timer_t *t)
{
    struct px_preauth *pa = t->data;
    struct px_session *s = pa->s;
    if (s->pa != pa || s->state == ST_LOGIN) return;
    cf_info("%s %s: pre-auth timeout", proto_name(s), s->peer);
    bye_close(s, "Autologout; too slow to log in.", "[SYS/TEMP] Too slow to log in.",
              "pre-auth timeout");
}

/* The store refused the credentials (or we gave up). Throttle, maybe
 * delay, then reply and go back to PREAUTH (or close). */
static void login_failed(struct px_session *s, const char *reply_text, const char *result,
                         int count_failure)
{
    struct px_preauth *pa = s->pa;
    char line[600];
    struct px_verdict v;
    memset(&v, 0, sizeof(v));

    if (s->proto == PX_IMAP)
        snprintf(line, sizeof(line), "%s %s\r\n", pa->tag, reply_text);
    else
        snprintf(line, sizeof(line), "%s\r\n", reply_text);
    audit(s, result);
    if (count_failure) {
        px_throttle_fail(s->srv->throttle, &s->addr, pa->user, pa->user_len, pa->pass, pa->pass_len,
                         now_ms(s), &v);
        char u[256];
        sanitize(u, sizeof(u), pa->user, pa->user_len);
        if (v.exempt)
            cf_notice("throttle: %s user \"%s\": failed login not counted (allow list)", s->peer,
                      u);
        else
            cf_notice("throttle: %s user \"%s\": failed login %s (address %u, user %u failures "
                      "in window); reply delayed %llu ms%s [tables: %zu addresses, %zu users]",
                      s->peer, u, v.repeated ? "repeats the same password, not counted" : "counted",
                      v.addr_failures, v.user_failures, (unsigned long long)v.delay_ms,
                      v.blocked ? "; address blocked" : "",
                      px_throttle_entries(s->srv->throttle, 0),
                      px_throttle_entries(s->srv->throttle, 1));
        if (v.blocked)
            cf_warn("throttle: %s blocked for %llu s after %u failed logins", s->peer,
                    (unsigned long long)sconf(s)->throttle.block_ms / 1000, v.addr_failures);
        pa->nfail++;
    }
    OPENSSL_cleanse(pa->pass, sizeof(pa->pass));
    pa->pass_len = 0;
    pa->have_user = 0;
    free(pa->reply);
    pa->reply = strdup(line);
    pa->close_after_reply = v.blocked || pa->nfail >= sconf(s)->max_auth_failures;
    login_free(pa);
    s->state = ST_DELAY;
    if (v.delay_ms > 0) {
        pa->timer_retry = 0;
        uv_timer_start(&pa->timer, timer_cb, v.delay_ms, 0);
    } else {
        deliver_failure(s);
    }
}

static void be_abandon(struct px_session *s)
{
    struct cf_conn *b = s->backend;
    s->backend = NULL;
    cf_conn_close(b, 0, "abandoned");
}

static void login_unavailable(struct px_session *s)
{
    cf_warn("%s %s: no store node accepted the login within backend.login_timeout", proto_name(s),
            s->peer);
    login_failed(s,
                 s->proto == PX_IMAP ? "NO [UNAVAILABLE] No mail store is available; try again "
                                       "later."
                                     : "-ERR [SYS/TEMP] No mail store is available; try again "
                                       "later.",
                 "error", 0);
}

/* Login accepted by the store: answer the client and start splicing. */
static void login_succeeded(struct px_session *s, const char *line, size_t len)
{
    struct px_preauth *pa = s->pa;
    if (s->proto == PX_IMAP) {
        /* "P2 OK ..." -> "<tag> OK ..." */
        outf(s, "%s ", pa->tag);
        cf_conn_write(s->client, line + 3, len - 3);
    } else {
        cf_conn_write(s->client, line, len);
    }
    audit(s, "ok");
    px_throttle_success(s->srv->throttle, &s->addr, pa->user, pa->user_len, now_ms(s));
    sanitize(s->user, sizeof(s->user), pa->user, pa->user_len);
    snprintf(s->node, sizeof(s->node), "%s", pa->login->cur);
    cf_info("%s %s: user \"%s\" logged in via %s", proto_name(s), s->peer, s->user, s->node);
    preauth_free(s);
    s->state = ST_SPLICE;
    s->ds.at_bol = 1;
    s->srv->n_spliced++;
    uint64_t idle = sconf(s)->session_idle_timeout_ms;
    cf_conn_set_idle_timeout(s->client, idle);
    cf_conn_set_idle_timeout(s->backend, 0);
    cf_conn_set_max_unconsumed(s->client, 64 * 1024);
    cf_conn_set_max_unconsumed(s->backend, 64 * 1024);
    s->client_paused = 0;
    cf_conn_resume_read(s->client);
}

/* ---- backend connection ---- */

static void be_send_login(struct px_session *s)
{
    struct px_preauth *pa = s->pa;
    unsigned char msg[255 + 1 + 255 + 1 + PASS_MAX];
    char b64[((sizeof(msg) + 2) / 3) * 4 + 1];
    size_t m = 0;
    memcpy(msg + m, pa->authz, pa->authz_len);
    m += pa->authz_len;
    msg[m++] = 0;
    memcpy(msg + m, pa->user, pa->user_len);
    m += pa->user_len;
    msg[m++] = 0;
    memcpy(msg + m, pa->pass, pa->pass_len);
    m += pa->pass_len;
    px_b64_encode(msg, m, b64);
    OPENSSL_cleanse(msg, sizeof(msg));
    char port[16];
    snprintf(port, sizeof(port), "%d", s->peer_port);
    if (s->proto == PX_IMAP) {
        cf_conn_printf(s->backend,
                       "P1 ID (\"x-originating-ip\" \"%s\" \"x-originating-port\" \"%s\")\r\n"
                       "P2 AUTHENTICATE PLAIN %s\r\n",
                       s->peer, port, b64);
        pa->login->bstep = B_AUTH;
    } else {
        cf_conn_printf(s->backend, "XCLIENT ADDR=%s PORT=%s\r\nAUTH PLAIN %s\r\n", s->peer, port,
                       b64);
        pa->login->bstep = B_XCLIENT;
    }
    OPENSSL_cleanse(b64, sizeof(b64));
}

/* One line from the backend during LOGIN. Returns 1 when the session left
 * the LOGIN state (the caller stops reading lines), 0 otherwise. */
static int be_line(struct px_session *s, const char *line, size_t len, size_t full_len)
{
    struct px_preauth *pa = s->pa;
    struct px_login *lg = pa->login;
    char hint[PX_ROUTE_ADDR_MAX], dst[PX_ROUTE_ADDR_MAX], text[300];

    sanitize(text, sizeof(text), line, len);
    if (lg->bstep == B_GREETING) {
        int ok = s->proto == PX_IMAP ? (len >= 4 && strncasecmp(line, "* OK", 4) == 0)
                                     : (len >= 3 && strncmp(line, "+OK", 3) == 0);
        if (ok) {
            px_route_leader(s->srv->router, s->proto, lg->cur, now_ms(s));
            if (sconf(s)->be_tls_resume) {
                /* the store's ticket came before its greeting: keep the
                 * newest session for the next login to this node */
                SSL_SESSION *sess = cf_conn_get_session(s->backend);
                if (sess != NULL) px_tls_backend_session_put(s->tls, lg->cur, sess);
                cf_debug("%s %s: store %s: TLS session %s", proto_name(s), s->peer, lg->cur,
                         cf_conn_session_reused(s->backend) ? "resumed" : "new");
            }
            be_send_login(s);
            return 0;
        }
        int has_hint = px_route_parse_hint(line, len, hint, sizeof(hint));
        int not_leader = strstr(text, "not leader") != NULL;
        cf_info("%s %s: store %s refused: %s", proto_name(s), s->peer, lg->cur, text);
        const char *to = NULL;
        if (not_leader)
            to = px_route_not_leader(s->srv->router, s->proto, lg->cur, has_hint ? hint : NULL,
                                     now_ms(s), dst);
        else
            px_route_down(s->srv->router, s->proto, lg->cur, now_ms(s));
        be_abandon(s);
        if (to != NULL && strcmp(to, lg->last_hint) != 0) {
            snprintf(lg->last_hint, sizeof(lg->last_hint), "%s", to);
            /* try the hinted leader next, then the rest of this round */
            if (lg->icand > 0) {
                lg->icand--;
                memcpy(lg->cand[lg->icand], to, PX_ROUTE_ADDR_MAX);
            }
        }
        be_try_next(s);
        return 1;
    }
    if (s->proto == PX_POP3 && lg->bstep == B_XCLIENT) {
        if (len < 3 || strncmp(line, "+OK", 3) != 0)
            cf_warn("pop3 %s: store %s did not take XCLIENT: %s", s->peer, lg->cur, text);
        lg->bstep = B_AUTH;
        return 0;
    }
    /* B_AUTH */
    if (s->proto == PX_IMAP) {
        if (len >= 3 && strncmp(line, "P1 ", 3) == 0) {
            if (len < 5 || strncasecmp(line + 3, "OK", 2) != 0)
                cf_warn("imap %s: store %s did not take ID: %s", s->peer, lg->cur, text);
            return 0;
        }
        if (len >= 1 && line[0] == '*') return 0;
        if (len >= 1 && line[0] == '+') {
            /* the store wants more SASL data: cancel */
            cf_conn_write(s->backend, "*\r\n", 3);
            return 0;
        }
        if (len >= 5 && strncasecmp(line, "P2 OK", 5) == 0) {
            login_succeeded(s, line, full_len);
            return 1;
        }
        if (len >= 5 && strncasecmp(line, "P2 NO", 5) == 0) {
            char reply[400];
            int unavailable = strstr(text, "[UNAVAILABLE]") != NULL;
            snprintf(reply, sizeof(reply), "%s", text + 3);
            if (unavailable) {
                /* lost leadership meanwhile etc.: not the client's fault */
                px_route_down(s->srv->router, s->proto, lg->cur, now_ms(s));
                be_abandon(s);
                be_try_next(s);
                return 1;
            }
            be_abandon(s);
            login_failed(s, reply, "badpass", 1);
            return 1;
        }
        cf_warn("imap %s: unexpected reply from store %s: %s", s->peer, lg->cur, text);
        be_abandon(s);
        login_failed(s, "NO [UNAVAILABLE] Internal error; try again later.", "error", 0);
        return 1;
    }
    if (len >= 3 && strncmp(line, "+OK", 3) == 0) {
        login_succeeded(s, line, full_len);
        return 1;
    }
    if (len >= 1 && line[0] == '+') {
        cf_conn_write(s->backend, "*\r\n", 3);
        return 0;
    }
    if (strstr(text, "[SYS/TEMP]") != NULL) {
        px_route_down(s->srv->router, s->proto, lg->cur, now_ms(s));
        be_abandon(s);
        be_try_next(s);
        return 1;
    }
    char reply[400];
    snprintf(reply, sizeof(reply), "%s", text);
    be_abandon(s);
    login_failed(s, reply, "badpass", 1);
    return 1;
}

static size_t be_on_read(struct cf_conn *c, void *data, const char *buf, size_t len)
{
    struct px_session *s = data;
    if (c != s->backend) return len;
    if (s->state == ST_SPLICE) return splice_forward(s, s->client, 1, buf, len);
    if (s->state != ST_LOGIN) return len;
    size_t used = 0;
    while (used < len) {
        size_t ll, u;
        int r = px_find_line(buf + used, len - used, BACKEND_LINE_MAX, &ll, &u);
        if (r == 0) break;
        if (r < 0) {
            cf_warn("%s %s: store %s sent an overlong line", proto_name(s), s->peer,
                    s->pa->login->cur);
            be_abandon(s);
            be_try_next(s);
            return len;
        }
        const char *line = buf + used;
        used += u;
        if (be_line(s, line, ll, u)) {
            /* left LOGIN: on success the rest belongs to the client */
            if (s->state == ST_SPLICE && c == s->backend && used < len)
                splice_forward(s, s->client, 1, buf + used, len - used);
            return len;
        }
    }
    return used;
}

static void be_on_drain(struct cf_conn *c, void *data)
{
    struct px_session *s = data;
    if (c != s->backend || !s->client_paused) return;
    if (cf_conn_out_pending(c) < sconf(s)->splice_buffer) {
        s->client_paused = 0;
        cf_conn_resume_read(s->client);
    } else {
        cf_conn_want_drain(c);
    }
}

static void be_on_close(struct cf_conn *c, void *data, const char *reason)
{
    struct px_session *s = data;
    if (c == s->backend) {
        s->backend = NULL;
        if (s->state == ST_LOGIN && s->pa && s->pa->login) {
            cf_info("%s %s: store %s: %s", proto_name(s), s->peer, s->pa->login->cur, reason);
            px_route_down(s->srv->router, s->proto, s->pa->login->cur, now_ms(s));
            /* whatever failed, the next login there starts with a full handshake */
            px_tls_backend_session_put(s->tls, s->pa->login->cur, NULL);
            be_try_next(s);
        } else if (s->state == ST_SPLICE) {
            cf_info("%s %s: user \"%s\": store %s closed (%s); %llu bytes up, %llu down",
                    proto_name(s), s->peer, s->user, s->node, reason, (unsigned long long)s->up,
                    (unsigned long long)s->down);
            if (s->proto == PX_IMAP && s->ds.at_bol && !s->ds.lit_left && !s->ds.saw_bye)
                outf(s, "* BYE [UNAVAILABLE] Connection to the mail store lost; please "
                        "reconnect.\r\n");
            s->state = ST_CLOSING;
            cf_conn_close(s->client, 1, "store closed");
        }
    }
    session_unref(s);
}

static const struct cf_conn_ops backend_ops = {
    .on_read = be_on_read,
    .on_drain = be_on_drain,
    .on_close = be_on_close,
};

static void be_connect(struct px_session *s, const char *addr)
{
    struct px_login *lg = s->pa->login;
    snprintf(lg->cur, sizeof(lg->cur), "%s", addr);
    lg->bstep = B_GREETING;
    lg->attempts++;
    s->backend = cf_conn_connect(s->srv->loop, addr, px_tls_backend(s->tls),
                                 px_tls_backend_name(s->tls), &backend_ops, s);
    if (s->backend == NULL) {
        cf_error("%s %s: bad store address %s", proto_name(s), s->peer, addr);
        be_try_next(s);
        return;
    }
    s->holds++;
    if (sconf(s)->be_tls_resume) {
        SSL_SESSION *sess = px_tls_backend_session(s->tls, addr);
        if (sess != NULL) cf_conn_set_session(s->backend, sess);
    }
    cf_conn_set_idle_timeout(s->backend, sconf(s)->be_connect_timeout_ms);
    cf_conn_set_max_unconsumed(s->backend, BACKEND_LINE_MAX + 2);
}

static void be_try_next(struct px_session *s)
{
    struct px_preauth *pa = s->pa;
    if (pa == NULL || s->state != ST_LOGIN || cf_conn_is_closing(s->client)) return;
    struct px_login *lg = pa->login;
    if (lg->icand < lg->ncand) {
        be_connect(s, lg->cand[lg->icand++]);
        return;
    }
    uint64_t now = now_ms(s);
    if (now + sconf(s)->be_retry_ms >= lg->deadline) {
        login_unavailable(s);
        return;
    }
    /* nobody is the leader right now (election?): ask again shortly */
    lg->ncand =
        px_route_candidates(s->srv->router, s->proto, pa->user, now, lg->cand, PX_ROUTE_MAX_NODES);
    lg->icand = 0;
    lg->last_hint[0] = '\0';
    pa->timer_retry = 1;
    uv_timer_start(&pa->timer, timer_cb, sconf(s)->be_retry_ms, 0);
}

static void login_start(struct px_session *s)
{
    struct px_preauth *pa = s->pa;
    uint64_t left = px_throttle_blocked(s->srv->throttle, &s->addr, now_ms(s));
    if (left) {
        char t1[200], t2[200];
        audit(s, "throttled");
        cf_notice("throttle: %s refused a login attempt (address blocked for %llu more s)", s->peer,
                  (unsigned long long)(left + 999) / 1000);
        snprintf(t1, sizeof(t1),
                 "[UNAVAILABLE] Too many failed logins from your address; try again in %llu "
                 "seconds.",
                 (unsigned long long)(left + 999) / 1000);
        snprintf(t2, sizeof(t2), "[SYS/TEMP]%s", t1 + strlen("[UNAVAILABLE]"));
        bye_close(s, t1, t2, "address blocked");
        return;
    }
    pa->login = calloc(1, sizeof(*pa->login));
    if (pa->login) pa->login->cand = calloc(PX_ROUTE_MAX_NODES, PX_ROUTE_ADDR_MAX);
    if (pa->login == NULL || pa->login->cand == NULL) {
        login_free(pa);
        bye_close(s, "[UNAVAILABLE] Out of memory.", "[SYS/TEMP] Out of memory.", "oom");
        return;
    }
    s->state = ST_LOGIN;
    cf_conn_pause_read(s->client);
    s->client_paused = 1;
    struct px_login *lg = pa->login;
    lg->deadline = now_ms(s) + sconf(s)->be_login_timeout_ms;
    lg->ncand = px_route_candidates(s->srv->router, s->proto, pa->user, now_ms(s), lg->cand,
                                    PX_ROUTE_MAX_NODES);
    be_try_next(s);
}

/* ---- IMAP pre-auth ---- */

static void imap_caps(const struct px_session *s, char *buf, size_t len)
{
    int tls = cf_conn_is_tls(s->client);
    snprintf(buf, len, "IMAP4rev1 SASL-IR ID ENABLE IDLE LITERAL+%s%s",
             !tls && starttls_ctx(s) ? " STARTTLS" : "",
             plaintext_ok(s) ? " AUTH=PLAIN" : " LOGINDISABLED");
}

static int bad(struct px_session *s, const char *tag, const char *text)
{
    struct px_preauth *pa = s->pa;
    if (s->proto == PX_IMAP)
        outf(s, "%s BAD %s\r\n", tag[0] ? tag : "*", text);
    else
        outf(s, "-ERR %s\r\n", text);
    if (++pa->nbad >= sconf(s)->max_bad_commands) {
        bye_close(s, "Too many invalid commands.", "Too many invalid commands.",
                  "too many bad commands");
        return -1;
    }
    return 0;
}

static int take_credentials(struct px_session *s, const char *authz, size_t authz_len,
                            const char *user, size_t user_len, const char *pass, size_t pass_len)
{
    struct px_preauth *pa = s->pa;
    if (user_len == 0 || user_len >= sizeof(pa->user) || authz_len >= sizeof(pa->authz) ||
        pass_len == 0 || pass_len > PASS_MAX || memchr(user, 0, user_len) ||
        memchr(pass, 0, pass_len) || memchr(authz, 0, authz_len))
        return -1;
    memcpy(pa->user, user, user_len);
    pa->user[user_len] = '\0';
    pa->user_len = user_len;
    memcpy(pa->authz, authz, authz_len);
    pa->authz_len = authz_len;
    memcpy(pa->pass, pass, pass_len);
    pa->pass_len = pass_len;
    return 0;
}

static int sasl_plain(struct px_session *s, const char *b64, size_t len)
{
    unsigned char msg[255 + 1 + 255 + 1 + PASS_MAX];
    struct px_sasl_plain sp;
    long n = px_b64_decode(b64, len, msg, sizeof(msg));
    int rv = -1;
    if (n > 0 && px_sasl_plain_split(msg, (size_t)n, &sp) == 0)
        rv = take_credentials(s, sp.authzid, sp.authzid_len, sp.authcid, sp.authcid_len, sp.passwd,
                              sp.passwd_len);
    OPENSSL_cleanse(msg, sizeof(msg));
    return rv;
}

static void plaintext_refused(struct px_session *s, const char *user, size_t user_len)
{
    char u[256];
    sanitize(u, sizeof(u), user, user_len);
    cf_log_audit_login(proto_name(s), u, s->peer, NULL, "plaintext-refused");
    if (s->proto == PX_IMAP)
        outf(s, "%s NO [PRIVACYREQUIRED] Plaintext authentication is disallowed; use STARTTLS.\r\n",
             s->pa->tag);
    else
        outf(s, "-ERR [AUTH] Plaintext authentication is disallowed; use STLS.\r\n");
}

static void imap_id(struct px_session *s, const struct px_imap_cmd *cmd)
{
    char log[512] = "";
    size_t o = 0;
    if (cmd->n_args == 1 && cmd->args[0].type == PX_ARG_NIL) goto ok;
    if (cmd->n_args < 2 || cmd->args[0].type != PX_ARG_LIST_BEGIN ||
        cmd->args[cmd->n_args - 1].type != PX_ARG_LIST_END || (cmd->n_args - 2) % 2 != 0 ||
        cmd->n_args - 2 > 60) {
        bad(s, cmd->tag, "Invalid ID parameter list.");
        return;
    }
    for (size_t i = 1; i + 1 < cmd->n_args; i++) {
        const struct px_arg *a = &cmd->args[i];
        if (!(a->type == PX_ARG_STRING || (i % 2 == 0 && a->type == PX_ARG_NIL))) {
            bad(s, cmd->tag, "Invalid ID parameter list.");
            return;
        }
        char v[80];
        sanitize(v, sizeof(v), a->s ? a->s : "NIL", a->s ? (a->len > 64 ? 64 : a->len) : 3);
        int w = snprintf(log + o, sizeof(log) - o, "%s%s", i % 2 ? (o ? " " : "") : "=", v);
        if (w < 0 || (size_t)w >= sizeof(log) - o) break;
        o += (size_t)w;
    }
    cf_info("imap %s: client ID %s", s->peer, log);
ok:
    outf(s, "* ID (\"name\" \"Coffer\")\r\n%s OK ID completed.\r\n", cmd->tag);
}

/* Handle one complete IMAP command. Returns 1 to stop processing input
 * (login started, STARTTLS, closing), 0 to go on. */
static int imap_command(struct px_session *s, char *raw, size_t rawlen)
{
    struct px_preauth *pa = s->pa;
    struct px_imap_cmd cmd;
    const char *err;
    char caps[200];

    if (rawlen <= 2 && (raw[0] == '\r' || raw[0] == '\n')) return 0; /* empty line */
    if (++pa->ncommands > sconf(s)->max_preauth_commands) {
        bye_close(s, "Too many commands before login.", "", "too many commands");
        return 1;
    }
    if (px_imap_tokenize(raw, rawlen, &cmd, &err) < 0) return bad(s, cmd.tag, err) ? 1 : 0;
    snprintf(pa->tag, sizeof(pa->tag), "%s", cmd.tag);
    const char *n = cmd.name;
    if (strcmp(n, "CAPABILITY") == 0 && cmd.n_args == 0) {
        imap_caps(s, caps, sizeof(caps));
        outf(s, "* CAPABILITY %s\r\n%s OK CAPABILITY completed.\r\n", caps, cmd.tag);
        return 0;
    }
    if (strcmp(n, "NOOP") == 0 && cmd.n_args == 0) {
        outf(s, "%s OK NOOP completed.\r\n", cmd.tag);
        return 0;
    }
    if (strcmp(n, "LOGOUT") == 0 && cmd.n_args == 0) {
        outf(s, "* BYE Logging out.\r\n%s OK LOGOUT completed.\r\n", cmd.tag);
        close_client(s, "logout");
        return 1;
    }
    if (strcmp(n, "ID") == 0) {
        imap_id(s, &cmd);
        return cf_conn_is_closing(s->client);
    }
    if (strcmp(n, "STARTTLS") == 0 && cmd.n_args == 0) {
        if (cf_conn_is_tls(s->client) || starttls_ctx(s) == NULL)
            return bad(s, cmd.tag, "STARTTLS is not available here.") ? 1 : 0;
        outf(s, "%s OK Begin TLS negotiation now.\r\n", cmd.tag);
        cf_conn_starttls(s->client, starttls_ctx(s));
        px_imap_parser_reset(pa->parser);
        return 1;
    }
    if (strcmp(n, "LOGIN") == 0) {
        if (cmd.n_args != 2 || !px_arg_is_astring(&cmd.args[0]) || !px_arg_is_astring(&cmd.args[1]))
            return bad(s, cmd.tag, "LOGIN needs a user name and a password.") ? 1 : 0;
        if (!plaintext_ok(s)) {
            plaintext_refused(s, cmd.args[0].s, cmd.args[0].len);
            return 0;
        }
        if (take_credentials(s, "", 0, cmd.args[0].s, cmd.args[0].len, cmd.args[1].s,
                             cmd.args[1].len) < 0) {
            outf(s, "%s NO [AUTHENTICATIONFAILED] Invalid credentials.\r\n", cmd.tag);
            return 0;
        }
        OPENSSL_cleanse(raw, rawlen);
        login_start(s);
        return 1;
    }
    if (strcmp(n, "AUTHENTICATE") == 0) {
        if (cmd.n_args < 1 || cmd.n_args > 2 || cmd.args[0].type != PX_ARG_ATOM ||
            (cmd.n_args == 2 && cmd.args[1].type != PX_ARG_ATOM))
            return bad(s, cmd.tag, "AUTHENTICATE needs a mechanism.") ? 1 : 0;
        if (!(cmd.args[0].len == 5 && strncasecmp(cmd.args[0].s, "PLAIN", 5) == 0)) {
            outf(s, "%s NO [CANNOT] Unsupported authentication mechanism.\r\n", cmd.tag);
            return 0;
        }
        if (!plaintext_ok(s)) {
            plaintext_refused(s, "", 0);
            return 0;
        }
        if (cmd.n_args == 1) {
            pa->sasl_wait = 1;
            outf(s, "+ \r\n");
            return 0;
        }
        if (sasl_plain(s, cmd.args[1].s, cmd.args[1].len) < 0) {
            OPENSSL_cleanse(raw, rawlen);
            return bad(s, cmd.tag, "Invalid SASL PLAIN response.") ? 1 : 0;
        }
        OPENSSL_cleanse(raw, rawlen);
        login_start(s);
        return 1;
    }
    return bad(s, cmd.tag, "Unknown command or not allowed before login.") ? 1 : 0;
}

static size_t imap_on_read(struct px_session *s, const char *buf, size_t len)
{
    struct px_preauth *pa = s->pa;
    size_t used = 0;
    while (used < len && s->state == ST_PREAUTH && !cf_conn_is_closing(s->client)) {
        if (pa->sasl_wait) {
            size_t ll, u;
            int r = px_find_line(buf + used, len - used, sconf(s)->max_line, &ll, &u);
            if (r == 0) break;
            if (r < 0) {
                bye_close(s, "Line too long.", "", "line too long");
                return len;
            }
            const char *line = buf + used;
            used += u;
            pa->sasl_wait = 0;
            if (ll == 1 && line[0] == '*') {
                outf(s, "%s BAD Authentication cancelled.\r\n", pa->tag);
                continue;
            }
            if (sasl_plain(s, line, ll) < 0) {
                if (bad(s, pa->tag, "Invalid SASL PLAIN response.")) return len;
                continue;
            }
            login_start(s);
            return used;
        }
        size_t u = 0;
        enum px_imap_rc rc = px_imap_feed(pa->parser, buf + used, len - used, &u);
        used += u;
        char tag[PX_MAX_TAG + 1], msg[160];
        switch (rc) {
        case PX_IMAP_MORE:
            return used;
        case PX_IMAP_CONTINUE:
            outf(s, "+ Ready for literal data\r\n");
            break;
        case PX_IMAP_BAD_LITERAL:
            px_imap_tag(pa->parser, tag, sizeof(tag));
            snprintf(msg, sizeof(msg), "%s.", px_imap_error(pa->parser));
            if (bad(s, tag, msg)) return len;
            break;
        case PX_IMAP_FATAL:
            px_imap_tag(pa->parser, tag, sizeof(tag));
            outf(s, "%s BAD %s.\r\n", tag, px_imap_error(pa->parser));
            bye_close(s, "Protocol error.", "", px_imap_error(pa->parser));
            return len;
        case PX_IMAP_DONE: {
            size_t rl;
            char *raw = px_imap_raw(pa->parser, &rl);
            if (imap_command(s, raw, rl)) return used;
            break;
        }
        }
    }
    return used;
}

/* ---- POP3 pre-auth ---- */

static int pop3_line(struct px_session *s, const char *line, size_t len)
{
    struct px_preauth *pa = s->pa;
    struct px_pop3_cmd cmd;

    if (++pa->ncommands > sconf(s)->max_preauth_commands) {
        bye_close(s, "", "[SYS/TEMP] Too many commands before login.", "too many commands");
        return 1;
    }
    if (pa->sasl_wait) {
        pa->sasl_wait = 0;
        if (len == 1 && line[0] == '*') {
            outf(s, "-ERR [AUTH] Authentication cancelled.\r\n");
            return 0;
        }
        if (sasl_plain(s, line, len) < 0) return bad(s, "", "[AUTH] Invalid SASL PLAIN response.");
        login_start(s);
        return 1;
    }
    if (px_pop3_parse(line, len, &cmd) < 0) return bad(s, "", "Invalid command.") ? 1 : 0;
    const char *n = cmd.name;
    if (strcmp(n, "CAPA") == 0) {
        int pt = plaintext_ok(s);
        outf(s,
             "+OK Capability list follows\r\nTOP\r\nUIDL\r\nRESP-CODES\r\nAUTH-RESP-CODE\r\n"
             "PIPELINING\r\n%s%sIMPLEMENTATION Coffer\r\n.\r\n",
             pt ? "USER\r\nSASL PLAIN\r\n" : "",
             !cf_conn_is_tls(s->client) && starttls_ctx(s) ? "STLS\r\n" : "");
        return 0;
    }
    if (strcmp(n, "QUIT") == 0) {
        outf(s, "+OK Bye.\r\n");
        close_client(s, "quit");
        return 1;
    }
    if (strcmp(n, "NOOP") == 0) {
        outf(s, "+OK\r\n");
        return 0;
    }
    if (strcmp(n, "STLS") == 0) {
        if (cf_conn_is_tls(s->client) || starttls_ctx(s) == NULL)
            return bad(s, "", "STLS is not available here.") ? 1 : 0;
        outf(s, "+OK Begin TLS negotiation.\r\n");
        cf_conn_starttls(s->client, starttls_ctx(s));
        pa->have_user = 0;
        return 1;
    }
    if (strcmp(n, "USER") == 0) {
        if (!plaintext_ok(s)) {
            plaintext_refused(s, cmd.arg, cmd.arg_len);
            return 0;
        }
        if (cmd.arg_len == 0 || cmd.arg_len >= sizeof(pa->user) || memchr(cmd.arg, 0, cmd.arg_len))
            return bad(s, "", "USER needs a name.") ? 1 : 0;
        memcpy(pa->user, cmd.arg, cmd.arg_len);
        pa->user[cmd.arg_len] = '\0';
        pa->user_len = cmd.arg_len;
        pa->have_user = 1;
        outf(s, "+OK\r\n");
        return 0;
    }
    if (strcmp(n, "PASS") == 0) {
        if (!plaintext_ok(s)) {
            plaintext_refused(s, pa->user, pa->have_user ? pa->user_len : 0);
            return 0;
        }
        if (!pa->have_user) return bad(s, "", "USER first.") ? 1 : 0;
        char user[256];
        size_t ul = pa->user_len;
        memcpy(user, pa->user, ul);
        if (take_credentials(s, "", 0, user, ul, cmd.arg, cmd.arg_len) < 0)
            return bad(s, "", "[AUTH] Invalid credentials.") ? 1 : 0;
        login_start(s);
        return 1;
    }
    if (strcmp(n, "AUTH") == 0) {
        if (cmd.arg_len == 0) {
            outf(s, "+OK\r\nPLAIN\r\n.\r\n");
            return 0;
        }
        const char *sp = memchr(cmd.arg, ' ', cmd.arg_len);
        size_t ml = sp ? (size_t)(sp - cmd.arg) : cmd.arg_len;
        if (!(ml == 5 && strncasecmp(cmd.arg, "PLAIN", 5) == 0)) {
            outf(s, "-ERR Unsupported authentication mechanism.\r\n");
            return 0;
        }
        if (!plaintext_ok(s)) {
            plaintext_refused(s, "", 0);
            return 0;
        }
        if (sp == NULL) {
            pa->sasl_wait = 1;
            outf(s, "+ \r\n");
            return 0;
        }
        const char *ir = sp + 1;
        size_t il = cmd.arg_len - ml - 1;
        if (sasl_plain(s, ir, il) < 0) return bad(s, "", "[AUTH] Invalid SASL PLAIN response.");
        login_start(s);
        return 1;
    }
    return bad(s, "", "Unknown command or not allowed before login.") ? 1 : 0;
}

static size_t pop3_on_read(struct px_session *s, const char *buf, size_t len)
{
    size_t used = 0;
    while (used < len && s->state == ST_PREAUTH && !cf_conn_is_closing(s->client)) {
        size_t ll, u;
        int r = px_find_line(buf + used, len - used, sconf(s)->max_line, &ll, &u);
        if (r == 0) break;
        if (r < 0) {
            bye_close(s, "", "Line too long.", "line too long");
            return len;
        }
        const char *line = buf + used;
        used += u;
        if (ll == 0) continue;
        /* the line is copied out of the conn buffer before a login wipes it */
        if (pop3_line(s, line, ll)) return used;
    }
    return used;
}

/* ---- client connection ---- */

static size_t cl_on_read(struct cf_conn *c, void *data, const char *buf, size_t len)
{
    struct px_session *s = data;
    (void)c;
    switch (s->state) {
    case ST_SPLICE:
        return splice_forward(s, s->backend, 0, buf, len);
    case ST_PREAUTH:
        return s->proto == PX_IMAP ? imap_on_read(s, buf, len) : pop3_on_read(s, buf, len);
    case ST_CLOSING:
        return len;
    default:
        cf_conn_pause_read(s->client); /* LOGIN / DELAY: keep input for later */
        s->client_paused = 1;
        return 0;
    }
}

static void client_process_resume(struct px_session *s)
{
    s->client_paused = 0;
    cf_conn_resume_read(s->client);
}

static void cl_on_drain(struct cf_conn *c, void *data)
{
    struct px_session *s = data;
    (void)c;
    if (s->state != ST_SPLICE || !s->backend_paused || s->backend == NULL) return;
    if (cf_conn_out_pending(s->client) < sconf(s)->splice_buffer) {
        s->backend_paused = 0;
        cf_conn_resume_read(s->backend);
    } else {
        cf_conn_want_drain(s->client);
    }
}

static void cl_on_timeout(struct cf_conn *c, void *data)
{
    struct px_session *s = data;
    (void)c;
    if (s->state == ST_SPLICE && s->proto == PX_IMAP && s->ds.at_bol && !s->ds.lit_left &&
        !s->ds.saw_bye)
        outf(s, "* BYE Autologout; idle for too long.\r\n");
    else if (s->state != ST_SPLICE && s->proto == PX_IMAP)
        outf(s, "* BYE Autologout; idle for too long.\r\n");
}

static void cl_on_close(struct cf_conn *c, void *data, const char *reason)
{
    struct px_session *s = data;
    (void)c;
    struct px_server *srv = s->srv;
    if (s->state == ST_SPLICE || s->user[0])
        cf_info("%s %s: user \"%s\" session closed (%s); %llu bytes up, %llu down", proto_name(s),
                s->peer, s->user, reason, (unsigned long long)s->up, (unsigned long long)s->down);
    else
        cf_debug("%s %s: closed (%s)", proto_name(s), s->peer, reason);
    if (s->state == ST_SPLICE) srv->n_spliced--;
    s->state = ST_CLOSING;
    s->client = NULL;
    if (s->counted) {
        srv->n_conns--;
        px_conncount_dec(srv->conns, &s->caddr);
        s->counted = 0;
    }
    if (s->listed) {
        if (s->prev)
            s->prev->next = s->next;
        else
            srv->sessions = s->next;
        if (s->next) s->next->prev = s->prev;
        s->listed = 0;
    }
    if (s->backend) {
        struct cf_conn *b = s->backend;
        s->backend = NULL;
        cf_conn_close(b, 1, "client closed");
    }
    preauth_free(s);
    session_unref(s);
}

static const struct cf_conn_ops client_ops = {
    .on_read = cl_on_read,
    .on_drain = cl_on_drain,
    .on_timeout = cl_on_timeout,
    .on_close = cl_on_close,
};

static void refuse(struct px_session *s, const char *imap_text, const char *pop3_text,
                   const char *why)
{
    cf_notice("%s %s: connection refused: %s", proto_name(s), s->peer, why);
    if (s->proto == PX_IMAP)
        outf(s, "* BYE %s\r\n", imap_text);
    else
        outf(s, "-ERR %s\r\n", pop3_text);
    s->state = ST_CLOSING;
    /* on implicit TLS the conn finishes the handshake first (within its
     * close cap), so the reply still reaches the client */
    cf_conn_close(s->client, 1, "refused");
}

void px_session_accept(struct px_server *srv, uv_stream_t *server, int kind)
{
    const struct px_conf *conf = srv->conf;
    int implicit = kind == PX_L_IMAPS || kind == PX_L_POP3S;
    struct px_session *s = calloc(1, sizeof(*s));
    if (s == NULL) {
        struct cf_conn *c = cf_conn_accept(srv->loop, server, NULL, &client_ops, NULL);
        cf_conn_close(c, 0, "out of memory");
        return;
    }
    s->srv = srv;
    s->kind = kind;
    s->proto = (kind == PX_L_IMAP || kind == PX_L_IMAPS) ? PX_IMAP : PX_POP3;
    s->tls = px_tls_ref(srv->tls);
    s->state = ST_PREAUTH;
    s->holds = 1;
    s->client = cf_conn_accept(srv->loop, server, implicit ? px_tls_server(s->tls, kind) : NULL,
                               &client_ops, s);
    if (s->client == NULL) {
        px_tls_unref(&s->tls);
        free(s);
        return;
    }
    snprintf(s->peer, sizeof(s->peer), "%s", cf_conn_peer(s->client));
    s->peer_port = cf_conn_peer_port(s->client);
    if (px_addr_parse(s->peer, &s->addr) < 0) memset(&s->addr, 0, sizeof(s->addr));
    s->caddr = s->addr;
    px_addr_mask(&s->caddr, 32, conf->throttle.v6_prefix);

    char t1[200], t2[200];
    if (srv->stopping) {
        refuse(s, "[UNAVAILABLE] Server shutting down.", "[SYS/TEMP] Server shutting down.",
               "shutting down");
        return;
    }
    if (srv->n_conns >= conf->max_connections) {
        refuse(s, "[UNAVAILABLE] Too many connections; try again later.",
               "[SYS/TEMP] Too many connections; try again later.", "limits.max_connections");
        return;
    }
    int exempt = px_throttle_exempt(srv->throttle, &s->addr);
    if (!exempt && px_conncount_get(srv->conns, &s->caddr) >= conf->max_connections_per_ip) {
        refuse(s, "[UNAVAILABLE] Too many connections from your address.",
               "[SYS/TEMP] Too many connections from your address.",
               "limits.max_connections_per_ip");
        return;
    }
    uint64_t left = px_throttle_blocked(srv->throttle, &s->addr, uv_now(srv->loop));
    if (left) {
        snprintf(t1, sizeof(t1),
                 "[UNAVAILABLE] Too many failed logins from your address; try again in %llu "
                 "seconds.",
                 (unsigned long long)(left + 999) / 1000);
        snprintf(t2, sizeof(t2), "[SYS/TEMP]%s", t1 + strlen("[UNAVAILABLE]"));
        refuse(s, t1, t2, "throttle: address blocked after failed logins");
        return;
    }
    struct px_preauth *pa = calloc(1, sizeof(*pa));
    struct px_limits lim = {conf->max_line, conf->max_literal,
                            conf->max_line + 2 * conf->max_literal + 64};
    if (pa == NULL || (s->proto == PX_IMAP && (pa->parser = px_imap_parser_new(&lim)) == NULL)) {
        if (pa) px_imap_parser_free(&pa->parser);
        free(pa);
        refuse(s, "[UNAVAILABLE] Out of memory.", "[SYS/TEMP] Out of memory.", "out of memory");
        return;
    }
    pa->s = s;
    uv_timer_init(srv->loop, &pa->timer);
    uv_timer_init(srv->loop, &pa->deadline);
    pa->timer.data = pa->deadline.data = pa;
    pa->timers_open = 2;
    s->holds++; /* released when both timers closed */
    s->pa = pa;
    uv_timer_start(&pa->deadline, deadline_cb, conf->preauth_timeout_ms, 0);

    s->counted = 1;
    srv->n_conns++;
    px_conncount_inc(srv->conns, &s->caddr);
    s->listed = 1;
    s->next = srv->sessions;
    if (s->next) s->next->prev = s;
    srv->sessions = s;

    cf_conn_set_max_unconsumed(s->client, conf->max_line + 16);
    cf_debug("%s %s: connected%s", proto_name(s), s->peer, implicit ? " (TLS)" : "");
    if (s->proto == PX_IMAP) {
        char caps[200];
        imap_caps(s, caps, sizeof(caps));
        if (implicit) {
            /* capabilities depend on TLS being up: it will be */
            snprintf(caps, sizeof(caps), "IMAP4rev1 SASL-IR ID ENABLE IDLE LITERAL+ AUTH=PLAIN");
        }
        outf(s, "* OK [CAPABILITY %s] Coffer IMAP proxy ready.\r\n", caps);
    } else {
        outf(s, "+OK Coffer POP3 proxy ready.\r\n");
    }
}

void px_session_close_all(struct px_server *srv, const char *reason)
{
    for (struct px_session *s = srv->sessions; s; s = s->next) {
        if (s->state == ST_CLOSING) continue;
        if (s->state == ST_SPLICE) {
            if (s->proto == PX_IMAP && s->ds.at_bol && !s->ds.lit_left && !s->ds.saw_bye)
                outf(s, "* BYE [UNAVAILABLE] %s\r\n", reason);
            s->state = ST_CLOSING;
            cf_conn_close(s->client, 1, reason);
            continue;
        }
        char t[200];
        snprintf(t, sizeof(t), "[SYS/TEMP] %s", reason);
        char t1[200];
        snprintf(t1, sizeof(t1), "[UNAVAILABLE] %s", reason);
        bye_close(s, t1, t, reason);
    }
}
