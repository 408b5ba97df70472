/* bench_proc: process-tree CPU and memory from /proc (see bench_proc.h). */
#include "bench_proc.h"

#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <unistd.h>

struct bp_proc {
    int pid;
    int ppid;
    double cpu_s;
};

/* Parse /proc/PID/stat: ppid and utime+stime+cutime+cstime. 0 or -1. */
static int read_stat(int pid, int *ppid_r, double *cpu_r)
{
    char path[64], buf[1024];
    FILE *f;
    size_t n;
    char *p;
    unsigned long long ut = 0, st = 0;
    long long cut = 0, cst = 0;
    int ppid = 0;
    static long hz;

    if (hz <= 0) hz = sysconf(_SC_CLK_TCK);
    if (hz <= 0) hz = 100;
    snprintf(path, sizeof(path), "/proc/%d/stat", pid);
    f = fopen(path, "r");
    if (f == NULL) return -1;
    n = fread(buf, 1, sizeof(buf) - 1, f);
    fclose(f);
    buf[n] = '\0';
    /* comm may hold spaces and parentheses: fields start after the last ')' */
    p = strrchr(buf, ')');
    if (p == NULL) return -1;
    /* state ppid pgrp session tty_nr tpgid flags minflt cminflt majflt cmajflt
     * utime stime cutime cstime */
    if (sscanf(p + 1, " %*c %d %*d %*d %*d %*d %*u %*u %*u %*u %*u %llu %llu %lld %lld", &ppid, &ut,
               &st, &cut, &cst) != 5)
        return -1;
    *ppid_r = ppid;
    *cpu_r = (double)(ut + st + (unsigned long long)(cut > 0 ? cut : 0) +
                      (unsigned long long)(cst > 0 ? cst : 0)) /
             (double)hz;
    return 0;
}

static void read_mem(int pid, uint64_t *rss, uint64_t *pss)
{
    char path[64], line[256];
    FILE *f;
    unsigned long long v;

    snprintf(path, sizeof(path), "/proc/%d/smaps_rollup", pid);
    f = fopen(path, "r");
    if (f == NULL) return;
    while (fgets(line, sizeof(line), f) != NULL) {
        if (sscanf(line, "Rss: %llu kB", &v) == 1)
            *rss += (uint64_t)v * 1024;
        else if (sscanf(line, "Pss: %llu kB", &v) == 1)
            *pss += (uint64_t)v * 1024;
    }
    fclose(f);
}

int bp_sample_tree(int root, int with_mem, struct bp_sample *out)
{
    struct bp_proc *procs = NULL;
    size_t nprocs = 0, i;
    int *queue = NULL;
    int *index = NULL, maxpid;
    unsigned char *in_tree = NULL;
    DIR *d = NULL;
    struct dirent *de;
    int rc = -1;

    memset(out, 0, sizeof(*out));
    procs = calloc(BP_MAX_PROCS, sizeof(*procs));
    queue = calloc(BP_MAX_PROCS, sizeof(*queue));
    in_tree = calloc(BP_MAX_PROCS, 1);
    if (procs == NULL || queue == NULL || in_tree == NULL) goto out;
    d = opendir("/proc");
    if (d == NULL) goto out;
    while ((de = readdir(d)) != NULL && nprocs < BP_MAX_PROCS) {
        char *end;
        long pid = strtol(de->d_name, &end, 10);
        if (*end != '\0' || pid <= 0 || pid > 0x7fffffff) continue;
        if (read_stat((int)pid, &procs[nprocs].ppid, &procs[nprocs].cpu_s) < 0) continue;
        procs[nprocs].pid = (int)pid;
        nprocs++;
    }
    /* pid -> index map, then walk up each parent chain with memo
     * (state 0 unknown, 1 in the tree, 2 not), O(n * depth) at worst */
    maxpid = 0;
    for (i = 0; i < nprocs; i++)
        if (procs[i].pid > maxpid) maxpid = procs[i].pid;
    index = malloc(((size_t)maxpid + 1) * sizeof(*index));
    if (index == NULL) goto out;
    for (i = 0; i <= (size_t)maxpid; i++)
        index[i] = -1;
    for (i = 0; i < nprocs; i++)
        index[procs[i].pid] = (int)i;
    if (root <= 0 || root > maxpid || index[root] < 0) goto out;
    in_tree[index[root]] = 1;
    for (i = 0; i < nprocs; i++) {
        size_t depth = 0, j;
        int cur = (int)i, verdict;
        /* climb until a decided ancestor, pid 0/1 or an unknown parent */
        while (in_tree[cur] == 0 && depth < BP_MAX_PROCS) {
            int pp = procs[cur].ppid;
            queue[depth++] = cur;
            if (pp <= 0 || pp > maxpid || index[pp] < 0) break;
            cur = index[pp];
        }
        verdict = in_tree[cur] == 1 ? 1 : 2;
        for (j = 0; j < depth; j++)
            if (in_tree[queue[j]] == 0) in_tree[queue[j]] = (unsigned char)verdict;
    }
    for (i = 0; i < nprocs; i++) {
        if (in_tree[i] != 1) continue;
        out->cpu_s += procs[i].cpu_s;
        out->nprocs++;
        if (with_mem) read_mem(procs[i].pid, &out->rss_bytes, &out->pss_bytes);
    }
    out->ok = 1;
    rc = 0;
out:
    if (d != NULL) closedir(d);
    free(procs);
    free(queue);
    free(in_tree);
    free(index);
    return rc;
}

double bp_self_cpu(void)
{
    struct rusage ru;

    if (getrusage(RUSAGE_SELF, &ru) != 0) return 0;
    return (double)ru.ru_utime.tv_sec + (double)ru.ru_utime.tv_usec / 1e6 +
           (double)ru.ru_stime.tv_sec + (double)ru.ru_stime.tv_usec / 1e6;
}
