"""`ray job submit --working-dir . -- python jobs/pipeline.py configs/demo.yaml [--set FIELD=VALUE ...]`

Runs a pipeline file's stages (train, tune, merge, serve, ask) on the cluster the job belongs to.
"""

from _common import parse, run

if __name__ == "__main__":
    args = parse(__doc__)

    def body():
        from orchestrator.pipeline import run as run_pipeline

        result = run_pipeline(args.config, args.overrides)
        print(f"pipeline outputs: {result.report_dir}")

    run(body, args)
