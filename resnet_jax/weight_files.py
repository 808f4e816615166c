"""Weight files as state dicts of numpy arrays: .safetensors and .npz with numpy alone,
.pth/.pt with PyTorch where it is installed.

Every file that cannot be read (missing, empty, truncated by an interrupted
download, corrupt, or holding something other than a state dict) raises one
WeightsError whose one-line message names the file and says what to do.
"""
from __future__ import annotations

import io
import json
import os
import pickle
import re
import struct
import zipfile
import zlib
from typing import Any, Iterable, Mapping

from etils import epath
import ml_dtypes
import numpy as np

from resnet_jax import errors


class WeightsError(errors.UserError, ValueError):
  """A weights file that cannot be read (named), or a state dict that does not fit the
  asked-for net (the message names the keys).

  `missing`, `unexpected` and `mismatched` hold the offending keys for callers
  that want them as data.
  """

  def __init__(self, message: str, *, missing: Iterable[str] = (),
               unexpected: Iterable[str] = (), mismatched: Iterable[str] = ()):
    super().__init__(message)
    self.missing = tuple(missing)
    self.unexpected = tuple(unexpected)
    self.mismatched = tuple(mismatched)


# What to do about a truncated or corrupt file (an interrupted download, most often).
_AGAIN = 'download it again (or save it again where it was made)'

# safetensors dtype names -> numpy (bfloat16 from ml_dtypes, which jax needs anyway).
_SAFETENSORS_DTYPES = {
    'F64': np.float64, 'F32': np.float32, 'F16': np.float16, 'BF16': ml_dtypes.bfloat16,
    'I64': np.int64, 'I32': np.int32, 'I16': np.int16, 'I8': np.int8,
    'U64': np.uint64, 'U32': np.uint32, 'U16': np.uint16, 'U8': np.uint8, 'BOOL': np.bool_,
}


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Reads a .safetensors file with numpy alone (no safetensors or torch package).

  The format is small enough to read directly: an 8-byte little-endian header
  length, a JSON header {name: {dtype, shape, data_offsets}} and the raw
  little-endian buffer. Unlike `safetensors.numpy`, this reads bfloat16
  tensors, in which many checkpoints are stored. The arrays are read-only
  views of one buffer. Every check names the file: a truncated download fails
  here, not as a shape error later.
  """
  data = _read_bytes(path)
  if len(data) < 8:
    raise WeightsError(f'{path} is empty or truncated ({len(data)} bytes): {_AGAIN}.')
  header_size = int.from_bytes(data[:8], 'little')
  if header_size <= 0 or header_size > 100_000_000:
    raise WeightsError(f'{path} is not a safetensors file (header of {header_size} bytes).')
  if header_size > len(data) - 8:
    raise WeightsError(f'{path} is truncated: its header has {header_size} bytes but only '
                       f'{len(data) - 8} follow; {_AGAIN}.')
  try:
    header = json.loads(data[8:8 + header_size])
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise WeightsError(f'{path} is not a safetensors file (its header is not JSON: {e}).') from e
  buffer = memoryview(data)[8 + header_size:]
  if not isinstance(header, dict):
    raise WeightsError(f'{path} is not a safetensors file (its header is not a JSON object).')
  header.pop('__metadata__', None)
  arrays = {}
  for name, info in header.items():
    try:
      dtype_name, shape = str(info['dtype']), tuple(int(n) for n in info['shape'])
      begin, end = (int(n) for n in info['data_offsets'])
    except (TypeError, KeyError, ValueError) as e:
      raise WeightsError(f'{path}: tensor {name!r} has a malformed header entry {info!r}; the '
                         f'file is corrupt: {_AGAIN}.') from e
    if dtype_name not in _SAFETENSORS_DTYPES:
      raise WeightsError(f'{path}: tensor {name!r} has dtype {dtype_name}, which numpy '
                         f'cannot hold.')
    dtype = np.dtype(_SAFETENSORS_DTYPES[dtype_name]).newbyteorder('<')
    if not 0 <= begin <= end <= len(buffer) or end - begin != int(np.prod(shape)) * dtype.itemsize:
      raise WeightsError(f'{path}: tensor {name!r} has offsets {begin}..{end}, which do not '
                         f'hold shape {shape} of {dtype_name} in a {len(buffer)}-byte buffer; '
                         f'the file is truncated or corrupt: {_AGAIN}.')
    arrays[name] = np.frombuffer(buffer, dtype, int(np.prod(shape)), begin).reshape(shape)
  return arrays


def as_numpy(value: Any) -> np.ndarray:
  """A numpy array from a numpy/jax array or a torch tensor (bfloat16 kept)."""
  if hasattr(value, 'detach'):  # a torch tensor: torch's numpy() has no bfloat16
    value = value.detach().cpu()
    if str(value.dtype) == 'torch.bfloat16':
      return value.view(dtype=_torch_int16()).numpy().view(ml_dtypes.bfloat16)
    return value.numpy()
  return np.asarray(value)


def _torch_int16() -> Any:
  import torch  # pylint: disable=import-outside-toplevel
  return torch.int16


def _read_bytes(path: str | os.PathLike) -> bytes:
  """The whole file (local or gs://); one that cannot be read is the user's to fix."""
  try:
    return epath.Path(path).read_bytes()
  except OSError as e:
    raise WeightsError(f'Cannot read {path} ({e}): check that it is a readable file.') from e


def _reason(error: BaseException) -> str:
  """A library error's first sentence, for a one-line message (torch's run to paragraphs)."""
  text = str(error)
  if 'WeightsUnpickler error:' in text:  # torch's weights_only message: keep only its cause
    text = text.split('WeightsUnpickler error:', 1)[1].split('Check the documentation', 1)[0]
  text = re.split(r'(?<=\.)\s', ' '.join(text.split()), maxsplit=1)[0][:200].rstrip('.')
  return f'{type(error).__name__}: {text or "no details"}'


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """A state dict from a file: .npz and .safetensors with numpy, .pth/.pt with torch.

  Only the torch pickle format needs PyTorch, which resnet_jax does not depend
  on; save a state dict once as .safetensors or .npz to read it anywhere, e.g.
  `np.savez(path, **{k: v.numpy() for k, v in model.state_dict().items()})`.
  Training checkpoints that wrap the state dict under 'state_dict' or 'model'
  are unwrapped.
  """
  name = os.fspath(path).lower()
  if not name.endswith(('.npz', '.safetensors', '.pth', '.pt')):
    raise WeightsError(f'Cannot read {path}: use a .safetensors, .npz, .pth or .pt file.')
  if not epath.Path(path).exists():  # local or gs://
    raise WeightsError(f'{path} does not exist (config.init_from).')
  if name.endswith('.npz'):
    data = _read_bytes(path)
    try:  # EOFError: an empty file; BadZipFile: a truncated one; the others: corrupt ones
      loaded = np.load(io.BytesIO(data), allow_pickle=False)
      arrays = ({key: loaded[key] for key in loaded.files}
                if isinstance(loaded, np.lib.npyio.NpzFile) else None)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error,
            NotImplementedError) as e:
      raise WeightsError(f'{path} is not a readable .npz file ({_reason(e)}); if it is '
                         f'truncated or corrupt, {_AGAIN}.') from e
    if arrays is None:
      raise WeightsError(f'{path} holds one array, not a state dict: save it with '
                         f'np.savez(path, **state_dict).')
    return arrays
  if name.endswith('.safetensors'):
    return read_safetensors(path)
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise WeightsError(
        f'Reading {path} needs PyTorch (pip install torch), which resnet_jax does not '
        f'depend on. Or save the state dict once where torch is installed as .safetensors '
        f'or .npz, which read without it.') from e
  data = _read_bytes(path)
  if not data:
    raise WeightsError(f'{path} is empty: {_AGAIN}.')
  try:
    state = torch.load(io.BytesIO(data), map_location='cpu', weights_only=True)
  except pickle.UnpicklingError as e:  # weights_only: a bad opcode or a non-tensor object
    raise WeightsError(
        f'{path} cannot be read with torch.load(weights_only=True) ({_reason(e)}): it is '
        f'truncated or corrupt, or holds Python objects besides tensors; {_AGAIN}, or '
        f'save `model.state_dict()` alone.') from e
  except (RuntimeError, EOFError, ValueError, LookupError, TypeError, AssertionError,
          struct.error) as e:
    # Every type torch 2.13's loader raised on files of both its formats cut at every byte
    # or with bytes changed: RuntimeError from its zip reader ("failed finding central
    # directory": cut short) and old format ("unexpected EOF"), the rest from its pure-Python
    # unpickler reading bytes that are no pickle (EOFError, IndexError, KeyError,
    # UnicodeDecodeError, struct.error, ...).
    raise WeightsError(f'{path} is not a readable PyTorch file ({_reason(e)}); it is '
                       f'probably truncated or corrupt: {_AGAIN}.') from e
  for wrapper in ('state_dict', 'model'):
    if isinstance(state, Mapping) and isinstance(state.get(wrapper), Mapping):
      state = state[wrapper]
  if not isinstance(state, Mapping):
    raise WeightsError(f'{path} holds a {type(state).__name__}, not a state dict.')
  return {key: as_numpy(value) if hasattr(value, 'detach') else value
          for key, value in state.items()}
