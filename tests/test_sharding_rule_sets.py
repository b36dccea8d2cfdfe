"""Each rule set of config.sharding places a tiny LLM, UniWeTok and ViT as intended on 8 fake
devices and computes the same loss.

The LLM runs the whole trainer path (Setup shards the state by config.sharding, one train
step); UniWeTok's conv and attention stacks and the ViT run a forward and backward pass of
the same params placed by each rule set. One subprocess holds the 8 devices and runs every
(model, rule set) pair; it prints one JSON line per pair with the per-device shapes of a
few parameters and of one Adam moment (UniWeTok, ViT: of one gradient) and the loss.
"""
import json
import subprocess
import sys

import pytest

from conftest import REPO, subprocess_env

pytestmark = pytest.mark.e2e

# (rule set, mesh data/fsdp/tensor) on 8 devices.
MESHES = {"data_parallel": (8, 1, 1), "fsdp": (2, 4, 1), "tensor": (4, 1, 2),
          "fsdp_tensor": (2, 2, 2)}

_SCRIPT = r'''
import json, sys
import jax, numpy as np
import flax.linen as nn
from unimm_jax import config_defaults
from unimm_jax.models import vit
from unimm_jax.parallel import mesh as mesh_lib, sharding
from unimm_jax.train import tasks, trainer

MESHES = json.loads(sys.argv[1])
PARAMS = {
    "lm": ["['layers_0']['self_attn']['q_proj']['kernel']",
           "['layers_0']['mlp']['down_proj']['kernel']"],
    "uniwetok": ["['encoder']['down_1_block_0']['conv1']['kernel']",
                 "['encoder']['mid_attn']['stack']['blocks_0']['attention']['query']",
                 "['encoder']['mid_attn']['stack']['blocks_0']['feed_forward']['w2']['kernel']"],
    "vit": ["['layers_0']['attention']['query']", "['layers_0']['mlp']['fc2']['kernel']"],
}

def local_shapes(tree):
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {jax.tree_util.keystr(p): list(a.addressable_shards[0].data.shape) for p, a in flat}

def tiny_config(config_file, set_name, sizes):
  config = config_defaults.load_config_module(config_file).get_config("tiny")
  config.sharding = set_name
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = sizes
  return config

def lm_train_step(set_name, sizes):
  # The whole trainer path: Setup shards the state by config.sharding, one train step.
  config = tiny_config("configs/lm.py", set_name, sizes)
  setup = trainer.Setup(config)
  state = setup.init_state()
  rng = np.random.default_rng(0)
  b, s = config.train.batch_size, config.data.seq_len
  tokens = rng.integers(3, 200, (b, s)).astype(np.int32)
  host = {"tokens": tokens, "targets": np.roll(tokens, -1, 1),
          "positions": np.broadcast_to(np.arange(s, dtype=np.int32), (b, s)).copy(),
          "segment_ids": np.ones((b, s), np.int32), "loss_mask": np.ones((b, s), np.float32)}
  params = local_shapes(state.params)
  moments = local_shapes(state.opt_state)
  adam_mu = [v for k, v in moments.items() if PARAMS["lm"][0] in k and ".mu" in k]
  with setup.activate():
    _, metrics = setup.compile_train_step()(state, setup.frozen, setup.global_batch(host),
                                            setup.train_rng)
  return {p: params[p] for p in PARAMS["lm"]}, adam_mu[0], float(metrics["loss"])

def forward_backward(name, boxed, host_params, loss_fn, x, set_name, sizes):
  # The same params placed by the rule set; loss and gradients of one batch. Only the
  # mesh and sharding fields of a config matter here.
  config = config_defaults.base_config()
  config.sharding = set_name
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = sizes
  mesh = mesh_lib.make_mesh(config.mesh)
  rules = config_defaults.sharding_rules(config)
  shardings = sharding.tree_shardings(boxed, mesh, rules)
  params = jax.device_put(host_params, shardings)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    x = jax.device_put(x, sharding.batch_sharding(mesh, rules, 4))
    value, grads = jax.jit(jax.value_and_grad(loss_fn), out_shardings=(None, shardings))(
        params, x)
  shapes, grad_shapes = local_shapes(params), local_shapes(grads)
  return {p: shapes[p] for p in PARAMS[name]}, grad_shapes[PARAMS[name][0]], float(value)

images = np.random.default_rng(1).uniform(-1, 1, (8, 32, 32, 3)).astype(np.float32)
tokenizer = tasks.build_task(tiny_config("configs/uniwetok.py", "fsdp_tensor", (-1, 1, 1))).model
def tokenizer_init():
  return tokenizer.init(jax.random.key(0), images[:1], train=False)["params"]
tok_boxed = jax.eval_shape(tokenizer_init)
tok_params = jax.device_get(jax.jit(lambda: nn.unbox(tokenizer_init()))())
def tokenizer_loss(p, x):
  out = tokenizer.apply({"params": p}, x, train=False, rngs={"noise": jax.random.key(1)})
  return abs(out.recon - x).mean()

vit_model = vit.VisionTransformer(vit.ViTConfig(family="siglip", hidden_size=32, num_layers=2,
                                                num_heads=4, mlp_dim=64, patch_size=4,
                                                image_size=16))
vit_boxed = jax.eval_shape(vit_model.init, jax.random.key(0), images[:1, :16, :16])["params"]
vit_params = jax.device_get(jax.jit(
    lambda: nn.unbox(vit_model.init(jax.random.key(0), images[:1, :16, :16]))["params"])())
def vit_loss(p, x):
  return (vit_model.apply({"params": p}, x)["pooler_output"] ** 2).mean()

for set_name, sizes in MESHES.items():
  runs = {"lm": lm_train_step(set_name, sizes),
          "uniwetok": forward_backward("uniwetok", tok_boxed, tok_params, tokenizer_loss,
                                       images, set_name, sizes),
          "vit": forward_backward("vit", vit_boxed, vit_params, vit_loss, images[:, :16, :16],
                                  set_name, sizes)}
  for name, (shapes, moment, loss) in runs.items():
    print(json.dumps(dict(model=name, rules=set_name, shapes=shapes, moment=moment, loss=loss)))
'''

# Per-device shapes each rule set is meant to give (global shapes in the data_parallel row).
EXPECTED = {
    "lm": {  # q_proj (embed, heads, kv); down_proj (mlp, embed)
        "data_parallel": [[32, 4, 8], [64, 32]],
        "fsdp": [[8, 4, 8], [64, 8]],  # embed over fsdp 4
        "tensor": [[32, 2, 8], [32, 32]],  # heads and mlp over tensor 2
        "fsdp_tensor": [[16, 2, 8], [32, 16]],
    },
    "uniwetok": {  # conv (kh, kw, conv_in, conv_out); query (embed, heads, kv); w2 (mlp, embed)
        "data_parallel": [[3, 3, 32, 32], [32, 2, 16], [256, 32]],
        "fsdp": [[3, 3, 32, 8], [8, 2, 16], [256, 8]],
        "tensor": [[3, 3, 32, 16], [32, 1, 16], [128, 32]],  # conv output channels over tensor
        "fsdp_tensor": [[3, 3, 32, 16], [16, 1, 16], [128, 16]],
    },
    "vit": {  # query (embed, heads, kv); fc2 (mlp, embed)
        "data_parallel": [[32, 4, 8], [64, 32]],
        "fsdp": [[8, 4, 8], [64, 8]],
        "tensor": [[32, 2, 8], [32, 32]],
        "fsdp_tensor": [[16, 2, 8], [32, 16]],
    },
}


@pytest.fixture(scope="module")
def runs():
  proc = subprocess.run([sys.executable, "-c", _SCRIPT, json.dumps(MESHES)], cwd=REPO,
                        env=subprocess_env(8), capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-6000:]
  out = {}
  for line in proc.stdout.splitlines():
    if line.startswith("{"):
      record = json.loads(line)
      out[record["model"], record["rules"]] = record
  return out


@pytest.mark.parametrize("model", ["lm", "uniwetok", "vit"])
@pytest.mark.parametrize("rules", list(MESHES))
def test_rule_set_gives_intended_per_device_shapes(runs, model, rules):
  record = runs[model, rules]
  assert list(record["shapes"].values()) == EXPECTED[model][rules]
  # The optimiser state (LM: Adam's first moment) or gradient is split like its param.
  assert record["moment"] == EXPECTED[model][rules][0]


@pytest.mark.parametrize("model", ["lm", "uniwetok", "vit"])
def test_every_rule_set_gives_the_same_loss(runs, model):
  reference = runs[model, "data_parallel"]["loss"]
  for rules in MESHES:
    assert runs[model, rules]["loss"] == pytest.approx(reference, rel=2e-5), rules


def test_a_rule_set_that_leaves_a_mesh_axis_idle_is_refused():
  from unimm_jax import config_defaults
  config = config_defaults.load_config_module("configs/lm.py").get_config("tiny")
  config.sharding = "fsdp"
  config.mesh.data, config.mesh.tensor = 4, 2
  with pytest.raises(ValueError, match="does not use mesh axis 'tensor'"):
    config_defaults.validate(config)
  config.sharding = "pipeline"
  with pytest.raises(ValueError, match="config.sharding='pipeline' is not one of"):
    config_defaults.validate(config)
