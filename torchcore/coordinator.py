"""The fleet side of the seam (seam.py) the supervisor asks before every launch.

``FleetCoordinator`` (with ``settings.fleet``) says yes at once to `run: each` tasks too; a
`run: once` run starts only with a claim won in the fleet database (claims.py).  The claims are
made by a child process, ``torchcore: fleet claims`` (claimer.py), over a non-blocking socket
in the supervisor's selector, so the loop never waits on the network:

- ``ahead(second, tasks)``: the starter is preparing ``second``; its `once` tasks are sent to
  be claimed, batched (the look-ahead prepares such seconds ``takeover`` + 1 s ahead);
- the answers come back: a won claim is prepared at once (``Starter.prepare_claimed``), a claim
  won late (an expired one taken over) is started at once (``Starter.start_claimed``); a start
  whose claim was taken over before it was confirmed is stopped (``Starter.stop_claimed``);
- ``claim(task, second)`` at the tick: True (won: the start is confirmed), False (lost: another
  node runs it; nothing recorded), or the reason the second is skipped (no answer by the
  tick: "fleet database unreachable" — `once` tasks fail closed);
- ``env(task, second)``: ``TORCHCORE_FENCE`` and ``TORCHCORE_SCHEDULED_AT`` for a won run;
- ``started(run)`` and ``ended(run)``: the run holds its slot of the task's fleet-wide ``max``
  under a lease the claimer renews; a claim won without a free slot is skipped, "fleet max N
  reached"; a lease that cannot be renewed stops the run first (``Starter.stop_claimed``);
- a `run: once` daemon starts (``claim(task, None)``) only in a slot the claimer took for this
  node (it says so: ``Starter.tend_daemons`` then starts it); a crashed instance restarts in the
  same slot, a stopped one frees it.
"""

import logging
import os
import selectors
import signal
import socket
import subprocess
import sys

from torchcore.seam import LocalCoordinator
from torchcore.states import RunState

log = logging.getLogger("torchcore")

ASKED, LOST, SKIPPED, LATE_ASK = "asked", "lost", "skipped", "late-ask"
STARTING = "starting"   # its tick came before the claims process first reached the database
KEEP = 120              # seconds a second's claim state is kept after it
RESTART_FIRST, RESTART_MAX = 1.0, 30.0
MAX_PENDING = 1 << 20   # bytes waiting for the claimer; beyond, it is stuck: restarted


class _Won:
    """A claim this node won: its token, then its slot (or full), then its start."""

    __slots__ = ("fence", "slot", "full", "late_at", "start_now", "started")

    def __init__(self, fence, late_at=None, start_now=False):
        self.fence, self.late_at, self.start_now = fence, late_at, start_now
        self.slot, self.full, self.started = None, False, False


class FleetCoordinator(LocalCoordinator):
    """Claims for `run: once` tasks through the claimer child (see the module docstring)."""

    def __init__(self, clock, node_name, stderr=None, argv=None):
        self.clock = clock
        self.node_name = node_name
        self.stderr = stderr            # a path the claimer's stderr (its log) goes to
        self.argv = argv or [sys.executable, "-m", "torchcore.claimer"]
        self.hello = None               # what the claimer is told: url, node, takeover, lease
        self.once = set()
        self.selector = self.starter = None
        self.proc = self.sock = None
        self.pending = b""              # bytes not yet taken by the socket
        self.buffer = b""
        self.restart_at = 0.0           # monotonic
        self.backoff = RESTART_FIRST
        self.state = {}                 # (name, second) -> ASKED, LOST, SKIPPED, LATE_ASK
        self.won = {}                   # (name, second) -> _Won
        self.daemon_specs = []          # what the claimer is told of the `run: once` daemons
        self.once_specs = []            # ... and of the other `run: once` tasks (claimloss.py)
        self.daemon_slots = {}          # name -> {fence: [-1 - slot, run id or None]}
        self.daemon_pick = None         # (name, fence) the daemon run being started takes
        self.daemon_leaving = set()     # fences of instances stopped as their lease cannot be
        #                                 kept: their slot freed at their end, not restarted in
        self.adopting = {}              # run id -> what the claims process is told (claimadopt.py)
        self.misfire_grace = 60
        self.db_down = None
        from torchcore import holders
        self.known = holders.Known()    # the holders of the `once` tasks, for status
        self.connected = False          # the claims process said "db" (up or down) once

    # ---- the supervisor's side ---------------------------------------------------------------

    def use(self, settings, tasks):
        from torchcore import fleetspec

        fleet = settings.fleet
        self.misfire_grace = settings.misfire_grace
        self.once = set(getattr(tasks, "once", ()))
        daemons = sorted(self.once & set(getattr(tasks, "daemons", ())))
        self.daemon_specs = [[name, [str(n) for n in tasks[name].ips], list(tasks[name].hosts),
                              tasks[name].max, tasks[name].kill_grace] for name in daemons]
        self.once_specs = [[name, tasks[name].max, settings.misfire_grace
                            if tasks[name].on_node_loss == "rerun" else None]
                           for name in sorted(self.once - set(daemons))]
        for name in [name for name in self.daemon_slots if name not in daemons]:
            slots = self.daemon_slots[name]     # no longer here: a slot is freed when its
            for fence, (second, run_id) in list(slots.items()):     # instance has ended
                if run_id is None:
                    del slots[fence]
                    self._send({"end": [[name, second, fence]]})
        if fleet is None:
            self.hello = None
            return
        hello = {"url": fleetspec.database_url(fleet, os.environ), "node": self.node_name,
                 "takeover": fleet.takeover, "lease": fleet.lease}
        if hello != self.hello:
            self.hello = hello
            if self.proc is not None:
                self._send({"hello": hello})
        if self.once and self.proc is None:
            self._start()           # connected before the first claim is due
        elif self.proc is not None:
            self._send({"daemons": self.daemon_specs})
            self._send({"watch": sorted(self.once)})
            self._send({"once": self.once_specs})

    def attach(self, selector, starter):
        self.selector, self.starter = selector, starter

    def ahead(self, second, tasks):
        asked = []
        for task in tasks:
            key = (task.name, second)
            if key not in self.state:
                self.state[key] = ASKED
                asked.append(task)
        if asked:
            self._ask(second, asked, now=False)
        self._starting_unanswered(self.clock.time())
        self._forget(second)

    def claim(self, task, second):
        if task.run == "once" and task.type == "daemon":
            return self._daemon_slot(task)
        if task.run != "once" or second is None:
            return True             # each, and manual runs: this node's own business
        from torchcore import claims

        key = (task.name, second)
        won = self.won.get(key)
        if won is not None:
            if won.started:         # started already: an answer after its second started it
                return False        # before its tick (start_claimed), and the tick comes now
            if won.full:
                del self.won[key]
                return f"fleet max {task.max} reached"
            if won.slot is None:    # no slot answered by the tick
                self._drop_won(key)
                self.state[key] = SKIPPED
                return claims.UNREACHABLE
            if self.clock.time() > (won.late_at or second) + claims.FIRE_WINDOW:
                self._drop_won(key)
                return False        # too late to start: the claim expires, someone takes it over
            return True
        state = self.state.get(key)
        if state == ASKED and self.hello is not None and not self.connected:
            self.state[key] = STARTING  # the claims process is starting: its answer is
            return False                # waited for (a won claim starts late), not a skip
        if state == ASKED and self.hello is not None:
            self.state[key] = SKIPPED
            return claims.UNREACHABLE
        if state is None and self.hello is not None:
            self.state[key] = LATE_ASK  # not asked ahead (a start, a reload): asked now
            self._ask(second, [task], now=True)
        return False

    def _daemon_slot(self, task):
        """A `run: once` daemon starts only in a slot this node holds and no run of it uses."""
        for fence, (_, run_id) in self.daemon_slots.get(task.name, {}).items():
            if run_id is None:
                self.daemon_pick = (task.name, fence)
                return True
        return False

    def env(self, task, second):
        if self.daemon_pick and self.daemon_pick[0] == task.name and second is None:
            return (("TORCHCORE_FENCE", str(self.daemon_pick[1])),)
        won = self.won.get((task.name, second))
        if won is None:
            return ()
        return (("TORCHCORE_FENCE", str(won.fence)), ("TORCHCORE_SCHEDULED_AT", str(second)))

    def started(self, run):
        if run.task.run != "once" or run.state == RunState.PREPARED:
            return
        if run.task.type == "daemon":
            self._daemon_started(run)
            return
        won = self.won.get((run.task.name, run.scheduled))
        if won is not None:         # the start confirmed; later, what the run is now
            self._send({"hold" if won.started else "start": [self._hold(run, won)]})
            if not won.started:
                self.known.ran(run.task.name, run.scheduled, won.fence, self.node_name,
                               self.clock.time())
            won.started = True

    def _daemon_started(self, run):
        slots = self.daemon_slots.get(run.task.name, {})
        fence = next((f for f, (_, r) in slots.items() if r == run.run_id), None)
        if fence is None and self.daemon_pick and self.daemon_pick[0] == run.task.name \
                and self.daemon_pick[1] in slots and slots[self.daemon_pick[1]][1] is None:
            fence = self.daemon_pick[1]
            slots[fence][1] = run.run_id
        self.daemon_pick = None
        if fence is not None:
            self._send({"hold": [[run.task.name, slots[fence][0], fence, run.pgid,
                                  run.task.kill_grace, run.executor_pid]]})

    def ended(self, run):
        if run.task.run == "once" and run.task.type == "daemon":
            slots = self.daemon_slots.get(run.task.name, {})
            for fence, entry in list(slots.items()):
                if entry[1] == run.run_id:
                    if self.starter.stopping_now and self.daemon_specs:
                        self.daemon_specs = []      # stopping: no slot taken again (the
                        self._send({"daemons": []})     # freed one's NOTIFY wakes it too)
                    if self.starter.stopping_now or run.task.name not in self.once:
                        del slots[fence]            # a clean stop hands it over at once
                        self._send({"end": [[run.task.name, entry[0], fence]]})
                    else:
                        entry[1] = None             # restarted here, in the same slot
                        if fence in self.daemon_leaving:    # ... unless it was stopped as its
                            self.daemon_leaving.discard(fence)  # lease cannot be kept: freed
                            del slots[fence]
                            self._send({"end": [[run.task.name, entry[0], fence]]})
            return
        key = (run.task.name, run.scheduled)
        won = self.won.get(key)
        if won is not None and won.started:
            del self.won[key]
            self._send({"end": [[run.task.name, run.scheduled, won.fence]]})

    def adopted(self, runs):
        """Runs a killed supervisor left behind, adopted (adopt.py): the `run: once` ones keep
        their fleet lease, found by the claims process (claimadopt.py); one whose lease is gone
        is killed (it may be lost, and re-run elsewhere)."""
        for run in runs:
            task = run.task
            if getattr(task, "run", None) != "once" or run.manual or \
                    (task.type != "daemon" and run.scheduled is None):
                continue
            self.adopting[run.run_id] = [run.run_id, task.name,
                                         None if task.type == "daemon" else run.scheduled,
                                         run.pgid, task.kill_grace, run.executor_pid]
        if self.adopting:
            self._send({"adopt": list(self.adopting.values())})

    def _adopted(self, run_id, name, key, fence):
        self.adopting.pop(run_id, None)
        run = self.starter.table.get(run_id)
        if run is None:                 # it ended meanwhile: its slot freed
            self._send({"end": [[name, key, fence]]})
        elif key < 0:
            self.daemon_slots.setdefault(name, {})[fence] = [key, run_id]
        else:
            won = self.won[(name, key)] = _Won(fence)
            won.slot, won.started = -1, True

    def _unheld(self, run_id):
        self.adopting.pop(run_id, None)
        run = self.starter.table.get(run_id)
        if run is not None:
            self.starter.signal_run(run, signal.SIGKILL, "its fleet lease could not be kept")

    def _drop_won(self, key):
        """A won claim this node does not start: its slot (if it took one) freed at once."""
        won = self.won.pop(key)
        self._send({"end": [[key[0], key[1], won.fence]]})

    def _hold(self, run, won):
        return [run.task.name, run.scheduled, won.fence, run.pgid, run.task.kill_grace,
                run.executor_pid]

    def exited(self, pid, status):
        if self.proc is None or pid != self.proc.pid:
            return False
        self.proc.returncode = os.waitstatus_to_exitcode(status)
        log.error("fleet claims process (pid %d) ended (status %s); restarting it in %.0fs",
                  pid, self.proc.returncode, self.backoff)
        self._drop()
        self.restart_at = self.clock.monotonic() + self.backoff
        self.backoff = min(RESTART_MAX, self.backoff * 2)
        return True

    def close(self):
        """SIGTERM (it handles what was sent, the ends of the last runs, then exits), then the
        socket closed."""
        proc = self.proc
        if proc is not None:
            try:
                proc.send_signal(signal.SIGTERM)
                proc.wait(2)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            except (OSError, ChildProcessError):
                pass
        self._drop()

    # ---- the claimer child ------------------------------------------------------------------

    def _ask(self, second, tasks, now):
        self._send({"claim": second, "now": now, "tasks": [
            [task.name, [str(network) for network in task.ips], list(task.hosts), task.max]
            for task in tasks]})

    def _start(self):
        if self.hello is None or self.selector is None:
            return False
        if self.clock.monotonic() < self.restart_at:
            return False
        parent, child = socket.socketpair()
        err = None
        try:
            if self.stderr is not None:
                err = os.open(self.stderr, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC,
                              0o600)
            argv = list(self.argv)
            if self.stderr is not None and self.stderr != os.devnull:
                argv += ["--log-file", self.stderr]     # followed across logrotate's moves
            self.proc = subprocess.Popen(argv, stdin=child.fileno(), stdout=subprocess.DEVNULL,
                                         stderr=err, close_fds=True)
        except Exception as exc:
            parent.close()
            log.error("cannot start the fleet claims process: %s: %s", type(exc).__name__, exc)
            self.restart_at = self.clock.monotonic() + self.backoff
            return False
        finally:
            child.close()
            if err is not None:
                os.close(err)
        parent.setblocking(False)
        self.sock = parent
        self.started_at = self.clock.monotonic()
        self.connected = False
        self.selector.register(parent, selectors.EVENT_READ, self._ready)
        self.pending = self.buffer = b""
        log.info("fleet claims process started, pid %d", self.proc.pid)
        self._send({"hello": self.hello})
        self._tell_leases()
        if self.daemon_specs:
            self._send({"daemons": self.daemon_specs})
        self._send({"watch": sorted(self.once)})
        if self.once_specs:
            self._send({"once": self.once_specs})
        if self.adopting:
            self._send({"adopt": list(self.adopting.values())})
        return True

    def _tell_leases(self):
        """A (re)started claims process is told the leases of the runs under way."""
        held = [self._hold(run, won) for run in self.starter.table
                if (won := self.won.get((run.task.name, run.scheduled))) and won.started]
        for run in self.starter.table:
            for fence, (second, run_id) in self.daemon_slots.get(run.task.name, {}).items():
                if run_id == run.run_id:
                    held.append([run.task.name, second, fence, run.pgid, run.task.kill_grace,
                                 run.executor_pid])
        if held:
            self._send({"hold": held})

    def _drop(self):
        if self.sock is not None:
            try:
                self.selector.unregister(self.sock)
            except (KeyError, ValueError):
                pass
            self.sock.close()
        self.sock = self.proc = None
        self.pending = self.buffer = b""

    def _send(self, message):
        from torchcore import claims

        if self.proc is None and not self._start():
            return
        if self.sock is None:
            return          # it closed its end: its exit is reaped, and it is started again
        self.pending += claims.encode(message)
        self._flush()

    def _flush(self):
        try:
            sent = self.sock.send(self.pending)
        except BlockingIOError:
            sent = 0
        except OSError:
            return          # it is gone: its exit is reaped and it is started again
        self.pending = self.pending[sent:]
        if len(self.pending) > MAX_PENDING:
            log.error("the fleet claims process does not read its claims; restarting it")
            os.kill(self.proc.pid, signal.SIGKILL)
            self.pending = b""
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if self.pending else 0)
        self.selector.modify(self.sock, events, self._ready)

    def _ready(self, key=None, mask=selectors.EVENT_READ):
        if mask & selectors.EVENT_WRITE and self.pending:
            self._flush()
        if not mask & selectors.EVENT_READ or self.sock is None:
            return
        from torchcore import claims

        chunks = []
        while True:
            try:
                chunk = self.sock.recv(1 << 16)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                chunk = b""
            if not chunk:
                if self.selector is not None and self.sock is not None:
                    self.selector.unregister(self.sock)     # its exit is reaped
                    self.sock.close()
                    self.sock = None
                break
            chunks.append(chunk)
        messages, self.buffer = claims.decode_lines(self.buffer, b"".join(chunks))
        for message in messages:
            self._answer(message)

    def _answer(self, message):
        now = self.clock.time()
        self._starting_unanswered(now)
        if "won" in message:
            late = bool(message.get("late"))
            for name, second, fence in message["won"]:
                self._won(name, int(second), int(fence), late, now)
            for name, second in message.get("lost") or ():
                if self.state.get((name, second)) in (ASKED, LATE_ASK, STARTING):
                    self.state[(name, second)] = LOST
        elif "slots" in message:
            for name, second, fence, slot in message["slots"]:
                self._slot(name, int(second), int(fence), slot)
            for name, second, fence in message.get("full") or ():
                self._slot(name, int(second), int(fence), None)
        elif "stop" in message or "revoked" in message:
            signum = signal.SIGKILL if message.get("kill") else signal.SIGTERM
            for name, second, fence in message.get("stop") or message.get("revoked"):
                if second < 0:
                    self._daemon_lost(name, fence, signum)
                    continue
                won = self.won.get((name, int(second)))
                if won is not None and won.fence == fence:
                    self.starter.stop_claimed(name, int(second), signum)
        elif "daemon" in message:
            for name, second, fence in message["daemon"]:
                if name in self.once and not self.starter.stopping_now:
                    self.daemon_slots.setdefault(name, {})[fence] = [second, None]
                else:
                    self._send({"end": [[name, second, fence]]})
            self.starter.tend_daemons()
        elif message.get("db") == "down":
            self.db_down = message.get("error")
            self._connected()
        elif message.get("db") == "up":
            self.db_down = None
            self._connected()
        elif "holding" in message:
            self.known.reported(message["holding"])
        elif "adopted" in message or "unheld" in message:
            for run_id, name, key, fence in message.get("adopted") or ():
                self._adopted(run_id, name, int(key), int(fence))
            for run_id in message.get("unheld") or ():
                self._unheld(run_id)

    def holders(self, name):
        """The holders of ``name`` as the claims process last read them, with this node's own
        starts and daemon slots since: holders.Known.of, and ``at``, when it was read."""
        if name not in self.once or self.hello is None:
            return None
        own = {-1 - second: fence for fence, (second, _) in self.daemon_slots.get(name, {}).items()}
        entry, at = self.known.of(name, self.node_name, own)
        return {**entry, "at": at}

    def _connected(self):
        """The claims process has reached the database, or found it unreachable: the seconds
        whose tick came before are answered, or (unreachable) now recorded as skipped with the
        reason, however late that is (a record, not a start: misfire_grace does not apply)."""
        self.connected = True
        if self.db_down is not None:
            self._skip_starting(lambda second: True)

    def _skip_starting(self, which):
        """The seconds whose tick came before the claims process first answered and ``which``
        (a test on the second) says are over: recorded as skipped, unreachable (a late answer
        then frees its claim's slot, _won)."""
        from torchcore import claims

        for key in [key for key, state in self.state.items()
                    if state == STARTING and which(key[1])]:
            self.state[key] = SKIPPED
            self.starter.skip_claimed(*key, claims.UNREACHABLE)

    def _starting_unanswered(self, now):
        """A second waiting for the first answer that the claims process will not answer any
        more (it tries a claim asked before its first connection until RECHECK_FOR after its
        second; one asked while it was being restarted never reached it): skipped, with the
        reason, so that every second is run or recorded."""
        from torchcore import claims

        self._skip_starting(lambda second: now > second + claims.RECHECK_FOR + 1)

    def _daemon_lost(self, name, fence, signum):
        """A daemon's slot whose lease cannot be kept: its instance stopped, the slot gone."""
        entry = self.daemon_slots.get(name, {}).get(fence)
        if entry is None:
            return
        if signum == signal.SIGKILL or entry[1] is None:
            del self.daemon_slots[name][fence]
            self.daemon_leaving.discard(fence)
        else:
            self.daemon_leaving.add(fence)      # not restarted in a slot it cannot keep
        run = self.starter.table.get(entry[1]) if entry[1] is not None else None
        if run is not None:
            self.starter.signal_run(run, signum, "its fleet lease could not be kept")

    def _won(self, name, second, fence, late, now):
        key = (name, second)
        state = self.state.get(key)
        if (state == SKIPPED and not late) or name not in self.once:
            # answered after its tick (it expires unstarted and is taken over), or no longer a
            # `once` task of this node (a reload): the slot it may take is freed at once
            self._send({"end": [[name, second, fence]]})
            return
        self.state.pop(key, None)
        if state == STARTING and now - second > self.misfire_grace:
            # won for a tick that waited, too late to start: missed, recorded here (the node
            # that won it); its slot, when taken, is freed and the claim ended (_slot)
            self.starter.missed_claimed(name, second)
            return
        start_now = late or state in (LATE_ASK, STARTING) or second <= now
        self.won[key] = _Won(fence, now if start_now else None, start_now)
        if not start_now:
            self.starter.prepare_claimed(name, second)

    def _slot(self, name, second, fence, slot):
        won = self.won.get((name, second))
        if won is None or won.fence != fence:
            if slot is not None:
                self._send({"end": [[name, second, fence]]})
            return
        won.slot, won.full = slot, slot is None
        if won.start_now:
            self.starter.start_claimed(name, second)

    def _forget(self, now):
        if len(self.state) + len(self.won) < 256:
            return
        for key in [key for key in self.state if key[1] < now - KEEP]:
            del self.state[key]
        for key, won in list(self.won.items()):
            if key[1] < now - KEEP and not won.started:
                del self.won[key]
