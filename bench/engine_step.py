"""`python -m bench.engine_step`: where a batch-32 step of the shard's engine spends its time, and
how the engine's base path compares with plain transformers `generate` on the same model.

The same 134M Llama as `make bench-peers` (its model folder), 32 requests x (64 prompt + 64 new
tokens), greedy, prefill included, no adapters. Three systems run in rotation, one run each per
round, the order rotating every round (so each sees the same machine load on average):
- `engine`: the shard's Engine as `python -m shard` builds it (decode attention kernel on),
- `engine_sdpa`: the same engine with `decode_attention=False` (the model's own SDPA),
- `transformers`: `model.generate` at batch 32 on a separate copy of the model (SDPA).
Each engine run also reports its prefill time and its decode step's median wall and CPU time
(`time.thread_time` of the engine thread: on a shared machine wall time includes waiting for a
core, CPU time does not). A torch.profiler trace of one prefill and five decode steps of
`engine` gives the top operators by self time, written into the result."""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from bench.assets import default_cache_dir
from bench.machine import machine_info, software_versions
from bench.peers import ensure_model_folder
from bench.profiles import PeerProfile
from bench.workloads import BenchRequest, closed_batch

SYSTEMS = ("engine", "engine_sdpa", "transformers")


def _requests(profile: PeerProfile, seed: int) -> list[BenchRequest]:
    return closed_batch(count=profile.max_batch, prompt_tokens=profile.prompt_tokens, new_tokens=profile.new_tokens,
                        adapters=[None], vocab_size=profile.model.vocab_size, seed=seed)


def _submit(engine, requests: list[BenchRequest], prefix: str) -> list:
    from shard.engine import GenerationRequest, SamplingOptions

    return [engine.submit(GenerationRequest(request_id=f"{prefix}-{r.index}", prompt_ids=list(r.prompt_ids),
                                            sampling=SamplingOptions(max_tokens=r.new_tokens)))
            for r in requests]


def run_engine(engine, requests: list[BenchRequest], prefix: str) -> dict:
    """One closed batch through `run_once` on this thread; tokens/s with prefill included."""
    handles = _submit(engine, requests, prefix)
    started = time.perf_counter()
    cpu = time.thread_time()
    engine.run_once()  # admits all and prefills them in one chunk (prefill_chunk_tokens covers it)
    prefill_s, prefill_cpu_s = time.perf_counter() - started, time.thread_time() - cpu
    steps, steps_cpu = [], []
    busy = True
    while busy:
        t, c = time.perf_counter(), time.thread_time()
        busy = engine.run_once()
        steps.append(time.perf_counter() - t)
        steps_cpu.append(time.thread_time() - c)
    seconds = time.perf_counter() - started
    tokens = sum(len(h._sequence.generated) for h in handles)
    return {"seconds": round(seconds, 4), "tokens": tokens, "tokens_per_s": round(tokens / seconds, 2),
            "prefill_s": round(prefill_s, 4), "prefill_cpu_s": round(prefill_cpu_s, 4),
            "decode_steps": len(steps), "decode_step_ms": round(1000 * statistics.median(steps), 2),
            "decode_step_cpu_ms": round(1000 * statistics.median(steps_cpu), 2)}


def run_generate(model, requests: list[BenchRequest]) -> dict:
    ids = torch.tensor([list(r.prompt_ids) for r in requests])
    new = requests[0].new_tokens
    started = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                             do_sample=False, pad_token_id=0)
    seconds = time.perf_counter() - started
    tokens = (out.shape[1] - ids.shape[1]) * out.shape[0]
    return {"seconds": round(seconds, 4), "tokens": tokens, "tokens_per_s": round(tokens / seconds, 2)}


def profile_engine(engine, requests: list[BenchRequest], top: int = 15) -> dict:
    """Top operators by self time in one prefill (all requests) and in five decode steps."""
    from torch.profiler import ProfilerActivity, profile

    def table(prof, per: int) -> list[dict]:
        events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
        total = sum(e.self_cpu_time_total for e in events) or 1
        return [{"op": e.key, "self_ms_per_step": round(e.self_cpu_time_total / 1000 / per, 3),
                 "share": round(e.self_cpu_time_total / total, 4), "calls_per_step": e.count // per}
                for e in events[:top]]

    _submit(engine, requests, "profile")
    with profile(activities=[ProfilerActivity.CPU]) as prefill:
        engine.run_once()
    for _ in range(3):
        engine.run_once()
    with profile(activities=[ProfilerActivity.CPU]) as decode:
        for _ in range(5):
            engine.run_once()
    while engine.run_once():
        pass
    return {"prefill": table(prefill, 1), "decode_step": table(decode, 5)}


def measure_dtype(profile: PeerProfile, dtype: str, model_dir: Path, rounds: int, log) -> dict:
    from shard.engine import Engine
    from shard.model_loading import load_base_model

    model, tokenizer = load_base_model(model_dir, dtype, "cpu")
    reference, _ = load_base_model(model_dir, dtype, "cpu")  # generate's own copy, SDPA
    context = profile.prompt_tokens + profile.new_tokens + 1

    def engine(decode_attention: bool):
        return Engine(model, tokenizer, max_batch_size=profile.max_batch, max_queue=4 * profile.max_batch,
                      max_context=profile.model.max_position_embeddings, initial_kv_columns=context,
                      prefill_chunk_tokens=profile.max_batch * profile.prompt_tokens, prefix_cache_bytes=0,
                      decode_attention=decode_attention)

    engines = {"engine": engine(True), "engine_sdpa": engine(False)}
    attention = {"engine": model.config._attn_implementation, "engine_sdpa": "sdpa"}
    seeds = iter(range(1000, 10**6))

    def run(system: str, requests: list[BenchRequest], tag: str) -> dict:
        if system == "transformers":
            return run_generate(reference, requests)
        model.set_attn_implementation(attention[system])  # the two engines share the model
        return run_engine(engines[system], requests, tag)

    log(f"{dtype}: warm-up")
    for system in SYSTEMS:  # a few short requests: enough to build kernels and touch every weight
        run(system, [replace(r, new_tokens=4) for r in _requests(profile, next(seeds))[:8]], f"warm-{system}")
    runs: dict[str, list[dict]] = {s: [] for s in SYSTEMS}
    for index in range(rounds):
        requests = _requests(profile, next(seeds))
        order = SYSTEMS[index % 3:] + SYSTEMS[: index % 3]
        for system in order:
            runs[system].append(run(system, requests, f"r{index}-{system}"))
        log(f"{dtype} round {index + 1}/{rounds}: " + ", ".join(
            f"{s} {runs[s][-1]['tokens_per_s']:.1f} tok/s" for s in SYSTEMS))
    model.set_attn_implementation(attention["engine"])
    profiled = profile_engine(engines["engine"], _requests(profile, next(seeds)))
    summary = {}
    for system, system_runs in runs.items():
        summary[system] = {key: round(statistics.median(r[key] for r in system_runs), 3)
                           for key in system_runs[0] if key != "tokens"}
    per_round = [runs["engine"][i]["tokens_per_s"] / runs["transformers"][i]["tokens_per_s"] for i in range(rounds)]
    sdpa_rounds = [runs["engine"][i]["tokens_per_s"] / runs["engine_sdpa"][i]["tokens_per_s"] for i in range(rounds)]
    return {"summary": summary, "runs": runs,
            "engine_over_transformers": {"ratio": round(statistics.median(per_round), 3),
                                         "per_round": [round(r, 3) for r in per_round]},
            "decode_kernel_over_sdpa": {"ratio": round(statistics.median(sdpa_rounds), 3),
                                        "per_round": [round(r, 3) for r in sdpa_rounds]},
            "profile": profiled, "attention": attention}


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dtypes = list(result["results"])
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.26
    for i, system in enumerate(SYSTEMS):
        values = [result["results"][d]["summary"][system]["tokens_per_s"] for d in dtypes]
        ax.bar([x + (i - 1) * width for x in range(len(dtypes))], values, width, label=system)
    ax.set_xticks(range(len(dtypes)), dtypes)
    ax.set_ylabel("tokens / s (32 x (64 prompt + 64 new), prefill included)")
    ax.set_title(f"shard engine vs transformers generate, batch 32 — {result['machine']['cpu']}, "
                 f"{result['settings']['threads']} threads", fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.engine_step", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the three systems (default 3)")
    parser.add_argument("--threads", type=int, default=PeerProfile.threads)
    parser.add_argument("--name", default="engine_step")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--cache-dir", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    profile = PeerProfile(threads=args.threads)
    model_dir = ensure_model_folder(profile.model, args.cache_dir or default_cache_dir())
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    started = time.time()
    machine = machine_info()
    results = {d: measure_dtype(profile, d, model_dir, args.rounds, log) for d in args.dtypes.split(",") if d}
    machine["loadavg_end"] = machine_info()["loadavg"]
    result = {"name": args.name, "settings": {"threads": args.threads, "rounds": args.rounds, "batch": profile.max_batch,
                                               "prompt_tokens": profile.prompt_tokens, "new_tokens": profile.new_tokens,
                                               "model": profile.as_dict()["model"]},
              "results": results, "machine": machine, "software": software_versions(),
              "duration_s": round(time.time() - started, 1)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(result, indent=1) + "\n")
    plot(result, args.out / f"{args.name}.png")
    for dtype, r in results.items():
        s = r["summary"]
        print(f"{dtype}: engine {s['engine']['tokens_per_s']:.0f} tok/s (decode step {s['engine']['decode_step_ms']:.0f} ms, "
              f"CPU {s['engine']['decode_step_cpu_ms']:.0f} ms), engine+SDPA {s['engine_sdpa']['tokens_per_s']:.0f}, "
              f"transformers generate {s['transformers']['tokens_per_s']:.0f}; engine / generate "
              f"{r['engine_over_transformers']['ratio']:.2f}, kernel / SDPA {r['decode_kernel_over_sdpa']['ratio']:.2f}")
        for op in r["profile"]["decode_step"][:6]:
            print(f"   decode {op['op']}: {op['self_ms_per_step']:.1f} ms/step ({100 * op['share']:.0f}%)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
