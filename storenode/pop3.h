/* pop3: the POP3 server (RFC 1939, CAPA RFC 2449, STLS RFC 2595, AUTH
 * PLAIN RFC 5034, response codes RFC 3206). The session itself is reached
 * through listeners.h (pop3_accept, pop3_close_all); this header is the
 * pure, bounded and fuzzable part: the line splitter, the command parser,
 * the dot-stuffer and the TOP cut. None of them allocate or keep state
 * beyond what the caller passes in.
 *
 * Policy decisions (documented in docs/ too):
 *  - No maildrop lock: the INBOX is snapshotted at login (message numbers
 *    fixed for the session); a message expunged by IMAP meanwhile answers
 *    "-ERR Message was deleted".
 *  - RETR and TOP do not set \Seen (like Dovecot's pop3_no_flag_updates):
 *    POP3 downloads never change IMAP-visible state except through QUIT.
 *  - DELE marks only; QUIT in TRANSACTION proposes one Expunge entry
 *    (require_deleted = false) and answers +OK only after it committed.
 *    A dropped connection removes nothing. */
#ifndef POP3_H
#define POP3_H

#include <stddef.h>
#include <stdint.h>

/* RFC 2449 section 4: a command line is at most 255 octets of arguments,
 * 512 octets in all including CRLF. */
#define POP3_MAX_LINE 512
/* AUTH continuation lines (base64 of a SASL PLAIN response) may be larger. */
#define POP3_MAX_AUTH_LINE 4096
/* RFC 2449: each argument up to 255 octets. */
#define POP3_MAX_ARG 255

enum pop3_cmd_id {
    POP3_CMD_USER = 1,
    POP3_CMD_PASS,
    POP3_CMD_STAT,
    POP3_CMD_LIST,
    POP3_CMD_RETR,
    POP3_CMD_DELE,
    POP3_CMD_NOOP,
    POP3_CMD_RSET,
    POP3_CMD_QUIT,
    POP3_CMD_TOP,
    POP3_CMD_UIDL,
    POP3_CMD_CAPA,
    POP3_CMD_STLS,
    POP3_CMD_AUTH,
    POP3_CMD_XCLIENT, /* XCLIENT ADDR=<ip> [PORT=<n>]: trusted proxies only */
};

/* A parsed command. Pointers point into the parsed line (borrowed: valid
 * as long as the caller's line buffer). */
struct pop3_cmd {
    enum pop3_cmd_id id;
    int has_msg;      /* LIST/UIDL: a message number was given; always 1 for RETR/DELE/TOP */
    uint32_t msg;     /* message number (1..UINT32_MAX; 0 is parsed but names no message) */
    uint32_t lines;   /* TOP: number of body lines */
    const char *arg;  /* USER name, PASS password (may contain spaces), AUTH mechanism,
                       * XCLIENT attributes (rest of the line) */
    size_t arg_len;   /* 0 when absent (AUTH with no mechanism lists them) */
    const char *arg2; /* AUTH: initial response ("=" = empty), NULL when absent */
    size_t arg2_len;
};

enum pop3_parse_result {
    POP3_PARSE_OK = 0,
    POP3_PARSE_UNKNOWN = -1, /* not a command we know (or empty line) */
    POP3_PARSE_BADARGS = -2, /* known command, wrong / missing / extra arguments */
    POP3_PARSE_TOOLONG = -3, /* line or argument above the RFC limits */
};

/* Parse one command line `line` of `len` bytes WITHOUT its CRLF. Keywords
 * are case-insensitive; arguments are separated by single spaces (a run of
 * spaces is tolerated); numbers are decimal without sign and must fit in
 * 32 bits. Returns an enum pop3_parse_result; *cmd_r is filled on OK. */
int pop3_parse_line(const char *line, size_t len, struct pop3_cmd *cmd_r);

/* Line splitter. Looks for LF in buf[0..len). Returns the length of the
 * first line INCLUDING its terminator and sets *line_len_r to the length
 * without the terminator (CRLF, or a bare LF tolerated). Returns 0 when no
 * complete line is there yet and len < max, or -1 when no LF occurs within
 * the first `max` bytes (line too long: the caller discards up to the next
 * LF, see pop3_skip_line). */
long pop3_split_line(const char *buf, size_t len, size_t max, size_t *line_len_r);

/* Discard-mode helper: returns the number of bytes up to and including the
 * first LF and sets *found_r = 1, or len and *found_r = 0. */
size_t pop3_skip_line(const char *buf, size_t len, int *found_r);

/* Dot-stuffing, zero-copy and restartable on arbitrary chunk boundaries.
 * Scans in[0..len) with the line-start state *at_line_start (1 at the start
 * of a message). Returns the number of leading bytes that can be sent as
 * they are. When *need_dot_r is set, the caller must send one extra "."
 * after those bytes and call again from in + returned (which is the '.'
 * that starts a line; the state was updated so it is not stuffed twice).
 * When *need_dot_r is 0 the whole input was consumed (return == len). */
size_t pop3_dotstuff_span(const char *in, size_t len, int *at_line_start, int *need_dot_r);

/* Copying convenience over pop3_dotstuff_span (tests, fuzzing): appends
 * the stuffed form of in[0..len) to out (capacity out_cap; needs at most
 * 2 * len). Returns bytes written, or (size_t)-1 when out is too small. */
size_t pop3_dotstuff(const char *in, size_t len, int *at_line_start, char *out, size_t out_cap);

/* TOP: the number of leading bytes of msg to send for "TOP n lines": the
 * header, the empty line, and the first `lines` body lines. If the message
 * has no empty line (header only) the whole message is returned and
 * *no_body_r is set (the caller then adds the empty line, which Outlook
 * Express needs). */
size_t pop3_top_length(const char *msg, size_t len, uint32_t lines, int *no_body_r);

/* UIDL of a message: "%08x%08x" of (uidvalidity, uid), 16 chars + NUL. */
void pop3_uidl(uint32_t uidvalidity, uint32_t uid, char out[17]);

#endif
