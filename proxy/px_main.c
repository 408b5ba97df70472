/* coffer-mmp: the stateless IMAP/POP3 proxy in front of coffer-store
 * groups. One libuv loop thread runs everything. See docs/coffer-mmp.md. */
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#include <systemd/sd-daemon.h>
#include <uv.h>

#include "cf_conn.h"
#include "cf_log.h"
#include "px_config.h"
#include "px_server.h"
#include "px_tls.h"

#define PX_VERSION "0.1"

static const char *lname[PX_L_COUNT] = {"imap", "imaps", "pop3", "pop3s"};

struct listener {
    uv_tcp_t tcp;
    int kind;
    int active;
    char addr[128];
    struct px_server *srv;
};

static struct {
    struct px_server srv;
    struct listener l[PX_L_COUNT];
    uv_signal_t sigterm, sigint, sighup;
    uv_timer_t ticket_timer, expiry_timer;
    const char *config_path;
} g;

static void usage(FILE *out)
{
    fprintf(out, "usage: coffer-mmp --config FILE [--check-config]\n"
                 "       coffer-mmp --help | --version\n"
                 "\n"
                 "coffer-mmp is Coffer's stateless IMAP/POP3 proxy: it terminates TLS, handles\n"
                 "the pre-authentication phase, throttles failed logins, routes each user to\n"
                 "the leader of their store group and splices the session through.\n"
                 "\n"
                 "  --config FILE    configuration file (INI); see docs/coffer-mmp.md\n"
                 "  --check-config   load and check the configuration (and TLS files), then exit\n"
                 "  --help           this text, with every configuration key and its default\n"
                 "  --version        print the version\n"
                 "\n"
                 "Signals: SIGHUP reloads the configuration and certificates (established\n"
                 "sessions are kept); SIGTERM/SIGINT stop (sessions get BYE / -ERR).\n"
                 "Sections [node NAME] (one per store node) and [sni NAME] (one per extra\n"
                 "certificate) may repeat.\n\nConfiguration keys:\n");
    px_conf_print_keys(out);
}

static void on_connection(uv_stream_t *server, int status)
{
    struct listener *l = server->data;
    if (status < 0) {
        cf_warn("%s listener: accept error: %s", lname[l->kind], uv_strerror(status));
        return;
    }
    px_session_accept(l->srv, server, l->kind);
}

/* systemd socket activation: a passed socket serves the listener named by
 * FileDescriptorName= (imap, imaps, pop3, pop3s) or, unnamed, the one whose
 * configured address it is bound to. */
static int activated_fd_for(int kind, const char *addr, int n, char **names)
{
    char host[256];
    int port;
    struct sockaddr_storage want;
    if (cf_parse_host_port(addr, host, sizeof(host), &port) < 0) return -1;
    memset(&want, 0, sizeof(want));
    int have_want = uv_ip4_addr(host, port, (struct sockaddr_in *)&want) == 0 ||
                    uv_ip6_addr(host, port, (struct sockaddr_in6 *)&want) == 0;
    for (int i = 0; i < n; i++) {
        int fd = SD_LISTEN_FDS_START + i;
        if (names && names[i] && strcmp(names[i], lname[kind]) == 0) return fd;
        if (names && names[i] && strcmp(names[i], "unknown") != 0) continue;
        struct sockaddr_storage ss;
        socklen_t sl = sizeof(ss);
        if (!have_want || getsockname(fd, (struct sockaddr *)&ss, &sl) != 0) continue;
        if (ss.ss_family != want.ss_family) continue;
        if (ss.ss_family == AF_INET) {
            struct sockaddr_in *a = (struct sockaddr_in *)&ss, *b = (struct sockaddr_in *)&want;
            if (a->sin_port == b->sin_port && a->sin_addr.s_addr == b->sin_addr.s_addr) return fd;
        } else if (ss.ss_family == AF_INET6) {
            struct sockaddr_in6 *a = (struct sockaddr_in6 *)&ss, *b = (struct sockaddr_in6 *)&want;
            if (a->sin6_port == b->sin6_port &&
                memcmp(&a->sin6_addr, &b->sin6_addr, sizeof(a->sin6_addr)) == 0)
                return fd;
        }
    }
    return -1;
}

static int open_listeners(void)
{
    char **names = NULL;
    int n = sd_listen_fds_with_names(1, &names);
    if (n < 0) n = 0;
    int rc = 0;
    for (int k = 0; k < PX_L_COUNT; k++) {
        struct listener *l = &g.l[k];
        const char *addr = g.srv.conf->l[k].listen;
        l->kind = k;
        l->srv = &g.srv;
        snprintf(l->addr, sizeof(l->addr), "%s", addr);
        if (!*addr) continue;
        int fd = n > 0 ? activated_fd_for(k, addr, n, names) : -1;
        char err[300];
        if (fd >= 0) {
            uv_tcp_init(g.srv.loop, &l->tcp);
            int r = uv_tcp_open(&l->tcp, fd);
            if (r == 0) r = uv_listen((uv_stream_t *)&l->tcp, 1024, on_connection);
            if (r != 0) {
                cf_error("%s listener: socket-activated fd %d: %s", lname[k], fd, uv_strerror(r));
                uv_close((uv_handle_t *)&l->tcp, NULL);
                rc = -1;
                continue;
            }
            cf_info("%s listener: using socket-activated fd %d for %s", lname[k], fd, addr);
        } else if (cf_listen_tcp(g.srv.loop, &l->tcp, addr, 1024, on_connection, err,
                                 sizeof(err)) != 0) {
            cf_error("%s listener: %s", lname[k], err);
            rc = -1;
            continue;
        }
        l->tcp.data = l;
        l->active = 1;
    }
    if (names) {
        for (int i = 0; i < n; i++)
            free(names[i]);
        free(names);
    }
    return rc;
}

static void close_listeners(void)
{
    for (int k = 0; k < PX_L_COUNT; k++) {
        if (!g.l[k].active) continue;
        g.l[k].active = 0;
        uv_close((uv_handle_t *)&g.l[k].tcp, NULL);
    }
}

static void set_log_level(const struct px_conf *c)
{
    enum cf_log_level lv = CF_LOG_INFO;
    cf_log_level_parse(c->log_level, &lv);
    cf_log_init("coffer-mmp", lv, 1);
}

static void ticket_cb(uv_timer_t *t)
{
    (void)t;
    if (px_tls_rotate_ticket_keys() < 0)
        cf_error("tls: ticket key rotation failed (keeping the current key)");
    else
        cf_info("tls: session ticket keys rotated");
}

static void expiry_cb(uv_timer_t *t)
{
    (void)t;
    px_tls_check_expiry(g.srv.tls, (unsigned)g.srv.conf->tls_expiry_warn_days);
}

static void start_timers(void)
{
    uint64_t tl = g.srv.conf->tls_ticket_lifetime_ms, ex = g.srv.conf->tls_expiry_check_ms;
    uv_timer_start(&g.ticket_timer, ticket_cb, tl, tl);
    uv_timer_start(&g.expiry_timer, expiry_cb, ex, ex);
}

static void reload(void)
{
    char err[512];
    struct px_conf *nc = px_conf_load(g.config_path, err, sizeof(err));
    if (nc == NULL) {
        cf_error("reload: %s; keeping the running configuration", err);
        return;
    }
    struct px_tls *nt = px_tls_new(nc, err, sizeof(err));
    if (nt == NULL) {
        cf_error("reload: %s; keeping the running configuration", err);
        px_conf_free(&nc);
        return;
    }
    struct px_router *nr = px_router_new(nc);
    if (nr == NULL || px_throttle_set_conf(g.srv.throttle, &nc->throttle) < 0) {
        cf_error("reload: out of memory; keeping the running configuration");
        px_router_free(&nr);
        px_tls_unref(&nt);
        px_conf_free(&nc);
        return;
    }
    for (int k = 0; k < PX_L_COUNT; k++)
        if (strcmp(nc->l[k].listen, g.l[k].addr) != 0)
            cf_warn("reload: %s.listen changed (%s -> %s): takes effect after a restart", lname[k],
                    g.l[k].addr, nc->l[k].listen);
    px_tls_unref(&g.srv.tls);
    g.srv.tls = nt;
    px_router_free(&g.srv.router);
    g.srv.router = nr;
    px_conf_free(&g.srv.conf);
    g.srv.conf = nc;
    set_log_level(nc);
    start_timers();
    px_tls_check_expiry(nt, (unsigned)nc->tls_expiry_warn_days);
    cf_notice("configuration and certificates reloaded from %s (%llu sessions kept)", g.config_path,
              (unsigned long long)g.srv.n_conns);
    sd_notify(0, "READY=1");
}

static void walk_close(uv_handle_t *h, void *arg)
{
    (void)arg;
    if (!uv_is_closing(h)) uv_close(h, NULL);
}

static void on_signal(uv_signal_t *s, int signum)
{
    (void)s;
    if (signum == SIGHUP) {
        sd_notify(0, "RELOADING=1");
        reload();
        return;
    }
    if (g.srv.stopping) return;
    g.srv.stopping = 1;
    sd_notify(0, "STOPPING=1");
    cf_notice("coffer-mmp stopping (signal %d); %llu connections", signum,
              (unsigned long long)g.srv.n_conns);
    close_listeners();
    px_session_close_all(&g.srv, "Server shutting down.");
    uv_timer_stop(&g.ticket_timer);
    uv_timer_stop(&g.expiry_timer);
    uv_close((uv_handle_t *)&g.ticket_timer, NULL);
    uv_close((uv_handle_t *)&g.expiry_timer, NULL);
    uv_close((uv_handle_t *)&g.sigterm, NULL);
    uv_close((uv_handle_t *)&g.sigint, NULL);
    uv_close((uv_handle_t *)&g.sighup, NULL);
}

int main(int argc, char **argv)
{
    int check_only = 0;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--config") == 0 && i + 1 < argc) {
            g.config_path = argv[++i];
        } else if (strcmp(argv[i], "--check-config") == 0) {
            check_only = 1;
        } else if (strcmp(argv[i], "--help") == 0 || strcmp(argv[i], "-h") == 0) {
            usage(stdout);
            return 0;
        } else if (strcmp(argv[i], "--version") == 0) {
            printf("coffer-mmp %s\n", PX_VERSION);
            return 0;
        } else {
            usage(stderr);
            return 2;
        }
    }
    if (g.config_path == NULL) {
        usage(stderr);
        return 2;
    }
    cf_log_init("coffer-mmp", CF_LOG_INFO, 1);
    char err[512];
    g.srv.conf = px_conf_load(g.config_path, err, sizeof(err));
    if (g.srv.conf == NULL) {
        cf_crit("configuration %s: %s", g.config_path, err);
        return 1;
    }
    set_log_level(g.srv.conf);
    g.srv.tls = px_tls_new(g.srv.conf, err, sizeof(err));
    if (g.srv.tls == NULL) {
        cf_crit("%s", err);
        px_conf_free(&g.srv.conf);
        return 1;
    }
    if (check_only) {
        px_tls_check_expiry(g.srv.tls, (unsigned)g.srv.conf->tls_expiry_warn_days);
        printf("configuration OK\n");
        px_tls_unref(&g.srv.tls);
        px_conf_free(&g.srv.conf);
        return 0;
    }
    g.srv.loop = uv_default_loop();
    g.srv.router = px_router_new(g.srv.conf);
    g.srv.throttle = px_throttle_new(&g.srv.conf->throttle);
    g.srv.conns = px_conncount_new(g.srv.conf->max_connections);
    if (g.srv.router == NULL || g.srv.throttle == NULL || g.srv.conns == NULL) {
        cf_crit("out of memory");
        return 1;
    }
    /* room for max_connections clients plus their backend connections */
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0) {
        rlim_t want = (rlim_t)(2 * g.srv.conf->max_connections + 64);
        if (rl.rlim_cur < want) {
            rl.rlim_cur = want < rl.rlim_max ? want : rl.rlim_max;
            setrlimit(RLIMIT_NOFILE, &rl);
        }
    }
    if (open_listeners() < 0) {
        cf_crit("cannot open listeners");
        return 1;
    }
    uv_timer_init(g.srv.loop, &g.ticket_timer);
    uv_timer_init(g.srv.loop, &g.expiry_timer);
    start_timers();
    px_tls_check_expiry(g.srv.tls, (unsigned)g.srv.conf->tls_expiry_warn_days);
    uv_signal_init(g.srv.loop, &g.sigterm);
    uv_signal_init(g.srv.loop, &g.sigint);
    uv_signal_init(g.srv.loop, &g.sighup);
    uv_signal_start(&g.sigterm, on_signal, SIGTERM);
    uv_signal_start(&g.sigint, on_signal, SIGINT);
    uv_signal_start(&g.sighup, on_signal, SIGHUP);

    fprintf(stderr, "coffer-mmp ready:");
    for (int k = 0; k < PX_L_COUNT; k++)
        if (g.l[k].active) fprintf(stderr, " %s=%s", lname[k], g.l[k].addr);
    fprintf(stderr, " nodes=%zu\n", g.srv.conf->n_nodes);
    fflush(stderr);
    sd_notify(0, "READY=1");

    uv_run(g.srv.loop, UV_RUN_DEFAULT);
    uv_walk(g.srv.loop, walk_close, NULL);
    uv_run(g.srv.loop, UV_RUN_DEFAULT);
    int rc = uv_loop_close(g.srv.loop);
    if (rc != 0) cf_warn("loop close: %s", uv_strerror(rc));
    px_router_free(&g.srv.router);
    px_throttle_free(&g.srv.throttle);
    px_conncount_free(&g.srv.conns);
    px_tls_unref(&g.srv.tls);
    px_conf_free(&g.srv.conf);
    px_tls_cleanup();
    cf_notice("coffer-mmp stopped");
    return 0;
}
