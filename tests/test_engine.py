"""The continuous-batching decode engine (serve/engine.py) on the CPU, driven directly (no Ray): greedy output
equals transformers' generate alone and when joining a batch mid-decode; EOS, max_tokens and stop strings
end a request exactly; cancellation frees the slot; more requests than slots all finish."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from serve.engine import Engine, Sampling


class Collector:
    """The events of one request, with a wait for its final event."""

    def __init__(self):
        self.events: list[dict] = []
        self.done = threading.Event()

    def __call__(self, ev: dict) -> None:
        self.events.append(ev)
        if "finish_reason" in ev:
            self.done.set()

    def result(self, timeout: float = 60) -> dict:
        assert self.done.wait(timeout), "request never finished"
        final = self.events[-1]
        return {**final, "text": "".join(e.get("text", "") for e in self.events[:-1])}


@pytest.fixture(scope="module")
def lm(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture()
def engine(lm):
    eng = Engine(*lm, slots=4, max_len=128)
    yield eng
    eng.shutdown()


def prompts(tok, n: int) -> list[list[int]]:
    texts = ["The Constitution of Nepal", "Article 16: Right to live with dignity. Every person shall have",
             "Fundamental rights", "The President shall be elected by an electoral college consisting of",
             "Citizenship", "The Federal Parliament shall consist of two Houses, namely the House of"]
    return [tok(texts[i % len(texts)], add_special_tokens=False)["input_ids"] for i in range(n)]


def reference(model, ids: list[int], new: int) -> list[int]:
    """transformers' greedy generate, EOS ignored (the tiny model may emit it anywhere)."""
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=new, min_new_tokens=new, do_sample=False, eos_token_id=None,
                             pad_token_id=0)
    return out[0, len(ids):].tolist()


def run(engine, ids, params, delay: float = 0.0):
    time.sleep(delay)
    c = Collector()
    seq = engine.submit(ids, params, c)
    return seq, c


def test_greedy_tokens_identical_alone_and_joining_a_running_batch(lm, engine):
    model, tok = lm
    engine.eos = set()  # decode exactly max_tokens, as the reference does
    ps = prompts(tok, 6)
    refs = [reference(model, p, 24) for p in ps]
    alone = []
    for p in ps[:2]:
        seq, c = run(engine, p, Sampling(max_tokens=24))
        c.result()
        alone.append(seq.tokens)
    assert alone == refs[:2]
    # six requests of different prompt lengths arrive while others decode: 4 slots, so two wait for a free one
    out: dict[int, tuple] = {}
    threads = [threading.Thread(target=lambda i=i: out.__setitem__(i, run(engine, ps[i], Sampling(max_tokens=24),
                                                                           0.02 * i))) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(6):
        seq, c = out[i]
        res = c.result()
        assert seq.tokens == refs[i], i
        assert res["finish_reason"] == "length" and res["completion_tokens"] == 24
        assert res["text"] == tok.decode(refs[i], skip_special_tokens=True)
    assert max(n for n, _ in engine.steps) > 1, "requests should have been decoded together"


def test_eos_max_tokens_and_stop_end_requests_exactly(lm, engine):
    model, tok = lm
    p = prompts(tok, 1)[0]
    ref = reference(model, p, 20)
    # EOS: make the 5th greedy token the end-of-sequence token
    engine.eos = {ref[4]}
    seq, c = run(engine, p, Sampling(max_tokens=20))
    res = c.result()
    assert res["finish_reason"] == "stop" and seq.tokens == ref[:4] and res["completion_tokens"] == 4
    engine.eos = set()
    seq, c = run(engine, p, Sampling(max_tokens=7))
    res = c.result()
    assert res["finish_reason"] == "length" and seq.tokens == ref[:7]
    full = tok.decode(ref, skip_special_tokens=True)
    stop = full[len(full) // 2: len(full) // 2 + 3]
    assert stop.strip(), full
    seq, c = run(engine, p, Sampling(max_tokens=20, stop=[stop]))
    res = c.result()
    assert res["finish_reason"] == "stop" and res["text"] == full[: full.index(stop)]
    assert stop not in res["text"] and len(seq.tokens) < 20


def test_cancel_frees_the_slot_and_no_request_waits_forever(lm):
    model, tok = lm
    engine = Engine(model, tok, slots=4, max_len=2048)
    engine.eos = set()
    ps = prompts(tok, 10)
    long = [run(engine, ps[i], Sampling(max_tokens=2000)) for i in range(4)]  # every slot taken, for seconds
    waiting = run(engine, ps[4], Sampling(max_tokens=5))
    time.sleep(0.3)
    assert not waiting[1].done.is_set() and engine.load()["waiting"] == 1
    long[0][0].cancel()  # the client went away: its slot goes to the waiting request
    assert long[0][1].result()["finish_reason"] == "cancelled"
    assert waiting[1].result()["finish_reason"] == "length"
    for seq, _ in long[1:]:
        seq.cancel()
    burst = [run(engine, p, Sampling(max_tokens=6)) for p in ps]  # 10 requests, 4 slots
    for _, c in burst:
        assert c.result()["completion_tokens"] == 6
    deadline = time.monotonic() + 10
    while engine.load()["active"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.load() == {"active": 0, "waiting": 0, "slots": 4}
    engine.shutdown()


def test_seeded_sampling_repeats_whatever_the_batch(lm, engine):
    _, tok = lm
    engine.eos = set()
    ps = prompts(tok, 4)
    params = Sampling(max_tokens=12, temperature=0.9, top_p=0.9, seed=7, repetition_penalty=1.2)
    seq, c = run(engine, ps[0], params)
    c.result()
    alone = seq.tokens
    others = [run(engine, p, Sampling(max_tokens=30, temperature=1.0)) for p in ps[1:]]
    time.sleep(0.05)
    seq, c = run(engine, ps[0], params)
    c.result()
    assert seq.tokens == alone
    for _, oc in others:
        oc.result()
    with pytest.raises(ValueError, match="exceeds the engine's 128 positions"):
        engine.submit(ps[0], Sampling(max_tokens=128), Collector())


def test_packed_prefill_equals_each_prompt_alone(lm):
    """Prompts packed into one prefill (each attending only to itself, padding in the spare row) give the same
    logits and KV cache as each prompt prefilled alone."""
    from serve.engine import _Decoder

    model, tok = lm
    ps = prompts(tok, 3)
    with torch.no_grad():
        packed = _Decoder(model, slots=3, max_len=64, use_kernels=False)
        width = sum(len(p) for p in ps) + 5
        together = packed.prefill(*packed.unpack(packed.pack(ps, [2, 0, 1], width=width, count=5), width))
        alone = _Decoder(model, slots=3, max_len=64, use_kernels=False)
        for j, (p, slot) in enumerate(zip(ps, [2, 0, 1], strict=True)):
            one = alone.prefill(*alone.unpack(alone.pack([p], [slot]), len(p)))
            assert torch.allclose(together[j], one[0], atol=1e-5)
            for cache_a, cache_b in zip(packed.k + packed.v, alone.k + alone.v, strict=True):
                assert torch.allclose(cache_a[slot, :, :len(p)], cache_b[slot, :, :len(p)], atol=1e-5)
    assert together.shape[0] == 5  # padded to the graph's prompt count
