"""Bad input gets one clear line ``phi3mlx: error: ...`` (exit 1), no traceback, nothing half-written.

Everything goes through the command line: ``phi3mlx.cli.main([...])`` in process (stderr captured
with capsys) and, for a few cases, ``python -m phi3mlx.cli`` in a subprocess to prove that no
traceback reaches the user. Broken models are copies of the tiny random folder (``tiny_folder``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest

import phi3mlx.convert.hf_to_mlx as hf_to_mlx
import phi3mlx.convert.mlx_to_hf as mlx_to_hf
from phi3mlx.cli import main

from .helpers import assert_error

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- helpers


def cli(capsys, *args):
    """Run the CLI in process; return (exit code, stdout, stderr)."""
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def cli_err(capsys, *args):
    """Run the CLI in process; return (exit code, stderr)."""
    code, _, err = cli(capsys, *args)
    return code, err


def cli_subprocess(*args, stdin=None):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return subprocess.run([sys.executable, "-m", "phi3mlx.cli", *map(str, args)], capture_output=True, text=True,
                          env=env, input=stdin, timeout=120)




def leftovers(parent: Path, name: str = "OUT") -> list[str]:
    """Temporary / backup folders that atomic writes leave beside ``parent/name`` on failure."""
    return sorted(p.name for p in Path(parent).iterdir() if p.name.startswith((f".{name}.tmp-", f".{name}.old-")))


def assert_nothing_written(out: Path):
    assert not out.exists(), f"{out} was created"
    if out.parent.exists():
        assert leftovers(out.parent, out.name) == []


def copy_model(src: Path, tmp_path: Path, name: str = "model", link_weights: bool = True) -> Path:
    """Copy a model folder; the (large) safetensors files are hard links unless ``link_weights`` is False.

    A linked weight file is shared with ``src``: replace it (unlink, then write), never edit it in place.
    """
    def copy(a, b):
        if link_weights and a.endswith(".safetensors"):
            try:
                return os.link(a, b)
            except OSError:
                pass
        return shutil.copy2(a, b)

    dst = tmp_path / name
    shutil.copytree(src, dst, copy_function=copy)
    return dst


def edit_config(folder: Path, **changes) -> None:
    f = folder / "config.json"
    cfg = json.loads(f.read_text())
    for k, v in changes.items():
        if v is _DROP:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    f.write_text(json.dumps(cfg, indent=2))


_DROP = object()


def edit_weights(folder: Path, fn) -> None:
    f = folder / "model.safetensors"
    w = dict(mx.load(str(f)))
    fn(w)
    mx.eval(list(w.values()))
    f.unlink()
    mx.save_safetensors(str(f), w, metadata={"format": "pt"})


@pytest.fixture(scope="module", autouse=True)
def _tiny_folder_untouched(tiny_folder):
    """The shared tiny folder (hard-linked into copies) must come out of this module unchanged."""
    before = {f.name: (f.stat().st_size, f.stat().st_mtime_ns) for f in tiny_folder.iterdir()}
    yield
    after = {f.name: (f.stat().st_size, f.stat().st_mtime_ns) for f in tiny_folder.iterdir()}
    assert after == before, "a test modified the shared tiny folder"


@pytest.fixture(scope="module")
def mlx_folder(tmp_path_factory, tiny_folder):
    """The tiny model converted to an MLX folder once (input for export-hf)."""
    out = tmp_path_factory.mktemp("mlx") / "tiny-mlx"
    hf_to_mlx.convert(str(tiny_folder), str(out), show_progress=False)
    return out


# ---------------------------------------------------------------- 1. missing path


def test_generate_missing_model_path(capsys):
    assert_error(*cli_err(capsys, "generate", "--model", "/nonexistent", "--prompt", "hi"), "/nonexistent",
                 "not found")


def test_convert_missing_hf_path(capsys, tmp_path):
    out = tmp_path / "OUT"
    assert_error(*cli_err(capsys, "convert", "--hf-path", "/nonexistent", "--mlx-path", out), "/nonexistent",
                 "not found")
    assert_nothing_written(out)


def test_export_missing_mlx_path(capsys, tmp_path):
    out = tmp_path / "OUT"
    assert_error(*cli_err(capsys, "export-hf", "--mlx-path", tmp_path / "nope", "--hf-path", out), "nope",
                 "not found")
    assert_nothing_written(out)


def test_missing_path_subprocess_has_no_traceback(tmp_path):
    r = cli_subprocess("generate", "--model", "/nonexistent", "--prompt", "hi")
    assert_error(r.returncode, r.stderr, "/nonexistent")
    assert r.stdout == ""


# ---------------------------------------------------------------- 2. hub id while offline


def test_convert_hub_id_offline(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)  # so that "someorg/some-model" is not a local folder
    out = tmp_path / "OUT"
    line = assert_error(*cli_err(capsys, "convert", "--hf-path", "someorg/some-model", "--mlx-path", out),
                        "someorg/some-model", "local folder")
    assert "offline" in line
    assert_nothing_written(out)


def test_generate_hub_id_offline_subprocess(tmp_path):
    r = subprocess.run([sys.executable, "-m", "phi3mlx.cli", "generate", "--model", "someorg/some-model",
                        "--prompt", "hi"], capture_output=True, text=True, cwd=tmp_path, timeout=120,
                       env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert_error(r.returncode, r.stderr, "someorg/some-model", "local folder")


# ---------------------------------------------------------------- 3. unsupported model_type


def test_unsupported_model_type(capsys, tmp_path, tiny_folder):
    m = copy_model(tiny_folder, tmp_path)
    edit_config(m, model_type="llama")
    line = assert_error(*cli_err(capsys, "generate", "--model", m, "--prompt", "hi"), "llama", "phi3",
                        str(m / "config.json"))
    assert "supported" in line
    out = tmp_path / "OUT"
    assert_error(*cli_err(capsys, "convert", "--hf-path", m, "--mlx-path", out), "llama", "phi3")
    assert_nothing_written(out)


def test_config_without_model_type(capsys, tmp_path, tiny_folder):
    m = copy_model(tiny_folder, tmp_path)
    edit_config(m, model_type=_DROP)
    assert_error(*cli_err(capsys, "generate", "--model", m, "--prompt", "hi"), "model_type", "phi3")


# ---------------------------------------------------------------- 4. config missing keys / bad config


def test_config_missing_keys_named_together(capsys, tmp_path, tiny_folder):
    m = copy_model(tiny_folder, tmp_path)
    edit_config(m, hidden_size=_DROP, vocab_size=_DROP)
    assert_error(*cli_err(capsys, "generate", "--model", m, "--prompt", "hi"), "hidden_size", "vocab_size",
                 "missing", "config.json")
    out = tmp_path / "OUT"
    assert_error(*cli_err(capsys, "convert", "--hf-path", m, "--mlx-path", out), "hidden_size", "vocab_size")
    assert_nothing_written(out)


@pytest.mark.parametrize(
    "text, needles",
    [
        ("{not json", ["config.json", "not valid JSON"]),
        ("[1, 2, 3]", ["config.json", "JSON object"]),
        ('{"model_type": "phi3", "hidden_size": "big"}', ["hidden_size", "'big'"]),
    ],
    ids=["garbage", "not-an-object", "wrong-type"],
)
def test_broken_config_json(capsys, tmp_path, tiny_folder, text, needles):
    m = copy_model(tiny_folder, tmp_path)
    (m / "config.json").write_text(text)
    assert_error(*cli_err(capsys, "generate", "--model", m, "--prompt", "hi"), *needles)


@pytest.mark.parametrize(
    "changes, needles",
    [
        (dict(rope_scaling="longrope"), ["rope_scaling"]),
        (dict(max_position_embeddings="lots"), ["max_position_embeddings", "'lots'"]),
        (dict(rope_theta="fast"), ["rope_theta", "'fast'"]),
        (dict(quantization=4), ["quantization", "4"]),
        (dict(num_key_value_heads=3), ["num_key_value_heads", "3"]),
    ],
    ids=["rope-scaling-string", "max-pos-string", "rope-theta-string", "quantization-int", "kv-heads-indivisible"],
)
def test_bad_config_values(capsys, tmp_path, tiny_folder, changes, needles):
    m = copy_model(tiny_folder, tmp_path)
    edit_config(m, **changes)
    assert_error(*cli_err(capsys, "generate", "--model", m, "--prompt", "hi"), "config.json", *needles)


def test_folder_without_config(capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    assert_error(*cli_err(capsys, "generate", "--model", tmp_path / "empty", "--prompt", "hi"), "config.json",
                 "empty")


def test_model_path_is_a_file(capsys, tmp_path):
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"x")
    assert_error(*cli_err(capsys, "generate", "--model", f, "--prompt", "hi"), str(f), "not a folder")


# ---------------------------------------------------------------- 5. missing / misshapen tensors


TENSOR = "model.layers.1.mlp.down_proj.weight"


def test_missing_tensor(capsys, tmp_path, tiny_folder):
    m = copy_model(tiny_folder, tmp_path)
    edit_weights(m, lambda w: w.pop(TENSOR))
    assert_error(*cli_err(capsys, "generate", "--model", m, "--prompt", "hi"), TENSOR, "missing")
    out = tmp_path / "OUT"
    assert_error(*cli_err(capsys, "convert", "--hf-path", m, "--mlx-path", out), TENSOR, "missing")
    assert_nothing_written(out)


def test_wrong_shape_tensor(capsys, tmp_path, tiny_folder):
    m = copy_model(tiny_folder, tmp_path)
    w = mx.load(str(m / "model.safetensors"))
    good = tuple(w[TENSOR].shape)
    bad = (good[0], good[1] - 8)
    del w

    def shrink(w):
        w[TENSOR] = w[TENSOR][:, : bad[1]]

    edit_weights(m, shrink)
    assert_error(*cli_err(capsys, "generate", "--model", m, "--prompt", "hi"), TENSOR, str(good), str(bad))
    out = tmp_path / "OUT"
    assert_error(*cli_err(capsys, "convert", "--hf-path", m, "--mlx-path", out), TENSOR, str(good), str(bad))
    assert_nothing_written(out)


def test_unexpected_tensor(capsys, tmp_path, tiny_folder):
    m = copy_model(tiny_folder, tmp_path)
    edit_weights(m, lambda w: w.__setitem__("model.layers.9.foo.weight", mx.zeros((2, 2))))
    assert_error(*cli_err(capsys, "generate", "--model", m, "--prompt", "hi"), "model.layers.9.foo.weight",
                 "unexpected")


def test_no_weights(capsys, tmp_path, tiny_folder):
    m = copy_model(tiny_folder, tmp_path)
    for f in m.glob("model.safetensors*"):
        f.unlink()
    (m / "pytorch_model.bin").write_bytes(b"x")
    assert_error(*cli_err(capsys, "generate", "--model", m, "--prompt", "hi"), "safetensors", "pytorch_model.bin")


def test_shard_named_in_index_is_missing(capsys, tmp_path, tiny_folder):
    m = copy_model(tiny_folder, tmp_path)
    (m / "model.safetensors").unlink()
    assert_error(*cli_err(capsys, "generate", "--model", m, "--prompt", "hi"), "model.safetensors", "missing")


# ---------------------------------------------------------------- 6. corrupt files


@pytest.mark.parametrize("how", ["truncated", "garbage", "empty"])
def test_corrupt_safetensors(capsys, tmp_path, tiny_folder, how):
    m = copy_model(tiny_folder, tmp_path, link_weights=how != "truncated")
    f = m / "model.safetensors"
    if how == "truncated":
        with open(f, "r+b") as fh:
            fh.truncate(f.stat().st_size - 1000)
    else:
        f.unlink()  # a hard link to the shared tiny folder: replace, never overwrite
        f.write_bytes(b"this is not a safetensors file" * 10 if how == "garbage" else b"")
    assert_error(*cli_err(capsys, "generate", "--model", m, "--prompt", "hi"), str(f), "corrupt")
    out = tmp_path / "OUT"
    assert_error(*cli_err(capsys, "convert", "--hf-path", m, "--mlx-path", out), str(f))
    assert_nothing_written(out)


def test_corrupt_safetensors_subprocess(tmp_path, tiny_folder):
    m = copy_model(tiny_folder, tmp_path, link_weights=False)
    f = m / "model.safetensors"
    with open(f, "r+b") as fh:
        fh.truncate(f.stat().st_size // 2)
    r = cli_subprocess("convert", "--hf-path", m, "--mlx-path", tmp_path / "OUT")
    assert_error(r.returncode, r.stderr, str(f))
    assert_nothing_written(tmp_path / "OUT")


def test_corrupt_index(capsys, tmp_path, tiny_folder):
    m = copy_model(tiny_folder, tmp_path)
    (m / "model.safetensors.index.json").write_text("{oops")
    assert_error(*cli_err(capsys, "generate", "--model", m, "--prompt", "hi"), "model.safetensors.index.json")


def test_corrupt_generation_config(capsys, tmp_path, tiny_folder):
    m = copy_model(tiny_folder, tmp_path)
    (m / "generation_config.json").write_text("{oops")
    assert_error(*cli_err(capsys, "generate", "--model", m, "--prompt", "hi"), "generation_config.json")


def test_convert_without_tokenizer_leaves_nothing(capsys, tmp_path, tiny_folder):
    m = copy_model(tiny_folder, tmp_path)
    (m / "tokenizer.json").unlink()
    (m / "tokenizer_config.json").unlink()
    out = tmp_path / "OUT"
    assert_error(*cli_err(capsys, "convert", "--hf-path", m, "--mlx-path", out), "tokenizer", str(m))
    assert_nothing_written(out)


# ---------------------------------------------------------------- 7. existing output folder


def _existing(tmp_path) -> Path:
    out = tmp_path / "OUT"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    return out


def test_convert_existing_output_needs_force(capsys, tmp_path, tiny_folder):
    out = _existing(tmp_path)
    assert_error(*cli_err(capsys, "convert", "--hf-path", tiny_folder, "--mlx-path", out), str(out),
                 "already exists", "--force")
    assert (out / "keep.txt").read_text() == "old"
    assert leftovers(tmp_path) == []

    code, stdout, err = cli(capsys, "convert", "--hf-path", tiny_folder, "--mlx-path", out, "--force")
    assert code == 0, err
    assert not (out / "keep.txt").exists()
    assert (out / "config.json").exists() and (out / "model.safetensors").exists()
    assert leftovers(tmp_path) == []


def test_export_existing_output_needs_force(capsys, tmp_path, mlx_folder):
    out = _existing(tmp_path)
    assert_error(*cli_err(capsys, "export-hf", "--mlx-path", mlx_folder, "--hf-path", out), str(out),
                 "already exists", "--force")
    assert (out / "keep.txt").read_text() == "old"

    code, stdout, err = cli(capsys, "export-hf", "--mlx-path", mlx_folder, "--hf-path", out, "--force")
    assert code == 0, err
    assert not (out / "keep.txt").exists()
    assert json.loads((out / "config.json").read_text())["architectures"] == ["Phi3ForCausalLM"]
    assert leftovers(tmp_path) == []


def test_output_path_is_a_file(capsys, tmp_path, tiny_folder):
    out = tmp_path / "OUT"
    out.write_text("a file")
    assert_error(*cli_err(capsys, "convert", "--hf-path", tiny_folder, "--mlx-path", out, "--force"), str(out),
                 "not a folder")
    assert out.read_text() == "a file"
    assert leftovers(tmp_path) == []


def test_output_in_unwritable_place(capsys, tmp_path, tiny_folder):
    parent = tmp_path / "file"
    parent.write_text("x")
    out = parent / "OUT"  # parent is a file: the folder cannot be made
    assert_error(*cli_err(capsys, "convert", "--hf-path", tiny_folder, "--mlx-path", out), str(parent))


# ---------------------------------------------------------------- 8. empty prompt


@pytest.mark.parametrize("prompt", ["", "   ", "\n\t"])
def test_empty_prompt(capsys, tiny_folder, prompt):
    assert_error(*cli_err(capsys, "generate", "--model", tiny_folder, "--prompt", prompt), "prompt", "empty")


def test_empty_prompt_from_stdin_subprocess(tiny_folder):
    r = cli_subprocess("generate", "--model", tiny_folder, "--prompt", "-", stdin="  \n")
    assert_error(r.returncode, r.stderr, "prompt", "empty")


# ---------------------------------------------------------------- 9. prompt longer than the context


def test_prompt_longer_than_context(capsys, tmp_path, tiny_folder):
    m = copy_model(tiny_folder, tmp_path)
    edit_config(m, max_position_embeddings=64, original_max_position_embeddings=64, sliding_window=63)
    prompt = " ".join(["hello"] * 100)
    code, stdout, err = cli(capsys, "generate", "--model", m, "--prompt", prompt, "--raw", "-m", "2")
    line = assert_error(code, err, "64", "context")
    n = [int(t) for t in line.split() if t.isdigit()]
    assert 64 in n and any(x > 64 for x in n), line


# ---------------------------------------------------------------- 10. bad flags


def test_unknown_flag_subprocess():
    r = cli_subprocess("generate", "--prompt", "hi", "--bogus")
    assert_error(r.returncode, r.stderr, "generate: unrecognized arguments: --bogus", "phi3mlx generate --help")
    assert "usage:" not in r.stderr


def test_unknown_flag_in_process(capsys):
    assert_error(*cli_err(capsys, "generate", "--prompt", "hi", "--bogus"), "--bogus", "phi3mlx generate --help")


@pytest.mark.parametrize(
    "args, needles",
    [
        (["--max-tokens", "0"], ["--max-tokens", "0"]),
        (["--temp", "-1"], ["--temp", "-1"]),
        (["--top-p", "2"], ["--top-p", "2"]),
        (["--top-k", "-5"], ["--top-k", "-5"]),
        (["--min-p", "3"], ["--min-p", "3"]),
        (["--prefill-step-size", "0"], ["--prefill-step-size", "0"]),
        (["--repetition-penalty", "-1"], ["--repetition-penalty", "-1"]),
        (["-m", "-1", "--temp", "-2"], ["--max-tokens", "--temp", "; "]),  # all problems in one line
    ],
    ids=["max-tokens", "temp", "top-p", "top-k", "min-p", "prefill", "repetition", "two-at-once"],
)
def test_bad_sampling_flags(capsys, tiny_folder, args, needles):
    assert_error(*cli_err(capsys, "generate", "--model", tiny_folder, "--prompt", "hi", *args), *needles)


def test_bad_flag_value_type_is_argparse_error(capsys):
    assert_error(*cli_err(capsys, "generate", "--prompt", "hi", "--max-tokens", "many"), "--max-tokens", "'many'")


def test_convert_bad_context(capsys, tmp_path, tiny_folder):
    out = tmp_path / "OUT"
    assert_error(*cli_err(capsys, "convert", "--hf-path", tiny_folder, "--mlx-path", out, "--context", "-5"),
                 "--context", "-5")
    assert_nothing_written(out)


def test_error_with_newlines_is_printed_as_one_line(capsys, monkeypatch):
    from phi3mlx import cli as cli_mod
    from phi3mlx.errors import Phi3MLXError

    def boom(a):
        raise Phi3MLXError("first part\n  second part\n")

    monkeypatch.setitem(cli_mod.COMMANDS, "generate", boom)
    line = assert_error(*cli_err(capsys, "generate", "--prompt", "hi"), "first part second part")
    assert line == "phi3mlx: error: first part second part"


@pytest.mark.parametrize(
    "args, needles",
    [
        (["--q-bits", "3"], ["--q-bits", "3"]),
        (["--q-group-size", "17"], ["--q-group-size", "17"]),
    ],
)
def test_bad_quant_flags(capsys, tmp_path, tiny_folder, args, needles):
    out = tmp_path / "OUT"
    assert_error(*cli_err(capsys, "convert", "--hf-path", tiny_folder, "--mlx-path", out, "-q", *args), *needles)
    assert_nothing_written(out)


# ---------------------------------------------------------------- 11. interrupted writes


def _failing_save(exc):
    real = hf_to_mlx.save_weights

    def save(folder, *a, **k):
        real(folder, *a, **k)  # the shards are on disk: the failure comes mid-write
        assert any(Path(folder).glob("*.safetensors"))
        raise exc

    return save


def test_convert_interrupted_leaves_nothing(capsys, tmp_path, tiny_folder, monkeypatch):
    monkeypatch.setattr(hf_to_mlx, "save_weights", _failing_save(KeyboardInterrupt()))
    out = tmp_path / "OUT"
    code, stdout, err = cli(capsys, "convert", "--hf-path", tiny_folder, "--mlx-path", out)
    assert code == 130
    assert "interrupted" in err and "Traceback" not in err
    assert_nothing_written(out)


def test_convert_crash_leaves_nothing(capsys, tmp_path, tiny_folder, monkeypatch):
    monkeypatch.setattr(hf_to_mlx, "save_weights", _failing_save(RuntimeError("boom")))
    out = tmp_path / "OUT"
    with pytest.raises(RuntimeError, match="boom"):  # a bug, not bad input: the traceback is wanted
        main(["convert", "--hf-path", str(tiny_folder), "--mlx-path", str(out)])
    assert_nothing_written(out)


def test_convert_disk_error_is_one_line(capsys, tmp_path, tiny_folder, monkeypatch):
    monkeypatch.setattr(hf_to_mlx, "save_weights", _failing_save(OSError(28, "No space left on device")))
    out = tmp_path / "OUT"
    assert_error(*cli_err(capsys, "convert", "--hf-path", tiny_folder, "--mlx-path", out), "No space left")
    assert_nothing_written(out)


def test_config_write_interrupted_leaves_nothing(capsys, tmp_path, tiny_folder, monkeypatch):
    real = Path.write_text

    def write_text(self, *a, **k):
        if self.name == "config.json" and self.parent.name.startswith(".OUT.tmp-"):
            real(self, "{", *a[1:], **k)  # half-written
            raise KeyboardInterrupt
        return real(self, *a, **k)

    monkeypatch.setattr(Path, "write_text", write_text)
    out = tmp_path / "OUT"
    code, _, err = cli(capsys, "convert", "--hf-path", tiny_folder, "--mlx-path", out)
    assert code == 130
    assert_nothing_written(out)


@pytest.mark.parametrize("exc", [KeyboardInterrupt(), RuntimeError("boom")], ids=["ctrl-c", "crash"])
def test_forced_convert_failing_keeps_existing_output(capsys, tmp_path, tiny_folder, monkeypatch, exc):
    out = _existing(tmp_path)
    monkeypatch.setattr(hf_to_mlx, "save_weights", _failing_save(exc))
    with pytest.raises(RuntimeError) if isinstance(exc, RuntimeError) else _nullcontext():
        code = main(["convert", "--hf-path", str(tiny_folder), "--mlx-path", str(out), "--force"])
        assert code == 130
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert (out / "keep.txt").read_text() == "old"
    assert leftovers(tmp_path) == []


def test_forced_export_failing_keeps_existing_output(capsys, tmp_path, mlx_folder, monkeypatch):
    out = _existing(tmp_path)
    real = mlx_to_hf.save_weights

    def save(folder, *a, **k):
        real(folder, *a, **k)
        raise KeyboardInterrupt

    monkeypatch.setattr(mlx_to_hf, "save_weights", save)
    code, _, err = cli(capsys, "export-hf", "--mlx-path", mlx_folder, "--hf-path", out, "--force")
    assert code == 130
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert leftovers(tmp_path) == []


def test_failed_final_rename_restores_existing_output(capsys, tmp_path, tiny_folder, monkeypatch):
    """If moving the new folder into place fails, the old one is put back."""
    out = _existing(tmp_path)
    real = Path.rename

    def rename(self, target):
        if self.name.startswith(".OUT.tmp-"):
            raise OSError(13, "Permission denied", str(target))
        return real(self, target)

    monkeypatch.setattr(Path, "rename", rename)
    assert_error(*cli_err(capsys, "convert", "--hf-path", tiny_folder, "--mlx-path", out, "--force"),
                 "Permission denied", str(out))
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert leftovers(tmp_path) == []


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
