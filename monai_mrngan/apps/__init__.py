"""What users run: the command line (``python -m monai_mrngan``), the pipeline and dataset completion."""
