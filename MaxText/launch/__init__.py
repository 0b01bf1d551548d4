"""Launchers: command lines around `python MaxText/train.py ...` for TPU pods, Slurm and Open MPI."""
