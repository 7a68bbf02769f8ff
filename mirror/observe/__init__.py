"""Operator views of a running agent: Prometheus metrics, `top`, latency stats."""
