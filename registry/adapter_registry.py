"""The adapter registry on MLflow: one registered model per adapter, one model version per upload.

Model-registry reads and alias/tag writes go through `MlflowRest` (bounded retries, see there);
runs, artifact uploads and downloads go through MLflow's client, which knows every artifact store
(`mlflow-artifacts:/` proxy, S3, local).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from registry.errors import AdapterNotFound, AdapterRejected, RegistryError, RegistryUnavailable
from registry.fingerprint import base_model_fingerprint
from registry.mlflow_rest import MlflowRest, RestPolicy
from registry.routing import (
    CHAMPION,
    ROUTING_ALIASES,
    TAG_ADAPTER,
    TAG_CANARY_PERCENT,
    TAG_CHAMPION_HISTORY,
    TAG_FALLBACK,
    FALLBACK_POLICIES,
    MalformedTagWarnings,
    parse_champion_history,
    RoutingTable,
    route_from_registered_model,
    AdapterRoute,
)
from registry.upload import upload_folder
from loraplex.adapter_format import AdapterFormatError, adapter_ref, check_adapter_files, folder_sha256, read_config
from loraplex.serving_status import REFUSED_PREFIX, TAG_STATUS
from loraplex.adapter_mix import (
    DEFAULT_MAX_COMPONENTS,
    MixComponent,
    MixError,
    check_components,
    describe,
    is_mix_folder,
    read_manifest,
    write_manifest,
)
from registry.validation import AdapterFacts, check_no_symlinks, folder_size_bytes, validate_adapter

logger = logging.getLogger(__name__)

TAG_BASE_FINGERPRINT = "loraplex.base_fingerprint"
TAG_FOLDER_SHA256 = "loraplex.sha256"  # the tag's name predates the field's; versions already carry it
TAG_RANK = "loraplex.rank"
TAG_TARGET_MODULES = "loraplex.target_modules"
TAG_SIZE_BYTES = "loraplex.size_bytes"
# On a mix version: its components as `describe` writes them (what the MLflow UI shows).
TAG_MIX = "loraplex.mix"

ARTIFACT_SUBDIR = "adapter"
DEFAULT_EXPERIMENT = "loraplex-adapters"
# `name@version` addresses a pinned version at the gateway and `base` is the base model itself.
_ADAPTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
RESERVED_NAMES = frozenset({"base"})
_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
HISTORY_LENGTH = 20
_SEARCH_PAGE = 1000


@dataclass(frozen=True)
class AdapterVersion:
    name: str
    version: str
    folder_sha256: str | None  # loraplex.adapter_format.folder_sha256 of the published folder
    base_fingerprint: str | None
    rank: int | None
    target_modules: tuple[str, ...]
    size_bytes: int | None
    source: str
    run_id: str | None
    aliases: tuple[str, ...]
    mix: str | None = None  # a mix version's components (`legal@3=0.7 clinical@3=0.3`); None for an adapter
    serving_status: str | None = None  # its `loraplex.status` tag (loraplex.serving_status), when written


def check_adapter_name(name: str) -> None:
    if not isinstance(name, str) or not _ADAPTER_NAME.match(name):
        raise RegistryError(
            f"adapter name {name!r} is invalid: use letters, digits, '.', '_' or '-' (at most 128), "
            "starting with a letter or digit"
        )
    if name in RESERVED_NAMES:
        raise RegistryError(f"adapter name {name!r} is reserved for the base model")


def check_routing_alias(alias: str) -> None:
    if alias not in ROUTING_ALIASES:
        raise RegistryError(f"alias {alias!r} is not one of {', '.join(ROUTING_ALIASES)}")


def _version_from_rest(model_version: dict, aliases: tuple[str, ...] | None = None) -> AdapterVersion:
    tags = {entry["key"]: entry.get("value", "") for entry in model_version.get("tags") or []}
    rank = tags.get(TAG_RANK)
    size = tags.get(TAG_SIZE_BYTES)
    modules = tags.get(TAG_TARGET_MODULES)
    return AdapterVersion(
        name=model_version["name"],
        version=str(model_version["version"]),
        folder_sha256=tags.get(TAG_FOLDER_SHA256),
        base_fingerprint=tags.get(TAG_BASE_FINGERPRINT),
        rank=int(rank) if rank and rank.isdigit() else None,
        target_modules=tuple(m for m in modules.split(",") if m) if modules else (),
        size_bytes=int(size) if size and size.isdigit() else None,
        source=model_version.get("source", ""),
        run_id=model_version.get("run_id") or None,
        aliases=tuple(aliases if aliases is not None else model_version.get("aliases") or ()),
        mix=tags.get(TAG_MIX) or None,
        serving_status=tags.get(TAG_STATUS) or None,
    )


class AdapterRegistry:
    def __init__(
        self,
        tracking_uri: str,
        cache_dir: Path,
        max_rank: int = 64,
        *,
        experiment_name: str = DEFAULT_EXPERIMENT,
        rest_policy: RestPolicy | None = None,
        max_mix_components: int = DEFAULT_MAX_COMPONENTS,
    ) -> None:
        self.tracking_uri = tracking_uri.rstrip("/")
        self.cache_dir = Path(cache_dir)
        self.max_rank = max_rank
        self.max_mix_components = max_mix_components
        self.experiment_name = experiment_name
        self.rest = MlflowRest(self.tracking_uri, rest_policy)
        self.client = MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri)
        self._tag_warnings = MalformedTagWarnings()

    # ---- publish -------------------------------------------------------------------------------

    def validate(self, folder: Path, base_model_dir: Path) -> tuple[AdapterFacts, str]:
        """Raises AdapterRejected unless `folder` fits the base model; touches no server.

        Returns what was learnt about the adapter and the base model's fingerprint.
        """
        facts = validate_adapter(Path(folder), Path(base_model_dir), self.max_rank)
        fingerprint = base_model_fingerprint(Path(base_model_dir))
        # PEFT records the model it trained on; when that is a local folder we can tell whether it
        # is the same model as the one named here (same shapes but another vocabulary would pass the
        # shape checks and then answer gibberish).
        trained_on = read_config(Path(folder)).get("base_model_name_or_path")
        if isinstance(trained_on, str) and trained_on and (Path(trained_on) / "config.json").is_file():
            trained_fingerprint = base_model_fingerprint(Path(trained_on))
            if trained_fingerprint != fingerprint:
                raise AdapterRejected(
                    f"the adapter was trained on {trained_on} (fingerprint {trained_fingerprint[:12]}…), "
                    f"not on {base_model_dir} (fingerprint {fingerprint[:12]}…)"
                )
        return facts, fingerprint

    def publish(
        self,
        folder: Path,
        name: str,
        base_model_dir: Path,
        alias: str | None = None,
        description: str | None = None,
        *,
        progress: bool = False,
    ) -> AdapterVersion:
        check_adapter_name(name)
        if alias is not None:
            check_routing_alias(alias)
        facts, fingerprint = self.validate(folder, base_model_dir)
        return self._publish_version(Path(folder), name, facts, fingerprint, alias, description, {}, progress)

    def publish_mix(
        self,
        name: str,
        components: list[MixComponent],
        alias: str | None = None,
        description: str | None = None,
    ) -> AdapterVersion:
        """Publish a version of `name` that serves the weighted sum of `components`. A component
        without a version takes its champion, or its latest version when it has no champion; the
        manifest pins the numbers. Raises AdapterRejected unless every component is a loraplex
        adapter version (not a mix) for one base model, and the weights and count are allowed."""
        check_adapter_name(name)
        if alias is not None:
            check_routing_alias(alias)
        try:
            check_components([MixComponent(c.name, c.version or "-", c.weight) for c in components], self.max_mix_components)
            pinned = [(self._pin_component(c), c.weight) for c in components]
            resolved = check_components(
                [MixComponent(v.name, v.version, weight) for v, weight in pinned], self.max_mix_components
            )
        except MixError as error:
            raise AdapterRejected(str(error)) from None
        fingerprints = {v.base_fingerprint for v, _ in pinned}
        if len(fingerprints) != 1:
            bases = ", ".join(f"{adapter_ref(v.name, v.version)}: {str(v.base_fingerprint)[:12]}…" for v, _ in pinned)
            raise AdapterRejected(f"mix components were published for different base models ({bases})")
        fingerprint = fingerprints.pop()
        with tempfile.TemporaryDirectory(prefix="loraplex-mix-") as scratch:
            folder = Path(scratch) / ARTIFACT_SUBDIR
            write_manifest(folder, resolved, fingerprint, self.max_mix_components)
            facts = AdapterFacts(
                rank=sum(v.rank or 0 for v, _ in pinned),
                target_modules=tuple(sorted({m for v, _ in pinned for m in v.target_modules})),
                size_bytes=folder_size_bytes(folder),
                folder_sha256=folder_sha256(folder),
            )
            return self._publish_version(
                folder, name, facts, fingerprint, alias, description or f"mix of {describe(resolved)}",
                {TAG_MIX: describe(resolved)}, False,
            )

    def _pin_component(self, component: MixComponent) -> AdapterVersion:
        """The version a mix component names, checked to be an adapter loraplex serves."""
        if component.version:
            version = self.resolve(component.name, component.version)
        else:
            champion = self._alias_version(component.name, CHAMPION)
            numbers = [v.version for v in self.versions(component.name)] if champion is None else [champion]
            if not numbers:
                raise AdapterNotFound(f"adapter {component.name!r} has no versions")
            version = self.resolve(component.name, max(numbers, key=int))
        label = adapter_ref(version.name, version.version)
        if version.mix is not None:
            raise AdapterRejected(f"{label} is itself a mix ({version.mix}); mixes do not nest")
        if not version.folder_sha256 or not version.base_fingerprint:
            raise AdapterRejected(f"{label} was not published through loraplex (no {TAG_FOLDER_SHA256} tag)")
        if (version.serving_status or "").startswith(REFUSED_PREFIX):
            raise AdapterRejected(f"{label} is refused by the shards ({version.serving_status}); a mix of it would be too")
        return version

    def _publish_version(
        self,
        folder: Path,
        name: str,
        facts: AdapterFacts,
        fingerprint: str,
        alias: str | None,
        description: str | None,
        extra_tags: dict[str, str],
        progress: bool,
    ) -> AdapterVersion:
        experiment_id = self._experiment_id()
        self._ensure_registered_model(name)

        run_id = self._log_adapter_run(Path(folder), name, facts, fingerprint, experiment_id, progress)
        run_artifact_uri = self.client.get_run(run_id).info.artifact_uri
        tags = {
            TAG_BASE_FINGERPRINT: fingerprint,
            TAG_FOLDER_SHA256: facts.folder_sha256,
            TAG_RANK: str(facts.rank),
            TAG_TARGET_MODULES: ",".join(facts.target_modules),
            TAG_SIZE_BYTES: str(facts.size_bytes),
            **extra_tags,
        }
        try:
            model_version = self.client.create_model_version(
                name,
                source=f"{run_artifact_uri}/{ARTIFACT_SUBDIR}",
                run_id=run_id,
                tags=tags,
                description=description,
            )
        except MlflowException as error:
            raise RegistryError(f"MLflow could not create a version of {name}: {error.message}") from None
        version = str(model_version.version)
        if alias is not None:
            self.promote(name, version, alias)
        return self.resolve(name, version)

    def _experiment_id(self) -> str:
        try:
            found = self.rest.get("experiments/get-by-name", {"experiment_name": self.experiment_name})
            return found["experiment"]["experiment_id"]
        except AdapterNotFound:
            pass
        try:
            return self.rest.post("experiments/create", {"name": self.experiment_name})["experiment_id"]
        except RegistryError:
            # Another publisher created it between our two calls.
            found = self.rest.get("experiments/get-by-name", {"experiment_name": self.experiment_name})
            return found["experiment"]["experiment_id"]

    def _ensure_registered_model(self, name: str) -> None:
        try:
            model = self.rest.get("registered-models/get", {"name": name})["registered_model"]
        except AdapterNotFound:
            try:
                self.rest.post(
                    "registered-models/create",
                    {"name": name, "tags": [{"key": TAG_ADAPTER, "value": "true"}],
                     "description": f"LoRA adapter {name}, served by loraplex"},
                )
                return
            except RegistryError:
                model = self.rest.get("registered-models/get", {"name": name})["registered_model"]
        tags = {entry["key"]: entry.get("value") for entry in model.get("tags") or []}
        if tags.get(TAG_ADAPTER) != "true":
            self._set_model_tag(name, TAG_ADAPTER, "true")

    def _log_adapter_run(
        self, folder: Path, name: str, facts: AdapterFacts, fingerprint: str, experiment_id: str, progress: bool
    ) -> str:
        try:
            run = self.client.create_run(experiment_id, run_name=f"publish-{name}", tags={"loraplex.adapter_name": name})
        except MlflowException as error:
            raise RegistryError(f"MLflow could not create a run: {error.message}") from None
        run_id = run.info.run_id
        try:
            for key, value in {
                "rank": facts.rank,
                "target_modules": ",".join(facts.target_modules),
                "size_bytes": facts.size_bytes,
                "sha256": facts.folder_sha256,
                "base_fingerprint": fingerprint,
            }.items():
                self.client.log_param(run_id, key, value)
            upload_folder(self.client, run_id, folder, ARTIFACT_SUBDIR, progress=progress, label=name)
        except BaseException:
            self.client.update_run(run_id, status="FAILED")
            raise
        self.client.update_run(run_id, status="FINISHED")
        return run_id

    # ---- read ----------------------------------------------------------------------------------

    def resolve(self, name: str, alias_or_version: str) -> AdapterVersion:
        """The version an alias points to, or a version by number."""
        ref = str(alias_or_version)
        try:
            if ref.isdigit():
                found = self.rest.get("model-versions/get", {"name": name, "version": ref})["model_version"]
            else:
                found = self.rest.get("registered-models/alias", {"name": name, "alias": ref})["model_version"]
        except AdapterNotFound:
            raise AdapterNotFound(f"adapter {name!r} has no version or alias {ref!r}") from None
        except RegistryUnavailable:
            raise
        except RegistryError as error:
            # MLflow answers 400 (not 404) for some malformed names and aliases.
            raise AdapterNotFound(f"adapter {name!r} has no version or alias {ref!r} ({error})") from None
        return _version_from_rest(found)

    def _registered_model(self, name: str) -> dict:
        try:
            return self.rest.get("registered-models/get", {"name": name})["registered_model"]
        except AdapterNotFound:
            raise AdapterNotFound(f"no adapter named {name!r} in the registry") from None

    def versions(self, name: str) -> list[AdapterVersion]:
        model = self._registered_model(name)
        aliases: dict[str, list[str]] = {}
        for entry in model.get("aliases") or []:
            aliases.setdefault(str(entry["version"]), []).append(entry["alias"])
        found = self._search_all("model-versions/search", f"name='{name}'", "model_versions")
        return sorted(
            (_version_from_rest(mv, tuple(sorted(aliases.get(str(mv["version"]), [])))) for mv in found),
            key=lambda v: int(v.version),
        )

    def version_tags(self, name: str, version: str) -> dict[str, str]:
        """The tags on one model version as MLflow holds them now."""
        found = self.rest.get("model-versions/get", {"name": name, "version": str(version)})["model_version"]
        return {entry["key"]: entry.get("value", "") for entry in found.get("tags") or []}

    def set_version_tag(self, name: str, version: str, key: str, value: str) -> None:
        self.rest.post("model-versions/set-tag", {"name": name, "version": str(version), "key": key, "value": value})

    def search_versions(self, search_filter: str) -> list[AdapterVersion]:
        """Every model version MLflow's search `search_filter` matches (all pages)."""
        return [_version_from_rest(mv) for mv in self._search_all("model-versions/search", search_filter, "model_versions")]

    def _search_adapter_models(self, retry: bool = True) -> list[dict]:
        return self._search_all(
            "registered-models/search", f"tags.`{TAG_ADAPTER}` = 'true'", "registered_models", retry=retry
        )

    def _search_all(self, endpoint: str, search_filter: str, items_key: str, *, retry: bool = True) -> list[dict]:
        """Every page of an MLflow search endpoint."""
        items: list[dict] = []
        params = {"filter": search_filter, "max_results": _SEARCH_PAGE}
        while True:
            reply = self.rest.call("GET", endpoint, params, retry=retry)
            items.extend(reply.get(items_key) or [])
            page_token = reply.get("next_page_token")
            if not page_token:
                return items
            params = {**params, "page_token": page_token}

    def routing_table(self, *, retry: bool = True) -> RoutingTable:
        """Every adapter's route, from one search call per 1,000 adapters."""
        fetched = time.time()
        routes = {
            route.name: route
            for route in (route_from_registered_model(m, self._tag_warnings) for m in self._search_adapter_models(retry))
        }
        return RoutingTable(adapters=routes, fetched_unix=fetched)

    def list_adapters(self) -> list[AdapterRoute]:
        return sorted(self.routing_table().adapters.values(), key=lambda route: route.name)

    # ---- traffic -------------------------------------------------------------------------------

    def promote(self, name: str, version: str, alias: str) -> AdapterVersion:
        """Points `alias` at `version`; champion moves are recorded so rollback can undo them."""
        check_routing_alias(alias)
        target = self.resolve(name, str(version))
        if not target.folder_sha256 or not target.base_fingerprint:
            raise AdapterRejected(
                f"{name} v{target.version} was not published through loraplex (no {TAG_FOLDER_SHA256} tag); "
                "publish the folder with `loraplex adapters publish`"
            )
        if alias == CHAMPION:
            history = self._champion_history_with_current(name)
            self.rest.post("registered-models/alias", {"name": name, "alias": alias, "version": target.version})
            if not history or history[-1] != target.version:
                history.append(target.version)
            self._set_model_tag(name, TAG_CHAMPION_HISTORY, ",".join(history[-HISTORY_LENGTH:]))
        else:
            self.rest.post("registered-models/alias", {"name": name, "alias": alias, "version": target.version})
        return self.resolve(name, target.version)

    def rollback(self, name: str) -> AdapterVersion:
        """Moves `champion` back to the version it held before the current one."""
        current = self._alias_version(name, CHAMPION)
        history = self._champion_history_with_current(name)
        while history and history[-1] == current:
            history.pop()
        if not history:
            raise RegistryError(f"no earlier champion of {name!r} is recorded; nothing to roll back to")
        target = history[-1]
        try:
            self.resolve(name, target)
        except AdapterNotFound:
            raise RegistryError(f"the earlier champion of {name!r}, v{target}, no longer exists") from None
        self.rest.post("registered-models/alias", {"name": name, "alias": CHAMPION, "version": target})
        self._set_model_tag(name, TAG_CHAMPION_HISTORY, ",".join(history[-HISTORY_LENGTH:]))
        return self.resolve(name, target)

    def _champion_history_with_current(self, name: str) -> list[str]:
        """Champions in order, the current one last.

        The tag holds the sequence as loraplex last wrote it; a champion moved in the MLflow UI since
        then is appended here, so a rollback after a UI promotion returns to the version it replaced.
        """
        model = self._registered_model(name)
        tags = {entry["key"]: entry.get("value", "") for entry in model.get("tags") or []}
        history = list(parse_champion_history(tags.get(TAG_CHAMPION_HISTORY)))
        current = next((str(e["version"]) for e in model.get("aliases") or [] if e["alias"] == CHAMPION), None)
        if current is not None and (not history or history[-1] != current):
            history.append(current)
        return history

    def set_canary_percent(self, name: str, percent: float) -> None:
        if isinstance(percent, bool) or not isinstance(percent, (int, float)) or not math.isfinite(percent) \
                or not 0 <= percent <= 100:
            raise RegistryError(f"canary percent must be a number from 0 to 100, not {percent!r}")
        self._registered_model(name)
        text = str(int(percent)) if float(percent).is_integer() else repr(float(percent))
        self._set_model_tag(name, TAG_CANARY_PERCENT, text)

    def set_fallback(self, name: str, policy: str) -> None:
        """What serves when `name`'s routed version cannot: `none` (the error) or `base` (the base model)."""
        if policy not in FALLBACK_POLICIES:
            raise RegistryError(f"fallback must be one of {', '.join(FALLBACK_POLICIES)}, not {policy!r}")
        self._registered_model(name)
        self._set_model_tag(name, TAG_FALLBACK, policy)

    def _alias_version(self, name: str, alias: str) -> str | None:
        model = self._registered_model(name)
        for entry in model.get("aliases") or []:
            if entry["alias"] == alias:
                return str(entry["version"])
        return None

    def _set_model_tag(self, name: str, key: str, value: str) -> None:
        self.rest.post("registered-models/set-tag", {"name": name, "key": key, "value": value})

    # ---- fetch ---------------------------------------------------------------------------------

    def fetch(self, name: str, version: str, expected_base_fingerprint: str | None = None) -> Path:
        """A local, sha256-verified copy of the version's PEFT folder, from the cache when present.

        Nothing already in the cache changes when a version is refused. While MLflow is unreachable,
        a numbered version fetched before is still served from the cache (also after a restart: the
        cache and its version index are on disk). A cached folder is checked against its content
        address before it is handed out; a damaged one is removed and downloaded again.
        """
        try:
            adapter = self.resolve(name, str(version))
        except RegistryUnavailable:
            cached = self._cached_while_offline(name, str(version), expected_base_fingerprint)
            if cached is None:
                raise
            return cached
        label = f"{name} v{adapter.version}"
        if not adapter.folder_sha256 or not _SHA256_HEX.match(adapter.folder_sha256):
            raise AdapterRejected(f"{label} has no valid {TAG_FOLDER_SHA256} tag: it was not published through loraplex")
        self._check_base(label, adapter.base_fingerprint, expected_base_fingerprint)
        target = self.cache_dir / adapter.folder_sha256
        if not self._cached_intact(target):
            self._download_into_cache(adapter, target)
        self._remember(adapter)
        return target

    @staticmethod
    def _check_base(label: str, published: str | None, expected: str | None) -> None:
        if expected is not None and published != expected:
            raise AdapterRejected(
                f"{label} was published for base model {str(published)[:12]}…, "
                f"this base model is {expected[:12]}…"
            )

    def _download_into_cache(self, adapter: AdapterVersion, target: Path) -> None:
        label = f"{adapter.name} v{adapter.version}"
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        incoming = self.cache_dir / f".incoming-{uuid.uuid4().hex}"
        try:
            downloaded = self._download(adapter, incoming)
            actual = folder_sha256(downloaded)
            if actual != adapter.folder_sha256:
                raise AdapterRejected(
                    f"{label} artifacts are corrupt: folder sha256 {actual[:12]}… differs from the "
                    f"published {str(adapter.folder_sha256)[:12]}…"
                )
            check_no_symlinks(downloaded)
            try:
                if is_mix_folder(downloaded):
                    read_manifest(downloaded, self.max_mix_components)
                else:
                    check_adapter_files(downloaded)
            except AdapterFormatError as error:
                raise AdapterRejected(f"{label}: {error}") from None
            try:
                os.rename(downloaded, target)
            except OSError:
                if not target.is_dir():  # not a concurrent fetch of the same content: a real failure
                    raise
        finally:
            shutil.rmtree(incoming, ignore_errors=True)

    # Which content a numbered version had, so a cached version is still served while MLflow is
    # down. Only consulted offline: online, MLflow's answer wins (a deleted and re-created model
    # can reuse version numbers).
    def _index_path(self, name: str, version: str) -> Path:
        return self.cache_dir / ".versions" / name / f"{version}.json"

    def _remember(self, adapter: AdapterVersion) -> None:
        path = self._index_path(adapter.name, adapter.version)
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(f".{uuid.uuid4().hex}.tmp")
        temporary.write_text(json.dumps({"sha256": adapter.folder_sha256, "base_fingerprint": adapter.base_fingerprint}))
        os.replace(temporary, path)

    def _cached_while_offline(self, name: str, version: str, expected_base_fingerprint: str | None) -> Path | None:
        if not version.isdigit() or not _ADAPTER_NAME.match(name):
            return None
        try:
            known = json.loads(self._index_path(name, version).read_text())
        except (OSError, ValueError):
            return None
        sha256 = known.get("sha256") or ""
        target = self.cache_dir / sha256
        if not _SHA256_HEX.match(sha256) or not self._cached_intact(target):
            return None
        self._check_base(f"{name} v{version}", known.get("base_fingerprint"), expected_base_fingerprint)
        logger.warning("MLflow unreachable: serving %s v%s from the local cache", name, version)
        return target

    def _cached_intact(self, target: Path) -> bool:
        """Whether the cache holds `target` with the content its name (its folder_sha256) promises;
        marks it recently used. A damaged copy (a disk error, a hand edit) is removed."""
        if not target.is_dir():
            return False
        actual = folder_sha256(target)
        if actual != target.name:
            logger.warning("cached adapter folder %s is damaged (sha256 %s…); removing it", target, actual[:12])
            self._remove_cached(target)
            return False
        os.utime(target)  # the cache's least-recently-used order is its folders' mtimes
        return True

    def _remove_cached(self, folder: Path) -> None:
        # Renamed first, so a concurrent fetch never sees half a folder under a content address.
        doomed = self.cache_dir / f".evicted-{uuid.uuid4().hex}"
        try:
            os.rename(folder, doomed)
        except OSError:
            return
        shutil.rmtree(doomed, ignore_errors=True)

    def cached_folders(self) -> list[tuple[Path, int]]:
        """The download cache's adapter folders and their sizes in bytes, least recently used first."""
        if not self.cache_dir.is_dir():
            return []
        folders = [p for p in self.cache_dir.iterdir() if _SHA256_HEX.match(p.name) and p.is_dir()]
        folders.sort(key=lambda p: p.stat().st_mtime)
        return [(p, sum(f.stat().st_size for f in p.rglob("*") if f.is_file())) for p in folders]

    def prune_cache(self, max_bytes: int, keep: Collection[Path] = ()) -> tuple[list[Path], int]:
        """Removes least-recently-used adapter folders until the cache holds at most `max_bytes`
        (0 = no bound), never one in `keep`, and the version index entries that named them.
        Returns the folders removed and the bytes still held."""
        folders = self.cached_folders()
        held = sum(size for _, size in folders)
        kept = {Path(p) for p in keep}
        removed: list[Path] = []
        for folder, size in folders:
            if max_bytes <= 0 or held <= max_bytes:
                break
            if folder in kept:
                continue
            self._remove_cached(folder)
            removed.append(folder)
            held -= size
        if removed:
            gone = {folder.name for folder in removed}
            for index in (self.cache_dir / ".versions").glob("*/*.json"):
                try:
                    if json.loads(index.read_text()).get("sha256") in gone:
                        index.unlink()
                except (OSError, ValueError):
                    continue
            logger.info("adapter download cache: removed %d least recently used folder(s), %d bytes held", len(removed), held)
        return removed, held

    def _download(self, adapter: AdapterVersion, into: Path) -> Path:
        from mlflow.artifacts import download_artifacts

        into.mkdir(parents=True)
        try:
            local = download_artifacts(artifact_uri=adapter.source, dst_path=str(into), tracking_uri=self.tracking_uri)
        except MlflowException as error:
            message = error.message.splitlines()[0] if error.message else type(error).__name__
            if error.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                raise AdapterRejected(f"{adapter.name} v{adapter.version} artifacts cannot be read: {message}") from None
            raise RegistryUnavailable(f"downloading {adapter.name} v{adapter.version} failed: {message}") from None
        except OSError as error:
            raise AdapterRejected(f"{adapter.name} v{adapter.version} artifacts cannot be read: {error}") from None
        path = Path(local)
        if not path.is_dir():
            raise AdapterRejected(f"{adapter.name} v{adapter.version} artifacts are a file, not a PEFT folder")
        return path
