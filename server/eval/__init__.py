"""Evaluation tooling: turning benchmark decompositions into our question format."""
