"""Run one real executor (executor.execute in a fresh interpreter) and read its reports."""

import json
import os
import select
import subprocess
import sys
import time

from torchcore.jobspec import Job

_CHILD = ("import sys; from torchcore import executor, jobspec; "
          "executor.execute(jobspec.Job.from_json(sys.argv[1]), int(sys.argv[2]), "
          "int(sys.argv[3]) if len(sys.argv) > 3 else None)")


class ExecutorRun:
    """One executor process: ``start`` it, ``wait`` for its end report (a dict) or give up."""

    def __init__(self, tmp_path, argv, name="t", go=False, preexec_fn=None, stderr=None, **fields):
        fields.setdefault("log_dir", str(tmp_path / "logs"))
        fields.setdefault("db_path", str(tmp_path / "state" / "torchcore.db"))
        if go:
            fields.update(prepared=True, scheduled=int(time.time()) + 1)
        self.job = Job(run_id=1, name=name, argv=tuple(argv), **fields)
        self.reports = []
        self._buffer = b""
        read_fd, write_fd = os.pipe()
        args = [sys.executable, "-c", _CHILD, self.job.to_json(), str(write_fd)]
        keep = [write_fd]
        self.go_w = None
        if go:
            go_r, self.go_w = os.pipe()
            args.append(str(go_r))
            keep.append(go_r)
        self.started = time.monotonic()
        self.proc = subprocess.Popen(args, pass_fds=keep, stdin=subprocess.DEVNULL,
                                     stderr=stderr, preexec_fn=preexec_fn)  # noqa: PLW1509
        for fd in keep:
            os.close(fd)
        self.fd = read_fd
        if go:
            time.sleep(max(0.0, self.job.scheduled - time.time()))
            os.write(self.go_w, b"g")

    def wait(self, timeout):
        """The end report, or None if none came within ``timeout`` seconds (the executor is
        then killed)."""
        deadline = time.monotonic() + timeout
        try:
            while (left := deadline - time.monotonic()) > 0:
                ready, _, _ = select.select([self.fd], [], [], left)
                if not ready:
                    continue
                chunk = os.read(self.fd, 65536)
                if not chunk:
                    break
                self._buffer += chunk
                *lines, self._buffer = self._buffer.split(b"\n")
                self.reports += [json.loads(line) for line in lines]
            self.elapsed = time.monotonic() - self.started
            return next((r for r in self.reports if r.get("e") == "end"), None)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait()
            os.close(self.fd)
            if self.go_w is not None:
                os.close(self.go_w)

    def log(self):
        path = os.path.join(self.job.log_dir, f"{self.job.name}.log")
        with open(path, errors="replace") as handle:
            return handle.read()
