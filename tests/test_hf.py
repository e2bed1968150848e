"""moeyard.hf: the "moeyard" experts implementation and replace_moe against transformers' own
(eager) MoE code, on tiny randomly initialised models of each supported family (no downloads).

CPU tests compare in fp32; the GPU tests (``-m gpu``) compare in bf16 and capture CUDA graphs."""
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
}
# Families whose MoE blocks replace_moe must refuse (routing or experts it cannot reproduce).
UNSUPPORTED = {
    "phimoe": ("PhimoeConfig", "PhimoeForCausalLM", dict(
        num_key_value_heads=2, intermediate_size=32, num_local_experts=8, **_E8)),
    "nemotron_h": ("NemotronHConfig", "NemotronHForCausalLM", dict(
        num_key_value_heads=2, head_dim=16, intermediate_size=128, moe_intermediate_size=32,
        moe_shared_expert_intermediate_size=32, n_routed_experts=8,
        layers_block_type=["full_attention", "moe"], **_E8)),
}
PRIORITY = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "gpt_oss"]


def tiny_model(family, table=FAMILIES, dtype=torch.float32, device="cpu"):
    """A tiny random model of ``family`` (skips if the installed transformers lacks it), with a
    random ``e_score_correction_bias`` where it has one (so that the bias matters)."""
    config_name, model_name, kwargs = table[family]
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
    """Same outputs, router logits, aux loss and gradients of every parameter."""
    got, got_out, got_loss = lm_loss(got_model, ids)
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
    low, high = mh.SUPPORTED_TRANSFORMERS
    mh._check_version(transformers.__version__)  # the installed one (CI pins a supported one)
    mh._check_version(low + ".0")
    for bad in ("5.16.1", high + ".0", "4.57.6", "6.0.0"):
        with pytest.raises(ImportError, match="moeyard.hf supports transformers"):
            mh._check_version(bad)


def test_install_pins_name_the_supported_versions():
    """The Makefile (what CI installs) and the ``hf`` extra pin the range hf.py accepts."""
    low, high = mh.SUPPORTED_TRANSFORMERS
    spec = f"transformers>={low},<{high}"
    root = os.path.join(os.path.dirname(__file__), "..")
    for name in ("Makefile", "pyproject.toml"):
        with open(os.path.join(root, name)) as f:
            assert spec in f.read(), f"{name} does not pin {spec}"


def test_untested_version_warns_when_allowed(monkeypatch):
    monkeypatch.setenv("MOEYARD_HF_ALLOW_UNTESTED", "1")
    with pytest.warns(UserWarning, match="unverified"):
        mh._check_version("9.0.0")


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
def test_experts_implementation_matches_eager(family):
    want = tiny_model(family)
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
    ("silu", True, "swiglu"), ("swish", True, "swiglu"), ("relu", False, "relu"),
    ("gelu", False, "gelu"), ("gelu_pytorch_tanh", False, "gelu_tanh"),
    ("gelu_new", False, "gelu_tanh")])
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
    ("gelu", True, "gated activation GELUActivation"), ("relu2", False, "ReLUSquared")])
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
    assert blocks[0].source in mh.SUPPORTED_BLOCKS
    # the same parameter objects, under the same names
    assert dict(got.named_parameters()).keys() == dict(want.named_parameters()).keys()
    ids = torch.randint(0, TINY["vocab_size"], (2, 12))
    compare_models(got, want, ids, 1e-5, 1e-5)


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
    model = tiny_model("phimoe", UNSUPPORTED)
    mlp = model.model.layers[0].mlp
    with pytest.raises(NotImplementedError, match="PhimoeSparseMoeBlock"):
        mh.replace_moe(model)
    assert model.model.layers[0].mlp is mlp


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
    params = [p for p in model.parameters()]

    def step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss

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

