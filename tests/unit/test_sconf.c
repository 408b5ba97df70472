/* Unit tests for storenode/sconf.c: defaults, a full sample file, unknown
 * keys/sections and invalid values are refused with the key named. */
#include <CUnit/Basic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "cf_log.h"
#include "sconf.h"

static char dir[64];
static char conf_path[128];
static char secret_path[128];

static void write_file(const char *path, const char *text, mode_t mode)
{
    FILE *f = fopen(path, "w");
    CU_ASSERT_PTR_NOT_NULL_FATAL(f);
    fputs(text, f);
    fclose(f);
    CU_ASSERT_EQUAL(chmod(path, mode), 0);
}

/* Minimal valid config plus `extra` lines appended at the end. */
static int load_with(const char *extra, struct sconf *c, char *err, size_t errlen)
{
    char text[4096];

    snprintf(text, sizeof text,
             "[tls]\ncert = /etc/coffer/cert.pem\nkey = /etc/coffer/key.pem\n"
             "[admin]\nsecret_file = %s\n%s\n",
             secret_path, extra);
    write_file(conf_path, text, 0600);
    err[0] = '\0';
    return sconf_load(conf_path, c, err, errlen);
}

static void test_defaults(void)
{
    struct sconf c;

    sconf_defaults(&c);
    CU_ASSERT_EQUAL(c.node_id, 1);
    CU_ASSERT_STRING_EQUAL(c.data_dir, "/var/lib/coffer");
    CU_ASSERT_STRING_EQUAL(c.log_level, "info");
    CU_ASSERT_STRING_EQUAL(c.raft_address, "127.0.0.1:7001");
    CU_ASSERT_EQUAL(c.raft_bootstrap, 1);
    CU_ASSERT_EQUAL(c.election_timeout_ms, 1000);
    CU_ASSERT_EQUAL(c.heartbeat_ms, 100);
    CU_ASSERT_EQUAL(c.snapshot_threshold, 16384);
    CU_ASSERT_EQUAL(c.snapshot_trailing, 512);
    CU_ASSERT_EQUAL(c.snapshot_bytes, 1ull << 30);
    CU_ASSERT_EQUAL(c.checkpoints_kept, 2);
    CU_ASSERT_EQUAL(c.map_size, 64ull << 30);
    CU_ASSERT_PTR_NULL(c.tls_cert);
    CU_ASSERT_PTR_NULL(c.tls_key);
    CU_ASSERT_PTR_NULL(c.tls_ca);
    CU_ASSERT_STRING_EQUAL(c.tls_min_version, "TLSv1.2");
    CU_ASSERT_PTR_NULL(c.tls_ciphers);
    CU_ASSERT_STRING_EQUAL(c.imap_listen, "127.0.0.1:143");
    CU_ASSERT_STRING_EQUAL(c.imaps_listen, "127.0.0.1:993");
    CU_ASSERT_STRING_EQUAL(c.pop3_listen, "127.0.0.1:110");
    CU_ASSERT_STRING_EQUAL(c.pop3s_listen, "127.0.0.1:995");
    CU_ASSERT_STRING_EQUAL(c.admin_listen, "127.0.0.1:7443");
    CU_ASSERT_PTR_NULL(c.admin_secret_file);
    CU_ASSERT_PTR_NULL(c.admin_secret);
    CU_ASSERT_EQUAL(c.allow_plaintext, 0);
    CU_ASSERT_EQUAL(c.scrypt_ln, 14);
    CU_ASSERT_EQUAL(c.max_line, 65536);
    CU_ASSERT_EQUAL(c.max_literal, 65536);
    CU_ASSERT_EQUAL(c.max_message, 50ull << 20);
    CU_ASSERT_EQUAL(c.max_mailbox_name, 400);
    CU_ASSERT_EQUAL(c.max_mailbox_depth, 20);
    CU_ASSERT_EQUAL(c.max_sessions, 10000);
    CU_ASSERT_EQUAL(c.max_bad_commands, 20);
    CU_ASSERT_EQUAL(c.preauth_timeout_ms, 60000);
    CU_ASSERT_EQUAL(c.idle_timeout_ms, 1800000);
    CU_ASSERT_EQUAL(c.idle_keepalive_ms, 120000);
    sconf_free(&c);
    CU_ASSERT_PTR_NULL(c.data_dir);
    sconf_free(&c); /* twice is harmless */
}

static void test_minimal_file(void)
{
    struct sconf c;
    char err[256];

    CU_ASSERT_EQUAL_FATAL(load_with("", &c, err, sizeof err), 0);
    CU_ASSERT_STRING_EQUAL(c.tls_cert, "/etc/coffer/cert.pem");
    CU_ASSERT_STRING_EQUAL(c.admin_secret, "s3cret-token"); /* newline stripped */
    CU_ASSERT_EQUAL(c.max_line, 65536);                     /* default kept */
    CU_ASSERT_STRING_EQUAL(c.imap_listen, "127.0.0.1:143");
    sconf_free(&c);
}

static void test_full_sample(void)
{
    struct sconf c;
    char err[256], text[4096];

    snprintf(text, sizeof text,
             "; sample\n"
             "[node]\nid = 3\ndata_dir = /srv/coffer\nlog_level = debug\n"
             "[raft]\naddress = 10.0.0.3:7001\nbootstrap = no\nelection_timeout = 2s\n"
             "heartbeat = 150ms\nsnapshot_threshold = 4096\nsnapshot_trailing = 100\n"
             "snapshot_bytes = 1G\ncheckpoints_kept = 3\n"
             "[lmdb]\nmap_size = 1G\n"
             "[tls]\ncert = /c.pem\nkey = /k.pem\nca = /ca.pem\nmin_version = TLSv1.3\n"
             "ciphers = HIGH:!aNULL\n"
             "[imap]\nlisten = 127.0.0.1:1143\nlisten_tls = \n"
             "[pop3]\nlisten = [::1]:1110\nlisten_tls = *:1995\n"
             "[admin]\nlisten = 127.0.0.1:17443\nsecret_file = %s\n"
             "[auth]\nallow_plaintext = yes\nscrypt_log2n = 10\n"
             "[limits]\nmax_line = 8k\nmax_literal = 1M\nmax_message = 20M\n"
             "max_mailbox_name = 300\nmax_mailbox_depth = 8\nmax_sessions = 50\n"
             "max_bad_commands = 5\npreauth_timeout = 10s\nidle_timeout = 5m\n"
             "idle_keepalive = 30s\n",
             secret_path);
    write_file(conf_path, text, 0600);
    CU_ASSERT_EQUAL_FATAL(sconf_load(conf_path, &c, err, sizeof err), 0);
    CU_ASSERT_EQUAL(c.node_id, 3);
    CU_ASSERT_STRING_EQUAL(c.data_dir, "/srv/coffer");
    CU_ASSERT_STRING_EQUAL(c.log_level, "debug");
    CU_ASSERT_STRING_EQUAL(c.raft_address, "10.0.0.3:7001");
    CU_ASSERT_EQUAL(c.raft_bootstrap, 0);
    CU_ASSERT_EQUAL(c.election_timeout_ms, 2000);
    CU_ASSERT_EQUAL(c.heartbeat_ms, 150);
    CU_ASSERT_EQUAL(c.snapshot_threshold, 4096);
    CU_ASSERT_EQUAL(c.snapshot_trailing, 100);
    CU_ASSERT_EQUAL(c.snapshot_bytes, 1ull << 30);
    CU_ASSERT_EQUAL(c.checkpoints_kept, 3);
    CU_ASSERT_EQUAL(c.map_size, 1ull << 30);
    CU_ASSERT_STRING_EQUAL(c.tls_cert, "/c.pem");
    CU_ASSERT_STRING_EQUAL(c.tls_key, "/k.pem");
    CU_ASSERT_STRING_EQUAL(c.tls_ca, "/ca.pem");
    CU_ASSERT_STRING_EQUAL(c.tls_min_version, "TLSv1.3");
    CU_ASSERT_STRING_EQUAL(c.tls_ciphers, "HIGH:!aNULL");
    CU_ASSERT_STRING_EQUAL(c.imap_listen, "127.0.0.1:1143");
    CU_ASSERT_STRING_EQUAL(c.imaps_listen, ""); /* disabled */
    CU_ASSERT_STRING_EQUAL(c.pop3_listen, "[::1]:1110");
    CU_ASSERT_STRING_EQUAL(c.pop3s_listen, "*:1995");
    CU_ASSERT_STRING_EQUAL(c.admin_listen, "127.0.0.1:17443");
    CU_ASSERT_STRING_EQUAL(c.admin_secret_file, secret_path);
    CU_ASSERT_STRING_EQUAL(c.admin_secret, "s3cret-token");
    CU_ASSERT_EQUAL(c.allow_plaintext, 1);
    CU_ASSERT_EQUAL(c.scrypt_ln, 10);
    CU_ASSERT_EQUAL(c.max_line, 8192);
    CU_ASSERT_EQUAL(c.max_literal, 1 << 20);
    CU_ASSERT_EQUAL(c.max_message, 20 << 20);
    CU_ASSERT_EQUAL(c.max_mailbox_name, 300);
    CU_ASSERT_EQUAL(c.max_mailbox_depth, 8);
    CU_ASSERT_EQUAL(c.max_sessions, 50);
    CU_ASSERT_EQUAL(c.max_bad_commands, 5);
    CU_ASSERT_EQUAL(c.preauth_timeout_ms, 10000);
    CU_ASSERT_EQUAL(c.idle_timeout_ms, 300000);
    CU_ASSERT_EQUAL(c.idle_keepalive_ms, 30000);
    sconf_free(&c);
}

/* Each case must fail, and the error must mention `needle`. */
static void expect_refused(const char *extra, const char *needle)
{
    struct sconf c;
    char err[256];

    memset(&c, 0x5a, sizeof c);
    CU_ASSERT_EQUAL(load_with(extra, &c, err, sizeof err), -1);
    if (strstr(err, needle) == NULL) {
        fprintf(stderr, "\n  config [%s]: error \"%s\" lacks \"%s\"\n", extra, err, needle);
        CU_FAIL("error text does not name the problem");
    }
    CU_ASSERT_PTR_NULL(c.data_dir); /* nothing left to free */
}

static void test_unknown_refused(void)
{
    expect_refused("[imap]\nlisten_ssl = 127.0.0.1:993", "imap.listen_ssl");
    expect_refused("[imapd]\nlisten = 127.0.0.1:143", "[imapd]");
    expect_refused("[limits]\nmax_lines = 10k", "limits.max_lines");
}

static void test_bad_values(void)
{
    expect_refused("[node]\nid = 0", "node.id");
    expect_refused("[node]\nid = -1", "node.id");
    expect_refused("[node]\nlog_level = loud", "node.log_level");
    expect_refused("[node]\ndata_dir = ", "node.data_dir");
    expect_refused("[raft]\nheartbeat = 1s", "raft.heartbeat");
    expect_refused("[raft]\nelection_timeout = 100ms\nheartbeat = 100ms", "raft.heartbeat");
    expect_refused("[raft]\nelection_timeout = soon", "raft.election_timeout");
    expect_refused("[raft]\nbootstrap = perhaps", "raft.bootstrap");
    expect_refused("[raft]\naddress = localhost", "raft.address");
    expect_refused("[raft]\naddress = ", "raft.address");
    expect_refused("[raft]\nsnapshot_threshold = 0", "raft.snapshot_threshold");
    expect_refused("[raft]\nsnapshot_trailing = 0", "raft.snapshot_trailing");
    expect_refused("[raft]\ncheckpoints_kept = 0", "raft.checkpoints_kept");
    expect_refused("[raft]\ncheckpoints_kept = 101", "raft.checkpoints_kept");
    expect_refused("[raft]\nsnapshot_bytes = lots", "raft.snapshot_bytes");
    expect_refused("[lmdb]\nmap_size = 1M", "lmdb.map_size");
    expect_refused("[lmdb]\nmap_size = 12q", "lmdb.map_size");
    expect_refused("[tls]\nmin_version = SSLv3", "tls.min_version");
    expect_refused("[imap]\nlisten = 127.0.0.1:99999", "imap.listen");
    expect_refused("[imap]\nlisten = 127.0.0.1:7001", "raft.address");
    expect_refused("[auth]\nscrypt_log2n = 40", "auth.scrypt_log2n");
    expect_refused("[auth]\nallow_plaintext = 2", "auth.allow_plaintext");
    expect_refused("[limits]\nmax_line = 4096", "limits.max_line");
    expect_refused("[limits]\nmax_message = 2G", "limits.max_message");
    expect_refused("[limits]\nmax_sessions = 0", "limits.max_sessions");
    expect_refused("[limits]\nidle_keepalive = 1h\nidle_timeout = 30m", "limits.idle_keepalive");
    expect_refused("[limits]\npreauth_timeout = 10ms", "limits.preauth_timeout");
}

static void test_tls_and_secret(void)
{
    struct sconf c;
    char err[256], text[1024], bad_secret[160];

    /* TLS listeners without cert/key. */
    write_file(conf_path, "[admin]\nlisten = \n", 0600);
    CU_ASSERT_EQUAL(sconf_load(conf_path, &c, err, sizeof err), -1);
    CU_ASSERT_PTR_NOT_NULL(strstr(err, "tls.cert"));

    /* Everything TLS off and plaintext allowed: no cert, no secret needed. */
    write_file(conf_path,
               "[imap]\nlisten_tls =\n[pop3]\nlisten_tls =\n[admin]\nlisten =\n"
               "[auth]\nallow_plaintext = yes\n",
               0600);
    CU_ASSERT_EQUAL(sconf_load(conf_path, &c, err, sizeof err), 0);
    CU_ASSERT_PTR_NULL(c.admin_secret);
    CU_ASSERT_PTR_NULL(c.tls_cert);
    sconf_free(&c);

    /* Admin listener without a secret file. */
    write_file(conf_path, "[tls]\ncert = /c\nkey = /k\n", 0600);
    CU_ASSERT_EQUAL(sconf_load(conf_path, &c, err, sizeof err), -1);
    CU_ASSERT_PTR_NOT_NULL(strstr(err, "admin.secret_file"));

    /* Secret readable by others is refused; an empty one too. */
    snprintf(bad_secret, sizeof bad_secret, "%s/secret-open", dir);
    write_file(bad_secret, "abc\n", 0644);
    snprintf(text, sizeof text, "[tls]\ncert = /c\nkey = /k\n[admin]\nsecret_file = %s\n",
             bad_secret);
    write_file(conf_path, text, 0600);
    CU_ASSERT_EQUAL(sconf_load(conf_path, &c, err, sizeof err), -1);
    CU_ASSERT_PTR_NOT_NULL(strstr(err, "group/others"));
    write_file(bad_secret, "\r\n", 0600);
    CU_ASSERT_EQUAL(sconf_load(conf_path, &c, err, sizeof err), -1);
    CU_ASSERT_PTR_NOT_NULL(strstr(err, "empty"));
    write_file(bad_secret, "two\nlines\n", 0600);
    CU_ASSERT_EQUAL(sconf_load(conf_path, &c, err, sizeof err), -1);
    unlink(bad_secret);
    CU_ASSERT_EQUAL(sconf_load(conf_path, &c, err, sizeof err), -1);
    CU_ASSERT_PTR_NOT_NULL(strstr(err, "cannot open"));

    /* Missing config file. */
    CU_ASSERT_EQUAL(sconf_load("/nonexistent/coffer.conf", &c, err, sizeof err), -1);
    CU_ASSERT_TRUE(err[0] != '\0');
}

int main(void)
{
    CU_pSuite s;
    unsigned failures;
    char cmd[128];

    cf_log_init("test_sconf", CF_LOG_WARN, 0);
    if (mkdtemp(strcpy(dir, "/tmp/coffer-sconf-XXXXXX")) == NULL) return 1;
    snprintf(conf_path, sizeof conf_path, "%s/store.conf", dir);
    snprintf(secret_path, sizeof secret_path, "%s/admin.secret", dir);
    {
        FILE *f = fopen(secret_path, "w");
        if (f == NULL) return 1;
        fputs("s3cret-token\n", f);
        fclose(f);
        chmod(secret_path, 0600);
    }
    if (CU_initialize_registry() != CUE_SUCCESS) return 1;
    s = CU_add_suite("sconf", NULL, NULL);
    CU_add_test(s, "defaults", test_defaults);
    CU_add_test(s, "minimal file", test_minimal_file);
    CU_add_test(s, "full sample", test_full_sample);
    CU_add_test(s, "unknown keys and sections refused", test_unknown_refused);
    CU_add_test(s, "bad values refused", test_bad_values);
    CU_add_test(s, "tls and admin secret", test_tls_and_secret);
    CU_basic_set_mode(CU_BRM_VERBOSE);
    CU_basic_run_tests();
    failures = CU_get_number_of_failures();
    CU_cleanup_registry();
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
    if (system(cmd) != 0) fprintf(stderr, "cleanup of %s failed\n", dir);
    return failures != 0;
}
