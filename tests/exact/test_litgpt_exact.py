"""litgpt's own model code saves different tensors than transformers' for the same architecture.

LLaMA-Adapter and LLaMA-Adapter V2 (``litgpt/adapter.py``, ``adapter_v2.py``; method 'llama-adapter') are checked
the same way: trainable parameters and the bytes an adapted block saves.

The engine's ``implementation: litgpt`` must match litgpt's ``GPT`` (``litgpt.lora``) block by block: its fused
``attn`` projection whose value view keeps the whole q/k/v output alive under SDPA (as many key/value heads as
query heads), its ``LoRAQKVLinear`` (one dropout, one ``lora_A`` for every adapted projection, a grouped
``conv1d`` and ``zero_pad``'s ``index_copy_``), its copy of the attention output before ``proj`` and its
``RMSNorm``'s fp32 weight copy.

``MEASURED`` holds the bytes a real litgpt 0.5.3 block saves for backward on CPU (torch 2.13, bf16, 2 x 256
tokens, the second block of two, distinct storages, parameters and tensors an earlier block saved left out);
``test_litgpt_saves_what_was_measured`` re-measures them wherever litgpt's sources are installed
(``pip install --no-deps litgpt==0.5.3``: its model code needs only torch, so lightning is never imported).
The one CPU/CUDA difference: CPU's LayerNorm keeps its mean and rstd in the input dtype (bf16), CUDA's in fp32,
and the engine models CUDA.
"""

from __future__ import annotations

import importlib.util
import sys
import types

import pytest

from simulator import Scenario, estimate

BATCH, SEQ = 2, 256
TOKENS = BATCH * SEQ
LLAMA = dict(family="llama", n_heads=4, intermediate=128, tied_embeddings=False)
PHI = dict(family="phi", n_heads=4, intermediate=256, norm="layernorm", activation="gelu_tanh", gated_mlp=False,
           qkv_bias=True, attn_out_bias=True, mlp_bias=True, norm_bias=True, lm_head_bias=True, parallel_block=True)
# GPT-NeoX (StableLM-alpha, Pythia): one fused query_key_value module, adapted part by part (method.qkv_parts)
NEOX = dict(family="gpt_neox", n_heads=4, intermediate=256, norm="layernorm", activation="gelu", gated_mlp=False,
            qkv_bias=True, attn_out_bias=True, mlp_bias=True, norm_bias=True, parallel_block=True, tied_embeddings=False)
ARCHS = {"llama": LLAMA, "phi": PHI, "neox": NEOX}
QV = ("q_proj", "v_proj")
ALL = ("q_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# (architecture, kv heads, LoRA targets or None for full fine-tuning): bytes measured on litgpt 0.5.3
MEASURED = {
    ("llama", 4, QV): 1_275_392,
    ("llama", 2, QV): 1_111_296,
    ("llama", 4, None): 1_651_200,
    ("llama", 2, None): 1_520_128,
    ("llama", 2, ALL): 1_406_208,
    ("llama", 4, ("q_proj", "k_proj", "v_proj")): 1_151_488,
    ("phi", 4, QV): 945_152,
    ("phi", 4, None): 1_124_352,
    ("neox", 4, QV): 947_200,
    ("neox", 4, ("q_proj", "k_proj", "v_proj")): 823_296,
    ("neox", 4, None): 1_191_936,
}


def _cpu_layernorm_bytes(arch: str) -> int:
    """What the engine (CUDA: fp32 mean and rstd) counts above CPU (bf16) per block: phi's one shared norm,
    GPT-NeoX's two."""
    return {"llama": 0, "phi": 1, "neox": 2}[arch] * 2 * TOKENS * (4 - 2)


def _engine_block_bytes(arch: str, kv: int, targets) -> float:
    model = {"name": "tiny", "n_layers": 2, "hidden": 64, "n_kv_heads": kv, "vocab": 1024, **ARCHS[arch]}
    method = {"kind": "full"} if targets is None else {
        "kind": "lora", "r": 8, "alpha": 16, "dropout": 0.0, "targets": list(targets), "adapter_dtype": "model"}
    if arch == "neox" and targets is not None:
        method.update(targets=["query_key_value"], qkv_parts=[t[0] for t in targets])
    sc = Scenario.model_validate({
        "model": model, "gpu": "a100-sxm-40gb", "precision": "bf16", "attention": "sdpa-flash", "method": method,
        "workload": {"micro_batch": BATCH, "seq_len": SEQ}, "loss": "chunked", "implementation": "litgpt"})
    layer = "gpt_neox.layers.1" if arch == "neox" else "model.layers.1"
    return estimate(sc, what_fits=False, timing=False).activations_by_layer[layer]


@pytest.mark.parametrize("case", list(MEASURED), ids=lambda c: f"{c[0]}-kv{c[1]}-{'full' if c[2] is None else '+'.join(c[2])}")
def test_engine_equals_the_litgpt_block(case):
    arch, kv, targets = case
    assert _engine_block_bytes(arch, kv, targets) == MEASURED[case] + _cpu_layernorm_bytes(arch)


# --- live re-measurement --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def litgpt_lora():
    """litgpt's ``lora`` module loaded from its installed sources without the package ``__init__`` (which pulls in
    lightning); ``litgpt.utils`` is replaced by the two helpers the model code calls."""
    spec = importlib.util.find_spec("litgpt")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("litgpt is not installed (pip install --no-deps litgpt==0.5.3)")
    torch = pytest.importorskip("torch")
    saved = {k: v for k, v in sys.modules.items() if k == "litgpt" or k.startswith("litgpt.")}
    pkg = types.ModuleType("litgpt")
    pkg.__path__ = list(spec.submodule_search_locations)
    utils = types.ModuleType("litgpt.utils")
    utils.find_multiple = lambda n, k: n if n % k == 0 else n + k - (n % k)

    def _unused(*args, **kwargs):
        raise NotImplementedError("checkpoint conversion is not used here")

    utils.map_old_state_dict_weights = _unused
    sys.modules.update({"litgpt": pkg, "litgpt.utils": utils})
    pkg.utils = utils
    try:
        import litgpt.lora as lora  # noqa: PLC0415
        yield torch, lora
    finally:
        for k in [k for k in sys.modules if k == "litgpt" or k.startswith("litgpt.")]:
            del sys.modules[k]
        sys.modules.update(saved)


def _litgpt_block_bytes(torch, lora, arch: str, kv: int, targets) -> int:
    if arch == "llama":
        kw = dict(bias=False, norm_class_name="RMSNorm", mlp_class_name="LLaMAMLP", intermediate_size=128,
                  rotary_percentage=1.0, parallel_residual=False)
    elif arch == "phi":
        kw = dict(bias=True, norm_class_name="LayerNorm", mlp_class_name="GptNeoxMLP", intermediate_size=256,
                  rotary_percentage=0.5, parallel_residual=True, shared_attention_norm=True, gelu_approximate="tanh",
                  lm_head_bias=True)
    else:
        kw = dict(bias=True, norm_class_name="LayerNorm", mlp_class_name="GptNeoxMLP", intermediate_size=256,
                  rotary_percentage=0.25, parallel_residual=True, shared_attention_norm=False)
    on = set(targets or ())
    cfg = lora.Config(n_layer=2, n_embd=64, n_head=4, n_query_groups=kv, padded_vocab_size=1024, vocab_size=1024,
                      block_size=SEQ, lora_r=8 if targets else 0, lora_alpha=16, lora_dropout=0.0,
                      lora_query="q_proj" in on, lora_key="k_proj" in on, lora_value="v_proj" in on,
                      lora_projection="o_proj" in on, lora_mlp="down_proj" in on, **kw)
    torch.manual_seed(0)
    model = lora.GPT(cfg).to(torch.bfloat16)
    if targets:
        lora.mark_only_lora_as_trainable(model)
    model.train()
    return _saved_in_block(torch, model)


def _saved_in_block(torch, model) -> int:
    """Bytes of the distinct storages the second block saves for backward (parameters and storages an earlier
    block saved left out)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    inside, before, seen = [False], set(), {}
    block = model.transformer.h[1]
    block.register_forward_pre_hook(lambda *a: inside.__setitem__(0, True))
    block.register_forward_hook(lambda *a: inside.__setitem__(0, False))

    def pack(t):
        st = t.untyped_storage()
        ptr = st.data_ptr()
        if not inside[0]:
            before.add(ptr)
        elif ptr not in params and ptr not in before:
            seen[ptr] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(torch.randint(0, 1024, (BATCH, SEQ)), lm_head_chunk_size=128)
    return sum(seen.values())


@pytest.mark.parametrize("case", list(MEASURED), ids=lambda c: f"{c[0]}-kv{c[1]}-{'full' if c[2] is None else '+'.join(c[2])}")
def test_litgpt_saves_what_was_measured(litgpt_lora, case):
    torch, lora = litgpt_lora
    assert _litgpt_block_bytes(torch, lora, *case) == MEASURED[case]


# --- LLaMA-Adapter (V2) -----------------------------------------------------------------------------------------

# (architecture, kv heads, V2): (bytes the adapted second block saves, trainable parameters), litgpt 0.5.3 on CPU,
# adapter_start_layer 1, prompt length 10.  The prompt's attention runs ATen's math path on CPU and CUDA alike
# (its keys have batch 1, the queries batch b: no fused kernel takes that).
ADAPTER_MEASURED = {
    ("llama", 4, False): (810_240, 644),
    ("llama", 2, False): (810_240, 644),
    ("llama", 4, True): (2_205_952, 5_316),
    ("llama", 2, True): (2_008_064, 5_060),
    ("neox", 4, False): (283_648, 644),
    ("neox", 4, True): (1_615_616, 5_636),
}


def _engine_adapter(arch: str, kv: int, v2: bool) -> tuple[float, int]:
    model = {"name": "tiny", "n_layers": 2, "hidden": 64, "n_kv_heads": kv, "vocab": 1024, **ARCHS[arch]}
    sc = Scenario.model_validate({
        "model": model, "gpu": "a100-sxm-40gb", "precision": "bf16", "attention": "sdpa-flash",
        "method": {"kind": "llama-adapter", "start_layer": 1, "v2": v2},
        "workload": {"micro_batch": BATCH, "seq_len": SEQ}, "loss": "chunked", "implementation": "litgpt"})
    e = estimate(sc, what_fits=False, timing=False)
    layer = "gpt_neox.layers.1" if arch == "neox" else "model.layers.1"
    return e.activations_by_layer[layer], e.n_trainable_params


@pytest.mark.parametrize("case", list(ADAPTER_MEASURED), ids=lambda c: f"{c[0]}-kv{c[1]}-{'v2' if c[2] else 'v1'}")
def test_engine_equals_the_litgpt_adapter_block(case):
    arch, kv, v2 = case
    saved, trainable = ADAPTER_MEASURED[case]
    # V1 leaves the blocks' inputs without grad, so no LayerNorm of an adapted block saves anything
    cpu_ln = _cpu_layernorm_bytes(arch) if v2 else 0
    assert _engine_adapter(arch, kv, v2) == (saved + cpu_ln, trainable)


@pytest.fixture(scope="module")
def litgpt_adapters(litgpt_lora):
    torch, _ = litgpt_lora
    import litgpt.adapter as adapter  # noqa: PLC0415
    import litgpt.adapter_v2 as adapter_v2  # noqa: PLC0415
    return torch, adapter, adapter_v2


@pytest.mark.parametrize("case", list(ADAPTER_MEASURED), ids=lambda c: f"{c[0]}-kv{c[1]}-{'v2' if c[2] else 'v1'}")
def test_litgpt_adapter_saves_what_was_measured(litgpt_adapters, case):
    torch, adapter, adapter_v2 = litgpt_adapters
    arch, kv, v2 = case
    mod = adapter_v2 if v2 else adapter
    if arch == "llama":
        kw = dict(bias=False, norm_class_name="RMSNorm", mlp_class_name="LLaMAMLP", intermediate_size=128,
                  rotary_percentage=1.0, parallel_residual=False)
    else:
        kw = dict(bias=True, norm_class_name="LayerNorm", mlp_class_name="GptNeoxMLP", intermediate_size=256,
                  rotary_percentage=0.25, parallel_residual=True, shared_attention_norm=False)
    cfg = mod.Config(n_layer=2, n_embd=64, n_head=4, n_query_groups=kv, padded_vocab_size=1024, vocab_size=1024,
                     block_size=SEQ, adapter_prompt_length=10, adapter_start_layer=1, **kw)
    torch.manual_seed(0)
    model = mod.GPT(cfg).to(torch.bfloat16)
    (adapter_v2.mark_only_adapter_v2_as_trainable if v2 else adapter.mark_only_adapter_as_trainable)(model)
    model.train()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert (_saved_in_block(torch, model), trainable) == ADAPTER_MEASURED[case]
