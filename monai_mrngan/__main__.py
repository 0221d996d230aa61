"""``python -m monai_mrngan``: see :mod:`monai_mrngan.cli`."""

from .cli import main

if __name__ == "__main__":
    main()
