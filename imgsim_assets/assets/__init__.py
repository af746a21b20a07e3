"""Thin Dagster wrappers, one module per stage."""
