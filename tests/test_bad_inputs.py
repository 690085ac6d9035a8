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
    if verb in ("eval", "merge"):
        argv += ["--adapter", str(random_adapter)]
    err = _cli(capsys, *argv)
    assert "nonexistent: no model here" in err and "model.build_tiny" in err


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
