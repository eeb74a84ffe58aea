/* SPDX-License-Identifier: MIT */
/* A C host for tc_match under the sanitizers, with leak detection on: grows, churns and
 * frees a table, and checks a few answers. Built and run by tests/asan.sh. */
#include <stdio.h>
#include <stdlib.h>

#include "tc_match.h"

#define CHECK(cond) do { if (!(cond)) { fprintf(stderr, "failed: %s (line %d)\n", #cond, __LINE__); \
                                          exit(1); } } while (0)

static tc_spec every_second(void)
{
    tc_spec s = {0};
    s.sec = (1ULL << 60) - 1;
    s.min = (1ULL << 60) - 1;
    s.hour = (1U << 24) - 1;
    s.dom = 0xFFFFFFFEU;
    s.mon = 0x1FFE;
    s.dow = 0x7F;
    return s;
}

int main(void)
{
    tc_table *t = tc_table_new(1);
    uint32_t slot;
    const uint32_t *slots;
    size_t count;
    tc_tick tick = {2026, 11, 23, 8, 59, 30, 1795424370};
    tc_spec cron = every_second(), every = {0};
    CHECK(t != NULL);
    every.every = 10;
    for (int i = 0; i < 5000; i++)
        CHECK(tc_table_add(t, i % 3 ? &cron : &every, &slot) == TC_OK && slot == (uint32_t)i);
    CHECK(tc_table_count(t) == 5000 && tc_table_capacity(t) >= 5000);
    CHECK(tc_table_match(t, &tick, &slots, &count) == TC_OK && count == 5000);
    for (uint32_t i = 0; i < 5000; i += 2)
        CHECK(tc_table_remove(t, i) == TC_OK);
    for (uint32_t i = 1; i < 5000; i += 4)
        CHECK(tc_table_replace(t, i, i % 3 ? &every : &cron) == TC_OK);
    every.every = 7;
    for (uint32_t i = 3; i < 5000; i += 8)
        CHECK(tc_table_replace(t, i, &every) == TC_OK);
    CHECK(tc_table_match(t, &tick, &slots, &count) == TC_OK);
    for (size_t i = 1; i < count; i++)
        CHECK(slots[i - 1] < slots[i] && slots[i] % 2 == 1);
    int64_t ahead;
    CHECK(tc_table_next(t, &tick, 3600, &ahead) == TC_OK && ahead == 0);  /* every second */
    tick.day = 31;
    CHECK(tc_table_match(t, &tick, &slots, &count) == TC_ERR_TIME && count == 0);
    CHECK(tc_table_next(t, &tick, 3600, &ahead) == TC_ERR_TIME && ahead == 3600);
    CHECK(tc_table_remove(t, 0) == TC_ERR_SLOT);
    tc_table_free(t);
    tc_table_free(NULL);

    /* The next second that fires: a yearly schedule found a year on, month by month; an
     * "@every" slot on its multiple; nothing in an empty table; no walking past year 9999. */
    t = tc_table_new(1);
    CHECK(t != NULL);
    tc_spec yearly = {0};
    yearly.sec = 1ULL << 5;
    yearly.min = 1;
    yearly.hour = 1U << 3;
    yearly.dom = 1U << 1;
    yearly.mon = 1U << 1;
    yearly.dow = 0x7F;
    tc_tick from = {2026, 1, 2, 0, 0, 0, 1767312000};
    CHECK(tc_table_next(t, &from, 400 * 86400, &ahead) == TC_OK && ahead == 400 * 86400);
    CHECK(tc_table_add(t, &yearly, &slot) == TC_OK);
    CHECK(tc_table_next(t, &from, 400 * 86400, &ahead) == TC_OK);
    CHECK(ahead == 364 * 86400 + 3 * 3600 + 5);           /* 2027-01-01 03:00:05 */
    CHECK(tc_table_next(t, &from, 86400, &ahead) == TC_OK && ahead == 86400);
    every.every = 7;
    CHECK(tc_table_add(t, &every, &slot) == TC_OK);
    CHECK(tc_table_next(t, &from, 86400, &ahead) == TC_OK && ahead == 7 - 1767312000 % 7);
    tc_tick last = {9999, 12, 31, 23, 59, 0, 253402300740};
    CHECK(tc_table_remove(t, slot) == TC_OK);
    CHECK(tc_table_next(t, &last, 86400, &ahead) == TC_OK && ahead == 86400);
    tc_table_free(t);
    puts("tc_match_check: ok");
    return 0;
}
