"""Offline stand-ins for the services training talks to, for tests, examples, benchmarks and
offline development: local protocol servers that the real pyodps and ossfs clients talk to
unmodified (``odps_server``, ``oss_server``), and the synthetic CTR data generator (``ctr``).
Each lives in its own module and is imported by name; importing this package starts nothing.
"""

__all__: list[str] = []
