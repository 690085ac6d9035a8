"""The Ray Serve application: merged (or LoRA-multiplexed) models behind one FastAPI ingress.

* ``TextGenerator`` (serve/generator.py): a causal LM; the families the engine implements decode on the
  continuous-batching engine (serve/engine.py: paged KV cache, chunked prefill, prefix caching, LoRA adapters
  of the base in the same steps, chosen by the request's ``model``), others through ``generate``.
* ``EntityExtractor`` (serve/entities.py): a token-classification model; batched; BIO tags -> spans.
* ``Gateway`` (serve/gateway.py): the FastAPI ingress. OpenAI-compatible ``/v1/chat/completions``,
  ``/v1/completions``, ``/v1/models``; ``/v1/entities``; ``/v1/stats``; ``/healthz`` (503 until every model
  deployment has a replica that can serve); a chat page at ``/``.
* ``TextServer`` (serve/fused.py, ``gateway: fused`` with one text model): the same routes on the model's own
  replicas, no gateway deployment between.
* Requests and specs: serve/schemas.py.

Build it from plain arguments (``build_app(args)``), so the same app runs under ``serve run``,
``serve deploy`` with a Serve config file, and ``orchestrator serve``.
"""

from __future__ import annotations

from typing import Any

from ray import serve

from serve.entities import EntityExtractor
from serve.gateway import GatewayDeployment
from serve.generator import MAX_ADAPTERS_PER_REPLICA, TextGenerator
from serve.schemas import AppArgs, ModelSpec

__all__ = ["FAST_PATH", "MAX_ADAPTERS_PER_REPLICA", "ModelSpec", "TextGenerator", "EntityExtractor", "build_app"]

# Ray Serve's leaner request path, set in each replica's environment (part of what RAY_SERVE_THROUGHPUT_OPTIMIZED
# turns on, without its direct ingress): calls between deployments go by value over gRPC instead of through Ray
# object references, and user code and the router run on the replica's own event loop instead of a thread of
# their own. A streamed answer's items then cost the model replica less of the GIL that its decode thread needs
# (BENCHMARKS.md: serving as users meet it).
FAST_PATH = {"RAY_SERVE_USE_GRPC_BY_DEFAULT": "1", "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
             "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0"}


def _env(fast: bool) -> dict[str, Any]:
    return {"runtime_env": {"env_vars": FAST_PATH}} if fast else {}


def _options(spec: ModelSpec, fast: bool) -> dict[str, Any]:
    auto = dict(spec.autoscaling)
    return {"name": f"{'TextGenerator' if spec.task == 'causal_lm' else 'EntityExtractor'}-{spec.name}",
            "max_ongoing_requests": spec.max_ongoing_requests, "max_queued_requests": spec.max_queued_requests,
            "autoscaling_config": auto, "health_check_period_s": 10, "health_check_timeout_s": 30,
            "ray_actor_options": {"num_cpus": spec.num_cpus, "num_gpus": spec.num_gpus, **_env(fast)}}


def build_app(args: dict[str, Any]) -> serve.Application:
    """Application builder (``serve run serve.app:build_app`` / an ``import_path`` in a Serve config)."""
    parsed = AppArgs.model_validate(args)
    if parsed.gateway == "fused" and len(parsed.models) == 1 and parsed.models[0].task == "causal_lm":
        from serve.fused import TextServerIngress

        spec = parsed.models[0]
        return (serve.deployment(TextServerIngress).options(**_options(spec, parsed.fast_path))
                .bind(spec.model_dump(), parsed.auth_token_env))
    routes, tasks, multiplexed = {}, {}, {}
    for spec in parsed.models:
        cls = TextGenerator if spec.task == "causal_lm" else EntityExtractor
        dep = serve.deployment(cls).options(**_options(spec, parsed.fast_path)).bind(spec.model_dump())
        routes[spec.name], tasks[spec.name] = dep, spec.task  # the merged model, or the adapters' base itself
        for served in spec.adapters:
            if served in routes:
                raise ValueError(f"model {spec.name}: adapter name {served!r} is also another model's name")
            routes[served], tasks[served], multiplexed[served] = dep, spec.task, served
    gateway = GatewayDeployment.options(num_replicas=parsed.gateway_replicas,
                                        ray_actor_options={"num_cpus": 0, **_env(parsed.fast_path)})
    return gateway.bind(routes, tasks, multiplexed, parsed.auth_token_env)
