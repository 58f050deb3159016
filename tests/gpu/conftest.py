"""GPU-only tests: collected only when STREAMFN_REQUIRE_GPU=1 (a machine with a CUDA GPU and
`pip install -e ".[gpu,dev]"`). CI on CPU machines does not select them, so they neither run nor skip
there. Run: STREAMFN_REQUIRE_GPU=1 python -m pytest tests/gpu -m gpu -q"""
from __future__ import annotations

import os

collect_ignore_glob = [] if os.environ.get("STREAMFN_REQUIRE_GPU") == "1" else ["test_*.py"]
