"""`ray job submit --working-dir . -- python jobs/eval.py CONFIG --adapter RUN_DIR/adapter`"""

from _common import parse, run

if __name__ == "__main__":
    args = parse(__doc__, lambda ap: (ap.add_argument("--adapter", required=True),
                                      ap.add_argument("--limit", type=int)))

    def body():
        from orchestrator.artifacts.evaluate import run_eval

        run_eval(args.config, args.adapter, args.overrides, args.limit)

    run(body, args)
