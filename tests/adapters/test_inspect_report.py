"""``adapters inspect``'s report: what it says of an adapter beyond the checks that refuse it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from nlora_serve.adapters.inspect import format_report, inspect_adapter

LOWER = Path(__file__).resolve().parents[2] / "examples" / "tenants" / "lower"


def test_inspect_names_the_base_model_the_config_says_it_was_trained_on(tmp_path, base_fp32):
    # h141: a PEFT LoRA saved for another model of the same shapes (HF's SmolLM2-135M-Instruct, not the
    # served Q4_1 GGUF's de-quantized weights) loads without a word, as in vLLM; inspect now shows the
    # config's base_model_name_or_path beside what it checked, so the mismatch is visible before serving.
    folder = Path(shutil.copytree(LOWER, tmp_path / "peft-lora"))
    config = json.loads((folder / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "HuggingFaceTB/SmolLM2-135M-Instruct"
    (folder / "adapter_config.json").write_text(json.dumps(config))
    report = inspect_adapter(folder, base_fp32)
    assert report.config_base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    lines = format_report(report).splitlines()
    assert lines[1] == ("trained on    HuggingFaceTB/SmolLM2-135M-Instruct (adapter_config.json's "
                        "base_model_name_or_path; not checked: the shapes are)"), lines
    assert json.loads(format_report(report, as_json=True))["config_base_model"] == \
        "HuggingFaceTB/SmolLM2-135M-Instruct"
    del config["base_model_name_or_path"]  # absent: no line, as before
    (folder / "adapter_config.json").write_text(json.dumps(config))
    report = inspect_adapter(folder, base_fp32)
    assert report.config_base_model is None
    assert not any(line.startswith("trained on") for line in format_report(report).splitlines())
