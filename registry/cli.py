"""`loraplex adapters …`: publish, list and promote adapters in the MLflow registry.

Also runs standalone: `python -m registry adapters list`.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from loraplex.adapter_mix import DEFAULT_MAX_COMPONENTS, MixError, parse_component_argument
from registry.errors import RegistryError
from registry.routing import FALLBACK_POLICIES, ROUTING_ALIASES

TRACKING_URI_VARIABLES = ("LORAPLEX_REGISTRY_TRACKING_URI", "MLFLOW_TRACKING_URI")
DEFAULT_CACHE_DIR = Path("~/.cache/loraplex/adapters")


def add_adapter_commands(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Registers `adapters …` on a parent parser's subcommands; each sets `handler=`."""
    adapters = subparsers.add_parser("adapters", help="publish, list and promote adapters in MLflow")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--tracking-uri",
        help=f"MLflow server URL (default: ${TRACKING_URI_VARIABLES[0]} or ${TRACKING_URI_VARIABLES[1]})",
    )
    common.add_argument(
        "--max-rank", type=int,
        help="largest LoRA rank accepted (default: $LORAPLEX_REGISTRY_MAX_RANK or 64)",
    )
    subcommands = adapters.add_subparsers(dest="adapters_command", required=True, metavar="COMMAND")

    def command(name: str, help: str) -> argparse.ArgumentParser:
        return subcommands.add_parser(name, parents=[common], help=help, description=help)

    publish = command("publish", "validate a PEFT adapter folder and publish it as a new version")
    publish.add_argument("path", type=Path, help="folder written by PEFT's save_pretrained")
    publish.add_argument("--name", required=True, help="adapter (registered model) name")
    publish.add_argument(
        "--base-model", required=True, type=Path,
        help="base model folder the adapter was trained for (config.json, tokenizer)",
    )
    publish.add_argument("--alias", choices=ROUTING_ALIASES, help="point this alias at the new version")
    publish.add_argument("--description")
    publish.set_defaults(handler=_reporting_errors(_publish))

    mix = command(
        "mix",
        "publish a new version of NAME that serves a weighted sum of adapters "
        "(each COMPONENT is ADAPTER=WEIGHT or ADAPTER@VERSION=WEIGHT; no version: its champion, else its latest)",
    )
    mix.add_argument("name", help="the mix's (registered model) name")
    mix.add_argument("components", nargs="+", metavar="COMPONENT")
    mix.add_argument("--alias", choices=ROUTING_ALIASES, help="point this alias at the new version")
    mix.add_argument("--description")
    mix.add_argument(
        "--max-components", type=int,
        help=f"most components a mix may have (default: $LORAPLEX_REGISTRY_MAX_MIX_COMPONENTS or {DEFAULT_MAX_COMPONENTS})",
    )
    mix.set_defaults(handler=_reporting_errors(_mix))

    command("list", "adapters with their champion, canary and shadow").set_defaults(handler=_reporting_errors(_list))

    versions = command("versions", "versions of one adapter")
    versions.add_argument("name")
    versions.set_defaults(handler=_reporting_errors(_versions))

    promote = command("promote", "point an alias at a version")
    promote.add_argument("name")
    promote.add_argument("version")
    promote.add_argument("--alias", choices=ROUTING_ALIASES, default="champion")
    promote.set_defaults(handler=_reporting_errors(_promote))

    canary = command("canary", "set the share of traffic the canary version gets")
    canary.add_argument("name")
    canary.add_argument("--percent", type=float, required=True)
    canary.set_defaults(handler=_reporting_errors(_canary))

    fallback = command(
        "fallback", "what answers when the adapter's version cannot be served: the error (none) or the base model (base)"
    )
    fallback.add_argument("name")
    fallback.add_argument("policy", choices=FALLBACK_POLICIES)
    fallback.set_defaults(handler=_reporting_errors(_fallback))

    rollback = command("rollback", "move champion back to the version it held before")
    rollback.add_argument("name")
    rollback.set_defaults(handler=_reporting_errors(_rollback))
    return adapters


def _tracking_uri(args: argparse.Namespace) -> str:
    uri = args.tracking_uri or next((os.environ[v] for v in TRACKING_URI_VARIABLES if os.environ.get(v)), None)
    if not uri:
        raise RegistryError(
            "no MLflow server given: pass --tracking-uri or set " + " or ".join(TRACKING_URI_VARIABLES)
        )
    return uri


def _setting(given: int | None, variable: str, default: int) -> int:
    if given is not None:
        return given
    raw = os.environ.get(variable, str(default))
    if not raw.isdigit():
        raise RegistryError(f"{variable}={raw!r} is not a positive integer")
    return int(raw)


def _registry(args: argparse.Namespace):
    from registry.adapter_registry import AdapterRegistry

    cache_dir = Path(os.environ.get("LORAPLEX_REGISTRY_CACHE_DIR", DEFAULT_CACHE_DIR)).expanduser()
    return AdapterRegistry(
        _tracking_uri(args),
        cache_dir=cache_dir,
        max_rank=_setting(args.max_rank, "LORAPLEX_REGISTRY_MAX_RANK", 64),
        max_mix_components=_setting(
            getattr(args, "max_components", None), "LORAPLEX_REGISTRY_MAX_MIX_COMPONENTS", DEFAULT_MAX_COMPONENTS
        ),
    )


def _describe(version) -> str:
    aliases = f"  [{', '.join(version.aliases)}]" if version.aliases else ""
    rank = f"r={version.rank}" if version.rank is not None else "r=?"
    size = f"{version.size_bytes / 1024:.0f} KiB" if version.size_bytes is not None else "? KiB"
    sha = (version.folder_sha256 or "-")[:12]
    mix = f"  mix of {version.mix}" if version.mix else ""
    return f"{version.name} v{version.version}  {rank}  {size}  folder sha256 {sha}{mix}{aliases}"


def _publish(args: argparse.Namespace) -> int:
    version = _registry(args).publish(
        args.path, args.name, args.base_model, alias=args.alias, description=args.description, progress=True
    )
    print(f"published {_describe(version)}")
    return 0


def _mix(args: argparse.Namespace) -> int:
    try:
        components = [parse_component_argument(text, default_version="") for text in args.components]
    except MixError as error:
        raise RegistryError(str(error)) from None
    version = _registry(args).publish_mix(args.name, components, alias=args.alias, description=args.description)
    print(f"published {_describe(version)}")
    return 0


def _list(args: argparse.Namespace) -> int:
    routes = _registry(args).list_adapters()
    if not routes:
        print("no adapters published")
        return 0
    print(f"{'adapter':<24} {'champion':>8} {'canary':>8} {'canary %':>8} {'shadow':>8}  tenants")
    for route in routes:
        tenants = "all" if route.tenants is None else ",".join(sorted(route.tenants)) or "none"
        print(
            f"{route.name:<24} {route.champion or '-':>8} {route.canary or '-':>8} "
            f"{route.canary_percent:>8g} {route.shadow or '-':>8}  {tenants}"
        )
    return 0


def _versions(args: argparse.Namespace) -> int:
    for version in _registry(args).versions(args.name):
        print(_describe(version))
    return 0


def _promote(args: argparse.Namespace) -> int:
    version = _registry(args).promote(args.name, args.version, args.alias)
    print(f"{args.alias} of {args.name} is now v{version.version}")
    return 0


def _canary(args: argparse.Namespace) -> int:
    _registry(args).set_canary_percent(args.name, args.percent)
    print(f"canary of {args.name} now takes {args.percent:g}% of its traffic")
    return 0


def _fallback(args: argparse.Namespace) -> int:
    _registry(args).set_fallback(args.name, args.policy)
    print(f"fallback of {args.name} is now {args.policy}")
    return 0


def _rollback(args: argparse.Namespace) -> int:
    version = _registry(args).rollback(args.name)
    print(f"champion of {args.name} rolled back to v{version.version}")
    return 0


def _reporting_errors(command):
    """Registry errors become one line on stderr and exit code 1, whoever parsed the arguments."""

    def run(args: argparse.Namespace) -> int:
        # MLflow's INFO lines ("Waiting up to 300 seconds…") would bury the one line we print.
        logging.getLogger("mlflow").setLevel(logging.WARNING)
        try:
            return int(command(args) or 0)
        except RegistryError as error:
            print(f"error: {error}", file=sys.stderr)
            return 1
        except OSError as error:
            print(f"error: {error}", file=sys.stderr)
            return 1

    return run


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m registry", description=__doc__)
    add_adapter_commands(parser.add_subparsers(dest="command", required=True))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.handler(args) or 0)
