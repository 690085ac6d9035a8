"""What the serving benches' clients cost themselves: closed-loop streaming clients against a server that does no
work (bench/clients.py's NullServer), all in one process over new connections each pass, against one process that
keeps its connections, and spread over processes of 16 that keep theirs (``ClientPool``, bench/serve_user_path.py's
default).

    python bench/client_check.py [--concurrency 8 32 64] [--events 16] [--interval 0.064] [--repeat 3] [--tag T]

The server sends ``--events`` one-token chunks ``--interval`` seconds apart (0.064: the engine's pace per stream
at 64 streams, ``serve.stream_items_per_s`` 1,000), so a perfect client sees tokens/s = concurrency x events /
(events x interval) and a first token the moment it sends. Per setting, the median of ``--repeat`` passes of 2
requests per client after a warm-up pass: tokens/s against that ideal, TTFT, and the time from the client's send
to the server's arrival stamp. Writes bench/results/client_check[_TAG].json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from clients import NullServer, client_procs, passes, prompts  # noqa: E402
from record import write_result  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--concurrency", type=int, nargs="+", default=[8, 32, 64])
    ap.add_argument("--events", type=int, default=16)
    ap.add_argument("--interval", type=float, default=0.064)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--tag", default="")
    a = ap.parse_args()
    res = {"host": f"{platform.machine()}, {os.cpu_count()} cores", "commit": os.environ.get("BENCH_COMMIT"),
           "events": a.events, "interval_s": a.interval, "per_client": 2, "results": []}
    with NullServer(a.events, a.interval) as server:
        for c in a.concurrency:
            ideal = c * a.events / (a.events * a.interval)
            for procs in dict.fromkeys((0, 1, client_procs(c))):
                with passes(c, procs) as run:
                    run(server.url, c, 1, a.events, prompts(c, 50, 1000 + c))  # warm-up
                    done = [run(server.url, c, 2, a.events, prompts(2 * c, 50, rep), trace=True)
                            for rep in range(a.repeat)]
                r = sorted(done, key=lambda p: p["tokens_per_s"])[(len(done) - 1) // 2]
                row = {"concurrency": c, "clients": f"{procs} process(es), connections kept" if procs else
                       "this process, new connections per pass", "tokens_per_s": r["tokens_per_s"],
                       "of_ideal": round(r["tokens_per_s"] / ideal, 3), "ttft_p50_s": r["ttft_p50_s"],
                       "ttft_p99_s": r["ttft_p99_s"], "send_to_server": r["hops"]["client -> gateway"],
                       "passes_tokens_per_s": [p["tokens_per_s"] for p in done]}
                res["results"].append(row)
                print(json.dumps(row), flush=True)
    write_result("client_check", a.tag, res)


if __name__ == "__main__":
    main()
