/* libFuzzer target for storenode/mime.c and mime_search.c: build the cache
 * of arbitrary bytes, round-trip the part tree, resolve part numbers, take
 * header fields, parse dates and run the SEARCH matchers. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "mime.h"

#define CHECK(x)                                                                                   \
    do {                                                                                           \
        if (!(x)) abort();                                                                         \
    } while (0)

static void exercise(const char *msg, size_t len, const uint8_t *data, size_t size)
{
    struct mime_cache c;
    CHECK(mime_build_cache(msg, len, &c) == 0);
    CHECK(c.envelope.len > 0 && c.bodystructure.len > 0 && c.body.len > 0);
    struct mime_tree t, t2;
    CHECK(mime_tree_deserialize(c.parts.data, c.parts.len, len, &t) == 0);
    CHECK(mime_tree_parse(msg, len, &t2) == 0);
    CHECK(t.n_parts == t2.n_parts && t.n_parts <= MIME_MAX_PARTS);
    CHECK(memcmp(t.parts, t2.parts, t.n_parts * sizeof(t.parts[0])) == 0);
    struct mbuf s = {0};
    mime_tree_serialize(&t, &s);
    CHECK(s.len == c.parts.len && memcmp(s.data, c.parts.data, s.len) == 0);
    mbuf_free(&s);
    /* corrupt deserialisation must not crash */
    if (c.parts.len > 3 && size > 2) {
        c.parts.data[data[1] % c.parts.len] ^= (char)data[2];
        struct mime_tree t3;
        if (mime_tree_deserialize(c.parts.data, c.parts.len, len, &t3) == 0) {
            for (uint32_t i = 0; i < t3.n_parts; i++)
                CHECK(t3.parts[i].body_end <= len);
            uint32_t nums[3] = {1, 2, 1};
            uint32_t idx;
            for (size_t n = 0; n <= 3; n++)
                if (mime_find_part(&t3, nums, n, &idx) == 0) CHECK(idx < t3.n_parts);
            mime_tree_free(&t3);
        }
    }
    for (uint32_t i = 0; i < t.n_parts; i++) {
        const struct mime_part *p = &t.parts[i];
        CHECK(p->hdr_start <= p->hdr_end && p->hdr_end <= p->body_start);
        CHECK(p->body_start <= p->body_end && p->body_end <= len);
        uint64_t a, b, cc, d;
        if (mime_message_ranges(&t, i, &a, &b, &cc, &d) == 0) CHECK(a <= b && cc <= d && d <= len);
        struct mbuf out = {0};
        mime_render_body(msg, &t, i, 1, &out);
        mbuf_free(&out);
    }
    for (size_t k = 0; k + 3 <= size && k < 12; k += 3) {
        uint32_t nums[3] = {data[k] % 5, data[k + 1] % 5, data[k + 2] % 5};
        uint32_t idx;
        for (size_t n = 0; n <= 3; n++)
            if (mime_find_part(&t, nums, n, &idx) == 0) CHECK(idx < t.n_parts);
    }
    const struct mime_part *r = &t.parts[0];
    struct mbuf out = {0};
    const char *names[] = {"subject", "from", "content-type"};
    mime_header_fields(msg, (size_t)r->hdr_end, names, 3, 0, &out);
    mime_header_fields(msg, (size_t)r->hdr_end, names, 2, 1, &out);
    mime_header_get(msg, (size_t)r->hdr_end, "subject", &out);
    mbuf_free(&out);
    char needle[8] = {0};
    if (size > 4) memcpy(needle, data + 1, size - 1 < 4 ? size - 1 : 4);
    needle[strnlen(needle, 7)] = '\0';
    (void)mime_search_text(msg, len, &t, needle);
    (void)mime_search_header(msg, len, &t, "subject", "a");
    (void)mime_search_body(msg, len, &t, "é");
    int64_t utc;
    int tz;
    (void)mime_parse_date(msg, len < 200 ? len : 200, &utc, &tz);
    mime_tree_free(&t);
    mime_tree_free(&t2);
    mime_cache_free(&c);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size > 1 << 20) return 0;
    /* the stored form is CRLF-normalised: test that, plus the raw bytes */
    size_t nl;
    char *norm = mime_crlf_normalize((const char *)data, size, &nl);
    CHECK(norm != NULL && nl >= size);
    exercise(norm, nl, data, size);
    free(norm);
    char *raw = malloc(size ? size : 1);
    CHECK(raw != NULL);
    if (size) memcpy(raw, data, size);
    exercise(raw, size, data, size);
    free(raw);
    return 0;
}
