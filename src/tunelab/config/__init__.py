"""Typed configuration: the single source of truth for every setting."""
