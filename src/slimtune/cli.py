"""The ``slimtune`` command: train | recipes | estimate | generate | eval | merge.

    slimtune train                                   # the default recipe (QLoRA, SmolLM2, pycode)
    slimtune train lora-smollm2-pycode training.max_steps=20 output.dir=runs/try
    slimtune train lora-smollm2-pycode --resume      # continue after Ctrl-C
    slimtune generate --adapter runs/qlora-smollm2-pycode/adapter -p "Write a function that ..."
    slimtune eval --adapter runs/qlora-smollm2-pycode/adapter
    slimtune merge --adapter runs/qlora-smollm2-pycode/adapter --output merged/
    slimtune estimate qlora-smollm2-pycode --device h200     # will it fit, and how long?

User errors (bad recipe key, missing file, ...) print ``error: <message>`` and exit with status 2;
set ``SLIMTUNE_DEBUG=1`` to see the traceback instead.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from slimtune.errors import SlimtuneError
from slimtune.train.pycode import VALIDATION_FRACTION

NO_TEMPLATE_HELP = ("use the plain ### Instruction template (default: the template the adapter's training run used, "
                    "else the tokenizer's chat template when it has one)")
ACTIVE_HELP = "comma-separated adapter names to use together (default: the first)"

# RecipeError is a ValueError; SlimtuneError covers the rest (NotMergeableError is a RuntimeError)
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError, SlimtuneError)


def positive_int(text: str) -> int:
    """An argparse type: a whole number ≥ 1 (a batch size, a count, a length)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def non_negative_float(text: str) -> float:
    """An argparse type: a finite number ≥ 0 (a temperature)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 <= value < math.inf:
        raise argparse.ArgumentTypeError(f"{value} must be a finite number ≥ 0")
    return value


def fraction(text: str) -> float:
    """An argparse type: a number strictly between 0 and 1 (a share of the rows)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be between 0 and 1 (exclusive)")
    return value


def _recipe_and_overrides(args: argparse.Namespace, command: str) -> tuple[str | None, list[str]]:
    """(the recipe named, its key=value overrides): `slimtune train key=value` uses the default recipe; a recipe
    given after an override is an error that says to put it first (it would be read as an override)."""
    recipe_arg, overrides = args.recipe, list(args.overrides)
    if recipe_arg is not None and "=" in recipe_arg and not Path(recipe_arg).exists():
        recipe_arg, overrides = None, [recipe_arg, *overrides]
    misplaced = [item for item in overrides if "=" not in item]
    if misplaced:
        raise ValueError(f"{misplaced[0]!r} is not a key=value override; name the recipe first, then the overrides: "
                         f"slimtune {command} {misplaced[0]} {' '.join(o for o in overrides if '=' in o)}".rstrip())
    return recipe_arg, overrides


def _cmd_train(args: argparse.Namespace) -> int:
    from slimtune.train.recipe import DEFAULT_RECIPE, load_recipe
    from slimtune.train.runner import run_recipe

    recipe_arg, overrides = _recipe_and_overrides(args, "train")
    recipe = load_recipe(recipe_arg or DEFAULT_RECIPE, overrides)
    if args.dry_run:
        from slimtune.train.dry_run import dry_run

        print(recipe.to_yaml())
        print(dry_run(recipe, resume=args.resume, ranks=args.nproc_per_node or 1))
        return 0
    if args.nproc_per_node is not None:  # start torchrun with that many ranks of this command
        from slimtune.distributed.launch import launch

        flags = [flag for flag, on in (("--resume", args.resume), ("--force", args.force),
                                       ("--no-progress", args.no_progress)) if on]
        return launch(args.nproc_per_node, [*([recipe_arg] if recipe_arg else []), *overrides, *flags])
    from slimtune.distributed.run import distributed_requested, run_distributed

    run = run_distributed if distributed_requested(recipe) else run_recipe  # torchrun or a `distributed` section
    result = run(recipe, resume=args.resume, show_progress=not args.no_progress, force=args.force)
    return 0 if result.finished else 130


def _cmd_recipes(args: argparse.Namespace) -> int:
    from slimtune.train.recipe import RECIPE_DIR, list_recipes, recipe_summary

    recipes = list_recipes()
    if not recipes:
        print(f"no shipped recipes found in {RECIPE_DIR}")
        return 1
    print(f"shipped recipes ({RECIPE_DIR}):")
    width = max(len(p.stem) for p in recipes)
    for path in recipes:
        description, command = recipe_summary(path)
        print(f"  {path.stem:<{width}}  {description}\n  {'':<{width}}  run: {command}")
    return 0


def _adapters(args: argparse.Namespace):
    from slimtune.train.inference import parse_adapter_arg

    return [parse_adapter_arg(text, i) for i, text in enumerate(args.adapter or [])]


def _active(args: argparse.Namespace) -> list[str] | None:
    return [a for a in args.active.split(",") if a] if args.active else None


def _load(args: argparse.Namespace, active: list[str] | None = None):
    from slimtune.train.inference import load_with_adapters

    return load_with_adapters(args.model, _adapters(args), args.load_in_4bit, args.device, args.dtype, active,
                              log=lambda m: print(m, file=sys.stderr), kernels=args.kernels,
                              allow_pickle=args.allow_pickle)


def _cmd_generate(args: argparse.Namespace) -> int:
    from slimtune.train.generation import generate_text
    from slimtune.train.inference import run_data

    prompt = args.prompt if args.prompt != "-" else sys.stdin.read().rstrip("\r\n")  # `echo` ends with a newline
    model, tokenizer = _load(args, _active(args))
    template = False if args.no_chat_template else run_data(_adapters(args)).get("use_chat_template")
    generate_text(model, tokenizer, prompt, args.max_new_tokens, template,
                  stream=sys.stdout, temperature=args.temperature, raw=args.raw, system=args.system)
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from slimtune.train.data import load_examples
    from slimtune.train.generation import position_limit, virtual_positions
    from slimtune.train.inference import DEFAULT_EVAL_LENGTH, adapters_task_type, run_data
    from slimtune.train.losses import evaluate_loss
    from slimtune.train.tokenization import tokenize_examples

    examples = load_examples(args.data, split=args.split, validation_fraction=args.validation_fraction,
                             max_examples=args.max_examples)
    adapters = _adapters(args)
    seq2seq = "`slimtune eval` scores causal language models (each example's answer after its prompt); {} a " \
              "sequence-to-sequence model: evaluate it from Python, or read its answers with `slimtune generate`."
    if adapters and adapters_task_type(adapters) not in (None, "CAUSAL_LM"):  # before the (slow) model load
        raise ValueError(seq2seq.format("the adapter is for"))
    model, tokenizer = _load(args, _active(args))
    if getattr(model.config, "is_encoder_decoder", False):
        raise ValueError(seq2seq.format(f"{type(model).__name__} is"))
    trained = run_data(adapters)  # default to how the adapter's training run read its data
    length = args.max_seq_length or trained.get("max_seq_length") or DEFAULT_EVAL_LENGTH
    limit = position_limit(model.config)
    if limit is not None and length > limit - virtual_positions(model):
        limit -= virtual_positions(model)
        if args.max_seq_length:
            print(f"--max-seq-length {length} is beyond the model's {limit} positions: rows are cut at {limit}",
                  file=sys.stderr)
        length = limit
    template = False if args.no_chat_template else trained.get("use_chat_template")
    rows = tokenize_examples(examples, tokenizer, length, False, template)
    device = next(model.parameters()).device
    loss = evaluate_loss(model, rows.rows, args.batch_size, tokenizer.pad_token_id, device)
    cut = rows.stats
    left_out = f"; {cut.n_truncated} cut at and {cut.n_dropped} left out by --max-seq-length {length}" \
        if cut.n_truncated or cut.n_dropped else ""
    print(f"eval loss {loss:.4f} | perplexity {math.exp(min(loss, 50)):.3f} | "
          f"{len(rows)} examples, {rows.stats.n_label_tokens:,} tokens with a loss ({args.data!r}, "
          f"split {args.split!r}{left_out})")
    return 0


def _cmd_estimate(args: argparse.Namespace) -> int:
    import json

    from slimtune.estimate import estimate, estimate_json, format_estimate
    from slimtune.train.recipe import DEFAULT_RECIPE, load_recipe

    recipe_arg, overrides = _recipe_and_overrides(args, "estimate")
    recipe = load_recipe(recipe_arg or DEFAULT_RECIPE, overrides)
    if args.nproc_per_node < 1 or (args.nnodes or 1) < 1:
        raise ValueError(f"--nproc-per-node {args.nproc_per_node} --nnodes {args.nnodes}: use at least 1 of each.")
    result = estimate(recipe, device=args.device, memory=args.memory,
                      ranks=args.nproc_per_node * (args.nnodes or 1), per_machine=args.nproc_per_node)
    print(json.dumps(estimate_json(result), indent=2) if args.json else format_estimate(result))
    return 0 if result.fits else 1


def _cmd_merge(args: argparse.Namespace) -> int:
    from slimtune.core.files import check_creatable
    from slimtune.train.inference import (
        check_merge_options,
        check_merged_output,
        export_adapter_gguf,
        export_merged,
        export_merged_gguf,
    )

    quant, args.load_in_4bit = check_merge_options(args.format, args.quant, args.base_precision, args.load_in_4bit,
                                                   args.dtype, len(args.adapter))
    if args.pre is not None and args.format != "gguf":
        raise ValueError(f"--pre {args.pre} names the pre-tokenizer of a merged GGUF model (--format gguf); "
                         f"--format {args.format} writes no tokenizer.")
    output = Path(args.output)
    check_creatable(output, f"the {args.format} output")  # before the model loads
    if args.format != "folder" and output.is_dir():
        raise ValueError(f"--output {output} is a folder; --format {args.format} writes one file, e.g. "
                         f"{output / ('adapter.gguf' if args.format == 'gguf-lora' else 'model.gguf')}.")
    if output.exists() and (not output.is_dir() or any(output.iterdir())) and not args.overwrite:
        raise FileExistsError(f"--output {output} already exists and is not empty; pass --overwrite or another path.")
    if args.format == "folder":  # --overwrite replaces a merged model, never the user's files or an input
        check_merged_output(output, args.model, [Path(path) for _, path in _adapters(args)])
    if args.format == "gguf-lora":
        export_adapter_gguf(_adapters(args)[0][1], output, args.model, quant or "f32")
        print(f"GGUF LoRA adapter ({quant}) written to {output} (llama.cpp: llama-cli -m BASE.gguf --lora {output}; "
              f"Ollama: ADAPTER {output})")
        return 0
    model, tokenizer = _load(args, active=[name for name, _ in _adapters(args)])  # several: their updates add up
    if args.format == "gguf":
        export_merged_gguf(model, tokenizer, output, quant or "f16", pre=args.pre)
        print(f"merged model ({quant}) written to {output} (llama.cpp: llama-cli -m {output}; Ollama: FROM {output})")
    else:
        export_merged(model, tokenizer, output, args.dtype)
        auto = "AutoModelForSeq2SeqLM" if getattr(model.config, "is_encoder_decoder", False) else "AutoModelForCausalLM"
        print(f"merged model written to {output} (load it with transformers' {auto}.from_pretrained)")
    return 0


def _model_options(parser: argparse.ArgumentParser, adapters: str) -> None:
    parser.add_argument("--model", default=None,
                        help="base model: 'default' (embedded SmolLM2-135M-Instruct), a folder, a .gguf file or a "
                             "hub id; default: the base the adapter names, else 'default'")
    parser.add_argument("--adapter", action="append", metavar="[NAME=]PATH", help=adapters)
    parser.add_argument("--load-in-4bit", action=argparse.BooleanOptionalAction, default=None,
                        help="quantize the base to 4 bits (NF4, or the training run's 4-bit settings); default: as "
                             "the adapter's training run did (4-bit, 8-bit or full precision)")
    parser.add_argument("--device", default="auto", help="'auto' (cuda if available), 'cpu', 'cuda:N'")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="weight dtype of the base model (default float32)")
    parser.add_argument("--kernels", default="auto", choices=["auto", "triton", "torch"],
                        help="auto (default): Triton kernels + fused LoRA on CUDA, the fastest pure-torch path "
                             "elsewhere; triton: insist; torch: the pure-torch reference")
    parser.add_argument("--allow-pickle", action="store_true",
                        help="also read pickle weights (pytorch_model.bin, adapter_model.bin), with torch's "
                             "weights-only reader: only files from a source you trust")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="slimtune",
                                     description="Parameter-efficient fine-tuning, natively in PyTorch.",
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Run `slimtune COMMAND --help` for a command's options.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="fine-tune as a YAML recipe says",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Fine-tune as a YAML recipe says. RECIPE is a .yaml path or a shipped recipe "
                                   "name (see `slimtune recipes`; default: qlora-smollm2-pycode). Overrides "
                                   "key.sub=value change any recipe key (values are YAML: 16, true, 2e-4, [a, b]).",
                       epilog="example: slimtune train lora-smollm2-pycode training.max_steps=10 output.dir=runs/x")
    p.add_argument("recipe", nargs="?", help="recipe file or shipped recipe name")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="recipe overrides")
    p.add_argument("--resume", action="store_true", help="continue the run in output.dir from its latest checkpoint")
    p.add_argument("--dry-run", action="store_true",
                   help="print the recipe resolved and check it offline (run folder, model config, method, data, "
                        "memory and time); train nothing")
    p.add_argument("--force", action="store_true", help="train even when the memory estimate says it will not fit")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    p.add_argument("--nproc-per-node", type=positive_int, default=None, metavar="N",
                   help="train on N processes of this machine (starts torchrun; the recipe's `distributed` section "
                        "picks DDP or FSDP). Several machines: torchrun --nnodes ... -m slimtune train RECIPE")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("recipes", help="list the shipped recipes and how to run them")
    p.set_defaults(func=_cmd_recipes)

    p = sub.add_parser("generate", help="generate text with a base model and optional adapters (streamed)")
    _model_options(p, "adapter folder; repeat for several adapters (NAME=PATH names them)")
    p.add_argument("-p", "--prompt", required=True, help="the user prompt ('-' reads stdin)")
    p.add_argument("--system", default=None, help="a system prompt before it, rendered as training renders one")
    p.add_argument("--active", help=ACTIVE_HELP)
    p.add_argument("--max-new-tokens", type=positive_int, default=128)
    p.add_argument("--temperature", type=non_negative_float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--no-chat-template", action="store_true", help=NO_TEMPLATE_HELP)
    p.add_argument("--raw", action="store_true",
                   help="continue the prompt as plain text, no template (adapters trained on plain 'text' data)")
    p.set_defaults(func=_cmd_generate)

    p = sub.add_parser("eval", help="loss and perplexity of a model (+ adapter) on a dataset")
    _model_options(p, "adapter folder (optional); repeat for several adapters (NAME=PATH names them)")
    p.add_argument("--active", help=ACTIVE_HELP)
    p.add_argument("--data", default="pycode", help="'pycode' or a .jsonl/.json/.csv/.tsv/.txt file (default pycode)")
    p.add_argument("--split", default="validation", choices=["train", "validation", "all"])
    p.add_argument("--validation-fraction", type=fraction, default=VALIDATION_FRACTION,
                   help="the share of a file's rows held out as its validation split: the training run's "
                        f"data.validation_fraction (default {VALIDATION_FRACTION})"),
    p.add_argument("--max-examples", type=positive_int, default=None)
    p.add_argument("--max-seq-length", type=positive_int, default=None,
                   help="cut rows at this many tokens (default: the adapter's training run's data.max_seq_length, "
                        "else 512)")
    p.add_argument("--batch-size", type=positive_int, default=4)
    p.add_argument("--no-chat-template", action="store_true", help=NO_TEMPLATE_HELP)
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("estimate", help="will a recipe fit, and how long will it take? (reads only the model's config)",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Predict a recipe's peak memory (component by component) and its step and run "
                                   "time on a device, from the model's config alone (no weights are read). When it "
                                   "does not fit, list the cheapest changes that do, each with its new peak. Exit "
                                   "status 0 when it fits, 1 when it does not.",
                       epilog="examples:\n  slimtune estimate qlora-smollm2-pycode\n"
                              "  slimtune estimate qlora-smollm2-pycode model.name_or_path=meta-llama/Llama-3.1-8B "
                              "--device h200\n  slimtune estimate lora-smollm2-pycode --device rtx4090 --memory 12GB "
                              "--json")
    p.add_argument("recipe", nargs="?", help="recipe file or shipped recipe name (default: qlora-smollm2-pycode)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="recipe overrides")
    p.add_argument("--device", default=None,
                   help="cpu, cuda, cuda:N (this machine, measured) or a GPU profile: h200, h100, a100-80gb, "
                        "a100-40gb, l4, rtx4090, rtx3090 (default: the recipe's model.device)")
    p.add_argument("--memory", default=None, help="memory the run may use, e.g. 24GB (default: the device's)")
    p.add_argument("--json", action="store_true", help="print the estimate as JSON (for tools)")
    p.add_argument("--nproc-per-node", type=positive_int, default=1, metavar="N",
                   help="the memory of each rank of a distributed run with N processes per node (the recipe's "
                        "distributed section, or its default: auto = fsdp when the weights exceed half a device)")
    p.add_argument("--nnodes", type=positive_int, default=None, help="nodes of the distributed run (default 1)")
    p.set_defaults(func=_cmd_estimate)

    p = sub.add_parser("merge", help="merge an adapter into its base: a transformers folder or a GGUF file",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Merge an adapter into its base model and export it: a plain transformers folder "
                                   "(safetensors + tokenizer) or one GGUF file for llama.cpp / Ollama / LM Studio "
                                   "(llama-architecture models). --format gguf-lora merges nothing: it writes the "
                                   "LoRA adapter alone as a GGUF adapter (llama-cli --lora, Ollama ADAPTER).",
                       epilog="QLoRA adapters (--base-precision): the adapter was trained on the NF4-rounded "
                              "weights.\n  dequantized  merge into those weights, dequantized (default when the "
                              "adapter's run was 4-bit):\n               the merged model computes what the "
                              "fine-tune computed in training.\n  original     merge into the original "
                              "full-precision weights: nothing is rounded to 4 bits,\n               but the "
                              "adapter's correction was fitted to the rounded ones, so outputs move by about\n"
                              "               what NF4 rounding does to the base (often a better model; check it "
                              "with slimtune eval).\n  An adapter trained on a full-precision base merges the "
                              "same either way.\n\nexamples:\n"
                              "  slimtune merge --adapter runs/qlora-smollm2-pycode/adapter -o merged/\n"
                              "  slimtune merge --adapter runs/qlora-smollm2-pycode/adapter --format gguf --quant q8_0 "
                              "-o model.gguf\n"
                              "  slimtune merge --adapter runs/qlora-smollm2-pycode/adapter --format gguf "
                              "--base-precision original -o model.f16.gguf\n"
                              "  slimtune merge --adapter runs/lora-smollm2-pycode/adapter --format gguf-lora "
                              "-o adapter.gguf")
    _model_options(p, "adapter folder to merge; repeat it to merge several at once (their weight updates add up)")
    p.add_argument("-o", "--output", required=True,
                   help="folder (--format folder) or file (gguf, gguf-lora) to write")
    p.add_argument("--format", default="folder", choices=["folder", "gguf", "gguf-lora"],
                   help="folder (default): transformers safetensors + tokenizer; gguf: the merged model and its "
                        "tokenizer in one GGUF file; gguf-lora: the adapter alone as a GGUF LoRA adapter")
    p.add_argument("--quant", default=None, choices=["f32", "f16", "q8_0", "q4_0"],
                   help="GGUF weight type: gguf f16 (default), f32, q8_0 or q4_0 (norms stay f32); gguf-lora f32 "
                        "(default) or f16")
    p.add_argument("--pre", default=None, metavar="NAME",
                   help="--format gguf: llama.cpp's pre-tokenizer name when it cannot be detected (as "
                        "convert_hf_to_gguf.py names it, e.g. llama-bpe for Llama 3); detected for GPT-2 and SmolLM")
    p.add_argument("--base-precision", default=None, choices=["dequantized", "original"],
                   help="which base weights a QLoRA adapter merges into (see below); default: as the adapter's "
                        "run had them (--load-in-4bit)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder or file")
    p.set_defaults(func=_cmd_merge)
    return parser


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """transformers draws a progress bar for every model load ("Loading weights"): noise here. Switched back on
    after the command where it was on (main() may run inside a user's process)."""
    from huggingface_hub import utils as hub_utils
    from transformers.utils import logging as hf_logging

    was_on, hub_off = hf_logging.is_progress_bar_enabled(), hub_utils.are_progress_bars_disabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()  # (which switches huggingface_hub's on too: left as the caller had it)
            if hub_off:
                hub_utils.disable_progress_bars()


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``slimtune`` console script; returns the exit status."""
    parser = build_parser()
    # parse_known_args: argparse cannot take positionals after an option (`train r.yaml --resume a=1`),
    # so overrides that follow an option come back as extras.
    args, extra = parser.parse_known_args(argv)
    if extra:
        if args.command not in ("train", "estimate") or any(e.startswith("-") for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    if args.command == "merge" and not args.adapter:
        print("error: merge needs --adapter PATH (the adapter to merge).", file=sys.stderr)
        return 2
    try:
        quiet = args.command != "recipes" and not getattr(args, "dry_run", False)
        with _quiet_transformers() if quiet else contextlib.nullcontext():
            return args.func(args)
    except USER_ERRORS as error:
        if os.environ.get("SLIMTUNE_DEBUG"):
            raise
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\naborted.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
