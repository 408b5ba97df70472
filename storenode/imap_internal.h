/* imap_internal: the IMAP session shared by storenode/imap_*.c. Not used
 * outside the IMAP engine.
 *
 * Files:
 *   imap_session.c  connection glue, parser driving, dispatch table, states,
 *                   CAPABILITY/STARTTLS/LOGIN/AUTHENTICATE/LOGOUT/NOOP/ID/
 *                   ENABLE/NAMESPACE, SELECT/EXAMINE/CLOSE/UNSELECT/CHECK,
 *                   IDLE, pending-update queue and its flushing.
 *   imap_mailbox.c  CREATE/DELETE/RENAME/SUBSCRIBE/UNSUBSCRIBE/LIST/LSUB/STATUS,
 *                   mailbox name validation (mUTF-7, depth, length, no escape).
 *   imap_fetch.c    FETCH / UID FETCH (every item; streaming with back-pressure).
 *   imap_search.c   SEARCH / UID SEARCH (every RFC 3501 key; US-ASCII, UTF-8).
 *   imap_msgops.c   STORE, COPY, MOVE, EXPUNGE, UID EXPUNGE, APPEND (+ UID forms).
 *   imap_write.c    response writers (astring/quoted/literal, flags lists).
 *
 * Command life cycle: the session feeds the parser only while no command is
 * running. A handler gets the parsed command (valid until imap_cmd_done) and
 * either finishes synchronously or goes asynchronous (waiting on a Raft
 * commit or on output drain) and finishes later. Exactly one
 * imap_cmd_done() per command. While a command runs, reading is paused, so
 * commands of one session never overlap.
 *
 * After any asynchronous wait (Raft commit, output drain) `s->conn` may be
 * NULL: the client went away meanwhile. Writers are no-ops on a NULL conn
 * (cf_conn_* accept NULL), but handlers must not rely on the conn. The
 * session itself stays allocated until the running command calls
 * imap_cmd_done(), which may then free it: never touch `s` after
 * imap_cmd_done().
 *
 * Views: a selected session keeps its own MSN->UID map (`uids`), changed
 * only when it sends EXPUNGE/EXISTS to the client. Changes by anyone
 * (including this session, since every change goes through the FSM) arrive
 * through the store watcher and queue in `pending`; imap_flush_updates()
 * sends them at the points RFC 3501 7.4.1 allows.
 */
#ifndef IMAP_INTERNAL_H
#define IMAP_INTERNAL_H

#include <lmdb.h>
#include <stddef.h>
#include <stdint.h>

#include "auth.h"
#include "cf_conn.h"
#include "imap_parser.h"
#include "node.h"
#include "propose.h"
#include "store.h"

enum imap_state {
    IMAP_S_NOTAUTH = 0,
    IMAP_S_AUTH,
    IMAP_S_SELECTED,
    IMAP_S_LOGOUT,
};

struct imap_session;
typedef void (*imap_handler)(struct imap_session *s, struct imap_command *cmd, int uid);

/* Growable uint32 array. */
struct u32vec {
    uint32_t *v;
    size_t n, cap;
};
void u32vec_push(struct u32vec *a, uint32_t x);
void u32vec_free(struct u32vec *a);

struct imap_selected {
    uint64_t mailbox_id;
    char *name;   /* UTF-8 */
    int readonly; /* EXAMINE, or no write rights */
    uint32_t uidvalidity;
    uint32_t rights;         /* STORE_R_* */
    struct u32vec uids;      /* MSN i (1-based) -> uids.v[i-1], ascending */
    uint32_t recent_min_uid; /* uids >= this are \Recent to this session */
    uint32_t max_uid_known;  /* highest uid announced via EXISTS */
    struct store_watcher watcher;
    /* pending updates from the watcher */
    struct u32vec pend_expunged; /* uids */
    struct u32vec pend_flags;    /* uids whose flags changed */
    int pend_new;                /* new messages may exist */
    int gone;                    /* mailbox deleted/renamed away */
};

struct imap_session {
    struct node *node;
    struct cf_conn *conn;
    struct imap_parser *parser;
    enum imap_state state;
    int tls;
    char *username; /* canonical, after login */
    uint64_t user_id;
    struct imap_selected sel; /* valid in IMAP_S_SELECTED */

    /* running command */
    int busy;
    struct imap_command *cmd; /* current command (parser arena) */
    char *tag;                /* copy of the current tag */
    /* resumption of a streaming command after output drain: called by the
     * session's on_drain while busy; the handler clears it when done. */
    void (*resume)(struct imap_session *s);
    void *resume_state;
    void (*resume_free)(void *state); /* called if the session closes mid-command */

    /* mode */
    int idling;
    int authenticating; /* waiting for an AUTHENTICATE continuation line */
    int condstore_enabled;
    int utf8_enabled;
    uint64_t bad_commands;
    struct auth_req *auth_req;
    char peer[64];       /* client address (as vouched for by a trusted proxy) */
    char proxy_peer[64]; /* the proxy's own address when it passed one; "" otherwise */
    int trusted_proxy;   /* connected on the proxy-only listener (client cert verified) */
    struct imap_session *next, *prev; /* node-wide session list */
};

/* ---- provided by imap_session.c ---- */

/* Finish the current command: flushes allowed updates (if allow_expunge,
 * EXPUNGE responses too), writes "<tag> <status> [code] text", clears busy,
 * resumes reading and processing of buffered input. status: "OK","NO","BAD".
 * code may be NULL (no brackets); code is written inside [ ]. */
void imap_cmd_done(struct imap_session *s, const char *status, const char *code, const char *fmt,
                   ...) __attribute__((format(printf, 4, 5)));
/* Send pending updates: EXISTS/RECENT for new messages, FETCH FLAGS for
 * changed ones, and (if allow_expunge) EXPUNGE for removed ones, updating
 * the MSN map. Called by imap_cmd_done and by IDLE. */
void imap_flush_updates(struct imap_session *s, int allow_expunge);

/* Map a sequence set argument to UIDs of the current view (uid=1: the set
 * is UIDs; '*' = highest). Output: sorted unique uids that exist in the
 * view, in a malloc()ed array. Returns 0, or -1 on a syntax error (caller
 * replies BAD). */
int imap_seqset_to_uids(struct imap_session *s, const struct imap_arg *arg, int uid,
                        uint32_t **uids_r, size_t *n_r);
/* MSN of uid in the view, or 0 when not present. */
uint32_t imap_msn_of(const struct imap_session *s, uint32_t uid);
/* Convert sorted uids to coffer UidRange list (malloc()ed array of pointers
 * to malloc()ed ranges, as protobuf-c wants). */
Coffer__UidRange **imap_uid_ranges(const uint32_t *uids, size_t n, size_t *n_ranges_r);
void imap_uid_ranges_free(Coffer__UidRange **r, size_t n);

/* Map a propose status to a reply when it failed: REP_ENOTLEADER /
 * LEADERSHIPLOST -> "NO [UNAVAILABLE] ...". */
void imap_reply_propose_error(struct imap_session *s, int status);

/* ---- provided by imap_mailbox.c ---- */

/* Validate a client mailbox name (mUTF-7 astring) into canonical UTF-8
 * (malloc()ed): INBOX case-folded, no empty components, no leading '/', no
 * "." or ".." components, depth and length limits, no wildcards. Returns
 * NULL and a reason in *why_r on failure. */
char *imap_mailbox_name(struct imap_session *s, const struct imap_arg *arg, const char **why_r);
/* Write a UTF-8 mailbox name as a mUTF-7 IMAP string (quoted or literal). */
void imap_write_mailbox_name(struct imap_session *s, const char *utf8);

void imap_cmd_create(struct imap_session *s, struct imap_command *cmd, int uid);
void imap_cmd_delete(struct imap_session *s, struct imap_command *cmd, int uid);
void imap_cmd_rename(struct imap_session *s, struct imap_command *cmd, int uid);
void imap_cmd_subscribe(struct imap_session *s, struct imap_command *cmd, int uid);
void imap_cmd_unsubscribe(struct imap_session *s, struct imap_command *cmd, int uid);
void imap_cmd_list(struct imap_session *s, struct imap_command *cmd, int uid);
void imap_cmd_lsub(struct imap_session *s, struct imap_command *cmd, int uid);
void imap_cmd_status(struct imap_session *s, struct imap_command *cmd, int uid);

/* ---- provided by imap_fetch.c ---- */
void imap_cmd_fetch(struct imap_session *s, struct imap_command *cmd, int uid);
/* Write "* n FETCH (FLAGS (...) [UID u])" for one message (used by flush). */
void imap_write_fetch_flags(struct imap_session *s, MDB_txn *txn, uint32_t msn, uint32_t uid,
                            int with_uid);

/* ---- provided by imap_search.c ---- */
void imap_cmd_search(struct imap_session *s, struct imap_command *cmd, int uid);

/* ---- provided by imap_msgops.c ---- */
void imap_cmd_store(struct imap_session *s, struct imap_command *cmd, int uid);
void imap_cmd_copy(struct imap_session *s, struct imap_command *cmd, int uid);
void imap_cmd_move(struct imap_session *s, struct imap_command *cmd, int uid);
void imap_cmd_expunge(struct imap_session *s, struct imap_command *cmd, int uid);
void imap_cmd_append(struct imap_session *s, struct imap_command *cmd, int uid);
/* Before sending "+" for an APPEND literal: checks the mailbox exists
 * (else "NO [TRYCREATE]"), size <= limits.max_message, quota. Returns 1 to
 * accept, or 0 after having replied NO (command finished). */
int imap_append_check_literal(struct imap_session *s, const struct imap_literal_info *li);

/* ---- provided by imap_write.c ---- */
/* Write a string as quoted if it is 7-bit safe and short, else a literal.
 * NULL writes NIL. */
void imap_write_string(struct imap_session *s, const char *str, size_t len);
void imap_write_astring(struct imap_session *s, const char *str, size_t len);
/* "(\Seen \Answered kw1 ...)" plus "\Recent" when recent. */
void imap_write_flags(struct imap_session *s, uint32_t flags, const char *keywords,
                      size_t keywords_len, int recent);
/* Parse a flag list argument (list or single atom) into bits + keywords
 * (NUL-separated, malloc()ed). \Recent is refused. Returns 0 or -1 (BAD). */
int imap_parse_flags(const struct imap_arg *arg, uint32_t *flags_r, char **keywords_r,
                     size_t *keywords_len_r, size_t *n_keywords_r);
/* Parse an RFC 3501 date-time "dd-Mon-yyyy hh:mm:ss +zzzz". 0 or -1. */
int imap_parse_datetime(const char *s, size_t len, int64_t *utc_r, int *tz_min_r);
/* Format date-time into out[32]. */
void imap_format_datetime(int64_t utc, int tz_min, char out[32]);
/* Parse "dd-Mon-yyyy" (search dates) into days since epoch. 0 or -1. */
int imap_parse_date(const char *s, size_t len, int64_t *day_r);

#endif
