"""Shared fixtures. Each lives in tests/plugins/ and is loaded here."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

pytest_plugins = ["tests.plugins.s3", "tests.plugins.ray_cluster", "tests.plugins.ray_head",
                  "tests.plugins.torch_threads"]
