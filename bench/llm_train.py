"""Train-step throughput of the LM task on the shared trainer, and its achieved FLOP/s.

Measures, in one process on whatever backend JAX picks:
  * the peak of a square float32 GEMM (the roof we compare against),
  * tokens/s and ms/step of the trainer's jitted, donated LM train step (forward, backward,
    grad clipping, AdamW) on a synthetic packed batch (random tokens, one full-length
    document per row), compilation excluded; median over --steps steps after a warm-up,
  * achieved FLOP/s = XLA's cost-analysis FLOPs of the compiled step / seconds per step,
  * unless --skip_torch: the same step in PyTorch for a ratio: transformers'
    LlamaForCausalLM of the same shapes (Llama's `attention_bias` follows the config's
    qkv_bias, which Qwen2's fixed biases would not), masked mean CE, backward, grad-norm
    clipping and torch.optim.AdamW, float32.

Run it on an otherwise idle machine: PyTorch's OpenMP threads slow down several-fold when
other processes share the cores, XLA's thread pool much less, which skews the ratio.

The config is configs/lm.py:demo unless --config says otherwise; --preset qwen2_55m swaps in
the model of bench/llm_decode.py (hidden 512, 8 layers, 8/2 heads, MLP 1408, vocab 32000).

  python bench/llm_train.py [--config configs/lm.py:demo] [--batch_size 16] [--seq_len 128]
  python bench/llm_train.py --preset qwen2_55m --batch_size 4 --seq_len 256 --steps 3
"""
import argparse
import statistics
import time

import jax
import numpy as np
import torch
import transformers

from common import compiled_flops, default_gemm_size, peak_gemm_flops
from unimm_jax import config_defaults
from unimm_jax.train import trainer

PRESETS = {
    "none": {},
    "qwen2_55m": dict(hidden_size=512, intermediate_size=1408, num_layers=8, num_heads=8,
                      num_kv_heads=2, vocab_size=32000, qkv_bias=True,
                      tie_word_embeddings=False),
}


def synthetic_batch(batch: int, seq_len: int, vocab: int) -> dict:
  """Packed rows of the LM task's shapes, each row one document filling it."""
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, vocab, (batch, seq_len + 1)).astype(np.int32)
  loss_mask = np.ones((batch, seq_len), np.int32)
  loss_mask[:, -1] = 0  # a segment's last token has no next token in the row
  return dict(tokens=tokens[:, :-1], targets=tokens[:, 1:],
              positions=np.broadcast_to(np.arange(seq_len, dtype=np.int32), (batch, seq_len)),
              segment_ids=np.ones((batch, seq_len), np.int32), loss_mask=loss_mask)


def median_step_seconds(step, steps: int) -> float:
  """Median wall time of `steps` calls of step(), which must block; medians resist the
  occasional step slowed by another process on a shared machine."""
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    step()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def bench_ours(config, host_batch: dict, steps: int) -> dict:
  """Compiles the trainer's train step once and times `steps` calls after a warm-up."""
  setup = trainer.Setup(config)
  state = setup.init_state()
  batch = setup.global_batch(host_batch)
  with setup.activate():
    compiled = setup.compile_train_step().lower(
        state, setup.frozen, batch, setup.train_rng).compile()
  holder = {"state": state}

  def step():
    # The state is donated, so each call must get the previous call's output.
    holder["state"], metrics = compiled(holder["state"], setup.frozen, batch, setup.train_rng)
    jax.block_until_ready((holder["state"], metrics))

  step()  # warm-up
  seconds = median_step_seconds(step, steps)
  params = sum(x.size for x in jax.tree.leaves(holder["state"].params))
  return dict(seconds=seconds, flops=compiled_flops(compiled), params=params,
              model=setup.task.model.config)


def bench_torch(c, config, host_batch: dict, steps: int) -> float:
  """Seconds per step of the same model, loss and optimiser in PyTorch (see the docstring)."""
  hf_config = transformers.LlamaConfig(
      vocab_size=c.vocab_size, hidden_size=c.hidden_size,
      intermediate_size=c.intermediate_size, num_hidden_layers=c.num_layers,
      num_attention_heads=c.num_heads, num_key_value_heads=c.num_kv_heads, head_dim=c.head_dim,
      attention_bias=c.qkv_bias, rms_norm_eps=c.rms_norm_eps,
      rope_parameters=dict(rope_type="default", rope_theta=c.rope_theta),
      tie_word_embeddings=c.tie_word_embeddings, max_position_embeddings=4096,
      bos_token_id=None, eos_token_id=None, pad_token_id=None)
  torch.manual_seed(0)
  model = transformers.LlamaForCausalLM(hf_config).train()
  o = config.optim
  optimizer = torch.optim.AdamW(model.parameters(), lr=o.lr, betas=(o.b1, o.b2),
                                weight_decay=o.weight_decay)
  tokens, targets, positions, mask = (torch.from_numpy(np.ascontiguousarray(host_batch[k]))
                                      for k in ("tokens", "targets", "positions", "loss_mask"))
  mask = mask.float()

  def step():
    # One document per row, so plain causal attention is the packed mask.
    logits = model(tokens, position_ids=positions).logits
    ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten().long(),
                                           reduction="none")
    loss = (ce * mask.flatten()).sum() / mask.sum()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if o.grad_clip > 0:
      torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
    optimizer.step()

  step()  # warm-up: allocates the optimiser state
  return median_step_seconds(step, steps)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default="configs/lm.py:demo")
  parser.add_argument("--preset", default="none", choices=sorted(PRESETS),
                      help="model size replacing the config's")
  parser.add_argument("--batch_size", type=int, default=0, help="0: the config's")
  parser.add_argument("--seq_len", type=int, default=0, help="0: the config's")
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--skip_torch", action="store_true")
  parser.add_argument("--gemm_n", type=int, default=0, help="0: 2048 on CPU, 8192 else")
  args = parser.parse_args()

  config = config_defaults.load_config(args.config)
  config.model.update(PRESETS[args.preset])
  config.train.batch_size = args.batch_size or config.train.batch_size
  config.data.seq_len = args.seq_len or config.data.seq_len

  n = args.gemm_n or default_gemm_size()
  peak = peak_gemm_flops(n)
  print(f"backend {jax.default_backend()} ({jax.device_count()} device(s): "
        f"{jax.devices()[0].device_kind})")
  print(f"peak float32 GEMM {n}x{n}: {peak / 1e9:.1f} GFLOP/s")

  batch, seq_len = config.train.batch_size, config.data.seq_len
  tokens = batch * seq_len
  host_batch = synthetic_batch(batch, seq_len, vocab=256)  # byte ids fit any vocabulary
  r = bench_ours(config, host_batch, args.steps)
  c = r["model"]
  # The input embedding is a gather, not a matmul, unless it is also the (tied) LM head.
  matmul_params = r["params"] - (0 if c.tie_word_embeddings else c.vocab_size * c.hidden_size)
  print(f"{args.config} preset {args.preset}: hidden {c.hidden_size}, {c.num_layers} layers, "
        f"{c.num_heads}/{c.num_kv_heads} heads, mlp {c.intermediate_size}, vocab "
        f"{c.vocab_size}, {r['params'] / 1e6:.2f}M params, {np.dtype(c.dtype).name}; "
        f"batch {batch} x {seq_len} = {tokens} tokens/step")
  print(f"ours: {r['seconds'] * 1e3:.0f} ms/step, {tokens / r['seconds']:.0f} tokens/s, "
        f"{r['flops'] / 1e9:.1f} GFLOP/step (XLA; 6 x matmul params x tokens = "
        f"{6 * matmul_params * tokens / 1e9:.1f}), {r['flops'] / r['seconds'] / 1e9:.1f} GFLOP/s "
        f"= {100 * r['flops'] / r['seconds'] / peak:.1f}% of peak GEMM")
  if not args.skip_torch:
    theirs = bench_torch(c, config, host_batch, args.steps)
    print(f"PyTorch (transformers Llama, AdamW): {theirs * 1e3:.0f} ms/step, "
          f"{tokens / theirs:.0f} tokens/s; ours/theirs tokens/s = {theirs / r['seconds']:.2f}")


if __name__ == "__main__":
  main()
