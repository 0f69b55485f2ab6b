"""carbond: energy and carbon footprint of a machine's computing, for Prometheus.

Importing this package does nothing: no hardware library is loaded, no thread or task is started.
"""

__version__ = "0.1.0"
