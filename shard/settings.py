"""The shard's one settings object: defaults, then an optional YAML/TOML file (``--config``),
then env vars ``LORAPLEX_SHARD_<FIELD>`` (upper case). ``adapter_dirs`` takes JSON in an env var
(``{"legal": "/path/to/legal"}``); a file may hold every service's settings, the shard's under a
``shard:`` key."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import ClassVar

from loraplex.adapter_mix import DEFAULT_MAX_COMPONENTS
from loraplex.grpc_tls import check_pair
from loraplex.layered_settings import LayeredSettings, SettingsError

__all__ = ["ShardSettings", "SettingsError", "QUANTIZATIONS", "ADAPTER_DTYPES"]

QUANTIZATIONS = ("nf4", "int8", "bf16", "fp32")
ADAPTER_DTYPES = ("auto", "fp32", "bf16", "fp16")


@dataclass(frozen=True)
class ShardSettings(LayeredSettings):
    ENV_PREFIX: ClassVar[str] = "LORAPLEX_SHARD_"
    SECTION: ClassVar[str] = "shard"

    host: str = "127.0.0.1"
    port: int = 50051  # 0 = any free port (the ready line says which)
    shard_id: str = "shard-0"
    # Prometheus metrics over HTTP on `host`: 0 = not served (tests, embedded use); compose and
    # the local stack set a port. A separate port keeps scrapes off the gRPC server.
    metrics_port: int = 0
    model_dir: str = ""
    quantization: str = "nf4"
    device: str = "cpu"
    max_batch_size: int = 8
    max_queue: int = 64
    max_context: int = 2048  # also capped by the model's max_position_embeddings
    default_max_tokens: int = 256
    prefill_chunk_tokens: int = 512  # prompt tokens per step, so a long prompt never stalls decoding
    # An idle engine that receives a request waits until no other has arrived for this long (at
    # most 10 windows) so a burst is prefilled as one batch; running requests are never held up.
    # 0: start on the first arrival.
    admission_window_ms: float = 2.0
    # Before it reports ready, the engine runs one prefill forward of a full chunk over every row and
    # one decode step (results dropped), so the first batch does not fault its activations in while
    # its requests wait (bf16, 32 x 64-token prompts: first token 0.50 -> ~0.35 s). false: skip it.
    warm_up: bool = True
    # KV of prompt prefixes kept for reuse by later requests on the same adapter version (0 = off),
    # in blocks of prefix_block_tokens tokens; least recently used blocks are evicted.
    prefix_cache_mb: int = 256
    prefix_block_tokens: int = 16
    device_slots: int = 8
    # The host tier (parsed adapters in memory) holds at most host_cache_bytes of adapters and, as a
    # second cap, host_capacity of them; least recently used go first, never one that is serving.
    host_cache_bytes: int = 4 * 2**30
    host_capacity: int = 32
    # The disk tier (the registry's download cache under adapter_cache_dir) holds at most this many
    # bytes of adapter folders; least recently used go after each download (0 = unbounded).
    disk_cache_bytes: int = 16 * 2**30
    max_rank: int = 64
    # Most adapters one mix may combine (a registered mix's manifest, or a request's ad-hoc mix); a
    # mix of K adapters costs about K adapters' LoRA work per row.
    max_mix_components: int = DEFAULT_MAX_COMPONENTS
    # Dtype of the adapter slot pools: "auto" = the model's activation dtype (exact against PEFT);
    # "bf16" halves the bytes read per decode step (~0.4% relative error in the adapter's delta).
    adapter_dtype: str = "auto"
    torch_threads: int = 0  # 0 = torch's default
    # Decode steps on CPU attend through a compiled kernel over the KV cache (built once, ~1 min);
    # false: the model's own SDPA.
    decode_attention: bool = True
    # Llama models run the engine's own forward: the model's modules, with residual add + RMSNorm,
    # rotary embedding and SiLU*up as fused CPU kernels (shard.engine.llama_forward, built once,
    # ~1 min; AVX-512 CPUs). false, or any other model: the model's own forward.
    fused_forward: bool = True
    # bf16 and fp32 base weights on CPU compute through a copy pre-packed for oneDNN
    # (shard.packed_weights: bf16 1.7-2x faster per projection at decode with identical results,
    # fp32 ~15% faster within float rounding) and so sit in memory twice; false: plain F.linear.
    # No effect on NF4, INT8 or CUDA.
    packed_weights: bool = True
    # Memory the shard frees stays in the process for its next use instead of going back to the
    # kernel (glibc's malloc, shard.c_allocator): the next prefill reuses it rather than faulting
    # it in again page by page (a bf16 prefill of 2,048 tokens 0.39 -> 0.34 s). The resident size
    # stays at its peak. false: the C library's defaults.
    retain_freed_memory: bool = True
    # Adapters come from the MLflow registry (tracking URI + local download cache) or, with
    # adapter_dirs set, from local folders (name -> folder, version "local").
    registry_tracking_uri: str = ""
    adapter_cache_dir: str = ""
    adapter_dirs: Mapping[str, str] = field(default_factory=dict)
    # On SIGTERM queued requests are refused (the gateway sends them elsewhere) and running ones
    # finish, for up to drain_timeout_s. The longest a running answer can take is max_context
    # tokens at one decode step each: 0 = max_context x drain_step_s, where drain_step_s is this
    # hardware's slowest decode step at a full batch (loraplex_shard_step_seconds{phase="decode"} in the metrics).
    drain_timeout_s: float = 0.0
    drain_step_s: float = 0.05
    log_level: str = "INFO"
    # TLS on the gRPC port (PEM files): a certificate and key serve TLS; a client CA on top requires
    # every client (the gateway, probes) to present a certificate it signed (mutual TLS).
    tls_cert_file: str = ""
    tls_key_file: str = ""
    tls_client_ca_file: str = ""
    # Merged hot adapter (fp32/bf16 bases; inert on nf4/int8): when one adapter version produces at
    # least hot_merge_share of the shard's tokens over hot_merge_window_s (and at least
    # hot_merge_min_tokens of them), it is merged into the base weights, so its rows do no LoRA
    # work; it is unmerged when its share falls below hot_unmerge_share. No change within
    # hot_merge_cooldown_s of the last one. An admin merge (MergeAdapter) stays until an admin unmerge.
    hot_merge: bool = True
    hot_merge_share: float = 0.7
    hot_unmerge_share: float = 0.4
    hot_merge_window_s: float = 60.0
    hot_merge_cooldown_s: float = 120.0
    hot_merge_min_tokens: int = 1024

    def validate(self) -> None:
        for name in ("port", "metrics_port"):
            if not 0 <= getattr(self, name) < 65536:
                raise SettingsError(f"{name} must be 0..65535, got {getattr(self, name)}")
        if self.metrics_port and self.metrics_port == self.port:
            raise SettingsError(f"metrics_port and port must differ, both are {self.port}")
        if not self.model_dir:
            raise SettingsError("model_dir is required (a Hugging Face model folder)")
        if self.quantization not in QUANTIZATIONS:
            raise SettingsError(f"quantization must be one of {QUANTIZATIONS}, got {self.quantization!r}")
        if self.adapter_dtype not in ADAPTER_DTYPES:
            raise SettingsError(f"adapter_dtype must be one of {ADAPTER_DTYPES}, got {self.adapter_dtype!r}")
        if self.device.split(":")[0] not in ("cpu", "cuda"):
            raise SettingsError(f"device must be cpu or cuda[:N], got {self.device!r}")
        for name in ("max_batch_size", "max_context", "default_max_tokens", "prefill_chunk_tokens",
                     "device_slots", "host_capacity", "max_rank", "max_mix_components"):
            if getattr(self, name) <= 0:
                raise SettingsError(f"{name} must be positive")
        if self.host_cache_bytes <= 0 or self.disk_cache_bytes < 0:
            raise SettingsError("host_cache_bytes must be positive and disk_cache_bytes >= 0")
        if self.prefix_cache_mb < 0 or self.prefix_block_tokens < 1:
            raise SettingsError("prefix_cache_mb must be >= 0 and prefix_block_tokens >= 1")
        if self.max_queue < 0 or self.torch_threads < 0 or self.drain_timeout_s < 0 or self.admission_window_ms < 0:
            raise SettingsError("max_queue, torch_threads, drain_timeout_s and admission_window_ms must be >= 0")
        if self.drain_step_s <= 0:
            raise SettingsError("drain_step_s must be positive")
        if self.drain_timeout_s and self.drain_timeout_s < self.longest_answer_s():
            raise SettingsError(
                f"drain_timeout_s ({self.drain_timeout_s:g}) is shorter than the longest answer, max_context x drain_step_s "
                f"({self.max_context} x {self.drain_step_s:g} = {self.longest_answer_s():g} s): a restart would cut answers; "
                "raise it, leave it 0 (derived), or lower max_context"
            )
        if self.registry_tracking_uri and not self.adapter_cache_dir:
            raise SettingsError("adapter_cache_dir is required with registry_tracking_uri")
        if not 0 < self.hot_merge_share <= 1 or not 0 <= self.hot_unmerge_share < self.hot_merge_share:
            raise SettingsError("need 0 < hot_merge_share <= 1 and 0 <= hot_unmerge_share < hot_merge_share")
        if self.hot_merge_window_s <= 0 or self.hot_merge_cooldown_s < 0 or self.hot_merge_min_tokens < 1:
            raise SettingsError("hot_merge_window_s must be positive, hot_merge_cooldown_s >= 0, hot_merge_min_tokens >= 1")
        check_pair(self.tls_cert_file, self.tls_key_file, "tls_cert_file / tls_key_file")
        if self.tls_client_ca_file and not self.tls_cert_file:
            raise SettingsError("tls_client_ca_file (mutual TLS) needs tls_cert_file and tls_key_file")

    def longest_answer_s(self) -> float:
        """A running answer's worst case: its whole context generated, one decode step a token."""
        return self.max_context * self.drain_step_s

    def drain_timeout(self) -> float:
        """Seconds running answers get to finish after SIGTERM; a pod's terminationGracePeriodSeconds
        and compose's stop_grace_period must cover it (plus the model-free rest of a stop)."""
        return self.drain_timeout_s or self.longest_answer_s()

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"
