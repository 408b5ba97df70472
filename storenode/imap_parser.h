/* imap_parser: incremental, bounded parser of IMAP client commands.
 *
 * Feed it bytes as they arrive; it yields one complete command at a time as
 * a tag, a command name and an argument tree. It never reads a socket.
 *
 * Tokens: atoms, quoted strings (7-bit, \" and \\ escapes, no CR/LF/NUL),
 * literals {n} / {n+} (LITERAL+), NIL, parenthesised lists, nested to
 * max_depth. An atom containing '[' extends to the matching ']' (spaces
 * and parentheses included) and continues with atom characters, so FETCH
 * items like BODY.PEEK[HEADER.FIELDS (FROM TO)]<0.512> are one atom.
 *
 * Literals: when the parser reaches "{n}" at the end of a line it stops with
 * IMAP_PARSE_LITERAL and reports n, whether it is non-synchronising, and the
 * command name/tag so far; the session checks limits (and, for APPEND, the
 * mailbox) and then calls imap_parser_literal_accept() (after sending "+ ")
 * or imap_parser_literal_reject(). A rejected synchronising literal ends the
 * command (the client will not send it); a rejected non-synchronising one
 * obliges the session to close the connection (the bytes are already in
 * flight). Literal data is collected in a malloc()ed buffer (grown as the
 * bytes arrive, never preallocated from the announced size beyond 64 KiB)
 * that ends up n bytes + NUL (n <= the limit the session passes in).
 *
 * Limits (set at creation, changeable): max_line (bytes of command text
 * excluding literal data), max_literal, max_depth, max_args. Over a limit
 * the parser answers IMAP_PARSE_ERROR with a reason; the session replies
 * BAD and the parser resynchronises at the next line end (unless the line
 * ended in a literal that must be consumed first: then it skips it).
 *
 * Memory: the command and its args live in an arena owned by the parser,
 * valid until the next imap_parser_feed()/imap_parser_reset().
 */
#ifndef IMAP_PARSER_H
#define IMAP_PARSER_H

#include <stddef.h>
#include <stdint.h>

enum imap_arg_type {
    IMAP_ARG_ATOM = 1,
    IMAP_ARG_QUOTED,
    IMAP_ARG_LITERAL,
    IMAP_ARG_NIL,
    IMAP_ARG_LIST,
};

struct imap_arg {
    enum imap_arg_type type;
    const char
        *str; /* ATOM/QUOTED/LITERAL: NUL-terminated copy (literals may contain NULs; use len) */
    size_t len;
    struct imap_arg *list; /* LIST: children */
    size_t n_list;
};

struct imap_command {
    const char *tag;
    const char *name; /* upper-cased */
    struct imap_arg *args;
    size_t n_args;
    /* A literal whose buffer the session may take over (APPEND message):
     * imap_parser_take_literal() moves ownership of args[i].str to caller. */
};

enum imap_parse_result {
    IMAP_PARSE_NEED_MORE = 0, /* all input consumed, no complete command */
    IMAP_PARSE_COMMAND,       /* *cmd_r is a complete command */
    IMAP_PARSE_LITERAL,       /* waiting for the session to accept/reject a literal */
    IMAP_PARSE_ERROR,         /* syntax/limit error; *cmd_r may have tag; see error text */
    IMAP_PARSE_EMPTY_LINE,    /* a bare CRLF (ignored by the session, no reply) */
};

struct imap_parser_limits {
    size_t max_line;    /* default 65536 */
    size_t max_literal; /* default 65536 */
    size_t max_depth;   /* default 16 */
    size_t max_args;    /* default 10000 (all tokens of one command) */
};

struct imap_literal_info {
    uint64_t size;
    int non_sync;    /* {n+} */
    const char *tag; /* tag and name so far (may be NULL) */
    const char *name;
    size_t arg_index; /* index among top-level args the literal will take
                         (== n_args: a new top-level arg; < n_args: inside
                         the list args[arg_index]) */
    /* Top-level args parsed so far (the last one may be an unfinished
     * list when the literal sits inside it). Valid until
     * imap_parser_literal_accept()/reject(). */
    const struct imap_arg *args;
    size_t n_args;
};

struct imap_parser;

struct imap_parser *imap_parser_create(const struct imap_parser_limits *lim);
void imap_parser_destroy(struct imap_parser **p);
void imap_parser_set_limits(struct imap_parser *p, const struct imap_parser_limits *lim);
/* Drop all state and buffered input (after STARTTLS). */
void imap_parser_reset(struct imap_parser *p);

/* Consume input. Returns how far it got in *used_r (bytes of buf consumed)
 * and a result. Call repeatedly until NEED_MORE (or LITERAL awaiting a
 * decision). The parser buffers partial lines internally (bounded by
 * max_line), so the caller may always drop the consumed bytes. */
enum imap_parse_result imap_parser_feed(struct imap_parser *p, const char *buf, size_t len,
                                        size_t *used_r, struct imap_command **cmd_r,
                                        const char **error_r);

/* Current pending literal (valid after IMAP_PARSE_LITERAL). */
const struct imap_literal_info *imap_parser_literal(const struct imap_parser *p);
/* Accept: parser will collect `size` bytes (max_bytes overrides max_literal
 * for this literal, e.g. max message size for APPEND; 0 = max_literal). If
 * size exceeds that limit, the next feed returns IMAP_PARSE_ERROR "literal
 * too big" (with the tag) and skips the literal bytes and the rest of the
 * line - so check the size BEFORE sending "+ " and reject instead. */
void imap_parser_literal_accept(struct imap_parser *p, uint64_t max_bytes);
/* Reject: the command is abandoned. Returns 1 if the session must close the
 * connection (non-synchronising literal already in flight), else 0. */
int imap_parser_literal_reject(struct imap_parser *p);

/* Between commands: free the memory of the last command (arena, literal
 * buffers, argument vectors) and the line buffer, when no partial command
 * is buffered. The last command's imap_command and args become invalid.
 * A no-op while a command or literal is in progress. */
void imap_parser_compact(struct imap_parser *p);

/* Take ownership of a literal's buffer (malloc()ed, len bytes + NUL). */
char *imap_parser_take_literal(struct imap_parser *p, struct imap_arg *arg, size_t *len_r);

/* Read a raw line (AUTHENTICATE continuation, IDLE's DONE): returns 1 and
 * the line without CRLF in *line_r and *len_r (valid until next feed), 0 if more
 * input is needed, -1 if over max_line. */
int imap_parser_read_line(struct imap_parser *p, const char *buf, size_t len, size_t *used_r,
                          const char **line_r, size_t *len_r);

/* Helpers over args. */
int imap_arg_is_string(const struct imap_arg *a); /* atom, quoted or literal */
int imap_arg_is_astring(const struct imap_arg *a);
/* Atom/string equal to s, case-insensitive. */
int imap_arg_eq(const struct imap_arg *a, const char *s);

/* Modified UTF-7 (RFC 3501 5.1.3) <-> UTF-8. Return malloc()ed string or
 * NULL when the input is not valid canonical mUTF-7 / valid UTF-8. */
char *imap_mutf7_to_utf8(const char *in, size_t len);
char *imap_utf8_to_mutf7(const char *in, size_t len);

/* Sequence sets "1,3:5,7:*". Parsed into ranges; '*' becomes `star`.
 * Ranges are normalised (lo <= hi), sorted and merged. Returns 0 or -1. $ is
 * not supported (SEARCHRES) yet. max_ranges bounds memory. */
struct imap_seq_range {
    uint32_t lo, hi;
};
int imap_seqset_parse(const char *s, size_t len, uint32_t star, struct imap_seq_range **ranges_r,
                      size_t *n_r, size_t max_ranges);
int imap_seqset_contains(const struct imap_seq_range *r, size_t n, uint32_t v);

#endif
