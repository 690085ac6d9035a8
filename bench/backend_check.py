"""Does a training backend compute what the reference (hf) computes? One backend per process (Unsloth patches
transformers for the whole process), then a compare step.

    python bench/backend_check.py run --model /tmp/llama7b --backend hf      --out /tmp/check
    python bench/backend_check.py run --model /tmp/llama7b --backend unsloth --out /tmp/check
    python bench/backend_check.py compare --out /tmp/check [--json bench/results/backend_check_<tag>.json]

``run`` loads the model through ``orchestrator.backends`` exactly as a Ray Train worker does (4-bit NF4 +
double quant, LoRA r=16 on every linear layer), gives every LoRA weight the same seeded non-zero values in
every process (B = 0 at init would leave A's gradient zero), then on one fixed packed batch (4 rows of 512
tokens, 3 examples each, position_ids restarting per example, prompt tokens unlabelled) records:

- the training loss and every LoRA gradient (``backend.forward`` in train mode, backward);
- packed vs separate: the logits of each example inside the packed rows against the same example run alone
  (max and mean |difference|), beside the mean |difference| that attention across the boundaries gives (the
  same rows with one running position), so bf16 noise and a leak can be told apart;
- a short loss curve: 15 AdamW steps (lr 1e-4) on fixed batches.

``compare`` states, for each backend against hf: loss difference, per-tensor gradient cosine similarity and
relative error (median and worst), packed-vs-separate max |logit difference| of each, and the loss curves.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SEQ, ROWS, PER_ROW = 512, 4, 3


def batches(vocab: int, n: int, seed: int):
    """``n`` packed batches of random tokens and, for the first, its examples (each as a separate row)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids, labels, pos, examples = [], [], [], []
        for _ in range(ROWS):
            cuts = sorted(torch.randint(64, SEQ - 64, (PER_ROW - 1,), generator=g).tolist())
            lens = [b - a for a, b in zip([0, *cuts], [*cuts, SEQ], strict=True)]
            row = torch.randint(3, min(vocab, 8000), (SEQ,), generator=g)
            lab = row.clone()
            p = torch.cat([torch.arange(n_) for n_ in lens])
            start = 0
            for n_ in lens:
                lab[start:start + n_ // 4] = -100  # the "prompt" of each example is unlabelled
                examples.append((row[start:start + n_], lab[start:start + n_]))
                start += n_
            ids.append(row)
            labels.append(lab)
            pos.append(p)
        out.append(({"input_ids": torch.stack(ids), "labels": torch.stack(labels), "position_ids": torch.stack(pos)},
                    examples))
    return out


def run(args) -> None:
    import torch

    from bench.train_gpu import base_config
    from orchestrator.core.config import set_fields
    from orchestrator.training.backends import make_backend

    cfg = set_fields(base_config(args.model, "qa", "unused.jsonl", 15, "/tmp/unused"),
                     {"train.backend": args.backend, "lora.dropout": 0.0})
    backend = make_backend(args.backend)
    device = torch.device("cuda:0")
    t0 = time.perf_counter()
    model = backend.load(cfg, device, None)
    load_s = time.perf_counter() - t0
    lora = {n: p for n, p in model.named_parameters() if p.requires_grad}
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n in sorted(lora):
            lora[n].copy_((torch.randn(lora[n].shape, generator=g) * 0.01).to(lora[n].dtype))
    vocab = json.loads((Path(args.model) / "config.json").read_text())["vocab_size"]
    data = batches(vocab, 15, seed=1)
    inputs = {k: v.to(device) for k, v in data[0][0].items()}

    def autocast():  # as the training loop runs the backend
        import contextlib

        return torch.autocast("cuda", dtype=torch.bfloat16) if backend.autocast else contextlib.nullcontext()

    # 1. loss and LoRA gradients on one packed batch
    module = backend.training_module(model, cfg)
    with autocast():
        loss = backend.forward(module, inputs).loss
    loss.backward()
    grads = {n: p.grad.detach().float().cpu() for n, p in lora.items()}
    model.zero_grad(set_to_none=True)
    # 2. packed vs separate logits (eval, no grad)
    model.eval()
    with torch.no_grad(), autocast():
        packed = backend.forward(model, dict(inputs), train=False).logits.float()
        # and, for scale, what attention across the boundaries would give: the row with one running position
        rows = dict(inputs, position_ids=torch.arange(SEQ, device=device).expand(ROWS, SEQ))
        leaky = backend.forward(model, rows, train=False).logits.float()
        diffs, leaks, start, row = [], [], 0, 0
        for i, (ids, lab) in enumerate(data[0][1]):
            if i and i % PER_ROW == 0:
                row, start = row + 1, 0
            alone = backend.forward(model, {"input_ids": ids[None].to(device), "labels": lab[None].to(device),
                                            "position_ids": torch.arange(len(ids), device=device)[None]},
                                    train=False).logits.float()[0]
            diffs.append((packed[row, start:start + len(ids)] - alone).abs())
            if start:  # an example after the row's first: what leaking attention would change
                leaks.append((leaky[row, start:start + len(ids)] - alone).abs())
            start += len(ids)
        worst = max(d.max().item() for d in diffs)
        scale = {"max_abs_logit": packed.abs().max().item(),
                 "packed_vs_alone_mean_abs": torch.cat([d.flatten() for d in diffs]).mean().item(),
                 "leaky_vs_alone_mean_abs": torch.cat([d.flatten() for d in leaks]).mean().item()}
    model.train()
    # 3. a short loss curve
    opt = torch.optim.AdamW(list(lora.values()), lr=1e-4)
    curve = []
    for b, _ in data:
        with autocast():
            step_loss = backend.forward(module, {k: v.to(device) for k, v in b.items()}).loss
        step_loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        curve.append(round(step_loss.item(), 5))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.save({"backend": args.backend, "loss": loss.item(), "grads": grads, "packed_vs_alone_max_abs": worst,
                "logit_scale": scale, "curve": curve, "load_s": round(load_s, 1),
                "device": torch.cuda.get_device_name()}, out / f"{args.backend}.pt")
    print(json.dumps({"backend": args.backend, "loss": loss.item(), "packed_vs_alone_max_abs": worst,
                      "logit_scale": scale, "curve": curve}))


def timing(args) -> None:
    """Median train-step time of one backend per input layout and autocast setting (no Ray, no optimizer)."""
    import contextlib

    import torch

    from bench.train_gpu import base_config
    from orchestrator.core.config import set_fields
    from orchestrator.training.backends import make_backend

    cfg = set_fields(base_config(args.model, "qa", "unused.jsonl", 15, "/tmp/unused"),
                     {"train.backend": args.backend, "lora.dropout": 0.0})
    backend = make_backend(args.backend)
    device = torch.device("cuda:0")
    model = backend.load(cfg, device, None)
    module = backend.training_module(model, cfg)
    vocab = json.loads((Path(args.model) / "config.json").read_text())["vocab_size"]
    data = [{k: v.to(device) for k, v in b.items()} for b, _ in batches(vocab, 10, seed=2)]
    layouts = {
        "rows": lambda i: {"input_ids": data[0]["input_ids"], "labels": data[0]["input_ids"]},
        "packed-same": lambda i: data[0],
        "packed-varying": lambda i: data[i % len(data)],
    }
    out = {}
    for amp in (True, False):
        for name, make in layouts.items():
            times = []
            for i in range(10):
                torch.cuda.synchronize()
                t = time.perf_counter()
                ctx = torch.autocast("cuda", dtype=torch.bfloat16) if amp else contextlib.nullcontext()
                with ctx:
                    loss = backend.forward(module, make(i)).loss
                loss.backward()
                model.zero_grad(set_to_none=True)
                torch.cuda.synchronize()
                times.append(time.perf_counter() - t)
            key = f"{name}{'' if amp else '-noamp'}"
            out[key] = {"median_s": round(statistics.median(times[3:]), 4), "first_s": round(times[0], 3)}
            print(json.dumps({key: out[key]}), flush=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / f"timing_{args.backend}.json").write_text(json.dumps(out, indent=1))


def compare(args) -> None:
    import torch

    out = Path(args.out)
    ref = torch.load(out / "hf.pt", weights_only=False)
    report = {"device": ref["device"], "reference": "hf", "backends": {}}
    for f in sorted(out.glob("*.pt")):
        r = torch.load(f, weights_only=False)
        entry = {"loss": round(r["loss"], 6), "packed_vs_alone_max_abs_logit_diff": round(r["packed_vs_alone_max_abs"], 5),
                 **{k: round(v, 5) for k, v in r["logit_scale"].items()}, "curve": r["curve"], "load_s": r["load_s"]}
        if r["backend"] != "hf":
            common = sorted(set(r["grads"]) & set(ref["grads"]))
            cos, rel = [], []
            for n in common:
                a, b = r["grads"][n].flatten(), ref["grads"][n].flatten()
                cos.append(torch.nn.functional.cosine_similarity(a, b, dim=0).item())
                rel.append(((a - b).norm() / b.norm().clamp_min(1e-12)).item())
            entry.update(loss_abs_diff_vs_hf=round(abs(r["loss"] - ref["loss"]), 6),
                         grad_tensors_compared=len(common), grad_tensors_missing=len(ref["grads"]) - len(common),
                         grad_cosine_median=round(statistics.median(cos), 5), grad_cosine_min=round(min(cos), 5),
                         grad_rel_err_median=round(statistics.median(rel), 5), grad_rel_err_max=round(max(rel), 5),
                         curve_max_abs_diff_vs_hf=round(max(abs(x - y) for x, y in zip(r["curve"], ref["curve"],
                                                                                         strict=True)), 5))
        report["backends"][r["backend"]] = entry
    text = json.dumps(report, indent=1)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--model", required=True)
    r.add_argument("--backend", required=True, choices=["hf", "liger", "unsloth"])
    r.add_argument("--out", required=True)
    tm = sub.add_parser("time")
    tm.add_argument("--model", required=True)
    tm.add_argument("--backend", required=True, choices=["hf", "liger", "unsloth"])
    tm.add_argument("--out", required=True)
    c = sub.add_parser("compare")
    c.add_argument("--out", required=True)
    c.add_argument("--json")
    args = ap.parse_args()
    {"run": run, "time": timing, "compare": compare}[args.cmd](args)


if __name__ == "__main__":
    main()
