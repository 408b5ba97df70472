/* mime: RFC 5322 / MIME structure of a stored message, computed once at
 * APPEND/delivery time by the proposer (pure functions of the bytes, so
 * every node stores the same cache), plus the helpers FETCH and SEARCH need.
 * All parsing is bounded: nesting depth <= MIME_MAX_DEPTH, parts <=
 * MIME_MAX_PARTS (deeper/more parts are treated as opaque bodies), header
 * lines of any length are handled without copying the message.
 *
 * Messages are stored CRLF-normalised; offsets below are into those bytes.
 */
#ifndef MIME_H
#define MIME_H

#include <stddef.h>
#include <stdint.h>

#define MIME_MAX_DEPTH 32
#define MIME_MAX_PARTS 1000

/* Growable byte buffer used for rendered output. */
struct mbuf {
    char *data;
    size_t len, cap;
};
void mbuf_put(struct mbuf *b, const void *p, size_t n);
void mbuf_puts(struct mbuf *b, const char *s);
void mbuf_printf(struct mbuf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
void mbuf_free(struct mbuf *b);

/* Normalise line ends to CRLF (bare LF and bare CR become CRLF). NUL bytes
 * are kept (the caller decides policy). Returns a malloc()ed buffer. */
char *mime_crlf_normalize(const char *in, size_t len, size_t *out_len_r);

/* One node of the part tree. Offsets are absolute in the message. */
struct mime_part {
    uint64_t hdr_start, hdr_end;   /* header block incl. the blank line (if any) */
    uint64_t body_start, body_end; /* body (for multipart: the raw multipart body) */
    uint32_t body_lines;           /* lines in body */
    uint32_t n_children;           /* multipart children, or 1 for message/rfc822 */
    uint32_t first_child;          /* index into the flat array; 0 = none */
    uint32_t next_sibling;         /* index; 0 = none */
    uint8_t is_multipart;
    uint8_t is_message_rfc822;
};

/* The whole tree, flat, root at index 0 (index 0 is never a child). */
struct mime_tree {
    struct mime_part *parts;
    uint32_t n_parts;
};

/* Everything the store caches for a message. All malloc()ed. */
struct mime_cache {
    struct mbuf envelope;      /* "(date subject from ...)" */
    struct mbuf bodystructure; /* "(...)" with extension data */
    struct mbuf body;          /* "(...)" without extension data */
    struct mbuf parts;         /* mime_tree_serialize output */
    int64_t sent_date;         /* Date: as UTC seconds, or 0 when absent/invalid */
};

/* Parse msg and fill cache. Never fails on malformed input (falls back to
 * text/plain bodies); returns -1 only on allocation failure. */
int mime_build_cache(const char *msg, size_t len, struct mime_cache *c_r);
void mime_cache_free(struct mime_cache *c);

/* Part tree (de)serialisation for the cache. deserialize validates bounds
 * against msg_len; returns -1 on corrupt data. */
int mime_tree_parse(const char *msg, size_t len, struct mime_tree *t_r);
void mime_tree_serialize(const struct mime_tree *t, struct mbuf *out);
int mime_tree_deserialize(const char *buf, size_t len, uint64_t msg_len, struct mime_tree *t_r);
void mime_tree_free(struct mime_tree *t);

/* Resolve an IMAP section part number "1.2.3" (nums[], n) to a part index.
 * n == 0 is the whole message. Returns -1 when the part does not exist. For
 * a non-multipart message, part 1 is the message body itself. For a
 * message/rfc822 part, its sub-parts number the encapsulated message's
 * parts. */
int mime_find_part(const struct mime_tree *t, const uint32_t *nums, size_t n, uint32_t *idx_r);

/* For a message/rfc822 part (or the root), the encapsulated message's
 * header and text ranges. */
int mime_message_ranges(const struct mime_tree *t, uint32_t idx, uint64_t *hdr_start,
                        uint64_t *hdr_end, uint64_t *text_start, uint64_t *text_end);

/* HEADER.FIELDS / HEADER.FIELDS.NOT: copy the matching header fields (with
 * folding, in order) from hdr[0..len) plus the terminating blank line, into
 * out. Names compare case-insensitively. */
void mime_header_fields(const char *hdr, size_t len, const char *const *names, size_t n_names,
                        int negate, struct mbuf *out);

/* Value of the first header field `name` (unfolded, leading space trimmed)
 * into out; returns 1 if found, 0 if not. */
int mime_header_get(const char *hdr, size_t len, const char *name, struct mbuf *out);

/* RFC 5322 date -> UTC seconds (and zone offset in minutes). -1 if invalid. */
int mime_parse_date(const char *s, size_t len, int64_t *utc_r, int *tz_min_r);

/* SEARCH helpers. Case-insensitive (ASCII and, for UTF-8, simple case
 * folding of Latin letters) substring match of needle (UTF-8). */
int mime_search_header(const char *msg, size_t len, const struct mime_tree *t,
                       const char *field /* NULL = any */, const char *needle);
/* Match against decoded (quoted-printable/base64) text parts. */
int mime_search_body(const char *msg, size_t len, const struct mime_tree *t, const char *needle);
/* TEXT: header or body. */
int mime_search_text(const char *msg, size_t len, const struct mime_tree *t, const char *needle);

/* ---- Lower-level helpers (shared by mime.c and mime_search.c; usable by
 * FETCH code too). ---- */

/* One header field. name is NULL for a line without ':' (still skipped).
 * raw covers the whole field incl. continuation lines and its CRLF; value
 * is the text after ':' up to (not incl.) the final CRLF, still folded. */
struct mime_field {
    const char *name;
    size_t name_len;
    const char *raw;
    size_t raw_len;
    const char *value;
    size_t value_len;
};
/* Iterate fields of hdr[0..len) from *pos; returns 1 and fills *f, or 0 at
 * the blank line / end. */
int mime_field_next(const char *hdr, size_t len, size_t *pos, struct mime_field *f);
/* Append v unfolded (CR/LF dropped) and trimmed of surrounding WSP. */
void mime_unfold(const char *v, size_t n, struct mbuf *out);
/* Append s as an IMAP string: quoted ("\" and "\"" escaped), or a literal
 * {n}CRLF... when it has CR/LF/NUL/8-bit bytes or is longer than 1024. */
void mime_imap_string(struct mbuf *b, const char *s, size_t n);
/* ENVELOPE of the header block hdr[0..len); BODY (ext=0) or BODYSTRUCTURE
 * (ext=1) of part idx. */
void mime_render_envelope(const char *hdr, size_t len, struct mbuf *out);
void mime_render_body(const char *msg, const struct mime_tree *t, uint32_t idx, int ext,
                      struct mbuf *out);

enum mime_charset { MIME_CS_UTF8, MIME_CS_ASCII, MIME_CS_LATIN1, MIME_CS_OTHER };
enum mime_encoding { MIME_ENC_IDENTITY, MIME_ENC_QP, MIME_ENC_BASE64 };
/* Charset name (optionally with an RFC 2231 "*lang" suffix) -> kind. */
int mime_charset_kind(const char *cs, size_t n);
void mime_latin1_to_utf8(const char *s, size_t n, struct mbuf *out);
/* For a leaf part: 1 if its content type is text (incl. the default),
 * with its transfer encoding and charset kind; 0 otherwise. */
int mime_part_text_info(const char *msg, const struct mime_tree *t, uint32_t idx, int *encoding_r,
                        int *charset_r);

#endif
