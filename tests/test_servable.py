"""Models we cannot serve are refused at start-up with one line, before any replica starts."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from replica.loading.servable import UnsupportedModel, check_servable
from replica.loading.source import VENDORED_CONFIGS, VENDORED_TOKENIZER, resolve
from tests.server_process import ROOT
from tests.test_moe import save_tiny_moe

MOE_CONFIG = VENDORED_CONFIGS / "qwen3-30b-a3b-instruct-2507" / "config.json"


def config_dir(tmp_path: Path, **changes) -> Path:
    raw = {**json.loads(MOE_CONFIG.read_text()), **changes}
    (tmp_path / "config.json").write_text(json.dumps(raw))
    return tmp_path


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"model_type": "llama"}, "model_type 'llama' is not served"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope scaling 'yarn'"),
        ({"attention_bias": True}, "attention_bias"),
        ({"mlp_only_layers": [0]}, "mlp_only_layers"),
    ],
)
def test_config_refusals_name_what_is_unsupported(tmp_path, changes, reason):
    with pytest.raises(UnsupportedModel, match=reason):
        resolve(str(config_dir(tmp_path, **changes)), random_weights=True)


def test_served_configs_pass(tmp_path):
    for name in ("qwen3-4b", "qwen3-4b-instruct-2507", "qwen3-30b-a3b-instruct-2507"):
        check_servable(resolve(str(VENDORED_CONFIGS / name), random_weights=True))


def templated_model(tmp_path: Path, generation_prompt: str) -> Path:
    tokenizer = tmp_path / "model"
    shutil.copytree(VENDORED_TOKENIZER, tokenizer)
    settings = json.loads((tokenizer / "tokenizer_config.json").read_text())
    settings["chat_template"] = (
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n" + generation_prompt + "{% endif %}"
    )
    (tokenizer / "tokenizer_config.json").write_text(json.dumps(settings))
    shutil.copy(MOE_CONFIG, tokenizer / "config.json")
    return tokenizer


def test_templates_are_classified_and_one_of_no_known_kind_is_refused(tmp_path):
    always = templated_model(tmp_path / "always", "<think>\n")  # the Thinking-2507 shape
    assert check_servable(resolve(str(always), random_weights=True)) is None
    assert resolve(str(always), random_weights=True).codec().reasoning == "always"
    assert resolve("tiny-random").codec().reasoning == "hybrid"
    assert resolve("tiny-random-thinking").codec().reasoning == "always"
    odd = templated_model(tmp_path / "odd", "<reasoning>\n")
    with pytest.raises(UnsupportedModel, match="neither thinking-free, hybrid nor always"):
        check_servable(resolve(str(odd), random_weights=True))


@pytest.fixture(scope="module")
def moe_checkpoint(tmp_path_factory) -> Path:
    return save_tiny_moe(tmp_path_factory.mktemp("moe"))


def edited_copy(source: Path, target: Path, edit) -> Path:
    """A copy of the checkpoint whose first shard went through `edit(tensors)`."""
    shutil.copytree(source, target)
    shard = sorted(target.glob("*.safetensors"))[0]
    tensors = load_file(shard)
    edit(tensors)
    save_file(tensors, shard, metadata={"format": "pt"})
    return target


def test_missing_and_unused_tensors_are_refused(moe_checkpoint, tmp_path):
    check_servable(resolve(str(moe_checkpoint)))

    def drop(tensors: dict) -> None:
        tensors.pop(sorted(tensors)[0])

    def add(tensors: dict) -> None:
        tensors["model.layers.0.mlp.shared_expert.weight"] = next(iter(tensors.values())).clone()

    for edit, what in ((drop, "missing"), (add, "unused: model.layers.0.mlp.shared_expert")):
        with pytest.raises(UnsupportedModel, match=f"checkpoint tensors {what}"):
            check_servable(resolve(str(edited_copy(moe_checkpoint, tmp_path / what[:6], edit))))


def test_server_exits_at_start_up_with_one_line(tmp_path):
    model = config_dir(tmp_path, rope_scaling={"rope_type": "yarn", "factor": 4.0})
    command = [sys.executable, str(ROOT / "server.py"), "--model", str(model), "--gpus", ""]
    result = subprocess.run(
        [*command, "--random-weights", "--port", "0"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"cannot serve {model}: qwen3_moe with rope scaling 'yarn' (e.g. YaRN) is not supported"
    )
