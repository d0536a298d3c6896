"""Demo assets: a small Llama base model with its own tokenizer and three PEFT adapters (legal,
clinical, sql), trained locally on generated text because no model hub is reachable.

    assets = ensure_demo_assets()          # builds once (~2-3 min of one CPU core), then cached
    assets.base_dir                        # HF model folder: AutoModelForCausalLM/AutoTokenizer
    assets.adapters["legal"]               # PEFT folder: PeftModel.from_pretrained(base, ...)
    assets.style_markers["legal"]          # words every legal answer contains

CLI: `python -m loraplex.demo build [--out ROOT] [--force] [--json] [--quiet]` (also
`loraplex demo build`). Cache root: `--out`/`cache_dir`, else `$LORAPLEX_DEMO_DIR`, else
`~/.cache/loraplex/demo`; the assets sit in `<root>/<builder fingerprint>/`, so a changed
builder (config, corpus, training code, library versions) builds afresh. Builds are trained on
CPU in fp32 and the files are ordinary safetensors folders, loadable on any device and dtype and
quantizable with bitsandbytes (every layer size is a multiple of 64).
"""

from loraplex.demo.assets import DemoAssets
from loraplex.demo.config import AdapterRecipe, DemoBuildConfig
from loraplex.demo.ensure import CACHE_DIR_ENV, default_cache_root, demo_assets_dir, ensure_demo_assets

__all__ = [
    "AdapterRecipe",
    "CACHE_DIR_ENV",
    "DemoAssets",
    "DemoBuildConfig",
    "default_cache_root",
    "demo_assets_dir",
    "ensure_demo_assets",
]
