/* cf_tls: OpenSSL contexts. See cf_tls.h. */
#include "cf_tls.h"

#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>

#include <openssl/err.h>

void cf_tls_errstr(char *buf, size_t len)
{
    unsigned long e, last = 0;

    if (len == 0) return;
    /* keep the most recent (most specific) entry, drain the rest */
    while ((e = ERR_get_error()) != 0)
        last = e;
    if (last == 0) {
        snprintf(buf, len, "unknown error");
        return;
    }
    ERR_error_string_n(last, buf, len);
}

int cf_tls_check_key_perms(const char *path, char *err, size_t errlen)
{
    struct stat st;

    if (path == NULL) {
        snprintf(err, errlen, "no key file configured");
        return -1;
    }
    if (stat(path, &st) != 0) {
        snprintf(err, errlen, "key file %s: %s", path, strerror(errno));
        return -1;
    }
    if (!S_ISREG(st.st_mode)) {
        snprintf(err, errlen, "key file %s: not a regular file", path);
        return -1;
    }
    if ((st.st_mode & 077) != 0) {
        snprintf(err, errlen,
                 "key file %s: mode %04o is readable by group or others; refusing "
                 "(chmod 600 %s)",
                 path, (unsigned)(st.st_mode & 07777), path);
        return -1;
    }
    return 0;
}

static int parse_version(const char *s, int *ver_r)
{
    if (s == NULL || *s == '\0' || strcasecmp(s, "TLSv1.2") == 0 || strcasecmp(s, "TLS1.2") == 0 ||
        strcmp(s, "1.2") == 0) {
        *ver_r = TLS1_2_VERSION;
        return 0;
    }
    if (strcasecmp(s, "TLSv1.3") == 0 || strcasecmp(s, "TLS1.3") == 0 || strcmp(s, "1.3") == 0) {
        *ver_r = TLS1_3_VERSION;
        return 0;
    }
    return -1;
}

/* Load cert chain + key into ctx after the permission check. */
static int load_cert_key(SSL_CTX *ctx, const char *cert, const char *key, char *err, size_t errlen)
{
    char ebuf[256];

    if (cf_tls_check_key_perms(key, err, errlen) < 0) return -1;
    if (SSL_CTX_use_certificate_chain_file(ctx, cert) != 1) {
        cf_tls_errstr(ebuf, sizeof(ebuf));
        snprintf(err, errlen, "certificate %s: %s", cert, ebuf);
        return -1;
    }
    if (SSL_CTX_use_PrivateKey_file(ctx, key, SSL_FILETYPE_PEM) != 1) {
        cf_tls_errstr(ebuf, sizeof(ebuf));
        snprintf(err, errlen, "key %s: %s", key, ebuf);
        return -1;
    }
    if (SSL_CTX_check_private_key(ctx) != 1) {
        cf_tls_errstr(ebuf, sizeof(ebuf));
        snprintf(err, errlen, "key %s does not match certificate %s: %s", key, cert, ebuf);
        return -1;
    }
    return 0;
}

SSL_CTX *cf_tls_server_ctx(const struct cf_tls_server_opts *o, char *err, size_t errlen)
{
    static const unsigned char sid_ctx[] = "coffer";
    SSL_CTX *ctx = NULL;
    char ebuf[256];
    int ver;

    ERR_clear_error();
    if (o->cert_file == NULL || o->key_file == NULL) {
        snprintf(err, errlen, "TLS needs both a certificate and a key file");
        return NULL;
    }
    if (parse_version(o->min_version, &ver) < 0) {
        snprintf(err, errlen, "unknown TLS min version \"%s\" (TLSv1.2 or TLSv1.3)",
                 o->min_version);
        return NULL;
    }
    ctx = SSL_CTX_new(TLS_server_method());
    if (ctx == NULL) goto ossl_fail;
    if (SSL_CTX_set_min_proto_version(ctx, ver) != 1) goto ossl_fail;
    SSL_CTX_set_options(ctx, SSL_OP_NO_COMPRESSION | SSL_OP_CIPHER_SERVER_PREFERENCE |
                                 SSL_OP_NO_RENEGOTIATION);
    SSL_CTX_set_mode(ctx, SSL_MODE_ENABLE_PARTIAL_WRITE | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER |
                              SSL_MODE_RELEASE_BUFFERS);
    if (o->ciphers != NULL && *o->ciphers != '\0' &&
        SSL_CTX_set_cipher_list(ctx, o->ciphers) != 1) {
        cf_tls_errstr(ebuf, sizeof(ebuf));
        snprintf(err, errlen, "bad cipher list \"%s\": %s", o->ciphers, ebuf);
        goto fail;
    }
    if (o->ciphersuites != NULL && *o->ciphersuites != '\0' &&
        SSL_CTX_set_ciphersuites(ctx, o->ciphersuites) != 1) {
        cf_tls_errstr(ebuf, sizeof(ebuf));
        snprintf(err, errlen, "bad TLS 1.3 ciphersuites \"%s\": %s", o->ciphersuites, ebuf);
        goto fail;
    }
    if (o->groups != NULL && *o->groups != '\0' && SSL_CTX_set1_groups_list(ctx, o->groups) != 1) {
        cf_tls_errstr(ebuf, sizeof(ebuf));
        snprintf(err, errlen, "bad groups \"%s\": %s", o->groups, ebuf);
        goto fail;
    }
    if (load_cert_key(ctx, o->cert_file, o->key_file, err, errlen) < 0) goto fail;
    if (o->ca_file != NULL && *o->ca_file != '\0') {
        STACK_OF(X509_NAME) * names;
        if (SSL_CTX_load_verify_locations(ctx, o->ca_file, NULL) != 1) {
            cf_tls_errstr(ebuf, sizeof(ebuf));
            snprintf(err, errlen, "CA file %s: %s", o->ca_file, ebuf);
            goto fail;
        }
        names = SSL_load_client_CA_file(o->ca_file);
        if (names != NULL) SSL_CTX_set_client_CA_list(ctx, names);
        SSL_CTX_set_verify(
            ctx, SSL_VERIFY_PEER | (o->require_client_cert ? SSL_VERIFY_FAIL_IF_NO_PEER_CERT : 0),
            NULL);
    } else if (o->require_client_cert) {
        snprintf(err, errlen, "client certificates required but no CA file configured");
        goto fail;
    }
    SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_SERVER);
    SSL_CTX_set_session_id_context(ctx, sid_ctx, sizeof(sid_ctx) - 1);
    /* TLS 1.3: one ticket per handshake instead of OpenSSL's two (a client
     * keeps one; the second costs an encryption and a record per login) */
    SSL_CTX_set_num_tickets(ctx, 1);
    ERR_clear_error();
    return ctx;

ossl_fail:
    cf_tls_errstr(ebuf, sizeof(ebuf));
    snprintf(err, errlen, "TLS context: %s", ebuf);
fail:
    SSL_CTX_free(ctx);
    ERR_clear_error();
    return NULL;
}

SSL_CTX *cf_tls_client_ctx(const char *ca_file, const char *cert_file, const char *key_file,
                           char *err, size_t errlen)
{
    SSL_CTX *ctx;
    char ebuf[256];

    ERR_clear_error();
    ctx = SSL_CTX_new(TLS_client_method());
    if (ctx == NULL) goto ossl_fail;
    if (SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION) != 1) goto ossl_fail;
    SSL_CTX_set_options(ctx, SSL_OP_NO_COMPRESSION | SSL_OP_NO_RENEGOTIATION);
    SSL_CTX_set_mode(ctx, SSL_MODE_ENABLE_PARTIAL_WRITE | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER |
                              SSL_MODE_RELEASE_BUFFERS);
    if (ca_file != NULL && *ca_file != '\0') {
        if (SSL_CTX_load_verify_locations(ctx, ca_file, NULL) != 1) {
            cf_tls_errstr(ebuf, sizeof(ebuf));
            snprintf(err, errlen, "CA file %s: %s", ca_file, ebuf);
            goto fail;
        }
    } else if (SSL_CTX_set_default_verify_paths(ctx) != 1) {
        goto ossl_fail;
    }
    SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER, NULL);
    if ((cert_file != NULL) != (key_file != NULL)) {
        snprintf(err, errlen, "client certificate and key must be given together");
        goto fail;
    }
    if (cert_file != NULL && load_cert_key(ctx, cert_file, key_file, err, errlen) < 0) goto fail;
    ERR_clear_error();
    return ctx;

ossl_fail:
    cf_tls_errstr(ebuf, sizeof(ebuf));
    snprintf(err, errlen, "TLS client context: %s", ebuf);
fail:
    SSL_CTX_free(ctx);
    ERR_clear_error();
    return NULL;
}
