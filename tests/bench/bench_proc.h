/* bench_proc: what the server processes cost, read from /proc.
 *
 * A "tree" is a root pid and all its live descendants (found by scanning
 * /proc/<pid>/stat for parent pids). CPU of a tree = utime+stime of every
 * live member plus cutime+cstime (children already reaped by a member), in
 * seconds. Memory = sum of Rss and Pss from /proc/<pid>/smaps_rollup (needs
 * root or the same uid). Every function is bounded: at most BP_MAX_PROCS
 * processes are looked at per scan. */
#ifndef BENCH_PROC_H
#define BENCH_PROC_H

#include <stdint.h>

#define BP_MAX_PROCS 65536

struct bp_sample {
    double cpu_s;       /* utime+stime+cutime+cstime of the tree */
    uint64_t rss_bytes; /* sum of Rss */
    uint64_t pss_bytes; /* sum of Pss */
    unsigned nprocs;    /* live processes in the tree */
    int ok;             /* 1 when the root exists */
};

/* Sample one tree. with_mem=0 skips smaps_rollup (it is slow with thousands of
 * processes). Returns 0, or -1 when the root pid does not exist. */
int bp_sample_tree(int root, int with_mem, struct bp_sample *out);

/* utime+stime of this process (getrusage), in seconds. */
double bp_self_cpu(void);

#endif
