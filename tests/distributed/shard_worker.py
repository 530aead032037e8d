"""One rank of the per-rank loading test: ``torchrun --nproc-per-node 2 shard_worker.py MODEL_DIR OUT_DIR``.

Builds the model empty, shards it with FSDP2, fills this rank's rows from the checkpoint
(slimtune.distributed.sharded_load), and writes what the rank holds: OUT_DIR/rank{r}.safetensors (each 4-bit
layer's local packed codes and scales, its replicated double-quant statistics, the logits of a forward) and
OUT_DIR/rank{r}.json (the rows of each checkpoint tensor this rank read).
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

import torch
import transformers
from safetensors.torch import save_file

from slimtune.distributed.context import process_group
from slimtune.distributed.sharded_load import fill_shards, quantized_skeleton
from slimtune.distributed.wrap import wrap_model
from slimtune.quant import Linear4bit, QuantConfig
from slimtune.quant.streaming import checkpoint_source
from slimtune.train.models import empty_model

CONFIG = QuantConfig(blocksize=32, double_quant=True, compute_dtype="float32")

if __name__ == "__main__":
    torch.set_num_threads(1)
    folder, out = Path(sys.argv[1]), Path(sys.argv[2])
    with process_group("cpu") as ctx:
        model = empty_model(transformers.AutoConfig.from_pretrained(folder)).requires_grad_(False)  # a frozen base
        files = contextlib.ExitStack()  # closed by fill_shards
        plan = quantized_skeleton(model, checkpoint_source(folder, files), CONFIG, ctx.device)
        plan.files = files
        wrap_model(model, "fsdp", ctx)
        fill_shards(plan, ctx)
        held: dict[str, torch.Tensor] = {}
        for name, layer in model.named_modules():
            if isinstance(layer, Linear4bit):
                for attr in ("weight", "absmax", "nested_absmax", "nested_offset"):
                    t = getattr(layer, attr)
                    held[f"{name}.{attr}"] = (t.to_local() if hasattr(t, "to_local") else t).contiguous().clone()
        with torch.no_grad():
            held["logits"] = model(torch.arange(12).view(2, 6)).logits.contiguous()
        save_file(held, str(out / f"rank{ctx.rank}.safetensors"))
        (out / f"rank{ctx.rank}.json").write_text(json.dumps(plan.source.rows_read))
