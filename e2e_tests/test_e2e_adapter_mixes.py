"""Adapter mixes over real processes (MLflow, shards, gateway): an ad-hoc mix asked for with the
official openai client's `extra_body` answers what PEFT's "cat" combination of the same adapters
answers offline; a registered mix (`loraplex adapters mix`) is a version like any other, served as
a canary and compared as a shadow; a mix over an adapter the key may not use is 403 as that model.

Works on versions of its own (new versions of `clinical` and `sql`) and puts the aliases back."""

from __future__ import annotations

import subprocess
import sys

import openai
import pytest

from loraplex.adapter_mix import MixComponent
from tests.support.waiting import wait_until

MAX_TOKENS = 8
WEIGHTS = {"legal": 0.7, "clinical": 0.3}


@pytest.fixture(scope="module")
def champions(fault_stack) -> dict[str, str]:
    return {name: fault_stack.alias_version(name, "champion") for name in ("legal", "clinical", "sql")}


@pytest.fixture(scope="module")
def peft_mix_text(fault_stack, champions) -> str:
    """The greedy answer of PEFT's add_weighted_adapter(legal 0.7, clinical 0.3, "cat") on the base
    model loaded exactly as the shards load it (same quantization, same kernels)."""
    import torch
    from peft import PeftModel

    from shard.model_loading import load_base_model

    fs = fault_stack
    folders = {name: fs.registry().fetch(name, champions[name]) for name in WEIGHTS}
    model, tokenizer = load_base_model(fs.base_dir, fs.stack.config.quantization)
    names = list(WEIGHTS)
    peft_model = PeftModel.from_pretrained(model, folders[names[0]], adapter_name=names[0])
    peft_model.load_adapter(folders[names[1]], adapter_name=names[1])
    peft_model.add_weighted_adapter(names, list(WEIGHTS.values()), "mix", combination_type="cat")
    peft_model.set_adapter("mix")
    peft_model.eval()
    ids = tokenizer(fs.running.demo_prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = peft_model.generate(input_ids=ids, max_new_tokens=MAX_TOKENS, do_sample=False)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def openai_client(fs, tenant: str = "acme") -> openai.OpenAI:
    return openai.OpenAI(base_url=fs.gateway_url + "/v1", api_key=fs.running.keys.tenant_keys[tenant], max_retries=0)


def test_an_ad_hoc_mix_answers_as_peft_combined_offline(fault_stack, champions, peft_mix_text):
    fs = fault_stack
    mix = [{"adapter": "legal", "weight": WEIGHTS["legal"]}, {"adapter": f"clinical@{champions['clinical']}", "weight": WEIGHTS["clinical"]}]
    raw = openai_client(fs).completions.with_raw_response.create(
        model="mix", prompt=fs.running.demo_prompt, max_tokens=MAX_TOKENS, temperature=0, extra_body={"loraplex_mix": mix}
    )
    completion = raw.parse()
    assert completion.choices[0].text == peft_mix_text
    assert raw.headers["x-loraplex-route"] == "mix"
    assert raw.headers["x-loraplex-mix"] == f"legal@{champions['legal']}=0.7 clinical@{champions['clinical']}=0.3"
    # Neither adapter alone answers this.
    for name in WEIGHTS:
        alone = openai_client(fs).completions.create(model=name, prompt=fs.running.demo_prompt, max_tokens=MAX_TOKENS, temperature=0)
        assert alone.choices[0].text != peft_mix_text


def test_a_mix_over_an_adapter_the_key_may_not_use_is_403_as_that_model(fault_stack):
    globex = openai_client(fault_stack, "globex")  # granted legal only
    with pytest.raises(openai.PermissionDeniedError) as mixed:
        globex.completions.create(
            model="mix", prompt="x", max_tokens=1,
            extra_body={"loraplex_mix": [{"adapter": "legal", "weight": 0.5}, {"adapter": "clinical", "weight": 0.5}]},
        )
    with pytest.raises(openai.PermissionDeniedError) as alone:
        globex.completions.create(model="clinical", prompt="x", max_tokens=1)
    assert mixed.value.body == alone.value.body
    with pytest.raises(openai.BadRequestError, match="weight"):
        openai_client(fault_stack).completions.create(
            model="mix", prompt="x", max_tokens=1, extra_body={"loraplex_mix": [{"adapter": "legal", "weight": 0}]}
        )


def test_a_registered_mix_is_served_as_a_canary_like_any_version(fault_stack, champions, peft_mix_text):
    fs = fault_stack
    published = subprocess.run(
        [sys.executable, "-m", "registry", "adapters", "mix", "clinical",
         f"legal@{champions['legal']}=0.7", "clinical=0.3", "--tracking-uri", fs.mlflow_url],
        capture_output=True, text=True, timeout=120,
    )
    assert published.returncode == 0, published.stderr
    version = fs.registry().versions("clinical")[-1]
    assert version.mix == f"legal@{champions['legal']}=0.7 clinical@{champions['clinical']}=0.3"
    fs.set_alias("clinical", "canary", version.version)
    fs.set_model_tag("clinical", "loraplex.canary_percent", "100")
    try:
        assert wait_until(lambda: fs.reload_routing()["adapters"]["clinical"]["canary"] == version.version, 10)
        raw = openai_client(fs).completions.with_raw_response.create(
            model="clinical", prompt=fs.running.demo_prompt, max_tokens=MAX_TOKENS, temperature=0
        )
        assert (raw.headers["x-loraplex-route"], raw.headers["x-loraplex-version"]) == ("canary", version.version)
        assert raw.parse().choices[0].text == peft_mix_text
    finally:
        fs.delete_alias("clinical", "canary")
        fs.set_model_tag("clinical", "loraplex.canary_percent", "0")
        fs.reload_routing()


def test_a_registered_mix_is_compared_as_a_shadow(fault_stack, champions):
    fs = fault_stack
    version = fs.registry().publish_mix(
        "sql", [MixComponent("sql", champions["sql"], 1.0), MixComponent("legal", champions["legal"], 0.5)]
    ).version
    fs.set_alias("sql", "shadow", version)
    try:
        assert wait_until(lambda: fs.reload_routing()["adapters"]["sql"]["shadow"] == version, 10)
        with fs.http() as client:
            for i in range(3):
                response = fs.complete(client, "sql", max_tokens=4, prompt=f"{fs.running.demo_prompt} ({i})")
                assert response.status_code == 200 and response.headers["x-loraplex-version"] == champions["sql"]
        with fs.admin_http() as admin:

            def pairs():
                view = admin.get("/admin/shadow", params={"adapter": "sql"}, headers=fs.admin_headers()).json()
                ours = [p for p in view["pairs"] if p["shadow_version"] == version]
                return ours if len(ours) >= 3 else None

            ours = wait_until(pairs, 60, step_s=0.25)
        assert ours, "the mix version's shadow copies were not compared"
        assert all(p["primary_version"] == champions["sql"] and p["shadow_output"] for p in ours)
    finally:
        fs.delete_alias("sql", "shadow")
        fs.reload_routing()
