import pytest

from shard.settings import SettingsError, ShardSettings


def test_defaults_file_then_env(tmp_path):
    config = tmp_path / "all.yaml"
    config.write_text("shard:\n  model_dir: /models/base\n  port: 6000\n  adapter_dirs: {legal: /a/legal}\n")
    settings = ShardSettings.load(config, environ={
        "LORAPLEX_SHARD_PORT": "7000", "LORAPLEX_SHARD_QUANTIZATION": "int8",
        "LORAPLEX_SHARD_ADAPTER_DIRS": '{"sql": "/a/sql"}',
    })
    assert settings.host == "127.0.0.1" and settings.port == 7000 and settings.quantization == "int8"
    assert settings.model_dir == "/models/base" and settings.adapter_dirs == {"sql": "/a/sql"}
    assert settings.address == "127.0.0.1:7000"


def test_toml_file(tmp_path):
    config = tmp_path / "shard.toml"
    config.write_text('model_dir = "/m"\nmax_batch_size = 16\n')
    assert ShardSettings.load(config, environ={}).max_batch_size == 16


@pytest.mark.parametrize("values, message", [
    ({}, "model_dir"),
    ({"model_dir": "/m", "quantization": "fp8"}, "quantization"),
    ({"model_dir": "/m", "max_batch_size": 0}, "max_batch_size"),
    ({"model_dir": "/m", "port": "abc"}, "port"),
    ({"model_dir": "/m", "colour": "blue"}, "unknown"),
    ({"model_dir": "/m", "registry_tracking_uri": "http://x"}, "adapter_cache_dir"),
    ({"model_dir": "/m", "device": "tpu"}, "device"),
    ({"model_dir": "/m", "admission_window_ms": -1}, "admission_window_ms"),
])
def test_bad_settings_are_refused_clearly(values, message):
    with pytest.raises(SettingsError, match=message):
        ShardSettings.from_mapping(values)


def test_missing_config_file(tmp_path):
    with pytest.raises(SettingsError, match="not found"):
        ShardSettings.load(tmp_path / "nope.yaml", environ={})


def test_drain_is_sized_from_the_longest_answer_and_a_shorter_one_is_refused():
    derived = ShardSettings.from_mapping({"model_dir": "/m", "max_context": 4096, "drain_step_s": 0.03})
    assert derived.drain_timeout() == pytest.approx(4096 * 0.03)
    assert ShardSettings.from_mapping({"model_dir": "/m", "max_context": 512, "drain_timeout_s": 60}).drain_timeout() == 60
    with pytest.raises(SettingsError, match=r"shorter than the longest answer.*4096 x 0.05 = 204.8 s"):
        ShardSettings.from_mapping({"model_dir": "/m", "max_context": 4096, "drain_timeout_s": 30})
    with pytest.raises(SettingsError, match="drain_step_s"):
        ShardSettings.from_mapping({"model_dir": "/m", "drain_step_s": 0})
