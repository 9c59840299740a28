"""Pure measurements: plans, distances, transferability, similarity, statistics, gaps, regression.

Functions and frozen result dataclasses; no plotting, no run folders."""
