"""Writes docs/configuration.md from train_gpt.py: the knobs as `python train_gpt.py --help` lists them (same
defaults and help texts, read off its lines) in sections, one per comment line of the Hyperparameters field list,
plus the published script's accepted switches.
Deterministic and quick (imports train_gpt, runs nothing); tests/test_docs.py fails when the page is out of date.

    python tests/gen_config_doc.py      # any Python with torch, e.g. .venv/bin/python after ./run.sh
"""
from __future__ import annotations

import dataclasses
import inspect
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "configuration.md"
COMMAND = "python tests/gen_config_doc.py"


def cell(text: str) -> str:
    """Table-cell text that GitHub shows as written."""
    for c in "\\|*<":
        text = text.replace(c, "\\" + c)
    return text


def knob_sections(tg) -> list[tuple[str, list[tuple[str, str, str]]]]:
    """(section, [(KNOB, default, help)]) in the order of Hyperparameters, a section per comment line of its field
    list; each row is read off `train_gpt.py --help` (help_text), so the page shows the same text."""
    fields = {f.name: f for f in dataclasses.fields(tg.Hyperparameters)}
    lines = {line.split()[0]: line for line in tg.help_text().splitlines() if line.split()[:1]}
    sections: list = []
    for src in inspect.getsource(tg.Hyperparameters).splitlines():
        name = src[4:].split(":")[0]
        if src.startswith("    # "):
            sections.append((src[6:], []))
        elif name in fields:
            row, meaning = lines[name.upper()], fields[name].metadata["help"]
            assert row.endswith(meaning), row
            sections[-1][1].append((name.upper(), row[len(name):-len(meaning)].strip(), meaning))
    return [s for s in sections if s[1]]


def render(tg) -> str:
    sections = knob_sections(tg)
    out = ["# Configuration", "",
           "Every setting of `train_gpt.py` is an environment variable, set on the command line (`SEED=1 ./run.sh "
           "train`);",
           "a misspelt name or a malformed value is refused with one line naming the variable. Defaults: the "
           "published run.", "",
           f"*Generated from the code by `{COMMAND}`: the same text as `python train_gpt.py --help`, in the",
           "sections of its `Hyperparameters` dataclass. Do not edit by hand; `tests/test_docs.py` fails when this "
           "page is out of date.*", "",
           "Sections: " + " · ".join(f"[{heading(title)}](#{slug(title)})" for title, _ in sections)
           + " · [Switches of the published script](#switches-of-the-published-script)", ""]
    for title, rows in sections:
        out += [f"## {heading(title)}", "", "| knob | default | meaning |", "|---|---|---|"]
        out += [f"| `{name}` | {'—' if default == '-' else f'`{default}`'} | {cell(meaning)} |"
                for name, default, meaning in rows]
        out.append("")
    out += ["## Switches of the published script", "",
            "Accepted so that the published script's launch commands work unchanged: at its run's value only (any "
            "other value is refused", "with one line), or, where the value column says so, with no effect here.", "",
            "| switch | accepted value | why |", "|---|---|---|"]
    out += [f"| `{key}` | {f'`{fixed}`' if fixed is not None else 'any (no effect here)'} | {cell(why) or '—'} |"
            for key, (fixed, why) in tg.SEED_KNOBS.items()]
    return "\n".join(out) + "\n"


def heading(title: str) -> str:
    return title[:1].upper() + title[1:]


def slug(title: str) -> str:
    """GitHub's anchor for a heading: its text (code spans and links as their text), lower case, without
    punctuation other than '-' and '_', each space a '-' (a repeated heading gets -1, -2, ...: tests/test_docs.py)."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", title.replace("`", ""))
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    import train_gpt

    PAGE.write_text(render(train_gpt))
    print(f"wrote {PAGE.relative_to(ROOT)}")
