"""What the model reads: images travel as uint8 and are normalised on device with ImageNet statistics.

The train step, the evaluators and `load_model` all normalise here, so an exported model and the trainer
see the same pixels (open_clip's preprocessing uses the same mean and std).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

# NumPy, not jnp: importing this module must not start JAX's backends.
IMAGE_MEAN = np.array([0.485, 0.456, 0.406], np.float32) * 255
IMAGE_STD = np.array([0.229, 0.224, 0.225], np.float32) * 255


def normalize_images(images: jax.Array) -> jax.Array:
    """uint8 [B, H, W, 3] -> float32, ImageNet mean/std normalised."""
    return (images.astype(jnp.float32) - IMAGE_MEAN) / IMAGE_STD
