/* cf_tls: OpenSSL context construction shared by every daemon.
 * TLS 1.2 minimum by default; certificate + key files (key files that are
 * group- or world-readable are refused); optional CA file for verifying
 * peers (client certificates for the admin RPC and for proxies). */
#ifndef CF_TLS_H
#define CF_TLS_H

#include <openssl/ssl.h>
#include <stddef.h>

struct cf_tls_server_opts {
    const char *cert_file;   /* PEM chain */
    const char *key_file;    /* PEM key; refused if mode & 077 */
    const char *ca_file;     /* optional: CA to verify client certs */
    int require_client_cert; /* 1: handshake fails without a valid client cert */
    const char *min_version; /* "TLSv1.2" (default) or "TLSv1.3" */
    const char *ciphers;     /* TLS<=1.2 cipher list, NULL = OpenSSL default */
    const char *ciphersuites; /* TLS 1.3 suites, NULL = default */
    const char *groups;      /* e.g. "X25519:P-256", NULL = default */
};

/* Returns a new server SSL_CTX or NULL with a reason in err. */
SSL_CTX *cf_tls_server_ctx(const struct cf_tls_server_opts *o, char *err, size_t errlen);

/* Client context: verifies the server against ca_file (if NULL, system
 * store); presents cert/key when given. */
SSL_CTX *cf_tls_client_ctx(const char *ca_file, const char *cert_file, const char *key_file,
                           char *err, size_t errlen);

/* Refuse key files readable by group/others. Returns 0 if OK, -1 with err. */
int cf_tls_check_key_perms(const char *path, char *err, size_t errlen);

/* Last OpenSSL error queue as text (drains the queue). */
void cf_tls_errstr(char *buf, size_t len);

#endif
