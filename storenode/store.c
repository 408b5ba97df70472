/* store: LMDB environment, schema, record codecs, reads, digest, watchers
 * and waiters. The state machine (store_apply) is in fsm.c.
 *
 * Record layouts (values little-endian, every record starts with a u16
 * record version = 1; "str16" = u16 length + bytes + NUL; keys big-endian):
 *   meta      "schema" u32 | "applied" u64 | "group_id" 16 bytes |
 *             "next_user_id"/"next_mailbox_id"/"next_blob_id" u64 (next to
 *             assign, starts at 1) | "last_uidvalidity" u32  (no version)
 *   users     lc-username -> ver u16, id u64, flags u8 (1 disabled,
 *             2 refuse_delivery), quota_bytes u64, quota_messages u64,
 *             used_bytes u64, used_messages u64, name str16, hash str16,
 *             reason str16
 *   userids   id(8) -> username bytes (no NUL)
 *   mbnames   owner(8)+name -> mailbox_id u64 (LE)
 *   mailboxes id(8) -> ver u16, owner u64, uidvalidity u32, uidnext u32,
 *             highestmodseq u64, messages u64, unseen u64, deleted u64,
 *             size u64, special_use u32, name str16, kw_len u32 + keywords
 *             (each NUL-terminated)
 *   msgs      mailbox(8)+uid(4) -> ver u16, blob_id u64, modseq u64,
 *             internal_date i64, tz_min i32, size u64, flags u32, kw_len u32
 *             + keywords (each NUL-terminated)
 *   blobs     blob(8) -> message bytes
 *   blobmeta  blob(8) -> ver u16, refcount u64, size u64, sent_date i64,
 *             then envelope, bodystructure, body, parts each as u32 length
 *             + bytes + NUL
 *   subs      owner(8)+name -> empty
 *   acl       mailbox(8)+identifier -> rights string (no NUL)
 *   requests  request_id(16) -> ver u16, index u64, result u32,
 *             uidvalidity u32, uid u32
 *   reqlog    index(8) -> request_id(16)
 *   modseq    mailbox(8)+modseq(8)+uid(4) -> empty
 */
#define STORE_INTERNAL
#include "store.h"

#include <ctype.h>
#include <errno.h>
#include <openssl/evp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include "cf_log.h"
#include "coffer_raft.pb-c.h"

/* ---------------------------------------------------------------- codecs */

void store__be64(uint8_t *p, uint64_t v)
{
    for (int i = 7; i >= 0; i--) {
        p[i] = (uint8_t)v;
        v >>= 8;
    }
}

void store__be32(uint8_t *p, uint32_t v)
{
    for (int i = 3; i >= 0; i--) {
        p[i] = (uint8_t)v;
        v >>= 8;
    }
}

uint64_t store__get_be64(const uint8_t *p)
{
    uint64_t v = 0;
    for (int i = 0; i < 8; i++)
        v = (v << 8) | p[i];
    return v;
}

uint32_t store__get_be32(const uint8_t *p)
{
    uint32_t v = 0;
    for (int i = 0; i < 4; i++)
        v = (v << 8) | p[i];
    return v;
}

void store__buf_free(struct store_buf *b)
{
    free(b->p);
    b->p = NULL;
    b->len = b->cap = 0;
}

static void buf_put(struct store_buf *b, const void *p, size_t n)
{
    if (b->oom) return;
    if (b->len + n > b->cap) {
        size_t cap = b->cap ? b->cap : 64;
        while (cap < b->len + n)
            cap *= 2;
        uint8_t *np = realloc(b->p, cap);
        if (!np) {
            b->oom = 1;
            return;
        }
        b->p = np;
        b->cap = cap;
    }
    if (n) memcpy(b->p + b->len, p, n);
    b->len += n;
}

static void buf_le(struct store_buf *b, uint64_t v, int bytes)
{
    uint8_t t[8];
    for (int i = 0; i < bytes; i++) {
        t[i] = (uint8_t)v;
        v >>= 8;
    }
    buf_put(b, t, (size_t)bytes);
}

static void buf_str16(struct store_buf *b, const char *s)
{
    size_t n = s ? strlen(s) : 0;
    if (n > 0xffff) n = 0xffff;
    buf_le(b, n, 2);
    buf_put(b, s ? s : "", n);
    buf_put(b, "", 1);
}

static void buf_blob32(struct store_buf *b, const char *p, size_t n)
{
    buf_le(b, n, 4);
    buf_put(b, p ? p : "", n);
    buf_put(b, "", 1);
}

struct rd {
    const uint8_t *p;
    size_t left;
    int err;
};

static uint64_t rd_le(struct rd *r, int bytes)
{
    if (r->err || r->left < (size_t)bytes) {
        r->err = 1;
        return 0;
    }
    uint64_t v = 0;
    for (int i = bytes - 1; i >= 0; i--)
        v = (v << 8) | r->p[i];
    r->p += bytes;
    r->left -= (size_t)bytes;
    return v;
}

/* n bytes followed by a NUL; returns pointer to the bytes. */
static const char *rd_strn(struct rd *r, size_t n)
{
    if (r->err || r->left < n + 1 || r->p[n] != 0) {
        r->err = 1;
        return "";
    }
    const char *s = (const char *)r->p;
    r->p += n + 1;
    r->left -= n + 1;
    return s;
}

static const char *rd_str16(struct rd *r)
{
    size_t n = (size_t)rd_le(r, 2);
    return rd_strn(r, n);
}

static const char *rd_bytes(struct rd *r, size_t n)
{
    if (r->err || r->left < n) {
        r->err = 1;
        return "";
    }
    const char *s = (const char *)r->p;
    r->p += n;
    r->left -= n;
    return s;
}

int store__user_decode(const MDB_val *v, struct store_user *u)
{
    struct rd r = {v->mv_data, v->mv_size, 0};
    memset(u, 0, sizeof(*u));
    if (rd_le(&r, 2) != 1) return -1;
    u->id = rd_le(&r, 8);
    unsigned fl = (unsigned)rd_le(&r, 1);
    u->disabled = (fl & 1) != 0;
    u->refuse_delivery = (fl & 2) != 0;
    u->quota_bytes = rd_le(&r, 8);
    u->quota_messages = rd_le(&r, 8);
    u->used_bytes = rd_le(&r, 8);
    u->used_messages = rd_le(&r, 8);
    u->name = rd_str16(&r);
    u->password_hash = rd_str16(&r);
    u->disabled_reason = rd_str16(&r);
    return r.err ? -1 : 0;
}

void store__user_encode(const struct store_user *u, struct store_buf *b)
{
    buf_le(b, 1, 2);
    buf_le(b, u->id, 8);
    buf_le(b, (u->disabled ? 1u : 0u) | (u->refuse_delivery ? 2u : 0u), 1);
    buf_le(b, u->quota_bytes, 8);
    buf_le(b, u->quota_messages, 8);
    buf_le(b, u->used_bytes, 8);
    buf_le(b, u->used_messages, 8);
    buf_str16(b, u->name);
    buf_str16(b, u->password_hash);
    buf_str16(b, u->disabled_reason);
}

int store__mailbox_decode(uint64_t id, const MDB_val *v, struct store_mailbox *mb)
{
    struct rd r = {v->mv_data, v->mv_size, 0};
    memset(mb, 0, sizeof(*mb));
    if (rd_le(&r, 2) != 1) return -1;
    mb->id = id;
    mb->owner_id = rd_le(&r, 8);
    mb->uidvalidity = (uint32_t)rd_le(&r, 4);
    mb->uidnext = (uint32_t)rd_le(&r, 4);
    mb->highestmodseq = rd_le(&r, 8);
    mb->messages = rd_le(&r, 8);
    mb->unseen = rd_le(&r, 8);
    mb->deleted = rd_le(&r, 8);
    mb->size = rd_le(&r, 8);
    mb->special_use = (uint32_t)rd_le(&r, 4);
    mb->name = rd_str16(&r);
    mb->keywords_len = (size_t)rd_le(&r, 4);
    mb->keywords = rd_bytes(&r, mb->keywords_len);
    return r.err ? -1 : 0;
}

void store__mailbox_encode(const struct store_mailbox *mb, struct store_buf *b)
{
    buf_le(b, 1, 2);
    buf_le(b, mb->owner_id, 8);
    buf_le(b, mb->uidvalidity, 4);
    buf_le(b, mb->uidnext, 4);
    buf_le(b, mb->highestmodseq, 8);
    buf_le(b, mb->messages, 8);
    buf_le(b, mb->unseen, 8);
    buf_le(b, mb->deleted, 8);
    buf_le(b, mb->size, 8);
    buf_le(b, mb->special_use, 4);
    buf_str16(b, mb->name);
    buf_le(b, mb->keywords_len, 4);
    buf_put(b, mb->keywords, mb->keywords_len);
}

int store__msg_decode(uint32_t uid, const MDB_val *v, struct store_msg *m)
{
    struct rd r = {v->mv_data, v->mv_size, 0};
    memset(m, 0, sizeof(*m));
    if (rd_le(&r, 2) != 1) return -1;
    m->uid = uid;
    m->blob_id = rd_le(&r, 8);
    m->modseq = rd_le(&r, 8);
    m->internal_date = (int64_t)rd_le(&r, 8);
    m->internal_tz_min = (int32_t)(uint32_t)rd_le(&r, 4);
    m->size = rd_le(&r, 8);
    m->flags = (uint32_t)rd_le(&r, 4);
    m->keywords_len = (size_t)rd_le(&r, 4);
    m->keywords = rd_bytes(&r, m->keywords_len);
    return r.err ? -1 : 0;
}

void store__msg_encode(const struct store_msg *m, struct store_buf *b)
{
    buf_le(b, 1, 2);
    buf_le(b, m->blob_id, 8);
    buf_le(b, m->modseq, 8);
    buf_le(b, (uint64_t)m->internal_date, 8);
    buf_le(b, (uint32_t)m->internal_tz_min, 4);
    buf_le(b, m->size, 8);
    buf_le(b, m->flags, 4);
    buf_le(b, m->keywords_len, 4);
    buf_put(b, m->keywords, m->keywords_len);
}

int store__blobmeta_decode(const MDB_val *v, uint64_t *refcount_r, uint64_t *size_r,
                           struct store_cache *c)
{
    struct rd r = {v->mv_data, v->mv_size, 0};
    memset(c, 0, sizeof(*c));
    if (rd_le(&r, 2) != 1) return -1;
    uint64_t rc = rd_le(&r, 8), sz = rd_le(&r, 8);
    if (refcount_r) *refcount_r = rc;
    if (size_r) *size_r = sz;
    c->sent_date = (int64_t)rd_le(&r, 8);
    c->envelope_len = (size_t)rd_le(&r, 4);
    c->envelope = rd_strn(&r, c->envelope_len);
    c->bodystructure_len = (size_t)rd_le(&r, 4);
    c->bodystructure = rd_strn(&r, c->bodystructure_len);
    c->body_len = (size_t)rd_le(&r, 4);
    c->body = rd_strn(&r, c->body_len);
    c->parts_len = (size_t)rd_le(&r, 4);
    c->parts = rd_strn(&r, c->parts_len);
    return r.err ? -1 : 0;
}

void store__blobmeta_encode(uint64_t refcount, uint64_t size, const struct store_cache *c,
                            struct store_buf *b)
{
    buf_le(b, 1, 2);
    buf_le(b, refcount, 8);
    buf_le(b, size, 8);
    buf_le(b, (uint64_t)c->sent_date, 8);
    buf_blob32(b, c->envelope, c->envelope_len);
    buf_blob32(b, c->bodystructure, c->bodystructure_len);
    buf_blob32(b, c->body, c->body_len);
    buf_blob32(b, c->parts, c->parts_len);
}

/* --------------------------------------------------------------- outcome */

void store_outcome_clear(struct store_outcome *o)
{
    if (!o) return;
    free(o->src_uids);
    free(o->dst_uids);
    free(o->modified_uids);
    free(o->rcpt_results);
    o->src_uids = o->dst_uids = o->modified_uids = NULL;
    o->rcpt_results = NULL;
    o->n_uids = o->n_modified = o->n_rcpt = 0;
}

static void *memdup_n(const void *p, size_t n)
{
    if (!p || !n) return NULL;
    void *d = malloc(n);
    if (d) memcpy(d, p, n);
    return d;
}

int store__outcome_copy(struct store_outcome *dst, const struct store_outcome *src)
{
    uint8_t rid[16];
    memcpy(rid, dst->request_id, 16);
    store_outcome_clear(dst); /* filled before (a shared request_id applied twice) */
    *dst = *src;
    memcpy(dst->request_id, rid, 16);
    dst->src_uids = memdup_n(src->src_uids, src->n_uids * sizeof(uint32_t));
    dst->dst_uids = memdup_n(src->dst_uids, src->n_uids * sizeof(uint32_t));
    dst->modified_uids = memdup_n(src->modified_uids, src->n_modified * sizeof(uint32_t));
    dst->rcpt_results = memdup_n(src->rcpt_results, src->n_rcpt * sizeof(int));
    if ((src->n_uids && (!dst->src_uids || !dst->dst_uids)) ||
        (src->n_modified && !dst->modified_uids) || (src->n_rcpt && !dst->rcpt_results)) {
        store_outcome_clear(dst);
        return -1;
    }
    return 0;
}

/* ------------------------------------------------------------- lifecycle */

static int meta_get_u64(MDB_txn *txn, MDB_dbi dbi, const char *key, uint64_t *v_r)
{
    MDB_val k = {strlen(key), (void *)key}, v;
    int rc = mdb_get(txn, dbi, &k, &v);
    if (rc) return rc;
    struct rd r = {v.mv_data, v.mv_size, 0};
    *v_r = rd_le(&r, (int)(v.mv_size == 4 ? 4 : 8));
    return r.err ? MDB_CORRUPTED : 0;
}

/* Open st->env on st->dir and load the cached meta values. On failure
 * st->env is NULL and err says why. */
static int store_env_open(struct store *st, char *err, size_t errlen)
{
    MDB_txn *txn = NULL;
    int rc;
    const char *what = "";
    const char *dir = st->dir;

    st->applied = 0;
    memset(st->group_id, 0, sizeof st->group_id);
    what = "mdb_env_create";
    if ((rc = mdb_env_create(&st->env))) goto fail;
    mdb_env_set_userctx(st->env, st);
    what = "mdb_env_set_maxdbs";
    if ((rc = mdb_env_set_maxdbs(st->env, 16))) goto fail;
    what = "mdb_env_set_mapsize";
    if ((rc = mdb_env_set_mapsize(st->env, (size_t)st->map_size))) goto fail;
    what = "mdb_env_set_maxreaders";
    if ((rc = mdb_env_set_maxreaders(st->env, 512))) goto fail;
    what = "mdb_env_open";
    if ((rc = mdb_env_open(st->env, dir, MDB_NOTLS | MDB_NOSYNC, 0600))) goto fail;
    int dead = 0;
    mdb_reader_check(st->env, &dead);
    if (dead) cf_warn("store: cleared %d stale LMDB reader slots", dead);

    what = "mdb_txn_begin";
    if ((rc = mdb_txn_begin(st->env, NULL, 0, &txn))) goto fail;
    struct {
        const char *name;
        MDB_dbi *dbi;
    } dbs[] = {
        {"meta", &st->meta},       {"users", &st->users},         {"userids", &st->userids},
        {"mbnames", &st->mbnames}, {"mailboxes", &st->mailboxes}, {"msgs", &st->msgs},
        {"blobs", &st->blobs},     {"blobmeta", &st->blobmeta},   {"subs", &st->subs},
        {"acl", &st->acl},         {"requests", &st->requests},   {"reqlog", &st->reqlog},
        {"modseq", &st->modseq},   {"nodes", &st->nodes},
    };
    for (size_t i = 0; i < sizeof(dbs) / sizeof(dbs[0]); i++) {
        what = dbs[i].name;
        if ((rc = mdb_dbi_open(txn, dbs[i].name, MDB_CREATE, dbs[i].dbi))) goto fail;
    }
    uint64_t schema = 0;
    what = "schema";
    rc = meta_get_u64(txn, st->meta, "schema", &schema);
    if (rc == MDB_NOTFOUND) {
        uint8_t v[4] = {STORE_SCHEMA_VERSION, 0, 0, 0};
        MDB_val k = {6, "schema"}, val = {4, v};
        if ((rc = mdb_put(txn, st->meta, &k, &val, 0))) goto fail;
        schema = STORE_SCHEMA_VERSION;
    } else if (rc) {
        goto fail;
    }
    if (schema != STORE_SCHEMA_VERSION) {
        snprintf(err, errlen, "%s: store schema version %llu, this build knows %d", dir,
                 (unsigned long long)schema, STORE_SCHEMA_VERSION);
        goto fail_noerr;
    }
    what = "applied";
    rc = meta_get_u64(txn, st->meta, "applied", &st->applied);
    if (rc && rc != MDB_NOTFOUND) goto fail;
    MDB_val k = {8, "group_id"}, v;
    if (mdb_get(txn, st->meta, &k, &v) == 0 && v.mv_size == 16) memcpy(st->group_id, v.mv_data, 16);
    what = "commit";
    rc = mdb_txn_commit(txn);
    txn = NULL;
    if (rc) goto fail;
    return 0;

fail:
    snprintf(err, errlen, "%s: %s: %s", dir, what, mdb_strerror(rc));
fail_noerr:
    if (txn) mdb_txn_abort(txn);
    if (st->env) mdb_env_close(st->env);
    st->env = NULL;
    return -1;
}

int store_open(const char *dir, uint64_t map_size, struct store **st_r, char *err, size_t errlen)
{
    struct store *st = calloc(1, sizeof(*st));

    *st_r = NULL;
    if (!st) {
        snprintf(err, errlen, "out of memory");
        return -1;
    }
    if (mkdir(dir, 0700) != 0 && errno != EEXIST) {
        snprintf(err, errlen, "mkdir %s: %s", dir, strerror(errno));
        free(st);
        return -1;
    }
    st->dir = strdup(dir);
    st->map_size = map_size;
    if (st->dir == NULL) {
        snprintf(err, errlen, "out of memory");
        free(st);
        return -1;
    }
    pthread_mutex_init(&st->rlock, NULL);
    pthread_cond_init(&st->rcond, NULL);
    if (store_env_open(st, err, errlen) != 0) {
        pthread_mutex_destroy(&st->rlock);
        pthread_cond_destroy(&st->rcond);
        free(st->dir);
        free(st);
        return -1;
    }
    *st_r = st;
    return 0;
}

const char *store_dir(const struct store *st)
{
    return st->dir;
}

uint64_t store_map_size(const struct store *st)
{
    return st->map_size;
}

unsigned store_readers(struct store *st)
{
    unsigned n;
    pthread_mutex_lock(&st->rlock);
    n = st->readers;
    pthread_mutex_unlock(&st->rlock);
    return n;
}

static void fsync_dir(const char *dir)
{
    int fd = open(dir, O_RDONLY | O_DIRECTORY);
    if (fd >= 0) {
        fsync(fd);
        close(fd);
    }
}

int store_replace(struct store *st, const char *path, char *err, size_t errlen)
{
    char data[4200], lock[4200], old[4200];
    int rc = 0;

    pthread_mutex_lock(&st->rlock);
    if (st->readers > 0) {
        pthread_mutex_unlock(&st->rlock);
        return 1;
    }
    st->swapping = 1;
    pthread_mutex_unlock(&st->rlock);

    snprintf(data, sizeof data, "%s/data.mdb", st->dir);
    snprintf(lock, sizeof lock, "%s/lock.mdb", st->dir);
    snprintf(old, sizeof old, "%s/data.mdb.replaced", st->dir);
    mdb_env_sync(st->env, 1);
    mdb_env_close(st->env);
    st->env = NULL;
    /* Keep the old file until the new one opened, so a failure can go
     * back to it. */
    if (rename(data, old) != 0 && errno != ENOENT) {
        snprintf(err, errlen, "rename %s: %s", data, strerror(errno));
        rc = -1;
    } else if (rename(path, data) != 0) {
        snprintf(err, errlen, "rename %s to %s: %s", path, data, strerror(errno));
        if (rename(old, data) != 0) cf_crit("store: cannot restore %s: %s", data, strerror(errno));
        rc = -1;
    }
    unlink(lock);
    fsync_dir(st->dir);
    if (store_env_open(st, err, errlen) != 0) {
        cf_crit("store: cannot open the replaced store: %s", err);
        rc = -1;
        if (rename(old, data) == 0) {
            char e2[256];
            if (store_env_open(st, e2, sizeof e2) != 0) cf_crit("store: reopening: %s", e2);
        }
    } else if (rc == 0) {
        unlink(old);
        fsync_dir(st->dir);
    }
    st->nodes_version++;
    pthread_mutex_lock(&st->rlock);
    st->swapping = 0;
    pthread_cond_broadcast(&st->rcond);
    pthread_mutex_unlock(&st->rlock);
    if (st->env == NULL) return -1;
    return rc;
}

static void copy_str(char *dst, size_t cap, const char *s)
{
    snprintf(dst, cap, "%s", s ? s : "");
}

int store_node_get(struct store *st, MDB_txn *txn, uint64_t id, struct store_node *n_r)
{
    MDB_txn *own = NULL;
    uint8_t kb[8];
    MDB_val k = {8, kb}, v;
    Coffer__NodeInfo *ni;
    int rc;

    memset(n_r, 0, sizeof(*n_r));
    if (txn == NULL) {
        own = store_rtxn_begin(st);
        if (own == NULL) return -1;
        txn = own;
    }
    store__be64(kb, id);
    rc = mdb_get(txn, st->nodes, &k, &v);
    if (rc != 0) {
        store_rtxn_end(own);
        return rc == MDB_NOTFOUND ? STORE_ENOENT : -1;
    }
    ni = coffer__node_info__unpack(NULL, v.mv_size, v.mv_data);
    store_rtxn_end(own);
    if (ni == NULL) return -1;
    n_r->id = ni->node_id;
    copy_str(n_r->raft, sizeof n_r->raft, ni->raft_address);
    copy_str(n_r->imap, sizeof n_r->imap, ni->imap_address);
    copy_str(n_r->imaps, sizeof n_r->imaps, ni->imaps_address);
    copy_str(n_r->pop3, sizeof n_r->pop3, ni->pop3_address);
    copy_str(n_r->pop3s, sizeof n_r->pop3s, ni->pop3s_address);
    copy_str(n_r->admin, sizeof n_r->admin, ni->admin_address);
    coffer__node_info__free_unpacked(ni, NULL);
    return 0;
}

uint64_t store_node_find_raft(struct store *st, const char *address, uint64_t self_id)
{
    MDB_txn *txn = store_rtxn_begin(st);
    MDB_cursor *c = NULL;
    MDB_val k, v;
    uint64_t found = 0;
    int op = MDB_FIRST;

    if (txn == NULL) return 0;
    if (mdb_cursor_open(txn, st->nodes, &c) == 0) {
        while (found == 0 && mdb_cursor_get(c, &k, &v, (MDB_cursor_op)op) == 0) {
            Coffer__NodeInfo *ni = coffer__node_info__unpack(NULL, v.mv_size, v.mv_data);
            op = MDB_NEXT;
            if (ni == NULL) continue;
            if (ni->node_id != self_id && ni->raft_address != NULL &&
                strcmp(ni->raft_address, address) == 0)
                found = ni->node_id;
            coffer__node_info__free_unpacked(ni, NULL);
        }
        mdb_cursor_close(c);
    }
    store_rtxn_end(txn);
    return found;
}

uint64_t store_nodes_version(struct store *st)
{
    return st->nodes_version;
}

void store_close(struct store **stp)
{
    struct store *st = *stp;
    if (!st) return;
    for (int i = 0; i < STORE_WAIT_BUCKETS; i++) {
        struct store_waiter *w = st->waiters[i];
        while (w) {
            struct store_waiter *n = w->next;
            free(w);
            w = n;
        }
    }
    if (st->env) {
        mdb_env_sync(st->env, 1);
        mdb_env_close(st->env);
    }
    pthread_mutex_destroy(&st->rlock);
    pthread_cond_destroy(&st->rcond);
    free(st->dir);
    free(st);
    *stp = NULL;
}

MDB_env *store_env(struct store *st)
{
    return st->env;
}

uint64_t store_applied_index(struct store *st)
{
    return st->applied;
}

void store_group_id(struct store *st, uint8_t out[16])
{
    memcpy(out, st->group_id, 16);
}

int store_sync(struct store *st)
{
    int rc = mdb_env_sync(st->env, 1);
    if (rc) {
        cf_error("store: mdb_env_sync: %s", mdb_strerror(rc));
        return -1;
    }
    return 0;
}

/* --------------------------------------------------------------- waiters */

static unsigned wait_bucket(const uint8_t id[16])
{
    return (unsigned)(id[0] ^ id[5] ^ id[11]) % STORE_WAIT_BUCKETS;
}

void store_register_waiter(struct store *st, const uint8_t request_id[16],
                           struct store_outcome *out)
{
    unsigned b = wait_bucket(request_id);
    for (struct store_waiter *w = st->waiters[b]; w; w = w->next) {
        if (w->out == out && memcmp(w->id, request_id, 16) == 0) return;
    }
    struct store_waiter *w = calloc(1, sizeof(*w));
    if (!w) {
        cf_error("store: out of memory registering a waiter");
        return;
    }
    memcpy(w->id, request_id, 16);
    w->out = out;
    w->next = st->waiters[b];
    st->waiters[b] = w;
}

void store_unregister_waiter(struct store *st, const uint8_t request_id[16],
                             struct store_outcome *out)
{
    struct store_waiter **pp = &st->waiters[wait_bucket(request_id)];
    while (*pp) {
        if ((*pp)->out == out && memcmp((*pp)->id, request_id, 16) == 0) {
            struct store_waiter *w = *pp;
            *pp = w->next;
            free(w);
            return;
        }
        pp = &(*pp)->next;
    }
}

struct store_outcome *store__waiter_next(struct store *st, const uint8_t id[16],
                                         struct store_outcome *prev)
{
    struct store_waiter *w = st->waiters[wait_bucket(id)];
    if (prev) {
        for (; w; w = w->next)
            if (w->out == prev && memcmp(w->id, id, 16) == 0) {
                w = w->next;
                break;
            }
    }
    for (; w; w = w->next)
        if (memcmp(w->id, id, 16) == 0) return w->out;
    return NULL;
}

/* -------------------------------------------------------------- watchers */

static unsigned watch_bucket(uint64_t mailbox_id)
{
    return (unsigned)((mailbox_id * 0x9E3779B97F4A7C15ull) >> 56) % STORE_WATCH_BUCKETS;
}

void store_watch(struct store *st, uint64_t mailbox_id, struct store_watcher *w)
{
    unsigned b = watch_bucket(mailbox_id);
    w->mailbox_id = mailbox_id;
    w->prev = NULL;
    w->next = st->watchers[b];
    if (w->next) w->next->prev = w;
    st->watchers[b] = w;
}

void store_unwatch(struct store *st, struct store_watcher *w)
{
    unsigned b = watch_bucket(w->mailbox_id);
    if (w->prev)
        w->prev->next = w->next;
    else if (st->watchers[b] == w)
        st->watchers[b] = w->next;
    if (w->next) w->next->prev = w->prev;
    w->next = w->prev = NULL;
}

void store__notify(struct store *st, const struct store_change *ch)
{
    struct store_watcher *w = st->watchers[watch_bucket(ch->mailbox_id)];
    while (w) {
        struct store_watcher *next = w->next; /* w may unwatch itself */
        if (w->mailbox_id == ch->mailbox_id && w->on_change) w->on_change(w, ch);
        w = next;
    }
}

/* ----------------------------------------------------------------- reads */

MDB_txn *store_rtxn_begin(struct store *st)
{
    MDB_txn *txn = NULL;
    int rc;

    pthread_mutex_lock(&st->rlock);
    while (st->swapping)
        pthread_cond_wait(&st->rcond, &st->rlock);
    st->readers++;
    pthread_mutex_unlock(&st->rlock);
    rc = st->env ? mdb_txn_begin(st->env, NULL, MDB_RDONLY, &txn) : EINVAL;
    if (rc) {
        cf_error("store: read txn: %s", mdb_strerror(rc));
        pthread_mutex_lock(&st->rlock);
        st->readers--;
        pthread_mutex_unlock(&st->rlock);
        return NULL;
    }
    return txn;
}

void store_rtxn_end(MDB_txn *txn)
{
    struct store *st;

    if (!txn) return;
    st = mdb_env_get_userctx(mdb_txn_env(txn));
    mdb_txn_abort(txn);
    if (st != NULL) {
        pthread_mutex_lock(&st->rlock);
        st->readers--;
        pthread_mutex_unlock(&st->rlock);
    }
}

/* Map an LMDB get result: 0, STORE_ENOENT or -1 (logged). */
static int get_rc(int rc, const char *what)
{
    if (rc == 0) return 0;
    if (rc == MDB_NOTFOUND) return STORE_ENOENT;
    cf_error("store: %s: %s", what, mdb_strerror(rc));
    return -1;
}

int store_user_get(struct store *st, MDB_txn *txn, const char *username, struct store_user *u_r)
{
    char lc[STORE_MAX_USERNAME];
    size_t n = strlen(username);
    if (n == 0 || n > STORE_MAX_USERNAME) return STORE_ENOENT;
    for (size_t i = 0; i < n; i++)
        lc[i] = (char)tolower((unsigned char)username[i]);
    MDB_val k = {n, lc}, v;
    int rc = get_rc(mdb_get(txn, st->users, &k, &v), "users get");
    if (rc) return rc;
    if (store__user_decode(&v, u_r)) {
        cf_error("store: corrupt user record for %.*s", (int)n, lc);
        return -1;
    }
    return 0;
}

int store_user_get_by_id(struct store *st, MDB_txn *txn, uint64_t id, struct store_user *u_r)
{
    uint8_t kb[8];
    store__be64(kb, id);
    MDB_val k = {8, kb}, v;
    int rc = get_rc(mdb_get(txn, st->userids, &k, &v), "userids get");
    if (rc) return rc;
    MDB_val k2 = v, v2;
    rc = get_rc(mdb_get(txn, st->users, &k2, &v2), "users get");
    if (rc) return rc;
    return store__user_decode(&v2, u_r) ? -1 : 0;
}

int store_user_foreach(struct store *st, MDB_txn *txn,
                       int (*cb)(const struct store_user *u, void *arg), void *arg)
{
    MDB_cursor *c;
    MDB_val k, v;
    int rc = mdb_cursor_open(txn, st->users, &c);
    if (rc) return -1;
    int ret = 0;
    for (rc = mdb_cursor_get(c, &k, &v, MDB_FIRST); rc == 0;
         rc = mdb_cursor_get(c, &k, &v, MDB_NEXT)) {
        struct store_user u;
        if (store__user_decode(&v, &u)) {
            ret = -1;
            break;
        }
        if (cb(&u, arg)) break;
    }
    if (rc && rc != MDB_NOTFOUND) ret = -1;
    mdb_cursor_close(c);
    return ret;
}

int store_mailbox_get_by_id(struct store *st, MDB_txn *txn, uint64_t mailbox_id,
                            struct store_mailbox *mb_r)
{
    uint8_t kb[8];
    store__be64(kb, mailbox_id);
    MDB_val k = {8, kb}, v;
    int rc = get_rc(mdb_get(txn, st->mailboxes, &k, &v), "mailboxes get");
    if (rc) return rc;
    if (store__mailbox_decode(mailbox_id, &v, mb_r)) {
        cf_error("store: corrupt mailbox record %llu", (unsigned long long)mailbox_id);
        return -1;
    }
    return 0;
}

int store_mailbox_get(struct store *st, MDB_txn *txn, uint64_t owner_id, const char *name,
                      struct store_mailbox *mb_r)
{
    uint8_t kb[8 + STORE_MAX_MAILBOX_NAME];
    size_t n = strlen(name);
    if (n == 0 || n > STORE_MAX_MAILBOX_NAME) return STORE_ENOENT;
    store__be64(kb, owner_id);
    memcpy(kb + 8, name, n);
    MDB_val k = {8 + n, kb}, v;
    int rc = get_rc(mdb_get(txn, st->mbnames, &k, &v), "mbnames get");
    if (rc) return rc;
    struct rd r = {v.mv_data, v.mv_size, 0};
    uint64_t id = rd_le(&r, 8);
    if (r.err) return -1;
    return store_mailbox_get_by_id(st, txn, id, mb_r);
}

int store_mailbox_foreach(struct store *st, MDB_txn *txn, uint64_t owner_id,
                          int (*cb)(const struct store_mailbox *mb, void *arg), void *arg)
{
    MDB_cursor *c;
    uint8_t kb[8];
    store__be64(kb, owner_id);
    MDB_val k = {8, kb}, v;
    if (mdb_cursor_open(txn, st->mbnames, &c)) return -1;
    int ret = 0, rc;
    for (rc = mdb_cursor_get(c, &k, &v, MDB_SET_RANGE); rc == 0;
         rc = mdb_cursor_get(c, &k, &v, MDB_NEXT)) {
        if (k.mv_size < 8 || memcmp(k.mv_data, kb, 8) != 0) break;
        struct rd r = {v.mv_data, v.mv_size, 0};
        uint64_t id = rd_le(&r, 8);
        struct store_mailbox mb;
        if (r.err || store_mailbox_get_by_id(st, txn, id, &mb) != 0) {
            ret = -1;
            break;
        }
        if (cb(&mb, arg)) break;
    }
    if (rc && rc != MDB_NOTFOUND) ret = -1;
    mdb_cursor_close(c);
    return ret;
}

int store_msg_get(struct store *st, MDB_txn *txn, uint64_t mailbox_id, uint32_t uid,
                  struct store_msg *m_r)
{
    uint8_t kb[12];
    store__be64(kb, mailbox_id);
    store__be32(kb + 8, uid);
    MDB_val k = {12, kb}, v;
    int rc = get_rc(mdb_get(txn, st->msgs, &k, &v), "msgs get");
    if (rc) return rc;
    return store__msg_decode(uid, &v, m_r) ? -1 : 0;
}

int store_msg_foreach(struct store *st, MDB_txn *txn, uint64_t mailbox_id, uint32_t lo, uint32_t hi,
                      int (*cb)(const struct store_msg *m, void *arg), void *arg)
{
    MDB_cursor *c;
    uint8_t kb[12];
    store__be64(kb, mailbox_id);
    store__be32(kb + 8, lo);
    MDB_val k = {12, kb}, v;
    if (mdb_cursor_open(txn, st->msgs, &c)) return -1;
    int ret = 0, rc;
    for (rc = mdb_cursor_get(c, &k, &v, MDB_SET_RANGE); rc == 0;
         rc = mdb_cursor_get(c, &k, &v, MDB_NEXT)) {
        if (k.mv_size != 12 || memcmp(k.mv_data, kb, 8) != 0) break;
        uint32_t uid = store__get_be32((const uint8_t *)k.mv_data + 8);
        if (uid > hi) break;
        struct store_msg m;
        if (store__msg_decode(uid, &v, &m)) {
            ret = -1;
            break;
        }
        if (cb(&m, arg)) break;
    }
    if (rc && rc != MDB_NOTFOUND) ret = -1;
    mdb_cursor_close(c);
    return ret;
}

int store_msg_changed_since(struct store *st, MDB_txn *txn, uint64_t mailbox_id, uint64_t since,
                            int (*cb)(uint32_t uid, uint64_t modseq, void *arg), void *arg)
{
    MDB_cursor *c;
    uint8_t kb[20];
    if (since == UINT64_MAX) return 0;
    store__be64(kb, mailbox_id);
    store__be64(kb + 8, since + 1);
    store__be32(kb + 16, 0);
    MDB_val k = {20, kb}, v;
    if (mdb_cursor_open(txn, st->modseq, &c)) return -1;
    int ret = 0, rc;
    for (rc = mdb_cursor_get(c, &k, &v, MDB_SET_RANGE); rc == 0;
         rc = mdb_cursor_get(c, &k, &v, MDB_NEXT)) {
        if (k.mv_size != 20 || memcmp(k.mv_data, kb, 8) != 0) break;
        const uint8_t *p = k.mv_data;
        if (cb(store__get_be32(p + 16), store__get_be64(p + 8), arg)) break;
    }
    if (rc && rc != MDB_NOTFOUND) ret = -1;
    mdb_cursor_close(c);
    return ret;
}

int store_msg_uids(struct store *st, MDB_txn *txn, uint64_t mailbox_id, uint32_t **uids_r,
                   size_t *n_r)
{
    MDB_cursor *c;
    uint8_t kb[12];
    store__be64(kb, mailbox_id);
    store__be32(kb + 8, 0);
    MDB_val k = {12, kb}, v;
    uint32_t *a = NULL;
    size_t n = 0, cap = 0;
    *uids_r = NULL;
    *n_r = 0;
    if (mdb_cursor_open(txn, st->msgs, &c)) return -1;
    int rc;
    for (rc = mdb_cursor_get(c, &k, &v, MDB_SET_RANGE); rc == 0;
         rc = mdb_cursor_get(c, &k, &v, MDB_NEXT)) {
        if (k.mv_size != 12 || memcmp(k.mv_data, kb, 8) != 0) break;
        if (n == cap) {
            size_t ncap = cap ? cap * 2 : 64;
            uint32_t *na = realloc(a, ncap * sizeof(*a));
            if (!na) {
                free(a);
                mdb_cursor_close(c);
                return -1;
            }
            a = na;
            cap = ncap;
        }
        a[n++] = store__get_be32((const uint8_t *)k.mv_data + 8);
    }
    mdb_cursor_close(c);
    if (rc && rc != MDB_NOTFOUND) {
        free(a);
        return -1;
    }
    *uids_r = a;
    *n_r = n;
    return 0;
}

int store_blob_get(struct store *st, MDB_txn *txn, uint64_t blob_id, const char **data_r,
                   size_t *len_r)
{
    uint8_t kb[8];
    store__be64(kb, blob_id);
    MDB_val k = {8, kb}, v;
    int rc = get_rc(mdb_get(txn, st->blobs, &k, &v), "blobs get");
    if (rc) return rc;
    *data_r = v.mv_data;
    *len_r = v.mv_size;
    return 0;
}

int store_blob_cache(struct store *st, MDB_txn *txn, uint64_t blob_id, struct store_cache *c_r)
{
    uint8_t kb[8];
    store__be64(kb, blob_id);
    MDB_val k = {8, kb}, v;
    int rc = get_rc(mdb_get(txn, st->blobmeta, &k, &v), "blobmeta get");
    if (rc) return rc;
    return store__blobmeta_decode(&v, NULL, NULL, c_r) ? -1 : 0;
}

int store_subs_foreach(struct store *st, MDB_txn *txn, uint64_t user_id,
                       int (*cb)(const char *name, void *arg), void *arg)
{
    MDB_cursor *c;
    uint8_t kb[8];
    char name[STORE_MAX_MAILBOX_NAME + 1];
    store__be64(kb, user_id);
    MDB_val k = {8, kb}, v;
    if (mdb_cursor_open(txn, st->subs, &c)) return -1;
    int ret = 0, rc;
    for (rc = mdb_cursor_get(c, &k, &v, MDB_SET_RANGE); rc == 0;
         rc = mdb_cursor_get(c, &k, &v, MDB_NEXT)) {
        if (k.mv_size < 8 || memcmp(k.mv_data, kb, 8) != 0) break;
        size_t n = k.mv_size - 8;
        if (n > STORE_MAX_MAILBOX_NAME) continue;
        memcpy(name, (const char *)k.mv_data + 8, n);
        name[n] = 0;
        if (cb(name, arg)) break;
    }
    if (rc && rc != MDB_NOTFOUND) ret = -1;
    mdb_cursor_close(c);
    return ret;
}

int store_subs_has(struct store *st, MDB_txn *txn, uint64_t user_id, const char *name)
{
    uint8_t kb[8 + STORE_MAX_MAILBOX_NAME];
    size_t n = strlen(name);
    if (n == 0 || n > STORE_MAX_MAILBOX_NAME) return 0;
    store__be64(kb, user_id);
    memcpy(kb + 8, name, n);
    MDB_val k = {8 + n, kb}, v;
    return mdb_get(txn, st->subs, &k, &v) == 0;
}

static uint32_t rights_parse(const char *s, size_t n)
{
    uint32_t r = 0;
    for (size_t i = 0; i < n; i++) {
        switch (s[i]) {
        case 'l':
            r |= STORE_R_LOOKUP;
            break;
        case 'r':
            r |= STORE_R_READ;
            break;
        case 's':
            r |= STORE_R_SEEN;
            break;
        case 'w':
            r |= STORE_R_WRITE;
            break;
        case 'i':
            r |= STORE_R_INSERT;
            break;
        case 'p':
            r |= STORE_R_POST;
            break;
        case 'k':
            r |= STORE_R_CREATE;
            break;
        case 'x':
            r |= STORE_R_DELETEMBOX;
            break;
        case 't':
            r |= STORE_R_DELETEMSG;
            break;
        case 'e':
            r |= STORE_R_EXPUNGE;
            break;
        case 'a':
            r |= STORE_R_ADMIN;
            break;
        case 'c':
            r |= STORE_R_CREATE | STORE_R_DELETEMBOX;
            break; /* RFC 2086 */
        case 'd':
            r |= STORE_R_DELETEMSG | STORE_R_EXPUNGE | STORE_R_DELETEMBOX;
            break;
        default:
            break;
        }
    }
    return r;
}

static uint32_t acl_lookup(struct store *st, MDB_txn *txn, uint64_t mailbox_id, const char *ident)
{
    uint8_t kb[8 + STORE_MAX_IDENTIFIER];
    size_t n = strlen(ident);
    if (n == 0 || n > STORE_MAX_IDENTIFIER) return 0;
    store__be64(kb, mailbox_id);
    memcpy(kb + 8, ident, n);
    MDB_val k = {8 + n, kb}, v;
    if (mdb_get(txn, st->acl, &k, &v)) return 0;
    return rights_parse(v.mv_data, v.mv_size);
}

uint32_t store_rights(struct store *st, MDB_txn *txn, uint64_t user_id,
                      const struct store_mailbox *mb)
{
    if (mb->owner_id == user_id) return STORE_R_ALL;
    uint32_t r = acl_lookup(st, txn, mb->id, "anyone");
    struct store_user u;
    if (store_user_get_by_id(st, txn, user_id, &u) == 0) r |= acl_lookup(st, txn, mb->id, u.name);
    return r;
}

/* ---------------------------------------------------------------- digest */

static int digest_db(EVP_MD_CTX *md, MDB_txn *txn, MDB_dbi dbi, const char *name, int skip_applied)
{
    MDB_cursor *c;
    MDB_val k, v;
    uint8_t len[8];
    if (mdb_cursor_open(txn, dbi, &c)) return -1;
    EVP_DigestUpdate(md, name, strlen(name) + 1);
    int rc;
    for (rc = mdb_cursor_get(c, &k, &v, MDB_FIRST); rc == 0;
         rc = mdb_cursor_get(c, &k, &v, MDB_NEXT)) {
        if (skip_applied && k.mv_size == 7 && memcmp(k.mv_data, "applied", 7) == 0) continue;
        store__be64(len, k.mv_size);
        EVP_DigestUpdate(md, len, 8);
        EVP_DigestUpdate(md, k.mv_data, k.mv_size);
        store__be64(len, v.mv_size);
        EVP_DigestUpdate(md, len, 8);
        EVP_DigestUpdate(md, v.mv_data, v.mv_size);
    }
    mdb_cursor_close(c);
    return rc == MDB_NOTFOUND ? 0 : -1;
}

int store_digest(struct store *st, char out[65])
{
    MDB_txn *txn = store_rtxn_begin(st);
    EVP_MD_CTX *md = EVP_MD_CTX_new();
    unsigned char h[32];
    unsigned hl = 0;
    int ret = -1;
    out[0] = 0;
    if (!txn || !md || EVP_DigestInit_ex(md, EVP_sha256(), NULL) != 1) goto done;
    /* Everything that is state; not the applied index nor the idempotency
     * tables (their expiry window is bookkeeping). */
    struct store_db dbs[STORE_N_DBS];
    size_t n = store__dbs(st, dbs);
    for (size_t i = 0; i < n; i++)
        if (dbs[i].state && digest_db(md, txn, dbs[i].dbi, dbs[i].name, i == 0)) goto done;
    if (EVP_DigestFinal_ex(md, h, &hl) != 1 || hl != 32) goto done;
    for (int i = 0; i < 32; i++)
        snprintf(out + 2 * i, 3, "%02x", h[i]);
    ret = 0;
done:
    EVP_MD_CTX_free(md);
    store_rtxn_end(txn);
    return ret;
}

size_t store__dbs(const struct store *st, struct store_db out[STORE_N_DBS])
{
    const struct store_db all[STORE_N_DBS] = {
        {"meta", st->meta, 1},       {"users", st->users, 1},         {"userids", st->userids, 1},
        {"mbnames", st->mbnames, 1}, {"mailboxes", st->mailboxes, 1}, {"msgs", st->msgs, 1},
        {"blobs", st->blobs, 1},     {"blobmeta", st->blobmeta, 1},   {"subs", st->subs, 1},
        {"acl", st->acl, 1},         {"requests", st->requests, 0},   {"reqlog", st->reqlog, 0},
        {"modseq", st->modseq, 1},   {"nodes", st->nodes, 0},
    };
    memcpy(out, all, sizeof all);
    return STORE_N_DBS;
}
