"""Helpers shared by the benchmarks: the GEMM roof and XLA's FLOP count of a compiled step."""
import time

import jax
import jax.numpy as jnp


def peak_gemm_flops(n: int, reps: int = 5) -> float:
  """Best-of-`reps` FLOP/s of an (n, n) @ (n, n) float32 matmul."""
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
  matmul = jax.jit(lambda a, b: a @ b)
  matmul(a, b).block_until_ready()
  best = float("inf")
  for _ in range(reps):
    start = time.perf_counter()
    matmul(a, b).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2 * n ** 3 / best


def default_gemm_size() -> int:
  """2048 on CPU (a few seconds), 8192 on accelerators (enough to saturate them)."""
  return 2048 if jax.default_backend() == "cpu" else 8192


def compiled_flops(compiled) -> float:
  """FLOPs of one call of a compiled executable, from XLA's cost analysis."""
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get("flops", 0.0))
