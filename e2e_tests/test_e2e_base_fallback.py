"""Issue 11's fallback policy over real processes: the tag `loraplex.fallback=base`, set with MLflow's
own client, makes the base model answer (`x-loraplex-route: fallback`) for an adapter whose only
version the shards refuse; until the tag is set, the refusal reaches the client."""

from __future__ import annotations

import yaml
from mlflow.tracking import MlflowClient
from tests.support.waiting import wait_until


ADAPTER = "fallback-e2e"  # its own registered model: no version of it ever served, so no last good one


def _grant_to_acme(tenants_file, adapter: str) -> None:
    document = yaml.safe_load(tenants_file.read_text())
    acme = next(t for t in document["tenants"] if t["name"] == "acme")
    acme["adapters"] = [*acme["adapters"], adapter]
    tmp = tenants_file.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(document, sort_keys=False))
    tmp.replace(tenants_file)  # the gateway re-reads its tenants file every second


def test_fallback_tag_set_in_mlflow_answers_with_the_base_model(fault_stack):
    fs = fault_stack
    bad = fs.publish_corrupt_variant("legal", "fallback-e2e", name=ADAPTER)
    fs.set_alias(ADAPTER, "champion", bad)
    _grant_to_acme(fs.running.tenants_file, ADAPTER)
    with fs.http() as client:
        assert wait_until(lambda: fs.complete(client, ADAPTER).status_code == 503, 10.0), "the refusal should reach the client"
        refused = fs.complete(client, ADAPTER)
        assert refused.json()["error"]["code"] == "adapter_unavailable"

        MlflowClient(fs.mlflow_url).set_registered_model_tag(ADAPTER, "loraplex.fallback", "base")
        assert wait_until(lambda: fs.complete(client, ADAPTER).status_code == 200, 10.0)
        response = fs.complete(client, ADAPTER)
        assert response.headers["x-loraplex-route"] == "fallback"
        assert response.headers["x-loraplex-adapter"] == "base"
        base = fs.complete(client, "base")
        assert response.json()["choices"][0]["text"] == base.json()["choices"][0]["text"]  # greedy: the same answer
        with fs.admin_http() as admin:
            metrics = admin.get("/metrics").text
        assert f'loraplex_gateway_base_fallbacks_total{{adapter="{ADAPTER}",reason="refused"}}' in metrics
