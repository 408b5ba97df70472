/* rep: libraft 0.15 (raft_uv + raft_uv_tcp) behind the rep.h contract.
 * See rep.h for the model and docs/coffer-store.md for operations.
 *
 * Ownership summary:
 *  - proposal buffers: rep_buf_alloc (raft_malloc); rep_propose always takes
 *    them (freed here when raft_apply refuses, by raft otherwise);
 *  - proposal requests: malloc()ed struct rep_req, freed in the raft callback;
 *  - snapshot buffers: FSM version 2, so raft hands them back through
 *    snapshot_finalize and we free them (descriptor with free(), the
 *    one-element array with raft_free());
 *  - restore buffers: raft hands ownership over on success; we raft_free()
 *    them after ops->restore (which only borrows). */
#include "rep.h"

#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include <raft.h>
#include <raft/uv.h>

#include "cf_log.h"

#define REP_ROLE_POLL_MS 50
#define REP_CONNECT_RETRY_MS 200
#define REP_FRAME_HDR 8
#define REP_RESTORE_LOG_MS 5000
#define REP_SIZE_RING 4096

struct rep {
    uv_loop_t *loop;
    struct raft raft;
    struct raft *rp; /* &raft, or a fixture's server (rep_adapter_*) */
    struct raft_io io;
    struct raft_uv_transport transport;
    struct raft_fsm fsm;
    struct rep_fsm_ops ops;
    void *fsm_data;
    struct rep_config cfg; /* strings below are our copies */
    char *address;
    char *data_dir;

    uv_timer_t role_timer;
    int role_timer_init;
    int last_is_leader;
    int last_state;
    void (*role_cb)(void *arg, int is_leader);
    void *role_arg;
    void (*removed_cb)(void *arg);
    void *removed_arg;
    int was_member; /* seen itself in a configuration */
    int removed;    /* removed_cb fired */

    uint64_t last_apply_index; /* index of the last entry given to ops->apply */
    uint64_t last_snapshot_index;
    uint64_t bytes_since_snapshot; /* entry bytes applied since the last snapshot */
    /* sizes of the most recent command entries (ring), to bound the trailing
     * entries kept after a snapshot by bytes as well */
    uint64_t ring_index[REP_SIZE_RING];
    uint32_t ring_len[REP_SIZE_RING];
    unsigned ring_pos;
    int bytes_triggered; /* threshold lowered to force a snapshot */
    uint64_t restore_retries;
    uint64_t restore_log_at;
    int fatal;                /* ops->apply failed: we refuse further applies */
    int refuse_entries;       /* rep_set_refuse_entries */
    uint64_t refused_appends; /* messages whose entries were refused */

    /* Raft tick after a stalled loop (see gate_tick) */
    uv_idle_t tick_idle;
    uv_check_t tick_check;
    int tick_handles;      /* tick_idle/tick_check initialised */
    int tick_deferred;     /* a tick waits for the end of this loop iteration */
    uint64_t last_tick_ms; /* uv_now() of the previous tick */
    uint64_t stall_log_ms; /* last "loop blocked" warning */
    uint64_t stalls;       /* ticks deferred after a blocked loop */
    uint64_t elections;    /* times this node became candidate */
    uint64_t sends_cut;    /* AppendEntries cut to REP_SEND_MAX_BYTES */

    /* Fragmented entries (see "Large entries" below) */
    uint64_t fragment_bytes; /* payload per fragment; entries above are split */
    uint32_t frag_counter;   /* proposer side: messages split so far */
    struct {
        int active;
        uint64_t term;
        uint32_t counter, count, next_seq;
        uint64_t total, received, first_index;
        unsigned char *buf;
    } part; /* apply side: the message being reassembled */

    int transport_init, io_init, raft_init, started;
    int closing, closed;
    int pending_closes;      /* raft_close + role timer */
    uint64_t close_deadline; /* uv_now() limit for draining log writes */
    void (*close_cb)(void *arg);
    void *close_arg;
};

struct rep_req {
    union {
        struct raft_apply apply;
        struct raft_barrier barrier;
    } u;
    struct rep *rep;
    rep_propose_cb cb;
    void *arg;
};

/* ---- helpers ---- */

static int map_status(int rv)
{
    switch (rv) {
    case 0:
        return REP_OK;
    case RAFT_NOTLEADER:
        return REP_ENOTLEADER;
    case RAFT_LEADERSHIPLOST:
        return REP_ELEADERSHIPLOST;
    case RAFT_SHUTDOWN:
    case RAFT_CANCELED:
        return REP_ESHUTDOWN;
    case RAFT_NOMEM:
        return REP_ENOMEM;
    case RAFT_TOOBIG:
        return REP_ETOOBIG;
    case RAFT_CANTCHANGE:
        return REP_EBUSY;
    case RAFT_BADID:
    case RAFT_DUPLICATEID:
    case RAFT_DUPLICATEADDRESS:
    case RAFT_BADROLE:
    case RAFT_NOTFOUND:
        return REP_EINVAL;
    default:
        return REP_EIO;
    }
}

const char *rep_strerror(int status)
{
    switch (status) {
    case REP_OK:
        return "ok";
    case REP_ENOTLEADER:
        return "not leader";
    case REP_ELEADERSHIPLOST:
        return "leadership lost (outcome unknown)";
    case REP_ESHUTDOWN:
        return "shutting down";
    case REP_ENOMEM:
        return "out of memory";
    case REP_EIO:
        return "replication I/O error";
    case REP_ETOOBIG:
        return "entry too big";
    case REP_EBUSY:
        return "a membership change is already in progress";
    case REP_EINVAL:
        return "invalid member (id or address in use, or unknown id)";
    default:
        return "unknown replication error";
    }
}

/* Appends a hint when Linux AIO contexts are exhausted (libraft 0.15 treats
 * io_setup EAGAIN as a hard I/O error at start; fixed upstream later). */
static void aio_hint(char *buf, size_t len)
{
    unsigned long nr = 0, max = 0;
    FILE *f;

    buf[0] = '\0';
    f = fopen("/proc/sys/fs/aio-nr", "r");
    if (f == NULL) return;
    if (fscanf(f, "%lu", &nr) != 1) nr = 0;
    fclose(f);
    f = fopen("/proc/sys/fs/aio-max-nr", "r");
    if (f == NULL) return;
    if (fscanf(f, "%lu", &max) != 1) max = 0;
    fclose(f);
    if (max == 0 || nr + 128 >= max)
        snprintf(buf, len,
                 " (Linux AIO contexts nearly exhausted: fs.aio-nr=%lu fs.aio-max-nr=%lu; "
                 "raise fs.aio-max-nr with sysctl)",
                 nr, max);
}

static const char *state_name(int state)
{
    switch (state) {
    case RAFT_LEADER:
        return "leader";
    case RAFT_FOLLOWER:
        return "follower";
    case RAFT_CANDIDATE:
        return "candidate";
    default:
        return "unavailable";
    }
}

/* ---- FSM glue ---- */

static int frame_open(const struct raft_buffer *buf, const void **data_r, size_t *len_r);

/* ---- Large entries: fragments ----
 *
 * libraft 0.15 handles one entry in one piece on the loop thread: the
 * leader's and every follower's log write copies it into an aligned buffer
 * and computes its CRC32 byte by byte, and the leader sends it as one
 * AppendEntries message. For a 50 MiB message that was 0.7-0.9 s per node
 * on a busy 2-core machine, during which no heartbeat went out or was read
 * (elections under load). So rep_propose splits a payload above
 * fragment_bytes into fragments, each its own Raft entry and raft_apply (so
 * each is written and sent on its own; libraft batches log writes at most
 * per 8 MiB segment), all appended in one go so that they are contiguous
 * in the log. The apply side reassembles them and calls ops->apply once,
 * with the whole payload, at the index of the last fragment; the FSM never
 * sees a fragment.
 *
 * Fragment frame (every field little-endian, header 40 bytes):
 *   u32 REP_FRAG_MAGIC, u32 fragment length, u64 proposer's term,
 *   u32 message counter, u32 seq, u32 count, u32 0, u64 total length,
 *   fragment bytes, zero padding to a multiple of 8.
 * (term, counter) names the message: one leader per term, and the counter
 * grows within the leader's process.
 *
 * Every node sees the same committed log, so the rules below decide the
 * same way everywhere: a fragment with seq 0 starts a message (dropping an
 * unfinished one), the next seq of the same message continues it, anything
 * else ends an unfinished message (its proposer lost leadership before all
 * fragments were appended; its proposal failed, so nothing was
 * acknowledged) and a stray continuation is ignored. A snapshot is refused
 * (RAFT_BUSY: libraft retries after the next entry) while a message is
 * unfinished, so a snapshot never splits a message and the log replayed
 * after a restart always holds whole messages. */
#define REP_FRAG_MAGIC 0x47465243u /* "CRFG" little-endian */
#define REP_FRAG_HDR 40
#define REP_FRAGMENT_DEFAULT (1024u * 1024u)
#define REP_FRAGMENT_MIN 4096u

struct frag_hdr {
    uint32_t len, counter, seq, count;
    uint64_t term, total;
};

static uint64_t get_u64le(const unsigned char *p);
static uint32_t get_u32le(const unsigned char *p);

static int frag_open(const struct raft_buffer *buf, struct frag_hdr *h,
                     const unsigned char **data_r)
{
    const unsigned char *p = buf->base;

    if (buf->len < REP_FRAG_HDR || buf->len % 8 != 0 || get_u32le(p) != REP_FRAG_MAGIC) return -1;
    h->len = get_u32le(p + 4);
    h->term = get_u64le(p + 8);
    h->counter = get_u32le(p + 16);
    h->seq = get_u32le(p + 20);
    h->count = get_u32le(p + 24);
    h->total = get_u64le(p + 32);
    if (REP_FRAG_HDR + (((size_t)h->len + 7) & ~(size_t)7) != buf->len) return -1;
    if (h->count < 2 || h->seq >= h->count || h->len == 0 || h->len > h->total ||
        h->total > UINT32_MAX)
        return -1;
    *data_r = p + REP_FRAG_HDR;
    return 0;
}

static int is_fragment(const struct raft_buffer *buf)
{
    return buf->len >= 8 && get_u32le(buf->base) == REP_FRAG_MAGIC;
}

static void part_drop(struct rep *r, uint64_t index, const char *why)
{
    if (!r->part.active) return;
    cf_warn("rep: dropping an unfinished fragmented entry (%" PRIu32 " of %" PRIu32
            " fragments from index %" PRIu64 ", %" PRIu64 " bytes) at index %" PRIu64 ": %s",
            r->part.next_seq, r->part.count, r->part.first_index, r->part.total, index, why);
    free(r->part.buf);
    memset(&r->part, 0, sizeof r->part);
}

static void part_reset(struct rep *r)
{
    free(r->part.buf);
    memset(&r->part, 0, sizeof r->part);
}

/* A fragment at `index`: 0, or -1 when the node must stop applying (out of
 * memory, or ops->apply failed for the completed message). */
static int apply_fragment(struct rep *r, uint64_t index, const struct raft_buffer *buf)
{
    struct frag_hdr h;
    const unsigned char *data;
    uint64_t off;

    if (frag_open(buf, &h, &data) != 0) {
        cf_crit("rep: malformed fragment frame at index %" PRIu64 " (%zu bytes): stopping apply",
                index, (size_t)buf->len);
        return -1;
    }
    if (h.seq == 0) {
        part_drop(r, index, "a new fragmented entry starts");
        r->part.buf = malloc(h.total);
        if (r->part.buf == NULL) {
            cf_crit("rep: out of memory for a %" PRIu64 "-byte entry at index %" PRIu64
                    ": stopping apply",
                    h.total, index);
            return -1;
        }
        r->part.active = 1;
        r->part.term = h.term;
        r->part.counter = h.counter;
        r->part.count = h.count;
        r->part.total = h.total;
        r->part.first_index = index;
    } else if (!r->part.active || r->part.term != h.term || r->part.counter != h.counter ||
               r->part.next_seq != h.seq || r->part.count != h.count || r->part.total != h.total) {
        /* Its beginning was dropped (or is not in this log): ignore, the
         * same way on every node. */
        cf_warn("rep: ignoring fragment %" PRIu32 "/%" PRIu32
                " of a dropped entry at index %" PRIu64,
                h.seq + 1, h.count, index);
        part_drop(r, index, "fragments out of sequence");
        return 0;
    }
    off = r->part.received;
    if (off + h.len > r->part.total || (h.seq + 1 == h.count && off + h.len != r->part.total)) {
        cf_warn("rep: fragment lengths do not add up at index %" PRIu64, index);
        part_drop(r, index, "inconsistent fragment lengths");
        return 0;
    }
    memcpy(r->part.buf + off, data, h.len);
    r->part.received = off + h.len;
    r->part.next_seq = h.seq + 1;
    if (r->part.next_seq < r->part.count) return 0;
    {
        unsigned char *msg = r->part.buf;
        uint64_t total = r->part.total;
        int rv;
        memset(&r->part, 0, sizeof r->part); /* whole now: not "unfinished" during apply */
        rv = r->ops.apply(r->fsm_data, index, msg, (size_t)total);
        free(msg);
        if (rv != 0) {
            cf_crit("rep: FSM apply failed at index %" PRIu64 ": node stops applying", index);
            return -1;
        }
    }
    return 0;
}

static int fsm_apply(struct raft_fsm *fsm, const struct raft_buffer *buf, void **result)
{
    struct rep *r = fsm->data;
    uint64_t index = raft_last_applied(r->rp) + 1;
    const void *data;
    size_t len;
    int rv;

    *result = NULL;
    if (r->fatal) return RAFT_IOERR;
    if (index <= r->last_apply_index || index > r->rp->commit_index) {
        /* Our index derivation relies on libraft advancing last_applied
         * after every entry; if that ever breaks, stop rather than apply
         * under a wrong index. */
        cf_crit("rep: inconsistent apply index %" PRIu64 " (last applied by rep %" PRIu64
                ", commit %" PRIu64 "): stopping apply",
                index, r->last_apply_index, (uint64_t)r->rp->commit_index);
        r->fatal = 1;
        return RAFT_IOERR;
    }
    if (is_fragment(buf)) {
        if (apply_fragment(r, index, buf) != 0) {
            r->fatal = 1;
            return RAFT_IOERR;
        }
    } else {
        if (frame_open(buf, &data, &len) != 0) {
            cf_crit("rep: malformed entry frame at index %" PRIu64 " (%zu bytes): stopping apply",
                    index, (size_t)buf->len);
            r->fatal = 1;
            return RAFT_IOERR;
        }
        part_drop(r, index, "its proposer lost leadership before all fragments were appended");
        rv = r->ops.apply(r->fsm_data, index, data, len);
        if (rv != 0) {
            cf_crit("rep: FSM apply failed at index %" PRIu64 ": node stops applying", index);
            r->fatal = 1;
            return RAFT_IOERR;
        }
    }
    r->last_apply_index = index;
    /* Compaction by bytes: libraft 0.15 only counts entries. Once the
     * applied entry bytes since the last snapshot pass snapshot_bytes, lower
     * libraft's threshold to the entries applied so far so that it takes a
     * snapshot right after this entry; fsm_snapshot puts it back. */
    r->bytes_since_snapshot += buf->len;
    r->ring_index[r->ring_pos] = index;
    r->ring_len[r->ring_pos] = (uint32_t)buf->len;
    r->ring_pos = (r->ring_pos + 1) % REP_SIZE_RING;
    if (r->cfg.snapshot_bytes > 0 && !r->bytes_triggered &&
        r->bytes_since_snapshot >= r->cfg.snapshot_bytes &&
        index > r->rp->log.snapshot.last_index) {
        uint64_t due = index - r->rp->log.snapshot.last_index;
        if (due < r->cfg.snapshot_threshold) {
            raft_set_snapshot_threshold(r->rp, (unsigned)due);
            r->bytes_triggered = 1;
            cf_info("rep: %" PRIu64 " entry bytes since the last snapshot: snapshot after index "
                    "%" PRIu64,
                    r->bytes_since_snapshot, index);
        }
    }
    return 0;
}

static int fsm_snapshot(struct raft_fsm *fsm, struct raft_buffer *bufs[], unsigned *n_bufs)
{
    struct rep *r = fsm->data;
    uint64_t index = raft_last_applied(r->rp);
    void *desc = NULL;
    size_t len = 0;
    struct raft_buffer *arr;

    if (r->fatal) return RAFT_IOERR;
    if (r->part.active) {
        /* Never between the fragments of one entry (see "Large entries"):
         * libraft tries again after the next entry. */
        cf_debug("rep: snapshot at index %" PRIu64 " postponed: fragmented entry unfinished",
                 index);
        return RAFT_BUSY;
    }
    if (r->ops.snapshot(r->fsm_data, index, &desc, &len) != 0) {
        cf_error("rep: FSM snapshot at index %" PRIu64 " failed", index);
        return RAFT_IOERR;
    }
    arr = raft_malloc(sizeof *arr);
    if (arr == NULL) {
        free(desc);
        return RAFT_NOMEM;
    }
    arr[0].base = desc;
    arr[0].len = len;
    *bufs = arr;
    *n_bufs = 1;
    r->last_snapshot_index = index;
    r->bytes_since_snapshot = 0;
    if (r->cfg.snapshot_bytes > 0) {
        /* libraft keeps `trailing` entries in memory and on disk after the
         * snapshot, counted in entries; with 50 MiB messages 512 of them
         * would be 25 GiB. Keep only as many of the newest entries as fit
         * in snapshot_bytes (at least one). */
        uint64_t sum = 0, oldest = index + 1, keep = r->cfg.snapshot_trailing;
        int over = 0;
        for (unsigned k = 1; k <= REP_SIZE_RING; k++) {
            unsigned pos = (r->ring_pos + REP_SIZE_RING - k) % REP_SIZE_RING;
            if (r->ring_index[pos] == 0 || r->ring_index[pos] > index) continue;
            if (index - r->ring_index[pos] >= r->cfg.snapshot_trailing) break;
            sum += r->ring_len[pos];
            if (sum > r->cfg.snapshot_bytes) {
                over = 1;
                break;
            }
            oldest = r->ring_index[pos];
        }
        if (over) keep = oldest <= index ? index - oldest + 1 : 1;
        if (keep == 0) keep = 1;
        raft_set_snapshot_trailing(r->rp, (unsigned)keep);
        if (keep < r->cfg.snapshot_trailing)
            cf_info("rep: keeping %" PRIu64 " entries (not %" PRIu64
                    ") after the snapshot: their bytes reach raft.snapshot_bytes",
                    keep, r->cfg.snapshot_trailing);
    }
    if (r->bytes_triggered) {
        raft_set_snapshot_threshold(r->rp, (unsigned)r->cfg.snapshot_threshold);
        r->bytes_triggered = 0;
    }
    cf_info("rep: snapshot at index %" PRIu64 " (%zu bytes)", index, len);
    return 0;
}

static int fsm_snapshot_finalize(struct raft_fsm *fsm, struct raft_buffer *bufs[], unsigned *n_bufs)
{
    unsigned i;

    (void)fsm;
    if (*bufs != NULL) {
        for (i = 0; i < *n_bufs; i++)
            free((*bufs)[i].base);
        raft_free(*bufs);
    }
    *bufs = NULL;
    *n_bufs = 0;
    return 0;
}

/* Restore (on start, or when the leader installs a snapshot). ops->restore
 * may answer 1, "not yet": the store is being brought up to the snapshot
 * from a checkpoint in the background. libraft 0.15 then discards the
 * installed snapshot, answers the leader with a rejection and the leader
 * sends the snapshot again (every heartbeat or so), which calls restore
 * again: that retry is what completes the install. Logged at most every
 * few seconds. */
static int fsm_restore(struct raft_fsm *fsm, struct raft_buffer *buf)
{
    struct rep *r = fsm->data;
    int rv = r->ops.restore(r->fsm_data, buf->base, buf->len);

    if (rv == 1) {
        uint64_t now = r->loop != NULL ? uv_now(r->loop) : 0;
        r->restore_retries++;
        if (r->loop == NULL || now - r->restore_log_at >= REP_RESTORE_LOG_MS) {
            r->restore_log_at = now;
            cf_info("rep: snapshot not installed yet (store catching up from a checkpoint; "
                    "attempt %" PRIu64 ")",
                    r->restore_retries);
        }
        return RAFT_IOERR; /* on failure raft keeps ownership of buf */
    }
    if (rv != 0) {
        cf_crit("rep: FSM restore from snapshot failed");
        return RAFT_IOERR;
    }
    r->restore_retries = 0;
    r->bytes_since_snapshot = 0;
    part_reset(r); /* the log continues after the snapshot, at an entry boundary */
    raft_free(buf->base);
    return 0;
}

/* ---- InstallSnapshot gate ----
 *
 * libraft 0.15 (replicationInstallSnapshot) resets its in-memory log to the
 * snapshot and zeroes last_stored BEFORE it writes the snapshot and calls
 * fsm->restore, and does not undo that when restore fails; the next
 * InstallSnapshot with the same index is then taken as a no-op ("our last
 * snapshot is more up-to-date"), so the follower is left with a log that
 * starts after the snapshot and an FSM that is behind it. So a restore must
 * never fail during an install: rep wraps the raft_io's start() to see every
 * incoming message first, and asks ops->snapshot_gate about each
 * InstallSnapshot; a snapshot the FSM cannot restore yet is dropped (as if
 * lost on the network) and the leader sends it again after its
 * install-snapshot timeout. */
#define REP_GATES 16

static struct {
    struct raft_io *io;
    struct rep *rep;
    int (*start)(struct raft_io *io, unsigned msecs, raft_io_tick_cb tick, raft_io_recv_cb recv);
    raft_io_recv_cb recv;
    raft_io_tick_cb tick;
    unsigned msecs;
    int (*send)(struct raft_io *io, struct raft_io_send *req, const struct raft_message *m,
                raft_io_send_cb cb);
} gates[REP_GATES];

static int gate_find(const struct raft_io *io)
{
    for (int i = 0; i < REP_GATES; i++)
        if (gates[i].io == io) return i;
    return -1;
}

static void gate_recv(struct raft_io *io, struct raft_message *m)
{
    int g = gate_find(io);
    struct rep *r;

    if (g < 0) return; /* cannot happen: start registered it */
    r = gates[g].rep;
    if (r->refuse_entries && m->type == RAFT_IO_APPEND_ENTRIES && m->append_entries.n_entries > 0) {
        /* Disk nearly full: keep following the leader (the message still
         * resets the election timer and carries the commit index) but store
         * nothing new. The follower answers as for a heartbeat, so the
         * leader's match index for it stays where it is and the leader
         * commits with the rest of the quorum; it sends the entries again
         * once this node accepts them. */
        struct raft_append_entries *ae = &m->append_entries;
        void *last = NULL;
        r->refused_appends++;
        for (unsigned i = 0; i < ae->n_entries; i++) {
            if (ae->entries[i].batch != NULL && ae->entries[i].batch != last) {
                last = ae->entries[i].batch;
                raft_free(last);
            }
        }
        raft_free(ae->entries);
        ae->entries = NULL;
        ae->n_entries = 0;
    }
    if (r->refuse_entries && m->type == RAFT_IO_INSTALL_SNAPSHOT) {
        r->refused_appends++;
        raft_configuration_close(&m->install_snapshot.conf);
        raft_free(m->install_snapshot.data.base);
        return;
    }
    if (m->type == RAFT_IO_INSTALL_SNAPSHOT && r->ops.snapshot_gate != NULL && !r->fatal &&
        r->ops.snapshot_gate(r->fsm_data, m->install_snapshot.data.base,
                             m->install_snapshot.data.len) != 0) {
        uint64_t now = r->loop != NULL ? uv_now(r->loop) : 0;
        r->restore_retries++;
        if (r->loop == NULL || now - r->restore_log_at >= REP_RESTORE_LOG_MS) {
            r->restore_log_at = now;
            cf_info("rep: snapshot %" PRIu64 " from the leader not installable yet (store "
                    "catching up from a checkpoint); the leader will send it again (%" PRIu64
                    " so far)",
                    (uint64_t)m->install_snapshot.last_index, r->restore_retries);
        }
        raft_configuration_close(&m->install_snapshot.conf);
        raft_free(m->install_snapshot.data.base);
        return;
    }
    gates[g].recv(io, m);
}

/* ---- Raft tick after a blocked loop ----
 *
 * libraft's tick (a uv timer every heartbeat interval) is where a follower
 * notices an expired election timer and a leader checks that a majority
 * answered within the election timeout. libuv runs due timers at the start
 * of a loop iteration, before it polls for I/O. So after the loop thread
 * was blocked for longer than the election timeout (a large entry being
 * encoded or applied, a slow disk under a synchronous call), the tick ran
 * before the heartbeats and replies that had arrived meanwhile were read:
 * the follower started an election although the leader was alive and its
 * messages were waiting in the socket, and a leader could step down for
 * replies it had not read yet. rep therefore wraps the tick: when it comes
 * late (the loop was blocked for two heartbeat intervals or more), the tick
 * is moved to the end of the same loop iteration (uv_check), after a
 * non-blocking poll (uv_idle) has delivered whatever arrived, and the time
 * the loop was blocked is added back to the election timer (a node cannot
 * tell a silent peer from its own deafness, and on one busy machine every
 * node stalls at once). A leader that really is gone is noticed late by at
 * most the time this node itself was blocked. */
#define REP_STALL_LOG_MS 10000

static void tick_forward(struct rep *r, int g)
{
    int was = raft_state(r->rp);

    gates[g].tick(gates[g].io);
    if (was != RAFT_CANDIDATE && raft_state(r->rp) == RAFT_CANDIDATE) r->elections++;
}

static void tick_idle_cb(uv_idle_t *h)
{
    (void)h; /* only keeps the next poll from blocking */
}

static void tick_check_cb(uv_check_t *h)
{
    struct rep *r = h->data;
    int g;

    uv_check_stop(&r->tick_check);
    uv_idle_stop(&r->tick_idle);
    r->tick_deferred = 0;
    if (r->closing) return;
    g = gate_find(r->rp->io);
    if (g >= 0 && gates[g].tick != NULL) tick_forward(r, g);
}

static void gate_tick(struct raft_io *io)
{
    int g = gate_find(io);
    struct rep *r;
    uint64_t now, gap;

    if (g < 0) return;
    r = gates[g].rep;
    if (r->loop == NULL || !r->tick_handles) {
        tick_forward(r, g);
        return;
    }
    now = uv_now(r->loop);
    gap = r->last_tick_ms != 0 && now > r->last_tick_ms ? now - r->last_tick_ms : 0;
    r->last_tick_ms = now;
    if (r->tick_deferred) return;
    if (gates[g].msecs > 0 && gap >= 2 * (uint64_t)gates[g].msecs) {
        int state = raft_state(r->rp);
        uint64_t blocked = gap - gates[g].msecs;
        r->stalls++;
        /* Time this node could not listen does not count: a follower
         * whose leader was blocked at the same time (a whole machine or VM
         * pausing), or a leader whose followers' answers it could not read,
         * get the blocked time back on the election timer. Failover after
         * a real crash is late by at most the time this node was blocked. */
        if (state == RAFT_FOLLOWER || state == RAFT_LEADER) {
            raft_time t = r->rp->election_timer_start + blocked;
            r->rp->election_timer_start = t < now ? t : now;
        }
        if (gap >= r->cfg.election_timeout_ms / 2 && now - r->stall_log_ms >= REP_STALL_LOG_MS) {
            r->stall_log_ms = now;
            cf_warn("rep: the event loop was blocked for about %" PRIu64
                    " ms (election timeout %" PRIu64 " ms); pending Raft messages are read "
                    "before the next tick, and the blocked time does not count",
                    blocked, r->cfg.election_timeout_ms);
        } else {
            cf_debug("rep: event loop blocked for about %" PRIu64 " ms", blocked);
        }
        r->tick_deferred = 1;
        uv_idle_start(&r->tick_idle, tick_idle_cb);
        uv_check_start(&r->tick_check, tick_check_cb);
        return;
    }
    tick_forward(r, g);
}

/* ---- bounded AppendEntries ----
 *
 * libraft 0.15 puts every entry from a follower's next index up to the end
 * of the log into one AppendEntries message (no size limit), and while it
 * probes a follower (after an election, a rejection, a reconnect) it sends
 * that message again every heartbeat until it gets an answer. A follower
 * that is behind by a few large entries then got one message of hundreds
 * of MiB, which it decodes and writes in one go on its loop thread, again
 * and again. rep cuts such a message to its first entries up to
 * REP_SEND_MAX_BYTES (at least one entry): a shorter AppendEntries is as
 * valid as the full one (the follower appends that prefix and answers with
 * its last index, the leader sends the rest next). When the leader had
 * already counted the whole message as sent (pipeline mode), its next
 * message is rejected by the follower and the leader goes back to probing
 * from what the follower has, so catching up proceeds in bounded steps. */
#define REP_SEND_MAX_BYTES (4u * 1024u * 1024u)

static int gate_send(struct raft_io *io, struct raft_io_send *req, const struct raft_message *m,
                     raft_io_send_cb cb)
{
    int g = gate_find(io);

    if (g < 0) return RAFT_IOERR; /* cannot happen: installed with the gate */
    if (m->type == RAFT_IO_APPEND_ENTRIES && m->append_entries.n_entries > 1) {
        const struct raft_append_entries *ae = &m->append_entries;
        uint64_t sum = 0;
        unsigned k;
        for (k = 0; k < ae->n_entries; k++) {
            sum += ae->entries[k].buf.len;
            if (k > 0 && sum > REP_SEND_MAX_BYTES) break;
        }
        if (k < ae->n_entries) {
            struct raft_message cut = *m; /* encoded right away by the transport */
            cut.append_entries.n_entries = k;
            gates[g].rep->sends_cut++;
            return gates[g].send(io, req, &cut, cb);
        }
    }
    return gates[g].send(io, req, m, cb);
}

static int gate_start(struct raft_io *io, unsigned msecs, raft_io_tick_cb tick,
                      raft_io_recv_cb recv)
{
    int g = gate_find(io);
    if (g < 0) return RAFT_IOERR;
    gates[g].recv = recv;
    gates[g].tick = tick;
    gates[g].msecs = msecs;
    return gates[g].start(io, msecs, gate_tick, gate_recv);
}

static int gate_install(struct rep *r, struct raft_io *io)
{
    int g = gate_find(io);
    if (g < 0) g = gate_find(NULL);
    if (g < 0) {
        cf_error("rep: too many raft instances in one process");
        return -1;
    }
    gates[g].io = io;
    gates[g].rep = r;
    gates[g].start = io->start;
    io->start = gate_start;
    gates[g].send = io->send;
    io->send = gate_send;
    return 0;
}

static void gate_remove(struct rep *r)
{
    for (int i = 0; i < REP_GATES; i++)
        if (gates[i].rep == r) memset(&gates[i], 0, sizeof gates[i]);
}

/* ---- TCP_NODELAY on the Raft connections ----
 *
 * libraft's TCP transport (raft_uv_tcp, 0.15) never sets TCP_NODELAY, and
 * each of its connections carries messages one way only: a node's
 * AppendEntries go out on the connection it opened to the follower, the
 * follower's results come back on the connection the follower opened to
 * it. The receiver of a connection therefore never sends data on it, so it
 * never piggybacks an ACK and acknowledges a small segment only when its
 * delayed-ACK timer fires (40 ms on Linux). Under Nagle's algorithm the
 * sender holds every further small message (an AppendEntries of a few KiB,
 * a 40-byte result) until that ACK arrives: with a few concurrent
 * proposals, the leader's next AppendEntries waited up to 40 ms and the
 * commits of every client in between with it (8 clients no faster than 1,
 * p99 ~50 ms). Messages are written whole (one uv_write per message), so
 * there is nothing for Nagle to coalesce: rep wraps the transport's
 * connect and listen and sets TCP_NODELAY on every Raft stream. */
static raft_uv_connect_cb nd_connect_cb;
static raft_uv_accept_cb nd_accept_cb;
static int (*nd_connect)(struct raft_uv_transport *, struct raft_uv_connect *, raft_id,
                         const char *, raft_uv_connect_cb);
static int (*nd_listen)(struct raft_uv_transport *, raft_uv_accept_cb);

static void nd_set(struct uv_stream_s *stream)
{
    int rv;

    if (stream == NULL || stream->type != UV_TCP) return;
    rv = uv_tcp_nodelay((uv_tcp_t *)stream, 1);
    if (rv != 0) cf_warn("rep: TCP_NODELAY on a Raft connection: %s", uv_strerror(rv));
}

static void nd_connect_done(struct raft_uv_connect *req, struct uv_stream_s *stream, int status)
{
    if (status == 0) nd_set(stream);
    nd_connect_cb(req, stream, status);
}

static int nd_connect_wrap(struct raft_uv_transport *t, struct raft_uv_connect *req, raft_id id,
                           const char *address, raft_uv_connect_cb cb)
{
    nd_connect_cb = cb; /* raft_uv passes the same callback every time */
    return nd_connect(t, req, id, address, nd_connect_done);
}

static void nd_accept_done(struct raft_uv_transport *t, raft_id id, const char *address,
                           struct uv_stream_s *stream)
{
    nd_set(stream);
    nd_accept_cb(t, id, address, stream);
}

static int nd_listen_wrap(struct raft_uv_transport *t, raft_uv_accept_cb cb)
{
    nd_accept_cb = cb;
    return nd_listen(t, nd_accept_done);
}

static void nodelay_install(struct raft_uv_transport *t)
{
    if (nd_connect == NULL) nd_connect = t->connect;
    if (nd_listen == NULL) nd_listen = t->listen;
    if (t->connect == nd_connect) t->connect = nd_connect_wrap;
    if (t->listen == nd_listen) t->listen = nd_listen_wrap;
}

/* ---- role tracking ---- */

static void role_check(struct rep *r)
{
    int state, is_leader;

    if (!r->started || r->closing) return;
    state = raft_state(&r->raft);
    is_leader = state == RAFT_LEADER;
    if (state != r->last_state) {
        cf_info("rep: node %" PRIu64 " is now %s (term %" PRIu64 ")", r->cfg.node_id,
                state_name(state), (uint64_t)r->raft.current_term);
        r->last_state = state;
    }
    if (is_leader != r->last_is_leader) {
        r->last_is_leader = is_leader;
        if (r->role_cb != NULL) r->role_cb(r->role_arg, is_leader);
    }
    /* A removed node is normally not told by libraft (the leader stops
     * replicating to it before the change commits); it does notice when it
     * was the leader that removed itself, or when it received the new
     * configuration before being cut off. */
    if (r->raft.configuration.n > 0) {
        int member = 0;
        unsigned i;
        for (i = 0; i < r->raft.configuration.n; i++)
            if (r->raft.configuration.servers[i].id == r->cfg.node_id) member = 1;
        if (member) {
            r->was_member = 1;
        } else if (r->was_member && !r->removed && r->raft.configuration_uncommitted_index == 0) {
            r->removed = 1;
            cf_warn("rep: node %" PRIu64 " is no longer a member of the group", r->cfg.node_id);
            if (r->removed_cb != NULL) r->removed_cb(r->removed_arg);
        }
    }
}

static void role_timer_cb(uv_timer_t *t)
{
    role_check(t->data);
}

/* ---- lifecycle ---- */

/* Refuse to run when the stored configuration gives our Raft address to
 * another member (two nodes configured with the same address, or a node
 * restarted with another node's address). */
static int rep_check_own_address(struct rep *r, char *err, size_t errlen)
{
    unsigned i;

    for (i = 0; i < r->raft.configuration.n; i++) {
        const struct raft_server *sv = &r->raft.configuration.servers[i];
        if (sv->id != r->cfg.node_id && sv->address != NULL &&
            strcmp(sv->address, r->address) == 0) {
            snprintf(err, errlen,
                     "rep: Raft address %s belongs to member %" PRIu64
                     " of this group, not to node %" PRIu64 " (check raft.address and node.id)",
                     r->address, (uint64_t)sv->id, r->cfg.node_id);
            return -1;
        }
        if (sv->id == r->cfg.node_id && sv->address != NULL && strcmp(sv->address, r->address) != 0)
            cf_warn("rep: the group knows node %" PRIu64 " at %s, configured raft.address is %s",
                    r->cfg.node_id, sv->address, r->address);
    }
    return 0;
}

struct rep *rep_create(uv_loop_t *loop, const struct rep_config *cfg, const struct rep_fsm_ops *ops,
                       void *fsm, char *err, size_t errlen)
{
    struct rep *r;
    char hint[256];
    int rv;

    if (cfg->node_id == 0 || cfg->address == NULL || cfg->data_dir == NULL || ops == NULL ||
        ops->apply == NULL || ops->snapshot == NULL || ops->restore == NULL) {
        snprintf(err, errlen, "rep: invalid configuration (node id, address, data dir, ops)");
        return NULL;
    }
    if (cfg->heartbeat_ms >= cfg->election_timeout_ms) {
        snprintf(err, errlen,
                 "rep: heartbeat (%" PRIu64 " ms) must be below the election "
                 "timeout (%" PRIu64 " ms)",
                 cfg->heartbeat_ms, cfg->election_timeout_ms);
        return NULL;
    }
    if (cfg->snapshot_threshold == 0 || cfg->snapshot_trailing == 0) {
        /* libraft 0.15's uv backend takes trailing == 0 as "snapshot was
         * installed from the leader": it drops every log segment, including
         * entries appended after the snapshot index (committed entries
         * vanish on restart). Never let that happen. */
        snprintf(err, errlen, "rep: snapshot threshold and trailing must be >= 1");
        return NULL;
    }
    r = calloc(1, sizeof *r);
    if (r == NULL) goto nomem;
    r->loop = loop;
    r->rp = &r->raft;
    r->cfg = *cfg;
    r->ops = *ops;
    r->fsm_data = fsm;
    r->address = strdup(cfg->address);
    r->data_dir = strdup(cfg->data_dir);
    if (r->address == NULL || r->data_dir == NULL) goto nomem;
    r->cfg.address = r->address;
    r->cfg.data_dir = r->data_dir;
    r->last_state = -1;
    r->fragment_bytes = cfg->fragment_bytes == 0 ? REP_FRAGMENT_DEFAULT : cfg->fragment_bytes;
    if (r->fragment_bytes < REP_FRAGMENT_MIN) r->fragment_bytes = REP_FRAGMENT_MIN;

    r->fsm.version = 2;
    r->fsm.data = r;
    r->fsm.apply = fsm_apply;
    r->fsm.snapshot = fsm_snapshot;
    r->fsm.restore = fsm_restore;
    r->fsm.snapshot_finalize = fsm_snapshot_finalize;
    r->fsm.snapshot_async = NULL;

    rv = raft_uv_tcp_init(&r->transport, loop);
    if (rv != 0) {
        snprintf(err, errlen, "rep: raft_uv_tcp_init: %s", raft_strerror(rv));
        goto fail;
    }
    r->transport_init = 1;
    nodelay_install(&r->transport);
    rv = raft_uv_init(&r->io, loop, r->data_dir, &r->transport);
    if (rv != 0) {
        aio_hint(hint, sizeof hint);
        snprintf(err, errlen, "rep: raft_uv_init(%s): %s: %s%s", r->data_dir, raft_strerror(rv),
                 r->io.errmsg, hint);
        goto fail;
    }
    r->io_init = 1;
    rv = raft_init(&r->raft, &r->io, &r->fsm, cfg->node_id, r->address);
    if (rv != 0) {
        snprintf(err, errlen, "rep: raft_init: %s: %s", raft_strerror(rv), raft_errmsg(&r->raft));
        goto fail;
    }
    r->raft_init = 1;
    r->raft.data = r;
    if (gate_install(r, &r->io) != 0)
        cf_crit("rep: cannot wrap the raft I/O: snapshots from the leader are not gated");
    /* How soon a leader sends a snapshot again that a follower dropped
     * (see the InstallSnapshot gate): the election timeout, at least 1 s. */
    raft_set_install_snapshot_timeout(
        &r->raft, (unsigned)(cfg->election_timeout_ms > 1000 ? cfg->election_timeout_ms : 1000));
    raft_set_election_timeout(&r->raft, (unsigned)cfg->election_timeout_ms);
    raft_set_heartbeat_timeout(&r->raft, (unsigned)cfg->heartbeat_ms);
    raft_set_snapshot_threshold(&r->raft, (unsigned)cfg->snapshot_threshold);
    raft_set_snapshot_trailing(&r->raft, (unsigned)cfg->snapshot_trailing);
    raft_set_pre_vote(&r->raft, true);
    raft_uv_set_connect_retry_delay(&r->io, REP_CONNECT_RETRY_MS);
    return r;

nomem:
    snprintf(err, errlen, "rep: out of memory");
fail:
    if (r != NULL) {
        /* Only reached before raft_init succeeded: release synchronously. */
        if (r->io_init) raft_uv_close(&r->io);
        if (r->transport_init) raft_uv_tcp_close(&r->transport);
        free(r->address);
        free(r->data_dir);
        free(r);
    }
    return NULL;
}

int rep_start(struct rep *r, char *err, size_t errlen)
{
    return rep_start_mode(r, r->cfg.bootstrap, err, errlen);
}

int rep_start_mode(struct rep *r, int bootstrap, char *err, size_t errlen)
{
    struct raft_configuration conf;
    char hint[256];
    int rv;

    if (r->started || r->closing) {
        snprintf(err, errlen, "rep: already started or closing");
        return -1;
    }
    if (bootstrap) {
        raft_configuration_init(&conf);
        rv = raft_configuration_add(&conf, r->cfg.node_id, r->address, RAFT_VOTER);
        if (rv != 0) {
            raft_configuration_close(&conf);
            snprintf(err, errlen, "rep: configuration: %s", raft_strerror(rv));
            return -1;
        }
        rv = raft_bootstrap(&r->raft, &conf);
        raft_configuration_close(&conf);
        if (rv == 0) {
            cf_notice("rep: bootstrapped new single-voter group (node %" PRIu64 " at %s)",
                      r->cfg.node_id, r->address);
        } else if (rv == RAFT_CANTBOOTSTRAP) {
            cf_debug("rep: data dir already holds a group; not bootstrapping");
        } else {
            aio_hint(hint, sizeof hint);
            snprintf(err, errlen, "rep: bootstrap in %s: %s: %s%s", r->data_dir, raft_strerror(rv),
                     raft_errmsg(&r->raft), hint);
            return -1;
        }
    }
    rv = raft_start(&r->raft);
    if (rv != 0) {
        aio_hint(hint, sizeof hint);
        snprintf(err, errlen, "rep: raft_start in %s: %s: %s%s", r->data_dir, raft_strerror(rv),
                 raft_errmsg(&r->raft), hint);
        return -1;
    }
    r->started = 1;
    r->last_snapshot_index = r->raft.log.snapshot.last_index;
    if (rep_check_own_address(r, err, errlen) != 0) return -1;
    rv = uv_timer_init(r->loop, &r->role_timer);
    if (rv != 0) {
        snprintf(err, errlen, "rep: uv_timer_init: %s", uv_strerror(rv));
        return -1;
    }
    r->role_timer.data = r;
    r->role_timer_init = 1;
    rv = uv_timer_start(&r->role_timer, role_timer_cb, REP_ROLE_POLL_MS, REP_ROLE_POLL_MS);
    if (rv != 0) {
        snprintf(err, errlen, "rep: uv_timer_start: %s", uv_strerror(rv));
        return -1;
    }
    uv_idle_init(r->loop, &r->tick_idle);
    uv_check_init(r->loop, &r->tick_check);
    r->tick_idle.data = r;
    r->tick_check.data = r;
    r->tick_handles = 1;
    cf_info("rep: started node %" PRIu64 " at %s (dir %s, last index %" PRIu64 ", snapshot %" PRIu64
            ")",
            r->cfg.node_id, r->address, r->data_dir, (uint64_t)raft_last_index(&r->raft),
            r->last_snapshot_index);
    role_check(r);
    return 0;
}

/* ---- proposals ---- */

/* Entry framing. libraft 0.15 as packaged (built with NDEBUG) silently
 * writes corrupt log segments when an entry's length is not a multiple of
 * 8: the encoder pads the batch size but not the data cursor (an assert
 * that is compiled out), and the next start fails with "persisted data is
 * corrupted: ... entries count ... in preamble is too high". So every
 * command is framed as
 *   u32 LE REP_FRAME_MAGIC, u32 LE payload length, payload, zero padding
 * to a multiple of 8. rep_buf_alloc hands out a pointer just after the
 * header (the header records the capacity until rep_propose stores the
 * final length); fsm_apply strips the frame again. */
#define REP_FRAME_MAGIC 0x50455243u /* "CREP" little-endian */

static size_t pad8(size_t n)
{
    return (n + 7) & ~(size_t)7;
}

static void put_u32le(unsigned char *p, uint32_t v)
{
    p[0] = (unsigned char)v;
    p[1] = (unsigned char)(v >> 8);
    p[2] = (unsigned char)(v >> 16);
    p[3] = (unsigned char)(v >> 24);
}

static uint32_t get_u32le(const unsigned char *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static void put_u64le(unsigned char *p, uint64_t v)
{
    put_u32le(p, (uint32_t)v);
    put_u32le(p + 4, (uint32_t)(v >> 32));
}

static uint64_t get_u64le(const unsigned char *p)
{
    return (uint64_t)get_u32le(p) | (uint64_t)get_u32le(p + 4) << 32;
}

/* A fragment frame (raft_malloc()ed) of `len` bytes of `data`. */
static void *frag_build(const unsigned char *data, size_t len, uint64_t term, uint32_t counter,
                        uint32_t seq, uint32_t count, uint64_t total, size_t *len_r)
{
    size_t flen = REP_FRAG_HDR + pad8(len);
    unsigned char *f = raft_malloc(flen);

    if (f == NULL) return NULL;
    put_u32le(f, REP_FRAG_MAGIC);
    put_u32le(f + 4, (uint32_t)len);
    put_u64le(f + 8, term);
    put_u32le(f + 16, counter);
    put_u32le(f + 20, seq);
    put_u32le(f + 24, count);
    put_u32le(f + 28, 0);
    put_u64le(f + 32, total);
    memcpy(f + REP_FRAG_HDR, data, len);
    memset(f + REP_FRAG_HDR + len, 0, pad8(len) - len);
    *len_r = flen;
    return f;
}

void *rep_buf_alloc(size_t len)
{
    unsigned char *base;

    if (len > UINT32_MAX - 16) return NULL;
    base = raft_calloc(1, REP_FRAME_HDR + pad8(len));
    if (base == NULL) return NULL;
    put_u32le(base, REP_FRAME_MAGIC);
    put_u32le(base + 4, (uint32_t)len); /* capacity until proposed */
    return base + REP_FRAME_HDR;
}

void rep_buf_free(void *buf)
{
    if (buf != NULL) raft_free((unsigned char *)buf - REP_FRAME_HDR);
}

/* Payload of a framed entry, or -1 when the frame is malformed. */
static int frame_open(const struct raft_buffer *buf, const void **data_r, size_t *len_r)
{
    const unsigned char *p = buf->base;
    uint32_t len;

    if (buf->len < REP_FRAME_HDR || buf->len % 8 != 0 || get_u32le(p) != REP_FRAME_MAGIC) return -1;
    len = get_u32le(p + 4);
    if (REP_FRAME_HDR + pad8(len) != buf->len) return -1;
    *data_r = p + REP_FRAME_HDR;
    *len_r = len;
    return 0;
}

static void apply_cb(struct raft_apply *req, int status, void *result)
{
    struct rep_req *q = req->data;

    (void)result;
    if (status != 0 && status != RAFT_LEADERSHIPLOST && status != RAFT_SHUTDOWN &&
        status != RAFT_CANCELED)
        cf_warn("rep: proposal failed: %s", raft_strerror(status));
    q->cb(q->arg, map_status(status));
    free(q);
}

/* One proposal split into fragments: the caller's callback fires once,
 * when the last submitted fragment's callback has fired (applied, or
 * failed). */
struct rep_msg {
    rep_propose_cb cb;
    void *arg;
    unsigned outstanding;
    int status; /* first failure, 0 if none */
};

struct rep_frag_req {
    struct raft_apply apply;
    struct rep_msg *msg;
};

static void frag_apply_cb(struct raft_apply *req, int status, void *result)
{
    struct rep_frag_req *fq = req->data;
    struct rep_msg *m = fq->msg;

    (void)result;
    free(fq);
    if (status != 0 && m->status == 0) {
        m->status = status;
        if (status != RAFT_LEADERSHIPLOST && status != RAFT_SHUTDOWN && status != RAFT_CANCELED)
            cf_warn("rep: proposal failed: %s", raft_strerror(status));
    }
    if (--m->outstanding > 0) return;
    m->cb(m->arg, map_status(m->status));
    free(m);
}

/* A proposal ready for raft_apply: the framed entry, or its fragments
 * (term and counter filled in when submitted). */
struct rep_prepared {
    size_t len;     /* payload bytes */
    uint32_t count; /* 1: `one`; else fragments */
    void *one;      /* framed entry (count == 1) */
    size_t one_len;
    void **frag; /* fragment frames */
    size_t *frag_len;
};

static void prepared_free(struct rep_prepared *p)
{
    if (p == NULL) return;
    if (p->one != NULL) raft_free(p->one);
    for (uint32_t i = 0; p->frag != NULL && i < p->count; i++)
        if (p->frag[i] != NULL) raft_free(p->frag[i]);
    free(p->frag);
    free(p->frag_len);
    free(p);
}

/* Frame `len` payload bytes at `base` (from rep_buf_alloc) for raft_apply,
 * split into fragments above `fb` bytes (see "Large entries"). Takes
 * `base`. Any thread: only memory is touched. NULL when out of memory. */
static struct rep_prepared *prepare(uint64_t fb, unsigned char *base, size_t len)
{
    struct rep_prepared *p = calloc(1, sizeof *p);
    uint32_t count;

    if (p == NULL) goto fail;
    p->len = len;
    if (len <= fb) {
        put_u32le(base + 4, (uint32_t)len);
        memset(base + REP_FRAME_HDR + len, 0, pad8(len) - len);
        p->count = 1;
        p->one = base;
        p->one_len = REP_FRAME_HDR + pad8(len);
        return p;
    }
    count = (uint32_t)((len + fb - 1) / fb);
    p->frag = calloc(count, sizeof *p->frag);
    p->frag_len = calloc(count, sizeof *p->frag_len);
    if (p->frag == NULL || p->frag_len == NULL) goto fail;
    p->count = count;
    for (uint32_t seq = 0; seq < count; seq++) {
        size_t off = (size_t)seq * fb, n = len - off < fb ? len - off : (size_t)fb;
        p->frag[seq] =
            frag_build(base + REP_FRAME_HDR + off, n, 0, 0, seq, count, len, &p->frag_len[seq]);
        if (p->frag[seq] == NULL) goto fail;
    }
    raft_free(base);
    return p;

fail:
    raft_free(base);
    prepared_free(p);
    return NULL;
}

/* raft_apply a prepared proposal; takes `p`. 0 (cb fires once) or a
 * negative rep status (cb does not fire). Fragments are appended back to
 * back, in this one call, so they are contiguous in the log. */
static int submit(struct rep *r, struct rep_prepared *p, rep_propose_cb cb, void *arg)
{
    struct raft_buffer b;
    struct rep_msg *m;
    uint32_t counter;
    int rv, status;

    if (p->count == 1) {
        struct rep_req *q = calloc(1, sizeof *q);
        if (q == NULL) {
            prepared_free(p);
            return REP_ENOMEM;
        }
        q->rep = r;
        q->cb = cb;
        q->arg = arg;
        q->u.apply.data = q;
        b.base = p->one;
        b.len = p->one_len;
        rv = raft_apply(&r->raft, &q->u.apply, &b, 1, apply_cb);
        if (rv != 0) {
            free(q);
            prepared_free(p);
            return map_status(rv);
        }
        p->one = NULL; /* raft's now */
        prepared_free(p);
        return 0;
    }
    m = calloc(1, sizeof *m);
    if (m == NULL) {
        prepared_free(p);
        return REP_ENOMEM;
    }
    m->cb = cb;
    m->arg = arg;
    m->outstanding = 1; /* held until every fragment is submitted */
    counter = ++r->frag_counter;
    for (uint32_t seq = 0; seq < p->count; seq++) {
        struct rep_frag_req *fq = calloc(1, sizeof *fq);
        unsigned char *f = p->frag[seq];

        put_u64le(f + 8, r->raft.current_term);
        put_u32le(f + 16, counter);
        rv = RAFT_NOMEM;
        if (fq != NULL) {
            fq->msg = m;
            fq->apply.data = fq;
            b.base = f;
            b.len = p->frag_len[seq];
            rv = raft_apply(&r->raft, &fq->apply, &b, 1, frag_apply_cb);
            if (rv == 0)
                p->frag[seq] = NULL; /* raft's now */
            else
                free(fq);
        }
        if (rv != 0) {
            /* The fragments already appended end as an unfinished entry,
             * dropped on every node when the next entry is applied. */
            if (seq == 0) {
                free(m);
                status = map_status(rv);
                prepared_free(p);
                return status;
            }
            cf_warn("rep: proposal of %zu bytes failed after %" PRIu32 " of %" PRIu32
                    " fragments: %s",
                    p->len, seq, p->count, raft_strerror(rv));
            if (m->status == 0) m->status = rv;
            break;
        }
        m->outstanding++;
    }
    prepared_free(p);
    if (--m->outstanding == 0) { /* not reached: fragment 0 was submitted */
        m->cb(m->arg, map_status(m->status));
        free(m);
    }
    return 0;
}

/* Checks shared by rep_propose and rep_propose_prepared: 0 or a status. */
static int can_propose(struct rep *r, size_t len)
{
    if (r->closing || !r->started) return REP_ESHUTDOWN;
    if (r->cfg.max_entry_bytes > 0 && len > r->cfg.max_entry_bytes) return REP_ETOOBIG;
    if (r->fatal) return REP_EIO;
    if (raft_state(&r->raft) != RAFT_LEADER) return REP_ENOTLEADER;
    return 0;
}

/* A rep_buf_alloc buffer's frame base, or NULL (logged) when `buf` is not
 * one or `len` exceeds its capacity. */
static unsigned char *frame_base(void *buf, size_t len)
{
    unsigned char *base = (unsigned char *)buf - REP_FRAME_HDR;

    if (get_u32le(base) != REP_FRAME_MAGIC || len > get_u32le(base + 4)) {
        /* Not from rep_buf_alloc, or longer than allocated: a caller bug. */
        cf_error("rep: proposal buffer not from rep_buf_alloc, or longer than allocated");
        return NULL;
    }
    return base;
}

int rep_propose(struct rep *r, void *buf, size_t len, rep_propose_cb cb, void *arg)
{
    unsigned char *base;
    struct rep_prepared *p;
    int status;

    if (buf == NULL) return REP_ENOMEM;
    base = frame_base(buf, len);
    if (base == NULL) {
        raft_free((unsigned char *)buf - REP_FRAME_HDR);
        return REP_EIO;
    }
    status = can_propose(r, len);
    if (status != 0) {
        raft_free(base);
        return status;
    }
    p = prepare(r->fragment_bytes, base, len);
    if (p == NULL) return REP_ENOMEM;
    return submit(r, p, cb, arg);
}

struct rep_prepared *rep_prepare(const struct rep *r, void *buf, size_t len)
{
    unsigned char *base;

    if (buf == NULL) return NULL;
    base = frame_base(buf, len);
    if (base == NULL) {
        raft_free((unsigned char *)buf - REP_FRAME_HDR);
        return NULL;
    }
    return prepare(r->fragment_bytes, base, len);
}

int rep_propose_prepared(struct rep *r, struct rep_prepared *p, rep_propose_cb cb, void *arg)
{
    int status;

    if (p == NULL) return REP_ENOMEM;
    status = can_propose(r, p->len);
    if (status != 0) {
        prepared_free(p);
        return status;
    }
    return submit(r, p, cb, arg);
}

void rep_prepared_free(struct rep_prepared *p)
{
    prepared_free(p);
}

static void barrier_cb(struct raft_barrier *req, int status)
{
    struct rep_req *q = req->data;

    q->cb(q->arg, map_status(status));
    free(q);
}

int rep_barrier(struct rep *r, rep_propose_cb cb, void *arg)
{
    struct rep_req *q;
    int rv;

    if (r->closing || !r->started) return REP_ESHUTDOWN;
    if (raft_state(&r->raft) != RAFT_LEADER) return REP_ENOTLEADER;
    q = calloc(1, sizeof *q);
    if (q == NULL) return REP_ENOMEM;
    q->rep = r;
    q->cb = cb;
    q->arg = arg;
    q->u.barrier.data = q;
    rv = raft_barrier(&r->raft, &q->u.barrier, barrier_cb);
    if (rv != 0) {
        free(q);
        return map_status(rv);
    }
    return 0;
}

/* ---- state ---- */

int rep_is_leader(const struct rep *r)
{
    if (!r->started || r->closing) return 0;
    return raft_state((struct raft *)&r->raft) == RAFT_LEADER;
}

void rep_get_info(const struct rep *r, struct rep_info *info_r)
{
    struct raft *raft = (struct raft *)&r->raft;
    raft_id leader_id = 0;
    const char *leader_addr = NULL;
    int state;

    memset(info_r, 0, sizeof *info_r);
    if (!r->started || r->closing) {
        info_r->role = "unavailable";
        return;
    }
    state = raft_state(raft);
    info_r->is_leader = state == RAFT_LEADER;
    info_r->role = state_name(state);
    info_r->term = raft->current_term;
    info_r->commit_index = raft->commit_index;
    info_r->applied_index = raft_last_applied(raft);
    info_r->last_index = raft_last_index(raft);
    info_r->last_snapshot_index = raft->log.snapshot.last_index;
    if (info_r->last_snapshot_index < r->last_snapshot_index)
        info_r->last_snapshot_index = r->last_snapshot_index;
    raft_leader(raft, &leader_id, &leader_addr);
    info_r->leader_id = leader_id;
    if (leader_addr != NULL)
        snprintf(info_r->leader_address, sizeof info_r->leader_address, "%s", leader_addr);
    info_r->elections_started = r->elections;
    info_r->loop_stalls = r->stalls;
}

void rep_set_role_cb(struct rep *r, void (*cb)(void *arg, int is_leader), void *arg)
{
    r->role_cb = cb;
    r->role_arg = arg;
}

/* ---- shutdown ---- */

/* libraft 0.15 dereferences NULL inside raft_close() when the leader still
 * has log appends in flight on disk (the cancelled append callback walks
 * leader state that raft_close already cleared): seen as a SIGSEGV in
 * raft_close right after raft_apply. So rep_close first stops taking
 * proposals and waits (bounded) until every appended entry is stored and
 * no snapshot write is pending, then calls raft_close. */
#define REP_DRAIN_POLL_MS 5
#define REP_DRAIN_MAX_MS 5000

static void close_step_done(struct rep *r)
{
    if (--r->pending_closes > 0) return;
    r->closed = 1;
    cf_info("rep: closed");
    if (r->close_cb != NULL) r->close_cb(r->close_arg);
}

static void role_timer_close_cb(uv_handle_t *h)
{
    close_step_done(h->data);
}

static void on_raft_closed(struct raft *raft)
{
    struct rep *r = raft->data;

    /* Only now may the I/O and the transport be released (stack.md 2). */
    raft_uv_close(&r->io);
    raft_uv_tcp_close(&r->transport);
    r->io_init = 0;
    r->transport_init = 0;
    close_step_done(r);
}

static int io_drained(struct rep *r)
{
    return r->raft.last_stored >= raft_last_index(&r->raft) && r->raft.snapshot.pending.term == 0;
}

static void close_now(struct rep *r)
{
    if (r->role_timer_init) {
        r->pending_closes++;
        uv_timer_stop(&r->role_timer);
        uv_close((uv_handle_t *)&r->role_timer, role_timer_close_cb);
    }
    if (r->tick_handles) {
        r->tick_handles = 0;
        r->tick_deferred = 0;
        r->pending_closes += 2;
        uv_close((uv_handle_t *)&r->tick_idle, role_timer_close_cb);
        uv_close((uv_handle_t *)&r->tick_check, role_timer_close_cb);
    }
    /* raft_close also closes r->io (io->close); pending requests fire with
     * an error status meanwhile. */
    raft_close(&r->raft, on_raft_closed);
}

static void drain_timer_cb(uv_timer_t *t)
{
    struct rep *r = t->data;

    if (!io_drained(r)) {
        if (uv_now(r->loop) < r->close_deadline) return;
        cf_warn("rep: closing with log writes still in flight (stored %" PRIu64 " of %" PRIu64 ")",
                (uint64_t)r->raft.last_stored, (uint64_t)raft_last_index(&r->raft));
    }
    close_now(r);
}

void rep_close(struct rep *r, void (*cb)(void *arg), void *arg)
{
    if (r->closing) return;
    r->closing = 1;
    r->close_cb = cb;
    r->close_arg = arg;
    r->pending_closes = 1; /* raft_close */
    if (r->role_timer_init && r->started && !io_drained(r)) {
        r->close_deadline = uv_now(r->loop) + REP_DRAIN_MAX_MS;
        uv_timer_stop(&r->role_timer);
        uv_timer_start(&r->role_timer, drain_timer_cb, REP_DRAIN_POLL_MS, REP_DRAIN_POLL_MS);
        return;
    }
    close_now(r);
}

void rep_destroy(struct rep **rp)
{
    struct rep *r;

    if (rp == NULL || *rp == NULL) return;
    r = *rp;
    if (r->raft_init && !r->closed) {
        cf_error("rep: rep_destroy before rep_close completed; leaking");
        *rp = NULL;
        return;
    }
    gate_remove(r);
    part_reset(r);
    free(r->address);
    free(r->data_dir);
    free(r);
    *rp = NULL;
}

/* ---- groups of several nodes ---- */

int rep_dir_is_new(const char *data_dir)
{
    char p[4096];
    struct stat st;

    snprintf(p, sizeof p, "%s/metadata1", data_dir);
    if (stat(p, &st) == 0) return 0;
    snprintf(p, sizeof p, "%s/metadata2", data_dir);
    if (stat(p, &st) == 0) return 0;
    return 1;
}

int rep_is_started(const struct rep *r)
{
    return r->started && !r->closing;
}

const char *rep_member_role_name(int role)
{
    switch (role) {
    case REP_ROLE_VOTER:
        return "voter";
    case REP_ROLE_STANDBY:
        return "standby";
    case REP_ROLE_SPARE:
        return "spare";
    default:
        return "unknown";
    }
}

static int from_raft_role(int role)
{
    switch (role) {
    case RAFT_VOTER:
        return REP_ROLE_VOTER;
    case RAFT_STANDBY:
        return REP_ROLE_STANDBY;
    default:
        return REP_ROLE_SPARE;
    }
}

int rep_members(const struct rep *r, struct rep_member **m_r, size_t *n_r)
{
    const struct raft_configuration *c = &r->raft.configuration;
    struct rep_member *m;
    unsigned i;

    *m_r = NULL;
    *n_r = 0;
    if (!r->started) return 0;
    m = calloc(c->n > 0 ? c->n : 1, sizeof *m);
    if (m == NULL) return -1;
    for (i = 0; i < c->n; i++) {
        m[i].id = c->servers[i].id;
        snprintf(m[i].address, sizeof m[i].address, "%s",
                 c->servers[i].address ? c->servers[i].address : "");
        m[i].role = from_raft_role(c->servers[i].role);
    }
    *m_r = m;
    *n_r = c->n;
    return 0;
}

/* Adding a voter (rep_add with REP_ROLE_VOTER): libraft 0.15 promotes a
 * spare to voter only after catch-up rounds of at most
 * max_catch_up_round_duration (5 s) each and fails the change otherwise;
 * a node that must first fetch a large checkpoint (InstallSnapshot is
 * gated until it has one) cannot make that. So the node is added as spare,
 * assigned STANDBY (replicated, no catch-up condition), and rep waits until
 * its match index reaches the leader's commit index as of then before it
 * asks for the VOTER role (whose catch-up is then one short round). */
#define REP_CATCH_UP_POLL_MS 100
#define REP_CATCH_UP_MAX_MS (60u * 60u * 1000u)
#define REP_CATCH_UP_LOG_MS 5000

enum {
    CH_ADD = 0,     /* raft_add in flight */
    CH_ASSIGN = 1,  /* raft_assign(final role) in flight */
    CH_REMOVE = 2,  /* raft_remove in flight */
    CH_STANDBY = 3, /* raft_assign(STANDBY) before becoming voter */
    CH_CATCHUP = 4, /* waiting for the standby to catch up */
};

struct rep_change_req {
    struct raft_change change;
    struct raft_transfer transfer;
    struct rep *rep;
    uint64_t id;
    int raft_role;
    int stage;
    rep_propose_cb cb;
    void *arg;
    uv_timer_t timer;
    uint64_t target, wait_start, logged_at;
};

static void change_finish(struct rep_change_req *q, int status);

static void change_free_cb(uv_handle_t *h)
{
    free(h->data);
}

static void change_release(struct rep_change_req *q)
{
    if (q->stage == CH_CATCHUP) {
        q->timer.data = q;
        uv_close((uv_handle_t *)&q->timer, change_free_cb);
    } else {
        free(q);
    }
}

static void change_cb(struct raft_change *req, int status);

static void catchup_tick(uv_timer_t *t)
{
    struct rep_change_req *q = t->data;
    struct rep *r = q->rep;
    const struct raft_configuration *c = &r->raft.configuration;
    uint64_t now = uv_now(r->loop);
    uint64_t match = 0;
    unsigned i;
    int rv;

    if (r->closing) {
        change_finish(q, RAFT_SHUTDOWN);
        return;
    }
    if (raft_state(&r->raft) != RAFT_LEADER) {
        change_finish(q, RAFT_LEADERSHIPLOST);
        return;
    }
    for (i = 0; i < c->n; i++)
        if (c->servers[i].id == q->id) break;
    if (i == c->n) {
        change_finish(q, RAFT_BADID);
        return;
    }
    match = r->raft.leader_state.progress[i].match_index;
    if (match < q->target) {
        if (now - q->wait_start >= REP_CATCH_UP_MAX_MS) {
            cf_warn("rep: node %" PRIu64 " did not catch up within %u s; it stays standby", q->id,
                    REP_CATCH_UP_MAX_MS / 1000);
            change_finish(q, RAFT_NOCONNECTION);
            return;
        }
        if (now - q->logged_at >= REP_CATCH_UP_LOG_MS) {
            q->logged_at = now;
            cf_info("rep: node %" PRIu64 " catching up as standby: replicated %" PRIu64
                    " of %" PRIu64,
                    q->id, match, q->target);
        }
        return;
    }
    uv_timer_stop(&q->timer);
    cf_info("rep: node %" PRIu64 " caught up (%" PRIu64 "): assigning voter", q->id, match);
    rv = raft_assign(&r->raft, &q->change, q->id, RAFT_VOTER, change_cb);
    if (rv != 0) {
        cf_warn("rep: assign voter to node %" PRIu64 ": %s", q->id, raft_strerror(rv));
        change_finish(q, rv);
        return;
    }
    /* the timer handle stays open until the request is released */
}

static void change_finish(struct rep_change_req *q, int status)
{
    if (status != 0)
        cf_warn("rep: membership change for node %" PRIu64 " failed: %s", q->id,
                raft_strerror(status));
    else
        cf_notice("rep: membership change for node %" PRIu64 " committed", q->id);
    if (q->stage == CH_CATCHUP) uv_timer_stop(&q->timer);
    q->cb(q->arg, map_status(status));
    change_release(q);
}

static void change_cb(struct raft_change *req, int status)
{
    struct rep_change_req *q = req->data;
    struct rep *r = q->rep;
    int rv;

    if (status == 0 && q->stage == CH_ADD && !r->closing) {
        /* Added as spare: a standby gets its role now; a voter first
         * becomes standby and is promoted once caught up. */
        q->stage = q->raft_role == RAFT_VOTER ? CH_STANDBY : CH_ASSIGN;
        rv = raft_assign(&r->raft, &q->change, q->id, RAFT_STANDBY, change_cb);
        if (rv == 0) return;
        cf_warn("rep: assign role to node %" PRIu64 ": %s", q->id, raft_strerror(rv));
        status = rv;
    } else if (status == 0 && q->stage == CH_STANDBY && !r->closing) {
        q->stage = CH_CATCHUP;
        q->target = r->raft.commit_index;
        q->wait_start = q->logged_at = uv_now(r->loop);
        rv = uv_timer_init(r->loop, &q->timer);
        if (rv == 0) {
            q->timer.data = q;
            rv = uv_timer_start(&q->timer, catchup_tick, 0, REP_CATCH_UP_POLL_MS);
            if (rv == 0) return;
            change_finish(q, RAFT_NOMEM);
            return;
        }
        q->stage = CH_STANDBY;
        status = RAFT_NOMEM;
    }
    change_finish(q, status);
}

static int change_start(struct rep *r, uint64_t id, const char *address, int role, int stage,
                        rep_propose_cb cb, void *arg)
{
    struct rep_change_req *q;
    int rv;

    if (r->closing || !r->started) return REP_ESHUTDOWN;
    if (raft_state(&r->raft) != RAFT_LEADER) return REP_ENOTLEADER;
    if (id == 0) return REP_EINVAL;
    q = calloc(1, sizeof *q);
    if (q == NULL) return REP_ENOMEM;
    q->rep = r;
    q->id = id;
    q->cb = cb;
    q->arg = arg;
    q->stage = stage;
    q->raft_role = role == REP_ROLE_STANDBY ? RAFT_STANDBY : RAFT_VOTER;
    q->change.data = q;
    if (stage == CH_ADD)
        rv = raft_add(&r->raft, &q->change, id, address, change_cb);
    else
        rv = raft_remove(&r->raft, &q->change, id, change_cb);
    if (rv != 0) {
        free(q);
        cf_warn("rep: membership change for node %" PRIu64 " refused: %s", id, raft_strerror(rv));
        return map_status(rv);
    }
    return 0;
}

int rep_add(struct rep *r, uint64_t id, const char *address, int role, rep_propose_cb cb, void *arg)
{
    if (address == NULL || address[0] == '\0') return REP_EINVAL;
    return change_start(r, id, address, role, CH_ADD, cb, arg);
}

int rep_remove(struct rep *r, uint64_t id, rep_propose_cb cb, void *arg)
{
    return change_start(r, id, NULL, 0, CH_REMOVE, cb, arg);
}

static void transfer_cb(struct raft_transfer *req)
{
    struct rep_change_req *q = req->data;
    struct rep *r = q->rep;
    int ok = !r->closing && raft_state(&r->raft) != RAFT_LEADER;

    cf_notice("rep: leadership transfer %s", ok ? "done" : "did not complete");
    q->cb(q->arg, ok ? REP_OK : REP_EIO);
    free(q);
}

int rep_transfer(struct rep *r, uint64_t id, rep_propose_cb cb, void *arg)
{
    struct rep_change_req *q;
    int rv;

    if (r->closing || !r->started) return REP_ESHUTDOWN;
    if (raft_state(&r->raft) != RAFT_LEADER) return REP_ENOTLEADER;
    q = calloc(1, sizeof *q);
    if (q == NULL) return REP_ENOMEM;
    q->rep = r;
    q->id = id;
    q->cb = cb;
    q->arg = arg;
    q->transfer.data = q;
    rv = raft_transfer(&r->raft, &q->transfer, id, transfer_cb);
    if (rv != 0) {
        free(q);
        cf_warn("rep: leadership transfer refused: %s", raft_strerror(rv));
        return map_status(rv);
    }
    return 0;
}

void rep_set_removed_cb(struct rep *r, void (*cb)(void *arg), void *arg)
{
    r->removed_cb = cb;
    r->removed_arg = arg;
}

/* ---- test support (raft/fixture.h) ---- */

static void fsm_setup(struct rep *r)
{
    r->fsm.version = 2;
    r->fsm.data = r;
    r->fsm.apply = fsm_apply;
    r->fsm.snapshot = fsm_snapshot;
    r->fsm.restore = fsm_restore;
    r->fsm.snapshot_finalize = fsm_snapshot_finalize;
    r->fsm.snapshot_async = NULL;
}

struct rep_fsm_adapter *rep_adapter_create(const struct rep_fsm_ops *ops, void *fsm)
{
    struct rep *r = calloc(1, sizeof *r);
    if (r == NULL) return NULL;
    r->ops = *ops;
    r->fsm_data = fsm;
    fsm_setup(r);
    return (struct rep_fsm_adapter *)r;
}

struct raft_fsm *rep_adapter_fsm(struct rep_fsm_adapter *a)
{
    return &((struct rep *)a)->fsm;
}

void rep_adapter_bind(struct rep_fsm_adapter *a, struct raft *raft)
{
    ((struct rep *)a)->rp = raft;
    gate_install((struct rep *)a, raft->io);
}

int rep_adapter_fatal(const struct rep_fsm_adapter *a)
{
    return ((const struct rep *)a)->fatal;
}

void rep_adapter_destroy(struct rep_fsm_adapter **a)
{
    if (a == NULL || *a == NULL) return;
    gate_remove((struct rep *)*a);
    part_reset((struct rep *)*a);
    free(*a);
    *a = NULL;
}

void rep_frame_finish(void *buf, size_t len, void **base_r, size_t *len_r)
{
    unsigned char *base = (unsigned char *)buf - REP_FRAME_HDR;
    put_u32le(base + 4, (uint32_t)len);
    memset(base + REP_FRAME_HDR + len, 0, pad8(len) - len);
    *base_r = base;
    *len_r = REP_FRAME_HDR + pad8(len);
}

void *rep_frame_fragment(const void *data, size_t len, uint64_t term, uint32_t counter,
                         uint32_t seq, uint32_t count, uint64_t total, size_t *len_r)
{
    return frag_build(data, len, term, counter, seq, count, total, len_r);
}

void rep_set_refuse_entries(struct rep *r, int refuse)
{
    if (r == NULL || !!refuse == r->refuse_entries) return;
    r->refuse_entries = !!refuse;
    if (refuse)
        cf_crit("rep: refusing new Raft entries from the leader until disk space returns "
                "(this node no longer counts towards the commit quorum)");
    else
        cf_notice("rep: accepting Raft entries again (%" PRIu64
                  " AppendEntries/InstallSnapshot messages refused); catching up",
                  r->refused_appends);
}

int rep_refusing_entries(const struct rep *r)
{
    return r != NULL && r->refuse_entries;
}
