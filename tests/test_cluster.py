"""cluster.yaml passes Ray's own cluster-launcher validation (the schema `ray up` applies)."""

from __future__ import annotations

import pytest
import yaml

from .conftest import ROOT


def _check(cfg):
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(cfg))


def test_cluster_yaml_is_valid_for_ray_up():
    cfg = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    _check(cfg)
    gpu_types = [t for t in cfg["available_node_types"].values() if t["resources"].get("GPU")]
    assert gpu_types and cfg["head_node_type"] in cfg["available_node_types"]
    assert any("pip install" in c and "orchestrator" in c for c in cfg["setup_commands"])


def test_validation_catches_a_typo():
    import jsonschema

    cfg = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    cfg["available_node_types"]["gpu_a10g"]["max_workrs"] = 3
    with pytest.raises(jsonschema.ValidationError, match="max_workrs"):
        _check(cfg)
