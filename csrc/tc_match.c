/* SPDX-License-Identifier: MIT */
#include "tc_match.h"

#include <stdlib.h>
#include <string.h>

/* Rows of the bitset block: one row (nwords words, one bit per slot) per field value. */
enum {
    R_SEC = 0,                  /* 60 rows: second 0-59 */
    R_MIN = R_SEC + 60,         /* 60 rows: minute 0-59 */
    R_HOUR = R_MIN + 60,        /* 24 rows: hour 0-23 */
    R_DOM = R_HOUR + 24,        /* 32 rows: day 1-31; row 0 = L (last day) */
    R_MON = R_DOM + 32,         /* 13 rows: month 1-12 (row 0 unused) */
    R_DOW = R_MON + 13,         /* 7 rows: weekday 0-6 */
    R_DOWLAST = R_DOW + 7,      /* 7 rows: last weekday w of the month */
    R_NTH = R_DOWLAST + 7,      /* 35 rows: 7*(k-1)+w, the k-th weekday w */
    R_DAYOR = R_NTH + 35,       /* 1 row: day rule is OR */
    R_SPEC_END = R_DAYOR + 1,   /* rows above hold slot bits; rows below are scratch */
    R_CACHE = R_SPEC_END,       /* 1 row: the minute-level match, cached for a minute */
    R_OUT = R_CACHE + 1,        /* 1 row: the slots firing at the last matched second */
    R_COUNT = R_OUT + 1
};

#define TC_MAX_SLOTS ((size_t)1 << 31)

typedef struct tc_group {
    int64_t every;              /* the interval in seconds */
    uint32_t *slots;            /* the slots with this interval */
    uint32_t len;               /* slots used */
    uint32_t cap;               /* slots allocated */
} tc_group;

struct tc_table {
    size_t nwords;              /* words per row; capacity = 64 * nwords */
    uint64_t *rows;             /* R_COUNT rows of nwords words */
    uint8_t *used;              /* per slot: 1 if in use */
    int32_t *group;             /* per slot: index into groups, or -1 */
    uint32_t *gpos;             /* per slot: position in its group's slots */
    uint32_t *freelist;         /* stack of freed slots */
    uint32_t *out;              /* match output: slot numbers */
    size_t nfree;               /* entries on the free list */
    size_t high;                /* slots ever handed out (free list aside) */
    size_t count;               /* slots in use */
    tc_group *groups;           /* distinct "@every" intervals */
    size_t ngroups;             /* groups in use */
    size_t groups_cap;          /* groups allocated */
    int64_t cache_key;          /* the minute R_CACHE holds, or -1 */
};

static const char *const messages[] = {
    "ok",
    "out of memory",
    "invalid schedule spec (a bit outside its field's range)",
    "slot not in use",
    "time field out of range",
    "table full",
};

int tc_abi_version(void) { return 2; }

const char *tc_strerror(int status)
{
    if (status < 0 || status >= (int)(sizeof messages / sizeof messages[0]))
        return "unknown status";
    return messages[status];
}

static uint64_t *row(const tc_table *t, int r) { return t->rows + (size_t)r * t->nwords; }

static size_t live_words(const tc_table *t) { return (t->high + 63) / 64; }

static int is_leap(int y) { return (y % 4 == 0 && y % 100 != 0) || y % 400 == 0; }

static int month_days(int y, int m)
{
    static const int days[] = {31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31};
    return days[m - 1] + (m == 2 && is_leap(y));
}

/* Weekday of a date, 0 = Sunday (Sakamoto's method). */
static int weekday(int y, int m, int d)
{
    static const int offs[] = {0, 3, 2, 5, 0, 3, 5, 1, 4, 6, 2, 4};
    if (m < 3)
        y -= 1;
    return (y + y / 4 - y / 100 + y / 400 + offs[m - 1] + d) % 7;
}

/* The one bounds check for a tick: 1 if every field is in range, else 0. */
static int tick_ok(const tc_tick *k)
{
    return k->year >= 1 && k->year <= 9999 && k->month >= 1 && k->month <= 12
        && k->day >= 1 && k->day <= month_days(k->year, k->month)
        && k->hour >= 0 && k->hour <= 23 && k->minute >= 0 && k->minute <= 59
        && k->second >= 0 && k->second <= 59;
}

/* The one bounds check for a spec: 1 if no bit lies outside its field, else 0. */
static int spec_ok(const tc_spec *s)
{
    return (s->sec >> 60) == 0 && (s->min >> 60) == 0 && (s->hour >> 24) == 0
        && (s->mon & ~(uint32_t)0x1FFE) == 0 && (s->dow >> 7) == 0
        && (s->dow_last >> 7) == 0 && (s->dow_nth >> 35) == 0 && s->every >= 0;
}

/* Set the slot's bit in rows first..first+n-1 where `mask` has bit i (row first+i). */
static void put_mask(tc_table *t, int first, int n, uint64_t mask, uint32_t slot)
{
    uint64_t bit = (uint64_t)1 << (slot & 63);
    for (int i = 0; i < n; i++)
        if (mask >> i & 1)
            row(t, first + i)[slot >> 6] |= bit;
}

static void put_cron(tc_table *t, uint32_t slot, const tc_spec *s)
{
    put_mask(t, R_SEC, 60, s->sec, slot);
    put_mask(t, R_MIN, 60, s->min, slot);
    put_mask(t, R_HOUR, 24, s->hour, slot);
    put_mask(t, R_DOM, 32, s->dom, slot);
    put_mask(t, R_MON, 13, s->mon, slot);
    put_mask(t, R_DOW, 7, s->dow, slot);
    put_mask(t, R_DOWLAST, 7, s->dow_last, slot);
    put_mask(t, R_NTH, 35, s->dow_nth, slot);
    put_mask(t, R_DAYOR, 1, s->day_or != 0, slot);
}

static void clear_cron(tc_table *t, uint32_t slot)
{
    uint64_t keep = ~((uint64_t)1 << (slot & 63));
    for (int r = 0; r < R_SPEC_END; r++)
        row(t, r)[slot >> 6] &= keep;
}

/* Find or create the group for `every` with room for one more slot; write its
 * index to *gi. Returns TC_OK or TC_ERR_NOMEM (nothing changed that matters). */
static int group_reserve(tc_table *t, int64_t every, size_t *gi)
{
    size_t i;
    for (i = 0; i < t->ngroups && t->groups[i].every != every; i++)
        ;
    if (i == t->ngroups) {
        if (t->ngroups == t->groups_cap) {
            size_t cap = t->groups_cap ? 2 * t->groups_cap : 8;
            tc_group *g = realloc(t->groups, cap * sizeof *g);
            if (!g)
                return TC_ERR_NOMEM;
            t->groups = g;
            t->groups_cap = cap;
        }
        memset(&t->groups[i], 0, sizeof t->groups[i]);
        t->groups[i].every = every;
        t->ngroups++;
    }
    tc_group *g = &t->groups[i];
    if (g->len == g->cap) {
        uint32_t cap = g->cap ? 2 * g->cap : 4;
        uint32_t *slots = realloc(g->slots, cap * sizeof *slots);
        if (!slots)
            return TC_ERR_NOMEM;
        g->slots = slots;
        g->cap = cap;
    }
    *gi = i;
    return TC_OK;
}

static void group_insert(tc_table *t, size_t gi, uint32_t slot)
{
    tc_group *g = &t->groups[gi];
    t->group[slot] = (int32_t)gi;
    t->gpos[slot] = g->len;
    g->slots[g->len++] = slot;
}

/* Take a slot out of its group (swap-remove); an emptied group stays until group_drop. */
static void group_leave(tc_table *t, uint32_t slot)
{
    int32_t gi = t->group[slot];
    if (gi < 0)
        return;
    tc_group *g = &t->groups[gi];
    uint32_t last = g->slots[--g->len];
    g->slots[t->gpos[slot]] = last;
    t->gpos[last] = t->gpos[slot];
    t->group[slot] = -1;
}

/* Free group gi if it is empty, moving the last group into its place. */
static void group_drop(tc_table *t, size_t gi)
{
    if (gi >= t->ngroups || t->groups[gi].len)
        return;
    free(t->groups[gi].slots);
    t->ngroups--;
    if (gi == t->ngroups)
        return;
    t->groups[gi] = t->groups[t->ngroups];
    for (uint32_t i = 0; i < t->groups[gi].len; i++)
        t->group[t->groups[gi].slots[i]] = (int32_t)gi;
}

/* Grow a per-slot array to `cap` elements; returns 0 on failure (array unchanged). */
static int grow_array(void **p, size_t cap, size_t size)
{
    void *q = realloc(*p, cap * size);
    if (!q)
        return 0;
    *p = q;
    return 1;
}

/* Reallocate everything for `nwords` words per row (never fewer than now).
 * Returns TC_OK or TC_ERR_NOMEM (the table keeps its old capacity). */
static int resize(tc_table *t, size_t nwords)
{
    size_t cap = nwords * 64;
    if (!grow_array((void **)&t->used, cap, 1) || !grow_array((void **)&t->group, cap, 4)
        || !grow_array((void **)&t->gpos, cap, 4) || !grow_array((void **)&t->freelist, cap, 4)
        || !grow_array((void **)&t->out, cap, 4))
        return TC_ERR_NOMEM;
    uint64_t *rows = calloc((size_t)R_COUNT * nwords, sizeof *rows);
    if (!rows)
        return TC_ERR_NOMEM;
    for (int r = 0; r < R_COUNT && t->rows; r++)
        memcpy(rows + (size_t)r * nwords, row(t, r), t->nwords * sizeof *rows);
    memset(t->used + t->nwords * 64, 0, cap - t->nwords * 64);
    free(t->rows);
    t->rows = rows;
    t->nwords = nwords;
    return TC_OK;
}

tc_table *tc_table_new(size_t capacity)
{
    tc_table *t = calloc(1, sizeof *t);
    if (!t)
        return NULL;
    size_t nwords = capacity > 64 ? (capacity + 63) / 64 : 1;
    t->cache_key = -1;
    if (resize(t, nwords) != TC_OK) {
        tc_table_free(t);
        return NULL;
    }
    return t;
}

void tc_table_free(tc_table *t)
{
    if (!t)
        return;
    for (size_t i = 0; i < t->ngroups; i++)
        free(t->groups[i].slots);
    free(t->groups);
    free(t->rows);
    free(t->used);
    free(t->group);
    free(t->gpos);
    free(t->freelist);
    free(t->out);
    free(t);
}

/* Pick a free slot, growing the table by doubling when none is left. */
static int take_slot(tc_table *t, uint32_t *slot)
{
    if (t->nfree) {
        *slot = t->freelist[--t->nfree];
        return TC_OK;
    }
    if (t->high == t->nwords * 64) {
        if (t->high >= TC_MAX_SLOTS)
            return TC_ERR_FULL;
        int status = resize(t, 2 * t->nwords);
        if (status != TC_OK)
            return status;
    }
    *slot = (uint32_t)t->high++;
    return TC_OK;
}

/* Write a validated spec into an empty slot (group already reserved when every > 0). */
static void store(tc_table *t, uint32_t slot, const tc_spec *spec, size_t gi)
{
    if (spec->every > 0)
        group_insert(t, gi, slot);
    else
        put_cron(t, slot, spec);
    t->cache_key = -1;
}

int tc_table_add(tc_table *t, const tc_spec *spec, uint32_t *slot)
{
    size_t gi = 0;
    if (!spec_ok(spec))
        return TC_ERR_SPEC;
    if (spec->every > 0 && group_reserve(t, spec->every, &gi) != TC_OK)
        return TC_ERR_NOMEM;
    int status = take_slot(t, slot);
    if (status != TC_OK) {
        if (spec->every > 0)
            group_drop(t, gi);
        return status;
    }
    t->used[*slot] = 1;
    t->group[*slot] = -1;
    t->count++;
    store(t, *slot, spec, gi);
    return TC_OK;
}

/* Take a used slot's bits and group membership away, leaving it empty but used. */
static size_t empty_slot(tc_table *t, uint32_t slot)
{
    int32_t old = t->group[slot];
    clear_cron(t, slot);
    group_leave(t, slot);
    t->cache_key = -1;
    return old < 0 ? (size_t)-1 : (size_t)old;
}

int tc_table_replace(tc_table *t, uint32_t slot, const tc_spec *spec)
{
    size_t gi = 0;
    if (slot >= t->high || !t->used[slot])
        return TC_ERR_SLOT;
    if (!spec_ok(spec))
        return TC_ERR_SPEC;
    if (spec->every > 0 && group_reserve(t, spec->every, &gi) != TC_OK)
        return TC_ERR_NOMEM;
    size_t old = empty_slot(t, slot);
    store(t, slot, spec, gi);
    group_drop(t, old);
    return TC_OK;
}

int tc_table_remove(tc_table *t, uint32_t slot)
{
    if (slot >= t->high || !t->used[slot])
        return TC_ERR_SLOT;
    group_drop(t, empty_slot(t, slot));
    t->used[slot] = 0;
    t->count--;
    t->freelist[t->nfree++] = slot;
    return TC_OK;
}

size_t tc_table_count(const tc_table *t) { return t->count; }

size_t tc_table_capacity(const tc_table *t) { return t->nwords * 64; }

/* The day-level rows of one date: a slot's day matches if its dom/dow rule holds (see build_cache). */
typedef struct day_rows {
    const uint64_t *dm, *dl, *dw, *dwl, *nth, *dor, *mo;
    uint64_t last, lastweek;
} day_rows;

static void day_rows_of(const tc_table *t, const tc_tick *k, day_rows *d)
{
    int mdays = month_days(k->year, k->month), wd = weekday(k->year, k->month, k->day);
    d->last = k->day == mdays ? ~(uint64_t)0 : 0;
    d->lastweek = k->day + 7 > mdays ? ~(uint64_t)0 : 0;
    d->mo = row(t, R_MON + k->month);
    d->dm = row(t, R_DOM + k->day);
    d->dl = row(t, R_DOM);
    d->dw = row(t, R_DOW + wd);
    d->dwl = row(t, R_DOWLAST + wd);
    d->nth = row(t, R_NTH + 7 * ((k->day - 1) / 7) + wd);
    d->dor = row(t, R_DAYOR);
}

/* Word w of the slots whose month and day match the date of `d`. */
static uint64_t day_word(const day_rows *d, size_t w)
{
    uint64_t dom = d->dm[w] | (d->dl[w] & d->last);
    uint64_t dow = d->dw[w] | (d->dwl[w] & d->lastweek) | d->nth[w];
    return d->mo[w] & ((dom & dow) | (d->dor[w] & (dom | dow)));
}

/* Fill R_CACHE with the slots whose minute, hour, day and month match `k`. */
static void build_cache(tc_table *t, const tc_tick *k)
{
    day_rows d;
    day_rows_of(t, k, &d);
    const uint64_t *mn = row(t, R_MIN + k->minute), *hr = row(t, R_HOUR + k->hour);
    uint64_t *cache = row(t, R_CACHE);
    for (size_t w = 0, n = live_words(t); w < n; w++)
        cache[w] = mn[w] & hr[w] & day_word(&d, w);
}

static int64_t minute_key(const tc_tick *k)
{
    return ((((int64_t)k->year * 13 + k->month) * 32 + k->day) * 24 + k->hour) * 60 + k->minute;
}

/* Write the slot numbers of the set bits of R_OUT to t->out; return how many. */
static size_t collect(tc_table *t)
{
    const uint64_t *out = row(t, R_OUT);
    size_t n = 0;
    for (size_t w = 0, words = live_words(t); w < words; w++) {
        for (uint64_t bits = out[w]; bits; bits &= bits - 1)
            t->out[n++] = (uint32_t)(w * 64 + (size_t)__builtin_ctzll(bits));
    }
    return n;
}

int tc_table_match(tc_table *t, const tc_tick *k, const uint32_t **slots, size_t *count)
{
    *slots = t->out;
    *count = 0;
    if (!tick_ok(k))
        return TC_ERR_TIME;
    int64_t key = minute_key(k);
    if (key != t->cache_key) {
        build_cache(t, k);
        t->cache_key = key;
    }
    const uint64_t *cache = row(t, R_CACHE), *sec = row(t, R_SEC + k->second);
    uint64_t *out = row(t, R_OUT);
    for (size_t w = 0, n = live_words(t); w < n; w++)
        out[w] = cache[w] & sec[w];
    for (size_t i = 0; i < t->ngroups; i++) {
        const tc_group *g = &t->groups[i];
        if (k->epoch % g->every != 0)
            continue;
        for (uint32_t j = 0; j < g->len; j++)
            out[g->slots[j] >> 6] |= (uint64_t)1 << (g->slots[j] & 63);
    }
    *count = collect(t);
    return TC_OK;
}

int tc_spec_matches(const tc_spec *s, const tc_tick *k)
{
    if (!tick_ok(k))
        return -1;
    if (s->every > 0)
        return k->epoch % s->every == 0;
    int mdays = month_days(k->year, k->month), wd = weekday(k->year, k->month, k->day);
    int dom = (s->dom >> k->day & 1) || ((s->dom & 1) && k->day == mdays);
    int dow = (s->dow >> wd & 1) || ((s->dow_last >> wd & 1) && k->day + 7 > mdays)
        || (s->dow_nth >> (7 * ((k->day - 1) / 7) + wd) & 1);
    int day = s->day_or ? (dom || dow) : (dom && dow);
    return (int)(s->sec >> k->second & 1) && (s->min >> k->minute & 1)
        && (s->hour >> k->hour & 1) && (s->mon >> k->month & 1) && day;
}

/* ---- the next second that fires --------------------------------------------------------- */

static int64_t floor_div(int64_t a, int64_t b) { return a / b - (a % b != 0 && (a < 0) != (b < 0)); }

/* Days from 1970-01-01 to y-m-d, proleptic Gregorian (H. Hinnant's days_from_civil). */
static int64_t days_from_civil(int64_t y, int m, int d)
{
    y -= m <= 2;
    int64_t era = floor_div(y, 400), yoe = y - era * 400;
    int64_t doy = (153 * (m + (m > 2 ? -3 : 9)) + 2) / 5 + d - 1;
    return era * 146097 + yoe * 365 + yoe / 4 - yoe / 100 + doy - 719468;
}

/* The wall time `wall` seconds after 1970-01-01T00:00 as a tick (epoch: wall - offset). */
static void tick_of(int64_t wall, int64_t offset, tc_tick *k)
{
    int64_t z = floor_div(wall, 86400) + 719468, rem = wall - floor_div(wall, 86400) * 86400;
    int64_t era = floor_div(z, 146097), doe = z - era * 146097;
    int64_t yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    int64_t doy = doe - (365 * yoe + yoe / 4 - yoe / 100), mp = (5 * doy + 2) / 153;
    k->day = (int32_t)(doy - (153 * mp + 2) / 5 + 1);
    k->month = (int32_t)(mp < 10 ? mp + 3 : mp - 9);
    k->year = (int32_t)(yoe + era * 400 + (k->month <= 2));
    k->hour = (int32_t)(rem / 3600);
    k->minute = (int32_t)(rem / 60 % 60);
    k->second = (int32_t)(rem % 60);
    k->epoch = wall - offset;
}

static int64_t wall_of(const tc_tick *k)
{
    return days_from_civil(k->year, k->month, k->day) * 86400 + k->hour * 3600 + k->minute * 60
        + k->second;
}

enum { AT_MONTH, AT_DAY, AT_HOUR };

/* 1 if some cron slot matches the month (AT_MONTH), also the day (AT_DAY), also the hour
 * (AT_HOUR) of `k`; 0 if none: the whole month, day or hour can be passed over. */
static int any_at(const tc_table *t, const tc_tick *k, int level)
{
    day_rows d;
    day_rows_of(t, k, &d);
    const uint64_t *hr = row(t, R_HOUR + k->hour);
    for (size_t w = 0, n = live_words(t); w < n; w++) {
        uint64_t bits = level == AT_MONTH ? d.mo[w] : day_word(&d, w);
        if (level == AT_HOUR)
            bits &= hr[w];
        if (bits)
            return 1;
    }
    return 0;
}

/* The first second >= k->second of k's minute (R_CACHE holding it) at which a slot fires, or -1. */
static int first_second(const tc_table *t, const tc_tick *k)
{
    const uint64_t *cache = row(t, R_CACHE);
    size_t n = live_words(t), w;
    for (w = 0; w < n && !cache[w]; w++)
        ;
    if (w == n)
        return -1;
    for (int s = k->second; s < 60; s++) {
        const uint64_t *sec = row(t, R_SEC + s);
        for (w = 0; w < n; w++)
            if (cache[w] & sec[w])
                return s;
    }
    return -1;
}

int tc_table_next(tc_table *t, const tc_tick *from, int64_t limit, int64_t *ahead)
{
    *ahead = limit;
    if (!tick_ok(from))
        return TC_ERR_TIME;
    if (limit <= 0)
        return TC_OK;
    int64_t best = limit;
    for (size_t i = 0; i < t->ngroups; i++) {
        int64_t every = t->groups[i].every, r = from->epoch - floor_div(from->epoch, every) * every;
        if (t->groups[i].len && (r ? every - r : 0) < best)
            best = r ? every - r : 0;
    }
    int64_t start = wall_of(from), offset = from->epoch - start, wall = start;
    tc_tick k;
    while (wall - start < best) {
        tick_of(wall, offset, &k);
        if (k.year > 9999)
            break;
        if (!any_at(t, &k, AT_MONTH)) {         /* on to the 1st of the next month */
            wall = days_from_civil(k.year + (k.month == 12), k.month % 12 + 1, 1) * 86400;
            continue;
        }
        if (!any_at(t, &k, AT_DAY)) {
            wall += 86400 - (k.hour * 3600 + k.minute * 60 + k.second);
            continue;
        }
        if (!any_at(t, &k, AT_HOUR)) {
            wall += 3600 - (k.minute * 60 + k.second);
            continue;
        }
        int64_t key = minute_key(&k);
        if (key != t->cache_key) {
            build_cache(t, &k);
            t->cache_key = key;
        }
        int s = first_second(t, &k);
        if (s >= 0) {
            if (wall + (s - k.second) - start < best)
                best = wall + (s - k.second) - start;
            break;
        }
        wall += 60 - k.second;
    }
    *ahead = best;
    return TC_OK;
}
