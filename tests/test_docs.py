"""The documentation says what is true today: no work history outside CHANGELOG.md, links
that resolve, a README read in minutes, the README's commands are the ones CI runs, and the
flag tables name pipeline.run's flags with their defaults."""

import functools
import pathlib
import re
import shlex

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
CI = ROOT / ".ci" / "run"
CODE = ("sdim_tf", "pipeline", "bench", "tests")
README_MAX_LINES = 200

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
    assert _steps(tests)[-1][1:4] == ["python", "-m", "pytest"]
    assert _steps(tests)[-1][-1] == "tests"
    # The main command sets up the same environment, without the test extra, and runs the
    # pipeline on the same data folder.
    venv, activate, install, run = _steps(main)
    assert [venv, activate] == _steps(tests)[:2]
    assert install == ["." if t == ".[test]" else t for t in _steps(tests)[2]]
    assert run[0] == _steps(tests)[-1][0] and run[0].startswith("SDIM_DATA_DIR=")
    assert run[1:4] == ["python", "-m", "pipeline.run"]
    assert (ROOT / "pipeline" / "run.py").is_file()


# docs/pipeline.md's flag tables: a row's first cell names its flags (`--name`, or
# `--prefix*` for the flags of the page the row links to), the second their defaults.
PIPELINE_DOC = ROOT / "docs" / "pipeline.md"
FLAG_TABLE = "| flag | default | meaning |"
FLAG_NAME = re.compile(r"`--([a-z0-9_]+\*?)")
CELL = re.compile(r"(?<!\\)\|")
# A number as the tables write it: 128, 1e-3, 0 (off), 4 MiB, 2 x 4096²
QUANTITY = re.compile(r"(\d[\d.e-]*)(?: x (\d+)²)?( MiB)?")


def _flag_rows(page: pathlib.Path) -> list[list[str]]:
    """The cells of every row of the page's flag tables."""
    rows, inside = [], False
    for line in page.read_text().splitlines():
        if line == FLAG_TABLE:
            inside = True
        elif inside and line.startswith("|"):
            if not line.startswith("|---"):
                rows.append([c.strip() for c in CELL.split(line.strip())[1:-1]])
        else:
            inside = False
    return rows


@functools.cache
def _run_flags() -> dict:
    """{name: absl flag} of pipeline.run: those --help lists, the attack's (--helpfull)."""
    from absl import flags

    from pipeline import run

    flag_values = flags.FlagValues()
    run.define_flags(flag_values)
    return {name: flag_values[name] for name in flag_values}


def _linked_page(cells: list[str]) -> pathlib.Path:
    targets = [t for t in links(" | ".join(cells)) if ".md" in t]
    assert targets, f"{cells[0]}: a row of flags by prefix links to the page naming them"
    return PIPELINE_DOC.parent / targets[0].partition("#")[0]


def _is_flag(name: str, every: dict) -> bool:
    """`name` a flag, `prefix*` the prefix of one, `noname` a boolean flag's negation."""
    if name.endswith("*"):
        return any(f.startswith(name[:-1]) for f in every)
    negated = every.get(name.removeprefix("no")) if name.startswith("no") else None
    return name in every or negated is not None and negated.flag_type() == "bool"


def _documented(page: pathlib.Path, name: str) -> bool:
    return re.search(rf"`--{name}[`=]", page.read_text()) is not None


def _flag_pages() -> list[pathlib.Path]:
    """pipeline.md and the pages its `--prefix*` rows send the reader to."""
    return [PIPELINE_DOC, *sorted({_linked_page(cells) for cells in _flag_rows(PIPELINE_DOC)
                                   if "*" in cells[0]})]


def _shows(text: str, default) -> bool:
    """Whether a table's default cell (one flag's part of it) states the code's default."""
    if isinstance(default, bool):
        return text.split()[0] == ("on" if default else "off")
    if isinstance(default, (int, float)):
        number = QUANTITY.match(text)
        if not number:
            return False
        value, squared, mib = number.groups()
        return float(value) * int(squared or 1) ** 2 * (2 ** 20 if mib else 1) == default
    if isinstance(default, list):  # absl's list flags: the values as strings
        return text.split()[0].strip("`") == (",".join(default) or "none")
    shown = re.match(r"`([^`]*)`", text)
    return bool(shown) and shown[1] == default


def test_the_flag_tables_list_every_flag_of_run():
    every = _run_flags()
    rows = _flag_rows(PIPELINE_DOC)
    assert rows, f"no '{FLAG_TABLE}' table in {PIPELINE_DOC.name}"
    named = {n for cells in rows for n in FLAG_NAME.findall(cells[0])}
    missing = set(every) - named
    for cells in rows:
        for prefix in (n[:-1] for n in FLAG_NAME.findall(cells[0]) if n.endswith("*")):
            covered = {name for name in every if name.startswith(prefix)}
            page = _linked_page(cells)
            assert covered, f"--{prefix}* names no flag"
            assert all(_documented(page, n) for n in covered), \
                f"{page.name} lacks {sorted(n for n in covered if not _documented(page, n))}"
            missing -= covered
    assert not missing, f"{PIPELINE_DOC.name}'s flag tables lack {sorted(missing)}"


@pytest.mark.parametrize("page", _flag_pages(), ids=lambda p: p.name)
def test_every_flag_a_flag_table_names_is_a_flag_with_that_default(page):
    every = _run_flags()
    rows = _flag_rows(page)
    assert rows
    unknown, wrong = [], []
    for cells in rows:
        unknown += [n for cell in cells for n in FLAG_NAME.findall(cell)
                    if not _is_flag(n, every)]
        names = [n for n in FLAG_NAME.findall(cells[0]) if not n.endswith("*")]
        if not names or not cells[1]:
            continue
        parts = [cells[1]] if len(names) == 1 else cells[1].split(", ")
        assert len(parts) == len(names), f"{page.name}: {cells[0]} has defaults {cells[1]}"
        # a default of None is filled in from other flags; the cell says how
        wrong += [f"--{n}: {part!r}, code {every[n].default!r}"
                  for n, part in zip(names, parts, strict=True) if n in every
                  and every[n].default is not None and not _shows(part, every[n].default)]
    assert not unknown, f"{page.name} names flags pipeline.run lacks: {sorted(unknown)}"
    assert not wrong, f"{page.name}'s defaults differ from the code's: {wrong}"


def test_a_default_cell_is_read_as_written():
    assert _shows("0 (off)", 0.0) and _shows("1e-3", 0.001) and _shows("4 MiB", 4 * 2 ** 20)
    assert _shows("2 x 4096²", 2 * 4096 ** 2) and not _shows("2 x 4096²", 4096 ** 2)
    assert _shows("`quad3,quad4,head`", ["quad3", "quad4", "head"]) and _shows("none", [])
    assert _shows("on", True) and not _shows("off", True) and not _shows("`pgd`", "fgsm")
