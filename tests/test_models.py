"""The built-in model and tokenizer go through the same from_pretrained path a user's local model takes."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tokenwise.models.builtin import build_tokenizer, save_builtin
from tokenwise.rl.errors import ModelLoadError
from tokenwise.trainer.config import BuiltinModel
from tokenwise.trainer.loading import PromptFormatter, load_causal_lm, load_tokenizer


@pytest.fixture(scope="module")
def builtin_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("builtin")
    cfg = BuiltinModel()
    save_builtin(d, seed=0, hidden_size=cfg.hidden_size, num_layers=cfg.num_layers, num_heads=cfg.num_heads,
                 num_kv_heads=cfg.num_kv_heads, intermediate_size=cfg.intermediate_size,
                 max_position_embeddings=cfg.max_position_embeddings)
    return d


def test_default_builtin_model_size_and_loading(builtin_dir):
    model = AutoModelForCausalLM.from_pretrained(builtin_dir)
    n = sum(p.numel() for p in model.parameters())
    assert 1_000_000 <= n <= 3_000_000, n
    assert model.config.model_type == "llama"


@pytest.mark.parametrize("text", ["Hello world 12 + 3 = 15\n#### 15", "  two  spaces\tand tab ~!@#$%^&*()_+{}|:<>?"])
def test_tokenizer_round_trips_through_autotokenizer(builtin_dir, text):
    tok = AutoTokenizer.from_pretrained(builtin_dir)
    ids = tok.encode(text, add_special_tokens=False)
    assert len(ids) == len(text)  # one token per character
    assert tok.decode(ids) == text


def test_chat_template_and_special_tokens(builtin_dir):
    tok = load_tokenizer(builtin_dir)
    fmt = PromptFormatter(tok, system_prompt="be brief", use_chat_template=True)
    text = fmt("12+34=")
    assert text == "<|system|>be brief<|end|><|user|>12+34=<|end|><|assistant|>"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == 1 + 8 + 1 + 1 + 6 + 1 + 1
    assert tok.eos_token == "<|end|>" and tok.pad_token == "<|pad|>" and tok.padding_side == "left"
    assert PromptFormatter(tok, system_prompt=None, use_chat_template=False)("12+34=") == "12+34="


def test_builtin_init_is_seeded(tmp_path):
    kw = dict(hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=16,
              max_position_embeddings=32)
    a = save_builtin(tmp_path / "a", seed=1, **kw)
    b = save_builtin(tmp_path / "b", seed=1, **kw)
    c = save_builtin(tmp_path / "c", seed=2, **kw)
    wa, wb, wc = (AutoModelForCausalLM.from_pretrained(p).model.embed_tokens.weight for p in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)


def test_missing_model_dir_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_causal_lm(tmp_path / "nope", dtype=torch.float32, device=torch.device("cpu"))
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_tokenizer(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="cannot load"):
        load_causal_lm(tmp_path / "empty", dtype=torch.float32, device=torch.device("cpu"))


def test_vocabulary_covers_printable_ascii():
    tok = build_tokenizer()
    assert tok.unk_token_id not in tok.encode("".join(chr(c) for c in range(32, 127)), add_special_tokens=False)
