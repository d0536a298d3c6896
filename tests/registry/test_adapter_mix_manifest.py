"""The mix manifest (`loraplex.adapter_mix`): what a mix may be, written and read back, and every
refusal with its reason."""

import json
import math

import pytest

from loraplex.adapter_mix import (
    MANIFEST_FILE,
    MixComponent,
    MixError,
    check_components,
    describe,
    is_mix_folder,
    parse_component_argument,
    read_manifest,
    write_manifest,
)

LEGAL, CLINICAL = MixComponent("legal", "2", 0.7), MixComponent("clinical", "3", -0.3)


def test_a_manifest_round_trips(tmp_path):
    write_manifest(tmp_path / "mix", [LEGAL, CLINICAL], "f" * 64, max_components=4)
    assert is_mix_folder(tmp_path / "mix") and not is_mix_folder(tmp_path)
    manifest = read_manifest(tmp_path / "mix", max_components=4)
    assert manifest.components == (LEGAL, CLINICAL) and manifest.base_fingerprint == "f" * 64
    assert describe(manifest.components) == "legal@2=0.7 clinical@3=-0.3"


@pytest.mark.parametrize(
    "components, reason",
    [
        ([], "at least one"),
        ([MixComponent(f"a{i}", "1", 1.0) for i in range(5)], "at most 4"),
        ([MixComponent("legal", "1", math.nan)], "finite"),
        ([MixComponent("legal", "1", math.inf)], "finite"),
        ([MixComponent("legal", "1", True)], "finite"),
        ([MixComponent("legal", "1", 0.0)], "weight 0"),
        ([LEGAL, MixComponent("legal", "2", 0.1)], "twice"),
        ([MixComponent("", "1", 1.0)], "name"),
    ],
)
def test_bad_mixes_are_refused_with_the_reason(components, reason):
    with pytest.raises(MixError, match=reason):
        check_components(components, max_components=4)


def test_the_component_limit_is_a_setting():
    many = [MixComponent(f"a{i}", "1", 1.0) for i in range(6)]
    assert check_components(many, max_components=6) == tuple(many)
    with pytest.raises(MixError, match="at most 2"):
        check_components(many[:3], max_components=2)


def test_command_line_components():
    assert parse_component_argument("legal=0.7", "champion") == MixComponent("legal", "champion", 0.7)
    assert parse_component_argument("clinical@3=-0.3", "champion") == MixComponent("clinical", "3", -0.3)
    for bad in ("legal", "legal=", "legal=heavy", "=0.5", "a@=1"):
        with pytest.raises(MixError):
            parse_component_argument(bad, "champion")


@pytest.mark.parametrize(
    "edit, reason",
    [
        (lambda m: m.update(format="other"), "not a loraplex.mix/1"),
        (lambda m: m["components"][0].update(version="champion"), "pinned version number"),
        (lambda m: m["components"][0].update(weight="0.7"), "finite"),
        (lambda m: m.update(components={"legal": 1}), "list of objects"),
        (lambda m: m.pop("base_fingerprint"), "base_fingerprint"),
    ],
)
def test_a_tampered_manifest_is_refused_at_load(tmp_path, edit, reason):
    path = write_manifest(tmp_path, [LEGAL, CLINICAL], "f" * 64, max_components=4)
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))
    with pytest.raises(MixError, match=reason):
        read_manifest(tmp_path, max_components=4)


def test_a_mix_folder_holds_only_its_manifest(tmp_path):
    write_manifest(tmp_path, [LEGAL], "f" * 64, max_components=4)
    (tmp_path / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(MixError, match="only " + MANIFEST_FILE):
        read_manifest(tmp_path, max_components=4)
    (tmp_path / "adapter_model.safetensors").unlink()
    (tmp_path / MANIFEST_FILE).write_text("{not json")
    with pytest.raises(MixError, match="not JSON"):
        read_manifest(tmp_path, max_components=4)
