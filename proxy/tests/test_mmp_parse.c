/* CUnit tests of coffer-mmp's pre-auth parsers (proxy/px_parse.c). Every
 * IMAP case is also fed one byte at a time. */
#include <CUnit/Basic.h>
#include <stdlib.h>
#include <string.h>

#include "px_parse.h"

static const struct px_limits LIM = {8192, 8192, 8192 + 2 * 8192 + 64};

/* Feed s (len n) in chunks of `step`; collect results until DONE or error.
 * Records CONTINUE count. Returns the final rc. */
static enum px_imap_rc feed_all(struct px_imap_parser *p, const char *s, size_t n, size_t step,
                                int *conts, size_t *used_total)
{
    size_t off = 0;
    enum px_imap_rc rc = PX_IMAP_MORE;
    *conts = 0;
    while (off < n) {
        size_t len = n - off < step ? n - off : step, used = 0;
        rc = px_imap_feed(p, s + off, len, &used);
        off += used;
        if (rc == PX_IMAP_CONTINUE) {
            (*conts)++;
            continue;
        }
        if (rc != PX_IMAP_MORE) break;
        if (used < len) break;
    }
    *used_total = off;
    return rc;
}

static void check_login(size_t step)
{
    const char *in = "a1 LOGIN {5}\r\nalice {8+}\r\np\"w d\\x!\r\n";
    struct px_imap_parser *p = px_imap_parser_new(&LIM);
    int conts;
    size_t used;
    enum px_imap_rc rc = feed_all(p, in, strlen(in), step, &conts, &used);
    CU_ASSERT_EQUAL(rc, PX_IMAP_DONE);
    CU_ASSERT_EQUAL(conts, 1);
    CU_ASSERT_EQUAL(used, strlen(in));
    size_t rl;
    char *raw = px_imap_raw(p, &rl);
    struct px_imap_cmd cmd;
    const char *err;
    CU_ASSERT_EQUAL_FATAL(px_imap_tokenize(raw, rl, &cmd, &err), 0);
    CU_ASSERT_STRING_EQUAL(cmd.tag, "a1");
    CU_ASSERT_STRING_EQUAL(cmd.name, "LOGIN");
    CU_ASSERT_EQUAL_FATAL(cmd.n_args, 2);
    CU_ASSERT_EQUAL(cmd.args[0].len, 5);
    CU_ASSERT(memcmp(cmd.args[0].s, "alice", 5) == 0);
    CU_ASSERT_EQUAL(cmd.args[1].len, 8);
    CU_ASSERT(memcmp(cmd.args[1].s, "p\"w d\\x!", 8) == 0);
    px_imap_parser_free(&p);
    CU_ASSERT_PTR_NULL(p);
}

static void test_login_literals(void)
{
    for (size_t step = 1; step <= 64; step++)
        check_login(step);
}

static void test_quoted_and_id(void)
{
    char in[] = "x ID (\"name\" \"Thunder\\\"bird\" \"version\" NIL)\r\n";
    struct px_imap_cmd cmd;
    const char *err;
    CU_ASSERT_EQUAL_FATAL(px_imap_tokenize(in, strlen(in), &cmd, &err), 0);
    CU_ASSERT_STRING_EQUAL(cmd.name, "ID");
    CU_ASSERT_EQUAL_FATAL(cmd.n_args, 6);
    CU_ASSERT_EQUAL(cmd.args[0].type, PX_ARG_LIST_BEGIN);
    CU_ASSERT_EQUAL(cmd.args[2].len, 12);
    CU_ASSERT(memcmp(cmd.args[2].s, "Thunder\"bird", 12) == 0);
    CU_ASSERT_EQUAL(cmd.args[4].type, PX_ARG_NIL);
    CU_ASSERT_EQUAL(cmd.args[5].type, PX_ARG_LIST_END);
    char nested[] = "x ID ((\"a\"))\r\n";
    CU_ASSERT_EQUAL(px_imap_tokenize(nested, strlen(nested), &cmd, &err), -1);
    char badq[] = "y LOGIN \"unterminated\r\n";
    CU_ASSERT_EQUAL(px_imap_tokenize(badq, strlen(badq), &cmd, &err), -1);
    CU_ASSERT_STRING_EQUAL(cmd.tag, "y");
    char badtag[] = "a+b NOOP\r\n";
    CU_ASSERT_EQUAL(px_imap_tokenize(badtag, strlen(badtag), &cmd, &err), -1);
    CU_ASSERT_STRING_EQUAL(cmd.tag, "");
    char sasl[] = "t AUTHENTICATE PLAIN AGFsaWNlAHNlY3JldA==\r\n";
    CU_ASSERT_EQUAL(px_imap_tokenize(sasl, strlen(sasl), &cmd, &err), 0);
    CU_ASSERT_EQUAL(cmd.n_args, 2);
}

static void test_limits(void)
{
    struct px_imap_parser *p = px_imap_parser_new(&LIM);
    size_t used;
    /* literal larger than the limit, synchronising: BAD, session goes on */
    const char *big = "b1 LOGIN {9000}\r\n";
    CU_ASSERT_EQUAL(px_imap_feed(p, big, strlen(big), &used), PX_IMAP_BAD_LITERAL);
    char tag[80];
    px_imap_tag(p, tag, sizeof(tag));
    CU_ASSERT_STRING_EQUAL(tag, "b1");
    CU_ASSERT_EQUAL(used, strlen(big));
    const char *noop = "b2 NOOP\r\n";
    CU_ASSERT_EQUAL(px_imap_feed(p, noop, strlen(noop), &used), PX_IMAP_DONE);
    /* non-synchronising too large: fatal */
    const char *nbig = "b3 LOGIN {9000+}\r\n";
    CU_ASSERT_EQUAL(px_imap_feed(p, nbig, strlen(nbig), &used), PX_IMAP_FATAL);
    px_imap_parser_reset(p);
    /* a line over max_line without LF: fatal before it is buffered whole */
    char *line = malloc(10000);
    memset(line, 'a', 10000);
    memcpy(line, "c1 LOGIN ", 9);
    CU_ASSERT_EQUAL(px_imap_feed(p, line, 10000, &used), PX_IMAP_FATAL);
    px_imap_tag(p, tag, sizeof(tag));
    CU_ASSERT_STRING_EQUAL(tag, "c1");
    free(line);
    px_imap_parser_reset(p);
    /* digits overflow */
    const char *ov = "d LOGIN {99999999999999999999}\r\n";
    CU_ASSERT_EQUAL(px_imap_feed(p, ov, strlen(ov), &used), PX_IMAP_FATAL);
    px_imap_parser_free(&p);
}

static void test_pop3_and_lines(void)
{
    struct px_pop3_cmd c;
    CU_ASSERT_EQUAL(px_pop3_parse("pass my secret", 14, &c), 0);
    CU_ASSERT_STRING_EQUAL(c.name, "PASS");
    CU_ASSERT_EQUAL(c.arg_len, 9);
    CU_ASSERT(memcmp(c.arg, "my secret", 9) == 0);
    CU_ASSERT_EQUAL(px_pop3_parse("CAPA", 4, &c), 0);
    CU_ASSERT_EQUAL(c.arg_len, 0);
    CU_ASSERT_EQUAL(px_pop3_parse("", 0, &c), -1);
    CU_ASSERT_EQUAL(px_pop3_parse("TOOLONGNAME x", 13, &c), -1);
    size_t ll, u;
    CU_ASSERT_EQUAL(px_find_line("USER a\r\nPASS", 12, 100, &ll, &u), 1);
    CU_ASSERT_EQUAL(ll, 6);
    CU_ASSERT_EQUAL(u, 8);
    CU_ASSERT_EQUAL(px_find_line("USER a", 6, 100, &ll, &u), 0);
    char big[300];
    memset(big, 'x', sizeof(big));
    CU_ASSERT_EQUAL(px_find_line(big, sizeof(big), 100, &ll, &u), -1);
}

static void test_base64_sasl(void)
{
    unsigned char out[64];
    char enc[64];
    const unsigned char msg[] = "\0alice\0s3cret";
    size_t n = px_b64_encode(msg, sizeof(msg) - 1, enc);
    CU_ASSERT_STRING_EQUAL(enc, "AGFsaWNlAHMzY3JldA==");
    long d = px_b64_decode(enc, n, out, sizeof(out));
    CU_ASSERT_EQUAL_FATAL(d, (long)sizeof(msg) - 1);
    struct px_sasl_plain sp;
    CU_ASSERT_EQUAL_FATAL(px_sasl_plain_split(out, (size_t)d, &sp), 0);
    CU_ASSERT_EQUAL(sp.authzid_len, 0);
    CU_ASSERT_EQUAL(sp.authcid_len, 5);
    CU_ASSERT_EQUAL(sp.passwd_len, 6);
    CU_ASSERT_EQUAL(px_b64_decode("AGFsaWNl=AHM", 12, out, sizeof(out)), -1);
    CU_ASSERT_EQUAL(px_b64_decode("abc", 3, out, sizeof(out)), -1);
    CU_ASSERT_EQUAL(px_sasl_plain_split((const unsigned char *)"\0\0pw", 4, &sp), -1);
    CU_ASSERT_EQUAL(px_sasl_plain_split((const unsigned char *)"a\0b\0c\0d", 7, &sp), -1);
}

int main(void)
{
    if (CU_initialize_registry() != CUE_SUCCESS) return 1;
    CU_pSuite s = CU_add_suite("mmp_parse", NULL, NULL);
    CU_add_test(s, "LOGIN with literals, every split", test_login_literals);
    CU_add_test(s, "quoted strings, ID lists, bad input", test_quoted_and_id);
    CU_add_test(s, "line and literal limits", test_limits);
    CU_add_test(s, "POP3 commands and lines", test_pop3_and_lines);
    CU_add_test(s, "base64 and SASL PLAIN", test_base64_sasl);
    CU_basic_set_mode(CU_BRM_VERBOSE);
    CU_basic_run_tests();
    unsigned f = CU_get_number_of_failures();
    CU_cleanup_registry();
    return f != 0;
}
