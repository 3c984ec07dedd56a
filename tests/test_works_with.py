"""Every Python example of docs/works_with.md runs as written (each in a fresh folder)."""

from __future__ import annotations

import pathlib
import re

import pytest

DOC = pathlib.Path(__file__).resolve().parent.parent / "docs" / "works_with.md"


def _examples() -> list[tuple[str, str]]:
    text = DOC.read_text(encoding="utf-8")
    out = []
    for m in re.finditer(r"^## (.+?)\n(.*?)(?=^## |\Z)", text, flags=re.S | re.M):
        for i, block in enumerate(re.findall(r"```python\n(.*?)```", m.group(2), flags=re.S)):
            out.append((f"{m.group(1)}#{i}", block))
    return out


EXAMPLES = _examples()


def test_the_page_has_examples():
    assert len(EXAMPLES) >= 10


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("name,code", EXAMPLES, ids=[n for n, _ in EXAMPLES])
def test_example_runs(name, code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # the Hugging Face examples: no network, telemetry, trackers or tokenizer threads
    for k, v in {"HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "TOKENIZERS_PARALLELISM": "false",
                 "WANDB_DISABLED": "true"}.items():
        monkeypatch.setenv(k, v)
    exec(compile(code, f"docs/works_with.md [{name}]", "exec"), {"__name__": "__example__"})
