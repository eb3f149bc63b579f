"""``phi3mlx bench --serve``: a real (small) run against our server, the report with a failed round, and
bad flags. Speed ratios are never asserted (they depend on the machine and its load)."""

from __future__ import annotations

import re

from phi3mlx import bench_serve as B
from phi3mlx.cli import main


def test_bench_serve_runs_each_workload_on_a_fresh_server(capsys):
    code = main(["bench", "--serve", "--streams", "1,2", "--workloads", "greedy,seeded", "--repeats", "1",
                 "--gen-tokens", "4", "--trials", "1"])
    out, err = capsys.readouterr()
    assert code == 0, err
    for w in ("greedy", "seeded"):
        for c in (1, 2):
            m = re.search(rf"^\s*{w}\s+{c}\s+([0-9.]+)\s+([0-9.]+)\s*$", out, re.M)
            assert m and float(m.group(1)) > 0 and float(m.group(2)) > 0, out
    assert '"seed"' not in out and "seeded {\"temperature\": 0.7, \"top_p\": 0.9} + a seed per request" in out


def test_report_names_a_failed_round_and_gives_no_ratio_for_it(capsys):
    ok = {"tok_s": 100.0, "ttft": 0.05, "tokens": 10, "wall": 0.1}
    res = {"model": "m", "gen_tokens": 8, "repeats": 1, "workloads": ["seeded"],
           "results": {"phi3mlx": {"seeded": {1: ok, 16: {**ok, "tok_s": 300.0}}},
                       "mlx_lm.server": {"seeded": {1: {**ok, "tok_s": 50.0, "tokens": 5, "wall": 0.15},
                                                    16: {"error": "3 requests failed: x"}}}}}
    B.print_serve_report(res)
    out = capsys.readouterr().out
    assert re.search(r"seeded\s+1\s+100\.0\s+50\.0\s+50\.0\s+50\.0\s+2\.00x\s+1\.00x\s+1\.50x", out), out
    assert re.search(r"seeded\s+16\s+300\.0\s+failed\s+50\.0\s+failed\s+n/a\s+n/a\s+n/a", out), out
    assert "serve tok/s ratio seeded (phi3mlx / mlx_lm.server): 1 streams 2.00x, 16 streams n/a" in out
    assert "serve time ratio seeded (mlx_lm.server / phi3mlx, the same requests): 1 streams 1.50x" in out
    assert "mlx_lm.server failed (seeded, 16 streams): 3 requests failed: x" in out
    assert "counts differ (ours 10 tokens, mlx-lm 5 tokens in all" in out  # rounds both completed


def test_bad_flags_are_named_together(capsys):
    assert main(["bench", "--serve", "--workloads", "greedy,bogus", "--streams", "0,x", "--trials", "0"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "unknown 'bogus'" in err and "'0' is not a positive whole number" in err and "'x' is not" in err
    assert "--trials must be 1 or more, got 0" in err
    assert B.request_settings("seeded", 7) == {"temperature": 0.7, "top_p": 0.9, "seed": 7}
    assert B.request_settings("greedy", 7) == {"temperature": 0}


def test_servers_take_turns_and_a_failed_server_is_skipped_with_the_reason(monkeypatch):
    """Both servers run at once; per concurrency each first gets an unmeasured warm-up round (one request per
    client), then the timed rounds go A B B A (so a machine slowing down during the run weighs on both); a
    server's tokens/s is over all its trials; after a failed round (warm-up or timed) that server is stopped
    and its later rounds are skipped, saying why, while the other goes on."""
    calls, closed = [], []
    fail = {}  # (who, clients, kind) -> message

    class FakeServer:
        def __init__(self, name, argv, port, timeout=180.0):
            self.name = name

        def close(self):
            closed.append((self.name, len(calls)))

    def fake_round(port, served, clients, repeats, max_tokens, workload="greedy"):
        who = "ours" if served == "bench" else "theirs"
        kind = "warm" if repeats == 1 else "timed"
        calls.append((who, clients, kind))
        if (who, clients, kind) in fail:
            raise B.Phi3MLXError(fail[who, clients, kind])
        n = max(1, sum(k == "timed" for _, _, k in calls))  # a machine that slows down: each round slower than the last
        return {"tok_s": 100.0 / n, "ttft": 0.01 * n, "tokens": 100, "wall": float(n), "ttfts": [0.01 * n]}

    monkeypatch.setattr(B, "Subprocess", FakeServer)
    monkeypatch.setattr(B, "run_round", fake_round)
    monkeypatch.setattr(B, "stream_request", lambda *a, **k: (0.0, 4))
    monkeypatch.setattr(B, "resolve", lambda m: m)
    fail[("theirs", 4, "timed")] = "2 requests failed: boom"
    res = B.run_serve_bench("m", compare_mlx_lm=True, concurrency=(1, 4, 16), trials=2, repeats=3)
    assert calls[:6] == [("ours", 1, "warm"), ("theirs", 1, "warm"), ("ours", 1, "timed"), ("theirs", 1, "timed"),
                         ("theirs", 1, "timed"), ("ours", 1, "timed")]
    assert calls[6:] == [("ours", 4, "warm"), ("theirs", 4, "warm"), ("ours", 4, "timed"), ("theirs", 4, "timed"),
                         ("ours", 4, "timed"), ("ours", 16, "warm"), ("ours", 16, "timed"), ("ours", 16, "timed")]
    ours, theirs = res["results"]["phi3mlx"]["greedy"], res["results"]["mlx_lm.server"]["greedy"]
    assert ours[1]["tok_s"] == 200 / (1 + 4) and theirs[1]["tok_s"] == 200 / (2 + 3)  # A B B A: even under drift
    assert ours[1]["trials"] == [100.0, 25.0] and ours[1]["ttft"] == 0.025
    assert theirs[4] == {"error": "2 requests failed: boom"}
    assert theirs[16] == {"error": "skipped after the round with 4 streams failed"}
    assert "error" not in ours[16] and len(ours[16]["trials"]) == 2
    assert closed[0] == ("mlx_lm.server", 10)  # stopped right after its failed round, before ours went on
    assert {name for name, _ in closed} == {"mlx_lm.server", "phi3mlx"}

    calls.clear(), closed.clear(), fail.clear()
    fail[("theirs", 1, "warm")] = "1 requests failed: cold"
    res = B.run_serve_bench("m", compare_mlx_lm=True, concurrency=(1, 4), trials=2, repeats=3)
    ours, theirs = res["results"]["phi3mlx"]["greedy"], res["results"]["mlx_lm.server"]["greedy"]
    assert theirs[1] == {"error": "warm-up: 1 requests failed: cold"}
    assert theirs[4] == {"error": "skipped after the warm-up with 1 streams failed"}
    assert [w for w, _, _ in calls].count("theirs") == 1 and len(ours[1]["trials"]) == len(ours[4]["trials"]) == 2
    assert closed[0] == ("mlx_lm.server", 2)


def test_the_compile_choice_reaches_our_server_only_when_given(monkeypatch):
    """`bench --serve` starts `phi3mlx serve` with --compile-steps, --no-compile-steps or neither (the
    server's own choice), records which, and never passes it to mlx_lm.server."""
    argvs = []

    class FakeServer:
        def __init__(self, name, argv, port, timeout=180.0):
            argvs.append((name, argv))

        def close(self):
            pass

    monkeypatch.setattr(B, "Subprocess", FakeServer)
    monkeypatch.setattr(B, "run_round", lambda *a, **k: {"tok_s": 1.0, "ttft": 0.1, "tokens": 1, "wall": 1.0,
                                                         "ttfts": [0.1]})
    monkeypatch.setattr(B, "stream_request", lambda *a, **k: (0.0, 4))
    monkeypatch.setattr(B, "resolve", lambda m: m)
    for choice, flags in ((None, []), (True, ["--compile-steps"]), (False, ["--no-compile-steps"])):
        argvs.clear()
        res = B.run_serve_bench("m", compare_mlx_lm=True, concurrency=(1,), trials=1, compile_steps=choice)
        ours = dict(argvs)["phi3mlx"]
        assert [a for a in ours if "compile-steps" in a] == flags and res["compile_steps"] is choice
        assert not any("compile" in a for a in dict(argvs)["mlx_lm.server"])
    assert main(["bench", "--serve", "--no-compile-steps", "--trials", "0"]) == 1  # the flag parses
