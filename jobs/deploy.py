"""`ray job submit --working-dir . -- python jobs/deploy.py CONFIG [CONFIG ...] [--model MERGED_DIR ...]
[--adapter NAME=DIR ...] [--top K]`

Deploys the Serve application on the cluster and returns; the application keeps running after the job
ends (`serve status`, `serve shutdown`)."""

from _common import parse, run

if __name__ == "__main__":
    def options(ap):
        ap.add_argument("--model", action="append")
        ap.add_argument("--adapter", action="append", default=[])
        ap.add_argument("--top", type=int, default=0)

    args = parse(__doc__, options, many=True)

    def body():
        from orchestrator.deployment.launcher import run_serve

        run_serve(args.config, args.overrides, args.model, blocking=False, adapters=args.adapter, top=args.top)

    run(body, args)
