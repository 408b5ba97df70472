/* rep: the replication module. Wraps libraft 0.15 (libuv I/O, TCP
 * transport) and knows nothing about mail: the store plugs its state
 * machine in through struct rep_fsm_ops. Every libraft call of the project
 * lives in replication/.
 *
 * Threading: loop thread only (libraft is single-threaded).
 *
 * Log index: libraft's apply callback gets no index. rep computes it as
 * raft_last_applied()+1 (libraft advances last_applied after every entry,
 * commands, barriers and configuration changes alike) and passes it to
 * ops->apply, so the FSM can use it as MODSEQ and as its idempotency
 * watermark.
 *
 * Snapshots: ops->snapshot returns a small descriptor (never the store);
 * ops->restore gets it back on start or on InstallSnapshot.
 *
 * Large proposals (above fragment_bytes) travel as several Raft entries
 * and are reassembled before ops->apply, which sees the whole payload once,
 * at the index of the last of them (so consecutive applied indexes may
 * jump). A snapshot is never taken between them.
 */
#ifndef REP_H
#define REP_H

#include <stddef.h>
#include <stdint.h>
#include <uv.h>

enum rep_status_code {
    REP_OK = 0,
    REP_ENOTLEADER = -1,      /* not leader: refused before proposing */
    REP_ELEADERSHIPLOST = -2, /* outcome unknown: may still commit later */
    REP_ESHUTDOWN = -3,       /* node is stopping */
    REP_ENOMEM = -4,
    REP_EIO = -5, /* disk/other error; see log */
    REP_ETOOBIG = -6,
    REP_EBUSY = -7,  /* a membership change is already in progress */
    REP_EINVAL = -8, /* bad id/address for a membership change */
};

struct rep_fsm_ops {
    /* Apply a committed command entry at log `index`. Deterministic: only the
     * entry and the FSM's own state. Return 0, or -1 for a fatal error (the
     * node logs loudly and stops applying; it never skips an entry). */
    int (*apply)(void *fsm, uint64_t index, const void *buf, size_t len);
    /* Produce a snapshot descriptor of the state as of the last applied
     * entry. *buf_r is malloc()ed, rep frees it. Return 0 or -1. */
    int (*snapshot)(void *fsm, uint64_t index, void **buf_r, size_t *len_r);
    /* Restore from a descriptor (on start, or when the leader installs a
     * snapshot). `buf` is borrowed. Return 0; 1 "not yet" (the FSM is
     * catching up to the descriptor in the background, e.g. fetching a
     * checkpoint: the install is refused for now and libraft's leader sends
     * the snapshot again later); or -1 (fatal, logged at CRIT). */
    int (*restore)(void *fsm, const void *buf, size_t len);
    /* Optional. Called when the leader sends a snapshot (InstallSnapshot),
     * before libraft acts on it: return 0 to let libraft install it (then
     * restore must succeed), 1 to drop the message for now (the FSM cannot
     * restore it yet, e.g. it is still fetching a checkpoint; the leader
     * sends it again after its install-snapshot timeout). libraft 0.15 must
     * never see a restore fail during an install: it has already reset its
     * log to the snapshot by then and does not undo that (the follower would
     * then apply entries after the snapshot on a stale FSM, or stall). */
    int (*snapshot_gate)(void *fsm, const void *buf, size_t len);
};

struct rep_config {
    uint64_t node_id;             /* >= 1 */
    const char *address;          /* Raft address "127.0.0.1:7001" */
    const char *data_dir;         /* must exist */
    int bootstrap;                /* 1: bootstrap a single-voter group if dir is new */
    uint64_t election_timeout_ms; /* default 1000 */
    uint64_t heartbeat_ms;        /* default 100 */
    uint64_t snapshot_threshold;  /* entries between snapshots, default 1024 */
    uint64_t snapshot_trailing;   /* entries kept after a snapshot, default 512 */
    uint64_t snapshot_bytes;      /* also snapshot once this many entry bytes were applied
                                     since the last one, and keep at most this many bytes of
                                     trailing entries after it (0: entries only) */
    uint64_t max_entry_bytes;     /* proposals above this are refused (REP_ETOOBIG) */
    uint64_t fragment_bytes;      /* proposals above this are split into several Raft
                                     entries, reassembled before ops->apply (0: 1 MiB) */
};

struct rep_info {
    int is_leader;
    const char *role; /* "leader", "follower", "candidate", "unavailable" */
    uint64_t term;
    uint64_t commit_index;
    uint64_t applied_index;
    uint64_t last_index;
    uint64_t last_snapshot_index;
    uint64_t leader_id;
    char leader_address[128];
    uint64_t elections_started; /* times this node became candidate (pre-vote included) */
    uint64_t loop_stalls;       /* Raft ticks that came late (blocked event loop) */
};

struct rep;

/* Create (does not start). Returns NULL with err on failure. */
struct rep *rep_create(uv_loop_t *loop, const struct rep_config *cfg, const struct rep_fsm_ops *ops,
                       void *fsm, char *err, size_t errlen);
/* Bootstrap if configured and new, then start raft. 0 or -1 with err. */
int rep_start(struct rep *r, char *err, size_t errlen);

/* Buffer for a proposal of up to `len` payload bytes (raft_malloc()ed,
 * with a hidden 8-byte frame header in front and room for padding to a
 * multiple of 8: libraft 0.15 corrupts its log for entries whose length is
 * not a multiple of 8, so rep frames every entry; ops->apply sees only the
 * payload). Free an unproposed buffer with rep_buf_free (never free()).
 * NULL when out of memory or len > 4 GiB. */
void *rep_buf_alloc(size_t len);
void rep_buf_free(void *buf);

/* Completion of a proposal: status is REP_OK once the entry is committed
 * and applied locally (ops->apply already ran for it). */
typedef void (*rep_propose_cb)(void *arg, int status);

/* Propose `buf` (from rep_buf_alloc, len <= the allocated length;
 * ownership always passes to rep, even on failure). Returns 0 when in
 * flight (cb will fire exactly once), or a negative rep_status_code
 * synchronously (cb will not fire). len > max_entry_bytes: REP_ETOOBIG. */
int rep_propose(struct rep *r, void *buf, size_t len, rep_propose_cb cb, void *arg);

/* Large proposals with the copying off the loop thread. rep_prepare does
 * what rep_propose does before it hands the entry to libraft (framing, and
 * splitting into fragments above fragment_bytes: a copy of the payload)
 * and may run on any thread: it touches only memory and r's settings,
 * which do not change after rep_create. rep_propose_prepared (loop thread)
 * then proposes it exactly like rep_propose (same checks, statuses and
 * callback). Ownership passes in both, even on failure (rep_prepare takes
 * buf, rep_propose_prepared takes p); rep_prepared_free drops one that is
 * never proposed. rep_prepare returns NULL when out of memory or when buf
 * is not a rep_buf_alloc buffer of at least len bytes. */
struct rep_prepared;
struct rep_prepared *rep_prepare(const struct rep *r, void *buf, size_t len);
int rep_propose_prepared(struct rep *r, struct rep_prepared *p, rep_propose_cb cb, void *arg);
void rep_prepared_free(struct rep_prepared *p);

/* Fires cb(arg, REP_OK) once every entry before it is applied (leader only). */
int rep_barrier(struct rep *r, rep_propose_cb cb, void *arg);

int rep_is_leader(const struct rep *r);
void rep_get_info(const struct rep *r, struct rep_info *info_r);

/* Called (loop thread) whenever this node's role changes. */
void rep_set_role_cb(struct rep *r, void (*cb)(void *arg, int is_leader), void *arg);

/* ---- groups of several nodes (issue 3) ---- */

/* 1 when data_dir holds no Raft state yet (no metadata files): a node
 * configured without bootstrap then waits, unstarted, until it is told to
 * bootstrap a group or to join one. */
int rep_dir_is_new(const char *data_dir);
/* 1 once rep_start succeeded. */
int rep_is_started(const struct rep *r);
/* Start later than rep_create: bootstrap = 1 makes a new single-voter group
 * (the dir must be new), 0 starts without bootstrap (a node about to be
 * added by the leader). 0 or -1 with err. */
int rep_start_mode(struct rep *r, int bootstrap, char *err, size_t errlen);

enum rep_member_role {
    REP_ROLE_VOTER = 1,
    REP_ROLE_STANDBY = 2, /* replicated, not in the quorum */
    REP_ROLE_SPARE = 3,   /* neither (an added node before it is assigned) */
};
struct rep_member {
    uint64_t id;
    char address[128];
    int role; /* enum rep_member_role */
};
/* This node's view of the group configuration (the latest, committed or
 * not). *m_r is malloc()ed (free() it); 0 or -1. */
int rep_members(const struct rep *r, struct rep_member **m_r, size_t *n_r);
const char *rep_member_role_name(int role);

/* Membership changes (leader only; one at a time). cb(arg, status) fires
 * once: REP_OK when the change is committed. Synchronous refusals:
 * REP_ENOTLEADER, REP_EBUSY (another change in flight), REP_EINVAL (id or
 * address already used / unknown id). rep_add adds the node and then
 * assigns it `role` (REP_ROLE_VOTER: the leader first catches it up). */
int rep_add(struct rep *r, uint64_t id, const char *address, int role, rep_propose_cb cb,
            void *arg);
int rep_remove(struct rep *r, uint64_t id, rep_propose_cb cb, void *arg);
/* Leadership transfer to `id` (0: the most up-to-date voter). cb gets
 * REP_OK when another node is leader afterwards, REP_EIO otherwise. */
int rep_transfer(struct rep *r, uint64_t id, rep_propose_cb cb, void *arg);

/* Called (loop thread, once) when this node sees a configuration that no
 * longer contains it after it had been a member. */
void rep_set_removed_cb(struct rep *r, void (*cb)(void *arg), void *arg);

/* Asynchronous shutdown; cb fires once raft and its I/O are closed. After
 * that the FSM may be closed and rep_destroy called. */
/* Disk nearly full: while `refuse` is set, entries the leader sends
 * (AppendEntries with entries, InstallSnapshot) are discarded on arrival,
 * so nothing new is written; heartbeats are still processed, so the node
 * keeps following the leader without starting elections, and the leader
 * commits with the other members. Logged at CRIT when set, NOTICE when
 * cleared; the leader resends what is missing once cleared. A leader's own
 * proposals are not affected (the caller moves leadership away first). */
void rep_set_refuse_entries(struct rep *r, int refuse);
int rep_refusing_entries(const struct rep *r);

void rep_close(struct rep *r, void (*cb)(void *arg), void *arg);
void rep_destroy(struct rep **r);

const char *rep_strerror(int status);

/* ---- test support (CUnit with raft/fixture.h) ----
 * The libraft FSM rep builds around `ops` (entry frames, log index
 * derivation, snapshot/restore glue), for a raft server owned by the
 * fixture: create, pass rep_adapter_fsm() to raft_fixture_grow, then bind
 * it to raft_fixture_get(). */
struct raft;
struct raft_fsm;
struct rep_fsm_adapter;
struct rep_fsm_adapter *rep_adapter_create(const struct rep_fsm_ops *ops, void *fsm);
struct raft_fsm *rep_adapter_fsm(struct rep_fsm_adapter *a);
void rep_adapter_bind(struct rep_fsm_adapter *a, struct raft *raft);
int rep_adapter_fatal(const struct rep_fsm_adapter *a); /* apply stopped */
void rep_adapter_destroy(struct rep_fsm_adapter **a);
/* Finish the frame of a rep_buf_alloc buffer holding `len` payload bytes:
 * the raft_buffer to hand to raft_apply (base/len; raft owns it then). */
void rep_frame_finish(void *buf, size_t len, void **base_r, size_t *len_r);
/* A fragment entry as rep_propose makes them for proposals above
 * fragment_bytes: `len` bytes at `data`, fragment `seq` (from 0) of `count`
 * of a `total`-byte payload named (term, counter). raft_malloc()ed (raft
 * owns it once raft_apply accepts it); NULL when out of memory. */
void *rep_frame_fragment(const void *data, size_t len, uint64_t term, uint32_t counter,
                         uint32_t seq, uint32_t count, uint64_t total, size_t *len_r);

#endif
