"""`loraplex demo build` / `python -m loraplex.demo build`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def run_build(args: argparse.Namespace) -> int:
    from loraplex.demo.ensure import ensure_demo_assets

    try:
        assets = ensure_demo_assets(args.out, progress=not args.quiet, force=args.force)
    except RuntimeError as error:
        # Imported only now: the builder pulls in torch, which a cache hit does not need.
        from loraplex.demo.builder import DemoBuildFailed

        if not isinstance(error, DemoBuildFailed):
            raise
        print(f"demo build failed: {error}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({
            "root": str(assets.root),
            "base_dir": str(assets.base_dir),
            "adapters": {name: str(path) for name, path in assets.adapters.items()},
            "demo_prompt": assets.demo_prompt,
        }))
        return 0
    report = assets.build_report
    print(f"demo assets: {assets.root}")
    print(f"  base model: {assets.base_dir}  ({report.get('base_parameters', '?')} parameters)")
    for name, path in assets.adapters.items():
        print(f"  adapter {name}: {path}")
    print(f"  built in {report.get('wall_seconds', '?')} s wall, {report.get('cpu_seconds', '?')} s CPU")
    return 0


def _add_build_options(build: argparse.ArgumentParser) -> None:
    build.add_argument("--out", type=Path, default=None,
                       help="cache root (default $LORAPLEX_DEMO_DIR or ~/.cache/loraplex/demo); "
                            "assets go into a subfolder named after the builder version")
    build.add_argument("--force", action="store_true", help="rebuild even if cached")
    build.add_argument("--quiet", action="store_true", help="no progress bars")
    build.add_argument("--json", action="store_true", help="print the locations as JSON")
    build.set_defaults(handler=run_build)


_BUILD_HELP = "build the demo assets, or find them cached"


def add_demo_commands(commands: argparse._SubParsersAction) -> None:
    """`loraplex demo build …` inside the `loraplex` console script."""
    demo = commands.add_parser("demo", help="the locally built demo model and adapters")
    demo_commands = demo.add_subparsers(dest="demo_command", required=True)
    _add_build_options(demo_commands.add_parser("build", help=_BUILD_HELP))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loraplex.demo")
    commands = parser.add_subparsers(dest="command", required=True)
    _add_build_options(commands.add_parser("build", help=_BUILD_HELP))
    args = parser.parse_args(argv)
    return int(args.handler(args) or 0)
