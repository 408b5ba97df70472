/* propose: frame an entry, register the caller's outcome with the FSM and
 * hand the entry to replication. */
#include "propose.h"

#include <openssl/rand.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "cf_log.h"
#include "rep.h"

struct propose_req {
    struct store *st;
    uint8_t id[16];
    struct store_outcome *out; /* caller's, or &own */
    struct store_outcome own;  /* used when the caller passed out == NULL */
    propose_cb cb;
    void *arg;
};

static void frame_header(uint8_t *p)
{
    uint32_t m = COFFER_ENTRY_MAGIC;
    for (int i = 0; i < 4; i++)
        p[i] = (uint8_t)(m >> (8 * i));
    p[4] = (uint8_t)(COFFER_ENTRY_VERSION & 0xff);
    p[5] = (uint8_t)(COFFER_ENTRY_VERSION >> 8);
    p[6] = 0;
    p[7] = 0;
}

int propose_frame(const Coffer__Entry *e, void **buf_r, size_t *len_r)
{
    size_t n = coffer__entry__get_packed_size(e);
    uint8_t *b = malloc(8 + n);
    *buf_r = NULL;
    *len_r = 0;
    if (!b) return -1;
    frame_header(b);
    if (coffer__entry__pack(e, b + 8) != n) {
        free(b);
        return -1;
    }
    *buf_r = b;
    *len_r = 8 + n;
    return 0;
}

static void propose_done(void *arg, int status)
{
    struct propose_req *req = arg;
    store_unregister_waiter(req->st, req->id, req->out);
    if (req->cb) req->cb(req->arg, status, req->out);
    if (req->out == &req->own) store_outcome_clear(&req->own);
    free(req);
}

int propose_entry(struct node *n, Coffer__Entry *e, struct store_outcome *out, propose_cb cb,
                  void *arg)
{
    struct propose_req *req;
    int generated = 0;

    if (!n->rep || n->stopping) return REP_ESHUTDOWN;
    req = calloc(1, sizeof(*req));
    if (!req) return REP_ENOMEM;
    req->st = n->store;
    req->out = out ? out : &req->own;
    req->cb = cb;
    req->arg = arg;
    memset(req->out, 0, sizeof(*req->out));

    if (e->leader_time_ms == 0) {
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        e->leader_time_ms = (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
    }
    if (e->has_request_id && e->request_id.len == 16) {
        memcpy(req->id, e->request_id.data, 16);
    } else {
        if (RAND_bytes(req->id, 16) != 1) {
            cf_error("propose: RAND_bytes failed");
            free(req);
            return REP_EIO;
        }
        generated = 1;
    }
    memcpy(req->out->request_id, req->id, 16);
    /* e->request_id points at the caller's outcome (lives until cb), so a
     * retry after REP_ELEADERSHIPLOST can reuse the same key. */
    ProtobufCBinaryData saved = e->request_id;
    protobuf_c_boolean saved_has = e->has_request_id;
    e->has_request_id = 1;
    e->request_id.len = 16;
    e->request_id.data = req->out->request_id;

    size_t len = 8 + coffer__entry__get_packed_size(e);
    uint8_t *buf = rep_buf_alloc(len);
    if (!buf) {
        if (generated && !out) {
            e->request_id = saved;
            e->has_request_id = saved_has;
        }
        free(req);
        return REP_ENOMEM;
    }
    frame_header(buf);
    coffer__entry__pack(e, buf + 8);
    if (!out || !generated) {
        /* no caller-owned place to point at (or the caller's own id) */
        e->request_id = saved;
        e->has_request_id = saved_has;
    }

    store_register_waiter(n->store, req->id, req->out);
    int rc = rep_propose(n->rep, buf, len, propose_done, req);
    if (rc != 0) {
        store_unregister_waiter(n->store, req->id, req->out);
        free(req);
        return rc;
    }
    return 0;
}

int propose_pack_prepared(struct node *n, Coffer__Entry *e, uint8_t id_r[16],
                          struct rep_prepared **p_r)
{
    struct timespec ts;
    size_t len;
    uint8_t *buf;

    *p_r = NULL;
    if (e->leader_time_ms == 0) {
        clock_gettime(CLOCK_REALTIME, &ts);
        e->leader_time_ms = (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
    }
    if (e->has_request_id && e->request_id.len == 16) {
        memcpy(id_r, e->request_id.data, 16);
    } else if (RAND_bytes(id_r, 16) != 1) {
        return REP_EIO;
    }
    e->has_request_id = 1;
    e->request_id.len = 16;
    e->request_id.data = id_r;
    len = 8 + coffer__entry__get_packed_size(e);
    buf = rep_buf_alloc(len);
    if (!buf) return REP_ENOMEM;
    frame_header(buf);
    coffer__entry__pack(e, buf + 8);
    *p_r = rep_prepare(n->rep, buf, len);
    return *p_r ? 0 : REP_ENOMEM;
}

int propose_prepared(struct node *n, const uint8_t id[16], struct rep_prepared *p,
                     struct store_outcome *out, propose_cb cb, void *arg)
{
    struct propose_req *req;
    int rc;

    if (!n->rep || n->stopping) {
        rep_prepared_free(p);
        return REP_ESHUTDOWN;
    }
    req = calloc(1, sizeof(*req));
    if (!req) {
        rep_prepared_free(p);
        return REP_ENOMEM;
    }
    req->st = n->store;
    req->out = out ? out : &req->own;
    req->cb = cb;
    req->arg = arg;
    memset(req->out, 0, sizeof(*req->out));
    memcpy(req->id, id, 16);
    memcpy(req->out->request_id, id, 16);
    store_register_waiter(n->store, req->id, req->out);
    rc = rep_propose_prepared(n->rep, p, propose_done, req);
    if (rc != 0) {
        store_unregister_waiter(n->store, req->id, req->out);
        free(req);
    }
    return rc;
}
