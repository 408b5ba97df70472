/* cf_config: a small INI reader over inih. Keys are "section.key". The file
 * is read whole at start; lookups return defaults for absent keys. Parsers
 * for sizes ("64k", "50M", "1G"), durations ("30s", "5m", "100ms") and
 * booleans ("yes/no/true/false/1/0") report errors with the key name. */
#ifndef CF_CONFIG_H
#define CF_CONFIG_H

#include <stddef.h>
#include <stdint.h>

struct cf_config;

/* Load an INI file. Returns NULL and fills err (size errlen) on failure
 * (missing file, syntax error with line number). Owned by caller. */
struct cf_config *cf_config_load(const char *path, char *err, size_t errlen);
/* An empty config (every lookup yields its default). */
struct cf_config *cf_config_empty(void);
void cf_config_free(struct cf_config **cfg);

/* Raw value of "section.key" or NULL. Pointer valid until cf_config_free. */
const char *cf_config_get(const struct cf_config *cfg, const char *section, const char *key);

/* Typed lookups: return 0 and store the value (or the default when absent);
 * return -1 with a message in err when present but malformed. */
int cf_config_str(const struct cf_config *cfg, const char *section, const char *key,
                  const char *def, const char **val_r);
int cf_config_u64(const struct cf_config *cfg, const char *section, const char *key,
                  uint64_t def, uint64_t *val_r, char *err, size_t errlen);
int cf_config_size(const struct cf_config *cfg, const char *section, const char *key,
                   uint64_t def, uint64_t *val_r, char *err, size_t errlen);
int cf_config_ms(const struct cf_config *cfg, const char *section, const char *key,
                 uint64_t def_ms, uint64_t *val_r, char *err, size_t errlen);
int cf_config_bool(const struct cf_config *cfg, const char *section, const char *key, int def,
                   int *val_r, char *err, size_t errlen);

/* Every "section.key" present in the file, for rejecting unknown keys:
 * calls cb for each; stops and returns cb's non-zero value. */
int cf_config_foreach(const struct cf_config *cfg,
                      int (*cb)(const char *section, const char *key, const char *value, void *arg),
                      void *arg);

/* Parse helpers usable on their own. Return 0 on success, -1 on error. */
int cf_parse_size(const char *s, uint64_t *val_r);
int cf_parse_ms(const char *s, uint64_t *val_r);
int cf_parse_bool(const char *s, int *val_r);

#endif
