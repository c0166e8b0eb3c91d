"""The documentation says what is true today: no work history outside CHANGELOG.md, links
that resolve, a README read in minutes, and the README's commands are the ones CI runs."""

import pathlib
import re
import shlex

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
CI = ROOT / ".ci" / "run"
CODE = ("sdim_tf", "pipeline", "bench", "tests")
README_MAX_LINES = 220

# Work history: numbered working sessions and tracker issues. Written so that this file's
# own source does not match it.
HISTORY = re.compile(r"\b(?:sess)ions?\s+\d|\bbefore\s+(?:sess)ion\b|\b(?:iss)ue\s*[-#]*\s*\d",
                     re.IGNORECASE)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def doc_pages() -> list[pathlib.Path]:
    return [README, *sorted((ROOT / "docs").rglob("*.md"))]


def links(text: str) -> list[str]:
    """The link targets of markdown text, code blocks and inline code left out."""
    text = re.sub(r"`[^`\n]*`", "", FENCE.sub("", text))
    return LINK.findall(text)


def relative_links(page: pathlib.Path) -> list[tuple[str, str]]:
    """(path, anchor) of every link that stays in the repository."""
    found = []
    for target in links(page.read_text()):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        found.append((path, anchor))
    return found


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: pathlib.Path) -> set[str]:
    seen: dict[str, int] = {}
    found = set()
    for line in FENCE.sub("", page.read_text()).splitlines():
        match = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if match:
            base = slug(match.group(1))
            count = seen.get(base, 0)
            seen[base] = count + 1
            found.add(base if count == 0 else f"{base}-{count}")
    return found


def history_files() -> list[pathlib.Path]:
    """README, docs/, the bench reports the docs link to, and the project's Python."""
    files = set(doc_pages())
    for page in doc_pages():
        for path, _ in relative_links(page):
            target = (page.parent / path).resolve()
            if path and target.suffix == ".md" and target.is_file():
                files.add(target)
    for folder in CODE:
        files.update(p for p in (ROOT / folder).rglob("*.py") if "__pycache__" not in p.parts)
    files.discard(ROOT / "CHANGELOG.md")
    return sorted(files)


def test_history_pattern_catches_what_it_must():
    session, issue = "sess" + "ion", "iss" + "ue"  # spelled apart: this file is scanned too
    for text in (f"{session.title()} 9's run", f"{session}s 4-5", f"before {session} 13",
                 f"{issue} 19", f"{issue}-12", f"{issue} #20", f"({issue} 12; docs)"):
        assert HISTORY.search(text), text
    for text in ("pytest session fixture", "scope=\"session\"", "keras-team/keras#20585",
                 "an issue with 3 causes", "tf.compat.v1.Session()", "issues/123"):
        assert not HISTORY.search(text), text


def test_no_work_history_outside_the_changelog():
    offenders = []
    for path in history_files():
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if HISTORY.search(line):
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not offenders, "history belongs in CHANGELOG.md:\n" + "\n".join(offenders)


def test_the_changelog_exists_with_an_unreleased_section():
    text = (ROOT / "CHANGELOG.md").read_text()
    headings = re.findall(r"^## (.+)$", text, re.M)
    assert headings and headings[0] == "Unreleased"


@pytest.mark.parametrize("page", doc_pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    broken = []
    for path, anchor in relative_links(page):
        target = (page.parent / path).resolve() if path else page
        if not target.exists():
            broken.append(f"{path}: no such file")
        elif ROOT not in target.parents and target != ROOT:
            broken.append(f"{path}: outside the repository")
        elif anchor and target.suffix == ".md" and anchor not in anchors(target):
            broken.append(f"{path}#{anchor}: no such heading in {target.relative_to(ROOT)}")
    assert not broken, f"{page.relative_to(ROOT)}: " + "; ".join(broken)


def test_link_and_anchor_helpers():
    assert slug("Two commands (fresh machine, from the repository root)") == \
        "two-commands-fresh-machine-from-the-repository-root"
    assert slug("Watching a deployed model: the drift alarm") == \
        "watching-a-deployed-model-the-drift-alarm"
    assert slug("The `attack` stage") == "the-attack-stage"
    assert links("[a](x.md) ![b](img/y.png \"title\") `[c](z.md)`\n```\n[d](w.md)\n```\n") \
        == ["x.md", "img/y.png"]
    assert ("docs/pipeline.md", "") in relative_links(README)


def test_readme_is_short():
    lines = README.read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines"


def _readme_commands() -> list[str]:
    """The one-line commands of the README's "Two commands" section."""
    text = README.read_text()
    section = re.search(r"^## Two commands.*?$(.*?)^## ", text, re.S | re.M)
    assert section, "README.md has no '## Two commands' section"
    blocks = re.findall(r"^```bash\n(.*?)\n```", section.group(1), re.S | re.M)
    assert len(blocks) == 2 and all("\n" not in b for b in blocks), blocks
    return blocks


def _ci_steps() -> list[list[str]]:
    """The commands .ci/run runs, as token lists, pip's --quiet left out."""
    steps = []
    for line in CI.read_text().splitlines():
        line = line.split(" #")[0].strip()
        if not line or line.startswith("#"):
            continue
        try:
            tokens = shlex.split(line)
        except ValueError:  # a shell construct shlex cannot read: not a README step
            continue
        steps.append([t for t in tokens if t != "--quiet"])
    return steps


def _steps(command: str) -> list[list[str]]:
    return [shlex.split(step) for step in command.split(" && ")]


def test_readme_commands_are_what_ci_runs():
    main, tests = _readme_commands()
    ci = _ci_steps()
    # The test command: each step is a line of .ci/run, in order.
    position = 0
    for step in _steps(tests):
        assert step in ci[position:], f"README test step {shlex.join(step)!r} is not in .ci/run"
        position = ci.index(step, position) + 1
    assert _steps(tests)[-1][-3:] == ["pytest", "-q", "tests"]
    # The main command sets up the same environment, without the test extra, and runs the
    # pipeline on the same data folder.
    venv, activate, install, run = _steps(main)
    assert [venv, activate] == _steps(tests)[:2]
    assert install == ["." if t == ".[test]" else t for t in _steps(tests)[2]]
    assert run[0] == _steps(tests)[-1][0] and run[0].startswith("SDIM_DATA_DIR=")
    assert run[1:4] == ["python", "-m", "pipeline.run"]
    assert (ROOT / "pipeline" / "run.py").is_file()
