"""Test infrastructure, apart from the tests: run.py in a subprocess, small configs
(helpers.py) and a GCS emulator on 127.0.0.1 (gcs_emulator.py)."""
