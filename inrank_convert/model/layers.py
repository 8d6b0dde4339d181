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

        weight = W_ref + B @ A;  weight[row_index] += rows;  weight[fixed_index] += fixed_rows
        W_ref [V, d], B [V, k], A [k, d], rows [K, d] (trained), fixed_rows [F, d] (a buffer)

    The rows (tokens the training text uses) train one by one; every other row follows the shared
    low-rank part (the drift the softmax gives the rows of unseen tokens), a stored row of a token
    the text never uses kept as it is (``train_rows_of``). So training it costs K * d + k * (V + d)
    parameters instead of V * d. The weight is formed for each forward: an [V, d] sum, small next to
    the [tokens, V] logits it feeds when the head is tied (``TiedHead``).
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
        self.register_buffer("fixed_rows", rows.new_zeros(0, self.embedding_dim))  # [F, d]
        self.register_buffer("fixed_index", torch.zeros(0, dtype=torch.int64, device=rows.device))  # [F]
        self.rows_trained = "stored"  # which rows train: every stored row, or "text" (train_rows_of)
        self.padding_idx = padding_idx

    @property
    def weight(self) -> torch.Tensor:
        base = self.lora_B @ self.lora_A  # [V, d]
        if self.weight_ref is not None:
            base = base + self.weight_ref
        base = base.index_add(0, self.fixed_index, self.fixed_rows.to(base.dtype))
        return base.index_add(0, self.row_index, self.rows.to(base.dtype))

    def all_rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every stored row, trained or fixed: (index [K + F] sorted, rows [K + F, d]), as an artifact stores them."""
        return _sorted_rows(self.row_index, self.rows.detach(), self.fixed_index, self.fixed_rows.to(self.rows.dtype))

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
        self.row_index, rows = _sorted_rows(self.row_index, self.rows.detach(), new,
                                            self.rows.new_zeros(new.numel(), self.embedding_dim))
        self.rows = nn.Parameter(rows, requires_grad=self.rows.requires_grad)
        return int(new.numel())

    @torch.no_grad()
    def train_rows_of(self, tokens: torch.Tensor) -> None:
        """Rows train for exactly the tokens ``tokens`` [n] (the training text's): each gets a trainable
        row (a new one starts at zero), and a stored row of any other token is kept fixed. The weight
        is unchanged.

        Why fixed: a token the text never uses gets gradient only from the softmax pushing its logit
        down, nearly the same push for all of them, which the shared low-rank part carries (the dense
        continuation's update of those rows is 99.9% one rank-1 component). Training them one by one
        would double the parameters trained from a default artifact (it stores rows of 12,555 such
        tokens on the README's run) for nothing the low-rank part cannot do."""
        self.add_rows(tokens)
        self.rows_trained = "text"
        keep = torch.isin(self.row_index, tokens.to(self.row_index.device, torch.int64))  # [K]
        if bool(keep.all()):
            return
        self.fixed_index, self.fixed_rows = _sorted_rows(self.fixed_index, self.fixed_rows, self.row_index[~keep],
                                                         self.rows.detach()[~keep].to(self.fixed_rows.dtype))
        self.row_index = self.row_index[keep]
        self.rows = nn.Parameter(self.rows.detach()[keep].contiguous(), requires_grad=self.rows.requires_grad)

    @torch.no_grad()
    def split_for_adam(self) -> None:
        """Re-split ``B @ A`` (the product unchanged) so that each of A's k rows has norm sqrt(d / k):
        ``dense_rate_split``, so that a row without a row of its own moves at the dense rate.

        Why here: the balanced split an artifact loads with (B's column and A's row of equal norm)
        puts sqrt(V / d) times more on A than on a row of B: resumed from it, the shared drift of the
        rows of unseen tokens ran about 7x faster than in the dense continuation on the same tokens
        (per-row 7.5 against 1.1 over 500 steps at lr 1e-3).
        """
        split_factors_in_place(self, "dense-rate")

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, rank={self.lora_A.shape[0]}, "
                f"rows={self.rows.shape[0]}, fixed rows={self.fixed_rows.shape[0]}, reference={'none' if self.weight_ref is None else 'frozen'}")


def dense_rate_split(B: torch.Tensor, A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """B [out, k] and A [k, in] re-split, the product B @ A unchanged, so that each of A's rows has
    norm sqrt(in / k) (a zero row stays as it is).

    Why: Adam moves each entry of a parameter by about lr a step, whatever its gradient's size. A
    dense weight's row then moves by about lr * sqrt(in) a step; through B alone it moves by about
    lr * sqrt(k) * |A's rows|, which this split makes lr * sqrt(in), the dense rate. The balanced
    split (sqrt(s) on each side) ties the factors' scale to the update's: a layer whose update is
    small starts with small factors and learns slowly."""
    rank = A.shape[0]
    if rank == 0:
        return B, A
    norms = A.norm(dim=1)  # [k]
    target = (A.shape[1] / rank) ** 0.5
    factor = torch.where(norms > 0, target / torch.where(norms > 0, norms, 1.0), 1.0)  # [k]
    return B / factor[None, :], A * factor[:, None]


# How a switch to low rank (--dense-warmup) and a resume from an artifact split the factors they
# start from: balanced (U sqrt(S), sqrt(S) V^T: the artifact's) or dense-rate (dense_rate_split).
FACTOR_SPLITS = ("balanced", "dense-rate")


def split_factors(B: torch.Tensor, A: torch.Tensor, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """B [out, k] and A [k, in] re-split as ``split`` (FACTOR_SPLITS) names, the product unchanged.
    ``balanced`` keeps the factors as they come (the switch's are U sqrt(S), sqrt(S) V^T, as compress
    writes them)."""
    return dense_rate_split(B, A) if split == "dense-rate" else (B, A)


@torch.no_grad()
def split_factors_in_place(module: LowRankLinear | RowsLowRankEmbedding, split: str) -> None:
    """``split_factors`` on a low-rank module's ``lora_B`` / ``lora_A``, in place."""
    B, A = split_factors(module.lora_B.detach(), module.lora_A.detach(), split)
    module.lora_B.copy_(B)
    module.lora_A.copy_(A)


def _sorted_rows(index: torch.Tensor, rows: torch.Tensor, more_index: torch.Tensor, more_rows: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Two sets of rows [K, d] / [M, d] at distinct indices [K] / [M] as one, sorted by index."""
    index = torch.cat([index, more_index])
    order = torch.argsort(index)
    return index[order], torch.cat([rows, more_rows])[order].contiguous()


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
