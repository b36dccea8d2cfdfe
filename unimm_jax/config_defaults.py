"""Fields every config shares, and the check that runs before anything compiles.

`ml_collections` already rejects an unknown key or a wrongly typed value given on the
command line (`--config.train.stepz=5` names `stepz`). `validate` adds the checks that
depend on values: enumerations, positivity, divisibility. It raises `ValueError` naming the
offending key, so a bad run fails in a second instead of after compilation.
"""
import importlib.util
import os
import re
from typing import Any

import ml_collections

from unimm_jax.data import data_config
from unimm_jax.data import mllm_data_config
from unimm_jax.data import text_data_config
from unimm_jax.data import text_tokenizer
from unimm_jax.parallel import rule_sets

# Logical axis -> mesh axes by default: `batch` spans data and fsdp (FSDP is data parallel
# with sharded parameters); parameters shard their `embed`/`conv_out` dimension over fsdp
# and heads/mlp/vocab over tensor. Other sets: unimm_jax/parallel/rule_sets.py.
DEFAULT_SHARDING_RULES = rule_sets.RULE_SETS["fsdp_tensor"]


def base_config() -> ml_collections.ConfigDict:
  """Returns the fields shared by every system; a config file fills in the rest."""
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.task = ""

  config.data = data_config.default_data_config()

  config.train = ml_collections.ConfigDict(dict(
      steps=1000,
      batch_size=16,  # global, over all hosts
      log_every=50,
      image_every=500,  # reconstruction grids (TensorBoard + PNG)
      checkpoint_every=1000,
      keep_checkpoints=3,
      eval_every=1000,
      eval_num_images=16,
      grid_images=8,
      max_nonfinite_steps=20,  # consecutive skipped (NaN/Inf) steps before giving up
      # A fresh run starts from the params (and EMA, discriminator) of this workdir's latest
      # checkpoint with a new optimiser and step 0: the previous curriculum stage.
      init_from="",
  ))

  # --mode=eval: the eval split of config.data, in batches.
  config.eval = ml_collections.ConfigDict(dict(
      num_images=50_000,
      batch_size=50,
      inception_path="",  # pytorch-fid's FID Inception weights as safetensors, for rFID
      # Zero-shot top-k (Table 1): class text embeddings as .npz (unimm_jax/evals/zero_shot.py)
      # against the distillation head's pooled tokens; eval images need class labels.
      zero_shot_classes="",
  ))

  # Mesh axis sizes; one may be -1 to take the devices left over.
  config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  # A rule set of unimm_jax/parallel/rule_sets.py: data_parallel, fsdp, tensor, fsdp_tensor.
  config.sharding = "fsdp_tensor"
  # Explicit (logical name, mesh axes) pairs; when not empty they replace config.sharding.
  config.sharding_rules = ()
  return config


def apply_variants(config: ml_collections.ConfigDict, arg: str, variants: dict,
                   config_file: str) -> ml_collections.ConfigDict:
  """Applies the comma-separated variants of `arg` in order; an unknown one is named."""
  for variant in [v for v in (arg or "").split(",") if v]:
    if variant not in variants:
      raise ValueError(f"unknown variant {variant!r} of {config_file}; "
                       f"choose from {sorted(variants)}")
    variants[variant](config)
  return config


def set_test_schedule(config: ml_collections.ConfigDict) -> None:
  """The `tiny` variants' cadence: 4 steps of batch 8 that log every step, write samples and
  checkpoints at steps 2 and 4 and evaluate at 4, so tests see every periodic action."""
  config.train.update(dict(batch_size=8, steps=4, log_every=1, image_every=2,
                           checkpoint_every=2, eval_every=4))


def set_mllm_schedule(config: ml_collections.ConfigDict) -> None:
  """The unified systems' default cadence on the built-in scenes: 500 steps of batch 16,
  logged every 25; grids, checkpoints and evaluations every 250 (`config.eval`: 2 packed
  batches of 16 rows for the loss, 96 held-out questions answered in at most 6 tokens and
  32 generation prompts; `num_edits` edit chains for a system that edits in context)."""
  config.train.update(dict(batch_size=16, steps=500, log_every=25, image_every=250,
                           checkpoint_every=250, eval_every=250))
  config.eval = ml_collections.ConfigDict(dict(
      batch_size=16, num_batches=2, num_answers=96, num_generations=32, num_edits=0,
      max_answer_tokens=6))


def scene_llm(**overrides) -> ml_collections.ConfigDict:
  """config.model of a unified system's built-in-scene variants: a dense 4-layer LLM 128
  wide (`models.llm.config_from_fields`), vocab_size set from config.tokens; `overrides`
  change fields (e.g. qk_norm='rms' for a Qwen3-style LLM)."""
  fields = dict(
      vocab_size=0, hidden_size=128, intermediate_size=352, num_layers=4, num_heads=4,
      num_kv_heads=2, head_dim=0, rope_theta=10000.0, rms_norm_eps=1e-6, qkv_bias=False,
      qk_norm="", tie_word_embeddings=False, dtype="float32", scan_layers=False, remat=False,
      attention_impl="xla",
      init_path="",  # a transformers directory the LLM of a fresh run starts from
      # Mixture of experts (unimm_jax/nn/moe.py); 0 experts = a dense LLM.
      num_experts=0, num_experts_per_tok=0, moe_intermediate_size=0, num_shared_experts=0,
      first_k_dense_replace=0, norm_topk_prob=True, num_routers=1, moe_dispatch="dense")
  unknown = sorted(set(overrides) - set(fields))
  if unknown:
    raise ValueError(f"scene_llm: unknown fields {unknown}")
  return ml_collections.ConfigDict({**fields, **overrides})


def set_mllm_test_schedule(config: ml_collections.ConfigDict) -> None:
  """A unified system's `tiny` cadence: `set_test_schedule`, a constant learning rate
  without warmup, and an evaluation on one batch of 8 rows, 8 questions answered in at most
  3 tokens and 4 generation prompts."""
  set_test_schedule(config)
  config.optim.warmup_steps, config.optim.schedule = 0, "constant"
  config.eval.update(dict(batch_size=8, num_batches=1, num_answers=8, num_generations=4,
                          max_answer_tokens=3))


def teacher_config() -> ml_collections.ConfigDict:
  """A frozen ViT teacher (`unimm_jax.models.teacher.load_teacher`); empty path = none."""
  return ml_collections.ConfigDict(dict(
      path="",  # checkpoint directory: config.json + model.safetensors (+ preprocessor_config)
      feature="pooled",  # 'pooled', 'last' or 'hidden:K' (hidden_states[K], K may be < 0)
      drop_class_token=False,  # token features without the class token (DINOv2, CLIP)
      dtype="float32",  # params and compute; 'bfloat16' halves memory and time
      image_size=0,  # input side for fixed-grid families; 0 = the checkpoint's image_size
      max_num_patches=0,  # SigLIP2 patch budget; 0 = preprocessor_config.json's (or 256)
  ))


def lpips_config() -> ml_collections.ConfigDict:
  """The perceptual loss's weights (`config.lpips`)."""
  return ml_collections.ConfigDict(dict(
      path="",  # safetensors of the lpips package's state dict (README: LPIPS weights)
      allow_random=False,  # random VGG trunk: smoke tests only, not a perceptual loss
  ))


_DISC_DEFAULTS = dict(
    # 'patchgan' (n_layers, ndf) or 'stylegan' (channel base / max).
    name="patchgan", n_layers=3, ndf=64,
    stylegan_channel_base=16384, stylegan_channel_max=512,
    # Losses ('hinge' | 'non_saturating' for each side); the step the
    # discriminator starts; LeCAM and R1 regularisers.
    d_loss="hinge", g_loss="non_saturating", average_patches_first=True, start=0,
    lecam=0.05, lecam_decay=0.999, r1=0.0,
    # taming's adaptive generator weight on `adaptive_layer`'s gradient norm, capped.
    adaptive=False, adaptive_layer="decoder/conv_out/kernel", adaptive_max=1e4,
    lr=1e-4, b1=0.5, b2=0.9,  # the discriminator's Adam
)


def disc_config(**values) -> ml_collections.ConfigDict:
  """The discriminator's fields (`config.disc`), WeTok's values unless given; a name that is
  not a field is refused, so two tokenizer configs cannot drift apart in their schema."""
  unknown = sorted(set(values) - set(_DISC_DEFAULTS))
  if unknown:
    raise ValueError(f"disc_config: {unknown} are not discriminator fields "
                     f"({sorted(_DISC_DEFAULTS)})")
  return ml_collections.ConfigDict({**_DISC_DEFAULTS, **values})


_ENUMS = {
    "optim.name": ("adam", "adamw", "sgd"),
    "optim.schedule": ("constant", "cosine"),
    "model.dtype": ("float32", "bfloat16"),
    "teacher.dtype": ("float32", "bfloat16"),
    "task": ("tokenizer", "lm", "mllm", "class_to_image"),
}
_POSITIVE = ("train.steps", "train.batch_size", "train.log_every", "train.image_every",
             "train.checkpoint_every", "train.keep_checkpoints", "train.eval_every",
             "optim.lr", "eval.num_images", "eval.batch_size")
_NON_NEGATIVE = ("train.eval_num_images", "train.grid_images",
                 "optim.warmup_steps", "optim.grad_clip", "optim.weight_decay")


def load_config_module(path: str):
  """The config file at `path` (as given, else relative to the repository root) as a module,
  so tests, benchmarks and notebooks find the configs from any working directory."""
  if not os.path.exists(path):
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), path)
  module_spec = importlib.util.spec_from_file_location("unimm_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module


def load_config(spec: str) -> ml_collections.ConfigDict:
  """'configs/uniwetok.py:tiny,demo' -> that file's get_config('tiny,demo')."""
  path, _, arg = spec.partition(":")
  return load_config_module(path).get_config(arg)


def _get(config: ml_collections.ConfigDict, dotted: str) -> Any:
  node = config
  for part in dotted.split("."):
    node = node[part]
  return node


def _has(config: ml_collections.ConfigDict, dotted: str) -> bool:
  try:
    _get(config, dotted)
    return True
  except (KeyError, AttributeError):
    return False


def _uses_teacher(config: ml_collections.ConfigDict, field: str = "teacher") -> bool:
  """Whether a loss term of `config` reads `config.<field>` (a teacher)."""
  return any(_has(config, f"loss.{term}") and config.loss[term]
             for term in _TEACHER_LOSSES[field])


# The teachers' config fields and the config.loss terms that read each (UniWeTok's
# distillation, EvoTok's alignment, MingTok's masked feature prediction).
_TEACHER_LOSSES = {
    "teacher": ("pre_distill", "post_distill", "semantic", "semantic_fold",
                "latent_prediction"),
    "semantic_teacher": ("semantic_prediction",),
}


def _validate_teachers(config: ml_collections.ConfigDict) -> None:
  """A teacher's feature is well formed, a loss that reads a teacher has its path, and a
  path no loss reads is refused (a silently unused teacher would look like distillation)."""
  for field, terms in _TEACHER_LOSSES.items():
    if not _has(config, f"{field}.path"):
      continue
    teacher = config[field]
    if not re.fullmatch(r"pooled|last|hidden:-?\d+", teacher.feature):
      raise ValueError(f"config.{field}.feature={teacher.feature!r} is not 'pooled', 'last' "
                       "or 'hidden:K'")
    if _uses_teacher(config, field) and not teacher.path:
      on = [t for t in terms if _has(config, f"loss.{t}") and config.loss[t]]
      raise ValueError(f"config.loss.{' / '.join(on)} need a teacher: set "
                       f"config.{field}.path to a SigLIP/SigLIP2/DINOv2/CLIP checkpoint "
                       "directory (README: Pretrained ViTs and teachers)")
    if teacher.path and not _uses_teacher(config, field):
      raise ValueError(f"config.{field}.path={teacher.path!r} is set, but no loss of this "
                       f"config uses a teacher there ({' / '.join(terms)}); clear it (a "
                       "silently unused teacher would look like distillation)")


def sharding_rules(config: ml_collections.ConfigDict) -> tuple:
  """The logical-axis rules of a run: config.sharding_rules, else the config.sharding set."""
  return rule_sets.resolve(config.sharding, config.sharding_rules)


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the first bad key of `config`."""
  for key, allowed in _ENUMS.items():
    if _has(config, key) and _get(config, key) not in allowed:
      raise ValueError(f"config.{key}={_get(config, key)!r} is not one of {allowed}")
  for key in _POSITIVE:
    if _has(config, key) and not _get(config, key) > 0:
      raise ValueError(f"config.{key}={_get(config, key)!r} must be > 0")
  for key in _NON_NEGATIVE:
    if _has(config, key) and _get(config, key) < 0:
      raise ValueError(f"config.{key}={_get(config, key)!r} must be >= 0")
  if _has(config, "ema_decay") and not 0.0 <= config.ema_decay < 1.0:
    raise ValueError(f"config.ema_decay={config.ema_decay!r} must be in [0, 1)")
  if _has(config, "optim") and config.optim.name != "adamw" and config.optim.weight_decay:
    raise ValueError("config.optim.weight_decay needs config.optim.name='adamw' "
                     f"({config.optim.name} has no decoupled weight decay)")
  sizes = [config.mesh[a] for a in ("data", "fsdp", "tensor")]
  if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f"config.mesh={dict(config.mesh)} needs positive sizes and at most one -1")
  for rule in config.sharding_rules:
    if len(rule) != 2:
      raise ValueError(f"config.sharding_rules entry {rule!r} is not (logical, mesh_axes)")
  rule_sets.check_mesh(sharding_rules(config), dict(config.mesh),
                       "explicit rules" if config.sharding_rules else config.sharding)
  validate_data = {"lm": text_data_config.validate_text_data_config,
                   "mllm": mllm_data_config.validate_mllm_data_config}.get(
                       config.task, data_config.validate_data_config)
  try:
    validate_data(config.data)
  except ValueError as e:  # name the key as it is spelled on the command line
    raise ValueError(str(e).replace("data_config", "config.data", 1)) from None
  if (_has(config, "loss.perceptual") and config.loss.perceptual
      and not (config.lpips.path or config.lpips.allow_random)):
    raise ValueError(
        f"config.loss.perceptual={config.loss.perceptual} needs LPIPS weights: set "
        "config.lpips.path to a safetensors file (README: LPIPS weights), or "
        "config.loss.perceptual=0, or config.lpips.allow_random=True for a smoke test")
  _validate_teachers(config)
  if _has(config, "model.ch_mult"):
    factor = 2 ** (len(config.model.ch_mult) - 1)
    if config.data.image_size % factor:
      raise ValueError(f"config.data.image_size={config.data.image_size} is not a multiple "
                       f"of the downsampling factor {factor} (model.ch_mult)")


def scene_marker_tokens(tokenizer: str) -> tuple[ml_collections.ConfigDict, int]:
  """(config.tokens, vocabulary size) of a unified system whose image tokens are not
  vocabulary ids, on a built-in scene word tokenizer (`tokenizer`: 'scene_words' or
  'scene_edit_words'): its pad, bos, eos, then BOI and EOI after its words."""
  words = text_tokenizer.load_tokenizer(tokenizer)
  return ml_collections.ConfigDict(dict(
      pad=words.pad_id, bos=words.bos_id, eos=words.eos_id, boi=words.vocab_size,
      eoi=words.vocab_size + 1)), words.vocab_size + 2
