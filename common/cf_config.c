/* cf_config: INI reader over inih. See cf_config.h. */
#include "cf_config.h"

#include <ctype.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include <ini.h>

struct cf_config_item {
    char *section; /* owned */
    char *key;     /* owned */
    char *value;   /* owned */
};

struct cf_config {
    struct cf_config_item *items; /* owned array, n used of cap */
    size_t n, cap;
    int oom;
};

struct cf_config *cf_config_empty(void)
{
    return calloc(1, sizeof(struct cf_config));
}

void cf_config_free(struct cf_config **cfg)
{
    struct cf_config *c;

    if (cfg == NULL || *cfg == NULL) return;
    c = *cfg;
    for (size_t i = 0; i < c->n; i++) {
        free(c->items[i].section);
        free(c->items[i].key);
        free(c->items[i].value);
    }
    free(c->items);
    free(c);
    *cfg = NULL;
}

static struct cf_config_item *find_item(const struct cf_config *c, const char *section,
                                        const char *key)
{
    if (c == NULL) return NULL;
    for (size_t i = 0; i < c->n; i++) {
        if (strcmp(c->items[i].section, section) == 0 && strcmp(c->items[i].key, key) == 0)
            return &c->items[i];
    }
    return NULL;
}

/* inih handler: returns 1 to continue, 0 on error (inih reports the line). */
static int cfg_ini_handler(void *user, const char *section, const char *name, const char *value)
{
    struct cf_config *c = user;
    struct cf_config_item *it;
    char *v;

    if (name == NULL) return 1; /* new-section callback (if enabled) */
    if (value == NULL) value = "";
    it = find_item(c, section, name);
    if (it != NULL) {
        /* a repeated key: the last one wins */
        v = strdup(value);
        if (v == NULL) goto oom;
        free(it->value);
        it->value = v;
        return 1;
    }
    if (c->n == c->cap) {
        size_t ncap = c->cap ? c->cap * 2 : 32;
        struct cf_config_item *ni = realloc(c->items, ncap * sizeof(*ni));
        if (ni == NULL) goto oom;
        c->items = ni;
        c->cap = ncap;
    }
    it = &c->items[c->n];
    it->section = strdup(section);
    it->key = strdup(name);
    it->value = strdup(value);
    if (it->section == NULL || it->key == NULL || it->value == NULL) {
        free(it->section);
        free(it->key);
        free(it->value);
        goto oom;
    }
    c->n++;
    return 1;
oom:
    c->oom = 1;
    return 0;
}

struct cf_config *cf_config_load(const char *path, char *err, size_t errlen)
{
    struct cf_config *c = cf_config_empty();
    int rv;

    if (c == NULL) {
        snprintf(err, errlen, "%s: out of memory", path);
        return NULL;
    }
    rv = ini_parse(path, cfg_ini_handler, c);
    if (rv == 0) return c;
    if (c->oom || rv == -2)
        snprintf(err, errlen, "%s: out of memory", path);
    else if (rv == -1)
        snprintf(err, errlen, "%s: cannot open: %s", path, strerror(errno));
    else
        snprintf(err, errlen, "%s:%d: syntax error", path, rv);
    cf_config_free(&c);
    return NULL;
}

const char *cf_config_get(const struct cf_config *cfg, const char *section, const char *key)
{
    struct cf_config_item *it = find_item(cfg, section, key);
    return it ? it->value : NULL;
}

int cf_config_foreach(const struct cf_config *cfg,
                      int (*cb)(const char *section, const char *key, const char *value, void *arg),
                      void *arg)
{
    if (cfg == NULL) return 0;
    for (size_t i = 0; i < cfg->n; i++) {
        int rv = cb(cfg->items[i].section, cfg->items[i].key, cfg->items[i].value, arg);
        if (rv != 0) return rv;
    }
    return 0;
}

/* Parse a decimal u64 prefix; *end_r points after the digits. -1 when no
 * digits or overflow. */
static int parse_u64_prefix(const char *s, uint64_t *val_r, const char **end_r)
{
    uint64_t v = 0;
    const char *p = s;

    if (!isdigit((unsigned char)*p)) return -1;
    for (; isdigit((unsigned char)*p); p++) {
        unsigned d = (unsigned)(*p - '0');
        if (v > (UINT64_MAX - d) / 10) return -1;
        v = v * 10 + d;
    }
    *val_r = v;
    *end_r = p;
    return 0;
}

static const char *skip_ws(const char *p)
{
    while (*p == ' ' || *p == '\t')
        p++;
    return p;
}

static int mul_check(uint64_t v, uint64_t m, uint64_t *val_r)
{
    if (m != 0 && v > UINT64_MAX / m) return -1;
    *val_r = v * m;
    return 0;
}

static int parse_u64_full(const char *s, uint64_t *val_r)
{
    const char *end;

    if (s == NULL) return -1;
    s = skip_ws(s);
    if (parse_u64_prefix(s, val_r, &end) < 0) return -1;
    return *skip_ws(end) == '\0' ? 0 : -1;
}

int cf_parse_size(const char *s, uint64_t *val_r)
{
    const char *p;
    uint64_t v, mult = 1;

    if (s == NULL) return -1;
    s = skip_ws(s);
    if (parse_u64_prefix(s, &v, &p) < 0) return -1;
    p = skip_ws(p);
    switch (tolower((unsigned char)*p)) {
    case 'k':
        mult = 1024ull;
        p++;
        break;
    case 'm':
        mult = 1024ull * 1024;
        p++;
        break;
    case 'g':
        mult = 1024ull * 1024 * 1024;
        p++;
        break;
    case 't':
        mult = 1024ull * 1024 * 1024 * 1024;
        p++;
        break;
    default:
        break;
    }
    /* optional "b", "B", or (after a multiplier) "iB" */
    if (mult != 1 && (p[0] == 'i' || p[0] == 'I') && (p[1] == 'b' || p[1] == 'B'))
        p += 2;
    else if (*p == 'b' || *p == 'B')
        p++;
    if (*skip_ws(p) != '\0') return -1;
    return mul_check(v, mult, val_r);
}

int cf_parse_ms(const char *s, uint64_t *val_r)
{
    static const struct {
        const char *unit;
        uint64_t ms;
    } units[] = {
        {"ms", 1},      {"s", 1000},    {"sec", 1000},   {"m", 60000},
        {"min", 60000}, {"h", 3600000}, {"d", 86400000},
    };
    const char *p;
    uint64_t v;
    char unit[8];
    size_t ulen = 0;

    if (s == NULL) return -1;
    s = skip_ws(s);
    if (parse_u64_prefix(s, &v, &p) < 0) return -1;
    p = skip_ws(p);
    while (isalpha((unsigned char)*p) && ulen < sizeof(unit) - 1)
        unit[ulen++] = (char)tolower((unsigned char)*p++);
    unit[ulen] = '\0';
    if (*skip_ws(p) != '\0') return -1;
    if (ulen == 0) {
        /* a bare number is ambiguous; only 0 is accepted */
        if (v != 0) return -1;
        *val_r = 0;
        return 0;
    }
    for (size_t i = 0; i < sizeof(units) / sizeof(units[0]); i++) {
        if (strcmp(unit, units[i].unit) == 0) return mul_check(v, units[i].ms, val_r);
    }
    return -1;
}

int cf_parse_bool(const char *s, int *val_r)
{
    static const char *yes[] = {"yes", "true", "1", "on"};
    static const char *no[] = {"no", "false", "0", "off"};

    if (s == NULL) return -1;
    for (size_t i = 0; i < 4; i++) {
        if (strcasecmp(s, yes[i]) == 0) {
            *val_r = 1;
            return 0;
        }
        if (strcasecmp(s, no[i]) == 0) {
            *val_r = 0;
            return 0;
        }
    }
    return -1;
}

int cf_config_str(const struct cf_config *cfg, const char *section, const char *key,
                  const char *def, const char **val_r)
{
    const char *v = cf_config_get(cfg, section, key);
    *val_r = v ? v : def;
    return 0;
}

int cf_config_u64(const struct cf_config *cfg, const char *section, const char *key, uint64_t def,
                  uint64_t *val_r, char *err, size_t errlen)
{
    const char *v = cf_config_get(cfg, section, key);

    if (v == NULL) {
        *val_r = def;
        return 0;
    }
    if (parse_u64_full(v, val_r) < 0) {
        snprintf(err, errlen, "%s.%s: invalid number \"%s\"", section, key, v);
        return -1;
    }
    return 0;
}

int cf_config_size(const struct cf_config *cfg, const char *section, const char *key, uint64_t def,
                   uint64_t *val_r, char *err, size_t errlen)
{
    const char *v = cf_config_get(cfg, section, key);

    if (v == NULL) {
        *val_r = def;
        return 0;
    }
    if (cf_parse_size(v, val_r) < 0) {
        snprintf(err, errlen, "%s.%s: invalid size \"%s\" (expected e.g. 4096, 64k, 50M, 1G)",
                 section, key, v);
        return -1;
    }
    return 0;
}

int cf_config_ms(const struct cf_config *cfg, const char *section, const char *key, uint64_t def_ms,
                 uint64_t *val_r, char *err, size_t errlen)
{
    const char *v = cf_config_get(cfg, section, key);

    if (v == NULL) {
        *val_r = def_ms;
        return 0;
    }
    if (cf_parse_ms(v, val_r) < 0) {
        snprintf(err, errlen,
                 "%s.%s: invalid duration \"%s\" (expected e.g. 100ms, 30s, 5m, 1h, 1d)", section,
                 key, v);
        return -1;
    }
    return 0;
}

int cf_config_bool(const struct cf_config *cfg, const char *section, const char *key, int def,
                   int *val_r, char *err, size_t errlen)
{
    const char *v = cf_config_get(cfg, section, key);

    if (v == NULL) {
        *val_r = def;
        return 0;
    }
    if (cf_parse_bool(v, val_r) < 0) {
        snprintf(err, errlen, "%s.%s: invalid boolean \"%s\" (expected yes/no/true/false/1/0)",
                 section, key, v);
        return -1;
    }
    return 0;
}
