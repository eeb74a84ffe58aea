/* SPDX-License-Identifier: MIT */
/* tc_match: which of many cron schedules fire at one second.
 *
 * A table holds schedules in numbered slots. For every value of every field it
 * keeps a bitset over the slots, so deciding a second is a few ANDs of rows of
 * capacity/64 words, and the minute-level part (everything but the seconds) is
 * cached across the seconds of one minute. Nothing is allocated on the match
 * path; the slots that fire are written to a buffer owned by the table.
 */
#ifndef TC_MATCH_H
#define TC_MATCH_H

#include <stddef.h>
#include <stdint.h>

/* CDEF-BEGIN: from here to the end marker, this is also the cffi declaration */
#define TC_OK 0            /* success */
#define TC_ERR_NOMEM 1     /* out of memory; the table is unchanged */
#define TC_ERR_SPEC 2      /* a spec has a bit outside its field's range */
#define TC_ERR_SLOT 3      /* the slot is not in use */
#define TC_ERR_TIME 4      /* a tick field is out of range */
#define TC_ERR_FULL 5      /* the table cannot hold more slots */

typedef struct tc_spec {
    uint64_t sec;          /* bit s: second s (0-59) */
    uint64_t min;          /* bit m: minute m (0-59) */
    uint32_t hour;         /* bit h: hour h (0-23) */
    uint32_t dom;          /* bit d: day of month d (1-31); bit 0: L, the last day */
    uint32_t mon;          /* bit m: month m (1-12) */
    uint32_t dow;          /* bit w: weekday w (0-6, 0 = Sunday) */
    uint32_t dow_last;     /* bit w: the last weekday w of the month ("5L") */
    uint64_t dow_nth;      /* bit 7*(k-1)+w: the k-th weekday w of the month ("5#2"), k 1-5 */
    int32_t day_or;        /* nonzero: the day matches if dom OR dow matches (neither field
                              starts with '*'); zero: both must match (Debian cron) */
    int64_t every;         /* > 0: "@every": fires when epoch % every == 0; the masks above
                              are then ignored. 0: a cron schedule. All zero: never fires. */
} tc_spec;

typedef struct tc_tick {
    int32_t year;          /* 1-9999 */
    int32_t month;         /* 1-12 */
    int32_t day;           /* 1 to the length of the month */
    int32_t hour;          /* 0-23 */
    int32_t minute;        /* 0-59 */
    int32_t second;        /* 0-59 */
    int64_t epoch;         /* the epoch second of this wall time, for "@every" */
} tc_tick;

typedef struct tc_table tc_table;

/* Return the version of the match core's ABI, bumped when the layout changes. */
int tc_abi_version(void);

/* Return a static, human-readable message for a status code (never NULL). */
const char *tc_strerror(int status);

/* Create an empty table with room for at least `capacity` slots (it grows by
 * doubling as needed). Returns the table, or NULL when out of memory. */
tc_table *tc_table_new(size_t capacity);

/* Free a table and everything it owns. NULL is accepted and ignored. */
void tc_table_free(tc_table *table);

/* Store `spec` in a free slot (the most recently freed one first) and write its number
 * to *slot. Returns TC_OK, TC_ERR_SPEC (nothing stored), TC_ERR_NOMEM or
 * TC_ERR_FULL (the table is unchanged). */
int tc_table_add(tc_table *table, const tc_spec *spec, uint32_t *slot);

/* Replace the spec in a used slot, touching only that slot's bits. Returns
 * TC_OK, TC_ERR_SLOT, TC_ERR_SPEC or TC_ERR_NOMEM (the old spec stays). */
int tc_table_replace(tc_table *table, uint32_t slot, const tc_spec *spec);

/* Clear a used slot and put it on the free list. Returns TC_OK or TC_ERR_SLOT. */
int tc_table_remove(tc_table *table, uint32_t slot);

/* Return the number of used slots. */
size_t tc_table_count(const tc_table *table);

/* Return the number of slots the table has room for without growing. */
size_t tc_table_capacity(const tc_table *table);

/* Decide one second: write the numbers of the slots that fire at `tick`, in
 * ascending order, to a buffer owned by the table (valid until the next call
 * that changes or matches the table), and set *slots and *count. Returns TC_OK
 * or TC_ERR_TIME (a tick field out of range; *count is then 0). */
int tc_table_match(tc_table *table, const tc_tick *tick, const uint32_t **slots, size_t *count);

/* Return 1 if `spec` fires at `tick`, 0 if not, -1 if the tick is out of range:
 * the same rule as the table, for one schedule. */
int tc_spec_matches(const tc_spec *spec, const tc_tick *tick);

/* Find the first second at or after `from` at which some slot fires, looking `limit` seconds
 * ahead at most: write its distance from `from` in seconds to *ahead, or `limit` when none
 * fires sooner. Wall time runs on as a plain calendar from `from` (a caller whose zone changes
 * its UTC offset stops the search there) and "@every" slots count from from->epoch. Months,
 * days, hours and minutes where no slot can fire are passed over whole, so an idle table is
 * searched in a few rows; the minute-level row is cached as by tc_table_match. Returns TC_OK
 * or TC_ERR_TIME (`from` out of range; *ahead is then `limit`). */
int tc_table_next(tc_table *table, const tc_tick *from, int64_t limit, int64_t *ahead);
/* CDEF-END */

#endif
