/* admin_server: the admin RPC listener (proto/coffer_admin.proto) on the
 * admin TLS context. One request at a time per connection: framed
 * AdminRequest in, framed AdminResponse out. Authentication: a client
 * certificate verified against tls.ca, or the configured admin secret.
 * Writes go through propose_entry() and are answered after commit. */
#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/sha.h>

#include "cf_conn.h"
#include "cf_frame.h"
#include "checkpoint.h"
#include "cf_log.h"
#include "coffer_raft.pb-c.h"
#include "cf_pwhash.h"
#include "coffer_admin.pb-c.h"
#include "listeners.h"
#include "node.h"
#include "propose.h"
#include "rep.h"
#include "store.h"

#define ADMIN_MAX_USERNAME 64
#define ADMIN_MAX_PASSWORD 1024
#define ADMIN_MAX_REASON 200
#define ADMIN_VERSION "0.1.0"

struct admin_session;
typedef void (*admin_after_hash)(struct admin_session *s);

struct admin_session {
    struct node *n;
    struct cf_conn *c;
    struct cf_frame_dec dec;
    int authed;
    int busy;      /* a request is being served */
    int conn_gone; /* on_close happened */
    int closing;
    unsigned holds; /* async work / proposals referencing the session */
    char client[64];

    Coffer__AdminRequest *req; /* request being served (unpacked) */
    char username[ADMIN_MAX_USERNAME + 1];
    char okmsg[160];

    /* password hashing off the loop */
    uv_work_t work;
    char *password;
    size_t password_len;
    unsigned scrypt_ln;
    char hash[CF_PWHASH_MAX];
    int hash_rc;
    admin_after_hash after_hash;

    /* status (computed off the loop) */
    char digest[65];
    int digest_rc;
    uint64_t users;
    uint64_t lmdb_used;

    struct store_outcome outcome;

    /* checkpoint stream (CheckpointFetchReq): one 1 MiB read at a time on
     * the libuv threadpool, the next one once the output queue drained */
    int ck_fd;
    int ck_active;
    int ck_wait_drain;
    struct ckpt_info ck;
    uint64_t ck_off;
    uint8_t *ck_buf;
    EVP_MD_CTX *ck_md;
    uv_fs_t ck_req;
};

static void admin_kick(struct admin_session *s);

static void ck_release(struct admin_session *s)
{
    if (s->ck_fd >= 0) {
        close(s->ck_fd);
        s->ck_fd = -1;
    }
    free(s->ck_buf);
    s->ck_buf = NULL;
    EVP_MD_CTX_free(s->ck_md);
    s->ck_md = NULL;
    s->ck_active = 0;
    s->ck_wait_drain = 0;
}

static void admin_maybe_free(struct admin_session *s)
{
    if (!s->conn_gone || s->holds > 0) return;
    ck_release(s);
    cf_frame_dec_free(&s->dec);
    if (s->req) coffer__admin_request__free_unpacked(s->req, NULL);
    if (s->password) {
        OPENSSL_cleanse(s->password, s->password_len);
        free(s->password);
    }
    store_outcome_clear(&s->outcome);
    free(s);
}

static void admin_close(struct admin_session *s, const char *reason)
{
    if (s->conn_gone || s->closing) return;
    s->closing = 1;
    cf_conn_close(s->c, 1, reason);
}

static void send_response(struct admin_session *s, Coffer__AdminResponse *r)
{
    size_t len = coffer__admin_response__get_packed_size(r);
    uint8_t *buf;
    if (s->conn_gone || s->closing) return;
    if (len > CF_FRAME_MAX_DEFAULT) {
        Coffer__AdminResponse e = COFFER__ADMIN_RESPONSE__INIT;
        e.ok = 0;
        e.error = "response too large";
        send_response(s, &e);
        return;
    }
    buf = malloc(4 + len);
    if (buf == NULL) {
        admin_close(s, "out of memory");
        return;
    }
    cf_frame_hdr(buf, (uint32_t)len);
    coffer__admin_response__pack(r, buf + 4);
    cf_conn_write(s->c, buf, 4 + len);
    free(buf);
}

/* Finish the current request: reply and accept the next one. */
static void finish(struct admin_session *s, Coffer__AdminResponse *r)
{
    send_response(s, r);
    if (s->req) {
        coffer__admin_request__free_unpacked(s->req, NULL);
        s->req = NULL;
    }
    if (s->password) {
        OPENSSL_cleanse(s->password, s->password_len);
        free(s->password);
        s->password = NULL;
    }
    OPENSSL_cleanse(s->hash, sizeof(s->hash));
    s->busy = 0;
    admin_kick(s);
}

static void reply_err(struct admin_session *s, const char *msg)
{
    Coffer__AdminResponse r = COFFER__ADMIN_RESPONSE__INIT;
    r.ok = 0;
    r.error = (char *)msg;
    finish(s, &r);
}

static void reply_not_leader(struct admin_session *s)
{
    Coffer__AdminResponse r = COFFER__ADMIN_RESPONSE__INIT;
    char text[256];
    const char *la = s->n->leader_admin;
    if (la[0])
        snprintf(text, sizeof(text), "not leader; leader admin is %s", la);
    else
        snprintf(text, sizeof(text), "not leader; leader unknown");
    r.ok = 0;
    r.error = text;
    if (la[0]) r.leader_admin = (char *)la;
    finish(s, &r);
}

static void reply_ok(struct admin_session *s, const char *msg)
{
    Coffer__AdminResponse r = COFFER__ADMIN_RESPONSE__INIT;
    r.ok = 1;
    r.message = (char *)msg;
    finish(s, &r);
}

/* ---- validation ---- */

/* Lower-case and check a username: 1..64 chars of [a-z0-9._@+-]. */
static int canon_username(const char *in, char out[ADMIN_MAX_USERNAME + 1])
{
    size_t len = in ? strlen(in) : 0;
    if (len == 0 || len > ADMIN_MAX_USERNAME) return -1;
    for (size_t i = 0; i < len; i++) {
        char ch = (char)tolower((unsigned char)in[i]);
        if (!((ch >= 'a' && ch <= 'z') || (ch >= '0' && ch <= '9') || ch == '.' || ch == '_' ||
              ch == '@' || ch == '+' || ch == '-'))
            return -1;
        out[i] = ch;
    }
    out[len] = '\0';
    return 0;
}

static int secret_matches(const char *configured, const char *given)
{
    unsigned char a[SHA256_DIGEST_LENGTH], b[SHA256_DIGEST_LENGTH];
    if (configured == NULL || configured[0] == '\0' || given == NULL) return 0;
    SHA256((const unsigned char *)configured, strlen(configured), a);
    SHA256((const unsigned char *)given, strlen(given), b);
    return CRYPTO_memcmp(a, b, sizeof(a)) == 0;
}

/* ---- proposals ---- */

static void propose_done(void *arg, int status, struct store_outcome *out)
{
    struct admin_session *s = arg;
    s->holds--;
    if (s->conn_gone) {
        admin_maybe_free(s);
        return;
    }
    if (status == REP_ENOTLEADER) {
        reply_not_leader(s);
    } else if (status != REP_OK) {
        reply_err(s, rep_strerror(status));
    } else if (out->result == STORE_OK) {
        reply_ok(s, s->okmsg);
    } else if (out->result == STORE_ENOENT) {
        reply_err(s, out->text[0] ? out->text : "no such user");
    } else if (out->result == STORE_EEXIST) {
        reply_err(s, out->text[0] ? out->text : "user already exists");
    } else {
        reply_err(s, out->text[0] ? out->text : "refused");
    }
    store_outcome_clear(&s->outcome);
}

static void do_propose(struct admin_session *s, Coffer__Entry *e)
{
    int rc;
    if (s->n->rep == NULL || !rep_is_leader(s->n->rep)) {
        reply_not_leader(s);
        return;
    }
    e->actor = "admin";
    memset(&s->outcome, 0, sizeof(s->outcome));
    rc = propose_entry(s->n, e, &s->outcome, propose_done, s);
    if (rc != 0) {
        if (rc == REP_ENOTLEADER)
            reply_not_leader(s);
        else
            reply_err(s, rep_strerror(rc));
        return;
    }
    s->holds++;
}

/* ---- password hashing on the threadpool ---- */

static void hash_work(uv_work_t *w)
{
    struct admin_session *s = w->data;
    s->hash_rc = cf_pwhash_make(s->password, s->password_len, s->scrypt_ln, s->hash);
}

static void hash_after(uv_work_t *w, int status)
{
    struct admin_session *s = w->data;
    s->holds--;
    OPENSSL_cleanse(s->password, s->password_len);
    if (s->conn_gone) {
        admin_maybe_free(s);
        return;
    }
    if (status != 0 || s->hash_rc != 0) {
        reply_err(s, "password hashing failed");
        return;
    }
    s->after_hash(s);
}

static void start_hash(struct admin_session *s, const char *password, admin_after_hash after)
{
    size_t len = password ? strlen(password) : 0;
    if (len == 0 || len > ADMIN_MAX_PASSWORD) {
        reply_err(s, "password must be 1 to 1024 bytes");
        return;
    }
    if (s->n->rep == NULL || !rep_is_leader(s->n->rep)) {
        reply_not_leader(s);
        return;
    }
    s->password = malloc(len + 1);
    if (s->password == NULL) {
        reply_err(s, "out of memory");
        return;
    }
    memcpy(s->password, password, len + 1);
    s->password_len = len;
    s->scrypt_ln = s->n->cfg->scrypt_ln;
    s->after_hash = after;
    s->work.data = s;
    if (uv_queue_work(s->n->loop, &s->work, hash_work, hash_after) != 0) {
        reply_err(s, "cannot queue work");
        return;
    }
    s->holds++;
}

static void user_add_hashed(struct admin_session *s)
{
    static const struct {
        const char *name;
        uint32_t su;
    } initial[] = {
        {"INBOX", COFFER__SPECIAL_USE__SU_NONE}, {"Drafts", COFFER__SPECIAL_USE__SU_DRAFTS},
        {"Sent", COFFER__SPECIAL_USE__SU_SENT},  {"Trash", COFFER__SPECIAL_USE__SU_TRASH},
        {"Junk", COFFER__SPECIAL_USE__SU_JUNK},
    };
    enum { N_INITIAL = sizeof(initial) / sizeof(initial[0]) };
    Coffer__MailboxCreate mbs[N_INITIAL];
    Coffer__MailboxCreate *mbp[N_INITIAL];
    Coffer__UserCreate uc = COFFER__USER_CREATE__INIT;
    Coffer__Entry e = COFFER__ENTRY__INIT;
    for (size_t i = 0; i < N_INITIAL; i++) {
        coffer__mailbox_create__init(&mbs[i]);
        mbs[i].username = s->username;
        mbs[i].name = (char *)initial[i].name;
        if (initial[i].su) {
            mbs[i].has_special_use = 1;
            mbs[i].special_use = initial[i].su;
        }
        mbp[i] = &mbs[i];
    }
    uc.username = s->username;
    uc.password_hash = s->hash;
    uc.n_initial_mailboxes = N_INITIAL;
    uc.initial_mailboxes = mbp;
    e.op_case = COFFER__ENTRY__OP_USER_CREATE;
    e.user_create = &uc;
    snprintf(s->okmsg, sizeof(s->okmsg), "user %s created", s->username);
    do_propose(s, &e);
}

static void user_passwd_hashed(struct admin_session *s)
{
    Coffer__UserSetPassword up = COFFER__USER_SET_PASSWORD__INIT;
    Coffer__Entry e = COFFER__ENTRY__INIT;
    up.username = s->username;
    up.password_hash = s->hash;
    e.op_case = COFFER__ENTRY__OP_USER_SET_PASSWORD;
    e.user_set_password = &up;
    snprintf(s->okmsg, sizeof(s->okmsg), "password of %s changed", s->username);
    do_propose(s, &e);
}

/* ---- read-only commands ---- */

struct user_list_ctx {
    Coffer__UserInfo *infos;
    size_t n, cap;
    int oom;
};

static int user_list_cb(const struct store_user *u, void *arg)
{
    struct user_list_ctx *x = arg;
    if (x->n == x->cap) {
        size_t ncap = x->cap ? x->cap * 2 : 32;
        Coffer__UserInfo *ni = realloc(x->infos, ncap * sizeof(*ni));
        if (ni == NULL) {
            x->oom = 1;
            return 1;
        }
        x->infos = ni;
        x->cap = ncap;
    }
    Coffer__UserInfo *ui = &x->infos[x->n++];
    coffer__user_info__init(ui);
    ui->username = (char *)u->name; /* in map: valid while the txn lives */
    ui->disabled = u->disabled != 0;
    if (u->disabled_reason && u->disabled_reason[0])
        ui->disabled_reason = (char *)u->disabled_reason;
    ui->has_messages = ui->has_storage_bytes = 1;
    ui->messages = u->used_messages;
    ui->storage_bytes = u->used_bytes;
    ui->has_quota_storage_bytes = ui->has_quota_messages = 1;
    ui->quota_storage_bytes = u->quota_bytes;
    ui->quota_messages = u->quota_messages;
    return 0;
}

static void cmd_user_list(struct admin_session *s)
{
    struct user_list_ctx x = {0};
    Coffer__UserInfo **ptrs = NULL;
    MDB_txn *txn = store_rtxn_begin(s->n->store);
    if (txn == NULL) {
        reply_err(s, "cannot read the store");
        return;
    }
    if (store_user_foreach(s->n->store, txn, user_list_cb, &x) != 0 && !x.oom) {
        store_rtxn_end(txn);
        free(x.infos);
        reply_err(s, "cannot read the store");
        return;
    }
    if (!x.oom && x.n > 0 && (ptrs = calloc(x.n, sizeof(*ptrs))) == NULL) x.oom = 1;
    if (x.oom) {
        store_rtxn_end(txn);
        free(x.infos);
        reply_err(s, "out of memory");
        return;
    }
    for (size_t i = 0; i < x.n; i++)
        ptrs[i] = &x.infos[i];
    Coffer__AdminResponse r = COFFER__ADMIN_RESPONSE__INIT;
    r.ok = 1;
    r.n_users = x.n;
    r.users = ptrs;
    finish(s, &r); /* packs while the txn still holds the strings */
    store_rtxn_end(txn);
    free(ptrs);
    free(x.infos);
}

struct mb_list_ctx {
    struct store *st;
    MDB_txn *txn;
    uint64_t user_id;
    Coffer__MailboxInfo *infos;
    size_t n, cap;
    int oom;
};

static int mb_list_cb(const struct store_mailbox *mb, void *arg)
{
    struct mb_list_ctx *x = arg;
    if (x->n == x->cap) {
        size_t ncap = x->cap ? x->cap * 2 : 16;
        Coffer__MailboxInfo *ni = realloc(x->infos, ncap * sizeof(*ni));
        if (ni == NULL) {
            x->oom = 1;
            return 1;
        }
        x->infos = ni;
        x->cap = ncap;
    }
    Coffer__MailboxInfo *mi = &x->infos[x->n++];
    coffer__mailbox_info__init(mi);
    mi->name = (char *)mb->name;
    mi->uidvalidity = mb->uidvalidity;
    mi->uidnext = mb->uidnext;
    mi->highestmodseq = mb->highestmodseq;
    mi->messages = mb->messages;
    mi->unseen = mb->unseen;
    mi->size = mb->size;
    mi->has_special_use = 1;
    mi->special_use = mb->special_use;
    mi->has_subscribed = 1;
    mi->subscribed = store_subs_has(x->st, x->txn, x->user_id, mb->name) == 1;
    return 0;
}

static void cmd_mailbox_list(struct admin_session *s, const char *user)
{
    struct mb_list_ctx x = {0};
    struct store_user u;
    Coffer__MailboxInfo **ptrs = NULL;
    MDB_txn *txn;
    int rc;
    if (canon_username(user, s->username) != 0) {
        reply_err(s, "invalid username");
        return;
    }
    txn = store_rtxn_begin(s->n->store);
    if (txn == NULL) {
        reply_err(s, "cannot read the store");
        return;
    }
    rc = store_user_get(s->n->store, txn, s->username, &u);
    if (rc != 0) {
        store_rtxn_end(txn);
        reply_err(s, rc == STORE_ENOENT ? "no such user" : "cannot read the store");
        return;
    }
    x.st = s->n->store;
    x.txn = txn;
    x.user_id = u.id;
    if (store_mailbox_foreach(s->n->store, txn, u.id, mb_list_cb, &x) != 0 && !x.oom) {
        store_rtxn_end(txn);
        free(x.infos);
        reply_err(s, "cannot read the store");
        return;
    }
    if (!x.oom && x.n > 0 && (ptrs = calloc(x.n, sizeof(*ptrs))) == NULL) x.oom = 1;
    if (x.oom) {
        store_rtxn_end(txn);
        free(x.infos);
        reply_err(s, "out of memory");
        return;
    }
    for (size_t i = 0; i < x.n; i++)
        ptrs[i] = &x.infos[i];
    Coffer__AdminResponse r = COFFER__ADMIN_RESPONSE__INIT;
    r.ok = 1;
    r.n_mailboxes = x.n;
    r.mailboxes = ptrs;
    finish(s, &r);
    store_rtxn_end(txn);
    free(ptrs);
    free(x.infos);
}

static int count_user_cb(const struct store_user *u, void *arg)
{
    (void)u;
    (*(uint64_t *)arg)++;
    return 0;
}

/* Off the loop: the digest walks the whole store. */
static void status_work(uv_work_t *w)
{
    struct admin_session *s = w->data;
    MDB_envinfo info;
    MDB_stat stat;
    MDB_txn *txn;
    s->digest_rc = store_digest(s->n->store, s->digest);
    if (s->digest_rc != 0) s->digest[0] = '\0';
    s->users = 0;
    txn = store_rtxn_begin(s->n->store);
    if (txn != NULL) {
        store_user_foreach(s->n->store, txn, count_user_cb, &s->users);
        store_rtxn_end(txn);
    }
    s->lmdb_used = 0;
    if (mdb_env_info(store_env(s->n->store), &info) == 0 &&
        mdb_env_stat(store_env(s->n->store), &stat) == 0)
        s->lmdb_used = (uint64_t)(info.me_last_pgno + 1) * stat.ms_psize;
}

static const char *member_role(const struct rep_member *m, const struct rep_info *ri,
                               uint64_t self_id)
{
    if (m->role == REP_ROLE_STANDBY) return "standby";
    if (m->role == REP_ROLE_SPARE) return "spare";
    if (m->id == self_id) {
        if (strcmp(ri->role, "leader") == 0 || strcmp(ri->role, "candidate") == 0) return ri->role;
        return "follower";
    }
    return m->id == ri->leader_id ? "leader" : "follower";
}

static void status_after(uv_work_t *w, int status)
{
    struct admin_session *s = w->data;
    struct node *n = s->n;
    struct rep_info ri;
    struct rep_member *rm = NULL;
    size_t n_rm = 0;
    uint8_t gid[16];
    char gidhex[33];
    int zero = 1;
    s->holds--;
    if (s->conn_gone) {
        admin_maybe_free(s);
        return;
    }
    (void)status;
    memset(&ri, 0, sizeof(ri));
    ri.role = "unavailable";
    if (n->rep) rep_get_info(n->rep, &ri);
    if (n->state != NULL && strcmp(n->state, "uninitialised") == 0) ri.role = "uninitialised";
    store_group_id(n->store, gid);
    for (int i = 0; i < 16; i++) {
        snprintf(gidhex + 2 * i, 3, "%02x", gid[i]);
        if (gid[i]) zero = 0;
    }
    if (zero) gidhex[0] = '\0';
    if (n->rep) rep_members(n->rep, &rm, &n_rm);

    Coffer__NodeStatus ns = COFFER__NODE_STATUS__INIT;
    Coffer__MemberStatus *ms = calloc(n_rm ? n_rm : 1, sizeof(*ms));
    Coffer__MemberStatus **members = calloc(n_rm ? n_rm : 1, sizeof(*members));
    struct store_node *sn = calloc(n_rm ? n_rm : 1, sizeof(*sn));
    if (ms == NULL || members == NULL || sn == NULL) {
        free(ms);
        free(members);
        free(sn);
        free(rm);
        reply_err(s, "out of memory");
        return;
    }
    uint64_t applied = store_applied_index(n->store);
    const struct sconf *c = n->cfg;
    ns.node_id = c->node_id;
    ns.group_id = gidhex;
    ns.role = (char *)(ri.role ? ri.role : "unavailable");
    /* A standby or spare reports that role, not "follower". */
    for (size_t i = 0; i < n_rm; i++)
        if (rm[i].id == c->node_id && rm[i].role != REP_ROLE_VOTER)
            ns.role = (char *)member_role(&rm[i], &ri, c->node_id);
    ns.has_term = ns.has_commit_index = ns.has_applied_index = 1;
    ns.term = ri.term;
    ns.commit_index = ri.commit_index;
    ns.applied_index = applied;
    ns.has_last_snapshot_index = 1;
    ns.last_snapshot_index = ri.last_snapshot_index;
    ns.has_last_index = 1;
    ns.last_index = ri.last_index;
    if (s->digest[0]) ns.digest = s->digest;
    ns.has_imap_sessions = ns.has_pop3_sessions = ns.has_users = 1;
    ns.imap_sessions = n->imap_sessions;
    ns.pop3_sessions = n->pop3_sessions;
    ns.users = s->users;
    ns.has_lmdb_map_size = ns.has_lmdb_used_bytes = 1;
    ns.lmdb_map_size = c->map_size;
    ns.lmdb_used_bytes = s->lmdb_used;
    ns.has_pid = 1;
    ns.pid = (uint32_t)getpid();
    ns.version = ADMIN_VERSION;
    ns.raft_address = c->raft_address ? c->raft_address : "";
    ns.imap_address = c->imap_listen ? c->imap_listen : "";
    ns.imaps_address = c->imaps_listen ? c->imaps_listen : "";
    ns.pop3_address = c->pop3_listen ? c->pop3_listen : "";
    ns.pop3s_address = c->pop3s_listen ? c->pop3s_listen : "";
    ns.admin_address = c->admin_listen ? c->admin_listen : "";
    ns.has_leader_id = 1;
    ns.leader_id = ri.leader_id;
    ns.leader_admin = n->leader_admin;
    ns.state = (char *)(n->state ? n->state : "member");
    if (n->ckpt != NULL) {
        struct ckpt_stats cs;
        ckpt_mgr_stats(n->ckpt, &cs);
        ns.has_checkpoint_applied = ns.has_checkpoints_installed = 1;
        ns.has_checkpoints_taken = ns.has_checkpoints_served = 1;
        ns.checkpoint_applied = cs.newest_applied;
        ns.checkpoints_installed = cs.installed;
        ns.checkpoints_taken = cs.taken;
        ns.checkpoints_served = cs.served;
        ns.checkpoint_state = (char *)ckpt_mgr_state(n->ckpt);
    }
    for (size_t i = 0; i < n_rm; i++) {
        Coffer__MemberStatus *m = &ms[i];
        coffer__member_status__init(m);
        store_node_get(n->store, NULL, rm[i].id, &sn[i]);
        m->id = rm[i].id;
        m->address = rm[i].address;
        m->role = (char *)member_role(&rm[i], &ri, c->node_id);
        m->admin_address = sn[i].admin;
        m->imap_address = sn[i].imap[0] ? sn[i].imap : sn[i].imaps;
        if (rm[i].id == c->node_id) {
            m->has_term = m->has_commit = m->has_applied = m->has_pid = 1;
            m->has_last_snapshot = 1;
            m->term = ri.term;
            m->commit = ri.commit_index;
            m->applied = applied;
            m->pid = ns.pid;
            m->last_snapshot = ri.last_snapshot_index;
            m->digest = ns.digest;
        }
        members[i] = m;
    }
    if (n_rm == 0) {
        /* Not started (uninitialised): report itself only. */
        coffer__member_status__init(&ms[0]);
        ms[0].id = c->node_id;
        ms[0].address = ns.raft_address;
        ms[0].role = ns.role;
        ms[0].admin_address = ns.admin_address;
        ms[0].has_applied = ms[0].has_pid = 1;
        ms[0].applied = applied;
        ms[0].pid = ns.pid;
        ms[0].digest = ns.digest;
        members[0] = &ms[0];
        n_rm = 1;
    }
    ns.n_members = n_rm;
    ns.members = members;

    Coffer__AdminResponse r = COFFER__ADMIN_RESPONSE__INIT;
    r.ok = 1;
    r.status = &ns;
    finish(s, &r);
    free(ms);
    free(members);
    free(sn);
    free(rm);
}

static void cmd_status(struct admin_session *s)
{
    s->work.data = s;
    if (uv_queue_work(s->n->loop, &s->work, status_work, status_after) != 0) {
        reply_err(s, "cannot queue work");
        return;
    }
    s->holds++;
}

/* ---- cluster commands (issue 3) ---- */

static void change_done(void *arg, int status)
{
    struct admin_session *s = arg;
    s->holds--;
    if (s->conn_gone) {
        admin_maybe_free(s);
        return;
    }
    if (status == REP_ENOTLEADER || status == REP_ELEADERSHIPLOST)
        reply_not_leader(s);
    else if (status != REP_OK)
        reply_err(s, rep_strerror(status));
    else
        reply_ok(s, s->okmsg);
}

/* NodeInfo first (so status and hints know the node), then the Raft
 * membership change. */
static void node_add_info_done(void *arg, int status, struct store_outcome *out)
{
    struct admin_session *s = arg;
    const Coffer__NodeAddReq *q;
    int rc;
    s->holds--;
    if (s->conn_gone) {
        admin_maybe_free(s);
        return;
    }
    if (status != REP_OK || out->result != STORE_OK) {
        if (status == REP_ENOTLEADER || status == REP_ELEADERSHIPLOST)
            reply_not_leader(s);
        else
            reply_err(s, status != REP_OK ? rep_strerror(status) : out->text);
        store_outcome_clear(&s->outcome);
        return;
    }
    store_outcome_clear(&s->outcome);
    q = s->req->node_add;
    rc = rep_add(s->n->rep, q->node_id, q->raft_address,
                 q->has_standby && q->standby ? REP_ROLE_STANDBY : REP_ROLE_VOTER, change_done, s);
    if (rc != 0) {
        if (rc == REP_ENOTLEADER)
            reply_not_leader(s);
        else
            reply_err(s, rep_strerror(rc));
        return;
    }
    s->holds++;
}

static int addr_ok(const char *a)
{
    if (a == NULL) return 1;
    if (strlen(a) >= 128) return 0;
    for (const char *p = a; *p; p++)
        if ((unsigned char)*p <= 0x20 || *p == 0x7f) return 0;
    return 1;
}

static void cmd_node_add(struct admin_session *s)
{
    const Coffer__NodeAddReq *q = s->req->node_add;
    Coffer__Entry e = COFFER__ENTRY__INIT;
    Coffer__NodeInfo ni = COFFER__NODE_INFO__INIT;
    struct rep_member *rm = NULL;
    size_t n_rm = 0;
    int rc;

    if (s->n->rep == NULL || !rep_is_leader(s->n->rep)) {
        reply_not_leader(s);
        return;
    }
    if (q->node_id == 0 || q->raft_address == NULL || q->raft_address[0] == '\0' ||
        !addr_ok(q->raft_address) || !addr_ok(q->imap_address) || !addr_ok(q->imaps_address) ||
        !addr_ok(q->pop3_address) || !addr_ok(q->pop3s_address) || !addr_ok(q->admin_address)) {
        reply_err(s, "node add needs a node id >= 1 and valid addresses");
        return;
    }
    if (rep_members(s->n->rep, &rm, &n_rm) != 0) {
        reply_err(s, "out of memory");
        return;
    }
    for (size_t i = 0; i < n_rm; i++) {
        if (rm[i].id == q->node_id) {
            snprintf(s->okmsg, sizeof(s->okmsg), "node %llu is already a member (%s)",
                     (unsigned long long)q->node_id, rep_member_role_name(rm[i].role));
            free(rm);
            reply_err(s, s->okmsg);
            return;
        }
        if (strcmp(rm[i].address, q->raft_address) == 0) {
            snprintf(s->okmsg, sizeof(s->okmsg), "Raft address %s already belongs to node %llu",
                     q->raft_address, (unsigned long long)rm[i].id);
            free(rm);
            reply_err(s, s->okmsg);
            return;
        }
    }
    free(rm);
    ni.node_id = q->node_id;
    ni.raft_address = q->raft_address;
    ni.imap_address = q->imap_address;
    ni.imaps_address = q->imaps_address;
    ni.pop3_address = q->pop3_address;
    ni.pop3s_address = q->pop3s_address;
    ni.admin_address = q->admin_address;
    e.op_case = COFFER__ENTRY__OP_NODE_INFO;
    e.node_info = &ni;
    e.actor = "admin";
    snprintf(s->okmsg, sizeof(s->okmsg), "node %llu added as %s", (unsigned long long)q->node_id,
             q->has_standby && q->standby ? "standby" : "voter");
    memset(&s->outcome, 0, sizeof(s->outcome));
    rc = propose_entry(s->n, &e, &s->outcome, node_add_info_done, s);
    if (rc != 0) {
        if (rc == REP_ENOTLEADER)
            reply_not_leader(s);
        else
            reply_err(s, rep_strerror(rc));
        return;
    }
    s->holds++;
}

static void node_remove_done(void *arg, int status)
{
    struct admin_session *s = arg;
    Coffer__Entry e = COFFER__ENTRY__INIT;
    Coffer__NodeInfo ni = COFFER__NODE_INFO__INIT;
    int rc;

    if (status != REP_OK || s->conn_gone || !rep_is_leader(s->n->rep)) {
        change_done(arg, status);
        return;
    }
    /* Forget its addresses (best effort: the membership change is what
     * counts; the answer does not wait for this). */
    ni.node_id = s->req->node_remove->node_id;
    ni.raft_address = "";
    ni.has_removed = 1;
    ni.removed = 1;
    e.op_case = COFFER__ENTRY__OP_NODE_INFO;
    e.node_info = &ni;
    e.actor = "admin";
    rc = propose_entry(s->n, &e, NULL, NULL, NULL);
    if (rc != 0) cf_warn("admin: forgetting removed node's addresses: %s", rep_strerror(rc));
    change_done(arg, status);
}

static void cmd_node_remove(struct admin_session *s)
{
    uint64_t id = s->req->node_remove->node_id;
    int rc;
    if (s->n->rep == NULL || !rep_is_leader(s->n->rep)) {
        reply_not_leader(s);
        return;
    }
    if (id == s->n->cfg->node_id) {
        reply_err(s, "the leader cannot remove itself; transfer leadership first");
        return;
    }
    snprintf(s->okmsg, sizeof(s->okmsg), "node %llu removed", (unsigned long long)id);
    rc = rep_remove(s->n->rep, id, node_remove_done, s);
    if (rc != 0) {
        if (rc == REP_ENOTLEADER)
            reply_not_leader(s);
        else
            reply_err(s, rep_strerror(rc));
        return;
    }
    s->holds++;
}

static void cmd_transfer(struct admin_session *s)
{
    uint64_t id = s->req->transfer->has_node_id ? s->req->transfer->node_id : 0;
    int rc;
    if (s->n->rep == NULL || !rep_is_leader(s->n->rep)) {
        reply_not_leader(s);
        return;
    }
    if (id == s->n->cfg->node_id) {
        reply_ok(s, "this node is already the leader");
        return;
    }
    snprintf(s->okmsg, sizeof(s->okmsg), "leadership transferred");
    rc = rep_transfer(s->n->rep, id, change_done, s);
    if (rc != 0) {
        reply_err(s, rep_strerror(rc));
        return;
    }
    s->holds++;
}

static void cmd_start_raft(struct admin_session *s, int bootstrap)
{
    char err[256];
    if (s->n->start_raft == NULL) {
        reply_err(s, "not supported here");
        return;
    }
    if (!bootstrap && s->n->rep != NULL && rep_is_started(s->n->rep)) {
        struct rep_member *rm = NULL;
        size_t n_rm = 0;
        rep_members(s->n->rep, &rm, &n_rm);
        free(rm);
        if (n_rm == 0) {
            /* already waiting to be added (a retried join) */
            reply_ok(s, "waiting to be added");
            return;
        }
    }
    if (s->n->start_raft(s->n, bootstrap, err, sizeof(err)) != 0) {
        reply_err(s, err);
        return;
    }
    reply_ok(s, bootstrap ? "group bootstrapped" : "waiting to be added");
}

static void cmd_node_leave(struct admin_session *s)
{
    const char *want = s->req->node_leave->group_id;
    uint8_t gid[16];
    char hex[33];
    store_group_id(s->n->store, gid);
    for (int i = 0; i < 16; i++)
        snprintf(hex + 2 * i, 3, "%02x", gid[i]);
    if (want != NULL && want[0] != '\0' && strcmp(want, hex) != 0) {
        reply_err(s, "this node belongs to another group");
        return;
    }
    if (s->n->leave == NULL) {
        reply_err(s, "not supported here");
        return;
    }
    reply_ok(s, "node leaves the group and stops");
    s->n->leave(s->n, "told by cofferctl that it was removed from the group");
}

/* ---- checkpoint streaming (node to node) ---- */

static void ck_next(struct admin_session *s);

static void ck_send(struct admin_session *s, Coffer__CheckpointChunk *ck)
{
    Coffer__AdminResponse r = COFFER__ADMIN_RESPONSE__INIT;
    r.ok = 1;
    r.checkpoint = ck;
    send_response(s, &r);
}

static void ck_fail(struct admin_session *s, const char *why)
{
    cf_warn("admin: checkpoint stream %s to %s stopped: %s", s->ck.name, s->client, why);
    ck_release(s);
    reply_err(s, why);
}

static void ck_read_cb(uv_fs_t *req)
{
    struct admin_session *s = req->data;
    ssize_t n = req->result;
    Coffer__CheckpointChunk ck = COFFER__CHECKPOINT_CHUNK__INIT;

    uv_fs_req_cleanup(req);
    s->holds--;
    if (s->conn_gone || s->closing) {
        ck_release(s);
        admin_maybe_free(s);
        return;
    }
    if (n <= 0) {
        ck_fail(s, n < 0 ? "checkpoint read error" : "checkpoint shorter than its manifest");
        return;
    }
    EVP_DigestUpdate(s->ck_md, s->ck_buf, (size_t)n);
    ck.has_offset = ck.has_data = 1;
    ck.offset = s->ck_off;
    ck.data.data = s->ck_buf;
    ck.data.len = (size_t)n;
    ck_send(s, &ck);
    s->ck_off += (uint64_t)n;
    ck_next(s);
}

static void ck_next(struct admin_session *s)
{
    Coffer__CheckpointChunk ck = COFFER__CHECKPOINT_CHUNK__INIT;
    unsigned char h[32];
    unsigned hl = 0;
    char hex[65];
    uv_buf_t b;
    size_t want;

    if (s->conn_gone || s->closing) return;
    if (cf_conn_out_pending(s->c) > CF_CONN_OUT_HIGH) {
        s->ck_wait_drain = 1; /* on_drain calls back */
        return;
    }
    if (s->ck_off >= s->ck.size) {
        if (EVP_DigestFinal_ex(s->ck_md, h, &hl) != 1 || hl != 32) {
            ck_fail(s, "sha256 failed");
            return;
        }
        for (int i = 0; i < 32; i++)
            snprintf(hex + 2 * i, 3, "%02x", h[i]);
        if (strcmp(hex, s->ck.sha256) != 0) {
            ckpt_mgr_bad(s->n->ckpt, s->ck.name, "checksum mismatch while serving");
            ck_release(s);
            reply_err(s, "checkpoint failed its checksum on the server; deleted, try again later");
            return;
        }
        ck.has_last = 1;
        ck.last = 1;
        ck.sha256 = hex;
        ckpt_mgr_served(s->n->ckpt);
        cf_notice("admin: streamed checkpoint %s (%" PRIu64 " bytes) to %s", s->ck.name, s->ck.size,
                  s->client);
        ck_release(s);
        {
            Coffer__AdminResponse r = COFFER__ADMIN_RESPONSE__INIT;
            r.ok = 1;
            r.checkpoint = &ck;
            finish(s, &r);
        }
        return;
    }
    want = s->ck.size - s->ck_off > CKPT_CHUNK ? CKPT_CHUNK : (size_t)(s->ck.size - s->ck_off);
    b = uv_buf_init((char *)s->ck_buf, (unsigned)want);
    s->ck_req.data = s;
    if (uv_fs_read(s->n->loop, &s->ck_req, s->ck_fd, &b, 1, (int64_t)s->ck_off, ck_read_cb) != 0) {
        ck_fail(s, "cannot queue a checkpoint read");
        return;
    }
    s->holds++;
}

static void cmd_checkpoint_fetch(struct admin_session *s)
{
    const Coffer__CheckpointFetchReq *q = s->req->checkpoint_fetch;
    Coffer__CheckpointChunk ck = COFFER__CHECKPOINT_CHUNK__INIT;
    uint8_t gid[16];
    char hex[33], path[4200], msg[160];

    if (s->n->ckpt == NULL) {
        reply_err(s, "this node keeps no checkpoints");
        return;
    }
    store_group_id(s->n->store, gid);
    for (int i = 0; i < 16; i++)
        snprintf(hex + 2 * i, 3, "%02x", gid[i]);
    if (q->group_id == NULL || strcmp(q->group_id, hex) != 0) {
        reply_err(s, "checkpoint of another group requested");
        return;
    }
    if (ckpt_mgr_newest(s->n->ckpt, q->min_applied, &s->ck) != 0) {
        snprintf(msg, sizeof msg, "no checkpoint at or beyond index %" PRIu64 " here yet",
                 (uint64_t)q->min_applied);
        reply_err(s, msg);
        return;
    }
    snprintf(path, sizeof path, "%s/%s", ckpt_mgr_dir(s->n->ckpt), s->ck.name);
    s->ck_fd = open(path, O_RDONLY | O_CLOEXEC);
    s->ck_buf = malloc(CKPT_CHUNK);
    s->ck_md = EVP_MD_CTX_new();
    if (s->ck_fd < 0 || s->ck_buf == NULL || s->ck_md == NULL ||
        EVP_DigestInit_ex(s->ck_md, EVP_sha256(), NULL) != 1) {
        ck_release(s);
        reply_err(s, "cannot open the checkpoint");
        return;
    }
    s->ck_active = 1;
    s->ck_off = 0;
    cf_info("admin: streaming checkpoint %s (applied %" PRIu64 ", %" PRIu64 " bytes) to %s",
            s->ck.name, s->ck.applied, s->ck.size, s->client);
    ck.name = s->ck.name;
    ck.has_size = ck.has_applied = 1;
    ck.size = s->ck.size;
    ck.applied = s->ck.applied;
    ck.sha256 = s->ck.sha256;
    ck_send(s, &ck);
    ck_next(s);
}

static void on_drain(struct cf_conn *c, void *data)
{
    struct admin_session *s = data;
    (void)c;
    if (s == NULL || !s->ck_active || !s->ck_wait_drain) return;
    s->ck_wait_drain = 0;
    ck_next(s);
}

/* ---- dispatch ---- */

static void handle_request(struct admin_session *s)
{
    Coffer__AdminRequest *q = s->req;
    Coffer__Entry e = COFFER__ENTRY__INIT;

    switch (q->cmd_case) {
    case COFFER__ADMIN_REQUEST__CMD_USER_ADD:
        if (canon_username(q->user_add->username, s->username) != 0) {
            reply_err(s, "invalid username (1-64 characters of a-z 0-9 . _ @ + -)");
            return;
        }
        start_hash(s, q->user_add->password, user_add_hashed);
        return;
    case COFFER__ADMIN_REQUEST__CMD_USER_PASSWD:
        if (canon_username(q->user_passwd->username, s->username) != 0) {
            reply_err(s, "invalid username");
            return;
        }
        start_hash(s, q->user_passwd->password, user_passwd_hashed);
        return;
    case COFFER__ADMIN_REQUEST__CMD_USER_DISABLE:
    case COFFER__ADMIN_REQUEST__CMD_USER_ENABLE: {
        int disable = q->cmd_case == COFFER__ADMIN_REQUEST__CMD_USER_DISABLE;
        const char *name = disable ? q->user_disable->username : q->user_enable->username;
        const char *reason = disable ? q->user_disable->reason : NULL;
        Coffer__UserSetDisabled ud = COFFER__USER_SET_DISABLED__INIT;
        if (canon_username(name, s->username) != 0) {
            reply_err(s, "invalid username");
            return;
        }
        if (reason && strlen(reason) > ADMIN_MAX_REASON) {
            reply_err(s, "reason too long (200 bytes at most)");
            return;
        }
        for (const char *p = reason; p && *p; p++) {
            if ((unsigned char)*p < 0x20 || *p == 0x7f) {
                reply_err(s, "reason must not contain control characters");
                return;
            }
        }
        ud.username = s->username;
        ud.disabled = disable;
        ud.reason = (char *)(reason ? reason : "");
        e.op_case = COFFER__ENTRY__OP_USER_SET_DISABLED;
        e.user_set_disabled = &ud;
        snprintf(s->okmsg, sizeof(s->okmsg), "user %s %s", s->username,
                 disable ? "disabled" : "enabled");
        do_propose(s, &e);
        return;
    }
    case COFFER__ADMIN_REQUEST__CMD_USER_DELETE: {
        Coffer__UserDelete d = COFFER__USER_DELETE__INIT;
        if (canon_username(q->user_delete->username, s->username) != 0) {
            reply_err(s, "invalid username");
            return;
        }
        d.username = s->username;
        e.op_case = COFFER__ENTRY__OP_USER_DELETE;
        e.user_delete = &d;
        snprintf(s->okmsg, sizeof(s->okmsg), "user %s deleted", s->username);
        do_propose(s, &e);
        return;
    }
    case COFFER__ADMIN_REQUEST__CMD_QUOTA_SET: {
        Coffer__QuotaSet qs = COFFER__QUOTA_SET__INIT;
        if (canon_username(q->quota_set->username, s->username) != 0) {
            reply_err(s, "invalid username");
            return;
        }
        if (!q->quota_set->has_storage_bytes && !q->quota_set->has_messages) {
            reply_err(s, "nothing to set");
            return;
        }
        qs.username = s->username;
        qs.has_storage_bytes = q->quota_set->has_storage_bytes;
        qs.storage_bytes = q->quota_set->storage_bytes;
        qs.has_messages = q->quota_set->has_messages;
        qs.messages = q->quota_set->messages;
        e.op_case = COFFER__ENTRY__OP_QUOTA_SET;
        e.quota_set = &qs;
        snprintf(s->okmsg, sizeof(s->okmsg), "quota of %s set", s->username);
        do_propose(s, &e);
        return;
    }
    case COFFER__ADMIN_REQUEST__CMD_USER_LIST:
        cmd_user_list(s);
        return;
    case COFFER__ADMIN_REQUEST__CMD_MAILBOX_LIST:
        cmd_mailbox_list(s, q->mailbox_list->username);
        return;
    case COFFER__ADMIN_REQUEST__CMD_STATUS:
        cmd_status(s);
        return;
    case COFFER__ADMIN_REQUEST__CMD_GROUP_BOOTSTRAP:
        cmd_start_raft(s, 1);
        return;
    case COFFER__ADMIN_REQUEST__CMD_NODE_JOIN:
        cmd_start_raft(s, 0);
        return;
    case COFFER__ADMIN_REQUEST__CMD_NODE_ADD:
        cmd_node_add(s);
        return;
    case COFFER__ADMIN_REQUEST__CMD_NODE_REMOVE:
        cmd_node_remove(s);
        return;
    case COFFER__ADMIN_REQUEST__CMD_TRANSFER:
        cmd_transfer(s);
        return;
    case COFFER__ADMIN_REQUEST__CMD_NODE_LEAVE:
        cmd_node_leave(s);
        return;
    case COFFER__ADMIN_REQUEST__CMD_CHECKPOINT_FETCH:
        cmd_checkpoint_fetch(s);
        return;
    default:
        reply_err(s, "unknown command");
        return;
    }
}

static void handle_frame(struct admin_session *s, uint8_t *frame, size_t len)
{
    s->req = coffer__admin_request__unpack(NULL, len, frame);
    OPENSSL_cleanse(frame, len); /* may hold a password or the secret */
    free(frame);
    s->busy = 1;
    if (s->req == NULL) {
        reply_err(s, "malformed request");
        admin_close(s, "malformed request");
        return;
    }
    if (!s->authed) {
        if (cf_conn_peer_cert(s->c) != NULL) {
            s->authed = 1;
        } else if (secret_matches(s->n->cfg->admin_secret, s->req->secret)) {
            s->authed = 1;
        } else {
            cf_warn("admin: unauthenticated request from %s", s->client);
            reply_err(s, "authentication required");
            admin_close(s, "authentication required");
            return;
        }
        cf_notice("admin: %s authenticated (%s)", s->client,
                  cf_conn_peer_cert(s->c) ? "client certificate" : "secret");
    }
    handle_request(s);
}

static size_t on_read(struct cf_conn *c, void *data, const char *buf, size_t len)
{
    struct admin_session *s = data;
    size_t off = 0;
    (void)c;
    while (off < len && !s->busy && !s->closing && !s->conn_gone) {
        uint8_t *frame = NULL;
        size_t flen = 0;
        long k = cf_frame_dec_feed(&s->dec, (const uint8_t *)buf + off, len - off, &frame, &flen);
        if (k < 0) {
            Coffer__AdminResponse r = COFFER__ADMIN_RESPONSE__INIT;
            r.ok = 0;
            r.error = "request too large";
            send_response(s, &r);
            admin_close(s, "frame too large");
            return len;
        }
        off += (size_t)k;
        if (frame != NULL) handle_frame(s, frame, flen);
    }
    if (s->closing || s->conn_gone) return len;
    if (s->busy && off < len) cf_conn_pause_read(s->c);
    return off;
}

static void admin_kick(struct admin_session *s)
{
    if (!s->conn_gone && !s->closing && !s->busy) cf_conn_resume_read(s->c);
}

static void on_close(struct cf_conn *c, void *data, const char *reason)
{
    struct admin_session *s = data;
    (void)c;
    if (s == NULL) return;
    cf_debug("admin: %s closed: %s", s->client, reason ? reason : "");
    s->conn_gone = 1;
    admin_maybe_free(s);
}

static const struct cf_conn_ops admin_ops = {
    .on_read = on_read,
    .on_drain = on_drain,
    .on_close = on_close,
};

void admin_accept(struct node *n, uv_stream_t *server)
{
    struct admin_session *s = calloc(1, sizeof(*s));
    if (s == NULL) {
        struct cf_conn *c = cf_conn_accept(n->loop, server, NULL, &admin_ops, NULL);
        if (c != NULL) cf_conn_close(c, 0, "out of memory");
        return;
    }
    s->n = n;
    s->ck_fd = -1;
    cf_frame_dec_init(&s->dec, CF_FRAME_MAX_DEFAULT);
    if (n->admin_tls == NULL) {
        cf_error("admin: no TLS context; refusing connection");
    }
    s->c = cf_conn_accept(n->loop, server, n->admin_tls, &admin_ops, s);
    if (s->c == NULL) {
        cf_frame_dec_free(&s->dec);
        free(s);
        return;
    }
    snprintf(s->client, sizeof(s->client), "%s", cf_conn_peer(s->c));
    if (n->admin_tls == NULL) {
        admin_close(s, "no admin TLS");
        return;
    }
    cf_conn_set_idle_timeout(s->c, n->cfg->idle_timeout_ms);
}
