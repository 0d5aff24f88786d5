"""Shared fixtures. Every test process sees 8 fake CPU devices, so mesh tests need no subprocess."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pathlib  # noqa: E402

import pytest  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"

# A tiny model: fast to compile, every dimension divisible by the 2x2x2 test mesh.
TINY = [
    "image_size=32", "patch_size=8", "embed_dim=32", "vocab_size=128", "global_batch_size=8",
    "vision.width=32", "vision.depth=2", "vision.mlp_dim=64", "vision.num_heads=2",
    "text.width=32", "text.depth=2", "text.mlp_dim=64", "text.num_heads=2", "text.context_length=8",
    "decoder.width=32", "decoder.depth=1", "decoder.mlp_dim=64", "decoder.num_heads=2",
    "decoder.caption_length=8", "dtype=float32", "remat_policy=none",
]


@pytest.fixture(scope="session")
def root() -> pathlib.Path:
    return ROOT


def tiny_config(*overrides: str, num_devices: int = 1):
    from openvision_max.config import load_config
    return load_config([str(CONFIGS / "base.yml"), *TINY, *overrides], platform="cpu", num_devices=num_devices)
