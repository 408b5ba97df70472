/* px_throttle: failed-login tables and connection counts. See px_throttle.h. */
#include "px_throttle.h"

#include <arpa/inet.h>
#include <ctype.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/rand.h>

/* ---- addresses ---- */

int px_addr_parse(const char *text, struct px_addr *a)
{
    char tmp[64];
    size_t n = strlen(text);
    struct in_addr v4;

    if (n >= 2 && text[0] == '[' && text[n - 1] == ']') {
        text++;
        n -= 2;
    }
    if (n == 0 || n >= sizeof(tmp)) return -1;
    memcpy(tmp, text, n);
    tmp[n] = '\0';
    memset(a, 0, sizeof(*a));
    if (inet_pton(AF_INET, tmp, &v4) == 1) {
        a->b[10] = a->b[11] = 0xff;
        memcpy(a->b + 12, &v4, 4);
        return 0;
    }
    return inet_pton(AF_INET6, tmp, a->b) == 1 ? 0 : -1;
}

int px_addr_is_v4(const struct px_addr *a)
{
    static const uint8_t pre[12] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff};
    return memcmp(a->b, pre, 12) == 0;
}

static void mask_bits(struct px_addr *a, unsigned bits)
{
    for (unsigned i = 0; i < 16; i++) {
        unsigned lo = i * 8;
        if (bits >= lo + 8) continue;
        a->b[i] = bits <= lo ? 0 : (uint8_t)(a->b[i] & (0xff << (8 - (bits - lo))));
    }
}

void px_addr_mask(struct px_addr *a, unsigned v4_prefix, unsigned v6_prefix)
{
    if (px_addr_is_v4(a))
        mask_bits(a, 96 + (v4_prefix > 32 ? 32 : v4_prefix));
    else
        mask_bits(a, v6_prefix > 128 ? 128 : v6_prefix);
}

int px_cidr_parse(const char *text, struct px_cidr *c)
{
    char tmp[80];
    const char *slash = strchr(text, '/');
    size_t n = slash ? (size_t)(slash - text) : strlen(text);
    if (n == 0 || n >= sizeof(tmp)) return -1;
    memcpy(tmp, text, n);
    tmp[n] = '\0';
    if (px_addr_parse(tmp, &c->net) < 0) return -1;
    unsigned max = px_addr_is_v4(&c->net) ? 32 : 128, bits = max;
    if (slash) {
        const char *p = slash + 1;
        if (*p == '\0') return -1;
        bits = 0;
        for (; *p; p++) {
            if (!isdigit((unsigned char)*p)) return -1;
            bits = bits * 10 + (unsigned)(*p - '0');
            if (bits > max) return -1;
        }
    }
    c->bits = max == 32 ? 96 + bits : bits;
    mask_bits(&c->net, c->bits);
    return 0;
}

int px_cidr_match(const struct px_cidr *c, const struct px_addr *a)
{
    struct px_addr m = *a;
    mask_bits(&m, c->bits);
    return memcmp(m.b, c->net.b, 16) == 0;
}

long px_cidr_list_parse(const char *text, struct px_cidr **out_r, char *bad, size_t badlen)
{
    struct px_cidr *list = NULL;
    size_t n = 0, cap = 0;
    const char *p = text ? text : "";

    *out_r = NULL;
    for (;;) {
        while (*p == ' ' || *p == ',' || *p == '\t')
            p++;
        if (*p == '\0') break;
        const char *s = p;
        while (*p && *p != ' ' && *p != ',' && *p != '\t')
            p++;
        char word[80];
        size_t wl = (size_t)(p - s);
        if (wl >= sizeof(word)) wl = sizeof(word) - 1;
        memcpy(word, s, wl);
        word[wl] = '\0';
        if (n == cap) {
            cap = cap ? cap * 2 : 4;
            struct px_cidr *nl = realloc(list, cap * sizeof(*nl));
            if (nl == NULL) goto fail;
            list = nl;
        }
        if (px_cidr_parse(word, &list[n]) < 0) goto fail_word;
        n++;
        continue;
    fail_word:
        if (badlen) {
            size_t k = strlen(word) < badlen ? strlen(word) : badlen - 1;
            memcpy(bad, word, k);
            bad[k] = '\0';
        }
        goto fail;
    }
    *out_r = list;
    return (long)n;
fail:
    free(list);
    return -1;
}

int px_cidr_list_match(const struct px_cidr *list, size_t n, const struct px_addr *a)
{
    for (size_t i = 0; i < n; i++)
        if (px_cidr_match(&list[i], a)) return 1;
    return 0;
}

/* ---- SipHash-2-4 (keyed hash for table buckets and fingerprints) ---- */

#define ROTL(x, b) (uint64_t)(((x) << (b)) | ((x) >> (64 - (b))))
#define SIPROUND                                                                                   \
    do {                                                                                           \
        v0 += v1;                                                                                  \
        v1 = ROTL(v1, 13);                                                                         \
        v1 ^= v0;                                                                                  \
        v0 = ROTL(v0, 32);                                                                         \
        v2 += v3;                                                                                  \
        v3 = ROTL(v3, 16);                                                                         \
        v3 ^= v2;                                                                                  \
        v0 += v3;                                                                                  \
        v3 = ROTL(v3, 21);                                                                         \
        v3 ^= v0;                                                                                  \
        v2 += v1;                                                                                  \
        v1 = ROTL(v1, 17);                                                                         \
        v1 ^= v2;                                                                                  \
        v2 = ROTL(v2, 32);                                                                         \
    } while (0)

static uint64_t siphash(const uint64_t k[2], const void *data, size_t len)
{
    const uint8_t *in = data;
    uint64_t v0 = 0x736f6d6570736575ULL ^ k[0], v1 = 0x646f72616e646f6dULL ^ k[1];
    uint64_t v2 = 0x6c7967656e657261ULL ^ k[0], v3 = 0x7465646279746573ULL ^ k[1];
    uint64_t b = (uint64_t)len << 56, m;
    size_t i, end = len - (len % 8);

    for (i = 0; i < end; i += 8) {
        memcpy(&m, in + i, 8);
        v3 ^= m;
        SIPROUND;
        SIPROUND;
        v0 ^= m;
    }
    for (size_t j = 0; j < len % 8; j++)
        b |= (uint64_t)in[end + j] << (8 * j);
    v3 ^= b;
    SIPROUND;
    SIPROUND;
    v0 ^= b;
    v2 ^= 0xff;
    SIPROUND;
    SIPROUND;
    SIPROUND;
    SIPROUND;
    return v0 ^ v1 ^ v2 ^ v3;
}

/* ---- tables ---- */

struct th_ev {
    uint32_t t_ds;  /* time in deciseconds of the throttle clock */
    uint32_t other; /* fingerprint of the other dimension (user or address) */
    uint32_t pw;    /* password fingerprint */
};

struct th_entry {
    struct th_entry *hnext;
    struct th_entry *lprev, *lnext; /* LRU: head = most recent */
    uint8_t key[16];
    uint64_t blocked_until; /* ms; 0 = not blocked */
    uint8_t n, head;        /* events in the ring, index of the oldest */
    struct th_ev ev[];
};

struct th_table {
    struct th_entry **buckets;
    size_t mask;
    size_t count, allocated;
    struct th_entry *lru_head, *lru_tail;
};

struct px_throttle {
    struct px_throttle_conf conf;
    struct px_cidr *allow;
    unsigned ring; /* events kept per entry */
    size_t entry_size;
    uint64_t key[2];
    struct th_table tab[2]; /* 0 addresses, 1 users */
};

static unsigned ring_size(const struct px_throttle_conf *c)
{
    unsigned levels = 0;
    uint64_t d = c->delay_base_ms ? c->delay_base_ms : 1;
    while (d < c->delay_max_ms && levels < 40) {
        d *= 2;
        levels++;
    }
    unsigned need = c->block_after;
    if (c->delay_after && c->delay_after + levels > need) need = c->delay_after + levels;
    need += 1;
    if (need < 4) need = 4;
    if (need > 64) need = 64;
    return need;
}

static size_t pow2_at_least(size_t n)
{
    size_t p = 16;
    while (p < n)
        p *= 2;
    return p;
}

static void table_free(struct th_table *tb)
{
    struct th_entry *e = tb->lru_head;
    while (e) {
        struct th_entry *nx = e->lnext;
        free(e);
        e = nx;
    }
    free(tb->buckets);
    memset(tb, 0, sizeof(*tb));
}

static int table_init(struct th_table *tb, size_t max_entries)
{
    memset(tb, 0, sizeof(*tb));
    size_t nb = pow2_at_least(max_entries);
    tb->buckets = calloc(nb, sizeof(*tb->buckets));
    if (tb->buckets == NULL) return -1;
    tb->mask = nb - 1;
    return 0;
}

static size_t bucket_of(const struct px_throttle *t, const uint8_t key[16])
{
    return (size_t)siphash(t->key, key, 16);
}

static void lru_unlink(struct th_table *tb, struct th_entry *e)
{
    if (e->lprev)
        e->lprev->lnext = e->lnext;
    else
        tb->lru_head = e->lnext;
    if (e->lnext)
        e->lnext->lprev = e->lprev;
    else
        tb->lru_tail = e->lprev;
    e->lprev = e->lnext = NULL;
}

static void lru_push_front(struct th_table *tb, struct th_entry *e)
{
    e->lprev = NULL;
    e->lnext = tb->lru_head;
    if (tb->lru_head) tb->lru_head->lprev = e;
    tb->lru_head = e;
    if (tb->lru_tail == NULL) tb->lru_tail = e;
}

static void hash_unlink(const struct px_throttle *t, struct th_table *tb, struct th_entry *e)
{
    struct th_entry **pp = &tb->buckets[bucket_of(t, e->key) & tb->mask];
    while (*pp && *pp != e)
        pp = &(*pp)->hnext;
    if (*pp) *pp = e->hnext;
    e->hnext = NULL;
}

static struct th_entry *table_find(const struct px_throttle *t, struct th_table *tb,
                                   const uint8_t key[16])
{
    struct th_entry *e = tb->buckets[bucket_of(t, key) & tb->mask];
    while (e && memcmp(e->key, key, 16) != 0)
        e = e->hnext;
    if (e && tb->lru_head != e) {
        lru_unlink(tb, e);
        lru_push_front(tb, e);
    }
    return e;
}

/* Find or create (reusing the least recently used entry when full). */
static struct th_entry *table_get(struct px_throttle *t, struct th_table *tb, const uint8_t key[16],
                                  uint64_t now_ms)
{
    struct th_entry *e = table_find(t, tb, key);
    if (e) return e;
    if (tb->count >= t->conf.max_entries && tb->lru_tail) {
        /* entries under an active block get a few second chances */
        for (int tries = 0;
             tries < 4 && tb->lru_tail->blocked_until > now_ms && tb->lru_tail != tb->lru_head;
             tries++) {
            struct th_entry *x = tb->lru_tail;
            lru_unlink(tb, x);
            lru_push_front(tb, x);
        }
        e = tb->lru_tail;
        lru_unlink(tb, e);
        hash_unlink(t, tb, e);
        tb->count--;
    } else {
        e = malloc(t->entry_size);
        if (e == NULL) return NULL;
        tb->allocated++;
    }
    memset(e, 0, t->entry_size);
    memcpy(e->key, key, 16);
    size_t b = bucket_of(t, key) & tb->mask;
    e->hnext = tb->buckets[b];
    tb->buckets[b] = e;
    lru_push_front(tb, e);
    tb->count++;
    return e;
}

static void table_shrink(struct px_throttle *t, struct th_table *tb, size_t max)
{
    while (tb->count > max && tb->lru_tail) {
        struct th_entry *e = tb->lru_tail;
        lru_unlink(tb, e);
        hash_unlink(t, tb, e);
        tb->count--;
        tb->allocated--;
        free(e);
    }
}

static uint32_t ds_of(uint64_t ms)
{
    return (uint32_t)(ms / 100);
}

/* Drop events older than the window; returns the count left. */
static unsigned ring_prune(const struct px_throttle *t, struct th_entry *e, uint64_t now_ms)
{
    uint32_t now = ds_of(now_ms), win = (uint32_t)((t->conf.window_ms + 99) / 100);
    while (e->n > 0 && (uint32_t)(now - e->ev[e->head].t_ds) >= win) {
        e->head = (uint8_t)((e->head + 1) % t->ring);
        e->n--;
    }
    if (e->n == 0) e->head = 0;
    return e->n;
}

static int ring_has(const struct px_throttle *t, const struct th_entry *e, uint32_t other,
                    uint32_t pw)
{
    for (unsigned i = 0; i < e->n; i++) {
        const struct th_ev *v = &e->ev[(e->head + i) % t->ring];
        if (v->other == other && v->pw == pw) return 1;
    }
    return 0;
}

static void ring_add(const struct px_throttle *t, struct th_entry *e, uint64_t now_ms,
                     uint32_t other, uint32_t pw)
{
    if (e->n == t->ring) {
        e->head = (uint8_t)((e->head + 1) % t->ring);
        e->n--;
    }
    struct th_ev *v = &e->ev[(e->head + e->n) % t->ring];
    v->t_ds = ds_of(now_ms);
    v->other = other;
    v->pw = pw;
    e->n++;
}

static void ring_remove_other(const struct px_throttle *t, struct th_entry *e, uint32_t other)
{
    unsigned w = 0, n = e->n;
    struct th_ev tmp[64];
    for (unsigned i = 0; i < n; i++) {
        const struct th_ev *v = &e->ev[(e->head + i) % t->ring];
        if (v->other != other) tmp[w++] = *v;
    }
    memcpy(e->ev, tmp, w * sizeof(tmp[0]));
    e->head = 0;
    e->n = (uint8_t)w;
}

/* ---- keys ---- */

static void addr_key(const struct px_throttle *t, const struct px_addr *a, uint8_t key[16])
{
    struct px_addr m = *a;
    px_addr_mask(&m, t->conf.v4_prefix, t->conf.v6_prefix);
    memcpy(key, m.b, 16);
}

static uint64_t user_hash(const struct px_throttle *t, const char *user, size_t len)
{
    char low[256];
    if (len > sizeof(low)) len = sizeof(low);
    for (size_t i = 0; i < len; i++)
        low[i] = (char)tolower((unsigned char)user[i]);
    return siphash(t->key, low, len);
}

static void user_key(uint64_t h, uint8_t key[16])
{
    /* not a valid masked address: the first bytes of ::ffff:0:0/96 are 0,
     * and an IPv6 key with this tail is harmless anyway (separate tables) */
    memcpy(key, &h, 8);
    memset(key + 8, 0xa5, 8);
}

static uint32_t fp32(const struct px_throttle *t, const void *d, size_t len, uint64_t tweak)
{
    uint64_t k[2] = {t->key[0] ^ tweak, t->key[1]};
    uint64_t h = siphash(k, d, len);
    return (uint32_t)(h ^ (h >> 32));
}

/* ---- public ---- */

static int conf_copy(struct px_throttle *t, const struct px_throttle_conf *c)
{
    struct px_cidr *allow = NULL;
    if (c->n_allow) {
        allow = malloc(c->n_allow * sizeof(*allow));
        if (allow == NULL) return -1;
        memcpy(allow, c->allow, c->n_allow * sizeof(*allow));
    }
    free(t->allow);
    t->allow = allow;
    t->conf = *c;
    t->conf.allow = allow;
    if (t->conf.max_entries < 16) t->conf.max_entries = 16;
    if (t->conf.v4_prefix == 0 || t->conf.v4_prefix > 32) t->conf.v4_prefix = 32;
    if (t->conf.v6_prefix == 0 || t->conf.v6_prefix > 128) t->conf.v6_prefix = 64;
    if (t->conf.window_ms < 100) t->conf.window_ms = 100;
    return 0;
}

struct px_throttle *px_throttle_new(const struct px_throttle_conf *conf)
{
    struct px_throttle *t = calloc(1, sizeof(*t));
    if (t == NULL) return NULL;
    if (conf_copy(t, conf) < 0) goto fail;
    if (RAND_bytes((unsigned char *)t->key, sizeof(t->key)) != 1) goto fail;
    t->ring = ring_size(&t->conf);
    t->entry_size = sizeof(struct th_entry) + t->ring * sizeof(struct th_ev);
    if (table_init(&t->tab[0], t->conf.max_entries) < 0) goto fail;
    if (table_init(&t->tab[1], t->conf.max_entries) < 0) goto fail;
    return t;
fail:
    px_throttle_free(&t);
    return NULL;
}

void px_throttle_free(struct px_throttle **tp)
{
    if (tp == NULL || *tp == NULL) return;
    struct px_throttle *t = *tp;
    table_free(&t->tab[0]);
    table_free(&t->tab[1]);
    free(t->allow);
    free(t);
    *tp = NULL;
}

int px_throttle_set_conf(struct px_throttle *t, const struct px_throttle_conf *conf)
{
    size_t old_max = t->conf.max_entries;
    unsigned old_ring = t->ring;
    uint64_t old_v4 = t->conf.v4_prefix, old_v6 = t->conf.v6_prefix;
    if (conf_copy(t, conf) < 0) return -1;
    unsigned ring = ring_size(&t->conf);
    int rebuild = ring != old_ring || t->conf.max_entries != old_max ||
                  t->conf.v4_prefix != old_v4 || t->conf.v6_prefix != old_v6;
    if (!rebuild) return 0;
    if (ring == old_ring && t->conf.v4_prefix == old_v4 && t->conf.v6_prefix == old_v6 &&
        t->conf.max_entries < old_max) {
        for (int i = 0; i < 2; i++) {
            struct th_table *tb = &t->tab[i];
            size_t nb = pow2_at_least(t->conf.max_entries);
            struct th_entry **b = calloc(nb, sizeof(*b));
            if (b == NULL) return -1;
            table_shrink(t, tb, t->conf.max_entries);
            free(tb->buckets);
            tb->buckets = b;
            tb->mask = nb - 1;
            for (struct th_entry *e = tb->lru_head; e; e = e->lnext) {
                size_t k = bucket_of(t, e->key) & tb->mask;
                e->hnext = b[k];
                b[k] = e;
            }
        }
        return 0;
    }
    /* different entry layout, keys or bucket count: start from empty tables */
    struct th_table n0, n1;
    if (table_init(&n0, t->conf.max_entries) < 0) return -1;
    if (table_init(&n1, t->conf.max_entries) < 0) {
        free(n0.buckets);
        return -1;
    }
    table_free(&t->tab[0]);
    table_free(&t->tab[1]);
    t->tab[0] = n0;
    t->tab[1] = n1;
    t->ring = ring;
    t->entry_size = sizeof(struct th_entry) + t->ring * sizeof(struct th_ev);
    return 0;
}

int px_throttle_exempt(const struct px_throttle *t, const struct px_addr *a)
{
    return px_cidr_list_match(t->allow, t->conf.n_allow, a);
}

uint64_t px_throttle_blocked(struct px_throttle *t, const struct px_addr *a, uint64_t now_ms)
{
    uint8_t key[16];
    if (t->conf.block_after == 0 || px_throttle_exempt(t, a)) return 0;
    addr_key(t, a, key);
    struct th_entry *e = table_find(t, &t->tab[0], key);
    if (e == NULL || e->blocked_until <= now_ms) return 0;
    return e->blocked_until - now_ms;
}

static uint64_t delay_for(const struct px_throttle_conf *c, unsigned n)
{
    if (c->delay_after == 0 || n < c->delay_after) return 0;
    uint64_t d = c->delay_base_ms;
    for (unsigned i = c->delay_after; i < n && d < c->delay_max_ms; i++)
        d *= 2;
    return d > c->delay_max_ms ? c->delay_max_ms : d;
}

void px_throttle_fail(struct px_throttle *t, const struct px_addr *a, const char *user,
                      size_t user_len, const void *pw, size_t pw_len, uint64_t now_ms,
                      struct px_verdict *v)
{
    uint8_t akey[16], ukey[16];
    memset(v, 0, sizeof(*v));
    if (px_throttle_exempt(t, a)) {
        v->exempt = 1;
        return;
    }
    addr_key(t, a, akey);
    uint64_t uh = user_hash(t, user, user_len);
    user_key(uh, ukey);
    uint32_t afp = fp32(t, akey, 16, 0x61), ufp = (uint32_t)(uh ^ (uh >> 32));
    uint32_t pfp = fp32(t, pw, pw_len, 0x70 ^ uh);

    struct th_entry *ea = table_get(t, &t->tab[0], akey, now_ms);
    struct th_entry *eu = table_get(t, &t->tab[1], ukey, now_ms);
    unsigned na = ea ? ring_prune(t, ea, now_ms) : 0;
    unsigned nu = eu ? ring_prune(t, eu, now_ms) : 0;
    v->repeated = (ea && ring_has(t, ea, ufp, pfp)) || (eu && ring_has(t, eu, afp, pfp));
    if (!v->repeated) {
        if (ea) ring_add(t, ea, now_ms, ufp, pfp), na = ea->n;
        if (eu) ring_add(t, eu, now_ms, afp, pfp), nu = eu->n;
        v->counted = 1;
    }
    v->addr_failures = na;
    v->user_failures = nu;
    v->delay_ms = delay_for(&t->conf, na > nu ? na : nu);
    if (ea && v->counted && t->conf.block_after && na >= t->conf.block_after &&
        ea->blocked_until <= now_ms) {
        ea->blocked_until = now_ms + t->conf.block_ms;
        v->blocked = 1;
    }
}

void px_throttle_success(struct px_throttle *t, const struct px_addr *a, const char *user,
                         size_t user_len, uint64_t now_ms)
{
    uint8_t akey[16], ukey[16];
    (void)now_ms;
    if (px_throttle_exempt(t, a)) return;
    addr_key(t, a, akey);
    uint64_t uh = user_hash(t, user, user_len);
    user_key(uh, ukey);
    uint32_t afp = fp32(t, akey, 16, 0x61), ufp = (uint32_t)(uh ^ (uh >> 32));
    struct th_entry *ea = table_find(t, &t->tab[0], akey);
    struct th_entry *eu = table_find(t, &t->tab[1], ukey);
    if (ea) ring_remove_other(t, ea, ufp);
    if (eu) ring_remove_other(t, eu, afp);
}

size_t px_throttle_entries(const struct px_throttle *t, int which)
{
    return t->tab[which ? 1 : 0].count;
}

size_t px_throttle_memory(const struct px_throttle *t)
{
    size_t m = sizeof(*t);
    for (int i = 0; i < 2; i++)
        m += t->tab[i].allocated * t->entry_size + (t->tab[i].mask + 1) * sizeof(void *);
    return m;
}

size_t px_throttle_memory_bound(const struct px_throttle_conf *conf)
{
    size_t max = conf->max_entries < 16 ? 16 : conf->max_entries;
    size_t es = sizeof(struct th_entry) + ring_size(conf) * sizeof(struct th_ev);
    return sizeof(struct px_throttle) + 2 * (max * es + pow2_at_least(max) * sizeof(void *));
}

/* ---- connection counts ---- */

struct cc_entry {
    struct cc_entry *next;
    struct px_addr a;
    unsigned count;
};

struct px_conncount {
    struct cc_entry **b;
    size_t mask;
    uint64_t key[2];
};

struct px_conncount *px_conncount_new(size_t expected)
{
    struct px_conncount *m = calloc(1, sizeof(*m));
    if (m == NULL) return NULL;
    size_t nb = pow2_at_least(expected < 64 ? 64 : expected);
    m->b = calloc(nb, sizeof(*m->b));
    if (m->b == NULL || RAND_bytes((unsigned char *)m->key, sizeof(m->key)) != 1) {
        free(m->b);
        free(m);
        return NULL;
    }
    m->mask = nb - 1;
    return m;
}

void px_conncount_free(struct px_conncount **mp)
{
    if (mp == NULL || *mp == NULL) return;
    struct px_conncount *m = *mp;
    for (size_t i = 0; i <= m->mask; i++) {
        struct cc_entry *e = m->b[i];
        while (e) {
            struct cc_entry *nx = e->next;
            free(e);
            e = nx;
        }
    }
    free(m->b);
    free(m);
    *mp = NULL;
}

static struct cc_entry **cc_slot(const struct px_conncount *m, const struct px_addr *a)
{
    struct cc_entry **pp = &m->b[siphash(m->key, a->b, 16) & m->mask];
    while (*pp && memcmp((*pp)->a.b, a->b, 16) != 0)
        pp = &(*pp)->next;
    return pp;
}

unsigned px_conncount_inc(struct px_conncount *m, const struct px_addr *a)
{
    struct cc_entry **pp = cc_slot(m, a);
    if (*pp == NULL) {
        struct cc_entry *e = calloc(1, sizeof(*e));
        if (e == NULL) return 0;
        e->a = *a;
        *pp = e;
    }
    return ++(*pp)->count;
}

void px_conncount_dec(struct px_conncount *m, const struct px_addr *a)
{
    struct cc_entry **pp = cc_slot(m, a);
    if (*pp == NULL) return;
    if (--(*pp)->count == 0) {
        struct cc_entry *e = *pp;
        *pp = e->next;
        free(e);
    }
}

unsigned px_conncount_get(const struct px_conncount *m, const struct px_addr *a)
{
    struct cc_entry **pp = cc_slot(m, a);
    return *pp ? (*pp)->count : 0;
}
