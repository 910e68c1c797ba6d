"""Checkpoint in, verified plain model out: deployed.pt, torch.export (.pt2) and ONNX.

    python deploy.py ckpt_path=logs/train/runs/<run>/checkpoints/best.ckpt [output_dir=DIR] [data=digits]

The settings are in configs/deploy.yaml (grouped: ``tol.*``, ``formats.*``, ``measure.*``,
``int8.*``; see docs/deploy.md); the body of the command is :mod:`repsqueeze.cli.deploy`.
"""

from repsqueeze.cli.deploy import main

if __name__ == "__main__":
    main()
