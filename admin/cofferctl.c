/* cofferctl: the operator's CLI over the admin RPC (proto/coffer_admin.proto).
 * Links only coffer_common and coffer_proto: it reaches nodes over TLS,
 * never through storenode code. Blocking OpenSSL client; one request per
 * run. Exit status: 0 ok, 1 error (printed on stderr), 2 usage error.
 * The help text below is reproduced in docs/cofferctl.md: keep both in step. */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <ifaddrs.h>
#include <netinet/in.h>
#include <termios.h>
#include <unistd.h>

#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>

#include "cf_config.h"
#include "cf_frame.h"
#include "cf_tls.h"
#include "coffer_admin.pb-c.h"

#define CTL_DEFAULT_SERVER "127.0.0.1:7443"
#define CTL_IO_TIMEOUT_S 120
#define CTL_MAX_SECRET 1024
#define CTL_MAX_PASSWORD 1024

static const char usage_text[] =
    "Usage: cofferctl [OPTIONS] COMMAND [ARGS]\n"
    "\n"
    "Administer a Coffer store node over its admin RPC (TLS).\n"
    "\n"
    "Options:\n"
    "  --server HOST:PORT   admin endpoint (default 127.0.0.1:7443)\n"
    "  --ca FILE            CA certificate(s) that verify the server (default: system store)\n"
    "  --cert FILE          client certificate (with --key)\n"
    "  --key FILE           client private key (refused if group/world readable)\n"
    "  --secret-file FILE   file holding the admin secret (refused if group/world readable)\n"
    "  --tls-name NAME      name or IP address to verify in the server certificate\n"
    "                       (default: the host part of --server)\n"
    "  --config FILE        INI file with a [ctl] section: server, ca, cert, key,\n"
    "                       secret_file, tls_name (command-line options win)\n"
    "  --json               machine-readable output (status)\n"
    "  --standby            node add: add as a non-voting standby\n"
    "  --help               show this help and exit\n"
    "\n"
    "Commands:\n"
    "  user add NAME [--password PASS]     create a user with INBOX, Drafts, Sent,\n"
    "                                      Trash and Junk (password read from stdin\n"
    "                                      when --password is not given)\n"
    "  user passwd NAME [--password PASS]  change a user's password\n"
    "  user disable NAME [--reason TEXT]   refuse the user's logins (reason shown)\n"
    "  user enable NAME                    allow logins again\n"
    "  user delete NAME                    delete a user and all their mail\n"
    "  user list                           list users with usage and quotas\n"
    "  mailbox list USER                   list a user's mailboxes\n"
    "  status [--json]                     node and group status: every member's id,\n"
    "                                      address, role, term, commit/applied index,\n"
    "                                      last snapshot, digest (members are asked\n"
    "                                      over their admin RPC)\n"
    "  group bootstrap                     make the (uninitialised) --server node the\n"
    "                                      only voter of a new group\n"
    "  node add ADMIN_ADDR [--standby]     add the uninitialised node whose admin RPC\n"
    "                                      is ADMIN_ADDR (voter, or standby)\n"
    "  node remove ID                      remove a member; the node is told to stop\n"
    "  leader transfer [ID]                hand leadership to node ID (default: the\n"
    "                                      most up-to-date voter)\n"
    "  Membership commands go to the leader: --server may name any member.\n"
    "  quota set USER [--storage SIZE] [--messages N]\n"
    "                                      set quotas (0 = unlimited; SIZE like 500M)\n"
    "\n"
    "Exit status: 0 success, 1 error (message on stderr), 2 usage error.\n";

struct ctl_opts {
    const char *server, *ca, *cert, *key, *secret_file, *tls_name, *config;
    const char *password, *reason, *storage, *messages;
    int json;
    int standby;
    const char *pos[8];
    int npos;
};

/* Print "cofferctl: <msg><arg>" and the help hint; returns 2. */
static int usage_error(const char *msg, const char *arg)
{
    fprintf(stderr, "cofferctl: %s%s\nTry 'cofferctl --help'.\n", msg, arg ? arg : "");
    return 2;
}

/* ---- options and config ---- */

static int parse_args(int argc, char **argv, struct ctl_opts *o)
{
    static const struct {
        const char *name;
        size_t off;
    } valued[] = {
        {"--server", offsetof(struct ctl_opts, server)},
        {"--ca", offsetof(struct ctl_opts, ca)},
        {"--cert", offsetof(struct ctl_opts, cert)},
        {"--key", offsetof(struct ctl_opts, key)},
        {"--secret-file", offsetof(struct ctl_opts, secret_file)},
        {"--tls-name", offsetof(struct ctl_opts, tls_name)},
        {"--config", offsetof(struct ctl_opts, config)},
        {"--password", offsetof(struct ctl_opts, password)},
        {"--reason", offsetof(struct ctl_opts, reason)},
        {"--storage", offsetof(struct ctl_opts, storage)},
        {"--messages", offsetof(struct ctl_opts, messages)},
    };
    int only_pos = 0;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!only_pos && strcmp(a, "--") == 0) {
            only_pos = 1;
            continue;
        }
        if (!only_pos && strncmp(a, "--", 2) == 0) {
            const char *eq = strchr(a, '=');
            size_t nlen = eq ? (size_t)(eq - a) : strlen(a);
            size_t k;
            if (nlen == 6 && strncmp(a, "--help", 6) == 0 && !eq) {
                fputs(usage_text, stdout);
                exit(0);
            }
            if (nlen == 6 && strncmp(a, "--json", 6) == 0 && !eq) {
                o->json = 1;
                continue;
            }
            if (nlen == 9 && strncmp(a, "--standby", 9) == 0 && !eq) {
                o->standby = 1;
                continue;
            }
            for (k = 0; k < sizeof(valued) / sizeof(valued[0]); k++)
                if (strlen(valued[k].name) == nlen && strncmp(a, valued[k].name, nlen) == 0) break;
            if (k == sizeof(valued) / sizeof(valued[0])) return usage_error("unknown option ", a);
            const char *val;
            if (eq) {
                val = eq + 1;
            } else {
                if (i + 1 >= argc) return usage_error("missing value for option ", a);
                val = argv[++i];
            }
            *(const char **)((char *)o + valued[k].off) = val;
            continue;
        }
        if (o->npos == (int)(sizeof(o->pos) / sizeof(o->pos[0])))
            return usage_error("too many arguments", NULL);
        o->pos[o->npos++] = a;
    }
    return 0;
}

static int config_key_cb(const char *section, const char *key, const char *value, void *arg)
{
    static const char *const known[] = {"server", "ca", "cert", "key", "secret_file", "tls_name"};
    (void)value;
    (void)arg;
    if (strcmp(section, "ctl") != 0) return 0; /* other sections belong to other programs */
    for (size_t i = 0; i < sizeof(known) / sizeof(known[0]); i++)
        if (strcmp(key, known[i]) == 0) return 0;
    fprintf(stderr, "cofferctl: unknown key ctl.%s in config\n", key);
    return 1;
}

/* Fill options not given on the command line from [ctl]. The returned
 * config owns the strings and must outlive the options. */
static int apply_config(struct ctl_opts *o, struct cf_config **cfg_r)
{
    char err[256];
    struct cf_config *cfg;
    *cfg_r = NULL;
    if (o->config == NULL) return 0;
    cfg = cf_config_load(o->config, err, sizeof(err));
    if (cfg == NULL) {
        fprintf(stderr, "cofferctl: %s\n", err);
        return 2;
    }
    if (cf_config_foreach(cfg, config_key_cb, NULL) != 0) {
        cf_config_free(&cfg);
        return 2;
    }
#define FROM_CFG(field, key)                                                                       \
    if (o->field == NULL) o->field = cf_config_get(cfg, "ctl", key);
    FROM_CFG(server, "server")
    FROM_CFG(ca, "ca")
    FROM_CFG(cert, "cert")
    FROM_CFG(key, "key")
    FROM_CFG(secret_file, "secret_file")
    FROM_CFG(tls_name, "tls_name")
#undef FROM_CFG
    *cfg_r = cfg;
    return 0;
}

/* Read the admin secret: first line of the file, trailing whitespace cut. */
static int read_secret(const char *path, char *out, size_t cap)
{
    struct stat st;
    ssize_t k;
    size_t len = 0;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        fprintf(stderr, "cofferctl: cannot open secret file %s: %s\n", path, strerror(errno));
        return -1;
    }
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
        fprintf(stderr, "cofferctl: secret file %s is not a regular file\n", path);
        close(fd);
        return -1;
    }
    if (st.st_mode & 077) {
        fprintf(stderr, "cofferctl: secret file %s is readable by group or others (chmod 600)\n",
                path);
        close(fd);
        return -1;
    }
    while (len < cap - 1 && (k = read(fd, out + len, cap - 1 - len)) > 0)
        len += (size_t)k;
    close(fd);
    out[len] = '\0';
    char *nl = strpbrk(out, "\r\n");
    if (nl) *nl = '\0';
    len = strlen(out);
    while (len > 0 && (out[len - 1] == ' ' || out[len - 1] == '\t'))
        out[--len] = '\0';
    if (len == 0) {
        fprintf(stderr, "cofferctl: secret file %s is empty\n", path);
        return -1;
    }
    return 0;
}

/* One line from stdin (no echo on a terminal). Returns malloc()ed or NULL. */
static char *read_password(void)
{
    struct termios old, noecho;
    int tty = isatty(STDIN_FILENO);
    char *line = NULL;
    size_t cap = 0;
    ssize_t k;
    if (tty) {
        fprintf(stderr, "Password: ");
        if (tcgetattr(STDIN_FILENO, &old) == 0) {
            noecho = old;
            noecho.c_lflag &= ~(tcflag_t)ECHO;
            tcsetattr(STDIN_FILENO, TCSAFLUSH, &noecho);
        } else {
            tty = 0;
        }
    }
    k = getline(&line, &cap, stdin);
    if (tty) {
        tcsetattr(STDIN_FILENO, TCSAFLUSH, &old);
        fprintf(stderr, "\n");
    }
    if (k < 0) {
        free(line);
        return NULL;
    }
    while (k > 0 && (line[k - 1] == '\n' || line[k - 1] == '\r'))
        line[--k] = '\0';
    return line;
}

/* ---- connection ---- */

static int split_hostport(const char *s, char *host, size_t hcap, char *port, size_t pcap)
{
    const char *colon;
    size_t hl;
    if (s[0] == '[') {
        const char *rb = strchr(s, ']');
        if (rb == NULL || rb[1] != ':') return -1;
        hl = (size_t)(rb - s - 1);
        if (hl == 0 || hl >= hcap) return -1;
        memcpy(host, s + 1, hl);
        host[hl] = '\0';
        colon = rb + 1;
    } else {
        colon = strrchr(s, ':');
        if (colon == NULL) return -1;
        hl = (size_t)(colon - s);
        if (hl == 0 || hl >= hcap) return -1;
        memcpy(host, s, hl);
        host[hl] = '\0';
    }
    if (strlen(colon + 1) == 0 || strlen(colon + 1) >= pcap) return -1;
    strcpy(port, colon + 1);
    for (const char *p = port; *p; p++)
        if (*p < '0' || *p > '9') return -1;
    return 0;
}

static int tcp_connect(const char *host, const char *port)
{
    struct addrinfo hints, *res = NULL, *ai;
    int fd = -1, rc;
    struct timeval tv = {.tv_sec = CTL_IO_TIMEOUT_S};
    memset(&hints, 0, sizeof(hints));
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    rc = getaddrinfo(host, port, &hints, &res);
    if (rc != 0) {
        fprintf(stderr, "cofferctl: cannot resolve %s: %s\n", host, gai_strerror(rc));
        return -1;
    }
    for (ai = res; ai != NULL; ai = ai->ai_next) {
        fd = socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC, ai->ai_protocol);
        if (fd < 0) continue;
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
        setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
        if (connect(fd, ai->ai_addr, ai->ai_addrlen) == 0) break;
        rc = errno;
        close(fd);
        fd = -1;
        errno = rc;
    }
    if (fd < 0)
        fprintf(stderr, "cofferctl: cannot connect to %s port %s: %s\n", host, port,
                strerror(errno));
    freeaddrinfo(res);
    return fd;
}

struct ctl_conn {
    SSL_CTX *ctx;
    SSL *ssl;
    int fd;
};

static void ctl_disconnect(struct ctl_conn *cc)
{
    if (cc->ssl) {
        SSL_shutdown(cc->ssl);
        SSL_free(cc->ssl);
    }
    if (cc->ctx) SSL_CTX_free(cc->ctx);
    if (cc->fd >= 0) close(cc->fd);
    cc->ssl = NULL;
    cc->ctx = NULL;
    cc->fd = -1;
}

static int ctl_connect_to(const struct ctl_opts *o, const char *server, struct ctl_conn *cc);

static int ctl_connect(const struct ctl_opts *o, struct ctl_conn *cc)
{
    return ctl_connect_to(o, o->server ? o->server : CTL_DEFAULT_SERVER, cc);
}

static int ctl_connect_to(const struct ctl_opts *o, const char *server, struct ctl_conn *cc)
{
    char host[256], port[16], err[256];
    const char *name;
    unsigned char ipbuf[16];

    cc->fd = -1;
    cc->ctx = NULL;
    cc->ssl = NULL;
    if (split_hostport(server, host, sizeof(host), port, sizeof(port)) != 0) {
        fprintf(stderr, "cofferctl: bad --server %s (want HOST:PORT or [V6]:PORT)\n", server);
        return -1;
    }
    if ((o->cert == NULL) != (o->key == NULL)) {
        fprintf(stderr, "cofferctl: --cert and --key go together\n");
        return -1;
    }
    name = o->tls_name ? o->tls_name : host;
    cc->ctx = cf_tls_client_ctx(o->ca, o->cert, o->key, err, sizeof(err));
    if (cc->ctx == NULL) {
        fprintf(stderr, "cofferctl: TLS setup: %s\n", err);
        return -1;
    }
    cc->fd = tcp_connect(host, port);
    if (cc->fd < 0) goto fail;
    cc->ssl = SSL_new(cc->ctx);
    if (cc->ssl == NULL || SSL_set_fd(cc->ssl, cc->fd) != 1) goto tls_fail;
    SSL_set_verify(cc->ssl, SSL_VERIFY_PEER, NULL);
    if (inet_pton(AF_INET, name, ipbuf) == 1 || inet_pton(AF_INET6, name, ipbuf) == 1) {
        if (X509_VERIFY_PARAM_set1_ip_asc(SSL_get0_param(cc->ssl), name) != 1) goto tls_fail;
    } else {
        if (SSL_set1_host(cc->ssl, name) != 1) goto tls_fail;
        SSL_set_tlsext_host_name(cc->ssl, name);
    }
    if (SSL_connect(cc->ssl) != 1) {
        long vr = SSL_get_verify_result(cc->ssl);
        cf_tls_errstr(err, sizeof(err));
        fprintf(stderr, "cofferctl: TLS handshake with %s failed: %s%s%s\n", server, err,
                vr != X509_V_OK ? "; certificate: " : "",
                vr != X509_V_OK ? X509_verify_cert_error_string(vr) : "");
        goto fail;
    }
    if (SSL_get_verify_result(cc->ssl) != X509_V_OK) {
        fprintf(stderr, "cofferctl: server certificate not verified\n");
        goto fail;
    }
    return 0;
tls_fail:
    cf_tls_errstr(err, sizeof(err));
    fprintf(stderr, "cofferctl: TLS setup: %s\n", err);
fail:
    ctl_disconnect(cc);
    return -1;
}

/* Send one request, return the response (caller frees) or NULL. */
static Coffer__AdminResponse *ctl_call(struct ctl_conn *cc, const Coffer__AdminRequest *req)
{
    size_t len = coffer__admin_request__get_packed_size(req);
    uint8_t *buf = malloc(len ? len : 1), *rbuf = NULL;
    size_t rlen = 0;
    Coffer__AdminResponse *resp = NULL;
    if (buf == NULL) return NULL;
    coffer__admin_request__pack(req, buf);
    if (cf_frame_ssl_write(cc->ssl, buf, len) != 0) {
        fprintf(stderr, "cofferctl: sending the request failed\n");
        goto out;
    }
    if (cf_frame_ssl_read(cc->ssl, CF_FRAME_MAX_DEFAULT, &rbuf, &rlen) != 0) {
        fprintf(stderr, "cofferctl: no response from the server\n");
        goto out;
    }
    resp = coffer__admin_response__unpack(NULL, rlen, rbuf);
    if (resp == NULL) fprintf(stderr, "cofferctl: malformed response from the server\n");
out:
    if (buf) {
        OPENSSL_cleanse(buf, len);
        free(buf);
    }
    free(rbuf);
    return resp;
}

/* ---- output ---- */

static void json_str(FILE *f, const char *s)
{
    fputc('"', f);
    for (const unsigned char *p = (const unsigned char *)(s ? s : ""); *p; p++) {
        if (*p == '"' || *p == '\\')
            fprintf(f, "\\%c", *p);
        else if (*p < 0x20)
            fprintf(f, "\\u%04x", *p);
        else
            fputc(*p, f);
    }
    fputc('"', f);
}

/* Is host (numeric or name) an address of this machine? */
static int host_is_local(const char *hostport)
{
    char host[256], port[16];
    struct addrinfo hints, *res = NULL, *ai;
    struct ifaddrs *ifs = NULL, *i;
    int local = 0;

    if (hostport == NULL || split_hostport(hostport, host, sizeof(host), port, sizeof(port)) != 0)
        return 0;
    memset(&hints, 0, sizeof(hints));
    hints.ai_socktype = SOCK_STREAM;
    if (getaddrinfo(host, NULL, &hints, &res) != 0) return 0;
    if (getifaddrs(&ifs) != 0) ifs = NULL;
    for (ai = res; ai != NULL && !local; ai = ai->ai_next) {
        if (ai->ai_family == AF_INET) {
            const struct sockaddr_in *a = (const struct sockaddr_in *)ai->ai_addr;
            if ((ntohl(a->sin_addr.s_addr) >> 24) == 127) local = 1;
            for (i = ifs; i != NULL && !local; i = i->ifa_next)
                if (i->ifa_addr && i->ifa_addr->sa_family == AF_INET &&
                    ((const struct sockaddr_in *)i->ifa_addr)->sin_addr.s_addr ==
                        a->sin_addr.s_addr)
                    local = 1;
        } else if (ai->ai_family == AF_INET6) {
            const struct sockaddr_in6 *a = (const struct sockaddr_in6 *)ai->ai_addr;
            if (IN6_IS_ADDR_LOOPBACK(&a->sin6_addr)) local = 1;
            for (i = ifs; i != NULL && !local; i = i->ifa_next)
                if (i->ifa_addr && i->ifa_addr->sa_family == AF_INET6 &&
                    memcmp(&((const struct sockaddr_in6 *)i->ifa_addr)->sin6_addr, &a->sin6_addr,
                           16) == 0)
                    local = 1;
        }
    }
    if (ifs) freeifaddrs(ifs);
    freeaddrinfo(res);
    return local;
}

static void print_status(const Coffer__NodeStatus *ns, int json)
{
    if (json) {
        FILE *f = stdout;
        fprintf(f, "{\"node_id\":%llu,\"group_id\":", (unsigned long long)ns->node_id);
        json_str(f, ns->group_id);
        fprintf(f, ",\"role\":");
        json_str(f, ns->role);
        fprintf(f, ",\"state\":");
        json_str(f, ns->state ? ns->state : "member");
        fprintf(f, ",\"term\":%llu,\"commit\":%llu,\"applied\":%llu,\"last_snapshot\":%llu",
                (unsigned long long)ns->term, (unsigned long long)ns->commit_index,
                (unsigned long long)ns->applied_index, (unsigned long long)ns->last_snapshot_index);
        fprintf(f, ",\"leader_id\":%llu,\"leader_admin\":", (unsigned long long)ns->leader_id);
        json_str(f, ns->leader_admin);
        fprintf(f, ",\"digest\":");
        json_str(f, ns->digest);
        fprintf(f,
                ",\"imap_sessions\":%llu,\"pop3_sessions\":%llu,\"users\":%llu"
                ",\"lmdb_map_size\":%llu,\"lmdb_used_bytes\":%llu,\"pid\":%u,\"version\":",
                (unsigned long long)ns->imap_sessions, (unsigned long long)ns->pop3_sessions,
                (unsigned long long)ns->users, (unsigned long long)ns->lmdb_map_size,
                (unsigned long long)ns->lmdb_used_bytes, (unsigned)ns->pid);
        json_str(f, ns->version);
        fprintf(f,
                ",\"checkpoint_applied\":%llu,\"checkpoints_installed\":%llu"
                ",\"checkpoints_taken\":%llu,\"checkpoints_served\":%llu,\"checkpoint_state\":",
                (unsigned long long)ns->checkpoint_applied,
                (unsigned long long)ns->checkpoints_installed,
                (unsigned long long)ns->checkpoints_taken,
                (unsigned long long)ns->checkpoints_served);
        json_str(f, ns->checkpoint_state ? ns->checkpoint_state : "");
        fprintf(f, ",\"members\":[");
        for (size_t i = 0; i < ns->n_members; i++) {
            const Coffer__MemberStatus *m = ns->members[i];
            fprintf(f, "%s{\"id\":%llu,\"address\":", i ? "," : "", (unsigned long long)m->id);
            json_str(f, m->address);
            fprintf(f, ",\"role\":");
            json_str(f, m->role);
            fprintf(f, ",\"term\":%llu,\"commit\":%llu,\"applied\":%llu,\"last_snapshot\":%llu",
                    (unsigned long long)m->term, (unsigned long long)m->commit,
                    (unsigned long long)m->applied, (unsigned long long)m->last_snapshot);
            fprintf(f, ",\"digest\":");
            json_str(f, m->digest);
            fprintf(f, ",\"admin_address\":");
            json_str(f, m->admin_address);
            fprintf(f, ",\"imap_address\":");
            json_str(f, m->imap_address);
            fprintf(f, ",\"reachable\":%s", m->reachable ? "true" : "false");
            if (m->has_pid && m->pid) fprintf(f, ",\"pid\":%u", (unsigned)m->pid);
            fprintf(f, "}");
        }
        fprintf(f, "]}\n");
        return;
    }
    printf("node id:        %llu\n", (unsigned long long)ns->node_id);
    printf("group id:       %s\n", ns->group_id && ns->group_id[0] ? ns->group_id : "-");
    printf("role:           %s\n", ns->role ? ns->role : "");
    printf("term:           %llu\n", (unsigned long long)ns->term);
    printf("commit index:   %llu\n", (unsigned long long)ns->commit_index);
    printf("applied index:  %llu\n", (unsigned long long)ns->applied_index);
    printf("last snapshot:  %llu\n", (unsigned long long)ns->last_snapshot_index);
    if (ns->checkpoint_state != NULL)
        printf("checkpoints:    newest at %llu, %s; taken %llu, installed %llu, served %llu\n",
               (unsigned long long)ns->checkpoint_applied, ns->checkpoint_state,
               (unsigned long long)ns->checkpoints_taken,
               (unsigned long long)ns->checkpoints_installed,
               (unsigned long long)ns->checkpoints_served);
    printf("digest:         %s\n", ns->digest ? ns->digest : "-");
    printf("sessions:       imap %llu, pop3 %llu\n", (unsigned long long)ns->imap_sessions,
           (unsigned long long)ns->pop3_sessions);
    printf("users:          %llu\n", (unsigned long long)ns->users);
    printf("lmdb:           %llu used of %llu map bytes\n", (unsigned long long)ns->lmdb_used_bytes,
           (unsigned long long)ns->lmdb_map_size);
    printf("pid:            %u\n", (unsigned)ns->pid);
    printf("version:        %s\n", ns->version ? ns->version : "");
    printf("\n%-4s %-22s %-10s %6s %9s %9s %9s %8s  %s\n", "ID", "ADDRESS", "ROLE", "TERM",
           "COMMIT", "APPLIED", "SNAPSHOT", "PID", "DIGEST");
    for (size_t i = 0; i < ns->n_members; i++) {
        const Coffer__MemberStatus *m = ns->members[i];
        char pid[16] = "-";
        if (m->has_pid && m->pid) snprintf(pid, sizeof(pid), "%u", (unsigned)m->pid);
        printf("%-4llu %-22s %-10s %6llu %9llu %9llu %9llu %8s  %s\n", (unsigned long long)m->id,
               m->address, m->role, (unsigned long long)m->term, (unsigned long long)m->commit,
               (unsigned long long)m->applied, (unsigned long long)m->last_snapshot, pid,
               m->reachable ? (m->digest && m->digest[0] ? m->digest : "-") : "(unreachable)");
    }
}

/* One request to `server` (NULL: --server); the response or NULL (message
 * printed unless quiet). */
static Coffer__AdminResponse *call_server(const struct ctl_opts *o, const char *server,
                                          Coffer__AdminRequest *req)
{
    struct ctl_conn cc = {.fd = -1};
    Coffer__AdminResponse *resp;
    if ((server ? ctl_connect_to(o, server, &cc) : ctl_connect(o, &cc)) != 0) return NULL;
    resp = ctl_call(&cc, req);
    ctl_disconnect(&cc);
    return resp;
}

/* Like call_server, but a "not leader" answer that names the leader's admin
 * address is retried there (once or twice, across an election). */
static Coffer__AdminResponse *call_leader(const struct ctl_opts *o, Coffer__AdminRequest *req)
{
    char target[256];
    Coffer__AdminResponse *resp = call_server(o, NULL, req);
    for (int hop = 0; hop < 3 && resp != NULL && !resp->ok && resp->leader_admin != NULL &&
                      resp->leader_admin[0] != '\0';
         hop++) {
        snprintf(target, sizeof(target), "%s", resp->leader_admin);
        coffer__admin_response__free_unpacked(resp, NULL);
        resp = call_server(o, target, req);
    }
    return resp;
}

/* Complete the members of a status with each member's own answer. The
 * answers are kept in *extra (freed by the caller). */
static void status_fan_out(const struct ctl_opts *o, Coffer__NodeStatus *ns, const char *secret,
                           Coffer__AdminResponse ***extra_r, size_t *n_extra_r)
{
    Coffer__AdminResponse **extra = calloc(ns->n_members ? ns->n_members : 1, sizeof(*extra));
    size_t n_extra = 0;
    *extra_r = extra;
    *n_extra_r = 0;
    if (extra == NULL) return;
    for (size_t i = 0; i < ns->n_members; i++) {
        Coffer__MemberStatus *m = ns->members[i];
        Coffer__AdminResponse *r;
        Coffer__AdminRequest q = COFFER__ADMIN_REQUEST__INIT;
        Coffer__StatusReq sr = COFFER__STATUS_REQ__INIT;
        if (m->id == ns->node_id) {
            m->reachable = 1;
            m->has_reachable = 1;
            if (!host_is_local(ns->admin_address)) m->has_pid = 0;
            continue;
        }
        m->has_reachable = 1;
        m->reachable = 0;
        m->has_pid = 0;
        if (m->admin_address == NULL || m->admin_address[0] == '\0') continue;
        q.secret = (char *)secret;
        q.cmd_case = COFFER__ADMIN_REQUEST__CMD_STATUS;
        q.status = &sr;
        r = call_server(o, m->admin_address, &q);
        if (r == NULL) continue;
        extra[n_extra++] = r;
        if (!r->ok || r->status == NULL || r->status->node_id != m->id) continue;
        m->reachable = 1;
        m->has_term = m->has_commit = m->has_applied = m->has_last_snapshot = 1;
        m->term = r->status->term;
        m->commit = r->status->commit_index;
        m->applied = r->status->applied_index;
        m->last_snapshot = r->status->last_snapshot_index;
        /* Strings of an unpacked message are separate malloc()s that
         * free_unpacked releases: replace them with owned copies. */
        if (r->status->digest) {
            char *dg = strdup(r->status->digest);
            if (dg) {
                free(m->digest);
                m->digest = dg;
            }
        }
        if (r->status->role) {
            char *ro = strdup(r->status->role);
            if (ro) {
                free(m->role);
                m->role = ro;
            }
        }
        if (host_is_local(m->admin_address)) {
            m->has_pid = 1;
            m->pid = r->status->pid;
        }
    }
    *n_extra_r = n_extra;
}

static void print_users(const Coffer__AdminResponse *r)
{
    printf("%-32s %-8s %10s %14s %14s %12s  %s\n", "USERNAME", "STATE", "MESSAGES", "STORAGE",
           "QUOTA_STORAGE", "QUOTA_MSGS", "REASON");
    for (size_t i = 0; i < r->n_users; i++) {
        const Coffer__UserInfo *u = r->users[i];
        char qs[24], qm[24];
        if (u->quota_storage_bytes)
            snprintf(qs, sizeof(qs), "%llu", (unsigned long long)u->quota_storage_bytes);
        else
            snprintf(qs, sizeof(qs), "unlimited");
        if (u->quota_messages)
            snprintf(qm, sizeof(qm), "%llu", (unsigned long long)u->quota_messages);
        else
            snprintf(qm, sizeof(qm), "unlimited");
        printf("%-32s %-8s %10llu %14llu %14s %12s  %s\n", u->username,
               u->disabled ? "disabled" : "active", (unsigned long long)u->messages,
               (unsigned long long)u->storage_bytes, qs, qm,
               u->disabled_reason ? u->disabled_reason : "");
    }
}

static const char *special_use_name(uint32_t su)
{
    switch (su) {
    case 1:
        return "\\All";
    case 2:
        return "\\Archive";
    case 4:
        return "\\Drafts";
    case 8:
        return "\\Flagged";
    case 16:
        return "\\Junk";
    case 32:
        return "\\Sent";
    case 64:
        return "\\Trash";
    case 0:
        return "-";
    default:
        return "(several)";
    }
}

static void print_mailboxes(const Coffer__AdminResponse *r)
{
    printf("%-32s %10s %8s %14s %11s %9s %14s %-10s %s\n", "NAME", "MESSAGES", "UNSEEN", "SIZE",
           "UIDVALIDITY", "UIDNEXT", "HIGHESTMODSEQ", "SPECIAL", "SUBSCRIBED");
    for (size_t i = 0; i < r->n_mailboxes; i++) {
        const Coffer__MailboxInfo *m = r->mailboxes[i];
        printf("%-32s %10llu %8llu %14llu %11u %9u %14llu %-10s %s\n", m->name,
               (unsigned long long)m->messages, (unsigned long long)m->unseen,
               (unsigned long long)m->size, (unsigned)m->uidvalidity, (unsigned)m->uidnext,
               (unsigned long long)m->highestmodseq, special_use_name(m->special_use),
               m->subscribed ? "yes" : "no");
    }
}

/* ---- commands ---- */

static int parse_count(const char *s, uint64_t *v_r)
{
    char *end;
    if (s == NULL || *s < '0' || *s > '9') return -1;
    errno = 0;
    unsigned long long v = strtoull(s, &end, 10);
    if (errno != 0 || *end != '\0') return -1;
    *v_r = v;
    return 0;
}

static int only_opts(const struct ctl_opts *o, int password, int reason, int quota, int json)
{
    if (!password && o->password) return usage_error("--password is not valid here", NULL);
    if (!reason && o->reason) return usage_error("--reason is not valid here", NULL);
    if (!quota && (o->storage || o->messages))
        return usage_error("--storage/--messages are not valid here", NULL);
    if (!json && o->json) return usage_error("--json is not valid here", NULL);
    return 0;
}

/* ---- cluster commands ---- */

static int print_result(Coffer__AdminResponse *resp)
{
    if (resp == NULL) return 1;
    if (!resp->ok) {
        fprintf(stderr, "cofferctl: error: %s\n", resp->error ? resp->error : "failed");
        return 1;
    }
    printf("%s\n", resp->message ? resp->message : "ok");
    return 0;
}

/* node add: ask the new node for its identity and addresses, make it start
 * Raft, then have the leader add it. */
static int cmd_node_add(const struct ctl_opts *o, const char *new_admin, const char *secret)
{
    Coffer__AdminRequest q = COFFER__ADMIN_REQUEST__INIT;
    Coffer__StatusReq sr = COFFER__STATUS_REQ__INIT;
    Coffer__NodeJoinReq nj = COFFER__NODE_JOIN_REQ__INIT;
    Coffer__NodeAddReq na = COFFER__NODE_ADD_REQ__INIT;
    Coffer__AdminResponse *st = NULL, *lead = NULL, *r = NULL;
    int ret = 1;

    q.secret = (char *)secret;
    q.cmd_case = COFFER__ADMIN_REQUEST__CMD_STATUS;
    q.status = &sr;
    st = call_server(o, new_admin, &q);
    if (st == NULL) goto out;
    if (!st->ok || st->status == NULL) {
        fprintf(stderr, "cofferctl: new node %s: %s\n", new_admin,
                st->error ? st->error : "no status");
        goto out;
    }
    lead = call_leader(o, &q);
    if (lead == NULL) goto out;
    if (!lead->ok || lead->status == NULL) {
        fprintf(stderr, "cofferctl: leader status: %s\n", lead->error ? lead->error : "failed");
        goto out;
    }
    if (st->status->group_id && st->status->group_id[0] && lead->status->group_id &&
        strcmp(st->status->group_id, lead->status->group_id) != 0) {
        fprintf(stderr, "cofferctl: node %s belongs to group %s, not to group %s; refusing\n",
                new_admin, st->status->group_id, lead->status->group_id);
        goto out;
    }
    q.cmd_case = COFFER__ADMIN_REQUEST__CMD_NODE_JOIN;
    q.node_join = &nj;
    r = call_server(o, new_admin, &q);
    if (r == NULL) goto out;
    if (!r->ok) {
        fprintf(stderr, "cofferctl: node %s cannot join: %s\n", new_admin,
                r->error ? r->error : "");
        goto out;
    }
    coffer__admin_response__free_unpacked(r, NULL);
    r = NULL;
    na.node_id = st->status->node_id;
    na.raft_address = st->status->raft_address;
    na.imap_address = st->status->imap_address;
    na.imaps_address = st->status->imaps_address;
    na.pop3_address = st->status->pop3_address;
    na.pop3s_address = st->status->pop3s_address;
    na.admin_address = st->status->admin_address;
    na.has_standby = 1;
    na.standby = o->standby;
    if (na.raft_address == NULL || na.raft_address[0] == '\0') {
        fprintf(stderr, "cofferctl: node %s did not report its Raft address\n", new_admin);
        goto out;
    }
    q.cmd_case = COFFER__ADMIN_REQUEST__CMD_NODE_ADD;
    q.node_add = &na;
    r = call_leader(o, &q);
    ret = print_result(r);
out:
    if (st) coffer__admin_response__free_unpacked(st, NULL);
    if (lead) coffer__admin_response__free_unpacked(lead, NULL);
    if (r) coffer__admin_response__free_unpacked(r, NULL);
    return ret;
}

/* node remove: the leader removes it, then the node is told to stop. */
static int cmd_node_remove(const struct ctl_opts *o, uint64_t id, const char *secret)
{
    Coffer__AdminRequest q = COFFER__ADMIN_REQUEST__INIT;
    Coffer__StatusReq sr = COFFER__STATUS_REQ__INIT;
    Coffer__NodeRemoveReq nr = COFFER__NODE_REMOVE_REQ__INIT;
    Coffer__NodeLeaveReq nl = COFFER__NODE_LEAVE_REQ__INIT;
    Coffer__AdminResponse *lead = NULL, *r = NULL;
    char admin[256] = "", group[64] = "";
    int ret = 1;

    q.secret = (char *)secret;
    q.cmd_case = COFFER__ADMIN_REQUEST__CMD_STATUS;
    q.status = &sr;
    lead = call_leader(o, &q);
    if (lead != NULL && lead->ok && lead->status != NULL) {
        snprintf(group, sizeof(group), "%s", lead->status->group_id ? lead->status->group_id : "");
        for (size_t i = 0; i < lead->status->n_members; i++)
            if (lead->status->members[i]->id == id && lead->status->members[i]->admin_address)
                snprintf(admin, sizeof(admin), "%s", lead->status->members[i]->admin_address);
    }
    q.cmd_case = COFFER__ADMIN_REQUEST__CMD_NODE_REMOVE;
    nr.node_id = id;
    q.node_remove = &nr;
    r = call_leader(o, &q);
    ret = print_result(r);
    if (ret != 0) goto out;
    coffer__admin_response__free_unpacked(r, NULL);
    r = NULL;
    if (admin[0] == '\0') {
        fprintf(stderr,
                "cofferctl: warning: admin address of node %llu unknown; stop it yourself\n",
                (unsigned long long)id);
        goto out;
    }
    q.cmd_case = COFFER__ADMIN_REQUEST__CMD_NODE_LEAVE;
    nl.group_id = group;
    q.node_leave = &nl;
    r = call_server(o, admin, &q);
    if (r == NULL || !r->ok)
        fprintf(stderr,
                "cofferctl: warning: node %llu (%s) was not told to stop (%s); it stops by "
                "itself if it sees the change, otherwise stop it and wipe its data dir\n",
                (unsigned long long)id, admin, r && r->error ? r->error : "unreachable");
    else
        printf("node %llu told to stop\n", (unsigned long long)id);
out:
    if (lead) coffer__admin_response__free_unpacked(lead, NULL);
    if (r) coffer__admin_response__free_unpacked(r, NULL);
    return ret;
}

int main(int argc, char **argv)
{
    struct ctl_opts o;
    struct cf_config *cfg = NULL;
    Coffer__AdminRequest req = COFFER__ADMIN_REQUEST__INIT;
    Coffer__UserAddReq ua = COFFER__USER_ADD_REQ__INIT;
    Coffer__UserPasswdReq up = COFFER__USER_PASSWD_REQ__INIT;
    Coffer__UserDisableReq ud = COFFER__USER_DISABLE_REQ__INIT;
    Coffer__UserEnableReq ue = COFFER__USER_ENABLE_REQ__INIT;
    Coffer__UserDeleteReq udel = COFFER__USER_DELETE_REQ__INIT;
    Coffer__UserListReq ul = COFFER__USER_LIST_REQ__INIT;
    Coffer__MailboxListReq ml = COFFER__MAILBOX_LIST_REQ__INIT;
    Coffer__StatusReq sr = COFFER__STATUS_REQ__INIT;
    Coffer__QuotaSetReq qs = COFFER__QUOTA_SET_REQ__INIT;
    Coffer__GroupBootstrapReq gb = COFFER__GROUP_BOOTSTRAP_REQ__INIT;
    Coffer__TransferReq tr = COFFER__TRANSFER_REQ__INIT;
    Coffer__AdminResponse *resp = NULL;
    Coffer__AdminResponse **extra = NULL;
    size_t n_extra = 0;
    int cluster_cmd = 0, via_leader = 0;
    uint64_t node_id = 0;
    struct ctl_conn cc = {.fd = -1};
    char secret[CTL_MAX_SECRET + 1];
    char *password = NULL;
    int rc, ret = 1;

    memset(&o, 0, sizeof(o));
    rc = parse_args(argc, argv, &o);
    if (rc != 0) return rc;
    if (o.npos == 0) return usage_error("no command given", NULL);

    const char *c0 = o.pos[0], *c1 = o.npos > 1 ? o.pos[1] : "";
    int need_password = 0;
    if (strcmp(c0, "user") == 0 && strcmp(c1, "add") == 0 && o.npos == 3) {
        if ((rc = only_opts(&o, 1, 0, 0, 0))) return rc;
        ua.username = (char *)o.pos[2];
        req.cmd_case = COFFER__ADMIN_REQUEST__CMD_USER_ADD;
        req.user_add = &ua;
        need_password = 1;
    } else if (strcmp(c0, "user") == 0 && strcmp(c1, "passwd") == 0 && o.npos == 3) {
        if ((rc = only_opts(&o, 1, 0, 0, 0))) return rc;
        up.username = (char *)o.pos[2];
        req.cmd_case = COFFER__ADMIN_REQUEST__CMD_USER_PASSWD;
        req.user_passwd = &up;
        need_password = 1;
    } else if (strcmp(c0, "user") == 0 && strcmp(c1, "disable") == 0 && o.npos == 3) {
        if ((rc = only_opts(&o, 0, 1, 0, 0))) return rc;
        ud.username = (char *)o.pos[2];
        ud.reason = (char *)o.reason;
        req.cmd_case = COFFER__ADMIN_REQUEST__CMD_USER_DISABLE;
        req.user_disable = &ud;
    } else if (strcmp(c0, "user") == 0 && strcmp(c1, "enable") == 0 && o.npos == 3) {
        if ((rc = only_opts(&o, 0, 0, 0, 0))) return rc;
        ue.username = (char *)o.pos[2];
        req.cmd_case = COFFER__ADMIN_REQUEST__CMD_USER_ENABLE;
        req.user_enable = &ue;
    } else if (strcmp(c0, "user") == 0 && strcmp(c1, "delete") == 0 && o.npos == 3) {
        if ((rc = only_opts(&o, 0, 0, 0, 0))) return rc;
        udel.username = (char *)o.pos[2];
        req.cmd_case = COFFER__ADMIN_REQUEST__CMD_USER_DELETE;
        req.user_delete = &udel;
    } else if (strcmp(c0, "user") == 0 && strcmp(c1, "list") == 0 && o.npos == 2) {
        if ((rc = only_opts(&o, 0, 0, 0, 0))) return rc;
        req.cmd_case = COFFER__ADMIN_REQUEST__CMD_USER_LIST;
        req.user_list = &ul;
    } else if (strcmp(c0, "mailbox") == 0 && strcmp(c1, "list") == 0 && o.npos == 3) {
        if ((rc = only_opts(&o, 0, 0, 0, 0))) return rc;
        ml.username = (char *)o.pos[2];
        req.cmd_case = COFFER__ADMIN_REQUEST__CMD_MAILBOX_LIST;
        req.mailbox_list = &ml;
    } else if (strcmp(c0, "status") == 0 && o.npos == 1) {
        if ((rc = only_opts(&o, 0, 0, 0, 1))) return rc;
        req.cmd_case = COFFER__ADMIN_REQUEST__CMD_STATUS;
        req.status = &sr;
    } else if (strcmp(c0, "group") == 0 && strcmp(c1, "bootstrap") == 0 && o.npos == 2) {
        if ((rc = only_opts(&o, 0, 0, 0, 0))) return rc;
        req.cmd_case = COFFER__ADMIN_REQUEST__CMD_GROUP_BOOTSTRAP;
        req.group_bootstrap = &gb;
    } else if (strcmp(c0, "node") == 0 && strcmp(c1, "add") == 0 && o.npos == 3) {
        if ((rc = only_opts(&o, 0, 0, 0, 0))) return rc;
        cluster_cmd = 1;
    } else if (strcmp(c0, "node") == 0 && strcmp(c1, "remove") == 0 && o.npos == 3) {
        if ((rc = only_opts(&o, 0, 0, 0, 0))) return rc;
        if (parse_count(o.pos[2], &node_id) != 0 || node_id == 0)
            return usage_error("bad node id: ", o.pos[2]);
        cluster_cmd = 2;
    } else if (strcmp(c0, "leader") == 0 && strcmp(c1, "transfer") == 0 &&
               (o.npos == 2 || o.npos == 3)) {
        if ((rc = only_opts(&o, 0, 0, 0, 0))) return rc;
        if (o.npos == 3) {
            if (parse_count(o.pos[2], &tr.node_id) != 0 || tr.node_id == 0)
                return usage_error("bad node id: ", o.pos[2]);
            tr.has_node_id = 1;
        }
        req.cmd_case = COFFER__ADMIN_REQUEST__CMD_TRANSFER;
        req.transfer = &tr;
        via_leader = 1;
    } else if (strcmp(c0, "quota") == 0 && strcmp(c1, "set") == 0 && o.npos == 3) {
        if ((rc = only_opts(&o, 0, 0, 1, 0))) return rc;
        if (!o.storage && !o.messages)
            return usage_error("quota set needs --storage and/or --messages", NULL);
        qs.username = (char *)o.pos[2];
        if (o.storage) {
            if (cf_parse_size(o.storage, &qs.storage_bytes) != 0)
                return usage_error("bad --storage value (e.g. 0, 500M, 2G): ", o.storage);
            qs.has_storage_bytes = 1;
        }
        if (o.messages) {
            if (parse_count(o.messages, &qs.messages) != 0)
                return usage_error("bad --messages value: ", o.messages);
            qs.has_messages = 1;
        }
        req.cmd_case = COFFER__ADMIN_REQUEST__CMD_QUOTA_SET;
        req.quota_set = &qs;
    } else {
        return usage_error("unknown command or wrong arguments: ", c0);
    }

    if ((rc = apply_config(&o, &cfg)) != 0) return rc;
    if (o.secret_file) {
        if (read_secret(o.secret_file, secret, sizeof(secret)) != 0) goto out;
        req.secret = secret;
    }
    if (need_password) {
        if (o.password == NULL) {
            password = read_password();
            if (password == NULL || password[0] == '\0') {
                fprintf(stderr, "cofferctl: no password given\n");
                ret = 2;
                goto out;
            }
        }
        const char *pw = o.password ? o.password : password;
        if (strlen(pw) > CTL_MAX_PASSWORD) {
            fprintf(stderr, "cofferctl: password too long\n");
            ret = 2;
            goto out;
        }
        if (req.cmd_case == COFFER__ADMIN_REQUEST__CMD_USER_ADD)
            ua.password = (char *)pw;
        else
            up.password = (char *)pw;
    }

    if (o.standby && cluster_cmd != 1) {
        ret = usage_error("--standby is only valid with node add", NULL);
        goto out;
    }
    if (cluster_cmd == 1) {
        ret = cmd_node_add(&o, o.pos[2], req.secret);
        goto out;
    }
    if (cluster_cmd == 2) {
        ret = cmd_node_remove(&o, node_id, req.secret);
        goto out;
    }
    if (via_leader) {
        resp = call_leader(&o, &req);
        if (resp == NULL) goto out;
    } else {
        if (ctl_connect(&o, &cc) != 0) goto out;
        resp = ctl_call(&cc, &req);
        if (resp == NULL) goto out;
        ctl_disconnect(&cc);
    }
    if (!resp->ok) {
        fprintf(stderr, "cofferctl: error: %s\n", resp->error ? resp->error : "failed");
        goto out;
    }
    switch (req.cmd_case) {
    case COFFER__ADMIN_REQUEST__CMD_USER_LIST:
        print_users(resp);
        break;
    case COFFER__ADMIN_REQUEST__CMD_MAILBOX_LIST:
        print_mailboxes(resp);
        break;
    case COFFER__ADMIN_REQUEST__CMD_STATUS:
        if (resp->status == NULL) {
            fprintf(stderr, "cofferctl: error: no status in the response\n");
            goto out;
        }
        status_fan_out(&o, resp->status, req.secret, &extra, &n_extra);
        print_status(resp->status, o.json);
        break;
    default:
        printf("%s\n", resp->message ? resp->message : "ok");
        break;
    }
    ret = 0;
out:
    if (resp) coffer__admin_response__free_unpacked(resp, NULL);
    for (size_t i = 0; i < n_extra; i++)
        coffer__admin_response__free_unpacked(extra[i], NULL);
    free(extra);
    ctl_disconnect(&cc);
    OPENSSL_cleanse(secret, sizeof(secret));
    if (password) {
        OPENSSL_cleanse(password, strlen(password));
        free(password);
    }
    if (cfg) cf_config_free(&cfg);
    return ret;
}
