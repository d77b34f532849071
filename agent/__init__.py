"""The daemon side: tails the spool, keeps per-run state, serves Prometheus metrics.

Runs without torch. Import ``gradwatch.agent.daemon.Agent`` to embed it.
"""
