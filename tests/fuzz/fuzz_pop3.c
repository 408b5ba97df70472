/* libFuzzer target for the POP3 line splitter, command parser, dot-stuffer
 * and TOP cut (storenode/pop3.h). Checks invariants, not just crashes:
 * stuffing on arbitrary chunk boundaries equals stuffing in one go, and
 * un-stuffing gives back the input. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "auth.h"
#include "pop3.h"

static void check_parse(const char *buf, size_t len)
{
    size_t off = 0;
    while (off < len) {
        size_t ll = 0;
        long r = pop3_split_line(buf + off, len - off, POP3_MAX_AUTH_LINE, &ll);
        if (r == 0) {
            ll = len - off; /* parse the unterminated tail too */
            r = (long)ll;
        } else if (r < 0) {
            int found;
            off += pop3_skip_line(buf + off, len - off, &found);
            continue;
        }
        if (ll > (size_t)r) abort();
        struct pop3_cmd cmd;
        int rc = pop3_parse_line(buf + off, ll, &cmd);
        if (rc == POP3_PARSE_OK) {
            if (cmd.arg_len && (cmd.arg < buf + off || cmd.arg + cmd.arg_len > buf + off + ll))
                abort();
            if (cmd.arg2 && (cmd.arg2 < buf + off || cmd.arg2 + cmd.arg2_len > buf + off + ll))
                abort();
            if (cmd.id != POP3_CMD_AUTH && ll > POP3_MAX_LINE - 2) abort();
            if (cmd.id == POP3_CMD_AUTH && cmd.arg2) {
                char *u, *p;
                size_t pl;
                if (auth_plain_decode(cmd.arg2, cmd.arg2_len, &u, &p, &pl) == 0) {
                    if (strlen(u) == 0 || pl == 0 || strlen(p) != pl) abort();
                    free(u);
                    free(p);
                }
            }
        }
        off += (size_t)r;
    }
}

static void check_stuff(const char *buf, size_t len, size_t split)
{
    char *one = malloc(2 * len + 1), *two = malloc(2 * len + 1), *back = malloc(len + 1);
    int als = 1;
    size_t a, b, c, o = 0;
    if (!one || !two || !back) abort();
    a = pop3_dotstuff(buf, len, &als, one, 2 * len + 1);
    if (a == (size_t)-1) abort();
    als = 1;
    b = pop3_dotstuff(buf, split, &als, two, 2 * len + 1);
    c = pop3_dotstuff(buf + split, len - split, &als, two + b, 2 * len + 1 - b);
    if (b == (size_t)-1 || c == (size_t)-1 || b + c != a || memcmp(one, two, a) != 0) abort();
    /* un-stuff: drop the first '.' of each line starting with '.' */
    int bol = 1;
    for (size_t i = 0; i < a; i++) {
        if (bol && one[i] == '.') {
            if (i + 1 >= a || one[i + 1] != '.')
                abort(); /* a stuffed line always starts with ".." */
            i++;
        }
        back[o++] = one[i];
        bol = one[i] == '\n';
    }
    if (o != len || memcmp(back, buf, len) != 0) abort();
    free(one);
    free(two);
    free(back);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    const char *buf = (const char *)data;
    check_parse(buf, size);
    check_stuff(buf, size, size ? data[0] % (size + 1) : 0);
    int nb;
    size_t t = pop3_top_length(buf, size, size ? data[size - 1] : 0, &nb);
    if (t > size) abort();
    return 0;
}
