/* node: one coffer-store process: the loop, the store, replication, TLS
 * contexts, listeners and session counters. Sessions (IMAP, POP3, admin)
 * get a pointer to it. Loop thread only, except where noted. */
#ifndef NODE_H
#define NODE_H

#include <openssl/ssl.h>
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
    SSL_CTX *tls;        /* server context for IMAP/POP3 (implicit TLS and STARTTLS) */
    SSL_CTX *admin_tls;  /* admin listener (client cert optional, verified against tls.ca) */
    uint64_t imap_sessions;
    uint64_t pop3_sessions;
    uint64_t total_sessions; /* IMAP + POP3, checked against limits.max_sessions */
    int stopping;
};

#endif
