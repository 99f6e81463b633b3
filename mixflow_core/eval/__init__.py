"""Evaluation: metrics from the (N, K) table of log p(x|k), overlap diagnostics of the class Gaussians, baselines."""
