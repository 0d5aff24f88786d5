"""The fused vocabulary head + cross-entropy: log_softmax's numbers and gradients, without [B, T, V] residuals."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from openvision_max.models.vocab_head import VocabHead, token_nll


def _inputs(b=2, t=5, d=16, v=37):
    kh, kw, kt, kg = jax.random.split(jax.random.key(0), 4)
    h = jax.random.normal(kh, (b, t, d))
    kernel = jax.random.normal(kw, (d, v)) * d ** -0.5 * 4.0  # logits of a few units: a peaked softmax
    targets = jax.random.randint(kt, (b, t), 0, v)
    weights = jax.random.uniform(kg, (b, t))  # a caption mask's role, with distinct values per position
    return h, kernel, targets, weights


def _reference_nll(h, kernel, targets):
    logp = jax.nn.log_softmax(jnp.einsum("btd,dv->btv", h, kernel), axis=-1)
    return -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]


def test_token_nll_is_log_softmax_of_the_logits_and_has_its_gradients():
    h, kernel, targets, weights = _inputs()
    np.testing.assert_allclose(token_nll(h, kernel, targets), _reference_nll(h, kernel, targets),
                               rtol=1e-6, atol=1e-6)

    def loss(fn):
        return lambda h, kernel: jnp.sum(fn(h, kernel, targets) * weights)

    ours = jax.grad(loss(token_nll), argnums=(0, 1))(h, kernel)
    ref = jax.grad(loss(_reference_nll), argnums=(0, 1))(h, kernel)
    for a, b in zip(ours, ref):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_the_module_gives_logits_or_their_nll_from_one_kernel():
    h, _, targets, _ = _inputs()
    head = VocabHead(37, jnp.float32)
    params = nn.unbox(head.init(jax.random.key(1), h))
    logits = head.apply(params, h)
    assert logits.shape == (2, 5, 37) and logits.dtype == jnp.float32
    np.testing.assert_allclose(head.apply(params, h, targets), _reference_nll(h, params["params"]["kernel"], targets),
                               rtol=1e-6, atol=1e-6)


def test_the_backward_pass_keeps_no_vocabulary_sized_tensor(capsys):
    """Residuals of the fused op: the head's input, the kernel, the targets and one logsumexp per position;
    autodiff of log_softmax keeps [B, T, V] fp32 tensors (checked too, so the test sees them when they are
    there)."""
    h, kernel, targets, weights = _inputs()

    def residual_shapes(fn):
        jax.ad_checkpoint.print_saved_residuals(lambda h, k: jnp.sum(fn(h, k, targets) * weights), h, kernel)
        return [line.split()[0] for line in capsys.readouterr().out.splitlines()]

    assert not [s for s in residual_shapes(token_nll) if s.endswith(",37]") and s.count(",") == 2]
    assert [s for s in residual_shapes(_reference_nll) if s == "f32[2,5,37]"]
