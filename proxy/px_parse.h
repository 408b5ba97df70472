/* px_parse: bounded, incremental pre-authentication parsers of coffer-mmp.
 * Pure functions over caller-supplied bytes: no I/O, no globals, so they
 * are unit-tested byte by byte and fuzzed (proxy/tests/fuzz_mmp_preauth.c).
 *
 * IMAP: px_imap_feed() accumulates one command (its line plus any literals,
 * each bounded) into a buffer owned by the parser and says when a
 * synchronising literal needs a "+" continuation; px_imap_tokenize() splits
 * a complete command into tag, name and arguments (atoms, quoted strings,
 * literals, NIL, and one level of parenthesised list, enough for ID).
 * POP3 and SASL continuations are single lines: px_find_line() finds one
 * in the connection's own buffer without copying.
 */
#ifndef PX_PARSE_H
#define PX_PARSE_H

#include <stddef.h>
#include <stdint.h>

#define PX_MAX_ARGS 64
#define PX_MAX_TAG 64

struct px_limits {
    size_t max_line;    /* one line, without literal bodies (>= 64) */
    size_t max_literal; /* one literal body */
    size_t max_command; /* whole command: lines + literal bodies */
};

enum px_imap_rc {
    PX_IMAP_MORE = 0,    /* all input used; the command is not complete */
    PX_IMAP_DONE,        /* a complete command is ready: px_imap_raw() */
    PX_IMAP_CONTINUE,    /* synchronising literal accepted: send "+ ...", feed on */
    PX_IMAP_BAD_LITERAL, /* synchronising literal refused (too large): reply
                            BAD to px_imap_tag(); the parser has been reset
                            and the session goes on (the client sends nothing) */
    PX_IMAP_FATAL        /* line too long, non-synchronising literal too
                            large, or a malformed literal: reply BAD, close */
};

struct px_imap_parser;

/* New parser with the given limits (copied). NULL on out of memory.
 * The accumulation buffer is allocated lazily and grows to at most
 * lim->max_command bytes. */
struct px_imap_parser *px_imap_parser_new(const struct px_limits *lim);
/* Free and set *p to NULL. NULL-safe. */
void px_imap_parser_free(struct px_imap_parser **p);
/* Forget the partial command (after STARTTLS, after a refusal). Frees the
 * buffer when it grew beyond 1 KiB. */
void px_imap_parser_reset(struct px_imap_parser *p);

/* Feed input. *used_r receives how many bytes were consumed; the caller
 * keeps the rest and feeds it again after acting on the result (DONE and
 * CONTINUE stop consumption right after the line that caused them).
 * After DONE the command stays available until the next feed or reset. */
enum px_imap_rc px_imap_feed(struct px_imap_parser *p, const char *buf, size_t len, size_t *used_r);

/* The complete command (lines with CRLF and literal bodies inline), mutable
 * so px_imap_tokenize() can unescape in place. Valid until the next feed. */
char *px_imap_raw(struct px_imap_parser *p, size_t *len_r);

/* The tag of the command being (or just) parsed, for error replies: copies
 * it into buf (NUL-terminated) or "*" when none is known or it is invalid. */
void px_imap_tag(const struct px_imap_parser *p, char *buf, size_t len);

/* Human-readable reason of the last BAD_LITERAL / FATAL. Static string. */
const char *px_imap_error(const struct px_imap_parser *p);

enum px_arg_type { PX_ARG_ATOM, PX_ARG_STRING, PX_ARG_NIL, PX_ARG_LIST_BEGIN, PX_ARG_LIST_END };

struct px_arg {
    enum px_arg_type type;
    const char *s; /* atoms and strings: bytes (not NUL-terminated); else NULL */
    size_t len;
};

struct px_imap_cmd {
    char tag[PX_MAX_TAG + 1]; /* "" when the tag itself was invalid */
    char name[24];            /* upper-cased command name */
    struct px_arg args[PX_MAX_ARGS];
    size_t n_args;
};

/* Split a complete command (as returned by px_imap_raw) into cmd. Quoted
 * strings are unescaped in place, so argument pointers point into buf.
 * Returns 0, or -1 with a static reason in *error_r (cmd->tag is set when
 * the tag was valid, so the caller can answer "<tag> BAD <reason>"). */
int px_imap_tokenize(char *buf, size_t len, struct px_imap_cmd *cmd, const char **error_r);

/* 1 when arg is a string-like value (atom, quoted string or literal). */
int px_arg_is_astring(const struct px_arg *a);

/* Find one line in buf: returns 1 and sets *line_len_r (without CR LF) and
 * *used_r (with them); 0 when no LF is in buf and len <= max_line (wait for
 * more); -1 when the line is longer than max_line bytes. A bare LF also
 * ends a line. */
int px_find_line(const char *buf, size_t len, size_t max_line, size_t *line_len_r, size_t *used_r);

/* POP3 command: name upper-cased (at most 8 letters), arg = the rest of the
 * line after one space (may contain spaces: PASS), or empty. */
struct px_pop3_cmd {
    char name[9];
    const char *arg;
    size_t arg_len;
};
/* Returns 0 or -1 (empty line, name too long or not letters). */
int px_pop3_parse(const char *line, size_t len, struct px_pop3_cmd *cmd);

/* Strict base64 decoding (RFC 4648, padding required, no whitespace) into
 * out (capacity outcap). Returns the decoded length or -1. */
long px_b64_decode(const char *in, size_t len, unsigned char *out, size_t outcap);
/* Base64 encoding with padding; out must hold 4*((len+2)/3)+1 bytes.
 * Returns the encoded length (NUL-terminated). */
size_t px_b64_encode(const unsigned char *in, size_t len, char *out);

/* SASL PLAIN message "authzid NUL authcid NUL passwd" (RFC 4616). Points
 * into msg. Returns 0, or -1 when malformed (not exactly two NULs, empty
 * authcid or password, or a field over 255 bytes for ids / 1024 for the
 * password). */
struct px_sasl_plain {
    const char *authzid, *authcid, *passwd;
    size_t authzid_len, authcid_len, passwd_len;
};
int px_sasl_plain_split(const unsigned char *msg, size_t len, struct px_sasl_plain *out);

#endif
