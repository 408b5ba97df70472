/* Unit tests for auth_plain_decode (storenode/auth.h): SASL PLAIN
 * responses, authzid rules, bounds and malformed base64. */
#include <CUnit/Basic.h>
#include <openssl/evp.h>
#include <stdlib.h>
#include <string.h>

#include "auth.h"

static int decode(const char *b64, char **u, char **p, size_t *pl)
{
    return auth_plain_decode(b64, strlen(b64), u, p, pl);
}

static void expect_ok(const char *b64, const char *user, const char *pass, size_t pass_len)
{
    char *u = NULL, *p = NULL;
    size_t pl = 0;
    CU_ASSERT_EQUAL_FATAL(decode(b64, &u, &p, &pl), 0);
    CU_ASSERT_PTR_NOT_NULL_FATAL(u);
    CU_ASSERT_PTR_NOT_NULL_FATAL(p);
    CU_ASSERT_STRING_EQUAL(u, user);
    CU_ASSERT_EQUAL(pl, pass_len);
    CU_ASSERT_EQUAL(memcmp(p, pass, pass_len), 0);
    CU_ASSERT_EQUAL(p[pl], '\0');
    free(u);
    free(p);
}

static void expect_fail(const char *b64)
{
    char *u = (char *)1, *p = (char *)1;
    size_t pl = 99;
    CU_ASSERT_EQUAL(decode(b64, &u, &p, &pl), -1);
    CU_ASSERT_PTR_NULL(u);
    CU_ASSERT_PTR_NULL(p);
}

/* base64 of raw bytes into a malloc()ed string */
static char *b64_of(const unsigned char *raw, size_t len)
{
    char *out = malloc(4 * ((len + 2) / 3) + 1);
    EVP_EncodeBlock((unsigned char *)out, raw, (int)len);
    return out;
}

static void test_valid(void)
{
    expect_ok("AGJvYgBzZWNyZXQ=", "bob", "secret", 6);        /* \0bob\0secret */
    expect_ok("Ym9iAGJvYgBzZWNyZXQ=", "bob", "secret", 6);    /* bob\0bob\0secret */
    expect_ok("Qk9CAGJvYgBwdw==", "bob", "pw", 2);            /* BOB\0bob\0pw: same user */
    expect_ok("AGJvYgBwYXNzIHdvcmQ=", "bob", "pass word", 9); /* spaces kept */
}

static void test_refused(void)
{
    expect_fail("YWxpY2UAYm9iAHNlY3JldA=="); /* authzid alice != authcid bob */
    expect_fail("AGJvYgA=");                 /* empty password */
    expect_fail("AABwdw==");                 /* empty authcid */
    expect_fail("AGJvYg==");                 /* only one NUL */
    expect_fail("AGJvYgBwdwB4");             /* NUL inside the password */
    expect_fail("AGIBYgBwdw==");             /* control character in the user */
    expect_fail("");                         /* empty */
    expect_fail("=");
    expect_fail("AGJvYgBzZWNyZXQ");      /* not a multiple of 4 */
    expect_fail("AGJvYgBz ZWNyZXQ=");    /* space */
    expect_fail("AGJvYgBzZWNy*XQ=");     /* bad character */
    expect_fail("AG=vYgBzZWNyZXQ=");     /* padding in the middle */
    expect_fail("AGJvYgBzZWNyZX=Q");     /* data after padding */
    expect_fail("AGJvYgBzZWNyZXQ=AAAA"); /* group after padding */
    expect_fail("A===");
}

static void test_bounds(void)
{
    unsigned char raw[4096];
    char *b;
    /* password of 1024 bytes accepted, 1025 refused */
    memcpy(raw, "\0bob\0", 5);
    memset(raw + 5, 'p', 1025);
    b = b64_of(raw, 5 + 1024);
    {
        char *u = NULL, *p = NULL;
        size_t pl = 0;
        CU_ASSERT_EQUAL(decode(b, &u, &p, &pl), 0);
        CU_ASSERT_EQUAL(pl, 1024);
        free(u);
        free(p);
    }
    free(b);
    b = b64_of(raw, 5 + 1025);
    expect_fail(b);
    free(b);
    /* username of 255 bytes accepted, 256 refused */
    raw[0] = '\0';
    memset(raw + 1, 'u', 256);
    raw[256] = '\0';
    memcpy(raw + 257, "pw", 2);
    b = b64_of(raw, 259);
    {
        char *u = NULL, *p = NULL;
        size_t pl = 0;
        CU_ASSERT_EQUAL(decode(b, &u, &p, &pl), 0);
        CU_ASSERT_EQUAL(u ? strlen(u) : 0, 255);
        free(u);
        free(p);
    }
    free(b);
    raw[256] = 'u';
    raw[257] = '\0';
    memcpy(raw + 258, "pw", 2);
    b = b64_of(raw, 260);
    expect_fail(b);
    free(b);
    /* input longer than the base64 bound */
    char *longb = malloc(8192 + 1);
    memset(longb, 'A', 8192);
    longb[8192] = '\0';
    expect_fail(longb);
    free(longb);
}

int main(void)
{
    CU_pSuite s;
    if (CU_initialize_registry() != CUE_SUCCESS) return 1;
    s = CU_add_suite("auth", NULL, NULL);
    CU_add_test(s, "valid PLAIN responses", test_valid);
    CU_add_test(s, "refused PLAIN responses", test_refused);
    CU_add_test(s, "bounds", test_bounds);
    CU_basic_set_mode(CU_BRM_VERBOSE);
    CU_basic_run_tests();
    unsigned failures = CU_get_number_of_failures();
    CU_cleanup_registry();
    return failures != 0;
}
