/*
 * nfs_randread: random 8 KiB reads of one file, one at a time, through
 * libnfs's synchronous API (an nfs:// URL) or pread(2) (a local path), so
 * the NFS export and the FUSE mount are measured by the same loop.
 *
 *   nfs_randread TARGET COUNT SEED REFERENCE
 *
 * TARGET     nfs://HOST/DIR/FILE?version=3&nfsport=P&mountport=P, or a path
 * COUNT      reads to make; capped at the number of 8 KiB blocks in the file
 * SEED       seed of the read order (the same seed gives the same offsets
 *            on every target)
 * REFERENCE  a local copy of the file; a sample of the reads is compared
 *            with it after the timed loop, so errors are not measured as speed
 *
 * Every block is read at most once (a seeded shuffle, like fio's random
 * map), so no read is served by a cache the previous reads filled. Prints
 * one JSON object on stdout; exits 1 on any failed, short or wrong read.
 *
 * Built by bench/nfs.sh: gcc -O2 -o nfs_randread nfs_randread.c -lnfs
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <nfsc/libnfs.h>

#define BLOCK 8192
/* reads kept and compared with REFERENCE: enough to catch a wrong offset
 * or stale data, few enough to hold in memory */
#define SAMPLES 32

struct target {
    int fd;                     /* local path, or -1 */
    struct nfs_context *nfs;    /* nfs:// URL, or NULL */
    struct nfs_url *url;
    struct nfsfh *fh;
    uint64_t size;
};

static void die(const char *what, const char *detail)
{
    fprintf(stderr, "nfs_randread: %s: %s\n", what, detail);
    exit(1);
}

static int open_target(struct target *t, const char *name)
{
    memset(t, 0, sizeof *t);
    t->fd = -1;
    if (strncmp(name, "nfs://", 6) != 0) {
        struct stat st;
        t->fd = open(name, O_RDONLY);
        if (t->fd < 0 || fstat(t->fd, &st) != 0)
            die(name, strerror(errno));
        t->size = (uint64_t)st.st_size;
        /* no readahead around each block: libnfs's sync reads fetch only
         * what is asked, and fio sets the same hint by default */
        posix_fadvise(t->fd, 0, 0, POSIX_FADV_RANDOM);
        return 0;
    }
    t->nfs = nfs_init_context();
    if (!t->nfs)
        die(name, "nfs_init_context failed");
    /* the URL's version, nfsport and mountport go into the context here */
    t->url = nfs_parse_url_full(t->nfs, name);
    if (!t->url)
        die(name, nfs_get_error(t->nfs));
    if (nfs_mount(t->nfs, t->url->server, t->url->path) != 0)
        die("nfs_mount", nfs_get_error(t->nfs));
    if (nfs_open(t->nfs, t->url->file, O_RDONLY, &t->fh) != 0)
        die("nfs_open", nfs_get_error(t->nfs));
    struct nfs_stat_64 st;
    if (nfs_fstat64(t->nfs, t->fh, &st) != 0)
        die("nfs_fstat64", nfs_get_error(t->nfs));
    t->size = st.nfs_size;
    return 0;
}

static long read_block(struct target *t, uint64_t off, void *buf)
{
    if (t->nfs)
        return nfs_pread(t->nfs, t->fh, off, BLOCK, buf);
    ssize_t n = pread(t->fd, buf, BLOCK, (off_t)off);
    return n < 0 ? -errno : (long)n;
}

static void close_target(struct target *t)
{
    if (t->nfs) {
        nfs_close(t->nfs, t->fh);
        nfs_umount(t->nfs);
        nfs_destroy_url(t->url);
        nfs_destroy_context(t->nfs);
    } else {
        close(t->fd);
    }
}

/* splitmix64: small, seedable, the same sequence everywhere */
static uint64_t next_random(uint64_t *state)
{
    uint64_t z = (*state += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

static double now_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e6 + ts.tv_nsec / 1e3;
}

static int by_value(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

int main(int argc, char **argv)
{
    if (argc != 5) {
        fprintf(stderr, "usage: nfs_randread TARGET COUNT SEED REFERENCE\n");
        return 2;
    }
    uint64_t count = strtoull(argv[2], NULL, 10);
    uint64_t seed = strtoull(argv[3], NULL, 10);
    struct target t;
    open_target(&t, argv[1]);

    /* whole blocks only, so every read must return BLOCK bytes */
    uint64_t blocks = t.size / BLOCK;
    if (blocks == 0)
        die(argv[1], "smaller than one block");
    if (count > blocks)
        count = blocks;
    if (count == 0)
        die("COUNT", "must be at least 1");

    /* a partial Fisher-Yates shuffle: the first COUNT entries are a
     * random sample of distinct blocks */
    uint32_t *order = malloc(blocks * sizeof *order);
    double *lat = malloc(count * sizeof *lat);
    unsigned char *kept = malloc((size_t)SAMPLES * BLOCK);
    uint64_t kept_off[SAMPLES];
    int nkept = 0;
    unsigned char buf[BLOCK];
    if (!order || !lat || !kept)
        die("malloc", strerror(ENOMEM));
    for (uint64_t i = 0; i < blocks; i++)
        order[i] = (uint32_t)i;
    uint64_t rng = seed;
    for (uint64_t i = 0; i < count; i++) {
        uint64_t j = i + next_random(&rng) % (blocks - i);
        uint32_t tmp = order[i];
        order[i] = order[j];
        order[j] = tmp;
    }
    uint64_t stride = count > SAMPLES ? count / SAMPLES : 1;

    double start = now_us();
    for (uint64_t i = 0; i < count; i++) {
        uint64_t off = (uint64_t)order[i] * BLOCK;
        double t0 = now_us();
        long n = read_block(&t, off, buf);
        lat[i] = now_us() - t0;
        if (n != BLOCK) {
            char msg[96];
            snprintf(msg, sizeof msg, "offset %" PRIu64 ": %s", off,
                     n < 0 ? strerror((int)-n) : "short read");
            die("read", msg);
        }
        if (i % stride == 0 && nkept < SAMPLES) {
            memcpy(kept + (size_t)nkept * BLOCK, buf, BLOCK);
            kept_off[nkept++] = off;
        }
    }
    double elapsed = now_us() - start;
    close_target(&t);

    int ref = open(argv[4], O_RDONLY);
    if (ref < 0)
        die(argv[4], strerror(errno));
    for (int k = 0; k < nkept; k++) {
        if (pread(ref, buf, BLOCK, (off_t)kept_off[k]) != BLOCK)
            die(argv[4], "short read");
        if (memcmp(buf, kept + (size_t)k * BLOCK, BLOCK) != 0) {
            char msg[64];
            snprintf(msg, sizeof msg, "offset %" PRIu64, kept_off[k]);
            die("content differs from the reference", msg);
        }
    }
    close(ref);

    double sum = 0;
    for (uint64_t i = 0; i < count; i++)
        sum += lat[i];
    qsort(lat, count, sizeof *lat, by_value);
    printf("{\"reads\": %" PRIu64 ", \"seconds\": %.6f, \"reads_per_s\": %.1f, "
           "\"mean_us\": %.1f, \"p99_us\": %.1f, \"verified\": %d}\n",
           count, elapsed / 1e6, count / (elapsed / 1e6), sum / count,
           lat[(count - 1) * 99 / 100], nkept);
    free(order);
    free(lat);
    free(kept);
    return 0;
}
