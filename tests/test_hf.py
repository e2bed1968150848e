"""moeyard.hf: the "moeyard" experts implementation and replace_moe against transformers' own
(eager) MoE code, on tiny randomly initialised models of each supported family (no downloads).

CPU tests compare in fp32; the GPU tests (``-m gpu``) compare in bf16 and capture CUDA graphs.

The tiny models are in training mode (as built). PhiMoE's sparsemixer samples its experts in
training: transformers' and moeyard's forwards are compared after the same ``torch.manual_seed``,
which gives both the same random draws (moeyard.hf draws them in transformers' order and dtype,
HFRouter._transformers_noise; tests/test_sparsemixer.py checks the op on draws recorded from
transformers' own sparsemixer)."""
import copy
import importlib
import os
import warnings

import pytest
import torch
from torch import nn

import transformers

import moeyard
import moeyard.hf as mh
from conftest import close

transformers.logging.set_verbosity_error()

# family -> (config class, model class, config kwargs beyond TINY): 2 layers of width 64, every
# layer a MoE layer of 8 experts, top-2 (the kwargs each family needs for that).
TINY = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=128)
_MLA = dict(kv_lora_rank=16, q_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=8,
            v_head_dim=16, num_key_value_heads=4, head_dim=8)
# (the pre-5.18 names of the indexer attentions; newer transformers map them to the new ones)
_DSA = dict(layer_types=["deepseek_sparse_attention"] * 2, mlp_layer_types=["sparse"] * 2,
            index_n_heads=2, index_head_dim=16, index_topk=4)
_E8 = dict(num_experts_per_tok=2)
FAMILIES = {
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(
        num_key_value_heads=2, head_dim=16, intermediate_size=128, num_local_experts=8, **_E8)),
    "minimax": ("MiniMaxConfig", "MiniMaxForCausalLM", dict(
        num_key_value_heads=2, head_dim=16, intermediate_size=128, num_local_experts=8,
        layer_types=["full_attention", "linear_attention"], **_E8)),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", dict(
        num_key_value_heads=2, intermediate_size=128, moe_intermediate_size=32,
        shared_expert_intermediate_size=32, num_experts=8, mlp_only_layers=[],
        norm_topk_prob=False, **_E8)),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(
        num_key_value_heads=2, intermediate_size=128, moe_intermediate_size=32, num_experts=8,
        mlp_only_layers=[], norm_topk_prob=True, **_E8)),
    "qwen3_next": ("Qwen3NextConfig", "Qwen3NextForCausalLM", dict(
        num_key_value_heads=2, head_dim=16, intermediate_size=128, moe_intermediate_size=32,
        shared_expert_intermediate_size=32, num_experts=8, mlp_only_layers=[],
        layer_types=["linear_attention", "full_attention"], **_E8)),
    "qwen3_5_moe": ("Qwen3_5MoeTextConfig", "Qwen3_5MoeForCausalLM", dict(
        num_key_value_heads=2, head_dim=16, moe_intermediate_size=32,
        shared_expert_intermediate_size=32, num_experts=8,
        layer_types=["linear_attention", "full_attention"], **_E8)),
    "qwen3_vl_moe": ("Qwen3VLMoeTextConfig", "Qwen3VLMoeTextModel", dict(
        num_key_value_heads=2, head_dim=16, intermediate_size=128, moe_intermediate_size=32,
        num_experts=8, mlp_only_layers=[], **_E8)),
    "qwen3_omni_moe": ("Qwen3OmniMoeTextConfig", "Qwen3OmniMoeThinkerTextModel", dict(
        num_key_value_heads=2, intermediate_size=128, moe_intermediate_size=32, num_experts=8,
        mlp_only_layers=[], **_E8)),
    "qwen4_exp": ("Qwen4ExpTextConfig", "Qwen4ExpForCausalLM", dict(
        num_key_value_heads=2, head_dim=16, moe_intermediate_size=32,
        shared_expert_intermediate_size=32, num_experts=8,
        layer_types=["linear_attention", "qwen_sparse_attention"], indexer_n_heads=2,
        indexer_kv_heads=1, indexer_head_dim=16, indexer_budget=8, indexer_compress_ratio=4,
        linear_key_head_dim=16, linear_value_head_dim=16, linear_num_key_heads=2,
        linear_num_value_heads=4, **_E8)),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", dict(
        num_key_value_heads=2, intermediate_size=32, num_experts=8, **_E8)),
    "flex_olmo": ("FlexOlmoConfig", "FlexOlmoForCausalLM", dict(
        num_key_value_heads=2, intermediate_size=32, num_experts=8, pad_token_id=0, **_E8)),
    "mellum": ("MellumConfig", "MellumForCausalLM", dict(
        num_key_value_heads=2, head_dim=16, intermediate_size=128, moe_intermediate_size=32,
        num_local_experts=8, layer_types=["full_attention"] * 2, mlp_layer_types=["sparse"] * 2,
        **_E8)),
    "jamba": ("JambaConfig", "JambaForCausalLM", dict(
        num_key_value_heads=2, intermediate_size=32, num_experts=8, attn_layer_period=2,
        attn_layer_offset=0, expert_layer_period=1, expert_layer_offset=0, **_E8)),
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM", dict(
        intermediate_size=128, moe_intermediate_size=32, n_routed_experts=8,
        first_k_dense_replace=0, n_group=2, topk_group=1, **_MLA, **_E8)),
    "deepseek_v32": ("DeepseekV32Config", "DeepseekV32ForCausalLM", dict(
        intermediate_size=128, moe_intermediate_size=32, n_routed_experts=8,
        first_k_dense_replace=0, n_group=2, topk_group=1, **_MLA, **_DSA, **_E8)),
    "dots1": ("Dots1Config", "Dots1ForCausalLM", dict(
        num_key_value_heads=2, intermediate_size=128, moe_intermediate_size=32,
        n_routed_experts=8, first_k_dense_replace=0, layer_types=["full_attention"] * 2,
        n_shared_experts=1, n_group=2, topk_group=1, **_E8)),
    "glm4_moe": ("Glm4MoeConfig", "Glm4MoeForCausalLM", dict(
        num_key_value_heads=2, intermediate_size=128, moe_intermediate_size=32,
        n_routed_experts=8, first_k_dense_replace=0, **_E8)),
    "glm4_moe_lite": ("Glm4MoeLiteConfig", "Glm4MoeLiteForCausalLM", dict(
        intermediate_size=128, moe_intermediate_size=32, n_routed_experts=8,
        mlp_layer_types=["sparse"] * 2, **_MLA, **_E8)),
    "glm4v_moe": ("Glm4vMoeTextConfig", "Glm4vMoeTextModel", dict(
        num_key_value_heads=2, intermediate_size=128, moe_intermediate_size=32,
        n_routed_experts=8, first_k_dense_replace=0,
        rope_parameters={"rope_theta": 1e4, "partial_rotary_factor": 0.5,
                         "rope_type": "default", "mrope_section": [2, 1, 1]}, **_E8)),
    "glm_moe_dsa": ("GlmMoeDsaConfig", "GlmMoeDsaForCausalLM", dict(
        intermediate_size=128, moe_intermediate_size=32, n_routed_experts=8,
        first_k_dense_replace=0, **_MLA, **_DSA, **_E8)),
    "solar_open": ("SolarOpenConfig", "SolarOpenForCausalLM", dict(
        num_key_value_heads=2, head_dim=16, moe_intermediate_size=32, n_routed_experts=8,
        **_E8)),
    "exaone_moe": ("ExaoneMoeConfig", "ExaoneMoeForCausalLM", dict(
        num_key_value_heads=2, intermediate_size=128, moe_intermediate_size=32, num_experts=8,
        first_k_dense_replace=0, layer_types=["sliding_attention", "full_attention"],
        mlp_layer_types=["sparse"] * 2, **_E8)),
    "kimi_linear": ("KimiLinearConfig", "KimiLinearForCausalLM", dict(
        intermediate_size=128, moe_intermediate_size=32, model_max_length=128, num_experts=8,
        num_experts_per_token=2, layer_types=["linear_attention", "full_attention"],
        mlp_layer_types=["sparse"] * 2, pad_token_id=0, **_MLA)),
    "bailing_hybrid": ("BailingHybridConfig", "BailingHybridForCausalLM", dict(
        intermediate_size=128, moe_intermediate_size=32, model_max_length=128, num_experts=8,
        num_experts_per_token=2, first_k_dense_replace=0, num_expert_group=2, topk_group=1,
        layer_types=["linear_attention", "full_attention"], mlp_layer_types=["sparse"] * 2,
        pad_token_id=0, **_MLA)),
    "mimo_v2_flash": ("MiMoV2FlashConfig", "MiMoV2FlashForCausalLM", dict(
        num_key_value_heads=2, head_dim=16, intermediate_size=128, moe_intermediate_size=32,
        n_routed_experts=8, layer_types=["full_attention", "sliding_attention"],
        mlp_layer_types=["sparse"] * 2, **_E8)),
    "gpt_oss": ("GptOssConfig", "GptOssForCausalLM", dict(
        num_key_value_heads=2, head_dim=16, intermediate_size=32, num_local_experts=8,
        layer_types=["sliding_attention", "full_attention"], **_E8)),
    # a wide sparsemixer window (router_jitter_noise 0.2: experts within 40% of the max), so that
    # the tiny model's small logits give most tokens several candidates to sample from
    "phimoe": ("PhimoeConfig", "PhimoeForCausalLM", dict(
        num_key_value_heads=2, intermediate_size=32, num_local_experts=8, router_jitter_noise=0.2,
        **_E8)),
}
# Families whose MoE blocks replace_moe must refuse (routing or experts it cannot reproduce).
UNSUPPORTED = {
    "nemotron_h": ("NemotronHConfig", "NemotronHForCausalLM", dict(
        num_key_value_heads=2, head_dim=16, intermediate_size=128, moe_intermediate_size=32,
        moe_shared_expert_intermediate_size=32, n_routed_experts=8,
        layers_block_type=["full_attention", "moe"], **_E8)),
}
PRIORITY = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "gpt_oss"]


def tiny_model(family, table=FAMILIES, dtype=torch.float32, device="cpu", **overrides):
    """A tiny random model of ``family`` (skips if the installed transformers lacks it), with a
    random ``e_score_correction_bias`` where it has one (so that the bias matters); ``overrides``
    replace config values."""
    config_name, model_name, kwargs = table[family]
    kwargs = {**kwargs, **overrides}
    try:
        cmod = importlib.import_module(f"transformers.models.{family}.configuration_{family}")
        mmod = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
    except ImportError:
        pytest.skip(f"transformers {transformers.__version__} has no {family}")
    config = getattr(cmod, config_name)(**TINY, **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = getattr(mmod, model_name)(config)
    for name, buf in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            buf.normal_(0, 0.1)
    model.set_experts_implementation("eager")
    return model.to(device=device, dtype=dtype)


def lm_loss(model, ids, **kwargs):
    """The model's output and a loss that reaches every parameter: the LM loss (+ its aux loss)
    for a CausalLM, a fixed random projection of the last hidden state for a base model."""
    out = model(input_ids=ids, output_router_logits=True, **kwargs)
    if getattr(out, "logits", None) is not None:
        labels = ids.clone()
        loss = model(input_ids=ids, labels=labels, output_router_logits=True, **kwargs).loss
        return out.logits, out, loss
    h = out.last_hidden_state
    probe = torch.randn(h.shape, generator=torch.Generator().manual_seed(0)).to(h.device)
    return h, out, (h.float() * probe).sum()


def compare_models(got_model, want_model, ids, tol, grad_tol):
    """Same outputs, router logits, aux loss and gradients of every parameter (each model run
    after the same seed: the same random draws, for PhiMoE's training-time sampling)."""
    torch.manual_seed(0)
    got, got_out, got_loss = lm_loss(got_model, ids)
    torch.manual_seed(0)
    want, want_out, want_loss = lm_loss(want_model, ids)
    close(got.float(), want.float(), tol, scaled=True)
    close(got_loss.float(), want_loss.float(), tol, scaled=True)
    got_rl, want_rl = getattr(got_out, "router_logits", None), getattr(want_out, "router_logits", None)
    assert (got_rl is None) == (want_rl is None)
    if want_rl is not None:
        assert len(got_rl) == len(want_rl) > 0
        for a, b in zip(got_rl, want_rl):
            assert a.dtype == b.dtype
            close(a.float(), b.float(), tol, scaled=True)
    if getattr(want_out, "aux_loss", None) is not None:
        close(got_out.aux_loss.float(), want_out.aux_loss.float(), tol, scaled=True)
    got_loss.backward()
    want_loss.backward()
    want_params = dict(want_model.named_parameters())
    got_params = dict(got_model.named_parameters())
    assert got_params.keys() == want_params.keys()
    for name, p in want_params.items():
        g = got_params[name].grad
        if p.grad is None:
            assert g is None or not g.any(), name
        else:
            assert g is not None, name
            close(g.float(), p.grad.float(), grad_tol, scaled=True), name


# ------------------------------------------------------------------------------ version


def test_supported_versions():
    """Older than the oldest tested release: refused; newer than the newest tested minor
    release: a warning; in between (patch releases of the newest included): silent."""
    low, high = mh.SUPPORTED_TRANSFORMERS
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for ok in (low + ".0", high + ".0", high + ".3", "5.20.1"):
            mh._check_version(ok)
    for old in ("5.16.1", "4.57.6", "5.17.0.dev0"):
        with pytest.raises(ImportError, match=f"needs transformers>={low}"):
            mh._check_version(old)
    major, minor = high.split(".")
    for new in (f"{major}.{int(minor) + 1}.0", f"{major}.{int(minor) + 1}.0.dev0", "6.0.0"):
        with pytest.warns(UserWarning, match=f"tested with transformers {low} to {high}.x"):
            mh._check_version(new)


def test_install_pins_name_the_supported_versions():
    """The Makefile (what CI installs) and the extras require the oldest tested release and no
    upper bound; the Makefile's oldest-release run installs exactly that release."""
    low, _ = mh.SUPPORTED_TRANSFORMERS
    root = os.path.join(os.path.dirname(__file__), "..")
    for name in ("Makefile", "pyproject.toml"):
        with open(os.path.join(root, name)) as f:
            text = f.read()
        assert f'"transformers>={low}"' in text, f"{name} does not require transformers>={low}"
        assert "transformers>=5.17,<" not in text
    with open(os.path.join(root, "Makefile")) as f:
        assert f'"transformers=={low}.*"' in f.read()


def test_import_moeyard_alone_leaves_transformers_alone():
    import subprocess
    import sys
    code = ("import sys, moeyard; assert 'transformers' not in sys.modules, 'imported'; "
            "import moeyard.hf; from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS;"
            " assert 'moeyard' in ALL_EXPERTS_FUNCTIONS")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


# ------------------------------------------------------------------ experts implementation


@pytest.mark.parametrize("family", PRIORITY)
@pytest.mark.parametrize("hidden_act", ["silu", "gelu"])  # gelu: transformers' test configs
def test_experts_implementation_matches_eager(family, hidden_act):
    want = tiny_model(family, hidden_act=hidden_act)
    got = copy.deepcopy(want)
    got.set_experts_implementation("moeyard")
    assert got.config._experts_implementation == "moeyard"
    ids = torch.randint(0, TINY["vocab_size"], (2, 12))
    compare_models(got, want, ids, 1e-5, 1e-5)


def test_from_config_with_moeyard_experts():
    config_name, _, kwargs = FAMILIES["qwen3_moe"]
    config = getattr(transformers, config_name)(**TINY, **kwargs)
    model = transformers.AutoModelForCausalLM.from_config(config, experts_implementation="moeyard")
    assert model.config._experts_implementation == "moeyard"
    ids = torch.randint(0, TINY["vocab_size"], (1, 8))
    want = copy.deepcopy(model)
    want.set_experts_implementation("eager")
    close(model(ids).logits, want(ids).logits, 1e-5, scaled=True)


def _experts_class(act, has_gate):
    """A minimal transformers experts module with activation ``act`` (an ACT2FN name)."""
    from transformers.activations import ACT2FN
    from transformers.integrations.moe import use_experts_implementation

    @use_experts_implementation(has_gate=has_gate)
    class Experts(nn.Module):
        def __init__(self, config):
            super().__init__()
            n1 = 2 * config.I if has_gate else config.I
            proj = torch.randn(config.E, n1, config.d) * 0.3
            self.gate_up_proj = nn.Parameter(proj) if has_gate else None
            self.up_proj = None if has_gate else nn.Parameter(proj)
            self.down_proj = nn.Parameter(torch.randn(config.E, config.d, config.I) * 0.3)
            self.act_fn = ACT2FN[act]

        def forward(self, x, idx, w):  # the reference: one expert at a time
            out = torch.zeros_like(x)
            for e in range(self.down_proj.shape[0]):
                tok, slot = torch.where(idx == e)
                w1 = self.gate_up_proj if has_gate else self.up_proj
                h = x[tok] @ w1[e].T
                if has_gate:
                    g, u = h.chunk(2, dim=-1)
                    h = self.act_fn(g) * u
                else:
                    h = self.act_fn(h)
                out.index_add_(0, tok, (h @ self.down_proj[e].T) * w[tok, slot, None])
            return out

    return Experts


@pytest.mark.parametrize("act,has_gate,expected", [
    ("silu", True, "swiglu"), ("swish", True, "swiglu"), ("silu", False, "silu"),
    ("gelu", True, "geglu"), ("gelu_python", True, "geglu"), ("gelu", False, "gelu"),
    ("gelu_pytorch_tanh", True, "geglu_tanh"), ("gelu_new", True, "geglu_tanh"),
    ("gelu_fast", False, "gelu_tanh"), ("gelu_accurate", True, "geglu_tanh"),
    ("gelu_new", False, "gelu_tanh"), ("relu", True, "reglu"), ("relu", False, "relu"),
    ("relu2", True, "relu2_glu"), ("relu2", False, "relu2"), ("quick_gelu", True, "quick_geglu"),
    ("quick_gelu", False, "quick_gelu"), ("linear", False, "none")])
def test_experts_activations(act, has_gate, expected):
    config = transformers.PretrainedConfig()
    config.E, config.I, config.d = 4, 8, 16
    config._experts_implementation = "eager"
    experts = _experts_class(act, has_gate)(config)
    assert mh.experts_activation(experts) == expected
    x = torch.randn(10, 16)
    idx = torch.stack([torch.randperm(4)[:2] for _ in range(10)])
    w = torch.rand(10, 2)
    want = experts(x, idx, w)
    config._experts_implementation = "moeyard"
    close(experts(x, idx, w), want, 1e-5, scaled=True)


@pytest.mark.parametrize("act,has_gate,match", [
    ("gelu_10", True, "gated activation ClippedGELUActivation"), ("mish", False, "MishActivation"),
    ("linear", True, "gated activation LinearActivation"), ("relu6", False, "ReLU6")])
def test_experts_refuse_what_they_cannot_run(act, has_gate, match):
    config = transformers.PretrainedConfig()
    config.E, config.I, config.d = 4, 8, 16
    config._experts_implementation = "moeyard"
    experts = _experts_class(act, has_gate)(config)
    with pytest.raises(NotImplementedError, match=match):
        experts(torch.randn(3, 16), torch.zeros(3, 1, dtype=torch.long), torch.ones(3, 1))


def test_expert_parallel_sentinel_ids_add_nothing():
    model = tiny_model("qwen3_moe")
    experts = model.model.layers[0].mlp.experts
    x = torch.randn(6, TINY["hidden_size"])
    idx = torch.tensor([[0, 8], [8, 8], [1, 2], [3, 8], [5, 6], [7, 0]])  # 8 = E: not here
    w = torch.rand(6, 2)
    want = experts(x, idx.clamp(max=7), w.masked_fill(idx == 8, 0))
    experts.config._experts_implementation = "moeyard"
    close(experts(x, idx, w), want, 1e-5, scaled=True)


# ------------------------------------------------------------------------------ replace_moe


@pytest.mark.parametrize("family", list(FAMILIES))
def test_replace_moe_matches_eager(family):
    want = tiny_model(family)
    got = copy.deepcopy(want)
    names = mh.replace_moe(got)
    assert len(names) == 2
    blocks = [got.get_submodule(n) for n in names]
    assert all(isinstance(b, mh.SparseMoeBlock) for b in blocks)
    # still instances of their transformers classes (what _init_weights and recorders look for)
    assert all(isinstance(b, type(want.get_submodule(n))) for b, n in zip(blocks, names))
    assert blocks[0].source in mh.SUPPORTED_BLOCKS
    # the same parameter objects, under the same names
    assert dict(got.named_parameters()).keys() == dict(want.named_parameters()).keys()
    ids = torch.randint(0, TINY["vocab_size"], (2, 12))
    compare_models(got, want, ids, 1e-5, 1e-5)


def _first_router(model):
    """(qualified name of the first MoE block, its router)."""
    qual, block = next(mh._owned_blocks(model))
    return qual, getattr(block, mh._router_name(block))


def _by_expert(weights, experts):
    """Each token's (weights, experts) ordered by expert id (slot order is not semantics)."""
    order = experts.long().argsort(-1)
    return weights.float().gather(-1, order), experts.long().gather(-1, order)


# (family, edge): every routing kind on random inputs and on exact ties; the group-limited kind
# with negative selection biases and with k beyond the kept groups' experts.
ROUTING_EDGES = [(f, e) for f in ("mixtral", "qwen2_moe", "qwen3_moe", "jamba", "gpt_oss",
                                  "deepseek_v3", "dots1") for e in ("random", "ties")] + [
    (f, e) for f in ("deepseek_v3", "dots1") for e in ("negative_bias", "k_beyond_kept_groups")] + [
    ("phimoe", "random")]


@pytest.mark.parametrize("family,edge", ROUTING_EDGES)
def test_replace_moe_routes_as_transformers(family, edge):
    """replace_moe's router against the transformers router it replaces, on the same inputs:
    same logits, same experts and weights per token; on exact ties moeyard takes the lower index
    where transformers' topk takes a tied expert of its choice."""
    # k = 3 with tied pairs: the third expert comes from a tied pair, one of two
    k = {"k_beyond_kept_groups": 6, "ties": 3}.get(edge, 2)
    overrides = dict(num_experts_per_tok=k)
    model = tiny_model(family, **overrides)
    qual, router = _first_router(model)
    if not hasattr(router, "top_k"):
        pytest.skip(f"transformers {transformers.__version__}'s {family} router is an nn.Linear")
    with torch.no_grad():
        bias = getattr(router, "e_score_correction_bias", None)
        if edge == "negative_bias":  # half the experts' sigmoid score + bias below 0
            bias.copy_(torch.tensor([-0.9, 0.05, -1.2, 0.1, -0.95, 0.0, -2.0, 0.02]))
        if edge == "ties":  # experts 2j and 2j+1 identical: every score ties in pairs
            for t in (router.weight, getattr(router, "bias", None), bias):
                if t is not None:
                    t[1::2] = t[0::2]
    want_router = copy.deepcopy(router)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mh.replace_moe(model)
    warned = [str(w.message) for w in caught if "transformers' own ops" in str(w.message)]
    assert len(warned) == (2 if edge == "k_beyond_kept_groups" else 0), warned
    got_router = model.get_submodule(qual).hf_router()
    assert got_router is router and isinstance(router, type(want_router))
    x = torch.randn(64, TINY["hidden_size"])
    torch.manual_seed(1)  # the same draws for a router that samples in training (PhiMoE)
    got_logits, got_w, got_e = got_router(x)
    torch.manual_seed(1)
    want_logits, want_w, want_e = want_router(x)
    assert got_logits.dtype == want_logits.dtype and got_w.dtype == torch.float32
    close(got_logits, want_logits, 1e-6, scaled=True)
    if edge == "k_beyond_kept_groups":  # transformers' ops, op for op: equal, slot order too
        assert torch.equal(got_e.long(), want_e) and torch.equal(got_w, want_w.float())
        return
    got_w, got_e = _by_expert(got_w, got_e)
    want_w, want_e = _by_expert(want_w, want_e)
    close(got_w, want_w, 1e-6, scaled=True)
    if edge != "ties":
        assert torch.equal(got_e, want_e)
        return
    assert torch.equal(got_e // 2, want_e // 2)  # the same tied pairs
    lone = torch.stack([(got_e // 2 == c).sum(-1) == 1 for c in range(4)], -1)  # one of a pair
    for t, c in lone.nonzero().tolist():
        assert got_e[t][got_e[t] // 2 == c].item() == 2 * c  # moeyard: the lower index


@pytest.mark.parametrize("family,hidden_act", [
    ("mixtral", "gelu"), ("qwen2_moe", "gelu_pytorch_tanh"), ("deepseek_v3", "relu2"),
    ("olmoe", "quick_gelu")])
def test_replace_moe_matches_eager_with_other_activations(family, hidden_act):
    want = tiny_model(family, hidden_act=hidden_act)
    got = copy.deepcopy(want)
    mh.replace_moe(got)
    compare_models(got, want, torch.randint(0, TINY["vocab_size"], (2, 12)), 1e-5, 1e-5)


def test_replace_moe_after_a_recorded_forward():
    """Router logits are recorded even if transformers installed its hooks before the swap."""
    model = tiny_model("mixtral")
    ids = torch.randint(0, TINY["vocab_size"], (1, 8))
    want = model(ids, output_router_logits=True)
    mh.replace_moe(model)
    got = model(ids, output_router_logits=True)
    assert len(got.router_logits) == len(want.router_logits) == 2
    for a, b in zip(got.router_logits, want.router_logits):
        close(a, b, 1e-5, scaled=True)


@pytest.mark.parametrize("family", ["qwen3_moe", "minimax"])
def test_bf16_routing_differs_from_transformers_only_on_exact_ties(family):
    """In bf16 the router logits take few distinct values, so exact ties at the k-th score
    happen (README: "Hugging Face transformers"); every token that replace_moe routes to other
    experts than transformers has one, and moeyard took the lower index there."""
    model = tiny_model(family, dtype=torch.bfloat16)
    _, router = _first_router(model)
    want_router = copy.deepcopy(router)
    mh.replace_moe(model)
    x = torch.randn(4096, TINY["hidden_size"], dtype=torch.bfloat16)
    logits, got_w, got_e = router(x)
    _, want_w, want_e = want_router(x)
    got_e, want_e = got_e.long().sort(-1).values, want_e.sort(-1).values
    differ = (got_e != want_e).any(-1)
    probs = torch.softmax(logits.float(), -1).sort(-1, descending=True).values
    tie = probs[:, router.k - 1] == probs[:, router.k]
    assert tie.any() and not (differ & ~tie).any()
    for t in differ.nonzero().flatten().tolist():  # the tied experts: moeyard took the lowest
        tied = (torch.softmax(logits[t].float(), -1) == probs[t, router.k - 1]).nonzero()
        chosen = [e for e in got_e[t].tolist() if e in tied.flatten().tolist()]
        assert chosen == tied.flatten().tolist()[:len(chosen)]


@pytest.mark.parametrize("family", PRIORITY)
def test_replaced_blocks_honour_the_experts_implementation(family):
    """After replace_moe the experts run on the model's experts implementation: "moeyard" by
    default, any registered one when asked (set_experts_implementation), on moeyard's routing."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
    calls = []

    def counting(self, hidden_states, top_k_index, top_k_weights):
        calls.append(top_k_index.shape)
        return ALL_EXPERTS_FUNCTIONS["grouped_mm"](self, hidden_states, top_k_index,
                                                   top_k_weights)

    ALL_EXPERTS_FUNCTIONS.register("counting", counting)
    try:
        want = tiny_model(family)
        got = copy.deepcopy(want)
        mh.replace_moe(got)
        assert got.config._experts_implementation == "moeyard"
        ids = torch.randint(0, TINY["vocab_size"], (2, 12))
        with torch.no_grad():
            want_logits = want(ids).logits
            close(got(ids).logits, want_logits, 1e-5, scaled=True)
            assert calls == []
            got.set_experts_implementation("counting")
            close(got(ids).logits, want_logits, 1e-5, scaled=True)
            assert calls == [(24, 2)] * 2  # both layers' experts, on moeyard's routing
            got.set_experts_implementation("eager")
            close(got(ids).logits, want_logits, 1e-5, scaled=True)
        kept = copy.deepcopy(want)
        mh.replace_moe(kept, experts_implementation=None)
        assert kept.config._experts_implementation == "eager"
        with pytest.raises(ValueError, match="'nope' is not registered"):
            mh.replace_moe(copy.deepcopy(want), experts_implementation="nope")
    finally:
        ALL_EXPERTS_FUNCTIONS._global_mapping.pop("counting", None)


def test_capacity_needs_moeyard_experts():
    model = tiny_model("qwen3_moe")
    mh.replace_moe(model, capacity_factor=0.5, experts_implementation="eager")
    ids = torch.randint(0, TINY["vocab_size"], (2, 16))
    model.eval()
    model(ids)  # dropless in eval: any implementation
    model.train()
    with pytest.raises(RuntimeError, match="needs the experts implementation 'moeyard'"):
        model(ids)


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3", "gpt_oss", "qwen3_next"])
def test_transformers_initialises_replaced_routers(family):
    """transformers' own _init_weights still reaches a replaced router (router and block stay
    instances of their classes; Qwen3-Next initialises the router through its block): a model
    replaced before its weights are initialised gets them as the original."""
    model = tiny_model(family)
    _, router = _first_router(model)
    mh.replace_moe(model)
    tensors = [router.weight, getattr(router, "bias", None),
               getattr(router, "e_score_correction_bias", None)]
    tensors = [t for t in tensors if t is not None]
    with torch.no_grad():
        for t in tensors:
            t.fill_(7.0)
    for m in model.modules():  # as a model that was never initialised
        m.__dict__.pop("_is_hf_initialized", None)
    for t in list(model.parameters()) + list(model.buffers()):
        t.__dict__.pop("_is_hf_initialized", None)
    model.initialize_weights()
    std = model.config.initializer_range
    assert abs(router.weight.std().item() - std) < 0.3 * std
    for t in tensors[1:]:  # GPT-OSS's router bias: normal; DeepSeek's selection bias: zeros
        assert (t != 7.0).all()


def test_replaced_router_pickles_and_copies():
    model = tiny_model("qwen3_moe")
    mh.replace_moe(model)
    ids = torch.randint(0, TINY["vocab_size"], (1, 8))
    for other in (copy.deepcopy(model), torch.load(_saved(model), weights_only=False)):
        router = other.model.layers[0].mlp.gate
        assert type(router).__name__ == "MoeyardQwen3MoeTopKRouter"
        close(other(ids).logits, model(ids).logits, 1e-6, scaled=True)


def _saved(model):
    import io
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    return buf


def test_replace_moe_reuses_parameters_and_state_dict():
    model = tiny_model("deepseek_v3")
    before = {n: p for n, p in model.named_parameters()}
    keys = set(model.state_dict())
    mh.replace_moe(model)
    after = dict(model.named_parameters())
    assert all(after[n] is p for n, p in before.items())
    assert set(model.state_dict()) == keys
    fresh = tiny_model("deepseek_v3")  # another init: loading must make it equal
    fresh.load_state_dict(model.state_dict())
    ids = torch.randint(0, TINY["vocab_size"], (2, 8))
    close(model(ids).logits, fresh(ids).logits, 1e-5, scaled=True)


def test_replace_moe_refuses_unsupported_blocks_and_changes_nothing():
    model = tiny_model("nemotron_h", UNSUPPORTED)
    classes = [type(m) for m in model.modules()]
    with pytest.raises(NotImplementedError, match="NemotronHMoE"):
        mh.replace_moe(model)
    assert [type(m) for m in model.modules()] == classes


def test_replace_moe_refuses_experts_it_cannot_run():
    model = tiny_model("nemotron_h", UNSUPPORTED)
    with pytest.raises(NotImplementedError, match="NemotronHMoE"):
        mh.replace_moe(model)


def test_replace_moe_without_moe_blocks():
    config = transformers.LlamaConfig(**TINY, intermediate_size=32, num_key_value_heads=2)
    with pytest.raises(ValueError, match="no sparse MoE block"):
        mh.replace_moe(transformers.LlamaForCausalLM(config))


def test_replace_moe_capacity_drops_in_training_only():
    model = tiny_model("qwen3_moe")
    mh.replace_moe(model, capacity_factor=0.5, min_capacity=1)
    ids = torch.randint(0, TINY["vocab_size"], (2, 16))
    block = model.model.layers[0].mlp
    model.train()
    model(ids)
    assert block.capacity(32) == 4  # ceil(32 * 2 / 8 * 0.5)
    assert block.last_stats["dropped_fraction"] > 0
    model.eval()
    model(ids)
    assert block.capacity(32) is None
    assert block.last_stats["dropped_fraction"] == 0


def test_replace_moe_bias_balancing():
    model = tiny_model("mixtral")
    mh.replace_moe(model, bias_balancing=True)
    keys = set(model.state_dict())
    assert "model.layers.0.mlp.gate.e_score_correction_bias" in keys
    balancer = moeyard.BiasBalancer(model, rate=0.1)
    assert len(balancer.routers) == 2
    model.train()
    ids = torch.randint(0, TINY["vocab_size"], (2, 16))
    model(ids, labels=ids).loss.backward()
    router = model.model.layers[0].mlp.gate
    load = router.load_since_update.clone()
    assert load.sum() == 2 * 16 * 2
    balancer.step()
    bias = router.e_score_correction_bias
    assert bias.dtype == torch.float32
    assert torch.equal(bias, 0.1 * torch.sign(load.float().mean() - load.float()))
    assert not router.load_since_update.any()


def test_bias_balancing_keeps_deepseek_bias_and_balancer_skips_unbalanced_routers():
    model = tiny_model("deepseek_v3")
    bias = model.model.layers[0].mlp.gate.e_score_correction_bias.clone()
    mh.replace_moe(model)  # keeps the bias for selection, but does not balance by it
    assert torch.equal(model.model.layers[0].mlp.gate.e_score_correction_bias, bias)
    with pytest.raises(ValueError, match="no router with bias_balancing"):
        moeyard.BiasBalancer(model)


# ------------------------------------------------------------------------------- training


def _train(model, ids, steps=3):
    # SGD: its update is proportional to the gradient, so parameters stay comparable (Adam's
    # normalisation turns rounding-level differences of near-zero gradients into lr-sized ones)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = []
    model.train()
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids, output_router_logits=True).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("how", ["experts", "replace"])
def test_training_loop_matches_eager(how):
    want = tiny_model("qwen2_moe")
    got = copy.deepcopy(want)
    if how == "experts":
        got.set_experts_implementation("moeyard")
    else:
        mh.replace_moe(got)
    ids = torch.randint(0, TINY["vocab_size"], (2, 16))
    got_losses, want_losses = _train(got, ids), _train(want, ids)
    assert want_losses[-1] < want_losses[0]
    torch.testing.assert_close(got_losses, want_losses, rtol=1e-4, atol=1e-5)
    for (name, p), q in zip(got.named_parameters(), want.parameters()):
        close(p, q, 1e-4, scaled=True)


def test_hf_trainer_steps(tmp_path):
    from transformers import Trainer, TrainingArguments

    ids = torch.randint(0, TINY["vocab_size"], (8, 16))
    data = [{"input_ids": r, "labels": r} for r in ids]

    def run(model):
        args = TrainingArguments(output_dir=str(tmp_path), max_steps=3,
                                 per_device_train_batch_size=2, learning_rate=1e-2,
                                 logging_steps=1, save_strategy="no", report_to=[],
                                 use_cpu=True, seed=0, disable_tqdm=True)
        trainer = Trainer(model=model, args=args, train_dataset=data)
        trainer.train()
        return [h["loss"] for h in trainer.state.log_history if "loss" in h]

    want = tiny_model("olmoe")
    got = copy.deepcopy(want)
    mh.replace_moe(got)
    got_losses, want_losses = run(got), run(want)
    assert len(got_losses) == 3
    torch.testing.assert_close(got_losses, want_losses, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("how", ["experts", "replace"])
def test_compile_fullgraph(how):
    model = tiny_model("qwen3_moe")
    if how == "experts":
        model.set_experts_implementation("moeyard")
    else:
        mh.replace_moe(model)
    ids = torch.randint(0, TINY["vocab_size"], (2, 8))
    want = model(ids).logits
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    got = compiled(ids).logits
    close(got, want, 1e-5, scaled=True)
    got.float().pow(2).mean().backward()
    assert model.model.layers[0].mlp.experts.gate_up_proj.grad.any()


# ---------------------------------------------------------------------------------- PhiMoE


def _phimoe_pair(mode="train", **overrides):
    """(replaced, original) tiny PhiMoE models with the same weights, in ``mode``."""
    want = tiny_model("phimoe", **overrides).train(mode == "train")
    got = copy.deepcopy(want)
    mh.replace_moe(got)
    return got, want


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_phimoe_matches_transformers(mode):
    """replace_moe on PhiMoE against transformers: in eval (each slot's top expert) and in training
    (sampled experts, the midpoint factor, GRIN's gradient estimator; the same seed gives both the
    same draws) the same logits, router logits, aux loss and gradients of every parameter."""
    got, want = _phimoe_pair(mode)
    block = got.model.layers[0].mlp
    assert block.source == "PhimoeSparseMoeBlock" and block.input_jitters == ()
    router = block.hf_router()
    assert router.score == "sparsemixer" and router.k == 2 and router.sparsemixer_eps == 0.2
    compare_models(got, want, torch.randint(0, TINY["vocab_size"], (2, 12)), 1e-5, 1e-5)


def test_phimoe_training_samples():
    """Not vacuous: on the tiny model's router, training routes some tokens to other experts than
    eval and scales some weights by 0.3333; the draws come from the router's generator when set
    (the same generator state, the same routing)."""
    got, _ = _phimoe_pair()
    router = got.model.layers[0].mlp.hf_router()
    x = torch.randn(512, TINY["hidden_size"])
    logits, w_eval, e_eval = router.eval()(x)
    router.train()
    torch.manual_seed(0)
    _, w, e = router(x)
    assert (e != e_eval).any()
    torch.manual_seed(0)
    noise = router._transformers_noise(logits)
    noise[..., -1] = 0.9  # no midpoint factor: the plain window probabilities of the same samples
    p = moeyard.sparsemixer(logits, 0.2, True, noise=noise)[0]
    scaled = ~torch.isclose(w, p)
    assert scaled.any()
    close(w[scaled], p[scaled] * 0.3333, 1e-6)
    router.generator = torch.Generator().manual_seed(4)
    first = router(x)[2]
    router.generator.manual_seed(4)
    assert torch.equal(router(x)[2], first)


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_phimoe_experts_implementation(mode):
    """The "moeyard" experts implementation runs PhiMoE's experts under transformers' routing."""
    want = tiny_model("phimoe").train(mode == "train")
    got = copy.deepcopy(want)
    got.set_experts_implementation("moeyard")
    compare_models(got, want, torch.randint(0, TINY["vocab_size"], (2, 12)), 1e-5, 1e-5)


def test_phimoe_input_jitter_applied_twice():
    """PhiMoE's input_jitter_noise: transformers' block and then its router multiply the same
    tensor in place, so router and experts see both draws; the replaced block draws both, in
    that order (compare_models: the same seed)."""
    got, want = _phimoe_pair(input_jitter_noise=0.1)
    assert got.model.layers[0].mlp.input_jitters == (0.1, 0.1)
    compare_models(got, want, torch.randint(0, TINY["vocab_size"], (2, 12)), 1e-5, 1e-5)


def test_phimoe_refusals_change_nothing():
    """bias_balancing (sparsemixer has no selection bias) and a PhiMoE whose window it cannot
    read are refused before any block changes."""
    model = tiny_model("phimoe")
    classes = [type(m) for m in model.modules()]
    with pytest.raises(ValueError, match="no selection bias"):
        mh.replace_moe(model, bias_balancing=True)
    assert [type(m) for m in model.modules()] == classes
    del model.model.layers[1].mlp.router.router_jitter_noise
    with pytest.raises(NotImplementedError, match="router_jitter_noise"):
        mh.replace_moe(model)
    assert [type(m) for m in model.modules()] == classes


# ----------------------------------------------------------------------------------- GPU

gpu = pytest.mark.gpu


@gpu
@pytest.mark.parametrize("family", PRIORITY)
@pytest.mark.parametrize("how", ["experts", "replace"])
def test_cuda_bf16_matches_grouped_mm(family, how):
    """bf16 on the GPU against transformers' default path (grouped_mm)."""
    want = tiny_model(family, dtype=torch.bfloat16, device="cuda")
    want.set_experts_implementation("grouped_mm")
    got = copy.deepcopy(want)
    if how == "experts":
        got.set_experts_implementation("moeyard")
    else:
        mh.replace_moe(got)
    ids = torch.randint(0, TINY["vocab_size"], (4, 64), device="cuda")
    compare_models(got, want, ids, 2e-2, 5e-2)


@gpu
@pytest.mark.parametrize("how", ["experts", "replace"])
def test_cuda_graph_forward_backward(how):
    model = tiny_model("qwen3_moe", dtype=torch.bfloat16, device="cuda")
    if how == "experts":
        model.set_experts_implementation("moeyard")
    else:
        mh.replace_moe(model)
    ids = torch.randint(0, TINY["vocab_size"], (2, 32), device="cuda")
    check_graph_replay(model, ids)


def check_graph_replay(model, ids, seed=None):
    """One training step (loss and every gradient) captured in a CUDA graph and replayed equals
    the eager step; ``seed``: torch.manual_seed before the eager step and before the replay (for
    routing that samples inside the graph)."""
    params = list(model.parameters())

    def step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss

    if seed is not None:
        torch.manual_seed(seed)
    want_loss = step()
    want_grads = [p.grad.clone() for p in params]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up on a side stream, as graph capture needs
        for _ in range(2):
            model.zero_grad(set_to_none=False)
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    model.zero_grad(set_to_none=False)
    with torch.cuda.graph(graph):
        loss = step()
    for p in params:
        p.grad.zero_()
    if seed is not None:
        torch.manual_seed(seed)
    graph.replay()
    torch.cuda.synchronize()
    close(loss.float(), want_loss.float(), 1e-6, scaled=True)
    for p, g in zip(params, want_grads):
        close(p.grad.float(), g.float(), 1e-6, scaled=True)


@gpu
def test_cuda_compile_inductor():
    model = tiny_model("qwen3_moe", dtype=torch.bfloat16, device="cuda")
    mh.replace_moe(model)
    ids = torch.randint(0, TINY["vocab_size"], (2, 32), device="cuda")
    want = model(ids).logits
    torch._dynamo.reset()
    got = torch.compile(model, fullgraph=True)(ids).logits
    close(got.float(), want.float(), 2e-2, scaled=True)



@gpu
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_cuda_phimoe_matches_transformers(mode):
    """PhiMoE in fp32 on the GPU (moeyard's CUDA kernels, CUDA random draws) against transformers
    after the same seed. (In bf16 transformers computes sparsemixer in bf16, moeyard in fp32: a
    logit on a window's edge or a near-tied sample may go the other way, see HFRouter.)"""
    want = tiny_model("phimoe", device="cuda").train(mode == "train")
    got = copy.deepcopy(want)
    mh.replace_moe(got)
    ids = torch.randint(0, TINY["vocab_size"], (4, 64), device="cuda")
    compare_models(got, want, ids, 1e-4, 1e-4)


@gpu
def test_cuda_graph_phimoe_training():
    """A replaced PhiMoE training step (sampling inside the graph) captured and replayed: after
    the same seed the replay equals the eager step."""
    model = tiny_model("phimoe", device="cuda")
    mh.replace_moe(model)
    ids = torch.randint(0, TINY["vocab_size"], (2, 32), device="cuda")
    check_graph_replay(model, ids, seed=5)
