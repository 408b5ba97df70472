/* px_route: where a user's sessions go. Today one store group made of the
 * configured [node NAME] sections: the leader is found by the sessions'
 * own backend connections (greeting OK = leader; a "not leader; leader is
 * <hint>" refusal names the next one to try; no hint = try the others) and
 * cached for backend.route_cache. The HA agent issue will push a routing
 * table (user -> group -> leader) into the same interface
 * (px_router_set_table, later); sessions do not change. Loop thread only. */
#ifndef PX_ROUTE_H
#define PX_ROUTE_H

#include <stddef.h>
#include <stdint.h>

#include "px_config.h"

enum px_proto { PX_IMAP = 0, PX_POP3 = 1 };

#define PX_ROUTE_ADDR_MAX 128
#define PX_ROUTE_MAX_NODES 16

struct px_router;

struct px_router *px_router_new(const struct px_conf *c);
void px_router_free(struct px_router **r);

/* Candidate backend addresses for `user` and `proto`, best first: the cached
 * leader (while fresh), then every other node of the user's group in
 * configured order. Copies up to max addresses into out. Returns the count. */
size_t px_route_candidates(struct px_router *r, int proto, const char *user, uint64_t now_ms,
                           char out[][PX_ROUTE_ADDR_MAX], size_t max);
/* addr (a proto address) greeted: it is the leader; cache it. */
void px_route_leader(struct px_router *r, int proto, const char *addr, uint64_t now_ms);
/* addr refused with "not leader"; hint is the refusal's "leader is" value
 * or NULL. Returns the proto address of the hinted node (copied into
 * out) and caches it as the probable leader, or NULL when the hint names no
 * configured node. */
const char *px_route_not_leader(struct px_router *r, int proto, const char *addr, const char *hint,
                                uint64_t now_ms, char out[PX_ROUTE_ADDR_MAX]);
/* addr could not be reached: forget it as leader. */
void px_route_down(struct px_router *r, int proto, const char *addr, uint64_t now_ms);

/* Extract the hint from a refusal text containing "leader is <host:port>"
 * (copied into out, at most outlen-1 bytes). Returns 1 when found. */
int px_route_parse_hint(const char *text, size_t len, char *out, size_t outlen);

#endif
