/* px_config: see px_config.h. */
#include "px_config.h"

#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "cf_config.h"
#include "cf_conn.h"

enum ktype { K_STR, K_ADDR, K_U64, K_SIZE, K_MS, K_BOOL };

struct key {
    const char *section, *key;
    enum ktype type;
    const char *def;
    uint64_t min, max; /* numeric types */
    size_t off;
    const char *help;
};

#define O(f) offsetof(struct px_conf, f)
#define NOLIM 0, UINT64_MAX

static const struct key keys[] = {
    {"proxy", "log_level", K_STR, "info", NOLIM, O(log_level),
     "debug, info, notice, warn, error or crit"},
    {"imap", "listen", K_ADDR, "127.0.0.1:143", NOLIM, O(l[PX_L_IMAP].listen),
     "IMAP listener (STARTTLS offered); empty = off"},
    {"imap", "cert", K_STR, "", NOLIM, O(l[PX_L_IMAP].cert),
     "certificate for STARTTLS on this listener (default tls.cert)"},
    {"imap", "key", K_STR, "", NOLIM, O(l[PX_L_IMAP].key), "its key (default tls.key)"},
    {"imaps", "listen", K_ADDR, "127.0.0.1:993", NOLIM, O(l[PX_L_IMAPS].listen),
     "IMAPS listener (implicit TLS); empty = off"},
    {"imaps", "cert", K_STR, "", NOLIM, O(l[PX_L_IMAPS].cert), "certificate (default tls.cert)"},
    {"imaps", "key", K_STR, "", NOLIM, O(l[PX_L_IMAPS].key), "its key (default tls.key)"},
    {"pop3", "listen", K_ADDR, "127.0.0.1:110", NOLIM, O(l[PX_L_POP3].listen),
     "POP3 listener (STLS offered); empty = off"},
    {"pop3", "cert", K_STR, "", NOLIM, O(l[PX_L_POP3].cert), "certificate (default tls.cert)"},
    {"pop3", "key", K_STR, "", NOLIM, O(l[PX_L_POP3].key), "its key (default tls.key)"},
    {"pop3s", "listen", K_ADDR, "127.0.0.1:995", NOLIM, O(l[PX_L_POP3S].listen),
     "POP3S listener (implicit TLS); empty = off"},
    {"pop3s", "cert", K_STR, "", NOLIM, O(l[PX_L_POP3S].cert), "certificate (default tls.cert)"},
    {"pop3s", "key", K_STR, "", NOLIM, O(l[PX_L_POP3S].key), "its key (default tls.key)"},
    {"tls", "cert", K_STR, "", NOLIM, O(tls_cert), "default PEM certificate chain (required)"},
    {"tls", "key", K_STR, "", NOLIM, O(tls_key), "default PEM key (mode 0600 or stricter)"},
    {"tls", "min_version", K_STR, "TLSv1.2", NOLIM, O(tls_min_version), "TLSv1.2 or TLSv1.3"},
    {"tls", "ciphers", K_STR, "", NOLIM, O(tls_ciphers),
     "OpenSSL cipher list for TLS 1.2 (empty = OpenSSL default)"},
    {"tls", "ciphersuites", K_STR, "", NOLIM, O(tls_ciphersuites),
     "TLS 1.3 cipher suites (empty = OpenSSL default)"},
    {"tls", "groups", K_STR, "", NOLIM, O(tls_groups),
     "key exchange groups, e.g. X25519:P-256 (empty = OpenSSL default)"},
    {"tls", "ticket_key_lifetime", K_MS, "1h", 60000, 7ull * 86400000, O(tls_ticket_lifetime_ms),
     "session ticket keys rotate this often; tickets of the previous key still resume"},
    {"tls", "session_cache", K_U64, "20000", 0, 10000000, O(tls_session_cache),
     "TLS 1.2 server-side session cache entries (0 = off; tickets still work)"},
    {"tls", "expiry_warn_days", K_U64, "30", 0, 3650, O(tls_expiry_warn_days),
     "warn when a certificate expires within this many days (0 = never)"},
    {"tls", "expiry_check_interval", K_MS, "12h", 60000, 30ull * 86400000, O(tls_expiry_check_ms),
     "how often certificate expiry is checked (also at start and reload)"},
    {"backend", "ca", K_STR, "", NOLIM, O(be_ca),
     "CA that signed the stores' certificates (required)"},
    {"backend", "cert", K_STR, "", NOLIM, O(be_cert),
     "the proxy's client certificate, from the stores' tls.ca (required)"},
    {"backend", "key", K_STR, "", NOLIM, O(be_key), "its key (mode 0600 or stricter)"},
    {"backend", "tls_name", K_STR, "", NOLIM, O(be_tls_name),
     "name expected in the stores' certificates (empty = the node's host)"},
    {"backend", "connect_timeout", K_MS, "5s", 100, 600000, O(be_connect_timeout_ms),
     "one connection + TLS handshake + greeting to a store node"},
    {"backend", "login_timeout", K_MS, "30s", 1000, 600000, O(be_login_timeout_ms),
     "whole backend login, including finding the leader during an election"},
    {"backend", "route_cache", K_MS, "5s", 0, 3600000, O(be_route_cache_ms),
     "how long a leader found by probing is used without asking again"},
    {"backend", "retry_interval", K_MS, "200ms", 10, 60000, O(be_retry_ms),
     "pause between rounds of probing when no node is the leader"},
    {"backend", "tls_resume", K_BOOL, "yes", NOLIM, O(be_tls_resume),
     "resume TLS sessions to the stores (one ticket kept per node; no full handshake per login)"},
    {"auth", "allow_plaintext", K_BOOL, "no", NOLIM, O(allow_plaintext),
     "allow LOGIN/AUTHENTICATE/USER/PASS without TLS from auth.plaintext_networks"},
    {"auth", "plaintext_networks", K_STR, "", NOLIM, 0,
     "CIDR list where plaintext passwords are allowed when allow_plaintext = yes"},
    {"limits", "max_connections", K_U64, "10000", 1, 1000000, O(max_connections),
     "client connections in total; further ones are refused"},
    {"limits", "max_connections_per_ip", K_U64, "50", 1, 1000000, O(max_connections_per_ip),
     "client connections per address (IPv6: per throttle.v6_prefix)"},
    {"limits", "preauth_timeout", K_MS, "30s", 1000, 3600000, O(preauth_timeout_ms),
     "idle time allowed before login"},
    {"limits", "max_line", K_SIZE, "8192", 512, 65536, O(max_line),
     "longest command line before login (excluding literals)"},
    {"limits", "max_literal", K_SIZE, "8192", 256, 65536, O(max_literal),
     "largest literal before login (LOGIN user name or password)"},
    {"limits", "max_preauth_commands", K_U64, "30", 1, 10000, O(max_preauth_commands),
     "commands allowed before login"},
    {"limits", "max_bad_commands", K_U64, "3", 1, 1000, O(max_bad_commands),
     "BAD / -ERR syntax replies before login after which the connection is closed"},
    {"limits", "max_auth_failures", K_U64, "3", 1, 1000, O(max_auth_failures),
     "failed logins on one connection after which it is closed"},
    {"limits", "session_idle_timeout", K_MS, "1h", 0, 7ull * 86400000, O(session_idle_timeout_ms),
     "close a logged-in session when neither side sent anything for this long (0 = never)"},
    {"limits", "splice_buffer", K_SIZE, "64k", 4096, 16u << 20, O(splice_buffer),
     "bytes queued per direction before the sending side is paused"},
    {"throttle", "window", K_MS, "10m", 1000, 86400000, O(throttle.window_ms),
     "failed logins are counted within this sliding window"},
    {"throttle", "delay_after", K_U64, "3", 0, 60, O(throttle.delay_after),
     "failures (per address or per user) after which failure replies are delayed (0 = never)"},
    {"throttle", "delay_base", K_MS, "1s", 0, 600000, O(throttle.delay_base_ms),
     "first delay; doubles with each further failure"},
    {"throttle", "delay_max", K_MS, "15s", 0, 600000, O(throttle.delay_max_ms), "longest delay"},
    {"throttle", "block_after", K_U64, "10", 0, 60, O(throttle.block_after),
     "failures from one address after which it is refused (0 = never)"},
    {"throttle", "block_time", K_MS, "15m", 1000, 86400000, O(throttle.block_ms),
     "penalty period of a refused address"},
    {"throttle", "v4_prefix", K_U64, "32", 8, 32, O(throttle.v4_prefix),
     "IPv4 addresses are counted by this prefix"},
    {"throttle", "v6_prefix", K_U64, "64", 16, 128, O(throttle.v6_prefix),
     "IPv6 addresses are counted by this prefix"},
    {"throttle", "max_entries", K_U64, "65536", 16, 10000000, O(throttle.max_entries),
     "entries per table (addresses, users); least recently used go first"},
    {"throttle", "allow", K_STR, "", NOLIM, 0,
     "CIDR list never throttled nor limited per address (e.g. webmail hosts)"},
};
#define NKEYS (sizeof(keys) / sizeof(keys[0]))

static const struct {
    const char *prefix, *key, *help;
} sect_keys[] = {
    {"node", "imap", "store node's imap.listen_proxy address (host:port)"},
    {"node", "pop3", "store node's pop3.listen_proxy address (host:port)"},
    {"node", "aliases", "other addresses of the node a leader hint may name (space separated)"},
    {"sni", "cert", "certificate chain for this server name"},
    {"sni", "key", "its key"},
};

void px_conf_print_keys(FILE *out)
{
    fprintf(out, "%-30s %-14s %s\n", "key", "default", "meaning");
    for (size_t i = 0; i < NKEYS; i++) {
        char name[64];
        snprintf(name, sizeof(name), "%s.%s", keys[i].section, keys[i].key);
        fprintf(out, "%-30s %-14s %s\n", name, keys[i].def[0] ? keys[i].def : "\"\"", keys[i].help);
    }
    for (size_t i = 0; i < sizeof(sect_keys) / sizeof(sect_keys[0]); i++) {
        char name[64];
        snprintf(name, sizeof(name), "[%s NAME].%s", sect_keys[i].prefix, sect_keys[i].key);
        fprintf(out, "%-30s %-14s %s\n", name, "\"\"", sect_keys[i].help);
    }
}

static int is_sect(const char *section, const char *prefix, const char **name_r)
{
    size_t n = strlen(prefix);
    if (strncmp(section, prefix, n) != 0 || section[n] != ' ') return 0;
    const char *p = section + n;
    while (*p == ' ')
        p++;
    if (*p == '\0') return 0;
    *name_r = p;
    return 1;
}

struct check_ctx {
    char *err;
    size_t errlen;
    struct px_conf *c;
};

static int check_key(const char *section, const char *key, const char *value, void *arg)
{
    struct check_ctx *cc = arg;
    const char *name;
    (void)value;
    for (size_t i = 0; i < NKEYS; i++)
        if (strcmp(keys[i].section, section) == 0 && strcmp(keys[i].key, key) == 0) return 0;
    if (is_sect(section, "node", &name)) {
        if (strcmp(key, "imap") && strcmp(key, "pop3") && strcmp(key, "aliases")) goto unknown;
        for (size_t i = 0; i < cc->c->n_nodes; i++)
            if (strcmp(cc->c->nodes[i].name, name) == 0) return 0;
        struct px_node_conf *nn =
            realloc(cc->c->nodes, (cc->c->n_nodes + 1) * sizeof(*cc->c->nodes));
        if (nn == NULL) goto oom;
        cc->c->nodes = nn;
        memset(&nn[cc->c->n_nodes], 0, sizeof(*nn));
        nn[cc->c->n_nodes++].name = name;
        return 0;
    }
    if (is_sect(section, "sni", &name)) {
        if (strcmp(key, "cert") && strcmp(key, "key")) goto unknown;
        for (size_t i = 0; i < cc->c->n_sni; i++)
            if (strcmp(cc->c->sni[i].name, name) == 0) return 0;
        struct px_sni_conf *ns = realloc(cc->c->sni, (cc->c->n_sni + 1) * sizeof(*cc->c->sni));
        if (ns == NULL) goto oom;
        cc->c->sni = ns;
        memset(&ns[cc->c->n_sni], 0, sizeof(*ns));
        ns[cc->c->n_sni++].name = name;
        return 0;
    }
unknown:
    snprintf(cc->err, cc->errlen, "unknown configuration key [%s] %s", section, key);
    return -1;
oom:
    snprintf(cc->err, cc->errlen, "out of memory");
    return -1;
}

static int load_key(struct px_conf *c, const struct key *k, char *err, size_t errlen)
{
    char e[200] = "";
    uint64_t v = 0;
    int b = 0, rv = 0;
    const char *s = NULL;

    switch (k->type) {
    case K_STR:
    case K_ADDR:
        cf_config_str(c->cfg, k->section, k->key, k->def, &s);
        if (k->off) *(const char **)((char *)c + k->off) = s;
        if (k->type == K_ADDR && *s) {
            char host[256];
            int port;
            if (cf_parse_host_port(s, host, sizeof(host), &port) < 0) {
                snprintf(err, errlen, "%s.%s: bad address \"%s\" (host:port)", k->section, k->key,
                         s);
                return -1;
            }
        }
        return 0;
    case K_U64:
        rv =
            cf_config_u64(c->cfg, k->section, k->key, strtoull(k->def, NULL, 10), &v, e, sizeof(e));
        break;
    case K_SIZE: {
        uint64_t d = 0;
        cf_parse_size(k->def, &d);
        rv = cf_config_size(c->cfg, k->section, k->key, d, &v, e, sizeof(e));
        break;
    }
    case K_MS: {
        uint64_t d = 0;
        cf_parse_ms(k->def, &d);
        rv = cf_config_ms(c->cfg, k->section, k->key, d, &v, e, sizeof(e));
        break;
    }
    case K_BOOL: {
        int d = 0;
        cf_parse_bool(k->def, &d);
        rv = cf_config_bool(c->cfg, k->section, k->key, d, &b, e, sizeof(e));
        *(int *)((char *)c + k->off) = b;
        if (rv < 0) snprintf(err, errlen, "%s", e);
        return rv;
    }
    }
    if (rv < 0) {
        snprintf(err, errlen, "%s", e);
        return -1;
    }
    if (v < k->min || v > k->max) {
        snprintf(err, errlen, "%s.%s: value %llu out of range (%llu - %llu)", k->section, k->key,
                 (unsigned long long)v, (unsigned long long)k->min, (unsigned long long)k->max);
        return -1;
    }
    /* store into the field: throttle fields are narrower */
    char *f = (char *)c + k->off;
    if (k->off == O(throttle.delay_after) || k->off == O(throttle.block_after) ||
        k->off == O(throttle.v4_prefix) || k->off == O(throttle.v6_prefix))
        *(unsigned *)f = (unsigned)v;
    else if (k->off == O(throttle.max_entries))
        *(size_t *)f = (size_t)v;
    else
        *(uint64_t *)f = v;
    return 0;
}

static const char *sect_get(const struct cf_config *cfg, const char *prefix, const char *name,
                            const char *key)
{
    char sect[300];
    snprintf(sect, sizeof(sect), "%s %s", prefix, name);
    const char *v = cf_config_get(cfg, sect, key);
    return v ? v : "";
}

struct px_conf *px_conf_load(const char *path, char *err, size_t errlen)
{
    struct px_conf *c = calloc(1, sizeof(*c));
    char bad[80];
    if (c == NULL) {
        snprintf(err, errlen, "out of memory");
        return NULL;
    }
    c->cfg = path ? cf_config_load(path, err, errlen) : cf_config_empty();
    if (c->cfg == NULL) goto fail;
    struct check_ctx cc = {err, errlen, c};
    if (cf_config_foreach(c->cfg, check_key, &cc) != 0) goto fail;
    for (size_t i = 0; i < NKEYS; i++)
        if (load_key(c, &keys[i], err, errlen) < 0) goto fail;

    const char *s;
    cf_config_str(c->cfg, "auth", "plaintext_networks", "", &s);
    long n = px_cidr_list_parse(s, &c->plaintext_nets, bad, sizeof(bad));
    if (n < 0) {
        snprintf(err, errlen, "auth.plaintext_networks: bad network \"%s\"", bad);
        goto fail;
    }
    c->n_plaintext_nets = (size_t)n;
    cf_config_str(c->cfg, "throttle", "allow", "", &s);
    n = px_cidr_list_parse(s, &c->throttle_allow, bad, sizeof(bad));
    if (n < 0) {
        snprintf(err, errlen, "throttle.allow: bad network \"%s\"", bad);
        goto fail;
    }
    c->throttle.allow = c->throttle_allow;
    c->throttle.n_allow = (size_t)n;
    if (c->throttle.delay_max_ms < c->throttle.delay_base_ms) {
        snprintf(err, errlen, "throttle.delay_max must not be smaller than throttle.delay_base");
        goto fail;
    }
    if (strcmp(c->log_level, "debug") && strcmp(c->log_level, "info") &&
        strcmp(c->log_level, "notice") && strcmp(c->log_level, "warn") &&
        strcmp(c->log_level, "error") && strcmp(c->log_level, "crit")) {
        snprintf(err, errlen, "proxy.log_level: unknown level \"%s\"", c->log_level);
        goto fail;
    }
    for (size_t i = 0; i < c->n_nodes; i++) {
        struct px_node_conf *nd = &c->nodes[i];
        nd->imap = sect_get(c->cfg, "node", nd->name, "imap");
        nd->pop3 = sect_get(c->cfg, "node", nd->name, "pop3");
        nd->aliases = sect_get(c->cfg, "node", nd->name, "aliases");
        if (!*nd->imap && !*nd->pop3) {
            snprintf(err, errlen, "[node %s]: needs imap and/or pop3", nd->name);
            goto fail;
        }
    }
    if (c->n_nodes == 0) {
        snprintf(err, errlen, "no store nodes configured (add a [node NAME] section)");
        goto fail;
    }
    for (size_t i = 0; i < c->n_sni; i++) {
        c->sni[i].cert = sect_get(c->cfg, "sni", c->sni[i].name, "cert");
        c->sni[i].key = sect_get(c->cfg, "sni", c->sni[i].name, "key");
        if (!*c->sni[i].cert || !*c->sni[i].key) {
            snprintf(err, errlen, "[sni %s]: needs cert and key", c->sni[i].name);
            goto fail;
        }
    }
    int any_tls = 0;
    for (int i = 0; i < PX_L_COUNT; i++)
        if (*c->l[i].listen) any_tls = 1;
    if (any_tls && (!*c->tls_cert || !*c->tls_key)) {
        snprintf(err, errlen, "tls.cert and tls.key are required");
        goto fail;
    }
    if (!*c->be_ca || !*c->be_cert || !*c->be_key) {
        snprintf(err, errlen, "backend.ca, backend.cert and backend.key are required");
        goto fail;
    }
    return c;
fail:
    px_conf_free(&c);
    return NULL;
}

void px_conf_free(struct px_conf **cp)
{
    if (cp == NULL || *cp == NULL) return;
    struct px_conf *c = *cp;
    free(c->sni);
    free(c->nodes);
    free(c->plaintext_nets);
    free(c->throttle_allow);
    cf_config_free(&c->cfg);
    free(c);
    *cp = NULL;
}
