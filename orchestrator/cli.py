"""`orchestrator` command line: one sub-command per verb, each a thin call into the library."""

from __future__ import annotations

import argparse
import sys

from orchestrator.config import ConfigError


def _add_config(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="run config YAML (see configs/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a config field, e.g. --set train.lr=1e-4 (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="orchestrator", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prepare", help="run the data pipeline of a config and print counts")
    _add_config(p)
    p.add_argument("--parquet-dir", help="write the tokenized splits to Parquet here (atomically)")

    p = sub.add_parser("train", help="QLoRA fine-tune on Ray Train; writes adapter, metrics and report")
    _add_config(p)
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint")

    p = sub.add_parser("tune", help="Ray Tune study over full training runs (ASHA, random/grid or Optuna)")
    _add_config(p)
    p.add_argument("--resume", action="store_true", help="continue the study in the config's run dir")

    p = sub.add_parser("merge", help="merge an adapter into its base (16-bit or dequantized) and measure fidelity")
    _add_config(p)
    p.add_argument("--adapter", required=True, help="adapter directory (a run's adapter/ or best_adapter/)")
    p.add_argument("--out", help="output directory (default: next to the adapter, merged/)")
    p.add_argument("--method", choices=["16bit", "dequantized"], default="16bit")
    p.add_argument("--no-compare", action="store_true", help="measure only the chosen method's fidelity")
    p.add_argument("--examples", type=int, default=32, help="held-out examples for the fidelity check")

    p = sub.add_parser("serve", help="deploy merged models on Ray Serve (OpenAI-compatible + entities API)")
    p.add_argument("configs", nargs="+", help="run configs, one served model each")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE")
    p.add_argument("--model", action="append", help="merged model dir per config (default RUN_DIR/merged); an "
                   "adapter dir is merged first onto the base its adapter_config.json records")

    p = sub.add_parser("pipeline", help="run the stages of a pipeline file (train, tune, merge, serve, ask) end to end")
    p.add_argument("pipeline", help="pipeline YAML (e.g. configs/demo.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a pipeline field, e.g. --set stages=[train,merge] or --set set.train.max_steps=10")

    p = sub.add_parser("demo", help="the whole mission on this machine: configs/demo.yaml, no network, no arguments")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE")

    p = sub.add_parser("eval", help="score an adapter on the test split (NER P/R/F1; QA EM, F1, ROUGE-L)")
    _add_config(p)
    p.add_argument("--adapter", required=True, help="adapter directory (a run's adapter/ or a checkpoint's)")
    p.add_argument("--limit", type=int, help="evaluate only the first N test examples")

    p = sub.add_parser("export", help="merge an adapter and write it as one GGUF file for llama.cpp")
    _add_config(p)
    p.add_argument("--adapter", required=True, help="adapter directory (a run's adapter/ or best_adapter/)")
    p.add_argument("--format", default="gguf", choices=["gguf"])
    p.add_argument("--quant", default="q8_0", choices=["f16", "q8_0", "q4_k_m"])
    p.add_argument("--out", help="output file (default: next to the adapter, gguf/NAME-QUANT.gguf)")
    p.add_argument("--check", type=int, default=8, help="held-out prompts llama.cpp answers to check the file "
                   "against the merged model (0: no check)")

    p = sub.add_parser("init-model", help="build the embedded tiny Llama base model and tokenizer")
    _add_config(p)
    p.add_argument("--force", action="store_true", help="rebuild even if it exists")

    p = sub.add_parser("k8s", help="render a KubeRay RayJob (training) and RayService (serving) for a config")
    _add_config(p)
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

    p = sub.add_parser("reference", help="print the config reference generated from the schema")
    p.add_argument("--write", action="store_true", help="update the reference block in README.md")

    p = sub.add_parser("validate", help="validate a config and print it with overrides applied")
    _add_config(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from orchestrator.runtime import setup_logging

    setup_logging(args.verbose)
    try:
        if args.command == "prepare":
            from orchestrator.prepare import run_prepare

            run_prepare(args.config, args.overrides, args.parquet_dir)
        elif args.command == "train":
            from orchestrator.train import run_train

            run_train(args.config, args.overrides, args.resume)
        elif args.command == "tune":
            from orchestrator.tune import run_tune

            run_tune(args.config, args.overrides, args.resume)
        elif args.command == "merge":
            from orchestrator.merge import run_merge

            run_merge(args.config, args.adapter, args.overrides, args.out, args.method, not args.no_compare,
                      args.examples)
        elif args.command == "serve":
            from orchestrator.deploy import run_serve

            run_serve(args.configs, args.overrides, args.model)
        elif args.command in ("pipeline", "demo"):
            from orchestrator.pipeline import DEMO, run

            run(args.pipeline if args.command == "pipeline" else DEMO, args.overrides)
        elif args.command == "eval":
            from orchestrator.evaluate import run_eval

            run_eval(args.config, args.adapter, args.overrides, args.limit)
        elif args.command == "export":
            from orchestrator.export import run_export

            run_export(args.config, args.adapter, args.overrides, args.format, args.quant, args.out, args.check)
        elif args.command == "init-model":
            from orchestrator.config import load_config
            from orchestrator.tiny import ensure_base_model

            cfg = load_config(args.config, args.overrides)
            if not cfg.model.build_tiny:
                raise ConfigError(f"{args.config}: model.build_tiny is false; nothing to build")
            ensure_base_model(cfg, force=args.force)  # a rebuild replaces the old one in one rename
            print(f"tiny base model: {cfg.model.name_or_path} (its build: build.json)")
        elif args.command == "k8s":
            from orchestrator.k8s import run_k8s

            run_k8s(args.config, args.out, args.overrides, image=args.image, workers=args.workers,
                    gpus_per_worker=args.gpus_per_worker, worker_cpus=args.worker_cpus,
                    worker_memory=args.worker_memory, namespace=args.namespace, pvc=args.pvc,
                    working_dir=args.working_dir, stage=args.stage)
        elif args.command == "reference":
            from orchestrator.pipeline import ROOT
            from orchestrator.reference import config_reference, update_readme

            if args.write:
                update_readme(ROOT / "README.md", write=True)
                print(f"updated {ROOT / 'README.md'}")
            else:
                print(config_reference(), end="")
        elif args.command == "validate":
            from orchestrator.config import dump_config, load_config

            print(dump_config(load_config(args.config, args.overrides)), end="")
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
