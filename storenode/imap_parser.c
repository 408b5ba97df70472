/* imap_parser: incremental, bounded IMAP command parser (see imap_parser.h).
 *
 * Input is consumed byte by byte by a small state machine:
 *
 *   PS_LINE      collect one line segment (command text up to LF) into
 *                linebuf, bounded by max_line over the whole command;
 *   PS_LIT_WAIT  a segment ended in {n}/{n+}: wait for accept/reject;
 *   PS_LIT_DATA  collect exactly n literal bytes, then back to PS_LINE
 *                (the same command continues after the literal);
 *   PS_LIT_SKIP  skip n bytes of a refused non-synchronising literal;
 *   PS_DISCARD   after an error, drop bytes up to LF without buffering
 *                (a trailing {n+} on the dropped line is skipped too).
 *
 * Each complete segment is tokenised at once; the tokeniser state (phase,
 * open lists) survives across segments, so a literal in the middle of a
 * list works. Finished lists are copied into a per-command arena; literal
 * buffers are malloc()ed and tracked so they can be freed or taken over.
 */
#include "imap_parser.h"

#include <ctype.h>
#include <stdlib.h>
#include <string.h>

#define ARENA_BLOCK 4096

struct arena_block {
    struct arena_block *next;
    size_t used, cap;
    max_align_t data[];
};

struct arg_vec {
    struct imap_arg *v;
    size_t n, cap;
};

struct lit_buf {
    char *buf;
    struct lit_buf *next;
};

enum parser_state { PS_LINE, PS_LIT_WAIT, PS_LIT_DATA, PS_LIT_SKIP, PS_DISCARD };
enum cmd_phase { PH_TAG, PH_NAME, PH_ARGS };

struct imap_parser {
    struct imap_parser_limits lim;
    enum parser_state state;

    /* current line segment */
    char *line;
    size_t line_len, line_cap;
    size_t text_total; /* command text of previous segments */

    /* tokeniser */
    enum cmd_phase phase;
    int after_token;       /* a token just ended: need SP, ')' or end */
    struct arg_vec *stack; /* stack[0] = top level */
    size_t depth, stack_cap;
    size_t n_tokens;

    /* literal */
    struct imap_literal_info lit;
    uint64_t lit_limit;
    uint64_t lit_got;
    char *lit_buf; /* buffer being filled (tracked in lits) */
    size_t lit_cap;
    struct lit_buf *lit_entry;   /* its tracking entry */
    size_t lit_depth, lit_index; /* where its arg sits in the stack */
    uint64_t skip_left;
    int pending_error;

    /* discard tail (to spot a trailing {n+}) */
    char tail[24];
    size_t tail_len;

    struct imap_command cmd;
    struct arena_block *arena;
    struct lit_buf *lits;
    int done; /* previous feed returned a command/error: reset on next */
    int rl_done;
};

/* ---- arena ---------------------------------------------------------- */

static void *arena_alloc(struct imap_parser *p, size_t n)
{
    n = (n + sizeof(max_align_t) - 1) / sizeof(max_align_t) * sizeof(max_align_t);
    if (n == 0) n = sizeof(max_align_t);
    struct arena_block *b = p->arena;
    if (b == NULL || b->cap - b->used < n) {
        size_t cap = n > ARENA_BLOCK ? n : ARENA_BLOCK;
        b = malloc(sizeof(*b) + cap);
        if (b == NULL) abort();
        b->used = 0;
        b->cap = cap;
        b->next = p->arena;
        p->arena = b;
    }
    void *r = (char *)b->data + b->used;
    b->used += n;
    memset(r, 0, n);
    return r;
}

static char *arena_strndup(struct imap_parser *p, const char *s, size_t n)
{
    char *r = arena_alloc(p, n + 1);
    memcpy(r, s, n);
    r[n] = '\0';
    return r;
}

static void arena_clear(struct imap_parser *p)
{
    struct arena_block *b = p->arena;
    while (b != NULL) {
        struct arena_block *n = b->next;
        free(b);
        b = n;
    }
    p->arena = NULL;
}

/* ---- command state -------------------------------------------------- */

static void lits_free(struct imap_parser *p)
{
    struct lit_buf *l = p->lits;
    while (l != NULL) {
        struct lit_buf *n = l->next;
        free(l->buf);
        free(l);
        l = n;
    }
    p->lits = NULL;
}

static void command_clear(struct imap_parser *p)
{
    for (size_t i = 0; i < p->stack_cap; i++)
        p->stack[i].n = 0;
    p->depth = 0;
    p->phase = PH_TAG;
    p->after_token = 0;
    p->n_tokens = 0;
    p->text_total = 0;
    p->line_len = 0;
    p->lit_buf = NULL;
    p->pending_error = 0;
    memset(&p->cmd, 0, sizeof(p->cmd));
    memset(&p->lit, 0, sizeof(p->lit));
    lits_free(p);
    arena_clear(p);
}

static void set_limits(struct imap_parser *p, const struct imap_parser_limits *lim)
{
    struct imap_parser_limits d = {65536, 65536, 16, 10000};
    if (lim != NULL) {
        if (lim->max_line) d.max_line = lim->max_line;
        if (lim->max_literal) d.max_literal = lim->max_literal;
        if (lim->max_depth) d.max_depth = lim->max_depth;
        if (lim->max_args) d.max_args = lim->max_args;
    }
    p->lim = d;
}

struct imap_parser *imap_parser_create(const struct imap_parser_limits *lim)
{
    struct imap_parser *p = calloc(1, sizeof(*p));
    if (p == NULL) return NULL;
    set_limits(p, lim);
    p->stack_cap = 4;
    p->stack = calloc(p->stack_cap, sizeof(*p->stack));
    if (p->stack == NULL) {
        free(p);
        return NULL;
    }
    return p;
}

void imap_parser_destroy(struct imap_parser **pp)
{
    struct imap_parser *p = *pp;
    if (p == NULL) return;
    command_clear(p);
    for (size_t i = 0; i < p->stack_cap; i++)
        free(p->stack[i].v);
    free(p->stack);
    free(p->line);
    free(p);
    *pp = NULL;
}

void imap_parser_set_limits(struct imap_parser *p, const struct imap_parser_limits *lim)
{
    set_limits(p, lim);
}

void imap_parser_reset(struct imap_parser *p)
{
    command_clear(p);
    p->state = PS_LINE;
    p->skip_left = 0;
    p->tail_len = 0;
    p->done = 0;
    p->rl_done = 0;
}

/* ---- tokeniser ------------------------------------------------------ */

static int is_atom_char(unsigned char c)
{
    if (c <= 0x1f || c >= 0x7f) return 0;
    switch (c) {
    case '(':
    case ')':
    case '{':
    case ' ':
    case '"':
        return 0;
    default:
        return 1;
    }
}

static int is_tag_char(unsigned char c)
{
    return is_atom_char(c) && c != '+' && c != '*' && c != '%' && c != '\\';
}

static struct imap_arg *push_arg(struct imap_parser *p)
{
    struct arg_vec *v = &p->stack[p->depth];
    if (v->n == v->cap) {
        size_t cap = v->cap ? v->cap * 2 : 8;
        struct imap_arg *nv = realloc(v->v, cap * sizeof(*nv));
        if (nv == NULL) abort();
        v->v = nv;
        v->cap = cap;
    }
    struct imap_arg *a = &v->v[v->n++];
    memset(a, 0, sizeof(*a));
    return a;
}

static struct imap_arg *finish_vec(struct imap_parser *p, struct arg_vec *v)
{
    if (v->n == 0) return NULL;
    struct imap_arg *r = arena_alloc(p, v->n * sizeof(*r));
    memcpy(r, v->v, v->n * sizeof(*r));
    return r;
}

enum tok_result { TOK_DONE, TOK_LITERAL, TOK_ERROR };

/* Parse the tag from the start of a buffered line (for error reports). */
static void salvage_tag(struct imap_parser *p, const char *s, size_t n)
{
    if (p->cmd.tag != NULL || p->phase != PH_TAG) return;
    size_t i = 0;
    while (i < n && is_tag_char((unsigned char)s[i]))
        i++;
    if (i > 0 && i < n && s[i] == ' ') p->cmd.tag = arena_strndup(p, s, i);
}

/* Tokenise one complete line segment s[0..n) (line end stripped). */
static enum tok_result tokenize(struct imap_parser *p, const char *s, size_t n, const char **err)
{
    size_t i = 0;
    size_t close_at = SIZE_MAX, bad_at = SIZE_MAX; /* atom '[' scan caches */

    if (p->phase == PH_TAG) {
        while (i < n && is_tag_char((unsigned char)s[i]))
            i++;
        if (i == 0) {
            *err = n > 0 ? "invalid tag" : "missing tag";
            return TOK_ERROR;
        }
        if (i == n || s[i] != ' ') {
            if (i == n) {
                p->cmd.tag = arena_strndup(p, s, i);
                *err = "missing command";
            } else {
                *err = "invalid character in tag";
            }
            return TOK_ERROR;
        }
        p->cmd.tag = arena_strndup(p, s, i);
        i++;
        p->phase = PH_NAME;
    }
    if (p->phase == PH_NAME) {
        size_t st = i;
        while (i < n && is_atom_char((unsigned char)s[i]) && s[i] != '[')
            i++;
        if (i == st || (i < n && s[i] != ' ')) {
            *err = i == st ? "missing command" : "invalid character in command name";
            return TOK_ERROR;
        }
        char *name = arena_strndup(p, s + st, i - st);
        for (char *c = name; *c; c++)
            *c = (char)toupper((unsigned char)*c);
        p->cmd.name = name;
        p->phase = PH_ARGS;
        p->after_token = 1;
    }

    while (i < n) {
        unsigned char c = (unsigned char)s[i];
        if (c == ' ') {
            p->after_token = 0;
            i++;
            continue;
        }
        if (c == ')') {
            if (p->depth == 0) {
                *err = "unexpected ')'";
                return TOK_ERROR;
            }
            struct arg_vec *v = &p->stack[p->depth];
            struct imap_arg *kids = finish_vec(p, v);
            size_t nk = v->n;
            v->n = 0;
            p->depth--;
            struct imap_arg *a = &p->stack[p->depth].v[p->stack[p->depth].n - 1];
            a->list = kids;
            a->n_list = nk;
            p->after_token = 1;
            i++;
            continue;
        }
        if (p->after_token) {
            *err = "missing space between arguments";
            return TOK_ERROR;
        }
        if (++p->n_tokens > p->lim.max_args) {
            *err = "too many arguments";
            return TOK_ERROR;
        }
        if (c == '(') {
            if (p->depth + 1 > p->lim.max_depth) {
                *err = "nested too deep";
                return TOK_ERROR;
            }
            struct imap_arg *a = push_arg(p);
            a->type = IMAP_ARG_LIST;
            a->str = "";
            p->depth++;
            if (p->depth >= p->stack_cap) {
                size_t cap = p->stack_cap * 2;
                struct arg_vec *ns = realloc(p->stack, cap * sizeof(*ns));
                if (ns == NULL) abort();
                memset(ns + p->stack_cap, 0, (cap - p->stack_cap) * sizeof(*ns));
                p->stack = ns;
                p->stack_cap = cap;
            }
            p->stack[p->depth].n = 0;
            i++;
            continue;
        }
        if (c == '"') {
            /* quoted string: size it first (never allocate per remaining
             * line: many short strings would cost quadratic memory) */
            size_t e = i + 1;
            while (e < n && s[e] != '"')
                e += (s[e] == '\\' && e + 1 < n) ? 2 : 1;
            char *out = arena_alloc(p, (e < n ? e : n) - i);
            size_t o = 0;
            i++;
            for (;;) {
                if (i >= n) {
                    *err = "unterminated quoted string";
                    return TOK_ERROR;
                }
                unsigned char q = (unsigned char)s[i];
                if (q == '"') break;
                if (q == '\\') {
                    if (i + 1 >= n) {
                        *err = "unterminated quoted string";
                        return TOK_ERROR;
                    }
                    q = (unsigned char)s[i + 1];
                    if (q != '"' && q != '\\') {
                        *err = "invalid escape in quoted string";
                        return TOK_ERROR;
                    }
                    i++;
                } else if (q == '\0' || q == '\r') {
                    *err = "invalid character in quoted string";
                    return TOK_ERROR;
                }
                out[o++] = (char)q;
                i++;
            }
            i++;
            out[o] = '\0';
            struct imap_arg *a = push_arg(p);
            a->type = IMAP_ARG_QUOTED;
            a->str = out;
            a->len = o;
            p->after_token = 1;
            continue;
        }
        if (c == '{') {
            uint64_t sz = 0;
            size_t j = i + 1;
            int nonsync = 0;
            if (j >= n || !isdigit((unsigned char)s[j])) {
                *err = "invalid literal size";
                return TOK_ERROR;
            }
            while (j < n && isdigit((unsigned char)s[j])) {
                unsigned d = (unsigned)(s[j] - '0');
                if (sz > (UINT64_MAX - d) / 10 || sz * 10 + d > (uint64_t)SIZE_MAX / 2) {
                    *err = "literal too big";
                    return TOK_ERROR;
                }
                sz = sz * 10 + d;
                j++;
            }
            if (j < n && s[j] == '+') {
                nonsync = 1;
                j++;
            }
            if (j >= n || s[j] != '}') {
                *err = "invalid literal size";
                return TOK_ERROR;
            }
            j++;
            if (j != n) {
                *err = "literal must end the line";
                return TOK_ERROR;
            }
            p->lit.size = sz;
            p->lit.non_sync = nonsync;
            p->lit.tag = p->cmd.tag;
            p->lit.name = p->cmd.name;
            p->lit.arg_index = p->depth > 0 ? p->stack[0].n - 1 : p->stack[0].n;
            p->lit.args = p->stack[0].v;
            p->lit.n_args = p->stack[0].n;
            return TOK_LITERAL;
        }
        /* atom (possibly with [...] sections). A '[' opens a section up to
         * the next ']' if no CTL/8-bit byte comes first; otherwise it
         * is an ordinary ATOM-CHAR. The positions of the next ']' and the
         * next bad byte are cached so the scan stays linear. */
        size_t st = i;
        while (i < n) {
            unsigned char a = (unsigned char)s[i];
            if (a == '[') {
                if (close_at == SIZE_MAX || close_at < i) {
                    const char *cl = memchr(s + i, ']', n - i);
                    close_at = cl ? (size_t)(cl - s) : n;
                }
                if (bad_at == SIZE_MAX || bad_at < i) {
                    bad_at = i;
                    while (bad_at < n && (unsigned char)s[bad_at] >= 0x20 &&
                           (unsigned char)s[bad_at] < 0x7f)
                        bad_at++;
                }
                i = close_at < n && bad_at > close_at ? close_at + 1 : i + 1;
                continue;
            }
            if (!is_atom_char(a)) break;
            i++;
        }
        if (i < n && s[i] != ' ' && s[i] != ')' && s[i] != '(') {
            *err = "invalid character in atom";
            return TOK_ERROR;
        }
        if (i < n && s[i] == '(') {
            *err = "missing space between arguments";
            return TOK_ERROR;
        }
        if (i == st) {
            *err = "invalid character in atom";
            return TOK_ERROR;
        }
        struct imap_arg *a = push_arg(p);
        if (i - st == 3 && strncasecmp(s + st, "NIL", 3) == 0) {
            a->type = IMAP_ARG_NIL;
            a->str = "NIL";
            a->len = 3;
        } else {
            a->type = IMAP_ARG_ATOM;
            a->str = arena_strndup(p, s + st, i - st);
            a->len = i - st;
        }
        p->after_token = 1;
    }
    if (p->depth > 0) {
        *err = "missing ')'";
        return TOK_ERROR;
    }
    return TOK_DONE;
}

/* Does s[0..n) end with "{digits+}"? Then store the size. */
static int trailing_nonsync(const char *s, size_t n, uint64_t *size_r)
{
    if (n < 4 || s[n - 1] != '}' || s[n - 2] != '+') return 0;
    size_t j = n - 2;
    size_t e = j;
    while (j > 0 && isdigit((unsigned char)s[j - 1]))
        j--;
    if (j == e || j == 0 || s[j - 1] != '{') return 0;
    uint64_t v = 0;
    for (size_t k = j; k < e; k++) {
        if (v > UINT64_MAX / 10 - 1) return 0;
        v = v * 10 + (uint64_t)(s[k] - '0');
    }
    *size_r = v;
    return 1;
}

/* ---- feeding -------------------------------------------------------- */

static enum imap_parse_result fail(struct imap_parser *p, const char *why,
                                   struct imap_command **cmd_r, const char **error_r)
{
    *error_r = why;
    *cmd_r = &p->cmd;
    p->done = 1;
    return IMAP_PARSE_ERROR;
}

static int line_append(struct imap_parser *p, const char *s, size_t n)
{
    if (p->line_len + n + 1 > p->line_cap) {
        size_t cap = p->line_cap ? p->line_cap : 256;
        while (cap < p->line_len + n + 1)
            cap *= 2;
        char *nl = realloc(p->line, cap);
        if (nl == NULL) abort();
        p->line = nl;
        p->line_cap = cap;
    }
    memcpy(p->line + p->line_len, s, n);
    p->line_len += n;
    return 0;
}

enum imap_parse_result imap_parser_feed(struct imap_parser *p, const char *buf, size_t len,
                                        size_t *used_r, struct imap_command **cmd_r,
                                        const char **error_r)
{
    size_t pos = 0;
    const char *dummy_err;
    if (error_r == NULL) error_r = &dummy_err;
    *error_r = NULL;
    *cmd_r = NULL;
    *used_r = 0;

    if (p->done) {
        command_clear(p);
        p->done = 0;
    }
    if (p->rl_done) {
        p->rl_done = 0;
        p->line_len = 0;
    }

    for (;;) {
        switch (p->state) {
        case PS_LIT_WAIT:
            *used_r = pos;
            *cmd_r = &p->cmd;
            return IMAP_PARSE_LITERAL;

        case PS_LIT_DATA: {
            if (p->pending_error) {
                /* accepted (so "+" went out) but over the limit: skip it */
                p->pending_error = 0;
                p->skip_left = p->lit.size;
                p->state = PS_LIT_SKIP;
                *used_r = pos;
                return fail(p, "literal too big", cmd_r, error_r);
            }
            uint64_t want = p->lit.size - p->lit_got;
            size_t take = len - pos;
            if ((uint64_t)take > want) take = (size_t)want;
            if (p->lit_got + take + 1 > p->lit_cap) {
                size_t cap = p->lit_cap * 2;
                if (cap < p->lit_got + take + 1) cap = p->lit_got + take + 1;
                if (cap > p->lit.size + 1) cap = (size_t)p->lit.size + 1;
                char *nb = realloc(p->lit_buf, cap);
                if (nb == NULL) abort();
                p->lit_buf = nb;
                p->lit_cap = cap;
                p->lit_entry->buf = nb;
                p->stack[p->lit_depth].v[p->lit_index].str = nb;
            }
            memcpy(p->lit_buf + p->lit_got, buf + pos, take);
            p->lit_got += take;
            pos += take;
            if (p->lit_got < p->lit.size) {
                *used_r = pos;
                return IMAP_PARSE_NEED_MORE;
            }
            p->lit_buf[p->lit.size] = '\0';
            p->lit_buf = NULL;
            p->after_token = 1;
            p->state = PS_LINE;
            p->line_len = 0;
            break;
        }

        case PS_LIT_SKIP: {
            uint64_t take = len - pos;
            if (take > p->skip_left) take = p->skip_left;
            pos += (size_t)take;
            p->skip_left -= take;
            if (p->skip_left > 0) {
                *used_r = pos;
                return IMAP_PARSE_NEED_MORE;
            }
            p->state = PS_DISCARD;
            p->tail_len = 0;
            break;
        }

        case PS_DISCARD: {
            while (pos < len && buf[pos] != '\n') {
                if (buf[pos] != '\r') {
                    if (p->tail_len == sizeof(p->tail)) {
                        memmove(p->tail, p->tail + 1, sizeof(p->tail) - 1);
                        p->tail_len--;
                    }
                    p->tail[p->tail_len++] = buf[pos];
                }
                pos++;
            }
            if (pos == len) {
                *used_r = pos;
                return IMAP_PARSE_NEED_MORE;
            }
            pos++; /* LF */
            uint64_t sz;
            if (trailing_nonsync(p->tail, p->tail_len, &sz) && sz > 0) {
                p->skip_left = sz;
                p->state = PS_LIT_SKIP;
            } else {
                p->state = PS_LINE;
                p->line_len = 0;
            }
            p->tail_len = 0;
            break;
        }

        case PS_LINE: {
            const char *lf = memchr(buf + pos, '\n', len - pos);
            size_t chunk = lf ? (size_t)(lf - (buf + pos)) : len - pos;
            if (p->text_total + p->line_len + chunk > p->lim.max_line) {
                /* keep what fits for the tag, then drop the rest */
                size_t sofar = p->text_total + p->line_len;
                size_t room = sofar < p->lim.max_line ? p->lim.max_line - sofar : 0;
                if (room > 64) room = 64;
                if (room > chunk) room = chunk; /* never past the input */
                if (p->line_len < 64) line_append(p, buf + pos, room);
                salvage_tag(p, p->line, p->line_len);
                p->line_len = 0;
                p->state = PS_DISCARD;
                p->tail_len = 0;
                *used_r = pos; /* the discard state consumes the rest */
                return fail(p, "line too long", cmd_r, error_r);
            }
            line_append(p, buf + pos, chunk);
            pos += chunk;
            if (lf == NULL) {
                *used_r = pos;
                return IMAP_PARSE_NEED_MORE;
            }
            pos++; /* LF */
            size_t n = p->line_len;
            if (n > 0 && p->line[n - 1] == '\r') n--;
            p->line[n] = '\0';
            p->line_len = 0;
            if (p->phase == PH_TAG && n == 0) {
                *used_r = pos;
                p->done = 1;
                return IMAP_PARSE_EMPTY_LINE;
            }
            p->text_total += n + 1;
            const char *err = NULL;
            enum tok_result tr = tokenize(p, p->line, n, &err);
            if (tr == TOK_ERROR) {
                uint64_t sz;
                salvage_tag(p, p->line, n);
                if (trailing_nonsync(p->line, n, &sz) && sz > 0) {
                    p->skip_left = sz;
                    p->state = PS_LIT_SKIP;
                }
                *used_r = pos;
                return fail(p, err, cmd_r, error_r);
            }
            if (tr == TOK_LITERAL) {
                p->state = PS_LIT_WAIT;
                *used_r = pos;
                *cmd_r = &p->cmd;
                return IMAP_PARSE_LITERAL;
            }
            p->cmd.args = finish_vec(p, &p->stack[0]);
            p->cmd.n_args = p->stack[0].n;
            *used_r = pos;
            *cmd_r = &p->cmd;
            p->done = 1;
            return IMAP_PARSE_COMMAND;
        }
        }
    }
}

const struct imap_literal_info *imap_parser_literal(const struct imap_parser *p)
{
    return p->state == PS_LIT_WAIT ? &p->lit : NULL;
}

void imap_parser_literal_accept(struct imap_parser *p, uint64_t max_bytes)
{
    if (p->state != PS_LIT_WAIT) return;
    uint64_t lim = max_bytes ? max_bytes : p->lim.max_literal;
    p->state = PS_LIT_DATA;
    p->lit_got = 0;
    if (p->lit.size > lim || ++p->n_tokens > p->lim.max_args) {
        p->pending_error = 1;
        return;
    }
    /* grow as data arrives: never trust the announced size for memory */
    size_t cap = p->lit.size < 65536 ? (size_t)p->lit.size + 1 : 65536;
    struct lit_buf *lb = malloc(sizeof(*lb));
    char *b = malloc(cap);
    if (lb == NULL || b == NULL) abort();
    b[0] = '\0';
    lb->buf = b;
    lb->next = p->lits;
    p->lits = lb;
    p->lit_buf = b;
    p->lit_cap = cap;
    p->lit_entry = lb;
    struct imap_arg *a = push_arg(p);
    p->lit_depth = p->depth;
    p->lit_index = p->stack[p->depth].n - 1;
    a->type = IMAP_ARG_LITERAL;
    a->str = b;
    a->len = (size_t)p->lit.size;
}

int imap_parser_literal_reject(struct imap_parser *p)
{
    if (p->state != PS_LIT_WAIT) return 0;
    int close = p->lit.non_sync;
    if (close) {
        p->skip_left = p->lit.size;
        p->state = PS_LIT_SKIP;
    } else {
        p->state = PS_LINE;
    }
    p->line_len = 0;
    p->done = 1;
    return close;
}

void imap_parser_compact(struct imap_parser *p)
{
    if (p->state != PS_LINE || (p->line_len != 0 && !p->rl_done)) return;
    if (!p->done && (p->phase != PH_TAG || p->n_tokens != 0 || p->cmd.tag != NULL)) return;
    command_clear(p);
    p->done = 0;
    p->rl_done = 0;
    for (size_t i = 0; i < p->stack_cap; i++) {
        free(p->stack[i].v);
        p->stack[i].v = NULL;
        p->stack[i].cap = 0;
    }
    free(p->line);
    p->line = NULL;
    p->line_cap = 0;
}

char *imap_parser_take_literal(struct imap_parser *p, struct imap_arg *arg, size_t *len_r)
{
    if (arg == NULL || arg->type != IMAP_ARG_LITERAL) return NULL;
    for (struct lit_buf **l = &p->lits; *l != NULL; l = &(*l)->next) {
        if ((*l)->buf == arg->str) {
            struct lit_buf *f = *l;
            char *r = f->buf;
            *l = f->next;
            free(f);
            if (len_r) *len_r = arg->len;
            arg->str = "";
            arg->len = 0;
            return r;
        }
    }
    return NULL;
}

int imap_parser_read_line(struct imap_parser *p, const char *buf, size_t len, size_t *used_r,
                          const char **line_r, size_t *len_r)
{
    *used_r = 0;
    if (p->rl_done) {
        p->rl_done = 0;
        p->line_len = 0;
    }
    const char *lf = memchr(buf, '\n', len);
    size_t chunk = lf ? (size_t)(lf - buf) : len;
    if (p->line_len + chunk > p->lim.max_line) {
        p->line_len = 0;
        *used_r = lf ? chunk + 1 : len;
        return -1;
    }
    line_append(p, buf, chunk);
    if (lf == NULL) {
        *used_r = len;
        return 0;
    }
    *used_r = chunk + 1;
    size_t n = p->line_len;
    if (n > 0 && p->line[n - 1] == '\r') n--;
    p->line[n] = '\0';
    *line_r = p->line;
    *len_r = n;
    p->rl_done = 1;
    return 1;
}

/* ---- arg helpers ---------------------------------------------------- */

int imap_arg_is_string(const struct imap_arg *a)
{
    return a != NULL &&
           (a->type == IMAP_ARG_ATOM || a->type == IMAP_ARG_QUOTED || a->type == IMAP_ARG_LITERAL);
}

int imap_arg_is_astring(const struct imap_arg *a)
{
    if (a == NULL) return 0;
    if (a->type == IMAP_ARG_QUOTED || a->type == IMAP_ARG_LITERAL) return 1;
    if (a->type != IMAP_ARG_ATOM) return 0;
    /* every byte an ASTRING-CHAR: no list-wildcards, quoted-specials, or
     * the spaces/parens a "[...]" section may have swallowed */
    for (size_t i = 0; i < a->len; i++)
        if (!is_atom_char((unsigned char)a->str[i]) || a->str[i] == '%' || a->str[i] == '*' ||
            a->str[i] == '\\')
            return 0;
    return 1;
}

int imap_arg_eq(const struct imap_arg *a, const char *s)
{
    if (!imap_arg_is_string(a) && !(a != NULL && a->type == IMAP_ARG_NIL)) return 0;
    size_t n = strlen(s);
    return a->len == n && strncasecmp(a->str, s, n) == 0;
}
