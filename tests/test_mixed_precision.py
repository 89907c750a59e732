"""bfloat16 compute (model.dtype) with float32 parameters, optimizer state and router (moe.router_dtype):
training tracks the float32 run.

What is mixed: activations and the matmuls of attention, dense FFNs and experts run in bfloat16; parameters
stay float32 (each matmul casts its weight: float32 master weights, as in Micikevicius et al. 2018,
arXiv:1710.03740, without loss scaling, which bfloat16's float32 exponent range makes unnecessary); the
router's logits and softmax stay float32 (Switch "selective precision", Fedus et al. 2021, Sec. 2.4) unless
moe.router_dtype says otherwise; norms, rotary embedding, logits and the loss are float32.
"""

import numpy as np
import pytest

from moe_jax import train
from tests.helpers import tiny_config, train_losses

STEPS = 300
# The band on the 25-step moving averages of the two loss curves, every step (bf16 rounds activations to 8
# mantissa bits; the curves fall by more than 1 nat, and must stay together all the way).
BAND = 0.1


@pytest.mark.slow  # two 300-step runs: ~1.5 min on 2 cores
def test_bfloat16_compute_tracks_the_float32_loss_over_300_steps(tmp_path):
  curves = {}
  for dtype in ("float32", "bfloat16"):
    config = tiny_config(str(tmp_path / "tfds"), steps=STEPS)
    config.model.dtype = dtype
    config.train.update(dict(checkpoint_every=0, log_every=100, warmup_steps=20, learning_rate=3e-3))
    train.train_and_evaluate(config, str(tmp_path / dtype))
    losses = train_losses(str(tmp_path / dtype))
    curves[dtype] = np.convolve([losses[s] for s in sorted(losses)], np.ones(25) / 25, mode="valid")
  f32, bf16 = curves["float32"], curves["bfloat16"]
  assert f32[-1] < f32[0] - 1.0 and bf16[-1] < bf16[0] - 1.0  # both learn
  np.testing.assert_array_less(np.abs(bf16 - f32), BAND)
