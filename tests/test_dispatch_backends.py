"""Which backend runs where (`dispatch.resolve_backend`, `dispatch.AUTO`) and the optional 'tokamax' backend: its
wiring (on a stand-in module, so it runs everywhere), the error that names the extra when it is absent, and, where
tokamax is installed, its outputs and gradients against the plain-jax.numpy reference."""

import sys
import types

import chex
import jax
import jax.numpy as jnp
import pytest

from moe_jax import dispatch, reference, routing
from moe_jax import experts as experts_lib
from tests.test_dispatch import make_inputs, make_weights


@pytest.mark.parametrize(
    "requested, platform, distributed, installed, expected",
    [
        ("auto", "gpu", False, ("tokamax",), "tokamax"),  # tokamax's kernels first on a GPU
        ("auto", "gpu", False, (), "ragged_dot"),  # else XLA's ragged_dot
        ("auto", "cuda", False, (), "ragged_dot"),
        ("auto", "tpu", False, ("tokamax",), "ragged_dot"),  # XLA's TPU ragged_dot is a grouped-matmul kernel
        ("auto", "cpu", False, ("tokamax",), "dropless"),  # ragged_dot is a masked dense dot on CPU
        ("auto", "gpu", True, ("tokamax",), "gather"),  # across devices: capacity buffers by all_to_all
        ("tokamax", "gpu", True, (), "gather"),  # never runs there, so need not be installed
        ("tokamax", "cpu", False, ("tokamax",), "tokamax"),
        ("ragged_dot", "gpu", False, ("tokamax",), "ragged_dot"),
    ],
)
def test_resolved_backend_is_the_platforms_best_installed_grouped_matmul(requested, platform, distributed, installed,
                                                                         expected):
  assert dispatch.resolve_backend(requested, platform, distributed, installed) == expected


def test_every_auto_choice_is_a_dropless_backend():
  for order in (*dispatch.AUTO.values(), dispatch.AUTO_ELSEWHERE):
    assert set(order) <= set(dispatch.RAGGED), order
  assert not set(dispatch.AUTO_ELSEWHERE) & set(dispatch.OPTIONAL)  # 'auto' always finds one


def test_an_optional_backend_that_is_not_installed_is_refused_naming_the_extra():
  with pytest.raises(ValueError, match=r"dispatch='tokamax' needs an optional package.*moe_jax\[tokamax\]"):
    dispatch.resolve_backend("tokamax", "gpu", False, installed=())


def test_tokamax_import_error_names_the_extra(monkeypatch):
  monkeypatch.setitem(sys.modules, "tokamax", None)  # `import tokamax` raises ImportError
  with pytest.raises(ImportError, match=r"moe_jax\[tokamax\]"):
    dispatch.tokamax_ragged_dot()


def route_and_experts(activation: str):
  tokens, logits, cotangent = make_inputs()
  route = routing.top_k_route(logits, k=2, dropless=True)
  return tokens, route, make_weights(activation), cotangent


def test_tokamax_backend_runs_every_projection_through_tokamax_ragged_dot(monkeypatch):
  """With a stand-in `tokamax` module whose ragged_dot counts its calls and defers to jax.lax.ragged_dot, the backend
  calls it once per projection (3 for a gated FFN) and equals the 'ragged_dot' backend exactly."""
  calls = []

  def counting_ragged_dot(lhs, rhs, group_sizes):
    calls.append(rhs.shape)
    return jax.lax.ragged_dot(lhs, rhs, group_sizes)

  monkeypatch.setitem(sys.modules, "tokamax", types.SimpleNamespace(ragged_dot=counting_ragged_dot))
  tokens, route, weights, _ = route_and_experts("swiglu")
  experts = experts_lib.StackedExperts(weights, "swiglu")
  out = dispatch.tokamax_dispatch(tokens, route, experts)
  assert len(calls) == 3
  chex.assert_trees_all_equal(out, dispatch.ragged_dot_dispatch(tokens, route, experts))


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_tokamax_backend_output_and_gradients_equal_reference(activation):
  pytest.importorskip("tokamax", reason="the optional tokamax package (pip install 'moe_jax[tokamax]')")
  tokens, route, weights, cotangent = route_and_experts(activation)

  def loss(backend, tokens, weights):
    if backend == "reference":
      out = reference.moe(tokens, route, weights, activation=activation)
    else:
      out = backend(tokens, route, experts_lib.StackedExperts(weights, activation))
    return jnp.sum(out * cotangent), out

  grad = lambda backend: jax.jit(jax.value_and_grad(lambda *a: loss(backend, *a), argnums=(0, 1), has_aux=True))(
      tokens, weights)
  chex.assert_trees_all_close(grad(dispatch.tokamax_dispatch), grad("reference"), atol=1e-5, rtol=0)
