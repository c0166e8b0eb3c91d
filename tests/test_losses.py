"""Losses, MI bounds, critics and class conditionals against numpy references."""

import math

import numpy as np
import pytest
import tensorflow as tf

from sdim_tf import ClassConditionalGaussians, losses, mutual_info

RNG = np.random.default_rng(0)
LL = RNG.normal(0, 5, (6, 4)).astype(np.float32)
LABELS = np.array([0, 3, 1, 1, 2, 3])


def _softplus(x):
    return np.log1p(np.exp(-np.abs(x))) + np.maximum(x, 0)


def test_nll_loss():
    expected = -np.mean([LL[i, LABELS[i]] for i in range(6)])
    np.testing.assert_allclose(losses.nll_loss(LL, LABELS).numpy(), expected, rtol=1e-5)


@pytest.mark.parametrize("margin", [10.0, 2.5])
def test_likelihood_margin_loss(margin):
    per_sample = []
    for i in range(6):
        gaps = [max(LL[i, c] + margin - LL[i, LABELS[i]], 0.0) ** 2
                for c in range(4) if c != LABELS[i]]
        per_sample.append(sum(gaps) / 3)
    got = losses.likelihood_margin_loss(LL, LABELS, margin).numpy()
    np.testing.assert_allclose(got, np.mean(per_sample), rtol=1e-5)


def test_margin_loss_is_zero_when_margins_hold():
    ll = np.full((3, 3), -50.0, np.float32)
    ll[np.arange(3), [0, 1, 2]] = 0.0
    assert losses.likelihood_margin_loss(ll, [0, 1, 2], 10.0).numpy() == 0.0
    # One false class 5 short of the margin: (5)^2 / (C-1) / N.
    ll[0, 1] = -5.0
    np.testing.assert_allclose(losses.likelihood_margin_loss(ll, [0, 1, 2], 10.0), 25 / 2 / 3)


@pytest.mark.parametrize("margin", [10.0, 0.5])
def test_outlier_margin_loss(margin):
    outlier_ll = RNG.normal(0, 5, (5, 4)).astype(np.float32)
    reference = RNG.normal(0, 5, 5).astype(np.float32)
    expected = np.mean([max(outlier_ll[i].max() + margin - reference[i], 0.0) ** 2
                        for i in range(5)])
    np.testing.assert_allclose(losses.outlier_margin_loss(outlier_ll, reference, margin),
                               expected, rtol=1e-5)
    # it moves the outliers only: no gradient reaches the reference
    ref = tf.constant(reference)
    with tf.GradientTape() as tape:
        tape.watch(ref)
        loss = losses.outlier_margin_loss(outlier_ll, ref, margin)
    assert tape.gradient(loss, ref) is None


POS = RNG.normal(0, 2, (5, 16)).astype(np.float32)
NEG = RNG.normal(0, 2, (5, 4, 16)).astype(np.float32)


def test_jsd_bound():
    e_pos = math.log(2) - _softplus(-POS)
    e_neg = _softplus(-NEG) + NEG - math.log(2)
    np.testing.assert_allclose(mutual_info.jsd_loss(POS, NEG).numpy(),
                               e_neg.mean() - e_pos.mean(), rtol=1e-5)


def test_dv_bound():
    expected = -(POS.mean() - np.log(np.exp(NEG.astype(np.float64)).mean()))
    np.testing.assert_allclose(mutual_info.dv_loss(POS, NEG).numpy(), expected, rtol=1e-5)


def test_infonce_bound():
    total = 0.0
    for i in range(5):
        for p in range(16):
            logits = np.concatenate([[POS[i, p]], NEG[i, :, p]]).astype(np.float64)
            total += -(POS[i, p] - np.log(np.exp(logits).sum()))
    np.testing.assert_allclose(mutual_info.infonce_loss(POS, NEG).numpy(), total / 80, rtol=1e-5)


def test_unknown_bound():
    with pytest.raises(ValueError, match="unknown MI bound 'nce'"):
        mutual_info.mi_loss(POS, NEG, "nce")


@pytest.mark.parametrize("n", [2, 3, 17, 128])
def test_derangement_has_no_fixed_point(n):
    for seed in range(20):
        perm = mutual_info.derangement(tf.constant(n), tf.constant([seed, 1])).numpy()
        assert sorted(perm) == list(range(n))
        assert not (perm == np.arange(n)).any()


def test_concat_critic_scores():
    critic = mutual_info.ConcatCritic(8)
    local = RNG.normal(size=(4, 2, 2, 3)).astype(np.float32)
    z = RNG.normal(size=(4, 5)).astype(np.float32)
    critic.build(local.shape, z.shape)
    positive, negative = (t.numpy() for t in critic(local, z))
    w = [(c.kernel.numpy()[0, 0], c.bias.numpy()) for c in critic.net]

    def score(loc, zz):  # numpy 1x1-conv net on one image: [P]
        h = np.concatenate([loc.reshape(-1, 3), np.tile(zz, (4, 1))], 1)
        h = np.maximum(h @ w[0][0] + w[0][1], 0)
        h = np.maximum(h @ w[1][0] + w[1][1], 0)
        return (h @ w[2][0] + w[2][1])[:, 0]

    assert positive.shape == (4, 4) and negative.shape == (4, 1, 4)
    for i in range(4):
        np.testing.assert_allclose(positive[i], score(local[i], z[i]), atol=1e-5)
        matches = [j for j in range(4)
                   if np.allclose(negative[i, 0], score(local[j], z[i]), atol=1e-5)]
        assert matches and i not in matches  # z_i paired with another image's map


def test_dot_critic_scores():
    critic = mutual_info.DotCritic(8)
    local = RNG.normal(size=(3, 4, 4, 6)).astype(np.float32)
    z = RNG.normal(size=(3, 5)).astype(np.float32)
    critic.build(local.shape, z.shape)
    positive, negative = (t.numpy() for t in critic(local, z, training=False))
    loc = critic.local_net(local, training=False).numpy().reshape(3, 16, 8)
    glob = critic.global_net(z[:, None, None], training=False).numpy().reshape(3, 8)
    full = np.einsum("iu,jpu->ijp", glob, loc)
    np.testing.assert_allclose(positive, full[np.arange(3), np.arange(3)], rtol=1e-4, atol=1e-4)
    for i in range(3):
        others = [j for j in range(3) if j != i]
        np.testing.assert_allclose(negative[i], full[i, others], rtol=1e-4, atol=1e-4)


def test_class_conditional_log_likelihood_closed_form():
    layer = ClassConditionalGaussians(3, 4)
    layer.build()
    z = RNG.normal(size=(5, 4)).astype(np.float32)
    got = layer(z).numpy()
    table = layer.embedding.numpy()
    mu, log_sigma = table[:, :4], table[:, 4:]
    expected = np.zeros((5, 3))
    for i in range(5):
        for c in range(3):
            d = (z[i] - mu[c]) / np.exp(log_sigma[c])
            expected[i, c] = (-0.5 * (d ** 2).sum() - log_sigma[c].sum()
                              - 2 * np.log(2 * np.pi))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-4)


def test_class_conditional_log_scale_floor():
    layer = ClassConditionalGaussians(2, 3, log_scale_floor=math.log(0.02))
    layer.build()
    layer.embedding.assign(np.concatenate([np.zeros((2, 3)), np.full((2, 3), -10.0)], 1))
    z = np.ones((1, 3), np.float32)
    sigma = 0.02
    expected = -0.5 * 3 / sigma ** 2 - 3 * np.log(sigma) - 1.5 * np.log(2 * np.pi)
    np.testing.assert_allclose(layer(z).numpy(), [[expected, expected]], rtol=1e-5)
