/* imap_session: IMAP4rev1 connection glue (RFC 3501): parser driving,
 * dispatch table, states, the commands that are not about mailboxes or
 * messages (CAPABILITY, STARTTLS, LOGIN, AUTHENTICATE, LOGOUT, NOOP, ID,
 * ENABLE, NAMESPACE, SELECT/EXAMINE, CLOSE, UNSELECT, CHECK, IDLE) and the
 * pending-update queue. See imap_internal.h for the shared contracts.
 *
 * Memory/lifetime: a session is allocated in imap_accept and freed after
 * the connection's on_close. When the connection closes while a command is
 * waiting on something external (a Raft commit), the session stays
 * allocated with s->conn = NULL until that command calls imap_cmd_done;
 * imap_cmd_done then frees it, so callers must not touch `s` after calling
 * imap_cmd_done. A command waiting for output drain (s->resume) is
 * abandoned through s->resume_free instead; an auth check is cancelled.
 *
 * \Recent: kept per session, not in the store. A message is \Recent for
 * this session when it arrived while the mailbox was selected here (uid >=
 * the UIDNEXT seen at SELECT time), so SELECT always reports "* 0 RECENT".
 * RFC 3501 allows this (only one session "sees" a message as recent; with
 * several nodes there is no cheap global claim) and IMAP4rev2 drops
 * \Recent altogether.
 */
#include <stdarg.h>
#include <stddef.h>
#include <arpa/inet.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "cf_log.h"
#include "imap_internal.h"
#include "listeners.h"

#define PREAUTH_MAX_LINE 8192
#define PREAUTH_MAX_LITERAL 8192
#define PREAUTH_MAX_BAD 10
#define INBUF_MAX (64u * 1024)
#define MAX_AUTH_FAILURES 5
#define ID_MAX_PAIRS 30

#define STB_NOTAUTH 1u
#define STB_AUTH 2u
#define STB_SEL 4u
#define STB_ANY (STB_NOTAUTH | STB_AUTH | STB_SEL)
#define STB_AUTHSEL (STB_AUTH | STB_SEL)

/* Session plus state private to this file. `s` must stay first: the
 * session pointer handed around is &priv->s. */
struct imap_priv {
    struct imap_session s;
    uv_timer_t keepalive; /* IDLE "* OK Still here" */
    int counted;          /* counted in node->imap_sessions/total_sessions */
    int closed;           /* conn gone (s->conn == NULL) */
    int free_pending;     /* closed while a command runs: free on cmd_done */
    int in_loop;          /* process_input running */
    int read_paused;
    int allow_expunge;  /* EXPUNGE responses allowed for the running command */
    int greet_pending;  /* implicit TLS: greet once the handshake is done */
    const char *refuse; /* BYE text sent instead of the greeting */
    char refuse_buf[192];
    unsigned tls_gen;   /* bumped on STARTTLS: the rest of the read is dropped */
    int in_auth_call;   /* inside auth_verify() */
    int auth_sync_done; /* auth callback ran inside auth_verify() */
    unsigned auth_failures;
    const char *bye_after; /* imap_cmd_done: send this BYE and close after the reply */
    char *inbuf;           /* unparsed input: grown on demand up to INBUF_MAX, freed
                              whenever it is empty and no command runs (idle sessions
                              hold no input buffer) */
    size_t inlen, incap;
    struct imap_command uidcmd; /* UID <cmd>: args shifted by one */
    char uidname[16];
};

#define PRIV(sp) ((struct imap_priv *)(void *)(sp))

static struct imap_session *session_list;

static const struct imap_parser_limits preauth_limits = {
    .max_line = PREAUTH_MAX_LINE,
    .max_literal = PREAUTH_MAX_LITERAL,
    .max_depth = 8,
    .max_args = 256,
};

static void process_input(struct imap_session *s);
static void unselect(struct imap_session *s);

/* ---- small helpers ---- */

void u32vec_push(struct u32vec *a, uint32_t x)
{
    if (a->n == a->cap) {
        size_t ncap = a->cap ? a->cap * 2 : 16;
        uint32_t *nv = realloc(a->v, ncap * sizeof(*nv));
        if (nv == NULL) {
            cf_crit("imap: out of memory");
            abort();
        }
        a->v = nv;
        a->cap = ncap;
    }
    a->v[a->n++] = x;
}

void u32vec_free(struct u32vec *a)
{
    free(a->v);
    a->v = NULL;
    a->n = a->cap = 0;
}

static int cmp_u32(const void *a, const void *b)
{
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return x < y ? -1 : x > y;
}

/* Sort and drop duplicates. */
static void u32vec_sort_unique(struct u32vec *a)
{
    if (a->n < 2) return;
    qsort(a->v, a->n, sizeof(uint32_t), cmp_u32);
    size_t o = 1;
    for (size_t i = 1; i < a->n; i++)
        if (a->v[i] != a->v[o - 1]) a->v[o++] = a->v[i];
    a->n = o;
}

/* Replace control and 8-bit characters so text is safe in a response or a
 * log line. */
static void sanitize(char *p)
{
    for (; *p; p++)
        if ((unsigned char)*p < 0x20 || (unsigned char)*p >= 0x7f) *p = '?';
}

static void out(struct imap_session *s, const char *p, size_t n)
{
    if (s->conn != NULL && n > 0) cf_conn_write(s->conn, p, n);
}

static void outs(struct imap_session *s, const char *p)
{
    out(s, p, strlen(p));
}

static void outf(struct imap_session *s, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));
static void outf(struct imap_session *s, const char *fmt, ...)
{
    char buf[1024];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(buf, sizeof(buf), fmt, ap);
    va_end(ap);
    if (n < 0) return;
    if ((size_t)n >= sizeof(buf)) n = sizeof(buf) - 1;
    out(s, buf, (size_t)n);
}

static int plaintext_ok(const struct imap_session *s)
{
    return s->tls || s->node->cfg->allow_plaintext;
}

/* Capability list (without the leading "CAPABILITY"). */
static void capabilities(const struct imap_session *s, char *buf, size_t len)
{
    snprintf(buf, len,
             "IMAP4rev1 LITERAL+ ID ENABLE IDLE NAMESPACE UNSELECT UIDPLUS MOVE CHILDREN "
             "LIST-EXTENDED SPECIAL-USE CREATE-SPECIAL-USE%s%s%s%s",
             s->state == IMAP_S_NOTAUTH ? " SASL-IR" : "",
             s->state == IMAP_S_NOTAUTH && !s->tls && s->node->tls ? " STARTTLS" : "",
             s->state == IMAP_S_NOTAUTH && !plaintext_ok(s) ? " LOGINDISABLED" : "",
             s->state == IMAP_S_NOTAUTH && plaintext_ok(s) ? " AUTH=PLAIN" : "");
}

static void update_read(struct imap_session *s)
{
    struct imap_priv *ps = PRIV(s);
    if (s->conn == NULL) return;
    int want_pause = (s->busy && !s->idling && !s->authenticating) || ps->inlen >= INBUF_MAX;
    if (want_pause && !ps->read_paused) {
        cf_conn_pause_read(s->conn);
        ps->read_paused = 1;
    } else if (!want_pause && ps->read_paused) {
        ps->read_paused = 0;
        cf_conn_resume_read(s->conn);
    }
}

static void consume(struct imap_priv *ps, size_t n)
{
    if (n >= ps->inlen) {
        ps->inlen = 0;
    } else if (n > 0) {
        memmove(ps->inbuf, ps->inbuf + n, ps->inlen - n);
        ps->inlen -= n;
    }
}

/* Make room for `need` bytes of input (need <= INBUF_MAX). 0 or -1. */
static int inbuf_reserve(struct imap_priv *ps, size_t need)
{
    if (need <= ps->incap) return 0;
    size_t cap = ps->incap ? ps->incap : 1024;
    while (cap < need)
        cap *= 2;
    if (cap > INBUF_MAX) cap = INBUF_MAX;
    char *nb = realloc(ps->inbuf, cap);
    if (nb == NULL) return -1;
    ps->inbuf = nb;
    ps->incap = cap;
    return 0;
}

/* Between commands with nothing buffered: give back the input buffer and
 * the parser's per-command memory, so an idle session costs little. */
static void compact_idle(struct imap_session *s)
{
    struct imap_priv *ps = PRIV(s);
    if (s->busy || s->idling || s->authenticating || ps->inlen != 0) return;
    free(ps->inbuf);
    ps->inbuf = NULL;
    ps->incap = 0;
    if (s->parser != NULL) imap_parser_compact(s->parser);
}

static uint64_t bad_limit(const struct imap_session *s)
{
    uint64_t lim = s->node->cfg->max_bad_commands;
    if (lim == 0) lim = 20;
    if (s->state == IMAP_S_NOTAUTH && lim > PREAUTH_MAX_BAD) lim = PREAUTH_MAX_BAD;
    return lim;
}

/* Count one BAD reply; closes the connection over the limit. */
static void count_bad(struct imap_session *s)
{
    s->bad_commands++;
    if (s->bad_commands >= bad_limit(s) && s->conn != NULL) {
        outs(s, "* BYE Too many invalid commands.\r\n");
        cf_conn_close(s->conn, 1, "too many invalid commands");
    }
}

/* ---- session lifetime ---- */

static void keepalive_closed(uv_handle_t *h)
{
    free(h->data);
}

static void free_session(struct imap_session *s)
{
    struct imap_priv *ps = PRIV(s);
    unselect(s);
    imap_parser_destroy(&s->parser);
    free(s->tag);
    free(s->username);
    free(ps->inbuf);
    uv_timer_stop(&ps->keepalive);
    ps->keepalive.data = ps;
    uv_close((uv_handle_t *)&ps->keepalive, keepalive_closed);
}

static void list_remove(struct imap_session *s)
{
    if (s->prev)
        s->prev->next = s->next;
    else if (session_list == s)
        session_list = s->next;
    if (s->next) s->next->prev = s->prev;
    s->next = s->prev = NULL;
}

static void on_close(struct cf_conn *c, void *data, const char *reason)
{
    (void)c;
    struct imap_session *s = data;
    struct imap_priv *ps = PRIV(s);
    cf_debug("imap %s: closed (%s)", s->peer, reason ? reason : "");
    ps->closed = 1;
    s->conn = NULL;
    list_remove(s);
    if (ps->counted) {
        s->node->imap_sessions--;
        s->node->total_sessions--;
        ps->counted = 0;
    }
    uv_timer_stop(&ps->keepalive);
    /* The watcher must not fire for a dead session; the view itself stays
     * until the session is freed (a running handler may still use it). */
    if (s->state == IMAP_S_SELECTED && s->sel.watcher.on_change != NULL) {
        store_unwatch(s->node->store, &s->sel.watcher);
        s->sel.watcher.on_change = NULL;
    }
    if (s->auth_req != NULL) {
        auth_cancel(s->auth_req);
        s->auth_req = NULL;
        s->busy = 0;
    }
    if (s->idling || s->authenticating) {
        s->idling = s->authenticating = 0;
        s->busy = 0;
    }
    if (s->resume != NULL) {
        if (s->resume_free != NULL) s->resume_free(s->resume_state);
        s->resume = NULL;
        s->resume_state = NULL;
        s->resume_free = NULL;
        s->busy = 0;
    }
    if (s->busy)
        ps->free_pending = 1; /* freed by imap_cmd_done */
    else
        free_session(s);
}

static void greet(struct imap_session *s)
{
    struct imap_priv *ps = PRIV(s);
    if (ps->refuse != NULL) {
        outf(s, "* BYE %s\r\n", ps->refuse);
        cf_conn_close(s->conn, 1, "refused");
        return;
    }
    char caps[512];
    capabilities(s, caps, sizeof(caps));
    outf(s, "* OK [CAPABILITY %s] Coffer IMAP4rev1 ready.\r\n", caps);
}

static void on_tls_ready(struct cf_conn *c, void *data)
{
    (void)c;
    struct imap_session *s = data;
    struct imap_priv *ps = PRIV(s);
    s->tls = 1;
    if (ps->greet_pending) {
        ps->greet_pending = 0;
        greet(s);
    }
}

static void on_timeout(struct cf_conn *c, void *data)
{
    (void)c;
    struct imap_session *s = data;
    outs(s, "* BYE Disconnected for inactivity.\r\n");
}

static void on_drain(struct cf_conn *c, void *data)
{
    (void)c;
    struct imap_session *s = data;
    if (s->busy && s->resume != NULL) s->resume(s);
}

static size_t on_read(struct cf_conn *c, void *data, const char *buf, size_t len)
{
    (void)c;
    struct imap_session *s = data;
    struct imap_priv *ps = PRIV(s);
    size_t total = 0;
    unsigned gen = ps->tls_gen;
    if (ps->closed || s->state == IMAP_S_LOGOUT) return len;
    while (total < len) {
        size_t room = INBUF_MAX - ps->inlen;
        size_t n = len - total < room ? len - total : room;
        if (n == 0) break;
        if (inbuf_reserve(ps, ps->inlen + n) < 0) {
            cf_conn_close(s->conn, 0, "out of memory");
            return len;
        }
        memcpy(ps->inbuf + ps->inlen, buf + total, n);
        ps->inlen += n;
        total += n;
        process_input(s);
        /* STARTTLS ran: whatever else arrived in plaintext is dropped. */
        if (ps->tls_gen != gen) return len;
        if (ps->closed || s->conn == NULL || cf_conn_is_closing(s->conn)) return len;
    }
    update_read(s);
    return total;
}

static const struct cf_conn_ops imap_conn_ops = {
    .on_read = on_read,
    .on_drain = on_drain,
    .on_tls_ready = on_tls_ready,
    .on_timeout = on_timeout,
    .on_close = on_close,
};

void imap_accept(struct node *n, uv_stream_t *server, int implicit_tls)
{
    struct imap_priv *ps = calloc(1, sizeof(*ps));
    if (ps == NULL) return;
    struct imap_session *s = &ps->s;
    s->node = n;
    uv_timer_init(n->loop, &ps->keepalive);
    ps->keepalive.data = ps;
    s->parser = imap_parser_create(&preauth_limits);
    if (s->parser == NULL) goto fail;
    SSL_CTX *ctx = implicit_tls == LISTEN_PROXY ? n->proxy_tls : implicit_tls ? n->tls : NULL;
    if (implicit_tls && ctx == NULL) {
        cf_error("imap: implicit TLS listener without a TLS context");
        goto fail;
    }
    s->conn = cf_conn_accept(n->loop, server, ctx, &imap_conn_ops, s);
    if (s->conn == NULL) goto fail;
    s->tls = implicit_tls != LISTEN_PLAIN;
    /* The proxy listener's TLS context requires a client certificate from
     * tls.ca, so a session there that completes its handshake is a proxy. */
    s->trusted_proxy = implicit_tls == LISTEN_PROXY;
    snprintf(s->peer, sizeof(s->peer), "%s", cf_conn_peer(s->conn));
    s->next = session_list;
    if (session_list) session_list->prev = s;
    session_list = s;

    const struct sconf *cfg = n->cfg;
    if (n->stopping)
        ps->refuse = "[UNAVAILABLE] Server shutting down.";
    else if (cfg->max_sessions > 0 && n->total_sessions >= cfg->max_sessions)
        ps->refuse = "[UNAVAILABLE] too many sessions";
    else if (n->rep != NULL && !rep_is_leader(n->rep))
        ps->refuse = node_not_leader_text(n, ps->refuse_buf, sizeof(ps->refuse_buf));
    if (ps->refuse == NULL) {
        ps->counted = 1;
        n->imap_sessions++;
        n->total_sessions++;
        cf_conn_set_idle_timeout(s->conn, cfg->preauth_timeout_ms);
    } else {
        cf_conn_set_idle_timeout(s->conn, 10000);
    }
    cf_debug("imap %s: connected%s", s->peer, implicit_tls ? " (TLS)" : "");
    if (implicit_tls)
        ps->greet_pending = 1;
    else
        greet(s);
    return;
fail:
    imap_parser_destroy(&s->parser);
    free(ps->inbuf);
    ps->inbuf = NULL;
    uv_close((uv_handle_t *)&ps->keepalive, keepalive_closed);
}

void imap_close_all(struct node *n, const char *reason)
{
    char text[256];
    snprintf(text, sizeof(text), "%s", reason ? reason : "Server shutting down.");
    sanitize(text);
    for (struct imap_session *s = session_list; s != NULL; s = s->next) {
        if (s->node != n || s->conn == NULL || cf_conn_is_closing(s->conn)) continue;
        outf(s, "* BYE [UNAVAILABLE] %s\r\n", text);
        cf_conn_close(s->conn, 1, "shutdown");
    }
}

/* ---- completion ---- */

void imap_cmd_done(struct imap_session *s, const char *status, const char *code, const char *fmt,
                   ...)
{
    struct imap_priv *ps = PRIV(s);
    char text[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(text, sizeof(text), fmt, ap);
    va_end(ap);
    sanitize(text);

    s->busy = 0;
    s->cmd = NULL;
    s->resume = NULL;
    s->resume_state = NULL;
    s->resume_free = NULL;
    if (ps->closed) {
        if (ps->free_pending) {
            ps->free_pending = 0;
            free_session(s);
        }
        return;
    }
    if (s->state == IMAP_S_SELECTED) imap_flush_updates(s, ps->allow_expunge);
    const char *tag = s->tag ? s->tag : "*";
    if (code != NULL)
        outf(s, "%s %s [%s] %s\r\n", tag, status, code, text);
    else
        outf(s, "%s %s %s\r\n", tag, status, text);
    if (strcmp(status, "BAD") == 0)
        count_bad(s);
    else
        s->bad_commands = 0;
    free(s->tag);
    s->tag = NULL;
    if (ps->bye_after != NULL && s->conn != NULL) {
        outf(s, "* BYE %s\r\n", ps->bye_after);
        ps->bye_after = NULL;
        cf_conn_close(s->conn, 1, "closing");
        return;
    }
    if (!ps->in_loop) process_input(s);
}

void imap_reply_propose_error(struct imap_session *s, int status)
{
    switch (status) {
    case REP_ENOTLEADER:
        imap_cmd_done(s, "NO", "UNAVAILABLE", "Not the leader, try again later.");
        break;
    case REP_ELEADERSHIPLOST:
        imap_cmd_done(s, "NO", "UNAVAILABLE", "Leadership lost, outcome unknown; try again.");
        break;
    case REP_ESHUTDOWN:
        imap_cmd_done(s, "NO", "UNAVAILABLE", "Server shutting down.");
        break;
    case REP_ETOOBIG:
        imap_cmd_done(s, "NO", "LIMIT", "Request too large.");
        break;
    default:
        imap_cmd_done(s, "NO", "SERVERBUG", "Internal error (%s).", rep_strerror(status));
        break;
    }
}

/* ---- views and updates ---- */

uint32_t imap_msn_of(const struct imap_session *s, uint32_t uid)
{
    size_t lo = 0, hi = s->sel.uids.n;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (s->sel.uids.v[mid] < uid)
            lo = mid + 1;
        else
            hi = mid;
    }
    if (lo < s->sel.uids.n && s->sel.uids.v[lo] == uid) return (uint32_t)(lo + 1);
    return 0;
}

/* Index of the first uid >= uid in the view. */
static size_t lower_bound(const struct imap_session *s, uint32_t uid)
{
    size_t lo = 0, hi = s->sel.uids.n;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (s->sel.uids.v[mid] < uid)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo;
}

int imap_seqset_to_uids(struct imap_session *s, const struct imap_arg *arg, int uid,
                        uint32_t **uids_r, size_t *n_r)
{
    struct imap_seq_range *r = NULL;
    size_t nr = 0;
    const struct u32vec *view = &s->sel.uids;
    struct u32vec res = {0};
    *uids_r = NULL;
    *n_r = 0;
    if (arg == NULL || (arg->type != IMAP_ARG_ATOM && arg->type != IMAP_ARG_QUOTED)) return -1;
    uint32_t star = view->n == 0 ? 0 : (uid ? view->v[view->n - 1] : (uint32_t)view->n);
    size_t max_ranges = arg->len / 2 + 2;
    if (imap_seqset_parse(arg->str, arg->len, star, &r, &nr, max_ranges) < 0) return -1;
    for (size_t i = 0; i < nr; i++) {
        if (uid) {
            for (size_t k = lower_bound(s, r[i].lo); k < view->n && view->v[k] <= r[i].hi; k++)
                u32vec_push(&res, view->v[k]);
        } else {
            /* MSNs beyond the view are ignored (lenient; nothing to act on). */
            uint64_t hi = r[i].hi < view->n ? r[i].hi : view->n;
            for (uint64_t m = r[i].lo ? r[i].lo : 1; m <= hi; m++)
                u32vec_push(&res, view->v[m - 1]);
        }
    }
    free(r);
    u32vec_sort_unique(&res);
    *uids_r = res.v;
    *n_r = res.n;
    return 0;
}

Coffer__UidRange **imap_uid_ranges(const uint32_t *uids, size_t n, size_t *n_ranges_r)
{
    size_t cnt = 0;
    for (size_t i = 0; i < n; i++)
        if (i == 0 || uids[i] != uids[i - 1] + 1) cnt++;
    Coffer__UidRange **r = calloc(cnt ? cnt : 1, sizeof(*r));
    if (r == NULL) goto oom;
    size_t k = 0;
    for (size_t i = 0; i < n; i++) {
        if (i == 0 || uids[i] != uids[i - 1] + 1) {
            r[k] = malloc(sizeof(**r));
            if (r[k] == NULL) goto oom;
            coffer__uid_range__init(r[k]);
            r[k]->lo = r[k]->hi = uids[i];
            k++;
        } else {
            r[k - 1]->hi = uids[i];
        }
    }
    *n_ranges_r = cnt;
    return r;
oom:
    cf_crit("imap: out of memory");
    abort();
}

void imap_uid_ranges_free(Coffer__UidRange **r, size_t n)
{
    if (r == NULL) return;
    for (size_t i = 0; i < n; i++)
        free(r[i]);
    free(r);
}

static void unselect(struct imap_session *s)
{
    struct imap_selected *sel = &s->sel;
    if (sel->watcher.on_change != NULL) store_unwatch(s->node->store, &sel->watcher);
    free(sel->name);
    u32vec_free(&sel->uids);
    u32vec_free(&sel->pend_expunged);
    u32vec_free(&sel->pend_flags);
    memset(sel, 0, sizeof(*sel));
    if (s->state == IMAP_S_SELECTED) s->state = IMAP_S_AUTH;
}

static int collect_new(const struct store_msg *m, void *arg)
{
    struct imap_session *s = arg;
    if (s->sel.uids.n == 0 || m->uid > s->sel.uids.v[s->sel.uids.n - 1])
        u32vec_push(&s->sel.uids, m->uid);
    return 0;
}

void imap_flush_updates(struct imap_session *s, int allow_expunge)
{
    struct imap_selected *sel = &s->sel;
    if (s->state != IMAP_S_SELECTED || s->conn == NULL) return;
    if (sel->gone) {
        /* What Dovecot does when another session deletes the mailbox. */
        outs(s, "* BYE Selected mailbox was deleted, have to disconnect.\r\n");
        unselect(s);
        cf_conn_close(s->conn, 1, "mailbox gone");
        return;
    }
    if (allow_expunge && sel->pend_expunged.n > 0) {
        u32vec_sort_unique(&sel->pend_expunged);
        for (size_t i = 0; i < sel->pend_expunged.n; i++) {
            uint32_t msn = imap_msn_of(s, sel->pend_expunged.v[i]);
            if (msn == 0) continue;
            outf(s, "* %u EXPUNGE\r\n", msn);
            memmove(&sel->uids.v[msn - 1], &sel->uids.v[msn],
                    (sel->uids.n - msn) * sizeof(uint32_t));
            sel->uids.n--;
        }
        sel->pend_expunged.n = 0;
    }
    if (sel->pend_new) {
        sel->pend_new = 0;
        size_t before = sel->uids.n;
        MDB_txn *txn = store_rtxn_begin(s->node->store);
        if (txn != NULL) {
            if (sel->max_uid_known < UINT32_MAX)
                store_msg_foreach(s->node->store, txn, sel->mailbox_id, sel->max_uid_known + 1,
                                  UINT32_MAX, collect_new, s);
            store_rtxn_end(txn);
        }
        if (sel->uids.n > before) {
            sel->max_uid_known = sel->uids.v[sel->uids.n - 1];
            size_t recent = sel->uids.n - lower_bound(s, sel->recent_min_uid);
            outf(s, "* %zu EXISTS\r\n* %zu RECENT\r\n", sel->uids.n, recent);
        }
    }
    if (sel->pend_flags.n > 0) {
        u32vec_sort_unique(&sel->pend_flags);
        MDB_txn *txn = store_rtxn_begin(s->node->store);
        if (txn != NULL) {
            for (size_t i = 0; i < sel->pend_flags.n; i++) {
                uint32_t msn = imap_msn_of(s, sel->pend_flags.v[i]);
                if (msn != 0) imap_write_fetch_flags(s, txn, msn, sel->pend_flags.v[i], 1);
            }
            store_rtxn_end(txn);
        }
        sel->pend_flags.n = 0;
    }
}

static void on_change(struct store_watcher *w, const struct store_change *ch)
{
    struct imap_session *s =
        (struct imap_session *)(void *)((char *)w - offsetof(struct imap_session, sel.watcher));
    struct imap_selected *sel = &s->sel;
    if (PRIV(s)->closed || s->state != IMAP_S_SELECTED || ch->mailbox_id != sel->mailbox_id) return;
    switch (ch->kind) {
    case STORE_CH_APPEND:
        sel->pend_new = 1;
        break;
    case STORE_CH_FLAGS:
        for (size_t i = 0; i < ch->n_uids; i++)
            if (ch->uids[i] <= sel->max_uid_known) u32vec_push(&sel->pend_flags, ch->uids[i]);
        /* Keep the queue bounded while nobody flushes it. */
        if (sel->pend_flags.n > 4096 && sel->pend_flags.n > 2 * sel->uids.n)
            u32vec_sort_unique(&sel->pend_flags);
        break;
    case STORE_CH_EXPUNGE:
        for (size_t i = 0; i < ch->n_uids; i++)
            u32vec_push(&sel->pend_expunged, ch->uids[i]);
        if (sel->pend_expunged.n > 4096 && sel->pend_expunged.n > 2 * sel->uids.n)
            u32vec_sort_unique(&sel->pend_expunged);
        break;
    case STORE_CH_GONE:
        sel->gone = 1;
        break;
    }
    if (s->idling) imap_flush_updates(s, 1);
}

/* ---- simple commands ---- */

static int no_args(struct imap_session *s, struct imap_command *cmd)
{
    if (cmd->n_args == 0) return 1;
    imap_cmd_done(s, "BAD", NULL, "Unexpected arguments.");
    return 0;
}

static void cmd_capability(struct imap_session *s, struct imap_command *cmd, int uid)
{
    (void)uid;
    if (!no_args(s, cmd)) return;
    char caps[512];
    capabilities(s, caps, sizeof(caps));
    outf(s, "* CAPABILITY %s\r\n", caps);
    imap_cmd_done(s, "OK", NULL, "Capability completed.");
}

static void cmd_noop(struct imap_session *s, struct imap_command *cmd, int uid)
{
    (void)uid;
    if (!no_args(s, cmd)) return;
    imap_cmd_done(s, "OK", NULL, "%s completed.", strcmp(cmd->name, "CHECK") ? "NOOP" : "Check");
}

static void cmd_logout(struct imap_session *s, struct imap_command *cmd, int uid)
{
    (void)uid;
    if (!no_args(s, cmd)) return;
    outs(s, "* BYE Logging out\r\n");
    outf(s, "%s OK Logout completed.\r\n", s->tag);
    s->state = IMAP_S_LOGOUT;
    s->busy = 0;
    s->cmd = NULL;
    free(s->tag);
    s->tag = NULL;
    if (s->conn) cf_conn_close(s->conn, 1, "logout");
}

static void cmd_namespace(struct imap_session *s, struct imap_command *cmd, int uid)
{
    (void)uid;
    if (!no_args(s, cmd)) return;
    outs(s, "* NAMESPACE ((\"\" \"/\")) NIL NIL\r\n");
    imap_cmd_done(s, "OK", NULL, "Namespace completed.");
}

static void id_append(char *buf, size_t cap, const struct imap_arg *a)
{
    size_t l = strlen(buf);
    if (l + 4 >= cap) return;
    if (a->type == IMAP_ARG_NIL) {
        snprintf(buf + l, cap - l, "NIL");
        return;
    }
    size_t n = a->len < 64 ? a->len : 64;
    if (n > cap - l - 3) n = cap - l - 3;
    buf[l++] = '"';
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)a->str[i];
        buf[l++] = (c < 0x20 || c >= 0x7f || c == '"') ? '?' : (char)c;
    }
    buf[l++] = '"';
    buf[l] = '\0';
}

/* A trusted proxy passes the client's address as ID "x-originating-ip";
 * only a valid IPv4/IPv6 literal is taken. */
static void id_take_client_address(struct imap_session *s, const struct imap_arg *list)
{
    for (size_t i = 0; i + 1 < list->n_list; i += 2) {
        const struct imap_arg *k = &list->list[i], *v = &list->list[i + 1];
        unsigned char tmp[sizeof(struct in6_addr)];
        if (!imap_arg_eq(k, "x-originating-ip") || !imap_arg_is_string(v)) continue;
        if (v->len == 0 || v->len >= sizeof(s->peer) || memchr(v->str, '\0', v->len)) continue;
        if (inet_pton(AF_INET, v->str, tmp) != 1 && inet_pton(AF_INET6, v->str, tmp) != 1) continue;
        if (s->proxy_peer[0] == '\0') snprintf(s->proxy_peer, sizeof(s->proxy_peer), "%s", s->peer);
        snprintf(s->peer, sizeof(s->peer), "%s", v->str);
        cf_info("imap %s: client address %s passed by trusted proxy", s->proxy_peer, s->peer);
    }
}

static void cmd_id(struct imap_session *s, struct imap_command *cmd, int uid)
{
    (void)uid;
    if (cmd->n_args != 1) {
        imap_cmd_done(s, "BAD", NULL, "Expected one argument.");
        return;
    }
    const struct imap_arg *a = &cmd->args[0];
    if (a->type == IMAP_ARG_LIST) {
        if (a->n_list % 2 != 0 || a->n_list > 2 * ID_MAX_PAIRS) {
            imap_cmd_done(s, "BAD", NULL, "Invalid ID parameter list.");
            return;
        }
        char logbuf[1024] = "";
        for (size_t i = 0; i < a->n_list; i++) {
            const struct imap_arg *it = &a->list[i];
            if (!imap_arg_is_string(it) && !(i % 2 == 1 && it->type == IMAP_ARG_NIL)) {
                imap_cmd_done(s, "BAD", NULL, "Invalid ID parameter list.");
                return;
            }
            size_t l = strlen(logbuf);
            if (l > 0 && l + 2 < sizeof(logbuf)) {
                logbuf[l] = i % 2 ? '=' : ' ';
                logbuf[l + 1] = '\0';
            }
            id_append(logbuf, sizeof(logbuf), it);
        }
        cf_info("imap %s: client ID %s", s->peer, logbuf);
        if (s->trusted_proxy && s->state == IMAP_S_NOTAUTH) id_take_client_address(s, a);
    } else if (a->type != IMAP_ARG_NIL) {
        imap_cmd_done(s, "BAD", NULL, "Invalid ID parameter list.");
        return;
    }
    outs(s, "* ID (\"name\" \"Coffer\" \"version\" \"0.1\")\r\n");
    imap_cmd_done(s, "OK", NULL, "ID completed.");
}

static void cmd_enable(struct imap_session *s, struct imap_command *cmd, int uid)
{
    (void)uid;
    if (cmd->n_args == 0) {
        imap_cmd_done(s, "BAD", NULL, "Missing capability names.");
        return;
    }
    for (size_t i = 0; i < cmd->n_args; i++) {
        if (cmd->args[i].type != IMAP_ARG_ATOM) {
            imap_cmd_done(s, "BAD", NULL, "Invalid capability name.");
            return;
        }
    }
    /* Nothing we support needs enabling yet (no CONDSTORE, QRESYNC,
     * UTF8=ACCEPT or IMAP4rev2): answer with an empty ENABLED list. */
    outs(s, "* ENABLED\r\n");
    imap_cmd_done(s, "OK", NULL, "Enabled.");
}

/* ---- STARTTLS and authentication ---- */

static void cmd_starttls(struct imap_session *s, struct imap_command *cmd, int uid)
{
    (void)uid;
    struct imap_priv *ps = PRIV(s);
    if (!no_args(s, cmd)) return;
    if (s->tls) {
        imap_cmd_done(s, "BAD", NULL, "TLS is already active.");
        return;
    }
    if (s->node->tls == NULL) {
        imap_cmd_done(s, "NO", NULL, "TLS is not available.");
        return;
    }
    outf(s, "%s OK Begin TLS negotiation now.\r\n", s->tag);
    free(s->tag);
    s->tag = NULL;
    s->busy = 0;
    s->cmd = NULL;
    /* CVE-2011-0411: drop every byte of plaintext already received. */
    imap_parser_reset(s->parser);
    ps->inlen = 0;
    ps->tls_gen++;
    if (cf_conn_starttls(s->conn, s->node->tls) < 0) {
        cf_conn_close(s->conn, 0, "starttls failed");
        return;
    }
    s->tls = 1;
}

static void auth_done(void *arg, const struct auth_reply *reply)
{
    struct imap_session *s = arg;
    struct imap_priv *ps = PRIV(s);
    s->auth_req = NULL;
    if (ps->in_auth_call) ps->auth_sync_done = 1;
    switch (reply->result) {
    case AUTH_OK: {
        const struct sconf *cfg = s->node->cfg;
        s->username = strdup(reply->username);
        if (s->username == NULL) {
            imap_cmd_done(s, "NO", "UNAVAILABLE", "Internal error.");
            return;
        }
        s->user_id = reply->user_id;
        s->state = IMAP_S_AUTH;
        s->bad_commands = 0;
        struct imap_parser_limits lim = {
            .max_line = cfg->max_line ? cfg->max_line : 65536,
            .max_literal = cfg->max_literal ? cfg->max_literal : 65536,
            .max_depth = 16,
            .max_args = 10000,
        };
        imap_parser_set_limits(s->parser, &lim);
        if (s->conn) cf_conn_set_idle_timeout(s->conn, cfg->idle_timeout_ms);
        cf_info("imap %s: user %s logged in", s->peer, s->username);
        char caps[520];
        memcpy(caps, "CAPABILITY ", 11);
        capabilities(s, caps + 11, sizeof(caps) - 11);
        imap_cmd_done(s, "OK", caps, "Logged in");
        return;
    }
    case AUTH_DISABLED: {
        char reason[256];
        snprintf(reason, sizeof(reason), "%s", reply->disabled_reason);
        sanitize(reason);
        ps->auth_failures++;
        imap_cmd_done(s, "NO", "AUTHORIZATIONFAILED", "Account disabled: %s", reason);
        return;
    }
    case AUTH_BADPASS:
        ps->auth_failures++;
        if (ps->auth_failures >= MAX_AUTH_FAILURES)
            ps->bye_after = "Too many authentication failures.";
        imap_cmd_done(s, "NO", "AUTHENTICATIONFAILED", "Authentication failed.");
        return;
    case AUTH_ERROR:
    default:
        imap_cmd_done(s, "NO", "UNAVAILABLE", "Internal error, try again later.");
        return;
    }
}

/* Start the password check (async). user/pass are borrowed. */
static void start_auth(struct imap_session *s, const char *user, const char *pass, size_t pass_len)
{
    struct imap_priv *ps = PRIV(s);
    ps->in_auth_call = 1;
    ps->auth_sync_done = 0;
    struct auth_req *req = auth_verify(s->node, "imap", user, pass, pass_len, s->peer,
                                       s->proxy_peer[0] ? s->proxy_peer : NULL, auth_done, s);
    ps->in_auth_call = 0;
    if (ps->auth_sync_done) return; /* already answered */
    if (req == NULL) {
        imap_cmd_done(s, "NO", "UNAVAILABLE", "Internal error, try again later.");
        return;
    }
    s->auth_req = req;
}

static void cmd_login(struct imap_session *s, struct imap_command *cmd, int uid)
{
    (void)uid;
    if (cmd->n_args != 2 || !imap_arg_is_astring(&cmd->args[0]) ||
        !imap_arg_is_astring(&cmd->args[1])) {
        imap_cmd_done(s, "BAD", NULL, "Expected: LOGIN user password");
        return;
    }
    const struct imap_arg *u = &cmd->args[0], *p = &cmd->args[1];
    if (!plaintext_ok(s)) {
        char user[64];
        snprintf(user, sizeof(user), "%.*s", (int)(u->len < 63 ? u->len : 63), u->str);
        sanitize(user);
        cf_log_audit_login("imap", user, s->peer, s->proxy_peer[0] ? s->proxy_peer : NULL,
                           "plaintext-refused");
        imap_cmd_done(s, "NO", "PRIVACYREQUIRED",
                      "Plaintext authentication disallowed on non-secure connections.");
        return;
    }
    if (strlen(u->str) != u->len || u->len == 0 || u->len > STORE_MAX_USERNAME) {
        imap_cmd_done(s, "NO", "AUTHENTICATIONFAILED", "Authentication failed.");
        return;
    }
    start_auth(s, u->str, p->str, p->len);
}

static void auth_plain(struct imap_session *s, const char *b64, size_t len)
{
    char *user = NULL, *pass = NULL;
    size_t pass_len = 0;
    if (auth_plain_decode(b64, len, &user, &pass, &pass_len) < 0) {
        imap_cmd_done(s, "NO", "AUTHENTICATIONFAILED", "Authentication failed.");
        return;
    }
    start_auth(s, user, pass, pass_len);
    explicit_bzero(pass, pass_len);
    free(pass);
    free(user);
}

static void cmd_authenticate(struct imap_session *s, struct imap_command *cmd, int uid)
{
    (void)uid;
    if (cmd->n_args < 1 || cmd->n_args > 2 || cmd->args[0].type != IMAP_ARG_ATOM ||
        (cmd->n_args == 2 && !imap_arg_is_string(&cmd->args[1]))) {
        imap_cmd_done(s, "BAD", NULL, "Expected: AUTHENTICATE mechanism [initial-response]");
        return;
    }
    if (!imap_arg_eq(&cmd->args[0], "PLAIN")) {
        imap_cmd_done(s, "NO", NULL, "Unsupported authentication mechanism.");
        return;
    }
    if (!plaintext_ok(s)) {
        cf_log_audit_login("imap", "", s->peer, s->proxy_peer[0] ? s->proxy_peer : NULL,
                           "plaintext-refused");
        imap_cmd_done(s, "NO", "PRIVACYREQUIRED",
                      "Plaintext authentication disallowed on non-secure connections.");
        return;
    }
    if (cmd->n_args == 2) {
        const struct imap_arg *ir = &cmd->args[1];
        if (ir->len == 1 && ir->str[0] == '=')
            auth_plain(s, "", 0);
        else
            auth_plain(s, ir->str, ir->len);
        return;
    }
    s->authenticating = 1;
    outs(s, "+ \r\n");
}

/* A continuation line of AUTHENTICATE arrived. */
static void auth_line(struct imap_session *s, const char *line, size_t len)
{
    s->authenticating = 0;
    if (len == 1 && line[0] == '*') {
        imap_cmd_done(s, "BAD", NULL, "Authentication canceled.");
        return;
    }
    auth_plain(s, line, len);
}

/* ---- SELECT / EXAMINE / CLOSE / UNSELECT ---- */

struct unseen_ctx {
    uint32_t msn;
    uint32_t first_unseen;
};

static int find_unseen(const struct store_msg *m, void *arg)
{
    struct unseen_ctx *u = arg;
    u->msn++;
    if (!(m->flags & STORE_F_SEEN)) {
        u->first_unseen = u->msn;
        return 1;
    }
    return 0;
}

static void write_keywords(struct imap_session *s, const char *kw, size_t len)
{
    for (size_t off = 0; kw != NULL && off < len;) {
        size_t l = strnlen(kw + off, len - off);
        if (l > 0) {
            out(s, " ", 1);
            out(s, kw + off, l);
        }
        off += l + 1;
    }
}

static void cmd_select(struct imap_session *s, struct imap_command *cmd, int uid)
{
    (void)uid;
    int examine = strcmp(cmd->name, "EXAMINE") == 0;
    struct store *st = s->node->store;
    struct store_mailbox mb;
    const char *why = NULL;
    if (cmd->n_args != 1) {
        imap_cmd_done(s, "BAD", NULL,
                      cmd->n_args == 0 ? "Missing mailbox name."
                                       : "SELECT parameters not supported.");
        return;
    }
    /* A failed SELECT leaves no mailbox selected (RFC 3501 6.3.1). */
    if (s->state == IMAP_S_SELECTED) unselect(s);
    char *name = imap_mailbox_name(s, &cmd->args[0], &why);
    if (name == NULL) {
        imap_cmd_done(s, "NO", NULL, "%s", why ? why : "Invalid mailbox name.");
        return;
    }
    MDB_txn *txn = store_rtxn_begin(st);
    if (txn == NULL) {
        free(name);
        imap_cmd_done(s, "NO", "SERVERBUG", "Internal error.");
        return;
    }
    int rc = store_mailbox_get(st, txn, s->user_id, name, &mb);
    uint32_t rights = rc == 0 ? store_rights(st, txn, s->user_id, &mb) : 0;
    if (rc != 0 || !(rights & STORE_R_LOOKUP)) {
        store_rtxn_end(txn);
        free(name);
        if (rc < 0)
            imap_cmd_done(s, "NO", "SERVERBUG", "Internal error.");
        else
            imap_cmd_done(s, "NO", "NONEXISTENT", "Mailbox doesn't exist.");
        return;
    }
    if (!(rights & STORE_R_READ)) {
        store_rtxn_end(txn);
        free(name);
        imap_cmd_done(s, "NO", "NOPERM", "Permission denied.");
        return;
    }
    struct imap_selected *sel = &s->sel;
    uint32_t *uids = NULL;
    size_t n = 0;
    if (store_msg_uids(st, txn, mb.id, &uids, &n) != 0) {
        store_rtxn_end(txn);
        free(name);
        imap_cmd_done(s, "NO", "SERVERBUG", "Internal error.");
        return;
    }
    struct unseen_ctx uc = {0, 0};
    if (mb.unseen > 0) store_msg_foreach(st, txn, mb.id, 1, UINT32_MAX, find_unseen, &uc);

    memset(sel, 0, sizeof(*sel));
    sel->mailbox_id = mb.id;
    sel->name = name;
    sel->uidvalidity = mb.uidvalidity;
    sel->rights = rights;
    sel->readonly =
        examine || !(rights & (STORE_R_SEEN | STORE_R_WRITE | STORE_R_DELETEMSG | STORE_R_EXPUNGE));
    sel->uids.v = uids;
    sel->uids.n = sel->uids.cap = n;
    sel->recent_min_uid = mb.uidnext;
    sel->max_uid_known = mb.uidnext > 0 ? mb.uidnext - 1 : 0;
    if (n > 0 && uids[n - 1] > sel->max_uid_known) sel->max_uid_known = uids[n - 1];

    outs(s, "* FLAGS (\\Answered \\Flagged \\Deleted \\Seen \\Draft");
    write_keywords(s, mb.keywords, mb.keywords_len);
    outs(s, ")\r\n");
    if (sel->readonly) {
        outs(s, "* OK [PERMANENTFLAGS ()] Read-only mailbox.\r\n");
    } else {
        outs(s, "* OK [PERMANENTFLAGS (\\Answered \\Flagged \\Deleted \\Seen \\Draft");
        write_keywords(s, mb.keywords, mb.keywords_len);
        outs(s, " \\*)] Flags permitted.\r\n");
    }
    outf(s, "* %zu EXISTS\r\n* 0 RECENT\r\n", n);
    if (uc.first_unseen > 0) outf(s, "* OK [UNSEEN %u] First unseen.\r\n", uc.first_unseen);
    outf(s, "* OK [UIDVALIDITY %u] UIDs valid\r\n* OK [UIDNEXT %u] Predicted next UID\r\n",
         mb.uidvalidity, mb.uidnext);
    store_rtxn_end(txn);

    sel->watcher.on_change = on_change;
    store_watch(st, mb.id, &sel->watcher);
    s->state = IMAP_S_SELECTED;
    imap_cmd_done(s, "OK", sel->readonly ? "READ-ONLY" : "READ-WRITE", "%s completed.",
                  examine ? "Examine" : "Select");
}

struct close_ctx {
    struct imap_session *s;
    struct store_outcome out;
};

static void close_done(void *arg, int status, struct store_outcome *o)
{
    struct close_ctx *cc = arg;
    struct imap_session *s = cc->s;
    (void)o;
    store_outcome_clear(&cc->out);
    free(cc);
    /* Silent: no EXPUNGE responses for CLOSE (RFC 3501 6.4.2). */
    if (!PRIV(s)->closed) unselect(s);
    if (status != REP_OK) {
        imap_reply_propose_error(s, status);
        return;
    }
    imap_cmd_done(s, "OK", NULL, "Close completed.");
}

static void cmd_close(struct imap_session *s, struct imap_command *cmd, int uid)
{
    (void)uid;
    if (!no_args(s, cmd)) return;
    struct imap_selected *sel = &s->sel;
    struct store_mailbox mb;
    uint64_t deleted = 0;
    if (!sel->readonly && (sel->rights & STORE_R_EXPUNGE) && sel->max_uid_known > 0) {
        MDB_txn *txn = store_rtxn_begin(s->node->store);
        if (txn != NULL) {
            if (store_mailbox_get_by_id(s->node->store, txn, sel->mailbox_id, &mb) == 0)
                deleted = mb.deleted;
            store_rtxn_end(txn);
        }
    }
    if (deleted == 0) {
        unselect(s);
        imap_cmd_done(s, "OK", NULL, "Close completed.");
        return;
    }
    struct close_ctx *cc = calloc(1, sizeof(*cc));
    if (cc == NULL) {
        unselect(s);
        imap_cmd_done(s, "NO", "SERVERBUG", "Out of memory.");
        return;
    }
    cc->s = s;
    Coffer__Entry e = COFFER__ENTRY__INIT;
    Coffer__Expunge ex = COFFER__EXPUNGE__INIT;
    Coffer__UidRange range = COFFER__UID_RANGE__INIT;
    Coffer__UidRange *ranges[1] = {&range};
    range.lo = 1;
    range.hi = sel->max_uid_known;
    ex.username = s->username;
    ex.mailbox = sel->name;
    ex.uidvalidity = sel->uidvalidity;
    ex.n_uids = 1;
    ex.uids = ranges;
    ex.has_require_deleted = 1;
    ex.require_deleted = 1;
    e.actor = s->username;
    e.op_case = COFFER__ENTRY__OP_EXPUNGE;
    e.expunge = &ex;
    int rc = propose_entry(s->node, &e, &cc->out, close_done, cc);
    if (rc < 0) {
        free(cc);
        unselect(s);
        imap_reply_propose_error(s, rc);
    }
}

static void cmd_unselect(struct imap_session *s, struct imap_command *cmd, int uid)
{
    (void)uid;
    if (!no_args(s, cmd)) return;
    unselect(s);
    imap_cmd_done(s, "OK", NULL, "Unselect completed.");
}

/* ---- IDLE ---- */

static void keepalive_cb(uv_timer_t *t)
{
    struct imap_session *s = &((struct imap_priv *)t->data)->s;
    if (s->idling && s->conn != NULL) outs(s, "* OK Still here\r\n");
}

static void cmd_idle(struct imap_session *s, struct imap_command *cmd, int uid)
{
    (void)uid;
    struct imap_priv *ps = PRIV(s);
    if (!no_args(s, cmd)) return;
    s->idling = 1;
    outs(s, "+ idling\r\n");
    cf_conn_set_idle_timeout(s->conn, 0);
    uint64_t ka = s->node->cfg->idle_keepalive_ms;
    if (ka > 0) uv_timer_start(&ps->keepalive, keepalive_cb, ka, ka);
    /* Changes that arrived since the last command go out at once. */
    imap_flush_updates(s, 1);
}

static void idle_line(struct imap_session *s, const char *line, size_t len)
{
    struct imap_priv *ps = PRIV(s);
    s->idling = 0;
    uv_timer_stop(&ps->keepalive);
    if (s->conn) cf_conn_set_idle_timeout(s->conn, s->node->cfg->idle_timeout_ms);
    if (len == 4 && strncasecmp(line, "DONE", 4) == 0)
        imap_cmd_done(s, "OK", NULL, "Idle completed.");
    else
        imap_cmd_done(s, "BAD", NULL, "Expected DONE.");
}

/* ---- dispatch ---- */

struct cmd_def {
    const char *name;
    imap_handler handler; /* NULL: the UID prefix */
    unsigned states;
    int uid_ok;     /* may follow "UID" */
    int expunge_ok; /* EXPUNGE responses allowed during the plain form */
};

static const struct cmd_def commands[] = {
    {"CAPABILITY", cmd_capability, STB_ANY, 0, 1},
    {"NOOP", cmd_noop, STB_ANY, 0, 1},
    {"LOGOUT", cmd_logout, STB_ANY, 0, 0},
    {"ID", cmd_id, STB_ANY, 0, 1},
    {"STARTTLS", cmd_starttls, STB_NOTAUTH, 0, 0},
    {"LOGIN", cmd_login, STB_NOTAUTH, 0, 0},
    {"AUTHENTICATE", cmd_authenticate, STB_NOTAUTH, 0, 0},
    {"ENABLE", cmd_enable, STB_AUTHSEL, 0, 1},
    {"NAMESPACE", cmd_namespace, STB_AUTHSEL, 0, 1},
    {"SELECT", cmd_select, STB_AUTHSEL, 0, 1},
    {"EXAMINE", cmd_select, STB_AUTHSEL, 0, 1},
    {"CREATE", imap_cmd_create, STB_AUTHSEL, 0, 1},
    {"DELETE", imap_cmd_delete, STB_AUTHSEL, 0, 1},
    {"RENAME", imap_cmd_rename, STB_AUTHSEL, 0, 1},
    {"SUBSCRIBE", imap_cmd_subscribe, STB_AUTHSEL, 0, 1},
    {"UNSUBSCRIBE", imap_cmd_unsubscribe, STB_AUTHSEL, 0, 1},
    {"LIST", imap_cmd_list, STB_AUTHSEL, 0, 1},
    {"LSUB", imap_cmd_lsub, STB_AUTHSEL, 0, 1},
    {"STATUS", imap_cmd_status, STB_AUTHSEL, 0, 1},
    {"APPEND", imap_cmd_append, STB_AUTHSEL, 0, 1},
    {"IDLE", cmd_idle, STB_AUTHSEL, 0, 1},
    {"CHECK", cmd_noop, STB_SEL, 0, 1},
    {"CLOSE", cmd_close, STB_SEL, 0, 0},
    {"UNSELECT", cmd_unselect, STB_SEL, 0, 0},
    {"EXPUNGE", imap_cmd_expunge, STB_SEL, 1, 1},
    {"SEARCH", imap_cmd_search, STB_SEL, 1, 0},
    {"FETCH", imap_cmd_fetch, STB_SEL, 1, 0},
    {"STORE", imap_cmd_store, STB_SEL, 1, 0},
    {"COPY", imap_cmd_copy, STB_SEL, 1, 1},
    {"MOVE", imap_cmd_move, STB_SEL, 1, 1},
    {"UID", NULL, STB_SEL, 0, 1},
};

static const struct cmd_def *find_cmd(const char *name, size_t len)
{
    for (size_t i = 0; i < sizeof(commands) / sizeof(commands[0]); i++)
        if (strlen(commands[i].name) == len && strncasecmp(commands[i].name, name, len) == 0)
            return &commands[i];
    return NULL;
}

static unsigned state_bit(enum imap_state st)
{
    switch (st) {
    case IMAP_S_NOTAUTH:
        return STB_NOTAUTH;
    case IMAP_S_AUTH:
        return STB_AUTH;
    case IMAP_S_SELECTED:
        return STB_SEL;
    default:
        return 0;
    }
}

/* Mark a command as running (tag copied). */
static void begin_cmd(struct imap_session *s, const char *tag, struct imap_command *cmd)
{
    free(s->tag);
    s->tag = strdup(tag ? tag : "*");
    if (s->tag == NULL) {
        cf_crit("imap: out of memory");
        abort();
    }
    s->cmd = cmd;
    s->busy = 1;
    PRIV(s)->allow_expunge = 0;
}

static void dispatch(struct imap_session *s, struct imap_command *cmd)
{
    struct imap_priv *ps = PRIV(s);
    int uid = 0;
    begin_cmd(s, cmd->tag, cmd);
    const struct cmd_def *d = cmd->name ? find_cmd(cmd->name, strlen(cmd->name)) : NULL;
    if (d == NULL) {
        imap_cmd_done(s, "BAD", NULL, "Unknown command.");
        return;
    }
    if (!(d->states & state_bit(s->state))) {
        if (d->states == STB_NOTAUTH && s->state != IMAP_S_NOTAUTH)
            imap_cmd_done(s, "NO", NULL, "Already authenticated.");
        else
            imap_cmd_done(s, "BAD", NULL, "Command not allowed in this state.");
        return;
    }
    if (d->handler == NULL) {
        const struct imap_arg *sub = cmd->n_args > 0 ? &cmd->args[0] : NULL;
        const struct cmd_def *sd =
            sub && sub->type == IMAP_ARG_ATOM ? find_cmd(sub->str, sub->len) : NULL;
        if (sd == NULL || !sd->uid_ok) {
            imap_cmd_done(s, "BAD", NULL, "Unknown UID command.");
            return;
        }
        ps->uidcmd = *cmd;
        snprintf(ps->uidname, sizeof(ps->uidname), "%s", sd->name);
        ps->uidcmd.name = ps->uidname;
        ps->uidcmd.args = cmd->args + 1;
        ps->uidcmd.n_args = cmd->n_args - 1;
        cmd = &ps->uidcmd;
        s->cmd = cmd;
        d = sd;
        uid = 1;
    }
    ps->allow_expunge = uid || d->expunge_ok;
    d->handler(s, cmd, uid);
}

/* A literal announced by the client: accept ("+" for synchronising ones)
 * or refuse. */
static void handle_literal(struct imap_session *s)
{
    struct imap_priv *ps = PRIV(s);
    const struct imap_literal_info *li = imap_parser_literal(s->parser);
    int non_sync = li->non_sync;
    int is_append = s->state != IMAP_S_NOTAUTH && li->name != NULL &&
                    strcasecmp(li->name, "APPEND") == 0 && li->arg_index >= 1;
    if (is_append) {
        /* The handler-side check may answer NO through imap_cmd_done, so
         * the command is marked as running while it looks. */
        begin_cmd(s, li->tag, NULL);
        ps->allow_expunge = 1;
        int ok = imap_append_check_literal(s, li);
        if (ok) {
            s->busy = 0;
            free(s->tag);
            s->tag = NULL;
            imap_parser_literal_accept(s->parser, s->node->cfg->max_message);
            if (!non_sync) outs(s, "+ Ready for literal data\r\n");
            return;
        }
        if (imap_parser_literal_reject(s->parser) && s->conn != NULL) {
            outs(s, "* BYE Refused non-synchronizing literal.\r\n");
            cf_conn_close(s->conn, 1, "literal refused");
        }
        return;
    }
    uint64_t max = s->state == IMAP_S_NOTAUTH
                       ? PREAUTH_MAX_LITERAL
                       : (s->node->cfg->max_literal ? s->node->cfg->max_literal : 65536);
    if (li->size > max) {
        const char *tag = li->tag ? li->tag : "*";
        outf(s, "%s BAD Literal too large.\r\n", tag);
        if (imap_parser_literal_reject(s->parser)) {
            outs(s, "* BYE Refused non-synchronizing literal.\r\n");
            if (s->conn) cf_conn_close(s->conn, 1, "literal too large");
            return;
        }
        count_bad(s);
        return;
    }
    imap_parser_literal_accept(s->parser, max);
    if (!non_sync) outs(s, "+ Ready for literal data\r\n");
}

static void process_input(struct imap_session *s)
{
    struct imap_priv *ps = PRIV(s);
    if (ps->in_loop) return;
    ps->in_loop = 1;
    int stall = 0;
    while (!ps->closed && s->conn != NULL && !cf_conn_is_closing(s->conn) &&
           s->state != IMAP_S_LOGOUT) {
        if (s->idling || s->authenticating) {
            const char *line = NULL;
            size_t llen = 0, used = 0;
            if (ps->inlen == 0) break;
            int r = imap_parser_read_line(s->parser, ps->inbuf, ps->inlen, &used, &line, &llen);
            if (r == 0) {
                consume(ps, used);
                if (used == 0) break;
                continue;
            }
            if (r < 0) {
                consume(ps, used);
                int was_idle = s->idling;
                s->idling = s->authenticating = 0;
                uv_timer_stop(&ps->keepalive);
                if (was_idle && s->conn)
                    cf_conn_set_idle_timeout(s->conn, s->node->cfg->idle_timeout_ms);
                imap_cmd_done(s, "BAD", NULL, "Line too long.");
                continue;
            }
            if (s->idling)
                idle_line(s, line, llen);
            else
                auth_line(s, line, llen);
            consume(ps, used);
            continue;
        }
        if (s->busy) break;
        size_t used = 0;
        struct imap_command *cmd = NULL;
        const char *err = NULL;
        enum imap_parse_result r =
            imap_parser_feed(s->parser, ps->inbuf ? ps->inbuf : "", ps->inlen, &used, &cmd, &err);
        consume(ps, used);
        if (r == IMAP_PARSE_NEED_MORE) break;
        if (used == 0 && r != IMAP_PARSE_COMMAND && r != IMAP_PARSE_LITERAL) {
            if (++stall > 4) break;
        } else {
            stall = 0;
        }
        switch (r) {
        case IMAP_PARSE_EMPTY_LINE:
            break;
        case IMAP_PARSE_LITERAL:
            handle_literal(s);
            break;
        case IMAP_PARSE_ERROR: {
            char reason[256];
            snprintf(reason, sizeof(reason), "%s", err ? err : "Syntax error.");
            sanitize(reason);
            outf(s, "%s BAD %s\r\n", cmd && cmd->tag ? cmd->tag : "*", reason);
            count_bad(s);
            break;
        }
        case IMAP_PARSE_COMMAND:
            dispatch(s, cmd);
            break;
        case IMAP_PARSE_NEED_MORE:
            break;
        }
    }
    ps->in_loop = 0;
    compact_idle(s);
    update_read(s);
}
