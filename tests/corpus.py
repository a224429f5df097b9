"""The project's own test and smoke data: a text corpus from the Python standard library's docstrings
(plus the reference-manual topics that ship with it and a few hand-written documents in several scripts),
a 1,024-piece SentencePiece BPE tokenizer trained with the challenge's settings, and shards in the
challenge's format. Deterministic: the same bytes on every run on the same Python and sentencepiece.

    python tests/corpus.py OUT_DIR      # writes OUT_DIR/{tokenizer.model, fineweb_train_00000{0,1}.bin,
                                        #   fineweb_val_000000.bin, docs_val.jsonl, manifest.json}

Used by `./run.sh smoke` and by the test suite (tests/conftest.py builds it once into tests/.cache/).
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib
import inspect
import io
import json
import os
import pkgutil
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

# Modules whose import has side effects (a browser, a window, printed text) or that hold test suites.
SKIP = {"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "test", "tests", "lib2to3", "ensurepip",
        "venv", "pydoc_data", "__main__"}
VAL_EVERY = 10  # every 10th docstring is a validation document

# Hand-written documents. MULTILINGUAL_TRAIN is in the training text (so its letters - accented Latin, Greek,
# Cyrillic: 2-byte UTF-8 - become pieces of the vocabulary); MULTILINGUAL_VAL is only in the validation text,
# so its CJK, Devanagari, Arabic and emoji characters are unknown to the tokenizer (id 3, a boundary), and a
# word after one of them starts with a '▁' piece that follows a boundary.
MULTILINGUAL_TRAIN = """Café au lait, crème brûlée and a naïve façade: déjà vu in São Paulo, Zürich and Kraków.
Straße, Größe, Übung; señor, año, mañana; smörgåsbord, fjörd, Ærø, Łódź, Dvořák, Šiška, Čapek, Ğazi.
Ελληνικά: η γρήγορη καφέ αλεπού πηδάει πάνω από τον τεμπέλη σκύλο. Αλφα, βήτα, γάμμα, δέλτα, ψ, ω.
Русский: съешь же ещё этих мягких французских булок, да выпей чаю. Привет, мир! Жёлтый ёж.
Quotes “double” and ‘single’, dashes – and —, ellipsis…, degrees 25°, prices €5, £3, ¥100, ±1, ×2, ÷3."""
MULTILINGUAL_VAL = """Tokyo is 東京 and Beijing is 北京; 日本語 text has no spaces at all.
Hindi: नमस्ते दुनिया. Arabic: مرحبا بالعالم. Hebrew: שלום עולם. Korean: 안녕하세요 세계.
Emoji 🎉 party 🚀 launch ✅ done; math ∀x ∈ ℝ: x² ≥ 0, ∑ and ∫; café, Straße, Ελληνικά and Привет again.
A ligature ﬁ, a fraction ½ and full-width ＡＢＣ are normalised (NFKC) before tokenization."""


def stdlib_modules() -> list[str]:
    """Every importable standard-library module and submodule, sorted, minus SKIP and private ones."""
    names = set()
    for name in sorted(sys.stdlib_module_names):
        if name.startswith("_") or name in SKIP:
            continue
        names.add(name)
        mod = quiet_import(name)
        for m in pkgutil.walk_packages(getattr(mod, "__path__", None) or [], name + ".", onerror=lambda _: None):
            if not any(p.startswith("_") or p in SKIP for p in m.name.split(".")):
                names.add(m.name)
    return sorted(names)


def quiet_import(name: str):
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            return importlib.import_module(name)
    except BaseException:  # a module that needs a missing C library, or exits on import
        return None


def docstrings() -> list[str]:
    """Docstrings (> 120 characters) of each module, its classes and functions and the classes' methods,
    in module order, each once; then the reference-manual topics of pydoc_data."""
    docs, seen = [], set()
    for name in stdlib_modules():
        mod = quiet_import(name)
        if mod is None:
            continue
        objs = [mod]
        for _, v in sorted(vars(mod).items()):
            if (inspect.isclass(v) or inspect.isfunction(v)) and getattr(v, "__module__", None) == name:
                objs.append(v)
                if inspect.isclass(v):
                    objs += [m for _, m in sorted(vars(v).items()) if inspect.isfunction(m)]
        for obj in objs:
            d = inspect.getdoc(obj)
            if d and len(d) > 120 and d not in seen:
                seen.add(d)
                docs.append(d)
    from pydoc_data.topics import topics
    docs += [topics[k].strip() for k in sorted(topics) if len(topics[k].strip()) > 120]
    return docs


def write_shard(path: Path, tokens: np.ndarray) -> None:
    header = np.zeros(256, dtype="<i4")
    header[:3] = (20240520, 1, len(tokens))
    path.write_bytes(header.tobytes() + tokens.astype("<u2").tobytes())


def build(out: Path) -> dict:
    """Write the corpus into `out` (created; files replaced). Returns the manifest."""
    import sentencepiece as spm
    t0 = time.perf_counter()
    warnings.filterwarnings("ignore")
    docs = docstrings()
    val_docs = [d for i, d in enumerate(docs) if i % VAL_EVERY == VAL_EVERY - 1] + [MULTILINGUAL_VAL]
    train_docs = [d for i, d in enumerate(docs) if i % VAL_EVERY != VAL_EVERY - 1] + [MULTILINGUAL_TRAIN] * 3
    out.mkdir(parents=True, exist_ok=True)
    lines = [line for d in train_docs for line in d.splitlines() if line.strip()]
    model = io.BytesIO()  # not model_prefix: the model would record that (temporary) path and differ per build
    with contextlib.redirect_stderr(io.StringIO()):
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines), model_writer=model, vocab_size=1024, model_type="bpe",
            normalization_rule_name="nmt_nfkc", remove_extra_whitespaces=True, add_dummy_prefix=False,
            byte_fallback=False, bos_id=1, eos_id=2, unk_id=3, pad_id=0, character_coverage=1.0,
            shuffle_input_sentence=False, input_sentence_size=0, num_threads=1, minloglevel=2)
    (out / "tokenizer.model").write_bytes(model.getvalue())
    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    encode = lambda ds: np.concatenate([np.array([1] + sp.encode(d), dtype=np.int64) for d in ds])
    train, val = encode(train_docs), encode(val_docs)
    half = len(train) // 2
    files = {"fineweb_train_000000.bin": train[:half], "fineweb_train_000001.bin": train[half:],
             "fineweb_val_000000.bin": val}
    for name, toks in files.items():
        write_shard(out / name, toks)
    with open(out / "docs_val.jsonl", "w", encoding="utf-8") as f:
        for d in val_docs:
            f.write(json.dumps({"text": d}, ensure_ascii=False) + "\n")
    manifest = {"docs_train": len(train_docs), "docs_val": len(val_docs), "tokens_train": int(len(train)),
                "tokens_val": int(len(val)), "python": sys.version.split()[0], "sentencepiece": spm.__version__,
                "sha256": {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
                           for p in sorted(out.iterdir()) if p.name != "manifest.json"}}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    print(f"corpus: {len(train_docs)} train docs ({len(train):,} tokens), {len(val_docs)} val docs "
          f"({len(val):,} tokens) in {out} ({time.perf_counter() - t0:.1f}s)", flush=True)
    return manifest


def ensure(out: Path) -> Path:
    """Build `out` unless a complete copy is there (manifest written last); concurrent builders are safe:
    each writes a private folder and renames it into place."""
    if (out / "manifest.json").exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        build(tmp)
        try:
            os.rename(tmp, out)
        except OSError:  # another process got there first (or a partial folder without manifest is in the way)
            if not (out / "manifest.json").exists():
                shutil.rmtree(out, ignore_errors=True)
                os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python tests/corpus.py OUT_DIR")
    ensure(Path(sys.argv[1]))
