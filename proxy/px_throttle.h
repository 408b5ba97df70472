/* px_throttle: bad-guy throttling and per-address connection counts for
 * coffer-mmp. Pure data structures driven by the caller's clock (now_ms),
 * loop thread only.
 *
 * Failed logins are counted in two bounded tables, one keyed by client
 * address (IPv4 by v4_prefix bits, IPv6 by v6_prefix bits) and one by user
 * name (a keyed 64-bit hash of the lower-cased name; names are not kept).
 * Each entry keeps the last few failures (time, the other key's
 * fingerprint, the password's fingerprint) and counts those inside
 * `window_ms` (a sliding window).
 *  - delay: a failure reply is delayed when either count reached
 *    delay_after: delay_base_ms, doubling with each further failure, at
 *    most delay_max_ms. Successful logins are never delayed.
 *  - block: when an address's count reaches block_after, the address is
 *    refused for block_ms (px_throttle_blocked). Users are never blocked
 *    (that would let anyone lock a user out); their count only delays.
 *  - a failure with the same user and password as one already counted in
 *    the window (a client retrying a stale saved password) is not counted
 *    again.
 *  - a success of user U from address A removes only the failures that
 *    pair (U, A) contributed, in both tables: others' failures stay.
 *  - addresses in the allow list are never counted, delayed or blocked.
 * Both tables hold at most max_entries entries each; the least recently
 * used entry is reused when full (an entry under an active block gets a
 * few second chances first), so memory stays bounded whatever arrives.
 */
#ifndef PX_THROTTLE_H
#define PX_THROTTLE_H

#include <stddef.h>
#include <stdint.h>

struct px_addr {
    uint8_t b[16]; /* IPv6, or IPv4 mapped as ::ffff:a.b.c.d */
};

struct px_cidr {
    struct px_addr net;
    unsigned bits; /* prefix length over the 128-bit form */
};

/* Parse "192.0.2.1" / "2001:db8::1" (also "[v6]"). Returns 0 or -1. */
int px_addr_parse(const char *text, struct px_addr *a);
/* 1 when a is an IPv4 (mapped) address. */
int px_addr_is_v4(const struct px_addr *a);
/* Parse "10.0.0.0/8", "2001:db8::/32" or a bare address. Returns 0 or -1. */
int px_cidr_parse(const char *text, struct px_cidr *c);
int px_cidr_match(const struct px_cidr *c, const struct px_addr *a);
/* Parse a list of CIDRs separated by spaces and/or commas into a new array
 * (*out_r, caller frees). Returns the count, or -1 with the bad word copied
 * to bad (badlen bytes). An empty list gives 0 and *out_r = NULL. */
long px_cidr_list_parse(const char *text, struct px_cidr **out_r, char *bad, size_t badlen);
int px_cidr_list_match(const struct px_cidr *list, size_t n, const struct px_addr *a);

struct px_throttle_conf {
    uint64_t window_ms;          /* sliding window for failure counts */
    unsigned delay_after;        /* failures before replies are delayed (0 = never) */
    uint64_t delay_base_ms;      /* first delay */
    uint64_t delay_max_ms;       /* cap */
    unsigned block_after;        /* address failures before it is refused (0 = never) */
    uint64_t block_ms;           /* penalty period */
    unsigned v4_prefix;          /* 1..32 */
    unsigned v6_prefix;          /* 1..128 */
    size_t max_entries;          /* per table (>= 16) */
    const struct px_cidr *allow; /* copied */
    size_t n_allow;
};

struct px_verdict {
    uint64_t delay_ms;      /* delay the failure reply by this much */
    unsigned addr_failures; /* in the window, after this failure */
    unsigned user_failures;
    int counted;  /* 0: exempt or a repeat of the same password */
    int repeated; /* same user + password already counted */
    int exempt;   /* address in the allow list */
    int blocked;  /* this failure started the address's penalty */
};

struct px_throttle;

/* New tables (empty). The hash key is random per instance. NULL on error. */
struct px_throttle *px_throttle_new(const struct px_throttle_conf *conf);
void px_throttle_free(struct px_throttle **t);
/* Replace the configuration (reload). Entries are kept; when max_entries
 * shrank, the least recently used ones go at once. Returns 0 or -1. */
int px_throttle_set_conf(struct px_throttle *t, const struct px_throttle_conf *conf);

int px_throttle_exempt(const struct px_throttle *t, const struct px_addr *a);
/* 0 when the address may connect; otherwise the milliseconds left in its
 * penalty. */
uint64_t px_throttle_blocked(struct px_throttle *t, const struct px_addr *a, uint64_t now_ms);
/* Record a failed login of `user` from `a` with password pw (only a keyed
 * fingerprint is kept) and fill v. */
void px_throttle_fail(struct px_throttle *t, const struct px_addr *a, const char *user,
                      size_t user_len, const void *pw, size_t pw_len, uint64_t now_ms,
                      struct px_verdict *v);
/* A successful login: drop the failures of this (user, address) pair. */
void px_throttle_success(struct px_throttle *t, const struct px_addr *a, const char *user,
                         size_t user_len, uint64_t now_ms);

/* Introspection for tests and status lines. which: 0 = addresses, 1 = users. */
size_t px_throttle_entries(const struct px_throttle *t, int which);
/* Bytes allocated by the tables (entries + bucket arrays). */
size_t px_throttle_memory(const struct px_throttle *t);
/* Upper bound of px_throttle_memory() for a configuration. */
size_t px_throttle_memory_bound(const struct px_throttle_conf *conf);

/* Live connections per address (exact address for IPv4, v6_prefix for
 * IPv6, as the throttle tables). Entries exist only while the count is
 * above zero, so the map is bounded by the total connection limit. */
struct px_conncount;
struct px_conncount *px_conncount_new(size_t expected);
void px_conncount_free(struct px_conncount **m);
/* Increment; returns the new count (0 on out of memory). */
unsigned px_conncount_inc(struct px_conncount *m, const struct px_addr *a);
void px_conncount_dec(struct px_conncount *m, const struct px_addr *a);
unsigned px_conncount_get(const struct px_conncount *m, const struct px_addr *a);
/* Mask an address to the prefix used for counting (v4 bits, v6 bits). */
void px_addr_mask(struct px_addr *a, unsigned v4_prefix, unsigned v6_prefix);

#endif
