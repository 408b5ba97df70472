/* Unit tests for storenode/checkpoint.c: a checkpoint of a store with
 * several users and messages (written in small batches, from a read
 * transaction while the store keeps applying) opens as a store with the
 * same content digest and applied index; manifest and SHA-256 round trip;
 * one flipped byte is refused by verification; the manager writes a
 * checkpoint off the calling thread, verifies a local one and swaps it into
 * another store (store_replace), refuses a corrupt one (deleted) and waits
 * while a read transaction is open. */
#include <CUnit/Basic.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "cf_log.h"
#include "checkpoint.h"
#include "coffer_raft.pb-c.h"
#include "propose.h"
#include "store.h"

static const uint64_t T0 = 1700000000000ull;
static char root[64];

static void rm_rf(const char *d)
{
    char cmd[256];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", d);
    if (system(cmd) != 0) fprintf(stderr, "cannot remove %s\n", d);
}

static void apply_e(struct store *st, uint64_t *idx, Coffer__Entry *e)
{
    void *buf;
    size_t len;
    e->leader_time_ms = T0 + *idx * 1000;
    CU_ASSERT_EQUAL_FATAL(propose_frame(e, &buf, &len), 0);
    CU_ASSERT_EQUAL(store_apply(st, ++*idx, buf, len, NULL), 0);
    free(buf);
}

static void user(struct store *st, uint64_t *idx, const char *name)
{
    Coffer__Entry e = COFFER__ENTRY__INIT;
    Coffer__UserCreate uc = COFFER__USER_CREATE__INIT;
    Coffer__MailboxCreate inbox = COFFER__MAILBOX_CREATE__INIT;
    Coffer__MailboxCreate *mbs[1] = {&inbox};
    inbox.username = (char *)name;
    inbox.name = "INBOX";
    uc.username = (char *)name;
    uc.password_hash = "$scrypt$dummy";
    uc.initial_mailboxes = mbs;
    uc.n_initial_mailboxes = 1;
    e.op_case = COFFER__ENTRY__OP_USER_CREATE;
    e.user_create = &uc;
    apply_e(st, idx, &e);
}

static void append(struct store *st, uint64_t *idx, const char *name, size_t body)
{
    Coffer__Entry e = COFFER__ENTRY__INIT;
    Coffer__Append a = COFFER__APPEND__INIT;
    Coffer__MessageCache c = COFFER__MESSAGE_CACHE__INIT;
    char *msg = malloc(body + 64);
    int n = snprintf(msg, 64, "Subject: m%llu\r\n\r\n", (unsigned long long)*idx);
    memset(msg + n, 'a' + (int)(*idx % 26), body);
    c.envelope.data = (uint8_t *)"(NIL)";
    c.envelope.len = 5;
    c.bodystructure.data = (uint8_t *)"NIL";
    c.bodystructure.len = 3;
    c.body.data = (uint8_t *)"NIL";
    c.body.len = 3;
    a.username = (char *)name;
    a.mailbox = "INBOX";
    a.message.data = (uint8_t *)msg;
    a.message.len = (size_t)n + body;
    a.cache = &c;
    e.op_case = COFFER__ENTRY__OP_APPEND;
    e.append = &a;
    apply_e(st, idx, &e);
    free(msg);
}

static void group(struct store *st, uint64_t *idx)
{
    static uint8_t gid[16] = {9, 8, 7, 6, 5, 4, 3, 2, 1, 0, 1, 2, 3, 4, 5, 6};
    Coffer__Entry e = COFFER__ENTRY__INIT;
    Coffer__GroupInit gi = COFFER__GROUP_INIT__INIT;
    gi.group_id.data = gid;
    gi.group_id.len = 16;
    e.op_case = COFFER__ENTRY__OP_GROUP_INIT;
    e.group_init = &gi;
    apply_e(st, idx, &e);
}

/* A store with 5 users and 60 messages (some of 300 KiB: overflow pages). */
static struct store *populate(const char *dir, uint64_t *idx)
{
    struct store *st = NULL;
    char err[256], name[32];
    *idx = 0;
    CU_ASSERT_FATAL(store_open(dir, 256ull << 20, &st, err, sizeof err) == 0);
    group(st, idx);
    for (int u = 0; u < 5; u++) {
        snprintf(name, sizeof name, "user%d", u);
        user(st, idx, name);
        for (int m = 0; m < 12; m++)
            append(st, idx, name, m % 4 == 0 ? 300 * 1024 : 200 + (size_t)m * 10);
    }
    return st;
}

static void path_of(char *out, size_t len, const char *a, const char *b)
{
    snprintf(out, len, "%s/%s", a, b);
}

static void flip_byte(const char *path, off_t at)
{
    int fd = open(path, O_RDWR);
    unsigned char c;
    CU_ASSERT_FATAL(fd >= 0);
    CU_ASSERT_FATAL(pread(fd, &c, 1, at) == 1);
    c ^= 0x40;
    CU_ASSERT_FATAL(pwrite(fd, &c, 1, at) == 1);
    close(fd);
}

static void test_copy_same_digest(void)
{
    char src[128], dst[128], file[160], err[256], d1[65], d2[65], hex[65], hex2[65];
    struct store *st, *copy = NULL;
    uint64_t idx, applied, size = 0, size2 = 0;
    MDB_txn *rtxn;
    struct ckpt_info ci, back;

    path_of(src, sizeof src, root, "copy-src");
    path_of(dst, sizeof dst, root, "copy-dst");
    mkdir(dst, 0700);
    st = populate(src, &idx);
    applied = store_applied_index(st);
    CU_ASSERT_EQUAL(store_digest(st, d1), 0);
    /* the copy sees the read transaction's state even though the store
     * keeps applying meanwhile */
    rtxn = store_rtxn_begin(st);
    CU_ASSERT_FATAL(rtxn != NULL);
    CU_ASSERT_EQUAL(store_readers(st), 1);
    append(st, &idx, "user1", 100);
    path_of(file, sizeof file, dst, "data.mdb");
    /* small batches: many write transactions */
    CU_ASSERT_EQUAL_FATAL(ckpt_copy(st, rtxn, file, 64 * 1024, NULL, err, sizeof err), 0);
    store_rtxn_end(rtxn);
    CU_ASSERT_EQUAL(store_readers(st), 0);
    CU_ASSERT_FATAL(store_open(dst, 256ull << 20, &copy, err, sizeof err) == 0);
    CU_ASSERT_EQUAL(store_digest(copy, d2), 0);
    CU_ASSERT_STRING_EQUAL(d1, d2);
    CU_ASSERT_EQUAL(store_applied_index(copy), applied);
    CU_ASSERT_NOT_EQUAL(store_applied_index(st), applied);
    store_close(&copy);

    /* hash + manifest round trip; a flipped byte is refused */
    CU_ASSERT_EQUAL(ckpt_hash_file(file, &size, hex, err, sizeof err), 0);
    CU_ASSERT(size > 3 * 300 * 1024);
    memset(&ci, 0, sizeof ci);
    snprintf(ci.name, sizeof ci.name, "data.mdb");
    ci.applied = applied;
    ci.size = size;
    memcpy(ci.sha256, hex, 65);
    CU_ASSERT_EQUAL(ckpt_manifest_write(dst, &ci, err, sizeof err), 0);
    CU_ASSERT_EQUAL(ckpt_manifest_read(dst, "data.mdb", &back), 0);
    CU_ASSERT_EQUAL(back.applied, applied);
    CU_ASSERT_EQUAL(back.size, size);
    CU_ASSERT_STRING_EQUAL(back.sha256, hex);
    CU_ASSERT_EQUAL(ckpt_verify(dst, &back, err, sizeof err), 0);
    flip_byte(file, (off_t)(size / 2));
    CU_ASSERT_EQUAL(ckpt_hash_file(file, &size2, hex2, err, sizeof err), 0);
    CU_ASSERT_EQUAL(size2, size);
    CU_ASSERT_STRING_NOT_EQUAL(hex2, hex);
    CU_ASSERT_EQUAL(ckpt_verify(dst, &back, err, sizeof err), -1);
    CU_ASSERT(strstr(err, "sha256") != NULL);
    store_close(&st);
}

static void test_manager_take_verify_install(void)
{
    char src[128], dst[128], cks[128], ckd[128], err[256], d1[65], d2[65], cmd[512], path[300];
    struct store *st, *other = NULL;
    struct ckpt_mgr *ms, *md;
    struct ckpt_mgr_config c;
    struct ckpt_info *l = NULL, ci;
    struct ckpt_stats stats;
    size_t n = 0;
    uint64_t idx, applied;
    uint8_t gid[16];
    MDB_txn *reader;

    path_of(src, sizeof src, root, "mgr-src");
    path_of(dst, sizeof dst, root, "mgr-dst");
    path_of(cks, sizeof cks, root, "ck-src");
    path_of(ckd, sizeof ckd, root, "ck-dst");
    st = populate(src, &idx);
    applied = store_applied_index(st);
    store_group_id(st, gid);
    memset(&c, 0, sizeof c);
    c.dir = cks;
    c.keep = 2;
    c.batch_bytes = 256 * 1024;
    ms = ckpt_mgr_create(st, &c, err, sizeof err);
    CU_ASSERT_FATAL(ms != NULL);
    CU_ASSERT_EQUAL(ckpt_mgr_take(ms), 0);
    CU_ASSERT_EQUAL(ckpt_mgr_take(ms), 1); /* busy */
    append(st, &idx, "user2", 50);         /* the loop keeps applying */
    ckpt_mgr_wait(ms);
    CU_ASSERT_STRING_EQUAL(ckpt_mgr_state(ms), "idle");
    CU_ASSERT_EQUAL(ckpt_list(cks, &l, &n), 0);
    CU_ASSERT_EQUAL_FATAL(n, 1);
    CU_ASSERT_EQUAL(l[0].applied, applied);
    CU_ASSERT_EQUAL(memcmp(l[0].group_id, gid, 16), 0);
    CU_ASSERT_EQUAL(ckpt_verify(cks, &l[0], err, sizeof err), 0);
    ci = l[0];
    free(l);
    CU_ASSERT_EQUAL(ckpt_mgr_newest(ms, applied, &ci), 0);
    CU_ASSERT_EQUAL(ckpt_mgr_newest(ms, applied + 1, &ci), -1);
    /* three more: only `keep` remain */
    for (int k = 0; k < 3; k++) {
        append(st, &idx, "user3", 50);
        CU_ASSERT_EQUAL(ckpt_mgr_take(ms), 0);
        ckpt_mgr_wait(ms);
    }
    CU_ASSERT_EQUAL(ckpt_list(cks, &l, &n), 0);
    CU_ASSERT_EQUAL(n, 2);
    CU_ASSERT_EQUAL(l[0].applied, store_applied_index(st));
    free(l);
    ckpt_mgr_stats(ms, &stats);
    CU_ASSERT_EQUAL(stats.taken, 4);
    CU_ASSERT_EQUAL(stats.newest_applied, store_applied_index(st));
    applied = store_applied_index(st);
    CU_ASSERT_EQUAL(store_digest(st, d1), 0);

    /* another, empty store: a corrupt local copy is refused and deleted */
    CU_ASSERT_FATAL(store_open(dst, 256ull << 20, &other, err, sizeof err) == 0);
    c.dir = ckd;
    md = ckpt_mgr_create(other, &c, err, sizeof err);
    CU_ASSERT_FATAL(md != NULL);
    snprintf(cmd, sizeof cmd, "cp '%s'/ckpt-*%llu.mdb* '%s'/", cks, (unsigned long long)applied,
             ckd);
    CU_ASSERT_FATAL(system(cmd) == 0);
    ckpt_name(applied, ci.name);
    snprintf(path, sizeof path, "%s/%s", ckd, ci.name);
    flip_byte(path, 5000);
    {
        /* a source that refuses connections: after the refusal the
         * manager goes straight on to fetching from it (and fails) */
        const char *bad_src[1] = {"127.0.0.1:1"};
        CU_ASSERT_EQUAL(ckpt_mgr_install(md, gid, applied, bad_src, 1), 1); /* verifying */
        ckpt_mgr_wait(md);
        CU_ASSERT_STRING_EQUAL(ckpt_mgr_state(md), "fetching");
        ckpt_mgr_wait(md);
        CU_ASSERT_STRING_EQUAL(ckpt_mgr_state(md), "idle");
    }
    CU_ASSERT(access(path, F_OK) != 0); /* deleted */
    CU_ASSERT_EQUAL(store_applied_index(other), 0);
    ckpt_mgr_stats(md, &stats);
    CU_ASSERT_EQUAL(stats.refused, 1);
    CU_ASSERT_EQUAL(ckpt_mgr_install(md, gid, applied, NULL, 0), 1); /* no source: waits */
    CU_ASSERT_EQUAL(store_applied_index(other), 0);

    /* a good copy: verified, then swapped in once no reader is open */
    CU_ASSERT_FATAL(system(cmd) == 0);
    CU_ASSERT_EQUAL(ckpt_mgr_install(md, gid, applied, NULL, 0), 1);
    ckpt_mgr_wait(md);
    reader = store_rtxn_begin(other);
    CU_ASSERT_EQUAL(ckpt_mgr_install(md, gid, applied, NULL, 0), 1); /* reader open */
    CU_ASSERT_EQUAL(store_applied_index(other), 0);
    store_rtxn_end(reader);
    CU_ASSERT_EQUAL(ckpt_mgr_install(md, gid, applied, NULL, 0), 0);
    CU_ASSERT_EQUAL(store_applied_index(other), applied);
    CU_ASSERT_EQUAL(store_digest(other, d2), 0);
    CU_ASSERT_STRING_EQUAL(d1, d2);
    ckpt_mgr_stats(md, &stats);
    CU_ASSERT_EQUAL(stats.installed, 1);
    /* the installed store keeps working: apply on top of it */
    idx = applied;
    append(other, &idx, "user4", 10);
    CU_ASSERT_EQUAL(store_applied_index(other), applied + 1);
    /* already covered: nothing to do */
    CU_ASSERT_EQUAL(ckpt_mgr_install(md, gid, applied, NULL, 0), 0);

    ckpt_mgr_destroy(&md);
    ckpt_mgr_destroy(&ms);
    store_close(&other);
    store_close(&st);
}

int main(void)
{
    CU_pSuite s;
    unsigned fails;

    cf_log_init("test_checkpoint", CF_LOG_CRIT, 0);
    snprintf(root, sizeof root, "/tmp/coffer-ckpt-XXXXXX");
    if (mkdtemp(root) == NULL) return 1;
    if (CU_initialize_registry() != CUE_SUCCESS) return 1;
    s = CU_add_suite("checkpoint", NULL, NULL);
    CU_add_test(s, "copy keeps the digest; a flipped byte is refused", test_copy_same_digest);
    CU_add_test(s, "manager: take, prune, verify, refuse corrupt, install",
                test_manager_take_verify_install);
    CU_basic_set_mode(CU_BRM_VERBOSE);
    CU_basic_run_tests();
    fails = CU_get_number_of_failures();
    CU_cleanup_registry();
    rm_rf(root);
    return fails != 0;
}
