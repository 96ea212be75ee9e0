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
import time
from pathlib import Path

from load_test import ROOT, fire  # the load test's burst: one barrier, one client per trigger

from bem_tasks.fleet.cluster import free_port
from bem_tasks.fleet.embedded import Embedded, wait_for_dag
from bem_tasks.fleet.runs import FLEET_DAG_ID


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
            wait_for_dag(emb.client(), FLEET_DAG_ID)
            clients = [emb.api() for _ in range(args.n)]
            for c in clients:
                c.token()  # logged in before the burst: the burst is triggers only
            for r in range(args.rounds):
                triggers = fire(clients, None)
                bad = [t.error for t in triggers if t.error]
                took = max(t.answered_s for t in triggers)
                failed, slowest = failed + len(bad), max(slowest, took)
                print(f"burst {r}: {args.n - len(bad)} ok, {len(bad)} failed, slowest {took:.2f} s"
                      + (f"; e.g. {bad[0][:160]}" if bad else ""), flush=True)  # fmt: skip
                time.sleep(1)
        finally:
            emb.stop(print)
    print(f"api_burst: requests={args.n * args.rounds} failed={failed} burst_max_s={slowest:.2f}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
