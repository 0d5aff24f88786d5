"""Flash vs dot_product attention per (model, resolution): FLOP share, padding overhead, TPU memory and the
TPU compiler's modelled time, and measured GPU times when a GPU is present.

    python benchmarks/attention.py [--models B16:224,L14:336] [--per-chip 16] [--topology v5p-8]

For each tower (vision, text, decoder) one attention op, forward + backward, at the tower's real shapes
(per-chip batch, heads, head_dim, length, mask; bf16) is compiled for the TPU topology with the batch over
(data, fsdp) exactly as in training, once per implementation. Figures per device:
- attn % FLOPs: the attention scores+values share of the model's analytic forward FLOPs (flops.py).
- pad x: score entries the kernel computes (padded blocks, fully masked blocks skipped) / entries the
  mask attends; the FLOP price of padding to 128-multiple blocks.
- memory: the compiler's footprint of that program (arguments + outputs + temporaries).
- modelled: the TPU compiler's cost model (`optimal_seconds`), not a measurement. For the Pallas kernel
  the compiler models the custom call from the kernel's own CostEstimate (flops, bytes), so the flash
  column is only as good as that estimate.
GPU: measured wall times of cuDNN, the Pallas/Triton kernel (`flash` runs the faster) and dot_product
when a GPU is present; otherwise the table says "no GPU".
"""

from __future__ import annotations

import argparse
import pathlib

import jax
import jax.numpy as jnp

from openvision_kernels.flash_attention import BlockSizes, _Geometry, padded_length
from openvision_max.config import load_config
from openvision_max.mesh import sharding
from openvision_max.models import attention, flops
from openvision_max.training import aot

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"
DEFAULT_MODELS = "B16:224,L14:224,L14:336,So400m14:384,H14:224"


def towers(cfg) -> list[tuple[str, int, int | None, int]]:
    """(tower, length, prefix_len, sequences per sample) of the three towers of `cfg`."""
    patches, text = cfg.derived.num_patches, cfg.text.context_length
    prefix = patches + text - 1
    return [("vision", patches + 1, None, 1), ("text", text, None, 2),
            ("decoder", prefix + cfg.decoder.caption_length, prefix, 1)]


def attention_share(cfg) -> float:
    """Attention scores+values FLOPs / all forward FLOPs of one sample (analytic, flops.py convention)."""
    total = flops.flops_per_sample(cfg)["forward_total"]
    attn = 0.0
    for name, t, prefix, per_sample in towers(cfg):
        tower = getattr(cfg, name)
        q = t - (prefix or t)
        pairs = t * t if prefix is None else prefix * t + q * q / 2  # flops.py's count (causal half)
        attn += per_sample * 4 * tower.depth * pairs * tower.width
    return attn / total


def padding_overhead(t: int, prefix: int | None, blocks: BlockSizes) -> float:
    """Score entries the flash forward computes / entries the mask attends."""
    tp = padded_length(t, blocks)
    geo = _Geometry(t, tp, min(blocks.block_q, tp), min(blocks.block_kv, tp), prefix, 1.0)
    computed = sum(bool(geo.needed(i * geo.block_q, j * geo.block_kv))
                   for i in range(geo.num_q) for j in range(geo.num_kv)) * geo.block_q * geo.block_kv
    attended = t * t if prefix is None else prefix * t + (t - prefix) * (t - prefix + 1) / 2
    return computed / attended


def compile_op(cfg, mesh, kind: str, batch: int, t: int, prefix: int | None, heads: int, head_dim: int):
    """(memory bytes per device, modelled seconds) of attention fwd+bwd at these shapes on `mesh`."""
    fn = attention.get(kind, **dict(attention.options(cfg, kind)))
    spec = jax.sharding.NamedSharding(mesh, jax.P(sharding.BATCH_AXES, None, "tensor", None))
    x = jax.ShapeDtypeStruct((batch, t, heads, head_dim), jnp.bfloat16, sharding=spec)

    def loss(q, k, v):
        return jnp.sum(fn(q, k, v, prefix_len=prefix).astype(jnp.float32))

    with sharding.activate(cfg, mesh):
        compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))).lower(x, x, x).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return aot.memory_report(compiled, 0)["total_bytes"], float(cost.get("optimal_seconds", float("nan")))


def gpu_times(batch: int, t: int, prefix: int | None, heads: int, head_dim: int) -> str:
    """Measured ms per fwd+bwd on the local GPU: cuDNN, the Pallas/Triton kernel, dot_product; "no GPU"
    without one (nothing is estimated in its place)."""
    from openvision_kernels.flash_attention_gpu import flash_attention_gpu
    from openvision_max.models.gpu_attention import measure_on_gpu
    shape = (batch, t, heads, head_dim)
    kernels = {"cudnn": attention.cudnn, "pallas": flash_attention_gpu, "dot_product": attention.dot_product}
    times = {name: measure_on_gpu(fn, shape, jnp.bfloat16, prefix) for name, fn in kernels.items()}
    if any(v is None for v in times.values()):
        return "no GPU"
    return "measured " + ", ".join(f"{name} {v * 1e3:.2f} ms" for name, v in times.items())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=DEFAULT_MODELS, help="MODEL:RESOLUTION,... (config file names)")
    parser.add_argument("--per-chip", type=int, default=16, help="images per chip (texts: twice as many)")
    parser.add_argument("--topology", default="v5p-8", help="TPU topology to compile for")
    args = parser.parse_args()
    print(f"TPU memory and times per device on {args.topology}, one attention op fwd+bwd per tower, bf16, "
          f"{args.per_chip} images per chip; times are the TPU compiler's cost model (modelled, not measured)")
    header = (f"{'model':<9}{'res':>4} {'tower':<8}{'T':>5}{'pad x':>7} {'attn %':>7} {'mem dot MB':>11}"
              f"{'mem flash MB':>13} {'modelled dot us':>16}{'modelled flash us':>18}  GPU")
    print(header)
    print("-" * len(header))
    for item in args.models.split(","):
        name, res = item.split(":")
        cfg = load_config([str(CONFIGS / f"{name}.yml"), f"image_size={res}", f"compile_topology={args.topology}",
                           f"global_batch_size={args.per_chip * 4}", "stage=", "stages=[]"])
        mesh = aot.build_mesh(cfg)
        chips = mesh.devices.size
        blocks = BlockSizes(cfg.flash_block_q, cfg.flash_block_kv, cfg.flash_block_q_bwd, cfg.flash_block_kv_bwd)
        share = attention_share(cfg)
        for tower_name, t, prefix, per_sample in towers(cfg):
            tower = getattr(cfg, tower_name)
            batch = args.per_chip * per_sample * chips
            shape = (batch, t, prefix, tower.num_heads, tower.head_dim)
            mem_dot, time_dot = compile_op(cfg, mesh, "dot_product", *shape)
            mem_flash, time_flash = compile_op(cfg, mesh, "flash", *shape)
            print(f"{name:<9}{res:>4} {tower_name:<8}{t:>5}{padding_overhead(t, prefix, blocks):>7.2f} "
                  f"{share:>7.1%} {mem_dot / 1e6:>11.1f}{mem_flash / 1e6:>13.1f} {time_dot * 1e6:>16.1f}"
                  f"{time_flash * 1e6:>18.1f}  {gpu_times(args.per_chip * per_sample, *shape[1:])}", flush=True)


if __name__ == "__main__":
    main()
