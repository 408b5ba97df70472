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
#include <sys/statvfs.h>
#include <unistd.h>

#include <openssl/rand.h>
#include <systemd/sd-daemon.h>
#include <uv.h>

#include "cf_conn.h"
#include "cf_log.h"
#include "cf_tls.h"
#include "checkpoint.h"
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
    /* cluster (issue 3) */
    char identity_path[4096];
    uint8_t identity_gid[16]; /* group id recorded in data_dir/identity (0 = none yet) */
    int identity_removed;
    uint64_t hint_leader;    /* leader id the hints were computed for */
    uint64_t hint_nodes_ver; /* store_nodes_version at that time */
    int nodeinfo_busy;
    uint64_t nodeinfo_retry_at;
    struct store_outcome nodeinfo_out;
    uint64_t disk_check_at;
    int disk_low;
    int transfer_busy;
    int announced_listening;
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

/* ---- identity (data_dir/identity) ---- */

static int unhex16(const char *s, uint8_t out[16])
{
    int i;
    for (i = 0; i < 16; i++) {
        unsigned v;
        if (sscanf(s + 2 * i, "%2x", &v) != 1) return -1;
        out[i] = (uint8_t)v;
    }
    return strlen(s) == 32 ? 0 : -1;
}

/* Write data_dir/identity atomically (tmp + rename + fsync). */
static int identity_write(struct daemon *d)
{
    char tmp[4200], hex[33] = "";
    FILE *f;
    int fd;

    if (!is_zero16(d->identity_gid)) hex16(d->identity_gid, hex);
    snprintf(tmp, sizeof tmp, "%s.tmp", d->identity_path);
    f = fopen(tmp, "w");
    if (f == NULL) {
        cf_error("identity: cannot write %s: %s", tmp, strerror(errno));
        return -1;
    }
    fprintf(f,
            "# coffer-store data dir identity (written by coffer-store; do not edit)\n"
            "node_id=%" PRIu64 "\ngroup_id=%s\nstate=%s\n",
            d->cfg.node_id, hex, d->identity_removed ? "removed" : "member");
    fflush(f);
    fd = fileno(f);
    if (fd >= 0) fsync(fd);
    if (fclose(f) != 0 || rename(tmp, d->identity_path) != 0) {
        cf_error("identity: cannot replace %s: %s", d->identity_path, strerror(errno));
        return -1;
    }
    return 0;
}

/* Read (or create) the identity and refuse a data dir that belongs to
 * another node or group, or whose node was removed from its group. */
static int identity_check(struct daemon *d, char *err, size_t errlen)
{
    FILE *f;
    char line[256];
    uint64_t node_id = 0;
    int have_node = 0;

    snprintf(d->identity_path, sizeof d->identity_path, "%s/identity", d->cfg.data_dir);
    f = fopen(d->identity_path, "r");
    if (f == NULL) {
        if (errno != ENOENT) {
            snprintf(err, errlen, "cannot read %s: %s", d->identity_path, strerror(errno));
            return -1;
        }
        if (identity_write(d) != 0) {
            snprintf(err, errlen, "cannot write %s", d->identity_path);
            return -1;
        }
        return 0;
    }
    while (fgets(line, sizeof line, f) != NULL) {
        line[strcspn(line, "\r\n")] = '\0';
        if (strncmp(line, "node_id=", 8) == 0) {
            node_id = strtoull(line + 8, NULL, 10);
            have_node = 1;
        } else if (strncmp(line, "group_id=", 9) == 0 && line[9] != '\0') {
            if (unhex16(line + 9, d->identity_gid) != 0) {
                fclose(f);
                snprintf(err, errlen, "%s: malformed group_id", d->identity_path);
                return -1;
            }
        } else if (strcmp(line, "state=removed") == 0) {
            d->identity_removed = 1;
        }
    }
    fclose(f);
    if (!have_node) {
        snprintf(err, errlen, "%s: no node_id", d->identity_path);
        return -1;
    }
    if (node_id != d->cfg.node_id) {
        snprintf(err, errlen,
                 "data dir %s belongs to node %" PRIu64 ", not to node %" PRIu64
                 " (node.id); refusing to start",
                 d->cfg.data_dir, node_id, d->cfg.node_id);
        return -1;
    }
    if (d->identity_removed) {
        snprintf(err, errlen,
                 "node %" PRIu64 " was removed from its group; wipe %s to add it again "
                 "(cofferctl node add)",
                 node_id, d->cfg.data_dir);
        return -1;
    }
    if (d->cfg.group_id != NULL && !is_zero16(d->identity_gid)) {
        char hex[33];
        hex16(d->identity_gid, hex);
        if (strcmp(hex, d->cfg.group_id) != 0) {
            snprintf(err, errlen,
                     "data dir %s belongs to group %s, not to group %s (node.group_id); "
                     "refusing to start",
                     d->cfg.data_dir, hex, d->cfg.group_id);
            return -1;
        }
    }
    return 0;
}

/* After the store is open: its group stamp must match the identity. */
static int identity_check_store(struct daemon *d, char *err, size_t errlen)
{
    uint8_t gid[16];
    char a[33], b[33];

    store_group_id(d->n.store, gid);
    if (is_zero16(gid) || is_zero16(d->identity_gid)) return 0;
    if (memcmp(gid, d->identity_gid, 16) == 0) return 0;
    hex16(gid, a);
    hex16(d->identity_gid, b);
    snprintf(err, errlen, "store in %s is stamped with group %s but the data dir with group %s",
             d->cfg.data_dir, a, b);
    return -1;
}

/* Record the group id once the store learns it. */
static void identity_update(struct daemon *d)
{
    uint8_t gid[16];

    store_group_id(d->n.store, gid);
    if (is_zero16(gid) || memcmp(gid, d->identity_gid, 16) == 0) return;
    if (!is_zero16(d->identity_gid)) {
        cf_crit("store group id changed under this node; stopping");
        return;
    }
    memcpy(d->identity_gid, gid, 16);
    identity_write(d);
}

/* ---- group stamp and readiness ---- */

static void check_ready(struct daemon *d);
static void update_leader_hint(struct daemon *d);

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
    if (!rep_is_started(d->n.rep)) return;
    store_group_id(d->n.store, gid);
    if (!rep_is_leader(d->n.rep)) {
        /* A follower is ready once it holds the group's state (it has
         * applied at least the group stamp). */
        if (is_zero16(gid)) return;
    } else if (is_zero16(gid)) {
        maybe_stamp_group(d);
        return;
    }
    d->ready = 1;
    hex16(gid, hex);
    sd_notify(0, "READY=1");
    notify_status(d);
    cf_notice("coffer-store %s ready (node %" PRIu64 ", group %s, %s)", COFFER_VERSION,
              d->cfg.node_id, hex, rep_is_leader(d->n.rep) ? "leader" : "follower");
    /* One line on stderr that harnesses wait for. */
    fprintf(stderr, "coffer-store ready:");
    for (i = 0; i < L_COUNT; i++)
        fprintf(stderr, " %s=%s", listener_names[i], d->ls[i].active ? d->ls[i].bound : "-");
    fprintf(stderr, "\n");
    fflush(stderr);
}

/* ---- cluster housekeeping (every READY_POLL_MS) ---- */

/* leader_hint / leader_admin from the `nodes` table. */
static void update_leader_hint(struct daemon *d)
{
    struct rep_info info;
    struct store_node sn;
    uint64_t ver = store_nodes_version(d->n.store);

    rep_get_info(d->n.rep, &info);
    if (!info.is_leader && info.leader_id == d->cfg.node_id) info.leader_id = 0; /* stale */
    if (info.leader_id == d->hint_leader && ver == d->hint_nodes_ver) return;
    d->hint_leader = info.leader_id;
    d->hint_nodes_ver = ver;
    d->n.leader_hint[0] = '\0';
    d->n.leader_admin[0] = '\0';
    if (info.leader_id == 0 || store_node_get(d->n.store, NULL, info.leader_id, &sn) != 0) {
        /* Unknown addresses: name the leader by its Raft address at least
         * in the admin refusal; clients get no hint. */
        return;
    }
    snprintf(d->n.leader_hint, sizeof d->n.leader_hint, "%s", sn.imap[0] ? sn.imap : sn.imaps);
    snprintf(d->n.leader_admin, sizeof d->n.leader_admin, "%s", sn.admin);
    if (info.leader_id != d->cfg.node_id)
        cf_info("leader is node %" PRIu64 " (imap %s, admin %s)", info.leader_id,
                d->n.leader_hint[0] ? d->n.leader_hint : "-",
                d->n.leader_admin[0] ? d->n.leader_admin : "-");
}

static const char *str_or_empty(const char *s)
{
    return s != NULL ? s : "";
}

static void nodeinfo_cb(void *arg, int status, struct store_outcome *out)
{
    struct daemon *d = arg;

    d->nodeinfo_busy = 0;
    if (status != REP_OK || out->result != STORE_OK) {
        cf_warn("NodeInfo for this node not stored: %s",
                status != REP_OK ? rep_strerror(status) : out->text);
        d->nodeinfo_retry_at = uv_now(&d->loop) + GROUP_RETRY_MS;
    }
    store_outcome_clear(&d->nodeinfo_out);
}

/* The leader keeps its own service addresses in the `nodes` table. */
static void maybe_propose_nodeinfo(struct daemon *d)
{
    Coffer__Entry e = COFFER__ENTRY__INIT;
    Coffer__NodeInfo ni = COFFER__NODE_INFO__INIT;
    struct store_node sn;
    struct sconf *c = &d->cfg;
    uint8_t gid[16];
    int rv;

    if (d->nodeinfo_busy || d->stopping || !rep_is_leader(d->n.rep)) return;
    if (uv_now(&d->loop) < d->nodeinfo_retry_at) return;
    store_group_id(d->n.store, gid);
    if (is_zero16(gid)) return;
    rv = store_node_get(d->n.store, NULL, c->node_id, &sn);
    if (rv == 0 && strcmp(sn.raft, str_or_empty(c->raft_address)) == 0 &&
        strcmp(sn.imap, str_or_empty(c->imap_listen)) == 0 &&
        strcmp(sn.imaps, str_or_empty(c->imaps_listen)) == 0 &&
        strcmp(sn.pop3, str_or_empty(c->pop3_listen)) == 0 &&
        strcmp(sn.pop3s, str_or_empty(c->pop3s_listen)) == 0 &&
        strcmp(sn.admin, str_or_empty(c->admin_listen)) == 0)
        return;
    ni.node_id = c->node_id;
    ni.raft_address = (char *)str_or_empty(c->raft_address);
    ni.imap_address = (char *)str_or_empty(c->imap_listen);
    ni.imaps_address = (char *)str_or_empty(c->imaps_listen);
    ni.pop3_address = (char *)str_or_empty(c->pop3_listen);
    ni.pop3s_address = (char *)str_or_empty(c->pop3s_listen);
    ni.admin_address = (char *)str_or_empty(c->admin_listen);
    e.op_case = COFFER__ENTRY__OP_NODE_INFO;
    e.node_info = &ni;
    e.actor = "coffer-store";
    rv = propose_entry(&d->n, &e, &d->nodeinfo_out, nodeinfo_cb, d);
    if (rv != 0) {
        d->nodeinfo_retry_at = uv_now(&d->loop) + GROUP_RETRY_MS;
        return;
    }
    d->nodeinfo_busy = 1;
}

static void transfer_done(void *arg, int status)
{
    struct daemon *d = arg;

    d->transfer_busy = 0;
    if (status != REP_OK) cf_warn("disk nearly full: leadership transfer did not complete");
}

/* Free space of the data dir: below node.min_free_disk a leader hands
 * leadership to another voter, and every member refuses new entries from
 * the leader (rep_set_refuse_entries: it keeps following, stores nothing
 * new, and the rest of the quorum commits); when space returns it accepts
 * them again and catches up. */
static void check_disk(struct daemon *d)
{
    struct statvfs sv;
    uint64_t free_b;
    int low;

    if (d->cfg.min_free_disk == 0 || uv_now(&d->loop) < d->disk_check_at) return;
    d->disk_check_at = uv_now(&d->loop) + 2000;
    if (statvfs(d->cfg.data_dir, &sv) != 0) return;
    free_b = (uint64_t)sv.f_bavail * sv.f_frsize;
    low = free_b < d->cfg.min_free_disk;
    if (low != d->disk_low) {
        d->disk_low = low;
        if (low)
            cf_crit("disk nearly full: %" PRIu64 " bytes free in %s (node.min_free_disk %" PRIu64
                    ")%s",
                    free_b, d->cfg.data_dir, d->cfg.min_free_disk,
                    rep_is_leader(d->n.rep) ? "; stepping down as leader" : "");
        else
            cf_notice("disk space recovered: %" PRIu64 " bytes free in %s", free_b,
                      d->cfg.data_dir);
    }
    rep_set_refuse_entries(d->n.rep, low);
    if (low && !d->transfer_busy && rep_is_leader(d->n.rep)) {
        if (rep_transfer(d->n.rep, 0, transfer_done, d) == 0) d->transfer_busy = 1;
    }
}

static void ready_timer_cb(uv_timer_t *t)
{
    struct daemon *d = t->data;

    if (d->stopping) return;
    ckpt_mgr_poll(d->n.ckpt);
    check_ready(d);
    if (!rep_is_started(d->n.rep)) return;
    identity_update(d);
    update_leader_hint(d);
    maybe_propose_nodeinfo(d);
    check_disk(d);
}

static void role_cb(void *arg, int is_leader)
{
    struct daemon *d = arg;

    if (d->stopping) return;
    update_leader_hint(d);
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

static void begin_shutdown(struct daemon *d, const char *why);

/* This node is no longer a member: record it, stop serving, exit. */
static void node_leave(struct node *n, const char *why)
{
    struct daemon *d = n->daemon;

    if (d->stopping) return;
    cf_crit("%s: marking %s removed and stopping", why, d->cfg.data_dir);
    d->identity_removed = 1;
    identity_write(d);
    n->state = "removed";
    begin_shutdown(d, why);
}

static void removed_cb(void *arg)
{
    struct daemon *d = arg;
    node_leave(&d->n, "removed from the group");
}

static int node_start_raft(struct node *n, int bootstrap, char *err, size_t errlen)
{
    struct daemon *d = n->daemon;

    if (d->stopping) {
        snprintf(err, errlen, "node is stopping");
        return -1;
    }
    if (rep_is_started(n->rep)) {
        snprintf(err, errlen, "this node already belongs to a group");
        return -1;
    }
    if (rep_start_mode(n->rep, bootstrap, err, errlen) != 0) return -1;
    n->state = "member";
    cf_notice("%s", bootstrap ? "bootstrapped a new group (this node is its only voter)"
                              : "Raft started: waiting for the leader to add this node");
    return 0;
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
    if (identity_check(d, err, sizeof err) != 0) goto fail_msg;
    snprintf(path, sizeof path, "%s/raft", d->cfg.data_dir);
    if (mkdir_0700(path, err, sizeof err) != 0) goto fail_msg;
    snprintf(path, sizeof path, "%s/lmdb", d->cfg.data_dir);
    if (mkdir_0700(path, err, sizeof err) != 0) goto fail_msg;
    if (store_open(path, d->cfg.map_size, &d->n.store, err, sizeof err) != 0) goto fail_msg;
    if (identity_check_store(d, err, sizeof err) != 0) goto fail_msg_store;
    {
        uint64_t other = store_node_find_raft(d->n.store, d->cfg.raft_address, d->cfg.node_id);
        if (other != 0) {
            snprintf(err, sizeof err,
                     "Raft address %s belongs to member %" PRIu64 " of this group, not to node "
                     "%" PRIu64 " (check raft.address and node.id)",
                     d->cfg.raft_address, other, d->cfg.node_id);
            goto fail_msg_store;
        }
    }

    {
        struct ckpt_mgr_config cc;
        memset(&cc, 0, sizeof cc);
        snprintf(path, sizeof path, "%s/checkpoints", d->cfg.data_dir);
        cc.dir = path;
        cc.keep = (unsigned)d->cfg.checkpoints_kept;
        cc.ca_file = d->cfg.tls_ca;
        cc.secret = d->cfg.admin_secret;
        cc.rate_bytes = d->cfg.checkpoint_rate;
        cc.min_free_bytes = d->cfg.min_free_disk;
        d->n.ckpt = ckpt_mgr_create(d->n.store, &cc, err, sizeof err);
        if (d->n.ckpt == NULL) goto fail_msg_store;
    }

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
    rc.snapshot_bytes = d->cfg.snapshot_bytes;
    rc.max_entry_bytes = d->cfg.max_message + d->cfg.max_message / 2 + ENTRY_OVERHEAD;
    d->n.rep = rep_create(&d->loop, &rc, &node_fsm_ops, &d->n, err, sizeof err);
    if (d->n.rep == NULL) goto fail_loop;
    rep_set_role_cb(d->n.rep, role_cb, d);
    rep_set_removed_cb(d->n.rep, removed_cb, d);
    d->n.daemon = d;
    d->n.start_raft = node_start_raft;
    d->n.leave = node_leave;
    if (!d->cfg.raft_bootstrap && rep_dir_is_new(path)) {
        /* Neither bootstrapped nor joined yet: wait for the operator. */
        d->n.state = "uninitialised";
        cf_notice("uninitialised node %" PRIu64 ": waiting for `cofferctl group bootstrap` or "
                  "`cofferctl node add` (Raft not started)",
                  d->cfg.node_id);
    } else {
        if (rep_start(d->n.rep, err, sizeof err) != 0) goto fail_loop;
        d->n.state = "member";
    }
    if (start_listeners(d, err, sizeof err) != 0) goto fail_loop;
    d->listening = 1;
    /* One line on stderr that cluster harnesses wait for (every node, also
     * followers and uninitialised ones). */
    fprintf(stderr, "coffer-store listening: node=%" PRIu64 " state=%s admin=%s\n", d->cfg.node_id,
            d->n.state, d->ls[L_ADMIN].active ? d->ls[L_ADMIN].bound : "-");
    fflush(stderr);

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
    ckpt_mgr_destroy(&d->n.ckpt);
    store_close(&d->n.store);
    free_tls(d);
    sconf_free(&d->cfg);
    cf_info("stopped");
    return exit_code;

fail_msg_store:
    ckpt_mgr_destroy(&d->n.ckpt);
    store_close(&d->n.store);
fail_msg:
    cf_error("%s", err);
    fprintf(stderr, "coffer-store: %s\n", err);
out_cfg:
    free_tls(d);
    sconf_free(&d->cfg);
    return exit_code;
}
