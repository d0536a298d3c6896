"""The vLLM side of the peer benchmark, run by vLLM's own virtual environment's python (it imports
nothing from this repository): `python bench/vllm_worker.py EXCHANGE_DIR`.

Reads EXCHANGE_DIR/settings.json, builds one offline `vllm.LLM` over the model folder and writes
ready.json; then serves runs: the benchmark writes run-N.json (requests with prompt token ids, max
tokens and an optional adapter) and this answers result-N.json with the run's wall time, its
generated tokens and every request's time to first token (vLLM's own per-request metrics). Files,
not pipes: the process's output is vLLM's log, kept in a file by whoever started it."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

POLL_S = 0.05


def build_llm(settings: dict):
    from vllm import LLM

    kwargs = dict(
        model=settings["model_dir"],
        dtype={"fp32": "float32", "bf16": "bfloat16"}[settings["dtype"]],
        max_model_len=settings["max_model_len"],
        max_num_seqs=settings["max_batch"],
        enable_prefix_caching=settings["prefix_caching"],
        disable_log_stats=False,  # per-request metrics carry the time to first token
        seed=0,
    )
    if settings["adapter_paths"]:
        kwargs.update(
            enable_lora=True,
            max_loras=settings["device_slots"],
            max_cpu_loras=settings["host_capacity"],
            max_lora_rank=settings["max_rank"],
        )
    return LLM(**kwargs)


def run(llm, settings: dict, job: dict) -> dict:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest

    adapter_ids = {name: index + 1 for index, name in enumerate(sorted(settings["adapter_paths"]))}
    prompts, params, loras = [], [], []
    for request in job["requests"]:
        prompts.append(TokensPrompt(prompt_token_ids=request["prompt_ids"]))
        # Greedy, and exactly max_tokens new tokens: the same work loraplex is asked for.
        params.append(SamplingParams(temperature=0.0, max_tokens=request["max_tokens"], ignore_eos=True))
        name = request["adapter"]
        loras.append(None if name is None else LoRARequest(name, adapter_ids[name], settings["adapter_paths"][name]))
    started = time.perf_counter()
    outputs = llm.generate(prompts, params, lora_request=loras if settings["adapter_paths"] else None, use_tqdm=False)
    seconds = time.perf_counter() - started
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    ttft = [o.metrics.first_token_latency for o in outputs if o.metrics is not None]
    return {"seconds": seconds, "tokens": tokens, "ttft_s": ttft,
            "outputs": [list(o.outputs[0].token_ids) for o in outputs]}


def write_json(path: Path, value: dict) -> None:
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps(value))
    os.replace(partial, path)  # the reader never sees half a file


def main() -> int:
    exchange = Path(sys.argv[1])
    settings = json.loads((exchange / "settings.json").read_text())
    import vllm

    llm = build_llm(settings)
    write_json(exchange / "ready.json", {"vllm": vllm.__version__})
    index = 0
    while True:
        job = exchange / f"run-{index}.json"
        if not job.is_file():
            time.sleep(POLL_S)
            continue
        write_json(exchange / f"result-{index}.json", run(llm, settings, json.loads(job.read_text())))
        index += 1


if __name__ == "__main__":
    raise SystemExit(main())
