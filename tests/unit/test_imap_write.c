/* Unit tests for storenode/imap_write.c (date-time, dates, flag lists) and
 * imap_mailbox_name() from storenode/imap_mailbox.c. */
#include <CUnit/Basic.h>
#include <stdlib.h>
#include <string.h>

#include "imap_internal.h"
#include "sconf.h"

/* ---- date-time ---- */

static void test_datetime_parse(void)
{
    int64_t utc = 0;
    int tz = 0;
    CU_ASSERT_EQUAL(imap_parse_datetime("17-Jul-1996 02:44:25 -0700", 26, &utc, &tz), 0);
    CU_ASSERT_EQUAL(utc, 837596665);
    CU_ASSERT_EQUAL(tz, -420);
    CU_ASSERT_EQUAL(imap_parse_datetime(" 1-Jan-2024 00:00:00 +0000", 26, &utc, &tz), 0);
    CU_ASSERT_EQUAL(utc, 1704067200);
    CU_ASSERT_EQUAL(tz, 0);
    CU_ASSERT_EQUAL(imap_parse_datetime("01-jan-2024 01:30:00 +0130", 26, &utc, &tz), 0);
    CU_ASSERT_EQUAL(utc, 1704067200);
    CU_ASSERT_EQUAL(tz, 90);
    /* single-digit day (lenient) */
    CU_ASSERT_EQUAL(imap_parse_datetime("1-Jan-2024 00:00:00 +0000", 25, &utc, &tz), 0);
    CU_ASSERT_EQUAL(utc, 1704067200);
    CU_ASSERT_EQUAL(imap_parse_datetime("29-Feb-2024 12:00:00 +0000", 26, &utc, &tz), 0);
}

static void test_datetime_invalid(void)
{
    static const char *const bad[] = {
        "",
        "32-Jan-2024 00:00:00 +0000",
        "29-Feb-2023 00:00:00 +0000",
        "00-Jan-2024 00:00:00 +0000",
        "01-Foo-2024 00:00:00 +0000",
        "01-Jan-2024 24:00:00 +0000",
        "01-Jan-2024 00:60:00 +0000",
        "01-Jan-2024 00:00:00 0000",
        "01-Jan-2024 00:00:00 +00",
        "01-Jan-2024 00:00:00 +0000 ",
        "01-Jan-2024 00:00:00 +0060",
        "01-Jan-24 00:00:00 +0000",
        "01-Jan-2024  00:00:00 +0000",
        "01/Jan/2024 00:00:00 +0000",
        "01-Jan-2024 0:00:00 +0000",
        "01-Jan-2024T00:00:00 +0000",
        "Mon, 1 Jan 2024 00:00:00 +0000",
    };
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        int64_t utc = 0;
        int tz = 0;
        int rc = imap_parse_datetime(bad[i], strlen(bad[i]), &utc, &tz);
        if (rc != -1) fprintf(stderr, "accepted bad date-time: \"%s\"\n", bad[i]);
        CU_ASSERT_EQUAL(rc, -1);
    }
    /* length is respected (no reading past len) */
    int64_t utc;
    int tz;
    CU_ASSERT_EQUAL(imap_parse_datetime("01-Jan-2024 00:00:00 +0000", 20, &utc, &tz), -1);
}

static void test_datetime_format(void)
{
    char out[32];
    imap_format_datetime(1704067200, 0, out);
    CU_ASSERT_STRING_EQUAL(out, "01-Jan-2024 00:00:00 +0000");
    imap_format_datetime(837596665, -420, out);
    CU_ASSERT_STRING_EQUAL(out, "17-Jul-1996 02:44:25 -0700");
    imap_format_datetime(1704067200, 330, out);
    CU_ASSERT_STRING_EQUAL(out, "01-Jan-2024 05:30:00 +0530");
    imap_format_datetime(0, 0, out);
    CU_ASSERT_STRING_EQUAL(out, "01-Jan-1970 00:00:00 +0000");
    imap_format_datetime(-1, 0, out);
    CU_ASSERT_STRING_EQUAL(out, "31-Dec-1969 23:59:59 +0000");
    /* out of range years are clamped to the epoch, never more than 4 digits */
    imap_format_datetime(INT64_MAX / 2, 0, out);
    CU_ASSERT_EQUAL(strlen(out), 26);
}

static void test_datetime_roundtrip(void)
{
    static const int64_t times[] = {0,          1,          86399,      951782400,
                                    1709208000, 2147483647, 4102444800, 253402300799LL};
    static const int zones[] = {0, 60, -60, 330, -570, 845, -1439, 1439};
    for (size_t i = 0; i < sizeof(times) / sizeof(times[0]); i++) {
        for (size_t k = 0; k < sizeof(zones) / sizeof(zones[0]); k++) {
            char out[32];
            int64_t utc = -1;
            int tz = 9999;
            if (times[i] + zones[k] * 60 > 253402300799LL) continue;
            imap_format_datetime(times[i], zones[k], out);
            CU_ASSERT_EQUAL(strlen(out), 26);
            CU_ASSERT_EQUAL(imap_parse_datetime(out, strlen(out), &utc, &tz), 0);
            CU_ASSERT_EQUAL(utc, times[i]);
            CU_ASSERT_EQUAL(tz, zones[k]);
        }
    }
}

static void test_date_parse(void)
{
    int64_t d = 99;
    CU_ASSERT_EQUAL(imap_parse_date("1-Jan-1970", 10, &d), 0);
    CU_ASSERT_EQUAL(d, 0);
    CU_ASSERT_EQUAL(imap_parse_date("02-Jan-1970", 11, &d), 0);
    CU_ASSERT_EQUAL(d, 1);
    CU_ASSERT_EQUAL(imap_parse_date("31-dec-1969", 11, &d), 0);
    CU_ASSERT_EQUAL(d, -1);
    CU_ASSERT_EQUAL(imap_parse_date("1-Jan-2024", 10, &d), 0);
    CU_ASSERT_EQUAL(d, 19723);
    CU_ASSERT_EQUAL(imap_parse_date("1-Jan-1970 ", 11, &d), -1);
    CU_ASSERT_EQUAL(imap_parse_date(" 1-Jan-1970", 11, &d), -1);
    CU_ASSERT_EQUAL(imap_parse_date("31-Apr-2024", 11, &d), -1);
    CU_ASSERT_EQUAL(imap_parse_date("1-Jan-70", 8, &d), -1);
    CU_ASSERT_EQUAL(imap_parse_date("", 0, &d), -1);
    CU_ASSERT_EQUAL(imap_parse_date("123-Jan-2024", 12, &d), -1);
}

/* ---- flag lists ---- */

static struct imap_arg atom(const char *s)
{
    struct imap_arg a;
    memset(&a, 0, sizeof(a));
    a.type = IMAP_ARG_ATOM;
    a.str = s;
    a.len = strlen(s);
    return a;
}

static struct imap_arg list(struct imap_arg *items, size_t n)
{
    struct imap_arg a;
    memset(&a, 0, sizeof(a));
    a.type = IMAP_ARG_LIST;
    a.list = items;
    a.n_list = n;
    return a;
}

static void test_flags_parse(void)
{
    struct imap_arg items[] = {atom("\\Seen"), atom("\\flagged"), atom("$Junk"), atom("NonJunk"),
                               atom("$junk")};
    struct imap_arg l = list(items, 5);
    uint32_t flags = 0;
    char *kw = NULL;
    size_t kwl = 0, nkw = 0;
    CU_ASSERT_EQUAL(imap_parse_flags(&l, &flags, &kw, &kwl, &nkw), 0);
    CU_ASSERT_EQUAL(flags, STORE_F_SEEN | STORE_F_FLAGGED);
    CU_ASSERT_EQUAL(nkw, 2);
    CU_ASSERT_EQUAL(kwl, 14);
    CU_ASSERT(kw != NULL && memcmp(kw, "$Junk\0NonJunk\0", 14) == 0);
    free(kw);

    /* single atom */
    struct imap_arg one = atom("\\Deleted");
    CU_ASSERT_EQUAL(imap_parse_flags(&one, &flags, &kw, &kwl, &nkw), 0);
    CU_ASSERT_EQUAL(flags, STORE_F_DELETED);
    CU_ASSERT_EQUAL(nkw, 0);
    CU_ASSERT_PTR_NULL(kw);

    /* empty list */
    struct imap_arg empty = list(NULL, 0);
    CU_ASSERT_EQUAL(imap_parse_flags(&empty, &flags, &kw, &kwl, &nkw), 0);
    CU_ASSERT_EQUAL(flags, 0);
    CU_ASSERT_EQUAL(kwl, 0);

    /* all five system flags */
    struct imap_arg all[] = {atom("\\Answered"), atom("\\FLAGGED"), atom("\\Deleted"),
                             atom("\\Seen"), atom("\\Draft")};
    struct imap_arg la = list(all, 5);
    CU_ASSERT_EQUAL(imap_parse_flags(&la, &flags, &kw, &kwl, &nkw), 0);
    CU_ASSERT_EQUAL(flags, STORE_F_ANSWERED | STORE_F_FLAGGED | STORE_F_DELETED | STORE_F_SEEN |
                               STORE_F_DRAFT);
    free(kw);
}

static void test_flags_invalid(void)
{
    static const char *const bad[] = {"\\Recent", "\\Foo", "\\*", "a]b", "a%b", "a*", "\\"};
    uint32_t flags;
    char *kw;
    size_t kwl, nkw;
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        struct imap_arg items[] = {atom("\\Seen"), atom(bad[i])};
        struct imap_arg l = list(items, 2);
        kw = (char *)1;
        CU_ASSERT_EQUAL(imap_parse_flags(&l, &flags, &kw, &kwl, &nkw), -1);
        CU_ASSERT_PTR_NULL(kw);
    }
    /* quoted strings and nested lists are not flags */
    struct imap_arg q = atom("Seen");
    q.type = IMAP_ARG_QUOTED;
    CU_ASSERT_EQUAL(imap_parse_flags(&q, &flags, &kw, &kwl, &nkw), -1);
    struct imap_arg inner[] = {atom("a")};
    struct imap_arg nested[] = {list(inner, 1)};
    struct imap_arg ln = list(nested, 1);
    CU_ASSERT_EQUAL(imap_parse_flags(&ln, &flags, &kw, &kwl, &nkw), -1);
    struct imap_arg nil;
    memset(&nil, 0, sizeof(nil));
    nil.type = IMAP_ARG_NIL;
    CU_ASSERT_EQUAL(imap_parse_flags(&nil, &flags, &kw, &kwl, &nkw), -1);
    /* a keyword of 251 bytes is too long */
    char longkw[252];
    memset(longkw, 'k', 251);
    longkw[251] = '\0';
    struct imap_arg lk = atom(longkw);
    CU_ASSERT_EQUAL(imap_parse_flags(&lk, &flags, &kw, &kwl, &nkw), -1);
    longkw[250] = '\0';
    lk = atom(longkw);
    CU_ASSERT_EQUAL(imap_parse_flags(&lk, &flags, &kw, &kwl, &nkw), 0);
    CU_ASSERT_EQUAL(nkw, 1);
    free(kw);
}

/* ---- mailbox names ---- */

static struct sconf test_cfg;
static struct node test_node;
static struct imap_session test_sess;
static const char *last_why;

static void setup_session(void)
{
    memset(&test_cfg, 0, sizeof(test_cfg));
    test_cfg.max_mailbox_name = 512;
    test_cfg.max_mailbox_depth = 20;
    memset(&test_node, 0, sizeof(test_node));
    test_node.cfg = &test_cfg;
    memset(&test_sess, 0, sizeof(test_sess));
    test_sess.node = &test_node;
    test_sess.state = IMAP_S_AUTH;
}

/* Returns the canonical name (static buffer) or NULL. */
static const char *canon(const char *in, size_t len, enum imap_arg_type type)
{
    static char buf[2048];
    struct imap_arg a;
    memset(&a, 0, sizeof(a));
    a.type = type;
    a.str = in;
    a.len = len;
    const char *why = NULL;
    char *r = imap_mailbox_name(&test_sess, &a, &why);
    last_why = why;
    if (r == NULL) {
        CU_ASSERT_PTR_NOT_NULL(why);
        return NULL;
    }
    snprintf(buf, sizeof(buf), "%s", r);
    free(r);
    return buf;
}

#define CANON(s) canon((s), strlen(s), IMAP_ARG_QUOTED)

static void check_name(const char *in, const char *want)
{
    const char *got = CANON(in);
    if (want == NULL) {
        if (got != NULL) fprintf(stderr, "accepted bad name \"%s\" -> \"%s\"\n", in, got);
        CU_ASSERT_PTR_NULL(got);
    } else {
        if (got == NULL || strcmp(got, want) != 0)
            fprintf(stderr, "name \"%.40s\": got \"%.40s\" want \"%.40s\" (%s)\n", in,
                    got ? got : "(null)", want, got ? "" : last_why);
        CU_ASSERT(got != NULL && strcmp(got, want) == 0);
    }
}

static void test_mailbox_names(void)
{
    setup_session();
    check_name("INBOX", "INBOX");
    check_name("inbox", "INBOX");
    check_name("Inbox/child", "INBOX/child");
    check_name("inbox/Inbox", "INBOX/Inbox");
    check_name("INBOXfoo", "INBOXfoo");
    check_name("Sent", "Sent");
    check_name("a/b/c", "a/b/c");
    check_name("foo/", "foo");                      /* one trailing separator dropped */
    check_name("&AOk-t&AOk-", "\xc3\xa9t\xc3\xa9"); /* été */
    check_name("&Jjo-!", "\xe2\x98\xba!");
    check_name("Work & Play", NULL); /* bare '&' is not valid mUTF-7 */
    check_name("Work &- Play", "Work & Play");
    check_name("a.b", "a.b");
    check_name("...", "...");
    check_name("", NULL);
    check_name("/", NULL);
    check_name("//", NULL);
    check_name("/foo", NULL);
    check_name("foo//bar", NULL);
    check_name("foo//", NULL);
    check_name("a/./b", NULL);
    check_name("a/../b", NULL);
    check_name("..", NULL);
    check_name(".", NULL);
    check_name("a*", NULL);
    check_name("a%b", NULL);
    check_name("&Jjo", NULL); /* unterminated base64 */
    check_name("a\x01"
               "b",
               NULL);
    check_name("a\x7f", NULL);
    check_name("&AIA-", NULL); /* U+0080, a C1 control */
    /* NUL inside a literal */
    CU_ASSERT_PTR_NULL(canon("a\0b", 3, IMAP_ARG_LITERAL));
    /* a list is not a name */
    CU_ASSERT_PTR_NULL(canon("x", 1, IMAP_ARG_LIST));
    /* atom form works too */
    const char *r = canon("Drafts", 6, IMAP_ARG_ATOM);
    CU_ASSERT(r != NULL && strcmp(r, "Drafts") == 0);
}

static void test_mailbox_limits(void)
{
    setup_session();
    char name[1200];
    /* the effective limit is min(limits.max_mailbox_name, STORE_MAX_MAILBOX_NAME) */
    size_t lim = STORE_MAX_MAILBOX_NAME < 512 ? STORE_MAX_MAILBOX_NAME : 512;
    memset(name, 'a', lim);
    name[lim] = '\0';
    check_name(name, name);
    memset(name, 'a', lim + 1);
    name[lim + 1] = '\0';
    check_name(name, NULL);
    /* depth: 20 levels ok, 21 refused */
    size_t o = 0;
    for (int i = 0; i < 20; i++) {
        if (i) name[o++] = '/';
        name[o++] = 'x';
    }
    name[o] = '\0';
    check_name(name, name);
    strcat(name, "/x");
    check_name(name, NULL);
    /* tighter configured limits apply */
    test_cfg.max_mailbox_depth = 2;
    check_name("a/b", "a/b");
    check_name("a/b/c", NULL);
    test_cfg.max_mailbox_name = 4;
    check_name("abcd", "abcd");
    check_name("abcde", NULL);
    check_name("&AOkA6Q-", "\xc3\xa9\xc3\xa9"); /* 4 bytes of UTF-8 */
    check_name("&AOkA6QDp-", NULL);
    check_name("&AOk-&AOk-", NULL); /* non-canonical: adjacent runs */
}

int main(void)
{
    if (CU_initialize_registry() != CUE_SUCCESS) return 1;
    CU_pSuite su = CU_add_suite("imap_write", NULL, NULL);
    CU_add_test(su, "datetime_parse", test_datetime_parse);
    CU_add_test(su, "datetime_invalid", test_datetime_invalid);
    CU_add_test(su, "datetime_format", test_datetime_format);
    CU_add_test(su, "datetime_roundtrip", test_datetime_roundtrip);
    CU_add_test(su, "date_parse", test_date_parse);
    CU_add_test(su, "flags_parse", test_flags_parse);
    CU_add_test(su, "flags_invalid", test_flags_invalid);
    CU_add_test(su, "mailbox_names", test_mailbox_names);
    CU_add_test(su, "mailbox_limits", test_mailbox_limits);
    CU_basic_set_mode(CU_BRM_VERBOSE);
    CU_basic_run_tests();
    unsigned failures = CU_get_number_of_failures();
    CU_cleanup_registry();
    return failures != 0;
}
