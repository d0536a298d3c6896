"""Bounded labels of the gateway's metrics: adapters past the cap share `_other`; tenants and
shadow comparisons have counters of their own."""

from gateway.metrics import OTHER_ADAPTERS, AdapterLabels, GatewayMetrics


def test_adapter_labels_name_the_first_adapters_then_share_other():
    labels = AdapterLabels(limit=2)
    assert [labels(a) for a in ("legal", "clinical", "legal", "sql", "a@1", "clinical", "")] == [
        "legal", "clinical", "legal", OTHER_ADAPTERS, OTHER_ADAPTERS, "clinical", ""
    ]


def test_ten_thousand_adapters_export_a_bounded_number_of_series():
    metrics = GatewayMetrics(max_adapter_labels=50)
    for i in range(10_000):
        adapter = metrics.adapter_label(f"adapter-{i}")
        metrics.requests.labels("/v1/completions", "200", "champion", adapter).inc()
        metrics.tokens.labels("completion", adapter).inc(3)
    text = metrics.exposition().decode()
    series = [line for line in text.splitlines() if line.startswith("loraplex_gateway_requests_total{")]
    assert len(series) == 51
    assert f'adapter="{OTHER_ADAPTERS}"' in text and 'adapter="adapter-49"' in text and 'adapter="adapter-50"' not in text
