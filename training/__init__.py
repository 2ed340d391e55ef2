"""Distillation of learned solvers: the loop that train.py runs (training_loop.py)."""
