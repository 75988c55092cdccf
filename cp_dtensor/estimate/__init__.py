"""Models of memory and communication, and the ``cp-dtensor`` command line that prints them."""

__all__: list[str] = []
