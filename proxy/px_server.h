/* px_server: the state of one coffer-mmp process, shared by its sessions.
 * Everything here runs on the one libuv loop thread. The proxy keeps no
 * state that must survive it: the throttle tables, the route cache and the
 * connection counts are rebuilt from traffic after a restart. */
#ifndef PX_SERVER_H
#define PX_SERVER_H

#include <stdint.h>
#include <uv.h>

#include "px_config.h"
#include "px_route.h"
#include "px_throttle.h"
#include "px_tls.h"

struct px_session;

struct px_server {
    uv_loop_t *loop;
    struct px_conf *conf;         /* current configuration (replaced on SIGHUP) */
    struct px_tls *tls;           /* current TLS generation (sessions hold refs) */
    struct px_router *router;     /* replaced on SIGHUP; sessions copy addresses */
    struct px_throttle *throttle; /* kept across reloads (config updated) */
    struct px_conncount *conns;   /* live client connections per address */
    uint64_t n_conns;             /* live client connections (all) */
    uint64_t n_spliced;           /* logged-in sessions */
    int stopping;
    struct px_session *sessions; /* every live session (shutdown) */
};

/* Accept one pending connection on a listener of the given kind (PX_L_*). */
void px_session_accept(struct px_server *srv, uv_stream_t *server, int kind);
/* Shutdown: tell every session goodbye (where the protocol allows) and close. */
void px_session_close_all(struct px_server *srv, const char *reason);

#endif
