/* px_tls: see px_tls.h. */
#include "px_tls.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>

#include <openssl/core_names.h>
#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/rand.h>
#include <openssl/x509v3.h>

#include "cf_log.h"
#include "cf_tls.h"

struct sni_ctx {
    char *name;
    SSL_CTX *ctx;
};

struct cert_info {
    char *path;
    X509 *x; /* referenced */
};

#define BE_SESSIONS 32 /* backend addresses with a session to resume */

struct be_session {
    char addr[128];
    SSL_SESSION *sess; /* referenced; NULL = free slot */
    uint64_t used;     /* LRU stamp */
};

struct px_tls {
    int refs;
    struct be_session be_sess[BE_SESSIONS];
    uint64_t be_stamp;
    SSL_CTX *server[PX_L_COUNT];
    struct sni_ctx *sni;
    size_t n_sni;
    SSL_CTX *backend;
    char *backend_name;
    struct cert_info *certs;
    size_t n_certs;
};

/* ---- ticket keys (process-wide) ---- */

struct ticket_key {
    unsigned char name[16], aes[32], hmac[32];
    int valid;
};
static struct ticket_key g_keys[2]; /* [0] current, [1] previous */

int px_tls_rotate_ticket_keys(void)
{
    struct ticket_key k;
    if (RAND_bytes(k.name, sizeof(k.name)) != 1 || RAND_bytes(k.aes, sizeof(k.aes)) != 1 ||
        RAND_bytes(k.hmac, sizeof(k.hmac)) != 1)
        return -1;
    k.valid = 1;
    g_keys[1] = g_keys[0];
    g_keys[0] = k;
    OPENSSL_cleanse(&k, sizeof(k));
    return 0;
}

void px_tls_cleanup(void)
{
    OPENSSL_cleanse(g_keys, sizeof(g_keys));
}

static int ticket_cb(SSL *s, unsigned char key_name[16], unsigned char *iv, EVP_CIPHER_CTX *cctx,
                     EVP_MAC_CTX *hctx, int enc)
{
    OSSL_PARAM params[2];
    (void)s;
    params[0] = OSSL_PARAM_construct_utf8_string(OSSL_MAC_PARAM_DIGEST, (char *)"SHA256", 0);
    params[1] = OSSL_PARAM_construct_end();
    if (enc) {
        const struct ticket_key *k = &g_keys[0];
        if (!k->valid || RAND_bytes(iv, EVP_MAX_IV_LENGTH) != 1) return -1;
        memcpy(key_name, k->name, 16);
        if (EVP_EncryptInit_ex(cctx, EVP_aes_256_cbc(), NULL, k->aes, iv) != 1) return -1;
        if (EVP_MAC_init(hctx, k->hmac, sizeof(k->hmac), params) != 1) return -1;
        return 1;
    }
    for (int i = 0; i < 2; i++) {
        const struct ticket_key *k = &g_keys[i];
        if (!k->valid || memcmp(key_name, k->name, 16) != 0) continue;
        if (EVP_MAC_init(hctx, k->hmac, sizeof(k->hmac), params) != 1) return -1;
        if (EVP_DecryptInit_ex(cctx, EVP_aes_256_cbc(), NULL, k->aes, iv) != 1) return -1;
        return i == 0 ? 1 : 2; /* 2: valid, issue a fresh ticket */
    }
    return 0; /* unknown key: full handshake */
}

/* ---- SNI ---- */

static int name_match(const char *pattern, const char *name)
{
    if (strcasecmp(pattern, name) == 0) return 1;
    if (pattern[0] == '*' && pattern[1] == '.') {
        const char *dot = strchr(name, '.');
        return dot != NULL && dot != name && strcasecmp(dot + 1, pattern + 2) == 0;
    }
    return 0;
}

static int sni_cb(SSL *ssl, int *al, void *arg)
{
    struct px_tls *t = arg;
    const char *name = SSL_get_servername(ssl, TLSEXT_NAMETYPE_host_name);
    (void)al;
    if (name == NULL || t == NULL) return SSL_TLSEXT_ERR_OK;
    for (size_t i = 0; i < t->n_sni; i++) {
        if (name_match(t->sni[i].name, name)) {
            SSL_set_SSL_CTX(ssl, t->sni[i].ctx);
            break;
        }
    }
    return SSL_TLSEXT_ERR_OK;
}

/* ---- construction ---- */

static int remember_cert(struct px_tls *t, SSL_CTX *ctx, const char *path)
{
    X509 *x = SSL_CTX_get0_certificate(ctx);
    if (x == NULL) return 0;
    for (size_t i = 0; i < t->n_certs; i++)
        if (strcmp(t->certs[i].path, path) == 0) return 0;
    struct cert_info *n = realloc(t->certs, (t->n_certs + 1) * sizeof(*n));
    if (n == NULL) return -1;
    t->certs = n;
    n[t->n_certs].path = strdup(path);
    if (n[t->n_certs].path == NULL) return -1;
    X509_up_ref(x);
    n[t->n_certs].x = x;
    t->n_certs++;
    return 0;
}

static SSL_CTX *server_ctx(struct px_tls *t, const struct px_conf *c, const char *cert,
                           const char *key, int with_sni, char *err, size_t errlen)
{
    struct cf_tls_server_opts o = {
        .cert_file = cert,
        .key_file = key,
        .min_version = c->tls_min_version,
        .ciphers = c->tls_ciphers,
        .ciphersuites = c->tls_ciphersuites,
        .groups = c->tls_groups,
    };
    SSL_CTX *ctx = cf_tls_server_ctx(&o, err, errlen);
    if (ctx == NULL) return NULL;
    if (c->tls_session_cache > 0) {
        SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_SERVER);
        SSL_CTX_sess_set_cache_size(ctx, (long)c->tls_session_cache);
    } else {
        SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_OFF);
    }
    /* a ticket outlives its key by at most one rotation */
    SSL_CTX_set_timeout(ctx, (long)(c->tls_ticket_lifetime_ms / 1000));
    SSL_CTX_set_tlsext_ticket_key_evp_cb(ctx, ticket_cb);
    /* two tickets per TLS 1.3 handshake is OpenSSL's default; one is enough
     * for mail clients and saves a record per connection */
    SSL_CTX_set_num_tickets(ctx, 1);
    if (with_sni) {
        SSL_CTX_set_tlsext_servername_callback(ctx, sni_cb);
        SSL_CTX_set_tlsext_servername_arg(ctx, t);
    }
    if (remember_cert(t, ctx, cert) < 0) {
        SSL_CTX_free(ctx);
        snprintf(err, errlen, "out of memory");
        return NULL;
    }
    return ctx;
}

struct px_tls *px_tls_new(const struct px_conf *c, char *err, size_t errlen)
{
    struct px_tls *t = calloc(1, sizeof(*t));
    if (t == NULL) {
        snprintf(err, errlen, "out of memory");
        return NULL;
    }
    t->refs = 1;
    if (!g_keys[0].valid && px_tls_rotate_ticket_keys() < 0) {
        snprintf(err, errlen, "cannot create TLS ticket keys");
        goto fail;
    }
    if (c->n_sni) {
        t->sni = calloc(c->n_sni, sizeof(*t->sni));
        if (t->sni == NULL) goto oom;
        for (size_t i = 0; i < c->n_sni; i++) {
            char e2[300];
            t->sni[i].name = strdup(c->sni[i].name);
            if (t->sni[i].name == NULL) goto oom;
            t->n_sni = i + 1;
            t->sni[i].ctx = server_ctx(t, c, c->sni[i].cert, c->sni[i].key, 0, e2, sizeof(e2));
            if (t->sni[i].ctx == NULL) {
                snprintf(err, errlen, "[sni %s]: %s", c->sni[i].name, e2);
                goto fail;
            }
        }
    }
    static const char *lname[PX_L_COUNT] = {"imap", "imaps", "pop3", "pop3s"};
    for (int i = 0; i < PX_L_COUNT; i++) {
        char e2[300];
        if (!*c->l[i].listen) continue;
        const char *cert = *c->l[i].cert ? c->l[i].cert : c->tls_cert;
        const char *key = *c->l[i].key ? c->l[i].key : c->tls_key;
        t->server[i] = server_ctx(t, c, cert, key, 1, e2, sizeof(e2));
        if (t->server[i] == NULL) {
            snprintf(err, errlen, "[%s] TLS: %s", lname[i], e2);
            goto fail;
        }
    }
    {
        char e2[300];
        t->backend = cf_tls_client_ctx(c->be_ca, c->be_cert, c->be_key, e2, sizeof(e2));
        if (t->backend == NULL) {
            snprintf(err, errlen, "[backend] TLS: %s", e2);
            goto fail;
        }
        if (remember_cert(t, t->backend, c->be_cert) < 0) goto oom;
        /* OpenSSL's own client cache stays off: px_session keeps one
         * session per store address here (px_tls_backend_session) */
        SSL_CTX_set_session_cache_mode(t->backend, SSL_SESS_CACHE_OFF);
    }
    if (*c->be_tls_name) {
        t->backend_name = strdup(c->be_tls_name);
        if (t->backend_name == NULL) goto oom;
    }
    return t;
oom:
    snprintf(err, errlen, "out of memory");
fail:
    t->refs = 1;
    px_tls_unref(&t);
    return NULL;
}

struct px_tls *px_tls_ref(struct px_tls *t)
{
    if (t) t->refs++;
    return t;
}

void px_tls_unref(struct px_tls **tp)
{
    if (tp == NULL || *tp == NULL) return;
    struct px_tls *t = *tp;
    *tp = NULL;
    if (--t->refs > 0) return;
    for (int i = 0; i < PX_L_COUNT; i++)
        SSL_CTX_free(t->server[i]);
    for (size_t i = 0; i < t->n_sni; i++) {
        SSL_CTX_free(t->sni[i].ctx);
        free(t->sni[i].name);
    }
    free(t->sni);
    SSL_CTX_free(t->backend);
    for (size_t i = 0; i < t->n_certs; i++) {
        X509_free(t->certs[i].x);
        free(t->certs[i].path);
    }
    free(t->certs);
    free(t->backend_name);
    for (int i = 0; i < BE_SESSIONS; i++)
        SSL_SESSION_free(t->be_sess[i].sess);
    free(t);
}

static struct be_session *be_find(struct px_tls *t, const char *addr)
{
    for (int i = 0; i < BE_SESSIONS; i++)
        if (t->be_sess[i].sess != NULL && strcmp(t->be_sess[i].addr, addr) == 0)
            return &t->be_sess[i];
    return NULL;
}

SSL_SESSION *px_tls_backend_session(struct px_tls *t, const char *addr)
{
    struct be_session *e = be_find(t, addr);
    if (e == NULL) return NULL;
    time_t now = time(NULL);
    if ((time_t)SSL_SESSION_get_time(e->sess) + (time_t)SSL_SESSION_get_timeout(e->sess) <= now) {
        SSL_SESSION_free(e->sess);
        e->sess = NULL;
        return NULL;
    }
    e->used = ++t->be_stamp;
    return e->sess;
}

void px_tls_backend_session_put(struct px_tls *t, const char *addr, SSL_SESSION *sess)
{
    struct be_session *e = be_find(t, addr);
    if (e == NULL && sess != NULL && strlen(addr) < sizeof(e->addr)) {
        e = &t->be_sess[0];
        for (int i = 0; i < BE_SESSIONS; i++) {
            if (t->be_sess[i].sess == NULL) {
                e = &t->be_sess[i];
                break;
            }
            if (t->be_sess[i].used < e->used) e = &t->be_sess[i];
        }
        SSL_SESSION_free(e->sess);
        e->sess = NULL;
        snprintf(e->addr, sizeof(e->addr), "%s", addr);
    }
    if (e == NULL) {
        SSL_SESSION_free(sess);
        return;
    }
    SSL_SESSION_free(e->sess);
    e->sess = sess;
    e->used = ++t->be_stamp;
}

SSL_CTX *px_tls_server(struct px_tls *t, int kind)
{
    return kind >= 0 && kind < PX_L_COUNT ? t->server[kind] : NULL;
}

SSL_CTX *px_tls_backend(struct px_tls *t)
{
    return t->backend;
}

const char *px_tls_backend_name(const struct px_tls *t)
{
    return t->backend_name;
}

int px_tls_check_expiry(const struct px_tls *t, unsigned warn_days)
{
    int reported = 0;
    for (size_t i = 0; i < t->n_certs; i++) {
        int days = 0, secs = 0;
        const ASN1_TIME *na = X509_get0_notAfter(t->certs[i].x);
        if (na == NULL || ASN1_TIME_diff(&days, &secs, NULL, na) != 1) continue;
        if (days < 0 || secs < 0 || (days == 0 && secs == 0)) {
            cf_error("tls: certificate %s has EXPIRED", t->certs[i].path);
            reported++;
        } else if (warn_days > 0 && (unsigned)days < warn_days) {
            cf_warn("tls: certificate %s expires in %d days (warning threshold %u days)",
                    t->certs[i].path, days, warn_days);
            reported++;
        }
    }
    return reported;
}
