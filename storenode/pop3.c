/* pop3: POP3 sessions over cf_conn (see pop3.h for the policy decisions and
 * the pure helpers, listeners.h for the entry points). */
#include "pop3.h"

#include <errno.h>
#include <stdarg.h>
#include <arpa/inet.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include <openssl/crypto.h>

#include "auth.h"
#include "cf_conn.h"
#include "cf_log.h"
#include "listeners.h"
#include "node.h"
#include "propose.h"
#include "rep.h"
#include "store.h"

/* ------------------------------------------------------------------ */
/* Pure helpers                                                        */
/* ------------------------------------------------------------------ */

long pop3_split_line(const char *buf, size_t len, size_t max, size_t *line_len_r)
{
    size_t lim = len < max ? len : max;
    const char *lf = memchr(buf, '\n', lim);
    if (lf == NULL) return len < max ? 0 : -1;
    size_t i = (size_t)(lf - buf);
    *line_len_r = (i > 0 && buf[i - 1] == '\r') ? i - 1 : i;
    return (long)(i + 1);
}

size_t pop3_skip_line(const char *buf, size_t len, int *found_r)
{
    const char *lf = memchr(buf, '\n', len);
    if (lf == NULL) {
        *found_r = 0;
        return len;
    }
    *found_r = 1;
    return (size_t)(lf - buf) + 1;
}

static const struct {
    const char *name;
    enum pop3_cmd_id id;
} pop3_keywords[] = {
    {"USER", POP3_CMD_USER}, {"PASS", POP3_CMD_PASS}, {"STAT", POP3_CMD_STAT},
    {"LIST", POP3_CMD_LIST}, {"RETR", POP3_CMD_RETR}, {"DELE", POP3_CMD_DELE},
    {"NOOP", POP3_CMD_NOOP}, {"RSET", POP3_CMD_RSET}, {"QUIT", POP3_CMD_QUIT},
    {"TOP", POP3_CMD_TOP},   {"UIDL", POP3_CMD_UIDL}, {"CAPA", POP3_CMD_CAPA},
    {"STLS", POP3_CMD_STLS}, {"AUTH", POP3_CMD_AUTH}, {"XCLIENT", POP3_CMD_XCLIENT},
};

/* Decimal, no sign, fits in 32 bits. */
static int parse_u32(const char *s, size_t len, uint32_t *v_r)
{
    uint64_t v = 0;
    if (len == 0 || len > 10) return -1;
    for (size_t i = 0; i < len; i++) {
        if (s[i] < '0' || s[i] > '9') return -1;
        v = v * 10 + (uint64_t)(s[i] - '0');
    }
    if (v > UINT32_MAX) return -1;
    *v_r = (uint32_t)v;
    return 0;
}

#define POP3_MAX_TOKENS 3

int pop3_parse_line(const char *line, size_t len, struct pop3_cmd *cmd_r)
{
    struct pop3_cmd cmd;
    const char *tok[POP3_MAX_TOKENS];
    size_t tlen[POP3_MAX_TOKENS];
    size_t ntok = 0, kwlen = 0, i;

    memset(&cmd, 0, sizeof(cmd));
    if (len > POP3_MAX_AUTH_LINE) return POP3_PARSE_TOOLONG;
    if (memchr(line, '\0', len) != NULL) return POP3_PARSE_UNKNOWN;
    while (kwlen < len && line[kwlen] != ' ')
        kwlen++;
    if (kwlen < 3 || kwlen > 7) return POP3_PARSE_UNKNOWN;
    cmd.id = 0;
    for (i = 0; i < sizeof(pop3_keywords) / sizeof(pop3_keywords[0]); i++) {
        if (strlen(pop3_keywords[i].name) == kwlen &&
            strncasecmp(pop3_keywords[i].name, line, kwlen) == 0) {
            cmd.id = pop3_keywords[i].id;
            break;
        }
    }
    if (cmd.id == 0) return POP3_PARSE_UNKNOWN;
    /* RFC 2449: 512 octets including CRLF. Only AUTH (initial response)
     * may be longer, up to POP3_MAX_AUTH_LINE. */
    if (cmd.id != POP3_CMD_AUTH && len > POP3_MAX_LINE - 2) return POP3_PARSE_TOOLONG;

    if (cmd.id == POP3_CMD_PASS || cmd.id == POP3_CMD_XCLIENT) {
        /* RFC 1939: the password is the rest of the line (may hold spaces). */
        if (kwlen + 1 >= len) return POP3_PARSE_BADARGS;
        cmd.arg = line + kwlen + 1;
        cmd.arg_len = len - kwlen - 1;
        if (cmd.arg_len > POP3_MAX_ARG) return POP3_PARSE_TOOLONG;
        *cmd_r = cmd;
        return POP3_PARSE_OK;
    }

    i = kwlen;
    for (;;) {
        while (i < len && line[i] == ' ')
            i++;
        if (i >= len) break;
        size_t start = i;
        while (i < len && line[i] != ' ')
            i++;
        if (ntok == POP3_MAX_TOKENS) return POP3_PARSE_BADARGS;
        tok[ntok] = line + start;
        tlen[ntok] = i - start;
        ntok++;
    }
    for (i = 0; i < ntok; i++) {
        for (size_t k = 0; k < tlen[i]; k++) {
            unsigned char ch = (unsigned char)tok[i][k];
            if (ch < 0x21 || ch == 0x7f) return POP3_PARSE_BADARGS;
        }
        if (tlen[i] > POP3_MAX_ARG && !(cmd.id == POP3_CMD_AUTH && i == 1))
            return POP3_PARSE_TOOLONG;
    }

    switch (cmd.id) {
    case POP3_CMD_USER:
        if (ntok != 1) return POP3_PARSE_BADARGS;
        cmd.arg = tok[0];
        cmd.arg_len = tlen[0];
        break;
    case POP3_CMD_STAT:
    case POP3_CMD_NOOP:
    case POP3_CMD_RSET:
    case POP3_CMD_QUIT:
    case POP3_CMD_CAPA:
    case POP3_CMD_STLS:
        if (ntok != 0) return POP3_PARSE_BADARGS;
        break;
    case POP3_CMD_LIST:
    case POP3_CMD_UIDL:
        if (ntok > 1) return POP3_PARSE_BADARGS;
        if (ntok == 1) {
            if (parse_u32(tok[0], tlen[0], &cmd.msg) < 0) return POP3_PARSE_BADARGS;
            cmd.has_msg = 1;
        }
        break;
    case POP3_CMD_RETR:
    case POP3_CMD_DELE:
        if (ntok != 1 || parse_u32(tok[0], tlen[0], &cmd.msg) < 0) return POP3_PARSE_BADARGS;
        cmd.has_msg = 1;
        break;
    case POP3_CMD_TOP:
        if (ntok != 2 || parse_u32(tok[0], tlen[0], &cmd.msg) < 0 ||
            parse_u32(tok[1], tlen[1], &cmd.lines) < 0)
            return POP3_PARSE_BADARGS;
        cmd.has_msg = 1;
        break;
    case POP3_CMD_AUTH:
        if (ntok >= 1) {
            cmd.arg = tok[0];
            cmd.arg_len = tlen[0];
        }
        if (ntok >= 2) {
            cmd.arg2 = tok[1];
            cmd.arg2_len = tlen[1];
        }
        if (ntok > 2) return POP3_PARSE_BADARGS;
        break;
    case POP3_CMD_PASS:
    case POP3_CMD_XCLIENT:
        break; /* handled above */
    }
    *cmd_r = cmd;
    return POP3_PARSE_OK;
}

size_t pop3_dotstuff_span(const char *in, size_t len, int *at_line_start, int *need_dot_r)
{
    int als = *at_line_start;
    for (size_t i = 0; i < len; i++) {
        if (als && in[i] == '.') {
            *at_line_start = 0; /* the '.' at in[i] is sent next call, not stuffed again */
            *need_dot_r = 1;
            return i;
        }
        als = in[i] == '\n';
    }
    *at_line_start = als;
    *need_dot_r = 0;
    return len;
}

size_t pop3_dotstuff(const char *in, size_t len, int *at_line_start, char *out, size_t out_cap)
{
    size_t pos = 0, o = 0;
    while (pos < len) {
        int dot;
        size_t k = pop3_dotstuff_span(in + pos, len - pos, at_line_start, &dot);
        if (o + k + (dot ? 1 : 0) > out_cap) return (size_t)-1;
        memcpy(out + o, in + pos, k);
        o += k;
        pos += k;
        if (dot) out[o++] = '.';
    }
    return o;
}

size_t pop3_top_length(const char *msg, size_t len, uint32_t lines, int *no_body_r)
{
    size_t i = 0;
    /* Header: lines until an empty line ("\r\n" or bare "\n"). */
    for (;;) {
        if (i >= len) {
            *no_body_r = 1;
            return len;
        }
        const char *lf = memchr(msg + i, '\n', len - i);
        size_t line_end = lf ? (size_t)(lf - msg) + 1 : len;
        size_t content = line_end - i;
        int empty = (content == 1) || (content == 2 && msg[i] == '\r');
        i = line_end;
        if (empty && lf) break;
        if (!lf) {
            *no_body_r = 1;
            return len;
        }
    }
    *no_body_r = 0;
    while (lines > 0 && i < len) {
        const char *lf = memchr(msg + i, '\n', len - i);
        i = lf ? (size_t)(lf - msg) + 1 : len;
        lines--;
    }
    return i;
}

void pop3_uidl(uint32_t uidvalidity, uint32_t uid, char out[17])
{
    snprintf(out, 17, "%08x%08x", (unsigned)uidvalidity, (unsigned)uid);
}

/* ------------------------------------------------------------------ */
/* Sessions                                                            */
/* ------------------------------------------------------------------ */

#define POP3_INBUF (2 * POP3_MAX_AUTH_LINE)
#define POP3_STREAM_CHUNK (64u * 1024)

enum pop3_state { ST_AUTHORIZATION, ST_TRANSACTION };

struct pop3_msg {
    uint32_t uid;
    uint8_t deleted;
    uint64_t size;
};

/* A message being sent: keeps the read transaction (the bytes are borrowed
 * from the LMDB map) alive until every queued chunk has been released. */
struct pop3_stream {
    MDB_txn *txn;
    unsigned refs;
    int finished;
};

struct pop3_session {
    struct node *n;
    struct cf_conn *c;
    struct pop3_session *next, *prev;
    enum pop3_state state;
    int conn_gone; /* on_close happened */
    int closing;   /* we asked to close; ignore further input */
    int busy;      /* a command is in progress (auth, stream, QUIT) */
    int read_paused;
    int skipping;        /* discarding the rest of an overlong line */
    int auth_cont;       /* waiting for the AUTH PLAIN continuation line */
    int propose_pending; /* QUIT expunge in flight: keep the session alive */
    int refuse_on_tls;   /* implicit TLS: close once the handshake is done */
    uint64_t bad;
    char client[64];
    char proxy[64];    /* trusted proxy that passed `client` (XCLIENT), "" otherwise */
    int trusted_proxy; /* on the proxy-only listener */

    char user[POP3_MAX_ARG + 1]; /* from USER */
    int have_user;
    struct auth_req *auth_req;

    /* maildrop snapshot (TRANSACTION) */
    uint64_t user_id;
    char username[256];
    uint64_t mailbox_id;
    uint32_t uidvalidity;
    struct pop3_msg *msgs;
    size_t nmsgs;

    /* RETR / TOP in progress */
    struct pop3_stream *st;
    const char *sdata;
    size_t slen, spos;
    int s_als, s_add_eoh;

    struct store_outcome outcome;

    size_t inlen;
    char in[POP3_INBUF];
};

static struct pop3_session *g_sessions;

static void kick(struct pop3_session *s);

static int plaintext_ok(struct pop3_session *s)
{
    return cf_conn_is_tls(s->c) || s->n->cfg->allow_plaintext;
}

static void reply(struct pop3_session *s, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));
static void reply(struct pop3_session *s, const char *fmt, ...)
{
    char buf[1024];
    va_list ap;
    int k;
    if (s->conn_gone || s->closing) return;
    va_start(ap, fmt);
    k = vsnprintf(buf, sizeof(buf) - 2, fmt, ap);
    va_end(ap);
    if (k < 0) return;
    if ((size_t)k > sizeof(buf) - 3) k = (int)sizeof(buf) - 3;
    buf[k++] = '\r';
    buf[k++] = '\n';
    cf_conn_write(s->c, buf, (size_t)k);
}

static void session_close(struct pop3_session *s, const char *reason)
{
    if (s->conn_gone || s->closing) return;
    s->closing = 1;
    cf_conn_close(s->c, 1, reason);
}

static void session_maybe_free(struct pop3_session *s)
{
    if (!s->conn_gone || s->propose_pending) return;
    store_outcome_clear(&s->outcome);
    free(s->msgs);
    OPENSSL_cleanse(s->in, sizeof(s->in));
    free(s);
}

static void bad_command(struct pop3_session *s, const char *text)
{
    s->bad++;
    if (s->n->cfg->max_bad_commands && s->bad >= s->n->cfg->max_bad_commands) {
        reply(s, "-ERR Too many bad commands, closing");
        session_close(s, "too many bad commands");
        return;
    }
    reply(s, "-ERR %s", text);
}

/* ---- maildrop snapshot ---- */

struct snap_ctx {
    struct pop3_msg *msgs;
    size_t n, cap;
    int oom;
};

static int snap_cb(const struct store_msg *m, void *arg)
{
    struct snap_ctx *x = arg;
    if (x->n == x->cap) {
        size_t ncap = x->cap ? x->cap * 2 : 64;
        struct pop3_msg *nm = realloc(x->msgs, ncap * sizeof(*nm));
        if (nm == NULL) {
            x->oom = 1;
            return 1;
        }
        x->msgs = nm;
        x->cap = ncap;
    }
    x->msgs[x->n].uid = m->uid;
    x->msgs[x->n].size = m->size;
    x->msgs[x->n].deleted = 0;
    x->n++;
    return 0;
}

static int take_snapshot(struct pop3_session *s)
{
    struct store_mailbox mb;
    struct snap_ctx x = {0};
    int rc = -1;
    MDB_txn *txn = store_rtxn_begin(s->n->store);
    if (txn == NULL) return -1;
    if (store_mailbox_get(s->n->store, txn, s->user_id, "INBOX", &mb) != 0) goto out;
    if (store_msg_foreach(s->n->store, txn, mb.id, 1, UINT32_MAX, snap_cb, &x) != 0 || x.oom)
        goto out;
    s->mailbox_id = mb.id;
    s->uidvalidity = mb.uidvalidity;
    free(s->msgs);
    s->msgs = x.msgs;
    s->nmsgs = x.n;
    x.msgs = NULL;
    rc = 0;
out:
    free(x.msgs);
    store_rtxn_end(txn);
    return rc;
}

/* ---- authentication ---- */

static void auth_done(void *arg, const struct auth_reply *r)
{
    struct pop3_session *s = arg;
    s->auth_req = NULL;
    s->busy = 0;
    switch (r->result) {
    case AUTH_OK:
        s->user_id = r->user_id;
        snprintf(s->username, sizeof(s->username), "%s", r->username);
        if (take_snapshot(s) != 0) {
            cf_error("pop3: cannot open INBOX of %s", s->username);
            reply(s, "-ERR [SYS/TEMP] Unable to open the maildrop");
            break;
        }
        s->state = ST_TRANSACTION;
        cf_conn_set_idle_timeout(s->c, s->n->cfg->idle_timeout_ms);
        reply(s, "+OK Logged in, %zu messages", s->nmsgs);
        break;
    case AUTH_BADPASS:
        bad_command(s, "[AUTH] Authentication failed");
        break;
    case AUTH_DISABLED:
        reply(s, "-ERR [AUTH] Account disabled: %s",
              r->disabled_reason[0] ? r->disabled_reason : "contact your administrator");
        break;
    case AUTH_ERROR:
    default:
        reply(s, "-ERR [SYS/TEMP] Internal error, try again later");
        break;
    }
    kick(s);
}

static void start_auth(struct pop3_session *s, const char *user, const char *pass, size_t pass_len)
{
    s->have_user = 0;
    s->auth_req = auth_verify(s->n, "pop3", user, pass, pass_len, s->client,
                              s->proxy[0] ? s->proxy : NULL, auth_done, s);
    if (s->auth_req == NULL) {
        reply(s, "-ERR [SYS/TEMP] Internal error, try again later");
        return;
    }
    s->busy = 1;
}

static void auth_plain_response(struct pop3_session *s, const char *b64, size_t len)
{
    char *user = NULL, *pass = NULL;
    size_t pass_len = 0;
    if (len == 1 && b64[0] == '*') {
        reply(s, "-ERR [AUTH] Authentication cancelled");
        return;
    }
    if (len == 1 && b64[0] == '=') len = 0;
    if (auth_plain_decode(b64, len, &user, &pass, &pass_len) != 0) {
        bad_command(s, "[AUTH] Invalid SASL PLAIN response");
        return;
    }
    start_auth(s, user, pass, pass_len);
    OPENSSL_cleanse(pass, pass_len);
    free(pass);
    free(user);
}

/* ---- message access ---- */

/* Returns the message for a 1-based number, or NULL after replying -ERR. */
static struct pop3_msg *lookup_msg(struct pop3_session *s, uint32_t num)
{
    if (num == 0 || num > s->nmsgs) {
        reply(s, "-ERR No such message");
        return NULL;
    }
    struct pop3_msg *m = &s->msgs[num - 1];
    if (m->deleted) {
        reply(s, "-ERR Message is deleted");
        return NULL;
    }
    return m;
}

static void stream_maybe_free(struct pop3_stream *st)
{
    if (st->finished && st->refs == 0) {
        store_rtxn_end(st->txn);
        free(st);
    }
}

static void stream_release(void *arg)
{
    struct pop3_stream *st = arg;
    st->refs--;
    stream_maybe_free(st);
}

static void stream_abandon(struct pop3_session *s)
{
    if (s->st == NULL) return;
    s->st->finished = 1;
    stream_maybe_free(s->st);
    s->st = NULL;
}

/* Produce as much of the current message as back-pressure allows. Clears
 * s->busy when the message (and its terminating ".") is queued. */
static void stream_pump(struct pop3_session *s)
{
    if (s->st == NULL) return;
    if (s->conn_gone || s->closing) {
        stream_abandon(s);
        return;
    }
    while (s->spos < s->slen) {
        if (cf_conn_out_pending(s->c) > CF_CONN_OUT_HIGH) return; /* on_drain resumes */
        size_t chunk = s->slen - s->spos;
        if (chunk > POP3_STREAM_CHUNK) chunk = POP3_STREAM_CHUNK;
        int dot = 0;
        size_t k = pop3_dotstuff_span(s->sdata + s->spos, chunk, &s->s_als, &dot);
        if (k > 0) {
            s->st->refs++;
            if (cf_conn_write_ref(s->c, s->sdata + s->spos, k, stream_release, s->st) != 0) {
                stream_abandon(s);
                return;
            }
        }
        s->spos += k;
        if (dot) cf_conn_write(s->c, ".", 1);
    }
    if (s->slen == 0 || s->sdata[s->slen - 1] != '\n') cf_conn_write(s->c, "\r\n", 2);
    if (s->s_add_eoh) cf_conn_write(s->c, "\r\n", 2);
    cf_conn_write(s->c, ".\r\n", 3);
    stream_abandon(s);
    s->busy = 0;
}

static void start_stream(struct pop3_session *s, struct pop3_msg *pm, int top, uint32_t lines)
{
    struct store_msg m;
    struct store_mailbox mb;
    const char *data;
    size_t len;
    int rc;
    struct pop3_stream *st = calloc(1, sizeof(*st));
    if (st == NULL) {
        reply(s, "-ERR [SYS/TEMP] Out of memory");
        return;
    }
    st->txn = store_rtxn_begin(s->n->store);
    if (st->txn == NULL) {
        free(st);
        reply(s, "-ERR [SYS/TEMP] Cannot read the maildrop");
        return;
    }
    rc = store_mailbox_get_by_id(s->n->store, st->txn, s->mailbox_id, &mb);
    if (rc == 0 && mb.uidvalidity != s->uidvalidity) rc = STORE_ENOENT;
    if (rc == 0) rc = store_msg_get(s->n->store, st->txn, s->mailbox_id, pm->uid, &m);
    if (rc == 0) rc = store_blob_get(s->n->store, st->txn, m.blob_id, &data, &len);
    if (rc != 0) {
        store_rtxn_end(st->txn);
        free(st);
        if (rc == STORE_ENOENT)
            reply(s, "-ERR Message was deleted");
        else
            reply(s, "-ERR [SYS/TEMP] Cannot read the message");
        return;
    }
    st->finished = 0;
    s->st = st;
    s->sdata = data;
    s->spos = 0;
    s->s_als = 1;
    s->s_add_eoh = 0;
    if (top) {
        s->slen = pop3_top_length(data, len, lines, &s->s_add_eoh);
        reply(s, "+OK");
    } else {
        s->slen = len;
        reply(s, "+OK %zu octets", len);
    }
    s->busy = 1;
    stream_pump(s);
}

/* ---- QUIT / UPDATE state ---- */

static void quit_done(void *arg, int status, struct store_outcome *out)
{
    struct pop3_session *s = arg;
    s->propose_pending = 0;
    if (!s->conn_gone) {
        if (status == REP_OK && (out->result == STORE_OK || out->result == STORE_ENOENT)) {
            reply(s, "+OK Coffer POP3 server signing off");
        } else if (status == REP_OK) {
            reply(s, "-ERR [SYS/TEMP] Some deleted messages not removed: %s", out->text);
        } else {
            reply(s, "-ERR [SYS/TEMP] Some deleted messages not removed: %s", rep_strerror(status));
        }
        s->busy = 0;
        session_close(s, "quit");
    }
    session_maybe_free(s);
}

static void do_quit(struct pop3_session *s)
{
    size_t nranges = 0, i, j;
    Coffer__UidRange *ranges = NULL, **rptrs = NULL;
    Coffer__Entry e = COFFER__ENTRY__INIT;
    Coffer__Expunge x = COFFER__EXPUNGE__INIT;
    int rc;

    if (s->state != ST_TRANSACTION) {
        reply(s, "+OK Coffer POP3 server signing off");
        session_close(s, "quit");
        return;
    }
    for (i = 0; i < s->nmsgs; i++)
        if (s->msgs[i].deleted) nranges++;
    if (nranges == 0) {
        reply(s, "+OK Coffer POP3 server signing off");
        session_close(s, "quit");
        return;
    }
    ranges = calloc(nranges, sizeof(*ranges));
    rptrs = calloc(nranges, sizeof(*rptrs));
    if (ranges == NULL || rptrs == NULL) {
        reply(s, "-ERR [SYS/TEMP] Out of memory; nothing removed");
        session_close(s, "quit");
        goto out;
    }
    /* Ranges of consecutive marked uids (msgs is uid-ascending). */
    nranges = 0;
    for (i = 0; i < s->nmsgs; i = j) {
        if (!s->msgs[i].deleted) {
            j = i + 1;
            continue;
        }
        j = i + 1;
        while (j < s->nmsgs && s->msgs[j].deleted && s->msgs[j].uid == s->msgs[j - 1].uid + 1)
            j++;
        coffer__uid_range__init(&ranges[nranges]);
        ranges[nranges].lo = s->msgs[i].uid;
        ranges[nranges].hi = s->msgs[j - 1].uid;
        rptrs[nranges] = &ranges[nranges];
        nranges++;
    }
    x.username = s->username;
    x.mailbox = "INBOX";
    x.uidvalidity = s->uidvalidity;
    x.n_uids = nranges;
    x.uids = rptrs;
    x.has_require_deleted = 1;
    x.require_deleted = 0;
    e.actor = s->username;
    e.op_case = COFFER__ENTRY__OP_EXPUNGE;
    e.expunge = &x;
    memset(&s->outcome, 0, sizeof(s->outcome));
    rc = propose_entry(s->n, &e, &s->outcome, quit_done, s);
    if (rc != 0) {
        reply(s, "-ERR [SYS/TEMP] Some deleted messages not removed: %s", rep_strerror(rc));
        session_close(s, "quit");
        goto out;
    }
    s->propose_pending = 1;
    s->busy = 1;
out:
    free(rptrs);
    free(ranges);
}

/* ---- commands ---- */

static void cmd_capa(struct pop3_session *s)
{
    char buf[512];
    int auth = s->state == ST_AUTHORIZATION;
    int pt = plaintext_ok(s);
    snprintf(buf, sizeof(buf),
             "+OK Capability list follows\r\n"
             "TOP\r\nUIDL\r\nRESP-CODES\r\nAUTH-RESP-CODE\r\nPIPELINING\r\n"
             "%s%s%s"
             "IMPLEMENTATION Coffer\r\n.\r\n",
             auth && pt ? "USER\r\n" : "", auth && pt ? "SASL PLAIN\r\n" : "",
             auth && !cf_conn_is_tls(s->c) && s->n->tls ? "STLS\r\n" : "");
    cf_conn_write(s->c, buf, strlen(buf));
}

static void cmd_stls(struct pop3_session *s)
{
    if (s->state != ST_AUTHORIZATION) {
        reply(s, "-ERR Command not valid in this state");
        return;
    }
    if (cf_conn_is_tls(s->c)) {
        reply(s, "-ERR Command not permitted when TLS active");
        return;
    }
    if (s->n->tls == NULL) {
        reply(s, "-ERR TLS not available");
        return;
    }
    reply(s, "+OK Begin TLS negotiation");
    if (cf_conn_starttls(s->c, s->n->tls) != 0) {
        session_close(s, "starttls failed");
        return;
    }
    /* Discard anything that arrived with STLS (CVE-2011-0411); reset the parser. */
    s->inlen = 0;
    s->skipping = 0;
    s->have_user = 0;
    s->auth_cont = 0;
}

static void list_like(struct pop3_session *s, const struct pop3_cmd *cmd, int uidl)
{
    char line[64];
    if (cmd->has_msg) {
        struct pop3_msg *m = lookup_msg(s, cmd->msg);
        if (m == NULL) return;
        if (uidl) {
            char u[17];
            pop3_uidl(s->uidvalidity, m->uid, u);
            reply(s, "+OK %u %s", (unsigned)cmd->msg, u);
        } else {
            reply(s, "+OK %u %llu", (unsigned)cmd->msg, (unsigned long long)m->size);
        }
        return;
    }
    /* Multi-line: batch lines into 4 KiB writes. */
    char buf[4096];
    size_t o = 0;
    int k = snprintf(buf, sizeof(buf), "+OK\r\n");
    o = (size_t)k;
    for (size_t i = 0; i < s->nmsgs; i++) {
        if (s->msgs[i].deleted) continue;
        if (uidl) {
            char u[17];
            pop3_uidl(s->uidvalidity, s->msgs[i].uid, u);
            k = snprintf(line, sizeof(line), "%zu %s\r\n", i + 1, u);
        } else {
            k = snprintf(line, sizeof(line), "%zu %llu\r\n", i + 1,
                         (unsigned long long)s->msgs[i].size);
        }
        if (o + (size_t)k > sizeof(buf)) {
            cf_conn_write(s->c, buf, o);
            o = 0;
        }
        memcpy(buf + o, line, (size_t)k);
        o += (size_t)k;
    }
    if (o + 3 > sizeof(buf)) {
        cf_conn_write(s->c, buf, o);
        o = 0;
    }
    memcpy(buf + o, ".\r\n", 3);
    o += 3;
    cf_conn_write(s->c, buf, o);
}

/* XCLIENT ADDR=<ip> [PORT=<n>] (as Dovecot's POP3 proxying does): a trusted
 * proxy passes the client's address for the audit log. Others get -ERR. */
static void cmd_xclient(struct pop3_session *s, const struct pop3_cmd *cmd)
{
    const char *p = cmd->arg, *end = cmd->arg + cmd->arg_len;
    int took = 0;

    if (!s->trusted_proxy) {
        bad_command(s, "XCLIENT is only accepted from trusted proxies");
        return;
    }
    while (p < end) {
        const char *sp = memchr(p, ' ', (size_t)(end - p));
        size_t n = sp ? (size_t)(sp - p) : (size_t)(end - p);
        if (n > 5 && strncasecmp(p, "ADDR=", 5) == 0 && n - 5 < sizeof(s->client)) {
            char ip[sizeof(s->client)];
            unsigned char tmp[sizeof(struct in6_addr)];
            memcpy(ip, p + 5, n - 5);
            ip[n - 5] = '\0';
            if (inet_pton(AF_INET, ip, tmp) == 1 || inet_pton(AF_INET6, ip, tmp) == 1) {
                if (s->proxy[0] == '\0') snprintf(s->proxy, sizeof(s->proxy), "%s", s->client);
                snprintf(s->client, sizeof(s->client), "%s", ip);
                took = 1;
            }
        }
        p += n;
        while (p < end && *p == ' ')
            p++;
    }
    if (!took) {
        reply(s, "-ERR XCLIENT needs ADDR=<ip address>");
        return;
    }
    cf_info("pop3 %s: client address %s passed by trusted proxy", s->proxy, s->client);
    reply(s, "+OK");
}

static void handle_auth_state(struct pop3_session *s, const struct pop3_cmd *cmd)
{
    switch (cmd->id) {
    case POP3_CMD_USER:
        if (!plaintext_ok(s)) {
            cf_log_audit_login("pop3", "", s->client, s->proxy[0] ? s->proxy : NULL,
                               "plaintext-refused");
            reply(s, "-ERR [AUTH] Plaintext authentication disallowed; use STLS");
            return;
        }
        memcpy(s->user, cmd->arg, cmd->arg_len);
        s->user[cmd->arg_len] = '\0';
        s->have_user = 1;
        reply(s, "+OK");
        return;
    case POP3_CMD_PASS: {
        if (!plaintext_ok(s)) {
            cf_log_audit_login("pop3", "", s->client, s->proxy[0] ? s->proxy : NULL,
                               "plaintext-refused");
            reply(s, "-ERR [AUTH] Plaintext authentication disallowed; use STLS");
            return;
        }
        if (!s->have_user) {
            bad_command(s, "USER first");
            return;
        }
        char pass[POP3_MAX_ARG + 1];
        memcpy(pass, cmd->arg, cmd->arg_len);
        pass[cmd->arg_len] = '\0';
        start_auth(s, s->user, pass, cmd->arg_len);
        OPENSSL_cleanse(pass, sizeof(pass));
        return;
    }
    case POP3_CMD_AUTH:
        if (cmd->arg_len == 0) {
            if (plaintext_ok(s))
                cf_conn_write(s->c, "+OK\r\nPLAIN\r\n.\r\n", 15);
            else
                cf_conn_write(s->c, "+OK\r\n.\r\n", 8);
            return;
        }
        if (!plaintext_ok(s)) {
            cf_log_audit_login("pop3", "", s->client, s->proxy[0] ? s->proxy : NULL,
                               "plaintext-refused");
            reply(s, "-ERR [AUTH] Plaintext authentication disallowed; use STLS");
            return;
        }
        if (cmd->arg_len != 5 || strncasecmp(cmd->arg, "PLAIN", 5) != 0) {
            reply(s, "-ERR Unsupported authentication mechanism");
            return;
        }
        if (cmd->arg2 != NULL) {
            auth_plain_response(s, cmd->arg2, cmd->arg2_len);
            return;
        }
        cf_conn_write(s->c, "+ \r\n", 4);
        s->auth_cont = 1;
        return;
    case POP3_CMD_CAPA:
        cmd_capa(s);
        return;
    case POP3_CMD_STLS:
        cmd_stls(s);
        return;
    case POP3_CMD_XCLIENT:
        cmd_xclient(s, cmd);
        return;
    case POP3_CMD_QUIT:
        do_quit(s);
        return;
    default:
        bad_command(s, "Not logged in");
        return;
    }
}

static void handle_trans_state(struct pop3_session *s, const struct pop3_cmd *cmd)
{
    struct pop3_msg *m;
    switch (cmd->id) {
    case POP3_CMD_STAT: {
        uint64_t n = 0, sz = 0;
        for (size_t i = 0; i < s->nmsgs; i++) {
            if (!s->msgs[i].deleted) {
                n++;
                sz += s->msgs[i].size;
            }
        }
        reply(s, "+OK %llu %llu", (unsigned long long)n, (unsigned long long)sz);
        return;
    }
    case POP3_CMD_LIST:
        list_like(s, cmd, 0);
        return;
    case POP3_CMD_UIDL:
        list_like(s, cmd, 1);
        return;
    case POP3_CMD_RETR:
        if ((m = lookup_msg(s, cmd->msg)) != NULL) start_stream(s, m, 0, 0);
        return;
    case POP3_CMD_TOP:
        if ((m = lookup_msg(s, cmd->msg)) != NULL) start_stream(s, m, 1, cmd->lines);
        return;
    case POP3_CMD_DELE:
        if ((m = lookup_msg(s, cmd->msg)) != NULL) {
            m->deleted = 1;
            reply(s, "+OK Marked to be deleted");
        }
        return;
    case POP3_CMD_NOOP:
        reply(s, "+OK");
        return;
    case POP3_CMD_RSET:
        for (size_t i = 0; i < s->nmsgs; i++)
            s->msgs[i].deleted = 0;
        reply(s, "+OK %zu messages", s->nmsgs);
        return;
    case POP3_CMD_QUIT:
        do_quit(s);
        return;
    case POP3_CMD_CAPA:
        cmd_capa(s);
        return;
    case POP3_CMD_USER:
    case POP3_CMD_PASS:
    case POP3_CMD_AUTH:
    case POP3_CMD_STLS:
    case POP3_CMD_XCLIENT:
        reply(s, "-ERR Already logged in");
        return;
    }
}

static void handle_line(struct pop3_session *s, const char *line, size_t len)
{
    struct pop3_cmd cmd;
    int rc;
    if (s->auth_cont) {
        s->auth_cont = 0;
        auth_plain_response(s, line, len);
        return;
    }
    rc = pop3_parse_line(line, len, &cmd);
    switch (rc) {
    case POP3_PARSE_OK:
        break;
    case POP3_PARSE_TOOLONG:
        bad_command(s, "Line too long");
        return;
    case POP3_PARSE_BADARGS:
        bad_command(s, "Invalid arguments");
        return;
    default:
        bad_command(s, "Unknown command");
        return;
    }
    if (s->state == ST_AUTHORIZATION)
        handle_auth_state(s, &cmd);
    else
        handle_trans_state(s, &cmd);
}

static void process_input(struct pop3_session *s)
{
    char line[POP3_MAX_AUTH_LINE + 1];
    while (!s->busy && !s->closing && !s->conn_gone && s->inlen > 0) {
        size_t consumed, ll = 0;
        if (s->skipping) {
            int found;
            consumed = pop3_skip_line(s->in, s->inlen, &found);
            memmove(s->in, s->in + consumed, s->inlen - consumed);
            s->inlen -= consumed;
            if (found) s->skipping = 0;
            continue;
        }
        long r = pop3_split_line(s->in, s->inlen, POP3_MAX_AUTH_LINE, &ll);
        if (r == 0) break;
        if (r < 0) {
            s->skipping = 1;
            s->auth_cont = 0;
            bad_command(s, "Line too long");
            continue;
        }
        memcpy(line, s->in, ll);
        line[ll] = '\0';
        consumed = (size_t)r;
        memmove(s->in, s->in + consumed, s->inlen - consumed);
        s->inlen -= consumed;
        handle_line(s, line, ll);
        OPENSSL_cleanse(line, ll);
    }
}

static void kick(struct pop3_session *s)
{
    process_input(s);
    if (s->read_paused && !s->conn_gone && !s->closing && s->inlen < sizeof(s->in) / 2) {
        s->read_paused = 0;
        cf_conn_resume_read(s->c);
    }
}

/* ---- cf_conn callbacks ---- */

static size_t on_read(struct cf_conn *c, void *data, const char *buf, size_t len)
{
    struct pop3_session *s = data;
    (void)c;
    if (s->closing || s->conn_gone) return len;
    size_t room = sizeof(s->in) - s->inlen;
    size_t take = len < room ? len : room;
    memcpy(s->in + s->inlen, buf, take);
    s->inlen += take;
    process_input(s);
    if (take < len && !s->read_paused && !s->conn_gone && !s->closing) {
        s->read_paused = 1;
        cf_conn_pause_read(s->c);
    }
    return take;
}

static void on_drain(struct cf_conn *c, void *data)
{
    struct pop3_session *s = data;
    (void)c;
    if (s->st != NULL) {
        stream_pump(s);
        if (!s->busy) kick(s);
    }
}

static void on_tls_ready(struct cf_conn *c, void *data)
{
    struct pop3_session *s = data;
    (void)c;
    /* A refusal on an implicit-TLS port is queued at accept and can only be
     * read by the client after the handshake: close now that it is done. */
    if (s != NULL && s->refuse_on_tls && !s->conn_gone) {
        s->refuse_on_tls = 0;
        cf_conn_close(s->c, 1, "refused");
    }
}

static void on_timeout(struct cf_conn *c, void *data)
{
    struct pop3_session *s = data;
    (void)c;
    if (!s->closing) cf_conn_write(s->c, "-ERR Disconnected for inactivity\r\n", 34);
}

static void on_close(struct cf_conn *c, void *data, const char *reason)
{
    struct pop3_session *s = data;
    (void)c;
    if (s == NULL) return;
    cf_debug("pop3: %s closed: %s", s->client, reason ? reason : "");
    s->conn_gone = 1;
    if (s->auth_req != NULL) {
        auth_cancel(s->auth_req);
        s->auth_req = NULL;
    }
    stream_abandon(s);
    if (s->prev)
        s->prev->next = s->next;
    else if (g_sessions == s)
        g_sessions = s->next;
    if (s->next) s->next->prev = s->prev;
    s->next = s->prev = NULL;
    if (s->n->pop3_sessions > 0) s->n->pop3_sessions--;
    if (s->n->total_sessions > 0) s->n->total_sessions--;
    session_maybe_free(s);
}

static const struct cf_conn_ops pop3_ops = {
    .on_read = on_read,
    .on_drain = on_drain,
    .on_tls_ready = on_tls_ready,
    .on_timeout = on_timeout,
    .on_close = on_close,
};

void pop3_accept(struct node *n, uv_stream_t *server, int implicit_tls)
{
    struct pop3_session *s = calloc(1, sizeof(*s));
    if (s == NULL) {
        cf_error("pop3: out of memory");
        /* Still take the connection off the backlog. */
        struct cf_conn *c = cf_conn_accept(n->loop, server, NULL, &pop3_ops, NULL);
        if (c != NULL) cf_conn_close(c, 0, "out of memory");
        return;
    }
    s->n = n;
    SSL_CTX *ctx = implicit_tls == LISTEN_PROXY ? n->proxy_tls : implicit_tls ? n->tls : NULL;
    if (implicit_tls && ctx == NULL) {
        cf_error("pop3: implicit TLS listener without a TLS context");
        free(s);
        return;
    }
    /* The proxy listener requires a client certificate from tls.ca. */
    s->trusted_proxy = implicit_tls == LISTEN_PROXY;
    s->c = cf_conn_accept(n->loop, server, ctx, &pop3_ops, s);
    if (s->c == NULL) {
        free(s);
        return;
    }
    snprintf(s->client, sizeof(s->client), "%s", cf_conn_peer(s->c));
    s->next = g_sessions;
    if (g_sessions) g_sessions->prev = s;
    g_sessions = s;
    int full = n->cfg->max_sessions && n->total_sessions >= n->cfg->max_sessions;
    n->pop3_sessions++;
    n->total_sessions++;
    cf_conn_set_max_unconsumed(s->c, 64 * 1024);
    cf_conn_set_idle_timeout(s->c, n->cfg->preauth_timeout_ms);
    const char *refusal = NULL;
    char nl[192];
    if (n->stopping)
        refusal = "server shutting down";
    else if (n->rep != NULL && !rep_is_leader(n->rep))
        refusal = node_not_leader_text(n, nl, sizeof nl) + strlen("[UNAVAILABLE] ");
    else if (full)
        refusal = "Too many sessions, try again later";
    if (refusal != NULL) {
        reply(s, "-ERR [SYS/TEMP] %s", refusal);
        if (implicit_tls) {
            s->refuse_on_tls = 1; /* closed in on_tls_ready (or by the timeout) */
            s->closing = 1;       /* ignore any input meanwhile */
        } else {
            session_close(s, refusal);
        }
        return;
    }
    reply(s, "+OK Coffer POP3 ready");
}

void pop3_close_all(struct node *n, const char *reason)
{
    struct pop3_session *s, *next;
    for (s = g_sessions; s != NULL; s = next) {
        next = s->next;
        if (s->n != n) continue;
        reply(s, "-ERR [SYS/TEMP] %s", reason ? reason : "server shutting down");
        session_close(s, reason ? reason : "shutdown");
    }
}
