/* Unit tests for storenode/imap_parser.c and imap_utf7.c.
 *
 * Layout: helpers (a driver that feeds input in chunks of a given size and
 * logs every result in a chunking-independent text form), then tests of
 * command shapes, literals, errors and recovery, mUTF-7 and sequence sets.
 */
#include <CUnit/Basic.h>
#include <CUnit/CUnit.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "imap_parser.h"
#include "mime.h" /* mbuf */

/* ---- helpers -------------------------------------------------------- */

static void dump_arg(const struct imap_arg *a, struct mbuf *o)
{
    switch (a->type) {
    case IMAP_ARG_ATOM:
        mbuf_put(o, a->str, a->len);
        break;
    case IMAP_ARG_QUOTED:
        mbuf_puts(o, "\"");
        mbuf_put(o, a->str, a->len);
        mbuf_puts(o, "\"");
        break;
    case IMAP_ARG_LITERAL:
        mbuf_printf(o, "{%zu}", a->len);
        mbuf_put(o, a->str, a->len);
        break;
    case IMAP_ARG_NIL:
        mbuf_puts(o, "NIL");
        break;
    case IMAP_ARG_LIST:
        mbuf_puts(o, "(");
        for (size_t i = 0; i < a->n_list; i++) {
            if (i) mbuf_puts(o, " ");
            dump_arg(&a->list[i], o);
        }
        mbuf_puts(o, ")");
        break;
    }
}

static void dump_cmd(const struct imap_command *c, struct mbuf *o)
{
    mbuf_printf(o, "CMD[%s %s", c->tag, c->name);
    for (size_t i = 0; i < c->n_args; i++) {
        mbuf_puts(o, " ");
        dump_arg(&c->args[i], o);
    }
    mbuf_puts(o, "]\n");
}

/* Feed in[0..len) in chunks of `chunk` bytes; accept every literal with
 * limit lit_max (0 = parser's default). Returns the log (malloc()ed). */
static char *drive(struct imap_parser *p, const char *in, size_t len, size_t chunk,
                   uint64_t lit_max)
{
    struct mbuf log = {0};
    size_t pos = 0;
    mbuf_put(&log, "", 0);
    int guard = 0;
    while (pos < len && guard++ < 100000) {
        size_t n = len - pos < chunk ? len - pos : chunk;
        size_t used = 99999;
        struct imap_command *cmd = NULL;
        const char *err = NULL;
        enum imap_parse_result r = imap_parser_feed(p, in + pos, n, &used, &cmd, &err);
        CU_ASSERT(used <= n);
        pos += used;
        switch (r) {
        case IMAP_PARSE_NEED_MORE:
            CU_ASSERT(used == n);
            break;
        case IMAP_PARSE_COMMAND:
            dump_cmd(cmd, &log);
            break;
        case IMAP_PARSE_EMPTY_LINE:
            mbuf_puts(&log, "EMPTY\n");
            break;
        case IMAP_PARSE_ERROR:
            mbuf_printf(&log, "ERR[%s:%s]\n", cmd && cmd->tag ? cmd->tag : "-", err);
            break;
        case IMAP_PARSE_LITERAL: {
            const struct imap_literal_info *li = imap_parser_literal(p);
            CU_ASSERT_PTR_NOT_NULL_FATAL(li);
            mbuf_printf(&log, "LIT[%s %s %llu%s #%zu]\n", li->tag ? li->tag : "-",
                        li->name ? li->name : "-", (unsigned long long)li->size,
                        li->non_sync ? "+" : "", li->arg_index);
            imap_parser_literal_accept(p, lit_max);
            break;
        }
        }
    }
    return log.data;
}

static struct imap_parser *mkparser(size_t max_line, size_t max_depth, size_t max_args)
{
    struct imap_parser_limits lim = {max_line, 0, max_depth, max_args};
    return imap_parser_create(&lim);
}

/* Check that input gives `expect` fed whole, in 7-byte pieces and one
 * byte at a time. */
static void check_all_chunkings(const char *in, size_t len, const char *expect, size_t max_line,
                                size_t max_depth, size_t max_args)
{
    static const size_t chunks[] = {100000, 7, 1};
    if (len == 0) len = strlen(in);
    for (size_t k = 0; k < 3; k++) {
        struct imap_parser *p = mkparser(max_line, max_depth, max_args);
        char *got = drive(p, in, len, chunks[k], 0);
        if (strcmp(got, expect) != 0)
            fprintf(stderr, "\nchunk %zu:\n got: %s\nwant: %s\n", chunks[k], got, expect);
        CU_ASSERT_STRING_EQUAL(got, expect);
        free(got);
        imap_parser_destroy(&p);
        CU_ASSERT_PTR_NULL(p);
    }
}

#define CHECK(in, expect) check_all_chunkings(in, sizeof(in) - 1, expect, 0, 0, 0)

/* ---- command shapes ------------------------------------------------- */

static void test_shapes(void)
{
    CHECK("a1 LOGIN \"user\" \"pa\\\"ss\\\\\"\r\n", "CMD[a1 LOGIN \"user\" \"pa\"ss\\\"]\n");
    CHECK("a2 login {4}\r\nuser {4}\r\np\"s@\r\n",
          "LIT[a2 LOGIN 4 #0]\nLIT[a2 LOGIN 4 #1]\nCMD[a2 LOGIN {4}user {4}p\"s@]\n");
    CHECK("a3 APPEND INBOX (\\Seen $Junk) \"27-Nov-2026 10:00:00 +0000\" {11}\r\nhello "
          "world\r\n",
          "LIT[a3 APPEND 11 #3]\nCMD[a3 APPEND INBOX (\\Seen $Junk) \"27-Nov-2026 10:00:00 "
          "+0000\" {11}hello world]\n");
    CHECK("a4 FETCH 1:* (FLAGS BODY.PEEK[HEADER.FIELDS (FROM TO)]<0.100>)\r\n",
          "CMD[a4 FETCH 1:* (FLAGS BODY.PEEK[HEADER.FIELDS (FROM TO)]<0.100>)]\n");
    CHECK("a5 UID SEARCH CHARSET UTF-8 OR (FROM \"x y\" SUBJECT z) NOT (OR SEEN (DELETED "
          "(DRAFT)))\r\n",
          "CMD[a5 UID SEARCH CHARSET UTF-8 OR (FROM \"x y\" SUBJECT z) NOT (OR SEEN (DELETED "
          "(DRAFT)))]\n");
    CHECK("a6 STORE 1,3:5 +FLAGS.SILENT (\\Seen)\r\n",
          "CMD[a6 STORE 1,3:5 +FLAGS.SILENT (\\Seen)]\n");
    CHECK("a7 list \"\" *\r\na8 Uid fetch 1 (BODY[1.2.MIME] BODY[])\n",
          "CMD[a7 LIST \"\" *]\nCMD[a8 UID fetch 1 (BODY[1.2.MIME] BODY[])]\n");
    CHECK("a9 SELECT nil\r\nb0 X () (()) \"\"\r\n", "CMD[a9 SELECT NIL]\nCMD[b0 X () (()) \"\"]\n");
    /* literal inside a list, continuing the same command */
    CHECK("b1 X (A {3}\r\nb c) D\r\n", "LIT[b1 X 3 #0]\nCMD[b1 X (A {3}b c) D]\n");
    /* zero-length literal and a literal holding CRLF and NUL */
    CHECK("b2 X {0}\r\n {4}\r\n\r\n\x01z\r\n",
          "LIT[b2 X 0 #0]\nLIT[b2 X 4 #1]\nCMD[b2 X {0} {4}\r\n\x01z]\n");
}

static void test_arg_types(void)
{
    struct imap_parser *p = imap_parser_create(NULL);
    const char in[] = "t1 LOGIN user \"q\" {1}\r\nx NIL (a)\r\n";
    size_t used, total = 0;
    struct imap_command *cmd;
    const char *err;
    enum imap_parse_result r = imap_parser_feed(p, in, sizeof(in) - 1, &used, &cmd, &err);
    CU_ASSERT_EQUAL(r, IMAP_PARSE_LITERAL);
    total += used;
    imap_parser_literal_accept(p, 0);
    r = imap_parser_feed(p, in + total, sizeof(in) - 1 - total, &used, &cmd, &err);
    CU_ASSERT_EQUAL_FATAL(r, IMAP_PARSE_COMMAND);
    total += used;
    CU_ASSERT_EQUAL(total, sizeof(in) - 1);
    CU_ASSERT_STRING_EQUAL(cmd->tag, "t1");
    CU_ASSERT_STRING_EQUAL(cmd->name, "LOGIN");
    CU_ASSERT_EQUAL_FATAL(cmd->n_args, 5);
    CU_ASSERT_EQUAL(cmd->args[0].type, IMAP_ARG_ATOM);
    CU_ASSERT_EQUAL(cmd->args[1].type, IMAP_ARG_QUOTED);
    CU_ASSERT_EQUAL(cmd->args[2].type, IMAP_ARG_LITERAL);
    CU_ASSERT_EQUAL(cmd->args[3].type, IMAP_ARG_NIL);
    CU_ASSERT_EQUAL(cmd->args[4].type, IMAP_ARG_LIST);
    CU_ASSERT(imap_arg_is_astring(&cmd->args[0]));
    CU_ASSERT(imap_arg_is_string(&cmd->args[2]));
    CU_ASSERT(!imap_arg_is_string(&cmd->args[3]));
    CU_ASSERT(!imap_arg_is_string(&cmd->args[4]));
    CU_ASSERT(imap_arg_eq(&cmd->args[0], "USER"));
    CU_ASSERT(!imap_arg_eq(&cmd->args[0], "use"));
    size_t ll = 0;
    char *lit = imap_parser_take_literal(p, &cmd->args[2], &ll);
    CU_ASSERT_PTR_NOT_NULL_FATAL(lit);
    CU_ASSERT_EQUAL(ll, 1);
    CU_ASSERT_EQUAL(lit[0], 'x');
    CU_ASSERT_EQUAL(lit[1], '\0');
    CU_ASSERT_PTR_NULL(imap_parser_take_literal(p, &cmd->args[2], &ll));
    /* next feed frees the arena but not the taken literal */
    r = imap_parser_feed(p, "t2 NOOP\r\n", 9, &used, &cmd, &err);
    CU_ASSERT_EQUAL(r, IMAP_PARSE_COMMAND);
    CU_ASSERT_EQUAL(lit[0], 'x');
    free(lit);
    imap_parser_destroy(&p);
}

/* ---- literals ------------------------------------------------------- */
/* A literal bigger than the initial buffer, fed in uneven pieces. */
static void test_big_literal(void)
{
    const size_t N = 150001;
    struct mbuf in = {0};
    mbuf_printf(&in, "n1 APPEND INBOX {%zu}\r\n", N);
    size_t data_at = in.len;
    for (size_t i = 0; i < N; i++) {
        char c = (char)('a' + i % 26);
        mbuf_put(&in, &c, 1);
    }
    mbuf_puts(&in, "\r\n");
    struct imap_parser *p = imap_parser_create(NULL);
    size_t pos = 0, used;
    struct imap_command *cmd = NULL;
    const char *err;
    enum imap_parse_result r = IMAP_PARSE_NEED_MORE;
    while (pos < in.len) {
        size_t n = in.len - pos < 997 ? in.len - pos : 997;
        r = imap_parser_feed(p, in.data + pos, n, &used, &cmd, &err);
        pos += used;
        if (r == IMAP_PARSE_LITERAL) imap_parser_literal_accept(p, 1000000);
        if (r == IMAP_PARSE_COMMAND) break;
    }
    CU_ASSERT_EQUAL_FATAL(r, IMAP_PARSE_COMMAND);
    CU_ASSERT_EQUAL(pos, in.len);
    CU_ASSERT_EQUAL_FATAL(cmd->n_args, 2);
    CU_ASSERT_EQUAL(cmd->args[1].type, IMAP_ARG_LITERAL);
    CU_ASSERT_EQUAL_FATAL(cmd->args[1].len, N);
    CU_ASSERT_EQUAL(memcmp(cmd->args[1].str, in.data + data_at, N), 0);
    CU_ASSERT_EQUAL(cmd->args[1].str[N], '\0');
    mbuf_free(&in);
    imap_parser_destroy(&p);
}

static void test_literal_plus(void)
{
    /* LITERAL+ needs no continuation: the bytes follow directly */
    CHECK("c1 LOGIN {3+}\r\nabc {3+}\r\ndef\r\nc2 NOOP\r\n",
          "LIT[c1 LOGIN 3+ #0]\nLIT[c1 LOGIN 3+ #1]\nCMD[c1 LOGIN {3}abc {3}def]\nCMD[c2 "
          "NOOP]\n");
}

static void test_literal_too_big(void)
{
    const char in[] = "d1 LOGIN {100}\r\n";
    struct imap_parser *p = imap_parser_create(NULL);
    char *got = drive(p, in, sizeof(in) - 1, 1, 10);
    /* accepted with a limit of 10: the next feed reports the error */
    size_t used;
    struct imap_command *cmd;
    const char *err;
    enum imap_parse_result r = imap_parser_feed(p, "", 0, &used, &cmd, &err);
    CU_ASSERT_STRING_EQUAL(got, "LIT[d1 LOGIN 100 #0]\n");
    CU_ASSERT_EQUAL(r, IMAP_PARSE_ERROR);
    CU_ASSERT_STRING_EQUAL(err, "literal too big");
    CU_ASSERT_PTR_NOT_NULL_FATAL(cmd);
    CU_ASSERT_STRING_EQUAL(cmd->tag, "d1");
    free(got);
    imap_parser_destroy(&p);

    /* overflowing size */
    CHECK("d2 LOGIN {99999999999999999999999}\r\nd3 NOOP\r\n",
          "ERR[d2:literal too big]\nCMD[d3 NOOP]\n");
}

static void test_literal_reject(void)
{
    struct imap_parser *p = imap_parser_create(NULL);
    size_t used;
    struct imap_command *cmd;
    const char *err;
    const char in1[] = "e1 APPEND X {5}\r\n";
    CU_ASSERT_EQUAL(imap_parser_feed(p, in1, sizeof(in1) - 1, &used, &cmd, &err),
                    IMAP_PARSE_LITERAL);
    CU_ASSERT_EQUAL(used, sizeof(in1) - 1);
    /* still waiting: feeding more consumes nothing */
    CU_ASSERT_EQUAL(imap_parser_feed(p, "x", 1, &used, &cmd, &err), IMAP_PARSE_LITERAL);
    CU_ASSERT_EQUAL(used, 0);
    CU_ASSERT_EQUAL(imap_parser_literal_reject(p), 0);
    CU_ASSERT_EQUAL(imap_parser_feed(p, "e2 NOOP\r\n", 9, &used, &cmd, &err), IMAP_PARSE_COMMAND);
    CU_ASSERT_STRING_EQUAL(cmd->tag, "e2");

    /* non-synchronising: the bytes are skipped, the session must close */
    const char in2[] = "e3 APPEND X {5+}\r\n";
    CU_ASSERT_EQUAL(imap_parser_feed(p, in2, sizeof(in2) - 1, &used, &cmd, &err),
                    IMAP_PARSE_LITERAL);
    CU_ASSERT_EQUAL(imap_parser_literal_reject(p), 1);
    char *got = drive(p, "hello more\r\ne4 NOOP\r\n", 21, 1, 0);
    CU_ASSERT_STRING_EQUAL(got, "CMD[e4 NOOP]\n");
    free(got);
    imap_parser_destroy(&p);
}

/* The literal info carries the top-level args parsed so far (for APPEND's
 * TRYCREATE check before "+"). */
static void test_literal_args(void)
{
    struct imap_parser *p = imap_parser_create(NULL);
    size_t used;
    struct imap_command *cmd;
    const char *err;
    const char in1[] = "a1 APPEND \"Box 1\" (\\Seen) {5}\r\n";
    CU_ASSERT_EQUAL(imap_parser_feed(p, in1, sizeof(in1) - 1, &used, &cmd, &err),
                    IMAP_PARSE_LITERAL);
    const struct imap_literal_info *li = imap_parser_literal(p);
    CU_ASSERT_PTR_NOT_NULL_FATAL(li);
    CU_ASSERT_EQUAL(li->n_args, 2);
    CU_ASSERT_EQUAL(li->arg_index, 2);
    CU_ASSERT_PTR_NOT_NULL_FATAL(li->args);
    CU_ASSERT_EQUAL(li->args[0].type, IMAP_ARG_QUOTED);
    CU_ASSERT_EQUAL(li->args[0].len, 5);
    CU_ASSERT_NSTRING_EQUAL(li->args[0].str, "Box 1", 5);
    CU_ASSERT_EQUAL(li->args[1].type, IMAP_ARG_LIST);
    CU_ASSERT_EQUAL(li->args[1].n_list, 1);
    imap_parser_literal_reject(p);

    /* mailbox name as a literal, then the message literal */
    const char in2[] = "a2 APPEND {3}\r\n";
    CU_ASSERT_EQUAL(imap_parser_feed(p, in2, sizeof(in2) - 1, &used, &cmd, &err),
                    IMAP_PARSE_LITERAL);
    li = imap_parser_literal(p);
    CU_ASSERT_EQUAL(li->n_args, 0);
    CU_ASSERT_EQUAL(li->arg_index, 0);
    imap_parser_literal_accept(p, 0);
    const char in3[] = "Box {4}\r\n";
    CU_ASSERT_EQUAL(imap_parser_feed(p, in3, sizeof(in3) - 1, &used, &cmd, &err),
                    IMAP_PARSE_LITERAL);
    li = imap_parser_literal(p);
    CU_ASSERT_EQUAL(li->n_args, 1);
    CU_ASSERT_EQUAL(li->arg_index, 1);
    CU_ASSERT_EQUAL(li->args[0].type, IMAP_ARG_LITERAL);
    CU_ASSERT_NSTRING_EQUAL(li->args[0].str, "Box", 3);
    imap_parser_literal_accept(p, 0);
    CU_ASSERT_EQUAL(imap_parser_feed(p, "abcd\r\n", 6, &used, &cmd, &err), IMAP_PARSE_COMMAND);
    CU_ASSERT_EQUAL(cmd->n_args, 2);

    /* a literal inside a list: arg_index names the (unfinished) list */
    const char in4[] = "a3 X (a {2}\r\n";
    CU_ASSERT_EQUAL(imap_parser_feed(p, in4, sizeof(in4) - 1, &used, &cmd, &err),
                    IMAP_PARSE_LITERAL);
    li = imap_parser_literal(p);
    CU_ASSERT_EQUAL(li->n_args, 1);
    CU_ASSERT_EQUAL(li->arg_index, 0);
    imap_parser_destroy(&p);
}

/* A segment that fills max_line exactly, then a literal, then more text:
 * the over-limit path must not read past the input (fuzz regression). */
static void test_line_limit_after_literal(void)
{
    struct imap_parser_limits lim = {20, 0, 0, 0};
    struct imap_parser *p = imap_parser_create(&lim);
    size_t used;
    struct imap_command *cmd;
    const char *err;
    const char in1[] = "a1 X 12345678901 {1}\n"; /* 20 bytes of text: at the limit */
    CU_ASSERT_EQUAL(imap_parser_feed(p, in1, sizeof(in1) - 1, &used, &cmd, &err),
                    IMAP_PARSE_LITERAL);
    imap_parser_literal_accept(p, 0);
    char *rest = malloc(5); /* exact size, so ASan sees any over-read */
    memcpy(rest, "z abc", 5);
    enum imap_parse_result r = imap_parser_feed(p, rest, 5, &used, &cmd, &err);
    CU_ASSERT_EQUAL(r, IMAP_PARSE_ERROR);
    CU_ASSERT_PTR_NOT_NULL_FATAL(cmd);
    CU_ASSERT_STRING_EQUAL(cmd->tag, "a1");
    CU_ASSERT_STRING_EQUAL(err, "line too long");
    free(rest);
    char *got = drive(p, "\r\na2 NOOP\r\n", 11, 1, 0);
    CU_ASSERT_STRING_EQUAL(got, "CMD[a2 NOOP]\n");
    free(got);
    imap_parser_destroy(&p);
}

/* compact() frees the last command's memory between commands and is a
 * no-op in the middle of one. */
static void test_compact(void)
{
    struct imap_parser *p = imap_parser_create(NULL);
    size_t used;
    struct imap_command *cmd;
    const char *err;
    imap_parser_compact(p); /* fresh parser */
    CU_ASSERT_EQUAL(imap_parser_feed(p, "c1 NOOP\r\n", 9, &used, &cmd, &err), IMAP_PARSE_COMMAND);
    imap_parser_compact(p);
    /* partial line: kept across compact */
    CU_ASSERT_EQUAL(imap_parser_feed(p, "c2 SEL", 6, &used, &cmd, &err), IMAP_PARSE_NEED_MORE);
    imap_parser_compact(p);
    CU_ASSERT_EQUAL(imap_parser_feed(p, "ECT x\r\n", 7, &used, &cmd, &err), IMAP_PARSE_COMMAND);
    CU_ASSERT_STRING_EQUAL(cmd->name, "SELECT");
    CU_ASSERT_EQUAL(cmd->n_args, 1);
    imap_parser_compact(p);
    /* inside a command continued after a literal */
    CU_ASSERT_EQUAL(imap_parser_feed(p, "c3 LOGIN {1}\r\n", 14, &used, &cmd, &err),
                    IMAP_PARSE_LITERAL);
    imap_parser_compact(p);
    imap_parser_literal_accept(p, 0);
    CU_ASSERT_EQUAL(imap_parser_feed(p, "u", 1, &used, &cmd, &err), IMAP_PARSE_NEED_MORE);
    imap_parser_compact(p);
    CU_ASSERT_EQUAL(imap_parser_feed(p, " pw\r\n", 5, &used, &cmd, &err), IMAP_PARSE_COMMAND);
    CU_ASSERT_EQUAL(cmd->n_args, 2);
    CU_ASSERT_NSTRING_EQUAL(cmd->args[0].str, "u", 1);
    CU_ASSERT_STRING_EQUAL(cmd->args[1].str, "pw");
    imap_parser_compact(p);
    /* read_line mode (IDLE's DONE), then commands again */
    const char *line;
    size_t llen;
    CU_ASSERT_EQUAL(imap_parser_read_line(p, "DONE\r\n", 6, &used, &line, &llen), 1);
    imap_parser_compact(p);
    CU_ASSERT_EQUAL(imap_parser_feed(p, "c4 NOOP\r\n", 9, &used, &cmd, &err), IMAP_PARSE_COMMAND);
    CU_ASSERT_STRING_EQUAL(cmd->tag, "c4");
    imap_parser_destroy(&p);
}

/* ---- errors and recovery -------------------------------------------- */

static void test_line_too_long(void)
{
    char in[400];
    size_t n = 0;
    n += (size_t)sprintf(in + n, "f1 NOOP ");
    for (int i = 0; i < 200; i++)
        in[n++] = 'A';
    n += (size_t)sprintf(in + n, " {5+}\r\nf2 NOOP\r\n");
    static const size_t chunks[] = {100000, 7, 1};
    for (size_t k = 0; k < 3; k++) {
        struct imap_parser *p = mkparser(64, 0, 0);
        char *got = drive(p, in, n, chunks[k], 0);
        /* the {5+} at the end of the over-long line makes "f2 N" literal data */
        CU_ASSERT_STRING_EQUAL(got, "ERR[f1:line too long]\n");
        free(got);
        imap_parser_destroy(&p);
    }
    char in2[400];
    n = 0;
    n += (size_t)sprintf(in2 + n, "f1 NOOP ");
    for (int i = 0; i < 200; i++)
        in2[n++] = 'A';
    n += (size_t)sprintf(in2 + n, "\r\nf2 NOOP\r\n");
    for (size_t k = 0; k < 3; k++) {
        struct imap_parser *p = mkparser(64, 0, 0);
        char *got = drive(p, in2, n, chunks[k], 0);
        CU_ASSERT_STRING_EQUAL(got, "ERR[f1:line too long]\nCMD[f2 NOOP]\n");
        free(got);
        imap_parser_destroy(&p);
    }
    /* line budget counts text across literals */
    check_all_chunkings(
        "f3 X {1}\r\na AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA\r\nf4 Y\r\n", 0,
        "LIT[f3 X 1 #0]\nERR[f3:line too long]\nCMD[f4 Y]\n", 40, 0, 0);
}

static void test_garbage(void)
{
    CHECK("g1 NOOP a\0b\r\ng2 NOOP caf\xc3\xa9\r\ng3 NOOP\r\n",
          "ERR[g1:invalid character in atom]\nERR[g2:invalid character in atom]\nCMD[g3 "
          "NOOP]\n");
    CHECK("\x01\x02 junk\r\n+x NOOP\r\n* OK\r\ng4 NOOP\r\n",
          "ERR[-:invalid tag]\nERR[-:invalid tag]\nERR[-:invalid tag]\nCMD[g4 NOOP]\n");
    CHECK("g5\r\ng6 \r\ng7 NO\"OP\r\n",
          "ERR[g5:missing command]\nERR[g6:missing command]\nERR[g7:invalid character in "
          "command name]\n");
    CHECK("g8 LOGIN \"abc\r\ng9 LOGIN \"a\\b\"\r\nh0 X a\"b\"\r\n",
          "ERR[g8:unterminated quoted string]\nERR[g9:invalid escape in quoted string]\nERR[h0:"
          "invalid character in atom]\n");
    CHECK("h1 X {5}x\r\nh2 X {}\r\nh3 X {-1}\r\n",
          "ERR[h1:literal must end the line]\nERR[h2:invalid literal size]\nERR[h3:invalid "
          "literal size]\n");
    /* an error on a line ending in {n+}: the literal bytes are skipped */
    CHECK("h4 X \"a {3+}\r\nabc rest\r\nh5 NOOP\r\n",
          "ERR[h4:unterminated quoted string]\nCMD[h5 NOOP]\n");
}

static void test_parens(void)
{
    CHECK("i1 FETCH 1 (FLAGS\r\ni2 FETCH 1 FLAGS)\r\ni3 X (a)(b)\r\ni4 X a(b)\r\n",
          "ERR[i1:missing ')']\nERR[i2:unexpected ')']\nERR[i3:missing space between "
          "arguments]\nERR[i4:missing space between arguments]\n");
    /* '[' without ']' is an ordinary atom char; "[...]" may hold spaces */
    CHECK("i5 X BODY[a b\r\ni6 SELECT [Gmail]/Drafts\r\ni7 X a[b c]d[e] f\r\n",
          "CMD[i5 X BODY[a b]\nCMD[i6 SELECT [Gmail]/Drafts]\nCMD[i7 X a[b c]d[e] f]\n");

    struct imap_parser *p = imap_parser_create(NULL);
    size_t used;
    struct imap_command *cmd;
    const char *err;
    const char in[] = "i8 X [Gmail]/Sent a]b BODY[1 2] 1:* % \\Seen\r\n";
    CU_ASSERT_EQUAL_FATAL(imap_parser_feed(p, in, sizeof(in) - 1, &used, &cmd, &err),
                          IMAP_PARSE_COMMAND);
    CU_ASSERT_EQUAL_FATAL(cmd->n_args, 6);
    CU_ASSERT(imap_arg_is_astring(&cmd->args[0]));
    CU_ASSERT(imap_arg_is_astring(&cmd->args[1]));
    CU_ASSERT(!imap_arg_is_astring(&cmd->args[2]));
    CU_ASSERT(!imap_arg_is_astring(&cmd->args[3]));
    CU_ASSERT(!imap_arg_is_astring(&cmd->args[4]));
    CU_ASSERT(!imap_arg_is_astring(&cmd->args[5]));
    CU_ASSERT(imap_arg_is_string(&cmd->args[5]));
    imap_parser_destroy(&p);
}

static void test_depth_and_args(void)
{
    check_all_chunkings("j1 X (((a)))\r\nj2 X ((((a))))\r\nj3 X\r\n", 0,
                        "CMD[j1 X (((a)))]\nERR[j2:nested too deep]\nCMD[j3 X]\n", 0, 3, 0);
    check_all_chunkings("j4 X a b c d e\r\nj5 X a b (c d) e f\r\nj6 X {1}\r\na b c d e f\r\n", 0,
                        "CMD[j4 X a b c d e]\nERR[j5:too many arguments]\nLIT[j6 X 1 #0]\n"
                        "ERR[j6:too many arguments]\n",
                        0, 0, 5);
}

static void test_empty_and_lf(void)
{
    CHECK("\r\n\nk1 NOOP\nk2 CAPABILITY\r\n", "EMPTY\nEMPTY\nCMD[k1 NOOP]\nCMD[k2 CAPABILITY]\n");
}

static void test_read_line(void)
{
    struct imap_parser *p = imap_parser_create(NULL);
    size_t used;
    struct imap_command *cmd;
    const char *err;
    const char *line;
    size_t ll;
    const char in[] = "l1 AUTHENTICATE PLAIN\r\nAGZv";
    CU_ASSERT_EQUAL(imap_parser_feed(p, in, sizeof(in) - 1, &used, &cmd, &err), IMAP_PARSE_COMMAND);
    CU_ASSERT_EQUAL(used, 23);
    CU_ASSERT_EQUAL(imap_parser_read_line(p, in + used, 4, &used, &line, &ll), 0);
    CU_ASSERT_EQUAL(used, 4);
    CU_ASSERT_STRING_EQUAL(cmd->name, "AUTHENTICATE"); /* still valid */
    CU_ASSERT_EQUAL(imap_parser_read_line(p, "AGJh\r\nDONE\n", 11, &used, &line, &ll), 1);
    CU_ASSERT_EQUAL(used, 6);
    CU_ASSERT_EQUAL(ll, 8);
    CU_ASSERT_STRING_EQUAL(line, "AGZvAGJh");
    CU_ASSERT_EQUAL(imap_parser_read_line(p, "DONE\n", 5, &used, &line, &ll), 1);
    CU_ASSERT_STRING_EQUAL(line, "DONE");
    CU_ASSERT_EQUAL(imap_parser_feed(p, "l2 NOOP\r\n", 9, &used, &cmd, &err), IMAP_PARSE_COMMAND);
    CU_ASSERT_STRING_EQUAL(cmd->tag, "l2");
    imap_parser_destroy(&p);

    p = mkparser(8, 0, 0);
    CU_ASSERT_EQUAL(imap_parser_read_line(p, "0123456789\r\n", 12, &used, &line, &ll), -1);
    imap_parser_destroy(&p);
}

static void test_reset(void)
{
    struct imap_parser *p = imap_parser_create(NULL);
    size_t used;
    struct imap_command *cmd;
    const char *err;
    CU_ASSERT_EQUAL(imap_parser_feed(p, "m1 NO", 5, &used, &cmd, &err), IMAP_PARSE_NEED_MORE);
    imap_parser_reset(p);
    CU_ASSERT_EQUAL(imap_parser_feed(p, "m2 NOOP\r\n", 9, &used, &cmd, &err), IMAP_PARSE_COMMAND);
    CU_ASSERT_STRING_EQUAL(cmd->tag, "m2");
    imap_parser_destroy(&p);
}

/* ---- mUTF-7 --------------------------------------------------------- */

static void roundtrip(const char *utf8, const char *mutf7)
{
    char *e = imap_utf8_to_mutf7(utf8, strlen(utf8));
    CU_ASSERT_PTR_NOT_NULL_FATAL(e);
    if (strcmp(e, mutf7) != 0) fprintf(stderr, "\nencode %s: got %s want %s\n", utf8, e, mutf7);
    CU_ASSERT_STRING_EQUAL(e, mutf7);
    char *d = imap_mutf7_to_utf8(mutf7, strlen(mutf7));
    CU_ASSERT_PTR_NOT_NULL_FATAL(d);
    CU_ASSERT_STRING_EQUAL(d, utf8);
    free(e);
    free(d);
}

static void test_mutf7(void)
{
    roundtrip("INBOX", "INBOX");
    roundtrip("Entwürfe", "Entw&APw-rfe");
    roundtrip("&", "&-");
    roundtrip("a&b&&", "a&-b&-&-");
    roundtrip("", "");
    roundtrip("~peter/mail/台北/日本語", "~peter/mail/&U,BTFw-/&ZeVnLIqe-");
    roundtrip("😀", "&2D3eAA-");
    roundtrip("x😀y€", "x&2D3eAA-y&IKw-");
    roundtrip("Ää", "&AMQA5A-");
    roundtrip("\x01", "&AAE-");

    static const char *const bad[] = {
        "&AGE-",       /* 'a' must be direct */
        "&",           /* unterminated */
        "&AOQ",        /* unterminated */
        "&AO?-",       /* bad base64 */
        "&AOQ-&AOQ-",  /* adjacent runs */
        "&AOR-",       /* non-zero padding bits */
        "&AOQA-",      /* extra sextet */
        "&2D0-",       /* lone high surrogate */
        "&3gA-",       /* lone low surrogate */
        "&2D3YPQ-",    /* high surrogate followed by high surrogate */
        "&-&",         /* unterminated after escape */
        "caf\xc3\xa9", /* 8-bit */
        "a\tb",        /* control */
        "&AA-",        /* partial unit */
        "&AAA-",       /* NUL */
    };
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        char *d = imap_mutf7_to_utf8(bad[i], strlen(bad[i]));
        if (d != NULL) fprintf(stderr, "\naccepted bad mutf7 %s -> %s\n", bad[i], d);
        CU_ASSERT_PTR_NULL(d);
        free(d);
    }
    char *nul = imap_utf8_to_mutf7("a\0b", 3);
    CU_ASSERT_PTR_NULL(nul);
    free(nul);
    static const char *const bad8[] = {"\xc3", "\xc0\xa1", "\xed\xa0\x80", "\xf4\x90\x80\x80",
                                       "a\xff"};
    for (size_t i = 0; i < sizeof(bad8) / sizeof(bad8[0]); i++) {
        char *e = imap_utf8_to_mutf7(bad8[i], strlen(bad8[i]));
        CU_ASSERT_PTR_NULL(e);
        free(e);
    }
}

/* ---- sequence sets -------------------------------------------------- */

static int seq(const char *s, uint32_t star, size_t max, char *out)
{
    struct imap_seq_range *r;
    size_t n;
    out[0] = '\0';
    if (imap_seqset_parse(s, strlen(s), star, &r, &n, max) < 0) return -1;
    for (size_t i = 0; i < n; i++)
        sprintf(out + strlen(out), "%s%u:%u", i ? "," : "", r[i].lo, r[i].hi);
    free(r);
    return 0;
}

static void test_seqset(void)
{
    char b[256];
    CU_ASSERT_EQUAL(seq("1", 10, 100, b), 0);
    CU_ASSERT_STRING_EQUAL(b, "1:1");
    CU_ASSERT_EQUAL(seq("1,3:5,7:*", 10, 100, b), 0);
    CU_ASSERT_STRING_EQUAL(b, "1:1,3:5,7:10");
    CU_ASSERT_EQUAL(seq("5:2,1,6,9:8,20:*", 10, 100, b), 0);
    CU_ASSERT_STRING_EQUAL(b, "1:6,8:20");
    CU_ASSERT_EQUAL(seq("*", 42, 100, b), 0);
    CU_ASSERT_STRING_EQUAL(b, "42:42");
    CU_ASSERT_EQUAL(seq("4294967295,1:4294967295", 1, 100, b), 0);
    CU_ASSERT_STRING_EQUAL(b, "1:4294967295");
    static const char *const bad[] = {"0",    "1:0",        "",   ",", "1,",  ",1", "1::2", "a",
                                      "1:*x", "4294967296", "01", "$", "1 2", "-1", "1:2:3"};
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        int r = seq(bad[i], 10, 100, b);
        if (r == 0) fprintf(stderr, "\naccepted bad seqset '%s'\n", bad[i]);
        CU_ASSERT_EQUAL(r, -1);
    }
    CU_ASSERT_EQUAL(seq("1,2,3", 10, 2, b), -1); /* max_ranges */
    CU_ASSERT_EQUAL(seq("1,2", 10, 2, b), 0);
    CU_ASSERT_STRING_EQUAL(b, "1:2");

    struct imap_seq_range *r;
    size_t n;
    CU_ASSERT_EQUAL_FATAL(imap_seqset_parse("2:4,10,20:30", 12, 0, &r, &n, 10), 0);
    CU_ASSERT_EQUAL(n, 3);
    CU_ASSERT(!imap_seqset_contains(r, n, 1));
    CU_ASSERT(imap_seqset_contains(r, n, 2));
    CU_ASSERT(imap_seqset_contains(r, n, 4));
    CU_ASSERT(!imap_seqset_contains(r, n, 5));
    CU_ASSERT(imap_seqset_contains(r, n, 10));
    CU_ASSERT(imap_seqset_contains(r, n, 25));
    CU_ASSERT(!imap_seqset_contains(r, n, 31));
    free(r);
}

/* Pathological lines must stay linear (would take minutes if quadratic). */
static void test_linear_time(void)
{
    struct mbuf in = {0};
    mbuf_puts(&in, "p1 X");
    while (in.len < 60000)
        mbuf_puts(&in, " a[ \"x");
    mbuf_puts(&in, "]\r\np2 X");
    while (in.len < 120000)
        mbuf_puts(&in, " b[\x01");
    mbuf_puts(&in, "]\r\n");
    struct imap_parser_limits lim = {100000, 0, 0, 100000};
    struct imap_parser *p = imap_parser_create(&lim);
    clock_t t0 = clock();
    char *got = drive(p, in.data, in.len, 100000000, 0);
    double secs = (double)(clock() - t0) / CLOCKS_PER_SEC;
    CU_ASSERT(secs < 2.0);
    CU_ASSERT_PTR_NOT_NULL(strstr(got, "CMD[p1 X a[ \"x a[ \"x"));
    if (strstr(got, "ERR[p2:") == NULL) fprintf(stderr, "\n%.200s\n", got + strlen(got) - 200);
    CU_ASSERT_PTR_NOT_NULL(strstr(got, "ERR[p2:"));
    free(got);
    imap_parser_destroy(&p);
    mbuf_free(&in);
}

int main(void)
{
    if (CU_initialize_registry() != CUE_SUCCESS) return 1;
    CU_pSuite s = CU_add_suite("imap_parser", NULL, NULL);
    CU_add_test(s, "command shapes", test_shapes);
    CU_add_test(s, "arg types and take_literal", test_arg_types);
    CU_add_test(s, "big literal", test_big_literal);
    CU_add_test(s, "LITERAL+", test_literal_plus);
    CU_add_test(s, "literal too big", test_literal_too_big);
    CU_add_test(s, "literal reject", test_literal_reject);
    CU_add_test(s, "literal info args", test_literal_args);
    CU_add_test(s, "compact", test_compact);
    CU_add_test(s, "line limit after literal", test_line_limit_after_literal);
    CU_add_test(s, "line too long", test_line_too_long);
    CU_add_test(s, "garbage", test_garbage);
    CU_add_test(s, "parens", test_parens);
    CU_add_test(s, "depth and args", test_depth_and_args);
    CU_add_test(s, "empty line and LF", test_empty_and_lf);
    CU_add_test(s, "read_line", test_read_line);
    CU_add_test(s, "reset", test_reset);
    CU_add_test(s, "mUTF-7", test_mutf7);
    CU_add_test(s, "seqset", test_seqset);
    CU_add_test(s, "linear time", test_linear_time);
    CU_basic_set_mode(CU_BRM_VERBOSE);
    CU_basic_run_tests();
    int fails = (int)CU_get_number_of_failures();
    CU_cleanup_registry();
    return fails != 0;
}
