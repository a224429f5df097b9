"""train_gpt.py: the 11-layer GEPA model of the Parameter Golf challenge, end to end.

Builds the model (XSA, SmearGate, BigramHash, partial RoPE, ReLU^2 MLP, U-Net skips, value embeddings), trains it with
Muon/AdamW + EMA, writes the int6 + zstd-22 artifact and scores it (standard, sliding or legal score-first TTT) in the
challenge's val_bpb. One file, read top-down, configured only by environment variables (`python train_gpt.py --help`).
Hard stop: this file stays within 1,800 lines of at most 120 characters."""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import datetime
import difflib
import fcntl
import heapq
import io
import json
import math
import os
import platform
import shutil
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

# ---- Config: one frozen dataclass, built only by from_env() ----------------------------------
# Why: the challenge's scripts are driven by environment variables; reading them in one place,
# validating them and printing them whole makes every run reproducible from its log.


class UserError(Exception):
    """A problem the user can fix (bad input, bad knob); reported as one line, exit code 2."""


def knob(default, help: str, lo=None, choices=None, below=None):
    return dataclasses.field(default=default, metadata={"help": help, "lo": lo, "choices": choices, "below": below})


# Switches of the seed's script that its logged run left at one value, or that had no effect there.
# Accepted so the seed's launch commands work unchanged; any other value is refused, not ignored.
SEED_KNOBS = {
    "LATE_QAT": ("0", "late QAT was off in the seed's run"), "EMA_ENABLED": ("1", "EMA_DECAY=0 turns EMA off"),
    "TTT_OPTIMIZER": ("sgd", "the seed's TTT uses SGD"), "TIE_EMBEDDINGS": ("1", "the head is tied"),
    "ORTHO_INIT": ("1", "the init is the seed's"), "BIGRAM_XOR_HASH": ("1", "BigramHash uses the XOR hash"),
    "MIXED_QUANT": ("0", "the artifact is pure int6"), "INT8_STORAGE": ("0", "the artifact is pure int6"),
    **{k: (None, "") for k in ("VAL_BATCH_SIZE", "MLP_MULT", "EMBED_LR", "HEAD_LR", "SWA_START_FRAC", "SWA_EVERY",
                               "QAT_THRESHOLD", "TTT_ADAM_WD")}}


@dataclasses.dataclass(frozen=True)
class Hyperparameters:
    # paths and run identity
    data_path: str = knob("./data/datasets/fineweb10B_sp1024", "folder with fineweb_{train,val}_*.bin shards")
    tokenizer_path: str = knob("./data/tokenizers/fineweb_1024_bpe.model", "SentencePiece model of the shards")
    run_id: str = knob("", "run name; outputs go to RUNS_DIR/RUN_ID (default: date + random suffix)")
    runs_dir: str = knob("runs", "parent folder of the run folders")
    seed: int = knob(42, "seed of the model init and anything random", lo=-2**63, below=2**64)  # torch's range
    # model
    vocab_size: int = knob(1024, "tokenizer vocabulary size", lo=2)
    num_layers: int = knob(11, "transformer blocks (first half encoder, rest decoder)", lo=1)
    model_dim: int = knob(512, "residual width", lo=2)
    num_heads: int = knob(8, "query heads", lo=1)
    num_kv_heads: int = knob(4, "key/value heads (grouped-query attention)", lo=1)
    mlp_hidden: int = knob(1536, "MLP hidden width (ReLU^2)", lo=1)
    bigram_buckets: int = knob(2048, "BigramHash buckets (last one is the position-0 bucket)", lo=2)
    bigram_embed_dim: int = knob(128, "BigramHash embedding width", lo=1)
    bigram_scale_init: float = knob(0.05, "BigramHash output scale (never trained by the seed)")
    rope_dims: int = knob(16, "head dims rotated by RoPE (partial RoPE; 0 = the whole head)", lo=0)
    rope_base: float = knob(10000.0, "RoPE base", lo=1.0)
    rope_train_seq_len: int = knob(2048, "window length above which YaRN scales the RoPE base", lo=1)
    rope_inv_freq: str = knob("bf16", "RoPE 1/freq: bf16-rounded (as published) or exact", choices=("bf16", "fp32"))
    ln_scale: bool = knob(True, "scale block inputs by 1/sqrt(layer+1)")
    xsa_layers: int = knob(4, "last N blocks use XSA (remove own-value component)", lo=0)
    ve_enabled: bool = knob(True, "shared value embeddings in VE_LAYERS")
    ve_dim: int = knob(128, "value-embedding width", lo=1)
    ve_layers: str = knob("9,10", "comma-separated block indices that add value embeddings")
    logit_softcap: float = knob(30.0, "logits = cap*tanh(logits/cap)", lo=1e-6)
    qk_gain_init: float = knob(1.5, "initial per-head query gain")
    tied_embed_init_std: float = knob(0.005, "std of the tied embedding init", lo=0.0)
    bos_mask: bool = knob(False, "stop SmearGate/BigramHash mixing the previous document into BOS")
    # training
    train_seq_len: int = knob(2048, "tokens per training/eval window", lo=2)
    train_batch_tokens: int = knob(786432, "global batch in tokens (independent of GPU count)", lo=1)
    micro_batch_seqs: int = knob(48, "sequences per GPU per micro-step (lower it on small GPUs)", lo=1)
    micro_batch_pieces: int = knob(1, "micro-steps stacked into one forward/backward (same data order and math)", lo=1)
    iterations: int = knob(25000, "optimizer steps", lo=0)
    warmup_steps: int = knob(20, "linear LR warm-up steps", lo=0)
    warmdown_iters: int = knob(13000, "LR warm-down steps at the end", lo=0)
    warmdown_shape: str = knob("cosine", "warm-down shape", choices=("cosine", "linear"))
    max_wallclock_seconds: float = knob(0.0, "stop training at this many seconds (0 = off)", lo=0.0)
    prime_steps: int = knob(3, "untimed compile-priming steps, fully undone (COMPAT_PR644=1: the published 20)", lo=0)
    compat_pr644: bool = knob(False, "train with the published script's numerics, its accidents included")
    matrix_lr: float = knob(0.025, "Muon LR (encoder blocks, bigram proj)", lo=0.0)
    scalar_lr: float = knob(0.025, "AdamW LR of vectors and small tables", lo=0.0)
    tied_embed_lr: float = knob(0.035, "AdamW LR of the tied embedding", lo=0.0)
    decoder_lr_mult: float = knob(2.0, "LR multiplier of decoder blocks", lo=0.0)
    muon_momentum: float = knob(0.99, "Muon Nesterov momentum", lo=0.0, below=1.0)
    muon_momentum_warmup_start: float = knob(0.92, "Muon momentum at step 0", lo=0.0, below=1.0)
    muon_momentum_warmup_steps: int = knob(1500, "steps to reach MUON_MOMENTUM", lo=0)
    muon_backend_steps: int = knob(5, "Newton-Schulz iterations", lo=1)
    muon_wd: float = knob(0.04, "Muon decoupled weight decay", lo=0.0)
    adam_wd: float = knob(0.04, "AdamW weight decay", lo=0.0)
    beta1: float = knob(0.9, "AdamW beta1", lo=0.0, below=1.0)
    beta2: float = knob(0.95, "AdamW beta2", lo=0.0, below=1.0)
    adam_eps: float = knob(1e-8, "AdamW epsilon", lo=1e-30)
    grad_clip_norm: float = knob(0.3, "global gradient-norm clip (0 = off)", lo=0.0)
    ema_decay: float = knob(0.997, "EMA decay of the weights (0 = no EMA)", lo=0.0, below=1.0)
    val_loss_every: int = knob(500, "validate every N steps (0 = only at the end)", lo=0)
    train_log_every: int = knob(200, "log a train line every N steps", lo=1)
    checkpoint_every: int = knob(0, "write a resumable checkpoint every N steps (0 = off)", lo=0)
    checkpoint_dir: str = knob("", "checkpoint folder (default RUNS_DIR/RUN_ID/checkpoints)")
    resume: bool = knob(False, "continue from the newest valid checkpoint")
    # quantization and artifact
    quant_embed: bool = knob(True, "quantize the embeddings to int6 as well")
    quant_target_bytes: int = knob(0, "spend up to this many total bytes on finer grids (0 = seed quantizer)", lo=0)
    quant_method: str = knob("lite", "int6 codes: nearest or GPTQ (same grid)", choices=("lite", "gptq"))
    gptq_calib_seqs: int = knob(128, "GPTQ calibration sequences of TRAIN_SEQ_LEN from the training stream", lo=1)
    gptq_damp: float = knob(0.01, "GPTQ dampening: this fraction of the mean Hessian diagonal", lo=1e-6)
    artifact_limit_bytes: int = knob(16_000_000, "challenge cap on code + compressed model bytes", lo=1)
    # evaluation and TTT
    eval_stride: int = knob(64, "sliding-window stride (>= TRAIN_SEQ_LEN: standard eval)", lo=0)
    eval_batch_seqs: int = knob(32, "windows per forward pass during scoring", lo=1)
    val_max_tokens: int = knob(0, "score only the first N validation tokens (0 = all; not for records)", lo=0)
    ttt_enabled: bool = knob(True, "final eval with legal score-first test-time training")
    ttt_lr: float = knob(0.002, "TTT SGD peak LR", lo=0.0)
    ttt_epochs: int = knob(10, "TTT epochs over each scored chunk", lo=0)
    ttt_chunk_tokens: int = knob(32768, "targets per TTT chunk", lo=1)
    ttt_batch_seqs: int = knob(32, "sequences per TTT step", lo=1)
    ttt_momentum: float = knob(0.9, "TTT SGD momentum", lo=0.0)
    ttt_grad_clip: float = knob(1.0, "TTT gradient-norm clip (0 = off)", lo=0.0)
    ttt_freeze_blocks: int = knob(2, "first N blocks frozen during TTT", lo=0)
    # modes and devices
    dry_run: bool = knob(False, "check config, data, tokenizer, artifact, batch split for WORLD_SIZE, then exit")
    eval_only: bool = knob(False, "skip training; evaluate ARTIFACT")
    artifact: str = knob("", "artifact (.ptz) for EVAL_ONLY")
    device: str = knob("auto", "compute device", choices=("auto", "cpu", "cuda"))
    compile: str = knob("auto", "compile by regions (auto: on CUDA) or one graph", choices=("auto", "0", "1", "graph"))
    activation_budget: float = knob(0.0, "compiled graphs keep this share of activations (0 = off)", lo=0.0, below=1.0)
    compile_cache_dir: str = knob("", "torch.compile's code cache for later runs (default RUNS_DIR/compile_cache)")
    sdpa_backend: str = knob("auto", "attention kernel: torch's choice, flash (the published run's) or cuDNN's first "
                             "(others measured it faster on Hopper)", choices=("auto", "flash", "cudnn"))
    autocast: str = knob("auto", "bf16 autocast (auto = on CUDA; off = float32/TF32)", choices=("auto", "bf16", "off"))
    submission_author: str = knob("", "author field of submission.json")
    submission_github_id: str = knob("", "github_id field of submission.json")

    @property
    def ve_layer_list(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self.ve_layers.split(",") if s.strip()) if self.ve_enabled else ()

    @property
    def head_dim(self) -> int:
        return self.model_dim // self.num_heads

    @classmethod
    def from_env(cls, env=None) -> "Hyperparameters":
        env = os.environ if env is None else env
        names = {f.name.upper(): f for f in dataclasses.fields(cls)}
        for key, (fixed, why) in SEED_KNOBS.items():  # the seed's own switches: accept its run's values only
            if key in env and fixed is not None and env[key].strip().lower() != fixed:
                raise UserError(f"{key}={env[key]} is not supported: {why} (only {key}={fixed})")
        generic = {"DATA", "RUN", "RUNS", "SEED", "DEVICE", "COMPILE", "RESUME", "ARTIFACT", "MAX", "ITERATIONS"}
        prefixes = {n.split("_")[0] for n in names} - generic
        for key in env:  # a typo in a knob name must not silently fall back to the default
            close = difflib.get_close_matches(key, list(names), n=1, cutoff=0.85) or \
                [n for n in names if n.startswith(key + "_")][:1]  # a shortened name: MAX_WALLCLOCK, WARMDOWN
            if key not in names and key not in SEED_KNOBS and (close or ("_" in key and key.split("_")[0] in prefixes)):
                raise UserError(f"unknown setting {key}" + (f" (did you mean {close[0]}?)" if close else ""))
        kwargs = {}
        for name, f in [(n, f) for n, f in names.items() if n in env]:
            raw, typ = env[name].strip(), type(f.default)
            try:
                raw.encode()  # a byte that is not UTF-8 (decoded by Python as a surrogate) could not be logged
                val = {"0": False, "1": True, "false": False, "true": True}[raw.lower()] if typ is bool else typ(raw)
            except (KeyError, ValueError) as e:  # UnicodeEncodeError is a ValueError
                what = "UTF-8 text" if isinstance(e, UnicodeError) else f"a valid {typ.__name__}"
                raise UserError(f"{name}={env[name]!r} is not {what}") from None
            lo, choices, below = f.metadata["lo"], f.metadata["choices"], f.metadata["below"]
            out = (lo is not None and val < lo) or (below is not None and val >= below)
            if out or (typ is float and not math.isfinite(val)):
                raise UserError(f"{name}={raw} must be a finite number >= {lo}" + (f" and < {below}" if below else ""))
            if choices and val not in choices:
                raise UserError(f"{name}={raw} must be one of {', '.join(choices)}")
            kwargs[f.name] = val
        if kwargs.get("compat_pr644"):  # the published schedule, priming (it leaves the kept scale gradient) and kernel
            kwargs = dict(warmup_steps=0, warmdown_shape="linear", prime_steps=20, sdpa_backend="flash") | kwargs
        hp = cls(**kwargs)
        hp.check()
        return hp

    def check(self) -> None:
        def need(ok: bool, var: str, why: str):
            if not ok:
                raise UserError(f"{var}={getattr(self, var.lower())}: {why}")
        need(self.model_dim % self.num_heads == 0, "NUM_HEADS", f"must divide MODEL_DIM={self.model_dim}")
        need(self.num_heads % self.num_kv_heads == 0, "NUM_KV_HEADS", f"must divide NUM_HEADS={self.num_heads}")
        need(self.head_dim % 2 == 0, "MODEL_DIM", f"head dim MODEL_DIM/NUM_HEADS={self.head_dim} must be even")
        need(self.rope_dims % 2 == 0 and self.rope_dims <= self.head_dim, "ROPE_DIMS",
             f"must be even and <= head dim {self.head_dim}")
        need(self.xsa_layers <= self.num_layers, "XSA_LAYERS", f"exceeds NUM_LAYERS={self.num_layers}")
        need(self.ttt_freeze_blocks <= self.num_layers, "TTT_FREEZE_BLOCKS", f"exceeds NUM_LAYERS={self.num_layers}")
        need(self.warmdown_iters <= self.iterations or self.iterations == 0, "WARMDOWN_ITERS", f"exceeds ITERATIONS="
             f"{self.iterations}; set it too, e.g. WARMDOWN_ITERS={self.iterations * 13 // 25} (the seed's 52%)")
        need(not self.compat_pr644 or self.warmup_steps == 0, "WARMUP_STEPS", "COMPAT_PR644=1 has no LR warm-up "
             "(the published script's WARMUP_STEPS is its compile priming: PRIME_STEPS)")
        need(not self.compat_pr644 or self.warmdown_shape == "linear", "WARMDOWN_SHAPE",
             "COMPAT_PR644=1 warms down linearly, as the published script")
        need(self.train_batch_tokens % self.train_seq_len == 0, "TRAIN_BATCH_TOKENS",
             f"must be a multiple of TRAIN_SEQ_LEN={self.train_seq_len}")
        ve = [s.strip() for s in self.ve_layers.split(",") if s.strip()]
        need(all(s.isdecimal() and int(s) < self.num_layers for s in ve) and len({*map(int, ve)}) == len(ve),
             "VE_LAYERS", f"must be distinct comma-separated block indices within 0..{self.num_layers - 1}")
        need(not self.eval_only or os.path.isfile(self.artifact), "ARTIFACT",
             "EVAL_ONLY=1 needs ARTIFACT=an existing final_model.int6.ptz")
        need(not (self.eval_only and self.resume), "RESUME", "EVAL_ONLY=1 trains nothing, so nothing resumes")
        need(self.eval_only or not self.artifact, "ARTIFACT", "is read by EVAL_ONLY=1 only (training writes its own)")
        need(all(c.isalnum() or c in "._-" for c in self.run_id) and self.run_id not in (".", ".."), "RUN_ID",
             "names a folder in RUNS_DIR: letters, digits, '.', '_' and '-' only")
        ck = Path(self.checkpoint_dir)  # caught now, not at the first checkpoint an hour in
        need(not any(p.is_file() for p in (ck, *ck.parents)), "CHECKPOINT_DIR", "is a file or in one: name a folder")
        code = os.path.getsize(__file__)  # code + model bytes count toward QUANT_TARGET_BYTES, as toward the cap
        need(self.quant_target_bytes == 0 or self.quant_target_bytes > code, "QUANT_TARGET_BYTES",
             f"leaves no bytes for the model: the code alone is {code} bytes (0 = off)")

    def model_signature(self, resume: bool = False) -> dict:
        """The knobs that decide parameter shapes and the forward; with `resume`, also those that a checkpoint's
        optimizer and EMA state was made with. A resume must keep all of them."""
        keys = ("vocab_size", "num_layers", "model_dim", "num_heads", "num_kv_heads", "mlp_hidden", "bigram_buckets",
                "bigram_embed_dim", "rope_dims", "rope_base", "rope_train_seq_len", "rope_inv_freq", "ln_scale",
                "xsa_layers", "ve_enabled", "ve_dim", "ve_layers", "logit_softcap", "bos_mask", "train_seq_len",
                "compat_pr644") + (("seed", "train_batch_tokens", "matrix_lr", "scalar_lr", "tied_embed_lr",
                "decoder_lr_mult", "muon_momentum", "muon_momentum_warmup_start", "muon_momentum_warmup_steps",
                "muon_backend_steps", "muon_wd", "adam_wd", "beta1", "beta2", "adam_eps", "grad_clip_norm", "ema_decay",
                "warmup_steps", "warmdown_shape") if resume else ())
        return {k: getattr(self, k) for k in keys}


def help_text() -> str:
    shown = lambda d: str(int(d)) if isinstance(d, bool) else str(d) or "-"  # as set: 0/1 for switches, - for none
    rows = [f"{f.name.upper():28s} {shown(f.default):38s} {f.metadata['help']}"
            for f in dataclasses.fields(Hyperparameters)]
    return ("usage: [KNOB=value ...] python train_gpt.py   (or torchrun --nproc_per_node=N train_gpt.py)\n"
            "Every setting is an environment variable; defaults: the seed's run, LR schedule as its summary.\n\n"
            f"{'KNOB':28s} {'DEFAULT':38s} MEANING\n" + "\n".join(rows))


# ---- Data and metric -------------------------------------------------------------------------
# Why: shards are the challenge's binary format; val_bpb must match the challenge's byte rule bit
# for bit, so the byte tables come straight from the tokenizer and sums run in float64.

SHARD_MAGIC, SHARD_VERSION, HEADER_INTS = 20240520, 1, 256


def open_shard(path: str) -> np.ndarray:
    """Memory-map one shard's tokens after checking magic, version and exact file size."""
    try:
        size = os.path.getsize(path)
        header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    except OSError as e:
        raise UserError(f"cannot read shard {path}: {e.strerror}") from None
    if header.size < HEADER_INTS:
        raise UserError(f"shard {path}: truncated header ({size} bytes, need {HEADER_INTS * 4})")
    if header[0] != SHARD_MAGIC or header[1] != SHARD_VERSION:
        raise UserError(f"shard {path}: bad magic/version {header[0]}/{header[1]} (want {SHARD_MAGIC}/{SHARD_VERSION})")
    if (n := int(header[2])) < 0 or size != HEADER_INTS * 4 + 2 * n:
        raise UserError(f"shard {path}: header says {n} tokens = {HEADER_INTS * 4 + 2 * n} bytes, file has {size} "
                        "(truncated or corrupt download?)")
    return np.memmap(path, dtype="<u2", mode="r", offset=HEADER_INTS * 4, shape=(n,))


def shard_files(data_path: str, split: str) -> list[str]:
    if not os.path.isdir(data_path):
        raise UserError(f"DATA_PATH={data_path} is not a directory (download: ./run.sh data N; 0 = no train shards)")
    files = sorted(str(p) for p in Path(data_path).glob(f"fineweb_{split}_*.bin"))
    if not files:
        raise UserError(f"no fineweb_{split}_*.bin shards in DATA_PATH={data_path}")
    return files


class TokenStream:
    """The train shards in sorted order as one endless stream; position = (shard, offset)."""

    def __init__(self, files: list[str]):
        self.shards = [open_shard(f) for f in files]
        if sum(len(s) for s in self.shards) == 0:
            raise UserError(f"train shards hold no tokens: {files[0]} ...")
        self.shard, self.offset = 0, 0

    def take(self, n: int) -> np.ndarray:
        parts = []
        while n > 0:
            s = self.shards[self.shard]
            k = min(n, len(s) - self.offset)
            parts.append(s[self.offset:self.offset + k])
            self.offset, n = self.offset + k, n - k
            if self.offset >= len(s):
                self.shard, self.offset = (self.shard + 1) % len(self.shards), 0
        return np.concatenate(parts)

    def state(self) -> dict:
        return {"shard": self.shard, "offset": self.offset}

    def load_state(self, st: dict) -> None:
        self.shard, self.offset = int(st["shard"]), int(st["offset"])
        if self.shard >= len(self.shards) or self.offset >= len(self.shards[self.shard]):
            raise UserError(f"the checkpoint's data position (shard {self.shard}, token {self.offset}) is past the "
                            f"{len(self.shards)} train shards now in DATA_PATH: resume with the run's shards")


def load_validation(hp: Hyperparameters) -> Tensor:
    tokens = np.concatenate([open_shard(f) for f in shard_files(hp.data_path, "val")])[:hp.val_max_tokens or None]
    if len(tokens) <= hp.train_seq_len:  # the standard evaluation scores whole windows only
        raise UserError(f"validation split in {hp.data_path} has {len(tokens)} tokens (VAL_MAX_TOKENS="
                        f"{hp.val_max_tokens}); need at least TRAIN_SEQ_LEN+1 = {hp.train_seq_len + 1}")
    if tokens.max() >= hp.vocab_size:
        raise UserError(f"validation shards hold token id {tokens.max()} >= VOCAB_SIZE={hp.vocab_size}")
    return torch.from_numpy(tokens.astype(np.int64))


def load_tokenizer(hp: Hyperparameters):
    import sentencepiece as spm
    if not os.path.isfile(hp.tokenizer_path):
        what = "is a folder, not the .model file" if os.path.isdir(hp.tokenizer_path) else "does not exist"
        raise UserError(f"TOKENIZER_PATH={hp.tokenizer_path} {what} (download: ./run.sh data N; 0 = no train shards)")
    try:
        sp = spm.SentencePieceProcessor(model_file=hp.tokenizer_path)
    except Exception as e:
        raise UserError(f"TOKENIZER_PATH={hp.tokenizer_path} is not a SentencePiece model ({e})") from None
    if sp.vocab_size() != hp.vocab_size:
        raise UserError(f"tokenizer {hp.tokenizer_path} has {sp.vocab_size()} pieces but VOCAB_SIZE={hp.vocab_size}")
    return sp


def byte_tables(sp, vocab_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """Per token id: UTF-8 bytes without a leading '▁', whether it has one, whether it is a boundary."""
    base = torch.zeros(vocab_size, dtype=torch.int64)
    space, boundary = (torch.zeros(vocab_size, dtype=torch.bool) for _ in range(2))
    for i in range(sp.vocab_size()):
        if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
            boundary[i] = True
        elif sp.is_byte(i):
            base[i] = 1
        else:
            piece = sp.id_to_piece(i)
            if piece.startswith("\u2581"):
                space[i], piece = True, piece[1:]
            base[i] = len(piece.encode("utf-8"))
    return base, space, boundary


class BpbMeter:
    """Sums of loss, scored targets and credited bytes (float64) -> val_loss, val_bpb."""

    def __init__(self, tables: tuple[Tensor, Tensor, Tensor], device: torch.device):
        self.base, self.space, self.boundary = (t.to(device) for t in tables)
        self.sums = torch.zeros(3, dtype=torch.float64, device=device)

    def add(self, losses: Tensor, prev: Tensor, tgt: Tensor, mask: Tensor) -> None:
        """Accumulate the targets where mask is true (no host sync, so scoring never stalls the GPU)."""
        nbytes = (self.base[tgt] + (self.space[tgt] & ~self.boundary[prev]).long()) * mask
        self.sums += torch.stack([(losses.double() * mask).sum(), mask.sum().double(), nbytes.sum().double()])

    def result(self) -> tuple[float, float]:
        sums = self.sums.clone()
        if dist.is_initialized():
            dist.all_reduce(sums)
        loss, ntok, nbytes = sums.tolist()
        val_loss = loss / max(ntok, 1.0)
        return val_loss, val_loss / math.log(2.0) * ntok / max(nbytes, 1.0)


# ---- Model -----------------------------------------------------------------------------------
# Why: one block, one attention and one forward serve training, scoring and TTT; the state-dict
# names and shapes are the seed's, so its artifacts load unchanged.

try:  # FlashAttention 3 (Hopper) when installed; never required
    from flash_attn_interface import flash_attn_func as _fa3
except Exception:
    _fa3 = None


def rms(x: Tensor) -> Tensor:  # float32 as CUDA autocast does; explicit so CPU autocast matches (as normalize, square)
    return F.rms_norm(x.float(), (x.size(-1),))


def attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Causal attention on (B, T, H, hd) tensors; query head h reads kv head h // (H/Hkv)."""
    # FA3: eager only (not traced), bf16 only (AUTOCAST=off keeps attention in float32), Hopper only
    fa3 = _fa3 is not None and not torch.compiler.is_compiling() and q.is_cuda and torch.is_autocast_enabled("cuda")
    if fa3 and torch.cuda.get_device_capability(q.device)[0] == 9:
        out = _fa3(q.bfloat16(), k.bfloat16(), v.bfloat16(), causal=True)
        return (out[0] if isinstance(out, tuple) else out).to(q.dtype)
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                                          enable_gqa=q.size(2) != k.size(2)).transpose(1, 2)


def rope_angles(hp: Hyperparameters, seq_len: int, device) -> tuple[Tensor, Tensor]:
    """cos/sin (T, dims/2), recomputed per forward so no cache outlives an inference_mode block. The published
    model cast its frequency buffer to bf16 (ROPE_INV_FREQ=bf16); its YaRN branch recomputes them in fp32."""
    dims, base, exact = hp.rope_dims or hp.head_dim, hp.rope_base, hp.rope_inv_freq == "fp32"
    if seq_len > hp.rope_train_seq_len and dims > 2:  # YaRN-style base stretch for longer windows
        base, exact = base * (seq_len / hp.rope_train_seq_len) ** (dims / (dims - 2)), True
    inv_freq = 1.0 / base ** (torch.arange(0, dims, 2, dtype=torch.float32, device=device) / dims)
    inv_freq = inv_freq if exact else inv_freq.bfloat16().float()
    ang = torch.arange(seq_len, dtype=torch.float32, device=device)[:, None] * inv_freq[None, :]
    return ang.cos(), ang.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate pairs (i, i+half) of the first 2*half dims of (B, T, H, hd); leave the rest untouched."""
    half = cos.size(-1)
    a, b, rest = x[..., :half], x[..., half:2 * half], x[..., 2 * half:]
    cos, sin = cos[None, :, None, :].to(x.dtype), sin[None, :, None, :].to(x.dtype)
    return torch.cat((a * cos + b * sin, b * cos - a * sin, rest), dim=-1)


class Attention(nn.Module):
    def __init__(self, hp: Hyperparameters, xsa: bool):
        super().__init__()
        d, kv = hp.model_dim, hp.num_kv_heads * hp.head_dim
        self.h, self.hkv, self.hd, self.xsa = hp.num_heads, hp.num_kv_heads, hp.head_dim, xsa
        self.c_q = nn.Linear(d, d, bias=False)
        self.c_k, self.c_v = nn.Linear(d, kv, bias=False), nn.Linear(d, kv, bias=False)
        self.proj = nn.Linear(d, d, bias=False)
        self.q_gain = nn.Parameter(torch.full((hp.num_heads,), hp.qk_gain_init))

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], ve: Tensor | None) -> Tensor:
        B, T, _ = x.shape
        q = self.c_q(x).view(B, T, self.h, self.hd)
        k = self.c_k(x).view(B, T, self.hkv, self.hd)
        v = (self.c_v(x) if ve is None else self.c_v(x) + ve).view(B, T, self.hkv, self.hd)
        q, k = apply_rope(rms(q), *rope), apply_rope(rms(k), *rope)
        q = q * self.q_gain.to(q.dtype)[:, None]
        y = attention(q, k, v)  # (B, T, H, hd)
        if self.xsa:  # remove each head's component along its own token's value direction
            y = y.reshape(B, T, self.hkv, self.h // self.hkv, self.hd)
            n = F.normalize(v.float(), dim=-1).unsqueeze(3)
            y = (y - (y * n).sum(-1, keepdim=True) * n)
        return self.proj(y.reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, hp: Hyperparameters):
        super().__init__()
        self.up_proj = nn.Linear(hp.model_dim, hp.mlp_hidden, bias=False)
        self.down_proj = nn.Linear(hp.mlp_hidden, hp.model_dim, bias=False)
        self.scale = nn.Parameter(torch.ones(hp.mlp_hidden))
        self.bias = nn.Parameter(torch.zeros(hp.mlp_hidden))

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.relu(self.up_proj(x)).float().square() * self.scale.to(x.dtype) + self.bias.to(x.dtype))


class Block(nn.Module):
    def __init__(self, hp: Hyperparameters, i: int):
        super().__init__()
        d = hp.model_dim
        self.attn = Attention(hp, xsa=i >= hp.num_layers - hp.xsa_layers)
        self.mlp = MLP(hp)
        self.attn_scale = nn.Parameter(torch.ones(d))
        self.mlp_scale = nn.Parameter(torch.ones(d))
        self.resid_mix = nn.Parameter(torch.stack([torch.ones(d), torch.zeros(d)]))
        # a tensor, not a float: the compiled blocks of one kind then share one graph (a float is a guarded constant)
        self.register_buffer("ln_c", torch.tensor(1.0 / math.sqrt(i + 1) if hp.ln_scale else 1.0), persistent=False)

    def forward(self, x: Tensor, x0: Tensor, rope, ve: Tensor | None) -> Tensor:
        mix = self.resid_mix.to(x.dtype)
        x = mix[0] * x + mix[1] * x0
        x = x + self.attn_scale.to(x.dtype) * self.attn(rms(x) * self.ln_c, rope, ve)
        return x + self.mlp_scale.to(x.dtype) * self.mlp(rms(x) * self.ln_c)


class BigramHash(nn.Module):
    def __init__(self, hp: Hyperparameters):
        super().__init__()
        self.embed = nn.Embedding(hp.bigram_buckets, hp.bigram_embed_dim)
        self.proj = nn.Linear(hp.bigram_embed_dim, hp.model_dim, bias=False)
        self.scale = nn.Parameter(torch.tensor(hp.bigram_scale_init))

    def buckets(self, ids: Tensor, is_bos: Tensor | None) -> Tensor:
        last = self.embed.num_embeddings - 1
        ids32 = ids.to(torch.int32)
        h = torch.bitwise_xor(36313 * ids32[:, 1:], 27191 * ids32[:, :-1]) % last
        h = torch.cat([torch.full_like(ids32[:, :1], last), h], dim=1)
        return h if is_bos is None else torch.where(is_bos, last, h)

    def forward(self, ids: Tensor, is_bos: Tensor | None) -> Tensor:
        return self.scale * self.proj(self.embed(self.buckets(ids, is_bos)))


class SmearGate(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.gate = nn.Parameter(torch.zeros(dim))

    def forward(self, x: Tensor, is_bos: Tensor | None) -> Tensor:
        g = torch.sigmoid(self.gate).to(x.dtype)
        prev = F.pad(x[:, :-1], (0, 0, 1, 0))
        prev = prev if is_bos is None else prev.masked_fill(is_bos[..., None], 0.0)
        return (1 - g) * x + g * prev


class ValueEmbedding(nn.Module):
    def __init__(self, hp: Hyperparameters):
        super().__init__()
        kv = hp.num_kv_heads * hp.head_dim
        self.embed = nn.Embedding(hp.vocab_size, hp.ve_dim)
        nn.init.normal_(self.embed.weight, std=0.01)  # drawn here, before GPT's init pass, as the published script
        self.proj = nn.Linear(hp.ve_dim, kv, bias=False) if hp.ve_dim != kv else nn.Identity()  # none at the kv width
        self.scale = nn.Parameter(torch.tensor(0.1))

    def forward(self, ids: Tensor) -> Tensor:
        return self.scale * self.proj(self.embed(ids))


class GPT(nn.Module):
    def __init__(self, hp: Hyperparameters):
        super().__init__()
        self.hp = hp
        d, L = hp.model_dim, hp.num_layers
        self.n_enc = L // 2  # encoder blocks; each feeds a skip into a decoder block (there are as many or one more)
        self.tok_emb = nn.Embedding(hp.vocab_size, d)
        self.bigram_emb = BigramHash(hp)
        self.smear_gate = SmearGate(d)
        self.skip_weights = nn.Parameter(torch.ones(self.n_enc, d))
        self.skip_gates = nn.Parameter(torch.zeros(self.n_enc, d))
        self.blocks = nn.ModuleList(Block(hp, i) for i in range(L))
        self.ve_layers = {layer: k for k, layer in enumerate(hp.ve_layer_list)}
        if self.ve_layers:
            self.ve_shared = ValueEmbedding(hp)
            self.ve_layer_scales = nn.ParameterList(nn.Parameter(torch.ones(1)) for _ in self.ve_layers)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The published init pass, drawing from the RNG in its order after the modules' own draws."""
        nn.init.normal_(self.tok_emb.weight, std=self.hp.tied_embed_init_std)
        nn.init.zeros_(self.bigram_emb.embed.weight)
        for name, m in [(n, m) for n, m in self.named_modules() if isinstance(m, nn.Linear)]:
            big = min(m.weight.shape) >= 64  # ".proj": attn.proj and the BigramHash/VE projections (zero if small)
            if name.endswith(("attn.proj", "mlp.down_proj")) or (name.endswith(".proj") and not big):
                nn.init.zeros_(m.weight)
            elif big:
                nn.init.orthogonal_(m.weight)
                if name.endswith(".proj"):  # the BigramHash and value-embedding projections
                    m.weight.mul_(1.0 / math.sqrt(2 * self.hp.num_layers))
        if self.hp.compat_pr644:  # the published cast round trip: every value bf16-rounded, tok_emb kept in bf16
            for p in self.parameters():
                p.copy_(p.bfloat16())
            self.tok_emb.bfloat16()

    def forward(self, ids: Tensor, targets: Tensor, score_from: int = 0) -> Tensor:
        """Per-position cross-entropy (float32, (B, T - score_from)) of targets[:, score_from:]. The embeddings, each
        block, the skip mix and the head are the regions that COMPILE=1 compiles one by one (compile_model)."""
        is_bos = (ids == 1) if self.hp.bos_mask else None
        x = self.embed(ids, is_bos)
        x0, skips = x, []
        rope = rope_angles(self.hp, ids.size(1), ids.device)
        ve = self.ve_shared(ids) if self.ve_layers else None
        for i, block in enumerate(self.blocks):
            if i >= self.n_enc and skips:
                x = self.skip_mix(x, skips.pop(), self.skip_gates[i - self.n_enc], self.skip_weights[i - self.n_enc])
            k = self.ve_layers.get(i)
            x = block(x, x0, rope, None if k is None else ve * self.ve_layer_scales[k].to(ve.dtype))
            if i < self.n_enc:
                skips.append(x)
        return self.head(x, targets, score_from)

    def embed(self, ids: Tensor, is_bos: Tensor | None) -> Tensor:
        return self.smear_gate(rms(self.tok_emb(ids) + self.bigram_emb(ids, is_bos)), is_bos)

    @staticmethod
    def skip_mix(x: Tensor, skip: Tensor, gate: Tensor, weight: Tensor) -> Tensor:
        g = torch.sigmoid(gate).to(x.dtype)
        return g * x + (1 - g) * (weight.to(x.dtype) * skip)

    def head(self, x: Tensor, targets: Tensor, score_from: int) -> Tensor:
        x = rms(x[:, score_from:])
        logits = F.linear(x, self.tok_emb.weight.to(x.dtype)).float()
        logits = self.hp.logit_softcap * torch.tanh(logits / self.hp.logit_softcap)
        tgt = targets[:, score_from:]
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)), tgt.reshape(-1), reduction="none").view(tgt.shape)


# ---- Optimizers ------------------------------------------------------------------------------
# Why: Muon orthogonalises the block matrices (each rank a share, updates shared); AdamW takes the
# rest. Every parameter's optimizer and LR comes from one explicit role table.

# role -> (optimizer, base-LR knob, decoder blocks get DECODER_LR_MULT)
PARAM_ROLES = {
    "block_matrix": ("muon", "matrix_lr", True),
    "bigram_proj": ("muon", "matrix_lr", False),
    "block_vector": ("adam", "scalar_lr", True),
    "global": ("adam", "scalar_lr", False),
    "embedding": ("adam", "tied_embed_lr", False),
    # bigram_emb.scale: no optimizer owns it in the seed, so training keeps it at 0.05 (TTT does train it)
    "frozen": (None, None, False),
}


def param_roles(model: GPT) -> dict[str, tuple[str, int]]:
    """name -> (role, block index or -1), from the module structure; every parameter exactly once."""
    roles: dict[str, tuple[str, int]] = {}
    for i, block in enumerate(model.blocks):
        linear = {f"{n}.weight" for n, m in block.named_modules() if isinstance(m, nn.Linear)}
        for n, _ in block.named_parameters():
            roles[f"blocks.{i}.{n}"] = ("block_matrix" if n in linear else "block_vector", i)
    roles |= {"tok_emb.weight": ("embedding", -1), "bigram_emb.proj.weight": ("bigram_proj", -1),
              "bigram_emb.scale": ("frozen", -1)}
    for n, _ in model.named_parameters():
        if not n.startswith("blocks.") and n not in roles:
            roles[n] = ("global", -1)  # smear gate, skips, bigram table, value embeddings
    assert set(roles) == {n for n, _ in model.named_parameters()}, "parameter role table out of date"
    return roles


def newton_schulz(G: Tensor, steps: int) -> Tensor:
    """U V^T of G = U S V^T by the seed's quintic iteration in bf16, for a matrix or a stack (each normalised alone). A
    step: 3 batched matmuls whose epilogues add the scaled terms (one rounding each; nearer exact than published)."""
    a, b, c = 3.4445, -4.7750, 2.0315
    X = G.bfloat16()
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    tall = X.size(-2) > X.size(-1)
    X = X.mT if tall else X
    X = X.reshape(-1, X.size(-2), X.size(-1))  # one matrix: a stack of one (a view)
    for _ in range(steps):
        A = X @ X.mT
        X = torch.baddbmm(X, torch.baddbmm(A, A, A, beta=b, alpha=c), X, beta=a)  # a*X + (b*A + c*A@A) @ X
    X = X.view(*G.shape[:-2], X.size(-2), X.size(-1))
    return X.mT if tall else X


class Muon(torch.optim.Optimizer):
    """Nesterov momentum -> Newton-Schulz -> sqrt(max(1, rows/cols)) scale, decoupled weight decay. Every rank keeps
    all momentum buffers, orthogonalises its share (batched per shape); one all-gather shares the updates."""

    def __init__(self, groups, momentum: float, steps: int, wd: float, ns=newton_schulz, update_dtype=torch.float32):
        super().__init__(groups, dict(lr=0.0, momentum=momentum, steps=steps, wd=wd))
        self.ns, self.update_dtype = ns, update_dtype  # bf16: the published script's update buffer (COMPAT_PR644)

    @torch.no_grad()
    def step(self):
        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        mats = []  # (parameter, its group, g + m * buf once buf = m * buf + g)
        for g in self.param_groups:
            bufs = [self.state[p].setdefault("momentum_buffer", torch.zeros_like(p)) for p in g["params"]]
            grads = [p.grad for p in g["params"]]
            torch._foreach_mul_(bufs, g["momentum"])
            torch._foreach_add_(bufs, grads)
            mats += zip(g["params"], [g] * len(grads), torch._foreach_add(grads, bufs, alpha=g["momentum"]))
        shapes = list(dict.fromkeys(p.shape for p, _, _ in mats))
        mats.sort(key=lambda m: shapes.index(m[0].shape))  # stable: shape by shape
        owned = [mats[r::world] for r in range(world)]  # every W-th matrix of that list: shares of near-equal size
        seg = max(sum(p.numel() for p, _, _ in share) for share in owned)  # gathered in equal parts: pad to the longest
        mine, pos = torch.zeros(seg, dtype=self.update_dtype, device=mats[0][0].device), 0
        for rows, cols in shapes:
            same = [m for m in owned[rank] if m[0].shape == (rows, cols)]
            if same:
                U = self.ns(torch.stack([n for _, _, n in same]), same[0][1]["steps"])
                mine[pos:pos + U.numel()] = (U.to(mine.dtype) * max(1.0, rows / cols) ** 0.5).flatten()
                pos += U.numel()
        every = mine.new_empty(world * seg) if world > 1 else mine
        if world > 1:  # torch 2.13 renamed it all_gather_single (the old name warns)
            getattr(dist, "all_gather_single", dist.all_gather_into_tensor)(every, mine)
        for r, share in enumerate(owned):
            sizes = [p.numel() for p, _, _ in share]
            for (p, g, _), u in zip(share, every[r * seg:r * seg + sum(sizes)].split(sizes)):
                p.mul_(1 - g["lr"] * g["wd"]).add_(u.view_as(p).to(p.dtype), alpha=-g["lr"])


def build_optimizers(hp: Hyperparameters, model: GPT) -> list[torch.optim.Optimizer]:
    groups: dict[tuple[str, float], list] = {}
    params = dict(model.named_parameters())
    for name, (role, block) in param_roles(model).items():
        opt, lr_knob, dec = PARAM_ROLES[role]
        if opt is not None:
            lr = getattr(hp, lr_knob) * (hp.decoder_lr_mult if dec and block >= model.n_enc else 1.0)
            groups.setdefault((opt, lr), []).append(params[name])
    mk = lambda kind: [dict(params=ps, lr=lr, base_lr=lr) for (o, lr), ps in groups.items() if o == kind]
    return [Muon(mk("muon"), hp.muon_momentum, hp.muon_backend_steps, hp.muon_wd, newton_schulz,
                 torch.bfloat16 if hp.compat_pr644 else torch.float32),
            torch.optim.AdamW(mk("adam"), betas=(hp.beta1, hp.beta2), eps=hp.adam_eps, weight_decay=hp.adam_wd,
                              fused=next(model.parameters()).is_cuda)]


def lr_multiplier(hp: Hyperparameters, step: int, elapsed_ms: float = 0.0, step_ms: float = 0.0) -> float:
    """Warm-up, plateau, warm-down (cosine or linear) to 0 at ITERATIONS or the cap; `left` computed as published."""
    warm = min(1.0, (step + 1) / hp.warmup_steps) if hp.warmup_steps else 1.0
    if hp.max_wallclock_seconds > 0:
        left_ms = max(hp.max_wallclock_seconds * 1000 - elapsed_ms, 0.0)
        span_ms = hp.warmdown_iters * step_ms
        left = left_ms / span_ms if 0 < span_ms and left_ms < span_ms else 1.0
    else:
        left = (hp.iterations - step) / hp.warmdown_iters if hp.warmdown_iters else 1.0
    left = min(max(left, 0.0), 1.0)
    return warm * (0.5 * (1 - math.cos(math.pi * left)) if hp.warmdown_shape == "cosine" else left)


def muon_momentum(hp: Hyperparameters, step: int) -> float:
    f = min(step / hp.muon_momentum_warmup_steps, 1.0) if hp.muon_momentum_warmup_steps else 1.0
    return (1 - f) * hp.muon_momentum_warmup_start + f * hp.muon_momentum


# ---- Training --------------------------------------------------------------------------------
# Why: a 3.5-hour multi-GPU run must survive a kill: the whole training state (weights, optimizers,
# EMA, data position, RNG) is one dict, used for checkpoints and for undoing the compile priming.


@dataclasses.dataclass
class Runtime:
    """Process-level facts: distributed rank, device, compilation, autocast, the compiled forward and the log."""
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    compiled: object = None
    compile: bool = False
    bf16: bool = False
    sdpa: str = "auto"
    run_dir: Path | None = None
    log_file: object = None

    @contextlib.contextmanager
    def autocast(self):  # the one place that sets how forwards (training, scoring, TTT) run: AUTOCAST, SDPA_BACKEND
        cudnn = [SDPBackend.CUDNN_ATTENTION] if self.sdpa == "cudnn" else []  # cuDNN's kernel first, or (flash) off
        order = cudnn + [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16), \
                (sdpa_kernel(order, set_priority=True) if self.sdpa != "auto" else contextlib.nullcontext()):
            yield

    def log(self, msg: str) -> None:
        if self.rank == 0:
            print(msg + "\n", end="", flush=True)  # one write: lines of several processes never interleave
            if self.log_file is not None:
                print(msg, file=self.log_file, flush=True)


def all_reduce_grads(params: list[nn.Parameter], world: int) -> None:
    """Average gradients across ranks in one flat all-reduce (missing grads count as zeros)."""
    if world == 1:
        return
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in params])
    dist.all_reduce(flat)
    flat /= world
    for p, g in zip(params, flat.split([p.numel() for p in params])):
        p.grad = g.view_as(p).to(p.dtype)


class Stopped(BaseException):  # not an Exception: no `except Exception` on its way (a checkpoint read) eats it
    """A stop signal ended the run: args (signum, the line already logged or None); exit status 128 + signum."""


@dataclasses.dataclass
class StopSignal:
    """SIGTERM / SIGUSR1 (a scheduler's preemption; torchrun passes SIGTERM on, kills 30 s later): noted in training
    (the loop stops at a step boundary with a checkpoint), else it ends the run at once (files go tmp + rename)."""
    signum: int = 0
    phase: str = "startup"

    def __call__(self, signum, frame) -> None:  # the handler; a second signal changes nothing
        first, self.signum = not self.signum, self.signum or signum
        if first and self.phase != "training":
            raise Stopped(signum, None)


STOP = StopSignal()


def batch_split(hp: Hyperparameters, world: int) -> tuple[int, int, int]:
    """(micro-batch, accumulation, pieces): the largest micro-batch <= MICRO_BATCH_SEQS dividing each rank's equal
    share; micro-batches per forward/backward: the largest divisor of the accumulation steps <= MICRO_BATCH_PIECES."""
    T, seqs = hp.train_seq_len, hp.train_batch_tokens // hp.train_seq_len
    if seqs % world:
        near = " or ".join(str(n * T) for n in (seqs // world * world, seqs // world * world + world) if n)
        raise UserError(f"TRAIN_BATCH_TOKENS={hp.train_batch_tokens} ({seqs} sequences of {T}) does not split over "
                        f"{world} processes: use a multiple of {world * T}, e.g. TRAIN_BATCH_TOKENS={near}")
    share = seqs // world
    micro = max(m for m in range(1, min(hp.micro_batch_seqs, share) + 1) if share % m == 0)
    accum = share // micro
    return micro, accum, max(d for d in range(1, min(hp.micro_batch_pieces, accum) + 1) if accum % d == 0)


def warn_short_ema(hp: Hyperparameters, rt: Runtime, step_ms: float = 0.0) -> None:
    """At start (with a wall-clock cap: once the step time is known) warn if the EMA would keep > 5% of the init."""
    wall = hp.max_wallclock_seconds > 0
    steps = min(hp.iterations, hp.max_wallclock_seconds * 1000 / step_ms) if wall and step_ms else hp.iterations
    kept = hp.ema_decay ** steps if hp.ema_decay > 0 and steps > 0 and wall == (step_ms > 0) else 0.0
    if kept > 0.05:
        rt.log(f"warning: EMA_DECAY^steps = {hp.ema_decay}^{steps:.0f} = {kept:.0%} of the initial weights stay in "
               f"the final EMA weights; for a run this short use e.g. EMA_DECAY={max(1 - 10 / steps, 0):.4g}")


class Trainer:
    def __init__(self, hp: Hyperparameters, rt: Runtime, model: GPT, stream: TokenStream):
        self.hp, self.rt, self.model, self.stream = hp, rt, model, stream
        self.opts = build_optimizers(hp, model)
        self.params = list(model.parameters())
        owned = {id(p) for o in self.opts for g in o.param_groups for p in g["params"]}
        # COMPAT_PR644: the published script clears only its optimizers' gradients (bigram_emb.scale's accumulates)
        self.kept = [p for p in self.params if id(p) not in owned] if hp.compat_pr644 else []
        self.ema = {k: v.detach().float().clone() for k, v in model.state_dict().items()} if hp.ema_decay > 0 else None
        self.micro, self.accum, self.pieces = batch_split(hp, rt.world)
        self.step, self.train_ms = 0, 0.0
        self.ckpt_dir = Path(hp.checkpoint_dir) if hp.checkpoint_dir else Path(rt.run_dir or ".") / "checkpoints"
        self.bad_step = torch.full((), -1, dtype=torch.int64, device=rt.device)
        self.votes = torch.zeros((), device=rt.device)  # > 0 once any rank got a stop signal

    def state(self) -> dict:
        cpu = lambda t: t.detach().to("cpu", copy=True)  # off the GPU: the priming snapshot adds nothing to the peak
        st = {"model": {k: cpu(v) for k, v in self.model.state_dict().items()},
              "opts": [copy.deepcopy(o.state_dict()) for o in self.opts],
              "ema": self.ema and {k: cpu(v) for k, v in self.ema.items()},
              "data": self.stream.state(), "step": self.step, "train_ms": self.train_ms,
              "kept_grads": [None if p.grad is None else p.grad.clone() for p in self.kept],
              "rng": torch.get_rng_state(), "signature": json.dumps(self.hp.model_signature(True), sort_keys=True)}
        if self.rt.device.type == "cuda":  # not on a GPU box run with DEVICE=cpu: that would open a CUDA context
            st["cuda_rng"] = torch.cuda.get_rng_state()
        return st

    def load_state(self, st: dict) -> None:
        self.model.load_state_dict(st["model"])
        for o, s in zip(self.opts, st["opts"]):
            o.load_state_dict(s)
        if self.ema is not None:
            self.ema = {k: v.clone().to(self.rt.device) for k, v in st["ema"].items()}
        self.stream.load_state(st["data"])
        for p, g in zip(self.kept, st.get("kept_grads", [])):  # absent when priming restores (as published)
            p.grad = None if g is None else g.clone().to(p.device)
        self.step, self.train_ms = int(st["step"]), float(st["train_ms"])
        torch.set_rng_state(st["rng"])
        if "cuda_rng" in st and self.rt.device.type == "cuda":
            torch.cuda.set_rng_state(st["cuda_rng"])

    def next_batch(self) -> list[tuple[Tensor, Tensor]]:
        """One contiguous span per step: world*accum pieces of micro*T+1 tokens; rank r takes r, r+W, ..."""
        T, n = self.hp.train_seq_len, self.micro * self.hp.train_seq_len + 1
        span = self.stream.take(self.accum * self.rt.world * n).reshape(self.accum, self.rt.world, n)
        if span.max() >= self.hp.vocab_size:  # all ranks see the whole span: all stop at the same step
            raise UserError(f"train shards in DATA_PATH={self.hp.data_path} hold token id {span.max()} >= VOCAB_SIZE="
                            f"{self.hp.vocab_size} (train shard {self.stream.shard} of {len(self.stream.shards)})")
        buf = torch.from_numpy(span[:, self.rt.rank].astype(np.int64))
        if self.rt.device.type == "cuda":
            buf = buf.pin_memory().to(self.rt.device, non_blocking=True)
        return [(b[:-1].view(-1, T), b[1:].view(-1, T)) for b in buf]

    def train_step(self, lr_mult: float, priming: bool = False) -> Tensor:
        hp = self.hp
        total = torch.zeros(2, device=self.rt.device)  # the loss and this rank's stop vote
        batch, k, n = self.next_batch(), self.pieces, self.accum // self.pieces
        for j in range(0, self.accum, k):  # k pieces of the data order per forward: the same mean over the batch
            x, y = (torch.cat(t) for t in zip(*batch[j:j + k]))
            with self.rt.autocast():
                loss = self.rt.compiled(x, y).mean()
            (loss / n).backward()
            total[0] += loss.detach() / n
        if STOP.signum:
            total[1] = 1.0
        all_reduce_grads(self.params, self.rt.world)
        if hp.grad_clip_norm > 0 and not priming:  # the published priming steps neither clip
            torch.nn.utils.clip_grad_norm_(self.params, hp.grad_clip_norm)
        mom = hp.muon_momentum if priming else muon_momentum(hp, self.step)  # nor warm the momentum up
        for opt in self.opts:
            for g in opt.param_groups:
                g["lr"] = g["base_lr"] * lr_mult
                if isinstance(opt, Muon):
                    g["momentum"] = mom
            opt.step()
        for p in self.params:  # also the frozen role's grads (no stale norm in the next clip), unless kept
            if all(p is not k for k in self.kept):
                p.grad = None
        if self.ema is not None:  # state_dict() holds detached tensors: no autograd here
            cur, ema = [v.float() for v in self.model.state_dict().values()], list(self.ema.values())
            torch._foreach_mul_(ema, hp.ema_decay)
            torch._foreach_add_(ema, cur, alpha=1 - hp.ema_decay)
        if self.rt.world > 1:  # the stop votes ride along: agreed without a collective of their own
            dist.all_reduce(total)
            total /= self.rt.world
        self.votes += total[1]
        self.bad_step = torch.where((self.bad_step < 0) & ~torch.isfinite(total[0]), self.step, self.bad_step)
        self.step += 1
        return total[0]

    def check_finite(self) -> None:
        if (bad := int(self.bad_step)) >= 0:
            raise UserError(f"training loss became non-finite at step {bad + 1}; the last checkpoint (if any) "
                            "is intact - lower the learning rates or resume from it")

    def prime(self) -> None:
        """Untimed priming steps as published (full LR, no clip); then their state is undone, kept grads aside."""
        if self.hp.prime_steps == 0 or self.hp.iterations == 0:
            return
        saved = {k: v for k, v in self.state().items() if k != "kept_grads"}
        self.rt.log(f"prime: steps:{self.hp.prime_steps} compiling:{int(self.rt.compile)} (up to a minute when cold)")
        t0 = time.perf_counter()
        for _ in range(self.hp.prime_steps):
            self.train_step(1.0, priming=True)
        self.load_state(saved)
        self.bad_step.fill_(-1)
        self.rt.log(f"prime_steps:{self.hp.prime_steps} prime_time:{(time.perf_counter() - t0):.1f}s (state restored)")

    def apply_ema(self) -> None:
        """Swap the EMA weights in, each cast to its tensor's training dtype (COMPAT_PR644's tok_emb stays bf16)."""
        dtypes = {k: v.dtype for k, v in self.model.state_dict().items()}
        load_weights(self.model, {k: v.to(dtypes[k]) for k, v in self.ema.items()}, "EMA weights")

    def save_checkpoint(self) -> Path:
        self.check_finite()  # never write a checkpoint of diverged weights
        d = self.ckpt_dir
        final = d / f"ckpt_{self.step:07d}.pt"
        if self.rt.rank == 0:
            d.mkdir(parents=True, exist_ok=True)
            atomic_save(self.state(), final)
            older = [p for p in sorted(d.glob("ckpt_*.pt")) if p.name < final.name][:-1]  # keep final and one more
            for old in older + list(d.glob(".ckpt_*.tmp")):  # and clear leftovers of a kill
                old.unlink(missing_ok=True)
            self.rt.log(f"checkpoint:{final} step:{self.step}")
        return final

    def resume(self) -> None:
        d, now, bad = self.ckpt_dir, self.hp.model_signature(True), []
        for path in sorted(d.glob("ckpt_*.pt"), reverse=True):
            try:
                st = torch.load(path, map_location="cpu", weights_only=True)  # RNG states must stay on the CPU
                theirs = json.loads(st["signature"])  # none: not a checkpoint of this script
                if theirs != now:
                    diff = ", ".join(f"{k.upper()}={theirs.get(k)} in checkpoint vs {now[k]} now" for k in now
                                     if theirs.get(k) != now[k])
                    raise UserError(f"cannot resume from {path}: config differs ({diff}); set the checkpoint's values")
                self.load_state(st)  # broken contents fail here; an older checkpoint then overwrites all it loaded
                self.rt.log(f"resume:{path} step:{self.step}")
                return
            except UserError:  # config differs, or the data position is past the shards: the user's to see
                raise
            except Exception as e:
                bad.append(f"{path.name} ({type(e).__name__})")
                self.rt.log(f"checkpoint:{path} unreadable ({type(e).__name__}), trying an older one")
        if bad:  # never a silent restart over checkpoints that exist
            raise UserError(f"RESUME=1: no checkpoint in {d} is readable: {', '.join(bad)}; move them away to start "
                            "from step 0")
        if (self.rt.run_dir / "final_model.int6.ptz").exists():  # a finished run: never retrain over its outputs
            raise UserError(f"RESUME=1: {self.rt.run_dir} holds a finished run and {d} no checkpoint to continue from")
        self.rt.log(f"resume: no valid checkpoint in {d}, starting from step 0")

    def stop_agreed(self, now: bool = False) -> bool:
        """Stop after this step? One process: once signalled. Several: once the votes summed in the loss's all-reduce
        say so, read (a host sync) every 4 steps on all ranks alike: ~3 s at 0.8 s/step, in torchrun's 30 s grace."""
        if self.rt.world == 1 or (now and STOP.signum):  # at the loop's end a rank's own signal suffices too
            return STOP.signum > 0
        return (now or self.step % 4 == 0) and self.votes.item() > 0

    def run(self, evaluate) -> None:
        """Train to ITERATIONS (or the wall-clock cap); validation and checkpoint time is not counted."""
        hp, rt = self.hp, self.rt
        STOP.phase = "training"
        t_mark, last = time.perf_counter(), (self.step, self.train_ms)
        now_ms = lambda: self.train_ms + (time.perf_counter() - t_mark) * 1000
        cap_ms = hp.max_wallclock_seconds * 1000 or math.inf
        while True:
            elapsed = now_ms()
            if rt.world > 1 and cap_ms < math.inf:  # rank 0's clock for all: same stop step, same LR
                box = torch.tensor([elapsed], dtype=torch.float64, device=rt.device)
                dist.broadcast(box, 0)
                elapsed = float(box.item())
            done = self.step >= hp.iterations or elapsed >= cap_ms
            if (hp.val_loss_every and self.step % hp.val_loss_every == 0) or (done and self.step > 0):
                if rt.device.type == "cuda":
                    torch.cuda.synchronize()
                self.train_ms = now_ms()
                vloss, vbpb = evaluate(self.model)
                rt.log(f"step:{self.step}/{hp.iterations} val_loss:{vloss:.4f} val_bpb:{vbpb:.4f} "
                       f"train_time:{self.train_ms:.0f}ms step_avg:{self.train_ms / max(self.step, 1):.2f}ms")
                t_mark = time.perf_counter()
            if done:
                break
            loss = self.train_step(lr_multiplier(hp, self.step, elapsed, elapsed / max(self.step, 1)))
            if self.step % hp.train_log_every == 0 or self.step == hp.iterations:
                self.check_finite()
                lv, now = loss.item(), now_ms()
                rate = (self.step - last[0]) * hp.train_batch_tokens / max(now - last[1], 1e-9) * 1000
                avg = now / self.step
                eta = min((hp.iterations - self.step) * avg, cap_ms - now) / 1000  # the steps left, or the cap
                rt.log(f"step:{self.step}/{hp.iterations} train_loss:{lv:.4f} train_time:{now:.0f}ms "
                       f"step_avg:{avg:.2f}ms tok_s:{rate:.0f} eta:{max(eta, 0):.0f}s")
                last = (self.step, now)
                if self.step == hp.train_log_every:  # with a wall-clock cap the number of steps is known now
                    warn_short_ema(hp, rt, avg)
            if self.stop_agreed():
                break
            if hp.checkpoint_every and self.step % hp.checkpoint_every == 0:
                self.train_ms = now_ms()
                self.save_checkpoint()
                t_mark = time.perf_counter()
        self.check_finite()
        if self.stop_agreed(now=True):  # after this step, or signalled during the last validation
            self.train_ms = now_ms()  # no barrier: torchrun gives rank 0 its 30 s grace to write the checkpoint
            signum = STOP.signum or signal.SIGTERM  # a rank may stop on another rank's signal
            raise Stopped(signum, f"stopped: {signal.Signals(signum).name} at step {self.step}/{hp.iterations}; "
                                  f"checkpoint {self.save_checkpoint()}; continue with RESUME=1")


def atomic_save(obj, path: Path) -> None:
    """Bytes or torch.save to a temporary file, fsync, rename: the final name never holds a partial file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(obj) if isinstance(obj, bytes) else torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except Exception as e:  # e.g. a full disk (torch.save says only "unexpected pos"): no partial file left behind
        tmp.unlink(missing_ok=True)
        raise UserError(f"cannot write {path} ({(str(e).splitlines() or [''])[0][:160]}; "
                        f"{shutil.disk_usage(path.parent).free // 2**20} MiB free there)") from None


# ---- Quantization and the artifact (format int6_clean_per_row_v1) ----------------------------
# Why: the challenge counts code + compressed weights against 16,000,000 bytes. The layout is the
# seed's, so its files and ours are interchangeable; reading never unpickles code.

QUANT_FORMAT = "int6_clean_per_row_v1"
KEEP_FLOAT_MAX_NUMEL = 65_536
FP32_KEEP_PATTERNS = ("attn_scale", "mlp_scale", "resid_mix", "q_gain", "skip_weight", "smear_gate", "bigram",
                      "skip_gates", "ve_shared", "ve_layer_scales")  # substrings of the names kept in float32
CLIP_QUANTILES = (0.990, 0.993, 0.995, 0.997, 0.998, 0.999, 0.9993, 0.9995, 0.9997, 0.9999,
                  0.99993, 0.99995, 0.99997, 0.99999, 1.0)
FLOAT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ZSTD_LEVEL = 22  # the seed's level: sets the window; ZSTD_CANDIDATES = (strategy, min_match) tried
ZSTD_CANDIDATES = ((7, 3), (9, 5), (9, 4), (8, 4))  # btultra / btultra2 / btopt with chain and hash log 16


def quantize_matrix(w: Tensor) -> tuple[Tensor, Tensor, int]:
    """GPTQ-lite: per-row clip at one of 15 |w| quantiles (per tensor, least squared error, first wins ties), scale =
    max(clip/31, 1/31), q in [-32, 31]; returns int8 q, fp16 scales, rows on the 1/31 floor. Rows with max |w| < 1 are
    on the floor for every candidate, so ranking uses the others; near-ties: settled on all rows, as the seed does."""
    t = w.detach().float()
    amax = t.abs().amax(dim=1)
    big = amax >= 1.0
    clips = amax.repeat(len(CLIP_QUANTILES), 1)
    if big.any():
        qs = torch.tensor(CLIP_QUANTILES[:-1], dtype=torch.float32, device=t.device)
        clips[:-1, big] = torch.quantile(t[big].abs(), qs, dim=1)
    scales = (clips / 31.0).clamp_min(1.0 / 31.0)
    quant = lambda x, s: torch.clamp(torch.round(x / s[:, None]), -32, 31)
    full_err = lambda i: float((t - quant(t, scales[i]) * scales[i][:, None]).square().mean())
    cands = [i for i in range(len(scales)) if not any(torch.equal(scales[i], scales[j]) for j in range(i))]
    tb, small = t[big], t[~big]
    errs = {i: float((tb - quant(tb, scales[i][big]) * scales[i][big][:, None]).double().square().sum()) for i in cands}
    best = min(cands, key=lambda i: (errs[i], i))
    floor_err = float((small - quant(small, scales[0][~big]) * scales[0][~big][:, None]).double().square().sum())
    close = [i for i in cands if errs[i] <= errs[best] + 1e-5 * (floor_err + errs[best])]
    if len(close) > 1:
        best = min(close, key=lambda i: (full_err(i), i))
    return quant(t, scales[best]).to(torch.int8), scales[best].to(torch.float16), int((clips[best] < 1.0).sum())


def is_int6(name: str, t: Tensor, quant_embed: bool) -> bool:
    """Large 2-D float tensors are stored as int6 rows; everything else stays as it is or in float."""
    big = t.is_floating_point() and t.ndim == 2 and t.numel() > KEEP_FLOAT_MAX_NUMEL
    return big and (quant_embed or name != "tok_emb.weight")


# GPTQ (QUANT_METHOD=gptq): the same grid, better codes. Columns are rounded one at a time (largest Hessian diagonal
# first), each one's error pushed onto the columns not yet rounded, weighted by the layer's input Hessian H = sum x x^T
# from training tokens. The tied tok_emb uses the head's input; tables only looked up (BigramHash, VE): nearest.
def calibration_batches(hp: Hyperparameters, rt: Runtime, train_files: list[str]) -> list[tuple[Tensor, Tensor]]:
    """GPTQ_CALIB_SEQS windows from the start of the training stream (never validation), rank r taking r, r+W, ..."""
    T, n, m = hp.train_seq_len, hp.gptq_calib_seqs, hp.micro_batch_seqs
    span = torch.from_numpy(TokenStream(train_files).take(n * T + 1).astype(np.int64)).to(rt.device)
    x, y = span[:-1].view(n, T)[rt.rank::rt.world], span[1:].view(n, T)[rt.rank::rt.world]
    return [(x[i:i + m], y[i:i + m]) for i in range(0, len(x), m)]


@torch.no_grad()
def collect_hessians(model: GPT, batches, rt: Runtime) -> dict[str, Tensor]:
    """Input Hessian of every nn.Linear and of the tied head (tok_emb.weight), keyed by the weight's name, over this
    rank's batches in fp64, summed over the ranks; forward hooks on the model's one forward, under its autocast."""
    last = model.blocks[-1]  # the head reads rms(last block's output), as GPT.forward computes it
    names = {m: n + ".weight" for n, m in model.named_modules() if isinstance(m, nn.Linear)} | {last: "tok_emb.weight"}
    dims = {k: model.hp.model_dim if m is last else m.in_features for m, k in names.items()}
    H = {k: torch.zeros(d, d, dtype=torch.float64, device=rt.device) for k, d in dims.items()}
    seen = {}  # c_q, c_k and c_v read the same input: its product is computed once

    def add(mod: nn.Module, inp: tuple, out: Tensor) -> None:  # each batch's x^T x in fp32, the sum in fp64
        x = rms(out) if mod is last else inp[0]
        if seen.get("x") is not x:
            flat = x.reshape(-1, x.size(-1)).float()
            seen.update(x=x, xtx=(flat.T @ flat).double())
        H[names[mod]] += seen["xtx"]
    hooks = [m.register_forward_hook(add) for m in names]
    for x, y in batches:
        with rt.autocast(), torch.compiler.set_stance("force_eager"):  # the hooks run in compiled blocks' modules
            model(x, y)
    for h in hooks:
        h.remove()
    for name in sorted(H) if rt.world > 1 else ():
        dist.all_reduce(H[name])
    return H


def gptq_codes(w: Tensor, scales: Tensor, H: Tensor, damp: float, block: int = 128) -> tuple[Tensor, float]:
    """int6 codes (float) of w on the per-row grid `scales` by GPTQ (act-order, unseen inputs to nearest, lazy block
    updates) and the damp used: `damp`, or 10^k times it where H + damp * mean(diag H) * I has no Cholesky factor."""
    W, s, H = w.detach().float().clone(), scales.float()[:, None], H.double().clone()
    H.diagonal()[H.diagonal() == 0] = 1.0
    perm = torch.argsort(H.diagonal(), descending=True, stable=True)
    W, H = W[:, perm], H[perm][:, perm]
    D = H.diagonal().mean() * torch.eye(len(H), dtype=H.dtype, device=H.device)
    for damp in (damp * 10 ** k for k in range(12)):  # no Cholesky factor (few calibration tokens): 10x more, again
        L, bad = torch.linalg.cholesky_ex(H + damp * D)
        U, worse = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
        if not (bad or worse):
            break
    U = U.float()
    Q = torch.zeros_like(W)
    for a in range(0, W.size(1), block):
        b = min(a + block, W.size(1))
        Wb, Eb = W[:, a:b].clone(), torch.zeros_like(W[:, a:b])
        for i in range(b - a):
            Q[:, a + i] = torch.clamp(torch.round(Wb[:, i:i + 1] / s), -32, 31)[:, 0]
            Eb[:, i] = (Wb[:, i] - Q[:, a + i] * s[:, 0]) / U[a + i, a + i]
            Wb[:, i:] -= Eb[:, i:i + 1] * U[a + i, a + i:b][None, :]
        W[:, b:] -= Eb @ U[a:b, b:]
    return Q[:, torch.argsort(perm)], damp


def round_codes(name: str, w: Tensor, near: Tensor, scales: Tensor, gptq: dict | None, herr: dict) -> Tensor:
    """Codes of w on its row scales: GPTQ's (on the Hessian's device) where `gptq` holds `name`'s Hessian, else `near`;
    herr[name] = (tr(dW H dW^T) of both: the squared output error summed over the calibration inputs, GPTQ's damp)."""
    if gptq is None or name not in gptq["H"]:
        return near
    H = gptq["H"][name]
    w, s = w.to(H.device).double(), scales.to(H.device).double()[:, None]
    q, damp = gptq_codes(w, s[:, 0], H, gptq["damp"])
    err = [float(((w - c * s) @ H * (w - c * s)).sum()) for c in (q.double(), near.to(H.device).double())]
    herr[name] = (*err, damp)
    return q.cpu()


def quantize_state_dict(sd: dict[str, Tensor], quant_embed: bool = True, gptq: dict | None = None) -> tuple[dict, dict]:
    """gptq: {"H": {weight name: input Hessian}, "damp": GPTQ_DAMP} for QUANT_METHOD=gptq, else None."""
    obj = {"__quant_format__": QUANT_FORMAT, "quantized": {}, "scales": {}, "dtypes": {}, "passthrough": {},
           "qmeta": {}, "passthrough_orig_dtypes": {}}
    stats = {"rows": 0, "floor_rows": 0, "herr": {}}
    for name, t in sd.items():
        t = t.detach().cpu()
        if not t.is_floating_point():
            obj["passthrough"][name] = t
        elif not is_int6(name, t, quant_embed):
            if any(p in name for p in FP32_KEEP_PATTERNS):
                obj["passthrough"][name] = t.float().contiguous()
            else:
                obj["passthrough"][name] = t.half().contiguous()
                obj["passthrough_orig_dtypes"][name] = str(t.dtype).removeprefix("torch.")
        else:
            q, s, floor = quantize_matrix(t)
            q = round_codes(name, t, q, s, gptq, stats["herr"])
            obj["quantized"][name], obj["scales"][name] = q.to(torch.int8), s
            obj["dtypes"][name] = str(t.dtype).removeprefix("torch.")
            obj["qmeta"][name] = {"scheme": "per_row", "axis": 0}
            stats["rows"] += t.size(0)
            stats["floor_rows"] += floor
    return obj, stats


def dequantize_state_dict(obj: dict) -> dict[str, Tensor]:
    out = {name: (q.float() * obj["scales"][name].float().view(-1, 1)).to(FLOAT_DTYPES[obj["dtypes"][name]])
           for name, q in obj["quantized"].items()}
    orig = obj.get("passthrough_orig_dtypes", {})
    return out | {n: t.to(FLOAT_DTYPES[orig[n]]) if n in orig else t for n, t in obj["passthrough"].items()}


def serialize_artifact(obj: dict) -> bytes:
    """torch.save + one zstd frame. Level 22's optimal parser spends ~40 s on short matches that cost more than the
    int6 literals they replace; shallow searches with longer matches are ~25x faster and smaller: the smallest wins."""
    import zstandard
    buf = io.BytesIO()
    torch.save(obj, buf)
    raw = buf.getvalue()
    wlog = zstandard.ZstdCompressionParameters.from_level(ZSTD_LEVEL, source_size=len(raw)).window_log
    outs = [zstandard.ZstdCompressor(compression_params=zstandard.ZstdCompressionParameters(
        window_log=wlog, chain_log=16, hash_log=16, search_log=1, min_match=mm, target_length=999, strategy=st,
        write_content_size=True)).compress(raw) for st, mm in ZSTD_CANDIDATES]
    return min(outs, key=len)


# Rate-targeted quantization (QUANT_TARGET_BYTES): spend the bytes under the cap where the loss is most sensitive. Each
# tensor gets one int6 step (in units of its RMS) or stays fp16 (passthrough, step 0.0), by a Lagrangian trade of the
# predicted loss 0.5*sum(F*err^2) (F: diagonal Fisher) against bytes. Steps above 1x RMS: the prediction fails there.
RATE_STEPS = (0.0,) + tuple(2.0 ** (k / 4) for k in range(-20, 1))


def sensitivity_from_batches(model: GPT, batches, rt: Runtime | None = None) -> dict[str, Tensor]:
    """Diagonal empirical Fisher: squared gradient of each batch's mean loss times its token count, averaged."""
    acc = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in model.named_parameters()}
    for x, y in batches:
        model.zero_grad(set_to_none=True)
        with rt.autocast() if rt else contextlib.nullcontext():
            loss = model(x, y).mean()
        loss.backward()
        for n, p in model.named_parameters():
            if p.grad is not None:
                acc[n] += p.grad.float().square() * y.numel()
    model.zero_grad(set_to_none=True)
    return {n: v / max(len(batches), 1) for n, v in acc.items()}


def huffman_bytes(symbols: Tensor) -> float:
    """zstd's size for a stream of small non-negative symbols from their histogram: Huffman-coded literals
    (within ~0.5% of zstd from 1.3 bits per symbol up; below, matches beat Huffman's 1-bit floor, ~1.35x)."""
    c = [x for x in torch.bincount(symbols.flatten().long()).tolist() if x]
    heap, bits, n = list(c), 0, sum(c)
    heapq.heapify(heap)
    while len(heap) > 1:  # the sum of merged counts = sum of count * code length
        a = heapq.heappop(heap) + heapq.heappop(heap)
        bits += a
        heapq.heappush(heap, a)
    return min(bits, 1.35 * -sum(x * math.log2(x / n) for x in c)) / 8


def rate_grid(w: Tensor, step) -> tuple[Tensor, Tensor]:
    """int6 codes and fp16 row scales for step (a number or one per row) x the tensor's RMS, each row's scale
    raised to max|row|/31 so nothing clips (one step for all rows: equal error per byte everywhere)."""
    s = torch.maximum(step * w.square().mean().sqrt(), w.abs().amax(1) / 31).clamp_min(1e-7).half()
    return torch.clamp(torch.round(w / s.float()[:, None]), -32, 31), s


def quantize_to_budget(sd: dict[str, Tensor], budget: int, sens: dict[str, Tensor] | None, quant_embed: bool,
                       log=print, gptq: dict | None = None) -> tuple[dict, dict]:
    """The artifact object of least predicted loss whose compressed size is <= budget (within ~1%). Each tensor takes
    the step minimising D + lam*bytes (bytes from code histograms, lam bisected), one tensor moves some rows one step
    finer; the real compressor corrects the estimate (at most 5 tries). With gptq, GPTQ picks the codes on each grid."""
    t0 = time.perf_counter()
    big = [k for k, t in sd.items() if is_int6(k, t, quant_embed)]
    W = {k: sd[k].detach().cpu().float() for k in big}
    D, R = (torch.zeros(len(big), len(RATE_STEPS), dtype=torch.float64) for _ in range(2))
    for i, k in enumerate(big):
        f = sens[k].cpu().float() if sens is not None else 1.0
        h = W[k].half()
        D[i, 0], R[i, 0] = 0.5 * float((f * (h.float() - W[k]).square()).sum()), huffman_bytes(h.view(torch.uint8))
        for j, step in enumerate(RATE_STEPS[1:], 1):
            q, s = rate_grid(W[k], step)
            D[i, j], R[i, j] = 0.5 * float((f * (W[k] - q * s.float()[:, None]).square()).sum()), huffman_bytes(q + 32)

    def solve(target: float) -> tuple[Tensor, Tensor]:  # step index per tensor, fraction of rows one finer
        lo, hi = -40.0, 40.0
        for _ in range(80):
            mid = (lo + hi) / 2
            lo, hi = (lo, mid) if R.gather(1, (D + 10 ** mid * R).argmin(1)[:, None]).sum() <= target else (mid, hi)
        pick, frac = (D + 10 ** hi * R).argmin(1), torch.zeros(len(big), dtype=torch.float64)
        slack, stuck = target - float(R.gather(1, pick[:, None]).sum()), torch.zeros(len(big), dtype=torch.bool)
        while True:  # greedy: the best loss-per-byte move one step finer; the last one partial (fp16: all rows)
            up = torch.arange(len(big))[(pick > 0) & ~stuck]
            dD, dR = D[up, pick[up]] - D[up, pick[up] - 1], R[up, pick[up] - 1] - R[up, pick[up]]
            if not (dD > 0).any():
                return pick, frac
            b = int(torch.where(dD > 0, dD / dR.clamp_min(1e-9), -1.0).argmax())
            i = int(up[b])
            if dR[b] <= slack:
                pick[i], slack = pick[i] - 1, slack - float(dR[b])
            elif pick[i] == 1:
                stuck[i] = True
            else:
                frac[i] = max(slack, 0.0) / float(dR[b])
                return pick, frac

    def cost(M: Tensor, pick: Tensor, frac: Tensor) -> Tensor:  # per tensor, interpolated over its rows
        cur, fine = M.gather(1, pick[:, None])[:, 0], M.gather(1, (pick - 1).clamp_min(0)[:, None])[:, 0]
        return cur + frac * (fine - cur)

    codes: dict[tuple, tuple] = {}  # (name, step index, finer rows) -> (codes, Hessian-weighted errors)
    herr: dict[str, tuple] = {}

    def build(pick: Tensor, frac: Tensor) -> dict:
        obj, _ = quantize_state_dict({k: t for k, t in sd.items() if k not in big}, quant_embed)
        herr.clear()
        for i, k in enumerate(big):
            dtype = str(sd[k].dtype).removeprefix("torch.")
            if pick[i] == 0:  # kept in fp16, as the seed keeps tok_emb with QUANT_EMBED=0
                obj["passthrough"][k], obj["passthrough_orig_dtypes"][k] = sd[k].detach().cpu().half(), dtype
                continue
            fine, steps = round(float(frac[i]) * W[k].size(0)), torch.full((W[k].size(0),), RATE_STEPS[pick[i]])
            steps[:fine] = RATE_STEPS[max(int(pick[i]) - 1, 0)]
            q, obj["scales"][k] = rate_grid(W[k], steps)
            if (k, int(pick[i]), fine) not in codes:
                err: dict[str, tuple] = {}
                codes[k, int(pick[i]), fine] = round_codes(k, W[k], q, obj["scales"][k], gptq, err), err
            q, err = codes[k, int(pick[i]), fine]
            herr.update(err)
            obj["quantized"][k], obj["dtypes"][k] = q.to(torch.int8), dtype
            obj["qmeta"][k] = {"scheme": "per_row", "axis": 0}
        return obj

    fixed, best, tries = 0, None, []  # scales, passthrough and pickle: compressed for real
    for _ in range(2):
        pick, frac = solve(budget * 0.985 - fixed)
        fixed = len(serialize_artifact({**build(pick, frac), "quantized": {}}))
    target, goal = budget * 0.985 - fixed, budget * 0.995
    for call in range(5):
        pick, frac = solve(target)
        blob = serialize_artifact(build(pick, frac))
        if len(blob) <= budget and (best is None or len(blob) > len(best[2])):
            best = (pick, frac, blob)
        est = float(cost(R, pick, frac).sum())  # estimated bytes of the big tensors
        if budget * 0.99 <= len(blob) <= budget or (est, len(blob)) in tries:  # in the band, or nothing left to buy
            break
        tries.append((est, len(blob)))
        below, above = [t for t in tries if t[1] < goal], [t for t in tries if t[1] > goal]
        lo, hi = (max(below, key=lambda t: t[1]), min(above, key=lambda t: t[1])) if below and above else tries[-1:] * 2
        target = lo[0] + (goal - lo[1]) * ((hi[0] - lo[0]) / (hi[1] - lo[1]) if hi[0] > lo[0] else 1.0)
    if best is None:
        raise UserError(f"QUANT_TARGET_BYTES: even the coarsest grids need {len(blob)} model bytes > {budget}")
    pick, frac, blob = best
    kinds: dict[str, list] = {}
    for i, (k, b, d) in enumerate(zip(big, cost(R, pick, frac).tolist(), cost(D, pick, frac).tolist())):
        kd = kinds.setdefault(k.split(".", 2)[-1] if k.startswith("blocks.") else k, [0, 0.0, 0.0, set()])
        kd[0], kd[1], kd[2] = kd[0] + W[k].numel(), kd[1] + b, kd[2] + d
        kd[3].add(f"{RATE_STEPS[pick[i]]:.3g}" if pick[i] else "fp16")
    for kind, (n, b, d, steps) in kinds.items():
        log(f"quant_rate kind:{kind} step/rms:{','.join(sorted(steps))} bits/weight:{8 * b / n:.3f} bytes:{b:.0f} "
            f"predicted_dloss:{d:.6f}")
    predicted = float(cost(D, pick, frac).sum())
    log(f"quant_rate bytes:{len(blob)} budget:{budget} compressor_calls:{call + 1} predicted_dloss:{predicted:.6f} "
        f"time:{time.perf_counter() - t0:.1f}s")
    rows = sum(W[k].size(0) for i, k in enumerate(big) if pick[i])
    return build(pick, frac), {"rows": rows, "floor_rows": 0, "bytes": len(blob), "blob": blob, "herr": herr,
                               "predicted_dloss": predicted, "compressor_calls": call + 1}


def read_artifact(path: str, max_bytes: int = 1 << 30) -> dict:
    """Decompress and load an artifact without executing pickled code; any defect -> UserError."""
    import zstandard
    bad = lambda why: UserError(f"artifact {path}: {why}")
    try:
        blob = Path(path).read_bytes()
    except OSError as e:
        raise bad(f"cannot read ({e.strerror})") from None
    try:
        params = zstandard.get_frame_parameters(blob)
        if params.content_size != zstandard.CONTENTSIZE_UNKNOWN and params.content_size > max_bytes:  # CLI: unknown
            raise bad(f"declares {params.content_size} decompressed bytes (limit {max_bytes})")
        raw = zstandard.ZstdDecompressor().decompress(blob, max_output_size=max_bytes)
    except zstandard.ZstdError as e:
        raise bad(f"not a valid zstd stream ({e}); truncated, or not an artifact "
                  "(that is final_model.int6.ptz)?") from None
    try:
        obj = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except Exception as e:
        raise bad(f"refused to load ({type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]})") from None
    if not isinstance(obj, dict) or obj.get("__quant_format__") != QUANT_FORMAT:
        fmt = obj.get("__quant_format__") if isinstance(obj, dict) else type(obj).__name__
        raise bad(f"format {fmt!r}, expected {QUANT_FORMAT!r}")
    obj.setdefault("passthrough_orig_dtypes", {})
    for key in ("quantized", "scales", "dtypes", "passthrough", "passthrough_orig_dtypes"):
        if not isinstance(obj.get(key), dict):
            raise bad(f"section {key!r} missing or not a mapping")
    ok = lambda name, t, dtypes=FLOAT_DTYPES.values(): isinstance(name, str) and isinstance(t, Tensor) \
        and t.dtype in dtypes and t.layout == torch.strided and t.device.type == "cpu"  # dense, in memory
    for name, q in obj["quantized"].items():
        s = obj["scales"].get(name)
        if not (ok(name, q, (torch.int8,)) and q.ndim == 2 and ok(name, s)
                and s.numel() == q.size(0) and obj["dtypes"].get(name) in FLOAT_DTYPES):
            raise bad(f"tensor {name} is malformed")
    for name, t in obj["passthrough"].items():
        if not ok(name, t) or obj["passthrough_orig_dtypes"].get(name, "float32") not in FLOAT_DTYPES:
            raise bad(f"passthrough {name} is malformed")
    return obj


def load_weights(model: GPT, sd: dict[str, Tensor], source: str) -> None:
    """Load a full state dict; on any mismatch list the differing names and shapes."""
    want, have = ({k: tuple(v.shape) for k, v in d.items()} for d in (model.state_dict(), sd))
    if want != have:
        diff = [f"{k}: file {have.get(k, 'missing')} vs model {want.get(k, 'absent')}"
                for k in sorted(set(want) | set(have)) if want.get(k) != have.get(k)]
        raise UserError(f"{source} does not match the configured architecture ({len(diff)} tensors differ: "
                        + "; ".join(diff[:8]) + ("; ..." if len(diff) > 8 else "") + ")")
    with torch.no_grad():  # tok_emb keeps the file's float32 or bf16 (the seed's is bf16: its TTT updates it in bf16);
        for k, v in model.state_dict(keep_vars=True).items():  # the rest take the model's (a bf16 matmul fails in fp32)
            if v.dtype == sd[k].dtype or k != "tok_emb.weight" or sd[k].dtype == torch.float16:
                v.copy_(sd[k])
            else:
                v.data = sd[k].to(v.device)


# ---- Evaluation and test-time training -------------------------------------------------------
# Why: every validation target is scored exactly once, windows indexed in one tensor (no copies),
# the head only where scored; TTT scores a chunk before it trains on it: no gradient sees it unscored.


def plan_windows(n_tokens: int, seq_len: int, stride: int) -> tuple[Tensor, Tensor]:
    """Window starts and each one's first scored position. Standard (stride 0 or >= seq_len): disjoint windows, the
    partial tail dropped. Sliding: a start every `stride`, each scoring its last `stride` targets (the first: all)."""
    n_targets = n_tokens - 1
    if stride == 0 or stride >= seq_len:
        starts = torch.arange(n_targets // seq_len) * seq_len
        return starts, torch.zeros_like(starts)
    last = max(n_targets - seq_len + stride - 1, 0)  # the last start whose scored span begins before the end
    starts = torch.arange(0, last + 1, stride)
    return starts, torch.where(starts > 0, seq_len - stride, 0)  # the first window (start 0) scores all


def rank_share(lo: int, hi: int, rt: Runtime) -> tuple[int, int]:
    return lo + (hi - lo) * rt.rank // rt.world, lo + (hi - lo) * (rt.rank + 1) // rt.world


@torch.no_grad()
def score_windows(hp: Hyperparameters, rt: Runtime, padded: Tensor, n_targets: int, starts: Tensor, offs: Tensor,
                  meter: BpbMeter, label: str = "") -> None:
    """Score windows (CPU index tensors) in fixed-size batches; padded = tokens + seq_len+1 zeros, on device.
    A label adds progress lines for this rank's batches (no collectives: ranks' shares may differ)."""
    T, B, t0 = hp.train_seq_len, hp.eval_batch_seqs, time.perf_counter()
    n_b = -(-len(starts) // B)  # batches, the last one padded: static shapes
    ar, pad = torch.arange(T + 1, device=rt.device), n_b * B - len(starts)
    st_all, of_all = F.pad(starts, (0, pad)).to(rt.device), F.pad(offs, (0, pad), value=T).to(rt.device)
    for done, i in enumerate(range(0, len(starts), B), 1):
        st, of, sf = st_all[i:i + B], of_all[i:i + B], int(offs[i:i + B].min())
        g = padded[st[:, None] + ar]
        x, y = g[:, :-1], g[:, 1:]
        with rt.autocast():
            losses = rt.compiled(x, y, sf)
        j = torch.arange(sf, T, device=rt.device)
        mask = (j >= of[:, None]) & (st[:, None] + j < n_targets)
        meter.add(losses, x[:, sf:], y[:, sf:], mask)
        if label and done % -(-n_b // 20) == 0:  # at most 20 lines
            rate = done / (time.perf_counter() - t0)
            rt.log(f"{label}:{done}/{n_b} batches_per_s:{rate:.2f} eta:{(n_b - done) / rate:.0f}s")


def evaluate(hp: Hyperparameters, rt: Runtime, model: GPT, val: Tensor, tables, stride: int) -> tuple[float, float]:
    """Standard (stride >= seq_len or 0) or sliding evaluation of the current weights."""
    model.eval()
    starts, offs = plan_windows(len(val), hp.train_seq_len, stride)
    lo, hi = rank_share(0, len(starts), rt)
    meter = BpbMeter(tables, rt.device)
    padded = F.pad(val, (0, hp.train_seq_len + 1)).to(rt.device)
    score_windows(hp, rt, padded, len(val) - 1, starts[lo:hi], offs[lo:hi], meter,
                  "sliding_eval_batch" if 0 < stride < hp.train_seq_len else "")
    model.train()
    return meter.result()


def ttt_lr_multiplier(ci: int, n_chunks: int) -> float:
    w = max(n_chunks // 20, 1)
    return (ci + 1) / w if ci < w else 0.5 * (1 + math.cos(math.pi * (ci - w) / max(n_chunks - 1 - w, 1)))


def ttt_evaluate(hp: Hyperparameters, rt: Runtime, model: GPT, val: Tensor, tables) -> tuple[float, float]:
    """Legal score-first TTT: for each chunk of TTT_CHUNK_TOKENS targets (by each window's first scored
    target), score its windows with the current weights, then (unless last) train on its tokens."""
    T, C, n_targets = hp.train_seq_len, hp.ttt_chunk_tokens, len(val) - 1
    starts, offs = plan_windows(len(val), T, hp.eval_stride)
    chunk_of = (starts + offs) // C
    n_chunks = int(chunk_of[-1]) + 1
    bounds = torch.searchsorted(chunk_of, torch.arange(n_chunks + 1)).tolist()
    frozen = [p for b in model.blocks[:hp.ttt_freeze_blocks] for p in b.parameters()]
    trainable = [p for p in model.parameters() if all(p is not q for q in frozen)]
    model.zero_grad(set_to_none=True)  # no gradient left over from training (COMPAT_PR644 keeps one)
    rt.log(f"ttt:start chunks:{n_chunks} windows:{len(starts)} chunk_tokens:{C} stride:{hp.eval_stride} "
           f"lr:{hp.ttt_lr} epochs:{hp.ttt_epochs} freeze_blocks:{hp.ttt_freeze_blocks} "
           f"params_trainable:{sum(p.numel() for p in trainable)} params_frozen:{sum(p.numel() for p in frozen)}")
    opt = torch.optim.SGD(trainable, lr=0.0, momentum=hp.ttt_momentum)
    meter = BpbMeter(tables, rt.device)
    padded = F.pad(val, (0, T + 1)).to(rt.device)
    t0, every = time.perf_counter(), max(1, min(10, n_chunks // 20))
    for ci in range(n_chunks):
        model.eval()
        lo, hi = rank_share(bounds[ci], bounds[ci + 1], rt)
        score_windows(hp, rt, padded, n_targets, starts[lo:hi], offs[lo:hi], meter)
        c0, c1 = ci * C, min((ci + 1) * C, n_targets)
        n_seq = (c1 - c0) // T
        if ci < n_chunks - 1 and hp.ttt_epochs > 0 and n_seq > 0:
            model.train()
            for p in frozen:  # frozen only while training: scoring reuses the plain evaluation's compiled graph
                p.requires_grad_(False)
            opt.param_groups[0]["lr"] = hp.ttt_lr * ttt_lr_multiplier(ci, n_chunks)
            for _ in range(hp.ttt_epochs):
                for b in range(0, n_seq, hp.ttt_batch_seqs):
                    nb = min(hp.ttt_batch_seqs, n_seq - b)
                    s_lo, s_hi = rank_share(b, b + nb, rt)
                    if s_hi > s_lo:  # sequences of T + 1 tokens, each starting where the last one's targets end
                        tok = padded[c0 + s_lo * T:c0 + s_hi * T + 1].unfold(0, T + 1, T)
                        with rt.autocast():
                            loss = rt.compiled(tok[:, :-1], tok[:, 1:]).sum() * (rt.world / (nb * T))
                        loss.backward()
                    all_reduce_grads(trainable, rt.world)
                    if hp.ttt_grad_clip > 0:
                        torch.nn.utils.clip_grad_norm_(trainable, hp.ttt_grad_clip)
                    opt.step()
                    opt.zero_grad(set_to_none=True)
            for p in frozen:
                p.requires_grad_(True)
        if (ci + 1) % every == 0 or ci == n_chunks - 1:
            _, bpb = meter.result()
            rate = (ci + 1) / (time.perf_counter() - t0)
            rt.log(f"ttt_chunk:{ci + 1}/{n_chunks} running_val_bpb:{bpb:.6f} chunks_per_s:{rate:.2f} "
                   f"eta:{(n_chunks - ci - 1) / rate:.0f}s")
    model.train()
    return meter.result()


# ---- Main ------------------------------------------------------------------------------------
# Why: one flow for dry run, training and eval-only: the final score always comes from the artifact read back from disk.


def setup_runtime(hp: Hyperparameters) -> Runtime:
    env = [os.environ.get(k, d) for k, d in (("WORLD_SIZE", "1"), ("RANK", "0"), ("LOCAL_RANK", "0"))]
    if not all(v.isdecimal() for v in env) or int(env[1]) >= int(env[0]):
        raise UserError(f"WORLD_SIZE={env[0]} RANK={env[1]} LOCAL_RANK={env[2]}: need whole numbers, RANK < WORLD_SIZE")
    world, rank, local = map(int, env)
    kind = hp.device if hp.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if kind == "cuda" and not torch.cuda.is_available():
        raise UserError("DEVICE=cuda but no CUDA device is visible")
    device = torch.device("cuda", local) if kind == "cuda" else torch.device("cpu")
    if kind == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if world > 1 and not hp.dry_run and not dist.is_initialized():  # DRY_RUN=1 WORLD_SIZE=N: N's checks, one process
        if "MASTER_ADDR" not in os.environ:  # a WORLD_SIZE left in the environment, not torchrun
            raise UserError(f"WORLD_SIZE={world} without torchrun: use torchrun --nproc_per_node={world} train_gpt.py")
        dist.init_process_group("nccl" if kind == "cuda" else "gloo", device_id=device if kind == "cuda" else None)
    use_compile = hp.compile in ("1", "graph") or (hp.compile == "auto" and kind == "cuda")
    use_bf16 = hp.autocast == "bf16" or (hp.autocast == "auto" and kind == "cuda")
    return Runtime(rank=rank, world=world, device=device, compile=use_compile, bf16=use_bf16, sdpa=hp.sdpa_backend)


def open_run_dir(hp: Hyperparameters, rt: Runtime) -> Hyperparameters:
    """RUNS_DIR/RUN_ID, created fresh (or reused by RESUME=1); one RUN_ID shared by all ranks."""
    run_id = hp.run_id or f"{time.strftime('%Y%m%d_%H%M%S')}_{os.urandom(3).hex()}"
    if rt.world > 1:
        box = [run_id]
        dist.broadcast_object_list(box, src=0)
        run_id = box[0]
    hp = dataclasses.replace(hp, run_id=run_id)
    rt.run_dir = Path(hp.runs_dir) / run_id
    if rt.rank == 0:
        if (rt.run_dir / "train.log").exists() and not hp.resume:
            raise UserError(f"run folder {rt.run_dir} already holds a run; choose another RUN_ID or set RESUME=1")
        rt.run_dir.mkdir(parents=True, exist_ok=True)
        try:  # one process per run folder: the descriptor stays open, so the lock lasts as long as this process
            fcntl.flock(os.open(rt.run_dir, os.O_RDONLY), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:  # held elsewhere: refused; another error: a filesystem without locks, unguarded
            if isinstance(e, BlockingIOError):
                raise UserError(f"run folder {rt.run_dir} is in use: another process is running this run") from None
        rt.log_file = open(rt.run_dir / "train.log", "a", encoding="utf-8")
    return hp


def log_header(hp: Hyperparameters, rt: Runtime) -> None:
    for f in dataclasses.fields(hp):
        rt.log(f"config:{f.name.upper()}={getattr(hp, f.name)}")
    dev = torch.cuda.get_device_name(rt.device) if rt.device.type == "cuda" else platform.machine()
    rt.log(f"versions: python:{platform.python_version()} torch:{torch.__version__} numpy:{np.__version__} "
           f"cuda:{torch.version.cuda} flash_attn3:{'eager_on_hopper' if _fa3 else 'absent'}")
    dt, heads = torch.bfloat16 if rt.bf16 else torch.float32, (hp.num_heads, hp.num_kv_heads)
    q, k = (torch.zeros(1, h, hp.train_seq_len, hp.head_dim, dtype=dt, device=rt.device) for h in heads)
    with rt.autocast():  # the SDPA kernel that this run's attention gets (its device, dtype, shapes), as torch picks
        kernel = SDPBackend(torch._fused_sdp_choice(q, k, k, is_causal=True, enable_gqa=q.size(1) != k.size(1))).name
    rt.log(f"device:{rt.device.type} name:{dev} world_size:{rt.world} cpu_threads:{torch.get_num_threads()} "
           f"autocast:{'bf16' if rt.bf16 else 'off'} attention:{kernel.lower()} sdpa_backend:{rt.sdpa}")


def final_evaluation(hp: Hyperparameters, rt: Runtime, model: GPT, val: Tensor, tables, standard=None) -> dict:
    """The configured final mode on the current (artifact) weights, after their standard score (passed in if known)."""
    sliding = 0 < hp.eval_stride < hp.train_seq_len
    mode = "ttt" if hp.ttt_enabled and sliding else "sliding" if sliding else "standard"
    t0 = time.perf_counter()
    pre_loss, pre_bpb = standard or evaluate(hp, rt, model, val, tables, 0)
    rt.log(f"pre_ttt_eval mode:standard val_loss:{pre_loss:.8f} val_bpb:{pre_bpb:.8f}")
    rt.log(f"final_eval_mode:{mode} stride:{hp.eval_stride} seq_len:{hp.train_seq_len}")
    if mode == "ttt":
        loss, bpb = ttt_evaluate(hp, rt, model, val, tables)
    else:  # sliding, or the standard score already in hand
        loss, bpb = evaluate(hp, rt, model, val, tables, hp.eval_stride) if mode == "sliding" else (pre_loss, pre_bpb)
    secs = time.perf_counter() - t0
    rt.log(f"final_int6_zstd-22_roundtrip val_loss:{loss:.4f} val_bpb:{bpb:.4f} eval:{secs * 1000:.0f}ms")
    rt.log(f"final_int6_zstd-22_roundtrip_exact val_loss:{loss:.8f} val_bpb:{bpb:.8f}")
    return {"val_loss": loss, "val_bpb": bpb, "pre_ttt_val_bpb": pre_bpb, "eval_time_seconds": round(secs, 1)}


def compile_model(hp: Hyperparameters, rt: Runtime, model: GPT) -> None:
    """rt.compiled: by regions (COMPILE=1: embeddings, each kind of block, skip mix, head) or whole (COMPILE=graph)."""
    rt.compiled = model
    if not rt.compile:
        return
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    torch._functorch.config.activation_memory_budget = hp.activation_budget or 1.0  # loaded with torch._dynamo
    cache = Path(hp.compile_cache_dir or Path(hp.runs_dir) / "compile_cache").resolve()
    rt.log(f"compile_cache: dir:{cache} warm:{int(cache.is_dir() and any(cache.iterdir()))}")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache)  # read by inductor when it first compiles
    kw = dict(dynamic=False, fullgraph=True)  # a graph per kind of region and (batch, score_from, grad mode, frozen)
    if hp.compile == "graph":
        rt.compiled = torch.compile(model, **kw)
        return
    for block in model.blocks:
        block.compile(**kw)
    for name in ("embed", "skip_mix", "head"):  # an instance attribute, in front of the method GPT.forward calls
        setattr(model, name, torch.compile(getattr(model, name), **kw))


def run(hp: Hyperparameters, rt: Runtime) -> int:
    torch.manual_seed(hp.seed)  # the only RNG drawn from (the init); data order is fixed
    tables = byte_tables(load_tokenizer(hp), hp.vocab_size)
    val = load_validation(hp)
    train_files = [] if hp.eval_only else shard_files(hp.data_path, "train")
    stream = None if hp.eval_only else TokenStream(train_files)
    split = batch_split(hp, rt.world) if stream else None
    model = GPT(hp).to(rt.device)
    if hp.eval_only:
        load_weights(model, dequantize_state_dict(read_artifact(hp.artifact)), f"artifact {hp.artifact}")
    n_params = sum(p.numel() for p in model.parameters())
    hp = hp if hp.dry_run else open_run_dir(hp, rt)
    log_header(hp, rt)
    rt.log(f"model_params:{n_params}")
    if split:
        micro, accum, pieces = split
        rt.log(f"batch: global_tokens:{hp.train_batch_tokens} micro_batch_seqs:{micro} grad_accum:{accum} "
               f"pieces_per_forward:{pieces} forward_seqs:{pieces * micro} forwards:{accum // pieces}")
        warn_short_ema(hp, rt)
    if hp.dry_run:
        n_train = sum(len(s) for s in stream.shards) if stream else 0
        rt.log(f"data: train_shards:{len(train_files)} train_tokens:{n_train} "
               f"val_tokens:{len(val)} tokenizer:{hp.tokenizer_path}")
        return 0
    compile_model(hp, rt, model)
    code_bytes = os.path.getsize(__file__)
    result = dict(bytes_code=code_bytes, parameters=n_params, seed=hp.seed, training_steps=0, wallclock_seconds=0)
    standard = None
    if hp.eval_only:
        result["bytes_model"] = os.path.getsize(hp.artifact)
        rt.log(f"eval_only artifact:{hp.artifact} bytes:{result['bytes_model']}")
    else:
        trainer = Trainer(hp, rt, model, stream)
        if hp.compat_pr644:
            rt.log("compat_pr644:1 changes:bigram_scale_grad_never_cleared,bf16_initial_values,tok_emb_bf16,"
                   "muon_update_bf16,no_lr_warmup,linear_warmdown,sdpa_flash")
        if hp.resume:
            trainer.resume()
        if trainer.step == 0:
            STOP.phase = "priming"
            trainer.prime()
        trainer.run(lambda m: evaluate(hp, rt, m, val, tables, 0))
        STOP.phase = "quantization"
        result.update(training_steps=trainer.step, wallclock_seconds=round(trainer.train_ms / 1000))
        if rt.device.type == "cuda":
            rt.log(f"peak_memory_allocated:{torch.cuda.max_memory_allocated() // 2**20}MiB "
                   f"reserved:{torch.cuda.max_memory_reserved() // 2**20}MiB")
        if trainer.ema is not None:
            trainer.apply_ema()
            rt.log("ema:applied")
        float_loss, float_bpb = evaluate(hp, rt, model, val, tables, 0)
        rt.log(f"float_eval val_loss:{float_loss:.8f} val_bpb:{float_bpb:.8f}")
        path, gptq = rt.run_dir / "final_model.int6.ptz", None
        if hp.quant_method == "gptq":  # every rank: its share of the calibration windows, Hessians summed
            t0 = time.perf_counter()
            gptq = {"H": collect_hessians(model, calibration_batches(hp, rt, train_files), rt), "damp": hp.gptq_damp}
            rt.log(f"gptq: calib_tokens:{hp.gptq_calib_seqs * hp.train_seq_len} damp:{hp.gptq_damp} "
                   f"time:{time.perf_counter() - t0:.1f}s")
        if rt.rank == 0:
            t0 = time.perf_counter()
            atomic_save(model.state_dict(), rt.run_dir / "final_model.pt")
            if hp.quant_target_bytes:  # sensitivity from the start of the training stream, never validation
                trainer.stream = TokenStream(train_files)
                sens = sensitivity_from_batches(model, [b for _ in range(2) for b in trainer.next_batch()][:4], rt)
                obj, stats = quantize_to_budget(model.state_dict(), hp.quant_target_bytes - code_bytes, sens,
                                                hp.quant_embed, rt.log, gptq)
            else:
                obj, stats = quantize_state_dict(model.state_dict(), hp.quant_embed, gptq)
            atomic_save(stats["blob"] if hp.quant_target_bytes else serialize_artifact(obj), path)
            herr = stats["herr"]  # per GPTQ tensor: tr(dW H dW^T) of its codes and of nearest rounding's, damp
            for name, (g, n, damp) in herr.items():
                rt.log(f"quant_gptq tensor:{name} hessian_err:{g:.5g} vs_nearest:{g / max(n, 1e-30):.4f} damp:{damp:g}")
            ratio = sum(h[0] for h in herr.values()) / max(sum(h[1] for h in herr.values()), 1e-30) if herr else 1.0
            rt.log(f"quant: method:{hp.quant_method} gptq_tensors:{len(herr)} hessian_err_vs_nearest:{ratio:.4f} "
                   f"rows:{stats['rows']} floor_rows:{stats['floor_rows']} floor_fraction:"
                   f"{stats['floor_rows'] / max(stats['rows'], 1):.4f} time:{time.perf_counter() - t0:.1f}s")
        if rt.world > 1:
            dist.barrier()
        load_weights(model, dequantize_state_dict(read_artifact(str(path))), f"artifact {path}")
        result["bytes_model"] = path.stat().st_size
        q_loss, q_bpb = evaluate(hp, rt, model, val, tables, 0)
        rt.log(f"quant_eval val_loss:{q_loss:.8f} val_bpb:{q_bpb:.8f} quant_gap_bpb:{q_bpb - float_bpb:+.6f}")
        standard = (q_loss, q_bpb)
    STOP.phase = "final evaluation"
    result["bytes_total"] = result["bytes_model"] + code_bytes
    rt.log(f"bytes_model:{result['bytes_model']} bytes_code:{code_bytes} bytes_total:{result['bytes_total']} "
           f"limit:{hp.artifact_limit_bytes}")
    result.update(final_evaluation(hp, rt, model, val, tables, standard))
    if rt.compile:  # dynamo's own counters; more graphs for more data would mean a recompile per chunk or length
        stats = torch._dynamo.utils.counters
        rt.log(f"compile: graphs:{stats['stats']['unique_graphs']} graph_breaks:{sum(stats['graph_break'].values())}")
        rt.log(f"compile_cache: fx_graph_hits:{stats['inductor']['fxgraph_cache_hit']} "
               f"misses:{stats['inductor']['fxgraph_cache_miss']} aot_autograd_hits:"
               f"{stats['aot_autograd']['autograd_cache_hit']} misses:{stats['aot_autograd']['autograd_cache_miss']}")
    if not all(map(math.isfinite, (result["val_bpb"], result["pre_ttt_val_bpb"]))):  # a failure, not a score
        raise UserError(f"the score is not finite: val_bpb {result['val_bpb']} (before TTT "
                        f"{result['pre_ttt_val_bpb']}); no submission.json, the weights are kept in {rt.run_dir}")
    if rt.rank == 0:
        write_submission(hp, rt, result)
    if rt.world > 1:
        dist.barrier()  # ranks tear down together: gloo can abort a process whose peer has already gone
    if (over := result["bytes_total"] - hp.artifact_limit_bytes) > 0:
        raise UserError(f"artifact too large: {result['bytes_total']} bytes is {over} "
                        f"over the {hp.artifact_limit_bytes}-byte cap (outputs kept in {rt.run_dir})")
    return 0


def write_submission(hp: Hyperparameters, rt: Runtime, r: dict) -> None:
    gpu = f"{rt.world}x{torch.cuda.get_device_name(rt.device)}" if rt.device.type == "cuda" else f"{rt.world}xCPU"
    sub = {"author": hp.submission_author, "github_id": hp.submission_github_id,
           "name": "11L GEPA + 25k Steps + Pure Int6 + Legal TTT (reproduction)",
           "blurb": "11-layer GEPA transformer, Muon/AdamW + EMA, int6 GPTQ-lite + zstd-22, legal score-first TTT",
           "date": time.strftime("%Y-%m-%d"), "track": "non_record_16mb", "val_loss": round(r["val_loss"], 8),
           "val_bpb": round(r["val_bpb"], 8), "pre_ttt_val_bpb": round(r["pre_ttt_val_bpb"], 8),
           "bytes_model": r["bytes_model"], "bytes_code": r["bytes_code"], "bytes_total": r["bytes_total"],
           "eval_time_seconds": r["eval_time_seconds"], "gpu": gpu, "training_steps": r["training_steps"],
           "wallclock_seconds": r["wallclock_seconds"], "seed": hp.seed, "parameters": r["parameters"]}
    (rt.run_dir / "submission.json").write_text(json.dumps(sub, indent=2) + "\n")
    rt.log(f"submission:{rt.run_dir / 'submission.json'}")


def report_stop(rt: Runtime | None, signum: int, line: str | None, checkpoint_dir: str = "") -> int:
    """The stop line (what was interrupted, what is safe on disk); 128 + signum (0: another process ended first)."""
    if line is None:
        dirs = [d for d in (rt and rt.run_dir, checkpoint_dir and Path(checkpoint_dir)) if d]
        kept = sorted({p for d in dirs for p in d.rglob("*") if p.suffix in (".pt", ".ptz")})
        why = signal.Signals(signum).name if signum else "another process of this run ended (its output says why)"
        line = f"stopped: {why} during {STOP.phase}; safe on disk: {', '.join(map(str, kept)) or 'nothing of this run'}"
    (rt or Runtime(rank=int(os.environ.get("RANK", "0")))).log(line)
    return 128 + signum


def reports_error(rank: int) -> bool:
    """One report per error under torchrun: the first claim in its store reports (rank 0 at once, the others later)."""
    time.sleep(3.0 if rank else 0.0)  # rank 0 (the same error, most often) first; torchrun stops the rest as it exits
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":  # not under torchrun: nobody else to ask
        return True
    try:
        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                              timeout=datetime.timedelta(seconds=10))
        return store.add(f"train_gpt_error_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", 1) == 1
    except Exception:  # the store is unreachable: better the line twice than not at all
        return True


def main() -> int:
    if any(a in ("-h", "--help") for a in sys.argv[1:]):
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `--help | head` ends quietly
        print(help_text())
        return 0
    rt = hp = None
    for s in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(s, STOP)
    try:
        if sys.argv[1:]:  # an argument would be ignored, not obeyed: `python train_gpt.py EVAL_ONLY=1` would train
            raise UserError(f"train_gpt.py reads no arguments (got {' '.join(sys.argv[1:])[:160]}): knobs are "
                            "environment variables, e.g. EVAL_ONLY=1 python train_gpt.py (--help lists them)")
        hp = Hyperparameters.from_env()
        rt = setup_runtime(hp)
        return run(hp, rt)
    except Stopped as e:
        return report_stop(rt, *e.args, hp.checkpoint_dir if hp else "")
    except Exception as e:  # a UserError is one line, anything else its traceback; under torchrun once, not per rank
        if STOP.signum:  # e.g. a collective broken by a peer that stopped first
            return report_stop(rt, STOP.signum, None, hp.checkpoint_dir if hp else "")
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # from here torchrun's SIGTERM ends a waiting rank quietly
        rank = rt.rank if rt else 0  # before the runtime every rank has the same error (the config's)
        if lost := rt and rt.world > 1 and any(s in str(e) for s in ("by peer", "remote process")):
            report_stop(rt, 0, None, hp.checkpoint_dir)  # a peer ended first: it (or torchrun) says why; wait as below
        if lost or not reports_error(rank):
            time.sleep(60)  # the reporting rank may still be printing: torchrun stops this process when it exits
            return 2
        if isinstance(e, (OSError, MemoryError, torch.OutOfMemoryError)):  # the system refused: one line too
            oom = "" if isinstance(e, OSError) else "; lower MICRO_BATCH_SEQS, EVAL_BATCH_SEQS or TTT_BATCH_SEQS"
            e = UserError(f"{type(e).__name__} during {STOP.phase}: {(str(e).splitlines() or [''])[0][:300]}{oom}")
        if not isinstance(e, UserError):
            raise
        line = f"error: {f'rank {rank}: ' if rank else ''}{e}"  # another rank names itself (maybe its error alone)
        print(line, file=sys.stderr, flush=True)
        if rt is not None and rt.log_file is not None:
            with contextlib.suppress(OSError):  # the disk that is full may be the log's
                print(line, file=rt.log_file, flush=True)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    code = main()
    sys.stdout.flush(), sys.stderr.flush()  # train.log is flushed line by line; every other output is closed
    if dist.is_initialized():  # skip the process-group teardown: gloo's can abort a rank whose run has finished
        os._exit(code)         # (a C++ thread left joinable), and exit releases everything it would
    sys.exit(code)
