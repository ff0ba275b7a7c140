"""Which layers Hugging Face accelerate's ``device_map="auto"`` puts on which GPU (big-model inference).

``infer_auto_device_map`` walks the model's modules in forward order (embeddings, blocks, final norm, head) and
fills GPU 0 up to its memory budget, then GPU 1, and so on; a block (a "no split" module) is never cut.  The
first GPU keeps room for the largest layer (where an offloaded layer would be brought back), so its budget is
the free memory less the largest unit (accelerate ``utils/modeling.py``, ``infer_auto_device_map``: "main
devices" ``[gpus[0], "cpu"]``).  The free memory is ``torch.cuda.mem_get_info`` after CUDA is initialised on
each device (``get_max_memory``).

Until accelerate 0.12 (2022-08) "auto" filled the GPUs in order ("sequential"); since then "auto" first
calls ``get_balanced_memory``: every GPU but the last gets ``model size / n_gpus`` plus a buffer of 1.25 x
the largest no-split block, the last keeps its whole free memory.
"""

from __future__ import annotations

from collections.abc import Sequence


def balanced_budgets_bytes(total_bytes: float, largest_block_bytes: float, free_bytes: Sequence[float]) -> list[float]:
    """accelerate ``get_balanced_memory``: ``total / n + 1.25 x largest block`` on every GPU but the last
    (capped by its free memory), the last GPU its free memory."""
    n = len(free_bytes)
    if n <= 1:
        return list(free_bytes)
    per_gpu = total_bytes / n + 1.25 * largest_block_bytes
    return [min(per_gpu, f) for f in free_bytes[:-1]] + [float(free_bytes[-1])]


def fill_in_order(unit_bytes: Sequence[float], budgets_bytes: Sequence[float], reserve_on_first: float = 0.0) -> list[int]:
    """The GPU index of each unit, filling the GPUs in order; ``-1``: the unit fits on none (offloaded to the
    CPU).  ``reserve_on_first``: bytes kept free on GPU 0 (accelerate: the largest layer)."""
    out: list[int] = []
    gpu, used = 0, 0.0
    for size in unit_bytes:
        while gpu < len(budgets_bytes):
            budget = budgets_bytes[gpu] - (reserve_on_first if gpu == 0 else 0.0)
            if used + size <= budget:
                break
            gpu, used = gpu + 1, 0.0
        if gpu >= len(budgets_bytes):
            out.append(-1)
            continue
        used += size
        out.append(gpu)
    return out


def accelerate_device_map(unit_bytes: Sequence[float], free_bytes: Sequence[float], balanced: bool,
                          largest_block_bytes: float) -> list[int]:
    """GPU of each unit (embeddings, each block, head, in forward order) under ``device_map="auto"``."""
    budgets = balanced_budgets_bytes(sum(unit_bytes), largest_block_bytes, free_bytes) if balanced else list(free_bytes)
    return fill_in_order(unit_bytes, budgets, reserve_on_first=max(unit_bytes, default=0.0))


def bytes_per_gpu(unit_bytes: Sequence[float], placement: Sequence[int], n_gpus: int) -> list[float]:
    """Weight bytes placed on each GPU."""
    out = [0.0] * n_gpus
    for size, gpu in zip(unit_bytes, placement):
        if gpu >= 0:
            out[gpu] += size
    return out
