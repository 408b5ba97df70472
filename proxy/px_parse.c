/* px_parse: pre-authentication parsers. See px_parse.h. */
#include "px_parse.h"

#include <ctype.h>
#include <stdlib.h>
#include <string.h>

struct px_imap_parser {
    struct px_limits lim;
    char *buf; /* owned; lines and literal bodies of the current command */
    size_t len, cap;
    size_t line_start; /* offset of the line being read */
    size_t lit_left;   /* literal bytes still to come */
    int in_literal;
    int done; /* the last feed returned DONE: the next feed starts afresh */
    const char *err;
    char tag[PX_MAX_TAG + 1];
};

#define LITERAL_DIGITS_MAX 10

struct px_imap_parser *px_imap_parser_new(const struct px_limits *lim)
{
    struct px_imap_parser *p = calloc(1, sizeof(*p));
    if (p == NULL) return NULL;
    p->lim = *lim;
    if (p->lim.max_line < 64) p->lim.max_line = 64;
    if (p->lim.max_command < p->lim.max_line + 2) p->lim.max_command = p->lim.max_line + 2;
    return p;
}

void px_imap_parser_free(struct px_imap_parser **p)
{
    if (p == NULL || *p == NULL) return;
    free((*p)->buf);
    free(*p);
    *p = NULL;
}

void px_imap_parser_reset(struct px_imap_parser *p)
{
    p->len = p->line_start = p->lit_left = 0;
    p->in_literal = p->done = 0;
    if (p->cap > 1024) {
        free(p->buf);
        p->buf = NULL;
        p->cap = 0;
    }
}

const char *px_imap_error(const struct px_imap_parser *p)
{
    return p->err ? p->err : "syntax error";
}

static int tag_char(unsigned char c)
{
    return c > 0x20 && c < 0x7f && c != '(' && c != ')' && c != '{' && c != '%' && c != '*' &&
           c != '"' && c != '\\' && c != '+';
}

static int atom_char(unsigned char c)
{
    return c > 0x20 && c < 0x7f && c != '(' && c != ')' && c != '{' && c != '%' && c != '*' &&
           c != '"' && c != '\\';
}

/* Remember the tag at the start of buf (if valid) for error replies. */
static void capture_tag(struct px_imap_parser *p)
{
    size_t i = 0;
    while (i < p->len && i < PX_MAX_TAG && tag_char((unsigned char)p->buf[i]))
        i++;
    if (i == 0 || i >= p->len || p->buf[i] != ' ') {
        p->tag[0] = '\0';
        return;
    }
    memcpy(p->tag, p->buf, i);
    p->tag[i] = '\0';
}

void px_imap_tag(const struct px_imap_parser *p, char *buf, size_t len)
{
    if (len == 0) return;
    const char *t = p->tag[0] ? p->tag : "*";
    size_t n = strlen(t);
    if (n >= len) n = len - 1;
    memcpy(buf, t, n);
    buf[n] = '\0';
}

static int append(struct px_imap_parser *p, const char *data, size_t n)
{
    if (n > p->lim.max_command - p->len) return -1;
    if (p->len + n > p->cap) {
        size_t ncap = p->cap ? p->cap : 256;
        while (ncap < p->len + n)
            ncap *= 2;
        if (ncap > p->lim.max_command) ncap = p->lim.max_command;
        char *nb = realloc(p->buf, ncap);
        if (nb == NULL) return -1;
        p->buf = nb;
        p->cap = ncap;
    }
    memcpy(p->buf + p->len, data, n);
    p->len += n;
    return 0;
}

/* Does the line [line_start, len) end with "{n}" or "{n+}" before its
 * CRLF? Returns 1 (sets n, nonsync), 0 (no literal), -1 (malformed). */
static int line_literal(const struct px_imap_parser *p, uint64_t *n_r, int *nonsync_r)
{
    size_t end = p->len; /* points after LF */
    const char *b = p->buf;
    if (end == p->line_start) return 0;
    end--; /* LF */
    if (end > p->line_start && b[end - 1] == '\r') end--;
    if (end == p->line_start || b[end - 1] != '}') return 0;
    size_t close = end - 1, i = close;
    int nonsync = 0;
    if (i > p->line_start && b[i - 1] == '+') {
        nonsync = 1;
        i--;
    }
    size_t dend = i;
    while (i > p->line_start && b[i - 1] >= '0' && b[i - 1] <= '9')
        i--;
    if (i == p->line_start || b[i - 1] != '{') return 0;
    if (i == dend) return -1; /* "{}" or "{+}" */
    if (dend - i > LITERAL_DIGITS_MAX) return -1;
    uint64_t n = 0;
    for (size_t k = i; k < dend; k++)
        n = n * 10 + (uint64_t)(b[k] - '0');
    *n_r = n;
    *nonsync_r = nonsync;
    return 1;
}

enum px_imap_rc px_imap_feed(struct px_imap_parser *p, const char *buf, size_t len, size_t *used_r)
{
    size_t i = 0;

    if (p->done) {
        p->len = p->line_start = 0;
        p->done = 0;
        p->tag[0] = '\0';
    }
    while (i < len) {
        if (p->in_literal) {
            size_t n = len - i < p->lit_left ? len - i : (size_t)p->lit_left;
            if (append(p, buf + i, n) < 0) {
                p->err = "command too long";
                goto fatal;
            }
            i += n;
            p->lit_left -= n;
            if (p->lit_left == 0) {
                p->in_literal = 0;
                p->line_start = p->len;
            }
            continue;
        }
        const char *nl = memchr(buf + i, '\n', len - i);
        size_t n = nl ? (size_t)(nl - (buf + i)) + 1 : len - i;
        size_t have = p->len - p->line_start;
        if (have + n > p->lim.max_line + 2) {
            /* keep what fits so the tag can still be reported */
            if (p->line_start == 0 && have < 128) {
                size_t k = 128 - have < n ? 128 - have : n;
                (void)append(p, buf + i, k);
                capture_tag(p);
            }
            p->err = "line too long";
            i += n;
            goto fatal;
        }
        if (append(p, buf + i, n) < 0) {
            p->err = "command too long";
            i += n;
            goto fatal;
        }
        i += n;
        if (nl == NULL) break;
        if (p->line_start == 0) capture_tag(p);
        uint64_t lit = 0;
        int nonsync = 0, r = line_literal(p, &lit, &nonsync);
        if (r < 0) {
            p->err = "malformed literal";
            goto fatal;
        }
        if (r == 0) {
            p->done = 1;
            *used_r = i;
            return PX_IMAP_DONE;
        }
        if (lit > p->lim.max_literal || lit > p->lim.max_command - p->len) {
            p->err = "literal too large";
            if (nonsync) goto fatal;
            *used_r = i;
            p->len = p->line_start = 0;
            return PX_IMAP_BAD_LITERAL;
        }
        p->lit_left = (size_t)lit;
        p->in_literal = lit > 0;
        if (lit == 0) p->line_start = p->len;
        if (!nonsync) {
            *used_r = i;
            return PX_IMAP_CONTINUE;
        }
    }
    *used_r = i;
    return PX_IMAP_MORE;
fatal:
    *used_r = i;
    p->len = p->line_start = 0;
    p->in_literal = 0;
    p->lit_left = 0;
    return PX_IMAP_FATAL;
}

char *px_imap_raw(struct px_imap_parser *p, size_t *len_r)
{
    *len_r = p->done ? p->len : 0;
    return p->done ? p->buf : NULL;
}

/* ---- tokenizer ---- */

static int at_eol(const char *b, size_t len, size_t pos)
{
    return pos < len && (b[pos] == '\n' || (b[pos] == '\r' && pos + 1 < len && b[pos + 1] == '\n'));
}

int px_arg_is_astring(const struct px_arg *a)
{
    return a->type == PX_ARG_ATOM || a->type == PX_ARG_STRING;
}

int px_imap_tokenize(char *b, size_t len, struct px_imap_cmd *cmd, const char **error_r)
{
    size_t pos = 0, k;
    int depth = 0, need_sep = 1;

    memset(cmd, 0, sizeof(*cmd));
    *error_r = "syntax error";
    while (pos < len && pos < PX_MAX_TAG && tag_char((unsigned char)b[pos]))
        pos++;
    if (pos == 0 || pos >= len || b[pos] != ' ') {
        *error_r = "invalid tag";
        return -1;
    }
    memcpy(cmd->tag, b, pos);
    cmd->tag[pos] = '\0';
    pos++;
    k = 0;
    while (pos < len && isalpha((unsigned char)b[pos])) {
        if (k + 1 >= sizeof(cmd->name)) {
            *error_r = "unknown command";
            return -1;
        }
        cmd->name[k++] = (char)toupper((unsigned char)b[pos]);
        pos++;
    }
    cmd->name[k] = '\0';
    if (k == 0) {
        *error_r = "missing command";
        return -1;
    }
    for (;;) {
        if (pos >= len) {
            *error_r = "missing CRLF";
            return -1;
        }
        if (at_eol(b, len, pos)) {
            if (depth) {
                *error_r = "unterminated list";
                return -1;
            }
            return 0;
        }
        if (cmd->n_args >= PX_MAX_ARGS) {
            *error_r = "too many arguments";
            return -1;
        }
        struct px_arg *a = &cmd->args[cmd->n_args];
        if (b[pos] == ')' && depth) {
            a->type = PX_ARG_LIST_END;
            cmd->n_args++;
            depth = 0;
            need_sep = 1;
            pos++;
            continue;
        }
        if (need_sep) {
            if (b[pos] != ' ') return -1;
            pos++;
            if (pos >= len) return -1;
        }
        need_sep = 1;
        unsigned char c = (unsigned char)b[pos];
        if (c == '(') {
            if (depth) {
                *error_r = "nested lists are not allowed here";
                return -1;
            }
            depth = 1;
            a->type = PX_ARG_LIST_BEGIN;
            cmd->n_args++;
            need_sep = 0;
            pos++;
            continue;
        }
        if (c == '"') {
            size_t w = ++pos;
            a->s = b + w;
            for (;;) {
                if (pos >= len || b[pos] == '\r' || b[pos] == '\n' || b[pos] == '\0') {
                    *error_r = "unterminated quoted string";
                    return -1;
                }
                if (b[pos] == '"') break;
                if (b[pos] == '\\') {
                    pos++;
                    if (pos >= len || (b[pos] != '\\' && b[pos] != '"')) {
                        *error_r = "bad escape in quoted string";
                        return -1;
                    }
                }
                if ((unsigned char)b[pos] >= 0x80) {
                    *error_r = "8-bit characters in a quoted string";
                    return -1;
                }
                b[w++] = b[pos++];
            }
            a->type = PX_ARG_STRING;
            a->len = (size_t)(b + w - a->s);
            pos++;
            cmd->n_args++;
            continue;
        }
        if (c == '{') {
            uint64_t n = 0;
            size_t d = 0;
            pos++;
            while (pos < len && b[pos] >= '0' && b[pos] <= '9' && d < LITERAL_DIGITS_MAX) {
                n = n * 10 + (uint64_t)(b[pos] - '0');
                pos++;
                d++;
            }
            if (d == 0) return -1;
            if (pos < len && b[pos] == '+') pos++;
            if (pos >= len || b[pos] != '}') return -1;
            pos++;
            if (pos < len && b[pos] == '\r') pos++;
            if (pos >= len || b[pos] != '\n') return -1;
            pos++;
            if (n > len - pos) {
                *error_r = "truncated literal";
                return -1;
            }
            a->type = PX_ARG_STRING;
            a->s = b + pos;
            a->len = (size_t)n;
            pos += (size_t)n;
            cmd->n_args++;
            continue;
        }
        size_t start = pos;
        while (pos < len && atom_char((unsigned char)b[pos]))
            pos++;
        if (pos == start) {
            *error_r = "unexpected character";
            return -1;
        }
        a->s = b + start;
        a->len = pos - start;
        a->type = (a->len == 3 && strncasecmp(a->s, "NIL", 3) == 0) ? PX_ARG_NIL : PX_ARG_ATOM;
        if (a->type == PX_ARG_NIL) a->s = NULL, a->len = 0;
        cmd->n_args++;
    }
}

/* ---- lines, POP3 ---- */

int px_find_line(const char *buf, size_t len, size_t max_line, size_t *line_len_r, size_t *used_r)
{
    size_t scan = len < max_line + 2 ? len : max_line + 2;
    const char *nl = memchr(buf, '\n', scan);
    if (nl == NULL) return len > max_line + 1 ? -1 : 0;
    size_t l = (size_t)(nl - buf);
    *used_r = l + 1;
    if (l > 0 && buf[l - 1] == '\r') l--;
    if (l > max_line) return -1;
    *line_len_r = l;
    return 1;
}

int px_pop3_parse(const char *line, size_t len, struct px_pop3_cmd *cmd)
{
    size_t i = 0;
    memset(cmd, 0, sizeof(*cmd));
    while (i < len && isalpha((unsigned char)line[i])) {
        if (i >= sizeof(cmd->name) - 1) return -1;
        cmd->name[i] = (char)toupper((unsigned char)line[i]);
        i++;
    }
    if (i == 0) return -1;
    cmd->name[i] = '\0';
    if (i == len) {
        cmd->arg = line + i;
        return 0;
    }
    if (line[i] != ' ') return -1;
    cmd->arg = line + i + 1;
    cmd->arg_len = len - i - 1;
    return 0;
}

/* ---- base64, SASL PLAIN ---- */

static int b64_val(unsigned char c)
{
    if (c >= 'A' && c <= 'Z') return c - 'A';
    if (c >= 'a' && c <= 'z') return c - 'a' + 26;
    if (c >= '0' && c <= '9') return c - '0' + 52;
    if (c == '+') return 62;
    if (c == '/') return 63;
    return -1;
}

long px_b64_decode(const char *in, size_t len, unsigned char *out, size_t outcap)
{
    size_t o = 0;
    if (len % 4 != 0) return -1;
    for (size_t i = 0; i < len; i += 4) {
        int v[4], pad = 0;
        for (int k = 0; k < 4; k++) {
            unsigned char c = (unsigned char)in[i + k];
            if (c == '=' && i + 4 == len && k >= 2) {
                v[k] = 0;
                pad++;
                continue;
            }
            if (pad) return -1; /* data after '=' */
            v[k] = b64_val(c);
            if (v[k] < 0) return -1;
        }
        uint32_t w = ((uint32_t)v[0] << 18) | ((uint32_t)v[1] << 12) | ((uint32_t)v[2] << 6) |
                     (uint32_t)v[3];
        size_t n = 3 - (size_t)pad;
        if (o + n > outcap) return -1;
        out[o++] = (unsigned char)(w >> 16);
        if (n > 1) out[o++] = (unsigned char)(w >> 8);
        if (n > 2) out[o++] = (unsigned char)w;
    }
    return (long)o;
}

size_t px_b64_encode(const unsigned char *in, size_t len, char *out)
{
    static const char tab[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    size_t o = 0, i = 0;
    for (; i + 2 < len; i += 3) {
        uint32_t w = ((uint32_t)in[i] << 16) | ((uint32_t)in[i + 1] << 8) | in[i + 2];
        out[o++] = tab[w >> 18];
        out[o++] = tab[(w >> 12) & 63];
        out[o++] = tab[(w >> 6) & 63];
        out[o++] = tab[w & 63];
    }
    if (i < len) {
        uint32_t w = (uint32_t)in[i] << 16;
        if (i + 1 < len) w |= (uint32_t)in[i + 1] << 8;
        out[o++] = tab[w >> 18];
        out[o++] = tab[(w >> 12) & 63];
        out[o++] = i + 1 < len ? tab[(w >> 6) & 63] : '=';
        out[o++] = '=';
    }
    out[o] = '\0';
    return o;
}

int px_sasl_plain_split(const unsigned char *msg, size_t len, struct px_sasl_plain *out)
{
    const unsigned char *z1 = memchr(msg, 0, len);
    if (z1 == NULL) return -1;
    const unsigned char *z2 = memchr(z1 + 1, 0, len - (size_t)(z1 + 1 - msg));
    if (z2 == NULL) return -1;
    if (memchr(z2 + 1, 0, len - (size_t)(z2 + 1 - msg)) != NULL) return -1;
    out->authzid = (const char *)msg;
    out->authzid_len = (size_t)(z1 - msg);
    out->authcid = (const char *)z1 + 1;
    out->authcid_len = (size_t)(z2 - z1 - 1);
    out->passwd = (const char *)z2 + 1;
    out->passwd_len = len - (size_t)(z2 + 1 - msg);
    if (out->authcid_len == 0 || out->passwd_len == 0) return -1;
    if (out->authzid_len > 255 || out->authcid_len > 255 || out->passwd_len > 1024) return -1;
    return 0;
}
