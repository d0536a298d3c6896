"""The shard benchmark (issue 3): `python -m bench [--quick] [--out bench/results]`.

Everything is measured in one process, as ratios against a baseline run on the same machine
moments apart (paired or interleaved runs), because the machine is shared and absolute timings
mean little. Results go to `<out>/<name>.json` and `<out>/<name>.png`; a Markdown table is printed.
"""
