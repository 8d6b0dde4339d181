"""Scale distillation (``compress --calibrate TEXT --distill-scales N``): once every factor and row is
rounded to integer codes, the scales the codes are multiplied by, and nothing else, are trained for
N steps so that the compressed model's next-token distributions match the trained model's on the
calibration text (BitDelta's idea, on every stored scale: int8's one per component and per row,
int4's and mixed's one per 64 numbers). Codes, shapes and dtypes stay as they are, so the artifact
keeps its bytes to the byte.

Each scale s is trained as s0 * exp(t), t from 0 (Adam on t: a relative step whatever the scale's
size), the loss the mean KL(trained || compressed) per token over windows of the model's context.
The trained scales are rounded to their stored dtype and kept only if the KL they give on
``MEASURE_WINDOWS`` windows (measured the same way before and after) is lower than the rounded
codes' own. Those are the text's last windows, held out of the training, when the text has at
least twice as many; else its first ones, trained on too (the record says which). A kept tensor's recorded error is
measured again on what a reader now decodes.

The compressed weights are formed for each step from their levels ([rows, cols] float32 per
tensor) and handed to the trained model's module tree with ``torch.func.functional_call``: the
trained model is the teacher and, with the weights swapped in, the student.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch.func import functional_call

from inrank_convert.artifact.format import ROW_INDEX
from inrank_convert.artifact.storage import (
    QUANTIZE_SCHEMES,
    SCALE_SUFFIXES,
    InputGram,
    scaled_update,
    unscaled_update,
)
from inrank_convert.artifact.writer import StoredTensor
from inrank_convert.compression.plan import PlanOptions
from inrank_convert.core.errors import UsageError, flag
from inrank_convert.linalg.criteria import frobenius_energy
from inrank_convert.linalg.stored_error import output_error, stored_error
from inrank_convert.model.architecture import checkpoint_keys

DISTILL_LR = 1e-3  # Adam's step on each scale's log (0.1% a step at most): the README run's choice (docs/calibration.md)
BATCH_TOKENS = 1024  # tokens a step (whole windows; at least one)
MEASURE_WINDOWS = 32  # windows the kept-or-not decision measures the KL on (held out when the text allows)


@dataclass
class DistillRecord:
    """What the distillation did: the manifest's ``calibration.distill``."""

    steps: int
    learning_rate: float
    windows: int  # of the calibration text, each ``window`` tokens
    window: int
    held_out: int  # windows measured and never trained on (0: the measured windows were trained on too)
    tensors: int  # whose scales trained
    scales: int  # numbers trained
    kl_before: float  # mean KL(trained || compressed) per token on the measured windows, nats
    kl_after: float
    kept: bool
    seconds: float

    def to_json(self) -> dict:
        return {"steps": self.steps, "learning_rate": _short(self.learning_rate), "windows": self.windows,
                "window": self.window, "held_out": self.held_out, "tensors": self.tensors, "scales": self.scales,
                "kl_before": _short(self.kl_before), "kl_after": _short(self.kl_after), "kept": self.kept,
                "seconds": round(self.seconds, 3)}


def check_distill_options(options: PlanOptions, steps: int, searched: bool) -> None:
    """``--distill-scales N`` trains the scales of integer codes, in one write."""
    if steps < 1:
        raise UsageError(f"{flag('--distill-scales')} takes a number of steps, 1 or more, got {steps}",
                         flag("--distill-scales"), f"e.g. {flag('--distill-scales')} 100, or drop it")
    if options.quantize not in (None, *QUANTIZE_SCHEMES) or options.factor_dtype is not None:
        which = "--dtype" if options.factor_dtype is not None else "--quantize"
        raise UsageError(f"{flag('--distill-scales')} trains the scales of integer codes, but {flag(which)} "
                         "stores floats, which have none", flag(which),
                         f"use {flag('--quantize')} int8, int4 or mixed, or drop {flag('--distill-scales')}")
    if searched:
        raise UsageError(f"{flag('--distill-scales')} trains one artifact's scales, but "
                         f"{flag('--max-perplexity-increase')} writes one per candidate size",
                         flag("--distill-scales"),
                         f"give the size the search found as {flag('--target-size')} BYTES, or drop "
                         f"{flag('--distill-scales')}")


def _short(value: float) -> float | None:
    """Six significant digits; None for NaN or Inf (the manifest is strict JSON)."""
    return float(f"{value:.6g}") if math.isfinite(value) else None


def longest_record(steps: int, tokens: int, tensors: int) -> dict:
    """A record at least as long in JSON as any real one of this compress (the header's bound)."""
    wide = 10 ** len(str(max(tokens, 1) * 1000)) - 1
    return DistillRecord(steps, -1.23456e-05, tokens, tokens, tokens, tensors, wide, -1.23456e-05, -1.23456e-05, False,
                         float(wide)).to_json()


class ScaledTensor:
    """One stored tensor whose scales train: its levels, the reference under it and its place in
    the model. ``weight(scales)`` is W_ref + B @ A (+ rows) at those scales, [rows, cols] float32."""

    def __init__(self, stored: StoredTensor, reference: torch.Tensor | None, device: torch.device):
        entry = stored.entry
        self.stored = stored
        self.name = stored.name
        self.storage = entry.storage
        parts = {full[len(self.name):]: tensor for full, tensor in stored.tensors}
        self.original = {suffix: parts[suffix] for suffix in SCALE_SUFFIXES if suffix in parts}
        self.shape = entry.shape
        levels = unscaled_update(parts, self.storage, entry.shape[1])
        self.levels = tuple(None if part is None else part.to(device) for part in levels)
        self.index = parts[ROW_INDEX].to(device) if ROW_INDEX in parts else None
        self.base = torch.zeros(entry.shape, device=device)  # [rows, cols]
        if reference is not None:  # a grown vocabulary: the reference has the first rows
            self.base[:reference.shape[0]] = reference.to(device, torch.float32)
        self.logs = {suffix: torch.zeros(scale.shape, device=device, requires_grad=True)
                     for suffix, scale in self.original.items()}

    def trained_scales(self) -> dict[str, torch.Tensor]:
        return {suffix: self.original[suffix].to(self.base.device, torch.float32) * log.exp()
                for suffix, log in self.logs.items()}

    def rounded_scales(self) -> dict[str, torch.Tensor]:
        """The trained scales as they will be stored (their original dtype, on the CPU)."""
        with torch.no_grad():
            return {suffix: scale.cpu().to(self.original[suffix].dtype) for suffix, scale in self.trained_scales().items()}

    def factors(self, scales: dict[str, torch.Tensor]):
        return scaled_update(*self.levels, {suffix: scale.to(self.base.device, torch.float32)
                                            for suffix, scale in scales.items()}, self.storage)

    def weight(self, scales: dict[str, torch.Tensor]) -> torch.Tensor:
        B, A, rows = self.factors(scales)
        weight = self.base + B @ A
        return weight if rows is None else weight.index_add(0, self.index, rows)

    def keep(self, scales: dict[str, torch.Tensor], trained: torch.Tensor, gram: InputGram | None) -> None:
        """Store ``scales`` in place of the original ones and measure the entry's error again (and
        its output error, with the layer's input ``gram``)."""
        self.stored.tensors = [(full, scales.get(full[len(self.name):], tensor)) for full, tensor in self.stored.tensors]
        delta = trained.to(self.base.device, torch.float32) - self.base
        B, A, rows = self.factors(scales)
        entry = self.stored.entry
        with torch.no_grad():
            entry.error = stored_error(delta, frobenius_energy(delta), B, A, rows, self.index)
            if gram is not None:
                entry.output_error = output_error(delta, B, A, rows, self.index, gram.gram, gram.conv1d)


def _kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """Mean KL(teacher || student) per token of logits [batch, window, vocab], in nats."""
    teacher = torch.log_softmax(teacher_logits.float(), dim=-1)
    student = torch.log_softmax(student_logits.float(), dim=-1)
    return (teacher.exp() * (teacher - student)).sum(dim=-1).mean()


def distill_scales(model: torch.nn.Module, stored: Sequence[StoredTensor], tokens: torch.Tensor, *, steps: int,
                   window: int, reference: Callable[[str], torch.Tensor | None],
                   trained: Callable[[str], torch.Tensor], device: str | torch.device = "cpu",
                   lr: float | None = None, on_step: Callable[[int, float], None] | None = None,
                   grams: Callable[[str], InputGram | None] | None = None) -> DistillRecord:
    """Train the scales of every integer-stored factorized tensor in ``stored`` (changed in place
    when kept) against ``model``, the trained model, on ``tokens`` (1-D ids, at least one window);
    ``lr``: Adam's, DISTILL_LR unless given; ``grams(name)``: a layer's calibration Gram, with
    which a kept tensor's output error is measured again."""
    started = time.perf_counter()
    lr = DISTILL_LR if lr is None else lr
    device = torch.device(device)
    model.to(device).eval().requires_grad_(False)
    chosen = [item for item in stored if item.entry.has_factors and item.entry.storage in QUANTIZE_SCHEMES]
    tensors = [ScaledTensor(item, reference(item.name), device) for item in chosen]
    keys = checkpoint_keys(model, [tensor.name for tensor in tensors])
    parameters = dict(model.named_parameters(remove_duplicate=False))
    unplaced = [name for name, key in keys.items() if key not in parameters]
    if unplaced:  # a tensor transformers fuses or splits on load (Mixtral's experts): no one weight to swap in
        raise UsageError(f"tensor {unplaced[0]!r} is no single parameter of the {model.config.model_type} model, so its "
                         "scales cannot be trained on the model", flag("--distill-scales"),
                         f"drop {flag('--distill-scales')} (compress without it)")
    count = tokens.numel() // window
    if count < 1:
        raise ValueError(f"distillation needs at least one window of {window} tokens, got {tokens.numel()}")
    windows = tokens[:count * window].reshape(count, window).to(device)  # [count, window]
    per_batch = max(1, BATCH_TOKENS // window)
    held_out = MEASURE_WINDOWS if count >= 2 * MEASURE_WINDOWS else 0
    measured = windows[count - held_out:] if held_out else windows[:MEASURE_WINDOWS]
    windows, count = windows[:count - held_out], count - held_out

    def logits(batch: torch.Tensor, weights: dict[str, torch.Tensor] | None) -> torch.Tensor:
        kwargs = {"input_ids": batch, "use_cache": False}
        return model(**kwargs).logits if weights is None else functional_call(model, weights, (), kwargs).logits

    def weights_at(scales: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        return {keys[tensor.name]: tensor.weight(scale) for tensor, scale in zip(tensors, scales, strict=True)}

    @torch.no_grad()
    def measure(scales: list[dict[str, torch.Tensor]]) -> float:
        weights, total = weights_at(scales), 0.0
        for start in range(0, measured.shape[0], per_batch):
            batch = measured[start:start + per_batch]
            total += float(_kl(logits(batch, None), logits(batch, weights))) * batch.shape[0]
        return total / measured.shape[0]

    before = measure([tensor.original for tensor in tensors])
    optimizer = torch.optim.Adam([log for tensor in tensors for log in tensor.logs.values()], lr=lr)
    for step in range(steps if tensors else 0):
        start = (step * per_batch) % count
        batch = windows[start:start + per_batch]
        with torch.no_grad():
            target = logits(batch, None)
        loss = _kl(target, logits(batch, weights_at([tensor.trained_scales() for tensor in tensors])))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if on_step is not None:
            on_step(step + 1, float(loss))
    rounded = [tensor.rounded_scales() for tensor in tensors]
    after = measure(rounded) if tensors else before
    kept = bool(tensors) and math.isfinite(after) and after < before
    if kept:
        for tensor, scales in zip(tensors, rounded, strict=True):
            tensor.keep(scales, trained(tensor.name), None if grams is None else grams(tensor.name))
    return DistillRecord(steps, lr, count + held_out, window, held_out, len(tensors),
                         sum(scale.numel() for tensor in tensors for scale in tensor.original.values()),
                         before, after, kept, time.perf_counter() - started)
