"""Importing the model modules loads no model and no heavy framework (torch, faiss)."""

from __future__ import annotations

import subprocess
import sys


def test_imports_stay_light() -> None:
    code = (
        "import sys\n"
        "import inference.embeddings, inference.index, inference.integrity\n"
        "import inference.postprocess, inference.privacy, lab.reranker\n"
        "print(sorted(m for m in ('torch', 'transformers', 'faiss') if m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == "[]"
