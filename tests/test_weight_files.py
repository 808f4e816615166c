"""Weight files (resnet_jax/weight_files.py): .safetensors and .npz read with numpy alone,
.pth with torch; every unreadable file one WeightsError naming it and the fix."""
import fractions
import json
import pickle
import re
import sys
import types

import ml_dtypes
import numpy as np
import pytest

from resnet_jax import weight_files as wf
from tests.support.state_dicts import small_state_dict, write_safetensors


def test_safetensors_half_precision_and_integers(tmp_path):
  rng = np.random.default_rng(0)
  arrays = {'a': rng.standard_normal((3, 2)).astype(np.float16),
            'b': rng.standard_normal((4,)).astype(ml_dtypes.bfloat16),
            'c': np.arange(6, dtype=np.int64).reshape(2, 3), 'd': np.float64(2.5) * np.ones(())}
  write_safetensors(tmp_path / 'x.safetensors', arrays)
  loaded = wf.read_safetensors(tmp_path / 'x.safetensors')
  for key, value in arrays.items():
    assert loaded[key].dtype == value.dtype and loaded[key].shape == value.shape
    np.testing.assert_array_equal(loaded[key], value)


def test_reader_agrees_with_the_safetensors_package(tmp_path):
  st = pytest.importorskip('safetensors.numpy')
  arrays = {'w': np.arange(24, dtype=np.float32).reshape(2, 3, 4), 'n': np.array(3, np.int64)}
  st.save_file(arrays, str(tmp_path / 'x.safetensors'))
  loaded = wf.read_safetensors(tmp_path / 'x.safetensors')
  for key, value in arrays.items():
    np.testing.assert_array_equal(loaded[key], value)


def test_unreadable_files(tmp_path):
  """Each is the user's error (WeightsError, a one-line message) naming the file."""
  with pytest.raises(wf.WeightsError, match='weights.ckpt: use a .safetensors, .npz'):
    wf.load_state_dict(tmp_path / 'weights.ckpt')
  with pytest.raises(wf.WeightsError, match='missing.npz does not exist'):
    wf.load_state_dict(tmp_path / 'missing.npz')
  (tmp_path / 'bad.npz').write_bytes(b'not a zip file')
  with pytest.raises(wf.WeightsError, match='bad.npz is not a readable .npz file'):
    wf.load_state_dict(tmp_path / 'bad.npz')
  (tmp_path / 'bad.safetensors').write_bytes(b'\xff' * 16)
  with pytest.raises(wf.WeightsError, match='not a safetensors file'):
    wf.load_state_dict(tmp_path / 'bad.safetensors')
  (tmp_path / 'bad.safetensors').write_bytes((4).to_bytes(8, 'little') + b'\xff\xfe{}')
  with pytest.raises(wf.WeightsError, match='header is not JSON'):
    wf.load_state_dict(tmp_path / 'bad.safetensors')
  write_safetensors(tmp_path / 'short.safetensors', {'w': np.zeros((2, 3), np.float32)})
  data = (tmp_path / 'short.safetensors').read_bytes()
  (tmp_path / 'short.safetensors').write_bytes(data[:-4])  # truncated
  with pytest.raises(wf.WeightsError, match="tensor 'w' has offsets 0..24"):
    wf.load_state_dict(tmp_path / 'short.safetensors')
  try:
    import torch  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
  except ImportError:
    (tmp_path / 'weights.pth').write_bytes(b'')
    with pytest.raises(wf.WeightsError, match='needs PyTorch.*safetensors or .npz'):
      wf.load_state_dict(tmp_path / 'weights.pth')



def assert_one_line_error(path, *patterns):
  """load_state_dict(path) raises WeightsError: one line, naming the file, saying what to do."""
  with pytest.raises(wf.WeightsError) as raised:
    wf.load_state_dict(path)
  message = str(raised.value)
  assert '\n' not in message and str(path) in message, message
  for pattern in patterns:
    assert re.search(pattern, message), (pattern, message)
  return message


@pytest.mark.parametrize('cut', ['empty', 'header', 'half', 'last_byte'])
def test_truncated_safetensors_and_npz_say_download_again(tmp_path, cut):
  """A download cut short anywhere (an interrupted transfer) names the file and the fix."""
  for suffix in ('.safetensors', '.npz'):
    whole = tmp_path / f'whole{suffix}'
    if suffix == '.npz':
      np.savez(whole, **small_state_dict())
    else:
      write_safetensors(whole, small_state_dict())
    data = whole.read_bytes()
    size = {'empty': 0, 'header': 12, 'half': len(data) // 2, 'last_byte': len(data) - 1}[cut]
    path = tmp_path / f'cut{suffix}'
    path.write_bytes(data[:size])
    assert_one_line_error(path, 'download it again')


def test_corrupt_safetensors_header_entry(tmp_path):
  path = tmp_path / 'bad.safetensors'
  header = json.dumps({'w': {'dtype': 'F32', 'shape': [2]}}).encode()  # no data_offsets
  path.write_bytes(len(header).to_bytes(8, 'little') + header + bytes(8))
  assert_one_line_error(path, "tensor 'w' has a malformed header entry", 'download it again')


def test_an_npz_of_one_array_is_not_a_state_dict(tmp_path):
  np.save(tmp_path / 'one.npy', np.zeros(3))
  (tmp_path / 'one.npz').write_bytes((tmp_path / 'one.npy').read_bytes())
  assert_one_line_error(tmp_path / 'one.npz', r'holds one array, not a state dict.*np\.savez')


# What torch 2.13's torch.load(weights_only=True) raised for damaged files (recorded with it),
# for the tests where torch is not installed.
TORCH_ERRORS = {
    'cut short': RuntimeError(
        'PytorchStreamReader failed reading zip archive: failed finding central directory. '
        'This is an internal miniz error. If you are seeing this error, there may be a bug.'),
    'cut by 3 bytes': ValueError('negative seek value -2395'),
    'old format cut short': RuntimeError(
        'unexpected EOF, expected 2248 more bytes. The file might be corrupted.'),
    'old format header only': EOFError(),
    'not a pickle': KeyError(101),
    'bad opcode': pickle.UnpicklingError(
        'Weights only load failed. In PyTorch 2.6, we changed the default value of the '
        '`weights_only` argument.\nPlease file an issue with the following: WeightsUnpickler '
        'error: \n\nUnsupported operand 0\n\nCheck the documentation of torch.load to learn more.'),
}


@pytest.mark.parametrize('case', list(TORCH_ERRORS))
def test_damaged_pth_without_torch_installed(tmp_path, monkeypatch, case):
  """torch's own error types (recorded above) become one-line WeightsErrors naming the file."""
  def load(*args, **kwargs):
    raise TORCH_ERRORS[case]
  monkeypatch.setitem(sys.modules, 'torch', types.SimpleNamespace(load=load))
  path = tmp_path / 'resnet18.pth'
  path.write_bytes(b'PK\x03\x04 part of a download')
  message = assert_one_line_error(path, 'download it again')
  assert type(TORCH_ERRORS[case]).__name__ in message
  if case == 'bad opcode':  # the cause, without torch's paragraphs
    assert 'Unsupported operand 0' in message and 'PyTorch 2.6' not in message
  (tmp_path / 'empty.pth').write_bytes(b'')
  assert_one_line_error(tmp_path / 'empty.pth', 'empty.pth is empty: download it again')


def test_damaged_pth_with_torch(tmp_path):
  """The real torch.load on cut-short files of both of torch's formats, and on a pickle of
  objects that weights_only refuses."""
  torch = pytest.importorskip('torch')
  state_dict = {key: torch.from_numpy(value) for key, value in small_state_dict().items()}
  torch.save(state_dict, tmp_path / 'zip.pth')
  torch.save(state_dict, tmp_path / 'old.pth', _use_new_zipfile_serialization=False)
  torch.save({'fc': fractions.Fraction(1, 3)}, tmp_path / 'objects.pth')
  np.testing.assert_array_equal(wf.load_state_dict(tmp_path / 'zip.pth')['conv1.weight'],
                                small_state_dict()['conv1.weight'])
  for name in ('zip.pth', 'old.pth'):
    data = (tmp_path / name).read_bytes()
    for size in (0, 3, 40, len(data) // 2, len(data) - 3):
      path = tmp_path / f'cut_{size}_{name}'
      path.write_bytes(data[:size])
      assert_one_line_error(path, 'download it again')
  assert_one_line_error(tmp_path / 'objects.pth', 'Python objects besides tensors',
                        r'model\.state_dict\(\)')
