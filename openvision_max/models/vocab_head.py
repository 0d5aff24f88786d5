"""The caption decoders' vocabulary head, and its cross-entropy fused with it.

Logits over a 32,000-word vocabulary are the largest tensors of a training step: at L/14@224 with 64 samples
per chip, [64, 128, 32000] fp32 is 1 GB, and autodiff of `log_softmax` keeps the logits' log-probabilities
and builds their gradient, another gigabyte each. `token_nll` computes each position's negative
log-likelihood from the head's input instead and keeps only that input and one logsumexp per position for
the backward pass, which recomputes the logits (one more head matmul: 0.25% of an L/14 step's FLOPs).
(Computing the logits a chunk of positions at a time, tried too, lowered a small model's peak but not L/14's:
docs/performance.md.)

The matmul takes the decoder's compute dtype with fp32 accumulation (the TPU form of an fp32 matmul at default
precision); logsumexp, softmax and the NLL are fp32.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from openvision_max.models.layers import logical

LOGITS_NAMES = ("activation_batch", "activation_length", "activation_vocab")


def _logits(h: jax.Array, kernel: jax.Array) -> jax.Array:
    """h [B, T, D] (compute dtype), kernel [D, V] -> logits [B, T, V] fp32."""
    logits = jnp.einsum("btd,dv->btv", h, kernel.astype(h.dtype), preferred_element_type=jnp.float32)
    return nn.with_logical_constraint(logits, LOGITS_NAMES)


@jax.custom_vjp
def token_nll(h: jax.Array, kernel: jax.Array, targets: jax.Array) -> jax.Array:
    """-log softmax(h @ kernel)[targets] per position: h [B, T, D], kernel [D, V], targets [B, T] int32
    -> [B, T] fp32. The same numbers as log_softmax of `_logits`, without keeping [B, T, V] tensors."""
    return _token_nll_fwd(h, kernel, targets)[0]


def _token_nll_fwd(h, kernel, targets):
    logits = _logits(h, kernel)
    lse = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return lse - target_logit, (h, kernel, targets, lse)


def _token_nll_bwd(residuals, g):
    h, kernel, targets, lse = residuals
    # d nll / d logits = softmax - onehot(target), scaled by the incoming per-position gradient.
    probs = jnp.exp(_logits(h, kernel) - lse[..., None])
    onehot = jax.nn.one_hot(targets, kernel.shape[-1], dtype=jnp.float32)
    d_logits = ((probs - onehot) * g[..., None]).astype(h.dtype)
    w = kernel.astype(h.dtype)
    d_h = jnp.einsum("btv,dv->btd", d_logits, w, preferred_element_type=jnp.float32)
    d_kernel = jnp.einsum("btd,btv->dv", h, d_logits, preferred_element_type=jnp.float32)
    # Integer targets take a float0 cotangent.
    d_targets = jnp.zeros(targets.shape, jax.dtypes.float0)
    return d_h.astype(h.dtype), d_kernel.astype(kernel.dtype), d_targets


token_nll.defvjp(_token_nll_fwd, _token_nll_bwd)


class VocabHead(nn.Module):
    """Bias-free projection to the vocabulary (parameter `kernel` [D, V], logical axes embed, vocab).

    __call__(x) gives logits [B, T, V] fp32; with targets [B, T] it gives the per-position NLL [B, T] fp32
    instead (`token_nll`: what training and the likelihood evals use)."""
    vocab_size: int
    dtype: jnp.dtype
    kernel_init: nn.initializers.Initializer = nn.initializers.lecun_normal()

    @nn.compact
    def __call__(self, x: jax.Array, targets: jax.Array | None = None) -> jax.Array:
        kernel = self.param("kernel", logical(self.kernel_init, ("embed", "vocab")), (x.shape[-1], self.vocab_size))
        h = x.astype(self.dtype)
        if targets is None:
            return _logits(h, kernel)
        return token_nll(h, kernel, targets)
