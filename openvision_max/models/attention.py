"""Attention implementations behind the `attention` config key.

All take q, k, v as [batch, seq, heads, head_dim] and return [batch, seq, heads, head_dim]. `prefix_len`
selects the caption decoder's prefix-LM mask: positions < prefix_len attend bidirectionally among
themselves, later positions attend to the whole prefix and causally among themselves. None means
unmasked bidirectional attention (vision and text towers).
"""

from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp


def prefix_lm_mask(q_len: int, kv_len: int, prefix_len: int) -> jax.Array:
    """Boolean [q_len, kv_len]: True where query i may attend key j."""
    i = jnp.arange(q_len)[:, None]
    j = jnp.arange(kv_len)[None, :]
    return (j < prefix_len) | (j <= i)


def dot_product(q: jax.Array, k: jax.Array, v: jax.Array, *, prefix_len: Optional[int]) -> jax.Array:
    """Plain softmax attention; logits and softmax in fp32, matmuls in the input dtype."""
    scale = q.shape[-1] ** -0.5
    logits = jnp.einsum("bqhd,bkhd->bhqk", q * jnp.asarray(scale, q.dtype), k,
                        preferred_element_type=jnp.float32)
    if prefix_len is not None:
        mask = prefix_lm_mask(q.shape[1], k.shape[1], prefix_len)
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, v)


def cudnn(q: jax.Array, k: jax.Array, v: jax.Array, *, prefix_len: Optional[int]) -> jax.Array:
    """NVIDIA cuDNN fused attention (GPU only; bf16/fp16 inputs)."""
    mask = None if prefix_len is None else prefix_lm_mask(q.shape[1], k.shape[1], prefix_len)[None, None]
    return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="cudnn")


IMPLEMENTATIONS: dict[str, Callable[..., jax.Array]] = {
    "dot_product": dot_product,
    "cudnn": cudnn,
}


def get(kind: str) -> Callable[..., jax.Array]:
    """The implementation for a config's `attention` value (validated by the config schema)."""
    return IMPLEMENTATIONS[kind]
