/* imap_msgops: the IMAP commands that change messages: STORE, COPY, MOVE
 * (RFC 6851), EXPUNGE, UID EXPUNGE (RFC 4315), APPEND (with APPENDUID /
 * COPYUID, RFC 4315), plus CONDSTORE's UNCHANGEDSINCE on STORE (RFC 7162).
 *
 * Each command validates its arguments and rights against a short read
 * transaction, builds one coffer.Entry, proposes it (propose_entry) and
 * finishes in the commit callback. While the proposal is in flight the
 * session holds the operation in s->resume_state with a resume_free that
 * only detaches it: the outcome buffer must stay valid until the callback,
 * which then frees the operation (and replies only if the session still
 * exists). imap_session.c keeps a closed session allocated (s->conn NULL)
 * until the running command calls imap_cmd_done, so the callback finishes
 * with imap_cmd_done in that case too.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include <openssl/evp.h>

#include <uv.h>

#include "cf_log.h"
#include "imap_internal.h"
#include "mime.h"
#include "rep.h"

enum mop_kind {
    MOP_STORE = 1,
    MOP_COPY,
    MOP_MOVE,
    MOP_EXPUNGE,
    MOP_APPEND,
};

struct mop {
    struct imap_session *s; /* NULL once the session went away */
    enum mop_kind kind;
    int uid_cmd;
    int silent;
    uint32_t *uids; /* sorted: affected uids (STORE) */
    size_t n_uids;
    struct store_outcome out;
};

static void mop_free(struct mop *op)
{
    store_outcome_clear(&op->out);
    free(op->uids);
    free(op);
}

static void mop_detach(void *arg)
{
    struct mop *op = arg;
    op->s = NULL;
}

static void mop_finish(struct imap_session *s, struct mop *op, int status);

static void mop_cb(void *arg, int status, struct store_outcome *out)
{
    struct mop *op = arg;
    (void)out;
    struct imap_session *s = op->s;
    if (s) {
        s->resume = NULL;
        s->resume_state = NULL;
        s->resume_free = NULL;
        if (s->conn == NULL) /* closed meanwhile: this frees the session */
            imap_cmd_done(s, "NO", NULL, "Connection closed");
        else
            mop_finish(s, op, status);
    }
    mop_free(op);
}

/* Propose e for op; on failure replies and frees op. */
static void mop_propose(struct imap_session *s, struct mop *op, Coffer__Entry *e)
{
    e->actor = s->username;
    s->resume = NULL;
    s->resume_state = op;
    s->resume_free = mop_detach;
    int rc = propose_entry(s->node, e, &op->out, mop_cb, op);
    if (rc != 0) {
        s->resume_state = NULL;
        s->resume_free = NULL;
        mop_free(op);
        imap_reply_propose_error(s, rc);
    }
}

static struct mop *mop_new(struct imap_session *s, enum mop_kind kind, int uid_cmd)
{
    struct mop *op = calloc(1, sizeof(*op));
    if (!op) {
        imap_cmd_done(s, "NO", "SERVERBUG", "Out of memory");
        return NULL;
    }
    op->s = s;
    op->kind = kind;
    op->uid_cmd = uid_cmd;
    return op;
}

static struct imap_arg *cmd_args(struct imap_command *cmd, size_t *n_r)
{
    if (cmd->name && strcmp(cmd->name, "UID") == 0 && cmd->n_args > 0) {
        *n_r = cmd->n_args - 1;
        return cmd->args + 1;
    }
    *n_r = cmd->n_args;
    return cmd->args;
}

static int uid_in(const uint32_t *v, size_t n, uint32_t x)
{
    size_t lo = 0, hi = n;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (v[mid] == x) return 1;
        if (v[mid] < x)
            lo = mid + 1;
        else
            hi = mid;
    }
    return 0;
}

static int cmp_u32(const void *a, const void *b)
{
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return x < y ? -1 : x > y;
}

/* Append v[0..n) as a compact IMAP set, keeping order ("3:5,9"). */
static void put_set(struct mbuf *b, const uint32_t *v, size_t n)
{
    size_t i = 0;
    while (i < n) {
        size_t j = i;
        while (j + 1 < n && v[j + 1] == v[j] + 1)
            j++;
        if (i > 0) mbuf_puts(b, ",");
        if (j > i)
            mbuf_printf(b, "%u:%u", v[i], v[j]);
        else
            mbuf_printf(b, "%u", v[i]);
        i = j + 1;
    }
}

static int check_selected(struct imap_session *s)
{
    if (s->state != IMAP_S_SELECTED) {
        imap_cmd_done(s, "BAD", NULL, "No mailbox selected");
        return 0;
    }
    return 1;
}

/* ---- STORE ---- */

struct flagset {
    uint32_t flags;
    char *kw; /* NUL-separated */
    size_t kw_len;
    size_t n_kw;
};

static void flagset_free(struct flagset *f)
{
    free(f->kw);
    memset(f, 0, sizeof(*f));
}

/* Keywords as an array of malloc()ed strings (protobuf repeated string). */
static char **kw_array(const char *kw, size_t kw_len, size_t *n_r)
{
    size_t n = 0, cap = 0;
    char **v = NULL;
    const char *p = kw, *end = kw + kw_len;
    while (p && p < end) {
        const char *z = memchr(p, '\0', (size_t)(end - p));
        size_t l = z ? (size_t)(z - p) : (size_t)(end - p);
        if (l > 0) {
            if (n == cap) {
                cap = cap ? cap * 2 : 8;
                char **nv = realloc(v, cap * sizeof(*nv));
                if (!nv) goto fail;
                v = nv;
            }
            if (!(v[n] = strndup(p, l))) goto fail;
            n++;
        }
        p += l + 1;
    }
    *n_r = n;
    return v;
fail:
    for (size_t i = 0; i < n; i++)
        free(v[i]);
    free(v);
    *n_r = (size_t)-1;
    return NULL;
}

static void kw_array_free(char **v, size_t n)
{
    if (n == (size_t)-1) return;
    for (size_t i = 0; i < n; i++)
        free(v[i]);
    free(v);
}

/* Flags argument(s): one flag list / atom, or several atoms. */
static int parse_flag_args(const struct imap_arg *args, size_t n, struct flagset *f)
{
    memset(f, 0, sizeof(*f));
    if (n == 0) return -1;
    if (n > 1)
        for (size_t i = 0; i < n; i++)
            if (args[i].type != IMAP_ARG_ATOM) return -1;
    for (size_t i = 0; i < n; i++) {
        uint32_t fl = 0;
        char *kw = NULL;
        size_t kl = 0, nk = 0;
        if (imap_parse_flags(&args[i], &fl, &kw, &kl, &nk) < 0) {
            flagset_free(f);
            return -1;
        }
        f->flags |= fl;
        if (kw && kl > 0) {
            /* keep NUL separation between pieces */
            int need_sep = f->kw_len > 0 && f->kw[f->kw_len - 1] != '\0';
            char *nk2 = realloc(f->kw, f->kw_len + (size_t)need_sep + kl + 1);
            if (!nk2) {
                free(kw);
                flagset_free(f);
                return -1;
            }
            f->kw = nk2;
            if (need_sep) f->kw[f->kw_len++] = '\0';
            memcpy(f->kw + f->kw_len, kw, kl);
            f->kw_len += kl;
            f->kw[f->kw_len] = '\0';
            f->n_kw += nk;
        }
        free(kw);
    }
    return 0;
}

void imap_cmd_store(struct imap_session *s, struct imap_command *cmd, int uid)
{
    size_t n;
    struct imap_arg *args = cmd_args(cmd, &n);
    if (!check_selected(s)) return;
    if (n < 3) {
        imap_cmd_done(s, "BAD", NULL, "Invalid arguments");
        return;
    }
    size_t i = 1;
    uint64_t unchanged_since = 0;
    int has_unchanged = 0;
    if (args[1].type == IMAP_ARG_LIST) {
        const struct imap_arg *m = &args[1];
        if (m->n_list != 2 || !imap_arg_eq(&m->list[0], "UNCHANGEDSINCE") ||
            m->list[1].type != IMAP_ARG_ATOM || m->list[1].len == 0 || m->list[1].len > 19) {
            imap_cmd_done(s, "BAD", NULL, "Invalid STORE modifier");
            return;
        }
        for (size_t k = 0; k < m->list[1].len; k++) {
            char c = m->list[1].str[k];
            if (c < '0' || c > '9') {
                imap_cmd_done(s, "BAD", NULL, "Invalid UNCHANGEDSINCE");
                return;
            }
            unchanged_since = unchanged_since * 10 + (uint64_t)(c - '0');
        }
        has_unchanged = 1;
        i = 2;
    }
    if (i + 1 >= n || args[i].type != IMAP_ARG_ATOM) {
        imap_cmd_done(s, "BAD", NULL, "Invalid arguments");
        return;
    }
    const char *item = args[i].str;
    size_t il = args[i].len;
    Coffer__FlagMode mode = COFFER__FLAG_MODE__FLAGS_REPLACE;
    if (il > 0 && item[0] == '+') {
        mode = COFFER__FLAG_MODE__FLAGS_ADD;
        item++;
        il--;
    } else if (il > 0 && item[0] == '-') {
        mode = COFFER__FLAG_MODE__FLAGS_REMOVE;
        item++;
        il--;
    }
    int silent = 0;
    if (il == 12 && strncasecmp(item, "FLAGS.SILENT", 12) == 0)
        silent = 1;
    else if (!(il == 5 && strncasecmp(item, "FLAGS", 5) == 0)) {
        imap_cmd_done(s, "BAD", NULL, "Invalid STORE item");
        return;
    }
    struct flagset f;
    if (parse_flag_args(&args[i + 1], n - i - 1, &f) < 0) {
        imap_cmd_done(s, "BAD", NULL, "Invalid flags");
        return;
    }
    if (s->sel.readonly) {
        flagset_free(&f);
        imap_cmd_done(s, "NO", NULL, "Mailbox is read-only");
        return;
    }
    uint32_t need = 0;
    if (mode == COFFER__FLAG_MODE__FLAGS_REPLACE) {
        need = STORE_R_SEEN | STORE_R_DELETEMSG | STORE_R_WRITE;
    } else {
        if (f.flags & STORE_F_SEEN) need |= STORE_R_SEEN;
        if (f.flags & STORE_F_DELETED) need |= STORE_R_DELETEMSG;
        if ((f.flags & ~(uint32_t)(STORE_F_SEEN | STORE_F_DELETED)) || f.n_kw > 0)
            need |= STORE_R_WRITE;
    }
    if ((s->sel.rights & need) != need) {
        flagset_free(&f);
        imap_cmd_done(s, "NO", "NOPERM", "Permission denied");
        return;
    }
    struct mop *op = mop_new(s, MOP_STORE, uid);
    if (!op) {
        flagset_free(&f);
        return;
    }
    op->silent = silent;
    if (imap_seqset_to_uids(s, &args[0], uid, &op->uids, &op->n_uids) < 0) {
        flagset_free(&f);
        mop_free(op);
        imap_cmd_done(s, "BAD", NULL, "Invalid sequence set");
        return;
    }
    if (op->n_uids == 0) {
        flagset_free(&f);
        mop_free(op);
        imap_cmd_done(s, "OK", NULL, "%s completed", uid ? "UID STORE" : "STORE");
        return;
    }
    if (has_unchanged) s->condstore_enabled = 1;
    size_t n_ranges = 0, n_kw = 0;
    Coffer__UidRange **ranges = imap_uid_ranges(op->uids, op->n_uids, &n_ranges);
    char **kws = kw_array(f.kw, f.kw_len, &n_kw);
    if (!ranges || n_kw == (size_t)-1) {
        if (ranges) imap_uid_ranges_free(ranges, n_ranges);
        kw_array_free(kws, n_kw);
        flagset_free(&f);
        mop_free(op);
        imap_cmd_done(s, "NO", "SERVERBUG", "Out of memory");
        return;
    }
    Coffer__Entry e = COFFER__ENTRY__INIT;
    Coffer__StoreFlags sf = COFFER__STORE_FLAGS__INIT;
    sf.username = s->username;
    sf.mailbox = s->sel.name;
    sf.uidvalidity = s->sel.uidvalidity;
    sf.uids = ranges;
    sf.n_uids = n_ranges;
    sf.mode = mode;
    sf.has_flags = 1;
    sf.flags = f.flags;
    sf.keywords = kws;
    sf.n_keywords = n_kw;
    if (has_unchanged) {
        sf.has_unchanged_since = 1;
        sf.unchanged_since = unchanged_since;
    }
    e.op_case = COFFER__ENTRY__OP_STORE_FLAGS;
    e.store_flags = &sf;
    mop_propose(s, op, &e);
    imap_uid_ranges_free(ranges, n_ranges);
    kw_array_free(kws, n_kw);
    flagset_free(&f);
}

static void store_finish(struct imap_session *s, struct mop *op)
{
    const char *cname = op->uid_cmd ? "UID STORE" : "STORE";
    if (op->out.result != STORE_OK && op->out.result != STORE_EMODIFIED) {
        if (op->out.result == STORE_EUIDVALIDITY || op->out.result == STORE_ENOENT)
            imap_cmd_done(s, "NO", NULL, "Mailbox has been deleted or recreated");
        else
            imap_cmd_done(s, "NO", NULL, "%s", op->out.text[0] ? op->out.text : "STORE failed");
        return;
    }
    uint32_t *mod = NULL;
    size_t n_mod = op->out.n_modified;
    if (n_mod > 0) {
        mod = malloc(n_mod * sizeof(*mod));
        if (mod) {
            memcpy(mod, op->out.modified_uids, n_mod * sizeof(*mod));
            qsort(mod, n_mod, sizeof(*mod), cmp_u32);
        } else {
            n_mod = 0;
        }
    }
    /* the stored messages: report them now, not again from the watcher */
    size_t w = 0;
    for (size_t r = 0; r < op->n_uids; r++)
        if (!uid_in(mod, n_mod, op->uids[r])) op->uids[w++] = op->uids[r];
    op->n_uids = w;
    {
        struct u32vec *pf = &s->sel.pend_flags;
        size_t k = 0;
        for (size_t r = 0; r < pf->n; r++)
            if (!uid_in(op->uids, op->n_uids, pf->v[r])) pf->v[k++] = pf->v[r];
        pf->n = k;
    }
    /* .SILENT suppresses the FLAGS, but with CONDSTORE on the new MODSEQ is
     * still reported (RFC 7162 3.1.3) */
    if ((!op->silent || s->condstore_enabled) && op->n_uids > 0) {
        MDB_txn *txn = store_rtxn_begin(s->node->store);
        if (txn) {
            for (size_t r = 0; r < op->n_uids; r++) {
                uint32_t msn = imap_msn_of(s, op->uids[r]);
                struct store_msg m;
                if (!msn) continue;
                if (!op->silent)
                    imap_write_fetch_flags(s, txn, msn, op->uids[r], op->uid_cmd);
                else if (store_msg_get(s->node->store, txn, s->sel.mailbox_id, op->uids[r], &m) ==
                         0) {
                    if (op->uid_cmd)
                        cf_conn_printf(s->conn, "* %u FETCH (UID %u MODSEQ (%llu))\r\n", msn,
                                       op->uids[r], (unsigned long long)m.modseq);
                    else
                        cf_conn_printf(s->conn, "* %u FETCH (MODSEQ (%llu))\r\n", msn,
                                       (unsigned long long)m.modseq);
                }
            }
            store_rtxn_end(txn);
        }
    }
    if (n_mod > 0) {
        struct mbuf code = {0};
        mbuf_puts(&code, "MODIFIED ");
        put_set(&code, mod, n_mod);
        mbuf_put(&code, "", 1);
        imap_cmd_done(s, "OK", code.data, "Conditional %s failed", cname);
        mbuf_free(&code);
    } else {
        imap_cmd_done(s, "OK", NULL, "%s completed", cname);
    }
    free(mod);
}

/* ---- COPY / MOVE ---- */

static void do_copy(struct imap_session *s, struct imap_command *cmd, int uid, int move)
{
    size_t n;
    struct imap_arg *args = cmd_args(cmd, &n);
    if (!check_selected(s)) return;
    if (n != 2) {
        imap_cmd_done(s, "BAD", NULL, "Invalid arguments");
        return;
    }
    if (!(s->sel.rights & STORE_R_READ)) {
        imap_cmd_done(s, "NO", "NOPERM", "Permission denied");
        return;
    }
    if (move) {
        if (s->sel.readonly) {
            imap_cmd_done(s, "NO", NULL, "Mailbox is read-only");
            return;
        }
        if ((s->sel.rights & (STORE_R_DELETEMSG | STORE_R_EXPUNGE)) !=
            (STORE_R_DELETEMSG | STORE_R_EXPUNGE)) {
            imap_cmd_done(s, "NO", "NOPERM", "Permission denied");
            return;
        }
    }
    const char *why = NULL;
    char *dst = imap_mailbox_name(s, &args[1], &why);
    if (!dst) {
        imap_cmd_done(s, "NO", NULL, "%s", why ? why : "Invalid mailbox name");
        return;
    }
    struct mop *op = mop_new(s, move ? MOP_MOVE : MOP_COPY, uid);
    if (!op) {
        free(dst);
        return;
    }
    if (imap_seqset_to_uids(s, &args[0], uid, &op->uids, &op->n_uids) < 0) {
        free(dst);
        mop_free(op);
        imap_cmd_done(s, "BAD", NULL, "Invalid sequence set");
        return;
    }
    MDB_txn *txn = store_rtxn_begin(s->node->store);
    if (!txn) {
        free(dst);
        mop_free(op);
        imap_cmd_done(s, "NO", "SERVERBUG", "Internal error");
        return;
    }
    struct store_mailbox mb;
    int rc = store_mailbox_get(s->node->store, txn, s->user_id, dst, &mb);
    uint32_t rights = rc == 0 ? store_rights(s->node->store, txn, s->user_id, &mb) : 0;
    store_rtxn_end(txn);
    if (rc != 0) {
        free(dst);
        mop_free(op);
        if (rc == STORE_ENOENT)
            imap_cmd_done(s, "NO", "TRYCREATE", "Mailbox does not exist");
        else
            imap_cmd_done(s, "NO", "SERVERBUG", "Internal error");
        return;
    }
    if (!(rights & STORE_R_INSERT)) {
        free(dst);
        mop_free(op);
        imap_cmd_done(s, "NO", "NOPERM", "Permission denied");
        return;
    }
    if (op->n_uids == 0) {
        free(dst);
        mop_free(op);
        imap_cmd_done(s, "OK", NULL, "%s%s completed", uid ? "UID " : "", move ? "MOVE" : "COPY");
        return;
    }
    size_t n_ranges = 0;
    Coffer__UidRange **ranges = imap_uid_ranges(op->uids, op->n_uids, &n_ranges);
    if (!ranges) {
        free(dst);
        mop_free(op);
        imap_cmd_done(s, "NO", "SERVERBUG", "Out of memory");
        return;
    }
    Coffer__Entry e = COFFER__ENTRY__INIT;
    Coffer__CopyMessages cm = COFFER__COPY_MESSAGES__INIT;
    cm.username = s->username;
    cm.src_mailbox = s->sel.name;
    cm.src_uidvalidity = s->sel.uidvalidity;
    cm.uids = ranges;
    cm.n_uids = n_ranges;
    cm.dst_username = s->username;
    cm.dst_mailbox = dst;
    cm.has_move = 1;
    cm.move = move ? 1 : 0;
    e.op_case = COFFER__ENTRY__OP_COPY;
    e.copy = &cm;
    mop_propose(s, op, &e);
    imap_uid_ranges_free(ranges, n_ranges);
    free(dst);
}

void imap_cmd_copy(struct imap_session *s, struct imap_command *cmd, int uid)
{
    do_copy(s, cmd, uid, 0);
}

void imap_cmd_move(struct imap_session *s, struct imap_command *cmd, int uid)
{
    do_copy(s, cmd, uid, 1);
}

static void copy_finish(struct imap_session *s, struct mop *op)
{
    int move = op->kind == MOP_MOVE;
    const char *cname =
        move ? (op->uid_cmd ? "UID MOVE" : "MOVE") : (op->uid_cmd ? "UID COPY" : "COPY");
    switch (op->out.result) {
    case STORE_OK:
        break;
    case STORE_ENOENT:
        imap_cmd_done(s, "NO", "TRYCREATE", "Mailbox does not exist");
        return;
    case STORE_EQUOTA:
        imap_cmd_done(s, "NO", "OVERQUOTA", "Quota exceeded");
        return;
    case STORE_EUIDVALIDITY:
        imap_cmd_done(s, "NO", NULL, "Mailbox has been deleted or recreated");
        return;
    default:
        imap_cmd_done(s, "NO", NULL, "%s", op->out.text[0] ? op->out.text : "Failed");
        return;
    }
    struct mbuf code = {0};
    if (op->out.n_uids > 0) {
        mbuf_printf(&code, "COPYUID %u ", op->out.uidvalidity);
        put_set(&code, op->out.src_uids, op->out.n_uids);
        mbuf_puts(&code, " ");
        put_set(&code, op->out.dst_uids, op->out.n_uids);
        mbuf_put(&code, "", 1);
    }
    if (move) {
        /* RFC 6851 4.3: COPYUID in an untagged OK, then the EXPUNGEs */
        if (code.len) cf_conn_printf(s->conn, "* OK [%s] Moved\r\n", code.data);
        imap_flush_updates(s, 1);
        imap_cmd_done(s, "OK", NULL, "%s completed", cname);
    } else {
        imap_cmd_done(s, "OK", code.len ? code.data : NULL, "%s completed", cname);
    }
    mbuf_free(&code);
}

/* ---- EXPUNGE / UID EXPUNGE ---- */

void imap_cmd_expunge(struct imap_session *s, struct imap_command *cmd, int uid)
{
    size_t n;
    struct imap_arg *args = cmd_args(cmd, &n);
    if (!check_selected(s)) return;
    if ((uid && n != 1) || (!uid && n != 0)) {
        imap_cmd_done(s, "BAD", NULL, "Invalid arguments");
        return;
    }
    if (s->sel.readonly) {
        imap_cmd_done(s, "NO", NULL, "Mailbox is read-only");
        return;
    }
    if (!(s->sel.rights & STORE_R_EXPUNGE)) {
        imap_cmd_done(s, "NO", "NOPERM", "Permission denied");
        return;
    }
    struct mop *op = mop_new(s, MOP_EXPUNGE, uid);
    if (!op) return;
    Coffer__UidRange all = COFFER__UID_RANGE__INIT;
    Coffer__UidRange *allp = &all;
    Coffer__UidRange **ranges = NULL;
    size_t n_ranges = 0;
    if (uid) {
        if (imap_seqset_to_uids(s, &args[0], 1, &op->uids, &op->n_uids) < 0) {
            mop_free(op);
            imap_cmd_done(s, "BAD", NULL, "Invalid sequence set");
            return;
        }
        if (op->n_uids == 0) {
            mop_free(op);
            imap_flush_updates(s, 1);
            imap_cmd_done(s, "OK", NULL, "UID EXPUNGE completed");
            return;
        }
        ranges = imap_uid_ranges(op->uids, op->n_uids, &n_ranges);
        if (!ranges) {
            mop_free(op);
            imap_cmd_done(s, "NO", "SERVERBUG", "Out of memory");
            return;
        }
    } else {
        all.lo = 1;
        all.hi = UINT32_MAX;
    }
    Coffer__Entry e = COFFER__ENTRY__INIT;
    Coffer__Expunge ex = COFFER__EXPUNGE__INIT;
    ex.username = s->username;
    ex.mailbox = s->sel.name;
    ex.uidvalidity = s->sel.uidvalidity;
    ex.uids = uid ? ranges : &allp;
    ex.n_uids = uid ? n_ranges : 1;
    ex.has_require_deleted = 1;
    ex.require_deleted = 1;
    e.op_case = COFFER__ENTRY__OP_EXPUNGE;
    e.expunge = &ex;
    mop_propose(s, op, &e);
    if (ranges) imap_uid_ranges_free(ranges, n_ranges);
}

static void expunge_finish(struct imap_session *s, struct mop *op)
{
    if (op->out.result != STORE_OK) {
        if (op->out.result == STORE_EUIDVALIDITY || op->out.result == STORE_ENOENT)
            imap_cmd_done(s, "NO", NULL, "Mailbox has been deleted or recreated");
        else
            imap_cmd_done(s, "NO", NULL, "%s", op->out.text[0] ? op->out.text : "EXPUNGE failed");
        return;
    }
    /* the watcher queued the removals; EXPUNGE responses are allowed here */
    imap_flush_updates(s, 1);
    imap_cmd_done(s, "OK", NULL, "%s completed", op->uid_cmd ? "UID EXPUNGE" : "EXPUNGE");
}

/* ---- APPEND ---- */

/* Does the header of msg (CRLF-normalised) have a non-empty Message-ID
 * field? Scans the header only, bounded by msg_len. */
static int has_message_id(const char *msg, size_t len)
{
    static const char field[] = "message-id:";
    const size_t flen = sizeof(field) - 1;
    size_t i = 0;
    while (i < len) {
        if (i + 1 < len && msg[i] == '\r' && msg[i + 1] == '\n') return 0; /* end of header */
        if (len - i > flen && strncasecmp(msg + i, field, flen) == 0) {
            for (size_t j = i + flen; j < len && msg[j] != '\r'; j++)
                if (msg[j] != ' ' && msg[j] != '\t') return 1;
        }
        const char *nl = memchr(msg + i, '\n', len - i);
        if (!nl) return 0;
        i = (size_t)(nl - msg) + 1;
    }
    return 0;
}

static void key_u64(EVP_MD_CTX *md, uint64_t v)
{
    uint8_t b[8];
    for (int k = 0; k < 8; k++)
        b[k] = (uint8_t)(v >> (8 * k));
    EVP_DigestUpdate(md, b, 8);
}

/* The idempotency key of an APPEND: SHA-256 (first 16 bytes) of everything
 * the entry stores, so a client's retry of the same command (after NO
 * [UNAVAILABLE] or a dropped connection) carries the same key. Only for
 * messages with a Message-ID: two byte-identical messages with one are the
 * same message; without one a client may well mean two copies. Returns 0 and
 * fills key, or -1 (no key: the APPEND gets a random request id). */
static int append_key(const char *user, const char *mailbox, uint32_t flags, char *const *kws,
                      size_t n_kw, int has_date, int64_t idate, int tz, const char *msg,
                      size_t msg_len, uint8_t key[16])
{
    static const char tag[] = "coffer-append-key-1";
    uint8_t d[EVP_MAX_MD_SIZE];
    unsigned dl = 0;
    int ok;
    if (!has_message_id(msg, msg_len)) return -1;
    EVP_MD_CTX *md = EVP_MD_CTX_new();
    if (!md) return -1;
    ok = EVP_DigestInit_ex(md, EVP_sha256(), NULL) == 1;
    if (ok) {
        EVP_DigestUpdate(md, tag, sizeof(tag));
        EVP_DigestUpdate(md, user, strlen(user) + 1);
        EVP_DigestUpdate(md, mailbox, strlen(mailbox) + 1);
        key_u64(md, flags);
        key_u64(md, n_kw);
        for (size_t i = 0; i < n_kw; i++)
            EVP_DigestUpdate(md, kws[i], strlen(kws[i]) + 1);
        key_u64(md, has_date ? 1 : 0);
        key_u64(md, has_date ? (uint64_t)idate : 0);
        key_u64(md, has_date ? (uint64_t)(int64_t)tz : 0);
        key_u64(md, msg_len);
        EVP_DigestUpdate(md, msg, msg_len);
        ok = EVP_DigestFinal_ex(md, d, &dl) == 1 && dl >= 16;
    }
    EVP_MD_CTX_free(md);
    if (!ok) return -1;
    memcpy(key, d, 16);
    return 0;
}

/* The APPEND destination: validated name (malloc()ed) and the rights on it.
 * Returns 0, or -1 after replying NO (TRYCREATE when it does not exist).
 * Used by imap_append_check_literal (before "+") and again by the command
 * itself (the mailbox may have gone meanwhile). */
static int append_target(struct imap_session *s, const struct imap_arg *a, char **name_r,
                         uint32_t *rights_r)
{
    const char *why = NULL;
    char *name = imap_mailbox_name(s, a, &why);
    if (!name) {
        imap_cmd_done(s, "NO", NULL, "%s", why ? why : "Invalid mailbox name");
        return -1;
    }
    MDB_txn *txn = store_rtxn_begin(s->node->store);
    if (!txn) {
        free(name);
        imap_cmd_done(s, "NO", "SERVERBUG", "Internal error");
        return -1;
    }
    struct store_mailbox mb;
    int rc = store_mailbox_get(s->node->store, txn, s->user_id, name, &mb);
    uint32_t rights = rc == 0 ? store_rights(s->node->store, txn, s->user_id, &mb) : 0;
    store_rtxn_end(txn);
    if (rc != 0 || !(rights & STORE_R_INSERT)) {
        free(name);
        if (rc == STORE_ENOENT)
            imap_cmd_done(s, "NO", "TRYCREATE", "Mailbox does not exist");
        else if (rc != 0)
            imap_cmd_done(s, "NO", "SERVERBUG", "Internal error");
        else
            imap_cmd_done(s, "NO", "NOPERM", "Permission denied");
        return -1;
    }
    *name_r = name;
    *rights_r = rights;
    return 0;
}

int imap_append_check_literal(struct imap_session *s, const struct imap_literal_info *li)
{
    const struct sconf *cfg = s->node->cfg;
    if (li->arg_index == 0) {
        /* the mailbox name itself as a literal */
        if (li->size > cfg->max_literal) {
            imap_cmd_done(s, "NO", NULL, "Mailbox name too long");
            return 0;
        }
        return 1;
    }
    if (li->size > cfg->max_message) {
        imap_cmd_done(s, "NO", "TOOBIG", "Message too big (limit %llu bytes)",
                      (unsigned long long)cfg->max_message);
        return 0;
    }
    /* A non-synchronising literal is already on the wire: refusing it
     * would cost the connection, so everything but the size is left to the
     * command (which checks the mailbox, emptiness and quota again). */
    if (li->non_sync) return 1;
    if (li->size == 0) {
        imap_cmd_done(s, "NO", NULL, "Empty message");
        return 0;
    }
    /* RFC 3501 6.3.11: a missing mailbox gets NO [TRYCREATE] before the
     * client sends the message. Only for the message literal itself (a new
     * top-level argument after the mailbox name). */
    if (li->args != NULL && li->n_args >= 1 && li->arg_index == li->n_args) {
        if (!imap_arg_is_astring(&li->args[0])) {
            imap_cmd_done(s, "BAD", NULL, "Invalid arguments");
            return 0;
        }
        char *name = NULL;
        uint32_t rights = 0;
        if (append_target(s, &li->args[0], &name, &rights) < 0) return 0;
        free(name);
    }
    MDB_txn *txn = store_rtxn_begin(s->node->store);
    if (!txn) return 1; /* checked again when applied */
    struct store_user u;
    int over = 0;
    if (store_user_get_by_id(s->node->store, txn, s->user_id, &u) == 0) {
        if (u.quota_bytes && u.used_bytes + li->size > u.quota_bytes) over = 1;
        if (u.quota_messages && u.used_messages + 1 > u.quota_messages) over = 1;
    }
    store_rtxn_end(txn);
    if (over) {
        imap_cmd_done(s, "NO", "OVERQUOTA", "Quota exceeded");
        return 0;
    }
    return 1;
}

/* APPEND's CPU work (NUL check, CRLF, MIME cache, dedup key, packing and
 * splitting the entry into Raft fragments) runs on the libuv threadpool for
 * messages of APPEND_OFFLOAD_BYTES or more, off the loop thread (which also
 * runs Raft): for a 50 MiB message it is 0.3-1.5 s. The job owns copies of
 * everything it reads; the session waits busy, and append_after (loop
 * thread) proposes the prepared entry or replies. Smaller messages run the
 * same two steps inline. */
#define APPEND_OFFLOAD_BYTES (256u * 1024u)
struct append_job {
    uv_work_t w;
    struct node *node;
    struct mop *op;
    char *raw, *name, *username;
    size_t raw_len, max_message;
    struct flagset f;
    int has_date, tz;
    int64_t idate;
    uint64_t win_s;
    int err; /* 0, 1 NUL, 2 out of memory, 3 empty, 4 too big */
    uint8_t id[16];
    struct rep_prepared *prep;
};

static void flagset_free(struct flagset *f);
static char **kw_array(const char *kw, size_t kw_len, size_t *n_r);
static void kw_array_free(char **a, size_t n);
static int append_key(const char *user, const char *mailbox, uint32_t flags, char *const *kws,
                      size_t n_kw, int has_date, int64_t idate, int tz, const char *msg, size_t len,
                      uint8_t key[16]);

static void append_job_free(struct append_job *j)
{
    free(j->raw);
    free(j->name);
    free(j->username);
    flagset_free(&j->f);
    rep_prepared_free(j->prep);
    free(j);
}

static void append_work(uv_work_t *w)
{
    struct append_job *j = w->data;
    if (memchr(j->raw, '\0', j->raw_len)) {
        j->err = 1;
        return;
    }
    size_t msg_len = 0;
    char *msg = mime_crlf_normalize(j->raw, j->raw_len, &msg_len);
    free(j->raw);
    j->raw = NULL;
    if (!msg) {
        j->err = 2;
        return;
    }
    if (msg_len == 0 || msg_len > j->max_message) {
        j->err = msg_len == 0 ? 3 : 4;
        free(msg);
        return;
    }
    struct mime_cache cache;
    memset(&cache, 0, sizeof(cache));
    if (mime_build_cache(msg, msg_len, &cache) < 0) {
        free(msg);
        j->err = 2;
        return;
    }
    size_t n_kw = 0;
    char **kws = kw_array(j->f.kw, j->f.kw_len, &n_kw);
    if (n_kw == (size_t)-1) {
        mime_cache_free(&cache);
        free(msg);
        j->err = 2;
        return;
    }
    Coffer__Entry e = COFFER__ENTRY__INIT;
    Coffer__Append ap = COFFER__APPEND__INIT;
    Coffer__MessageCache mc = COFFER__MESSAGE_CACHE__INIT;
    mc.envelope.data = (uint8_t *)cache.envelope.data;
    mc.envelope.len = cache.envelope.len;
    mc.bodystructure.data = (uint8_t *)cache.bodystructure.data;
    mc.bodystructure.len = cache.bodystructure.len;
    mc.body.data = (uint8_t *)cache.body.data;
    mc.body.len = cache.body.len;
    mc.parts.data = (uint8_t *)cache.parts.data;
    mc.parts.len = cache.parts.len;
    if (cache.sent_date != 0) {
        mc.has_sent_date = 1;
        mc.sent_date = cache.sent_date;
    }
    ap.username = j->username;
    ap.mailbox = j->name;
    ap.message.data = (uint8_t *)msg;
    ap.message.len = msg_len;
    ap.has_flags = 1;
    ap.flags = j->f.flags;
    ap.keywords = kws;
    ap.n_keywords = n_kw;
    if (j->has_date) {
        ap.has_internal_date = 1;
        ap.internal_date = j->idate;
        ap.has_internal_tz_min = 1;
        ap.internal_tz_min = j->tz;
    }
    ap.cache = &mc;
    e.op_case = COFFER__ENTRY__OP_APPEND;
    e.append = &ap;
    e.actor = j->username;
    uint8_t key[16];
    if (j->win_s > 0 && append_key(j->username, j->name, j->f.flags, kws, n_kw, j->has_date,
                                   j->idate, j->tz, msg, msg_len, key) == 0) {
        e.has_request_id = 1;
        e.request_id.data = key;
        e.request_id.len = sizeof(key);
        ap.has_dedup_window_s = 1;
        ap.dedup_window_s = (uint32_t)(j->win_s > UINT32_MAX ? UINT32_MAX : j->win_s);
    }
    if (propose_pack_prepared(j->node, &e, j->id, &j->prep) != 0) j->err = 2;
    kw_array_free(kws, n_kw);
    mime_cache_free(&cache);
    free(msg);
}

static void append_after(uv_work_t *w, int status)
{
    struct append_job *j = w->data;
    struct mop *op = j->op;
    struct imap_session *s = op->s;
    (void)status;
    if (!s) { /* session gone meanwhile */
        append_job_free(j);
        mop_free(op);
        return;
    }
    if (j->err != 0 || status != 0) {
        s->resume_state = NULL;
        s->resume_free = NULL;
        mop_free(op);
        if (j->err == 1)
            imap_cmd_done(s, "NO", NULL, "Message contains NUL bytes");
        else if (j->err == 3)
            imap_cmd_done(s, "NO", NULL, "Empty message");
        else if (j->err == 4)
            imap_cmd_done(s, "NO", "TOOBIG", "Message too big");
        else
            imap_cmd_done(s, "NO", "SERVERBUG", "Out of memory");
        append_job_free(j);
        return;
    }
    struct rep_prepared *p = j->prep;
    j->prep = NULL;
    int rc = propose_prepared(s->node, j->id, p, &op->out, mop_cb, op);
    append_job_free(j);
    if (rc != 0) {
        s->resume_state = NULL;
        s->resume_free = NULL;
        mop_free(op);
        imap_reply_propose_error(s, rc);
    }
}

void imap_cmd_append(struct imap_session *s, struct imap_command *cmd, int uid)
{
    (void)uid;
    struct imap_arg *args = cmd->args;
    size_t n = cmd->n_args;
    if (s->state != IMAP_S_AUTH && s->state != IMAP_S_SELECTED) {
        imap_cmd_done(s, "BAD", NULL, "Not authenticated");
        return;
    }
    if (n < 2 || n > 4 || !imap_arg_is_astring(&args[0]) || args[n - 1].type != IMAP_ARG_LITERAL) {
        imap_cmd_done(s, "BAD", NULL, "Invalid arguments");
        return;
    }
    struct flagset f = {0};
    int has_date = 0;
    int64_t idate = 0;
    int tz = 0;
    size_t i = 1;
    if (i < n - 1 && args[i].type == IMAP_ARG_LIST) {
        if (parse_flag_args(&args[i], 1, &f) < 0) {
            imap_cmd_done(s, "BAD", NULL, "Invalid flags");
            return;
        }
        i++;
    }
    if (i < n - 1) {
        if (args[i].type != IMAP_ARG_QUOTED ||
            imap_parse_datetime(args[i].str, args[i].len, &idate, &tz) < 0) {
            flagset_free(&f);
            imap_cmd_done(s, "BAD", NULL, "Invalid date-time");
            return;
        }
        has_date = 1;
        i++;
    }
    if (i != n - 1) {
        flagset_free(&f);
        imap_cmd_done(s, "BAD", NULL, "Invalid arguments");
        return;
    }
    char *name = NULL;
    uint32_t rights = 0;
    if (append_target(s, &args[0], &name, &rights) < 0) {
        flagset_free(&f);
        return;
    }
    /* RFC 4314 4: flags the user may not set are dropped */
    if (!(rights & STORE_R_SEEN)) f.flags &= ~(uint32_t)STORE_F_SEEN;
    if (!(rights & STORE_R_DELETEMSG)) f.flags &= ~(uint32_t)STORE_F_DELETED;
    if (!(rights & STORE_R_WRITE)) {
        f.flags &= (uint32_t)(STORE_F_SEEN | STORE_F_DELETED);
        f.kw_len = 0;
        f.n_kw = 0;
    }

    size_t raw_len = 0;
    char *raw = imap_parser_take_literal(s->parser, &args[n - 1], &raw_len);
    if (!raw) {
        free(name);
        flagset_free(&f);
        imap_cmd_done(s, "NO", "SERVERBUG", "Internal error");
        return;
    }
    struct mop *op = mop_new(s, MOP_APPEND, 0);
    struct append_job *j = op ? calloc(1, sizeof(*j)) : NULL;
    if (!j) {
        if (op) mop_free(op);
        free(raw);
        free(name);
        flagset_free(&f);
        if (op) imap_cmd_done(s, "NO", "SERVERBUG", "Out of memory");
        return;
    }
    j->node = s->node;
    j->op = op;
    j->raw = raw;
    j->raw_len = raw_len;
    j->name = name;
    j->username = strdup(s->username);
    j->f = f;
    j->has_date = has_date;
    j->idate = idate;
    j->tz = tz;
    j->win_s = s->node->cfg->append_dedup_window_ms / 1000;
    j->max_message = s->node->cfg->max_message;
    j->w.data = j;
    s->resume = NULL;
    s->resume_state = op;
    s->resume_free = mop_detach;
    if (j->username && raw_len < APPEND_OFFLOAD_BYTES) {
        /* small: the threadpool round trip would cost more than the work */
        append_work(&j->w);
        append_after(&j->w, 0);
        return;
    }
    if (!j->username || uv_queue_work(s->node->loop, &j->w, append_work, append_after) != 0) {
        s->resume_state = NULL;
        s->resume_free = NULL;
        append_job_free(j);
        mop_free(op);
        imap_cmd_done(s, "NO", "SERVERBUG", "Out of memory");
    }
}

static void append_finish(struct imap_session *s, struct mop *op)
{
    switch (op->out.result) {
    case STORE_OK: {
        char code[48];
        snprintf(code, sizeof(code), "APPENDUID %u %u", op->out.uidvalidity, op->out.uid);
        imap_cmd_done(s, "OK", code, "APPEND completed");
        return;
    }
    case STORE_ENOENT:
        imap_cmd_done(s, "NO", "TRYCREATE", "Mailbox does not exist");
        return;
    case STORE_EQUOTA:
        imap_cmd_done(s, "NO", "OVERQUOTA", "Quota exceeded");
        return;
    default:
        imap_cmd_done(s, "NO", NULL, "%s", op->out.text[0] ? op->out.text : "APPEND failed");
        return;
    }
}

static void mop_finish(struct imap_session *s, struct mop *op, int status)
{
    if (status != REP_OK) {
        imap_reply_propose_error(s, status);
        return;
    }
    switch (op->kind) {
    case MOP_STORE:
        store_finish(s, op);
        break;
    case MOP_COPY:
    case MOP_MOVE:
        copy_finish(s, op);
        break;
    case MOP_EXPUNGE:
        expunge_finish(s, op);
        break;
    case MOP_APPEND:
        append_finish(s, op);
        break;
    }
}
