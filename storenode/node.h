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
};

/* "[UNAVAILABLE] not leader[; leader is <hint>]" written into buf (len
 * bytes). Returns buf. */
const char *node_not_leader_text(const struct node *n, char *buf, size_t len);

#endif
