/* Unit tests for common/: cf_config, cf_pwhash, cf_frame, cf_log. */
#include <CUnit/Basic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cf_config.h"
#include "cf_frame.h"
#include "cf_log.h"
#include "cf_pwhash.h"

static char tmpdir[64];

static int write_file(const char *name, const char *text, char *path, size_t pathlen)
{
    FILE *f;
    snprintf(path, pathlen, "%s/%s", tmpdir, name);
    f = fopen(path, "w");
    if (f == NULL) return -1;
    fputs(text, f);
    fclose(f);
    return 0;
}

/* ---- config ---- */

static void test_parse_size(void)
{
    uint64_t v = 0;
    CU_ASSERT_EQUAL(cf_parse_size("4096", &v), 0);
    CU_ASSERT_EQUAL(v, 4096);
    CU_ASSERT_EQUAL(cf_parse_size("64k", &v), 0);
    CU_ASSERT_EQUAL(v, 65536);
    CU_ASSERT_EQUAL(cf_parse_size("50M", &v), 0);
    CU_ASSERT_EQUAL(v, 50ull * 1024 * 1024);
    CU_ASSERT_EQUAL(cf_parse_size("1G", &v), 0);
    CU_ASSERT_EQUAL(v, 1024ull * 1024 * 1024);
    CU_ASSERT_EQUAL(cf_parse_size("64G", &v), 0);
    CU_ASSERT_EQUAL(v, 64ull * 1024 * 1024 * 1024);
    CU_ASSERT_EQUAL(cf_parse_size("2 KiB", &v), 0);
    CU_ASSERT_EQUAL(v, 2048);
    CU_ASSERT_EQUAL(cf_parse_size("10MB", &v), 0);
    CU_ASSERT_EQUAL(v, 10ull * 1024 * 1024);
    CU_ASSERT_EQUAL(cf_parse_size("0", &v), 0);
    CU_ASSERT_EQUAL(v, 0);
    CU_ASSERT_EQUAL(cf_parse_size("", &v), -1);
    CU_ASSERT_EQUAL(cf_parse_size("k", &v), -1);
    CU_ASSERT_EQUAL(cf_parse_size("-1", &v), -1);
    CU_ASSERT_EQUAL(cf_parse_size("12x", &v), -1);
    CU_ASSERT_EQUAL(cf_parse_size("1.5M", &v), -1);
    CU_ASSERT_EQUAL(cf_parse_size("99999999999999999999", &v), -1);
    CU_ASSERT_EQUAL(cf_parse_size("17179869184G", &v), -1); /* overflow */
    CU_ASSERT_EQUAL(cf_parse_size(NULL, &v), -1);
}

static void test_parse_ms(void)
{
    uint64_t v = 0;
    CU_ASSERT_EQUAL(cf_parse_ms("100ms", &v), 0);
    CU_ASSERT_EQUAL(v, 100);
    CU_ASSERT_EQUAL(cf_parse_ms("30s", &v), 0);
    CU_ASSERT_EQUAL(v, 30000);
    CU_ASSERT_EQUAL(cf_parse_ms("5m", &v), 0);
    CU_ASSERT_EQUAL(v, 300000);
    CU_ASSERT_EQUAL(cf_parse_ms("2h", &v), 0);
    CU_ASSERT_EQUAL(v, 7200000);
    CU_ASSERT_EQUAL(cf_parse_ms("1d", &v), 0);
    CU_ASSERT_EQUAL(v, 86400000);
    CU_ASSERT_EQUAL(cf_parse_ms("1 s", &v), 0);
    CU_ASSERT_EQUAL(v, 1000);
    CU_ASSERT_EQUAL(cf_parse_ms("0", &v), 0);
    CU_ASSERT_EQUAL(v, 0);
    CU_ASSERT_EQUAL(cf_parse_ms("30", &v), -1); /* unit required */
    CU_ASSERT_EQUAL(cf_parse_ms("10x", &v), -1);
    CU_ASSERT_EQUAL(cf_parse_ms("s", &v), -1);
    CU_ASSERT_EQUAL(cf_parse_ms("5 m x", &v), -1);
    CU_ASSERT_EQUAL(cf_parse_ms("-5s", &v), -1);
}

static void test_parse_bool(void)
{
    int b = -1;
    const char *yes[] = {"yes", "true", "1", "on", "YES", "True"};
    const char *no[] = {"no", "false", "0", "off", "NO"};
    for (size_t i = 0; i < sizeof(yes) / sizeof(yes[0]); i++) {
        b = -1;
        CU_ASSERT_EQUAL(cf_parse_bool(yes[i], &b), 0);
        CU_ASSERT_EQUAL(b, 1);
    }
    for (size_t i = 0; i < sizeof(no) / sizeof(no[0]); i++) {
        b = -1;
        CU_ASSERT_EQUAL(cf_parse_bool(no[i], &b), 0);
        CU_ASSERT_EQUAL(b, 0);
    }
    CU_ASSERT_EQUAL(cf_parse_bool("maybe", &b), -1);
    CU_ASSERT_EQUAL(cf_parse_bool("", &b), -1);
    CU_ASSERT_EQUAL(cf_parse_bool("2", &b), -1);
}

static int count_cb(const char *section, const char *key, const char *value, void *arg)
{
    int *n = arg;
    (void)section;
    (void)value;
    (*n)++;
    if (strcmp(key, "stop_here") == 0) return 42;
    return 0;
}

static void test_config_file(void)
{
    char path[256], err[256];
    struct cf_config *cfg;
    const char *s;
    uint64_t v;
    int b, n = 0;

    CU_ASSERT_EQUAL(write_file("ok.ini",
                               "; comment\n"
                               "[node]\n"
                               "id = 3\n"
                               "data_dir = /var/lib/coffer\n"
                               "[limits]\n"
                               "max_message = 50M\n"
                               "idle_timeout = 30m\n"
                               "bad_size = 12q\n"
                               "bad_ms = 30\n"
                               "bad_num = 12abc\n"
                               "[auth]\n"
                               "allow_plaintext = yes\n"
                               "bad_bool = perhaps\n"
                               "[node]\n"
                               "id = 4\n",
                               path, sizeof(path)),
                    0);
    cfg = cf_config_load(path, err, sizeof(err));
    CU_ASSERT_PTR_NOT_NULL_FATAL(cfg);
    CU_ASSERT_STRING_EQUAL(cf_config_get(cfg, "node", "data_dir"), "/var/lib/coffer");
    CU_ASSERT_PTR_NULL(cf_config_get(cfg, "node", "absent"));
    CU_ASSERT_PTR_NULL(cf_config_get(cfg, "nosection", "id"));

    CU_ASSERT_EQUAL(cf_config_u64(cfg, "node", "id", 1, &v, err, sizeof(err)), 0);
    CU_ASSERT_EQUAL(v, 4); /* the last duplicate wins */
    CU_ASSERT_EQUAL(cf_config_u64(cfg, "node", "absent", 77, &v, err, sizeof(err)), 0);
    CU_ASSERT_EQUAL(v, 77);
    CU_ASSERT_EQUAL(cf_config_u64(cfg, "limits", "bad_num", 1, &v, err, sizeof(err)), -1);
    CU_ASSERT_PTR_NOT_NULL(strstr(err, "limits.bad_num"));

    CU_ASSERT_EQUAL(cf_config_size(cfg, "limits", "max_message", 1, &v, err, sizeof(err)), 0);
    CU_ASSERT_EQUAL(v, 50ull * 1024 * 1024);
    CU_ASSERT_EQUAL(cf_config_size(cfg, "limits", "max_line", 65536, &v, err, sizeof(err)), 0);
    CU_ASSERT_EQUAL(v, 65536);
    err[0] = '\0';
    CU_ASSERT_EQUAL(cf_config_size(cfg, "limits", "bad_size", 1, &v, err, sizeof(err)), -1);
    CU_ASSERT_PTR_NOT_NULL(strstr(err, "limits.bad_size"));
    CU_ASSERT_PTR_NOT_NULL(strstr(err, "12q"));

    CU_ASSERT_EQUAL(cf_config_ms(cfg, "limits", "idle_timeout", 1, &v, err, sizeof(err)), 0);
    CU_ASSERT_EQUAL(v, 30ull * 60 * 1000);
    CU_ASSERT_EQUAL(cf_config_ms(cfg, "limits", "absent", 1234, &v, err, sizeof(err)), 0);
    CU_ASSERT_EQUAL(v, 1234);
    err[0] = '\0';
    CU_ASSERT_EQUAL(cf_config_ms(cfg, "limits", "bad_ms", 1, &v, err, sizeof(err)), -1);
    CU_ASSERT_PTR_NOT_NULL(strstr(err, "limits.bad_ms"));

    CU_ASSERT_EQUAL(cf_config_bool(cfg, "auth", "allow_plaintext", 0, &b, err, sizeof(err)), 0);
    CU_ASSERT_EQUAL(b, 1);
    CU_ASSERT_EQUAL(cf_config_bool(cfg, "auth", "absent", 1, &b, err, sizeof(err)), 0);
    CU_ASSERT_EQUAL(b, 1);
    err[0] = '\0';
    CU_ASSERT_EQUAL(cf_config_bool(cfg, "auth", "bad_bool", 0, &b, err, sizeof(err)), -1);
    CU_ASSERT_PTR_NOT_NULL(strstr(err, "auth.bad_bool"));

    CU_ASSERT_EQUAL(cf_config_str(cfg, "node", "data_dir", "x", &s), 0);
    CU_ASSERT_STRING_EQUAL(s, "/var/lib/coffer");
    CU_ASSERT_EQUAL(cf_config_str(cfg, "node", "nope", "dflt", &s), 0);
    CU_ASSERT_STRING_EQUAL(s, "dflt");

    /* 9 distinct keys (node.id counted once) */
    CU_ASSERT_EQUAL(cf_config_foreach(cfg, count_cb, &n), 0);
    CU_ASSERT_EQUAL(n, 9);
    cf_config_free(&cfg);
    CU_ASSERT_PTR_NULL(cfg);
    cf_config_free(&cfg); /* NULL-safe */
}

static void test_config_errors(void)
{
    char path[256], err[256];
    struct cf_config *cfg;
    uint64_t v;
    int n = 0;

    CU_ASSERT_EQUAL(write_file("bad.ini", "[a]\nx = 1\nthis line is broken\n", path, sizeof(path)),
                    0);
    err[0] = '\0';
    cfg = cf_config_load(path, err, sizeof(err));
    CU_ASSERT_PTR_NULL(cfg);
    CU_ASSERT_PTR_NOT_NULL(strstr(err, ":3:"));

    snprintf(path, sizeof(path), "%s/missing.ini", tmpdir);
    err[0] = '\0';
    cfg = cf_config_load(path, err, sizeof(err));
    CU_ASSERT_PTR_NULL(cfg);
    CU_ASSERT_PTR_NOT_NULL(strstr(err, "missing.ini"));

    cfg = cf_config_empty();
    CU_ASSERT_PTR_NOT_NULL_FATAL(cfg);
    CU_ASSERT_EQUAL(cf_config_size(cfg, "a", "b", 99, &v, err, sizeof(err)), 0);
    CU_ASSERT_EQUAL(v, 99);
    CU_ASSERT_EQUAL(cf_config_foreach(cfg, count_cb, &n), 0);
    CU_ASSERT_EQUAL(n, 0);
    cf_config_free(&cfg);

    CU_ASSERT_EQUAL(write_file("stop.ini", "[s]\na=1\nstop_here=2\nc=3\n", path, sizeof(path)), 0);
    cfg = cf_config_load(path, err, sizeof(err));
    CU_ASSERT_PTR_NOT_NULL_FATAL(cfg);
    n = 0;
    CU_ASSERT_EQUAL(cf_config_foreach(cfg, count_cb, &n), 42);
    CU_ASSERT_EQUAL(n, 2);
    cf_config_free(&cfg);
}

/* ---- pwhash ---- */

static void test_pwhash_roundtrip(void)
{
    char h1[CF_PWHASH_MAX], h2[CF_PWHASH_MAX];
    const char *pw = "correct horse battery staple";

    CU_ASSERT_EQUAL_FATAL(cf_pwhash_make(pw, strlen(pw), 10, h1), 0);
    CU_ASSERT_EQUAL(strncmp(h1, "$scrypt$ln=10,r=8,p=1$", 22), 0);
    CU_ASSERT(strlen(h1) < CF_PWHASH_MAX);
    CU_ASSERT_PTR_NULL(strchr(h1, '\n'));
    CU_ASSERT_EQUAL(cf_pwhash_verify(pw, strlen(pw), h1), 1);
    CU_ASSERT_EQUAL(cf_pwhash_verify("wrong", 5, h1), 0);
    CU_ASSERT_EQUAL(cf_pwhash_verify(pw, strlen(pw) - 1, h1), 0);
    /* random salt: two hashes of the same password differ, both verify */
    CU_ASSERT_EQUAL_FATAL(cf_pwhash_make(pw, strlen(pw), 10, h2), 0);
    CU_ASSERT_STRING_NOT_EQUAL(h1, h2);
    CU_ASSERT_EQUAL(cf_pwhash_verify(pw, strlen(pw), h2), 1);
    /* embedded NUL and empty passwords are just bytes */
    CU_ASSERT_EQUAL_FATAL(cf_pwhash_make("a\0b", 3, 10, h1), 0);
    CU_ASSERT_EQUAL(cf_pwhash_verify("a\0b", 3, h1), 1);
    CU_ASSERT_EQUAL(cf_pwhash_verify("a", 1, h1), 0);
    CU_ASSERT_EQUAL_FATAL(cf_pwhash_make("", 0, 10, h1), 0);
    CU_ASSERT_EQUAL(cf_pwhash_verify("", 0, h1), 1);
    CU_ASSERT_EQUAL(cf_pwhash_verify("x", 1, h1), 0);
    /* ln out of range */
    CU_ASSERT_EQUAL(cf_pwhash_make(pw, strlen(pw), 21, h1), -1);
}

static void test_pwhash_flipped(void)
{
    /* one changed hash character must fail verification */
    char h[CF_PWHASH_MAX];
    size_t n;

    CU_ASSERT_EQUAL_FATAL(cf_pwhash_make("pw", 2, 10, h), 0);
    n = strlen(h);
    /* flip one hash character that carries data bits */
    h[n - 5] = h[n - 5] == 'A' ? 'B' : 'A';
    CU_ASSERT_EQUAL(cf_pwhash_verify("pw", 2, h), 0);
}

static void test_pwhash_malformed(void)
{
    char good[CF_PWHASH_MAX], buf[CF_PWHASH_MAX * 2];
    const char *salt, *hash;
    const char *bad[] = {
        "",
        "$scrypt$",
        "$bcrypt$ln=10,r=8,p=1$AAAAAAAAAAAAAAAAAAAAAA==$"
        "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
        "$scrypt$ln=0,r=8,p=1$AAAAAAAAAAAAAAAAAAAAAA==$"
        "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
        "$scrypt$ln=21,r=8,p=1$AAAAAAAAAAAAAAAAAAAAAA==$"
        "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
        "$scrypt$ln=10,r=0,p=1$AAAAAAAAAAAAAAAAAAAAAA==$"
        "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
        "$scrypt$ln=10,r=8,p=0$AAAAAAAAAAAAAAAAAAAAAA==$"
        "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
        "$scrypt$ln=10,r=999,p=1$AAAAAAAAAAAAAAAAAAAAAA==$"
        "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
        "$scrypt$ln=10,r=8,p=1$AAAA$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=", /* salt short */
        "$scrypt$ln=10,r=8,p=1$AAAAAAAAAAAAAAAAAAAAAA=$"
        "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=", /* len%4 */
        "$scrypt$ln=10,r=8,p=1$AAAAAAAAAAAAAAAAAAAA*A==$"
        "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=", /* bad char */
        "$scrypt$ln=10,r=8,p=1$AAAAAAAAAAAAAAAAAAAA=AAA$"
        "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=", /* pad mid */
        "$scrypt$ln=10,r=8,p=1$AAAAAAAAAAAAAAAAAAAAAA==",
        "$scrypt$ln=10,r=8,p=1$AAAAAAAAAAAAAAAAAAAAAA==$",
        "$scrypt$ln=10,r=8,p=1$AAAAAAAAAAAAAAAAAAAAAA==$AAAA$AAAA",
        "$scrypt$ln=10,r=8$AAAAAAAAAAAAAAAAAAAAAA==$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
        "$scrypt$ln=-1,r=8,p=1$AAAAAAAAAAAAAAAAAAAAAA==$"
        "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
        "$scrypt$ln=99999999999,r=8,p=1$AAAAAAAAAAAAAAAAAAAAAA==$"
        "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
    };

    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        int rv = cf_pwhash_verify("pw", 2, bad[i]);
        if (rv != -1) fprintf(stderr, "accepted malformed #%zu: %s\n", i, bad[i]);
        CU_ASSERT_EQUAL(rv, -1);
    }
    CU_ASSERT_EQUAL(cf_pwhash_verify("pw", 2, NULL), -1);

    /* a well-formed hash with trailing garbage is malformed */
    CU_ASSERT_EQUAL_FATAL(cf_pwhash_make("pw", 2, 10, good), 0);
    snprintf(buf, sizeof(buf), "%s ", good);
    CU_ASSERT_EQUAL(cf_pwhash_verify("pw", 2, buf), -1);
    snprintf(buf, sizeof(buf), "%sAAAA", good);
    CU_ASSERT_EQUAL(cf_pwhash_verify("pw", 2, buf), -1);
    /* well-formed, salt + hash swapped around: still parses (both valid b64) but fails */
    salt = strchr(good + 8, '$');
    CU_ASSERT_PTR_NOT_NULL_FATAL(salt);
    hash = strchr(salt + 1, '$');
    CU_ASSERT_PTR_NOT_NULL_FATAL(hash);
    snprintf(buf, sizeof(buf), "%.*s$%s%.*s", (int)(salt - good), good, hash + 1,
             (int)(hash - salt), salt);
    CU_ASSERT_EQUAL(cf_pwhash_verify("pw", 2, buf), 0);
}

/* ---- frames ---- */

static void test_frame_bytewise(void)
{
    struct cf_frame_dec d;
    uint8_t stream[64], *frame;
    size_t frame_len, n = 0, got = 0;
    const char *msgs[] = {"hello", "", "world!!"};

    for (size_t i = 0; i < 3; i++) {
        size_t l = strlen(msgs[i]);
        cf_frame_hdr(stream + n, (uint32_t)l);
        memcpy(stream + n + 4, msgs[i], l);
        n += 4 + l;
    }
    CU_ASSERT_EQUAL(stream[0], 0);
    CU_ASSERT_EQUAL(stream[3], 5);
    cf_frame_dec_init(&d, 1024);
    for (size_t i = 0; i < n; i++) {
        long r = cf_frame_dec_feed(&d, stream + i, 1, &frame, &frame_len);
        CU_ASSERT_EQUAL(r, 1);
        if (frame != NULL) {
            CU_ASSERT_FATAL(got < 3);
            CU_ASSERT_EQUAL(frame_len, strlen(msgs[got]));
            CU_ASSERT_EQUAL(memcmp(frame, msgs[got], frame_len), 0);
            free(frame);
            got++;
        }
    }
    CU_ASSERT_EQUAL(got, 3);

    /* whole stream at once: stops after each frame */
    {
        size_t off = 0;
        got = 0;
        while (off < n) {
            long r = cf_frame_dec_feed(&d, stream + off, n - off, &frame, &frame_len);
            CU_ASSERT_FATAL(r > 0);
            off += (size_t)r;
            if (frame != NULL) {
                CU_ASSERT_EQUAL(frame_len, strlen(msgs[got]));
                CU_ASSERT_EQUAL(memcmp(frame, msgs[got], frame_len), 0);
                free(frame);
                got++;
            }
        }
        CU_ASSERT_EQUAL(got, 3);
        CU_ASSERT_EQUAL(off, n);
    }
    cf_frame_dec_free(&d);
}

static void test_frame_oversize(void)
{
    struct cf_frame_dec d;
    uint8_t hdr[4], *frame;
    size_t frame_len;

    cf_frame_dec_init(&d, 100);
    cf_frame_hdr(hdr, 101);
    CU_ASSERT_EQUAL(cf_frame_dec_feed(&d, hdr, 3, &frame, &frame_len), 3);
    CU_ASSERT_EQUAL(cf_frame_dec_feed(&d, hdr + 3, 1, &frame, &frame_len), -1);
    CU_ASSERT_PTR_NULL(frame);
    cf_frame_dec_free(&d);

    cf_frame_dec_init(&d, 100);
    cf_frame_hdr(hdr, 0xffffffffu);
    CU_ASSERT_EQUAL(cf_frame_dec_feed(&d, hdr, 4, &frame, &frame_len), -1);
    cf_frame_dec_free(&d);

    /* exactly max is fine; a partial frame is freed by dec_free */
    cf_frame_dec_init(&d, 100);
    cf_frame_hdr(hdr, 100);
    CU_ASSERT_EQUAL(cf_frame_dec_feed(&d, hdr, 4, &frame, &frame_len), 4);
    CU_ASSERT_PTR_NULL(frame);
    CU_ASSERT_EQUAL(cf_frame_dec_feed(&d, (const uint8_t *)"abc", 3, &frame, &frame_len), 3);
    CU_ASSERT_PTR_NULL(frame);
    cf_frame_dec_free(&d);
}

/* ---- log ---- */

static void test_log_level(void)
{
    enum cf_log_level l = CF_LOG_CRIT;
    CU_ASSERT_EQUAL(cf_log_level_parse("debug", &l), 0);
    CU_ASSERT_EQUAL(l, CF_LOG_DEBUG);
    CU_ASSERT_EQUAL(cf_log_level_parse("info", &l), 0);
    CU_ASSERT_EQUAL(l, CF_LOG_INFO);
    CU_ASSERT_EQUAL(cf_log_level_parse("notice", &l), 0);
    CU_ASSERT_EQUAL(l, CF_LOG_NOTICE);
    CU_ASSERT_EQUAL(cf_log_level_parse("warn", &l), 0);
    CU_ASSERT_EQUAL(l, CF_LOG_WARN);
    CU_ASSERT_EQUAL(cf_log_level_parse("error", &l), 0);
    CU_ASSERT_EQUAL(l, CF_LOG_ERR);
    CU_ASSERT_EQUAL(cf_log_level_parse("crit", &l), 0);
    CU_ASSERT_EQUAL(l, CF_LOG_CRIT);
    CU_ASSERT_EQUAL(cf_log_level_parse("loud", &l), -1);
    CU_ASSERT_EQUAL(cf_log_level_parse("", &l), -1);
    CU_ASSERT_EQUAL(cf_log_level_parse(NULL, &l), -1);
}

/* Capture stderr while logging and check the line format + escaping. */
static void test_log_output(void)
{
    char path[256], line[1024] = "";
    FILE *f;
    int saved, fd;
    size_t n;

    snprintf(path, sizeof(path), "%s/log.txt", tmpdir);
    fflush(stderr);
    saved = dup(2);
    f = fopen(path, "w+");
    CU_ASSERT_PTR_NOT_NULL_FATAL(f);
    fd = fileno(f);
    dup2(fd, 2);
    cf_log_init("testident", CF_LOG_INFO, 0);
    cf_debug("hidden %d", 1);
    cf_info("shown %d\nnext", 2);
    cf_log_audit_login("imap", "bo\"b\r\n", "192.0.2.1", NULL, "badpass");
    fflush(stderr);
    dup2(saved, 2);
    close(saved);
    rewind(f);
    n = fread(line, 1, sizeof(line) - 1, f);
    line[n] = '\0';
    fclose(f);
    CU_ASSERT_PTR_NULL(strstr(line, "hidden"));
    CU_ASSERT_PTR_NOT_NULL(strstr(line, "testident["));
    CU_ASSERT_PTR_NOT_NULL(strstr(line, ": info: shown 2?next\n"));
    CU_ASSERT_PTR_NOT_NULL(strstr(line,
                                  ": notice: audit: login proto=imap user=\"bo\\\"b\\x0d\\x0a\" "
                                  "client=192.0.2.1 proxy=- result=badpass\n"));
    /* timestamp shape: YYYY-mm-ddTHH:MM:SS.mmmZ */
    CU_ASSERT(n > 24 && line[4] == '-' && line[10] == 'T' && line[19] == '.' && line[23] == 'Z');
    /* exactly two lines */
    {
        int lines = 0;
        for (size_t i = 0; i < n; i++)
            lines += line[i] == '\n';
        CU_ASSERT_EQUAL(lines, 2);
    }
}

int main(void)
{
    CU_pSuite s;
    unsigned fails;

    snprintf(tmpdir, sizeof(tmpdir), "/tmp/test_common.XXXXXX");
    if (mkdtemp(tmpdir) == NULL) return 2;
    if (CU_initialize_registry() != CUE_SUCCESS) return 2;
    s = CU_add_suite("common", NULL, NULL);
    CU_add_test(s, "parse_size", test_parse_size);
    CU_add_test(s, "parse_ms", test_parse_ms);
    CU_add_test(s, "parse_bool", test_parse_bool);
    CU_add_test(s, "config_file", test_config_file);
    CU_add_test(s, "config_errors", test_config_errors);
    CU_add_test(s, "pwhash_roundtrip", test_pwhash_roundtrip);
    CU_add_test(s, "pwhash_flipped", test_pwhash_flipped);
    CU_add_test(s, "pwhash_malformed", test_pwhash_malformed);
    CU_add_test(s, "frame_bytewise", test_frame_bytewise);
    CU_add_test(s, "frame_oversize", test_frame_oversize);
    CU_add_test(s, "log_level", test_log_level);
    CU_add_test(s, "log_output", test_log_output);
    CU_basic_set_mode(CU_BRM_VERBOSE);
    CU_basic_run_tests();
    fails = CU_get_number_of_failures();
    CU_cleanup_registry();
    {
        char cmd[128];
        snprintf(cmd, sizeof(cmd), "rm -rf %s", tmpdir);
        if (system(cmd) != 0) fprintf(stderr, "cleanup failed\n");
    }
    return fails != 0;
}
