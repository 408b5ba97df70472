/* fsm: store_apply, the state machine of a store node. Decodes one framed
 * coffer.Entry and applies it in one LMDB write transaction. Deterministic:
 * reads only the entry and LMDB (no clock, no randomness, no pointer or
 * allocation-order dependent output).
 *
 * Refusals (EEXIST, ENOENT, EQUOTA, ...) are outcomes, not errors: the entry
 * is still applied (applied index advances, the request id is remembered)
 * but the op runs in a nested transaction that is aborted, so a refused op
 * never half-applies. Exceptions: STORE_EMODIFIED (the other messages are
 * changed, RFC 7162) and Deliver (per-recipient results).
 */
#define STORE_INTERNAL
#include "store.h"

#include <ctype.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "cf_log.h"
#include "coffer_raft.pb-c.h"
#include "propose.h"

struct change_list {
    struct store_change *v;
    size_t n, cap;
};

struct fsm {
    struct store *st;
    MDB_txn *txn; /* current (nested while an op runs) */
    uint64_t index;
    uint64_t time_ms;
    struct store_outcome *res;
    struct change_list ch;
    int group_set;
    uint8_t group_id[16];
    int nodes_changed;
};

/* Owned copy of a user record (strings malloc()ed). */
struct fuser {
    struct store_user u;
    char *name, *hash, *reason;
};

/* Owned copy of a mailbox record. */
struct fmbox {
    struct store_mailbox m;
    char *name;
    char *kw; /* each keyword NUL-terminated */
    size_t kw_len;
};

static int lmdb_fail(const char *what, int rc)
{
    cf_crit("fsm: %s: %s", what, mdb_strerror(rc));
    return -1;
}

static int oom(void)
{
    cf_crit("fsm: out of memory");
    return -1;
}

__attribute__((format(printf, 3, 4))) static int refuse(struct fsm *f, int code, const char *fmt,
                                                        ...)
{
    va_list ap;
    f->res->result = code;
    va_start(ap, fmt);
    vsnprintf(f->res->text, sizeof(f->res->text), fmt, ap);
    va_end(ap);
    return 0;
}

static void put_le(uint8_t *p, uint64_t v, int bytes)
{
    for (int i = 0; i < bytes; i++) {
        p[i] = (uint8_t)v;
        v >>= 8;
    }
}

static uint64_t get_le(const void *vp, size_t n)
{
    const uint8_t *p = vp;
    uint64_t v = 0;
    for (size_t i = n; i > 0; i--)
        v = (v << 8) | p[i - 1];
    return v;
}

/* ------------------------------------------------------------- changes */

static int change_add(struct fsm *f, enum store_change_kind kind, uint64_t mbid,
                      const uint32_t *uids, size_t n)
{
    if (f->ch.n == f->ch.cap) {
        size_t cap = f->ch.cap ? f->ch.cap * 2 : 8;
        struct store_change *v = realloc(f->ch.v, cap * sizeof(*v));
        if (!v) return oom();
        f->ch.v = v;
        f->ch.cap = cap;
    }
    uint32_t *copy = NULL;
    if (n) {
        copy = malloc(n * sizeof(*copy));
        if (!copy) return oom();
        memcpy(copy, uids, n * sizeof(*copy));
    }
    struct store_change *c = &f->ch.v[f->ch.n++];
    c->kind = kind;
    c->mailbox_id = mbid;
    c->modseq = f->index;
    c->uids = copy;
    c->n_uids = n;
    return 0;
}

static void changes_truncate(struct change_list *l, size_t n)
{
    while (l->n > n) {
        l->n--;
        free((void *)l->v[l->n].uids);
    }
}

/* ---------------------------------------------------------------- meta */

static int meta_next(struct fsm *f, const char *key, uint64_t *v_r)
{
    MDB_val k = {strlen(key), (void *)key}, v;
    uint64_t cur = 1;
    int rc = mdb_get(f->txn, f->st->meta, &k, &v);
    if (rc == 0 && v.mv_size == 8)
        cur = get_le(v.mv_data, 8);
    else if (rc && rc != MDB_NOTFOUND)
        return lmdb_fail(key, rc);
    uint8_t b[8];
    put_le(b, cur + 1, 8);
    v.mv_size = 8;
    v.mv_data = b;
    if ((rc = mdb_put(f->txn, f->st->meta, &k, &v, 0))) return lmdb_fail(key, rc);
    *v_r = cur;
    return 0;
}

static int new_uidvalidity(struct fsm *f, uint32_t *uv_r)
{
    MDB_val k = {16, "last_uidvalidity"}, v;
    uint64_t last = 0;
    int rc = mdb_get(f->txn, f->st->meta, &k, &v);
    if (rc == 0 && v.mv_size == 4)
        last = get_le(v.mv_data, 4);
    else if (rc && rc != MDB_NOTFOUND)
        return lmdb_fail("last_uidvalidity", rc);
    uint64_t uv = f->time_ms / 1000;
    if (uv < last + 1) uv = last + 1;
    uint32_t u = (uint32_t)uv;
    if (u == 0) u = 1;
    uint8_t b[4];
    put_le(b, u, 4);
    v.mv_size = 4;
    v.mv_data = b;
    if ((rc = mdb_put(f->txn, f->st->meta, &k, &v, 0))) return lmdb_fail("last_uidvalidity", rc);
    *uv_r = u;
    return 0;
}

/* --------------------------------------------------------------- users */

/* Lower-cased username into lc (STORE_MAX_USERNAME + 1); -1 if invalid. */
static int user_key(const char *name, char *lc)
{
    size_t n = name ? strlen(name) : 0;
    if (n == 0 || n > STORE_MAX_USERNAME) return -1;
    for (size_t i = 0; i < n; i++)
        lc[i] = (char)tolower((unsigned char)name[i]);
    lc[n] = 0;
    return (int)n;
}

static void user_free(struct fuser *fu)
{
    free(fu->name);
    free(fu->hash);
    free(fu->reason);
    memset(fu, 0, sizeof(*fu));
}

static int user_set_strings(struct fuser *fu, const char *name, const char *hash,
                            const char *reason)
{
    char *n = strdup(name ? name : ""), *h = strdup(hash ? hash : ""),
         *r = strdup(reason ? reason : "");
    if (!n || !h || !r) {
        free(n);
        free(h);
        free(r);
        return oom();
    }
    free(fu->name);
    free(fu->hash);
    free(fu->reason);
    fu->name = n;
    fu->hash = h;
    fu->reason = r;
    fu->u.name = n;
    fu->u.password_hash = h;
    fu->u.disabled_reason = r;
    return 0;
}

/* 0 found, STORE_ENOENT (also for invalid names), -1 fatal. */
static int user_load(struct fsm *f, const char *username, struct fuser *fu)
{
    char lc[STORE_MAX_USERNAME + 1];
    memset(fu, 0, sizeof(*fu));
    int n = user_key(username, lc);
    if (n < 0) return STORE_ENOENT;
    MDB_val k = {(size_t)n, lc}, v;
    int rc = mdb_get(f->txn, f->st->users, &k, &v);
    if (rc == MDB_NOTFOUND) return STORE_ENOENT;
    if (rc) return lmdb_fail("users get", rc);
    struct store_user u;
    if (store__user_decode(&v, &u)) {
        cf_crit("fsm: corrupt user record %s", lc);
        return -1;
    }
    fu->u = u;
    return user_set_strings(fu, u.name, u.password_hash, u.disabled_reason);
}

static int user_save(struct fsm *f, const struct fuser *fu)
{
    struct store_buf b = {0};
    store__user_encode(&fu->u, &b);
    if (b.oom) return oom();
    MDB_val k = {strlen(fu->name), fu->name}, v = {b.len, b.p};
    int rc = mdb_put(f->txn, f->st->users, &k, &v, 0);
    store__buf_free(&b);
    return rc ? lmdb_fail("users put", rc) : 0;
}

static int quota_ok(const struct fuser *fu, uint64_t add_bytes, uint64_t add_msgs)
{
    if (fu->u.quota_bytes && fu->u.used_bytes + add_bytes > fu->u.quota_bytes) return 0;
    if (fu->u.quota_messages && fu->u.used_messages + add_msgs > fu->u.quota_messages) return 0;
    return 1;
}

static void usage_sub(struct fuser *fu, uint64_t bytes, uint64_t msgs)
{
    fu->u.used_bytes = fu->u.used_bytes > bytes ? fu->u.used_bytes - bytes : 0;
    fu->u.used_messages = fu->u.used_messages > msgs ? fu->u.used_messages - msgs : 0;
}

/* ------------------------------------------------------------ keywords */

static const char *kw_find(const char *list, size_t len, const char *kw)
{
    const char *p = list, *end = list + len;
    while (p < end) {
        size_t n = strnlen(p, (size_t)(end - p));
        if (strcasecmp(p, kw) == 0) return p;
        p += n + 1;
    }
    return NULL;
}

static int kw_append(char **list, size_t *len, const char *kw)
{
    size_t n = strlen(kw);
    char *nl = realloc(*list, *len + n + 1);
    if (!nl) return oom();
    memcpy(nl + *len, kw, n + 1);
    *list = nl;
    *len += n + 1;
    return 0;
}

static int kw_valid(const char *kw)
{
    size_t n = kw ? strlen(kw) : 0;
    return n > 0 && n <= STORE_MAX_KEYWORD;
}

/* Canonical spelling of kw for mailbox mb (first-seen spelling; added to the
 * mailbox list when new). Returns a pointer valid until the next change of
 * mb->kw, or NULL on OOM. */
static const char *kw_canon(struct fmbox *mb, const char *kw)
{
    const char *c = kw_find(mb->kw, mb->kw_len, kw);
    if (c) return c;
    size_t off = mb->kw_len;
    if (kw_append(&mb->kw, &mb->kw_len, kw)) return NULL;
    mb->m.keywords = mb->kw;
    mb->m.keywords_len = mb->kw_len;
    return mb->kw + off;
}

/* Build a message keyword list from `in` (NUL-terminated list) canonicalised
 * through mb; duplicates (case-insensitive) dropped. */
static int kw_build(struct fmbox *mb, const char *in, size_t in_len, char **out, size_t *out_len)
{
    const char *p = in, *end = in + in_len;
    *out = NULL;
    *out_len = 0;
    while (p < end) {
        size_t n = strnlen(p, (size_t)(end - p));
        if (n && !kw_find(*out, *out_len, p)) {
            const char *c = kw_canon(mb, p);
            if (!c || kw_append(out, out_len, c)) {
                free(*out);
                *out = NULL;
                return -1;
            }
        }
        p += n + 1;
    }
    return 0;
}

/* Flatten a protobuf string array to a NUL list; -2 if a keyword is invalid. */
static int kw_from_array(char **kws, size_t n, char **out, size_t *out_len)
{
    *out = NULL;
    *out_len = 0;
    for (size_t i = 0; i < n; i++) {
        if (!kw_valid(kws[i])) {
            free(*out);
            *out = NULL;
            return -2;
        }
        if (kw_append(out, out_len, kws[i])) {
            free(*out);
            *out = NULL;
            return -1;
        }
    }
    return 0;
}

/* ----------------------------------------------------------- mailboxes */

/* Canonical mailbox name into out (STORE_MAX_MAILBOX_NAME + 1): "INBOX" in
 * any case becomes "INBOX". Returns length or -1 if invalid. */
static int mbox_canon(const char *name, char *out)
{
    size_t n = name ? strlen(name) : 0;
    if (n == 0 || n > STORE_MAX_MAILBOX_NAME) return -1;
    if (strcasecmp(name, "INBOX") == 0) name = "INBOX";
    memcpy(out, name, n + 1);
    return (int)n;
}

static size_t mbkey(uint8_t *k, uint64_t owner, const char *name)
{
    size_t n = strlen(name);
    store__be64(k, owner);
    memcpy(k + 8, name, n);
    return 8 + n;
}

static void mbox_free(struct fmbox *mb)
{
    free(mb->name);
    free(mb->kw);
    memset(mb, 0, sizeof(*mb));
}

/* 0 + id, STORE_ENOENT, or -1. */
static int mbox_lookup(struct fsm *f, uint64_t owner, const char *name, uint64_t *id_r)
{
    uint8_t kb[8 + STORE_MAX_MAILBOX_NAME + 1];
    char cn[STORE_MAX_MAILBOX_NAME + 1];
    if (mbox_canon(name, cn) < 0) return STORE_ENOENT;
    MDB_val k = {mbkey(kb, owner, cn), kb}, v;
    int rc = mdb_get(f->txn, f->st->mbnames, &k, &v);
    if (rc == MDB_NOTFOUND) return STORE_ENOENT;
    if (rc) return lmdb_fail("mbnames get", rc);
    if (v.mv_size != 8) {
        cf_crit("fsm: corrupt mbnames value");
        return -1;
    }
    *id_r = get_le(v.mv_data, 8);
    return 0;
}

static int mbox_load_id(struct fsm *f, uint64_t id, struct fmbox *mb)
{
    uint8_t kb[8];
    memset(mb, 0, sizeof(*mb));
    store__be64(kb, id);
    MDB_val k = {8, kb}, v;
    int rc = mdb_get(f->txn, f->st->mailboxes, &k, &v);
    if (rc) return lmdb_fail("mailboxes get", rc); /* mbnames points here: must exist */
    if (store__mailbox_decode(id, &v, &mb->m)) {
        cf_crit("fsm: corrupt mailbox record %llu", (unsigned long long)id);
        return -1;
    }
    mb->name = strdup(mb->m.name);
    if (mb->m.keywords_len) {
        mb->kw = malloc(mb->m.keywords_len);
        if (mb->kw) memcpy(mb->kw, mb->m.keywords, mb->m.keywords_len);
    }
    if (!mb->name || (mb->m.keywords_len && !mb->kw)) {
        mbox_free(mb);
        return oom();
    }
    mb->kw_len = mb->m.keywords_len;
    mb->m.name = mb->name;
    mb->m.keywords = mb->kw;
    return 0;
}

/* 0, STORE_ENOENT, -1. */
static int mbox_load(struct fsm *f, uint64_t owner, const char *name, struct fmbox *mb)
{
    uint64_t id;
    memset(mb, 0, sizeof(*mb));
    int rc = mbox_lookup(f, owner, name, &id);
    if (rc) return rc;
    return mbox_load_id(f, id, mb);
}

static int mbox_save(struct fsm *f, struct fmbox *mb)
{
    struct store_buf b = {0};
    uint8_t kb[8];
    mb->m.name = mb->name;
    mb->m.keywords = mb->kw;
    mb->m.keywords_len = mb->kw_len;
    store__mailbox_encode(&mb->m, &b);
    if (b.oom) return oom();
    store__be64(kb, mb->m.id);
    MDB_val k = {8, kb}, v = {b.len, b.p};
    int rc = mdb_put(f->txn, f->st->mailboxes, &k, &v, 0);
    store__buf_free(&b);
    return rc ? lmdb_fail("mailboxes put", rc) : 0;
}

/* Create a mailbox. Returns STORE_OK / STORE_EEXIST / STORE_EINVAL, or -1. */
static int mbox_create(struct fsm *f, uint64_t owner, const char *name, uint32_t special_use,
                       uint64_t *id_r, uint32_t *uv_r)
{
    char cn[STORE_MAX_MAILBOX_NAME + 1];
    uint8_t kb[8 + STORE_MAX_MAILBOX_NAME + 1];
    if (mbox_canon(name, cn) < 0) return STORE_EINVAL;
    MDB_val k = {mbkey(kb, owner, cn), kb}, v;
    int rc = mdb_get(f->txn, f->st->mbnames, &k, &v);
    if (rc == 0) return STORE_EEXIST;
    if (rc != MDB_NOTFOUND) return lmdb_fail("mbnames get", rc);
    struct fmbox mb = {0};
    if (meta_next(f, "next_mailbox_id", &mb.m.id) || new_uidvalidity(f, &mb.m.uidvalidity))
        return -1;
    mb.m.owner_id = owner;
    mb.m.uidnext = 1;
    mb.m.special_use = special_use;
    mb.name = strdup(cn);
    if (!mb.name) return oom();
    uint8_t idb[8];
    put_le(idb, mb.m.id, 8);
    v.mv_size = 8;
    v.mv_data = idb;
    if ((rc = mdb_put(f->txn, f->st->mbnames, &k, &v, 0))) {
        mbox_free(&mb);
        return lmdb_fail("mbnames put", rc);
    }
    rc = mbox_save(f, &mb);
    if (id_r) *id_r = mb.m.id;
    if (uv_r) *uv_r = mb.m.uidvalidity;
    mbox_free(&mb);
    return rc ? -1 : STORE_OK;
}

/* ------------------------------------------------------------ messages */

static void modseq_key(uint8_t k[20], uint64_t mbid, uint64_t modseq, uint32_t uid)
{
    store__be64(k, mbid);
    store__be64(k + 8, modseq);
    store__be32(k + 16, uid);
}

static int msg_put(struct fsm *f, uint64_t mbid, const struct store_msg *m)
{
    struct store_buf b = {0};
    uint8_t kb[12], mk[20];
    store__msg_encode(m, &b);
    if (b.oom) return oom();
    store__be64(kb, mbid);
    store__be32(kb + 8, m->uid);
    MDB_val k = {12, kb}, v = {b.len, b.p};
    int rc = mdb_put(f->txn, f->st->msgs, &k, &v, 0);
    store__buf_free(&b);
    if (rc) return lmdb_fail("msgs put", rc);
    modseq_key(mk, mbid, m->modseq, m->uid);
    MDB_val k2 = {20, mk}, v2 = {0, ""};
    if ((rc = mdb_put(f->txn, f->st->modseq, &k2, &v2, 0))) return lmdb_fail("modseq put", rc);
    return 0;
}

static int modseq_del(struct fsm *f, uint64_t mbid, uint64_t modseq, uint32_t uid)
{
    uint8_t mk[20];
    modseq_key(mk, mbid, modseq, uid);
    MDB_val k = {20, mk};
    int rc = mdb_del(f->txn, f->st->modseq, &k, NULL);
    if (rc && rc != MDB_NOTFOUND) return lmdb_fail("modseq del", rc);
    return 0;
}

static int msg_del(struct fsm *f, uint64_t mbid, uint32_t uid, uint64_t modseq)
{
    uint8_t kb[12];
    store__be64(kb, mbid);
    store__be32(kb + 8, uid);
    MDB_val k = {12, kb};
    int rc = mdb_del(f->txn, f->st->msgs, &k, NULL);
    if (rc) return lmdb_fail("msgs del", rc);
    return modseq_del(f, mbid, modseq, uid);
}

/* Message with owned keywords (valid across writes). */
struct fmsg {
    struct store_msg m;
    char *kw;
};

/* 0, STORE_ENOENT or -1. */
static int msg_load(struct fsm *f, uint64_t mbid, uint32_t uid, struct fmsg *fm)
{
    uint8_t kb[12];
    memset(fm, 0, sizeof(*fm));
    store__be64(kb, mbid);
    store__be32(kb + 8, uid);
    MDB_val k = {12, kb}, v;
    int rc = mdb_get(f->txn, f->st->msgs, &k, &v);
    if (rc == MDB_NOTFOUND) return STORE_ENOENT;
    if (rc) return lmdb_fail("msgs get", rc);
    if (store__msg_decode(uid, &v, &fm->m)) {
        cf_crit("fsm: corrupt message record");
        return -1;
    }
    if (fm->m.keywords_len) {
        fm->kw = malloc(fm->m.keywords_len);
        if (!fm->kw) return oom();
        memcpy(fm->kw, fm->m.keywords, fm->m.keywords_len);
    }
    fm->m.keywords = fm->kw;
    return 0;
}

static int blob_new(struct fsm *f, const ProtobufCBinaryData *msg, const Coffer__MessageCache *c,
                    uint64_t *id_r)
{
    uint64_t id;
    int rc;
    if (meta_next(f, "next_blob_id", &id)) return -1;
    uint8_t kb[8];
    store__be64(kb, id);
    MDB_val k = {8, kb}, v = {msg->len, msg->len ? (void *)msg->data : ""};
    if ((rc = mdb_put(f->txn, f->st->blobs, &k, &v, 0))) return lmdb_fail("blobs put", rc);
    struct store_cache sc = {0};
    if (c) {
        sc.envelope = (const char *)c->envelope.data;
        sc.envelope_len = c->envelope.len;
        sc.bodystructure = (const char *)c->bodystructure.data;
        sc.bodystructure_len = c->bodystructure.len;
        sc.body = (const char *)c->body.data;
        sc.body_len = c->body.len;
        sc.parts = (const char *)c->parts.data;
        sc.parts_len = c->parts.len;
        sc.sent_date = c->has_sent_date ? c->sent_date : 0;
    }
    struct store_buf b = {0};
    store__blobmeta_encode(1, msg->len, &sc, &b);
    if (b.oom) return oom();
    v.mv_size = b.len;
    v.mv_data = b.p;
    rc = mdb_put(f->txn, f->st->blobmeta, &k, &v, 0);
    store__buf_free(&b);
    if (rc) return lmdb_fail("blobmeta put", rc);
    *id_r = id;
    return 0;
}

/* Change a blob's refcount by delta; deletes blob + meta at 0. */
static int blob_ref(struct fsm *f, uint64_t id, int delta)
{
    uint8_t kb[8];
    store__be64(kb, id);
    MDB_val k = {8, kb}, v;
    int rc = mdb_get(f->txn, f->st->blobmeta, &k, &v);
    if (rc) return lmdb_fail("blobmeta get", rc);
    if (v.mv_size < 10 || get_le(v.mv_data, 2) != 1) {
        cf_crit("fsm: corrupt blobmeta %llu", (unsigned long long)id);
        return -1;
    }
    uint64_t refs = get_le((const uint8_t *)v.mv_data + 2, 8);
    if (delta < 0 && refs <= (uint64_t)-delta) {
        if ((rc = mdb_del(f->txn, f->st->blobmeta, &k, NULL))) return lmdb_fail("blobmeta del", rc);
        rc = mdb_del(f->txn, f->st->blobs, &k, NULL);
        if (rc && rc != MDB_NOTFOUND) return lmdb_fail("blobs del", rc);
        return 0;
    }
    refs = delta < 0 ? refs - (uint64_t)-delta : refs + (uint64_t)delta;
    uint8_t *copy = malloc(v.mv_size);
    if (!copy) return oom();
    memcpy(copy, v.mv_data, v.mv_size);
    put_le(copy + 2, refs, 8);
    MDB_val nv = {v.mv_size, copy};
    rc = mdb_put(f->txn, f->st->blobmeta, &k, &nv, 0);
    free(copy);
    return rc ? lmdb_fail("blobmeta put", rc) : 0;
}

static void counts_add(struct fmbox *mb, uint32_t flags, uint64_t size)
{
    mb->m.messages++;
    mb->m.size += size;
    if (!(flags & STORE_F_SEEN)) mb->m.unseen++;
    if (flags & STORE_F_DELETED) mb->m.deleted++;
}

static void counts_sub(struct fmbox *mb, uint32_t flags, uint64_t size)
{
    if (mb->m.messages) mb->m.messages--;
    mb->m.size = mb->m.size > size ? mb->m.size - size : 0;
    if (!(flags & STORE_F_SEEN) && mb->m.unseen) mb->m.unseen--;
    if ((flags & STORE_F_DELETED) && mb->m.deleted) mb->m.deleted--;
}

static void flag_counts(struct fmbox *mb, uint32_t old, uint32_t nf)
{
    if ((old ^ nf) & STORE_F_SEEN) {
        if (nf & STORE_F_SEEN)
            mb->m.unseen -= mb->m.unseen ? 1 : 0;
        else
            mb->m.unseen++;
    }
    if ((old ^ nf) & STORE_F_DELETED) {
        if (nf & STORE_F_DELETED)
            mb->m.deleted++;
        else
            mb->m.deleted -= mb->m.deleted ? 1 : 0;
    }
}

/* Add one message to mb (in memory: caller saves mb and owner). Keywords
 * (NUL list) are canonicalised through mb. */
static int msg_add(struct fsm *f, struct fmbox *mb, struct fuser *owner, uint64_t blob_id,
                   uint64_t size, uint32_t flags, const char *kws, size_t kws_len, int64_t idate,
                   int32_t tz, uint32_t *uid_r)
{
    char *kw = NULL;
    size_t kw_len = 0;
    if (kw_build(mb, kws, kws_len, &kw, &kw_len)) return -1;
    struct store_msg m = {0};
    m.uid = mb->m.uidnext++;
    m.blob_id = blob_id;
    m.modseq = f->index;
    m.internal_date = idate;
    m.internal_tz_min = tz;
    m.size = size;
    m.flags = flags & 0x1f;
    m.keywords = kw;
    m.keywords_len = kw_len;
    int rc = msg_put(f, mb->m.id, &m);
    free(kw);
    if (rc) return -1;
    counts_add(mb, m.flags, size);
    mb->m.highestmodseq = f->index;
    if (owner) {
        owner->u.used_bytes += size;
        owner->u.used_messages++;
    }
    *uid_r = m.uid;
    return 0;
}

static int u32_cmp(const void *a, const void *b)
{
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return x < y ? -1 : x > y;
}

/* Existing uids of mbid within the ranges, ascending, unique (malloc()ed). */
static int collect_uids(struct fsm *f, uint64_t mbid, Coffer__UidRange **r, size_t nr,
                        uint32_t **out, size_t *n_out)
{
    uint32_t *a = NULL;
    size_t n = 0, cap = 0;
    MDB_cursor *c;
    int rc = mdb_cursor_open(f->txn, f->st->msgs, &c);
    *out = NULL;
    *n_out = 0;
    if (rc) return lmdb_fail("cursor", rc);
    for (size_t i = 0; i < nr; i++) {
        uint32_t lo = r[i]->lo, hi = r[i]->hi;
        if (lo > hi) {
            uint32_t t = lo;
            lo = hi;
            hi = t;
        }
        if (lo == 0) lo = 1;
        uint8_t kb[12];
        store__be64(kb, mbid);
        store__be32(kb + 8, lo);
        MDB_val k = {12, kb}, v;
        for (rc = mdb_cursor_get(c, &k, &v, MDB_SET_RANGE); rc == 0;
             rc = mdb_cursor_get(c, &k, &v, MDB_NEXT)) {
            if (k.mv_size != 12 || memcmp(k.mv_data, kb, 8) != 0) break;
            uint32_t uid = store__get_be32((const uint8_t *)k.mv_data + 8);
            if (uid > hi) break;
            if (n == cap) {
                size_t ncap = cap ? cap * 2 : 64;
                uint32_t *na = realloc(a, ncap * sizeof(*a));
                if (!na) {
                    free(a);
                    mdb_cursor_close(c);
                    return oom();
                }
                a = na;
                cap = ncap;
            }
            a[n++] = uid;
        }
        if (rc && rc != MDB_NOTFOUND) {
            free(a);
            mdb_cursor_close(c);
            return lmdb_fail("cursor get", rc);
        }
    }
    mdb_cursor_close(c);
    if (n > 1) {
        qsort(a, n, sizeof(*a), u32_cmp);
        size_t w = 1;
        for (size_t i = 1; i < n; i++)
            if (a[i] != a[w - 1]) a[w++] = a[i];
        n = w;
    }
    *out = a;
    *n_out = n;
    return 0;
}

/* Delete every key of dbi starting with prefix. */
static int del_prefix(struct fsm *f, MDB_dbi dbi, const uint8_t *prefix, size_t plen)
{
    MDB_cursor *c;
    int rc = mdb_cursor_open(f->txn, dbi, &c);
    if (rc) return lmdb_fail("cursor", rc);
    for (;;) {
        MDB_val k = {plen, (void *)prefix}, v;
        rc = mdb_cursor_get(c, &k, &v, MDB_SET_RANGE);
        if (rc == MDB_NOTFOUND) break;
        if (rc) goto fail;
        if (k.mv_size < plen || memcmp(k.mv_data, prefix, plen) != 0) break;
        if ((rc = mdb_cursor_del(c, 0))) goto fail;
    }
    mdb_cursor_close(c);
    return 0;
fail:
    mdb_cursor_close(c);
    return lmdb_fail("del_prefix", rc);
}

/* Remove a mailbox with all its messages and ACLs; GONE change. The owner's
 * usage is reduced in memory (caller saves owner). */
static int mbox_destroy(struct fsm *f, struct fmbox *mb, struct fuser *owner)
{
    uint32_t *uids = NULL;
    size_t n = 0;
    MDB_txn *t = f->txn;
    if (store_msg_uids(f->st, t, mb->m.id, &uids, &n)) return lmdb_fail("msg uids", MDB_CORRUPTED);
    for (size_t i = 0; i < n; i++) {
        struct fmsg fm;
        int rc = msg_load(f, mb->m.id, uids[i], &fm);
        if (rc == 0) rc = msg_del(f, mb->m.id, uids[i], fm.m.modseq);
        if (rc == 0) rc = blob_ref(f, fm.m.blob_id, -1);
        free(fm.kw);
        if (rc) {
            free(uids);
            return -1;
        }
        if (owner) usage_sub(owner, fm.m.size, 1);
    }
    free(uids);
    uint8_t kb[8 + STORE_MAX_MAILBOX_NAME + 1];
    store__be64(kb, mb->m.id);
    if (del_prefix(f, f->st->acl, kb, 8) || del_prefix(f, f->st->modseq, kb, 8)) return -1;
    MDB_val k = {8, kb};
    int rc = mdb_del(f->txn, f->st->mailboxes, &k, NULL);
    if (rc) return lmdb_fail("mailboxes del", rc);
    k.mv_size = mbkey(kb, mb->m.owner_id, mb->name);
    rc = mdb_del(f->txn, f->st->mbnames, &k, NULL);
    if (rc) return lmdb_fail("mbnames del", rc);
    return change_add(f, STORE_CH_GONE, mb->m.id, NULL, 0);
}

/* ------------------------------------------------------------------ ops */

static int op_group_init(struct fsm *f, const Coffer__GroupInit *g)
{
    if (g->group_id.len != 16) return refuse(f, STORE_EINVAL, "group id must be 16 bytes");
    MDB_val k = {8, "group_id"}, v;
    int rc = mdb_get(f->txn, f->st->meta, &k, &v);
    if (rc == 0) {
        if (v.mv_size == 16 && memcmp(v.mv_data, g->group_id.data, 16) == 0) return 0;
        return refuse(f, STORE_EINVAL, "group already initialised with a different id");
    }
    if (rc != MDB_NOTFOUND) return lmdb_fail("meta get", rc);
    v.mv_size = 16;
    v.mv_data = g->group_id.data;
    if ((rc = mdb_put(f->txn, f->st->meta, &k, &v, 0))) return lmdb_fail("meta put", rc);
    f->group_set = 1;
    memcpy(f->group_id, g->group_id.data, 16);
    return 0;
}

/* NodeInfo: service addresses of a member (removed = forget it). */
static int op_node_info(struct fsm *f, const Coffer__NodeInfo *ni)
{
    uint8_t kb[8];
    MDB_val k = {8, kb}, v;
    size_t len;
    uint8_t *buf;
    int rc;

    if (ni->node_id == 0) return refuse(f, STORE_EINVAL, "node id must be >= 1");
    store__be64(kb, ni->node_id);
    f->nodes_changed = 1;
    if (ni->has_removed && ni->removed) {
        rc = mdb_del(f->txn, f->st->nodes, &k, NULL);
        if (rc != 0 && rc != MDB_NOTFOUND) return lmdb_fail("nodes del", rc);
        return 0;
    }
    len = coffer__node_info__get_packed_size(ni);
    buf = malloc(len ? len : 1);
    if (buf == NULL) return oom();
    coffer__node_info__pack(ni, buf);
    v.mv_size = len;
    v.mv_data = buf;
    rc = mdb_put(f->txn, f->st->nodes, &k, &v, 0);
    free(buf);
    if (rc) return lmdb_fail("nodes put", rc);
    return 0;
}

static int op_user_create(struct fsm *f, const Coffer__UserCreate *uc)
{
    char lc[STORE_MAX_USERNAME + 1];
    int n = user_key(uc->username, lc), rc;
    if (n < 0) return refuse(f, STORE_EINVAL, "invalid username");
    struct fuser fu;
    rc = user_load(f, lc, &fu);
    user_free(&fu);
    if (rc == 0) return refuse(f, STORE_EEXIST, "user exists");
    if (rc < 0) return -1;
    memset(&fu, 0, sizeof(fu));
    if (meta_next(f, "next_user_id", &fu.u.id)) return -1;
    fu.u.quota_bytes = uc->has_quota_storage_bytes ? uc->quota_storage_bytes : 0;
    fu.u.quota_messages = uc->has_quota_messages ? uc->quota_messages : 0;
    if (user_set_strings(&fu, lc, uc->password_hash, "")) return -1;
    rc = user_save(f, &fu);
    if (rc == 0) {
        uint8_t kb[8];
        store__be64(kb, fu.u.id);
        MDB_val k = {8, kb}, v = {(size_t)n, lc};
        if ((rc = mdb_put(f->txn, f->st->userids, &k, &v, 0))) rc = lmdb_fail("userids put", rc);
    }
    /* INBOX always exists; then the initial mailboxes in order. */
    if (rc == 0) {
        rc = mbox_create(f, fu.u.id, "INBOX", 0, NULL, NULL);
        if (rc == STORE_OK || rc == STORE_EEXIST) rc = 0;
    }
    for (size_t i = 0; rc == 0 && i < uc->n_initial_mailboxes; i++) {
        const Coffer__MailboxCreate *mc = uc->initial_mailboxes[i];
        uint64_t id;
        rc =
            mbox_create(f, fu.u.id, mc->name, mc->has_special_use ? mc->special_use : 0, &id, NULL);
        if (rc == STORE_EEXIST) {
            /* INBOX listed explicitly, or a duplicate: keep the first */
            rc = 0;
        } else if (rc == STORE_EINVAL) {
            user_free(&fu);
            return refuse(f, STORE_EINVAL, "invalid initial mailbox name");
        }
    }
    user_free(&fu);
    return rc < 0 ? -1 : 0;
}

static int op_user_set_password(struct fsm *f, const Coffer__UserSetPassword *p)
{
    struct fuser fu;
    int rc = user_load(f, p->username, &fu);
    if (rc == STORE_ENOENT) return refuse(f, STORE_ENOENT, "no such user");
    if (rc == 0) rc = user_set_strings(&fu, fu.name, p->password_hash, fu.reason);
    if (rc == 0) rc = user_save(f, &fu);
    user_free(&fu);
    return rc ? -1 : 0;
}

static int op_user_set_disabled(struct fsm *f, const Coffer__UserSetDisabled *d)
{
    struct fuser fu;
    int rc = user_load(f, d->username, &fu);
    if (rc == STORE_ENOENT) return refuse(f, STORE_ENOENT, "no such user");
    if (rc == 0) {
        fu.u.disabled = d->disabled ? 1 : 0;
        fu.u.refuse_delivery = d->disabled && d->has_refuse_delivery && d->refuse_delivery;
        rc = user_set_strings(&fu, fu.name, fu.hash, d->disabled && d->reason ? d->reason : "");
    }
    if (rc == 0) rc = user_save(f, &fu);
    user_free(&fu);
    return rc ? -1 : 0;
}

static int op_quota_set(struct fsm *f, const Coffer__QuotaSet *q)
{
    struct fuser fu;
    int rc = user_load(f, q->username, &fu);
    if (rc == STORE_ENOENT) return refuse(f, STORE_ENOENT, "no such user");
    if (rc == 0) {
        if (q->has_storage_bytes) fu.u.quota_bytes = q->storage_bytes;
        if (q->has_messages) fu.u.quota_messages = q->messages;
        rc = user_save(f, &fu);
    }
    user_free(&fu);
    return rc ? -1 : 0;
}

static int acl_forget_identifier(struct fsm *f, const char *ident)
{
    size_t in = strlen(ident), n = 0, cap = 0;
    uint64_t *ids = NULL;
    MDB_cursor *c;
    MDB_val k, v;
    int rc = mdb_cursor_open(f->txn, f->st->acl, &c);
    if (rc) return lmdb_fail("cursor", rc);
    for (rc = mdb_cursor_get(c, &k, &v, MDB_FIRST); rc == 0;
         rc = mdb_cursor_get(c, &k, &v, MDB_NEXT)) {
        if (k.mv_size != 8 + in || memcmp((const char *)k.mv_data + 8, ident, in) != 0) continue;
        if (n == cap) {
            cap = cap ? cap * 2 : 8;
            uint64_t *ni = realloc(ids, cap * sizeof(*ids));
            if (!ni) {
                free(ids);
                mdb_cursor_close(c);
                return oom();
            }
            ids = ni;
        }
        ids[n++] = store__get_be64(k.mv_data);
    }
    mdb_cursor_close(c);
    if (rc != MDB_NOTFOUND) {
        free(ids);
        return lmdb_fail("acl scan", rc);
    }
    rc = 0;
    for (size_t i = 0; rc == 0 && i < n; i++) {
        uint8_t kb[8 + STORE_MAX_IDENTIFIER];
        store__be64(kb, ids[i]);
        memcpy(kb + 8, ident, in);
        MDB_val dk = {8 + in, kb};
        if ((rc = mdb_del(f->txn, f->st->acl, &dk, NULL))) rc = lmdb_fail("acl del", rc);
    }
    free(ids);
    return rc;
}

static int op_user_delete(struct fsm *f, const Coffer__UserDelete *d)
{
    struct fuser fu;
    int rc = user_load(f, d->username, &fu);
    if (rc == STORE_ENOENT) return refuse(f, STORE_ENOENT, "no such user");
    if (rc) return -1;
    /* mailboxes (ids first: destroying changes mbnames) */
    uint64_t *ids = NULL;
    size_t n = 0, cap = 0;
    uint8_t kb[8];
    store__be64(kb, fu.u.id);
    MDB_cursor *c;
    if ((rc = mdb_cursor_open(f->txn, f->st->mbnames, &c))) {
        user_free(&fu);
        return lmdb_fail("cursor", rc);
    }
    MDB_val k = {8, kb}, v;
    for (rc = mdb_cursor_get(c, &k, &v, MDB_SET_RANGE); rc == 0;
         rc = mdb_cursor_get(c, &k, &v, MDB_NEXT)) {
        if (k.mv_size < 8 || memcmp(k.mv_data, kb, 8) != 0 || v.mv_size != 8) break;
        if (n == cap) {
            cap = cap ? cap * 2 : 16;
            uint64_t *ni = realloc(ids, cap * sizeof(*ids));
            if (!ni) {
                rc = -1;
                break;
            }
            ids = ni;
        }
        ids[n++] = get_le(v.mv_data, 8);
    }
    mdb_cursor_close(c);
    if (rc != 0 && rc != MDB_NOTFOUND) {
        free(ids);
        user_free(&fu);
        return rc == -1 ? oom() : lmdb_fail("cursor get", rc);
    }
    rc = 0;
    for (size_t i = 0; rc == 0 && i < n; i++) {
        struct fmbox mb;
        rc = mbox_load_id(f, ids[i], &mb);
        if (rc == 0) rc = mbox_destroy(f, &mb, &fu);
        mbox_free(&mb);
    }
    free(ids);
    if (rc == 0) rc = del_prefix(f, f->st->subs, kb, 8);
    /* ACL entries naming this user on other users' mailboxes (mailbox ids
     * collected first, then deleted). */
    if (rc == 0) rc = acl_forget_identifier(f, fu.name);
    if (rc == 0) {
        MDB_val uk = {strlen(fu.name), fu.name};
        if ((rc = mdb_del(f->txn, f->st->users, &uk, NULL))) rc = lmdb_fail("users del", rc);
    }
    if (rc == 0) {
        MDB_val ik = {8, kb};
        if ((rc = mdb_del(f->txn, f->st->userids, &ik, NULL))) rc = lmdb_fail("userids del", rc);
    }
    user_free(&fu);
    return rc ? -1 : 0;
}

static int op_mailbox_create(struct fsm *f, const Coffer__MailboxCreate *mc)
{
    struct fuser fu;
    int rc = user_load(f, mc->username, &fu);
    if (rc == STORE_ENOENT) return refuse(f, STORE_ENOENT, "no such user");
    if (rc) return -1;
    uint32_t uv = 0;
    rc = mbox_create(f, fu.u.id, mc->name, mc->has_special_use ? mc->special_use : 0, NULL, &uv);
    user_free(&fu);
    if (rc == STORE_EEXIST) return refuse(f, STORE_EEXIST, "mailbox exists");
    if (rc == STORE_EINVAL) return refuse(f, STORE_EINVAL, "invalid mailbox name");
    if (rc == 0) f->res->uidvalidity = uv;
    return rc < 0 ? -1 : 0;
}

static int op_mailbox_delete(struct fsm *f, const Coffer__MailboxDelete *d)
{
    struct fuser fu;
    struct fmbox mb;
    int rc = user_load(f, d->username, &fu);
    if (rc == STORE_ENOENT) return refuse(f, STORE_ENOENT, "no such user");
    if (rc) return -1;
    rc = mbox_load(f, fu.u.id, d->name, &mb);
    if (rc == STORE_ENOENT) {
        user_free(&fu);
        return refuse(f, STORE_ENOENT, "no such mailbox");
    }
    if (rc == 0 && strcmp(mb.name, "INBOX") == 0) {
        mbox_free(&mb);
        user_free(&fu);
        return refuse(f, STORE_EINVAL, "INBOX cannot be deleted");
    }
    if (rc == 0) rc = mbox_destroy(f, &mb, &fu);
    if (rc == 0) rc = user_save(f, &fu);
    mbox_free(&mb);
    user_free(&fu);
    return rc ? -1 : 0;
}

/* RENAME INBOX: move all messages into a new mailbox (uids 1..n), INBOX
 * stays, empty. */
static int rename_inbox(struct fsm *f, struct fuser *fu, struct fmbox *inbox, const char *new_name)
{
    uint64_t nid;
    uint32_t *uids = NULL;
    size_t n = 0;
    int rc = mbox_create(f, fu->u.id, new_name, 0, &nid, &f->res->uidvalidity);
    if (rc == STORE_EEXIST) return refuse(f, STORE_EEXIST, "target mailbox exists");
    if (rc == STORE_EINVAL) return refuse(f, STORE_EINVAL, "invalid mailbox name");
    if (rc) return -1;
    struct fmbox dst;
    if (mbox_load_id(f, nid, &dst)) return -1;
    rc = store_msg_uids(f->st, f->txn, inbox->m.id, &uids, &n) ? lmdb_fail("uids", MDB_CORRUPTED)
                                                               : 0;
    if (rc == 0 && inbox->kw_len) {
        dst.kw = malloc(inbox->kw_len);
        if (!dst.kw)
            rc = oom();
        else {
            memcpy(dst.kw, inbox->kw, inbox->kw_len);
            dst.kw_len = inbox->kw_len;
        }
    }
    for (size_t i = 0; rc == 0 && i < n; i++) {
        struct fmsg fm;
        rc = msg_load(f, inbox->m.id, uids[i], &fm);
        if (rc == 0) rc = msg_del(f, inbox->m.id, uids[i], fm.m.modseq);
        if (rc == 0) {
            fm.m.uid = dst.m.uidnext++;
            fm.m.modseq = f->index;
            rc = msg_put(f, dst.m.id, &fm.m);
            counts_add(&dst, fm.m.flags, fm.m.size);
        }
        free(fm.kw);
    }
    if (rc == 0) {
        dst.m.highestmodseq = f->index;
        inbox->m.messages = inbox->m.unseen = inbox->m.deleted = inbox->m.size = 0;
        inbox->m.highestmodseq = f->index;
        rc = mbox_save(f, &dst);
    }
    if (rc == 0) rc = mbox_save(f, inbox);
    if (rc == 0 && n) rc = change_add(f, STORE_CH_EXPUNGE, inbox->m.id, uids, n);
    free(uids);
    mbox_free(&dst);
    return rc ? -1 : 0;
}

struct ren_item {
    uint64_t id;
    char *old_name, *new_name;
};

static int op_mailbox_rename(struct fsm *f, const Coffer__MailboxRename *r)
{
    char oldn[STORE_MAX_MAILBOX_NAME + 1], newn[STORE_MAX_MAILBOX_NAME + 1];
    struct fuser fu;
    struct fmbox mb = {0};
    struct ren_item *items = NULL;
    size_t n = 0, cap = 0;
    int rc = user_load(f, r->username, &fu);
    if (rc == STORE_ENOENT) return refuse(f, STORE_ENOENT, "no such user");
    if (rc) return -1;
    int on = mbox_canon(r->old_name, oldn), nn = mbox_canon(r->new_name, newn);
    if (on < 0) {
        rc = refuse(f, STORE_ENOENT, "no such mailbox");
        goto done;
    }
    if (nn < 0) {
        rc = refuse(f, STORE_EINVAL, "invalid mailbox name");
        goto done;
    }
    rc = mbox_load(f, fu.u.id, oldn, &mb);
    if (rc == STORE_ENOENT) {
        rc = refuse(f, STORE_ENOENT, "no such mailbox");
        goto done;
    }
    if (rc) goto done;
    if (strcmp(oldn, "INBOX") == 0) {
        rc = rename_inbox(f, &fu, &mb, newn);
        goto done;
    }
    if (strcmp(oldn, newn) == 0) {
        rc = refuse(f, STORE_EEXIST, "target mailbox exists");
        goto done;
    }
    if ((size_t)nn > (size_t)on && strncmp(newn, oldn, (size_t)on) == 0 && newn[on] == '/') {
        rc = refuse(f, STORE_EINVAL, "cannot rename a mailbox into itself");
        goto done;
    }
    /* the mailbox and its children "old/..." (contiguous in key order) */
    uint8_t kb[8 + STORE_MAX_MAILBOX_NAME + 2];
    size_t pl = mbkey(kb, fu.u.id, oldn);
    MDB_cursor *c;
    if ((rc = mdb_cursor_open(f->txn, f->st->mbnames, &c))) {
        rc = lmdb_fail("cursor", rc);
        goto done;
    }
    MDB_val k = {pl, kb}, v;
    for (rc = mdb_cursor_get(c, &k, &v, MDB_SET_RANGE); rc == 0;
         rc = mdb_cursor_get(c, &k, &v, MDB_NEXT)) {
        if (k.mv_size < pl || memcmp(k.mv_data, kb, pl) != 0) break;
        const char *name = (const char *)k.mv_data + 8;
        size_t len = k.mv_size - 8;
        if (len != (size_t)on && name[on] != '/') continue; /* "oldx": not a child */
        size_t newlen = (size_t)nn + (len - (size_t)on);
        if (n == cap) {
            cap = cap ? cap * 2 : 8;
            struct ren_item *ni = realloc(items, cap * sizeof(*items));
            if (!ni) {
                rc = -1;
                break;
            }
            items = ni;
        }
        struct ren_item *it = &items[n];
        it->id = v.mv_size == 8 ? get_le(v.mv_data, 8) : 0;
        it->old_name = strndup(name, len);
        it->new_name = malloc(newlen + 1);
        if (!it->old_name || !it->new_name) {
            free(it->old_name);
            free(it->new_name);
            rc = -1;
            break;
        }
        n++;
        memcpy(it->new_name, newn, (size_t)nn);
        memcpy(it->new_name + nn, name + on, len - (size_t)on);
        it->new_name[newlen] = 0;
    }
    mdb_cursor_close(c);
    if (rc == -1) {
        rc = oom();
        goto done;
    }
    if (rc != MDB_NOTFOUND && rc != 0) {
        rc = lmdb_fail("cursor get", rc);
        goto done;
    }
    rc = 0;
    for (size_t i = 0; i < n; i++) {
        uint64_t id;
        if (strlen(items[i].new_name) > STORE_MAX_MAILBOX_NAME) {
            rc = refuse(f, STORE_EINVAL, "new mailbox name too long");
            goto done;
        }
        int lr = mbox_lookup(f, fu.u.id, items[i].new_name, &id);
        if (lr == 0) {
            rc = refuse(f, STORE_EEXIST, "target mailbox exists");
            goto done;
        }
        if (lr < 0) {
            rc = -1;
            goto done;
        }
    }
    for (size_t i = 0; rc == 0 && i < n; i++) {
        MDB_val dk = {mbkey(kb, fu.u.id, items[i].old_name), kb};
        if ((rc = mdb_del(f->txn, f->st->mbnames, &dk, NULL))) rc = lmdb_fail("mbnames del", rc);
    }
    for (size_t i = 0; rc == 0 && i < n; i++) {
        uint8_t idb[8];
        put_le(idb, items[i].id, 8);
        MDB_val pk = {mbkey(kb, fu.u.id, items[i].new_name), kb}, pv = {8, idb};
        if ((rc = mdb_put(f->txn, f->st->mbnames, &pk, &pv, 0))) {
            rc = lmdb_fail("mbnames put", rc);
            break;
        }
        struct fmbox m;
        if ((rc = mbox_load_id(f, items[i].id, &m))) break;
        free(m.name);
        m.name = strdup(items[i].new_name);
        rc = m.name ? mbox_save(f, &m) : oom();
        mbox_free(&m);
        if (rc == 0) rc = change_add(f, STORE_CH_GONE, items[i].id, NULL, 0);
    }
done:
    for (size_t i = 0; i < n; i++) {
        free(items[i].old_name);
        free(items[i].new_name);
    }
    free(items);
    mbox_free(&mb);
    user_free(&fu);
    return rc ? -1 : 0;
}

static int op_subscribe(struct fsm *f, const Coffer__Subscribe *s)
{
    char cn[STORE_MAX_MAILBOX_NAME + 1];
    uint8_t kb[8 + STORE_MAX_MAILBOX_NAME + 1];
    struct fuser fu;
    int rc = user_load(f, s->username, &fu);
    if (rc == STORE_ENOENT) return refuse(f, STORE_ENOENT, "no such user");
    if (rc) return -1;
    uint64_t uid = fu.u.id;
    user_free(&fu);
    if (mbox_canon(s->name, cn) < 0) return refuse(f, STORE_EINVAL, "invalid mailbox name");
    MDB_val k = {mbkey(kb, uid, cn), kb}, v = {0, ""};
    if (s->subscribed)
        rc = mdb_put(f->txn, f->st->subs, &k, &v, 0);
    else if ((rc = mdb_del(f->txn, f->st->subs, &k, NULL)) == MDB_NOTFOUND)
        rc = 0;
    return rc ? lmdb_fail("subs", rc) : 0;
}

static int op_acl_set(struct fsm *f, const Coffer__AclSet *a)
{
    struct fuser fu;
    uint64_t mbid;
    int rc = user_load(f, a->username, &fu);
    if (rc == STORE_ENOENT) return refuse(f, STORE_ENOENT, "no such user");
    if (rc) return -1;
    rc = mbox_lookup(f, fu.u.id, a->name, &mbid);
    user_free(&fu);
    if (rc == STORE_ENOENT) return refuse(f, STORE_ENOENT, "no such mailbox");
    if (rc) return -1;
    size_t in = a->identifier ? strlen(a->identifier) : 0;
    size_t rn = a->rights ? strlen(a->rights) : 0;
    if (in == 0 || in > STORE_MAX_IDENTIFIER) return refuse(f, STORE_EINVAL, "invalid identifier");
    if (rn > 32 || strspn(a->rights, "lrswipkxtecda") != rn)
        return refuse(f, STORE_EINVAL, "invalid rights");
    uint8_t kb[8 + STORE_MAX_IDENTIFIER];
    store__be64(kb, mbid);
    memcpy(kb + 8, a->identifier, in);
    MDB_val k = {8 + in, kb}, v = {rn, a->rights};
    if (rn)
        rc = mdb_put(f->txn, f->st->acl, &k, &v, 0);
    else if ((rc = mdb_del(f->txn, f->st->acl, &k, NULL)) == MDB_NOTFOUND)
        rc = 0;
    return rc ? lmdb_fail("acl", rc) : 0;
}

static int op_append(struct fsm *f, const Coffer__Append *a)
{
    struct fuser fu;
    struct fmbox mb = {0};
    char *kws = NULL;
    size_t kws_len = 0;
    int rc = user_load(f, a->username, &fu);
    if (rc == STORE_ENOENT) return refuse(f, STORE_ENOENT, "no such user");
    if (rc) return -1;
    rc = mbox_load(f, fu.u.id, a->mailbox, &mb);
    if (rc == STORE_ENOENT) {
        rc = refuse(f, STORE_ENOENT, "[TRYCREATE] no such mailbox");
        goto done;
    }
    if (rc) goto done;
    rc = kw_from_array(a->keywords, a->n_keywords, &kws, &kws_len);
    if (rc == -2) {
        rc = refuse(f, STORE_EINVAL, "invalid keyword");
        goto done;
    }
    if (rc) goto done;
    if (!quota_ok(&fu, a->message.len, 1)) {
        rc = refuse(f, STORE_EQUOTA, "[OVERQUOTA] quota exceeded");
        goto done;
    }
    if (mb.m.uidnext == UINT32_MAX) {
        rc = refuse(f, STORE_EINVAL, "mailbox uid space exhausted");
        goto done;
    }
    uint64_t blob;
    uint32_t uid;
    int64_t idate = a->has_internal_date ? a->internal_date : (int64_t)(f->time_ms / 1000);
    rc = blob_new(f, &a->message, a->cache, &blob);
    if (rc == 0)
        rc = msg_add(f, &mb, &fu, blob, a->message.len, a->has_flags ? a->flags : 0, kws, kws_len,
                     idate, a->has_internal_tz_min ? a->internal_tz_min : 0, &uid);
    if (rc == 0) rc = mbox_save(f, &mb);
    if (rc == 0) rc = user_save(f, &fu);
    if (rc == 0) rc = change_add(f, STORE_CH_APPEND, mb.m.id, &uid, 1);
    if (rc == 0) {
        f->res->uid = uid;
        f->res->uidvalidity = mb.m.uidvalidity;
    }
done:
    free(kws);
    mbox_free(&mb);
    user_free(&fu);
    return rc ? -1 : 0;
}

/* Deliver: each recipient independently; one blob shared by all. */
static int op_deliver(struct fsm *f, const Coffer__Deliver *d)
{
    uint64_t blob = 0;
    int have_blob = 0, delivered = 0, first_err = STORE_OK;
    int64_t idate = d->has_internal_date ? d->internal_date : (int64_t)(f->time_ms / 1000);
    if (d->n_usernames) {
        f->res->rcpt_results = calloc(d->n_usernames, sizeof(int));
        if (!f->res->rcpt_results) return oom();
        f->res->n_rcpt = d->n_usernames;
    }
    for (size_t i = 0; i < d->n_usernames; i++) {
        struct fuser fu;
        struct fmbox mb = {0};
        int res = STORE_OK;
        int rc = user_load(f, d->usernames[i], &fu);
        if (rc < 0) return -1;
        if (rc == STORE_ENOENT) {
            res = STORE_ENOENT;
        } else if (fu.u.disabled && fu.u.refuse_delivery) {
            res = STORE_EDISABLED;
        } else {
            const char *mname = i < d->n_mailboxes && d->mailboxes[i] && d->mailboxes[i][0]
                                    ? d->mailboxes[i]
                                    : "INBOX";
            rc = mbox_load(f, fu.u.id, mname, &mb);
            if (rc == STORE_ENOENT) /* named mailbox gone: fall back to INBOX */
                rc = mbox_load(f, fu.u.id, "INBOX", &mb);
            if (rc < 0) {
                user_free(&fu);
                return -1;
            }
            if (rc == STORE_ENOENT)
                res = STORE_ENOENT;
            else if (!quota_ok(&fu, d->message.len, 1))
                res = STORE_EQUOTA;
            else if (mb.m.uidnext == UINT32_MAX)
                res = STORE_EINVAL;
        }
        if (res == STORE_OK) {
            uint32_t uid;
            rc = 0;
            if (!have_blob) {
                rc = blob_new(f, &d->message, d->cache, &blob);
                have_blob = 1;
            } else {
                rc = blob_ref(f, blob, +1);
            }
            if (rc == 0)
                rc = msg_add(f, &mb, &fu, blob, d->message.len, 0, NULL, 0, idate, 0, &uid);
            if (rc == 0) rc = mbox_save(f, &mb);
            if (rc == 0) rc = user_save(f, &fu);
            if (rc == 0) rc = change_add(f, STORE_CH_APPEND, mb.m.id, &uid, 1);
            if (rc) {
                mbox_free(&mb);
                user_free(&fu);
                return -1;
            }
            delivered++;
        } else if (first_err == STORE_OK) {
            first_err = res;
        }
        f->res->rcpt_results[i] = res;
        mbox_free(&mb);
        user_free(&fu);
    }
    if (!delivered && first_err != STORE_OK) f->res->result = first_err;
    return 0;
}

static int op_store_flags(struct fsm *f, const Coffer__StoreFlags *s)
{
    struct fuser fu;
    struct fmbox mb = {0};
    char *given = NULL, *canon = NULL;
    size_t given_len = 0, canon_len = 0, n = 0, n_changed = 0;
    uint32_t *uids = NULL, *changed = NULL;
    uint32_t fl = (s->has_flags ? s->flags : 0) & 0x1f;
    int rc = user_load(f, s->username, &fu);
    if (rc == STORE_ENOENT) return refuse(f, STORE_ENOENT, "no such user");
    if (rc) return -1;
    rc = mbox_load(f, fu.u.id, s->mailbox, &mb);
    user_free(&fu);
    if (rc == STORE_ENOENT) return refuse(f, STORE_ENOENT, "no such mailbox");
    if (rc) return -1;
    if (mb.m.uidvalidity != s->uidvalidity) {
        rc = refuse(f, STORE_EUIDVALIDITY, "mailbox was recreated");
        goto done;
    }
    rc = kw_from_array(s->keywords, s->n_keywords, &given, &given_len);
    if (rc == -2) {
        rc = refuse(f, STORE_EINVAL, "invalid keyword");
        goto done;
    }
    if (rc) goto done;
    if (s->mode != COFFER__FLAG_MODE__FLAGS_REMOVE) {
        if ((rc = kw_build(&mb, given, given_len, &canon, &canon_len))) goto done;
    }
    if ((rc = collect_uids(f, mb.m.id, s->uids, s->n_uids, &uids, &n))) goto done;
    if (n && !(changed = malloc(n * sizeof(*changed)))) {
        rc = oom();
        goto done;
    }
    for (size_t i = 0; rc == 0 && i < n; i++) {
        struct fmsg fm;
        if ((rc = msg_load(f, mb.m.id, uids[i], &fm))) break;
        if (s->has_unchanged_since && s->unchanged_since && fm.m.modseq > s->unchanged_since) {
            uint32_t *nm =
                realloc(f->res->modified_uids, (f->res->n_modified + 1) * sizeof(uint32_t));
            if (!nm) {
                free(fm.kw);
                rc = oom();
                break;
            }
            f->res->modified_uids = nm;
            nm[f->res->n_modified++] = uids[i];
            free(fm.kw);
            continue;
        }
        uint32_t nf = fm.m.flags;
        char *nk = NULL;
        size_t nk_len = 0;
        int kw_changed = 0;
        const char *p, *end;
        switch (s->mode) {
        case COFFER__FLAG_MODE__FLAGS_ADD:
            nf |= fl;
            if (fm.m.keywords_len && !(nk = malloc(fm.m.keywords_len))) {
                rc = oom();
                break;
            }
            if (fm.m.keywords_len) memcpy(nk, fm.kw, fm.m.keywords_len);
            nk_len = fm.m.keywords_len;
            for (p = canon, end = canon + canon_len; rc == 0 && p < end; p += strlen(p) + 1) {
                if (!kw_find(nk, nk_len, p)) {
                    rc = kw_append(&nk, &nk_len, p);
                    kw_changed = 1;
                }
            }
            break;
        case COFFER__FLAG_MODE__FLAGS_REMOVE:
            nf &= ~fl;
            for (p = fm.kw, end = fm.kw + fm.m.keywords_len; rc == 0 && p < end;
                 p += strlen(p) + 1) {
                if (kw_find(given, given_len, p))
                    kw_changed = 1;
                else
                    rc = kw_append(&nk, &nk_len, p);
            }
            break;
        default: /* REPLACE */
            nf = fl;
            if (canon_len && !(nk = malloc(canon_len))) {
                rc = oom();
                break;
            }
            if (canon_len) memcpy(nk, canon, canon_len);
            nk_len = canon_len;
            if (nk_len != fm.m.keywords_len) {
                kw_changed = 1;
            } else {
                for (p = canon, end = canon + canon_len; p < end; p += strlen(p) + 1)
                    if (!kw_find(fm.kw, fm.m.keywords_len, p)) kw_changed = 1;
            }
            break;
        }
        if (rc == 0 && (nf != fm.m.flags || kw_changed)) {
            uint64_t old_modseq = fm.m.modseq;
            flag_counts(&mb, fm.m.flags, nf);
            fm.m.flags = nf;
            fm.m.keywords = nk;
            fm.m.keywords_len = nk_len;
            fm.m.modseq = f->index;
            rc = modseq_del(f, mb.m.id, old_modseq, fm.m.uid);
            if (rc == 0) rc = msg_put(f, mb.m.id, &fm.m);
            changed[n_changed++] = uids[i];
        }
        free(nk);
        free(fm.kw);
    }
    if (rc) goto done;
    if (n_changed) {
        mb.m.highestmodseq = f->index;
        if ((rc = mbox_save(f, &mb)) ||
            (rc = change_add(f, STORE_CH_FLAGS, mb.m.id, changed, n_changed)))
            goto done;
    }
    if (f->res->n_modified) refuse(f, STORE_EMODIFIED, "[MODIFIED] some messages were modified");
done:
    free(given);
    free(canon);
    free(uids);
    free(changed);
    mbox_free(&mb);
    return rc ? -1 : 0;
}

/* Remove messages uids[0..n) from mb (in memory counts; caller saves). */
static int expunge_uids(struct fsm *f, struct fmbox *mb, struct fuser *owner, const uint32_t *uids,
                        size_t n)
{
    for (size_t i = 0; i < n; i++) {
        struct fmsg fm;
        int rc = msg_load(f, mb->m.id, uids[i], &fm);
        if (rc == 0) rc = msg_del(f, mb->m.id, uids[i], fm.m.modseq);
        if (rc == 0) rc = blob_ref(f, fm.m.blob_id, -1);
        free(fm.kw);
        if (rc) return -1;
        counts_sub(mb, fm.m.flags, fm.m.size);
        if (owner) usage_sub(owner, fm.m.size, 1);
    }
    if (n) {
        mb->m.highestmodseq = f->index;
        return change_add(f, STORE_CH_EXPUNGE, mb->m.id, uids, n);
    }
    return 0;
}

static int op_expunge(struct fsm *f, const Coffer__Expunge *x)
{
    struct fuser fu;
    struct fmbox mb = {0};
    uint32_t *uids = NULL;
    size_t n = 0;
    int require_deleted = x->has_require_deleted ? x->require_deleted : 1;
    int rc = user_load(f, x->username, &fu);
    if (rc == STORE_ENOENT) return refuse(f, STORE_ENOENT, "no such user");
    if (rc) return -1;
    rc = mbox_load(f, fu.u.id, x->mailbox, &mb);
    if (rc == STORE_ENOENT) {
        rc = refuse(f, STORE_ENOENT, "no such mailbox");
        goto done;
    }
    if (rc) goto done;
    if (mb.m.uidvalidity != x->uidvalidity) {
        rc = refuse(f, STORE_EUIDVALIDITY, "mailbox was recreated");
        goto done;
    }
    if ((rc = collect_uids(f, mb.m.id, x->uids, x->n_uids, &uids, &n))) goto done;
    if (require_deleted) {
        size_t w = 0;
        for (size_t i = 0; i < n; i++) {
            struct fmsg fm;
            if ((rc = msg_load(f, mb.m.id, uids[i], &fm))) goto done;
            if (fm.m.flags & STORE_F_DELETED) uids[w++] = uids[i];
            free(fm.kw);
        }
        n = w;
    }
    if (n == 0) goto done;
    rc = expunge_uids(f, &mb, &fu, uids, n);
    if (rc == 0) rc = mbox_save(f, &mb);
    if (rc == 0) rc = user_save(f, &fu);
done:
    free(uids);
    mbox_free(&mb);
    user_free(&fu);
    return rc ? -1 : 0;
}

static int op_copy(struct fsm *f, const Coffer__CopyMessages *c)
{
    struct fuser su = {0}, du = {0}, *dup = &du;
    struct fmbox sm = {0}, dm = {0}, *dmp = &dm;
    uint32_t *uids = NULL;
    size_t n = 0;
    int move = c->has_move && c->move;
    int rc = user_load(f, c->username, &su);
    if (rc == STORE_ENOENT) return refuse(f, STORE_ENOENT, "no such user");
    if (rc) return -1;
    rc = mbox_load(f, su.u.id, c->src_mailbox, &sm);
    if (rc == STORE_ENOENT) {
        rc = refuse(f, STORE_ENOENT, "no such mailbox");
        goto done;
    }
    if (rc) goto done;
    if (sm.m.uidvalidity != c->src_uidvalidity) {
        rc = refuse(f, STORE_EUIDVALIDITY, "mailbox was recreated");
        goto done;
    }
    const char *dst_user = c->dst_username && c->dst_username[0] ? c->dst_username : c->username;
    char lc1[STORE_MAX_USERNAME + 1], lc2[STORE_MAX_USERNAME + 1];
    if (user_key(dst_user, lc2) >= 0 && user_key(c->username, lc1) >= 0 && strcmp(lc1, lc2) == 0) {
        dup = &su;
    } else {
        rc = user_load(f, dst_user, &du);
        if (rc == STORE_ENOENT) {
            rc = refuse(f, STORE_ENOENT, "[TRYCREATE] no such mailbox");
            goto done;
        }
        if (rc) goto done;
    }
    uint64_t dst_id;
    rc = mbox_lookup(f, dup->u.id, c->dst_mailbox, &dst_id);
    if (rc == STORE_ENOENT) {
        rc = refuse(f, STORE_ENOENT, "[TRYCREATE] no such mailbox");
        goto done;
    }
    if (rc) goto done;
    if (dst_id == sm.m.id)
        dmp = &sm;
    else if ((rc = mbox_load_id(f, dst_id, &dm)))
        goto done;
    if ((rc = collect_uids(f, sm.m.id, c->uids, c->n_uids, &uids, &n))) goto done;
    if (n == 0) {
        f->res->uidvalidity = dmp->m.uidvalidity;
        goto done;
    }
    /* quota: a move within one account does not change usage */
    if (!(move && dup == &su)) {
        uint64_t bytes = 0;
        for (size_t i = 0; i < n; i++) {
            struct fmsg fm;
            if ((rc = msg_load(f, sm.m.id, uids[i], &fm))) goto done;
            bytes += fm.m.size;
            free(fm.kw);
        }
        if (!quota_ok(dup, bytes, n)) {
            rc = refuse(f, STORE_EQUOTA, "[OVERQUOTA] quota exceeded");
            goto done;
        }
    }
    if ((uint64_t)dmp->m.uidnext + n > UINT32_MAX) {
        rc = refuse(f, STORE_EINVAL, "mailbox uid space exhausted");
        goto done;
    }
    f->res->src_uids = malloc(n * sizeof(uint32_t));
    f->res->dst_uids = malloc(n * sizeof(uint32_t));
    if (!f->res->src_uids || !f->res->dst_uids) {
        rc = oom();
        goto done;
    }
    for (size_t i = 0; i < n; i++) {
        struct fmsg fm;
        uint32_t nu;
        if ((rc = msg_load(f, sm.m.id, uids[i], &fm))) goto done;
        rc = blob_ref(f, fm.m.blob_id, +1);
        if (rc == 0)
            rc = msg_add(f, dmp, dup, fm.m.blob_id, fm.m.size, fm.m.flags, fm.kw, fm.m.keywords_len,
                         fm.m.internal_date, fm.m.internal_tz_min, &nu);
        free(fm.kw);
        if (rc) goto done;
        f->res->src_uids[i] = uids[i];
        f->res->dst_uids[i] = nu;
        f->res->n_uids = i + 1;
    }
    if (move && (rc = expunge_uids(f, &sm, &su, uids, n))) goto done;
    if ((rc = change_add(f, STORE_CH_APPEND, dmp->m.id, f->res->dst_uids, n))) goto done;
    f->res->uidvalidity = dmp->m.uidvalidity;
    if (dmp != &sm && (rc = mbox_save(f, dmp))) goto done;
    if ((rc = mbox_save(f, &sm))) goto done;
    if (dup != &su && (rc = user_save(f, dup))) goto done;
    rc = user_save(f, &su);
done:
    free(uids);
    mbox_free(&sm);
    mbox_free(&dm);
    user_free(&su);
    user_free(&du);
    return rc ? -1 : 0;
}

static int apply_op(struct fsm *f, const Coffer__Entry *e)
{
    switch (e->op_case) {
    case COFFER__ENTRY__OP_GROUP_INIT:
        return op_group_init(f, e->group_init);
    case COFFER__ENTRY__OP_USER_CREATE:
        return op_user_create(f, e->user_create);
    case COFFER__ENTRY__OP_USER_SET_PASSWORD:
        return op_user_set_password(f, e->user_set_password);
    case COFFER__ENTRY__OP_USER_SET_DISABLED:
        return op_user_set_disabled(f, e->user_set_disabled);
    case COFFER__ENTRY__OP_USER_DELETE:
        return op_user_delete(f, e->user_delete);
    case COFFER__ENTRY__OP_QUOTA_SET:
        return op_quota_set(f, e->quota_set);
    case COFFER__ENTRY__OP_MAILBOX_CREATE:
        return op_mailbox_create(f, e->mailbox_create);
    case COFFER__ENTRY__OP_MAILBOX_DELETE:
        return op_mailbox_delete(f, e->mailbox_delete);
    case COFFER__ENTRY__OP_MAILBOX_RENAME:
        return op_mailbox_rename(f, e->mailbox_rename);
    case COFFER__ENTRY__OP_SUBSCRIBE:
        return op_subscribe(f, e->subscribe);
    case COFFER__ENTRY__OP_ACL_SET:
        return op_acl_set(f, e->acl_set);
    case COFFER__ENTRY__OP_APPEND:
        return op_append(f, e->append);
    case COFFER__ENTRY__OP_STORE_FLAGS:
        return op_store_flags(f, e->store_flags);
    case COFFER__ENTRY__OP_EXPUNGE:
        return op_expunge(f, e->expunge);
    case COFFER__ENTRY__OP_COPY:
        return op_copy(f, e->copy);
    case COFFER__ENTRY__OP_DELIVER:
        return op_deliver(f, e->deliver);
    case COFFER__ENTRY__OP_NODE_INFO:
        return op_node_info(f, e->node_info);
    case COFFER__ENTRY__OP_CHECKPOINT:
    case COFFER__ENTRY__OP_NOOP:
        return 0;
    default:
        break;
    }
    cf_crit("fsm: entry %llu: unknown op %d", (unsigned long long)f->index, (int)e->op_case);
    return -1;
}

/* ------------------------------------------------------------- requests */

/* Request record: u16 version (1, or 2 with the leader time appended),
 * u64 index, u32 result, u32 uidvalidity, u32 uid[, u64 leader_time_ms]. */
static void outcome_from_request(struct store_outcome *o, const MDB_val *v)
{
    if (v->mv_size >= 22 && (get_le(v->mv_data, 2) == 1 || get_le(v->mv_data, 2) == 2)) {
        const uint8_t *p = v->mv_data;
        o->index = get_le(p + 2, 8);
        o->result = (int)get_le(p + 10, 4);
        o->uidvalidity = (uint32_t)get_le(p + 14, 4);
        o->uid = (uint32_t)get_le(p + 18, 4);
        if (o->result != STORE_OK)
            snprintf(o->text, sizeof(o->text), "request already applied (result %d)", o->result);
    }
}

/* Forget requests older than the window (deterministic: depends on index). */
static int requests_expire(struct fsm *f)
{
    if (f->index <= STORE_REQUEST_WINDOW) return 0;
    uint64_t cutoff = f->index - STORE_REQUEST_WINDOW;
    MDB_cursor *c;
    int rc = mdb_cursor_open(f->txn, f->st->reqlog, &c);
    if (rc) return lmdb_fail("cursor", rc);
    for (;;) {
        MDB_val k, v;
        rc = mdb_cursor_get(c, &k, &v, MDB_FIRST);
        if (rc == MDB_NOTFOUND) {
            rc = 0;
            break;
        }
        if (rc) break;
        if (k.mv_size != 8 || store__get_be64(k.mv_data) >= cutoff) break;
        uint64_t idx = store__get_be64(k.mv_data);
        uint8_t rid[16];
        int have = v.mv_size == 16;
        if (have) memcpy(rid, v.mv_data, 16);
        if ((rc = mdb_cursor_del(c, 0))) break;
        if (have) {
            MDB_val rk = {16, rid}, rv;
            if (mdb_get(f->txn, f->st->requests, &rk, &rv) == 0 && rv.mv_size >= 10 &&
                get_le((const uint8_t *)rv.mv_data + 2, 8) == idx) {
                if ((rc = mdb_del(f->txn, f->st->requests, &rk, NULL))) break;
            }
        }
    }
    mdb_cursor_close(c);
    return rc ? lmdb_fail("requests expiry", rc) : 0;
}

static int requests_record(struct fsm *f, const uint8_t rid[16])
{
    uint8_t rec[30], kb[8];
    put_le(rec, 2, 2);
    put_le(rec + 2, f->index, 8);
    put_le(rec + 10, (uint32_t)f->res->result, 4);
    put_le(rec + 14, f->res->uidvalidity, 4);
    put_le(rec + 18, f->res->uid, 4);
    put_le(rec + 22, f->time_ms, 8);
    MDB_val k = {16, (void *)rid}, v = {sizeof(rec), rec};
    int rc = mdb_put(f->txn, f->st->requests, &k, &v, 0);
    if (rc) return lmdb_fail("requests put", rc);
    store__be64(kb, f->index);
    MDB_val k2 = {8, kb}, v2 = {16, (void *)rid};
    if ((rc = mdb_put(f->txn, f->st->reqlog, &k2, &v2, 0))) return lmdb_fail("reqlog put", rc);
    return 0;
}

/* An APPEND whose request_id the leader derived from its content
 * (Append.dedup_window_s set) repeats an earlier one only while that one is
 * recent and its message still exists: a retry after an unknown outcome
 * gets the first APPENDUID, but a message appended again after it was
 * expunged, or much later, is stored again. Returns 1 (honour the record),
 * 0 (apply afresh, the record is replaced) or -1. */
static int append_record_live(struct fsm *f, const Coffer__Append *a, const MDB_val *rec)
{
    const uint8_t *p = rec->mv_data;
    if (rec->mv_size < 30 || get_le(p, 2) != 2) return 0;
    if ((int)get_le(p + 10, 4) != STORE_OK) return 0;
    uint64_t then = get_le(p + 22, 8);
    if (f->time_ms < then || f->time_ms - then > (uint64_t)a->dedup_window_s * 1000u) return 0;
    struct fuser fu;
    struct fmbox mb = {0};
    struct fmsg fm;
    int live = 0;
    int rc = user_load(f, a->username, &fu);
    if (rc < 0) return -1;
    if (rc != 0) return 0;
    rc = mbox_load(f, fu.u.id, a->mailbox, &mb);
    if (rc == 0 && mb.m.uidvalidity == (uint32_t)get_le(p + 14, 4)) {
        rc = msg_load(f, mb.m.id, (uint32_t)get_le(p + 18, 4), &fm);
        if (rc == 0) {
            live = 1;
            free(fm.kw);
        }
    }
    mbox_free(&mb);
    user_free(&fu);
    return rc < 0 ? -1 : live;
}

/* ---------------------------------------------------------------- apply */

static int frame_ok(const void *buf, size_t len)
{
    const uint8_t *p = buf;
    return buf && len >= 8 && get_le(p, 4) == COFFER_ENTRY_MAGIC &&
           get_le(p + 4, 2) == COFFER_ENTRY_VERSION;
}

static void deliver_outcome(struct store *st, const uint8_t *rid, struct store_outcome *res,
                            struct store_outcome *out)
{
    for (struct store_outcome *w = rid ? store__waiter_next(st, rid, NULL) : NULL; w;
         w = store__waiter_next(st, rid, w))
        if (w != out && store__outcome_copy(w, res))
            cf_error("fsm: out of memory filling an outcome");
    if (out) {
        uint8_t keep[16];
        memcpy(keep, out->request_id, 16);
        *out = *res;
        memcpy(out->request_id, keep, 16);
    } else {
        store_outcome_clear(res);
    }
}

int store_apply(struct store *st, uint64_t index, const void *buf, size_t len,
                struct store_outcome *out)
{
    struct store_outcome res;
    struct fsm f;
    Coffer__Entry *e = NULL;
    MDB_txn *txn = NULL, *child = NULL;
    const uint8_t *rid = NULL;
    int rc;

    memset(&res, 0, sizeof(res));
    memset(&f, 0, sizeof(f));
    res.index = index;
    if (out) {
        uint8_t keep[16];
        memcpy(keep, out->request_id, 16);
        memset(out, 0, sizeof(*out));
        memcpy(out->request_id, keep, 16);
    }

    if (index <= st->applied) {
        /* replay: no changes; report the remembered outcome if any */
        if (frame_ok(buf, len) &&
            (e = coffer__entry__unpack(NULL, len - 8, (const uint8_t *)buf + 8)) &&
            e->has_request_id && e->request_id.len == 16) {
            rid = e->request_id.data;
            MDB_txn *r = store_rtxn_begin(st);
            MDB_val k = {16, (void *)rid}, v;
            if (r && mdb_get(r, st->requests, &k, &v) == 0) outcome_from_request(&res, &v);
            store_rtxn_end(r);
        }
        deliver_outcome(st, rid, &res, out);
        if (e) coffer__entry__free_unpacked(e, NULL);
        return 0;
    }

    if (!frame_ok(buf, len)) {
        cf_crit("fsm: entry %llu: unknown frame (len %zu, magic/version not understood); "
                "refusing to apply",
                (unsigned long long)index, len);
        return -1;
    }
    e = coffer__entry__unpack(NULL, len - 8, (const uint8_t *)buf + 8);
    if (!e) {
        cf_crit("fsm: entry %llu: cannot decode coffer.Entry (%zu bytes)",
                (unsigned long long)index, len - 8);
        return -1;
    }
    if (e->op_case == COFFER__ENTRY__OP__NOT_SET) {
        cf_crit("fsm: entry %llu: op not set (written by a newer version?)",
                (unsigned long long)index);
        coffer__entry__free_unpacked(e, NULL);
        return -1;
    }
    if (e->has_request_id && e->request_id.len == 16) rid = e->request_id.data;

    f.st = st;
    f.index = index;
    f.time_ms = e->leader_time_ms;
    f.res = &res;
    if ((rc = mdb_txn_begin(st->env, NULL, 0, &txn))) {
        lmdb_fail("txn begin", rc);
        goto fatal;
    }
    f.txn = txn;
    if (requests_expire(&f)) goto fatal;

    int dup = 0;
    if (rid) {
        MDB_val k = {16, (void *)rid}, v;
        rc = mdb_get(txn, st->requests, &k, &v);
        if (rc == 0) {
            dup = 1;
            if (e->op_case == COFFER__ENTRY__OP_APPEND && e->append->has_dedup_window_s) {
                int live = append_record_live(&f, e->append, &v);
                if (live < 0) goto fatal;
                dup = live;
            }
            if (dup) outcome_from_request(&res, &v);
            if (dup && e->op_case == COFFER__ENTRY__OP_APPEND)
                cf_info("fsm: APPEND by %s to %s repeats the one applied at index %" PRIu64
                        " (same message within the dedup window): uid %u, nothing stored",
                        e->append->username, e->append->mailbox, res.index, res.uid);
        } else if (rc != MDB_NOTFOUND) {
            lmdb_fail("requests get", rc);
            goto fatal;
        }
    }
    if (!dup) {
        if ((rc = mdb_txn_begin(st->env, txn, 0, &child))) {
            lmdb_fail("nested txn begin", rc);
            goto fatal;
        }
        f.txn = child;
        if (apply_op(&f, e)) goto fatal;
        f.txn = txn;
        int keep = res.result == STORE_OK || res.result == STORE_EMODIFIED ||
                   e->op_case == COFFER__ENTRY__OP_DELIVER;
        if (keep) {
            rc = mdb_txn_commit(child);
            child = NULL;
            if (rc) {
                lmdb_fail("nested txn commit", rc);
                goto fatal;
            }
        } else {
            mdb_txn_abort(child);
            child = NULL;
            changes_truncate(&f.ch, 0);
            f.group_set = 0;
            /* a refused op leaves nothing behind (partial arrays too) */
            store_outcome_clear(&res);
            res.uid = 0;
        }
        if (rid && requests_record(&f, rid)) goto fatal;
    }
    uint8_t ib[8];
    put_le(ib, index, 8);
    MDB_val ak = {7, "applied"}, av = {8, ib};
    if ((rc = mdb_put(txn, st->meta, &ak, &av, 0))) {
        lmdb_fail("applied put", rc);
        goto fatal;
    }
    rc = mdb_txn_commit(txn);
    txn = NULL;
    if (rc) {
        lmdb_fail("txn commit", rc);
        goto fatal;
    }
    st->applied = index;
    if (f.group_set) memcpy(st->group_id, f.group_id, 16);
    if (f.nodes_changed) st->nodes_version++;

    deliver_outcome(st, rid, &res, out);
    for (size_t i = 0; i < f.ch.n; i++)
        store__notify(st, &f.ch.v[i]);
    changes_truncate(&f.ch, 0);
    free(f.ch.v);
    coffer__entry__free_unpacked(e, NULL);
    return 0;

fatal:
    cf_crit("fsm: entry %llu not applied; the node must stop applying", (unsigned long long)index);
    if (child) mdb_txn_abort(child);
    if (txn) mdb_txn_abort(txn);
    changes_truncate(&f.ch, 0);
    free(f.ch.v);
    store_outcome_clear(&res);
    coffer__entry__free_unpacked(e, NULL);
    return -1;
}
