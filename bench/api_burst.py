"""Repeated bursts of concurrent `bem_fleet` triggers against one embedded standalone.

The load test (bench/load_test.py) fires one burst and follows every run; this fires --rounds
bursts of --n triggers at the same API server with `bem_fleet` paused (runs are created, none
runs), to find whether the API server keeps answering as the burst repeats. It is how the
stall of D39 was reproduced (before the fix: bursts of 20 stalled from the third on, of 40
from the first) and how its fix was measured. Last line:
`api_burst: requests=.. failed=.. burst_max_s=..`.

    .venv/bin/python bench/api_burst.py --n 20 --rounds 10
"""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time
from pathlib import Path

from bem_tasks.fleet.api import AirflowApi
from bem_tasks.fleet.cluster import free_port
from bem_tasks.fleet.embedded import Embedded
from bem_tasks.fleet.runs import FLEET_DAG_ID

ROOT = Path(__file__).resolve().parents[1]
CONF = {"profile": "load", "missions": []}


def burst(clients: list[AirflowApi]) -> list[tuple[str, float]]:
    """Every client posts one trigger at the same moment; (outcome, seconds) per client."""
    barrier = threading.Barrier(len(clients))
    results: list[tuple[str, float]] = [("not run", 0.0)] * len(clients)

    def trigger(i: int) -> None:
        barrier.wait()
        started = time.monotonic()
        try:
            clients[i].post(f"/dags/{FLEET_DAG_ID}/dagRuns", {"logical_date": None, "conf": CONF})
            results[i] = ("ok", time.monotonic() - started)
        except Exception as exc:  # noqa: BLE001 (every failure is counted and shown)
            results[i] = (f"{type(exc).__name__}: {str(exc)[:120]}", time.monotonic() - started)

    threads = [threading.Thread(target=trigger, args=(i,)) for i in range(len(clients))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=20, help="triggers per burst (default 20)")
    parser.add_argument("--rounds", type=int, default=10, help="bursts (default 10)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bem-burst-") as tmp:
        os.environ["BEM_FLEET_ARTIFACT_ROOT"] = str(Path(tmp) / "artifacts")
        emb = Embedded(
            ROOT, free_port(), airflow_home=Path(tmp) / "airflow", log_server_port=free_port()
        )
        emb.start(print)
        failed, slowest = 0, 0.0
        try:
            api = emb.client()
            while not api.exists(f"/dags/{FLEET_DAG_ID}"):
                time.sleep(2)
            clients = [emb.api() for _ in range(args.n)]
            for c in clients:
                c.token()  # logged in before the burst: the burst is triggers only
            for r in range(args.rounds):
                results = burst(clients)
                bad = [o for o, _ in results if o != "ok"]
                took = max(s for _, s in results)
                failed, slowest = failed + len(bad), max(slowest, took)
                print(f"burst {r}: {args.n - len(bad)} ok, {len(bad)} failed, slowest {took:.2f} s"
                      + (f"; e.g. {bad[0]}" if bad else ""), flush=True)  # fmt: skip
                time.sleep(1)
        finally:
            emb.stop(print)
    print(f"api_burst: requests={args.n * args.rounds} failed={failed} burst_max_s={slowest:.2f}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
