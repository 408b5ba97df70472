/* imap_write: response writers (strings, flags) and date-time helpers for
 * the IMAP engine. See imap_internal.h for the contracts.
 *
 * Every writer goes to s->conn and silently does nothing when the session
 * has no connection any more (closed while a command was in flight: the
 * session then sets s->conn to NULL). */
#include <ctype.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "imap_internal.h"

/* Strings longer than this go out as literals even when 7-bit clean. */
#define IMAP_QUOTED_MAX 1024
/* Bounds for flag lists parsed from clients. */
#define IMAP_KEYWORD_MAX_LEN 250
#define IMAP_KEYWORDS_MAX 128

static void wr(struct imap_session *s, const void *p, size_t n)
{
    if (s->conn != NULL && n > 0) cf_conn_write(s->conn, p, n);
}

/* 1 when the bytes can go in a quoted string: 7-bit, no NUL/CR/LF. */
static int quotable(const char *str, size_t len)
{
    if (len > IMAP_QUOTED_MAX) return 0;
    for (size_t i = 0; i < len; i++) {
        unsigned char c = (unsigned char)str[i];
        if (c == 0 || c == '\r' || c == '\n' || c >= 0x80) return 0;
    }
    return 1;
}

void imap_write_string(struct imap_session *s, const char *str, size_t len)
{
    if (str == NULL) {
        wr(s, "NIL", 3);
        return;
    }
    if (quotable(str, len)) {
        char buf[2 * IMAP_QUOTED_MAX + 2];
        size_t o = 0;
        buf[o++] = '"';
        for (size_t i = 0; i < len; i++) {
            if (str[i] == '"' || str[i] == '\\') buf[o++] = '\\';
            buf[o++] = str[i];
        }
        buf[o++] = '"';
        wr(s, buf, o);
        return;
    }
    char hdr[32];
    int n = snprintf(hdr, sizeof(hdr), "{%zu}\r\n", len);
    wr(s, hdr, (size_t)n);
    wr(s, str, len);
}

/* ATOM-CHAR minus ']' (kept out so the atom is safe in every context). */
static int atom_char(unsigned char c)
{
    if (c <= 0x20 || c >= 0x7f) return 0;
    return strchr("(){%*\"\\]", c) == NULL;
}

void imap_write_astring(struct imap_session *s, const char *str, size_t len)
{
    if (str == NULL) {
        wr(s, "\"\"", 2);
        return;
    }
    int atom = len > 0 && len <= IMAP_QUOTED_MAX;
    for (size_t i = 0; atom && i < len; i++)
        if (!atom_char((unsigned char)str[i])) atom = 0;
    if (atom && len == 3 && strncasecmp(str, "NIL", 3) == 0) atom = 0;
    if (atom)
        wr(s, str, len);
    else
        imap_write_string(s, str, len);
}

void imap_write_flags(struct imap_session *s, uint32_t flags, const char *keywords,
                      size_t keywords_len, int recent)
{
    static const struct {
        uint32_t bit;
        const char *name;
    } sys[] = {
        {STORE_F_ANSWERED, "\\Answered"}, {STORE_F_FLAGGED, "\\Flagged"},
        {STORE_F_DELETED, "\\Deleted"},   {STORE_F_SEEN, "\\Seen"},
        {STORE_F_DRAFT, "\\Draft"},
    };
    int first = 1;
    wr(s, "(", 1);
    for (size_t i = 0; i < sizeof(sys) / sizeof(sys[0]); i++) {
        if (!(flags & sys[i].bit)) continue;
        if (!first) wr(s, " ", 1);
        wr(s, sys[i].name, strlen(sys[i].name));
        first = 0;
    }
    /* Keywords: NUL-separated or NUL-terminated; empty items skipped. */
    size_t off = 0;
    while (keywords != NULL && off < keywords_len) {
        size_t l = strnlen(keywords + off, keywords_len - off);
        if (l > 0) {
            if (!first) wr(s, " ", 1);
            wr(s, keywords + off, l);
            first = 0;
        }
        off += l + 1;
    }
    if (recent) {
        if (!first) wr(s, " ", 1);
        wr(s, "\\Recent", 7);
    }
    wr(s, ")", 1);
}

static int flag_atom_ok(const char *p, size_t len)
{
    if (len == 0 || len > IMAP_KEYWORD_MAX_LEN) return 0;
    for (size_t i = 0; i < len; i++)
        if (!atom_char((unsigned char)p[i])) return 0;
    return 1;
}

int imap_parse_flags(const struct imap_arg *arg, uint32_t *flags_r, char **keywords_r,
                     size_t *keywords_len_r, size_t *n_keywords_r)
{
    static const struct {
        const char *name;
        uint32_t bit;
    } sys[] = {
        {"\\Seen", STORE_F_SEEN},       {"\\Answered", STORE_F_ANSWERED},
        {"\\Flagged", STORE_F_FLAGGED}, {"\\Deleted", STORE_F_DELETED},
        {"\\Draft", STORE_F_DRAFT},
    };
    const struct imap_arg *items;
    size_t n_items;
    uint32_t flags = 0;
    char *kw = NULL;
    size_t kw_len = 0, n_kw = 0;

    *flags_r = 0;
    *keywords_r = NULL;
    *keywords_len_r = 0;
    if (n_keywords_r) *n_keywords_r = 0;
    if (arg == NULL) return -1;
    if (arg->type == IMAP_ARG_LIST) {
        items = arg->list;
        n_items = arg->n_list;
    } else if (arg->type == IMAP_ARG_ATOM) {
        items = arg;
        n_items = 1;
    } else {
        return -1;
    }
    if (n_items > IMAP_KEYWORDS_MAX + 8) return -1;
    for (size_t i = 0; i < n_items; i++) {
        const struct imap_arg *a = &items[i];
        if (a->type != IMAP_ARG_ATOM || a->str == NULL) goto fail;
        if (a->len > 0 && a->str[0] == '\\') {
            size_t k;
            for (k = 0; k < sizeof(sys) / sizeof(sys[0]); k++)
                if (strlen(sys[k].name) == a->len && strncasecmp(sys[k].name, a->str, a->len) == 0)
                    break;
            if (k == sizeof(sys) / sizeof(sys[0])) goto fail; /* \Recent, \* or unknown */
            flags |= sys[k].bit;
            continue;
        }
        if (!flag_atom_ok(a->str, a->len)) goto fail;
        /* Keywords are case-insensitive: drop duplicates. */
        int dup = 0;
        for (size_t off = 0; off < kw_len;) {
            size_t l = strlen(kw + off);
            if (l == a->len && strncasecmp(kw + off, a->str, l) == 0) {
                dup = 1;
                break;
            }
            off += l + 1;
        }
        if (dup) continue;
        if (n_kw >= IMAP_KEYWORDS_MAX) goto fail;
        char *nk = realloc(kw, kw_len + a->len + 1);
        if (nk == NULL) goto fail;
        kw = nk;
        memcpy(kw + kw_len, a->str, a->len);
        kw[kw_len + a->len] = '\0';
        kw_len += a->len + 1;
        n_kw++;
    }
    *flags_r = flags;
    *keywords_r = kw;
    *keywords_len_r = kw_len;
    if (n_keywords_r) *n_keywords_r = n_kw;
    return 0;
fail:
    free(kw);
    return -1;
}

/* ---- dates ---- */

static const char *const month_names[12] = {"Jan", "Feb", "Mar", "Apr", "May", "Jun",
                                            "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"};

static int is_leap(int64_t y)
{
    return (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
}

static int days_in_month(int64_t y, int m)
{
    static const int d[12] = {31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31};
    return m == 2 && is_leap(y) ? 29 : d[m - 1];
}

/* Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant). */
static int64_t days_from_civil(int64_t y, int m, int d)
{
    y -= m <= 2;
    int64_t era = (y >= 0 ? y : y - 399) / 400;
    int64_t yoe = y - era * 400;
    int64_t doy = (153 * (m + (m > 2 ? -3 : 9)) + 2) / 5 + d - 1;
    int64_t doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    return era * 146097 + doe - 719468;
}

static void civil_from_days(int64_t z, int64_t *y_r, int *m_r, int *d_r)
{
    z += 719468;
    int64_t era = (z >= 0 ? z : z - 146096) / 146097;
    int64_t doe = z - era * 146097;
    int64_t yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    int64_t y = yoe + era * 400;
    int64_t doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    int64_t mp = (5 * doy + 2) / 153;
    int d = (int)(doy - (153 * mp + 2) / 5 + 1);
    int m = (int)(mp < 10 ? mp + 3 : mp - 9);
    *y_r = y + (m <= 2);
    *m_r = m;
    *d_r = d;
}

static int digits(const char *s, size_t n, int *v_r)
{
    int v = 0;
    for (size_t i = 0; i < n; i++) {
        if (s[i] < '0' || s[i] > '9') return -1;
        v = v * 10 + (s[i] - '0');
    }
    *v_r = v;
    return 0;
}

/* Parses "d-Mon-yyyy" / "dd-Mon-yyyy" (and " d-Mon-yyyy" when space_ok) at
 * the start of s; returns bytes used or -1. */
static int parse_date_part(const char *s, size_t len, int space_ok, int64_t *y_r, int *m_r,
                           int *d_r)
{
    size_t i = 0;
    int day, year;
    if (len < 10) return -1;
    if (s[0] == ' ' && space_ok) {
        if (digits(s + 1, 1, &day) < 0) return -1;
        i = 2;
    } else if (len >= 11 && s[1] >= '0' && s[1] <= '9') {
        if (digits(s, 2, &day) < 0) return -1;
        i = 2;
    } else {
        if (digits(s, 1, &day) < 0) return -1;
        i = 1;
    }
    if (len < i + 9 || s[i] != '-' || s[i + 4] != '-') return -1;
    int m;
    for (m = 0; m < 12; m++)
        if (strncasecmp(s + i + 1, month_names[m], 3) == 0) break;
    if (m == 12) return -1;
    if (digits(s + i + 5, 4, &year) < 0) return -1;
    if (year < 1000) return -1;
    if (day < 1 || day > days_in_month(year, m + 1)) return -1;
    *y_r = year;
    *m_r = m + 1;
    *d_r = day;
    return (int)(i + 9);
}

int imap_parse_datetime(const char *s, size_t len, int64_t *utc_r, int *tz_min_r)
{
    int64_t y;
    int mo, d, hh, mm, ss, zh, zm;
    if (s == NULL) return -1;
    int used = parse_date_part(s, len, 1, &y, &mo, &d);
    if (used < 0) return -1;
    const char *p = s + used;
    size_t rest = len - (size_t)used;
    /* " hh:mm:ss +zzzz" */
    if (rest != 15 || p[0] != ' ' || p[3] != ':' || p[6] != ':' || p[9] != ' ') return -1;
    if (digits(p + 1, 2, &hh) < 0 || digits(p + 4, 2, &mm) < 0 || digits(p + 7, 2, &ss) < 0)
        return -1;
    if (hh > 23 || mm > 59 || ss > 60) return -1;
    if (p[10] != '+' && p[10] != '-') return -1;
    if (digits(p + 11, 2, &zh) < 0 || digits(p + 13, 2, &zm) < 0) return -1;
    if (zm > 59 || zh > 23) return -1;
    int tz = zh * 60 + zm;
    if (p[10] == '-') tz = -tz;
    int64_t local = days_from_civil(y, mo, d) * 86400 + hh * 3600 + mm * 60 + ss;
    *utc_r = local - (int64_t)tz * 60;
    *tz_min_r = tz;
    return 0;
}

void imap_format_datetime(int64_t utc, int tz_min, char out[32])
{
    int64_t y;
    int m, d;
    if (tz_min < -(23 * 60 + 59) || tz_min > 23 * 60 + 59) tz_min = 0;
    int64_t local = utc + (int64_t)tz_min * 60;
    /* Keep the year at four digits. */
    if (local < -30610224000LL /* 1000-01-01 */ || local > 253402300799LL) {
        local = 0;
        tz_min = 0;
    }
    int64_t days = local >= 0 ? local / 86400 : -((-local + 86399) / 86400);
    int64_t secs = local - days * 86400;
    civil_from_days(days, &y, &m, &d);
    int az = tz_min < 0 ? -tz_min : tz_min;
    char tmp[96];
    snprintf(tmp, sizeof(tmp), "%02d-%s-%04d %02d:%02d:%02d %c%02d%02d", d, month_names[m - 1],
             (int)y, (int)(secs / 3600), (int)(secs / 60 % 60), (int)(secs % 60),
             tz_min < 0 ? '-' : '+', az / 60, az % 60);
    size_t l = strnlen(tmp, 31);
    memcpy(out, tmp, l);
    out[l] = '\0';
}

int imap_parse_date(const char *s, size_t len, int64_t *day_r)
{
    int64_t y;
    int m, d;
    if (s == NULL) return -1;
    int used = parse_date_part(s, len, 0, &y, &m, &d);
    if (used < 0 || (size_t)used != len) return -1;
    *day_r = days_from_civil(y, m, d);
    return 0;
}
