"""A tool a test needs: its path, or a skip on a developer's machine and a failure in CI.

CI must run every test (`.ci/install` installs the tools); a machine without one skips the
tests that need it rather than failing them.
"""

from __future__ import annotations

import os
import shutil

import pytest


def tool(name: str, package: str) -> str:
    """The path of ``name``; missing, the test skips, or fails when ``CI`` is set."""
    path = shutil.which(name)
    if path is None:
        message = f"needs {name} (Debian package {package}; bash .ci/install installs it)"
        if os.environ.get("CI"):
            pytest.fail(f"{message}: CI refuses to skip")
        pytest.skip(message)
    return path
