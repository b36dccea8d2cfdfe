"""Configs build and validate; the mesh and logical shardings follow config."""
import flax.linen as nn
import jax
from jax.sharding import PartitionSpec as P
import ml_collections
import numpy as np
import pytest

from unimm_jax import config_defaults
from unimm_jax.parallel import mesh as mesh_lib
from unimm_jax.parallel import sharding


def load_config(variant):
  return config_defaults.load_config(f"configs/uniwetok.py:{variant}")


@pytest.mark.parametrize("variant", ["tiny", "demo", "tiny,gan", "demo,gan"])
def test_variants_validate(variant):
  config_defaults.validate(load_config(variant))


def test_paper_variant_needs_lpips_weights():
  config = load_config("paper")
  with pytest.raises(ValueError, match=r"config\.lpips\.path"):
    config_defaults.validate(config)
  config.lpips.path = "/weights/lpips_vgg.safetensors"
  config_defaults.validate(config)


def test_paper_variant_is_the_appendix_configuration():
  c = load_config("paper")
  assert c.data.image_size == 256
  assert (c.model.ch, tuple(c.model.ch_mult), c.model.num_res_blocks) == (
      128, (1, 1, 2, 2, 4, 8), 2)
  assert c.model.num_attn_blocks == 16
  assert (c.model.groups, c.model.group_bits) == (16, 8)
  assert (c.optim.name, c.optim.lr, c.optim.b1, c.optim.b2) == ("adam", 1e-4, 0.5, 0.9)
  assert c.optim.weight_decay == 0 and c.optim.warmup_steps == 0
  assert c.ema_decay > 0 and c.train.batch_size == 128
  # WeTok's loss weights and discriminator (SPECS 1).
  assert (c.loss.l1, c.loss.perceptual, c.loss.gan, c.loss.entropy) == (1.0, 1.0, 0.1, 0.1)
  assert (c.disc.name, c.disc.n_layers, c.disc.ndf) == ("patchgan", 3, 64)
  assert (c.disc.d_loss, c.disc.g_loss, c.disc.start) == ("hinge", "non_saturating", 0)
  assert (c.disc.lecam, c.disc.lecam_decay, c.disc.adaptive) == (0.05, 0.999, False)


def test_unknown_variant_is_named():
  with pytest.raises(ValueError, match="huge"):
    load_config("huge")


@pytest.mark.parametrize("key,value,needle", [
    ("data.resize_mode", "stretch", "config.data.resize_mode"),
    ("train.batch_size", 0, "config.train.batch_size"),
    ("ema_decay", 1.0, "config.ema_decay"),
    ("optim.weight_decay", 0.1, "config.optim.weight_decay"),
    ("data.image_size", 30, "config.data.image_size"),
])
def test_validate_names_the_bad_key(key, value, needle):
  config = load_config("tiny")
  node = config
  *parents, leaf = key.split(".")
  for p in parents:
    node = node[p]
  node[leaf] = value
  with pytest.raises(ValueError, match=needle.replace(".", r"\.")):
    config_defaults.validate(config)


def test_mesh_shape_fills_minus_one():
  cfg = ml_collections.ConfigDict(dict(data=-1, fsdp=2, tensor=1))
  assert mesh_lib.mesh_shape(cfg, 8) == (4, 2, 1)
  with pytest.raises(ValueError, match="config.mesh"):
    mesh_lib.mesh_shape(ml_collections.ConfigDict(dict(data=3, fsdp=1, tensor=1)), 8)


def test_spec_for_replicates_indivisible_dims():
  mesh = jax.sharding.AbstractMesh((2, 2, 2), mesh_lib.MESH_AXES)
  rules = config_defaults.DEFAULT_SHARDING_RULES
  assert sharding.spec_for((3, 3, 64, 128), (None, None, "conv_in", "conv_out"), mesh,
                           rules) == P(None, None, None, "fsdp")
  assert sharding.spec_for((3, 3, 64, 3), (None, None, "conv_in", "conv_out"), mesh,
                           rules) == P(None, None, None, None)
  assert sharding.spec_for((64, 256), ("embed", "mlp"), mesh, rules) == P("fsdp", "tensor")
  # A mesh axis is used once per array even if two logical names map to it.
  assert sharding.spec_for((64, 64), ("embed", "embed"), mesh, rules) == P("fsdp", None)


def test_tree_shardings_reads_partitioned_names():
  mesh = mesh_lib.make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1)))
  tree = {"w": nn.Partitioned(jax.ShapeDtypeStruct((4, 8), np.float32), ("embed", "mlp")),
          "b": jax.ShapeDtypeStruct((8,), np.float32)}
  out = sharding.tree_shardings(tree, mesh, config_defaults.DEFAULT_SHARDING_RULES)
  assert set(out) == {"w", "b"}
  assert out["b"].spec == P(None)


def test_teacher_config_values_are_checked():
  config = config_defaults.load_config("configs/uniwetok.py:tiny")
  assert config.teacher.path == "" and config.teacher.feature == "pooled"
  config.teacher.feature = "hidden:-2"
  config_defaults.validate(config)
  config.teacher.feature = "penultimate"
  with pytest.raises(ValueError, match="config.teacher.feature"):
    config_defaults.validate(config)
  config.teacher.feature, config.teacher.dtype = "last", "float16"
  with pytest.raises(ValueError, match="config.teacher.dtype"):
    config_defaults.validate(config)
  config.teacher.dtype, config.teacher.path = "bfloat16", "/ckpt/siglip2"
  with pytest.raises(ValueError, match="no loss of this config uses a teacher"):
    config_defaults.validate(config)
