"""Config: defaults reproduce the seed's model, bad knobs fail as one clean line (exit 2), --help lists every knob."""
from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from conftest import MANIFEST, ROOT, SAMPLE, TINY, TOKENIZER, clean_env, tg

CORPUS_ENV = dict(DATA_PATH=str(SAMPLE), TOKENIZER_PATH=str(TOKENIZER))

# Every subprocess case of this file, started together (each is ~1-2 s of interpreter + torch import).
CLI_BAD = [
    (dict(NUM_LAYERS="abc"), ("NUM_LAYERS",)),
    (dict(NUM_HEADS="7"), ("NUM_HEADS",)),
    (dict(TTT_EPOCH="3"), ("TTT_EPOCHS",)),
    (dict(QUANT_TARGET="15900000"), ("QUANT_TARGET",)),
]
CLI_CASES = {
    "default_dry_run": (dict(CORPUS_ENV, DRY_RUN="1"), ()),
    "help": ({}, ("--help",)),
    **{f"bad{i}": (dict(CORPUS_ENV, DRY_RUN="1", **env), ()) for i, (env, _) in enumerate(CLI_BAD)},
    "runs_dir_is_a_file": (dict(CORPUS_ENV, RUNS_DIR=str(ROOT / "train_gpt.py")), ()),
    "arguments": (dict(CORPUS_ENV, DRY_RUN="1"), ("EVAL_ONLY=1",)),
}


@pytest.fixture(scope="module")
def cli():
    """name -> finished process (returncode, stdout, stderr) of each CLI_CASES entry, run concurrently."""
    procs = {name: subprocess.Popen([sys.executable, str(ROOT / "train_gpt.py"), *args], env=clean_env(**env), cwd=ROOT,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name, (env, args) in CLI_CASES.items()}
    out = {}
    for name, p in procs.items():
        stdout, stderr = p.communicate(timeout=300)
        out[name] = SimpleNamespace(returncode=p.returncode, stdout=stdout, stderr=stderr)
    return out


def expected_state_dict_shapes() -> dict[str, tuple[int, ...]]:
    """The published model, written out: d=512, L=11, H=8, Hkv=4 (kv width 256), V=1024, VE layers 9 and 10."""
    shapes = {
        "tok_emb.weight": (1024, 512),
        "bigram_emb.scale": (),
        "bigram_emb.embed.weight": (2048, 128),
        "bigram_emb.proj.weight": (512, 128),
        "smear_gate.gate": (512,),
        "skip_weights": (5, 512),
        "skip_gates": (5, 512),
    }
    for i in range(11):
        shapes.update({
            f"blocks.{i}.attn_scale": (512,),
            f"blocks.{i}.mlp_scale": (512,),
            f"blocks.{i}.resid_mix": (2, 512),
            f"blocks.{i}.attn.q_gain": (8,),
            f"blocks.{i}.attn.c_q.weight": (512, 512),
            f"blocks.{i}.attn.c_k.weight": (256, 512),
            f"blocks.{i}.attn.c_v.weight": (256, 512),
            f"blocks.{i}.attn.proj.weight": (512, 512),
            f"blocks.{i}.mlp.scale": (1536,),
            f"blocks.{i}.mlp.bias": (1536,),
            f"blocks.{i}.mlp.up_proj.weight": (1536, 512),
            f"blocks.{i}.mlp.down_proj.weight": (512, 1536),
        })
    shapes.update({
        "ve_shared.scale": (),
        "ve_shared.embed.weight": (1024, 128),
        "ve_shared.proj.weight": (256, 128),
        "ve_layer_scales.0": (1,),
        "ve_layer_scales.1": (1,),
    })
    return shapes


def assert_one_line_error(proc, *names: str) -> str:
    """Exit code 2, exactly one non-empty stderr line, no traceback, and it names at least one of `names`."""
    assert proc.returncode == 2, f"rc={proc.returncode}\nstdout:{proc.stdout[-2000:]}\nstderr:{proc.stderr[-2000:]}"
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert len(lines) == 1, f"expected one stderr line, got:\n{proc.stderr}"
    assert "Traceback" not in proc.stderr + proc.stdout
    assert any(n in lines[0] for n in names), f"{lines[0]!r} names none of {names}"
    return lines[0]


# -- defaults ------------------------------------------------------------------------------------

def test_default_dry_run_prints_seed_param_count(corpus, cli):
    proc = cli["default_dry_run"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert re.search(r"^model_params:27030108$", proc.stdout, re.M), proc.stdout[-2000:]
    # the dry run prints the resolved config: the defaults are the seed run's
    for line in ("config:NUM_LAYERS=11", "config:MODEL_DIM=512", "config:ITERATIONS=25000", "config:EMA_DECAY=0.997",
                 "config:TRAIN_BATCH_TOKENS=786432", "config:EVAL_STRIDE=64", "config:TTT_ENABLED=True"):
        assert re.search(rf"^{re.escape(line)}$", proc.stdout, re.M), line
    # and it really opened the corpus (2 train shards, the token counts of their headers)
    counts = f"train_shards:2 train_tokens:{MANIFEST['tokens_train']} val_tokens:{MANIFEST['tokens_val']} "
    assert counts in proc.stdout, proc.stdout[-2000:]


def test_default_model_state_dict_matches_spec(monkeypatch):
    hp = tg.Hyperparameters()
    assert hp == tg.Hyperparameters.from_env({})  # an empty environment is the default config
    monkeypatch.setattr(tg.GPT, "reset_parameters", lambda self: None)  # shapes only: skip the slow orthogonal init
    model = tg.GPT(hp)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    want = expected_state_dict_shapes()
    assert sorted(set(got) - set(want)) == [] and sorted(set(want) - set(got)) == []
    assert got == want
    assert sum(p.numel() for p in model.parameters()) == 27_030_108
    assert sum(v.numel() for v in model.state_dict().values()) == 27_030_108  # no extra buffers
    assert sum(p.numel() for p in model.parameters()) == sum(math_prod(s) for s in want.values())


def math_prod(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def test_default_hyperparameters_are_the_seed_run():
    hp = tg.Hyperparameters()
    assert (hp.num_layers, hp.model_dim, hp.num_heads, hp.num_kv_heads, hp.head_dim, hp.mlp_hidden) == (11, 512, 8, 4, 64, 1536)
    assert (hp.vocab_size, hp.bigram_buckets, hp.bigram_embed_dim, hp.rope_dims, hp.xsa_layers) == (1024, 2048, 128, 16, 4)
    assert hp.ve_layer_list == (9, 10)
    assert (hp.train_seq_len, hp.train_batch_tokens, hp.iterations, hp.warmdown_iters) == (2048, 786432, 25000, 13000)
    assert (hp.matrix_lr, hp.scalar_lr, hp.tied_embed_lr, hp.muon_wd, hp.adam_wd) == (0.025, 0.025, 0.035, 0.04, 0.04)
    assert (hp.ema_decay, hp.grad_clip_norm, hp.eval_stride, hp.ttt_chunk_tokens, hp.ttt_epochs) == (0.997, 0.3, 64, 32768, 10)
    assert hp.warmdown_shape == "cosine" and hp.ttt_enabled and hp.artifact_limit_bytes == 16_000_000


# -- malformed values and impossible combinations (in-process) -----------------------------------

BAD = [
    # (env, variable(s) the message must name, extra text the message must hold)
    (dict(NUM_LAYERS="abc"), ("NUM_LAYERS",), None),
    (dict(MODEL_DIM="5.5"), ("MODEL_DIM",), None),
    (dict(EMA_DECAY="nan"), ("EMA_DECAY",), None),
    (dict(EMA_DECAY="inf"), ("EMA_DECAY",), None),
    (dict(MATRIX_LR="fast"), ("MATRIX_LR",), None),
    (dict(TTT_ENABLED="maybe"), ("TTT_ENABLED",), None),
    (dict(WARMDOWN_SHAPE="square"), ("WARMDOWN_SHAPE",), None),
    (dict(DEVICE="tpu"), ("DEVICE",), None),
    (dict(ITERATIONS="-5"), ("ITERATIONS",), None),
    (dict(TTT_LR="-0.1"), ("TTT_LR",), None),
    (dict(ACTIVATION_BUDGET="90"), ("ACTIVATION_BUDGET",), "< 1.0"),  # a share, not a percentage
    (dict(NUM_HEADS="0"), ("NUM_HEADS",), None),
    (dict(NUM_HEADS="7"), ("NUM_HEADS",), None),                                     # 7 does not divide 512
    (dict(NUM_KV_HEADS="3"), ("NUM_KV_HEADS",), None),                               # 8 heads not divisible by 3
    (dict(MODEL_DIM="72", NUM_HEADS="8", NUM_KV_HEADS="4", ROPE_DIMS="8"), ("MODEL_DIM", "NUM_HEADS"), None),  # head dim 9
    (dict(ROPE_DIMS="80"), ("ROPE_DIMS",), None),                                    # > head dim 64
    (dict(ROPE_DIMS="15"), ("ROPE_DIMS",), None),                                    # odd
    (dict(VE_LAYERS="11"), ("VE_LAYERS",), None),                                    # only blocks 0..10
    (dict(VE_LAYERS="-1"), ("VE_LAYERS",), None),
    (dict(VE_LAYERS="9,9"), ("VE_LAYERS",), None),
    (dict(VE_LAYERS="nine"), ("VE_LAYERS",), None),
    (dict(NUM_LAYERS="4", VE_LAYERS="9,10"), ("VE_LAYERS",), None),
    (dict(XSA_LAYERS="12"), ("XSA_LAYERS",), None),
    (dict(TRAIN_BATCH_TOKENS="1000"), ("TRAIN_BATCH_TOKENS",), None),                # not a multiple of 2048
    (dict(EVAL_ONLY="1"), ("ARTIFACT",), None),
    (dict(EVAL_ONLY="1", ARTIFACT="/no/such/final_model.int6.ptz"), ("ARTIFACT",), "an existing"),
    (dict(ITERATIONS="5000"), ("WARMDOWN_ITERS",), "WARMDOWN_ITERS=2600"),                # a fix, not just a refusal
    (dict(MAX_WALLCLOCK="600"), ("MAX_WALLCLOCK",), "did you mean MAX_WALLCLOCK_SECONDS"),  # shortened names
    (dict(WARMDOWN="100"), ("WARMDOWN",), "did you mean WARMDOWN_"),
    (dict(TTT_EPOCH="3"), ("TTT_EPOCH",), "did you mean TTT_EPOCHS"),
    (dict(NUM_LAYER="3"), ("NUM_LAYER",), "did you mean NUM_LAYERS"),
    (dict(LATE_QAT="1"), ("LATE_QAT",), None),
    (dict(TTT_OPTIMIZER="adamw"), ("TTT_OPTIMIZER",), None),
    (dict(EMA_ENABLED="0"), ("EMA_ENABLED",), None),
    (dict(BETA2="1"), ("BETA2",), "< 1"),                                           # AdamW refused it with a traceback
    (dict(BETA1="1.5"), ("BETA1",), "< 1"),
    (dict(MUON_MOMENTUM="1"), ("MUON_MOMENTUM",), "< 1"),
    (dict(EMA_DECAY="1.5"), ("EMA_DECAY",), "< 1"),                                 # ran on to a NaN score
    (dict(ADAM_EPS="0"), ("ADAM_EPS",), None),                                      # a late "non-finite loss"
    (dict(EVAL_ONLY="1", ARTIFACT=tg.__file__, RESUME="1"), ("RESUME",), "nothing resumes"),
    (dict(SEED=str(2**64)), ("SEED",), "< 18446744073709551616"),                  # torch.manual_seed's traceback
    (dict(ARTIFACT=tg.__file__), ("ARTIFACT",), "EVAL_ONLY=1"),                    # was ignored: the run trained
    (dict(QUANT_TARGET_BYTES="60000"), ("QUANT_TARGET_BYTES",), "the code alone"),  # failed only after training
    (dict(SUBMISSION_AUTHOR="Jos\udce9"), ("SUBMISSION_AUTHOR",), "not UTF-8"),  # a Latin-1 byte: failed in the log
    (dict(DATA_PATH="/data/caf\udce9"), ("DATA_PATH",), "not UTF-8"),
    (dict(NUM_LAYERS="x"), ("NUM_LAYERS",), "not a valid int"),
    (dict(CHECKPOINT_DIR=tg.__file__), ("CHECKPOINT_DIR",), "a file"),                # failed at the first checkpoint
    (dict(CHECKPOINT_DIR=tg.__file__ + "/ck"), ("CHECKPOINT_DIR",), "in one"),
    (dict(RUN_ID="../elsewhere"), ("RUN_ID",), "letters, digits"),                  # wrote outside RUNS_DIR
    (dict(RUN_ID="/tmp/abs"), ("RUN_ID",), "letters, digits"),
    (dict(RUN_ID="a/b"), ("RUN_ID",), "letters, digits"),
    (dict(RUN_ID=".."), ("RUN_ID",), "letters, digits"),
    (dict(RUN_ID="."), ("RUN_ID",), "letters, digits"),                             # RUNS_DIR itself
]


@pytest.mark.parametrize("env,names,extra", BAD, ids=[" ".join(f"{k}={v}" for k, v in e.items()) for e, _, _ in BAD])
def test_bad_config_raises_user_error(env, names, extra):
    with pytest.raises(tg.UserError) as info:
        tg.Hyperparameters.from_env(env)
    msg = str(info.value)
    assert "\n" not in msg.strip(), msg
    assert any(n in msg for n in names), f"{msg!r} names none of {names}"
    if extra:
        assert extra in msg, msg


def test_seed_knobs_accepted_at_seed_value():
    hp = tg.Hyperparameters.from_env(dict(LATE_QAT="0", TTT_OPTIMIZER="sgd", EMA_ENABLED="1", TIE_EMBEDDINGS="1",
                                          MIXED_QUANT="0", MLP_MULT="3"))
    assert hp == tg.Hyperparameters()  # accepted and without effect


def test_unrelated_environment_is_ignored():
    """torchrun's and common tool variables are not knobs and must not trip the typo check."""
    env = {k: "1" for k in ("LOCAL_RANK RANK GROUP_RANK ROLE_RANK LOCAL_WORLD_SIZE WORLD_SIZE GROUP_WORLD_SIZE "
                            "ROLE_WORLD_SIZE ROLE_NAME MASTER_ADDR MASTER_PORT TORCHELASTIC_RESTART_COUNT "
                            "TORCHELASTIC_MAX_RESTARTS TORCHELASTIC_RUN_ID TORCHELASTIC_USE_AGENT_STORE "
                            "TORCH_NCCL_ASYNC_ERROR_HANDLING TORCHELASTIC_ERROR_FILE OMP_NUM_THREADS "
                            "CUDA_VISIBLE_DEVICES PYTHONPATH NCCL_DEBUG TOKENIZERS_PARALLELISM PATH HOME MAX_JOBS VENV NPROC "
                            "HF_HOME HF_ENDPOINT HF_HUB_OFFLINE TORCH_SPEC SMOKE_DATA").split()}
    assert tg.Hyperparameters.from_env(env) == tg.Hyperparameters()


@pytest.mark.parametrize("name,value", [("TTT_EPOCHS_PER_CHUNK", "3"), ("EVAL_STRIDES", "64"),
                                        ("QUANT_TARGET", "15900000")])
def test_misspelled_knob_sharing_a_prefix_is_refused(name, value):
    """A name in the script's namespace (a knob's prefix) that is no knob would silently fall back to the default:
    refused with one line naming it. Names outside that namespace, even sharing a word with a knob, are not."""
    with pytest.raises(tg.UserError) as info:
        tg.Hyperparameters.from_env({name: value})
    assert str(info.value).startswith(f"unknown setting {name}") and "\n" not in str(info.value), info.value
    outside = dict(CUDA_VISIBLE_DEVICES="0,1", DATA_DIR="/data", OMP_NUM_THREADS="4")
    assert tg.Hyperparameters.from_env({**outside, "EVAL_STRIDE": "64"}) == tg.Hyperparameters(eval_stride=64)


def test_values_are_parsed_and_typed():
    hp = tg.Hyperparameters.from_env(dict(NUM_LAYERS=" 4 ", VE_LAYERS="2,3", TTT_ENABLED="false", BOS_MASK="TRUE",
                                          EMA_DECAY="0", WARMDOWN_SHAPE="linear", XSA_LAYERS="2", TTT_FREEZE_BLOCKS="1"))
    assert hp.num_layers == 4 and isinstance(hp.num_layers, int)
    assert hp.ttt_enabled is False and hp.bos_mask is True and hp.ema_decay == 0.0
    assert hp.ve_layer_list == (2, 3) and hp.warmdown_shape == "linear"
    with pytest.raises(dataclasses.FrozenInstanceError):
        hp.num_layers = 5  # type: ignore[misc]


# -- the CLI path: one line on stderr, exit 2 ----------------------------------------------------

@pytest.mark.parametrize("env,names", CLI_BAD, ids=[" ".join(f"{k}={v}" for k, v in e.items()) for e, _ in CLI_BAD])
def test_bad_config_cli_one_line_exit_2(env, names, cli):
    proc = cli[f"bad{[e for e, _ in CLI_BAD].index(env)}"]
    line = assert_one_line_error(proc, *names)
    if "TTT_EPOCH" in env:
        assert "did you mean TTT_EPOCHS" in line
    assert "model_params" not in proc.stdout  # it stopped before building anything


def test_an_argument_is_refused_not_ignored(cli):
    """`python train_gpt.py EVAL_ONLY=1` read no arguments and ran the default mode: a full training run instead of
    an evaluation. Now one line says that knobs are environment variables, and nothing runs."""
    line = assert_one_line_error(cli["arguments"], "EVAL_ONLY=1")
    assert "reads no arguments" in line and "EVAL_ONLY=1 python train_gpt.py" in line, line
    assert "model_params" not in cli["arguments"].stdout


def test_what_the_system_refuses_is_one_line_too(cli, monkeypatch, capsys):
    """An OSError (here RUNS_DIR is a file) and running out of memory end in one line naming the phase, exit 2;
    out of memory also names the knobs that shrink the batches."""
    line = assert_one_line_error(cli["runs_dir_is_a_file"], "train_gpt.py")
    assert line.startswith(("error: NotADirectoryError during startup", "error: FileExistsError during startup")), line
    monkeypatch.setattr(tg.Hyperparameters, "from_env", lambda env=None: tg.Hyperparameters(device="cpu"))
    monkeypatch.setattr(tg.STOP, "phase", "startup")
    monkeypatch.setattr(sys, "argv", ["train_gpt.py"])  # not pytest's
    for err in (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore"), MemoryError()):
        def oom(hp, rt, err=err):
            raise err
        monkeypatch.setattr(tg, "run", oom)
        assert tg.main() == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and "MICRO_BATCH_SEQS" in lines[0] and "during startup" in lines[0], lines
        assert f"{type(err).__name__} during" in lines[0] and str(err).split("\n")[0] in lines[0], lines


def test_a_world_size_without_torchrun_is_refused_in_one_line(monkeypatch):
    """WORLD_SIZE=2 left in the environment of a plain `python train_gpt.py`: torch's rendezvous failed with a
    traceback (no MASTER_ADDR); now one line says how to launch. DRY_RUN=1 still checks N processes' split."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(tg.UserError, match=r"WORLD_SIZE=2 without torchrun: use torchrun --nproc_per_node=2"):
        tg.setup_runtime(tg.Hyperparameters(device="cpu"))
    assert tg.setup_runtime(tg.Hyperparameters(device="cpu", dry_run=True)).world == 2


@pytest.mark.parametrize("env", [dict(WORLD_SIZE="abc"), dict(WORLD_SIZE="0"), dict(RANK="x"), dict(RANK="-1"),
                                 dict(WORLD_SIZE="2", RANK="2"), dict(LOCAL_RANK="1.5")])
def test_malformed_torchrun_variables_are_one_line(env, monkeypatch, capsys):
    """WORLD_SIZE, RANK and LOCAL_RANK are torchrun's, not knobs: int() raised a traceback on a malformed one, and
    with RANK malformed the error handler itself raised again. Now one line names the three values, exit 2."""
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(tg.Hyperparameters, "from_env", lambda env=None: tg.Hyperparameters(device="cpu"))
    monkeypatch.setattr(tg, "reports_error", lambda rank: True)  # no grace period to wait for
    monkeypatch.setattr(sys, "argv", ["train_gpt.py"])  # not pytest's
    assert tg.main() == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: WORLD_SIZE=") and "RANK < WORLD_SIZE" in lines[0], lines
    assert all(f"{k}={v}" in lines[0] for k, v in env.items()), lines


# -- --help ------------------------------------------------------------------------------------------

def test_help_lists_every_knob_with_default(cli):
    proc = cli["help"]
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stdout.splitlines()
    fields = dataclasses.fields(tg.Hyperparameters)
    assert len(fields) > 50
    for f in fields:
        name = f.name.upper()
        rows = [l for l in lines if re.match(rf"^{name}\s", l)]
        assert len(rows) == 1, f"{name} not listed exactly once in --help"
        rest = rows[0][len(name):].strip()
        default = ("1" if f.default else "0") if isinstance(f.default, bool) else str(f.default) or "-"
        assert rest.startswith(default + " "), f"{name}: default {default!r} not shown: {rows[0]!r}"
        assert f.metadata["help"] in rows[0], f"{name}: help text missing"


def test_dry_run_checks_what_a_run_on_n_processes_needs(tmp_path, corpus):
    """DRY_RUN=1 with WORLD_SIZE=N (run.sh's check before torchrun) splits the batch for N processes and reads the
    artifact of an EVAL_ONLY run, in one process."""
    hp = lambda **kw: tg.Hyperparameters.from_env({**TINY, "DRY_RUN": "1", **kw})
    assert tg.run(hp(), tg.Runtime(world=4)) == 0
    with pytest.raises(tg.UserError, match="does not split over 6 processes"):
        tg.run(hp(), tg.Runtime(world=6))
    bad = tmp_path / "bad.ptz"
    bad.write_bytes(b"not an artifact")
    with pytest.raises(tg.UserError, match=f"artifact {re.escape(str(bad))}: not a valid zstd stream"):
        tg.run(hp(EVAL_ONLY="1", ARTIFACT=str(bad)), tg.Runtime(world=6))  # eval: no batch to split
