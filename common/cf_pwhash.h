/* cf_pwhash: password hashing with scrypt (OpenSSL EVP_KDF "SCRYPT").
 * Encoded form (self-describing, so parameters can change later):
 *   $scrypt$ln=<log2 N>,r=<r>,p=<p>$<salt base64>$<hash base64>
 * 16-byte random salt, 32-byte hash. Default ln=14, r=8, p=1 (about 16 MiB
 * and tens of ms): call it off the event loop (uv_queue_work). */
#ifndef CF_PWHASH_H
#define CF_PWHASH_H

#include <stddef.h>

#define CF_PWHASH_MAX 160

/* Hash `password` (len bytes) into out (NUL-terminated, at most
 * CF_PWHASH_MAX bytes). ln = log2(N); 0 means the default (14).
 * Returns 0, or -1 on failure (out of memory, RNG failure). */
int cf_pwhash_make(const char *password, size_t len, unsigned ln, char out[CF_PWHASH_MAX]);

/* Verify in constant time with respect to the hash. Returns 1 when the
 * password matches, 0 when it does not, -1 when `encoded` is malformed. */
int cf_pwhash_verify(const char *password, size_t len, const char *encoded);

#endif
