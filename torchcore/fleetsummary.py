"""The summary of the fleet history that ``fleet tasks`` reads: ``torchcore.task_hours``, one row
per (task, node, hour) with the runs' count, failures and latest run, kept by triggers on
``torchcore.runs`` as the agents' rows arrive.  Reading the whole last day of runs takes
seconds to minutes at millions of runs a day; the summary has a row per task and node that ran
in an hour, whatever the number of runs, and is read through ``READ_SQL``.

A row of ``task_hours`` holds, of the runs whose ``at`` falls in that hour (UTC):

- ``runs``: those that started (``started`` set), ``failures``: those ``failed``;
- ``last_*``: the latest of them by (at, run_id), in the state its row has now (running,
  ended, skipped, missed: what ``describe`` needs);
- ``done_*``: the latest finished one (ended, not skipped nor missed) and whether it failed.

The trigger ``runs_count`` (after insert or update, per row) keeps it exact whatever order and
number of times a run's states are shipped: an update of a final row (ended, skipped, missed)
leaving what the summary sees of it as it was is a final row shipped again and changes nothing
(the upsert of fleetrows.py never replaces it by an earlier state); a final row replaced by
another final state (a run recorded lost by another node, claimloss.py, then its own node's
record of how it ended) makes its hour counted again (``recount_hour``); otherwise the row's contribution before the change is taken out and
its contribution after it put in, so a run is counted once in ``runs`` when its row first has
``started`` and once in ``failures`` when it first is final and failed.  The latest run is
replaced by a row at least as late, so the state of the same run shipped again is refreshed.
A row whose ``at`` changes (a start, then a failed fork: the due time is its ``at`` then) and
rows deleted make their hours counted again from ``runs`` (``recount_hour``, through the index on (task, at)); a truncate empties it.
"""

S = "torchcore"
HOUR = "date_trunc('hour', {0}.at AT TIME ZONE 'UTC')"     # a bucket: the hour of at, in UTC
FINAL = "({0}.ended IS NOT NULL OR {0}.skipped IS NOT NULL OR {0}.missed)"
FINISHED = "({0}.ended IS NOT NULL AND {0}.skipped IS NULL AND NOT {0}.missed)"

# the latest row's state: (column of task_hours, its value from a runs row r)
_LAST = (("last_at", "{0}.at"), ("last_run", "{0}.run_id"), ("last_ended", "{0}.ended IS NOT NULL"),
         ("last_exit_code", "{0}.exit_code"), ("last_signal", "{0}.signal"),
         ("last_timed_out", "{0}.timed_out"), ("last_skipped", "{0}.skipped"),
         ("last_missed", "{0}.missed"), ("last_manual", "{0}.manual"), ("last_pid", "{0}.pid"),
         ("last_error", "{0}.error"), ("last_stopped", "{0}.stopped"))
_DONE = (("done_at", "{0}.at"), ("done_run", "{0}.run_id"), ("done_failed", "{0}.failed"))

TABLE = f"""CREATE TABLE {S}.task_hours (
    task text NOT NULL,
    node text NOT NULL,
    hour timestamp NOT NULL,                -- the hour (UTC) of the runs' at
    runs bigint NOT NULL DEFAULT 0,         -- runs that started
    failures bigint NOT NULL DEFAULT 0,
    last_at timestamptz, last_run bigint,   -- the latest run of the hour, as its row is now
    last_ended boolean, last_exit_code integer, last_signal integer, last_timed_out boolean,
    last_skipped text, last_missed boolean, last_manual boolean, last_pid integer,
    last_error text, last_stopped text,
    done_at timestamptz, done_run bigint, done_failed boolean,  -- the latest finished run
    PRIMARY KEY (task, node, hour)
)"""

_COLUMNS = ", ".join(c for c, _ in _LAST + _DONE)
_LATER = "(EXCLUDED.{0}_at, EXCLUDED.{0}_run) >= (h.{0}_at, h.{0}_run)"
_ADD = f"""
    INSERT INTO {S}.task_hours AS h (task, node, hour, runs, failures, {_COLUMNS})
    VALUES (NEW.task, NEW.node, {HOUR.format("NEW")}, (NEW.started IS NOT NULL)::int - was_started,
            NEW.failed::int - was_failed,
            {", ".join(v.format("NEW") for _, v in _LAST)},
            {", ".join(f"CASE WHEN {FINISHED.format('NEW')} THEN {v.format('NEW')} END"
                       for _, v in _DONE)})
    ON CONFLICT (task, node, hour) DO UPDATE SET
        runs = h.runs + EXCLUDED.runs, failures = h.failures + EXCLUDED.failures,
        {", ".join(f"{c} = CASE WHEN h.last_at IS NULL OR {_LATER.format('last')} "
                   f"THEN EXCLUDED.{c} ELSE h.{c} END" for c, _ in _LAST)},
        {", ".join(f"{c} = CASE WHEN EXCLUDED.done_at IS NOT NULL AND (h.done_at IS NULL OR "
                   f"{_LATER.format('done')}) THEN EXCLUDED.{c} ELSE h.{c} END"
                   for c, _ in _DONE)}"""

# what the summary sees of a row: a final row shipped again with all of these unchanged is no
# change to it
_SEEN = "ROW({0}.task, {0}.node, {0}.started, {0}.failed, " + ", ".join(
    v for _, v in _LAST) + ")"

COUNT_FUNCTION = f"""CREATE FUNCTION {S}.count_run() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    was_started integer := 0;
    was_failed integer := 0;
BEGIN
    IF TG_OP = 'UPDATE' THEN
        IF {FINAL.format("OLD")} THEN
            IF {_SEEN.format("OLD")} IS NOT DISTINCT FROM {_SEEN.format("NEW")} THEN
                RETURN NULL;    -- a final row shipped again: counted when it became final
            END IF;
            -- a final row replaced by another final state (a run another node recorded lost,
            -- then its own node's end of it): its hour, and the new one, counted again
            PERFORM {S}.recount_hour(OLD.task, OLD.node, {HOUR.format("OLD")});
            IF (OLD.task, OLD.node, {HOUR.format("OLD")})
                    IS DISTINCT FROM (NEW.task, NEW.node, {HOUR.format("NEW")}) THEN
                PERFORM {S}.recount_hour(NEW.task, NEW.node, {HOUR.format("NEW")});
            END IF;
            RETURN NULL;
        END IF;
        IF (OLD.task, OLD.node, OLD.at) IS DISTINCT FROM (NEW.task, NEW.node, NEW.at) THEN
            -- moved (a start, then a failed fork: due time, not start time): its old hour
            -- counted again, which counts the row as it is now if it stayed in that hour
            PERFORM {S}.recount_hour(OLD.task, OLD.node, {HOUR.format("OLD")});
            IF OLD.task = NEW.task AND OLD.node = NEW.node
                    AND {HOUR.format("OLD")} = {HOUR.format("NEW")} THEN
                RETURN NULL;
            END IF;
        ELSE
            was_started := (OLD.started IS NOT NULL)::int;
            was_failed := OLD.failed::int;
        END IF;
    END IF;
    {_ADD};
    RETURN NULL;
END $$"""

RECOUNT_FUNCTION = f"""CREATE FUNCTION {S}.recount_hour(the_task text, the_node text,
        the_hour timestamp) RETURNS void LANGUAGE sql AS $$
    DELETE FROM {S}.task_hours WHERE task = the_task AND node = the_node AND hour = the_hour;
    WITH r AS (
        SELECT * FROM {S}.runs WHERE task = the_task AND node = the_node
            AND at >= the_hour AT TIME ZONE 'UTC'
            AND at < (the_hour + interval '1 hour') AT TIME ZONE 'UTC'
    ), c AS (
        SELECT count(*) AS n, count(*) FILTER (WHERE started IS NOT NULL) AS runs,
               count(*) FILTER (WHERE failed) AS failures FROM r
    )
    INSERT INTO {S}.task_hours (task, node, hour, runs, failures, {_COLUMNS})
    SELECT the_task, the_node, the_hour, c.runs, c.failures,
           {", ".join(v.format("l") for _, v in _LAST)}, {", ".join(v.format("d") for _, v in _DONE)}
    FROM c
    CROSS JOIN LATERAL (SELECT * FROM r ORDER BY at DESC, run_id DESC LIMIT 1) l
    LEFT JOIN LATERAL (SELECT * FROM r WHERE {FINISHED.format("r")}
                       ORDER BY at DESC, run_id DESC LIMIT 1) d ON true
    WHERE c.n > 0
$$"""

DELETED_FUNCTION = f"""CREATE FUNCTION {S}.recount_deleted() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM {S}.recount_hour(g.task, g.node, g.hour)
    FROM (SELECT DISTINCT task, node, {HOUR.format("gone")} AS hour FROM gone) g;
    RETURN NULL;
END $$"""

TRUNCATED_FUNCTION = f"""CREATE FUNCTION {S}.truncate_hours() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    TRUNCATE {S}.task_hours;
    RETURN NULL;
END $$"""

# migration 6 of fleetdb.py replaces count_run in a database made before a final row could be
# replaced by another final state (one made now gets this text from migration 2 already)
REPLACE_COUNT_FUNCTION = COUNT_FUNCTION.replace("CREATE FUNCTION", "CREATE OR REPLACE FUNCTION", 1)

STATEMENTS = (
    TABLE,
    f"CREATE INDEX task_hours_hour ON {S}.task_hours (hour)",
    RECOUNT_FUNCTION,
    COUNT_FUNCTION,
    DELETED_FUNCTION,
    TRUNCATED_FUNCTION,
    f"CREATE TRIGGER runs_count AFTER INSERT OR UPDATE ON {S}.runs "
    f"FOR EACH ROW EXECUTE FUNCTION {S}.count_run()",
    f"CREATE TRIGGER runs_deleted AFTER DELETE ON {S}.runs REFERENCING OLD TABLE AS gone "
    f"FOR EACH STATEMENT EXECUTE FUNCTION {S}.recount_deleted()",
    f"CREATE TRIGGER runs_truncated AFTER TRUNCATE ON {S}.runs "
    f"FOR EACH STATEMENT EXECUTE FUNCTION {S}.truncate_hours()",
)

# ---- reading -----------------------------------------------------------------------------------

# The hours of the last day: from the one that holds now() - 1 day, so 24 to 25 hours back.
SINCE = "date_trunc('hour', (now() - interval '1 day') AT TIME ZONE 'UTC')"

# Per (node, task) that ran in the last day: the latest run (run_id, its state as describe needs
# it, at), the runs that started, failures, and whether the latest finished run failed.
READ_SQL = f"""
WITH recent AS (
    SELECT * FROM {S}.task_hours WHERE hour >= {SINCE} {{task}}
), last AS (
    SELECT DISTINCT ON (node, task) node, task, last_run, last_ended, last_exit_code,
           last_signal, last_timed_out, last_skipped, last_missed, last_manual, last_pid,
           last_error, last_stopped, extract(epoch FROM last_at)::float8 AS last_at
    FROM recent ORDER BY node, task, last_at DESC, last_run DESC
), counts AS (
    SELECT node, task, sum(runs)::bigint AS runs, sum(failures)::bigint AS failures,
           (array_agg(done_failed ORDER BY done_at DESC, done_run DESC)
               FILTER (WHERE done_at IS NOT NULL))[1] AS last_failed
    FROM recent GROUP BY node, task
)
SELECT last.*, counts.runs, counts.failures, counts.last_failed
FROM last JOIN counts USING (node, task) ORDER BY task, node
"""
LAST_FIELDS = ("node", "task", "run_id", "ended", "exit_code", "signal", "timed_out", "skipped",
               "missed", "manual", "pid", "error", "stopped", "at", "runs", "failures",
               "last_failed")
