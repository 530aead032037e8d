"""``data.packing: true`` only where packed examples stay apart: the probe runs the model itself."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import transformers as T
from run_helpers import tiny_recipe, write_recipe
from torch import nn
from train_helpers import tiny_llama

from slimtune.cli import main
from slimtune.train import runner
from slimtune.train.packing import packing_refusal
from slimtune.train.recipe import recipe_from_dict
from slimtune.train.runner import check_packing
from slimtune.train.schema import RecipeError

CPU = torch.device("cpu")
V = 100


def _model(name: str) -> nn.Module:
    torch.manual_seed(0)
    return {
        "opt": lambda: T.OPTForCausalLM(T.OPTConfig(vocab_size=V, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                                                    num_attention_heads=4, word_embed_proj_dim=32)),
        "bloom": lambda: T.BloomForCausalLM(T.BloomConfig(vocab_size=V, hidden_size=32, n_layer=2, n_head=4)),
        "gpt2": lambda: T.GPT2LMHeadModel(T.GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4,
                                                       bos_token_id=0, eos_token_id=0)),
    }[name]()


class AbsolutePositionsOnly(nn.Module):
    """Each token's logits from its own id and its absolute place in the row: nothing leaks between examples,
    but the positions never restart (``position_ids`` ignored)."""

    def __init__(self) -> None:
        super().__init__()
        self.config = SimpleNamespace(vocab_size=V)
        self.tokens, self.places = nn.Embedding(V, V), nn.Embedding(64, V)

    def forward(self, input_ids, position_ids=None, attention_mask=None, use_cache=False):
        places = torch.arange(input_ids.shape[1])[None]
        return SimpleNamespace(logits=self.tokens(input_ids) + self.places(places))


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_models_whose_mask_follows_the_restarting_positions_may_pack(name):
    model = tiny_llama(vocab_size=V) if name == "llama" else _model(name)
    model.train()
    assert packing_refusal(model, CPU) is None
    assert model.training  # the probe leaves the mode as it was


@pytest.mark.parametrize("name", ["opt", "bloom"])
def test_models_that_let_packed_examples_see_each_other_are_refused(name):
    refusal = packing_refusal(_model(name), CPU)
    assert refusal is not None and "lets packed examples attend to each other" in refusal
    recipe = recipe_from_dict({"method": {"peft_type": "LORA"}, "data": {"packing": True}})
    with pytest.raises(RecipeError, match=r"data\.packing: true: .*ForCausalLM lets packed examples attend .*set "
                                          r"data\.packing: false"):
        check_packing(recipe, _model(name), CPU)
    check_packing(recipe_from_dict({"method": {"peft_type": "LORA"}}), _model(name), CPU)  # packing off: no probe


def test_positions_that_do_not_restart_are_refused_too():
    refusal = packing_refusal(AbsolutePositionsOnly(), CPU)
    assert refusal is not None and "positions do not restart" in refusal


def test_slimtune_train_probes_the_model_it_trains_before_writing_the_run(tmp_path, monkeypatch, capsys):
    probed = []

    def refusal(model, device):
        probed.append(type(model).__name__)
        return "a reason"

    monkeypatch.setattr(runner, "packing_refusal", refusal)
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(tmp_path, quantized=False, data={"packing": True}))
    assert main(["train", str(recipe), "--no-progress"]) == 2
    assert "data.packing: true: a reason; set data.packing: false" in capsys.readouterr().err
    assert probed == ["LlamaForCausalLM"] and not (tmp_path / "run").exists()
