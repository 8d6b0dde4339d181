"""LowRankLinear: a linear layer whose weight is a frozen reference plus a low-rank update.

    y = x @ W_ref.T + (x @ A.T) @ B.T + bias        W_ref [out, in], A [r, in], B [out, r]

The dense product B @ A is never formed in the forward pass: at rank r the update costs
r * (in + out) multiply-adds per token instead of in * out. GPT-2's ``Conv1D`` (which stores
its weight as [in, out] and computes x @ W + b) is converted to this orientation on the way in.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from inrank_convert.core.errors import NonFiniteError


class LowRankLinear(nn.Module):
    """A drop-in for ``nn.Linear`` / ``Conv1D`` holding ``W_ref + B @ A``.

    ``weight_ref`` is a frozen buffer (None for a zero reference: the layer is pure B @ A, as in
    InRank-Efficient); ``lora_A`` and ``lora_B`` are parameters. ``merge()`` folds the factors into
    the reference for dense speed, ``unmerge()`` takes them out again.
    """

    def __init__(self, lora_A: torch.Tensor, lora_B: torch.Tensor, weight_ref: torch.Tensor | None = None,
                 bias: torch.Tensor | nn.Parameter | None = None):
        super().__init__()
        rank, in_features = lora_A.shape
        out_features, rank_b = lora_B.shape
        if rank != rank_b:
            raise ValueError(f"factor ranks differ: A {tuple(lora_A.shape)}, B {tuple(lora_B.shape)}")
        if weight_ref is not None and tuple(weight_ref.shape) != (out_features, in_features):
            raise ValueError(f"reference shape {tuple(weight_ref.shape)} != {(out_features, in_features)}")
        self.in_features, self.out_features = in_features, out_features
        self.lora_A = nn.Parameter(lora_A)  # [r, in]
        self.lora_B = nn.Parameter(lora_B)  # [out, r]
        self.register_buffer("weight_ref", weight_ref)  # [out, in] or None
        if bias is None or isinstance(bias, nn.Parameter):
            self.bias = bias
        else:
            self.bias = nn.Parameter(bias)
        self.merged = False
        self._zero_reference = weight_ref is None
        self.stored_transposed = False  # True when built from a GPT-2 Conv1D ([in, out] storage)

    @classmethod
    def from_stored(cls, B: torch.Tensor, A: torch.Tensor, reference: torch.Tensor | None, conv1d: bool,
                    bias: torch.Tensor | nn.Parameter | None = None) -> LowRankLinear:
        """Build from factors in the checkpoint's stored orientation (W_stored ~= ref + B @ A).

        For nn.Linear the stored weight is [out, in]: A and B are used as they are. For Conv1D it
        is [in, out], so W.T = ref.T + A.T @ B.T: the roles and orientations of the factors swap.
        """
        if conv1d:
            layer = cls(B.T.contiguous(), A.T.contiguous(), None if reference is None else reference.T.contiguous(), bias)
            layer.stored_transposed = True
            return layer
        return cls(A, B, reference, bias)

    def stored_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, A) in the source checkpoint's orientation, the inverse of ``from_stored``."""
        if self.stored_transposed:
            return self.lora_A.detach().T.contiguous(), self.lora_B.detach().T.contiguous()  # [in, r], [r, out]
        return self.lora_B.detach(), self.lora_A.detach()

    @property
    def rank(self) -> int:
        return self.lora_A.shape[0]

    def delta_weight(self) -> torch.Tensor:
        """B @ A [out, in], computed in float32 for accuracy, returned in the factors' dtype."""
        return (self.lora_B.float() @ self.lora_A.float()).to(self.lora_A.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return F.linear(x, self.weight_ref, self.bias)
        update = F.linear(F.linear(x, self.lora_A), self.lora_B)  # [..., r] -> [..., out]
        if self.weight_ref is not None:
            return F.linear(x, self.weight_ref, self.bias) + update
        return update + self.bias if self.bias is not None else update

    @torch.no_grad()
    def merge(self) -> None:
        """Fold B @ A into the reference (idempotent); refuses a non-finite result."""
        if self.merged:
            return
        self._zero_reference = self.weight_ref is None
        merged = self.lora_B.float() @ self.lora_A.float()  # [out, in]
        if not self._zero_reference:
            merged += self.weight_ref.float()
        if not bool(torch.isfinite(merged).all()):
            raise NonFiniteError("merging would give NaN or Inf", f"LowRankLinear {self.out_features}x{self.in_features}",
                                 "the factors or the reference are broken: recompress")
        self.weight_ref = merged.to(self.lora_A.dtype)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take B @ A out of the merged weight again (idempotent)."""
        if not self.merged:
            return
        if self._zero_reference:
            self.weight_ref = None
        else:
            restored = self.weight_ref.float() - self.lora_B.float() @ self.lora_A.float()
            self.weight_ref = restored.to(self.lora_A.dtype)
        self.merged = False

    @property
    def weight(self) -> torch.Tensor:
        """The dense weight [out, in], for code that reads ``module.weight`` (not used in forward)."""
        if self.merged:
            return self.weight_ref
        delta = self.delta_weight()
        return delta if self.weight_ref is None else self.weight_ref + delta

    def extra_repr(self) -> str:
        reference = "none" if self.weight_ref is None else "frozen"
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"reference={reference}, bias={self.bias is not None}, merged={self.merged}")


class RowsLowRankEmbedding(nn.Module):
    """A token embedding stored as ``lowrank+rows``, trained in that form: ``W_ref + B @ A`` plus
    the stored rows' own updates (as the artifact reconstructs it).

        weight = W_ref + B @ A;  weight[row_index] += rows      W_ref [V, d], B [V, k], A [k, d], rows [K, d]

    The rows (tokens the training text uses) train one by one; every other row follows the shared
    low-rank part (the drift the softmax gives the rows of unseen tokens). So training it costs
    K * d + k * (V + d) parameters instead of V * d. The weight is formed for each forward: an
    [V, d] sum, small next to the [tokens, V] logits it feeds when the head is tied (``TiedHead``).
    """

    def __init__(self, lora_A: torch.Tensor, lora_B: torch.Tensor, rows: torch.Tensor, row_index: torch.Tensor,
                 weight_ref: torch.Tensor | None = None, padding_idx: int | None = None):
        super().__init__()
        self.num_embeddings, self.embedding_dim = lora_B.shape[0], lora_A.shape[1]
        self.lora_A = nn.Parameter(lora_A)  # [k, d]
        self.lora_B = nn.Parameter(lora_B)  # [V, k]
        self.rows = nn.Parameter(rows)  # [K, d]
        self.register_buffer("row_index", row_index.to(torch.int64))  # [K]
        self.register_buffer("weight_ref", weight_ref)  # [V, d] or None
        self.padding_idx = padding_idx

    @property
    def weight(self) -> torch.Tensor:
        base = self.lora_B @ self.lora_A  # [V, d]
        if self.weight_ref is not None:
            base = base + self.weight_ref
        return base.index_add(0, self.row_index, self.rows.to(base.dtype))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, self.weight, self.padding_idx)

    @torch.no_grad()
    def add_rows(self, indices: torch.Tensor) -> int:
        """Give the rows ``indices`` [n] that have none a trainable row of their own, starting at zero
        (the weight is unchanged). Returns how many were added; ``row_index`` stays sorted."""
        new = indices.to(self.row_index.device, torch.int64).unique()
        new = new[~torch.isin(new, self.row_index)]
        if not new.numel():
            return 0
        index = torch.cat([self.row_index, new])
        order = torch.argsort(index)
        rows = torch.cat([self.rows.detach(), self.rows.new_zeros(new.numel(), self.embedding_dim)])
        self.row_index = index[order]
        self.rows = nn.Parameter(rows[order].contiguous(), requires_grad=self.rows.requires_grad)
        return int(new.numel())

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, rank={self.lora_A.shape[0]}, "
                f"rows={self.rows.shape[0]}, reference={'none' if self.weight_ref is None else 'frozen'}")


class TiedHead(nn.Module):
    """An LM head tied to a ``RowsLowRankEmbedding``: logits = x @ embedding.weight.T (+ bias). The
    embedding is held outside the module tree so its parameters are listed once."""

    def __init__(self, embedding: RowsLowRankEmbedding, bias: torch.Tensor | None = None):
        super().__init__()
        self._embedding = (embedding,)  # a tuple: not registered as a submodule
        self.bias = None if bias is None else nn.Parameter(bias)

    @property
    def embedding(self) -> RowsLowRankEmbedding:
        return self._embedding[0]

    @property
    def weight(self) -> torch.Tensor:
        return self.embedding.weight

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.embedding.weight, self.bias)
