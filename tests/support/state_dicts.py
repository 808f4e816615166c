"""State dicts as weight files, written by hand in the formats resnet_jax reads."""
import json

import numpy as np

from resnet_jax import weight_files


def write_safetensors(path, arrays):
  """The safetensors format, written by hand (8-byte header size, JSON header, buffer)."""
  names = {np.dtype(dtype): name for name, dtype in weight_files._SAFETENSORS_DTYPES.items()}
  header, chunks, offset = {'__metadata__': {'format': 'pt'}}, [], 0
  for key, value in arrays.items():
    data = np.ascontiguousarray(value).tobytes()
    header[key] = {'dtype': names[value.dtype], 'shape': list(value.shape),
                   'data_offsets': [offset, offset + len(data)]}
    chunks.append(data)
    offset += len(data)
  encoded = json.dumps(header).encode()
  encoded += b' ' * (-len(encoded) % 8)
  with open(path, 'wb') as f:
    f.write(len(encoded).to_bytes(8, 'little') + encoded + b''.join(chunks))


def small_state_dict():
  return {'conv1.weight': np.arange(4 * 3 * 3 * 3, dtype=np.float32).reshape(4, 3, 3, 3),
          'bn1.running_var': np.ones(4, np.float32)}
