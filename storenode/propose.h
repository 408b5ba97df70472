/* propose: the only write path. A session builds a coffer.Entry, and
 * propose_entry() frames it (magic + version + protobuf), gives it a random
 * request_id, registers the caller's outcome with the FSM and hands it to
 * replication. The callback runs on the loop thread once the entry is
 * committed and applied locally (status REP_OK, outcome filled), or when it
 * failed (REP_ENOTLEADER, REP_ELEADERSHIPLOST: outcome unknown, ...).
 *
 * Ownership: `e` is borrowed (packed before return; the caller frees its
 * own protobuf structs). `out` must stay valid until cb fires. */
#ifndef PROPOSE_H
#define PROPOSE_H

#include "coffer_raft.pb-c.h"
#include "node.h"
#include "store.h"

#define COFFER_ENTRY_MAGIC 0x45524643u /* "CFRE" little-endian */
#define COFFER_ENTRY_VERSION 1

typedef void (*propose_cb)(void *arg, int status, struct store_outcome *out);

/* Sets e->leader_time_ms (if 0) and e->request_id (if unset: 16 random
 * bytes, stored in out->request_id and e->request_id points there, so keep
 * `out` to retry with the same key; with out == NULL, e is left without a
 * request_id). `out` is zeroed first. Returns 0 when in flight, or a
 * negative rep_status_code (cb not called). */
int propose_entry(struct node *n, Coffer__Entry *e, struct store_outcome *out, propose_cb cb,
                  void *arg);

/* propose_entry in two steps, so the copying can happen off the loop.
 * propose_pack_prepared (any thread: touches only e, memory and n->rep's
 * fixed settings) sets leader_time_ms and the request id (e's own, else
 * random) into id_r (e->request_id then points there), packs and frames e
 * and prepares it (rep_prepare: fragments above 1 MiB); 0 or a negative
 * rep_status_code. propose_prepared (loop thread) registers `out` as waiter
 * for id and proposes p like propose_entry; it takes p even on failure. */
struct rep_prepared;
int propose_pack_prepared(struct node *n, Coffer__Entry *e, uint8_t id_r[16],
                          struct rep_prepared **p_r);
int propose_prepared(struct node *n, const uint8_t id[16], struct rep_prepared *p,
                     struct store_outcome *out, propose_cb cb, void *arg);

/* Frame an entry into a malloc()ed buffer (tests and tools). */
int propose_frame(const Coffer__Entry *e, void **buf_r, size_t *len_r);

#endif
