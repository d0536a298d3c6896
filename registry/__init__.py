"""The adapter registry on MLflow: publish, validate, resolve, fetch and watch LoRA adapters."""

from registry.adapter_registry import AdapterRegistry, AdapterVersion
from registry.errors import AdapterNotFound, AdapterRejected, RegistryError, RegistryUnavailable
from registry.fingerprint import base_model_fingerprint
from registry.mlflow_rest import RestPolicy
from registry.routing import AdapterRoute, RoutingTable
from registry.validation import AdapterFacts, validate_adapter
from registry.watcher import RoutingTableWatcher

__all__ = [
    "AdapterFacts",
    "AdapterNotFound",
    "AdapterRegistry",
    "AdapterRejected",
    "AdapterRoute",
    "AdapterVersion",
    "RegistryError",
    "RegistryUnavailable",
    "RestPolicy",
    "RoutingTable",
    "RoutingTableWatcher",
    "base_model_fingerprint",
    "validate_adapter",
]
