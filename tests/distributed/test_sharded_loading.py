"""Per-rank loading of a 4-bit base under FSDP2 (slimtune.distributed.sharded_load), on 2 gloo ranks: each rank's
shards are bit for bit the rows of a one-process load, double quantization included, and each rank reads only
its own rows of every quantized weight."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from dist_helpers import check, torchrun
from safetensors.torch import load_file
from train_helpers import make_tokenizer
from transformers import AutoConfig, AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

from slimtune.compat import KEYS_CONVERTED_ON_LOAD
from slimtune.core.tensor_files import SafetensorsReader
from slimtune.distributed.sharded_load import WholeLoadNeeded, load_skeleton, shard_rows
from slimtune.distributed.wrap import fsdp_shards_integer_parameters
from slimtune.quant import Linear4bit, load_quantized
from slimtune.quant.sharded_nf4 import make_model_shardable
from slimtune.train.models import empty_model
from slimtune.train.recipe import recipe_from_dict

pytestmark = pytest.mark.skipif(not fsdp_shards_integer_parameters(),
                                reason="this torch's FSDP2 cannot shard the packed 4-bit base")
WORKER = Path(__file__).resolve().parent / "shard_worker.py"


def test_shard_rows_is_fsdp2s_torch_chunk_split():
    for rows in (1, 2, 5, 301):
        for world in (1, 2, 3, 4):
            parts = torch.arange(rows).chunk(world)
            for rank in range(world):
                start, stop = shard_rows(rows, world, rank)
                expected = parts[rank].tolist() if rank < len(parts) else []
                assert list(range(start, stop)) == expected


@pytest.fixture(scope="module")
def loaded(tmp_path_factory) -> Path:
    """A tiny Qwen2 (a LLaMA with q/k/v biases, made non-zero here) whose MLP has 301 rows (odd: the ranks hold
    151 and 150) of 4 blocks of 32 values, so the gate/up layers' 1,204 scales make 5 double-quantization blocks
    of 256 and block 2 (scales 512-767) is split between the ranks (rank 0 ends at scale 603); down_proj (301
    columns) is not whole blocks per row and stays replicated, as do the root's frozen embeddings, final norm
    and (untied) output head. Loaded per rank by shard_worker.py."""
    tmp = tmp_path_factory.mktemp("per-rank")
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=96, hidden_size=128, intermediate_size=301, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = Qwen2ForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_()  # the sharded biases reach the logits
    model.save_pretrained(tmp / "model")
    (tmp / "out").mkdir()
    check(torchrun(str(WORKER), str(tmp / "model"), str(tmp / "out"), fresh=lambda: None))  # files rewritten
    return tmp


def _one_process(folder: Path) -> torch.nn.Module:
    from shard_worker import CONFIG

    model = load_quantized(empty_model(AutoConfig.from_pretrained(folder)), folder, CONFIG)
    make_model_shardable(model)
    return model


def test_each_rank_holds_the_rows_of_the_one_process_quantization(loaded):
    whole = _one_process(loaded / "model")
    ranks = [load_file(loaded / "out" / f"rank{r}.safetensors") for r in range(2)]
    layers = {n: m for n, m in whole.named_modules() if isinstance(m, Linear4bit)}
    assert len(layers) == 14
    sharded = [n for n, m in layers.items() if m.weight.dim() == 2 and m.weight.shape[0] == 301]
    assert len(sharded) == 4 and whole.get_submodule(sharded[0]).absmax.numel() > 4 * 256
    for name, layer in layers.items():
        rows_layout = isinstance(layer.weight, torch.nn.Parameter)
        for rank, held in enumerate(ranks):
            start, stop = shard_rows(layer.out_features, 2, rank) if rows_layout else (0, layer.out_features)
            for attr in ("weight", "absmax"):
                expected = getattr(layer, attr)[start:stop] if rows_layout else getattr(layer, attr)
                assert torch.equal(held[f"{name}.{attr}"], expected), f"rank {rank}: {name}.{attr}"
            for attr in ("nested_absmax", "nested_offset"):  # replicated: the whole layer's, as one process
                assert torch.equal(held[f"{name}.{attr}"], getattr(layer, attr)), f"rank {rank}: {name}.{attr}"
    logits = whole(torch.arange(12).view(2, 6)).logits
    for held in ranks:
        torch.testing.assert_close(held["logits"], logits, rtol=1e-5, atol=1e-6)


def test_each_rank_reads_only_its_own_rows(loaded):
    """The seam: the rows of each checkpoint tensor a rank read. A rank that read (and so quantized) a whole
    layer to keep its part would count every row."""
    with SafetensorsReader(loaded / "model" / "model.safetensors") as checkpoint:
        rows = {key: checkpoint.shape(key)[0] for key in checkpoint.keys()}
    for rank in range(2):
        read = json.loads((loaded / "out" / f"rank{rank}.json").read_text())
        assert set(read) == set(rows)
        for key, count in read.items():
            if key.endswith("down_proj.weight") or not key.startswith("model.layers."):
                assert count == rows[key]  # replicated, read whole: 301 columns are not whole blocks; the root
                continue
            start, stop = shard_rows(rows[key], 2, rank)
            assert count == stop - start, f"rank {rank} read {count} rows of {key} (its own: {start}:{stop})"


def test_a_checkpoint_transformers_merges_on_load_is_loaded_whole(tmp_path):
    """A mixture of experts stored expert by expert (transformers 5 merges them into 3-D parameters while
    loading) cannot be read row range by row range: the per-rank loader raises WholeLoadNeeded, on which the run
    loads the model whole."""
    config = AutoConfig.for_model("qwen3_moe", vocab_size=96, hidden_size=64, intermediate_size=96, head_dim=16,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                  num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)
    model = AutoModelForCausalLM.from_config(config)
    if not (KEYS_CONVERTED_ON_LOAD and any(p.dim() == 3 for p in model.parameters())):
        pytest.skip("this transformers loads the experts as stored")
    model.save_pretrained(tmp_path / "moe")
    make_tokenizer().save_pretrained(tmp_path / "moe")
    recipe = recipe_from_dict({"model": {"name_or_path": str(tmp_path / "moe")}, "quantization": {"bits": 4},
                               "method": {"peft_type": "LORA", "target_modules": "all-linear"},
                               "data": {"dataset": "pycode"}, "output": {"dir": str(tmp_path / "run")}})
    with pytest.raises(WholeLoadNeeded, match="merged"):
        load_skeleton(recipe, torch.device("cpu"))


def test_a_folder_quantized_by_bitsandbytes_is_loaded_whole_also_when_the_section_skips_its_quantized_layers(
        tmp_path):
    """Its producer quantized the MLP and kept attention in full precision; the recipe's section skips the MLP:
    per rank, the attention layers were quantized and the MLP's packed codes read as full-precision weights (a
    crash). It loads whole, as stored."""
    from oracles import bitsandbytes_oracle
    from transformers import BitsAndBytesConfig

    bitsandbytes_oracle()
    config = Qwen2Config(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2)
    Qwen2ForCausalLM(config).save_pretrained(tmp_path / "full")
    kept = ["lm_head", "q_proj", "k_proj", "v_proj", "o_proj"]
    stored = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", llm_int8_skip_modules=kept,
                                bnb_4bit_compute_dtype=torch.float32)
    AutoModelForCausalLM.from_pretrained(tmp_path / "full", quantization_config=stored, device_map="cpu",
                                         dtype=torch.float32).save_pretrained(tmp_path / "bnb")
    make_tokenizer().save_pretrained(tmp_path / "bnb")
    recipe = recipe_from_dict({"model": {"name_or_path": str(tmp_path / "bnb")},
                               "quantization": {"bits": 4, "skip_modules": ["lm_head", "gate_proj", "up_proj",
                                                                           "down_proj"]},
                               "method": {"peft_type": "LORA", "target_modules": "all-linear"},
                               "data": {"dataset": "pycode"}, "output": {"dir": str(tmp_path / "run")}})
    with pytest.raises(WholeLoadNeeded, match=r"mlp\.\w+_proj\.weight is stored quantized"):
        load_skeleton(recipe, torch.device("cpu"))
