"""Where the gateway's CPU per request goes: `python -m gateway` under cProfile, summarized.

    python -m bench.gateway_profile OUT.prof [gateway arguments]

serves the gateway as `python -m gateway` does, with a profiler on its event-loop thread (CPU
time, `time.thread_time`) that SIGUSR1 switches on and SIGUSR2 switches off, writing OUT.prof; so
the profile holds the requests sent in between and nothing of start-up. `summarize` turns it into
the benchmark's JSON: the profiled thread's CPU by package and the functions with the most own time.
The profiler slows the code it measures (more so many small Python calls), so shares are what to
read from it; the unprofiled CPU per request comes from the benchmark's own measurement.
"""

from __future__ import annotations

import cProfile
import pstats
import signal
import sys
import time
from pathlib import Path

# Where a function's file lives -> the package its time is charged to.
_PACKAGES = ("grpc", "litestar", "uvicorn", "msgspec", "prometheus_client", "opentelemetry", "httptools", "uvloop", "google")


def serve(out_path: str, gateway_argv: list[str]) -> int:
    from gateway.__main__ import main

    profiler = cProfile.Profile(time.thread_time)

    def start(signum, frame) -> None:
        profiler.enable()

    def stop(signum, frame) -> None:
        profiler.disable()
        profiler.dump_stats(out_path)

    signal.signal(signal.SIGUSR1, start)
    signal.signal(signal.SIGUSR2, stop)
    return main(gateway_argv)


def package_of(filename: str) -> str:
    if filename == "~" or filename.startswith("<"):
        return "builtins and C code called from Python"
    path = Path(filename)
    parts = path.parts
    if "site-packages" in parts:
        name = parts[parts.index("site-packages") + 1]
        return next((p for p in _PACKAGES if name == p or name.startswith(p + ".")), name.split(".")[0])
    for own in ("gateway", "loraplex", "protos"):
        if own in parts:
            return own
    if "asyncio" in parts:
        return "asyncio"
    return "python stdlib"


def summarize(profile_path: Path, requests: int, top: int = 15) -> dict:
    """The profile as ms of profiled CPU per request, by package and by function (own time)."""
    stats = pstats.Stats(str(profile_path)).stats
    by_package: dict[str, float] = {}
    functions = []
    total = 0.0
    for (filename, line, name), (_, calls, own_s, cumulative_s, _) in stats.items():
        total += own_s
        package = package_of(filename)
        by_package[package] = by_package.get(package, 0.0) + own_s
        functions.append((own_s, cumulative_s, calls, package, f"{_short(filename)}:{line}({name})"))
    n = max(1, requests)
    functions.sort(reverse=True)
    return {
        "requests": requests,
        "profiled_cpu_ms_per_request": total * 1000.0 / n,
        "share_by_package": {p: round(s / total, 4) for p, s in sorted(by_package.items(), key=lambda kv: -kv[1]) if total},
        "top_functions_by_own_time": [
            {
                "function": where,
                "package": package,
                "own_ms_per_request": round(own * 1000.0 / n, 4),
                "cumulative_ms_per_request": round(cumulative * 1000.0 / n, 4),
                "calls_per_request": round(calls / n, 2),
            }
            for own, cumulative, calls, package, where in functions[:top]
        ],
        "python_calls_per_request": round(sum(f[2] for f in functions) / n, 1),
    }


def _short(filename: str) -> str:
    parts = Path(filename).parts
    for anchor in ("site-packages", "gateway", "loraplex", "protos", "asyncio"):
        if anchor in parts:
            start = parts.index(anchor) + (1 if anchor == "site-packages" else 0)
            return "/".join(parts[start:])
    return Path(filename).name


if __name__ == "__main__":
    sys.exit(serve(sys.argv[1], sys.argv[2:]))
