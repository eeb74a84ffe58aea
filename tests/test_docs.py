"""The documentation holds together: links resolve, named tests exist, the README's commands are CI's.

README.md is the front door and docs/*.md the reference; they point at each other, at files of the
repository and at the tests behind each promise.  A moved heading, a renamed file or a renamed test
breaks a link silently; these tests make it loud.  The README's first code block is also what CI runs
(.ci/run runs "the README's test command, as written there"), so the two must not drift apart.
"""

import pathlib
import re

import pytest

from torchcore import config

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, *DOCS, ROOT / "benchmarks" / "RESULTS.md"]

FENCE = re.compile(r"^```.*?^```[ \t]*$", re.M | re.S)
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"\[(?:[^\[\]]|\[[^\]]*\])*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^(#{1,6})[ \t]+(.+?)[ \t]*#*[ \t]*$", re.M)
CI_MARK = "# --- the README's test command, as written there ---"


def _prose(text):
    """The text outside code: fenced blocks and inline code spans blanked out."""
    return INLINE_CODE.sub("", FENCE.sub("", text))


def _slug(heading):
    """GitHub's anchor for a heading: lower case, markup and punctuation dropped, spaces to '-'."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)     # a link keeps its text
    text = text.replace("`", "").replace("*", "").lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path):
    """Every anchor a page's headings make, with GitHub's -1, -2 ... for repeated ones."""
    seen, result = {}, set()
    for match in HEADING.finditer(FENCE.sub("", path.read_text())):
        slug = _slug(match.group(2))
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        result.add(slug if count == 0 else f"{slug}-{count}")
    return result


def relative_links(path):
    """(target, anchor) of every link on the page that is not to another site."""
    for match in LINK.finditer(_prose(path.read_text())):
        url = match.group(1)
        if re.match(r"^[a-z][a-z0-9+.-]*:", url):      # http:, https:, mailto: ...
            continue
        target, _, anchor = url.partition("#")
        yield target, anchor


def broken_links(path):
    problems = []
    for target, anchor in relative_links(path):
        where = (path.parent / target).resolve() if target else path
        if not where.exists():
            problems.append(f"{target}: no such file")
        elif anchor and where.suffix == ".md" and anchor not in anchors(where):
            problems.append(f"{target}#{anchor}: no such heading in {where.name}")
        elif anchor and where.suffix != ".md":
            problems.append(f"{target}#{anchor}: an anchor into a file that is not markdown")
    return problems


def test_the_slugs_are_github_s():
    assert _slug("Shared paths and security") == "shared-paths-and-security"
    assert _slug("`status --json`") == "status---json"
    assert _slug("Values, bounds and YAML") == "values-bounds-and-yaml"
    assert _slug("How a run travels") == "how-a-run-travels"


def test_a_broken_link_is_found(tmp_path):
    (tmp_path / "other.md").write_text("# Other\n\n## A part\n")
    page = tmp_path / "page.md"
    page.write_text("# Page\n\n[ok](other.md#a-part) [self](#page) [gone](missing.md) "
                    "[bad](other.md#no-part) [web](https://example.com/x.md) `[code](nope.md)`\n"
                    "```\n[fenced](nope.md)\n```\n")
    assert broken_links(page) == ["missing.md: no such file",
                                  "other.md#no-part: no such heading in other.md"]


def test_the_docs_pages_exist():
    names = {path.name for path in DOCS}
    assert {"task-file.md", "operations.md", "import.md", "semantics.md", "architecture.md",
            "benchmarks.md"} <= names


@pytest.mark.parametrize("page", PAGES, ids=lambda path: str(path.relative_to(ROOT)))
def test_every_relative_link_resolves(page):
    assert broken_links(page) == []


def test_the_readme_links_to_every_docs_page():
    linked = {(README.parent / target).resolve() for target, _ in relative_links(README)}
    assert [path.name for path in DOCS if path.resolve() not in linked] == []


def _first_code_block(text):
    block = FENCE.search(text).group(0)
    return block.split("\n")[1:-1]


def test_the_readme_s_first_code_block_is_install_and_start_then_ci_s_test_command():
    text = README.read_text()
    assert FENCE.search(text).start() < text.index("\n## "), "the commands come before any section"
    install, tests = _first_code_block(text)
    ci = (ROOT / ".ci" / "run").read_text().split("\n")
    ci_command = ci[ci.index(CI_MARK) + 1].strip()
    assert tests.split("#")[0].strip() == ci_command
    assert install.split("#")[0].strip() == (
        "python3 -m venv .venv && .venv/bin/pip install . && .venv/bin/torchcore start -c tasks.yaml")


def test_the_readme_s_minimal_task_file_is_valid():
    text = README.read_text()
    section = text[text.index("## A minimal task file"):]
    block = re.search(r"^```yaml\n(.*?)^```", section, re.M | re.S).group(1)
    taskfile = config.loads(block)
    assert [task.name for task in taskfile.tasks] == ["backup-db", "queue-worker"]


TEST_FILE = re.compile(r"\btest_\w+\.py\b")
TEST_NAME = re.compile(r"\b(?:(test_\w+\.py)::)?(test_\w+?)(_?\.\.\.)?(?![\w.])")


def _defined_tests():
    """test name -> the test files defining it (a function or a parametrized test's base name)."""
    found = {}
    for path in (ROOT / "tests").glob("test_*.py"):
        for name in re.findall(r"^\s*(?:async\s+)?def (test_\w+)", path.read_text(), re.M):
            found.setdefault(name, set()).add(path.name)
    return found


def named_tests(text):
    """(file or None, name, is_prefix) for each test the text names."""
    for match in TEST_NAME.finditer(text):
        yield match.group(1), match.group(2), bool(match.group(3))


@pytest.mark.parametrize("page", PAGES, ids=lambda path: str(path.relative_to(ROOT)))
def test_every_test_the_docs_name_exists(page):
    text = page.read_text()
    defined = _defined_tests()
    missing = [name for name in TEST_FILE.findall(text) if not (ROOT / "tests" / name).exists()]
    for file, name, prefix in named_tests(text):
        if prefix:
            found = any(test.startswith(name) for test in defined)
        else:
            found = name in defined and (file is None or file in defined[name])
        if not found:
            missing.append(f"{file}::{name}" if file else name + ("..." if prefix else ""))
    assert missing == []


def test_a_misnamed_test_is_found():
    names = list(named_tests("Tests: `test_x.py::test_alpha`, `test_beta_...`, `test_gamma`."))
    assert names == [("test_x.py", "test_alpha", False), (None, "test_beta", True),
                     (None, "test_gamma", False)]


def test_every_semantics_promise_names_its_test():
    text = (ROOT / "docs" / "semantics.md").read_text()
    promises = re.split(r"^- ", text.split("## Reliability figures")[0], flags=re.M)[1:]
    assert len(promises) >= 25
    assert [p.split("\n")[0] for p in promises if not (TEST_NAME.search(p) or TEST_FILE.search(p))] == []


def test_the_module_map_places_every_module_and_no_module_is_over_600_lines():
    """docs/architecture.md's module map names every module of the package (issue 14's
    promise to a newcomer), and each module stays a size one can read."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    package = ROOT / "torchcore"
    missing, long = [], []
    for path in sorted(package.rglob("*.py")):
        name = path.relative_to(package).as_posix()
        if f"`{name}`" not in text and f"`{path.name}`" not in text:
            missing.append(name)
        lines = len(path.read_text().splitlines())
        if lines > 600:
            long.append(f"{name}: {lines} lines")
    assert missing == [], f"not in docs/architecture.md's module map: {missing}"
    assert long == []
