"""Importing modules loads only what they need: no heavy framework in the model modules, and no
offline code (lab, operator tools, shell) in the running services."""

from __future__ import annotations

import json
import subprocess
import sys


def _loaded_after(imports: str, watched: tuple[str, ...]) -> list[str]:
    """Top-level modules of ``watched`` loaded by ``imports``, in a fresh interpreter."""
    code = (
        f"import json, sys\n{imports}\n"
        f"print(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}} & set({watched!r}))))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    loaded: list[str] = json.loads(out.stdout)
    return loaded


def test_imports_stay_light() -> None:
    imports = (
        "import inference.embeddings, inference.index, inference.integrity\n"
        "import inference.postprocess, inference.privacy, lab.reranker"
    )
    assert _loaded_after(imports, ("torch", "transformers", "faiss")) == []


def test_services_load_no_offline_code() -> None:
    # A running service must never pull in training, operator or shell code: the lab writes
    # artifacts, serving loads them.
    imports = (
        "import streams.app, consumers.regen, consumers.cache_writer, api.app\n"
        "import inference.pool, inference.worker, inference.artifact"
    )
    assert _loaded_after(imports, ("lab", "ops", "cli")) == []
