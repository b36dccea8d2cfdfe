"""One task for every image tokenizer: its loss terms weighted by name, plus pixel,
perceptual and GAN losses.

The tokenizer comes from its spec (`unimm_jax.systems.tokenizers`, by config.model.name).
A forward pass returns `TokenizerOutput` with its own loss terms (UniWeTok's quantizer:
`entropy`, `commitment`); the task adds `l1`, `l2` and, with LPIPS weights, `perceptual`,
and the training-only modules of the spec (`TrainingModule`) add theirs (UniWeTok:
`pre_distill`, `post_distill`, `gap`). The loss is

  sum over terms t of config.loss[t] * t   +   config.loss.gan * (the generator's GAN term)

Every produced term needs a weight in config.loss and every non-zero weight a term: either
mismatch is refused at start-up, naming it, from the shapes alone (`check`). A weight of 0
switches its term off where a module produces it (the spec builds no module for it). The
training-only modules train with the tokenizer's optimiser as `TrainState.module_params`;
they are not part of the model that encode/decode and exports use. Statistics (code usage,
entropies, the prior's accuracy) are logged, never weighted.
"""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from unimm_jax.data import pipeline
from unimm_jax.evals import lpips as lpips_weights
from unimm_jax.inference import image_codec
from unimm_jax.inference import restore
from unimm_jax.losses import gan
from unimm_jax.losses import reconstruction
from unimm_jax.models import lpips
from unimm_jax.models.tokenizer_interface import train_rngs
from unimm_jax.systems import tokenizers
from unimm_jax.train import evaluators
from unimm_jax.train import metric_logging
from unimm_jax.train import optimizers
from unimm_jax.train.tasks import adversarial
from unimm_jax.train.tasks import tokenizer_eval
from unimm_jax.train.train_state import TrainState, keep_if_finite

# Cotangents for the two-output VJP (numpy, so importing this module touches no device
# before jax.distributed.initialize()).
_ONE, _ZERO = np.float32(1.0), np.float32(0.0)
# config.loss entries that are not weights of named terms.
_NOT_TERMS = ("gan",)


class TokenizerTask:
  """Trains a tokenizer (any spec of `unimm_jax.systems.tokenizers`)."""
  throughput_unit = "images"
  kind = "an image tokenizer"
  modes = ("train", "eval", "encode", "decode", "import", "plan")

  def __init__(self, config: ml_collections.ConfigDict):
    self.config = config
    self.spec = tokenizers.spec(config.model)
    self.model = self.spec.build(config.model)
    self.layout = self.spec.code_layout(config.model)
    self.modules = self.spec.training_modules(config)
    names = [m.name for m in self.modules]
    if len(set(names)) != len(names):
      raise ValueError(f"training-only modules share a name: {names}")
    self.optimizer = optimizers.Optimizer(config.optim, config.train.steps)
    self.adversary = adversarial.Adversary(config.disc) if config.loss.gan else None
    self.lpips = lpips.LPIPS()

  # ------------------------------------------------------------------------ data and state

  def batch_ndims(self) -> dict[str, int]:
    return {"image": 4}

  def global_batch_sizes(self) -> list[int]:
    return [b for _, b in pipeline.train_buckets(self.config.data, self.config.train.batch_size)]

  def count_items(self, host_batch: dict) -> int:
    return host_batch["image"].shape[0]

  def train_iterator(self, seed: int):
    """This host's batches {'image': (b, h, w, 3), 'skipped': (b,)}, checkpointable."""
    return pipeline.build_train_iterator(self.config.data,
                                         global_batch_size=self.config.train.batch_size,
                                         seed=seed)

  def batch_shapes(self) -> list[dict]:
    """The global train batches as ShapeDtypeStructs, one per resolution bucket."""
    return [{"image": jax.ShapeDtypeStruct((b, side, side, 3), jnp.float32)}
            for side, b in pipeline.train_buckets(self.config.data,
                                                  self.config.train.batch_size)]

  def _example_images(self) -> jax.Array:
    size = self.config.data.image_size
    return jnp.zeros((1, size, size, 3), jnp.float32)

  def init_params(self, rng: jax.Array):
    """The tokenizer's params alone (boxed)."""
    return tokenizers.init_params(self.model, self.config, rng)

  def init_variables(self, rng: jax.Array) -> dict:
    """The tokenizer's variables (boxed): {'params', plus its state collections}, as
    inference restores them."""
    return tokenizers.init_variables(self.model, self.config, rng)

  def init(self, rng: jax.Array) -> TrainState:
    """A fresh state; params stay boxed (`nn.Partitioned`) so shardings can be derived."""
    params_rng, disc_rng, modules_rng = jax.random.split(rng, 3)
    variables = self.init_variables(params_rng)
    params = variables.pop("params")
    discriminator = (self.adversary.init(disc_rng, self._example_images().shape)
                     if self.adversary else None)
    return TrainState.create(params, self.optimizer.tx,
                             module_params=self.init_module_params(modules_rng),
                             discriminator=discriminator, ema=self.config.ema_decay > 0,
                             model_state=variables or None)

  def init_module_params(self, rng: jax.Array) -> dict | None:
    """Params of the training-only modules by name (boxed), or None without modules."""
    if not self.modules:
      return None
    images = self._example_images()
    # Shapes of a forward pass only: the modules size their params from its features.
    out = jax.eval_shape(lambda: self.model.apply(
        self.init_variables(rng), images, train=False, rngs={"noise": rng}))
    rngs = jax.random.split(rng, len(self.modules))
    return {m.name: m.init(r, out, images) for m, r in zip(self.modules, rngs)}

  def load_frozen(self) -> dict:
    """Frozen networks the loss needs (LPIPS, the modules' teachers); passed to every step."""
    frozen = {}
    if self.config.loss.perceptual:
      lp = self.config.lpips
      frozen["lpips"] = lpips_weights.resolve_params(lp.path, allow_random=lp.allow_random)
    for module in self.modules:
      frozen.update(module.load_frozen())
    return frozen

  def frozen_shapes(self) -> dict:
    """`load_frozen()` as ShapeDtypeStructs, boxed with their logical axis names (which
    place them on the mesh), reading no weights."""
    images = jax.ShapeDtypeStruct(self._example_images().shape, jnp.float32)
    frozen = {}
    if self.config.loss.perceptual:
      rng = jax.ShapeDtypeStruct((), jax.random.key(0).dtype)
      frozen["lpips"] = jax.eval_shape(
          lambda r, x: self.lpips.init(r, x, x)["params"], rng, images)
    for module in self.modules:
      shapes = module.frozen_shapes(images)
      clash = sorted(set(shapes) & set(frozen))
      if clash:
        raise ValueError(f"training-only module {module.name!r} asks for frozen networks "
                         f"{clash}, which another part of the loss already uses")
      frozen.update(shapes)
    return frozen

  # ------------------------------------------------------------------------------ loss

  def _terms(self, params, module_params, model_state, frozen: dict, images: jax.Array,
             rng: jax.Array):
    """(forward pass, unweighted loss terms, statistics, the updated model state): the
    model's terms, the pixel terms and the training-only modules'."""
    model_rng, modules_rng = jax.random.split(rng)
    variables = {"params": params, **(model_state or {})}
    if model_state:
      out, model_state = self.model.apply(variables, images, train=True,
                                          rngs=train_rngs(model_rng), mutable=list(model_state))
    else:
      out = self.model.apply(variables, images, train=True, rngs=train_rngs(model_rng))
    terms = {"l1": reconstruction.l1_loss(out.recon, images),
             "l2": reconstruction.l2_loss(out.recon, images)}
    if "lpips" in frozen:
      terms["perceptual"] = jnp.mean(
          self.lpips.apply({"params": frozen["lpips"]}, out.recon, images))
    stats = dict(out.stats)
    produced = {"the tokenizer": out.losses, "the pixel losses": terms}
    for module, rng_m in zip(self.modules, jax.random.split(modules_rng, len(self.modules))):
      losses, module_stats = module(module_params[module.name], out, images, frozen, rng_m)
      produced[f"module {module.name}"] = losses
      stats.update(module_stats)
    all_terms = {}
    for source, losses in produced.items():
      for name, value in losses.items():
        if name in all_terms:
          raise ValueError(f"loss term {name!r} of {source} is produced twice")
        all_terms[name] = value
    return out, all_terms, stats, model_state

  def check(self, abstract_state: TrainState) -> None:
    """Start-up checks from shapes only: the param groups, and that every loss term has a
    weight and every non-zero weight a term (naming the first mismatch)."""
    self.optimizer.check((abstract_state.params, abstract_state.module_params))
    frozen = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype),
                          self.frozen_shapes(), is_leaf=lambda x: hasattr(x, "shape"))
    images = self.batch_shapes()[0]["image"]
    rng = jax.ShapeDtypeStruct((), jax.random.key(0).dtype)
    _, terms, _, _ = jax.eval_shape(self._terms, abstract_state.params,
                                    abstract_state.module_params, abstract_state.model_state,
                                    frozen, images, rng)
    weights = {k: v for k, v in self.config.loss.items() if k not in _NOT_TERMS}
    for name in sorted(terms):
      if name not in weights:
        raise ValueError(f"loss term {name!r} has no weight: add config.loss.{name} "
                         f"(weighted terms: {sorted(weights)})")
    for name, weight in sorted(weights.items()):
      if weight and name not in terms:
        raise ValueError(f"config.loss.{name}={weight} weights a term nothing produces "
                         f"(produced: {sorted(terms)})")

  def _losses(self, params, module_params, state: TrainState, frozen: dict, images, rng):
    """(weighted loss without GAN, GAN generator term), (terms, statistics, recon, the
    discriminator's BatchNorm statistics, the updated model state)."""
    params, module_params = self.optimizer.stop_frozen((params, module_params))
    out, terms, stats, model_state = self._terms(params, module_params, state.model_state,
                                                 frozen, images, rng)
    weights = self.config.loss
    nll = sum(weights[name] * value for name, value in terms.items() if weights[name])
    nll = jnp.asarray(nll, jnp.float32)
    g_loss, disc_stats = (self.adversary.generator_loss(state.discriminator, out.recon)
                          if self.adversary else (jnp.zeros(()), None))
    return (nll, g_loss), (terms, stats, out.recon, disc_stats, model_state)

  def train_step(self, state: TrainState, frozen: dict, batch: dict, rng: jax.Array):
    """One generator (and discriminator) update. Returns (state, metrics).

    With a discriminator, the reconstruction-side loss and the GAN term are
    differentiated separately (two VJPs of one forward pass) when the adaptive weight
    needs both gradients at the decoder's last layer; otherwise in one.
    """
    rng = jax.random.fold_in(rng, state.step)
    images = batch["image"]
    # Gradients reach the tokenizer and the training-only modules alike.
    (nll, g_loss), vjp, (terms, metrics, recon, disc_stats, model_state) = jax.vjp(
        lambda p, m: self._losses(p, m, state, frozen, images, rng), state.params,
        state.module_params, has_aux=True)
    metrics.update(terms)
    discriminator = state.discriminator
    if self.adversary:
      dc = self.config.disc
      factor = gan.disc_factor_at(state.step, dc.start)
      weight = self.config.loss.gan * factor
      if dc.adaptive:
        grads_nll, grads_g = vjp((_ONE, _ZERO)), vjp((_ZERO, _ONE))
        adaptive = gan.adaptive_generator_weight(
            _at_path(grads_nll[0], dc.adaptive_layer), _at_path(grads_g[0], dc.adaptive_layer),
            dc.adaptive_max)
        grads = jax.tree.map(lambda a, b: a + weight * adaptive * b, grads_nll, grads_g)
        metrics["gan_adaptive_weight"] = adaptive
      else:
        grads = vjp((_ONE, weight))
      discriminator, disc_metrics = self.adversary.update(
          state.discriminator.replace(batch_stats=disc_stats), images, recon, factor)
      metrics.update(disc_metrics, gan=g_loss)
      loss = nll + weight * g_loss
    else:
      grads = vjp((_ONE, _ZERO))
      loss = nll
    grads, module_grads = grads
    grad_norm = optax.tree.norm(grads)
    ok = (jnp.isfinite(loss) & jnp.isfinite(grad_norm)
          & jnp.isfinite(optax.tree.norm(module_grads)))
    new_state = state.apply_gradients(grads, self.config.ema_decay, module_grads).replace(
        discriminator=discriminator, model_state=model_state)
    new_state = keep_if_finite(new_state, state, ok)
    metrics.update(loss=loss, grad_norm=grad_norm, lr=self.optimizer.schedule(state.step),
                   nonfinite=(~ok).astype(jnp.int32))
    return new_state, metrics

  # ----------------------------------------------------------------- evaluation and modes

  def evaluator(self, context, writer, workdir: str) -> evaluators.ReconstructionEvaluator:
    return evaluators.ReconstructionEvaluator(
        context, self.config, image_codec.reconstruct(self.model), writer, workdir)

  def _restore_eval_variables(self, context, workdir: str):
    rng = jax.random.key(0)
    return restore.restore_eval_variables(workdir, jax.eval_shape(self.init_variables, rng),
                                          context)

  def evaluate_checkpoint(self, context, workdir: str) -> dict:
    """`--mode=eval` (see `tokenizer_eval.evaluate`)."""
    writer = metric_logging.create_writer(workdir) if jax.process_index() == 0 else None
    results = tokenizer_eval.evaluate(self, context, workdir, writer)
    if writer is not None:
      writer.close()
    return results

  def encode_folder(self, context, workdir: str, input_dir: str, output_file: str) -> str:
    """`--mode=encode`: every image below input_dir to codes (a continuous tokenizer: its
    latents) in output_file (.npz)."""
    variables = self._restore_eval_variables(context, workdir)[1]
    encode = jax.jit(lambda images: image_codec.encode(self.model)(variables, images))
    n = image_codec.encode_folder(encode, input_dir, output_file,
                                  self.spec.downsample_factor(self.config.model), self.layout)
    return f"encoded {n} images from {input_dir} into {output_file}"

  def decode_file(self, context, workdir: str, input_file: str, output_dir: str) -> str:
    """`--mode=decode`: a codes (latents) .npz of `encode_folder` back to PNGs in
    output_dir."""
    variables = self._restore_eval_variables(context, workdir)[1]
    continuous = self.layout is None
    decode = jax.jit(lambda tokens: image_codec.decode(self.model, continuous)(variables,
                                                                               tokens))
    n = image_codec.decode_file(decode, input_file, output_dir, continuous)
    return f"decoded {n} images from {input_file} into {output_dir}"

  def initial_weights(self) -> dict | None:
    """Pretrained sources of some params for a fresh run (the spec's, from paths in
    config.model), or None."""
    if self.spec.initial_weights is None:
      return None
    return self.spec.initial_weights(self.config.model)

  def import_variables(self, path: str) -> dict:
    """`--mode=import`: variables ({'params', plus state collections}) from the authors'
    released weights at `path`."""
    if self.spec.import_weights is None:
      raise ValueError(f"--mode=import: no importer of the authors' weights for "
                       f"config.model.name={self.config.model.name!r}")
    return self.spec.import_weights(path, self.config.model)


def _at_path(tree, path: str):
  """tree['a']['b'] for path 'a/b' (e.g. the decoder's last layer kernel)."""
  for key in path.split("/"):
    if key not in tree:
      raise ValueError(f"config.disc.adaptive_layer={path!r}: no {key!r} among {sorted(tree)}")
    tree = tree[key]
  return tree

