"""Shared state in Redis: real Redis, Valkey and Redis Cluster servers (see conftest.py)."""
