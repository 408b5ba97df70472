/* imap_fetch: FETCH / UID FETCH (RFC 3501 6.4.5, 7.4.2; CONDSTORE MODSEQ and
 * CHANGEDSINCE, RFC 7162 3.1.4-3.1.5).
 *
 * Flow: parse the items (bounded; BODY[...] sections are single atoms from
 * the parser and are parsed here), map the set to uids of the session's
 * view, then
 *   1. if an item implicitly sets \Seen (BODY[...], RFC822, RFC822.TEXT) in
 *      a read-write mailbox, propose StoreFlags(ADD \Seen) for the uids that
 *      lack it and wait for the commit (those messages get FLAGS in their
 *      FETCH response, read after the commit);
 *   2. stream the responses in MSN order from a read transaction. Message
 *      bytes are never copied: literals are queued with cf_conn_write_ref
 *      pointing into the LMDB map, in chunks of at most FETCH_CHUNK, and a
 *      small refcounted holder keeps the read transaction alive until the
 *      connection released every borrowed chunk. Above CF_CONN_OUT_HIGH the
 *      command suspends (s->resume) and continues on drain: between
 *      messages with a fresh read transaction, inside a literal with the
 *      same one.
 * Messages expunged meanwhile are skipped (RFC 2180 4.1.1 allows it); FETCH
 * never sends EXPUNGE itself.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>

#include "cf_log.h"
#include "imap_internal.h"
#include "mime.h"

#define FETCH_MAX_ITEMS 128
#define FETCH_MAX_FIELDS 256
#define FETCH_MAX_FIELD_LEN 512
#define FETCH_CHUNK (256u * 1024)

enum fi_kind {
    FI_FLAGS = 1,
    FI_UID,
    FI_INTERNALDATE,
    FI_SIZE,
    FI_ENVELOPE,
    FI_BODY,
    FI_BODYSTRUCTURE,
    FI_MODSEQ,
    FI_SECTION,
};

enum fi_text {
    FT_NONE = 0, /* the whole part (or message) */
    FT_HEADER,
    FT_FIELDS,
    FT_FIELDS_NOT,
    FT_TEXT,
    FT_MIME,
};

struct fitem {
    enum fi_kind kind;
    int sets_seen;   /* BODY[...] without PEEK, RFC822, RFC822.TEXT */
    int conditional; /* FLAGS added because \Seen was set: only for those uids */
    uint32_t part[MIME_MAX_DEPTH];
    size_t n_part;
    enum fi_text text;
    char **fields;
    size_t n_fields;
    int partial;
    uint64_t origin, count;
    char *label; /* response name: "BODY[1.MIME]<0>", "RFC822.HEADER" */
};

/* Parse one FETCH item atom (not a macro) into *it. Returns 0 or -1 with a
 * static reason. Exported for tests/unit/test_imap_search.c through
 * imap_fetch_item_label(). */
static void fitem_clear(struct fitem *it)
{
    for (size_t i = 0; i < it->n_fields; i++)
        free(it->fields[i]);
    free(it->fields);
    free(it->label);
    memset(it, 0, sizeof(*it));
}

static int prefix_ci(const char *s, size_t len, const char *pre)
{
    size_t n = strlen(pre);
    return len >= n && strncasecmp(s, pre, n) == 0;
}

static int eq_ci(const char *s, size_t len, const char *w)
{
    return strlen(w) == len && strncasecmp(s, w, len) == 0;
}

/* 32-bit IMAP number at *p (advances). nz: must be > 0. */
static int parse_num32(const char **p, const char *end, int nz, uint32_t *v_r)
{
    const char *q = *p;
    uint64_t v = 0;
    if (q >= end || *q < '0' || *q > '9') return -1;
    while (q < end && *q >= '0' && *q <= '9') {
        v = v * 10 + (uint64_t)(*q - '0');
        if (v > UINT32_MAX) return -1;
        q++;
    }
    if (nz && v == 0) return -1;
    *p = q;
    *v_r = (uint32_t)v;
    return 0;
}

static int field_atom_char(unsigned char c)
{
    return c > 0x20 && c < 0x7f && c != '(' && c != ')' && c != '{' && c != '%' && c != '*' &&
           c != '"' && c != '\\' && c != ']' && c != '[';
}

/* Parse "(name name ...)" at *p into it->fields, appending the echo to lab. */
static int parse_field_list(const char **pp, const char *end, struct fitem *it, struct mbuf *lab,
                            const char **err)
{
    const char *p = *pp;
    if (p + 1 >= end || p[0] != ' ' || p[1] != '(') {
        *err = "Header field list expected";
        return -1;
    }
    p += 2;
    mbuf_puts(lab, " (");
    for (;;) {
        char name[FETCH_MAX_FIELD_LEN + 1];
        size_t nl = 0;
        int quoted = 0;
        if (p < end && *p == '"') {
            quoted = 1;
            p++;
            for (;;) {
                if (p >= end) {
                    *err = "Unterminated quoted string";
                    return -1;
                }
                unsigned char c = (unsigned char)*p++;
                if (c == '"') break;
                if (c == '\\') {
                    if (p >= end || (*p != '"' && *p != '\\')) {
                        *err = "Invalid quoted string";
                        return -1;
                    }
                    c = (unsigned char)*p++;
                }
                if (c < 0x20 || c >= 0x7f) {
                    *err = "Invalid header field name";
                    return -1;
                }
                if (nl >= FETCH_MAX_FIELD_LEN) {
                    *err = "Header field name too long";
                    return -1;
                }
                name[nl++] = (char)c;
            }
        } else {
            while (p < end && field_atom_char((unsigned char)*p)) {
                if (nl >= FETCH_MAX_FIELD_LEN) {
                    *err = "Header field name too long";
                    return -1;
                }
                name[nl++] = *p++;
            }
        }
        name[nl] = '\0';
        if (nl == 0 || memchr(name, ':', nl) || memchr(name, ' ', nl)) {
            *err = "Invalid header field name";
            return -1;
        }
        if (it->n_fields >= FETCH_MAX_FIELDS) {
            *err = "Too many header fields";
            return -1;
        }
        char **nf = realloc(it->fields, (it->n_fields + 1) * sizeof(*nf));
        if (!nf) {
            *err = "Out of memory";
            return -1;
        }
        it->fields = nf;
        if (!(it->fields[it->n_fields] = strdup(name))) {
            *err = "Out of memory";
            return -1;
        }
        it->n_fields++;
        if (it->n_fields > 1) mbuf_puts(lab, " ");
        int need_quote = quoted;
        for (size_t i = 0; i < nl && !need_quote; i++)
            if (!field_atom_char((unsigned char)name[i])) need_quote = 1;
        if (need_quote) {
            mbuf_puts(lab, "\"");
            for (size_t i = 0; i < nl; i++) {
                if (name[i] == '"' || name[i] == '\\') mbuf_puts(lab, "\\");
                mbuf_put(lab, &name[i], 1);
            }
            mbuf_puts(lab, "\"");
        } else {
            mbuf_put(lab, name, nl);
        }
        if (p < end && *p == ' ') {
            p++;
            continue;
        }
        if (p < end && *p == ')') {
            p++;
            break;
        }
        *err = "Invalid header field list";
        return -1;
    }
    mbuf_puts(lab, ")");
    *pp = p;
    return 0;
}

/* Section spec after "BODY[" / "BODY.PEEK[" up to and including ']' and the
 * optional partial. */
static int parse_section(const char *p, const char *end, struct fitem *it, struct mbuf *lab,
                         const char **err)
{
    mbuf_puts(lab, "BODY[");
    int need_text = 0;
    while (p < end && *p >= '0' && *p <= '9') {
        uint32_t v;
        if (parse_num32(&p, end, 1, &v) < 0) {
            *err = "Invalid section part number";
            return -1;
        }
        if (it->n_part >= MIME_MAX_DEPTH) {
            *err = "Section part number too deep";
            return -1;
        }
        it->part[it->n_part++] = v;
        mbuf_printf(lab, "%s%u", it->n_part > 1 ? "." : "", v);
        need_text = 0;
        if (p < end && *p == '.') {
            p++;
            need_text = 1; /* another number or a section text must follow */
            continue;
        }
        break;
    }
    static const struct {
        const char *name;
        enum fi_text text;
    } texts[] = {
        {"HEADER.FIELDS.NOT", FT_FIELDS_NOT},
        {"HEADER.FIELDS", FT_FIELDS},
        {"HEADER", FT_HEADER},
        {"TEXT", FT_TEXT},
        {"MIME", FT_MIME},
    };
    if (p < end && *p != ']') {
        if (it->n_part > 0 && !need_text) {
            *err = "Invalid section";
            return -1;
        }
        size_t j;
        for (j = 0; j < sizeof(texts) / sizeof(texts[0]); j++) {
            size_t l = strlen(texts[j].name);
            if ((size_t)(end - p) >= l && strncasecmp(p, texts[j].name, l) == 0 &&
                (p + l == end || p[l] == ']' || p[l] == ' '))
                break;
        }
        if (j == sizeof(texts) / sizeof(texts[0])) {
            *err = "Invalid section";
            return -1;
        }
        it->text = texts[j].text;
        if (it->text == FT_MIME && it->n_part == 0) {
            *err = "MIME needs a part number";
            return -1;
        }
        if (it->n_part > 0) mbuf_puts(lab, ".");
        mbuf_puts(lab, texts[j].name);
        p += strlen(texts[j].name);
        if (it->text == FT_FIELDS || it->text == FT_FIELDS_NOT) {
            if (parse_field_list(&p, end, it, lab, err) < 0) return -1;
        }
    } else if (need_text) {
        *err = "Invalid section";
        return -1;
    }
    if (p >= end || *p != ']') {
        *err = "Invalid section";
        return -1;
    }
    p++;
    mbuf_puts(lab, "]");
    if (p < end && *p == '<') {
        uint32_t o, c;
        p++;
        if (parse_num32(&p, end, 0, &o) < 0 || p >= end || *p != '.') {
            *err = "Invalid partial";
            return -1;
        }
        p++;
        if (parse_num32(&p, end, 1, &c) < 0 || p >= end || *p != '>') {
            *err = "Invalid partial";
            return -1;
        }
        p++;
        it->partial = 1;
        it->origin = o;
        it->count = c;
        mbuf_printf(lab, "<%u>", o);
    }
    if (p != end) {
        *err = "Garbage after section";
        return -1;
    }
    return 0;
}

static int set_label(struct fitem *it, const char *label)
{
    it->label = strdup(label);
    return it->label ? 0 : -1;
}

static int parse_item(const char *s, size_t len, struct fitem *it, const char **err)
{
    static const struct {
        const char *name;
        enum fi_kind kind;
    } simple[] = {
        {"FLAGS", FI_FLAGS},
        {"UID", FI_UID},
        {"INTERNALDATE", FI_INTERNALDATE},
        {"RFC822.SIZE", FI_SIZE},
        {"ENVELOPE", FI_ENVELOPE},
        {"BODY", FI_BODY},
        {"BODYSTRUCTURE", FI_BODYSTRUCTURE},
        {"MODSEQ", FI_MODSEQ},
    };
    memset(it, 0, sizeof(*it));
    for (size_t i = 0; i < sizeof(simple) / sizeof(simple[0]); i++) {
        if (eq_ci(s, len, simple[i].name)) {
            it->kind = simple[i].kind;
            return 0;
        }
    }
    it->kind = FI_SECTION;
    if (eq_ci(s, len, "RFC822")) {
        it->sets_seen = 1;
        return set_label(it, "RFC822");
    }
    if (eq_ci(s, len, "RFC822.HEADER")) {
        it->text = FT_HEADER;
        return set_label(it, "RFC822.HEADER");
    }
    if (eq_ci(s, len, "RFC822.TEXT")) {
        it->text = FT_TEXT;
        it->sets_seen = 1;
        return set_label(it, "RFC822.TEXT");
    }
    size_t skip;
    if (prefix_ci(s, len, "BODY[")) {
        skip = 5;
        it->sets_seen = 1;
    } else if (prefix_ci(s, len, "BODY.PEEK[")) {
        skip = 10;
    } else {
        *err = "Unknown FETCH item";
        return -1;
    }
    struct mbuf lab = {0};
    if (parse_section(s + skip, s + len, it, &lab, err) < 0) {
        mbuf_free(&lab);
        fitem_clear(it);
        return -1;
    }
    mbuf_put(&lab, "", 1);
    it->label = lab.data;
    return 0;
}

/* For unit tests: parse one item atom and write its response name (label
 * for sections, the item name otherwise) into out. 0 or -1. */
int imap_fetch_item_label(const char *s, size_t len, char *out, size_t outlen);
int imap_fetch_item_label(const char *s, size_t len, char *out, size_t outlen)
{
    struct fitem it;
    const char *err = NULL;
    if (parse_item(s, len, &it, &err) < 0) return -1;
    snprintf(out, outlen, "%s%s", it.label ? it.label : "item",
             it.kind == FI_SECTION && it.sets_seen ? " seen" : "");
    fitem_clear(&it);
    return 0;
}

/* ---- fetch state ---- */

struct holder {
    MDB_txn *txn;
    unsigned refs;
};

static struct holder *holder_new(struct store *st)
{
    struct holder *h = calloc(1, sizeof(*h));
    if (!h) return NULL;
    h->txn = store_rtxn_begin(st);
    if (!h->txn) {
        free(h);
        return NULL;
    }
    h->refs = 1;
    return h;
}

static void holder_unref(void *arg)
{
    struct holder *h = arg;
    if (h && --h->refs == 0) {
        store_rtxn_end(h->txn);
        free(h);
    }
}

struct fetch_state {
    struct imap_session *s;
    int uid_cmd;
    struct fitem *items;
    size_t n_items;
    int has_changedsince;
    uint64_t changedsince;
    uint32_t *uids;
    size_t n_uids, i;
    uint32_t *seen; /* sorted uids whose \Seen this command set */
    size_t n_seen;
    struct holder *h;
    struct mbuf buf; /* text not yet handed to the conn */
    /* current message */
    int in_msg;
    size_t item;
    int first;
    struct store_msg m;
    uint32_t msn;
    int blob_state; /* 0 not loaded, 1 ok, -1 unavailable */
    const char *msg;
    size_t msg_len;
    int tree_state;
    struct mime_tree tree;
    int cache_state;
    struct store_cache cache;
    struct mime_cache built; /* fallback when the blob has no cache */
    int built_state;
    const char *ref; /* literal bytes still to queue */
    size_t ref_left;
    /* \Seen proposal */
    int proposing;
    struct store_outcome out;
};

static void msg_reset(struct fetch_state *st)
{
    if (st->tree_state == 1) mime_tree_free(&st->tree);
    if (st->built_state == 1) mime_cache_free(&st->built);
    st->in_msg = 0;
    st->item = 0;
    st->blob_state = st->tree_state = st->cache_state = st->built_state = 0;
    st->msg = NULL;
    st->msg_len = 0;
    st->ref = NULL;
    st->ref_left = 0;
}

static void fetch_state_free(struct fetch_state *st)
{
    if (!st) return;
    msg_reset(st);
    if (st->h) holder_unref(st->h);
    for (size_t i = 0; i < st->n_items; i++)
        fitem_clear(&st->items[i]);
    free(st->items);
    free(st->uids);
    free(st->seen);
    mbuf_free(&st->buf);
    store_outcome_clear(&st->out);
    free(st);
}

/* resume_free: the session closes mid-command. While a proposal is in
 * flight the state must outlive the session (the outcome is written into
 * it): detach, the proposal callback frees it. */
static void fetch_state_release(void *arg)
{
    struct fetch_state *st = arg;
    if (st->proposing) {
        st->s = NULL;
        return;
    }
    fetch_state_free(st);
}

static void out_flush(struct fetch_state *st)
{
    if (st->buf.len) {
        cf_conn_write(st->s->conn, st->buf.data, st->buf.len);
        st->buf.len = 0;
    }
}

static int uid_in(const uint32_t *v, size_t n, uint32_t x)
{
    size_t lo = 0, hi = n;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (v[mid] == x) return 1;
        if (v[mid] < x)
            lo = mid + 1;
        else
            hi = mid;
    }
    return 0;
}

/* Drop uids[] (sorted) from the watcher's pending flag updates: this
 * command reports their flags itself. */
static void drop_pending_flags(struct imap_session *s, const uint32_t *uids, size_t n)
{
    struct u32vec *pf = &s->sel.pend_flags;
    size_t w = 0;
    for (size_t r = 0; r < pf->n; r++)
        if (!uid_in(uids, n, pf->v[r])) pf->v[w++] = pf->v[r];
    pf->n = w;
}

static int is_recent(const struct imap_session *s, uint32_t uid)
{
    return s->sel.recent_min_uid != 0 && uid >= s->sel.recent_min_uid;
}

static const char *const month_names[] = {"Jan", "Feb", "Mar", "Apr", "May", "Jun",
                                          "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"};

/* "dd-Mon-yyyy hh:mm:ss +zzzz" with quotes, day space-padded (RFC 3501
 * date-day-fixed). */
static void put_internaldate(struct mbuf *b, int64_t utc, int32_t tz_min)
{
    if (tz_min < -24 * 60 || tz_min > 24 * 60) tz_min = 0;
    time_t t = (time_t)(utc + (int64_t)tz_min * 60);
    struct tm tm;
    if (!gmtime_r(&t, &tm) || tm.tm_year + 1900 < 0 || tm.tm_year + 1900 > 9999) {
        t = 0;
        tz_min = 0;
        gmtime_r(&t, &tm);
    }
    int a = tz_min < 0 ? -tz_min : tz_min;
    mbuf_printf(b, "\"%2d-%s-%04d %02d:%02d:%02d %c%02d%02d\"", tm.tm_mday, month_names[tm.tm_mon],
                tm.tm_year + 1900, tm.tm_hour, tm.tm_min, tm.tm_sec, tz_min < 0 ? '-' : '+', a / 60,
                a % 60);
}

static int load_blob(struct fetch_state *st)
{
    if (st->blob_state == 0) {
        st->blob_state = -1;
        if (store_blob_get(st->s->node->store, st->h->txn, st->m.blob_id, &st->msg, &st->msg_len) ==
            0)
            st->blob_state = 1;
    }
    return st->blob_state == 1;
}

static int load_cache(struct fetch_state *st)
{
    if (st->cache_state == 0) {
        st->cache_state = -1;
        if (store_blob_cache(st->s->node->store, st->h->txn, st->m.blob_id, &st->cache) == 0)
            st->cache_state = 1;
    }
    return st->cache_state == 1;
}

static int load_tree(struct fetch_state *st)
{
    if (st->tree_state == 0) {
        st->tree_state = -1;
        if (!load_blob(st)) return 0;
        if (load_cache(st) && st->cache.parts_len > 0 &&
            mime_tree_deserialize(st->cache.parts, st->cache.parts_len, st->msg_len, &st->tree) ==
                0)
            st->tree_state = 1;
        else if (mime_tree_parse(st->msg, st->msg_len, &st->tree) == 0)
            st->tree_state = 1;
    }
    return st->tree_state == 1;
}

/* Rendered ENVELOPE / BODY / BODYSTRUCTURE, from the cache or computed. */
static int cached_item(struct fetch_state *st, enum fi_kind kind, const char **p_r, size_t *len_r)
{
    if (load_cache(st)) {
        const char *p = kind == FI_ENVELOPE ? st->cache.envelope
                        : kind == FI_BODY   ? st->cache.body
                                            : st->cache.bodystructure;
        size_t l = kind == FI_ENVELOPE ? st->cache.envelope_len
                   : kind == FI_BODY   ? st->cache.body_len
                                       : st->cache.bodystructure_len;
        if (l > 0) {
            *p_r = p;
            *len_r = l;
            return 1;
        }
    }
    if (st->built_state == 0) {
        st->built_state = -1;
        if (load_blob(st) && mime_build_cache(st->msg, st->msg_len, &st->built) == 0)
            st->built_state = 1;
    }
    if (st->built_state != 1) return 0;
    const struct mbuf *b = kind == FI_ENVELOPE ? &st->built.envelope
                           : kind == FI_BODY   ? &st->built.body
                                               : &st->built.bodystructure;
    *p_r = b->data;
    *len_r = b->len;
    return b->len > 0;
}

/* The bytes of a section: 1 with a range in the message (*p_r, *len_r) or
 * generated text in gen (*p_r NULL), 0 for NIL (no such part). */
static int section_data(struct fetch_state *st, const struct fitem *it, const char **p_r,
                        size_t *len_r, struct mbuf *gen)
{
    if (!load_blob(st)) return 0;
    if (it->n_part == 0 && it->text == FT_NONE) {
        *p_r = st->msg;
        *len_r = st->msg_len;
        return 1;
    }
    if (!load_tree(st) || st->tree.n_parts == 0) return 0;
    uint32_t idx = 0;
    if (it->n_part > 0 && mime_find_part(&st->tree, it->part, it->n_part, &idx) < 0) return 0;
    if (idx >= st->tree.n_parts) return 0;
    const struct mime_part *pt = &st->tree.parts[idx];
    uint64_t a = 0, b = 0;
    switch (it->text) {
    case FT_NONE:
        a = pt->body_start;
        b = pt->body_end;
        break;
    case FT_MIME:
        a = pt->hdr_start;
        b = pt->hdr_end;
        break;
    case FT_HEADER:
    case FT_FIELDS:
    case FT_FIELDS_NOT:
    case FT_TEXT: {
        uint64_t hs, he, ts, te;
        if (it->n_part > 0 && !pt->is_message_rfc822) return 0;
        if (mime_message_ranges(&st->tree, idx, &hs, &he, &ts, &te) < 0) return 0;
        if (it->text == FT_TEXT) {
            a = ts;
            b = te;
        } else {
            a = hs;
            b = he;
        }
        break;
    }
    }
    if (a > b || b > st->msg_len) return 0;
    if (it->text == FT_FIELDS || it->text == FT_FIELDS_NOT) {
        mime_header_fields(st->msg + a, (size_t)(b - a), (const char *const *)it->fields,
                           it->n_fields, it->text == FT_FIELDS_NOT, gen);
        *p_r = NULL;
        *len_r = gen->len;
        return 1;
    }
    *p_r = st->msg + a;
    *len_r = (size_t)(b - a);
    return 1;
}

/* Queue st->ref in chunks; returns 1 when it suspended with bytes left. */
static int push_ref(struct fetch_state *st)
{
    struct imap_session *s = st->s;
    out_flush(st);
    while (st->ref_left > 0) {
        size_t n = st->ref_left < FETCH_CHUNK ? st->ref_left : FETCH_CHUNK;
        st->h->refs++;
        cf_conn_write_ref(s->conn, st->ref, n, holder_unref, st->h);
        st->ref += n;
        st->ref_left -= n;
        if (st->ref_left > 0 && cf_conn_out_pending(s->conn) > CF_CONN_OUT_HIGH) return 1;
    }
    return 0;
}

static void write_item(struct fetch_state *st, const struct fitem *it)
{
    struct imap_session *s = st->s;
    struct mbuf *b = &st->buf;
    const char *p;
    size_t len;
    switch (it->kind) {
    case FI_FLAGS:
        mbuf_puts(b, "FLAGS ");
        out_flush(st);
        imap_write_flags(s, st->m.flags, st->m.keywords, st->m.keywords_len,
                         is_recent(s, st->m.uid));
        break;
    case FI_UID:
        mbuf_printf(b, "UID %u", st->m.uid);
        break;
    case FI_INTERNALDATE:
        mbuf_puts(b, "INTERNALDATE ");
        put_internaldate(b, st->m.internal_date, st->m.internal_tz_min);
        break;
    case FI_SIZE:
        mbuf_printf(b, "RFC822.SIZE %llu", (unsigned long long)st->m.size);
        break;
    case FI_MODSEQ:
        mbuf_printf(b, "MODSEQ (%llu)", (unsigned long long)st->m.modseq);
        break;
    case FI_ENVELOPE:
    case FI_BODY:
    case FI_BODYSTRUCTURE:
        mbuf_puts(b, it->kind == FI_ENVELOPE ? "ENVELOPE "
                     : it->kind == FI_BODY   ? "BODY "
                                             : "BODYSTRUCTURE ");
        if (cached_item(st, it->kind, &p, &len))
            mbuf_put(b, p, len);
        else if (it->kind == FI_ENVELOPE)
            mbuf_puts(b, "(NIL NIL NIL NIL NIL NIL NIL NIL NIL NIL)");
        else
            mbuf_puts(b, "(\"TEXT\" \"PLAIN\" (\"CHARSET\" \"US-ASCII\") NIL NIL \"7BIT\" 0 0)");
        break;
    case FI_SECTION: {
        struct mbuf gen = {0};
        mbuf_puts(b, it->label);
        mbuf_puts(b, " ");
        if (!section_data(st, it, &p, &len, &gen)) {
            mbuf_puts(b, "NIL");
            mbuf_free(&gen);
            break;
        }
        const char *src = p ? p : gen.data;
        if (it->partial) {
            if (it->origin >= len) {
                len = 0;
            } else {
                src += it->origin;
                len -= (size_t)it->origin;
                if (len > it->count) len = (size_t)it->count;
            }
        }
        if (len == 0) {
            mbuf_puts(b, "\"\"");
        } else if (!p) {
            mbuf_printf(b, "{%zu}\r\n", len);
            mbuf_put(b, src, len);
        } else {
            mbuf_printf(b, "{%zu}\r\n", len);
            st->ref = src;
            st->ref_left = len;
        }
        mbuf_free(&gen);
        break;
    }
    }
}

/* Start message st->uids[st->i]: 0, or -1 to skip it. */
static int msg_begin(struct fetch_state *st)
{
    struct imap_session *s = st->s;
    uint32_t uid = st->uids[st->i];
    if (store_msg_get(s->node->store, st->h->txn, s->sel.mailbox_id, uid, &st->m) != 0)
        return -1; /* expunged meanwhile */
    if (st->has_changedsince && st->m.modseq <= st->changedsince) return -1;
    st->msn = imap_msn_of(s, uid);
    if (st->msn == 0) return -1;
    mbuf_printf(&st->buf, "* %u FETCH (", st->msn);
    st->in_msg = 1;
    st->item = 0;
    st->first = 1;
    return 0;
}

/* Write the rest of the current message; 1 when suspended inside it. */
static int msg_continue(struct fetch_state *st)
{
    while (st->item < st->n_items) {
        if (st->ref_left > 0) {
            if (push_ref(st)) return 1;
            st->item++;
            continue;
        }
        const struct fitem *it = &st->items[st->item];
        if (it->conditional && !uid_in(st->seen, st->n_seen, st->m.uid)) {
            st->item++;
            continue;
        }
        if (!st->first) mbuf_puts(&st->buf, " ");
        st->first = 0;
        write_item(st, it);
        if (st->ref_left > 0 && push_ref(st)) return 1;
        st->item++;
    }
    mbuf_puts(&st->buf, ")\r\n");
    if (st->buf.len >= 16384) out_flush(st);
    return 0;
}

static void fetch_resume(struct imap_session *s);

static void fetch_suspend(struct fetch_state *st)
{
    struct imap_session *s = st->s;
    out_flush(st);
    s->resume = fetch_resume;
    s->resume_state = st;
    s->resume_free = fetch_state_release;
}

static void fetch_run(struct fetch_state *st)
{
    struct imap_session *s = st->s;
    if (!st->h && st->i < st->n_uids) {
        st->h = holder_new(s->node->store);
        if (!st->h) {
            s->resume = NULL;
            s->resume_state = NULL;
            s->resume_free = NULL;
            out_flush(st);
            fetch_state_free(st);
            imap_cmd_done(s, "NO", "SERVERBUG", "Internal error");
            return;
        }
    }
    while (st->i < st->n_uids) {
        if (s->conn == NULL || cf_conn_is_closing(s->conn)) {
            /* nobody reads any more; the session's close frees the state */
            fetch_suspend(st);
            return;
        }
        if (!st->in_msg && msg_begin(st) < 0) {
            st->i++;
            continue;
        }
        if (msg_continue(st)) {
            fetch_suspend(st);
            return;
        }
        msg_reset(st);
        st->i++;
        if (st->i < st->n_uids && cf_conn_out_pending(s->conn) + st->buf.len > CF_CONN_OUT_HIGH) {
            /* between messages: let go of the snapshot, take a new one on resume */
            holder_unref(st->h);
            st->h = NULL;
            fetch_suspend(st);
            return;
        }
    }
    out_flush(st);
    s->resume = NULL;
    s->resume_state = NULL;
    s->resume_free = NULL;
    int uid_cmd = st->uid_cmd;
    fetch_state_free(st);
    imap_cmd_done(s, "OK", NULL, "%s completed", uid_cmd ? "UID FETCH" : "FETCH");
}

static void fetch_resume(struct imap_session *s)
{
    struct fetch_state *st = s->resume_state;
    s->resume = NULL;
    if (!st) return;
    fetch_run(st); /* opens a fresh read txn when between messages */
}

static void fetch_start(struct fetch_state *st)
{
    if (st->n_seen > 0) drop_pending_flags(st->s, st->seen, st->n_seen);
    fetch_run(st);
}

static void seen_committed(void *arg, int status, struct store_outcome *out)
{
    struct fetch_state *st = arg;
    (void)out;
    st->proposing = 0;
    if (!st->s) {
        fetch_state_free(st);
        return;
    }
    struct imap_session *s = st->s;
    s->resume_state = NULL;
    s->resume_free = NULL;
    if (s->conn == NULL) { /* closed meanwhile: imap_cmd_done frees the session */
        fetch_state_free(st);
        imap_cmd_done(s, "NO", NULL, "Connection closed");
        return;
    }
    if (status != REP_OK || st->out.result != STORE_OK) {
        /* \Seen not (known to be) set: report flags only when asked */
        if (status != REP_OK)
            cf_warn("imap: implicit \\Seen for %s failed (status %d)", s->username, status);
        st->n_seen = 0;
    }
    fetch_start(st);
}

/* Collect uids lacking \Seen and propose setting it. 1 when a proposal is in
 * flight, 0 when nothing to do (or it could not be proposed). */
static int propose_seen(struct fetch_state *st)
{
    struct imap_session *s = st->s;
    MDB_txn *txn = store_rtxn_begin(s->node->store);
    if (!txn) return 0;
    for (size_t i = 0; i < st->n_uids; i++) {
        struct store_msg m;
        if (store_msg_get(s->node->store, txn, s->sel.mailbox_id, st->uids[i], &m) == 0 &&
            !(m.flags & STORE_F_SEEN)) {
            if (!st->seen) {
                st->seen = malloc(st->n_uids * sizeof(*st->seen));
                if (!st->seen) break;
            }
            st->seen[st->n_seen++] = st->uids[i];
        }
    }
    store_rtxn_end(txn);
    if (st->n_seen == 0) return 0;
    size_t n_ranges = 0;
    Coffer__UidRange **ranges = imap_uid_ranges(st->seen, st->n_seen, &n_ranges);
    Coffer__Entry e = COFFER__ENTRY__INIT;
    Coffer__StoreFlags sf = COFFER__STORE_FLAGS__INIT;
    sf.username = s->username;
    sf.mailbox = s->sel.name;
    sf.uidvalidity = s->sel.uidvalidity;
    sf.uids = ranges;
    sf.n_uids = n_ranges;
    sf.mode = COFFER__FLAG_MODE__FLAGS_ADD;
    sf.has_flags = 1;
    sf.flags = STORE_F_SEEN;
    e.actor = s->username;
    e.op_case = COFFER__ENTRY__OP_STORE_FLAGS;
    e.store_flags = &sf;
    st->proposing = 1;
    s->resume = NULL;
    s->resume_state = st;
    s->resume_free = fetch_state_release;
    int rc = ranges ? propose_entry(s->node, &e, &st->out, seen_committed, st) : -1;
    imap_uid_ranges_free(ranges, n_ranges);
    if (rc != 0) {
        st->proposing = 0;
        s->resume_state = NULL;
        s->resume_free = NULL;
        st->n_seen = 0;
        cf_warn("imap: cannot propose implicit \\Seen (%d)", rc);
        return 0;
    }
    return 1;
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

static int add_item(struct fetch_state *st, const struct fitem *it)
{
    if (st->n_items >= FETCH_MAX_ITEMS + 4) return -1;
    struct fitem *n = realloc(st->items, (st->n_items + 1) * sizeof(*n));
    if (!n) return -1;
    st->items = n;
    st->items[st->n_items++] = *it;
    return 0;
}

static int add_simple(struct fetch_state *st, enum fi_kind kind, int conditional)
{
    struct fitem it;
    memset(&it, 0, sizeof(it));
    it.kind = kind;
    it.conditional = conditional;
    return add_item(st, &it);
}

static int has_kind(const struct fetch_state *st, enum fi_kind kind)
{
    for (size_t i = 0; i < st->n_items; i++)
        if (st->items[i].kind == kind && !st->items[i].conditional) return 1;
    return 0;
}

/* Parse the items argument (macro, single item or list) and modifiers. */
static int parse_items(struct fetch_state *st, const struct imap_arg *a, const char **err)
{
    static const enum fi_kind m_fast[] = {FI_FLAGS, FI_INTERNALDATE, FI_SIZE};
    static const enum fi_kind m_all[] = {FI_FLAGS, FI_INTERNALDATE, FI_SIZE, FI_ENVELOPE};
    static const enum fi_kind m_full[] = {FI_FLAGS, FI_INTERNALDATE, FI_SIZE, FI_ENVELOPE, FI_BODY};
    const enum fi_kind *macro = NULL;
    size_t n_macro = 0;
    if (a->type == IMAP_ARG_ATOM) {
        if (imap_arg_eq(a, "ALL")) {
            macro = m_all;
            n_macro = 4;
        } else if (imap_arg_eq(a, "FAST")) {
            macro = m_fast;
            n_macro = 3;
        } else if (imap_arg_eq(a, "FULL")) {
            macro = m_full;
            n_macro = 5;
        }
    }
    if (macro) {
        for (size_t i = 0; i < n_macro; i++)
            if (add_simple(st, macro[i], 0) < 0) goto oom;
        return 0;
    }
    const struct imap_arg *list = a;
    size_t n = 1;
    if (a->type == IMAP_ARG_LIST) {
        list = a->list;
        n = a->n_list;
        if (n == 0) {
            *err = "Empty FETCH item list";
            return -1;
        }
    }
    if (n > FETCH_MAX_ITEMS) {
        *err = "Too many FETCH items";
        return -1;
    }
    for (size_t i = 0; i < n; i++) {
        if (list[i].type != IMAP_ARG_ATOM) {
            *err = "Invalid FETCH item";
            return -1;
        }
        struct fitem it;
        if (parse_item(list[i].str, list[i].len, &it, err) < 0) return -1;
        if (add_item(st, &it) < 0) {
            fitem_clear(&it);
            goto oom;
        }
    }
    return 0;
oom:
    *err = "Out of memory";
    return -1;
}

static int parse_modifiers(struct fetch_state *st, const struct imap_arg *a, const char **err)
{
    if (a->type != IMAP_ARG_LIST || a->n_list == 0) {
        *err = "Invalid FETCH modifiers";
        return -1;
    }
    for (size_t i = 0; i < a->n_list; i++) {
        const struct imap_arg *m = &a->list[i];
        if (imap_arg_eq(m, "CHANGEDSINCE") && i + 1 < a->n_list &&
            a->list[i + 1].type == IMAP_ARG_ATOM) {
            const struct imap_arg *v = &a->list[++i];
            uint64_t x = 0;
            size_t k;
            for (k = 0; k < v->len && k < 20; k++) {
                if (v->str[k] < '0' || v->str[k] > '9') break;
                x = x * 10 + (uint64_t)(v->str[k] - '0');
            }
            if (v->len == 0 || k != v->len || v->len > 19) {
                *err = "Invalid CHANGEDSINCE";
                return -1;
            }
            st->has_changedsince = 1;
            st->changedsince = x;
        } else {
            *err = "Unknown FETCH modifier";
            return -1;
        }
    }
    return 0;
}

void imap_cmd_fetch(struct imap_session *s, struct imap_command *cmd, int uid)
{
    size_t n;
    const struct imap_arg *args = cmd_args(cmd, &n);
    const char *err = NULL;

    if (s->state != IMAP_S_SELECTED) {
        imap_cmd_done(s, "BAD", NULL, "No mailbox selected");
        return;
    }
    if (n < 2 || n > 3) {
        imap_cmd_done(s, "BAD", NULL, "Invalid arguments");
        return;
    }
    struct fetch_state *st = calloc(1, sizeof(*st));
    if (!st) {
        imap_cmd_done(s, "NO", "SERVERBUG", "Out of memory");
        return;
    }
    st->s = s;
    st->uid_cmd = uid;
    if (parse_items(st, &args[1], &err) < 0 || (n == 3 && parse_modifiers(st, &args[2], &err) < 0))
        goto bad;
    if (!(s->sel.rights & STORE_R_READ)) {
        fetch_state_free(st);
        imap_cmd_done(s, "NO", "NOPERM", "Permission denied");
        return;
    }
    int sets_seen = 0;
    for (size_t i = 0; i < st->n_items; i++) {
        if (st->items[i].kind == FI_MODSEQ)
            s->condstore_enabled = 1; /* RFC 7162 3.1: first use enables it */
        if (st->items[i].kind == FI_SECTION && st->items[i].sets_seen) sets_seen = 1;
    }
    if (st->has_changedsince) s->condstore_enabled = 1;
    /* UID FETCH always reports UID (first, as is customary) */
    if (uid && !has_kind(st, FI_UID)) {
        if (add_simple(st, FI_UID, 0) < 0) goto oom;
        struct fitem last = st->items[st->n_items - 1];
        memmove(&st->items[1], &st->items[0], (st->n_items - 1) * sizeof(st->items[0]));
        st->items[0] = last;
    }
    if (sets_seen && !has_kind(st, FI_FLAGS) && add_simple(st, FI_FLAGS, 1) < 0) goto oom;
    if (s->condstore_enabled && !has_kind(st, FI_MODSEQ) && add_simple(st, FI_MODSEQ, 0) < 0)
        goto oom;

    if (imap_seqset_to_uids(s, &args[0], uid, &st->uids, &st->n_uids) < 0) {
        err = "Invalid sequence set";
        goto bad;
    }
    if (sets_seen && !s->sel.readonly && (s->sel.rights & STORE_R_SEEN) && st->n_uids > 0 &&
        propose_seen(st))
        return; /* continues in seen_committed */
    fetch_start(st);
    return;
bad:
    fetch_state_free(st);
    imap_cmd_done(s, "BAD", NULL, "%s", err ? err : "Invalid arguments");
    return;
oom:
    fetch_state_free(st);
    imap_cmd_done(s, "NO", "SERVERBUG", "Out of memory");
}

void imap_write_fetch_flags(struct imap_session *s, MDB_txn *txn, uint32_t msn, uint32_t uid,
                            int with_uid)
{
    struct store_msg m;
    if (msn == 0 || s->conn == NULL ||
        store_msg_get(s->node->store, txn, s->sel.mailbox_id, uid, &m) != 0)
        return;
    if (with_uid)
        cf_conn_printf(s->conn, "* %u FETCH (UID %u FLAGS ", msn, uid);
    else
        cf_conn_printf(s->conn, "* %u FETCH (FLAGS ", msn);
    imap_write_flags(s, m.flags, m.keywords, m.keywords_len, is_recent(s, uid));
    if (s->condstore_enabled)
        cf_conn_printf(s->conn, " MODSEQ (%llu))\r\n", (unsigned long long)m.modseq);
    else
        cf_conn_write(s->conn, ")\r\n", 3);
}
