"""Optimizer, schedule, the training step and loop. Imports no Ray, so the step runs and is
benchmarked with torch alone."""
