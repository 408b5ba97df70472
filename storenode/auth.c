/* auth: password checks off the loop thread (see auth.h). */
#include "auth.h"

#include <ctype.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/crypto.h>

#include "cf_log.h"
#include "cf_pwhash.h"
#include "store.h"

/* Bounds for AUTH PLAIN: base64 input and decoded fields. */
#define AUTH_PLAIN_MAX_B64 4096
#define AUTH_MAX_PASSWORD 1024

struct auth_req {
    uv_work_t work;
    struct node *n;
    char proto[8];
    char *username; /* as given */
    char *password; /* wiped and freed in the after-work cb */
    size_t password_len;
    char client[64];
    char proxy[64]; /* "" when the client connected directly */
    unsigned scrypt_ln;
    auth_cb cb;
    void *arg;
    int cancelled;
    const char *audit; /* static result word */
    struct auth_reply reply;
};

/* A hash to verify against for unknown users, so that "no such user" costs
 * the same scrypt work as a wrong password. Made once per process (per
 * scrypt_ln) from a fixed password; the result is never compared. */
static pthread_mutex_t dummy_lock = PTHREAD_MUTEX_INITIALIZER;
static char dummy_hash[CF_PWHASH_MAX];
static unsigned dummy_ln = ~0u;

static int get_dummy_hash(unsigned ln, char out[CF_PWHASH_MAX])
{
    int rc = 0;
    pthread_mutex_lock(&dummy_lock);
    if (dummy_ln != ln) {
        static const char pw[] = "coffer-dummy-password";
        rc = cf_pwhash_make(pw, sizeof(pw) - 1, ln, dummy_hash);
        if (rc == 0) dummy_ln = ln;
    }
    if (rc == 0) memcpy(out, dummy_hash, CF_PWHASH_MAX);
    pthread_mutex_unlock(&dummy_lock);
    return rc;
}

static void auth_work(uv_work_t *w)
{
    struct auth_req *r = w->data;
    char name[STORE_MAX_USERNAME + 1];
    char hash[CF_PWHASH_MAX];
    struct store_user u;
    int found = 0, disabled = 0, rc;
    size_t len = strlen(r->username);
    MDB_txn *txn;

    r->reply.result = AUTH_ERROR;
    r->audit = "error";
    hash[0] = '\0';
    if (len > 0 && len <= STORE_MAX_USERNAME) {
        for (size_t i = 0; i <= len; i++)
            name[i] = (char)tolower((unsigned char)r->username[i]);
        txn = store_rtxn_begin(r->n->store);
        if (txn == NULL) return;
        rc = store_user_get(r->n->store, txn, name, &u);
        if (rc == 0) {
            found = 1;
            disabled = u.disabled;
            r->reply.user_id = u.id;
            snprintf(r->reply.username, sizeof(r->reply.username), "%s", u.name);
            snprintf(r->reply.disabled_reason, sizeof(r->reply.disabled_reason), "%s",
                     u.disabled_reason ? u.disabled_reason : "");
            if (snprintf(hash, sizeof(hash), "%s", u.password_hash) >= (int)sizeof(hash))
                hash[0] = '\0'; /* malformed: verify fails with -1 */
        }
        store_rtxn_end(txn);
        if (rc != 0 && rc != STORE_ENOENT) return;
    }
    if (!found) {
        if (get_dummy_hash(r->scrypt_ln, hash) == 0)
            (void)cf_pwhash_verify(r->password, r->password_len, hash);
        r->reply.result = AUTH_BADPASS;
        r->audit = "nouser";
        return;
    }
    rc = cf_pwhash_verify(r->password, r->password_len, hash);
    if (rc < 0) {
        r->reply.result = AUTH_ERROR;
        r->audit = "error";
    } else if (rc == 0) {
        r->reply.result = AUTH_BADPASS;
        r->audit = "badpass";
    } else if (disabled) {
        r->reply.result = AUTH_DISABLED;
        r->audit = "disabled";
    } else {
        r->reply.result = AUTH_OK;
        r->audit = "ok";
    }
    OPENSSL_cleanse(hash, sizeof(hash));
}

static void auth_after(uv_work_t *w, int status)
{
    struct auth_req *r = w->data;
    if (status != 0) { /* UV_ECANCELED */
        r->reply.result = AUTH_ERROR;
        r->audit = "error";
    }
    cf_log_audit_login(r->proto, r->username, r->client, r->proxy[0] ? r->proxy : NULL, r->audit);
    if (r->reply.result != AUTH_OK && r->reply.result != AUTH_DISABLED) {
        r->reply.user_id = 0;
        r->reply.disabled_reason[0] = '\0';
    }
    if (!r->cancelled) r->cb(r->arg, &r->reply);
    OPENSSL_cleanse(r->password, r->password_len);
    free(r->password);
    free(r->username);
    free(r);
}

struct auth_req *auth_verify(struct node *n, const char *proto, const char *username,
                             const char *password, size_t password_len, const char *client_addr,
                             const char *proxy_addr, auth_cb cb, void *arg)
{
    struct auth_req *r = calloc(1, sizeof(*r));
    if (r == NULL) return NULL;
    r->n = n;
    snprintf(r->proto, sizeof(r->proto), "%s", proto);
    snprintf(r->client, sizeof(r->client), "%s", client_addr ? client_addr : "-");
    snprintf(r->proxy, sizeof(r->proxy), "%s", proxy_addr ? proxy_addr : "");
    r->username = strdup(username);
    r->password = malloc(password_len + 1);
    if (r->username == NULL || r->password == NULL) goto fail;
    memcpy(r->password, password, password_len);
    r->password[password_len] = '\0';
    r->password_len = password_len;
    r->scrypt_ln = n->cfg ? n->cfg->scrypt_ln : 0;
    r->cb = cb;
    r->arg = arg;
    r->work.data = r;
    if (uv_queue_work(n->loop, &r->work, auth_work, auth_after) != 0) goto fail;
    return r;
fail:
    if (r->password) {
        OPENSSL_cleanse(r->password, password_len);
        free(r->password);
    }
    free(r->username);
    free(r);
    return NULL;
}

void auth_cancel(struct auth_req *req)
{
    if (req != NULL) req->cancelled = 1;
}

/* Strict base64 (RFC 4648, padding required for partial groups). Returns
 * the decoded length or -1. out must hold len / 4 * 3 bytes. */
static long b64_decode(const char *in, size_t len, unsigned char *out)
{
    static const signed char tab[256] = {
        ['A'] = 1,  ['B'] = 2,  ['C'] = 3,  ['D'] = 4,  ['E'] = 5,  ['F'] = 6,  ['G'] = 7,
        ['H'] = 8,  ['I'] = 9,  ['J'] = 10, ['K'] = 11, ['L'] = 12, ['M'] = 13, ['N'] = 14,
        ['O'] = 15, ['P'] = 16, ['Q'] = 17, ['R'] = 18, ['S'] = 19, ['T'] = 20, ['U'] = 21,
        ['V'] = 22, ['W'] = 23, ['X'] = 24, ['Y'] = 25, ['Z'] = 26, ['a'] = 27, ['b'] = 28,
        ['c'] = 29, ['d'] = 30, ['e'] = 31, ['f'] = 32, ['g'] = 33, ['h'] = 34, ['i'] = 35,
        ['j'] = 36, ['k'] = 37, ['l'] = 38, ['m'] = 39, ['n'] = 40, ['o'] = 41, ['p'] = 42,
        ['q'] = 43, ['r'] = 44, ['s'] = 45, ['t'] = 46, ['u'] = 47, ['v'] = 48, ['w'] = 49,
        ['x'] = 50, ['y'] = 51, ['z'] = 52, ['0'] = 53, ['1'] = 54, ['2'] = 55, ['3'] = 56,
        ['4'] = 57, ['5'] = 58, ['6'] = 59, ['7'] = 60, ['8'] = 61, ['9'] = 62, ['+'] = 63,
        ['/'] = 64,
    }; /* value + 1; 0 = invalid */
    size_t o = 0;
    if (len % 4 != 0) return -1;
    for (size_t i = 0; i < len; i += 4) {
        int v[4], pad = 0;
        for (int k = 0; k < 4; k++) {
            unsigned char ch = (unsigned char)in[i + k];
            if (ch == '=' && i + 4 == len && k >= 2) {
                v[k] = 0;
                pad++;
                continue;
            }
            if (pad > 0 || tab[ch] == 0) return -1; /* data after '=' or invalid character */
            v[k] = tab[ch] - 1;
        }
        uint32_t q = ((uint32_t)v[0] << 18) | ((uint32_t)v[1] << 12) | ((uint32_t)v[2] << 6) |
                     (uint32_t)v[3];
        out[o++] = (unsigned char)(q >> 16);
        if (pad < 2) out[o++] = (unsigned char)(q >> 8);
        if (pad < 1) out[o++] = (unsigned char)q;
    }
    return (long)o;
}

int auth_plain_decode(const char *b64, size_t len, char **user_r, char **pass_r, size_t *pass_len_r)
{
    unsigned char buf[AUTH_PLAIN_MAX_B64 / 4 * 3];
    const unsigned char *authz, *authc, *pass, *nul1, *nul2;
    size_t authz_len, authc_len, pass_len;
    char *user = NULL, *pw = NULL;
    long dl;
    int rc = -1;

    *user_r = NULL;
    *pass_r = NULL;
    *pass_len_r = 0;
    if (len == 0 || len > AUTH_PLAIN_MAX_B64) return -1;
    dl = b64_decode(b64, len, buf);
    if (dl <= 0) goto out;
    nul1 = memchr(buf, '\0', (size_t)dl);
    if (nul1 == NULL) goto out;
    nul2 = memchr(nul1 + 1, '\0', (size_t)(buf + dl - (nul1 + 1)));
    if (nul2 == NULL) goto out;
    authz = buf;
    authz_len = (size_t)(nul1 - buf);
    authc = nul1 + 1;
    authc_len = (size_t)(nul2 - authc);
    pass = nul2 + 1;
    pass_len = (size_t)(buf + dl - pass);
    if (authc_len == 0 || authc_len > STORE_MAX_USERNAME) goto out;
    if (pass_len == 0 || pass_len > AUTH_MAX_PASSWORD || memchr(pass, '\0', pass_len) != NULL)
        goto out;
    for (size_t i = 0; i < authc_len; i++)
        if (authc[i] < 0x20 || authc[i] == 0x7f) goto out;
    if (authz_len != 0) {
        if (authz_len != authc_len) goto out;
        for (size_t i = 0; i < authc_len; i++)
            if (tolower(authz[i]) != tolower(authc[i])) goto out;
    }
    user = malloc(authc_len + 1);
    pw = malloc(pass_len + 1);
    if (user == NULL || pw == NULL) goto out;
    memcpy(user, authc, authc_len);
    user[authc_len] = '\0';
    memcpy(pw, pass, pass_len);
    pw[pass_len] = '\0';
    *user_r = user;
    *pass_r = pw;
    *pass_len_r = pass_len;
    user = NULL;
    pw = NULL;
    rc = 0;
out:
    OPENSSL_cleanse(buf, sizeof(buf));
    free(user);
    free(pw);
    return rc;
}
