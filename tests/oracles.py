"""NVIDIA Emerging-Optimizers 0.3.0, a test and benchmark oracle, on Python 3.11.

The package declares Python >= 3.12 only for ``typing.override``; with that name supplied by
``typing_extensions`` it imports and runs on 3.11 (installed with ``--ignore-requires-python``).
"""

import typing

import typing_extensions


def allow_nvidia_import() -> None:
    """Provide ``typing.override`` so that ``import emerging_optimizers`` works on Python 3.11."""
    if not hasattr(typing, "override"):
        typing.override = typing_extensions.override
