"""A dependency graph of tasks on a thread pool (prepare builds independent artifacts side by side)."""
from __future__ import annotations

from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any


def run_dag(tasks: dict[str, tuple[Any, tuple[str, ...]]], workers: int) -> dict[str, Any]:
    """Run {name: (fn(results_of_deps) -> result, dep names)} on a thread pool; a task starts when its
    dependencies are done (never blocking a worker), ready tasks in the dict's order. Re-raises errors."""
    results: dict[str, Any] = {}
    pending = dict(tasks)
    with ThreadPoolExecutor(workers) as pool:
        running: dict[Future, str] = {}
        while pending or running:
            for name in [n for n, (_, deps) in pending.items() if all(d in results for d in deps)]:
                if len(running) >= workers:
                    break
                fn, deps = pending.pop(name)
                running[pool.submit(fn, {d: results[d] for d in deps})] = name
            if not running:
                raise RuntimeError(f"unsatisfiable dependencies among {sorted(pending)}")
            done, _ = wait(list(running), return_when=FIRST_COMPLETED)
            for f in done:
                results[running.pop(f)] = f.result()
    return results
