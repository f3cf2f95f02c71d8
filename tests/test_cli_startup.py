"""The CLI starts without the deep-learning stack: --help and argument errors never import torch."""

import subprocess
import sys

import pytest


def _modules_after(code: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", code + "\nimport sys\nprint(' '.join(sorted(sys.modules)))"],
        capture_output=True,
        text=True,
        check=True,
    )
    return set(out.stdout.split())


def test_importing_the_cli_loads_no_torch_faiss_or_pandas():
    loaded = _modules_after("import retrieval.cli.main")
    assert not {"torch", "faiss", "pandas", "timm", "streamlit"} & loaded


@pytest.mark.slow
def test_help_runs_without_torch():
    code = (
        "from retrieval.cli.main import main\n"
        "for argv in (['--help'], ['index', '--help'], ['query', '--help']):\n"
        "    assert main(argv) == 0\n"
    )
    assert "torch" not in _modules_after(code)
