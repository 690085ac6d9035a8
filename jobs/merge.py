"""`ray job submit --working-dir . -- python jobs/merge.py CONFIG --adapter RUN_DIR/adapter [--method dequantized]`"""

from _common import parse, run


def _extra(ap):
    ap.add_argument("--adapter", required=True)
    ap.add_argument("--out")
    ap.add_argument("--method", choices=["16bit", "dequantized"], default="16bit")
    ap.add_argument("--no-compare", action="store_true", help="measure only the chosen method's fidelity")
    ap.add_argument("--examples", type=int, default=32, help="held-out examples for the fidelity check")


if __name__ == "__main__":
    args = parse(__doc__, _extra)

    def body():
        from orchestrator.artifacts.merge import run_merge

        run_merge(args.config, args.adapter, args.overrides, args.out, args.method, not args.no_compare,
                  args.examples)

    run(body, args)
