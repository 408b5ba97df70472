/* px_route: see px_route.h. */
#include "px_route.h"

#include <stdlib.h>
#include <string.h>
#include <strings.h>

struct rnode {
    char addr[2][PX_ROUTE_ADDR_MAX]; /* [PX_IMAP], [PX_POP3]; "" = none */
    char *aliases;                   /* space separated */
};

struct px_router {
    struct rnode nodes[PX_ROUTE_MAX_NODES];
    size_t n;
    uint64_t cache_ms;
    int leader; /* node index or -1 */
    uint64_t leader_until;
};

struct px_router *px_router_new(const struct px_conf *c)
{
    struct px_router *r = calloc(1, sizeof(*r));
    if (r == NULL) return NULL;
    r->leader = -1;
    r->cache_ms = c->be_route_cache_ms;
    for (size_t i = 0; i < c->n_nodes && i < PX_ROUTE_MAX_NODES; i++) {
        snprintf(r->nodes[i].addr[PX_IMAP], PX_ROUTE_ADDR_MAX, "%s", c->nodes[i].imap);
        snprintf(r->nodes[i].addr[PX_POP3], PX_ROUTE_ADDR_MAX, "%s", c->nodes[i].pop3);
        r->nodes[i].aliases = strdup(c->nodes[i].aliases);
        if (r->nodes[i].aliases == NULL) {
            r->n = i;
            px_router_free(&r);
            return NULL;
        }
        r->n = i + 1;
    }
    return r;
}

void px_router_free(struct px_router **rp)
{
    if (rp == NULL || *rp == NULL) return;
    for (size_t i = 0; i < (*rp)->n; i++)
        free((*rp)->nodes[i].aliases);
    free(*rp);
    *rp = NULL;
}

static int node_of(const struct px_router *r, int proto, const char *addr)
{
    for (size_t i = 0; i < r->n; i++)
        if (strcmp(r->nodes[i].addr[proto], addr) == 0) return (int)i;
    return -1;
}

size_t px_route_candidates(struct px_router *r, int proto, const char *user, uint64_t now_ms,
                           char out[][PX_ROUTE_ADDR_MAX], size_t max)
{
    size_t n = 0;
    (void)user; /* one group today */
    int lead = (r->leader >= 0 && now_ms < r->leader_until) ? r->leader : -1;
    if (lead >= 0 && r->nodes[lead].addr[proto][0] && n < max)
        memcpy(out[n++], r->nodes[lead].addr[proto], PX_ROUTE_ADDR_MAX);
    for (size_t i = 0; i < r->n && n < max; i++) {
        if ((int)i == lead || !r->nodes[i].addr[proto][0]) continue;
        memcpy(out[n++], r->nodes[i].addr[proto], PX_ROUTE_ADDR_MAX);
    }
    return n;
}

void px_route_leader(struct px_router *r, int proto, const char *addr, uint64_t now_ms)
{
    int i = node_of(r, proto, addr);
    if (i < 0) return;
    r->leader = i;
    r->leader_until = now_ms + r->cache_ms;
}

static int alias_match(const char *aliases, const char *hint)
{
    size_t hl = strlen(hint);
    const char *p = aliases;
    while (*p) {
        while (*p == ' ' || *p == ',')
            p++;
        const char *s = p;
        while (*p && *p != ' ' && *p != ',')
            p++;
        if ((size_t)(p - s) == hl && strncasecmp(s, hint, hl) == 0) return 1;
    }
    return 0;
}

const char *px_route_not_leader(struct px_router *r, int proto, const char *addr, const char *hint,
                                uint64_t now_ms, char out[PX_ROUTE_ADDR_MAX])
{
    int me = node_of(r, proto, addr);
    if (me >= 0 && r->leader == me) r->leader = -1;
    if (hint == NULL || *hint == '\0') return NULL;
    for (size_t i = 0; i < r->n; i++) {
        const struct rnode *nd = &r->nodes[i];
        if ((int)i == me) continue;
        if (strcasecmp(nd->addr[PX_IMAP], hint) == 0 || strcasecmp(nd->addr[PX_POP3], hint) == 0 ||
            alias_match(nd->aliases, hint)) {
            if (!nd->addr[proto][0]) return NULL;
            r->leader = (int)i;
            r->leader_until = now_ms + r->cache_ms;
            memcpy(out, nd->addr[proto], PX_ROUTE_ADDR_MAX);
            return out;
        }
    }
    return NULL;
}

void px_route_down(struct px_router *r, int proto, const char *addr, uint64_t now_ms)
{
    (void)now_ms;
    int i = node_of(r, proto, addr);
    if (i >= 0 && r->leader == i) r->leader = -1;
}

int px_route_parse_hint(const char *text, size_t len, char *out, size_t outlen)
{
    static const char key[] = "leader is ";
    const size_t kl = sizeof(key) - 1;
    for (size_t i = 0; i + kl <= len; i++) {
        if (strncasecmp(text + i, key, kl) != 0) continue;
        size_t s = i + kl, e = s;
        while (e < len && text[e] > ' ' && text[e] < 0x7f && text[e] != ')')
            e++;
        if (e == s || e - s >= outlen) return 0;
        memcpy(out, text + s, e - s);
        out[e - s] = '\0';
        return 1;
    }
    return 0;
}
