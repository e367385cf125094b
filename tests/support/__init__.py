"""Helpers shared by the end-to-end tests: fake backends and process management."""
