/* sconf: coffer-store configuration. Keys, defaults and meanings are listed
 * in docs/configuration.md; keep both (and sconf.h) in step. */
#include "sconf.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "cf_config.h"
#include "store.h"
#include "cf_log.h"

#define MIB (1024ull * 1024ull)
#define GIB (1024ull * MIB)
#define SECRET_MAX 4096

/* Every accepted key. Kept in the order of docs/configuration.md. */
static const char *const known_keys[][2] = {
    {"node", "id"},
    {"node", "data_dir"},
    {"node", "log_level"},
    {"node", "group_id"},
    {"node", "min_free_disk"},
    {"raft", "address"},
    {"raft", "bootstrap"},
    {"raft", "election_timeout"},
    {"raft", "heartbeat"},
    {"raft", "snapshot_threshold"},
    {"raft", "snapshot_trailing"},
    {"raft", "snapshot_bytes"},
    {"raft", "checkpoint_rate"},
    {"raft", "checkpoints_kept"},
    {"lmdb", "map_size"},
    {"tls", "cert"},
    {"tls", "key"},
    {"tls", "ca"},
    {"tls", "min_version"},
    {"tls", "ciphers"},
    {"imap", "listen"},
    {"imap", "listen_tls"},
    {"pop3", "listen"},
    {"pop3", "listen_tls"},
    {"imap", "listen_proxy"},
    {"imap", "append_dedup_window"},
    {"pop3", "listen_proxy"},
    {"admin", "listen"},
    {"admin", "secret_file"},
    {"auth", "allow_plaintext"},
    {"auth", "scrypt_log2n"},
    {"limits", "max_line"},
    {"limits", "max_literal"},
    {"limits", "max_message"},
    {"limits", "max_mailbox_name"},
    {"limits", "max_mailbox_depth"},
    {"limits", "max_sessions"},
    {"limits", "max_bad_commands"},
    {"limits", "preauth_timeout"},
    {"limits", "idle_timeout"},
    {"limits", "idle_keepalive"},
};
#define N_KEYS (sizeof known_keys / sizeof known_keys[0])

static char *xstrdup_or_null(const char *s)
{
    return s != NULL ? strdup(s) : NULL;
}

/* Replace *dst with a copy of s; "" becomes NULL when empty_is_null. */
static int set_str(char **dst, const char *s, int empty_is_null)
{
    char *copy = NULL;

    if (s != NULL && !(empty_is_null && s[0] == '\0')) {
        copy = strdup(s);
        if (copy == NULL) return -1;
    }
    free(*dst);
    *dst = copy;
    return 0;
}

void sconf_free(struct sconf *c)
{
    if (c == NULL) return;
    free(c->data_dir);
    free(c->log_level);
    free(c->group_id);
    free(c->raft_address);
    free(c->tls_cert);
    free(c->tls_key);
    free(c->tls_ca);
    free(c->tls_min_version);
    free(c->tls_ciphers);
    free(c->imap_listen);
    free(c->imaps_listen);
    free(c->pop3_listen);
    free(c->pop3s_listen);
    free(c->imap_proxy_listen);
    free(c->pop3_proxy_listen);
    free(c->admin_listen);
    free(c->admin_secret_file);
    if (c->admin_secret != NULL) {
        explicit_bzero(c->admin_secret, strlen(c->admin_secret));
        free(c->admin_secret);
    }
    memset(c, 0, sizeof *c);
}

void sconf_defaults(struct sconf *c)
{
    memset(c, 0, sizeof *c);
    c->node_id = 1;
    c->data_dir = xstrdup_or_null("/var/lib/coffer");
    c->log_level = xstrdup_or_null("info");
    c->group_id = NULL;
    c->min_free_disk = 256 * MIB;
    c->raft_address = xstrdup_or_null("127.0.0.1:7001");
    c->raft_bootstrap = 1;
    c->election_timeout_ms = 1000;
    c->heartbeat_ms = 100;
    c->snapshot_threshold = 16384;
    c->snapshot_trailing = 512;
    c->snapshot_bytes = 1024 * MIB;
    c->checkpoints_kept = 2;
    c->map_size = 64 * GIB;
    c->tls_cert = NULL;
    c->tls_key = NULL;
    c->tls_ca = NULL;
    c->tls_min_version = xstrdup_or_null("TLSv1.2");
    c->tls_ciphers = NULL;
    c->imap_listen = xstrdup_or_null("127.0.0.1:143");
    c->imaps_listen = xstrdup_or_null("127.0.0.1:993");
    c->pop3_listen = xstrdup_or_null("127.0.0.1:110");
    c->pop3s_listen = xstrdup_or_null("127.0.0.1:995");
    c->imap_proxy_listen = xstrdup_or_null("");
    c->pop3_proxy_listen = xstrdup_or_null("");
    c->admin_listen = xstrdup_or_null("127.0.0.1:7443");
    c->admin_secret_file = NULL;
    c->admin_secret = NULL;
    c->allow_plaintext = 0;
    c->scrypt_ln = 14;
    c->max_line = 64 * 1024;
    c->max_literal = 64 * 1024;
    c->max_message = 50 * MIB;
    c->max_mailbox_name = 400;
    c->max_mailbox_depth = 20;
    c->max_sessions = 10000;
    c->max_bad_commands = 20;
    c->preauth_timeout_ms = 60 * 1000;
    c->idle_timeout_ms = 30 * 60 * 1000;
    c->idle_keepalive_ms = 2 * 60 * 1000;
    c->append_dedup_window_ms = 5 * 60 * 1000;
}

struct unknown_ctx {
    char *err;
    size_t errlen;
};

static int check_known(const char *section, const char *key, const char *value, void *arg)
{
    struct unknown_ctx *u = arg;
    size_t i;
    int section_known = 0;

    (void)value;
    for (i = 0; i < N_KEYS; i++) {
        if (strcmp(known_keys[i][0], section) != 0) continue;
        section_known = 1;
        if (strcmp(known_keys[i][1], key) == 0) return 0;
    }
    if (!section_known)
        snprintf(u->err, u->errlen, "unknown section [%s] (key %s.%s)", section, section, key);
    else
        snprintf(u->err, u->errlen, "unknown key %s.%s", section, key);
    return 1;
}

/* Typed loaders: each takes the current value (the default) as default. */
static int load_str(const struct cf_config *cfg, const char *sec, const char *key, char **dst,
                    int empty_is_null, char *err, size_t errlen)
{
    const char *v = NULL;

    if (cf_config_str(cfg, sec, key, *dst, &v) != 0) {
        snprintf(err, errlen, "%s.%s: invalid value", sec, key);
        return -1;
    }
    if (v == *dst) return 0; /* absent: keep the default */
    if (set_str(dst, v, empty_is_null) != 0) {
        snprintf(err, errlen, "out of memory");
        return -1;
    }
    return 0;
}

/* "host:port" with a numeric port 1..65535; "" allowed when may_be_empty. */
static int check_addr(const char *sec, const char *key, const char *v, int may_be_empty, char *err,
                      size_t errlen)
{
    const char *colon;
    char *end;
    unsigned long port;

    if (v == NULL || v[0] == '\0') {
        if (may_be_empty) return 0;
        snprintf(err, errlen, "%s.%s: must not be empty", sec, key);
        return -1;
    }
    colon = strrchr(v, ':');
    if (colon == NULL || colon == v) {
        snprintf(err, errlen, "%s.%s: \"%s\" is not host:port", sec, key, v);
        return -1;
    }
    errno = 0;
    port = strtoul(colon + 1, &end, 10);
    if (errno != 0 || *end != '\0' || colon[1] == '\0' || port == 0 || port > 65535) {
        snprintf(err, errlen, "%s.%s: \"%s\" has no valid port (1-65535)", sec, key, v);
        return -1;
    }
    return 0;
}

static int range_u64(const char *sec, const char *key, uint64_t v, uint64_t lo, uint64_t hi,
                     char *err, size_t errlen)
{
    if (v < lo || v > hi) {
        snprintf(err, errlen, "%s.%s: %" PRIu64 " is out of range [%" PRIu64 ", %" PRIu64 "]", sec,
                 key, v, lo, hi);
        return -1;
    }
    return 0;
}

/* Read the admin secret: the file must not be group/other accessible; one
 * trailing newline (LF or CRLF) is stripped; must not be empty. */
static int load_secret(const char *path, char **secret_r, char *err, size_t errlen)
{
    struct stat st;
    char buf[SECRET_MAX + 1];
    size_t n = 0;
    ssize_t got;
    int fd;

    fd = open(path, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
    if (fd < 0) {
        snprintf(err, errlen, "admin.secret_file: cannot open %s: %s", path, strerror(errno));
        return -1;
    }
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
        snprintf(err, errlen, "admin.secret_file: %s is not a regular file", path);
        goto fail;
    }
    if (st.st_mode & 077) {
        snprintf(err, errlen,
                 "admin.secret_file: %s is accessible by group/others (mode %04o); "
                 "chmod 600 it",
                 path, (unsigned)(st.st_mode & 07777));
        goto fail;
    }
    while (n < sizeof buf) {
        got = read(fd, buf + n, sizeof buf - n);
        if (got < 0) {
            if (errno == EINTR) continue;
            snprintf(err, errlen, "admin.secret_file: read %s: %s", path, strerror(errno));
            goto fail;
        }
        if (got == 0) break;
        n += (size_t)got;
    }
    if (n > SECRET_MAX) {
        snprintf(err, errlen, "admin.secret_file: %s is larger than %d bytes", path, SECRET_MAX);
        goto fail;
    }
    close(fd);
    fd = -1;
    if (n > 0 && buf[n - 1] == '\n') n--;
    if (n > 0 && buf[n - 1] == '\r') n--;
    if (n == 0) {
        snprintf(err, errlen, "admin.secret_file: %s is empty", path);
        goto fail;
    }
    if (memchr(buf, '\0', n) != NULL || memchr(buf, '\n', n) != NULL) {
        snprintf(err, errlen, "admin.secret_file: %s must hold one line without NUL bytes", path);
        goto fail;
    }
    *secret_r = strndup(buf, n);
    explicit_bzero(buf, sizeof buf);
    if (*secret_r == NULL) {
        snprintf(err, errlen, "out of memory");
        return -1;
    }
    return 0;
fail:
    explicit_bzero(buf, sizeof buf);
    if (fd >= 0) close(fd);
    return -1;
}

static int validate(struct sconf *c, char *err, size_t errlen)
{
    enum cf_log_level lvl;
    const char *addrs[8][3] = {
        {"raft", "address", c->raft_address},
        {"imap", "listen", c->imap_listen},
        {"imap", "listen_tls", c->imaps_listen},
        {"pop3", "listen", c->pop3_listen},
        {"pop3", "listen_tls", c->pop3s_listen},
        {"admin", "listen", c->admin_listen},
        {"imap", "listen_proxy", c->imap_proxy_listen},
        {"pop3", "listen_proxy", c->pop3_proxy_listen},
    };
    int i, j, need_tls;

    if (c->node_id < 1) {
        snprintf(err, errlen, "node.id: must be >= 1");
        return -1;
    }
    if (c->data_dir == NULL || c->data_dir[0] == '\0') {
        snprintf(err, errlen, "node.data_dir: must not be empty");
        return -1;
    }
    if (c->log_level == NULL || cf_log_level_parse(c->log_level, &lvl) != 0) {
        snprintf(err, errlen,
                 "node.log_level: \"%s\" is not one of debug, info, notice, warn, error, crit",
                 c->log_level != NULL ? c->log_level : "");
        return -1;
    }
    if (c->group_id != NULL) {
        size_t k, gl = strlen(c->group_id);
        for (k = 0; k < gl; k++)
            if (!((c->group_id[k] >= '0' && c->group_id[k] <= '9') ||
                  (c->group_id[k] >= 'a' && c->group_id[k] <= 'f')))
                break;
        if (gl != 32 || k != gl) {
            snprintf(err, errlen, "node.group_id: must be 32 lower-case hex digits");
            return -1;
        }
    }
    for (i = 0; i < 8; i++)
        if (check_addr(addrs[i][0], addrs[i][1], addrs[i][2], i > 0, err, errlen) != 0) return -1;
    for (i = 0; i < 8; i++) {
        if (addrs[i][2] == NULL || addrs[i][2][0] == '\0') continue;
        for (j = i + 1; j < 8; j++) {
            if (addrs[j][2] != NULL && strcmp(addrs[i][2], addrs[j][2]) == 0) {
                snprintf(err, errlen, "%s.%s and %s.%s both use %s", addrs[i][0], addrs[i][1],
                         addrs[j][0], addrs[j][1], addrs[i][2]);
                return -1;
            }
        }
    }
    if (range_u64("raft", "election_timeout", c->election_timeout_ms, 10, 60000, err, errlen) ||
        range_u64("raft", "heartbeat", c->heartbeat_ms, 1, 60000, err, errlen) ||
        range_u64("raft", "snapshot_threshold", c->snapshot_threshold, 1, UINT32_MAX, err,
                  errlen) ||
        /* 0 is refused: libraft 0.15 treats trailing 0 like an installed
         * snapshot and drops log entries appended after the snapshot. */
        range_u64("raft", "snapshot_trailing", c->snapshot_trailing, 1, UINT32_MAX, err, errlen) ||
        range_u64("raft", "checkpoints_kept", c->checkpoints_kept, 1, 100, err, errlen))
        return -1;
    if (c->heartbeat_ms >= c->election_timeout_ms) {
        snprintf(err, errlen,
                 "raft.heartbeat (%" PRIu64 " ms) must be smaller than raft.election_timeout "
                 "(%" PRIu64 " ms)",
                 c->heartbeat_ms, c->election_timeout_ms);
        return -1;
    }
    if (range_u64("lmdb", "map_size", c->map_size, 16 * MIB, UINT64_C(1) << 50, err, errlen))
        return -1;
    if (c->tls_min_version == NULL || (strcmp(c->tls_min_version, "TLSv1.2") != 0 &&
                                       strcmp(c->tls_min_version, "TLSv1.3") != 0)) {
        snprintf(err, errlen, "tls.min_version: must be TLSv1.2 or TLSv1.3");
        return -1;
    }
    need_tls = (c->imaps_listen != NULL && c->imaps_listen[0] != '\0') ||
               (c->pop3s_listen != NULL && c->pop3s_listen[0] != '\0') ||
               (c->admin_listen != NULL && c->admin_listen[0] != '\0') || !c->allow_plaintext;
    if ((c->imap_proxy_listen[0] != '\0' || c->pop3_proxy_listen[0] != '\0') &&
        (c->tls_ca == NULL || c->tls_cert == NULL)) {
        snprintf(err, errlen,
                 "imap.listen_proxy / pop3.listen_proxy need tls.cert, tls.key and tls.ca "
                 "(proxies are authenticated by client certificates from tls.ca)");
        return -1;
    }
    if (need_tls && (c->tls_cert == NULL || c->tls_key == NULL)) {
        snprintf(err, errlen,
                 "tls.cert and tls.key are required (TLS listeners are enabled or "
                 "auth.allow_plaintext is off)");
        return -1;
    }
    if ((c->tls_cert == NULL) != (c->tls_key == NULL)) {
        snprintf(err, errlen, "tls.cert and tls.key must be set together");
        return -1;
    }
    if (c->admin_listen != NULL && c->admin_listen[0] != '\0' && c->admin_secret_file == NULL) {
        snprintf(err, errlen, "admin.secret_file: required when admin.listen is set");
        return -1;
    }
    if (range_u64("auth", "scrypt_log2n", c->scrypt_ln, 10, 22, err, errlen) ||
        range_u64("limits", "max_line", c->max_line, 8192, 16 * MIB, err, errlen) ||
        range_u64("limits", "max_literal", c->max_literal, 1024, 64 * MIB, err, errlen) ||
        range_u64("limits", "max_message", c->max_message, 1024, 1 * GIB, err, errlen) ||
        range_u64("limits", "max_mailbox_name", c->max_mailbox_name, 16, STORE_MAX_MAILBOX_NAME,
                  err, errlen) ||
        range_u64("limits", "max_mailbox_depth", c->max_mailbox_depth, 1, 256, err, errlen) ||
        range_u64("limits", "max_sessions", c->max_sessions, 1, 1000000, err, errlen) ||
        range_u64("limits", "max_bad_commands", c->max_bad_commands, 1, 100000, err, errlen) ||
        range_u64("limits", "preauth_timeout", c->preauth_timeout_ms, 1000, 3600 * 1000, err,
                  errlen) ||
        range_u64("limits", "idle_timeout", c->idle_timeout_ms, 1000, 24 * 3600 * 1000ull, err,
                  errlen) ||
        range_u64("limits", "idle_keepalive", c->idle_keepalive_ms, 1000, 3600 * 1000, err,
                  errlen) ||
        range_u64("imap", "append_dedup_window", c->append_dedup_window_ms, 0, 24 * 3600 * 1000,
                  err, errlen))
        return -1;
    if (c->idle_keepalive_ms >= c->idle_timeout_ms) {
        snprintf(err, errlen, "limits.idle_keepalive must be smaller than limits.idle_timeout");
        return -1;
    }
    return 0;
}

int sconf_load(const char *path, struct sconf *c, char *err, size_t errlen)
{
    struct cf_config *cfg;
    struct unknown_ctx u = {err, errlen};
    uint64_t ln;
    char lerr[256];
    int rv = -1;

    sconf_defaults(c);
    cfg = cf_config_load(path, lerr, sizeof lerr);
    if (cfg == NULL) {
        snprintf(err, errlen, "%s", lerr);
        sconf_free(c);
        return -1;
    }
    if (cf_config_foreach(cfg, check_known, &u) != 0) goto out;

#define STR(sec, key, field, empty_null)                                                           \
    if (load_str(cfg, sec, key, &c->field, empty_null, err, errlen) != 0) goto out;
#define TYPED(fn, sec, key, field)                                                                 \
    if (fn(cfg, sec, key, c->field, &c->field, err, errlen) != 0) goto out;

    TYPED(cf_config_u64, "node", "id", node_id);
    STR("node", "data_dir", data_dir, 0);
    STR("node", "log_level", log_level, 0);
    STR("node", "group_id", group_id, 1);
    TYPED(cf_config_size, "node", "min_free_disk", min_free_disk);
    STR("raft", "address", raft_address, 0);
    TYPED(cf_config_bool, "raft", "bootstrap", raft_bootstrap);
    TYPED(cf_config_ms, "raft", "election_timeout", election_timeout_ms);
    TYPED(cf_config_ms, "raft", "heartbeat", heartbeat_ms);
    TYPED(cf_config_u64, "raft", "snapshot_threshold", snapshot_threshold);
    TYPED(cf_config_u64, "raft", "snapshot_trailing", snapshot_trailing);
    TYPED(cf_config_size, "raft", "snapshot_bytes", snapshot_bytes);
    TYPED(cf_config_u64, "raft", "checkpoints_kept", checkpoints_kept);
    TYPED(cf_config_size, "raft", "checkpoint_rate", checkpoint_rate);
    TYPED(cf_config_size, "lmdb", "map_size", map_size);
    STR("tls", "cert", tls_cert, 1);
    STR("tls", "key", tls_key, 1);
    STR("tls", "ca", tls_ca, 1);
    STR("tls", "min_version", tls_min_version, 0);
    STR("tls", "ciphers", tls_ciphers, 1);
    STR("imap", "listen", imap_listen, 0);
    STR("imap", "listen_tls", imaps_listen, 0);
    STR("pop3", "listen", pop3_listen, 0);
    STR("pop3", "listen_tls", pop3s_listen, 0);
    STR("imap", "listen_proxy", imap_proxy_listen, 0);
    STR("pop3", "listen_proxy", pop3_proxy_listen, 0);
    STR("admin", "listen", admin_listen, 0);
    STR("admin", "secret_file", admin_secret_file, 1);
    TYPED(cf_config_bool, "auth", "allow_plaintext", allow_plaintext);
    ln = c->scrypt_ln;
    if (cf_config_u64(cfg, "auth", "scrypt_log2n", ln, &ln, err, errlen) != 0) goto out;
    if (range_u64("auth", "scrypt_log2n", ln, 10, 22, err, errlen) != 0) goto out;
    c->scrypt_ln = (unsigned)ln;
    TYPED(cf_config_size, "limits", "max_line", max_line);
    TYPED(cf_config_size, "limits", "max_literal", max_literal);
    TYPED(cf_config_size, "limits", "max_message", max_message);
    TYPED(cf_config_size, "limits", "max_mailbox_name", max_mailbox_name);
    TYPED(cf_config_u64, "limits", "max_mailbox_depth", max_mailbox_depth);
    TYPED(cf_config_u64, "limits", "max_sessions", max_sessions);
    TYPED(cf_config_u64, "limits", "max_bad_commands", max_bad_commands);
    TYPED(cf_config_ms, "limits", "preauth_timeout", preauth_timeout_ms);
    TYPED(cf_config_ms, "limits", "idle_timeout", idle_timeout_ms);
    TYPED(cf_config_ms, "limits", "idle_keepalive", idle_keepalive_ms);
    TYPED(cf_config_ms, "imap", "append_dedup_window", append_dedup_window_ms);
#undef STR
#undef TYPED

    if (validate(c, err, errlen) != 0) goto out;
    if (c->admin_listen[0] != '\0' &&
        load_secret(c->admin_secret_file, &c->admin_secret, err, errlen) != 0)
        goto out;
    rv = 0;
out:
    cf_config_free(&cfg);
    if (rv != 0) sconf_free(c);
    return rv;
}
