"""Calibration: what a trained model's layers see on real text.

``collect_statistics`` runs the trained (dense) causal LM once over calibration text and keeps,
for every ``nn.Linear`` and GPT-2 ``Conv1D``, the Gram ``X^T X`` of its inputs (float64,
accumulated batch by batch: activations are never kept), and the count of every token id (an
embedding row's weight is its token's frequency).

The update is then factorized for those inputs by ``linalg.whitening`` (the Grams whiten it); the
statistics here also rank a token embedding's rows by what the outputs lose (``row_scores``).

Nothing here reads files or prints; errors a user can act on are ``errors`` subclasses.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from inrank_convert.artifact.storage import InputGram
from inrank_convert.core.errors import UsageError, flag
from inrank_convert.model.architecture import conv1d_class, model_context

DEFAULT_CALIBRATION_TOKENS = 65_536
WINDOWS_PER_BATCH = 8  # calibration windows fed through the model in one forward


@dataclass
class CalibrationStats:
    """What the model's layers saw on the calibration text.

    ``grams[name]`` is ``X^T X`` ([in, in], float64, on the CPU) of the inputs of the layer whose
    weight is ``name`` (``"transformer.h.0.mlp.c_fc.weight"``), over ``rows[name]`` input rows;
    ``token_counts[i]`` is how often token id ``i`` occurs in the text used ([vocab], int64).
    ``text_sha256`` is left to the caller (who read the text) to fill in.
    """

    grams: dict[str, torch.Tensor]
    rows: dict[str, int]
    conv1d: dict[str, bool]  # the weight is stored [in, out] (GPT-2 Conv1D)
    token_counts: torch.Tensor
    tokens: int  # token ids fed through the model
    window: int  # tokens per window
    windows: int
    text_sha256: str | None = None
    input_embedding: str | None = None  # the token embedding's weight name
    head: str | None = None  # the LM head's weight name (its Gram is of the body's output)
    tied: bool = False  # the head and the token embedding are one tensor (GPT-2)

    def input_gram(self, name: str) -> InputGram | None:
        """The input Gram of the layer whose weight is ``name``, with its orientation (None: no Gram)."""
        return InputGram(self.grams[name], self.conv1d[name]) if name in self.grams else None

    def token_frequencies(self) -> torch.Tensor:
        """Each token id's share of the text used ([vocab], float64, sums to 1)."""
        return self.token_counts.double() / max(1, self.tokens)

    def row_scores(self, name: str, delta: torch.Tensor, V: torch.Tensor, B: torch.Tensor,
                   residual: torch.Tensor) -> torch.Tensor | None:
        """How much each residual row of a token-indexed tensor (a token embedding, an LM head) is
        worth to the model's outputs on the calibration text ([rows] float64, summing to the plain
        residual energy so that budget gains keep their scale), or None for any other tensor.

        ``delta`` [rows, cols] is the update, ``B @ V`` its low-rank part (split_residual) and
        ``residual`` [rows] the plain energies of the rows of ``delta - B @ V``. A row ``e_t`` used
        as the LM head costs ``e_t^T G e_t`` (G: the head's input Gram: every token's logit at every
        position); as the token embedding, ``count_t * ||e_t||^2`` (read once per occurrence).
        Each use is taken relative to its total, and a tied tensor (both uses) averages the two.
        Measured on the reference run of docs/results.md (token embedding, tied; rank 1 + K rows chosen, blocks dense):
        plain row energies give +64.8% / +34.1% / +0.08% perplexity at K = 2,000 / 4,500 / 9,000;
        the head's part alone +21.6% / +9.3% / +0.73%; both +12.1% / +3.7% / +0.12%."""
        head_gram = self.grams.get(self.head) if self.head is not None and \
            (name == self.head or (self.tied and name == self.input_embedding)) else None
        embedding = name == self.input_embedding
        if head_gram is None and not embedding:
            return None
        parts = []
        if head_gram is not None:
            gram = head_gram.to(device=delta.device, dtype=torch.float64)
            head = torch.cat([torch.einsum("ti,ij,tj->t", block, gram, block)
                              for block in _residual_blocks(delta, V, B)]).cpu()  # [rows]
            parts.append(head)
        if embedding:
            counts = torch.zeros(residual.numel(), dtype=torch.float64)
            known = min(counts.numel(), self.token_counts.numel())
            counts[:known] = self.token_counts[:known].double()
            parts.append(residual.cpu() * counts)
        scores = [part / float(part.sum()) for part in parts if float(part.sum()) > 0]
        if not scores:
            return None
        return sum(scores) / len(scores) * float(residual.sum())

    def to_json(self) -> dict:
        """What a manifest records about the calibration (damping is recorded per factorization)."""
        return {"text_sha256": self.text_sha256, "tokens": self.tokens, "window": self.window,
                "windows": self.windows, "layers": len(self.grams)}


def _residual_blocks(delta: torch.Tensor, V: torch.Tensor, B: torch.Tensor, block: int = 4096):
    """The rows of ``delta - B @ V`` in float64, a block at a time ([block, cols] each)."""
    for start in range(0, delta.shape[0], block):
        yield (delta[start:start + block] - B[start:start + block] @ V).double()


def embedding_weights(model) -> tuple[str | None, str | None, bool]:
    """(the token embedding's weight name, the LM head's, whether they are one tensor)."""
    by_module = {id(module): name for name, module in model.named_modules()}

    def weight_name(module) -> str | None:
        module = getattr(module, "base_layer", module)
        name = by_module.get(id(module)) if module is not None else None
        return None if name is None else f"{name}.weight" if name else "weight"

    embedding = model.get_input_embeddings()
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    tied = head is not None and embedding is not None and head.weight is embedding.weight
    return weight_name(embedding), weight_name(head), tied


def vocabulary_size(model) -> int | None:
    """Rows of the input embedding (the config's ``vocab_size`` when there is none)."""
    embedding = model.get_input_embeddings()
    embedding = getattr(embedding, "base_layer", embedding)
    return getattr(embedding, "num_embeddings", None) or getattr(model.config, "vocab_size", None)


def check_calibration_tokens(tokens: torch.Tensor, vocab_size: int | None, window: int, where: str | None,
                             max_tokens: int | None = None) -> None:
    """The ids must be the model's own (a tokenizer of another model gives ids beyond its vocabulary)
    and the text must fill at least one window."""
    if tokens.numel() < window:
        if max_tokens is not None and tokens.numel() == max_tokens:
            fix = f"raise {flag('--calib-tokens')} to at least {window}"
        else:
            fix = f"pass a longer text to {flag('--calibrate')} (at least {window} tokens)"
        raise UsageError(f"the calibration text has {tokens.numel()} tokens, fewer than one {window}-token window",
                         where, fix)
    lowest, highest = int(tokens.min()), int(tokens.max())
    if lowest < 0:
        raise UsageError(f"the calibration text gives token id {lowest}, and ids cannot be negative", where,
                         f"pass {flag('--tokenizer')} DIR with the model's own tokenizer")
    if vocab_size is not None and highest >= vocab_size:
        raise UsageError(f"the calibration text gives token id {highest}, beyond the {vocab_size}-token vocabulary "
                         "of the model", where, f"pass {flag('--tokenizer')} DIR with the model's own tokenizer")


def calibration_window(model, block_size: int | None) -> int:
    """Tokens per window: the model's context length, capped by ``block_size``."""
    if block_size is not None and block_size < 1:
        raise UsageError("the calibration window must hold at least 1 token", f"{flag('--block-size')} {block_size}",
                         f"e.g. {flag('--block-size')} 512")
    limit = model_context(model.config)
    if limit is None and block_size is None:
        raise UsageError(f"the {model.config.model_type} config declares no context length", None,
                         f"pass {flag('--block-size')} N (the calibration window in tokens)")
    return min(limit, block_size) if limit is not None and block_size is not None else limit or block_size


def calibrated_modules(model, names: set[str] | None = None) -> dict[str, torch.nn.Module]:
    """``{weight name: module}`` of every nn.Linear and GPT-2 Conv1D (only those in ``names`` if given)."""
    kinds = (torch.nn.Linear, conv1d_class())
    found = {}
    for module_name, module in model.named_modules():
        weight = f"{module_name}.weight" if module_name else "weight"
        if isinstance(module, kinds) and (names is None or weight in names):
            found[weight] = module
    return found


def _input_width(module: torch.nn.Module) -> int:
    # nn.Linear stores [out, in]; Conv1D stores [in, out].
    return module.weight.shape[0] if isinstance(module, conv1d_class()) else module.weight.shape[1]


@torch.no_grad()
def collect_statistics(model, tokens: torch.Tensor, *, block_size: int | None = None, device: str | torch.device = "cpu",
                       max_tokens: int | None = DEFAULT_CALIBRATION_TOKENS, names: set[str] | None = None,
                       where: str | None = None, windows_per_batch: int = WINDOWS_PER_BATCH,
                       batch_dtype: torch.dtype = torch.float64) -> CalibrationStats:
    """Run ``model`` (moved to ``device``, in eval mode, no grad) once over ``tokens`` (1-D ids, the
    first ``max_tokens`` of them) in non-overlapping windows of its context (capped by
    ``block_size``; a shorter last window is run too) and collect every layer's input Gram.

    ``names`` restricts the layers to those weight names; ``where`` names the text in messages.
    A layer that never ran (no input rows) is left out. The model's train/eval mode is restored.
    Each forward's ``X^T X`` is computed in ``batch_dtype`` (float32 halves its time on a CPU) and
    always summed in float64.
    """
    tokens = tokens.reshape(-1)
    if tokens.is_floating_point() or tokens.is_complex():
        raise TypeError(f"token ids must be integers, got {tokens.dtype}")
    if max_tokens is not None:
        if max_tokens < 1:
            raise UsageError(f"{flag('--calib-tokens')} must be at least 1", f"{flag('--calib-tokens')} {max_tokens}",
                             f"e.g. {flag('--calib-tokens')} {DEFAULT_CALIBRATION_TOKENS}")
        tokens = tokens[:max_tokens]
    window = calibration_window(model, block_size)
    vocab = vocabulary_size(model)
    check_calibration_tokens(tokens, vocab, window, where, max_tokens)
    device = torch.device(device)
    input_embedding, head_weight, tied = embedding_weights(model)
    if names is not None and tied and input_embedding in names and head_weight is not None:
        names = names | {head_weight}  # a tied embedding is also the head: its rows are ranked by the head's Gram
    modules = calibrated_modules(model, names)
    grams = {name: torch.zeros(_input_width(m), _input_width(m), dtype=torch.float64, device=device)
             for name, m in modules.items()}
    rows = dict.fromkeys(modules, 0)
    # Layers fed the very same tensor (LLaMA's q/k/v, gate/up) share one product per forward.
    last: list = [None, 0, None]  # input tensor, its version, its X^T X

    def hook_for(name: str):
        def hook(module, args, kwargs):
            given = args[0] if args else next(iter(kwargs.values()))
            if last[0] is not given or last[1] != given._version:
                x = given.reshape(-1, given.shape[-1]).to(batch_dtype)  # [rows, in]
                last[:] = [given, given._version, x.T @ x]
            grams[name].add_(last[2])
            rows[name] += given.numel() // given.shape[-1]
        return hook

    # The body alone runs, never the LM head: its logits ([tokens, vocab]) cost more than the rest
    # of a small model's forward (10 of the 12 s on the reference run's 4x128 GPT-2 at 65,536 tokens), and
    # only the head's input Gram is needed, which is the body's output.
    body = getattr(model, "base_model", model)
    head = model.get_output_embeddings() if body is not model else None
    head_name = next((name for name, module in modules.items() if module is head), None)

    def run(ids: torch.Tensor) -> None:
        try:
            hidden = body(ids.to(device), use_cache=False)[0]  # [batch, window, width]
            if head_name is not None:
                hook_for(head_name)(head, (hidden,), {})
        finally:
            last[:] = [None, 0, None]  # let the forward's tensors go

    was_training = model.training
    model.to(device)
    model.eval()
    handles = [m.register_forward_pre_hook(hook_for(name), with_kwargs=True) for name, m in modules.items()]
    try:
        full = tokens.numel() // window
        blocks = tokens[:full * window].reshape(full, window)
        per_batch = max(1, windows_per_batch)
        for start in range(0, full, per_batch):
            run(blocks[start:start + per_batch])
        tail = tokens[full * window:]
        if tail.numel():
            run(tail[None])
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    counts = torch.bincount(tokens.cpu(), minlength=vocab or 0)
    ran = [name for name in modules if rows[name] > 0]
    return CalibrationStats(grams={name: grams[name].cpu() for name in ran}, rows={name: rows[name] for name in ran},
                            conv1d={name: isinstance(modules[name], conv1d_class()) for name in ran},
                            token_counts=counts, tokens=tokens.numel(), window=window,
                            windows=full + (1 if tail.numel() else 0), input_embedding=input_embedding,
                            head=head_weight, tied=tied)
