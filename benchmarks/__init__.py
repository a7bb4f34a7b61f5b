"""Stages of a grid: expand, prepare, train, collect/report; the CLI lives in benchmarks.run."""
