/* libFuzzer target: coffer-mmp's pre-auth parsers (proxy/px_parse.c).
 * The first byte picks small or default limits; the input is fed in
 * chunks to the IMAP accumulator (every complete command tokenized), and
 * as lines to the POP3 parser and the SASL PLAIN decoder. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "px_parse.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size == 0) return 0;
    struct px_limits lim =
        (data[0] & 1) ? (struct px_limits){64, 32, 200} : (struct px_limits){8192, 8192, 8192 * 3};
    size_t step = (size_t)(data[0] >> 1) + 1;
    data++;
    size--;
    struct px_imap_parser *p = px_imap_parser_new(&lim);
    size_t off = 0;
    while (off < size) {
        size_t len = size - off < step ? size - off : step, used = 0;
        enum px_imap_rc rc = px_imap_feed(p, (const char *)data + off, len, &used);
        if (used > len) abort();
        off += used;
        if (rc == PX_IMAP_DONE) {
            size_t rl;
            char *raw = px_imap_raw(p, &rl);
            struct px_imap_cmd cmd;
            const char *err;
            if (px_imap_tokenize(raw, rl, &cmd, &err) == 0) {
                for (size_t i = 0; i < cmd.n_args; i++)
                    if (cmd.args[i].s &&
                        (cmd.args[i].s < raw || cmd.args[i].s + cmd.args[i].len > raw + rl))
                        abort();
            }
        } else if (rc == PX_IMAP_FATAL) {
            px_imap_parser_reset(p);
            if (used == 0) off++;
        } else if (rc == PX_IMAP_MORE && used < len) {
            abort();
        }
    }
    char tag[80];
    px_imap_tag(p, tag, sizeof(tag));
    px_imap_parser_free(&p);

    off = 0;
    while (off < size) {
        size_t ll, u;
        int r = px_find_line((const char *)data + off, size - off, lim.max_line, &ll, &u);
        if (r <= 0) break;
        struct px_pop3_cmd c;
        const char *line = (const char *)data + off;
        if (px_pop3_parse(line, ll, &c) == 0 && c.arg_len > 0) {
            unsigned char out[2048];
            long n = px_b64_decode(c.arg, c.arg_len, out, sizeof(out));
            struct px_sasl_plain sp;
            if (n > 0) (void)px_sasl_plain_split(out, (size_t)n, &sp);
        }
        off += u;
    }
    return 0;
}
