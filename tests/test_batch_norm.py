"""BatchNorm (resnet_jax/batch_norm.py): normalisation, running statistics, ghost groups and
the one-pass variance."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from resnet_jax.batch_norm import BatchNorm


def test_batch_norm_normalises_and_its_running_statistics_track_the_data():
  """Train mode standardises each batch; the running statistics converge to the data's own,
  so that eval mode standardises new data from the same distribution."""
  bn = BatchNorm(use_running_average=False, momentum=0.9)
  draw = lambda i: 3.0 + 2.0 * jax.random.normal(jax.random.key(i), (64, 4, 4, 5))
  variables = bn.init(jax.random.key(0), draw(0))
  y, updates = bn.apply(variables, draw(0), mutable=['batch_stats'])
  np.testing.assert_allclose(y.mean((0, 1, 2)), 0.0, atol=1e-5)
  np.testing.assert_allclose(y.var((0, 1, 2)), 1.0, atol=1e-3)
  # One step moves the running mean a tenth of the way from 0 towards 3, not nine tenths.
  assert 0.25 < float(updates['batch_stats']['mean'].mean()) < 0.35
  for i in range(1, 80):
    _, updates = bn.apply({**variables, **updates}, draw(i), mutable=['batch_stats'])
  np.testing.assert_allclose(updates['batch_stats']['mean'], 3.0, atol=0.05)
  np.testing.assert_allclose(updates['batch_stats']['var'], 4.0, rtol=0.03)
  evaluate = BatchNorm(use_running_average=True)
  out = evaluate.apply({**variables, **updates}, draw(1000))
  np.testing.assert_allclose(out.mean((0, 1, 2)), 0.0, atol=0.05)
  np.testing.assert_allclose(out.std((0, 1, 2)), 1.0, atol=0.05)


def test_ghost_batch_norm_equals_normalising_each_group_alone():
  x = jax.random.normal(jax.random.key(0), (12, 4, 4, 3)) * jnp.arange(1, 13)[:, None, None, None]
  ghost = BatchNorm(use_running_average=False, group_size=4)
  plain = BatchNorm(use_running_average=False)
  variables = plain.init(jax.random.key(0), x)
  y, ghost_stats = ghost.apply(variables, x, mutable=['batch_stats'])
  parts = [plain.apply(variables, x[i:i + 4], mutable=['batch_stats']) for i in range(0, 12, 4)]
  np.testing.assert_allclose(y, jnp.concatenate([p[0] for p in parts]), rtol=1e-5, atol=1e-5)
  # The running statistics average the groups' statistics.
  for key in ('mean', 'var'):
    expected = np.mean([p[1]['batch_stats'][key] for p in parts], axis=0)
    np.testing.assert_allclose(ghost_stats['batch_stats'][key], expected, rtol=1e-5)
  with pytest.raises(ValueError, match='does not divide the batch'):
    BatchNorm(use_running_average=False, group_size=5).apply(
        variables, x, mutable=['batch_stats'])


@pytest.mark.parametrize('group_size', [0, 4])
def test_fast_variance_batch_norm_matches_two_passes_with_one_collective(group_size):
  # Per-channel means of a few units, as after a conv; 2 "devices" via vmap.
  x = (jax.random.normal(jax.random.key(0), (2, 8, 4, 4, 3)) * jnp.array([1.0, 0.5, 2.0])
       + jnp.array([3.0, -1.0, 0.0]))
  results, collectives, jaxprs = {}, {}, {}
  for fast in (False, True):
    bn = BatchNorm(use_running_average=False, group_size=group_size, axis_name='d',
                          fast_variance=fast)
    variables = bn.init(jax.random.key(0), x[0])
    apply = jax.vmap(lambda v, bn=bn, variables=variables: bn.apply(
        variables, v, mutable=['batch_stats']), axis_name='d')
    results[fast] = apply(x)
    jaxprs[fast] = str(jax.make_jaxpr(apply)(x))
    collectives[fast] = jaxprs[fast].count('psum')
  (y2, stats2), (y1, stats1) = results[False], results[True]
  np.testing.assert_allclose(y1, y2, rtol=1e-4, atol=1e-4)
  for key in ('mean', 'var'):
    np.testing.assert_allclose(stats1['batch_stats'][key], stats2['batch_stats'][key],
                               rtol=1e-5, atol=1e-6)
  # Whole-batch sync: mean and E[x^2] in one collective instead of two; ghost BN
  # syncs only the running statistics, in one collective either way.
  assert collectives == {False: 2 if group_size == 0 else 1, True: 1}, collectives
  assert jaxprs[True] != jaxprs[False]  # the option reaches the computation
