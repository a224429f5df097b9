"""The project's own test and smoke data: a text corpus from the Python standard library's docstrings
(plus the reference-manual topics that ship with it and a few hand-written documents in several scripts),
a 1,024-piece SentencePiece BPE tokenizer trained with the challenge's settings, and shards in the
challenge's format. Deterministic: the same bytes on every run on the same Python and sentencepiece.

    python tests/corpus.py OUT_DIR      # writes OUT_DIR/{tokenizer.model, fineweb_train_00000{0,1}.bin,
                                        #   fineweb_val_000000.bin, docs_val.jsonl, manifest.json}

Used by `./run.sh smoke` (into runs/smoke_data), the test suite and tests/bench.py (`cached()`: built once
into tests/.cache/corpus-KEY, KEY naming this file's version).
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
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

# Modules whose import has side effects (a browser, a window, printed text) or that hold test suites; and distutils,
# which an installed setuptools replaces with its own copy (so the corpus would depend on the setuptools version).
SKIP = {"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "test", "tests", "lib2to3", "ensurepip",
        "venv", "pydoc_data", "__main__", "distutils"}
VAL_EVERY = 10  # every 10th docstring is a validation document

# Hand-written documents. MULTILINGUAL_TRAIN is in the training text (so its letters - accented Latin, Greek,
# Cyrillic: 2-byte UTF-8, dashes and quotes: 3 bytes - become pieces of the vocabulary); MULTILINGUAL_VAL is only
# in the validation text, so its CJK, Devanagari, Arabic, Hebrew, Hangul, Thai, emoji and math characters are
# unknown to the tokenizer (id 3, a boundary), and a word after one of them starts with a '▁' piece that follows a
# boundary: the cases of the byte rule of val_bpb that plain English text never reaches.
MULTILINGUAL_TRAIN = """Café au lait, crème brûlée and a naïve façade: déjà vu in São Paulo, Zürich and Kraków.
Straße, Größe, Übung; señor, año, mañana; smörgåsbord, fjörd, Ærø, Łódź, Dvořák, Šiška, Čapek, Ğazi.
Ελληνικά: η γρήγορη καφέ αλεπού πηδάει πάνω από τον τεμπέλη σκύλο. Αλφα, βήτα, γάμμα, δέλτα, ψ, ω.
Русский: съешь же ещё этих мягких французских булок, да выпей чаю. Привет, мир! Жёлтый ёж.
Quotes “double” and ‘single’, dashes – and —, ellipsis…, degrees 25°, prices €5, £3, ¥100, ±1, ×2, ÷3."""
MULTILINGUAL_VAL = (
    "Tokyo is 東京 and Beijing is 北京; 日本語 text has no spaces at all. Café prices in Zürich — “not cheap”.",
    "Hindi: नमस्ते दुनिया means hello world. Привет, мир says the same in Russian, and Γειά σου in Greek.",
    "Arabic: مرحبا بالعالم is written right to left, as is Hebrew: שלום עולם. The digits 1, 2, 3 stay as they are.",
    "Korean: 안녕하세요 세계 and Thai: สวัสดีชาวโลก have scripts of their own; Straße and Größe use ß and ö.",
    "Emoji 🎉 party 🚀 launch ✅ done: characters of four UTF-8 bytes, each unknown to a docstring tokenizer.",
    "Math ∀x ∈ S: x ≥ 0, ∑ and ∫ over Ω; the naïve façade of déjà vu, ‘quoted’ and priced at €5.",
    "A ligature ﬁ, a fraction ½ and full-width ＡＢＣ are normalised (NFKC) before tokenization; ¿qué tal?",
    "Mixed: Привет 世界 hello, γειά 世界 again, 🌍 world. Ελληνικά and Русский words sit next to 漢字 here.",
)
VAL_MIX_EVERY = 10  # MULTILINGUAL_VAL[j] is validation document j * 10: any prefix the tests score meets them


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
    warnings.filterwarnings("ignore")
    docs = docstrings()
    val_docs = [d for i, d in enumerate(docs) if i % VAL_EVERY == VAL_EVERY - 1]
    for j, d in enumerate(MULTILINGUAL_VAL):
        val_docs.insert(j * VAL_MIX_EVERY, d)
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
    manifest = {"key": version_key(), "docs_train": len(train_docs), "docs_val": len(val_docs),
                "tokens_train": int(len(train)), "tokens_val": int(len(val)), "python": sys.version.split()[0],
                "sentencepiece": spm.__version__,
                "sha256": {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
                           for p in sorted(out.iterdir()) if p.name != "manifest.json"}}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def version_key() -> str:
    """What decides the corpus' bytes: this file, the Python version (its docstrings) and sentencepiece's."""
    import sentencepiece
    src = Path(__file__).read_bytes() + f"{sys.version}|{sentencepiece.__version__}".encode()
    return hashlib.sha256(src).hexdigest()[:12]


def is_current(out: Path) -> bool:
    try:
        return json.loads((out / "manifest.json").read_text())["key"] == version_key()
    except (OSError, ValueError, KeyError):
        return False


def ensure(out: Path) -> Path:
    """Build `out` unless a complete copy of this version is there (manifest written last). Concurrent builders
    are safe: each writes a private folder and renames it into place. A folder that is already there (an older
    corpus, a SMOKE_DATA folder) gets the corpus' files replaced one by one, manifest last; others are kept."""
    if is_current(out):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        t0 = time.perf_counter()
        m = build(tmp)
        try:
            os.rename(tmp, out)
        except OSError:
            for p in sorted(tmp.iterdir(), key=lambda p: p.name == "manifest.json"):
                os.replace(p, out / p.name)
        print(f"corpus: {m['docs_train']} train docs ({m['tokens_train']:,} tokens), {m['docs_val']} val docs "
              f"({m['tokens_val']:,} tokens) in {out} ({time.perf_counter() - t0:.1f}s)", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def cached() -> Path:
    """tests/.cache/corpus-KEY, built once per version (in a subprocess, so that the stdlib imports of a build
    stay out of the caller): the corpus of the test suite and of tests/bench.py."""
    out = Path(__file__).resolve().parent / ".cache" / f"corpus-{version_key()}"
    if not is_current(out):
        subprocess.run([sys.executable, str(Path(__file__).resolve()), str(out)], check=True)
    return out


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python tests/corpus.py OUT_DIR")
    ensure(Path(sys.argv[1]))
