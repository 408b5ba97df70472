/* imap_search: SEARCH / UID SEARCH (RFC 3501 6.4.4, every key; CHARSET
 * US-ASCII and UTF-8; CONDSTORE's MODSEQ key, RFC 7162 3.1.5).
 *
 * The search program is parsed into a bounded tree (depth and node count
 * limits) and evaluated per message, cheapest tests first: record tests
 * (flags, size, dates, uid, sequence number) before the Date: header and
 * before header/body text matching, which needs the message bytes.
 *
 * The parse/evaluate core (imap_search_parse, imap_search_eval,
 * imap_search_free) is pure and used by tests/unit/test_imap_search.c;
 * its declarations below are repeated there (they belong in
 * imap_internal.h, owned by the lead).
 */
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "cf_log.h"
#include "imap_internal.h"
#include "mime.h"

/* ---- pure core: declarations (mirrored in tests/unit/test_imap_search.c) ---- */

enum search_op {
    SK_ALL = 1,
    SK_AND,    /* children, all must match */
    SK_OR,     /* two children */
    SK_NOT,    /* one child */
    SK_FLAGS,  /* all bits of `flags` set */
    SK_NFLAGS, /* all bits of `flags` clear */
    SK_KEYWORD,
    SK_UNKEYWORD,
    SK_RECENT,
    SK_NEW, /* recent and unseen */
    SK_OLD, /* not recent */
    SK_LARGER,
    SK_SMALLER,
    SK_BEFORE, /* INTERNALDATE's date (own zone) < day */
    SK_ON,
    SK_SINCE, /* >= day */
    SK_SENTBEFORE,
    SK_SENTON,
    SK_SENTSINCE,
    SK_UIDSET,
    SK_SEQSET,
    SK_MODSEQ, /* modseq >= num */
    SK_HEADER, /* field (NULL never), str */
    SK_BODY,
    SK_TEXT,
};

struct search_key {
    enum search_op op;
    unsigned cost; /* 0 record, 1 Date: header, 2 header/body text */
    uint32_t flags;
    int64_t num; /* size, day number, modseq */
    char *str;   /* keyword or needle */
    char *field; /* HEADER field name */
    struct imap_seq_range *ranges;
    size_t n_ranges;
    struct search_key *child; /* first child (AND/OR/NOT) */
    struct search_key *next;  /* next sibling */
};

struct search_limits {
    size_t max_depth;  /* nesting of lists / NOT / OR */
    size_t max_nodes;  /* keys in total */
    size_t max_ranges; /* per sequence set */
};

/* What the evaluator knows about one message without reading it. */
struct search_rec {
    uint32_t msn, uid;
    uint32_t flags;
    const char *keywords; /* NUL-separated */
    size_t keywords_len;
    uint64_t size;
    int64_t internal_date; /* UTC seconds */
    int32_t internal_tz_min;
    int recent;
    uint64_t modseq;
};

/* Expensive tests, supplied by the caller (the session reads the message;
 * the unit test fakes it). */
struct search_io {
    /* Day number (days since 1970-01-01) of the Date: header in its own
     * zone; returns 1, or 0 when there is no valid Date:. */
    int (*sent_day)(void *arg, int64_t *day_r);
    /* HEADER/BODY/TEXT key: 1 match, 0 not. */
    int (*content)(void *arg, const struct search_key *k);
    void *arg;
};

/* Parse search keys args[0..n) (after CHARSET) into a tree. star_msn /
 * star_uid are what '*' means in sequence / UID sets. Returns 0 and the
 * tree in *root_r (free with imap_search_free), or -1 with a static reason
 * in *error_r (reply BAD). *has_modseq_r is set when a MODSEQ key is used. */
int imap_search_parse(const struct imap_arg *args, size_t n, uint32_t star_msn, uint32_t star_uid,
                      const struct search_limits *lim, struct search_key **root_r,
                      int *has_modseq_r, const char **error_r);
void imap_search_free(struct search_key *k);
/* 1 when the message matches, 0 when not. */
int imap_search_eval(const struct search_key *k, const struct search_rec *r,
                     const struct search_io *io);
/* Days since epoch of a UTC time shifted by a zone offset (floor). */
int64_t imap_search_day(int64_t utc, int32_t tz_min);

/* ---- pure core: parser ---- */

struct sparse {
    uint32_t star_msn, star_uid;
    const struct search_limits *lim;
    size_t nodes;
    int has_modseq;
    const char *err;
};

int64_t imap_search_day(int64_t utc, int32_t tz_min)
{
    int64_t t = utc + (int64_t)tz_min * 60;
    int64_t d = t / 86400;
    if (t % 86400 < 0) d--;
    return d;
}

void imap_search_free(struct search_key *k)
{
    while (k) {
        struct search_key *next = k->next;
        imap_search_free(k->child);
        free(k->str);
        free(k->field);
        free(k->ranges);
        free(k);
        k = next;
    }
}

static struct search_key *key_new(struct sparse *p, enum search_op op, unsigned cost)
{
    if (p->nodes >= p->lim->max_nodes) {
        p->err = "Too many search keys";
        return NULL;
    }
    struct search_key *k = calloc(1, sizeof(*k));
    if (!k) {
        p->err = "Out of memory";
        return NULL;
    }
    p->nodes++;
    k->op = op;
    k->cost = cost;
    return k;
}

static int arg_string(const struct imap_arg *a)
{
    return a->type == IMAP_ARG_ATOM || a->type == IMAP_ARG_QUOTED || a->type == IMAP_ARG_LITERAL;
}

/* Copy of a string argument; NULs inside literals are refused. */
static char *arg_dup(struct sparse *p, const struct imap_arg *a)
{
    if (!arg_string(a)) {
        p->err = "String expected";
        return NULL;
    }
    if (memchr(a->str, '\0', a->len)) {
        p->err = "NUL in search string";
        return NULL;
    }
    char *s = strndup(a->str, a->len);
    if (!s) p->err = "Out of memory";
    return s;
}

static int parse_number(const char *s, size_t len, uint64_t max, uint64_t *v_r)
{
    uint64_t v = 0;
    if (len == 0 || len > 20) return -1;
    for (size_t i = 0; i < len; i++) {
        if (s[i] < '0' || s[i] > '9') return -1;
        unsigned d = (unsigned)(s[i] - '0');
        if (v > (max - d) / 10) return -1;
        v = v * 10 + d;
    }
    *v_r = v;
    return 0;
}

static int is_seqset_atom(const struct imap_arg *a)
{
    if (a->type != IMAP_ARG_ATOM || a->len == 0) return 0;
    for (size_t i = 0; i < a->len; i++) {
        char c = a->str[i];
        if (!((c >= '0' && c <= '9') || c == ':' || c == ',' || c == '*')) return 0;
    }
    return 1;
}

static struct search_key *parse_one(struct sparse *p, const struct imap_arg *args, size_t n,
                                    size_t *i, size_t depth);

/* Keys args[*i..n) as an AND node (or the single key itself). */
static struct search_key *parse_list(struct sparse *p, const struct imap_arg *args, size_t n,
                                     size_t depth)
{
    if (n == 0) {
        p->err = "Missing search key";
        return NULL;
    }
    size_t i = 0;
    struct search_key *first = NULL, *last = NULL;
    size_t count = 0;
    while (i < n) {
        struct search_key *k = parse_one(p, args, n, &i, depth);
        if (!k) {
            imap_search_free(first);
            return NULL;
        }
        if (last)
            last->next = k;
        else
            first = k;
        last = k;
        count++;
    }
    if (count == 1) return first;
    struct search_key *and = key_new(p, SK_AND, 0);
    if (!and) {
        imap_search_free(first);
        return NULL;
    }
    and->child = first;
    for (struct search_key *c = first; c; c = c->next)
        if (c->cost > and->cost) and->cost = c->cost;
    return and;
}

struct key_def {
    const char *name;
    enum search_op op;
    uint32_t flags;
    enum { KA_NONE, KA_STRING, KA_HEADER, KA_ATOM, KA_NUMBER, KA_DATE, KA_SET, KA_MODSEQ } arg;
    const char *field; /* header field for FROM/TO/... */
};

static const struct key_def key_defs[] = {
    {"ALL", SK_ALL, 0, KA_NONE, NULL},
    {"ANSWERED", SK_FLAGS, STORE_F_ANSWERED, KA_NONE, NULL},
    {"BCC", SK_HEADER, 0, KA_STRING, "BCC"},
    {"BEFORE", SK_BEFORE, 0, KA_DATE, NULL},
    {"BODY", SK_BODY, 0, KA_STRING, NULL},
    {"CC", SK_HEADER, 0, KA_STRING, "CC"},
    {"DELETED", SK_FLAGS, STORE_F_DELETED, KA_NONE, NULL},
    {"DRAFT", SK_FLAGS, STORE_F_DRAFT, KA_NONE, NULL},
    {"FLAGGED", SK_FLAGS, STORE_F_FLAGGED, KA_NONE, NULL},
    {"FROM", SK_HEADER, 0, KA_STRING, "FROM"},
    {"HEADER", SK_HEADER, 0, KA_HEADER, NULL},
    {"KEYWORD", SK_KEYWORD, 0, KA_ATOM, NULL},
    {"LARGER", SK_LARGER, 0, KA_NUMBER, NULL},
    {"MODSEQ", SK_MODSEQ, 0, KA_MODSEQ, NULL},
    {"NEW", SK_NEW, 0, KA_NONE, NULL},
    {"OLD", SK_OLD, 0, KA_NONE, NULL},
    {"ON", SK_ON, 0, KA_DATE, NULL},
    {"RECENT", SK_RECENT, 0, KA_NONE, NULL},
    {"SEEN", SK_FLAGS, STORE_F_SEEN, KA_NONE, NULL},
    {"SENTBEFORE", SK_SENTBEFORE, 0, KA_DATE, NULL},
    {"SENTON", SK_SENTON, 0, KA_DATE, NULL},
    {"SENTSINCE", SK_SENTSINCE, 0, KA_DATE, NULL},
    {"SINCE", SK_SINCE, 0, KA_DATE, NULL},
    {"SMALLER", SK_SMALLER, 0, KA_NUMBER, NULL},
    {"SUBJECT", SK_HEADER, 0, KA_STRING, "SUBJECT"},
    {"TEXT", SK_TEXT, 0, KA_STRING, NULL},
    {"TO", SK_HEADER, 0, KA_STRING, "TO"},
    {"UID", SK_UIDSET, 0, KA_SET, NULL},
    {"UNANSWERED", SK_NFLAGS, STORE_F_ANSWERED, KA_NONE, NULL},
    {"UNDELETED", SK_NFLAGS, STORE_F_DELETED, KA_NONE, NULL},
    {"UNDRAFT", SK_NFLAGS, STORE_F_DRAFT, KA_NONE, NULL},
    {"UNFLAGGED", SK_NFLAGS, STORE_F_FLAGGED, KA_NONE, NULL},
    {"UNKEYWORD", SK_UNKEYWORD, 0, KA_ATOM, NULL},
    {"UNSEEN", SK_NFLAGS, STORE_F_SEEN, KA_NONE, NULL},
};

static unsigned op_cost(enum search_op op)
{
    switch (op) {
    case SK_SENTBEFORE:
    case SK_SENTON:
    case SK_SENTSINCE:
        return 1;
    case SK_HEADER:
    case SK_BODY:
    case SK_TEXT:
        return 2;
    default:
        return 0;
    }
}

static int parse_set(struct sparse *p, const struct imap_arg *a, uint32_t star,
                     struct search_key *k)
{
    if (!is_seqset_atom(a) ||
        imap_seqset_parse(a->str, a->len, star, &k->ranges, &k->n_ranges, p->lim->max_ranges) < 0) {
        p->err = "Invalid sequence set";
        return -1;
    }
    return 0;
}

static struct search_key *parse_one(struct sparse *p, const struct imap_arg *args, size_t n,
                                    size_t *i, size_t depth)
{
    if (depth >= p->lim->max_depth) {
        p->err = "Search program nested too deeply";
        return NULL;
    }
    if (*i >= n) {
        p->err = "Missing search key";
        return NULL;
    }
    const struct imap_arg *a = &args[(*i)++];
    if (a->type == IMAP_ARG_LIST) {
        if (a->n_list == 0) {
            p->err = "Empty search key list";
            return NULL;
        }
        return parse_list(p, a->list, a->n_list, depth + 1);
    }
    if (a->type != IMAP_ARG_ATOM) {
        p->err = "Search key expected";
        return NULL;
    }
    if (is_seqset_atom(a)) {
        struct search_key *k = key_new(p, SK_SEQSET, 0);
        if (!k) return NULL;
        if (parse_set(p, a, p->star_msn, k) < 0) {
            imap_search_free(k);
            return NULL;
        }
        return k;
    }
    if (imap_arg_eq(a, "NOT") || imap_arg_eq(a, "OR")) {
        int is_or = imap_arg_eq(a, "OR");
        struct search_key *k = key_new(p, is_or ? SK_OR : SK_NOT, 0);
        if (!k) return NULL;
        struct search_key *c1 = parse_one(p, args, n, i, depth + 1);
        if (!c1) {
            imap_search_free(k);
            return NULL;
        }
        k->child = c1;
        k->cost = c1->cost;
        if (is_or) {
            struct search_key *c2 = parse_one(p, args, n, i, depth + 1);
            if (!c2) {
                imap_search_free(k);
                return NULL;
            }
            c1->next = c2;
            if (c2->cost > k->cost) k->cost = c2->cost;
        }
        return k;
    }
    const struct key_def *d = NULL;
    for (size_t j = 0; j < sizeof(key_defs) / sizeof(key_defs[0]); j++) {
        if (imap_arg_eq(a, key_defs[j].name)) {
            d = &key_defs[j];
            break;
        }
    }
    if (!d) {
        p->err = "Unknown search key";
        return NULL;
    }
    struct search_key *k = key_new(p, d->op, op_cost(d->op));
    if (!k) return NULL;
    k->flags = d->flags;
    const struct imap_arg *v = NULL;
    if (d->arg != KA_NONE) {
        if (*i >= n) {
            p->err = "Missing search key argument";
            goto fail;
        }
        v = &args[(*i)++];
    }
    uint64_t num;
    switch (d->arg) {
    case KA_NONE:
        break;
    case KA_STRING:
        if (!(k->str = arg_dup(p, v))) goto fail;
        if (d->field && !(k->field = strdup(d->field))) {
            p->err = "Out of memory";
            goto fail;
        }
        break;
    case KA_HEADER:
        if (!(k->field = arg_dup(p, v))) goto fail;
        if (k->field[0] == '\0' || strchr(k->field, ':')) {
            p->err = "Invalid header field name";
            goto fail;
        }
        if (*i >= n) {
            p->err = "Missing search key argument";
            goto fail;
        }
        if (!(k->str = arg_dup(p, &args[(*i)++]))) goto fail;
        break;
    case KA_ATOM:
        if (v->type != IMAP_ARG_ATOM || v->len == 0) {
            p->err = "Keyword expected";
            goto fail;
        }
        if (!(k->str = arg_dup(p, v))) goto fail;
        break;
    case KA_NUMBER:
        if (v->type != IMAP_ARG_ATOM || parse_number(v->str, v->len, UINT32_MAX, &num) < 0) {
            p->err = "Number expected";
            goto fail;
        }
        k->num = (int64_t)num;
        break;
    case KA_DATE: {
        int64_t day;
        if ((v->type != IMAP_ARG_ATOM && v->type != IMAP_ARG_QUOTED) ||
            imap_parse_date(v->str, v->len, &day) < 0) {
            p->err = "Invalid date";
            goto fail;
        }
        k->num = day;
        break;
    }
    case KA_SET:
        if (parse_set(p, v, p->star_uid, k) < 0) goto fail;
        break;
    case KA_MODSEQ:
        /* MODSEQ [entry-name entry-type-req] mod-sequence-valzer */
        if (v->type == IMAP_ARG_QUOTED) {
            if (*i + 1 >= n) {
                p->err = "Missing search key argument";
                goto fail;
            }
            const struct imap_arg *t = &args[(*i)++];
            if (!imap_arg_eq(t, "priv") && !imap_arg_eq(t, "shared") && !imap_arg_eq(t, "all")) {
                p->err = "Invalid MODSEQ entry type";
                goto fail;
            }
            v = &args[(*i)++];
        }
        if (v->type != IMAP_ARG_ATOM ||
            parse_number(v->str, v->len, (uint64_t)INT64_MAX, &num) < 0) {
            p->err = "Invalid mod-sequence";
            goto fail;
        }
        k->num = (int64_t)num;
        p->has_modseq = 1;
        break;
    }
    return k;
fail:
    imap_search_free(k);
    return NULL;
}

int imap_search_parse(const struct imap_arg *args, size_t n, uint32_t star_msn, uint32_t star_uid,
                      const struct search_limits *lim, struct search_key **root_r,
                      int *has_modseq_r, const char **error_r)
{
    struct sparse p = {.star_msn = star_msn, .star_uid = star_uid, .lim = lim};
    struct search_key *root = parse_list(&p, args, n, 0);
    if (!root) {
        *error_r = p.err ? p.err : "Invalid search program";
        return -1;
    }
    *root_r = root;
    if (has_modseq_r) *has_modseq_r = p.has_modseq;
    return 0;
}

/* ---- pure core: evaluation ---- */

static int has_keyword(const struct search_rec *r, const char *kw)
{
    const char *p = r->keywords, *end = r->keywords + r->keywords_len;
    size_t kl = strlen(kw);
    while (p && p < end) {
        const char *z = memchr(p, '\0', (size_t)(end - p));
        size_t l = z ? (size_t)(z - p) : (size_t)(end - p);
        if (l == kl && strncasecmp(p, kw, l) == 0) return 1;
        p += l + 1;
    }
    return 0;
}

static int eval_sent(const struct search_key *k, const struct search_io *io)
{
    int64_t day;
    if (!io || !io->sent_day || !io->sent_day(io->arg, &day)) return 0;
    switch (k->op) {
    case SK_SENTBEFORE:
        return day < k->num;
    case SK_SENTON:
        return day == k->num;
    default:
        return day >= k->num;
    }
}

int imap_search_eval(const struct search_key *k, const struct search_rec *r,
                     const struct search_io *io)
{
    switch (k->op) {
    case SK_ALL:
        return 1;
    case SK_AND:
        /* cheapest children first; stop at the first failure */
        for (unsigned cost = 0; cost <= 2; cost++)
            for (const struct search_key *c = k->child; c; c = c->next)
                if (c->cost == cost && !imap_search_eval(c, r, io)) return 0;
        return 1;
    case SK_OR:
        for (unsigned cost = 0; cost <= 2; cost++)
            for (const struct search_key *c = k->child; c; c = c->next)
                if (c->cost == cost && imap_search_eval(c, r, io)) return 1;
        return 0;
    case SK_NOT:
        return !imap_search_eval(k->child, r, io);
    case SK_FLAGS:
        return (r->flags & k->flags) == k->flags;
    case SK_NFLAGS:
        return (r->flags & k->flags) == 0;
    case SK_KEYWORD:
        return has_keyword(r, k->str);
    case SK_UNKEYWORD:
        return !has_keyword(r, k->str);
    case SK_RECENT:
        return r->recent != 0;
    case SK_NEW:
        return r->recent && !(r->flags & STORE_F_SEEN);
    case SK_OLD:
        return !r->recent;
    case SK_LARGER:
        return r->size > (uint64_t)k->num;
    case SK_SMALLER:
        return r->size < (uint64_t)k->num;
    case SK_BEFORE:
        return imap_search_day(r->internal_date, r->internal_tz_min) < k->num;
    case SK_ON:
        return imap_search_day(r->internal_date, r->internal_tz_min) == k->num;
    case SK_SINCE:
        return imap_search_day(r->internal_date, r->internal_tz_min) >= k->num;
    case SK_SENTBEFORE:
    case SK_SENTON:
    case SK_SENTSINCE:
        return eval_sent(k, io);
    case SK_UIDSET:
        return imap_seqset_contains(k->ranges, k->n_ranges, r->uid);
    case SK_SEQSET:
        return imap_seqset_contains(k->ranges, k->n_ranges, r->msn);
    case SK_MODSEQ:
        return r->modseq >= (uint64_t)k->num;
    case SK_HEADER:
    case SK_BODY:
    case SK_TEXT:
        if (!io || !io->content) return 0;
        return io->content(io->arg, k) > 0;
    }
    return 0;
}

/* ---- the command ---- */

#define SEARCH_MAX_DEPTH 64
#define SEARCH_MAX_NODES 2000
#define SEARCH_MAX_RANGES 10000

/* Per-message lazy state for the expensive tests. */
struct smsg {
    struct store *st;
    MDB_txn *txn;
    const struct store_msg *m;
    int blob_state; /* 0 not loaded, 1 loaded, -1 unavailable */
    const char *msg;
    size_t len;
    int tree_state;
    struct mime_tree tree;
    int sent_state; /* 0 unknown, 1 known, -1 none */
    int64_t sent_day;
};

static int smsg_blob(struct smsg *x)
{
    if (x->blob_state == 0) {
        x->blob_state = -1;
        if (store_blob_get(x->st, x->txn, x->m->blob_id, &x->msg, &x->len) == 0) x->blob_state = 1;
    }
    return x->blob_state == 1;
}

static int smsg_tree(struct smsg *x)
{
    if (x->tree_state == 0) {
        x->tree_state = -1;
        if (!smsg_blob(x)) return 0;
        struct store_cache c;
        if (store_blob_cache(x->st, x->txn, x->m->blob_id, &c) == 0 &&
            mime_tree_deserialize(c.parts, c.parts_len, x->len, &x->tree) == 0)
            x->tree_state = 1;
        else if (mime_tree_parse(x->msg, x->len, &x->tree) == 0)
            x->tree_state = 1;
    }
    return x->tree_state == 1;
}

static int smsg_sent_day(void *arg, int64_t *day_r)
{
    struct smsg *x = arg;
    if (x->sent_state == 0) {
        x->sent_state = -1;
        /* The date part of Date: in its own zone (RFC 3501 6.4.4) needs the
         * zone, which the cache does not keep: read the header. */
        if (smsg_tree(x) && x->tree.n_parts > 0) {
            const struct mime_part *root = &x->tree.parts[0];
            struct mbuf v = {0};
            int64_t utc;
            int tz;
            if (mime_header_get(x->msg + root->hdr_start, (size_t)(root->hdr_end - root->hdr_start),
                                "Date", &v) == 1 &&
                mime_parse_date(v.data, v.len, &utc, &tz) == 0) {
                x->sent_day = imap_search_day(utc, tz);
                x->sent_state = 1;
            }
            mbuf_free(&v);
        }
        if (x->sent_state < 0) {
            struct store_cache c;
            if (store_blob_cache(x->st, x->txn, x->m->blob_id, &c) == 0 && c.sent_date != 0) {
                x->sent_day = imap_search_day(c.sent_date, 0);
                x->sent_state = 1;
            }
        }
    }
    if (x->sent_state == 1) *day_r = x->sent_day;
    return x->sent_state == 1;
}

static int smsg_content(void *arg, const struct search_key *k)
{
    struct smsg *x = arg;
    if (!smsg_tree(x)) return 0;
    switch (k->op) {
    case SK_HEADER:
        return mime_search_header(x->msg, x->len, &x->tree, k->field, k->str) > 0;
    case SK_BODY:
        return mime_search_body(x->msg, x->len, &x->tree, k->str) > 0;
    case SK_TEXT:
        return mime_search_text(x->msg, x->len, &x->tree, k->str) > 0;
    default:
        return 0;
    }
}

/* One search: everything it needs is copied or owned, so it can run on a
 * worker thread with its own read transaction while the session waits. */
struct search_run {
    uv_work_t work;
    struct imap_session *s; /* loop thread only */
    struct store *st;
    uint64_t mailbox_id;
    MDB_txn *txn;
    struct search_key *root; /* owned */
    uint32_t *view;          /* owned copy of the session's view (UIDs by MSN) */
    size_t n_view, j;        /* merge cursor into the view */
    uint32_t recent_min_uid;
    int uid_mode, has_modseq, failed;
    struct mbuf out; /* " n n n" */
    size_t matches;
    uint64_t max_modseq;
    struct search_run *next; /* queue of searches waiting for a worker */
};

static int search_cb(const struct store_msg *m, void *arg)
{
    struct search_run *r = arg;
    while (r->j < r->n_view && r->view[r->j] < m->uid)
        r->j++;
    if (r->j >= r->n_view) return 1;       /* past the view: done */
    if (r->view[r->j] != m->uid) return 0; /* not in this session's view (not announced yet) */
    uint32_t msn = (uint32_t)(r->j + 1);
    struct search_rec rec = {
        .msn = msn,
        .uid = m->uid,
        .flags = m->flags,
        .keywords = m->keywords,
        .keywords_len = m->keywords_len,
        .size = m->size,
        .internal_date = m->internal_date,
        .internal_tz_min = m->internal_tz_min,
        .recent = r->recent_min_uid != 0 && m->uid >= r->recent_min_uid,
        .modseq = m->modseq,
    };
    struct smsg x = {.st = r->st, .txn = r->txn, .m = m};
    struct search_io io = {.sent_day = smsg_sent_day, .content = smsg_content, .arg = &x};
    if (imap_search_eval(r->root, &rec, &io)) {
        mbuf_printf(&r->out, " %u", r->uid_mode ? m->uid : msn);
        r->matches++;
        if (m->modseq > r->max_modseq) r->max_modseq = m->modseq;
    }
    if (x.tree_state == 1) mime_tree_free(&x.tree);
    return r->failed ? -1 : 0;
}

/* Runs on a worker thread (or inline for cheap searches): one read txn for
 * the whole search, bounded by the view. Touches no session state. */
static void search_exec(struct search_run *r)
{
    if (r->n_view == 0) return;
    r->txn = store_rtxn_begin(r->st);
    if (!r->txn) {
        r->failed = 1;
        return;
    }
    if (store_msg_foreach(r->st, r->txn, r->mailbox_id, r->view[0], r->view[r->n_view - 1],
                          search_cb, r) < 0)
        r->failed = 1;
    store_rtxn_end(r->txn);
    r->txn = NULL;
}

static void search_run_free(struct search_run *r)
{
    imap_search_free(r->root);
    free(r->view);
    mbuf_free(&r->out);
    free(r);
}

/* Reply on the loop thread. The session stayed allocated while busy; if its
 * connection closed meanwhile, imap_cmd_done frees it. */
static void search_reply(struct search_run *r)
{
    struct imap_session *s = r->s;
    const char *cname = r->uid_mode ? "UID SEARCH" : "SEARCH";
    if (s->conn == NULL) {
        imap_cmd_done(s, "NO", NULL, "Connection closed");
    } else if (r->failed) {
        cf_error("imap: search in mailbox %llu failed", (unsigned long long)r->mailbox_id);
        imap_cmd_done(s, "NO", "SERVERBUG", "Internal error");
    } else {
        struct mbuf line = {0};
        mbuf_puts(&line, "* SEARCH");
        if (r->out.len) mbuf_put(&line, r->out.data, r->out.len);
        if (r->has_modseq && r->matches > 0)
            mbuf_printf(&line, " (MODSEQ %llu)", (unsigned long long)r->max_modseq);
        mbuf_puts(&line, "\r\n");
        cf_conn_write(s->conn, line.data, line.len);
        mbuf_free(&line);
        imap_cmd_done(s, "OK", NULL, "%s completed", cname);
    }
    search_run_free(r);
}

/* Searches that read messages (HEADER, BODY, TEXT, SENT*) or walk a big
 * view run on the libuv threadpool, at most SEARCH_WORKERS at once per
 * process (the pool is shared with password hashing and disk work); the
 * rest wait in FIFO order. Cheap ones run inline. */
#define SEARCH_WORKERS 2
#define SEARCH_INLINE_MAX_VIEW 20000

static struct {
    unsigned running;
    struct search_run *head, *tail;
} search_q;

static void search_start_next(uv_loop_t *loop);

static void search_work(uv_work_t *w)
{
    search_exec(w->data);
}

static void search_after(uv_work_t *w, int status)
{
    struct search_run *r = w->data;
    uv_loop_t *loop = w->loop;
    search_q.running--;
    if (status != 0) r->failed = 1;
    search_reply(r);
    search_start_next(loop);
}

static void search_start_next(uv_loop_t *loop)
{
    while (search_q.running < SEARCH_WORKERS && search_q.head) {
        struct search_run *r = search_q.head;
        search_q.head = r->next;
        if (!search_q.head) search_q.tail = NULL;
        r->next = NULL;
        r->work.data = r;
        if (uv_queue_work(loop, &r->work, search_work, search_after) != 0) {
            search_exec(r); /* cannot queue: run here rather than fail */
            search_reply(r);
            continue;
        }
        search_q.running++;
    }
}

static int key_reads_messages(const struct search_key *k)
{
    for (; k; k = k->next) {
        if (k->cost > 0) return 1;
        if (k->child && key_reads_messages(k->child)) return 1;
    }
    return 0;
}

static const struct imap_arg *cmd_args(struct imap_command *cmd, size_t *n_r)
{
    if (cmd->name && strcmp(cmd->name, "UID") == 0 && cmd->n_args > 0) {
        *n_r = cmd->n_args - 1;
        return cmd->args + 1;
    }
    *n_r = cmd->n_args;
    return cmd->args;
}

void imap_cmd_search(struct imap_session *s, struct imap_command *cmd, int uid)
{
    size_t n;
    const struct imap_arg *args = cmd_args(cmd, &n);
    if (s->state != IMAP_S_SELECTED) {
        imap_cmd_done(s, "BAD", NULL, "No mailbox selected");
        return;
    }
    if (!(s->sel.rights & STORE_R_READ)) {
        imap_cmd_done(s, "NO", "NOPERM", "Permission denied");
        return;
    }
    if (n >= 1 && imap_arg_eq(&args[0], "CHARSET")) {
        if (n < 2 || !imap_arg_is_astring(&args[1])) {
            imap_cmd_done(s, "BAD", NULL, "Missing charset");
            return;
        }
        if (!imap_arg_eq(&args[1], "US-ASCII") && !imap_arg_eq(&args[1], "UTF-8")) {
            imap_cmd_done(s, "NO", "BADCHARSET (US-ASCII UTF-8)", "Unsupported charset");
            return;
        }
        args += 2;
        n -= 2;
    }
    if (n == 0) {
        imap_cmd_done(s, "BAD", NULL, "Missing search program");
        return;
    }
    const uint32_t *view = s->sel.uids.v;
    size_t n_view = s->sel.uids.n;
    uint32_t star_msn = (uint32_t)n_view;
    uint32_t star_uid = n_view ? view[n_view - 1] : 0;
    struct search_limits lim = {SEARCH_MAX_DEPTH, SEARCH_MAX_NODES, SEARCH_MAX_RANGES};
    struct search_key *root = NULL;
    const char *err = NULL;
    int has_modseq = 0;
    if (imap_search_parse(args, n, star_msn, star_uid, &lim, &root, &has_modseq, &err) < 0) {
        imap_cmd_done(s, "BAD", NULL, "%s", err);
        return;
    }
    if (has_modseq) s->condstore_enabled = 1; /* RFC 7162 3.1: first use enables CONDSTORE */

    struct search_run *r = calloc(1, sizeof(*r));
    if (!r || (n_view && !(r->view = malloc(n_view * sizeof(uint32_t))))) {
        free(r);
        imap_search_free(root);
        imap_cmd_done(s, "NO", "SERVERBUG", "Out of memory");
        return;
    }
    if (n_view) memcpy(r->view, view, n_view * sizeof(uint32_t));
    r->s = s;
    r->st = s->node->store;
    r->mailbox_id = s->sel.mailbox_id;
    r->root = root;
    r->n_view = n_view;
    r->recent_min_uid = s->sel.recent_min_uid;
    r->uid_mode = uid;
    r->has_modseq = has_modseq;
    if (n_view == 0 || (n_view <= SEARCH_INLINE_MAX_VIEW && !key_reads_messages(root))) {
        search_exec(r);
        search_reply(r);
        return;
    }
    /* s stays busy (the session is kept allocated until imap_cmd_done) */
    if (search_q.tail)
        search_q.tail->next = r;
    else
        search_q.head = r;
    search_q.tail = r;
    search_start_next(s->node->loop);
}
