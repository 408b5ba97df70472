/* store: the LMDB state of one store node, and its state machine.
 *
 * Writes happen ONLY in store_apply(), called by the replication layer for
 * committed Raft entries, on the loop thread, one LMDB write transaction per
 * entry, which also records the entry's index as `applied_index` (apply is
 * skipped for index <= applied_index: replays after restart are no-ops).
 *
 * Reads: any thread, through read transactions (env opened MDB_NOTLS).
 * Values returned by read functions point into the LMDB map and stay valid
 * until that read transaction ends (store_rtxn_end). Copy what must live
 * longer.
 *
 * LMDB schema (named databases; integers big-endian in keys so that byte
 * order = numeric order; values are packed little-endian structs with a
 * leading u16 record version; see ARCHITECTURE.md for layouts):
 *   meta      "schema" -> u32 version; "applied" -> u64 index;
 *             "group_id" -> 16 bytes; "next_user_id", "next_mailbox_id",
 *             "next_blob_id" -> u64; "last_uidvalidity" -> u32
 *   users     username (lower-case) -> user record (id, hash, disabled,
 *             reason, quota limits, usage: bytes + messages)
 *   userids   user_id(8) -> username
 *   mbnames   user_id(8) + name (UTF-8) -> mailbox_id(8)
 *   mailboxes mailbox_id(8) -> mailbox record (owner, uidvalidity, uidnext,
 *             highestmodseq, counts, size, special-use, keyword names, name)
 *   msgs      mailbox_id(8) + uid(4) -> message record (blob_id, modseq,
 *             internaldate, tz, size, flags, keywords NUL-separated)
 *   blobs     blob_id(8) -> message bytes (CRLF), shared by COPY
 *   blobmeta  blob_id(8) -> refcount, size, cache (envelope, bodystructure,
 *             body, part tree, sent date)
 *   subs      user_id(8) + name -> empty
 *   acl       mailbox_id(8) + identifier -> rights string
 *   requests  request_id(16) -> applied index + outcome (idempotency)
 *   reqlog    index(8) -> request_id (expiry order for `requests`)
 *   modseq    mailbox_id(8) + modseq(8) + uid(4) -> empty (CONDSTORE index)
 *   nodes     node_id(8) -> packed coffer.NodeInfo (service addresses of the
 *             group's members; not part of the content digest)
 */
#ifndef STORE_H
#define STORE_H

#include <lmdb.h>
#include <pthread.h>
#include <stddef.h>
#include <stdint.h>

#define STORE_SCHEMA_VERSION 1
#define STORE_MAX_USERNAME 255
/* Bytes of UTF-8. mbnames/subs keys are user_id(8) + name and LMDB keys are
 * at most 511 bytes; the FSM refuses longer names with STORE_EINVAL, so
 * limits.max_mailbox_name must be <= this. */
#define STORE_MAX_MAILBOX_NAME 480
/* Longest keyword / ACL identifier the FSM accepts (STORE_EINVAL beyond). */
#define STORE_MAX_KEYWORD 255
#define STORE_MAX_IDENTIFIER 255
/* `requests` entries older than this many log indexes are forgotten. */
#define STORE_REQUEST_WINDOW 100000

/* System flag bits (same values as coffer.SystemFlag). */
enum {
    STORE_F_SEEN = 1,
    STORE_F_ANSWERED = 2,
    STORE_F_FLAGGED = 4,
    STORE_F_DELETED = 8,
    STORE_F_DRAFT = 16,
};

/* RFC 4314 rights as bits. */
enum {
    STORE_R_LOOKUP = 1 << 0,     /* l */
    STORE_R_READ = 1 << 1,       /* r */
    STORE_R_SEEN = 1 << 2,       /* s */
    STORE_R_WRITE = 1 << 3,      /* w */
    STORE_R_INSERT = 1 << 4,     /* i */
    STORE_R_POST = 1 << 5,       /* p */
    STORE_R_CREATE = 1 << 6,     /* k */
    STORE_R_DELETEMBOX = 1 << 7, /* x */
    STORE_R_DELETEMSG = 1 << 8,  /* t */
    STORE_R_EXPUNGE = 1 << 9,    /* e */
    STORE_R_ADMIN = 1 << 10,     /* a */
    STORE_R_ALL = (1 << 11) - 1,
};

struct store;

/* Outcome codes of an applied entry. */
enum store_result {
    STORE_OK = 0,
    STORE_ENOENT = 1,       /* user/mailbox/message not found */
    STORE_EEXIST = 2,       /* already exists */
    STORE_EQUOTA = 3,       /* over quota */
    STORE_EINVAL = 4,       /* invalid request (e.g. delete INBOX) */
    STORE_EUIDVALIDITY = 5, /* mailbox was recreated since the client looked */
    STORE_EMODIFIED = 6,    /* CONDSTORE UNCHANGEDSINCE failed for some */
    STORE_EHASCHILDREN = 7, /* informational */
    STORE_EDISABLED = 8,    /* delivery refused: account disabled */
};

/* What an applied entry did, filled for proposals registered with the FSM
 * (see propose.h). Arrays are malloc()ed; store_outcome_clear frees. */
struct store_outcome {
    int result;           /* enum store_result */
    char text[160];       /* human readable when result != OK */
    uint64_t index;       /* log index = MODSEQ of the change */
    uint32_t uidvalidity; /* APPENDUID / COPYUID: destination uidvalidity */
    uint32_t uid;         /* APPENDUID */
    uint32_t *src_uids;   /* COPYUID source uids, in order */
    uint32_t *dst_uids;   /* COPYUID destination uids, parallel */
    size_t n_uids;
    uint32_t *modified_uids; /* STORE UNCHANGEDSINCE failures */
    size_t n_modified;
    int *rcpt_results; /* Deliver: per-recipient enum store_result */
    size_t n_rcpt;
    /* The entry's idempotency key (set by propose_entry; the FSM leaves it
     * alone). Keep it to retry after REP_ELEADERSHIPLOST. */
    uint8_t request_id[16];
};
void store_outcome_clear(struct store_outcome *o);

/* ---- lifecycle ---- */

/* Open (creating if needed) the LMDB environment in dir with the given map
 * size (sparse). Checks the schema version. Runs mdb_reader_check. */
int store_open(const char *dir, uint64_t map_size, struct store **st_r, char *err, size_t errlen);
void store_close(struct store **st);
MDB_env *store_env(struct store *st);
uint64_t store_applied_index(struct store *st);
/* Group id (16 bytes) or all zero before GroupInit. */
void store_group_id(struct store *st, uint8_t out[16]);
/* Force LMDB data to disk (before a snapshot lets raft drop log entries). */
int store_sync(struct store *st);
/* Directory of the LMDB environment and its configured map size. */
const char *store_dir(const struct store *st);
uint64_t store_map_size(const struct store *st);

/* Replace the whole store with the LMDB file `path` (a verified checkpoint,
 * see checkpoint.h), loop thread only: closes the environment, renames the
 * file over data_dir/lmdb/data.mdb and reopens it (fast: no copy). Waiters
 * and watchers are kept. Refused (1, nothing changed) while any read
 * transaction from store_rtxn_begin is open on any thread (they are
 * counted; new ones wait for the few milliseconds of the swap). Returns 0,
 * 1 (busy: try again later) or -1 with err (the store may be unusable: the
 * caller must stop). */
int store_replace(struct store *st, const char *path, char *err, size_t errlen);
/* Read transactions currently open through store_rtxn_begin. */
unsigned store_readers(struct store *st);

/* ---- state machine ---- */

/* Apply one framed entry (see proto/coffer_raft.proto) at log index. Returns
 * 0 (including entries whose outcome is a refusal such as EEXIST: those are
 * still "applied") or -1 for fatal errors (unknown version/op, LMDB failure)
 * after logging them at CRIT. If `out` is non-NULL it receives the outcome
 * (overwritten, not freed; its request_id is kept). A refused op leaves no
 * change except the applied index and the remembered request id. */
int store_apply(struct store *st, uint64_t index, const void *buf, size_t len,
                struct store_outcome *out);

/* Outcome delivery to local proposers: the FSM looks up the entry's
 * request_id among registered waiters and fills the outcome of each. Several
 * waiters may share one request_id (two sessions APPENDing the same message
 * with a content-derived key); a waiter is the pair (request_id, out). */
void store_register_waiter(struct store *st, const uint8_t request_id[16],
                           struct store_outcome *out);
void store_unregister_waiter(struct store *st, const uint8_t request_id[16],
                             struct store_outcome *out);

/* ---- change notification (loop thread) ---- */

enum store_change_kind {
    STORE_CH_APPEND = 1,  /* new messages: uids[] ascending */
    STORE_CH_FLAGS = 2,   /* flags/keywords changed: uids[] */
    STORE_CH_EXPUNGE = 3, /* messages removed: uids[] ascending */
    STORE_CH_GONE = 4,    /* mailbox deleted or renamed away (or user deleted) */
};
struct store_change {
    enum store_change_kind kind;
    uint64_t mailbox_id;
    uint64_t modseq;
    const uint32_t *uids;
    size_t n_uids;
};
struct store_watcher {
    /* Called after the apply transaction committed. Must not call
     * store_unwatch for other watchers; may unwatch itself. */
    void (*on_change)(struct store_watcher *w, const struct store_change *ch);
    /* private to store.c */
    uint64_t mailbox_id;
    struct store_watcher *next, *prev;
};
void store_watch(struct store *st, uint64_t mailbox_id, struct store_watcher *w);
void store_unwatch(struct store *st, struct store_watcher *w);

/* ---- reads ---- */

/* Begin a read-only transaction (any thread). NULL on failure. Every
 * transaction begun here must be ended with store_rtxn_end (it is counted:
 * store_replace waits for none to be open). */
MDB_txn *store_rtxn_begin(struct store *st);
void store_rtxn_end(MDB_txn *txn);

struct store_user {
    uint64_t id;
    const char *name;          /* in map */
    const char *password_hash; /* in map, NUL-terminated */
    int disabled;
    int refuse_delivery;
    const char *disabled_reason;          /* in map, "" when none */
    uint64_t quota_bytes, quota_messages; /* 0 = unlimited */
    uint64_t used_bytes, used_messages;
};
/* Username is matched lower-cased. Returns 0, STORE_ENOENT, or -1. */
int store_user_get(struct store *st, MDB_txn *txn, const char *username, struct store_user *u_r);
int store_user_get_by_id(struct store *st, MDB_txn *txn, uint64_t id, struct store_user *u_r);
/* Iterate users in name order; cb returns non-zero to stop. */
int store_user_foreach(struct store *st, MDB_txn *txn,
                       int (*cb)(const struct store_user *u, void *arg), void *arg);

struct store_mailbox {
    uint64_t id;
    uint64_t owner_id;
    const char *name; /* UTF-8, in map, NUL-terminated */
    uint32_t uidvalidity;
    uint32_t uidnext;
    uint64_t highestmodseq;
    uint64_t messages;
    uint64_t unseen;
    uint64_t deleted; /* messages with \Deleted */
    uint64_t size;    /* sum of RFC822.SIZE */
    uint32_t special_use;
    const char *keywords; /* names used in this mailbox, each NUL-terminated, in map */
    size_t keywords_len;
};
/* Name is canonical UTF-8 ("INBOX" upper-case). 0, STORE_ENOENT or -1. */
int store_mailbox_get(struct store *st, MDB_txn *txn, uint64_t owner_id, const char *name,
                      struct store_mailbox *mb_r);
int store_mailbox_get_by_id(struct store *st, MDB_txn *txn, uint64_t mailbox_id,
                            struct store_mailbox *mb_r);
/* Iterate an owner's mailboxes in name order. */
int store_mailbox_foreach(struct store *st, MDB_txn *txn, uint64_t owner_id,
                          int (*cb)(const struct store_mailbox *mb, void *arg), void *arg);

struct store_msg {
    uint32_t uid;
    uint64_t modseq;
    uint64_t blob_id;
    uint64_t size;         /* RFC822.SIZE */
    int64_t internal_date; /* UTC seconds */
    int32_t internal_tz_min;
    uint32_t flags;       /* STORE_F_* */
    const char *keywords; /* each NUL-terminated ("a\0b\0"), in map */
    size_t keywords_len;
};
int store_msg_get(struct store *st, MDB_txn *txn, uint64_t mailbox_id, uint32_t uid,
                  struct store_msg *m_r);
/* Iterate messages with uid in [lo, hi] ascending; cb returns non-zero to stop. */
int store_msg_foreach(struct store *st, MDB_txn *txn, uint64_t mailbox_id, uint32_t lo, uint32_t hi,
                      int (*cb)(const struct store_msg *m, void *arg), void *arg);
/* CONDSTORE: messages with modseq > since, in (modseq, uid) order, from the
 * modseq index; cb returns non-zero to stop. Expunged messages are not
 * reported (they are gone). */
int store_msg_changed_since(struct store *st, MDB_txn *txn, uint64_t mailbox_id, uint64_t since,
                            int (*cb)(uint32_t uid, uint64_t modseq, void *arg), void *arg);
/* All uids of a mailbox, ascending, into a malloc()ed array. */
int store_msg_uids(struct store *st, MDB_txn *txn, uint64_t mailbox_id, uint32_t **uids_r,
                   size_t *n_r);

/* Message bytes (pointer into the map: no copy, valid until txn ends). */
int store_blob_get(struct store *st, MDB_txn *txn, uint64_t blob_id, const char **data_r,
                   size_t *len_r);
struct store_cache {
    const char *envelope;
    size_t envelope_len;
    const char *bodystructure;
    size_t bodystructure_len;
    const char *body;
    size_t body_len;
    const char *parts;
    size_t parts_len; /* mime_tree serialization */
    int64_t sent_date;
};
int store_blob_cache(struct store *st, MDB_txn *txn, uint64_t blob_id, struct store_cache *c_r);

/* Subscriptions of a user, name order. */
int store_subs_foreach(struct store *st, MDB_txn *txn, uint64_t user_id,
                       int (*cb)(const char *name, void *arg), void *arg);
int store_subs_has(struct store *st, MDB_txn *txn, uint64_t user_id, const char *name);

/* The one rights function: rights (STORE_R_*) of `user_id` on mailbox
 * `mb`. The owner has all rights; others get what the ACL grants (identifier
 * = username, or "anyone"). */
uint32_t store_rights(struct store *st, MDB_txn *txn, uint64_t user_id,
                      const struct store_mailbox *mb);

/* Service addresses of a group member (NodeInfo entries). Strings are
 * copies ("" when unknown). */
struct store_node {
    uint64_t id;
    char raft[128], imap[128], imaps[128], pop3[128], pop3s[128], admin[128];
};
/* 0, STORE_ENOENT or -1. txn may be NULL (a short read txn is used). */
int store_node_get(struct store *st, MDB_txn *txn, uint64_t id, struct store_node *n_r);
/* Id of a member other than `self_id` whose Raft address is `address`
 * (0 if none). */
uint64_t store_node_find_raft(struct store *st, const char *address, uint64_t self_id);
/* Incremented (in memory) whenever a NodeInfo entry is applied. */
uint64_t store_nodes_version(struct store *st);

/* Content digest (SHA-256 over a canonical walk of users, mailboxes,
 * messages and blobs; hex into out[65]). O(store); for status/tests. */
int store_digest(struct store *st, char out[65]);

/* ---- internal: shared by store.c and fsm.c only (#define STORE_INTERNAL
 * before including). Record layouts are documented in store.c. ---- */
#ifdef STORE_INTERNAL
#define STORE_WATCH_BUCKETS 256
#define STORE_WAIT_BUCKETS 64

struct store_waiter {
    uint8_t id[16];
    struct store_outcome *out;
    struct store_waiter *next;
};

struct store {
    MDB_env *env;
    char *dir;
    uint64_t map_size;
    pthread_mutex_t rlock; /* readers, swapping */
    pthread_cond_t rcond;
    unsigned readers;
    int swapping;
    MDB_dbi meta, users, userids, mbnames, mailboxes, msgs, blobs, blobmeta, subs, acl, requests,
        reqlog, modseq, nodes;
    uint64_t nodes_version;
    uint64_t applied;     /* cached meta "applied" */
    uint8_t group_id[16]; /* cached meta "group_id" */
    struct store_waiter *waiters[STORE_WAIT_BUCKETS];
    struct store_watcher *watchers[STORE_WATCH_BUCKETS];
};

/* Growable encode buffer; oom is set (and data dropped) on allocation failure. */
struct store_buf {
    uint8_t *p;
    size_t len, cap;
    int oom;
};
/* Every named database of a store, in one fixed order (checkpoints copy
 * all of them; the content digest walks those with `state` set, in this
 * order: not the idempotency bookkeeping nor the node table). Fills up to
 * STORE_N_DBS entries of out; returns the count. */
#define STORE_N_DBS 14
struct store_db {
    const char *name;
    MDB_dbi dbi;
    int state;
};
size_t store__dbs(const struct store *st, struct store_db out[STORE_N_DBS]);
void store__buf_free(struct store_buf *b);

void store__be64(uint8_t *p, uint64_t v);
void store__be32(uint8_t *p, uint32_t v);
uint64_t store__get_be64(const uint8_t *p);
uint32_t store__get_be32(const uint8_t *p);

/* Decoders return 0, or -1 for a malformed record (strings point into v). */
int store__user_decode(const MDB_val *v, struct store_user *u);
int store__mailbox_decode(uint64_t id, const MDB_val *v, struct store_mailbox *mb);
int store__msg_decode(uint32_t uid, const MDB_val *v, struct store_msg *m);
int store__blobmeta_decode(const MDB_val *v, uint64_t *refcount_r, uint64_t *size_r,
                           struct store_cache *c_r);
/* Encoders append to b (check b->oom). Strings are taken with strlen except
 * keywords (keywords_len) and cache fields (explicit lengths). */
void store__user_encode(const struct store_user *u, struct store_buf *b);
void store__mailbox_encode(const struct store_mailbox *mb, struct store_buf *b);
void store__msg_encode(const struct store_msg *m, struct store_buf *b);
void store__blobmeta_encode(uint64_t refcount, uint64_t size, const struct store_cache *c,
                            struct store_buf *b);

/* Deep copy of an outcome (except request_id); frees what dst held first
 * (dst zeroed or filled by an earlier copy). 0 or -1 (ENOMEM). */
int store__outcome_copy(struct store_outcome *dst, const struct store_outcome *src);
/* Iterate the waiters of request_id: prev NULL for the first; NULL at the end. */
struct store_outcome *store__waiter_next(struct store *st, const uint8_t id[16],
                                         struct store_outcome *prev);
/* Deliver one change to the mailbox's watchers. */
void store__notify(struct store *st, const struct store_change *ch);
#endif

#endif
