"""``phi3mlx bench --serve``: an OpenAI-compatible server under 1, 4 and 16 concurrent streams.

Both servers are started the same way, as a subprocess on a free loopback port over the same folder
(``python -m phi3mlx serve`` and, with ``--compare-mlx-lm``, ``python -m mlx_lm server``), and get the
same requests: streaming chat completions of the same prompts, greedy, ``--gen-tokens`` each. For
each concurrency c, c clients each send ``--repeats`` requests back to back; reported are the total
completion tokens per second over the round (the servers' own usage counts) and the median time to
the first content token. Ratios are ours / mlx_lm.server (higher is better for tokens/s, lower for
time to first token).
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


def stream_request(port: int, model: str, question: str, max_tokens: int) -> tuple[float, int]:
    """(seconds to the first content token, completion tokens) of one streaming chat request."""
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": question}], "temperature": 0,
                       "max_tokens": max_tokens, "stream": True, "stream_options": {"include_usage": True}})
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    t0 = time.perf_counter()
    c.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
    r = c.getresponse()
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
        if d.get("usage"):
            usage = d["usage"].get("completion_tokens")
        for ch in d.get("choices") or []:
            if (ch.get("delta") or {}).get("content"):
                chunks += 1
                if ttft is None:
                    ttft = time.perf_counter() - t0
    c.close()
    return (ttft if ttft is not None else time.perf_counter() - t0), (usage if usage is not None else chunks)


def run_round(port: int, model: str, clients: int, repeats: int, max_tokens: int) -> dict:
    """``clients`` threads, each ``repeats`` requests: total tokens/s and median time to first token."""
    ttfts, tokens, errors = [], [], []

    def client(k: int) -> None:
        for j in range(repeats):
            try:
                t, n = stream_request(port, model, QUESTIONS[(k + j) % len(QUESTIONS)], max_tokens)
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
    return {"tok_s": sum(tokens) / wall, "ttft": statistics.median(ttfts), "tokens": sum(tokens)}


def run_serve_bench(model: str, gen_tokens: int = 64, repeats: int = 3, compare_mlx_lm: bool = False,
                    concurrency=CONCURRENCY, progress=None) -> dict:
    say = progress or (lambda msg: None)
    model = str(resolve(model))  # one local folder for both servers
    servers = [("phi3mlx", [sys.executable, "-m", "phi3mlx", "serve", "--model", model, "--model-id", "bench",
                            "--max-batch", str(max(concurrency)), "--port", "{port}"])]
    if compare_mlx_lm:
        servers.append(("mlx_lm.server", [sys.executable, "-m", "mlx_lm", "server", "--model", model,
                                          "--log-level", "WARNING", "--port", "{port}"]))
    out = {"model": model, "gen_tokens": gen_tokens, "repeats": repeats, "results": {}}
    for name, argv in servers:
        port = free_port()
        say(f"starting {name}")
        proc = Subprocess(name, [a.replace("{port}", str(port)) for a in argv], port)
        try:
            served = "bench" if name == "phi3mlx" else model
            stream_request(port, served, QUESTIONS[0], 4)  # warm up
            for c in concurrency:
                say(f"{name}: {c} concurrent stream(s)")
                out["results"].setdefault(name, {})[c] = run_round(port, served, c, repeats, gen_tokens)
        finally:
            proc.close()
    return out


def print_serve_report(res: dict) -> None:
    console = report_console()
    if not sys.stdout.isatty():
        console.width = 120
    names = list(res["results"])
    short = {"phi3mlx": "ours", "mlx_lm.server": "mlx-lm"}
    cols = ["streams"] + [f"{short[n]} tok/s" for n in names] + [f"{short[n]} TTFT ms" for n in names]
    if len(names) == 2:
        cols += ["tok/s x", "TTFT x"]
    table = engine_table(cols)
    ours = res["results"]["phi3mlx"]
    other: Optional[dict] = res["results"].get(names[1]) if len(names) == 2 else None
    for c in ours:
        row = [str(c)] + [fmt(res["results"][n][c]["tok_s"]) for n in names]
        row += [fmt(1000 * res["results"][n][c]["ttft"]) for n in names]
        if other is not None:
            row += [fmt(ratio(ours[c]["tok_s"], other[c]["tok_s"]), ".2f", "x"),
                    fmt(ratio(ours[c]["ttft"], other[c]["ttft"]), ".2f", "x")]
        table.add_row(*row)
    console.print(f"serving {res['model']}: streaming chat, greedy, {res['gen_tokens']} tokens per request, "
                  f"{res['repeats']} requests per client")
    console.print(table)
    if other is not None:
        console.print("serve tok/s ratio (phi3mlx / mlx_lm.server): " + ", ".join(
            f"{c} streams {fmt(ratio(ours[c]['tok_s'], other[c]['tok_s']), '.2f', 'x')}" for c in ours))


def main(args) -> None:
    res = run_serve_bench(args.model, args.gen_tokens, args.repeats, args.compare_mlx_lm, progress=progress_printer())
    print_serve_report(res)
