"""``phi3mlx bench --serve``: an OpenAI-compatible server under 1, 4 and 16 concurrent streams.

Both servers are started the same way, as a subprocess on a free loopback port over the same folder
(``python -m phi3mlx serve`` and, with ``--compare-mlx-lm``, ``python -m mlx_lm server``), and get the
same requests: streaming chat completions of the same prompts, at most ``--gen-tokens`` each, in one
or more workloads (greedy; sampled as chat apps ask; sampled with a seed per request), each on freshly
started servers, both running at once. For each concurrency c, c clients each send ``--repeats``
requests back to back, in ``--trials`` rounds per server with the servers taking turns (A B B A), so a
machine whose speed drifts during the run (a shared one) weighs on both alike; reported are the total
completion tokens per second over a server's rounds (the servers' own usage counts) and the median time
to the first content token. Ratios are ours / mlx_lm.server (higher is better for tokens/s, lower for
time to first token). A round in which a request fails is reported as failed.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Optional

from .benchkit import engine_table, fmt, progress_printer, ratio, report_console
from .errors import Phi3MLXError
from .hub import resolve

CONCURRENCY = (1, 4, 16)
CONNECT_TRIES = 3  # the time to the first token counts from the first try
# what each request asks for: greedy; sampled as chat apps send it; the same with a seed per request
# (reproducible answers, which the OpenAI API offers through ``seed``)
WORKLOADS = {"greedy": {"temperature": 0}, "sampled": {"temperature": 0.7, "top_p": 0.9},
             "seeded": {"temperature": 0.7, "top_p": 0.9}}
QUESTIONS = ["What is 23 + 45?", "Tell me about the valley of Orvane.", "Who lives in the valley?",
             "Add 17 and 38.", "Write a short story about a river."]


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class Subprocess:
    """A server started as ``argv`` on ``port``; ready once GET /v1/models answers."""

    def __init__(self, name: str, argv: list, port: int, timeout: float = 180.0):
        self.name, self.port = name, port
        self.log = tempfile.TemporaryFile(mode="w+")  # read on failure; a pipe nobody reads could fill and block
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=self.log, text=True,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
        t0 = time.time()
        while True:
            if self.proc.poll() is not None:
                self.log.seek(0)
                err = self.log.read().strip().splitlines()
                raise Phi3MLXError(f"{name} did not start: {err[-1] if err else 'exit ' + str(self.proc.returncode)}")
            try:
                c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
                c.request("GET", "/v1/models")
                c.getresponse().read()
                c.close()
                break
            except OSError:
                if time.time() - t0 > timeout:
                    self.close()
                    raise Phi3MLXError(f"{name} did not answer within {timeout:.0f} s")
                time.sleep(0.2)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def stream_request(port: int, model: str, question: str, max_tokens: int, settings: Optional[dict] = None
                   ) -> tuple[float, int]:
    """(seconds to the first content token, completion tokens) of one streaming chat request; ``settings``
    are its sampling fields (default: greedy)."""
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": question}],
                       **(settings if settings is not None else {"temperature": 0}),
                       "max_tokens": max_tokens, "stream": True, "stream_options": {"include_usage": True}})
    t0 = time.perf_counter()
    for attempt in range(CONNECT_TRIES):  # as the openai client does, a connection refused or reset before
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=600)  # any answer is tried again
        try:
            c.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
            r = c.getresponse()
            break
        except (ConnectionResetError, ConnectionRefusedError, http.client.RemoteDisconnected):
            c.close()
            if attempt == CONNECT_TRIES - 1:
                raise
            time.sleep(0.05 * (attempt + 1))
    if r.status != 200:
        raise Phi3MLXError(f"the server answered {r.status}: {r.read()[:200]!r}")
    ttft, chunks, usage = None, 0, None
    for raw in r:
        line = raw.decode("utf-8", "replace").strip()
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            break
        d = json.loads(data)
        if d.get("error"):  # a failure inside the stream: the request did not complete
            raise Phi3MLXError(f"the stream reported an error: {str(d['error'].get('message', d['error']))[:200]}")
        if d.get("usage"):
            usage = d["usage"].get("completion_tokens")
        for ch in d.get("choices") or []:
            if (ch.get("delta") or {}).get("content"):
                chunks += 1
                if ttft is None:
                    ttft = time.perf_counter() - t0
    c.close()
    return (ttft if ttft is not None else time.perf_counter() - t0), (usage if usage is not None else chunks)


def request_settings(workload: str, n: int) -> dict:
    """The sampling fields of request ``n`` of a workload (a seeded request's seed is its number)."""
    return {**WORKLOADS[workload], **({"seed": n} if workload == "seeded" else {})}


def run_round(port: int, model: str, clients: int, repeats: int, max_tokens: int, workload: str = "greedy") -> dict:
    """``clients`` threads, each ``repeats`` requests: total tokens/s and median time to first token."""
    ttfts, tokens, errors = [], [], []

    def client(k: int) -> None:
        for j in range(repeats):
            try:
                t, n = stream_request(port, model, QUESTIONS[(k + j) % len(QUESTIONS)], max_tokens,
                                      request_settings(workload, k * repeats + j))
                ttfts.append(t)
                tokens.append(n)
            except Exception as e:  # noqa: BLE001  (reported below)
                errors.append(str(e))

    threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise Phi3MLXError(f"{len(errors)} requests failed: {errors[0]}")
    return {"tok_s": sum(tokens) / wall, "ttft": statistics.median(ttfts), "tokens": sum(tokens), "wall": wall,
            "ttfts": ttfts}


def parse_list(text: str, what: str, allowed=None, positive_int: bool = False) -> list:
    """A comma-separated flag value as a list; every bad entry named in one error."""
    items = [x.strip() for x in text.split(",") if x.strip()]
    problems = []
    if not items:
        problems.append(f"{what} is empty")
    if allowed is not None:
        problems += [f"{what}: unknown {x!r} (choose from {', '.join(allowed)})" for x in items if x not in allowed]
    if positive_int:
        bad = [x for x in items if not (x.isascii() and x.isdigit() and int(x) > 0)]
        problems += [f"{what}: {x!r} is not a positive whole number" for x in bad]
        if not bad:
            items = [int(x) for x in items]
    if problems:
        raise Phi3MLXError.many(problems)
    return list(dict.fromkeys(items))  # each once, in the order given


def combine(trials: list) -> dict:
    """One concurrency's trials of a server as one result: tokens/s over all of them (total tokens over
    total time), the median time to the first token over all their requests, the total time, and each
    trial's tokens/s."""
    return {"tok_s": sum(r["tokens"] for r in trials) / sum(r["wall"] for r in trials),
            "ttft": statistics.median([t for r in trials for t in r["ttfts"]]),
            "tokens": sum(r["tokens"] for r in trials), "wall": sum(r["wall"] for r in trials),
            "trials": [r["tok_s"] for r in trials]}


def run_serve_bench(model: str, gen_tokens: int = 64, repeats: int = 3, compare_mlx_lm: bool = False,
                    concurrency=CONCURRENCY, workloads=("greedy",), trials: int = 2, progress=None,
                    compile_steps: Optional[bool] = None) -> dict:
    """For each workload, both servers are started afresh and warmed up; then for each concurrency each
    server runs one unmeasured round of one request per client (the first steps at a new batch size may
    trace or allocate what later ones reuse), then ``trials`` rounds, the servers taking turns in A B B A
    order, so a change in the machine's speed during the run weighs on both alike (fully with an even
    number of trials). Both hold the model
    at once; a server whose round fails is stopped at once.

    ``results[server][workload][c]`` is ``combine`` of its trials, or ``{"error": message}`` when a
    request failed (that server's later rounds in the workload are skipped, saying why)."""
    if trials < 1:
        raise Phi3MLXError(f"trials must be 1 or more, got {trials}")
    say = progress or (lambda msg: None)
    model = str(resolve(model))  # one local folder for both servers
    servers = [("phi3mlx", [sys.executable, "-m", "phi3mlx", "serve", "--model", model, "--model-id", "bench",
                            "--max-batch", str(max(concurrency)), "--log-level", "warning", "--port", "{port}"]
                            + ({True: ["--compile-steps"], False: ["--no-compile-steps"]}.get(compile_steps, [])))]
    if compare_mlx_lm:
        servers.append(("mlx_lm.server", [sys.executable, "-m", "mlx_lm", "server", "--model", model,
                                          "--log-level", "WARNING", "--port", "{port}"]))
    out = {"model": model, "gen_tokens": gen_tokens, "repeats": repeats, "trials": trials,
           "compile_steps": compile_steps, "workloads": list(workloads), "results": {}}
    for workload in workloads:
        live: dict = {}  # name -> {"port", "served", "proc", "failed": None or why its rounds are skipped}
        try:
            for name, argv in servers:
                rounds = out["results"].setdefault(name, {}).setdefault(workload, {})
                port = free_port()
                say(f"starting {name} ({workload})")
                try:
                    proc = Subprocess(name, [a.replace("{port}", str(port)) for a in argv], port)
                except Phi3MLXError as e:
                    rounds.update((c, {"error": str(e)}) for c in concurrency)
                    continue
                live[name] = {"port": port, "served": "bench" if name == "phi3mlx" else model, "proc": proc,
                              "failed": None}
                try:
                    stream_request(port, live[name]["served"], QUESTIONS[0], 4, request_settings(workload, 0))
                except (Phi3MLXError, OSError) as e:
                    live[name]["failed"] = f"the warm-up request failed: {e}"
                    proc.close()  # it takes no more of the machine from the other's rounds
            for c in concurrency:
                runs: dict = {name: [] for name in live}
                for name, srv in live.items():  # unmeasured: each new batch size's first steps
                    if srv["failed"] is None:
                        say(f"{name}: {workload}, {c} concurrent stream(s), warm-up")
                        try:
                            run_round(srv["port"], srv["served"], c, 1, gen_tokens, workload)
                        except Phi3MLXError as e:
                            out["results"][name][workload][c] = {"error": f"warm-up: {e}"}
                            srv["failed"] = f"skipped after the warm-up with {c} streams failed"
                            srv["proc"].close()
                for t in range(trials):
                    for name in (list(live) if t % 2 == 0 else list(reversed(live))):
                        srv = live[name]
                        if srv["failed"] is not None:
                            continue
                        say(f"{name}: {workload}, {c} concurrent stream(s), trial {t + 1} of {trials}")
                        try:
                            runs[name].append(run_round(srv["port"], srv["served"], c, repeats, gen_tokens, workload))
                        except Phi3MLXError as e:
                            out["results"][name][workload][c] = {"error": str(e)}
                            srv["failed"] = f"skipped after the round with {c} streams failed"
                            srv["proc"].close()  # no abandoned streams running beside the other's rounds
                for name, srv in live.items():
                    rounds = out["results"][name][workload]
                    if c not in rounds:  # not failed in this round
                        rounds[c] = {"error": srv["failed"]} if srv["failed"] is not None else combine(runs[name])
        finally:
            for srv in live.values():
                srv["proc"].close()
    return out


def _cell(r: Optional[dict], key: str, scale: float = 1.0) -> str:
    if r is None:
        return "n/a"
    return "failed" if "error" in r else fmt(scale * r[key])


def print_serve_report(res: dict) -> None:
    console = report_console()
    if not sys.stdout.isatty():
        console.width = 120
    names = list(res["results"])
    short = {"phi3mlx": "ours", "mlx_lm.server": "mlx-lm"}
    cols = ["workload", "streams"] + [f"{short[n]} tok/s" for n in names] + [f"{short[n]} TTFT ms" for n in names]
    if len(names) == 2:
        cols += ["tok/s x", "TTFT x", "time x"]
    table = engine_table(cols)
    lines, failures = [], []
    for w in res["workloads"]:
        ours = res["results"]["phi3mlx"][w]
        other: Optional[dict] = res["results"][names[1]][w] if len(names) == 2 else None
        ratios, speeds = [], []
        for c in sorted(set(ours) | set(other or {})):
            rows = {n: res["results"][n][w].get(c) for n in names}
            row = [w, str(c)] + [_cell(rows[n], "tok_s") for n in names]
            row += [_cell(rows[n], "ttft", 1000.0) for n in names]
            for n, r in rows.items():
                if r is not None and "error" in r:
                    failures.append(f"{n} failed ({w}, {c} streams): {r['error']}")
            if other is not None:
                a, b = rows[names[0]], rows[names[1]]
                ok = a is not None and b is not None and "error" not in a and "error" not in b
                tps = ratio(a["tok_s"], b["tok_s"]) if ok else None
                # the same requests: mlx_lm.server's time over ours (older results have no total time)
                speed = ratio(b["wall"], a["wall"]) if ok and "wall" in a and "wall" in b else None
                row += [fmt(tps, ".2f", "x"), fmt(ratio(a["ttft"], b["ttft"]) if ok else None, ".2f", "x"),
                        fmt(speed, ".2f", "x")]
                ratios.append(f"{c} streams {fmt(tps, '.2f', 'x')}")
                speeds.append(f"{c} streams {fmt(speed, '.2f', 'x')}")
            table.add_row(*row)
        if other is not None:
            lines.append(f"serve tok/s ratio {w} (phi3mlx / mlx_lm.server): " + ", ".join(ratios))
            lines.append(f"serve time ratio {w} (mlx_lm.server / phi3mlx, the same requests): " + ", ".join(speeds))
            both = [c for c in ours if "error" not in ours[c] and "error" not in (other.get(c) or {"error": 1})]
            a, b = (sum(res["results"][n][w][c]["tokens"] for c in both) for n in names)
            if a and b and abs(a - b) > 0.05 * max(a, b):  # answers of other lengths: tok/s compares less
                lines.append(f"note: {w}: the completion token counts differ ({short[names[0]]} {a} tokens, "
                             f"{short[names[1]]} {b} tokens in all: other answers, or mlx_lm.server counting "
                             "each answer's end token, which ours does not), so their tokens/s also measure "
                             "that; the time ratio compares the same requests")
    trials = res.get("trials", 1)
    console.print(f"serving {res['model']}: streaming chat, {res['gen_tokens']} tokens at most per request, "
                  f"{res['repeats']} requests per client, {trials} trial{'s' if trials > 1 else ''} per round"
                  + (" (the servers take turns: A B B A)" if trials > 1 and len(names) == 2 else "")
                  + "; workloads: "
                  + "; ".join(f"{w} {json.dumps(WORKLOADS[w])}{' + a seed per request' if w == 'seeded' else ''}"
                              for w in res["workloads"]))
    console.print(table)
    for line in lines + failures:
        console.print(line)


def main(args) -> None:
    problems, parsed = [], []
    for text, what, kw in ((args.workloads, "--workloads", {"allowed": list(WORKLOADS)}),
                           (args.streams, "--streams", {"positive_int": True})):
        try:
            parsed.append(parse_list(text, what, **kw))
        except Phi3MLXError as e:
            problems.append(str(e))
    if args.trials < 1:
        problems.append(f"--trials must be 1 or more, got {args.trials}")
    if problems:
        raise Phi3MLXError("; ".join(problems))
    workloads, streams = parsed
    res = run_serve_bench(args.model, args.gen_tokens, args.repeats, args.compare_mlx_lm, streams, workloads,
                          trials=args.trials, progress=progress_printer(), compile_steps=args.compile_steps)
    print_serve_report(res)
