"""Data sets that resnet_jax builds itself, outside the core: demos and test fixtures.

- `sklearn_digits`: a tfds builder for scikit-learn's bundled handwritten
  digits (the zero-download quickstart).
- `sample_photos`: JPEGs of real photos as a tfds data set, written without
  TensorFlow (tests, benchmarks, accelerator hosts).
- `sample_imagenet`: writes a small ILSVRC-2012 manual_dir (the user's tars)
  from real photos that ship inside packages, for tests and benchmarks.

The input pipeline imports a builder here only when a config names it
(`BUILDERS`), so the core never depends on this package otherwise.
"""

# tfds data set name -> the module that registers its builder.
BUILDERS = {'sklearn_digits': 'resnet_jax.datasets.sklearn_digits',
            'sample_photos': 'resnet_jax.datasets.sample_photos'}
