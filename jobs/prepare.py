"""`ray job submit --working-dir . -- python jobs/prepare.py configs/constitution-qa.yaml [--set ...]`"""

from _common import parse, run

if __name__ == "__main__":
    args = parse(__doc__, lambda ap: ap.add_argument("--parquet-dir"))

    def body():
        from orchestrator.data.prepare import run_prepare

        run_prepare(args.config, args.overrides, args.parquet_dir)

    run(body, args)
