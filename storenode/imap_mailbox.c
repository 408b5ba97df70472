/* imap_mailbox: mailbox-level IMAP commands (CREATE, DELETE, RENAME,
 * SUBSCRIBE, UNSUBSCRIBE, LIST incl. LIST-EXTENDED/SPECIAL-USE, LSUB,
 * STATUS) and mailbox name validation. See imap_internal.h.
 *
 * Names: clients send modified UTF-7; the store keeps canonical UTF-8 with
 * "/" as separator and "INBOX" upper-case. Users only see their own
 * namespace (personal, prefix "", separator "/").
 *
 * Choices:
 *  - CREATE creates missing parents (RFC 3501 6.3.3 SHOULD), one Raft entry
 *    each, in order; a parent that appears meanwhile is fine.
 *  - DELETE/RENAME of the selected mailbox (or, for RENAME, of one of its
 *    ancestors) first unselects it, as Dovecot does for DELETE, so this
 *    session never sees its own mailbox vanish under it.
 *  - Parents that exist only because they have children are listed with
 *    \Noselect; subscribed names that do not exist get \NonExistent in
 *    LIST (SUBSCRIBED) and \Noselect in LSUB.
 *  - SUBSCRIBE of a nonexistent name is allowed (RFC 3501 MAY refuse).
 */
#include <ctype.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "cf_log.h"
#include "imap_internal.h"

#define SU_ALL 1u
#define SU_ARCHIVE 2u
#define SU_DRAFTS 4u
#define SU_FLAGGED 8u
#define SU_JUNK 16u
#define SU_SENT 32u
#define SU_TRASH 64u

static const struct {
    uint32_t bit;
    const char *name;
} special_uses[] = {
    {SU_ALL, "\\All"},         {SU_ARCHIVE, "\\Archive"}, {SU_DRAFTS, "\\Drafts"},
    {SU_FLAGGED, "\\Flagged"}, {SU_JUNK, "\\Junk"},       {SU_SENT, "\\Sent"},
    {SU_TRASH, "\\Trash"},
};

static void wr(struct imap_session *s, const char *p, size_t n)
{
    if (s->conn != NULL && n > 0) cf_conn_write(s->conn, p, n);
}

static void wrs(struct imap_session *s, const char *p)
{
    wr(s, p, strlen(p));
}

static size_t max_name_len(const struct imap_session *s)
{
    uint64_t m = s->node && s->node->cfg ? s->node->cfg->max_mailbox_name : 0;
    if (m == 0) m = 512;
    if (m > STORE_MAX_MAILBOX_NAME) m = STORE_MAX_MAILBOX_NAME;
    return (size_t)m;
}

static size_t max_depth(const struct imap_session *s)
{
    uint64_t m = s->node && s->node->cfg ? s->node->cfg->max_mailbox_depth : 0;
    return m == 0 ? 20 : (size_t)m;
}

/* First component equal to "inbox" (any case)? Upper-case it in place. */
static void fold_inbox(char *name)
{
    if (strncasecmp(name, "INBOX", 5) == 0 && (name[5] == '\0' || name[5] == '/'))
        memcpy(name, "INBOX", 5);
}

char *imap_mailbox_name(struct imap_session *s, const struct imap_arg *arg, const char **why_r)
{
    const char *why = "Invalid mailbox name.";
    const char *raw;
    size_t len;
    char *u = NULL;

    if (arg == NULL) goto fail;
    if (arg->type == IMAP_ARG_NIL) {
        raw = "NIL";
        len = 3;
    } else if (arg->type == IMAP_ARG_ATOM || arg->type == IMAP_ARG_QUOTED ||
               arg->type == IMAP_ARG_LITERAL) {
        raw = arg->str;
        len = arg->len;
    } else {
        goto fail;
    }
    if (raw == NULL || memchr(raw, '\0', len) != NULL) goto fail;
    /* Thunderbird adds a trailing separator on CREATE: drop one. */
    if (len > 1 && raw[len - 1] == '/') len--;
    if (len == 0) {
        why = "Empty mailbox name.";
        goto fail;
    }
    if (len > 4 * max_name_len(s)) {
        why = "Mailbox name too long.";
        goto fail;
    }
    u = imap_mutf7_to_utf8(raw, len);
    if (u == NULL) {
        why = "Mailbox name is not valid modified UTF-7.";
        goto fail;
    }
    size_t ul = strlen(u);
    if (ul > max_name_len(s)) {
        why = "Mailbox name too long.";
        goto fail;
    }
    for (size_t i = 0; i < ul; i++) {
        unsigned char c = (unsigned char)u[i];
        if (c < 0x20 || c == 0x7f ||
            (c == 0xc2 && i + 1 < ul && (unsigned char)u[i + 1] >= 0x80 &&
             (unsigned char)u[i + 1] <= 0x9f)) {
            why = "Mailbox name contains control characters.";
            goto fail;
        }
        if (c == '%' || c == '*') {
            why = "Mailbox name contains wildcards.";
            goto fail;
        }
    }
    /* Components: no empty ones (no leading '/', no "//"), no "." or "..". */
    size_t depth = 0;
    for (const char *p = u;;) {
        const char *e = strchr(p, '/');
        size_t cl = e ? (size_t)(e - p) : strlen(p);
        if (cl == 0) {
            why = "Mailbox name has an empty hierarchy level.";
            goto fail;
        }
        if ((cl == 1 && p[0] == '.') || (cl == 2 && p[0] == '.' && p[1] == '.')) {
            why = "Mailbox name has a \".\" or \"..\" hierarchy level.";
            goto fail;
        }
        depth++;
        if (e == NULL) break;
        p = e + 1;
    }
    if (depth > max_depth(s)) {
        why = "Mailbox hierarchy too deep.";
        goto fail;
    }
    fold_inbox(u);
    return u;
fail:
    free(u);
    if (why_r) *why_r = why;
    return NULL;
}

void imap_write_mailbox_name(struct imap_session *s, const char *utf8)
{
    size_t len = strlen(utf8);
    char *m = imap_utf8_to_mutf7(utf8, len);
    if (m == NULL) {
        imap_write_string(s, utf8, len);
        return;
    }
    imap_write_string(s, m, strlen(m));
    free(m);
}

/* ---- proposals ---- */

enum mb_op_kind { OP_CREATE = 1, OP_DELETE, OP_RENAME, OP_SUBSCRIBE };

struct mb_op {
    struct imap_session *s;
    enum mb_op_kind kind;
    struct store_outcome out;
    char **names; /* CREATE: missing parents then the target */
    size_t n_names, next;
    uint32_t special_use; /* CREATE target */
    char *name, *name2;   /* DELETE/RENAME/SUBSCRIBE */
    int subscribe;
};

static void mb_op_free(struct mb_op *op)
{
    for (size_t i = 0; i < op->n_names; i++)
        free(op->names[i]);
    free(op->names);
    free(op->name);
    free(op->name2);
    store_outcome_clear(&op->out);
    free(op);
}

static void mb_op_cb(void *arg, int status, struct store_outcome *o);

/* Build and propose the entry for op's next step. Returns 0 or a negative
 * rep status (callback will not fire). */
static int mb_op_propose(struct mb_op *op)
{
    struct imap_session *s = op->s;
    Coffer__Entry e = COFFER__ENTRY__INIT;
    Coffer__MailboxCreate mc = COFFER__MAILBOX_CREATE__INIT;
    Coffer__MailboxDelete md = COFFER__MAILBOX_DELETE__INIT;
    Coffer__MailboxRename mr = COFFER__MAILBOX_RENAME__INIT;
    Coffer__Subscribe sb = COFFER__SUBSCRIBE__INIT;
    e.actor = s->username;
    switch (op->kind) {
    case OP_CREATE:
        mc.username = s->username;
        mc.name = op->names[op->next];
        if (op->next + 1 == op->n_names && op->special_use) {
            mc.has_special_use = 1;
            mc.special_use = op->special_use;
        }
        e.op_case = COFFER__ENTRY__OP_MAILBOX_CREATE;
        e.mailbox_create = &mc;
        break;
    case OP_DELETE:
        md.username = s->username;
        md.name = op->name;
        e.op_case = COFFER__ENTRY__OP_MAILBOX_DELETE;
        e.mailbox_delete = &md;
        break;
    case OP_RENAME:
        mr.username = s->username;
        mr.old_name = op->name;
        mr.new_name = op->name2;
        e.op_case = COFFER__ENTRY__OP_MAILBOX_RENAME;
        e.mailbox_rename = &mr;
        break;
    case OP_SUBSCRIBE:
        sb.username = s->username;
        sb.name = op->name;
        sb.subscribed = op->subscribe;
        e.op_case = COFFER__ENTRY__OP_SUBSCRIBE;
        e.subscribe = &sb;
        break;
    }
    store_outcome_clear(&op->out);
    memset(&op->out, 0, sizeof(op->out));
    return propose_entry(s->node, &e, &op->out, mb_op_cb, op);
}

static void mb_op_start(struct mb_op *op)
{
    struct imap_session *s = op->s;
    int rc = mb_op_propose(op);
    if (rc < 0) {
        mb_op_free(op);
        imap_reply_propose_error(s, rc);
    }
}

static void outcome_text(const struct store_outcome *o, char *buf, size_t len, const char *dflt)
{
    snprintf(buf, len, "%s", o->text[0] ? o->text : dflt);
    for (char *p = buf; *p; p++)
        if ((unsigned char)*p < 0x20 || (unsigned char)*p >= 0x7f) *p = '?';
}

static void mb_op_cb(void *arg, int status, struct store_outcome *o)
{
    struct mb_op *op = arg;
    struct imap_session *s = op->s;
    char text[200];
    (void)o;
    if (status != REP_OK) {
        mb_op_free(op);
        imap_reply_propose_error(s, status);
        return;
    }
    int res = op->out.result;
    switch (op->kind) {
    case OP_CREATE:
        if (op->next + 1 < op->n_names) {
            /* A parent: EEXIST is fine (someone made it meanwhile). */
            if (res != STORE_OK && res != STORE_EEXIST) break;
            op->next++;
            mb_op_start(op);
            return;
        }
        if (res == STORE_OK) {
            mb_op_free(op);
            imap_cmd_done(s, "OK", NULL, "Create completed.");
            return;
        }
        if (res == STORE_EEXIST) {
            mb_op_free(op);
            imap_cmd_done(s, "NO", "ALREADYEXISTS", "Mailbox already exists.");
            return;
        }
        break;
    case OP_DELETE:
        if (res == STORE_OK) {
            mb_op_free(op);
            imap_cmd_done(s, "OK", NULL, "Delete completed.");
            return;
        }
        if (res == STORE_ENOENT) {
            mb_op_free(op);
            imap_cmd_done(s, "NO", "NONEXISTENT", "Mailbox doesn't exist.");
            return;
        }
        break;
    case OP_RENAME:
        if (res == STORE_OK) {
            mb_op_free(op);
            imap_cmd_done(s, "OK", NULL, "Rename completed.");
            return;
        }
        if (res == STORE_ENOENT) {
            mb_op_free(op);
            imap_cmd_done(s, "NO", "NONEXISTENT", "Mailbox doesn't exist.");
            return;
        }
        if (res == STORE_EEXIST) {
            mb_op_free(op);
            imap_cmd_done(s, "NO", "ALREADYEXISTS", "Target mailbox already exists.");
            return;
        }
        break;
    case OP_SUBSCRIBE:
        if (res == STORE_OK || res == STORE_EEXIST || res == STORE_ENOENT) {
            int sub = op->subscribe;
            mb_op_free(op);
            imap_cmd_done(s, "OK", NULL, "%s completed.", sub ? "Subscribe" : "Unsubscribe");
            return;
        }
        break;
    }
    outcome_text(&op->out, text, sizeof(text), "Operation failed.");
    const char *code = res == STORE_EQUOTA ? "OVERQUOTA" : res == STORE_EINVAL ? "CANNOT" : NULL;
    mb_op_free(op);
    imap_cmd_done(s, "NO", code, "%s", text);
}

static struct mb_op *mb_op_new(struct imap_session *s, enum mb_op_kind kind)
{
    struct mb_op *op = calloc(1, sizeof(*op));
    if (op == NULL) {
        imap_cmd_done(s, "NO", "SERVERBUG", "Out of memory.");
        return NULL;
    }
    op->s = s;
    op->kind = kind;
    return op;
}

/* Parse the mailbox argument; on failure replies and returns NULL. */
static char *name_arg(struct imap_session *s, const struct imap_arg *a)
{
    const char *why = NULL;
    if (!imap_arg_is_astring(a) && !(a != NULL && a->type == IMAP_ARG_NIL)) {
        imap_cmd_done(s, "BAD", NULL, "Invalid mailbox name argument.");
        return NULL;
    }
    char *n = imap_mailbox_name(s, a, &why);
    if (n == NULL) imap_cmd_done(s, "NO", "CANNOT", "%s", why ? why : "Invalid mailbox name.");
    return n;
}

/* Rights of the user on an existing mailbox name; *exists_r set. */
static int mailbox_lookup(struct imap_session *s, MDB_txn *txn, const char *name,
                          struct store_mailbox *mb, uint32_t *rights_r)
{
    int rc = store_mailbox_get(s->node->store, txn, s->user_id, name, mb);
    if (rc == 0)
        *rights_r = store_rights(s->node->store, txn, s->user_id, mb);
    else
        *rights_r = 0;
    return rc;
}

/* Parent of name has CREATE right (or does not exist: own namespace). */
static int may_create_under(struct imap_session *s, MDB_txn *txn, const char *name)
{
    const char *slash = strrchr(name, '/');
    if (slash == NULL) return 1;
    char *parent = strndup(name, (size_t)(slash - name));
    if (parent == NULL) return 0;
    struct store_mailbox mb;
    uint32_t r;
    int rc = mailbox_lookup(s, txn, parent, &mb, &r);
    free(parent);
    return rc != 0 || (r & STORE_R_CREATE);
}

/* CREATE-SPECIAL-USE (RFC 6154 3): "(USE (\Drafts ...))". -1: syntax,
 * -2: unknown use attribute. */
static int parse_create_params(const struct imap_arg *a, uint32_t *su_r)
{
    *su_r = 0;
    if (a->type != IMAP_ARG_LIST) return -1;
    for (size_t i = 0; i < a->n_list; i += 2) {
        if (i + 1 >= a->n_list || !imap_arg_eq(&a->list[i], "USE") ||
            a->list[i + 1].type != IMAP_ARG_LIST)
            return -1;
        const struct imap_arg *l = &a->list[i + 1];
        for (size_t k = 0; k < l->n_list; k++) {
            size_t j;
            if (l->list[k].type != IMAP_ARG_ATOM) return -1;
            for (j = 0; j < sizeof(special_uses) / sizeof(special_uses[0]); j++)
                if (imap_arg_eq(&l->list[k], special_uses[j].name)) break;
            if (j == sizeof(special_uses) / sizeof(special_uses[0])) return -2;
            *su_r |= special_uses[j].bit;
        }
    }
    return 0;
}

void imap_cmd_create(struct imap_session *s, struct imap_command *cmd, int uid)
{
    (void)uid;
    uint32_t su = 0;
    if (cmd->n_args < 1 || cmd->n_args > 2) {
        imap_cmd_done(s, "BAD", NULL, "Expected: CREATE mailbox");
        return;
    }
    if (cmd->n_args == 2) {
        int r = parse_create_params(&cmd->args[1], &su);
        if (r == -2) {
            imap_cmd_done(s, "NO", "USEATTR", "Unsupported special-use attribute.");
            return;
        }
        if (r < 0) {
            imap_cmd_done(s, "BAD", NULL, "Invalid CREATE parameters.");
            return;
        }
    }
    char *name = name_arg(s, &cmd->args[0]);
    if (name == NULL) return;
    if (strcmp(name, "INBOX") == 0) {
        free(name);
        imap_cmd_done(s, "NO", "ALREADYEXISTS", "Mailbox already exists.");
        return;
    }
    MDB_txn *txn = store_rtxn_begin(s->node->store);
    if (txn == NULL) {
        free(name);
        imap_cmd_done(s, "NO", "SERVERBUG", "Internal error.");
        return;
    }
    struct store_mailbox mb;
    uint32_t rights;
    int rc = mailbox_lookup(s, txn, name, &mb, &rights);
    if (rc == 0) {
        store_rtxn_end(txn);
        free(name);
        imap_cmd_done(s, "NO", "ALREADYEXISTS", "Mailbox already exists.");
        return;
    }
    if (!may_create_under(s, txn, name)) {
        store_rtxn_end(txn);
        free(name);
        imap_cmd_done(s, "NO", "NOPERM", "Permission denied.");
        return;
    }
    struct mb_op *op = mb_op_new(s, OP_CREATE);
    if (op == NULL) {
        store_rtxn_end(txn);
        free(name);
        return;
    }
    op->special_use = su;
    size_t depth = 1;
    for (const char *p = name; *p; p++)
        if (*p == '/') depth++;
    op->names = calloc(depth, sizeof(char *));
    if (op->names == NULL) {
        store_rtxn_end(txn);
        free(name);
        mb_op_free(op);
        imap_cmd_done(s, "NO", "SERVERBUG", "Out of memory.");
        return;
    }
    /* Missing parents, shallowest first. */
    for (const char *p = strchr(name, '/'); p != NULL; p = strchr(p + 1, '/')) {
        char *parent = strndup(name, (size_t)(p - name));
        if (parent == NULL) continue;
        if (store_mailbox_get(s->node->store, txn, s->user_id, parent, &mb) == 0)
            free(parent);
        else
            op->names[op->n_names++] = parent;
    }
    op->names[op->n_names++] = name;
    store_rtxn_end(txn);
    mb_op_start(op);
}

/* Unselect (no responses) when the selected mailbox is `name` or, if
 * with_children, below it. */
static void unselect_if_affected(struct imap_session *s, const char *name, int with_children)
{
    if (s->state != IMAP_S_SELECTED || s->sel.name == NULL) return;
    size_t l = strlen(name);
    int hit = strcmp(s->sel.name, name) == 0 ||
              (with_children && strncmp(s->sel.name, name, l) == 0 && s->sel.name[l] == '/');
    if (!hit) return;
    if (s->sel.watcher.on_change != NULL) {
        store_unwatch(s->node->store, &s->sel.watcher);
        s->sel.watcher.on_change = NULL;
    }
    free(s->sel.name);
    u32vec_free(&s->sel.uids);
    u32vec_free(&s->sel.pend_expunged);
    u32vec_free(&s->sel.pend_flags);
    memset(&s->sel, 0, sizeof(s->sel));
    s->state = IMAP_S_AUTH;
}

void imap_cmd_delete(struct imap_session *s, struct imap_command *cmd, int uid)
{
    (void)uid;
    if (cmd->n_args != 1) {
        imap_cmd_done(s, "BAD", NULL, "Expected: DELETE mailbox");
        return;
    }
    char *name = name_arg(s, &cmd->args[0]);
    if (name == NULL) return;
    if (strcmp(name, "INBOX") == 0) {
        free(name);
        imap_cmd_done(s, "NO", "CANNOT", "INBOX can't be deleted.");
        return;
    }
    MDB_txn *txn = store_rtxn_begin(s->node->store);
    if (txn == NULL) {
        free(name);
        imap_cmd_done(s, "NO", "SERVERBUG", "Internal error.");
        return;
    }
    struct store_mailbox mb;
    uint32_t rights;
    int rc = mailbox_lookup(s, txn, name, &mb, &rights);
    store_rtxn_end(txn);
    if (rc != 0 || !(rights & STORE_R_LOOKUP)) {
        free(name);
        imap_cmd_done(s, "NO", "NONEXISTENT", "Mailbox doesn't exist.");
        return;
    }
    if (!(rights & STORE_R_DELETEMBOX)) {
        free(name);
        imap_cmd_done(s, "NO", "NOPERM", "Permission denied.");
        return;
    }
    struct mb_op *op = mb_op_new(s, OP_DELETE);
    if (op == NULL) {
        free(name);
        return;
    }
    op->name = name;
    /* Deleting the selected mailbox: close it first (no BYE for ourselves). */
    unselect_if_affected(s, name, 0);
    mb_op_start(op);
}

void imap_cmd_rename(struct imap_session *s, struct imap_command *cmd, int uid)
{
    (void)uid;
    if (cmd->n_args != 2) {
        imap_cmd_done(s, "BAD", NULL, "Expected: RENAME old new");
        return;
    }
    char *from = name_arg(s, &cmd->args[0]);
    if (from == NULL) return;
    char *to = name_arg(s, &cmd->args[1]);
    if (to == NULL) {
        free(from);
        return;
    }
    const char *err_code = NULL, *err = NULL;
    size_t fl = strlen(from);
    struct store_mailbox mb;
    uint32_t rights = 0;
    int rc = 0;
    MDB_txn *txn = store_rtxn_begin(s->node->store);
    if (txn == NULL) {
        err_code = "SERVERBUG";
        err = "Internal error.";
        goto done;
    }
    if (strcmp(to, "INBOX") == 0) {
        err_code = "ALREADYEXISTS";
        err = "Target mailbox already exists.";
        goto done;
    }
    if (strncmp(to, from, fl) == 0 && (to[fl] == '/' || to[fl] == '\0') &&
        strcmp(from, "INBOX") != 0) {
        err_code = strcmp(to, from) == 0 ? "ALREADYEXISTS" : "CANNOT";
        err = strcmp(to, from) == 0 ? "Target mailbox already exists."
                                    : "Can't rename a mailbox under itself.";
        goto done;
    }
    rc = mailbox_lookup(s, txn, from, &mb, &rights);
    if (rc != 0 || !(rights & STORE_R_LOOKUP)) {
        err_code = "NONEXISTENT";
        err = "Mailbox doesn't exist.";
        goto done;
    }
    if (!(rights & STORE_R_DELETEMBOX)) {
        err_code = "NOPERM";
        err = "Permission denied.";
        goto done;
    }
    {
        struct store_mailbox mb2;
        uint32_t r2;
        if (mailbox_lookup(s, txn, to, &mb2, &r2) == 0) {
            err_code = "ALREADYEXISTS";
            err = "Target mailbox already exists.";
            goto done;
        }
    }
    if (!may_create_under(s, txn, to)) {
        err_code = "NOPERM";
        err = "Permission denied.";
        goto done;
    }
done:
    if (txn) store_rtxn_end(txn);
    if (err != NULL) {
        free(from);
        free(to);
        imap_cmd_done(s, "NO", err_code, "%s", err);
        return;
    }
    struct mb_op *op = mb_op_new(s, OP_RENAME);
    if (op == NULL) {
        free(from);
        free(to);
        return;
    }
    /* INBOX's children stay; other mailboxes take their children along. */
    unselect_if_affected(s, from, strcmp(from, "INBOX") != 0);
    op->name = from;
    op->name2 = to;
    mb_op_start(op);
}

static void subscribe_common(struct imap_session *s, struct imap_command *cmd, int subscribe)
{
    if (cmd->n_args != 1) {
        imap_cmd_done(s, "BAD", NULL, "Expected one mailbox name.");
        return;
    }
    char *name = name_arg(s, &cmd->args[0]);
    if (name == NULL) return;
    MDB_txn *txn = store_rtxn_begin(s->node->store);
    if (txn == NULL) {
        free(name);
        imap_cmd_done(s, "NO", "SERVERBUG", "Internal error.");
        return;
    }
    int has = store_subs_has(s->node->store, txn, s->user_id, name) > 0;
    store_rtxn_end(txn);
    if (has == subscribe) {
        free(name);
        imap_cmd_done(s, "OK", NULL, "%s completed.", subscribe ? "Subscribe" : "Unsubscribe");
        return;
    }
    struct mb_op *op = mb_op_new(s, OP_SUBSCRIBE);
    if (op == NULL) {
        free(name);
        return;
    }
    op->name = name;
    op->subscribe = subscribe;
    mb_op_start(op);
}

void imap_cmd_subscribe(struct imap_session *s, struct imap_command *cmd, int uid)
{
    (void)uid;
    subscribe_common(s, cmd, 1);
}

void imap_cmd_unsubscribe(struct imap_session *s, struct imap_command *cmd, int uid)
{
    (void)uid;
    subscribe_common(s, cmd, 0);
}

/* ---- LIST / LSUB ---- */

struct lent {
    char *name;
    uint32_t su;
    unsigned exists : 1;
    unsigned mb_anc : 1; /* ancestor of an existing mailbox */
    unsigned subscribed : 1;
    unsigned has_children : 1; /* existing or implied children */
    unsigned sub_desc : 1;     /* has a subscribed descendant */
};

struct lset {
    struct lent *v;
    size_t n, cap;
};

static void lset_add(struct lset *l, const char *name, size_t len, struct lent flags)
{
    if (l->n == l->cap) {
        size_t nc = l->cap ? l->cap * 2 : 64;
        struct lent *nv = realloc(l->v, nc * sizeof(*nv));
        if (nv == NULL) return;
        l->v = nv;
        l->cap = nc;
    }
    flags.name = strndup(name, len);
    if (flags.name == NULL) return;
    l->v[l->n++] = flags;
}

static void lset_free(struct lset *l)
{
    for (size_t i = 0; i < l->n; i++)
        free(l->v[i].name);
    free(l->v);
}

static int lent_cmp(const void *a, const void *b)
{
    return strcmp(((const struct lent *)a)->name, ((const struct lent *)b)->name);
}

static struct lent *lset_find(struct lset *l, const char *name, size_t len)
{
    size_t lo = 0, hi = l->n;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        int c = strncmp(l->v[mid].name, name, len);
        if (c == 0 && l->v[mid].name[len] != '\0') c = 1;
        if (c < 0)
            lo = mid + 1;
        else if (c > 0)
            hi = mid;
        else
            return &l->v[mid];
    }
    return NULL;
}

/* Sort and merge duplicate names (flags OR-ed). */
static void lset_normalise(struct lset *l)
{
    if (l->n == 0) return;
    qsort(l->v, l->n, sizeof(*l->v), lent_cmp);
    size_t o = 0;
    for (size_t i = 1; i < l->n; i++) {
        struct lent *d = &l->v[o], *e = &l->v[i];
        if (strcmp(d->name, e->name) == 0) {
            d->su |= e->su;
            d->exists |= e->exists;
            d->mb_anc |= e->mb_anc;
            d->subscribed |= e->subscribed;
            free(e->name);
        } else {
            l->v[++o] = *e;
        }
    }
    l->n = o + 1;
}

struct list_gather {
    struct imap_session *s;
    MDB_txn *txn;
    struct lset *set;
};

static void add_ancestors(struct lset *l, const char *name, int from_mailbox)
{
    struct lent f = {0};
    if (from_mailbox) f.mb_anc = 1;
    for (const char *p = strchr(name, '/'); p != NULL; p = strchr(p + 1, '/'))
        lset_add(l, name, (size_t)(p - name), f);
}

static int gather_mailbox(const struct store_mailbox *mb, void *arg)
{
    struct list_gather *g = arg;
    uint32_t r = store_rights(g->s->node->store, g->txn, g->s->user_id, mb);
    if (!(r & STORE_R_LOOKUP)) return 0;
    struct lent f = {0};
    f.exists = 1;
    f.su = mb->special_use;
    lset_add(g->set, mb->name, strlen(mb->name), f);
    add_ancestors(g->set, mb->name, 1);
    return 0;
}

static int gather_sub(const char *name, void *arg)
{
    struct list_gather *g = arg;
    struct lent f = {0};
    f.subscribed = 1;
    lset_add(g->set, name, strlen(name), f);
    add_ancestors(g->set, name, 0);
    return 0;
}

/* Build the combined set of names with all flags. */
static int gather(struct imap_session *s, struct lset *set)
{
    MDB_txn *txn = store_rtxn_begin(s->node->store);
    if (txn == NULL) return -1;
    struct list_gather g = {s, txn, set};
    int rc = store_mailbox_foreach(s->node->store, txn, s->user_id, gather_mailbox, &g);
    if (rc >= 0) rc = store_subs_foreach(s->node->store, txn, s->user_id, gather_sub, &g);
    store_rtxn_end(txn);
    if (rc < 0) return -1;
    lset_normalise(set);
    /* Children and subscribed-descendant marks. */
    for (size_t i = 0; i < set->n; i++) {
        struct lent *e = &set->v[i];
        if (!e->exists && !e->mb_anc && !e->subscribed) continue;
        for (const char *p = strchr(e->name, '/'); p != NULL; p = strchr(p + 1, '/')) {
            struct lent *a = lset_find(set, e->name, (size_t)(p - e->name));
            if (a == NULL) continue;
            if (e->exists || e->mb_anc) a->has_children = 1;
            if (e->subscribed) a->sub_desc = 1;
        }
    }
    return 0;
}

/* Wildcard matcher over UTF-8 bytes: '*' matches anything, '%' anything
 * but '/'. The "INBOX" prefix of a name matches case-insensitively.
 * O(pattern x name) with two rows. */
struct matcher {
    char **pats;
    size_t n_pats;
    unsigned char *a, *b;
};

static int match_one(const char *p, size_t pl, const char *name, unsigned char *prev,
                     unsigned char *cur)
{
    size_t nl = strlen(name);
    size_t ci = strncmp(name, "INBOX", 5) == 0 && (name[5] == '\0' || name[5] == '/') ? 5 : 0;
    prev[0] = 1;
    for (size_t j = 1; j <= pl; j++)
        prev[j] = prev[j - 1] && (p[j - 1] == '*' || p[j - 1] == '%');
    for (size_t i = 1; i <= nl; i++) {
        unsigned char c = (unsigned char)name[i - 1];
        int any = 0;
        cur[0] = 0;
        for (size_t j = 1; j <= pl; j++) {
            unsigned char pc = (unsigned char)p[j - 1];
            if (pc == '*')
                cur[j] = cur[j - 1] || prev[j];
            else if (pc == '%')
                cur[j] = cur[j - 1] || (prev[j] && c != '/');
            else
                cur[j] = prev[j - 1] && (pc == c || (i - 1 < ci && tolower(pc) == tolower(c)));
            any |= cur[j];
        }
        unsigned char *t = prev;
        prev = cur;
        cur = t;
        if (!any) return 0;
    }
    return prev[pl];
}

static int matcher_match(const struct matcher *m, const char *name)
{
    for (size_t i = 0; i < m->n_pats; i++)
        if (match_one(m->pats[i], strlen(m->pats[i]), name, m->a, m->b)) return 1;
    return 0;
}

static void matcher_free(struct matcher *m)
{
    for (size_t i = 0; i < m->n_pats; i++)
        free(m->pats[i]);
    free(m->pats);
    free(m->a);
    free(m->b);
}

/* Join reference and pattern ("cd" semantics, exactly one '/'), decode
 * mUTF-7. Returns malloc()ed UTF-8 or NULL when it can match nothing. */
static char *join_pattern(struct imap_session *s, const struct imap_arg *ref,
                          const struct imap_arg *pat)
{
    size_t rl = ref->len, pl = pat->len;
    const char *r = ref->str ? ref->str : "", *p = pat->str ? pat->str : "";
    if (pl > 2 * max_name_len(s) + 64 || rl > 2 * max_name_len(s) + 64) return NULL;
    char *joined = malloc(rl + pl + 2);
    if (joined == NULL) return NULL;
    size_t o = 0;
    if (rl > 0) {
        memcpy(joined, r, rl);
        o = rl;
        while (o > 0 && joined[o - 1] == '/')
            o--;
        while (pl > 0 && p[0] == '/') {
            p++;
            pl--;
        }
        joined[o++] = '/';
    }
    memcpy(joined + o, p, pl);
    o += pl;
    joined[o] = '\0';
    if (memchr(joined, '\0', o) != NULL) {
        free(joined);
        return NULL;
    }
    char *u = imap_mutf7_to_utf8(joined, o);
    free(joined);
    return u;
}

static int matcher_init(struct imap_session *s, struct matcher *m, const struct imap_arg *ref,
                        const struct imap_arg *const *pats, size_t n)
{
    size_t maxl = 0;
    memset(m, 0, sizeof(*m));
    m->pats = calloc(n ? n : 1, sizeof(char *));
    if (m->pats == NULL) return -1;
    for (size_t i = 0; i < n; i++) {
        char *u = join_pattern(s, ref, pats[i]);
        if (u == NULL) continue;
        if (strlen(u) > maxl) maxl = strlen(u);
        m->pats[m->n_pats++] = u;
    }
    m->a = malloc(maxl + 1);
    m->b = malloc(maxl + 1);
    if (m->a == NULL || m->b == NULL) return -1;
    return 0;
}

enum {
    SEL_SUBSCRIBED = 1,
    SEL_REMOTE = 2,
    SEL_RECURSIVE = 4,
    SEL_SPECIALUSE = 8,
    RET_SUBSCRIBED = 16,
    RET_CHILDREN = 32,
    RET_SPECIALUSE = 64,
};

static void write_list_line(struct imap_session *s, const char *cmdname, const struct lent *e,
                            int noselect, int nonexistent, int children, int subscribed,
                            int specialuse, int childinfo)
{
    int first = 1;
#define ATTR(str)                                                                                  \
    do {                                                                                           \
        if (!first) wr(s, " ", 1);                                                                 \
        wrs(s, str);                                                                               \
        first = 0;                                                                                 \
    } while (0)
    wrs(s, "* ");
    wrs(s, cmdname);
    wrs(s, " (");
    if (nonexistent)
        ATTR("\\NonExistent");
    else if (noselect)
        ATTR("\\Noselect");
    if (children && !nonexistent) ATTR(e->has_children ? "\\HasChildren" : "\\HasNoChildren");
    if (subscribed && e->subscribed) ATTR("\\Subscribed");
    if (specialuse && e->exists)
        for (size_t i = 0; i < sizeof(special_uses) / sizeof(special_uses[0]); i++)
            if (e->su & special_uses[i].bit) ATTR(special_uses[i].name);
#undef ATTR
    wrs(s, ") \"/\" ");
    imap_write_mailbox_name(s, e->name);
    if (childinfo) wrs(s, " (\"CHILDINFO\" (\"SUBSCRIBED\"))");
    wrs(s, "\r\n");
}

/* Has a subscribed descendant that no pattern matches (so it would not be
 * listed by itself: CHILDINFO / LSUB's % rule). */
static int hidden_sub_desc(struct lset *set, const struct matcher *m, const struct lent *e)
{
    size_t l = strlen(e->name);
    for (size_t i = 0; i < set->n; i++) {
        const struct lent *d = &set->v[i];
        if (!d->subscribed || strncmp(d->name, e->name, l) != 0 || d->name[l] != '/') continue;
        if (!matcher_match(m, d->name)) return 1;
    }
    return 0;
}

static int is_pattern_arg(const struct imap_arg *a)
{
    return a->type == IMAP_ARG_ATOM || a->type == IMAP_ARG_QUOTED || a->type == IMAP_ARG_LITERAL;
}

static void list_common(struct imap_session *s, struct imap_command *cmd, int lsub)
{
    size_t i = 0;
    unsigned opts = 0;
    const struct imap_arg *ref, *pats[64];
    size_t n_pats = 0;
    int extended = 0;

    if (!lsub && cmd->n_args > 0 && cmd->args[0].type == IMAP_ARG_LIST) {
        const struct imap_arg *l = &cmd->args[0];
        extended = 1;
        for (size_t k = 0; k < l->n_list; k++) {
            const struct imap_arg *o = &l->list[k];
            if (imap_arg_eq(o, "SUBSCRIBED"))
                opts |= SEL_SUBSCRIBED;
            else if (imap_arg_eq(o, "REMOTE"))
                opts |= SEL_REMOTE;
            else if (imap_arg_eq(o, "RECURSIVEMATCH"))
                opts |= SEL_RECURSIVE;
            else if (imap_arg_eq(o, "SPECIAL-USE"))
                opts |= SEL_SPECIALUSE;
            else
                goto bad;
        }
        if ((opts & SEL_RECURSIVE) && !(opts & (SEL_SUBSCRIBED | SEL_SPECIALUSE))) goto bad;
        i = 1;
    }
    if (cmd->n_args < i + 2) goto bad;
    ref = &cmd->args[i];
    if (!is_pattern_arg(ref) && ref->type != IMAP_ARG_NIL) goto bad;
    if (ref->type == IMAP_ARG_NIL) goto bad;
    const struct imap_arg *pa = &cmd->args[i + 1];
    if (!lsub && pa->type == IMAP_ARG_LIST) {
        extended = 1;
        if (pa->n_list == 0 || pa->n_list > 64) goto bad;
        for (size_t k = 0; k < pa->n_list; k++) {
            if (!is_pattern_arg(&pa->list[k])) goto bad;
            pats[n_pats++] = &pa->list[k];
        }
    } else if (is_pattern_arg(pa)) {
        pats[n_pats++] = pa;
    } else {
        goto bad;
    }
    i += 2;
    if (!lsub && i < cmd->n_args) {
        if (i + 2 != cmd->n_args || !imap_arg_eq(&cmd->args[i], "RETURN") ||
            cmd->args[i + 1].type != IMAP_ARG_LIST)
            goto bad;
        const struct imap_arg *l = &cmd->args[i + 1];
        extended = 1;
        for (size_t k = 0; k < l->n_list; k++) {
            const struct imap_arg *o = &l->list[k];
            if (imap_arg_eq(o, "SUBSCRIBED"))
                opts |= RET_SUBSCRIBED;
            else if (imap_arg_eq(o, "CHILDREN"))
                opts |= RET_CHILDREN;
            else if (imap_arg_eq(o, "SPECIAL-USE"))
                opts |= RET_SPECIALUSE;
            else
                goto bad;
        }
    } else if (i != cmd->n_args) {
        goto bad;
    }
    (void)extended;

    const char *cname = lsub ? "LSUB" : "LIST";
    /* LIST "" "": the hierarchy delimiter and root. */
    if (n_pats == 1 && pats[0]->len == 0) {
        if (lsub)
            imap_cmd_done(s, "OK", NULL, "Lsub completed.");
        else {
            wrs(s, "* LIST (\\Noselect) \"/\" \"\"\r\n");
            imap_cmd_done(s, "OK", NULL, "List completed.");
        }
        return;
    }

    struct lset set = {0};
    struct matcher m;
    memset(&m, 0, sizeof(m));
    if (gather(s, &set) < 0 || matcher_init(s, &m, ref, pats, n_pats) < 0) {
        lset_free(&set);
        if (m.pats) matcher_free(&m);
        imap_cmd_done(s, "NO", "SERVERBUG", "Internal error.");
        return;
    }
    for (size_t k = 0; k < set.n; k++) {
        struct lent *e = &set.v[k];
        if (!matcher_match(&m, e->name)) continue;
        if (lsub) {
            if (e->subscribed)
                write_list_line(s, cname, e, !e->exists, 0, 0, 0, 0, 0);
            else if (e->sub_desc && hidden_sub_desc(&set, &m, e))
                write_list_line(s, cname, e, 1, 0, 0, 0, 0, 0);
            continue;
        }
        if (opts & SEL_SUBSCRIBED) {
            int ci = (opts & SEL_RECURSIVE) && e->sub_desc && hidden_sub_desc(&set, &m, e);
            if (!e->subscribed && !ci) continue;
            if ((opts & SEL_SPECIALUSE) && !(e->exists && e->su)) continue;
            write_list_line(s, cname, e, !e->exists, !e->exists && !e->mb_anc, 1, 1, 1, ci);
            continue;
        }
        if (!e->exists && !e->mb_anc) continue; /* only subscribed */
        if ((opts & SEL_SPECIALUSE) && !(e->exists && e->su)) continue;
        write_list_line(s, cname, e, !e->exists, 0, 1, (opts & RET_SUBSCRIBED) != 0, 1, 0);
    }
    matcher_free(&m);
    lset_free(&set);
    imap_cmd_done(s, "OK", NULL, "%s completed.", lsub ? "Lsub" : "List");
    return;
bad:
    imap_cmd_done(s, "BAD", NULL, "Invalid %s arguments.", lsub ? "LSUB" : "LIST");
}

void imap_cmd_list(struct imap_session *s, struct imap_command *cmd, int uid)
{
    (void)uid;
    list_common(s, cmd, 0);
}

void imap_cmd_lsub(struct imap_session *s, struct imap_command *cmd, int uid)
{
    (void)uid;
    list_common(s, cmd, 1);
}

/* ---- STATUS ---- */

void imap_cmd_status(struct imap_session *s, struct imap_command *cmd, int uid)
{
    (void)uid;
    enum { ST_MESSAGES, ST_RECENT, ST_UIDNEXT, ST_UIDVALIDITY, ST_UNSEEN };
    static const char *const names[] = {"MESSAGES", "RECENT", "UIDNEXT", "UIDVALIDITY", "UNSEEN"};
    int items[16];
    size_t n_items = 0;
    if (cmd->n_args != 2 || cmd->args[1].type != IMAP_ARG_LIST || cmd->args[1].n_list == 0 ||
        cmd->args[1].n_list > 16) {
        imap_cmd_done(s, "BAD", NULL, "Expected: STATUS mailbox (items)");
        return;
    }
    for (size_t k = 0; k < cmd->args[1].n_list; k++) {
        const struct imap_arg *a = &cmd->args[1].list[k];
        int found = -1;
        for (int j = 0; j < 5; j++)
            if (a->type == IMAP_ARG_ATOM && imap_arg_eq(a, names[j])) found = j;
        if (found < 0) {
            imap_cmd_done(s, "BAD", NULL, "Unknown STATUS item.");
            return;
        }
        items[n_items++] = found;
    }
    char *name = name_arg(s, &cmd->args[0]);
    if (name == NULL) return;
    MDB_txn *txn = store_rtxn_begin(s->node->store);
    if (txn == NULL) {
        free(name);
        imap_cmd_done(s, "NO", "SERVERBUG", "Internal error.");
        return;
    }
    struct store_mailbox mb;
    uint32_t rights;
    int rc = mailbox_lookup(s, txn, name, &mb, &rights);
    if (rc != 0 || !(rights & STORE_R_LOOKUP)) {
        store_rtxn_end(txn);
        free(name);
        imap_cmd_done(s, "NO", "NONEXISTENT", "Mailbox doesn't exist.");
        return;
    }
    if (!(rights & STORE_R_READ)) {
        store_rtxn_end(txn);
        free(name);
        imap_cmd_done(s, "NO", "NOPERM", "Permission denied.");
        return;
    }
    wrs(s, "* STATUS ");
    imap_write_mailbox_name(s, name);
    wrs(s, " (");
    for (size_t k = 0; k < n_items; k++) {
        char buf[64];
        uint64_t v = 0;
        switch (items[k]) {
        case ST_MESSAGES:
            v = mb.messages;
            break;
        case ST_RECENT:
            v = 0; /* \Recent is per session (see imap_session.c) */
            break;
        case ST_UIDNEXT:
            v = mb.uidnext;
            break;
        case ST_UIDVALIDITY:
            v = mb.uidvalidity;
            break;
        case ST_UNSEEN:
            v = mb.unseen;
            break;
        }
        int n = snprintf(buf, sizeof(buf), "%s%s %llu", k ? " " : "", names[items[k]],
                         (unsigned long long)v);
        wr(s, buf, (size_t)n);
    }
    wrs(s, ")\r\n");
    store_rtxn_end(txn);
    free(name);
    imap_cmd_done(s, "OK", NULL, "Status completed.");
}
