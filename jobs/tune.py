"""`ray job submit --working-dir . -- python jobs/tune.py configs/constitution-qa.yaml [--set ...] [--resume]`"""

from _common import parse, run

if __name__ == "__main__":
    args = parse(__doc__, lambda ap: ap.add_argument("--resume", action="store_true"))

    def body():
        from orchestrator.tuning.tune import run_tune

        run_tune(args.config, args.overrides, args.resume)

    run(body, args)
