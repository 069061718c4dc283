"""Measured placement and per-stage tuning: profile the stages, plan placement and batching, tune live."""
