"""What a new user meets on the command line: bad text, ignored flags, the random default model, noise on
import, argparse's errors, folder permissions, help text, and how cli.py is put together."""

from __future__ import annotations

import argparse
import ast
import io
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

mx = pytest.importorskip("mlx.core")

from phi3mlx import generate, load  # noqa: E402
from phi3mlx.cli import TINY_NOTICE, build_parser, main  # noqa: E402
from phi3mlx.errors import Phi3MLXError  # noqa: E402
from phi3mlx.weights import atomic_dir  # noqa: E402

from .helpers import assert_error as assert_one_error  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def cli(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err




def run_python(code: str, *args, stdin: bytes | None = None, env: dict | None = None):
    """``python -c code args`` in a subprocess; returns CompletedProcess with bytes output."""
    e = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", **(env or {}))
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, env=e, input=stdin, timeout=180)


CLI = "import sys; from phi3mlx.cli import main; sys.exit(main(sys.argv[1:]))"


class _BytesStdin(io.TextIOWrapper):
    """A strict UTF-8 text stdin over bytes (as a UTF-8 terminal or pipe gives), not a tty."""

    def __init__(self, data: bytes):
        super().__init__(io.BytesIO(data), encoding="utf-8", errors="strict")

    def isatty(self):
        return False


# ---------------------------------------------------------------- 1. text that is not UTF-8
# Chosen behaviour: refused with one line naming the first bad byte and where it is; never altered.


def test_prompt_argument_with_bad_bytes(capsys, tiny_folder):
    # what Python makes of the argument bytes b"a\xffb": a surrogate escape
    line = assert_one_error(*cli(capsys, "generate", "--model", tiny_folder, "-p", "a\udcffb")[::2],
                            "the prompt (--prompt)", "not valid UTF-8", "byte 0xff", "character 1")
    assert "Traceback" not in line


def test_prompt_and_system_named_together(capsys, tiny_folder):
    assert_one_error(*cli(capsys, "generate", "--model", tiny_folder, "-p", "\udcfe", "--system", "ok \udc80")[::2],
                     "--prompt", "byte 0xfe", "--system", "byte 0x80 at character 3", "; ")


def test_prompt_on_stdin_with_bad_bytes(capsys, tiny_folder, monkeypatch):
    monkeypatch.setattr(sys, "stdin", _BytesStdin(b"hello \xff\xfe there"))
    assert_one_error(*cli(capsys, "generate", "--model", tiny_folder, "-p", "-")[::2],
                     "the prompt read from stdin", "not valid UTF-8", "byte 0xff at character 6")


@pytest.mark.parametrize("how", ["stdin", "argv"])
def test_bad_bytes_subprocess_no_traceback(tiny_folder, how):
    """Both ways a user passes such bytes, in a UTF-8 locale where stdin decodes strictly."""
    args = [b"generate", b"--model", str(tiny_folder).encode(), b"-p", b"-" if how == "stdin" else b"caf\xe9"]
    r = run_python(CLI, *args, stdin=b"caf\xe9\n" if how == "stdin" else None, env={"LC_ALL": "C.UTF-8"})
    err = r.stderr.decode()
    assert "Traceback" not in err
    assert_one_error(r.returncode, err, "not valid UTF-8", "byte 0xe9 at character 3")
    assert r.stdout == b""


def test_chat_line_with_bad_bytes_is_one_line(capsys, tiny_folder, monkeypatch):
    monkeypatch.setattr(sys, "stdin", _BytesStdin(b"hi\n\xff oops\n"))
    code, out, err = cli(capsys, "chat", "--model", tiny_folder, "--max-tokens", "2")
    assert out.endswith("\n")  # the first line was answered
    assert code == 0 and "Traceback" not in err  # the bad line is skipped with one notice; the chat goes on
    assert [ln for ln in err.splitlines() if "UTF-8" in ln] == [
        "that line is not valid UTF-8 (byte 0xff at character 0); it was skipped"]


def test_api_refuses_bad_text(tiny_folder):
    model, tok = load(tiny_folder)
    with pytest.raises(Phi3MLXError, match=r"not valid UTF-8 \(byte 0xff at character 1\)"):
        tok.encode("a\udcff")
    with pytest.raises(Phi3MLXError, match="not valid UTF-8"):
        generate(model, tok, "x\udcffy", max_tokens=2)
    with pytest.raises(Phi3MLXError, match=r"message 1 \(user\) is not valid UTF-8"):
        tok.apply_chat_template([{"role": "user", "content": "\udcff"}], tokenize=True)


def test_valid_non_ascii_prompt_still_works(capsys, tiny_folder, monkeypatch):
    monkeypatch.setattr(sys, "stdin", _BytesStdin("Größe, 東京 🤖".encode()))
    code, out, err = cli(capsys, "generate", "--model", tiny_folder, "-p", "-", "-m", "2")
    assert code == 0 and err == ""


# ---------------------------------------------------------------- 2. --q-bits / --q-group-size need -q


@pytest.mark.parametrize("flags, needles", [
    (["--q-bits", "8"], ["--q-bits applies only when quantizing", "-q/--quantize"]),
    (["--q-group-size", "32"], ["--q-group-size applies only when quantizing"]),
    (["--q-bits", "8", "--q-group-size", "32"], ["--q-bits and --q-group-size apply only when quantizing"]),
    (["--q-bits", "3"], ["--q-bits applies only when quantizing", "--q-bits must be one of 4, 8, got 3"]),
])
def test_quant_flags_without_quantize(capsys, tmp_path, tiny_folder, flags, needles):
    out = tmp_path / "OUT"
    assert_one_error(*cli(capsys, "convert", "--hf-path", tiny_folder, "--mlx-path", out, *flags)[::2], *needles)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_quant_defaults_still_apply_with_q(capsys, tmp_path, tiny_folder):
    out = tmp_path / "q"
    code, stdout, err = cli(capsys, "convert", "--hf-path", tiny_folder, "--mlx-path", out, "-q")
    assert code == 0, err
    assert "4-bit group 64" in stdout


def test_convert_api_refuses_quant_settings_without_quantize(tmp_path, tiny_folder):
    from phi3mlx.convert.hf_to_mlx import convert

    with pytest.raises(Phi3MLXError, match="--q-bits applies only when quantizing"):
        convert(str(tiny_folder), str(tmp_path / "o"), q_bits=8, show_progress=False)


# ---------------------------------------------------------------- 3. the built-in random model says so


def test_generate_on_the_tiny_model_says_it_is_noise(capsys):
    code, out, err = cli(capsys, "generate", "--model", "phi3mlx:tiny", "-p", "hi", "-m", "2")
    assert code == 0
    assert err.splitlines() == [TINY_NOTICE]
    assert "phi3mlx:tiny" in TINY_NOTICE and "random weights" in TINY_NOTICE and "noise" in TINY_NOTICE


def test_chat_and_bench_on_the_tiny_model_say_it(capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", _BytesStdin(b"hi\n"))
    code, out, err = cli(capsys, "chat", "--model", "phi3mlx:tiny", "--max-tokens", "2")
    assert code == 0 and err.splitlines()[0] == TINY_NOTICE and err.count(TINY_NOTICE) == 1
    code, out, err = cli(capsys, "bench", "--model", "phi3mlx:tiny", "--prompt-tokens", "8", "--gen-tokens", "2",
                         "--repeats", "1")
    assert code == 0 and TINY_NOTICE in err.splitlines()


def test_the_default_model_is_the_trained_one_and_says_nothing_about_noise(capsys):
    code, out, err = cli(capsys, "generate", "-p", "What is 21 + 35?", "-m", "8")
    assert code == 0 and TINY_NOTICE not in err and out.startswith("The answer is")


def test_no_notice_for_a_real_folder_help_or_errors(capsys, tiny_folder):
    code, out, err = cli(capsys, "generate", "--model", tiny_folder, "-p", "hi", "-m", "2")
    assert code == 0 and err == ""
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    out, err = capsys.readouterr()
    assert "note:" not in out and err == ""
    # a user mistake stays one line: no notice before it
    assert_one_error(*cli(capsys, "generate", "-p", " ")[::2], "empty")
    assert_one_error(*cli(capsys, "bench", "--prompt-tokens", "0")[::2], "--prompt-tokens")


# ---------------------------------------------------------------- 4. no torch, no noise


def _hide_torch(code: str) -> str:
    # as if torch were not installed: `import torch` fails and importlib finds no spec
    return "import sys; sys.modules['torch'] = None\nimport importlib.util\n" \
           "assert importlib.util.find_spec('torch') is None\n" + code


def test_api_without_torch_prints_nothing(tiny_folder, tmp_path):
    r = run_python(_hide_torch(
        "import phi3mlx\n"
        f"m, t = phi3mlx.load({str(tiny_folder)!r})\n"
        "print(len(phi3mlx.generate(m, t, 'hi', max_tokens=3)) >= 0)\n"))
    assert r.returncode == 0, r.stderr.decode()
    assert r.stderr == b"", r.stderr.decode()
    assert r.stdout == b"True\n"


def test_cli_without_torch_prints_nothing_more(tiny_folder):
    r = run_python(_hide_torch(CLI), "generate", "--model", str(tiny_folder), "-p", "hi", "-m", "2",
                   env={"TRANSFORMERS_VERBOSITY": "warning"})  # even with transformers' warnings on
    assert r.returncode == 0, r.stderr.decode()
    assert r.stderr == b"", r.stderr.decode()


# ---------------------------------------------------------------- 5. argparse's errors: one line, exit 1

SUBCOMMANDS = ["convert", "export-hf", "generate", "cache-prompt", "chat", "bench", "lora", "dpo", "fuse", "pretrain",
               "tokenizer", "corpus", "serve", "plan"]


@pytest.mark.parametrize("cmd", SUBCOMMANDS)
def test_unknown_flag_in_every_subcommand(capsys, cmd):
    # named together with the subcommand's missing required flags, if any
    assert_one_error(*cli(capsys, cmd, "--bogus")[::2],
                     f"phi3mlx: error: {cmd}: ", "unrecognized arguments: --bogus", f"(see phi3mlx {cmd} --help)")


def test_missing_and_unknown_flags_named_together(capsys):
    assert_one_error(*cli(capsys, "convert", "--hf-path", "x", "--bogus", "1", "--qbits", "4")[::2],
                     "convert: the following arguments are required: --mlx-path; "
                     "unrecognized arguments: --bogus 1 --qbits 4")


@pytest.mark.parametrize("args, needles", [
    (["convert"], ["convert: the following arguments are required: --hf-path, --mlx-path"]),
    (["export-hf", "--mlx-path", "x"], ["export-hf: the following arguments are required: --hf-path"]),
    (["generate"], ["generate: the following arguments are required: --prompt/-p"]),
    (["fuse", "--model", "m"], ["fuse: ", "--adapter-path", "--save-path"]),
    (["convert", "--hf-path", "a", "--mlx-path", "b", "--dtype", "float8"], ["convert: argument --dtype: invalid choice"]),
    (["chat", "--kv-group-size", "7"], ["chat: argument --kv-group-size: invalid choice: 7"]),
    (["dpo", "--loss", "kto"], ["dpo: argument --loss: invalid choice: 'kto'"]),
    (["bench", "--grad-checkpoint", "sometimes"], ["bench: argument --grad-checkpoint: invalid choice"]),
    (["lora", "--rank", "eight"], ["lora: argument --rank: invalid int value: 'eight'"]),
    (["generate", "-p"], ["generate: argument --prompt/-p: expected one argument"]),
])
def test_argparse_errors_are_one_line(capsys, args, needles):
    assert_one_error(*cli(capsys, *args)[::2], *needles, f"(see phi3mlx {args[0]} --help)")


@pytest.mark.parametrize("args, needles", [
    ([], ["the following arguments are required: COMMAND"]),
    (["frobnicate"], ["invalid choice: 'frobnicate'"]),
    (["--bogus", "generate", "-p", "x"], ["--bogus"]),
])
def test_top_level_argparse_errors(capsys, args, needles):
    assert_one_error(*cli(capsys, *args)[::2], *needles, "--help")


def test_argparse_error_subprocess_no_usage_block():
    r = run_python(CLI, "lora", "--iters", "many")
    err = r.stderr.decode()
    assert_one_error(r.returncode, err, "lora: argument --iters: invalid int value: 'many'")
    assert "usage:" not in err and "Traceback" not in err


def test_help_and_version_still_exit_0(capsys):
    for args in (["--help"], ["lora", "--help"], ["--version"]):
        with pytest.raises(SystemExit) as e:
            main(args)
        assert e.value.code == 0
    assert capsys.readouterr().err == ""


# ---------------------------------------------------------------- 6. output folders get normal permissions


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o002])
def test_output_folder_permissions_follow_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        with atomic_dir(tmp_path / "out") as tmp:
            (tmp / "f").write_text("x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o777 & ~umask


def test_converted_folder_is_not_private(capsys, tmp_path, tiny_folder):
    old = os.umask(0o022)
    try:
        code, _, err = cli(capsys, "convert", "--hf-path", tiny_folder, "--mlx-path", tmp_path / "m")
    finally:
        os.umask(old)
    assert code == 0, err
    assert stat.S_IMODE((tmp_path / "m").stat().st_mode) == 0o755
    for name in ("model.safetensors", "config.json"):
        assert stat.S_IMODE((tmp_path / "m" / name).stat().st_mode) == 0o644, name


# ---------------------------------------------------------------- 7. help text: each default once, never "None"


def _subparsers(parser):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def test_every_help_states_defaults_once_and_never_none():
    parser = build_parser()
    subs = _subparsers(parser)
    assert sorted(subs) == sorted(SUBCOMMANDS)
    for name, p in [("phi3mlx", parser), *subs.items()]:
        text = " ".join(p.format_help().split())  # undo line wrapping
        assert "(default: None)" not in text, name
        assert "(default: False)" not in text, name
        formatter = p._get_formatter()
        for action in p._actions:
            if not action.help or action.help == argparse.SUPPRESS:
                continue
            shown = formatter._expand_help(action)
            assert shown.count("(default") <= 1, (name, action.dest, shown)
    gen = " ".join(subs["generate"].format_help().split())
    assert "(default: 0.0)" in gen and "(default: phi3mlx:embedded)" in gen  # real defaults still shown
    conv = " ".join(subs["convert"].format_help().split())
    assert "(default: 4)" in conv and "(default: 64)" in conv


# ---------------------------------------------------------------- 8. cli.py imports at the top; no chat -> cli


def _imports_in_functions(path: Path) -> list[str]:
    """Intra-project imports (relative, or of phi3mlx) placed inside a function of ``path``."""
    found = []
    for fn in ast.walk(ast.parse(path.read_text())):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for node in ast.walk(fn):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("phi3mlx")):
                found.append("." * node.level + (node.module or ""))
            elif isinstance(node, ast.Import):
                found += [a.name for a in node.names if a.name.startswith("phi3mlx")]
    return found


def test_cli_imports_the_project_at_module_top():
    # bench --train's two imports stay until bench_train moves to finetune/ (issue 8's layering)
    assert [m for m in _imports_in_functions(ROOT / "phi3mlx" / "cli.py") if m != ".bench_train"] == []


def test_chat_does_not_import_cli():
    """chat is below cli: it gets what it needs (model, tokenizer, generation settings) as arguments."""
    for node in ast.walk(ast.parse((ROOT / "phi3mlx" / "chat.py").read_text())):
        if isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            assert mod.split(".")[-1] != "cli", ast.unparse(node)
            assert not (mod in ("", "phi3mlx") and any(a.name == "cli" for a in node.names)), ast.unparse(node)
        elif isinstance(node, ast.Import):
            assert not any(a.name.split(".")[-1] == "cli" for a in node.names), ast.unparse(node)
