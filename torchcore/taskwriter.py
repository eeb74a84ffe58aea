"""The task-file writer behind ``torchcore import``: YAML text that reads back as written, and
edits merging imported tasks into an existing task file without rewriting it.

Every task written is loaded again by config (the same loader ``torchcore check`` uses) before
it is kept: an entry the loader rejects becomes a comment saying why, and a merge that would
produce an invalid file or lose a task is refused.
"""

import dataclasses
import ipaddress
import re

import yaml

from torchcore import config
from torchcore.crontab import Comment, CrontabError, Entry, Problem, assign_names, mail_url
from torchcore.errors import TorchcoreError
from torchcore.taskspec import DEFAULT_SHELL
from torchcore.yamlread import document

# --- YAML text --------------------------------------------------------------------------------

_YAML_ESCAPES = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\t": "\\t", "\r": "\\r", "\0": "\\0",
                 "\x85": "\\N", "\u2028": "\\L", "\u2029": "\\P", "\ufeff": "\\uFEFF"}
_PRINTABLE = re.compile("[\x20-\x7e\xa0-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def yaml_str(text):
    """A YAML double-quoted scalar that reads back as exactly ``text``, on one line.

    >>> print(yaml_str('a "b" #c: \\\\d'))
    "a \\"b\\" #c: \\\\d"
    """
    out = []
    for ch in text:
        if ch in _YAML_ESCAPES:
            out.append(_YAML_ESCAPES[ch])
        elif _PRINTABLE.match(ch):
            out.append(ch)
        elif ord(ch) <= 0xFF:
            out.append(f"\\x{ord(ch):02x}")
        else:
            out.append(f"\\u{ord(ch):04x}" if ord(ch) <= 0xFFFF else f"\\U{ord(ch):08x}")
    return '"' + "".join(out) + '"'


def comment_text(text):
    """``text`` made safe inside a YAML comment (one line, printable characters only)."""
    return "".join(ch if _PRINTABLE.match(ch) and ch not in "\x85\u2028\u2029\ufeff"
                   else yaml_str(ch)[1:-1] for ch in text)


def yaml_list(values):
    return "[" + ", ".join(yaml_str(v) for v in values) + "]"


def yaml_value(value):
    """A str, or a list of them, as YAML on one line."""
    return yaml_list(value) if isinstance(value, list) else yaml_str(value)


def task_lines(fields, comments=(), indent="  "):
    """The YAML lines of one task of a ``tasks:`` list: ``comments`` above it, then ``fields``
    (``(key, value)`` in order; a value is a str, a list of str, a dict of str for ``env``,
    or a tuple of dicts for ``notify``: one flow mapping per item)."""
    lines = [f"{indent}# {comment_text(text)}" for text in comments]
    plain = [(key, value) for key, value in fields if not isinstance(value, (dict, tuple))]
    lines += [f"{indent}{'- ' if i == 0 else '  '}{key}: {yaml_value(value)}"
              for i, (key, value) in enumerate(plain)]
    for key, value in fields:
        if isinstance(value, dict):
            lines.append(f"{indent}  {key}:")
            lines += [f"{indent}    {yaml_str(k)}: {yaml_str(v)}" for k, v in sorted(value.items())]
        elif isinstance(value, tuple):
            lines.append(f"{indent}  {key}:")
            lines += [f"{indent}    - {{{', '.join(f'{k}: {_flow(v)}' for k, v in item.items())}}}"
                      for item in value]
    return lines


def _flow(value):
    return str(value) if isinstance(value, int) else yaml_value(value) if isinstance(value, str) \
        else "[" + ", ".join(value) + "]"


# --- imported entries -------------------------------------------------------------------------

def entry_lines(entry, indent="  ", shell=DEFAULT_SHELL):
    """The YAML lines of one imported task, with its original line and notes as comments above it.

    ``shell``: the task file's ``settings.shell``; when it is not /bin/sh, a string command
    is written as ``["/bin/sh", "-c", ...]`` so it still runs under the shell cron used.
    """
    command = entry.command
    if isinstance(command, str) and shell != DEFAULT_SHELL:
        command = [DEFAULT_SHELL, "-c", command]
    fields = [("name", entry.name), ("description", entry.description),
              ("schedule", entry.schedule), ("command", command)]
    fields += [(key, getattr(entry, key)) for key in ("user", "timezone", "cwd", "ips", "hosts")
               if getattr(entry, key)]
    if entry.env:
        fields.append(("env", entry.env))
    if entry.mail_to:       # cron mailed each run's output: so do these targets
        fields.append(("notify", tuple({"to": mail_url(entry, address), "on": ["output"], "every": 0}
                                       for address in entry.mail_to)))
    comments = [f"{entry.source}:{entry.lineno}: {entry.text}"] + [f"note: {n}" for n in entry.notes]
    return task_lines(fields, comments, indent)


def item_lines(item, indent="  ", shell=DEFAULT_SHELL):
    """YAML lines (comments only, except for an Entry) for one item of an ImportResult."""
    if isinstance(item, Entry):
        return entry_lines(item, indent, shell)
    if isinstance(item, Problem):
        text = f"{item.source}:{item.lineno}: NOT CONVERTED ({item.reason}): {item.text}"
    elif item.text.lstrip(" \t").startswith("#"):
        text = item.text.lstrip(" \t")[1:].lstrip(" ")
    else:
        text = f"{item.source}:{item.lineno}: {item.text}"
    return [f"{indent}# {comment_text(text)}"]


def render(result, sources):
    """The whole task file for an import: a header, then ``tasks:`` with every item in order."""
    lines = [f"# Imported by `torchcore import` from {comment_text(', '.join(sources))}.",
             "# Above each task: its original crontab line; lines that could not be",
             "# converted are kept as comments marked NOT CONVERTED."]
    lines.append("tasks:" if result.entries else "tasks: []")
    for item in result.items:
        lines += item_lines(item)
    return "\n".join(lines) + "\n"


# --- checking against the task-file loader ------------------------------------------------------

def validate(result, shell=DEFAULT_SHELL, zone=None):
    """Turn every entry the task-file loader rejects into a Problem (kept as a comment).

    Each task is loaded on its own by the same code ``torchcore check`` uses, so what is
    emitted is accepted, and a rejected line says why. ``shell`` and ``zone`` are the
    target file's ``settings.shell`` and ``settings.timezone``.
    """
    for i, item in enumerate(result.items):
        if isinstance(item, Entry):
            try:
                item.task = load_entry(item, shell, zone)
            except TorchcoreError as exc:
                reasons = [p.split(": ", 2)[-1] for p in getattr(exc, "problems", [str(exc)])]
                result.items[i] = Problem(item.source, item.lineno, item.text, "; ".join(reasons))
    return result


def load_entry(entry, shell=DEFAULT_SHELL, zone=None):
    """The config.Task an entry becomes in a file with these settings (ConfigError if none)."""
    head = f"settings:\n  timezone: {yaml_str(zone)}\n" if zone else ""
    return config.loads(f"{head}tasks:\n" + "\n".join(entry_lines(entry, shell=shell)) + "\n",
                        "tasks.yaml").tasks[0]


# --- merging into an existing task file ---------------------------------------------------------

@dataclasses.dataclass
class Merged:
    """What a merge did: the new file text and one line per collapsed or added task."""

    text: str
    collapsed: list   # (entry, existing task name, added targets)
    added: list       # entries appended as new tasks
    zone: str | None  # the file's settings.timezone


def identity(task):
    """What makes two tasks "the same job": everything but name, description and targeting."""
    text = task.schedule_text
    if text and not text.startswith("@") and len(text.split()) == 5:
        text = "0 " + text
    return dataclasses.replace(task, name="", description="", ips=(), hosts=(),
                               schedule_text=" ".join(text.split()) if text else text)


def merge(existing_text, path, result, prefix=""):
    """Merge imported entries into a task file's text, keeping that text as written.

    An entry identical to an existing task (see :func:`identity`) adds its ``ips``/``hosts``
    to that task in place; the others are appended to the ``tasks:`` list with their
    comments. The file must be valid first (CrontabError otherwise), and the result is
    loaded again before it is returned.
    """
    try:
        taskfile = config.loads(existing_text, path)
    except TorchcoreError as exc:
        raise CrontabError(f"refusing to merge into {path}: it is not a valid task file:\n{exc}") from None
    shell, zone = taskfile.settings.shell, taskfile.settings.timezone
    assign_names(result.entries, prefix, taken={t.name for t in taskfile.tasks})
    validate(result, shell, zone)
    root = document(existing_text.encode("utf-8"), path, existing_text)
    nodes = _task_nodes(root)
    by_identity, shared = {}, _shared_nodes(nodes)
    for task, node in zip(taskfile.tasks, nodes):
        if _editable(node, shared):
            by_identity.setdefault(identity(task), (task, node))
    edits, collapsed, added, items = [], [], [], []
    for item in result.items:
        match = by_identity.pop(identity(item.task), None) \
            if isinstance(item, Entry) else None
        if match is None:
            items.append(item)
            added += [item] if isinstance(item, Entry) else []
            continue
        targets = _add_targets(match[0], match[1], item, existing_text, edits)
        collapsed.append((item, match[0].name, targets))
        items.append(Comment(item.source, item.lineno,
                             f"{item.text}  -> same job as task '{match[0].name}'"))
    if any(isinstance(item, (Entry, Problem)) for item in items):
        edits.append(_append_edit(existing_text, root, items, shell))
    text = _apply(existing_text, edits)
    _check_merged(text, path, collapsed, added)
    return Merged(text, collapsed, added, zone)


def _task_nodes(root):
    """The mapping nodes of the ``tasks`` list (in file order), from a composed document."""
    seq = _tasks_value(root)
    return list(seq.value) if isinstance(seq, yaml.SequenceNode) else []


def _tasks_value(root):
    if isinstance(root, yaml.MappingNode):
        for key, value in root.value:
            if isinstance(key, yaml.ScalarNode) and key.value == "tasks":
                return value
    return None


def _shared_nodes(mappings):
    """ids of the value nodes that more than one task mapping holds (YAML aliases)."""
    seen, shared = set(), set()
    for mapping in mappings:
        if isinstance(mapping, yaml.MappingNode):
            for node in {id(v): v for _, v in mapping.value}:
                (shared if node in seen else seen).add(node)
    return shared


def _editable(mapping, shared):
    """Whether a task's targeting can be extended in place without touching other tasks.

    Not for a flow mapping, a task taking keys from a ``<<`` merge, or an ``ips``/``hosts``
    list shared through an anchor: such a task is left alone and the import appended.
    """
    if not isinstance(mapping, yaml.MappingNode) or mapping.flow_style:
        return False
    keys = {k.value: v for k, v in mapping.value if isinstance(k, yaml.ScalarNode)}
    if "<<" in keys:
        return False
    return not any(id(keys[k]) in shared for k in ("ips", "hosts") if k in keys)


def _add_targets(task, node, entry, text, edits):
    """Edits adding the entry's ips/hosts that ``task`` lacks; returns what was added."""
    if not task.ips and not task.hosts:
        return []          # the task already runs on every node
    have_ips = {str(n) for n in task.ips}
    new_ips = [ip for ip in entry.ips if str(ipaddress.ip_network(ip, strict=False)) not in have_ips]
    new_hosts = [h for h in entry.hosts if h not in task.hosts]
    for key, values in (("ips", new_ips), ("hosts", new_hosts)):
        if values:
            edits.append(_list_edit(node, key, values, text))
    return new_ips + new_hosts


def _list_edit(mapping, key, values, text):
    """One edit ``(start, end, replacement)`` adding ``values`` to list ``key`` of a task."""
    pairs = {k.value: (k, v) for k, v in mapping.value}
    if key not in pairs:
        name_key, name_value = pairs["name"]
        at = _line_end(text, name_value.end_mark.index)
        line = f"\n{' ' * name_key.start_mark.column}{key}: {yaml_list(values)}"
        return at, at, line
    seq = pairs[key][1]
    if seq.flow_style:
        at = seq.end_mark.index - 1          # just before the closing ]
        return at, at, (", " if seq.value else "") + ", ".join(yaml_str(v) for v in values)
    at = _line_end(text, seq.value[-1].end_mark.index)
    indent = " " * seq.start_mark.column
    return at, at, "".join(f"\n{indent}- {yaml_str(v)}" for v in values)


def _line_end(text, index):
    end = text.find("\n", index)
    return len(text) if end < 0 else end


def _append_edit(text, root, items, shell):
    """The edit appending ``items`` (tasks and comments) to the end of the tasks list."""
    seq = _tasks_value(root)
    if isinstance(seq, yaml.SequenceNode) and not seq.flow_style and seq.value:
        indent = " " * seq.start_mark.column
        block = [line for item in items for line in item_lines(item, indent, shell)]
        at = seq.end_mark.index
        if at >= len(text):       # the list runs to the end of the file
            lead = "" if text.endswith("\n") else "\n"
            return len(text), len(text), lead + "\n".join(block) + "\n"
        at -= seq.end_mark.column  # the start of the line of whatever follows the list
        return at, at, "\n".join(block) + "\n"
    if isinstance(seq, yaml.SequenceNode) and not seq.value:
        block = [line for item in items for line in item_lines(item, "  ", shell)]
        if not any(isinstance(i, Entry) for i in items):
            return len(text), len(text), "".join(f"\n{line}" for line in block)
        return seq.start_mark.index, seq.end_mark.index, "\n" + "\n".join(block)
    raise CrontabError("the 'tasks' list is written in flow style [...]; write it as a "
                       "block list (one '- name: ...' per task) to merge into it")


def _apply(text, edits):
    for start, end, replacement in sorted(edits, key=lambda e: (e[0], e[1]), reverse=True):
        text = text[:start] + replacement + text[end:]
    return text


def _check_merged(text, path, collapsed, added):
    """Load the merged text again; any surprise is an error, never a silently wrong file."""
    try:
        merged = config.loads(text, path)
    except TorchcoreError as exc:
        raise CrontabError(f"merging into {path} produced an invalid file (nothing written):\n"
                           f"{exc}") from None
    names = {t.name for t in merged.tasks}
    missing = [e.name for e in added if e.name not in names]
    if missing:
        raise CrontabError(f"merging into {path} lost tasks {missing} (nothing written)")
