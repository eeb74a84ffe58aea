"""The validated-load cache: a big task file loaded again unchanged is not parsed again.

After the loading child (loadchild.py) has accepted a file of over CACHE_MIN_BYTES, it keeps
what it streamed (the verdict and the node's task records) in ``state_dir/load.cache``, a
private file of the daemon's user.  The next load of the same file (a restart, or a reload of
an unchanged file) streams them again instead of parsing, if every part of the key is still
the same:

- the file's bytes (SHA-256 of the very bytes this load read), its absolute path and the home
  directory (``~`` in settings is expanded against it);
- torchcore's version, the Python version (marshal and pickle), the node (hostname and
  addresses) and the effective uid;

and if the cache file is whole (its own SHA-256 at its end), a regular file of ours with one
link and no access for others, in a private state directory of ours.  What a load checks on the
node at the time (users, groups, the HTTP token file) and the time zones are checked again;
anything found there, as any mismatch or unreadable part, means a normal load (which then says
what is wrong, as always).  The cache holds nothing the supervisor does not get from a normal
load; a file that cannot be written is no error (the next load parses).
"""

import hashlib
import json
import os
import sys
import zoneinfo

from torchcore import __version__, paths

CACHE_MIN_BYTES = 1 << 20       # smaller files parse in well under a second: no cache
MAGIC = b"torchcore load cache 1\n"
_SUM = hashlib.sha256().digest_size


def key(data, path, node_text):
    """The cache key of a load of ``data`` (the file's bytes) at ``path`` for a node (its
    loadchild.node_argument text)."""
    return json.dumps({"file": hashlib.sha256(data).hexdigest(), "path": os.path.abspath(path),
                       "home": os.path.expanduser("~"), "version": __version__,
                       "python": sys.version, "node": node_text, "euid": os.geteuid()},
                      sort_keys=True).encode()


def store(state_dir, cache_key, verdict, frames, checks):
    """Keep an accepted load (its verdict, without its timing, and the rest of its frames, as
    streamed); False if it cannot be kept (never raises)."""
    from torchcore import safepaths

    final = os.path.join(state_dir, paths.LOAD_CACHE)
    tmp = final + ".tmp"        # one name: a store killed half way leaves one file, not many
    try:
        safepaths.secure_dir(state_dir, safepaths.STATE_DIR_MODE, what="state directory",
                             private=True)
        head = json.dumps({"key": cache_key.decode(), "verdict": verdict,
                           "checks": checks}).encode()
        body = b"".join([MAGIC, len(head).to_bytes(8, "big"), head, *frames])
        fd = safepaths.open_file(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600,
                                 what="load cache")
        try:
            view = memoryview(body + hashlib.sha256(body).digest())
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)
        os.replace(tmp, final)
        return True
    except Exception:       # UnsafePath, OSError, DaemonError, MemoryError ...: parse next time
        try:
            os.unlink(tmp)
        except OSError:
            pass
        return False


def lookup(state_dir, cache_key):
    """(verdict, checks, the rest of the frames as bytes) kept for ``cache_key``, or None."""
    from torchcore import safepaths

    path = os.path.join(state_dir, paths.LOAD_CACHE)
    try:
        safepaths.check_dir(state_dir, what="state directory", private=True)
        fd = safepaths.open_file(path, os.O_RDONLY, 0o600, what="load cache")
    except Exception:
        return None
    try:
        chunks = []
        while chunk := os.read(fd, 1 << 24):
            chunks.append(chunk)
    except OSError:
        return None
    finally:
        os.close(fd)
    body = b"".join(chunks)
    start = len(MAGIC) + 8
    if len(body) < start + _SUM or not body.startswith(MAGIC):
        return None
    size = int.from_bytes(body[len(MAGIC):start], "big")
    try:
        head = json.loads(body[start:start + size])
        if head["key"].encode() != cache_key or not head["verdict"].get("ok"):
            return None         # another file's (the usual miss: the file changed)
        if hashlib.sha256(body[:-_SUM]).digest() != body[-_SUM:]:
            return None         # not whole
        return head["verdict"], head["checks"], body[start + size:-_SUM]
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


def still_valid(path, settings, checks, node):
    """True if what the node and the system had to say of the file still holds: the zones
    load, and no user, group or token file problem (config.node_problems' rules)."""
    from torchcore import config

    try:
        for zone in checks["zones"]:
            zoneinfo.ZoneInfo(zone)
        switches = [tuple(item) for item in checks["switches"]]
    except Exception:
        return False
    return not config.switch_problems(path, switches, settings, node)
