"""The documentation: README.md and docs/*.md link only to files and #anchors that exist, name only `./run.sh`
verbs that exist, stay short where promised, and docs/configuration.md is what tests/gen_config_doc.py makes of the
code (so knobs and docs cannot drift)."""
from __future__ import annotations

import dataclasses
import re

from conftest import ROOT, tg
import gen_config_doc  # noqa: E402  (tests/gen_config_doc.py)

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```.*?^```", re.M | re.S)  # code blocks: neither headings nor links
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def prose(page) -> str:
    return FENCE.sub("", page.read_text())


def anchors(page) -> set[str]:
    """The anchors GitHub gives the page's headings (a repeated heading: slug-1, slug-2, ...)."""
    seen: dict[str, int] = {}
    out = set()
    for m in re.finditer(r"^#{1,6} +(.+?)\s*$", prose(page), re.M):
        s = gen_config_doc.slug(m.group(1))
        out.add(f"{s}-{seen[s]}" if s in seen else s)
        seen[s] = seen.get(s, 0) + 1
    return out


def test_links_and_anchors_resolve():
    assert len(PAGES) >= 5, PAGES  # README.md and the docs pages
    broken = []
    for page in PAGES:
        for target in LINK.findall(prose(page)):
            if re.match(r"[a-z]+:", target):  # https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.is_file() or ROOT not in dest.parents:
                broken.append(f"{page.name}: {target} (no such file in the project)")
            elif anchor and anchor not in anchors(dest):
                broken.append(f"{page.name}: {target} (no heading #{anchor} in {dest.name})")
    assert not broken, "\n".join(broken)


def test_run_sh_verbs_named_in_docs_exist():
    script = (ROOT / "run.sh").read_text()
    cases = script[script.index('case "$cmd" in'):script.rindex("esac")]
    verbs = {v for line in re.findall(r"^  ([a-z|]+)\)$", cases, re.M) for v in line.split("|")}
    assert {"smoke", "test", "data", "train", "eval"} <= verbs, verbs
    named = {(page.name, v) for page in PAGES for v in re.findall(r"\./run\.sh +([a-z]+)", page.read_text())}
    assert {v for _, v in named} >= {"smoke", "test", "data", "train", "eval", "compare"}
    assert not [(p, v) for p, v in named if v not in verbs], f"run.sh has only {sorted(verbs)}"


def test_no_page_or_file_points_outside_the_project():
    """Nothing may need or mention the team's private folder next to the project."""
    private = "../" + "shared"
    patterns = ("*.md", "*.sh", "*.py", "*.txt", "docs/*.md", "tests/*.py", "tests/*.sh", ".ci/*")
    files = [p for pattern in patterns for p in ROOT.glob(pattern)]
    hits = [str(p.relative_to(ROOT)) for p in files if p.is_file() and private in p.read_text(errors="replace")]
    assert len(files) > 20 and not hits, hits


def test_config_doc_is_generated_from_the_code():
    sections = gen_config_doc.knob_sections(tg)
    listed = [name for _, rows in sections for name, _, _ in rows]
    assert listed == [f.name.upper() for f in dataclasses.fields(tg.Hyperparameters)]  # each knob once, in order
    page = ROOT / "docs" / "configuration.md"
    assert page.read_text() == gen_config_doc.render(tg), f"docs/configuration.md is out of date: run " \
                                                          f"`{gen_config_doc.COMMAND}` and commit the result"


def test_readme_is_short_and_each_page_opens_with_a_two_line_summary():
    lines = len((ROOT / "README.md").read_text().splitlines())
    assert lines <= 200, f"README.md: {lines} lines; move reference material into docs/"
    for page in PAGES[1:]:
        head = page.read_text().splitlines()[:5]
        assert head[0].startswith("# ") and head[1] == "" and all(head[2:4]) and head[4] == "", (page.name, head)


def test_readme_knob_table_shows_the_code_defaults():
    defaults = {name: default for _, rows in gen_config_doc.knob_sections(tg) for name, default, _ in rows}
    rows = re.findall(r"^\| `([A-Z0-9_]+)` \| `([^`]*)` \|", (ROOT / "README.md").read_text(), re.M)
    assert len(rows) == 10, rows  # the ten knobs people change most
    assert not [(k, d, defaults.get(k)) for k, d in rows if defaults.get(k) != d], "README default != the code's"
