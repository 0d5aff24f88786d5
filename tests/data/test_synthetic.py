"""`dataset_type=synthetic`: the batches are a function of the seed and the step, not of the mesh, so a run on
many hosts trains on what one process would (the multi-host runs of tests/training/test_multihost.py use the
demo digits; benchmarks on pods use these batches)."""

import jax
import numpy as np

from openvision_max.data.synthetic import SyntheticIterator
from openvision_max.mesh.sharding import create_mesh

from conftest import tiny_config

MESH = ["ici_data_parallelism=2", "ici_fsdp_parallelism=2", "ici_tensor_parallelism=2"]


def batches(cfg, count, *, state=None):
    it = SyntheticIterator(cfg, create_mesh(cfg))
    if state is not None:
        it.set_state(state)
    return [jax.tree.map(np.asarray, next(it)) for _ in range(count)]


def test_the_same_batches_on_one_device_and_on_a_2x2x2_mesh():
    one = tiny_config(num_devices=1)
    eight = tiny_config(*MESH, num_devices=8)
    a, b = batches(one, 3), batches(eight, 3)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)
    assert not np.array_equal(a[0]["images"], a[1]["images"])  # each step its own batch
    # A resumed iterator (its state is the step) continues the sequence, on either mesh.
    for x, y in zip(batches(eight, 2, state={"step": 1}), a[1:]):
        np.testing.assert_array_equal(x["texts"], y["texts"])
