"""The continuous-batching decode engine (serve/engine.py) on the CPU's PyTorch step, driven directly (no Ray):
greedy output equals transformers' generate alone, joining a batch mid-decode, prefilled in chunks over paged
blocks, for every family it implements, through the prefix cache, after preemption, and for LoRA adapters mixed
in one step; EOS, max_tokens and stop strings end a request exactly; cancellation frees its blocks."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from serve.engine import Engine, Sampling
from tests.tiny_families import FAMILIES, CharTokenizer, make, random_adapters, reference, run_all
from tests.tiny_families import prompts as family_prompts


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
    eng = Engine(*lm, max_seqs=4, max_len=128)
    yield eng
    eng.shutdown()


def prompts(tok, n: int) -> list[list[int]]:
    texts = ["The Constitution of Nepal", "Article 16: Right to live with dignity. Every person shall have",
             "Fundamental rights", "The President shall be elected by an electoral college consisting of",
             "Citizenship", "The Federal Parliament shall consist of two Houses, namely the House of"]
    return [tok(texts[i % len(texts)], add_special_tokens=False)["input_ids"] for i in range(n)]


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


def test_stream_items_stay_within_the_replica_budget_and_carry_the_same_text(lm):
    """stream_items_per_s spreads one budget over the running streams: each gets fewer, larger items, first piece
    at once, and the same text as a stream with an item per token."""
    model, tok = lm
    texts, counts = {}, {}
    for budget in (0.0, 4.0):
        engine = Engine(model, tok, max_seqs=4, max_len=128, stream_items_per_s=budget)
        engine.eos = set()
        try:
            t0 = time.perf_counter()
            runs = [run(engine, p, Sampling(max_tokens=32)) for p in prompts(tok, 4)]
            results = [c.result() for _, c in runs]
            elapsed = time.perf_counter() - t0
        finally:
            engine.shutdown()
        texts[budget] = [r["text"] for r in results]
        counts[budget] = [sum("text" in e for e in c.events) for _, c in runs]
        assert all(c.events[0].get("text") for _, c in runs)  # the first piece is not held back
    assert texts[4.0] == texts[0.0]
    assert min(counts[0.0]) >= 16, counts  # one item per token (whole characters) without a budget
    # items at least 1/4 s apart (with one stream left; 1 s while four run), plus the first and the last flush
    assert max(counts[4.0]) <= 2 + elapsed * 4, (counts, elapsed)


def test_cancel_frees_the_slot_and_no_request_waits_forever(lm):
    model, tok = lm
    engine = Engine(model, tok, max_seqs=4, max_len=2048)
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
    assert engine.load() == {"active": 0, "waiting": 0, "slots": 4, "blocks_free": 4}
    engine.shutdown()


def test_idle_time_counts_the_stretch_going_on_and_stops_while_a_request_runs(lm):
    model, tok = lm
    engine = Engine(model, tok, max_seqs=4, max_len=2048)
    time.sleep(0.3)  # nothing submitted yet: the engine is idle now, and its stats say so before anything arrives
    first = engine.stats()["idle_s"]
    assert first >= 0.25
    time.sleep(0.2)
    assert engine.stats()["idle_s"] >= first + 0.15
    engine.eos = set()
    seq, c = run(engine, prompts(tok, 1)[0], Sampling(max_tokens=2000))
    time.sleep(0.3)
    busy = engine.stats()["idle_s"]
    time.sleep(0.2)
    assert not c.done.is_set() and engine.stats()["idle_s"] - busy < 0.05  # decoding: no idle time added
    seq.cancel()
    assert c.result()["finish_reason"] == "cancelled"
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


def test_chunked_prefill_over_paged_blocks_gives_the_same_tokens(lm):
    """Blocks of 8 positions taken as sequences grow, prompts prefilled 5 tokens a step beside running decodes."""
    model, tok = lm
    ps = prompts(tok, 6)
    refs = [reference(model, p, 20) for p in ps]
    engine = Engine(model, tok, max_seqs=3, max_len=128, block_size=8, prefill_chunk=5)
    engine.eos = set()
    seqs = run_all(engine, [(p, Sampling(max_tokens=20), None) for p in ps])
    engine.shutdown()
    assert [s.tokens for s in seqs] == refs
    st = engine.stats()
    assert st["block_size"] == 8 and st["blocks_free"] == st["blocks"], st  # every block back


def test_a_burst_of_prompts_fills_max_prefill_while_a_long_one_stays_in_chunks(lm):
    """While others decode, each prompt gets at most prefill_chunk tokens of a step, and many prompts share a step
    up to max_prefill: a burst of short prompts is prefilled in few steps, a long prompt in chunks; tokens unchanged."""
    model, tok = lm
    short = prompts(tok, 5)
    long = sum(prompts(tok, 6), [])[:60]
    refs = [reference(model, p, 12) for p in [short[0], long, *short[1:]]]
    engine = Engine(model, tok, max_seqs=6, max_len=128, block_size=8, prefill_chunk=10, max_prefill=40)
    engine.eos = set()
    steps: list[tuple[int, list[int]]] = []  # (decoding sequences, prompt tokens of each sequence) per step
    launch = engine._launch

    def recording(decode, chunks):
        steps.append((len(decode), [n for _, _, n in chunks]))
        return launch(decode, chunks)

    engine._launch = recording
    first, c0 = run(engine, short[0], Sampling(max_tokens=12))
    while not first.tokens:
        time.sleep(0.005)
    with engine.cv:  # the rest arrive together while the first decodes
        seqs = [run(engine, p, Sampling(max_tokens=12)) for p in [long, *short[1:]]]
    [c.result() for _, c in seqs]
    c0.result()
    engine.shutdown()
    assert [first.tokens, *[s.tokens for s, _ in seqs]] == refs
    mixed = [chunks for n_dec, chunks in steps if n_dec and chunks]
    assert mixed and all(n <= 10 for chunks in mixed for n in chunks), steps  # one prompt: a chunk a step
    assert max(sum(chunks) for chunks in mixed) > 10, steps  # several prompts share a step
    assert all(sum(chunks) <= 40 for _, chunks in steps), steps
    assert sum(1 for chunks in mixed if 10 in chunks) >= 5, steps  # the long prompt took several steps


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_decodes_as_transformers_does(family):
    """Llama 3 rope scaling, Mistral's sliding window, Qwen 2 biases, Qwen 3 q/k norms, Gemma 3's norms, GELU,
    embedding scale and interleaved local/global layers: greedy tokens equal generate's, prompts joining together."""
    model = make(family)
    ps = family_prompts(4)
    refs = [reference(model, p, 24) for p in ps]
    for block_size in (None, 8):
        engine = Engine(model, CharTokenizer(), max_seqs=4, max_len=96, block_size=block_size, prefill_chunk=10)
        engine.eos = set()
        seqs = run_all(engine, [(p, Sampling(max_tokens=24), None) for p in ps])
        engine.shutdown()
        assert [s.tokens for s in seqs] == refs, (family, block_size)


def test_prefix_cache_shares_blocks_and_keeps_outputs(lm):
    """Prompts sharing a 48-token prefix: later ones reuse its blocks (hits on the stats), tokens unchanged."""
    model, tok = lm
    head = tok("Article 16: Right to live with dignity. Every person shall have the right to live with "
               "dignity. No law shall be made providing for the death penalty to any one. Article 17",
               add_special_tokens=False)["input_ids"][:48]
    ps = [head + p for p in prompts(tok, 4)]
    refs = [reference(model, p, 12) for p in ps]
    for caching in (True, False):
        engine = Engine(model, tok, max_seqs=4, max_len=128, block_size=8, prefix_caching=caching)
        engine.eos = set()
        first = run_all(engine, [(ps[0], Sampling(max_tokens=12), None)])
        rest = run_all(engine, [(p, Sampling(max_tokens=12), None) for p in ps[1:]])
        st = engine.stats()
        engine.shutdown()
        assert [s.tokens for s in first + rest] == refs, caching
        assert (st["prefix_hits"] >= 3 * (48 // 8)) == caching, st
        assert (st["prefix_hit_rate"] > 0) == caching


def test_preemption_when_the_cache_runs_out(lm):
    """Eight blocks of 8 positions for four sequences that need five each: the newest give theirs back and are
    recomputed later; every request still gets generate's tokens."""
    model, tok = lm
    ps = prompts(tok, 4)
    refs = [reference(model, p, 24) for p in ps]
    engine = Engine(model, tok, max_seqs=4, max_len=64, block_size=8, num_blocks=10)
    engine.eos = set()
    seqs = run_all(engine, [(p, Sampling(max_tokens=24), None) for p in ps])
    st = engine.stats()
    engine.shutdown()
    assert [s.tokens for s in seqs] == refs
    assert st["preemptions"] > 0 and st["blocks_free"] == st["blocks"], st


def test_lora_adapters_mixed_in_one_step_equal_each_merged(tmp_path):
    """Three adapters (different ranks and targets) and the base itself in the same steps, two adapter slots (one
    evicted and reloaded): each request's greedy tokens equal its adapter merged into the base by peft."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = make("qwen3")
    base.save_pretrained(tmp_path / "base")
    paths = random_adapters(tmp_path / "base", tmp_path)
    ps = family_prompts(3)
    refs = {None: [reference(base, p, 16) for p in ps]}
    for name, path in paths.items():
        merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float64),
                                           path).merge_and_unload().eval()
        refs[name] = [reference(merged, p, 16) for p in ps]
    engine = Engine(AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float64).eval(),
                    CharTokenizer(), max_seqs=6, max_len=96, adapters=paths, max_adapters=2)
    engine.eos = set()
    jobs = [(p, Sampling(max_tokens=16), name) for name in (None, *paths) for p in ps]
    seqs = run_all(engine, jobs)
    st = engine.stats()
    engine.shutdown()
    assert [s.tokens for s in seqs] == [refs[name][i] for name in (None, *paths) for i in range(3)]
    assert st["adapter_loads"] >= 3 and len(st["adapters_loaded"]) <= 2, st
    with pytest.raises(KeyError):
        engine.submit(ps[0], Sampling(max_tokens=4), lambda e: None, adapter="not-served")
