"""Data and metric: the shard format, the train token stream, bad inputs through the CLI, the byte rule of
val_bpb against the tokenizer, and evaluate() (standard and sliding) against a straightforward recomputation."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import (MANIFEST, REAL_TOKENIZER, REAL_VAL, ROOT, SAMPLE, TINY, TOKENIZER, clean_env, need_real, tg,
                      tiny_hp, tiny_model, train_briefly)

VAL_SHARD = SAMPLE / "fineweb_val_000000.bin"
TRAIN_SHARDS = sorted(SAMPLE.glob("fineweb_train_*.bin"))
MAGIC, VERSION = 20240520, 1
N_VAL = 20_000  # validation tokens that the tests of evaluate() score


def write_shard(path, tokens, magic=MAGIC, version=VERSION, n=None, header_ints=256, tail=b""):
    """A shard in the challenge format (header of 256 int32, then uint16 tokens), optionally broken."""
    tokens = np.asarray(tokens, dtype="<u2")
    header = np.zeros(header_ints, dtype="<i4")
    header[:3] = [magic, version, len(tokens) if n is None else n][:header_ints]
    with open(path, "wb") as f:
        f.write(header.tobytes() + tokens.tobytes() + tail)
    return str(path)


@pytest.fixture(scope="module")
def sp(corpus):
    """The generated corpus' tokenizer."""
    import sentencepiece as spm
    return spm.SentencePieceProcessor(model_file=str(TOKENIZER))


@pytest.fixture(scope="module", params=["corpus", "sp1024"])
def tok(request, sp):
    """Each tokenizer the byte rule is checked against: the corpus' own, and the challenge's sp1024 when
    `./run.sh data 0` has put it under data/ (else that case skips)."""
    if request.param == "corpus":
        return sp
    import sentencepiece as spm
    need_real(REAL_TOKENIZER)
    return spm.SentencePieceProcessor(model_file=str(REAL_TOKENIZER))


def piece_tables(sp, vocab: int):
    """Independent byte tables from the piece strings: the tokenizer's special ids (pad/bos/eos/unk) are
    boundaries with 0 bytes, <0xNN> pieces are 1 byte, else the UTF-8 length without a leading '▁'."""
    special = {i for i in (sp.pad_id(), sp.bos_id(), sp.eos_id(), sp.unk_id()) if i >= 0}
    base, space, boundary = np.zeros(vocab, np.int64), np.zeros(vocab, bool), np.zeros(vocab, bool)
    for i in range(sp.get_piece_size()):
        piece = sp.id_to_piece(i)
        if i in special:
            boundary[i] = True
        elif len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            base[i] = 1
        else:
            if piece.startswith("▁"):
                space[i], piece = True, piece[1:]
            base[i] = len(piece.encode("utf-8"))
    return base, space, boundary


def credited_bytes(ids, tables) -> int:
    """The challenge's rule written out: every target y after previous token x earns base[y] + (space[y] and not boundary[x])."""
    base, space, boundary = (np.asarray(t) for t in tables)
    ids = np.asarray(ids)
    x, y = ids[:-1], ids[1:]
    return int((base[y] + (space[y] & ~boundary[x])).sum())


# -- shard reader --------------------------------------------------------------------------------

def test_open_shard_corpus_val(corpus):
    header = np.fromfile(VAL_SHARD, dtype="<i4", count=256)
    assert header[0] == MAGIC and header[1] == VERSION
    toks = tg.open_shard(str(VAL_SHARD))
    assert len(toks) == header[2] == (os.path.getsize(VAL_SHARD) - 1024) // 2 == MANIFEST["tokens_val"] > 50_000
    raw = np.fromfile(VAL_SHARD, dtype="<u2", offset=1024)
    assert np.array_equal(np.asarray(toks), raw)
    assert toks[0] == 1  # each document starts with BOS


def test_open_shard_synthetic_roundtrip(tmp_path):
    toks = np.array([0, 1, 2, 65535, 1023, 7], dtype=np.uint16)
    got = tg.open_shard(write_shard(tmp_path / "s.bin", toks))
    assert got.dtype == np.uint16 and np.array_equal(np.asarray(got), toks)
    assert len(tg.open_shard(write_shard(tmp_path / "empty.bin", []))) == 0


BROKEN = {
    "bad_magic": dict(magic=20240521),
    "bad_version": dict(version=2),
    "truncated": dict(n=11),                # header says 11 tokens, file holds 10
    "oversized": dict(tail=b"\x00\x00"),    # 2 bytes more than the header says
    "odd_size": dict(tail=b"\x00"),
    "negative_count": dict(n=-4),
    "short_header": dict(header_ints=25),   # 100-byte file: shorter than the 1024-byte header
}


@pytest.mark.parametrize("kind", list(BROKEN))
def test_open_shard_rejects_broken(tmp_path, kind):
    path = tmp_path / f"fineweb_val_{kind}.bin"
    opts = dict(BROKEN[kind])
    toks = [] if kind == "short_header" else list(range(10))
    write_shard(path, toks, **opts)
    with pytest.raises(tg.UserError) as info:
        tg.open_shard(str(path))
    assert str(path) in str(info.value)


def test_open_shard_missing_file(tmp_path):
    path = tmp_path / "nope.bin"
    with pytest.raises(tg.UserError) as info:
        tg.open_shard(str(path))
    assert str(path) in str(info.value)


# -- train token stream --------------------------------------------------------------------------

def test_token_stream_concatenates_wraps_and_resumes(tmp_path):
    a = np.arange(100, 110)          # 10 tokens
    b = np.arange(200, 205)          # 5 tokens
    files = [write_shard(tmp_path / "fineweb_train_000000.bin", a), write_shard(tmp_path / "fineweb_train_000001.bin", b)]
    ref = np.concatenate([a, b])
    endless = lambda start, n: ref[(start + np.arange(n)) % len(ref)]

    s = tg.TokenStream(files)
    pos, chunks = 0, [7, 7, 4, 1, 15, 33, 2]  # crosses the shard boundary, the end, and wraps several times
    for n in chunks[:3]:
        assert np.array_equal(s.take(n), endless(pos, n)), (pos, n)
        pos += n
    st = s.state()
    after = [s.take(n) for n in chunks[3:]]
    s.load_state(st)  # rewind in place
    assert [list(x) for x in after] == [list(s.take(n)) for n in chunks[3:]]
    fresh = tg.TokenStream(files)  # resume in a new process
    fresh.load_state(json.loads(json.dumps(st)))
    for n, want in zip(chunks[3:], after):
        assert np.array_equal(fresh.take(n), want)
        assert np.array_equal(want, endless(pos, n))
        pos += n


def test_token_stream_corpus_shards_in_sorted_order(corpus):
    s = tg.TokenStream([str(p) for p in TRAIN_SHARDS])
    n0 = len(tg.open_shard(str(TRAIN_SHARDS[0])))
    s.load_state({"shard": 0, "offset": n0 - 3})
    got = s.take(6)
    want = np.concatenate([np.fromfile(TRAIN_SHARDS[0], "<u2", offset=1024)[-3:],
                           np.fromfile(TRAIN_SHARDS[1], "<u2", offset=1024)[:3]])
    assert np.array_equal(got, want)


# -- bad inputs through the CLI ------------------------------------------------------------------

@pytest.fixture(scope="module")
def cli_errors(tmp_path_factory):
    """Each bad-input case as a DRY_RUN subprocess (all started together); name -> (process, path or variable to name)."""
    tmp = tmp_path_factory.mktemp("baddata")
    (tmp / "empty").mkdir()

    def data_dir(name, val_opts=None):
        d = tmp / name
        d.mkdir()
        for p in TRAIN_SHARDS:
            os.symlink(p, d / p.name)
        return str(d), write_shard(d / "fineweb_val_000000.bin", [1, 5, 6, 7] * 50, **(val_opts or {}))

    good_dir, _ = data_dir("good")
    trunc_dir, trunc_val = data_dir("trunc", val_opts=dict(n=250))       # header claims 250, file has 200
    cases = {
        "missing_dir": (dict(DATA_PATH=str(tmp / "does_not_exist")), str(tmp / "does_not_exist")),
        "no_shards": (dict(DATA_PATH=str(tmp / "empty")), str(tmp / "empty")),
        "missing_tokenizer": (dict(TOKENIZER_PATH=str(tmp / "none.model")), str(tmp / "none.model")),
        "truncated_val": (dict(DATA_PATH=trunc_dir), trunc_val),
        "vocab_mismatch": (dict(VOCAB_SIZE="2048"), "VOCAB_SIZE"),
        "good": (dict(DATA_PATH=good_dir), None),
    }
    procs = {name: subprocess.Popen([sys.executable, str(ROOT / "train_gpt.py")], cwd=ROOT, text=True,
                                    env=clean_env(**{**TINY, "DRY_RUN": "1", **env}),
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for name, (env, _) in cases.items()}
    out = {}
    for name, p in procs.items():
        stdout, stderr = p.communicate(timeout=300)
        out[name] = (SimpleNamespace(returncode=p.returncode, stdout=stdout, stderr=stderr), cases[name][1])
    return out


@pytest.mark.parametrize("case", ["missing_dir", "no_shards", "missing_tokenizer", "truncated_val", "vocab_mismatch"])
def test_bad_input_cli_one_line_exit_2(cli_errors, case):
    proc, must_name = cli_errors[case]
    assert proc.returncode == 2, f"rc={proc.returncode}\nstdout:{proc.stdout[-1500:]}\nstderr:{proc.stderr[-1500:]}"
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert len(lines) == 1, proc.stderr
    assert must_name in lines[0], f"{lines[0]!r} does not name {must_name!r}"
    assert "model_params" not in proc.stdout


def test_good_synthetic_data_passes_dry_run(cli_errors):
    """Control for the cases above: the same directory builder with a well-formed val shard is accepted."""
    proc, _ = cli_errors["good"]
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "val_tokens:200 " in proc.stdout and "train_shards:2 " in proc.stdout


def test_bad_inputs_in_process(tmp_path, corpus):
    """The same loaders called directly: a non-SentencePiece tokenizer file, a val id outside the vocabulary,
    a broken train shard, a train split with no tokens."""
    garbage = tmp_path / "garbage.model"
    garbage.write_bytes(b"this is not a sentencepiece model\n" * 10)
    with pytest.raises(tg.UserError, match="TOKENIZER_PATH") as info:
        tg.load_tokenizer(tiny_hp(TOKENIZER_PATH=str(garbage)))
    assert str(garbage) in str(info.value)
    with pytest.raises(tg.UserError, match="is a folder, not the .model file"):  # it said "does not exist"
        tg.load_tokenizer(tiny_hp(TOKENIZER_PATH=str(tmp_path)))
    assert tg.load_tokenizer(tiny_hp()).vocab_size() == 1024

    d = tmp_path / "data[1]"  # a folder name that is also a glob pattern: its shards must still be found
    d.mkdir()
    write_shard(d / "fineweb_val_000000.bin", [1, 5, 1023, 7] * 33)
    assert tg.load_validation(tiny_hp(DATA_PATH=str(d))).tolist() == [1, 5, 1023, 7] * 33
    with pytest.raises(tg.UserError, match=r"128 tokens .*TRAIN_SEQ_LEN\+1 = 129"):  # scored nothing: bpb 0.0
        tg.load_validation(tiny_hp(DATA_PATH=str(d), VAL_MAX_TOKENS=128))
    write_shard(d / "fineweb_val_000001.bin", [1, 5, 2000, 7])  # id 2000 >= VOCAB_SIZE=1024
    with pytest.raises(tg.UserError, match="VOCAB_SIZE"):
        tg.load_validation(tiny_hp(DATA_PATH=str(d)))

    good = write_shard(d / "fineweb_train_000000.bin", range(10))
    bad = write_shard(d / "fineweb_train_000001.bin", range(10), magic=1234)
    assert tg.shard_files(str(d), "train") == [good, bad]
    with pytest.raises(tg.UserError) as info:
        tg.TokenStream(tg.shard_files(str(d), "train"))
    assert bad in str(info.value)
    os.remove(bad)
    stream = tg.TokenStream(tg.shard_files(str(d), "train"))
    for where in ({"shard": 1, "offset": 0}, {"shard": 0, "offset": 10}):  # a resume after the shards changed
        with pytest.raises(tg.UserError, match="past the 1 train shards"):
            stream.load_state(where)
    write_shard(d / "fineweb_train_000000.bin", [])
    with pytest.raises(tg.UserError):
        tg.TokenStream(tg.shard_files(str(d), "train"))


def test_train_token_ids_outside_the_vocabulary_stop_training_with_one_line(tmp_path):
    """Shards of another tokenizer: every rank sees the whole step's span, so all stop at the same step with a
    UserError, before an embedding lookup fails (a raw IndexError on a CPU, a device-side assert on a GPU)."""
    write_shard(tmp_path / "fineweb_train_000000.bin", [3] * 5000 + [2000] + [3] * 5000)
    hp = tiny_hp(DATA_PATH=str(tmp_path))
    tr = tg.Trainer(hp, tg.Runtime(), tg.GPT(hp), tg.TokenStream(tg.shard_files(str(tmp_path), "train")))
    tr.next_batch()  # tokens 0..2064: in the vocabulary
    with pytest.raises(tg.UserError, match=r"token id 2000 >= VOCAB_SIZE=1024 \(train shard 0 of 1\)"):
        for _ in range(5):
            tr.next_batch()


# -- byte accounting against the tokenizer ------------------------------------------------------------

def test_byte_tables_match_piece_strings(tok):
    sp = tok
    base, space, boundary = tg.byte_tables(sp, 1024)
    assert base.shape == space.shape == boundary.shape == (1024,)
    ref = piece_tables(sp, 1024)
    assert np.array_equal(base.numpy(), ref[0])
    assert np.array_equal(space.numpy(), ref[1])
    assert np.array_equal(boundary.numpy(), ref[2])
    # spot checks: pad 0, bos 1, eos 2, unk 3 are boundaries with 0 bytes; a '▁' piece earns the UTF-8 bytes of
    # the rest (none for a lone '▁') plus its space; a 3-byte character with no space (both tokenizers have these)
    assert boundary[[0, 1, 2, 3]].all() and (base[[0, 1, 2, 3]] == 0).all() and boundary.sum() == 4
    for piece, n_bytes, lead in (("▁the", 3, True), ("▁", 0, True), ("—", 3, False), ("’", 3, False)):
        i = sp.piece_to_id(piece)
        assert sp.id_to_piece(i) == piece, piece
        assert (int(base[i]), bool(space[i]), bool(boundary[i])) == (n_bytes, lead, False), piece


HANDCRAFTED = [
    "Hello world",
    "   leading spaces,  double  spaces and trailing   ",
    "line one\nline two\n\n\n   indented line\tand a tab",
    "Numbers 3.14159, $5.00 — 50% off! (really) [yes] {no} <tag> #hash @user",
    "naïve café — 東京",
    "emoji 🎉 and ümlaut and ½ and ﬁ ligature",
    "a",
    "",
]


def unknown_free_snippets(sp, docs, limit=150):
    out = []
    for d in docs:
        for para in d.split("\n\n"):
            if para.strip() and sp.unk_id() not in sp.encode(para):
                out.append(para)
        if len(out) >= limit:
            break
    return out[:limit]


def segment_decoded_bytes(sp, ids) -> int:
    """UTF-8 bytes of the decoded text of each run between boundary tokens (BOS/unknowns): the decoder, like the
    byte rule, gives no leading space to the first piece after a boundary."""
    total, run = 0, []
    specials = {sp.pad_id(), sp.bos_id(), sp.eos_id(), sp.unk_id()}
    for i in list(ids) + [sp.bos_id()]:
        if i in specials:
            total += len(sp.decode(run).encode("utf-8")) if run else 0
            run = []
        else:
            run.append(int(i))
    return total


def test_credited_bytes_equal_decoded_utf8_bytes(tok):
    sp = tok
    docs = [json.loads(l)["text"] for l in open(SAMPLE / "docs_val.jsonl", encoding="utf-8")]
    tables = tg.byte_tables(sp, 1024)
    texts = [t for t in HANDCRAFTED if sp.unk_id() not in sp.encode(t)] + unknown_free_snippets(sp, docs)
    assert len(texts) > 100
    for t in texts:
        ids = [1] + sp.encode(t)  # a document start, as in the shards
        want = len(sp.decode(ids[1:]).encode("utf-8"))
        assert credited_bytes(ids, tables) == want, repr(t)
    # several documents back to back, as a shard stores them: the sum of the parts
    ids = [i for t in texts[:20] for i in [1] + sp.encode(t)]
    assert credited_bytes(ids, tables) == sum(len(sp.decode(sp.encode(t)).encode("utf-8")) for t in texts[:20])


def test_credited_bytes_with_unknown_pieces(tok):
    """Texts with characters the tokenizer lacks: unknown ids earn 0 bytes and act as boundaries (a '▁' piece
    right after one earns no space: the decoder gives it none either)."""
    sp = tok
    tables = tg.byte_tables(sp, 1024)
    docs = [json.loads(l)["text"] for l in open(SAMPLE / "docs_val.jsonl", encoding="utf-8")]
    with_unk = [t for t in HANDCRAFTED + docs if sp.unk_id() in sp.encode(t)]
    assert "naïve café — 東京" in with_unk and len(with_unk) >= 10
    after_unk = sum(a == sp.unk_id() and sp.id_to_piece(b).startswith("▁")
                    for t in with_unk for a, b in zip(sp.encode(t), sp.encode(t)[1:]))
    assert after_unk >= 5, "no '▁' piece after an unknown: the boundary case of the rule is not exercised"
    for t in with_unk:
        ids = [1] + sp.encode(t)
        assert credited_bytes(ids, tables) == segment_decoded_bytes(sp, ids), repr(t)
        assert credited_bytes(ids, tables) < len(sp.decode(ids[1:]).encode("utf-8"))  # ' ⁇ ' is not credited


def test_corpus_val_shard_bytes(sp):
    """The corpus' val shard is the docs encoded as BOS + tokens; the tables credit exactly their decoded bytes."""
    docs = [json.loads(l)["text"] for l in open(SAMPLE / "docs_val.jsonl", encoding="utf-8")]
    ids = [i for d in docs for i in [1] + sp.encode(d)]
    shard = np.asarray(tg.open_shard(str(VAL_SHARD)))
    assert np.array_equal(shard, np.array(ids))
    tables = tg.byte_tables(sp, 1024)
    assert credited_bytes(shard, tables) == segment_decoded_bytes(sp, shard)


@pytest.mark.parametrize("n_tokens", [100, N_VAL])
def test_corpus_val_prefix_reaches_every_case_of_the_byte_rule(sp, n_tokens):
    """What real text holds, the generated validation text holds too, within the prefixes that the evaluation
    tests score (here and in test_eval.py): unknown pieces, a '▁' piece right after one (no space credited) and
    after an ordinary piece (space credited), and pieces of several UTF-8 bytes per character."""
    base, space, boundary = (t.numpy() for t in tg.byte_tables(sp, 1024))
    ids = np.asarray(tg.open_shard(str(VAL_SHARD))[:n_tokens]).astype(np.int64)
    x, y = ids[:-1], ids[1:]
    chars = np.array([len(sp.id_to_piece(i).removeprefix("▁")) for i in range(1024)])
    assert (y == sp.unk_id()).sum() >= 3
    assert (space[y] & (x == sp.unk_id())).sum() >= 2
    assert (space[y] & ~boundary[x]).sum() >= n_tokens // 10
    assert ((base[y] > chars[y]) & ~boundary[y]).sum() >= 3


def test_real_val_shard_bytes_equal_decoded_utf8_bytes():
    """With the challenge's data under data/: on a prefix of the real validation shard the tables of the real
    tokenizer credit exactly the decoded UTF-8 bytes of each document."""
    import sentencepiece as spm
    need_real(REAL_TOKENIZER, REAL_VAL)
    sp = spm.SentencePieceProcessor(model_file=str(REAL_TOKENIZER))
    shard = np.asarray(tg.open_shard(str(REAL_VAL))[:200_000]).astype(np.int64)
    assert shard[0] == 1 and (shard == 1).sum() > 50
    assert credited_bytes(shard, tg.byte_tables(sp, 1024)) == segment_decoded_bytes(sp, shard)


# -- BpbMeter ----------------------------------------------------------------------------------------

def test_bpb_meter_hand_example():
    base = torch.tensor([0, 0, 3, 1, 2, 5])
    space = torch.tensor([False, False, True, False, True, False])
    boundary = torch.tensor([True, True, False, False, False, False])
    meter = tg.BpbMeter((base, space, boundary), torch.device("cpu"))
    # targets 2 (prev 1 = boundary: 3 bytes), 4 (prev 2: 2+1), 5 (prev 4: 5) -> 11 bytes, losses 3.5
    meter.add(torch.tensor([[1.0, 2.0, 0.5]]), torch.tensor([[1, 2, 4]]), torch.tensor([[2, 4, 5]]),
              torch.tensor([[True, True, True]]))
    # targets 4 (prev 0 = boundary: 2), 2 (prev 3: 3+1), 3 (prev 3: 1), and a masked one -> 7 bytes, losses 7.25
    meter.add(torch.tensor([[3.0, 4.0], [0.25, 7.0]]), torch.tensor([[0, 3], [3, 2]]), torch.tensor([[4, 2], [3, 4]]),
              torch.tensor([[True, True], [True, False]]))
    val_loss, val_bpb = meter.result()
    loss_sum, n_tok, n_bytes = 10.75, 6, 18
    assert val_loss == pytest.approx(loss_sum / n_tok, rel=1e-15, abs=0)
    assert val_bpb == pytest.approx(loss_sum / n_tok / math.log(2) * n_tok / n_bytes, rel=1e-14, abs=0)
    assert val_bpb == pytest.approx(10.75 / (18 * math.log(2)), rel=1e-14, abs=0)


# -- evaluate() against a straightforward recomputation --------------------------------------------


@pytest.fixture(scope="module")
def eval_setup(sp):
    hp = tiny_hp()
    model = tiny_model(0)
    # Briefly trained: every weight moves off its init (the zero-initialised output projections would make every
    # block a no-op, the loss blind to context), and the model has learnt to use context, so that more context per
    # target must give a better score (with random weights that order is luck).
    train_briefly(model, steps=30, seqs=16, seq_len=hp.train_seq_len)
    model.eval()
    val = torch.from_numpy(np.asarray(tg.open_shard(str(VAL_SHARD))[:N_VAL]).astype(np.int64))
    return SimpleNamespace(hp=hp, model=model, val=val, tables=tg.byte_tables(sp, 1024), ref_tables=piece_tables(sp, 1024))


def run_evaluate(s, stride):
    rt = tg.Runtime()
    rt.compiled = s.model
    return tg.evaluate(s.hp, rt, s.model, s.val, s.tables, stride=stride)


def reference_bpb(s, windows):
    """windows: list of (start, first scored position j0). One full forward per window, float64 sums."""
    T = s.hp.train_seq_len
    val = s.val.numpy()
    base, space, boundary = s.ref_tables
    loss_sum, n_tok, n_bytes, scored = 0.0, 0, 0, []
    with torch.no_grad():
        for start, j0 in windows:
            seg = np.zeros(T + 1, np.int64)
            real = val[start:start + T + 1]
            seg[:len(real)] = real                      # zero padding at the end of a short tail window
            x, y = torch.from_numpy(seg[:-1])[None], torch.from_numpy(seg[1:])[None]
            losses = s.model(x, y)[0].double().numpy()
            for j in range(j0, T):
                p = start + j + 1                       # index of the target token in val
                if p >= len(val):
                    break
                loss_sum += losses[j]
                n_tok += 1
                n_bytes += base[val[p]] + int(space[val[p]] and not boundary[val[p - 1]])
                scored.append(p)
    val_loss = loss_sum / n_tok
    return val_loss, val_loss / math.log(2) * n_tok / n_bytes, scored


def test_standard_eval_matches_reference(eval_setup):
    s = eval_setup
    T = s.hp.train_seq_len
    n_windows = (len(s.val) - 1) // T                  # the tail that does not fill a window is dropped
    assert (len(s.val) - 1) % T != 0                   # so the test really has a dropped tail
    ref_loss, ref_bpb, scored = reference_bpb(s, [(w * T, 0) for w in range(n_windows)])
    assert scored == list(range(1, n_windows * T + 1))
    loss, bpb = run_evaluate(s, 0)
    assert loss == pytest.approx(ref_loss, rel=1e-9)
    assert bpb == pytest.approx(ref_bpb, rel=1e-9)
    assert (loss, bpb) == run_evaluate(s, T)           # stride >= seq_len is the standard eval too
    assert 3.0 < bpb < 30.0


def test_standard_eval_matches_float64_logits(eval_setup):
    """The same windows with the head computed independently: final hidden state from a hook, then
    RMS norm, tied head, softcap and log-softmax in float64."""
    s = eval_setup
    hp, T = s.hp, s.hp.train_seq_len
    n_windows = (len(s.val) - 1) // T
    x = torch.stack([s.val[w * T:(w + 1) * T] for w in range(n_windows)])
    y = torch.stack([s.val[w * T + 1:(w + 1) * T + 1] for w in range(n_windows)])
    captured = []
    h = s.model.blocks[-1].register_forward_hook(lambda m, i, o: captured.append(o.detach()))
    try:
        with torch.no_grad():
            s.model(x, y)
    finally:
        h.remove()
    hid = captured[-1].double()
    hid = hid * torch.rsqrt(hid.pow(2).mean(-1, keepdim=True) + torch.finfo(torch.float32).eps)
    logits = hid @ s.model.tok_emb.weight.detach().double().T
    logits = hp.logit_softcap * torch.tanh(logits / hp.logit_softcap)
    nll = -torch.log_softmax(logits, -1).gather(-1, y[..., None])[..., 0]
    base, space, boundary = (torch.from_numpy(t) for t in s.ref_tables)
    n_bytes = (base[y] + (space[y] & ~boundary[x]).long()).sum().item()
    ref_loss = nll.mean().item()
    ref_bpb = ref_loss / math.log(2) * y.numel() / n_bytes
    loss, bpb = run_evaluate(s, 0)
    assert loss == pytest.approx(ref_loss, rel=1e-7)
    assert bpb == pytest.approx(ref_bpb, rel=1e-7)


def test_sliding_eval_matches_reference(eval_setup):
    s = eval_setup
    T, stride = s.hp.train_seq_len, s.hp.eval_stride
    assert 0 < stride < T
    n_targets = len(s.val) - 1
    # every target p (1..n_targets) is scored once, in the window that starts at the smallest multiple of the stride
    # whose last `stride` positions reach it (the first window scores all of its T targets)
    windows = {}
    for p in range(1, n_targets + 1):
        start = 0 if p <= T else -(-(p - T) // stride) * stride
        windows.setdefault(start, T - stride if start else 0)
    ref_loss, ref_bpb, scored = reference_bpb(s, sorted(windows.items()))
    assert scored == list(range(1, n_targets + 1))     # every target exactly once, none dropped
    loss, bpb = run_evaluate(s, stride)
    assert loss == pytest.approx(ref_loss, rel=1e-9)
    assert bpb == pytest.approx(ref_bpb, rel=1e-9)
    std_loss, _ = run_evaluate(s, 0)
    assert loss < std_loss                             # more context per target: the sliding score is better


@pytest.mark.parametrize("n_tokens,seq_len,stride", [(20_000, 128, 32), (1000, 128, 64), (129, 128, 32), (130, 128, 32),
                                                     (50, 128, 32), (1001, 100, 7), (4097, 2048, 64)])
def test_plan_windows_scores_every_target_once(n_tokens, seq_len, stride):
    starts, offs = tg.plan_windows(n_tokens, seq_len, stride)
    hits = np.zeros(n_tokens, np.int64)
    for st, of in zip(starts.tolist(), offs.tolist()):
        assert st % stride == 0 and of in (0, seq_len - stride)
        for j in range(of, seq_len):
            p = st + j + 1
            if p < n_tokens:
                hits[p] += 1
    assert hits[0] == 0 and (hits[1:] == 1).all(), np.nonzero(hits[1:] != 1)[0][:10] + 1


def test_byte_fallback_pieces_count_one_byte_each(tmp_path):
    """The generated tokenizer (like the challenge's sp1024) has no byte fallback, so a tokenizer that has one is
    built here from the corpus' validation text. Rare Unicode encodes into <0x..> pieces; byte_tables + BpbMeter
    credit each 1 byte, so the credited total of a text equals the UTF-8 length of what its ids decode to."""
    import sentencepiece as spm
    docs = [json.loads(l)["text"] for l in open(SAMPLE / "docs_val.jsonl", encoding="utf-8")]
    lines = [line for d in docs for line in d.splitlines() if line.strip()]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_prefix=str(tmp_path / "bf"), vocab_size=512, model_type="bpe",
        byte_fallback=True, add_dummy_prefix=False, bos_id=1, eos_id=2, unk_id=3, pad_id=0, character_coverage=0.98,
        num_threads=1, minloglevel=2)
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "bf.model"))
    tables = tg.byte_tables(sp, sp.vocab_size())
    e2 = sp.piece_to_id("<0xE2>")
    assert sp.is_byte(e2) and tables[0][e2] == 1 and not tables[1][e2] and not tables[2][e2]
    texts = ["x ∮ E⋅da = Q, n → ∞", "naïve café — 東京 🙂", "Ωmega ≈ ∑ ‰ ﬁne", *docs[:40]]
    fallback = 0
    for text in texts:
        ids = torch.tensor([1] + sp.encode(text))  # a document start, as in the shards
        fallback += sum(sp.is_byte(int(i)) for i in ids)
        meter = tg.BpbMeter(tables, torch.device("cpu"))
        meter.add(torch.zeros(len(ids) - 1), ids[:-1], ids[1:], torch.ones(len(ids) - 1, dtype=torch.bool))
        assert int(meter.sums[2]) == len(sp.decode(ids[1:].tolist()).encode("utf-8")), repr(text[:80])
    assert fallback >= 20 and e2 in sp.encode(texts[0]), fallback  # the rule for <0x..> pieces is really exercised
