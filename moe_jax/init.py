"""Parameter initialisation shared by every layer (jax initialisers, which flax.nnx re-exports: the router
families declare their parameters with them without importing flax)."""

from __future__ import annotations

from typing import Sequence

import jax


def switch_init(scale: float, *, in_axis: int = -2, out_axis: int = -1, batch_axis: Sequence[int] = ()):
  """Switch Transformer init (Fedus et al. 2021, Sec. 2.4): truncated normal, mean 0, variance scale/fan_in.

  The paper recommends scale 0.1 (10x below the usual 1.0) for stable MoE training (Table 3). `batch_axis`
  names axes that are not part of the fan-in, such as the expert axis of stacked expert weights [E, M, F].
  """
  return jax.nn.initializers.variance_scaling(
      scale, "fan_in", "truncated_normal", in_axis=in_axis, out_axis=out_axis, batch_axis=tuple(batch_axis)
  )
