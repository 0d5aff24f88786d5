"""Visual token masking (OpenVision 2): the caption decoder reads a random subset of each image's patch tokens.

Per image, `kept` of the N patch tokens are drawn uniformly without replacement: the `kept` largest of N
uniform draws, taken in raster order. Each image's draw comes from its own key, made from (seed, step,
example index in the global batch), so it does not depend on the batch's split over devices or into
microbatches, and a resumed run draws the same tokens at the same step. The selection is a gather along the
token axis of each example: it shards with the batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Folded into the run seed, so the masking stream is not the stream of the parameter init or the data.
MASKING_STREAM = 0x6D61736B  # "mask"


def example_keys(seed: int, step: jax.Array, examples: jax.Array) -> jax.Array:
    """A key per example [n] at global step `step`; `examples` [n] are their indices in the global batch."""
    step_key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), MASKING_STREAM), step)
    return jax.vmap(lambda i: jax.random.fold_in(step_key, i))(examples)


def kept_indices(keys: jax.Array, num_tokens: int, kept: int) -> jax.Array:
    """int32 [B, kept]: per example, `kept` distinct token indices in [0, num_tokens), ascending."""
    noise = jax.vmap(lambda k: jax.random.uniform(k, (num_tokens,)))(keys)
    _, idx = jax.lax.top_k(noise, kept)
    return jnp.sort(idx, axis=-1).astype(jnp.int32)


def keep_tokens(tokens: jax.Array, keys: jax.Array | None, kept: int) -> tuple[jax.Array, jax.Array | None]:
    """tokens [B, N, D] -> ([B, kept, D], the indices [B, kept]). With every token kept (or no keys, as at
    init) the tokens come back as they are and the indices are None."""
    n = tokens.shape[1]
    if kept >= n or keys is None:
        return tokens, None
    idx = kept_indices(keys, n, kept)
    return jnp.take_along_axis(tokens, idx[..., None], axis=1), idx
