"""compression/execution.py: the adaptive engine's basis hints pass only along a chain of HINT_CHAIN
same-shape updates in plan order (so a tensor's bits depend on its chain alone, whichever process
computes it), and the storage precisions whose factors a bfloat16 product may compute."""

from __future__ import annotations

import torch

from inrank_convert.compression.execution import HINT_CHAIN, HintChains, product_dtype
from inrank_convert.compression.plan import TensorPlan
from inrank_convert.linalg.gram import native_bfloat16


def entry(index: int, shape: tuple[int, int], action: str = "factorize") -> tuple[int, TensorPlan]:
    return index, TensorPlan(f"t{index}", shape, torch.float32, action)


def test_same_shape_updates_share_hints_within_a_chain_of_hint_chain():
    square = [entry(i, (64, 64)) for i in range(HINT_CHAIN + 2)]
    work = [*square[:2], entry(10, (64, 256)), entry(11, (64,), "dense"), *square[2:], entry(12, (64, 256))]
    chains = HintChains(work)
    first, second = chains.hints(0), chains.hints(HINT_CHAIN)
    assert first is not None and second is not None and first is not second
    assert all(chains.hints(i) is first for i in range(HINT_CHAIN))  # the first HINT_CHAIN of a shape
    assert all(chains.hints(i) is second for i in range(HINT_CHAIN, HINT_CHAIN + 2))  # the rest: the next chain
    assert chains.hints(10) is chains.hints(12) and chains.hints(10) is not first  # another shape, its own chain
    assert chains.hints(11) is None  # stored dense: no factorization, no hints
    first[(64, 64)] = 40  # what a factorization leaves for the next update of its shape
    assert chains.hints(1) == {(64, 64): 40} and chains.hints(HINT_CHAIN) == {}


def test_a_share_of_the_work_has_the_chains_of_the_whole_plan():
    """A process given a whole chain (torchrun shares out whole chains) groups its tensors as one
    process with the whole plan does: one chain, one basis passed along (the numbering is its own)."""
    work = [entry(i, (32, 32)) for i in range(2 * HINT_CHAIN)]
    whole, share = HintChains(work), HintChains(work[HINT_CHAIN:])
    assert [whole.chain[i] for i in range(HINT_CHAIN, 2 * HINT_CHAIN)] == [((32, 32), 1)] * HINT_CHAIN
    assert [share.chain[i] for i in range(HINT_CHAIN, 2 * HINT_CHAIN)] == [((32, 32), 0)] * HINT_CHAIN
    assert len({share.chain[i] for i in share.chain}) == 1  # still one chain: one basis passed along


def test_only_coarse_storage_may_use_a_bfloat16_product():
    cpu = torch.device("cpu")
    native = native_bfloat16(cpu)
    for storage in ("bfloat16", "int8"):
        assert product_dtype(storage, cpu) == (torch.bfloat16 if native else None)
    for storage in ("float32", "float16", "float64"):
        assert product_dtype(storage, cpu) is None
