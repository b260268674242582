"""Evaluation of trained checkpoints as the LLaMA paper reports it: log-likelihood scoring
(`lm.py`, `scoring.py`), the paper's benchmarks from their published files
(`benchmarks.py`), sampled answers and code (`sampling.py`, `sandbox.py`), over Ray into
MLflow (`runner.py`, `report.py`). docs/evaluation.md is the guide."""
