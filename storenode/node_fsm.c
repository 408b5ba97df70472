/* node_fsm: the store's state machine as seen by replication (rep.h
 * rep_fsm_ops): apply = store_apply; snapshot = a small
 * coffer.SnapshotDescriptor (format 2: group id, applied index, the
 * checkpoint started at that point and where to fetch it), never the store
 * itself, while the checkpoint is written off the loop thread
 * (checkpoint.h); restore = make sure the local store covers the
 * descriptor: it already does, or a verified checkpoint is swapped in, or
 * one is being verified / fetched (restore answers "not yet" and libraft
 * retries the snapshot later). */
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <uv.h>

#include "cf_log.h"
#include "checkpoint.h"
#include "coffer_raft.pb-c.h"
#include "node.h"
#include "store.h"

/* A node restarting on a Raft snapshot its store is behind (a previous
 * install was interrupted) waits this long for a checkpoint before giving
 * up: Raft is not running yet, nothing else is delayed. */
#define START_INSTALL_WAIT_MS (10u * 60u * 1000u)
#define MAX_SOURCES 16

static int is_zero16(const uint8_t id[16])
{
    int i;
    for (i = 0; i < 16; i++)
        if (id[i] != 0) return 0;
    return 1;
}

static int fsm_apply(void *fsm, uint64_t index, const void *buf, size_t len)
{
    struct node *n = fsm;
    return store_apply(n->store, index, buf, len, NULL);
}

static int fsm_snapshot(void *fsm, uint64_t index, void **buf_r, size_t *len_r)
{
    struct node *n = fsm;
    Coffer__SnapshotDescriptor sd = COFFER__SNAPSHOT_DESCRIPTOR__INIT;
    uint8_t gid[16];
    uint64_t applied;
    size_t len;
    void *buf;
    char name[64];

    /* The raft log up to `index` may be dropped after this: the store must
     * be on disk first (it runs with relaxed LMDB syncing). */
    if (store_sync(n->store) != 0) {
        cf_error("snapshot: store_sync failed");
        return -1;
    }
    /* applied_index: the store holds every command up to raft index
     * `index`. The store's own watermark can be lower (the last entries were
     * barriers or configuration changes, which never reach store_apply) or
     * higher (after a restart the store is ahead of raft's replay), hence
     * the minimum of both. restore() checks the store reaches it. */
    applied = store_applied_index(n->store);
    if (applied > index) applied = index;
    store_group_id(n->store, gid);
    sd.format = n->ckpt != NULL ? 2 : 1;
    sd.group_id.data = gid;
    sd.group_id.len = sizeof gid;
    sd.applied_index = applied;
    if (n->ckpt != NULL) {
        /* The checkpoint's read transaction starts here, between two
         * applies: it holds exactly the state of this snapshot. If the
         * worker is still busy with an earlier one, a later checkpoint
         * covers this descriptor (any checkpoint >= applied_index will do). */
        ckpt_mgr_take(n->ckpt);
        ckpt_name(store_applied_index(n->store), name);
        sd.checkpoint_path = name;
        if (n->cfg != NULL) {
            sd.has_source_node = 1;
            sd.source_node = n->cfg->node_id;
            if (n->cfg->admin_listen != NULL && n->cfg->admin_listen[0] != '\0')
                sd.source_admin = n->cfg->admin_listen;
        }
    }
    len = coffer__snapshot_descriptor__get_packed_size(&sd);
    buf = malloc(len > 0 ? len : 1);
    if (buf == NULL) return -1;
    coffer__snapshot_descriptor__pack(&sd, buf);
    *buf_r = buf;
    *len_r = len;
    return 0;
}

static void add_source(const char **src, size_t *n, const char *addr, const char *self)
{
    if (addr == NULL || addr[0] == '\0' || *n >= MAX_SOURCES) return;
    if (self != NULL && strcmp(addr, self) == 0) return;
    for (size_t i = 0; i < *n; i++)
        if (strcmp(src[i], addr) == 0) return;
    src[(*n)++] = addr;
}

/* Admin addresses to fetch a checkpoint from: the snapshot's source, the
 * leader, then every other member known to the `nodes` table. */
static int install(struct node *n, const Coffer__SnapshotDescriptor *sd, const uint8_t gid[16])
{
    const char *src[MAX_SOURCES];
    struct store_node sn[MAX_SOURCES];
    struct rep_member *rm = NULL;
    size_t n_src = 0, n_rm = 0, n_sn = 0;
    const char *self = n->cfg != NULL ? n->cfg->admin_listen : NULL;
    int rc;

    add_source(src, &n_src, sd->source_admin, self);
    add_source(src, &n_src, n->leader_admin, self);
    if (n->rep != NULL && rep_members(n->rep, &rm, &n_rm) == 0) {
        for (size_t i = 0; i < n_rm && n_sn < MAX_SOURCES; i++) {
            if (n->cfg != NULL && rm[i].id == n->cfg->node_id) continue;
            if (store_node_get(n->store, NULL, rm[i].id, &sn[n_sn]) == 0 && sn[n_sn].admin[0]) {
                add_source(src, &n_src, sn[n_sn].admin, self);
                n_sn++;
            }
        }
    }
    free(rm);
    rc = ckpt_mgr_install(n->ckpt, gid, sd->applied_index, src, n_src);
    return rc;
}

static int fsm_restore(void *fsm, const void *buf, size_t len)
{
    struct node *n = fsm;
    Coffer__SnapshotDescriptor *sd;
    uint64_t have = store_applied_index(n->store);
    uint8_t gid[16], want[16];
    int rv = -1;

    sd = coffer__snapshot_descriptor__unpack(NULL, len, buf);
    if (sd == NULL || (sd->format != 1 && sd->format != 2)) {
        cf_crit("snapshot restore: unreadable snapshot descriptor (%zu bytes)", len);
        goto out;
    }
    store_group_id(n->store, gid);
    memset(want, 0, sizeof want);
    if (sd->group_id.len == 16) memcpy(want, sd->group_id.data, 16);
    if (!is_zero16(gid) && !is_zero16(want) && memcmp(gid, want, 16) != 0) {
        cf_crit("snapshot restore: snapshot belongs to another group; refusing");
        goto out;
    }
    if (have >= sd->applied_index) {
        cf_info("snapshot restore: store at index %" PRIu64 " covers snapshot %" PRIu64, have,
                sd->applied_index);
        rv = 0;
        goto out;
    }
    if (n->ckpt == NULL) {
        cf_crit("store is behind snapshot %" PRIu64 " (store at %" PRIu64
                "): needs a checkpoint and this node has no checkpoint directory",
                sd->applied_index, have);
        goto out;
    }
    rv = install(n, sd, want);
    if (rv == 1 && n->rep != NULL && !rep_is_started(n->rep)) {
        /* Inside raft_start: the on-disk snapshot is newer than the store.
         * Wait here (nothing runs yet) for the checkpoint. */
        uint64_t deadline = uv_hrtime() / 1000000u + START_INSTALL_WAIT_MS;
        cf_warn("store is behind snapshot %" PRIu64 " (store at %" PRIu64
                "): installing a checkpoint before starting Raft",
                sd->applied_index, have);
        while (rv == 1 && uv_hrtime() / 1000000u < deadline) {
            usleep(100 * 1000);
            rv = install(n, sd, want);
        }
        if (rv == 1)
            cf_crit("store is behind snapshot %" PRIu64
                    " and no checkpoint could be installed within %u s",
                    sd->applied_index, START_INSTALL_WAIT_MS / 1000);
        if (rv != 0) rv = -1;
    }
out:
    if (sd != NULL) coffer__snapshot_descriptor__free_unpacked(sd, NULL);
    return rv;
}

/* InstallSnapshot from the leader (rep.h snapshot_gate): let libraft
 * install it only when restore is sure to succeed, i.e. the store covers
 * the descriptor already or a verified checkpoint was just swapped in;
 * otherwise the checkpoint is being verified or fetched in the background
 * and the snapshot is dropped until the leader sends it again. */
static int fsm_snapshot_gate(void *fsm, const void *buf, size_t len)
{
    struct node *n = fsm;
    Coffer__SnapshotDescriptor *sd;
    uint8_t gid[16], want[16];
    int rv = 0;

    sd = coffer__snapshot_descriptor__unpack(NULL, len, buf);
    if (sd == NULL) return 0; /* restore refuses it loudly */
    store_group_id(n->store, gid);
    memset(want, 0, sizeof want);
    if (sd->group_id.len == 16) memcpy(want, sd->group_id.data, 16);
    if (store_applied_index(n->store) < sd->applied_index &&
        (is_zero16(gid) || is_zero16(want) || memcmp(gid, want, 16) == 0)) {
        if (n->ckpt != NULL) {
            rv = install(n, sd, want) == 1 ? 1 : 0;
        } else {
            /* No checkpoints here: the store can never reach the snapshot.
             * Refuse it for good (never let libraft install it: its failed
             * restore path leaves the follower inconsistent). */
            static uint64_t logged_at;
            uint64_t now = uv_hrtime() / 1000000u;
            if (logged_at == 0 || now - logged_at >= 10000) {
                logged_at = now;
                cf_crit("store is behind snapshot %" PRIu64 " (store at %" PRIu64
                        "): needs a checkpoint and this node has no checkpoint directory",
                        sd->applied_index, store_applied_index(n->store));
            }
            rv = 1;
        }
    }
    coffer__snapshot_descriptor__free_unpacked(sd, NULL);
    return rv;
}

const struct rep_fsm_ops node_fsm_ops = {fsm_apply, fsm_snapshot, fsm_restore, fsm_snapshot_gate};
