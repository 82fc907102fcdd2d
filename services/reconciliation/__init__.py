"""The reconciliation service."""
