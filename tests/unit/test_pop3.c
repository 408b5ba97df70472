/* Unit tests for the pure POP3 helpers in storenode/pop3.h: command parser,
 * line splitter, dot-stuffer (on every chunk boundary), TOP cut, UIDL. */
#include <CUnit/Basic.h>
#include <stdlib.h>
#include <string.h>

#include "pop3.h"

static int parse(const char *s, struct pop3_cmd *c)
{
    memset(c, 0xA5, sizeof(*c));
    return pop3_parse_line(s, strlen(s), c);
}

static void test_simple_commands(void)
{
    static const struct {
        const char *line;
        enum pop3_cmd_id id;
    } cases[] = {
        {"STAT", POP3_CMD_STAT}, {"stat", POP3_CMD_STAT}, {"NOOP", POP3_CMD_NOOP},
        {"RSET", POP3_CMD_RSET}, {"QUIT", POP3_CMD_QUIT}, {"Quit", POP3_CMD_QUIT},
        {"CAPA", POP3_CMD_CAPA}, {"STLS", POP3_CMD_STLS}, {"LIST", POP3_CMD_LIST},
        {"UIDL", POP3_CMD_UIDL}, {"AUTH", POP3_CMD_AUTH}, {"STAT ", POP3_CMD_STAT},
    };
    struct pop3_cmd c;
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        CU_ASSERT_EQUAL_FATAL(parse(cases[i].line, &c), POP3_PARSE_OK);
        CU_ASSERT_EQUAL(c.id, cases[i].id);
        CU_ASSERT_EQUAL(c.has_msg, 0);
        CU_ASSERT_EQUAL(c.arg_len, 0);
    }
    CU_ASSERT_EQUAL(parse("STAT 1", &c), POP3_PARSE_BADARGS);
    CU_ASSERT_EQUAL(parse("QUIT now", &c), POP3_PARSE_BADARGS);
    CU_ASSERT_EQUAL(parse("CAPA x", &c), POP3_PARSE_BADARGS);
}

static void test_numbers(void)
{
    struct pop3_cmd c;
    CU_ASSERT_EQUAL_FATAL(parse("RETR 1", &c), POP3_PARSE_OK);
    CU_ASSERT_EQUAL(c.id, POP3_CMD_RETR);
    CU_ASSERT_EQUAL(c.has_msg, 1);
    CU_ASSERT_EQUAL(c.msg, 1);
    CU_ASSERT_EQUAL_FATAL(parse("dele 42", &c), POP3_PARSE_OK);
    CU_ASSERT_EQUAL(c.id, POP3_CMD_DELE);
    CU_ASSERT_EQUAL(c.msg, 42);
    CU_ASSERT_EQUAL_FATAL(parse("LIST 4294967295", &c), POP3_PARSE_OK);
    CU_ASSERT_EQUAL(c.msg, 4294967295u);
    CU_ASSERT_EQUAL(c.has_msg, 1);
    CU_ASSERT_EQUAL_FATAL(parse("UIDL 007", &c), POP3_PARSE_OK);
    CU_ASSERT_EQUAL(c.msg, 7);
    CU_ASSERT_EQUAL_FATAL(parse("RETR 0", &c), POP3_PARSE_OK); /* parsed; no such message */
    CU_ASSERT_EQUAL(c.msg, 0);
    CU_ASSERT_EQUAL_FATAL(parse("TOP 3 10", &c), POP3_PARSE_OK);
    CU_ASSERT_EQUAL(c.id, POP3_CMD_TOP);
    CU_ASSERT_EQUAL(c.msg, 3);
    CU_ASSERT_EQUAL(c.lines, 10);
    CU_ASSERT_EQUAL_FATAL(parse("TOP 3 0", &c), POP3_PARSE_OK);
    CU_ASSERT_EQUAL(c.lines, 0);
    CU_ASSERT_EQUAL_FATAL(parse("RETR   5", &c), POP3_PARSE_OK); /* runs of spaces */
    CU_ASSERT_EQUAL(c.msg, 5);

    /* overflow, signs, garbage, missing and extra arguments */
    CU_ASSERT_EQUAL(parse("LIST 4294967296", &c), POP3_PARSE_BADARGS);
    CU_ASSERT_EQUAL(parse("LIST 99999999999", &c), POP3_PARSE_BADARGS);
    CU_ASSERT_EQUAL(parse("RETR -1", &c), POP3_PARSE_BADARGS);
    CU_ASSERT_EQUAL(parse("RETR +1", &c), POP3_PARSE_BADARGS);
    CU_ASSERT_EQUAL(parse("RETR 1x", &c), POP3_PARSE_BADARGS);
    CU_ASSERT_EQUAL(parse("RETR 0x10", &c), POP3_PARSE_BADARGS);
    CU_ASSERT_EQUAL(parse("RETR", &c), POP3_PARSE_BADARGS);
    CU_ASSERT_EQUAL(parse("RETR ", &c), POP3_PARSE_BADARGS);
    CU_ASSERT_EQUAL(parse("DELE", &c), POP3_PARSE_BADARGS);
    CU_ASSERT_EQUAL(parse("RETR 1 2", &c), POP3_PARSE_BADARGS);
    CU_ASSERT_EQUAL(parse("TOP 1", &c), POP3_PARSE_BADARGS);
    CU_ASSERT_EQUAL(parse("TOP 1 2 3", &c), POP3_PARSE_BADARGS);
    CU_ASSERT_EQUAL(parse("TOP 1 -2", &c), POP3_PARSE_BADARGS);
    CU_ASSERT_EQUAL(parse("LIST 1 2", &c), POP3_PARSE_BADARGS);
    CU_ASSERT_EQUAL(parse("UIDL a", &c), POP3_PARSE_BADARGS);
}

static void test_user_pass_auth(void)
{
    struct pop3_cmd c;
    CU_ASSERT_EQUAL_FATAL(parse("USER bob@example.org", &c), POP3_PARSE_OK);
    CU_ASSERT_EQUAL(c.id, POP3_CMD_USER);
    CU_ASSERT_EQUAL(c.arg_len, 15);
    CU_ASSERT_EQUAL(memcmp(c.arg, "bob@example.org", 15), 0);
    CU_ASSERT_EQUAL(parse("USER", &c), POP3_PARSE_BADARGS);
    CU_ASSERT_EQUAL(parse("USER a b", &c), POP3_PARSE_BADARGS);
    CU_ASSERT_EQUAL(parse("USER a\tb", &c), POP3_PARSE_BADARGS);

    /* PASS keeps spaces: the rest of the line is the password */
    CU_ASSERT_EQUAL_FATAL(parse("PASS  my secret ", &c), POP3_PARSE_OK);
    CU_ASSERT_EQUAL(c.id, POP3_CMD_PASS);
    CU_ASSERT_EQUAL(c.arg_len, 11);
    CU_ASSERT_EQUAL(memcmp(c.arg, " my secret ", 11), 0);
    CU_ASSERT_EQUAL(parse("PASS", &c), POP3_PARSE_BADARGS);
    CU_ASSERT_EQUAL(parse("PASS ", &c), POP3_PARSE_BADARGS);

    CU_ASSERT_EQUAL_FATAL(parse("XCLIENT ADDR=192.0.2.7 PORT=4711", &c), POP3_PARSE_OK);
    CU_ASSERT_EQUAL(c.id, POP3_CMD_XCLIENT);
    CU_ASSERT_EQUAL(c.arg_len, 24);
    CU_ASSERT_EQUAL(memcmp(c.arg, "ADDR=192.0.2.7 PORT=4711", 24), 0);
    CU_ASSERT_EQUAL(parse("XCLIENT", &c), POP3_PARSE_BADARGS);
    CU_ASSERT_EQUAL(parse("XCLIENTS ADDR=1.2.3.4", &c), POP3_PARSE_UNKNOWN);

    CU_ASSERT_EQUAL_FATAL(parse("AUTH PLAIN", &c), POP3_PARSE_OK);
    CU_ASSERT_EQUAL(c.id, POP3_CMD_AUTH);
    CU_ASSERT_EQUAL(c.arg_len, 5);
    CU_ASSERT_PTR_NULL(c.arg2);
    CU_ASSERT_EQUAL_FATAL(parse("auth plain AGJvYgBzZWNyZXQ=", &c), POP3_PARSE_OK);
    CU_ASSERT_EQUAL(c.arg2_len, 16);
    CU_ASSERT_EQUAL(memcmp(c.arg2, "AGJvYgBzZWNyZXQ=", 16), 0);
    CU_ASSERT_EQUAL_FATAL(parse("AUTH PLAIN =", &c), POP3_PARSE_OK);
    CU_ASSERT_EQUAL(c.arg2_len, 1);
    CU_ASSERT_EQUAL(parse("AUTH PLAIN a b", &c), POP3_PARSE_BADARGS);
}

static void test_bad_input(void)
{
    struct pop3_cmd c;
    char big[POP3_MAX_AUTH_LINE + 64];
    CU_ASSERT_EQUAL(parse("", &c), POP3_PARSE_UNKNOWN);
    CU_ASSERT_EQUAL(parse(" ", &c), POP3_PARSE_UNKNOWN);
    CU_ASSERT_EQUAL(parse(" STAT", &c), POP3_PARSE_UNKNOWN);
    CU_ASSERT_EQUAL(parse("STATS", &c), POP3_PARSE_UNKNOWN);
    CU_ASSERT_EQUAL(parse("APOP bob 0123", &c), POP3_PARSE_UNKNOWN);
    CU_ASSERT_EQUAL(parse("XYZZY", &c), POP3_PARSE_UNKNOWN);
    CU_ASSERT_EQUAL(parse("GET / HTTP/1.0", &c), POP3_PARSE_UNKNOWN);
    CU_ASSERT_EQUAL(pop3_parse_line("ST\0T", 4, &c), POP3_PARSE_UNKNOWN);
    CU_ASSERT_EQUAL(pop3_parse_line("RETR 1\0", 7, &c), POP3_PARSE_UNKNOWN);

    /* 510 octets + CRLF = 512 is fine, 511 is too long */
    memset(big, 'a', sizeof(big));
    memcpy(big, "USER ", 5);
    CU_ASSERT_EQUAL(pop3_parse_line(big, 5 + POP3_MAX_ARG, &c), POP3_PARSE_OK);
    CU_ASSERT_EQUAL(pop3_parse_line(big, 5 + POP3_MAX_ARG + 1, &c), POP3_PARSE_TOOLONG);
    memcpy(big, "LIST ", 5);
    memset(big + 5, ' ', 600);
    big[605] = '1';
    CU_ASSERT_EQUAL(pop3_parse_line(big, 505, &c), POP3_PARSE_OK); /* only spaces: no arg */
    CU_ASSERT_EQUAL(pop3_parse_line(big, 606, &c), POP3_PARSE_TOOLONG);
    /* AUTH may carry a long initial response, up to the AUTH bound */
    memset(big, 'A', sizeof(big));
    memcpy(big, "AUTH PLAIN ", 11);
    CU_ASSERT_EQUAL(pop3_parse_line(big, 2000, &c), POP3_PARSE_OK);
    CU_ASSERT_EQUAL(c.arg2_len, 2000 - 11);
    CU_ASSERT_EQUAL(pop3_parse_line(big, POP3_MAX_AUTH_LINE + 1, &c), POP3_PARSE_TOOLONG);
    CU_ASSERT_EQUAL(pop3_parse_line(big, 600, &c), POP3_PARSE_OK);
    memset(big, 'A', sizeof(big));
    memcpy(big, "AUTH ", 5); /* long mechanism name */
    CU_ASSERT_EQUAL(pop3_parse_line(big, 600, &c), POP3_PARSE_TOOLONG);
}

static void test_split_line(void)
{
    size_t ll = 99;
    CU_ASSERT_EQUAL(pop3_split_line("STAT\r\nNOOP\r\n", 12, 512, &ll), 6);
    CU_ASSERT_EQUAL(ll, 4);
    CU_ASSERT_EQUAL(pop3_split_line("STAT\nX", 6, 512, &ll), 5);
    CU_ASSERT_EQUAL(ll, 4);
    CU_ASSERT_EQUAL(pop3_split_line("\r\n", 2, 512, &ll), 2);
    CU_ASSERT_EQUAL(ll, 0);
    CU_ASSERT_EQUAL(pop3_split_line("STAT\r", 5, 512, &ll), 0);
    CU_ASSERT_EQUAL(pop3_split_line("", 0, 512, &ll), 0);
    CU_ASSERT_EQUAL(pop3_split_line("abcdefgh", 8, 8, &ll), -1);
    CU_ASSERT_EQUAL(pop3_split_line("abcdefg\n", 8, 8, &ll), 8);
    CU_ASSERT_EQUAL(ll, 7);
    CU_ASSERT_EQUAL(pop3_split_line("abcdefgh\n", 9, 8, &ll), -1);

    int found = 7;
    CU_ASSERT_EQUAL(pop3_skip_line("xxxx", 4, &found), 4);
    CU_ASSERT_EQUAL(found, 0);
    CU_ASSERT_EQUAL(pop3_skip_line("xx\nSTAT\r\n", 9, &found), 3);
    CU_ASSERT_EQUAL(found, 1);
}

/* Reference dot-stuffer, written independently. */
static size_t ref_stuff(const char *in, size_t len, char *out)
{
    size_t o = 0;
    int bol = 1;
    for (size_t i = 0; i < len; i++) {
        if (bol && in[i] == '.') out[o++] = '.';
        out[o++] = in[i];
        bol = in[i] == '\n';
    }
    return o;
}

static void check_stuff_all_splits(const char *in)
{
    size_t len = strlen(in);
    char *want = malloc(2 * len + 1), *got = malloc(2 * len + 1);
    size_t wl = ref_stuff(in, len, want);
    /* every single split point, and every pair of split points */
    for (size_t a = 0; a <= len; a++) {
        for (size_t b = a; b <= len; b++) {
            int als = 1;
            size_t o = 0, k;
            k = pop3_dotstuff(in, a, &als, got + o, 2 * len + 1 - o);
            CU_ASSERT_FATAL(k != (size_t)-1);
            o += k;
            k = pop3_dotstuff(in + a, b - a, &als, got + o, 2 * len + 1 - o);
            CU_ASSERT_FATAL(k != (size_t)-1);
            o += k;
            k = pop3_dotstuff(in + b, len - b, &als, got + o, 2 * len + 1 - o);
            CU_ASSERT_FATAL(k != (size_t)-1);
            o += k;
            CU_ASSERT_EQUAL_FATAL(o, wl);
            CU_ASSERT_EQUAL_FATAL(memcmp(got, want, wl), 0);
        }
    }
    free(want);
    free(got);
}

static void test_dotstuff(void)
{
    char out[64];
    int als = 1, dot = 0;
    /* the span API directly */
    CU_ASSERT_EQUAL(pop3_dotstuff_span(".abc", 4, &als, &dot), 0);
    CU_ASSERT_EQUAL(dot, 1);
    CU_ASSERT_EQUAL(als, 0);
    CU_ASSERT_EQUAL(pop3_dotstuff_span(".abc", 4, &als, &dot), 4);
    CU_ASSERT_EQUAL(dot, 0);
    als = 1;
    CU_ASSERT_EQUAL(pop3_dotstuff_span("ab\r\n.\r\n", 7, &als, &dot), 4);
    CU_ASSERT_EQUAL(dot, 1);
    als = 0;
    CU_ASSERT_EQUAL(pop3_dotstuff_span("x\r\n", 3, &als, &dot), 3);
    CU_ASSERT_EQUAL(als, 1);
    CU_ASSERT_EQUAL(dot, 0);

    als = 1;
    size_t k = pop3_dotstuff(".\r\n..x\r\na.b\r\n.", 14, &als, out, sizeof(out));
    CU_ASSERT_EQUAL_FATAL(k, 17);
    CU_ASSERT_EQUAL(memcmp(out, "..\r\n...x\r\na.b\r\n..", 17), 0);
    als = 0; /* not at line start: a leading dot is kept as is */
    k = pop3_dotstuff(".x", 2, &als, out, sizeof(out));
    CU_ASSERT_EQUAL(k, 2);
    CU_ASSERT_EQUAL(memcmp(out, ".x", 2), 0);
    als = 1;
    CU_ASSERT_EQUAL(pop3_dotstuff("...", 3, &als, out, 3), (size_t)-1); /* too small */

    check_stuff_all_splits("Subject: x\r\n\r\n.\r\n..\r\nbody\r\n.end\r\n");
    check_stuff_all_splits("...\n.\n\n.");
    check_stuff_all_splits("no dots at all\r\n");
    check_stuff_all_splits("");
}

static void test_top_length(void)
{
    const char *m = "A: 1\r\nB: 2\r\n\r\nl1\r\nl2\r\nl3\r\n";
    size_t len = strlen(m);
    int nb = -1;
    CU_ASSERT_EQUAL(pop3_top_length(m, len, 0, &nb), 14);
    CU_ASSERT_EQUAL(nb, 0);
    CU_ASSERT_EQUAL(pop3_top_length(m, len, 1, &nb), 18);
    CU_ASSERT_EQUAL(pop3_top_length(m, len, 2, &nb), 22);
    CU_ASSERT_EQUAL(pop3_top_length(m, len, 3, &nb), len);
    CU_ASSERT_EQUAL(pop3_top_length(m, len, 4000000000u, &nb), len);
    /* header only: whole message, caller adds the empty line */
    CU_ASSERT_EQUAL(pop3_top_length("A: 1\r\nB: 2\r\n", 12, 5, &nb), 12);
    CU_ASSERT_EQUAL(nb, 1);
    CU_ASSERT_EQUAL(pop3_top_length("A: 1", 4, 0, &nb), 4);
    CU_ASSERT_EQUAL(nb, 1);
    CU_ASSERT_EQUAL(pop3_top_length("", 0, 0, &nb), 0);
    CU_ASSERT_EQUAL(nb, 1);
    /* empty header: body starts at once */
    CU_ASSERT_EQUAL(pop3_top_length("\r\nbody\r\nmore\r\n", 14, 1, &nb), 8);
    CU_ASSERT_EQUAL(nb, 0);
    /* last body line without CRLF */
    CU_ASSERT_EQUAL(pop3_top_length("A: 1\r\n\r\nxyz", 11, 1, &nb), 11);
    CU_ASSERT_EQUAL(nb, 0);
}

static void test_uidl(void)
{
    char u[17];
    pop3_uidl(0x5f3e1a00u, 7, u);
    CU_ASSERT_STRING_EQUAL(u, "5f3e1a0000000007");
    pop3_uidl(0xffffffffu, 0xffffffffu, u);
    CU_ASSERT_STRING_EQUAL(u, "ffffffffffffffff");
    pop3_uidl(1, 0, u);
    CU_ASSERT_EQUAL(strlen(u), 16);
}

int main(void)
{
    CU_pSuite s;
    if (CU_initialize_registry() != CUE_SUCCESS) return 1;
    s = CU_add_suite("pop3", NULL, NULL);
    CU_add_test(s, "simple commands", test_simple_commands);
    CU_add_test(s, "numbers", test_numbers);
    CU_add_test(s, "user/pass/auth", test_user_pass_auth);
    CU_add_test(s, "bad input", test_bad_input);
    CU_add_test(s, "split line", test_split_line);
    CU_add_test(s, "dot-stuffing", test_dotstuff);
    CU_add_test(s, "top length", test_top_length);
    CU_add_test(s, "uidl", test_uidl);
    CU_basic_set_mode(CU_BRM_VERBOSE);
    CU_basic_run_tests();
    unsigned failures = CU_get_number_of_failures();
    CU_cleanup_registry();
    return failures != 0;
}
