"""What the Serve app accepts: model specs (the application's arguments), request bodies, client errors."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# ---------------------------------------------------------------- application arguments


class ModelSpec(BaseModel):
    """One served model: a merged model directory, or a base with LoRA adapters (multiplexed)."""

    model_config = ConfigDict(extra="forbid")

    name: str
    task: Literal["causal_lm", "token_classification"]
    path: str | None = Field(None, description="merged model directory (or hub id)")
    base: str | None = Field(None, description="base model for adapters")
    adapters: dict[str, str] = Field(default_factory=dict, description="served name -> adapter directory")
    chat_template: Literal["auto", "plain"] = "auto"
    system_prompt: str | None = None
    max_batch_size: int | None = Field(None, ge=1, description="engine: the most sequences running together "
                                       "(None: 256 on a GPU, 8 on a CPU); generate: the dynamic batch (None: 8)")
    batch_wait_timeout_s: float = Field(0.02, ge=0)
    max_tokens_limit: int = Field(512, ge=1)
    max_input_length: int = Field(512, ge=8)
    max_ongoing_requests: int = Field(8, ge=1)
    max_queued_requests: int = Field(32, ge=-1)
    engine: Literal["continuous", "generate"] = Field(
        "continuous", description="continuous: the decode engine (serve/engine.py; max_batch_size slots); "
                                  "generate: transformers' generate over dynamic batches")
    cuda_graphs: bool = Field(True, description="capture the engine's decode step in CUDA graphs on a GPU")
    kernels: bool = Field(True, description="the engine's Triton decode step where Triton runs (a GPU)")
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1, description="share of the GPU's memory the replica "
                                          "fills: weights, the largest step's activations, then KV blocks")
    kv_block_size: int | None = Field(None, ge=1, description="positions per KV block (None: 32 on a GPU; on "
                                      "the CPU a sequence's whole length)")
    prefill_chunk: int = Field(512, ge=1, description="prompt tokens of one sequence per step while others decode")
    max_prefill: int = Field(2048, ge=1, description="prompt tokens per step, all sequences together")
    prefix_caching: bool = True
    stream_interval_ms: float = Field(20.0, ge=0, description="a stream's text goes out at most this often "
                                      "after its first piece (fewer, larger stream items under load)")
    stream_items_per_s: float = Field(1000.0, ge=0, description="stream items per second, all streams together "
                                      "(0: no budget)")
    batch_invariant: bool = Field(False, description="greedy tokens independent of the rest of the batch")
    max_adapters: int = Field(8, ge=1, description="adapters resident on the device at once")
    autoscaling: dict[str, Any] = Field(default_factory=lambda: {"min_replicas": 1, "max_replicas": 1})
    num_cpus: float = Field(1, ge=0)
    num_gpus: float = Field(0, ge=0)

    @model_validator(mode="after")
    def _source(self) -> ModelSpec:
        if bool(self.path) == bool(self.adapters):
            raise ValueError(f"model {self.name}: give either path (a merged model) or base + adapters")
        if self.adapters and not self.base:
            raise ValueError(f"model {self.name}: adapters need base")
        if self.adapters and self.task != "causal_lm":
            raise ValueError(f"model {self.name}: adapter multiplexing is for causal_lm models")
        return self


class AppArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")

    models: list[ModelSpec] = Field(min_length=1)
    auth_token_env: str | None = None
    fast_path: bool = True
    gateway_replicas: int = Field(1, ge=1)
    gateway: Literal["separate", "fused"] = "separate"


# ---------------------------------------------------------------- requests


def _text(v: Any) -> Any:
    """Strings that a tokenizer and JSON can carry: a lone surrogate (``"\\ud800"`` in JSON) is refused."""
    for s in [v] if isinstance(v, str) else v if isinstance(v, list) else []:
        if isinstance(s, str):
            try:
                s.encode("utf-8")
            except UnicodeEncodeError as e:
                raise ValueError(f"invalid Unicode at character {e.start} (a lone surrogate)") from None
    return v


class _Req(BaseModel):
    model_config = ConfigDict(extra="ignore")


class Message(_Req):
    role: Literal["system", "user", "assistant"]
    content: str

    _check_text = field_validator("content")(_text)


class StreamOptions(_Req):
    include_usage: bool = False


class SamplingRequest(_Req):
    model: str | None = None
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1, description="default: min(128, the server's limit)")
    stop: str | list[str] | None = None
    repetition_penalty: float = Field(1.0, gt=0)
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        v = [v] if isinstance(v, str) else v
        if v is not None and (len(v) > 4 or any(not s for s in v)):
            raise ValueError("stop: at most 4 non-empty strings")
        return _text(v)


class ChatRequest(SamplingRequest):
    messages: list[Message] = Field(min_length=1)


class CompletionRequest(SamplingRequest):
    prompt: str

    _check_text = field_validator("prompt")(_text)


class EntitiesRequest(_Req):
    model: str | None = None
    text: str | None = None
    texts: list[str] | None = None

    _check_text = field_validator("text", "texts")(_text)

    @model_validator(mode="after")
    def _one(self) -> EntitiesRequest:
        if (self.text is None) == (self.texts is None):
            raise ValueError("give exactly one of text or texts")
        if self.texts is not None and not (1 <= len(self.texts) <= 64):
            raise ValueError("texts: between 1 and 64 texts")
        return self


class ClientError(Exception):
    """A request the model cannot serve (e.g. prompt too long): answered with 400."""

    def __init__(self, message: str, param: str | None = None, status: int = 400):
        super().__init__(message)
        self.message, self.param, self.status = message, param, status

    def as_dict(self) -> dict[str, Any]:
        """The form a replica hands back to the gateway, which answers it with ``status``."""
        return {"error": self.message, "param": self.param, "status": self.status}
