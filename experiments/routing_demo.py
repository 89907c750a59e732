"""Routing demo: route one batch of random tokens with every router and print a readable summary.

  python experiments/routing_demo.py [--tokens 64] [--experts 8] [--capacity_factor 1.25]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from moe_jax import routing


def summarize(name: str, result: routing.RoutingResult) -> str:
  m = result.metrics
  load = np.asarray(m.expert_load)
  bars = " ".join(f"{x:4.2f}" for x in load)
  return "\n".join([
      f"{name}",
      f"  capacity per expert      {result.capacity}",
      f"  dropped tokens           {float(m.dropped_token_fraction):6.1%}",
      f"  dropped assignments      {float(m.dropped_assignment_fraction):6.1%}",
      f"  expert load / capacity   {bars}",
      f"  router entropy (nats)    {float(m.router_entropy):.3f}  (uniform: {np.log(load.size):.3f})",
      f"  mean top gate            {float(m.mean_top_gate):.3f}",
      f"  load-balancing loss      {float(result.load_balancing_loss):.4f}  (1.0 = balanced)",
      f"  router z-loss            {float(result.router_z_loss):.4f}",
  ])


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--tokens", type=int, default=64)
  parser.add_argument("--experts", type=int, default=8)
  parser.add_argument("--d_model", type=int, default=32)
  parser.add_argument("--capacity_factor", type=float, default=1.25)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()

  k_tokens, k_router, k_jitter, k_policy = jax.random.split(jax.random.key(args.seed), 4)
  tokens = jax.random.normal(k_tokens, (1, args.tokens, args.d_model))
  # An untrained random router is far from uniform, so capacity limits and drops are visible.
  kernel = jax.random.normal(k_router, (args.d_model, args.experts)) * 0.3
  logits = routing.router_logits(tokens, kernel, jitter_eps=0.01, key=k_jitter)
  cf = args.capacity_factor
  print(f"{args.tokens} tokens, {args.experts} experts, capacity factor {cf}\n")
  runs = {
      "Switch top-1": routing.switch_route(logits, capacity_factor=cf),
      "Switch top-1, batch-prioritised": routing.switch_route(logits, capacity_factor=cf, batch_prioritized=True),
      "GShard top-2 (random 2nd expert)": routing.top_k_route(
          logits, k=2, capacity_factor=cf, second_expert_policy="random", key=k_policy
      ),
      "Mixtral top-2, renormalised, dropless": routing.top_k_route(logits, k=2, dropless=True, renormalize=True),
      "Expert choice (non-causal)": routing.expert_choice_route(logits, capacity_factor=cf),
  }
  print("\n\n".join(summarize(name, result) for name, result in runs.items()))
  jnp.zeros(()).block_until_ready()


if __name__ == "__main__":
  main()
