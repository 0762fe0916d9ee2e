"""Inputs: which images with which prompts, and dataset shards."""
