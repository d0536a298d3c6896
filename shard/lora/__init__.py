"""Multi-adapter LoRA for the shard: PEFT adapter parsing, the device slot pool, layers that serve
many adapters in one forward pass, and the tiered adapter cache, behind one LoraManager.

Flow: `LoraManager.install(model, source, ...)` swaps every targeted projection for a
MultiLoraLinear (`install_multi_lora`, giving a LoraRuntime whose AdapterSlotPool holds N adapters
on the model's device) and fills slots in the background through a TieredAdapterCache (source ->
disk -> host -> device). Each forward runs inside `with manager.batch(rows):` (each row a list of
(slot, weight) entries: one for an adapter, none for the base model, several for a mix), which
plans the step on the host and copies its indices and weights to the device once.

Devices: everything is device/dtype-agnostic torch (pools live on the model's device, indices
are created there). On CPU with fp32 activations, decode steps (one token per row) use a small
compiled kernel (lora_decode_kernel.cpp, built on first use by torch's cpp_extension; falls back
to torch ops if no compiler) that reads each row's factors in place instead of gathering copies.
On CUDA the torch path runs (index_select + bmm); pool writes synchronise the stream before a
slot is announced ready."""

from shard.lora.errors import (
    AdapterError,
    AdapterInUseError,
    AdapterLoadTimeout,
    AdapterNotFoundError,
    AdapterRejectedError,
)
from shard.lora.keys import AdapterKey, AdapterMix
from shard.lora.layers import MultiLoraLinear
from shard.lora.manager import AdapterSelection, LoraLease, LoraManager
from shard.lora.peft_adapter import HostAdapter, LoraFactors, ModuleShape, read_peft_adapter
from shard.lora.runtime import DEFAULT_TARGET_MODULES, LoraRuntime, install_multi_lora
from shard.lora.slot_pool import AdapterSlotPool
from shard.lora.sources import LOCAL_VERSION, AdapterSource, LocalAdapterSource
from shard.lora.tiered_cache import AdapterInfo, TieredAdapterCache, TierStats

__all__ = [
    "AdapterError",
    "AdapterInUseError",
    "AdapterInfo",
    "AdapterKey",
    "AdapterMix",
    "AdapterSelection",
    "AdapterLoadTimeout",
    "AdapterNotFoundError",
    "AdapterRejectedError",
    "AdapterSlotPool",
    "AdapterSource",
    "DEFAULT_TARGET_MODULES",
    "HostAdapter",
    "LOCAL_VERSION",
    "LocalAdapterSource",
    "LoraFactors",
    "LoraLease",
    "LoraManager",
    "LoraRuntime",
    "ModuleShape",
    "MultiLoraLinear",
    "TierStats",
    "TieredAdapterCache",
    "install_multi_lora",
    "read_peft_adapter",
]
