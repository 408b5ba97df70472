/* Deterministic replication tests: three in-memory raft servers
 * (raft/fixture.h, virtual time) each driving a real LMDB store through
 * rep's FSM glue (entry frames, log index derivation) and the store node's
 * FSM (node_fsm_ops: store_apply, snapshot descriptor, restore check).
 * Covers election, apply, failover with a killed leader, snapshots taken by
 * libraft, the restore refusal of a store that is behind (no checkpoint
 * directory), and the install of a checkpoint through libraft's retried
 * InstallSnapshot (a corrupt local checkpoint is refused first). */
#include <CUnit/Basic.h>
#include <raft.h>
#include <raft/fixture.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cf_log.h"
#include "checkpoint.h"
#include "coffer_raft.pb-c.h"
#include "node.h"
#include "propose.h"
#include "rep.h"
#include "store.h"

#define N 3

static struct raft_fixture fx;
static struct node nodes[N];
static struct rep_fsm_adapter *ad[N];
static char dirs[N][64];
static char ckdirs[N][96];
static uint8_t group[16] = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16};
static int applied_cbs, failed_cbs;
static int seq;

static void rm_rf(const char *d)
{
    char cmd[128];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", d);
    if (system(cmd) != 0) fprintf(stderr, "cannot remove %s\n", d);
}

static int setup_fixture_ck(unsigned threshold, unsigned trailing, int with_ckpt);

static int setup_fixture(unsigned threshold, unsigned trailing)
{
    return setup_fixture_ck(threshold, trailing, 0);
}

static int setup_fixture_ck(unsigned threshold, unsigned trailing, int with_ckpt)
{
    struct raft_configuration conf;
    char err[256];
    unsigned i;

    memset(&fx, 0, sizeof fx);
    memset(nodes, 0, sizeof nodes);
    if (raft_fixture_initialize(&fx) != 0) return -1;
    for (i = 0; i < N; i++) {
        snprintf(dirs[i], sizeof dirs[i], "/tmp/coffer-fixture-XXXXXX");
        if (mkdtemp(dirs[i]) == NULL) return -1;
        if (store_open(dirs[i], 64ull << 20, &nodes[i].store, err, sizeof err) != 0) {
            fprintf(stderr, "store_open: %s\n", err);
            return -1;
        }
        if (with_ckpt) {
            struct ckpt_mgr_config cc;
            memset(&cc, 0, sizeof cc);
            snprintf(ckdirs[i], sizeof ckdirs[i], "%s/checkpoints", dirs[i]);
            cc.dir = ckdirs[i];
            cc.keep = 2;
            nodes[i].ckpt = ckpt_mgr_create(nodes[i].store, &cc, err, sizeof err);
            if (nodes[i].ckpt == NULL) return -1;
        }
        ad[i] = rep_adapter_create(&node_fsm_ops, &nodes[i]);
        if (ad[i] == NULL || raft_fixture_grow(&fx, rep_adapter_fsm(ad[i])) != 0) return -1;
        rep_adapter_bind(ad[i], raft_fixture_get(&fx, i));
        raft_set_snapshot_threshold(raft_fixture_get(&fx, i), threshold);
        raft_set_snapshot_trailing(raft_fixture_get(&fx, i), trailing);
        raft_set_install_snapshot_timeout(raft_fixture_get(&fx, i), 500);
    }
    raft_configuration_init(&conf);
    if (raft_fixture_configuration(&fx, N, &conf) != 0) return -1;
    if (raft_fixture_bootstrap(&fx, &conf) != 0) return -1;
    raft_configuration_close(&conf);
    if (raft_fixture_start(&fx) != 0) return -1;
    applied_cbs = failed_cbs = 0;
    return 0;
}

static void teardown_fixture(void)
{
    unsigned i;
    raft_fixture_close(&fx);
    for (i = 0; i < N; i++) {
        ckpt_mgr_destroy(&nodes[i].ckpt);
        store_close(&nodes[i].store);
        rep_adapter_destroy(&ad[i]);
        rm_rf(dirs[i]);
    }
}

static void apply_cb(struct raft_apply *req, int status, void *result)
{
    (void)result;
    if (status == 0)
        applied_cbs++;
    else
        failed_cbs++;
    free(req);
}

/* Propose an entry on server i; 0 or the raft error. */
static int propose_on(unsigned i, Coffer__Entry *e)
{
    struct raft_apply *req = calloc(1, sizeof *req);
    struct raft_buffer b;
    void *framed, *buf, *base;
    size_t flen, blen;
    uint8_t rid[16];
    int rv;

    memset(rid, 0, sizeof rid);
    seq++;
    memcpy(rid, &seq, sizeof seq);
    e->leader_time_ms = 1700000000000ull + (uint64_t)seq;
    e->has_request_id = 1;
    e->request_id.len = 16;
    e->request_id.data = rid;
    CU_ASSERT_FATAL(propose_frame(e, &framed, &flen) == 0);
    buf = rep_buf_alloc(flen);
    CU_ASSERT_FATAL(buf != NULL);
    memcpy(buf, framed, flen);
    free(framed);
    rep_frame_finish(buf, flen, &base, &blen);
    b.base = base;
    b.len = blen;
    rv = raft_apply(raft_fixture_get(&fx, i), req, &b, 1, apply_cb);
    if (rv != 0) {
        raft_free(base);
        free(req);
    }
    return rv;
}

static int propose_group(unsigned i)
{
    Coffer__Entry e = COFFER__ENTRY__INIT;
    Coffer__GroupInit gi = COFFER__GROUP_INIT__INIT;
    gi.group_id.data = group;
    gi.group_id.len = 16;
    e.op_case = COFFER__ENTRY__OP_GROUP_INIT;
    e.group_init = &gi;
    return propose_on(i, &e);
}

static int propose_user(unsigned i)
{
    Coffer__Entry e = COFFER__ENTRY__INIT;
    Coffer__UserCreate uc = COFFER__USER_CREATE__INIT;
    Coffer__MailboxCreate mb = COFFER__MAILBOX_CREATE__INIT;
    Coffer__MailboxCreate *mbp = &mb;
    mb.username = "alice";
    mb.name = "INBOX";
    uc.username = "alice";
    uc.password_hash = "$scrypt$x";
    uc.n_initial_mailboxes = 1;
    uc.initial_mailboxes = &mbp;
    e.op_case = COFFER__ENTRY__OP_USER_CREATE;
    e.user_create = &uc;
    return propose_on(i, &e);
}

static int propose_append(unsigned i, int k)
{
    Coffer__Entry e = COFFER__ENTRY__INIT;
    Coffer__Append ap = COFFER__APPEND__INIT;
    Coffer__MessageCache mc = COFFER__MESSAGE_CACHE__INIT;
    char msg[128];
    int len = snprintf(msg, sizeof msg, "Subject: m%d\r\n\r\nbody %d\r\n", k, k);
    mc.envelope.data = (uint8_t *)"NIL";
    mc.envelope.len = 3;
    mc.bodystructure.data = (uint8_t *)"NIL";
    mc.bodystructure.len = 3;
    mc.body.data = (uint8_t *)"NIL";
    mc.body.len = 3;
    mc.parts.data = (uint8_t *)"";
    mc.parts.len = 0;
    ap.username = "alice";
    ap.mailbox = "INBOX";
    ap.message.data = (uint8_t *)msg;
    ap.message.len = (size_t)len;
    ap.cache = &mc;
    e.op_case = COFFER__ENTRY__OP_APPEND;
    e.append = &ap;
    return propose_on(i, &e);
}

static raft_index last_index(unsigned i)
{
    return raft_last_index(raft_fixture_get(&fx, i));
}

static void assert_same_digest(unsigned a, unsigned b)
{
    char da[65], db[65];
    CU_ASSERT_EQUAL_FATAL(store_digest(nodes[a].store, da), 0);
    CU_ASSERT_EQUAL_FATAL(store_digest(nodes[b].store, db), 0);
    CU_ASSERT_STRING_EQUAL(da, db);
    CU_ASSERT_EQUAL(store_applied_index(nodes[a].store), store_applied_index(nodes[b].store));
}

static unsigned elect_leader(void)
{
    CU_ASSERT_FATAL(raft_fixture_step_until_has_leader(&fx, 10000));
    return raft_fixture_leader_index(&fx);
}

static void test_election_and_apply(void)
{
    unsigned l, i;
    int k;

    CU_ASSERT_FATAL(setup_fixture(1000, 500) == 0);
    raft_fixture_elect(&fx, 0);
    l = raft_fixture_leader_index(&fx);
    CU_ASSERT_EQUAL(l, 0);
    CU_ASSERT_EQUAL(propose_group(l), 0);
    CU_ASSERT_EQUAL(propose_user(l), 0);
    for (k = 0; k < 20; k++)
        CU_ASSERT_EQUAL(propose_append(l, k), 0);
    /* a follower refuses proposals */
    CU_ASSERT_EQUAL(propose_append((l + 1) % N, 99), RAFT_NOTLEADER);
    CU_ASSERT_TRUE(raft_fixture_step_until_applied(&fx, N, last_index(l), 10000));
    CU_ASSERT_EQUAL(applied_cbs, 22);
    CU_ASSERT_EQUAL(failed_cbs, 0);
    for (i = 1; i < N; i++)
        assert_same_digest(0, i);
    /* the store's applied index is the raft index of the last command */
    CU_ASSERT_EQUAL(store_applied_index(nodes[0].store), last_index(l));
    for (i = 0; i < N; i++)
        CU_ASSERT_FALSE(rep_adapter_fatal(ad[i]));
    teardown_fixture();
}

static void test_failover(void)
{
    unsigned l, l2, i;
    int k;

    CU_ASSERT_FATAL(setup_fixture(1000, 500) == 0);
    raft_fixture_elect(&fx, 0);
    l = 0;
    propose_group(l);
    propose_user(l);
    for (k = 0; k < 10; k++)
        propose_append(l, k);
    CU_ASSERT_TRUE(raft_fixture_step_until_applied(&fx, N, last_index(l), 10000));
    raft_fixture_kill(&fx, l);
    CU_ASSERT_TRUE(raft_fixture_step_until_has_no_leader(&fx, 10000));
    l2 = elect_leader();
    CU_ASSERT_NOT_EQUAL(l2, l);
    for (k = 10; k < 20; k++)
        CU_ASSERT_EQUAL(propose_append(l2, k), 0);
    CU_ASSERT_TRUE(raft_fixture_step_until_applied(&fx, l2, last_index(l2), 10000));
    raft_fixture_revive(&fx, l);
    CU_ASSERT_TRUE(raft_fixture_step_until_applied(&fx, N, last_index(l2), 20000));
    for (i = 0; i < N; i++)
        if (i != l2) assert_same_digest(l2, i);
    CU_ASSERT_EQUAL(failed_cbs, 0);
    teardown_fixture();
}

static void test_snapshot_and_restore(void)
{
    unsigned l = 0;
    int k;
    void *desc = NULL;
    size_t dlen = 0;
    uint64_t behind;

    CU_ASSERT_FATAL(setup_fixture(8, 4) == 0);
    raft_fixture_elect(&fx, 0);
    propose_group(l);
    propose_user(l);
    for (k = 0; k < 30; k++)
        propose_append(l, k);
    CU_ASSERT_TRUE(raft_fixture_step_until_applied(&fx, N, last_index(l), 10000));
    /* libraft took snapshots through the FSM (descriptor only) and kept
     * applying; every store still has the same content */
    CU_ASSERT(raft_fixture_get(&fx, 0)->log.snapshot.last_index > 0);
    assert_same_digest(0, 1);
    assert_same_digest(0, 2);

    /* Descriptor round trip: a store that covers it restores; a store that
     * is behind refuses (it would need a checkpoint); another group too. */
    CU_ASSERT_EQUAL_FATAL(node_fsm_ops.snapshot(&nodes[0], last_index(l), &desc, &dlen), 0);
    CU_ASSERT_EQUAL(node_fsm_ops.restore(&nodes[1], desc, dlen), 0);
    {
        struct node fresh;
        char d[64] = "/tmp/coffer-fixture-fresh-XXXXXX", err[256];
        memset(&fresh, 0, sizeof fresh);
        CU_ASSERT_FATAL(mkdtemp(d) != NULL);
        CU_ASSERT_FATAL(store_open(d, 64ull << 20, &fresh.store, err, sizeof err) == 0);
        CU_ASSERT_EQUAL(node_fsm_ops.restore(&fresh, desc, dlen), -1);
        CU_ASSERT_EQUAL(store_applied_index(fresh.store), 0);
        store_close(&fresh.store);
        rm_rf(d);
    }
    free(desc);

    /* A follower cut off while the leader compacts its log is sent a
     * snapshot it cannot restore (its store is behind): it must refuse
     * and never misapply. */
    raft_fixture_disconnect(&fx, 0, 2);
    raft_fixture_disconnect(&fx, 1, 2);
    behind = store_applied_index(nodes[2].store);
    for (k = 30; k < 60; k++)
        propose_append(l, k);
    CU_ASSERT_TRUE(raft_fixture_step_until_applied(&fx, 1, last_index(l), 10000));
    raft_fixture_reconnect(&fx, 0, 2);
    raft_fixture_reconnect(&fx, 1, 2);
    raft_fixture_step_until_elapsed(&fx, 2000);
    CU_ASSERT_EQUAL(store_applied_index(nodes[2].store), behind);
    CU_ASSERT_EQUAL(raft_fixture_leader_index(&fx), 0);
    teardown_fixture();
}

/* Step the fixture while letting checkpoint workers (real threads) run,
 * until server i applied `index` (its store reached it) or `ms` of virtual
 * time passed. */
static int step_with_workers(unsigned i, uint64_t index, unsigned ms)
{
    unsigned t, k;
    for (t = 0; t < ms; t += 50) {
        raft_fixture_step_until_elapsed(&fx, 50);
        for (k = 0; k < N; k++)
            ckpt_mgr_wait(nodes[k].ckpt);
        if (store_applied_index(nodes[i].store) >= index &&
            raft_last_applied(raft_fixture_get(&fx, i)) >= index)
            return 1;
    }
    return 0;
}

static void test_checkpoint_install(void)
{
    unsigned l = 0, k;
    char cmd[512], path[200];
    struct ckpt_info ci;
    struct ckpt_stats cs;
    uint64_t behind, target;

    CU_ASSERT_FATAL(setup_fixture_ck(8, 4, 1) == 0);
    raft_fixture_elect(&fx, 0);
    propose_group(l);
    propose_user(l);
    for (k = 0; k < 10; k++)
        propose_append(l, (int)k);
    CU_ASSERT_TRUE(raft_fixture_step_until_applied(&fx, N, last_index(l), 10000));
    for (k = 0; k < N; k++)
        ckpt_mgr_wait(nodes[k].ckpt);

    /* node 2 is cut off while the others compact their logs */
    raft_fixture_disconnect(&fx, 0, 2);
    raft_fixture_disconnect(&fx, 1, 2);
    behind = store_applied_index(nodes[2].store);
    for (k = 30; k < 70; k++)
        propose_append(l, (int)k);
    CU_ASSERT_TRUE(raft_fixture_step_until_applied(&fx, 1, last_index(l), 10000));
    for (k = 0; k < N; k++)
        ckpt_mgr_wait(nodes[k].ckpt);
    CU_ASSERT_FATAL(raft_fixture_get(&fx, 0)->log.snapshot.last_index > behind + 4);
    /* the leader wrote checkpoints of its snapshots off the loop */
    ckpt_mgr_stats(nodes[0].ckpt, &cs);
    CU_ASSERT(cs.taken >= 2);
    CU_ASSERT_EQUAL_FATAL(ckpt_mgr_newest(nodes[0].ckpt, 0, &ci), 0);
    CU_ASSERT(ci.applied >= raft_fixture_get(&fx, 0)->log.snapshot.last_index);

    /* There is no admin RPC in the fixture: put a tampered copy of the
     * leader's checkpoint where a fetch would leave it. It is refused
     * (deleted) and the store stays behind. */
    snprintf(cmd, sizeof cmd, "cp '%s/%s' '%s/%s.manifest' '%s/'", ckdirs[0], ci.name, ckdirs[0],
             ci.name, ckdirs[2]);
    CU_ASSERT_FATAL(system(cmd) == 0);
    snprintf(path, sizeof path, "%s/%s", ckdirs[2], ci.name);
    {
        FILE *f = fopen(path, "r+b");
        int c;
        CU_ASSERT_FATAL(f != NULL);
        fseek(f, 4096 + 100, SEEK_SET);
        c = fgetc(f);
        fseek(f, 4096 + 100, SEEK_SET);
        fputc(c ^ 1, f);
        fclose(f);
    }
    raft_fixture_reconnect(&fx, 0, 2);
    raft_fixture_reconnect(&fx, 1, 2);
    target = last_index(l);
    CU_ASSERT_FALSE(step_with_workers(2, target, 3000));
    CU_ASSERT_EQUAL(store_applied_index(nodes[2].store), behind);
    CU_ASSERT(access(path, F_OK) != 0);
    ckpt_mgr_stats(nodes[2].ckpt, &cs);
    CU_ASSERT_EQUAL(cs.refused, 1);
    CU_ASSERT_EQUAL(cs.installed, 0);

    /* a good copy: libraft's next InstallSnapshot retry verifies it, swaps
     * it in and the follower applies the rest from the log */
    CU_ASSERT_FATAL(system(cmd) == 0);
    CU_ASSERT_TRUE(step_with_workers(2, target, 20000));
    ckpt_mgr_stats(nodes[2].ckpt, &cs);
    CU_ASSERT_EQUAL(cs.installed, 1);
    assert_same_digest(0, 2);
    /* and it keeps following */
    for (k = 70; k < 80; k++)
        propose_append(l, (int)k);
    if (!step_with_workers(2, last_index(l), 20000)) {
        fprintf(stderr,
                "node2: store %llu raft applied %llu last %llu; leader last %llu commit %llu fatal "
                "%d\n",
                (unsigned long long)store_applied_index(nodes[2].store),
                (unsigned long long)raft_last_applied(raft_fixture_get(&fx, 2)),
                (unsigned long long)raft_last_index(raft_fixture_get(&fx, 2)),
                (unsigned long long)last_index(l),
                (unsigned long long)raft_fixture_get(&fx, 0)->commit_index,
                rep_adapter_fatal(ad[2]));
        fprintf(stderr, "node2 stored %llu commit %llu put %p state %d snap %llu\n",
                (unsigned long long)raft_fixture_get(&fx, 2)->last_stored,
                (unsigned long long)raft_fixture_get(&fx, 2)->commit_index,
                (void *)raft_fixture_get(&fx, 2)->snapshot.put.data,
                raft_state(raft_fixture_get(&fx, 2)),
                (unsigned long long)raft_fixture_get(&fx, 2)->log.snapshot.last_index);
        CU_FAIL("node 2 does not follow after the install");
    }
    assert_same_digest(0, 2);
    CU_ASSERT_FALSE(rep_adapter_fatal(ad[2]));
    CU_ASSERT_EQUAL(raft_fixture_leader_index(&fx), 0);
    teardown_fixture();
}

int main(void)
{
    CU_pSuite s;
    unsigned fails;

    cf_log_init("test_raft_fixture", CF_LOG_CRIT, 0);
    if (CU_initialize_registry() != CUE_SUCCESS) return 1;
    s = CU_add_suite("raft_fixture", NULL, NULL);
    CU_add_test(s, "election and apply", test_election_and_apply);
    CU_add_test(s, "failover", test_failover);
    CU_add_test(s, "snapshot and restore", test_snapshot_and_restore);
    CU_add_test(s, "checkpoint install", test_checkpoint_install);
    CU_basic_set_mode(CU_BRM_VERBOSE);
    CU_basic_run_tests();
    fails = CU_get_number_of_failures();
    CU_cleanup_registry();
    return fails != 0;
}
