"""`ray job submit --working-dir . -- python jobs/export.py CONFIG --adapter RUN_DIR/adapter --quant q8_0`"""

from _common import parse, run


def _extra(ap):
    ap.add_argument("--adapter", required=True)
    ap.add_argument("--format", default="gguf", choices=["gguf"])
    ap.add_argument("--quant", default="q8_0", choices=["f16", "q8_0", "q4_k_m"])
    ap.add_argument("--out")
    ap.add_argument("--check", type=int, default=8, help="held-out prompts to check with llama.cpp (0: none)")


if __name__ == "__main__":
    args = parse(__doc__, _extra)

    def body():
        from orchestrator.artifacts.export import run_export

        run_export(args.config, args.adapter, args.overrides, args.format, args.quant, args.out, args.check)

    run(body, args)
