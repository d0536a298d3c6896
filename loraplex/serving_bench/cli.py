"""The `loraplex bench-serve` command: plan the requests, send them on time, report."""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

import httpx

from loraplex.serving_bench.client import RequestOutcome, stream_completion
from loraplex.serving_bench.report import build_report, format_table, write_json, write_plot
from loraplex.serving_bench.workload import AdapterDistribution, DistributionError, PlannedRequest, plan_requests

DEFAULT_PROMPTS = (
    "Write one sentence about the lease.",
    "Summarize the visit in two sentences.",
    "List the employees who joined this year.",
    "Explain the main risk in plain words.",
)


def add_bench_serve_command(commands) -> None:
    parser = commands.add_parser(
        "bench-serve",
        help="serving benchmark against a deployment's OpenAI-compatible API",
        description="Sends streamed completions at a Poisson rate over a set of adapters and reports time to "
        "first token, inter-token and end-to-end latency percentiles, throughput and errors, per adapter.",
    )
    parser.add_argument("--url", required=True, help="the gateway's base URL, e.g. http://127.0.0.1:8000")
    parser.add_argument("--key", required=True, help="API key (Authorization: Bearer)")
    parser.add_argument("--adapters", required=True, help="comma-separated model names (adapters, name@version, base)")
    parser.add_argument("--distribution", default="uniform", help="uniform, or zipf:S over the adapters in the order given (default uniform)")
    parser.add_argument("--rate", type=float, default=1.0, help="requests per second, Poisson arrivals (default 1)")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds during which requests are sent (default 60)")
    parser.add_argument("--max-tokens", type=int, default=64, help="max_tokens of each request (default 64)")
    parser.add_argument("--max-concurrency", type=int, default=0, help="cap on requests in flight (default 0 = no cap)")
    parser.add_argument("--prompt", action="append", help="a prompt (repeatable; default: a few built-in ones)")
    parser.add_argument("--timeout", type=float, default=300.0, help="per-request timeout in seconds (default 300)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the arrival times and adapter choices")
    parser.add_argument("--output", default="bench-serve.json", help="JSON report path (default bench-serve.json)")
    parser.add_argument("--plot", default="", help="PNG plot path (default: the JSON path with .png)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(handler=run_bench_serve)


async def run_requests(
    planned: list[PlannedRequest], url: str, key: str, max_tokens: int, max_concurrency: int,
    timeout_s: float, progress: bool,
) -> tuple[list[RequestOutcome], float]:
    """Sends each request at its planned time; returns the outcomes and the seconds from the start
    until the last one ended."""
    from tqdm import tqdm

    limit = asyncio.Semaphore(max_concurrency) if max_concurrency > 0 else None
    bar = tqdm(total=len(planned), unit="req", disable=not progress, desc="bench-serve")
    headers = {"Authorization": f"Bearer {key}"}
    connections = httpx.Limits(max_connections=max_concurrency or None, max_keepalive_connections=64)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=timeout_s, limits=connections) as client:
        t0 = time.perf_counter()

        async def one(request: PlannedRequest) -> RequestOutcome:
            delay = request.at_s - (time.perf_counter() - t0)
            if delay > 0:
                await asyncio.sleep(delay)
            if limit is None:
                outcome = await stream_completion(client, request.adapter, request.prompt, max_tokens, request.at_s, t0)
            else:
                async with limit:
                    outcome = await stream_completion(client, request.adapter, request.prompt, max_tokens, request.at_s, t0)
            bar.update(1)
            if not outcome.ok:
                bar.set_postfix_str(f"errors: {outcome.status}", refresh=False)
            return outcome

        outcomes = await asyncio.gather(*(one(r) for r in planned))
        elapsed = time.perf_counter() - t0
    bar.close()
    return list(outcomes), elapsed


def run_bench_serve(args: argparse.Namespace) -> int:
    adapters = [a.strip() for a in args.adapters.split(",")]
    try:
        distribution = AdapterDistribution.parse(args.distribution, adapters)
        planned = plan_requests(distribution, args.rate, args.duration, list(args.prompt or DEFAULT_PROMPTS), args.seed)
    except DistributionError as error:
        print(f"bench-serve: {error}", file=sys.stderr)
        return 2
    if args.max_tokens < 1:
        print("bench-serve: --max-tokens must be >= 1", file=sys.stderr)
        return 2
    if not planned:
        print("bench-serve: no request falls within the duration; raise --rate or --duration", file=sys.stderr)
        return 2
    print(f"bench-serve: {len(planned)} requests to {args.url} over {args.duration:g} s "
          f"({args.rate:g} req/s, {args.distribution} over {', '.join(adapters)})", flush=True)
    outcomes, elapsed = asyncio.run(
        run_requests(planned, args.url.rstrip("/"), args.key, args.max_tokens, args.max_concurrency, args.timeout, not args.no_progress)
    )
    settings = {
        "url": args.url, "adapters": adapters, "distribution": args.distribution, "rate": args.rate,
        "duration_s": args.duration, "max_tokens": args.max_tokens, "max_concurrency": args.max_concurrency,
        "seed": args.seed, "prompts": list(args.prompt or DEFAULT_PROMPTS),
    }
    report = build_report(outcomes, elapsed, settings)
    output = Path(args.output)
    write_json(report, output)
    plot = Path(args.plot) if args.plot else output.with_suffix(".png")
    try:
        write_plot(report, outcomes, plot)
    except ImportError:
        print("bench-serve: no plot (matplotlib is not installed: pip install 'loraplex[bench]')", file=sys.stderr)
        plot = None
    print(format_table(report))
    print(f"report: {output}" + (f"   plot: {plot}" if plot else ""))
    return 0 if report["overall"]["completed"] else 1
