"""A chaos soak over the real stack: `make soak` (`python -m bench.soak`), not part of `make test`.

The whole product runs as `loraplex up` runs it (`loraplex.stack.LocalStack`: MLflow, two shards,
the gateway, each its own process group), with shards in fp32 so that every greedy answer can be
checked against a reference computed offline with transformers + PEFT for the adapter version the
response headers name. Nine adapters (the three demo adapters and two variants of each), two
versions each, small cache tiers so that eviction happens all the time.

Meanwhile:
- clients (several tenants) send greedy completions, half of them streamed, over all adapters and
  the base model;
- a chaos loop kills shards (SIGKILL) and restarts them, stops MLflow and starts it again (now and
  then restarting a shard during the outage, which then serves from its disk cache), moves
  champions between versions and sets canaries and their percentages;
- a sampler records the gateway's and the shards' resident memory.

Afterwards it reports: answers whose text is not the reference of the version the headers name
(must be 0), requests that never finished (must be 0), every outcome outside the documented ones
(must be 0), latency and errors over time, and each process's RSS slope. JSON and PNG land in
bench/results/ (`soak.json`, `soak.png`; `--name` changes the stem).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import random
import secrets
import shutil
import signal
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

RESULTS_DIR = Path(__file__).resolve().parent / "results"
PROMPTS = (
    "",  # replaced by the demo prompt
    "Summarise the agreement in one sentence.",
    "What should the patient know?",
    "List the orders of last week.",
)
# Outcomes the README documents for a completion: 200, 429 and 503 (both with Retry-After), 504
# (the request timed out), and a stream cut by a dying shard (an error event `stream_cut`, no [DONE]).
DOCUMENTED = {"ok", "429", "503", "504", "stream_cut"}
VARIANT_FACTORS = {"": (1.0, 1.5), "-b": (0.6, 1.25), "-c": (0.8, 1.8)}


@dataclass
class SoakConfig:
    duration_s: float = float(os.environ.get("LORAPLEX_SOAK_DURATION_S", 1200))
    clients: int = 6
    max_tokens: int = 12
    chaos_every_s: tuple[float, float] = (15.0, 35.0)
    sample_every_s: float = 5.0
    request_timeout_s: float = 60.0
    seed: int = 7
    name: str = "soak"
    keep_state: bool = False


@dataclass
class Outcome:
    start: float  # seconds since the load began
    latency_s: float
    tenant: str
    model: str
    stream: bool
    outcome: str  # ok, an HTTP status, stream_cut, hung, transport:<error>
    adapter: str = ""
    version: str = ""
    route: str = ""
    correct: bool | None = None
    retry_after: bool = True


@dataclass
class Soak:
    config: SoakConfig
    t0: float = 0.0
    outcomes: list[Outcome] = field(default_factory=list)
    events: list[dict] = field(default_factory=list)
    memory: list[dict] = field(default_factory=list)
    wrong: list[dict] = field(default_factory=list)

    def now(self) -> float:
        return time.monotonic() - self.t0

    def event(self, kind: str, **details) -> None:
        self.events.append({"t": round(self.now(), 1), "event": kind, **details})
        print(f"[{self.now():7.1f}s] {kind} {details}", flush=True)


# ---- adapters and their offline reference --------------------------------------------------------

def variant_folder(source: Path, target: Path, factor: float) -> Path:
    """A copy of a demo adapter with lora_alpha scaled: other weights in effect, other greedy text."""
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(source, target)
    config_path = target / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["lora_alpha"] = config["lora_alpha"] * factor
    config_path.write_text(json.dumps(config, indent=2))
    return target


def build_adapter_folders(adapters: dict[str, Path], work: Path) -> dict[str, list[Path]]:
    """name -> [folder of its first version, folder of its second]."""
    folders: dict[str, list[Path]] = {}
    for base_name, source in adapters.items():
        for suffix, factors in VARIANT_FACTORS.items():
            name = f"{base_name}{suffix}"
            folders[name] = [
                source if factor == 1.0 else variant_folder(source, work / f"{name}-{factor}", factor) for factor in factors
            ]
    return folders


def offline_references(base_dir: Path, folders: dict[str, Path], prompts: list[str], max_tokens: int) -> dict[str, dict[str, str]]:
    """folder key -> prompt -> the greedy text of transformers + PEFT in fp32 ("base": no adapter)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loraplex.demo.probe import greedy_answer

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    answers = {"base": {p: greedy_answer(base, tokenizer, p, max_new_tokens=max_tokens) for p in prompts}}
    for key, folder in folders.items():
        model = PeftModel.from_pretrained(base, str(folder)).eval()
        answers[key] = {p: greedy_answer(model, tokenizer, p, max_new_tokens=max_tokens) for p in prompts}
        base = model.unload()
    return answers


# ---- tenants ----------------------------------------------------------------------------------------

def write_tenants(path: Path, admin_key: str, names: list[str]) -> dict[str, tuple[str, list[str]]]:
    """Four tenants over the adapters: tenant -> (key, models it may use)."""
    import yaml

    families = {family: [n for n in names if n.startswith(family)] for family in ("legal", "clinical", "sql")}
    grants = {
        "acme": names + ["base"],
        "globex": families["legal"],
        "initech": families["clinical"] + families["sql"],
        "umbrella": families["sql"] + families["legal"] + ["base"],
    }
    tenants = {t: (f"lpx-{t}-{secrets.token_hex(8)}", models) for t, models in grants.items()}
    document = {
        "admin_key_sha256": hashlib.sha256(admin_key.encode()).hexdigest(),
        "tenants": [
            {
                "name": t,
                "key_sha256": [hashlib.sha256(key.encode()).hexdigest()],
                "adapters": models,
                "default_adapter": models[0],
                "limits": {"concurrent_requests": 16, "tokens_per_minute": 10_000_000},
            }
            for t, (key, models) in tenants.items()
        ],
    }
    tmp = path.with_suffix(".soak-tmp")
    tmp.write_text(yaml.safe_dump(document, sort_keys=False))
    tmp.replace(path)
    return tenants


# ---- the load -----------------------------------------------------------------------------------

async def one_request(soak: Soak, http: httpx.AsyncClient, tenant: str, key: str, model: str, prompt: str,
                      stream: bool, references: dict, versions_of: dict[str, dict[str, str]]) -> Outcome:
    body = {"model": model, "prompt": prompt, "max_tokens": soak.config.max_tokens, "temperature": 0, "stream": stream}
    headers = {"Authorization": f"Bearer {key}"}
    start = soak.now()
    record = Outcome(start, 0.0, tenant, model, stream, "")
    text = ""
    try:
        async with http.stream("POST", "/v1/completions", json=body, headers=headers) as response:
            record.adapter = response.headers.get("x-loraplex-adapter", "")
            record.version = response.headers.get("x-loraplex-version", "")
            record.route = response.headers.get("x-loraplex-route", "")
            if response.status_code != 200:
                await response.aread()
                record.outcome = str(response.status_code)
                record.retry_after = response.status_code not in (429, 503) or "retry-after" in response.headers
            elif not stream:
                payload = json.loads(await response.aread())
                text, record.outcome = payload["choices"][0]["text"], "ok"
            else:
                done, cut = False, False
                async for line in response.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    data = line[len("data: "):]
                    if data == "[DONE]":
                        done = True
                        break
                    event = json.loads(data)
                    if "error" in event:
                        cut = True
                        record.outcome = "stream_cut" if event["error"].get("code") == "stream_cut" else f"stream_error:{event['error'].get('code')}"
                        break
                    text += event["choices"][0].get("text") or ""
                if not cut:
                    record.outcome = "ok" if done else "stream_unterminated"
    except httpx.HTTPError as error:
        record.outcome = f"transport:{type(error).__name__}"
    record.latency_s = soak.now() - start
    if record.outcome == "ok":
        expected = expected_answer(record, references, versions_of, prompt)
        record.correct = expected is not None and text.strip() == expected
        if not record.correct:
            soak.wrong.append({**asdict(record), "prompt": prompt, "text": text, "expected": expected})
    return record


def expected_answer(record: Outcome, references: dict, versions_of: dict[str, dict[str, str]], prompt: str) -> str | None:
    """The reference text of the version the headers name; None when the headers name something the
    request could not have been served by (another adapter, an unknown version)."""
    asked = record.model.partition("@")[0]
    if record.adapter in ("", "base") and (asked == "base" or record.route == "fallback"):
        return references["base"][prompt]
    if record.adapter != asked or record.version not in versions_of.get(asked, {}):
        return None
    return references[versions_of[asked][record.version]][prompt]


async def client_loop(soak: Soak, http: httpx.AsyncClient, rng: random.Random, tenants: dict, prompts: list[str],
                      references: dict, versions_of: dict, stop: asyncio.Event) -> None:
    hung_after_s = soak.config.request_timeout_s + 30
    while not stop.is_set():
        tenant = rng.choice(sorted(tenants))
        key, models = tenants[tenant]
        model, prompt, stream = rng.choice(models), rng.choice(prompts), rng.random() < 0.5
        started = soak.now()
        try:
            record = await asyncio.wait_for(
                one_request(soak, http, tenant, key, model, prompt, stream, references, versions_of), hung_after_s
            )
        except asyncio.TimeoutError:
            record = Outcome(started, soak.now() - started, tenant, model, stream, "hung")
        soak.outcomes.append(record)
        if record.outcome in ("429", "503"):
            await asyncio.sleep(0.5)  # as a client honouring Retry-After would, briefly


# ---- chaos ------------------------------------------------------------------------------------------

class Chaos:
    def __init__(self, soak: Soak, stack, registry, versions: dict[str, list[str]], rng: random.Random):
        self.soak, self.stack, self.registry, self.versions, self.rng = soak, stack, registry, versions, rng

    def shard_serving(self, shard_id: str) -> bool:
        from loraplex.stack.local_stack import shard_is_serving

        try:
            return shard_is_serving(self.stack.running.shard_addresses[shard_id])
        except Exception:  # noqa: BLE001 - not up yet
            return False

    def kill_shard(self, shard_id: str) -> None:
        self.soak.event("shard_killed", shard=shard_id)
        self.stack.shards[shard_id].kill()

    def start_shard(self, shard_id: str) -> None:
        process = self.stack.shards[shard_id]
        process.start()
        process.wait_until(lambda: self.shard_serving(shard_id), 300)
        self.soak.event("shard_restarted", shard=shard_id, pid=process.pid)

    def run(self, stop: threading.Event) -> None:
        low, high = self.soak.config.chaos_every_s
        actions = [(self.shard_crash, 3), (self.mlflow_outage, 2), (self.move_champion, 3), (self.canary, 3)]
        while not stop.wait(self.rng.uniform(low, high)):
            action = self.rng.choices([a for a, _ in actions], [w for _, w in actions])[0]
            try:
                action(stop)
            except Exception as error:  # noqa: BLE001 - a failed chaos step is reported, the soak goes on
                self.soak.event("chaos_step_failed", step=action.__name__, error=f"{type(error).__name__}: {error}")
        for shard_id, process in self.stack.shards.items():  # leave every part running for the final checks
            if not process.is_running():
                self.start_shard(shard_id)
        if not self.stack.mlflow.is_running():
            self.stack.mlflow.start()
            self.soak.event("mlflow_started")

    def shard_crash(self, stop: threading.Event) -> None:
        shard_id = self.rng.choice(sorted(self.stack.shards))
        self.kill_shard(shard_id)
        stop.wait(self.rng.uniform(3, 12))
        self.start_shard(shard_id)

    def mlflow_outage(self, stop: threading.Event) -> None:
        self.stack.mlflow.stop()
        self.soak.event("mlflow_stopped")
        stop.wait(self.rng.uniform(5, 15))
        if self.rng.random() < 0.5:  # a shard restarted while MLflow is down serves from its disk cache
            shard_id = self.rng.choice(sorted(self.stack.shards))
            self.kill_shard(shard_id)
            self.start_shard(shard_id)
        stop.wait(self.rng.uniform(5, 15))
        self.stack.mlflow.start()
        self.soak.event("mlflow_started")

    def move_champion(self, stop: threading.Event) -> None:
        name = self.rng.choice(sorted(self.versions))
        version = self.rng.choice(self.versions[name])
        self.registry.promote(name, version, "champion")
        self.soak.event("champion_moved", adapter=name, version=version)

    def canary(self, stop: threading.Event) -> None:
        name = self.rng.choice(sorted(self.versions))
        version = self.rng.choice(self.versions[name])
        percent = self.rng.choice([0, 10, 50, 100])
        self.registry.promote(name, version, "canary")
        self.registry.set_canary_percent(name, percent)
        self.soak.event("canary_set", adapter=name, version=version, percent=percent)


# ---- memory -----------------------------------------------------------------------------------------

def sample_memory(soak: Soak, stack, stop: threading.Event) -> None:
    import psutil

    while not stop.wait(soak.config.sample_every_s):
        processes = {"gateway": stack.gateway, **stack.shards}
        for name, process in processes.items():
            if process is None or not process.is_running():
                continue
            with contextlib.suppress(psutil.Error):
                rss = psutil.Process(process.pid).memory_info().rss
                if rss == 0:  # killed, not yet reaped
                    continue
                soak.memory.append({"t": round(soak.now(), 1), "process": name, "pid": process.pid, "rss_mb": round(rss / 2**20, 1)})


def rss_slopes(samples: list[dict], skip_first_s: float) -> list[dict]:
    """MB per hour by least squares, per process lifetime (a restarted shard is a new pid), over
    samples after `skip_first_s` of the lifetime (warm-up: caches filling, allocator settling)."""
    import numpy as np

    lives: dict[tuple[str, int], list[dict]] = {}
    for sample in samples:
        lives.setdefault((sample["process"], sample["pid"]), []).append(sample)
    slopes = []
    for (name, pid), points in sorted(lives.items(), key=lambda item: item[1][0]["t"]):
        start = points[0]["t"]
        steady = [p for p in points if p["t"] - start >= skip_first_s]
        entry = {"process": name, "pid": pid, "from_s": start, "to_s": points[-1]["t"],
                 "rss_first_mb": points[0]["rss_mb"], "rss_last_mb": points[-1]["rss_mb"],
                 "rss_max_mb": max(p["rss_mb"] for p in points)}
        if len(steady) >= 6 and steady[-1]["t"] - steady[0]["t"] >= 120:
            t = np.array([p["t"] for p in steady]) / 3600
            entry["slope_mb_per_hour"] = round(float(np.polyfit(t, [p["rss_mb"] for p in steady], 1)[0]), 1)
            entry["steady_window_s"] = round(steady[-1]["t"] - steady[0]["t"])
        slopes.append(entry)
    return slopes


# ---- report -----------------------------------------------------------------------------------------

def summarise(soak: Soak, setup: dict) -> dict:
    from bench.machine import machine_info, software_versions

    outcomes = soak.outcomes
    by_outcome: dict[str, int] = {}
    for o in outcomes:
        by_outcome[o.outcome] = by_outcome.get(o.outcome, 0) + 1
    ok = [o for o in outcomes if o.outcome == "ok"]
    latencies = sorted(o.latency_s for o in ok)

    def pct(q: float) -> float | None:
        return round(latencies[min(len(latencies) - 1, int(q * len(latencies)))], 3) if latencies else None

    undocumented = {k: v for k, v in by_outcome.items() if k not in DOCUMENTED}
    routes: dict[str, int] = {}
    for o in ok:
        routes[o.route] = routes.get(o.route, 0) + 1
    return {
        "what": "chaos soak over the real stack (loraplex.stack.LocalStack): mixed streamed and plain greedy "
                "completions from several tenants over many adapter versions while shards are killed and "
                "restarted, MLflow is stopped and started, champions and canaries move",
        "machine": machine_info(),
        "software": software_versions(),
        "note": "Shared 2-core machine, loaded by other engineers' tests and servers during the run: "
                "latencies are not a speed measurement.",
        "config": {**asdict(soak.config), **setup},
        "duration_s": round(soak.now(), 1),
        "requests": len(outcomes),
        "by_outcome": by_outcome,
        "by_route": routes,
        "wrong_answers": len(soak.wrong),
        "wrong_examples": soak.wrong[:10],
        "hung_requests": by_outcome.get("hung", 0),
        "undocumented_outcomes": undocumented,
        "missing_retry_after": sum(1 for o in outcomes if not o.retry_after),
        "checked_answers": sum(1 for o in ok if o.correct is not None),
        "latency_ok_s": {"p50": pct(0.5), "p95": pct(0.95), "p99": pct(0.99), "max": latencies[-1] if latencies else None},
        "chaos_events": soak.events,
        "rss": rss_slopes(soak.memory, skip_first_s=min(300.0, soak.config.duration_s / 4)),
        "memory_samples": soak.memory,
        "requests_over_time": [[round(o.start, 2), round(o.latency_s, 3), o.outcome, o.route] for o in outcomes],
    }


def timeline(rows: list[list], bucket_s: float = 10.0) -> list[dict]:
    """Per `bucket_s` of the run: requests by outcome and the latency of the answered ones."""
    buckets: dict[int, list[list]] = {}
    for row in rows:
        buckets.setdefault(int(row[0] // bucket_s), []).append(row)
    out = []
    for index in sorted(buckets):
        group = buckets[index]
        latencies = sorted(r[1] for r in group if r[2] == "ok")
        counts: dict[str, int] = {}
        for r in group:
            counts[r[2]] = counts.get(r[2], 0) + 1
        out.append({
            "t": index * bucket_s,
            "outcomes": counts,
            "latency_p50_s": latencies[len(latencies) // 2] if latencies else None,
            "latency_max_s": latencies[-1] if latencies else None,
        })
    return out


def write_report(report: dict, stem: Path) -> None:
    """`stem`.png from every request; `stem`.json with the per-request rows folded into a timeline
    (one line per bucket and per memory sample, so the file stays readable and small)."""
    plot(report, stem.with_suffix(".png"))
    lists = {"timeline": timeline(report["requests_over_time"]), "memory_samples": report["memory_samples"]}
    head = {k: v for k, v in report.items() if k not in ("requests_over_time", "memory_samples")}
    text = json.dumps(head, indent=1)[: -len("\n}")]
    for key, items in lists.items():
        text += f',\n "{key}": [\n  ' + ",\n  ".join(json.dumps(item) for item in items) + "\n ]"
    stem.with_suffix(".json").write_text(text + "\n}\n")


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["requests_over_time"]
    fig, (ax_latency, ax_errors, ax_memory) = plt.subplots(3, 1, figsize=(12, 10), sharex=True)
    ok = [(t, lat) for t, lat, outcome, _ in rows if outcome == "ok"]
    bad = [(t, lat) for t, lat, outcome, _ in rows if outcome != "ok"]
    if ok:
        ax_latency.scatter(*zip(*ok), s=3, alpha=0.4, label="200")
    if bad:
        ax_latency.scatter(*zip(*bad), s=8, color="red", label="not 200")
    ax_latency.set_ylabel("latency (s)")
    ax_latency.legend(loc="upper right")
    bucket = 30.0
    buckets: dict[str, dict[int, int]] = {}
    for t, _, outcome, _ in rows:
        if outcome != "ok":
            buckets.setdefault(outcome, {}).setdefault(int(t // bucket), 0)
            buckets[outcome][int(t // bucket)] += 1
    for outcome, counts in sorted(buckets.items()):
        xs = sorted(counts)
        ax_errors.bar([x * bucket for x in xs], [counts[x] for x in xs], width=bucket * 0.9, align="edge", alpha=0.6, label=outcome)
    ax_errors.set_ylabel(f"failures per {bucket:.0f} s")
    if buckets:
        ax_errors.legend(loc="upper right")
    lives: dict[tuple[str, int], list[dict]] = {}
    for sample in report["memory_samples"]:
        lives.setdefault((sample["process"], sample["pid"]), []).append(sample)
    colours = {"gateway": "black", "shard-0": "tab:blue", "shard-1": "tab:orange"}
    labelled = set()
    for (name, _), points in lives.items():
        ax_memory.plot([p["t"] for p in points], [p["rss_mb"] for p in points], color=colours.get(name),
                       label=None if name in labelled else name)
        labelled.add(name)
    ax_memory.set_ylabel("RSS (MB)")
    ax_memory.set_xlabel("seconds since the load began")
    ax_memory.legend(loc="upper right")
    markers = {"shard_killed": "red", "mlflow_stopped": "purple", "mlflow_started": "green",
               "champion_moved": "grey", "canary_set": "goldenrod"}
    for event in report["chaos_events"]:
        colour = markers.get(event["event"])
        if colour:
            for axis in (ax_latency, ax_errors, ax_memory):
                axis.axvline(event["t"], color=colour, alpha=0.3, linewidth=0.8)
    fig.suptitle(
        f"chaos soak: {report['requests']} requests, {report['wrong_answers']} wrong, {report['hung_requests']} hung "
        f"— {report['machine']['cpu']} (shared, loaded)\nlines: red shard killed, purple/green MLflow stopped/started, "
        "grey champion moved, gold canary set",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---- the run ----------------------------------------------------------------------------------------

def run(config: SoakConfig) -> dict:
    from loraplex.demo import ensure_demo_assets
    from loraplex.stack.local_stack import LocalStack, LocalStackConfig
    from registry import AdapterRegistry

    rng = random.Random(config.seed)
    assets = ensure_demo_assets(progress=True)
    prompts = [assets.demo_prompt, *PROMPTS[1:]]
    state = Path(tempfile.mkdtemp(prefix="loraplex-soak-"))
    adapter_bytes = sum(f.stat().st_size for f in Path(assets.adapters["legal"]).rglob("*") if f.is_file())
    # Small tiers, so that eviction runs all the time: 18 versions against 6 device slots, about 5
    # in host memory and 8 on disk.
    setup = {
        "shards": 2,
        "quantization": "fp32",
        "device_slots": 6,
        "host_cache_bytes": 5 * adapter_bytes,
        "disk_cache_bytes": 8 * adapter_bytes,
    }
    stack = LocalStack(
        LocalStackConfig(
            state_dir=state,
            always_free_ports=True,
            quantization="fp32",
            gateway_env={
                "LORAPLEX_GATEWAY_REGISTRY_POLL_INTERVAL_S": "1",
                "LORAPLEX_GATEWAY_HEALTH_INTERVAL_S": "0.5",
                "LORAPLEX_GATEWAY_HEALTH_TIMEOUT_S": "1",
                "LORAPLEX_GATEWAY_REQUEST_TIMEOUT_S": str(config.request_timeout_s),
            },
            shard_env={
                # A build folder of the soak's own for the shards' C++ kernel: one shared with other
                # checkouts is rebuilt whenever another checkout's path wrote it last (minutes
                # per shard restart on a loaded machine); this one is built once and reused.
                "TORCH_EXTENSIONS_DIR": str(Path.home() / ".cache" / "loraplex" / "soak-torch-extensions"),
                "LORAPLEX_SHARD_DEVICE_SLOTS": str(setup["device_slots"]),
                "LORAPLEX_SHARD_HOST_CACHE_BYTES": str(setup["host_cache_bytes"]),
                "LORAPLEX_SHARD_DISK_CACHE_BYTES": str(setup["disk_cache_bytes"]),
            },
        )
    )
    soak = Soak(config)
    try:
        running = stack.start(log=lambda line: print(line, flush=True))
        registry = AdapterRegistry(running.mlflow_url, state / "soak-registry-cache")
        folders = build_adapter_folders(assets.adapters, state / "variants")
        versions: dict[str, list[str]] = {}
        versions_of: dict[str, dict[str, str]] = {}
        reference_folders: dict[str, Path] = {}
        for name, pair in folders.items():
            versions[name] = []
            versions_of[name] = {}
            for index, folder in enumerate(pair):
                published = _publish_once(registry, folder, name, assets.base_dir, alias="champion" if index == 0 else None)
                versions[name].append(published)
                versions_of[name][published] = f"{name}@{published}"
                reference_folders[f"{name}@{published}"] = folder
        print("computing the offline references (transformers + PEFT, fp32)…", flush=True)
        references = offline_references(Path(assets.base_dir), reference_folders, prompts, config.max_tokens)
        distinct = sum(
            1 for name, pair in versions.items()
            if any(references[versions_of[name][pair[0]]][p] != references[versions_of[name][pair[1]]][p] for p in prompts)
        )
        setup.update({"adapters": len(versions), "versions": sum(len(v) for v in versions.values()),
                      "adapters_whose_two_versions_answer_differently": distinct, "prompts": len(prompts),
                      # Of the 19 references (18 versions and the base), how many texts differ per prompt:
                      # an answer from another version or adapter is caught unless it happens to match.
                      "distinct_reference_answers_per_prompt": [len({references[k][p] for k in references}) for p in prompts],
                      "adapter_folder_bytes": adapter_bytes})
        tenants = write_tenants(running.tenants_file, running.keys.admin_key, sorted(versions))
        with httpx.Client(base_url=running.gateway_admin_url, timeout=30) as admin:
            reply = admin.post("/admin/routing/reload", headers={"Authorization": f"Bearer {running.keys.admin_key}"})
            reply.raise_for_status()
        setup["tenants"] = {t: len(models) for t, (_, models) in tenants.items()}
        soak.t0 = time.monotonic()
        soak.event("load_started", clients=config.clients, duration_s=config.duration_s)
        stop = threading.Event()
        chaos = Chaos(soak, stack, registry, versions, random.Random(config.seed + 1))
        threads = [threading.Thread(target=chaos.run, args=(stop,), name="chaos"),
                   threading.Thread(target=sample_memory, args=(soak, stack, stop), name="memory")]
        for thread in threads:
            thread.start()
        try:
            asyncio.run(_load(soak, running.gateway_url, rng, tenants, prompts, references, versions_of, config.duration_s))
        finally:
            stop.set()
            for thread in threads:
                thread.join(timeout=600)
        soak.event("load_stopped")
        report = summarise(soak, setup)
    finally:
        stack.stop()
        if not config.keep_state:
            shutil.rmtree(state, ignore_errors=True)
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    write_report(report, RESULTS_DIR / config.name)
    return report


def _publish_once(registry, folder: Path, name: str, base_dir: Path, alias: str | None) -> str:
    """The version holding `folder`'s content (published now unless it already is)."""
    from loraplex.adapter_format import folder_sha256
    from registry import AdapterNotFound

    content = folder_sha256(folder)
    try:
        existing = [v for v in registry.versions(name) if v.folder_sha256 == content]
    except AdapterNotFound:
        existing = []
    version = existing[0].version if existing else registry.publish(folder, name, Path(base_dir)).version
    if alias is not None:
        registry.promote(name, version, alias)
    return version


async def _load(soak: Soak, url: str, rng: random.Random, tenants: dict, prompts: list[str], references: dict,
                versions_of: dict, duration_s: float) -> None:
    stop = asyncio.Event()
    limits = httpx.Limits(max_connections=soak.config.clients * 2)
    async with httpx.AsyncClient(base_url=url, timeout=soak.config.request_timeout_s + 60, limits=limits) as http:
        clients = [
            asyncio.create_task(client_loop(soak, http, random.Random(rng.random()), tenants, prompts, references, versions_of, stop))
            for _ in range(soak.config.clients)
        ]
        await asyncio.sleep(duration_s)
        stop.set()
        await asyncio.gather(*clients)


def _interrupted(signum, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n\n")[0])
    defaults = SoakConfig()
    parser.add_argument("--duration-s", type=float, default=defaults.duration_s,
                        help="how long the load and the chaos run (default 1200, or $LORAPLEX_SOAK_DURATION_S)")
    parser.add_argument("--clients", type=int, default=defaults.clients)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--name", default=defaults.name, help="stem of the result files in bench/results/")
    parser.add_argument("--keep-state", action="store_true", help="keep the stack's state folder (logs) afterwards")
    args = parser.parse_args(argv)
    # Stopped with SIGTERM (or SIGINT, which a shell leaves ignored for background jobs), the soak
    # still stops every process of its stack on the way out.
    signal.signal(signal.SIGTERM, _interrupted)
    signal.signal(signal.SIGINT, _interrupted)
    config = SoakConfig(duration_s=args.duration_s, clients=args.clients, seed=args.seed, name=args.name, keep_state=args.keep_state)
    report = run(config)
    print(json.dumps({k: report[k] for k in ("duration_s", "requests", "by_outcome", "wrong_answers", "hung_requests",
                                              "undocumented_outcomes", "missing_retry_after", "latency_ok_s")}, indent=1))
    for entry in report["rss"]:
        print(entry)
    failed = report["wrong_answers"] or report["hung_requests"] or report["undocumented_outcomes"] or report["missing_retry_after"]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
