"""The task file: ``tasks.yaml`` -> validated, immutable Task specs; the one door to loading it.

    load(path), loads(text)     the whole file, validated (ConfigError lists every problem)
    load_for_node(path, node)   the same, and valid on this node (users and groups exist here)
    load_settings(path)         its settings alone, whatever its tasks hold
    peek_settings(path)         its settings as far as they read, never failing (stop, status)

The work is done by three modules below this one: yamlread.py reads the YAML within the
loading budget into typed values, validate.py checks them into the specs of taskspec.py.
"""

import grp
import hashlib
import os
import pwd
from types import SimpleNamespace

from torchcore.errors import ConfigError
from torchcore.taskspec import (
    DEFAULT_SHELL, DEFAULT_STATE_DIR, NAME_RE, RESERVED_NAMES, Limits, Settings, Task, TaskFile,
    default_settings, host_matches)
from torchcore.validate import TASK_FIELDS, Loader, suggest_zone
from torchcore.web import settings as http_settings
from torchcore.yamlread import MAX_ARG_BYTES, MAX_FILE_BYTES, document, read_bytes, settings_document, suggest

__all__ = [
    "DEFAULT_SHELL", "DEFAULT_STATE_DIR", "MAX_ARG_BYTES", "MAX_FILE_BYTES", "NAME_RE",
    "RESERVED_NAMES", "TASK_FIELDS", "Limits", "Settings", "Task", "TaskFile", "default_settings",
    "host_matches", "load", "load_for_node", "load_settings", "loads", "node_problems",
    "peek_settings", "suggest", "suggest_zone"]


def load(path):
    """Read and validate the task file at ``path``; ConfigError lists every problem found."""
    return loads(read_file(path), path)


def read_file(path):
    """The task file's bytes (within the loading budget's size, and one more byte); ConfigError
    saying why it cannot be read."""
    try:
        return read_bytes(path)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such task file (give one with -c FILE or $TORCHCORE_TASKS)") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, not a task file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the task file: {exc.strerror}") from None


def loads(text, path="tasks.yaml"):
    """Validate task file contents (str or bytes); ``path`` names the file in messages and anchors
    relative paths in ``settings``."""
    data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
    root = document(data, path, text if isinstance(text, str) else None)
    try:
        return Loader(path).taskfile(root, hashlib.sha256(data).hexdigest())
    except RecursionError:      # the budget bounds the depth; this is the net under it
        raise ConfigError(f"{path}: the YAML is nested too deeply") from None


def load_for_node(path, node):
    """The task file, valid for ``node``: ConfigError also for what only shows on this node
    (unknown users and groups, a user switch without root)."""
    taskfile = load(path)
    problems = node_problems(taskfile, node)
    if problems:
        raise ConfigError(problems)
    return taskfile


def load_settings(path):
    """The settings of the task file at ``path`` even when its tasks (or some settings) do not
    validate: invalid settings keep their defaults.  Read within the same budget as ``load``;
    ConfigError (or OSError) when the file cannot be read as YAML at all."""
    root = document(read_bytes(path), path)
    try:
        return Loader(path).settings_only(root)
    except RecursionError:
        raise ConfigError(f"{path}: the YAML is nested too deeply") from None


PEEK_WHOLE_BYTES = 1 << 20     # a bigger file's settings are looked for in its head first


def peek_settings(path):
    """The settings a task file names for state_dir, log_dir, pidfile and shutdown_grace, whatever
    the file on disk now holds (huge, invalid, hostile): what stop, status, history and logs
    find the daemon and its records by.

    ``load_settings`` first; if the file is not YAML at all, the top-level ``settings:`` block
    of its head alone (yamlread.settings_document), validated the same way; anything unreadable
    leaves the defaults.  A file over PEEK_WHOLE_BYTES is read by its settings block first: the
    same settings, without parsing 100,000 tasks before `reload` or `stop` can ask the daemon.
    Never raises.
    """
    try:
        big = os.path.getsize(path) > PEEK_WHOLE_BYTES
    except OSError:
        big = False
    if big and (root := settings_document(path)) is not None:
        try:
            return Loader(path).settings_only(root)
        except (RecursionError, ValueError, TypeError):
            pass
    try:
        return load_settings(path)
    except (ConfigError, OSError):
        pass
    root = settings_document(path)
    try:
        return Loader(path).settings_only(root)
    except (RecursionError, ValueError, TypeError):
        return default_settings(path)


# ---------------------------------------------------------------------------------------------
# Checks that depend on the node


def node_problems(taskfile, node, euid=None):
    """Problems that only show on ``node``: for each enabled task that runs here, an unknown user or
    group, or a user/group switch that needs root while torchcore does not run as root."""
    switches = [(task.line, task.name, task.user, task.group)
                for task in taskfile.local_tasks(node) if task.user or task.group]
    return switch_problems(taskfile.path, switches, taskfile.settings, node, euid)


def switch_problems(path, switches, settings, node, euid=None):
    """node_problems of a file at ``path`` with ``settings`` whose node's tasks switch user or
    group as ``switches``, (line, name, user, group) each (the load cache checks again)."""
    euid = os.geteuid() if euid is None else euid
    me = _user_name(euid)
    problems = []
    for line, name, user, group in switches:
        where = f"{path}:{line}: task '{name}': "
        if user:
            problem = _user_problem(user, euid, me, node)
            if problem:
                problems.append(f"{where}user: {problem}")
        if group:
            problem = _group_problem(group, euid, node)
            if problem:
                problems.append(f"{where}group: {problem}")
    token = http_settings.token_problem(SimpleNamespace(path=path, settings=settings))
    if token:
        problems.append(token)
    return problems


def _user_name(uid):
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _user_problem(user, euid, me, node):
    try:
        pwd.getpwnam(user)
    except KeyError:
        return f"no user {user!r} on this node ({node.hostname})"
    if euid != 0 and user != me:
        return f"running as {user!r} needs root, and torchcore runs as {me!r} here"
    return None


def _group_problem(group, euid, node):
    try:
        gid = grp.getgrnam(group).gr_gid
    except KeyError:
        return f"no group {group!r} on this node ({node.hostname})"
    if euid != 0 and gid != os.getegid():
        return f"switching to group {group!r} needs root, and torchcore does not run as root here"
    return None
