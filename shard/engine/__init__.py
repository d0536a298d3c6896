"""The shard's continuous-batching engine: per-slot KV cache, scheduler, sampling, detokenizing.

Devices: everything is tested on CPU; nothing assumes it. The KV cache, masks, positions and
slot ids are created on the device of the model's input embeddings, in the embeddings' dtype
(fp32, or bf16/fp16 on GPU: the mask uses that dtype's ``finfo.min``); per-request
``torch.Generator``s live on the same device, so seeded sampling on CUDA is reproducible too
(though not bit-identical to CPU). Only token ids cross to the host, once per step. The
attention implementation is the model's own (sdpa or eager; the explicit 4D mask rules out
flash-attention's varlen path, which needs no mask at all).
"""

from shard.engine.engine import Engine, EngineStats
from shard.engine.errors import (
    EngineClosedError,
    EngineError,
    InvalidRequestError,
    PromptTooLongError,
    QueueFullError,
)
from shard.engine.kv_cache import SlotKVCache
from shard.engine.requests import FinishReason, GenerationChunk, GenerationRequest, RequestHandle, Usage
from shard.engine.sampling import InvalidSamplingError, SamplingOptions

__all__ = [
    "Engine",
    "EngineClosedError",
    "EngineError",
    "EngineStats",
    "FinishReason",
    "GenerationChunk",
    "GenerationRequest",
    "InvalidRequestError",
    "InvalidSamplingError",
    "PromptTooLongError",
    "QueueFullError",
    "RequestHandle",
    "SamplingOptions",
    "SlotKVCache",
    "Usage",
]
