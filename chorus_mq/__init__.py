"""chorus-mq: exact federated LoRA aggregation over Redis, Celery and S3."""

__version__ = "0.1.0"
