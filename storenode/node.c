/* node: small helpers shared by the sessions of one coffer-store. */
#include "node.h"

#include <stdio.h>
#include <string.h>

const char *node_not_leader_text(const struct node *n, char *buf, size_t len)
{
    const char *hint = n->leader_hint;

    /* Right after this node lost leadership the hint may still name this
     * node (it is refreshed on the next housekeeping tick): never send a
     * client back here. */
    if (hint[0] != '\0' && n->cfg != NULL &&
        ((n->cfg->imap_listen != NULL && strcmp(hint, n->cfg->imap_listen) == 0) ||
         (n->cfg->imaps_listen != NULL && strcmp(hint, n->cfg->imaps_listen) == 0)))
        hint = "";
    if (hint[0] != '\0')
        snprintf(buf, len, "[UNAVAILABLE] not leader; leader is %s", hint);
    else
        snprintf(buf, len, "[UNAVAILABLE] not leader");
    return buf;
}
