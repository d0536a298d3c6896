"""Why the engine refused or ended a request; the gRPC layer maps each to a status code."""


class EngineError(Exception):
    pass


class InvalidRequestError(EngineError, ValueError):
    """The request itself is wrong (bad options, empty prompt, both prompt and messages...)."""


class PromptTooLongError(InvalidRequestError):
    """The prompt leaves no room for a single generated token in the context."""


class QueueFullError(EngineError):
    """The bounded request queue is full; retry later or elsewhere."""


class EngineClosedError(EngineError):
    """The engine is draining or stopped and takes no new requests."""
