"""Loading the task file in a process of its own, so the supervisor never parses it.

``python -m torchcore.loadchild PATH NODE`` reads, parses and validates the task file and this
node's problems (config.load, config.node_problems, local_tasks), then writes to its stdout:

    V  the verdict (JSON): accepted, with the digest, the settings and the counts; or rejected,
       with the problems, exactly the messages a reload in the supervisor gave
    T  the node's tasks, a batch at a time: marshal (version 2) of [(name, record), ...]
       (records: see tasktable.py)
    O  the file's other tasks, a batch at a time: [(name, why it does not run here), ...]
    E  the end (JSON): the counts again

Each frame is one kind byte, a 4-byte big-endian length and the payload.  A stream that ends
early, or that does not parse, is a load that failed (``StreamError``): a rejected reload,
never a traceback.  ``Stream`` parses frames as they arrive (the supervisor reads the pipe
without blocking, see reloading.py); ``load_for_node`` runs a child and waits for it (start).

The child is a fresh interpreter started with posix_spawn: forking a supervisor of hundreds of
MB would cost it tens of ms of page-table copying in its loop.
"""

import base64
import json
import marshal
import os
import pickle
import struct
import sys
import time

from torchcore import loadcache

INLINE_BYTES = 32 << 10     # a file this small is loaded in the process that asks: a child
                            # would cost more than its parse (a few ms) and its garbage
HEADER = struct.Struct(">cI")
MAX_FRAME = 256 << 20
BATCH = 1000                # tasks per T frame: a few hundred µs to take apart
VERDICT, TASKS, OTHERS, END = b"V", b"T", b"O", b"E"
KINDS = (VERDICT, TASKS, OTHERS, END)


class StreamError(Exception):
    """The loading process's stream is broken (it died, or wrote what is not a stream)."""


def frame(kind, payload):
    return HEADER.pack(kind, len(payload)) + payload


# ---- the child ------------------------------------------------------------------------------

def node_argument(node):
    return json.dumps({"hostname": node.hostname, "addresses": [str(a) for a in node.addresses]})


def _node(text):
    import ipaddress

    from torchcore.node import Node
    fields = json.loads(text)
    return Node(addresses=tuple(ipaddress.ip_address(a) for a in fields["addresses"]),
                hostname=fields["hostname"])


def verdict_of(path, node, data=None, started=None):
    """(verdict dict, TaskFile or None): load and check the file as a reload does (``data``:
    its bytes, read already)."""
    from torchcore import config
    from torchcore.errors import ConfigError

    started = time.perf_counter() if started is None else started
    taskfile, problems = None, []
    try:
        taskfile = config.load(path) if data is None else config.loads(data, path)
        problems = config.node_problems(taskfile, node)
        if problems:
            raise ConfigError(problems)
    except ConfigError as exc:
        problems = exc.problems
    except OSError as exc:
        problems = [f"{path}: cannot read: {exc.strerror or exc}"]
    except Exception as exc:
        problems = [f"{path}: cannot load: {type(exc).__name__}: {exc}"]
    parse = time.perf_counter() - started
    if problems:
        return {"ok": False, "problems": list(problems), "parse": parse}, None
    from torchcore import tasktable
    return {"ok": True, "digest": taskfile.digest, "parse": parse,
            "settings": base64.b64encode(pickle.dumps(taskfile.settings)).decode(),  # exact: its
            "notifier": tasktable.asks_for_notifier(taskfile, node)}, taskfile   # targets too


def stream_frames(taskfile, node, verdict):
    """The frames of an accepted file, verdict first."""
    from torchcore.loadsplit import Part
    return frames_of(verdict, Part.of_tasks(taskfile.path, taskfile.settings, taskfile.tasks,
                                            node))


def frames_of(verdict, part):
    """The frames of an accepted file's loadsplit.Part, verdict first."""
    from torchcore import tasktable

    local, others = part.local, part.others
    counts = {"tasks": len(local), "others": len(others)}
    yield frame(VERDICT, json.dumps({**verdict, **counts}).encode())
    for start in range(0, len(local), BATCH):
        yield frame(TASKS, marshal.dumps(local[start:start + BATCH], tasktable.MARSHAL_VERSION))
    for start in range(0, len(others), BATCH * 4):
        yield frame(OTHERS, marshal.dumps(others[start:start + BATCH * 4],
                                          tasktable.MARSHAL_VERSION))
    yield frame(END, json.dumps(counts).encode())


def load_parts(path, node, data, started=None, split_min=None):
    """(verdict, settings, loadsplit.Part) of the file whose bytes are ``data`` (None:
    unreadable); settings and part are None when it is rejected.  A big file is loaded in
    two halves at once (loadsplit.py) when it can be, in one piece (verdict_of) otherwise:
    the same verdict and tasks either way."""
    from torchcore import loadsplit
    from torchcore.yamlread import MAX_FILE_BYTES

    started = time.perf_counter() if started is None else started
    split_min = loadsplit.SPLIT_MIN_BYTES if split_min is None else split_min
    if data is not None and split_min <= len(data) <= MAX_FILE_BYTES:
        try:
            verdict, settings, part = _split_verdict(path, node, data, started, split_min)
        except Exception:   # whatever it is, the one-piece load meets it and says what it is
            verdict = None
        if verdict is not None:
            return verdict, settings, part
    verdict, taskfile = verdict_of(path, node, data, started)
    if taskfile is None:
        return verdict, None, None
    return verdict, taskfile.settings, loadsplit.Part.of_tasks(
        taskfile.path, taskfile.settings, taskfile.tasks, node)


def _split_verdict(path, node, data, started, split_min):
    """load_parts' two halves; (None, None, None) when the file is not loaded so."""
    import hashlib

    from torchcore import config, loadsplit

    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        return None, None, None
    loaded = loadsplit.load(path, node, text, split_min)
    if loaded is None:
        return None, None, None
    settings, part = loaded
    problems = config.switch_problems(path, part.switches, settings, node)
    parse = time.perf_counter() - started
    if problems:
        return {"ok": False, "problems": list(problems), "parse": parse}, None, None
    return {"ok": True, "digest": hashlib.sha256(data).hexdigest(), "parse": parse,
            "settings": base64.b64encode(pickle.dumps(settings)).decode(),
            "notifier": part.notifier}, settings, part


def main(argv):
    import gc
    import signal
    signal.signal(signal.SIGINT, signal.SIG_IGN)    # a ^C is the supervisor's to act on
    gc.disable()    # a parse makes millions of objects and no cycle: the collector's passes
                    # over them took half of a 100,000-task load, for nothing to free
    out = sys.stdout.fileno()
    try:
        if argv[0] == "--spare":    # ready ahead: its modules loaded, it waits for a byte
            argv = argv[1:]
            from torchcore import config, loadsplit, tasktable  # noqa: F401 (ahead: the point)
            if not os.read(0, 1):
                return 0            # not needed after all (the supervisor stops)
        path, node = argv[0], _node(argv[1])
        started = time.perf_counter()
        data, state_dir = _read_for_cache(path)
        cache_key = None if state_dir is None else loadcache.key(data, path, argv[1])
        if cache_key is not None and _from_cache(out, path, node, state_dir, cache_key, started):
            return 0
        verdict, settings, part = load_parts(path, node, data, started)
        frames = list(frames_of(verdict, part)) if part is not None else \
            [frame(VERDICT, json.dumps(verdict).encode())]
        for chunk in frames:
            _write_all(out, chunk)
        if cache_key is not None and part is not None and settings.state_dir == state_dir:
            _hang_up(out)           # the load is over for the supervisor: keep it, off its clock
            kept = json.loads(frames[0][HEADER.size:])
            kept.pop("parse", None)
            loadcache.store(state_dir, cache_key, kept, frames[1:], part.checks(settings))
    except BrokenPipeError:
        return 1        # the supervisor gave this load up
    return 0


def _read_for_cache(path):
    """(the file's bytes, the state_dir its settings name) for a file big enough for the load
    cache; (bytes or None, None) otherwise (None: unreadable, the load says why)."""
    from torchcore import config
    from torchcore.errors import ConfigError

    try:
        data = config.read_file(path)
    except ConfigError:
        return None, None
    if len(data) <= loadcache.CACHE_MIN_BYTES or len(data) > config.MAX_FILE_BYTES:
        return data, None
    return data, config.peek_settings(path).state_dir


def _from_cache(out, path, node, state_dir, cache_key, started):
    """Stream the load kept for ``cache_key`` if it is there and still holds; False if not."""
    hit = loadcache.lookup(state_dir, cache_key)
    if hit is None:
        return False
    verdict, checks, rest = hit
    try:
        settings = settings_of(verdict)
    except Exception:
        return False
    if not loadcache.still_valid(path, settings, checks, node):
        return False
    verdict = {**verdict, "parse": time.perf_counter() - started, "cached": True}
    _write_all(out, frame(VERDICT, json.dumps(verdict).encode()))
    _write_all(out, rest)
    return True


def _hang_up(fd):
    """Close our end of the stream (the reader sees its end) and keep the descriptor number."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)


def _write_all(fd, data):
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


# ---- the supervisor's side ------------------------------------------------------------------

def spawn(path, node, stderr=None, spare=False):
    """Start a loading process for ``path``; returns (pid, the read end of its stdout,
    non-blocking, and None).  A ``spare`` one loads its modules and waits until a byte is
    written to the third value, the write end of its stdin (end of file: it exits unused):
    a reload then starts without an interpreter's start-up."""
    read_fd, write_fd = os.pipe()
    go_r, go_w = os.pipe() if spare else (None, None)
    actions = [(os.POSIX_SPAWN_DUP2, write_fd, 1),
               (os.POSIX_SPAWN_DUP2, go_r, 0) if spare else
               (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0)]
    if stderr is not None:
        actions.append((os.POSIX_SPAWN_OPEN, 2, stderr, os.O_WRONLY | os.O_APPEND, 0))
    argv = [sys.executable, "-m", "torchcore.loadchild"] + (["--spare"] if spare else [])
    try:
        pid = os.posix_spawn(sys.executable, [*argv, path, node_argument(node)], os.environ,
                             file_actions=actions, setsigdef=_SIGNALS)
    except BaseException:
        for fd in (read_fd, go_w):
            if fd is not None:
                os.close(fd)
        raise
    finally:
        for fd in (write_fd, go_r):
            if fd is not None:
                os.close(fd)
    os.set_blocking(read_fd, False)
    return pid, read_fd, go_w


def _default_signals():
    import signal
    return [signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR2, signal.SIGCHLD,
            signal.SIGPIPE]


_SIGNALS = _default_signals()


class Stream:
    """The frames of one load as they arrive: ``feed`` bytes, take ``frames()``; ``finish()``
    at end of file (StreamError if the stream stopped before its end frame)."""

    def __init__(self):
        self.buffer = bytearray()
        self.ended = False          # the END frame was seen
        self.verdict = None
        self.counts = {"tasks": 0, "others": 0}

    def feed(self, data):
        self.buffer += data

    def frames(self, limit=None):
        """Complete frames buffered (at most ``limit``): (kind, decoded payload)."""
        taken = 0
        while limit is None or taken < limit:
            if len(self.buffer) < HEADER.size:
                return
            kind, length = HEADER.unpack_from(self.buffer)
            if kind not in KINDS or length > MAX_FRAME or self.ended or \
                    (self.verdict is None) != (kind == VERDICT):
                raise StreamError(f"garbled stream (frame {kind!r} of {length} bytes)")
            if len(self.buffer) < HEADER.size + length:
                return
            payload = bytes(self.buffer[HEADER.size:HEADER.size + length])
            del self.buffer[:HEADER.size + length]
            taken += 1
            yield kind, self._decode(kind, payload)

    def _decode(self, kind, payload):
        try:
            if kind in (VERDICT, END):
                value = json.loads(payload)
                if not isinstance(value, dict):
                    raise ValueError("not an object")
            else:
                value = marshal.loads(payload)
                second = bytes if kind == TASKS else str
                if not isinstance(value, list) or not all(
                        type(item) is tuple and len(item) == 2 and type(item[0]) is str
                        and type(item[1]) is second for item in value):
                    raise ValueError("not a list of pairs")
        except (ValueError, EOFError, TypeError) as exc:
            raise StreamError(f"garbled stream ({kind!r} frame: {exc})") from None
        if kind == VERDICT:
            self.verdict = value
        elif kind == END:
            if value != self.counts:
                raise StreamError(f"the stream ended with {value}, after {self.counts}")
            self.ended = True
        else:
            self.counts["tasks" if kind == TASKS else "others"] += len(value)
        return value

    def finish(self):
        """End of file: StreamError unless the stream was whole (a rejection is whole too)."""
        if self.buffer:
            raise StreamError("the stream stopped in the middle of a frame")
        if self.verdict is None:
            raise StreamError("the stream stopped before its verdict")
        if self.verdict.get("ok") and not self.ended:
            raise StreamError("the stream stopped before its last task")


def load_for_node(path, node, stderr=None):
    """The task file as a tasktable.Loaded, loaded and checked in a child (start-up: blocks,
    taking the tasks as they come).  ConfigError with the problems if the file is rejected,
    as config.load_for_node; a child that fails is one line too, never a traceback."""
    from torchcore.errors import ConfigError

    if small(path):
        from torchcore import config, tasktable
        return tasktable.Loaded.of_taskfile(config.load_for_node(path, node), node)
    pid, fd, _ = spawn(path, node, stderr)
    os.set_blocking(fd, True)
    stream, collect, failure, status = Stream(), Collector(), None, None
    try:
        while data := os.read(fd, 1 << 20):
            stream.feed(data)
            for kind, value in stream.frames():
                collect.take(kind, value)
        stream.finish()
    except StreamError as exc:
        failure = str(exc)
    except BaseException:
        os.kill(pid, 9)
        raise
    finally:
        os.close(fd)
        whole = failure is None and stream.ended    # the child may still keep it (loadcache):
        try:                                        # reaped when it ends, not waited for
            status = os.waitpid(pid, os.WNOHANG if whole else 0)[1]
        except ChildProcessError:
            pass
    if failure is not None:
        raise ConfigError(f"{path}: cannot load: the loading process failed: {failure}"
                          f"{exit_text(status)}")
    if not stream.verdict["ok"]:
        raise ConfigError(stream.verdict["problems"])
    return collect.loaded(path)


def small(path):
    """True if the file at ``path`` is loaded in-process (see INLINE_BYTES); a file that
    cannot be seen is too (its load says why, at once)."""
    try:
        return os.stat(path).st_size <= INLINE_BYTES
    except OSError:
        return True


def exit_text(status):
    if status is None:
        return ""
    code = os.waitstatus_to_exitcode(status)
    return f" (killed by signal {-code})" if code < 0 else f" (exit status {code})"


class Collector:
    """A whole stream gathered into a tasktable.Loaded (start-up, tests)."""

    def __init__(self):
        from torchcore.tasktable import TaskTable
        self.table = TaskTable()
        self.others = {}
        self.verdict = None

    def take(self, kind, value):
        if kind == VERDICT:
            self.verdict = value
        elif kind == TASKS:
            for name, data in value:
                self.table.put(name, data)
        elif kind == OTHERS:
            self.others.update(value)

    def loaded(self, path):
        from torchcore.tasktable import Loaded
        loaded = Loaded(path, settings_of(self.verdict), self.verdict["digest"], self.table,
                        self.others, self.verdict.get("notifier", False))
        loaded.cached = bool(self.verdict.get("cached"))
        return loaded


def settings_of(verdict):
    """The Settings of an accepted verdict (pickled by our own child: the same code's)."""
    return pickle.loads(base64.b64decode(verdict["settings"]))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
