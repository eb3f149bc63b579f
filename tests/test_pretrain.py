"""phi3mlx pretrain: phases, the token cache, exact resume across a phase boundary, muP folding (the saved
folder matches transformers), schedules, weight-decay groups, other architectures and bad input."""

from __future__ import annotations

import errno
import json
import math
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import yaml
from mlx.utils import tree_flatten

from phi3mlx.cli import main
from phi3mlx.errors import Phi3MLXError
from phi3mlx.finetune import mup as M
from phi3mlx.finetune import pretrain as P
from phi3mlx.finetune.synthetic import textbook_documents
from phi3mlx.loader import load

from .helpers import assert_error

TINY_MODEL = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
              "max_position_embeddings": 64, "original_max_position_embeddings": 64}


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory) -> Path:
    """Two file sources: prose paragraphs (a text file per document) and textbook lessons (JSONL)."""
    root = tmp_path_factory.mktemp("corpus")
    docs = textbook_documents(400, seed=3)
    (root / "prose").mkdir()
    for i, d in enumerate(docs[:150]):
        (root / "prose" / f"doc{i:03d}.txt").write_text(d)
    with open(root / "lessons.jsonl", "w") as f:
        for d in docs[150:]:
            f.write(json.dumps({"text": d}) + "\n")
    return root


def config(corpus_dir: Path, tmp_path: Path, **over) -> P.PretrainConfig:
    raw = {
        "out": str(tmp_path / "run"),
        "model": dict(TINY_MODEL),
        "tokenizer": {"vocab_size": 320},
        "sources": {"prose": {"paths": [str(corpus_dir / "prose")]},
                    "lessons": {"paths": [str(corpus_dir / "lessons.jsonl")]}},
        "phases": [{"name": "one", "tokens": 6 * 4 * 32, "mix": {"prose": 1}},
                   {"name": "two", "tokens": 6 * 4 * 32, "mix": {"prose": 0.25, "lessons": 0.75}}],
        "seq_len": 32, "batch_size": 4, "lr": 3e-3, "warmup": 2, "val_every": 4, "val_batches": 2,
        "save_every": 4, "report_every": 2, "cache_dir": str(corpus_dir / "cache"),
    }
    raw.update(over)
    return P.PretrainConfig(**raw)


def params(model) -> dict:
    return {k: np.array(v) for k, v in tree_flatten(model.parameters())}


def test_resume_across_a_phase_boundary_is_exact(corpus_dir, tmp_path):
    """Stopped at step 4 (inside phase one, before the boundary at 6), resumed: the same weights, optimizer
    state and reports as the run that never stopped."""
    c = config(corpus_dir, tmp_path / "a")
    prep = P.prepare(c)
    assert prep.steps == [6, 6]
    full = P.run(prep)
    assert [r["phase"] for r in full if "loss" in r] == ["one"] * 3 + ["two"] * 3
    assert {"val_one_loss", "val_two_loss", "val_loss"} <= set(full[-1])
    assert full[-1]["val_loss"] == full[-1]["val_two_loss"]  # the current phase's set
    # validated every val_every (4) steps and at each phase's end (6, 12), with the ending phase's set
    assert [r["step"] for r in full if "val_loss" in r] == [4, 6, 8, 12]
    at6 = next(r for r in full if r["step"] == 6)
    assert at6["phase"] == "one" and at6["val_loss"] == at6["val_one_loss"]

    c2 = config(corpus_dir, tmp_path / "b")
    prep2 = P.prepare(c2)

    def stop(rec):
        if rec["step"] == 4:
            raise KeyboardInterrupt

    with pytest.raises(Phi3MLXError, match="interrupted at step 4"):
        P.run(prep2, report=stop)
    prep3 = P.prepare(c2, resume=True)
    resumed = P.run(prep3, resume=True)
    a, b = params(prep.model), params(prep3.model)
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=0, atol=1e-6, err_msg=k)
    assert [r["loss"] for r in full if "loss" in r] == pytest.approx([r["loss"] for r in resumed if "loss" in r],
                                                                   abs=1e-5)
    # the published folder is a normal model folder (tokenizer, config, loss curve, the recipe)
    out = Path(c2.out)
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "loss.png",
                 "pretrain.yaml", "metrics.jsonl"):
        assert (out / name).exists(), name
    assert yaml.safe_load((out / "pretrain.yaml").read_text())["phases"] == c2.phases
    model, tok = load(out)
    ids = tok.encode("So 47 + 38 = 85.", add_special_tokens=False)
    ours = prep3.model(mx.array([ids]))
    np.testing.assert_allclose(np.array(model(mx.array([ids]))), np.array(ours), atol=1e-5)


def test_a_pretrained_folder_fine_tunes_with_lora_and_dpo(corpus_dir, tmp_path):
    c = config(corpus_dir, tmp_path, phases=[{"name": "one", "tokens": 2 * 4 * 32, "mix": {"prose": 1}}])
    P.run(P.prepare(c))
    data = tmp_path / "data"
    data.mkdir()
    rows = [{"messages": [{"role": "user", "content": f"What is {i} + 1?"},
                          {"role": "assistant", "content": f"The answer is {i + 1}."}]} for i in range(8)]
    (data / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    pref = tmp_path / "pref"
    pref.mkdir()
    prows = [{"prompt": f"What is {i} + 1?", "chosen": f"The answer is {i + 1}.", "rejected": "No."} for i in range(8)]
    (pref / "train.jsonl").write_text("\n".join(json.dumps(r) for r in prows) + "\n")
    assert main(["lora", "--model", c.out, "--data", str(data), "--iters", "2", "--batch-size", "4",
                 "--adapter-path", str(tmp_path / "ad")]) == 0
    assert main(["dpo", "--model", c.out, "--data", str(pref), "--iters", "2", "--batch-size", "4",
                 "--adapter-path", str(tmp_path / "dpo")]) == 0
    assert (tmp_path / "dpo" / "adapters.safetensors").exists()


def test_token_cache_is_reused_and_keyed_by_the_files(corpus_dir, tmp_path):
    seen = []
    c = config(corpus_dir, tmp_path, cache_dir=str(tmp_path / "cache"),
               tokenizer={"vocab_size": 320, "sources": ["lessons"]})  # a new prose file keeps the tokenizer
    P.prepare(c, progress=lambda name, n: seen.append(name))
    assert set(seen) == {"prose", "lessons"}
    seen.clear()
    P.prepare(c, progress=lambda name, n: seen.append(name))
    assert seen == []  # both memory-mapped from the cache
    extra = tmp_path / "more.txt"
    extra.write_text("A new document about counting: one, two, three.\n" * 20)
    c.sources["prose"]["paths"].append(str(extra))
    P.prepare(c, progress=lambda name, n: seen.append(name))
    assert set(seen) == {"prose"}  # only the source whose files changed


def test_data_plan_mixes_by_weight_and_seeks(corpus_dir, tmp_path):
    c = config(corpus_dir, tmp_path, phases=[{"name": "mix", "tokens": 200 * 4 * 32,
                                              "mix": {"prose": 1, "lessons": 3}}])
    prep = P.prepare(c)
    b = prep.batches
    share = np.mean(b.row_source == b.names.index("lessons"))
    assert 0.7 < share < 0.8
    first = [np.array(next(b)[0]) for _ in range(7)]
    b.seek(5)
    np.testing.assert_array_equal(np.array(next(b)[0]), first[5])
    # windows are consecutive tokens of the stream: targets are the inputs shifted by one
    x, y, m = next(b)
    np.testing.assert_array_equal(np.array(x)[:, 1:], np.array(y)[:, :-1])
    assert float(m.sum()) == m.size


def test_schedules():
    for kind in ("wsd", "cosine", "constant"):
        c = P.PretrainConfig(lr=1.0, warmup=10, schedule=kind, min_lr_ratio=0.1, decay_fraction=0.2)
        f = P.make_schedule(c, 100)
        lrs = [float(f(s)) for s in range(100)]
        assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)  # linear warmup
        if kind == "wsd":
            assert lrs[10:80] == pytest.approx([1.0] * 70)  # stable
            assert lrs[99] == pytest.approx(0.1 + 0.9 * 1 / 20, abs=1e-6)  # linear decay over the last 20
        elif kind == "cosine":
            assert lrs[55] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 45 / 90)), abs=1e-6)
        else:
            assert lrs[10:] == pytest.approx([1.0] * 90)


def test_weight_decay_spares_embeddings_norms_biases_and_mup_scales_hidden_rates(corpus_dir, tmp_path):
    c = config(corpus_dir, tmp_path, mup=True, base_width=16, weight_decay=0.5, warmup=0, lr=0.1,
               model=dict(TINY_MODEL))
    prep = P.prepare(c)
    model, opt = prep.model, prep.optimizer
    before = params(model)
    opt.init(model.trainable_parameters())
    zero = {k: mx.zeros_like(v) for k, v in tree_flatten(model.trainable_parameters())}
    from mlx.utils import tree_unflatten
    opt.update(model, tree_unflatten(list(zero.items())))
    after = params(model)
    m = 32 / 16
    for k, v in before.items():
        group = M.group_of(k, v.ndim)
        if group in ("embedding", "vector"):
            np.testing.assert_array_equal(after[k], v, err_msg=k)  # no decay
        elif group == "hidden":  # p -= lr/m * wd * p
            np.testing.assert_allclose(after[k], v * (1 - 0.1 / m * 0.5), rtol=1e-6, err_msg=k)
        else:  # readout: decayed at the base rate (not divided by m)
            np.testing.assert_allclose(after[k], v * (1 - 0.1 * 0.5), rtol=1e-6, err_msg=k)
    assert before["lm_head.weight"].any()  # the readout starts drawn, so its decay above is a real check


def test_mup_folder_is_a_plain_phi3_checkpoint_matching_transformers(corpus_dir, tmp_path, torch_mod):
    """A muP model saves with its factors folded in: transformers' Phi3 (no muP) gives the training logits."""
    c = config(corpus_dir, tmp_path, mup=True, base_width=16,
               phases=[{"name": "one", "tokens": 4 * 4 * 32, "mix": {"prose": 1}}])
    prep = P.prepare(c)
    P.run(prep)
    out = Path(c.out)
    assert "logit_divisor" not in json.loads((out / "config.json").read_text())
    ids = [[5, 9, 40, 41, 100, 7, 8, 200, 33]]
    ours = np.array(prep.model(mx.array(ids)))  # muP config: 1/d attention, logits / m
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out), torch_dtype=torch_mod.float32).eval()
    with torch_mod.no_grad():
        ref = hf(torch_mod.tensor(ids)).logits.numpy()
    assert np.abs(ref - ours).max() <= 1e-4
    loaded, _ = load(out)
    assert np.abs(np.array(loaded(mx.array(ids))) - ours).max() <= 1e-4


@pytest.mark.parametrize("model_type", ["phi3small", "phimoe"])
def test_other_architectures_pretrain_into_loadable_folders(corpus_dir, tmp_path, model_type):
    model = {"model_type": model_type, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
             "max_position_embeddings": 128}
    if model_type == "phimoe":
        model.update(intermediate_size=32, num_local_experts=4)
    c = config(corpus_dir, tmp_path, model=model, phases=[{"name": "one", "tokens": 3 * 4 * 32, "mix": {"prose": 1}}])
    prep = P.prepare(c)
    hist = P.run(prep)
    assert math.isfinite(hist[-1]["loss"])
    loaded, tok = load(c.out)
    assert loaded.model_type == model_type
    ids = mx.array([tok.encode("Mount Caldor", add_special_tokens=False)])
    np.testing.assert_allclose(np.array(loaded(ids)), np.array(prep.model(ids)), atol=1e-5)
    # the folder goes through the other tools: convert, export-hf, generate
    assert main(["convert", "--hf-path", c.out, "--mlx-path", str(tmp_path / "conv")]) == 0
    assert main(["export-hf", "--mlx-path", str(tmp_path / "conv"), "--hf-path", str(tmp_path / "hf")]) == 0
    again, _ = load(tmp_path / "hf")
    np.testing.assert_allclose(np.array(again(ids)), np.array(prep.model(ids)), atol=1e-5)
    assert main(["generate", "--model", str(tmp_path / "conv"), "--prompt", "Where is", "--max-tokens", "3"]) == 0


# --------------------------------------------------------------------------------------- bad input


def write_yaml(tmp_path: Path, cfg: P.PretrainConfig, **over) -> Path:
    raw = dict(cfg.resolved(), **over)
    f = tmp_path / "cfg.yaml"
    f.write_text(yaml.safe_dump(raw))
    return f


def test_bad_settings_are_named_at_once_before_any_work(corpus_dir, tmp_path, capsys):
    c = config(corpus_dir, tmp_path)
    f = write_yaml(tmp_path, c, seq_len=100, phases=[{"name": "a", "tokens": 0, "mix": {"prose": 1}},
                                                     {"name": "b", "tokens": 10, "mix": {"prose": 0, "lessons": 0}},
                                                     {"name": "c", "tokens": 10, "mix": {"nope": 1}}],
                   model=dict(TINY_MODEL, hidden_size=30, num_attention_heads=4))
    code = main(["pretrain", "--config", str(f)])
    assert_error(code, capsys.readouterr().err, "seq_len 100 is longer than the model's 64 positions",
                 "hidden_size 30 is not divisible by model.num_attention_heads 4",
                 "phase 'a' has a token budget of 0", "phase 'b': the weights sum to 0",
                 "phase 'c' mixes unknown sources nope")
    assert not Path(c.out).exists()
    f.write_text(yaml.safe_dump(dict(c.resolved(), learning_rate=1.0)))
    assert_error(main(["pretrain", "--config", str(f)]), capsys.readouterr().err, "unknown keys learning_rate")


def test_empty_corpus_is_an_error(corpus_dir, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    c = config(corpus_dir, tmp_path, sources={"prose": {"paths": [str(empty)]}, "lessons": {"paths": [str(empty)]}},
               tokenizer={"vocab_size": 320, "sources": ["prose"]})
    with pytest.raises(Phi3MLXError, match="empty"):
        P.prepare(c)
    c = config(corpus_dir, tmp_path, sources={"prose": {"paths": [str(corpus_dir / "prose")]},
                                              "lessons": {"paths": [str(empty)]}},
               tokenizer={"vocab_size": 320, "sources": ["prose"]})
    code = main(["pretrain", "--config", str(write_yaml(tmp_path, c))])
    assert_error(code, capsys.readouterr().err, "source 'lessons' is empty")


def test_resume_with_another_config_names_the_difference(corpus_dir, tmp_path, capsys):
    c = config(corpus_dir, tmp_path, phases=[{"name": "one", "tokens": 4 * 4 * 32, "mix": {"prose": 1}}])
    P.run(P.prepare(c))
    f = write_yaml(tmp_path, c, lr=1e-3)
    code = main(["pretrain", "--config", str(f), "--resume", "--hidden-size", "64"])
    assert_error(code, capsys.readouterr().err, "another config", "lr: 0.003 in the checkpoint, 0.001 now",
                 "model.hidden_size: 32 in the checkpoint, 64 now")
    code = main(["pretrain", "--config", str(f)])
    assert_error(code, capsys.readouterr().err, "already holds", "--force", "--resume")


def test_a_full_disk_while_saving_keeps_the_last_good_checkpoint(corpus_dir, tmp_path, monkeypatch):
    c = config(corpus_dir, tmp_path)
    prep = P.prepare(c)
    real = mx.save_safetensors
    calls = {"n": 0}

    def flaky(path, arrays, *a, **k):
        if "checkpoint.tmp" in str(path) and "weights" in str(path):
            calls["n"] += 1
            if calls["n"] == 2:  # the second checkpoint (step 8)
                raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, arrays, *a, **k)

    monkeypatch.setattr(mx, "save_safetensors", flaky)
    with pytest.raises(Phi3MLXError, match=r"No space left on device; the last good checkpoint .* step 4"):
        P.run(prep)
    monkeypatch.setattr(mx, "save_safetensors", real)
    out = Path(c.out)
    assert not (out / "checkpoint.tmp").exists()
    state = json.loads((out / "checkpoint" / "trainer_state.json").read_text())
    assert state["step"] == 4
    load(out)  # the published folder of step 4 still loads
    prep2 = P.prepare(c, resume=True)
    hist = P.run(prep2, resume=True)
    assert hist[-1]["step"] == 12


@pytest.mark.slow
def test_two_processes_pretrain_like_one(corpus_dir, tmp_path):
    """mlx.launch -n 2 phi3mlx pretrain: the first process tokenizes, both train on their rows of every batch,
    and the run equals one process with the same global batch."""
    import shutil
    import subprocess
    import sys

    launch = Path(sys.executable).with_name("mlx.launch")
    if not launch.exists():
        launch = shutil.which("mlx.launch")
        if launch is None:
            pytest.skip("mlx.launch not found next to the interpreter")
    runs = {}
    for n in (1, 2):
        c = config(corpus_dir, tmp_path / f"n{n}", cache_dir=str(tmp_path / f"cache{n}"),
                   phases=[{"name": "one", "tokens": 4 * 4 * 32, "mix": {"prose": 1, "lessons": 1}}])
        f = tmp_path / f"n{n}.yaml"
        f.write_text(yaml.safe_dump(c.resolved()))
        cmd = [sys.executable, "-m", "phi3mlx", "pretrain", "--config", str(f)]
        r = subprocess.run(([str(launch), "-n", "2"] if n == 2 else []) + cmd, capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        out = r.stdout + r.stderr
        assert out.count("pretrain phi3:") == 1, out  # one header, from the first process
        runs[n] = (Path(c.out), [json.loads(x) for x in (Path(c.out) / "metrics.jsonl").read_text().splitlines()])
    (one, h1), (two, h2) = runs[1], runs[2]
    assert [r["loss"] for r in h1 if "loss" in r] == pytest.approx([r["loss"] for r in h2 if "loss" in r], abs=1e-4)
    w1, w2 = mx.load(str(one / "model.safetensors")), mx.load(str(two / "model.safetensors"))
    for k in w1:
        assert float(mx.abs(w1[k] - w2[k]).max()) <= 1e-3, k
