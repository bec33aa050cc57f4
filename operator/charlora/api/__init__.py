"""The API types (pydantic): the single source of truth for the CRDs, the operator, the trainer and the server."""
