"""Shared fixtures. Each lives in tests/plugins/ and is loaded here."""

pytest_plugins = ["tests.plugins.s3"]
