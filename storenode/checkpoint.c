/* checkpoint: LMDB checkpoints (copy, hash, manifest, fetch client) and the
 * manager that runs them on one worker thread. See checkpoint.h.
 *
 * Ownership: the manager owns its strings and the worker's job; a write job
 * owns the read transaction handed to it (ended on the worker); the fetch
 * client owns its TLS objects and the frame buffers it reads (one at a
 * time, at most CKPT_CHUNK plus framing). */
#define STORE_INTERNAL
#include "checkpoint.h"

#include <arpa/inet.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <sys/syscall.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/ssl.h>
#include <uv.h>

#include "cf_frame.h"
#include "cf_log.h"
#include "cf_tls.h"
#include "coffer_admin.pb-c.h"

#define CKPT_DEFAULT_BATCH (8ull * 1024 * 1024)
#define CKPT_FETCH_RETRY_MS 1000
#define CKPT_LOG_EVERY_MS 5000
#define CKPT_SPACE_LOG_MS 60000
#define CKPT_SPACE_MARGIN (64ull * 1024 * 1024)

static uint64_t now_ms(void)
{
    return uv_hrtime() / 1000000u;
}

static void hex_encode(const uint8_t *p, size_t n, char *out)
{
    static const char d[] = "0123456789abcdef";
    for (size_t i = 0; i < n; i++) {
        out[2 * i] = d[p[i] >> 4];
        out[2 * i + 1] = d[p[i] & 15];
    }
    out[2 * n] = '\0';
}

static int hex_decode(const char *s, uint8_t *out, size_t n)
{
    if (s == NULL || strlen(s) != 2 * n) return -1;
    for (size_t i = 0; i < n; i++) {
        unsigned v;
        if (sscanf(s + 2 * i, "%2x", &v) != 1) return -1;
        out[i] = (uint8_t)v;
    }
    return 0;
}

static int is_zero16(const uint8_t id[16])
{
    for (int i = 0; i < 16; i++)
        if (id[i]) return 0;
    return 1;
}

static void fsync_dir(const char *dir)
{
    int fd = open(dir, O_RDONLY | O_DIRECTORY);
    if (fd >= 0) {
        fsync(fd);
        close(fd);
    }
}

/* ---------------------------------------------------- a gentle writer
 *
 * A checkpoint copies the whole store. Left alone that is an I/O storm:
 * LMDB (MDB_NOSYNC) leaves every copied page dirty in the page cache, the
 * final sync then writes the whole file at once (or the kernel's flusher
 * does, at normal priority), and the Raft log's synchronous writes, every
 * node's on a shared disk, wait behind it; a leader lost its leadership
 * that way under load. So the worker thread
 *  - runs at the idle I/O priority class (honoured by bfq and, since Linux
 *    5.14, mq-deadline; best-effort 7 where idle is refused) and nice 19,
 *  - writes the copy back itself, from that thread and so at that
 *    priority, after every batch (sync_file_range: no journal commit, so
 *    no Raft fsync is tied to it), so at most one batch is ever dirty,
 *  - optionally keeps to a rate (rate_bytes per second),
 *  - and drops the finished file from the page cache after hashing it, so
 *    a cold copy does not push the live store out of memory. */
static void worker_be_gentle(void)
{
    long tid = syscall(SYS_gettid);
    const int who_process = 1, class_shift = 13, class_be = 2, class_idle = 3;

    if (syscall(SYS_ioprio_set, who_process, (int)tid, class_idle << class_shift) != 0 &&
        syscall(SYS_ioprio_set, who_process, (int)tid, class_be << class_shift | 7) != 0)
        cf_debug("checkpoint: cannot lower the worker's I/O priority: %s", strerror(errno));
    if (setpriority(PRIO_PROCESS, (id_t)tid, 19) != 0)
        cf_debug("checkpoint: cannot lower the worker's CPU priority: %s", strerror(errno));
}

struct pace {
    int fd;
    uint64_t rate;    /* bytes per second, 0: unlimited */
    uint64_t start;   /* uv_hrtime() of the first byte */
    uint64_t written; /* bytes handed to the file so far */
};

static void sleep_ms(uint64_t ms)
{
    struct timespec ts = {(time_t)(ms / 1000), (long)(ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {
    }
}

/* After `n` more bytes went to p->fd: write them back now and wait, then
 * keep to the rate. Returns -1 when *cancel was set while waiting. */
static int pace_step(struct pace *p, uint64_t n, volatile int *cancel)
{
    p->written += n;
    if (p->fd >= 0 && sync_file_range(p->fd, 0, 0,
                                      SYNC_FILE_RANGE_WAIT_BEFORE | SYNC_FILE_RANGE_WRITE |
                                          SYNC_FILE_RANGE_WAIT_AFTER) != 0)
        cf_debug("checkpoint: sync_file_range: %s", strerror(errno));
    if (p->rate > 0) {
        uint64_t due_ms = p->written * 1000 / p->rate;
        for (;;) {
            uint64_t el = (uv_hrtime() - p->start) / 1000000u;
            if (el >= due_ms) break;
            if (cancel != NULL && *cancel) return -1;
            sleep_ms(due_ms - el > 100 ? 100 : due_ms - el);
        }
    }
    return cancel != NULL && *cancel ? -1 : 0;
}

void ckpt_name(uint64_t applied, char out[64])
{
    snprintf(out, 64, "ckpt-%020" PRIu64 ".mdb", applied);
}

/* ---------------------------------------------------------------- copy */

int ckpt_copy(struct store *st, MDB_txn *rtxn, const char *path, uint64_t batch_bytes,
              volatile int *cancel, char *err, size_t errlen)
{
    return ckpt_copy_paced(st, rtxn, path, batch_bytes, 0, cancel, err, errlen);
}

int ckpt_copy_paced(struct store *st, MDB_txn *rtxn, const char *path, uint64_t batch_bytes,
                    uint64_t rate_bytes, volatile int *cancel, char *err, size_t errlen)
{
    struct store_db dbs[STORE_N_DBS];
    size_t n_dbs = store__dbs(st, dbs);
    MDB_env *env = NULL;
    MDB_txn *w = NULL;
    MDB_cursor *c = NULL;
    MDB_val k, v;
    uint64_t pending = 0;
    const char *what = "mdb_env_create";
    struct pace pace = {-1, rate_bytes, uv_hrtime(), 0};
    int rc;

    if (batch_bytes == 0) batch_bytes = CKPT_DEFAULT_BATCH;
    unlink(path);
    if ((rc = mdb_env_create(&env))) goto fail;
    what = "mdb_env_set_maxdbs";
    if ((rc = mdb_env_set_maxdbs(env, 16))) goto fail;
    what = "mdb_env_set_mapsize";
    if ((rc = mdb_env_set_mapsize(env, (size_t)st->map_size))) goto fail;
    what = "mdb_env_open";
    if ((rc = mdb_env_open(env, path, MDB_NOSUBDIR | MDB_NOLOCK | MDB_NOSYNC | MDB_NOTLS, 0600)))
        goto fail;
    if (mdb_env_get_fd(env, &pace.fd) != 0) pace.fd = -1;
    what = "mdb_txn_begin";
    if ((rc = mdb_txn_begin(env, NULL, 0, &w))) goto fail;
    for (size_t i = 0; i < n_dbs; i++) {
        MDB_dbi d;
        what = dbs[i].name;
        if ((rc = mdb_dbi_open(w, dbs[i].name, MDB_CREATE, &d))) goto fail;
        if ((rc = mdb_cursor_open(rtxn, dbs[i].dbi, &c))) goto fail;
        for (rc = mdb_cursor_get(c, &k, &v, MDB_FIRST); rc == 0;
             rc = mdb_cursor_get(c, &k, &v, MDB_NEXT)) {
            int prc = mdb_put(w, d, &k, &v, MDB_APPEND);
            if (prc) {
                rc = prc;
                goto fail;
            }
            pending += k.mv_size + v.mv_size + 64;
            if (pending >= batch_bytes) {
                /* Bounded memory: dirty pages live in the write txn until
                 * it commits. */
                what = "commit";
                rc = mdb_txn_commit(w);
                w = NULL;
                if (rc) goto fail;
                if (pace_step(&pace, pending, cancel) != 0) {
                    snprintf(err, errlen, "cancelled");
                    goto fail_noerr;
                }
                pending = 0;
                what = "mdb_txn_begin";
                if ((rc = mdb_txn_begin(env, NULL, 0, &w))) goto fail;
            }
        }
        if (rc != MDB_NOTFOUND) goto fail;
        mdb_cursor_close(c);
        c = NULL;
    }
    what = "commit";
    rc = mdb_txn_commit(w);
    w = NULL;
    if (rc) goto fail;
    pace_step(&pace, pending, NULL);
    what = "mdb_env_sync";
    if ((rc = mdb_env_sync(env, 1))) goto fail;
    mdb_env_close(env);
    return 0;

fail:
    snprintf(err, errlen, "checkpoint copy (%s): %s", what, mdb_strerror(rc));
fail_noerr:
    if (c) mdb_cursor_close(c);
    if (w) mdb_txn_abort(w);
    if (env) mdb_env_close(env);
    unlink(path);
    return -1;
}

/* ---------------------------------------------------------------- hash */

int ckpt_hash_file(const char *path, uint64_t *size_r, char hex[65], char *err, size_t errlen)
{
    EVP_MD_CTX *md = EVP_MD_CTX_new();
    unsigned char *buf = malloc(CKPT_CHUNK), h[32];
    unsigned hl = 0;
    uint64_t size = 0;
    int fd = -1, ret = -1;

    hex[0] = '\0';
    if (md == NULL || buf == NULL || EVP_DigestInit_ex(md, EVP_sha256(), NULL) != 1) {
        snprintf(err, errlen, "out of memory");
        goto out;
    }
    fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        snprintf(err, errlen, "open %s: %s", path, strerror(errno));
        goto out;
    }
    posix_fadvise(fd, 0, 0, POSIX_FADV_SEQUENTIAL);
    for (;;) {
        ssize_t n = read(fd, buf, CKPT_CHUNK);
        if (n < 0) {
            if (errno == EINTR) continue;
            snprintf(err, errlen, "read %s: %s", path, strerror(errno));
            goto out;
        }
        if (n == 0) break;
        EVP_DigestUpdate(md, buf, (size_t)n);
        size += (uint64_t)n;
    }
    if (EVP_DigestFinal_ex(md, h, &hl) != 1 || hl != 32) {
        snprintf(err, errlen, "sha256 failed");
        goto out;
    }
    hex_encode(h, 32, hex);
    *size_r = size;
    ret = 0;
out:
    if (fd >= 0) {
        /* a checkpoint is cold: leave the page cache to the live store */
        posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
        close(fd);
    }
    free(buf);
    EVP_MD_CTX_free(md);
    return ret;
}

/* ------------------------------------------------------------ manifest */

int ckpt_manifest_write(const char *dir, const struct ckpt_info *ci, char *err, size_t errlen)
{
    char path[4200], tmp[4300], gid[33];
    FILE *f;
    int ok;

    snprintf(path, sizeof path, "%s/%s.manifest", dir, ci->name);
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    hex_encode(ci->group_id, 16, gid);
    f = fopen(tmp, "w");
    if (f == NULL) {
        snprintf(err, errlen, "cannot write %s: %s", tmp, strerror(errno));
        return -1;
    }
    fprintf(f,
            "# coffer checkpoint manifest\napplied=%" PRIu64 "\nsize=%" PRIu64
            "\nsha256=%s\ngroup_id=%s\n",
            ci->applied, ci->size, ci->sha256, gid);
    ok = fflush(f) == 0 && fsync(fileno(f)) == 0;
    if (fclose(f) != 0) ok = 0;
    if (!ok || rename(tmp, path) != 0) {
        snprintf(err, errlen, "cannot write %s: %s", path, strerror(errno));
        unlink(tmp);
        return -1;
    }
    fsync_dir(dir);
    return 0;
}

int ckpt_manifest_read(const char *dir, const char *name, struct ckpt_info *ci)
{
    char path[4200], line[256];
    FILE *f;
    int have = 0;

    memset(ci, 0, sizeof *ci);
    snprintf(path, sizeof path, "%s/%s.manifest", dir, name);
    f = fopen(path, "r");
    if (f == NULL) return -1;
    snprintf(ci->name, sizeof ci->name, "%s", name);
    while (fgets(line, sizeof line, f) != NULL) {
        line[strcspn(line, "\r\n")] = '\0';
        if (strncmp(line, "applied=", 8) == 0) {
            ci->applied = strtoull(line + 8, NULL, 10);
            have |= 1;
        } else if (strncmp(line, "size=", 5) == 0) {
            ci->size = strtoull(line + 5, NULL, 10);
            have |= 2;
        } else if (strncmp(line, "sha256=", 7) == 0 && strlen(line + 7) == 64) {
            snprintf(ci->sha256, sizeof ci->sha256, "%s", line + 7);
            have |= 4;
        } else if (strncmp(line, "group_id=", 9) == 0) {
            if (hex_decode(line + 9, ci->group_id, 16) == 0) have |= 8;
        }
    }
    fclose(f);
    return have == 15 ? 0 : -1;
}

static int cmp_info(const void *a, const void *b)
{
    const struct ckpt_info *x = a, *y = b;
    return x->applied < y->applied ? 1 : x->applied > y->applied ? -1 : 0;
}

int ckpt_list(const char *dir, struct ckpt_info **list_r, size_t *n_r)
{
    DIR *d = opendir(dir);
    struct dirent *de;
    struct ckpt_info *list = NULL;
    size_t n = 0, cap = 0;

    *list_r = NULL;
    *n_r = 0;
    if (d == NULL) return errno == ENOENT ? 0 : -1;
    while ((de = readdir(d)) != NULL) {
        size_t len = strlen(de->d_name);
        struct ckpt_info ci;
        char want[64], path[4200];
        struct stat sb;
        if (len != 29 || strncmp(de->d_name, "ckpt-", 5) != 0 ||
            strcmp(de->d_name + len - 4, ".mdb") != 0)
            continue;
        if (ckpt_manifest_read(dir, de->d_name, &ci) != 0) continue;
        ckpt_name(ci.applied, want);
        if (strcmp(want, de->d_name) != 0) continue;
        snprintf(path, sizeof path, "%s/%s", dir, de->d_name);
        if (stat(path, &sb) != 0) continue;
        if (n == cap) {
            size_t nc = cap ? 2 * cap : 8;
            struct ckpt_info *nl = realloc(list, nc * sizeof *nl);
            if (nl == NULL) {
                free(list);
                closedir(d);
                return -1;
            }
            list = nl;
            cap = nc;
        }
        list[n++] = ci;
    }
    closedir(d);
    if (n > 1) qsort(list, n, sizeof *list, cmp_info);
    *list_r = list;
    *n_r = n;
    return 0;
}

int ckpt_verify(const char *dir, const struct ckpt_info *ci, char *err, size_t errlen)
{
    char path[4200], hex[65];
    uint64_t size = 0;

    snprintf(path, sizeof path, "%s/%s", dir, ci->name);
    if (ckpt_hash_file(path, &size, hex, err, errlen) != 0) return -1;
    if (size != ci->size) {
        snprintf(err, errlen, "%s: size %" PRIu64 " but its manifest says %" PRIu64, ci->name, size,
                 ci->size);
        return -1;
    }
    if (strcmp(hex, ci->sha256) != 0) {
        snprintf(err, errlen, "%s: sha256 %.16s... but its manifest says %.16s...", ci->name, hex,
                 ci->sha256);
        return -1;
    }
    return 0;
}

void ckpt_delete(const char *dir, const char *name)
{
    char path[4200];
    snprintf(path, sizeof path, "%s/%s.manifest", dir, name);
    unlink(path);
    snprintf(path, sizeof path, "%s/%s", dir, name);
    unlink(path);
    fsync_dir(dir);
}

/* --------------------------------------------------------------- fetch */

static int split_hostport(const char *s, char *host, size_t hl, char *port, size_t pl)
{
    const char *colon;
    if (s[0] == '[') {
        const char *rb = strchr(s, ']');
        if (rb == NULL || rb[1] != ':') return -1;
        snprintf(host, hl, "%.*s", (int)(rb - s - 1), s + 1);
        snprintf(port, pl, "%s", rb + 2);
        return 0;
    }
    colon = strrchr(s, ':');
    if (colon == NULL) return -1;
    snprintf(host, hl, "%.*s", (int)(colon - s), s);
    snprintf(port, pl, "%s", colon + 1);
    if (strcmp(host, "*") == 0 || host[0] == '\0') snprintf(host, hl, "127.0.0.1");
    return 0;
}

static int tcp_connect(const char *server, unsigned timeout_ms, char *err, size_t errlen)
{
    char host[256], port[16];
    struct addrinfo hints, *res = NULL, *ai;
    int fd = -1, rc;

    if (split_hostport(server, host, sizeof host, port, sizeof port) != 0) {
        snprintf(err, errlen, "bad address %s", server);
        return -1;
    }
    memset(&hints, 0, sizeof hints);
    hints.ai_socktype = SOCK_STREAM;
    rc = getaddrinfo(host, port, &hints, &res);
    if (rc != 0) {
        snprintf(err, errlen, "%s: %s", server, gai_strerror(rc));
        return -1;
    }
    snprintf(err, errlen, "%s: no address", server);
    for (ai = res; ai != NULL; ai = ai->ai_next) {
        struct pollfd p;
        int soerr = 0;
        socklen_t sl = sizeof soerr;
        fd = socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
        if (fd < 0) continue;
        if (connect(fd, ai->ai_addr, ai->ai_addrlen) != 0 && errno != EINPROGRESS) {
            snprintf(err, errlen, "connect %s: %s", server, strerror(errno));
            close(fd);
            fd = -1;
            continue;
        }
        p.fd = fd;
        p.events = POLLOUT;
        if (poll(&p, 1, (int)timeout_ms) != 1 ||
            getsockopt(fd, SOL_SOCKET, SO_ERROR, &soerr, &sl) != 0 || soerr != 0) {
            snprintf(err, errlen, "connect %s: %s", server, soerr ? strerror(soerr) : "timed out");
            close(fd);
            fd = -1;
            continue;
        }
        break;
    }
    freeaddrinfo(res);
    if (fd >= 0) {
        struct timeval tv = {(time_t)(timeout_ms / 1000), (suseconds_t)(timeout_ms % 1000) * 1000};
        int one = 1;
        int fl = fcntl(fd, F_GETFL);
        fcntl(fd, F_SETFL, fl & ~O_NONBLOCK);
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
        setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    }
    return fd;
}

static int write_all(int fd, const uint8_t *p, size_t n)
{
    while (n > 0) {
        ssize_t w = write(fd, p, n);
        if (w < 0) {
            if (errno == EINTR) continue;
            return -1;
        }
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

int ckpt_fetch(const char *dir, const char *server, const struct ckpt_fetch_opts *o,
               struct ckpt_info *ci_r, int *bad_checksum_r, char *err, size_t errlen)
{
    Coffer__AdminRequest req = COFFER__ADMIN_REQUEST__INIT;
    Coffer__CheckpointFetchReq cf = COFFER__CHECKPOINT_FETCH_REQ__INIT;
    Coffer__AdminResponse *resp = NULL;
    SSL_CTX *ctx = NULL;
    SSL *ssl = NULL;
    EVP_MD_CTX *md = NULL;
    char gidhex[33], part[4200], final[4200], terr[256], hex[65];
    uint8_t *rq = NULL, *frame = NULL;
    size_t rqlen, flen;
    uint64_t written = 0, synced = 0;
    struct pace pace = {-1, 0, uv_hrtime(), 0};
    unsigned timeout = o->io_timeout_ms ? o->io_timeout_ms : 10000;
    unsigned char h[32];
    unsigned hl = 0;
    struct ckpt_info ci;
    int fd = -1, sock = -1, ret = -1;

    *bad_checksum_r = 0;
    memset(&ci, 0, sizeof ci);
    snprintf(part, sizeof part, "%s/fetch.part", dir);
    ctx = cf_tls_client_ctx(o->ca_file, o->cert_file, o->key_file, terr, sizeof terr);
    if (ctx == NULL) {
        snprintf(err, errlen, "TLS setup: %s", terr);
        goto out;
    }
    sock = tcp_connect(server, timeout, err, errlen);
    if (sock < 0) goto out;
    ssl = SSL_new(ctx);
    if (ssl == NULL || SSL_set_fd(ssl, sock) != 1) {
        snprintf(err, errlen, "TLS setup failed");
        goto out;
    }
    /* Peers are known by address; the certificate chain must verify
     * against tls.ca when one is configured. */
    SSL_set_verify(ssl, o->ca_file != NULL ? SSL_VERIFY_PEER : SSL_VERIFY_NONE, NULL);
    if (SSL_connect(ssl) != 1) {
        cf_tls_errstr(terr, sizeof terr);
        snprintf(err, errlen, "TLS handshake with %s: %s", server, terr);
        goto out;
    }
    hex_encode(o->group_id, 16, gidhex);
    cf.group_id = gidhex;
    cf.min_applied = o->min_applied;
    req.secret = (char *)o->secret;
    req.cmd_case = COFFER__ADMIN_REQUEST__CMD_CHECKPOINT_FETCH;
    req.checkpoint_fetch = &cf;
    rqlen = coffer__admin_request__get_packed_size(&req);
    rq = malloc(rqlen ? rqlen : 1);
    if (rq == NULL) {
        snprintf(err, errlen, "out of memory");
        goto out;
    }
    coffer__admin_request__pack(&req, rq);
    if (cf_frame_ssl_write(ssl, rq, rqlen) != 0) {
        snprintf(err, errlen, "%s: sending the request failed", server);
        goto out;
    }
    /* header */
    if (cf_frame_ssl_read(ssl, 2 * CKPT_CHUNK, &frame, &flen) != 0 ||
        (resp = coffer__admin_response__unpack(NULL, flen, frame)) == NULL) {
        snprintf(err, errlen, "%s: no answer", server);
        goto out;
    }
    free(frame);
    frame = NULL;
    if (!resp->ok) {
        snprintf(err, errlen, "%s: %s", server, resp->error ? resp->error : "refused");
        goto out;
    }
    if (resp->checkpoint == NULL || !resp->checkpoint->has_size || !resp->checkpoint->has_applied ||
        resp->checkpoint->sha256 == NULL || strlen(resp->checkpoint->sha256) != 64 ||
        resp->checkpoint->applied < o->min_applied) {
        snprintf(err, errlen, "%s: malformed checkpoint header", server);
        goto out;
    }
    ci.applied = resp->checkpoint->applied;
    ci.size = resp->checkpoint->size;
    snprintf(ci.sha256, sizeof ci.sha256, "%s", resp->checkpoint->sha256);
    memcpy(ci.group_id, o->group_id, 16);
    ckpt_name(ci.applied, ci.name);
    coffer__admin_response__free_unpacked(resp, NULL);
    resp = NULL;

    md = EVP_MD_CTX_new();
    if (md == NULL || EVP_DigestInit_ex(md, EVP_sha256(), NULL) != 1) {
        snprintf(err, errlen, "out of memory");
        goto out;
    }
    fd = open(part, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (fd < 0) {
        snprintf(err, errlen, "open %s: %s", part, strerror(errno));
        goto out;
    }
    pace.fd = fd;
    for (;;) {
        const Coffer__CheckpointChunk *ck;
        if (o->cancel != NULL && *o->cancel) {
            snprintf(err, errlen, "cancelled");
            goto out;
        }
        if (cf_frame_ssl_read(ssl, 2 * CKPT_CHUNK, &frame, &flen) != 0 ||
            (resp = coffer__admin_response__unpack(NULL, flen, frame)) == NULL) {
            snprintf(err, errlen, "%s: stream broken after %" PRIu64 " of %" PRIu64 " bytes",
                     server, written, ci.size);
            goto out;
        }
        free(frame);
        frame = NULL;
        if (!resp->ok) {
            snprintf(err, errlen, "%s: %s", server, resp->error ? resp->error : "stream refused");
            if (resp->error != NULL && strstr(resp->error, "checksum") != NULL) *bad_checksum_r = 1;
            goto out;
        }
        ck = resp->checkpoint;
        if (ck == NULL) {
            snprintf(err, errlen, "%s: malformed chunk", server);
            goto out;
        }
        if (ck->has_last && ck->last) {
            if (ck->sha256 == NULL || strcmp(ck->sha256, ci.sha256) != 0) {
                snprintf(err, errlen, "%s: trailer checksum differs from the header", server);
                *bad_checksum_r = 1;
                goto out;
            }
            break;
        }
        if (!ck->has_offset || ck->offset != written || !ck->has_data ||
            ck->data.len > CKPT_CHUNK || written + ck->data.len > ci.size) {
            snprintf(err, errlen, "%s: chunk out of order or beyond the announced size", server);
            goto out;
        }
        if (write_all(fd, ck->data.data, ck->data.len) != 0) {
            snprintf(err, errlen, "write %s: %s", part, strerror(errno));
            goto out;
        }
        EVP_DigestUpdate(md, ck->data.data, ck->data.len);
        written += ck->data.len;
        if (written - synced >= CKPT_DEFAULT_BATCH) {
            /* write back as it arrives (see "a gentle writer") */
            pace_step(&pace, written - synced, NULL);
            synced = written;
        }
        coffer__admin_response__free_unpacked(resp, NULL);
        resp = NULL;
    }
    if (written != ci.size) {
        snprintf(err, errlen, "%s: got %" PRIu64 " bytes, announced %" PRIu64, server, written,
                 ci.size);
        goto out;
    }
    if (EVP_DigestFinal_ex(md, h, &hl) != 1 || hl != 32) {
        snprintf(err, errlen, "sha256 failed");
        goto out;
    }
    hex_encode(h, 32, hex);
    if (strcmp(hex, ci.sha256) != 0) {
        snprintf(err, errlen,
                 "%s: checkpoint %s failed its checksum (got %.16s..., announced %.16s...)", server,
                 ci.name, hex, ci.sha256);
        *bad_checksum_r = 1;
        goto out;
    }
    if (fsync(fd) != 0 || close(fd) != 0) {
        fd = -1;
        snprintf(err, errlen, "fsync %s: %s", part, strerror(errno));
        goto out;
    }
    fd = -1;
    snprintf(final, sizeof final, "%s/%s", dir, ci.name);
    if (rename(part, final) != 0) {
        snprintf(err, errlen, "rename %s: %s", part, strerror(errno));
        goto out;
    }
    if (ckpt_manifest_write(dir, &ci, err, errlen) != 0) {
        unlink(final);
        goto out;
    }
    *ci_r = ci;
    ret = 0;
out:
    if (resp) coffer__admin_response__free_unpacked(resp, NULL);
    free(frame);
    if (rq) {
        OPENSSL_cleanse(rq, rqlen);
        free(rq);
    }
    EVP_MD_CTX_free(md);
    if (fd >= 0) close(fd);
    if (ret != 0) unlink(part);
    if (ssl) {
        if (ret == 0) SSL_shutdown(ssl);
        SSL_free(ssl);
    }
    if (sock >= 0) close(sock);
    SSL_CTX_free(ctx);
    return ret;
}

/* ------------------------------------------------------------- manager */

enum ckpt_job { J_NONE, J_WRITE, J_VERIFY, J_FETCH };

struct ckpt_mgr {
    struct store *st;
    char *dir;
    unsigned keep;
    char *ca_file, *cert_file, *key_file, *secret;
    uint64_t batch_bytes;
    uint64_t rate_bytes;     /* copy rate limit, bytes/s (0: none) */
    uint64_t min_free_bytes; /* left free after a copy */
    uint64_t space_log_ms;   /* last "not enough space" log */

    /* worker */
    uv_thread_t thread;
    int running;
    atomic_int done;
    volatile int cancel;
    enum ckpt_job job;
    uint64_t started_ms;
    /* job input */
    MDB_txn *rtxn;
    struct ckpt_info in; /* write: name/applied/group; verify: the candidate */
    char **sources;
    size_t n_sources;
    uint64_t min_applied;
    /* job output */
    int rc;
    int bad_checksum;
    char err[512];
    char from[160];
    struct ckpt_info out;

    /* state */
    char verified[64]; /* verified since start, awaiting install */
    uint64_t next_fetch_ms;
    uint64_t last_wait_log_ms;
    struct ckpt_stats stats;
};

static char *dup_or_null(const char *s)
{
    return s ? strdup(s) : NULL;
}

static void remove_stale(const char *dir)
{
    DIR *d = opendir(dir);
    struct dirent *de;
    char path[4200];

    if (d == NULL) return;
    while ((de = readdir(d)) != NULL) {
        size_t len = strlen(de->d_name);
        if ((len > 4 && strcmp(de->d_name + len - 4, ".tmp") == 0) ||
            (len > 5 && strcmp(de->d_name + len - 5, ".part") == 0)) {
            snprintf(path, sizeof path, "%s/%s", dir, de->d_name);
            cf_info("checkpoint: removing unfinished %s", path);
            unlink(path);
        }
    }
    closedir(d);
}

struct ckpt_mgr *ckpt_mgr_create(struct store *st, const struct ckpt_mgr_config *c, char *err,
                                 size_t errlen)
{
    struct ckpt_mgr *m = calloc(1, sizeof *m);
    struct ckpt_info *l = NULL;
    size_t n = 0;

    if (m == NULL) {
        snprintf(err, errlen, "out of memory");
        return NULL;
    }
    if (mkdir(c->dir, 0700) != 0 && errno != EEXIST) {
        snprintf(err, errlen, "mkdir %s: %s", c->dir, strerror(errno));
        free(m);
        return NULL;
    }
    m->st = st;
    m->dir = strdup(c->dir);
    m->keep = c->keep ? c->keep : 2;
    m->ca_file = dup_or_null(c->ca_file);
    m->cert_file = dup_or_null(c->cert_file);
    m->key_file = dup_or_null(c->key_file);
    m->secret = dup_or_null(c->secret);
    m->batch_bytes = c->batch_bytes;
    m->rate_bytes = c->rate_bytes;
    m->min_free_bytes = c->min_free_bytes;
    atomic_init(&m->done, 0);
    if (m->dir == NULL) {
        snprintf(err, errlen, "out of memory");
        ckpt_mgr_destroy(&m);
        return NULL;
    }
    remove_stale(m->dir);
    if (ckpt_list(m->dir, &l, &n) == 0 && n > 0) m->stats.newest_applied = l[0].applied;
    free(l);
    return m;
}

static void free_sources(struct ckpt_mgr *m)
{
    for (size_t i = 0; i < m->n_sources; i++)
        free(m->sources[i]);
    free(m->sources);
    m->sources = NULL;
    m->n_sources = 0;
}

void ckpt_mgr_destroy(struct ckpt_mgr **mp)
{
    struct ckpt_mgr *m;

    if (mp == NULL || *mp == NULL) return;
    m = *mp;
    if (m->running) {
        m->cancel = 1;
        uv_thread_join(&m->thread);
        m->running = 0;
        if (m->job == J_WRITE && m->rc != 0) cf_info("checkpoint: write cancelled at shutdown");
    }
    free_sources(m);
    free(m->dir);
    free(m->ca_file);
    free(m->cert_file);
    free(m->key_file);
    if (m->secret) {
        OPENSSL_cleanse(m->secret, strlen(m->secret));
        free(m->secret);
    }
    free(m);
    *mp = NULL;
}

static void worker(void *arg)
{
    struct ckpt_mgr *m = arg;
    char tmp[4200], final[4200];

    m->rc = -1;
    m->err[0] = '\0';
    m->bad_checksum = 0;
    worker_be_gentle();
    switch (m->job) {
    case J_WRITE: {
        struct ckpt_info ci = m->in;
        snprintf(tmp, sizeof tmp, "%s/%s.tmp", m->dir, ci.name);
        snprintf(final, sizeof final, "%s/%s", m->dir, ci.name);
        m->rc = ckpt_copy_paced(m->st, m->rtxn, tmp, m->batch_bytes, m->rate_bytes, &m->cancel,
                                m->err, sizeof m->err);
        store_rtxn_end(m->rtxn);
        m->rtxn = NULL;
        if (m->rc != 0) break;
        m->rc = -1;
        if (ckpt_hash_file(tmp, &ci.size, ci.sha256, m->err, sizeof m->err) != 0) {
            unlink(tmp);
            break;
        }
        if (rename(tmp, final) != 0) {
            snprintf(m->err, sizeof m->err, "rename %s: %s", tmp, strerror(errno));
            unlink(tmp);
            break;
        }
        if (ckpt_manifest_write(m->dir, &ci, m->err, sizeof m->err) != 0) {
            unlink(final);
            break;
        }
        m->out = ci;
        m->rc = 0;
        break;
    }
    case J_VERIFY:
        m->rc = ckpt_verify(m->dir, &m->in, m->err, sizeof m->err);
        m->out = m->in;
        break;
    case J_FETCH: {
        struct ckpt_fetch_opts o;
        memset(&o, 0, sizeof o);
        o.ca_file = m->ca_file;
        o.cert_file = m->cert_file;
        o.key_file = m->key_file;
        o.secret = m->secret;
        memcpy(o.group_id, m->in.group_id, 16);
        o.min_applied = m->min_applied;
        o.cancel = &m->cancel;
        for (size_t i = 0; i < m->n_sources && !m->cancel; i++) {
            char e[512];
            int bad = 0;
            snprintf(m->from, sizeof m->from, "%s", m->sources[i]);
            if (ckpt_fetch(m->dir, m->sources[i], &o, &m->out, &bad, e, sizeof e) == 0) {
                m->rc = 0;
                break;
            }
            if (bad) m->bad_checksum = 1;
            /* keep every source's reason, bounded */
            size_t have = strlen(m->err);
            snprintf(m->err + have, sizeof m->err - have, "%s%s", have ? "; " : "", e);
        }
        break;
    }
    default:
        break;
    }
    atomic_store(&m->done, 1);
}

static int set_sources(struct ckpt_mgr *m, const char *const *sources, size_t n_sources)
{
    free_sources(m);
    if (n_sources == 0) return 0;
    m->sources = calloc(n_sources, sizeof *m->sources);
    if (m->sources == NULL) return -1;
    for (size_t i = 0; i < n_sources; i++) {
        m->sources[i] = strdup(sources[i]);
        if (m->sources[i] == NULL) {
            free_sources(m);
            return -1;
        }
        m->n_sources = i + 1;
    }
    return 0;
}

static int start_job(struct ckpt_mgr *m, enum ckpt_job job)
{
    int rv;

    m->job = job;
    m->cancel = 0;
    atomic_store(&m->done, 0);
    m->started_ms = now_ms();
    rv = uv_thread_create(&m->thread, worker, m);
    if (rv != 0) {
        cf_error("checkpoint: cannot start a worker thread: %s", uv_strerror(rv));
        m->job = J_NONE;
        return -1;
    }
    m->running = 1;
    return 0;
}

static void prune(struct ckpt_mgr *m)
{
    struct ckpt_info *l = NULL;
    size_t n = 0;

    if (ckpt_list(m->dir, &l, &n) != 0) return;
    m->stats.newest_applied = n > 0 ? l[0].applied : 0;
    for (size_t i = m->keep; i < n; i++) {
        if (strcmp(l[i].name, m->verified) == 0) continue;
        cf_info("checkpoint: removing old %s", l[i].name);
        ckpt_delete(m->dir, l[i].name);
    }
    free(l);
}

void ckpt_mgr_poll(struct ckpt_mgr *m)
{
    double secs;

    if (m == NULL || !m->running || !atomic_load(&m->done)) return;
    uv_thread_join(&m->thread);
    m->running = 0;
    secs = (double)(now_ms() - m->started_ms) / 1000.0;
    switch (m->job) {
    case J_WRITE:
        if (m->rc == 0) {
            m->stats.taken++;
            cf_notice("checkpoint: wrote %s (applied %" PRIu64 ", %" PRIu64
                      " bytes, sha256 %.16s...) in %.1f s",
                      m->out.name, m->out.applied, m->out.size, m->out.sha256, secs);
            prune(m);
        } else if (m->cancel) {
            cf_info("checkpoint: writing %s cancelled", m->in.name);
        } else {
            cf_error("checkpoint: writing %s failed: %s", m->in.name, m->err);
        }
        break;
    case J_VERIFY:
        if (m->rc == 0) {
            snprintf(m->verified, sizeof m->verified, "%s", m->out.name);
            cf_info("checkpoint: %s verified (sha256 %.16s...) in %.1f s", m->out.name,
                    m->out.sha256, secs);
        } else {
            uint8_t gid[16];
            m->stats.refused++;
            cf_crit("checkpoint: %s is corrupt and was deleted (refused, never used): %s",
                    m->in.name, m->err);
            ckpt_delete(m->dir, m->in.name);
            /* fetch a good one right away from the sources we were given */
            memcpy(gid, m->in.group_id, 16);
            if (m->n_sources > 0) {
                memset(&m->in, 0, sizeof m->in);
                memcpy(m->in.group_id, gid, 16);
                m->job = J_NONE;
                if (start_job(m, J_FETCH) == 0) {
                    cf_notice("checkpoint: fetching a checkpoint at or beyond %" PRIu64
                              " from %s instead",
                              m->min_applied, m->sources[0]);
                    return;
                }
            }
        }
        break;
    case J_FETCH:
        if (m->rc == 0) {
            m->stats.fetched++;
            snprintf(m->verified, sizeof m->verified, "%s", m->out.name);
            cf_notice("checkpoint: fetched %s from %s (applied %" PRIu64 ", %" PRIu64
                      " bytes, sha256 verified) in %.1f s",
                      m->out.name, m->from, m->out.applied, m->out.size, secs);
            prune(m);
        } else {
            if (m->bad_checksum) {
                m->stats.refused++;
                cf_crit("checkpoint: fetched checkpoint refused: %s", m->err);
            } else {
                cf_warn("checkpoint: fetch failed: %s", m->err);
            }
            m->next_fetch_ms = now_ms() + CKPT_FETCH_RETRY_MS;
        }
        free_sources(m);
        break;
    default:
        break;
    }
    m->job = J_NONE;
}

/* Room for a full copy of the store in the checkpoint directory: the
 * store's used pages (an upper bound of the compacted copy) plus
 * min_free_bytes (default 64 MiB) must fit in the space available. 1 when
 * there is, 0 (with the figures) when not. */
static int space_ok(struct ckpt_mgr *m, uint64_t *need_r, uint64_t *avail_r)
{
    MDB_envinfo ei;
    MDB_stat ms;
    struct statvfs vfs;
    uint64_t used;

    *need_r = *avail_r = 0;
    if (mdb_env_info(m->st->env, &ei) != 0 || mdb_env_stat(m->st->env, &ms) != 0) return 1;
    if (statvfs(m->dir, &vfs) != 0) return 1;
    used = ((uint64_t)ei.me_last_pgno + 1) * ms.ms_psize;
    *need_r = used + (m->min_free_bytes ? m->min_free_bytes : CKPT_SPACE_MARGIN);
    *avail_r = (uint64_t)vfs.f_bavail * vfs.f_frsize;
    return *avail_r >= *need_r;
}

int ckpt_mgr_take(struct ckpt_mgr *m)
{
    struct ckpt_info *l = NULL;
    size_t n = 0;
    char path[4200];
    struct stat sb;
    uint64_t need, avail;

    ckpt_mgr_poll(m);
    if (m->running) {
        cf_info("checkpoint: previous job still running; this snapshot is covered by a later "
                "checkpoint");
        return 1;
    }
    memset(&m->in, 0, sizeof m->in);
    m->in.applied = store_applied_index(m->st);
    store_group_id(m->st, m->in.group_id);
    ckpt_name(m->in.applied, m->in.name);
    if (ckpt_list(m->dir, &l, &n) == 0) {
        for (size_t i = 0; i < n; i++) {
            if (l[i].applied == m->in.applied) {
                free(l);
                return 1;
            }
        }
    }
    free(l);
    snprintf(path, sizeof path, "%s/%s", m->dir, m->in.name);
    if (stat(path, &sb) == 0) unlink(path); /* no manifest: unfinished */
    if (!space_ok(m, &need, &avail)) {
        uint64_t t = now_ms();
        m->stats.skipped_space++;
        if (m->space_log_ms == 0 || t - m->space_log_ms >= CKPT_SPACE_LOG_MS) {
            m->space_log_ms = t;
            cf_warn("checkpoint: not writing %s: %" PRIu64 " MiB free in %s, a full copy needs "
                    "%" PRIu64 " MiB (store + reserve); postponed to the next snapshot",
                    m->in.name, avail >> 20, m->dir, need >> 20);
        }
        return 1;
    }
    m->rtxn = store_rtxn_begin(m->st);
    if (m->rtxn == NULL) return -1;
    if (start_job(m, J_WRITE) != 0) {
        store_rtxn_end(m->rtxn);
        m->rtxn = NULL;
        return -1;
    }
    cf_info("checkpoint: writing %s (applied %" PRIu64 ") off the loop thread", m->in.name,
            m->in.applied);
    return 0;
}

int ckpt_mgr_install(struct ckpt_mgr *m, const uint8_t group_id[16], uint64_t min_applied,
                     const char *const *sources, size_t n_sources)
{
    struct ckpt_info *l = NULL, best;
    size_t n = 0;
    int have = 0, rc;
    uint64_t t = now_ms();
    char err[512], path[4200];
    uint8_t gid[16];

    ckpt_mgr_poll(m);
    if (store_applied_index(m->st) >= min_applied) return 0;
    if (m->running) {
        if (m->job == J_WRITE) m->cancel = 1; /* installing wins over writing */
        return 1;
    }
    if (ckpt_list(m->dir, &l, &n) != 0) {
        cf_error("checkpoint: cannot list %s", m->dir);
        return 1;
    }
    for (size_t i = 0; i < n && !have; i++) {
        if (l[i].applied < min_applied) break;
        if (!is_zero16(group_id) && memcmp(l[i].group_id, group_id, 16) != 0) continue;
        best = l[i];
        have = 1;
    }
    free(l);
    if (have && strcmp(best.name, m->verified) == 0) {
        snprintf(path, sizeof path, "%s/%s", m->dir, best.name);
        rc = store_replace(m->st, path, err, sizeof err);
        if (rc == 1) {
            if (t - m->last_wait_log_ms >= CKPT_LOG_EVERY_MS) {
                m->last_wait_log_ms = t;
                cf_info("checkpoint: %s ready; waiting for %u store readers to finish", best.name,
                        store_readers(m->st));
            }
            return 1;
        }
        if (rc != 0) {
            cf_crit("checkpoint: installing %s failed: %s", best.name, err);
            return -1;
        }
        /* the file is now the store: forget its manifest */
        snprintf(path, sizeof path, "%s/%s.manifest", m->dir, best.name);
        unlink(path);
        m->verified[0] = '\0';
        m->stats.installed++;
        prune(m);
        store_group_id(m->st, gid);
        if (!is_zero16(group_id) && memcmp(gid, group_id, 16) != 0) {
            cf_crit("checkpoint: installed %s belongs to another group", best.name);
            return -1;
        }
        cf_notice("checkpoint: installed %s: store now at applied %" PRIu64 " (needed %" PRIu64 ")",
                  best.name, store_applied_index(m->st), min_applied);
        return store_applied_index(m->st) >= min_applied ? 0 : -1;
    }
    if (set_sources(m, sources, n_sources) != 0) return 1;
    m->min_applied = min_applied;
    if (have) {
        m->in = best;
        if (start_job(m, J_VERIFY) != 0) return 1;
        cf_info("checkpoint: verifying local %s before installing it", best.name);
        return 1;
    }
    if (t < m->next_fetch_ms) return 1;
    if (n_sources == 0) {
        m->next_fetch_ms = t + CKPT_FETCH_RETRY_MS;
        if (t - m->last_wait_log_ms >= CKPT_LOG_EVERY_MS) {
            m->last_wait_log_ms = t;
            cf_warn("checkpoint: store needs a checkpoint at or beyond %" PRIu64
                    " but no peer address is known yet",
                    min_applied);
        }
        return 1;
    }
    memset(&m->in, 0, sizeof m->in);
    memcpy(m->in.group_id, group_id, 16);
    if (start_job(m, J_FETCH) != 0) {
        free_sources(m);
        return 1;
    }
    cf_notice("checkpoint: store at %" PRIu64 " is behind snapshot %" PRIu64
              ": fetching a checkpoint from %s%s",
              store_applied_index(m->st), min_applied, sources[0],
              n_sources > 1 ? " (or other members)" : "");
    return 1;
}

int ckpt_mgr_newest(struct ckpt_mgr *m, uint64_t min_applied, struct ckpt_info *ci_r)
{
    struct ckpt_info *l = NULL;
    size_t n = 0;
    int rc = -1;

    ckpt_mgr_poll(m);
    if (ckpt_list(m->dir, &l, &n) != 0) return -1;
    if (n > 0 && l[0].applied >= min_applied) {
        *ci_r = l[0];
        rc = 0;
    }
    free(l);
    return rc;
}

void ckpt_mgr_bad(struct ckpt_mgr *m, const char *name, const char *why)
{
    m->stats.refused++;
    cf_crit("checkpoint: %s does not match its manifest (%s): deleted, never served again", name,
            why);
    ckpt_delete(m->dir, name);
    if (strcmp(m->verified, name) == 0) m->verified[0] = '\0';
    prune(m);
}

void ckpt_mgr_served(struct ckpt_mgr *m)
{
    m->stats.served++;
}

const char *ckpt_mgr_dir(const struct ckpt_mgr *m)
{
    return m->dir;
}

const char *ckpt_mgr_state(const struct ckpt_mgr *m)
{
    if (m == NULL || !m->running) return "idle";
    switch (m->job) {
    case J_WRITE:
        return "writing";
    case J_VERIFY:
        return "verifying";
    case J_FETCH:
        return "fetching";
    default:
        return "idle";
    }
}

void ckpt_mgr_stats(struct ckpt_mgr *m, struct ckpt_stats *s_r)
{
    ckpt_mgr_poll(m);
    *s_r = m->stats;
}

void ckpt_mgr_wait(struct ckpt_mgr *m)
{
    if (m == NULL || !m->running) return;
    while (!atomic_load(&m->done))
        usleep(1000);
    ckpt_mgr_poll(m);
}
