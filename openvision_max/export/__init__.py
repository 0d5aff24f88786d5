"""Export to PyTorch (open_clip) and import back: name mapping, config JSON, the directory format, CLIs.

    python -m openvision_max.export CONFIG load_parameters_path=RUN export_dir=DIR
    python -m openvision_max.import_open_clip DIR CONFIG [key=value ...] output=RUN_DIR

See docs/export.md. Nothing here imports torch unless a PyTorch pickle has to be read.
"""
