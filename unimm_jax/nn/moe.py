"""Mixture-of-experts feed-forward: top-k routed SwiGLU experts plus shared experts.

Routing (Bailing MoE / Ling's gate, as in Ming-UniVision's modeling_bailing_moe.py):
  logits = x . W_gate (no bias), p = softmax(logits) in float32, the top-k of p, divided by
  their sum when `norm_topk_prob` (and k > 1). No group-limited routing, no router noise, no
  capacity: every token reaches its k experts. Router logits and probabilities are computed
  in float32 whatever the compute dtype, so bf16 cannot flip a token's choice.
Output: y = sum_j w_j expert_{i_j}(x) + shared(x); each expert is a SwiGLU of width
  `hidden_dim` (moe_intermediate_size); `shared` is one SwiGLU of width num_shared *
  hidden_dim that every token goes through (absent when num_shared is 0).
Several routers (Bailing's `multi_gate`: `gate` for text, `image_gate`, `audio_gate`): each
  token is routed by the router `gate_ids` (b, s) names (0, 1, 2): its top-k, weights and
  probabilities all come from that router, as their per-modality masks select.

Dispatch, both exact (same result to float rounding; tested against each other):
  'dense'   every expert runs on every token (einsums over the leading expert axis) and the
            outputs are combined with weights that are zero outside each token's top k.
            E / k times the expert FLOPs of a sparse dispatch, but plain einsums: under a
            mesh the expert axis is split like any other (logical name 'expert'), each
            device computes its own experts and the combine is a sum over devices.
  'ragged'  the (token, choice) pairs sorted by expert, each expert's rows multiplied by its
            kernels with `jax.lax.ragged_dot` (a grouped matmul), then scattered back: only
            the k chosen experts' FLOPs. Under a mesh XLA gathers the expert kernels before
            the grouped matmul (FSDP-like), so experts are stored sharded but not computed
            expert-parallel.

Load-balance loss (their code returns aux_loss None; this is the expert-level term of
Switch Transformer / DeepSeekMoE with coefficient 1): over the real tokens (`token_mask`),
  f_e = share of the T * k routed slots that chose expert e,
  P_e = mean router probability of expert e,
  loss = E * sum_e f_e P_e,
which is 1 for uniform routing and grows as the load concentrates; its gradient reaches the
router through P. The caller weights it (config.loss). `expert_load` is f (E,).

Params: `gate` (and `image_gate`, `audio_gate`) {kernel (d, E)}; `experts` {gate_proj,
up_proj (E, d, I), down_proj (E, I, d)}, annotated ('expert', 'embed', 'mlp');
`shared_experts`: `nn.mlp.SwiGLU` in the 'hf' layout.
"""
from typing import Any, NamedTuple

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from unimm_jax.nn import initializers
from unimm_jax.nn.linear import Projection
from unimm_jax.nn.mlp import SwiGLU

Dtype = Any
DISPATCHES = ('dense', 'ragged')
ROUTER_NAMES = ('gate', 'image_gate', 'audio_gate')


class MoEAux(NamedTuple):
  """Per-layer routing statistics: balance_loss () float32, expert_load (E,) float32."""
  balance_loss: jax.Array
  expert_load: jax.Array


def route(logits: jax.Array, k: int, norm_topk_prob: bool):
  """(..., E) router logits -> (probs (..., E), top-k weights (..., k), indices (..., k)).

  Softmax in float32, top-k of the probabilities, renormalised when `norm_topk_prob` and
  k > 1 (a single expert keeps its probability, as their gate does)."""
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  weights, indices = jax.lax.top_k(probs, k)
  if norm_topk_prob and k > 1:
    weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
  return probs, weights, indices


def balance_loss(probs: jax.Array, indices: jax.Array, token_mask: jax.Array | None = None
                 ) -> MoEAux:
  """The load-balance term of the module docstring. probs (..., E), indices (..., k) int,
  token_mask (...) (1 for tokens that count; default all)."""
  num_experts, k = probs.shape[-1], indices.shape[-1]
  mask = (jnp.ones(probs.shape[:-1], jnp.float32) if token_mask is None
          else token_mask.astype(jnp.float32))
  chosen = jnp.sum(jax.nn.one_hot(indices, num_experts, dtype=jnp.float32), axis=-2)
  count = jnp.maximum(jnp.sum(mask), 1.0)
  axes = tuple(range(probs.ndim - 1))
  load = jnp.sum(chosen * mask[..., None], axis=axes) / (count * k)
  mean_prob = jnp.sum(probs * mask[..., None], axis=axes) / count
  return MoEAux(num_experts * jnp.sum(load * mean_prob), load)


def _combine_dense(x, weights, indices, kernels, dtype):
  """Every expert on every token; the weights outside the top k are zero. x (b, s, d)."""
  gate_k, up_k, down_k = (k.astype(dtype) for k in kernels)
  combine = jnp.sum(jax.nn.one_hot(indices, gate_k.shape[0], dtype=jnp.float32)
                    * weights[..., None], axis=-2)  # (b, s, E)
  x = x.astype(dtype)
  gate = jnp.einsum('bsd,edi->bsei', x, gate_k)
  up = jnp.einsum('bsd,edi->bsei', x, up_k)
  hidden = nn.with_logical_constraint(nn.silu(gate) * up, ('batch', 'length', 'expert', 'mlp'))
  # The combine weight scales each expert's hidden units: down_proj is linear.
  hidden = hidden * combine[..., None].astype(dtype)
  return jnp.einsum('bsei,eid->bsd', hidden, down_k)


def _combine_ragged(x, weights, indices, kernels, dtype):
  """The chosen (token, expert) pairs only, grouped by expert. x (b, s, d)."""
  gate_k, up_k, down_k = (k.astype(dtype) for k in kernels)
  b, s, d = x.shape
  k = indices.shape[-1]
  flat = indices.reshape(-1)
  order = jnp.argsort(flat, stable=True)  # pairs grouped by expert
  rows = order // k  # the token of each sorted pair
  group_sizes = jnp.bincount(flat, length=gate_k.shape[0]).astype(jnp.int32)
  tokens = x.reshape(b * s, d).astype(dtype)[rows]
  hidden = (nn.silu(jax.lax.ragged_dot(tokens, gate_k, group_sizes))
            * jax.lax.ragged_dot(tokens, up_k, group_sizes))
  out = jax.lax.ragged_dot(hidden, down_k, group_sizes)
  out = out * weights.reshape(-1)[order][:, None].astype(dtype)
  return jnp.zeros((b * s, d), dtype).at[rows].add(out).reshape(b, s, d)


class Experts(nn.Module):
  """E SwiGLU experts' kernels on a leading expert axis; returns them (the dispatch uses them).

  Params gate_proj, up_proj (E, d, hidden_dim), down_proj (E, hidden_dim, d)."""
  num_experts: int
  hidden_dim: int
  kernel_stddev: float | None = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, dim: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    e, i = self.num_experts, self.hidden_dim
    def param(name, shape, axes):
      if self.kernel_stddev is not None:
        init = initializers.normal(self.kernel_stddev, *axes)
      else:  # PyTorch's Linear default per expert: fan_in is axis 1, axis 0 a batch axis
        init = nn.with_logical_partitioning(nn.initializers.variance_scaling(
            1.0 / 3.0, 'fan_in', 'uniform', in_axis=1, out_axis=2, batch_axis=(0,)), axes)
      return self.param(name, init, shape, self.param_dtype)
    return (param('gate_proj', (e, dim, i), ('expert', 'embed', 'mlp')),
            param('up_proj', (e, dim, i), ('expert', 'embed', 'mlp')),
            param('down_proj', (e, i, dim), ('expert', 'mlp', 'embed')))


class MoEFeedForward(nn.Module):
  """Routed + shared experts (module docstring). Shapes: x (b, s, d) -> ((b, s, d), MoEAux).

  Call with token_mask (b, s) (tokens the balance loss counts; default all) and gate_ids
  (b, s) int (each token's router, with several; default 0, the `gate`).
  """
  num_experts: int
  num_experts_per_tok: int
  hidden_dim: int
  num_shared_experts: int = 0
  norm_topk_prob: bool = True
  num_routers: int = 1
  dispatch: str = 'dense'
  kernel_stddev: float | None = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, token_mask: jax.Array | None = None,
               gate_ids: jax.Array | None = None) -> tuple[jax.Array, MoEAux]:
    if self.dispatch not in DISPATCHES:
      raise ValueError(f'MoEFeedForward.dispatch={self.dispatch!r} is not one of {DISPATCHES}')
    if not 1 <= self.num_routers <= len(ROUTER_NAMES):
      raise ValueError(f'num_routers={self.num_routers} is not in 1..{len(ROUTER_NAMES)}')
    chex.assert_rank(x, 3)
    # Routers in float32: the choice of experts should not depend on the compute dtype.
    router = lambda name: Projection((self.num_experts,), ('embed', None), dtype=jnp.float32,
                                     param_dtype=self.param_dtype, stddev=self.kernel_stddev,
                                     name=name)(x)
    logits = router(ROUTER_NAMES[0])
    for r in range(1, self.num_routers):
      other = router(ROUTER_NAMES[r])
      if gate_ids is not None:
        logits = jnp.where((gate_ids == r)[..., None], other, logits)
    probs, weights, indices = route(logits, self.num_experts_per_tok, self.norm_topk_prob)
    aux = balance_loss(probs, indices, token_mask)

    kernels = Experts(self.num_experts, self.hidden_dim, self.kernel_stddev, self.param_dtype,
                      name='experts')(x.shape[-1])
    combine = _combine_dense if self.dispatch == 'dense' else _combine_ragged
    y = combine(x, weights, indices, kernels, self.dtype)
    if self.num_shared_experts:
      y = y + SwiGLU(self.num_shared_experts * self.hidden_dim, layout='hf',
                     kernel_stddev=self.kernel_stddev, dtype=self.dtype,
                     param_dtype=self.param_dtype, name='shared_experts')(x)
    return nn.with_logical_constraint(y.astype(self.dtype), ('batch', 'length', 'embed')), aux
