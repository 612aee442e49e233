"""The package's version equals the Rust crates'."""

from __future__ import annotations

import re
from importlib.metadata import version

import pytest
from conftest import REPO

import novasandbox


def test_version_equals_the_crates():
    assert novasandbox.__version__ == version("novasandbox")
    cargo = REPO / "Cargo.toml"
    if not cargo.exists():
        pytest.skip("SKIP: not in the NovaSandbox repository")
    workspace = cargo.read_text().split("[workspace.package]", 1)[1]
    match = re.search(r'^version\s*=\s*"([^"]+)"', workspace, re.M)
    assert match is not None
    assert novasandbox.__version__ == match.group(1)
