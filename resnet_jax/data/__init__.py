"""The input side: tfds data sets read with grain, without TensorFlow. One job per file:

- `builders.py`: which data set, prepared (as ArrayRecord) where; splits and sizes.
- `convert.py`: a data set prepared as TFRecord -> ArrayRecord, in place.
- `sources.py`: random access to a split's records; errors that name the record.
- `decoding.py`: an encoded image's header, and its pixels at a DCT scale (simplejpeg, Pillow).
- `image_ops.py`: crops and resizes on the host, crop first.
- `host_preprocess.py`: the host's part of the configured augmentation and eval crops.
- `inputs.py`: Input (splits, batch sizes, this host's rows), resource checks, seeds.
- `loading.py`: the grain loader that train_stream and eval_stream share: threads, buffers,
  worker processes, and batches handed over in shared memory.
- `train_stream.py`: the training batches, a pure function of (seed, step).
- `eval_stream.py`: evaluation batches, every example once over all hosts.
- `normalization.py`: the per-pixel mean and the device-side augmentation.
- `device_augment.py`: flips, PCA lighting, pad-and-crop and normalisation in the step.
"""
