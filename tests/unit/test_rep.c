/* Unit tests for replication/rep.c: a real single-voter libraft node
 * (raft_uv on a temporary directory, TCP transport on loopback) driving a
 * tiny in-memory counting FSM whose state outlives the rep instance, the
 * way LMDB would. */
#include <CUnit/Basic.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <inttypes.h>
#include <raft.h>
#include <raft/fixture.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>
#include <uv.h>

#include "cf_log.h"
#include "checkpoint.h"
#include "rep.h"
#include "store.h"

#define N_ENTRIES 100
#define MAX_INDEX 1024
#define DESC_MAGIC 0x43534e50u /* test descriptor magic */

/* "Persistent" FSM: survives rep restarts like an LMDB store would. */
struct cfsm {
    uint64_t applied;           /* watermark: highest applied index */
    uint32_t value[MAX_INDEX];  /* payload value applied at index */
    uint64_t n_applied;         /* entries applied (not replays) */
    uint64_t n_replayed;        /* entries skipped as replays (index <= applied) */
    uint64_t n_replay_mismatch; /* replays whose payload differed */
    uint64_t apply_calls;       /* ops->apply calls in the current run */
    uint64_t last_index_seen;   /* index of the previous apply call (this run) */
    uint64_t n_non_monotonic;   /* apply calls with index <= previous */
    uint64_t n_gaps;            /* index jumps > 1 (allowed only for non-commands) */
    uint64_t n_snapshots;
    uint64_t last_snapshot_index;
    uint64_t n_snapshot_bad_index; /* snapshot index != applied watermark */
    uint64_t n_restores;
    uint64_t restored_index;
    uint64_t n_restore_bad; /* descriptor did not match one we produced */
    uint64_t snap_indexes[64];
    size_t n_snap_indexes;
};

struct desc {
    uint32_t magic;
    uint32_t pad;
    uint64_t index;
    uint64_t applied_count;
};

static int cfsm_apply(void *fsm, uint64_t index, const void *buf, size_t len)
{
    struct cfsm *f = fsm;
    uint32_t v;

    f->apply_calls++;
    if (f->last_index_seen != 0) {
        if (index <= f->last_index_seen)
            f->n_non_monotonic++;
        else if (index != f->last_index_seen + 1)
            f->n_gaps++;
    }
    f->last_index_seen = index;
    if (index >= MAX_INDEX) return -1;
    if (len > sizeof v) { /* big entry: its length and first/last bytes */
        const unsigned char *p = buf;
        v = (uint32_t)len ^ p[0] ^ (uint32_t)p[len - 1] << 8;
        if (index <= f->applied) {
            f->n_replayed++;
            if (f->value[index] != v) f->n_replay_mismatch++;
            return 0;
        }
        f->value[index] = v;
        f->applied = index;
        f->n_applied++;
        return 0;
    }
    if (len != sizeof v) return -1;
    memcpy(&v, buf, sizeof v);
    if (v == 0xdeadu) /* the test's "fatal" entry */
        return -1;
    if (index <= f->applied) { /* replay after restart: dedupe by index */
        f->n_replayed++;
        if (f->value[index] != v) f->n_replay_mismatch++;
        return 0;
    }
    f->value[index] = v;
    f->applied = index;
    f->n_applied++;
    return 0;
}

static int cfsm_snapshot(void *fsm, uint64_t index, void **buf_r, size_t *len_r)
{
    struct cfsm *f = fsm;
    struct desc *d = calloc(1, sizeof *d);

    if (d == NULL) return -1;
    if (index != f->applied) f->n_snapshot_bad_index++;
    d->magic = DESC_MAGIC;
    d->index = index;
    d->applied_count = f->n_applied;
    f->n_snapshots++;
    f->last_snapshot_index = index;
    if (f->n_snap_indexes < 64) f->snap_indexes[f->n_snap_indexes++] = index;
    *buf_r = d;
    *len_r = sizeof *d;
    return 0;
}

static int cfsm_restore(void *fsm, const void *buf, size_t len)
{
    struct cfsm *f = fsm;
    struct desc d;
    size_t i;
    int found = 0;

    f->n_restores++;
    if (len != sizeof d) {
        f->n_restore_bad++;
        return -1;
    }
    memcpy(&d, buf, sizeof d);
    for (i = 0; i < f->n_snap_indexes; i++)
        if (f->snap_indexes[i] == d.index) found = 1;
    if (d.magic != DESC_MAGIC || !found || d.index > f->applied) {
        f->n_restore_bad++;
        return -1;
    }
    f->restored_index = d.index;
    return 0;
}

static const struct rep_fsm_ops cfsm_ops = {cfsm_apply, cfsm_snapshot, cfsm_restore, NULL};

/* ---- harness ---- */

static char tmpdir[64];
static uint16_t test_port;

struct run {
    uv_loop_t loop;
    uv_timer_t deadline;
    uv_timer_t poll;
    int timed_out;
    struct rep *rep;
    int (*done)(struct run *run); /* stop condition */
    int n_ok, n_fail, n_cb;
    int closed;
    int role_changes, is_leader;
};

static void deadline_cb(uv_timer_t *t)
{
    struct run *run = t->data;
    run->timed_out = 1;
    uv_stop(&run->loop);
}

static void poll_cb(uv_timer_t *t)
{
    struct run *run = t->data;
    if (run->done != NULL && run->done(run)) uv_stop(&run->loop);
}

/* Run the loop until done(run) or ms elapsed. Returns 1 when done. */
static int run_until(struct run *run, int (*done)(struct run *), uint64_t ms)
{
    run->done = done;
    run->timed_out = 0;
    if (done(run)) return 1;
    uv_timer_start(&run->deadline, deadline_cb, ms, 0);
    uv_timer_start(&run->poll, poll_cb, 5, 5);
    uv_run(&run->loop, UV_RUN_DEFAULT);
    uv_timer_stop(&run->deadline);
    uv_timer_stop(&run->poll);
    return done(run);
}

static void role_cb(void *arg, int is_leader)
{
    struct run *run = arg;
    run->role_changes++;
    run->is_leader = is_leader;
}

static uint64_t max_entry = 1024;
static uint64_t snap_bytes = 0;

static int start_rep(struct run *run, struct cfsm *f, uint64_t threshold, uint64_t trailing)
{
    struct rep_config cfg;
    char addr[32], err[512];

    memset(run, 0, sizeof *run);
    if (uv_loop_init(&run->loop) != 0) return -1;
    uv_timer_init(&run->loop, &run->deadline);
    uv_timer_init(&run->loop, &run->poll);
    run->deadline.data = run;
    run->poll.data = run;
    snprintf(addr, sizeof addr, "127.0.0.1:%u", test_port);
    memset(&cfg, 0, sizeof cfg);
    cfg.node_id = 1;
    cfg.address = addr;
    cfg.data_dir = tmpdir;
    cfg.bootstrap = 1;
    cfg.election_timeout_ms = 1000;
    cfg.heartbeat_ms = 100;
    cfg.snapshot_threshold = threshold;
    cfg.snapshot_trailing = trailing;
    cfg.max_entry_bytes = max_entry;
    cfg.snapshot_bytes = snap_bytes;
    f->apply_calls = 0;
    f->last_index_seen = 0;
    run->rep = rep_create(&run->loop, &cfg, &cfsm_ops, f, err, sizeof err);
    if (run->rep == NULL) {
        fprintf(stderr, "rep_create: %s\n", err);
        return -1;
    }
    rep_set_role_cb(run->rep, role_cb, run);
    if (rep_start(run->rep, err, sizeof err) != 0) {
        fprintf(stderr, "rep_start: %s\n", err);
        return -1;
    }
    return 0;
}

static int is_closed(struct run *run)
{
    return run->closed;
}

static void closed_cb(void *arg)
{
    struct run *run = arg;
    run->closed = 1;
}

static void close_handle(uv_handle_t *h, void *arg)
{
    (void)arg;
    if (!uv_is_closing(h)) uv_close(h, NULL);
}

static void stop_rep(struct run *run)
{
    rep_close(run->rep, closed_cb, run);
    CU_ASSERT_TRUE(run_until(run, is_closed, 5000));
    rep_destroy(&run->rep);
    CU_ASSERT_PTR_NULL(run->rep);
    uv_walk(&run->loop, close_handle, NULL);
    uv_run(&run->loop, UV_RUN_DEFAULT);
    CU_ASSERT_EQUAL(uv_loop_close(&run->loop), 0);
}

static int leader_and_caught_up(struct run *run)
{
    struct rep_info info;
    rep_get_info(run->rep, &info);
    return info.is_leader && info.applied_index == info.last_index;
}

static int all_cbs(struct run *run)
{
    return run->n_cb >= N_ENTRIES;
}

static void propose_cb(void *arg, int status)
{
    struct run *run = arg;
    run->n_cb++;
    if (status == REP_OK)
        run->n_ok++;
    else
        run->n_fail++;
}

static int propose_value(struct run *run, uint32_t v)
{
    void *buf = rep_buf_alloc(sizeof v);
    if (buf == NULL) return REP_ENOMEM;
    memcpy(buf, &v, sizeof v);
    return rep_propose(run->rep, buf, sizeof v, propose_cb, run);
}

static int one_cb(struct run *run)
{
    return run->n_cb >= 1;
}

static void rm_tmpdir(void)
{
    char cmd[128];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", tmpdir);
    if (system(cmd) != 0) fprintf(stderr, "cleanup of %s failed\n", tmpdir);
}

/* ---- tests ---- */

static void test_strerror(void)
{
    CU_ASSERT_STRING_EQUAL(rep_strerror(REP_OK), "ok");
    CU_ASSERT_STRING_EQUAL(rep_strerror(REP_ENOTLEADER), "not leader");
    CU_ASSERT_STRING_EQUAL(rep_strerror(REP_ETOOBIG), "entry too big");
    CU_ASSERT_STRING_EQUAL(rep_strerror(12345), "unknown replication error");
}

static void test_bad_config(void)
{
    uv_loop_t loop;
    struct rep_config cfg;
    struct cfsm f;
    char err[256] = "";

    memset(&cfg, 0, sizeof cfg);
    memset(&f, 0, sizeof f);
    uv_loop_init(&loop);
    cfg.node_id = 1;
    cfg.address = "127.0.0.1:1";
    cfg.data_dir = "/nonexistent/coffer-rep-test";
    cfg.election_timeout_ms = 100;
    cfg.heartbeat_ms = 100; /* not below the election timeout */
    CU_ASSERT_PTR_NULL(rep_create(&loop, &cfg, &cfsm_ops, &f, err, sizeof err));
    CU_ASSERT_PTR_NOT_NULL(strstr(err, "heartbeat"));
    cfg.node_id = 0;
    cfg.heartbeat_ms = 10;
    CU_ASSERT_PTR_NULL(rep_create(&loop, &cfg, &cfsm_ops, &f, err, sizeof err));
    /* snapshot_trailing 0 would make libraft 0.15 drop entries appended
     * after a snapshot: refused. */
    cfg.node_id = 1;
    cfg.snapshot_threshold = 2;
    cfg.snapshot_trailing = 0;
    CU_ASSERT_PTR_NULL(rep_create(&loop, &cfg, &cfsm_ops, &f, err, sizeof err));
    CU_ASSERT_PTR_NOT_NULL(strstr(err, "trailing"));
    uv_run(&loop, UV_RUN_DEFAULT);
    CU_ASSERT_EQUAL(uv_loop_close(&loop), 0);
}

static struct cfsm fsm_state; /* shared across the restart tests, in order */
static uint64_t first_run_last_index;

static void test_single_voter_propose(void)
{
    struct run run;
    struct rep_info info;
    int i, rv;
    uint32_t big[512];

    memset(&fsm_state, 0, sizeof fsm_state);
    CU_ASSERT_PTR_NOT_NULL_FATAL(mkdtemp(strcpy(tmpdir, "/tmp/coffer-rep-XXXXXX")));
    CU_ASSERT_EQUAL_FATAL(start_rep(&run, &fsm_state, 32, 8), 0);
    CU_ASSERT_TRUE_FATAL(run_until(&run, leader_and_caught_up, 5000));
    CU_ASSERT_TRUE(rep_is_leader(run.rep));
    CU_ASSERT_EQUAL(run.is_leader, 1);
    CU_ASSERT_TRUE(run.role_changes >= 1);

    /* Too big is refused synchronously (buffer freed by rep: ASan checks). */
    memset(big, 0, sizeof big);
    {
        void *b = rep_buf_alloc(sizeof big);
        memcpy(b, big, sizeof big);
        CU_ASSERT_EQUAL(rep_propose(run.rep, b, sizeof big, propose_cb, &run), REP_ETOOBIG);
    }
    CU_ASSERT_EQUAL(run.n_cb, 0);

    for (i = 0; i < N_ENTRIES; i++) {
        rv = propose_value(&run, 1000u + (uint32_t)i);
        CU_ASSERT_EQUAL(rv, 0);
    }
    CU_ASSERT_TRUE(run_until(&run, all_cbs, 20000));
    CU_ASSERT_EQUAL(run.n_ok, N_ENTRIES);
    CU_ASSERT_EQUAL(run.n_fail, 0);
    CU_ASSERT_EQUAL(fsm_state.n_applied, N_ENTRIES);
    CU_ASSERT_EQUAL(fsm_state.n_replayed, 0);
    CU_ASSERT_EQUAL(fsm_state.n_non_monotonic, 0);
    CU_ASSERT_EQUAL(fsm_state.n_gaps, 0); /* no barriers/config changes in between */
    /* Index 1 is the bootstrap configuration; commands are 2..101. */
    CU_ASSERT_EQUAL(fsm_state.value[2], 1000u);
    CU_ASSERT_EQUAL(fsm_state.value[N_ENTRIES + 1], 1000u + N_ENTRIES - 1);
    CU_ASSERT_EQUAL(fsm_state.applied, N_ENTRIES + 1);

    rep_get_info(run.rep, &info);
    CU_ASSERT_EQUAL(info.is_leader, 1);
    CU_ASSERT_STRING_EQUAL(info.role, "leader");
    CU_ASSERT_EQUAL(info.leader_id, 1);
    CU_ASSERT_TRUE(info.term >= 1);
    CU_ASSERT_EQUAL(info.applied_index, fsm_state.applied);
    CU_ASSERT_EQUAL(info.commit_index, info.last_index);
    CU_ASSERT_EQUAL(info.last_index, N_ENTRIES + 1);
    /* Threshold 32: at least one snapshot during the burst (further ones
     * wait while a snapshot write is in flight). */
    CU_ASSERT_TRUE(fsm_state.n_snapshots >= 1);
    CU_ASSERT_EQUAL(fsm_state.n_snapshot_bad_index, 0);
    CU_ASSERT_TRUE(info.last_snapshot_index > 0);
    CU_ASSERT_TRUE(info.last_snapshot_index <= info.applied_index);

    /* A barrier: the callback fires with REP_OK, and ops->apply is not
     * called for it (the index still advances). */
    run.n_cb = 0;
    run.n_ok = 0;
    CU_ASSERT_EQUAL(rep_barrier(run.rep, propose_cb, &run), 0);
    CU_ASSERT_TRUE(run_until(&run, one_cb, 5000));
    CU_ASSERT_EQUAL(run.n_ok, 1);
    CU_ASSERT_EQUAL(fsm_state.n_applied, N_ENTRIES);

    /* The next command lands after the barrier: a gap of one index. */
    run.n_cb = 0;
    run.n_ok = 0;
    CU_ASSERT_EQUAL(propose_value(&run, 7777u), 0);
    CU_ASSERT_TRUE(run_until(&run, one_cb, 5000));
    CU_ASSERT_EQUAL(run.n_ok, 1);
    CU_ASSERT_EQUAL(fsm_state.applied, N_ENTRIES + 3);
    CU_ASSERT_EQUAL(fsm_state.value[N_ENTRIES + 3], 7777u);
    CU_ASSERT_EQUAL(fsm_state.n_gaps, 1);

    /* A few more, one at a time, so the log holds entries after the last
     * snapshot (they must be replayed on restart). */
    for (i = 0; i < 5; i++) {
        run.n_cb = 0;
        run.n_ok = 0;
        CU_ASSERT_EQUAL(propose_value(&run, 8000u + (uint32_t)i), 0);
        CU_ASSERT_TRUE(run_until(&run, one_cb, 5000));
        CU_ASSERT_EQUAL(run.n_ok, 1);
    }
    rep_get_info(run.rep, &info);
    first_run_last_index = info.last_index;
    CU_ASSERT_EQUAL(first_run_last_index, N_ENTRIES + 8);
    CU_ASSERT_EQUAL(fsm_state.applied, N_ENTRIES + 8);
    CU_ASSERT_EQUAL(fsm_state.n_applied, N_ENTRIES + 6);
    CU_ASSERT_TRUE(fsm_state.last_snapshot_index < first_run_last_index);

    stop_rep(&run);
}

static int applied_first_run(struct run *run)
{
    struct rep_info info;
    rep_get_info(run->rep, &info);
    return info.is_leader && info.applied_index >= first_run_last_index;
}

/* Command entries (non-zero values) with index in [lo, hi]. */
static uint64_t commands_in(uint64_t lo, uint64_t hi)
{
    uint64_t i, n = 0;
    for (i = lo; i <= hi && i < MAX_INDEX; i++)
        if (fsm_state.value[i] != 0) n++;
    return n;
}

static void test_restart_replays(void)
{
    struct run run;
    struct rep_info info;
    uint64_t restored_before = fsm_state.n_restores;
    uint64_t applied_before = fsm_state.n_applied;

    CU_ASSERT_TRUE_FATAL(first_run_last_index > 0);
    CU_ASSERT_EQUAL_FATAL(start_rep(&run, &fsm_state, 32, 8), 0);
    /* The newest snapshot is restored inside rep_start with our descriptor. */
    CU_ASSERT_EQUAL(fsm_state.n_restores, restored_before + 1);
    CU_ASSERT_EQUAL(fsm_state.n_restore_bad, 0);
    CU_ASSERT_EQUAL(fsm_state.restored_index, fsm_state.last_snapshot_index);
    CU_ASSERT_TRUE(run_until(&run, applied_first_run, 5000));
    /* Entries after the snapshot are replayed with their original indexes;
     * the FSM recognises them by index and changes nothing. */
    CU_ASSERT_TRUE(fsm_state.n_replayed > 0);
    CU_ASSERT_EQUAL(fsm_state.n_replay_mismatch, 0);
    CU_ASSERT_EQUAL(fsm_state.n_applied, applied_before);
    CU_ASSERT_EQUAL(fsm_state.n_non_monotonic, 0);
    /* Every command after the restored snapshot was replayed, nothing else. */
    CU_ASSERT_EQUAL(fsm_state.n_replayed,
                    commands_in(fsm_state.restored_index + 1, first_run_last_index));
    CU_ASSERT_EQUAL(run.is_leader, 1);

    /* A new proposal continues at the next index. */
    CU_ASSERT_EQUAL(propose_value(&run, 4242u), 0);
    CU_ASSERT_TRUE(run_until(&run, one_cb, 5000));
    CU_ASSERT_EQUAL(run.n_ok, 1);
    rep_get_info(run.rep, &info);
    CU_ASSERT_EQUAL(fsm_state.applied, info.last_index);
    CU_ASSERT_EQUAL(fsm_state.value[fsm_state.applied], 4242u);
    CU_ASSERT_EQUAL(fsm_state.n_applied, applied_before + 1);
    stop_rep(&run);
}

static int is_not_leader(struct run *run)
{
    return !rep_is_leader(run->rep);
}

static void test_pending_at_close(void)
{
    struct run run;
    int i;

    CU_ASSERT_EQUAL_FATAL(start_rep(&run, &fsm_state, 1024, 512), 0);
    CU_ASSERT_TRUE_FATAL(run_until(&run, applied_first_run, 5000));
    for (i = 0; i < 10; i++)
        CU_ASSERT_EQUAL(propose_value(&run, 9000u + (uint32_t)i), 0);
    /* Close at once: every callback still fires exactly once (OK if it
     * made it, or a shutdown/leadership error). */
    rep_close(run.rep, closed_cb, &run);
    CU_ASSERT_TRUE(is_not_leader(&run));
    CU_ASSERT_EQUAL(propose_value(&run, 1u), REP_ESHUTDOWN);
    CU_ASSERT_TRUE(run_until(&run, is_closed, 5000));
    CU_ASSERT_EQUAL(run.n_cb, 10);
    rep_destroy(&run.rep);
    uv_walk(&run.loop, close_handle, NULL);
    uv_run(&run.loop, UV_RUN_DEFAULT);
    CU_ASSERT_EQUAL(uv_loop_close(&run.loop), 0);
    rm_tmpdir();
}

static void test_apply_failure(void)
{
    struct run run;
    struct cfsm f;
    struct rep_info info;
    uint64_t applied;

    memset(&f, 0, sizeof f);
    CU_ASSERT_PTR_NOT_NULL_FATAL(mkdtemp(strcpy(tmpdir, "/tmp/coffer-rep-XXXXXX")));
    CU_ASSERT_EQUAL_FATAL(start_rep(&run, &f, 1024, 512), 0);
    CU_ASSERT_TRUE_FATAL(run_until(&run, leader_and_caught_up, 5000));
    CU_ASSERT_EQUAL(propose_value(&run, 1u), 0);
    CU_ASSERT_TRUE(run_until(&run, one_cb, 5000));
    applied = f.applied;
    /* The FSM refuses an entry: rep stops applying (never skips it) and
     * refuses new proposals; the entry's callback does not report success. */
    run.n_cb = 0;
    run.n_ok = 0;
    CU_ASSERT_EQUAL(propose_value(&run, 0xdeadu), 0);
    run_until(&run, one_cb, 300);
    CU_ASSERT_EQUAL(run.n_ok, 0);
    CU_ASSERT_EQUAL(f.applied, applied);
    rep_get_info(run.rep, &info);
    CU_ASSERT_EQUAL(info.applied_index, applied);
    CU_ASSERT_EQUAL(propose_value(&run, 2u), REP_EIO);
    stop_rep(&run);
    rm_tmpdir();
}

/* Entries above libraft's default 8 MiB open segment size are stored and
 * replayed intact (checked: libraft 0.15 needs no segment resizing for
 * them); odd lengths work because rep pads. */
static void test_big_entries(void)
{
    struct run run;
    struct cfsm f;
    size_t len = 10 * 1024 * 1024 + 3;
    unsigned char *b;
    uint64_t idx;

    memset(&f, 0, sizeof f);
    max_entry = 12 * 1024 * 1024;
    CU_ASSERT_PTR_NOT_NULL_FATAL(mkdtemp(strcpy(tmpdir, "/tmp/coffer-rep-XXXXXX")));
    CU_ASSERT_EQUAL_FATAL(start_rep(&run, &f, 1024, 512), 0);
    CU_ASSERT_TRUE_FATAL(run_until(&run, leader_and_caught_up, 5000));
    b = rep_buf_alloc(len);
    CU_ASSERT_PTR_NOT_NULL_FATAL(b);
    memset(b, 0x41, len);
    b[0] = 0x17;
    b[len - 1] = 0x29;
    CU_ASSERT_EQUAL(rep_propose(run.rep, b, len, propose_cb, &run), 0);
    CU_ASSERT_TRUE(run_until(&run, one_cb, 20000));
    CU_ASSERT_EQUAL(run.n_ok, 1);
    idx = f.applied;
    CU_ASSERT_EQUAL(f.value[idx], (uint32_t)len ^ 0x17u ^ (0x29u << 8));
    /* Shorter than allocated is fine; longer is refused. */
    b = rep_buf_alloc(100);
    CU_ASSERT_EQUAL(rep_propose(run.rep, b, 101, propose_cb, &run), REP_EIO);
    b = rep_buf_alloc(100);
    memset(b, 0, 100);
    b[12] = 0x05;
    run.n_cb = 0;
    run.n_ok = 0;
    CU_ASSERT_EQUAL(rep_propose(run.rep, b, 13, propose_cb, &run), 0);
    CU_ASSERT_TRUE(run_until(&run, one_cb, 5000));
    CU_ASSERT_EQUAL(run.n_ok, 1);
    CU_ASSERT_EQUAL(f.value[f.applied], 13u ^ 0u ^ (0x05u << 8));
    stop_rep(&run);
    /* Restart: the big entry is replayed intact from the log. */
    CU_ASSERT_EQUAL_FATAL(start_rep(&run, &f, 1024, 512), 0);
    first_run_last_index = idx;
    CU_ASSERT_TRUE(run_until(&run, applied_first_run, 10000));
    CU_ASSERT_TRUE(f.n_replayed >= 1);
    CU_ASSERT_EQUAL(f.n_replay_mismatch, 0);
    stop_rep(&run);
    max_entry = 1024;
    rm_tmpdir();
}

/* Snapshots every 2 entries with 1 trailing entry, taken while later
 * entries are still being written: nothing committed may go missing from
 * the log across a restart. */
static void test_tiny_snapshots_keep_log(void)
{
    struct run run;
    struct cfsm f;
    struct rep_info info;
    int i;

    memset(&f, 0, sizeof f);
    CU_ASSERT_PTR_NOT_NULL_FATAL(mkdtemp(strcpy(tmpdir, "/tmp/coffer-rep-XXXXXX")));
    CU_ASSERT_EQUAL_FATAL(start_rep(&run, &f, 2, 1), 0);
    CU_ASSERT_TRUE_FATAL(run_until(&run, leader_and_caught_up, 5000));
    for (i = 0; i < N_ENTRIES; i++)
        CU_ASSERT_EQUAL(propose_value(&run, 500u + (uint32_t)i), 0);
    CU_ASSERT_TRUE(run_until(&run, all_cbs, 20000));
    CU_ASSERT_EQUAL(run.n_ok, N_ENTRIES);
    CU_ASSERT_TRUE(f.n_snapshots >= 1);
    rep_get_info(run.rep, &info);
    first_run_last_index = info.last_index;
    CU_ASSERT_EQUAL(first_run_last_index, N_ENTRIES + 1);
    stop_rep(&run);

    CU_ASSERT_EQUAL_FATAL(start_rep(&run, &f, 2, 1), 0);
    CU_ASSERT_EQUAL(f.n_restore_bad, 0);
    CU_ASSERT_TRUE(run_until(&run, applied_first_run, 5000));
    rep_get_info(run.rep, &info);
    CU_ASSERT_EQUAL(info.last_index, first_run_last_index);
    /* The next entry gets a fresh index, not one the FSM already applied. */
    run.n_cb = 0;
    run.n_ok = 0;
    CU_ASSERT_EQUAL(propose_value(&run, 31337u), 0);
    CU_ASSERT_TRUE(run_until(&run, one_cb, 5000));
    CU_ASSERT_EQUAL(run.n_ok, 1);
    CU_ASSERT_EQUAL(f.applied, first_run_last_index + 1);
    CU_ASSERT_EQUAL(f.value[f.applied], 31337u);
    CU_ASSERT_EQUAL(f.n_applied, N_ENTRIES + 1);
    stop_rep(&run);
    rm_tmpdir();
}

/* raft.snapshot_bytes: with an entry threshold that is never reached,
 * 20 KiB entries still make libraft snapshot every 64 KiB, and what it
 * keeps after a snapshot is bounded by bytes too; a restart replays
 * everything after the last snapshot intact. */
static void test_snapshot_by_bytes(void)
{
    struct run run;
    struct cfsm f;
    struct rep_info info;
    size_t len = 20 * 1024;
    int i;

    memset(&f, 0, sizeof f);
    max_entry = 1024 * 1024;
    snap_bytes = 64 * 1024;
    CU_ASSERT_PTR_NOT_NULL_FATAL(mkdtemp(strcpy(tmpdir, "/tmp/coffer-rep-XXXXXX")));
    CU_ASSERT_EQUAL_FATAL(start_rep(&run, &f, 100000, 512), 0);
    CU_ASSERT_TRUE_FATAL(run_until(&run, leader_and_caught_up, 5000));
    for (i = 0; i < 20; i++) {
        unsigned char *b = rep_buf_alloc(len);
        CU_ASSERT_PTR_NOT_NULL_FATAL(b);
        memset(b, 0x11 + i, len);
        run.n_cb = 0;
        CU_ASSERT_EQUAL(rep_propose(run.rep, b, len, propose_cb, &run), 0);
        CU_ASSERT_TRUE(run_until(&run, one_cb, 5000));
    }
    rep_get_info(run.rep, &info);
    CU_ASSERT(f.n_snapshots >= 4);
    CU_ASSERT(info.last_snapshot_index >= 13);
    first_run_last_index = info.last_index;
    stop_rep(&run);
    CU_ASSERT_EQUAL_FATAL(start_rep(&run, &f, 100000, 512), 0);
    CU_ASSERT_EQUAL(f.n_restore_bad, 0);
    CU_ASSERT_TRUE(run_until(&run, applied_first_run, 5000));
    CU_ASSERT_EQUAL(f.n_replay_mismatch, 0);
    stop_rep(&run);
    max_entry = 1024;
    snap_bytes = 0;
    rm_tmpdir();
}

/* ---- fragmented entries (three fixture servers, virtual time) ---- */

#define FX_N 3
#define FX_MAX 64

/* Records every apply: index, length and a checksum of the payload. */
struct bfsm {
    unsigned n;
    uint64_t index[FX_MAX];
    size_t len[FX_MAX];
    uint32_t sum[FX_MAX];
    uint64_t snap[FX_MAX];
    unsigned n_snap;
};

static uint32_t sum32(const unsigned char *p, size_t len)
{
    uint32_t h = 2166136261u;
    for (size_t i = 0; i < len; i++)
        h = (h ^ p[i]) * 16777619u;
    return h;
}

static int bfsm_apply(void *fsm, uint64_t index, const void *buf, size_t len)
{
    struct bfsm *f = fsm;
    if (f->n >= FX_MAX) return -1;
    f->index[f->n] = index;
    f->len[f->n] = len;
    f->sum[f->n] = sum32(buf, len);
    f->n++;
    return 0;
}

static int bfsm_snapshot(void *fsm, uint64_t index, void **buf_r, size_t *len_r)
{
    struct bfsm *f = fsm;
    uint64_t *d = malloc(sizeof *d);
    if (d == NULL) return -1;
    *d = index;
    if (f->n_snap < FX_MAX) f->snap[f->n_snap++] = index;
    *buf_r = d;
    *len_r = sizeof *d;
    return 0;
}

static int bfsm_restore(void *fsm, const void *buf, size_t len)
{
    (void)fsm;
    (void)buf;
    return len == sizeof(uint64_t) ? 0 : -1;
}

static const struct rep_fsm_ops bfsm_ops = {bfsm_apply, bfsm_snapshot, bfsm_restore, NULL};

static struct raft_fixture fx;
static struct bfsm fx_fsm[FX_N];
static struct rep_fsm_adapter *fx_ad[FX_N];
static int fx_ok, fx_fail;

static int fx_setup(unsigned threshold, unsigned trailing)
{
    struct raft_configuration conf;

    memset(&fx, 0, sizeof fx);
    memset(fx_fsm, 0, sizeof fx_fsm);
    fx_ok = fx_fail = 0;
    if (raft_fixture_initialize(&fx) != 0) return -1;
    for (unsigned i = 0; i < FX_N; i++) {
        fx_ad[i] = rep_adapter_create(&bfsm_ops, &fx_fsm[i]);
        if (fx_ad[i] == NULL || raft_fixture_grow(&fx, rep_adapter_fsm(fx_ad[i])) != 0) return -1;
        rep_adapter_bind(fx_ad[i], raft_fixture_get(&fx, i));
        raft_set_snapshot_threshold(raft_fixture_get(&fx, i), threshold);
        raft_set_snapshot_trailing(raft_fixture_get(&fx, i), trailing);
    }
    raft_configuration_init(&conf);
    if (raft_fixture_configuration(&fx, FX_N, &conf) != 0) return -1;
    if (raft_fixture_bootstrap(&fx, &conf) != 0) return -1;
    raft_configuration_close(&conf);
    if (raft_fixture_start(&fx) != 0) return -1;
    raft_fixture_elect(&fx, 0);
    return 0;
}

static void fx_teardown(void)
{
    raft_fixture_close(&fx);
    for (unsigned i = 0; i < FX_N; i++)
        rep_adapter_destroy(&fx_ad[i]);
}

static void fx_apply_cb(struct raft_apply *req, int status, void *result)
{
    (void)result;
    if (status == 0)
        fx_ok++;
    else
        fx_fail++;
    free(req);
}

static void fx_submit(void *base, size_t len)
{
    struct raft_apply *req = calloc(1, sizeof *req);
    struct raft_buffer b;
    b.base = base;
    b.len = len;
    CU_ASSERT_FATAL(req != NULL);
    CU_ASSERT_EQUAL_FATAL(raft_apply(raft_fixture_get(&fx, 0), req, &b, 1, fx_apply_cb), 0);
}

/* A plain entry of `len` bytes of `fill`. */
static void fx_plain(size_t len, unsigned char fill)
{
    void *buf = rep_buf_alloc(len), *base;
    size_t blen;
    CU_ASSERT_FATAL(buf != NULL);
    memset(buf, fill, len);
    rep_frame_finish(buf, len, &base, &blen);
    fx_submit(base, blen);
}

/* Fragments [from, to) of a message (term, counter) made of `count`
 * fragments of `flen` bytes over `msg` (`total` bytes). */
static void fx_frags(const unsigned char *msg, size_t total, size_t flen, uint32_t counter,
                     uint32_t from, uint32_t to)
{
    uint32_t count = (uint32_t)((total + flen - 1) / flen);
    for (uint32_t k = from; k < to && k < count; k++) {
        size_t off = (size_t)k * flen, n = total - off < flen ? total - off : flen, blen;
        void *f = rep_frame_fragment(msg + off, n, 7, counter, k, count, total, &blen);
        CU_ASSERT_FATAL(f != NULL);
        CU_ASSERT_EQUAL(blen % 8, 0);
        fx_submit(f, blen);
    }
}

static void fx_settle(void)
{
    raft_fixture_step_until_applied(&fx, FX_N, raft_last_index(raft_fixture_get(&fx, 0)), 10000);
}

/* The FSMs of all servers saw the same applies. */
static void fx_same_everywhere(void)
{
    for (unsigned i = 1; i < FX_N; i++) {
        CU_ASSERT_EQUAL(fx_fsm[i].n, fx_fsm[0].n);
        for (unsigned k = 0; k < fx_fsm[0].n && k < fx_fsm[i].n; k++) {
            CU_ASSERT_EQUAL(fx_fsm[i].index[k], fx_fsm[0].index[k]);
            CU_ASSERT_EQUAL(fx_fsm[i].len[k], fx_fsm[0].len[k]);
            CU_ASSERT_EQUAL(fx_fsm[i].sum[k], fx_fsm[0].sum[k]);
        }
    }
}

/* A message in fragments reaches every FSM once, whole, at the index of
 * its last fragment; plain entries around it are untouched. */
static void test_fragments_reassembled(void)
{
    size_t total = 10007;
    unsigned char *msg = malloc(total);
    uint64_t first;

    CU_ASSERT_FATAL(msg != NULL);
    for (size_t i = 0; i < total; i++)
        msg[i] = (unsigned char)(i * 31 + 7);
    CU_ASSERT_EQUAL_FATAL(fx_setup(1000, 100), 0);
    fx_plain(5, 0x11);
    fx_settle();
    first = raft_last_index(raft_fixture_get(&fx, 0)) + 1;
    fx_frags(msg, total, 1000, 1, 0, 11);
    fx_plain(3, 0x22);
    fx_settle();
    CU_ASSERT_EQUAL(fx_fail, 0);
    CU_ASSERT_EQUAL(fx_fsm[0].n, 3);
    CU_ASSERT_EQUAL(fx_fsm[0].len[0], 5);
    CU_ASSERT_EQUAL(fx_fsm[0].len[1], total);
    CU_ASSERT_EQUAL(fx_fsm[0].sum[1], sum32(msg, total));
    CU_ASSERT_EQUAL(fx_fsm[0].index[1], first + 10);
    CU_ASSERT_EQUAL(fx_fsm[0].len[2], 3);
    CU_ASSERT_EQUAL(fx_fsm[0].index[2], first + 11);
    fx_same_everywhere();
    for (unsigned i = 0; i < FX_N; i++)
        CU_ASSERT_FALSE(rep_adapter_fatal(fx_ad[i]));
    fx_teardown();
    free(msg);
}

/* A message whose proposer stopped after some fragments (leadership lost)
 * is dropped by every node at the next entry; a stray continuation is
 * ignored; the next whole message applies normally. */
static void test_fragments_unfinished_dropped(void)
{
    size_t total = 4000;
    unsigned char *msg = malloc(total);

    CU_ASSERT_FATAL(msg != NULL);
    memset(msg, 0x5a, total);
    CU_ASSERT_EQUAL_FATAL(fx_setup(1000, 100), 0);
    fx_frags(msg, total, 1000, 1, 0, 3); /* 3 of 4 */
    fx_plain(4, 0x33);                   /* ends it */
    fx_frags(msg, total, 1000, 1, 3, 4); /* stray last fragment */
    fx_frags(msg, total, 1000, 2, 0, 2); /* 2 of 4 ... */
    fx_frags(msg, total, 1000, 3, 0, 4); /* ... replaced by a whole one */
    fx_settle();
    CU_ASSERT_EQUAL(fx_fail, 0);
    CU_ASSERT_EQUAL(fx_fsm[0].n, 2);
    CU_ASSERT_EQUAL(fx_fsm[0].len[0], 4);
    CU_ASSERT_EQUAL(fx_fsm[0].len[1], total);
    CU_ASSERT_EQUAL(fx_fsm[0].sum[1], sum32(msg, total));
    fx_same_everywhere();
    for (unsigned i = 0; i < FX_N; i++)
        CU_ASSERT_FALSE(rep_adapter_fatal(fx_ad[i]));
    fx_teardown();
    free(msg);
}

/* With a snapshot due every 2 entries, no snapshot is taken between the
 * fragments of a message (the log replayed after a restart must hold whole
 * messages): every snapshot index is one the FSM applied. */
static void test_fragments_no_snapshot_inside(void)
{
    size_t total = 8000;
    unsigned char *msg = malloc(total);
    uint64_t first;

    CU_ASSERT_FATAL(msg != NULL);
    memset(msg, 0x6b, total);
    CU_ASSERT_EQUAL_FATAL(fx_setup(2, 1), 0);
    fx_plain(8, 1);
    fx_settle();
    first = raft_last_index(raft_fixture_get(&fx, 0)) + 1;
    fx_frags(msg, total, 1000, 1, 0, 8);
    fx_plain(8, 2);
    fx_plain(8, 3);
    fx_settle();
    CU_ASSERT_EQUAL(fx_fail, 0);
    CU_ASSERT_EQUAL(fx_fsm[0].n, 4);
    for (unsigned i = 0; i < FX_N; i++) {
        CU_ASSERT(fx_fsm[i].n_snap >= 1);
        for (unsigned k = 0; k < fx_fsm[i].n_snap; k++)
            CU_ASSERT(fx_fsm[i].snap[k] < first || fx_fsm[i].snap[k] >= first + 7);
        CU_ASSERT_FALSE(rep_adapter_fatal(fx_ad[i]));
    }
    fx_same_everywhere();
    fx_teardown();
    free(msg);
}

/* A follower that was cut off while a 12 MiB message (1 MiB fragments) was
 * appended catches up through AppendEntries messages cut to a few MiB (the
 * leader probes, is rejected after a cut message in pipeline mode, probes
 * again): it ends with the same applies as the others. */
static void test_fragments_catch_up_bounded(void)
{
    size_t total = 12 * 1024 * 1024 + 11;
    unsigned char *msg = malloc(total);

    CU_ASSERT_FATAL(msg != NULL);
    for (size_t i = 0; i < total; i++)
        msg[i] = (unsigned char)(i * 7 + (i >> 20));
    CU_ASSERT_EQUAL_FATAL(fx_setup(1000, 100), 0);
    fx_plain(4, 9);
    fx_settle();
    raft_fixture_disconnect(&fx, 0, 2);
    raft_fixture_disconnect(&fx, 2, 0);
    fx_frags(msg, total, 1024 * 1024, 1, 0, 13);
    fx_plain(4, 10);
    raft_fixture_step_until_applied(&fx, 1, raft_last_index(raft_fixture_get(&fx, 0)), 10000);
    CU_ASSERT_EQUAL(fx_fsm[1].n, 3);
    CU_ASSERT_EQUAL(fx_fsm[2].n, 1);
    raft_fixture_reconnect(&fx, 0, 2);
    raft_fixture_reconnect(&fx, 2, 0);
    fx_settle();
    CU_ASSERT_EQUAL(fx_fail, 0);
    CU_ASSERT_EQUAL(fx_fsm[2].n, 3);
    CU_ASSERT_EQUAL(fx_fsm[2].len[1], total);
    CU_ASSERT_EQUAL(fx_fsm[2].sum[1], sum32(msg, total));
    CU_ASSERT_EQUAL(raft_fixture_leader_index(&fx), 0);
    fx_same_everywhere();
    for (unsigned i = 0; i < FX_N; i++)
        CU_ASSERT_FALSE(rep_adapter_fatal(fx_ad[i]));
    fx_teardown();
    free(msg);
}

/* A real entry far above the fragment size (5 MiB + 3, fragments of
 * 1 MiB) with a snapshot due every 2 entries and 1 trailing entry: applied
 * once and whole, snapshots only at whole entries, and replayed intact
 * after a restart. */
static void test_big_entry_fragments_snapshots(void)
{
    struct run run;
    struct cfsm f;
    size_t len = 5 * 1024 * 1024 + 3;
    unsigned char *b;
    uint64_t idx;

    memset(&f, 0, sizeof f);
    max_entry = 12 * 1024 * 1024;
    CU_ASSERT_PTR_NOT_NULL_FATAL(mkdtemp(strcpy(tmpdir, "/tmp/coffer-rep-XXXXXX")));
    CU_ASSERT_EQUAL_FATAL(start_rep(&run, &f, 2, 1), 0);
    CU_ASSERT_TRUE_FATAL(run_until(&run, leader_and_caught_up, 5000));
    CU_ASSERT_EQUAL(propose_value(&run, 77u), 0);
    CU_ASSERT_TRUE(run_until(&run, one_cb, 5000));
    b = rep_buf_alloc(len);
    CU_ASSERT_PTR_NOT_NULL_FATAL(b);
    memset(b, 0x42, len);
    b[0] = 0x13;
    b[len - 1] = 0x31;
    run.n_cb = 0;
    CU_ASSERT_EQUAL(rep_propose(run.rep, b, len, propose_cb, &run), 0);
    CU_ASSERT_TRUE(run_until(&run, one_cb, 20000));
    CU_ASSERT_EQUAL(run.n_ok, 2);
    idx = f.applied;
    CU_ASSERT_EQUAL(f.value[idx], (uint32_t)len ^ 0x13u ^ (0x31u << 8));
    CU_ASSERT_EQUAL(f.n_applied, 2);
    CU_ASSERT_EQUAL(f.n_snapshot_bad_index, 0);
    run.n_cb = 0;
    CU_ASSERT_EQUAL(propose_value(&run, 78u), 0);
    CU_ASSERT_TRUE(run_until(&run, one_cb, 5000));
    CU_ASSERT_EQUAL(f.n_snapshot_bad_index, 0);
    CU_ASSERT(f.n_snapshots >= 1);
    first_run_last_index = f.applied;
    stop_rep(&run);
    CU_ASSERT_EQUAL_FATAL(start_rep(&run, &f, 2, 1), 0);
    CU_ASSERT_EQUAL(f.n_restore_bad, 0);
    CU_ASSERT_TRUE(run_until(&run, applied_first_run, 10000));
    CU_ASSERT_EQUAL(f.n_replay_mismatch, 0);
    CU_ASSERT_EQUAL(f.n_applied, 3);
    stop_rep(&run);
    max_entry = 1024;
    rm_tmpdir();
}

struct prep_job {
    struct rep *rep;
    void *buf;
    size_t len;
    struct rep_prepared *out;
};

static void prep_thread(void *arg)
{
    struct prep_job *j = arg;
    j->out = rep_prepare(j->rep, j->buf, j->len);
}

/* rep_prepare on another thread, rep_propose_prepared on the loop: a big
 * payload (fragments) and a small one apply like rep_propose's; a bad
 * buffer is refused; a prepared proposal can be dropped unproposed. */
static void test_prepared_proposals(void)
{
    struct run run;
    struct cfsm f;
    struct prep_job j;
    uv_thread_t th;
    size_t len = 3 * 1024 * 1024 + 5;
    unsigned char *b;

    memset(&f, 0, sizeof f);
    max_entry = 12 * 1024 * 1024;
    CU_ASSERT_PTR_NOT_NULL_FATAL(mkdtemp(strcpy(tmpdir, "/tmp/coffer-rep-XXXXXX")));
    CU_ASSERT_EQUAL_FATAL(start_rep(&run, &f, 1024, 512), 0);
    CU_ASSERT_TRUE_FATAL(run_until(&run, leader_and_caught_up, 5000));
    b = rep_buf_alloc(len);
    CU_ASSERT_PTR_NOT_NULL_FATAL(b);
    memset(b, 0x24, len);
    b[0] = 0x01;
    b[len - 1] = 0x02;
    j.rep = run.rep;
    j.buf = b;
    j.len = len;
    j.out = NULL;
    CU_ASSERT_EQUAL_FATAL(uv_thread_create(&th, prep_thread, &j), 0);
    uv_thread_join(&th);
    CU_ASSERT_PTR_NOT_NULL_FATAL(j.out);
    CU_ASSERT_EQUAL(rep_propose_prepared(run.rep, j.out, propose_cb, &run), 0);
    CU_ASSERT_TRUE(run_until(&run, one_cb, 20000));
    CU_ASSERT_EQUAL(run.n_ok, 1);
    CU_ASSERT_EQUAL(f.value[f.applied], (uint32_t)len ^ 0x01u ^ (0x02u << 8));
    /* small: one entry */
    b = rep_buf_alloc(4);
    CU_ASSERT_PTR_NOT_NULL_FATAL(b);
    memcpy(b, &(uint32_t){4711u}, 4);
    run.n_cb = 0;
    CU_ASSERT_EQUAL(rep_propose_prepared(run.rep, rep_prepare(run.rep, b, 4), propose_cb, &run), 0);
    CU_ASSERT_TRUE(run_until(&run, one_cb, 5000));
    CU_ASSERT_EQUAL(f.value[f.applied], 4711u);
    /* refusals and drops free everything (checked under ASan) */
    b = rep_buf_alloc(10);
    CU_ASSERT_PTR_NULL(rep_prepare(run.rep, b, 11));
    CU_ASSERT_EQUAL(rep_propose_prepared(run.rep, NULL, propose_cb, &run), REP_ENOMEM);
    b = rep_buf_alloc(len);
    CU_ASSERT_PTR_NOT_NULL_FATAL(b);
    memset(b, 0, len);
    rep_prepared_free(rep_prepare(run.rep, b, len));
    stop_rep(&run);
    max_entry = 1024;
    rm_tmpdir();
}

/* ---- the checkpoint writer (storenode/checkpoint.c) ---- */

/* A paced copy (write-back after every batch, rate limit) is as good as a
 * plain one: same size and SHA-256, and it keeps to the rate. A manager
 * whose directory cannot hold a full copy plus the reserve skips the
 * checkpoint (counted) instead of filling the disk. */
static void test_checkpoint_gentle(void)
{
    struct store *st = NULL;
    struct ckpt_mgr *m;
    struct ckpt_mgr_config cc;
    struct ckpt_stats stats;
    char dir[96], p1[128], p2[128], h1[65], h2[65], err[256];
    uint64_t s1 = 0, s2 = 0, t0;
    MDB_txn *rt;

    CU_ASSERT_PTR_NOT_NULL_FATAL(mkdtemp(strcpy(tmpdir, "/tmp/coffer-rep-XXXXXX")));
    snprintf(dir, sizeof dir, "%s/store", tmpdir);
    CU_ASSERT_FATAL(mkdir(dir, 0700) == 0);
    CU_ASSERT_EQUAL_FATAL(store_open(dir, 256ull << 20, &st, err, sizeof err), 0);
    snprintf(p1, sizeof p1, "%s/plain.mdb", tmpdir);
    snprintf(p2, sizeof p2, "%s/paced.mdb", tmpdir);
    rt = store_rtxn_begin(st);
    CU_ASSERT_PTR_NOT_NULL_FATAL(rt);
    CU_ASSERT_EQUAL(ckpt_copy(st, rt, p1, 0, NULL, err, sizeof err), 0);
    t0 = uv_hrtime();
    /* at 1000 bytes/s even a new store's few records (>= 64 bytes each as
     * counted) take >= 64 ms */
    CU_ASSERT_EQUAL(ckpt_copy_paced(st, rt, p2, 4096, 1000, NULL, err, sizeof err), 0);
    store_rtxn_end(rt);
    CU_ASSERT_EQUAL(ckpt_hash_file(p1, &s1, h1, err, sizeof err), 0);
    CU_ASSERT_EQUAL(ckpt_hash_file(p2, &s2, h2, err, sizeof err), 0);
    CU_ASSERT(s1 > 0);
    CU_ASSERT_EQUAL(s1, s2);
    CU_ASSERT_STRING_EQUAL(h1, h2);
    CU_ASSERT((uv_hrtime() - t0) / 1000000u >= 50);

    memset(&cc, 0, sizeof cc);
    snprintf(p1, sizeof p1, "%s/checkpoints", tmpdir);
    cc.dir = p1;
    cc.keep = 1;
    cc.min_free_bytes = 1ull << 60; /* no disk has that */
    m = ckpt_mgr_create(st, &cc, err, sizeof err);
    CU_ASSERT_PTR_NOT_NULL_FATAL(m);
    CU_ASSERT_EQUAL(ckpt_mgr_take(m), 1);
    CU_ASSERT_EQUAL(ckpt_mgr_take(m), 1);
    ckpt_mgr_stats(m, &stats);
    CU_ASSERT_EQUAL(stats.skipped_space, 2);
    CU_ASSERT_EQUAL(stats.taken, 0);
    CU_ASSERT_STRING_EQUAL(ckpt_mgr_state(m), "idle");
    ckpt_mgr_destroy(&m);
    cc.min_free_bytes = 0; /* default reserve: fits */
    m = ckpt_mgr_create(st, &cc, err, sizeof err);
    CU_ASSERT_PTR_NOT_NULL_FATAL(m);
    CU_ASSERT_EQUAL(ckpt_mgr_take(m), 0);
    ckpt_mgr_wait(m);
    ckpt_mgr_stats(m, &stats);
    CU_ASSERT_EQUAL(stats.taken, 1);
    CU_ASSERT_EQUAL(stats.skipped_space, 0);
    ckpt_mgr_destroy(&m);
    store_close(&st);
    rm_tmpdir();
}

/* ---- a blocked event loop (two real nodes, two loops) ---- */

struct pair {
    uv_loop_t la, lb; /* a: leader, own thread; b: follower, this thread */
    uv_timer_t ta, tb;
    uv_async_t stop_a, add_a, block_a;
    uv_thread_t thread;
    struct rep *a, *b, *c; /* a and c share loop la */
    struct cfsm fa, fb, fc;
    char baddr[32], caddr[32];
    volatile int added, add_status, a_leader, c_added;
};

static void pair_stop_cb(uv_timer_t *t)
{
    uv_stop(t->loop);
}

static void pair_run(uv_loop_t *l, uv_timer_t *t, uint64_t ms)
{
    uv_timer_start(t, pair_stop_cb, ms, 0);
    uv_run(l, UV_RUN_DEFAULT);
}

static void pair_added_cb(void *arg, int status)
{
    struct pair *p = arg;
    p->add_status = status;
    p->added = 1;
}

static void pair_c_added_cb(void *arg, int status)
{
    struct pair *p = arg;
    p->c_added = 1;
    if (status != REP_OK || rep_add(p->a, 2, p->baddr, REP_ROLE_VOTER, pair_added_cb, p) != 0) {
        p->add_status = status != REP_OK ? status : -100;
        p->added = 1;
    }
}

static void pair_add_async(uv_async_t *h)
{
    struct pair *p = h->data;
    if (rep_add(p->a, 3, p->caddr, REP_ROLE_VOTER, pair_c_added_cb, p) != 0) {
        p->add_status = -100;
        p->added = 1;
    }
}

static void pair_block_async(uv_async_t *h)
{
    (void)h;
    usleep(2500 * 1000); /* the leader's loop (and c's) too */
}

static void pair_stop_async(uv_async_t *h)
{
    uv_stop(h->loop);
}

static void pair_leader_poll(uv_timer_t *t)
{
    struct pair *p = t->data;
    p->a_leader = rep_is_leader(p->a);
}

static void pair_thread(void *arg)
{
    struct pair *p = arg;
    uv_timer_start(&p->ta, pair_leader_poll, 10, 10);
    uv_run(&p->la, UV_RUN_DEFAULT);
    uv_timer_stop(&p->ta);
}

/* Blocks once, after the I/O phase (like a long apply or log write
 * callback would): the next loop iteration starts with the timers. */
static void pair_block_cb(uv_check_t *h)
{
    uv_check_stop(h);
    usleep(2500 * 1000); /* longer than twice the election timeout */
}

static struct rep *pair_node(uv_loop_t *loop, uint64_t id, uint16_t port, const char *dir,
                             struct cfsm *f, int bootstrap)
{
    struct rep_config cfg;
    char addr[32], err[512];
    struct rep *r;

    snprintf(addr, sizeof addr, "127.0.0.1:%u", port);
    memset(&cfg, 0, sizeof cfg);
    cfg.node_id = id;
    cfg.address = addr;
    cfg.data_dir = dir;
    cfg.election_timeout_ms = 1000;
    cfg.heartbeat_ms = 100;
    cfg.snapshot_threshold = 1024;
    cfg.snapshot_trailing = 512;
    cfg.max_entry_bytes = 1024;
    r = rep_create(loop, &cfg, &cfsm_ops, f, err, sizeof err);
    if (r == NULL) {
        fprintf(stderr, "rep_create: %s\n", err);
        return NULL;
    }
    if (rep_start_mode(r, bootstrap, err, sizeof err) != 0) fprintf(stderr, "start: %s\n", err);
    return r;
}

/* A loopback TCP port nobody listens on right now (the kernel's pick). */
static uint16_t free_port(void)
{
    struct sockaddr_in sa;
    socklen_t sl = sizeof sa;
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    uint16_t port = 0;

    memset(&sa, 0, sizeof sa);
    sa.sin_family = AF_INET;
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (fd >= 0 && bind(fd, (struct sockaddr *)&sa, sizeof sa) == 0 &&
        getsockname(fd, (struct sockaddr *)&sa, &sl) == 0)
        port = ntohs(sa.sin_port);
    if (fd >= 0) close(fd);
    return port;
}

static void pair_closed_cb(void *arg)
{
    (*(int *)arg)++;
}

/* Three voters; one follower's loop is blocked for 2.5 s (election
 * timeout 1 s) while the leader and the other follower, in another
 * thread, go on: afterwards the blocked follower reads the heartbeats
 * waiting in its socket before it looks at its election timer, so it
 * starts no election (not even a pre-vote). Then every loop is blocked at
 * once: still no election. */
static void test_blocked_loop_no_election(void)
{
    struct pair *p = calloc(1, sizeof *p);
    struct rep_info ib, ib2, ia2;
    char da[96], db[96], dc[96];
    uint16_t pa, pb, pc;
    int closed = 0;

    CU_ASSERT_FATAL(p != NULL);
    CU_ASSERT_PTR_NOT_NULL_FATAL(mkdtemp(strcpy(tmpdir, "/tmp/coffer-rep-XXXXXX")));
    snprintf(da, sizeof da, "%s/a", tmpdir);
    snprintf(db, sizeof db, "%s/b", tmpdir);
    snprintf(dc, sizeof dc, "%s/c", tmpdir);
    CU_ASSERT_FATAL(mkdir(da, 0700) == 0 && mkdir(db, 0700) == 0 && mkdir(dc, 0700) == 0);
    CU_ASSERT_EQUAL_FATAL(uv_loop_init(&p->la), 0);
    CU_ASSERT_EQUAL_FATAL(uv_loop_init(&p->lb), 0);
    uv_timer_init(&p->la, &p->ta);
    uv_timer_init(&p->lb, &p->tb);
    p->ta.data = p->tb.data = p;
    uv_async_init(&p->la, &p->stop_a, pair_stop_async);
    uv_async_init(&p->la, &p->add_a, pair_add_async);
    uv_async_init(&p->la, &p->block_a, pair_block_async);
    p->stop_a.data = p->add_a.data = p->block_a.data = p;
    pa = free_port();
    pb = free_port();
    pc = free_port();
    CU_ASSERT_FATAL(pa != 0 && pb != 0 && pc != 0 && pa != pb && pb != pc && pa != pc);
    snprintf(p->baddr, sizeof p->baddr, "127.0.0.1:%u", pb);
    snprintf(p->caddr, sizeof p->caddr, "127.0.0.1:%u", pc);
    p->a = pair_node(&p->la, 1, pa, da, &p->fa, 1);
    p->b = pair_node(&p->lb, 2, pb, db, &p->fb, 0);
    p->c = pair_node(&p->la, 3, pc, dc, &p->fc, 0);
    CU_ASSERT_FATAL(p->a != NULL && p->b != NULL && p->c != NULL);
    CU_ASSERT_FATAL(rep_is_started(p->a) && rep_is_started(p->b) && rep_is_started(p->c));
    CU_ASSERT_EQUAL_FATAL(uv_thread_create(&p->thread, pair_thread, p), 0);
    for (int i = 0; i < 100 && !p->a_leader; i++)
        pair_run(&p->lb, &p->tb, 50);
    CU_ASSERT_FATAL(p->a_leader);
    uv_async_send(&p->add_a);
    for (int i = 0; i < 200 && !p->added; i++)
        pair_run(&p->lb, &p->tb, 50);
    CU_ASSERT_FATAL(p->added && p->add_status == REP_OK);
    pair_run(&p->lb, &p->tb, 1000); /* steady heartbeats */
    rep_get_info(p->b, &ib);
    CU_ASSERT_EQUAL(ib.leader_id, 1);
    for (int k = 0; k < 2; k++) {
        uv_check_t blk;
        uv_check_init(&p->lb, &blk);
        uv_check_start(&blk, pair_block_cb);
        pair_run(&p->lb, &p->tb, 1000);
        uv_close((uv_handle_t *)&blk, NULL);
        pair_run(&p->lb, &p->tb, 10);
    }
    rep_get_info(p->b, &ib2);
    CU_ASSERT_EQUAL(ib2.term, ib.term);
    CU_ASSERT_EQUAL(ib2.leader_id, 1);
    CU_ASSERT_EQUAL(ib2.elections_started, ib.elections_started);
    CU_ASSERT(ib2.loop_stalls >= 2);
    /* Every node blocked at once (one busy machine): the leader sent
     * nothing meanwhile, but the followers do not count the time they were
     * blocked themselves. */
    {
        uv_check_t blk;
        uv_check_init(&p->lb, &blk);
        uv_async_send(&p->block_a);
        uv_check_start(&blk, pair_block_cb);
        pair_run(&p->lb, &p->tb, 1000);
        uv_close((uv_handle_t *)&blk, NULL);
        pair_run(&p->lb, &p->tb, 10);
    }
    rep_get_info(p->b, &ib2);
    CU_ASSERT_EQUAL(ib2.term, ib.term);
    CU_ASSERT_EQUAL(ib2.leader_id, 1);
    CU_ASSERT_EQUAL(ib2.elections_started, ib.elections_started);
    CU_ASSERT(ib2.loop_stalls >= 3);
    CU_ASSERT_TRUE(p->a_leader);
    uv_async_send(&p->stop_a);
    uv_thread_join(&p->thread);
    rep_get_info(p->a, &ia2); /* thread a has ended: its loop is ours now */
    CU_ASSERT_TRUE(ia2.is_leader);
    CU_ASSERT_EQUAL(ia2.term, ib.term);
    rep_close(p->b, pair_closed_cb, &closed);
    rep_close(p->c, pair_closed_cb, &closed);
    rep_close(p->a, pair_closed_cb, &closed);
    for (int i = 0; i < 100 && closed < 3; i++) {
        pair_run(&p->la, &p->ta, 20);
        pair_run(&p->lb, &p->tb, 20);
    }
    CU_ASSERT_EQUAL(closed, 3);
    rep_destroy(&p->a);
    rep_destroy(&p->b);
    rep_destroy(&p->c);
    uv_walk(&p->la, close_handle, NULL);
    uv_run(&p->la, UV_RUN_DEFAULT);
    uv_walk(&p->lb, close_handle, NULL);
    uv_run(&p->lb, UV_RUN_DEFAULT);
    CU_ASSERT_EQUAL(uv_loop_close(&p->la), 0);
    CU_ASSERT_EQUAL(uv_loop_close(&p->lb), 0);
    rm_tmpdir();
    free(p);
}

int main(void)
{
    CU_pSuite s;
    unsigned failures;

    cf_log_init("test_rep", getenv("REP_TEST_DEBUG") ? CF_LOG_DEBUG : CF_LOG_WARN, 0);
    test_port = (uint16_t)(20000 + (getpid() % 20000));
    if (CU_initialize_registry() != CUE_SUCCESS) return 1;
    s = CU_add_suite("rep", NULL, NULL);
    CU_add_test(s, "strerror", test_strerror);
    CU_add_test(s, "bad config", test_bad_config);
    CU_add_test(s, "single voter: propose, barrier, snapshots", test_single_voter_propose);
    CU_add_test(s, "restart: restore + replay by index", test_restart_replays);
    CU_add_test(s, "close with proposals in flight", test_pending_at_close);
    CU_add_test(s, "FSM apply failure stops applying", test_apply_failure);
    CU_add_test(s, "entries above 8 MiB and odd lengths", test_big_entries);
    CU_add_test(s, "tiny snapshot threshold keeps the log", test_tiny_snapshots_keep_log);
    CU_add_test(s, "snapshots by bytes", test_snapshot_by_bytes);
    CU_add_test(s, "fragments: reassembled at the last index", test_fragments_reassembled);
    CU_add_test(s, "fragments: unfinished message dropped", test_fragments_unfinished_dropped);
    CU_add_test(s, "fragments: no snapshot inside a message", test_fragments_no_snapshot_inside);
    CU_add_test(s, "fragments: bounded catch-up", test_fragments_catch_up_bounded);
    CU_add_test(s, "big entry in fragments with tiny snapshots",
                test_big_entry_fragments_snapshots);
    CU_add_test(s, "prepared proposals (rep_prepare off the loop)", test_prepared_proposals);
    CU_add_test(s, "checkpoint writer: paced copy, space check", test_checkpoint_gentle);
    CU_add_test(s, "blocked loop: no election", test_blocked_loop_no_election);
    CU_basic_set_mode(CU_BRM_VERBOSE);
    CU_basic_run_tests();
    failures = CU_get_number_of_failures();
    CU_cleanup_registry();
    return failures != 0;
}
