"""QLoRA training throughput on one GPU: the seeds' recipe against the project's Ray Train path, side by side.

    python bench/make_model.py /tmp/llama7b                      # random 7B-shaped weights, saved locally
    python bench/train_gpu.py --model /tmp/llama7b --mix qa --steps 12 [--variants baseline project ...]
    python bench/train_gpu.py --model /tmp/llama7b --variants project project@2       # DDP scaling, 2 GPUs

Both load the same checkpoint through the 4-bit path (NF4, double quant, bf16 compute) with LoRA r=16 on all
linear layers and paged_adamw_32bit, on the same examples:

- ``qa``:   the constitution QA pairs made by the project's data pipeline (rule-based, train split);
- ``long``: documents of 1,024-2,048 tokens cut from the constitution's text.

``baseline`` is the seeds' way: transformers + peft + bitsandbytes in one process, no Ray, every example
padded to the max length, gradient checkpointing, micro-batch 4 (``baseline-amp``: the same inside bf16
autocast, as transformers' Trainer runs with ``bf16=True``; without it the fp32 layers that
prepare_model_for_kbit_training leaves keep the residual stream, and attention, in fp32). The ``project*`` variants run
``orchestrator.train.run_training`` (Ray Train, one GPU worker) with packing (no pad tokens) and the settings
named in VARIANTS. Reported per variant: median effective (non-pad) tokens/s and step time over the steps
after the first two, peak memory of the training steps (allocated and reserved; every variant and peer
resets the peak once its model is loaded, and the project's setup peak is kept as
``setup_peak_allocated_mb``), and MFU = 6 * N_active * tokens/s / peak bf16 FLOP/s + attention
(12 * layers * hidden * seq per token), N_active counting every base and LoRA weight in the forward and
backward pass (the frozen 4-bit weights take part in both); per GPU for multi-GPU runs.
Also per project variant: the share of step time a worker was blocked on the Ray Data stream
(``data_wait_fraction``) and the GPUs' busy fraction (``nvidia-smi`` utilization over the measured steps).
``project-<backend>[-mbN][-lenL]-graph`` (``-lenL``: packed rows of L slots) replays each packed micro-batch's forward and backward as one CUDA graph
(``train.cuda_graph``, Unsloth backend). ``project-<backend>[-mbN][-graph]-prof`` also profiles steps 6-8 (``train.profile_steps``): device busy fraction from
the trace, the longest idle gaps and the host op running when each began. ``VARIANT@N`` runs a project variant on N GPU workers (DDP, or DeepSpeed ZeRO-2/3 for ``project-zero2``/
``project-zero3``); with the 1-GPU variant (or ``project``) in the same run it reports scaling efficiency =
throughput(N) / (N * throughput(1)). Writes
bench/results/train_gpu_<mix>[_TAG].json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
PDF = ROOT / "data/constitution/constitution-of-nepal-2015-en.pdf"
PEAK_BF16 = {"H100": 989e12, "H200": 989e12}  # dense bf16 tensor-core peak of the SXM parts
MAXLEN = {"qa": 512, "long": 2048}
# project variants: config overrides on top of the shared base
VARIANTS = {
    "project-log1": {"train.micro_batch_size": 4, "train.gradient_checkpointing": True, "train.log_every": 1},
    "project": {"train.micro_batch_size": 4, "train.gradient_checkpointing": True},
    "project-mb8": {"train.micro_batch_size": 8, "train.gradient_checkpointing": True},
    "project-mb16": {"train.micro_batch_size": 16, "train.gradient_checkpointing": True},
    "project-nockpt": {"train.micro_batch_size": 4, "train.gradient_checkpointing": False},
    "project-mb2-nockpt": {"train.micro_batch_size": 2, "train.gradient_checkpointing": False},
    "project-mb1": {"train.micro_batch_size": 1, "train.gradient_checkpointing": True},
    # the training loss over labelled tokens only, 1,024 at a time through the LM head (orchestrator/loss.py)
    "project-chunked": {"train.micro_batch_size": 4, "train.gradient_checkpointing": True,
                        "train.loss_chunk_tokens": 1024},
    # DeepSpeed ZeRO instead of DDP (same loop, same micro-batch); ZeRO-3 partitions the packed 4-bit weights,
    # which needs them stored in the compute dtype
    "project-zero2": {"train.micro_batch_size": 4, "train.gradient_checkpointing": True,
                      "train.strategy": "deepspeed_zero2"},
    "project-chunked-zero2": {"train.micro_batch_size": 4, "train.gradient_checkpointing": True,
                              "train.loss_chunk_tokens": 1024, "train.strategy": "deepspeed_zero2"},
    "project-zero3": {"train.micro_batch_size": 4, "train.gradient_checkpointing": True,
                      "train.strategy": "deepspeed_zero3", "quantization.quant_storage": "bfloat16"},
}
PEERS = ("hf", "liger", "unsloth")  # bench/peer_qlora.py, one process each


def variant_overrides(name: str) -> dict:
    """A named variant, or ``project-<backend>[-mbN]``: train.backend (auto, hf, liger, unsloth) at micro-batch N
    (default 4), gradient checkpointing on."""
    if name in VARIANTS:
        return VARIANTS[name]
    m = re.fullmatch(r"project-(auto|hf|liger|unsloth)(?:-mb(\d+))?(?:-len(\d+))?(-graph)?(-prof)?", name)
    if not m:
        raise SystemExit(f"unknown variant {name!r}: one of {sorted(VARIANTS)}, project-<backend>[-mbN][-lenL][-graph][-prof], "
                         f"or a peer {PEERS}")
    prof = {"train.profile_steps": [6, 8]} if m[5] else {}  # torch.profiler over steps 6-8 of rank 0
    graph = {"train.cuda_graph": bool(m[4])}  # -graph: forward + backward replayed as one CUDA graph
    rows = {"data.max_seq_length": int(m[3])} if m[3] else {}  # packed rows of this many slots
    return {"train.backend": m[1], "train.micro_batch_size": int(m[2] or 4), "train.gradient_checkpointing": True,
            **rows, **graph, **prof}


def run_peer(variant: str, model: str, shapes: str, steps: int) -> dict:
    """One peer in its own process (Unsloth patches transformers process-wide); ``PEER-prof`` also profiles
    steps 6-8 of its first shape."""
    peer, _, prof = variant.partition("-")
    extra = ["--profile-dir", tempfile.mkdtemp(prefix="peer-profile-")] if prof == "prof" else []
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        proc = subprocess.run([sys.executable, str(ROOT / "bench/peer_qlora.py"), "--variant", peer, "--model",
                               model, "--shapes", shapes, "--steps", str(steps), "--out", f.name, *extra],
                              capture_output=True, text=True)
        if proc.returncode:
            return {"error": proc.stderr[-2000:]}
        return json.loads(Path(f.name).read_text())


def base_config(model: str, mix: str, data_file: str, steps: int, out: str):
    from orchestrator.core.config import validate_config

    return validate_config({
        "name": f"bench-{mix}", "model": {"name_or_path": model, "task": "causal_lm", "attn_implementation": "sdpa"},
        "quantization": {"bits": 4, "quant_type": "nf4", "double_quant": True, "compute_dtype": "bfloat16"},
        "lora": {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"},
        "data": {"format": "qa_jsonl", "train": [data_file], "max_seq_length": MAXLEN[mix], "packing": True,
                 "chat_template": "plain", "tokenize_actors": 2, "split_fractions": [0.98, 0.01, 0.01]},
        "train": {"max_steps": steps, "micro_batch_size": 4, "lr": 2e-4, "precision": "bf16",
                  "optimizer": "paged_adamw_32bit", "eval_every": 10_000, "warmup_ratio": 0.0, "log_every": 1000,
                  "gradient_checkpointing": True, "keep_checkpoints": 1},
        "scaling": {"num_workers": 1, "use_gpu": True}, "output_dir": out})


def examples(mix: str, tokenizer) -> list[dict[str, str]]:
    """QA pairs from the project's pipeline, or long documents cut from the constitution's text."""
    from orchestrator.core.config import validate_config
    from orchestrator.data.pipelines import causal_lm_rows

    cfg = validate_config({"name": "x", "model": {"name_or_path": "x"},
                           "data": {"format": "pdf", "train": [str(PDF)], "qa": {"kind": "rules"}}})
    splits, _, _ = causal_lm_rows(cfg)
    if mix == "qa":
        return splits["train"]
    text = "\n".join(p["answer"] for rows in splits.values() for p in rows)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    rng, docs, i = random.Random(0), [], 0
    while len(docs) < 400:
        n = rng.randint(1024 - 16, 2048 - 16)  # room for the template around the document
        if i + n > len(ids):
            i = rng.randint(0, 1000)
        docs.append({"question": "Continue the text.", "answer": tokenizer.decode(ids[i:i + n])})
        i += n
    return docs


def run_baseline(model_dir: str, rows: list[dict[str, str]], maxlen: int, steps: int, amp: bool = False) -> dict:
    """The seeds' recipe: pad to max length, gradient checkpointing, micro-batch 4, no Ray. ``amp``: bf16
    autocast around the forward pass, as transformers' Trainer does with ``bf16=True``."""
    import contextlib

    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    from orchestrator.data.tokenization import format_prompt_answer

    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.pad_token = tok.pad_token or tok.eos_token
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.bfloat16)
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=bnb, dtype=torch.bfloat16,
                                                 device_map={"": 0}, attn_implementation="sdpa")
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear",
                                             task_type="CAUSAL_LM"))
    model.train()
    load_s = time.perf_counter() - t0
    import bitsandbytes as bnb_optim

    opt = bnb_optim.optim.PagedAdamW32bit([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    texts = ["".join(format_prompt_answer(tok, r["question"], r["answer"], "plain")) for r in rows]
    random.Random(0).shuffle(texts)
    torch.cuda.reset_peak_memory_stats()
    times, toks = [], []
    for s in range(steps):
        batch = tok(texts[s * 4:(s + 1) * 4], padding="max_length", truncation=True, max_length=maxlen,
                    return_tensors="pt").to("cuda")
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16) if amp else contextlib.nullcontext():
            loss = model(**batch, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
        toks.append(int(batch["attention_mask"].sum()))
    res = summarize(times, toks)
    res.update(load_s=round(load_s, 1), peak_allocated_mb=round(torch.cuda.max_memory_allocated() / 2**20),
               peak_reserved_mb=round(torch.cuda.max_memory_reserved() / 2**20), micro_batch=4, padded_to=maxlen,
               gradient_checkpointing=True, packing=False, autocast_bf16=amp)
    del model, opt
    torch.cuda.empty_cache()
    return res


def summarize(times: list[float], toks: list[int]) -> dict:
    t, n = times[2:], toks[2:]
    per_step = [k / s for k, s in zip(n, t, strict=True)]
    return {"steps_measured": len(t), "median_step_s": round(statistics.median(t), 4),
            "median_tokens_per_s": round(statistics.median(per_step), 1),
            "mean_real_tokens_per_step": round(statistics.mean(n), 1)}


class GpuSampler:
    """``nvidia-smi`` utilization (share of time a kernel ran) per GPU, sampled every 200 ms."""

    def __init__(self):
        import threading

        self.samples: list[tuple[float, list[float]]] = []
        self.proc = None
        try:
            self.proc = subprocess.Popen(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                                          "-lms", "200"], stdout=subprocess.PIPE, text=True)
        except OSError:
            return
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        rows: list[float] = []
        n = len(subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True).stdout.splitlines())
        for line in self.proc.stdout:
            rows.append(float(line.strip() or 0))
            if len(rows) == n:
                self.samples.append((time.time(), rows))
                rows = []

    def busy(self, start: float, end: float, gpus: int) -> float | None:
        vals = [statistics.mean(r[:gpus]) for t, r in self.samples if start <= t <= end]
        return round(statistics.mean(vals) / 100, 3) if vals else None

    def stop(self):
        if self.proc:
            self.proc.terminate()


def run_project(cfg, prepared, sampler: GpuSampler | None = None) -> dict:
    from orchestrator.training.train import run_training

    res = run_training(cfg, prepared=prepared)
    hist = res.history  # step_time_s: wall time since the previous step's metrics (data wait included)
    n = cfg.scaling.num_workers
    out = summarize([h["step_time_s"] for h in hist], [h["real_tokens"] for h in hist])
    measured = hist[2:]
    out.update(workers=n, gpus=n, median_tokens_per_s_per_gpu=round(out["median_tokens_per_s"] / n, 1),
               peak_allocated_mb=round(max(h["peak_memory_mb"] for h in hist)),
               peak_reserved_mb=round(max(h.get("peak_reserved_mb", 0) for h in hist)),
               setup_peak_allocated_mb=round(hist[0].get("setup_peak_memory_mb", 0)),
               data_wait_fraction=round(sum(h["data_wait_s"] for h in measured)
                                        / sum(h["step_time_s"] for h in measured), 4),
               micro_batch=cfg.train.micro_batch_size, gradient_checkpointing=cfg.train.gradient_checkpointing,
               packing=cfg.data.packing, max_seq_length=cfg.data.max_seq_length)
    prof = Path(cfg.run_dir) / "profile" / "summary.json"
    if prof.is_file():  # train.profile_steps: device busy and idle gaps from torch.profiler's trace
        out["profile"] = json.loads(prof.read_text())
    if sampler:  # GPU busy over the measured steps (rank 0's clock; one host)
        out["gpu_busy_fraction"] = sampler.busy(measured[0]["timestamp"] - measured[0]["step_time_s"],
                                                measured[-1]["timestamp"], n)
    return out


def mfu(tokens_per_s: float, cfg_json: dict, n_params: float, gpu: str, seq: int) -> float | None:
    peak = next((v for k, v in PEAK_BF16.items() if k in gpu), None)
    if not peak:
        return None
    flops_per_token = 6 * n_params + 12 * cfg_json["num_hidden_layers"] * cfg_json["hidden_size"] * seq
    return round(flops_per_token * tokens_per_s / peak, 4)


def parameters(c: dict) -> float:
    """The model's weights from its config.json: embeddings, head, and per layer attention, MLP and norms."""
    h, layers, inter, vocab = c["hidden_size"], c["num_hidden_layers"], c["intermediate_size"], c["vocab_size"]
    heads, kv = c["num_attention_heads"], c.get("num_key_value_heads") or c["num_attention_heads"]
    d = c.get("head_dim") or h // heads
    per_layer = 2 * h * heads * d + 2 * h * kv * d + 3 * h * inter + 2 * h
    return vocab * h * (1 if c.get("tie_word_embeddings") else 2) + layers * per_layer + h


def bench_commit() -> str:
    """The commit measured: ``BENCH_COMMIT`` where the machine's copy of the repository is not the commit's own
    checkout (its git metadata can be older than the files that travelled), else ``git rev-parse``."""
    return os.environ.get("BENCH_COMMIT") or subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()


def write_results(args, results: dict, rows: int, cfg_json: dict, gpu: str) -> Path:
    """Derived figures (MFU, ratios to Unsloth at the same shape and at its best, scaling) and the JSON,
    rewritten after every variant so that a run stopped midway keeps what it measured."""
    import ray
    import torch

    n_params = parameters(cfg_json)
    peer_shapes = {k: pr for k, pr in results.items()  # Unsloth's measured shapes of this run
                   if re.fullmatch(r"unsloth-\d+x\d+", k) and "median_tokens_per_s_per_gpu" in pr}
    # the headline ratio's reference: the peer at its best setting
    best = max(peer_shapes.values(), key=lambda pr: pr["median_tokens_per_s_per_gpu"], default=None)
    for v, r in results.items():
        if "error" in r or "oom" in r:
            continue
        seq = r.get("padded_to") or r.get("max_seq_length")
        per_gpu = r.get("median_tokens_per_s_per_gpu", r.get("median_tokens_per_s"))
        r["mfu"] = mfu(per_gpu, cfg_json, n_params, gpu, seq) if n_params else None
        # Unsloth at the same tokens per step: the same shape, else the same slots (rows of 8,192 x 1 vs 2,048 x 4)
        slots = (seq or 0) * (r.get("micro_batch") or 0)
        same = peer_shapes.get(f"unsloth-{seq}x{r.get('micro_batch')}") or next(
            (pr for pr in peer_shapes.values()
             if pr.get("max_seq_length", 0) * pr.get("micro_batch", 0) == slots), None)
        if v.startswith("project") and same:
            r["tokens_per_s_vs_unsloth"] = round(per_gpu / same["median_tokens_per_s_per_gpu"], 3)
            r["peak_allocated_vs_unsloth"] = round(r["peak_allocated_mb"] / same["peak_allocated_mb"], 3)
        if v.startswith("project") and best:
            r["unsloth_best_shape"] = f"{best['max_seq_length']}x{best['micro_batch']}"
            r["tokens_per_s_vs_unsloth_best"] = round(per_gpu / best["median_tokens_per_s_per_gpu"], 3)
        if "baseline" in results:
            r["tokens_per_s_vs_baseline"] = round(per_gpu / results["baseline"]["median_tokens_per_s"], 3)
        # scaling efficiency = throughput(n) / (n * throughput(1)), same run, same host; throughput(1): the same
        # variant on one GPU if it ran, else the run's first 1-GPU project variant (DDP on one GPU is no
        # wrapper at all)
        single = [k for k in results if k.startswith("project") and "@" not in k and "error" not in results[k]]
        ref = v.partition("@")[0] if v.partition("@")[0] in single else (single[0] if single else None)
        if "@" in v and ref:
            r["scaling_efficiency"] = round(per_gpu / results[ref]["median_tokens_per_s_per_gpu"], 3)
            r["scaling_reference"] = ref
    out = {"command": "python bench/train_gpu.py " + " ".join(sys.argv[1:]), "device": gpu,
           "commit": bench_commit(),
           "host": platform.node(), "gpus": torch.cuda.device_count(), "versions": {"torch": torch.__version__, "ray": ray.__version__},
           "model": {k: cfg_json.get(k) for k in ("model_type", "hidden_size", "num_hidden_layers",
                                                   "num_attention_heads", "num_key_value_heads", "head_dim",
                                                   "intermediate_size", "vocab_size")} | {"parameters": n_params},
           "mix": args.mix, "examples": rows, "steps": args.steps, "results": results}
    path = ROOT / f"bench/results/train_gpu_{args.mix}{('_' + args.tag) if args.tag else ''}.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    if os.environ.get("OUT"):  # a GPU machine's outputs folder: the file comes back from there
        (Path(os.environ["OUT"]) / path.name).write_text(json.dumps(out, indent=2) + "\n")
    return path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--mix", choices=list(MAXLEN), default="qa")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--variants", nargs="+", default=["baseline", "project"])
    ap.add_argument("--tag", default="")
    ap.add_argument("--peer-shapes", default=None, help="SEQxBATCH,... for the peers (default: the mix's length "
                    "at micro-batch 4 and 8)")
    args = ap.parse_args()
    import torch
    from transformers import AutoTokenizer

    from orchestrator.core.runtime import init_ray
    from orchestrator.data.prepare import prepare_data

    gpu = torch.cuda.get_device_name(0)
    init_ray()
    tok = AutoTokenizer.from_pretrained(args.model)
    rows = examples(args.mix, tok)
    work = Path(tempfile.mkdtemp(prefix="bench-"))
    data_file = work / "train.jsonl"
    data_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg_json = json.loads((Path(args.model) / "config.json").read_text())
    results = {}
    prepared = None
    sampler = GpuSampler()
    for v in args.variants:
        t0 = time.perf_counter()
        if v in ("baseline", "baseline-amp"):
            r = run_baseline(args.model, rows, MAXLEN[args.mix], args.steps, amp=v == "baseline-amp")
        elif v.removesuffix("-prof") in PEERS:  # keyed by peer name at the first shape, by peer-SHAPE for each
            shapes = args.peer_shapes or f"{MAXLEN[args.mix]}x4,{MAXLEN[args.mix]}x8"
            peer = run_peer(v, args.model, shapes, args.steps - 2)
            for shape, pr in peer.get("runs", {}).items():
                seq, bs = map(int, shape.split("x"))
                pr.update(peer=v, micro_batch=bs, max_seq_length=seq, load_s=peer["load_s"], versions=peer["versions"])
                results[f"{v}-{shape}"] = pr
            r = dict(results.get(f"{v}-{shapes.split(',')[0]}") or {"error": peer.get("error", "no runs")})
        else:
            from orchestrator.core.config import set_fields

            name, _, workers = v.partition("@")  # project-mb8@2: the variant on 2 GPU workers (DDP)
            cfg = set_fields(base_config(args.model, args.mix, str(data_file), args.steps, str(work)),
                             {"name": f"bench-{args.mix}-{v.replace('@', '-x')}", **variant_overrides(name),
                              "scaling.num_workers": int(workers or 1)})
            prepared = prepared or prepare_data(cfg)
            try:
                r = run_project(cfg, prepared, sampler)
            except Exception as e:  # record it and go on with the other variants
                r = {"error": f"{type(e).__name__}: {str(e)[-2000:]}"}
        r["wall_s"] = round(time.perf_counter() - t0, 1)
        results[v] = r
        print(json.dumps({v: r}), flush=True)
        path = write_results(args, results, len(rows), cfg_json, gpu)
    sampler.stop()
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
