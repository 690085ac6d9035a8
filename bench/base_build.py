"""Build the embedded constitution base (`orchestrator init-model`) with a given number of pre-training steps
and score its greedy answers before any fine-tune: training-split questions and held-out (validation) ones.

    python bench/base_build.py --steps 4000 --out /tmp/base-4000 [--limit 64]

Runs on a GPU when there is one (the pre-training does), else on the CPU. Writes RESULT.json beside the model.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/constitution-qa-tiny.yaml")
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--limit", type=int, default=64)
    args = p.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from orchestrator.core.config import load_config
    from orchestrator.data.base import document_articles, ensure_base_model
    from orchestrator.data.pipelines import qa_pairs
    from orchestrator.data.splits import split_for
    from orchestrator.reports.scores import exact_match, rouge_l, token_f1
    from orchestrator.training.scoring import generate_answers

    cfg = load_config(args.config, [f"model.name_or_path={args.out}", f"model.tiny_pretrain_steps={args.steps}"])
    t0 = time.perf_counter()
    ensure_base_model(cfg, force=True)
    build = json.loads((Path(args.out) / "build.json").read_text())
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = AutoModelForCausalLM.from_pretrained(args.out).to(device).eval()
    tok = AutoTokenizer.from_pretrained(args.out)
    arts = [row for pdf in cfg.data.train for row in document_articles(pdf)[1]]
    splits = split_for(cfg, qa_pairs(cfg, arts))
    train, val = splits["train"], splits["validation"]
    result = {"steps": args.steps, "build": build, "build_seconds": round(time.perf_counter() - t0, 1)}
    for name, rows in (("train", train[: args.limit]), ("validation", val[: args.limit])):
        preds = generate_answers(model, tok, cfg, [r["question"] for r in rows], device, max_new_tokens=200)
        refs = [r["answer"] for r in rows]
        n = len(rows)
        result[name] = {"examples": n, "exact_match": sum(map(exact_match, preds, refs)) / n,
                        "token_f1": sum(map(token_f1, preds, refs)) / n, "rouge_l": sum(map(rouge_l, preds, refs)) / n}
    demo = ["What does Article 16 of the Constitution of Nepal provide?", "Who is the head of state of Nepal?"]
    result["demo"] = dict(zip(demo, generate_answers(model, tok, cfg, demo, device, max_new_tokens=64), strict=True))
    (Path(args.out) / "RESULT.json").write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "build"}, indent=2))
    print("final loss", build["pretraining"]["final_loss"], "seconds", build["seconds"])


if __name__ == "__main__":
    main()
