"""Celery app and tasks that wire adapters, aggregation, store and state together."""
