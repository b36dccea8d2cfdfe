"""One task for every image tokenizer: pixel losses plus the model's weighted aux losses.

A tokenizer returns `TokenizerOutput(recon, codes, latents, aux)`; scalar aux entries whose
names appear in `config.loss` are loss terms, everything else in aux is a statistic that is
logged but not optimised.
"""
import jax
import jax.numpy as jnp
import ml_collections
import optax

from unimm_jax.losses import reconstruction
from unimm_jax.models import registry
from unimm_jax.train import optimizers
from unimm_jax.train.train_state import TrainState, keep_if_finite

# Fixed key for the decoder's noise at evaluation, so eval numbers and encode/decode
# outputs are reproducible across runs and hosts.
EVAL_NOISE_SEED = 1234


class TokenizerTask:
  """Trains a tokenizer model (UniWeTok, ...) with reconstruction and aux losses."""

  def __init__(self, config: ml_collections.ConfigDict):
    self.config = config
    self.model = registry.build_tokenizer(config.model)
    self.tx, self.lr_schedule = optimizers.make_optimizer(config.optim, config.train.steps)

  def init(self, rng: jax.Array) -> TrainState:
    """A fresh state; params stay boxed (`nn.Partitioned`) so shardings can be derived."""
    size = self.config.data.image_size
    images = jnp.zeros((1, size, size, 3), jnp.float32)
    params_rng, noise_rng = jax.random.split(rng)
    variables = self.model.init({"params": params_rng, "noise": noise_rng}, images,
                                train=False)
    return TrainState.create(variables["params"], self.tx)

  def loss_terms(self, out, images: jax.Array) -> dict[str, jax.Array]:
    """Unweighted loss terms of one forward pass, each a float32 scalar."""
    aux = out.aux
    terms = {
        "l1": reconstruction.l1_loss(out.recon, images),
        "l2": reconstruction.l2_loss(out.recon, images),
        "commitment": aux["commitment"],
        "token_entropy": aux["token_entropy"],
        "codebook_entropy": aux["codebook_entropy"],
    }
    terms["entropy"] = (aux["token_entropy"]
                        - self.config.loss.codebook_entropy_ratio * aux["codebook_entropy"])
    return terms

  def _loss_fn(self, params, images, rng):
    out = self.model.apply({"params": params}, images, train=True, rngs={"noise": rng})
    terms = self.loss_terms(out, images)
    weights = self.config.loss
    loss = sum(weights[name] * terms[name]
               for name in ("l1", "l2", "entropy", "commitment") if weights[name])
    stats = {k: v for k, v in out.aux.items() if k in ("code_usage", "code_perplexity")}
    return loss, {**terms, **stats}

  def train_step(self, state: TrainState, batch: dict, rng: jax.Array):
    """One update. Returns (state, metrics); metrics are scalars or (g,) vectors."""
    rng = jax.random.fold_in(rng, state.step)
    (loss, metrics), grads = jax.value_and_grad(self._loss_fn, has_aux=True)(
        state.params, batch["image"], rng)
    grad_norm = optax.tree.norm(grads)
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    new_state = state.apply_gradients(grads, self.config.ema_decay)
    new_state = keep_if_finite(new_state, state, ok)
    metrics.update(loss=loss, grad_norm=grad_norm, lr=self.lr_schedule(state.step),
                   nonfinite=(~ok).astype(jnp.int32))
    return new_state, metrics

  def reconstruct(self, params, images: jax.Array) -> jax.Array:
    """(b, h, w, 3) -> (b, h, w, 3) reconstructions clipped to [-1, 1]."""
    out = self.model.apply({"params": params}, images, train=False,
                           rngs={"noise": jax.random.key(EVAL_NOISE_SEED)})
    return jnp.clip(out.recon, -1.0, 1.0)

  def eval_step(self, state: TrainState, batch: dict) -> jax.Array:
    """Reconstructions of `batch['image']` with the EMA parameters."""
    return self.reconstruct(state.ema_params, batch["image"])

  def encode(self, params, images: jax.Array) -> jax.Array:
    """(b, h, w, 3) -> integer codes."""
    _, codes, _ = self.model.apply({"params": params}, images, train=False,
                                   method=self.model.encode)
    return codes

  def decode(self, params, codes: jax.Array) -> jax.Array:
    """Integer codes -> (b, h, w, 3) images in [-1, 1]."""
    def run(module, codes):
      return module.decode(module.codes_to_quantized(codes), train=False)
    recon = self.model.apply({"params": params}, codes, method=run,
                             rngs={"noise": jax.random.key(EVAL_NOISE_SEED)})
    return jnp.clip(recon, -1.0, 1.0)

