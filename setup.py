# Metadata lives in pyproject.toml; this file keeps `python setup.py` style tools working.
from setuptools import setup

setup()
