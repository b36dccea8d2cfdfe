"""Cosine feature distillation (plain; masked, MingTok's masked feature prediction; EvoTok's
folded form) and UniWeTok's Pre-Post Distillation (paper eqs 4-6).

  L_pre  = 1 - cos(u_G, f_T),  u_G = AttnPool_pre(U_G)    (eq 4, pre-quantization latents)
  L_post = 1 - cos(u_Q, f_T),  u_Q = AttnPool_post(U_Q)   (eq 5, straight-through quantized)
  L_PPD  = L_pre + eta * L_post                            (eq 6)

U_Q = U_G + sg[Q - U_G] has the value of the binary code and the gradient of U_G, so L_post
also trains the encoder, through the straight-through estimator; the heads themselves are
`unimm_jax.models.distillation_heads`. Each term is averaged over the batch.
"""
import jax
import jax.numpy as jnp

# torch.nn.functional.cosine_similarity's default: each norm is clamped at eps.
COSINE_EPS = 1e-8


def _unit(x: jax.Array, eps: float) -> jax.Array:
  """x / max(||x||, eps) over the last axis, float32.

  The clamp is applied to the squared norm: clamping sqrt(0) would still multiply sqrt's
  infinite derivative at 0 by the clamp's zero, which gives NaN, not 0.
  """
  x = x.astype(jnp.float32)
  squared = jnp.sum(jnp.square(x), axis=-1, keepdims=True)
  return x * jax.lax.rsqrt(jnp.maximum(squared, eps * eps))


def cosine_distillation_loss(student: jax.Array, teacher: jax.Array,
                             eps: float = COSINE_EPS) -> jax.Array:
  """mean(1 - cos(student, teacher)) over the leading axes; scalar float32 in [0, 2].

  Shapes: student (b, d) (or (..., d)), teacher of the same shape. The teacher is
  stop-gradiented, so the loss only moves the student. A zero vector has cosine 0 with
  anything (loss 1) and finite gradients.
  """
  if student.shape != teacher.shape:
    raise ValueError(f'cosine_distillation_loss: student {student.shape} and teacher '
                     f'{teacher.shape} differ; the head out_dim must equal the teacher width')
  teacher = jax.lax.stop_gradient(teacher)
  cosine = jnp.sum(_unit(student, eps) * _unit(teacher, eps), axis=-1)
  return jnp.mean(1.0 - cosine)


def masked_cosine_loss(student: jax.Array, teacher: jax.Array, weights: jax.Array,
                       eps: float = COSINE_EPS) -> jax.Array:
  """sum(w (1 - cos)) / sum(w) over the tokens: masked feature prediction (MingTok), where
  only the masked tokens count. Shapes: student, teacher (b, n, d); weights (b, n) (0 / 1).
  0 when no token is weighted. The teacher is stop-gradiented."""
  if student.shape != teacher.shape:
    raise ValueError(f'masked_cosine_loss: student {student.shape} and teacher '
                     f'{teacher.shape} differ')
  teacher = jax.lax.stop_gradient(teacher)
  distance = 1.0 - jnp.sum(_unit(student, eps) * _unit(teacher, eps), axis=-1)
  weights = weights.astype(jnp.float32)
  return jnp.sum(weights * distance) / jnp.maximum(jnp.sum(weights), 1.0)


def folded_cosine_loss(student: jax.Array, teacher: jax.Array, folds: int,
                       eps: float = COSINE_EPS) -> jax.Array:
  """`cosine_distillation_loss` over `folds` equal chunks of the last axis: each token's
  (D,) vectors are split into (folds, D / folds) and every chunk is compared on its own
  (EvoTok's 'fold' term; folds=1 is the plain cosine). Shapes (..., D), D % folds == 0."""
  if student.shape[-1] % folds:
    raise ValueError(f'folded_cosine_loss: width {student.shape[-1]} is not a multiple of '
                     f'folds={folds}')
  chunks = lambda x: x.reshape(x.shape[:-1] + (folds, x.shape[-1] // folds))
  return cosine_distillation_loss(chunks(student), chunks(teacher), eps)


def pre_post_distillation(teacher: jax.Array, pre_embedding: jax.Array | None,
                          post_embedding: jax.Array | None, eta: float = 1.0
                          ) -> dict[str, jax.Array]:
  """L_pre, L_post and L_PPD of eqs 4-6.

  Args:
    teacher: f_T (b, d_T), the teacher's pooled embedding (SigLIP2's pooler output).
    pre_embedding: u_G (b, d_T) = AttnPool_pre(U_G), or None where pre distillation is off.
    post_embedding: u_Q (b, d_T) = AttnPool_post(U_Q), or None where post distillation is off.
    eta: weight of L_post in L_PPD (SPECS: default 1; the paper gives no value).

  Returns {'pre_distill', 'post_distill', 'ppd'} float32 scalars; a term that is off is
  absent and L_PPD sums the others (Table 3's PRE-only and POST-only rows).
  """
  if teacher.ndim != 2:
    raise ValueError(f'pre_post_distillation: teacher features must be pooled (b, d), got '
                     f'shape {teacher.shape}; use the teacher feature "pooled"')
  if pre_embedding is None and post_embedding is None:
    raise ValueError('pre_post_distillation: pre and post embeddings are both None')
  terms = {}
  if pre_embedding is not None:
    terms['pre_distill'] = cosine_distillation_loss(pre_embedding, teacher)
  if post_embedding is not None:
    terms['post_distill'] = cosine_distillation_loss(post_embedding, teacher)
  terms['ppd'] = terms.get('pre_distill', 0.0) + eta * terms.get('post_distill', 0.0)
  return terms
