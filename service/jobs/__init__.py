"""Durable async batch jobs: a SQLite store, a worker thread that runs jobs through the Linker, and intake."""
