"""Building blocks shared by the three towers: pre-LN transformer blocks, stacks with scan and remat.

Parameters carry logical axis names (`nn.with_logical_partitioning`) and activations are constrained with
logical names where they are made; `logical_axis_rules` in the config maps both to mesh axes.
Shapes: B batch, T sequence, D width, H heads, K head dim, M MLP width.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from openvision_max.models import attention as attention_lib

Dtype = Any
LN_EPS = 1e-6
BATCH_LEN_EMBED = ("activation_batch", "activation_length", "activation_embed")


# --- Dense layers ------------------------------------------------------------------------------------------
@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def dense(x: jax.Array, kernel: jax.Array, bias: jax.Array, in_axes: int) -> jax.Array:
    """tensordot(x, kernel, in_axes) + bias, in x's dtype (kernel and bias already cast to it), in the forms
    XLA's CPU backend runs fastest; the products and gradients of autodiff of the plain form, every dot
    accumulating in fp32 and rounded once to the dtype, forward and backward:

    - bf16 dots with an fp32 result run there at about twice its fp32 rate, those with a bf16 result below
      the fp32 rate; autodiff of the fp32-result form would feed its fp32 cotangent to the backward dots (mixed
      fp32 x bf16 dots, run in fp32), so the backward dots here take the cotangent in x's dtype, which holds
      it exactly.
    - The bias gradient is an explicit fp32 sum: autodiff's sum inside the backward scan is rewritten by the
      CPU compiler into a reduce-window (pairwise summation) that runs 40x slower there.

    Elsewhere `Dense` keeps the plain form: TPUs and GPUs accumulate bf16 dots in fp32 either way, and the
    TPU compiler's cost model put these forms 1.7% behind it (docs/performance.md).
    """
    return _dense_fwd(x, kernel, bias, in_axes)[0]


def _dense_fwd(x, kernel, bias, in_axes):
    y = jnp.tensordot(x, kernel, axes=in_axes, preferred_element_type=jnp.float32)
    return (y.astype(x.dtype) + bias), (x, kernel)


def _dense_bwd(in_axes, residuals, g):
    x, kernel = residuals
    out_ndim, batch_ndim = kernel.ndim - in_axes, x.ndim - in_axes
    g_out = tuple(range(g.ndim - out_ndim, g.ndim))
    batch = tuple(range(batch_ndim))
    d_x = jnp.tensordot(g, kernel, axes=(g_out, tuple(range(in_axes, kernel.ndim))),
                        preferred_element_type=jnp.float32)
    d_kernel = jnp.tensordot(x, g, axes=(batch, batch), preferred_element_type=jnp.float32)
    d_bias = jnp.sum(g.astype(jnp.float32), axis=batch)
    return d_x.astype(x.dtype), d_kernel.astype(kernel.dtype), d_bias.astype(g.dtype)


dense.defvjp(_dense_fwd, _dense_bwd)


def logical(init, names: tuple[Optional[str], ...]):
    """An initializer whose parameter is annotated with logical axis names."""
    return nn.with_logical_partitioning(init, names)


def constrain(x: jax.Array, names: tuple[str, ...]) -> jax.Array:
    return nn.with_logical_constraint(x, names)


def layer_norm(name: Optional[str] = None, dtype: Dtype = jnp.float32) -> nn.LayerNorm:
    return nn.LayerNorm(
        epsilon=LN_EPS, dtype=dtype, name=name,
        scale_init=logical(nn.initializers.ones, ("norm",)),
        bias_init=logical(nn.initializers.zeros, ("norm",)),
    )


# --- Rematerialisation -----------------------------------------------------------------------------------
# Blocks tag their matmul outputs with these names; the policies below decide which are kept for the
# backward pass (everything else is recomputed).
QKV_NAMES = ("query_proj", "key_proj", "value_proj")
OUT_NAMES = ("out_proj",)
MLP_NAMES = ("mlp1", "mlp2")
# Every weight matmul's output, by name: jax's dots_with_no_batch_dims policies would save the fp32 results
# inside `dense` (twice the bytes of its bf16 outputs).
DENSE_NAMES = (*QKV_NAMES, *OUT_NAMES, *MLP_NAMES)
_HOST = dict(offload_src="device", offload_dst="pinned_host")


def remat_policy(name: str):
    """The jax checkpoint policy for a config remat_policy; None means no remat at all."""
    cp = jax.checkpoint_policies
    return {
        "none": None,
        "full": cp.nothing_saveable,
        "minimal": cp.save_only_these_names(*DENSE_NAMES),  # every weight matmul output
        "save_qkv_proj": cp.save_only_these_names(*QKV_NAMES),
        "save_out_proj": cp.save_only_these_names(*OUT_NAMES),
        "save_dot_except_mlp": cp.save_only_these_names(*QKV_NAMES, *OUT_NAMES),
        "minimal_offloaded": cp.save_and_offload_only_these_names(
            names_which_can_be_saved=(), names_which_can_be_offloaded=DENSE_NAMES, **_HOST),
        "save_qkv_proj_offloaded": cp.save_and_offload_only_these_names(
            names_which_can_be_saved=(), names_which_can_be_offloaded=QKV_NAMES, **_HOST),
        "save_out_proj_offloaded": cp.save_and_offload_only_these_names(
            names_which_can_be_saved=(), names_which_can_be_offloaded=OUT_NAMES, **_HOST),
    }[name]


@dataclasses.dataclass(frozen=True)
class StackConfig:
    """What a transformer stack needs; built per tower from the run config."""
    width: int
    depth: int
    mlp_dim: int
    num_heads: int
    remat_policy: str
    scan_layers: bool
    attention: str
    dtype: str
    gelu_tanh: bool              # text and decoder use the tanh approximation, vision the exact GELU
    cpu_dense: bool = False      # the weight matmuls in `dense`'s forms (for XLA's CPU backend)
    prefix_len: Optional[int] = None  # prefix-LM mask (decoder); None = bidirectional
    attention_options: tuple[tuple[str, Any], ...] = ()  # keyword options of the attention kind (flash blocks)

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)


class Mlp(nn.Module):
    cfg: StackConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.cfg
        inits = dict(kernel_init=nn.initializers.xavier_uniform(), bias_init=nn.initializers.normal(1e-6),
                     cpu_forms=cfg.cpu_dense)
        h = Dense((cfg.mlp_dim,), 1, ("embed", "mlp"), ("mlp",), cfg.compute_dtype, name="fc1", **inits)(x)
        h = checkpoint_name(h, "mlp1")
        h = constrain(h, ("activation_batch", "activation_length", "activation_mlp"))
        h = nn.gelu(h, approximate=cfg.gelu_tanh)
        out = Dense((cfg.width,), 1, ("mlp", "embed"), ("embed",), cfg.compute_dtype, name="fc2", **inits)(h)
        return checkpoint_name(out, "mlp2")


class Dense(nn.Module):
    """Dense layer from the last `in_axes` axes of x to `features` (e.g. [..., D] -> [..., H, K] for the
    attention heads) with fp32 parameters, the kernel stored in its multi-axis shape; with `cpu_forms`,
    computed by `dense`.

    (flax's DenseGeneral initialises a flat kernel and reshapes it, which breaks its logical names.)
    """
    features: tuple[int, ...]
    in_axes: int
    kernel_names: tuple[str, ...]
    bias_names: tuple[str, ...]
    dtype: Dtype
    cpu_forms: bool
    kernel_init: Any = nn.initializers.normal(0.02)
    bias_init: Any = nn.initializers.zeros

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        shape = (*x.shape[x.ndim - self.in_axes:], *self.features)
        kernel = self.param("kernel", logical(self.kernel_init, self.kernel_names), shape)
        bias = self.param("bias", logical(self.bias_init, self.bias_names), self.features)
        x, kernel, bias = (a.astype(self.dtype) for a in (x, kernel, bias))
        if self.cpu_forms:
            return dense(x, kernel, bias, self.in_axes)
        y = jnp.tensordot(x, kernel, axes=self.in_axes)
        return y + bias.reshape((1,) * (y.ndim - bias.ndim) + bias.shape)


class Attention(nn.Module):
    cfg: StackConfig

    @nn.compact
    def __call__(self, x: jax.Array, context: Optional[jax.Array] = None) -> jax.Array:
        """Self-attention over x [B, T, D]; with `context` [B, S, D], cross-attention from x to it (unmasked,
        dot_product: the fused kernels take one length for queries and keys)."""
        cfg = self.cfg
        heads, head_dim = cfg.num_heads, cfg.width // cfg.num_heads
        qkv_names = ("activation_batch", "activation_length", "activation_heads", "activation_kv")

        def project(name: str, source: jax.Array) -> jax.Array:
            y = Dense((heads, head_dim), 1, ("embed", "heads", "kv"), ("heads", "kv"), cfg.compute_dtype,
                      cfg.cpu_dense, name=name)(source)
            return constrain(checkpoint_name(y, name + "_proj"), qkv_names)

        source = x if context is None else context
        q, k, v = project("query", x), project("key", source), project("value", source)
        if context is None:
            attend = attention_lib.get(cfg.attention, **dict(cfg.attention_options))
            out = attend(q, k, v, prefix_len=cfg.prefix_len)
        else:
            out = attention_lib.dot_product(q, k, v, prefix_len=None)
        out = constrain(out, qkv_names)
        out = Dense((cfg.width,), 2, ("heads", "kv", "embed"), ("embed",), cfg.compute_dtype, cfg.cpu_dense,
                    name="out")(out)
        return checkpoint_name(out, "out_proj")


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(ln(x)), then x + mlp(ln(x)). Returns (x, None) for nn.scan."""
    cfg: StackConfig

    @nn.compact
    def __call__(self, x: jax.Array, _: Any = None) -> tuple[jax.Array, None]:
        dtype = self.cfg.compute_dtype
        x = x + Attention(self.cfg, name="attn")(layer_norm("ln_1", dtype)(x))
        x = constrain(x, BATCH_LEN_EMBED)
        x = x + Mlp(self.cfg, name="mlp")(layer_norm("ln_2", dtype)(x))
        return constrain(x, BATCH_LEN_EMBED), None


class CrossBlock(nn.Module):
    """Pre-LN cross-attention block: x + attn(ln(x), context), then x + mlp(ln(x))."""
    cfg: StackConfig

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        dtype = self.cfg.compute_dtype
        x = x + Attention(self.cfg, name="attn")(layer_norm("ln_1", dtype)(x), context)
        x = constrain(x, BATCH_LEN_EMBED)
        x = x + Mlp(self.cfg, name="mlp")(layer_norm("ln_2", dtype)(x))
        return constrain(x, BATCH_LEN_EMBED)


class SelfCrossPair(nn.Module):
    """A (self-attention block, cross-attention block) pair: one layer of a cross-attending decoder."""
    cfg: StackConfig

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array) -> tuple[jax.Array, None]:
        x, _ = Block(self.cfg, name="self")(x)
        return CrossBlock(self.cfg, name="cross")(x, context), None


class Stack(nn.Module):
    """`depth` blocks, scanned (one compiled body, params stacked on a `layers` axis) or unrolled.

    With `context` (a cross-attending decoder), `depth` counts blocks of either kind: depth / 2
    self-attention + cross-attention pairs, every pair reading the same context.
    """
    cfg: StackConfig

    @nn.compact
    def __call__(self, x: jax.Array, context: Optional[jax.Array] = None) -> jax.Array:
        cfg = self.cfg
        block, layers, extra = (Block, cfg.depth, ()) if context is None else (SelfCrossPair, cfg.depth // 2,
                                                                               (context,))
        policy = remat_policy(cfg.remat_policy)
        if cfg.remat_policy != "none":
            # prevent_cse is only needed outside scan; inside it would block useful optimisations.
            block = nn.remat(block, policy=policy, prevent_cse=not cfg.scan_layers)
        if cfg.scan_layers:
            scanned = nn.scan(
                block, variable_axes={"params": 0}, split_rngs={"params": True},
                in_axes=(nn.broadcast,) * len(extra) or 0,
                length=layers, metadata_params={nn.PARTITION_NAME: "layers"})
            x, _ = scanned(cfg, name="blocks")(x, *extra) if extra else scanned(cfg, name="blocks")(x, None)
        else:
            for i in range(layers):
                x, _ = block(cfg, name=f"block_{i}")(x, *extra)
        return x


def posemb_sincos_2d(h: int, w: int, width: int, temperature: float = 10_000.0) -> np.ndarray:
    """Fixed 2-D sin-cos position embedding [h * w, width] (row-major grid), as in big_vision."""
    assert width % 4 == 0, "width must be divisible by 4 for 2-D sin-cos position embeddings"
    y, x = np.mgrid[:h, :w]
    omega = np.arange(width // 4) / (width // 4 - 1)
    omega = 1.0 / (temperature ** omega)
    y = y.reshape(-1)[:, None] * omega[None]
    x = x.reshape(-1)[:, None] * omega[None]
    return np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], axis=1).astype(np.float32)
