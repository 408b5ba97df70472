/* Unit tests for storenode/mime.c and mime_search.c.
 *
 * Expected ENVELOPE/BODYSTRUCTURE strings are written by hand from RFC 3501
 * section 7.4.2 (sizes/lines counted from the literal messages below).
 */
#include <CUnit/Basic.h>
#include <CUnit/CUnit.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "mime.h"

/* ---- fixtures: messages --------------------------------------------- */

static const char M1[] = "From: Alice <alice@example.com>\r\n"
                         "To: bob@example.org\r\n"
                         "Subject: Hello\r\n"
                         "Date: Fri, 27 Nov 2026 10:00:00 +0100\r\n"
                         "Message-ID: <abc@example.com>\r\n"
                         "\r\n"
                         "Hi Bob\r\n"
                         "Bye\r\n";

static const char M2[] =
    "From: a@b.c\r\nSubject: mixed\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; "
    "boundary=\"XYZ\"\r\n\r\n"
    "This is a preamble\r\n--XYZ\r\nContent-Type: text/plain; charset=utf-8\r\n"
    "Content-Transfer-Encoding: quoted-printable\r\n\r\n"
    "Caf=C3=A9 au lait\r\n--XYZ\r\nContent-Type: application/pdf; name=\"doc.pdf\"\r\n"
    "Content-Transfer-Encoding: base64\r\n"
    "Content-Disposition: attachment; filename=\"doc.pdf\"\r\n\r\nc2VjcmV0IHBkZg==\r\n--XYZ\r\n"
    "Content-Type: text/plain\r\nContent-Transfer-Encoding: base64\r\n\r\nSGVsbG8gV29ybGQg\r\n"
    "ZnJvbSBiYXNlNjQ=\r\n--XYZ--\r\nepilogue\r\n";

static const char M3[] =
    "From: a@b.c\r\nSubject: nested\r\nContent-Type: multipart/mixed; boundary=outer\r\n\r\n"
    "--outer\r\nContent-Type: multipart/alternative; boundary=\"inner\"\r\n\r\n"
    "--inner\r\nContent-Type: text/plain\r\n\r\nplain text\r\n--inner\r\n"
    "Content-Type: text/html; charset=\"iso-8859-1\"\r\n\r\n<p>html</p>\r\n--inner--\r\n"
    "--outer\r\nContent-Type: message/rfc822\r\nContent-Description: forwarded\r\n\r\n"
    "From: Carol <carol@x.org>\r\nSubject: inner msg\r\nDate: 1 Jan 2020 00:00 GMT\r\n\r\n"
    "inner body\r\n--outer--\r\n";

static const char M4[] =
    "Subject: =?utf-8?q?Gr=C3=BC=C3=9Fe?= from\r\n folded line\r\n"
    "From: =?iso-8859-1?q?J=F6rg?= <joerg@example.de>\r\n"
    "To: friends: \"Bob, Jr.\" <bob@x.com>, carol@y.org;, dave@z.net (Dave Z)\r\n"
    "Cc: undisclosed-recipients:;\r\n"
    "Sender:\r\nReply-To: <reply@x.com>\r\nIn-Reply-To: <prev@x>\r\n\r\n"
    "Body with no trailing newline";

/* ---- helpers -------------------------------------------------------- */

static struct mime_cache cache;
static struct mime_tree tree;

static void build(const char *msg, size_t len)
{
    mime_cache_free(&cache);
    mime_tree_free(&tree);
    CU_ASSERT_EQUAL_FATAL(mime_build_cache(msg, len, &cache), 0);
    CU_ASSERT_EQUAL_FATAL(mime_tree_deserialize(cache.parts.data, cache.parts.len, len, &tree), 0);
}

static void expect_str(const struct mbuf *b, const char *want)
{
    if (b->len != strlen(want) || memcmp(b->data, want, b->len) != 0)
        fprintf(stderr, "\n got: %.*s\nwant: %s\n", (int)b->len, b->data, want);
    CU_ASSERT_EQUAL(b->len, strlen(want));
    CU_ASSERT(b->len == strlen(want) && memcmp(b->data, want, b->len) == 0);
}

static int find(const uint32_t *nums, size_t n)
{
    uint32_t idx;
    if (mime_find_part(&tree, nums, n, &idx) < 0) return -1;
    return (int)idx;
}

static void expect_body(const char *msg, int idx, const char *want)
{
    CU_ASSERT_FATAL(idx >= 0 && (uint32_t)idx < tree.n_parts);
    const struct mime_part *p = &tree.parts[idx];
    size_t n = (size_t)(p->body_end - p->body_start);
    CU_ASSERT_EQUAL(n, strlen(want));
    CU_ASSERT(n == strlen(want) && memcmp(msg + p->body_start, want, n) == 0);
}

#define BUILD(m) build(m, sizeof(m) - 1)

/* ---- tests ---------------------------------------------------------- */

static void test_simple(void)
{
    BUILD(M1);
    expect_str(
        &cache.bodystructure,
        "(\"TEXT\" \"PLAIN\" (\"CHARSET\" \"us-ascii\") NIL NIL \"7BIT\" 13 2 NIL NIL NIL NIL)");
    expect_str(&cache.body,
               "(\"TEXT\" \"PLAIN\" (\"CHARSET\" \"us-ascii\") NIL NIL \"7BIT\" 13 2)");
    expect_str(&cache.envelope,
               "(\"Fri, 27 Nov 2026 10:00:00 +0100\" \"Hello\" "
               "((\"Alice\" NIL \"alice\" \"example.com\")) "
               "((\"Alice\" NIL \"alice\" \"example.com\")) "
               "((\"Alice\" NIL \"alice\" \"example.com\")) "
               "((NIL NIL \"bob\" \"example.org\")) NIL NIL NIL \"<abc@example.com>\")");
    CU_ASSERT_EQUAL(cache.sent_date, 1795770000);
    CU_ASSERT_EQUAL(tree.n_parts, 1);
    uint32_t one = 1, two[2] = {1, 1};
    CU_ASSERT_EQUAL(find(NULL, 0), 0);
    CU_ASSERT_EQUAL(find(&one, 1), 0); /* BODY[1] of a single-part message */
    CU_ASSERT_EQUAL(find(two, 2), -1);
    uint32_t t2 = 2;
    CU_ASSERT_EQUAL(find(&t2, 1), -1);
    expect_body(M1, 0, "Hi Bob\r\nBye\r\n");
    uint64_t hs, he, ts, te;
    CU_ASSERT_EQUAL(mime_message_ranges(&tree, 0, &hs, &he, &ts, &te), 0);
    CU_ASSERT_EQUAL(hs, 0);
    CU_ASSERT_EQUAL(he, sizeof(M1) - 1 - 13);
    CU_ASSERT_EQUAL(ts, he);
    CU_ASSERT_EQUAL(te, sizeof(M1) - 1);
}

static void test_multipart_mixed(void)
{
    BUILD(M2);
    expect_str(&cache.bodystructure,
               "((\"TEXT\" \"PLAIN\" (\"CHARSET\" \"utf-8\") NIL NIL \"QUOTED-PRINTABLE\" 17 1 NIL "
               "NIL NIL NIL)"
               "(\"APPLICATION\" \"PDF\" (\"NAME\" \"doc.pdf\") NIL NIL \"BASE64\" 16 NIL "
               "(\"ATTACHMENT\" (\"FILENAME\" \"doc.pdf\")) NIL NIL)"
               "(\"TEXT\" \"PLAIN\" (\"CHARSET\" \"us-ascii\") NIL NIL \"BASE64\" 34 2 NIL NIL NIL "
               "NIL) \"MIXED\" (\"BOUNDARY\" \"XYZ\") NIL NIL NIL)");
    expect_str(
        &cache.body,
        "((\"TEXT\" \"PLAIN\" (\"CHARSET\" \"utf-8\") NIL NIL \"QUOTED-PRINTABLE\" 17 1)"
        "(\"APPLICATION\" \"PDF\" (\"NAME\" \"doc.pdf\") NIL NIL \"BASE64\" 16)"
        "(\"TEXT\" \"PLAIN\" (\"CHARSET\" \"us-ascii\") NIL NIL \"BASE64\" 34 2) \"MIXED\")");
    expect_str(&cache.envelope,
               "(NIL \"mixed\" ((NIL NIL \"a\" \"b.c\")) ((NIL NIL \"a\" \"b.c\")) "
               "((NIL NIL \"a\" \"b.c\")) NIL NIL NIL NIL NIL)");
    CU_ASSERT_EQUAL(cache.sent_date, 0);
    CU_ASSERT_EQUAL(tree.n_parts, 4);
    uint32_t n1 = 1, n2 = 2, n3 = 3, n4 = 4, n11[2] = {1, 1};
    expect_body(M2, find(&n1, 1), "Caf=C3=A9 au lait");
    expect_body(M2, find(&n2, 1), "c2VjcmV0IHBkZg==");
    expect_body(M2, find(&n3, 1), "SGVsbG8gV29ybGQg\r\nZnJvbSBiYXNlNjQ=");
    CU_ASSERT_EQUAL(find(&n4, 1), -1);
    CU_ASSERT_EQUAL(find(n11, 2), -1);
    /* n.MIME = the part's own header */
    const struct mime_part *p = &tree.parts[find(&n2, 1)];
    CU_ASSERT_EQUAL(memcmp(M2 + p->hdr_start, "Content-Type: application/pdf", 29), 0);
    CU_ASSERT_EQUAL(memcmp(M2 + p->hdr_end - 5, "\"\r\n\r\n", 5), 0);
    uint64_t a, b, c, d;
    CU_ASSERT_EQUAL(mime_message_ranges(&tree, 1, &a, &b, &c, &d), -1);

    /* search: QP- and base64-decoded text parts; non-text parts ignored */
    const size_t L = sizeof(M2) - 1;
    CU_ASSERT_EQUAL(mime_search_body(M2, L, &tree, "café"), 1);
    CU_ASSERT_EQUAL(mime_search_body(M2, L, &tree, "CAFÉ AU"), 1);
    CU_ASSERT_EQUAL(mime_search_body(M2, L, &tree, "world from BASE64"), 1);
    CU_ASSERT_EQUAL(mime_search_body(M2, L, &tree, "SGVsbG8"), 0);
    CU_ASSERT_EQUAL(mime_search_body(M2, L, &tree, "secret"), 0);
    CU_ASSERT_EQUAL(mime_search_body(M2, L, &tree, "=C3=A9"), 0);
    CU_ASSERT_EQUAL(mime_search_body(M2, L, &tree, "mixed"), 0);
    CU_ASSERT_EQUAL(mime_search_text(M2, L, &tree, "mixed"), 1);
    CU_ASSERT_EQUAL(mime_search_text(M2, L, &tree, "hello world"), 1);
    CU_ASSERT_EQUAL(mime_search_text(M2, L, &tree, "nowhere"), 0);
    CU_ASSERT_EQUAL(mime_search_body(M2, L, &tree, ""), 1);
}

static void test_nested(void)
{
    BUILD(M3);
    expect_str(&cache.bodystructure,
               "(((\"TEXT\" \"PLAIN\" (\"CHARSET\" \"us-ascii\") NIL NIL \"7BIT\" 10 1 NIL NIL NIL "
               "NIL)(\"TEXT\" \"HTML\" (\"CHARSET\" \"iso-8859-1\") NIL NIL \"7BIT\" 11 1 NIL NIL "
               "NIL NIL) \"ALTERNATIVE\" (\"BOUNDARY\" \"inner\") NIL NIL NIL)"
               "(\"MESSAGE\" \"RFC822\" NIL NIL \"forwarded\" \"7BIT\" 87 "
               "(\"1 Jan 2020 00:00 GMT\" \"inner msg\" ((\"Carol\" NIL \"carol\" \"x.org\")) "
               "((\"Carol\" NIL \"carol\" \"x.org\")) ((\"Carol\" NIL \"carol\" \"x.org\")) NIL "
               "NIL NIL NIL NIL) "
               "(\"TEXT\" \"PLAIN\" (\"CHARSET\" \"us-ascii\") NIL NIL \"7BIT\" 10 1 NIL NIL NIL "
               "NIL) 5 NIL NIL NIL NIL) \"MIXED\" (\"BOUNDARY\" \"outer\") NIL NIL NIL)");
    expect_str(&cache.body,
               "(((\"TEXT\" \"PLAIN\" (\"CHARSET\" \"us-ascii\") NIL NIL \"7BIT\" 10 1)"
               "(\"TEXT\" \"HTML\" (\"CHARSET\" \"iso-8859-1\") NIL NIL \"7BIT\" 11 1) "
               "\"ALTERNATIVE\")"
               "(\"MESSAGE\" \"RFC822\" NIL NIL \"forwarded\" \"7BIT\" 87 "
               "(\"1 Jan 2020 00:00 GMT\" \"inner msg\" ((\"Carol\" NIL \"carol\" \"x.org\")) "
               "((\"Carol\" NIL \"carol\" \"x.org\")) ((\"Carol\" NIL \"carol\" \"x.org\")) NIL "
               "NIL NIL NIL NIL) "
               "(\"TEXT\" \"PLAIN\" (\"CHARSET\" \"us-ascii\") NIL NIL \"7BIT\" 10 1) 5) "
               "\"MIXED\")");
    CU_ASSERT_EQUAL(tree.n_parts, 6);
    uint32_t p1[] = {1}, p11[] = {1, 1}, p12[] = {1, 2}, p13[] = {1, 3}, p2[] = {2}, p21[] = {2, 1},
             p22[] = {2, 2}, p211[] = {2, 1, 1};
    CU_ASSERT_EQUAL(find(p1, 1), 1);
    expect_body(M3, find(p11, 2), "plain text");
    expect_body(M3, find(p12, 2), "<p>html</p>");
    CU_ASSERT_EQUAL(find(p13, 2), -1);
    int rfc = find(p2, 1);
    CU_ASSERT_EQUAL(rfc, 4);
    CU_ASSERT(tree.parts[rfc].is_message_rfc822);
    /* BODY[2.1] of a message/rfc822 with a single-part body = its text */
    expect_body(M3, find(p21, 2), "inner body");
    CU_ASSERT_EQUAL(find(p22, 2), -1);
    CU_ASSERT_EQUAL(find(p211, 3), -1);
    uint64_t hs, he, ts, te;
    CU_ASSERT_EQUAL_FATAL(mime_message_ranges(&tree, (uint32_t)rfc, &hs, &he, &ts, &te), 0);
    CU_ASSERT_EQUAL(memcmp(M3 + hs, "From: Carol", 11), 0);
    CU_ASSERT_EQUAL(memcmp(M3 + he - 7, "GMT\r\n\r\n", 7), 0);
    CU_ASSERT_EQUAL(te - ts, 10);
    CU_ASSERT_EQUAL(memcmp(M3 + ts, "inner body", 10), 0);
    /* the encapsulated header is searched as body text, not as header */
    const size_t L = sizeof(M3) - 1;
    CU_ASSERT_EQUAL(mime_search_body(M3, L, &tree, "inner MSG"), 1);
    CU_ASSERT_EQUAL(mime_search_header(M3, L, &tree, "subject", "inner"), 0);
    CU_ASSERT_EQUAL(mime_search_header(M3, L, &tree, "subject", "NESTED"), 1);
    CU_ASSERT_EQUAL(mime_search_body(M3, L, &tree, "<p>HTML"), 1);
}

static void test_addresses_and_folding(void)
{
    BUILD(M4);
    expect_str(
        &cache.bodystructure,
        "(\"TEXT\" \"PLAIN\" (\"CHARSET\" \"us-ascii\") NIL NIL \"7BIT\" 29 1 NIL NIL NIL NIL)");
    expect_str(&cache.envelope,
               "(NIL \"=?utf-8?q?Gr=C3=BC=C3=9Fe?= from folded line\" "
               "((\"=?iso-8859-1?q?J=F6rg?=\" NIL \"joerg\" \"example.de\")) "
               "((\"=?iso-8859-1?q?J=F6rg?=\" NIL \"joerg\" \"example.de\")) "
               "((NIL NIL \"reply\" \"x.com\")) "
               "((NIL NIL \"friends\" NIL)(\"Bob, Jr.\" NIL \"bob\" \"x.com\")(NIL NIL \"carol\" "
               "\"y.org\")(NIL NIL NIL NIL)(\"Dave Z\" NIL \"dave\" \"z.net\")) "
               "((NIL NIL \"undisclosed-recipients\" NIL)(NIL NIL NIL NIL)) NIL \"<prev@x>\" NIL)");
    const size_t L = sizeof(M4) - 1;
    CU_ASSERT_EQUAL(mime_search_header(M4, L, &tree, "Subject", "GRÜ"), 1);
    CU_ASSERT_EQUAL(mime_search_header(M4, L, &tree, "subject", "grüße from folded"), 1);
    CU_ASSERT_EQUAL(mime_search_header(M4, L, &tree, "Subject", "=?utf-8"), 0);
    CU_ASSERT_EQUAL(mime_search_header(M4, L, &tree, "From", "JÖRG"), 1);
    CU_ASSERT_EQUAL(mime_search_header(M4, L, &tree, "From", "joerg@EXAMPLE"), 1);
    CU_ASSERT_EQUAL(mime_search_header(M4, L, &tree, "To", "joerg"), 0);
    CU_ASSERT_EQUAL(mime_search_header(M4, L, &tree, "In-Reply-To", ""), 1);
    CU_ASSERT_EQUAL(mime_search_header(M4, L, &tree, "X-Nope", ""), 0);
    CU_ASSERT_EQUAL(mime_search_header(M4, L, &tree, NULL, "bob, jr"), 1);
    CU_ASSERT_EQUAL(mime_search_text(M4, L, &tree, "TRAILING"), 1);
    CU_ASSERT_EQUAL(mime_search_body(M4, L, &tree, "Jörg"), 0);

    /* HEADER.FIELDS keeps folding and adds the blank line */
    const struct mime_part *r = &tree.parts[0];
    const char *names[] = {"to", "SUBJECT"};
    struct mbuf out = {0};
    mime_header_fields(M4, (size_t)(r->hdr_end - r->hdr_start), names, 2, 0, &out);
    expect_str(&out, "Subject: =?utf-8?q?Gr=C3=BC=C3=9Fe?= from\r\n folded line\r\n"
                     "To: friends: \"Bob, Jr.\" <bob@x.com>, carol@y.org;, dave@z.net (Dave Z)\r\n"
                     "\r\n");
    out.len = 0;
    mime_header_fields(M4, (size_t)(r->hdr_end - r->hdr_start), names, 2, 1, &out);
    expect_str(&out, "From: =?iso-8859-1?q?J=F6rg?= <joerg@example.de>\r\n"
                     "Cc: undisclosed-recipients:;\r\n"
                     "Sender:\r\nReply-To: <reply@x.com>\r\nIn-Reply-To: <prev@x>\r\n\r\n");
    out.len = 0;
    const char *none[] = {"x-none"};
    mime_header_fields(M4, (size_t)(r->hdr_end - r->hdr_start), none, 1, 0, &out);
    expect_str(&out, "\r\n");
    out.len = 0;
    CU_ASSERT_EQUAL(mime_header_get(M4, (size_t)r->hdr_end, "subject", &out), 1);
    expect_str(&out, "=?utf-8?q?Gr=C3=BC=C3=9Fe?= from folded line");
    out.len = 0;
    CU_ASSERT_EQUAL(mime_header_get(M4, (size_t)r->hdr_end, "sender", &out), 1);
    expect_str(&out, "");
    CU_ASSERT_EQUAL(mime_header_get(M4, (size_t)r->hdr_end, "date", &out), 0);
    mbuf_free(&out);
}

static void test_odd_structures(void)
{
    /* missing close delimiter, part without header, no epilogue */
    static const char m[] =
        "Content-Type: multipart/mixed; boundary=b\r\n\r\n"
        "--b\r\n\r\npart one\r\n--b\r\nContent-Type: text/plain\r\n\r\npart two";
    BUILD(m);
    expect_str(&cache.body,
               "((\"TEXT\" \"PLAIN\" (\"CHARSET\" \"us-ascii\") NIL NIL \"7BIT\" 8 1)"
               "(\"TEXT\" \"PLAIN\" (\"CHARSET\" \"us-ascii\") NIL NIL \"7BIT\" 8 1) \"MIXED\")");
    /* multipart without boundary: rendered as text/plain */
    static const char m2[] = "Content-Type: multipart/mixed\r\n\r\nhello\r\n";
    BUILD(m2);
    expect_str(&cache.body, "(\"TEXT\" \"PLAIN\" (\"CHARSET\" \"us-ascii\") NIL NIL \"7BIT\" 7 1)");
    /* multipart with no parts: an empty text/plain child, like Dovecot */
    static const char m3[] = "Content-Type: multipart/mixed; boundary=zz\r\n\r\nno parts\r\n";
    BUILD(m3);
    expect_str(&cache.bodystructure,
               "((\"TEXT\" \"PLAIN\" (\"CHARSET\" \"us-ascii\") NIL NIL \"7BIT\" 0 0 NIL NIL NIL "
               "NIL) \"MIXED\" (\"BOUNDARY\" \"zz\") NIL NIL NIL)");
    /* RFC 2231 continuation + charset, 8-bit value as a literal; extension
     * fields; Content-ID/Description; a quoted boundary */
    static const char m4[] =
        "Content-Type: text/plain; charset=\"UTF-8\"; format=flowed\r\n"
        "Content-ID: <id1@x>\r\nContent-Description: a \"quoted\" desc\r\n"
        "Content-Transfer-Encoding: 8bit\r\n"
        "Content-Disposition: attachment; filename*0*=utf-8''%E2%82%AC; filename*1=\"rate.txt\"\r\n"
        "Content-Language: en, de\r\nContent-Location: http://x/y\r\nContent-MD5: abc=\r\n\r\n"
        "x\r\n";
    BUILD(m4);
    expect_str(&cache.bodystructure,
               "(\"TEXT\" \"PLAIN\" (\"CHARSET\" \"UTF-8\" \"FORMAT\" \"flowed\") \"<id1@x>\" "
               "\"a \\\"quoted\\\" desc\" \"8BIT\" 3 1 \"abc=\" (\"ATTACHMENT\" (\"FILENAME\" "
               "{11}\r\n\xe2\x82\xacrate.txt)) (\"en\" \"de\") \"http://x/y\")");
    /* multipart/digest: parts default to message/rfc822 */
    static const char m5[] = "Content-Type: multipart/digest; boundary=d\r\n\r\n--d\r\n\r\n"
                             "Subject: s\r\n\r\nb\r\n--d--\r\n";
    BUILD(m5);
    expect_str(&cache.body, "((\"MESSAGE\" \"RFC822\" NIL NIL NIL \"7BIT\" 15 "
                            "(NIL \"s\" NIL NIL NIL NIL NIL NIL NIL NIL) "
                            "(\"TEXT\" \"PLAIN\" (\"CHARSET\" \"us-ascii\") NIL NIL \"7BIT\" 1 1) "
                            "3) \"DIGEST\")");
    /* empty message, header only */
    BUILD("");
    expect_str(&cache.body, "(\"TEXT\" \"PLAIN\" (\"CHARSET\" \"us-ascii\") NIL NIL \"7BIT\" 0 0)");
    expect_str(&cache.envelope, "(NIL NIL NIL NIL NIL NIL NIL NIL NIL NIL)");
    static const char m6[] = "Subject: only header\r\n";
    BUILD(m6);
    expect_str(&cache.body, "(\"TEXT\" \"PLAIN\" (\"CHARSET\" \"us-ascii\") NIL NIL \"7BIT\" 0 0)");
    struct mbuf out = {0};
    const char *names[] = {"subject"};
    mime_header_fields(m6, sizeof(m6) - 1, names, 1, 0, &out);
    expect_str(&out, "Subject: only header\r\n");
    mbuf_free(&out);
    /* 8-bit subject -> literal in ENVELOPE; route address, <> and missing host */
    static const char m7[] = "Subject: caf\xc3\xa9\r\nFrom: <@r1,@r2:u@h>, <>, x <y>, z\r\n\r\n";
    BUILD(m7);
    expect_str(&cache.envelope,
               "(NIL {5}\r\ncaf\xc3\xa9 ((NIL \"@r1,@r2\" \"u\" \"h\")(NIL NIL \"\" \"\")"
               "(\"x\" NIL \"y\" \"MISSING_DOMAIN\")(NIL NIL \"z\" \"MISSING_DOMAIN\")) "
               "((NIL \"@r1,@r2\" \"u\" \"h\")(NIL NIL \"\" \"\")"
               "(\"x\" NIL \"y\" \"MISSING_DOMAIN\")(NIL NIL \"z\" \"MISSING_DOMAIN\")) "
               "((NIL \"@r1,@r2\" \"u\" \"h\")(NIL NIL \"\" \"\")"
               "(\"x\" NIL \"y\" \"MISSING_DOMAIN\")(NIL NIL \"z\" \"MISSING_DOMAIN\")) "
               "NIL NIL NIL NIL NIL)");
}

static void test_limits(void)
{
    /* 40 nested multiparts: depth is capped, parse still succeeds */
    struct mbuf m = {0};
    for (int i = 0; i < 40; i++)
        mbuf_printf(&m, "Content-Type: multipart/mixed; boundary=b%d\r\n\r\n--b%d\r\n", i, i);
    mbuf_puts(&m, "\r\ndeep\r\n");
    build(m.data, m.len);
    CU_ASSERT(tree.n_parts <= MIME_MAX_DEPTH);
    CU_ASSERT(tree.n_parts >= MIME_MAX_DEPTH - 1);
    mbuf_free(&m);
    /* 3000 parts: capped at MIME_MAX_PARTS */
    mbuf_puts(&m, "Content-Type: multipart/mixed; boundary=q\r\n\r\n");
    for (int i = 0; i < 3000; i++)
        mbuf_puts(&m, "--q\r\n\r\nx\r\n");
    mbuf_puts(&m, "--q--\r\n");
    build(m.data, m.len);
    CU_ASSERT_EQUAL(tree.n_parts, MIME_MAX_PARTS);
    mbuf_free(&m);
}

static void test_tree_serialization(void)
{
    BUILD(M3);
    struct mime_tree t;
    CU_ASSERT_EQUAL_FATAL(mime_tree_parse(M3, sizeof(M3) - 1, &t), 0);
    CU_ASSERT_EQUAL(t.n_parts, tree.n_parts);
    CU_ASSERT_EQUAL(memcmp(t.parts, tree.parts, t.n_parts * sizeof(t.parts[0])), 0);
    struct mbuf s = {0};
    mime_tree_serialize(&t, &s);
    CU_ASSERT_EQUAL(s.len, cache.parts.len);
    CU_ASSERT_EQUAL(memcmp(s.data, cache.parts.data, s.len), 0);
    struct mime_tree bad;
    CU_ASSERT_EQUAL(mime_tree_deserialize(s.data, s.len, sizeof(M3) - 2, &bad), -1);
    CU_ASSERT_EQUAL(mime_tree_deserialize(s.data, s.len - 1, sizeof(M3) - 1, &bad), -1);
    s.data[0] ^= 1;
    CU_ASSERT_EQUAL(mime_tree_deserialize(s.data, s.len, sizeof(M3) - 1, &bad), -1);
    s.data[0] ^= 1;
    /* every single-byte corruption is either rejected or yields a tree
     * whose ranges are inside the message */
    for (size_t i = 2; i < s.len; i++) {
        for (int bit = 0; bit < 8; bit++) {
            s.data[i] ^= (char)(1 << bit);
            if (mime_tree_deserialize(s.data, s.len, sizeof(M3) - 1, &bad) == 0) {
                for (uint32_t k = 0; k < bad.n_parts; k++)
                    CU_ASSERT(bad.parts[k].body_end <= sizeof(M3) - 1);
                mime_tree_free(&bad);
            }
            s.data[i] ^= (char)(1 << bit);
        }
    }
    mbuf_free(&s);
    mime_tree_free(&t);
}

static void test_dates(void)
{
    struct {
        const char *s;
        int64_t utc;
        int tz;
    } ok[] = {
        {"Fri, 27 Nov 2026 10:00:00 +0100", 1795770000, 60},
        {"1 Jan 2020 00:00 GMT", 1577836800, 0},
        {"Mon, 2 Jan 06 15:04:05 EST", 1136232245, -300},
        {"1 Jan 2020 12:34 +0200", 1577874840, 120},
        {"Tue, 3 Feb 98 1:2:3 (comment) +0000", 886467723, 0},
        {"  Wed , 01 jan 2020 00:00:00 UT (Coordinated)", 1577836800, 0},
        {"1 January 2020 00:00:00 -0000", 1577836800, 0},
        {"1 Jan 2020 00:00:00 Q", 1577836800, 0},
        {"1 Jan 2020 00:00:00", 1577836800, 0},
    };
    for (size_t i = 0; i < sizeof(ok) / sizeof(ok[0]); i++) {
        int64_t utc = -1;
        int tz = -1;
        int r = mime_parse_date(ok[i].s, strlen(ok[i].s), &utc, &tz);
        if (r != 0 || utc != ok[i].utc || tz != ok[i].tz)
            fprintf(stderr, "\ndate '%s': r=%d utc=%lld tz=%d\n", ok[i].s, r, (long long)utc, tz);
        CU_ASSERT_EQUAL(r, 0);
        CU_ASSERT_EQUAL(utc, ok[i].utc);
        CU_ASSERT_EQUAL(tz, ok[i].tz);
    }
    const char *bad[] = {"",
                         "garbage",
                         "31 Feb 2020 00:00 +0000",
                         "32 Jan 2020 00:00",
                         "1 Foo 2020 00:00",
                         "1 Jan 2020",
                         "1 Jan 2020 24:00",
                         "1 Jan 2020 10:60",
                         "29 Feb 2100 00:00",
                         "1 Jan 2020 10:00 +01"};
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        int64_t utc;
        int r = mime_parse_date(bad[i], strlen(bad[i]), &utc, NULL);
        if (r == 0) fprintf(stderr, "\naccepted bad date '%s'\n", bad[i]);
        CU_ASSERT_EQUAL(r, -1);
    }
    int64_t utc;
    CU_ASSERT_EQUAL(mime_parse_date("29 Feb 2000 00:00", 17, &utc, NULL), 0);
}

static void test_crlf(void)
{
    size_t n;
    char *o = mime_crlf_normalize("a\nb\r\nc\rd\r", 9, &n);
    CU_ASSERT_EQUAL(n, 12);
    CU_ASSERT_EQUAL(memcmp(o, "a\r\nb\r\nc\r\nd\r\n", 12), 0);
    free(o);
    o = mime_crlf_normalize("x\0\n", 3, &n);
    CU_ASSERT_EQUAL(n, 4);
    CU_ASSERT_EQUAL(memcmp(o, "x\0\r\n", 4), 0);
    free(o);
    o = mime_crlf_normalize("", 0, &n);
    CU_ASSERT_EQUAL(n, 0);
    free(o);
}

static void test_search_misc(void)
{
    /* long base64 body: match across the internal chunk boundary; latin-1 */
    struct mbuf m = {0};
    mbuf_puts(&m, "Subject: =?ISO-8859-1?B?SvZyZw==?= =?utf-8?q?_x?=\r\n"
                  "Content-Type: text/plain; charset=iso-8859-1\r\n"
                  "Content-Transfer-Encoding: quoted-printable\r\n\r\n");
    for (int i = 0; i < 1000; i++)
        mbuf_puts(&m, "filler text line=\r\n");
    mbuf_puts(&m, "M=E4dchen und =C4pfel\r\n");
    build(m.data, m.len);
    CU_ASSERT_EQUAL(mime_search_body(m.data, m.len, &tree, "mädchen"), 1);
    CU_ASSERT_EQUAL(mime_search_body(m.data, m.len, &tree, "äpfel"), 1);
    CU_ASSERT_EQUAL(mime_search_body(m.data, m.len, &tree, "ÄPFEL"), 1);
    /* soft line breaks joined the filler */
    CU_ASSERT_EQUAL(mime_search_body(m.data, m.len, &tree, "linefiller"), 1);
    CU_ASSERT_EQUAL(mime_search_body(m.data, m.len, &tree, "line=\r\n"), 0);
    /* adjacent encoded words: whitespace between them dropped */
    CU_ASSERT_EQUAL(mime_search_header(m.data, m.len, &tree, "subject", "jörg x"), 1);
    CU_ASSERT_EQUAL(mime_search_header(m.data, m.len, &tree, "subject", "jörg  x"), 0);
    mbuf_free(&m);
    /* base64 body spanning many chunks */
    mbuf_puts(&m, "Content-Transfer-Encoding: base64\r\n\r\n");
    for (int i = 0; i < 2000; i++)
        mbuf_puts(&m, "QUJDREVGR0hJSktMTU5PUFFSU1RVVldY\r\n");
    mbuf_puts(&m, "bmVlZGxl\r\n"); /* "needle" */
    build(m.data, m.len);
    CU_ASSERT_EQUAL(mime_search_body(m.data, m.len, &tree, "XABCD"), 1);
    CU_ASSERT_EQUAL(mime_search_body(m.data, m.len, &tree, "wxneedle"), 1);
    CU_ASSERT_EQUAL(mime_search_body(m.data, m.len, &tree, "needles"), 0);
    mbuf_free(&m);
}

/* Pathological headers must stay linear. */
static void test_linear_time(void)
{
    struct mbuf m = {0};
    mbuf_puts(&m, "Subject: ");
    for (int i = 0; i < 30000; i++)
        mbuf_puts(&m, "=?a?q?");
    mbuf_puts(&m, "\r\nFrom: ");
    for (int i = 0; i < 30000; i++)
        mbuf_puts(&m, "<@,");
    mbuf_puts(&m, "\r\nTo: ");
    for (int i = 0; i < 30000; i++)
        mbuf_puts(&m, "(a");
    mbuf_puts(&m, "\r\nContent-Type: text/plain; ");
    for (int i = 0; i < 10000; i++)
        mbuf_printf(&m, "p*%d*=x; ", i % 70);
    mbuf_puts(&m, "\r\n\r\nbody\r\n");
    clock_t t0 = clock();
    build(m.data, m.len);
    CU_ASSERT_EQUAL(mime_search_header(m.data, m.len, &tree, NULL, "zzz"), 0);
    CU_ASSERT_EQUAL(mime_search_text(m.data, m.len, &tree, "body"), 1);
    double secs = (double)(clock() - t0) / CLOCKS_PER_SEC;
    CU_ASSERT(secs < 5.0);
    mbuf_free(&m);
}

int main(void)
{
    if (CU_initialize_registry() != CUE_SUCCESS) return 1;
    CU_pSuite s = CU_add_suite("mime", NULL, NULL);
    CU_add_test(s, "simple text", test_simple);
    CU_add_test(s, "multipart/mixed + base64", test_multipart_mixed);
    CU_add_test(s, "nested alternative + rfc822", test_nested);
    CU_add_test(s, "addresses, folding, header fields", test_addresses_and_folding);
    CU_add_test(s, "odd structures", test_odd_structures);
    CU_add_test(s, "limits", test_limits);
    CU_add_test(s, "tree serialization", test_tree_serialization);
    CU_add_test(s, "dates", test_dates);
    CU_add_test(s, "crlf", test_crlf);
    CU_add_test(s, "search misc", test_search_misc);
    CU_add_test(s, "linear time", test_linear_time);
    CU_basic_set_mode(CU_BRM_VERBOSE);
    CU_basic_run_tests();
    int fails = (int)CU_get_number_of_failures();
    CU_cleanup_registry();
    mime_cache_free(&cache);
    mime_tree_free(&tree);
    return fails != 0;
}
