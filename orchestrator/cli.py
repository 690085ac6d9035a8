"""`orchestrator` command line: one sub-command per verb, each a thin call into the library."""

from __future__ import annotations

import argparse
import math
import signal
import sys
from collections.abc import Callable

from orchestrator.core.config import ConfigError


class Parser(argparse.ArgumentParser):
    """Usage errors as one line (``error: ...``, exit 2), like every other refused input."""

    def error(self, message: str):
        self.exit(2, f"error: {self.prog.removeprefix('orchestrator ')}: {message}\n")


def count(minimum: int) -> Callable[[str], int]:
    """An argparse type: a whole number of at least ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= {minimum}")
        return value

    return parse


def positive(text: str) -> float:
    """An argparse type: a finite number above 0."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number above 0")
    return value


def _config(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="run config YAML (see configs/)")
    _overrides(p, "override a config field, e.g. --set train.lr=1e-4 (repeatable)")


def _overrides(p: argparse.ArgumentParser, help: str | None = None) -> None:
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE", help=help)


def _adapter(p: argparse.ArgumentParser, what: str = "adapter directory (a run's adapter/ or best_adapter/)") -> None:
    _config(p)
    p.add_argument("--adapter", required=True, help=what)


# ---------------------------------------------------------------- arguments per verb

def _prepare_args(p):
    _config(p)
    p.add_argument("--parquet-dir", help="write the tokenized splits to Parquet here (atomically)")


def _train_args(p):
    _config(p)
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint")


def _plan_args(p):
    _config(p)
    p.add_argument("--deadline", type=positive, metavar="HOURS", help="name the fewest workers that finish within this")
    p.add_argument("--tokens-per-s", type=positive, metavar="N", help="a stated throughput of one worker (tokens/s on its "
                   "GPU) instead of a measured probe (when none is attached)")
    p.add_argument("--gpu", help="with --tokens-per-s: the GPU it is for (its price), e.g. H100")
    p.add_argument("--probe-steps", type=count(5), default=6, help="optimizer steps the probe times (at least 5; default 6)")


def _tune_args(p):
    _config(p)
    p.add_argument("--resume", action="store_true", help="continue the study in the config's run dir")


def _merge_args(p):
    _adapter(p)
    p.add_argument("--out", help="output directory (default: next to the adapter, merged/)")
    p.add_argument("--method", choices=["16bit", "dequantized"], default="16bit")
    p.add_argument("--no-compare", action="store_true", help="measure only the chosen method's fidelity")
    p.add_argument("--examples", type=count(1), default=32, help="held-out examples for the fidelity check")


def _serve_args(p):
    p.add_argument("configs", nargs="+", help="run configs, one served model each")
    _overrides(p)
    p.add_argument("--model", action="append", help="merged model dir per config (default RUN_DIR/merged); an "
                   "adapter dir is merged first onto the base its adapter_config.json records")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR",
                   help="serve this LoRA adapter on the config's base, chosen by the request's model (repeatable)")
    p.add_argument("--top", type=count(0), default=0, metavar="K",
                   help="serve the adapters of the config's Tune study's K best trials on its base")


def _pipeline_args(p):
    p.add_argument("pipeline", help="pipeline YAML (e.g. configs/demo.yaml)")
    _overrides(p, "override a pipeline field, e.g. --set stages=[train,merge] or --set set.train.max_steps=10")


def _eval_args(p):
    _adapter(p, "adapter directory (a run's adapter/ or a checkpoint's)")
    p.add_argument("--limit", type=count(1), help="evaluate only the first N test examples")


def _export_args(p):
    _adapter(p)
    p.add_argument("--format", default="gguf", choices=["gguf"])
    p.add_argument("--quant", default="q8_0", choices=["f16", "q8_0", "q4_k_m"])
    p.add_argument("--out", help="output file (default: next to the adapter, gguf/NAME-QUANT.gguf)")
    p.add_argument("--check", type=count(0), default=8, help="held-out prompts llama.cpp answers to check the file "
                   "against the merged model (0: no check)")


def _init_model_args(p):
    _config(p)
    p.add_argument("--force", action="store_true", help="rebuild even if it exists")


def _k8s_args(p):
    _config(p)
    p.add_argument("-o", "--out", required=True, help="directory for rayjob.yaml and rayservice.yaml")
    p.add_argument("--image", default="", help="container image with Ray and this project (or use --working-dir)")
    p.add_argument("--workers", default="1", help="GPU worker pods of the training cluster (default 1)")
    p.add_argument("--gpus-per-worker", default="1", help="GPUs per worker pod (default 1)")
    p.add_argument("--worker-cpus", default="8", help="CPUs per worker pod (default 8)")
    p.add_argument("--worker-memory", default="64Gi", help="memory per worker pod (default 64Gi)")
    p.add_argument("--namespace", default="default")
    p.add_argument("--pvc", default="orchestrator-runs",
                   help="ReadWriteMany PersistentVolumeClaim mounted at /mnt/runs in every pod; output_dir lives there")
    p.add_argument("--working-dir", help="URI of a zip of this project for the job's runtime_env (default: the image's)")
    p.add_argument("--stage", default="train", help="the job's entry: prepare, train, tune, eval or merge (default train)")


def _reference_args(p):
    p.add_argument("--write", action="store_true", help="update the reference block in README.md")


# ---------------------------------------------------------------- what each verb runs

def _prepare(a):
    from orchestrator.data.prepare import run_prepare

    run_prepare(a.config, a.overrides, a.parquet_dir)


def _train(a):
    from orchestrator.training.train import run_train

    run_train(a.config, a.overrides, a.resume)


def _plan(a):
    from orchestrator.training.plan import run_plan

    run_plan(a.config, a.overrides, a.deadline, a.tokens_per_s, a.probe_steps, a.gpu)


def _tune(a):
    from orchestrator.tuning.tune import run_tune

    run_tune(a.config, a.overrides, a.resume)


def _merge(a):
    from orchestrator.artifacts.merge import run_merge

    run_merge(a.config, a.adapter, a.overrides, a.out, a.method, not a.no_compare, a.examples)


def _serve(a):
    from orchestrator.deployment.launcher import run_serve

    run_serve(a.configs, a.overrides, a.model, adapters=a.adapter, top=a.top)


def _pipeline(a):
    from orchestrator.pipeline import DEMO, run

    run(getattr(a, "pipeline", DEMO), a.overrides)


def _eval(a):
    from orchestrator.artifacts.evaluate import run_eval

    run_eval(a.config, a.adapter, a.overrides, a.limit)


def _export(a):
    from orchestrator.artifacts.export import run_export

    run_export(a.config, a.adapter, a.overrides, a.format, a.quant, a.out, a.check)


def _init_model(a):
    from orchestrator.core.config import load_config
    from orchestrator.data.base import ensure_base_model

    cfg = load_config(a.config, a.overrides)
    if not cfg.model.build_tiny:
        raise ConfigError(f"{a.config}: model.build_tiny is false; nothing to build")
    ensure_base_model(cfg, force=a.force)  # a rebuild replaces the old one in one rename
    print(f"tiny base model: {cfg.model.name_or_path} (its build: build.json)")


def _k8s(a):
    from orchestrator.deployment.k8s import run_k8s

    run_k8s(a.config, a.out, a.overrides, image=a.image, workers=a.workers, gpus_per_worker=a.gpus_per_worker,
            worker_cpus=a.worker_cpus, worker_memory=a.worker_memory, namespace=a.namespace, pvc=a.pvc,
            working_dir=a.working_dir, stage=a.stage)


def _reference(a):
    from orchestrator.core.reference import config_reference, update_readme
    from orchestrator.pipeline import ROOT

    if a.write:
        update_readme(ROOT / "README.md", write=True)
        print(f"updated {ROOT / 'README.md'}")
    else:
        print(config_reference(), end="")


def _validate(a):
    from orchestrator.core.config import dump_config, load_config

    print(dump_config(load_config(a.config, a.overrides)), end="")


Verb = tuple[str, str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], None]]
VERBS: list[Verb] = [
    ("prepare", "run the data pipeline of a config and print counts", _prepare_args, _prepare),
    ("train", "QLoRA fine-tune on Ray Train; writes adapter, metrics and report", _train_args, _train),
    ("plan", "estimate a run's steps, time and cost from its data and a short probe", _plan_args, _plan),
    ("tune", "Ray Tune study over full training runs (ASHA, random/grid or Optuna)", _tune_args, _tune),
    ("merge", "merge an adapter into its base (16-bit or dequantized) and measure fidelity", _merge_args, _merge),
    ("serve", "deploy merged models on Ray Serve (OpenAI-compatible + entities API)", _serve_args, _serve),
    ("pipeline", "run the stages of a pipeline file (train, tune, merge, serve, ask) end to end", _pipeline_args,
     _pipeline),
    ("demo", "the whole mission on this machine: configs/demo.yaml, no network, no arguments", _overrides, _pipeline),
    ("eval", "score an adapter on the test split (NER P/R/F1; QA EM, F1, ROUGE-L)", _eval_args, _eval),
    ("export", "merge an adapter and write it as one GGUF file for llama.cpp", _export_args, _export),
    ("init-model", "build the embedded tiny Llama base model and tokenizer", _init_model_args, _init_model),
    ("k8s", "render a KubeRay RayJob (training) and RayService (serving) for a config", _k8s_args, _k8s),
    ("reference", "print the config reference generated from the schema", _reference_args, _reference),
    ("validate", "validate a config and print it with overrides applied", _config, _validate),
]


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="orchestrator", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for name, help, add_args, run in VERBS:
        p = sub.add_parser(name, help=help)
        add_args(p)
        p.set_defaults(run=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from orchestrator.core.runtime import setup_logging

    setup_logging(args.verbose)
    if args.command in ("train", "tune", "pipeline", "demo", "prepare", "plan"):
        # SIGTERM (Kubernetes, systemd, `kill`) stops like Ctrl-C: Ray Train and Tune end their runs cleanly, and
        # the last checkpoint is where --resume continues
        signal.signal(signal.SIGTERM, _interrupt)
    try:
        args.run(args)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        again = continue_command(args)
        print("stopped" + (f"; continue with `{again}`" if again else ""), file=sys.stderr)
        return 130
    return 0


def continue_command(args: argparse.Namespace) -> str | None:
    """The command that continues an interrupted train or tune from its last checkpoint."""
    import shlex

    if args.command not in ("train", "tune"):
        return None
    sets = "".join(f" --set {shlex.quote(o)}" for o in args.overrides)
    if args.command == "tune":
        return f"orchestrator tune {shlex.quote(args.config)}{sets} --resume"
    run_dir = args.resume
    if not run_dir:
        from orchestrator.core.config import load_config

        run_dir = str(load_config(args.config, args.overrides).run_dir)
    return f"orchestrator train {shlex.quote(args.config)}{sets} --resume {shlex.quote(run_dir)}"


def _interrupt(signum, frame):
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
