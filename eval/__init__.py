"""Evaluation: metrics (Dice, IoU, HD95, NSD), the benchmark suite, tables and plots.

Import submodules explicitly (``from eval import metrics``); never ``import eval`` bare."""
