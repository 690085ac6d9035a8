"""NER corpora: readers, validation messages, label lists, splits and sub-word alignment."""

from __future__ import annotations

import json

import pytest

from orchestrator.data.ner import NERFormatError, label_list, read_conll, read_ner, read_ner_json
from orchestrator.data.splits import split_rows
from orchestrator.data.tokenization import IGNORE, encode_ner

from .conftest import BC5CDR


def test_reads_real_bc5cdr():
    train = read_conll(BC5CDR / "train.conll.gz")
    assert len(train) == 4560
    assert train[0]["tokens"][:4] == ["Selegiline", "-", "induced", "postural"]
    assert train[0]["tags"][:5] == ["B-Chemical", "O", "O", "B-Disease", "I-Disease"]
    assert label_list(train) == ["O", "B-Chemical", "I-Chemical", "B-Disease", "I-Disease"]


@pytest.mark.parametrize("content,line,message", [
    ("Aspirin\tB-Chemical\nworks\tO\tX\n", 2, "expected 2 tab-separated columns"),
    ("Aspirin B-Chemical\n", 1, "expected 2 tab-separated columns"),
    ("Aspirin\tB-Chem ical\n", 1, "unknown tag shape 'B-Chem ical'"),
    ("Aspirin\tU-Chemical\n", 1, "unknown tag shape 'U-Chemical'"),
    ("The\tO\ncancer\tI-Disease\n", 2, "I-Disease follows O (I- without B-)"),
    ("Aspirin\tB-Chemical\nlung\tI-Disease\n", 2, "I-Disease follows B-Chemical"),
    ("A\tO\n\n\nB\tO\n", 3, "empty sentence"),
])
def test_conll_errors_name_file_and_line(tmp_path, content, line, message):
    p = tmp_path / "bad.conll"
    p.write_text(content)
    with pytest.raises(NERFormatError) as err:
        read_conll(p)
    assert f"{p}:{line}:" in str(err.value) and message in str(err.value)


def test_repair_mode_counts_and_fixes(tmp_path):
    p = tmp_path / "fixable.conll"
    p.write_text("The\tO\ncancer\tI-Disease\ncells\tI-Disease\n\n\nAspirin\tB-Chemical\n")
    rows, repairs = read_ner([p], "conll", repair=True)
    assert rows[0]["tags"] == ["O", "B-Disease", "I-Disease"]
    assert repairs.i_without_b == 1 and repairs.empty_sentences == 1 and len(rows) == 2


def test_json_form_and_its_errors(tmp_path):
    good = [{"text": "Cisplatin causes nephrotoxicity .",
             "labels": [{"word": "Cisplatin", "entity": "B-Chemical"}, {"word": "causes", "entity": "O"},
                        {"word": "nephrotoxicity", "entity": "B-Disease"}, {"word": ".", "entity": "O"}]}]
    p = tmp_path / "ner.json"
    p.write_text(json.dumps(good))
    assert read_ner_json(p) == [{"tokens": ["Cisplatin", "causes", "nephrotoxicity", "."],
                                 "tags": ["B-Chemical", "O", "B-Disease", "O"]}]
    jl = tmp_path / "ner.jsonl"
    jl.write_text(json.dumps(good[0]) + "\n" + json.dumps({"text": "x", "labels": [{"word": "x"}]}) + "\n")
    with pytest.raises(NERFormatError, match=rf"{jl}:line 2: labels\[0\] needs string fields"):
        read_ner_json(jl)
    mismatch = [{"text": "A B", "labels": [{"word": "A", "entity": "O"}]}]
    p.write_text(json.dumps(mismatch))
    with pytest.raises(NERFormatError, match="item 1: 'labels' words do not match"):
        read_ner_json(p)
    p.write_text(json.dumps([{"text": "", "labels": []}]))
    with pytest.raises(NERFormatError, match="item 1: empty sentence"):
        read_ner_json(p)


def test_seeded_80_10_10_split():
    rows = list(range(1000))
    a = split_rows(rows, seed=7)
    assert [len(x) for x in a] == [800, 100, 100]
    assert a == split_rows(rows, seed=7) and a != split_rows(rows, seed=8)
    assert sorted(a[0] + a[1] + a[2]) == rows


def test_alignment_on_tricky_tokens(minilm_tokenizer):
    labels = ["O", "B-Chemical", "I-Chemical", "B-Disease", "I-Disease"]
    l2i = {x: i for i, x in enumerate(labels)}
    tokens = ["5-fluorouracil", "-", "induced", "Parkinson", "'", "s", "disease", "in", "β-blocker", "users"]
    tags = ["B-Chemical", "O", "O", "B-Disease", "I-Disease", "I-Disease", "I-Disease", "O", "B-Chemical", "O"]
    enc = encode_ner(minilm_tokenizer, tokens, tags, l2i, max_len=64)
    word_ids = minilm_tokenizer(tokens, is_split_into_words=True).word_ids()
    assert word_ids[0] is None and word_ids[-1] is None  # [CLS] ... [SEP]
    assert sum(1 for w in word_ids if w == 0) > 1  # "5-fluorouracil" splits into several pieces
    firsts = {}
    for pos, w in enumerate(word_ids):
        if w is None:
            assert enc["labels"][pos] == IGNORE
        elif w not in firsts:
            firsts[w] = pos
            assert enc["labels"][pos] == l2i[tags[w]]
        else:
            assert enc["labels"][pos] == IGNORE
    assert sorted(firsts) == list(range(len(tokens)))
    every = encode_ner(minilm_tokenizer, tokens, tags, l2i, max_len=64, label_all_subtokens=True)
    second_piece = [p for p, w in enumerate(word_ids) if w == 0][1]
    assert every["labels"][second_piece] == l2i["I-Chemical"]


def test_truncation_is_flagged(minilm_tokenizer):
    tokens = ["word"] * 100
    enc = encode_ner(minilm_tokenizer, tokens, ["O"] * 100, {"O": 0}, max_len=16)
    assert enc["truncated"] and len(enc["input_ids"]) == 16
