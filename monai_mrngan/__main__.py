"""``python -m monai_mrngan``: see :mod:`monai_mrngan.apps.cli`."""

from .apps.cli import main

if __name__ == "__main__":
    main()
