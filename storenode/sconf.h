/* sconf: coffer-store's configuration (INI). Every key, its default and its
 * meaning is documented in docs/configuration.md; keep both in step. */
#ifndef SCONF_H
#define SCONF_H

#include <stddef.h>
#include <stdint.h>

struct sconf {
    /* [node] */
    uint64_t node_id;       /* node.id, default 1 */
    char *data_dir;         /* node.data_dir, default /var/lib/coffer */
    char *log_level;        /* node.log_level, default info */
    char *group_id;         /* node.group_id: 32 hex digits the data dir must belong to, or NULL */
    uint64_t min_free_disk; /* node.min_free_disk: below this a leader steps down, default 256M */
    /* [raft] */
    char *raft_address;           /* raft.address, default 127.0.0.1:7001 */
    int raft_bootstrap;           /* raft.bootstrap, default yes */
    uint64_t election_timeout_ms; /* raft.election_timeout, default 1s */
    uint64_t heartbeat_ms;        /* raft.heartbeat, default 100ms */
    uint64_t snapshot_threshold;  /* raft.snapshot_threshold, default 16384 */
    uint64_t snapshot_trailing;   /* raft.snapshot_trailing, default 512 */
    uint64_t snapshot_bytes;      /* raft.snapshot_bytes: also snapshot after this many entry
                                     bytes (0 = entries only), default 1G */
    uint64_t checkpoints_kept;    /* raft.checkpoints_kept: complete checkpoints kept, default 2 */
    uint64_t checkpoint_rate;     /* raft.checkpoint_rate: checkpoint copy bytes/s, 0 = unlimited */
    /* [lmdb] */
    uint64_t map_size; /* lmdb.map_size, default 64G (sparse) */
    /* [tls] */
    char *tls_cert;        /* tls.cert */
    char *tls_key;         /* tls.key */
    char *tls_ca;          /* tls.ca (verifies admin and proxy client certs) */
    char *tls_min_version; /* tls.min_version, default TLSv1.2 */
    char *tls_ciphers;     /* tls.ciphers */
    /* [imap] */
    char *imap_listen;  /* imap.listen, default 127.0.0.1:143 ("" = off) */
    char *imaps_listen; /* imap.listen_tls, default 127.0.0.1:993 */
    /* imap.append_dedup_window: an APPEND of a message with a Message-ID that
     * is byte-identical (same user, mailbox, flags, date) to one stored at
     * most this long ago, and still present, is a retry: the first APPENDUID
     * is returned and nothing is stored. 0 = off. Default 5m. */
    uint64_t append_dedup_window_ms;
    /* [pop3] */
    char *pop3_listen;  /* pop3.listen, default 127.0.0.1:110 */
    char *pop3s_listen; /* pop3.listen_tls, default 127.0.0.1:995 */
    /* Proxy-only listeners (implicit TLS; a client certificate issued by
     * tls.ca is required; only there is the client address a proxy passes
     * (IMAP ID x-originating-ip, POP3 XCLIENT ADDR=) believed). "" = off. */
    char *imap_proxy_listen; /* imap.listen_proxy, default "" */
    char *pop3_proxy_listen; /* pop3.listen_proxy, default "" */
    /* [admin] */
    char *admin_listen;      /* admin.listen, default 127.0.0.1:7443 */
    char *admin_secret_file; /* admin.secret_file: file holding the secret (mode 0600) */
    char *admin_secret;      /* loaded from admin_secret_file (not a key) */
    /* [auth] */
    int allow_plaintext; /* auth.allow_plaintext, default no */
    unsigned scrypt_ln;  /* auth.scrypt_log2n, default 14 */
    /* [limits] */
    uint64_t max_line;           /* limits.max_line, default 64k */
    uint64_t max_literal;        /* limits.max_literal (non-APPEND literals), default 64k */
    uint64_t max_message;        /* limits.max_message, default 50M */
    uint64_t max_mailbox_name;   /* limits.max_mailbox_name, default 400 (bytes UTF-8, <= 480) */
    uint64_t max_mailbox_depth;  /* limits.max_mailbox_depth, default 20 */
    uint64_t max_sessions;       /* limits.max_sessions, default 10000 */
    uint64_t max_bad_commands;   /* limits.max_bad_commands, default 20 */
    uint64_t preauth_timeout_ms; /* limits.preauth_timeout, default 60s */
    uint64_t idle_timeout_ms;    /* limits.idle_timeout (authenticated, not IDLE), default 30m */
    uint64_t idle_keepalive_ms;  /* limits.idle_keepalive (IDLE "* OK Still here"), default 2m */
};

/* Load and validate. Unknown keys are errors. Returns 0 or -1 with err. */
int sconf_load(const char *path, struct sconf *c, char *err, size_t errlen);
/* Defaults only (tests). */
void sconf_defaults(struct sconf *c);
void sconf_free(struct sconf *c);

#endif
