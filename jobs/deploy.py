"""`ray job submit --working-dir . -- python jobs/deploy.py CONFIG [CONFIG ...] [--model MERGED_DIR ...]`

Deploys the Serve application on the cluster and returns; the application keeps running after the job
ends (`serve status`, `serve shutdown`)."""

from _common import parse, run

if __name__ == "__main__":
    args = parse(__doc__, lambda ap: ap.add_argument("--model", action="append"), many=True)

    def body():
        from orchestrator.deployment.launcher import run_serve

        run_serve(args.config, args.overrides, args.model, blocking=False)

    run(body, args)
