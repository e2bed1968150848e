"""pytest plugin for tests/hf_suite.py: forces moeyard into transformers' own model tests.

Loaded with ``-p hf_suite_plugin`` (tests/ on PYTHONPATH); the mode comes from the environment
variable ``MOEYARD_HF_SUITE_MODE``:

``baseline``
    Nothing is patched; transformers is imported here (before the checkout's conftest.py puts its
    ``src/`` on sys.path), so every mode runs the installed transformers.
``experts``
    ``import moeyard.hf`` and ``PreTrainedModel.get_correct_experts_implementation`` resolves an
    implementation that was not requested (None) to ``"moeyard"``; a test that asks for one
    (``"eager"``, ``"grouped_mm"``, ...) still gets it.
``replace``
    ``PreTrainedModel.post_init`` runs :func:`moeyard.hf.replace_moe` on the model after the
    original post_init (weights already initialized), so every model a test builds, directly or
    through ``from_pretrained``, has moeyard blocks. A model without an MoE block is left alone;
    one whose block class replace_moe refuses ("replace_moe cannot reproduce ...") is left alone
    too and the refusal is recorded (it does not fail the test); any other error of replace_moe
    (an activation moeyard refuses, a routing it cannot build) fails the test, as it would a user.

``MOEYARD_HF_SUITE_SILU=1`` (any mode, baseline included): gated experts whose activation is a
GELU get SiLU after post_init, so that the tests get past a moeyard that refuses GeGLU experts
(transformers' test configs use hidden_act="gelu") and show what fails behind that refusal.

Each test's junit entry gets properties: ``moeyard_models`` (models built with moeyard experts
or replaced blocks) and ``moeyard_refused`` (replace_moe refusals, with the message in
``moeyard_refusal``). Nothing runs inside forward passes (no counters in compiled regions).
"""
import os

import pytest
import transformers  # the installed one, before the checkout's conftest.py edits sys.path
from transformers import PreTrainedModel

MODE = os.environ.get("MOEYARD_HF_SUITE_MODE", "baseline")
MODES = ("baseline", "experts", "replace")
if MODE not in MODES:
    raise pytest.UsageError(f"MOEYARD_HF_SUITE_MODE={MODE!r}; expected one of {MODES}")

_counts = {"models": 0, "refused": 0}
_refusals: list[str] = []

if MODE != "baseline":
    import moeyard.hf as _hf

if MODE == "experts":
    _orig_correct = PreTrainedModel.get_correct_experts_implementation

    def _get_correct_experts_implementation(self, requested_experts):
        if requested_experts is None:
            requested_experts = "moeyard"
            if self._can_set_experts_implementation():
                _counts["models"] += 1
        return _orig_correct(self, requested_experts)

    PreTrainedModel.get_correct_experts_implementation = _get_correct_experts_implementation

# replace_moe's refusals of a whole block it does not know (counted, model left alone); any other
# NotImplementedError (an experts activation or gate moeyard does not run) fails the test.
_BLOCK_REFUSALS = ("replace_moe cannot reproduce", "replace_moe cannot read the router")
_NO_BLOCK = "has no sparse MoE block"
SILU = os.environ.get("MOEYARD_HF_SUITE_SILU") == "1"
_orig_post_init = PreTrainedModel.post_init


def _silu_experts(model):
    """Gated experts with a GELU activation get SiLU (transformers' test configs use
    hidden_act="gelu"): what runs behind a refusal of GeGLU experts."""
    from torch import nn
    for module in model.modules():
        act = getattr(module, "act_fn", None)
        if getattr(module, "has_gate", False) and "GELU" in type(act).__name__:
            module.act_fn = nn.SiLU()


def _post_init(self, *args, **kwargs):
    out = _orig_post_init(self, *args, **kwargs)
    if SILU:
        _silu_experts(self)
    if MODE != "replace":
        return out
    try:
        if _hf.replace_moe(self):
            _counts["models"] += 1
    except NotImplementedError as e:
        if not str(e).startswith(_BLOCK_REFUSALS):
            raise
        _counts["refused"] += 1
        _refusals.append(str(e).splitlines()[0][:300])
    except ValueError as e:
        if _NO_BLOCK not in str(e):  # a dense model, or one replaced by a submodel's post_init
            raise
    return out


if MODE == "replace" or SILU:
    PreTrainedModel.post_init = _post_init


def pytest_report_header(config):
    return (f"moeyard hf_suite mode: {MODE}; transformers {transformers.__version__} from "
            f"{os.path.dirname(transformers.__file__)}")


def pytest_runtest_logstart(nodeid, location):
    _counts.update(models=0, refused=0)
    _refusals.clear()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if call.when == "teardown":
        props = [("moeyard_models", _counts["models"]), ("moeyard_refused", _counts["refused"])]
        props += [("moeyard_refusal", m) for m in sorted(set(_refusals))]
        item.user_properties.extend(props)
        report.user_properties = list(item.user_properties)
    return report
