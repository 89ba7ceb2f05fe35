"""Installation facts: entry points, and our top-level `kernels` package versus Hugging Face's `kernels`."""

import subprocess
import sys
from pathlib import Path

from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]


def test_transformers_does_not_take_our_kernels_for_hub_kernels():
    """transformers probes for the hub package `kernels` by import name and then by the version of whichever
    distribution ships that name — ours, tokenwise. It must conclude 'not available' and not import from it."""
    from transformers.utils import import_utils

    import_utils.is_kernels_available.cache_clear()
    assert import_utils.is_kernels_available() is False
    import importlib.metadata as md
    ours = Version(md.version("tokenwise"))
    low, high = Version(import_utils.KERNELS_MIN_VERSION), Version(import_utils.KERNELS_MAX_VERSION)
    assert not (low <= ours < high), (
        f"tokenwise {ours} falls in transformers' accepted hub-kernels range [{low}, {high}): transformers would "
        f"import our `kernels` package as Hugging Face's; skip these versions")
    import transformers.integrations.hub_kernels as hub  # imports cleanly, without reaching into our package
    assert not hasattr(hub, "get_kernel_hub")


def test_models_load_and_run_with_our_kernels_importable():
    import kernels  # ours
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    assert Path(kernels.__file__).resolve().parent == ROOT / "kernels"
    model = LlamaForCausalLM(LlamaConfig(vocab_size=11, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))
    assert model(torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, 11)


def test_console_script_and_module_entry_point():
    exe = Path(sys.executable).parent / "tokenwise"
    for cmd in ([str(exe), "--help"], [sys.executable, "-m", "trainer", "--help"]):
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        assert out.returncode == 0, out.stderr
        assert "train" in out.stdout and "resume" in out.stdout and "check" in out.stdout
