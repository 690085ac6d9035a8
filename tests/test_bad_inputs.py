"""Bad inputs end in one line naming the file, line or field, before any work starts (before Ray where nothing
needs it), with nothing written: run configs and `--set` values (empty paths, inf and nan, values that are not
YAML, search spaces whose values do not fit their fields), config files (duplicate keys too), command-line counts,
data files (PDFs empty, corrupt, encrypted or without text; QA and NER files with bad lines; missing files and
directories; text readers fed PDFs, binary or mislabelled gzip), binary configs, missing base models per verb,
adapter directories and damaged adapter weights, resume and study folders, a model build aimed at a folder that
holds other things, workers the local Ray instance cannot hold. The HTTP cases are in test_serve.py."""

from __future__ import annotations

import gzip

import pytest

from orchestrator.cli import main
from orchestrator.data.ner import read_conll, read_ner_json
from orchestrator.data.qa import read_qa_jsonl

from .conftest import PDF, ROOT

BINARY = bytes(range(128, 256)) * 4


def _write(path, data: bytes):
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("reader,make,match", [
    (read_qa_jsonl, lambda d: PDF, r"\.pdf: a PDF, not a text file \(data.format pdf reads PDFs\)"),
    (read_qa_jsonl, lambda d: _write(d / "qa.jsonl", b'{"question": "q", "answer": "a"}\n' + BINARY),
     r"qa\.jsonl:2: not UTF-8 text \(binary data\?\)"),
    (read_conll, lambda d: _write(d / "train.conll", BINARY), r"train\.conll:1: not UTF-8 text \(binary data\?\)"),
    (read_conll, lambda d: _write(d / "train.conll", gzip.compress(b"Aspirin\tB-Chemical\n")),
     r"train\.conll:1: not UTF-8 text \(it is gzip-compressed: name it \*\.gz\)"),
    (read_conll, lambda d: _write(d / "train.conll.gz", b"Aspirin\tB-Chemical\n"),
     r"train\.conll\.gz: not a readable gzip file"),
    (read_ner_json, lambda d: _write(d / "ner.json", b"[" + BINARY), r"ner\.json:1: not UTF-8 text"),
    (read_qa_jsonl, lambda d: _write(d / "qa.jsonl", b'{"question": "q", "answer": "a"}\n' + b"x" * (17 * 2**20)),
     r"qa\.jsonl:2: a line longer than 16 MiB \(one record per line expected\)"),
])
def test_data_files_that_are_not_text(tmp_path, reader, make, match):
    with pytest.raises(ValueError, match=match) as e:
        reader(make(tmp_path))
    assert "\n" not in str(e.value)


def _cli(capsys, *argv) -> str:
    """Run the CLI in-process; it must exit 2 with exactly one line on stderr."""
    assert main(list(argv)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


def test_binary_config_names_the_file_and_line(tmp_path, capsys):
    cfg = _write(tmp_path / "run.yaml", b"name: x\nmodel:\n  name_or_path: " + BINARY)
    assert "run.yaml:3: not UTF-8 text" in _cli(capsys, "validate", str(cfg))


@pytest.mark.parametrize("verb", ["train", "eval", "tune", "merge"])
def test_missing_base_model_is_one_line_before_ray_starts(tmp_path, capsys, monkeypatch, random_adapter, verb):
    import orchestrator.core.runtime

    def no_ray(*a, **k):
        raise AssertionError("Ray started before the model path was checked")

    monkeypatch.setattr(orchestrator.core.runtime, "init_ray", no_ray)
    sets = ["--set", f"model.name_or_path={tmp_path / 'nonexistent'}", "--set", "model.build_tiny=false",
            "--set", f"output_dir={tmp_path}"]
    argv = [verb, str(ROOT / "configs/constitution-qa-tiny.yaml"), *sets]
    if verb in ("eval", "merge"):  # an adapter whose recorded base is gone too
        adapter = _adapter_on(random_adapter, tmp_path / "adapter", str(tmp_path / "gone"))
        err = _cli(capsys, *argv, "--adapter", str(adapter))
        assert f"not at {tmp_path / 'gone'} (adapter_config.json base_model_name_or_path)" in err
        assert f"nor at {tmp_path / 'nonexistent'} (model.name_or_path)" in err
    else:
        err = _cli(capsys, *argv)
        assert "nonexistent: no model here" in err and "model.build_tiny" in err


def _adapter_on(src, dst, base: str):
    """A copy of adapter ``src`` that records ``base`` as its base model."""
    import json
    import shutil

    shutil.copytree(src, dst)
    conf = json.loads((dst / "adapter_config.json").read_text())
    (dst / "adapter_config.json").write_text(json.dumps({**conf, "base_model_name_or_path": base}))
    return dst


def test_eval_and_merge_follow_the_adapters_base(tmp_path, capsys, random_adapter, tiny_model_dir):
    """The config names one base, the adapter was trained on another that is here: the adapter's is used,
    in one line; with the adapter's base gone, the config's is used, also said."""
    from orchestrator.artifacts.adapters import follow_adapter_base
    from orchestrator.core.config import load_config

    cfg = load_config(ROOT / "configs/constitution-qa-tiny.yaml", [f"model.name_or_path={tmp_path / 'other'}"])
    followed = follow_adapter_base(cfg, random_adapter)  # records tiny_model_dir
    assert followed.model.name_or_path == str(tiny_model_dir) and not followed.model.build_tiny
    assert f"trained on {tiny_model_dir}; using that base" in capsys.readouterr().out
    gone = _adapter_on(random_adapter, tmp_path / "a", str(tmp_path / "gone"))
    assert follow_adapter_base(cfg, gone) is cfg  # build_tiny: the config's base can be built
    assert "which is not here; using the config's base" in capsys.readouterr().out


def test_embedded_model_is_built_on_first_use(tmp_path, monkeypatch):
    """`build_tiny: true` builds the embedded Llama the first time any stage needs it, then reuses it."""
    from orchestrator.core.config import load_config
    from orchestrator.data.base import ensure_model

    cfg = load_config(ROOT / "configs/constitution-qa-tiny.yaml",
                      [f"model.name_or_path={tmp_path / 'tiny'}", "model.tiny_pretrain_steps=0"])
    path = ensure_model(cfg)
    assert (tmp_path / "tiny/config.json").is_file() and path == str(tmp_path / "tiny")
    stamp = (tmp_path / "tiny/config.json").stat().st_mtime_ns
    ensure_model(cfg)
    assert (tmp_path / "tiny/config.json").stat().st_mtime_ns == stamp


def _pdf(path, kind: str):
    from pypdf import PdfWriter

    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "corrupt":
        path.write_bytes(b"%PDF-1.4\n" + bytes(range(256)) * 8)
    else:
        w = PdfWriter()
        w.add_blank_page(200, 200)
        if kind == "encrypted":
            w.encrypt("secret")
        w.write(path)
    return path


# (argv after the command and config, what the one line must say); {d} is the test's directory
CONFIG_CASES = [
    (["--set", "train.lr=fast"], "run.yaml: train.lr: Input should be a valid number"),
    (["--set", "train.lr=-1"], "run.yaml: train.lr: Input should be greater than 0"),
    (["--set", "train.lr"], "--set 'train.lr': expected FIELD=VALUE"),
    (["--set", "=1"], "--set '=1': expected FIELD=VALUE"),
    (["--set", "train.nope=1"], "run.yaml: train.nope: unknown field"),
    (["--set", "train.max_steps=abc"], "run.yaml: train.max_steps: Input should be a valid integer"),
    (["--set", "data.format=csv"], "run.yaml: data.format: Input should be 'pdf', 'conll', 'ner_json' or 'qa_jsonl'"),
    (["--set", "model.task=summarize"], "run.yaml: model.task: Input should be"),
    (["--set", "lora.r=0"], "run.yaml: lora.r: Input should be greater than or equal to 1"),
    (["--set", "quantization.bits=3"], "run.yaml: quantization.bits: Input should be 4, 8 or 16"),
    (["--set", "serve.port=70000"], "run.yaml: serve.port: Input should be less than or equal to 65535"),
    (["--set", "data.max_seq_length=4"], "run.yaml: data.max_seq_length: Input should be greater than or equal to 8"),
    (["--set", "train.strategy=deepspeed_zero3"], "needs quantization.quant_storage equal to"),
    (["--set", "scaling.num_workers=0"], "run.yaml: scaling.num_workers: Input should be greater than or equal to 1"),
    (["--set", "train.micro_batch_size=[1,2]"], "run.yaml: train.micro_batch_size: Input should be a valid integer"),
    (["--set", "train.lr=1e-4", "--set", "lora.r=0", "--set", "lora.alpha=-1"], "lora.r: Input should be greater"),
    (["--set", "train.backend=unsloth"], "train.backend=unsloth runs on CUDA GPUs only (scaling.use_gpu is false)"),
    (["--set", "train.backend=liger"], "train.backend=liger runs on CUDA GPUs only"),
    (["--set", "train.backend=unsloth", "--set", "scaling.use_gpu=true", "--set", "train.strategy=deepspeed_zero2"],
     "train.backend=unsloth runs under DDP only, not train.strategy=deepspeed_zero2"),
    (["--set", "train.backend=fast"], "train.backend: Input should be 'auto', 'hf', 'liger' or 'unsloth'"),
    (["--set", "train.cuda_graph=true"], "train.cuda_graph needs GPU workers (scaling.use_gpu), packed rows"),
    (["--set", "train.cuda_graph=true", "--set", "train.backend=hf"],
     "train.cuda_graph replays Unsloth's model: it needs train.backend unsloth or auto, not hf"),
    (["--set", "train.cuda_graph=true", "--set", "scaling.use_gpu=true", "--set", "lora.dropout=0.1"],
     "train.cuda_graph needs lora.dropout 0"),
    # second round: empty paths and names, numbers that are not finite, values that are not YAML, search spaces
    (["--set", "model.name_or_path="], "run.yaml: model.name_or_path: String should have at least 1 character"),
    (["--set", "output_dir="], "run.yaml: output_dir: String should have at least 1 character"),
    (["--set", 'data.train=[""]'], "run.yaml: data.train.0: String should have at least 1 character"),
    (["--set", "data.train=[]"], "run.yaml: data.train: List should have at least 1 item"),
    (["--set", "data.qa.cache_dir="], "run.yaml: data.qa.cache_dir: String should have at least 1 character"),
    (["--set", "serve.adapters={a: ''}"], "run.yaml: serve.adapters.a: String should have at least 1 character"),
    (["--set", "name="], "run.yaml: name: String should match pattern"),
    (["--set", "train.epochs=inf"], "run.yaml: train.epochs: Input should be a finite number"),
    (["--set", "train.lr=nan"], "run.yaml: train.lr: Input should be a finite number"),
    (["--set", "scaling.cpus_per_worker=.inf"], "run.yaml: scaling.cpus_per_worker: Input should be a finite number"),
    (["--set", "data.split_fractions=[0.8, 0.1, .nan]"], "run.yaml: data.split_fractions.2: Input should be a finite"),
    (["--set", "serve.stream_interval_ms=-1"], "run.yaml: serve.stream_interval_ms: Input should be greater than or"),
    (["--set", "serve.gpu_memory_utilization=1.5"], "serve.gpu_memory_utilization: Input should be less than or equal"),
    (["--set", "serve.prefill_chunk=0"], "run.yaml: serve.prefill_chunk: Input should be greater than or equal to 1"),
    (["--set", "data.train=[unclosed"], "--set 'data.train=[unclosed': not a valid YAML value"),
    (["--set", "train={lr: 1, lr: 2}"], "--set 'train={lr: 1, lr: 2}': not a valid YAML value (key 'lr' appears twice"),
    (["--set", "tune.search_space={lora.r: {type: choice, values: [four]}}"],
     "tune.search_space.lora.r: 'four' does not fit lora.r (Input should be a valid integer"),
    (["--set", "tune.search_space={train.micro_batch_size: {type: uniform, low: 1, high: 8}}"],
     "tune.search_space.train.micro_batch_size: uniform draws fractions"),
    (["--set", "tune.search_space={lora.dropout: {type: uniform, low: 0.0, high: 2.0}}"],
     "tune.search_space.lora.dropout: 2.0 does not fit lora.dropout (Input should be less than 1)"),
    (["--set", "tune.search_space={train.lr: {type: grid, values: [0.1, .nan]}}"],
     "tune.search_space.train.lr: nan does not fit train.lr"),
    (["--set", "tune.search_space={lora.r: {type: randint, low: 0, high: 8}}"],
     "tune.search_space.lora.r: 0.0 does not fit lora.r (Input should be greater than or equal to 1)"),
    (["--set", "tune.search_space={train.nope: {type: choice, values: [1]}}"], "tune.search_space.train.nope: no such"),
]


@pytest.mark.parametrize("argv,message", CONFIG_CASES)
def test_bad_config_values_are_one_line(tmp_path, capsys, argv, message):
    cfg = tmp_path / "run.yaml"
    cfg.write_text((ROOT / "configs" / "constitution-qa-tiny.yaml").read_text())
    assert message in _cli(capsys, "validate", str(cfg), *argv)


@pytest.mark.parametrize("text,message", [
    (None, "missing.yaml: no such config file"),
    ("DIR", "run.yaml: a directory, not a config file"),
    ("- a\n- b\n", "run.yaml: a run config must be a YAML mapping at the top level"),
    ("", "run.yaml: a run config must be a YAML mapping at the top level"),
    ("name: x\nmodel: [unclosed\n", "run.yaml:3:1: not valid YAML"),
    ("name: x\nbogus_field: 1\n", "bogus_field: unknown field"),
    ("name: a\nname: b\n", "run.yaml:2:1: not valid YAML (key 'name' appears twice (first at line 1))"),
    ("name: x\ntrain:\n  lr: 0.1\n  epochs: 1\n  lr: 0.2\n",
     "run.yaml:5:3: not valid YAML (key 'lr' appears twice (first at line 3))"),
])
def test_bad_config_files_are_one_line(tmp_path, capsys, text, message):
    path = tmp_path / ("missing.yaml" if text is None else "run.yaml")
    if text == "DIR":
        path.mkdir()
    elif text is not None:
        path.write_text(text)
    assert message in _cli(capsys, "validate", str(path))


@pytest.mark.parametrize("setting,make,message", [
    ("data.train", lambda d: d / "nofile.pdf", "data.train: {d}/nofile.pdf: no such file"),
    ("data.train", lambda d: d, "data.train: {d}: a directory, not a data file"),
    ("data.train", lambda d: _pdf(d / "e.pdf", "empty"), "{d}/e.pdf: an empty file, not a PDF"),
    ("data.train", lambda d: _pdf(d / "c.pdf", "corrupt"), "{d}/c.pdf: not a readable PDF"),
    ("data.train", lambda d: _pdf(d / "x.pdf", "encrypted"), "{d}/x.pdf: an encrypted PDF; decrypt it first"),
    ("data.train", lambda d: _pdf(d / "b.pdf", "blank"), "{d}/b.pdf: no extractable text in 1 page(s)"),
    ("data.test", lambda d: d / "none.pdf", "data.test: {d}/none.pdf: no such file"),
])
def test_bad_data_files_stop_train_before_ray(tmp_path, capsys, monkeypatch, setting, make, message):
    import orchestrator.core.runtime

    def no_ray(*a, **k):
        raise AssertionError("Ray started before the data files were checked")

    monkeypatch.setattr(orchestrator.core.runtime, "init_ray", no_ray)
    data = tmp_path / "data"
    data.mkdir()
    target = make(data)
    out, model = tmp_path / "runs", tmp_path / "model"
    err = _cli(capsys, "train", str(ROOT / "configs" / "constitution-qa-tiny.yaml"), "--set", f"{setting}=[{target}]",
               "--set", f"output_dir={out}", "--set", f"model.name_or_path={model}")
    assert message.format(d=data) in err
    assert not out.exists() and not model.exists()  # nothing half-written


@pytest.mark.parametrize("verb,make,message", [
    ("eval", lambda d: d / "nothing", "no adapter_config.json"),
    ("merge", lambda d: d, "no adapter_config.json"),
])
def test_bad_adapter_directories_are_one_line(tmp_path, capsys, verb, make, message):
    assert message in _cli(capsys, verb, str(ROOT / "configs" / "constitution-qa-tiny.yaml"), "--adapter",
                           str(make(tmp_path)), "--set", f"output_dir={tmp_path / 'runs'}")



@pytest.mark.parametrize("argv,message", [
    (["eval", "{cfg}", "--adapter", "x", "--limit", "0"], "eval: argument --limit: '0' is not a whole number >= 1"),
    (["eval", "{cfg}", "--adapter", "x", "--limit", "two"], "eval: argument --limit: 'two' is not a whole number"),
    (["merge", "{cfg}", "--adapter", "x", "--examples", "-3"], "argument --examples: '-3' is not a whole number >= 1"),
    (["export", "{cfg}", "--adapter", "x", "--check", "-1"], "argument --check: '-1' is not a whole number >= 0"),
    (["export", "{cfg}", "--adapter", "x", "--quant", "q3"], "argument --quant: invalid choice: 'q3'"),
    (["serve", "{cfg}", "--top", "-1"], "argument --top: '-1' is not a whole number >= 0"),
    (["train"], "train: the following arguments are required: config"),
    (["bogus"], "argument command: invalid choice: 'bogus'"),
])
def test_command_line_mistakes_are_one_line(tmp_path, capsys, argv, message):
    argv = [a.format(cfg=ROOT / "configs/constitution-qa-tiny.yaml") for a in argv]
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.startswith("error: ") and "\n" not in err and message in err, err


def _qa(d, text: str):
    return _write(d / "qa.jsonl", text.encode())


def _conll(d, text: str):
    return _write(d / "train.conll", text.encode())


@pytest.mark.parametrize("config,make,message", [
    ("constitution-qa-tiny", lambda d: _qa(d, '{"question": "q"}\n'), "qa.jsonl:1: field 'answer' must be a non-empty"),
    ("constitution-qa-tiny", lambda d: _qa(d, ""), "qa.jsonl: no QA pairs found"),
    ("constitution-qa-tiny", lambda d: _qa(d, '{"question": "q", "answer": "a"}\nnot json\n'),
     "qa.jsonl:2: not valid JSON"),
    ("constitution-qa-tiny", lambda d: _qa(d, '[1, 2]\n'), "qa.jsonl:1: field 'question' must be a non-empty"),
    ("medical-ner-tiny", lambda d: _conll(d, "Aspirin\tB-Chemical\tx\n"), "train.conll:1:"),
    ("medical-ner-tiny", lambda d: _conll(d, "Aspirin\n"), "train.conll:1:"),
    ("medical-ner-tiny", lambda d: _conll(d, "Aspirin\tB-Chemical\n\nfever\tQ-Disease\n"), "train.conll:3:"),
    ("medical-ner-tiny", lambda d: _conll(d, "\n\n"), "train.conll:2: empty sentence"),
])
def test_bad_data_lines_stop_before_ray(tmp_path, capsys, monkeypatch, config, make, message):
    """QA lines without an answer, an empty QA file, CoNLL lines with three columns or no tag: one line naming the
    file and line, before Ray starts, nothing written."""
    import orchestrator.core.runtime

    monkeypatch.setattr(orchestrator.core.runtime, "init_ray", _no_ray)
    data = tmp_path / "data"
    data.mkdir()
    target = make(data)
    fmt = "qa_jsonl" if config.startswith("constitution") else "conll"
    out = tmp_path / "runs"
    sets = ["--set", f"data.format={fmt}", "--set", f"data.train=[{target}]", "--set", "data.validation=[]",
            "--set", "data.test=[]", "--set", f"output_dir={out}"]
    if fmt == "qa_jsonl":
        sets += ["--set", "model.build_tiny=false", "--set", f"model.name_or_path={ROOT / 'models/constitution-tiny-llama'}"]
    err = _cli(capsys, "train", str(ROOT / "configs" / f"{config}.yaml"), *sets)
    assert message in err, err
    assert not out.exists()


def _no_ray(*a, **k):
    raise AssertionError("Ray started before the inputs were checked")


def test_resume_and_study_folders_are_checked_before_ray(tmp_path, capsys, monkeypatch):
    """`train --resume` of a folder that holds no run (which is not created), `tune` with an empty search space or
    `--resume` of no study: one line each before Ray starts, nothing written."""
    import orchestrator.core.runtime

    monkeypatch.setattr(orchestrator.core.runtime, "init_ray", _no_ray)
    cfg = str(ROOT / "configs/constitution-qa-tiny.yaml")
    missing = tmp_path / "runs" / "never"
    assert f"--resume: {missing} holds no run to resume" in _cli(capsys, "train", cfg, "--resume", str(missing))
    assert "tune.search_space is empty" in _cli(capsys, "tune", cfg, "--set", "tune.search_space={}",
                                                "--set", f"output_dir={tmp_path / 'runs'}")
    assert "holds no study to resume" in _cli(capsys, "tune", cfg, "--resume", "--set", f"output_dir={tmp_path / 'runs'}")
    assert not (tmp_path / "runs").exists()


def test_a_model_is_never_built_into_a_folder_holding_other_things(tmp_path, capsys, monkeypatch):
    """`model.name_or_path=` (the working directory) or any folder with other files: refused in one line, before
    any pre-training; an empty folder or a new path is fine."""
    import orchestrator.core.runtime

    monkeypatch.setattr(orchestrator.core.runtime, "init_ray", _no_ray)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    cfg = str(ROOT / "configs/constitution-qa-tiny.yaml")
    err = _cli(capsys, "train", cfg, "--set", f"model.name_or_path={busy}", "--set", f"output_dir={tmp_path / 'r'}")
    assert f"model.name_or_path: {busy} holds files and no model" in err
    assert sorted(p.name for p in busy.iterdir()) == ["notes.txt"]
    assert "model.name_or_path: String should have at least 1 character" in _cli(
        capsys, "init-model", cfg, "--set", "model.name_or_path=")
    err = _cli(capsys, "init-model", cfg, "--set", f"model.name_or_path={ROOT}", "--force")
    assert "holds files and no model" in err


def test_damaged_adapter_weights_are_one_line(tmp_path, capsys, random_adapter):
    """An adapter whose weights file was cut short, or is not safetensors at all: merge, eval and export name the
    file in one line."""
    import shutil

    cut = tmp_path / "cut"
    shutil.copytree(random_adapter, cut)
    weights = cut / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    cfg = str(ROOT / "configs/constitution-qa-tiny.yaml")
    for verb in ("merge", "eval", "export"):
        err = _cli(capsys, verb, cfg, "--adapter", str(cut), "--set", f"output_dir={tmp_path / 'r'}")
        assert f"{weights}: cut short" in err, err
    weights.write_bytes(b"not a safetensors file at all")
    assert f"{weights}: not a readable safetensors file" in _cli(capsys, "merge", cfg, "--adapter", str(cut))


def test_workers_a_local_ray_cannot_hold_are_one_line(tmp_path, capsys, ray_local):
    """16 workers of one CPU on a 2-CPU local instance (no autoscaler): one line saying both figures, instead of
    waiting forever."""
    from orchestrator.core.config import ConfigError, load_config
    from orchestrator.training.train import check_cluster_fits

    cfg = load_config(ROOT / "configs/constitution-qa-tiny.yaml", ["scaling.num_workers=16"])
    with pytest.raises(ConfigError, match=r"16 workers x 1 CPUs = 16 CPUs; this local Ray instance has 2 and no "
                                          r"autoscaler"):
        check_cluster_fits(cfg)
    check_cluster_fits(load_config(ROOT / "configs/constitution-qa-tiny.yaml", ["scaling.num_workers=2"]))
