"""Re-exports nnunet-kaz's trainers for nnU-Net's lookup (`nnUNet_extTrainer` points at this folder)."""
from nnunet_kaz.trainers import *  # noqa: F401,F403
