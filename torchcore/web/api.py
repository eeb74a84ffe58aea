"""The JSON API under ``/api/v1/``: routes, parameter checks, the token rule.

Every handler takes a ``Request`` and returns ``(status, body)``; a bad parameter is an
``HttpError`` (400 with a message, never a 500), an unknown task or run a 404.  The
read-only routes need nothing (unless ``settings.http.auth: all``: then the server asks the
token of every request, see server.py); the state-changing ones (POST) need
``Authorization: Bearer <token>``, compared in constant time.  The document at
``/api/v1/openapi.json`` (openapi.py) describes exactly these routes.

The fleet routes (``/api/v1/fleet/...``) read the fleet database (web/fleet.py) when the task
file has ``settings.fleet``, and answer 404 saying what to add without it; a database that
cannot answer is a 503 naming it (without its password), never a wait beyond fleet.py's bounds.
"""

import hmac
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone

from torchcore import fleetquery, fleetspec
from torchcore.commands import common
from torchcore.commands import history as history_cmd
from torchcore.errors import DaemonError
from torchcore.fleetdb import FleetError
from torchcore.web.fleet import not_set_up

MAX_LIMIT = 10_000          # runs one history request may return
MAX_LOG_LINES = 10_000
MAX_TASK_PAGE = 1_000
_NAME = r"[A-Za-z0-9_][A-Za-z0-9._-]{0,63}"     # config.NAME_RE
_TRUE, _FALSE = ("1", "true", "yes"), ("0", "false", "no")


class HttpError(Exception):
    def __init__(self, status, message, headers=()):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, tuple(headers)


@dataclass
class Request:
    method: str
    path: str                       # below the base path, without the query: "api/v1/tasks"
    query: dict                     # name -> [values]
    headers: dict = field(default_factory=dict)     # lower-case names
    params: dict = field(default_factory=dict)      # from the route's pattern

    def one(self, name, default=None):
        values = self.query.get(name)
        if not values:
            return default
        if len(values) > 1:
            raise HttpError(400, f"{name}: given {len(values)} times; give it once")
        return values[0]


@dataclass
class Stream:
    """A streaming answer (server-sent events): ``lines`` yields the data of each event."""

    lines: object


class Api:
    """The routes of one Backend."""

    def __init__(self, backend):
        self.backend = backend
        self.routes = [
            ("GET", r"api/v1/status", self.status, ()),
            ("GET", r"api/v1/tasks", self.tasks, ("q", "state", "offset", "limit")),
            ("GET", rf"api/v1/tasks/(?P<name>{_NAME})", self.task, ()),
            ("GET", rf"api/v1/tasks/(?P<name>{_NAME})/log", self.task_log, ("lines", "run")),
            ("GET", rf"api/v1/tasks/(?P<name>{_NAME})/log/follow", self.task_follow,
             ("lines", "run")),
            ("GET", r"api/v1/history", self.history, ("task", "limit", "since", "failed")),
            ("GET", r"api/v1/runs/(?P<run_id>[0-9]{1,18})", self.run, ()),
            ("GET", r"api/v1/runs/(?P<run_id>[0-9]{1,18})/log", self.run_log, ("lines",)),
            ("GET", r"api/v1/fleet/nodes", self.fleet_nodes, ()),
            ("GET", r"api/v1/fleet/tasks", self.fleet_tasks, ("task",)),
            ("GET", r"api/v1/fleet/history", self.fleet_history,
             ("task", "node", "limit", "since", "failed")),
            ("GET", r"api/v1/fleet/runs/(?P<node>[^/]{1,200})/(?P<run_id>[^/]{1,40})",
             self.fleet_run, ()),
            ("POST", rf"api/v1/tasks/(?P<name>{_NAME})/run", self.run_now, ()),
            ("POST", rf"api/v1/tasks/(?P<name>{_NAME})/enable", self.enable, ()),
            ("POST", rf"api/v1/tasks/(?P<name>{_NAME})/disable", self.disable, ()),
            ("POST", r"api/v1/reload", self.reload, ()),
        ]
        self._compiled = [(method, re.compile(pattern), handler, allowed)
                          for method, pattern, handler, allowed in self.routes]

    def handle(self, request):
        """(status, body or Stream); HttpError for every refusal."""
        allowed_methods = []
        for method, pattern, handler, allowed in self._compiled:
            match = pattern.fullmatch(request.path)
            if match is None:
                continue
            if method != request.method:
                allowed_methods.append(method)
                continue
            unknown = sorted(set(request.query) - set(allowed))
            if unknown:
                known = ", ".join(allowed) or "none"
                raise HttpError(400, f"unknown parameter {unknown[0]!r} (known: {known})")
            request.params = match.groupdict()
            if method == "POST":
                self.authorize(request)
            return handler(request)
        if allowed_methods:
            raise HttpError(405, f"{request.path} takes {', '.join(allowed_methods)}",
                            [("Allow", ", ".join(allowed_methods))])
        raise HttpError(404, f"no such resource: /{request.path}")

    def authorize(self, request, why="this call changes state"):
        """The Bearer token, or 401 (missing or wrong) / 403 (no usable token file)."""
        backend = self.backend
        if backend.token is None:
            raise HttpError(403, backend.token_error)
        given = request.headers.get("authorization", "")
        scheme, _, credentials = given.partition(" ")
        if not given:
            raise HttpError(401, f"{why}: send Authorization: Bearer <token>",
                            [("WWW-Authenticate", 'Bearer realm="torchcore"')])
        if scheme.lower() != "bearer" or not hmac.compare_digest(
                credentials.strip().encode("utf-8", "surrogateescape"), backend.token.encode()):
            raise HttpError(401, "", [("WWW-Authenticate", 'Bearer realm="torchcore"')])

    # -- reading ----------------------------------------------------------------------------------

    def status(self, request):
        document = self.backend.status()
        states = {}
        for task in document["tasks"]:
            states[task["state"]] = states.get(task["state"], 0) + 1
        fleet = self.backend.fleet      # whether the fleet pages have a database (not asked)
        return 200, {"daemon": document["daemon"], "file_errors": document["file_errors"],
                     "tasks": len(document["tasks"]), "states": states,
                     "running": sum(len(t["running"]) for t in document["tasks"]),
                     "fleet": None if fleet is None else {"database": fleet.shown}}

    def tasks(self, request):
        """The tasks' status rows, filtered by a search text and a state, a page at a time."""
        q = (request.one("q") or "").strip().lower()
        state = request.one("state")
        offset = _int(request, "offset", 0, 0, 10**9)
        limit = _int(request, "limit", 100, 1, MAX_TASK_PAGE)
        rows = self.backend.status()["tasks"]
        if q:
            rows = [t for t in rows if q in t["name"].lower() or q in (t["schedule"] or "").lower()
                    or q in t["description"].lower()]
        if state:
            rows = [t for t in rows if t["state"] == state]
        return 200, {"total": len(rows), "offset": offset, "limit": limit,
                     "tasks": rows[offset:offset + limit]}

    def task(self, request):
        found = self.backend.task(request.params["name"])
        if found is None:
            raise self.no_task(request.params["name"])
        return 200, found

    def task_log(self, request):
        name = self.known_task(request)
        lines = _int(request, "lines", 200, 1, MAX_LOG_LINES)
        run_id = _int(request, "run", None, 1, 10**18)
        return 200, {"task": name, "run_id": run_id,
                     "lines": self.backend.log_lines(name, lines, run_id)}

    def task_follow(self, request):
        name = self.known_task(request)
        lines = _int(request, "lines", 50, 0, MAX_LOG_LINES)
        run_id = _int(request, "run", None, 1, 10**18)
        return 200, Stream(lambda sleep: self.backend.follow(name, lines, run_id, sleep))

    def history(self, request):
        return 200, self.backend.history(**_history_filters(request))

    def run(self, request):
        run_id = int(request.params["run_id"])
        found = self.backend.run(run_id)
        if found is None:
            raise HttpError(404, f"no run {run_id} recorded")
        return 200, found

    def run_log(self, request):
        run_id = int(request.params["run_id"])
        found = self.backend.run(run_id)
        if found is None:
            raise HttpError(404, f"no run {run_id} recorded")
        lines = _int(request, "lines", MAX_LOG_LINES, 1, MAX_LOG_LINES)
        return 200, {"task": found["task"], "run_id": run_id,
                     "lines": self.backend.log_lines(found["task"], lines, run_id)}

    # -- the fleet (settings.fleet: web/fleet.py) -------------------------------------------------

    def fleet_nodes(self, request):
        """The nodes as ``fleet status --json`` shows them."""
        fleet = self.fleet()
        nodes = self.fleet_read(lambda: fleet.nodes(self.backend.tz))
        counts = {state: sum(1 for n in nodes if n["state"] == state) for state in fleetquery.STATES}
        counts["drifted"] = sum(1 for n in nodes if n["drifted"])
        counts["clock_flagged"] = sum(1 for n in nodes if n["clock_flagged"])
        return 200, {"database": fleet.shown, "now": nodes[0]["now"] if nodes else None,
                     "nodes": nodes, "counts": counts,
                     "ok": not (counts["down"] or counts["drifted"])}

    def fleet_tasks(self, request):
        """The daemon's task file across the fleet, as ``fleet tasks --json`` shows it; ``task``:
        that task's row and problems only."""
        fleet = self.fleet()
        name = request.one("task")
        taskfile = self.backend.taskfile
        if name is not None and name not in taskfile.index:
            raise self.no_task(name)
        view = dict(self.fleet_read(lambda: fleet.task_view(taskfile, self.backend.tz, name)),
                    database=fleet.shown)
        return 200, view

    def fleet_history(self, request):
        fleet = self.fleet()
        node = request.one("node")
        if node is not None:
            _check_node(node)
        filters = _history_filters(request)
        if filters["since"] is not None:
            try:        # the database compares times: a year it can hold, or a 400
                filters["since"] = datetime.fromtimestamp(filters["since"], timezone.utc)
            except (OverflowError, OSError, ValueError):
                raise HttpError(400, f"since: {request.one('since')[:40]!r} is out of range") \
                    from None
        return 200, self.fleet_read(lambda: fleet.history(tz=self.backend.tz, node=node,
                                                          **filters))

    def fleet_run(self, request):
        """One run of one node, with the output tail the fleet database stored: ``output`` as
        stored (None: none), ``lines`` its lines escaped as ``logs`` does."""
        fleet = self.fleet()
        node = _check_node(request.params["node"])
        text = request.params["run_id"]
        if not text.isascii() or not text.isdigit() or len(text) > 18:
            raise HttpError(400, f"run_id: expected a whole number, got {text[:40]!r}")
        run_id = int(text)
        found = self.fleet_read(lambda: fleet.run(node, run_id, self.backend.tz))
        if found is None:
            raise HttpError(404, f"no run {run_id} of node {node!r} in the fleet database")
        output = found["output"]
        found["lines"] = [history_cmd.shown(line) for line in (output or "").splitlines()]
        return 200, found

    def fleet(self):
        """The fleet database's reader, or 404 saying what to add to the task file."""
        reader = self.backend.fleet
        if reader is None:
            raise HttpError(404, not_set_up(self.backend.path))
        return reader

    @staticmethod
    def fleet_read(read):
        """``read()``; an unknown node is a 404 with fleetquery's words, a database that cannot
        answer a 503 naming it (redacted) and why."""
        try:
            return read()
        except fleetquery.QueryError as exc:
            raise HttpError(404, str(exc)) from None
        except FleetError as exc:
            raise HttpError(503, str(exc)) from None

    # -- acting -----------------------------------------------------------------------------------

    def run_now(self, request):
        name = self.known_task(request)
        reply = self.ask("run", task=name)
        return 202, {"task": name, "run_id": reply["run_id"]}

    def enable(self, request):
        name = self.known_task(request)
        return 200, {"task": name, **_without_ok(self.ask("enable", task=name))}

    def disable(self, request):
        name = self.known_task(request)
        return 200, {"task": name, **_without_ok(self.ask("disable", task=name))}

    def reload(self, request):
        reply = self.ask("reload")
        return 200, {"accepted": reply["accepted"], "problems": reply["problems"],
                     "summary": reply.get("summary")}

    def ask(self, cmd, **fields):
        """A control request; the daemon's refusal is a 409 with its words, no daemon a 503."""
        try:
            return self.backend.control(cmd, **fields)
        except DaemonError as exc:
            text = str(exc)
            status = 503 if "not running" in text or "did not answer" in text else 409
            raise HttpError(status, text.removeprefix(f"{cmd}: ")) from None

    # -- helpers ----------------------------------------------------------------------------------

    def known_task(self, request):
        name = request.params["name"]
        if name not in self.backend.tasks:
            raise self.no_task(name)
        return name

    def no_task(self, name):
        return HttpError(404, f"no task {name!r} in {self.backend.path}"
                              f"{common.did_you_mean(name, self.backend.tasks)}")


def _history_filters(request):
    """task, limit, since (epoch seconds), failed of a history request (its and the fleet's)."""
    task = request.one("task")
    if task is not None and not re.fullmatch(_NAME, task):
        raise HttpError(400, f"task: {task[:80]!r} is not a task name")
    limit = _int(request, "limit", 50, 1, MAX_LIMIT)
    since = request.one("since")
    if since is not None:
        try:
            since = common.parse_since(since)
        except Exception as exc:
            raise HttpError(400, f"since: {exc}") from None
    failed = _bool(request, "failed")
    return {"task": task, "limit": limit, "since": since, "failed": failed}


def _check_node(node):
    try:
        return fleetspec.check_node_name(node)
    except fleetspec.FleetSpecError:
        raise HttpError(400, f"node: {node[:80]!r} is not a node name (1-63 letters, digits, "
                             "'.', '_' or '-', starting with a letter or digit)") from None


def _int(request, name, default, minimum, maximum):
    text = request.one(name)
    if text is None:
        return default
    if not text.isascii() or not text.isdigit() or len(text) > 19:
        raise HttpError(400, f"{name}: expected a whole number {minimum}-{maximum}, got {text[:40]!r}")
    value = int(text)
    if not minimum <= value <= maximum:
        raise HttpError(400, f"{name}: {value} is out of range {minimum}-{maximum}")
    return value


def _bool(request, name):
    text = request.one(name)
    if text is None:
        return False
    if text.lower() in _TRUE:
        return True
    if text.lower() in _FALSE:
        return False
    raise HttpError(400, f"{name}: expected true or false, got {text[:40]!r}")


def _without_ok(reply):
    return {key: value for key, value in reply.items() if key != "ok"}
