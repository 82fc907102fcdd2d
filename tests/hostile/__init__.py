"""Hostile input and security checks against a running platform (issue 9)."""
