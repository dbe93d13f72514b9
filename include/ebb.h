/* ebb.h: the public interface of libebb, the allocator that gives memory back.
 *
 * libebb replaces malloc/free/new/delete when preloaded (LD_PRELOAD=libebb.so)
 * or linked. These extra functions let a program, ebb's tools or the Python
 * bindings trim the heap on demand and read its statistics. All are safe to
 * call from any thread; none allocates.
 */
#ifndef EBB_H
#define EBB_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
#define EBB_NOEXCEPT noexcept
extern "C" {
#else
#define EBB_NOEXCEPT
#endif

#define EBB_STATS_VERSION 1

typedef struct ebb_stats_s {
  uint32_t version;             /* EBB_STATS_VERSION */
  uint32_t size;                /* sizeof(ebb_stats_t) as filled in */
  uint64_t allocs_total;        /* malloc-family calls served since start */
  uint64_t requested_total;     /* bytes asked for by those calls */
  uint64_t live_bytes;          /* bytes held by the program: small objects at their size
                                   class, large ones as requested */
  uint64_t thread_cached_bytes; /* free objects held in per-thread caches */
  uint64_t active_pages;        /* OS pages of small-object spans that may be resident */
  uint64_t resident_bytes;      /* estimate of the heap's resident memory: active pages,
                                   segment headers, large objects and cached large blocks */
  uint64_t mapped_bytes;        /* address space mapped by the heap */
  uint64_t purged_total;        /* bytes given back to the OS with madvise, ever */
  uint64_t unmapped_total;      /* bytes given back with munmap, ever */
  uint64_t purge_calls;         /* madvise calls made to give memory back */
  uint64_t large_live_bytes;    /* live objects above the small-object limit */
  uint64_t large_cached_bytes;  /* freed large blocks kept mapped for reuse */
  uint64_t segments;            /* 4 MiB small-object segments mapped */
  uint64_t page_size;           /* the purge granularity, bytes */
} ebb_stats_t;

typedef struct ebb_class_stats_s {
  uint32_t object_size;    /* bytes per object in this class */
  uint32_t span_bytes;     /* bytes per span */
  uint64_t spans;          /* spans of this class */
  uint64_t objects_out;    /* objects handed to threads (live or thread-cached) */
  uint64_t objects_free;   /* free objects in the class's spans, parked ones included */
  uint64_t resident_pages; /* pages of the class's spans that may be resident */
} ebb_class_stats_t;

/* The counters ebb_stats() has that need no walk of the heap: cheap enough to
 * read around every import (`ebb imports`). A snapshot taken while other
 * threads allocate may be off by their objects in flight. */
typedef struct ebb_counts_s {
  uint64_t live_bytes;      /* as in ebb_stats_t */
  uint64_t live_objects;    /* allocations not freed (thread-cached free objects not counted) */
  uint64_t allocs_total;    /* as in ebb_stats_t */
  uint64_t requested_total; /* as in ebb_stats_t */
} ebb_counts_t;

/* Returns every free page to the OS now (the caller's thread cache included),
 * without waiting for the purge delay. Returns the number of bytes released. */
size_t ebb_trim(void) EBB_NOEXCEPT;

/* Fills *out (whose size is `size`, normally sizeof(ebb_stats_t)). Returns 0,
 * or -1 when out is NULL or size too small for the version field. */
int ebb_stats(ebb_stats_t* out, size_t size) EBB_NOEXCEPT;

/* Fills *out (of `size` bytes, normally sizeof(ebb_counts_t)). Returns 0, or
 * -1 when out is NULL or size is 0. */
int ebb_counts(ebb_counts_t* out, size_t size) EBB_NOEXCEPT;

/* Number of size classes; classes are numbered 1..ebb_class_count(). */
unsigned ebb_class_count(void) EBB_NOEXCEPT;
/* Statistics of one size class. Returns 0, or -1 for a bad class or size. */
int ebb_class_stats(unsigned cls, ebb_class_stats_t* out, size_t size) EBB_NOEXCEPT;

/* Profiling (docs/profile.md): starts writing the capture <prefix>.<pid>.ebbprof,
 * sampling one byte in `rate` bytes allocated on average (0 or 1: every
 * allocation); children forked afterwards write their own. Returns 0, or an
 * errno: EBUSY when a capture is being written already, ECANCELED when the
 * interpreter is exiting, or why the file could not be made. */
int ebb_profile_start(const char* prefix, uint64_t rate) EBB_NOEXCEPT;
/* Or'ed into ebb_profile_start's rate: native (C/C++) stacks too. */
#define EBB_PROFILE_NATIVE (UINT64_C(1) << 63)
/* Stops profiling: the capture ends with what is live now. Returns 0, or
 * ENOENT when no capture is being written. */
int ebb_profile_stop(void) EBB_NOEXCEPT;

/* "ebb X.Y.Z" */
const char* ebb_version(void) EBB_NOEXCEPT;

#ifdef __cplusplus
}
#endif

#endif /* EBB_H */
