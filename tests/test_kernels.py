"""The engine's Triton step (serve/kernels.py), run on the CPU by Triton's interpreter: each kernel against PyTorch
(paged attention over blocks with grouped-query heads and sliding windows, rotary with q/k norms and the cache
write, the fused norms, GELU-tanh and SiLU, the LoRA segments, the batch-invariant matmul), and the engine on it
decoding greedily token for token as transformers' generate does, for the families with their own attention
pieces and for LoRA adapters mixed in one step; and the training step's loss kernel (orchestrator/training/kernels.py)
against PyTorch and cross-entropy."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

KERNELS = textwrap.dedent("""
    import torch, torch.nn.functional as F
    from serve import kernels

    torch.manual_seed(0)
    H, KVH, D, BS = 4, 2, 32, 8
    # a cache of 12 blocks; two sequences: row 0 holds blocks [3, 7, 1], row 1 holds [5, 2]
    k_cache, v_cache = torch.randn(12, KVH, BS, D), torch.randn(12, KVH, BS, D)
    table = torch.tensor([[3, 7, 1], [5, 2, 0]], dtype=torch.int32)
    # tokens: seq 0 decodes at position 20; seq 1 prefills positions 9..14 (two tiles)
    pos = torch.tensor([20, 9, 10, 11, 12, 13, 14, 0])
    row = [0, 1, 1, 1, 1, 1, 1, 0]
    q = torch.randn(8, H, D)

    def reference(window):
        out = torch.zeros_like(q)
        for t in range(7):
            blocks = table[row[t]].tolist()
            k = torch.cat([k_cache[b] for b in blocks], 1)[:, : pos[t] + 1]
            v = torch.cat([v_cache[b] for b in blocks], 1)[:, : pos[t] + 1]
            kp = torch.arange(pos[t] + 1)
            mask = (kp > pos[t] - window) if window else torch.ones_like(kp, dtype=torch.bool)
            o = F.scaled_dot_product_attention(q[t][None, :, None], k[None], v[None], attn_mask=mask[None, None, None],
                                               scale=0.3, enable_gqa=True)
            out[t] = o[0, :, 0]
        return out

    tiles = [torch.tensor(x) for x in ([0, 1, 1, 0, 0, 0, 0, 0], [0, 1, 5, 0, 0, 0, 0, 0], [1, 4, 2, 0, 0, 0, 0, 0])]
    for window in (0, 6):
        got = kernels.paged_attention(q, k_cache, v_cache, table, *tiles, pos, 0.3, window, tile=4)
        err = (got[:7] - reference(window)[:7]).abs().max().item()
        assert err < 1e-4, ("attention", window, err)

    # rotary + q/k RMSNorm (both roundings) + the cache write at each token's slot
    T = 3
    qkv = torch.randn(T, (H + 2 * KVH) * D)
    cos, sin = torch.randn(40, D), torch.randn(40, D)
    p, slot = torch.tensor([3, 17, 5]), torch.tensor([3 * BS + 2, 7 * BS + 5, 4 * BS])
    qn, kn = torch.randn(D), torch.randn(D)
    for gemma in (False, True):
        kc, vc = torch.zeros(12, KVH, BS, D), torch.zeros(12, KVH, BS, D)
        qo = kernels.rope_write(qkv, cos, sin, p, slot, kc, vc, H, KVH, qn, kn, 1e-6, gemma)
        x = qkv.view(T, H + 2 * KVH, D)
        def norm(y, w):
            r = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + 1e-6)
            return r * (1 + w) if gemma else r * w
        def rope(y):
            c, s = cos[p][:, None], sin[p][:, None]
            return y * c + torch.cat((-y[..., D // 2:], y[..., : D // 2]), -1) * s
        assert (qo - rope(norm(x[:, :H], qn))).abs().max() < 1e-4
        kk, vv = rope(norm(x[:, H:H + KVH], kn)), x[:, H + KVH:]
        for t in range(T):
            b, o = slot[t] // BS, slot[t] % BS
            assert (kc[b, :, o] - kk[t]).abs().max() < 1e-4 and (vc[b, :, o] - vv[t]).abs().max() < 1e-6

    # residual add (+ a post norm) and the next RMSNorm; activations
    h, d, w1, w2 = torch.randn(5, 48), torch.randn(5, 48), torch.randn(48), torch.randn(48)
    for gemma in (False, True):
        def n(y, w):
            r = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + 1e-6)
            return r * (1 + w) if gemma else r * w
        hh = h.clone()
        out = kernels.norm_add(hh, d, w2, 1e-6, gemma, post=w1)
        assert (hh - (h + n(d, w1))).abs().max() < 1e-5 and (out - n(h + n(d, w1), w2)).abs().max() < 1e-4
    gu = torch.randn(3, 2 * 40)
    assert (kernels.act_mul(gu, "silu") - F.silu(gu[:, :40]) * gu[:, 40:]).abs().max() < 1e-5
    assert (kernels.act_mul(gu, "gelu_tanh") - F.gelu(gu[:, :40], approximate="tanh") * gu[:, 40:]).abs().max() < 1e-5

    # LoRA segments: tokens 0, 3 use slot 1; token 2 slot 0; token 1 none
    x, y = torch.randn(4, 64), torch.randn(4, 96)
    a_pool, b_pool = torch.randn(2, 16, 64), torch.randn(2, 96, 16)
    perm, seg = torch.tensor([2, 0, 3, 0]), torch.tensor([0, 1, 3])
    s = kernels.lora_shrink(x, a_pool)
    want = y.clone()
    for t, slot_ in ((0, 1), (2, 0), (3, 1)):
        want[t] += x[t] @ a_pool[slot_].T @ b_pool[slot_].T
    got = kernels.lora_expand(s, b_pool, perm, seg, y.clone())
    assert (got - want).abs().max() < 1e-3, (got - want).abs().max()

    # the batch-invariant matmul: a row's result is bit for bit the same whatever the other rows
    a, w, bias = torch.randn(37, 96), torch.randn(80, 96), torch.randn(80)
    full = kernels.matmul(a, w, bias)
    assert (full - (a @ w.T + bias)).abs().max() < 1e-3
    assert torch.equal(kernels.matmul(a[5:6], w, bias), full[5:6]) and torch.equal(kernels.matmul(a[:9], w, bias), full[:9])
    print("kernels match")
""")

ENGINE = textwrap.dedent("""
    import sys, torch
    from serve.engine import Engine, Sampling
    from tests.tiny_families import CharTokenizer, make, prompts, random_adapters, reference, run_all

    ps = prompts(3)
    for family in ("mistral", "qwen3", "gemma3"):
        model = make(family, torch.float32)
        refs = [reference(model, p, 12) for p in ps]
        eng = Engine(model, CharTokenizer(), max_seqs=3, max_len=64, block_size=8, prefill_chunk=10, use_kernels=True)
        assert eng.kernels
        eng.eos = set()
        got = [s.tokens for s in run_all(eng, [(p, Sampling(max_tokens=12), None) for p in ps])]
        eng.shutdown()
        assert got == refs, (family, got, refs)
    print("families match generate")

    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    out = sys.argv[1]
    make("llama3", torch.float32).save_pretrained(out + "/base")
    paths = random_adapters(out + "/base", out, torch.float32)
    refs = {}
    for name, path in paths.items():
        merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(out + "/base"), path)
        refs[name] = [reference(merged.merge_and_unload().eval(), p, 10) for p in ps[:2]]
    eng = Engine(AutoModelForCausalLM.from_pretrained(out + "/base").eval(), CharTokenizer(), max_seqs=6, max_len=64,
                 block_size=8, use_kernels=True, adapters=paths, max_adapters=3)
    eng.eos = set()
    jobs = [(p, Sampling(max_tokens=10), name) for name in paths for p in ps[:2]]
    got = [s.tokens for s in run_all(eng, jobs)]
    eng.shutdown()
    assert got == [refs[name][i] for name in paths for i in range(2)], got
    print("adapters match merged")

    model = make("qwen3", torch.float32)
    eng = Engine(model, CharTokenizer(), max_seqs=4, max_len=64, block_size=8, use_kernels=True, batch_invariant=True)
    eng.eos = set()
    alone = run_all(eng, [(ps[2], Sampling(max_tokens=10), None)])[0].tokens
    mixed = run_all(eng, [(p, Sampling(max_tokens=10), None) for p in (ps[1], ps[2], ps[0])])[1].tokens
    eng.shutdown()
    assert alone == mixed, (alone, mixed)
    print("batch invariant")
""")

LOSS = textwrap.dedent("""
    import torch
    from orchestrator.training import kernels
    from orchestrator.training.step_graph import ChunkedCrossEntropy

    torch.manual_seed(0)
    V = 50
    for dtype in (torch.float32, torch.bfloat16):
        for block in (None, 16):  # one pass over the row, or four with a masked tail
            logits = (torch.randn(9, V) * 4).to(dtype)
            labels = torch.randint(0, V, (9,))
            labels[::3] = -100
            n = (labels != -100).sum()
            got, ref = logits.clone(), logits.clone()
            loss = kernels.cross_entropy_grad_(got, labels, n, block=block)
            ref_loss = kernels._torch_cross_entropy_grad_(ref, labels, n)
            assert torch.allclose(loss, ref_loss, atol=1e-5), (loss, ref_loss)
            assert (loss[::3] == 0).all() and (got[::3] == 0).all()  # unlabelled rows: no loss, no gradient
            ulp = 2.0 ** -10 if dtype == torch.bfloat16 else 1e-7  # rounding of a gradient below 0.25 to bf16
            assert (got.float() - ref.float()).abs().max() <= ulp, (got - ref).abs().max()

    hidden = torch.randn(37, 16, requires_grad=True)
    head = torch.randn(V, 16)  # frozen, as in a LoRA run: the kernel turns each chunk's logits into the gradient
    labels = torch.randint(0, V, (37,))
    labels[::4] = -100
    ref = torch.nn.functional.cross_entropy(hidden @ head.t(), labels)
    (ref_grad,) = torch.autograd.grad(ref, hidden)
    got = ChunkedCrossEntropy.apply(hidden, head, labels, 8)
    (grad,) = torch.autograd.grad(got, hidden)
    assert abs(got.item() - ref.item()) < 1e-5 and torch.allclose(grad, ref_grad, atol=1e-6)
    print("loss kernel matches")
""")


def _interpret(script: str, *args: str) -> str:
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", script, *args], env=env, cwd=ROOT, capture_output=True, text=True,
                         timeout=900)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    return out.stdout


def test_triton_kernels_match_pytorch():
    assert "kernels match" in _interpret(KERNELS)


def test_triton_engine_matches_generate_for_families_adapters_and_batch_invariance(tmp_path):
    out = _interpret(ENGINE, str(tmp_path))
    assert "families match generate" in out and "adapters match merged" in out and "batch invariant" in out


def test_the_training_loss_kernel_matches_pytorch_and_cross_entropy():
    assert "loss kernel matches" in _interpret(LOSS)
