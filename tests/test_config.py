"""Config validation and JSON round trip."""

import pytest

from slimtune import LoraConfig, config_from_dict


@pytest.mark.parametrize("kwargs, fragment", [
    ({"r": 0}, "r=0"), ({"r": -2}, "r=-2"), ({"bias": "some"}, "bias='some'"),
    ({"lora_dropout": 1.5}, "lora_dropout=1.5"), ({"init_lora_weights": "pissa"}, "init_lora_weights='pissa'"),
    ({"task_type": "CHAT"}, "task_type='CHAT'"), ({"rank_pattern": {"q": 0}}, "rank_pattern"),
    # NaN passes `alpha <= 0`, and an infinite alpha scales the update to NaN
    ({"lora_alpha": float("nan")}, "lora_alpha=nan"), ({"lora_alpha": float("inf")}, "lora_alpha=inf"),
    ({"lora_alpha": 1e308}, "lora_alpha=1e.308 must be a positive number .*, at most 3.403e.38"),
    ({"alpha_pattern": {"q": float("nan")}}, "alpha_pattern"),
    ({"target_modules": "(q_proj"}, "is not a valid regular expression"),
])
def test_bad_values_are_named(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment.replace("[", r"\[")):
        LoraConfig(**kwargs)


def test_round_trip_and_unknown_keys_warn_only_when_set():
    config = LoraConfig(r=4, target_modules={"v_proj", "q_proj"}, use_rslora=True)
    data = config.to_dict()
    assert data["peft_type"] == "LORA" and data["target_modules"] == ["q_proj", "v_proj"]
    assert config_from_dict(data) == config
    with pytest.warns(UserWarning, match="velora_config"):  # a training-memory option: the adapter is the same
        config_from_dict({**data, "velora_config": {"rank": 4}, "eva_config": None})
    with pytest.raises(ValueError, match="use_qalora=True: PEFT's use_qalora changes the adapter"):
        config_from_dict({**data, "use_qalora": True})


def test_unknown_peft_type():
    with pytest.raises(ValueError, match="peft_type='XYZ'"):
        config_from_dict({"peft_type": "XYZ"})
