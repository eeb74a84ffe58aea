import os
import re
import subprocess
import sys
import textwrap

import pytest

from torchcore import tasklog
from torchcore.tasklog import TaskLog, follow_log, format_stamp, line_run_id, log_files, log_path, read_log

LINE = re.compile(
    r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d run (\d+) (out|err)\| (.*)$")


def texts(lines):
    return [LINE.match(line).group(3) for line in lines]


def content(log_dir, task="t"):
    with open(log_path(log_dir, task), encoding="utf-8") as f:
        return f.read().splitlines()


def test_stamp_format():
    stamp = format_stamp(1795534200.1234)
    assert re.fullmatch(r"2026-11-2\dT\d\d:\d\d:00\.123[+-]\d\d:\d\d", stamp)


def test_lines_are_stamped_with_run_and_stream(tmp_path):
    log = TaskLog(str(tmp_path / "logs"), "t", 17, 10_000, 2, clock=lambda: 1795534200.5)
    log.write("out", b"hello\n")
    log.write("err", b"oops\n")
    log.close()
    lines = content(str(tmp_path / "logs"))
    assert lines[0].endswith(" run 17 out| hello")
    assert lines[1].endswith(" run 17 err| oops")
    assert all(LINE.match(line) for line in lines)
    assert line_run_id(lines[0]) == 17 and line_run_id("garbage") is None


def test_partial_lines_wait_for_their_newline_per_stream(tmp_path):
    log = TaskLog(str(tmp_path), "t", 1, 0, 0)
    log.write("out", b"hel")
    log.write("err", b"e1")
    log.write("out", b"lo wor")
    assert not os.path.exists(log_path(str(tmp_path), "t")) or content(str(tmp_path)) == []
    log.write("out", b"ld\nsecond\r\nthi")
    log.write("err", b"\n")
    log.close()                                   # an unfinished line is written on close
    assert texts(content(str(tmp_path))) == ["hello world", "second", "e1", "thi"]


def test_utf8_split_across_chunks_and_invalid_bytes(tmp_path):
    log = TaskLog(str(tmp_path), "t", 1, 0, 0)
    data = "héllo €\n".encode()
    for i in range(len(data)):
        log.write("out", data[i:i + 1])
    log.write("out", b"bad \xff\xfe end\n")
    log.close()
    assert texts(content(str(tmp_path))) == ["héllo €", "bad \ufffd\ufffd end"]


def test_long_lines_are_cut_with_a_marker(tmp_path):
    log = TaskLog(str(tmp_path), "t", 1, 0, 0, max_line=100)
    log.write("out", b"x" * 60)
    log.write("out", b"y" * 60)                   # the partial line passes the limit
    log.write("out", b"z" * 500)                  # still the same line: dropped
    log.write("out", b"zz\nnext\n" + b"a" * 300 + b"\nshort\n")
    log.write("out", "é".encode() * 80 + b"\n")  # a cut never splits a character
    log.close()
    got = texts(content(str(tmp_path)))
    assert got[0] == "x" * 60 + "y" * 40 + " [line cut at 100 bytes]"
    assert got[1:4] == ["next", "a" * 100 + " [line cut at 100 bytes]", "short"]
    assert got[4] == "é" * 50 + " [line cut at 100 bytes]"
    assert len(got) == 5


def test_rotation_keeps_backups(tmp_path):
    d = str(tmp_path)
    log = TaskLog(d, "t", 1, 1000, 2)
    for i in range(200):
        log.write("out", b"line %d\n" % i)
    log.close()
    files = log_files(d, "t")
    assert [os.path.basename(f) for f in files] == ["t.log.2", "t.log.1", "t.log"]
    assert all(os.path.getsize(f) < 1000 + 100 for f in files)
    kept = texts(read_log(d, "t"))
    assert kept == ["line %d" % i for i in range(200 - len(kept), 200)]  # the newest, in order


def test_two_writers_rotate_once_and_follow_the_new_file(tmp_path):
    d = str(tmp_path)
    a, b = TaskLog(d, "t", 1, 200, 3), TaskLog(d, "t", 2, 200, 3)   # lines of 45-49 bytes
    b.write("out", b"b-first\n")
    for i in range(4):
        a.write("out", b"a-%d\n" % i)          # now past 100 bytes: the next write rotates
    b.write("out", b"b-rotates\n")
    a.write("out", b"a-reopens\n")            # sees the new inode: reopens, does not rotate again
    a.close()
    b.close()
    assert [os.path.basename(f) for f in log_files(d, "t")] == ["t.log.1", "t.log"]
    assert texts(content(d)) == ["b-rotates", "a-reopens"]
    assert texts(read_log(d, "t"))[:5] == ["b-first", "a-0", "a-1", "a-2", "a-3"]


def test_a_new_writer_rotates_a_full_file_before_writing(tmp_path):
    d = str(tmp_path)
    with open(log_path(d, "t"), "wb") as f:
        f.write(b"x" * 500 + b"\n")
    log = TaskLog(d, "t", 3, 400, 2)
    log.write("out", b"fresh\n")
    log.close()
    assert texts(content(d)) == ["fresh"]
    assert os.path.getsize(log_path(d, "t") + ".1") == 501


def test_rotation_without_backups_starts_afresh(tmp_path):
    log = TaskLog(str(tmp_path), "t", 1, 500, 0)
    for i in range(100):
        log.write("out", b"line %d\n" % i)
    log.close()
    assert log_files(str(tmp_path), "t") == [log_path(str(tmp_path), "t")]


WRITER = textwrap.dedent("""
    import sys, random
    from torchcore.tasklog import TaskLog
    log_dir, run_id, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    log = TaskLog(log_dir, "t", run_id, 20000, 50)
    rng = random.Random(run_id)
    pending = b"".join(b"r%d-%d %s\\n" % (run_id, i, b"p" * rng.randrange(80))
                       for i in range(count))
    while pending:                                # chunks cut anywhere, as a pipe delivers them
        n = rng.randrange(1, 300)
        log.write("out", pending[:n])
        pending = pending[n:]
    log.close()
""")


def test_concurrent_writers_with_rotation_lose_and_mix_nothing(tmp_path):
    d, count = str(tmp_path), 1500
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, d, str(run_id), str(count)])
             for run_id in (1, 2, 3, 4)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0, 0, 0]
    files = log_files(d, "t")
    assert len(files) > 5                         # it did rotate, several times
    lines = read_log(d, "t")
    for run_id in (1, 2, 3, 4):
        mine = [m.group(3) for m in map(LINE.match, lines) if m and m.group(1) == str(run_id)]
        assert [t.split()[0] for t in mine] == ["r%d-%d" % (run_id, i) for i in range(count)]
        assert all(t.startswith("r%d-" % run_id) for t in mine)
    assert all(LINE.match(line) for line in lines)   # no line broken or interleaved
    assert len(lines) == 4 * count
    assert len(read_log(d, "t", run_id=3)) == count


def test_read_log_last_lines_and_one_run(tmp_path):
    d = str(tmp_path)
    for run_id in (1, 2):
        log = TaskLog(d, "t", run_id, 1000, 3)
        for i in range(30):
            log.write("out", b"%d-%d\n" % (run_id, i))
        log.close()
    assert texts(read_log(d, "t", lines=3)) == ["2-27", "2-28", "2-29"]
    assert len(log_files(d, "t")) >= 2                       # the lines span rotated files
    assert texts(read_log(d, "t", lines=2, run_id=1)) == ["1-28", "1-29"]
    assert texts(read_log(d, "t", run_id=1)) == ["1-%d" % i for i in range(30)]
    assert read_log(d, "t", lines=0) == []
    assert read_log(d, "missing") == []


def test_write_errors_are_counted_and_reported_once(tmp_path, capsys):
    blocker = tmp_path / "notadir"
    blocker.write_text("")
    log = TaskLog(str(blocker), "t", 5, 1000, 1)  # the log dir cannot be created
    log.write("out", b"a\nb\n")
    log.write("out", b"c\n")
    log.close()
    assert log.errors == 2
    err = capsys.readouterr().err
    assert err.count("cannot write the log of task 't'") == 1


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_disk_full_does_not_raise(tmp_path, capsys, monkeypatch):
    # The log file is /dev/full (a symlink to it would be refused: see test_security_files).
    monkeypatch.setattr(tasklog.safepaths, "open_file",
                        lambda path, flags, mode, what: os.open("/dev/full", os.O_WRONLY))
    log = TaskLog(str(tmp_path), "t", 5, 0, 1)
    log.write("out", b"a\n")
    log.close()
    assert log.errors == 1 and "No space left" in capsys.readouterr().err


def test_follow_yields_new_lines_across_rotation(tmp_path):
    d = str(tmp_path)
    writer = TaskLog(d, "t", 9, 300, 3)
    writer.write("out", b"old-1\nold-2\n")
    steps = iter([
        lambda: writer.write("out", b"new-1\nnew-"),
        lambda: writer.write("out", b"2\n"),
        lambda: [writer.write("out", b"rot-%d\n" % i) for i in range(10)],  # rotates
        lambda: None,
        lambda: writer.write("out", b"last\n"),
    ])

    def sleep(_):
        next(steps)()

    follower = follow_log(d, "t", lines=1, poll=0, sleep=sleep)
    got = [next(follower) for _ in range(14)]
    assert texts(got) == ["old-2", "new-1", "new-2"] + ["rot-%d" % i for i in range(10)] + ["last"]
    assert len(log_files(d, "t")) > 1


def test_follow_waits_for_the_file_and_filters_by_run(tmp_path):
    d = str(tmp_path)
    logs = {}

    def sleep(_):
        for run_id in (1, 2):
            logs.setdefault(run_id, TaskLog(d, "t", run_id, 0, 0)).write("out", b"hi %d\n" % run_id)

    follower = follow_log(d, "t", lines=5, run_id=2, poll=0, sleep=sleep)
    assert texts([next(follower), next(follower)]) == ["hi 2", "hi 2"]


def _within(seconds, action):
    """Run ``action``; fail (instead of hanging) if it takes longer than ``seconds``."""
    import signal

    def too_slow(signum, frame):
        raise AssertionError(f"took over {seconds}s")

    old = signal.signal(signal.SIGALRM, too_slow)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        return action()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


@pytest.mark.parametrize("backups", [3, 10**12])
def test_rotation_costs_the_backups_that_exist_not_the_setting(tmp_path, backups):
    """log_backups of a trillion used to walk a trillion names under the lock."""
    log = TaskLog(str(tmp_path), "t", 1, 100, backups)

    def write_a_lot():
        for i in range(40):
            log.write("out", b"x" * 60 + b"%d\n" % i)
        log.close()
    _within(5, write_a_lot)
    names = sorted(os.listdir(tmp_path))
    kept = min(backups, 40)
    assert len([n for n in names if re.fullmatch(r"t\.log\.\d+", n)]) == min(kept, 39)
    if backups == 3:
        assert names == ["t.log", "t.log.1", "t.log.2", "t.log.3", "t.log.lock"]


def test_a_writer_never_waits_for_another_one_s_rotation(tmp_path):
    """Another process holds the rotation lock (a writer stuck mid-rotation): this one appends."""
    log = TaskLog(str(tmp_path), "t", 1, 10, 2)
    log.write("out", b"first line\n")
    holder = subprocess.Popen([sys.executable, "-c", ("import fcntl, os, sys, time; "
                               "fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT); "
                               "fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); "
                               "time.sleep(30)"), str(tmp_path / "t.log.lock")],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        _within(3, lambda: (log.write("out", b"second line\n"), log.close()))
    finally:
        holder.kill()
        holder.wait()
    assert [line.split("| ")[1] for line in read_log(str(tmp_path), "t")] == \
        ["first line", "second line"]
    assert log.errors == 0


def test_lost_writes_are_counted_in_bytes_and_stderr_may_be_gone(tmp_path, monkeypatch):
    os.symlink("/dev/full", tmp_path / "t.log")
    monkeypatch.setattr(sys, "stderr", None)        # printing raises: must not reach the run
    log = TaskLog(str(tmp_path), "t", 7, 0, 0)
    log.write("out", b"abc\n")
    log.write("err", b"defg\n")
    assert log.errors == 2 and log.lost_bytes > 9
    assert log.problem().startswith(f"its log lost {log.lost_bytes} bytes in 2 writes")
