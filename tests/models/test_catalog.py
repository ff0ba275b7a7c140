"""The model catalog (simulator/models/*.yaml) and the Hugging Face config.json loader."""

from __future__ import annotations

import json
import pathlib

import pytest
import yaml

from hwprofiles.names import UnknownNameError
from simulator.config.model import ModelArch, MoE
from simulator.models import from_hf_config, get_model, list_models, supported_model_types

MODELS_DIR = pathlib.Path(__file__).resolve().parents[2] / "simulator" / "models"
YAMLS = sorted(MODELS_DIR.glob("*.yaml"))


# --------------------------------------------------------------------------------- independent arithmetic


def llama_style_params(a: ModelArch) -> int:
    """Parameters of an HF Llama-style decoder (family 'llama'), counted weight by weight."""
    h = a.hidden
    attn = h * a.q_dim + 2 * h * a.kv_dim + a.q_dim * h  # q, k, v, o
    attn += (a.q_dim + 2 * a.kv_dim) if a.qkv_bias else 0
    attn += h if a.attn_out_bias else 0
    attn += 2 * a.d_head if a.qk_norm else 0  # q_norm, k_norm over head_dim

    def swiglu(i: int) -> int:
        return 3 * h * i + ((2 * i + h) if a.mlp_bias else 0)  # gate, up, down

    if a.moe is None:
        mlp = swiglu(a.intermediate)
    else:
        mlp = a.moe.n_experts * swiglu(a.expert_intermediate) + h * a.moe.n_experts  # experts + router
        if a.moe.n_shared_experts:
            mlp += a.moe.n_shared_experts * swiglu(a.moe.shared_intermediate) + h  # + shared_expert_gate (Qwen2-MoE)
    norms = (4 if a.sandwich_norm else 2) * h
    embed = a.vocab * h
    head = 0 if a.tied_embeddings else a.vocab * h
    return embed + a.n_layers * (attn + mlp + norms) + h + head  # + final norm


def gpt2_params(a: ModelArch) -> int:
    """GPT-2: token + learned position tables, Conv1D layers with biases, LayerNorms with bias, tied head."""
    h, i = a.hidden, a.intermediate
    block = (2 * h) + (h * 3 * h + 3 * h) + (h * h + h) + (2 * h) + (h * i + i) + (i * h + h)
    head = 0 if a.tied_embeddings else a.vocab * h
    return a.vocab * h + a.max_position_embeddings * h + a.n_layers * block + 2 * h + head


# ----------------------------------------------------------------------------------------------- catalog


def test_catalog_is_large_enough_and_listed_from_files():
    names = list_models()
    assert len(names) >= 30
    assert names == sorted(p.stem for p in YAMLS)
    assert names == sorted(names)


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: p.stem)
def test_yaml_is_a_full_modelarch_dump(path: pathlib.Path):
    data = yaml.safe_load(path.read_text())
    # Keys are exactly the schema's fields (a full dump, nothing extra, nothing left to defaults).
    assert list(data) == list(ModelArch.model_fields)
    if data["moe"] is not None:
        assert set(data["moe"]) == set(MoE.model_fields)
    arch = ModelArch.model_validate(data)
    assert arch.name == path.stem == path.stem.lower()
    assert arch.source.startswith(("https://huggingface.co/", "https://arxiv.org/"))
    if arch.hf_id:
        assert arch.source == f"https://huggingface.co/{arch.hf_id}/blob/main/config.json"
    assert get_model(path.stem) == arch


REQUIRED = """
llama-2-7b llama-2-13b llama-2-70b llama-3-8b llama-3.1-8b llama-3.1-70b llama-3.1-405b llama-3.2-1b llama-3.2-3b
llama-7b llama-13b llama-30b llama-65b mistral-7b mixtral-8x7b mixtral-8x22b qwen1.5-0.5b qwen1.5-7b qwen2-7b
qwen2.5-0.5b qwen2.5-1.5b qwen2.5-3b qwen2.5-7b qwen2.5-14b qwen2.5-32b qwen2.5-72b qwen3-8b gemma-2-9b phi-3-mini
gpt2 gpt2-medium gpt2-large gpt2-xl gpt3-175b opt-125m opt-1.3b opt-6.7b opt-13b opt-30b opt-66b bloom-7b1 falcon-7b
t5-base flan-t5-xl t0-3b bert-base-uncased bert-large-uncased roberta-base deberta-v3-base
qwen-1.8b qwen-7b qwen-14b qwen-72b phi-1.5 stablelm-base-alpha-3b codellama-34b falcon-40b
""".split()


def test_required_models_present():
    missing = sorted(set(REQUIRED) - set(list_models()))
    assert not missing


def test_llama_3_1_8b_parameter_count():
    # Llama-3.1-8B = 8,030,261,248 parameters:
    #   embed 128256*4096 = 525,336,576
    #   32 layers x (q 4096*4096 + k,v 2*4096*1024 + o 4096*4096 + 3*4096*14336 + 2*4096 norms)
    #     = 32 x (16,777,216 + 8,388,608 + 16,777,216 + 176,160,768 + 8,192) = 32 x 218,112,000 = 6,979,584,000
    #   final norm 4096; untied lm_head 128256*4096 = 525,336,576
    #   525,336,576 + 6,979,584,000 + 4,096 + 525,336,576 = 8,030,261,248
    assert llama_style_params(get_model("llama-3.1-8b")) == 8_030_261_248


def test_qwen2_5_0_5b_parameter_count():
    # Qwen2.5-0.5B = 494,032,768 parameters (tied embeddings, q/k/v biases, 14 heads / 2 KV heads of 64):
    #   embed 151936*896 = 136,134,656 (shared with the LM head)
    #   24 layers x (q 896*896+896 + k,v 2*(896*128+128) + o 896*896 + 3*896*4864 + 2*896 norms)
    #     = 24 x (803,712 + 229,632 + 802,816 + 13,074,432 + 1,792) = 24 x 14,912,384 = 357,897,216
    #   final norm 896:  136,134,656 + 357,897,216 + 896 = 494,032,768
    assert llama_style_params(get_model("qwen2.5-0.5b")) == 494_032_768


def test_mixtral_8x7b_parameter_count():
    # Mixtral-8x7B = 46,702,792,704 parameters:
    #   embed + untied head 2*32000*4096 = 262,144,000
    #   32 layers x (attn 2*4096*4096 + 2*4096*1024 = 41,943,040
    #                + 8 experts x 3*4096*14336 = 1,409,286,144 + router 4096*8 = 32,768 + 2 norms 8,192)
    #     = 32 x 1,451,270,144 = 46,440,644,608
    #   + final norm 4096 = 46,702,792,704
    assert llama_style_params(get_model("mixtral-8x7b")) == 46_702_792_704


def test_gemma_2_9b_parameter_count():
    # Gemma-2-9B = 9,241,705,984 parameters (tied; 16 heads x 256 = 4096 q width; four norms per block):
    #   embed 256000*3584 = 917,504,000
    #   42 layers x (q 3584*4096 + k,v 2*3584*2048 + o 4096*3584 + 3*3584*14336 + 4*3584)
    #     = 42 x (44,040,192 + 154,140,672 + 14,336) = 42 x 198,195,200 = 8,324,198,400
    #   + final norm 3584 = 9,241,705,984
    assert llama_style_params(get_model("gemma-2-9b")) == 9_241_705_984


def test_gpt2_parameter_count():
    # GPT-2 small = 124,439,808 parameters:
    #   wte 50257*768 = 38,597,376; wpe 1024*768 = 786,432
    #   12 layers x (ln_1 1,536 + c_attn 768*2304+2304 + c_proj 768*768+768 + ln_2 1,536
    #                + c_fc 768*3072+3072 + c_proj 3072*768+768) = 12 x 7,087,872 = 85,054,464
    #   ln_f 1,536; tied head:  38,597,376 + 786,432 + 85,054,464 + 1,536 = 124,439,808
    assert gpt2_params(get_model("gpt2")) == 124_439_808


def gptj_params(a: ModelArch) -> int:
    """GPT-J: one LayerNorm per block, q/k/v/out_proj without bias, fc_in/fc_out with bias, untied biased lm_head."""
    h, i = a.hidden, a.intermediate
    block = 2 * h + 4 * h * a.q_dim + (h * i + i) + (i * h + h)
    return a.vocab * h + a.n_layers * block + 2 * h + (a.vocab * h + a.vocab)


def test_gpt_j_6b_parameter_count():
    # EleutherAI/gpt-j-6b = 6,050,882,784 parameters:
    #   wte 50400*4096 = 206,438,400
    #   28 blocks x (ln_1 8,192 + q,k,v,out 4*4096*4096 = 67,108,864 + fc_in 4096*16384+16384 = 67,125,248
    #                + fc_out 16384*4096+4096 = 67,112,960) = 28 x 201,355,264 = 5,637,947,392
    #   ln_f 8,192; lm_head 50400*4096 + 50400 = 206,488,800
    a = get_model("EleutherAI/gpt-j-6B")
    assert (a.name, a.family, a.parallel_block, a.lm_head_bias) == ("gpt-j-6b", "gptj", True, True)
    assert gptj_params(a) == 6_050_882_784
    from simulator.estimate import count_params

    assert count_params(a) == 6_050_882_784


@pytest.mark.parametrize(
    "name, field, value",
    [
        ("llama-3-8b", "vocab", 128256),
        ("llama-2-7b", "vocab", 32000),
        ("mistral-7b", "vocab", 32000),
        ("qwen2.5-7b", "vocab", 152064),
        ("qwen2.5-3b", "vocab", 151936),
        ("gemma-2-9b", "vocab", 256000),
        ("llama-3.1-70b", "intermediate", 28672),
        ("llama-3.1-405b", "intermediate", 53248),
        ("llama-2-13b", "intermediate", 13824),
        ("llama-2-70b", "intermediate", 28672),
        ("llama-2-70b", "kv_heads", 8),
        ("falcon-7b", "kv_heads", 1),
        ("falcon-40b", "kv_heads", 8),
        ("gemma-2-9b", "d_head", 256),
        ("qwen3-8b", "d_head", 128),
        ("llama-3.2-1b", "tied_embeddings", True),
        ("llama-3.2-3b", "tied_embeddings", True),
        ("qwen2.5-1.5b", "tied_embeddings", True),
        ("qwen2.5-7b", "tied_embeddings", False),
        ("opt-1.3b", "tied_embeddings", True),
        ("t5-base", "tied_embeddings", True),
        ("flan-t5-xl", "tied_embeddings", False),
        ("qwen2.5-7b", "qkv_bias", True),
        ("qwen3-8b", "qk_norm", True),
        ("gemma-2-9b", "sandwich_norm", True),
        ("gemma-2-9b", "norm_plus_one", True),
        ("llama-3.1-8b", "norm_plus_one", False),
        ("gpt-j-6b", "rotary_fraction", 0.25),
        ("bloom-7b1", "position", "alibi"),
        ("falcon-7b", "parallel_block", True),
        ("qwen-7b", "intermediate", 11008),  # config intermediate_size 22016 / 2
        ("qwen-14b", "intermediate", 13696),  # 27392 / 2
        ("t5-base", "d_head", 64),
        ("bert-base-uncased", "type_vocab_size", 2),
    ],
)
def test_spot_values(name: str, field: str, value):
    assert getattr(get_model(name), field) == value


def test_moe_entries():
    for name in ("mixtral-8x7b", "mixtral-8x22b"):
        moe = get_model(name).moe
        assert moe is not None and (moe.n_experts, moe.top_k) == (8, 2)


def test_family_conventions():
    for name in list_models():
        a = get_model(name)
        if a.family == "gpt2":
            assert (a.activation, a.position, a.norm, a.norm_bias) == ("gelu_tanh", "learned", "layernorm", True)
            assert a.qkv_bias and a.attn_out_bias and a.mlp_bias
        if a.family == "qwen":
            assert a.qkv_bias and a.gated_mlp
        if a.family == "t5":
            assert (a.arch, a.position, a.norm, a.norm_bias) == ("encoder_decoder", "relative", "rmsnorm", False)
            assert a.n_decoder_layers is not None and a.head_dim is not None
        if a.family in ("bert", "roberta", "deberta_v2"):
            assert a.arch == "encoder"
        if a.norm == "rmsnorm":
            assert not a.norm_bias


# ------------------------------------------------------------------------------------------ name lookup


def test_lookup_is_case_insensitive_and_cached():
    a = get_model("llama-3.1-8b")
    assert get_model("LLAMA-3.1-8B") is a
    assert get_model("meta-llama/Llama-3.1-8B") is a
    assert get_model("Llama_3.1_8b") is a


@pytest.mark.parametrize(
    "alias, name",
    [
        ("meta-llama/Llama-3.1-8B", "llama-3.1-8b"),
        ("Llama-2-7b-hf", "llama-2-7b"),
        ("meta-llama/Llama-2-7b-chat-hf", "llama-2-7b"),
        ("meta-llama/Meta-Llama-3.1-8B-Instruct", "llama-3.1-8b"),
        ("meta-llama/Meta-Llama-3-8B", "llama-3-8b"),
        ("Qwen/Qwen2.5-7B-Instruct", "qwen2.5-7b"),
        ("Qwen/Qwen2.5-72B-Instruct-GPTQ-Int4", "qwen2.5-72b"),
        ("Qwen/Qwen-7B-Chat", "qwen-7b"),
        ("Qwen/Qwen-1_8B-Chat-Int4", "qwen-1.8b"),
        ("Qwen/Qwen1.5-7B-Chat", "qwen1.5-7b"),
        ("mistralai/Mistral-7B-Instruct-v0.1", "mistral-7b"),
        ("mistralai/Mixtral-8x7B-Instruct-v0.1", "mixtral-8x7b"),
        ("google/gemma-2-9b-it", "gemma-2-9b"),
        ("bigscience/T0_3B", "t0-3b"),
        ("openai-community/gpt2-xl", "gpt2-xl"),
        ("huggyllama/llama-65b", "llama-65b"),
        ("tiiuae/falcon-7b-instruct", "falcon-7b"),
    ],
)
def test_hf_ids_and_variants_resolve(alias: str, name: str):
    assert get_model(alias).name == name


def test_unknown_name_lists_close_matches():
    with pytest.raises(UnknownNameError) as err:
        get_model("llama-3.1-7b")
    assert "llama-3.1-8b" in str(err.value)
    assert isinstance(err.value, ValueError)


def test_other_release_versions_are_not_aliased():
    # Mistral-7B-v0.3 has a 32768 vocabulary: it must not silently become mistral-7b (v0.1).
    with pytest.raises(UnknownNameError):
        get_model("mistralai/Mistral-7B-Instruct-v0.3")


# --------------------------------------------------------------------------------------- from_hf_config


def test_hf_config_file_and_directory(tmp_path: pathlib.Path):
    cfg = {
        "model_type": "llama",
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
        "max_position_embeddings": 131072,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    }
    d = tmp_path / "my-llama"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(cfg))
    by_dir = from_hf_config(d)
    by_file = from_hf_config(d / "config.json")
    assert by_dir == by_file
    assert by_dir.name == "my-llama"  # no _name_or_path: the directory name
    assert by_dir.torch_dtype == "bf16"
    # Same architecture as the catalog entry, apart from the identity fields.
    ident = {"name", "source", "hf_id"}
    assert by_dir.model_dump(exclude=ident) == get_model("llama-3.1-8b").model_dump(exclude=ident)
    assert from_hf_config(d, name="custom").name == "custom"
    named = from_hf_config({**cfg, "_name_or_path": "meta-llama/Llama-3.1-8B"})
    assert named.name == "meta-llama/Llama-3.1-8B" and named.hf_id == "meta-llama/Llama-3.1-8B"


def test_hf_config_errors(tmp_path: pathlib.Path):
    with pytest.raises(ValueError, match="unsupported model_type 'mamba'.*llama"):
        from_hf_config({"model_type": "mamba"})
    with pytest.raises(ValueError, match="intermediate_size"):
        from_hf_config(
            {
                "model_type": "llama",
                "hidden_size": 64,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "vocab_size": 100,
            }
        )
    with pytest.raises(ValueError, match="model_type"):
        from_hf_config({"hidden_size": 64})
    with pytest.raises(FileNotFoundError):
        from_hf_config(tmp_path / "nowhere")
    assert {"llama", "qwen", "gpt2", "t5", "bert", "deberta-v2", "falcon"} <= set(supported_model_types())


def test_qwen_v1_config_halves_intermediate():
    # Qwen-7B config.json (model_type qwen, remote code): intermediate_size 22016 = 2 x 11008.
    cfg = {
        "model_type": "qwen",
        "hidden_size": 4096,
        "intermediate_size": 22016,
        "kv_channels": 128,
        "num_attention_heads": 32,
        "num_hidden_layers": 32,
        "vocab_size": 151936,
        "max_position_embeddings": 32768,
        "seq_length": 8192,
        "no_bias": True,
        "tie_word_embeddings": False,
        "bf16": False,
        "fp16": False,
        "fp32": False,
        "_name_or_path": "Qwen/Qwen-7B",
    }
    a = from_hf_config(cfg, name="qwen-7b")
    ident = {"name", "source", "hf_id"}
    assert a.model_dump(exclude=ident) == get_model("qwen-7b").model_dump(exclude=ident)


def test_falcon_kv_heads():
    base = {
        "model_type": "falcon",
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 8,
        "vocab_size": 100,
    }
    assert from_hf_config({**base, "multi_query": True}).kv_heads == 1
    assert from_hf_config({**base, "multi_query": False}).kv_heads == 8
    assert from_hf_config({**base, "new_decoder_architecture": True, "num_kv_heads": 2}).kv_heads == 2


# ------------------------------------------------- round trip through transformers' own config classes

transformers = pytest.importorskip("transformers")

TINY = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4)


def _tiny_configs():
    t = transformers
    return {
        "llama": t.LlamaConfig(**TINY, num_key_value_heads=2, max_position_embeddings=256),
        "llama-biases-tied": t.LlamaConfig(
            **TINY, num_key_value_heads=2, attention_bias=True, mlp_bias=True, tie_word_embeddings=True
        ),
        "qwen2": t.Qwen2Config(**TINY, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True),
        "qwen3": t.Qwen3Config(**TINY, num_key_value_heads=2, head_dim=32),
        "gemma2": t.Gemma2Config(**TINY, num_key_value_heads=2, head_dim=32),
        "mixtral": t.MixtralConfig(**TINY, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2),
    }


@pytest.mark.torch
@pytest.mark.parametrize("key", list(_tiny_configs()))
def test_llama_family_round_trip(key: str):
    config = _tiny_configs()[key]
    a = from_hf_config(config.to_dict(), name=key)
    assert a.family == "llama"
    assert a.n_layers == config.num_hidden_layers
    assert a.hidden == config.hidden_size
    assert a.n_heads == config.num_attention_heads
    assert a.kv_heads == config.num_key_value_heads
    assert a.d_head == (getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)
    assert a.intermediate == config.intermediate_size
    assert a.vocab == config.vocab_size
    assert a.max_position_embeddings == config.max_position_embeddings
    assert a.tied_embeddings == config.tie_word_embeddings
    assert a.qk_norm == (key == "qwen3")
    assert a.sandwich_norm == (key == "gemma2")
    assert a.norm_plus_one == (key in ("gemma", "gemma2"))
    assert a.qkv_bias == (key in ("qwen2", "llama-biases-tied"))
    if key == "gemma2":
        assert a.activation == "gelu_tanh"
    if key == "mixtral":
        assert a.moe == MoE(n_experts=4, top_k=2)
    # The flags add up to the real module's parameter count.
    model = transformers.AutoModelForCausalLM.from_config(config)
    assert llama_style_params(a) == sum(p.numel() for p in model.parameters())


@pytest.mark.torch
def test_qwen2_moe_round_trip():
    config = transformers.Qwen2MoeConfig(
        **TINY,
        num_key_value_heads=2,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=48,
    )
    a = from_hf_config(config.to_dict())
    assert a.moe == MoE(n_experts=4, top_k=2, expert_intermediate=32, n_shared_experts=1, shared_intermediate=48)
    assert a.qkv_bias and not a.attn_out_bias
    model = transformers.AutoModelForCausalLM.from_config(config)
    assert llama_style_params(a) == sum(p.numel() for p in model.parameters())


@pytest.mark.torch
def test_gpt2_round_trip():
    config = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=97, n_positions=128)
    a = from_hf_config(config.to_dict())
    assert (a.family, a.hidden, a.n_layers, a.n_heads, a.vocab) == ("gpt2", 64, 2, 4, 97)
    assert (a.intermediate, a.max_position_embeddings, a.tied_embeddings) == (256, 128, True)
    assert (a.activation, a.position, a.norm) == ("gelu_tanh", "learned", "layernorm")
    model = transformers.AutoModelForCausalLM.from_config(config)
    assert gpt2_params(a) == sum(p.numel() for p in model.parameters())


@pytest.mark.torch
def test_gptj_round_trip():
    config = transformers.GPTJConfig(n_embd=64, n_layer=2, n_head=4, vocab_size=97, n_positions=128, rotary_dim=8)
    a = from_hf_config(config.to_dict())
    assert (a.family, a.hidden, a.n_layers, a.n_heads, a.intermediate, a.vocab) == ("gptj", 64, 2, 4, 256, 97)
    assert (a.activation, a.position, a.parallel_block, a.qkv_bias, a.mlp_bias) == ("gelu_tanh", "rope", True, False, True)
    model = transformers.AutoModelForCausalLM.from_config(config)
    assert gptj_params(a) == sum(p.numel() for p in model.parameters())


@pytest.mark.torch
def test_opt_round_trip():
    config = transformers.OPTConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        ffn_dim=192,
        vocab_size=97,
        max_position_embeddings=128,
        word_embed_proj_dim=64,
    )
    a = from_hf_config(config.to_dict())
    assert (a.family, a.hidden, a.n_layers, a.n_heads, a.intermediate, a.vocab) == ("opt", 64, 2, 4, 192, 97)
    assert (a.max_position_embeddings, a.activation, a.tied_embeddings, a.qkv_bias) == (128, "relu", True, True)
    with pytest.raises(ValueError, match="word_embed_proj_dim"):
        from_hf_config({**config.to_dict(), "word_embed_proj_dim": 32})


@pytest.mark.torch
def test_bert_round_trip():
    config = transformers.BertConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        vocab_size=97,
        max_position_embeddings=128,
        type_vocab_size=2,
    )
    a = from_hf_config(config.to_dict())
    assert (a.family, a.arch, a.position, a.norm, a.norm_bias) == ("bert", "encoder", "learned", "layernorm", True)
    assert (a.hidden, a.n_layers, a.n_heads, a.intermediate, a.vocab) == (64, 2, 4, 128, 97)
    assert (a.max_position_embeddings, a.type_vocab_size, a.tied_embeddings) == (128, 2, True)


@pytest.mark.torch
@pytest.mark.parametrize(
    "ff, act, gated, tied", [("relu", "relu", False, True), ("gated-gelu", "gelu_tanh", True, False)]
)
def test_t5_round_trip(ff: str, act: str, gated: bool, tied: bool):
    config = transformers.T5Config(
        d_model=64,
        d_kv=8,
        d_ff=128,
        num_layers=3,
        num_decoder_layers=2,
        num_heads=4,
        vocab_size=97,
        feed_forward_proj=ff,
        tie_word_embeddings=tied,
    )
    # transformers >= 5 writes tie_word_embeddings=True for every T5 and keeps the requested value as
    # scale_decoder_outputs; a raw config.json (flan-t5-xl) says tie_word_embeddings: false directly.
    a = from_hf_config(config.to_dict())
    raw = from_hf_config({**config.to_dict(), "tie_word_embeddings": tied, "scale_decoder_outputs": None})
    assert raw.tied_embeddings == tied
    assert (a.family, a.arch, a.position, a.norm, a.norm_bias) == (
        "t5",
        "encoder_decoder",
        "relative",
        "rmsnorm",
        False,
    )
    assert (a.n_layers, a.n_decoder_layers, a.hidden, a.n_heads, a.d_head) == (3, 2, 64, 4, 8)
    assert a.q_dim == 32  # n_heads * d_kv differs from d_model
    assert (a.intermediate, a.vocab, a.activation, a.gated_mlp, a.tied_embeddings) == (128, 97, act, gated, tied)
    assert a.relative_attention_num_buckets == config.relative_attention_num_buckets


@pytest.mark.torch
@pytest.mark.parametrize(
    "cls, kwargs, family",
    [
        ("MistralConfig", dict(TINY, num_key_value_heads=2), "llama"),
        ("GemmaConfig", dict(TINY, num_key_value_heads=2, head_dim=16), "llama"),
        ("Phi3Config", dict(TINY, num_key_value_heads=4, pad_token_id=0, eos_token_id=1), "phi3"),
        ("FalconConfig", dict(vocab_size=97, hidden_size=64, num_hidden_layers=2, num_attention_heads=4), "falcon"),
        ("BloomConfig", dict(vocab_size=97, hidden_size=64, n_layer=2, n_head=4), "bloom"),
        ("GPTNeoXConfig", dict(TINY), "gpt_neox"),
        ("PhiConfig", dict(TINY), "phi"),
        ("RobertaConfig", dict(TINY, type_vocab_size=1), "roberta"),
        (
            "DebertaV2Config",
            dict(TINY, relative_attention=True, position_biased_input=False, position_buckets=16,
                 pos_att_type=["p2c", "c2p"], share_att_key=True, norm_rel_ebd="layer_norm"),
            "deberta_v2",
        ),
        ("MT5Config", dict(vocab_size=97, d_model=64, d_kv=16, d_ff=96, num_layers=2, num_heads=4), "t5"),
    ],
)
def test_other_model_types_map(cls: str, kwargs: dict, family: str):
    config = getattr(transformers, cls)(**kwargs)
    a = from_hf_config(config.to_dict())
    assert a.family == family
    assert a.vocab == 97 and a.hidden == 64
    if family in ("llama", "phi3"):
        # Mistral/Gemma/Phi-3 (fused qkv_proj, gate_up_proj): the Llama-style count still equals the real module's.
        model = transformers.AutoModelForCausalLM.from_config(config)
        assert llama_style_params(a) == sum(p.numel() for p in model.parameters())
    if family == "deberta_v2":
        assert (a.position, a.relative_attention_num_buckets, a.type_vocab_size) == ("relative", 16, 0)


def test_rotary_fraction_from_each_config_spelling():
    """The share of each head the rotary embedding turns sizes the cos/sin tables: GPT-J names rotary_dim,
    GPT-NeoX rotary_pct, Phi partial_rotary_factor (default 0.5), transformers 5 rope_parameters."""
    gptj = {"model_type": "gptj", "n_layer": 2, "n_embd": 4096, "n_head": 16, "vocab_size": 97, "rotary_dim": 64}
    assert (from_hf_config(gptj).rotary_fraction, from_hf_config(gptj).rotary_dim) == (0.25, 64)
    neox = {"model_type": "gpt_neox", "num_hidden_layers": 2, "hidden_size": 6144, "num_attention_heads": 64,
            "intermediate_size": 24576, "vocab_size": 97, "rotary_pct": 0.25}
    assert from_hf_config(neox).rotary_dim == 24  # int(96 * 0.25), as GPTNeoXAttention sizes it
    neox5 = {**{k: v for k, v in neox.items() if k != "rotary_pct"},
             "rope_parameters": {"rope_type": "default", "partial_rotary_factor": 0.5}}
    assert from_hf_config(neox5).rotary_fraction == 0.5
    phi = {"model_type": "phi", "num_hidden_layers": 2, "hidden_size": 2048, "num_attention_heads": 32,
           "intermediate_size": 8192, "vocab_size": 97}
    assert from_hf_config(phi).rotary_dim == 32
    llama = {"model_type": "llama", "num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4,
             "intermediate_size": 128, "vocab_size": 97}
    assert from_hf_config(llama).rotary_fraction == 1.0
    with pytest.raises(ValueError, match="rotary_pct=1.5 must be in"):
        from_hf_config({**neox, "rotary_pct": 1.5})


@pytest.mark.parametrize("kwargs", [dict(pos_att_type=["c2p"], share_att_key=True, norm_rel_ebd="layer_norm"),
                                    dict(pos_att_type=["p2c", "c2p"], share_att_key=False, norm_rel_ebd="layer_norm"),
                                    dict(pos_att_type="p2c|c2p", share_att_key=True, norm_rel_ebd="none")])
def test_deberta_layouts_other_than_v3_are_named_errors(kwargs: dict):
    config = transformers.DebertaV2Config(**TINY, relative_attention=True, position_biased_input=False, **kwargs)
    d = config.to_dict()
    d["model_type"] = config.model_type
    with pytest.raises(ValueError, match="deberta-v2 config: .* is not modelled; allowed"):
        from_hf_config(d)
