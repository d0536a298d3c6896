"""The gateway's own latency: p50/p99 added over calling the shard's gRPC directly.

    python bench/gateway_overhead.py [--quick] [--out bench/results]

One real shard (`python -m shard`, demo base model, the demo `legal` adapter from its folder) and
one real gateway (`python -m gateway`) in front of it. `concurrency` clients send 1-token
completions, in batches that alternate between the two paths - straight to the shard's `Generate`
and through the gateway's `POST /v1/completions` - so both see the same machine load and the same
shard; the added latency is the difference of the two paths' percentiles, per round and overall.
Issue 5's goal: at most 2 ms p50 added at 64 concurrent clients.

On this 2-core machine the shard, the gateway and the load generator share both cores, so every
CPU millisecond the gateway spends comes out of the shard's budget and shows up as queueing at 64
clients. The benchmark therefore measures twice on the same processes: unpinned (the OS schedules
freely) and pinned (the shard alone on core 0, the gateway and the clients on core 1, set on every
thread with sched_setaffinity), which is closer to a deployment where the gateway has its own
cores. The gateway's CPU milliseconds per request are reported beside both: that number carries
over to other machines, a latency difference on shared cores does not.

Writes gateway_overhead.json and gateway_overhead.png into --out.

    python bench/gateway_overhead.py --workers-sweep

measures the same two paths through 1, 2 and 4 gateway workers on one port, which share tenant
limits through a real Valkey server, at 1, 64 and 256 clients (gateway_workers.json / .png). Timings on a shared machine are
noisy: read the per-round spread in the JSON before trusting a single number.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import platform
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

GOAL_P50_ADDED_MS = 2.0
GOAL_GATEWAY_CPU_MS = 0.25  # gateway CPU per non-streamed request, at the full profile's clients
GOAL_P50_ADDED_MS_1_CLIENT = 1.0
LOOPBACK = "127.0.0.1"


@dataclass(frozen=True)
class Profile:
    name: str
    concurrency: int
    rounds: int
    requests_per_batch: int
    warmup_requests: int
    max_tokens: int = 1
    quantization: str = "bf16"
    shard_max_batch: int = 64


# Many short interleaved rounds: other work on a shared machine moves both paths' latency from one
# batch to the next, and a difference taken within a round cancels most of that drift.
FULL = Profile("full", concurrency=64, rounds=16, requests_per_batch=320, warmup_requests=256)
QUICK = Profile("quick", concurrency=64, rounds=8, requests_per_batch=192, warmup_requests=128)
TOY = Profile("toy", concurrency=4, rounds=2, requests_per_batch=12, warmup_requests=4, shard_max_batch=8)


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile, q in [0, 100]."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = (len(ordered) - 1) * q / 100.0
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def summary_ms(latencies_s: list[float]) -> dict[str, float]:
    ms = [x * 1000.0 for x in latencies_s]
    return {"n": len(ms), "p50": percentile(ms, 50), "p90": percentile(ms, 90), "p99": percentile(ms, 99), "mean": statistics.fmean(ms)}


def process_cpu_s(pid: int | None) -> float | None:
    """User + system CPU seconds a process and its live children (a gateway's workers) have used so
    far (Linux /proc), or None."""
    if pid is None:
        return None
    total = None
    for member in [pid, *_descendants(pid)]:
        try:
            fields = Path(f"/proc/{member}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        total = (total or 0.0) + (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def _descendants(pid: int) -> list[int]:
    found: list[int] = []
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for tid in tids:
        try:
            children = [int(c) for c in Path(f"/proc/{pid}/task/{tid}/children").read_text().split()]
        except OSError:
            continue
        for child in children:
            found += [child, *_descendants(child)]
    return found


class CpuMeter:
    """CPU seconds used by the shard, the gateway and this (client) process during one batch."""

    def __init__(self, pids: dict[str, int | None]):
        self.pids = pids

    def read(self) -> dict[str, float | None]:
        return {**{name: process_cpu_s(pid) for name, pid in self.pids.items()}, "client": time.process_time()}

    @staticmethod
    def per_request_ms(before: dict, after: dict, requests: int) -> dict[str, float | None]:
        return {
            name: None if before[name] is None or after[name] is None else (after[name] - before[name]) * 1000.0 / max(1, requests)
            for name in before
        }


def set_process_affinity(pid: int, cpus: set[int]) -> None:
    """Every thread of `pid` (sched_setaffinity on a pid moves only its main thread); threads started
    later inherit the mask of the thread that starts them."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            os.sched_setaffinity(int(tid), cpus)
        except (ProcessLookupError, FileNotFoundError):
            pass  # a thread that ended meanwhile


def pinning_layout() -> dict[str, set[int]] | None:
    """The shard alone on one core; the gateway and the clients on the other. None below 2 cores."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return None
    return {"shard": {cpus[0]}, "gateway": set(cpus[1:]), "client": set(cpus[1:])}


class Pinned:
    """Pins the shard, the gateway and this process for the duration of a `with` block."""

    def __init__(self, processes: BenchProcesses, layout: dict[str, set[int]]):
        self.processes, self.layout = processes, layout
        self._everywhere = os.sched_getaffinity(0)

    def __enter__(self) -> Pinned:
        self._apply(self.layout)
        return self

    def __exit__(self, *exc) -> None:
        self._apply({role: self._everywhere for role in self.layout})

    def _apply(self, layout: dict[str, set[int]]) -> None:
        set_process_affinity(self.processes.shard.pid, layout["shard"])
        set_process_affinity(self.processes.gateway.pid, layout["gateway"])
        set_process_affinity(os.getpid(), layout["client"])


# ---- the processes ----------------------------------------------------------------------------


class BenchProcesses:
    """A shard and a gateway on loopback, stopped by process group when done."""

    def __init__(
        self,
        base_dir: Path,
        adapter_dir: Path,
        work_dir: Path,
        profile: Profile,
        torch_threads: int = 1,
        gateway_workers: int = 1,
        redis_url: str = "",
        gateway_env: dict[str, str] | None = None,
    ):
        self.base_dir, self.adapter_dir, self.work_dir, self.profile = base_dir, adapter_dir, work_dir, profile
        self.torch_threads = torch_threads
        self.gateway_workers, self.redis_url = gateway_workers, redis_url
        self.extra_gateway_env = dict(gateway_env or {})
        self.api_key = "bench-" + hashlib.sha256(os.urandom(16)).hexdigest()[:24]
        self.shard = None
        self.gateway = None
        self.shard_address = ""
        self.gateway_url = ""

    def __enter__(self) -> BenchProcesses:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        import yaml

        from loraplex.stack.local_stack import shard_is_serving
        from loraplex.stack.ports import free_port
        from loraplex.stack.processes import ManagedProcess

        logs = self.work_dir / "logs"
        shard_port = free_port()
        self.shard_address = f"{LOOPBACK}:{shard_port}"
        shard_env = {
            **self.clean_env(),
            "LORAPLEX_SHARD_SHARD_ID": "bench-shard",
            "LORAPLEX_SHARD_HOST": LOOPBACK,
            "LORAPLEX_SHARD_PORT": str(shard_port),
            "LORAPLEX_SHARD_MODEL_DIR": str(self.base_dir),
            "LORAPLEX_SHARD_QUANTIZATION": self.profile.quantization,
            "LORAPLEX_SHARD_ADAPTER_DIRS": json.dumps({"legal": str(self.adapter_dir)}),
            "LORAPLEX_SHARD_MAX_BATCH_SIZE": str(self.profile.shard_max_batch),
            "LORAPLEX_SHARD_MAX_QUEUE": str(max(64, 2 * self.profile.concurrency)),
            "LORAPLEX_SHARD_TORCH_THREADS": str(self.torch_threads),
            "LORAPLEX_SHARD_LOG_LEVEL": "WARNING",
        }
        self.shard = ManagedProcess("shard", [sys.executable, "-m", "shard"], log_path=logs / "shard.log", env=shard_env)
        self.shard.start()

        tenants = self.work_dir / "tenants.yaml"
        tenants.write_text(
            yaml.safe_dump(
                {
                    "admin_key_sha256": hashlib.sha256(b"bench-admin-" + os.urandom(8)).hexdigest(),
                    "tenants": [
                        {
                            "name": "bench",
                            "key_sha256": [hashlib.sha256(self.api_key.encode()).hexdigest()],
                            "adapters": ["legal", "base"],
                            "limits": {"concurrent_requests": 10 * self.profile.concurrency, "tokens_per_minute": 100_000_000},
                        }
                    ],
                }
            )
        )
        self.shard.wait_until(lambda: shard_is_serving(self.shard_address), 300)
        self.start_gateway()

    @staticmethod
    def clean_env() -> dict[str, str]:
        return {k: v for k, v in os.environ.items() if not k.startswith(("LORAPLEX_SHARD_", "LORAPLEX_GATEWAY_"))}

    def gateway_env(self, port: int, admin_port: int) -> dict[str, str]:
        return {
            **self.clean_env(),
            "LORAPLEX_GATEWAY_HOST": LOOPBACK,
            "LORAPLEX_GATEWAY_PORT": str(port),
            "LORAPLEX_GATEWAY_ADMIN_PORT": str(admin_port),
            "LORAPLEX_GATEWAY_SHARD_ADDRESSES": self.shard_address,
            # A shard busy with 64 rows on a shared machine must not look dead to the health check.
            "LORAPLEX_GATEWAY_HEALTH_TIMEOUT_S": "3.0",
            "LORAPLEX_GATEWAY_TENANTS_FILE": str(self.work_dir / "tenants.yaml"),
            "LORAPLEX_GATEWAY_STATIC_ROUTES": json.dumps({"legal": {"champion": "local"}}),
            "LORAPLEX_GATEWAY_WORKERS": str(self.gateway_workers),
            "LORAPLEX_GATEWAY_REDIS_URL": self.redis_url,
            **self.extra_gateway_env,
        }

    def start_gateway(self) -> None:
        from loraplex.stack.local_stack import gateway_is_ready
        from loraplex.stack.ports import free_port
        from loraplex.stack.processes import ManagedProcess

        gateway_port, admin_port = free_port(), free_port()
        self.gateway = ManagedProcess(
            "gateway",
            [sys.executable, "-m", "gateway", "--log-level", "warning"],
            log_path=self.work_dir / "logs" / f"gateway-{self.gateway_workers}w.log",
            env=self.gateway_env(gateway_port, admin_port),
        )
        self.gateway.start()
        self.gateway_url = f"http://{LOOPBACK}:{gateway_port}"
        self.gateway.wait_until(lambda: gateway_is_ready(self.gateway_url), 120)

    def start_profiled_gateway(self, profile_path: Path):
        """One more gateway process (one worker) under bench/gateway_profile.py's profiler; (process, URL)."""
        from loraplex.stack.ports import free_port
        from loraplex.stack.processes import ManagedProcess

        port, admin_port = free_port(), free_port()
        process = ManagedProcess(
            "gateway-profiled",
            [sys.executable, "-m", "bench.gateway_profile", str(profile_path), "--log-level", "warning"],
            log_path=self.work_dir / "logs" / "gateway-profiled.log",
            env={**self.gateway_env(port, admin_port), "LORAPLEX_GATEWAY_WORKERS": "1"},
        )
        process.start()
        return process, f"http://{LOOPBACK}:{port}"

    def restart_gateway(self, workers: int) -> None:
        self.gateway.stop()
        self.gateway_workers = workers
        self.start_gateway()

    def stop(self) -> None:
        for process in (self.gateway, self.shard):
            if process is not None:
                process.stop()


# ---- the two paths --------------------------------------------------------------------------------


class DirectPath:
    """The shard's `Generate`, read to its last chunk - what the gateway does for a non-streamed request."""

    name = "direct"

    def __init__(self, address: str, prompt: str, max_tokens: int):
        import grpc

        from protos import shard_pb2, shard_pb2_grpc

        self._channel = grpc.aio.insecure_channel(address)
        self._stub = shard_pb2_grpc.ShardStub(self._channel)
        self._request = shard_pb2.GenerateRequest(
            adapter=shard_pb2.AdapterRef(name="legal", version="local"),
            prompt=prompt,
            sampling=shard_pb2.SamplingParams(max_tokens=max_tokens, temperature=0.0),
        )

    async def send(self) -> None:
        async for chunk in self._stub.Generate(self._request, timeout=120):
            if chunk.finish_reason:
                return
        raise RuntimeError("the shard ended the stream without a finish reason")

    async def close(self) -> None:
        await self._channel.close()


class HttpxGatewayPath:
    """`POST /v1/completions` through the gateway with httpx, over keep-alive connections (one per client)."""

    name = "gateway"
    client_library = "httpx"

    def __init__(self, url: str, api_key: str, prompt: str, max_tokens: int, concurrency: int):
        import httpx

        self._client = httpx.AsyncClient(
            base_url=url,
            timeout=120,
            limits=httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency),
        )
        self._headers = {"Authorization": f"Bearer {api_key}"}
        self._body = {"model": "legal", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}

    async def send(self) -> None:
        response = await self._client.post("/v1/completions", json=self._body, headers=self._headers)
        if response.status_code != 200:
            raise RuntimeError(f"gateway answered {response.status_code}: {response.text[:200]}")

    async def close(self) -> None:
        await self._client.aclose()


class AiohttpGatewayPath:
    """The same with aiohttp (C HTTP parser): the client's own CPU cost is far smaller than httpx's,
    and on a 2-core machine the client competes with the gateway for the same cores."""

    name = "gateway"
    client_library = "aiohttp"

    def __init__(self, url: str, api_key: str, prompt: str, max_tokens: int, concurrency: int):
        import aiohttp

        self._url = f"{url}/v1/completions"
        self._session = aiohttp.ClientSession(
            # Idle connections close on this side first: the gateway's uvicorn closes them after 5 s, and
            # a request sent on one it is closing fails with "Server disconnected" (idle gaps happen
            # while the other path's batch runs on a loaded machine).
            connector=aiohttp.TCPConnector(limit=concurrency, keepalive_timeout=2.0),
            timeout=aiohttp.ClientTimeout(total=120),
        )
        self._headers = {"Authorization": f"Bearer {api_key}", "Content-Type": "application/json"}
        self._body = json.dumps({"model": "legal", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}).encode()

    async def send(self) -> None:
        async with self._session.post(self._url, data=self._body, headers=self._headers) as response:
            body = await response.read()
            if response.status != 200:
                raise RuntimeError(f"gateway answered {response.status}: {body[:200]!r}")

    async def close(self) -> None:
        await self._session.close()


def gateway_path_class():
    """aiohttp when installed (MLflow depends on it), else httpx (a pinned dependency)."""
    try:
        import aiohttp  # noqa: F401
    except ImportError:
        return HttpxGatewayPath
    return AiohttpGatewayPath


async def run_batch(path, requests: int, concurrency: int) -> dict:
    """`requests` calls by `concurrency` clients in a closed loop; per-request latencies in seconds."""
    latencies: list[float] = []
    errors: list[str] = []
    remaining = iter(range(requests))

    async def client() -> None:
        for _ in remaining:
            started = time.perf_counter()
            try:
                await path.send()
            except Exception as error:  # counted and reported, never hidden
                errors.append(repr(error)[:200])
                continue
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    return {"latencies": latencies, "errors": errors, "seconds": time.perf_counter() - started}


async def measure(processes: BenchProcesses, profile: Profile, prompt: str, log=print, gateway_path=None, store_pid: int | None = None) -> dict:
    cpu = CpuMeter({"shard": processes.shard.pid, "gateway": processes.gateway.pid, **({"store": store_pid} if store_pid else {})})
    direct = DirectPath(processes.shard_address, prompt, profile.max_tokens)
    via_gateway = (gateway_path or gateway_path_class())(processes.gateway_url, processes.api_key, prompt, profile.max_tokens, profile.concurrency)
    rounds = []
    all_latencies = {"direct": [], "gateway": []}
    try:
        for path in (direct, via_gateway):  # connections open, adapter loaded, code paths warm
            warm = await run_batch(path, profile.warmup_requests, profile.concurrency)
            if warm["errors"]:
                raise RuntimeError(f"warm-up on the {path.name} path failed: {warm['errors'][:3]}")
        for index in range(profile.rounds):
            order = (direct, via_gateway) if index % 2 == 0 else (via_gateway, direct)
            this_round = {"round": index, "order": [p.name for p in order]}
            for path in order:
                cpu_before = cpu.read()
                batch = await run_batch(path, profile.requests_per_batch, profile.concurrency)
                cpu_ms = CpuMeter.per_request_ms(cpu_before, cpu.read(), len(batch["latencies"]))
                if batch["errors"]:
                    raise RuntimeError(f"{len(batch['errors'])} {path.name} requests failed: {batch['errors'][:3]}")
                all_latencies[path.name].extend(batch["latencies"])
                this_round[path.name] = {
                    **summary_ms(batch["latencies"]),
                    "requests_per_s": len(batch["latencies"]) / batch["seconds"],
                    "cpu_ms_per_request": cpu_ms,
                }
            this_round["added_p50_ms"] = this_round["gateway"]["p50"] - this_round["direct"]["p50"]
            this_round["added_p99_ms"] = this_round["gateway"]["p99"] - this_round["direct"]["p99"]
            rounds.append(this_round)
            log(
                f"round {index}: direct p50 {this_round['direct']['p50']:.1f} ms, gateway p50 {this_round['gateway']['p50']:.1f} ms, "
                f"added p50 {this_round['added_p50_ms']:.1f} ms, p99 {this_round['added_p99_ms']:.1f} ms"
            )
    finally:
        await direct.close()
        await via_gateway.close()
    overall = {name: summary_ms(values) for name, values in all_latencies.items()}
    cpu_per_request = {
        path: {
            proc: statistics.median([r[path]["cpu_ms_per_request"][proc] for r in rounds if r[path]["cpu_ms_per_request"][proc] is not None] or [float("nan")])
            for proc in cpu.pids.keys() | {"client"}
        }
        for path in ("direct", "gateway")
    }
    throughput = {path: statistics.median([r[path]["requests_per_s"] for r in rounds]) for path in ("direct", "gateway")}
    added_p50 = [r["added_p50_ms"] for r in rounds]
    added_p99 = [r["added_p99_ms"] for r in rounds]
    return {
        "concurrency": profile.concurrency,
        "http_client": via_gateway.client_library,
        "overall": overall,
        # Headline: the median over rounds of (gateway - direct) within a round; pooled percentiles
        # mix rounds taken under different machine load.
        "added_ms": {
            "p50": statistics.median(added_p50),
            "p99": statistics.median(added_p99),
            "p50_range": [min(added_p50), max(added_p50)],
            "p99_range": [min(added_p99), max(added_p99)],
            "pooled_p50": overall["gateway"]["p50"] - overall["direct"]["p50"],
            "pooled_p99": overall["gateway"]["p99"] - overall["direct"]["p99"],
        },
        "cpu_ms_per_request": cpu_per_request,
        "requests_per_s": throughput,
        "rounds": rounds,
        "latencies_ms": {name: [round(x * 1000.0, 3) for x in values] for name, values in all_latencies.items()},
    }


def profile_gateway(processes: BenchProcesses, profile: Profile, prompt: str, log=print) -> dict:
    """One batch of the same load through a second gateway process, profiled (bench/gateway_profile.py)."""
    from loraplex.stack.local_stack import gateway_is_ready

    from bench.gateway_profile import summarize

    out = processes.work_dir / "gateway.prof"
    process, url = processes.start_profiled_gateway(out)
    try:
        process.wait_until(lambda: gateway_is_ready(url), 120)
        async def batches() -> int:
            path = gateway_path_class()(url, processes.api_key, prompt, profile.max_tokens, profile.concurrency)
            try:
                await run_batch(path, profile.warmup_requests, profile.concurrency)
                os.kill(process.pid, signal.SIGUSR1)
                batch = await run_batch(path, profile.requests_per_batch, profile.concurrency)
                os.kill(process.pid, signal.SIGUSR2)
            finally:
                await path.close()
            if batch["errors"]:
                raise RuntimeError(f"profiled requests failed: {batch['errors'][:3]}")
            return len(batch["latencies"])

        requests = asyncio.run(batches())
        process.wait_until(lambda: out.exists() and out.stat().st_size > 0, 30)
        time.sleep(0.5)  # the dump is written by the signal handler; let it finish
    finally:
        process.stop()
    summary = summarize(out, requests)
    log(f"profile ({profile.concurrency} clients, {requests} requests): " + ", ".join(f"{p} {s:.0%}" for p, s in list(summary["share_by_package"].items())[:6]))
    return {"clients": profile.concurrency, **summary}


def analysis(measurement: dict) -> dict:
    """Why the added latency is what it is: in a closed loop of N clients latency ~ N / throughput,
    and on a machine whose cores the shard, the gateway and the clients share, throughput falls by
    the extra CPU each request costs on the gateway path."""
    cpu = measurement["cpu_ms_per_request"]
    total = {path: sum(v for v in cpu[path].values() if v == v) for path in ("direct", "gateway")}  # v == v: not NaN
    rps = measurement["requests_per_s"]
    gateway_cpu_ms = cpu["gateway"]["gateway"]
    return {
        # The shard finishes a whole batch of 1-token requests in one step, so all the clients' next
        # requests pass through the gateway's one event loop together: each closed-loop cycle gets
        # up to (clients x gateway CPU per request) longer, minus what overlaps the shard's step.
        # This bounds what a single-process gateway can add at N clients, whatever the core count.
        "gateway_serial_ms_per_cycle": measurement["concurrency"] * gateway_cpu_ms if gateway_cpu_ms == gateway_cpu_ms else None,
        "cpu_ms_per_request_all_processes": total,
        "cpu_ratio_gateway_over_direct": total["gateway"] / total["direct"] if total["direct"] else None,
        "throughput_ratio_direct_over_gateway": rps["direct"] / rps["gateway"] if rps["gateway"] else None,
    }


def write_outputs(result: dict, out_dir: Path) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, png_path = out_dir / "gateway_overhead.json", out_dir / "gateway_overhead.png"
    json_path.write_text(json.dumps(result, indent=2))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (cdf, per_round) = plt.subplots(1, 2, figsize=(11, 4.2))
    settings = [("unpinned", result["measurement"], "-")]
    if result.get("pinned"):
        settings.append(("pinned", result["pinned"]["measurement"], "--"))
    for setting, measurement, style in settings:
        for name, values in measurement["latencies_ms"].items():
            ordered = sorted(values)
            cdf.plot(ordered, [i / max(1, len(ordered) - 1) for i in range(len(ordered))], style, label=f"{name}, {setting}")
        rounds = measurement["rounds"]
        xs = [r["round"] for r in rounds]
        per_round.plot(xs, [r["added_p50_ms"] for r in rounds], "o" + style, label=f"added p50, {setting}")
        per_round.plot(xs, [r["added_p99_ms"] for r in rounds], "s" + style, label=f"added p99, {setting}", alpha=0.6)
    cdf.set_xlabel("latency per 1-token completion (ms)")
    cdf.set_ylabel("fraction of requests")
    cdf.set_title(f"{result['profile']['concurrency']} concurrent clients")
    cdf.legend(fontsize=8)
    per_round.axhline(GOAL_P50_ADDED_MS, color="gray", linestyle=":", label=f"goal p50 ≤ {GOAL_P50_ADDED_MS:g} ms")
    per_round.set_xlabel("round (direct and gateway batches interleaved)")
    per_round.set_ylabel("gateway - direct (ms)")
    per_round.set_title("latency the gateway adds")
    per_round.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return json_path, png_path


def run(profile: Profile, out_dir: Path, work_dir: Path | None = None, log=print) -> dict:
    from bench.machine import machine_info
    from loraplex.demo import ensure_demo_assets

    assets = ensure_demo_assets(progress=False)
    layout = pinning_layout()
    # One client: the gateway's own per-request latency, without queueing behind 63 others.
    single = replace(profile, concurrency=1, rounds=max(2, profile.rounds // 2), requests_per_batch=max(8, profile.requests_per_batch // 8))
    pinned: dict | None = None
    with tempfile.TemporaryDirectory(prefix="gateway-overhead-") as scratch:
        work = Path(work_dir or scratch)
        with BenchProcesses(Path(assets.base_dir), Path(assets.adapters["legal"]), work, profile) as processes:
            log(f"shard {processes.shard_address}, gateway {processes.gateway_url}; {profile.rounds} rounds")
            log("unpinned: shard, gateway and clients share every core")
            measurement = asyncio.run(measure(processes, profile, "Q: hi\nA:", log))
            single_measurement = asyncio.run(measure(processes, single, "Q: hi\nA:", log))
            gateway_profile = profile_gateway(processes, profile, "Q: hi\nA:", log)
            if layout is not None:
                log(f"pinned: shard on cpus {sorted(layout['shard'])}, gateway and clients on cpus {sorted(layout['gateway'])}")
                with Pinned(processes, layout):
                    pinned_measurement = asyncio.run(measure(processes, profile, "Q: hi\nA:", log))
                    pinned_single = asyncio.run(measure(processes, single, "Q: hi\nA:", log))
                pinned = {
                    "layout": {role: sorted(cpus) for role, cpus in layout.items()},
                    "measurement": pinned_measurement,
                    "single_client": {k: v for k, v in pinned_single.items() if k != "latencies_ms"},
                    "analysis": analysis(pinned_measurement),
                }
    added = measurement["added_ms"]
    gateway_cpu_ms = measurement["cpu_ms_per_request"]["gateway"]["gateway"]
    result = {
        "benchmark": "gateway_overhead",
        "profile": asdict(profile),
        "goal": {
            "added_p50_ms_at_most": GOAL_P50_ADDED_MS,
            "met": added["p50"] <= GOAL_P50_ADDED_MS,
            "gateway_cpu_ms_per_request_at_most": GOAL_GATEWAY_CPU_MS,
            "met_cpu": gateway_cpu_ms <= GOAL_GATEWAY_CPU_MS,
            "added_p50_ms_at_1_client_at_most": GOAL_P50_ADDED_MS_1_CLIENT,
            "met_1_client": single_measurement["added_ms"]["p50"] <= GOAL_P50_ADDED_MS_1_CLIENT,
        },
        "machine": {**machine_info(), "python": platform.python_version()},
        "measurement": measurement,
        "single_client": {k: v for k, v in single_measurement.items() if k != "latencies_ms"},
        "analysis": analysis(measurement),
        "pinned": pinned,
        # Where the gateway's CPU goes, as shares of a profiled run (bench/gateway_profile.py).
        "gateway_profile": gateway_profile,
        "summary": summarize(measurement, single_measurement, pinned),
    }
    if pinned is not None:
        result["goal"]["met_pinned"] = pinned["measurement"]["added_ms"]["p50"] <= GOAL_P50_ADDED_MS
    json_path, png_path = write_outputs(result, out_dir)
    for line in summary_lines(result["summary"]):
        log(line)
    log(f"{json_path}, {png_path}")
    return result


def summarize(measurement: dict, single: dict, pinned: dict | None) -> dict:
    """The headline numbers: added p50/p99 and the gateway's CPU per request, per setting."""

    def row(m: dict) -> dict:
        return {
            "clients": m["concurrency"],
            "added_p50_ms": m["added_ms"]["p50"],
            "added_p99_ms": m["added_ms"]["p99"],
            "gateway_cpu_ms_per_request": m["cpu_ms_per_request"]["gateway"]["gateway"],
        }

    rows = {"unpinned": row(measurement), "unpinned_1_client": row(single)}
    if pinned is not None:
        rows["pinned"] = row(pinned["measurement"])
        rows["pinned_1_client"] = row(pinned["single_client"])
    return rows


def summary_lines(summary: dict) -> list[str]:
    return [
        f"{name}: {row['clients']} clients, added p50 {row['added_p50_ms']:.2f} ms, p99 {row['added_p99_ms']:.2f} ms, "
        f"gateway CPU {row['gateway_cpu_ms_per_request']:.2f} ms/request"
        for name, row in summary.items()
    ]


# ---- several gateway workers sharing tenant limits through Valkey -----------------------------------

SWEEP_WORKERS = (1, 2, 4)
SWEEP_CLIENTS = (1, 64, 256)
GOAL_P50_ADDED_MS_2_WORKERS_64_CLIENTS = 8.0
GOAL_THROUGHPUT_RATIO_2_OVER_1 = 1.8
# At 256 clients the one shard answers its health probe after more than the default 0.4 s, and the
# gateway would take it out of the ring: this measures overhead, not failover.
SWEEP_GATEWAY_ENV = {"LORAPLEX_GATEWAY_HEALTH_TIMEOUT_S": "5", "LORAPLEX_GATEWAY_HEALTH_INTERVAL_S": "1"}


def sweep_profile(clients: int, toy: bool = False) -> Profile:
    """Rounds sized so each batch lasts about a second on this machine (~500 requests/s at 64 clients)."""
    if toy:
        return Profile(f"toy-{clients}", clients, rounds=2, requests_per_batch=4 * clients, warmup_requests=clients, shard_max_batch=8)
    if clients == 1:
        return Profile("sweep-1", 1, rounds=6, requests_per_batch=40, warmup_requests=10)
    return Profile(f"sweep-{clients}", clients, rounds=6 if clients <= 64 else 4, requests_per_batch=5 * clients, warmup_requests=2 * clients)


def sweep_row(workers: int, m: dict) -> dict:
    cpu = m["cpu_ms_per_request"]["gateway"]
    return {
        "workers": workers,
        "clients": m["concurrency"],
        "added_p50_ms": m["added_ms"]["p50"],
        "added_p99_ms": m["added_ms"]["p99"],
        "direct_p50_ms": m["overall"]["direct"]["p50"],
        "gateway_p50_ms": m["overall"]["gateway"]["p50"],
        "gateway_requests_per_s": m["requests_per_s"]["gateway"],
        "direct_requests_per_s": m["requests_per_s"]["direct"],
        # Every gateway process together (supervisor + workers), and the store's share.
        "gateway_cpu_ms_per_request": cpu["gateway"],
        "store_cpu_ms_per_request": cpu.get("store"),
        "shard_cpu_ms_per_request": cpu["shard"],
        "client_cpu_ms_per_request": cpu["client"],
    }


def run_workers_sweep(
    out_dir: Path,
    workers: tuple[int, ...] = SWEEP_WORKERS,
    clients: tuple[int, ...] = SWEEP_CLIENTS,
    toy: bool = False,
    work_dir: Path | None = None,
    log=print,
) -> dict:
    """Added latency, throughput and CPU per request through 1, 2 and 4 gateway workers that share
    tenant limits through a real Valkey server (every admission and release is a round trip)."""
    from bench.machine import machine_info
    from loraplex.demo import ensure_demo_assets
    from loraplex.stack.redis_server import RedisServer

    assets = ensure_demo_assets(progress=False)
    # The shard's queue and the tenant's concurrency limit are sized for the most clients.
    sizing = replace(sweep_profile(max(clients), toy), concurrency=max(clients))
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="gateway-workers-") as scratch:
        work = Path(work_dir or scratch)
        store = RedisServer(work / "redis").start()
        try:
            with BenchProcesses(
                Path(assets.base_dir),
                Path(assets.adapters["legal"]),
                work,
                sizing,
                gateway_workers=workers[0],
                redis_url=store.url,
                gateway_env=SWEEP_GATEWAY_ENV,
            ) as processes:
                for count in workers:
                    if processes.gateway_workers != count:
                        processes.restart_gateway(count)
                    for n in clients:
                        log(f"{count} gateway worker(s), {n} clients")
                        m = asyncio.run(measure(processes, sweep_profile(n, toy), "Q: hi\nA:", log, store_pid=store.process.pid))
                        rows.append(sweep_row(count, m))
        finally:
            store.stop()
    result = {
        "benchmark": "gateway_workers",
        "machine": {**machine_info(), "cores_available": len(os.sched_getaffinity(0))},
        "store": "valkey (shared tenant limits: one Lua round trip to admit, one to release)",
        "gateway_env": SWEEP_GATEWAY_ENV,
        "rows": rows,
        "goals": sweep_goals(rows),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, png_path = out_dir / "gateway_workers.json", out_dir / "gateway_workers.png"
    json_path.write_text(json.dumps(result, indent=2))
    plot_workers_sweep(result, png_path)
    for row in rows:
        log(
            f"{row['workers']} workers, {row['clients']:>3} clients: added p50 {row['added_p50_ms']:.1f} ms, p99 {row['added_p99_ms']:.1f} ms, "
            f"{row['gateway_requests_per_s']:.0f} req/s (direct {row['direct_requests_per_s']:.0f}), "
            f"gateway CPU {row['gateway_cpu_ms_per_request']:.2f} ms/request"
        )
    log(f"{json_path}, {png_path}")
    return result


def sweep_goals(rows: list[dict]) -> dict:
    by = {(r["workers"], r["clients"]): r for r in rows}
    goals: dict = {}
    if (2, 64) in by:
        p50 = by[(2, 64)]["added_p50_ms"]
        goals["added_p50_ms_2_workers_64_clients"] = {"value": p50, "at_most": GOAL_P50_ADDED_MS_2_WORKERS_64_CLIENTS, "met": p50 <= GOAL_P50_ADDED_MS_2_WORKERS_64_CLIENTS}
    for clients in sorted({c for _, c in by}):
        if (1, clients) in by and (2, clients) in by:
            ratio = by[(2, clients)]["gateway_requests_per_s"] / by[(1, clients)]["gateway_requests_per_s"]
            goals[f"requests_per_s_ratio_2_over_1_workers_{clients}_clients"] = {
                "value": ratio,
                "at_least": GOAL_THROUGHPUT_RATIO_2_OVER_1,
                "met": ratio >= GOAL_THROUGHPUT_RATIO_2_OVER_1,
            }
    return goals


def plot_workers_sweep(result: dict, png_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    fig, (latency, throughput) = plt.subplots(1, 2, figsize=(11, 4.2))
    for workers in sorted({r["workers"] for r in rows}):
        mine = sorted((r for r in rows if r["workers"] == workers), key=lambda r: r["clients"])
        xs = [r["clients"] for r in mine]
        line = latency.plot(xs, [r["added_p50_ms"] for r in mine], "o-", label=f"{workers} worker(s), added p50")[0]
        latency.plot(xs, [r["added_p99_ms"] for r in mine], "s--", color=line.get_color(), alpha=0.6, label=f"{workers} worker(s), added p99")
        throughput.plot(xs, [r["gateway_requests_per_s"] for r in mine], "o-", color=line.get_color(), label=f"through {workers} worker(s)")
        # The direct path of the same rounds: the ceiling at that moment's machine load.
        throughput.plot(xs, [r["direct_requests_per_s"] for r in mine], ":", color=line.get_color(), label=f"shard directly, {workers}-worker rounds")
    for axis in (latency, throughput):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("concurrent clients")
        axis.legend(fontsize=7)
    latency.axhline(GOAL_P50_ADDED_MS_2_WORKERS_64_CLIENTS, color="gray", linestyle=":")
    latency.set_ylabel("gateway - direct (ms)")
    latency.set_title("latency the gateway adds")
    throughput.set_ylabel("requests / s")
    machine = result["machine"]
    throughput.set_title(f"1-token completions; {machine['cores_available']} cores ({machine['cpu']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds and requests")
    parser.add_argument("--toy", action="store_true", help="a few requests at 4 clients (for tests)")
    parser.add_argument("--workers-sweep", action="store_true", help="1, 2 and 4 gateway workers sharing limits through Valkey, at 1, 64 and 256 clients")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args(argv)
    if args.workers_sweep:
        run_workers_sweep(args.out, toy=args.toy)
        return 0
    profile = TOY if args.toy else QUICK if args.quick else FULL
    run(profile, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
