/* Unit tests of the pure parts of imap_search.c (search program parsing and
 * evaluation against fake message records) and of imap_fetch.c's FETCH
 * item / section parser (through imap_fetch_item_label).
 *
 * Layout: fixture (a tiny argument tokenizer and fake messages), helpers,
 * tests, main. */
#include <CUnit/Basic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "imap_parser.h"
#include "store.h"

/* ---- declarations mirrored from storenode/imap_search.c / imap_fetch.c ---- */

enum search_op {
    SK_ALL = 1,
    SK_AND,
    SK_OR,
    SK_NOT,
    SK_FLAGS,
    SK_NFLAGS,
    SK_KEYWORD,
    SK_UNKEYWORD,
    SK_RECENT,
    SK_NEW,
    SK_OLD,
    SK_LARGER,
    SK_SMALLER,
    SK_BEFORE,
    SK_ON,
    SK_SINCE,
    SK_SENTBEFORE,
    SK_SENTON,
    SK_SENTSINCE,
    SK_UIDSET,
    SK_SEQSET,
    SK_MODSEQ,
    SK_HEADER,
    SK_BODY,
    SK_TEXT,
};

struct search_key {
    enum search_op op;
    unsigned cost;
    uint32_t flags;
    int64_t num;
    char *str;
    char *field;
    struct imap_seq_range *ranges;
    size_t n_ranges;
    struct search_key *child;
    struct search_key *next;
};

struct search_limits {
    size_t max_depth;
    size_t max_nodes;
    size_t max_ranges;
};

struct search_rec {
    uint32_t msn, uid;
    uint32_t flags;
    const char *keywords;
    size_t keywords_len;
    uint64_t size;
    int64_t internal_date;
    int32_t internal_tz_min;
    int recent;
    uint64_t modseq;
};

struct search_io {
    int (*sent_day)(void *arg, int64_t *day_r);
    int (*content)(void *arg, const struct search_key *k);
    void *arg;
};

int imap_search_parse(const struct imap_arg *args, size_t n, uint32_t star_msn, uint32_t star_uid,
                      const struct search_limits *lim, struct search_key **root_r,
                      int *has_modseq_r, const char **error_r);
void imap_search_free(struct search_key *k);
int imap_search_eval(const struct search_key *k, const struct search_rec *r,
                     const struct search_io *io);
int64_t imap_search_day(int64_t utc, int32_t tz_min);
int imap_fetch_item_label(const char *s, size_t len, char *out, size_t outlen);

/* ---- fixture: tokenizer for "KEY arg (list) \"quoted\"" ---- */

#define MAX_ARGS 4096
static struct imap_arg arg_pool[MAX_ARGS];
static size_t arg_used;
static char str_pool[65536];
static size_t str_used;

static const char *tok_p;

static char *pool_str(const char *s, size_t len)
{
    char *d = &str_pool[str_used];
    memcpy(d, s, len);
    d[len] = '\0';
    str_used += len + 1;
    return d;
}

/* Parse tokens until ')' or end into a fresh array; returns count. */
static size_t tok_list(struct imap_arg **out)
{
    struct imap_arg tmp[256];
    size_t n = 0;
    for (;;) {
        while (*tok_p == ' ')
            tok_p++;
        if (*tok_p == '\0' || *tok_p == ')') break;
        struct imap_arg a;
        memset(&a, 0, sizeof(a));
        if (*tok_p == '(') {
            tok_p++;
            a.type = IMAP_ARG_LIST;
            a.n_list = tok_list(&a.list);
            if (*tok_p == ')') tok_p++;
        } else if (*tok_p == '"') {
            const char *b = ++tok_p;
            while (*tok_p && *tok_p != '"')
                tok_p++;
            a.type = IMAP_ARG_QUOTED;
            a.len = (size_t)(tok_p - b);
            a.str = pool_str(b, a.len);
            if (*tok_p) tok_p++;
        } else {
            const char *b = tok_p;
            while (*tok_p && *tok_p != ' ' && *tok_p != '(' && *tok_p != ')')
                tok_p++;
            a.type = IMAP_ARG_ATOM;
            a.len = (size_t)(tok_p - b);
            a.str = pool_str(b, a.len);
        }
        tmp[n++] = a;
    }
    *out = &arg_pool[arg_used];
    memcpy(*out, tmp, n * sizeof(tmp[0]));
    arg_used += n;
    return n;
}

static size_t tokenize(const char *s, struct imap_arg **args)
{
    arg_used = 0;
    str_used = 0;
    tok_p = s;
    return tok_list(args);
}

static const struct search_limits lim = {64, 2000, 10000};

/* Parse; NULL when the parser refused. */
static struct search_key *parse(const char *s, uint32_t star_msn, uint32_t star_uid)
{
    struct imap_arg *args;
    size_t n = tokenize(s, &args);
    struct search_key *k = NULL;
    const char *err = NULL;
    if (imap_search_parse(args, n, star_msn, star_uid, &lim, &k, NULL, &err) < 0) {
        CU_ASSERT_PTR_NOT_NULL(err);
        return NULL;
    }
    return k;
}

/* ---- fake messages ---- */

struct fake {
    const char *from, *subject, *body;
    int has_sent;
    int64_t sent_day;
    int content_calls;
};

static int ci_contains(const char *hay, const char *needle)
{
    size_t n = strlen(needle);
    for (const char *p = hay; *p; p++)
        if (strncasecmp(p, needle, n) == 0) return 1;
    return n == 0;
}

static int fake_content(void *arg, const struct search_key *k)
{
    struct fake *f = arg;
    f->content_calls++;
    if (k->op == SK_HEADER) {
        if (strcasecmp(k->field, "FROM") == 0) return ci_contains(f->from, k->str);
        if (strcasecmp(k->field, "SUBJECT") == 0) return ci_contains(f->subject, k->str);
        return 0;
    }
    if (k->op == SK_BODY) return ci_contains(f->body, k->str);
    return ci_contains(f->body, k->str) || ci_contains(f->from, k->str) ||
           ci_contains(f->subject, k->str);
}

static int fake_sent(void *arg, int64_t *day_r)
{
    struct fake *f = arg;
    if (!f->has_sent) return 0;
    *day_r = f->sent_day;
    return 1;
}

static struct fake fk;
static struct search_io fio = {fake_sent, fake_content, &fk};

/* 2024-01-01 = day 19723 */
#define DAY_2024_01_01 19723

static struct search_rec base_rec(void)
{
    struct search_rec r;
    memset(&r, 0, sizeof(r));
    r.msn = 3;
    r.uid = 30;
    r.flags = STORE_F_SEEN | STORE_F_FLAGGED;
    r.keywords = "$Junk\0Work";
    r.keywords_len = 10;
    r.size = 1000;
    /* 2024-01-01 23:30 -0500 = 2024-01-02 04:30 UTC */
    r.internal_date = (int64_t)(DAY_2024_01_01 + 1) * 86400 + 4 * 3600 + 30 * 60;
    r.internal_tz_min = -300;
    r.recent = 0;
    r.modseq = 50;
    return r;
}

static int match(const char *prog, const struct search_rec *r)
{
    struct search_key *k = parse(prog, 10, 100);
    CU_ASSERT_PTR_NOT_NULL_FATAL(k);
    int m = imap_search_eval(k, r, &fio);
    imap_search_free(k);
    return m;
}

static void reset_fake(void)
{
    fk.from = "Alice Example <alice@example.org>";
    fk.subject = "Quarterly report";
    fk.body = "Numbers are up. Gr\xc3\xbc\xc3\x9f"
              "e";
    fk.has_sent = 1;
    fk.sent_day = DAY_2024_01_01 - 1;
    fk.content_calls = 0;
}

/* ---- tests ---- */

static void test_parse_errors(void)
{
    static const char *bad[] = {
        "",
        "FOO",
        "LARGER",
        "LARGER x",
        "LARGER -1",
        "OR SEEN",
        "NOT",
        "()",
        "BEFORE 32-Foo-2020",
        "UID x",
        "UID",
        "HEADER",
        "HEADER Subject",
        "KEYWORD",
        "KEYWORD \"a b\"",
        "1:x",
        "SINCE",
        "LARGER 99999999999",
        "MODSEQ abc",
        "SEEN (",
    };
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        struct search_key *k = parse(bad[i], 10, 100);
        if (k) {
            fprintf(stderr, "accepted bad program: '%s'\n", bad[i]);
            imap_search_free(k);
        }
        CU_ASSERT_PTR_NULL(k);
    }
}

static void test_parse_limits(void)
{
    /* 70 nested lists exceed depth 64 */
    char buf[512];
    size_t o = 0;
    for (int i = 0; i < 70; i++)
        buf[o++] = '(';
    memcpy(buf + o, "SEEN", 4);
    o += 4;
    for (int i = 0; i < 70; i++)
        buf[o++] = ')';
    buf[o] = '\0';
    CU_ASSERT_PTR_NULL(parse(buf, 10, 100));
    /* a NOT chain nests too */
    o = 0;
    for (int i = 0; i < 80; i++) {
        memcpy(buf + o, "NOT ", 4);
        o += 4;
    }
    memcpy(buf + o, "SEEN", 5);
    CU_ASSERT_PTR_NULL(parse(buf, 10, 100));
    /* within the depth limit it works */
    struct search_key *k = parse("NOT NOT NOT SEEN", 10, 100);
    CU_ASSERT_PTR_NOT_NULL(k);
    struct search_rec r = base_rec();
    CU_ASSERT_EQUAL(imap_search_eval(k, &r, &fio), 0);
    imap_search_free(k);
    /* node limit */
    struct search_limits small = {64, 5, 100};
    struct imap_arg *args;
    size_t n = tokenize("SEEN SEEN SEEN SEEN SEEN SEEN", &args);
    const char *err = NULL;
    CU_ASSERT_EQUAL(imap_search_parse(args, n, 1, 1, &small, &k, NULL, &err), -1);
    CU_ASSERT_PTR_NOT_NULL(err);
}

static void test_flags(void)
{
    struct search_rec r = base_rec();
    reset_fake();
    CU_ASSERT_EQUAL(match("ALL", &r), 1);
    CU_ASSERT_EQUAL(match("SEEN", &r), 1);
    CU_ASSERT_EQUAL(match("seen flagged", &r), 1);
    CU_ASSERT_EQUAL(match("UNSEEN", &r), 0);
    CU_ASSERT_EQUAL(match("ANSWERED", &r), 0);
    CU_ASSERT_EQUAL(match("UNANSWERED", &r), 1);
    CU_ASSERT_EQUAL(match("DELETED", &r), 0);
    CU_ASSERT_EQUAL(match("UNDELETED", &r), 1);
    CU_ASSERT_EQUAL(match("DRAFT", &r), 0);
    CU_ASSERT_EQUAL(match("UNDRAFT", &r), 1);
    CU_ASSERT_EQUAL(match("UNFLAGGED", &r), 0);
    CU_ASSERT_EQUAL(match("KEYWORD work", &r), 1);
    CU_ASSERT_EQUAL(match("KEYWORD $Junk", &r), 1);
    CU_ASSERT_EQUAL(match("KEYWORD Wor", &r), 0);
    CU_ASSERT_EQUAL(match("UNKEYWORD $NonJunk", &r), 1);
    CU_ASSERT_EQUAL(match("UNKEYWORD WORK", &r), 0);
    /* recent / new / old */
    CU_ASSERT_EQUAL(match("RECENT", &r), 0);
    CU_ASSERT_EQUAL(match("OLD", &r), 1);
    CU_ASSERT_EQUAL(match("NEW", &r), 0);
    r.recent = 1;
    CU_ASSERT_EQUAL(match("NEW", &r), 0); /* seen */
    r.flags &= ~(uint32_t)STORE_F_SEEN;
    CU_ASSERT_EQUAL(match("NEW", &r), 1);
    CU_ASSERT_EQUAL(match("OLD", &r), 0);
    CU_ASSERT_EQUAL(match("RECENT", &r), 1);
}

static void test_size_and_sets(void)
{
    struct search_rec r = base_rec();
    reset_fake();
    CU_ASSERT_EQUAL(match("LARGER 999", &r), 1);
    CU_ASSERT_EQUAL(match("LARGER 1000", &r), 0);
    CU_ASSERT_EQUAL(match("SMALLER 1001", &r), 1);
    CU_ASSERT_EQUAL(match("SMALLER 1000", &r), 0);
    /* msn 3, star_msn 10; uid 30, star_uid 100 */
    CU_ASSERT_EQUAL(match("3", &r), 1);
    CU_ASSERT_EQUAL(match("1:2,4:*", &r), 0);
    CU_ASSERT_EQUAL(match("*:2", &r), 1);
    CU_ASSERT_EQUAL(match("UID 30", &r), 1);
    CU_ASSERT_EQUAL(match("UID 31:*", &r), 0);
    CU_ASSERT_EQUAL(match("UID 1:29,31:*", &r), 0);
    CU_ASSERT_EQUAL(match("UID *", &r), 0);
    r.uid = 100;
    CU_ASSERT_EQUAL(match("UID *", &r), 1);
    CU_ASSERT_EQUAL(match("UID 500:*", &r), 1); /* 500:* includes the highest */
    CU_ASSERT_EQUAL(match("MODSEQ 50", &r), 1);
    CU_ASSERT_EQUAL(match("MODSEQ 51", &r), 0);
}

static void test_dates(void)
{
    struct search_rec r = base_rec();
    reset_fake();
    CU_ASSERT_EQUAL(imap_search_day(0, 0), 0);
    CU_ASSERT_EQUAL(imap_search_day(-1, 0), -1);
    CU_ASSERT_EQUAL(imap_search_day(r.internal_date, r.internal_tz_min), DAY_2024_01_01);
    /* the internal date's own zone decides the day: 1-Jan-2024 */
    CU_ASSERT_EQUAL(match("ON 1-Jan-2024", &r), 1);
    CU_ASSERT_EQUAL(match("ON 2-Jan-2024", &r), 0);
    CU_ASSERT_EQUAL(match("ON \"01-Jan-2024\"", &r), 1);
    CU_ASSERT_EQUAL(match("BEFORE 1-Jan-2024", &r), 0);
    CU_ASSERT_EQUAL(match("BEFORE 2-Jan-2024", &r), 1);
    CU_ASSERT_EQUAL(match("SINCE 1-Jan-2024", &r), 1);
    CU_ASSERT_EQUAL(match("SINCE 2-Jan-2024", &r), 0);
    /* Date: header day is 31-Dec-2023 */
    CU_ASSERT_EQUAL(match("SENTON 31-Dec-2023", &r), 1);
    CU_ASSERT_EQUAL(match("SENTBEFORE 31-Dec-2023", &r), 0);
    CU_ASSERT_EQUAL(match("SENTBEFORE 1-Jan-2024", &r), 1);
    CU_ASSERT_EQUAL(match("SENTSINCE 31-Dec-2023", &r), 1);
    CU_ASSERT_EQUAL(match("SENTSINCE 1-Jan-2024", &r), 0);
    fk.has_sent = 0; /* no Date: header: no SENT* key matches */
    CU_ASSERT_EQUAL(match("SENTBEFORE 1-Jan-2030", &r), 0);
    CU_ASSERT_EQUAL(match("SENTSINCE 1-Jan-1970", &r), 0);
    CU_ASSERT_EQUAL(match("NOT SENTON 1-Jan-1970", &r), 1);
}

static void test_text_and_logic(void)
{
    struct search_rec r = base_rec();
    reset_fake();
    CU_ASSERT_EQUAL(match("FROM alice", &r), 1);
    CU_ASSERT_EQUAL(match("FROM \"ALICE EXAMPLE\"", &r), 1);
    CU_ASSERT_EQUAL(match("FROM bob", &r), 0);
    CU_ASSERT_EQUAL(match("SUBJECT report", &r), 1);
    CU_ASSERT_EQUAL(match("HEADER Subject quarter", &r), 1);
    CU_ASSERT_EQUAL(match("HEADER X-Nope \"\"", &r), 0);
    CU_ASSERT_EQUAL(match("BODY numbers", &r), 1);
    CU_ASSERT_EQUAL(match("BODY report", &r), 0);
    CU_ASSERT_EQUAL(match("TEXT report", &r), 1);
    CU_ASSERT_EQUAL(match("OR FROM bob SUBJECT report", &r), 1);
    CU_ASSERT_EQUAL(match("OR FROM bob (SUBJECT nope)", &r), 0);
    CU_ASSERT_EQUAL(match("NOT (SEEN UNFLAGGED)", &r), 1);
    CU_ASSERT_EQUAL(match("OR (UNSEEN) (NOT DELETED)", &r), 1);
    CU_ASSERT_EQUAL(match("(SEEN (FLAGGED (FROM alice)))", &r), 1);
    CU_ASSERT_EQUAL(match("OR OR DELETED DRAFT ANSWERED", &r), 0);

    /* cheapest first: a failing flag test short-circuits before any text */
    fk.content_calls = 0;
    CU_ASSERT_EQUAL(match("BODY numbers FROM alice DELETED", &r), 0);
    CU_ASSERT_EQUAL(fk.content_calls, 0);
    fk.content_calls = 0;
    CU_ASSERT_EQUAL(match("OR BODY numbers SEEN", &r), 1);
    CU_ASSERT_EQUAL(fk.content_calls, 0);
    fk.content_calls = 0;
    CU_ASSERT_EQUAL(match("BODY numbers SEEN", &r), 1);
    CU_ASSERT_EQUAL(fk.content_calls, 1);
}

static void test_tree_shape(void)
{
    struct search_key *k = parse("SEEN FROM x", 1, 1);
    CU_ASSERT_PTR_NOT_NULL_FATAL(k);
    CU_ASSERT_EQUAL(k->op, SK_AND);
    CU_ASSERT_EQUAL(k->cost, 2);
    CU_ASSERT_PTR_NOT_NULL_FATAL(k->child);
    CU_ASSERT_EQUAL(k->child->op, SK_FLAGS);
    CU_ASSERT_EQUAL(k->child->flags, STORE_F_SEEN);
    CU_ASSERT_PTR_NOT_NULL_FATAL(k->child->next);
    CU_ASSERT_EQUAL(k->child->next->op, SK_HEADER);
    CU_ASSERT_STRING_EQUAL(k->child->next->field, "FROM");
    CU_ASSERT_STRING_EQUAL(k->child->next->str, "x");
    imap_search_free(k);

    k = parse("OR 1:3 UID 5", 10, 100);
    CU_ASSERT_PTR_NOT_NULL_FATAL(k);
    CU_ASSERT_EQUAL(k->op, SK_OR);
    CU_ASSERT_EQUAL(k->cost, 0);
    CU_ASSERT_EQUAL(k->child->op, SK_SEQSET);
    CU_ASSERT_EQUAL(k->child->next->op, SK_UIDSET);
    CU_ASSERT_PTR_NULL(k->child->next->next);
    imap_search_free(k);

    struct imap_arg *args;
    size_t n = tokenize("MODSEQ \"/flags/\\\\draft\" all 620162338", &args);
    const char *err = NULL;
    int has_modseq = 0;
    CU_ASSERT_EQUAL(imap_search_parse(args, n, 1, 1, &lim, &k, &has_modseq, &err), 0);
    CU_ASSERT_EQUAL(has_modseq, 1);
    if (k) {
        CU_ASSERT_EQUAL(k->op, SK_MODSEQ);
        CU_ASSERT_EQUAL(k->num, 620162338);
        imap_search_free(k);
    }
}

static void check_label(const char *item, const char *want)
{
    char out[512];
    int rc = imap_fetch_item_label(item, strlen(item), out, sizeof(out));
    if (!want) {
        if (rc == 0) fprintf(stderr, "accepted bad item '%s' -> '%s'\n", item, out);
        CU_ASSERT_EQUAL(rc, -1);
        return;
    }
    CU_ASSERT_EQUAL_FATAL(rc, 0);
    if (strcmp(out, want) != 0) fprintf(stderr, "item '%s': got '%s' want '%s'\n", item, out, want);
    CU_ASSERT_STRING_EQUAL(out, want);
}

static void test_fetch_items(void)
{
    check_label("BODY[]", "BODY[] seen");
    check_label("BODY.PEEK[]", "BODY[]");
    check_label("body.peek[header.fields (From To)]<0.512>", "BODY[HEADER.FIELDS (From To)]<0>");
    check_label("BODY[HEADER.FIELDS.NOT (X-A)]", "BODY[HEADER.FIELDS.NOT (X-A)] seen");
    check_label("BODY[1.2.mime]", "BODY[1.2.MIME] seen");
    check_label("BODY.PEEK[3.HEADER]", "BODY[3.HEADER]");
    check_label("BODY.PEEK[3.1.TEXT]<100.5>", "BODY[3.1.TEXT]<100>");
    check_label("BODY.PEEK[2]", "BODY[2]");
    check_label("BODY.PEEK[TEXT]<0.1>", "BODY[TEXT]<0>");
    check_label("BODY.PEEK[HEADER.FIELDS (\"Subject\" \"x\\\"y\")]",
                "BODY[HEADER.FIELDS (\"Subject\" \"x\\\"y\")]");
    check_label("RFC822", "RFC822 seen");
    check_label("RFC822.TEXT", "RFC822.TEXT seen");
    check_label("RFC822.HEADER", "RFC822.HEADER");
    check_label("FLAGS", "item");
    check_label("bodystructure", "item");
    check_label("BODY", "item");

    check_label("BODY[MIME]", NULL);
    check_label("BODY[1.]", NULL);
    check_label("BODY[0]", NULL);
    check_label("BODY[1.0]", NULL);
    check_label("BODY[.1]", NULL);
    check_label("BODY[HEADER.FIELDS ()]", NULL);
    check_label("BODY[HEADER.FIELDS]", NULL);
    check_label("BODY[HEADER.FIELDS (A:B)]", NULL);
    check_label("BODY[HEADER.FIELDS (A B]", NULL);
    check_label("BODY[]<0.0>", NULL);
    check_label("BODY[]<1>", NULL);
    check_label("BODY[]<1.2", NULL);
    check_label("BODY[]<4294967296.1>", NULL);
    check_label("BODY[TEXT]x", NULL);
    check_label("BODY[TEXTX]", NULL);
    check_label("BODY[1TEXT]", NULL);
    check_label("BODY[", NULL);
    check_label("BODY.PEEK", NULL);
    check_label("BINARY[]", NULL);
    check_label("RFC822.BODY", NULL);
    check_label(
        "BODY[1.2.3.4.5.6.7.8.9.10.11.12.13.14.15.16.17.18.19.20.21.22.23.24.25.26.27.28.29."
        "30.31.32.33]",
        NULL);
}

int main(void)
{
    if (CU_initialize_registry() != CUE_SUCCESS) return 1;
    CU_pSuite su = CU_add_suite("imap_search", NULL, NULL);
    CU_add_test(su, "parse errors", test_parse_errors);
    CU_add_test(su, "parse limits", test_parse_limits);
    CU_add_test(su, "flags", test_flags);
    CU_add_test(su, "size and sets", test_size_and_sets);
    CU_add_test(su, "dates", test_dates);
    CU_add_test(su, "text and logic", test_text_and_logic);
    CU_add_test(su, "tree shape", test_tree_shape);
    CU_pSuite sf = CU_add_suite("imap_fetch_items", NULL, NULL);
    CU_add_test(sf, "item labels", test_fetch_items);
    CU_basic_set_mode(CU_BRM_VERBOSE);
    CU_basic_run_tests();
    unsigned failures = CU_get_number_of_failures();
    CU_cleanup_registry();
    return failures != 0;
}
