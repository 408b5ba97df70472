/* mime_search: SEARCH string matching over stored messages.
 *
 * Matching is a case-insensitive substring test on UTF-8: both sides are
 * folded (ASCII, Latin-1 supplement, Latin Extended-A, basic Greek and
 * Cyrillic) to lower case. Header values are unfolded and RFC 2047 decoded
 * (utf-8, us-ascii, iso-8859-1; other charsets are matched raw). Text part
 * bodies are decoded (quoted-printable/base64, iso-8859-1 -> UTF-8) in
 * bounded chunks; the matcher keeps a needle-sized overlap between chunks,
 * so the message is never copied whole.
 */
#include "mime.h"

#include <stdlib.h>
#include <string.h>

#define CHUNK 4096

/* ---- case folding --------------------------------------------------- */

static uint32_t fold_cp(uint32_t c)
{
    if (c >= 'A' && c <= 'Z') return c + 32;
    if (c < 0xc0) return c;
    if (c <= 0xde) return c == 0xd7 ? c : c + 32;
    if (c >= 0x100 && c <= 0x137) return c | 1;
    if (c >= 0x139 && c <= 0x148) return (c & 1) ? c + 1 : c;
    if (c >= 0x14a && c <= 0x177) return c | 1;
    if (c == 0x178) return 0xff;
    if (c >= 0x179 && c <= 0x17e) return (c & 1) ? c + 1 : c;
    if (c >= 0x391 && c <= 0x3a9 && c != 0x3a2) return c + 32;
    if (c >= 0x410 && c <= 0x42f) return c + 32;
    if (c >= 0x400 && c <= 0x40f) return c + 80;
    return c;
}

/* Fold s[0..n) into out. Returns the number of trailing bytes that form an
 * incomplete UTF-8 sequence (not consumed) when `partial` is set. */
static size_t fold_utf8(const unsigned char *s, size_t n, struct mbuf *out, int partial)
{
    size_t i = 0;
    while (i < n) {
        unsigned char c = s[i];
        if (c < 0x80) {
            char f = (char)(c >= 'A' && c <= 'Z' ? c + 32 : c);
            mbuf_put(out, &f, 1);
            i++;
            continue;
        }
        size_t l = (c & 0xe0) == 0xc0 ? 2 : (c & 0xf0) == 0xe0 ? 3 : (c & 0xf8) == 0xf0 ? 4 : 1;
        if (i + l > n) {
            /* only a split 2-byte sequence matters: longer ones never fold */
            if (partial && l == 2) return n - i;
            l = 1;
        }
        int ok = l > 1;
        for (size_t k = 1; k < l && ok; k++)
            ok = (s[i + k] & 0xc0) == 0x80;
        if (!ok || l != 2) {
            /* only 2-byte sequences change under our folding */
            size_t take = ok ? l : 1;
            mbuf_put(out, s + i, take);
            i += take;
            continue;
        }
        uint32_t cp = ((uint32_t)(c & 0x1f) << 6) | (s[i + 1] & 0x3f);
        uint32_t f = fold_cp(cp);
        if (f >= 0x80 && f < 0x800) {
            char u[2] = {(char)(0xc0 | (f >> 6)), (char)(0x80 | (f & 0x3f))};
            mbuf_put(out, u, 2);
        } else {
            mbuf_put(out, s + i, 2);
        }
        i += 2;
    }
    return 0;
}

/* ---- streaming matcher ---------------------------------------------- */

struct matcher {
    struct mbuf needle; /* folded */
    struct mbuf win;    /* folded haystack window */
    unsigned char pend[4];
    size_t n_pend;
    int found;
};

static void matcher_init(struct matcher *m, const char *needle)
{
    memset(m, 0, sizeof(*m));
    fold_utf8((const unsigned char *)needle, strlen(needle), &m->needle, 0);
    mbuf_put(&m->needle, "", 0);
    mbuf_put(&m->win, "", 0);
}

static void matcher_check(struct matcher *m)
{
    if (m->found) return;
    if (m->needle.len == 0 ||
        memmem(m->win.data, m->win.len, m->needle.data, m->needle.len) != NULL) {
        m->found = 1;
        return;
    }
    /* keep an overlap of needle_len - 1 bytes */
    size_t keep = m->needle.len - 1;
    if (m->win.len > keep) {
        memmove(m->win.data, m->win.data + m->win.len - keep, keep);
        m->win.len = keep;
    }
}

/* Feed decoded (UTF-8) bytes. */
static void matcher_feed(struct matcher *m, const char *s, size_t n)
{
    if (m->found || n == 0) return;
    size_t i = 0;
    if (m->n_pend > 0) {
        /* complete a 2-byte sequence split across feeds */
        unsigned char tmp[2] = {m->pend[0], (unsigned char)s[0]};
        fold_utf8(tmp, 2, &m->win, 0);
        m->n_pend = 0;
        i = 1;
    }
    if (fold_utf8((const unsigned char *)s + i, n - i, &m->win, 1) > 0) {
        m->pend[0] = (unsigned char)s[n - 1];
        m->n_pend = 1;
    }
    if (m->win.len >= CHUNK) matcher_check(m);
}

static int matcher_finish(struct matcher *m)
{
    if (m->n_pend > 0) fold_utf8(m->pend, m->n_pend, &m->win, 0);
    m->n_pend = 0;
    matcher_check(m);
    int r = m->found;
    mbuf_free(&m->needle);
    mbuf_free(&m->win);
    return r;
}

/* ---- RFC 2047 ------------------------------------------------------- */

static int hexv(int c)
{
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

static int b64v(unsigned char c)
{
    if (c >= 'A' && c <= 'Z') return c - 'A';
    if (c >= 'a' && c <= 'z') return c - 'a' + 26;
    if (c >= '0' && c <= '9') return c - '0' + 52;
    if (c == '+') return 62;
    if (c == '/') return 63;
    return -1;
}

struct b64_state {
    uint32_t acc;
    int bits;
    int done;
};

static void b64_decode(struct b64_state *st, const char *s, size_t n, struct mbuf *out)
{
    for (size_t i = 0; i < n && !st->done; i++) {
        if (s[i] == '=') {
            st->done = 1;
            break;
        }
        int v = b64v((unsigned char)s[i]);
        if (v < 0) continue;
        st->acc = (st->acc << 6) | (uint32_t)v;
        st->bits += 6;
        if (st->bits >= 8) {
            st->bits -= 8;
            char c = (char)((st->acc >> st->bits) & 0xff);
            mbuf_put(out, &c, 1);
            st->acc &= (1u << st->bits) - 1;
        }
    }
}

/* Decode one encoded word's text; returns 0 or -1 if malformed. */
static int decode_word(const char *cs, size_t csl, char enc, const char *t, size_t tl,
                       struct mbuf *out)
{
    int kind = mime_charset_kind(cs, csl);
    if (kind == MIME_CS_OTHER) return -1;
    struct mbuf raw = {0};
    mbuf_put(&raw, "", 0);
    if (enc == 'B' || enc == 'b') {
        struct b64_state st = {0, 0, 0};
        b64_decode(&st, t, tl, &raw);
    } else {
        for (size_t i = 0; i < tl; i++) {
            if (t[i] == '_') {
                mbuf_put(&raw, " ", 1);
            } else if (t[i] == '=' && i + 2 < tl && hexv(t[i + 1]) >= 0 && hexv(t[i + 2]) >= 0) {
                char c = (char)(hexv(t[i + 1]) * 16 + hexv(t[i + 2]));
                mbuf_put(&raw, &c, 1);
                i += 2;
            } else {
                mbuf_put(&raw, t + i, 1);
            }
        }
    }
    if (kind == MIME_CS_LATIN1)
        mime_latin1_to_utf8(raw.data, raw.len, out);
    else
        mbuf_put(out, raw.data, raw.len);
    mbuf_free(&raw);
    return 0;
}

/* Append the RFC 2047-decoded form of s[0..n) to out. */
static void decode_2047(const char *s, size_t n, struct mbuf *out)
{
    size_t i = 0;
    int prev_word = 0;
    size_t ws_start = 0; /* output length before whitespace after a word */
    while (i < n) {
        if (s[i] == '=' && i + 1 < n && s[i + 1] == '?') {
            /* =?charset?E?text?= */
            size_t cs = i + 2, q1, q2, end;
            /* bounded look-ahead: many unterminated "=?" must stay linear */
            const char *p1 = memchr(s + cs, '?', n - cs < 64 ? n - cs : 64);
            if (p1 == NULL) goto plain;
            q1 = (size_t)(p1 - s);
            if (q1 + 2 >= n || s[q1 + 2] != '?') goto plain;
            q2 = q1 + 2;
            size_t win = n - q2 - 1 < 2048 ? n - q2 - 1 : 2048;
            const char *e = memmem(s + q2 + 1, win, "?=", 2);
            if (e == NULL) goto plain;
            end = (size_t)(e - s);
            if (memchr(s + q2 + 1, ' ', end - q2 - 1) != NULL) goto plain;
            if (prev_word) out->len = ws_start; /* drop WSP between words */
            size_t before = out->len;
            if (decode_word(s + cs, q1 - cs, s[q1 + 1], s + q2 + 1, end - q2 - 1, out) < 0) {
                out->len = before;
                mbuf_put(out, s + i, end + 2 - i);
            }
            i = end + 2;
            prev_word = 1;
            ws_start = out->len;
            continue;
        }
    plain:
        if (s[i] != ' ' && s[i] != '\t') prev_word = 0;
        mbuf_put(out, s + i, 1);
        i++;
    }
}

/* ---- headers -------------------------------------------------------- */

static int match_header_block(const char *hdr, size_t len, const char *field, const char *needle)
{
    size_t pos = 0;
    struct mime_field f;
    while (mime_field_next(hdr, len, &pos, &f)) {
        if (f.name == NULL) continue;
        if (field != NULL &&
            (strlen(field) != f.name_len || strncasecmp(f.name, field, f.name_len) != 0))
            continue;
        struct mbuf uv = {0}, dv = {0};
        mime_unfold(f.value, f.value_len, &uv);
        if (field == NULL) {
            mbuf_put(&dv, f.name, f.name_len);
            mbuf_put(&dv, ": ", 2);
        }
        decode_2047(uv.data ? uv.data : "", uv.len, &dv);
        struct matcher m;
        matcher_init(&m, needle);
        matcher_feed(&m, dv.data ? dv.data : "", dv.len);
        int r = matcher_finish(&m);
        mbuf_free(&uv);
        mbuf_free(&dv);
        if (r) return 1;
    }
    return 0;
}

int mime_search_header(const char *msg, size_t len, const struct mime_tree *t, const char *field,
                       const char *needle)
{
    if (t->n_parts == 0) return 0;
    const struct mime_part *r = &t->parts[0];
    if (r->hdr_end > len) return 0;
    return match_header_block(msg + r->hdr_start, (size_t)(r->hdr_end - r->hdr_start), field,
                              needle);
}

/* ---- bodies --------------------------------------------------------- */

/* Decode quoted-printable s[0..n) (whole lines) into out. */
static void qp_decode(const char *s, size_t n, struct mbuf *out)
{
    size_t i = 0;
    while (i < n) {
        char c = s[i];
        if (c != '=') {
            mbuf_put(out, &c, 1);
            i++;
            continue;
        }
        if (i + 2 < n && hexv(s[i + 1]) >= 0 && hexv(s[i + 2]) >= 0) {
            char d = (char)(hexv(s[i + 1]) * 16 + hexv(s[i + 2]));
            mbuf_put(out, &d, 1);
            i += 3;
            continue;
        }
        /* soft line break: '=' [WSP] CRLF */
        size_t j = i + 1;
        while (j < n && (s[j] == ' ' || s[j] == '\t'))
            j++;
        if (j < n && s[j] == '\r') j++;
        if (j < n && s[j] == '\n') {
            i = j + 1;
            continue;
        }
        if (j >= n) {
            i = n;
            continue;
        }
        mbuf_put(out, &c, 1);
        i++;
    }
}

static void feed_decoded(struct matcher *m, int cs, const char *s, size_t n)
{
    if (cs == MIME_CS_LATIN1) {
        struct mbuf u = {0};
        mime_latin1_to_utf8(s, n, &u);
        matcher_feed(m, u.data ? u.data : "", u.len);
        mbuf_free(&u);
    } else {
        matcher_feed(m, s, n);
    }
}

static void search_part_body(const char *msg, const struct mime_part *p, int enc, int cs,
                             struct matcher *m)
{
    size_t pos = (size_t)p->body_start, end = (size_t)p->body_end;
    struct b64_state st = {0, 0, 0};
    struct mbuf out = {0};
    while (pos < end && !m->found) {
        size_t take = end - pos < CHUNK ? end - pos : CHUNK;
        if (enc == MIME_ENC_QP) {
            /* extend to a line end so escapes are never split */
            const char *lf = memchr(msg + pos + take - 1, '\n', end - pos - take + 1);
            take = lf ? (size_t)(lf - (msg + pos)) + 1 : end - pos;
        }
        out.len = 0;
        if (enc == MIME_ENC_BASE64) {
            b64_decode(&st, msg + pos, take, &out);
            feed_decoded(m, cs, out.data ? out.data : "", out.len);
        } else if (enc == MIME_ENC_QP) {
            qp_decode(msg + pos, take, &out);
            feed_decoded(m, cs, out.data ? out.data : "", out.len);
        } else {
            feed_decoded(m, cs, msg + pos, take);
        }
        pos += take;
    }
    mbuf_free(&out);
}

int mime_search_body(const char *msg, size_t len, const struct mime_tree *t, const char *needle)
{
    for (uint32_t i = 0; i < t->n_parts; i++) {
        const struct mime_part *p = &t->parts[i];
        if (p->body_end > len || p->hdr_end > len) return 0;
        if (p->is_message_rfc822 && p->first_child != 0) {
            /* headers of encapsulated messages are part of the body text */
            const struct mime_part *c = &t->parts[p->first_child];
            if (c->hdr_end <= len &&
                match_header_block(msg + c->hdr_start, (size_t)(c->hdr_end - c->hdr_start), NULL,
                                   needle))
                return 1;
        }
        int enc, cs;
        if (!mime_part_text_info(msg, t, i, &enc, &cs)) continue;
        struct matcher m;
        matcher_init(&m, needle);
        search_part_body(msg, p, enc, cs, &m);
        if (matcher_finish(&m)) return 1;
    }
    return 0;
}

int mime_search_text(const char *msg, size_t len, const struct mime_tree *t, const char *needle)
{
    return mime_search_header(msg, len, t, NULL, needle) || mime_search_body(msg, len, t, needle);
}
