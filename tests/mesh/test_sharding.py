"""Parameters land sharded as the logical rules say, and a sharded forward equals the single-device one."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from openvision_max import models
from openvision_max.mesh import sharding

from conftest import tiny_config

MESH_2x2x2 = ["ici_data_parallelism=2", "ici_fsdp_parallelism=2", "ici_tensor_parallelism=2"]


def test_params_are_sharded_by_the_rules():
    cfg = tiny_config(*MESH_2x2x2, num_devices=8)
    mesh = sharding.create_mesh(cfg)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    model = models.build(cfg)
    dummy = [jnp.zeros(s.shape, s.dtype) for s in models.dummy_inputs(cfg)]
    params = sharding.init_sharded(cfg, mesh, lambda r: model.init(r, *dummy), jax.random.key(0))["params"]
    vis = params["vision"]["transformer"]["blocks"]
    expected = {
        # [layers, embed, mlp] with embed -> fsdp, mlp -> tensor
        "vision fc1": (vis["mlp"]["fc1"]["kernel"], P(None, "fsdp", "tensor")),
        "vision fc2": (vis["mlp"]["fc2"]["kernel"], P(None, "tensor", "fsdp")),
        # [layers, embed, heads, kv]
        "vision query": (vis["attn"]["query"]["kernel"], P(None, "fsdp", "tensor", None)),
        "vision out": (vis["attn"]["out"]["kernel"], P(None, "tensor", None, "fsdp")),
        "text embedding": (params["text"]["embedding"]["embedding"], P("tensor", "fsdp")),
        "decoder head": (params["decoder"]["head"]["kernel"], P("fsdp", "tensor")),
        "patch embedding": (params["vision"]["embedding"]["kernel"], P(None, None, None, "fsdp")),
        "layer norm": (vis["ln_1"]["scale"], P(None, None)),
    }
    for name, (array, spec) in expected.items():
        assert array.sharding.spec == spec, (name, array.sharding.spec)
    # Really split: a device holds a quarter of the fc1 kernel (fsdp 2 x tensor 2).
    fc1 = vis["mlp"]["fc1"]["kernel"]
    assert fc1.addressable_shards[0].data.size * 4 == fc1.size


def test_sharded_forward_equals_single_device():
    single_cfg = tiny_config()
    mesh_cfg = tiny_config(*MESH_2x2x2, num_devices=8)
    model = models.build(single_cfg)
    k1, k2, k3 = jax.random.split(jax.random.key(3), 3)
    images = jax.random.normal(k1, (8, 32, 32, 3))
    texts = jax.random.randint(k2, (16, single_cfg.text.context_length), 0, single_cfg.vocab_size)
    params = model.init(k3, images[:1], texts[:2])
    reference = jax.jit(model.apply)(params, images, texts)

    mesh = sharding.create_mesh(mesh_cfg)
    sharded_model = models.build(mesh_cfg)
    with sharding.activate(mesh_cfg, mesh):
        dummy = [jnp.zeros(s.shape, s.dtype) for s in models.dummy_inputs(mesh_cfg)]
        abstract = jax.eval_shape(lambda r: sharded_model.init(r, *dummy), k3)
        shardings = sharding.logical_to_shardings(mesh_cfg, mesh, nn.get_partition_spec(abstract))
        sharded_params = jax.device_put(params, shardings)
        batch = sharding.batch_sharding(mesh)
        out = jax.jit(sharded_model.apply)(sharded_params, jax.device_put(images, batch),
                                           jax.device_put(texts, batch))
    assert out["image_emb"].sharding.spec[0] == ("data", "fsdp")
    for key in ("image_emb", "text_emb", "caption_logits"):
        np.testing.assert_allclose(np.asarray(out[key]), np.asarray(reference[key]), atol=1e-5, rtol=0)
