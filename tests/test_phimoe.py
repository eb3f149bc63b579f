"""Phi-3.5-MoE (model_type "phimoe"): SparseMixer routing, parity with transformers' PhimoeForCausalLM,
mlx-lm interoperability, 4-bit experts and export.

Tiny random float32 checkpoints: 384 hidden, 4 heads of 96 (2 kv heads), 2 layers, 4 experts top-2,
intermediate 256, vocab 32064, LongRoPE with random factor lists of the right length (48) and distinct
short/long mscales, random biases; config.json in the Hub's form (``rope_scaling``, top-level
``rope_theta``), which is also what mlx-lm reads.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")

from phi3mlx import load  # noqa: E402
from phi3mlx.convert.hf_to_mlx import convert  # noqa: E402
from phi3mlx.generate import generate_step  # noqa: E402
from phi3mlx.models import phimoe  # noqa: E402

from .helpers import PHIMOE_JITTER as JITTER  # noqa: E402
from .helpers import TOL, assert_logits_and_greedy_match  # noqa: E402
from .helpers import phimoe_tiny_cfg as _tiny_cfg  # noqa: E402
from .helpers import random_ids as _ids  # noqa: E402
from .helpers import ref_logits as _ref_logits  # noqa: E402

# phimoe_checkpoint (conftest.py): factory of (hf folder, mlx folder, transformers model), needs torch.


def _moe(model, i=0):
    return getattr(model.layers[i], phimoe.MOE_ATTR)


# ------------------------------------------------------------------------------------ SparseMixer


def _near_tied_scores(n=256, e=16, seed=0):
    """Router scores where several experts sit near the top (inside and outside the 2*eps band)."""
    rs = np.random.RandomState(seed)
    s = rs.randn(n, e).astype(np.float32) * 2
    for r in range(n):
        top = s[r].max() if r % 3 else -abs(s[r].max()) - 0.5  # also rows whose max is negative
        s[r, rs.randint(e)] = top
        near = rs.choice(e, size=rs.randint(1, 5), replace=False)
        s[r, near] = top - np.abs(top) * rs.uniform(0.0, 0.06, size=len(near)) - 1e-4
        # a unique argmax so both sides must pick the same expert
        s[r, rs.randint(e)] = s[r].max() + 1e-3
    return s


def test_sparsemixer_inference_matches_transformers(torch_mod):
    pytest.importorskip("transformers")
    from transformers.models.phimoe.modeling_phimoe import sparsemixer as hf_sparsemixer

    s = _near_tied_scores()
    mult, sel = hf_sparsemixer(torch_mod.tensor(s), jitter_eps=JITTER, training=False)
    inds, w = phimoe.sparsemixer(mx.array(s), JITTER, top_k=2)
    assert np.array_equal(np.array(inds), sel.numpy())
    assert np.abs(np.array(w) - mult.numpy()).max() <= 1e-6
    # the non-trivial path ran: many weights are neither 1 nor from a full softmax
    assert (mult.numpy()[:, 0] < 0.999).mean() > 0.3 and (mult.numpy()[:, 1] < 0.999).mean() > 0.3


def test_sparsemixer_training_forward_and_gradient(torch_mod, monkeypatch):
    """Gumbel-max sampling, mask_for_one and PhimoeMultiplier's backward, on the same random draws."""
    pytest.importorskip("transformers")
    from transformers.models.phimoe import modeling_phimoe

    torch = torch_mod
    s = _near_tied_scores(seed=1)
    n, e = s.shape
    rs = np.random.RandomState(2)
    expo = [rs.exponential(size=(n, e)).astype(np.float32) for _ in range(2)]
    unif = [rs.uniform(size=(n, 1)).astype(np.float32) for _ in range(2)]
    coef = rs.randn(n, 2).astype(np.float32)

    # transformers draws: exponential_() twice (Gumbel noise) and rand_like() twice (mask_for_one)
    q_expo, q_unif = [torch.tensor(x) for x in expo], [torch.tensor(x) for x in unif]
    monkeypatch.setattr(torch.Tensor, "exponential_", lambda self, *a, **k: self.copy_(q_expo.pop(0)))
    monkeypatch.setattr(torch.Tensor, "uniform_", lambda self, *a, **k: self)
    monkeypatch.setattr(torch, "rand_like", lambda t, *a, **k: q_unif.pop(0).clone())
    ts = torch.tensor(s, requires_grad=True)
    mult, sel = modeling_phimoe.sparsemixer(ts, jitter_eps=JITTER, training=True)
    (mult * torch.tensor(coef)).sum().backward()
    assert not q_expo and not q_unif  # every injected draw was used
    monkeypatch.undo()

    draws = [(mx.array(expo[i]), mx.array(unif[i])) for i in range(2)]

    def loss(scores):
        _, w = phimoe.sparsemixer(scores, JITTER, top_k=2, training=True, draws=draws)
        return (w * mx.array(coef)).sum()

    inds, w = phimoe.sparsemixer(mx.array(s), JITTER, top_k=2, training=True, draws=draws)
    assert np.array_equal(np.array(inds), sel.numpy())
    assert np.abs(np.array(w) - mult.detach().numpy()).max() <= 1e-6
    # both mask_for_one values and non-argmax samples occur
    sampled_other = np.array(inds)[:, 0] != s.argmax(-1)
    assert (sampled_other & (unif[0][:, 0] <= 0.75)).any()  # mask_for_one 0.3333
    assert (sampled_other & (unif[0][:, 0] > 0.75)).any()  # mask_for_one 1.0 by the coin
    grad = np.array(mx.grad(loss)(mx.array(s)))
    ref = ts.grad.numpy()
    assert np.abs(ref).max() > 1e-3
    assert np.abs(grad - ref).max() <= 1e-6


def test_training_mode_routes_by_sampling(phimoe_checkpoint):
    _, out, _ = phimoe_checkpoint()
    model, _ = load(out)
    x = mx.array(_ids(16, 3))
    a = np.array(model(x))
    model.train()
    mx.random.seed(0)
    b = np.array(model(x))
    model.eval()
    assert np.abs(np.array(model(x)) - a).max() == 0
    assert np.abs(b - a).max() > 0  # sampled experts and 1/3 multipliers change the output


# --------------------------------------------------------------------------------------- parity


def test_logits_and_greedy_match_transformers(phimoe_checkpoint, torch_mod):
    _, out, hf_model = phimoe_checkpoint()
    model, _ = load(out)
    assert_logits_and_greedy_match(model, hf_model, torch_mod, "phimoe")


def test_long_regime_switches_mscale_only(phimoe_checkpoint, torch_mod, tmp_path):
    """original_max_position_embeddings 64: a 100-token pass uses long_mscale with the short factors
    (transformers); the "by_length" option (long factors too) is measurably different."""
    src, out, hf_model = phimoe_checkpoint(original_max_position_embeddings=64)
    model, _ = load(out)
    ids = _ids(100, 5)
    ref = _ref_logits(torch_mod, hf_model, ids)
    assert np.abs(np.array(model(mx.array(ids))) - ref).max() <= TOL
    assert np.abs(np.array(model(mx.array(ids), long_rope=False)) - ref).max() > 100 * TOL  # mscale matters
    cfg = json.loads((out / "config.json").read_text())
    cfg["phimoe_longrope"] = "by_length"
    alt = tmp_path / "by_length"
    alt.mkdir()
    for f in out.iterdir():
        (alt / f.name).symlink_to(f)
    (alt / "config.json").unlink()
    (alt / "config.json").write_text(json.dumps(cfg))
    by_len, _ = load(alt)
    short = _ids(40, 6)  # below the threshold both behaviours agree
    assert np.abs(np.array(by_len(mx.array(short))) - _ref_logits(torch_mod, hf_model, short)).max() <= TOL
    assert np.abs(np.array(by_len(mx.array(ids))) - ref).max() > 100 * TOL


def test_greedy_crossing_threshold_equals_full_forward_greedy(phimoe_checkpoint, torch_mod):
    """Prompt 60, 12 new tokens past original 64: cached generation (prefix re-run at the switch)
    equals greedy decoding by full transformers forward passes."""
    _, out, hf_model = phimoe_checkpoint(original_max_position_embeddings=64)
    model, _ = load(out)
    seq = _ids(60, 7)
    ours = [t for t, _ in generate_step(seq[0].tolist(), model, max_tokens=12)]
    for _ in range(12):
        nxt = int(_ref_logits(torch_mod, hf_model, seq)[0, -1].argmax())
        seq = np.concatenate([seq, [[nxt]]], axis=1)
    assert ours == seq[0, 60:].tolist()


# ------------------------------------------------------------------------- folders and quantization


def test_folder_layout_is_mlx_lm_s(phimoe_checkpoint):
    _, out, _ = phimoe_checkpoint()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    names = set(index["weight_map"])
    p = f"model.layers.0.{phimoe.MOE_ATTR}"
    assert {f"{p}.gate.weight", f"{p}.switch_mlp.gate_proj.weight", f"{p}.switch_mlp.up_proj.weight",
            f"{p}.switch_mlp.down_proj.weight", "lm_head.bias", "model.layers.0.self_attn.q_proj.bias"} <= names
    assert not any(".experts." in k for k in names)


def _mlx_lm_comparable(model):
    """mlx-lm's phimoe always uses the long factors and long_mscale: do the same here."""
    for layer in model.layers:
        layer.self_attn.rope.switch = True  # the long factors in the long regime ("by_length")
    return lambda ids: model(ids, long_rope=True)


def test_mlx_lm_loads_our_folder_with_same_logits(phimoe_checkpoint):
    from mlx_lm import load as mlx_lm_load

    _, out, _ = phimoe_checkpoint()
    ours = _mlx_lm_comparable(load(out)[0])
    theirs, _ = mlx_lm_load(str(out))
    ids = mx.array(_ids(50, 8))
    assert np.abs(np.array(ours(ids)) - np.array(theirs(ids))).max() <= TOL


@pytest.mark.parametrize("quantize", [False, True])
def test_we_load_mlx_lm_converted_folder(phimoe_checkpoint, tmp_path, quantize):
    from mlx_lm import convert as mlx_lm_convert
    from mlx_lm import load as mlx_lm_load

    src, _, _ = phimoe_checkpoint()
    theirs_dir = tmp_path / "mlx_lm"
    mlx_lm_convert(str(src), str(theirs_dir), quantize=quantize, dtype="float32")
    ours = _mlx_lm_comparable(load(theirs_dir)[0])
    theirs, _ = mlx_lm_load(str(theirs_dir))
    ids = mx.array(_ids(50, 11))
    assert np.abs(np.array(ours(ids)) - np.array(theirs(ids))).max() <= TOL


def _cosine(f, q):
    return float(((f * q).sum(-1) / (np.linalg.norm(f, axis=-1) * np.linalg.norm(q, axis=-1))).mean())


def test_four_bit_quantizes_experts(phimoe_checkpoint, tmp_path):
    from mlx_lm.models.switch_layers import QuantizedSwitchLinear

    src, out, _ = phimoe_checkpoint(near_tied=False)  # a 4-bit router flips near-tied routes
    q4 = tmp_path / "q4"
    convert(str(src), str(q4), quantize=True, q_bits=4, q_group_size=64, show_progress=False)
    qmodel, _ = load(q4)
    for name in ("gate_proj", "up_proj", "down_proj"):
        assert isinstance(getattr(_moe(qmodel).switch_mlp, name), QuantizedSwitchLinear)
    ids = mx.array(_ids(50, 9))
    f = np.array(load(out)[0](ids))[0]
    q = np.array(qmodel(ids).astype(mx.float32))[0]
    assert _cosine(f, q) >= 0.95
    if phimoe.MOE_ATTR == "block_sparse_moe":
        from mlx_lm import load as mlx_lm_load

        theirs, _ = mlx_lm_load(str(q4))
        ours = _mlx_lm_comparable(qmodel)
        assert np.abs(np.array(ours(ids)) - np.array(theirs(ids))).max() <= TOL


def test_export_hf_round_trip(phimoe_checkpoint, tmp_path, torch_mod):
    from transformers import AutoModelForCausalLM

    from phi3mlx.convert.mlx_to_hf import export_hf

    _, out, hf_model = phimoe_checkpoint()
    back = tmp_path / "hf"
    export_hf(str(out), str(back), show_progress=False)
    assert json.loads((back / "config.json").read_text())["architectures"] == ["PhimoeForCausalLM"]
    reloaded = AutoModelForCausalLM.from_pretrained(back).eval()
    assert type(reloaded).__name__ == "PhimoeForCausalLM"
    ids = _ids(50, 10)
    assert np.abs(_ref_logits(torch_mod, reloaded, ids) - _ref_logits(torch_mod, hf_model, ids)).max() <= 1e-5


def test_export_hf_dequantizes_experts(phimoe_checkpoint, tmp_path, torch_mod):
    from transformers import AutoModelForCausalLM

    from phi3mlx.convert.mlx_to_hf import _HF_ARCH, export_hf

    assert _HF_ARCH.get("phimoe") == "PhimoeForCausalLM"
    src, _, _ = phimoe_checkpoint(near_tied=False)
    q = tmp_path / "q4"
    convert(str(src), str(q), quantize=True, show_progress=False)
    cfg = json.loads((q / "config.json").read_text())
    cfg.pop("architectures", None)  # the architecture then comes from the model_type
    (q / "config.json").write_text(json.dumps(cfg))
    back = tmp_path / "hf"
    export_hf(str(q), str(back), show_progress=False)
    reloaded = AutoModelForCausalLM.from_pretrained(back).eval()
    assert type(reloaded).__name__ == "PhimoeForCausalLM"
    ids = _ids(50, 12)
    ours, _ = load(q)
    assert np.abs(np.array(ours(mx.array(ids))) - _ref_logits(torch_mod, reloaded, ids)).max() <= TOL


def test_config_problems_reported():
    from phi3mlx.models import parse_config
    from phi3mlx.errors import Phi3MLXError

    cfg = _tiny_cfg(num_experts_per_tok=5, phimoe_longrope="sometimes")
    with pytest.raises(Phi3MLXError) as e:
        parse_config(cfg)
    msg = str(e.value)
    assert "num_experts_per_tok" in msg and "phimoe_longrope" in msg
    ok = parse_config(_tiny_cfg())
    assert ok.norm == "layer" and ok.section.short_mscale == 1.1 and ok.section.long_mscale == 1.3
    assert ok.section.longrope_mode == "transformers"
