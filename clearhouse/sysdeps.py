"""Debian packages some tests need beside the virtualenv (Chromium for the console's
browser tests, promtool for the alert rules), installed by `clearhouse test` itself so a
fresh clone needs nothing done by hand.

It only ever installs what is missing, and only where it can (root with apt-get); where
it cannot, it says so once and the tests that need the tool fail with that message, never
skip.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

# executable the tests look for -> Debian package that provides it
TEST_TOOLS = {
    "chromium": "chromium",
    "promtool": "prometheus",
}


def missing_packages(tools: dict[str, str] = TEST_TOOLS) -> list[str]:
    return sorted({package for executable, package in tools.items() if shutil.which(executable) is None})


def ensure_test_tools(tools: dict[str, str] = TEST_TOOLS) -> None:
    packages = missing_packages(tools)
    if not packages:
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        print(f"• missing Debian packages {', '.join(packages)}: install them (apt-get install {' '.join(packages)})",
              file=sys.stderr)
        return
    print(f"• installing Debian packages {', '.join(packages)}", file=sys.stderr)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    quiet = {"stdout": subprocess.DEVNULL, "env": env}
    if subprocess.call(["apt-get", "install", "-y", "--no-install-recommends", *packages], **quiet) != 0:
        # A fresh machine may have no package lists yet.
        subprocess.call(["apt-get", "update", "-q"], **quiet)
        subprocess.call(["apt-get", "install", "-y", "--no-install-recommends", *packages], **quiet)
