"""A reload off the loop: the new file loaded in a child, the difference found in slices.

The supervisor starts a ``Reload`` (loadchild.py spawns the process that parses and validates
the file) and goes on ticking.  The child's stream is read without blocking as it arrives
(``read``, from the selector); ``step(deadline)`` takes frames apart and compares them with
the running table until the deadline, so no pass of the loop holds a tick for more than a
few ms:

- the verdict: a rejected file ends the reload at once (``problems``), before any task;
- the tasks: each record is compared with the running one's; an equal record is the same
  task (its bytes are shared, not kept twice), a new or different one is added or changed;
- after the last task, the running names the new file lacks are the removed ones (a slice
  at a time), and each changed task is decoded and compared with ``==``: a record that
  differs while the Task is equal (nothing today, but a record is not a spec) is no change,
  so a daemon never restarts for it.

Then ``ready`` is True and the supervisor applies the difference between two ticks
(Supervisor._apply): acceptance is all or nothing, as before.  A broken stream (the child
died, or wrote garbage) is a rejected reload with a one-line problem.
"""

import itertools
import os
import signal

from torchcore import loadchild, tasktable
from torchcore.errors import TorchcoreError
from torchcore.loadchild import END, OTHERS, TASKS, VERDICT, StreamError

SLICE = 0.003               # seconds of work per step: the loop's tick is never held longer
READ_CHUNK = 1 << 20        # bytes read from the child per readiness event
CHECK_EVERY = 64            # records compared between two looks at the clock
LOAD_TIMEOUT = 600          # seconds a loading child may take before it is given up
BIG = 2000                  # tasks changed, added or removed: above, the table is set aside


class Reload:
    """One reload under way, from the child's first byte to a difference ready to apply."""

    def __init__(self, reason, path, running, clock, planner=None):
        self.reason = reason
        self.planner = planner          # the running one: a big change is set aside (see _aside)
        self.aside = None               # ...in this planner, taken whole by the apply
        self.path = path
        self.running = running          # the running TaskTable (not changed while we look)
        self.clock = clock
        self.stream = loadchild.Stream()
        self.started = clock.monotonic()
        self.callbacks = []             # callback(accepted, problems) of those who asked for it
        self.pid = None
        self.fd = None
        self.eof = False
        self.status = None              # the child's wait status, once reaped
        self.problems = None            # rejected: the messages
        self.ready = False              # accepted and compared: apply it
        self.parse_time = None          # the child's own figure (its verdict says)
        self.cached = False             # the child found the file in the load cache (unchanged)
        self.settings = self.digest = None
        self.notifier = False           # the node's tasks ask for the notifier (see Loaded)
        self.table = tasktable.TaskTable()
        self.others = {}
        self.added, self.changed, self.removed = [], [], []
        self._work = None               # the step under way after the stream: a generator

    # ---- the source -------------------------------------------------------------------------

    def feed_frames(self, frames):
        """The whole stream at once (a load made in this process: tests, the first load)."""
        for data in frames:
            self.stream.feed(data)
        self.eof = True

    def read(self, key=None, mask=None):
        """Read what the child wrote (the selector's callback); returns False at end of file."""
        if self.fd is None or self.eof:
            return False
        try:
            data = os.read(self.fd, READ_CHUNK)
        except BlockingIOError:
            return True
        except OSError as exc:
            data = b""
            self._fail(f"cannot read its stream: {exc.strerror or exc}")
        if not data:
            self.eof = True
            return False
        self.stream.feed(data)
        return True

    def close(self, system=None):
        """Close the pipe; kill the child if it still runs (a reload given up)."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        if self.pid is not None and self.status is None and system is not None:
            system.kill(self.pid, signal.SIGKILL)

    def exited(self, status):
        self.status = status

    # ---- the work ---------------------------------------------------------------------------

    @property
    def done(self):
        return self.ready or self.problems is not None

    def step(self, deadline=None):
        """Work until ``deadline`` (monotonic; None: until done or out of input); True when
        there is more to do with the input already there."""
        clock = self.clock
        try:
            while not self.done:
                if self._work is not None:
                    if not next(self._work, False):
                        self._work = None
                    elif deadline is not None and clock.monotonic() >= deadline:
                        return True
                    continue
                frame = next(self.stream.frames(1), None)
                if frame is None:
                    if self.eof:
                        self.stream.finish()
                    return False
                self._take(*frame)
                if deadline is not None and clock.monotonic() >= deadline:
                    return not self.done
        except StreamError as exc:
            self._fail(str(exc))
        except (ValueError, TypeError, EOFError, KeyError) as exc:  # a record or verdict that
            self._fail(f"garbled stream ({type(exc).__name__}: {exc})")   # does not decode
        return False

    def _fail(self, why):
        status = loadchild.exit_text(self.status)
        self.problems = [f"{self.path}: cannot load: the loading process failed: {why}{status}"]

    def _take(self, kind, value):
        if kind == VERDICT:
            self.parse_time = value.get("parse")
            self.cached = bool(value.get("cached"))
            if not value.get("ok"):
                self.problems = [str(problem) for problem in value.get("problems") or ()] or \
                    [f"{self.path}: rejected"]
                return
            self.settings = loadchild.settings_of(value)
            self.digest = value["digest"]
            self.notifier = bool(value.get("notifier"))
        elif kind == TASKS:
            self._work = self._compare(value)
        elif kind == OTHERS:
            self.others.update(value)
        elif kind == END:
            self._work = self._finish()

    def _compare(self, batch):
        """Each task of a batch against the running one: kept (the same bytes), changed or added."""
        running, running_records, table = self.running, self.running.records, self.table
        for number, (name, data) in enumerate(batch):
            old = running_records.get(name)
            if old == data:
                table.records[name] = old
                if name in running.daemons:
                    table.daemons.add(name)
                elif name in running.reboot:
                    table.reboot.add(name)
                if name in running.once:        # claimed in the fleet database, as before
                    table.once.add(name)
            else:
                table.put(name, data)
                (self.added if old is None else self.changed).append(name)
            if number % CHECK_EVERY == CHECK_EVERY - 1:
                yield True

    def _finish(self):
        """After the last task: the removed names, then the changed ones checked with ==."""
        names = iter(self.running.records)
        new = self.table.records
        while True:
            chunk = list(itertools.islice(names, 2048))
            if not chunk:
                break
            self.removed.extend(name for name in chunk if name not in new)
            yield True
        really = []
        for number, name in enumerate(self.changed):
            if self.running[name] != self.table[name]:
                really.append(name)
            if number % CHECK_EVERY == CHECK_EVERY - 1:
                yield True
        self.changed = really
        if self.planner is not None and sum(self.counts().values()) > BIG:
            yield from self._aside()
        self.ready = self.problems is None

    def _aside(self):
        """A big change: the new schedule table is filled aside, a slice at a time (the apply
        takes it whole); one it cannot hold is a rejected reload, the running one untouched."""
        aside = self.planner.aside()
        try:
            for number, name in enumerate(self.table):
                schedule = self.table.schedule_of(name)
                if schedule is not None:
                    aside.set(name, schedule)
                if number % CHECK_EVERY == CHECK_EVERY - 1:
                    yield True
        except (OverflowError, MemoryError, TorchcoreError) as exc:
            self.problems = [f"{self.path}: cannot apply: {type(exc).__name__}: {exc}"]
            return
        self.aside = aside

    # ---- what the supervisor applies -----------------------------------------------------------

    def loaded(self):
        """The new file as the supervisor keeps it (once ready)."""
        return tasktable.Loaded(self.path, self.settings, self.digest, self.table, self.others,
                                self.notifier)

    def timing(self, clock):
        """What the log says of the time a reload in a child took."""
        if self.pid is None or self.parse_time is None:
            return ""
        how = "read from the load cache" if self.cached else "parsed"
        return (f"; {how} in {self.parse_time:.2f}s, applied "
                f"{clock.monotonic() - self.started:.2f}s after the request")

    def counts(self):
        return {"added": len(self.added), "changed": len(self.changed),
                "removed": len(self.removed)}


def in_process(reason, path, node, running, clock):
    """A Reload whose file was loaded here, in one go (tests; no loop to keep ticking)."""
    reload = Reload(reason, path, running, clock)
    verdict, taskfile = loadchild.verdict_of(path, node)
    if taskfile is None:
        reload.feed_frames([loadchild.frame(VERDICT, _json(verdict))])
    else:
        reload.feed_frames(loadchild.stream_frames(taskfile, node, verdict))
    reload.step()
    return reload


def _json(value):
    import json
    return json.dumps(value).encode()


class Reloader:
    """The supervisor's reloads in children: one at a time; what is asked meanwhile (a signal,
    a file change, ``torchcore reload``) is done by the next, started as this one ends.

    ``host`` is the supervisor: its settings, tasks, node, selector, system and clock are read,
    and ``host.finish_reload(reload)`` applies or rejects a finished one, returning
    (accepted, problems)."""

    def __init__(self, host, stderr=None):
        self.host = host
        self.stderr = stderr
        self.current = None
        self.spare = None           # (pid, stream fd, go fd) of a loading child waiting to go
        self.pending = None         # (reason, [callbacks]) of the next reload
        self.more = False           # the current reload has input it has not taken yet

    def request(self, reason, callback=None):
        """Reload (now, or after the one under way); ``callback(accepted, problems)`` then.
        A small file (loadchild.INLINE_BYTES), or any without children (tests), is loaded by
        ``host.reload`` at once."""
        host = self.host
        if self.current is None and (not host.system.loads_in_child or
                                     loadchild.small(host.settings.path)):
            result = host.reload(reason)
            if callback is not None:
                callback(*result)
            return
        if host.stopping:               # no slice of it would run: said at once
            if callback is not None:
                callback(False, ["torchcore is stopping; the reload was not applied"])
            return
        if self.current is None:
            self._begin(reason, [callback] if callback else [])
            return
        if self.pending is None:
            self.pending = (reason, [])
        self.pending = (self.pending[0], self.pending[1] + ([callback] if callback else []))

    def _begin(self, reason, callbacks):
        host = self.host
        reload = Reload(reason, host.settings.path, host.tasks, host.clock, host.planner)
        reload.callbacks = callbacks
        self.current = reload
        try:
            reload.pid, reload.fd = self._go() or \
                host.system.spawn_loader(reload.path, host.node, self.stderr)[:2]
        except OSError as exc:
            reload.problems = [(f"{reload.path}: cannot load: cannot start the loading "
                                f"process: {exc.strerror or exc}")]
            self._end()
            return
        host.selector.register(reload.fd, 1, self._readable)    # selectors.EVENT_READ

    def prepare_spare(self):
        """Have a loading child wait, its modules loaded, for the next reload (it then starts
        at once, not after an interpreter's start-up: a reload storm keeps up)."""
        if self.spare is None:
            try:
                self.spare = self.host.system.spawn_loader(
                    self.host.settings.path, self.host.node, self.stderr, spare=True)
            except OSError:
                self.spare = None       # the next reload starts a child of its own

    def _go(self):
        """(pid, stream fd) of the spare, told to go; None if there is none (or it died)."""
        spare, self.spare = self.spare, None
        if spare is None:
            return None
        pid, fd, go = spare
        try:
            os.write(go, b"g")
        except OSError:
            os.close(fd)
            return None
        finally:
            os.close(go)
        return pid, fd

    def _drop_spare(self, kill=False):
        """``kill``: at shutdown, SIGKILL too: a spare still starting (its imports, on a loaded
        machine) would read the end of file only after the daemon had gone, outliving it."""
        if self.spare is not None:
            pid, fd, go = self.spare
            self.spare = None
            os.close(fd)
            os.close(go)            # end of file: it exits
            if kill:
                try:
                    self.host.system.kill(pid, signal.SIGKILL)
                except OSError:
                    pass

    def _readable(self, key=None, mask=None):
        reload = self.current
        if reload is not None and not reload.read():
            self._unregister(reload)
        self.more = True

    def owns(self, pid):
        return self.current is not None and self.current.pid == pid

    def exited(self, pid, status):
        if self.owns(pid):
            self.current.exited(status)

    def wait(self, wall):
        """The longest the loop may sleep with work left here: 0 now, unless the second
        boundary is too near for a slice (then no limit: the tick goes first)."""
        if self.current is None or not self.more:
            return None
        return 0.0 if int(wall) + 1 - wall > 2 * SLICE + 0.001 else None

    def work(self, budget=SLICE):
        """One slice of the reload under way; applies or rejects it when it is done."""
        reload = self.current
        if reload is None:
            return
        now = self.host.clock.monotonic()
        self.more = reload.step(now + budget)
        if not reload.done and now - reload.started > LOAD_TIMEOUT:
            reload._fail(f"no verdict after {LOAD_TIMEOUT:.0f}s (the file stays as it was)")
        if reload.done:
            self._end()

    def _end(self):
        reload, self.current, self.more = self.current, None, False
        self._unregister(reload)
        reload.close(self.host.system)
        accepted, problems = self.host.finish_reload(reload)
        for callback in reload.callbacks:
            callback(accepted, problems)
        if self.pending is not None:
            (reason, callbacks), self.pending = self.pending, None
            self._begin(reason, callbacks)
        elif not loadchild.small(reload.path):
            self.prepare_spare()

    def _unregister(self, reload):
        if reload.fd is not None:
            try:
                self.host.selector.unregister(reload.fd)
            except (KeyError, ValueError):
                pass

    def cancel(self, why):
        """Give up the reload under way and those asked for (shutdown): each asker is told."""
        self._drop_spare(kill=True)
        callbacks = []
        if self.current is not None:
            reload, self.current = self.current, None
            self._unregister(reload)
            reload.close(self.host.system)
            callbacks += reload.callbacks
        if self.pending is not None:
            callbacks += self.pending[1]
            self.pending = None
        for callback in callbacks:
            callback(False, [why])
