"""`ray job submit --working-dir . -- python jobs/train.py configs/constitution-qa.yaml [--set ...]`"""

from _common import parse, run

if __name__ == "__main__":
    args = parse(__doc__, lambda ap: ap.add_argument("--resume", metavar="RUN_DIR"))

    def body():
        from orchestrator.training.train import run_train

        run_train(args.config, args.overrides, args.resume)

    run(body, args)
