"""Evaluation: generate, score, judge, compare."""
