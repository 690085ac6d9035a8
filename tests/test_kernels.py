"""The engine's Triton decode step (serve/kernels.py), run on the CPU by Triton's interpreter: its logits and
KV cache match the PyTorch step's (grouped-query attention, rows of different lengths), and the engine on it
decodes greedily token for token as transformers' generate does, alone and joining a running batch (one
into a slot freed while the batch decodes)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent("""
    import sys, threading, torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM
    from serve.engine import Engine, Sampling, _Decoder

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        fast = _Decoder(model, slots=3, max_len=64, use_kernels=True)
        slow = _Decoder(model, slots=3, max_len=64, use_kernels=False)
        assert fast.kernels and not slow.kernels and fast.gqa
        lengths = torch.tensor([5, 1, 11])
        ids = torch.randint(0, 97, (3, 11))
        prompts = [ids[i, :lengths[i]].tolist() for i in range(3)]
        for dec in (fast, slow):
            dec.prefill(*dec.unpack(dec.pack(prompts, [0, 1, 2], width=20, count=4), 20))  # padded packing
        pos, tok, worst = lengths.clone(), ids[torch.arange(3), lengths - 1], 0.0
        for _ in range(6):
            a, b = fast.decode(tok, pos, 64), slow.decode(tok, pos, 64)
            worst = max(worst, (a - b).abs().max().item())
            tok, pos = b.argmax(-1), pos + 1
        kv = max((x[:, :, :17] - y[:, :, :17]).abs().max().item() for x, y in zip(fast.k + fast.v, slow.k + slow.v))
        print("logits", worst, "kv", kv)
        assert worst < 1e-4 and kv < 1e-5, (worst, kv)
        fast.attention = {"chunk": 4, "block": 4}  # split over positions, merged by the second kernel
        for _ in range(3):
            a, b = fast.decode(tok, pos, 64), slow.decode(tok, pos, 64)
            assert (a - b).abs().max().item() < 1e-4
            tok, pos = b.argmax(-1), pos + 1

    model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(sys.argv[1])
    # the first ends first; the third, longer than the first's last position, joins into its freed slot (row 0,
    # which rides along in that decode step while row 1 decodes)
    texts = ["Citizenship", "The Constitution of Nepal",
             "The Federal Parliament shall consist of two Houses, namely the House of Representatives and the "
             "National Assembly. Article 16: Right to live with dignity"]
    prompts = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    with torch.no_grad():
        refs = [model.generate(torch.tensor([p]), max_new_tokens=12, min_new_tokens=12, do_sample=False,
                               eos_token_id=None, pad_token_id=0)[0, len(p):].tolist() for p in prompts]
    eng = Engine(model, tok, slots=2, max_len=64, use_kernels=True)  # the third prompt reuses a freed slot
    assert eng.dec.kernels
    eng.eos = set()
    seqs, done = [], []
    for i, p in enumerate(prompts):
        ev = threading.Event()
        seqs.append(eng.submit(p, Sampling(max_tokens=5 if i == 0 else 12),
                               lambda e, ev=ev: "finish_reason" in e and ev.set()))
        done.append(ev)
        if i == 0:  # the others join while the first is decoding
            while len(seqs[0].tokens) < 2:
                threading.Event().wait(0.01)
    for ev in done:
        assert ev.wait(120), "request never finished"
    eng.shutdown()
    for s, r in zip(seqs, refs):
        assert s.tokens == r[:len(s.tokens)] and len(s.tokens) == s.params.max_tokens, (s.tokens, r)
    print("engine tokens match generate")
""")


def test_triton_decode_step_matches_pytorch_and_generate(tiny_model_dir):
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(tiny_model_dir)], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    assert "engine tokens match generate" in out.stdout
