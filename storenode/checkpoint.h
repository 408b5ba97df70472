/* checkpoint: on-disk LMDB checkpoints of the store, the state that a node
 * whose store is behind the leader's compacted Raft log installs instead of
 * replaying the log (issue 3). Design and file layout: docs/coffer-store.md
 * ("Snapshots and checkpoints").
 *
 * A checkpoint is one LMDB file, data_dir/checkpoints/ckpt-<applied>.mdb
 * (applied = the store's applied index inside it, 20 digits), plus
 * ckpt-<applied>.mdb.manifest (applied, size, sha256, group id). It is
 * complete only when its manifest exists; files being written end in .tmp
 * (local copy) or .part (fetch) and are removed at start.
 *
 *  - Taking: libraft asks for a snapshot between two applies on the loop
 *    thread; node_fsm opens a read transaction right there (cheap; it sees
 *    exactly the state at the snapshot index) and hands it to a worker
 *    thread that copies every database key by key into a new environment in
 *    write transactions of bounded size (a compacting copy by construction:
 *    LMDB 0.9.24's mdb_env_copy cannot take an existing transaction), syncs
 *    it, hashes the file (SHA-256, streaming), renames it and writes the
 *    manifest. Nothing is held in memory beyond one batch (8 MiB, or one
 *    value when a value is larger).
 *  - Installing: a store behind a snapshot descriptor needs any checkpoint of
 *    the group with applied >= the descriptor's index. A local one is first
 *    verified (re-hashed on the worker against its manifest; a mismatch is
 *    deleted and logged at CRIT), else one is fetched from a peer's admin RPC
 *    as a stream of 1 MiB chunks (CheckpointFetchReq), hashed while written
 *    to a .part file, and accepted only if size and SHA-256 match the
 *    server's header and trailer. A verified checkpoint is swapped in with
 *    store_replace (renames; no copy).
 *
 * One worker thread at a time (write, verify or fetch). The manager is used
 * from the loop thread only; the worker touches only its own job. */
#ifndef CHECKPOINT_H
#define CHECKPOINT_H

#include <lmdb.h>
#include <stddef.h>
#include <stdint.h>

#include "store.h"

#define CKPT_CHUNK (1024 * 1024) /* streamed fetch chunk */

struct ckpt_info {
    char name[64]; /* "ckpt-<applied, 20 digits>.mdb" */
    uint64_t applied;
    uint64_t size;
    char sha256[65]; /* hex */
    uint8_t group_id[16];
};

/* ---- building blocks (any thread) ---- */

/* The file name of a checkpoint at `applied`. */
void ckpt_name(uint64_t applied, char out[64]);
/* Copy every database of `st` as seen by the read transaction `rtxn` into a
 * new LMDB file at `path` (created; MDB_NOSUBDIR), committing every
 * `batch_bytes` (0: 8 MiB). Stops with -1 when *cancel becomes non-zero.
 * Synced to disk on success. 0 or -1 with err. */
int ckpt_copy(struct store *st, MDB_txn *rtxn, const char *path, uint64_t batch_bytes,
              volatile int *cancel, char *err, size_t errlen);
/* The same, written back to disk after every batch (sync_file_range, so
 * at most one batch is dirty at a time) and, when rate_bytes > 0, at no
 * more than rate_bytes per second. The manager's worker uses this, at the
 * idle I/O priority and nice 19. */
int ckpt_copy_paced(struct store *st, MDB_txn *rtxn, const char *path, uint64_t batch_bytes,
                    uint64_t rate_bytes, volatile int *cancel, char *err, size_t errlen);
/* SHA-256 (hex) and size of a file, read in CKPT_CHUNK pieces. 0 or -1. */
int ckpt_hash_file(const char *path, uint64_t *size_r, char hex[65], char *err, size_t errlen);
/* Write dir/<ci->name>.manifest atomically (tmp, fsync, rename). 0 or -1. */
int ckpt_manifest_write(const char *dir, const struct ckpt_info *ci, char *err, size_t errlen);
/* Read dir/<name>.manifest. 0 or -1. */
int ckpt_manifest_read(const char *dir, const char *name, struct ckpt_info *ci);
/* Complete checkpoints (file + manifest) in dir, newest first; *list_r is
 * malloc()ed (free()). 0 or -1. */
int ckpt_list(const char *dir, struct ckpt_info **list_r, size_t *n_r);
/* Re-hash dir/<ci->name> and compare with ci (size and sha256): 0 when it
 * matches, -1 with err otherwise. */
int ckpt_verify(const char *dir, const struct ckpt_info *ci, char *err, size_t errlen);
/* Remove a checkpoint and its manifest. */
void ckpt_delete(const char *dir, const char *name);

/* Fetch client (blocking; worker thread): connect to the admin RPC at
 * `server` ("host:port"), authenticate with `secret` (and/or the client
 * certificate cert/key), verify the server against ca_file (chain only: a
 * peer is known by address, not by name), ask for a checkpoint of `group_id`
 * with applied >= min_applied and stream it into dir/fetch.part, hashing as
 * it goes; on success it becomes dir/ckpt-<applied>.mdb with a manifest
 * and *ci_r describes it. 0, -1 with err. *bad_checksum_r = 1 when the bytes
 * did not match the announced SHA-256 (refused and deleted). */
struct ckpt_fetch_opts {
    const char *ca_file;
    const char *cert_file, *key_file; /* optional client certificate */
    const char *secret;               /* admin secret (may be NULL with a certificate) */
    uint8_t group_id[16];
    uint64_t min_applied;
    unsigned io_timeout_ms; /* per read/write; default 10 s */
    volatile int *cancel;
};
int ckpt_fetch(const char *dir, const char *server, const struct ckpt_fetch_opts *o,
               struct ckpt_info *ci_r, int *bad_checksum_r, char *err, size_t errlen);

/* ---- manager (loop thread) ---- */

struct ckpt_mgr_config {
    const char *dir;                                     /* data_dir/checkpoints (created 0700) */
    unsigned keep;                                       /* complete checkpoints kept (>= 1) */
    const char *ca_file, *cert_file, *key_file, *secret; /* for fetching */
    uint64_t batch_bytes;    /* copy batch (and write-back step), 0 = default 8 MiB */
    uint64_t rate_bytes;     /* copy rate limit in bytes/s, 0 = none */
    uint64_t min_free_bytes; /* space that must stay free after a full copy, 0 = 64 MiB */
};
struct ckpt_stats {
    uint64_t taken, installed, served, fetched, refused;
    uint64_t skipped_space;  /* snapshots without a checkpoint: not enough disk space */
    uint64_t newest_applied; /* newest complete local checkpoint, 0 = none */
};
struct ckpt_mgr;

struct ckpt_mgr *ckpt_mgr_create(struct store *st, const struct ckpt_mgr_config *c, char *err,
                                 size_t errlen);
/* Cancel and join the worker, free. The store must still be open. */
void ckpt_mgr_destroy(struct ckpt_mgr **m);
/* Collect a finished job (logs, counters, pruning). Cheap; call often. */
void ckpt_mgr_poll(struct ckpt_mgr *m);
/* Start writing a checkpoint of the store as of now (a read transaction is
 * opened here, on the caller's thread). 0 started, 1 skipped (worker busy,
 * a checkpoint at this applied index exists, or the directory lacks space
 * for a full copy: logged, at most once a minute), -1 error (logged). */
int ckpt_mgr_take(struct ckpt_mgr *m);
/* Bring the store to applied >= min_applied from a checkpoint of group
 * `group_id`: 0 done (already there, or swapped in now), 1 in progress
 * (verifying or fetching from `sources`, admin addresses tried in order;
 * call again later), -1 fatal (logged). */
int ckpt_mgr_install(struct ckpt_mgr *m, const uint8_t group_id[16], uint64_t min_applied,
                     const char *const *sources, size_t n_sources);
/* Newest complete checkpoint with applied >= min_applied, for serving. 0 or
 * -1 (none). */
int ckpt_mgr_newest(struct ckpt_mgr *m, uint64_t min_applied, struct ckpt_info *ci_r);
/* A served checkpoint did not match its manifest: delete it, log CRIT. */
void ckpt_mgr_bad(struct ckpt_mgr *m, const char *name, const char *why);
void ckpt_mgr_served(struct ckpt_mgr *m);
const char *ckpt_mgr_dir(const struct ckpt_mgr *m);
/* "idle", "writing", "verifying", "fetching" */
const char *ckpt_mgr_state(const struct ckpt_mgr *m);
void ckpt_mgr_stats(struct ckpt_mgr *m, struct ckpt_stats *s_r);
/* Wait for the current job to end and collect it (tests, start-up). */
void ckpt_mgr_wait(struct ckpt_mgr *m);

#endif
