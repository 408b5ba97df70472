/* cf_log: the one logging module. Lines go to stderr and, when available,
 * to the systemd journal (sd_journal_send) with PRIORITY and
 * SYSLOG_IDENTIFIER fields. Thread-safe (used from libuv worker threads). */
#ifndef CF_LOG_H
#define CF_LOG_H

#include <stdarg.h>

enum cf_log_level {
    CF_LOG_DEBUG = 7,
    CF_LOG_INFO = 6,
    CF_LOG_NOTICE = 5,
    CF_LOG_WARN = 4,
    CF_LOG_ERR = 3,
    CF_LOG_CRIT = 2
};

/* Set the program name (SYSLOG_IDENTIFIER), the minimum level written, and
 * whether to also send to the journal (journal=1 tries sd_journal; if the
 * journal socket is absent, only stderr is used). Call once at start. */
void cf_log_init(const char *ident, enum cf_log_level min_level, int journal);
/* Parse "debug|info|notice|warn|error|crit"; returns -1 when unknown. */
int cf_log_level_parse(const char *s, enum cf_log_level *level_r);

void cf_log(enum cf_log_level level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
void cf_logv(enum cf_log_level level, const char *fmt, va_list ap)
    __attribute__((format(printf, 2, 0)));

#define cf_debug(...) cf_log(CF_LOG_DEBUG, __VA_ARGS__)
#define cf_info(...) cf_log(CF_LOG_INFO, __VA_ARGS__)
#define cf_notice(...) cf_log(CF_LOG_NOTICE, __VA_ARGS__)
#define cf_warn(...) cf_log(CF_LOG_WARN, __VA_ARGS__)
#define cf_error(...) cf_log(CF_LOG_ERR, __VA_ARGS__)
#define cf_crit(...) cf_log(CF_LOG_CRIT, __VA_ARGS__)

/* One audit line per login attempt, always written (level NOTICE, field
 * COFFER_AUDIT=login in the journal):
 *   audit: login proto=imap user="bob" client=192.0.2.1 proxy=- result=ok
 * `proxy` is the proxy's address when the client address came from a
 * trusted proxy, NULL otherwise. `result` is a short word: ok, badpass,
 * nouser, disabled, plaintext-refused, throttled, error. Strings are
 * escaped (no control characters reach the log). */
void cf_log_audit_login(const char *proto, const char *user, const char *client_addr,
                        const char *proxy_addr, const char *result);

#endif
