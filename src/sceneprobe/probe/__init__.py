"""Linear probes on captured activations: exact solvers (fit), metrics, baselines and the sweep over stores.

``run_probes(run, cfg)`` fits and scores every (store, site, step, task) and writes ``run/report/results.csv``.
"""
from .sweep import read_results, run_probes

__all__ = ["read_results", "run_probes"]
