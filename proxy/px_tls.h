/* px_tls: one generation of coffer-mmp's TLS state, built from a px_conf:
 * a server SSL_CTX per listener (its own or the default certificate), one
 * per [sni NAME] certificate (chosen by the client's server name), and the
 * backend client context (the proxy's client certificate). A SIGHUP builds
 * a new generation; sessions keep a reference to the one they started with
 * (STARTTLS and backend connections use it), so a reload never touches an
 * established or half-established session.
 *
 * Session tickets: the ticket keys are process-wide (they survive reloads)
 * and rotate every tls.ticket_key_lifetime; a ticket sealed with the
 * previous key still resumes (and is renewed). Loop thread only. */
#ifndef PX_TLS_H
#define PX_TLS_H

#include <openssl/ssl.h>
#include <stdint.h>

#include "px_config.h"

struct px_tls;

/* Build a generation (refcount 1). NULL with err on failure. */
struct px_tls *px_tls_new(const struct px_conf *c, char *err, size_t errlen);
struct px_tls *px_tls_ref(struct px_tls *t);
void px_tls_unref(struct px_tls **t);

/* Server context of a listener kind (PX_L_*), NULL if that listener is off. */
SSL_CTX *px_tls_server(struct px_tls *t, int kind);
SSL_CTX *px_tls_backend(struct px_tls *t);
/* Name to verify in the stores' certificates (NULL: the node's host). */
const char *px_tls_backend_name(const struct px_tls *t);

/* Backend TLS sessions to resume (backend.tls_resume): at most one per
 * store address, kept in this generation (a reload may change the client
 * certificate the sessions were made with, so it starts without any).
 * px_tls_backend_session: the address's session, borrowed (valid until the
 * next call on this generation), or NULL (none, or expired).
 * px_tls_backend_session_put: keep `sess` for addr, taking over the
 * caller's reference; NULL forgets the address's session (after a failed
 * handshake or connection: the next login does a full handshake). */
SSL_SESSION *px_tls_backend_session(struct px_tls *t, const char *addr);
void px_tls_backend_session_put(struct px_tls *t, const char *addr, SSL_SESSION *sess);

/* Log a warning for every certificate expiring within warn_days (an error
 * for expired ones). Returns how many were reported. */
int px_tls_check_expiry(const struct px_tls *t, unsigned warn_days);

/* Initialise (first call) or rotate the process-wide ticket keys. 0 or -1. */
int px_tls_rotate_ticket_keys(void);
/* Wipe the ticket keys (shutdown). */
void px_tls_cleanup(void);

#endif
