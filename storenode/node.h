/* node: one coffer-store process: the loop, the store, replication, TLS
 * contexts, listeners and session counters. Sessions (IMAP, POP3, admin)
 * get a pointer to it. Loop thread only, except where noted. */
#ifndef NODE_H
#define NODE_H

#include <openssl/ssl.h>
#include <stddef.h>
#include <stdint.h>
#include <uv.h>

#include "rep.h"
#include "sconf.h"
#include "store.h"

struct node {
    uv_loop_t *loop;
    struct sconf *cfg;
    struct store *store;
    struct rep *rep;
    SSL_CTX *tls;       /* server context for IMAP/POP3 (implicit TLS and STARTTLS) */
    SSL_CTX *admin_tls; /* admin listener (client cert optional, verified against tls.ca) */
    SSL_CTX *proxy_tls; /* proxy-only listeners (client cert from tls.ca required) */
    uint64_t imap_sessions;
    uint64_t pop3_sessions;
    uint64_t total_sessions; /* IMAP + POP3, checked against limits.max_sessions */
    int stopping;
    /* Where clients should go when this node is not the leader: the leader's
     * client-facing address as "host:port" of its IMAP listener, or "" when
     * unknown. Maintained by the daemon; sessions put it in their refusal
     * ("* BYE [UNAVAILABLE] not leader; leader is <hint>") so proxies can route. */
    char leader_hint[128];
    /* The leader's admin address ("" = unknown), for admin refusals. */
    char leader_admin[128];
    /* Daemon hooks for the admin RPC (storenode/main.c; NULL in tests). */
    void *daemon;
    /* Start Raft on a node that waits uninitialised: bootstrap = 1 makes a
     * new single-voter group, 0 waits to be added by a leader. 0 or -1. */
    int (*start_raft)(struct node *n, int bootstrap, char *err, size_t errlen);
    /* This node was removed from its group: mark the data dir and exit. */
    void (*leave)(struct node *n, const char *why);
    /* "uninitialised", "member" or "removed" */
    const char *state;
    /* On-disk checkpoints (storenode/checkpoint.h): taken when libraft
     * snapshots, installed when the store is behind a snapshot, served to
     * peers over the admin RPC. NULL: snapshots are descriptors only and a
     * store behind one is refused (tests without a checkpoint directory). */
    struct ckpt_mgr *ckpt;
};

/* The FSM plugged into replication; fsm data = struct node * (uses
 * n->store only). storenode/node_fsm.c. */
extern const struct rep_fsm_ops node_fsm_ops;

/* "[UNAVAILABLE] not leader[; leader is <hint>]" written into buf (len
 * bytes). Returns buf. */
const char *node_not_leader_text(const struct node *n, char *buf, size_t len);

#endif
