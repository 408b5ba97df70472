/* cf_pwhash: scrypt password hashes. See cf_pwhash.h. */
#include "cf_pwhash.h"

#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <openssl/core_names.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/kdf.h>
#include <openssl/params.h>
#include <openssl/rand.h>

#define PW_SALT_LEN 16
#define PW_HASH_LEN 32
#define PW_DEFAULT_LN 14
#define PW_DEFAULT_R 8
#define PW_DEFAULT_P 1
/* Bounds accepted from an encoded hash (anything else is malformed). */
#define PW_MAX_LN 20
#define PW_MAX_R 32
#define PW_MAX_P 16
#define PW_MIN_BYTES 8
#define PW_MAX_BYTES 64
/* Refuse parameter sets needing more memory than this. */
#define PW_MAX_MEM (1536ull * 1024 * 1024)

/* Run scrypt. Returns 0 or -1. */
static int scrypt_derive(const char *password, size_t len, const uint8_t *salt, size_t salt_len,
                         unsigned ln, uint32_t r, uint32_t p, uint8_t *out, size_t out_len)
{
    EVP_KDF *kdf = NULL;
    EVP_KDF_CTX *kctx = NULL;
    OSSL_PARAM params[7], *pp = params;
    uint64_t n = 1ull << ln;
    /* OpenSSL needs 128*r*p (B) + 128*r*(N+2) (V) bytes; give it headroom. */
    uint64_t need = 128ull * r * p + 128ull * r * (n + 2);
    uint64_t maxmem = need + 1024 * 1024;
    int rv = -1;

    if (need > PW_MAX_MEM) return -1;
    kdf = EVP_KDF_fetch(NULL, "SCRYPT", NULL);
    if (kdf == NULL) goto out;
    kctx = EVP_KDF_CTX_new(kdf);
    if (kctx == NULL) goto out;
    *pp++ = OSSL_PARAM_construct_octet_string(OSSL_KDF_PARAM_PASSWORD,
                                              (void *)(len ? password : ""), len);
    *pp++ = OSSL_PARAM_construct_octet_string(OSSL_KDF_PARAM_SALT, (void *)salt, salt_len);
    *pp++ = OSSL_PARAM_construct_uint64(OSSL_KDF_PARAM_SCRYPT_N, &n);
    *pp++ = OSSL_PARAM_construct_uint32(OSSL_KDF_PARAM_SCRYPT_R, &r);
    *pp++ = OSSL_PARAM_construct_uint32(OSSL_KDF_PARAM_SCRYPT_P, &p);
    *pp++ = OSSL_PARAM_construct_uint64(OSSL_KDF_PARAM_SCRYPT_MAXMEM, &maxmem);
    *pp = OSSL_PARAM_construct_end();
    if (EVP_KDF_derive(kctx, out, out_len, params) != 1) goto out;
    rv = 0;
out:
    EVP_KDF_CTX_free(kctx);
    EVP_KDF_free(kdf);
    return rv;
}

static int b64_char_ok(char ch)
{
    return (ch >= 'A' && ch <= 'Z') || (ch >= 'a' && ch <= 'z') || (ch >= '0' && ch <= '9') ||
           ch == '+' || ch == '/';
}

/* Decode exactly `len` chars of padded standard base64 into out (cap
 * bytes). Returns the decoded length or -1 when malformed/too long. */
static int b64_decode(const char *s, size_t len, uint8_t *out, size_t cap)
{
    size_t pad = 0;
    int n;

    if (len == 0 || len % 4 != 0 || len / 4 * 3 > cap) return -1;
    for (size_t i = 0; i < len; i++) {
        if (b64_char_ok(s[i])) {
            if (pad != 0) return -1; /* data after padding */
            continue;
        }
        if (s[i] != '=' || i < len - 2) return -1;
        pad++;
    }
    n = EVP_DecodeBlock(out, (const unsigned char *)s, (int)len);
    if (n < 0 || (size_t)n < pad) return -1;
    return n - (int)pad;
}

/* Parse an unsigned decimal at *p (no sign, at most 9 digits). */
static int parse_uint(const char **p, unsigned *val_r)
{
    unsigned v = 0;
    int digits = 0;

    while (**p >= '0' && **p <= '9') {
        if (++digits > 9) return -1;
        v = v * 10 + (unsigned)(**p - '0');
        (*p)++;
    }
    if (digits == 0) return -1;
    *val_r = v;
    return 0;
}

static int expect(const char **p, const char *lit)
{
    size_t n = strlen(lit);
    if (strncmp(*p, lit, n) != 0) return -1;
    *p += n;
    return 0;
}

int cf_pwhash_make(const char *password, size_t len, unsigned ln, char out[CF_PWHASH_MAX])
{
    uint8_t salt[PW_SALT_LEN], hash[PW_HASH_LEN];
    char salt64[64], hash64[64];
    int n, rv = -1;

    if (ln == 0) ln = PW_DEFAULT_LN;
    if (ln > PW_MAX_LN) return -1;
    if (RAND_bytes(salt, sizeof(salt)) != 1) goto out;
    if (scrypt_derive(password, len, salt, sizeof(salt), ln, PW_DEFAULT_R, PW_DEFAULT_P, hash,
                      sizeof(hash)) < 0)
        goto out;
    EVP_EncodeBlock((unsigned char *)salt64, salt, sizeof(salt));
    EVP_EncodeBlock((unsigned char *)hash64, hash, sizeof(hash));
    n = snprintf(out, CF_PWHASH_MAX, "$scrypt$ln=%u,r=%u,p=%u$%s$%s", ln, PW_DEFAULT_R,
                 PW_DEFAULT_P, salt64, hash64);
    if (n < 0 || n >= CF_PWHASH_MAX) goto out;
    rv = 0;
out:
    OPENSSL_cleanse(hash, sizeof(hash));
    return rv;
}

int cf_pwhash_verify(const char *password, size_t len, const char *encoded)
{
    uint8_t salt[PW_MAX_BYTES + 3], want[PW_MAX_BYTES + 3], got[PW_MAX_BYTES];
    const char *p = encoded, *salt_s, *hash_s, *dollar;
    unsigned ln, r, pp;
    int salt_len, hash_len, rv;

    if (encoded == NULL || strlen(encoded) >= CF_PWHASH_MAX) return -1;
    if (expect(&p, "$scrypt$ln=") < 0 || parse_uint(&p, &ln) < 0) return -1;
    if (expect(&p, ",r=") < 0 || parse_uint(&p, &r) < 0) return -1;
    if (expect(&p, ",p=") < 0 || parse_uint(&p, &pp) < 0) return -1;
    if (expect(&p, "$") < 0) return -1;
    if (ln < 1 || ln > PW_MAX_LN || r < 1 || r > PW_MAX_R || pp < 1 || pp > PW_MAX_P) return -1;
    salt_s = p;
    dollar = strchr(salt_s, '$');
    if (dollar == NULL) return -1;
    hash_s = dollar + 1;
    if (strchr(hash_s, '$') != NULL) return -1;
    salt_len = b64_decode(salt_s, (size_t)(dollar - salt_s), salt, sizeof(salt));
    hash_len = b64_decode(hash_s, strlen(hash_s), want, sizeof(want));
    if (salt_len < PW_MIN_BYTES || salt_len > PW_MAX_BYTES) return -1;
    if (hash_len < PW_MIN_BYTES || hash_len > PW_MAX_BYTES) return -1;
    if (scrypt_derive(password, len, salt, (size_t)salt_len, ln, r, pp, got, (size_t)hash_len) < 0)
        return -1;
    rv = CRYPTO_memcmp(got, want, (size_t)hash_len) == 0 ? 1 : 0;
    OPENSSL_cleanse(got, sizeof(got));
    return rv;
}
