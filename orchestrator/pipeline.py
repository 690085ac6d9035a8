"""`orchestrator pipeline PIPELINE.yaml` and `orchestrator demo`: every stage, end to end, on one Ray instance.

A pipeline file names run configs and the stages to run over them:

    train  (each run: QLoRA on Ray Train; the data pipeline streams into it)
    tune   (runs with ``tune: true``: a Ray Tune study over full training runs)
    merge  (each run's adapter folded into its 16-bit base, fidelity measured)
    serve  (all merged models on Ray Serve, one app)
    ask    (the configured questions and clinical sentences sent through the HTTP API)

then writes a summary report (Markdown + PNG) into ``output_dir/name``. A stage whose outputs are
already complete is reused, so a pipeline that stopped half way continues where it was.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.core.config import (
    ConfigError,
    PipelineConfig,
    RunConfig,
    apply_overrides,
    dotted_keys,
    load_config,
    read_raw,
    validate_pipeline,
)
from orchestrator.core.io import atomic_write_text
from orchestrator.core.runtime import PROJECT_ROOT
from orchestrator.reports.pipeline import RunOutcome, write_report

log = logging.getLogger(__name__)
ROOT = PROJECT_ROOT
DEMO = ROOT / "configs" / "demo.yaml"


@dataclass
class PipelineResult:
    report_dir: Path
    runs: list[RunOutcome]
    url: str | None


class Progress:
    """Numbered stage banners with elapsed time."""

    def __init__(self, total: int) -> None:
        self.total, self.n, self.t0 = total, 0, time.perf_counter()

    def stage(self, text: str) -> None:
        self.n += 1
        print(f"\n[{self.n}/{self.total}  {self.elapsed()}] {text}", flush=True)

    def elapsed(self) -> str:
        s = int(time.perf_counter() - self.t0)
        return f"{s // 60:d}:{s % 60:02d}"


def load_pipeline(path: str | Path, overrides: list[str] | None = None) -> tuple[PipelineConfig, list[RunConfig]]:
    """The pipeline file and its run configs, every override applied and validated before Ray starts.
    Run config paths are relative to the pipeline file; paths inside run configs to ``base_dir``."""
    path = Path(path)
    pipe = validate_pipeline(apply_overrides(read_raw(path), overrides), str(path))
    base = (path.parent / pipe.base_dir).resolve() if pipe.base_dir else Path.cwd()
    out = Path(pipe.output_dir)
    out = out if out.is_absolute() else base / out
    cfgs = []
    for i, run in enumerate(pipe.runs):
        cfg_path = (path.parent / run.config).resolve()
        sets = {**dotted_keys(run.set), **dotted_keys(pipe.set), "output_dir": str(out / pipe.name)}
        try:
            cfgs.append(load_config(cfg_path, [f"{k}={json.dumps(v)}" for k, v in sets.items()], base=base))
        except ConfigError as e:
            raise ConfigError(f"{path}: runs[{i}] ({run.config}): {e}") from None
    names = [c.name for c in cfgs]
    if len(set(names)) != len(names):
        raise ConfigError(f"{path}: runs: run names must differ, got {names}")
    return pipe, cfgs


def _train(cfg: RunConfig) -> tuple[dict[str, Any], float | None]:
    from orchestrator.data.base import ensure_base_model
    from orchestrator.training.train import run_training

    run_dir = Path(cfg.run_dir)
    if (run_dir / "adapter" / "adapter_config.json").exists() and (run_dir / "metrics.json").exists():
        print(f"  {cfg.name}: trained earlier, reusing {run_dir / 'adapter'}")
        return json.loads((run_dir / "metrics.json").read_text()), None
    ensure_base_model(cfg)
    t0 = time.perf_counter()
    run_training(cfg, resume=(run_dir / "train").exists())
    return json.loads((run_dir / "metrics.json").read_text()), time.perf_counter() - t0


def study_config(cfg: RunConfig, tune_set: dict[str, Any]) -> RunConfig:
    from orchestrator.core.config import set_fields

    return set_fields(cfg, {"name": f"{cfg.name}-tune", **dotted_keys(tune_set)})


def trials_config(tcfg: RunConfig, k: int) -> RunConfig:
    """A study's ``k`` best trials' adapters served together on the run's base (``serve_top_k``)."""
    from orchestrator.core.config import set_fields
    from orchestrator.deployment.launcher import study_adapters

    return set_fields(tcfg, {"name": f"{tcfg.name}-trials", "serve.adapters": study_adapters(tcfg, k)})


def _tune(tcfg: RunConfig) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    from orchestrator.tuning.tune import run_study

    table = Path(tcfg.run_dir) / "trials.json"
    if table.exists():
        print(f"  {tcfg.name}: study finished earlier, reusing {table}")
        trials = json.loads(table.read_text())
    else:
        trials = run_study(tcfg, resume=(Path(tcfg.run_dir) / "study").exists()).trials
    key = f"best_{tcfg.tune.metric}"
    scored = [t for t in trials if t.get(key) is not None]
    best = (min if tcfg.tune.mode == "min" else max)(scored, key=lambda t: t[key])
    return trials, best


def _eval(cfg: RunConfig, n: int) -> dict[str, dict[str, Any]]:
    """QA runs: greedy answers to ``n`` questions it trained on and ``n`` it did not (validation split),
    scored; written to RUN_DIR/eval_splits.json. NER runs are scored on their validation split while training."""
    if cfg.model.task != "causal_lm":
        return {}
    from orchestrator.artifacts.evaluate import evaluate_qa
    from orchestrator.data.pipelines import causal_lm_rows

    raw, _, _ = causal_lm_rows(cfg)
    adapter = Path(cfg.run_dir) / "adapter"
    out = {split: evaluate_qa(cfg, adapter, raw[split], n) for split in ("train", "validation") if raw.get(split)}
    atomic_write_text(Path(cfg.run_dir) / "eval_splits.json", json.dumps(out, indent=2))
    for split, r in out.items():
        print(f"  {cfg.name}: {r['examples']} {split} questions: exact match {r['exact_match']:.3f}, "
              f"token F1 {r['token_f1']:.3f}, ROUGE-L {r['rouge_l']:.3f}")
    return out


def _merge(cfg: RunConfig) -> dict[str, Any]:
    from orchestrator.artifacts.merge import merge_adapter
    from orchestrator.data.prepare import heldout_rows

    out = Path(cfg.run_dir) / "merged"
    if (out / "merge.json").exists() and (out / "config.json").exists():
        print(f"  {cfg.name}: merged earlier, reusing {out}")
        return json.loads((out / "merge.json").read_text())
    r = merge_adapter(cfg, Path(cfg.run_dir) / "adapter", out, heldout_rows(cfg), "16bit", compare=False, examples=8)
    f = r["fidelity"]["16bit"]
    print(f"  {cfg.name}: merged into {out} (mean KL {f['mean_kl']:.2e}, top-1 agreement {f['top1_agreement']:.3f})")
    return r


def ask(url: str, cfgs: list[RunConfig], pipe: PipelineConfig, token: str | None = None) -> dict[str, list[dict]]:
    """Send the pipeline's questions (chat completions) and sentences (entities) through the HTTP API."""
    import httpx

    headers = {"Authorization": f"Bearer {token}"} if token else {}
    out: dict[str, list[dict]] = {}
    with httpx.Client(base_url=url, timeout=300, headers=headers) as h:
        for cfg in cfgs:
            rows = out.setdefault(cfg.name, [])
            if cfg.model.task == "causal_lm":
                for q in pipe.ask.questions:
                    r = h.post("/v1/chat/completions", json={
                        "model": cfg.name, "messages": [{"role": "user", "content": q}], "temperature": 0,
                        "max_tokens": pipe.ask.max_tokens})
                    r.raise_for_status()
                    rows.append({"question": q, "answer": r.json()["choices"][0]["message"]["content"].strip()})
            else:
                if not pipe.ask.entity_texts:
                    continue
                r = h.post("/v1/entities", json={"model": cfg.name, "texts": pipe.ask.entity_texts})
                r.raise_for_status()
                for text, res in zip(pipe.ask.entity_texts, r.json()["results"], strict=True):
                    rows.append({"text": text, "entities": [
                        {k: e[k] for k in ("type", "text", "start", "end", "score")} for e in res["entities"]]})
    return out


def run_pipeline(pipe: PipelineConfig, cfgs: list[RunConfig]) -> PipelineResult:
    """Run the pipeline's stages in order over its runs, print a summary and write the report."""
    import ray

    from orchestrator.core.runtime import init_ray

    stages = pipe.stages
    tuned = [(c, study_config(c, r.tune_set)) for c, r in zip(cfgs, pipe.runs, strict=True) if r.tune]
    qa = [o for o in cfgs if o.model.task == "causal_lm"]
    steps = (len(cfgs) * ("train" in stages) + len(tuned) * ("tune" in stages) + bool(qa) * ("eval" in stages)
             + ("merge" in stages)
             + ("serve" in stages) + ("ask" in stages) + 1)
    progress = Progress(steps + 1)
    report_dir = Path(cfgs[0].output_dir)
    outcomes = [RunOutcome(c) for c in cfgs]
    started_here = not ray.is_initialized()
    progress.stage(f"Ray: {'connecting' if not started_here else 'starting a local instance'}")
    init_ray(pipe.num_cpus, log_file=report_dir / "ray.log")
    url = None
    try:
        if "train" in stages:
            for o in outcomes:
                c = o.cfg
                progress.stage(f"train {c.name}: {c.model.task}, {c.scaling.num_workers} Ray Train workers, "
                               f"{c.quantization.bits}-bit base, LoRA r={c.lora.r}")
                o.metrics, o.train_s = _train(c)
                _print_train(o)
        if "tune" in stages:
            for c, tcfg in tuned:
                o = outcomes[cfgs.index(c)]
                t = tcfg.tune
                progress.stage(f"tune {c.name}: {t.num_samples} sample(s) of the space over {', '.join(t.search_space)}, "
                               f"{t.scheduler} scheduler, metric {t.metric} ({t.mode})")
                o.study, o.best_trial = _tune(tcfg)
        if "eval" in stages and qa:
            progress.stage(f"eval: greedy answers to {pipe.eval_examples} trained and {pipe.eval_examples} held-out "
                           "questions")
            for o in outcomes:
                o.evals = _eval(o.cfg, pipe.eval_examples)
        if "merge" in stages:
            progress.stage("merge: adapters into their 16-bit bases")
            for o in outcomes:
                o.merge = _merge(o.cfg)
        if "serve" in stages:
            from orchestrator.deployment.launcher import app_args, start, urls

            served = cfgs + [trials_config(tcfg, pipe.serve_top_k) for _, tcfg in tuned if pipe.serve_top_k]
            progress.stage("serve: one Ray Serve app with " + ", ".join(c.name for c in served))
            args = app_args(served)
            url = start(args, pipe.serve_host, pipe.serve_port)
            print(urls(url, args))
        if "ask" in stages:
            if url is None:
                raise ConfigError("stage ask needs stage serve")
            progress.stage("ask: questions and clinical sentences through the HTTP API")
            answers = ask(url, cfgs, pipe)
            for o in outcomes:
                o.answers = answers.get(o.cfg.name, [])
                _print_answers(o)
        progress.stage("report")
        summary = write_report(pipe, report_dir, outcomes, url, progress.elapsed())
        print(summary)
        print(f"report: {report_dir / 'report.md'}  (total {progress.elapsed()})")
    finally:
        if url and not pipe.keep_serving:
            from ray import serve

            serve.shutdown()
        if started_here and not pipe.keep_serving:
            ray.shutdown()
    return PipelineResult(report_dir, outcomes, url)


def _print_train(o: RunOutcome) -> None:
    m = o.metrics
    ev = ", ".join(f"{k} {v:.4g}" for k, v in m.get("final_eval", {}).items())
    took = f" in {o.train_s:.0f} s" if o.train_s else ""
    print(f"  {o.cfg.name}: {m['steps']} steps{took}, loss {m['first_loss']:.3g} -> {m['final_loss']:.3g}; {ev}")


def _print_answers(o: RunOutcome) -> None:
    for a in o.answers:
        if "question" in a:
            print(f"  Q: {a['question']}\n  A: {a['answer']}")
        else:
            ents = "; ".join(f"{e['text']} ({e['type']}, {e['score']:.2f})" for e in a["entities"]) or "(none)"
            print(f"  {a['text']}\n    -> {ents}")


def run(path: str | Path, overrides: list[str] | None = None) -> PipelineResult:
    """Entry for `orchestrator pipeline`, `orchestrator demo` and jobs/pipeline.py."""
    pipe, cfgs = load_pipeline(path, overrides)
    return run_pipeline(pipe, cfgs)
