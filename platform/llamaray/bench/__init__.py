"""Micro-benchmarks runnable with ``python -m llamaray.bench.<name>``; none needs Ray or a GPU."""
