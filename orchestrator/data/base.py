"""The run's base model, ready before any Ray work; and the embedded default base, built from the corpus.

``ensure_model`` is every verb's first step: the embedded tiny Llama (``model.build_tiny: true``) is built on
first use, any other local path must hold a model. The embedded base is made of the data it will be tuned
on: a byte-level BPE tokenizer trained on the corpus's cleaned PDF pages, then full-parameter pre-training
on that text, one document per article as the data stage segments it (and, with ``model.tiny_pretrain_qa``,
the training split's QA pairs). It is saved with
``save_pretrained`` and loaded through the same ``from_pretrained`` path a hub model takes, so the tiny
configs exercise the real loading code without any download.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

from orchestrator.core.config import ConfigError, RunConfig, check_data_files
from orchestrator.core.io import atomic_dir
from orchestrator.core.sources import ModelLoadError, check_model_source

log = logging.getLogger(__name__)

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}<|system|>\n{{ message['content'] }}\n"
    "{% elif message['role'] == 'user' %}<|user|>\n{{ message['content'] }}\n"
    "{% elif message['role'] == 'assistant' %}<|assistant|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
SPECIAL = ["<unk>", "<s>", "</s>", "<pad>", "<|system|>", "<|user|>", "<|assistant|>"]


def corpus_text(pdf_paths: Iterable[str | Path]) -> list[str]:
    """Cleaned page text of the given PDFs, one string per page."""
    from orchestrator.data.documents import clean_page, extract_pages, pdf_page_count

    out = []
    for p in pdf_paths:
        pages = ["\n".join(clean_page(text)) for text in extract_pages(p, list(range(pdf_page_count(p))))]
        if not any(page.strip() for page in pages):
            raise ValueError(f"{p}: no extractable text in {len(pages)} page(s) (a scanned PDF? OCR it first)")
        out += pages
    return out


def train_tokenizer(texts: list[str], vocab_size: int = 4096):
    """Byte-level BPE tokenizer trained with `tokenizers`, wrapped as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL, min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", additional_special_tokens=SPECIAL[4:])
    fast.chat_template = CHAT_TEMPLATE
    fast.model_max_length = 2048
    return fast


def build_tiny_llama(out_dir: str | Path, texts: list[str], vocab_size: int = 4096,
                     hidden: int = 256, layers: int = 4, heads: int = 4, intermediate: int = 704,
                     max_positions: int = 2048, seed: int = 0, force: bool = False,
                     pretrain_steps: int = 0, qa_pairs: list[dict] | None = None,
                     record: dict | None = None, chat_template: str = "auto",
                     system_prompt: str | None = None, documents: list[str] | None = None) -> Path:
    """Build (once) the tiny Llama-architecture base model, with a tokenizer trained on ``texts``,
    optionally pre-trained for ``pretrain_steps`` on ``documents`` (default: the texts) and the chat-formatted
    ``qa_pairs``. ``build.json`` beside the weights records what it was built from and how the loss went."""
    import json
    import platform
    import time

    import torch
    import transformers
    from transformers import LlamaConfig, LlamaForCausalLM

    out_dir = Path(out_dir)
    if (out_dir / "config.json").exists() and not force:
        return out_dir
    t0 = time.perf_counter()
    tokenizer = train_tokenizer(texts, vocab_size)
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=heads, intermediate_size=intermediate,
                      max_position_embeddings=max_positions, bos_token_id=tokenizer.bos_token_id,
                      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                      tie_word_embeddings=False, rms_norm_eps=1e-5)
    model = LlamaForCausalLM(cfg)
    text_docs = list(texts if documents is None else documents)
    docs = text_docs + [qa_document(tokenizer, q, chat_template, system_prompt) for q in qa_pairs or []]
    losses = pretrain(model, tokenizer, docs, pretrain_steps, seed=seed) if pretrain_steps else []
    n = sum(p.numel() for p in model.parameters())
    build = {
        **(record or {}),
        "architecture": {"hidden": hidden, "layers": layers, "heads": heads, "intermediate": intermediate,
                         "vocab": len(tokenizer), "parameters": n},
        "pretraining": {"steps": pretrain_steps, "texts": len(text_docs), "qa_pairs": len(qa_pairs or []),
                        "first_loss": round(losses[0], 4) if losses else None,
                        "final_loss": round(sum(losses[-20:]) / len(losses[-20:]), 4) if losses else None,
                        "seed": seed},
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu",
        "seconds": round(time.perf_counter() - t0, 1),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
    }
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True, max_shard_size="12MB")  # files small enough for git
        tokenizer.save_pretrained(tmp)
        (tmp / "build.json").write_text(json.dumps(build, indent=2) + "\n")
    log.info("built tiny Llama (%.1fM params, vocab %d) at %s", n / 1e6, len(tokenizer), out_dir)
    return out_dir


def qa_document(tokenizer, pair: dict, mode: str = "auto", system_prompt: str | None = None) -> str:
    """One QA pair as the fine-tune will show it (chat template, answer, end of sequence)."""
    from orchestrator.data.tokenization import format_prompt_answer

    prompt, answer = format_prompt_answer(tokenizer, pair["question"], pair["answer"], mode, system_prompt)
    return prompt + answer + ("" if answer.endswith(tokenizer.eos_token) else tokenizer.eos_token)


def pretrain(model, tokenizer, docs: list[str], steps: int, seq_len: int = 256, batch_size: int = 16,
             lr: float = 3e-3, seed: int = 0) -> list[float]:
    """Plain full-parameter next-token pre-training: every epoch the documents are shuffled, joined and cut
    into ``seq_len`` rows; AdamW with linear warm-up and cosine decay, on the GPU when there is one (the
    model goes back to the CPU afterwards). Returns the per-step losses."""
    import math
    import random

    import torch
    from tqdm.auto import tqdm

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    encoded = [tokenizer(d, add_special_tokens=False)["input_ids"] for d in docs]
    encoded = [ids + [tokenizer.eos_token_id] if ids[-1:] != [tokenizer.eos_token_id] else ids
               for ids in encoded if ids]
    if sum(map(len, encoded)) <= seq_len * batch_size:
        raise ValueError(f"pre-training needs more than {seq_len * batch_size} tokens of text, "
                         f"got {sum(map(len, encoded))}")
    rng = random.Random(seed)

    def batches():
        while True:
            order = list(range(len(encoded)))
            rng.shuffle(order)
            stream = torch.tensor([t for i in order for t in encoded[i]], dtype=torch.long)
            rows = stream[: len(stream) // seq_len * seq_len].view(-1, seq_len)
            rows = rows[torch.randperm(len(rows), generator=torch.Generator().manual_seed(rng.randrange(2**31)))]
            for b in range(0, len(rows) - batch_size + 1, batch_size):
                yield rows[b: b + batch_size]

    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.95))
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else 0.05 + 0.475 * (1 + math.cos(math.pi * (s - warm) / max(1, steps - warm))))
    model.train()
    losses = []
    bar = tqdm(range(steps), desc="pre-training tiny base", mininterval=5)
    source = batches()
    for _ in bar:
        batch = next(source).to(device)
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval().to("cpu")
    log.info("pre-trained the tiny base for %d steps on %d tokens: loss %.3f -> %.3f",
             steps, sum(map(len, encoded)), losses[0], sum(losses[-10:]) / len(losses[-10:]))
    return losses


def document_articles(pdf: str | Path) -> tuple[list[str], list[dict]]:
    """One PDF's cleaned pages and its article rows in article order, in this process (what
    :func:`orchestrator.data.read_articles` gives with Ray Data)."""
    from orchestrator.data.documents import segment

    pages = corpus_text([pdf])
    rows = segment([(i, t.split("\n")) for i, t in enumerate(pages)])
    return pages, sorted((a.to_row() for a in rows), key=lambda r: r["number"])


def article_documents(row: dict) -> list[str]:
    """One article as the base reads it in pre-training: the article whole (its part, number and title, then
    its text on one line: the segmenter's reading of the PDF, page breaks and running heads gone), then each
    clause and sub-clause under its full reference, so the base knows where each provision sits."""
    n, title = row["number"], row["title"]
    part = f"Part {row['part_number']}: {row['part_title']}\n" if row.get("part_title") else ""
    docs = [f"{part}Article {n}: {title}\n{row['text']}"]
    for c in row.get("clauses") or []:
        where = f"Article {n} ({title}), clause ({c['number']})"
        docs += [f"{where}:\n{c['text']}"] if c["text"] else []
        docs += [f"{where}, sub-clause ({letter}):\n{text}" for letter, text in c.get("subclauses") or [] if text]
    return docs


def base_corpus(cfg) -> tuple[list[str], list[str], list[dict], dict]:
    """What the embedded base learns from: the cleaned pages of the config's PDFs (its tokenizer's text), the
    pre-training documents (:func:`article_documents`) and, with ``model.tiny_pretrain_qa``,
    the QA pairs of the fine-tune's training split (the same seeded split; validation and test pairs are never
    seen). Also the record of those sources for ``build.json``."""
    import hashlib

    if cfg.data.format == "qa_jsonl":
        from orchestrator.data.qa import read_qa_jsonl

        texts = [f"{r['question']}\n{r['answer']}" for p in cfg.data.train for r in read_qa_jsonl(p)]
        return texts, texts, [], {"data": {"qa_jsonl": [str(p) for p in cfg.data.train]}}
    if cfg.data.format != "pdf":
        raise ValueError(f"model.build_tiny builds a causal LM; data.format={cfg.data.format} is not text")
    from orchestrator.data.pipelines import qa_pairs
    from orchestrator.data.splits import cap_splits, split_for

    texts, articles, docs = [], [], []
    for p in cfg.data.train:
        pages, rows = document_articles(p)
        texts += pages
        articles += rows
        docs.append({"path": Path(p).name, "sha256": hashlib.sha256(Path(p).read_bytes()).hexdigest(),
                     "pages": len(pages), "articles": len(rows)})
    qa = cap_splits(cfg, split_for(cfg, qa_pairs(cfg, articles)))["train"] if cfg.model.tiny_pretrain_qa else []
    record = {"data": {"documents": docs, "pretraining_text": "articles",
                       "qa": {"kind": cfg.data.qa.kind, "split": "train", "split_seed": cfg.data.split_seed,
                              "pairs": len(qa)}}}
    return texts, [d for a in articles for d in article_documents(a)], qa, record


def check_build_target(path: Path) -> None:
    """A model is only ever built into a new or empty directory, or over a model: never into a folder holding
    other things (a mistyped path, the checkout itself)."""
    if path.is_dir() and any(path.iterdir()) and not (path / "config.json").is_file():
        raise ConfigError(f"model.name_or_path: {path} holds files and no model; the embedded model is built only "
                          "into a new or empty directory (model.build_tiny: true)")
    if path.exists() and not path.is_dir():
        raise ConfigError(f"model.name_or_path: {path} is a file, not a model directory")


def ensure_base_model(cfg, force: bool = False) -> None:
    """Build the tiny model named by a config with ``model.build_tiny: true`` if it is missing (or ``force``)."""
    if not cfg.model.build_tiny:
        return
    path = Path(cfg.model.name_or_path)
    if (path / "config.json").exists() and not force:
        return
    check_build_target(path)
    texts, documents, qa, record = base_corpus(cfg)
    log.info("building the tiny base model at %s (tokenizer trained on %d texts; %d documents, %d QA pairs)",
             path, len(texts), len(documents), len(qa))
    build_tiny_llama(path, texts, pretrain_steps=cfg.model.tiny_pretrain_steps, force=force, qa_pairs=qa,
                     documents=documents,
                     record=record, chat_template=cfg.data.chat_template, system_prompt=cfg.data.system_prompt)


def ensure_model(cfg: RunConfig) -> str:
    """The run's base model, ready to load before any Ray work: the embedded tiny Llama is built on first use
    (``model.build_tiny: true``); any other local path must hold a model (one line naming path and setting)."""
    check_data_files(cfg)  # the tiny model is built from the corpus, and every stage reads it
    check_data(cfg)
    if cfg.model.build_tiny:
        ensure_base_model(cfg)
    try:
        return check_model_source(cfg.model.name_or_path)
    except ModelLoadError as e:
        raise ModelLoadError(f"{e}; set model.name_or_path to a model directory or hub id, or model.build_tiny: "
                             "true for the embedded default") from None


def check_data(cfg: RunConfig) -> None:
    """Text data files read and checked here, before Ray starts (a bad line is one error naming file and line):
    QA pairs (``qa_jsonl``, ``qa.kind: jsonl``) and NER corpora (CoNLL, JSON)."""
    from orchestrator.data import ner
    from orchestrator.data.qa import read_qa_jsonl

    d = cfg.data
    files = d.train + d.validation + d.test
    if d.format == "qa_jsonl":
        for f in files:
            read_qa_jsonl(f)
    elif d.format == "pdf" and d.qa.kind == "jsonl":
        read_qa_jsonl(d.qa.jsonl_path)
    elif d.format in ("conll", "ner_json"):
        for f in files:
            if not ner.read_ner([f], d.format, d.repair)[0]:
                raise ConfigError(f"data: {f}: no sentences")
