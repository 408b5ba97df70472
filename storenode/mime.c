/* mime: RFC 5322 / MIME structure of a stored message (see mime.h).
 *
 * The part tree is built by one bounded recursive pass over the
 * CRLF-normalised bytes (depth <= MIME_MAX_DEPTH, parts <= MIME_MAX_PARTS);
 * ENVELOPE/BODYSTRUCTURE/BODY are rendered from the tree by re-reading each
 * part's header. Nothing here copies the whole message.
 */
#include "mime.h"

#include <ctype.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Strings longer than this are rendered as literals. */
#define MIME_QUOTED_MAX 1024
/* Parameters kept per header (more are ignored). */
#define MIME_MAX_PARAMS 64
#define MIME_MAX_ADDRESSES 10000

/* ---- mbuf ----------------------------------------------------------- */

static void mbuf_grow(struct mbuf *b, size_t n)
{
    if (b->len + n + 1 <= b->cap) return;
    size_t cap = b->cap ? b->cap : 64;
    while (cap < b->len + n + 1)
        cap *= 2;
    char *d = realloc(b->data, cap);
    if (d == NULL) abort();
    b->data = d;
    b->cap = cap;
}

void mbuf_put(struct mbuf *b, const void *p, size_t n)
{
    mbuf_grow(b, n);
    if (n > 0) memcpy(b->data + b->len, p, n);
    b->len += n;
    b->data[b->len] = '\0';
}

void mbuf_puts(struct mbuf *b, const char *s)
{
    mbuf_put(b, s, strlen(s));
}

void mbuf_printf(struct mbuf *b, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(NULL, 0, fmt, ap);
    va_end(ap);
    if (n < 0) return;
    mbuf_grow(b, (size_t)n);
    va_start(ap, fmt);
    vsnprintf(b->data + b->len, (size_t)n + 1, fmt, ap);
    va_end(ap);
    b->len += (size_t)n;
}

void mbuf_free(struct mbuf *b)
{
    free(b->data);
    b->data = NULL;
    b->len = b->cap = 0;
}

static void mbuf_putc(struct mbuf *b, char c)
{
    mbuf_put(b, &c, 1);
}

/* ---- CRLF ----------------------------------------------------------- */

char *mime_crlf_normalize(const char *in, size_t len, size_t *out_len_r)
{
    size_t extra = 0;
    for (size_t i = 0; i < len; i++) {
        if (in[i] == '\n' && (i == 0 || in[i - 1] != '\r')) extra++;
        if (in[i] == '\r' && (i + 1 == len || in[i + 1] != '\n')) extra++;
    }
    char *out = malloc(len + extra + 1);
    if (out == NULL) return NULL;
    size_t o = 0;
    for (size_t i = 0; i < len; i++) {
        char c = in[i];
        if (c == '\r') {
            out[o++] = '\r';
            out[o++] = '\n';
            if (i + 1 < len && in[i + 1] == '\n') i++;
        } else if (c == '\n') {
            out[o++] = '\r';
            out[o++] = '\n';
        } else {
            out[o++] = c;
        }
    }
    out[o] = '\0';
    *out_len_r = o;
    return out;
}

/* ---- header fields -------------------------------------------------- */

int mime_field_next(const char *h, size_t n, size_t *pos, struct mime_field *f)
{
    size_t i = *pos;
    if (i >= n) return 0;
    /* blank line ends the header */
    if (h[i] == '\n' || (h[i] == '\r' && i + 1 < n && h[i + 1] == '\n')) return 0;
    size_t st = i;
    for (;;) {
        const char *lf = memchr(h + i, '\n', n - i);
        if (lf == NULL) {
            i = n;
            break;
        }
        i = (size_t)(lf - h) + 1;
        if (i >= n || (h[i] != ' ' && h[i] != '\t')) break;
    }
    memset(f, 0, sizeof(*f));
    f->raw = h + st;
    f->raw_len = i - st;
    size_t k = st;
    while (k < i && h[k] != ':' && h[k] != '\n' && h[k] != '\r')
        k++;
    if (k < i && h[k] == ':') {
        size_t ne = k;
        while (ne > st && (h[ne - 1] == ' ' || h[ne - 1] == '\t'))
            ne--;
        f->name = h + st;
        f->name_len = ne - st;
        f->value = h + k + 1;
        size_t ve = i;
        while (ve > k + 1 && (h[ve - 1] == '\n' || h[ve - 1] == '\r'))
            ve--;
        f->value_len = ve - (k + 1);
    }
    *pos = i;
    return 1;
}

/* Unfold (drop CR/LF) and trim WSP at both ends. */
void mime_unfold(const char *v, size_t n, struct mbuf *out)
{
    size_t s = 0, e = n;
    while (s < e && (v[s] == ' ' || v[s] == '\t' || v[s] == '\r' || v[s] == '\n'))
        s++;
    while (e > s && (v[e - 1] == ' ' || v[e - 1] == '\t' || v[e - 1] == '\r' || v[e - 1] == '\n'))
        e--;
    mbuf_grow(out, e - s);
    for (size_t i = s; i < e; i++)
        if (v[i] != '\r' && v[i] != '\n') out->data[out->len++] = v[i];
    out->data[out->len] = '\0';
}

static int name_eq(const char *a, size_t n, const char *b)
{
    return strlen(b) == n && strncasecmp(a, b, n) == 0;
}

int mime_header_get(const char *hdr, size_t len, const char *name, struct mbuf *out)
{
    size_t pos = 0;
    struct mime_field f;
    while (mime_field_next(hdr, len, &pos, &f)) {
        if (f.name != NULL && name_eq(f.name, f.name_len, name)) {
            mime_unfold(f.value, f.value_len, out);
            if (out->data == NULL) mbuf_put(out, "", 0);
            return 1;
        }
    }
    return 0;
}

void mime_header_fields(const char *hdr, size_t len, const char *const *names, size_t n_names,
                        int negate, struct mbuf *out)
{
    size_t pos = 0;
    struct mime_field f;
    while (mime_field_next(hdr, len, &pos, &f)) {
        if (f.name == NULL) continue;
        int match = 0;
        for (size_t i = 0; i < n_names && !match; i++)
            match = name_eq(f.name, f.name_len, names[i]);
        if (match != !!negate) {
            mbuf_put(out, f.raw, f.raw_len);
            if (f.raw_len == 0 || f.raw[f.raw_len - 1] != '\n') mbuf_puts(out, "\r\n");
        }
    }
    /* the blank line that ends the header, if the header has one */
    if (pos < len) mbuf_puts(out, "\r\n");
    if (out->data == NULL) mbuf_put(out, "", 0);
}

/* ---- RFC 822 lexing ------------------------------------------------- */

static void skip_cfws(const char *s, size_t n, size_t *i, struct mbuf *comment)
{
    while (*i < n) {
        char c = s[*i];
        if (c == ' ' || c == '\t' || c == '\r' || c == '\n') {
            (*i)++;
        } else if (c == '(') {
            int depth = 0;
            size_t st = *i + 1;
            while (*i < n) {
                c = s[*i];
                if (c == '\\' && *i + 1 < n) {
                    *i += 2;
                    continue;
                }
                if (c == '(') depth++;
                if (c == ')' && --depth == 0) break;
                (*i)++;
            }
            if (comment != NULL) {
                comment->len = 0;
                size_t e = *i < n ? *i : n;
                mime_unfold(s + st, e - st, comment);
            }
            if (*i < n) (*i)++;
        } else {
            break;
        }
    }
}

static int is_tspecial(unsigned char c)
{
    return strchr("()<>@,;:\\\"/[]?=", c) != NULL;
}

static int mime_token(const char *s, size_t n, size_t *i, struct mbuf *out)
{
    size_t st = *i;
    while (*i < n) {
        unsigned char c = (unsigned char)s[*i];
        if (c <= 0x20 || c == 0x7f || is_tspecial(c)) break;
        (*i)++;
    }
    if (*i == st) return 0;
    mbuf_put(out, s + st, *i - st);
    return 1;
}

/* Quoted string at s[*i] == '"'; unescaped into out. Unterminated strings
 * run to the end. */
static void quoted_string(const char *s, size_t n, size_t *i, struct mbuf *out)
{
    (*i)++;
    mbuf_put(out, "", 0);
    while (*i < n && s[*i] != '"') {
        if (s[*i] == '\\' && *i + 1 < n) (*i)++;
        if (s[*i] != '\r' && s[*i] != '\n') mbuf_putc(out, s[*i]);
        (*i)++;
    }
    if (*i < n) (*i)++;
}

static void upcase(struct mbuf *b)
{
    for (size_t i = 0; i < b->len; i++)
        b->data[i] = (char)toupper((unsigned char)b->data[i]);
}

/* ---- charsets ------------------------------------------------------- */

int mime_charset_kind(const char *cs, size_t n)
{
    /* RFC 2231 language suffix in encoded words: "utf-8*en" */
    const char *star = memchr(cs, '*', n);
    if (star != NULL) n = (size_t)(star - cs);
    if (name_eq(cs, n, "utf-8") || name_eq(cs, n, "utf8")) return MIME_CS_UTF8;
    if (name_eq(cs, n, "us-ascii") || name_eq(cs, n, "ascii")) return MIME_CS_ASCII;
    if (name_eq(cs, n, "iso-8859-1") || name_eq(cs, n, "latin1") || name_eq(cs, n, "iso_8859-1") ||
        name_eq(cs, n, "l1"))
        return MIME_CS_LATIN1;
    return MIME_CS_OTHER;
}

void mime_latin1_to_utf8(const char *s, size_t n, struct mbuf *out)
{
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c < 0x80) {
            mbuf_putc(out, (char)c);
        } else {
            char u[2] = {(char)(0xc0 | (c >> 6)), (char)(0x80 | (c & 0x3f))};
            mbuf_put(out, u, 2);
        }
    }
}

/* ---- Content-Type and friends --------------------------------------- */

struct param {
    struct mbuf name, value;
};

struct ctype {
    struct mbuf type, subtype;
    struct param params[MIME_MAX_PARAMS];
    size_t n_params;
    int valid; /* type/subtype parsed */
};

static void ctype_free(struct ctype *ct)
{
    mbuf_free(&ct->type);
    mbuf_free(&ct->subtype);
    for (size_t i = 0; i < ct->n_params; i++) {
        mbuf_free(&ct->params[i].name);
        mbuf_free(&ct->params[i].value);
    }
    ct->n_params = 0;
}

static int hexval(int c)
{
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

/* Merge RFC 2231 "name*", "name*0", "name*1*" parameters. */
static void params_rfc2231(struct ctype *ct)
{
    for (size_t i = 0; i < ct->n_params; i++) {
        struct param *p = &ct->params[i];
        char *star = memchr(p->name.data, '*', p->name.len);
        if (star == NULL) continue;
        size_t base_len = (size_t)(star - p->name.data);
        struct mbuf raw = {0};
        struct mbuf charset = {0};
        int have_any = 0, first_ext = 0;
        /* collect segments 0.. in order (a plain "name*" is segment 0) */
        for (unsigned seg = 0; seg < 1000; seg++) {
            int found = 0;
            for (size_t j = i; j < ct->n_params; j++) {
                struct param *q = &ct->params[j];
                if (q->name.len <= base_len || q->name.data[base_len] != '*' ||
                    strncasecmp(q->name.data, p->name.data, base_len) != 0)
                    continue;
                const char *rest = q->name.data + base_len + 1;
                size_t rl = q->name.len - base_len - 1;
                int ext = 0;
                unsigned num = 0;
                if (rl == 0) {
                    ext = 1; /* name* */
                    num = 0;
                } else {
                    size_t k = 0;
                    if (!isdigit((unsigned char)rest[0])) continue;
                    while (k < rl && isdigit((unsigned char)rest[k]) && num < 10000)
                        num = num * 10 + (unsigned)(rest[k++] - '0');
                    if (k < rl && rest[k] == '*') {
                        ext = 1;
                        k++;
                    }
                    if (k != rl) continue;
                }
                if (num != seg) continue;
                found = 1;
                const char *v = q->value.data ? q->value.data : "";
                size_t vl = q->value.len;
                if (seg == 0) {
                    first_ext = ext;
                    if (ext) {
                        const char *a1 = memchr(v, '\'', vl);
                        const char *a2 =
                            a1 ? memchr(a1 + 1, '\'', vl - (size_t)(a1 + 1 - v)) : NULL;
                        if (a2 != NULL) {
                            mbuf_put(&charset, v, (size_t)(a1 - v));
                            vl -= (size_t)(a2 + 1 - v);
                            v = a2 + 1;
                        }
                    }
                }
                for (size_t k = 0; k < vl; k++) {
                    if (ext && v[k] == '%' && k + 2 < vl && hexval(v[k + 1]) >= 0 &&
                        hexval(v[k + 2]) >= 0) {
                        mbuf_putc(&raw, (char)(hexval(v[k + 1]) * 16 + hexval(v[k + 2])));
                        k += 2;
                    } else {
                        mbuf_putc(&raw, v[k]);
                    }
                }
                /* mark consumed */
                if (j != i) q->name.len = 0;
                have_any = 1;
                break;
            }
            if (!found) break;
        }
        if (!have_any) {
            mbuf_free(&raw);
            mbuf_free(&charset);
            continue;
        }
        struct mbuf val = {0};
        int k =
            first_ext && charset.len ? mime_charset_kind(charset.data, charset.len) : MIME_CS_UTF8;
        if (k == MIME_CS_LATIN1)
            mime_latin1_to_utf8(raw.data ? raw.data : "", raw.len, &val);
        else
            mbuf_put(&val, raw.data ? raw.data : "", raw.len);
        mbuf_free(&raw);
        mbuf_free(&charset);
        mbuf_free(&p->value);
        p->value = val;
        p->name.len = base_len;
        p->name.data[base_len] = '\0';
        /* a plain "name" alongside "name*" loses */
        for (size_t j = 0; j < ct->n_params; j++)
            if (j != i && ct->params[j].name.len == base_len &&
                strncasecmp(ct->params[j].name.data, p->name.data, base_len) == 0)
                ct->params[j].name.len = 0;
    }
    /* compact: drop consumed entries */
    size_t o = 0;
    for (size_t i = 0; i < ct->n_params; i++) {
        if (ct->params[i].name.len == 0) {
            mbuf_free(&ct->params[i].name);
            mbuf_free(&ct->params[i].value);
            continue;
        }
        ct->params[o++] = ct->params[i];
    }
    ct->n_params = o;
}

/* Parse "; a=b; c="d"" parameter lists starting at s[*i]. */
static void parse_params(const char *s, size_t n, size_t *i, struct ctype *ct)
{
    for (;;) {
        skip_cfws(s, n, i, NULL);
        if (*i >= n) break;
        if (s[*i] != ';') {
            /* garbage: skip to the next ';' */
            while (*i < n && s[*i] != ';')
                (*i)++;
            continue;
        }
        (*i)++;
        skip_cfws(s, n, i, NULL);
        struct mbuf name = {0}, value = {0};
        if (!mime_token(s, n, i, &name)) {
            mbuf_free(&name);
            continue;
        }
        skip_cfws(s, n, i, NULL);
        if (*i >= n || s[*i] != '=') {
            mbuf_free(&name);
            continue;
        }
        (*i)++;
        skip_cfws(s, n, i, NULL);
        if (*i < n && s[*i] == '"') {
            quoted_string(s, n, i, &value);
        } else {
            /* token, leniently: anything up to ';' or whitespace */
            size_t st = *i;
            while (*i < n && s[*i] != ';' && s[*i] != ' ' && s[*i] != '\t')
                (*i)++;
            mbuf_put(&value, s + st, *i - st);
        }
        if (ct->n_params < MIME_MAX_PARAMS) {
            ct->params[ct->n_params].name = name;
            ct->params[ct->n_params].value = value;
            ct->n_params++;
        } else {
            mbuf_free(&name);
            mbuf_free(&value);
        }
    }
    params_rfc2231(ct);
}

/* Content-Type value -> type/subtype (lower-case kept as sent) + params. */
static void parse_ctype(const char *v, size_t n, struct ctype *ct)
{
    size_t i = 0;
    memset(ct, 0, sizeof(*ct));
    skip_cfws(v, n, &i, NULL);
    if (mime_token(v, n, &i, &ct->type)) {
        skip_cfws(v, n, &i, NULL);
        if (i < n && v[i] == '/') {
            i++;
            skip_cfws(v, n, &i, NULL);
            if (mime_token(v, n, &i, &ct->subtype)) ct->valid = 1;
        }
    }
    if (!ct->valid) {
        ctype_free(ct);
        memset(ct, 0, sizeof(*ct));
        return;
    }
    parse_params(v, n, &i, ct);
}

/* Disposition: token + params. */
static void parse_disposition(const char *v, size_t n, struct ctype *ct)
{
    size_t i = 0;
    memset(ct, 0, sizeof(*ct));
    skip_cfws(v, n, &i, NULL);
    if (!mime_token(v, n, &i, &ct->type)) return;
    ct->valid = 1;
    parse_params(v, n, &i, ct);
}

static const char *param_get(const struct ctype *ct, const char *name)
{
    for (size_t i = 0; i < ct->n_params; i++)
        if (name_eq(ct->params[i].name.data, ct->params[i].name.len, name))
            return ct->params[i].value.data ? ct->params[i].value.data : "";
    return NULL;
}

static int header_ctype(const char *hdr, size_t len, struct ctype *ct)
{
    struct mbuf v = {0};
    memset(ct, 0, sizeof(*ct));
    if (!mime_header_get(hdr, len, "Content-Type", &v)) return 0;
    parse_ctype(v.data, v.len, ct);
    mbuf_free(&v);
    return ct->valid;
}

/* ---- tree building -------------------------------------------------- */

struct builder {
    const char *msg;
    size_t len;
    struct mime_part *parts;
    uint32_t n, cap;
};

static uint32_t count_lines(const char *s, size_t n)
{
    uint32_t lines = 0;
    const char *p = s, *e = s + n;
    while (p < e) {
        const char *lf = memchr(p, '\n', (size_t)(e - p));
        if (lf == NULL) break;
        if (lines < UINT32_MAX) lines++;
        p = lf + 1;
    }
    if (n > 0 && s[n - 1] != '\n' && lines < UINT32_MAX) lines++;
    return lines;
}

/* Find the end of the header block in [st, end). */
static size_t header_end(const char *m, size_t st, size_t end)
{
    size_t i = st;
    while (i < end) {
        if (m[i] == '\n') return i + 1;
        if (m[i] == '\r' && i + 1 < end && m[i + 1] == '\n') return i + 2;
        const char *lf = memchr(m + i, '\n', end - i);
        if (lf == NULL) return end;
        i = (size_t)(lf - m) + 1;
    }
    return end;
}

/* Is there a delimiter line "--boundary" starting at pos? Returns 0 no,
 * 1 delimiter, 2 close delimiter; *next_r = start of the following line. */
static int delimiter_at(const char *m, size_t pos, size_t end, const char *b, size_t bl,
                        size_t *next_r)
{
    if (end - pos < bl + 2 || m[pos] != '-' || m[pos + 1] != '-' || memcmp(m + pos + 2, b, bl) != 0)
        return 0;
    size_t i = pos + 2 + bl;
    int close = 0;
    if (i + 1 < end && m[i] == '-' && m[i + 1] == '-') {
        close = 1;
        i += 2;
    }
    if (!close) {
        while (i < end && (m[i] == ' ' || m[i] == '\t'))
            i++;
        if (i < end && m[i] != '\r' && m[i] != '\n') return 0;
    }
    const char *lf = memchr(m + i, '\n', end - i);
    *next_r = lf ? (size_t)(lf - m) + 1 : end;
    return close ? 2 : 1;
}

/* Next delimiter line at or after `from` (which is a line start). */
static int find_delimiter(const char *m, size_t from, size_t end, const char *b, size_t bl,
                          size_t *at_r, size_t *next_r)
{
    size_t pos = from;
    while (pos < end) {
        int r = delimiter_at(m, pos, end, b, bl, next_r);
        if (r) {
            *at_r = pos;
            return r;
        }
        const char *lf = memchr(m + pos, '\n', end - pos);
        if (lf == NULL) return 0;
        pos = (size_t)(lf - m) + 1;
    }
    return 0;
}

static int64_t build_entity(struct builder *b, size_t st, size_t end, int depth, int digest);

static int64_t new_part(struct builder *b)
{
    if (b->n == b->cap) {
        uint32_t cap = b->cap ? b->cap * 2 : 8;
        struct mime_part *np = realloc(b->parts, cap * sizeof(*np));
        if (np == NULL) return -1;
        b->parts = np;
        b->cap = cap;
    }
    memset(&b->parts[b->n], 0, sizeof(b->parts[0]));
    return b->n++;
}

static int64_t build_entity(struct builder *b, size_t st, size_t end, int depth, int digest)
{
    int64_t idx = new_part(b);
    if (idx < 0) return -1;
    size_t he = header_end(b->msg, st, end);
    struct mime_part *p = &b->parts[idx];
    p->hdr_start = st;
    p->hdr_end = he;
    p->body_start = he;
    p->body_end = end;
    p->body_lines = count_lines(b->msg + he, end - he);

    struct ctype ct;
    int have = header_ctype(b->msg + st, he - st, &ct);
    int room = depth + 1 < MIME_MAX_DEPTH && b->n < MIME_MAX_PARTS;
    const char *boundary = have ? param_get(&ct, "boundary") : NULL;

    if (have && room && strcasecmp(ct.type.data, "multipart") == 0 && boundary != NULL &&
        boundary[0] != '\0') {
        size_t bl = strlen(boundary);
        int sub_digest = strcasecmp(ct.subtype.data, "digest") == 0;
        b->parts[idx].is_multipart = 1;
        size_t at, next;
        int r = find_delimiter(b->msg, he, end, boundary, bl, &at, &next);
        uint32_t prev = 0, nkids = 0;
        while (r == 1 && b->n < MIME_MAX_PARTS) {
            size_t cst = next, cend;
            r = find_delimiter(b->msg, cst, end, boundary, bl, &at, &next);
            if (r) {
                cend = at;
                if (cend >= cst + 2 && b->msg[cend - 2] == '\r' && b->msg[cend - 1] == '\n')
                    cend -= 2;
                else if (cend >= cst + 1 && b->msg[cend - 1] == '\n')
                    cend -= 1;
            } else {
                cend = end; /* missing close delimiter */
            }
            int64_t c = build_entity(b, cst, cend, depth + 1, sub_digest);
            if (c < 0) {
                ctype_free(&ct);
                return -1;
            }
            if (prev == 0)
                b->parts[idx].first_child = (uint32_t)c;
            else
                b->parts[prev].next_sibling = (uint32_t)c;
            prev = (uint32_t)c;
            nkids++;
        }
        b->parts[idx].n_children = nkids;
    } else if (room && ((have && strcasecmp(ct.type.data, "message") == 0 &&
                         strcasecmp(ct.subtype.data, "rfc822") == 0) ||
                        (!have && digest))) {
        b->parts[idx].is_message_rfc822 = 1;
        int64_t c = build_entity(b, he, end, depth + 1, 0);
        if (c < 0) {
            ctype_free(&ct);
            return -1;
        }
        b->parts[idx].first_child = (uint32_t)c;
        b->parts[idx].n_children = 1;
    }
    ctype_free(&ct);
    return idx;
}

int mime_tree_parse(const char *msg, size_t len, struct mime_tree *t_r)
{
    struct builder b = {msg, len, NULL, 0, 0};
    t_r->parts = NULL;
    t_r->n_parts = 0;
    if (build_entity(&b, 0, len, 0, 0) < 0) {
        free(b.parts);
        return -1;
    }
    t_r->parts = b.parts;
    t_r->n_parts = b.n;
    return 0;
}

void mime_tree_free(struct mime_tree *t)
{
    free(t->parts);
    t->parts = NULL;
    t->n_parts = 0;
}

/* ---- serialisation -------------------------------------------------- */

#define TREE_MAGIC 0xC7
#define TREE_VERSION 1

static void put_varint(struct mbuf *b, uint64_t v)
{
    unsigned char tmp[10];
    size_t n = 0;
    do {
        unsigned char c = v & 0x7f;
        v >>= 7;
        if (v) c |= 0x80;
        tmp[n++] = c;
    } while (v);
    mbuf_put(b, tmp, n);
}

static int get_varint(const unsigned char *s, size_t n, size_t *i, uint64_t *v_r)
{
    uint64_t v = 0;
    for (int shift = 0; shift < 64; shift += 7) {
        if (*i >= n) return -1;
        unsigned char c = s[(*i)++];
        v |= (uint64_t)(c & 0x7f) << shift;
        if (!(c & 0x80)) {
            *v_r = v;
            return 0;
        }
    }
    return -1;
}

void mime_tree_serialize(const struct mime_tree *t, struct mbuf *out)
{
    unsigned char hdr[2] = {TREE_MAGIC, TREE_VERSION};
    mbuf_put(out, hdr, 2);
    put_varint(out, t->n_parts);
    for (uint32_t i = 0; i < t->n_parts; i++) {
        const struct mime_part *p = &t->parts[i];
        put_varint(out, p->hdr_start);
        put_varint(out, p->hdr_end - p->hdr_start);
        put_varint(out, p->body_start - p->hdr_end);
        put_varint(out, p->body_end - p->body_start);
        put_varint(out, p->body_lines);
        put_varint(out, p->n_children);
        put_varint(out, p->first_child);
        put_varint(out, p->next_sibling);
        put_varint(out, (uint64_t)(p->is_multipart ? 1 : 0) | (p->is_message_rfc822 ? 2 : 0));
    }
}

int mime_tree_deserialize(const char *buf, size_t len, uint64_t msg_len, struct mime_tree *t_r)
{
    const unsigned char *s = (const unsigned char *)buf;
    size_t i = 2;
    uint64_t n;
    t_r->parts = NULL;
    t_r->n_parts = 0;
    if (len < 3 || s[0] != TREE_MAGIC || s[1] != TREE_VERSION) return -1;
    if (get_varint(s, len, &i, &n) < 0 || n == 0 || n > MIME_MAX_PARTS) return -1;
    struct mime_part *parts = calloc((size_t)n, sizeof(*parts));
    if (parts == NULL) return -1;
    for (uint64_t k = 0; k < n; k++) {
        uint64_t v[9];
        for (int j = 0; j < 9; j++)
            if (get_varint(s, len, &i, &v[j]) < 0) goto bad;
        struct mime_part *p = &parts[k];
        if (v[0] > msg_len || v[1] > msg_len - v[0]) goto bad;
        p->hdr_start = v[0];
        p->hdr_end = v[0] + v[1];
        if (v[2] > msg_len - p->hdr_end) goto bad;
        p->body_start = p->hdr_end + v[2];
        if (v[3] > msg_len - p->body_start) goto bad;
        p->body_end = p->body_start + v[3];
        if (v[4] > UINT32_MAX || v[5] > n || v[6] >= n || v[7] >= n || v[8] > 3) goto bad;
        p->body_lines = (uint32_t)v[4];
        p->n_children = (uint32_t)v[5];
        p->first_child = (uint32_t)v[6];
        p->next_sibling = (uint32_t)v[7];
        p->is_multipart = (v[8] & 1) != 0;
        p->is_message_rfc822 = (v[8] & 2) != 0;
        /* links only point forward: no cycles, index 0 never a child */
        if ((p->first_child != 0 && p->first_child <= k) ||
            (p->next_sibling != 0 && p->next_sibling <= k))
            goto bad;
        if (p->is_multipart && p->is_message_rfc822) goto bad;
        if (p->n_children == 0 && p->first_child != 0) goto bad;
        if (p->n_children != 0 && p->first_child == 0) goto bad;
        if (p->n_children != 0 && !p->is_multipart && !p->is_message_rfc822) goto bad;
        if (p->is_message_rfc822 && p->n_children != 1) goto bad;
    }
    if (i != len || parts[0].next_sibling != 0) goto bad;
    /* child chains must have exactly n_children members, contained in parent */
    for (uint64_t k = 0; k < n; k++) {
        uint32_t c = parts[k].first_child, cnt = 0;
        while (c != 0) {
            if (++cnt > parts[k].n_children) goto bad;
            if (parts[c].hdr_start < parts[k].body_start || parts[c].body_end > parts[k].body_end)
                goto bad;
            c = parts[c].next_sibling;
        }
        if (cnt != parts[k].n_children) goto bad;
        if (parts[k].is_message_rfc822 && parts[parts[k].first_child].next_sibling != 0) goto bad;
    }
    t_r->parts = parts;
    t_r->n_parts = (uint32_t)n;
    return 0;
bad:
    free(parts);
    return -1;
}

/* ---- part lookup ---------------------------------------------------- */

static int nth_child(const struct mime_tree *t, uint32_t idx, uint32_t k, uint32_t *r)
{
    if (k == 0 || k > t->parts[idx].n_children) return -1;
    uint32_t c = t->parts[idx].first_child;
    for (uint32_t i = 1; i < k && c != 0; i++)
        c = t->parts[c].next_sibling;
    if (c == 0 || c >= t->n_parts) return -1;
    *r = c;
    return 0;
}

int mime_find_part(const struct mime_tree *t, const uint32_t *nums, size_t n, uint32_t *idx_r)
{
    if (t->n_parts == 0) return -1;
    uint32_t node = 0;
    int is_msg = 1; /* numbers apply to the message `node` */
    for (size_t i = 0; i < n; i++) {
        const struct mime_part *p = &t->parts[node];
        if (p->is_multipart) {
            if (nth_child(t, node, nums[i], &node) < 0) return -1;
        } else if (is_msg) {
            if (nums[i] != 1) return -1;
        } else if (p->is_message_rfc822 && p->first_child != 0) {
            uint32_t c = p->first_child;
            if (t->parts[c].is_multipart) {
                if (nth_child(t, c, nums[i], &node) < 0) return -1;
            } else {
                if (nums[i] != 1) return -1;
                node = c;
            }
        } else {
            return -1;
        }
        is_msg = 0;
    }
    *idx_r = node;
    return 0;
}

int mime_message_ranges(const struct mime_tree *t, uint32_t idx, uint64_t *hdr_start,
                        uint64_t *hdr_end, uint64_t *text_start, uint64_t *text_end)
{
    if (idx >= t->n_parts) return -1;
    const struct mime_part *p = &t->parts[idx];
    if (idx != 0) {
        if (!p->is_message_rfc822 || p->first_child == 0) return -1;
        p = &t->parts[p->first_child];
    }
    *hdr_start = p->hdr_start;
    *hdr_end = p->hdr_end;
    *text_start = p->body_start;
    *text_end = p->body_end;
    return 0;
}

/* ---- dates ---------------------------------------------------------- */

static int64_t days_from_civil(int64_t y, int m, int d)
{
    y -= m <= 2;
    int64_t era = (y >= 0 ? y : y - 399) / 400;
    int64_t yoe = y - era * 400;
    int64_t doy = (153 * (m + (m > 2 ? -3 : 9)) + 2) / 5 + d - 1;
    int64_t doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    return era * 146097 + doe - 719468;
}

static int read_num(const char *s, size_t n, size_t *i, int maxdig, int *v_r)
{
    int v = 0, d = 0;
    while (*i < n && isdigit((unsigned char)s[*i]) && d < maxdig) {
        v = v * 10 + (s[*i] - '0');
        (*i)++;
        d++;
    }
    if (d == 0 || (*i < n && isdigit((unsigned char)s[*i]))) return -1;
    *v_r = v;
    return d;
}

int mime_parse_date(const char *s, size_t n, int64_t *utc_r, int *tz_min_r)
{
    static const char *const months[] = {"jan", "feb", "mar", "apr", "may", "jun",
                                         "jul", "aug", "sep", "oct", "nov", "dec"};
    size_t i = 0;
    int day, mon = -1, year, hh, mm, ss = 0, tz = 0;
    skip_cfws(s, n, &i, NULL);
    /* optional day-of-week */
    if (i < n && isalpha((unsigned char)s[i])) {
        while (i < n && isalpha((unsigned char)s[i]))
            i++;
        skip_cfws(s, n, &i, NULL);
        if (i < n && s[i] == ',') i++;
        skip_cfws(s, n, &i, NULL);
    }
    if (read_num(s, n, &i, 2, &day) < 0) return -1;
    skip_cfws(s, n, &i, NULL);
    if (i < n && s[i] == '-') i++; /* obsolete "1-Jan-2000" */
    if (n - i < 3) return -1;
    for (int k = 0; k < 12; k++)
        if (strncasecmp(s + i, months[k], 3) == 0) mon = k + 1;
    if (mon < 0) return -1;
    i += 3;
    while (i < n && isalpha((unsigned char)s[i]))
        i++; /* "January" */
    skip_cfws(s, n, &i, NULL);
    if (i < n && s[i] == '-') i++;
    int yd = read_num(s, n, &i, 4, &year);
    if (yd < 0) return -1;
    if (yd == 2)
        year += year < 50 ? 2000 : 1900;
    else if (yd == 3)
        year += 1900;
    skip_cfws(s, n, &i, NULL);
    if (read_num(s, n, &i, 2, &hh) < 0) return -1;
    skip_cfws(s, n, &i, NULL);
    if (i >= n || s[i] != ':') return -1;
    i++;
    skip_cfws(s, n, &i, NULL);
    if (read_num(s, n, &i, 2, &mm) < 0) return -1;
    skip_cfws(s, n, &i, NULL);
    if (i < n && s[i] == ':') {
        i++;
        skip_cfws(s, n, &i, NULL);
        if (read_num(s, n, &i, 2, &ss) < 0) return -1;
        skip_cfws(s, n, &i, NULL);
    }
    if (i < n && (s[i] == '+' || s[i] == '-')) {
        int sign = s[i] == '-' ? -1 : 1, z;
        i++;
        size_t st = i;
        if (read_num(s, n, &i, 4, &z) != 4 || i - st != 4) return -1;
        if (z % 100 > 59) return -1;
        tz = sign * ((z / 100) * 60 + z % 100);
    } else if (i < n && isalpha((unsigned char)s[i])) {
        static const struct {
            const char *name;
            int off;
        } zones[] = {{"UT", 0},        {"UTC", 0},       {"GMT", 0},       {"Z", 0},
                     {"EST", -5 * 60}, {"EDT", -4 * 60}, {"CST", -6 * 60}, {"CDT", -5 * 60},
                     {"MST", -7 * 60}, {"MDT", -6 * 60}, {"PST", -8 * 60}, {"PDT", -7 * 60}};
        size_t st = i;
        while (i < n && isalpha((unsigned char)s[i]))
            i++;
        tz = 0; /* unknown and military zones: RFC 5322 says treat as -0000 */
        for (size_t k = 0; k < sizeof(zones) / sizeof(zones[0]); k++)
            if (name_eq(s + st, i - st, zones[k].name)) tz = zones[k].off;
    }
    /* anything after the zone (comments, junk) is ignored */
    static const int mdays[] = {31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31};
    int leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
    if (day < 1 || day > mdays[mon - 1] || (mon == 2 && day == 29 && !leap)) return -1;
    if (hh > 23 || mm > 59 || ss > 60 || year < 1900) return -1;
    int64_t t = days_from_civil(year, mon, day) * 86400 + hh * 3600 + mm * 60 + ss;
    t -= (int64_t)tz * 60;
    *utc_r = t;
    if (tz_min_r) *tz_min_r = tz;
    return 0;
}

/* ---- IMAP string rendering ------------------------------------------ */

void mime_imap_string(struct mbuf *b, const char *s, size_t n)
{
    int lit = n > MIME_QUOTED_MAX;
    for (size_t i = 0; i < n && !lit; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c == '\r' || c == '\n' || c == '\0' || c >= 0x80) lit = 1;
    }
    if (lit) {
        mbuf_printf(b, "{%zu}\r\n", n);
        mbuf_put(b, s, n);
        return;
    }
    mbuf_putc(b, '"');
    for (size_t i = 0; i < n; i++) {
        if (s[i] == '"' || s[i] == '\\') mbuf_putc(b, '\\');
        mbuf_putc(b, s[i]);
    }
    mbuf_putc(b, '"');
}

static void nstring(struct mbuf *b, const struct mbuf *v, int present)
{
    if (!present)
        mbuf_puts(b, "NIL");
    else
        mime_imap_string(b, v->data ? v->data : "", v->len);
}

/* ---- addresses ------------------------------------------------------ */

struct addr_parser {
    const char *s;
    size_t n, i;
    struct mbuf *out;
    size_t count;
};

static int is_atext(unsigned char c)
{
    return c > 0x20 && c != 0x7f && strchr("()<>@,;:\\\".[]", c) == NULL;
}

/* A phrase/local-part: words (atoms with dots, quoted strings). `unquote`
 * gives the display form (quotes removed, words joined by a space). */
static int read_phrase(struct addr_parser *a, struct mbuf *out, struct mbuf *comment)
{
    int words = 0;
    for (;;) {
        skip_cfws(a->s, a->n, &a->i, comment);
        if (a->i >= a->n) break;
        unsigned char c = (unsigned char)a->s[a->i];
        if (c == '"') {
            if (words++) mbuf_putc(out, ' ');
            struct mbuf q = {0};
            quoted_string(a->s, a->n, &a->i, &q);
            mbuf_put(out, q.data, q.len);
            mbuf_free(&q);
        } else if (is_atext(c) || c == '.') {
            size_t st = a->i;
            while (a->i < a->n && (is_atext((unsigned char)a->s[a->i]) || a->s[a->i] == '.'))
                a->i++;
            if (words++) mbuf_putc(out, ' ');
            mbuf_put(out, a->s + st, a->i - st);
        } else {
            break;
        }
    }
    return words;
}

/* local-part: raw text of dot-atoms / quoted strings, CFWS removed. */
static void read_local(struct addr_parser *a, struct mbuf *out)
{
    for (;;) {
        skip_cfws(a->s, a->n, &a->i, NULL);
        if (a->i >= a->n) break;
        unsigned char c = (unsigned char)a->s[a->i];
        if (c == '"') {
            size_t st = a->i++;
            while (a->i < a->n && a->s[a->i] != '"') {
                if (a->s[a->i] == '\\' && a->i + 1 < a->n) a->i++;
                a->i++;
            }
            if (a->i < a->n) a->i++;
            mbuf_put(out, a->s + st, a->i - st);
        } else if (is_atext(c) || c == '.') {
            size_t st = a->i;
            while (a->i < a->n && (is_atext((unsigned char)a->s[a->i]) || a->s[a->i] == '.'))
                a->i++;
            mbuf_put(out, a->s + st, a->i - st);
        } else {
            break;
        }
    }
}

static void read_domain(struct addr_parser *a, struct mbuf *out)
{
    skip_cfws(a->s, a->n, &a->i, NULL);
    size_t st = a->i;
    if (a->i < a->n && a->s[a->i] == '[') {
        while (a->i < a->n && a->s[a->i] != ']')
            a->i++;
        if (a->i < a->n) a->i++;
    } else {
        while (a->i < a->n && (is_atext((unsigned char)a->s[a->i]) || a->s[a->i] == '.'))
            a->i++;
    }
    mbuf_put(out, a->s + st, a->i - st);
}

static void emit_addr(struct addr_parser *a, const struct mbuf *name, int has_name,
                      const struct mbuf *adl, const struct mbuf *mbox, int has_mbox,
                      const struct mbuf *host, int has_host)
{
    if (a->count >= MIME_MAX_ADDRESSES) return;
    if (a->count++ == 0) mbuf_putc(a->out, '(');
    mbuf_putc(a->out, '(');
    nstring(a->out, name, has_name);
    mbuf_putc(a->out, ' ');
    nstring(a->out, adl, adl->len > 0);
    mbuf_putc(a->out, ' ');
    nstring(a->out, mbox, has_mbox);
    mbuf_putc(a->out, ' ');
    nstring(a->out, host, has_host);
    mbuf_putc(a->out, ')');
}

/* Parse one mailbox (after its phrase has been read into `phrase`). */
static void parse_mailbox_rest(struct addr_parser *a, struct mbuf *phrase, int words,
                               struct mbuf *comment)
{
    struct mbuf adl = {0}, mbox = {0}, host = {0};
    static const struct mbuf missing_mbox = {(char *)"MISSING_MAILBOX", 15, 0};
    static const struct mbuf missing_host = {(char *)"MISSING_DOMAIN", 14, 0};
    if (a->i < a->n && a->s[a->i] == '<') {
        a->i++;
        /* obsolete route: @a,@b: */
        skip_cfws(a->s, a->n, &a->i, NULL);
        if (a->i < a->n && a->s[a->i] == '@') {
            size_t st = a->i;
            size_t lim = a->n - st < 256 ? a->n : st + 256; /* bounded: stays linear */
            while (a->i < lim && a->s[a->i] != ':' && a->s[a->i] != '>')
                a->i++;
            if (a->i < lim && a->s[a->i] == ':') {
                for (size_t k = st; k < a->i; k++)
                    if (a->s[k] != ' ' && a->s[k] != '\t' && a->s[k] != '\r' && a->s[k] != '\n')
                        mbuf_putc(&adl, a->s[k]);
                a->i++;
            } else {
                a->i = st;
            }
        }
        read_local(a, &mbox);
        skip_cfws(a->s, a->n, &a->i, NULL);
        if (a->i < a->n && a->s[a->i] == '@') {
            a->i++;
            read_domain(a, &host);
        }
        skip_cfws(a->s, a->n, &a->i, NULL);
        while (a->i < a->n && a->s[a->i] != '>' && a->s[a->i] != ',' && a->s[a->i] != ';')
            a->i++;
        if (a->i < a->n && a->s[a->i] == '>') a->i++;
        if (mbox.len == 0 && host.len == 0) {
            /* <> */
            emit_addr(a, phrase, words > 0, &adl, &mbox, 1, &host, 1);
        } else {
            emit_addr(a, phrase, words > 0, &adl, mbox.len ? &mbox : &missing_mbox, 1,
                      host.len ? &host : &missing_host, 1);
        }
    } else {
        /* addr-spec: the phrase we read was the local part */
        struct mbuf local = {0};
        /* re-read raw: phrase joined words by spaces; for a local part we
         * want them as written, which for dot-atoms is the same text */
        mbuf_put(&local, phrase->data, phrase->len);
        if (a->i < a->n && a->s[a->i] == '@') {
            a->i++;
            read_domain(a, &host);
        }
        comment->len = 0;
        skip_cfws(a->s, a->n, &a->i, comment);
        int has_name = comment->len > 0;
        emit_addr(a, comment, has_name, &adl, local.len ? &local : &missing_mbox, 1,
                  host.len ? &host : &missing_host, 1);
        mbuf_free(&local);
    }
    mbuf_free(&adl);
    mbuf_free(&mbox);
    mbuf_free(&host);
}

/* Render an address-list header value as an IMAP address list (or NIL). */
static void render_addresses(const char *s, size_t n, struct mbuf *out)
{
    struct addr_parser a = {s, n, 0, out, 0};
    int in_group = 0;
    while (a.i < a.n) {
        struct mbuf phrase = {0}, comment = {0};
        size_t before = a.i;
        int words = read_phrase(&a, &phrase, &comment);
        skip_cfws(a.s, a.n, &a.i, NULL);
        char c = a.i < a.n ? a.s[a.i] : '\0';
        if (c == ':' && !in_group) {
            static const struct mbuf none = {0};
            a.i++;
            emit_addr(&a, &none, 0, &none, &phrase, 1, &none, 0);
            in_group = 1;
        } else if (c == ';' && in_group) {
            static const struct mbuf none = {0};
            if (words > 0) parse_mailbox_rest(&a, &phrase, words, &comment);
            a.i++;
            emit_addr(&a, &none, 0, &none, &none, 0, &none, 0);
            in_group = 0;
        } else if (c == '<' || (c == '@' && words > 0)) {
            if (c == '<' && words == 0) phrase.len = 0;
            parse_mailbox_rest(&a, &phrase, words, &comment);
        } else if (words > 0) {
            /* bare word(s) without @: a mailbox without a domain */
            parse_mailbox_rest(&a, &phrase, words, &comment);
        } else if (a.i < a.n) {
            a.i++; /* ',' or junk */
        }
        if (a.i == before && a.i < a.n) a.i++; /* always progress */
        mbuf_free(&phrase);
        mbuf_free(&comment);
    }
    if (in_group) {
        static const struct mbuf none = {0};
        emit_addr(&a, &none, 0, &none, &none, 0, &none, 0);
    }
    if (a.count == 0)
        mbuf_puts(out, "NIL");
    else
        mbuf_putc(out, ')');
}

/* ---- ENVELOPE ------------------------------------------------------- */

static int get_field(const char *hdr, size_t len, const char *name, struct mbuf *v)
{
    v->len = 0;
    return mime_header_get(hdr, len, name, v);
}

static void render_envelope(const char *hdr, size_t len, struct mbuf *out)
{
    struct mbuf v = {0}, from = {0};
    int have_from;
    mbuf_putc(out, '(');
    nstring(out, &v, get_field(hdr, len, "Date", &v));
    mbuf_putc(out, ' ');
    nstring(out, &v, get_field(hdr, len, "Subject", &v));
    mbuf_putc(out, ' ');
    have_from = get_field(hdr, len, "From", &from);
    if (have_from)
        render_addresses(from.data, from.len, out);
    else
        mbuf_puts(out, "NIL");
    static const char *const defaulted[] = {"Sender", "Reply-To"};
    for (int k = 0; k < 2; k++) {
        mbuf_putc(out, ' ');
        if (get_field(hdr, len, defaulted[k], &v) && v.len > 0) {
            size_t mark = out->len;
            render_addresses(v.data, v.len, out);
            if (out->len - mark == 3 && memcmp(out->data + mark, "NIL", 3) == 0 && have_from) {
                out->len = mark;
                render_addresses(from.data, from.len, out);
            }
        } else if (have_from) {
            render_addresses(from.data, from.len, out);
        } else {
            mbuf_puts(out, "NIL");
        }
    }
    static const char *const lists[] = {"To", "Cc", "Bcc"};
    for (int k = 0; k < 3; k++) {
        mbuf_putc(out, ' ');
        if (get_field(hdr, len, lists[k], &v))
            render_addresses(v.data, v.len, out);
        else
            mbuf_puts(out, "NIL");
    }
    mbuf_putc(out, ' ');
    nstring(out, &v, get_field(hdr, len, "In-Reply-To", &v));
    mbuf_putc(out, ' ');
    nstring(out, &v, get_field(hdr, len, "Message-ID", &v));
    mbuf_putc(out, ')');
    mbuf_free(&v);
    mbuf_free(&from);
}

/* ---- BODYSTRUCTURE -------------------------------------------------- */

static void render_params(struct mbuf *out, const struct ctype *ct, int add_charset)
{
    if (ct->n_params == 0 && !add_charset) {
        mbuf_puts(out, "NIL");
        return;
    }
    mbuf_putc(out, '(');
    int first = 1;
    if (add_charset) {
        mbuf_puts(out, "\"CHARSET\" \"us-ascii\"");
        first = 0;
    }
    for (size_t i = 0; i < ct->n_params; i++) {
        struct mbuf nm = {0};
        mbuf_put(&nm, ct->params[i].name.data, ct->params[i].name.len);
        upcase(&nm);
        if (!first) mbuf_putc(out, ' ');
        first = 0;
        mime_imap_string(out, nm.data, nm.len);
        mbuf_putc(out, ' ');
        mime_imap_string(out, ct->params[i].value.data ? ct->params[i].value.data : "",
                         ct->params[i].value.len);
        mbuf_free(&nm);
    }
    mbuf_putc(out, ')');
}

static void render_disposition(const char *hdr, size_t len, struct mbuf *out)
{
    struct mbuf v = {0};
    struct ctype d;
    if (!mime_header_get(hdr, len, "Content-Disposition", &v)) {
        mbuf_puts(out, "NIL");
        return;
    }
    parse_disposition(v.data, v.len, &d);
    mbuf_free(&v);
    if (!d.valid) {
        ctype_free(&d);
        mbuf_puts(out, "NIL");
        return;
    }
    upcase(&d.type);
    mbuf_putc(out, '(');
    mime_imap_string(out, d.type.data, d.type.len);
    mbuf_putc(out, ' ');
    render_params(out, &d, 0);
    mbuf_putc(out, ')');
    ctype_free(&d);
}

static void render_language(const char *hdr, size_t len, struct mbuf *out)
{
    struct mbuf v = {0};
    if (!mime_header_get(hdr, len, "Content-Language", &v)) {
        mbuf_puts(out, "NIL");
        return;
    }
    struct mbuf tags[16];
    size_t nt = 0, i = 0;
    while (i < v.len && nt < 16) {
        skip_cfws(v.data, v.len, &i, NULL);
        if (i < v.len && v.data[i] == ',') {
            i++;
            continue;
        }
        memset(&tags[nt], 0, sizeof(tags[nt]));
        if (mime_token(v.data, v.len, &i, &tags[nt]))
            nt++;
        else if (i < v.len)
            i++;
    }
    if (nt == 0) {
        mbuf_puts(out, "NIL");
    } else if (nt == 1) {
        mime_imap_string(out, tags[0].data, tags[0].len);
    } else {
        mbuf_putc(out, '(');
        for (size_t k = 0; k < nt; k++) {
            if (k) mbuf_putc(out, ' ');
            mime_imap_string(out, tags[k].data, tags[k].len);
        }
        mbuf_putc(out, ')');
    }
    for (size_t k = 0; k < nt; k++)
        mbuf_free(&tags[k]);
    mbuf_free(&v);
}

static void render_simple_field(const char *hdr, size_t len, const char *name, struct mbuf *out)
{
    struct mbuf v = {0};
    nstring(out, &v, mime_header_get(hdr, len, name, &v));
    mbuf_free(&v);
}

static void render_body(const char *msg, const struct mime_tree *t, uint32_t idx, int ext,
                        struct mbuf *out);

static void render_multipart(const char *msg, const struct mime_tree *t, uint32_t idx, int ext,
                             struct mbuf *out, struct ctype *ct)
{
    const struct mime_part *p = &t->parts[idx];
    const char *hdr = msg + p->hdr_start;
    size_t hlen = (size_t)(p->hdr_end - p->hdr_start);
    mbuf_putc(out, '(');
    if (p->n_children == 0) {
        mbuf_puts(out, "(\"TEXT\" \"PLAIN\" (\"CHARSET\" \"us-ascii\") NIL NIL \"7BIT\" 0 0");
        mbuf_puts(out, ext ? " NIL NIL NIL NIL)" : ")");
    }
    for (uint32_t c = p->first_child; c != 0; c = t->parts[c].next_sibling)
        render_body(msg, t, c, ext, out);
    mbuf_putc(out, ' ');
    upcase(&ct->subtype);
    mime_imap_string(out, ct->subtype.data, ct->subtype.len);
    if (ext) {
        mbuf_putc(out, ' ');
        render_params(out, ct, 0);
        mbuf_putc(out, ' ');
        render_disposition(hdr, hlen, out);
        mbuf_putc(out, ' ');
        render_language(hdr, hlen, out);
        mbuf_putc(out, ' ');
        render_simple_field(hdr, hlen, "Content-Location", out);
    }
    mbuf_putc(out, ')');
}

static void render_body(const char *msg, const struct mime_tree *t, uint32_t idx, int ext,
                        struct mbuf *out)
{
    const struct mime_part *p = &t->parts[idx];
    const char *hdr = msg + p->hdr_start;
    size_t hlen = (size_t)(p->hdr_end - p->hdr_start);
    struct ctype ct;
    int have = header_ctype(hdr, hlen, &ct);

    if (p->is_multipart) {
        render_multipart(msg, t, idx, ext, out, &ct);
        ctype_free(&ct);
        return;
    }
    int is_msg = p->is_message_rfc822 && p->first_child != 0;
    int add_charset = 0;
    if (is_msg) {
        /* keep the params of an explicit message/rfc822 (digest default: none) */
        mbuf_free(&ct.type);
        mbuf_free(&ct.subtype);
        mbuf_puts(&ct.type, "MESSAGE");
        mbuf_puts(&ct.subtype, "RFC822");
    } else if (!have || strcasecmp(ct.type.data, "multipart") == 0 ||
               (strcasecmp(ct.type.data, "message") == 0 &&
                strcasecmp(ct.subtype.data, "rfc822") == 0)) {
        /* default, or a multipart/message we could not descend into */
        ctype_free(&ct);
        memset(&ct, 0, sizeof(ct));
        mbuf_puts(&ct.type, "TEXT");
        mbuf_puts(&ct.subtype, "PLAIN");
        add_charset = 1;
    } else if (strcasecmp(ct.type.data, "text") == 0 && param_get(&ct, "charset") == NULL) {
        add_charset = 1;
    }
    upcase(&ct.type);
    upcase(&ct.subtype);

    struct mbuf enc = {0};
    if (mime_header_get(hdr, hlen, "Content-Transfer-Encoding", &enc)) {
        struct mbuf tok = {0};
        size_t i = 0;
        skip_cfws(enc.data, enc.len, &i, NULL);
        if (!mime_token(enc.data, enc.len, &i, &tok)) mbuf_puts(&tok, "7BIT");
        mbuf_free(&enc);
        enc = tok;
        upcase(&enc);
    } else {
        mbuf_puts(&enc, "7BIT");
    }

    mbuf_putc(out, '(');
    mime_imap_string(out, ct.type.data, ct.type.len);
    mbuf_putc(out, ' ');
    mime_imap_string(out, ct.subtype.data, ct.subtype.len);
    mbuf_putc(out, ' ');
    render_params(out, &ct, add_charset);
    mbuf_putc(out, ' ');
    render_simple_field(hdr, hlen, "Content-ID", out);
    mbuf_putc(out, ' ');
    render_simple_field(hdr, hlen, "Content-Description", out);
    mbuf_putc(out, ' ');
    mime_imap_string(out, enc.data, enc.len);
    mbuf_printf(out, " %llu", (unsigned long long)(p->body_end - p->body_start));
    if (is_msg) {
        const struct mime_part *c = &t->parts[p->first_child];
        mbuf_putc(out, ' ');
        render_envelope(msg + c->hdr_start, (size_t)(c->hdr_end - c->hdr_start), out);
        mbuf_putc(out, ' ');
        render_body(msg, t, p->first_child, ext, out);
        mbuf_printf(out, " %u", p->body_lines);
    } else if (strcmp(ct.type.data, "TEXT") == 0) {
        mbuf_printf(out, " %u", p->body_lines);
    }
    if (ext) {
        mbuf_putc(out, ' ');
        render_simple_field(hdr, hlen, "Content-MD5", out);
        mbuf_putc(out, ' ');
        render_disposition(hdr, hlen, out);
        mbuf_putc(out, ' ');
        render_language(hdr, hlen, out);
        mbuf_putc(out, ' ');
        render_simple_field(hdr, hlen, "Content-Location", out);
    }
    mbuf_putc(out, ')');
    mbuf_free(&enc);
    ctype_free(&ct);
}

/* ---- cache ---------------------------------------------------------- */

void mime_render_envelope(const char *hdr, size_t len, struct mbuf *out)
{
    render_envelope(hdr, len, out);
}

void mime_render_body(const char *msg, const struct mime_tree *t, uint32_t idx, int ext,
                      struct mbuf *out)
{
    render_body(msg, t, idx, ext, out);
}

int mime_build_cache(const char *msg, size_t len, struct mime_cache *c_r)
{
    struct mime_tree t;
    memset(c_r, 0, sizeof(*c_r));
    if (mime_tree_parse(msg, len, &t) < 0) return -1;
    const struct mime_part *root = &t.parts[0];
    render_envelope(msg + root->hdr_start, (size_t)(root->hdr_end - root->hdr_start),
                    &c_r->envelope);
    render_body(msg, &t, 0, 1, &c_r->bodystructure);
    render_body(msg, &t, 0, 0, &c_r->body);
    mime_tree_serialize(&t, &c_r->parts);
    struct mbuf d = {0};
    int64_t utc;
    if (mime_header_get(msg + root->hdr_start, (size_t)(root->hdr_end - root->hdr_start), "Date",
                        &d) &&
        mime_parse_date(d.data, d.len, &utc, NULL) == 0)
        c_r->sent_date = utc;
    mbuf_free(&d);
    mime_tree_free(&t);
    return 0;
}

void mime_cache_free(struct mime_cache *c)
{
    mbuf_free(&c->envelope);
    mbuf_free(&c->bodystructure);
    mbuf_free(&c->body);
    mbuf_free(&c->parts);
}

int mime_part_text_info(const char *msg, const struct mime_tree *t, uint32_t idx, int *encoding_r,
                        int *charset_r)
{
    if (idx >= t->n_parts) return 0;
    const struct mime_part *p = &t->parts[idx];
    if (p->is_multipart || p->is_message_rfc822) return 0;
    const char *hdr = msg + p->hdr_start;
    size_t hlen = (size_t)(p->hdr_end - p->hdr_start);
    struct ctype ct;
    int have = header_ctype(hdr, hlen, &ct);
    int text = !have || strcasecmp(ct.type.data, "text") == 0 ||
               strcasecmp(ct.type.data, "multipart") == 0 ||
               strcasecmp(ct.type.data, "message") == 0;
    /* a digest child without Content-Type is message/rfc822 (parsed as such
     * unless limits hit); treat the fallbacks as text like BODYSTRUCTURE */
    *charset_r = MIME_CS_ASCII;
    if (have) {
        const char *cs = param_get(&ct, "charset");
        if (cs != NULL) *charset_r = mime_charset_kind(cs, strlen(cs));
    }
    ctype_free(&ct);
    *encoding_r = MIME_ENC_IDENTITY;
    struct mbuf enc = {0};
    if (mime_header_get(hdr, hlen, "Content-Transfer-Encoding", &enc)) {
        if (strncasecmp(enc.data, "quoted-printable", 16) == 0)
            *encoding_r = MIME_ENC_QP;
        else if (strncasecmp(enc.data, "base64", 6) == 0)
            *encoding_r = MIME_ENC_BASE64;
    }
    mbuf_free(&enc);
    return text;
}
