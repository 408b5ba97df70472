/* node_fsm: the store's state machine as seen by replication (rep.h
 * rep_fsm_ops): apply = store_apply; snapshot = a small
 * coffer.SnapshotDescriptor (group id + applied index), never the store;
 * restore = check that the local store covers the descriptor. A store that
 * is behind a snapshot refuses loudly (restore fails): fetching a
 * checkpoint from a peer is not implemented yet (docs/coffer-store.md). */
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include "cf_log.h"
#include "coffer_raft.pb-c.h"
#include "node.h"
#include "store.h"

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
    sd.format = 1;
    sd.group_id.data = gid;
    sd.group_id.len = sizeof gid;
    sd.applied_index = applied;
    len = coffer__snapshot_descriptor__get_packed_size(&sd);
    buf = malloc(len > 0 ? len : 1);
    if (buf == NULL) return -1;
    coffer__snapshot_descriptor__pack(&sd, buf);
    *buf_r = buf;
    *len_r = len;
    return 0;
}

static int fsm_restore(void *fsm, const void *buf, size_t len)
{
    struct node *n = fsm;
    Coffer__SnapshotDescriptor *sd;
    uint64_t have = store_applied_index(n->store);
    uint8_t gid[16];
    int rv = -1;

    sd = coffer__snapshot_descriptor__unpack(NULL, len, buf);
    if (sd == NULL || sd->format != 1) {
        cf_crit("snapshot restore: unreadable snapshot descriptor (%zu bytes)", len);
        goto out;
    }
    store_group_id(n->store, gid);
    if (sd->group_id.len == 16 && !is_zero16(gid) && !is_zero16(sd->group_id.data) &&
        memcmp(gid, sd->group_id.data, 16) != 0) {
        cf_crit("snapshot restore: snapshot belongs to another group; refusing");
        goto out;
    }
    if (have >= sd->applied_index) {
        cf_info("snapshot restore: store at index %" PRIu64 " covers snapshot %" PRIu64, have,
                sd->applied_index);
        rv = 0;
    } else {
        cf_crit("store is behind snapshot %" PRIu64 " (store at %" PRIu64
                "): needs a checkpoint (not available in this version)",
                sd->applied_index, have);
    }
out:
    if (sd != NULL) coffer__snapshot_descriptor__free_unpacked(sd, NULL);
    return rv;
}

const struct rep_fsm_ops node_fsm_ops = {fsm_apply, fsm_snapshot, fsm_restore};
