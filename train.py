"""Train a classifier built from re-parameterizable blocks, test it, deploy it, compare.

    python train.py                                  # digits on CPU: about 2 min on 2 cores
    python train.py block=dbb trainer.max_epochs=5   # any block kind (configs/block/)
    python train.py -m block=plain,repvgg,dbb        # a sweep, compared at the end
    python train.py experiment=repvgg_cifar10 trainer=gpu data.download=true
    python train.py resume=true                      # continue the newest run, in its folder

The program is :mod:`repsqueeze.cli.train` (``train(cfg)`` for tests and tools); its
settings are in ``configs/`` and docs/train.md.
"""

from repsqueeze.cli.train import main

if __name__ == "__main__":
    main()
