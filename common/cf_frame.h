/* cf_frame: length-prefixed frames (u32 big-endian length, then bytes) used
 * by the admin RPC. Incremental decoder with a hard maximum. */
#ifndef CF_FRAME_H
#define CF_FRAME_H

#include <stddef.h>
#include <stdint.h>

#define CF_FRAME_MAX_DEFAULT (16u * 1024 * 1024)

struct cf_frame_dec {
    uint8_t hdr[4];
    size_t hdr_have;
    uint8_t *buf; /* owned by the decoder until taken */
    size_t len, have, max;
};

void cf_frame_dec_init(struct cf_frame_dec *d, size_t max);
void cf_frame_dec_free(struct cf_frame_dec *d);
/* Feed bytes. Returns number of bytes consumed (<= len). When a frame is
 * complete, *frame_r and *frame_len_r are set (caller owns *frame_r, free()) and
 * consumption stops there; call again with the rest. Returns -1 when the
 * announced length exceeds max. */
long cf_frame_dec_feed(struct cf_frame_dec *d, const uint8_t *data, size_t len, uint8_t **frame_r,
                       size_t *frame_len_r);
/* Write a 4-byte header for len into hdr. */
void cf_frame_hdr(uint8_t hdr[4], uint32_t len);

/* Blocking helpers for the CLI (fd-less: over an SSL*). Return 0 or -1. */
#include <openssl/ssl.h>
int cf_frame_ssl_write(SSL *ssl, const uint8_t *data, size_t len);
int cf_frame_ssl_read(SSL *ssl, size_t max, uint8_t **frame_r, size_t *len_r);

#endif
