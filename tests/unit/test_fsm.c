/* Unit tests for the FSM's determinism and idempotency (storenode/fsm.c):
 * (a) one sequence applied once to store A and twice (replays) to store B
 *     gives equal digests and applied index;
 * (b) reopening a store and re-applying 1..n changes nothing;
 * (c) the same request_id at two indexes applies once, same outcome;
 * (d) truncated/garbage entries are refused (-1) with state unchanged;
 * (e) a content-keyed APPEND dedups retries only while the first copy is
 *     recent and present. */
#include <CUnit/Basic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cf_log.h"
#include "coffer_raft.pb-c.h"
#include "propose.h"
#include "store.h"

#define MAX_ENTRIES 64

struct frame {
    void *buf;
    size_t len;
};
static struct frame seq[MAX_ENTRIES];
static size_t n_seq;
static char dir_a[64], dir_b[64];

static void rm_dir(const char *d)
{
    char p[128];
    snprintf(p, sizeof p, "%s/data.mdb", d);
    unlink(p);
    snprintf(p, sizeof p, "%s/lock.mdb", d);
    unlink(p);
    rmdir(d);
}

static struct store *open_store(const char *d)
{
    char err[256];
    struct store *st = NULL;
    if (store_open(d, 64ull << 20, &st, err, sizeof err)) fprintf(stderr, "store_open: %s\n", err);
    return st;
}

static void add(Coffer__Entry *e, int with_rid)
{
    uint8_t rid[16];
    e->leader_time_ms = 1700000000000ull + n_seq * 1500;
    if (with_rid) {
        memset(rid, 0, 16);
        rid[0] = 0xAB;
        rid[15] = (uint8_t)n_seq;
        e->has_request_id = 1;
        e->request_id.data = rid;
        e->request_id.len = 16;
    }
    CU_ASSERT_FATAL(n_seq < MAX_ENTRIES);
    CU_ASSERT_EQUAL_FATAL(propose_frame(e, &seq[n_seq].buf, &seq[n_seq].len), 0);
    n_seq++;
}

static Coffer__MessageCache cache = COFFER__MESSAGE_CACHE__INIT;

static void add_append(const char *user, const char *mbox, const char *msg, uint32_t flags,
                       char **kws, size_t nkw)
{
    Coffer__Entry e = COFFER__ENTRY__INIT;
    Coffer__Append a = COFFER__APPEND__INIT;
    a.username = (char *)user;
    a.mailbox = (char *)mbox;
    a.message.data = (uint8_t *)msg;
    a.message.len = strlen(msg);
    a.has_flags = 1;
    a.flags = flags;
    a.keywords = kws;
    a.n_keywords = nkw;
    a.cache = &cache;
    e.op_case = COFFER__ENTRY__OP_APPEND;
    e.append = &a;
    add(&e, 1);
}

/* A representative sequence touching every kind of op. */
static void build_sequence(void)
{
    Coffer__Entry e;
    cache.envelope.data = (uint8_t *)"(env)";
    cache.envelope.len = 5;
    cache.parts.data = (uint8_t *)"\x01\x02";
    cache.parts.len = 2;

    Coffer__GroupInit g = COFFER__GROUP_INIT__INIT;
    uint8_t gid[16] = {9, 9, 9};
    g.group_id.data = gid;
    g.group_id.len = 16;
    e = (Coffer__Entry)COFFER__ENTRY__INIT;
    e.op_case = COFFER__ENTRY__OP_GROUP_INIT;
    e.group_init = &g;
    add(&e, 0);

    const char *users[] = {"ann", "ben"};
    for (int i = 0; i < 2; i++) {
        Coffer__UserCreate uc = COFFER__USER_CREATE__INIT;
        Coffer__MailboxCreate t = COFFER__MAILBOX_CREATE__INIT, *mbs[1] = {&t};
        t.username = (char *)users[i];
        t.name = "Trash";
        t.has_special_use = 1;
        t.special_use = 64;
        uc.username = (char *)users[i];
        uc.password_hash = "$scrypt$x";
        uc.initial_mailboxes = mbs;
        uc.n_initial_mailboxes = 1;
        e = (Coffer__Entry)COFFER__ENTRY__INIT;
        e.op_case = COFFER__ENTRY__OP_USER_CREATE;
        e.user_create = &uc;
        add(&e, 1);
    }
    char *kw[] = {"$Junk", "todo"};
    add_append("ann", "INBOX", "A: 1\r\n\r\nbody one\r\n", 0, kw, 2);
    add_append("ann", "INBOX", "A: 2\r\n\r\nbody two\r\n", 1, NULL, 0);
    add_append("ann", "Trash", "A: 3\r\n\r\nbody three\r\n", 8, kw, 1);
    add_append("ann", "Missing", "x\r\n", 0, NULL, 0); /* refused: ENOENT */

    /* STORE on INBOX 1:* (uidvalidity is deterministic: leader time of the
     * UserCreate entry for ann = index 2 -> t/1000) */
    Coffer__StoreFlags sf = COFFER__STORE_FLAGS__INIT;
    Coffer__UidRange r = COFFER__UID_RANGE__INIT, *rs[1] = {&r};
    r.lo = 1;
    r.hi = 0xffffffff;
    sf.username = "ann";
    sf.mailbox = "INBOX";
    sf.uidvalidity = (uint32_t)((1700000000000ull + 1 * 1500) / 1000);
    sf.uids = rs;
    sf.n_uids = 1;
    sf.mode = COFFER__FLAG_MODE__FLAGS_ADD;
    sf.has_flags = 1;
    sf.flags = 8 | 4;
    e = (Coffer__Entry)COFFER__ENTRY__INIT;
    e.op_case = COFFER__ENTRY__OP_STORE_FLAGS;
    e.store_flags = &sf;
    add(&e, 0);

    Coffer__CopyMessages cp = COFFER__COPY_MESSAGES__INIT;
    cp.username = "ann";
    cp.src_mailbox = "INBOX";
    cp.src_uidvalidity = sf.uidvalidity;
    cp.uids = rs;
    cp.n_uids = 1;
    cp.dst_username = "ben";
    cp.dst_mailbox = "INBOX";
    e = (Coffer__Entry)COFFER__ENTRY__INIT;
    e.op_case = COFFER__ENTRY__OP_COPY;
    e.copy = &cp;
    add(&e, 1);

    Coffer__Expunge x = COFFER__EXPUNGE__INIT;
    x.username = "ann";
    x.mailbox = "INBOX";
    x.uidvalidity = sf.uidvalidity;
    x.uids = rs;
    x.n_uids = 1;
    e = (Coffer__Entry)COFFER__ENTRY__INIT;
    e.op_case = COFFER__ENTRY__OP_EXPUNGE;
    e.expunge = &x;
    add(&e, 1);

    Coffer__MailboxCreate mc = COFFER__MAILBOX_CREATE__INIT;
    mc.username = "ann";
    mc.name = "Lists/c";
    e = (Coffer__Entry)COFFER__ENTRY__INIT;
    e.op_case = COFFER__ENTRY__OP_MAILBOX_CREATE;
    e.mailbox_create = &mc;
    add(&e, 1);

    Coffer__MailboxRename mr = COFFER__MAILBOX_RENAME__INIT;
    mr.username = "ann";
    mr.old_name = "Lists";
    mr.new_name = "L2";
    e = (Coffer__Entry)COFFER__ENTRY__INIT;
    e.op_case = COFFER__ENTRY__OP_MAILBOX_RENAME;
    e.mailbox_rename = &mr;
    add(&e, 0); /* ENOENT: no "Lists" itself */
    mr.old_name = "Lists/c";
    add(&e, 0);
    mr.old_name = "INBOX";
    mr.new_name = "OldInbox";
    add(&e, 1);

    Coffer__Subscribe sub = COFFER__SUBSCRIBE__INIT;
    sub.username = "ann";
    sub.name = "L2";
    sub.subscribed = 1;
    e = (Coffer__Entry)COFFER__ENTRY__INIT;
    e.op_case = COFFER__ENTRY__OP_SUBSCRIBE;
    e.subscribe = &sub;
    add(&e, 0);

    Coffer__AclSet acl = COFFER__ACL_SET__INIT;
    acl.username = "ann";
    acl.name = "Trash";
    acl.identifier = "ben";
    acl.rights = "lr";
    e = (Coffer__Entry)COFFER__ENTRY__INIT;
    e.op_case = COFFER__ENTRY__OP_ACL_SET;
    e.acl_set = &acl;
    add(&e, 0);

    Coffer__Deliver d = COFFER__DELIVER__INIT;
    char *rcpts[] = {"ann", "ben", "zed"};
    d.usernames = rcpts;
    d.n_usernames = 3;
    d.message.data = (uint8_t *)"D: 1\r\n\r\nhi\r\n";
    d.message.len = 12;
    d.cache = &cache;
    e = (Coffer__Entry)COFFER__ENTRY__INIT;
    e.op_case = COFFER__ENTRY__OP_DELIVER;
    e.deliver = &d;
    add(&e, 1);

    Coffer__MailboxDelete md = COFFER__MAILBOX_DELETE__INIT;
    md.username = "ann";
    md.name = "OldInbox";
    e = (Coffer__Entry)COFFER__ENTRY__INIT;
    e.op_case = COFFER__ENTRY__OP_MAILBOX_DELETE;
    e.mailbox_delete = &md;
    add(&e, 0);

    Coffer__Checkpoint ck = COFFER__CHECKPOINT__INIT;
    ck.checkpoint_id = 7;
    e = (Coffer__Entry)COFFER__ENTRY__INIT;
    e.op_case = COFFER__ENTRY__OP_CHECKPOINT;
    e.checkpoint = &ck;
    add(&e, 0);
}

static uint64_t inbox_messages(struct store *st, const char *user)
{
    MDB_txn *t = store_rtxn_begin(st);
    struct store_user u;
    struct store_mailbox mb;
    uint64_t n = (uint64_t)-1;
    if (store_user_get(st, t, user, &u) == 0 && store_mailbox_get(st, t, u.id, "INBOX", &mb) == 0)
        n = mb.messages;
    store_rtxn_end(t);
    return n;
}

static void test_replay_same_digest(void)
{
    struct store *a = open_store(dir_a), *b = open_store(dir_b);
    char da[65], db[65];
    CU_ASSERT_PTR_NOT_NULL_FATAL(a);
    CU_ASSERT_PTR_NOT_NULL_FATAL(b);
    CU_ASSERT_EQUAL(store_digest(a, da), 0);
    CU_ASSERT_EQUAL(store_digest(b, db), 0);
    CU_ASSERT_STRING_EQUAL(da, db);
    for (size_t i = 0; i < n_seq; i++)
        CU_ASSERT_EQUAL(store_apply(a, i + 1, seq[i].buf, seq[i].len, NULL), 0);
    for (size_t i = 0; i < n_seq; i++) {
        struct store_outcome o1 = {0}, o2 = {0};
        CU_ASSERT_EQUAL(store_apply(b, i + 1, seq[i].buf, seq[i].len, &o1), 0);
        CU_ASSERT_EQUAL(store_apply(b, i + 1, seq[i].buf, seq[i].len, &o2), 0); /* replay */
        store_outcome_clear(&o1);
        store_outcome_clear(&o2);
    }
    CU_ASSERT_EQUAL(store_applied_index(a), n_seq);
    CU_ASSERT_EQUAL(store_applied_index(b), n_seq);
    CU_ASSERT_EQUAL(store_digest(a, da), 0);
    CU_ASSERT_EQUAL(store_digest(b, db), 0);
    CU_ASSERT_STRING_EQUAL(da, db);
    /* the sequence did something: ben got a copy of ann's 2 + a delivery */
    CU_ASSERT_EQUAL(inbox_messages(a, "ben"), 3);
    CU_ASSERT_EQUAL(inbox_messages(a, "ann"), 1); /* delivered after RENAME INBOX */
    store_close(&a);
    store_close(&b);
}

static void test_reopen_reapply(void)
{
    struct store *b = open_store(dir_b);
    char d1[65], d2[65];
    CU_ASSERT_PTR_NOT_NULL_FATAL(b);
    CU_ASSERT_EQUAL(store_applied_index(b), n_seq);
    uint8_t gid[16];
    store_group_id(b, gid);
    CU_ASSERT_EQUAL(gid[0], 9);
    CU_ASSERT_EQUAL(store_digest(b, d1), 0);
    uint64_t ben = inbox_messages(b, "ben");
    for (size_t i = 0; i < n_seq; i++)
        CU_ASSERT_EQUAL(store_apply(b, i + 1, seq[i].buf, seq[i].len, NULL), 0);
    CU_ASSERT_EQUAL(store_applied_index(b), n_seq);
    CU_ASSERT_EQUAL(inbox_messages(b, "ben"), ben);
    CU_ASSERT_EQUAL(store_digest(b, d2), 0);
    CU_ASSERT_STRING_EQUAL(d1, d2);
    store_close(&b);
}

static void test_same_request_id(void)
{
    struct store *b = open_store(dir_b);
    CU_ASSERT_PTR_NOT_NULL_FATAL(b);
    Coffer__Entry e = COFFER__ENTRY__INIT;
    Coffer__Append a = COFFER__APPEND__INIT;
    uint8_t rid[16] = "retry-me-please";
    a.username = "ben";
    a.mailbox = "INBOX";
    a.message.data = (uint8_t *)"R: 1\r\n\r\nretry\r\n";
    a.message.len = 15;
    a.cache = &cache;
    e.op_case = COFFER__ENTRY__OP_APPEND;
    e.append = &a;
    e.leader_time_ms = 1800000000000ull;
    e.has_request_id = 1;
    e.request_id.data = rid;
    e.request_id.len = 16;
    void *buf;
    size_t len;
    CU_ASSERT_EQUAL_FATAL(propose_frame(&e, &buf, &len), 0);
    uint64_t base = store_applied_index(b), before = inbox_messages(b, "ben");

    /* a registered waiter gets the outcome too */
    struct store_outcome w = {0}, o1 = {0}, o2 = {0}, o3 = {0};
    store_register_waiter(b, rid, &w);
    CU_ASSERT_EQUAL(store_apply(b, base + 1, buf, len, &o1), 0);
    store_unregister_waiter(b, rid, &w);
    CU_ASSERT_EQUAL(o1.result, STORE_OK);
    CU_ASSERT(o1.uid > 0);
    CU_ASSERT_EQUAL(w.uid, o1.uid);
    CU_ASSERT_EQUAL(w.uidvalidity, o1.uidvalidity);
    CU_ASSERT_EQUAL(w.index, base + 1);

    /* the same request committed again at a later index (client retry) */
    CU_ASSERT_EQUAL(store_apply(b, base + 2, buf, len, &o2), 0);
    CU_ASSERT_EQUAL(o2.result, o1.result);
    CU_ASSERT_EQUAL(o2.uid, o1.uid);
    CU_ASSERT_EQUAL(o2.uidvalidity, o1.uidvalidity);
    CU_ASSERT_EQUAL(o2.index, base + 1);
    CU_ASSERT_EQUAL(store_applied_index(b), base + 2);
    CU_ASSERT_EQUAL(inbox_messages(b, "ben"), before + 1);
    /* and a replay of an old index reports the stored outcome */
    CU_ASSERT_EQUAL(store_apply(b, base + 1, buf, len, &o3), 0);
    CU_ASSERT_EQUAL(o3.uid, o1.uid);
    CU_ASSERT_EQUAL(inbox_messages(b, "ben"), before + 1);

    /* after the request window the key is forgotten: a late duplicate
     * applies again (deterministically, by index) */
    Coffer__Entry ne = COFFER__ENTRY__INIT;
    Coffer__Noop noop = COFFER__NOOP__INIT;
    void *nbuf;
    size_t nlen;
    ne.leader_time_ms = 1800000000000ull;
    ne.op_case = COFFER__ENTRY__OP_NOOP;
    ne.noop = &noop;
    CU_ASSERT_EQUAL_FATAL(propose_frame(&ne, &nbuf, &nlen), 0);
    uint64_t late = base + 2 + STORE_REQUEST_WINDOW;
    CU_ASSERT_EQUAL(store_apply(b, late, nbuf, nlen, NULL), 0);
    free(nbuf);
    struct store_outcome o4 = {0};
    CU_ASSERT_EQUAL(store_apply(b, late + 1, buf, len, &o4), 0);
    CU_ASSERT_EQUAL(o4.result, STORE_OK);
    CU_ASSERT_EQUAL(o4.uid, o1.uid + 1);
    CU_ASSERT_EQUAL(o4.index, late + 1);
    CU_ASSERT_EQUAL(inbox_messages(b, "ben"), before + 2);
    free(buf);
    store_close(&b);
}

/* An APPEND keyed by its content (Append.dedup_window_s): a retry within the
 * window while the first copy exists returns the first APPENDUID; after an
 * EXPUNGE, or after the window, the same key stores the message again. Two
 * proposers waiting on one key both get the outcome. */
static void apply_append_key(struct store *b, uint64_t index, uint64_t time_ms,
                             struct store_outcome *o)
{
    Coffer__Entry e = COFFER__ENTRY__INIT;
    Coffer__Append a = COFFER__APPEND__INIT;
    uint8_t rid[16] = "content-key-0001";
    a.username = "ben";
    a.mailbox = "INBOX";
    a.message.data = (uint8_t *)"Message-ID: <k@x>\r\n\r\nkeyed\r\n";
    a.message.len = strlen((char *)a.message.data);
    a.cache = &cache;
    a.has_dedup_window_s = 1;
    a.dedup_window_s = 300;
    e.op_case = COFFER__ENTRY__OP_APPEND;
    e.append = &a;
    e.leader_time_ms = time_ms;
    e.has_request_id = 1;
    e.request_id.data = rid;
    e.request_id.len = 16;
    void *buf;
    size_t len;
    CU_ASSERT_EQUAL_FATAL(propose_frame(&e, &buf, &len), 0);
    CU_ASSERT_EQUAL(store_apply(b, index, buf, len, o), 0);
    free(buf);
}

static void test_append_content_key(void)
{
    struct store *b = open_store(dir_b);
    CU_ASSERT_PTR_NOT_NULL_FATAL(b);
    uint8_t rid[16] = "content-key-0001";
    uint64_t idx = store_applied_index(b), before = inbox_messages(b, "ben");
    uint64_t t0 = 1900000000000ull;
    struct store_outcome w1 = {0}, w2 = {0}, o1 = {0}, o2 = {0}, o3 = {0}, o4 = {0};

    store_register_waiter(b, rid, &w1);
    store_register_waiter(b, rid, &w2);
    apply_append_key(b, ++idx, t0, &o1);
    store_unregister_waiter(b, rid, &w1);
    store_unregister_waiter(b, rid, &w2);
    CU_ASSERT_EQUAL(o1.result, STORE_OK);
    CU_ASSERT_EQUAL(w1.uid, o1.uid);
    CU_ASSERT_EQUAL(w2.uid, o1.uid);
    CU_ASSERT_EQUAL(inbox_messages(b, "ben"), before + 1);

    /* the retry, 10 s later at a later index: nothing new, same APPENDUID */
    apply_append_key(b, ++idx, t0 + 10000, &o2);
    CU_ASSERT_EQUAL(o2.result, STORE_OK);
    CU_ASSERT_EQUAL(o2.uid, o1.uid);
    CU_ASSERT_EQUAL(o2.uidvalidity, o1.uidvalidity);
    CU_ASSERT_EQUAL(inbox_messages(b, "ben"), before + 1);

    /* expunge the first copy: the same message appended again is stored */
    Coffer__Entry e = COFFER__ENTRY__INIT;
    Coffer__Expunge x = COFFER__EXPUNGE__INIT;
    Coffer__UidRange r = COFFER__UID_RANGE__INIT, *rp = &r;
    r.lo = r.hi = o1.uid;
    x.username = "ben";
    x.mailbox = "INBOX";
    x.uidvalidity = o1.uidvalidity;
    x.uids = &rp;
    x.n_uids = 1;
    x.has_require_deleted = 1;
    x.require_deleted = 0;
    e.op_case = COFFER__ENTRY__OP_EXPUNGE;
    e.expunge = &x;
    e.leader_time_ms = t0 + 20000;
    void *buf;
    size_t len;
    CU_ASSERT_EQUAL_FATAL(propose_frame(&e, &buf, &len), 0);
    CU_ASSERT_EQUAL(store_apply(b, ++idx, buf, len, NULL), 0);
    free(buf);
    CU_ASSERT_EQUAL(inbox_messages(b, "ben"), before);
    apply_append_key(b, ++idx, t0 + 30000, &o3);
    CU_ASSERT_EQUAL(o3.result, STORE_OK);
    CU_ASSERT(o3.uid > o1.uid);
    CU_ASSERT_EQUAL(inbox_messages(b, "ben"), before + 1);

    /* past the window (300 s after o3) the key no longer matches */
    apply_append_key(b, ++idx, t0 + 30000 + 301000, &o4);
    CU_ASSERT_EQUAL(o4.result, STORE_OK);
    CU_ASSERT(o4.uid > o3.uid);
    CU_ASSERT_EQUAL(inbox_messages(b, "ben"), before + 2);
    store_close(&b);
}

static void test_garbage(void)
{
    struct store *b = open_store(dir_b);
    char d1[65], d2[65];
    CU_ASSERT_PTR_NOT_NULL_FATAL(b);
    CU_ASSERT_EQUAL(store_digest(b, d1), 0);
    uint64_t base = store_applied_index(b);
    /* truncated: a valid append frame cut in the middle of the protobuf */
    size_t big = 0;
    for (size_t i = 0; i < n_seq; i++)
        if (seq[i].len > seq[big].len) big = i;
    CU_ASSERT_EQUAL(store_apply(b, base + 1, seq[big].buf, seq[big].len / 2, NULL), -1);
    /* garbage after a valid header */
    uint8_t g[40];
    memcpy(g, seq[0].buf, 8);
    memset(g + 8, 0xff, sizeof g - 8);
    CU_ASSERT_EQUAL(store_apply(b, base + 1, g, sizeof g, NULL), -1);
    /* header only: empty Entry lacks required leader_time_ms */
    CU_ASSERT_EQUAL(store_apply(b, base + 1, g, 8, NULL), -1);
    CU_ASSERT_EQUAL(store_apply(b, base + 1, NULL, 0, NULL), -1);
    CU_ASSERT_EQUAL(store_applied_index(b), base);
    CU_ASSERT_EQUAL(store_digest(b, d2), 0);
    CU_ASSERT_STRING_EQUAL(d1, d2);
    store_close(&b);
}

static int init_suite(void)
{
    cf_log_init("test_fsm", CF_LOG_CRIT + 0, 0);
    snprintf(dir_a, sizeof dir_a, "/tmp/coffer-fsm-a-XXXXXX");
    snprintf(dir_b, sizeof dir_b, "/tmp/coffer-fsm-b-XXXXXX");
    if (!mkdtemp(dir_a) || !mkdtemp(dir_b)) return -1;
    return 0;
}

static int clean_suite(void)
{
    for (size_t i = 0; i < n_seq; i++)
        free(seq[i].buf);
    rm_dir(dir_a);
    rm_dir(dir_b);
    return 0;
}

int main(void)
{
    if (CU_initialize_registry() != CUE_SUCCESS) return 1;
    CU_pSuite s = CU_add_suite("fsm", init_suite, clean_suite);
    CU_add_test(s, "build sequence", build_sequence);
    CU_add_test(s, "replay gives same digest", test_replay_same_digest);
    CU_add_test(s, "reopen + re-apply is a no-op", test_reopen_reapply);
    CU_add_test(s, "same request id applies once", test_same_request_id);
    CU_add_test(s, "content-keyed APPEND: retry, expunge, window", test_append_content_key);
    CU_add_test(s, "garbage refused, state unchanged", test_garbage);
    CU_basic_set_mode(CU_BRM_VERBOSE);
    CU_basic_run_tests();
    int failures = (int)CU_get_number_of_failures();
    CU_cleanup_registry();
    return failures != 0;
}
