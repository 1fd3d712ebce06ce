"""The shell around the services: the ``recstream`` command line, ``recstream run`` (every service
as a supervised child process), the local Kafka and Redis stack, and the live demo.

Nothing imports this package except the entry point and tests; it may import every other package.
"""

__all__: list[str] = []
