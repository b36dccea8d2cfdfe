"""`--mode=plan`: FLOPs counted on the jaxpr against closed forms, and the plan of a tiny LM
on 8 fake devices (parameters, per-device state, FLOPs) against hand-computed values."""
import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from conftest import REPO, main_command, subprocess_env
from unimm_jax.train import plan

pytestmark = pytest.mark.e2e


def test_jaxpr_flops_of_matmul_conv_scan_and_grad():
  a, b = jnp.ones((16, 32)), jnp.ones((32, 8))
  assert plan.jaxpr_flops(jax.make_jaxpr(jnp.matmul)(a, b).jaxpr) == 2 * 16 * 32 * 8
  x, k = jnp.ones((2, 8, 8, 3)), jnp.ones((3, 3, 3, 4))
  conv = lambda x, k: jax.lax.conv_general_dilated(  # pylint: disable=g-long-lambda
      x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
  assert plan.jaxpr_flops(jax.make_jaxpr(conv)(x, k).jaxpr) == 2 * (2 * 8 * 8 * 4) * (3 * 3 * 3)
  ws = jnp.ones((10, 32, 32))
  stack = lambda h, ws: jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), h, ws)[0]
  h = jnp.ones((16, 32))
  forward = 10 * 2 * 16 * 32 * 32
  assert plan.jaxpr_flops(jax.make_jaxpr(stack)(h, ws).jaxpr) == forward
  # Backward: the gradients of the activations and of the weights, one matmul each.
  grad = jax.grad(lambda ws: stack(h, ws).sum())
  assert plan.jaxpr_flops(jax.make_jaxpr(grad)(ws).jaxpr) == 3 * forward


_PLAN_SCRIPT = r'''
import dataclasses, json, sys
from unimm_jax import config_defaults
from unimm_jax.train import plan
plan.use_fake_devices(8)
config = config_defaults.load_config_module("configs/lm.py").get_config("tiny")
config.mesh.data, config.mesh.fsdp = 2, 4
print(json.dumps(dataclasses.asdict(plan.plan_train_step(config))))
config.model.scan_layers = config.model.remat = True
print(json.dumps(plan.plan_train_step(config).buckets[0].flops_global))
'''


def test_tiny_lm_plan_on_eight_fake_devices():
  proc = subprocess.run([sys.executable, "-c", _PLAN_SCRIPT], cwd=REPO, env=subprocess_env(1),
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-4000:]
  result, remat_flops = map(json.loads, proc.stdout.strip().splitlines()[-2:])
  # configs/lm.py:tiny: byte vocab 261, hidden 32, 2 layers, 4 heads of 8 (2 kv heads),
  # MLP 64, tied head, 8 rows of 64 tokens.
  vocab, d, layers, kv_width, mlp, seq, batch = 261, 32, 2, 16, 64, 64, 8
  per_layer = d * d + 2 * d * kv_width + d * d + 3 * d * mlp  # q, k, v, o, gate/up/down
  params = vocab * d + layers * (per_layer + 2 * d) + d
  assert result["param_counts"] == {"params": params, "module_params": 0, "discriminator": 0,
                                    "frozen": 0}
  # float32 params and Adam's two moments, no EMA (ema_decay 0), a few int32 counters;
  # every param has an embed axis, split 4 ways over fsdp.
  assert result["state_bytes_global"] - 3 * 4 * params in range(0, 64)
  assert result["state_bytes_per_device"] - 3 * 4 * params // 4 in range(0, 64)
  (bucket,) = result["buckets"]
  assert bucket["batch"]["tokens"] == [batch, seq]
  # Forward per token: 2 FLOPs per matmul weight (the tied head included) plus attention's
  # QK^T and AV over the whole row; backward twice that.
  matmul_weights = layers * per_layer + vocab * d
  forward_per_token = 2 * matmul_weights + layers * 2 * (2 * seq * d)
  assert bucket["flops_global"] == 3 * batch * seq * forward_per_token
  # Scanned and rematerialised layers: each layer's forward is run again in the backward
  # pass, all but its last projection (down_proj), whose output is the layer's saved output.
  recompute_per_token = layers * (2 * (per_layer - d * mlp) + 2 * (2 * seq * d))
  assert remat_flops == bucket["flops_global"] + batch * seq * recompute_per_token
  # The arguments hold this device's state and batch rows; the donated state is aliased to
  # the new state among the outputs.
  assert bucket["argument_bytes"] >= result["state_bytes_per_device"]
  assert 0 < bucket["alias_bytes"] <= bucket["output_bytes"]
  assert bucket["temp_bytes"] > 0


def test_plan_mode_prints_the_report_and_names_a_missing_device_count():
  proc = subprocess.run(main_command(None, "--config.mesh.data=4", "--config.mesh.tensor=2",
                                     "--config.sharding=tensor", config="configs/lm.py:tiny",
                                     mode="plan"),
                        cwd=REPO, env=subprocess_env(1), capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0, proc.stderr[-4000:]
  assert "plan for configs/lm.py:tiny: 8 devices, mesh data 4 x fsdp 1 x tensor 2" in proc.stdout
  for needle in ("parameters: 26,944 model", "FLOPs per step:", "memory per device:"):
    assert needle in proc.stdout, proc.stdout
  proc = subprocess.run(main_command(None, config="configs/lm.py:tiny", mode="plan"), cwd=REPO,
                        env=subprocess_env(1), capture_output=True, text=True, timeout=300)
  assert proc.returncode != 0 and "give --plan_devices" in proc.stderr
