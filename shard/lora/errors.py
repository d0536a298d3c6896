"""Errors raised by the adapter layer; each message says what was wrong and with which adapter."""


class AdapterError(Exception):
    """Base class for adapter errors."""


class AdapterNotFoundError(AdapterError):
    """The adapter (name, version) does not exist where it was looked for (gRPC NOT_FOUND)."""


class AdapterRejectedError(AdapterError):
    """The adapter exists but cannot be served: corrupt, unsupported option, wrong shapes,
    rank above the pool's limit (gRPC FAILED_PRECONDITION)."""


class AdapterInUseError(AdapterError):
    """An unload was asked for an adapter that running requests still use."""


class AdapterLoadTimeout(AdapterError, TimeoutError):
    """A blocking load did not finish within its timeout (it keeps running in the background)."""


class MergeRefusedError(AdapterError):
    """An adapter cannot be merged into this shard's base weights (a quantized base, or nothing
    to merge); gRPC FAILED_PRECONDITION. Serving is unchanged."""


class AdapterNotResidentError(MergeRefusedError):
    """A merge found its adapter off the device slots (evicted since it was loaded): load it again."""
