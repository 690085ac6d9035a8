"""Run config: the shipped configs validate; bad files fail naming the file, the field and the reason."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.cli import main
from orchestrator.core.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = sorted(p for p in (ROOT / "configs").glob("*.yaml") if p.name != "demo.yaml")  # demo: a pipeline file


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "run.yaml"
    p.write_text(text)
    return p


MINIMAL = """
name: t
model: {name_or_path: some/model, task: causal_lm}
data: {format: pdf, train: [a.pdf]}
"""


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_configs_validate(path):
    cfg = load_config(path)
    assert cfg.name == path.stem
    assert Path(cfg.output_dir).is_absolute()
    assert all(Path(p).is_absolute() for p in cfg.data.train)


def test_configs_come_in_gpu_and_tiny_pairs():
    names = {p.stem for p in CONFIGS}
    assert {"constitution-qa", "constitution-qa-tiny", "medical-ner", "medical-ner-tiny"} <= names
    assert load_config(ROOT / "configs/constitution-qa.yaml").scaling.use_gpu
    assert not load_config(ROOT / "configs/constitution-qa-tiny.yaml").scaling.use_gpu


def test_overrides_apply_and_parse_like_yaml(tmp_path):
    cfg = load_config(write(tmp_path, MINIMAL), ["train.lr=1e-4", "lora.r=8", "data.packing=false",
                                                  "lora.target_modules=[q_proj, v_proj]"])
    assert cfg.train.lr == 1e-4 and cfg.lora.r == 8 and cfg.data.packing is False
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]


@pytest.mark.parametrize("extra,override,field,reason", [
    ("", ["train.lr=-1"], "train.lr", "greater than 0"),
    ("", ["lora.r=0"], "lora.r", "greater than or equal to 1"),
    ("", ["train.optimizer=sgd"], "train.optimizer", "paged_adamw_32bit"),
    ("", ["quantization.bits=3"], "quantization.bits", "4"),
    ("", ["train.lerning_rate=1"], "train.lerning_rate", "unknown field"),
    ("", ["model.task=token_classification"], "(top level)", "does not fit model.task"),
    ("", ["train.strategy=deepspeed_zero3"], "(top level)", "quant_storage"),
    ("", ["train.strategy=deepspeed_zero2", "train.precision=fp16"], "(top level)", "bf16 or fp32"),
    ("", ["tune.num_samples=0"], "tune.num_samples", "greater than or equal to 1"),
    ("tune: {search_space: {train.lr: {type: loguniform, low: 0, high: 1}}}\n", [],
     "tune.search_space.train.lr", "low > 0"),
    ("serve: {autoscaling: {min_replicas: 3, max_replicas: 1}}\n", [], "serve.autoscaling", "min_replicas"),
])
def test_errors_name_file_field_and_reason(tmp_path, extra, override, field, reason):
    path = write(tmp_path, MINIMAL + extra)
    with pytest.raises(ConfigError) as err:
        load_config(path, override)
    msg = str(err.value)
    assert msg.startswith(f"{path}: ") and "\n" not in msg
    assert field == "(top level)" or f": {field}: " in msg
    assert reason in msg


def test_missing_required_field(tmp_path):
    with pytest.raises(ConfigError, match=r"data: Field required"):
        load_config(write(tmp_path, "name: t\nmodel: {name_or_path: m}\n"))


def test_bad_yaml_names_line(tmp_path):
    path = write(tmp_path, "name: t\nmodel: [unclosed\n")
    with pytest.raises(ConfigError, match=rf"{path}:\d+:\d+: not valid YAML"):
        load_config(path)


def test_bad_override_syntax(tmp_path):
    with pytest.raises(ConfigError, match="expected FIELD=VALUE"):
        load_config(write(tmp_path, MINIMAL), ["train.lr"])


def test_cli_fails_before_ray_starts(tmp_path, capsys, monkeypatch):
    import orchestrator.data.prepare

    def no_ray(*a, **k):
        raise AssertionError("Ray started before the config was checked")

    monkeypatch.setattr(orchestrator.data.prepare, "init_ray", no_ray)
    path = write(tmp_path, MINIMAL)
    assert main(["prepare", str(path), "--set", "train.epochs=0"]) == 2
    err = capsys.readouterr().err
    assert "train.epochs" in err and str(path) in err


def test_cli_validate_prints_resolved_config(capsys):
    assert main(["validate", str(ROOT / "configs/medical-ner-tiny.yaml"), "--set", "train.lr=0.01"]) == 0
    out = capsys.readouterr().out
    assert "lr: 0.01" in out and "task: token_classification" in out


def test_readme_config_reference_is_generated_from_the_schema():
    from orchestrator.core.reference import config_reference, update_readme

    ref = config_reference()
    assert "#### `train`" in ref and "| `lr` | float | `0.0002` |" in ref and "#### `runs[]`" in ref
    assert update_readme(ROOT / "README.md", write=False), "README reference is stale: orchestrator reference --write"


def test_pipeline_file_errors_name_the_field(tmp_path):
    from orchestrator.pipeline import DEMO, load_pipeline

    pipe, cfgs = load_pipeline(DEMO, ["set.train.max_steps=3", "runs.1.set.train.lr=0.01"])
    assert [c.train.max_steps for c in cfgs] == [3, 3] and cfgs[1].train.lr == 0.01
    assert pipe.stages == ["train", "tune", "eval", "merge", "serve", "ask"]
    with pytest.raises(ConfigError, match=r"runs\[1\] \(medical-ner-tiny.yaml\): .*medical-ner-tiny.yaml: train.lr: Input should be greater than 0$"):
        load_pipeline(DEMO, ["runs.1.set.train.lr=-1"])
    with pytest.raises(ConfigError, match="stages.*ask needs stage serve"):
        load_pipeline(DEMO, ["stages=[train,ask]"])
    with pytest.raises(ConfigError, match="not an index of runs"):
        load_pipeline(DEMO, ["runs.5.tune=true"])
