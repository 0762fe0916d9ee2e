"""Weights: reading, checking, fetching and loading checkpoints, and their cache."""
