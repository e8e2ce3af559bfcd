"""Parallel plans: plain functions applied to a model, in the order ``strategies/`` calls them."""
