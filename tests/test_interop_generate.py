"""Greedy decoding of an imported checkpoint (moe_jax.decode, KV cache) continues the fixtures' prompts token for
token as `transformers`' own `generate(do_sample=False)` did (issue 32 item 4): 8 new tokens for 2 prompts, every
family; the encoder-decoder (Switch) encodes the prompt once and decodes from `decoder_start_token_id`."""

import numpy as np
import pytest

from moe_jax import decode, interop
from tests.test_interop import FAMILIES, FIXTURES

# Each family compiles a model, a prefill and a step (~15 s on a core): Mixtral (MoE, GQA) and Switch (the
# encoder-decoder) in the default tier, the others in the slow tier.
DEFAULT = ("mixtral", "switch")


@pytest.mark.parametrize("family", [pytest.param(f, id=f, marks=() if f in DEFAULT else pytest.mark.slow)
                                    for f in FAMILIES])
def test_greedy_generation_equals_transformers_generate(family):
  ref = np.load(FIXTURES / family / "reference.npz")
  prompt, expected = ref["generate_prompt_ids"], ref["generate_ids"]
  _, model = interop.load(str(FIXTURES / family))
  batch = prompt.shape[0]
  if hasattr(model, "encode"):  # encoder-decoder: the prompt is the encoder's input
    start = expected[:, :1]  # decoder_start_token_id
    new = expected[:, 1:]
    decoder = decode.Decoder(model, batch_size=batch, max_length=1 + new.shape[1], encoder_length=prompt.shape[1])
    steps = decoder.generate(start, np.ones(batch, np.int32), max_new_tokens=new.shape[1], encoder_inputs=prompt)
  else:
    new = expected[:, prompt.shape[1]:]
    decoder = decode.Decoder(model, batch_size=batch, max_length=prompt.shape[1] + new.shape[1])
    steps = decoder.generate(prompt, np.full(batch, prompt.shape[1], np.int32), max_new_tokens=new.shape[1])
  np.testing.assert_array_equal(np.stack(list(steps), axis=1), new)
