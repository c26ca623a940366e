"""retrieval_service."""
