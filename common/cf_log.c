/* cf_log: stderr + optional systemd journal logging. See cf_log.h. */
#include "cf_log.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define SD_JOURNAL_SUPPRESS_LOCATION
#include <systemd/sd-journal.h>

#define CF_LOG_LINE_MAX 4096
#define CF_LOG_JOURNAL_SOCKET "/run/systemd/journal/socket"

static pthread_mutex_t log_mutex = PTHREAD_MUTEX_INITIALIZER;
static char log_ident[64] = "coffer";
static enum cf_log_level log_min = CF_LOG_INFO;
static int log_journal;

static const char *level_name(enum cf_log_level level)
{
    switch (level) {
    case CF_LOG_DEBUG:
        return "debug";
    case CF_LOG_INFO:
        return "info";
    case CF_LOG_NOTICE:
        return "notice";
    case CF_LOG_WARN:
        return "warn";
    case CF_LOG_ERR:
        return "error";
    case CF_LOG_CRIT:
        return "crit";
    }
    return "?";
}

void cf_log_init(const char *ident, enum cf_log_level min_level, int journal)
{
    struct stat st;

    pthread_mutex_lock(&log_mutex);
    if (ident != NULL) snprintf(log_ident, sizeof(log_ident), "%s", ident);
    log_min = min_level;
    log_journal = journal && stat(CF_LOG_JOURNAL_SOCKET, &st) == 0 && S_ISSOCK(st.st_mode);
    pthread_mutex_unlock(&log_mutex);
}

int cf_log_level_parse(const char *s, enum cf_log_level *level_r)
{
    static const struct {
        const char *name;
        enum cf_log_level level;
    } names[] = {
        {"debug", CF_LOG_DEBUG}, {"info", CF_LOG_INFO},    {"notice", CF_LOG_NOTICE},
        {"warn", CF_LOG_WARN},   {"warning", CF_LOG_WARN}, {"error", CF_LOG_ERR},
        {"err", CF_LOG_ERR},     {"crit", CF_LOG_CRIT},
    };

    if (s == NULL) return -1;
    for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++) {
        if (strcasecmp(s, names[i].name) == 0) {
            *level_r = names[i].level;
            return 0;
        }
    }
    return -1;
}

/* Replace control characters (and DEL) in place so that one log call is
 * one line. */
static void scrub_controls(char *s)
{
    for (; *s != '\0'; s++) {
        unsigned char ch = (unsigned char)*s;
        if (ch < 0x20 || ch == 0x7f) *s = '?';
    }
}

/* Caller holds log_mutex. `msg` must already be scrubbed. */
static void emit_locked(enum cf_log_level level, const char *msg)
{
    struct timespec ts;
    struct tm tm;
    char tbuf[32];

    clock_gettime(CLOCK_REALTIME, &ts);
    gmtime_r(&ts.tv_sec, &tm);
    strftime(tbuf, sizeof(tbuf), "%Y-%m-%dT%H:%M:%S", &tm);
    fprintf(stderr, "%s.%03ldZ %s[%ld]: %s: %s\n", tbuf, ts.tv_nsec / 1000000L, log_ident,
            (long)getpid(), level_name(level), msg);
    fflush(stderr);
}

__attribute__((format(printf, 2, 0))) void cf_logv(enum cf_log_level level, const char *fmt,
                                                   va_list ap)
{
    char msg[CF_LOG_LINE_MAX];

    if (level > log_min) return; /* racy read is fine: levels change only at init */
    vsnprintf(msg, sizeof(msg), fmt, ap);
    scrub_controls(msg);
    pthread_mutex_lock(&log_mutex);
    emit_locked(level, msg);
    if (log_journal) {
        sd_journal_send("MESSAGE=%s", msg, "PRIORITY=%d", (int)level, "SYSLOG_IDENTIFIER=%s",
                        log_ident, NULL);
    }
    pthread_mutex_unlock(&log_mutex);
}

void cf_log(enum cf_log_level level, const char *fmt, ...)
{
    va_list ap;

    va_start(ap, fmt);
    cf_logv(level, fmt, ap);
    va_end(ap);
}

/* Escape s into out (size outlen): printable ASCII kept except '"' and '\\'
 * which are backslash-escaped; everything else becomes \xHH. NULL -> "-".
 * Always NUL-terminates; truncates long values. */
static void escape_field(const char *s, char *out, size_t outlen)
{
    static const char hex[] = "0123456789abcdef";
    size_t o = 0;

    if (outlen == 0) return;
    if (s == NULL) s = "-";
    for (; *s != '\0'; s++) {
        unsigned char ch = (unsigned char)*s;
        if (ch >= 0x20 && ch < 0x7f && ch != '"' && ch != '\\') {
            if (o + 1 >= outlen) break;
            out[o++] = (char)ch;
        } else if (ch == '"' || ch == '\\') {
            if (o + 2 >= outlen) break;
            out[o++] = '\\';
            out[o++] = (char)ch;
        } else {
            if (o + 4 >= outlen) break;
            out[o++] = '\\';
            out[o++] = 'x';
            out[o++] = hex[ch >> 4];
            out[o++] = hex[ch & 15];
        }
    }
    out[o] = '\0';
}

void cf_log_audit_login(const char *proto, const char *user, const char *client_addr,
                        const char *proxy_addr, const char *result)
{
    char eproto[32], euser[512], eclient[160], eproxy[160], eresult[64];
    char msg[CF_LOG_LINE_MAX];

    escape_field(proto, eproto, sizeof(eproto));
    escape_field(user, euser, sizeof(euser));
    escape_field(client_addr, eclient, sizeof(eclient));
    escape_field(proxy_addr, eproxy, sizeof(eproxy));
    escape_field(result, eresult, sizeof(eresult));
    snprintf(msg, sizeof(msg), "audit: login proto=%s user=\"%s\" client=%s proxy=%s result=%s",
             eproto, euser, eclient, eproxy, eresult);

    pthread_mutex_lock(&log_mutex);
    emit_locked(CF_LOG_NOTICE, msg);
    if (log_journal) {
        sd_journal_send("MESSAGE=%s", msg, "PRIORITY=%d", (int)CF_LOG_NOTICE,
                        "SYSLOG_IDENTIFIER=%s", log_ident, "COFFER_AUDIT=login", "USER=%s", euser,
                        "CLIENT=%s", eclient, "PROXY=%s", eproxy, "PROTO=%s", eproto, "RESULT=%s",
                        eresult, NULL);
    }
    pthread_mutex_unlock(&log_mutex);
}
