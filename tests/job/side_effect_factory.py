"""A factory module whose import writes a file: the proof that a refused factory is never imported.

Importing it creates the file named by ``UNLEARN_TEST_SIDE_EFFECT`` (when
set), as an attacker's module could do anything at import time.
"""

from __future__ import annotations

import os
from pathlib import Path

from torch import nn

from unlearn.demo import mlp

if os.environ.get("UNLEARN_TEST_SIDE_EFFECT"):
    Path(os.environ["UNLEARN_TEST_SIDE_EFFECT"]).write_text("imported\n")


def build() -> nn.Module:
    return mlp()
