"""Bad inputs end in one line naming the file, line or field, before any work starts: data files that are not
text (a PDF read as JSON lines, binary or mislabelled gzip CoNLL), binary configs, missing base models."""

from __future__ import annotations

import gzip

import pytest

from orchestrator.cli import main
from orchestrator.ner import read_conll, read_ner_json
from orchestrator.qa import read_qa_jsonl

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
    import orchestrator.runtime

    def no_ray(*a, **k):
        raise AssertionError("Ray started before the model path was checked")

    monkeypatch.setattr(orchestrator.runtime, "init_ray", no_ray)
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
    from orchestrator.config import load_config
    from orchestrator.model import follow_adapter_base

    cfg = load_config(ROOT / "configs/constitution-qa-tiny.yaml", [f"model.name_or_path={tmp_path / 'other'}"])
    followed = follow_adapter_base(cfg, random_adapter)  # records tiny_model_dir
    assert followed.model.name_or_path == str(tiny_model_dir) and not followed.model.build_tiny
    assert f"trained on {tiny_model_dir}; using that base" in capsys.readouterr().out
    gone = _adapter_on(random_adapter, tmp_path / "a", str(tmp_path / "gone"))
    assert follow_adapter_base(cfg, gone) is cfg  # build_tiny: the config's base can be built
    assert "which is not here; using the config's base" in capsys.readouterr().out


def test_embedded_model_is_built_on_first_use(tmp_path, monkeypatch):
    """`build_tiny: true` builds the embedded Llama the first time any stage needs it, then reuses it."""
    from orchestrator.config import load_config
    from orchestrator.model import ensure_model

    cfg = load_config(ROOT / "configs/constitution-qa-tiny.yaml",
                      [f"model.name_or_path={tmp_path / 'tiny'}", "model.tiny_pretrain_steps=0"])
    path = ensure_model(cfg)
    assert (tmp_path / "tiny/config.json").is_file() and path == str(tmp_path / "tiny")
    stamp = (tmp_path / "tiny/config.json").stat().st_mtime_ns
    ensure_model(cfg)
    assert (tmp_path / "tiny/config.json").stat().st_mtime_ns == stamp
