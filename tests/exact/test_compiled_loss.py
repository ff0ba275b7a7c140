"""torchtune's chunked loss under torch.compile keeps different tensors for backward than the eager loss.

Eager ``F.cross_entropy(logits.float(), labels)`` saves the fp32 log-softmax (and the labels and a 0-dim total
weight); compiled, inductor's partitioner saves the 16-bit logits themselves, the labels and two per-row fp32
reductions, and recomputes the softmax in backward.  The difference between the two is what the engine's
``chunked-compiled`` loss changes against ``chunked``: checked here on CPU against real torch, storage by
storage, on a tiny Llama's head.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from simulator import Scenario  # noqa: E402
from simulator.estimate import cost_table_for  # noqa: E402
from simulator.graph.ir import basis  # noqa: E402

TOKENS, BATCH = 64, 2


def _saved_storage_bytes(fn, logits: "torch.Tensor", labels: "torch.Tensor") -> int:
    """Bytes of the distinct storages autograd keeps for ``fn``'s backward."""
    seen: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(logits, labels)
    return sum(seen.values())


def _ce(logits, labels):
    return torch.nn.functional.cross_entropy(logits.float(), labels, reduction="sum")


def test_compiled_chunk_saves_the_16_bit_logits_instead_of_the_fp32_log_softmax():
    sc = Scenario.model_validate({
        "model": {"name": "tiny", "family": "llama", "n_layers": 2, "hidden": 64, "n_heads": 4, "n_kv_heads": 2,
                  "intermediate": 128, "vocab": 1000, "tied_embeddings": False},
        "gpu": "h100-sxm-80gb", "precision": "bf16", "method": {"kind": "full"},
        "workload": {"micro_batch": BATCH, "seq_len": TOKENS}})
    tables = {loss: cost_table_for(sc.model_copy(update={"loss": loss})) for loss in ("chunked", "chunked-compiled")}
    B = basis(BATCH, TOKENS)
    engine_delta = tables["chunked-compiled"].at(tables["chunked-compiled"].post_saved, B) \
        - tables["chunked"].at(tables["chunked"].post_saved, B)

    n, vocab = BATCH * TOKENS, sc.model.vocab
    logits = torch.randn(n, vocab, dtype=torch.bfloat16, requires_grad=True)
    labels = torch.randint(0, vocab, (n,))
    eager = _saved_storage_bytes(_ce, logits, labels)
    compiled = _saved_storage_bytes(torch.compile(_ce), logits, labels)
    assert eager == n * vocab * 4 + n * 8 + 4  # fp32 log-softmax, int64 labels, 0-dim total weight
    assert compiled == n * vocab * 2 + n * 8 + 2 * n * 4  # the bf16 logits, the labels, max and logsumexp per row
    assert engine_delta == compiled - eager
