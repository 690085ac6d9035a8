"""One text model that takes HTTP itself (``serve.gateway: fused``): its replicas are the ingress.

The gateway's routes (serve/gateway.py) run in the model replica's own process, and what they would send over a
deployment handle goes to the replica's own methods: no hop between a gateway and the model, and a stream's
events go from the engine's queue straight to the HTTP response instead of through Ray's streaming. Behind
HAProxy every replica is a backend of its own, so the HTTP work scales out with the replicas.
"""

from __future__ import annotations

from typing import Any

from ray import serve

from serve.gateway import Gateway, make_api
from serve.generator import TextGenerator


class _Method:
    """``handle.method.remote(...)`` for a local call."""

    def __init__(self, fn):
        self.remote = fn


class LocalHandle:
    """The calls Gateway makes on a deployment handle, answered by the replica it runs in."""

    app_name, deployment_name = None, "local"  # one deployment: /v1/stats lists it once

    def __init__(self, replica: TextGenerator, model_id: str = ""):
        self.replica, self.model_id = replica, model_id

    def options(self, *, multiplexed_model_id: str | None = None, stream: bool | None = None) -> LocalHandle:
        return LocalHandle(self.replica, multiplexed_model_id or self.model_id)

    @property
    def complete(self) -> _Method:
        return _Method(lambda req: self.replica.complete(req, self.model_id))

    @property
    def stream(self) -> _Method:
        return _Method(lambda req: self.replica.stream(req, self.model_id))

    @property
    def stats(self) -> _Method:
        async def stats(window_s: float | None = None) -> dict[str, Any]:
            return TextGenerator.stats(self.replica, window_s)

        return _Method(stats)


class TextServer(Gateway, TextGenerator):
    """A text-generation replica with the gateway's HTTP routes on it (``spec``: the ModelSpec as a dict)."""

    def __init__(self, spec: dict[str, Any], auth_token_env: str | None = None):
        TextGenerator.__init__(self, spec)
        handle = LocalHandle(self)
        names = [self.spec.name, *self.spec.adapters]
        Gateway.__init__(self, dict.fromkeys(names, handle), dict.fromkeys(names, "causal_lm"),
                         {n: n for n in self.spec.adapters}, auth_token_env)

    def _loading(self) -> list[str]:
        """Nothing: the replica answering /healthz is the model's own, built and loaded."""
        return []


TextServerIngress = serve.ingress(make_api())(TextServer)
