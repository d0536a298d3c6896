import pytest
import torch

from bench.bytes_bound import linear_weight_bytes, lora_ratio_ceiling, streaming_read_bytes_per_s


def test_ceiling_is_the_base_step_over_the_base_step_plus_the_factor_reads():
    # 100 MB of factors at 10 GB/s is 10 ms on top of a 30 ms base step: 30 / 40.
    bound = lora_ratio_ceiling(0.030, 100_000_000, 10e9, base_weight_bytes=200_000_000)
    assert bound["factor_read_ms"] == pytest.approx(10.0)
    assert bound["base_weight_read_ms"] == pytest.approx(20.0)
    assert bound["ratio_ceiling"] == pytest.approx(0.75)


def test_linear_weight_bytes_counts_every_linear_at_its_own_element_size():
    model = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2, bias=False).to(torch.bfloat16))
    assert linear_weight_bytes(model) == 8 * 4 * 4 + 4 * 2 * 2


def test_streaming_read_rate_is_positive_and_finite():
    rate = streaming_read_bytes_per_s(1 << 20, repeats=2)
    assert 0 < rate < float("inf")
