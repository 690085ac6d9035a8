"""QA pairs: the rule-based generator, the LLM generator over real HTTP, user JSONL, and masking."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from orchestrator.data.qa import LLMQAGenerator, read_qa_jsonl, rule_based_pairs
from orchestrator.data.tokenization import IGNORE, encode_qa, format_prompt_answer


def test_rule_based_pairs_shape_and_determinism(articles):
    rows = [a.to_row() for a in articles]
    pairs = [p for r in rows for p in rule_based_pairs(r)]
    assert pairs == [p for r in rows for p in rule_based_pairs(r)]
    assert len(pairs) > 3 * len(rows)
    for p in pairs:
        assert set(p) == {"question", "answer", "article", "title"}
        assert p["question"].endswith("?") and p["answer"].strip()
    art16 = [p for p in pairs if p["article"] == 16]
    assert any(p["question"] == "Which article of the Constitution of Nepal deals with right to live with dignity?"
               and p["answer"].startswith("Article 16 (Right to live with dignity), in Part 3") for p in art16)
    assert any("clause (1) of Article 16" in p["question"] and
               p["answer"].startswith("Every person shall have the right to live with dignity") for p in art16)
    assert any(p["question"] == "What does Article 16 of the Constitution of Nepal provide?" for p in art16)
    offices = {p["question"]: p for p in pairs if p["question"].startswith("Who is ")}
    if any(r["number"] == 61 for r in rows):
        president = offices["Who is the head of state of Nepal?"]
        assert president["article"] == 61 and president["answer"].startswith("The President shall be the head of")
    assert all("," not in q for q in offices)


@pytest.mark.parametrize("mode", ["auto", "plain"])
def test_labels_are_ignore_exactly_on_prompt_tokens(tiny_tokenizer, mode):
    enc = encode_qa(tiny_tokenizer, "What is the national flower of Nepal?",
                    "The Rhododendron Arboreum.", max_len=256, mode=mode)
    prompt, answer = format_prompt_answer(tiny_tokenizer, "What is the national flower of Nepal?",
                                          "The Rhododendron Arboreum.", mode)
    n_prompt = enc["prompt_len"]
    assert enc["labels"][:n_prompt] == [IGNORE] * n_prompt
    assert all(v != IGNORE for v in enc["labels"][n_prompt:])
    assert enc["labels"][n_prompt:] == enc["input_ids"][n_prompt:]
    assert enc["input_ids"][-1] == tiny_tokenizer.eos_token_id
    decoded_prompt = tiny_tokenizer.decode(enc["input_ids"][:n_prompt], skip_special_tokens=False)
    assert "national flower" in decoded_prompt and "Rhododendron" not in decoded_prompt
    assert "Rhododendron Arboreum" in tiny_tokenizer.decode(enc["input_ids"][n_prompt:])
    if mode == "plain":
        assert prompt.endswith("### Assistant:\n") and "### User:\n" in prompt
    else:
        assert prompt.endswith("<|assistant|>\n")


def test_truncation_keeps_prompt_and_drops_when_no_answer_fits(tiny_tokenizer):
    long_answer = "word " * 400
    enc = encode_qa(tiny_tokenizer, "Q?", long_answer, max_len=32)
    assert enc["truncated"] and len(enc["input_ids"]) == 32
    assert encode_qa(tiny_tokenizer, "Q " * 100 + "?", "A.", max_len=16) is None


def test_user_jsonl_errors_name_line(tmp_path):
    good = tmp_path / "qa.jsonl"
    good.write_text('{"question": "Q1?", "answer": "A1"}\n\n{"question": "Q2?", "answer": "A2"}\n')
    assert [r["question"] for r in read_qa_jsonl(good)] == ["Q1?", "Q2?"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "Q1?", "answer": "A1"}\n{"question": "Q2?"}\n')
    with pytest.raises(ValueError, match=rf"{bad}:2: field 'answer'"):
        read_qa_jsonl(bad)
    bad.write_text('{"question": "Q1?", "answer": "A1"}\nnot json\n')
    with pytest.raises(ValueError, match=rf"{bad}:2: not valid JSON"):
        read_qa_jsonl(bad)


class _ChatServer(BaseHTTPRequestHandler):
    """A real OpenAI-compatible /v1/chat/completions endpoint on 127.0.0.1 that misbehaves first:
    a 429, then a reply that is not JSON, then good JSON."""

    script: list = []
    calls = 0

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).calls += 1
        assert body["messages"][0]["role"] == "user" and self.headers["Authorization"] == "Bearer k"
        kind = self.script.pop(0) if self.script else "good"
        if kind == "429":
            self.send_response(429)
            self.end_headers()
            return
        content = "not json at all" if kind == "garbage" else json.dumps(
            {"pairs": [{"question": "What is Article 3 about?", "answer": "The nation."}]})
        data = json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def chat_server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _ChatServer)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}/v1"
    srv.shutdown()


def test_llm_generator_retries_validates_and_caches(chat_server, tmp_path):
    _ChatServer.script = ["429", "garbage"]
    _ChatServer.calls = 0
    article = {"number": 3, "title": "Nation", "text": "All the Nepalese people ... constitute the nation."}
    gen = LLMQAGenerator(chat_server, "any-model", "k", tmp_path / "cache", requests_per_second=50)
    pairs = gen.generate(article)
    assert pairs == [{"question": "What is Article 3 about?", "answer": "The nation.", "article": 3, "title": "Nation"}]
    assert _ChatServer.calls == 3
    again = LLMQAGenerator(chat_server, "any-model", "k", tmp_path / "cache", requests_per_second=50)
    assert again.generate(article) == pairs
    assert _ChatServer.calls == 3 and again.cache_hits == 1 and again.requests_made == 0


def test_llm_generator_gives_up_with_a_clear_error(chat_server, tmp_path):
    _ChatServer.script = ["garbage"] * 10
    gen = LLMQAGenerator(chat_server, "m", "k", tmp_path / "c", max_retries=1, requests_per_second=50)
    with pytest.raises(RuntimeError, match="article 9 failed after 2 attempts"):
        gen.generate({"number": 9, "title": "T", "text": "x"})
    assert not list((tmp_path / "c").iterdir())  # nothing half-written in the cache
