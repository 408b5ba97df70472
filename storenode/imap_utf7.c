/* imap_utf7: modified UTF-7 (RFC 3501 5.1.3) and sequence sets.
 *
 * Only canonical mUTF-7 is accepted: printable ASCII must be direct, "&-"
 * is '&', base64 runs hold whole UTF-16 units with zero padding bits, two
 * runs may not be adjacent, surrogates must pair up. U+0000 is refused both
 * ways (no mailbox name may hold a NUL).
 */
#include "imap_parser.h"

#include <stdlib.h>
#include <string.h>

static const char b64chars[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+,";

static int b64val(unsigned char c)
{
    if (c >= 'A' && c <= 'Z') return c - 'A';
    if (c >= 'a' && c <= 'z') return c - 'a' + 26;
    if (c >= '0' && c <= '9') return c - '0' + 52;
    if (c == '+') return 62;
    if (c == ',') return 63;
    return -1;
}

static size_t put_utf8(char *o, uint32_t cp)
{
    if (cp < 0x80) {
        o[0] = (char)cp;
        return 1;
    }
    if (cp < 0x800) {
        o[0] = (char)(0xc0 | (cp >> 6));
        o[1] = (char)(0x80 | (cp & 0x3f));
        return 2;
    }
    if (cp < 0x10000) {
        o[0] = (char)(0xe0 | (cp >> 12));
        o[1] = (char)(0x80 | ((cp >> 6) & 0x3f));
        o[2] = (char)(0x80 | (cp & 0x3f));
        return 3;
    }
    o[0] = (char)(0xf0 | (cp >> 18));
    o[1] = (char)(0x80 | ((cp >> 12) & 0x3f));
    o[2] = (char)(0x80 | ((cp >> 6) & 0x3f));
    o[3] = (char)(0x80 | (cp & 0x3f));
    return 4;
}

char *imap_mutf7_to_utf8(const char *in, size_t len)
{
    /* each input byte yields at most 4 output bytes (generous) */
    char *out = malloc(len * 4 + 1);
    if (out == NULL) return NULL;
    size_t o = 0, i = 0;
    int prev_run_end = -1; /* index just after the last "-" of a run */

    while (i < len) {
        unsigned char c = (unsigned char)in[i];
        if (c < 0x20 || c > 0x7e) goto bad;
        if (c != '&') {
            out[o++] = (char)c;
            i++;
            continue;
        }
        i++;
        if (i < len && in[i] == '-') {
            out[o++] = '&';
            i++;
            continue;
        }
        if ((size_t)prev_run_end == i - 1) goto bad; /* adjacent runs */
        uint32_t bits = 0;
        int nbits = 0;
        uint32_t high = 0; /* pending high surrogate */
        int units = 0;
        for (;;) {
            if (i >= len) goto bad; /* unterminated */
            unsigned char b = (unsigned char)in[i];
            if (b == '-') break;
            int v = b64val(b);
            if (v < 0) goto bad;
            bits = (bits << 6) | (uint32_t)v;
            nbits += 6;
            i++;
            if (nbits >= 16) {
                nbits -= 16;
                uint32_t u = (bits >> nbits) & 0xffff;
                bits &= (1u << nbits) - 1;
                units++;
                if (high != 0) {
                    if (u < 0xdc00 || u > 0xdfff) goto bad;
                    uint32_t cp = 0x10000 + ((high - 0xd800) << 10) + (u - 0xdc00);
                    o += put_utf8(out + o, cp);
                    high = 0;
                } else if (u >= 0xd800 && u <= 0xdbff) {
                    high = u;
                } else if ((u >= 0xdc00 && u <= 0xdfff) || u == 0) {
                    goto bad; /* lone low surrogate, or NUL */
                } else {
                    if (u >= 0x20 && u <= 0x7e) goto bad; /* must be direct */
                    o += put_utf8(out + o, u);
                }
            }
        }
        /* canonical: no leftover full sextet, zero padding, whole units */
        if (units == 0 || high != 0 || nbits >= 6 || bits != 0) goto bad;
        i++; /* '-' */
        prev_run_end = (int)i;
    }
    out[o] = '\0';
    return out;
bad:
    free(out);
    return NULL;
}

/* Decode one UTF-8 sequence; returns length or 0 if invalid. */
static size_t get_utf8(const unsigned char *s, size_t n, uint32_t *cp_r)
{
    unsigned char c = s[0];
    if (c < 0x80) {
        *cp_r = c;
        return 1;
    }
    size_t l;
    uint32_t cp, min;
    if ((c & 0xe0) == 0xc0) {
        l = 2;
        cp = c & 0x1f;
        min = 0x80;
    } else if ((c & 0xf0) == 0xe0) {
        l = 3;
        cp = c & 0x0f;
        min = 0x800;
    } else if ((c & 0xf8) == 0xf0) {
        l = 4;
        cp = c & 0x07;
        min = 0x10000;
    } else {
        return 0;
    }
    if (n < l) return 0;
    for (size_t k = 1; k < l; k++) {
        if ((s[k] & 0xc0) != 0x80) return 0;
        cp = (cp << 6) | (s[k] & 0x3f);
    }
    if (cp < min || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff)) return 0;
    *cp_r = cp;
    return l;
}

char *imap_utf8_to_mutf7(const char *in, size_t len)
{
    /* worst case: every char -> 4 bytes utf-8 -> 2 units -> 6 chars + "&-" */
    char *out = malloc(len * 4 + 8);
    if (out == NULL) return NULL;
    size_t o = 0, i = 0;
    const unsigned char *s = (const unsigned char *)in;

    while (i < len) {
        if (s[i] >= 0x20 && s[i] <= 0x7e) {
            out[o++] = (char)s[i];
            if (s[i] == '&') out[o++] = '-';
            i++;
            continue;
        }
        out[o++] = '&';
        uint32_t bits = 0;
        int nbits = 0;
        while (i < len && !(s[i] >= 0x20 && s[i] <= 0x7e)) {
            uint32_t cp;
            size_t l = get_utf8(s + i, len - i, &cp);
            if (l == 0 || cp == 0) goto bad; /* invalid UTF-8, or NUL */
            i += l;
            uint32_t u[2];
            int nu = 1;
            if (cp >= 0x10000) {
                cp -= 0x10000;
                u[0] = 0xd800 + (cp >> 10);
                u[1] = 0xdc00 + (cp & 0x3ff);
                nu = 2;
            } else {
                u[0] = cp;
            }
            for (int k = 0; k < nu; k++) {
                bits = (bits << 16) | u[k];
                nbits += 16;
                while (nbits >= 6) {
                    nbits -= 6;
                    out[o++] = b64chars[(bits >> nbits) & 0x3f];
                }
                bits &= (1u << nbits) - 1;
            }
        }
        if (nbits > 0) out[o++] = b64chars[(bits << (6 - nbits)) & 0x3f];
        out[o++] = '-';
    }
    out[o] = '\0';
    return out;
bad:
    free(out);
    return NULL;
}

/* ---- sequence sets -------------------------------------------------- */

static int parse_seqnum(const char *s, size_t len, size_t *i, uint32_t star, uint32_t *v_r)
{
    if (*i < len && s[*i] == '*') {
        (*i)++;
        *v_r = star;
        return 0;
    }
    if (*i >= len || s[*i] < '1' || s[*i] > '9') return -1;
    uint64_t v = 0;
    while (*i < len && s[*i] >= '0' && s[*i] <= '9') {
        v = v * 10 + (uint64_t)(s[*i] - '0');
        if (v > UINT32_MAX) return -1;
        (*i)++;
    }
    *v_r = (uint32_t)v;
    return 0;
}

static int range_cmp(const void *a, const void *b)
{
    const struct imap_seq_range *x = a, *y = b;
    if (x->lo != y->lo) return x->lo < y->lo ? -1 : 1;
    return x->hi < y->hi ? -1 : x->hi > y->hi;
}

int imap_seqset_parse(const char *s, size_t len, uint32_t star, struct imap_seq_range **ranges_r,
                      size_t *n_r, size_t max_ranges)
{
    *ranges_r = NULL;
    *n_r = 0;
    if (len == 0 || max_ranges == 0) return -1;
    size_t cap = 8, n = 0, i = 0;
    struct imap_seq_range *r = malloc(cap * sizeof(*r));
    if (r == NULL) return -1;
    for (;;) {
        uint32_t a, b;
        if (parse_seqnum(s, len, &i, star, &a) < 0) goto bad;
        b = a;
        if (i < len && s[i] == ':') {
            i++;
            if (parse_seqnum(s, len, &i, star, &b) < 0) goto bad;
        }
        if (n == max_ranges) goto bad;
        if (n == cap) {
            cap *= 2;
            if (cap > max_ranges) cap = max_ranges;
            struct imap_seq_range *nr = realloc(r, cap * sizeof(*r));
            if (nr == NULL) goto bad;
            r = nr;
        }
        r[n].lo = a < b ? a : b;
        r[n].hi = a < b ? b : a;
        n++;
        if (i == len) break;
        if (s[i] != ',') goto bad;
        i++;
    }
    qsort(r, n, sizeof(*r), range_cmp);
    size_t m = 0;
    for (size_t k = 1; k < n; k++) {
        if (r[k].lo <= r[m].hi || (r[m].hi != UINT32_MAX && r[k].lo == r[m].hi + 1)) {
            if (r[k].hi > r[m].hi) r[m].hi = r[k].hi;
        } else {
            r[++m] = r[k];
        }
    }
    *ranges_r = r;
    *n_r = m + 1;
    return 0;
bad:
    free(r);
    return -1;
}

int imap_seqset_contains(const struct imap_seq_range *r, size_t n, uint32_t v)
{
    size_t lo = 0, hi = n;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (v < r[mid].lo)
            hi = mid;
        else if (v > r[mid].hi)
            lo = mid + 1;
        else
            return 1;
    }
    return 0;
}
