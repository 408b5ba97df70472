/* px_config: coffer-mmp's configuration (INI via common/cf_config). Every
 * key has a default; unknown sections and keys are refused. The key table
 * in px_config.c is the single source of the defaults, of --help and of
 * docs/coffer-mmp.md's tables (checked by tests/e2e/test_proxy_config.py).
 */
#ifndef PX_CONFIG_H
#define PX_CONFIG_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "px_throttle.h"

enum px_listener_kind { PX_L_IMAP = 0, PX_L_IMAPS, PX_L_POP3, PX_L_POP3S, PX_L_COUNT };

struct px_listener_conf {
    const char *listen; /* "" = off */
    const char *cert;   /* "" = tls.cert */
    const char *key;    /* "" = tls.key */
};

struct px_sni_conf {
    const char *name; /* server name, or "*.example.org" */
    const char *cert, *key;
};

struct px_node_conf {
    const char *name;
    const char *imap;    /* store's imap.listen_proxy, "" = none */
    const char *pop3;    /* store's pop3.listen_proxy, "" = none */
    const char *aliases; /* other addresses of this node a leader hint may name */
};

struct px_conf {
    struct cf_config *cfg; /* owns every string below */
    const char *log_level;
    struct px_listener_conf l[PX_L_COUNT];

    const char *tls_cert, *tls_key, *tls_min_version, *tls_ciphers, *tls_ciphersuites, *tls_groups;
    uint64_t tls_ticket_lifetime_ms, tls_session_cache, tls_expiry_warn_days, tls_expiry_check_ms;
    struct px_sni_conf *sni;
    size_t n_sni;

    const char *be_ca, *be_cert, *be_key, *be_tls_name;
    uint64_t be_connect_timeout_ms, be_login_timeout_ms, be_route_cache_ms, be_retry_ms;
    int be_tls_resume;
    struct px_node_conf *nodes;
    size_t n_nodes;

    int allow_plaintext;
    struct px_cidr *plaintext_nets;
    size_t n_plaintext_nets;

    uint64_t max_connections, max_connections_per_ip, preauth_timeout_ms, max_line, max_literal,
        max_preauth_commands, max_bad_commands, max_auth_failures, session_idle_timeout_ms,
        splice_buffer;

    struct px_throttle_conf throttle; /* throttle.allow points into allow below */
    struct px_cidr *throttle_allow;
};

/* Load and validate a file. NULL with a message in err on any problem
 * (unknown key, malformed value, value out of range, missing node list). */
struct px_conf *px_conf_load(const char *path, char *err, size_t errlen);
void px_conf_free(struct px_conf **c);

/* Print the key table (section, key, default, meaning) as --help shows it. */
void px_conf_print_keys(FILE *out);

#endif
