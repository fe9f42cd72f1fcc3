"""Offline tools behind `el`: index build, evaluation (student pipeline and the OT-MEL teacher), latency bench,
rerank-weight tuning and the training entry point. The request path (app, routes, pipeline, jobs) never
imports this package (tests/test_import_rules.py); these modules import the online ones, to measure and build
exactly what is served."""
