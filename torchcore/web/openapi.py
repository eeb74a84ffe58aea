"""The OpenAPI 3.1 document of the JSON API, served at ``/api/v1/openapi.json``.

Written next to the routes it describes (api.py); tests/test_web_api.py checks that every
route is in it and that the answers match its schemas.
"""

from torchcore import __version__

_TIME = {"type": ["string", "null"], "format": "date-time",
         "description": "ISO 8601 with the UTC offset"}
_INT = {"type": ["integer", "null"]}
_ERROR = {"type": "object", "properties": {"error": {"type": "string"}}, "required": ["error"]}

RUN = {
    "type": "object",
    "description": "A run, skip or miss, as `torchcore history --json` prints it",
    "properties": {
        "task": {"type": "string"}, "run_id": {"type": "integer"}, "node": {"type": "string"},
        "scheduled": _TIME, "started": _TIME, "ended": _TIME, "exit_code": _INT, "signal": _INT,
        "timed_out": {"type": "boolean"}, "skipped": {"type": "boolean"},
        "skip_reason": {"type": ["string", "null"]}, "missed": {"type": "boolean"},
        "duration": {"type": ["number", "null"], "description": "seconds"},
        "manual": {"type": "boolean"}, "pid": _INT, "peak_rss": _INT,
        "error": {"type": ["string", "null"]}, "stopped": {"type": ["string", "null"]},
        "failed": {"type": "boolean"},
    },
    "required": ["task", "run_id", "node", "scheduled", "started", "ended", "exit_code",
                 "signal", "timed_out", "skipped", "skip_reason", "missed", "duration", "manual",
                 "pid", "peak_rss", "error", "stopped", "failed"],
}
ONCE = {"type": "object", "description": "a `run: once` task: who runs it", "properties": {
    "last": {"oneOf": [{"type": "null"}, {
        "type": "object", "description": "the last second that started, and its node",
        "properties": {"second": _TIME, "fence": {"type": "integer"}, "node": {"type": "string"},
                       "started": _TIME}, "required": ["second", "fence", "node", "started"]}]},
    "slots": {"type": "array", "description": "the slots of its fleet-wide max held now",
              "items": {"type": "object", "properties": {
                  "slot": {"type": "integer"}, "node": {"type": "string"},
                  "fence": {"type": ["integer", "null"]},
                  "second": {**_TIME, "description": "the run's second (null: a daemon's "
                                                     "instance)"},
                  "lease_until": _TIME},
                  "required": ["slot", "node", "fence", "second", "lease_until"]}}},
    "required": ["last", "slots"]}
TASK = {
    "type": "object",
    "description": "A task as `torchcore status --json` shows it, with its schedule in words",
    "properties": {
        "name": {"type": "string"}, "type": {"type": "string"},
        "schedule": {"type": ["string", "null"]}, "description": {"type": "string"},
        "next_run": _TIME,
        "state": {"type": "string", "description": "ok, failing, crash-looping, skipped by max, "
                                                  "not on this node, disabled, never ran"},
        "running": {"type": "array", "items": {"type": "object", "properties": {
            "run_id": _INT, "pid": _INT, "executor_pid": _INT, "started": _TIME,
            "state": {"type": ["string", "null"]}}}},
        "last": {"type": ["object", "null"], "properties": {
            "run_id": {"type": "integer"}, "exit_code": _INT, "signal": _INT,
            "timed_out": {"type": "boolean"}, "ended": _TIME,
            "duration": {"type": ["number", "null"]}, "error": {"type": ["string", "null"]},
            "stopped": {"type": ["string", "null"]}, "failed": {"type": "boolean"},
            "result": {"type": "string"}}},
        "daemon": {"type": "object"},
        "once": {**ONCE, "description": "a `run: once` task: who runs it, as the claims process "
                                        "last read it (as_of), with this node's own runs since",
                 "properties": {**ONCE["properties"], "as_of": _TIME}},
        "disabled_until_reload": {"type": "boolean"},
    },
    "required": ["name", "type", "schedule", "description", "next_run", "state", "running", "last"],
}
TASK_DETAIL = {"allOf": [TASK, {"type": "object", "properties": {
    "timezone": {"type": ["string", "null"]}, "enabled": {"type": "boolean"},
    "command": {"type": ["string", "array"]}, "timeout": {"type": ["number", "null"]},
    "max": {"type": "integer"},
    "next_runs": {"type": "array", "items": {"type": "string", "format": "date-time"}}},
    "required": ["next_runs", "enabled", "command"]}]}
LOG = {"type": "object", "properties": {
    "task": {"type": "string"}, "run_id": _INT,
    "lines": {"type": "array", "items": {"type": "string"}}}, "required": ["task", "lines"]}
STATUS = {"type": "object", "properties": {
    "daemon": {"type": "object", "description": "as `status --json`'s daemon",
               "properties": {"running": {"type": "boolean"}, "answering": {"type": "boolean"}},
               "required": ["running", "answering"]},
    "file_errors": {"type": "array", "items": {"type": "string"}},
    "tasks": {"type": "integer"}, "running": {"type": "integer"},
    "states": {"type": "object", "additionalProperties": {"type": "integer"}},
    "fleet": {"type": ["object", "null"], "description": "with settings.fleet, the fleet "
              "database of the fleet routes (its URL without a password); null without",
              "properties": {"database": {"type": "string"}}}},
    "required": ["daemon", "tasks", "states", "running", "fleet"]}

_TEXT = {"type": ["string", "null"]}
FLEET_NODE = {
    "type": "object", "description": "A node of the fleet, as `torchcore fleet status --json` shows it",
    "properties": {
        "name": {"type": "string"}, "hostname": {"type": "string"},
        "addresses": {"type": "array", "items": {"type": "string"}}, "version": {"type": "string"},
        "pid": _INT, "started": _TIME, "last_seen": _TIME,
        "heartbeat": {"type": "number", "description": "seconds between heartbeats"},
        "age": {"type": "number", "description": "seconds since the last heartbeat"},
        "state": {"type": "string", "enum": ["up", "late", "down", "stopped"]},
        "since": _TIME, "clock_offset": {"type": ["number", "null"],
                                         "description": "the node's clock minus the database's, "
                                                        "seconds"},
        "clock_flagged": {"type": "boolean", "description": "the clock is more than 1 s off"},
        "file_path": _TEXT, "file_digest": _TEXT, "file_commit": _TEXT, "file_since": _TIME,
        "drifted": {"type": "boolean", "description": "runs another task file than most up nodes"},
        "drifted_since": _TIME, "running": {"type": "integer"},
        "failed_24h": {"type": "integer"}, "waiting": {"type": "integer"},
        "started_runs": {"type": "integer"}, "failed_runs": {"type": "integer"},
        "skipped_runs": {"type": "integer"}, "missed_runs": {"type": "integer"}, "now": _TIME},
    "required": ["name", "hostname", "addresses", "version", "state", "since", "clock_offset",
                 "clock_flagged", "file_digest", "file_commit", "drifted", "drifted_since",
                 "running", "failed_24h", "now"],
}
FLEET_NODES = {"type": "object", "properties": {
    "database": {"type": "string", "description": "the fleet database's URL, without a password"},
    "now": _TIME, "nodes": {"type": "array", "items": FLEET_NODE},
    "counts": {"type": "object", "additionalProperties": {"type": "integer"},
               "description": "nodes up, late, down, stopped, drifted, clock_flagged"},
    "ok": {"type": "boolean", "description": "no node down or drifted"}},
    "required": ["database", "now", "nodes", "counts", "ok"]}
FLEET_TASKS = {"type": "object", "properties": {
    "database": {"type": "string"}, "file": {"type": "string"}, "digest": {"type": "string"},
    "nodes_on_file": {"type": "array", "items": {"type": "string"}},
    "nodes": {"type": "integer", "description": "how many nodes are registered"},
    "tasks": {"type": "array", "items": {"type": "object", "properties": {
        "name": {"type": "string"}, "enabled": {"type": "boolean"}, "targets": {"type": "string"},
        "should": {"type": "array", "items": {"type": "string"},
                   "description": "the registered nodes its targets select"},
        "ran": {"type": "array", "description": "the nodes that ran it in the last day",
                "items": {"type": "object", "properties": {
                    "node": {"type": "string"}, "last_at": _TIME, "last_run": {"type": "integer"},
                    "last_result": {"type": "string"}, "failed": {"type": ["boolean", "null"]},
                    "runs": {"type": "integer"}, "failures": {"type": "integer"}},
                    "required": ["node", "last_at", "last_run", "last_result", "failed", "runs",
                                 "failures"]}},
        "run": {"type": "string", "enum": ["each", "once"]},
        "once": {"oneOf": [{"type": "null"}, ONCE]},
        "problems": {"type": "array", "items": {"type": "string"}}},
        "required": ["name", "enabled", "targets", "should", "ran", "run", "once", "problems"]}},
    "problems": {"type": "array", "items": {"type": "object", "properties": {
        "kind": {"type": "string", "enum": ["orphan", "failing", "drift"]},
        "text": {"type": "string"}}, "required": ["kind", "text"]}}},
    "required": ["database", "file", "digest", "nodes_on_file", "tasks", "problems"]}
FLEET_RUN = {"allOf": [RUN, {"type": "object", "properties": {
    "output": {"type": ["string", "null"], "description": "the stored tail of its output, as "
                                                          "stored (null: none)"},
    "lines": {"type": "array", "items": {"type": "string"},
              "description": "its lines, control characters escaped as `logs` does"}},
    "required": ["output", "lines"]}]}


def _param(name, description, schema, where="query", required=False):
    return {"name": name, "in": where, "required": required or where == "path",
            "description": description, "schema": schema}


_TASK_NAME = _param("name", "the task's name", {"type": "string",
                    "pattern": "^[A-Za-z0-9_][A-Za-z0-9._-]{0,63}$"}, "path")
_RUN_ID = _param("run_id", "the run's id", {"type": "integer", "minimum": 0,
                 "maximum": 999_999_999_999_999_999}, "path")
_LINES = _param("lines", "how many of the last lines", {"type": "integer", "minimum": 1,
                "maximum": 10_000})
_RUN_FILTER = _param("run", "only the lines of this run", {"type": "integer", "minimum": 1,
                     "maximum": 999_999_999_999_999_999})
_NODE_NAME = _param("node", "the node's name in the fleet", {
    "type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$"}, "path")
_HISTORY_FILTERS = [
    _param("task", "only this task", _TASK_NAME["schema"]),
    _param("limit", "at most this many (default 50)", {"type": "integer", "minimum": 1,
                                                      "maximum": 10_000}),
    _param("since", "a duration (90m, 2h, 1d, 1w), today, yesterday, or an ISO date "
                    "or time (2026-11-24, 2026-11-24T15:30)",
           {"type": "string", "pattern": "^(today|yesterday|[1-9][0-9]{0,3}[smhdw])$"}),
    _param("failed", "only failed runs", {"type": "boolean"})]


def _ok(description, schema, status="200"):
    return {status: {"description": description,
                     "content": {"application/json": {"schema": schema}}}}


def _errors(*codes):
    words = {"400": "a bad parameter", "401": "no token, or a wrong one (empty body)",
             "403": "state-changing calls are off (no usable token_file); on any route, a "
                    "browser's request from another site's page, or a Host not loopback",
             "404": "no such task or run", "409": "the daemon refused (its reason)",
             "503": "the daemon or the records cannot be reached",
             "fleet404": "the fleet is not set up (no settings.fleet: the message says what to "
                         "add), or no such node, run or task",
             "fleet503": "the fleet database cannot answer now (the message names it, without "
                         "its password, and says why)"}
    out = {}
    for code in codes:
        content = {} if code == "401" else {"content": {"application/json": {"schema": _ERROR}}}
        out[code.removeprefix("fleet")] = {"description": words[code], **content}
    return out


def document(api, base_path="/"):
    """The OpenAPI document; ``servers`` names the base path the service runs under."""
    act = {"security": [{"token": []}]}
    paths = {
        "/api/v1/status": {"get": {"summary": "The daemon and the tasks' states, counted",
                                   "responses": {**_ok("status", STATUS), **_errors("503")}}},
        "/api/v1/tasks": {"get": {
            "summary": "The tasks with their state, a page at a time",
            "parameters": [
                _param("q", "only tasks whose name or schedule contains this", {"type": "string"}),
                _param("state", "only tasks in this state", {"type": "string"}),
                _param("offset", "skip this many", {"type": "integer", "minimum": 0,
                                                    "maximum": 10**9}),
                _param("limit", "at most this many", {"type": "integer", "minimum": 1,
                                                      "maximum": 1000})],
            "responses": {**_ok("a page of tasks", {"type": "object", "properties": {
                "total": {"type": "integer"}, "offset": {"type": "integer"},
                "limit": {"type": "integer"}, "tasks": {"type": "array", "items": TASK}},
                "required": ["total", "offset", "limit", "tasks"]}), **_errors("400", "503")}}},
        "/api/v1/tasks/{name}": {"get": {
            "summary": "One task, with its next run times", "parameters": [_TASK_NAME],
            "responses": {**_ok("the task", TASK_DETAIL), **_errors("404", "503")}}},
        "/api/v1/tasks/{name}/log": {"get": {
            "summary": "The last lines of a task's log", "parameters": [_TASK_NAME, _LINES, _RUN_FILTER],
            "responses": {**_ok("log lines, oldest first", LOG), **_errors("400", "404")}}},
        "/api/v1/tasks/{name}/log/follow": {"get": {
            "summary": "The log, then each new line as it is written (server-sent events, one "
                       "`data:` event per line)",
            "parameters": [_TASK_NAME, _LINES, _RUN_FILTER],
            "responses": {"200": {"description": "an event stream",
                                  "content": {"text/event-stream": {"schema": {"type": "string"}}}},
                          **_errors("400", "404", "503")}}},
        "/api/v1/history": {"get": {
            "summary": "Runs, skips and misses, newest first (the filters of `torchcore history`)",
            "parameters": _HISTORY_FILTERS,
            "responses": {**_ok("runs", {"type": "array", "items": RUN}),
                          **_errors("400", "503")}}},
        "/api/v1/runs/{run_id}": {"get": {
            "summary": "One run", "parameters": [_RUN_ID],
            "responses": {**_ok("the run", RUN), **_errors("404", "503")}}},
        "/api/v1/runs/{run_id}/log": {"get": {
            "summary": "What one run printed", "parameters": [_RUN_ID, _LINES],
            "responses": {**_ok("its log lines", LOG), **_errors("400", "404", "503")}}},
        "/api/v1/fleet/nodes": {"get": {
            "summary": "The fleet's nodes: state, drift, clock offset (as `fleet status --json`)",
            "responses": {**_ok("the nodes", FLEET_NODES), **_errors("fleet404", "fleet503")}}},
        "/api/v1/fleet/tasks": {"get": {
            "summary": "The daemon's task file across the fleet: per task the nodes that should "
                       "run it and those that ran it in the last day, and the problems (as "
                       "`fleet tasks --json`)",
            "parameters": [_param("task", "only this task (of the task file)",
                                  _TASK_NAME["schema"])],
            "responses": {**_ok("the tasks across the fleet", FLEET_TASKS),
                          **_errors("400", "fleet404", "fleet503")}}},
        "/api/v1/fleet/history": {"get": {
            "summary": "Runs, skips and misses of every node, newest first (`history --fleet`)",
            "parameters": [*_HISTORY_FILTERS,
                           _param("node", "only this node", _NODE_NAME["schema"])],
            "responses": {**_ok("runs", {"type": "array", "items": RUN}),
                          **_errors("400", "fleet404", "fleet503")}}},
        "/api/v1/fleet/runs/{node}/{run_id}": {"get": {
            "summary": "One run of one node, with the tail of its output the fleet database "
                       "stored", "parameters": [_NODE_NAME, _RUN_ID],
            "responses": {**_ok("the run", FLEET_RUN), **_errors("400", "fleet404", "fleet503")}}},
        "/api/v1/tasks/{name}/run": {"post": {
            "summary": "Start a run now (counts against the limits, recorded as manual)",
            "parameters": [_TASK_NAME], **act,
            "responses": {**_ok("started", {"type": "object", "properties": {
                "task": {"type": "string"}, "run_id": {"type": "integer"}},
                "required": ["task", "run_id"]}, "202"),
                **_errors("401", "403", "404", "409", "503")}}},
        "/api/v1/tasks/{name}/enable": {"post": {
            "summary": "Schedule a task disabled by the API again (until the next reload)",
            "parameters": [_TASK_NAME], **act,
            "responses": {**_ok("enabled", {"type": "object"}),
                          **_errors("401", "403", "404", "409", "503")}}},
        "/api/v1/tasks/{name}/disable": {"post": {
            "summary": "Stop scheduling a task until the next reload (running runs go on)",
            "parameters": [_TASK_NAME], **act,
            "responses": {**_ok("disabled", {"type": "object"}),
                          **_errors("401", "403", "404", "409", "503")}}},
        "/api/v1/reload": {"post": {
            "summary": "Reload the task file (as `torchcore reload`)", **act,
            "responses": {**_ok("the verdict", {"type": "object", "properties": {
                "accepted": {"type": "boolean"},
                "problems": {"type": "array", "items": {"type": "string"}},
                "summary": {"type": ["string", "null"]}}, "required": ["accepted", "problems"]}),
                **_errors("401", "403", "409", "503")}}},
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "torchcore", "version": __version__,
                 "description": "The JSON API of one torchcore node (and, with "
                                "settings.fleet, of the fleet database: /api/v1/fleet/). Times are "
                                "ISO 8601 with their UTC offset; runs have the fields of "
                                "`history --json`. The "
                                "actions (POST) need the token; with `settings.http.auth: all`, "
                                "every route does (and this document), answering 401 without "
                                "it."},
        "servers": [{"url": base_path.rstrip("/") or "/"}],
        "paths": paths,
        "components": {"securitySchemes": {"token": {
            "type": "http", "scheme": "bearer",
            "description": "the token in settings.http.token_file"}}},
    }
