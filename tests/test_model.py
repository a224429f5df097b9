"""The model against the published architecture: an independent reference forward, causality, XSA, partial RoPE/YaRN,
BigramHash/SmearGate (with and without BOS masking), init, and score_from."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from conftest import tg, tiny_hp, tiny_model

EPS32 = torch.finfo(torch.float32).eps


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------

@torch.no_grad()
def randomize(model: "tg.GPT", seed: int = 1) -> "tg.GPT":
    """Every parameter non-zero and O(1)-active, so every path of the forward matters (the default
    init zeroes attn.proj/down_proj and the bigram table, which would hide those paths)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        r = torch.randn(p.shape, generator=g)
        if name == "tok_emb.weight":
            p.copy_(r)  # large logits: the softcap is active
        elif p.ndim == 2 and name.endswith(".weight") and "embed" not in name:
            p.copy_(r / math.sqrt(p.shape[1]))  # linear layers
        elif "embed" in name:
            p.copy_(r)
        elif any(k in name for k in ("gate", "skip_gates")):
            p.copy_(r)  # sigmoid gates strictly between 0 and 1
        elif "resid_mix" in name:
            p.copy_(0.5 + 0.5 * r)
        elif "q_gain" in name:
            p.copy_(1.5 + 0.5 * r)
        elif name.endswith("mlp.bias"):
            p.copy_(0.3 * r)
        else:  # scales, skip weights, scalar scales
            p.copy_(1.0 + 0.3 * r)
    return model


def rand_ids(B: int, T: int, vocab: int = 1024, seed: int = 0, bos_at=(0,)) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, vocab, (B, T), generator=g)
    for t in bos_at:
        if t < T:
            ids[:, t] = 1
    return ids


def ref_rms(x: torch.Tensor) -> torch.Tensor:
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + EPS32)


def ref_buckets(ids: np.ndarray, n_buckets: int, bos_mask: bool) -> np.ndarray:
    """((36313*cur) XOR (27191*prev)) mod (n-1) in int32 arithmetic; position 0 (and BOS if masked) -> n-1."""
    ids32 = ids.astype(np.int32)
    with np.errstate(over="ignore"):
        h = np.bitwise_xor(ids32[:, 1:] * np.int32(36313), ids32[:, :-1] * np.int32(27191))
    h = np.mod(h, np.int32(n_buckets - 1))  # floor mod: non-negative
    out = np.concatenate([np.full((ids.shape[0], 1), n_buckets - 1, dtype=np.int64), h.astype(np.int64)], axis=1)
    if bos_mask:
        out[ids == 1] = n_buckets - 1
    return out


def ref_inv_freq(hp, T: int) -> torch.Tensor:
    """inv_freq in float64: 1/base'^(2j/dims) (dims = ROPE_DIMS, 0 = the whole head; base' stretched by YaRN when
    T > ROPE_TRAIN_SEQ_LEN), rounded to the nearest bf16 (ROPE_INV_FREQ=bf16) except in the YaRN branch."""
    dims = hp.rope_dims or hp.head_dim
    yarn = T > hp.rope_train_seq_len
    base = hp.rope_base * (T / hp.rope_train_seq_len) ** (dims / (dims - 2)) if yarn else hp.rope_base
    inv = 1.0 / base ** (2 * torch.arange(dims // 2, dtype=torch.float64) / dims)
    return inv if yarn or hp.rope_inv_freq == "fp32" else inv.to(torch.bfloat16).double()


def ref_rope(x: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """x (B, T, H, hd), float64 reference of the formula; angle_j(t) = t * inv_freq[j] on the first
    2 * len(inv_freq) dims, pairs (j, j + half)."""
    half = len(inv_freq)
    x = x.double()
    t = torch.arange(x.size(1), dtype=torch.float64)[:, None]
    ang = t * inv_freq.double()[None, :]
    cos, sin = ang.cos()[None, :, None, :], ang.sin()[None, :, None, :]
    a, b = x[..., :half], x[..., half:2 * half]
    return torch.cat([a * cos + b * sin, -a * sin + b * cos, x[..., 2 * half:]], dim=-1)


@torch.no_grad()
def reference_forward(sd: dict, hp, ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The published forward written out directly from the state dict (float32), per-position CE."""
    B, T = ids.shape
    d, L, H, Hkv = hp.model_dim, hp.num_layers, hp.num_heads, hp.num_kv_heads
    hd = d // H
    bos = ids == 1
    # 1-2. token embedding + BigramHash
    x = sd["tok_emb.weight"][ids]
    buckets = torch.from_numpy(ref_buckets(ids.numpy(), hp.bigram_buckets, hp.bos_mask))
    x = x + sd["bigram_emb.scale"] * (sd["bigram_emb.embed.weight"][buckets] @ sd["bigram_emb.proj.weight"].T)
    # 3. rms, SmearGate
    x = ref_rms(x)
    g = torch.sigmoid(sd["smear_gate.gate"])
    prev = torch.cat([torch.zeros_like(x[:, :1]), x[:, :-1]], dim=1)
    if hp.bos_mask:
        prev = torch.where(bos[..., None], torch.zeros_like(prev), prev)
    x = (1 - g) * x + g * prev
    x0 = x
    # value embeddings (shared), rope base
    ve_layers = [int(s) for s in hp.ve_layers.split(",") if s.strip()] if hp.ve_enabled else []
    ve = None
    if ve_layers:  # no projection when VE_DIM equals the key/value width
        ve = sd["ve_shared.embed.weight"][ids]
        ve = sd["ve_shared.scale"] * (ve @ sd["ve_shared.proj.weight"].T if "ve_shared.proj.weight" in sd else ve)
    inv_freq = ref_inv_freq(hp, T)
    n_enc = L // 2
    stack = []
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    for i in range(L):
        p = f"blocks.{i}."
        if i >= n_enc and stack:
            j = i - n_enc
            gs = torch.sigmoid(sd["skip_gates"][j])
            x = gs * x + (1 - gs) * (sd["skip_weights"][j] * stack.pop())
        x = sd[p + "resid_mix"][0] * x + sd[p + "resid_mix"][1] * x0
        c = 1.0 / math.sqrt(i + 1) if hp.ln_scale else 1.0
        # attention
        h = ref_rms(x) * c
        q = (h @ sd[p + "attn.c_q.weight"].T).view(B, T, H, hd)
        k = (h @ sd[p + "attn.c_k.weight"].T).view(B, T, Hkv, hd)
        v = h @ sd[p + "attn.c_v.weight"].T
        if i in ve_layers:
            v = v + ve * sd[f"ve_layer_scales.{ve_layers.index(i)}"]
        v = v.view(B, T, Hkv, hd)
        q, k = ref_rms(q), ref_rms(k)
        q = ref_rope(q, inv_freq).float()
        k = ref_rope(k, inv_freq).float()
        q = q * sd[p + "attn.q_gain"][None, None, :, None]
        rep = H // Hkv
        K, V = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
        s = torch.einsum("bthd,bshd->bhts", q, K) / math.sqrt(hd)
        s = s.masked_fill(~causal, float("-inf"))
        y = torch.einsum("bhts,bshd->bthd", torch.softmax(s, dim=-1), V)
        if i >= L - hp.xsa_layers:
            n = V / V.norm(dim=-1, keepdim=True)
            y = y - (y * n).sum(-1, keepdim=True) * n
        x = x + sd[p + "attn_scale"] * (y.reshape(B, T, d) @ sd[p + "attn.proj.weight"].T)
        # MLP
        h = ref_rms(x) * c
        u = h @ sd[p + "mlp.up_proj.weight"].T
        a = torch.relu(u) ** 2 * sd[p + "mlp.scale"] + sd[p + "mlp.bias"]
        x = x + sd[p + "mlp_scale"] * (a @ sd[p + "mlp.down_proj.weight"].T)
        if i < n_enc:
            stack.append(x)
    logits = ref_rms(x) @ sd["tok_emb.weight"].T
    logits = hp.logit_softcap * torch.tanh(logits / hp.logit_softcap)
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -logp.gather(-1, targets[..., None]).squeeze(-1)


# ----------------------------------------------------------------------------------------------
# reference forward: the model is pinned to the published architecture
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("T,kw", [(48, {}), (48, {"bos_mask": 1}), (200, {}), (48, {"rope_inv_freq": "fp32"}),
                                  (48, {"rope_dims": 0, "ve_dim": 32})])
def test_forward_matches_independent_reference(T, kw):
    """Per-position losses of tg.GPT == the published forward written out in the test (randomized weights;
    T=200 > ROPE_TRAIN_SEQ_LEN=128 exercises YaRN; bf16-rounded and exact RoPE frequencies; RoPE on the whole
    head with a value embedding as wide as the key/value heads, so without projection)."""
    hp = tiny_hp(**kw)
    model = randomize(tiny_model(**kw)).eval()
    ids = rand_ids(2, T, seed=3, bos_at=(0, 7, 8, 30))
    tgt = rand_ids(2, T, seed=4, bos_at=())
    with torch.no_grad():
        got = model(ids, tgt)
    want = reference_forward({k: v.detach().float() for k, v in model.state_dict().items()}, hp, ids, tgt)
    assert got.shape == (2, T) and got.dtype == torch.float32
    # sanity: the randomized model is far from uniform, so the comparison has teeth
    assert abs(float(want.mean()) - math.log(1024)) > 0.5
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_reference_forward_detects_perturbations():
    """The reference comparison can fail: a small change to one deep weight moves the losses."""
    hp = tiny_hp()
    model = randomize(tiny_model()).eval()
    ids, tgt = rand_ids(1, 32, seed=5), rand_ids(1, 32, seed=6, bos_at=())
    sd = {k: v.detach().float().clone() for k, v in model.state_dict().items()}
    sd["blocks.3.attn.c_v.weight"][0, 0] += 0.05
    with torch.no_grad():
        got = model(ids, tgt)
    assert (got - reference_forward(sd, hp, ids, tgt)).abs().max() > 1e-4


# ----------------------------------------------------------------------------------------------
# causality
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bos_mask", [0, 1])
def test_causality(bos_mask):
    """Changing token t never changes the losses at positions < t (same targets), but does change t.
    Randomized weights make SmearGate, BigramHash, attention, XSA (blocks 2-3) and VE (2,3) all active."""
    T = 40
    model = randomize(tiny_model(bos_mask=bos_mask), seed=11).eval()
    ids = rand_ids(2, T, seed=12, bos_at=(0, 5, 21))
    tgt = rand_ids(2, T, seed=13, bos_at=())
    with torch.no_grad():
        base = model(ids, tgt)
        for t in (0, 1, 5, 6, 20, T - 1):
            for new in ((ids[0, t] + 17) % 1024, torch.tensor(1)):  # another token, and a BOS
                if int(new) == int(ids[0, t]):
                    continue
                ids2 = ids.clone()
                ids2[:, t] = new
                out = model(ids2, tgt)
                torch.testing.assert_close(out[:, :t], base[:, :t], atol=1e-6, rtol=0)
                assert (out[:, t] - base[:, t]).abs().min() > 1e-5, f"changing token {t} did not change position {t}"


# ----------------------------------------------------------------------------------------------
# XSA
# ----------------------------------------------------------------------------------------------

def _attn_heads_and_values(model, i: int, x, ve):
    """Run blocks[i].attn on x, capture the input of attn.proj (B, T, H, hd) and the kv-head values."""
    attn = model.blocks[i].attn
    hp = model.hp
    B, T, _ = x.shape
    seen = {}
    hook = attn.proj.register_forward_hook(lambda m, inp, out: seen.__setitem__("y", inp[0].detach()))
    try:
        with torch.no_grad():
            attn(x, tg.rope_angles(hp, T, x.device), ve)
    finally:
        hook.remove()
    with torch.no_grad():
        v = attn.c_v(x) + (ve if ve is not None else 0)
    y = seen["y"].reshape(B, T, hp.num_heads, hp.head_dim)
    v = v.reshape(B, T, hp.num_kv_heads, hp.head_dim).repeat_interleave(hp.num_heads // hp.num_kv_heads, dim=2)
    return y, v


def _cosines(y, v):
    return ((y * v).sum(-1) / (y.norm(dim=-1) * v.norm(dim=-1))).abs()


def test_xsa_output_orthogonal_to_own_value():
    """XSA blocks (2, 3 of the tiny config): each head's output is orthogonal to its own token's value
    vector (c_v + ve, kv head h // 2); non-XSA blocks (0, 1) are not."""
    hp = tiny_hp()
    model = randomize(tiny_model(), seed=21)
    g = torch.Generator().manual_seed(22)
    x = torch.randn(2, 24, hp.model_dim, generator=g)
    ve = 0.5 * torch.randn(2, 24, hp.num_kv_heads * hp.head_dim, generator=g)
    assert hp.num_layers - hp.xsa_layers == 2
    for i in (2, 3):
        y, v = _attn_heads_and_values(model, i, x, ve)
        # position 0 attends only to itself: its output is its own value, so XSA leaves ~0 there
        assert y[:, 0].norm(dim=-1).max() < 1e-5
        y, v = y[:, 1:], v[:, 1:]
        assert y.norm(dim=-1).min() > 1e-3
        assert _cosines(y, v).max() < 1e-5, f"block {i}"
    for i in (0, 1):
        y, v = _attn_heads_and_values(model, i, x, None)
        assert _cosines(y[:, 1:], v[:, 1:]).max() > 0.1, f"block {i} should not be XSA"


# ----------------------------------------------------------------------------------------------
# partial RoPE and YaRN
# ----------------------------------------------------------------------------------------------

def test_rope_matches_formula_and_properties():
    hp = tiny_hp(num_heads=2, rope_dims=8)  # head dim 32, rope on the first 8
    T, hd, rd = 64, hp.head_dim, hp.rope_dims
    g = torch.Generator().manual_seed(31)
    x = torch.randn(2, T, 3, hd, generator=g)
    cos, sin = tg.rope_angles(hp, T, "cpu")
    y = tg.apply_rope(x, cos, sin)
    # exact formula (float64 reference)
    torch.testing.assert_close(y.double(), ref_rope(x, ref_inv_freq(hp, T)), atol=2e-5, rtol=0)
    # only the first ROPE_DIMS dims change
    assert torch.equal(y[..., rd:], x[..., rd:])
    assert (y[:, 1:, :, :rd] - x[:, 1:, :, :rd]).abs().max() > 0.1
    # position 0 is the identity
    torch.testing.assert_close(y[:, 0], x[:, 0], atol=1e-7, rtol=0)
    # norms preserved per rotated pair (j, j + half) and for the whole vector
    half = rd // 2
    pn = lambda z: z[..., :half] ** 2 + z[..., half:rd] ** 2
    torch.testing.assert_close(pn(y), pn(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1), atol=1e-5, rtol=1e-5)


def test_rope_relative_position():
    """<rope(q, m), rope(k, n)> depends only on m - n."""
    hp = tiny_hp(num_heads=2, rope_dims=8)
    T, hd = 64, hp.head_dim
    g = torch.Generator().manual_seed(32)
    q, k = torch.randn(hd, generator=g), torch.randn(hd, generator=g)
    cos, sin = tg.rope_angles(hp, T, "cpu")
    rq = tg.apply_rope(q.expand(1, T, 1, hd).contiguous(), cos, sin)[0, :, 0]
    rk = tg.apply_rope(k.expand(1, T, 1, hd).contiguous(), cos, sin)[0, :, 0]
    dot = lambda m, n: float(rq[m] @ rk[n])
    for delta in (0, 3, 17):
        vals = [dot(n + delta, n) for n in (0, 5, 20, 40)]
        assert max(vals) - min(vals) < 1e-4, (delta, vals)
    # and it does depend on m - n
    assert abs(dot(3, 0) - dot(0, 0)) > 1e-3


def test_rope_bf16_frequencies_at_the_seed_config():
    """ROPE_INV_FREQ=bf16 (the default) at the seed's shape (16 dims, base 10,000, T 2,048): the angle at position 1
    is each inverse frequency, 1/base^(2j/16) rounded to the nearest bf16 (e.g. 10000^-1/4 = 0.1 -> 0.10009765625);
    the table is t times it, t exact. The rounding moves the phase at distance 2,047 by up to ~0.37 rad (pair 1)."""
    hp = tg.Hyperparameters.from_env({})
    T = hp.train_seq_len
    assert (hp.rope_inv_freq, hp.rope_dims, T) == ("bf16", 16, 2048)
    cos, sin = tg.rope_angles(hp, T, "cpu")
    want = ref_inv_freq(hp, T)
    assert float(want[2]) == 0.10009765625
    torch.testing.assert_close(torch.atan2(sin[1], cos[1]).double(), want, atol=1e-7, rtol=0)
    t = torch.arange(T, dtype=torch.float64)[:, None]
    torch.testing.assert_close(cos.double(), (t * want).cos(), atol=3e-4, rtol=0)  # fp32 angles up to 2,047 rad
    torch.testing.assert_close(sin.double(), (t * want).sin(), atol=3e-4, rtol=0)
    phase = (T - 1) * (want - 1 / hp.rope_base ** (torch.arange(8, dtype=torch.float64) / 8)).abs()
    assert 0.36 < phase.max() < 0.37 and int(phase.argmax()) == 1


def test_rope_dims_zero_rotates_the_whole_head():
    hp = tiny_hp(rope_dims=0)  # head dim 16
    T = 32
    cos, sin = tg.rope_angles(hp, T, "cpu")
    assert cos.shape == (T, hp.head_dim // 2)
    x = torch.randn(1, T, 2, hp.head_dim, generator=torch.Generator().manual_seed(33))
    y = tg.apply_rope(x, cos, sin)
    torch.testing.assert_close(y.double(), ref_rope(x, ref_inv_freq(hp, T)), atol=2e-5, rtol=0)
    assert (y[..., -1] - x[..., -1]).abs().max() > 1e-3  # the last dim turns too (ROPE_DIMS=16 would leave it)


@pytest.mark.parametrize("T", [64, 128, 256, 512])
@pytest.mark.parametrize("inv", ["bf16", "fp32"])
def test_rope_angles_yarn(T, inv):
    """seq_len <= ROPE_TRAIN_SEQ_LEN: plain base (frequencies bf16-rounded unless ROPE_INV_FREQ=fp32); above it
    base' = base * (T/train)^(rd/(rd-2)) with frequencies in fp32, unrounded, whatever ROPE_INV_FREQ says."""
    hp = tiny_hp(rope_dims=8, rope_train_seq_len=128, rope_inv_freq=inv)
    cos, sin = tg.rope_angles(hp, T, "cpu")
    base = hp.rope_base if T <= 128 else hp.rope_base * (T / 128) ** (8 / 6)
    t = torch.arange(T, dtype=torch.float64)[:, None]
    freq = 1 / base ** (2 * torch.arange(4, dtype=torch.float64)[None, :] / 8)
    ang = t * (freq.to(torch.bfloat16).double() if T <= 128 and inv == "bf16" else freq)
    assert cos.shape == (T, 4) and sin.shape == (T, 4)
    torch.testing.assert_close(cos.double(), ang.cos(), atol=1e-4, rtol=0)
    torch.testing.assert_close(sin.double(), ang.sin(), atol=1e-4, rtol=0)
    if T > 128:  # YaRN actually changed something
        plain = t / hp.rope_base ** (2 * torch.arange(4, dtype=torch.float64)[None, :] / 8)
        assert (cos.double() - plain.cos()).abs().max() > 0.1


# ----------------------------------------------------------------------------------------------
# BigramHash and SmearGate, BOS masking
# ----------------------------------------------------------------------------------------------

def test_bigram_buckets_all_pairs_vocab_1024():
    """Every (prev, cur) pair of the sp1024 vocab hashes as the int32 numpy reference (2048 buckets)."""
    bh = tg.BigramHash(tiny_hp(bigram_buckets=2048))
    a = np.arange(1024)
    prev, cur = np.repeat(a, 1024), np.tile(a, 1024)
    ids = np.stack([prev, cur], axis=1)
    got = bh.buckets(torch.from_numpy(ids), None)
    want = ref_buckets(ids, 2048, bos_mask=False)
    assert np.array_equal(got.long().numpy(), want)
    assert got.min() >= 0 and got[:, 1].max() < 2047 and (got[:, 0] == 2047).all()
    assert len(np.unique(want[:, 1])) == 2047  # the hash uses every ordinary bucket


def test_bigram_buckets_int32_overflow_and_tiny_buckets():
    """ids up to 65535 overflow the int32 products; the wrap-around and floor-mod follow the int32 reference."""
    g = torch.Generator().manual_seed(41)
    ids = torch.randint(0, 65536, (4, 300), generator=g)
    assert (ids.to(torch.int64) * 36313 > 2**31 - 1).any()
    for n in (2048, 256):
        bh = tg.BigramHash(tiny_hp(bigram_buckets=n))
        got = bh.buckets(ids, None).long().numpy()
        assert np.array_equal(got, ref_buckets(ids.numpy(), n, bos_mask=False))


def test_bigram_buckets_bos_mask():
    bh = tg.BigramHash(tiny_hp())
    ids = rand_ids(3, 50, seed=42, bos_at=(0, 9, 10, 33))
    got = bh.buckets(ids, ids == 1).long().numpy()
    assert np.array_equal(got, ref_buckets(ids.numpy(), 256, bos_mask=True))
    assert (got[:, [9, 10, 33]] == 255).all()


def test_smear_gate_formula_and_bos_mask():
    g = torch.Generator().manual_seed(43)
    sg = tg.SmearGate(16)
    with torch.no_grad():
        sg.gate.copy_(torch.randn(16, generator=g))
    x = torch.randn(2, 12, 16, generator=g)
    ids = rand_ids(2, 12, seed=44, bos_at=(0, 4))
    gate = torch.sigmoid(sg.gate.detach())
    prev = torch.cat([torch.zeros_like(x[:, :1]), x[:, :-1]], dim=1)
    with torch.no_grad():
        plain = sg(x, None)
        masked = sg(x, ids == 1)
    torch.testing.assert_close(plain, (1 - gate) * x + gate * prev, atol=1e-6, rtol=1e-6)
    keep = ids != 1
    torch.testing.assert_close(masked[keep], plain[keep])
    # BOS positions never see the previous token
    x2 = x.clone()
    x2[:, 3] += 1.0  # the token before the BOS at 4
    with torch.no_grad():
        masked2, plain2 = sg(x2, ids == 1), sg(x2, None)
    torch.testing.assert_close(masked2[:, 4], masked[:, 4], atol=0, rtol=0)
    assert (plain2[:, 4] - plain[:, 4]).abs().min() > 1e-3


@pytest.mark.parametrize("bos_mask", [0, 1])
def test_model_bos_isolation_of_x0(bos_mask):
    """At the model level (BigramHash + SmearGate, x0 = SmearGate output): with BOS_MASK=1 a BOS position is
    independent of the token before it; with BOS_MASK=0 (the seed) the previous document leaks in."""
    model = randomize(tiny_model(bos_mask=bos_mask), seed=45).eval()
    ids = rand_ids(1, 30, seed=46, bos_at=(0, 10))
    seen = []
    hook = model.smear_gate.register_forward_hook(lambda m, i, o: seen.append(o.detach()))
    with torch.no_grad():
        model(ids, ids)
        ids2 = ids.clone()
        ids2[0, 9] = (ids[0, 9] + 5) % 1024
        model(ids2, ids)
    hook.remove()
    a, b = seen
    diff = (a - b).abs().amax(-1)[0]
    assert diff[9] > 1e-3 and diff[:9].max() == 0
    if bos_mask:
        assert diff[10:].max() == 0
    else:
        assert diff[10] > 1e-3 and diff[11] > 1e-3  # smear into 10, bigram(10, 9) hash ... and 10 into 11


# ----------------------------------------------------------------------------------------------
# init (the published order)
# ----------------------------------------------------------------------------------------------

def test_init():
    L = 4
    hp_kw = dict(model_dim=128, num_heads=4, num_kv_heads=2, bigram_embed_dim=64, ve_dim=128, mlp_hidden=256,
                 tied_embed_init_std=0.02)
    model = tiny_model(seed=3, **hp_kw)
    sd = model.state_dict()
    eye = lambda n: torch.eye(n)
    for i in range(L):
        assert torch.count_nonzero(sd[f"blocks.{i}.attn.proj.weight"]) == 0
        assert torch.count_nonzero(sd[f"blocks.{i}.mlp.down_proj.weight"]) == 0
        wq = sd[f"blocks.{i}.attn.c_q.weight"]  # 128x128
        torch.testing.assert_close(wq @ wq.T, eye(128), atol=1e-4, rtol=0)
        for n in ("c_k", "c_v"):  # 64x128: orthonormal rows
            w = sd[f"blocks.{i}.attn.{n}.weight"]
            torch.testing.assert_close(w @ w.T, eye(64), atol=1e-4, rtol=0)
        up = sd[f"blocks.{i}.mlp.up_proj.weight"]  # 256x128: orthonormal columns, gain 1 (not a BigramHash/VE proj)
        torch.testing.assert_close(up.T @ up, eye(128), atol=1e-4, rtol=0)
        assert torch.equal(sd[f"blocks.{i}.attn.q_gain"], torch.full((4,), 1.5))
        assert torch.equal(sd[f"blocks.{i}.resid_mix"], torch.stack([torch.ones(128), torch.zeros(128)]))
        for n in ("attn_scale", "mlp_scale", "mlp.scale"):
            assert (sd[f"blocks.{i}.{n}"] == 1).all()
        assert (sd[f"blocks.{i}.mlp.bias"] == 0).all()
    assert torch.count_nonzero(sd["bigram_emb.embed.weight"]) == 0
    te = sd["tok_emb.weight"]
    assert abs(te.std().item() - 0.02) < 0.02 * 0.03 and abs(te.mean().item()) < 1e-3
    bp = sd["bigram_emb.proj.weight"]  # 128x64: orthogonal columns, x 1/sqrt(2L)
    torch.testing.assert_close(bp.T @ bp, eye(64) / (2 * L), atol=1e-4, rtol=0)
    vp = sd["ve_shared.proj.weight"]  # 64x128: orthogonal rows
    torch.testing.assert_close(vp @ vp.T, eye(64) / (2 * L), atol=1e-4, rtol=0)
    assert abs(sd["ve_shared.embed.weight"].std().item() - 0.01) < 0.01 * 0.05
    assert float(sd["bigram_emb.scale"]) == pytest.approx(0.05)
    assert float(sd["ve_shared.scale"]) == pytest.approx(0.1)
    assert all((sd[f"ve_layer_scales.{k}"] == 1).all() for k in range(2))
    assert (sd["smear_gate.gate"] == 0).all() and (sd["skip_gates"] == 0).all() and (sd["skip_weights"] == 1).all()


def published_init(hp, seed: int, through_tok_emb: bool = False) -> dict:
    """The published script's initial weights, drawn independently in its order: PyTorch's default init of each
    module as it is built (Embedding N(0, 1), Linear kaiming-uniform; the VE table redrawn N(0, 0.01) right after
    it is built), then the init pass: tok_emb N(0, std); per linear layer in module order attn.proj/down_proj zero,
    both dims >= 64 orthogonal (the BigramHash/VE projections x 1/sqrt(2L)), a BigramHash/VE projection with a dim
    < 64 zero, any other layer keeps its default init. The bigram table is zero."""
    torch.manual_seed(seed)
    d, kv, nn = hp.model_dim, hp.num_kv_heads * hp.head_dim, torch.nn
    w = {"tok_emb.weight": nn.Embedding(hp.vocab_size, d).weight,
         "bigram_emb.embed.weight": nn.Embedding(hp.bigram_buckets, hp.bigram_embed_dim).weight,
         "bigram_emb.proj.weight": nn.Linear(hp.bigram_embed_dim, d, bias=False).weight}
    for i in range(hp.num_layers):
        for n, (a, b) in (("attn.c_q", (d, d)), ("attn.c_k", (d, kv)), ("attn.c_v", (d, kv)), ("attn.proj", (d, d)),
                          ("mlp.up_proj", (d, hp.mlp_hidden)), ("mlp.down_proj", (hp.mlp_hidden, d))):
            w[f"blocks.{i}.{n}.weight"] = nn.Linear(a, b, bias=False).weight
    if hp.ve_layer_list:
        w["ve_shared.embed.weight"] = nn.init.normal_(nn.Embedding(hp.vocab_size, hp.ve_dim).weight, std=0.01)
        if hp.ve_dim != kv:  # none at the key/value width
            w["ve_shared.proj.weight"] = nn.Linear(hp.ve_dim, kv, bias=False).weight
    with torch.no_grad():
        nn.init.normal_(w["tok_emb.weight"], std=hp.tied_embed_init_std)
        w["bigram_emb.embed.weight"].zero_()
        for name, t in list(w.items())[2:] if not through_tok_emb else ():
            small_proj = name in ("bigram_emb.proj.weight", "ve_shared.proj.weight") and min(t.shape) < 64
            if name.endswith(("attn.proj.weight", "mlp.down_proj.weight")) or small_proj:
                t.zero_()
            elif name != "ve_shared.embed.weight" and min(t.shape) >= 64:
                nn.init.orthogonal_(t)
                if name in ("bigram_emb.proj.weight", "ve_shared.proj.weight"):
                    t.mul_(1 / math.sqrt(2 * hp.num_layers))
    return {k: v.detach() for k, v in w.items()}


@pytest.mark.parametrize("kw", [{}, dict(model_dim=128, num_heads=4, bigram_embed_dim=64, ve_dim=128, mlp_hidden=256),
                                {"ve_dim": 32}])
def test_init_is_the_published_draw_order(kw):
    """Same SEED -> the published script's initial weights, bit for bit: the tiny config (BigramHash/VE
    projections narrower than 64: zero), one where both are orthogonal, and VE as wide as the kv heads (no
    projection, so no ve_shared.proj in the state dict)."""
    hp = tiny_hp(**kw)
    want, got = published_init(hp, 9), tiny_model(seed=9, **kw).state_dict()
    assert ("ve_shared.proj.weight" in got) == (hp.ve_dim != hp.num_kv_heads * hp.head_dim)
    for k, v in want.items():
        assert torch.equal(got[k], v), k
    assert all("weight" not in k or k == "skip_weights" for k in set(got) - set(want))  # every drawn tensor checked
    if not kw:
        assert not got["bigram_emb.proj.weight"].any() and not got["ve_shared.proj.weight"].any()


def test_init_default_config_is_the_published_draw_order():
    """The seed's config (27,030,108 parameters, as the published code builds): tok_emb and the VE table are the
    published draws for the same SEED (every construction draw precedes them), the projections orthogonal / sqrt(22)."""
    hp = tg.Hyperparameters.from_env({})
    torch.manual_seed(hp.seed)
    sd = tg.GPT(hp).state_dict()
    assert sum(v.numel() for v in sd.values()) == 27_030_108
    want = published_init(hp, hp.seed, through_tok_emb=True)
    for k in ("tok_emb.weight", "ve_shared.embed.weight", "bigram_emb.embed.weight"):
        assert torch.equal(sd[k], want[k]), k
    for k, n in (("bigram_emb.proj.weight", 128), ("ve_shared.proj.weight", 128)):
        torch.testing.assert_close(sd[k].T @ sd[k], torch.eye(n) / 22, atol=1e-5, rtol=0)


def test_init_is_seeded():
    a, b, c = tiny_model(seed=5).state_dict(), tiny_model(seed=5).state_dict(), tiny_model(seed=6).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["tok_emb.weight"], c["tok_emb.weight"])


# ----------------------------------------------------------------------------------------------
# score_from
# ----------------------------------------------------------------------------------------------

def test_score_from_equals_slice():
    model = randomize(tiny_model(), seed=51).eval()
    ids, tgt = rand_ids(2, 64, seed=52, bos_at=(0, 20)), rand_ids(2, 64, seed=53, bos_at=())
    with torch.no_grad():
        full = model(ids, tgt)
        for k in (0, 1, 32, 63):
            part = model(ids, tgt, score_from=k)
            assert part.shape == (2, 64 - k)
            torch.testing.assert_close(part, full[:, k:], atol=1e-6, rtol=1e-6)


def test_forward_traces_without_graph_breaks():
    """torch.compile(fullgraph=True) on CUDA needs one graph: dynamo must trace the forward (training and
    scoring variants, XSA, VE, BOS mask) with zero graph breaks. Traced on CPU; no kernels are compiled."""
    import torch._dynamo
    for bos in (0, 1):
        model = tiny_model(seed=1, BOS_MASK=bos)
        x = torch.randint(0, 1024, (2, 128))
        for score_from in (0, 96):
            torch._dynamo.reset()
            out = torch._dynamo.explain(model)(x, x, score_from)
            assert out.graph_break_count == 0, out.break_reasons
            assert out.graph_count == 1
