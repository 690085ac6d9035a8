"""Tokenizers and what they make of examples: chat formatting with prompt masking, packing, NER label alignment.

Causal LM rows: ``input_ids``, ``labels`` (-100 on prompt tokens, so loss is on answers only),
``position_ids``. Packing concatenates several short examples into one row of ``max_seq_length``;
``position_ids`` restart at 0 for every example. With ``attention_mask`` left out, transformers
derives a block-diagonal causal mask from those restarts (``find_packed_sequence_indices``), so no
token attends to another example in its row; flash-attention uses the same restarts as cu_seqlens.
The forward pass must run with ``use_cache=False`` (as training does): with a KV cache, transformers
skips that detection.
"""

from __future__ import annotations

from typing import Any

import numpy as np

IGNORE = -100
PLAIN_USER = "### User:\n"
PLAIN_ASSISTANT = "\n\n### Assistant:\n"


def load_tokenizer(name_or_path: str):
    """The model's tokenizer (``package:`` models resolved), with a pad token (EOS when it has none)."""
    from transformers import AutoTokenizer

    from orchestrator.core.sources import resolve_model_path

    tok = AutoTokenizer.from_pretrained(resolve_model_path(name_or_path))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def format_prompt_answer(tokenizer, question: str, answer: str | None, mode: str = "auto",
                         system_prompt: str | None = None) -> tuple[str, str]:
    """Return (prompt_text, answer_text). The prompt ends where the assistant's reply begins.

    mode=auto uses the tokenizer's chat template when it has one, else the plain template
    ``### User:\\n{question}\\n\\n### Assistant:\\n{answer}<eos>``.
    """
    if mode == "auto" and has_chat_template(tokenizer):
        messages = ([{"role": "system", "content": system_prompt}] if system_prompt else [])
        messages.append({"role": "user", "content": question})
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        if answer is None:
            return prompt, ""
        full = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": answer}], tokenize=False)
        if not full.startswith(prompt):
            raise ValueError("the tokenizer's chat template does not extend the generation prompt; "
                             "set data.chat_template=plain")
        return prompt, full[len(prompt):]
    head = f"{system_prompt}\n\n" if system_prompt else ""
    prompt = f"{head}{PLAIN_USER}{question}{PLAIN_ASSISTANT}"
    return prompt, ("" if answer is None else answer)


def encode_qa(tokenizer, question: str, answer: str, max_len: int, mode: str = "auto",
              system_prompt: str | None = None) -> dict[str, Any] | None:
    """Tokenize one pair with labels masked to -100 on the prompt. Returns None when nothing of the
    answer survives truncation (the caller counts it as dropped)."""
    prompt, ans = format_prompt_answer(tokenizer, question, answer, mode, system_prompt)
    p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id
    if bos is not None and (not p_ids or p_ids[0] != bos):
        p_ids = [bos] + p_ids
    a_ids = tokenizer(ans, add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    if eos is not None and (not a_ids or a_ids[-1] != eos):
        a_ids = a_ids + [eos]
    ids = p_ids + a_ids
    labels = [IGNORE] * len(p_ids) + a_ids
    truncated = len(ids) > max_len
    if truncated:
        ids, labels = ids[:max_len], labels[:max_len]
    if all(v == IGNORE for v in labels):
        return None
    return {"input_ids": ids, "labels": labels, "prompt_len": len(p_ids), "truncated": truncated}


def fill_rows(lengths: list[int], max_len: int) -> list[list[int]]:
    """Group example indices into rows of at most ``max_len`` slots, as few rows and pad slots as it can.

    Each row takes the longest example left, then the subset of the others that fills its room most exactly
    (subset sum: the reachable totals are the bits of an int), preferring longer examples on ties. First-fit
    decreasing, which it replaces, left rows of 8,192 slots 95% full on documents of 1-2k tokens; this
    fills them to the last few slots whenever the lengths allow it.
    """
    left = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    rows = []
    while left:
        first, rest = left[0], left[1:]
        room = max_len - lengths[first]
        mask = (1 << (room + 1)) - 1
        reach = [1]  # reach[k]: totals reachable with rest[:k]
        for i in rest:
            reach.append((reach[-1] | (reach[-1] << lengths[i])) & mask)
        total = reach[-1].bit_length() - 1
        take = set()
        for k in range(len(rest), 0, -1):  # back from the shortest: keep an example only where the total needs it
            if total and not (reach[k - 1] >> total) & 1:
                take.add(rest[k - 1])
                total -= lengths[rest[k - 1]]
        rows.append([first] + [i for i in rest if i in take])
        left = [i for i in rest if i not in take]
    return rows


def pack(examples: list[dict[str, Any]], max_len: int, pad_id: int) -> list[dict[str, np.ndarray]]:
    """Pack tokenized examples into rows of exactly ``max_len`` slots (``fill_rows``), longest first.

    Each row carries ``position_ids`` that restart at 0 per example (padding forms its own segment)
    and ``seq_ids`` (example index within the row, -1 on padding) for inspection and tests.
    """
    bins = fill_rows([len(e["input_ids"]) for e in examples], max_len)
    rows = []
    for members in bins:
        ids, labels, pos, seq = [], [], [], []
        truncated = sum(bool(examples[i].get("truncated")) for i in members)
        for k, i in enumerate(members):
            ex = examples[i]
            n = len(ex["input_ids"])
            ids += ex["input_ids"]
            labels += ex["labels"]
            pos += list(range(n))
            seq += [k] * n
        pad = max_len - len(ids)
        rows.append({
            "input_ids": np.array(ids + [pad_id] * pad, dtype=np.int64),
            "labels": np.array(labels + [IGNORE] * pad, dtype=np.int64),
            "position_ids": np.array(pos + list(range(pad)), dtype=np.int64),
            "seq_ids": np.array(seq + [-1] * pad, dtype=np.int64),
            "num_tokens": len(ids),
            "num_examples": len(members),
            "truncated": truncated,
        })
    return rows


def align_ner_labels(word_ids: list[int | None], word_tags: list[str], label2id: dict[str, int],
                     label_all_subtokens: bool = False) -> list[int]:
    """Word-to-subword alignment: the first sub-token of a word carries the word's label; later
    sub-tokens get -100 (or, with label_all_subtokens, the label with B- turned into I-);
    special tokens get -100."""
    labels = []
    prev = None
    for wid in word_ids:
        if wid is None:
            labels.append(IGNORE)
        elif wid != prev:
            labels.append(label2id[word_tags[wid]])
        elif label_all_subtokens:
            tag = word_tags[wid]
            labels.append(label2id["I-" + tag[2:]] if tag.startswith("B-") else label2id[tag])
        else:
            labels.append(IGNORE)
        prev = wid
    return labels


def encode_ner(tokenizer, tokens: list[str], tags: list[str], label2id: dict[str, int], max_len: int,
               label_all_subtokens: bool = False) -> dict[str, Any]:
    enc = tokenizer(tokens, is_split_into_words=True, truncation=True, max_length=max_len)
    word_ids = enc.word_ids()
    labels = align_ner_labels(word_ids, tags, label2id, label_all_subtokens)
    seen = {w for w in word_ids if w is not None}
    return {"input_ids": enc["input_ids"], "labels": labels, "truncated": len(seen) < len(tokens)}


def pad_batch(rows: dict[str, list], pad_id: int, multiple_of: int | None = None) -> dict[str, np.ndarray]:
    """Right-pad variable-length ``input_ids``/``labels`` to the longest in the batch; add attention_mask."""
    seqs = rows["input_ids"]
    longest = max(len(s) for s in seqs)
    if multiple_of:
        longest = -(-longest // multiple_of) * multiple_of
    n = len(seqs)
    ids = np.full((n, longest), pad_id, dtype=np.int64)
    labels = np.full((n, longest), IGNORE, dtype=np.int64)
    mask = np.zeros((n, longest), dtype=np.int64)
    for i, (s, lab) in enumerate(zip(seqs, rows["labels"], strict=True)):
        ids[i, : len(s)] = s
        labels[i, : len(s)] = lab
        mask[i, : len(s)] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}
