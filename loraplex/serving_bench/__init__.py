"""`loraplex bench-serve`: a serving benchmark against any deployment's OpenAI-compatible API,
as vLLM's serving benchmark does it — Poisson arrivals over a set of adapters, streamed answers,
time to first token, inter-token latency and end-to-end latency percentiles, throughput, errors by
status, per adapter; JSON and a plot at the end.

    workload.py   when requests arrive and which adapter each one names
    client.py     one streamed request, timed
    report.py     percentiles, the JSON report and the plot
    cli.py        the command line
"""
