"""``python -m shard --config FILE``: run one shard until SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from shard.c_allocator import retain_freed_memory
from shard.settings import SettingsError, ShardSettings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m shard", description="Run a loraplex shard (gRPC).")
    parser.add_argument("--config", help="YAML or TOML settings file; env LORAPLEX_SHARD_* override it")
    args = parser.parse_args(argv)
    try:
        settings = ShardSettings.load(args.config)
    except SettingsError as exc:
        print(f"shard: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if settings.retain_freed_memory and not retain_freed_memory():
        logging.getLogger("shard").warning("this C library does not take retain_freed_memory; its defaults apply")
    from shard.model_loading import ModelLoadError
    from shard.server import serve

    try:
        asyncio.run(serve(settings))
    except ModelLoadError as exc:
        logging.getLogger("shard").error("shard %s cannot start: %s", settings.shard_id, exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
