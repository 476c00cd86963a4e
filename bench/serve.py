"""unmask serve under load: 1, 4, 16 and 64 concurrent clients (closed loop, streaming
requests) against the bundled model, beside the same requests served one at a time:
requests and generated tokens per second, p50/p99 latency, time to the first streamed
event, and failed or mismatched answers (each answer is checked against the one-at-a-
time answer of the same prompt). Then the engine alone (no HTTP) at 1 and 16 clients.

    python bench/serve.py [--quick] [--no-save] [--cache prefix|dual] [--engine process|thread]
                          [--engine-threads N] [--client lean|httpx]

--cache sends every request with that key/value cache (the same requests served one at a
time use it too); without it requests recompute the whole canvas each step.

--client: the load generator. The clients run on the server's own cores here, so what
they spend is taken from the server. "lean" (the default) speaks HTTP/1.1 over asyncio
streams and parses the server-sent events itself (0.08 of a core at 16 clients);
"httpx" is the httpx client (0.37-0.41 of a core there, README, Serving). Load
generators are kept light for this reason (wrk, vegeta); both check every answer.
"""

import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time

import httpx

from _common import parse, report
from unmask import tasks
from unmask.benchmarks.harness import Row

MODEL = "unmask-bundled"


def start_server(max_batch: int, engine: str, engine_threads: int | None) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    process = subprocess.Popen([sys.executable, "-m", "unmask", "serve", "--port", str(port), "--max-batch",
                                str(max_batch), "--max-queue", "256", "--engine", engine]
                               + ([] if engine_threads is None else ["--engine-threads", str(engine_threads)]),
                               stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            httpx.get(url + "/health", timeout=1)
            return process, url
        except httpx.TransportError:
            time.sleep(0.1)
    process.kill()
    raise RuntimeError("unmask serve did not start")


def request_body(prompt: str, cache: str | None) -> dict:
    return {"model": MODEL, "prompt": prompt, "max_tokens": 8, "stream": True, "cache": cache}


def answer(state: dict, started: float, ok: bool) -> dict:
    """A request's result: whether it finished, its latency, first event time and text."""
    return {"ok": ok, "latency": time.perf_counter() - started, "first": state["first"], "text": state["text"]}


def read_events(chunk: dict, state: dict, started: float) -> None:
    """One streamed chunk into a request's result: first event time, text, finish."""
    state["first"] = state["first"] or time.perf_counter() - started
    state["text"] += chunk["choices"][0]["text"]
    state["finish"] = chunk["choices"][0]["finish_reason"] or state["finish"]


async def one_request(client: httpx.AsyncClient, url: str, prompt: str, cache: str | None) -> dict:
    """A streaming completion through httpx: latency, time to the first event, text."""
    body = request_body(prompt, cache)
    started = time.perf_counter()
    state = {"first": None, "text": "", "finish": None}
    async with client.stream("POST", url + "/v1/completions", json=body, timeout=120) as reply:
        if reply.status_code != 200:
            return {"ok": False, "status": reply.status_code}
        async for line in reply.aiter_lines():
            if line.startswith("data: {"):
                read_events(json.loads(line[6:]), state, started)
    return answer(state, started, state["finish"] is not None)


async def lean_request(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str, prompt: str,
                       cache: str | None) -> dict:
    """The same streaming completion over a kept-alive connection, HTTP/1.1 by hand: the
    response's chunked body cut into server-sent events ("data: ...", blank line)."""
    body = json.dumps(request_body(prompt, cache)).encode()
    started = time.perf_counter()
    try:
        return await _lean_exchange(reader, writer, host, body, started)
    except (ConnectionError, asyncio.IncompleteReadError, ValueError, IndexError) as error:  # counted as failed
        return {"ok": False, "error": repr(error)}


async def _lean_exchange(reader, writer, host: str, body: bytes, started: float) -> dict:
    writer.write(f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    status = int((await reader.readline()).split()[1])
    headers = {}
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode().partition(":")
        headers[name.strip().lower()] = value.strip()
    if headers.get("transfer-encoding") != "chunked":  # an error: a whole body
        await reader.readexactly(int(headers.get("content-length", 0)))
        return {"ok": False, "status": status}
    state, pending = {"first": None, "text": "", "finish": None}, b""
    while size := int((await reader.readline()).split(b";")[0], 16):
        pending += (await reader.readexactly(size + 2))[:-2]
        *events, pending = pending.split(b"\n\n")
        for event in events:
            if event.startswith(b"data: {"):
                read_events(json.loads(event[6:]), state, started)
    await reader.readline()  # the empty chunk's CRLF
    return answer(state, started, status == 200 and state["finish"] is not None)


def run_level(url: str, prompts: list[str], clients: int, cache: str | None, client: str) -> tuple[list[dict], float, float]:
    """clients concurrent loops (asyncio tasks in this one thread), each sending its share
    of prompts one after another on its own connection: the results, the seconds, and
    the cores this process (the clients) used meanwhile."""
    shares = [prompts[i::clients] for i in range(clients)]
    host, port = url.removeprefix("http://").split(":")

    async def level():
        if client == "httpx":
            limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
            async with httpx.AsyncClient(limits=limits) as session:
                async def client_loop(share):
                    return [(prompt, await one_request(session, url, prompt, cache)) for prompt in share]

                done = await asyncio.gather(*(client_loop(share) for share in shares))
        else:
            async def client_loop(share):
                reader, writer = await asyncio.open_connection(host, int(port))
                try:
                    return [(prompt, await lean_request(reader, writer, f"{host}:{port}", prompt, cache)) for prompt in share]
                finally:
                    writer.close()

            done = await asyncio.gather(*(client_loop(share) for share in shares))
        return [r for share in done for r in share]

    cpu, started = time.process_time(), time.perf_counter()
    results = asyncio.run(level())
    seconds = time.perf_counter() - started
    return results, seconds, (time.process_time() - cpu) / seconds


def engine_level(prompts: list[str], clients: int, cache: str | None, max_batch: int, threads: int | None) -> float:
    """The engine alone, in this process (no HTTP, no event loop, no client parsing), on
    the torch threads the server's engine process takes: clients closed loops of
    streaming requests; seconds for all prompts."""
    import threading

    import torch

    import unmask
    from unmask import cli
    from unmask.serving import protocol
    from unmask.serving.engine import Engine, Job

    model = unmask.from_pretrained(cli.model_path(MODEL))
    engine = Engine(model, model.tokenizer, max_batch=max_batch, max_queue=len(prompts))
    todo, lock, done, left = list(prompts), threading.Lock(), threading.Event(), [len(prompts)]
    failures = []  # a failed request is no timing: the run stops with its message

    def submit_next():
        with lock:
            if not todo:
                return
            prompt = todo.pop()
        settings = protocol.settings({"max_tokens": 8, "stream": True, "cache": cache},
                                     prompt=model.tokenizer.encode(prompt).ids, default_block_length=8,
                                     max_context=4096, vocab=None, mask_id=model.mask_id)
        engine.submit(Job(settings, model.mask_id, model.eos_ids, on_event=on_event))

    def on_event(event):
        if event["kind"] == "error":
            failures.append(event["message"])
        if event["kind"] in ("done", "error"):
            with lock:
                left[0] -= 1
                if left[0] == 0:
                    done.set()
            submit_next()

    default_threads = torch.get_num_threads()
    torch.set_num_threads(threads or max(1, default_threads - 1))  # as EngineSpec.threads
    try:
        engine.start()
        started = time.perf_counter()
        for _ in range(clients):
            submit_next()
        done.wait()
        seconds = time.perf_counter() - started
        engine.stop()
    finally:
        torch.set_num_threads(default_threads)
    if failures:
        raise RuntimeError(f"{len(failures)} of {len(prompts)} requests failed, the first with: {failures[0]}")
    return seconds


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> None:
    args = parse(__doc__, lambda parser: (parser.add_argument("--quick", action="store_true"),
                                  parser.add_argument("--max-batch", type=int, default=16),
                                  parser.add_argument("--cache", choices=("prefix", "dual")),
                                  parser.add_argument("--engine", choices=("process", "thread"), default="process"),
                                  parser.add_argument("--engine-threads", type=int),
                                  parser.add_argument("--client", choices=("lean", "httpx"), default="lean")))
    examples = tasks.examples(64 if args.quick else 256, seed=5)
    prompts = [example.prompt for example in examples]
    process, url = start_server(args.max_batch, args.engine, args.engine_threads)
    rows = []
    try:
        run_level(url, prompts[:8], 1, args.cache, args.client)  # warm-up
        alone, alone_seconds, alone_cpu = run_level(url, prompts, 1, args.cache, args.client)
        expected = {prompt: result.get("text") for prompt, result in alone}
        alone_rps = len(prompts) / alone_seconds
        for clients in (1, 4, 16, 64):
            results, seconds, client_cpu = ((alone, alone_seconds, alone_cpu) if clients == 1
                                            else run_level(url, prompts, clients, args.cache, args.client))
            ok = [r for _, r in results if r["ok"]]
            mismatched = sum(1 for prompt, r in results if r["ok"] and r["text"] != expected[prompt])
            latencies, firsts = [r["latency"] for r in ok], [r["first"] for r in ok]
            generated = sum(len(r["text"]) for r in ok)  # one token per character (the bundled tokenizer)
            rps = len(prompts) / seconds
            extra = {"requests": len(prompts), "failed": len(prompts) - len(ok), "mismatched": mismatched,
                     "requests_per_s": rps, "tokens_per_s": generated / seconds,
                     "p50_ms": statistics.median(latencies) * 1e3, "p99_ms": percentile(latencies, 0.99) * 1e3,
                     "p99_over_p50": percentile(latencies, 0.99) / statistics.median(latencies),
                     "first_event_p50_ms": statistics.median(firsts) * 1e3, "client_cores": client_cpu}
            rows.append(Row("serve", f"{clients} clients", {"model": MODEL, "max_tokens": 8, "max_batch": args.max_batch,
                                             "cache": args.cache, "engine": args.engine, "client": args.client,
                                             "engine_threads": args.engine_threads},
                            "float32", seconds * 1e3 / len(prompts), speedup_vs_baseline=rps / alone_rps,
                            extra=extra))
            print(f"{clients:3} clients: {rps:7.1f} req/s ({rps / alone_rps:5.2f}x one at a time), "
                  f"{generated / seconds:8.1f} tokens/s, p50 {extra['p50_ms']:7.1f} ms, p99 {extra['p99_ms']:7.1f} ms "
                  f"(x{extra['p99_over_p50']:.2f}), first event p50 {extra['first_event_p50_ms']:6.1f} ms, "
                  f"failed {extra['failed']}, mismatched {mismatched}, clients' CPU {client_cpu:.2f} cores", flush=True)
    finally:
        process.terminate()
        process.wait(timeout=60)
    # The same requests through the engine alone: the batching gain without the HTTP
    # front and the clients, which share this machine's cores with the server above.
    engine_alone = {clients: engine_level(prompts, clients, args.cache, args.max_batch, args.engine_threads)
                    for clients in (1, 16)}
    for clients, seconds in engine_alone.items():
        speedup = engine_alone[1] / seconds
        rows.append(Row("serve", f"engine alone, {clients} clients",
                        {"model": MODEL, "max_tokens": 8, "max_batch": args.max_batch, "cache": args.cache}, "float32",
                        seconds * 1e3 / len(prompts), speedup_vs_baseline=speedup,
                        extra={"requests": len(prompts), "requests_per_s": len(prompts) / seconds}))
        print(f"engine alone, {clients:2} clients: {len(prompts) / seconds:7.1f} req/s ({speedup:5.2f}x one at a time)")
    report(args, rows, {})


if __name__ == "__main__":
    main()
