"""Reading, checking and atomically writing safetensors model folders."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .errors import Phi3MLXError

MAX_SHARD_BYTES = 5 * 1024**3
INDEX_NAME = "model.safetensors.index.json"


def safetensors_files(path: Path) -> list[Path]:
    """The weight files of a folder: those named by its index, else every *.safetensors."""
    index = path / INDEX_NAME
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise Phi3MLXError(f"{index}: not a valid safetensors index ({e})") from None
        files = sorted({path / f for f in weight_map.values()})
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise Phi3MLXError(f"{path}: shard(s) named in {INDEX_NAME} are missing: {', '.join(missing)}")
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        others = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.pt")]
        hint = f" (found {', '.join(others[:3])}: only safetensors are read)" if others else ""
        raise Phi3MLXError(f"no *.safetensors weights in {path}{hint}")
    return files


def read_weights(path: Path) -> dict[str, mx.array]:
    weights: dict[str, mx.array] = {}
    for f in safetensors_files(path):
        try:
            part = mx.load(str(f))
        except Exception as e:  # mlx raises RuntimeError/ValueError with a C++ message
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise Phi3MLXError(f"{f}: corrupt or unreadable safetensors file ({msg})") from None
        weights.update(part)
    return weights


def check_weights(model: nn.Module, weights: dict[str, mx.array], source: str) -> None:
    """Every parameter present with the right shape, nothing unexpected; all problems at once."""
    expected = dict(tree_flatten(model.parameters()))
    problems = []
    missing = [k for k in expected if k not in weights]
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        problems.append(f"missing tensor(s) {', '.join(missing[:5])}{more}")
    for k, v in expected.items():
        if k in weights and tuple(weights[k].shape) != tuple(v.shape):
            problems.append(f"tensor {k} has shape {tuple(weights[k].shape)}, expected {tuple(v.shape)}")
    extra = [k for k in weights if k not in expected]
    if extra:
        more = f" and {len(extra) - 5} more" if len(extra) > 5 else ""
        problems.append(f"unexpected tensor(s) {', '.join(extra[:5])}{more}")
    if problems:
        raise Phi3MLXError.many(problems, f"{source}: ")


@contextlib.contextmanager
def atomic_dir(out: Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``out``; rename it to ``out`` only when the block succeeds.

    On any failure (or Ctrl-C) the temporary folder is removed and ``out`` is left as it was. The folder
    gets the permissions ``mkdir`` would give it (0o777 less the umask), not mkdtemp's private 0o700.
    """
    out = Path(out)
    check_output(out, force)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    except OSError as e:
        raise Phi3MLXError(f"cannot create the output folder {out}: {e.strerror or e}") from None
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private (0o700); the result is a normal folder
        yield tmp
        if out.exists():
            old = out.with_name(f".{out.name}.old-{tmp.name[-8:]}")
            out.rename(old)
            try:
                tmp.rename(out)
            except BaseException:
                old.rename(out)  # put the previous folder back
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except OSError as e:  # disk full, permissions, ...: one line, nothing left behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise Phi3MLXError(f"cannot write {out}: {_os_message(e)}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _umask() -> int:
    """The process's file-creation mask (read by setting it and putting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def check_output(out: Path, force: bool = False) -> None:
    """Fail early (before any work) if ``out`` cannot be written."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise Phi3MLXError(f"output path {out} exists and is not a folder")
    if out.exists() and not force:
        raise Phi3MLXError(f"output folder {out} already exists (pass --force to replace it)")
    parent = next((p for p in out.absolute().parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise Phi3MLXError(f"cannot create the output folder {out}: {parent} is not a folder")


def _os_message(e: OSError) -> str:
    if e.strerror:
        return f"{e.strerror}: {e.filename}" if e.filename else e.strerror
    return str(e) or type(e).__name__


def save_weights(
    folder: Path, weights: dict[str, mx.array], progress=None, max_shard_bytes: int = MAX_SHARD_BYTES, fmt: str = "mlx"
) -> int:
    """Write ``weights`` as shards of at most ``max_shard_bytes`` plus an index; return total bytes.

    ``fmt`` is the safetensors "format" tag: "mlx" for our folders, "pt" for Hugging Face ones.
    """
    shards: list[dict[str, mx.array]] = [{}]
    size = 0
    for k in sorted(weights):
        v = weights[k]
        if size and size + v.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = v
        size += v.nbytes
    n = len(shards)
    weight_map, total = {}, 0
    task = progress.add_task("writing shards", total=n) if progress else None
    for i, shard in enumerate(shards):
        name = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        mx.eval(list(shard.values()))
        mx.save_safetensors(str(folder / name), shard, metadata={"format": fmt})
        for k in shard:
            weight_map[k] = name
        total += sum(v.nbytes for v in shard.values())
        if task is not None:
            progress.advance(task)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / INDEX_NAME).write_text(json.dumps(index, indent=2))
    return total


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))
