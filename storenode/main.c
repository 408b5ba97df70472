/* coffer-store: one store node. Loads the configuration, opens the LMDB
 * store, starts replication (single voter for now), stamps a new group,
 * listens for IMAP, POP3 and the admin RPC, and shuts down in order on
 * SIGTERM/SIGINT. Operations: docs/coffer-store.md; keys:
 * docs/configuration.md. Everything runs on one libuv loop thread. */
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <netinet/in.h>
#include <arpa/inet.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <openssl/rand.h>
#include <systemd/sd-daemon.h>
#include <uv.h>

#include "cf_conn.h"
#include "cf_log.h"
#include "cf_tls.h"
#include "coffer_raft.pb-c.h"
#include "listeners.h"
#include "node.h"
#include "propose.h"
#include "rep.h"
#include "sconf.h"
#include "store.h"

#ifndef COFFER_VERSION
#define COFFER_VERSION "0.1.0"
#endif

#define LISTEN_BACKLOG 511
#define READY_POLL_MS 100
#define GROUP_RETRY_MS 1000
#define SHUTDOWN_GRACE_MS 15000
/* Room for the entry framing, the MIME cache and the other fields that
 * travel with a message of limits.max_message bytes. */
#define ENTRY_OVERHEAD (1024 * 1024)

enum listener_kind {
    L_IMAP,
    L_IMAPS,
    L_POP3,
    L_POP3S,
    L_ADMIN,
    L_IMAP_PROXY,
    L_POP3_PROXY,
    L_COUNT
};

struct daemon;

struct listener {
    uv_tcp_t tcp;
    struct daemon *d;
    enum listener_kind kind;
    int active;
    char bound[80]; /* actual address, for the ready line */
};

struct daemon {
    uv_loop_t loop;
    struct sconf cfg;
    struct node n;
    struct listener ls[L_COUNT];
    uv_signal_t sigterm, sigint, sighup;
    uv_timer_t ready_timer;
    uv_timer_t grace_timer;
    int listening; /* listeners are up */
    int ready;
    int group_busy; /* barrier or GroupInit in flight */
    uint64_t group_retry_at;
    struct store_outcome group_out;
    int stopping;
    int rep_closed;
    int forced_exit;
};

static const char *const listener_names[L_COUNT] = {"imap",  "imaps",      "pop3",      "pop3s",
                                                    "admin", "imap_proxy", "pop3_proxy"};

/* ---- helpers ---- */

static void usage(FILE *f)
{
    fprintf(f, "Usage: coffer-store --config FILE [--check-config]\n"
               "       coffer-store --help | --version\n"
               "\n"
               "Coffer message store node: IMAP4rev1 and POP3 over a Raft-replicated\n"
               "LMDB store.\n"
               "\n"
               "Options:\n"
               "  -c, --config FILE   configuration file (INI); every key is described in\n"
               "                      docs/configuration.md\n"
               "      --check-config  load and validate the configuration (including the\n"
               "                      TLS certificate/key and the admin secret), then exit\n"
               "  -h, --help          show this help and exit\n"
               "  -V, --version       show the version and exit\n"
               "\n"
               "Signals: SIGTERM/SIGINT stop the node gracefully. See docs/coffer-store.md.\n");
}

static int mkdir_0700(const char *path, char *err, size_t errlen)
{
    struct stat st;

    if (mkdir(path, 0700) == 0) return 0;
    if (errno != EEXIST) {
        snprintf(err, errlen, "mkdir %s: %s", path, strerror(errno));
        return -1;
    }
    if (stat(path, &st) != 0 || !S_ISDIR(st.st_mode)) {
        snprintf(err, errlen, "%s exists and is not a directory", path);
        return -1;
    }
    return 0;
}

static int is_zero16(const uint8_t id[16])
{
    int i;
    for (i = 0; i < 16; i++)
        if (id[i] != 0) return 0;
    return 1;
}

static void hex16(const uint8_t id[16], char out[33])
{
    int i;
    for (i = 0; i < 16; i++)
        snprintf(out + 2 * i, 3, "%02x", id[i]);
}

static void sockname(uv_tcp_t *t, char *out, size_t len)
{
    struct sockaddr_storage ss;
    int sl = sizeof ss;
    char ip[INET6_ADDRSTRLEN] = "?";
    int port = 0;

    if (uv_tcp_getsockname(t, (struct sockaddr *)&ss, &sl) != 0) {
        snprintf(out, len, "?");
        return;
    }
    if (ss.ss_family == AF_INET6) {
        struct sockaddr_in6 *a = (struct sockaddr_in6 *)&ss;
        uv_ip6_name(a, ip, sizeof ip);
        port = ntohs(a->sin6_port);
        snprintf(out, len, "[%s]:%d", ip, port);
    } else {
        struct sockaddr_in *a = (struct sockaddr_in *)&ss;
        uv_ip4_name(a, ip, sizeof ip);
        port = ntohs(a->sin_port);
        snprintf(out, len, "%s:%d", ip, port);
    }
}

static void notify_status(struct daemon *d)
{
    struct rep_info info;

    if (d->n.rep == NULL) return;
    rep_get_info(d->n.rep, &info);
    sd_notifyf(0, "STATUS=%s%s, term %" PRIu64 ", applied %" PRIu64 ", sessions %" PRIu64,
               d->stopping ? "stopping, " : "", info.role, info.term, info.applied_index,
               d->n.total_sessions);
}

/* ---- group stamp and readiness ---- */

static void check_ready(struct daemon *d);

static void group_init_cb(void *arg, int status, struct store_outcome *out)
{
    struct daemon *d = arg;
    uint8_t gid[16];
    char hex[33];

    d->group_busy = 0;
    if (status != REP_OK) {
        cf_warn("group stamp: GroupInit failed: %s; will retry", rep_strerror(status));
        d->group_retry_at = uv_now(&d->loop) + GROUP_RETRY_MS;
    } else if (out->result != STORE_OK) {
        cf_error("group stamp: GroupInit refused: %s", out->text);
        d->group_retry_at = uv_now(&d->loop) + GROUP_RETRY_MS;
    } else {
        store_group_id(d->n.store, gid);
        hex16(gid, hex);
        cf_notice("group stamped: group id %s at index %" PRIu64, hex, out->index);
    }
    store_outcome_clear(&d->group_out);
    check_ready(d);
}

static void stamp_barrier_cb(void *arg, int status)
{
    struct daemon *d = arg;
    Coffer__Entry e = COFFER__ENTRY__INIT;
    Coffer__GroupInit gi = COFFER__GROUP_INIT__INIT;
    uint8_t gid[16];
    int rv;

    d->group_busy = 0;
    if (d->stopping) return;
    if (status != REP_OK) {
        d->group_retry_at = uv_now(&d->loop) + GROUP_RETRY_MS;
        return;
    }
    /* Everything before the barrier is applied: the store's group id is
     * authoritative now. */
    store_group_id(d->n.store, gid);
    if (!is_zero16(gid)) {
        check_ready(d);
        return;
    }
    if (RAND_bytes(gid, sizeof gid) != 1) {
        cf_crit("group stamp: no random bytes for the group id");
        d->group_retry_at = uv_now(&d->loop) + GROUP_RETRY_MS;
        return;
    }
    gi.group_id.data = gid;
    gi.group_id.len = sizeof gid;
    e.op_case = COFFER__ENTRY__OP_GROUP_INIT;
    e.group_init = &gi;
    e.actor = "coffer-store";
    memset(&d->group_out, 0, sizeof d->group_out);
    rv = propose_entry(&d->n, &e, &d->group_out, group_init_cb, d);
    if (rv != 0) {
        cf_warn("group stamp: propose GroupInit: %s", rep_strerror(rv));
        d->group_retry_at = uv_now(&d->loop) + GROUP_RETRY_MS;
        return;
    }
    d->group_busy = 1;
    cf_info("group stamp: new group, proposing GroupInit");
}

/* Leader with an unstamped store: barrier first (a restarted leader may
 * not have re-applied its log yet), then GroupInit if still unstamped. */
static void maybe_stamp_group(struct daemon *d)
{
    uint8_t gid[16];
    int rv;

    if (d->stopping || d->group_busy || !rep_is_leader(d->n.rep)) return;
    if (uv_now(&d->loop) < d->group_retry_at) return;
    store_group_id(d->n.store, gid);
    if (!is_zero16(gid)) return;
    rv = rep_barrier(d->n.rep, stamp_barrier_cb, d);
    if (rv != 0) {
        d->group_retry_at = uv_now(&d->loop) + GROUP_RETRY_MS;
        return;
    }
    d->group_busy = 1;
}

static void check_ready(struct daemon *d)
{
    uint8_t gid[16];
    char hex[33];
    int i;

    if (d->ready || d->stopping || !d->listening) return;
    if (!rep_is_leader(d->n.rep)) return;
    store_group_id(d->n.store, gid);
    if (is_zero16(gid)) {
        maybe_stamp_group(d);
        return;
    }
    d->ready = 1;
    uv_timer_stop(&d->ready_timer);
    hex16(gid, hex);
    sd_notify(0, "READY=1");
    notify_status(d);
    cf_notice("coffer-store %s ready (node %" PRIu64 ", group %s)", COFFER_VERSION, d->cfg.node_id,
              hex);
    /* One line on stderr that harnesses wait for. */
    fprintf(stderr, "coffer-store ready:");
    for (i = 0; i < L_COUNT; i++)
        fprintf(stderr, " %s=%s", listener_names[i], d->ls[i].active ? d->ls[i].bound : "-");
    fprintf(stderr, "\n");
    fflush(stderr);
}

static void ready_timer_cb(uv_timer_t *t)
{
    check_ready(t->data);
}

static void role_cb(void *arg, int is_leader)
{
    struct daemon *d = arg;

    if (d->stopping) return;
    if (is_leader) {
        cf_notice("this node is the leader");
        check_ready(d);
    } else {
        cf_warn("leadership lost: closing IMAP/POP3 sessions");
        imap_close_all(&d->n, "not leader");
        pop3_close_all(&d->n, "not leader");
    }
    notify_status(d);
}

/* ---- listeners ---- */

static void on_connection(uv_stream_t *server, int status)
{
    struct listener *l = server->data;
    struct daemon *d = l->d;

    if (status < 0) {
        cf_warn("%s listener: accept error: %s", listener_names[l->kind], uv_strerror(status));
        return;
    }
    switch (l->kind) {
    case L_IMAP:
        imap_accept(&d->n, server, 0);
        break;
    case L_IMAPS:
        imap_accept(&d->n, server, 1);
        break;
    case L_POP3:
        pop3_accept(&d->n, server, 0);
        break;
    case L_POP3S:
        pop3_accept(&d->n, server, 1);
        break;
    case L_ADMIN:
        admin_accept(&d->n, server);
        break;
    case L_IMAP_PROXY:
        imap_accept(&d->n, server, LISTEN_PROXY);
        break;
    case L_POP3_PROXY:
        pop3_accept(&d->n, server, LISTEN_PROXY);
        break;
    default:
        break;
    }
}

static int start_listeners(struct daemon *d, char *err, size_t errlen)
{
    const char *addrs[L_COUNT] = {
        d->cfg.imap_listen,  d->cfg.imaps_listen,      d->cfg.pop3_listen,      d->cfg.pop3s_listen,
        d->cfg.admin_listen, d->cfg.imap_proxy_listen, d->cfg.pop3_proxy_listen};
    char lerr[256];
    int i, rv;

    for (i = 0; i < L_COUNT; i++) {
        struct listener *l = &d->ls[i];

        l->d = d;
        l->kind = (enum listener_kind)i;
        if (addrs[i] == NULL || addrs[i][0] == '\0') continue;
        if ((i == L_IMAPS || i == L_POP3S) && d->n.tls == NULL) {
            snprintf(err, errlen, "%s listener needs tls.cert/tls.key", listener_names[i]);
            return -1;
        }
        if ((i == L_IMAP_PROXY || i == L_POP3_PROXY) && d->n.proxy_tls == NULL) {
            snprintf(err, errlen, "%s listener needs tls.cert/tls.key/tls.ca", listener_names[i]);
            return -1;
        }
        if (i == L_ADMIN && d->n.admin_tls == NULL) {
            snprintf(err, errlen, "admin listener needs tls.cert/tls.key");
            return -1;
        }
        rv = cf_listen_tcp(&d->loop, &l->tcp, addrs[i], LISTEN_BACKLOG, on_connection, lerr,
                           sizeof lerr);
        if (rv != 0) {
            /* cf_listen_tcp closes the handle itself on failure. */
            snprintf(err, errlen, "%s listener on %s: %s", listener_names[i], addrs[i], lerr);
            return -1;
        }
        l->tcp.data = l;
        l->active = 1;
        sockname(&l->tcp, l->bound, sizeof l->bound);
        cf_info("%s listening on %s", listener_names[i], l->bound);
    }
    return 0;
}

static void close_listeners(struct daemon *d)
{
    int i;

    for (i = 0; i < L_COUNT; i++) {
        if (d->ls[i].active && !uv_is_closing((uv_handle_t *)&d->ls[i].tcp))
            uv_close((uv_handle_t *)&d->ls[i].tcp, NULL);
        d->ls[i].active = 0;
    }
}

/* ---- shutdown ---- */

static void on_rep_closed(void *arg)
{
    struct daemon *d = arg;

    d->rep_closed = 1;
    cf_info("replication closed");
}

static void grace_timer_cb(uv_timer_t *t)
{
    struct daemon *d = t->data;

    cf_warn("shutdown: connections still open after %d s; exiting anyway",
            SHUTDOWN_GRACE_MS / 1000);
    d->forced_exit = 1;
    uv_stop(&d->loop);
}

static void close_if_open(uv_handle_t *h)
{
    if (h->loop != NULL && !uv_is_closing(h)) uv_close(h, NULL);
}

static void begin_shutdown(struct daemon *d, const char *why)
{
    if (d->stopping) return;
    d->stopping = 1;
    d->n.stopping = 1;
    cf_notice("shutting down (%s)", why);
    sd_notify(0, "STOPPING=1");
    notify_status(d);
    imap_close_all(&d->n, "server shutting down");
    pop3_close_all(&d->n, "server shutting down");
    close_listeners(d);
    uv_timer_stop(&d->ready_timer);
    close_if_open((uv_handle_t *)&d->ready_timer);
    close_if_open((uv_handle_t *)&d->sigterm);
    close_if_open((uv_handle_t *)&d->sigint);
    close_if_open((uv_handle_t *)&d->sighup);
    /* Sessions close gracefully (bounded by cf_conn); if anything is still
     * alive after the grace period the loop is stopped. Unref'd so it does
     * not keep the loop alive by itself. */
    uv_timer_start(&d->grace_timer, grace_timer_cb, SHUTDOWN_GRACE_MS, 0);
    uv_unref((uv_handle_t *)&d->grace_timer);
    if (d->n.rep != NULL) rep_close(d->n.rep, on_rep_closed, d);
}

static void on_signal(uv_signal_t *s, int signum)
{
    struct daemon *d = s->data;

    if (signum == SIGHUP) {
        cf_info("SIGHUP ignored (configuration reload is not supported; restart instead)");
        return;
    }
    begin_shutdown(d, signum == SIGTERM ? "SIGTERM" : "SIGINT");
}

/* ---- FSM glue ---- */

static int fsm_apply(void *fsm, uint64_t index, const void *buf, size_t len)
{
    struct node *n = fsm;
    return store_apply(n->store, index, buf, len, NULL);
}

static int fsm_snapshot(void *fsm, uint64_t index, void **buf_r, size_t *len_r)
{
    struct node *n = fsm;
    Coffer__SnapshotDescriptor sd = COFFER__SNAPSHOT_DESCRIPTOR__INIT;
    uint8_t gid[16];
    uint64_t applied;
    size_t len;
    void *buf;

    /* The raft log up to `index` may be dropped after this: the store must
     * be on disk first (it runs with relaxed LMDB syncing). */
    if (store_sync(n->store) != 0) {
        cf_error("snapshot: store_sync failed");
        return -1;
    }
    /* applied_index: the store holds every command up to raft index
     * `index`. The store's own watermark can be lower (the last entries were
     * barriers or configuration changes, which never reach store_apply) or
     * higher (after a restart the store is ahead of raft's replay), hence
     * the minimum of both. restore() checks the store reaches it. */
    applied = store_applied_index(n->store);
    if (applied > index) applied = index;
    store_group_id(n->store, gid);
    sd.format = 1;
    sd.group_id.data = gid;
    sd.group_id.len = sizeof gid;
    sd.applied_index = applied;
    len = coffer__snapshot_descriptor__get_packed_size(&sd);
    buf = malloc(len > 0 ? len : 1);
    if (buf == NULL) return -1;
    coffer__snapshot_descriptor__pack(&sd, buf);
    *buf_r = buf;
    *len_r = len;
    return 0;
}

static int fsm_restore(void *fsm, const void *buf, size_t len)
{
    struct node *n = fsm;
    Coffer__SnapshotDescriptor *sd;
    uint64_t have = store_applied_index(n->store);
    uint8_t gid[16];
    int rv = -1;

    sd = coffer__snapshot_descriptor__unpack(NULL, len, buf);
    if (sd == NULL || sd->format != 1) {
        cf_crit("snapshot restore: unreadable snapshot descriptor (%zu bytes)", len);
        goto out;
    }
    store_group_id(n->store, gid);
    if (sd->group_id.len == 16 && !is_zero16(gid) && !is_zero16(sd->group_id.data) &&
        memcmp(gid, sd->group_id.data, 16) != 0) {
        cf_crit("snapshot restore: snapshot belongs to another group; refusing");
        goto out;
    }
    if (have >= sd->applied_index) {
        cf_info("snapshot restore: store at index %" PRIu64 " covers snapshot %" PRIu64, have,
                sd->applied_index);
        rv = 0;
    } else {
        cf_crit("store is behind snapshot %" PRIu64 " (store at %" PRIu64
                "): needs a checkpoint (not available in this version)",
                sd->applied_index, have);
    }
out:
    if (sd != NULL) coffer__snapshot_descriptor__free_unpacked(sd, NULL);
    return rv;
}

static const struct rep_fsm_ops fsm_ops = {fsm_apply, fsm_snapshot, fsm_restore};

/* ---- setup ---- */

static int make_tls(struct daemon *d, char *err, size_t errlen)
{
    struct cf_tls_server_opts o;
    char terr[256];

    if (d->cfg.tls_cert == NULL) return 0; /* plaintext-only configuration (validated by sconf) */
    memset(&o, 0, sizeof o);
    o.cert_file = d->cfg.tls_cert;
    o.key_file = d->cfg.tls_key;
    o.min_version = d->cfg.tls_min_version;
    o.ciphers = d->cfg.tls_ciphers;
    d->n.tls = cf_tls_server_ctx(&o, terr, sizeof terr);
    if (d->n.tls == NULL) {
        snprintf(err, errlen, "TLS (IMAP/POP3): %s", terr);
        return -1;
    }
    /* Admin: client certificates optional, verified against tls.ca when
     * presented (SSL_VERIFY_PEER without FAIL_IF_NO_PEER_CERT). */
    o.ca_file = d->cfg.tls_ca;
    o.require_client_cert = 0;
    d->n.admin_tls = cf_tls_server_ctx(&o, terr, sizeof terr);
    if (d->n.admin_tls == NULL) {
        snprintf(err, errlen, "TLS (admin): %s", terr);
        return -1;
    }
    if (d->cfg.tls_ca != NULL) SSL_CTX_set_verify(d->n.admin_tls, SSL_VERIFY_PEER, NULL);
    /* Proxy-only listeners: a client certificate from tls.ca is required. */
    if (d->cfg.tls_ca != NULL) {
        o.require_client_cert = 1;
        d->n.proxy_tls = cf_tls_server_ctx(&o, terr, sizeof terr);
        if (d->n.proxy_tls == NULL) {
            snprintf(err, errlen, "TLS (proxy listeners): %s", terr);
            return -1;
        }
    }
    return 0;
}

static void free_tls(struct daemon *d)
{
    SSL_CTX_free(d->n.tls);
    SSL_CTX_free(d->n.admin_tls);
    SSL_CTX_free(d->n.proxy_tls);
    d->n.tls = NULL;
    d->n.admin_tls = NULL;
    d->n.proxy_tls = NULL;
}

static void close_walk_cb(uv_handle_t *h, void *arg)
{
    (void)arg;
    if (!uv_is_closing(h)) uv_close(h, NULL);
}

int main(int argc, char **argv)
{
    static const struct option opts[] = {
        {"config", required_argument, NULL, 'c'},
        {"check-config", no_argument, NULL, 'k'},
        {"help", no_argument, NULL, 'h'},
        {"version", no_argument, NULL, 'V'},
        {NULL, 0, NULL, 0},
    };
    static struct daemon dd; /* large; zeroed */
    struct daemon *d = &dd;
    const char *config_path = NULL;
    int check_only = 0, opt, rv, exit_code = 1;
    char err[512], path[4096];
    enum cf_log_level level = CF_LOG_INFO;
    struct rep_config rc;

    while ((opt = getopt_long(argc, argv, "c:hV", opts, NULL)) != -1) {
        switch (opt) {
        case 'c':
            config_path = optarg;
            break;
        case 'k':
            check_only = 1;
            break;
        case 'h':
            usage(stdout);
            return 0;
        case 'V':
            printf("coffer-store %s\n", COFFER_VERSION);
            return 0;
        default:
            usage(stderr);
            return 2;
        }
    }
    if (optind != argc || config_path == NULL) {
        if (config_path == NULL)
            fprintf(stderr, "coffer-store: --config FILE is required\n");
        else
            fprintf(stderr, "coffer-store: unexpected argument \"%s\"\n", argv[optind]);
        usage(stderr);
        return 2;
    }

    if (sconf_load(config_path, &d->cfg, err, sizeof err) != 0) {
        fprintf(stderr, "coffer-store: %s: %s\n", config_path, err);
        return 1;
    }
    if (cf_log_level_parse(d->cfg.log_level, &level) != 0) level = CF_LOG_INFO;
    cf_log_init("coffer-store", level, 1);
    d->n.cfg = &d->cfg;

    if (make_tls(d, err, sizeof err) != 0) {
        cf_error("%s", err);
        goto out_cfg;
    }
    if (check_only) {
        printf("coffer-store: configuration %s is valid\n", config_path);
        exit_code = 0;
        goto out_cfg;
    }

    signal(SIGPIPE, SIG_IGN);
    if (mkdir_0700(d->cfg.data_dir, err, sizeof err) != 0) goto fail_msg;
    snprintf(path, sizeof path, "%s/raft", d->cfg.data_dir);
    if (mkdir_0700(path, err, sizeof err) != 0) goto fail_msg;
    snprintf(path, sizeof path, "%s/lmdb", d->cfg.data_dir);
    if (mkdir_0700(path, err, sizeof err) != 0) goto fail_msg;
    if (store_open(path, d->cfg.map_size, &d->n.store, err, sizeof err) != 0) goto fail_msg;

    rv = uv_loop_init(&d->loop);
    if (rv != 0) {
        snprintf(err, sizeof err, "uv_loop_init: %s", uv_strerror(rv));
        goto fail_msg_store;
    }
    d->n.loop = &d->loop;
    uv_timer_init(&d->loop, &d->ready_timer);
    uv_timer_init(&d->loop, &d->grace_timer);
    d->ready_timer.data = d;
    d->grace_timer.data = d;
    uv_signal_init(&d->loop, &d->sigterm);
    uv_signal_init(&d->loop, &d->sigint);
    uv_signal_init(&d->loop, &d->sighup);
    d->sigterm.data = d->sigint.data = d->sighup.data = d;
    uv_signal_start(&d->sigterm, on_signal, SIGTERM);
    uv_signal_start(&d->sigint, on_signal, SIGINT);
    uv_signal_start(&d->sighup, on_signal, SIGHUP);

    snprintf(path, sizeof path, "%s/raft", d->cfg.data_dir);
    memset(&rc, 0, sizeof rc);
    rc.node_id = d->cfg.node_id;
    rc.address = d->cfg.raft_address;
    rc.data_dir = path;
    rc.bootstrap = d->cfg.raft_bootstrap;
    rc.election_timeout_ms = d->cfg.election_timeout_ms;
    rc.heartbeat_ms = d->cfg.heartbeat_ms;
    rc.snapshot_threshold = d->cfg.snapshot_threshold;
    rc.snapshot_trailing = d->cfg.snapshot_trailing;
    rc.max_entry_bytes = d->cfg.max_message + d->cfg.max_message / 2 + ENTRY_OVERHEAD;
    d->n.rep = rep_create(&d->loop, &rc, &fsm_ops, &d->n, err, sizeof err);
    if (d->n.rep == NULL) goto fail_loop;
    rep_set_role_cb(d->n.rep, role_cb, d);
    if (rep_start(d->n.rep, err, sizeof err) != 0) goto fail_loop;
    if (start_listeners(d, err, sizeof err) != 0) goto fail_loop;
    d->listening = 1;

    uv_timer_start(&d->ready_timer, ready_timer_cb, 0, READY_POLL_MS);
    sd_notify(0, "STATUS=starting");
    cf_info("coffer-store %s starting: node %" PRIu64 ", raft %s, data %s", COFFER_VERSION,
            d->cfg.node_id, d->cfg.raft_address, d->cfg.data_dir);

    uv_run(&d->loop, UV_RUN_DEFAULT);
    exit_code = 0;
    goto teardown;

fail_loop:
    cf_error("%s", err);
    fprintf(stderr, "coffer-store: %s\n", err);
    begin_shutdown(d, "start-up failed");
    uv_run(&d->loop, UV_RUN_DEFAULT);
    exit_code = 1;

teardown:
    if (d->forced_exit) {
        /* Something kept connections open: do not close the store under
         * them; LMDB commits are durable and the raft log is fsynced. */
        cf_warn("exiting without closing the store");
        return exit_code;
    }
    if (!d->rep_closed && d->n.rep != NULL) cf_warn("replication did not report closed");
    close_if_open((uv_handle_t *)&d->grace_timer);
    uv_walk(&d->loop, close_walk_cb, NULL);
    uv_run(&d->loop, UV_RUN_DEFAULT);
    if (d->rep_closed) rep_destroy(&d->n.rep);
    if (uv_loop_close(&d->loop) != 0) cf_warn("event loop still had handles at exit");
    store_close(&d->n.store);
    free_tls(d);
    sconf_free(&d->cfg);
    cf_info("stopped");
    return exit_code;

fail_msg_store:
    store_close(&d->n.store);
fail_msg:
    cf_error("%s", err);
    fprintf(stderr, "coffer-store: %s\n", err);
out_cfg:
    free_tls(d);
    sconf_free(&d->cfg);
    return exit_code;
}
