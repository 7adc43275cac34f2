"""Benchmarks: one script per op plus end-to-end training and sampling."""
