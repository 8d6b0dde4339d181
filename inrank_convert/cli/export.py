"""Out of the artifact: ``decompress`` (a dense Hugging Face folder), ``export-peft`` (a PEFT or
vLLM adapter) and ``generate`` (text from the compressed model)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import torch
import typer

from inrank_convert.cli import console
from inrank_convert.cli.boundary import user_errors
from inrank_convert.cli.options import (
    ArtifactArg,
    EvalDeviceOpt,
    EvalDtypeOpt,
    JsonOpt,
    MergeOpt,
    QuietOpt,
    TokenizerOpt,
    parse_dtype,
)
from inrank_convert.core.errors import UsageError


@user_errors
def decompress_command(
    artifact: ArtifactArg,
    output: Annotated[Path, typer.Option("-o", "--output", help="Dense Hugging Face folder to write.")],
    init: Annotated[Path | None, typer.Option("--init", help="Use this init instead of the recorded one.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output folder.")] = False,
    reference_only: Annotated[bool, typer.Option(
        "--reference-only", help="Write the reference (init / base) model instead: the base for export-peft. "
        "With an embedded init, tensors stored dense keep their trained values.")] = False,
    json_output: JsonOpt = False,
    quiet: QuietOpt = False,
):
    """Write the dense model (W_ref + B @ A) as a Hugging Face folder that from_pretrained loads.

    Example: inrank-convert decompress gpt2-inrank -o gpt2-dense
    """
    from inrank_convert.artifact import read_manifest
    from inrank_convert.export.dense import decompress

    count = len(read_manifest(artifact).tensors)
    with console.progress(count, "decompressing", quiet or json_output) as advance:
        result = decompress(artifact, output, force=force, init=init, on_tensor=advance,
                            reference_only=reference_only)
    if json_output:
        console.emit_json(result.to_json())
    else:
        console.stdout.print(f"wrote {result.tensors} tensors ({console.human_bytes(result.bytes)}) to {output}")


@user_errors
def export_peft_command(
    artifact: ArtifactArg,
    output: Annotated[Path, typer.Option("-o", "--output", help="Adapter folder to write.")],
    init: Annotated[Path | None, typer.Option("--init", help="Use this init instead of the recorded one.")] = None,
    target: Annotated[str, typer.Option(
        "--target", help="peft: exact (LoRA, trainable tokens, biases, modules_to_save); vllm: LoRA only, on "
                         "what vLLM serves (the rest is listed as dropped).")] = "peft",
    max_rank: Annotated[int | None, typer.Option(
        "--max-rank", help="--target vllm: the largest LoRA rank, at most 512 (default 512); a larger update "
                           "becomes its truncated SVD.")] = None,
    data: Annotated[Path | None, typer.Option(
        "--data", help="Text (file or folder): perplexity of the base, base + adapter (PEFT) and the artifact.")] = None,
    max_tokens: Annotated[int | None, typer.Option("--max-tokens", help="Use only the first N tokens of --data.")] = None,
    context: Annotated[int | None, typer.Option(
        "--context", help="Window length in tokens for --data (default: the model's context length).")] = None,
    tokenizer: TokenizerOpt = None,
    device: EvalDeviceOpt = "cpu",
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output folder.")] = False,
    json_output: JsonOpt = False,
):
    """Write a PEFT LoRA adapter that turns the reference (init / base) model into the compressed one.

    Load it with PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE), OUTPUT); for a
    seed or embedded init, 'decompress --reference-only' writes BASE. --target vllm writes what vLLM
    serves and lists what that leaves out.

    Example: inrank-convert export-peft gpt2-inrank -o gpt2-adapter
    """
    from inrank_convert.export.adapter_check import export_and_score
    from inrank_convert.export.peft_adapter import export_peft
    from inrank_convert.export.vllm_plan import dropped_summary

    if data is None:
        for name, value in (("--max-tokens", max_tokens), ("--context", context), ("--tokenizer", tokenizer)):
            if value is not None:
                raise UsageError(f"{name} applies to the perplexity check only", f"{name} {value}",
                                 f"add --data TEXT, or drop {name}")
        result = export_peft(artifact, output, force=force, init=init, target=target, max_rank=max_rank)
    else:
        result = export_and_score(artifact, output, data, force=force, init=init, target=target, max_rank=max_rank,
                                  max_tokens=max_tokens, context=context, tokenizer=tokenizer, device=device)
    for note in result.notes:
        console.warn(note)
    lines = dropped_summary(result.dropped)
    if lines:
        console.warn(f"the vllm adapter leaves out or approximates {len(result.dropped)} changed tensors "
                     "(--json lists each):")
        for line in lines:
            console.status(f"  {line}")
    if json_output:
        console.emit_json(result.to_json())
    else:
        console.render_export_peft(result.to_json())


@user_errors
def export_gguf_command(
    artifact: ArtifactArg,
    output: Annotated[Path, typer.Option("-o", "--output", help="GGUF adapter file to write (e.g. adapter.gguf).")],
    init: Annotated[Path | None, typer.Option("--init", help="Use this init instead of the recorded one.")] = None,
    dtype: Annotated[str, typer.Option("--dtype", help="float32 or float16: the dtype of the LoRA tensors.")] = "float32",
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output file.")] = False,
    json_output: JsonOpt = False,
):
    """Write a llama.cpp LoRA adapter (GGUF) that turns the reference (init / base) model into the compressed one.

    Convert the base with llama.cpp's convert_hf_to_gguf.py, then run it with --lora OUTPUT. LLaMA,
    Mistral and Qwen2; what llama.cpp adapters cannot hold (norms, biases, a grown vocabulary, the
    embedding of a tied head) is listed as left out.

    Example: inrank-convert export-gguf llama-inrank -o llama-lora.gguf
    """
    from inrank_convert.export.gguf_adapter import LLAMA_CPP, export_gguf
    from inrank_convert.export.vllm_plan import dropped_summary

    dtypes = {"float32": torch.float32, "float16": torch.float16}
    if dtype not in dtypes:
        raise UsageError(f"unknown GGUF adapter dtype {dtype!r}", f"--dtype {dtype}", "choose float32 or float16")
    result = export_gguf(artifact, output, force=force, init=init, dtype=dtypes[dtype])
    lines = dropped_summary(result.dropped, rules=LLAMA_CPP)
    if lines:
        console.warn(f"the llama.cpp adapter leaves out {len(result.dropped)} changed tensors (--json lists each):")
        for line in lines:
            console.status(f"  {line}")
    if json_output:
        console.emit_json(result.to_json())
    else:
        console.stdout.print(f"wrote a llama.cpp LoRA adapter on {len(result.ranks)} tensors "
                             f"({console.human_bytes(result.bytes)}, {result.architecture}) to {result.output}")


@user_errors
def generate_command(
    artifact: ArtifactArg,
    prompt: Annotated[str, typer.Option("--prompt", help="Text to continue.")],
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="Tokens to generate.")] = 50,
    temperature: Annotated[float, typer.Option("--temperature", help="Sampling temperature; 0 = greedy.")] = 0.8,
    top_k: Annotated[int, typer.Option("--top-k", help="Sample among the k likeliest tokens; 0 = all.")] = 50,
    seed: Annotated[int, typer.Option("--seed", help="Random seed: the same seed gives the same text.")] = 0,
    device: EvalDeviceOpt = "cpu",
    dtype: EvalDtypeOpt = "float32",
    tokenizer: TokenizerOpt = None,
    init: Annotated[Path | None, typer.Option("--init", help="Use this init instead of the artifact's recorded one.")] = None,
    merge: MergeOpt = False,
    json_output: JsonOpt = False,
):
    """Generate text from the compressed model (prompt and continuation on stdout).

    Example: inrank-convert generate gpt2-inrank --prompt "The history of" --max-new-tokens 40 --seed 1
    """
    from inrank_convert.runtime.evaluate import generate

    result = generate(artifact, prompt, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                      seed=seed, device=device, dtype=parse_dtype(dtype), tokenizer=tokenizer, init=init, merge=merge)
    console.emit_json(result.to_json()) if json_output else console.render_generation(result.to_json())
