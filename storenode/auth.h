/* auth: password checks for IMAP and POP3 sessions, off the loop thread.
 * scrypt takes tens of ms, so auth_verify() runs the hash on the libuv
 * threadpool (uv_queue_work) and calls back on the loop thread. It also
 * writes the audit line (cf_log_audit_login) for every attempt. */
#ifndef AUTH_H
#define AUTH_H

#include <stdint.h>

#include "node.h"

enum auth_result {
    AUTH_OK = 0,
    AUTH_BADPASS,  /* wrong password or unknown user (same reply to the client) */
    AUTH_DISABLED, /* correct password but account disabled: reason given */
    AUTH_ERROR,    /* internal error */
};

struct auth_reply {
    enum auth_result result;
    uint64_t user_id;
    char username[256]; /* canonical (lower-case) */
    char disabled_reason[256];
};

typedef void (*auth_cb)(void *arg, const struct auth_reply *reply);

struct auth_req; /* opaque, owned by auth.c */

/* Start a check. proto is "imap" or "pop3" (audit). client_addr is the
 * client's address; proxy_addr the trusted proxy that vouched for it (NULL
 * when the client connected directly). Strings are copied.
 * Returns a handle that can be cancelled (session closed before the reply:
 * cb is then not called), or NULL on immediate failure (cb not called). */
struct auth_req *auth_verify(struct node *n, const char *proto, const char *username,
                             const char *password, size_t password_len, const char *client_addr,
                             const char *proxy_addr, auth_cb cb, void *arg);
void auth_cancel(struct auth_req *req);

/* Decode an AUTHENTICATE PLAIN / AUTH PLAIN response (base64 of
 * authzid NUL authcid NUL passwd). Returns 0 and malloc()ed strings, or -1.
 * An authzid different from authcid is refused (-1). */
int auth_plain_decode(const char *b64, size_t len, char **user_r, char **pass_r,
                      size_t *pass_len_r);

#endif
