/* libFuzzer target for storenode/imap_parser.c and imap_utf7.c.
 *
 * Input byte 0 seeds the chunk sizes; the rest is fed in random-size
 * chunks. Every literal up to 64 bytes is accepted, bigger ones rejected.
 * Invariants: used <= len, NEED_MORE consumes the whole chunk, no endless
 * zero-progress loop, command trees are well formed, canonical mUTF-7
 * round-trips exactly, sequence sets come back sorted and merged; the
 * literal info's args are well formed; imap_parser_compact() may be called
 * between any two feeds.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "imap_parser.h"

#define CHECK(x)                                                                                   \
    do {                                                                                           \
        if (!(x)) abort();                                                                         \
    } while (0)

static void check_utf7(const char *s, size_t n)
{
    char *u = imap_mutf7_to_utf8(s, n);
    if (u != NULL) {
        char *back = imap_utf8_to_mutf7(u, strlen(u));
        CHECK(back != NULL);
        CHECK(strlen(back) == n && memcmp(back, s, n) == 0);
        free(back);
        free(u);
    }
    char *m = imap_utf8_to_mutf7(s, n);
    if (m != NULL) {
        char *back = imap_mutf7_to_utf8(m, strlen(m));
        CHECK(back != NULL);
        CHECK(memchr(s, '\0', n) != NULL || (strlen(back) == n && memcmp(back, s, n) == 0));
        free(back);
        free(m);
    }
}

static void check_seqset(const char *s, size_t n)
{
    struct imap_seq_range *r;
    size_t nr;
    if (imap_seqset_parse(s, n, 100, &r, &nr, 50) == 0) {
        CHECK(nr >= 1);
        for (size_t i = 0; i < nr; i++) {
            CHECK(r[i].lo <= r[i].hi);
            if (i > 0) CHECK(r[i].lo > r[i - 1].hi + 1);
            CHECK(imap_seqset_contains(r, nr, r[i].lo));
            CHECK(imap_seqset_contains(r, nr, r[i].hi));
        }
        free(r);
    }
}

static void walk(const struct imap_arg *a, size_t n, int depth)
{
    CHECK(depth < 64);
    for (size_t i = 0; i < n; i++) {
        switch (a[i].type) {
        case IMAP_ARG_ATOM:
            CHECK(a[i].len > 0 && strlen(a[i].str) == a[i].len);
            check_utf7(a[i].str, a[i].len);
            check_seqset(a[i].str, a[i].len);
            break;
        case IMAP_ARG_QUOTED:
            CHECK(strlen(a[i].str) == a[i].len);
            check_utf7(a[i].str, a[i].len);
            break;
        case IMAP_ARG_LITERAL:
            CHECK(a[i].str[a[i].len] == '\0');
            break;
        case IMAP_ARG_NIL:
            break;
        case IMAP_ARG_LIST:
            CHECK(a[i].n_list == 0 || a[i].list != NULL);
            walk(a[i].list, a[i].n_list, depth + 1);
            break;
        default:
            abort();
        }
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 1) return 0;
    uint32_t seed = data[0] * 2654435761u + 1;
    const char *in = (const char *)data + 1;
    size_t len = size - 1, pos = 0;
    struct imap_parser_limits lim = {256, 64, 8, 64};
    struct imap_parser *p = imap_parser_create(&lim);
    int stalls = 0, want_line = 0;
    while (pos < len) {
        seed = seed * 1103515245u + 12345u;
        size_t chunk = 1 + (seed >> 16) % 40;
        if (chunk > len - pos) chunk = len - pos;
        size_t used = (size_t)-1;
        if (want_line) {
            const char *line;
            size_t ll;
            int r = imap_parser_read_line(p, in + pos, chunk, &used, &line, &ll);
            CHECK(used <= chunk);
            CHECK(used > 0 || chunk == 0);
            pos += used;
            if (r != 0) want_line = 0;
            if (r == 1) CHECK(ll <= 256 && memchr(line, '\n', ll) == NULL);
            continue;
        }
        struct imap_command *cmd = NULL;
        const char *err = NULL;
        enum imap_parse_result r = imap_parser_feed(p, in + pos, chunk, &used, &cmd, &err);
        CHECK(used <= chunk);
        pos += used;
        stalls = used == 0 ? stalls + 1 : 0;
        CHECK(stalls < 4);
        switch (r) {
        case IMAP_PARSE_NEED_MORE:
            CHECK(used == chunk);
            break;
        case IMAP_PARSE_COMMAND:
            CHECK(cmd != NULL && cmd->tag != NULL && cmd->name != NULL);
            walk(cmd->args, cmd->n_args, 0);
            if (strcmp(cmd->name, "AUTHENTICATE") == 0) want_line = 1;
            if (cmd->n_args > 0 && cmd->args[cmd->n_args - 1].type == IMAP_ARG_LITERAL) {
                size_t ll;
                char *lit = imap_parser_take_literal(p, &cmd->args[cmd->n_args - 1], &ll);
                CHECK(lit != NULL && lit[ll] == '\0');
                free(lit);
            }
            break;
        case IMAP_PARSE_ERROR:
            CHECK(err != NULL && cmd != NULL);
            break;
        case IMAP_PARSE_EMPTY_LINE:
            break;
        case IMAP_PARSE_LITERAL: {
            const struct imap_literal_info *li = imap_parser_literal(p);
            CHECK(li != NULL);
            CHECK(li->arg_index <= li->n_args);
            CHECK(li->n_args == 0 || li->args != NULL);
            walk(li->args, li->n_args, 0);
            if (li->size <= 64 || (seed & 0x100))
                imap_parser_literal_accept(p, 64);
            else
                imap_parser_literal_reject(p);
            break;
        }
        default:
            abort();
        }
        /* between commands the session gives the parser's memory back; it
         * must be harmless at any point (a no-op mid-command) */
        if ((seed & 0x3000) == 0x3000 && r != IMAP_PARSE_LITERAL) imap_parser_compact(p);
    }
    imap_parser_destroy(&p);
    CHECK(p == NULL);
    return 0;
}
