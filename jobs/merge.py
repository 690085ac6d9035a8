"""`ray job submit --working-dir . -- python jobs/merge.py CONFIG --adapter RUN_DIR/adapter [--method dequantized]`"""

from _common import parse, run


def _extra(ap):
    ap.add_argument("--adapter", required=True)
    ap.add_argument("--out")
    ap.add_argument("--method", choices=["16bit", "dequantized"], default="16bit")


if __name__ == "__main__":
    args = parse(__doc__, _extra)

    def body():
        from orchestrator.merge import run_merge

        run_merge(args.config, args.adapter, args.overrides, args.out, args.method)

    run(body)
