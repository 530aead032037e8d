"""The prompt-learning parity cases shared by tests/methods/test_prompts.py and the script that captures
PEFT's outputs as fixtures (tests/fixtures/peft_prompts/capture.py)."""

from __future__ import annotations

import copy

import torch
from tiny_models import FAMILIES

import slimtune
from slimtune.methods.prompts import PROMPT_CONTAINER

TASKS = {"llama": "CAUSAL_LM", "gpt2": "CAUSAL_LM", "t5": "SEQ_2_SEQ_LM", "bert": "SEQ_CLS"}
# name -> (PEFT config class name, our config class, extra kwargs)
METHODS = {
    "prompt": ("PromptTuningConfig", slimtune.PromptTuningConfig, {}),
    "p_mlp": ("PromptEncoderConfig", slimtune.PromptEncoderConfig, {"encoder_hidden_size": 16}),
    "p_lstm": ("PromptEncoderConfig", slimtune.PromptEncoderConfig,
               {"encoder_hidden_size": 8, "encoder_reparameterization_type": "LSTM"}),
    "prefix": ("PrefixTuningConfig", slimtune.PrefixTuningConfig, {}),
    "prefix_mlp": ("PrefixTuningConfig", slimtune.PrefixTuningConfig,
                   {"prefix_projection": True, "encoder_hidden_size": 8}),
}
CASES = [(f, m) for f in TASKS for m in METHODS if not (f == "t5" and m == "p_lstm")]
GENERATE_CASES = [(f, m) for f in ("llama", "gpt2", "t5") for m in ("prompt", "p_mlp", "prefix")]


def config_kwargs(family: str, method: str, p: int = 3) -> dict:
    return {"task_type": TASKS[family], "num_virtual_tokens": p, **METHODS[method][2]}


def ours_for(base, family: str, method: str, p: int = 3):
    """Our prompt adapter on a copy of ``base`` (random prompt weights)."""
    return slimtune.add_adapter(copy.deepcopy(base), METHODS[method][1](**config_kwargs(family, method, p)))


def peft_for(base, family: str, method: str, p: int = 3):
    """PEFT's prompt adapter on a copy of ``base`` (random prompt weights); raises where PEFT refuses."""
    import peft

    config = getattr(peft, METHODS[method][0])(**config_kwargs(family, method, p))
    return peft.get_peft_model(copy.deepcopy(base), config)


def peft_adapter_state(theirs) -> dict[str, torch.Tensor]:
    """PEFT's prompt encoder and head copies under the names our model gives them."""
    return {k.removeprefix("base_model."): v.detach().clone() for k, v in theirs.state_dict().items()
            if PROMPT_CONTAINER in k or "modules_to_save" in k}


def randomise_heads(*models) -> None:
    """Make the SEQ_CLS head copies differ from the originals, identically in every model."""
    for model in models:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "modules_to_save" in name:
                    p.add_(0.1)


def strengthen_prompts(*models) -> None:
    """A strong prompt (×3), so that generation depends on it."""
    with torch.no_grad():
        for model in models:
            for name, p in model.named_parameters():
                if PROMPT_CONTAINER in name:
                    p.mul_(3)


def generate_inputs() -> dict:
    ids = torch.randint(3, 128, (2, 5), generator=torch.Generator().manual_seed(1))
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False, pad_token_id=0)


@torch.no_grad()
def greedy_by_forward(model, family: str, ids: torch.Tensor, steps: int) -> torch.Tensor:
    """Greedy decoding from first principles: a full forward pass (no cache) for every new token."""
    if family == "t5":
        out = torch.zeros(ids.shape[0], 1, dtype=torch.long)  # decoder_start_token_id
        for _ in range(steps):
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), decoder_input_ids=out,
                           use_cache=False).logits
            out = torch.cat([out, logits[:, -1].argmax(-1, keepdim=True)], 1)
        return out[:, -steps:]
    out = ids
    for _ in range(steps):
        logits = model(input_ids=out, attention_mask=torch.ones_like(out), use_cache=False).logits
        out = torch.cat([out, logits[:, -1].argmax(-1, keepdim=True)], 1)
    return out[:, -steps:]


def base_model(family: str):
    return FAMILIES[family][0]()
