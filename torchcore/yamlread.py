"""Reading a task file's YAML: within the loading budget, into typed values with their lines.

The file is parsed with pyyaml's C composer into nodes (which keep their line numbers);
validate.py walks them with the ``want_*`` readers here, each of which returns a value of
one kind or raises ``Bad`` naming what was found instead, in the user's own spelling.

Everything a file can hold is bounded before it is validated: its size, its nesting depth
and how far aliases and merge keys expand it (``_budget``, which measures each node once, so
a bomb is refused in time linear in the file), every number (by kind, in ``units``) and
every string (no NUL; words without control characters).
"""

import difflib
import functools
import re

import yaml

from torchcore.errors import ConfigError
from torchcore.units import MAX_COUNT, OutOfRange, parse_digits, parse_duration, parse_size, shown

try:
    _YAML_LOADER = yaml.CSafeLoader
except AttributeError:  # pyyaml built without libyaml: slower, same results
    _YAML_LOADER = yaml.SafeLoader

# The loading budget: what a file may hold before it is validated (see _budget).
MAX_FILE_BYTES = 64 << 20
MAX_DEPTH = 64                      # nesting levels, counted through aliases and merge keys
ALIAS_GROWTH = 10                   # aliases may expand the document to 10x its own nodes ...
ALIAS_ALLOWANCE = 100_000           # ... plus this many
# What a task may hand to exec: every word at most Linux's MAX_ARG_STRLEN (128 KiB with its
# NUL), short fields (names, paths, zones) at most a PATH_MAX.
MAX_ARG_BYTES = (128 << 10) - 1
MAX_WORD_BYTES = 4096
# A file that is not YAML at all still names its directories: the settings block of its head.
SETTINGS_PEEK = 1 << 20             # bytes of the task file read to find its settings
SETTINGS_BLOCK = 64 << 10           # the most of them taken as the settings block
_SETTINGS_KEY = re.compile(r"^settings[ \t]*:", re.MULTILINE)
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")

_TAG = "tag:yaml.org,2002:"
STR, INT, BOOL, NULL = _TAG + "str", _TAG + "int", _TAG + "bool", _TAG + "null"
MERGE = _TAG + "merge"
_KINDS = {STR: "a string", INT: "an integer", BOOL: "a boolean", NULL: "empty (null)",
          _TAG + "float": "a number", _TAG + "timestamp": "a date"}


def read_bytes(path):
    """The file's first MAX_FILE_BYTES + 1 bytes (one more than a task file may hold)."""
    with open(path, "rb") as handle:
        return handle.read(MAX_FILE_BYTES + 1)


def document(data, path, text=None):
    """The YAML node tree of a task file's bytes (``text``: their str, when already decoded),
    within the loading budget; ConfigError naming the line of whatever is wrong."""
    if len(data) > MAX_FILE_BYTES:
        raise ConfigError(f"{path}: the file is larger than {MAX_FILE_BYTES >> 20} MiB; "
                          "a task file is at most that")
    root, _ = compose_checked(_decode(data, path) if text is None else text, path)
    return root


def compose_checked(text, path):
    """(the node tree of ``text`` within the loading budget, whether an alias shares a
    collection in it); ConfigError as ``document``."""
    root = _compose(text, path)
    if "&" in text or _deepest(root) > MAX_DEPTH:
        size, own = _budget(root, path)  # anchors (or too deep): measured, refused as written
        return root, size != own
    return root, False


def _deepest(root):
    """The height _budget measures, for a document without anchors (so without aliases or
    sharing: its expanded size is its own, within the budget): the deepest level of a node,
    the root at 1.  A quick walk of the collections; the budget's own walk measures what
    an alias can expand, which a file without ``&`` has nothing of."""
    if root is None or isinstance(root, yaml.ScalarNode):
        return 1
    deepest, stack = 1, [(root, 1)]
    scalar, mapping = yaml.ScalarNode, yaml.MappingNode
    while stack:
        node, level = stack.pop()
        if not node.value:
            deepest = max(deepest, level)
            continue
        deepest = max(deepest, level + 1)
        below = level + 1
        if isinstance(node, mapping):
            for key, value in node.value:
                if not isinstance(key, scalar):
                    stack.append((key, below))
                if not isinstance(value, scalar):
                    stack.append((value, below))
        else:
            stack.extend((child, below) for child in node.value if not isinstance(child, scalar))
    return deepest


def settings_document(path):
    """A document of the top-level ``settings:`` entry alone, read from the first SETTINGS_PEEK
    bytes of a file that is not YAML as a whole; None when there is none to read.

    No alias or merge key is expanded beyond the loading budget; anything unreadable is None.
    """
    try:
        with open(path, "rb") as handle:
            head = handle.read(SETTINGS_PEEK)
    except OSError:
        return None
    block = _settings_block(head.decode("utf-8-sig", errors="replace"))
    try:
        root = yaml.compose(block, Loader=yaml.SafeLoader) if block else None
        _budget(root, path)
    except (yaml.YAMLError, ConfigError, RecursionError, ValueError):
        return None
    return root


def _settings_block(text):
    """The text of the top-level ``settings:`` entry, up to the next top-level line."""
    match = _SETTINGS_KEY.search(text)
    if match is None:
        return None
    lines = [text[match.start():].split("\n", 1)[0]]
    rest = text[match.start():].split("\n")[1:]
    for line in rest:
        if line[:1] not in ("", " ", "\t", "#"):
            break
        lines.append(line)
    return "\n".join(lines)[:SETTINGS_BLOCK]


def _children(node):
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    return node.value if isinstance(node, yaml.SequenceNode) else ()


def _budget(root, path):
    """(expanded size, own nodes) of the document; ConfigError unless the document, with every alias and merge key expanded, has at most
    MAX_DEPTH levels and ALIAS_GROWTH times its own nodes plus ALIAS_ALLOWANCE.

    Each node is measured once (its expanded size and height are memoized), so a file of
    nested aliases that would expand to billions of nodes is measured, and refused, in
    time linear in its own size.  An alias back into a node being measured counts once.
    """
    if root is None:
        return 1, 1
    measured = {}           # id(node) -> (expanded size, height, node)
    active = set()
    own = 0                 # nodes as written: every collection and the scalars in it
    stack = [(root, False)]
    while stack:
        node, leaving = stack.pop()
        key = id(node)
        if leaving:
            size, height = 1, 0
            for child in _children(node):
                own += isinstance(child, yaml.ScalarNode)
                child_size, child_height, _ = measured.get(id(child), (1, 1, None))
                size, height = min(size + child_size, 1 << 62), max(height, child_height)
            measured[key] = (size, height + 1, node)
            own += 1
            active.discard(key)
            if height + 1 > MAX_DEPTH:
                raise ConfigError(f"{path}:{line_of(node)}: the YAML is nested more than {MAX_DEPTH} "
                                  "levels deep here (aliases and merge keys included)")
        elif key not in measured and key not in active and not isinstance(node, yaml.ScalarNode):
            active.add(key)
            stack.append((node, True))
            stack.extend((child, False) for child in _children(node)
                         if not isinstance(child, yaml.ScalarNode) and id(child) not in measured)
    limit = ALIAS_GROWTH * own + ALIAS_ALLOWANCE
    if id(root) in measured and measured[id(root)][0] > limit:
        culprit = min((m for m in measured.values() if m[0] > limit), key=lambda m: m[0])
        raise ConfigError(f"{path}:{line_of(culprit[2])}: aliases and merge keys here expand the file "
                          f"to more than {limit:,} YAML nodes ({ALIAS_GROWTH} times its own plus "
                          f"{ALIAS_ALLOWANCE:,}); write the repeated parts out or share less")
    return measured[id(root)][0] if id(root) in measured else 1, max(own, 1)


def _decode(data, path):
    """UTF-8 text of ``data`` (a BOM is dropped); ConfigError naming the line of a bad byte."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise ConfigError(f"{path}:{line}: the file is not valid UTF-8 (byte 0x{data[exc.start]:02x});"
                          " save it as UTF-8") from None


def _compose(text, path):
    """The YAML node tree of ``text``, or ConfigError describing the syntax error and its line."""
    try:
        return yaml.compose(text, Loader=_YAML_LOADER)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else 1
        lines = text.splitlines()
        if mark and mark.line < len(lines) and lines[mark.line][mark.column:mark.column + 1] == "\t":
            problem = "a tab character here; YAML indents with spaces only"
        else:
            problem = exc.problem or "invalid YAML"
            if exc.context:
                problem = f"{problem} ({exc.context})"
            if "alias" in problem:
                problem += ("; a value that starts with '*' is read as an alias: "
                            "quote it, as in schedule: '*/20 * * * * *'")
        raise ConfigError(f"{path}:{line}: YAML syntax error: {problem}") from None
    except yaml.reader.ReaderError as exc:
        line = text[:exc.position].count("\n") + 1 if isinstance(exc.position, int) else 1
        raise ConfigError(f"{path}:{line}: {exc.reason}: character #x{exc.character:04x}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: YAML error: {exc}") from None
    except RecursionError:
        raise ConfigError(f"{path}: the YAML is nested too deeply") from None


class Bad(Exception):
    """A problem with one field; ``node`` (if given) is where it is, for the line number."""

    def __init__(self, message, node=None):
        super().__init__(message)
        self.node = node


def kind_of(node):
    if isinstance(node, yaml.MappingNode):
        return "a mapping"
    if isinstance(node, yaml.SequenceNode):
        return "a list"
    return _KINDS.get(node.tag, "a value")


def got(node):
    """``got yes (YAML reads it as a boolean)``: what was found, in the user's own spelling."""
    if isinstance(node, yaml.ScalarNode):
        if node.tag == STR:
            return f"got {shown(node.value, 60)!r}"
        if node.tag == NULL:
            return "got nothing (empty)"
        return f"got {shown(node.value, 60)} (YAML reads it as {kind_of(node)})"
    return f"got {kind_of(node)}"


def want_str(node, what="a string", limit=MAX_ARG_BYTES):
    """The text of a string scalar; other types are an error suggesting quotes where that helps.

    Every string of a task file passes here: a NUL byte (which no exec, path or name can
    hold) and text over ``limit`` bytes of UTF-8 are refused.
    """
    if node.tag == STR and isinstance(node, yaml.ScalarNode):
        value = node.value
        if "\x00" in value:
            raise Bad(f"a NUL byte (\\0) at character {value.index(chr(0)) + 1}; "
                      "no command, name or path can hold one", node)
        if len(value) > limit // 4 and len(value.encode("utf-8", "surrogatepass")) > limit:
            raise Bad(f"{len(value.encode('utf-8', 'surrogatepass')):,} bytes long; "
                      f"at most {limit:,} bytes", node)
        return value
    quotable = isinstance(node, yaml.ScalarNode) and node.tag != NULL
    hint = f"; quote it: \"{shown(node.value, 60)}\"" if quotable else ""
    raise Bad(f"expected {what}, {got(node)}{hint}", node)


def want_text(node, what="a string"):
    """A non-empty string scalar; integers are taken as written (``[sleep, 10]``, ``PORT: 8080``)."""
    if node.tag == INT and isinstance(node, yaml.ScalarNode):
        return node.value
    value = want_str(node, what)
    if not value.strip():
        raise Bad(f"expected {what}, got an empty string", node)
    return value


def want_word(node, what):
    """A one-line string (a user, a group, a path, a zone): no control characters, at most
    MAX_WORD_BYTES."""
    value = want_text(node, what) if node.tag == INT else want_str(node, what, MAX_WORD_BYTES)
    bad = _CONTROL.search(value)
    if bad:
        raise Bad(f"expected {what}, got a control character ({bad.group()!r}) in {shown(value, 60)!r}",
                  node)
    if not value.strip():
        raise Bad(f"expected {what}, got an empty string", node)
    return value


def want_int(node, minimum, maximum=MAX_COUNT, what="a whole number"):
    """A plain decimal integer in ``minimum``..``maximum`` (ASCII digits, an optional ``+``)."""
    if node.tag != INT or not isinstance(node, yaml.ScalarNode):
        raise Bad(f"expected {what} >= {minimum}, {got(node)}", node)
    try:
        value = parse_digits(node.value.removeprefix("+"), maximum)
    except OutOfRange:
        raise Bad(f"{shown(node.value)} is out of range {minimum}-{maximum}", node) from None
    except ValueError:
        raise Bad(f"expected {what} >= {minimum}, {got(node)}", node) from None
    if value < minimum:
        raise Bad(f"expected {what} >= {minimum}, got {value}", node)
    return value


def want_bool(node):
    if node.tag != BOOL:
        raise Bad(f"expected true or false, {got(node)}", node)
    return node.value.lower() in ("true", "yes", "on")


def want_duration(node, minimum=0):
    """Seconds from ``45``, ``45s``, ``15m``, ``2h``, ``1d``, ``1h30m``."""
    if not isinstance(node, yaml.ScalarNode) or node.tag not in (STR, INT):
        raise Bad(f"expected a duration like 45s, 15m, 2h, 1d or 1h30m, {got(node)}", node)
    try:
        value = _cached_duration(node.value)
    except ValueError as exc:
        raise Bad(str(exc), node) from None
    if value < minimum:
        raise Bad(f"expected a duration of at least {minimum}s, got {node.value}", node)
    return value


_cached_duration = functools.lru_cache(maxsize=1024)(parse_duration)  # tasks repeat their timeouts


def want_size(node):
    """Bytes from ``1048576``, ``512K``, ``512M``, ``2G``."""
    if not isinstance(node, yaml.ScalarNode) or node.tag not in (STR, INT):
        raise Bad(f"expected a size like 512K, 512M or 2G, {got(node)}", node)
    try:
        value = parse_size(node.value)
    except ValueError as exc:
        raise Bad(str(exc), node) from None
    if value <= 0:
        raise Bad(f"expected a size above 0, got {node.value}", node)
    return value


def want_list(node, what):
    if not isinstance(node, yaml.SequenceNode):
        raise Bad(f"expected a list of {what}, {got(node)}", node)
    return node.value


def suggest(key, known):
    """`` (did you mean 'max'?)`` for a misspelt key, or nothing."""
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def line_of(node):
    return node.start_mark.line + 1
