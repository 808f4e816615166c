"""Evaluation over a whole eval split: every example counted once, stoppable at any batch."""
from __future__ import annotations

import collections
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
from clu import metrics as clu_metrics

from resnet_jax import parallel


def clu_metrics_from_sums(sums: dict[str, Any]) -> clu_metrics.Collection:
  """clu metrics (averages, and the last learning rate) from the steps' sums and count."""
  fields = {name: clu_metrics.Average(total=sums[name], count=sums['count'])
            for name in ('loss', 'top1_error', 'top5_error')}
  if 'learning_rate' in sums:
    fields['learning_rate'] = clu_metrics.LastValue(value=sums['learning_rate'])
  return clu_metrics.Collection.create_collection(**fields)


def evaluate(strategy: parallel.Parallel, state: Any, batches: Iterable[dict[str, Any]],
             stop: Callable[[], bool] = lambda: False) -> dict[str, float] | None:
  """Loss and errors over every example of an eval split (`eval_stream.eval_batches`),
  each counted once.

  `stop` is asked before each batch (a preemption); when it says yes the
  evaluation ends early and returns None, with at most two batches left to
  finish on the devices.
  """
  sums, in_flight = None, collections.deque()
  try:
    for batch in batches:
      if stop():
        return None
      m = strategy.eval_step(state, strategy.put_batch(batch))
      sums = m if sums is None else jax.tree.map(jnp.add, sums, m)
      # At most two batches queued on the devices: a stop never waits for the whole split.
      in_flight.append(sums)
      if len(in_flight) > 2:
        jax.block_until_ready(in_flight.popleft())
  finally:  # grain's workers stop now, not when the iterator is collected (a stop, an error)
    if hasattr(batches, 'close'):
      batches.close()
  host = strategy.metrics_to_host(sums)
  out = {f'eval_{k}': float(v) for k, v in clu_metrics_from_sums(host).compute().items()}
  out['eval_num_examples'] = host['count']
  return out
