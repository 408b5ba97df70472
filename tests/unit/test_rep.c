/* Unit tests for replication/rep.c: a real single-voter libraft node
 * (raft_uv on a temporary directory, TCP transport on loopback) driving a
 * tiny in-memory counting FSM whose state outlives the rep instance, the
 * way LMDB would. */
#include <CUnit/Basic.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <uv.h>

#include "cf_log.h"
#include "rep.h"

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
    CU_basic_set_mode(CU_BRM_VERBOSE);
    CU_basic_run_tests();
    failures = CU_get_number_of_failures();
    CU_cleanup_registry();
    return failures != 0;
}
