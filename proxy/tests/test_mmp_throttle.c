/* CUnit tests of coffer-mmp's throttle tables (proxy/px_throttle.c),
 * driven through the module's API with a fake clock. */
#include <CUnit/Basic.h>
#include <stdio.h>
#include <string.h>

#include "px_throttle.h"

static struct px_throttle_conf conf(void)
{
    struct px_throttle_conf c = {
        .window_ms = 60000,
        .delay_after = 3,
        .delay_base_ms = 1000,
        .delay_max_ms = 8000,
        .block_after = 6,
        .block_ms = 30000,
        .v4_prefix = 32,
        .v6_prefix = 64,
        .max_entries = 1024,
    };
    return c;
}

static struct px_addr A(const char *s) {
    struct px_addr a;
    CU_ASSERT_EQUAL(px_addr_parse(s, &a), 0);
    return a;
}

static void
fail(struct px_throttle *t, const char *addr, const char *user, const char *pw, uint64_t now,
     struct px_verdict *v)
{
    struct px_addr a = A(addr);
    px_throttle_fail(t, &a, user, strlen(user), pw, strlen(pw), now, v);
}

static void test_delay_grows_then_block(void)
{
    struct px_throttle_conf c = conf();
    struct px_throttle *t = px_throttle_new(&c);
    struct px_verdict v;
    uint64_t expect[] = {0, 0, 1000, 2000, 4000, 8000};
    char pw[16];
    for (int i = 0; i < 6; i++) {
        snprintf(pw, sizeof(pw), "guess%d", i);
        fail(t, "192.0.2.1", "alice", pw, 1000 + (uint64_t)i * 10, &v);
        CU_ASSERT_EQUAL(v.delay_ms, expect[i]);
        CU_ASSERT_EQUAL(v.addr_failures, (unsigned)i + 1);
        CU_ASSERT_EQUAL(v.blocked, i == 5);
    }
    struct px_addr a = A("192.0.2.1"), b = A("192.0.2.2");
    CU_ASSERT(px_throttle_blocked(t, &a, 2000) > 0);
    CU_ASSERT_EQUAL(px_throttle_blocked(t, &b, 2000), 0);
    /* after the penalty the address is served again */
    CU_ASSERT_EQUAL(px_throttle_blocked(t, &a, 1050 + 30000 + 1), 0);
    /* outside the window nothing is counted any more */
    fail(t, "192.0.2.1", "alice", "late", 1050 + 70000, &v);
    CU_ASSERT_EQUAL(v.addr_failures, 1);
    CU_ASSERT_EQUAL(v.delay_ms, 0);
    px_throttle_free(&t);
}

static void test_same_password_not_escalating(void)
{
    struct px_throttle_conf c = conf();
    struct px_throttle *t = px_throttle_new(&c);
    struct px_verdict v;
    for (int i = 0; i < 20; i++) {
        fail(t, "198.51.100.7", "bob", "old-saved-password", 1000 + (uint64_t)i, &v);
        CU_ASSERT_EQUAL(v.addr_failures, 1);
        CU_ASSERT_EQUAL(v.counted, i == 0);
        CU_ASSERT_EQUAL(v.repeated, i != 0);
        CU_ASSERT_EQUAL(v.blocked, 0);
    }
    px_throttle_free(&t);
}

static void test_success_keeps_others_counts(void)
{
    struct px_throttle_conf c = conf();
    struct px_throttle *t = px_throttle_new(&c);
    struct px_verdict v;
    char pw[16];
    for (int i = 0; i < 4; i++) {
        snprintf(pw, sizeof(pw), "x%d", i);
        fail(t, "203.0.113.9", "carol", pw, 1000, &v);
    }
    CU_ASSERT_EQUAL(v.user_failures, 4);
    /* carol logs in from elsewhere: the attacker's failures stay */
    struct px_addr home = A("192.0.2.50");
    px_throttle_success(t, &home, "carol", 5, 1100);
    fail(t, "192.0.2.50", "carol", "typo", 1200, &v);
    CU_ASSERT_EQUAL(v.user_failures, 5);
    CU_ASSERT_EQUAL(v.addr_failures, 1);
    /* home's success removes only home's own failure */
    px_throttle_success(t, &home, "CAROL", 5, 1300);
    fail(t, "203.0.113.9", "carol", "x9", 1400, &v);
    CU_ASSERT_EQUAL(v.user_failures, 5);
    CU_ASSERT_EQUAL(v.addr_failures, 5);
    px_throttle_free(&t);
}

static void test_ipv6_prefix_and_allow(void)
{
    struct px_throttle_conf c = conf();
    struct px_cidr allow;
    CU_ASSERT_EQUAL(px_cidr_parse("10.0.0.0/8", &allow), 0);
    c.allow = &allow;
    c.n_allow = 1;
    struct px_throttle *t = px_throttle_new(&c);
    struct px_verdict v;
    char addr[64], pw[16];
    for (int i = 0; i < 6; i++) {
        snprintf(addr, sizeof(addr), "2001:db8:1:2::%x", i + 1);
        snprintf(pw, sizeof(pw), "p%d", i);
        fail(t, addr, "dave", pw, 1000, &v);
    }
    CU_ASSERT_EQUAL(v.addr_failures, 6); /* one /64 */
    CU_ASSERT_EQUAL(v.blocked, 1);
    struct px_addr other = A("2001:db8:1:3::1"), same = A("2001:db8:1:2::ffff");
    CU_ASSERT_EQUAL(px_throttle_blocked(t, &other, 1001), 0);
    CU_ASSERT(px_throttle_blocked(t, &same, 1001) > 0);
    for (int i = 0; i < 10; i++) {
        snprintf(pw, sizeof(pw), "q%d", i);
        fail(t, "10.1.2.3", "erin", pw, 1000, &v);
        CU_ASSERT_EQUAL(v.exempt, 1);
        CU_ASSERT_EQUAL(v.delay_ms, 0);
    }
    struct px_addr in = A("10.1.2.3");
    CU_ASSERT_EQUAL(px_throttle_blocked(t, &in, 1001), 0);
    struct px_cidr bad;
    CU_ASSERT_EQUAL(px_cidr_parse("10.0.0.0/33", &bad), -1);
    CU_ASSERT_EQUAL(px_cidr_parse("nonsense", &bad), -1);
    px_throttle_free(&t);
}

static void test_flood_bounded(void)
{
    struct px_throttle_conf c = conf();
    c.max_entries = 4096;
    struct px_throttle *t = px_throttle_new(&c);
    struct px_verdict v;
    size_t bound = px_throttle_memory_bound(&c);
    /* an address that is blocked and then flooded around */
    char pw[16];
    for (int i = 0; i < 6; i++) {
        snprintf(pw, sizeof(pw), "b%d", i);
        fail(t, "192.0.2.200", "victim", pw, 500, &v);
    }
    CU_ASSERT_EQUAL(v.blocked, 1);
    char addr[64], user[32];
    for (unsigned i = 0; i < 100000; i++) {
        snprintf(addr, sizeof(addr), "10.%u.%u.%u", (i >> 16) & 255, (i >> 8) & 255, i & 255);
        snprintf(user, sizeof(user), "u%u", i);
        fail(t, addr, user, "pw", 1000 + i / 100, &v);
        if (i % 10000 == 0) CU_ASSERT(px_throttle_memory(t) <= bound);
    }
    CU_ASSERT_EQUAL(px_throttle_entries(t, 0), 4096);
    CU_ASSERT_EQUAL(px_throttle_entries(t, 1), 4096);
    CU_ASSERT(px_throttle_memory(t) <= bound);
    printf("\n  100000 identities: %zu + %zu entries, %zu bytes (bound %zu)\n",
           px_throttle_entries(t, 0), px_throttle_entries(t, 1), px_throttle_memory(t), bound);
    /* shrinking on reload frees at once */
    c.max_entries = 100;
    CU_ASSERT_EQUAL(px_throttle_set_conf(t, &c), 0);
    CU_ASSERT_EQUAL(px_throttle_entries(t, 0), 100);
    CU_ASSERT(px_throttle_memory(t) <= px_throttle_memory_bound(&c));
    px_throttle_free(&t);
}

static void test_conncount(void)
{
    struct px_conncount *m = px_conncount_new(16);
    struct px_addr a = A("192.0.2.1"), b = A("192.0.2.2");
    CU_ASSERT_EQUAL(px_conncount_inc(m, &a), 1);
    CU_ASSERT_EQUAL(px_conncount_inc(m, &a), 2);
    CU_ASSERT_EQUAL(px_conncount_inc(m, &b), 1);
    px_conncount_dec(m, &a);
    CU_ASSERT_EQUAL(px_conncount_get(m, &a), 1);
    px_conncount_dec(m, &a);
    CU_ASSERT_EQUAL(px_conncount_get(m, &a), 0);
    px_conncount_free(&m);
    CU_ASSERT_PTR_NULL(m);
}

int main(void)
{
    if (CU_initialize_registry() != CUE_SUCCESS) return 1;
    CU_pSuite s = CU_add_suite("mmp_throttle", NULL, NULL);
    CU_add_test(s, "delays grow to the cap, then the address is blocked",
                test_delay_grows_then_block);
    CU_add_test(s, "the same wrong password does not escalate", test_same_password_not_escalating);
    CU_add_test(s, "a success keeps others' failures", test_success_keeps_others_counts);
    CU_add_test(s, "IPv6 by prefix; allow list exempt", test_ipv6_prefix_and_allow);
    CU_add_test(s, "100,000 identities: tables stay bounded", test_flood_bounded);
    CU_add_test(s, "connection counts", test_conncount);
    CU_basic_set_mode(CU_BRM_VERBOSE);
    CU_basic_run_tests();
    unsigned f = CU_get_number_of_failures();
    CU_cleanup_registry();
    return f != 0;
}
