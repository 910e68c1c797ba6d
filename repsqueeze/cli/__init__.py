"""What the command-line entry points (``train.py``, ``deploy.py``) share; the only part of
the package that knows Hydra and OmegaConf."""
