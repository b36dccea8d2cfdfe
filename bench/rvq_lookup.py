"""Residual VQ lookup throughput: our jitted `nearest_codes` against vector-quantize-pytorch.

Measures, in one process, at EvoTok's size (16 levels x 32768 codes x 32 dims) over 2048
tokens, both sides with the same random N(0, 1) codebooks and the same N(0, 1) inputs:
  * the peak of a square float32 GEMM (the roof we compare against),
  * tokens/s of `jax.jit(nearest_codes)` and its achieved FLOP/s (the distance matmuls,
    2 n K d per level, counted analytically: XLA's cost analysis, printed beside it, does
    not look into the scan over code blocks),
  * tokens/s of vector-quantize-pytorch's `ResidualVQ(dim=32, num_quantizers=16,
    codebook_size=32768)` in eval mode under torch.no_grad, timed the same way,
  * whether the two agree on the codes, the ratio ours / peer and the fraction of peak.

  python bench/rvq_lookup.py [--tokens 2048] [--reps 3] [--peer_reps 2]
"""
import argparse
import timeit

import jax
import jax.numpy as jnp
import numpy as np

from common import compiled_flops, default_gemm_size, peak_gemm_flops
from unimm_jax.quantizers.residual_quantizer import LOOKUP_CHUNK, nearest_codes


def best_seconds(fn, reps: int) -> float:
  """Best wall time of `reps` calls of fn() after one warm-up call."""
  fn()
  return min(timeit.repeat(fn, number=1, repeat=reps))


def bench_ours(codebooks: np.ndarray, x: np.ndarray, chunk_size: int, reps: int):
  cb, xs = jnp.asarray(codebooks), jnp.asarray(x)
  compiled = jax.jit(lambda c, v: nearest_codes(c, v, chunk_size=chunk_size)).lower(
      cb, xs).compile()
  seconds = best_seconds(lambda: jax.block_until_ready(compiled(cb, xs)), reps)
  indices, quantized = compiled(cb, xs)
  return seconds, compiled_flops(compiled), np.asarray(indices), np.asarray(quantized)


def bench_peer(codebooks: np.ndarray, x: np.ndarray, reps: int):
  import torch  # pylint: disable=import-outside-toplevel
  from vector_quantize_pytorch import ResidualVQ  # pylint: disable=import-outside-toplevel
  levels, codes, dim = codebooks.shape
  peer = ResidualVQ(dim=dim, num_quantizers=levels, codebook_size=codes).eval()
  for layer, codebook in zip(peer.layers, codebooks):
    layer._codebook.embed.data.copy_(torch.from_numpy(codebook)[None])  # pylint: disable=protected-access
  inputs = torch.from_numpy(x)[None]

  def run():
    with torch.no_grad():
      return peer(inputs)

  seconds = best_seconds(run, reps)
  quantized, indices, _ = run()
  return seconds, torch.get_num_threads(), indices[0].numpy(), quantized[0].numpy()


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  sizes = dict(tokens=2048, levels=16, codes=32768, dim=32, chunk_size=LOOKUP_CHUNK, reps=3)
  for name, default in sizes.items():
    parser.add_argument(f"--{name}", type=int, default=default)
  parser.add_argument("--peer_reps", type=int, default=2, help="the peer takes ~15 s a call")
  parser.add_argument("--gemm_n", type=int, default=0, help="0: 2048 on CPU, 8192 else")
  args = parser.parse_args()

  n = args.gemm_n or default_gemm_size()
  peak = peak_gemm_flops(n)
  print(f"backend {jax.default_backend()} ({jax.device_count()} device(s): "
        f"{jax.devices()[0].device_kind})")
  print(f"peak float32 GEMM {n}x{n}: {peak / 1e9:.1f} GFLOP/s")

  rng = np.random.default_rng(0)
  codebooks = rng.normal(size=(args.levels, args.codes, args.dim)).astype(np.float32)
  x = rng.normal(size=(args.tokens, args.dim)).astype(np.float32)
  flops = 2 * args.tokens * args.codes * args.dim * args.levels  # the distance matmuls
  shape = f"{args.levels} levels x {args.codes} codes x {args.dim} dims, {args.tokens} tokens"

  ours_s, xla_flops, ours_idx, ours_q = bench_ours(codebooks, x, args.chunk_size, args.reps)
  print(f"ours  nearest_codes (jit, chunk {args.chunk_size}), {shape}: "
        f"{ours_s * 1e3:.0f} ms, {args.tokens / ours_s:.0f} tokens/s, "
        f"{flops / ours_s / 1e9:.1f} GFLOP/s = {100 * flops / ours_s / peak:.1f}% of peak GEMM "
        f"({flops / 1e9:.1f} GFLOP counted analytically; XLA's cost analysis counts "
        f"{xla_flops / 1e9:.3f} GFLOP, missing the matmuls inside the scan)")

  peer_s, threads, peer_idx, peer_q = bench_peer(codebooks, x, args.peer_reps)
  print(f"peer  vector-quantize-pytorch ResidualVQ (eval, no_grad, {threads} threads): "
        f"{peer_s * 1e3:.0f} ms, {args.tokens / peer_s:.0f} tokens/s, "
        f"{flops / peer_s / 1e9:.1f} GFLOP/s = {100 * flops / peer_s / peak:.1f}% of peak GEMM")

  same = np.all(ours_idx == peer_idx, axis=1)
  first = np.argmin(ours_idx == peer_idx, axis=1)
  print(f"codes agree on {same.sum()}/{args.tokens} tokens at all {args.levels} levels "
        f"({np.mean(ours_idx == peer_idx):.4%} of codes); max |quantized diff| "
        f"{np.abs(ours_q - peer_q)[same].max() if same.any() else float('nan'):.2e}"
        + ("" if same.all() else f"; first differing level of the others: "
           f"{np.bincount(first[~same], minlength=args.levels).tolist()}"))
  print(f"ratio ours / peer: {peer_s / ours_s:.1f}x tokens/s")


if __name__ == "__main__":
  main()
