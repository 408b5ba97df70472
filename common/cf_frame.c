/* cf_frame: length-prefixed frames. See cf_frame.h. */
#include "cf_frame.h"

#include <stdlib.h>
#include <string.h>

void cf_frame_dec_init(struct cf_frame_dec *d, size_t max)
{
    memset(d, 0, sizeof(*d));
    d->max = max ? max : CF_FRAME_MAX_DEFAULT;
}

void cf_frame_dec_free(struct cf_frame_dec *d)
{
    free(d->buf);
    d->buf = NULL;
    d->hdr_have = 0;
    d->len = d->have = 0;
}

void cf_frame_hdr(uint8_t hdr[4], uint32_t len)
{
    hdr[0] = (uint8_t)(len >> 24);
    hdr[1] = (uint8_t)(len >> 16);
    hdr[2] = (uint8_t)(len >> 8);
    hdr[3] = (uint8_t)len;
}

long cf_frame_dec_feed(struct cf_frame_dec *d, const uint8_t *data, size_t len, uint8_t **frame_r,
                       size_t *frame_len_r)
{
    size_t used = 0;

    *frame_r = NULL;
    *frame_len_r = 0;
    while (d->hdr_have < 4) {
        if (used == len) return (long)used;
        d->hdr[d->hdr_have++] = data[used++];
        if (d->hdr_have == 4) {
            d->len = ((size_t)d->hdr[0] << 24) | ((size_t)d->hdr[1] << 16) |
                     ((size_t)d->hdr[2] << 8) | (size_t)d->hdr[3];
            if (d->len > d->max) return -1;
            d->have = 0;
            /* +1 so that a zero-length frame still yields a non-NULL pointer */
            d->buf = malloc(d->len + 1);
            if (d->buf == NULL) return -1;
        }
    }
    if (d->have < d->len) {
        size_t take = d->len - d->have;
        if (take > len - used) take = len - used;
        memcpy(d->buf + d->have, data + used, take);
        d->have += take;
        used += take;
    }
    if (d->have == d->len) {
        *frame_r = d->buf;
        *frame_len_r = d->len;
        d->buf = NULL;
        d->hdr_have = 0;
        d->len = d->have = 0;
    }
    return (long)used;
}

/* Write all of data, looping over partial writes. */
static int ssl_write_all(SSL *ssl, const uint8_t *data, size_t len)
{
    while (len > 0) {
        size_t n = 0;
        if (SSL_write_ex(ssl, data, len, &n) != 1) {
            int e = SSL_get_error(ssl, 0);
            if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE) continue;
            return -1;
        }
        data += n;
        len -= n;
    }
    return 0;
}

/* Read exactly len bytes. */
static int ssl_read_all(SSL *ssl, uint8_t *buf, size_t len)
{
    while (len > 0) {
        size_t n = 0;
        if (SSL_read_ex(ssl, buf, len, &n) != 1) {
            int e = SSL_get_error(ssl, 0);
            if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE) continue;
            return -1;
        }
        buf += n;
        len -= n;
    }
    return 0;
}

int cf_frame_ssl_write(SSL *ssl, const uint8_t *data, size_t len)
{
    uint8_t hdr[4];

    if (len > UINT32_MAX) return -1;
    cf_frame_hdr(hdr, (uint32_t)len);
    if (ssl_write_all(ssl, hdr, sizeof(hdr)) < 0) return -1;
    return ssl_write_all(ssl, data, len);
}

int cf_frame_ssl_read(SSL *ssl, size_t max, uint8_t **frame_r, size_t *len_r)
{
    uint8_t hdr[4], *buf;
    size_t len;

    *frame_r = NULL;
    *len_r = 0;
    if (ssl_read_all(ssl, hdr, sizeof(hdr)) < 0) return -1;
    len = ((size_t)hdr[0] << 24) | ((size_t)hdr[1] << 16) | ((size_t)hdr[2] << 8) | hdr[3];
    if (len > (max ? max : CF_FRAME_MAX_DEFAULT)) return -1;
    buf = malloc(len + 1);
    if (buf == NULL) return -1;
    if (ssl_read_all(ssl, buf, len) < 0) {
        free(buf);
        return -1;
    }
    *frame_r = buf;
    *len_r = len;
    return 0;
}
