/* Unit tests for storenode/store.c + fsm.c: entries built with
 * propose_frame are applied to a temporary store and checked through the
 * read API (UIDs, counts, blob bytes, APPENDUID/COPYUID outcomes, renames,
 * quota refusals, notifications, refusal of unknown frames). */
#include <CUnit/Basic.h>
#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cf_log.h"
#include "coffer_raft.pb-c.h"
#include "propose.h"
#include "store.h"

static char dir[64];
static struct store *st;
static uint64_t idx;
static const uint64_t T0 = 1700000000000ull; /* leader time, ms */

static void rm_dir(const char *d)
{
    char p[128];
    const char *files[] = {"data.mdb", "lock.mdb"};
    for (size_t i = 0; i < 2; i++) {
        snprintf(p, sizeof p, "%s/%s", d, files[i]);
        unlink(p);
    }
    rmdir(d);
}

/* Frame e and apply it at the next index. */
static int apply_e(Coffer__Entry *e, struct store_outcome *o)
{
    void *buf;
    size_t len;
    if (!e->leader_time_ms) e->leader_time_ms = T0 + idx * 1000;
    CU_ASSERT_EQUAL_FATAL(propose_frame(e, &buf, &len), 0);
    int rc = store_apply(st, ++idx, buf, len, o);
    free(buf);
    return rc;
}

static int do_user_create(const char *name, uint64_t qbytes, uint64_t qmsgs)
{
    Coffer__Entry e = COFFER__ENTRY__INIT;
    Coffer__UserCreate uc = COFFER__USER_CREATE__INIT;
    Coffer__MailboxCreate inbox = COFFER__MAILBOX_CREATE__INIT, sent = COFFER__MAILBOX_CREATE__INIT;
    Coffer__MailboxCreate *mbs[2] = {&inbox, &sent};
    struct store_outcome o = {0};
    inbox.username = sent.username = (char *)name;
    inbox.name = "INBOX";
    sent.name = "Sent";
    sent.has_special_use = 1;
    sent.special_use = COFFER__SPECIAL_USE__SU_SENT;
    uc.username = (char *)name;
    uc.password_hash = "$scrypt$dummy";
    uc.initial_mailboxes = mbs;
    uc.n_initial_mailboxes = 2;
    uc.has_quota_storage_bytes = qbytes != 0;
    uc.quota_storage_bytes = qbytes;
    uc.has_quota_messages = qmsgs != 0;
    uc.quota_messages = qmsgs;
    e.op_case = COFFER__ENTRY__OP_USER_CREATE;
    e.user_create = &uc;
    CU_ASSERT_EQUAL(apply_e(&e, &o), 0);
    int r = o.result;
    store_outcome_clear(&o);
    return r;
}

static int do_append(const char *user, const char *mbox, const char *msg, uint32_t flags,
                     char **kws, size_t nkw, struct store_outcome *o)
{
    Coffer__Entry e = COFFER__ENTRY__INIT;
    Coffer__Append a = COFFER__APPEND__INIT;
    Coffer__MessageCache c = COFFER__MESSAGE_CACHE__INIT;
    c.envelope.data = (uint8_t *)"(NIL)";
    c.envelope.len = 5;
    c.bodystructure.data = (uint8_t *)"(\"text\")";
    c.bodystructure.len = 8;
    c.body.data = (uint8_t *)"(\"text\")";
    c.body.len = 8;
    c.parts.data = (uint8_t *)"P";
    c.parts.len = 1;
    a.username = (char *)user;
    a.mailbox = (char *)mbox;
    a.message.data = (uint8_t *)msg;
    a.message.len = strlen(msg);
    a.has_flags = 1;
    a.flags = flags;
    a.keywords = kws;
    a.n_keywords = nkw;
    a.cache = &c;
    e.op_case = COFFER__ENTRY__OP_APPEND;
    e.append = &a;
    return apply_e(&e, o);
}

static int do_store(const char *user, const char *mbox, uint32_t uv, uint32_t lo, uint32_t hi,
                    Coffer__FlagMode mode, uint32_t flags, char **kws, size_t nkw,
                    uint64_t unchanged_since, struct store_outcome *o)
{
    Coffer__Entry e = COFFER__ENTRY__INIT;
    Coffer__StoreFlags s = COFFER__STORE_FLAGS__INIT;
    Coffer__UidRange r = COFFER__UID_RANGE__INIT, *rs[1] = {&r};
    r.lo = lo;
    r.hi = hi;
    s.username = (char *)user;
    s.mailbox = (char *)mbox;
    s.uidvalidity = uv;
    s.uids = rs;
    s.n_uids = 1;
    s.mode = mode;
    s.has_flags = 1;
    s.flags = flags;
    s.keywords = kws;
    s.n_keywords = nkw;
    s.has_unchanged_since = unchanged_since != 0;
    s.unchanged_since = unchanged_since;
    e.op_case = COFFER__ENTRY__OP_STORE_FLAGS;
    e.store_flags = &s;
    return apply_e(&e, o);
}

static int do_copy(const char *user, const char *src, uint32_t uv, uint32_t lo, uint32_t hi,
                   const char *dst, int move, struct store_outcome *o)
{
    Coffer__Entry e = COFFER__ENTRY__INIT;
    Coffer__CopyMessages c = COFFER__COPY_MESSAGES__INIT;
    Coffer__UidRange r = COFFER__UID_RANGE__INIT, *rs[1] = {&r};
    r.lo = lo;
    r.hi = hi;
    c.username = (char *)user;
    c.src_mailbox = (char *)src;
    c.src_uidvalidity = uv;
    c.uids = rs;
    c.n_uids = 1;
    c.dst_username = (char *)user;
    c.dst_mailbox = (char *)dst;
    c.has_move = 1;
    c.move = move;
    e.op_case = COFFER__ENTRY__OP_COPY;
    e.copy = &c;
    return apply_e(&e, o);
}

static int do_expunge(const char *user, const char *mbox, uint32_t uv, uint32_t lo, uint32_t hi,
                      int require_deleted)
{
    Coffer__Entry e = COFFER__ENTRY__INIT;
    Coffer__Expunge x = COFFER__EXPUNGE__INIT;
    Coffer__UidRange r = COFFER__UID_RANGE__INIT, *rs[1] = {&r};
    struct store_outcome o = {0};
    r.lo = lo;
    r.hi = hi;
    x.username = (char *)user;
    x.mailbox = (char *)mbox;
    x.uidvalidity = uv;
    x.uids = rs;
    x.n_uids = 1;
    x.has_require_deleted = 1;
    x.require_deleted = require_deleted;
    e.op_case = COFFER__ENTRY__OP_EXPUNGE;
    e.expunge = &x;
    CU_ASSERT_EQUAL(apply_e(&e, &o), 0);
    store_outcome_clear(&o);
    return o.result;
}

static int do_mbox(int op, const char *user, const char *a, const char *b)
{
    Coffer__Entry e = COFFER__ENTRY__INIT;
    Coffer__MailboxCreate c = COFFER__MAILBOX_CREATE__INIT;
    Coffer__MailboxDelete d = COFFER__MAILBOX_DELETE__INIT;
    Coffer__MailboxRename r = COFFER__MAILBOX_RENAME__INIT;
    Coffer__Subscribe s = COFFER__SUBSCRIBE__INIT;
    struct store_outcome o = {0};
    switch (op) {
    case 'c':
        c.username = (char *)user;
        c.name = (char *)a;
        e.op_case = COFFER__ENTRY__OP_MAILBOX_CREATE;
        e.mailbox_create = &c;
        break;
    case 'd':
        d.username = (char *)user;
        d.name = (char *)a;
        e.op_case = COFFER__ENTRY__OP_MAILBOX_DELETE;
        e.mailbox_delete = &d;
        break;
    case 'r':
        r.username = (char *)user;
        r.old_name = (char *)a;
        r.new_name = (char *)b;
        e.op_case = COFFER__ENTRY__OP_MAILBOX_RENAME;
        e.mailbox_rename = &r;
        break;
    default:
        s.username = (char *)user;
        s.name = (char *)a;
        s.subscribed = op == 's';
        e.op_case = COFFER__ENTRY__OP_SUBSCRIBE;
        e.subscribe = &s;
        break;
    }
    CU_ASSERT_EQUAL(apply_e(&e, &o), 0);
    store_outcome_clear(&o);
    return o.result;
}

/* Read helpers (each in its own read txn). */
static uint64_t user_id(const char *name)
{
    MDB_txn *t = store_rtxn_begin(st);
    struct store_user u;
    uint64_t id = 0;
    if (store_user_get(st, t, name, &u) == 0) id = u.id;
    store_rtxn_end(t);
    return id;
}

static int mbox_get(const char *user, const char *name, struct store_mailbox *mb)
{
    MDB_txn *t = store_rtxn_begin(st);
    int rc = store_mailbox_get(st, t, user_id(user), name, mb);
    mb->name = NULL; /* points into the map: not valid after the txn */
    mb->keywords = NULL;
    store_rtxn_end(t);
    return rc;
}

static int msg_get(const char *user, const char *mbox, uint32_t uid, struct store_msg *m)
{
    struct store_mailbox mb;
    if (mbox_get(user, mbox, &mb)) return STORE_ENOENT;
    MDB_txn *t = store_rtxn_begin(st);
    int rc = store_msg_get(st, t, mb.id, uid, m);
    m->keywords = NULL;
    store_rtxn_end(t);
    return rc;
}

static char *msg_keywords(const char *user, const char *mbox, uint32_t uid)
{
    static char out[256];
    struct store_mailbox mb;
    struct store_msg m;
    out[0] = 0;
    if (mbox_get(user, mbox, &mb)) return out;
    MDB_txn *t = store_rtxn_begin(st);
    if (store_msg_get(st, t, mb.id, uid, &m) == 0) {
        size_t o = 0;
        for (const char *p = m.keywords; p < m.keywords + m.keywords_len; p += strlen(p) + 1)
            o += (size_t)snprintf(out + o, sizeof(out) - o, "%s%s", o ? " " : "", p);
    }
    store_rtxn_end(t);
    return out;
}

static size_t mbox_uids(const char *user, const char *mbox, uint32_t *out, size_t max)
{
    struct store_mailbox mb;
    uint32_t *u;
    size_t n = 0;
    if (mbox_get(user, mbox, &mb)) return 0;
    MDB_txn *t = store_rtxn_begin(st);
    CU_ASSERT_EQUAL(store_msg_uids(st, t, mb.id, &u, &n), 0);
    for (size_t i = 0; i < n && i < max; i++)
        out[i] = u[i];
    free(u);
    store_rtxn_end(t);
    return n;
}

static int blob_exists(uint64_t blob)
{
    const char *d;
    size_t l;
    MDB_txn *t = store_rtxn_begin(st);
    int rc = store_blob_get(st, t, blob, &d, &l);
    store_rtxn_end(t);
    return rc == 0;
}

static const char *M1 = "Subject: one\r\n\r\nhello\r\n";
static const char *M2 = "Subject: two\r\n\r\nhello again\r\n";
static const char *M3 = "Subject: three\r\n\r\nbinary \x01\x02\xff end\r\n";

/* ---- watcher ---- */
struct rec_watch {
    struct store_watcher w;
    int n_calls;
    enum store_change_kind last_kind;
    uint32_t last_uids[16];
    size_t last_n;
};
static void on_change(struct store_watcher *w, const struct store_change *ch)
{
    struct rec_watch *r = (struct rec_watch *)w;
    r->n_calls++;
    r->last_kind = ch->kind;
    r->last_n = ch->n_uids;
    for (size_t i = 0; i < ch->n_uids && i < 16; i++)
        r->last_uids[i] = ch->uids[i];
}

struct changed {
    uint32_t uids[16];
    uint64_t modseqs[16];
    size_t n;
};
static int on_changed(uint32_t uid, uint64_t modseq, void *arg)
{
    struct changed *c = arg;
    if (c->n < 16) {
        c->uids[c->n] = uid;
        c->modseqs[c->n] = modseq;
    }
    c->n++;
    return 0;
}

/* ---------------------------------------------------------------- tests */

static void test_setup_user(void)
{
    Coffer__Entry e = COFFER__ENTRY__INIT;
    Coffer__GroupInit g = COFFER__GROUP_INIT__INIT;
    uint8_t gid[16] = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16}, got[16];
    struct store_outcome o = {0};
    g.group_id.data = gid;
    g.group_id.len = 16;
    e.op_case = COFFER__ENTRY__OP_GROUP_INIT;
    e.group_init = &g;
    CU_ASSERT_EQUAL(apply_e(&e, &o), 0);
    CU_ASSERT_EQUAL(o.result, STORE_OK);
    store_group_id(st, got);
    CU_ASSERT_EQUAL(memcmp(got, gid, 16), 0);
    /* a different group id later is refused */
    gid[0] = 99;
    e.leader_time_ms = 0;
    CU_ASSERT_EQUAL(apply_e(&e, &o), 0);
    CU_ASSERT_EQUAL(o.result, STORE_EINVAL);
    store_group_id(st, got);
    CU_ASSERT_EQUAL(got[0], 1);

    CU_ASSERT_EQUAL(do_user_create("Alice", 0, 0), STORE_OK);
    CU_ASSERT_EQUAL(do_user_create("alice", 0, 0), STORE_EEXIST);
    CU_ASSERT_EQUAL(store_applied_index(st), idx);

    MDB_txn *t = store_rtxn_begin(st);
    struct store_user u;
    CU_ASSERT_EQUAL_FATAL(store_user_get(st, t, "ALICE", &u), 0);
    CU_ASSERT_STRING_EQUAL(u.name, "alice");
    CU_ASSERT_STRING_EQUAL(u.password_hash, "$scrypt$dummy");
    CU_ASSERT_EQUAL(u.disabled, 0);
    struct store_user u2;
    CU_ASSERT_EQUAL(store_user_get_by_id(st, t, u.id, &u2), 0);
    CU_ASSERT_STRING_EQUAL(u2.name, "alice");
    store_rtxn_end(t);

    struct store_mailbox inbox, sent;
    CU_ASSERT_EQUAL(mbox_get("alice", "INBOX", &inbox), 0);
    CU_ASSERT_EQUAL(mbox_get("alice", "Sent", &sent), 0);
    CU_ASSERT_EQUAL(sent.special_use, COFFER__SPECIAL_USE__SU_SENT);
    CU_ASSERT_EQUAL(inbox.uidnext, 1);
    CU_ASSERT(inbox.uidvalidity > 0);
    CU_ASSERT(sent.uidvalidity > inbox.uidvalidity);
    CU_ASSERT_EQUAL(mbox_get("alice", "Nope", &sent), STORE_ENOENT);
}

static void test_append(void)
{
    struct store_outcome o = {0};
    char *k1[] = {"$Label1", "Work"};
    char *k2[] = {"$LABEL1"};
    struct store_mailbox mb;
    CU_ASSERT_EQUAL_FATAL(mbox_get("alice", "INBOX", &mb), 0);

    CU_ASSERT_EQUAL(do_append("alice", "INBOX", M1, 0, k1, 2, &o), 0);
    CU_ASSERT_EQUAL(o.result, STORE_OK);
    CU_ASSERT_EQUAL(o.uid, 1);
    CU_ASSERT_EQUAL(o.uidvalidity, mb.uidvalidity);
    CU_ASSERT_EQUAL(o.index, idx);
    uint64_t append1_index = idx;
    CU_ASSERT_EQUAL(do_append("alice", "INBOX", M2, STORE_F_SEEN, k2, 1, &o), 0);
    CU_ASSERT_EQUAL(o.uid, 2);
    CU_ASSERT_EQUAL(do_append("alice", "INBOX", M3, STORE_F_FLAGGED, NULL, 0, &o), 0);
    CU_ASSERT_EQUAL(o.uid, 3);

    CU_ASSERT_EQUAL(mbox_get("alice", "INBOX", &mb), 0);
    CU_ASSERT_EQUAL(mb.uidnext, 4);
    CU_ASSERT_EQUAL(mb.messages, 3);
    CU_ASSERT_EQUAL(mb.unseen, 2);
    CU_ASSERT_EQUAL(mb.size, strlen(M1) + strlen(M2) + strlen(M3));
    CU_ASSERT_EQUAL(mb.highestmodseq, idx);

    uint32_t uids[8];
    CU_ASSERT_EQUAL(mbox_uids("alice", "INBOX", uids, 8), 3);
    CU_ASSERT(uids[0] == 1 && uids[1] == 2 && uids[2] == 3);

    struct store_msg m;
    CU_ASSERT_EQUAL_FATAL(msg_get("alice", "INBOX", 1, &m), 0);
    CU_ASSERT_EQUAL(m.modseq, append1_index);
    CU_ASSERT_EQUAL(m.size, strlen(M1));
    CU_ASSERT_EQUAL(m.internal_date, (int64_t)((T0 + (append1_index - 1) * 1000) / 1000));
    CU_ASSERT_STRING_EQUAL(msg_keywords("alice", "INBOX", 1), "$Label1 Work");
    /* first-seen spelling wins, matched case-insensitively */
    CU_ASSERT_STRING_EQUAL(msg_keywords("alice", "INBOX", 2), "$Label1");

    /* blob bytes exact, cache present */
    CU_ASSERT_EQUAL_FATAL(msg_get("alice", "INBOX", 3, &m), 0);
    MDB_txn *t = store_rtxn_begin(st);
    const char *d;
    size_t l;
    CU_ASSERT_EQUAL_FATAL(store_blob_get(st, t, m.blob_id, &d, &l), 0);
    CU_ASSERT_EQUAL(l, strlen(M3));
    CU_ASSERT_EQUAL(memcmp(d, M3, l), 0);
    struct store_cache c;
    CU_ASSERT_EQUAL(store_blob_cache(st, t, m.blob_id, &c), 0);
    CU_ASSERT_EQUAL(c.envelope_len, 5);
    CU_ASSERT_EQUAL(memcmp(c.envelope, "(NIL)", 5), 0);
    CU_ASSERT_EQUAL(c.parts_len, 1);
    store_rtxn_end(t);

    /* mailbox keyword list */
    t = store_rtxn_begin(st);
    struct store_mailbox mb2;
    CU_ASSERT_EQUAL(store_mailbox_get(st, t, user_id("alice"), "INBOX", &mb2), 0);
    CU_ASSERT_EQUAL(mb2.keywords_len, strlen("$Label1") + 1 + strlen("Work") + 1);
    store_rtxn_end(t);

    struct store_user u;
    t = store_rtxn_begin(st);
    CU_ASSERT_EQUAL(store_user_get(st, t, "alice", &u), 0);
    CU_ASSERT_EQUAL(u.used_messages, 3);
    CU_ASSERT_EQUAL(u.used_bytes, mb.size);
    store_rtxn_end(t);

    /* missing mailbox */
    CU_ASSERT_EQUAL(do_append("alice", "Nope", M1, 0, NULL, 0, &o), 0);
    CU_ASSERT_EQUAL(o.result, STORE_ENOENT);
    CU_ASSERT_EQUAL(o.uid, 0);
    store_outcome_clear(&o);
}

static void test_store_flags(void)
{
    struct store_outcome o = {0};
    struct store_mailbox mb;
    struct store_msg m;
    struct rec_watch w = {.w.on_change = on_change};
    CU_ASSERT_EQUAL_FATAL(mbox_get("alice", "INBOX", &mb), 0);
    store_watch(st, mb.id, &w.w);

    CU_ASSERT_EQUAL(do_store("alice", "INBOX", mb.uidvalidity, 1, 0xffffffff,
                             COFFER__FLAG_MODE__FLAGS_ADD, STORE_F_SEEN, NULL, 0, 0, &o),
                    0);
    CU_ASSERT_EQUAL(o.result, STORE_OK);
    CU_ASSERT_EQUAL(w.n_calls, 1);
    CU_ASSERT_EQUAL(w.last_kind, STORE_CH_FLAGS);
    CU_ASSERT_EQUAL(w.last_n, 2); /* uid 2 was already \Seen */
    CU_ASSERT(w.last_uids[0] == 1 && w.last_uids[1] == 3);
    uint64_t seen_index = idx;
    CU_ASSERT_EQUAL(mbox_get("alice", "INBOX", &mb), 0);
    CU_ASSERT_EQUAL(mb.unseen, 0);
    CU_ASSERT_EQUAL(mb.highestmodseq, seen_index);
    CU_ASSERT_EQUAL(msg_get("alice", "INBOX", 1, &m), 0);
    CU_ASSERT_EQUAL(m.modseq, seen_index);
    CU_ASSERT_EQUAL(m.flags, STORE_F_SEEN);
    CU_ASSERT_EQUAL(msg_get("alice", "INBOX", 2, &m), 0);
    CU_ASSERT(m.modseq < seen_index); /* unchanged: modseq not bumped */

    /* remove \Seen from 2 and a keyword (other case) */
    char *rk[] = {"$label1"};
    CU_ASSERT_EQUAL(do_store("alice", "INBOX", mb.uidvalidity, 2, 2,
                             COFFER__FLAG_MODE__FLAGS_REMOVE, STORE_F_SEEN, rk, 1, 0, &o),
                    0);
    CU_ASSERT_EQUAL(msg_get("alice", "INBOX", 2, &m), 0);
    CU_ASSERT_EQUAL(m.flags, 0);
    CU_ASSERT_STRING_EQUAL(msg_keywords("alice", "INBOX", 2), "");
    CU_ASSERT_EQUAL(mbox_get("alice", "INBOX", &mb), 0);
    CU_ASSERT_EQUAL(mb.unseen, 1);

    /* replace on 3 */
    char *k3[] = {"work", "New"};
    CU_ASSERT_EQUAL(do_store("alice", "INBOX", mb.uidvalidity, 3, 3,
                             COFFER__FLAG_MODE__FLAGS_REPLACE, STORE_F_DELETED, k3, 2, 0, &o),
                    0);
    CU_ASSERT_EQUAL(msg_get("alice", "INBOX", 3, &m), 0);
    CU_ASSERT_EQUAL(m.flags, STORE_F_DELETED);
    CU_ASSERT_STRING_EQUAL(msg_keywords("alice", "INBOX", 3), "Work New");
    CU_ASSERT_EQUAL(mbox_get("alice", "INBOX", &mb), 0);
    CU_ASSERT_EQUAL(mb.deleted, 1);
    CU_ASSERT_EQUAL(mb.unseen, 2);

    /* CONDSTORE: uid 3 changed after seen_index -> EMODIFIED, uid 1 changed */
    CU_ASSERT_EQUAL(do_store("alice", "INBOX", mb.uidvalidity, 1, 3, COFFER__FLAG_MODE__FLAGS_ADD,
                             STORE_F_ANSWERED, NULL, 0, seen_index, &o),
                    0);
    CU_ASSERT_EQUAL(o.result, STORE_EMODIFIED);
    CU_ASSERT_EQUAL(o.n_modified, 2);
    if (o.n_modified == 2) CU_ASSERT(o.modified_uids[0] == 2 && o.modified_uids[1] == 3);
    CU_ASSERT_EQUAL(msg_get("alice", "INBOX", 1, &m), 0);
    CU_ASSERT_EQUAL(m.flags, STORE_F_SEEN | STORE_F_ANSWERED);
    CU_ASSERT_EQUAL(msg_get("alice", "INBOX", 3, &m), 0);
    CU_ASSERT_EQUAL(m.flags, STORE_F_DELETED);
    store_outcome_clear(&o);

    /* modseq index: changed since seen_index = uid 2, 3 (STOREs) and 1 (this one) */
    struct changed cs = {0};
    MDB_txn *t = store_rtxn_begin(st);
    CU_ASSERT_EQUAL(store_msg_changed_since(st, t, mb.id, seen_index, on_changed, &cs), 0);
    store_rtxn_end(t);
    CU_ASSERT_EQUAL(cs.n, 3);
    CU_ASSERT(cs.uids[0] == 2 && cs.uids[1] == 3 && cs.uids[2] == 1); /* modseq order */
    CU_ASSERT_EQUAL(cs.modseqs[2], idx);
    cs.n = 0;
    t = store_rtxn_begin(st);
    CU_ASSERT_EQUAL(store_msg_changed_since(st, t, mb.id, 0, on_changed, &cs), 0);
    store_rtxn_end(t);
    CU_ASSERT_EQUAL(cs.n, 3); /* one index entry per message */

    /* wrong uidvalidity */
    CU_ASSERT_EQUAL(do_store("alice", "INBOX", mb.uidvalidity + 1, 1, 3,
                             COFFER__FLAG_MODE__FLAGS_ADD, STORE_F_DRAFT, NULL, 0, 0, &o),
                    0);
    CU_ASSERT_EQUAL(o.result, STORE_EUIDVALIDITY);
    CU_ASSERT_EQUAL(msg_get("alice", "INBOX", 1, &m), 0);
    CU_ASSERT_EQUAL(m.flags & STORE_F_DRAFT, 0);
    store_unwatch(st, &w.w);
}

static void test_copy_move_expunge(void)
{
    struct store_outcome o = {0};
    struct store_mailbox inbox, sent;
    struct store_msg m1, s1;
    CU_ASSERT_EQUAL_FATAL(mbox_get("alice", "INBOX", &inbox), 0);
    CU_ASSERT_EQUAL_FATAL(mbox_get("alice", "Sent", &sent), 0);

    CU_ASSERT_EQUAL(do_copy("alice", "INBOX", inbox.uidvalidity, 1, 3, "Sent", 0, &o), 0);
    CU_ASSERT_EQUAL(o.result, STORE_OK);
    CU_ASSERT_EQUAL(o.uidvalidity, sent.uidvalidity);
    CU_ASSERT_EQUAL_FATAL(o.n_uids, 3);
    for (uint32_t i = 0; i < 3; i++) {
        CU_ASSERT_EQUAL(o.src_uids[i], i + 1);
        CU_ASSERT_EQUAL(o.dst_uids[i], i + 1);
    }
    store_outcome_clear(&o);
    CU_ASSERT_EQUAL(msg_get("alice", "INBOX", 1, &m1), 0);
    CU_ASSERT_EQUAL(msg_get("alice", "Sent", 1, &s1), 0);
    CU_ASSERT_EQUAL(m1.blob_id, s1.blob_id); /* shared */
    CU_ASSERT_EQUAL(m1.flags, s1.flags);
    CU_ASSERT_EQUAL(m1.internal_date, s1.internal_date);
    CU_ASSERT_STRING_EQUAL(msg_keywords("alice", "Sent", 3), "Work New");
    CU_ASSERT_EQUAL(mbox_get("alice", "Sent", &sent), 0);
    CU_ASSERT_EQUAL(sent.messages, 3);
    CU_ASSERT_EQUAL(sent.deleted, 1);

    /* move uid 2 INBOX -> Sent: Sent gets uid 4, INBOX loses 2 */
    CU_ASSERT_EQUAL(do_copy("alice", "INBOX", inbox.uidvalidity, 2, 2, "Sent", 1, &o), 0);
    CU_ASSERT_EQUAL_FATAL(o.n_uids, 1);
    CU_ASSERT_EQUAL(o.src_uids[0], 2);
    CU_ASSERT_EQUAL(o.dst_uids[0], 4);
    store_outcome_clear(&o);
    uint32_t uids[8];
    CU_ASSERT_EQUAL(mbox_uids("alice", "INBOX", uids, 8), 2);
    CU_ASSERT(uids[0] == 1 && uids[1] == 3);
    CU_ASSERT_EQUAL(mbox_uids("alice", "Sent", uids, 8), 4);
    CU_ASSERT_EQUAL(uids[3], 4);

    /* copy into a missing mailbox: ENOENT (TRYCREATE), nothing changes */
    CU_ASSERT_EQUAL(do_copy("alice", "INBOX", inbox.uidvalidity, 1, 3, "Nope", 0, &o), 0);
    CU_ASSERT_EQUAL(o.result, STORE_ENOENT);
    CU_ASSERT_EQUAL(o.n_uids, 0);
    store_outcome_clear(&o);

    /* expunge: only \Deleted (uid 3) goes; its blob stays (Sent has a copy) */
    struct store_msg m3;
    CU_ASSERT_EQUAL(msg_get("alice", "INBOX", 3, &m3), 0);
    struct rec_watch w = {.w.on_change = on_change};
    store_watch(st, inbox.id, &w.w);
    CU_ASSERT_EQUAL(do_expunge("alice", "INBOX", inbox.uidvalidity, 1, 0xffffffff, 1), STORE_OK);
    CU_ASSERT_EQUAL(w.n_calls, 1);
    CU_ASSERT_EQUAL(w.last_kind, STORE_CH_EXPUNGE);
    CU_ASSERT_EQUAL(w.last_n, 1);
    CU_ASSERT_EQUAL(w.last_uids[0], 3);
    store_unwatch(st, &w.w);
    CU_ASSERT_EQUAL(mbox_uids("alice", "INBOX", uids, 8), 1);
    CU_ASSERT(blob_exists(m3.blob_id));
    CU_ASSERT_EQUAL(mbox_get("alice", "INBOX", &inbox), 0);
    CU_ASSERT_EQUAL(inbox.messages, 1);
    CU_ASSERT_EQUAL(inbox.deleted, 0);
    CU_ASSERT_EQUAL(inbox.size, strlen(M1));
    CU_ASSERT_EQUAL(inbox.highestmodseq, idx);

    /* expunge Sent's uid 3 (the last reference) without require_deleted */
    CU_ASSERT_EQUAL(do_expunge("alice", "Sent", sent.uidvalidity, 3, 3, 0), STORE_OK);
    CU_ASSERT(!blob_exists(m3.blob_id));
    MDB_txn *t = store_rtxn_begin(st);
    struct store_user u;
    CU_ASSERT_EQUAL(store_user_get(st, t, "alice", &u), 0);
    CU_ASSERT_EQUAL(u.used_messages, 4); /* INBOX 1 + Sent 1,2,4 */
    CU_ASSERT_EQUAL(u.used_bytes, strlen(M1) * 2 + strlen(M2) * 2);
    store_rtxn_end(t);
}

static int collect_names(const struct store_mailbox *mb, void *arg)
{
    char *buf = arg;
    strcat(buf, mb->name);
    strcat(buf, ",");
    return 0;
}

static void test_rename_delete(void)
{
    char names[512] = "";
    CU_ASSERT_EQUAL(do_mbox('c', "alice", "a", NULL), STORE_OK);
    CU_ASSERT_EQUAL(do_mbox('c', "alice", "a/b", NULL), STORE_OK);
    CU_ASSERT_EQUAL(do_mbox('c', "alice", "a/b/c", NULL), STORE_OK);
    CU_ASSERT_EQUAL(do_mbox('c', "alice", "ab", NULL), STORE_OK);
    CU_ASSERT_EQUAL(do_mbox('c', "alice", "a", NULL), STORE_EEXIST);
    struct store_mailbox a, ab, x;
    CU_ASSERT_EQUAL(mbox_get("alice", "a/b", &ab), 0);
    struct rec_watch w = {.w.on_change = on_change};
    store_watch(st, ab.id, &w.w);

    CU_ASSERT_EQUAL(do_mbox('r', "alice", "a", "Sent"), STORE_EEXIST);
    CU_ASSERT_EQUAL(do_mbox('r', "alice", "a", "a/z"), STORE_EINVAL);
    CU_ASSERT_EQUAL(do_mbox('r', "alice", "zz", "q"), STORE_ENOENT);
    CU_ASSERT_EQUAL(do_mbox('r', "alice", "a", "x"), STORE_OK);
    CU_ASSERT_EQUAL(w.n_calls, 1);
    CU_ASSERT_EQUAL(w.last_kind, STORE_CH_GONE);
    store_unwatch(st, &w.w);
    CU_ASSERT_EQUAL(mbox_get("alice", "a", &a), STORE_ENOENT);
    CU_ASSERT_EQUAL(mbox_get("alice", "x/b", &x), 0);
    CU_ASSERT_EQUAL(x.id, ab.id); /* same mailbox, new name */
    CU_ASSERT_EQUAL(x.uidvalidity, ab.uidvalidity);
    MDB_txn *t = store_rtxn_begin(st);
    CU_ASSERT_EQUAL(store_mailbox_foreach(st, t, user_id("alice"), collect_names, names), 0);
    store_rtxn_end(t);
    CU_ASSERT_STRING_EQUAL(names, "INBOX,Sent,ab,x,x/b,x/b/c,");

    /* RENAME INBOX: messages move to a new mailbox, uids 1..n; INBOX empty */
    struct store_mailbox inbox, old;
    struct store_outcome o = {0};
    CU_ASSERT_EQUAL(do_append("alice", "INBOX", M2, 0, NULL, 0, &o), 0);
    CU_ASSERT_EQUAL(mbox_get("alice", "INBOX", &inbox), 0);
    CU_ASSERT_EQUAL(inbox.messages, 2);
    uint32_t uids[8];
    CU_ASSERT_EQUAL(mbox_uids("alice", "INBOX", uids, 8), 2);
    CU_ASSERT(uids[0] == 1 && uids[1] == 4);
    store_watch(st, inbox.id, &w.w);
    w.n_calls = 0;
    CU_ASSERT_EQUAL(do_mbox('r', "alice", "INBOX", "Old"), STORE_OK);
    CU_ASSERT_EQUAL(w.n_calls, 1);
    CU_ASSERT_EQUAL(w.last_kind, STORE_CH_EXPUNGE);
    CU_ASSERT_EQUAL(w.last_n, 2);
    store_unwatch(st, &w.w);
    struct store_mailbox inbox2;
    CU_ASSERT_EQUAL(mbox_get("alice", "INBOX", &inbox2), 0);
    CU_ASSERT_EQUAL(inbox2.id, inbox.id);
    CU_ASSERT_EQUAL(inbox2.messages, 0);
    CU_ASSERT_EQUAL(inbox2.size, 0);
    CU_ASSERT_EQUAL(inbox2.uidnext, inbox.uidnext);
    CU_ASSERT_EQUAL(mbox_uids("alice", "INBOX", uids, 8), 0);
    CU_ASSERT_EQUAL(mbox_get("alice", "Old", &old), 0);
    CU_ASSERT_EQUAL(old.messages, 2);
    CU_ASSERT_EQUAL(old.uidnext, 3);
    CU_ASSERT(old.uidvalidity > inbox.uidvalidity);
    CU_ASSERT_EQUAL(mbox_uids("alice", "Old", uids, 8), 2);
    CU_ASSERT(uids[0] == 1 && uids[1] == 2);
    struct store_msg m;
    CU_ASSERT_EQUAL(msg_get("alice", "Old", 2, &m), 0);
    CU_ASSERT_EQUAL(m.size, strlen(M2));

    /* DELETE: INBOX refused; x deleted (children stay), recreate -> bigger uidvalidity */
    CU_ASSERT_EQUAL(do_mbox('d', "alice", "INBOX", NULL), STORE_EINVAL);
    struct store_mailbox xm, xm2, xb;
    CU_ASSERT_EQUAL(mbox_get("alice", "x", &xm), 0);
    CU_ASSERT_EQUAL(do_mbox('d', "alice", "x", NULL), STORE_OK);
    CU_ASSERT_EQUAL(mbox_get("alice", "x", &xm2), STORE_ENOENT);
    CU_ASSERT_EQUAL(mbox_get("alice", "x/b", &xb), 0);
    CU_ASSERT_EQUAL(do_mbox('d', "alice", "x", NULL), STORE_ENOENT);
    CU_ASSERT_EQUAL(do_mbox('c', "alice", "x", NULL), STORE_OK);
    CU_ASSERT_EQUAL(mbox_get("alice", "x", &xm2), 0);
    CU_ASSERT(xm2.uidvalidity > xm.uidvalidity);
    CU_ASSERT(xm2.id != xm.id);

    /* delete a mailbox with messages frees their blobs */
    CU_ASSERT_EQUAL(msg_get("alice", "Old", 2, &m), 0);
    CU_ASSERT(blob_exists(m.blob_id));
    CU_ASSERT_EQUAL(do_mbox('d', "alice", "Old", NULL), STORE_OK);
    CU_ASSERT(!blob_exists(m.blob_id));
}

static int collect_subs(const char *name, void *arg)
{
    strcat((char *)arg, name);
    strcat((char *)arg, ",");
    return 0;
}

static void test_subscribe(void)
{
    char names[256] = "";
    uint64_t uid = user_id("alice");
    CU_ASSERT_EQUAL(do_mbox('s', "alice", "Sent", NULL), STORE_OK);
    CU_ASSERT_EQUAL(do_mbox('s', "alice", "NotThere", NULL), STORE_OK);
    CU_ASSERT_EQUAL(do_mbox('s', "alice", "INBOX", NULL), STORE_OK);
    CU_ASSERT_EQUAL(do_mbox('u', "alice", "NotThere", NULL), STORE_OK);
    CU_ASSERT_EQUAL(do_mbox('u', "alice", "NeverWas", NULL), STORE_OK);
    MDB_txn *t = store_rtxn_begin(st);
    CU_ASSERT(store_subs_has(st, t, uid, "Sent"));
    CU_ASSERT(!store_subs_has(st, t, uid, "NotThere"));
    CU_ASSERT_EQUAL(store_subs_foreach(st, t, uid, collect_subs, names), 0);
    store_rtxn_end(t);
    CU_ASSERT_STRING_EQUAL(names, "INBOX,Sent,");
}

static void test_quota_deliver(void)
{
    struct store_outcome o = {0};
    CU_ASSERT_EQUAL(do_user_create("bob", 0, 2), STORE_OK);
    CU_ASSERT_EQUAL(do_append("bob", "INBOX", M1, 0, NULL, 0, &o), 0);
    CU_ASSERT_EQUAL(o.result, STORE_OK);
    CU_ASSERT_EQUAL(do_append("bob", "INBOX", M1, 0, NULL, 0, &o), 0);
    CU_ASSERT_EQUAL(o.result, STORE_OK);
    CU_ASSERT_EQUAL(do_append("bob", "INBOX", M1, 0, NULL, 0, &o), 0);
    CU_ASSERT_EQUAL(o.result, STORE_EQUOTA);
    CU_ASSERT_EQUAL(o.uid, 0);
    struct store_mailbox mb;
    CU_ASSERT_EQUAL(mbox_get("bob", "INBOX", &mb), 0);
    CU_ASSERT_EQUAL(mb.messages, 2);
    CU_ASSERT_EQUAL(mb.uidnext, 3);
    /* copy over quota refused too */
    CU_ASSERT_EQUAL(do_copy("bob", "INBOX", mb.uidvalidity, 1, 2, "Sent", 0, &o), 0);
    CU_ASSERT_EQUAL(o.result, STORE_EQUOTA);
    store_outcome_clear(&o);
    /* byte quota on carol */
    CU_ASSERT_EQUAL(do_user_create("carol", strlen(M1) + 1, 0), STORE_OK);
    CU_ASSERT_EQUAL(do_append("carol", "INBOX", M1, 0, NULL, 0, &o), 0);
    CU_ASSERT_EQUAL(o.result, STORE_OK);
    CU_ASSERT_EQUAL(do_append("carol", "INBOX", M1, 0, NULL, 0, &o), 0);
    CU_ASSERT_EQUAL(o.result, STORE_EQUOTA);

    /* QuotaSet raises bob's limit */
    Coffer__Entry e = COFFER__ENTRY__INIT;
    Coffer__QuotaSet q = COFFER__QUOTA_SET__INIT;
    q.username = "bob";
    q.has_messages = 1;
    q.messages = 10;
    e.op_case = COFFER__ENTRY__OP_QUOTA_SET;
    e.quota_set = &q;
    CU_ASSERT_EQUAL(apply_e(&e, &o), 0);
    CU_ASSERT_EQUAL(o.result, STORE_OK);
    CU_ASSERT_EQUAL(do_append("bob", "INBOX", M1, 0, NULL, 0, &o), 0);
    CU_ASSERT_EQUAL(o.result, STORE_OK);
    CU_ASSERT_EQUAL(o.uid, 3);

    /* disable carol with refuse_delivery */
    Coffer__Entry e2 = COFFER__ENTRY__INIT;
    Coffer__UserSetDisabled dis = COFFER__USER_SET_DISABLED__INIT;
    dis.username = "carol";
    dis.disabled = 1;
    dis.reason = "abuse";
    dis.has_refuse_delivery = 1;
    dis.refuse_delivery = 1;
    e2.op_case = COFFER__ENTRY__OP_USER_SET_DISABLED;
    e2.user_set_disabled = &dis;
    CU_ASSERT_EQUAL(apply_e(&e2, &o), 0);
    MDB_txn *t = store_rtxn_begin(st);
    struct store_user u;
    CU_ASSERT_EQUAL(store_user_get(st, t, "carol", &u), 0);
    CU_ASSERT(u.disabled && u.refuse_delivery);
    CU_ASSERT_STRING_EQUAL(u.disabled_reason, "abuse");
    store_rtxn_end(t);

    /* Deliver to alice, carol (disabled), nobody, bob: one blob shared */
    Coffer__Entry e3 = COFFER__ENTRY__INIT;
    Coffer__Deliver d = COFFER__DELIVER__INIT;
    Coffer__MessageCache c = COFFER__MESSAGE_CACHE__INIT;
    char *users[] = {"alice", "carol", "nobody", "bob"};
    d.usernames = users;
    d.n_usernames = 4;
    d.message.data = (uint8_t *)M3;
    d.message.len = strlen(M3);
    d.cache = &c;
    e3.op_case = COFFER__ENTRY__OP_DELIVER;
    e3.deliver = &d;
    CU_ASSERT_EQUAL(apply_e(&e3, &o), 0);
    CU_ASSERT_EQUAL(o.result, STORE_OK);
    CU_ASSERT_EQUAL_FATAL(o.n_rcpt, 4);
    CU_ASSERT_EQUAL(o.rcpt_results[0], STORE_OK);
    CU_ASSERT_EQUAL(o.rcpt_results[1], STORE_EDISABLED);
    CU_ASSERT_EQUAL(o.rcpt_results[2], STORE_ENOENT);
    CU_ASSERT_EQUAL(o.rcpt_results[3], STORE_OK);
    store_outcome_clear(&o);
    struct store_msg ma, mbm;
    CU_ASSERT_EQUAL(msg_get("alice", "INBOX", 5, &ma), 0);
    CU_ASSERT_EQUAL(msg_get("bob", "INBOX", 4, &mbm), 0);
    CU_ASSERT_EQUAL(ma.blob_id, mbm.blob_id);

    /* UserDelete bob: user, mailboxes gone; shared blob survives via alice */
    Coffer__Entry e4 = COFFER__ENTRY__INIT;
    Coffer__UserDelete ud = COFFER__USER_DELETE__INIT;
    ud.username = "bob";
    e4.op_case = COFFER__ENTRY__OP_USER_DELETE;
    e4.user_delete = &ud;
    struct store_msg b1;
    CU_ASSERT_EQUAL(msg_get("bob", "INBOX", 1, &b1), 0);
    CU_ASSERT_EQUAL(apply_e(&e4, &o), 0);
    CU_ASSERT_EQUAL(o.result, STORE_OK);
    CU_ASSERT_EQUAL(user_id("bob"), 0);
    CU_ASSERT(blob_exists(ma.blob_id));
    CU_ASSERT(!blob_exists(b1.blob_id));
}

static void test_refused_frames(void)
{
    Coffer__Entry e = COFFER__ENTRY__INIT;
    Coffer__Noop n = COFFER__NOOP__INIT;
    void *buf;
    size_t len;
    char before[65], after[65];
    e.leader_time_ms = T0;
    e.op_case = COFFER__ENTRY__OP_NOOP;
    e.noop = &n;
    CU_ASSERT_EQUAL_FATAL(propose_frame(&e, &buf, &len), 0);
    CU_ASSERT_EQUAL(store_digest(st, before), 0);
    uint64_t applied = store_applied_index(st);
    uint8_t *b = buf;
    b[4] = 2; /* unknown version */
    CU_ASSERT_EQUAL(store_apply(st, applied + 1, buf, len, NULL), -1);
    b[4] = 1;
    b[0] ^= 0xff; /* bad magic */
    CU_ASSERT_EQUAL(store_apply(st, applied + 1, buf, len, NULL), -1);
    b[0] ^= 0xff;
    CU_ASSERT_EQUAL(store_apply(st, applied + 1, buf, 5, NULL), -1); /* short */
    free(buf);
    /* op not set */
    Coffer__Entry e2 = COFFER__ENTRY__INIT;
    e2.leader_time_ms = T0;
    CU_ASSERT_EQUAL_FATAL(propose_frame(&e2, &buf, &len), 0);
    CU_ASSERT_EQUAL(store_apply(st, applied + 1, buf, len, NULL), -1);
    free(buf);
    CU_ASSERT_EQUAL(store_applied_index(st), applied);
    CU_ASSERT_EQUAL(store_digest(st, after), 0);
    CU_ASSERT_STRING_EQUAL(before, after);
    /* a valid noop then applies */
    e.leader_time_ms = 0;
    CU_ASSERT_EQUAL(apply_e(&e, NULL), 0);
    CU_ASSERT_EQUAL(store_applied_index(st), idx);
}

static void test_limits(void)
{
    char longname[STORE_MAX_MAILBOX_NAME + 2];
    memset(longname, 'n', sizeof(longname) - 1);
    longname[sizeof(longname) - 1] = 0;
    CU_ASSERT_EQUAL(do_mbox('c', "alice", longname, NULL), STORE_EINVAL);
    longname[STORE_MAX_MAILBOX_NAME] = 0;
    CU_ASSERT_EQUAL(do_mbox('c', "alice", longname, NULL), STORE_OK);
    struct store_mailbox mb;
    CU_ASSERT_EQUAL(mbox_get("alice", longname, &mb), 0);
    /* a rename that would make a child too long is refused */
    CU_ASSERT_EQUAL(do_mbox('c', "alice", "short/kid", NULL), STORE_OK);
    longname[STORE_MAX_MAILBOX_NAME - 2] = 0;
    CU_ASSERT_EQUAL(do_mbox('r', "alice", "short", longname), STORE_ENOENT); /* no "short" */
    CU_ASSERT_EQUAL(do_mbox('c', "alice", "short", NULL), STORE_OK);
    CU_ASSERT_EQUAL(do_mbox('r', "alice", "short", longname), STORE_EINVAL);
    CU_ASSERT_EQUAL(mbox_get("alice", "short/kid", &mb), 0);
}

static int init_suite(void)
{
    char err[256];
    cf_log_init("test_store", CF_LOG_CRIT, 0);
    snprintf(dir, sizeof dir, "/tmp/coffer-store-XXXXXX");
    if (!mkdtemp(dir)) return -1;
    if (store_open(dir, 64ull << 20, &st, err, sizeof err)) {
        fprintf(stderr, "store_open: %s\n", err);
        return -1;
    }
    return 0;
}

static int clean_suite(void)
{
    store_close(&st);
    rm_dir(dir);
    return 0;
}

int main(void)
{
    if (CU_initialize_registry() != CUE_SUCCESS) return 1;
    CU_pSuite s = CU_add_suite("store", init_suite, clean_suite);
    CU_add_test(s, "group init + user create", test_setup_user);
    CU_add_test(s, "append", test_append);
    CU_add_test(s, "store flags", test_store_flags);
    CU_add_test(s, "copy/move/expunge", test_copy_move_expunge);
    CU_add_test(s, "rename/delete", test_rename_delete);
    CU_add_test(s, "subscribe", test_subscribe);
    CU_add_test(s, "quota/deliver/user delete", test_quota_deliver);
    CU_add_test(s, "refused frames", test_refused_frames);
    CU_add_test(s, "name limits", test_limits);
    CU_basic_set_mode(CU_BRM_VERBOSE);
    CU_basic_run_tests();
    int failures = (int)CU_get_number_of_failures();
    CU_cleanup_registry();
    return failures != 0;
}
