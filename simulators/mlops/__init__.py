"""The `mlops` simulator family: ML training loops logging metrics to an ingestion pipeline.

- `curves`: realistic training curves (loss falling, accuracy rising, with noise)
- `ingest`: `mlops-http`, the seed's raw NDJSON requests to `/ingest/metrics|logs|data`
- `pluto_loop`: `mlops-sdk`, training runs through the real pluto-ml SDK
- `mlflow_loop`: `mlops-mlflow`, the same loop through the real MLflow client
"""
