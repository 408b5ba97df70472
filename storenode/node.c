/* node: small helpers shared by the sessions of one coffer-store. */
#include "node.h"

#include <stdio.h>

const char *node_not_leader_text(const struct node *n, char *buf, size_t len)
{
    if (n->leader_hint[0] != '\0')
        snprintf(buf, len, "[UNAVAILABLE] not leader; leader is %s", n->leader_hint);
    else
        snprintf(buf, len, "[UNAVAILABLE] not leader");
    return buf;
}
