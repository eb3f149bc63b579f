"""Data-parallel training: 2 processes (mlx.launch) give the losses and weights of 1 process, same global batch."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("mlx.core")

from phi3mlx.tiny import make_tiny  # noqa: E402

SCRIPT = textwrap.dedent("""
    import json, os, sys
    import mlx.core as mx
    import mlx.optimizers as optim
    import numpy as np
    from mlx.utils import tree_flatten
    from phi3mlx import load
    from phi3mlx.finetune import lora
    from phi3mlx.finetune.losses import sft_loss
    from phi3mlx.finetune.trainer import TrainArgs, train

    def run(folder, out, B):
        os.makedirs(out, exist_ok=True)
        model, _ = load(folder)
        mx.random.seed(0)
        cfg = lora.apply_adapters(model, {"rank": 4, "alpha": 8.0})
        rng = np.random.default_rng(0)

        def batches():
            while True:
                x = rng.integers(5, 30000, (B, 17)).astype(np.int32)
                m = (rng.random((B, 16)) < 0.8).astype(np.float32)  # uneven token counts per row
                yield mx.array(x[:, :-1]), mx.array(x[:, 1:]), mx.array(m)

        seen = {"rows": 0}

        def loss(m, b):  # counts the rows this process trains on
            seen["rows"] += b[0].shape[0]
            return sft_loss(m, b)

        # SGD: the update is the gradient itself, so any difference in the summed gradients would show; Adam
        # divides by sqrt(v) and magnifies float rounding of near-zero gradients (losses then agree to ~6e-5)
        hist = train(model, loss, batches(), TrainArgs(iters=4, batch_size=B, grad_accum=2, report_every=1,
                     save_every=100, compile=False), out + "/ad", cfg, optimizer=optim.SGD(learning_rate=0.5))
        rank = mx.distributed.init().rank()
        json.dump(seen, open(out + f"/rows{rank}.json", "w"))
        if rank == 0:
            params = {k: np.array(v).tolist() for k, v in tree_flatten(model.trainable_parameters()) if "layers.1." in k}
            json.dump({"loss": [h["loss"] for h in hist], "params": params}, open(out + "/result.json", "w"))

    for B in sys.argv[3].split(","):  # one process trains each global batch size in turn
        run(sys.argv[1], sys.argv[2] + "/b" + B, int(B))
""")


def _launcher():
    launch = Path(sys.executable).with_name("mlx.launch")
    if not launch.exists() and not shutil.which("mlx.launch"):
        pytest.skip("mlx.launch not found next to the interpreter")
    return str(launch if launch.exists() else "mlx.launch")


@pytest.mark.slow
def test_two_processes_train_like_one(tmp_path):
    """Global batches of 4 (rows split 2 + 2) and of 3 (split 1 + 2, exact as well: token-weighted sums), each
    trained by one process and by two under mlx.launch (both sizes in the same processes)."""
    launch = _launcher()
    folder = make_tiny(tmp_path / "m", config={"hidden_size": 192, "num_attention_heads": 2, "num_key_value_heads": 1})
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    sizes = (4, 3)
    arg = ",".join(map(str, sizes))
    subprocess.run([sys.executable, str(script), str(folder), str(tmp_path / "one"), arg], check=True, timeout=300)
    r = subprocess.run([launch, "-n", "2", sys.executable, str(script), str(folder), str(tmp_path / "two"), arg],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    for batch in sizes:
        one_dir, two_dir = tmp_path / "one" / f"b{batch}", tmp_path / "two" / f"b{batch}"
        one = json.loads((one_dir / "result.json").read_text())
        two = json.loads((two_dir / "result.json").read_text())
        assert len(one["loss"]) == 4
        rows = lambda d, r: json.loads((d / f"rows{r}.json").read_text())["rows"]  # noqa: E731
        assert rows(one_dir, 0) == 4 * 2 * batch  # 4 steps of 2 micro-batches
        assert rows(two_dir, 0) == 4 * 2 * (batch // 2) and rows(two_dir, 1) == 4 * 2 * (batch - batch // 2)
        assert np.allclose(one["loss"], two["loss"], atol=1e-5, rtol=0), (batch, one["loss"], two["loss"])
        for k, v in one["params"].items():
            assert np.abs(np.array(v) - np.array(two["params"][k])).max() <= 1e-5, (batch, k)


@pytest.mark.slow
def test_cli_under_mlx_launch_prints_once_and_explains_a_small_last_batch(tmp_path):
    """phi3mlx lora on 2 processes: one header, one "adapters saved"; a last batch of an epoch smaller than the
    process count is refused before the model loads, saying so."""
    launch = _launcher()
    folder = make_tiny(tmp_path / "m", config={"hidden_size": 128, "num_attention_heads": 2, "num_key_value_heads": 1})
    rows = [{"text": f"example number {i} of a small data set"} for i in range(10)]
    for n in (9, 10):
        (tmp_path / f"d{n}").mkdir()
        (tmp_path / f"d{n}" / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows[:n]) + "\n")

    def lora(n):
        return subprocess.run([launch, "-n", "2", sys.executable, "-m", "phi3mlx", "lora", "--model", str(folder),
                               "--data", str(tmp_path / f"d{n}"), "--adapter-path", str(tmp_path / f"ad{n}"),
                               "--iters", "3", "--batch-size", "3", "--rank", "2", "--report-every", "1"],
                              capture_output=True, text=True, timeout=300)

    r = lora(9)  # batches of 3, shared 1 + 2
    assert r.returncode == 0, r.stderr[-2000:]
    err = r.stdout + r.stderr
    assert err.count("lora: 9 training examples") == 1, err
    assert err.count("adapters saved to") == 1, err
    assert len([ln for ln in err.splitlines() if ln.startswith("step 3/3: loss")]) == 1, err
    assert (tmp_path / "ad9" / "adapters.safetensors").exists()
    r = lora(10)  # 10 = 3 + 3 + 3 + 1: the last batch cannot be shared by 2 (mlx.launch itself exits 0)
    assert ("with 10 examples and --batch-size 3 the last batch of each epoch holds 1, fewer than the 2 processes "
            "that share it") in r.stdout + r.stderr
    assert "Traceback" not in r.stdout + r.stderr
    assert not (tmp_path / "ad10").exists()
