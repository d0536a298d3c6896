"""What a benchmark run measures and at what size: one frozen dataclass per run, no globals."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

from loraplex.adapter_format import PROJECTIONS


@dataclass(frozen=True)
class ModelSpec:
    """A random Llama-architecture model; sizes stay multiples of 64 (bitsandbytes-friendly)."""

    hidden_size: int = 768
    intermediate_size: int = 2048
    num_layers: int = 12
    num_heads: int = 12
    num_kv_heads: int = 12
    vocab_size: int = 32000
    max_position_embeddings: int = 1024
    seed: int = 0


@dataclass(frozen=True)
class AdapterSpec:
    count: int = 128
    rank: int = 16
    alpha: float = 32.0
    target_modules: tuple[str, ...] = PROJECTIONS
    std: float = 0.02
    seed: int = 1000


@dataclass(frozen=True)
class BenchProfile:
    name: str
    model: ModelSpec = field(default_factory=ModelSpec)
    adapters: AdapterSpec = field(default_factory=AdapterSpec)
    threads: int = 2
    dtype: str = "fp32"  # the base model's weights and activations
    adapter_dtype: str = "auto"  # the device slot pool (shard setting adapter_dtype): auto = dtype
    concurrency: int = 32  # requests in flight = engine batch = distinct adapters in goals 1-3
    device_slots: int = 32
    host_capacity: int = 64
    # 1. LoRA overhead: decode steps of the engine, LoRA rows vs base rows, stepped alternately.
    overhead_prompt_tokens: int = 64
    overhead_new_tokens: int = 48
    overhead_rounds: int = 2
    read_bandwidth_bytes: int = 1 << 30  # buffer for the machine's streaming read rate (bench/bytes_bound.py)
    # 2. Against lock + set_adapter + generate: every request arrives at once.
    naive_prompt_tokens: int = 32
    naive_new_tokens: int = 32
    naive_rounds: int = 2
    # 3. Against PEFT static batches (adapter_names=): Poisson arrivals, varied lengths.
    arrival_requests: int = 48
    arrival_prompt_tokens: tuple[int, int] = (16, 48)
    arrival_new_tokens: tuple[int, int] = (8, 64)
    arrival_load: float = 1.5  # offered load as a multiple of the engine's measured LoRA capacity
    arrival_rounds: int = 2
    # 4a. Activation latency samples per tier of origin.
    activation_samples: int = 32
    # 4b. Throughput as distinct adapters per batch grow (more than device_slots at the end).
    curve_points: tuple[int, ...] = (1, 8, 32, 128)
    curve_requests: int = 128
    curve_prompt_tokens: int = 16
    curve_new_tokens: tuple[int, int] = (8, 24)
    curve_rounds: int = 2
    seed: int = 7

    def as_dict(self) -> dict:
        return asdict(self)

    def validate(self) -> None:
        if self.dtype not in ("fp32", "bf16"):
            raise ValueError(f"dtype must be fp32 or bf16, got {self.dtype!r}")
        if self.adapter_dtype not in ("auto", "fp32", "bf16"):
            raise ValueError(f"adapter_dtype must be auto, fp32 or bf16, got {self.adapter_dtype!r}")
        if self.concurrency > self.adapters.count:
            raise ValueError("concurrency needs at least as many adapters (one distinct adapter per request)")
        if self.concurrency > self.device_slots:
            raise ValueError("goals 1-3 keep one distinct adapter per request on the device: device_slots >= concurrency")
        if max(self.curve_points) > self.adapters.count or max(self.curve_points) > self.curve_requests:
            raise ValueError("each curve point needs that many adapters and at least that many requests")
        if self.host_capacity < 2 * self.device_slots:
            raise ValueError("host_capacity must hold twice the device slots to measure host -> slot loads")
        if 2 * self.device_slots > self.adapters.count:
            raise ValueError("activation latency cycles over 2 x device_slots adapters")


FULL = BenchProfile(name="shard_bench")

# Under 2 minutes on 2 shared cores: a ~10M-parameter model (hidden 256, 4 layers, vocab 8192),
# fewer tokens, one round; the same four measurements and curve points.
QUICK = replace(
    FULL,
    name="shard_bench_quick",
    model=ModelSpec(hidden_size=256, intermediate_size=704, num_layers=4, num_heads=4, num_kv_heads=4,
                    vocab_size=8192, max_position_embeddings=512),
    overhead_prompt_tokens=32,
    overhead_new_tokens=24,
    overhead_rounds=1,
    naive_prompt_tokens=16,
    naive_new_tokens=8,
    naive_rounds=1,
    arrival_requests=48,
    arrival_prompt_tokens=(8, 32),
    arrival_new_tokens=(4, 32),
    arrival_rounds=1,
    activation_samples=16,
    curve_new_tokens=(4, 16),
    curve_rounds=1,
)


def toy_profile(name: str = "toy") -> BenchProfile:
    """A few seconds: tiny model, 2 concurrent requests, 4 adapters over 2 device slots (so the
    cache must evict), a few tokens; keeps every code path alive in tests."""
    return replace(
        FULL,
        name=name,
        model=ModelSpec(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=2, num_kv_heads=2,
                        vocab_size=512, max_position_embeddings=256),
        adapters=AdapterSpec(count=4, rank=4, alpha=8.0),
        concurrency=2,
        device_slots=2,
        host_capacity=4,
        overhead_prompt_tokens=4,
        overhead_new_tokens=3,
        overhead_rounds=2,
        read_bandwidth_bytes=1 << 20,
        naive_prompt_tokens=4,
        naive_new_tokens=3,
        naive_rounds=2,
        arrival_requests=4,
        arrival_prompt_tokens=(2, 6),
        arrival_new_tokens=(1, 4),
        arrival_rounds=1,
        activation_samples=2,
        curve_points=(1, 2, 4),
        curve_requests=4,
        curve_prompt_tokens=3,
        curve_new_tokens=(1, 3),
        curve_rounds=2,
    )


@dataclass(frozen=True)
class PeerProfile:
    """`make bench-peers`: the same workloads on vLLM's CPU build and on `python -m shard`, over the
    same model folder and PEFT adapter folders. Every request has `prompt_tokens` of its own
    (workload 4 adds the shared prefix) and generates exactly `new_tokens`."""

    name: str = "peers"
    model: ModelSpec = field(default_factory=ModelSpec)
    adapters: AdapterSpec = field(default_factory=AdapterSpec)  # 128 rank-16 adapters, all 7 projections
    dtypes: tuple[str, ...] = ("fp32", "bf16", "nf4")  # nf4: loraplex alone
    pairs: int = 3  # measured runs per system and workload, alternating the two systems
    threads: int = 2
    max_batch: int = 32
    device_slots: int = 32
    host_capacity: int = 64
    prompt_tokens: int = 64
    new_tokens: int = 64
    distinct_requests: int = 32  # workload 2: one adapter per request
    zipf_requests: int = 256  # workload 3: Zipf over every adapter
    zipf_exponent: float = 1.0
    prefix_adapters: int = 4  # workload 4: adapters x requests each, one prefix per adapter
    prefix_requests_per_adapter: int = 8
    prefix_tokens: int = 256
    vllm_kv_cache_gib: int = 2
    seed: int = 11

    def as_dict(self) -> dict:
        return asdict(self)
