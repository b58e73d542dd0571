"""docs/guides/peft.md runs as written: its python blocks (marked `<!-- peft-guide-snippet -->`
for tests/test_docs.py), in order, in one namespace, on the tiny BERT and a tiny Llama of
conftest (through the guide's environment variables)."""

from __future__ import annotations

import re

import pytest

from tests.conftest import REPO, decoder_tokenizer, make_tiny_model

GUIDE = REPO / "docs" / "guides" / "peft.md"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)


def test_the_guide_has_the_examples_it_promises():
    blocks = python_blocks(GUIDE.read_text())
    assert len(blocks) == 3
    assert "get_peft_model" in blocks[0] and "to_artifact" in blocks[1]
    assert "SFTTrainer" in blocks[2]


def test_the_guide_runs_as_written(tiny_model_dirs, tmp_path, monkeypatch):
    decoder = make_tiny_model(
        "llama", tmp_path / "llama", tokenizer=decoder_tokenizer(eos_appended=True)
    )
    monkeypatch.setenv("MICROTUNE_EXAMPLE_MODEL", str(tiny_model_dirs["bert"]))
    monkeypatch.setenv("MICROTUNE_EXAMPLE_DECODER", str(decoder))
    monkeypatch.setenv("MICROTUNE_EXAMPLE_STEPS", "4")
    monkeypatch.setenv("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "guide"}
    for number, block in enumerate(python_blocks(GUIDE.read_text()), 1):
        try:
            exec(compile(block, f"{GUIDE.name} block {number}", "exec"), namespace)
        except Exception as error:  # name the block that broke
            pytest.fail(f"block {number} of {GUIDE.name} failed: {error!r}")
    assert (tmp_path / "slash-adapter" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "slash-artifact" / "microtune.json").is_file()
    assert namespace["trainer"].state.global_step == 4
