"""`python -m bench [--quick] [--out bench/results]`: the shard benchmark of issue 3."""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import replace
from pathlib import Path

from bench.assets import default_cache_dir
from bench.profiles import FULL, QUICK
from bench.report import markdown_table, write_outputs
from bench.runner import run_benchmark


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small model, fewer tokens, one round (< 2 min)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results", help="folder for <name>.json and <name>.png")
    parser.add_argument("--name", help="result file name (default shard_bench or shard_bench_quick)")
    parser.add_argument("--threads", type=int, help="torch threads (default 2)")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), help="model and adapter dtype (default fp32)")
    parser.add_argument("--adapter-dtype", choices=("auto", "fp32", "bf16"),
                        help="dtype of the device slot pool, as the shard's adapter_dtype setting (default auto = --dtype)")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="where generated PEFT adapters are kept (default $LORAPLEX_BENCH_CACHE or ~/.cache/loraplex/bench)")
    args = parser.parse_args(argv)
    profile = QUICK if args.quick else FULL
    changes = {k: v for k, v in (("name", args.name), ("threads", args.threads), ("dtype", args.dtype),
                                                    ("adapter_dtype", args.adapter_dtype)) if v is not None}
    profile = replace(profile, **changes)
    logging.basicConfig(level=logging.WARNING)
    result = run_benchmark(profile, args.cache_dir or default_cache_dir(), log=lambda m: print(m, file=sys.stderr, flush=True))
    json_path, png_path = write_outputs(result, args.out)
    print(markdown_table(result))
    print(f"\nwrote {json_path} and {png_path} in {result['duration_s']:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
