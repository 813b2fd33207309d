"""The `genie` simulator family: replay exported Databricks Genie conversations, with or without caches.

- `client`: a Genie client on databricks-sdk (ask, poll, query results, SQL on a warehouse)
- `conversations`: export a space's conversations to YAML and load them
- `cache`: the LRU layer and the semantic layer (in memory or PostgreSQL with pgvector)
- `embeddings`: the semantic layer's models (a Databricks serving endpoint, or a local offline one)
- `replayer`: the `genie` simulator
"""
