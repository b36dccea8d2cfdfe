"""LLM prefill and greedy-decode throughput, ours (JAX) against transformers (PyTorch), CPU.

One random Qwen2-architecture model is built by transformers (seeded, float32), written with
`save_pretrained` and imported with `load_pretrained`, so both sides run the same weights.
Measured in one process, best of --reps timings each (compilation excluded):
  * prefill tokens/s: one forward over (batch, --prompt_len) prompts with all logits
    returned; ours a jitted `model.apply`, theirs `model(input_ids)` under `torch.no_grad`;
  * generate tokens/s (end to end): batch x --new_tokens / the time of one whole greedy
    generate call after a --decode_prompt_len prompt; ours `sampling.generate`, theirs
    `model.generate(do_sample=False, min_new_tokens=N, max_new_tokens=N)` (no EOS, so both
    produce exactly N tokens);
  * decode tokens/s: the same without the prompt's forward and the first tokens: the
    difference of two generate calls, N and SHORT = 4 new tokens after the same prompt,
    batch x (N - SHORT) / (generate(N) - generate(SHORT)), so a long prompt's prefill time
    (and its noise) cancels;
  * how many leading greedy tokens agree (near-ties of a random model may flip a late token);
  * the float32 GEMM peak of the machine and our prefill's achieved FLOP/s (XLA's count).

Run it on an otherwise idle machine: PyTorch's OpenMP threads slow down several-fold when
other processes share the cores, XLA's thread pool much less, which skews the ratios.

  python bench/llm_decode.py [--batches 1,4] [--prompt_len 256] [--new_tokens 64]
      [--hidden 512 --layers 8 --heads 8 --kv_heads 2 --intermediate 1408 --vocab 32000]
"""
import argparse
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers

from common import compiled_flops, default_gemm_size, peak_gemm_flops
from unimm_jax.convert import load_pretrained
from unimm_jax.inference import sampling


def best_seconds(fn, reps: int) -> float:
  """Best wall time of `reps` calls of fn(), which must block until its result is ready."""
  best = float("inf")
  for _ in range(reps):
    start = time.perf_counter()
    fn()
    best = min(best, time.perf_counter() - start)
  return best


def build_checkpoint(args, path: str) -> transformers.Qwen2ForCausalLM:
  """A seeded random Qwen2 model, saved to `path`; no special tokens, so no EOS stops it."""
  config = transformers.Qwen2Config(
      vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
      num_hidden_layers=args.layers, num_attention_heads=args.heads,
      num_key_value_heads=args.kv_heads, max_position_embeddings=4096,
      # Wider than the default 0.02 so greedy picks are not decided by float32 rounding.
      initializer_range=args.init_std, tie_word_embeddings=False,
      bos_token_id=None, eos_token_id=None, pad_token_id=None)
  torch.manual_seed(0)
  model = transformers.Qwen2ForCausalLM(config).eval()
  model.save_pretrained(path)
  return model


def last_logits(module, input_ids):
  """The last position's logits only, as a generate call's prefill computes them."""
  return module.logits(module.hidden_states(input_ids)[:, -1:])


def bench_prefill(model, variables, hf_model, ids: np.ndarray, reps: int,
                  last_only: bool = False) -> dict:
  """Seconds of one forward over `ids` on each side (all or only the last position's
  logits), and our compiled FLOPs."""
  jax_ids = jnp.asarray(ids)
  forward = jax.jit(model.apply, static_argnames="method")
  method = last_logits if last_only else None
  compiled = forward.lower(variables, jax_ids, method=method).compile()
  compiled(variables, jax_ids).block_until_ready()
  ours = best_seconds(lambda: compiled(variables, jax_ids).block_until_ready(), reps)
  torch_ids = torch.from_numpy(ids)
  keep = 1 if last_only else 0  # transformers' logits_to_keep: 0 means every position
  with torch.no_grad():
    hf_model(torch_ids, logits_to_keep=keep)  # first call allocates; not what we time
    theirs = best_seconds(lambda: hf_model(torch_ids, logits_to_keep=keep), reps)
  return dict(ours=ours, theirs=theirs, flops=compiled_flops(compiled))


SHORT = 4  # new tokens of the generate call whose time is subtracted to isolate decoding


def bench_generate(model, params, hf_model, ids: np.ndarray, new_tokens: int,
                   reps: int) -> dict:
  """Seconds of a whole greedy generate call on each side, and both outputs (b, N)."""
  def run_ours():
    return np.asarray(sampling.generate(model, params, ids, new_tokens))

  torch_ids = torch.from_numpy(ids)

  def run_theirs():
    # pad_token_id only silences a warning; with no EOS nothing is ever padded.
    return hf_model.generate(
        torch_ids, attention_mask=torch.ones_like(torch_ids), do_sample=False,
        max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0)

  ours_tokens = run_ours()  # compiles
  ours = best_seconds(run_ours, reps)
  with torch.no_grad():
    theirs_tokens = run_theirs().numpy()[:, ids.shape[1]:]
    theirs = best_seconds(run_theirs, reps)
  return dict(ours=ours, theirs=theirs, ours_tokens=ours_tokens, theirs_tokens=theirs_tokens)


def matching_prefix(a: np.ndarray, b: np.ndarray) -> list[int]:
  """Per row, how many leading tokens of a and b agree."""
  differ = a != b
  return [int(np.argmax(row)) if row.any() else row.size for row in differ]


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--hidden", type=int, default=512)
  parser.add_argument("--layers", type=int, default=8)
  parser.add_argument("--heads", type=int, default=8)
  parser.add_argument("--kv_heads", type=int, default=2)
  parser.add_argument("--intermediate", type=int, default=1408)
  parser.add_argument("--vocab", type=int, default=32000)
  parser.add_argument("--init_std", type=float, default=0.1)
  parser.add_argument("--batches", default="1,4", help="comma-separated batch sizes")
  parser.add_argument("--prompt_len", type=int, default=256, help="prefill prompt length")
  parser.add_argument("--decode_prompt_len", type=int, default=16)
  parser.add_argument("--new_tokens", type=int, default=64)
  parser.add_argument("--reps", type=int, default=3)
  parser.add_argument("--gemm_n", type=int, default=0, help="0: 2048 on CPU, 8192 else")
  args = parser.parse_args()
  batches = [int(b) for b in args.batches.split(",")]

  n = args.gemm_n or default_gemm_size()
  peak = peak_gemm_flops(n)
  print(f"backend {jax.default_backend()} ({jax.devices()[0].device_kind}), "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"transformers {transformers.__version__}")
  print(f"peak float32 GEMM {n}x{n} (JAX): {peak / 1e9:.1f} GFLOP/s")

  transformers.utils.logging.disable_progress_bar()  # save_pretrained's bar in the output
  with tempfile.TemporaryDirectory() as path:
    hf_model = build_checkpoint(args, path)
    model, variables = load_pretrained(path)
  num_params = sum(p.numel() for p in hf_model.parameters())
  print(f"Qwen2 random model: hidden {args.hidden}, {args.layers} layers, "
        f"{args.heads}/{args.kv_heads} heads, mlp {args.intermediate}, vocab {args.vocab}: "
        f"{num_params / 1e6:.1f}M params, float32")

  rng = np.random.default_rng(0)
  rows = []  # (metric, ours, theirs) with bigger = better
  notes = []
  for batch in batches:
    ids = rng.integers(0, args.vocab, (batch, args.prompt_len)).astype(np.int32)
    r = bench_prefill(model, variables, hf_model, ids, args.reps)
    tokens = batch * args.prompt_len
    rows.append((f"prefill tokens/s  b={batch} s={args.prompt_len}",
                 tokens / r["ours"], tokens / r["theirs"]))
    notes.append(f"prefill b={batch}: ours {r['flops'] / 1e9:.1f} GFLOP (XLA) in "
                 f"{r['ours'] * 1e3:.0f} ms = {r['flops'] / r['ours'] / 1e9:.1f} GFLOP/s = "
                 f"{100 * r['flops'] / r['ours'] / peak:.1f}% of peak GEMM; "
                 f"transformers {r['theirs'] * 1e3:.0f} ms")

  new = args.new_tokens
  for batch in batches:
    ids = rng.integers(0, args.vocab, (batch, args.decode_prompt_len)).astype(np.int32)
    short = bench_generate(model, variables["params"], hf_model, ids, SHORT, args.reps)
    g = bench_generate(model, variables["params"], hf_model, ids, new, args.reps)
    rows.append((f"generate tokens/s b={batch} N={new} (end to end)",
                 batch * new / g["ours"], batch * new / g["theirs"]))
    step = {side: (g[side] - short[side]) / (new - SHORT) for side in ("ours", "theirs")}
    rows.append((f"decode tokens/s   b={batch} (prompt excluded)",
                 batch / step["ours"], batch / step["theirs"]))
    same = matching_prefix(g["ours_tokens"], g["theirs_tokens"])
    notes.append(f"greedy b={batch}: leading tokens equal per row {same} of {new} "
                 f"({'identical' if min(same) == new else 'diverged'}); per decode step "
                 f"ours {step['ours'] * 1e3:.1f} ms, transformers {step['theirs'] * 1e3:.1f} ms")

  width = max(len(r[0]) for r in rows)
  print(f"\n{'metric':<{width}}  {'ours':>10}  {'transformers':>12}  {'ours/theirs':>11}")
  for metric, ours, theirs in rows:
    print(f"{metric:<{width}}  {ours:>10.1f}  {theirs:>12.1f}  {ours / theirs:>11.2f}")
  print()
  for note in notes:
    print(note)


if __name__ == "__main__":
  main()
